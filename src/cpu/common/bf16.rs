//! bfloat16 numbers on the CPU as `u16` bits: exact widening, round-to-nearest-even narrowing
//! (one value, or whole rows, with `vcvtneps2bf16` where the CPU has AVX512-BF16), and views of
//! candle's bf16 storage as bits.

use super::simd_dispatch;
use candle_core::{CpuStorage, Layout, Result};
use half::bf16;

/// bf16 bits to f32 (exact).
#[inline(always)]
pub(crate) fn widen(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// f32 to bf16 bits, rounding to nearest, ties to even (NaN stays a quiet NaN), as
/// `half::bf16::from_f32` does, in a form that vectorises.
#[inline(always)]
pub(crate) fn narrow(f: f32) -> u16 {
    let x = f.to_bits();
    let rounded = (x.wrapping_add(0x7FFF + ((x >> 16) & 1)) >> 16) as u16;
    if f.is_nan() {
        ((x >> 16) as u16) | 0x0040
    } else {
        rounded
    }
}

/// A value the elementwise kernels read and write as f32: f32 itself, or bf16 bits.
pub(crate) trait Element: Copy {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
}

impl Element for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Element for u16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        widen(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        narrow(v)
    }
}

/// dst <- src widened to f32.
#[inline(always)]
fn widen_body(src: &[u16], dst: &mut [f32]) {
    for (o, &x) in dst.iter_mut().zip(src) {
        *o = widen(x);
    }
}

simd_dispatch!(pub(crate) widen_row => widen_body(src: &[u16], dst: &mut [f32]) -> ());

/// dst <- src rounded to bf16.
#[inline(always)]
fn narrow_body(src: &[f32], dst: &mut [u16]) {
    for (o, &x) in dst.iter_mut().zip(src) {
        *o = narrow(x);
    }
}

/// dst <- src * s rounded to bf16.
#[inline(always)]
fn narrow_scaled_body(src: &[f32], s: f32, dst: &mut [u16]) {
    for (o, &x) in dst.iter_mut().zip(src) {
        *o = narrow(x * s);
    }
}

/// dst <- (src + s) rounded to bf16.
#[inline(always)]
fn narrow_shifted_body(src: &[f32], s: f32, dst: &mut [u16]) {
    for (o, &x) in dst.iter_mut().zip(src) {
        *o = narrow(x + s);
    }
}

/// dst <- (src + bias) rounded to bf16, bias given as bf16 bits.
#[inline(always)]
fn narrow_biased_body(src: &[f32], bias: &[u16], dst: &mut [u16]) {
    for ((o, &x), &b) in dst.iter_mut().zip(src).zip(bias) {
        *o = narrow(x + widen(b));
    }
}

simd_dispatch!(narrow_shifted_portable => narrow_shifted_body(src: &[f32], s: f32, dst: &mut [u16]) -> ());
simd_dispatch!(narrow_biased_portable => narrow_biased_body(src: &[f32], bias: &[u16], dst: &mut [u16]) -> ());
simd_dispatch!(narrow_portable => narrow_body(src: &[f32], dst: &mut [u16]) -> ());
simd_dispatch!(narrow_scaled_portable => narrow_scaled_body(src: &[f32], s: f32, dst: &mut [u16]) -> ());

// The row kernels that round to bf16 take `vcvtneps2bf16` on CPUs with AVX512-BF16 (all
// those with AMX, whose kernels call them for every output): one instruction for the
// portable form's six (5.5% of a bf16 U-Net step went to them). It rounds to nearest even
// as `narrow` does but flushes subnormal results (below 1.2e-38) to zero; oneDNN's bf16
// kernels, behind torch's, round with the same instruction.

/// dst <- src rounded to bf16.
pub(crate) fn narrow_row(src: &[f32], dst: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512_bf16() {
        // SAFETY: the CPU has the features.
        return unsafe { fast::narrow_row(src, dst) };
    }
    narrow_portable(src, dst)
}

/// dst <- src * s rounded to bf16.
pub(crate) fn narrow_scaled_row(src: &[f32], s: f32, dst: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512_bf16() {
        // SAFETY: the CPU has the features.
        return unsafe { fast::narrow_scaled_row(src, s, dst) };
    }
    narrow_scaled_portable(src, s, dst)
}

/// dst <- (src + s) rounded to bf16.
pub(crate) fn narrow_shifted_row(src: &[f32], s: f32, dst: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512_bf16() {
        // SAFETY: the CPU has the features.
        return unsafe { fast::narrow_shifted_row(src, s, dst) };
    }
    narrow_shifted_portable(src, s, dst)
}

/// dst <- (src + bias) rounded to bf16, bias given as bf16 bits.
pub(crate) fn narrow_biased_row(src: &[f32], bias: &[u16], dst: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512_bf16() {
        // SAFETY: the CPU has the features.
        return unsafe { fast::narrow_biased_row(src, bias, dst) };
    }
    narrow_biased_portable(src, bias, dst)
}

