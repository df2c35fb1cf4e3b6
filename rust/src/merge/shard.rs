//! One output shard: a positional writer that the shard's tensors go to from any thread, each
//! tensor copied, replaced or merged in row chunks that run in parallel, plus the shard's
//! exact-unmerge sidecar.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use rayon::prelude::*;

use super::digest::{self, TensorDigests};
use super::fixlist::{self, FixList};
use super::kernel::{self, prepare, Fixups, Prepared, Scratch};
use super::plan::{view2, MergePlan, Op};
use super::release::ChunkRelease;
use super::sidecar::SidecarSpill;
use super::{
    shard_name, Mode, Report, CHUNK_BYTES, ROW_BLOCK, SIDECAR_DIR, SUFFIX_DORA, SUFFIX_FIXES,
    SUFFIX_INDEX, SUFFIX_ORIGINAL, SUFFIX_SEEK, SUFFIX_VALUE,
};
use crate::checkpoint::{
    Dtype, FloatType, PositionalWriter, SafeTensorsFile, TensorInfo, TensorSpec,
};
use crate::{Error, Result};

/// Sidecar entry kinds, in their order within a tensor's entries.
const ORDER_ORIGINAL: u8 = 0;
const ORDER_FIXES: u8 = 1;
const ORDER_SEEK: u8 = 2;
const ORDER_DORA: u8 = 3;

/// What every tensor task needs: the plan, the mode and, for a checked unmerge, the digests
/// each tensor must have.
pub(super) struct Context<'a> {
    pub(super) plan: &'a MergePlan,
    pub(super) mode: &'a Mode,
    pub(super) expect: Option<HashMap<&'a str, TensorDigests>>,
}

impl Context<'_> {
    pub(super) fn unmerging(&self) -> bool {
        matches!(self.mode, Mode::Unmerge { .. })
    }

    pub(super) fn recording(&self) -> bool {
        matches!(
            self.mode,
            Mode::Merge {
                exact_unmerge: true,
                ..
            }
        )
    }

    /// Whether the tasks compute digests: to record them, or to check them.
    fn hashing(&self) -> bool {
        self.recording() || self.expect.is_some()
    }

    fn checks_finite(&self) -> bool {
        matches!(
            self.mode,
            Mode::Merge {
                allow_nonfinite: false,
                ..
            }
        )
    }

    /// A checked unmerge: `got` must be the digests the merge recorded for tensor `name`.
    fn check(&self, name: &str, got: TensorDigests) -> Result<()> {
        let Some(expect) = &self.expect else {
            return Ok(());
        };
        let want = expect.get(name).ok_or_else(|| {
            Error::tensor(name, "is not in the sidecar's manifest: this is not the merged checkpoint it was written for")
        })?;
        if got.merged != want.merged {
            return Err(Error::tensor(
                name,
                format!(
                    "its bytes in the merged checkpoint differ from those the merge wrote (digest {}, recorded {}): \
                     the merged checkpoint was changed after the merge",
                    digest::hex(got.merged),
                    digest::hex(want.merged)
                ),
            ));
        }
        if got.original != want.original {
            return Err(Error::tensor(
                name,
                format!(
                    "unmerging gives bytes that differ from the original base (digest {}, recorded {}): the \
                     sidecar, the manifest or the adapters do not restore this tensor",
                    digest::hex(got.original),
                    digest::hex(want.original)
                ),
            ));
        }
        Ok(())
    }
}

/// Rows per work chunk of a matrix with `row_bytes`-byte rows: about CHUNK_BYTES, in whole
/// blocks of ROW_BLOCK rows.
fn chunk_rows(row_bytes: usize) -> usize {
    (CHUNK_BYTES / (ROW_BLOCK * row_bytes).max(1)).max(1) * ROW_BLOCK
}

/// Bytes per work chunk of `t`, the unit of the parallel work and of the digests: whole rows of
/// a matrix or of a kernel's 2-D view (as the merge kernel takes them), or a whole vector
/// (merged in one piece).
pub(super) fn chunk_bytes(t: &TensorInfo) -> usize {
    let len = match t.shape.len() {
        0 | 1 => t.nbytes(),
        _ => {
            let row = view2(&t.shape)[1] * t.dtype.size();
            chunk_rows(row) * row
        }
    };
    len.max(1)
}

