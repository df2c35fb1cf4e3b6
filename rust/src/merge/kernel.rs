//! The fused kernels. `dots` is the hot loop: a register-blocked `left @ right` for a block of
//! rows, accumulated with fused multiply-adds in k order (as BLAS sgemm does, so fp32 merges
//! match torch bit for bit), compiled for AVX-512 / AVX2 when the CPU has them. The scaling
//! is applied afterwards, as PEFT's `(B @ A) * scaling` does.
//!
//! [`prepare`] loads an adapter term's matrices as fp32 in the layout of the base tensor. Each
//! term then fills its delta for a block of rows (LoRA: one product; LoHa: two, multiplied
//! elementwise; LoKr: rows of the Kronecker product; IA3: the row or column factors), so no
//! full-size delta ever exists. IA3 multiplies where the others add, and its unmerge divides.

use rayon::prelude::*;

use super::half16;
use super::plan::{view2, KronFactor, MergePlan, Term, TermKind};
use super::{MAX_DORA_TERMS, ROW_BLOCK};
use crate::checkpoint::{FloatType, TensorInfo};
use crate::{Error, Result};

/// Defines `fn $name(args)` that runs `$inner(args)` compiled for AVX-512, else AVX2, else the
/// baseline, whichever the CPU has: `$inner` is `#[inline(always)]`, so each copy is vectorised for
/// its instruction set.
macro_rules! multiversion {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) => $inner:ident) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma,f16c")]
                unsafe fn avx512($($arg: $ty),*) {
                    $inner($($arg),*)
                }
                #[target_feature(enable = "avx2,fma,f16c")]
                unsafe fn avx2($($arg: $ty),*) {
                    $inner($($arg),*)
                }
                let (fma, f16c) = (is_x86_feature_detected!("fma"), is_x86_feature_detected!("f16c"));
                if is_x86_feature_detected!("avx512f") && fma && f16c {
                    // SAFETY: the features were just detected.
                    return unsafe { avx512($($arg),*) };
                }
                if is_x86_feature_detected!("avx2") && fma && f16c {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $inner($($arg),*)
        }
    };
}

/// A base tensor's change, with the adapter matrices loaded as fp32 in the layout of W.
pub(super) struct Prepared {
    pub(super) ft: FloatType,
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) terms: Vec<ReadyTerm>,
    /// DoRA's magnitude runs along W's columns (an embedding table, a fan_in_fan_out weight)
    /// rather than its rows: each factor is then fixed by a pass over the whole base tensor.
    pub(super) dora_columns: bool,
    /// With `dora_columns`, the DoRA terms' factors, (n_dora, cols): set by [`set_column_factors`]
    /// (merge) or from the sidecar (unmerge) before the kernels run.
    pub(super) column_factors: Vec<f32>,
}

impl Prepared {
    /// How many terms are DoRA terms.
    pub(super) fn n_dora(&self) -> usize {
        self.terms.iter().filter(|t| t.magnitude.is_some()).count()
    }

    /// DoRA term `di`'s per-column factors, when the magnitude runs along the columns.
    #[inline(always)]
    fn column_factors(&self, di: usize) -> Option<&[f32]> {
        self.dora_columns
            .then(|| &self.column_factors[di * self.cols..(di + 1) * self.cols])
    }

    /// One term without DoRA, the kernels' fused single-pass case: `Some(false)` when it is
    /// added (LoRA, LoHa, LoKr), `Some(true)` when it multiplies (IA3).
    fn single(&self) -> Option<bool> {
        (self.terms.len() == 1 && self.terms[0].magnitude.is_none())
            .then(|| self.terms[0].delta.is_scale())
    }
}

pub(super) struct ReadyTerm {
    pub(super) delta: Delta,
    /// DoRA's magnitude vector (LoRA terms only).
    pub(super) magnitude: Option<Vec<f32>>,
}

/// `left @ right` with left (rows, r) for W's rows and right (r, cols) for its columns.
pub(super) struct Product {
    left: Vec<f32>,
    right: Vec<f32>,
    r: usize,
}

impl Product {
    /// Rows `first_row..first_row + nrows` of the product, times `scale`, into `out`.
    #[inline(always)]
    fn rows(&self, first_row: usize, nrows: usize, cols: usize, scale: f32, out: &mut [f32]) {
        let left = &self.left[first_row * self.r..(first_row + nrows) * self.r];
        dots(left, &self.right, self.r, cols, nrows, scale, out);
    }
}

/// What a term does to W, in the layout of W.
pub(super) enum Delta {
    /// Adds `scaling * left @ right` (LoRA; its bias as a 1-row product).
    LowRank { p: Product, scaling: f32 },
    /// Adds `scaling * (p1 ⊙ p2)` (LoHa), in PEFT's order: product, then scaling.
    Hadamard {
        p1: Product,
        p2: Product,
        scaling: f32,
    },
    /// Adds `scaling * kron(w1, w2)` (LoKr): element (i, j) is `w1[i / b][j / d] * w2[i % b][j % d]`
    /// for w2 of shape (b, d).
    Kron {
        w1: Vec<f32>,
        w2: Vec<f32>,
        b: usize,
        d: usize,
        scaling: f32,
    },
    /// Multiplies W (IA3): row i by `v[i]` when `per_row`, else column j by `v[j]`.
    Scale { v: Vec<f32>, per_row: bool },
}

