//! Gives a tensor's pages of the base mapping back as its chunks complete, in whole 2 MiB
//! regions of the file where it can.
//!
//! Releasing each chunk's range on its own (MADV_DONTNEED) keeps the resident set flat, but a
//! 1 MiB range splits the huge-page mapping the kernel often uses for page-cache large folios,
//! and every call sends a TLB-flush interrupt to the other cores. Waiting until every chunk of
//! an aligned 2 MiB region is done and releasing the region at once does neither, while the
//! resident set still stays within a few regions per thread.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::checkpoint::{SafeTensorsFile, TensorInfo};

/// The release granularity: the size of a huge-page mapping on x86-64 and aarch64 (4 KiB pages).
const REGION: usize = 2 << 20;

pub(super) struct ChunkRelease<'a> {
    shard: &'a SafeTensorsFile,
    t: &'a TensorInfo,
    chunks: Chunks,
}

impl<'a> ChunkRelease<'a> {
    /// Tracks tensor `t` of `shard`, processed in chunks of `chunk` bytes.
    pub(super) fn new(shard: &'a SafeTensorsFile, t: &'a TensorInfo, chunk: usize) -> Self {
        let at = shard.file_range(t).1 as usize;
        ChunkRelease {
            shard,
            t,
            chunks: Chunks::new(at, t.nbytes(), chunk),
        }
    }

    /// Chunk `ci` is done with its input: releases the regions it completes.
    pub(super) fn complete(&self, ci: usize) {
        for r in self.chunks.mark(ci) {
            self.shard.release(self.t, r.start, r.len());
        }
    }
}

/// Which chunks of a tensor are done, and which regions that completes.
struct Chunks {
    /// The tensor's offset in the file: regions are aligned in file offsets, as huge mappings are.
    at: usize,
    len: usize,
    /// Bytes per chunk (the last may be shorter).
    chunk: usize,
    done: Vec<AtomicBool>,
}

impl Chunks {
    fn new(at: usize, len: usize, chunk: usize) -> Self {
        let chunk = chunk.max(1);
        Chunks {
            at,
            len,
            chunk,
            done: (0..len.div_ceil(chunk))
                .map(|_| AtomicBool::new(false))
                .collect(),
        }
    }

    /// Marks chunk `ci` done and returns the tensor byte ranges of the regions it overlaps whose
    /// chunks are now all done. (When two chunks of a region finish at once, both may return
    /// it, which is harmless; at least one of them sees the other done.)
    fn mark(&self, ci: usize) -> Vec<Range<usize>> {
        self.done[ci].store(true, Ordering::SeqCst);
        let (start, end) = (ci * self.chunk, ((ci + 1) * self.chunk).min(self.len));
        ((self.at + start) / REGION..=(self.at + end - 1) / REGION)
            .map(|k| {
                let rs = (k * REGION).saturating_sub(self.at);
                rs..((k + 1) * REGION - self.at).min(self.len)
            })
            .filter(|r| {
                (r.start / self.chunk..=(r.end - 1) / self.chunk)
                    .all(|c| self.done[c].load(Ordering::SeqCst))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whatever order the chunks finish in, every byte of the tensor is released by the time
    /// the last one is done, and nothing is released while a chunk overlapping it is pending.
    #[test]
    fn every_region_is_released_once_its_chunks_are_done() {
        let mut seed = 12345u64;
        for (at, len, chunk) in [
            (8 + 123, 5 * REGION + 777, 1 << 20),
            (0, REGION, 1 << 20),
            (REGION - 1, 3 * REGION, 3 << 19),
            (4096, 100, 1 << 20),
            (77, 9 * REGION, 5 << 20),
        ] {
            let chunks = Chunks::new(at, len, chunk);
            let n = chunks.done.len();
            let mut order: Vec<usize> = (0..n).collect();
            for i in (1..n).rev() {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                order.swap(i, (seed >> 33) as usize % (i + 1));
            }
            let mut released = vec![false; len];
            for &ci in &order {
                for r in chunks.mark(ci) {
                    let pending = (r.start / chunk..=(r.end - 1) / chunk)
                        .any(|c| !chunks.done[c].load(Ordering::SeqCst));
                    assert!(!pending, "released {r:?} with a chunk still pending");
                    released[r].iter_mut().for_each(|b| *b = true);
                }
            }
            assert!(
                released.iter().all(|&b| b),
                "at={at} len={len} chunk={chunk}"
            );
        }
    }
}