pub(super) struct ShardOut<'a> {
    shard: &'a SafeTensorsFile,
    /// Unmerge: this shard's part of the merged checkpoint's sidecar.
    sidecar: Option<&'a SafeTensorsFile>,
    writer: PositionalWriter,
    spill: Option<SidecarSpill>,
}

impl<'a> ShardOut<'a> {
    /// Starts `out/<shard name>` with the base shard's header (same layout, so the header is
    /// reused byte for byte).
    pub(super) fn create(
        cx: &Context,
        shard: &'a SafeTensorsFile,
        sidecar: Option<&'a SafeTensorsFile>,
        out: &Path,
    ) -> Result<Self> {
        let name = shard_name(shard);
        let writer = PositionalWriter::create_with_header(
            out.join(&name),
            shard.raw_header(),
            shard.data_len(),
        )?;
        let spill = if cx.recording()
            && shard
                .tensors()
                .iter()
                .any(|t| cx.plan.ops.contains_key(&t.name))
        {
            Some(SidecarSpill::new(out.join(SIDECAR_DIR), name)?)
        } else {
            None
        };
        Ok(ShardOut {
            shard,
            sidecar,
            writer,
            spill,
        })
    }

    /// Writes tensor number `pos` of the shard; the caller runs tensors in parallel. Returns the
    /// tensor's digests when the context asks for them (zero otherwise), after checking them in a
    /// checked unmerge.
    pub(super) fn tensor(&self, cx: &Context, pos: usize) -> Result<(Report, TensorDigests)> {
        let t = &self.shard.tensors()[pos];
        let mut report = Report {
            tensors: 1,
            bytes: t.nbytes() as u64,
            ..Report::default()
        };
        let original = self
            .sidecar
            .filter(|_| cx.unmerging())
            .and_then(|sc| Some((sc, sc.get(&format!("{}{SUFFIX_ORIGINAL}", t.name))?)));
        let digests = match cx.plan.ops.get(&t.name) {
            None => {
                let d = self.copy(t, cx.hashing())?;
                TensorDigests {
                    original: d,
                    merged: d,
                }
            }
            Some(Op::Replace { adapter, key }) => {
                let f = &cx.plan.adapters[*adapter].file;
                let d = self.replace(cx, t, f, f.require(key)?, &mut report)?;
                self.keep_original(pos, t);
                d
            }
            Some(Op::Add(_)) if original.is_some() => {
                // The sidecar kept the whole original (its fix-up list would have been larger).
                let (sc, st) = original.expect("just matched");
                if st.shape != t.shape || st.dtype != t.dtype {
                    return Err(Error::tensor(
                        &st.name,
                        "sidecar original does not match the merged tensor's shape and dtype",
                    ));
                }
                report.tensors_changed += 1;
                report.elements_changed += t.numel() as u64;
                report.sidecar_elements += t.numel() as u64;
                self.copy_whole(sc, st, t)?;
                self.restored_whole(cx, sc, st, t)
            }
            Some(Op::Add(terms)) => {
                let mut p = prepare(cx.plan, t, terms)?;
                self.add(cx, pos, t, &mut p, &mut report)?
            }
        };
        cx.check(&t.name, digests)?;
        Ok((report, digests))
    }

    /// The digests of a tensor that an unmerge restores by copying its original from the sidecar
    /// (`st`): that original's, and the merged tensor's as the input holds it.
    fn restored_whole(
        &self,
        cx: &Context,
        sc: &SafeTensorsFile,
        st: &TensorInfo,
        t: &TensorInfo,
    ) -> TensorDigests {
        if !cx.hashing() {
            return TensorDigests {
                original: 0,
                merged: 0,
            };
        }
        TensorDigests {
            original: digest::of_slice(sc.data(st), chunk_bytes(t)),
            merged: self.digest_of_input(t),
        }
    }

    /// The digest of tensor `t` of the input shard, whose pages are given back afterwards.
    fn digest_of_input(&self, t: &TensorInfo) -> u64 {
        let d = digest::of_slice(self.shard.data(t), chunk_bytes(t));
        self.shard.release(t, 0, t.nbytes());
        d
    }

