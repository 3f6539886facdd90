//! The transformer's changes of layout on the CPU: image (b, c, h, w) to tokens (b, h w, c)
//! and back, the way back fused with the residual addition that follows it.
//!
//! Why: candle makes these permutes contiguous with its strided copy, on one thread, element
//! by element; in a bf16 U-Net step at 512x512 that was 2.7% of the CPU time with the other
//! core idle meanwhile. Here the transposes go through 32 x 32 blocks (both sides' cache
//! lines used whole) on all threads. The addition rounds as candle's and torch's do: exact
//! in f32, once to bf16 for bf16 values.

use crate::cpu::common::bf16::{from_bits, Element};
use crate::cpu::common::contiguous;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use half::bf16;
use rayon::prelude::*;

/// Side of the square blocks the transposes go through.
const TILE: usize = 32;

/// (b, c, h, w) -> (b, h w, c): the tokens of an image's pixels, channels last; `x` one that
/// [`takes`].
pub fn to_tokens(x: &Tensor) -> Result<Tensor> {
    x.dims4()?;
    x.apply_op1_no_bwd(&ToTokens)
}

/// residual (b, c, h, w) + tokens (b, h w, c) seen as an image: the transformer's output; both
/// of one type that [`takes`].
pub fn to_image_add(tokens: &Tensor, residual: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = residual.dims4()?;
    if tokens.dims() != [b, h * w, c] {
        candle_core::bail!(
            "to_image_add: tokens {:?} for an image {:?}",
            tokens.dims(),
            residual.dims()
        );
    }
    tokens.apply_op2_no_bwd(residual, &ToImageAdd)
}

/// Whether the kernels here take `x`: f32 and bf16 on the CPU.
pub fn takes(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::BF16)
}

/// dst (cols x rows) = src (rows x cols)^T, for one matrix; `f(dst, src, i)` writes each value,
/// `i` its index in dst. Parallel over blocks of dst's rows.
fn transpose<T: Copy + Send + Sync>(
    src: &[T],
    rows: usize,
    cols: usize,
    dst: &mut [T],
    f: impl Fn(&mut T, T, usize) + Sync,
) {
    dst.par_chunks_mut(TILE * rows)
        .enumerate()
        .for_each(|(blk, d)| {
            let c0 = blk * TILE;
            let nc = d.len() / rows;
            for r0 in (0..rows).step_by(TILE) {
                let nr = TILE.min(rows - r0);
                for j in 0..nc {
                    let at = (c0 + j) * rows + r0;
                    let drow = &mut d[j * rows + r0..][..nr];
                    for (i, dv) in drow.iter_mut().enumerate() {
                        f(dv, src[(r0 + i) * cols + c0 + j], at + i);
                    }
                }
            }
        });
}

struct ToTokens;

impl CustomOp1 for ToTokens {
    fn name(&self) -> &'static str {
        "sdgen-to-tokens"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = l.shape().dims4()?;
        let p = h * w;
        fn run<T: Copy + Default + Send + Sync>(x: &[T], b: usize, c: usize, p: usize) -> Vec<T> {
            let mut out = vec![T::default(); x.len()];
            for (o, xi) in out
                .chunks_exact_mut(c * p)
                .zip(x.chunks_exact(c * p))
                .take(b)
            {
                transpose(xi, c, p, o, |d, v, _| *d = v);
            }
            out
        }
        let out = match s {
            CpuStorage::F32(_) => {
                CpuStorage::F32(run(contiguous::<f32>(s, l, "to_tokens")?, b, c, p))
            }
            CpuStorage::BF16(_) => {
                CpuStorage::BF16(run(contiguous::<bf16>(s, l, "to_tokens")?, b, c, p))
            }
            _ => candle_core::bail!("to_tokens: {:?}", s.dtype()),
        };
        Ok((out, Shape::from((b, p, c))))
    }
}

struct ToImageAdd;

impl CustomOp2 for ToImageAdd {
    fn name(&self) -> &'static str {
        "sdgen-to-image-add"
    }

    fn cpu_fwd(
        &self,
        ts: &CpuStorage,
        tl: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, p, c) = tl.shape().dims3()?;
        fn run<T: Element + Default + Send + Sync>(
            t: &[T],
            r: &[T],
            b: usize,
            p: usize,
            c: usize,
        ) -> Vec<T> {
            let mut out = vec![T::default(); t.len()];
            for ((o, ti), ri) in out
                .chunks_exact_mut(p * c)
                .zip(t.chunks_exact(p * c))
                .zip(r.chunks_exact(p * c))
                .take(b)
            {
                // out (c x p) = t (p x c)^T + r, r in out's layout (a division per value to
                // find it from t's index made this op 3x the plain transpose)
                transpose(ti, p, c, o, |d, v, at| {
                    *d = T::from_f32(v.to_f32() + ri[at].to_f32())
                });
            }
            out
        }
        let out = match (ts, rs) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(run(
                contiguous::<f32>(ts, tl, "to_image_add")?,
                contiguous::<f32>(rs, rl, "to_image_add")?,
                b,
                p,
                c,
            )),
            (CpuStorage::BF16(_), CpuStorage::BF16(_)) => {
                let bits = |s, l| crate::cpu::common::bf16::contiguous_bits(s, l, "to_image_add");
                CpuStorage::BF16(from_bits(run(bits(ts, tl)?, bits(rs, rl)?, b, p, c)))
            }
            _ => candle_core::bail!("to_image_add: {:?} and {:?}", ts.dtype(), rs.dtype()),
        };
        Ok((out, rl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn values(t: &Tensor) -> Result<Vec<f32>> {
        t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
    }

    #[test]
    fn layouts_match_candle_permutes() -> Result<()> {
        let dev = Device::Cpu;
        // sizes that are not multiples of the block on either side
        for (b, c, h, w) in [(2, 40, 5, 7), (1, 64, 8, 8), (2, 3, 1, 33)] {
            for dtype in [DType::F32, DType::BF16] {
                let x = Tensor::randn(0f32, 1.0, (b, c, h, w), &dev)?.to_dtype(dtype)?;
                let want = x.permute((0, 2, 3, 1))?.reshape((b, h * w, c))?;
                let got = to_tokens(&x)?;
                assert_eq!(got.dims(), want.dims());
                assert_eq!(values(&got)?, values(&want)?, "{b} {c} {h} {w} {dtype:?}");

                let t = Tensor::randn(0f32, 1.0, (b, h * w, c), &dev)?.to_dtype(dtype)?;
                let image = t
                    .reshape((b, h, w, c))?
                    .permute((0, 3, 1, 2))?
                    .contiguous()?;
                let want = image.broadcast_add(&x)?;
                let got = to_image_add(&t, &x)?;
                assert_eq!(got.dims(), x.dims());
                assert_eq!(values(&got)?, values(&want)?, "{b} {c} {h} {w} {dtype:?}");
            }
        }
        Ok(())
    }
}
