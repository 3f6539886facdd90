//! CPU kernels that candle's op-by-op execution cannot match: a fused attention that never
//! materialises the whole score matrix, with a vectorised exp for its softmax.
//!
//! Why: at 512x512 each self-attention of the SD 1.5 U-Net scores 2 x 8 x 4096 x 4096 pairs.
//! Done op by op (matmul, scale, softmax, matmul) that is about 1 GB written and read back
//! several times per layer, plus a scalar `expf` per score. Here each worker takes a block of
//! query rows of one head, computes its scores into a cache-sized scratch buffer with `gemm`,
//! applies softmax in place with a polynomial exp that the compiler vectorises, and multiplies
//! by V straight into the output.

use crate::bf16_ops::Element;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::borrow::Cow;

/// Query rows per block: 64 rows x 4096 keys x 4 bytes = 1 MiB of scores, within L2.
/// Work is split across threads by head (batch x heads items).
const ROWS: usize = 64;

/// Defines `$name`, which runs `$body` (an `#[inline(always)]` function whose loops are
/// written to vectorise) compiled for AVX-512 (16 lanes) or else AVX2 + FMA (8 lanes) when the
/// CPU has them, else as built. Each lane computes the same operations in the same order
/// whatever the width, so all three give the same results.
macro_rules! simd_dispatch {
    ($vis:vis $name:ident => $body:ident ($($arg:ident : $ty:ty),*) -> $ret:ty) => {
        $vis fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn with_avx512($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn with_avx2($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports the features the function is compiled for.
                    return unsafe { with_avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports the features the function is compiled for.
                    return unsafe { with_avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

pub(crate) use simd_dispatch;

/// exp(x) for f32 in the style of Cephes `expf` (the polynomial of `exp256_ps`), branch-free
/// so that loops over slices vectorise; relative error about 2e-7 over the softmax range.
#[inline(always)]
fn exp_approx(x: f32) -> f32 {
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
            o[i] = crate::bf16_ops::narrow(e);
            acc[i] += e;
        }
    }
    let mut tail_sum = 0f32;
    for (&v, o) in tail.iter().zip(outs.into_remainder()) {
        let e = exp_bf16_grade(v.mul_add(scale, -shift));
        *o = crate::bf16_ops::narrow(e);
        tail_sum += e;
    }
    acc.iter().sum::<f32>() + tail_sum
}

simd_dispatch!(exp_row_bf16_portable => exp_row_bf16_body(row: &[f32], scale: f32, shift: f32, out: &mut [u16]) -> f32);
simd_dispatch!(row_max_portable => row_max(row: &[f32]) -> f32);

/// The largest value of a row (-inf for an empty one).
pub(crate) fn row_max_f32(row: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::bf16_ops::has_avx512_bf16() {
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
    if crate::bf16_ops::has_avx512_bf16() {
        // SAFETY: the CPU has the features (checked just above); the lengths are equal.
        return unsafe { avx512_bf16::exp_row(row, scale, shift, out) };
    }
    exp_row_bf16_portable(row, scale, shift, out)
}

#[cfg(target_arch = "x86_64")]
mod avx512_bf16 {
    use crate::bf16_ops::fast::{store as store_bf16, store_masked};
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

/// C (m x n, row stride `ldc`) = A (m x k, row stride `lda`) x B, plus C's values when
/// `accumulate`; B (k x n) is given by its row and column strides. The `gemm` crate's call with
/// the arguments every kernel here shares.
///
/// # Safety
/// The pointers must cover those shapes and strides; C must not overlap A or B.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul(
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    ldc: isize,
    accumulate: bool,
    a: *const f32,
    lda: isize,
    b: *const f32,
    b_rs: isize,
    b_cs: isize,
    parallelism: gemm::Parallelism,
) {
    // SAFETY: the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            ldc,
            accumulate,
            a,
            1,
            lda,
            b,
            b_cs,
            b_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's scratch buffer of `len` values, kept between calls (grown, never
/// shrunk). Its contents are whatever the last user left: callers write before they read.
/// Must not be re-entered from `f` on the same thread (a nested call gets a fresh buffer).
pub(crate) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    scratch_in(&SCRATCH, len, f)
}

/// [`with_scratch`] for the thread-local buffer `key` (one per element type).
pub(crate) fn scratch_in<T: Copy + Default, R>(
    key: &'static std::thread::LocalKey<std::cell::RefCell<Vec<T>>>,
    len: usize,
    f: impl FnOnce(&mut [T]) -> R,
) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                buf.resize(len, T::default());
            }
            f(&mut buf[..len])
        }
        Err(_) => f(&mut vec![T::default(); len]),
    })
}

/// The data of a contiguous CPU tensor of element type `T`.
pub(crate) fn contiguous<'a, T: candle_core::WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
) -> Result<&'a [T]> {
    let Ok(v) = s.as_slice::<T>() else {
        candle_core::bail!("{op}: {} only", T::DTYPE.as_str());
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{op}: inputs must be contiguous"),
    }
}

/// Per-thread buffers of the fused attention.
struct Scratch<'a> {
    scores: &'a mut [f32],
    kt: &'a mut [f32],
    vp: &'a mut [f32],
    o: &'a mut [f32],
}