    /// Records in the sidecar that tensor `pos` is restored by copying its original.
    fn keep_original(&self, pos: usize, t: &TensorInfo) {
        if let Some(s) = &self.spill {
            s.keep_base(
                (pos, ORDER_ORIGINAL),
                TensorSpec {
                    name: format!("{}{SUFFIX_ORIGINAL}", t.name),
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                },
                &t.name,
            );
        }
    }

    /// Fsyncs and renames the shard into place and, at the same time on another thread, writes
    /// its sidecar; returns the sidecar file's name, size and digest. Both mostly wait for the
    /// disk, so the shards' finishes run on threads of their own rather than on the (busy or
    /// CPU-sized) pool.
    pub(super) fn finish(self) -> Result<Option<(String, u64, u64)>> {
        let ShardOut {
            shard,
            writer,
            spill,
            ..
        } = self;
        std::thread::scope(|s| {
            let sidecar = spill.map(|sp| s.spawn(move || sp.finish(shard)));
            writer.finish()?;
            sidecar
                .map(|h| h.join().expect("the sidecar writer does not panic"))
                .transpose()
        })
    }

    /// Copies an unchanged tensor: each piece is written straight from the base's mapping and
    /// then released. Measured against `copy_file_range` (which on ext4 without reflinks splices
    /// page by page): about 0.04 CPU-s less per GiB copied.
    /// Returns the tensor's digest when `hash` (0 otherwise), each chunk hashed as it is copied.
    fn copy(&self, t: &TensorInfo, hash: bool) -> Result<u64> {
        let data = self.shard.data(t);
        let piece = chunk_bytes(t);
        let pieces = data.len().div_ceil(piece);
        let release = ChunkRelease::new(self.shard, t, piece);
        let hashes = (0..pieces)
            .into_par_iter()
            .map(|i| {
                let (from, to) = (i * piece, ((i + 1) * piece).min(data.len()));
                let h = if hash {
                    digest::chunk(i, &data[from..to])
                } else {
                    0
                };
                self.writer
                    .write_at((t.begin + from) as u64, &data[from..to])?;
                release.complete(i);
                Ok(h)
            })
            .collect::<Result<Vec<u64>>>()?;
        Ok(if hash {
            digest::combine(data.len() as u64, &hashes)
        } else {
            0
        })
    }

    fn copy_whole(&self, src: &SafeTensorsFile, st: &TensorInfo, t: &TensorInfo) -> Result<()> {
        let (file, at) = src.file_range(st);
        self.writer
            .copy_at(t.begin as u64, file, at, st.nbytes() as u64)
    }

