//! Elementwise work on bf16 CPU tensors that candle does slowly: residual additions.
//!
//! Why: candle's CPU bf16 add converts through a non-inlined intrinsic call per 8 values; on
//! the bench machine adding two 2 x 320 x 64 x 64 bf16 tensors took 21 ms (f32: 0.7 ms), and
//! the U-Net adds such tensors dozens of times per step. Here each value is widened to f32
//! (exact), added, and rounded to nearest-even once, as torch does.

use crate::cpu::common::bf16::{contiguous_bits, narrow, storage, widen};
use crate::cpu::common::simd_dispatch;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

#[inline(always)]
fn add_body(a: &[u16], b: &[u16], out: &mut [u16]) {
    for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
        *o = narrow(widen(x) + widen(y));
    }
}

#[inline(always)]
fn add_scalar_body(a: &[u16], s: f32, out: &mut [u16]) {
    for (o, &x) in out.iter_mut().zip(a) {
        *o = narrow(widen(x) + s);
    }
}
simd_dispatch!(add_rows => add_body(a: &[u16], b: &[u16], out: &mut [u16]) -> ());
simd_dispatch!(add_scalar_rows => add_scalar_body(a: &[u16], s: f32, out: &mut [u16]) -> ());

/// a + b where b has a's shape, or one value per leading row of a (b's elements divide a's:
/// a (batch, channels, h, w) + b (batch, channels, 1, 1)).
struct Add;

impl CustomOp2 for Add {
    fn name(&self) -> &'static str {
        "sdgen-add-bf16"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, b) = (
            contiguous_bits(s1, l1, "bf16 add")?,
            contiguous_bits(s2, l2, "bf16 add")?,
        );
        let mut out = vec![0u16; a.len()];
        const CHUNK: usize = 1 << 14;
        if a.len() == b.len() {
            out.par_chunks_mut(CHUNK)
                .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
                .for_each(|(o, (x, y))| add_rows(x, y, o));
        } else {
            let row = a.len() / b.len();
            out.par_chunks_mut(row)
                .zip(a.par_chunks(row).zip(b.par_iter()))
                .for_each(|(o, (x, &y))| add_scalar_rows(x, widen(y), o));
        }
        Ok((storage(out), l1.shape().clone()))
    }
}

/// a + b for bf16 CPU tensors of the same shape, or b one value per leading (batch, channel)
/// row of a (see [`takes`]).
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !takes(a, b) {
        candle_core::bail!(
            "bf16 add: {:?} {:?} + {:?} {:?}",
            a.dtype(),
            a.dims(),
            b.dtype(),
            b.dims()
        );
    }
    a.contiguous()?.apply_op2_no_bwd(&b.contiguous()?, &Add)
}

/// Whether [`add`] takes a + b: both bf16 on the CPU, b of a's shape or one value per leading
/// row of a.
pub fn takes(a: &Tensor, b: &Tensor) -> bool {
    a.dtype() == DType::BF16
        && b.dtype() == DType::BF16
        && a.device().is_cpu()
        && (a.dims() == b.dims() || is_per_row(a.dims(), b.dims()))
}

/// Whether b's dims are a's leading dims followed by ones (at least one).
fn is_per_row(a: &[usize], b: &[usize]) -> bool {
    a.len() == b.len()
        && (1..a.len()).any(|split| a[..split] == b[..split] && b[split..].iter().all(|&d| d == 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn add_matches_candle_for_same_shape_and_per_channel() -> Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 1.0, (2, 5, 3, 7), &dev)?;
        for b in [
            Tensor::randn(0f32, 1.0, (2, 5, 3, 7), &dev)?,
            Tensor::randn(0f32, 1.0, (2, 5, 1, 1), &dev)?,
            Tensor::randn(0f32, 1.0, (2, 1, 1, 1), &dev)?,
        ] {
            let (ab, bb) = (a.to_dtype(DType::BF16)?, b.to_dtype(DType::BF16)?);
            let got = add(&ab, &bb)?;
            // candle's own bf16 add (widen, add, round) is the reference
            let want = ab.broadcast_add(&bb)?;
            assert_eq!(got.dims(), want.dims());
            let diff = (got.to_dtype(DType::F32)? - want.to_dtype(DType::F32)?)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "b {:?}", b.dims());
        }
        Ok(())
    }
}
