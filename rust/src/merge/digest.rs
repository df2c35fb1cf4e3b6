//! The digests that make an exact unmerge prove itself.
//!
//! A merge that writes the exact-unmerge sidecar records, for every tensor of the base, the
//! digest of its original bytes and of its merged bytes, the digest of every shard's header and
//! of every sidecar file. An unmerge checks the sidecar files and the merged shards' headers
//! before it writes anything, the merged bytes of every tensor as it reads them, and every
//! restored tensor against its original digest before the output is published: any difference
//! is an error naming the file or tensor.
//!
//! A digest is xxh3-64 (runtime-dispatched AVX2 / SSE2, tens of GB/s) of a tensor's bytes cut into
//! the merge's work chunks: each chunk is hashed by the task that computes it, while its bytes are
//! in cache, and the tensor's digest is the hash of its chunks' hashes in order (seeded with the
//! byte length). The chunking is the merge's (see `shard::chunk_bytes`) and is recorded in the
//! manifest, so a build that chunks differently refuses instead of reporting a false mismatch.

use std::collections::HashMap;
use std::path::Path;

use rayon::prelude::*;
use serde_json::{json, Map, Value};
use twox_hash::XxHash3_64;

use crate::{Error, Result};

/// The digest scheme's name in the manifest.
pub const SCHEME: &str = "xxh3-64 of chunk hashes";
/// Files (sidecar shards) and headers are hashed in blocks of this size.
const FILE_BLOCK: usize = 1 << 20;

/// The hash of one chunk: xxh3-64 seeded with the chunk's index, so that equal chunks at
/// different places (or two swapped chunks) give a different digest.
pub(super) fn chunk(index: usize, bytes: &[u8]) -> u64 {
    XxHash3_64::oneshot_with_seed(index as u64, bytes)
}

/// The digest of `len` bytes whose chunks hashed to `chunks`, in order.
pub(super) fn combine(len: u64, chunks: &[u64]) -> u64 {
    let bytes: Vec<u8> = chunks.iter().flat_map(|h| h.to_le_bytes()).collect();
    XxHash3_64::oneshot_with_seed(len, &bytes)
}

/// The digest of `bytes` cut into chunks of `chunk_len` bytes, hashed in parallel.
pub(super) fn of_slice(bytes: &[u8], chunk_len: usize) -> u64 {
    let hashes: Vec<u64> = bytes
        .par_chunks(chunk_len.max(1))
        .enumerate()
        .map(|(i, c)| chunk(i, c))
        .collect();
    combine(bytes.len() as u64, &hashes)
}

/// The size and digest of the regular file at `path` (memory-mapped, hashed in parallel).
pub(super) fn of_file(path: &Path) -> Result<(u64, u64)> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::invalid_file(path, "not a regular file"));
    }
    if meta.len() == 0 {
        return Ok((0, combine(0, &[])));
    }
    // SAFETY: read-only mapping of a file that this process does not write; a concurrent
    // writer would at worst give a wrong digest, which is then reported as a mismatch.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    Ok((meta.len(), of_slice(&map, FILE_BLOCK)))
}

/// The digest of a shard's header bytes.
pub(super) fn of_header(header: &[u8]) -> u64 {
    of_slice(header, FILE_BLOCK)
}

pub fn hex(d: u64) -> String {
    format!("{d:016x}")
}

/// A tensor's digests: its original bytes (the base's) and its merged bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorDigests {
    pub original: u64,
    pub merged: u64,
}

/// One shard's recorded digests, its tensors in the shard's order.
#[derive(Clone, Debug, Default)]
pub struct ShardDigests {
    pub header: u64,
    pub tensors: Vec<(String, TensorDigests)>,
}

/// Everything a merge records for the unmerge to check.
#[derive(Clone, Debug, Default)]
pub struct Digests {
    /// The merge's work chunk (`CHUNK_BYTES`), which the tensor digests depend on.
    pub chunk_bytes: usize,
    /// Merged shards by file name.
    pub shards: Vec<(String, ShardDigests)>,
    /// Sidecar files by name: (size, digest).
    pub sidecar: Vec<(String, u64, u64)>,
}

impl Digests {
    /// The manifest's `digests` object.
    pub fn to_json(&self) -> Value {
        let shards: Map<String, Value> = self
            .shards
            .iter()
            .map(|(name, s)| {
                let tensors: Map<String, Value> = s
                    .tensors
                    .iter()
                    .map(|(t, d)| {
                        let mut e = Map::new();
                        e.insert("original".into(), hex(d.original).into());
                        if d.merged != d.original {
                            e.insert("merged".into(), hex(d.merged).into());
                        }
                        (t.clone(), Value::Object(e))
                    })
                    .collect();
                (
                    name.clone(),
                    json!({"header": hex(s.header), "tensors": tensors}),
                )
            })
            .collect();
        let sidecar: Map<String, Value> = self
            .sidecar
            .iter()
            .map(|(name, len, d)| (name.clone(), json!({"bytes": len, "digest": hex(*d)})))
            .collect();
        json!({
            "scheme": SCHEME,
            "chunk_bytes": self.chunk_bytes,
            "shards": shards,
            "sidecar_files": sidecar,
        })
    }

