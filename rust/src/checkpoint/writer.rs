//! A streaming safetensors writer: the header is written first, from the sizes known up front,
//! then each tensor's bytes as they are produced, in any number of pieces. The file is built under
//! a temporary name in the same folder and renamed into place only after an fsync, so a reader
//! never sees a partial file; dropping an unfinished writer removes the temporary file.
//! [`PositionalWriter`] instead takes the data in any order, from several threads at once.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Map, Value};

use super::pio::{read_at, write_all_at};
use super::reader::{byte_size, Dtype};
use crate::{Error, Result};

/// Name, dtype and shape of a tensor to be written.
#[derive(Clone, Debug)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

/// Serialises a header for `tensors` laid out in the given order, padded with spaces to a
/// multiple of 8 bytes (as safetensors does, so that data starts aligned).
pub fn header_bytes(
    metadata: Option<&Map<String, Value>>,
    tensors: &[TensorSpec],
) -> Result<(Vec<u8>, u64)> {
    let mut root = Map::new();
    if let Some(m) = metadata {
        root.insert("__metadata__".into(), Value::Object(m.clone()));
    }
    let mut offset = 0usize;
    for t in tensors {
        let n = byte_size(&t.shape, t.dtype)
            .ok_or_else(|| Error::tensor(&t.name, format!("shape {:?} overflows", t.shape)))?;
        let end = offset
            .checked_add(n)
            .ok_or_else(|| Error::tensor(&t.name, "file size overflows"))?;
        let mut e = Map::new();
        e.insert("dtype".into(), Value::from(t.dtype.as_str()));
        e.insert("shape".into(), Value::from(t.shape.clone()));
        e.insert("data_offsets".into(), Value::from(vec![offset, end]));
        if root.insert(t.name.clone(), Value::Object(e)).is_some() {
            return Err(Error::tensor(&t.name, "appears twice in one file"));
        }
        offset = end;
    }
    let mut json = serde_json::to_vec(&Value::Object(root)).expect("a JSON map serialises");
    json.resize(json.len().div_ceil(8) * 8, b' ');
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    Ok((out, offset as u64))
}

/// A file being built under a temporary name in the folder of its final path; [`finish`] fsyncs
/// it and renames it into place. Dropped unfinished, it removes the temporary file.
///
/// [`finish`]: PartialFile::finish
struct PartialFile {
    path: PathBuf,
    tmp: PathBuf,
    file: Option<File>,
}

impl PartialFile {
    fn create(path: &Path) -> Result<Self> {
        let file_name = path.file_name().ok_or_else(|| {
            Error::invalid_argument(format!("{}: not a file path", path.display()))
        })?;
        let tmp = path.with_file_name(format!(".{}.partial", file_name.to_string_lossy()));
        let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        Ok(PartialFile {
            path: path.to_path_buf(),
            tmp,
            file: Some(file),
        })
    }

    fn file(&self) -> &File {
        self.file.as_ref().expect("open until finish")
    }

    fn io(&self, e: std::io::Error) -> Error {
        Error::io(&self.tmp, e)
    }

    /// Errors unless `written == expected`; then fsyncs and renames into place.
    fn finish(mut self, written: u64, expected: u64) -> Result<()> {
        if written != expected {
            return Err(Error::invalid_file(
                &self.path,
                format!("only {written} of {expected} data bytes were written"),
            ));
        }
        let file = self.file.take().expect("open until finish");
        file.sync_all().map_err(|e| Error::io(&self.tmp, e))?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path).map_err(|e| Error::io(&self.path, e))
    }
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Writes a safetensors file front to back: the header, then each tensor's bytes in order.
pub struct StreamingWriter {
    out: PartialFile,
    data_start: u64,
    expected: u64,
    written: u64,
}

impl StreamingWriter {
    /// Creates `<dir>/.<name>.partial` and writes the header for `tensors`, whose bytes must then
    /// be passed to [`write`](Self::write) in this order.
    pub fn create(
        path: impl AsRef<Path>,
        metadata: Option<&Map<String, Value>>,
        tensors: &[TensorSpec],
    ) -> Result<Self> {
        let (header, expected) = header_bytes(metadata, tensors)?;
        Self::create_with_header(path, &header, expected)
    }

    /// Like [`create`](Self::create) with a header that is already serialised (e.g. copied from
    /// a file of the same layout, so that the output is byte-identical where the data is) and
    /// declares `expected` data bytes.
    pub fn create_with_header(
        path: impl AsRef<Path>,
        header: &[u8],
        expected: u64,
    ) -> Result<Self> {
        let out = PartialFile::create(path.as_ref())?;
        out.file().write_all(header).map_err(|e| out.io(e))?;
        Ok(StreamingWriter {
            out,
            data_start: header.len() as u64,
            expected,
            written: 0,
        })
    }

    fn account(&mut self, n: u64) -> Result<()> {
        let after = self.written + n;
        if after > self.expected {
            return Err(Error::invalid_file(
                &self.out.path,
                format!(
                    "{after} data bytes written, header declares {}",
                    self.expected
                ),
            ));
        }
        self.written = after;
        Ok(())
    }

