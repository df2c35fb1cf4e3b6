//! One shard of the output: its tensors copied, replaced or merged in order into a streaming
//! writer, and the exact-unmerge sidecar entries spilled beside it.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;

use rayon::prelude::*;

use super::kernel::{self, prepare, Fixups, Prepared, Scratch};
use super::plan::{MergePlan, Op};
use super::{
    shard_name, Mode, Progress, Report, CHUNK_BYTES, ROW_BLOCK, SIDECAR_DIR, SUFFIX_DORA,
    SUFFIX_INDEX, SUFFIX_ORIGINAL, SUFFIX_VALUE,
};
use crate::checkpoint::{
    Dtype, FloatType, SafeTensorsFile, StreamingWriter, TensorInfo, TensorSpec,
};
use crate::{Error, Result};

pub(super) struct ShardJob<'a> {
    pub(super) shard: &'a SafeTensorsFile,
    pub(super) plan: &'a MergePlan,
    pub(super) mode: &'a Mode,
    pub(super) sidecar: Option<&'a SafeTensorsFile>,
    pub(super) out: PathBuf,
    pub(super) progress: Progress<'a>,
}

/// Sidecar entries of one shard, spilled to disk while the shard is written.
struct SidecarSpill {
    dir: PathBuf,
    name: String,
    file: File,
    path: PathBuf,
    /// (spec, source): source is a byte range of the spill file or a base tensor to copy.
    entries: Vec<(TensorSpec, SpillSource)>,
    spilled: u64,
}

enum SpillSource {
    Spill(u64, u64),
    Base(String),
}

impl SidecarSpill {
    fn new(dir: PathBuf, name: String) -> Result<Self> {
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
            entries: Vec::new(),
            spilled: 0,
        })
    }

    fn spill(&mut self, spec: TensorSpec, bytes: &[u8]) -> Result<()> {
        self.file
            .write_all(bytes)
            .map_err(|e| Error::io(&self.path, e))?;
        self.entries
            .push((spec, SpillSource::Spill(self.spilled, bytes.len() as u64)));
        self.spilled += bytes.len() as u64;
        Ok(())
    }

    /// Writes the sidecar shard (header first) and removes the spill; returns its size.
    fn finish(mut self, base: &SafeTensorsFile) -> Result<u64> {
        let specs: Vec<TensorSpec> = self.entries.iter().map(|e| e.0.clone()).collect();
        let mut meta = serde_json::Map::new();
        meta.insert("format".into(), "oxpeft-exact-unmerge".into());
        let out = self.dir.join(&self.name);
        let mut w = StreamingWriter::create(&out, Some(&meta), &specs)?;
        let mut buf = vec![0u8; CHUNK_BYTES];
        for (_, src) in &self.entries {
            match src {
                SpillSource::Spill(start, len) => {
                    self.file
                        .seek(SeekFrom::Start(*start))
                        .map_err(|e| Error::io(&self.path, e))?;
                    let mut left = *len as usize;
                    while left > 0 {
                        let n = left.min(buf.len());
                        self.file
                            .read_exact(&mut buf[..n])
                            .map_err(|e| Error::io(&self.path, e))?;
                        w.write(&buf[..n])?;
                        left -= n;
                    }
                }
                SpillSource::Base(name) => copy_tensor(base, base.require(name)?, &mut w)?,
            }
        }
        w.finish()?;
        std::fs::remove_file(&self.path).map_err(|e| Error::io(&self.path, e))?;
        Ok(std::fs::metadata(&out)
            .map_err(|e| Error::io(&out, e))?
            .len())
    }
}

