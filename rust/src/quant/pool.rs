//! Output buffers for the dequantisation kernels that skip most of the cost of fresh memory.
//!
//! A multi-megabyte output costs more in first-touch page faults than the kernel spends writing it:
//! every 4 KiB page traps into the kernel, which zeroes it (about 3 us a page on this project's
//! virtual machines, ~27 ms for 32 MiB). Two things cut that:
//! - fresh buffers are mapped with a 2 MiB-aligned interior advised `MADV_HUGEPAGE`, so a 32 MiB
//!   output takes 16 faults instead of 8192 (where transparent huge pages are in `madvise` or
//!   `always` mode; elsewhere the advice is ignored and nothing changes but speed);
//! - a buffer whose owner drops it goes back to a small pool, bounded in bytes, and the next output
//!   of about the same size reuses its already-mapped pages (the CPU twin of torch's CUDA caching
//!   allocator). `set_pool_limit(0)` turns the pool off and unmaps what it holds.

use std::sync::Mutex;

use memmap2::{MmapMut, MmapOptions};

use crate::{Error, Result};

/// Size of a transparent huge page on x86-64 and most aarch64 kernels.
const HUGE_PAGE: usize = 2 << 20;
/// Below this an output is cheap to fault in and the caller's own allocator serves it better.
pub const MIN_POOLED_BYTES: usize = 1 << 20;
/// Bytes the pool may hold by default: a few of the largest layers of a 7B-class model.
pub const DEFAULT_POOL_LIMIT: usize = 256 << 20;

struct Pool {
    limit: usize,
    held: usize,
    /// Idle mappings, oldest first.
    idle: Vec<MmapMut>,
}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    limit: DEFAULT_POOL_LIMIT,
    held: 0,
    idle: Vec::new(),
});

fn pool() -> std::sync::MutexGuard<'static, Pool> {
    // A panic while holding the lock cannot leave the pool inconsistent (each update is one push
    // or remove with its byte count), so a poisoned lock is safe to keep using.
    POOL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Bytes to map for `len` usable ones: one spare huge page of address space lets the data start
/// on a 2 MiB boundary (mappings are page-aligned, so the offset is below that spare); the
/// untouched spare costs no memory.
fn mapped_len(len: usize) -> usize {
    len.next_multiple_of(4096) + HUGE_PAGE
}

fn aligned_offset(map: &MmapMut) -> usize {
    (map.as_ptr() as usize).next_multiple_of(HUGE_PAGE) - map.as_ptr() as usize
}

/// A writable buffer of at least the bytes asked for, starting on a 2 MiB boundary; returns to the
/// pool when dropped.
pub struct OutputBuffer {
    map: Option<MmapMut>,
}

impl OutputBuffer {
    /// A buffer for `len` bytes: an idle pooled one that fits (no more than a quarter
    /// larger, so small outputs do not pin big mappings), or a fresh huge-page-advised mapping.
    pub fn take(len: usize) -> Result<Self> {
        {
            let mut pool = pool();
            let want = mapped_len(len);
            if let Some(i) = pool
                .idle
                .iter()
                .position(|m| m.len() >= want && m.len() - want <= want / 4)
            {
                let map = pool.idle.remove(i);
                pool.held -= map.len();
                return Ok(OutputBuffer { map: Some(map) });
            }
        }
        let mapped = mapped_len(len);
        let map = MmapOptions::new().len(mapped).map_anon().map_err(|e| {
            Error::invalid_argument(format!("cannot map {mapped} bytes for an output: {e}"))
        })?;
        // Advice only: a kernel without transparent huge pages refuses it and nothing else changes.
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage);
        Ok(OutputBuffer { map: Some(map) })
    }

    /// Start of the bytes asked for, 2 MiB-aligned; they are writable and end inside the mapping.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        let map = self.map.as_mut().expect("present until drop");
        let offset = aligned_offset(map);
        // SAFETY: the mapping holds at least `mapped_len(len)` bytes for the `len` asked for and
        // offset < HUGE_PAGE, so offset + len stays inside it.
        unsafe { map.as_mut_ptr().add(offset) }
    }
}

impl Drop for OutputBuffer {
    fn drop(&mut self) {
        let Some(map) = self.map.take() else { return };
        let mut pool = pool();
        if map.len() > pool.limit {
            return;
        }
        while pool.held + map.len() > pool.limit {
            let oldest = pool.idle.remove(0);
            pool.held -= oldest.len();
        }
        pool.held += map.len();
        pool.idle.push(map);
    }
}

/// Sets how many bytes of idle output buffers the pool keeps (0: none) and unmaps the excess;
/// returns the previous limit.
pub fn set_pool_limit(bytes: usize) -> usize {
    let mut pool = pool();
    let previous = std::mem::replace(&mut pool.limit, bytes);
    while pool.held > bytes {
        let oldest = pool.idle.remove(0);
        pool.held -= oldest.len();
    }
    previous
}

/// Bytes the pool holds in idle buffers now.
pub fn pooled_bytes() -> usize {
    pool().held
}

#[cfg(test)]
mod tests {
    use super::*;

    // One test touches the process-wide pool, so the steps run in order in one function.
    #[test]
    fn buffers_are_aligned_recycled_and_bounded() {
        let previous = set_pool_limit(64 << 20);
        let mut a = OutputBuffer::take(3 << 20).unwrap();
        let ptr = a.as_mut_ptr();
        assert_eq!(ptr as usize % HUGE_PAGE, 0);
        // SAFETY: the buffer holds the 3 MiB asked for.
        unsafe { std::ptr::write_bytes(ptr, 7, 3 << 20) };
        drop(a);
        assert!(pooled_bytes() >= 3 << 20);
        // A buffer of about the same size reuses the mapping (its bytes are still there).
        let mut b = OutputBuffer::take((3 << 20) - 100).unwrap();
        assert_eq!(b.as_mut_ptr(), ptr);
        // SAFETY: as above.
        assert_eq!(unsafe { *b.as_mut_ptr().add(5) }, 7);
        assert_eq!(pooled_bytes(), 0);
        // A much smaller one does not pin the big mapping.
        drop(b);
        let mut c = OutputBuffer::take(1 << 20).unwrap();
        assert_ne!(c.as_mut_ptr(), ptr);
        drop(c);
        // Over the limit, the oldest idle mappings go first; a zero limit empties the pool.
        set_pool_limit(5 << 20);
        assert!(pooled_bytes() <= 5 << 20);
        set_pool_limit(0);
        assert_eq!(pooled_bytes(), 0);
        drop(OutputBuffer::take(2 << 20).unwrap());
        assert_eq!(pooled_bytes(), 0);
        set_pool_limit(previous);
    }
}