    /// Reads the manifest's `digests` object; anything malformed is an error naming `manifest`
    /// and the field.
    pub fn from_json(v: &Value, manifest: &Path) -> Result<Self> {
        let bad = |field: &str, what: &str| {
            Error::invalid_file(
                manifest,
                format!("field 'digests.{field}' {what}; the sidecar is damaged"),
            )
        };
        let obj = |v: &Value, field: &str| -> Result<Map<String, Value>> {
            v.as_object()
                .cloned()
                .ok_or_else(|| bad(field, "is not an object"))
        };
        let digest = |v: Option<&Value>, field: &str| -> Result<u64> {
            v.and_then(Value::as_str)
                .filter(|s| s.len() == 16)
                .and_then(|s| u64::from_str_radix(s, 16).ok())
                .ok_or_else(|| bad(field, "is not a 16-digit hex digest"))
        };
        let top = obj(v, "")?;
        if top.get("scheme").and_then(Value::as_str) != Some(SCHEME) {
            return Err(bad("scheme", &format!("is not '{SCHEME}'")));
        }
        let chunk_bytes =
            top.get("chunk_bytes")
                .and_then(Value::as_u64)
                .ok_or_else(|| bad("chunk_bytes", "is not a number"))? as usize;
        let mut shards = Vec::new();
        for (name, s) in obj(top.get("shards").unwrap_or(&Value::Null), "shards")? {
            let field = format!("shards.{name}");
            let s = obj(&s, &field)?;
            let header = digest(s.get("header"), &format!("{field}.header"))?;
            let mut tensors = Vec::new();
            for (t, d) in obj(
                s.get("tensors").unwrap_or(&Value::Null),
                &format!("{field}.tensors"),
            )? {
                let tf = format!("{field}.tensors.{t}");
                let original = digest(d.get("original"), &format!("{tf}.original"))?;
                let merged = match d.get("merged") {
                    None => original,
                    some => digest(some, &format!("{tf}.merged"))?,
                };
                tensors.push((t, TensorDigests { original, merged }));
            }
            shards.push((name, ShardDigests { header, tensors }));
        }
        let mut sidecar = Vec::new();
        for (name, f) in obj(
            top.get("sidecar_files").unwrap_or(&Value::Null),
            "sidecar_files",
        )? {
            let field = format!("sidecar_files.{name}");
            let len = f
                .get("bytes")
                .and_then(Value::as_u64)
                .ok_or_else(|| bad(&format!("{field}.bytes"), "is not a number"))?;
            let d = digest(f.get("digest"), &format!("{field}.digest"))?;
            sidecar.push((name, len, d));
        }
        Ok(Digests {
            chunk_bytes,
            shards,
            sidecar,
        })
    }

    /// Every tensor's recorded digests by name.
    pub(super) fn tensor_map(&self) -> HashMap<&str, TensorDigests> {
        self.shards
            .iter()
            .flat_map(|(_, s)| s.tensors.iter().map(|(t, d)| (t.as_str(), *d)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slice_digest_is_the_combined_chunk_hashes() {
        let bytes: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let by_hand: Vec<u64> = bytes
            .chunks(1000)
            .enumerate()
            .map(|(i, c)| chunk(i, c))
            .collect();
        assert_eq!(of_slice(&bytes, 1000), combine(10_000, &by_hand));
        // Swapping two chunks, or cutting differently, changes the digest.
        let mut swapped = bytes.clone();
        swapped[..1000].copy_from_slice(&bytes[1000..2000]);
        swapped[1000..2000].copy_from_slice(&bytes[..1000]);
        assert_ne!(of_slice(&swapped, 1000), of_slice(&bytes, 1000));
        assert_ne!(of_slice(&bytes, 500), of_slice(&bytes, 1000));
    }

    #[test]
    fn json_round_trips_and_damage_is_named() {
        let d = Digests {
            chunk_bytes: 256,
            shards: vec![(
                "model.safetensors".into(),
                ShardDigests {
                    header: 7,
                    tensors: vec![
                        (
                            "a".into(),
                            TensorDigests {
                                original: 1,
                                merged: 1,
                            },
                        ),
                        (
                            "b".into(),
                            TensorDigests {
                                original: 2,
                                merged: u64::MAX,
                            },
                        ),
                    ],
                },
            )],
            sidecar: vec![("model.safetensors".into(), 99, 5)],
        };
        let path = Path::new("manifest.json");
        let back = Digests::from_json(&d.to_json(), path).unwrap();
        assert_eq!(back.tensor_map(), d.tensor_map());
        assert_eq!(back.sidecar, d.sidecar);
        assert_eq!(back.shards[0].1.header, 7);
        let mut v = d.to_json();
        v["shards"]["model.safetensors"]["tensors"]["b"]["merged"] = "xyz".into();
        let err = Digests::from_json(&v, path).unwrap_err().to_string();
        assert!(
            err.contains("digests.shards.model.safetensors.tensors.b.merged"),
            "{err}"
        );
        v["shards"] = 3.into();
        assert!(Digests::from_json(&v, path).is_err());
    }
}
