//! A validated, memory-mapped safetensors reader.
//!
//! Every rule of the format is checked before a single tensor byte is handed out: header length,
//! UTF-8 JSON, entry fields, `end - begin == numel * dtype size` (overflow-checked), and that the
//! entries sorted by offset tile the data buffer exactly up to the end of the file. A corrupt or
//! truncated file is an [`Error`] naming the file and the tensor; it never panics or reads out of
//! bounds.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde_json::{Map, Value};

use crate::{Error, Result};

/// Largest header the format allows (safetensors' own limit).
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// Element types of the safetensors format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    Bool,
    U8,
    I8,
    F8E4M3,
    F8E5M2,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    I64,
    U64,
    F64,
}

impl Dtype {
    pub fn parse(s: &str) -> Option<Dtype> {
        Some(match s {
            "BOOL" => Dtype::Bool,
            "U8" => Dtype::U8,
            "I8" => Dtype::I8,
            "F8_E4M3" => Dtype::F8E4M3,
            "F8_E5M2" => Dtype::F8E5M2,
            "I16" => Dtype::I16,
            "U16" => Dtype::U16,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            "I32" => Dtype::I32,
            "U32" => Dtype::U32,
            "F32" => Dtype::F32,
            "I64" => Dtype::I64,
            "U64" => Dtype::U64,
            "F64" => Dtype::F64,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::Bool => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::F8E5M2 => "F8_E5M2",
            Dtype::I16 => "I16",
            Dtype::U16 => "U16",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I32 => "I32",
            Dtype::U32 => "U32",
            Dtype::F32 => "F32",
            Dtype::I64 => "I64",
            Dtype::U64 => "U64",
            Dtype::F64 => "F64",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::Bool | Dtype::U8 | Dtype::I8 | Dtype::F8E4M3 | Dtype::F8E5M2 => 1,
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::BF16 => 2,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 4,
            Dtype::I64 | Dtype::U64 | Dtype::F64 => 8,
        }
    }
}

/// One tensor entry of a header, with offsets relative to the data buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub begin: usize,
    pub end: usize,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        // Validated at parse time not to overflow.
        self.shape.iter().product()
    }

    pub fn nbytes(&self) -> usize {
        self.end - self.begin
    }
}

/// A parsed, validated header.
#[derive(Clone, Debug)]
pub struct Header {
    /// Tensors sorted by offset (file order of the data).
    pub tensors: Vec<TensorInfo>,
    pub metadata: Option<Map<String, Value>>,
    /// Byte offset of the data buffer in the file (8 + header length).
    pub data_start: usize,
}

/// `numel * dtype size`, or `None` on overflow.
pub fn byte_size(shape: &[usize], dtype: Dtype) -> Option<usize> {
    shape
        .iter()
        .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
}