    /// Appends tensor bytes (any split of the data stream).
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let at = self.data_start + self.written;
        self.account(bytes.len() as u64)?;
        self.out
            .file()
            .write_all(bytes)
            .map_err(|e| self.out.io(e))?;
        start_writeback(self.out.file(), at, bytes.len() as u64);
        Ok(())
    }

    /// Data bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Appends everything `reader` yields (File to File copies stay inside the kernel on Linux).
    pub fn copy_from<R: std::io::Read>(&mut self, reader: &mut R) -> Result<()> {
        let at = self.data_start + self.written;
        let n = std::io::copy(reader, &mut self.out.file()).map_err(|e| self.out.io(e))?;
        start_writeback(self.out.file(), at, n);
        self.account(n)
    }

    /// Checks that every declared byte was written, fsyncs and renames into place.
    pub fn finish(self) -> Result<()> {
        self.out.finish(self.written, self.expected)
    }
}

/// Writes a safetensors file whose header is known, with the data in any order and from any
/// number of threads at once: each piece goes to its offset (`pwrite` / `copy_file_range`), and
/// the kernel is asked to start writing it back to disk right away, so the final fsync finds
/// little left to do. The caller must write every data byte exactly once; [`finish`] checks the
/// byte count.
///
/// [`finish`]: PositionalWriter::finish
pub struct PositionalWriter {
    out: PartialFile,
    data_start: u64,
    expected: u64,
    written: AtomicU64,
}

impl PositionalWriter {
    pub fn create_with_header(
        path: impl AsRef<Path>,
        header: &[u8],
        expected: u64,
    ) -> Result<Self> {
        let out = PartialFile::create(path.as_ref())?;
        let data_start = header.len() as u64;
        write_all_at(out.file(), header, 0).map_err(|e| out.io(e))?;
        reserve(out.file(), data_start + expected).map_err(|e| out.io(e))?;
        Ok(PositionalWriter {
            out,
            data_start,
            expected,
            written: AtomicU64::new(0),
        })
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.expected)
        {
            return Err(Error::invalid_file(
                &self.out.path,
                format!(
                    "write of {len} bytes at data offset {offset} passes the {} declared",
                    self.expected
                ),
            ));
        }
        Ok(())
    }

    /// Writes `bytes` at data offset `offset`.
    pub fn write_at(&self, offset: u64, bytes: &[u8]) -> Result<()> {
        self.check_range(offset, bytes.len() as u64)?;
        let at = self.data_start + offset;
        write_all_at(self.out.file(), bytes, at).map_err(|e| self.out.io(e))?;
        self.written
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        start_writeback(self.out.file(), at, bytes.len() as u64);
        Ok(())
    }

    /// Copies `len` bytes of `src` from `src_offset` to data offset `offset`, inside the kernel
    /// where it can (copy_file_range), else through a buffer.
    pub fn copy_at(&self, offset: u64, src: &File, src_offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        let at = self.data_start + offset;
        let copied =
            copy_range(src, src_offset, self.out.file(), at, len).map_err(|e| self.out.io(e))?;
        if copied != len {
            return Err(Error::invalid_file(
                &self.out.path,
                format!(
                    "source ended after {copied} of {len} bytes (file shrank while being read)"
                ),
            ));
        }
        self.written.fetch_add(len, Ordering::Relaxed);
        start_writeback(self.out.file(), at, len);
        Ok(())
    }

    /// Checks that every declared byte was written, fsyncs and renames into place.
    pub fn finish(self) -> Result<()> {
        let written = self.written.load(Ordering::Relaxed);
        self.out.finish(written, self.expected)
    }
}

/// Sizes the file to `len` bytes, allocating its blocks in one go where the file system can
/// (fallocate): a full disk fails here, before any work, and the writes that follow skip the
/// per-page block reservation of delayed allocation.
fn reserve(f: &File, len: u64) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: plain syscall on an open descriptor.
        let rc = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, len as libc::off_t) };
        if rc == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if !matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOSYS)) {
            return Err(e);
        }
    }
    f.set_len(len)
}

