//! Row-wise int8 quantisation in the LLM.int8() weight format (shared/REFERENCE.md section 4):
//! per output row `SCB = max|W_row|` (fp32) and `CB = round(W * (127 / SCB))` (ties to even),
//! where `127 / SCB` is computed as torch computes it for bitsandbytes: `(1 / SCB) * 127` in fp32.

use rayon::prelude::*;

use super::{as_elements, as_elements_mut, Bf16, Element, F16};
use crate::{Error, Result};

/// bitsandbytes dequantises with this factor (its decimal, rounded to fp32) rather than dividing by 127.
#[allow(clippy::excessive_precision)]
const INV_127: f32 = 7.874_015_718_698_502e-3;

fn check_shape(what: &str, len: usize, rows: usize, cols: usize) -> Result<()> {
    match rows.checked_mul(cols) {
        Some(n) if n == len => Ok(()),
        _ => Err(Error::invalid_argument(format!(
            "{what} has {len} elements, expected rows * cols = {rows} * {cols}"
        ))),
    }
}

fn quantize_rows<T: Element>(input: &[T], rows: usize, cols: usize) -> Result<(Vec<i8>, Vec<f32>)> {
    check_shape("input", input.len(), rows, cols)?;
    let mut cb = vec![0i8; input.len()];
    let mut scb = vec![0f32; rows];
    if cols == 0 {
        return Ok((cb, scb));
    }
    let bad_row = cb
        .par_chunks_mut(cols)
        .zip(input.par_chunks(cols))
        .zip(scb.par_iter_mut())
        .enumerate()
        .filter_map(|(r, ((out, row), stat))| {
            let max_bits = row.iter().fold(0u32, |m, x| m.max(x.abs_bits()));
            if max_bits >= 0x7f80_0000 {
                return Some(r);
            }
            let absmax = f32::from_bits(max_bits);
            *stat = absmax;
            if absmax == 0.0 {
                // bitsandbytes' 0 * (127 / 0) is NaN, which its int8 cast turns into 0.
                out.fill(0);
                return None;
            }
            // torch evaluates bitsandbytes' `127.0 / SCB` as `reciprocal(SCB) * 127`.
            let scale = (1.0 / absmax) * 127.0;
            for (o, x) in out.iter_mut().zip(row) {
                *o = (x.to_f32() * scale).round_ties_even() as i8;
            }
            None
        })
        .min();
    match bad_row {
        Some(r) => Err(Error::invalid_argument(format!(
            "input row {r} holds NaN or Inf; int8 quantisation needs finite values"
        ))),
        None => Ok((cb, scb)),
    }
}

pub(crate) fn dequantize_rows<T: Element>(
    cb: &[i8],
    scb: &[f32],
    rows: usize,
    cols: usize,
    out: &mut [T],
) -> Result<()> {
    check_shape("CB", cb.len(), rows, cols)?;
    check_shape("output", out.len(), rows, cols)?;
    if scb.len() != rows {
        return Err(Error::invalid_argument(format!(
            "SCB has {} elements, expected one per row ({rows})",
            scb.len()
        )));
    }
    if cols == 0 {
        return Ok(());
    }
    out.par_chunks_mut(cols)
        .zip(cb.par_chunks(cols))
        .zip(scb.par_iter())
        .for_each(|((o, c), &s)| {
            for (o, &c) in o.iter_mut().zip(c) {
                *o = T::from_f32(c as f32 * s * INV_127);
            }
        });
    Ok(())
}

/// Quantises a row-major (rows, cols) fp32 matrix: returns CB (int8, same layout) and SCB (one per row).
pub fn quantize_int8_rows_f32(
    input: &[f32],
    rows: usize,
    cols: usize,
) -> Result<(Vec<i8>, Vec<f32>)> {
    quantize_rows(input, rows, cols)
}

/// `quantize_int8_rows_f32` for bfloat16 input given as bit patterns.
pub fn quantize_int8_rows_bf16(
    input: &[u16],
    rows: usize,
    cols: usize,
) -> Result<(Vec<i8>, Vec<f32>)> {
    quantize_rows(as_elements::<Bf16>(input), rows, cols)
}

/// `quantize_int8_rows_f32` for float16 input given as bit patterns (bitsandbytes converts
/// weights to float16 before quantising, so this is the form that reproduces its bytes).
pub fn quantize_int8_rows_f16(
    input: &[u16],
    rows: usize,
    cols: usize,
) -> Result<(Vec<i8>, Vec<f32>)> {
    quantize_rows(as_elements::<F16>(input), rows, cols)
}