impl Delta {
    fn is_scale(&self) -> bool {
        matches!(self, Delta::Scale { .. })
    }
}

fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; m.len()];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = m[i * cols + j];
        }
    }
    t
}

/// `left @ right` in full, with the same FMA chain as the kernel (and BLAS).
fn matmul(left: &[f32], right: &[f32], rows: usize, r: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * cols];
    for (bi, block) in out.chunks_mut(ROW_BLOCK * cols).enumerate() {
        let first = bi * ROW_BLOCK;
        let n = block.len() / cols.max(1);
        dots(
            &left[first * r..(first + n) * r],
            right,
            r,
            cols,
            n,
            1.0,
            block,
        );
    }
    out
}

pub(super) fn prepare(plan: &MergePlan, w: &TensorInfo, terms: &[Term]) -> Result<Prepared> {
    let ft = FloatType::of(w.dtype).expect("checked by the plan");
    // A convolution kernel is changed as its (out, in * kernel size) view, a bias as one row.
    let [rows, cols] = view2(&w.shape);
    let ready = terms
        .iter()
        .map(|t| {
            let f = &plan.adapters[t.adapter].file;
            let read = |key: &str| -> Result<(Vec<f32>, Vec<usize>)> {
                let ti = f.require(key)?;
                Ok((f.read_f32(ti)?, ti.shape.clone()))
            };
            let product = |a: &str, b: &str| -> Result<Product> {
                let ((left, ls), (right, _)) = (read(a)?, read(b)?);
                Ok(Product {
                    left,
                    right,
                    r: ls[1],
                })
            };
            let kron_factor = |k: &KronFactor| -> Result<(Vec<f32>, usize)> {
                Ok(match k {
                    KronFactor::Full(key) => {
                        let (m, s) = read(key)?;
                        (m, view2(&s)[1])
                    }
                    KronFactor::LowRank(a, b) => {
                        let p = product(a, b)?;
                        let (n, c) = (p.left.len() / p.r, p.right.len() / p.r);
                        (matmul(&p.left, &p.right, n, p.r, c), c)
                    }
                })
            };
            let scaling = t.scaling;
            let mut magnitude = None;
            let mut columns = false;
            let delta = match &t.kind {
                TermKind::LowRank {
                    a,
                    b,
                    transposed,
                    magnitude: m,
                } => {
                    let ((av, ash), (bv, bsh)) = (read(a)?, read(b)?);
                    let (r, fan_in, fan_out) = (ash[0], view2(&ash)[1], bsh[0]);
                    // delta^T[i][j] = sum_k A[k][i] B[j][k]: left = A^T, right = B^T, same k order.
                    let (left, right) = if *transposed {
                        (transpose(&av, r, fan_in), transpose(&bv, fan_out, r))
                    } else {
                        (bv, av)
                    };
                    magnitude = m.as_ref().map(|m| Ok::<_, Error>(read(m)?.0)).transpose()?;
                    columns = *transposed;
                    Delta::LowRank {
                        p: Product { left, right, r },
                        scaling,
                    }
                }
                TermKind::Bias { bias } => Delta::LowRank {
                    p: Product {
                        left: vec![1.0],
                        right: read(bias)?.0,
                        r: 1,
                    },
                    scaling,
                },
                TermKind::Hadamard { w1a, w1b, w2a, w2b } => Delta::Hadamard {
                    p1: product(w1a, w1b)?,
                    p2: product(w2a, w2b)?,
                    scaling,
                },
                TermKind::Kron { w1, w2 } => {
                    let ((w1, _), (w2, d)) = (kron_factor(w1)?, kron_factor(w2)?);
                    Delta::Kron {
                        b: w2.len() / d,
                        w1,
                        w2,
                        d,
                        scaling,
                    }
                }
                TermKind::Scale {
                    vector, per_row, ..
                } => {
                    // As the plan checked for zeros: the vector times the adapter's weight. A
                    // convolution's input-channel factor covers that channel's kernel columns.
                    let v = read(vector)?.0;
                    let run = if *per_row { 1 } else { cols / v.len() };
                    Delta::Scale {
                        v: (v.iter())
                            .flat_map(|x| std::iter::repeat_n(x * scaling, run))
                            .collect(),
                        per_row: *per_row,
                    }
                }
            };
            Ok((ReadyTerm { delta, magnitude }, columns))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut along = ready
        .iter()
        .filter(|(t, _)| t.magnitude.is_some())
        .map(|(_, c)| *c);
    let dora_columns = along.next().unwrap_or(false);
    if along.any(|c| c != dora_columns) {
        return Err(Error::tensor(
            &w.name,
            "DoRA adapters whose magnitudes run along different axes (fan_in_fan_out set differently)",
        ));
    }
    let ready: Vec<ReadyTerm> = ready.into_iter().map(|(t, _)| t).collect();
    if ready.iter().filter(|t| t.magnitude.is_some()).count() > MAX_DORA_TERMS {
        return Err(Error::tensor(
            &w.name,
            format!("more than {MAX_DORA_TERMS} DoRA adapters merged into one tensor"),
        ));
    }
    Ok(Prepared {
        ft,
        rows,
        cols,
        terms: ready,
        dora_columns,
        column_factors: Vec::new(),
    })
}

/// Fix-ups recorded for one chunk: flat element indices and original bit patterns.
#[derive(Default)]
pub(super) struct Fixups {
    pub(super) index: Vec<u64>,
    pub(super) bits: Vec<u32>,
    pub(super) dora: Vec<f32>,
}

/// Per-thread buffers of the kernel: the fp32 accumulator rows, each term's delta rows (for
/// IA3 its factors) and LoHa's second product.
pub(super) struct Scratch {
    pub(super) acc: Vec<f32>,
    pub(super) deltas: Vec<f32>,
    pub(super) second: Vec<f32>,
    /// The fused bf16 LoRA block's miss masks.
    pub(super) masks: Vec<u32>,
}

impl Scratch {
    pub(super) fn new(p: &Prepared) -> Self {
        let hadamard = p
            .terms
            .iter()
            .any(|t| matches!(t.delta, Delta::Hadamard { .. }));
        Scratch {
            acc: vec![0f32; p.cols],
            deltas: vec![0f32; p.terms.len() * ROW_BLOCK * p.cols],
            second: vec![0f32; if hadamard { ROW_BLOCK * p.cols } else { 0 }],
            masks: Vec::new(),
        }
    }
}

/// Rows per register block of `dots`: `ROW_BLOCK`. Columns per register block: `L`, chosen per
/// instruction set so that the `ROW_BLOCK * L / width` accumulators (8 with AVX-512 and AVX2)
/// keep both FMA units busy without spilling registers.
#[inline(always)]
fn dots_generic<const NR: usize, const L: usize>(
    left: &[f32],
    right: &[f32],
    r: usize,
    cols: usize,
    out: &mut [f32],
) {
    // left's rows transposed to k-major, so the k loop walks both operands without index checks.
    let mut lt = [[0f32; NR]; 64];
    let full = cols / L * L;
    for k0 in (0..r).step_by(64) {
        let kn = 64.min(r - k0);
        for (k, row) in lt[..kn].iter_mut().enumerate() {
            for (rr, v) in row.iter_mut().enumerate() {
                *v = left[rr * r + k0 + k];
            }
        }
        let rights = right[k0 * cols..(k0 + kn) * cols].chunks_exact(cols);
        let mut j = 0;
        while j < full {
            let mut acc = [[0f32; L]; NR];
            if k0 > 0 {
                for (rr, acc_row) in acc.iter_mut().enumerate() {
                    acc_row.copy_from_slice(&out[rr * cols + j..rr * cols + j + L]);
                }
            }
            for (lk, rk) in lt[..kn].iter().zip(rights.clone()) {
                let a: &[f32; L] = rk[j..j + L].try_into().unwrap();
                for (acc_row, &b) in acc.iter_mut().zip(lk) {
                    for l in 0..L {
                        acc_row[l] = b.mul_add(a[l], acc_row[l]);
                    }
                }
            }
            for (rr, acc_row) in acc.iter().enumerate() {
                out[rr * cols + j..rr * cols + j + L].copy_from_slice(acc_row);
            }
            j += L;
        }
        for j in full..cols {
            for rr in 0..NR {
                let mut s = if k0 > 0 { out[rr * cols + j] } else { 0f32 };
                for (lk, rk) in lt[..kn].iter().zip(rights.clone()) {
                    s = lk[rr].mul_add(rk[j], s);
                }
                out[rr * cols + j] = s;
            }
        }
    }
}

/// `dots` over any number of rows, in register blocks of up to 4 rows.
#[inline(always)]
fn dots_any<const L: usize>(
    left: &[f32],
    right: &[f32],
    r: usize,
    cols: usize,
    nrows: usize,
    out: &mut [f32],
) {
    let mut row = 0;
    while row < nrows {
        let n = (nrows - row).min(4);
        let (l, o) = (
            &left[row * r..(row + n) * r],
            &mut out[row * cols..(row + n) * cols],
        );
        match n {
            4 => dots_generic::<4, L>(l, right, r, cols, o),
            3 => dots_generic::<3, L>(l, right, r, cols, o),
            2 => dots_generic::<2, L>(l, right, r, cols, o),
            _ => dots_generic::<1, L>(l, right, r, cols, o),
        }
        row += n;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn dots_avx512(
    left: &[f32],
    right: &[f32],
    r: usize,
    cols: usize,
    nrows: usize,
    scale: f32,
    out: &mut [f32],
) {
    if nrows == ROW_BLOCK {
        // SAFETY: the caller detected AVX-512F; the slices are checked inside.
        return unsafe { dots_block_avx512(left, right, r, cols, scale, out) };
    }
    dots_any::<32>(left, right, r, cols, nrows, out);
    scale_all(out, scale);
}

/// `out *= scale` (PEFT's `(B @ A) * scaling`: the scaling after the product).
#[inline(always)]
fn scale_all(out: &mut [f32], scale: f32) {
    if scale != 1.0 {
        out.iter_mut().for_each(|x| *x *= scale);
    }
}

/// A full block of `ROW_BLOCK` (8) rows with AVX-512: 8 rows x 32 columns in 16 zmm accumulators, so
/// each pair of loads from `right` feeds 16 FMAs. Each element is the same FMA chain in k order as
/// `dots_generic` computes, so the result is bit-identical on every path.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dots_block_avx512(
    left: &[f32],
    right: &[f32],
    r: usize,
    cols: usize,
    scale: f32,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let vs = _mm512_set1_ps(scale);
    const NR: usize = ROW_BLOCK;
    assert!(left.len() >= NR * r && right.len() >= r * cols && out.len() >= NR * cols);
    let full = cols / 32 * 32;
    let (lp, rp, op) = (left.as_ptr(), right.as_ptr(), out.as_mut_ptr());
    let mut j = 0;
    while j < full {
        // SAFETY: the lengths were checked above and j + 32 <= cols.
        let acc = unsafe { tile_avx512(lp, rp, r, cols, j) };
        for (i, acc_row) in acc.iter().enumerate() {
            // SAFETY: i < NR and j + 32 <= cols, inside `out`.
            unsafe {
                _mm512_storeu_ps(op.add(i * cols + j), _mm512_mul_ps(acc_row[0], vs));
                _mm512_storeu_ps(op.add(i * cols + j + 16), _mm512_mul_ps(acc_row[1], vs));
            }
        }
        j += 32;
    }
    // The last columns (fewer than 32): the same FMA chain, element by element, in place.
    for i in 0..NR {
        for j in full..cols {
            let dot = (0..r).fold(0f32, |s, k| left[i * r + k].mul_add(right[k * cols + j], s));
            out[i * cols + j] = dot * scale;
        }
    }
}

/// One tile of `ROW_BLOCK` rows x 32 columns of `left @ right` (`left` holds ROW_BLOCK rows of
/// `r`, `right` is (r, cols); columns `j..j + 32`) in 16 AVX-512 accumulators, each element the
/// FMA chain in k order. Inlined into callers compiled with AVX-512F.
///
/// # Safety
/// AVX-512F must be available, `lp` must point at ROW_BLOCK * r floats and `rp` at r * cols
/// floats, and `j + 32 <= cols`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn tile_avx512(
    lp: *const f32,
    rp: *const f32,
    r: usize,
    cols: usize,
    j: usize,
) -> [[std::arch::x86_64::__m512; 2]; ROW_BLOCK] {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; ROW_BLOCK];
    for k in 0..r {
        // SAFETY: k < r and j + 32 <= cols, inside `right`.
        let (a0, a1) = unsafe {
            (
                _mm512_loadu_ps(rp.add(k * cols + j)),
                _mm512_loadu_ps(rp.add(k * cols + j + 16)),
            )
        };
        for (i, acc_row) in acc.iter_mut().enumerate() {
            // SAFETY: i < ROW_BLOCK and k < r, inside `left`.
            let b = _mm512_set1_ps(unsafe { *lp.add(i * r + k) });
            acc_row[0] = _mm512_fmadd_ps(b, a0, acc_row[0]);
            acc_row[1] = _mm512_fmadd_ps(b, a1, acc_row[1]);
        }
    }
    acc
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots_avx2(
    left: &[f32],
    right: &[f32],
    r: usize,
    cols: usize,
    nrows: usize,
    scale: f32,
    out: &mut [f32],
) {
    dots_any::<16>(left, right, r, cols, nrows, out);
    scale_all(out, scale);
}

/// `out[rr][j] = (sum_k left[rr][k] * right[k][j]) * scale` for `nrows` rows; every path computes
/// the same correctly rounded FMA chain and then one multiply, so results never depend on the CPU.
pub fn dots(
    left: &[f32],
    right: &[f32],
    r: usize,
    cols: usize,
    nrows: usize,
    scale: f32,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
            // SAFETY: the features were just detected.
            return unsafe { dots_avx512(left, right, r, cols, nrows, scale, out) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: as above.
            return unsafe { dots_avx2(left, right, r, cols, nrows, scale, out) };
        }
    }
    dots_any::<16>(left, right, r, cols, nrows, out);
    scale_all(out, scale);
}

/// Fills `scratch.deltas` with each term's scaled delta (IA3: its factors) for the rows of
/// this block.
fn deltas(p: &Prepared, first_row: usize, nrows: usize, scratch: &mut Scratch) {
    let cols = p.cols;
    for (ti, t) in p.terms.iter().enumerate() {
        let d = &mut scratch.deltas[ti * ROW_BLOCK * cols..(ti * ROW_BLOCK + nrows) * cols];
        match &t.delta {
            Delta::LowRank { p: prod, scaling } => prod.rows(first_row, nrows, cols, *scaling, d),
            Delta::Hadamard { p1, p2, scaling } => {
                let second = &mut scratch.second[..nrows * cols];
                p1.rows(first_row, nrows, cols, 1.0, d);
                p2.rows(first_row, nrows, cols, 1.0, second);
                for (x, y) in d.iter_mut().zip(second.iter()) {
                    *x = *x * y * scaling;
                }
            }
            Delta::Kron {
                w1,
                w2,
                b,
                d: w2_cols,
                scaling,
            } => {
                let w1_cols = cols / w2_cols;
                for (rr, row) in d.chunks_exact_mut(cols).enumerate() {
                    let (i1, i2) = ((first_row + rr) / b, (first_row + rr) % b);
                    let w2_row = &w2[i2 * w2_cols..(i2 + 1) * w2_cols];
                    let w1_row = &w1[i1 * w1_cols..(i1 + 1) * w1_cols];
                    for (part, f) in row.chunks_exact_mut(*w2_cols).zip(w1_row) {
                        for (x, y) in part.iter_mut().zip(w2_row) {
                            *x = f * y * scaling;
                        }
                    }
                }
            }
            Delta::Scale { v, per_row: true } => {
                for (rr, row) in d.chunks_exact_mut(cols).enumerate() {
                    row.fill(v[first_row + rr]);
                }
            }
            Delta::Scale { v, per_row: false } => {
                d.chunks_exact_mut(cols)
                    .for_each(|row| row.copy_from_slice(v));
            }
        }
    }
}

/// DoRA along columns (PEFT's embedding and fan_in_fan_out DoRA): factor j of each DoRA term is
/// m[j] / ||W[:, j] + D[:, j]||, the norm over every row of the base tensor `data` (as in the
/// forward pass, whatever else is merged). Sums of squares are reduced in f64; the rows are read in
/// chunks of `chunk_rows`, and `done(chunk)` is called as each is finished (its pages can go).
pub(super) fn set_column_factors(
    p: &mut Prepared,
    data: &[u8],
    chunk_rows: usize,
    done: &(dyn Fn(usize) + Sync),
) {
    let (cols, n_dora) = (p.cols, p.n_dora());
    let row_bytes = cols * p.ft.size();
    let shared: &Prepared = p;
    let sums = (0..shared.rows.div_ceil(chunk_rows))
        .into_par_iter()
        .fold(
            || (Scratch::new(shared), vec![0f64; n_dora * cols]),
            |(mut scratch, mut sums), ci| {
                let end = ((ci + 1) * chunk_rows).min(shared.rows);
                for first in (ci * chunk_rows..end).step_by(ROW_BLOCK) {
                    let nrows = ROW_BLOCK.min(end - first);
                    deltas(shared, first, nrows, &mut scratch);
                    let Scratch { acc, deltas, .. } = &mut scratch;
                    for rr in 0..nrows {
                        let at = (first + rr) * row_bytes;
                        decode(shared.ft, &data[at..at + row_bytes], acc);
                        let dora = (shared.terms.iter().enumerate())
                            .filter(|(_, t)| t.magnitude.is_some());
                        for (di, (ti, _)) in dora.enumerate() {
                            let d = &deltas[delta_row(cols, ti, rr)];
                            let s = &mut sums[di * cols..(di + 1) * cols];
                            for ((s, a), dj) in s.iter_mut().zip(acc.iter()).zip(d) {
                                let v = (a + dj) as f64;
                                *s += v * v;
                            }
                        }
                    }
                }
                done(ci);
                (scratch, sums)
            },
        )
        .map(|(_, sums)| sums)
        .reduce(
            || vec![0f64; n_dora * cols],
            |mut a, b| {
                a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                a
            },
        );
    let magnitudes = p.terms.iter().filter_map(|t| t.magnitude.as_ref());
    p.column_factors = magnitudes
        .zip(sums.chunks_exact(cols))
        .flat_map(|(m, s)| m.iter().zip(s).map(|(m, s)| m / (s.sqrt() as f32)))
        .collect();
}

/// Where term `ti`'s delta for row `rr` of the block lies in `Scratch::deltas`.
fn delta_row(cols: usize, ti: usize, rr: usize) -> std::ops::Range<usize> {
    let start = (ti * ROW_BLOCK + rr) * cols;
    start..start + cols
}

/// float(src) into `acc`, element by element (written so that it vectorises).
#[inline(always)]
fn decode(ft: FloatType, src: &[u8], acc: &mut [f32]) {
    match ft {
        FloatType::BF16 => {
            for (a, c) in acc.iter_mut().zip(src.chunks_exact(2)) {
                *a = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
        }
        FloatType::F16 => {
            for (a, c) in acc.iter_mut().zip(src.chunks_exact(2)) {
                *a = half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        FloatType::F32 => {
            for (a, c) in acc.iter_mut().zip(src.chunks_exact(4)) {
                *a = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
    }
}

/// `acc` rounded to `ft` into `dst`.
#[inline(always)]
fn encode(ft: FloatType, acc: &[f32], dst: &mut [u8]) {
    let n = ft.size();
    for (a, c) in acc.iter().zip(dst.chunks_exact_mut(n)) {
        let bits = ft.round_bits(*a).to_le_bytes();
        c.copy_from_slice(&bits[..n]);
    }
}

/// Applies the terms in order to `acc` (a row of float(W)); DoRA's factors go to `factors[di]`.
#[inline(always)]
fn apply_terms(
    p: &Prepared,
    deltas: &[f32],
    rr: usize,
    row: usize,
    acc: &mut [f32],
    factors: &mut [[f32; ROW_BLOCK]; MAX_DORA_TERMS],
) {
    // DoRA's norm is that of the base row (`acc` on entry) plus the adapter's own delta, whatever was
    // merged before it, as in the forward pass (and PEFT's merge): the merged weight then computes what
    // the unmerged adapters do together.
    if !p.dora_columns {
        let mut di = 0;
        for (ti, t) in p.terms.iter().enumerate() {
            if let Some(m) = &t.magnitude {
                let d = &deltas[delta_row(p.cols, ti, rr)];
                factors[di][rr] = m[row] / (sum_of_squares(acc, d).sqrt() as f32);
                di += 1;
            }
        }
    }
    let mut di = 0;
    for (ti, t) in p.terms.iter().enumerate() {
        let d = &deltas[delta_row(p.cols, ti, rr)];
        if t.magnitude.is_some() {
            if let Some(fs) = p.column_factors(di) {
                for ((a, dj), f) in acc.iter_mut().zip(d).zip(fs) {
                    *a = f * (*a + dj);
                }
            } else {
                let f = factors[di][rr];
                for (a, dj) in acc.iter_mut().zip(d) {
                    *a = f * (*a + dj);
                }
            }
            di += 1;
        } else if t.delta.is_scale() {
            for (a, dj) in acc.iter_mut().zip(d) {
                *a *= dj;
            }
        } else {
            for (a, dj) in acc.iter_mut().zip(d) {
                *a += dj;
            }
        }
    }
}

/// sum((a + d)^2) over a row, in f64, in 8 independent lanes (so that it vectorises).
#[inline(always)]
fn sum_of_squares(a: &[f32], d: &[f32]) -> f64 {
    const LANES: usize = 8;
    let mut lanes = [0f64; LANES];
    let (a8, d8) = (a.chunks_exact(LANES), d.chunks_exact(LANES));
    let tail: f64 = (a8.remainder().iter().zip(d8.remainder()))
        .map(|(x, y)| {
            let v = (x + y) as f64;
            v * v
        })
        .sum();
    for (x, y) in a8.zip(d8) {
        for k in 0..LANES {
            let v = (x[k] + y[k]) as f64;
            lanes[k] += v * v;
        }
    }
    lanes.iter().sum::<f64>() + tail
}

/// Undoes the terms in reverse order on `acc` (a row of float(W')), as PEFT's unmerge does.
#[inline(always)]
fn undo_terms(
    p: &Prepared,
    deltas: &[f32],
    rr: usize,
    acc: &mut [f32],
    factor: impl Fn(usize) -> f32,
) {
    let mut di = p.n_dora();
    for (ti, t) in p.terms.iter().enumerate().rev() {
        let d = &deltas[delta_row(p.cols, ti, rr)];
        if t.magnitude.is_some() {
            di -= 1;
            if let Some(fs) = p.column_factors(di) {
                for ((a, dj), f) in acc.iter_mut().zip(d).zip(fs) {
                    *a = *a / f - dj;
                }
            } else {
                let f = factor(di);
                for (a, dj) in acc.iter_mut().zip(d) {
                    *a = *a / f - dj;
                }
            }
        } else if t.delta.is_scale() {
            for (a, dj) in acc.iter_mut().zip(d) {
                *a /= dj;
            }
        } else {
            for (a, dj) in acc.iter_mut().zip(d) {
                *a -= dj;
            }
        }
    }
}

/// Records the elements where round(`back`) is not the original `w`.
#[inline(always)]
fn record_mismatches(ft: FloatType, back: &[f32], w: &[u8], base_index: u64, fix: &mut Fixups) {
    for (j, x) in back.iter().enumerate() {
        let orig = ft.load_bits(w, j);
        if ft.round_bits(*x) != orig {
            fix.index.push(base_index + j as u64);
            fix.bits.push(orig);
        }
    }
}

/// A single term's step on one element: add its delta, or (IA3, `SCALE`) multiply by its factor.
#[inline(always)]
fn step<const SCALE: bool>(x: f32, d: f32) -> f32 {
    if SCALE {
        x * d
    } else {
        x + d
    }
}

/// The inverse of [`step`].
#[inline(always)]
fn unstep<const SCALE: bool>(x: f32, d: f32) -> f32 {
    if SCALE {
        x / d
    } else {
        x - d
    }
}

/// The common case, one term without DoRA, fused into a single pass per row:
/// W' = round(step(W, d)), and with `record` the check that round(unstep(W', d)) gives W back.
/// Spans of 64 elements are computed branch-free (so they vectorise) into a bit mask of the
/// misses, whose set bits are then visited directly.
#[inline(always)]
pub(super) fn merge_row_single<const SCALE: bool>(
    ft: FloatType,
    w: &[u8],
    d: &[f32],
    o: &mut [u8],
    record: bool,
    base_index: u64,
    fix: &mut Fixups,
) {
    const SPAN: usize = 64;
    let size = ft.size();
    let full = d.len() / SPAN * SPAN;
    let spans = w[..full * size]
        .chunks_exact(SPAN * size)
        .zip(d[..full].chunks_exact(SPAN))
        .zip(o[..full * size].chunks_exact_mut(SPAN * size));
    for (c, ((ws, ds), os)) in spans.enumerate() {
        let mut misses = 0u64;
        for (j, &dj) in ds.iter().enumerate() {
            let orig = ft.load_bits(ws, j);
            let bits = ft.round_bits(step::<SCALE>(ft.bits_to_f32(orig), dj));
            ft.store_bits(os, j, bits);
            if record {
                let back = ft.round_bits(unstep::<SCALE>(ft.bits_to_f32(bits), dj));
                misses |= ((back != orig) as u64) << j;
            }
        }
        while misses != 0 {
            let j = misses.trailing_zeros() as usize;
            fix.index.push(base_index + (c * SPAN + j) as u64);
            fix.bits.push(ft.load_bits(ws, j));
            misses &= misses - 1;
        }
    }
    for (j, &dj) in d.iter().enumerate().skip(full) {
        let orig = ft.load_bits(w, j);
        let bits = ft.round_bits(step::<SCALE>(ft.bits_to_f32(orig), dj));
        ft.store_bits(o, j, bits);
        if record && ft.round_bits(unstep::<SCALE>(ft.bits_to_f32(bits), dj)) != orig {
            fix.index.push(base_index + j as u64);
            fix.bits.push(orig);
        }
    }
}

/// (the block's rows of `left`, `right`, scaling) when this block goes to the fused bf16 LoRA
/// kernel: one LoRA term without DoRA, bf16 W, a full block of rows, whole 32-column tiles and
/// a CPU with AVX-512 BF16.
fn fused_lora(
    p: &Prepared,
    ft: FloatType,
    first_row: usize,
    nrows: usize,
) -> Option<(&[f32], &[f32], f32)> {
    let fits = p.single() == Some(false)
        && nrows == half16::FUSED_ROWS
        && p.cols.is_multiple_of(32)
        && half16::available(ft);
    match p.terms.first().map(|t| &t.delta) {
        Some(Delta::LowRank { p: prod, scaling }) if fits => {
            let r = prod.r;
            let left = &prod.left[first_row * r..(first_row + nrows) * r];
            Some((left, &prod.right, *scaling))
        }
        _ => None,
    }
}

multiversion! {
    /// Merges one block of rows: W' = round(adapter steps in order on float(W)); with `record`,
    /// replays the unmerge and notes the elements that would not come back.
    pub fn merge_block(
        p: &Prepared,
        first_row: usize,
        inp: &[u8],
        out: &mut [u8],
        record: bool,
        scratch: &mut Scratch,
        fix: &mut Fixups,
    ) => merge_block_any
}

#[inline(always)]
fn merge_block_any(
    p: &Prepared,
    first_row: usize,
    inp: &[u8],
    out: &mut [u8],
    record: bool,
    scratch: &mut Scratch,
    fix: &mut Fixups,
) {
    match p.ft {
        FloatType::BF16 => merge_block_t(
            FloatType::BF16,
            p,
            first_row,
            inp,
            out,
            record,
            scratch,
            fix,
        ),
        FloatType::F16 => {
            merge_block_t(FloatType::F16, p, first_row, inp, out, record, scratch, fix)
        }
        FloatType::F32 => {
            merge_block_t(FloatType::F32, p, first_row, inp, out, record, scratch, fix)
        }
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn merge_block_t(
    ft: FloatType,
    p: &Prepared,
    first_row: usize,
    inp: &[u8],
    out: &mut [u8],
    record: bool,
    scratch: &mut Scratch,
    fix: &mut Fixups,
) {
    let cols = p.cols;
    let row_bytes = cols * ft.size();
    let nrows = inp.len() / row_bytes;
    let single = p.single();
    let fast16 = half16::available(ft);
    if let Some((left, right, scaling)) = fused_lora(p, ft, first_row, nrows) {
        let (at, masks) = ((first_row * cols) as u64, &mut scratch.masks);
        if half16::merge_lora_block(ft, left, right, scaling, inp, out, record, at, fix, masks) {
            return;
        }
    }
    deltas(p, first_row, nrows, scratch);
    let Scratch { acc, deltas, .. } = scratch;
    // Row factors go to the sidecar from here; column factors were fixed before the merge.
    let n_dora = if p.dora_columns { 0 } else { p.n_dora() };
    let mut factors = [[0f32; ROW_BLOCK]; MAX_DORA_TERMS];
    for rr in 0..nrows {
        let w = &inp[rr * row_bytes..(rr + 1) * row_bytes];
        let o = &mut out[rr * row_bytes..(rr + 1) * row_bytes];
        if let Some(scale) = single {
            let (d, at) = (
                &deltas[delta_row(cols, 0, rr)],
                ((first_row + rr) * cols) as u64,
            );
            match (scale, fast16) {
                (true, true) => half16::merge_row::<true>(ft, w, d, o, record, at, fix),
                (false, true) => half16::merge_row::<false>(ft, w, d, o, record, at, fix),
                (true, false) => merge_row_single::<true>(ft, w, d, o, record, at, fix),
                (false, false) => merge_row_single::<false>(ft, w, d, o, record, at, fix),
            }
            continue;
        }
        decode(ft, w, acc);
        apply_terms(p, deltas, rr, first_row + rr, acc, &mut factors);
        encode(ft, acc, o);
        if record {
            decode(ft, o, acc);
            undo_terms(p, deltas, rr, acc, |di| factors[di][rr]);
            record_mismatches(ft, acc, w, ((first_row + rr) * cols) as u64, fix);
        }
    }
    for f in &factors[..n_dora] {
        fix.dora.extend_from_slice(&f[..nrows]);
    }
}

multiversion! {
    /// Unmerges one block of rows: W = round(adapter steps undone in reverse on float(W')).
    /// `dora` holds the sidecar's factors as (n_dora, rows).
    pub fn unmerge_block(
        p: &Prepared,
        first_row: usize,
        inp: &[u8],
        out: &mut [u8],
        dora: &[f32],
        scratch: &mut Scratch,
    ) => unmerge_block_any
}

#[inline(always)]
fn unmerge_block_any(
    p: &Prepared,
    first_row: usize,
    inp: &[u8],
    out: &mut [u8],
    dora: &[f32],
    scratch: &mut Scratch,
) {
    let ft = p.ft;
    let row_bytes = p.cols * ft.size();
    let nrows = inp.len() / row_bytes;
    if let Some((left, right, scaling)) = fused_lora(p, ft, first_row, nrows) {
        if half16::undo_lora_block(ft, left, right, scaling, inp, out) {
            return;
        }
    }
    deltas(p, first_row, nrows, scratch);
    let Scratch { acc, deltas, .. } = scratch;
    if let Some(scale) = p.single() {
        let d = &deltas[..nrows * p.cols];
        match (ft, scale) {
            (_, false) if half16::available(ft) => half16::undo_row::<false>(ft, inp, d, out),
            (_, true) if half16::available(ft) => half16::undo_row::<true>(ft, inp, d, out),
            (FloatType::BF16, false) => undo_single::<false>(FloatType::BF16, inp, d, out),
            (FloatType::F16, false) => undo_single::<false>(FloatType::F16, inp, d, out),
            (FloatType::F32, false) => undo_single::<false>(FloatType::F32, inp, d, out),
            (FloatType::BF16, true) => undo_single::<true>(FloatType::BF16, inp, d, out),
            (FloatType::F16, true) => undo_single::<true>(FloatType::F16, inp, d, out),
            (FloatType::F32, true) => undo_single::<true>(FloatType::F32, inp, d, out),
        }
        return;
    }
    for rr in 0..nrows {
        let w = &inp[rr * row_bytes..(rr + 1) * row_bytes];
        let o = &mut out[rr * row_bytes..(rr + 1) * row_bytes];
        match ft {
            FloatType::BF16 => decode(FloatType::BF16, w, acc),
            FloatType::F16 => decode(FloatType::F16, w, acc),
            FloatType::F32 => decode(FloatType::F32, w, acc),
        }
        undo_terms(p, deltas, rr, acc, |di| dora[di * p.rows + first_row + rr]);
        match ft {
            FloatType::BF16 => encode(FloatType::BF16, acc, o),
            FloatType::F16 => encode(FloatType::F16, acc, o),
            FloatType::F32 => encode(FloatType::F32, acc, o),
        }
    }
}

/// `out = round(unstep(float(w), d))` element by element, in one pass.
#[inline(always)]
pub(super) fn undo_single<const SCALE: bool>(ft: FloatType, w: &[u8], d: &[f32], out: &mut [u8]) {
    let size = ft.size();
    for ((ws, os), &dj) in w.chunks_exact(size).zip(out.chunks_exact_mut(size)).zip(d) {
        let bits = ft.round_bits(unstep::<SCALE>(ft.bits_to_f32(ft.load_bits(ws, 0)), dj));
        ft.store_bits(os, 0, bits);
    }
}
