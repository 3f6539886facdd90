//! diffusers' `Transformer2DModel` (continuous input), `BasicTransformerBlock`, `Attention`
//! and `GEGLU`, with diffusers' parameter names.
//!
//! Owned here rather than taken from candle-transformers because candle's GEGLU uses the tanh
//! approximation of GELU where diffusers uses the exact erf form (a visible difference against
//! diffusers' outputs), and because attention is the hot spot of the U-Net on CPU.

use super::layers::{linear, linear_no_bias, GroupNorm, LayerNorm, Linear};
use super::Loader;
use crate::ops::{self, Engine};
use candle_core::{Module, Result, Tensor};

/// `Attention` with `AttnProcessor2_0` semantics: softmax(q k^T / sqrt(d)) v.
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    engine: Engine,
}

impl Attention {
    pub fn new(
        vb: Loader,
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
            engine: vb.engine(),
        })
    }

    pub fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let context = context.unwrap_or(xs);
        let q = self.to_q.forward(xs)?;
        let k = self.to_k.forward(context)?;
        let v = self.to_v.forward(context)?;
        let out = ops::attention(self.engine, q, k, v, self.heads)?;
        self.to_out.forward(&out)
    }
}

/// `FeedForward` with `activation_fn="geglu"`: net.0 = GEGLU(dim, 4 dim), net.2 = Linear.
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn new(vb: Loader, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            proj: {
                let vb = vb.pp("net.0.proj");
                Linear::geglu_projection(
                    vb.engine(),
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
    /// (bf16 on a bf16 kernel): that projection is never in memory.
    const CHUNK: usize = 1024;

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let tokens = xs.dim(1)?;
        if tokens > Self::CHUNK && !self.proj.geglu_fused() {
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
    engine: Engine,
}

impl BasicTransformerBlock {
    fn new(
        vb: Loader,
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
            engine: vb.engine(),
        })
    }

    fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let add = |a: &Tensor, b: &Tensor| ops::add(self.engine, a, b);
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
    engine: Engine,
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
    pub fn new(vb: Loader, c: &Transformer2DConfig) -> Result<Self> {
        let inner = c.heads * c.dim_head;
        let norm = GroupNorm::new(vb.pp("norm"), c.norm_num_groups, c.in_channels, 1e-6)?;
        // use_linear_projection = false: proj_in and proj_out are 1x1 convolutions, which
        // are linear layers over the channels; they run as such on the tokens (the same sums
        // as the convolution before the permute; on a bf16 kernel the packed product, faster
        // than the convolution's, and the permute back fuses with the residual addition)
        let projection = |from: usize, to: usize, name: &str| -> Result<Linear> {
            let vb = vb.pp(name);
            if c.use_linear_projection {
                return linear(from, to, vb);
            }
            let weight = vb.get((to, from, 1, 1), "weight")?.reshape((to, from))?;
            Linear::new(vb.engine(), weight, Some(vb.get(to, "bias")?))
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
            engine: vb.engine(),
        })
    }

    pub fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let residual = xs;
        let xs = self.norm.forward(xs)?;
        let mut xs = self.proj_in.forward(&ops::to_tokens(self.engine, &xs)?)?;
        for block in &self.transformer_blocks {
            xs = block.forward(&xs, context)?;
        }
        ops::to_image_add(self.engine, &self.proj_out.forward(&xs)?, residual)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarBuilder;
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
        let vb = VarBuilder::from_tensors(weights, DType::F32, &dev);
        let ff = FeedForward::new(Loader::new(vb, Engine::for_device(&dev), None), dim)?;
        // more tokens than a chunk, and not a multiple of it
        let x = Tensor::randn(0f32, 1.0, (2, 2 * FeedForward::CHUNK + 77, dim), &dev)?;
        let chunked = ff.forward(&x)?;
        let whole = ff.forward_all(&x)?;
        let diff = (chunked - whole)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff <= 1e-6, "{diff}");
        Ok(())
    }
}
