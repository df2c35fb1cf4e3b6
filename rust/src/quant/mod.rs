//! Blockwise 4-bit (NF4 / FP4) and row-wise int8 quantisation in bitsandbytes' exact format.
//!
//! Every kernel works on plain slices in one of three element types: `f32`, bfloat16 and float16.
//! The 16-bit types travel as `u16` bit patterns (numpy has no bfloat16), so the public functions
//! come in `_f32`, `_bf16` and `_f16` flavours over the same generic code.

#[cfg(target_arch = "x86_64")]
mod avx512;
pub mod int8;
pub mod nf4;
pub mod pool;

#[cfg(feature = "python")]
pub(crate) use int8::dequantize_rows;
pub use int8::{
    dequantize_int8_rows_bf16, dequantize_int8_rows_f16, dequantize_int8_rows_f32,
    quantize_int8_rows_bf16, quantize_int8_rows_f16, quantize_int8_rows_f32,
};
#[cfg(feature = "python")]
pub(crate) use nf4::dequantize_4bit_into;
pub use nf4::{
    dequantize_4bit_bf16, dequantize_4bit_f16, dequantize_4bit_f32, dequantize_nested_absmax,
    double_quantize_absmax, quantize_4bit_bf16, quantize_4bit_f16, quantize_4bit_f32, FourBitType,
    NestedAbsmax, DYNAMIC_MAP_SIGNED, NESTED_BLOCKSIZE,
};

/// A floating-point element the kernels read and write. Reading widens exactly to `f32`;
/// writing rounds to nearest, ties to even (what torch's `.to(dtype)` does).
pub(crate) trait Element: Copy + Send + Sync + 'static {
    /// Which of the three types this is, so a kernel can pick a specialised path.
    const KIND: Kind;
    fn to_f32(self) -> f32;
    fn from_f32(value: f32) -> Self;
    /// `|x|` as the bits of an `f32`. Non-negative floats order like their bit patterns, so an
    /// integer max over these finds the absmax, and any value >= `0x7f80_0000` is Inf or NaN.
    fn abs_bits(self) -> u32;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) enum Kind {
    F32,
    Bf16,
    F16,
}

/// Reinterprets a slice of one element type as another of the same `Kind`.
#[cfg(target_arch = "x86_64")]
fn same_kind<T: Element, U: Element>(s: &[T]) -> &[U] {
    assert_eq!(T::KIND, U::KIND);
    // SAFETY: equal kinds are the same type (each Kind has exactly one Element impl).
    unsafe { std::slice::from_raw_parts(s.as_ptr() as *const U, s.len()) }
}

#[cfg(target_arch = "x86_64")]
fn same_kind_mut<T: Element, U: Element>(s: &mut [T]) -> &mut [U] {
    assert_eq!(T::KIND, U::KIND);
    // SAFETY: as in `same_kind`.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr() as *mut U, s.len()) }
}

impl Element for f32 {
    const KIND: Kind = Kind::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(value: f32) -> Self {
        value
    }
    #[inline(always)]
    fn abs_bits(self) -> u32 {
        self.to_bits() & 0x7fff_ffff
    }
}

/// bfloat16 as its bit pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(transparent)]
pub(crate) struct Bf16(pub u16);

impl Element for Bf16 {
    const KIND: Kind = Kind::Bf16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.0 as u32) << 16)
    }
    #[inline(always)]
    fn from_f32(value: f32) -> Self {
        let bits = value.to_bits();
        if value.is_nan() {
            return Bf16(((bits >> 16) as u16) | 0x0040);
        }
        let rounding = 0x7fff + ((bits >> 16) & 1);
        Bf16((bits.wrapping_add(rounding) >> 16) as u16)
    }
    #[inline(always)]
    fn abs_bits(self) -> u32 {
        ((self.0 & 0x7fff) as u32) << 16
    }
}

/// IEEE float16 as its bit pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(transparent)]
pub(crate) struct F16(pub u16);

impl Element for F16 {
    const KIND: Kind = Kind::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::f16::from_bits(self.0).to_f32()
    }
    #[inline(always)]
    fn from_f32(value: f32) -> Self {
        F16(half::f16::from_f32(value).to_bits())
    }
    #[inline(always)]
    fn abs_bits(self) -> u32 {
        self.to_f32().abs().to_bits()
    }
}

/// A 16-bit element type that is `repr(transparent)` over its `u16` bit pattern.
pub(crate) trait Bits16: Element {}
impl Bits16 for Bf16 {}
impl Bits16 for F16 {}

/// Views `u16` bit patterns as a 16-bit element type without copying.
pub(crate) fn as_elements<T: Bits16>(bits: &[u16]) -> &[T] {
    // SAFETY: every Bits16 type is repr(transparent) over u16: same size, alignment and validity.
    unsafe { std::slice::from_raw_parts(bits.as_ptr() as *const T, bits.len()) }
}

pub(crate) fn as_elements_mut<T: Bits16>(bits: &mut [u16]) -> &mut [T] {
    // SAFETY: as in `as_elements`; the exclusive borrow is carried over.
    unsafe { std::slice::from_raw_parts_mut(bits.as_mut_ptr() as *mut T, bits.len()) }
}