/// softmax(q k^T * scale) v for (batch, tq, d) x (batch, tk, d) x (batch, tk, dv), f32,
/// contiguous.
struct FusedAttention {
    scale: f32,
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "sdgen-fused-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, tq, d) = ql.shape().dims3()?;
        let (_, tk, _) = kl.shape().dims3()?;
        let (_, _, dv) = vl.shape().dims3()?;
        let q = contiguous::<f32>(qs, ql, "fused attention")?;
        let k = contiguous::<f32>(ks, kl, "fused attention")?;
        let v = contiguous::<f32>(vs, vl, "fused attention")?;
        // every value is written below: no zero fill
        let mut out: Vec<f32> = Vec::with_capacity(b * tq * dv);
        let dst = SharedOut(out.as_mut_ptr());
        // V's rows padded to a multiple of 16 values: with 40 (SD 1.5 at 64x64) `gemm` would
        // repack V for every block of rows
        let dvp = dv.next_multiple_of(16);
        let len = ROWS * tk + d * tk + tk * dvp + ROWS * dvp;
        (0..b).into_par_iter().for_each(|h| {
            let dst = dst;
            with_scratch(len, |buf| {
                let (scores, rest) = buf.split_at_mut(ROWS * tk);
                let (kt, rest) = rest.split_at_mut(d * tk);
                let (vp, o) = rest.split_at_mut(tk * dvp);
                let sc = Scratch { scores, kt, vp, o };
                let k_h = &k[h * tk * d..(h + 1) * tk * d];
                let v_h = &v[h * tk * dv..(h + 1) * tk * dv];
                // K^T (d x tk) once per head: `gemm` then reads it in place instead of
                // repacking K for every block of rows
                for (key, row) in k_h.chunks_exact(d).enumerate() {
                    for (j, &x) in row.iter().enumerate() {
                        sc.kt[j * tk + key] = x;
                    }
                }
                for (src, dstrow) in v_h.chunks_exact(dv).zip(sc.vp.chunks_exact_mut(dvp)) {
                    dstrow[..dv].copy_from_slice(src);
                    dstrow[dv..].fill(0.0);
                }
                for row0 in (0..tq).step_by(ROWS) {
                    let rows = ROWS.min(tq - row0);
                    let q_blk = &q[(h * tq + row0) * d..(h * tq + row0 + rows) * d];
                    let s = &mut sc.scores[..rows * tk];
                    // SAFETY: every pointer covers rows/cols x strides of its slice.
                    unsafe {
                        // s = q_blk (rows x d) @ kt (d x tk)
                        matmul(
                            rows,
                            tk,
                            d,
                            s.as_mut_ptr(),
                            tk as isize,
                            false,
                            q_blk.as_ptr(),
                            d as isize,
                            sc.kt.as_ptr(),
                            tk as isize,
                            1,
                            gemm::Parallelism::None,
                        );
                    }
                    let mut inv = [0f32; ROWS];
                    for (r, row) in s.chunks_mut(tk).enumerate() {
                        inv[r] = 1.0 / softmax_row(row, self.scale);
                    }
                    unsafe {
                        // o = s (rows x tk) @ vp (tk x dvp)
                        matmul(
                            rows,
                            dvp,
                            tk,
                            sc.o.as_mut_ptr(),
                            dvp as isize,
                            false,
                            s.as_ptr(),
                            tk as isize,
                            sc.vp.as_ptr(),
                            dvp as isize,
                            1,
                            gemm::Parallelism::None,
                        );
                    }
                    for (r, o) in sc.o.chunks_exact(dvp).take(rows).enumerate() {
                        // SAFETY: head h owns out[h * tq * dv..(h + 1) * tq * dv]; this writes
                        // row row0 + r of it.
                        let out_row = unsafe {
                            std::slice::from_raw_parts_mut(
                                dst.0
                                    .add((h * tq + row0 + r) * dv)
                                    .cast::<std::mem::MaybeUninit<f32>>(),
                                dv,
                            )
                        };
                        for (y, &x) in out_row.iter_mut().zip(&o[..dv]) {
                            y.write(x * inv[r]);
                        }
                    }
                }
            });
        });
        // SAFETY: the heads wrote all b x tq x dv values.
        unsafe { out.set_len(b * tq * dv) };
        Ok((CpuStorage::F32(out), Shape::from((b, tq, dv))))
    }
}