/// Asks the kernel to start writing a just-written range to disk without waiting for it, so
/// that disk and CPU work overlap instead of everything waiting on the final fsync.
#[cfg(target_os = "linux")]
fn start_writeback(f: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall on an open descriptor; a failure only loses the hint.
    unsafe {
        libc::sync_file_range(
            f.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_: &File, _: u64, _: u64) {}

/// Copies `len` bytes between positions of two files; returns the bytes copied (fewer only when
/// the source ends early).
fn copy_range(
    src: &File,
    src_offset: u64,
    dst: &File,
    dst_offset: u64,
    len: u64,
) -> std::io::Result<u64> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let (mut off_in, mut off_out) = (src_offset as libc::loff_t, dst_offset as libc::loff_t);
        let mut done = 0u64;
        while done < len {
            let want = (len - done).min(1 << 30) as usize;
            // SAFETY: both descriptors are open; the offsets are ours and advanced by the kernel.
            let n = unsafe {
                libc::copy_file_range(
                    src.as_raw_fd(),
                    &mut off_in,
                    dst.as_raw_fd(),
                    &mut off_out,
                    want,
                    0,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                // Not supported between these files (other file system, old kernel): fall back.
                if done == 0
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::EXDEV | libc::ENOSYS | libc::EINVAL | libc::EOPNOTSUPP)
                    )
                {
                    break;
                }
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Ok(done);
            }
            done += n as u64;
        }
        if done == len {
            return Ok(done);
        }
    }
    let mut buf = vec![0u8; (len as usize).min(8 << 20)];
    let mut done = 0u64;
    while done < len {
        let want = ((len - done) as usize).min(buf.len());
        let n = read_at(src, &mut buf[..want], src_offset + done)?;
        if n == 0 {
            break;
        }
        write_all_at(dst, &buf[..n], dst_offset + done)?;
        done += n as u64;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::reader::SafeTensorsFile;

    #[test]
    fn roundtrip_in_pieces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("o.safetensors");
        let specs = vec![
            TensorSpec {
                name: "z".into(),
                dtype: Dtype::F32,
                shape: vec![3],
            },
            TensorSpec {
                name: "a".into(),
                dtype: Dtype::U8,
                shape: vec![2, 1],
            },
        ];
        let mut meta = Map::new();
        meta.insert("format".into(), "pt".into());
        let mut w = StreamingWriter::create(&p, Some(&meta), &specs).unwrap();
        assert!(!p.exists());
        let z: Vec<u8> = [1.0f32, 2.0, 3.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        w.write(&z[..5]).unwrap();
        w.write(&z[5..]).unwrap();
        w.write(&[9, 8]).unwrap();
        assert!(w.write(&[1]).is_err());
        w.finish().unwrap();
        let f = SafeTensorsFile::open(&p).unwrap();
        assert_eq!(
            f.read_f32(f.require("z").unwrap()).unwrap(),
            [1.0, 2.0, 3.0]
        );
        assert_eq!(f.data(f.require("a").unwrap()), &[9, 8]);
        assert_eq!(f.metadata().unwrap()["format"], "pt");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn unfinished_writer_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("o.safetensors");
        let specs = vec![TensorSpec {
            name: "a".into(),
            dtype: Dtype::U8,
            shape: vec![4],
        }];
        let mut w = StreamingWriter::create(&p, None, &specs).unwrap();
        w.write(&[1, 2]).unwrap();
        drop(w);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let w = StreamingWriter::create(&p, None, &specs).unwrap();
        assert!(w.finish().unwrap_err().to_string().contains("only 0 of 4"));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn positional_writes_from_threads_in_any_order() {
        use rayon::prelude::*;
        let dir = tempfile::tempdir().unwrap();
        let src_path = dir.path().join("src.bin");
        let src_bytes: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        std::fs::write(&src_path, &src_bytes).unwrap();
        let src = File::open(&src_path).unwrap();
        let specs: Vec<TensorSpec> = (0..64)
            .map(|i| TensorSpec {
                name: format!("t{i}"),
                dtype: Dtype::U8,
                shape: vec![64],
            })
            .collect();
        let (header, expected) = header_bytes(None, &specs).unwrap();
        let p = dir.path().join("o.safetensors");
        let w = PositionalWriter::create_with_header(&p, &header, expected).unwrap();
        // A short source is an error (the bytes it did copy are rewritten below).
        assert!(w.copy_at(0, &src, 4090, 64).is_err(), "source too short");
        // Odd tensors written from memory, even ones copied from the source file, in reverse.
        (0..64u64).into_par_iter().map(|i| 63 - i).for_each(|i| {
            if i % 2 == 1 {
                w.write_at(i * 64, &[i as u8; 64]).unwrap();
            } else {
                w.copy_at(i * 64, &src, i * 64, 64).unwrap();
            }
        });
        assert!(w.write_at(expected - 1, &[0, 0]).is_err());
        w.finish().unwrap();
        let f = SafeTensorsFile::open(&p).unwrap();
        for i in 0..64usize {
            let want = if i % 2 == 1 {
                vec![i as u8; 64]
            } else {
                src_bytes[i * 64..i * 64 + 64].to_vec()
            };
            assert_eq!(f.data(f.require(&format!("t{i}")).unwrap()), &want[..]);
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn positional_writer_missing_bytes_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let specs = vec![TensorSpec {
            name: "a".into(),
            dtype: Dtype::U8,
            shape: vec![8],
        }];
        let (header, expected) = header_bytes(None, &specs).unwrap();
        let p = dir.path().join("o.safetensors");
        let w = PositionalWriter::create_with_header(&p, &header, expected).unwrap();
        w.write_at(4, &[1, 2, 3, 4]).unwrap();
        let e = w.finish().unwrap_err().to_string();
        assert!(e.contains("only 4 of 8"), "{e}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
