//! A streaming safetensors writer: the header is written first, from the sizes known up front,
//! then each tensor's bytes as they are produced, in any number of pieces. The file is built under
//! a temporary name in the same folder and renamed into place only after an fsync, so a reader
//! never sees a partial file; dropping an unfinished writer removes the temporary file.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

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

pub struct StreamingWriter {
    path: PathBuf,
    tmp: PathBuf,
    file: Option<File>,
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
        let path = path.as_ref().to_path_buf();
        let file_name = path.file_name().ok_or_else(|| {
            Error::invalid_argument(format!("{}: not a file path", path.display()))
        })?;
        let tmp = path.with_file_name(format!(".{}.partial", file_name.to_string_lossy()));
        let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut w = StreamingWriter {
            path,
            tmp,
            file: Some(file),
            expected,
            written: 0,
        };
        let file = w.file.as_mut().expect("just opened");
        file.write_all(header).map_err(|e| Error::io(&w.tmp, e))?;
        Ok(w)
    }

    /// Appends tensor bytes (any split of the data stream).
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let after = self.written + bytes.len() as u64;
        if after > self.expected {
            return Err(Error::invalid_file(
                &self.path,
                format!(
                    "{after} data bytes written, header declares {}",
                    self.expected
                ),
            ));
        }
        let file = self.file.as_mut().expect("open until finish");
        file.write_all(bytes).map_err(|e| Error::io(&self.tmp, e))?;
        self.written = after;
        Ok(())
    }

    /// Data bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Appends everything `reader` yields (File to File copies stay inside the kernel on Linux).
    pub fn copy_from<R: std::io::Read>(&mut self, reader: &mut R) -> Result<()> {
        let file = self.file.as_mut().expect("open until finish");
        let n = std::io::copy(reader, file).map_err(|e| Error::io(&self.tmp, e))?;
        self.written += n;
        if self.written > self.expected {
            return Err(Error::invalid_file(
                &self.path,
                format!(
                    "{} data bytes written, header declares {}",
                    self.written, self.expected
                ),
            ));
        }
        Ok(())
    }

    /// Checks that every declared byte was written, fsyncs and renames into place.
    pub fn finish(mut self) -> Result<()> {
        if self.written != self.expected {
            return Err(Error::invalid_file(
                &self.path,
                format!(
                    "only {} of {} data bytes were written",
                    self.written, self.expected
                ),
            ));
        }
        let file = self.file.take().expect("open until finish");
        file.sync_all().map_err(|e| Error::io(&self.tmp, e))?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path).map_err(|e| Error::io(&self.path, e))?;
        Ok(())
    }
}

impl Drop for StreamingWriter {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
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
}
