//! A checkpoint folder: one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json` (`{"metadata": {...}, "weight_map": {tensor: shard file}}`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::reader::{SafeTensorsFile, TensorInfo};
use crate::{Error, Result};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<SafeTensorsFile>,
    /// Tensor name -> shard number.
    locate: HashMap<String, usize>,
}

impl Checkpoint {
    /// Opens and validates every shard of the checkpoint in `dir`, and checks that the index and
    /// the shards agree on which tensor lives where.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let index_path = dir.join(INDEX_FILE);
        let (shard_names, weight_map) = if index_path.is_file() {
            let (names, map) = read_index(&index_path)?;
            (names, Some(map))
        } else if dir.join(SINGLE_FILE).is_file() {
            (vec![SINGLE_FILE.to_string()], None)
        } else if !dir.is_dir() {
            return Err(Error::io(
                &dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such checkpoint folder"),
            ));
        } else {
            return Err(Error::invalid_file(
                &dir,
                format!("contains neither {SINGLE_FILE} nor {INDEX_FILE}"),
            ));
        };
        let shards = shard_names
            .iter()
            .map(|n| SafeTensorsFile::open(dir.join(n)))
            .collect::<Result<Vec<_>>>()?;
        let mut locate = HashMap::new();
        for (i, shard) in shards.iter().enumerate() {
            for t in shard.tensors() {
                if locate.insert(t.name.clone(), i).is_some() {
                    return Err(Error::invalid_file(
                        shard.path(),
                        format!("tensor '{}' is also in another shard", t.name),
                    ));
                }
            }
        }
        if let Some(map) = weight_map {
            for (name, file) in &map {
                let i = shard_names
                    .iter()
                    .position(|s| s == file)
                    .expect("names come from the map");
                if locate.get(name) != Some(&i) {
                    return Err(Error::invalid_file(
                        &index_path,
                        format!("tensor '{name}' is listed in {file} but is not there"),
                    ));
                }
            }
            if let Some(name) = locate.keys().find(|n| !map.contains_key(*n)) {
                return Err(Error::invalid_file(
                    &index_path,
                    format!("tensor '{name}' of a shard is missing from weight_map"),
                ));
            }
        }
        Ok(Checkpoint {
            dir,
            shards,
            locate,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn shards(&self) -> &[SafeTensorsFile] {
        &self.shards
    }

    /// The shard holding `name` and its entry.
    pub fn get(&self, name: &str) -> Option<(&SafeTensorsFile, &TensorInfo)> {
        let shard = &self.shards[*self.locate.get(name)?];
        Some((shard, shard.get(name).expect("located")))
    }

    pub fn total_bytes(&self) -> u64 {
        self.shards
            .iter()
            .flat_map(|s| s.tensors())
            .map(|t| t.nbytes() as u64)
            .sum()
    }

    pub fn num_tensors(&self) -> usize {
        self.locate.len()
    }
}

/// Reads an index: the distinct shard file names (sorted) and the tensor -> file map.
fn read_index(path: &Path) -> Result<(Vec<String>, HashMap<String, String>)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let root: Value = serde_json::from_str(&text)
        .map_err(|e| Error::invalid_file(path, format!("not valid JSON: {e}")))?;
    let map = root
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::invalid_file(path, "missing 'weight_map' object"))?;
    let mut weight_map = HashMap::with_capacity(map.len());
    let mut names: Vec<String> = Vec::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| {
            Error::invalid_file(
                path,
                format!("weight_map entry for '{tensor}' is not a string"),
            )
        })?;
        // Shards must be plain names inside the folder: an index must not point elsewhere.
        if file.is_empty()
            || file.contains('/')
            || file.contains('\\')
            || file == "."
            || file == ".."
        {
            return Err(Error::invalid_file(
                path,
                format!(
                    "weight_map entry for '{tensor}' names '{file}', not a file of this folder"
                ),
            ));
        }
        if !names.iter().any(|n| n == file) {
            names.push(file.to_string());
        }
        weight_map.insert(tensor.clone(), file.to_string());
    }
    names.sort();
    Ok((names, weight_map))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::reader::Dtype;
    use crate::checkpoint::writer::{StreamingWriter, TensorSpec};

    fn shard(dir: &Path, name: &str, tensors: &[&str]) {
        let specs: Vec<_> = tensors
            .iter()
            .map(|t| TensorSpec {
                name: t.to_string(),
                dtype: Dtype::U8,
                shape: vec![2],
            })
            .collect();
        let mut w = StreamingWriter::create(dir.join(name), None, &specs).unwrap();
        w.write(&vec![1u8; 2 * tensors.len()]).unwrap();
        w.finish().unwrap();
    }

    #[test]
    fn sharded_checkpoint() {
        let d = tempfile::tempdir().unwrap();
        shard(d.path(), "a.safetensors", &["x", "y"]);
        shard(d.path(), "b.safetensors", &["z"]);
        let idx = r#"{"metadata":{"total_size":6},"weight_map":{"x":"a.safetensors","y":"a.safetensors","z":"b.safetensors"}}"#;
        std::fs::write(d.path().join(INDEX_FILE), idx).unwrap();
        let c = Checkpoint::open(d.path()).unwrap();
        assert_eq!(c.shards().len(), 2);
        assert_eq!(c.get("z").unwrap().0.path(), d.path().join("b.safetensors"));
        assert_eq!(c.total_bytes(), 6);

        let idx = r#"{"weight_map":{"x":"a.safetensors","y":"b.safetensors","z":"b.safetensors"}}"#;
        std::fs::write(d.path().join(INDEX_FILE), idx).unwrap();
        assert!(Checkpoint::open(d.path())
            .err()
            .unwrap()
            .to_string()
            .contains("'y' is listed in b.safetensors"));
        let idx = r#"{"weight_map":{"x":"../a.safetensors"}}"#;
        std::fs::write(d.path().join(INDEX_FILE), idx).unwrap();
        assert!(Checkpoint::open(d.path())
            .err()
            .unwrap()
            .to_string()
            .contains("not a file of this folder"));
        let idx = r#"{"weight_map":{"x":"a.safetensors","y":"a.safetensors"}}"#;
        std::fs::write(d.path().join(INDEX_FILE), idx).unwrap();
        assert!(Checkpoint::open(d.path()).is_ok());
    }

    #[test]
    fn missing_checkpoint() {
        let d = tempfile::tempdir().unwrap();
        assert!(Checkpoint::open(d.path())
            .err()
            .unwrap()
            .to_string()
            .contains("neither"));
        assert!(matches!(
            Checkpoint::open(d.path().join("nope")),
            Err(Error::Io { .. })
        ));
    }
}