    fn replace(
        &self,
        cx: &Context,
        t: &TensorInfo,
        f: &SafeTensorsFile,
        src: &TensorInfo,
        report: &mut Report,
    ) -> Result<TensorDigests> {
        report.tensors_changed += 1;
        report.elements_changed += t.numel() as u64;
        if cx.unmerging() {
            let sc = self.sidecar.expect("checked before writing");
            report.sidecar_elements += t.numel() as u64;
            let st = sc.require(&format!("{}{SUFFIX_ORIGINAL}", t.name))?;
            self.copy_whole(sc, st, t)?;
            return Ok(self.restored_whole(cx, sc, st, t));
        }
        let hash = cx.hashing();
        let digest_of = |bytes: &[u8]| {
            if hash {
                digest::of_slice(bytes, chunk_bytes(t))
            } else {
                0
            }
        };
        let original = if hash { self.digest_of_input(t) } else { 0 };
        if src.dtype == t.dtype {
            self.copy_whole(f, src, t)?;
            let merged = digest_of(f.data(src));
            return Ok(TensorDigests { original, merged });
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
        self.writer.write_at(t.begin as u64, &out)?;
        Ok(TensorDigests {
            original,
            merged: digest_of(&out),
        })
    }

    fn add(
        &self,
        cx: &Context,
        pos: usize,
        t: &TensorInfo,
        p: &mut Prepared,
        report: &mut Report,
    ) -> Result<TensorDigests> {
        report.tensors_changed += 1;
        report.elements_changed += t.numel() as u64;
        let row_bytes = p.cols * p.ft.size();
        let chunk_rows = chunk_rows(row_bytes);
        debug_assert_eq!(
            (chunk_rows.min(p.rows) * row_bytes).max(1),
            chunk_bytes(t).min(t.nbytes().max(1))
        );
        let n_chunks = p.rows.div_ceil(chunk_rows);
        let (hash, check_finite) = (cx.hashing(), cx.checks_finite());
        let n_dora = p.n_dora();
        let (unmerge, record) = (cx.unmerging(), cx.recording());
        let fixes = match (unmerge, self.sidecar) {
            (true, Some(sc)) => SidecarFixes::read(sc, t, p, n_dora)?,
            _ => SidecarFixes::default(),
        };
        let data = self.shard.data(t);
        if p.dora_columns && !unmerge {
            // A first pass over the tensor for the norms, releasing its pages as it goes (RAM stays flat).
            let release = ChunkRelease::new(self.shard, t, chunk_rows * row_bytes);
            kernel::set_column_factors(p, data, chunk_rows, &|ci| release.complete(ci));
        }
        let p: &Prepared = p;
        let release = ChunkRelease::new(self.shard, t, chunk_rows * row_bytes);
        // Per chunk: its fix-ups, the elements restored, and the hashes of its input and output.
        let chunks: Vec<(Fixups, u64, u64, u64)> = (0..n_chunks)
            .into_par_iter()
            .map_init(
                || Scratch::new(p),
                |scratch, ci| -> Result<(Fixups, u64, u64, u64)> {
                    let row0 = ci * chunk_rows;
                    let nrows = chunk_rows.min(p.rows - row0);
                    let src = &data[row0 * row_bytes..(row0 + nrows) * row_bytes];
                    let mut buf = take_buffer(nrows * row_bytes);
                    let mut fix = take_fixups();
                    // The input is hashed before the kernel reads it: it then comes from cache.
                    let h_in = if hash { digest::chunk(ci, src) } else { 0 };
                    let blocks = buf
                        .chunks_mut(ROW_BLOCK * row_bytes)
                        .zip(src.chunks(ROW_BLOCK * row_bytes));
                    for (bi, (out, inp)) in blocks.enumerate() {
                        let first_row = row0 + bi * ROW_BLOCK;
                        if unmerge {
                            kernel::unmerge_block(p, first_row, inp, out, &fixes.dora, scratch);
                        } else {
                            kernel::merge_block(p, first_row, inp, out, record, scratch, &mut fix);
                        }
                    }
                    let restored = fixes.apply(p, row0 * p.cols, nrows * p.cols, &mut buf);
                    let nonfinite = if check_finite {
                        first_new_nonfinite(p.ft, src, &buf)
                    } else {
                        None
                    };
                    let h_out = if hash { digest::chunk(ci, &buf) } else { 0 };
                    let written = match nonfinite {
                        Some(k) => Err(nonfinite_error(t, p, row0 * p.cols + k, p.ft.load(src, k))),
                        None => self
                            .writer
                            .write_at((t.begin + row0 * row_bytes) as u64, &buf),
                    };
                    give_back_buffer(buf);
                    written?;
                    release.complete(ci);
                    Ok((fix, restored, h_in, h_out))
                },
            )
            .collect::<Result<_>>()?;
        if let Some(sc) = self.sidecar {
            for suffix in [SUFFIX_FIXES, SUFFIX_SEEK, SUFFIX_INDEX, SUFFIX_VALUE] {
                if let Some(st) = sc.get(&format!("{}{suffix}", t.name)) {
                    sc.release(st, 0, st.nbytes());
                }
            }
        }
        report.sidecar_elements += chunks.iter().map(|c| c.1).sum::<u64>();
        let mut hashes = Vec::with_capacity(chunks.len());
        let fixups: Vec<(Fixups, u64)> = chunks
            .into_iter()
            .map(|(fix, restored, h_in, h_out)| {
                hashes.push((h_in, h_out));
                (fix, restored)
            })
            .collect();
        let result = self.spill_fixups(pos, t, p, chunk_rows, n_dora, &fixups, report);
        give_back_fixups(fixups.into_iter().map(|c| c.0));
        result?;
        let len = t.nbytes() as u64;
        let (h_in, h_out): (Vec<u64>, Vec<u64>) = hashes.into_iter().unzip();
        let (input, output) = (digest::combine(len, &h_in), digest::combine(len, &h_out));
        Ok(if !hash {
            TensorDigests {
                original: 0,
                merged: 0,
            }
        } else if cx.unmerging() {
            TensorDigests {
                original: output,
                merged: input,
            }
        } else {
            TensorDigests {
                original: input,
                merged: output,
            }
        })
    }

    /// Writes tensor `pos`'s sidecar entries from its chunks' fix-up lists.
    #[allow(clippy::too_many_arguments)]
    fn spill_fixups(
        &self,
        pos: usize,
        t: &TensorInfo,
        p: &Prepared,
        chunk_rows: usize,
        n_dora: usize,
        chunks: &[(Fixups, u64)],
        report: &mut Report,
    ) -> Result<()> {
        let Some(spill) = &self.spill else {
            return Ok(());
        };

        // The chunks are in row order and each lists its elements in order, so the concatenation
        // is the sorted fix-up list the unmerge expects.
        let n_fix: usize = chunks.iter().map(|c| c.0.index.len()).sum();
        if n_fix > 0 {
            let entries = chunks
                .iter()
                .flat_map(|(fix, _)| fix.index.iter().copied().zip(fix.bits.iter().copied()));
            let mut stream = SERIAL_BUFFER.take();
            let table = fixlist::encode(p.ft, t.numel() as u64, entries, &mut stream);
            if stream.len() + 8 * table.len() >= t.nbytes() {
                // A delta large against W (or IA3's multiply) leaves too many elements to list:
                // keeping the original tensor is smaller, so the sidecar never outgrows the
                // merged tensors.
                SERIAL_BUFFER.set(stream);
                report.sidecar_elements += t.numel() as u64;
                self.keep_original(pos, t);
                return Ok(());
            }
            let table: Vec<u8> = table.iter().flat_map(|x| x.to_le_bytes()).collect();
            let spec = |suffix: &str, dtype, shape| TensorSpec {
                name: format!("{}{suffix}", t.name),
                dtype,
                shape,
            };
            let spilled = spill
                .spill(
                    (pos, ORDER_FIXES),
                    spec(SUFFIX_FIXES, Dtype::U8, vec![stream.len()]),
                    &stream,
                )
                .and_then(|()| {
                    spill.spill(
                        (pos, ORDER_SEEK),
                        spec(SUFFIX_SEEK, Dtype::U64, vec![table.len() / 16, 2]),
                        &table,
                    )
                });
            SERIAL_BUFFER.set(stream);
            spilled?;
        }
        report.sidecar_elements += n_fix as u64;
        if n_dora > 0 {
            // Column factors were fixed before the merge; row factors come from the kernels, each
            // block of ROW_BLOCK rows having left n_dora runs of its rows' factors.
            let gathered;
            let (factors, per_term): (&[f32], usize) = if p.dora_columns {
                (&p.column_factors, p.cols)
            } else {
                let mut factors = vec![0f32; n_dora * p.rows];
                for (ci, (fix, _)) in chunks.iter().enumerate() {
                    let mut values = fix.dora.iter();
                    let (row0, end) = (ci * chunk_rows, (ci * chunk_rows + chunk_rows).min(p.rows));
                    for first in (row0..end).step_by(ROW_BLOCK) {
                        let block_rows = ROW_BLOCK.min(end - first);
                        for d in 0..n_dora {
                            for r in 0..block_rows {
                                factors[d * p.rows + first + r] =
                                    *values.next().expect("kernel wrote them");
                            }
                        }
                    }
                }
                gathered = factors;
                (&gathered, p.rows)
            };
            let bytes: Vec<u8> = factors.iter().flat_map(|x| x.to_le_bytes()).collect();
            spill.spill(
                (pos, ORDER_DORA),
                TensorSpec {
                    name: format!("{}{SUFFIX_DORA}", t.name),
                    dtype: Dtype::F32,
                    shape: vec![n_dora, per_term],
                },
                &bytes,
            )?;
        }
        Ok(())
    }
}

thread_local! {
    /// Each thread's output chunk buffer, kept between chunks so that it is not zeroed again.
    static CHUNK_BUFFER: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
    /// A tensor's encoded fix-up records, reused from tensor to tensor.
    static SERIAL_BUFFER: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Fix-up lists are recycled between chunks: growing fresh ones faulted in new pages for every
/// chunk (about 3 % of a bf16 merge's CPU time).
static FIXUPS: Mutex<Vec<Fixups>> = Mutex::new(Vec::new());
/// Recycled lists kept at most (a list holds at most one chunk's elements).
const FIXUPS_KEPT: usize = 64;

fn take_fixups() -> Fixups {
    let mut f = FIXUPS
        .lock()
        .expect("no panics while locked")
        .pop()
        .unwrap_or_default();
    f.index.clear();
    f.bits.clear();
    f.dora.clear();
    f
}

fn give_back_fixups(lists: impl Iterator<Item = Fixups>) {
    let mut pool = FIXUPS.lock().expect("no panics while locked");
    let room = FIXUPS_KEPT.saturating_sub(pool.len());
    pool.extend(lists.take(room));
}

/// This thread's chunk buffer, `len` bytes long (contents unspecified: the kernel overwrites
/// every byte).
fn take_buffer(len: usize) -> Vec<u8> {
    let mut buf = CHUNK_BUFFER.take();
    buf.resize(len, 0);
    buf
}

fn give_back_buffer(buf: Vec<u8>) {
    CHUNK_BUFFER.set(buf);
}

/// The first element of `out` that is not finite (inf or NaN) while the same element of `src`
/// is. Almost always there is none, which one vectorised pass finds: the largest exponent field
/// of the chunk is all ones only if some element is inf or NaN.
fn first_new_nonfinite(ft: FloatType, src: &[u8], out: &[u8]) -> Option<usize> {
    fn any_all_ones<T: Copy + Ord + Default>(words: &[T], mask: impl Fn(T) -> T, all: T) -> bool {
        words.iter().fold(T::default(), |m, &w| m.max(mask(w))) == all
    }
    let found = match ft {
        FloatType::BF16 | FloatType::F16 => {
            let exponent: u16 = if ft == FloatType::BF16 {
                0x7f80
            } else {
                0x7c00
            };
            // SAFETY: any two bytes are a valid u16; align_to gives the aligned middle.
            let (head, mid, tail) = unsafe { out.align_to::<u16>() };
            let edge = |b: &[u8]| {
                b.chunks_exact(2)
                    .any(|c| u16::from_le_bytes([c[0], c[1]]) & exponent == exponent)
            };
            (head.len() % 2 != 0)
                || edge(head)
                || edge(tail)
                || any_all_ones(mid, |w| u16::from_le(w) & exponent, exponent)
        }
        FloatType::F32 => {
            let (head, mid, tail) = unsafe { out.align_to::<u32>() };
            let edge = |b: &[u8]| {
                b.chunks_exact(4).any(|c| {
                    u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & 0x7f80_0000 == 0x7f80_0000
                })
            };
            (head.len() % 4 != 0)
                || edge(head)
                || edge(tail)
                || any_all_ones(mid, |w| u32::from_le(w) & 0x7f80_0000, 0x7f80_0000)
        }
    };
    if !found {
        return None;
    }
    let exponent = match ft {
        FloatType::BF16 => 0x7f80,
        FloatType::F16 => 0x7c00,
        FloatType::F32 => 0x7f80_0000,
    };
    let nonfinite = |bytes: &[u8], i: usize| ft.load_bits(bytes, i) & exponent == exponent;
    (0..out.len() / ft.size()).find(|&i| nonfinite(out, i) && !nonfinite(src, i))
}

fn nonfinite_error(t: &TensorInfo, p: &Prepared, element: usize, was: f32) -> Error {
    Error::tensor(
        &t.name,
        format!(
            "merging gives a non-finite value (inf or NaN) at [{}, {}], where the base holds {was}: the \
             adapters' delta overflows {:?} (check lora_alpha, the scaling and the merge weights); pass \
             allow_nonfinite=True to write it anyway",
            element / p.cols.max(1),
            element % p.cols.max(1),
            t.dtype
        ),
    )
}

/// An unmerge's inputs from the sidecar for one tensor: DoRA's row factors (column factors go
/// into the [`Prepared`]) and the sorted list of elements whose original bits are restored.
#[derive(Default)]
struct SidecarFixes<'a> {
    dora: Vec<f32>,
    /// Format 2.
    list: Option<FixList<'a>>,
    /// Format 1: sorted indices (u32, or i64 when `wide`) and the original values.
    index: &'a [u8],
    wide: bool,
    values: &'a [u8],
}

impl<'a> SidecarFixes<'a> {
    fn read(
        sc: &'a SafeTensorsFile,
        t: &TensorInfo,
        p: &mut Prepared,
        n_dora: usize,
    ) -> Result<Self> {
        let mut fixes = SidecarFixes::default();
        if n_dora > 0 {
            let tf = sc.require(&format!("{}{SUFFIX_DORA}", t.name))?;
            let expect = [n_dora, if p.dora_columns { p.cols } else { p.rows }];
            if tf.shape != expect || tf.dtype != Dtype::F32 {
                return Err(Error::tensor(
                    &tf.name,
                    format!(
                        "sidecar shape {:?} {}, expected {expect:?} F32",
                        tf.shape,
                        tf.dtype.as_str()
                    ),
                ));
            }
            if p.dora_columns {
                p.column_factors = sc.read_f32(tf)?;
            } else {
                fixes.dora = sc.read_f32(tf)?;
            }
        }
        if let (Some(tf), Some(ts)) = (
            sc.get(&format!("{}{SUFFIX_FIXES}", t.name)),
            sc.get(&format!("{}{SUFFIX_SEEK}", t.name)),
        ) {
            if tf.dtype != Dtype::U8 || ts.dtype != Dtype::U64 {
                return Err(Error::tensor(
                    &tf.name,
                    "sidecar fix-up tensors have the wrong dtypes",
                ));
            }
            let list =
                FixList::new(p.ft, t.numel() as u64, sc.data(tf), sc.data(ts)).map_err(|why| {
                    Error::tensor(&tf.name, format!("corrupt sidecar fix-up list: {why}"))
                })?;
            fixes.list = Some(list);
            return Ok(fixes);
        }
        let (Some(ti), Some(tv)) = (
            sc.get(&format!("{}{SUFFIX_INDEX}", t.name)),
            sc.get(&format!("{}{SUFFIX_VALUE}", t.name)),
        ) else {
            return Ok(fixes);
        };
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
        fixes.index = sc.data(ti);
        fixes.wide = ti.dtype == Dtype::I64;
        fixes.values = sc.data(tv);
        // Chunks find their part by binary search, which needs the order checked up front.
        let mut prev: Option<u64> = None;
        for k in 0..fixes.len() {
            let e = fixes.element(k);
            if prev.is_some_and(|q| e <= q) {
                return Err(Error::tensor(&t.name, "sidecar indices are not sorted"));
            }
            if e >= t.numel() as u64 {
                return Err(Error::tensor(
                    &t.name,
                    "sidecar holds indices outside the tensor",
                ));
            }
            prev = Some(e);
        }
        Ok(fixes)
    }

