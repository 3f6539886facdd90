//! The CLIP text encoder (transformers' `CLIPTextModel`), mirroring its module names.
//!
//! candle-transformers has a CLIP text model, but its `Config` fields are private (only its
//! presets can be built, so the model's own `text_encoder/config.json` cannot be used), its
//! layer-norm eps is fixed, and its `gelu` is the tanh approximation where transformers' "gelu"
//! (SD 2.x) is the exact erf form. This module reads every size from the config instead.

use super::layers::{linear, linear_no_bias, Linear};
use super::Loader;
use crate::config::ClipTextConfig;
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{embedding, layer_norm, Embedding, LayerNorm};

#[derive(Debug, Clone, Copy)]
enum Activation {
    QuickGelu,
    Gelu,
}

impl Activation {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Activation::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
            Activation::Gelu => xs.gelu_erf(),
        }
    }
}

struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
    head_dim: usize,
}

impl ClipAttention {
    fn new(vb: Loader, c: &ClipTextConfig) -> Result<Self> {
        let h = c.hidden_size;
        Ok(Self {
            q_proj: linear(h, h, vb.pp("q_proj"))?,
            k_proj: linear(h, h, vb.pp("k_proj"))?,
            v_proj: linear(h, h, vb.pp("v_proj"))?,
            out_proj: linear(h, h, vb.pp("out_proj"))?,
            num_heads: c.num_attention_heads,
            head_dim: h / c.num_attention_heads,
        })
    }

