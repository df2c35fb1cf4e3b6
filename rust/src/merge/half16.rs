//! The single-term passes for bf16 and fp16 weights with AVX-512: 32 elements per step, the
//! exact-unmerge check as one 16-bit compare into a 32-bit miss mask, and one LoRA term fused
//! with its product. Rounding takes one instruction per 16 or 32 lanes: `vcvtne2ps2bf16`
//! (AVX-512 BF16) for bf16, `vcvtps2ph` for fp16.
//!
//! Both round to nearest even and quiet NaNs as torch's `.to()` (and the portable code) does.
//! `vcvtne2ps2bf16` also treats denormal inputs as zero, so a bf16 step whose fp32 values include
//! a denormal is redone by the portable code: the bytes never depend on the CPU.

use super::kernel::{merge_row_single, undo_single, Fixups};
use crate::checkpoint::FloatType;

/// Elements per step: one 64-byte vector of 16-bit floats.
const STEP: usize = 32;

/// Whether this CPU runs the passes of this module for weights of type `ft`.
#[inline]
pub(super) fn available(ft: FloatType) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let base = is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512dq");
        base && match ft {
            FloatType::BF16 => is_x86_feature_detected!("avx512bf16"),
            FloatType::F16 => is_x86_feature_detected!("f16c"),
            FloatType::F32 => false,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = ft;
        false
    }
}