impl Drop for SidecarSpill {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Copies a tensor unchanged from its file into the writer (in the kernel, without mapping it).
fn copy_tensor(src: &SafeTensorsFile, t: &TensorInfo, w: &mut StreamingWriter) -> Result<()> {
    let before = w.written();
    w.copy_from(&mut src.tensor_reader(t)?)?;
    if w.written() - before != t.nbytes() as u64 {
        return Err(Error::invalid_file(
            src.path(),
            format!("tensor '{}': file shrank while being read", t.name),
        ));
    }
    Ok(())
}

impl ShardJob<'_> {
    pub(super) fn run(self) -> Result<Report> {
        // Same layout as the base shard, so its header is reused byte for byte.
        let mut writer = StreamingWriter::create_with_header(
            &self.out,
            self.shard.raw_header(),
            self.shard.data_len(),
        )?;
        let mut spill = match self.mode {
            Mode::Merge {
                exact_unmerge: true,
            } if self
                .shard
                .tensors()
                .iter()
                .any(|t| self.plan.ops.contains_key(&t.name)) =>
            {
                let dir = self.out.parent().expect("inside out").join(SIDECAR_DIR);
                Some(SidecarSpill::new(dir, shard_name(self.shard))?)
            }
            _ => None,
        };
        let mut report = Report::default();
        let mut buf = Vec::new();
        for t in self.shard.tensors() {
            match self.plan.ops.get(&t.name) {
                None => copy_tensor(self.shard, t, &mut writer)?,
                Some(Op::Replace { adapter, key }) => {
                    let f = &self.plan.adapters[*adapter].file;
                    self.replace(t, f, f.require(key)?, &mut writer, &mut report)?;
                    if let Some(s) = spill.as_mut() {
                        s.entries.push((
                            TensorSpec {
                                name: format!("{}{SUFFIX_ORIGINAL}", t.name),
                                dtype: t.dtype,
                                shape: t.shape.clone(),
                            },
                            SpillSource::Base(t.name.clone()),
                        ));
                    }
                }
                Some(Op::Add(terms)) => {
                    let p = prepare(self.plan, t, terms)?;
                    self.add(t, &p, &mut buf, &mut writer, spill.as_mut(), &mut report)?;
                }
            }
            report.tensors += 1;
            report.bytes += t.nbytes() as u64;
            if !(self.progress)(&t.name, t.nbytes() as u64) {
                return Err(Error::invalid_argument("cancelled"));
            }
        }
        writer.finish()?;
        if let Some(s) = spill {
            report.sidecar_bytes += s.finish(self.shard)?;
        }
        Ok(report)
    }

    fn replace(
        &self,
        t: &TensorInfo,
        f: &SafeTensorsFile,
        src: &TensorInfo,
        w: &mut StreamingWriter,
        report: &mut Report,
    ) -> Result<()> {
        report.tensors_changed += 1;
        report.elements_changed += t.numel() as u64;
        if let Mode::Unmerge { .. } = self.mode {
            let sc = self.sidecar.expect("checked before writing");
            report.sidecar_elements += t.numel() as u64;
            return copy_tensor(sc, sc.require(&format!("{}{SUFFIX_ORIGINAL}", t.name))?, w);
        }
        if src.dtype == t.dtype {
            return w.write(f.data(src));
        }
        let (from, to) = (
            FloatType::of(src.dtype).expect("planned"),
            FloatType::of(t.dtype).expect("planned"),
        );
        let data = f.data(src);
        let mut out = vec![0u8; t.nbytes()];
        for i in 0..t.numel() {
            to.store_bits(&mut out, i, to.round_bits(from.load(data, i)));
        }
        w.write(&out)
    }