/// softmax(q k^T / sqrt(d)) v over (batch, heads, len, dim) f32 CPU tensors.
pub fn fused_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (b, h, tq, d) = q.dims4()?;
    let tk = k.dim(2)?;
    let dv = v.dim(3)?;
    let q3 = q.reshape((b * h, tq, d))?.contiguous()?;
    let k3 = k.reshape((b * h, tk, d))?.contiguous()?;
    let v3 = v.reshape((b * h, tk, dv))?.contiguous()?;
    let op = FusedAttention {
        scale: 1.0 / (d as f32).sqrt(),
    };
    q3.apply_op3_no_bwd(&k3, &v3, &op)?.reshape((b, h, tq, dv))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_matches_candle() -> Result<()> {
        use candle_core::Module;
        let dev = candle_core::Device::Cpu;
        for (shape, n) in [
            (vec![2, 7, 33], 45),
            (vec![5, 16], 8),
            (vec![1, 300, 64], 96),
        ] {
            let k = *shape.last().unwrap();
            let x = Tensor::randn(0f32, 1.0, shape.as_slice(), &dev)?;
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
            let b = Tensor::randn(0f32, 1.0, n, &dev)?;
            for bias in [Some(&b), None] {
                let got = linear(&x, &w, bias)?;
                let want = candle_nn::Linear::new(w.clone(), bias.cloned()).forward(&x)?;
                assert_eq!(got.dims(), want.dims());
                let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(
                    diff < 1e-4,
                    "{shape:?} x {n}, bias {}: {diff}",
                    bias.is_some()
                );
            }
        }
        Ok(())
    }

    #[test]
    fn conv2d_matches_candle_for_each_geometry() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        // (cin, cout, h, w, kernel, stride, padding): padding on both sides of short rows,
        // stride 2 with odd and even sizes, 1x1, padding larger than 1
        let cases = [
            (3, 5, 7, 9, 3, 1, 1),
            (4, 6, 9, 8, 3, 2, 1),
            (4, 6, 8, 9, 3, 2, 0),
            (5, 3, 6, 6, 1, 1, 0),
            (2, 4, 5, 3, 3, 1, 2),
            (8, 8, 33, 70, 3, 1, 1),
        ];
        for (cin, cout, h, w, k, stride, padding) in cases {
            let x = Tensor::randn(0f32, 1.0, (2, cin, h, w), &dev)?;
            let wt = Tensor::randn(0f32, 1.0, (cout, cin, k, k), &dev)?;
            let b = Tensor::randn(0f32, 1.0, cout, &dev)?;
            let got = conv2d(&x, &wt, &b, ConvGeometry { stride, padding })?;
            let want = x
                .conv2d(&wt, padding, stride, 1, 1)?
                .broadcast_add(&b.reshape((1, cout, 1, 1))?)?;
            assert_eq!(got.dims(), want.dims());
            let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                diff < 1e-4,
                "{cin}->{cout} {h}x{w} k{k} s{stride} p{padding}: {diff}"
            );
        }
        Ok(())
    }

    #[test]
    fn group_norm_of_bf16_is_the_f32_result_rounded() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let bf16 = candle_core::DType::BF16;
        let x = (Tensor::randn(0f32, 2.0, (2, 8, 5, 7), &dev)? + 0.5)?.to_dtype(bf16)?;
        let w = Tensor::randn(1f32, 0.2, 8, &dev)?;
        let b = Tensor::randn(0f32, 0.2, 8, &dev)?;
        for silu in [false, true] {
            let got = group_norm(&x, 4, &w, &b, 1e-5, silu)?;
            assert_eq!(got.dtype(), bf16);
            let want = group_norm(&x.to_dtype(candle_core::DType::F32)?, 4, &w, &b, 1e-5, silu)?
                .to_dtype(bf16)?;
            let same = got
                .eq(&want)?
                .to_dtype(candle_core::DType::F32)?
                .mean_all()?;
            assert_eq!(same.to_scalar::<f32>()?, 1.0, "silu {silu}");
        }
        Ok(())
    }

    #[test]
    fn geglu_of_bf16_is_the_f32_result_rounded() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let bf16 = candle_core::DType::BF16;
        let h = Tensor::randn(0f32, 3.0, (2, 37, 2 * 40), &dev)?.to_dtype(bf16)?;
        let got = geglu(&h)?;
        assert_eq!(got.dtype(), bf16);
        let want = geglu(&h.to_dtype(candle_core::DType::F32)?)?.to_dtype(bf16)?;
        let same = got
            .eq(&want)?
            .to_dtype(candle_core::DType::F32)?
            .mean_all()?;
        assert_eq!(same.to_scalar::<f32>()?, 1.0);
        Ok(())
    }

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
        let fast = crate::bf16_ops::has_avx512_bf16();
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
    fn layer_norm_matches_candle_in_f32_and_rounds_once_in_bf16() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let bf16 = candle_core::DType::BF16;
        // rows of 320 (SD's width) and 77 (a tail), an offset mean
        for n in [320usize, 77] {
            let x = (Tensor::randn(0f32, 1.0, (2, 33, n), &dev)? + 3.0)?.to_dtype(bf16)?;
            let w = Tensor::randn(1f32, 0.2, n, &dev)?.to_dtype(bf16)?;
            let b = Tensor::randn(0f32, 0.2, n, &dev)?.to_dtype(bf16)?;
            let got = layer_norm(&x, &w, &b, 1e-5)?.to_dtype(candle_core::DType::F32)?;
            let f = |t: &Tensor| t.to_dtype(candle_core::DType::F32);
            let want = candle_nn::ops::layer_norm_slow(&f(&x)?, &f(&w)?, &f(&b)?, 1e-5)?;
            // f32: the same up to the sums' order
            let got32 = layer_norm(&f(&x)?, &f(&w)?, &f(&b)?, 1e-5)?;
            let err32 = (got32 - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err32 < 1e-5, "n {n}: f32 {err32}");
            // one rounding to bf16: within 2^-8 of the value (plus the f32 sums' error)
            let err = ((got - &want)?.abs()? / (want.abs()? + 1e-3)?)?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(err < 1.0 / 250.0, "n {n}: {err}");
        }
        Ok(())
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

    #[test]
    fn geglu_matches_exact_gelu() {
        let dev = candle_core::Device::Cpu;
        let h = Tensor::randn(0f32, 3.0, (2, 37, 2 * 40), &dev).unwrap();
        let got = geglu(&h).unwrap();
        let hidden = h.narrow(2, 0, 40).unwrap();
        let gate = h.narrow(2, 40, 40).unwrap();
        let want = (hidden * gate.gelu_erf().unwrap()).unwrap();
        // relative to 1 + |want|: products reach ~80 here, where one f32 ulp is 8e-6 (an
        // absolute bound of 5e-6 failed now and then on fresh random inputs)
        let diff = ((got - &want).unwrap().abs().unwrap() / (want.abs().unwrap() + 1.0).unwrap())
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 5e-6, "max relative diff {diff}");
        let mut worst = 0f32;
        for i in -4000..4000 {
            let x = i as f32 / 1000.0;
            worst = worst.max((erf_approx(x) - libm_erf(x)).abs());
        }
        assert!(worst < 1e-6, "erf error {worst}");
    }

    /// erf by its Taylor/continued series in f64, as a reference.
    fn libm_erf(x: f32) -> f32 {
        let x = x as f64;
        // erf(x) = 2/sqrt(pi) * sum_n (-1)^n x^(2n+1) / (n! (2n+1)), converges for |x| <= 4
        let mut sum = 0.0;
        let mut term = x;
        let mut n = 0.0;
        while term.abs() > 1e-17 || n < 10.0 {
            sum += term / (2.0 * n + 1.0);
            n += 1.0;
            term *= -x * x / n;
            if n > 200.0 {
                break;
            }
        }
        (sum * 2.0 / std::f64::consts::PI.sqrt()) as f32
    }
}

