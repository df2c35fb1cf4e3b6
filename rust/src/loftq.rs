//! LoftQ initialisation: alternate quantising the weight and fitting a rank-r correction to the
//! quantisation residual, so that `deq(Q) + scaling * B @ A` stays close to the original weight.
//!
//! The loop (REFERENCE.md section 6) is
//! `res = W; repeat T times { D = deq(quant(res)); (U, S, V) = rank-r SVD(W - D); res = W - U S V^T }`.
//! Unlike PEFT, the factors are divided by the LoRA scaling: `B = U sqrt(S / scaling)`,
//! `A = sqrt(S / scaling) V^T`, so the adapter's effective delta `scaling * B @ A` is what
//! approximates the residual (PEFT issue #1982).
//!
//! The rank-r SVD is randomised by default (a range finder with oversampling and power iterations,
//! re-orthonormalised by QR and kept as a block Krylov basis, then a small exact SVD), with an exact
//! full-SVD mode as the reference. All dense algebra goes through faer, in parallel.

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatMut, MatRef, Par};
use rayon::prelude::*;

use crate::quant::{self, FourBitType};
use crate::{Error, Result};

/// How the rank-r SVD of each residual is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SvdMode {
    /// Randomised block Krylov iteration from a start block of `rank + oversample` vectors with
    /// `power_iters` applications of `R R^T`. From the second LoftQ iteration on, the start block
    /// holds the previous right singular vectors, which the new residual shares to a large degree.
    /// Falls back to the exact SVD when the Krylov basis would span the smaller dimension.
    Randomized {
        oversample: usize,
        power_iters: usize,
        seed: u64,
    },
    /// Full thin SVD of the residual: the reference, much slower on large matrices.
    Exact,
}

impl SvdMode {
    /// The randomised mode with the settings the benchmarks validate against [`SvdMode::Exact`].
    pub const fn fast() -> Self {
        SvdMode::Randomized {
            oversample: 16,
            power_iters: 2,
            seed: 0x5eed_1f7a,
        }
    }
}

impl Default for SvdMode {
    fn default() -> Self {
        Self::fast()
    }
}

/// The outcome of [`loftq_init`], every matrix row-major.
#[derive(Clone, Debug)]
pub struct LoftqResult {
    /// `deq(Q)` of the final quantisation, `rows * cols`: what the quantised base layer holds.
    pub dequantized: Vec<f32>,
    /// LoRA A, `rank * cols`.
    pub lora_a: Vec<f32>,
    /// LoRA B, `rows * rank`.
    pub lora_b: Vec<f32>,
    /// `||W - deq(Q) - scaling * B @ A||_F / ||W||_F`.
    pub rel_error: f32,
}

/// The quantise-then-dequantise round trip the loop runs on each iteration: reads the matrix to
/// quantise (row-major, `rows * cols`) and writes `deq(quant(input))` into the output slice.
pub type QuantRoundtrip<'a> = dyn Fn(&[f32], &mut [f32]) -> Result<()> + Sync + 'a;