/// Parses and validates the header of a safetensors file of `file_len` bytes whose first bytes
/// are `prefix` (at least the length word and the header). `path` only names the file in errors.
pub fn parse_header(path: &Path, prefix: &[u8], file_len: u64) -> Result<Header> {
    let bad = |reason: String| Error::invalid_file(path, reason);
    if file_len < 8 || prefix.len() < 8 {
        return Err(bad(format!(
            "truncated: {file_len} bytes, too short for the 8-byte header length"
        )));
    }
    let n = u64::from_le_bytes(prefix[..8].try_into().expect("8 bytes"));
    if n > MAX_HEADER_LEN {
        return Err(bad(format!(
            "header length {n} exceeds the limit of {MAX_HEADER_LEN} bytes"
        )));
    }
    let data_start = 8 + n; // cannot overflow: n <= 1e8
    if data_start > file_len {
        return Err(bad(format!(
            "truncated: header says {n} bytes of JSON but the file has {file_len} bytes"
        )));
    }
    let n = n as usize;
    if prefix.len() < 8 + n {
        return Err(bad("header not fully available".to_string()));
    }
    let text = std::str::from_utf8(&prefix[8..8 + n])
        .map_err(|e| bad(format!("header is not valid UTF-8: {e}")))?;
    let root: Value =
        serde_json::from_str(text).map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
    let Value::Object(root) = root else {
        return Err(bad("header JSON is not an object".to_string()));
    };

    let mut metadata = None;
    let mut tensors = Vec::with_capacity(root.len());
    for (name, entry) in root {
        if name == "__metadata__" {
            let Value::Object(map) = entry else {
                return Err(bad("__metadata__ is not an object".to_string()));
            };
            if let Some((k, _)) = map.iter().find(|(_, v)| !v.is_string()) {
                return Err(bad(format!("__metadata__ value for '{k}' is not a string")));
            }
            metadata = Some(map);
            continue;
        }
        tensors.push(parse_entry(path, name, &entry)?);
    }

    let buffer_len = (file_len - data_start) as usize;
    tensors.sort_by_key(|t| (t.begin, t.end));
    let mut expected = 0usize;
    for t in &tensors {
        if t.begin > expected {
            return Err(bad(format!(
                "tensor '{}': gap in the data buffer (bytes {expected}..{} belong to no tensor)",
                t.name, t.begin
            )));
        }
        if t.begin < expected {
            return Err(bad(format!(
                "tensor '{}': data_offsets [{}, {}] overlap the previous tensor (which ends at {expected})",
                t.name, t.begin, t.end
            )));
        }
        if t.end > buffer_len {
            return Err(bad(format!(
                "tensor '{}': truncated file, data ends at buffer byte {} but the buffer has {buffer_len} bytes",
                t.name, t.end
            )));
        }
        expected = t.end;
    }
    if expected != buffer_len {
        return Err(bad(format!(
            "{} trailing bytes after the last tensor (the data buffer must end where the tensors end)",
            buffer_len - expected
        )));
    }
    Ok(Header {
        tensors,
        metadata,
        data_start: data_start as usize,
    })
}

fn parse_entry(path: &Path, name: String, entry: &Value) -> Result<TensorInfo> {
    let bad = |reason: String| Error::invalid_file(path, format!("tensor '{name}': {reason}"));
    let Value::Object(obj) = entry else {
        return Err(bad("entry is not an object".to_string()));
    };
    let dtype_str = obj
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("missing or non-string 'dtype'".to_string()))?;
    let dtype =
        Dtype::parse(dtype_str).ok_or_else(|| bad(format!("unsupported dtype '{dtype_str}'")))?;
    let shape = obj
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("missing or non-array 'shape'".to_string()))?
        .iter()
        .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
        .collect::<Option<Vec<usize>>>()
        .ok_or_else(|| bad("shape entries must be non-negative integers".to_string()))?;
    let offsets = obj
        .get("data_offsets")
        .and_then(Value::as_array)
        .filter(|a| a.len() == 2)
        .ok_or_else(|| bad("'data_offsets' must be an array of two integers".to_string()))?;
    let off = |v: &Value| v.as_u64().and_then(|x| usize::try_from(x).ok());
    let (begin, end) = match (off(&offsets[0]), off(&offsets[1])) {
        (Some(b), Some(e)) => (b, e),
        _ => {
            return Err(bad(
                "'data_offsets' must be non-negative integers that fit in memory".to_string(),
            ))
        }
    };
    if end < begin {
        return Err(bad(format!(
            "data_offsets [{begin}, {end}] end before they begin"
        )));
    }
    let nbytes = byte_size(&shape, dtype).ok_or_else(|| {
        bad(format!(
            "shape {shape:?} of {dtype_str} overflows the address space"
        ))
    })?;
    if end - begin != nbytes {
        return Err(bad(format!(
            "data_offsets [{begin}, {end}] span {} bytes but shape {shape:?} of {dtype_str} needs {nbytes}",
            end - begin
        )));
    }
    Ok(TensorInfo {
        name,
        dtype,
        shape,
        begin,
        end,
    })
}

/// A safetensors file, memory-mapped and validated.
pub struct SafeTensorsFile {
    path: PathBuf,
    file: File,
    mmap: Mmap,
    header: Header,
    by_name: HashMap<String, usize>,
}