/// A raw output pointer shared by workers that write disjoint regions (the kernels here, in
/// `winograd` and in `amx_ops`).
pub(crate) struct SharedOut<T>(pub(crate) *mut T);
// derived Clone/Copy would require T: Copy; the pointer is always copyable
impl<T> Clone for SharedOut<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SharedOut<T> {}
// SAFETY: every worker writes a region no other worker touches.
unsafe impl<T> Send for SharedOut<T> {}
unsafe impl<T> Sync for SharedOut<T> {}

/// Fewest 2x2 output tiles (over the batch) for which a 3x3 convolution uses Winograd.
static WINOGRAD_MIN_TILES: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(512);

/// Sets the fewest tiles for which 3x3 convolutions use Winograd (`winograd`), for the whole
/// process: 0 makes every 3x3, stride 1, padding 1 convolution use it (tests with small
/// models), `usize::MAX` none.
pub fn set_winograd_min_tiles(tiles: usize) {
    WINOGRAD_MIN_TILES.store(tiles, std::sync::atomic::Ordering::Relaxed);
}

/// Convolution geometry (groups = 1, dilation = 1).
#[derive(Clone, Copy, Debug)]
pub struct ConvGeometry {
    pub stride: usize,
    pub padding: usize,
}

impl ConvGeometry {
    /// Output height and width for an h x w input and a kh x kw kernel.
    pub fn output_size(&self, h: usize, w: usize, kh: usize, kw: usize) -> (usize, usize) {
        (
            (h + 2 * self.padding - kh) / self.stride + 1,
            (w + 2 * self.padding - kw) / self.stride + 1,
        )
    }
}

/// One row of a convolution's patch matrix: for kernel tap (ky, kx) of one input plane
/// (h x wd), the input value under each output pixel p0, p0 + 1, ... (output width wo), zero
/// in the padding. Whole in-bounds runs are copied at once.
#[allow(clippy::too_many_arguments)]
pub(crate) fn patch_row<T: Copy>(
    plane: &[T],
    h: usize,
    wd: usize,
    wo: usize,
    ky: usize,
    kx: usize,
    g: ConvGeometry,
    p0: usize,
    row: &mut [T],
    zero: T,
) {
    let ConvGeometry { stride, padding } = g;
    let mut idx = 0;
    while idx < row.len() {
        let (oy, ox0) = ((p0 + idx) / wo, (p0 + idx) % wo);
        let seg = (wo - ox0).min(row.len() - idx);
        let out_seg = &mut row[idx..idx + seg];
        let iy = (oy * stride + ky) as isize - padding as isize;
        if iy < 0 || iy as usize >= h {
            out_seg.fill(zero);
        } else {
            let in_row = &plane[iy as usize * wd..(iy as usize + 1) * wd];
            // ix = (ox0 + j) * stride + kx - padding is in the row for j in
            // lo..hi; zeros outside (the padding)
            let first = (ox0 * stride + kx) as isize - padding as isize;
            let lo = if first >= 0 {
                0
            } else {
                ((-first) as usize).div_ceil(stride).min(seg)
            };
            let hi = if first >= wd as isize {
                lo
            } else {
                ((wd as isize - first) as usize)
                    .div_ceil(stride)
                    .clamp(lo, seg)
            };
            out_seg[..lo].fill(zero);
            out_seg[hi..].fill(zero);
            if hi > lo {
                let start = (first + (lo * stride) as isize) as usize;
                if stride == 1 {
                    out_seg[lo..hi].copy_from_slice(&in_row[start..start + hi - lo]);
                } else {
                    for (o, i) in out_seg[lo..hi].iter_mut().zip((start..).step_by(stride)) {
                        *o = in_row[i];
                    }
                }
            }
        }
        idx += seg;
    }
}

