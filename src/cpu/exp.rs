//! exp for the softmax rows of the attention kernels (f32 and bf16) and for the GELU: branch-free
//! polynomials that vectorise, and AVX512-BF16 forms of the bf16 rows.

use super::common::simd_dispatch;

/// exp(x) for f32 in the style of Cephes `expf` (the polynomial of `exp256_ps`), branch-free
/// so that loops over slices vectorise; relative error about 2e-7 over the softmax range.
#[inline(always)]
pub(crate) fn exp_approx(x: f32) -> f32 {
    // mul_add: one fused, exactly rounded operation on every target (an FMA instruction in
    // the AVX2 and AVX-512 builds), so all builds give the same bits
    let x = x.clamp(-87.336_55, 88.376_26);
    let fx = x.mul_add(std::f32::consts::LOG2_E, 0.5).floor();
    let x = fx.mul_add(-0.693_359_375, x);
    let x = fx.mul_add(2.121_944_4e-4, x);
    let z = x * x;
    let mut y = 1.987_569_1e-4f32;
    y = y.mul_add(x, 1.398_199_9e-3);
    y = y.mul_add(x, 8.333_452e-3);
    y = y.mul_add(x, 4.166_579_6e-2);
    y = y.mul_add(x, 1.666_666_5e-1);
    y = y.mul_add(x, 5.000_000_1e-1);
    y = y.mul_add(z, x) + 1.0;
    // fx is integral and within [-126, 128] after the clamp: the bit trick builds 2^fx
    // SAFETY: fx is integral and within [-126, 128] after the clamp.
    let bits = ((unsafe { fx.to_int_unchecked::<i32>() } + 127) as u32) << 23;
    let pow2n = f32::from_bits(bits);
    y * pow2n
}

/// The largest value of a row, over 16 independent lanes (vectorises).
#[inline(always)]
fn row_max(row: &[f32]) -> f32 {
    const L: usize = 16;
    let mut m = [f32::NEG_INFINITY; L];
    let chunks = row.chunks_exact(L);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..L {
            m[i] = if c[i] > m[i] { c[i] } else { m[i] };
        }
    }
    let mut max = m
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, |a, b| if b > a { b } else { a });
    for &v in tail {
        max = if v > max { v } else { max };
    }
    max
}

/// exp(x) for x <= 0 to about 6e-5 relative: enough for values rounded to bf16 (2^-9) and
/// cheaper than [`exp_approx`]. e^x = 2^n 2^f with n = round(x log2 e), |f| <= 1/2, and 2^f
/// by its degree-4 Taylor polynomial.
#[inline(always)]
fn exp_bf16_grade(x: f32) -> f32 {
    let t = (x * std::f32::consts::LOG2_E).max(-125.0);
    let n = (t + 0.5).floor();
    let f = t - n;
    const C: [f32; 4] = [
        std::f32::consts::LN_2,
        0.240_226_5,
        0.055_504_11,
        0.009_618_129,
    ];
    let p = f
        .mul_add(C[3], C[2])
        .mul_add(f, C[1])
        .mul_add(f, C[0])
        .mul_add(f, 1.0);
    // SAFETY: n is integral and within [-125, 0] for x <= 0 (x > 0 only makes n larger,
    // up to the f32 range the callers never reach: their x is a score minus the row's max).
    let bits = ((unsafe { n.to_int_unchecked::<i32>() } + 127) as u32) << 23;
    p * f32::from_bits(bits)
}

/// In place: row <- exp((row - max) * scale); returns the row's sum. The reductions use 16
/// independent lanes so that they vectorise (a single running sum would serialise them).
#[inline(always)]
fn softmax_row_body(row: &mut [f32], scale: f32) -> f32 {
    const L: usize = 16;
    let shift = row_max(row) * scale;
    // exp and the sum in one pass
    let mut acc = [0f32; L];
    let mut chunks = row.chunks_exact_mut(L);
    for c in &mut chunks {
        for i in 0..L {
            c[i] = exp_approx(c[i].mul_add(scale, -shift));
            acc[i] += c[i];
        }
    }
    let mut tail_sum = 0f32;
    for v in chunks.into_remainder() {
        *v = exp_approx(v.mul_add(scale, -shift));
        tail_sum += *v;
    }
    acc.iter().sum::<f32>() + tail_sum
}