/// LoftQ-initialise one weight matrix `w` (row-major `rows x cols`, i.e. `out_features x in_features`).
///
/// `iters` is LoftQ's T (PEFT's `loftq_iter`), `scaling` the LoRA scaling of the adapter the factors
/// are for, `quant_roundtrip` the base layer's quantiser (see [`QuantRoundtrip`]).
#[allow(clippy::too_many_arguments)]
pub fn loftq_init(
    w: &[f32],
    rows: usize,
    cols: usize,
    rank: usize,
    iters: usize,
    scaling: f32,
    svd: SvdMode,
    quant_roundtrip: &QuantRoundtrip<'_>,
) -> Result<LoftqResult> {
    validate(rows, cols, w.len(), rank, iters, scaling)?;
    let w_norm = frobenius_norm(w);
    if !w_norm.is_finite() {
        // Only a NaN or an infinity makes the f64 sum of f32 squares non-finite.
        let i = w.iter().position(|x| !x.is_finite()).unwrap_or_default();
        return Err(Error::invalid_argument(format!(
            "LoftQ: the weight holds a non-finite value ({}) at row {}, column {}",
            w[i],
            i / cols,
            i % cols
        )));
    }
    if w_norm == 0.0 {
        return Err(Error::invalid_argument(format!(
            "LoftQ: the {rows}x{cols} weight is all zeros; there is nothing to approximate"
        )));
    }

    let len = rows * cols;
    let mut res = w.to_vec();
    let mut deq = vec![0.0f32; len];
    let mut lora_a = vec![0.0f32; rank * cols];
    let mut lora_b = vec![0.0f32; rows * rank];
    let mut right_vectors: Option<Mat<f32>> = None;
    let mut rel_error = f32::NAN;

    for t in 0..iters {
        quant_roundtrip(&res, &mut deq)?;
        res.par_chunks_mut(CHUNK)
            .zip(w.par_chunks(CHUNK).zip(deq.par_chunks(CHUNK)))
            .for_each(|(r, (w, d))| {
                r.iter_mut()
                    .zip(w.iter().zip(d))
                    .for_each(|(r, (w, d))| *r = w - d)
            });

        let residual = MatRef::from_row_major_slice(&res, rows, cols);
        let factors = match svd {
            SvdMode::Exact => exact_svd(residual, rank)?,
            SvdMode::Randomized {
                oversample,
                power_iters,
                seed,
            } => randomized_svd(
                residual,
                rank,
                oversample,
                power_iters,
                seed.wrapping_add(t as u64),
                right_vectors.as_ref().map(|v| v.as_ref()),
            )?,
        };
        factors.write_lora(scaling, &mut lora_a, &mut lora_b);

        let last = t + 1 == iters;
        if !last {
            // The next quantisation sees W minus the correction found so far.
            res.copy_from_slice(w);
        }
        // On the last iteration this leaves W - deq(Q) - scaling * B @ A, whose norm is the error.
        matmul(
            MatMut::from_row_major_slice_mut(&mut res, rows, cols),
            Accum::Add,
            MatRef::from_row_major_slice(&lora_b, rows, rank),
            MatRef::from_row_major_slice(&lora_a, rank, cols),
            -scaling,
            Par::rayon(0),
        );
        if last {
            rel_error = (frobenius_norm(&res) / w_norm) as f32;
        }
        right_vectors = Some(factors.v);
    }

    Ok(LoftqResult {
        dequantized: deq,
        lora_a,
        lora_b,
        rel_error,
    })
}

/// The base layer's quantiser, with the round trip [`loftq_init`] runs on each iteration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoftqQuant {
    /// bitsandbytes' blockwise 4-bit NF4 / FP4 without double quantisation, as PEFT's LoftQ uses.
    FourBit { kind: FourBitType, blocksize: usize },
    /// LLM.int8's row-wise absmax int8 (what a Linear8bit base layer stores).
    Int8Rows,
}

impl LoftqQuant {
    /// The quantiser for `bits` (LoftQConfig's `loftq_bits`): 4 uses `quant_type` ("nf4" / "fp4") and
    /// `blocksize`; 8 is row-wise int8, which has neither.
    pub fn from_bits(bits: u32, quant_type: &str, blocksize: usize) -> Result<Self> {
        match bits {
            4 => Ok(LoftqQuant::FourBit {
                kind: FourBitType::from_name(quant_type)?,
                blocksize,
            }),
            8 => Ok(LoftqQuant::Int8Rows),
            other => Err(Error::invalid_argument(format!(
                "LoftQ: loftq_bits must be 4 (NF4 / FP4) or 8 (int8), got {other}"
            ))),
        }
    }

