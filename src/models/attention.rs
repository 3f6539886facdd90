//! diffusers' `Transformer2DModel` (continuous input), `BasicTransformerBlock`, `Attention`
//! and `GEGLU`, with diffusers' parameter names.
//!
//! Owned here rather than taken from candle-transformers because candle's GEGLU uses the tanh
//! approximation of GELU where diffusers uses the exact erf form (a visible difference against
//! diffusers' outputs), and because attention is the hot spot of the U-Net on CPU.

use super::layers::{in_f32, linear, linear_no_bias, on_cpu, GroupNorm, LayerNorm, Linear};
use crate::bf16_ops::add;
use crate::token_layout::{to_image_add, to_tokens};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

/// `Attention` with `AttnProcessor2_0` semantics: softmax(q k^T / sqrt(d)) v.
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl Attention {
    pub fn new(
        vb: VarBuilder,
        query_dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        dim_head: usize,
    ) -> Result<Self> {
        let inner = heads * dim_head;
        let context_dim = context_dim.unwrap_or(query_dim);
        Ok(Self {
            to_q: linear_no_bias(query_dim, inner, vb.pp("to_q"))?,
            to_k: linear_no_bias(context_dim, inner, vb.pp("to_k"))?,
            to_v: linear_no_bias(context_dim, inner, vb.pp("to_v"))?,
            to_out: linear(inner, query_dim, vb.pp("to_out.0"))?,
            heads,
        })
    }

    pub fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let context = context.unwrap_or(xs);
        let q = self.to_q.forward(xs)?;
        let k = self.to_k.forward(context)?;
        let v = self.to_v.forward(context)?;
        let out = multi_head_attention(q, k, v, self.heads)?;
        self.to_out.forward(&out)
    }
}

/// softmax(q k^T * d^-0.5) v with the heads side by side in the last dim, as the projections
/// give them and the output projection takes them: q (b, tq, heads x d), k (b, tk, heads x d),
/// v (b, tk, heads x dv) -> (b, tq, heads x dv). bf16 on AMX runs on that layout as it is;
/// otherwise the heads are split into (b, heads, t, d) for [`scaled_dot_product_attention`]
/// (no copy for one head) and merged back.
pub fn multi_head_attention(q: Tensor, k: Tensor, v: Tensor, heads: usize) -> Result<Tensor> {
    if crate::amx_ops::handles(&[&q, &k, &v]) {
        return crate::amx_ops::attention(&q, &k, &v, heads);
    }
    let (b, tq, _) = q.dims3()?;
    // each projection is dropped once split (they would otherwise live as long as the split
    // copies: 31 MB more peak RSS at 64x64 latents in f32)
    let split = |x: Tensor| -> Result<Tensor> {
        let (b, t, hd) = x.dims3()?;
        x.reshape((b, t, heads, hd / heads))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (q, k, v) = (split(q)?, split(k)?, split(v)?);
    let out = scaled_dot_product_attention(&q, &k, &v)?;
    let dv = out.dim(3)?;
    out.transpose(1, 2)?.reshape((b, tq, heads * dv))
}

/// softmax(q k^T * d^-0.5) v over (batch, heads, len, dim) tensors: the fused CPU kernel on
/// the CPU (see `kernels`; f32, other types widened; bf16 on AMX goes through
/// `amx_ops::attention` in [`multi_head_attention`] instead), else the plain composition of
/// candle ops.
pub fn scaled_dot_product_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    if on_cpu(q) {
        return in_f32(&[q, k, v], |t| {
            crate::kernels::fused_attention(&t[0], &t[1], &t[2])
        });
    }
    plain_attention(q, k, v)
}

/// The reference composition: matmul, scale, softmax, matmul (scores in f32).
pub fn plain_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
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

/// `FeedForward` with `activation_fn="geglu"`: net.0 = GEGLU(dim, 4 dim), net.2 = Linear.
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            proj: {
                let vb = vb.pp("net.0.proj");
                Linear::geglu_projection(
                    vb.get((inner * 2, dim), "weight")?,
                    Some(vb.get(inner * 2, "bias")?),
                )?
            },
            out: linear(inner, dim, vb.pp("net.2"))?,
        })
    }

    /// Tokens per chunk: the projection's output is 8 x dim values per token (84 MB for SD 1.5
    /// at 512x512 with guidance); run in chunks it adds a quarter of that to the peak memory.
    /// Each token's result does not depend on the others, so chunks change no value
    /// (diffusers' `enable_forward_chunking` does the same). Not when the GEGLU is fused
    /// (bf16 on AMX): that projection is never in memory.
    const CHUNK: usize = 1024;

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let tokens = xs.dim(1)?;
        if tokens > Self::CHUNK && !self.proj.geglu_fused(xs) {
            let chunks = (0..tokens)
                .step_by(Self::CHUNK)
                .map(|t0| self.forward_all(&xs.narrow(1, t0, Self::CHUNK.min(tokens - t0))?))
                .collect::<Result<Vec<_>>>()?;
            return Tensor::cat(&chunks, 1);
        }
        self.forward_all(xs)
    }

    fn forward_all(&self, xs: &Tensor) -> Result<Tensor> {
        self.out.forward(&self.proj.forward_geglu(xs)?)
    }
}