/// exp(row * scale - shift) rounded to bf16 into `out` (the row is left as it was); returns
/// the sum of the f32 values. The exp is the cheaper [`exp_bf16_grade`]: `shift` is at
/// least the largest row * scale.
#[inline(always)]
fn exp_row_bf16_body(row: &[f32], scale: f32, shift: f32, out: &mut [u16]) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let chunks = row.chunks_exact(L);
    let tail = chunks.remainder();
    let mut outs = out.chunks_exact_mut(L);
    for (c, o) in chunks.zip(&mut outs) {
        for i in 0..L {
            let e = exp_bf16_grade(c[i].mul_add(scale, -shift));
            o[i] = crate::cpu::common::bf16::narrow(e);
            acc[i] += e;
        }
    }
    let mut tail_sum = 0f32;
    for (&v, o) in tail.iter().zip(outs.into_remainder()) {
        let e = exp_bf16_grade(v.mul_add(scale, -shift));
        *o = crate::cpu::common::bf16::narrow(e);
        tail_sum += e;
    }
    acc.iter().sum::<f32>() + tail_sum
}

simd_dispatch!(exp_row_bf16_portable => exp_row_bf16_body(row: &[f32], scale: f32, shift: f32, out: &mut [u16]) -> f32);
simd_dispatch!(row_max_portable => row_max(row: &[f32]) -> f32);

/// The largest value of a row (-inf for an empty one).
pub(crate) fn row_max_f32(row: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::common::bf16::has_avx512_bf16() {
        // SAFETY: the CPU has the features (checked just above).
        return unsafe { avx512_bf16::row_max(row) };
    }
    row_max_portable(row)
}

/// exp(row * scale - shift) rounded to bf16 into `out`, returns their f32 sum; `shift` at
/// least the largest row * scale. On CPUs with AVX512-BF16 (all those with AMX) written with
/// intrinsics: the portable loop's software rounding to bf16 (NaN check, blend) took most
/// of its time, where `vcvtneps2bf16` is one instruction, and `vscalefps` replaces the
/// exponent arithmetic (the 4096-token attention: 146 -> 99 ms per layer at batch 2 on 2
/// threads). The instruction rounds to nearest even like the software path but flushes
/// subnormal results (below 1.2e-38, next to a row sum of at least 1) to zero.
pub(crate) fn exp_row_bf16(row: &[f32], scale: f32, shift: f32, out: &mut [u16]) -> f32 {
    assert_eq!(row.len(), out.len());
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::common::bf16::has_avx512_bf16() {
        // SAFETY: the CPU has the features (checked just above); the lengths are equal.
        return unsafe { avx512_bf16::exp_row(row, scale, shift, out) };
    }
    exp_row_bf16_portable(row, scale, shift, out)
}

#[cfg(target_arch = "x86_64")]
mod avx512_bf16 {
    use crate::cpu::common::bf16::fast::{store as store_bf16, store_masked};
    use std::arch::x86_64::*;