    /// `out = deq(quant(input))` for a row-major `rows x cols` matrix.
    fn roundtrip(self, input: &[f32], rows: usize, cols: usize, out: &mut [f32]) -> Result<()> {
        match self {
            LoftqQuant::FourBit { kind, blocksize } => {
                let (packed, absmax) = quant::quantize_4bit_f32(input, blocksize, kind)?;
                quant::dequantize_4bit_f32(&packed, &absmax, input.len(), blocksize, kind, out)
            }
            LoftqQuant::Int8Rows => {
                let (cb, scb) = quant::quantize_int8_rows_f32(input, rows, cols)?;
                quant::dequantize_int8_rows_f32(&cb, &scb, rows, cols, out)
            }
        }
    }
}

/// [`loftq_init`] with one of oxpeft's own quantisers.
#[allow(clippy::too_many_arguments)]
pub fn loftq_init_quantized(
    w: &[f32],
    rows: usize,
    cols: usize,
    rank: usize,
    iters: usize,
    scaling: f32,
    svd: SvdMode,
    quant: LoftqQuant,
) -> Result<LoftqResult> {
    let roundtrip = |input: &[f32], out: &mut [f32]| quant.roundtrip(input, rows, cols, out);
    loftq_init(w, rows, cols, rank, iters, scaling, svd, &roundtrip)
}

/// LoftQ's SVD step for a base that is already quantised and stays so (PEFT's
/// `replace_lora_weights_loftq`): fit `scaling * B @ A` to `W - dequantized`. With the quantisation
/// fixed, further iterations would change nothing, so this is one iteration of [`loftq_init`].
pub fn loftq_fit_fixed_base(
    w: &[f32],
    dequantized: &[f32],
    rows: usize,
    cols: usize,
    rank: usize,
    scaling: f32,
    svd: SvdMode,
) -> Result<LoftqResult> {
    if dequantized.len() != w.len() {
        return Err(Error::invalid_argument(format!(
            "LoftQ: the dequantized base has {} elements, the weight {}",
            dequantized.len(),
            w.len()
        )));
    }
    if !frobenius_norm(dequantized).is_finite() {
        return Err(Error::invalid_argument(
            "LoftQ: the dequantized base holds a non-finite value",
        ));
    }
    let fixed = |_: &[f32], out: &mut [f32]| {
        out.copy_from_slice(dequantized);
        Ok(())
    };
    loftq_init(w, rows, cols, rank, 1, scaling, svd, &fixed)
}

/// Elements per rayon task in elementwise passes: big enough to amortise scheduling.
const CHUNK: usize = 1 << 16;

fn validate(
    rows: usize,
    cols: usize,
    len: usize,
    rank: usize,
    iters: usize,
    scaling: f32,
) -> Result<()> {
    let bad = |reason: String| Err(Error::invalid_argument(format!("LoftQ: {reason}")));
    if rows == 0 || cols == 0 {
        return bad(format!(
            "the weight must be a non-empty matrix, got {rows}x{cols}"
        ));
    }
    if rows.checked_mul(cols) != Some(len) {
        return bad(format!("the weight has {len} elements, not {rows}x{cols}"));
    }
    if rank == 0 {
        return bad("rank must be at least 1".into());
    }
    if rank > rows.min(cols) {
        return bad(format!(
            "rank {rank} is larger than min(rows, cols) = {} of the {rows}x{cols} weight",
            rows.min(cols)
        ));
    }
    if iters == 0 {
        return bad("loftq_iter must be at least 1".into());
    }
    if !(scaling.is_finite() && scaling > 0.0) {
        return bad(format!(
            "the LoRA scaling must be a positive finite number, got {scaling}"
        ));
    }
    Ok(())
}

fn frobenius_norm(x: &[f32]) -> f64 {
    x.par_chunks(CHUNK)
        .map(|c| c.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>())
        .sum::<f64>()
        .sqrt()
}

/// A rank-r factorisation `U diag(S) V^T` of a residual.
struct LowRank {
    /// `rows x r`, orthonormal columns.
    u: Mat<f32>,
    /// `r` singular values, non-increasing.
    s: Vec<f32>,
    /// `cols x r`, orthonormal columns.
    v: Mat<f32>,
}