/// `BasicTransformerBlock` (norm_type "layer_norm"): self-attention, cross-attention, GEGLU.
struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    fn new(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        dim_head: usize,
        context_dim: usize,
    ) -> Result<Self> {
        Ok(Self {
            norm1: LayerNorm::new(dim, 1e-5, vb.pp("norm1"))?,
            attn1: Attention::new(vb.pp("attn1"), dim, None, heads, dim_head)?,
            norm2: LayerNorm::new(dim, 1e-5, vb.pp("norm2"))?,
            attn2: Attention::new(vb.pp("attn2"), dim, Some(context_dim), heads, dim_head)?,
            norm3: LayerNorm::new(dim, 1e-5, vb.pp("norm3"))?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
        })
    }

    fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let xs = add(&self.attn1.forward(&self.norm1.forward(xs)?, None)?, xs)?;
        let xs = add(
            &self
                .attn2
                .forward(&self.norm2.forward(&xs)?, Some(context))?,
            &xs,
        )?;
        add(&self.ff.forward(&self.norm3.forward(&xs)?)?, &xs)
    }
}

/// `Transformer2DModel` for continuous (latent image) input.
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Linear,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Linear,
}

pub struct Transformer2DConfig {
    pub heads: usize,
    pub dim_head: usize,
    pub in_channels: usize,
    pub num_layers: usize,
    pub norm_num_groups: usize,
    pub cross_attention_dim: usize,
    pub use_linear_projection: bool,
}

impl Transformer2DModel {
    pub fn new(vb: VarBuilder, c: &Transformer2DConfig) -> Result<Self> {
        let inner = c.heads * c.dim_head;
        let norm = GroupNorm::new(vb.pp("norm"), c.norm_num_groups, c.in_channels, 1e-6)?;
        // use_linear_projection = false: proj_in and proj_out are 1x1 convolutions, which
        // are linear layers over the channels; they run as such on the tokens (the same sums
        // as the convolution before the permute; on AMX the packed product, faster than the
        // convolution's, and the permute back fuses with the residual addition)
        let projection = |from: usize, to: usize, name: &str| -> Result<Linear> {
            let vb = vb.pp(name);
            if c.use_linear_projection {
                return linear(from, to, vb);
            }
            let weight = vb.get((to, from, 1, 1), "weight")?.reshape((to, from))?;
            Linear::new(weight, Some(vb.get(to, "bias")?))
        };
        let transformer_blocks = (0..c.num_layers)
            .map(|i| {
                BasicTransformerBlock::new(
                    vb.pp(format!("transformer_blocks.{i}")),
                    inner,
                    c.heads,
                    c.dim_head,
                    c.cross_attention_dim,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm,
            proj_in: projection(c.in_channels, inner, "proj_in")?,
            transformer_blocks,
            proj_out: projection(inner, c.in_channels, "proj_out")?,
        })
    }

    pub fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let residual = xs;
        let xs = self.norm.forward(xs)?;
        let mut xs = self.proj_in.forward(&to_tokens(&xs)?)?;
        for block in &self.transformer_blocks {
            xs = block.forward(&xs, context)?;
        }
        to_image_add(&self.proj_out.forward(&xs)?, residual)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use std::collections::HashMap;

    #[test]
    fn feed_forward_in_chunks_gives_the_same_values() -> Result<()> {
        let dev = Device::Cpu;
        let dim = 8;
        let mut weights = HashMap::new();
        for (name, shape) in [
            ("net.0.proj.weight", vec![dim * 8, dim]),
            ("net.0.proj.bias", vec![dim * 8]),
            ("net.2.weight", vec![dim, dim * 4]),
            ("net.2.bias", vec![dim]),
        ] {
            weights.insert(
                name.to_string(),
                Tensor::randn(0f32, 1.0, shape.as_slice(), &dev)?,
            );
        }
        let ff = FeedForward::new(VarBuilder::from_tensors(weights, DType::F32, &dev), dim)?;
        // more tokens than a chunk, and not a multiple of it
        let x = Tensor::randn(0f32, 1.0, (2, 2 * FeedForward::CHUNK + 77, dim), &dev)?;
        let chunked = ff.forward(&x)?;
        let whole = ff.forward_all(&x)?;
        let diff = (chunked - whole)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff <= 1e-6, "{diff}");
        Ok(())
    }
}