struct Conv2d {
    g: ConvGeometry,
}

impl CustomOp3 for Conv2d {
    fn name(&self) -> &'static str {
        "sdgen-conv2d"
    }

    /// x (b, cin, h, w), weight (cout, cin, kh, kw), bias (cout): blocks of output pixels are
    /// unfolded into a cache-sized patch matrix and multiplied by the weights with `gemm`,
    /// straight into the NCHW output (candle unfolds the whole image first, multiplies, then
    /// transposes the result into place).
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, cin, h, wd) = xl.shape().dims4()?;
        let (cout, _, kh, kw) = wl.shape().dims4()?;
        let x = contiguous::<f32>(xs, xl, "conv2d kernel")?;
        let w = contiguous::<f32>(ws, wl, "conv2d kernel")?;
        let bias = contiguous::<f32>(bs, bl, "conv2d kernel")?;
        let ConvGeometry { stride, padding } = self.g;
        // Winograd pays off once there are enough tiles to amortise transforming the weights
        // (measured, 2 threads: 320 ch at 64x64 57 -> 35 ms, 640 ch at 32x32 52 -> 40 ms, but
        // 1280 ch at 16x16 51 -> 75 ms)
        let tiles = h.div_ceil(2) * wd.div_ceil(2);
        let min_tiles = WINOGRAD_MIN_TILES.load(std::sync::atomic::Ordering::Relaxed);
        if (kh, kw, stride, padding) == (3, 3, 1, 1) && b * tiles >= min_tiles {
            let out = crate::winograd::conv3x3(x, b, cin, h, wd, w, bias, cout);
            return Ok((CpuStorage::F32(out), Shape::from((b, cout, h, wd))));
        }
        let (ho, wo) = self.g.output_size(h, wd, kh, kw);
        let p = ho * wo;
        let k = cin * kh * kw;
        // about 1 MiB of patches per block, at least 128 pixels (each block repacks the
        // weights; the thread keeps its largest patch buffer: 128 x 23040 values at most in SD)
        let pb = ((1usize << 20) / k).clamp(128, 2048).min(p);
        let blocks = p.div_ceil(pb);
        // every value is written below (bias, then gemm adds into it): no zero fill
        let mut out: Vec<f32> = Vec::with_capacity(b * cout * p);
        let dst = SharedOut(out.as_mut_ptr());
        (0..b * blocks).into_par_iter().for_each(|task| {
            let dst = dst;
            with_scratch(pb * k, |patches| {
                let (bi, blk) = (task / blocks, task % blocks);
                let p0 = blk * pb;
                let n = pb.min(p - p0);
                let xb = &x[bi * cin * h * wd..(bi + 1) * cin * h * wd];
                // patches: k rows (cin, ky, kx) x n columns (pixels p0..p0+n); each row is
                // filled one output-row segment at a time, a shifted copy of an input row
                for (kk, row) in patches[..k * n].chunks_mut(n).enumerate() {
                    let (c, ky, kx) = (kk / (kh * kw), (kk / kw) % kh, kk % kw);
                    let plane = &xb[c * h * wd..(c + 1) * h * wd];
                    patch_row(plane, h, wd, wo, ky, kx, self.g, p0, row, 0.0);
                }
                // SAFETY: this task owns out[bi, :, p0..p0+n]; all strides match the shapes.
                unsafe {
                    let base = dst.0.add(bi * cout * p + p0);
                    for co in 0..cout {
                        let o = std::slice::from_raw_parts_mut(
                            base.add(co * p).cast::<std::mem::MaybeUninit<f32>>(),
                            n,
                        );
                        o.fill(std::mem::MaybeUninit::new(bias[co]));
                    }
                    // out (cout x n, row stride p) += w (cout x k) @ patches (k x n)
                    matmul(
                        cout,
                        n,
                        k,
                        base,
                        p as isize,
                        true,
                        w.as_ptr(),
                        k as isize,
                        patches.as_ptr(),
                        n as isize,
                        1,
                        gemm::Parallelism::None,
                    );
                }
            });
        });
        // SAFETY: the tasks wrote all b x cout x p values.
        unsafe { out.set_len(b * cout * p) };
        Ok((CpuStorage::F32(out), Shape::from((b, cout, ho, wo))))
    }
}

/// 2-D convolution (groups 1, dilation 1) of f32 CPU tensors with the blocked kernel.
pub fn conv2d(x: &Tensor, weight: &Tensor, bias: &Tensor, g: ConvGeometry) -> Result<Tensor> {
    let x = x.contiguous()?;
    x.apply_op3_no_bwd(&weight.contiguous()?, &bias.contiguous()?, &Conv2d { g })
}