    fn add(
        &self,
        t: &TensorInfo,
        p: &Prepared,
        buf: &mut Vec<u8>,
        w: &mut StreamingWriter,
        spill: Option<&mut SidecarSpill>,
        report: &mut Report,
    ) -> Result<()> {
        report.tensors_changed += 1;
        report.elements_changed += t.numel() as u64;
        let row_bytes = p.cols * p.ft.size();
        let block_bytes = ROW_BLOCK * row_bytes;
        let chunk_rows = (CHUNK_BYTES / block_bytes.max(1)).max(1) * ROW_BLOCK;
        let n_dora = p.terms.iter().filter(|t| t.magnitude.is_some()).count();
        let unmerge = matches!(self.mode, Mode::Unmerge { .. });
        let record = matches!(
            self.mode,
            Mode::Merge {
                exact_unmerge: true
            }
        );

        // Unmerge inputs from the sidecar: DoRA factors and the sorted fix-up list.
        let mut dora_factors: Vec<f32> = Vec::new();
        let mut fix_index: Option<(&[u8], Dtype)> = None;
        let mut fix_value: &[u8] = &[];
        if let (true, Some(sc)) = (unmerge, self.sidecar) {
            if n_dora > 0 {
                let tf = sc.require(&format!("{}{SUFFIX_DORA}", t.name))?;
                if tf.shape != [n_dora, p.rows] {
                    return Err(Error::tensor(
                        &tf.name,
                        format!(
                            "sidecar shape {:?}, expected {:?}",
                            tf.shape,
                            [n_dora, p.rows]
                        ),
                    ));
                }
                dora_factors = sc.read_f32(tf)?;
            }
            if let (Some(ti), Some(tv)) = (
                sc.get(&format!("{}{SUFFIX_INDEX}", t.name)),
                sc.get(&format!("{}{SUFFIX_VALUE}", t.name)),
            ) {
                if ti.shape.len() != 1
                    || tv.shape != ti.shape
                    || tv.dtype != t.dtype
                    || !matches!(ti.dtype, Dtype::U32 | Dtype::I64)
                {
                    return Err(Error::tensor(
                        &ti.name,
                        "sidecar index/value tensors do not match the merged tensor",
                    ));
                }
                fix_index = Some((sc.data(ti), ti.dtype));
                fix_value = sc.data(tv);
            }
        }
        let mut fix_cursor = 0usize;
        let wide_index = t.numel() > u32::MAX as usize;
        let mut spilled_idx: Vec<u8> = Vec::new();
        let mut spilled_val: Vec<u8> = Vec::new();
        let mut n_fix = 0u64;
        let mut factors_out = vec![0f32; if record { n_dora * p.rows } else { 0 }];

        let data = self.shard.data(t);
        for row0 in (0..p.rows).step_by(chunk_rows) {
            let nrows = chunk_rows.min(p.rows - row0);
            let src = &data[row0 * row_bytes..(row0 + nrows) * row_bytes];
            buf.resize(nrows * row_bytes, 0);
            let results: Vec<Fixups> = buf
                .par_chunks_mut(block_bytes)
                .zip(src.par_chunks(block_bytes))
                .enumerate()
                .map_init(
                    || Scratch::new(p),
                    |scratch, (bi, (out, inp))| {
                        let first_row = row0 + bi * ROW_BLOCK;
                        let mut fix = Fixups::default();
                        if unmerge {
                            kernel::unmerge_block(p, first_row, inp, out, &dora_factors, scratch);
                        } else {
                            kernel::merge_block(p, first_row, inp, out, record, scratch, &mut fix);
                        }
                        fix
                    },
                )
                .collect();
            if unmerge {
                if let Some((idx, dt)) = fix_index {
                    let (e0, e1) = ((row0 * p.cols) as u64, ((row0 + nrows) * p.cols) as u64);
                    let n = fix_value.len() / p.ft.size();
                    while fix_cursor < n {
                        let e = match dt {
                            Dtype::U32 => u32::from_le_bytes(
                                idx[4 * fix_cursor..4 * fix_cursor + 4].try_into().unwrap(),
                            ) as u64,
                            _ => u64::from_le_bytes(
                                idx[8 * fix_cursor..8 * fix_cursor + 8].try_into().unwrap(),
                            ),
                        };
                        if e >= e1 {
                            break;
                        }
                        if e < e0 {
                            return Err(Error::tensor(&t.name, "sidecar indices are not sorted"));
                        }
                        let bits = p.ft.load_bits(fix_value, fix_cursor);
                        p.ft.store_bits(buf, (e - e0) as usize, bits);
                        fix_cursor += 1;
                        n_fix += 1;
                    }
                }
            }
            for (bi, fix) in results.iter().enumerate() {
                for (&i, &b) in fix.index.iter().zip(&fix.bits) {
                    if wide_index {
                        spilled_idx.extend_from_slice(&i.to_le_bytes());
                    } else {
                        spilled_idx.extend_from_slice(&(i as u32).to_le_bytes());
                    }
                    let at = spilled_val.len();
                    spilled_val.resize(at + p.ft.size(), 0);
                    p.ft.store_bits(&mut spilled_val[at..], 0, b);
                }
                n_fix += fix.index.len() as u64;
                if record {
                    let block_rows = ROW_BLOCK.min(nrows - bi * ROW_BLOCK);
                    for (d, f) in fix.dora.chunks(block_rows).enumerate() {
                        let at = d * p.rows + row0 + bi * ROW_BLOCK;
                        factors_out[at..at + f.len()].copy_from_slice(f);
                    }
                }
            }
            w.write(buf)?;
            self.shard.release(t, row0 * row_bytes, nrows * row_bytes);
        }
        if unmerge && fix_cursor != fix_value.len() / p.ft.size() {
            return Err(Error::tensor(
                &t.name,
                "sidecar holds indices outside the tensor",
            ));
        }
        if let (true, Some(sc)) = (unmerge, self.sidecar) {
            for suffix in [SUFFIX_INDEX, SUFFIX_VALUE] {
                if let Some(st) = sc.get(&format!("{}{suffix}", t.name)) {
                    sc.release(st, 0, st.nbytes());
                }
            }
        }
        report.sidecar_elements += n_fix;
        if let Some(s) = spill {
            if n_fix > 0 {
                let idx_dtype = if wide_index { Dtype::I64 } else { Dtype::U32 };
                s.spill(
                    TensorSpec {
                        name: format!("{}{SUFFIX_INDEX}", t.name),
                        dtype: idx_dtype,
                        shape: vec![n_fix as usize],
                    },
                    &spilled_idx,
                )?;
                s.spill(
                    TensorSpec {
                        name: format!("{}{SUFFIX_VALUE}", t.name),
                        dtype: t.dtype,
                        shape: vec![n_fix as usize],
                    },
                    &spilled_val,
                )?;
            }
            if n_dora > 0 {
                let bytes: Vec<u8> = factors_out.iter().flat_map(|x| x.to_le_bytes()).collect();
                s.spill(
                    TensorSpec {
                        name: format!("{}{SUFFIX_DORA}", t.name),
                        dtype: Dtype::F32,
                        shape: vec![n_dora, p.rows],
                    },
                    &bytes,
                )?;
            }
        }
        Ok(())
    }
}
