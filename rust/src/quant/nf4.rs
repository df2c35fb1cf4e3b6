//! Blockwise 4-bit quantisation (NF4 and FP4) and double quantisation of the block scales,
//! byte for byte in bitsandbytes' format (shared/REFERENCE.md section 3).
//!
//! Blocks of `blocksize` elements run over the flattened tensor; each block stores its absmax
//! (fp32) and one 4-bit code per element, two codes per byte with the even element in the high
//! nibble. A code is the nearest table value to `x / absmax`, ties going to the lower value,
//! which is the same as counting how many midpoints between neighbouring values lie below it.

use rayon::prelude::*;

use super::{as_elements, as_elements_mut, Bf16, Element, F16};
#[cfg(target_arch = "x86_64")]
use super::{avx512, same_kind, same_kind_mut, Kind};
use crate::{Error, Result};

/// bitsandbytes' NF4 table: quantiles of N(0, 1) scaled to [-1, 1], index = code. The decimals are
/// bitsandbytes' own; each rounds to the fp32 value it stores.
#[allow(clippy::excessive_precision)]
const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_433_208_465_58,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// FP4 (1 sign, 2 exponent, 1 mantissa bit) values by bit pattern, before division by 12. Code 8
/// (sign bit, zero magnitude) is +0.0 as in bitsandbytes, whose table spells it as the integer `-0`.
const FP4_UNSCALED: [f32; 16] = [
    0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0,
];

/// FP4 codes in ascending value order. +0 (code 0) and -0 (code 8) tie; bitsandbytes sorts code 0
/// first, so `x / absmax` in (-1/384, 0] gets code 0 and (0, 1/384] gets code 8.
const FP4_ASCENDING: [u8; 16] = [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3];

/// Blocksize of the second-level quantisation of absmax (bitsandbytes' `nested_blocksize`).
pub const NESTED_BLOCKSIZE: usize = 256;

const BLOCKSIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// Smallest divisor bitsandbytes allows for a block's scale (an all-zero block maps to code 0.0).
const MIN_SCALE: f32 = 1e-38;

/// Elements handed to one rayon task: big enough to amortise scheduling, small enough to balance.
const TASK_ELEMENTS: usize = 1 << 15;

/// The two 4-bit data types of bitsandbytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FourBitType {
    Nf4,
    Fp4,
}

impl FourBitType {
    /// The name bitsandbytes and transformers use (`"nf4"` / `"fp4"`).
    pub fn name(self) -> &'static str {
        match self {
            FourBitType::Nf4 => "nf4",
            FourBitType::Fp4 => "fp4",
        }
    }

    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "nf4" => Ok(FourBitType::Nf4),
            "fp4" => Ok(FourBitType::Fp4),
            other => Err(Error::invalid_argument(format!(
                "quant_type must be 'nf4' or 'fp4', got '{other}'"
            ))),
        }
    }

    /// The 16 values indexed by code (bitsandbytes' `quant_map`).
    pub fn code(self) -> [f32; 16] {
        match self {
            FourBitType::Nf4 => NF4_CODE,
            FourBitType::Fp4 => FP4_UNSCALED.map(|v| v / 12.0),
        }
    }
}

/// What a quantiser needs: the 15 midpoints in ascending order and the code at each rank.
struct Codebook {
    midpoints: [f32; 15],
    code_at_rank: [u8; 16],
}

impl Codebook {
    fn new(kind: FourBitType) -> Self {
        let values = kind.code();
        let code_at_rank: [u8; 16] = match kind {
            FourBitType::Nf4 => std::array::from_fn(|i| i as u8),
            FourBitType::Fp4 => FP4_ASCENDING,
        };
        let midpoints = std::array::from_fn(|i| {
            (values[code_at_rank[i] as usize] + values[code_at_rank[i + 1] as usize]) / 2.0
        });
        Codebook {
            midpoints,
            code_at_rank,
        }
    }

    #[inline(always)]
    fn rank(&self, normalised: f32) -> u8 {
        let mut rank = 0u8;
        for m in self.midpoints {
            rank += (normalised > m) as u8;
        }
        rank
    }
}

fn check_blocksize(blocksize: usize) -> Result<()> {
    if BLOCKSIZES.contains(&blocksize) {
        Ok(())
    } else {
        Err(Error::invalid_argument(format!(
            "blocksize must be one of {BLOCKSIZES:?} (bitsandbytes' 4-bit blocksizes), got {blocksize}"
        )))
    }
}

fn check_len(what: &str, got: usize, expected: usize) -> Result<()> {
    if got == expected {
        Ok(())
    } else {
        Err(Error::invalid_argument(format!(
            "{what} has {got} elements, expected {expected}"
        )))
    }
}

/// Blocks per rayon task, a whole number of blocks so that only the final task can end in a
/// short block (and, when the element count is odd, in a half-filled byte).
fn blocks_per_task(blocksize: usize) -> usize {
    (TASK_ELEMENTS / blocksize).max(1)
}