/// Sum and sum of squares of a slice with independent lanes (vectorisable), in f64 at the end.
#[inline(always)]
fn sum_and_squares(x: &[f32]) -> (f64, f64) {
    const L: usize = 16;
    let mut s = [0f32; L];
    let mut q = [0f32; L];
    let chunks = x.chunks_exact(L);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..L {
            s[i] += c[i];
            q[i] += c[i] * c[i];
        }
    }
    let mut sum: f64 = s.iter().map(|&v| v as f64).sum();
    let mut sq: f64 = q.iter().map(|&v| v as f64).sum();
    for &v in tail {
        sum += v as f64;
        sq += (v as f64) * (v as f64);
    }
    (sum, sq)
}

#[inline(always)]
fn silu(x: f32) -> f32 {
    x / (1.0 + exp_approx(-x))
}

/// GroupNorm over (b, c, h, w) f32, optionally followed by SiLU, one pass for the statistics
/// and one for the output (candle composes it from a dozen broadcast ops).
struct GroupNormOp {
    groups: usize,
    eps: f64,
    silu: bool,
}

#[inline(always)]
fn normalize_body(src: &[f32], dst: &mut [f32], a: f32, b: f32, act: bool) {
    if act {
        for (o, &v) in dst.iter_mut().zip(src) {
            *o = silu(v * a + b);
        }
    } else {
        for (o, &v) in dst.iter_mut().zip(src) {
            *o = v * a + b;
        }
    }
}

simd_dispatch!(normalize => normalize_body(src: &[f32], dst: &mut [f32], a: f32, b: f32, act: bool) -> ());

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "sdgen-group-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = xl.shape().dims().to_vec();
        let c = dims[1];
        let hw: usize = dims[2..].iter().product();
        let w = contiguous::<f32>(ws, wl, "group norm kernel")?;
        let bias = contiguous::<f32>(bs, bl, "group norm kernel")?;
        let g = self.groups;
        let cpg = c / g;
        // the per-channel scale and shift of group gi from its values
        let affine = |gi: usize, src: &[f32]| {
            let (sum, sq) = sum_and_squares(src);
            let n = src.len() as f64;
            let mean = sum / n;
            let var = (sq / n - mean * mean).max(0.0);
            let rstd = 1.0 / (var + self.eps).sqrt();
            move |ch: usize| {
                let cc = gi * cpg + ch;
                let a = (w[cc] as f64 * rstd) as f32;
                let bb = (bias[cc] as f64 - mean * rstd * w[cc] as f64) as f32;
                (a, bb)
            }
        };
        if let CpuStorage::BF16(_) = xs {
            // bf16 in and out: each group widened into scratch, normalised, rounded back
            let x = crate::bf16_ops::contiguous_bits(xs, xl, "group norm kernel")?;
            let mut out = vec![0u16; x.len()];
            out.par_chunks_mut(cpg * hw).enumerate().for_each(|(i, o)| {
                with_scratch(cpg * hw + hw, |buf| {
                    let (wide, tmp) = buf.split_at_mut(cpg * hw);
                    crate::bf16_ops::widen_row(&x[i * cpg * hw..(i + 1) * cpg * hw], wide);
                    let ab = affine(i % g, wide);
                    for ch in 0..cpg {
                        let (a, bb) = ab(ch);
                        normalize(&wide[ch * hw..(ch + 1) * hw], tmp, a, bb, self.silu);
                        crate::bf16_ops::narrow_row(tmp, &mut o[ch * hw..(ch + 1) * hw]);
                    }
                });
            });
            return Ok((crate::bf16_ops::storage(out), xl.shape().clone()));
        }
        let x = contiguous::<f32>(xs, xl, "group norm kernel")?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(cpg * hw).enumerate().for_each(|(i, o)| {
            let src = &x[i * cpg * hw..(i + 1) * cpg * hw];
            let ab = affine(i % g, src);
            for ch in 0..cpg {
                let (a, bb) = ab(ch);
                normalize(
                    &src[ch * hw..(ch + 1) * hw],
                    &mut o[ch * hw..(ch + 1) * hw],
                    a,
                    bb,
                    self.silu,
                );
            }
        });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

/// GroupNorm (+ SiLU when `silu`) of an f32 or bf16 CPU tensor (b, c, ...); weight and bias
/// f32.
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    x.apply_op3_no_bwd(weight, bias, &GroupNormOp { groups, eps, silu })
}

/// erf(x) by Abramowitz & Stegun 7.1.26 (absolute error below 1e-6 in f32), branch-free so that
/// loops over slices vectorise.
#[inline(always)]
fn erf_approx(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let y = 1.0 - poly * exp_approx(-a * a);
    y.copysign(x)
}

/// GEGLU of one feature: hidden * gelu(gate), exact-erf GELU.
#[inline(always)]
fn gated_gelu(x: f32, g: f32) -> f32 {
    x * (0.5 * g * (1.0 + erf_approx(g * std::f32::consts::FRAC_1_SQRT_2)))
}

#[inline(always)]
fn geglu_body<T: Element>(h: &[T], out: &mut [T], inner: usize) {
    for (row_in, row_out) in h.chunks_exact(2 * inner).zip(out.chunks_exact_mut(inner)) {
        let (hidden, gate) = row_in.split_at(inner);
        for ((o, &x), &g) in row_out.iter_mut().zip(hidden).zip(gate) {
            *o = T::from_f32(gated_gelu(x.to_f32(), g.to_f32()));
        }
    }
}