/// Whether the CPU has AVX512F/BW/VL and AVX512-BF16 (all those with AMX do): what the
/// intrinsics here and in the kernels need.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512_bf16() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512bf16")
    })
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod fast {
    use std::arch::x86_64::*;

    /// The first of 16 f32 lanes given by `mask` rounded to bf16 (nearest even) at `dst`.
    ///
    /// # Safety
    /// The CPU has AVX512-BF16/BW/VL; `dst` has the masked values' room.
    #[inline(always)]
    pub(crate) unsafe fn store_masked(dst: *mut u16, v: __m512, mask: __mmask16) {
        let bits = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(v));
        _mm256_mask_storeu_epi16(dst.cast(), mask, bits);
    }

    /// 16 f32 values rounded to bf16 (nearest even) at `dst`.
    ///
    /// # Safety
    /// The CPU has AVX512-BF16; `dst` has 16 values' room.
    #[inline(always)]
    pub(crate) unsafe fn store(dst: *mut u16, v: __m512) {
        let bits = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(v));
        _mm256_storeu_si256(dst.cast(), bits);
    }

    /// dst[i] <- f(src[i..i + 16], i, mask) rounded to bf16, 16 at a time (the last ones
    /// masked), over the shorter of the two.
    #[inline(always)]
    unsafe fn map(src: &[f32], dst: &mut [u16], f: impl Fn(__m512, usize, __mmask16) -> __m512) {
        let n = src.len().min(dst.len());
        let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
        let mut i = 0;
        while i + 16 <= n {
            store(d.add(i), f(_mm512_loadu_ps(s.add(i)), i, !0));
            i += 16;
        }
        if i < n {
            let m: __mmask16 = ((1u32 << (n - i)) - 1) as u16;
            store_masked(d.add(i), f(_mm512_maskz_loadu_ps(m, s.add(i)), i, m), m);
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn narrow_row(src: &[f32], dst: &mut [u16]) {
        map(src, dst, |v, _, _| v)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn narrow_scaled_row(src: &[f32], s: f32, dst: &mut [u16]) {
        let s = _mm512_set1_ps(s);
        map(src, dst, |v, _, _| _mm512_mul_ps(v, s))
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn narrow_shifted_row(src: &[f32], s: f32, dst: &mut [u16]) {
        let s = _mm512_set1_ps(s);
        map(src, dst, |v, _, _| _mm512_add_ps(v, s))
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn narrow_biased_row(src: &[f32], bias: &[u16], dst: &mut [u16]) {
        let n = src.len().min(dst.len()).min(bias.len());
        let b = bias.as_ptr();
        map(&src[..n], dst, |v, i, m| {
            let bits = _mm256_maskz_loadu_epi16(m, b.add(i).cast());
            let wide = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(bits));
            _mm512_add_ps(v, _mm512_castsi512_ps(wide))
        })
    }
}

/// The bf16 data, as bits, of a contiguous CPU tensor.
pub(crate) fn contiguous_bits<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [u16]> {
    let v = crate::cpu::common::contiguous::<bf16>(s, l, op)?;
    // SAFETY: bf16 is a transparent u16.
    Ok(unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u16>(), v.len()) })
}

/// bf16 values from their bits, without a copy.
pub(crate) fn from_bits(bits: Vec<u16>) -> Vec<bf16> {
    let mut v = std::mem::ManuallyDrop::new(bits);
    // SAFETY: bf16 is a transparent u16: same size, alignment and allocation.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<bf16>(), v.len(), v.capacity()) }
}

/// A bf16 storage from bits, without a copy.
pub(crate) fn storage(bits: Vec<u16>) -> CpuStorage {
    CpuStorage::BF16(from_bits(bits))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn narrow_rows_match_the_scalar_rounding() {
        // normal values (the fast rows flush subnormal results), ties, NaN; lengths with a
        // tail of fewer than 16
        let mut x = 0x0001_2345u32;
        let mut src: Vec<f32> = (0..1000)
            .map(|_| {
                x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                let f = f32::from_bits(x);
                if f.is_finite() && f.abs() > 1e-30 && f.abs() < 1e30 {
                    f
                } else {
                    1.0 + (x % 1000) as f32
                }
            })
            .collect();
        src[3] = f32::NAN;
        src[4] = f32::from_bits(0x3F80_8000); // a tie: rounds to even
        src[5] = f32::from_bits(0x3F81_8000);
        let bias: Vec<u16> = (0..1000).map(|i| narrow(i as f32 * 0.37 - 100.0)).collect();
        for n in [1000usize, 999, 37, 5] {
            let src = &src[..n];
            let mut got = vec![0u16; n];
            let check = |got: &[u16], want: &dyn Fn(f32, usize) -> f32| {
                for (i, (&g, &v)) in got.iter().zip(src).enumerate() {
                    let w = narrow(want(v, i));
                    if v.is_nan() {
                        assert!(widen(g).is_nan());
                    } else {
                        assert_eq!(g, w, "n {n}, {i}: {v:e}");
                    }
                }
            };
            narrow_row(src, &mut got);
            check(&got, &|v, _| v);
            narrow_scaled_row(src, 0.3, &mut got);
            check(&got, &|v, _| v * 0.3);
            narrow_shifted_row(src, -2.5, &mut got);
            check(&got, &|v, _| v + -2.5);
            narrow_biased_row(src, &bias[..n], &mut got);
            check(&got, &|v, i| v + widen(bias[i]));
        }
    }

    #[test]
    fn narrow_rounds_like_half() {
        let mut x = 0x0001_2345u32;
        for _ in 0..200_000 {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let f = f32::from_bits(x);
            let want = bf16::from_f32(f).to_bits();
            if f.is_nan() {
                assert!(widen(narrow(f)).is_nan());
            } else {
                assert_eq!(narrow(f), want, "{f:e} ({x:#x})");
            }
        }
        for f in [
            0.0f32,
            -0.0,
            1.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            1.0 + 1.0 / 256.0,
        ] {
            assert_eq!(narrow(f), bf16::from_f32(f).to_bits(), "{f}");
        }
    }
}
