//! safetensors checkpoints: a validated mmap reader, a streaming writer and sharded folders, plus
//! the float conversions the merge kernels share.

pub mod index;
pub mod pio;
pub mod reader;
pub mod writer;

pub use index::Checkpoint;
pub use reader::{Dtype, SafeTensorsFile, TensorInfo};
pub use writer::{PositionalWriter, StreamingWriter, TensorSpec};

/// The float storage types the merge kernels read and write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FloatType {
    BF16,
    F16,
    F32,
}

impl FloatType {
    pub fn of(dtype: Dtype) -> Option<FloatType> {
        match dtype {
            Dtype::BF16 => Some(FloatType::BF16),
            Dtype::F16 => Some(FloatType::F16),
            Dtype::F32 => Some(FloatType::F32),
            _ => None,
        }
    }

    pub fn size(self) -> usize {
        match self {
            FloatType::BF16 | FloatType::F16 => 2,
            FloatType::F32 => 4,
        }
    }

    /// Element `i` of little-endian `bytes` as fp32 (exact for every type).
    #[inline(always)]
    pub fn load(self, bytes: &[u8], i: usize) -> f32 {
        match self {
            FloatType::BF16 => {
                f32::from_bits((u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]) as u32) << 16)
            }
            FloatType::F16 => {
                half::f16::from_bits(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])).to_f32()
            }
            FloatType::F32 => f32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap()),
        }
    }

    /// The raw bit pattern of element `i`, widened to u32.
    #[inline(always)]
    pub fn load_bits(self, bytes: &[u8], i: usize) -> u32 {
        match self {
            FloatType::BF16 | FloatType::F16 => {
                u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]) as u32
            }
            FloatType::F32 => u32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap()),
        }
    }

    /// The bit pattern of `x` rounded to this type (round to nearest even), widened to u32.
    #[inline(always)]
    pub fn round_bits(self, x: f32) -> u32 {
        match self {
            FloatType::BF16 => f32_to_bf16_bits(x) as u32,
            FloatType::F16 => half::f16::from_f32(x).to_bits() as u32,
            FloatType::F32 => x.to_bits(),
        }
    }

    /// The value of a bit pattern produced by [`round_bits`](Self::round_bits).
    #[inline(always)]
    pub fn bits_to_f32(self, bits: u32) -> f32 {
        match self {
            FloatType::BF16 => f32::from_bits(bits << 16),
            FloatType::F16 => half::f16::from_bits(bits as u16).to_f32(),
            FloatType::F32 => f32::from_bits(bits),
        }
    }

    /// Stores bit pattern `bits` as element `i` of little-endian `out`.
    #[inline(always)]
    pub fn store_bits(self, out: &mut [u8], i: usize, bits: u32) {
        match self {
            FloatType::BF16 | FloatType::F16 => {
                out[2 * i..2 * i + 2].copy_from_slice(&(bits as u16).to_le_bytes())
            }
            FloatType::F32 => out[4 * i..4 * i + 4].copy_from_slice(&bits.to_le_bytes()),
        }
    }
}

/// fp32 -> bf16 with round to nearest even, NaN kept quiet (what torch's `.to(bfloat16)` does).
#[inline(always)]
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x0040) as u16;
    }
    let rounding = 0x7fff + ((b >> 16) & 1);
    (b.wrapping_add(rounding) >> 16) as u16
}

/// Reads little-endian float data of `dtype` into fp32, or `None` for a non-float dtype.
pub fn to_f32_vec(bytes: &[u8], dtype: Dtype) -> Option<Vec<f32>> {
    let ft = FloatType::of(dtype)?;
    Some(
        (0..bytes.len() / ft.size())
            .map(|i| ft.load(bytes, i))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_matches_half() {
        for bits in (0u32..=u32::MAX).step_by(65_521) {
            let x = f32::from_bits(bits);
            let ours = f32_to_bf16_bits(x);
            let theirs = half::bf16::from_f32(x).to_bits();
            if x.is_nan() {
                assert!(f32::from_bits((ours as u32) << 16).is_nan());
            } else {
                assert_eq!(ours, theirs, "{x:e}");
            }
        }
    }
}