    /// Format 1's entry count.
    fn len(&self) -> usize {
        self.index.len() / if self.wide { 8 } else { 4 }
    }

    fn element(&self, k: usize) -> u64 {
        if self.wide {
            u64::from_le_bytes(self.index[8 * k..8 * k + 8].try_into().unwrap())
        } else {
            u32::from_le_bytes(self.index[4 * k..4 * k + 4].try_into().unwrap()) as u64
        }
    }

    /// Restores the listed elements among `count` elements from `first` held in `buf`; returns
    /// how many it restored.
    fn apply(&self, p: &Prepared, first: usize, count: usize, buf: &mut [u8]) -> u64 {
        let (lo, hi) = (first as u64, (first + count) as u64);
        if let Some(list) = &self.list {
            return list.apply(lo..hi, buf);
        }
        let (mut a, mut b) = (0, self.len());
        while a < b {
            let m = (a + b) / 2;
            if self.element(m) < lo {
                a = m + 1;
            } else {
                b = m;
            }
        }
        let mut k = a;
        while k < self.len() && self.element(k) < hi {
            let bits = p.ft.load_bits(self.values, k);
            p.ft.store_bits(buf, (self.element(k) - lo) as usize, bits);
            k += 1;
        }
        (k - a) as u64
    }
}