impl LowRank {
    /// Split the singular values evenly between the factors, divided by the LoRA scaling:
    /// `B = U sqrt(S / scaling)` (`rows x r`), `A = sqrt(S / scaling) V^T` (`r x cols`), row-major.
    fn write_lora(&self, scaling: f32, lora_a: &mut [f32], lora_b: &mut [f32]) {
        let rank = self.s.len();
        let gains: Vec<f32> = self.s.iter().map(|&s| (s / scaling).sqrt()).collect();
        lora_b
            .par_chunks_mut(rank)
            .enumerate()
            .for_each(|(i, row)| {
                for (j, b) in row.iter_mut().enumerate() {
                    *b = self.u[(i, j)] * gains[j];
                }
            });
        let cols = self.v.nrows();
        lora_a
            .par_chunks_mut(cols)
            .zip(gains.par_iter())
            .enumerate()
            .for_each(|(j, (row, &g))| {
                let v = self.v.col(j);
                for (a, &x) in row.iter_mut().zip(v.iter()) {
                    *a = x * g;
                }
            });
    }
}

fn svd_failed(what: &str) -> Error {
    Error::invalid_argument(format!("LoftQ: the SVD of the {what} did not converge"))
}

fn exact_svd(residual: MatRef<'_, f32>, rank: usize) -> Result<LowRank> {
    let svd = residual
        .thin_svd()
        .map_err(|_| svd_failed("quantisation residual"))?;
    Ok(LowRank {
        u: svd.U().subcols(0, rank).to_owned(),
        s: svd.S().column_vector().iter().take(rank).copied().collect(),
        v: svd.V().subcols(0, rank).to_owned(),
    })
}

/// Orthonormal basis of the column space of a tall `y` (thin Q of its QR factorisation).
fn orthonormalize(y: &Mat<f32>) -> Mat<f32> {
    y.qr().compute_thin_Q()
}

/// `lhs * rhs` into a new matrix, in parallel.
fn product(lhs: MatRef<'_, f32>, rhs: MatRef<'_, f32>) -> Mat<f32> {
    let mut out = Mat::zeros(lhs.nrows(), rhs.ncols());
    matmul(out.as_mut(), Accum::Replace, lhs, rhs, 1.0, Par::rayon(0));
    out
}

/// Rank-r SVD of `residual` (`m x n`) by randomised block Krylov iteration (Musco & Musco 2015,
/// "Randomized block Krylov methods for stronger and faster approximate SVD"): a start block of
/// `k = rank + oversample` vectors, `power_iters` applications of `R R^T` with a QR after every
/// product, and all the blocks kept. The Krylov basis captures the top singular directions of a
/// residual with a flat spectrum (quantisation noise) much better than the last block of plain
/// subspace iteration, for the same number of products with `R`. The top `rank` triplets come from
/// the exact SVD of the small `n x k (power_iters + 1)` projection `R^T Q`.
fn randomized_svd(
    residual: MatRef<'_, f32>,
    rank: usize,
    oversample: usize,
    power_iters: usize,
    seed: u64,
    warm_start: Option<MatRef<'_, f32>>,
) -> Result<LowRank> {
    let (m, n) = residual.shape();
    let k = rank + oversample;
    let basis_size = k * (power_iters + 1);
    if basis_size >= m.min(n) {
        // The Krylov basis would span the whole space: the exact SVD is as cheap and exact.
        return exact_svd(residual, rank);
    }

    let mut omega = gaussian_matrix(n, k, seed);
    if let Some(v) = warm_start {
        let carried = v.ncols().min(k);
        omega
            .as_mut()
            .subcols_mut(0, carried)
            .copy_from(v.subcols(0, carried));
    }

    let mut krylov = Mat::<f32>::zeros(m, basis_size);
    let mut block = orthonormalize(&product(residual, omega.as_ref()));
    krylov.as_mut().subcols_mut(0, k).copy_from(block.as_ref());
    for i in 1..=power_iters {
        let z = orthonormalize(&product(residual.transpose(), block.as_ref()));
        block = orthonormalize(&product(residual, z.as_ref()));
        krylov
            .as_mut()
            .subcols_mut(i * k, k)
            .copy_from(block.as_ref());
    }
    let q = orthonormalize(&krylov);
    // R ~ Q Q^T R = Q z^T with z = R^T Q; z = Uz Sz Vz^T gives R ~ (Q Vz) Sz Uz^T.
    let z = product(residual.transpose(), q.as_ref());
    let small = z.thin_svd().map_err(|_| svd_failed("projected residual"))?;
    Ok(LowRank {
        u: product(q.as_ref(), small.V().subcols(0, rank)),
        s: small
            .S()
            .column_vector()
            .iter()
            .take(rank)
            .copied()
            .collect(),
        v: small.U().subcols(0, rank).to_owned(),
    })
}