    /// The vector form of `exp_bf16_grade`: t = x log2 e, n = round(t), f = t - n, the same
    /// degree-4 polynomial for 2^f, times 2^n (`vscalefps`, which gives 0 far below the
    /// range instead of needing the clamp).
    #[inline(always)]
    unsafe fn exp2_poly(t: __m512) -> __m512 {
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
        let f = _mm512_sub_ps(t, n);
        let mut p = _mm512_set1_ps(0.009_618_129);
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.055_504_11));
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.240_226_5));
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(std::f32::consts::LN_2));
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0));
        _mm512_scalef_ps(p, n)
    }

    /// # Safety
    /// The CPU has AVX512F/BW/VL/BF16.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn row_max(row: &[f32]) -> f32 {
        let n = row.len();
        let src = row.as_ptr();
        let full = n / 16 * 16;
        let tail: __mmask16 = ((1u32 << (n - full)) - 1) as u16;
        // four independent lanes of 16
        let mut m = [_mm512_set1_ps(f32::NEG_INFINITY); 4];
        let mut i = 0;
        while i + 64 <= full {
            for (j, mj) in m.iter_mut().enumerate() {
                *mj = _mm512_max_ps(*mj, _mm512_loadu_ps(src.add(i + 16 * j)));
            }
            i += 64;
        }
        while i < full {
            m[0] = _mm512_max_ps(m[0], _mm512_loadu_ps(src.add(i)));
            i += 16;
        }
        let last = _mm512_mask_loadu_ps(_mm512_set1_ps(f32::NEG_INFINITY), tail, src.add(full));
        m[1] = _mm512_max_ps(m[1], last);
        _mm512_reduce_max_ps(_mm512_max_ps(
            _mm512_max_ps(m[0], m[1]),
            _mm512_max_ps(m[2], m[3]),
        ))
    }

    /// # Safety
    /// The CPU has AVX512F/BW/VL/BF16; `out.len() == row.len()`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn exp_row(row: &[f32], scale: f32, shift: f32, out: &mut [u16]) -> f32 {
        let n = row.len();
        let (src, dst) = (row.as_ptr(), out.as_mut_ptr());
        let full = n / 16 * 16;
        let tail: __mmask16 = ((1u32 << (n - full)) - 1) as u16;
        // t = (v scale - shift) log2 e = v a - b
        let a = _mm512_set1_ps(scale * std::f32::consts::LOG2_E);
        let b = _mm512_set1_ps(shift * std::f32::consts::LOG2_E);
        let mut sum = [_mm512_setzero_ps(); 2];
        let mut i = 0;
        while i + 32 <= full {
            for (j, sj) in sum.iter_mut().enumerate() {
                let e = exp2_poly(_mm512_fmsub_ps(_mm512_loadu_ps(src.add(i + 16 * j)), a, b));
                store_bf16(dst.add(i + 16 * j), e);
                *sj = _mm512_add_ps(*sj, e);
            }
            i += 32;
        }
        while i < full {
            let e = exp2_poly(_mm512_fmsub_ps(_mm512_loadu_ps(src.add(i)), a, b));
            store_bf16(dst.add(i), e);
            sum[0] = _mm512_add_ps(sum[0], e);
            i += 16;
        }
        if tail != 0 {
            let v = _mm512_maskz_loadu_ps(tail, src.add(full));
            let e = _mm512_maskz_mov_ps(tail, exp2_poly(_mm512_fmsub_ps(v, a, b)));
            store_masked(dst.add(full), e, tail);
            sum[1] = _mm512_add_ps(sum[1], e);
        }
        _mm512_reduce_add_ps(_mm512_add_ps(sum[0], sum[1]))
    }
}
simd_dispatch!(pub(crate) softmax_row => softmax_row_body(row: &mut [f32], scale: f32) -> f32);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_bf16_grade_is_accurate_below_zero() {
        let mut worst = 0f64;
        // below e^-80 (1.8e-35) the values only need to be tiny: they are summed with ones
        // near 1 and rounded to bf16
        let mut x = -80.0f32;
        while x <= 0.0 {
            let want = (x as f64).exp();
            worst = worst.max(((exp_bf16_grade(x) as f64 - want) / want).abs());
            x += 0.00731;
        }
        assert!(worst < 1e-4, "worst relative error {worst:e}");
        for x in [-80.5f32, -87.0, -100.0, -1000.0] {
            assert!(exp_bf16_grade(x) < 2e-35, "{x}");
        }
    }

    /// The AVX512-BF16 row max and exps against the portable ones (the same exp, rounded the same
    /// way) on lengths with and without a tail, and against f64 for the sum.
    #[test]
    fn softmax_numerators_in_bf16_paths_agree() {
        #[cfg(target_arch = "x86_64")]
        let fast = crate::cpu::common::bf16::has_avx512_bf16();
        #[cfg(not(target_arch = "x86_64"))]
        let fast = false;
        if !fast {
            // only the portable path exists here (checked against f32 by the AMX attention
            // test where AMX exists)
            return;
        }
        for n in [1usize, 5, 16, 33, 77, 100, 4096] {
            let row: Vec<f32> = (0..n)
                .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 40.0)
                .collect();
            let scale = 0.158;
            let (mut got, mut want) = (vec![0u16; n], vec![0u16; n]);
            let s_got = exp_row_bf16(&row, scale, row_max_f32(&row) * scale, &mut got);
            let s_want =
                exp_row_bf16_portable(&row, scale, row_max_portable(&row) * scale, &mut want);
            let max = row.iter().fold(f32::MIN, |a, &b| a.max(b));
            let exact: f64 = row
                .iter()
                .map(|&v| ((v as f64 - max as f64) * scale as f64).exp())
                .sum();
            assert!(
                ((s_got as f64 - exact) / exact).abs() < 1e-4,
                "n {n}: {s_got} vs {exact}"
            );
            assert!(((s_got - s_want) / s_want).abs() < 1e-5, "n {n}");
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                // the same value up to the last bit of the rounding (n rounded differently
                // at exact halves, the polynomial's operands in another order)
                assert!(g.abs_diff(*w) <= 1, "n {n}, {i}: {g:#x} vs {w:#x}");
            }
        }
    }

    #[test]
    fn exp_approx_is_accurate() {
        let mut worst = 0f32;
        let mut x = -80.0f32;
        while x < 80.0 {
            let rel = ((exp_approx(x) - x.exp()) / x.exp()).abs();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 5e-7, "worst relative error {worst:e}");
        assert_eq!(exp_approx(-1000.0) < 1e-37, true);
    }
}
