//! GroupNorm (optionally fused with the SiLU after it) and LayerNorm of f32 or bf16 CPU
//! tensors, computed in f32, bf16 results rounded once.

use crate::cpu::common::{contiguous, simd_dispatch, with_scratch};
use crate::cpu::exp::exp_approx;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::borrow::Cow;

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
            let x = crate::cpu::common::bf16::contiguous_bits(xs, xl, "group norm kernel")?;
            let mut out = vec![0u16; x.len()];
            out.par_chunks_mut(cpg * hw).enumerate().for_each(|(i, o)| {
                with_scratch(cpg * hw + hw, |buf| {
                    let (wide, tmp) = buf.split_at_mut(cpg * hw);
                    crate::cpu::common::bf16::widen_row(&x[i * cpg * hw..(i + 1) * cpg * hw], wide);
                    let ab = affine(i % g, wide);
                    for ch in 0..cpg {
                        let (a, bb) = ab(ch);
                        normalize(&wide[ch * hw..(ch + 1) * hw], tmp, a, bb, self.silu);
                        crate::cpu::common::bf16::narrow_row(tmp, &mut o[ch * hw..(ch + 1) * hw]);
                    }
                });
            });
            return Ok((crate::cpu::common::bf16::storage(out), xl.shape().clone()));
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
                _ => crate::cpu::common::bf16::contiguous_bits(s, l, op)?
                    .iter()
                    .map(|&b| crate::cpu::common::bf16::widen(b))
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
        let x = crate::cpu::common::bf16::contiguous_bits(xs, xl, op)?;
        let mut out = vec![0u16; x.len()];
        out.par_chunks_mut(rows_per_task)
            .zip(x.par_chunks(rows_per_task))
            .for_each(|(o, src)| {
                with_scratch(2 * n, |buf| {
                    let (row, res) = buf.split_at_mut(n);
                    for (o, src) in o.chunks_exact_mut(n).zip(src.chunks_exact(n)) {
                        crate::cpu::common::bf16::widen_row(src, row);
                        layer_norm_row(row, &w, &b, self.eps, res);
                        crate::cpu::common::bf16::narrow_row(res, o);
                    }
                });
            });
        Ok((crate::cpu::common::bf16::storage(out), xl.shape().clone()))
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