/// An `nrows x ncols` matrix of independent standard normal samples, reproducible from `seed`.
fn gaussian_matrix(nrows: usize, ncols: usize, seed: u64) -> Mat<f32> {
    let mut out = Mat::zeros(nrows, ncols);
    for j in 0..ncols {
        let mut state = seed ^ (j as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut col = out.as_mut().col_mut(j);
        for i in (0..nrows).step_by(2) {
            let (z0, z1) = box_muller(splitmix64(&mut state), splitmix64(&mut state));
            col[i] = z0;
            if i + 1 < nrows {
                col[i + 1] = z1;
            }
        }
    }
    out
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Two independent N(0, 1) samples from two uniform 64-bit words.
fn box_muller(a: u64, b: u64) -> (f32, f32) {
    // 53 random bits each; u1 in (0, 1] so that ln(u1) is finite.
    let u1 = ((a >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
    let u2 = (b >> 11) as f64 / (1u64 << 53) as f64;
    let radius = (-2.0 * u1.ln()).sqrt();
    let angle = std::f64::consts::TAU * u2;
    ((radius * angle.cos()) as f32, (radius * angle.sin()) as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in quantiser for these tests: symmetric uniform rounding to 15 levels per block of
    /// 32 values, scaled by the block's absmax. Coarse, like a real 4-bit quantiser.
    fn uniform_roundtrip(input: &[f32], out: &mut [f32]) -> Result<()> {
        for (src, dst) in input.chunks(32).zip(out.chunks_mut(32)) {
            let absmax = src.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            let step = if absmax > 0.0 { absmax / 7.0 } else { 1.0 };
            for (d, s) in dst.iter_mut().zip(src) {
                *d = (s / step).round() * step;
            }
        }
        Ok(())
    }

    /// Gaussian noise plus a rank-`lr` part with a decaying spectrum, like a pretrained weight.
    fn test_weight(rows: usize, cols: usize, lr: usize, seed: u64) -> Vec<f32> {
        noisy_low_rank(rows, cols, lr, 0.02, seed)
    }

    fn noisy_low_rank(rows: usize, cols: usize, lr: usize, noise_std: f32, seed: u64) -> Vec<f32> {
        let noise = gaussian_matrix(rows, cols, seed);
        let left = gaussian_matrix(rows, lr, seed + 1);
        let right = gaussian_matrix(lr, cols, seed + 2);
        let mut w = vec![0.0f32; rows * cols];
        for i in 0..rows {
            for j in 0..cols {
                let low: f32 = (0..lr)
                    .map(|l| left[(i, l)] * right[(l, j)] / (1.0 + l as f32))
                    .sum();
                w[i * cols + j] = noise_std * noise[(i, j)] + 0.01 * low;
            }
        }
        w
    }

    fn run(
        w: &[f32],
        rows: usize,
        cols: usize,
        rank: usize,
        iters: usize,
        svd: SvdMode,
    ) -> LoftqResult {
        loftq_init(w, rows, cols, rank, iters, 2.0, svd, &uniform_roundtrip).unwrap()
    }

    fn direct_error(
        w: &[f32],
        rows: usize,
        cols: usize,
        rank: usize,
        scaling: f32,
        r: &LoftqResult,
    ) -> f64 {
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for i in 0..rows {
            for j in 0..cols {
                let ba: f32 = (0..rank)
                    .map(|l| r.lora_b[i * rank + l] * r.lora_a[l * cols + j])
                    .sum();
                let e = w[i * cols + j] - r.dequantized[i * cols + j] - scaling * ba;
                num += f64::from(e) * f64::from(e);
                den += f64::from(w[i * cols + j]).powi(2);
            }
        }
        (num / den).sqrt()
    }

    #[test]
    fn shapes_and_reported_error_match_the_outputs() {
        // 64 rows > (rank + oversample) * 3 columns of the Krylov basis: the randomised path runs.
        let (rows, cols, rank) = (64, 160, 4);
        let w = test_weight(rows, cols, 8, 1);
        for svd in [SvdMode::fast(), SvdMode::Exact] {
            let r = run(&w, rows, cols, rank, 2, svd);
            assert_eq!(r.dequantized.len(), rows * cols);
            assert_eq!(r.lora_a.len(), rank * cols);
            assert_eq!(r.lora_b.len(), rows * rank);
            let direct = direct_error(&w, rows, cols, rank, 2.0, &r);
            assert!(
                (direct - f64::from(r.rel_error)).abs() < 1e-5 * direct.max(1.0),
                "{direct} vs {}",
                r.rel_error
            );
        }
    }

    #[test]
    fn dequantized_is_the_roundtrip_of_w_minus_the_correction() {
        let (rows, cols, rank) = (32, 64, 4);
        let w = test_weight(rows, cols, 4, 2);
        let once = run(&w, rows, cols, rank, 1, SvdMode::Exact);
        let mut plain = vec![0.0; rows * cols];
        uniform_roundtrip(&w, &mut plain).unwrap();
        assert_eq!(
            once.dequantized, plain,
            "with T = 1 the base is the plain quantisation of W"
        );
    }

    #[test]
    fn beats_plain_quantisation_and_improves_with_rank_and_iterations() {
        let (rows, cols) = (96, 128);
        let w = test_weight(rows, cols, 12, 3);
        let mut plain = vec![0.0; rows * cols];
        uniform_roundtrip(&w, &mut plain).unwrap();
        let diff: Vec<f32> = w.iter().zip(&plain).map(|(a, b)| a - b).collect();
        let plain_error = frobenius_norm(&diff) / frobenius_norm(&w);

        let err = |rank, iters| run(&w, rows, cols, rank, iters, SvdMode::fast()).rel_error as f64;
        let (r4t1, r16t1, r16t5) = (err(4, 1), err(16, 1), err(16, 5));
        assert!(r4t1 < plain_error, "{r4t1} !< {plain_error}");
        assert!(
            r16t1 < r4t1,
            "rank 16 ({r16t1}) should beat rank 4 ({r4t1})"
        );
        assert!(r16t5 < r16t1, "T=5 ({r16t5}) should beat T=1 ({r16t1})");
    }

    #[test]
    fn fast_svd_matches_exact() {
        let (rows, cols, rank) = (120, 90, 8);
        // The spectrum has a gap after the rank-8 part, so the leading singular triplets are well defined.
        let gapped = noisy_low_rank(rows, cols, rank, 0.002, 4);
        let r = MatRef::from_row_major_slice(&gapped, rows, cols);
        let exact = exact_svd(r, rank).unwrap();
        let fast = randomized_svd(r, rank, 16, 2, 7, None).unwrap();
        for (e, f) in exact.s.iter().zip(&fast.s) {
            assert!((e - f).abs() <= 1e-3 * e, "singular values {e} vs {f}");
        }
        // Same rank-r approximation: compare U S V^T elementwise.
        let approx = |f: &LowRank| {
            product(
                f.u.as_ref(),
                Mat::from_fn(rank, cols, |l, j| f.s[l] * f.v[(j, l)]).as_ref(),
            )
        };
        let (ae, af) = (approx(&exact), approx(&fast));
        let diff = Mat::from_fn(rows, cols, |i, j| ae[(i, j)] - af[(i, j)]);
        assert!(
            diff.norm_l2() <= 1e-3 * ae.norm_l2(),
            "{} vs {}",
            diff.norm_l2(),
            ae.norm_l2()
        );

        // The LoftQ residual is noise-like (no gap), where the captured energy, not the individual
        // triplets, is what the two modes must agree on.
        let w = test_weight(rows, cols, 10, 4);
        for iters in [1, 3] {
            let e = run(&w, rows, cols, rank, iters, SvdMode::Exact).rel_error;
            let f = run(&w, rows, cols, rank, iters, SvdMode::fast()).rel_error;
            assert!(
                (f - e).abs() <= 0.01 * e,
                "T={iters}: fast {f} vs exact {e}"
            );
        }
    }

    #[test]
    fn effective_delta_does_not_depend_on_scaling() {
        let (rows, cols, rank) = (40, 56, 5);
        let w = test_weight(rows, cols, 6, 5);
        let delta = |scaling: f32| {
            let r = loftq_init(
                &w,
                rows,
                cols,
                rank,
                2,
                scaling,
                SvdMode::Exact,
                &uniform_roundtrip,
            )
            .unwrap();
            let b = MatRef::from_row_major_slice(&r.lora_b, rows, rank);
            let a = MatRef::from_row_major_slice(&r.lora_a, rank, cols);
            let mut d = product(b, a);
            d *= faer::Scale(scaling);
            d
        };
        let (d1, d4) = (delta(1.0), delta(4.0));
        let diff = Mat::from_fn(rows, cols, |i, j| d1[(i, j)] - d4[(i, j)]);
        assert!(diff.norm_l2() <= 1e-5 * d1.norm_l2());
    }

    #[test]
    fn real_quantisers_nf4_fp4_int8() {
        let (rows, cols, rank) = (64, 128, 8);
        let w = test_weight(rows, cols, 8, 8);
        for (bits, quant_type) in [(4, "nf4"), (4, "fp4"), (8, "nf4")] {
            let q = LoftqQuant::from_bits(bits, quant_type, 64).unwrap();
            let mut plain = vec![0.0; rows * cols];
            q.roundtrip(&w, rows, cols, &mut plain).unwrap();
            let diff: Vec<f32> = w.iter().zip(&plain).map(|(a, b)| a - b).collect();
            let plain_error = frobenius_norm(&diff) / frobenius_norm(&w);

            let once =
                loftq_init_quantized(&w, rows, cols, rank, 1, 1.0, SvdMode::fast(), q).unwrap();
            assert_eq!(
                once.dequantized, plain,
                "{bits}-bit {quant_type}: T = 1 keeps the plain quantisation"
            );
            let direct = direct_error(&w, rows, cols, rank, 1.0, &once);
            assert!(
                (direct - f64::from(once.rel_error)).abs() < 1e-5,
                "{direct} vs {}",
                once.rel_error
            );
            assert!(
                direct < plain_error,
                "{bits}-bit {quant_type}: {direct} !< {plain_error}"
            );
            let five =
                loftq_init_quantized(&w, rows, cols, rank, 5, 1.0, SvdMode::fast(), q).unwrap();
            assert!(
                five.rel_error < once.rel_error,
                "{bits}-bit {quant_type}: T=5 {} !< T=1 {}",
                five.rel_error,
                once.rel_error
            );
        }
    }

    #[test]
    fn fixed_base_fits_the_residual_of_that_base() {
        let (rows, cols, rank) = (48, 64, 6);
        let w = test_weight(rows, cols, 6, 9);
        let mut base = vec![0.0; rows * cols];
        uniform_roundtrip(&w, &mut base).unwrap();
        let fixed = loftq_fit_fixed_base(&w, &base, rows, cols, rank, 2.0, SvdMode::Exact).unwrap();
        let looped = run(&w, rows, cols, rank, 1, SvdMode::Exact);
        assert_eq!(fixed.dequantized, base);
        assert_eq!(fixed.rel_error, looped.rel_error);
        assert_eq!(fixed.lora_a, looped.lora_a);
        let err = loftq_fit_fixed_base(&w, &base[1..], rows, cols, rank, 2.0, SvdMode::Exact)
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("dequantized base has 3071 elements, the weight 3072"),
            "{err}"
        );
        base[7] = f32::INFINITY;
        let err =
            loftq_fit_fixed_base(&w, &base, rows, cols, rank, 2.0, SvdMode::Exact).unwrap_err();
        assert!(err.to_string().contains("non-finite"), "{err}");
    }

    #[test]
    fn rejects_bad_input_with_clear_errors() {
        let w = test_weight(8, 12, 2, 6);
        let q: &QuantRoundtrip<'_> = &uniform_roundtrip;
        let msg = |r: Result<LoftqResult>| match r {
            Err(Error::InvalidArgument(m)) => m,
            other => panic!("expected InvalidArgument, got {other:?}"),
        };
        assert!(msg(loftq_init(&w, 8, 12, 0, 1, 1.0, SvdMode::fast(), q))
            .contains("rank must be at least 1"));
        assert!(msg(loftq_init(&w, 8, 12, 9, 1, 1.0, SvdMode::fast(), q))
            .contains("rank 9 is larger than min(rows, cols) = 8"));
        assert!(msg(loftq_init(&w, 8, 12, 2, 0, 1.0, SvdMode::fast(), q)).contains("loftq_iter"));
        assert!(msg(loftq_init(&w, 8, 11, 2, 1, 1.0, SvdMode::fast(), q))
            .contains("96 elements, not 8x11"));
        assert!(msg(loftq_init(&w, 8, 12, 2, 1, 0.0, SvdMode::fast(), q)).contains("scaling"));
        let mut nan = w.clone();
        nan[2 * 12 + 5] = f32::NAN;
        assert!(msg(loftq_init(&nan, 8, 12, 2, 1, 1.0, SvdMode::fast(), q))
            .contains("NaN) at row 2, column 5"));
        assert!(msg(loftq_init(
            &vec![0.0; 96],
            8,
            12,
            2,
            1,
            1.0,
            SvdMode::fast(),
            q
        ))
        .contains("all zeros"));
        let bits = LoftqQuant::from_bits(3, "nf4", 64).unwrap_err().to_string();
        assert!(
            bits.contains("loftq_bits must be 4 (NF4 / FP4) or 8 (int8), got 3"),
            "{bits}"
        );
        assert!(LoftqQuant::from_bits(4, "int4", 64)
            .unwrap_err()
            .to_string()
            .contains("'int4'"));
        let blocksize = loftq_init_quantized(
            &w,
            8,
            12,
            2,
            1,
            1.0,
            SvdMode::fast(),
            LoftqQuant::from_bits(4, "nf4", 48).unwrap(),
        );
        assert!(
            matches!(blocksize, Err(Error::InvalidArgument(_))),
            "{blocksize:?}"
        );
        let failing = |_: &[f32], _: &mut [f32]| -> Result<()> {
            Err(Error::invalid_argument("quantiser says no"))
        };
        assert!(
            msg(loftq_init(&w, 8, 12, 2, 1, 1.0, SvdMode::fast(), &failing))
                .contains("quantiser says no")
        );
    }
}
