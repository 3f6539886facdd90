//! The reference implementation of every operation in `ops`: candle's own ops composed, as
//! diffusers writes them. It runs on any device (on CUDA, candle's kernels), and the tests of
//! the CPU engine compare against it.

use super::ConvGeometry;
use candle_core::{DType, Module, Result, Tensor, D};

pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    candle_nn::Linear::new(weight.clone(), bias.cloned()).forward(x)
}

/// hidden * gelu_erf(gate) of h = [hidden | gate] (last dimension).
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    let half = h.dim(D::Minus1)? / 2;
    let hidden = h.narrow(D::Minus1, 0, half)?;
    let gate = h.narrow(D::Minus1, half, half)?;
    hidden * gate.gelu_erf()?
}

pub fn conv2d(x: &Tensor, weight: &Tensor, bias: &Tensor, g: ConvGeometry) -> Result<Tensor> {
    let y = x.conv2d(weight, g.padding, g.stride, 1, 1)?;
    y.broadcast_add(&bias.reshape((1, (), 1, 1))?)
}

pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let c = x.dim(1)?;
    let gn = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), c, groups, eps)?;
    let y = gn.forward(x)?;
    if silu {
        candle_nn::ops::silu(&y)
    } else {
        Ok(y)
    }
}

pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    candle_nn::LayerNorm::new(weight.clone(), bias.clone(), eps).forward(x)
}

/// softmax(q k^T / sqrt(d)) v over (batch, heads, len, dim) tensors: matmul, scale, softmax,
/// matmul, the scores in f32.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let in_dtype = q.dtype();
    let (q, k, v) = (
        q.to_dtype(DType::F32)?,
        k.to_dtype(DType::F32)?,
        v.to_dtype(DType::F32)?,
    );
    let d = q.dim(3)?;
    let scores = (q.matmul(&k.t()?.contiguous()?)? * (1.0 / (d as f64).sqrt()))?;
    candle_nn::ops::softmax_last_dim(&scores)?
        .matmul(&v)?
        .to_dtype(in_dtype)
}

/// (b, c, h, w) -> (b, h w, c).
pub fn to_tokens(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.permute((0, 2, 3, 1))?.reshape((b, h * w, c))
}