#[inline(always)]
fn geglu_body_f32(h: &[f32], out: &mut [f32], inner: usize) {
    geglu_body(h, out, inner)
}

#[inline(always)]
fn geglu_body_bf16(h: &[u16], out: &mut [u16], inner: usize) {
    geglu_body(h, out, inner)
}

/// The GEGLU of one 32 x 32 block of a projection's f32 accumulators whose columns 0..16
/// are hidden features and 16..32 the gate features of the same 16 outputs (see
/// `amx_ops::linear_geglu`): dst row i <- (h + bh) * gelu(g + bg) rounded to bf16, biases
/// given as 32 bf16 values in the block's column order.
///
/// # Safety
/// `dst` has `rows` (at most 32) writable rows of 16 values at stride `ld`, owned by the
/// caller; `c` holds 32 x 32 values, `bias` 32 when given.
pub(crate) unsafe fn geglu_block(
    c: &[f32],
    bias: Option<&[u16]>,
    rows: usize,
    dst: *mut u16,
    ld: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        return geglu_block_avx512(c, bias, rows, dst, ld);
    }
    geglu_block_body(c, bias, rows, dst, ld)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn geglu_block_avx512(
    c: &[f32],
    bias: Option<&[u16]>,
    rows: usize,
    dst: *mut u16,
    ld: usize,
) {
    geglu_block_body(c, bias, rows, dst, ld)
}

#[inline(always)]
unsafe fn geglu_block_body(c: &[f32], bias: Option<&[u16]>, rows: usize, dst: *mut u16, ld: usize) {
    let mut b = [0f32; 32];
    if let Some(bias) = bias {
        for (v, &x) in b.iter_mut().zip(&bias[..32]) {
            *v = crate::bf16_ops::widen(x);
        }
    }
    for (i, row) in c.chunks_exact(32).take(rows).enumerate() {
        let d = std::slice::from_raw_parts_mut(dst.add(i * ld), 16);
        for j in 0..16 {
            let v = gated_gelu(row[j] + b[j], row[16 + j] + b[16 + j]);
            d[j] = crate::bf16_ops::narrow(v);
        }
    }
}

simd_dispatch!(geglu_rows => geglu_body_f32(h: &[f32], out: &mut [f32], inner: usize) -> ());
simd_dispatch!(geglu_rows_bf16 => geglu_body_bf16(h: &[u16], out: &mut [u16], inner: usize) -> ());

/// diffusers' GEGLU after its projection: hidden * gelu(gate) (exact-erf GELU), where the last
/// dimension of the input is [hidden | gate]; f32, or bf16 computed in f32.
struct Geglu;

impl candle_core::CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "sdgen-geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = l.shape().dims();
        let inner = dims[dims.len() - 1] / 2;
        let per_task = (1 << 14) / inner.max(1) + 1;
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("at least one dim") = inner;
        if let CpuStorage::BF16(_) = s {
            let h = crate::bf16_ops::contiguous_bits(s, l, "geglu kernel")?;
            let mut out = vec![0u16; h.len() / 2];
            out.par_chunks_mut(per_task * inner)
                .zip(h.par_chunks(per_task * 2 * inner))
                .for_each(|(o, src)| geglu_rows_bf16(src, o, inner));
            return Ok((crate::bf16_ops::storage(out), Shape::from(shape)));
        }
        let h = contiguous::<f32>(s, l, "geglu kernel")?;
        let mut out = vec![0f32; h.len() / 2];
        out.par_chunks_mut(per_task * inner)
            .zip(h.par_chunks(per_task * 2 * inner))
            .for_each(|(o, src)| geglu_rows(src, o, inner));
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

/// LayerNorm over the last dimension of f32 or bf16 values (weight and bias of the same
/// type), in f32: two passes for the variance, as torch, 16 lanes per sum, bf16 results
/// rounded once. candle's kernel sums each row in one serial f32 accumulator, takes
/// E[x^2] - mean^2, and converts every bf16 value through `half`.
struct LayerNormOp {
    eps: f32,
}

#[inline(always)]
fn layer_norm_row_body(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
    const L: usize = 16;
    let n = x.len();
    let chunks = x.chunks_exact(L);
    let tail = chunks.remainder();
    let mut acc = [0f32; L];
    for c in chunks.clone() {
        for i in 0..L {
            acc[i] += c[i];
        }
    }
    let mean = (acc.iter().sum::<f32>() + tail.iter().sum::<f32>()) / n as f32;
    let mut acc = [0f32; L];
    for c in chunks {
        for i in 0..L {
            let d = c[i] - mean;
            acc[i] += d * d;
        }
    }
    let tail_sq: f32 = tail.iter().map(|&v| (v - mean) * (v - mean)).sum();
    let var = (acc.iter().sum::<f32>() + tail_sq) / n as f32;
    let inv = 1.0 / (var + eps).sqrt();
    for (((o, &v), &w), &b) in out.iter_mut().zip(x).zip(w).zip(b) {
        *o = (v - mean) * inv * w + b;
    }
}