/// W' = round(step(W, d)) for one row of `ft` weights, and with `record` the misses of the
/// unmerge check, as [`merge_row_single`] computes them. Call only when [`available`]`(ft)`.
pub(super) fn merge_row<const SCALE: bool>(
    ft: FloatType,
    w: &[u8],
    d: &[f32],
    o: &mut [u8],
    record: bool,
    base_index: u64,
    fix: &mut Fixups,
) {
    assert!(w.len() == 2 * d.len() && o.len() == w.len());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller checked `available(ft)`; the lengths were just checked.
    unsafe {
        match ft {
            FloatType::BF16 => x86::merge_row_bf16::<SCALE>(w, d, o, record, base_index, fix),
            FloatType::F16 => x86::merge_row_f16::<SCALE>(w, d, o, record, base_index, fix),
            FloatType::F32 => unreachable!("16-bit types only"),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    merge_row_single::<SCALE>(ft, w, d, o, record, base_index, fix)
}

/// Rows in a fused block: [`merge_lora_block`] keeps 8 rows x 32 columns of the product in 16
/// registers.
pub(super) const FUSED_ROWS: usize = super::ROW_BLOCK;

/// One LoRA term on a full block of [`FUSED_ROWS`] rows of `ft` weights with `cols % 32 == 0`,
/// fused: each 8 x 32 tile of `scale * left @ right` (the same FMA chain in k order as `dots`,
/// then the scaling) goes from the registers straight into W' = round(W + delta) and the unmerge
/// check, so the delta is never stored. `left` holds the block's rows (8 x r). `masks` is
/// scratch. Returns false, with `fix` untouched, when a bf16 step met a denormal: the caller then
/// redoes the block with the unfused passes (whose output overwrites this one's). Call only when
/// [`available`]`(ft)`.
#[allow(clippy::too_many_arguments)]
pub(super) fn merge_lora_block(
    ft: FloatType,
    left: &[f32],
    right: &[f32],
    scale: f32,
    w: &[u8],
    o: &mut [u8],
    record: bool,
    base_index: u64,
    fix: &mut Fixups,
    masks: &mut Vec<u32>,
) -> bool {
    let (r, cols) = block_shape(left, right, w, o);
    masks.clear();
    masks.resize(FUSED_ROWS * cols / STEP, 0);
    let args = (
        left,
        right,
        r,
        cols,
        scale,
        w,
        o,
        record,
        base_index,
        fix,
        &mut masks[..],
    );
    fused::<false>(ft, args)
}

/// The unmerge counterpart of [`merge_lora_block`]: W = round(W' - delta) for a full block.
/// Returns false when a bf16 step met a denormal (the caller redoes the block). Call only when
/// [`available`]`(ft)`.
pub(super) fn undo_lora_block(
    ft: FloatType,
    left: &[f32],
    right: &[f32],
    scale: f32,
    w: &[u8],
    o: &mut [u8],
) -> bool {
    let (r, cols) = block_shape(left, right, w, o);
    let mut none = Fixups::default();
    fused::<true>(
        ft,
        (
            left,
            right,
            r,
            cols,
            scale,
            w,
            o,
            false,
            0,
            &mut none,
            &mut [],
        ),
    )
}

/// (r, cols) of a fused block, checking every length.
fn block_shape(left: &[f32], right: &[f32], w: &[u8], o: &[u8]) -> (usize, usize) {
    let cols = w.len() / 2 / FUSED_ROWS;
    let r = left.len() / FUSED_ROWS;
    assert!(cols.is_multiple_of(STEP) && w.len() == 2 * FUSED_ROWS * cols && o.len() == w.len());
    assert!(left.len() == FUSED_ROWS * r && right.len() == r * cols);
    (r, cols)
}

/// A fused block's arguments: left, right, r, cols, scale, W, out, record, first element, the
/// fix-up list and the mask scratch.
type BlockArgs<'a> = (
    &'a [f32],
    &'a [f32],
    usize,
    usize,
    f32,
    &'a [u8],
    &'a mut [u8],
    bool,
    u64,
    &'a mut Fixups,
    &'a mut [u32],
);

fn fused<const UNDO: bool>(ft: FloatType, args: BlockArgs) -> bool {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller checked `available(ft)`; `block_shape` checked the shapes.
    unsafe {
        match ft {
            FloatType::BF16 => x86::lora_block_bf16::<UNDO>(args),
            FloatType::F16 => x86::lora_block_f16::<UNDO>(args),
            FloatType::F32 => unreachable!("16-bit types only"),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (ft, args);
        false
    }
}

/// W = round(unstep(W', d)) for one row of `ft` weights. Call only when [`available`]`(ft)`.
pub(super) fn undo_row<const SCALE: bool>(ft: FloatType, w: &[u8], d: &[f32], o: &mut [u8]) {
    assert!(w.len() == 2 * d.len() && o.len() == w.len());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: as in `merge_row`.
    unsafe {
        match ft {
            FloatType::BF16 => x86::undo_row_bf16::<SCALE>(w, d, o),
            FloatType::F16 => x86::undo_row_f16::<SCALE>(w, d, o),
            FloatType::F32 => unreachable!("16-bit types only"),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    undo_single::<SCALE>(ft, w, d, o)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use crate::merge::kernel::tile_avx512;
    use std::arch::x86_64::*;

    /// fpclass category: denormal.
    const DENORMAL: i32 = 0x20;

    /// How far ahead of the current step W is prefetched. W comes from the page cache, not from
    /// any CPU cache, and the hardware prefetcher stops at each 4 KiB page: asking a kilobyte
    /// ahead makes a cold pass about a quarter faster (measured: 0.33 -> 0.25 ns per element).
    const PREFETCH_AHEAD: usize = 1024;

    /// The fused block reads 8 rows of W at once, one cache line per row per tile: its
    /// prefetches go 4 tiles ahead. (Further ahead, 8 rows' lines are evicted from L1 by the
    /// tiles' loads of `right` before they are used: measured 1024 bytes ahead 20 % slower.)
    const FUSED_PREFETCH_AHEAD: usize = 256;

    /// A hint to load the cache line at `p`; it never faults, so `p` may be past the end.
    #[inline(always)]
    fn prefetch(p: *const u8) {
        // SAFETY: a prefetch does not access memory architecturally.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast()) };
    }

    /// A 16-bit float type: 32 of them per 512-bit vector.
    pub(super) trait Half {
        const FT: FloatType;
        /// The 32 values of `v` as two vectors of fp32 (elements 0-15, 16-31).
        unsafe fn widen(v: __m512i) -> (__m512, __m512);
        /// (lo, hi) rounded to 32 values, and a nonzero mask when the result must not be used
        /// (the step is then redone by the portable code).
        unsafe fn round(lo: __m512, hi: __m512) -> (__m512i, u16);
    }

    pub(super) struct Bf16;
    pub(super) struct F16;

    impl Half for Bf16 {
        const FT: FloatType = FloatType::BF16;

        #[inline(always)]
        unsafe fn widen(v: __m512i) -> (__m512, __m512) {
            let lo = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(v));
            let hi = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64::<1>(v));
            (
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(lo)),
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(hi)),
            )
        }

        /// Unusable when an input was denormal (the instruction flushes those to zero).
        #[inline(always)]
        unsafe fn round(lo: __m512, hi: __m512) -> (__m512i, u16) {
            let denormal =
                _mm512_fpclass_ps_mask::<DENORMAL>(lo) | _mm512_fpclass_ps_mask::<DENORMAL>(hi);
            (
                std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo)),
                denormal,
            )
        }
    }

    impl Half for F16 {
        const FT: FloatType = FloatType::F16;

        #[inline(always)]
        unsafe fn widen(v: __m512i) -> (__m512, __m512) {
            (
                _mm512_cvtph_ps(_mm512_castsi512_si256(v)),
                _mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(v)),
            )
        }

        /// Always usable: the conversion handles denormals itself.
        #[inline(always)]
        unsafe fn round(lo: __m512, hi: __m512) -> (__m512i, u16) {
            const RNE: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
            let (lo, hi) = (_mm512_cvtps_ph::<RNE>(lo), _mm512_cvtps_ph::<RNE>(hi));
            (_mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi), 0)
        }
    }

    #[inline(always)]
    unsafe fn step<const SCALE: bool>(x: __m512, d: __m512) -> __m512 {
        if SCALE {
            _mm512_mul_ps(x, d)
        } else {
            _mm512_add_ps(x, d)
        }
    }

    #[inline(always)]
    unsafe fn unstep<const SCALE: bool>(x: __m512, d: __m512) -> __m512 {
        if SCALE {
            _mm512_div_ps(x, d)
        } else {
            _mm512_sub_ps(x, d)
        }
    }

    /// Step `c` (elements c..c + 32): W's 32 values and d's two halves, prefetching W ahead.
    ///
    /// # Safety
    /// `wp` must point at 2 * (c + 32) bytes and `dp` at c + 32 floats.
    #[inline(always)]
    unsafe fn load_step(wp: *const u8, dp: *const f32, c: usize) -> (__m512i, __m512, __m512) {
        prefetch(wp.wrapping_add(2 * c + PREFETCH_AHEAD));
        unsafe {
            (
                _mm512_loadu_si512(wp.add(2 * c).cast()),
                _mm512_loadu_ps(dp.add(c)),
                _mm512_loadu_ps(dp.add(c + 16)),
            )
        }
    }

    /// Steps whose miss masks are batched before they become entries.
    const PENDING: usize = 256;

    /// Appends the entries of `masks` (bit j of word k: element `first + 32 k + j`, whose
    /// original bits are element `32 k + j` of `w`) to `fix`, in order. Words without a miss
    /// are skipped 16 at a time; the first two misses of a word are written without a branch
    /// (three or more in one word are rare).
    #[inline(always)]
    unsafe fn emit<H: Half>(fix: &mut Fixups, masks: &[u32], first: u64, w: &[u8]) {
        let bits = |e: usize| H::FT.load_bits(w, e);
        for (g, group) in masks.chunks(16).enumerate() {
            let mut words = [0u32; 16];
            words[..group.len()].copy_from_slice(group);
            // SAFETY: `words` is 64 bytes; AVX-512F is enabled in the caller.
            let v = unsafe { _mm512_loadu_si512(words.as_ptr().cast()) };
            let mut nonzero = _mm512_test_epi32_mask(v, v);
            while nonzero != 0 {
                let k = nonzero.trailing_zeros() as usize;
                nonzero &= nonzero - 1;
                let e = 32 * (16 * g + k);
                let m = words[k];
                let (j0, rest) = (m.trailing_zeros() as usize, m & (m - 1));
                let j1 = (rest.trailing_zeros() & 31) as usize;
                let n = 1 + (rest != 0) as usize;
                fix.index
                    .extend_from_slice(&[first + (e + j0) as u64, first + (e + j1) as u64]);
                fix.bits.extend_from_slice(&[bits(e + j0), bits(e + j1)]);
                fix.index.truncate(fix.index.len() - 2 + n);
                fix.bits.truncate(fix.bits.len() - 2 + n);
                let mut more = rest & rest.wrapping_sub(1);
                while more != 0 {
                    let j = more.trailing_zeros() as usize;
                    fix.index.push(first + (e + j) as u64);
                    fix.bits.push(bits(e + j));
                    more &= more - 1;
                }
            }
        }
    }

    /// The entry points, each compiled for the instructions its type needs.
    macro_rules! entries {
        ($features:literal, $h:ty, $merge:ident, $undo:ident, $block:ident) => {
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $merge<const SCALE: bool>(
                w: &[u8],
                d: &[f32],
                o: &mut [u8],
                record: bool,
                base_index: u64,
                fix: &mut Fixups,
            ) {
                merge_row::<$h, SCALE>(w, d, o, record, base_index, fix)
            }

            #[target_feature(enable = $features)]
            pub(super) unsafe fn $undo<const SCALE: bool>(w: &[u8], d: &[f32], o: &mut [u8]) {
                undo_row::<$h, SCALE>(w, d, o)
            }

            #[target_feature(enable = $features)]
            pub(super) unsafe fn $block<const UNDO: bool>(args: BlockArgs) -> bool {
                lora_block::<$h, UNDO>(args)
            }
        };
    }
    entries!(
        "avx512f,avx512bw,avx512dq,avx512bf16",
        Bf16,
        merge_row_bf16,
        undo_row_bf16,
        lora_block_bf16
    );
    entries!(
        "avx512f,avx512bw,avx512dq,f16c",
        F16,
        merge_row_f16,
        undo_row_f16,
        lora_block_f16
    );

    #[inline(always)]
    unsafe fn lora_block<H: Half, const UNDO: bool>(args: BlockArgs) -> bool {
        let (left, right, r, cols, scale, w, o, record, base_index, fix, masks) = args;
        let words = cols / STEP;
        let vs = _mm512_set1_ps(scale);
        let (lp, rp, wp, op) = (left.as_ptr(), right.as_ptr(), w.as_ptr(), o.as_mut_ptr());
        let mut special = 0u16;
        for (jw, j) in (0..cols).step_by(STEP).enumerate() {
            // SAFETY: the caller checked the shapes; j + 32 <= cols.
            let acc = unsafe { tile_avx512(lp, rp, r, cols, j) };
            for (i, acc_row) in acc.iter().enumerate() {
                let at = 2 * (i * cols + j);
                prefetch(wp.wrapping_add(at + FUSED_PREFETCH_AHEAD));
                let (d0, d1) = (_mm512_mul_ps(acc_row[0], vs), _mm512_mul_ps(acc_row[1], vs));
                // SAFETY: i < FUSED_ROWS and j + 32 <= cols: 64 bytes inside `w`.
                let wv = unsafe { _mm512_loadu_si512(wp.add(at).cast()) };
                let (x0, x1) = H::widen(wv);
                let (merged, sp) = if UNDO {
                    H::round(_mm512_sub_ps(x0, d0), _mm512_sub_ps(x1, d1))
                } else {
                    H::round(_mm512_add_ps(x0, d0), _mm512_add_ps(x1, d1))
                };
                special |= sp;
                // SAFETY: as for the load, inside `o`.
                unsafe { _mm512_storeu_si512(op.add(at).cast(), merged) };
                if record {
                    let (m0, m1) = H::widen(merged);
                    let (back, sp) = H::round(_mm512_sub_ps(m0, d0), _mm512_sub_ps(m1, d1));
                    special |= sp;
                    masks[i * words + jw] = _mm512_cmpneq_epi16_mask(back, wv);
                }
            }
        }
        if special != 0 {
            return false;
        }
        if record {
            for i in 0..FUSED_ROWS {
                let row = i * cols;
                emit::<H>(
                    fix,
                    &masks[i * words..(i + 1) * words],
                    base_index + row as u64,
                    &w[2 * row..2 * (row + cols)],
                );
            }
        }
        true
    }

    #[inline(always)]
    unsafe fn merge_row<H: Half, const SCALE: bool>(
        w: &[u8],
        d: &[f32],
        o: &mut [u8],
        record: bool,
        base_index: u64,
        fix: &mut Fixups,
    ) {
        let full = d.len() / STEP * STEP;
        let (wp, dp, op) = (w.as_ptr(), d.as_ptr(), o.as_mut_ptr());
        // The steps' miss masks wait here (from element `pending_at` on) and are turned into
        // entries in batches: about one step in four has a miss at 1 % of elements, so a branch
        // per step would be mispredicted that often.
        let mut masks = [0u32; PENDING];
        let (mut pending, mut pending_at) = (0usize, 0usize);
        for c in (0..full).step_by(STEP) {
            // SAFETY: c + 32 <= full <= d.len(), and w holds 2 bytes per element of d.
            let (wv, d0, d1) = unsafe { load_step(wp, dp, c) };
            let (x0, x1) = H::widen(wv);
            let (merged, mut special) = H::round(step::<SCALE>(x0, d0), step::<SCALE>(x1, d1));
            let mut misses = 0u32;
            if record {
                let (m0, m1) = H::widen(merged);
                let (back, unusable) = H::round(unstep::<SCALE>(m0, d0), unstep::<SCALE>(m1, d1));
                special |= unusable;
                misses = _mm512_cmpneq_epi16_mask(back, wv);
            }
            if special != 0 {
                let at = base_index + pending_at as u64;
                emit::<H>(fix, &masks[..pending], at, &w[2 * pending_at..]);
                let (span, at) = (2 * c..2 * (c + STEP), base_index + c as u64);
                let (ws, ds) = (&w[span.clone()], &d[c..c + STEP]);
                merge_row_single::<SCALE>(H::FT, ws, ds, &mut o[span], record, at, fix);
                (pending, pending_at) = (0, c + STEP);
                continue;
            }
            unsafe { _mm512_storeu_si512(op.add(2 * c).cast(), merged) };
            if record {
                masks[pending] = misses;
                pending += 1;
                if pending == PENDING {
                    let at = base_index + pending_at as u64;
                    emit::<H>(fix, &masks, at, &w[2 * pending_at..]);
                    (pending, pending_at) = (0, c + STEP);
                }
            }
        }
        let at = base_index + pending_at as u64;
        emit::<H>(fix, &masks[..pending], at, &w[2 * pending_at..]);
        let (ws, ds, at) = (&w[2 * full..], &d[full..], base_index + full as u64);
        merge_row_single::<SCALE>(H::FT, ws, ds, &mut o[2 * full..], record, at, fix);
    }

    #[inline(always)]
    unsafe fn undo_row<H: Half, const SCALE: bool>(w: &[u8], d: &[f32], o: &mut [u8]) {
        let full = d.len() / STEP * STEP;
        let (wp, dp, op) = (w.as_ptr(), d.as_ptr(), o.as_mut_ptr());
        for c in (0..full).step_by(STEP) {
            // SAFETY: c + 32 <= full <= d.len(), and w holds 2 bytes per element of d.
            let (wv, d0, d1) = unsafe { load_step(wp, dp, c) };
            let (x0, x1) = H::widen(wv);
            let (back, special) = H::round(unstep::<SCALE>(x0, d0), unstep::<SCALE>(x1, d1));
            if special != 0 {
                let span = 2 * c..2 * (c + STEP);
                let (ws, ds) = (&w[span.clone()], &d[c..c + STEP]);
                undo_single::<SCALE>(H::FT, ws, ds, &mut o[span]);
                continue;
            }
            unsafe { _mm512_storeu_si512(op.add(2 * c).cast(), back) };
        }
        undo_single::<SCALE>(H::FT, &w[2 * full..], &d[full..], &mut o[2 * full..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TYPES: [FloatType; 2] = [FloatType::BF16, FloatType::F16];

    /// Patterns of `ft` that stress the rounding: ordinary weights, denormals, values near the
    /// overflow threshold, infinities and NaNs (with payloads), one in `special_every`.
    fn patterns(
        ft: FloatType,
        n: usize,
        special_every: u64,
        seed: &mut u64,
    ) -> (Vec<u8>, Vec<f32>) {
        let mut next = || {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            *seed
        };
        let bf16 = ft == FloatType::BF16;
        let (exp_mask, man_mask, max_finite) = if bf16 {
            (0x7f80u16, 0x007fu16, 0x7f7fu16)
        } else {
            (0x7c00, 0x03ff, 0x7bff)
        };
        let (tiny, big) = if bf16 {
            (1e-38f32, 1e36f32)
        } else {
            (1e-7, 100.0)
        };
        let mut w = Vec::with_capacity(2 * n);
        let mut d = Vec::with_capacity(n);
        for _ in 0..n {
            let r = next();
            let unit = (r >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            let sign = (r >> 8) as u16 & 0x8000;
            let kind = if (r >> 20) % special_every == 0 {
                r % 16
            } else {
                15
            };
            let (wb, dv): (u16, f32) = match kind {
                0 => (sign | (r >> 9) as u16 & man_mask, unit * tiny), // denormal W, tiny delta
                1 => (sign | (man_mask + 1), -unit * 2.0 * tiny),      // smallest normals
                2 => (max_finite, unit * big),                         // near overflow
                3 => (sign | exp_mask, unit),                          // infinities
                4 => (sign | exp_mask | 1 | (r >> 9) as u16 & man_mask, unit), // NaN payloads
                5 => (ft.round_bits(unit) as u16, f32::from_bits(0x7fa0_0001)), // NaN delta
                _ => (ft.round_bits(unit * 0.04) as u16, unit * 5e-4),
            };
            w.extend_from_slice(&wb.to_le_bytes());
            d.push(dv);
        }
        (w, d)
    }

    #[test]
    fn matches_the_portable_passes_bit_for_bit() {
        let mut seed = 0x9e37_79b9_7f4a_7c15;
        let sizes = [
            1usize, 31, 32, 33, 100, 1000, 4099, 8192, 8193, 20011, 70000,
        ];
        for ft in TYPES.into_iter().filter(|&ft| available(ft)) {
            for (n, special_every) in sizes
                .iter()
                .flat_map(|&n| [(n, 1), (n, 3000), (n, u64::MAX)])
            {
                let (w, d) = patterns(ft, n, special_every, &mut seed);
                for record in [false, true] {
                    let (mut fast, mut slow) = (vec![0u8; 2 * n], vec![0u8; 2 * n]);
                    let (mut ff, mut fs) = (Fixups::default(), Fixups::default());
                    merge_row::<false>(ft, &w, &d, &mut fast, record, 7, &mut ff);
                    merge_row_single::<false>(ft, &w, &d, &mut slow, record, 7, &mut fs);
                    assert_eq!(fast, slow, "{ft:?} merge, n={n}");
                    assert!(
                        !record || n < 1000 || !fs.index.is_empty(),
                        "the check finds misses"
                    );
                    assert_eq!(
                        (ff.index, ff.bits),
                        (fs.index, fs.bits),
                        "{ft:?} misses, n={n}"
                    );
                    let (mut ff, mut fs) = (Fixups::default(), Fixups::default());
                    merge_row::<true>(ft, &w, &d, &mut fast, record, 0, &mut ff);
                    merge_row_single::<true>(ft, &w, &d, &mut slow, record, 0, &mut fs);
                    assert_eq!(fast, slow, "{ft:?} scale, n={n}");
                    assert_eq!(
                        (ff.index, ff.bits),
                        (fs.index, fs.bits),
                        "{ft:?} scale misses"
                    );
                }
                for scale in [false, true] {
                    let (mut fast, mut slow) = (vec![0u8; 2 * n], vec![0u8; 2 * n]);
                    if scale {
                        undo_row::<true>(ft, &w, &d, &mut fast);
                        undo_single::<true>(ft, &w, &d, &mut slow);
                    } else {
                        undo_row::<false>(ft, &w, &d, &mut fast);
                        undo_single::<false>(ft, &w, &d, &mut slow);
                    }
                    assert_eq!(fast, slow, "{ft:?} undo, scale={scale}, n={n}");
                }
            }
        }
    }

    #[test]
    fn the_fused_lora_block_matches_dots_then_the_row_pass() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for ft in TYPES.into_iter().filter(|&ft| available(ft)) {
            for (r, cols, special_every) in [
                (16, 64, u64::MAX),
                (8, 2048, u64::MAX),
                (3, 320, 4000),
                (16, 96, 1),
            ] {
                let n = FUSED_ROWS * cols;
                let (w, _) = patterns(ft, n, special_every, &mut seed);
                let (left, _) = patterns(ft, FUSED_ROWS * r, u64::MAX, &mut seed);
                let (right, _) = patterns(ft, r * cols, u64::MAX, &mut seed);
                let f = |b: &[u8]| -> Vec<f32> {
                    b.chunks(2)
                        .map(|c| ft.bits_to_f32(u16::from_le_bytes([c[0], c[1]]) as u32) * 2.0)
                        .collect()
                };
                let (left, mut right) = (f(&left), f(&right));
                // bf16: a zero delta leaves W's denormals denormal, so the block is handed back.
                let handed_back = special_every == 1 && ft == FloatType::BF16;
                if special_every == 1 {
                    right.iter_mut().for_each(|x| *x = 0.0);
                }
                for (record, scale) in [(true, 0.5f32), (false, 2.0), (true, 1.0)] {
                    let mut d = vec![0f32; n];
                    crate::merge::kernel::dots(&left, &right, r, cols, FUSED_ROWS, scale, &mut d);
                    let mut slow = vec![0u8; 2 * n];
                    let mut fs = Fixups::default();
                    for i in 0..FUSED_ROWS {
                        let (span, row) =
                            (2 * i * cols..2 * (i + 1) * cols, i * cols..(i + 1) * cols);
                        let at = 9 + (i * cols) as u64;
                        merge_row::<false>(
                            ft,
                            &w[span.clone()],
                            &d[row],
                            &mut slow[span],
                            record,
                            at,
                            &mut fs,
                        );
                    }
                    let mut fast = vec![0u8; 2 * n];
                    let (mut ff, mut masks) = (Fixups::default(), Vec::new());
                    let done = merge_lora_block(
                        ft, &left, &right, scale, &w, &mut fast, record, 9, &mut ff, &mut masks,
                    );
                    if handed_back {
                        assert!(
                            !done && ff.index.is_empty(),
                            "a block with denormals is left to the caller"
                        );
                        assert!(!undo_lora_block(ft, &left, &right, scale, &w, &mut fast));
                        continue;
                    }
                    assert!(done);
                    assert!(
                        !record || cols < 2048 || !fs.index.is_empty(),
                        "the check finds misses"
                    );
                    assert_eq!(fast, slow, "{ft:?} r={r} cols={cols}");
                    let (mut back_fast, mut back_slow) = (vec![0u8; 2 * n], vec![0u8; 2 * n]);
                    assert!(undo_lora_block(
                        ft,
                        &left,
                        &right,
                        scale,
                        &fast,
                        &mut back_fast
                    ));
                    undo_row::<false>(ft, &fast, &d, &mut back_slow);
                    assert_eq!(back_fast, back_slow, "{ft:?} undo r={r} cols={cols}");
                    assert_eq!(
                        (ff.index, ff.bits),
                        (fs.index, fs.bits),
                        "{ft:?} r={r} cols={cols}"
                    );
                }
            }
        }
    }

    #[test]
    fn bf16_denormal_sums_are_rounded_as_torch_does() {
        if !available(FloatType::BF16) {
            return;
        }
        // 0 + a denormal delta (exactly the bf16 denormal 0x0006): the instruction alone would
        // flush it to zero; torch keeps it.
        let n = 64;
        let w = vec![0u8; 2 * n];
        let d = vec![f32::from_bits(0x0006_0000); n];
        let mut o = vec![0u8; 2 * n];
        merge_row::<false>(
            FloatType::BF16,
            &w,
            &d,
            &mut o,
            true,
            0,
            &mut Fixups::default(),
        );
        assert!(o
            .chunks(2)
            .all(|c| u16::from_le_bytes([c[0], c[1]]) == 0x0006));
    }
}
