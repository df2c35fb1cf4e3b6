//! AVX-512 forms of the 4-bit inner loops, bit-identical to the portable loops in `nf4.rs` (a unit
//! test holds them to it). A 16-entry table fits one zmm register, so both directions are table
//! lookups with `vpermps`: quantising is a 4-step branchless binary search over the midpoints,
//! dequantising a direct lookup of the code's value.

use std::arch::x86_64::*;

/// Whether this CPU runs the kernels below (checked once; the std macro caches the answer).
pub(super) fn available() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
}

/// 16 consecutive input elements widened to fp32.
pub(super) trait Load16: Copy {
    /// # Safety
    /// `ptr` must point at 16 readable elements and the CPU must support AVX-512F/BW.
    unsafe fn load16(ptr: *const Self) -> __m512;
}

impl Load16 for f32 {
    #[inline(always)]
    unsafe fn load16(ptr: *const Self) -> __m512 {
        _mm512_loadu_ps(ptr)
    }
}

impl Load16 for super::Bf16 {
    #[inline(always)]
    unsafe fn load16(ptr: *const Self) -> __m512 {
        let half = _mm256_loadu_si256(ptr as *const __m256i);
        _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16))
    }
}

/// Largest `|x|` bit pattern over a block whose length is a multiple of 16.
///
/// # Safety
/// AVX-512F/BW must be available.
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn max_abs_bits<T: Load16>(block: &[T]) -> u32 {
    let mask = _mm512_set1_epi32(0x7fff_ffff);
    let mut acc = _mm512_setzero_si512();
    for chunk in block.chunks_exact(16) {
        let bits = _mm512_and_si512(_mm512_castps_si512(T::load16(chunk.as_ptr())), mask);
        acc = _mm512_max_epu32(acc, bits);
    }
    _mm512_reduce_max_epu32(acc)
}

/// Codes for a full block (length a multiple of 16): `scale` is the reciprocal of the block's
/// divisor, `midpoints` the 15 ascending midpoints (lane 15 unused), `code_at_rank` the code per rank.
///
/// # Safety
/// AVX-512F/BW must be available; `packed` must hold `block.len() / 2` bytes.
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn quantize_full_block<T: Load16>(
    block: &[T],
    scale: f32,
    midpoints: &[f32; 16],
    code_at_rank: Option<&[u8; 16]>,
    packed: &mut [u8],
) {
    debug_assert!(packed.len() >= block.len() / 2);
    let mids = _mm512_loadu_ps(midpoints.as_ptr());
    let remap =
        code_at_rank.map(|t| _mm512_cvtepu8_epi32(_mm_loadu_si128(t.as_ptr() as *const __m128i)));
    let vscale = _mm512_set1_ps(scale);
    let lo = _mm512_set1_ps(-1.0);
    let hi = _mm512_set1_ps(1.0);
    for (i, chunk) in block.chunks_exact(16).enumerate() {
        let x = _mm512_mul_ps(T::load16(chunk.as_ptr()), vscale);
        let x = _mm512_min_ps(_mm512_max_ps(x, lo), hi);
        let mut rank = _mm512_setzero_si512();
        for step in [8, 4, 2, 1] {
            let probe = _mm512_add_epi32(rank, _mm512_set1_epi32(step - 1));
            let above = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, _mm512_permutexvar_ps(probe, mids));
            rank = _mm512_mask_add_epi32(rank, above, rank, _mm512_set1_epi32(step));
        }
        let codes = match remap {
            Some(table) => _mm512_permutexvar_epi32(rank, table),
            None => rank,
        };
        // Each 64-bit lane holds an (even, odd) pair; fold it into one byte, even element high.
        let pairs = _mm512_or_si512(_mm512_slli_epi64(codes, 4), _mm512_srli_epi64(codes, 32));
        let bytes = _mm512_cvtepi64_epi8(pairs);
        _mm_storel_epi64(packed.as_mut_ptr().add(i * 8) as *mut __m128i, bytes);
    }
}

/// 16 fp32 values stored as one output element type.
pub(super) trait Store16: Copy {
    /// # Safety
    /// `ptr` must point at 16 writable elements and the CPU must support AVX-512F/BW.
    unsafe fn store16(ptr: *mut Self, values: __m512);
}

impl Store16 for f32 {
    #[inline(always)]
    unsafe fn store16(ptr: *mut Self, values: __m512) {
        _mm512_storeu_ps(ptr, values)
    }
}

impl Store16 for super::Bf16 {
    /// Round to nearest even; inputs are finite (absmax is checked before dequantising).
    #[inline(always)]
    unsafe fn store16(ptr: *mut Self, values: __m512) {
        let bits = _mm512_castps_si512(values);
        let lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
        let rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
        _mm256_storeu_si256(
            ptr as *mut __m256i,
            _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)),
        );
    }
}

/// Values of a full block (length a multiple of 16) from its packed codes.
///
/// # Safety
/// AVX-512F/BW must be available; `packed` must hold `out.len() / 2` bytes.
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn dequantize_full_block<T: Store16>(
    packed: &[u8],
    scale: f32,
    values: &[f32; 16],
    out: &mut [T],
) {
    debug_assert!(packed.len() >= out.len() / 2);
    let table = _mm512_loadu_ps(values.as_ptr());
    let vscale = _mm512_set1_ps(scale);
    let low_nibble = _mm_set1_epi8(0x0f);
    for (i, chunk) in out.chunks_exact_mut(16).enumerate() {
        let raw = _mm_loadl_epi64(packed.as_ptr().add(i * 8) as *const __m128i);
        let high = _mm_and_si128(_mm_srli_epi16(raw, 4), low_nibble);
        let low = _mm_and_si128(raw, low_nibble);
        let idx = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(high, low));
        T::store16(
            chunk.as_mut_ptr(),
            _mm512_mul_ps(_mm512_permutexvar_ps(idx, table), vscale),
        );
    }
}