simd_dispatch!(layer_norm_row => layer_norm_row_body(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) -> ());

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "sdgen-layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = "layer norm kernel";
        // weight and bias in f32 (widened from bf16)
        fn wide<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<Cow<'a, [f32]>> {
            Ok(match s {
                CpuStorage::F32(_) => contiguous::<f32>(s, l, op)?.into(),
                _ => crate::bf16_ops::contiguous_bits(s, l, op)?
                    .iter()
                    .map(|&b| crate::bf16_ops::widen(b))
                    .collect::<Vec<_>>()
                    .into(),
            })
        }
        let (w, b) = (wide(ws, wl, op)?, wide(bs, bl, op)?);
        let n = w.len();
        if n == 0 || xl.shape().elem_count() % n != 0 || b.len() != n {
            candle_core::bail!("{op}: input {:?}, weight {n}", xl.dims());
        }
        let rows_per_task = ((1 << 14) / n).max(1) * n;
        if let CpuStorage::F32(_) = xs {
            let x = contiguous::<f32>(xs, xl, op)?;
            let mut out = vec![0f32; x.len()];
            out.par_chunks_mut(rows_per_task)
                .zip(x.par_chunks(rows_per_task))
                .for_each(|(o, src)| {
                    for (o, src) in o.chunks_exact_mut(n).zip(src.chunks_exact(n)) {
                        layer_norm_row(src, &w, &b, self.eps, o);
                    }
                });
            return Ok((CpuStorage::F32(out), xl.shape().clone()));
        }
        let x = crate::bf16_ops::contiguous_bits(xs, xl, op)?;
        let mut out = vec![0u16; x.len()];
        out.par_chunks_mut(rows_per_task)
            .zip(x.par_chunks(rows_per_task))
            .for_each(|(o, src)| {
                with_scratch(2 * n, |buf| {
                    let (row, res) = buf.split_at_mut(n);
                    for (o, src) in o.chunks_exact_mut(n).zip(src.chunks_exact(n)) {
                        crate::bf16_ops::widen_row(src, row);
                        layer_norm_row(row, &w, &b, self.eps, res);
                        crate::bf16_ops::narrow_row(res, o);
                    }
                });
            });
        Ok((crate::bf16_ops::storage(out), xl.shape().clone()))
    }
}

/// `nn.LayerNorm` (with weight and bias) over the last dimension of an f32 or bf16 CPU
/// tensor; weight and bias of its type.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f32) -> Result<Tensor> {
    x.contiguous()?.apply_op3_no_bwd(
        &weight.contiguous()?,
        &bias.contiguous()?,
        &LayerNormOp { eps },
    )
}

/// hidden * gelu_erf(gate) for an f32 or bf16 CPU tensor whose last dimension is
/// [hidden | gate].
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    h.contiguous()?.apply_op1_no_bwd(&Geglu)
}

/// x W^T + b over the last dimension (`nn.Linear`), f32, x and W contiguous.
///
/// Why not candle's `Linear`: its matmul zero-fills the output first and the bias is added in a
/// second pass into a second tensor; here the output rows start as the bias and `gemm`
/// accumulates into them (for the 320 -> 2560 projection over 8192 tokens that is 84 MB
/// written once instead of written, read, and written again).
struct LinearOp {
    has_bias: bool,
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "sdgen-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous::<f32>(xs, xl, "linear kernel")?;
        let w = contiguous::<f32>(ws, wl, "linear kernel")?;
        let bias = contiguous::<f32>(bs, bl, "linear kernel")?;
        let (n, k) = wl.shape().dims2()?;
        let dims = xl.shape().dims();
        if dims.last() != Some(&k) {
            candle_core::bail!("linear kernel: input {:?} does not end with {k}", dims);
        }
        let m = x.len() / k.max(1);
        let mut out: Vec<f32> = Vec::with_capacity(m * n);
        if self.has_bias {
            for _ in 0..m {
                out.extend_from_slice(bias);
            }
        }
        let threads = rayon::current_num_threads();
        // SAFETY: out has room for m x n values (row stride n), written in full by gemm when
        // there is no bias (read_dst false) and read then written when it holds the bias rows;
        // x is m x k and w is n x k, both contiguous.
        unsafe {
            matmul(
                m,
                n,
                k,
                out.as_mut_ptr(),
                n as isize,
                self.has_bias,
                x.as_ptr(),
                k as isize,
                w.as_ptr(),
                1,
                k as isize,
                if threads > 1 {
                    gemm::Parallelism::Rayon(threads)
                } else {
                    gemm::Parallelism::None
                },
            );
            out.set_len(m * n);
        }
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("at least one dim") = n;
        Ok((CpuStorage::F32(out), Shape::from(out_dims)))
    }
}

/// `nn.Linear` of f32 CPU tensors: x (..., in), weight (out, in), bias (out).
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let x = x.contiguous()?;
    let weight = weight.contiguous()?;
    // an empty bias stands for none (apply_op3 needs a tensor)
    let none = Tensor::zeros(0, candle_core::DType::F32, x.device())?;
    let op = LinearOp {
        has_bias: bias.is_some(),
    };
    x.apply_op3_no_bwd(&weight, bias.unwrap_or(&none), &op)
}