/// Writes `CB * SCB / 127` (fp32, as bitsandbytes computes it) into `out`.
pub fn dequantize_int8_rows_f32(
    cb: &[i8],
    scb: &[f32],
    rows: usize,
    cols: usize,
    out: &mut [f32],
) -> Result<()> {
    dequantize_rows(cb, scb, rows, cols, out)
}

/// `dequantize_int8_rows_f32` rounded to bfloat16, written as bit patterns.
pub fn dequantize_int8_rows_bf16(
    cb: &[i8],
    scb: &[f32],
    rows: usize,
    cols: usize,
    out: &mut [u16],
) -> Result<()> {
    dequantize_rows(cb, scb, rows, cols, as_elements_mut::<Bf16>(out))
}

/// `dequantize_int8_rows_f32` rounded to float16, written as bit patterns.
pub fn dequantize_int8_rows_f16(
    cb: &[i8],
    scb: &[f32],
    rows: usize,
    cols: usize,
    out: &mut [u16],
) -> Result<()> {
    dequantize_rows(cb, scb, rows, cols, as_elements_mut::<F16>(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_scale_by_their_absmax_and_round_ties_to_even() {
        let x = [
            254.0, 1.0, 3.0, -254.0, 0.0, 0.0, 0.0, 0.0, 2.0, -1.0, 0.5, 0.25,
        ];
        let (cb, scb) = quantize_int8_rows_f32(&x, 3, 4).unwrap();
        assert_eq!(scb, vec![254.0, 0.0, 2.0]);
        let scale = (1.0f32 / 254.0) * 127.0;
        let expect: Vec<i8> = x[..4]
            .iter()
            .map(|v| (v * scale).round_ties_even() as i8)
            .collect();
        assert_eq!(&cb[..4], &expect[..]);
        assert_eq!((2.5f32).round_ties_even(), 2.0, "ties go to even");
        assert_eq!(
            &cb[4..8],
            &[0, 0, 0, 0],
            "an all-zero row quantises to zeros"
        );
        assert_eq!(&cb[8..], &[127, -64, 32, 16]);
        let mut out = vec![0f32; 12];
        dequantize_int8_rows_f32(&cb, &scb, 3, 4, &mut out).unwrap();
        assert_eq!(out[0], 127.0 * 254.0 * INV_127);
        assert_eq!(&out[4..8], &[0.0; 4]);
        for (a, b) in x.iter().zip(&out) {
            assert!((a - b).abs() <= 254.0 / 127.0);
        }
    }

    #[test]
    fn sixteen_bit_forms_agree_with_fp32() {
        let x: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.125)
            .collect();
        let bits: Vec<u16> = x.iter().map(|&v| Bf16::from_f32(v).0).collect();
        assert_eq!(
            quantize_int8_rows_bf16(&bits, 8, 8).unwrap(),
            quantize_int8_rows_f32(&x, 8, 8).unwrap()
        );
        let bits: Vec<u16> = x.iter().map(|&v| F16::from_f32(v).0).collect();
        let (cb, scb) = quantize_int8_rows_f16(&bits, 8, 8).unwrap();
        assert_eq!(
            (cb.clone(), scb.clone()),
            quantize_int8_rows_f32(&x, 8, 8).unwrap()
        );
        let mut f = vec![0f32; 64];
        let mut b = vec![0u16; 64];
        dequantize_int8_rows_f32(&cb, &scb, 8, 8, &mut f).unwrap();
        dequantize_int8_rows_bf16(&cb, &scb, 8, 8, &mut b).unwrap();
        assert!(f.iter().zip(&b).all(|(f, b)| Bf16::from_f32(*f).0 == *b));
    }

    #[test]
    fn bad_input_gets_a_clear_error() {
        let err = quantize_int8_rows_f32(&[1.0, f32::NAN, 2.0, 3.0], 2, 2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("row 0"), "{err}");
        assert!(quantize_int8_rows_f32(&[1.0; 5], 2, 2)
            .unwrap_err()
            .to_string()
            .contains("rows * cols"));
        let mut out = [0f32; 4];
        assert!(dequantize_int8_rows_f32(&[1; 4], &[1.0], 2, 2, &mut out)
            .unwrap_err()
            .to_string()
            .contains("SCB"));
    }
}