/// Quantises whole blocks; `input.len()` may end in the tensor's short last block.
///
/// Returns the index (within this slice) of the first block holding Inf or NaN, if any.
#[inline(always)]
fn quantize_blocks<T: Element>(
    input: &[T],
    packed: &mut [u8],
    absmax: &mut [f32],
    blocksize: usize,
    book: &Codebook,
    remap: bool,
) -> Option<usize> {
    let mut codes = [0u8; 4096];
    for (b, (block, am_out)) in input.chunks(blocksize).zip(absmax.iter_mut()).enumerate() {
        let mut max_bits = 0u32;
        for x in block {
            max_bits = max_bits.max(x.abs_bits());
        }
        if max_bits >= 0x7f80_0000 {
            return Some(b);
        }
        let am = f32::from_bits(max_bits);
        *am_out = am;
        let divisor = am.max(MIN_SCALE);
        let codes = &mut codes[..block.len()];
        if block.len() == blocksize {
            // bitsandbytes multiplies full blocks by the reciprocal ...
            let scale = 1.0 / divisor;
            for (c, x) in codes.iter_mut().zip(block) {
                *c = book.rank((x.to_f32() * scale).clamp(-1.0, 1.0));
            }
        } else {
            // ... and divides the short last block.
            for (c, x) in codes.iter_mut().zip(block) {
                *c = book.rank((x.to_f32() / divisor).clamp(-1.0, 1.0));
            }
        }
        if remap {
            for c in codes.iter_mut() {
                *c = book.code_at_rank[*c as usize];
            }
        }
        let out = &mut packed[b * blocksize / 2..];
        let pairs = codes.chunks_exact(2);
        let odd = pairs.remainder().first().copied();
        let mut written = 0;
        for (o, pair) in out.iter_mut().zip(pairs) {
            *o = (pair[0] << 4) | pair[1];
            written += 1;
        }
        if let Some(last) = odd {
            // The missing partner of an odd final element is quantised from 0.0, as bitsandbytes pads.
            let pad = book.code_at_rank[book.rank(0.0) as usize];
            out[written] = (last << 4) | pad;
        }
    }
    None
}