    fn forward(&self, xs: &Tensor, causal_mask: &Tensor) -> Result<Tensor> {
        let (b, t, c) = xs.dims3()?;
        let shape = |x: Tensor| -> Result<Tensor> {
            x.reshape((b, t, self.num_heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let scale = (self.head_dim as f64).powf(-0.5);
        let q = shape((self.q_proj.forward(xs)? * scale)?)?;
        let k = shape(self.k_proj.forward(xs)?)?;
        let v = shape(self.v_proj.forward(xs)?)?;
        // scores and softmax in f32 whatever the model's type (no CPU bf16 matmul in candle)
        let dtype = q.dtype();
        let (q, k, v) = (
            q.to_dtype(DType::F32)?,
            k.to_dtype(DType::F32)?,
            v.to_dtype(DType::F32)?,
        );
        let attn = q
            .matmul(&k.t()?)?
            .broadcast_add(&causal_mask.to_dtype(DType::F32)?)?;
        let attn = candle_nn::ops::softmax_last_dim(&attn)?;
        let out = attn
            .matmul(&v)?
            .to_dtype(dtype)?
            .transpose(1, 2)?
            .reshape((b, t, c))?;
        self.out_proj.forward(&out)
    }
}

struct ClipEncoderLayer {
    self_attn: ClipAttention,
    layer_norm1: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    layer_norm2: LayerNorm,
    activation: Activation,
}

impl ClipEncoderLayer {
    fn new(vb: Loader, c: &ClipTextConfig, activation: Activation) -> Result<Self> {
        let h = c.hidden_size;
        Ok(Self {
            self_attn: ClipAttention::new(vb.pp("self_attn"), c)?,
            layer_norm1: layer_norm(h, c.layer_norm_eps, vb.pp("layer_norm1").candle())?,
            fc1: linear(h, c.intermediate_size, vb.pp("mlp.fc1"))?,
            fc2: linear(c.intermediate_size, h, vb.pp("mlp.fc2"))?,
            layer_norm2: layer_norm(h, c.layer_norm_eps, vb.pp("layer_norm2").candle())?,
            activation,
        })
    }

    fn forward(&self, xs: &Tensor, causal_mask: &Tensor) -> Result<Tensor> {
        let residual = xs;
        let xs = self.layer_norm1.forward(xs)?;
        let xs = (self.self_attn.forward(&xs, causal_mask)? + residual)?;
        let residual = &xs;
        let h = self.layer_norm2.forward(&xs)?;
        let h = self
            .fc2
            .forward(&self.activation.forward(&self.fc1.forward(&h)?)?)?;
        h + residual
    }
}

/// `CLIPTextModel`: returns `last_hidden_state` (after the final layer norm), which is what the
/// Stable Diffusion pipeline feeds the U-Net; as `CLIPTextModelWithProjection` (SDXL's second
/// encoder) also the pooled, projected output.
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<ClipEncoderLayer>,
    final_layer_norm: LayerNorm,
    /// `CLIPTextModelWithProjection`'s `text_projection` (no bias).
    text_projection: Option<Linear>,
    /// How the pooled output's position is found (see `ClipTextConfig::eos_token_id`).
    eos_token_id: i64,
}

/// What SDXL's pipeline takes from each text encoder.
pub struct XlOutput {
    /// (batch, seq, hidden): a hidden state before the final layer norm.
    pub hidden: Tensor,
    /// (batch, projection_dim): the projected pooled output (`text_embeds`), with a projection.
    pub pooled: Option<Tensor>,
}

impl ClipTextModel {
    pub fn new(vb: Loader, c: &ClipTextConfig) -> Result<Self> {
        Self::build(vb, c, false)
    }

    /// `CLIPTextModelWithProjection`: the model and its `text_projection`.
    pub fn with_projection(vb: Loader, c: &ClipTextConfig) -> Result<Self> {
        Self::build(vb, c, true)
    }

    fn build(vb: Loader, c: &ClipTextConfig, projection: bool) -> Result<Self> {
        let text_projection = if projection {
            let Some(dim) = c.projection_dim else {
                candle_core::bail!("the text encoder's config has no projection_dim");
            };
            Some(linear_no_bias(
                c.hidden_size,
                dim,
                vb.pp("text_projection"),
            )?)
        } else {
            None
        };
        // Hub files keep the `text_model.` prefix; transformers 5 saves without it.
        let vb = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb
        };
        let activation = match c.hidden_act.as_str() {
            "gelu" => Activation::Gelu,
            _ => Activation::QuickGelu,
        };
        let emb = vb.pp("embeddings");
        let layers = (0..c.num_hidden_layers)
            .map(|i| ClipEncoderLayer::new(vb.pp(format!("encoder.layers.{i}")), c, activation))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            token_embedding: embedding(
                c.vocab_size,
                c.hidden_size,
                emb.pp("token_embedding").candle(),
            )?,
            position_embedding: embedding(
                c.max_position_embeddings,
                c.hidden_size,
                emb.pp("position_embedding").candle(),
            )?,
            layers,
            final_layer_norm: layer_norm(
                c.hidden_size,
                c.layer_norm_eps,
                vb.pp("final_layer_norm").candle(),
            )?,
            text_projection,
            eos_token_id: c.eos_token_id,
        })
    }

    /// The model with `vectors` (n, hidden) as the token embeddings of ids vocab_size..+n
    /// (textual-inversion words; diffusers' `resize_token_embeddings` and row assignment).
    pub fn with_extra_tokens(mut self, vectors: &Tensor) -> Result<Self> {
        let table = self.token_embedding.embeddings();
        let vectors = vectors.to_dtype(table.dtype())?.to_device(table.device())?;
        let hidden = table.dim(1)?;
        self.token_embedding = Embedding::new(Tensor::cat(&[table, &vectors], 0)?, hidden);
        Ok(self)
    }

    fn causal_mask(t: usize, dtype: DType, device: &Device) -> Result<Tensor> {
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        Tensor::from_vec(mask, (t, t), device)?.to_dtype(dtype)
    }

    /// `input_ids`: (batch, seq) u32. The hidden state `skip` layers before the last, through
    /// the final layer norm: with `skip` 0 `last_hidden_state`, else what diffusers'
    /// `encode_prompt(clip_skip=skip)` feeds the U-Net (the web UI's "Clip skip" is
    /// `skip + 1`). `skip` must leave at least one layer.
    pub fn forward(&self, input_ids: &Tensor, skip: usize) -> Result<Tensor> {
        let (mut xs, mask) = self.embed(input_ids)?;
        for layer in &self.layers[..self.layers.len() - skip] {
            xs = layer.forward(&xs, &mask)?;
        }
        self.final_layer_norm.forward(&xs)
    }

    /// The token and position embeddings of `input_ids`, and the causal mask.
    fn embed(&self, input_ids: &Tensor) -> Result<(Tensor, Tensor)> {
        let (_, t) = input_ids.dims2()?;
        let positions = Tensor::arange(0u32, t as u32, input_ids.device())?;
        let xs = self
            .token_embedding
            .forward(input_ids)?
            .broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let mask = Self::causal_mask(t, xs.dtype(), xs.device())?;
        Ok((xs, mask))
    }

    /// What `StableDiffusionXLPipeline.encode_prompt` reads: `hidden_states[-(skip + 2)]`
    /// (the output of all layers but `skip + 1`, without the final layer norm), and with a
    /// projection the pooled output (the final layer norm's output at the end-of-text
    /// position, projected: transformers' `text_embeds`).
    pub fn forward_xl(&self, input_ids: &Tensor, skip: usize) -> Result<XlOutput> {
        let n = self.layers.len();
        if skip >= n {
            candle_core::bail!("clip skip {skip} leaves no layer of {n}");
        }
        let (mut xs, mask) = self.embed(input_ids)?;
        let keep = n - 1 - skip;
        let mut hidden = None;
        for (i, layer) in self.layers.iter().enumerate() {
            if i == keep {
                hidden = Some(xs.clone());
                if self.text_projection.is_none() {
                    break;
                }
            }
            xs = layer.forward(&xs, &mask)?;
        }
        let hidden = hidden.expect("keep < n: taken in the loop");
        let pooled = match &self.text_projection {
            None => None,
            Some(projection) => {
                let last = self.final_layer_norm.forward(&xs)?;
                let ids: Vec<Vec<u32>> = input_ids.to_vec2()?;
                let rows = ids
                    .iter()
                    .enumerate()
                    .map(|(b, ids)| last.get(b)?.get(self.pooled_position(ids)))
                    .collect::<Result<Vec<_>>>()?;
                Some(projection.forward(&Tensor::stack(&rows, 0)?)?)
            }
        };
        Ok(XlOutput { hidden, pooled })
    }

    /// transformers' pooled position: with the old `eos_token_id` 2 the largest id (its
    /// first occurrence, as torch's argmax), else the first `eos_token_id`.
    fn pooled_position(&self, ids: &[u32]) -> usize {
        if self.eos_token_id == 2 {
            let max = ids.iter().copied().max().unwrap_or(0);
            ids.iter().position(|&i| i == max).unwrap_or(0)
        } else {
            ids.iter()
                .position(|&i| i64::from(i) == self.eos_token_id)
                .unwrap_or(0)
        }
    }
}
