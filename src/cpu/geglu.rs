//! diffusers' GEGLU after its projection, hidden * gelu(gate) with the exact-erf GELU, for f32
//! and bf16 CPU tensors, and the same on a 32 x 32 block of f32 accumulators for the bf16
//! linear layer that fuses it.

use crate::cpu::common::bf16::Element;
use crate::cpu::common::{contiguous, simd_dispatch};
use crate::cpu::exp::exp_approx;
use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

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
/// `bf16::layers::linear_geglu`): dst row i <- (h + bh) * gelu(g + bg) rounded to bf16, biases
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
            *v = crate::cpu::common::bf16::widen(x);
        }
    }
    for (i, row) in c.chunks_exact(32).take(rows).enumerate() {
        let d = std::slice::from_raw_parts_mut(dst.add(i * ld), 16);
        for j in 0..16 {
            let v = gated_gelu(row[j] + b[j], row[16 + j] + b[16 + j]);
            d[j] = crate::cpu::common::bf16::narrow(v);
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
            let h = crate::cpu::common::bf16::contiguous_bits(s, l, "geglu kernel")?;
            let mut out = vec![0u16; h.len() / 2];
            out.par_chunks_mut(per_task * inner)
                .zip(h.par_chunks(per_task * 2 * inner))
                .for_each(|(o, src)| geglu_rows_bf16(src, o, inner));
            return Ok((crate::cpu::common::bf16::storage(out), Shape::from(shape)));
        }
        let h = contiguous::<f32>(s, l, "geglu kernel")?;
        let mut out = vec![0f32; h.len() / 2];
        out.par_chunks_mut(per_task * inner)
            .zip(h.par_chunks(per_task * 2 * inner))
            .for_each(|(o, src)| geglu_rows(src, o, inner));
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

/// hidden * gelu_erf(gate) for an f32 or bf16 CPU tensor whose last dimension is
/// [hidden | gate].
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    h.contiguous()?.apply_op1_no_bwd(&Geglu)
}

#[cfg(test)]
mod tests {
    use super::*;

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