impl SafeTensorsFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        let len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        if len < 8 {
            return Err(Error::invalid_file(
                &path,
                format!("truncated: {len} bytes, too short for the header length"),
            ));
        }
        // SAFETY: the map is read-only; the input files are not ours to modify and we document that
        // they must not change while a merge runs (as every mmap-based safetensors reader does).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let header = parse_header(&path, &mmap, len)?;
        let by_name = header
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(SafeTensorsFile {
            path,
            file,
            mmap,
            header,
            by_name,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The length word and JSON header exactly as stored (8 + N bytes).
    pub fn raw_header(&self) -> &[u8] {
        &self.mmap[..self.header.data_start]
    }

    /// Size of the data buffer.
    pub fn data_len(&self) -> u64 {
        (self.mmap.len() - self.header.data_start) as u64
    }

    /// Tensors in the order of their data in the file.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.header.tensors
    }

    pub fn metadata(&self) -> Option<&Map<String, Value>> {
        self.header.metadata.as_ref()
    }

    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.header.tensors[i])
    }

    /// Like [`get`](Self::get) but a missing tensor is an error naming the file.
    pub fn require(&self, name: &str) -> Result<&TensorInfo> {
        self.get(name)
            .ok_or_else(|| Error::invalid_file(&self.path, format!("no tensor named '{name}'")))
    }

    /// The bytes of a tensor of this file (validated to lie inside the map).
    pub fn data(&self, t: &TensorInfo) -> &[u8] {
        let start = self.header.data_start + t.begin;
        &self.mmap[start..start + t.nbytes()]
    }

    /// The open file and the absolute position of tensor `t`'s bytes in it, for copies the
    /// kernel does without passing the data through this process (copy_file_range).
    pub fn file_range(&self, t: &TensorInfo) -> (&File, u64) {
        (&self.file, (self.header.data_start + t.begin) as u64)
    }

    /// A reader positioned at the first byte of tensor `t` and limited to its bytes, for copies
    /// that the kernel can do without passing the data through this process (copy_file_range).
    pub fn tensor_reader(&self, t: &TensorInfo) -> Result<std::io::Take<File>> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = self
            .file
            .try_clone()
            .map_err(|e| Error::io(&self.path, e))?;
        f.seek(SeekFrom::Start((self.header.data_start + t.begin) as u64))
            .map_err(|e| Error::io(&self.path, e))?;
        Ok(f.take(t.nbytes() as u64))
    }

    /// Reads a tensor of a float dtype into fp32 (small tensors: adapter weights, biases).
    /// The pages read are released afterwards (see [`release`](Self::release)).
    pub fn read_f32(&self, t: &TensorInfo) -> Result<Vec<f32>> {
        let v = crate::checkpoint::to_f32_vec(self.data(t), t.dtype).ok_or_else(|| {
            Error::tensor(
                &t.name,
                format!(
                    "{}: dtype {} is not a float type",
                    self.path.display(),
                    t.dtype.as_str()
                ),
            )
        })?;
        self.release(t, 0, t.nbytes());
        Ok(v)
    }

    /// Tells the kernel that this process is done with `len` bytes of tensor `t` from byte `offset`
    /// of its data, so that the pages leave this process' resident set (they stay in the page
    /// cache). This is what keeps the peak RSS of a streaming merge flat in the model size.
    pub fn release(&self, t: &TensorInfo, offset: usize, len: usize) {
        let start = self.header.data_start + t.begin + offset;
        // Only whole pages strictly inside the range, so that neighbours still in use keep theirs.
        const PAGE: usize = 4096;
        let first = start.div_ceil(PAGE) * PAGE;
        let last = ((start + len) / PAGE) * PAGE;
        #[cfg(unix)]
        if last > first {
            // SAFETY: the mapping is private and read-only; dropping its pages only means they are
            // read again from the file if touched later, which is harmless.
            let _ = unsafe {
                self.mmap.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    first,
                    last - first,
                )
            };
        }
        #[cfg(not(unix))]
        let _ = (first, last);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_bytes(header: &str, data_len: usize) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend(std::iter::repeat_n(7u8, data_len));
        v
    }

    fn parse(bytes: &[u8]) -> Result<Header> {
        parse_header(Path::new("x.safetensors"), bytes, bytes.len() as u64)
    }

    fn err(bytes: &[u8]) -> String {
        parse(bytes).unwrap_err().to_string()
    }

    const TWO: &str = r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]},"a":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,8]}}"#;

    #[test]
    fn valid_file_sorted_by_offset() {
        let h = parse(&file_bytes(TWO, 16)).unwrap();
        assert_eq!(
            h.tensors
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(h.metadata.unwrap()["format"], "pt");
        assert_eq!(h.data_start, 8 + TWO.len());
    }

    #[test]
    fn truncated_data() {
        let mut b = file_bytes(TWO, 16);
        b.truncate(b.len() - 1);
        let e = err(&b);
        assert!(
            e.contains("x.safetensors") && e.contains("'b'") && e.contains("truncated"),
            "{e}"
        );
    }

    #[test]
    fn truncated_header() {
        let b = file_bytes(TWO, 16);
        let e = err(&b[..20]);
        assert!(e.contains("truncated"), "{e}");
        assert!(err(&b[..5]).contains("too short"));
    }

    #[test]
    fn trailing_bytes() {
        assert!(err(&file_bytes(TWO, 17)).contains("1 trailing bytes"));
    }

    #[test]
    fn overlap_and_gap() {
        let h = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#;
        let e = err(&file_bytes(h, 6));
        assert!(e.contains("'b'") && e.contains("overlap"), "{e}");
        let h = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[6,10]}}"#;
        let e = err(&file_bytes(h, 10));
        assert!(e.contains("'b'") && e.contains("gap"), "{e}");
    }

    #[test]
    fn oversize_header() {
        let mut b = (MAX_HEADER_LEN + 1).to_le_bytes().to_vec();
        b.extend_from_slice(b"{}");
        assert!(err(&b).contains("exceeds the limit"));
    }

    #[test]
    fn bad_dtype_and_bad_json() {
        let h = r#"{"a":{"dtype":"Q7","shape":[4],"data_offsets":[0,4]}}"#;
        let e = err(&file_bytes(h, 4));
        assert!(
            e.contains("'a'") && e.contains("unsupported dtype 'Q7'"),
            "{e}"
        );
        assert!(err(&file_bytes(r#"{"a": [1,"#, 0)).contains("not valid JSON"));
        let mut b = file_bytes(r#"{"a":1}"#, 0);
        b[9] = 0xff;
        assert!(err(&b).contains("UTF-8"));
        assert!(err(&file_bytes("[]", 0)).contains("not an object"));
    }

    #[test]
    fn size_mismatch_and_overflow() {
        let h = r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#;
        assert!(err(&file_bytes(h, 8)).contains("needs 12"));
        let h = r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#;
        assert!(err(&file_bytes(h, 8)).contains("overflows"));
        let h = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[18446744073709551615,3]}}"#;
        assert!(err(&file_bytes(h, 3)).contains("end before they begin"));
        let h = r#"{"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,0]}}"#;
        assert!(err(&file_bytes(h, 0)).contains("non-negative"));
        // An end offset near u64::MAX must not wrap when compared with the buffer.
        let h = r#"{"a":{"dtype":"U8","shape":[18446744073709551615],"data_offsets":[0,18446744073709551615]}}"#;
        assert!(err(&file_bytes(h, 4)).contains("truncated"));
    }

    #[test]
    fn bad_metadata() {
        let h = r#"{"__metadata__":{"format":1}}"#;
        assert!(err(&file_bytes(h, 0)).contains("not a string"));
    }

    #[test]
    fn open_real_file_and_release() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        std::fs::write(&p, file_bytes(TWO, 16)).unwrap();
        let f = SafeTensorsFile::open(&p).unwrap();
        let a = f.require("a").unwrap();
        assert_eq!(f.data(a), &[7u8; 8]);
        f.release(a, 0, 8);
        assert!(f
            .require("zz")
            .unwrap_err()
            .to_string()
            .contains("no tensor named 'zz'"));
        assert!(matches!(
            SafeTensorsFile::open(dir.path().join("none")),
            Err(Error::Io { .. })
        ));
    }
}
