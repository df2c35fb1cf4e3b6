//! The exact-unmerge sidecar of one shard. Its entries arrive from several threads in any order
//! while the shard is merged; their bytes are spilled to a scratch file at once (the sidecar of a
//! large model does not fit in memory), and [`SidecarSpill::finish`] writes the sidecar shard with
//! its entries in the base's tensor order, so the file does not depend on thread timing.

use std::fs::File;
use std::path::PathBuf;
use std::sync::Mutex;

use super::{digest, CHUNK_BYTES};
use crate::checkpoint::pio::{read_exact_at, write_all_at};
use crate::checkpoint::{SafeTensorsFile, StreamingWriter, TensorSpec};
use crate::{Error, Result};

/// Where an entry's bytes come from.
enum Source {
    /// A byte range (start, length) of the spill file.
    Spill(u64, u64),
    /// A tensor of the base shard, copied as it is (a replaced tensor's original).
    Base(String),
}

/// An entry's place in the sidecar: its base tensor's position in the shard, then its kind.
type Order = (usize, u8);

struct Entries {
    list: Vec<(Order, TensorSpec, Source)>,
    spilled: u64,
}

pub(super) struct SidecarSpill {
    dir: PathBuf,
    name: String,
    file: File,
    path: PathBuf,
    entries: Mutex<Entries>,
}

impl SidecarSpill {
    /// Starts the sidecar of shard `name` in `dir` (the spill file is hidden there meanwhile).
    pub(super) fn new(dir: PathBuf, name: String) -> Result<Self> {
        let path = dir.join(format!(".{name}.spill"));
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        Ok(SidecarSpill {
            dir,
            name,
            file,
            path,
            entries: Mutex::new(Entries {
                list: Vec::new(),
                spilled: 0,
            }),
        })
    }

    /// Adds an entry with its bytes; `order` places it in the sidecar.
    pub(super) fn spill(&self, order: Order, spec: TensorSpec, bytes: &[u8]) -> Result<()> {
        // Reserve the range under the lock, write it outside.
        let start = {
            let mut e = self.entries.lock().expect("no panics while locked");
            let start = e.spilled;
            e.spilled += bytes.len() as u64;
            e.list
                .push((order, spec, Source::Spill(start, bytes.len() as u64)));
            start
        };
        write_all_at(&self.file, bytes, start).map_err(|e| Error::io(&self.path, e))
    }

    /// Adds an entry that is a base tensor, copied as it is when the sidecar is written.
    pub(super) fn keep_base(&self, order: Order, spec: TensorSpec, base_name: &str) {
        let mut e = self.entries.lock().expect("no panics while locked");
        e.list
            .push((order, spec, Source::Base(base_name.to_string())));
    }

    /// Writes the sidecar shard (header first) and removes the spill; returns its name, size
    /// and digest (for the manifest).
    pub(super) fn finish(self, base: &SafeTensorsFile) -> Result<(String, u64, u64)> {
        let mut entries = std::mem::replace(
            &mut *self.entries.lock().expect("no panics while locked"),
            Entries {
                list: Vec::new(),
                spilled: 0,
            },
        )
        .list;
        entries.sort_by_key(|e| e.0);
        let specs: Vec<TensorSpec> = entries.iter().map(|e| e.1.clone()).collect();
        let mut meta = serde_json::Map::new();
        meta.insert("format".into(), "oxpeft-exact-unmerge".into());
        // 2: fix-up lists as varint records with a seek table (see `fixlist`); 1: index + value.
        meta.insert("format_version".into(), "2".into());
        let out = self.dir.join(&self.name);
        let mut w = StreamingWriter::create(&out, Some(&meta), &specs)?;
        let mut buf = vec![0u8; CHUNK_BYTES];
        for (_, _, src) in &entries {
            match src {
                Source::Spill(start, len) => {
                    let mut done = 0u64;
                    while done < *len {
                        let n = ((len - done) as usize).min(buf.len());
                        read_exact_at(&self.file, &mut buf[..n], start + done)
                            .map_err(|e| Error::io(&self.path, e))?;
                        w.write(&buf[..n])?;
                        done += n as u64;
                    }
                }
                Source::Base(name) => {
                    let t = base.require(name)?;
                    let before = w.written();
                    w.copy_from(&mut base.tensor_reader(t)?)?;
                    if w.written() - before != t.nbytes() as u64 {
                        return Err(Error::invalid_file(
                            base.path(),
                            format!("tensor '{}': file shrank while being read", t.name),
                        ));
                    }
                }
            }
        }
        w.finish()?;
        std::fs::remove_file(&self.path).map_err(|e| Error::io(&self.path, e))?;
        let (len, digest) = digest::of_file(&out)?;
        Ok((self.name.clone(), len, digest))
    }
}

impl Drop for SidecarSpill {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
