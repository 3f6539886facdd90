//! `nn.Linear` of f32 CPU tensors on `gemm`, accumulating straight into the bias.

use crate::cpu::common::{contiguous, matmul};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

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
}