macro_rules! multiversion {
    ($(#[$meta:meta])* fn $name:ident<$t:ident>($($arg:ident: $ty:ty),*) -> $ret:ty => $body:ident) => {
        $(#[$meta])*
        fn $name<$t: Element>($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
                unsafe fn wide<$t: Element>($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2<$t: Element>($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512bw") && std::arch::is_x86_feature_detected!("avx512vl") {
                    // SAFETY: the CPU supports every feature the function was compiled for.
                    return unsafe { wide($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

multiversion! {
    /// `quantize_blocks` compiled for the widest vector unit the CPU has.
    fn quantize_blocks_portable<T>(input: &[T], packed: &mut [u8], absmax: &mut [f32], blocksize: usize, book: &Codebook, remap: bool) -> Option<usize> => quantize_blocks
}

/// `quantize_blocks` with full blocks of fp32 / bf16 input through the AVX-512 kernel.
#[cfg(target_arch = "x86_64")]
fn quantize_blocks_avx512<T: Element + avx512::Load16>(
    input: &[T],
    packed: &mut [u8],
    absmax: &mut [f32],
    blocksize: usize,
    book: &Codebook,
    remap: bool,
) -> Option<usize> {
    let mut midpoints = [0f32; 16];
    midpoints[..15].copy_from_slice(&book.midpoints);
    let code_at_rank = remap.then_some(&book.code_at_rank);
    let full = input.len() / blocksize;
    // Two passes, so that no block waits on its own absmax reduction: all scales first, then codes.
    for (b, block) in input.chunks_exact(blocksize).enumerate() {
        // SAFETY: the caller checked `available()`; blocksizes are multiples of 16.
        let max_bits = unsafe { avx512::max_abs_bits(block) };
        if max_bits >= 0x7f80_0000 {
            return Some(b);
        }
        absmax[b] = f32::from_bits(max_bits);
    }
    for (b, block) in input.chunks_exact(blocksize).enumerate() {
        let scale = 1.0 / absmax[b].max(MIN_SCALE);
        // SAFETY: as above; `packed` holds blocksize / 2 bytes per full block.
        unsafe {
            avx512::quantize_full_block(
                block,
                scale,
                &midpoints,
                code_at_rank,
                &mut packed[b * blocksize / 2..],
            )
        };
    }
    let tail = &input[full * blocksize..];
    if !tail.is_empty() {
        let bytes = &mut packed[full * blocksize / 2..];
        return quantize_blocks(tail, bytes, &mut absmax[full..], blocksize, book, remap)
            .map(|_| full);
    }
    None
}

fn quantize_blocks_dispatch<T: Element>(
    input: &[T],
    packed: &mut [u8],
    absmax: &mut [f32],
    blocksize: usize,
    book: &Codebook,
    remap: bool,
) -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    if avx512::available() {
        match T::KIND {
            Kind::F32 => {
                return quantize_blocks_avx512::<f32>(
                    same_kind(input),
                    packed,
                    absmax,
                    blocksize,
                    book,
                    remap,
                )
            }
            Kind::Bf16 => {
                return quantize_blocks_avx512::<Bf16>(
                    same_kind(input),
                    packed,
                    absmax,
                    blocksize,
                    book,
                    remap,
                )
            }
            Kind::F16 => {}
        }
    }
    quantize_blocks_portable(input, packed, absmax, blocksize, book, remap)
}

fn quantize_4bit_into<T: Element>(
    input: &[T],
    blocksize: usize,
    kind: FourBitType,
    packed: &mut [u8],
    absmax: &mut [f32],
) -> Result<()> {
    check_blocksize(blocksize)?;
    let n = input.len();
    check_len("packed output", packed.len(), n.div_ceil(2))?;
    check_len("absmax output", absmax.len(), n.div_ceil(blocksize))?;
    let book = Codebook::new(kind);
    let remap = kind == FourBitType::Fp4;
    let task_blocks = blocks_per_task(blocksize);
    let task_elems = task_blocks * blocksize;
    let bad = input
        .par_chunks(task_elems)
        .zip(packed.par_chunks_mut(task_elems / 2))
        .zip(absmax.par_chunks_mut(task_blocks))
        .enumerate()
        .filter_map(|(t, ((inp, pk), am))| {
            quantize_blocks_dispatch(inp, pk, am, blocksize, &book, remap)
                .map(|b| t * task_blocks + b)
        })
        .min();
    match bad {
        Some(block) => Err(Error::invalid_argument(format!(
            "input holds NaN or Inf in block {block} (elements {}..{}); 4-bit quantisation needs finite values",
            block * blocksize,
            ((block + 1) * blocksize).min(n)
        ))),
        None => Ok(()),
    }
}

fn quantize_4bit<T: Element>(
    input: &[T],
    blocksize: usize,
    kind: FourBitType,
) -> Result<(Vec<u8>, Vec<f32>)> {
    check_blocksize(blocksize)?;
    let mut packed = vec![0u8; input.len().div_ceil(2)];
    let mut absmax = vec![0f32; input.len().div_ceil(blocksize)];
    quantize_4bit_into(input, blocksize, kind, &mut packed, &mut absmax)?;
    Ok((packed, absmax))
}

#[inline(always)]
fn dequantize_blocks<T: Element>(
    packed: &[u8],
    absmax: &[f32],
    out: &mut [T],
    blocksize: usize,
    values: &[f32; 16],
) {
    for (b, (block, &scale)) in out.chunks_mut(blocksize).zip(absmax).enumerate() {
        let bytes = &packed[b * blocksize / 2..];
        let full_pairs = block.len() / 2;
        let mut pairs = block.chunks_exact_mut(2);
        for (pair, &byte) in (&mut pairs).zip(bytes) {
            pair[0] = T::from_f32(values[(byte >> 4) as usize] * scale);
            pair[1] = T::from_f32(values[(byte & 0x0f) as usize] * scale);
        }
        if let Some(last) = pairs.into_remainder().first_mut() {
            *last = T::from_f32(values[(bytes[full_pairs] >> 4) as usize] * scale);
        }
    }
}

multiversion! {
    /// `dequantize_blocks` compiled for the widest vector unit the CPU has.
    fn dequantize_blocks_portable<T>(packed: &[u8], absmax: &[f32], out: &mut [T], blocksize: usize, values: &[f32; 16]) -> () => dequantize_blocks
}

/// `dequantize_blocks` with full blocks of fp32 / bf16 output through the AVX-512 kernel.
#[cfg(target_arch = "x86_64")]
fn dequantize_blocks_avx512<T: Element + avx512::Store16>(
    packed: &[u8],
    absmax: &[f32],
    out: &mut [T],
    blocksize: usize,
    values: &[f32; 16],
) {
    for (b, (block, &scale)) in out.chunks_mut(blocksize).zip(absmax).enumerate() {
        let bytes = &packed[b * blocksize / 2..];
        if block.len() < blocksize {
            dequantize_blocks(bytes, &absmax[b..=b], block, blocksize, values);
        } else {
            // SAFETY: the caller checked `available()`; blocksizes are multiples of 16 and
            // `bytes` holds blocksize / 2 bytes for a full block.
            unsafe { avx512::dequantize_full_block(bytes, scale, values, block) };
        }
    }
}

fn dequantize_blocks_dispatch<T: Element>(
    packed: &[u8],
    absmax: &[f32],
    out: &mut [T],
    blocksize: usize,
    values: &[f32; 16],
) {
    #[cfg(target_arch = "x86_64")]
    if avx512::available() {
        match T::KIND {
            Kind::F32 => {
                return dequantize_blocks_avx512::<f32>(
                    packed,
                    absmax,
                    same_kind_mut(out),
                    blocksize,
                    values,
                )
            }
            Kind::Bf16 => {
                return dequantize_blocks_avx512::<Bf16>(
                    packed,
                    absmax,
                    same_kind_mut(out),
                    blocksize,
                    values,
                )
            }
            Kind::F16 => {}
        }
    }
    dequantize_blocks_portable(packed, absmax, out, blocksize, values)
}

pub(crate) fn dequantize_4bit_into<T: Element>(
    packed: &[u8],
    absmax: &[f32],
    n: usize,
    blocksize: usize,
    kind: FourBitType,
    out: &mut [T],
) -> Result<()> {
    check_blocksize(blocksize)?;
    check_len("packed weight", packed.len(), n.div_ceil(2))?;
    check_len("absmax", absmax.len(), n.div_ceil(blocksize))?;
    check_len("output", out.len(), n)?;
    if let Some(i) = absmax.iter().position(|a| !a.is_finite()) {
        return Err(Error::invalid_argument(format!(
            "absmax[{i}] is {}, expected a finite block scale",
            absmax[i]
        )));
    }
    let values = kind.code();
    let task_blocks = blocks_per_task(blocksize);
    let task_elems = task_blocks * blocksize;
    out.par_chunks_mut(task_elems)
        .zip(packed.par_chunks(task_elems / 2))
        .zip(absmax.par_chunks(task_blocks))
        .for_each(|((o, pk), am)| dequantize_blocks_dispatch(pk, am, o, blocksize, &values));
    Ok(())
}

/// Quantises fp32 values: returns the packed codes (`ceil(n / 2)` bytes) and one absmax per block.
/// Errors on a blocksize bitsandbytes does not allow and on NaN / Inf input.
pub fn quantize_4bit_f32(
    input: &[f32],
    blocksize: usize,
    kind: FourBitType,
) -> Result<(Vec<u8>, Vec<f32>)> {
    quantize_4bit(input, blocksize, kind)
}

/// `quantize_4bit_f32` for bfloat16 input given as bit patterns.
pub fn quantize_4bit_bf16(
    input: &[u16],
    blocksize: usize,
    kind: FourBitType,
) -> Result<(Vec<u8>, Vec<f32>)> {
    quantize_4bit(as_elements::<Bf16>(input), blocksize, kind)
}

/// `quantize_4bit_f32` for float16 input given as bit patterns.
pub fn quantize_4bit_f16(
    input: &[u16],
    blocksize: usize,
    kind: FourBitType,
) -> Result<(Vec<u8>, Vec<f32>)> {
    quantize_4bit(as_elements::<F16>(input), blocksize, kind)
}

/// Writes `code[idx] * absmax[block]` (computed in fp32) for the `n` elements into `out`.
pub fn dequantize_4bit_f32(
    packed: &[u8],
    absmax: &[f32],
    n: usize,
    blocksize: usize,
    kind: FourBitType,
    out: &mut [f32],
) -> Result<()> {
    dequantize_4bit_into(packed, absmax, n, blocksize, kind, out)
}

/// `dequantize_4bit_f32` rounded to bfloat16 (nearest, ties to even), written as bit patterns.
pub fn dequantize_4bit_bf16(
    packed: &[u8],
    absmax: &[f32],
    n: usize,
    blocksize: usize,
    kind: FourBitType,
    out: &mut [u16],
) -> Result<()> {
    dequantize_4bit_into(
        packed,
        absmax,
        n,
        blocksize,
        kind,
        as_elements_mut::<Bf16>(out),
    )
}

/// `dequantize_4bit_f32` rounded to float16 (nearest, ties to even), written as bit patterns.
pub fn dequantize_4bit_f16(
    packed: &[u8],
    absmax: &[f32],
    n: usize,
    blocksize: usize,
    kind: FourBitType,
    out: &mut [u16],
) -> Result<()> {
    dequantize_4bit_into(
        packed,
        absmax,
        n,
        blocksize,
        kind,
        as_elements_mut::<F16>(out),
    )
}

/// bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map(signed=True)`), as fp32 bits,
/// ascending. It quantises `absmax - offset` in double quantisation (`nested_quant_map`).
const DYNAMIC_MAP_BITS: [u32; 256] = [
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000,
    0xbf616666, 0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333,
    0xbf44999a, 0xbf410000, 0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666,
    0xbf27cccd, 0xbf243334, 0xbf20999a, 0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a,
    0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333, 0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a,
    0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a, 0xbeb86666, 0xbeb13333, 0xbeaa0000,
    0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999, 0xbe6f3333, 0xbe60cccd,
    0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000, 0xbddb3334,
    0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d,
    0xbd5b851f, 0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148,
    0xbcfeb852, 0xbce7ae15, 0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148,
    0xbc1f3b64, 0xbc160418, 0xbc0ccccd, 0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4,
    0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a, 0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d,
    0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01, 0xb9c7e283, 0xb98ce705, 0xb923d70b,
    0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94, 0xb513a3b7, 0x00000000,
    0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b, 0x3923d70b,
    0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4,
    0x3bcfdf3b, 0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148,
    0x3c68f5c3, 0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148,
    0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d,
    0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a,
    0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667, 0x3dc428f7, 0x3dc9eb85, 0x3ddb3334,
    0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd,
    0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000,
    0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a,
    0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666,
    0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333,
    0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000,
    0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666, 0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
];

/// The signed 8-bit dynamic map as fp32 values (index = code).
pub static DYNAMIC_MAP_SIGNED: std::sync::LazyLock<[f32; 256]> =
    std::sync::LazyLock::new(|| DYNAMIC_MAP_BITS.map(f32::from_bits));

/// Nearest-code search in the 255 midpoints of the dynamic map, narrowed by a table of bins.
struct DynamicSearch {
    midpoints: [f32; 255],
    /// For each of `BINS` equal bins over [-1, 1] (widened by one bin on each side): the number of
    /// midpoints below its start and below its end. The code of a value in the bin lies in between.
    ranges: Vec<(u8, u8)>,
}

const BINS: usize = 4096;

impl DynamicSearch {
    fn new() -> Self {
        let map = &*DYNAMIC_MAP_SIGNED;
        let midpoints: [f32; 255] = std::array::from_fn(|i| 0.5 * (map[i] + map[i + 1]));
        let below = |x: f64| midpoints.partition_point(|&m| (m as f64) < x) as u8;
        let width = 2.0 / BINS as f64;
        let ranges = (0..BINS)
            .map(|b| {
                let start = -1.0 + (b as f64 - 1.0) * width;
                let end = -1.0 + (b as f64 + 2.0) * width;
                (below(start), below(end))
            })
            .collect();
        DynamicSearch { midpoints, ranges }
    }

    /// The number of midpoints strictly below `x` (x in [-1, 1]): nearest code, ties to the lower.
    #[inline]
    fn code(&self, x: f32) -> u8 {
        let bin = (((x + 1.0) * (BINS as f32 / 2.0)) as usize).min(BINS - 1);
        let (lo, hi) = self.ranges[bin];
        lo + self.midpoints[lo as usize..hi as usize].partition_point(|&m| m < x) as u8
    }
}

static DYNAMIC_SEARCH: std::sync::LazyLock<DynamicSearch> =
    std::sync::LazyLock::new(DynamicSearch::new);

/// Double-quantised block scales: `absmax[i] = map[codes[i]] * absmax2[i / 256] + offset`.
#[derive(Clone, Debug, PartialEq)]
pub struct NestedAbsmax {
    /// One uint8 code per 4-bit block (bitsandbytes' `weight.absmax` under double quantisation).
    pub codes: Vec<u8>,
    /// One fp32 scale per 256 codes (`weight.nested_absmax`).
    pub absmax: Vec<f32>,
    /// The mean subtracted before quantising (`nested_offset`).
    pub offset: f32,
}

/// Quantises the per-block absmax of a 4-bit tensor to 8 bits (bitsandbytes' `compress_statistics`).
///
/// `offset` defaults to the mean of `absmax`, computed in f64 and rounded once. bitsandbytes uses
/// torch's fp32 `mean()`, whose summation order depends on the CPU's vector width and thread count,
/// so it can differ in the last bit; callers that must reproduce a bitsandbytes run byte for byte
/// pass torch's mean here. Each value `absmax - offset` (fp32) is scaled by the reciprocal of its
/// block's absolute maximum and takes the nearest map value, ties to the lower one; a block whose
/// values are all zero gets code 0 (it dequantises to `offset` whatever the code).
pub fn double_quantize_absmax(absmax: &[f32], offset: Option<f32>) -> Result<NestedAbsmax> {
    if absmax.is_empty() {
        return Err(Error::invalid_argument(
            "double quantisation needs at least one absmax value",
        ));
    }
    if let Some(i) = absmax.iter().position(|a| !a.is_finite()) {
        return Err(Error::invalid_argument(format!(
            "absmax[{i}] is {}, expected a finite value",
            absmax[i]
        )));
    }
    let offset = offset.unwrap_or_else(|| {
        (absmax.iter().map(|&a| a as f64).sum::<f64>() / absmax.len() as f64) as f32
    });
    let search = &*DYNAMIC_SEARCH;
    let mut codes = vec![0u8; absmax.len()];
    let mut scales = vec![0f32; absmax.len().div_ceil(NESTED_BLOCKSIZE)];
    codes
        .par_chunks_mut(NESTED_BLOCKSIZE)
        .zip(absmax.par_chunks(NESTED_BLOCKSIZE))
        .zip(scales.par_iter_mut())
        .with_min_len(64)
        .for_each(|((out, block), scale)| {
            let block_max = block.iter().fold(0f32, |m, &a| m.max((a - offset).abs()));
            *scale = block_max;
            if block_max == 0.0 {
                out.fill(0);
                return;
            }
            let inv = 1.0 / block_max;
            for (c, &a) in out.iter_mut().zip(block) {
                let normalised = ((a - offset) * inv).clamp(-1.0, 1.0);
                *c = search.code(normalised);
            }
        });
    Ok(NestedAbsmax {
        codes,
        absmax: scales,
        offset,
    })
}

/// Recovers the fp32 block scales from their double-quantised form into `out`.
pub fn dequantize_nested_absmax(
    codes: &[u8],
    absmax2: &[f32],
    offset: f32,
    out: &mut [f32],
) -> Result<()> {
    check_len(
        "nested absmax",
        absmax2.len(),
        codes.len().div_ceil(NESTED_BLOCKSIZE),
    )?;
    check_len("output", out.len(), codes.len())?;
    let map = &*DYNAMIC_MAP_SIGNED;
    out.par_chunks_mut(NESTED_BLOCKSIZE)
        .zip(codes.par_chunks(NESTED_BLOCKSIZE))
        .zip(absmax2.par_iter())
        .with_min_len(64)
        .for_each(|((o, c), &scale)| {
            for (o, &c) in o.iter_mut().zip(c) {
                *o = map[c as usize] * scale + offset;
            }
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic spread of values with varied block maxima (no RNG dependency).
    fn sample(n: usize) -> Vec<f32> {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        (0..n)
            .map(|i| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let u = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                u * (1.0 + (i / 97 % 5) as f32)
            })
            .collect()
    }

    fn codes_of(packed: &[u8], n: usize) -> Vec<u8> {
        (0..n)
            .map(|i| {
                if i % 2 == 0 {
                    packed[i / 2] >> 4
                } else {
                    packed[i / 2] & 0x0f
                }
            })
            .collect()
    }

    #[test]
    fn tables_follow_bitsandbytes() {
        let nf4 = FourBitType::Nf4.code();
        assert_eq!(nf4[0], -1.0);
        assert_eq!(nf4[7], 0.0);
        assert_eq!(nf4[15], 1.0);
        assert!(nf4.windows(2).all(|w| w[0] < w[1]));
        let fp4 = FourBitType::Fp4.code();
        assert_eq!(fp4[3], 1.0);
        assert_eq!(fp4[11], -1.0);
        assert_eq!(fp4[1], 0.0625 / 12.0);
        assert_eq!(fp4[8].to_bits(), 0, "code 8 is +0.0 as in bitsandbytes");
        let book = Codebook::new(FourBitType::Fp4);
        assert!(book.midpoints.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(DYNAMIC_MAP_SIGNED[0], -0.992_968_74);
        assert_eq!(DYNAMIC_MAP_SIGNED[127], 0.0);
        assert_eq!(DYNAMIC_MAP_SIGNED[255], 1.0);
        assert!(DYNAMIC_MAP_SIGNED.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn known_block_and_nibble_order() {
        let mut x = vec![0f32; 32];
        x[0] = 1.0; // code 15
        x[1] = -1.0; // code 0
        x[2] = 0.5; // nearest NF4 value 0.4407 -> code 12
        x[3] = -0.1; // nearest -0.0911 -> code 6
        let (packed, absmax) = quantize_4bit_f32(&x, 32, FourBitType::Nf4).unwrap();
        assert_eq!(absmax, vec![1.0]);
        assert_eq!(packed[0], 0xf0);
        assert_eq!(packed[1], 0xc6);
        assert!(packed[2..].iter().all(|&b| b == 0x77));
    }

    #[test]
    fn ties_go_to_the_lower_code() {
        for kind in [FourBitType::Nf4, FourBitType::Fp4] {
            let book = Codebook::new(kind);
            for (k, &m) in book.midpoints.iter().enumerate() {
                let mut x = vec![0f32; 32];
                x[0] = 1.0;
                x[1] = m;
                x[2] = m.next_up();
                let (packed, _) = quantize_4bit_f32(&x, 32, kind).unwrap();
                let codes = codes_of(&packed, 3);
                assert_eq!(codes[1], book.code_at_rank[k], "{kind:?} midpoint {k}");
                assert_eq!(
                    codes[2],
                    book.code_at_rank[k + 1],
                    "{kind:?} just above midpoint {k}"
                );
            }
        }
    }

    #[test]
    fn zero_blocks_short_blocks_and_odd_counts() {
        let mut x = sample(64 * 3 + 33);
        x[64..128].fill(0.0);
        let n = x.len();
        let (packed, absmax) = quantize_4bit_f32(&x, 64, FourBitType::Nf4).unwrap();
        assert_eq!(packed.len(), n.div_ceil(2));
        assert_eq!(absmax.len(), 4);
        assert_eq!(absmax[1], 0.0);
        assert!(
            packed[32..64].iter().all(|&b| b == 0x77),
            "an all-zero block is all code 7"
        );
        assert_eq!(
            packed[n / 2] & 0x0f,
            7,
            "the pad nibble after an odd count is the code of 0.0"
        );
        let mut out = vec![f32::NAN; n];
        dequantize_4bit_f32(&packed, &absmax, n, 64, FourBitType::Nf4, &mut out).unwrap();
        assert!(out[64..128].iter().all(|&v| v == 0.0));
        // The short last block is scaled by its own absmax.
        let tail_max = x[192..].iter().fold(0f32, |m, v| m.max(v.abs()));
        assert_eq!(absmax[3], tail_max);
    }

    #[test]
    fn round_trip_error_is_within_half_the_widest_gap() {
        for kind in [FourBitType::Nf4, FourBitType::Fp4] {
            let mut sorted = kind.code();
            sorted.sort_by(f32::total_cmp);
            let widest = sorted.windows(2).map(|w| w[1] - w[0]).fold(0f32, f32::max);
            for blocksize in BLOCKSIZES {
                let x = sample(blocksize * 3 + 5);
                let (packed, absmax) = quantize_4bit_f32(&x, blocksize, kind).unwrap();
                let mut out = vec![0f32; x.len()];
                dequantize_4bit_f32(&packed, &absmax, x.len(), blocksize, kind, &mut out).unwrap();
                for (i, (a, b)) in x.iter().zip(&out).enumerate() {
                    let bound = absmax[i / blocksize] * widest / 2.0 * 1.0001;
                    assert!(
                        (a - b).abs() <= bound,
                        "{kind:?} bs {blocksize} elem {i}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn vector_paths_equal_the_portable_loops() {
        for kind in [FourBitType::Nf4, FourBitType::Fp4] {
            let book = Codebook::new(kind);
            let remap = kind == FourBitType::Fp4;
            let values = kind.code();
            for blocksize in BLOCKSIZES {
                let mut x = sample(blocksize * 4 + 17);
                x[blocksize..2 * blocksize].fill(0.0);
                x[3] = 1e-39; // subnormal
                let xb: Vec<Bf16> = x.iter().map(|&v| Bf16::from_f32(v)).collect();
                let n = x.len();
                let blocks = n.div_ceil(blocksize);
                let (mut p1, mut a1) = (vec![0u8; n.div_ceil(2)], vec![0f32; blocks]);
                let (mut p2, mut a2) = (p1.clone(), a1.clone());
                assert!(
                    quantize_blocks_dispatch(&x, &mut p1, &mut a1, blocksize, &book, remap)
                        .is_none()
                );
                assert!(quantize_blocks(&x, &mut p2, &mut a2, blocksize, &book, remap).is_none());
                assert_eq!((&p1, &a1), (&p2, &a2), "f32 {kind:?} bs {blocksize}");
                let (mut p3, mut a3) = (vec![0u8; n.div_ceil(2)], vec![0f32; blocks]);
                let (mut p4, mut a4) = (p3.clone(), a3.clone());
                assert!(
                    quantize_blocks_dispatch(&xb, &mut p3, &mut a3, blocksize, &book, remap)
                        .is_none()
                );
                assert!(quantize_blocks(&xb, &mut p4, &mut a4, blocksize, &book, remap).is_none());
                assert_eq!((&p3, &a3), (&p4, &a4), "bf16 {kind:?} bs {blocksize}");

                let mut o1 = vec![0f32; n];
                let mut o2 = vec![1f32; n];
                dequantize_blocks_dispatch(&p1, &a1, &mut o1, blocksize, &values);
                dequantize_blocks(&p1, &a1, &mut o2, blocksize, &values);
                assert_eq!(
                    o1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    o2.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                );
                let mut b1 = vec![Bf16(0); n];
                let mut b2 = vec![Bf16(1); n];
                dequantize_blocks_dispatch(&p1, &a1, &mut b1, blocksize, &values);
                dequantize_blocks(&p1, &a1, &mut b2, blocksize, &values);
                assert_eq!(b1, b2, "bf16 out {kind:?} bs {blocksize}");
            }
        }
    }

    #[test]
    fn sixteen_bit_inputs_match_their_fp32_widening() {
        let x = sample(1000);
        let bf: Vec<u16> = x.iter().map(|&v| Bf16::from_f32(v).0).collect();
        let widened: Vec<f32> = bf.iter().map(|&b| Bf16(b).to_f32()).collect();
        assert_eq!(
            quantize_4bit_bf16(&bf, 64, FourBitType::Nf4).unwrap(),
            quantize_4bit_f32(&widened, 64, FourBitType::Nf4).unwrap()
        );
        let h: Vec<u16> = x.iter().map(|&v| F16::from_f32(v).0).collect();
        let widened: Vec<f32> = h.iter().map(|&b| F16(b).to_f32()).collect();
        assert_eq!(
            quantize_4bit_f16(&h, 128, FourBitType::Fp4).unwrap(),
            quantize_4bit_f32(&widened, 128, FourBitType::Fp4).unwrap()
        );
        let (packed, absmax) = quantize_4bit_f32(&x, 64, FourBitType::Nf4).unwrap();
        let mut f = vec![0f32; 1000];
        let mut b = vec![0u16; 1000];
        let mut hh = vec![0u16; 1000];
        dequantize_4bit_f32(&packed, &absmax, 1000, 64, FourBitType::Nf4, &mut f).unwrap();
        dequantize_4bit_bf16(&packed, &absmax, 1000, 64, FourBitType::Nf4, &mut b).unwrap();
        dequantize_4bit_f16(&packed, &absmax, 1000, 64, FourBitType::Nf4, &mut hh).unwrap();
        for i in 0..1000 {
            assert_eq!(b[i], Bf16::from_f32(f[i]).0);
            assert_eq!(hh[i], half::f16::from_f32(f[i]).to_bits());
        }
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(
            Bf16::from_f32(1.0 + 2f32.powi(-8)).0,
            0x3f80,
            "tie to even (down)"
        );
        assert_eq!(
            Bf16::from_f32(1.0 + 3.0 * 2f32.powi(-8)).0,
            0x3f82,
            "tie to even (up)"
        );
        assert_eq!(
            Bf16::from_f32(1.0 + 2f32.powi(-8) + 2f32.powi(-20)).0,
            0x3f81
        );
        assert_eq!(Bf16::from_f32(-0.0).0, 0x8000);
    }

    #[test]
    fn bad_input_gets_a_clear_error() {
        let mut x = sample(256);
        x[130] = f32::NAN;
        let err = quantize_4bit_f32(&x, 64, FourBitType::Nf4)
            .unwrap_err()
            .to_string();
        assert!(err.contains("NaN or Inf in block 2"), "{err}");
        x[130] = f32::INFINITY;
        assert!(quantize_4bit_f32(&x, 64, FourBitType::Nf4).is_err());
        let err = quantize_4bit_f32(&sample(64), 48, FourBitType::Nf4)
            .unwrap_err()
            .to_string();
        assert!(err.contains("blocksize must be one of"), "{err}");
        assert!(FourBitType::from_name("int4").is_err());
        let (packed, absmax) = quantize_4bit_f32(&sample(128), 64, FourBitType::Nf4).unwrap();
        let mut out = vec![0f32; 128];
        let err = dequantize_4bit_f32(&packed[..63], &absmax, 128, 64, FourBitType::Nf4, &mut out)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("packed weight has 63 elements, expected 64"),
            "{err}"
        );
        assert!(
            dequantize_4bit_f32(&packed, &absmax[..1], 128, 64, FourBitType::Nf4, &mut out)
                .is_err()
        );
        assert!(dequantize_4bit_f32(
            &packed,
            &[1.0, f32::NAN],
            128,
            64,
            FourBitType::Nf4,
            &mut out
        )
        .is_err());
    }

    #[test]
    fn dynamic_search_equals_a_full_search() {
        let search = &*DYNAMIC_SEARCH;
        let mut x = -1.0f32;
        while x <= 1.0 {
            let full = search.midpoints.partition_point(|&m| m < x) as u8;
            assert_eq!(search.code(x), full, "{x}");
            for m in [x.next_up(), x.next_down()] {
                if (-1.0..=1.0).contains(&m) {
                    assert_eq!(
                        search.code(m),
                        search.midpoints.partition_point(|&p| p < m) as u8
                    );
                }
            }
            x += 1.0 / 8192.0 + x.abs() * 1e-3;
        }
        for &m in &search.midpoints {
            assert_eq!(
                search.code(m),
                search.midpoints.partition_point(|&p| p < m) as u8
            );
            assert_eq!(
                search.code(m.next_up()),
                search.midpoints.partition_point(|&p| p < m.next_up()) as u8
            );
        }
    }

    #[test]
    fn double_quantisation_round_trip() {
        let (_, absmax) = quantize_4bit_f32(&sample(64 * 600), 64, FourBitType::Nf4).unwrap();
        let nested = double_quantize_absmax(&absmax, None).unwrap();
        assert_eq!(nested.codes.len(), 600);
        assert_eq!(nested.absmax.len(), 3);
        let mean = absmax.iter().map(|&a| a as f64).sum::<f64>() / 600.0;
        assert_eq!(nested.offset, mean as f32);
        let mut back = vec![0f32; 600];
        dequantize_nested_absmax(&nested.codes, &nested.absmax, nested.offset, &mut back).unwrap();
        for (i, (a, b)) in absmax.iter().zip(&back).enumerate() {
            let scale = nested.absmax[i / NESTED_BLOCKSIZE];
            assert!((a - b).abs() <= scale * 0.02, "{i}: {a} vs {b}");
            assert_eq!(
                *b,
                DYNAMIC_MAP_SIGNED[nested.codes[i] as usize] * scale + nested.offset
            );
        }
        let given = double_quantize_absmax(&absmax, Some(0.25)).unwrap();
        assert_eq!(given.offset, 0.25);
        // All scales equal: every shifted value is zero, codes 0, and they dequantise to the offset.
        let flat = double_quantize_absmax(&[0.5; 300], None).unwrap();
        assert!(flat.codes.iter().all(|&c| c == 0));
        assert_eq!(flat.absmax, vec![0.0, 0.0]);
        assert!(double_quantize_absmax(&[1.0, f32::NAN], None).is_err());
        assert!(double_quantize_absmax(&[], None).is_err());
    }
}
