//! The VAE decoder of diffusers' `AutoencoderKL` (`post_quant_conv` + `Decoder`), with
//! diffusers' parameter names, configured from the model's `vae/config.json`.
//!
//! Owned rather than taken from candle-transformers: candle's `AutoEncoderKL` returns wrong
//! values for the second image of a batch, always builds the encoder too (weights that a
//! text-to-image run never uses), and runs on candle's generic convolution and GroupNorm,
//! which made the 512x512 decode 4.5x slower than diffusers on CPU.

use super::layers::{Conv2d, GroupNorm, Linear, ResnetBlock2D};
use super::vae_tiling::Tiles;
use super::Loader;
use crate::config::VaeConfig;
use crate::ops::{self, Engine};
use anyhow::{Context, Result};
use candle_core::{Module, Tensor};

/// A Linear of the VAE attention: `to_q` etc., or the old `query`/... names, stored either
/// as (c, c) or as a 1x1 convolution (c, c, 1, 1).
fn attn_linear(vb: &Loader, name: &str, c: usize) -> candle_core::Result<Linear> {
    let vb = vb.pp(name);
    let weight = match vb.get((c, c), "weight") {
        Ok(w) => w,
        Err(_) => vb.get((c, c, 1, 1), "weight")?.reshape((c, c))?,
    };
    Linear::new(vb.engine(), weight, Some(vb.get(c, "bias")?))
}

/// The single-head self-attention of the VAE mid block.
pub(super) struct VaeAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    engine: Engine,
}

impl VaeAttention {
    pub(super) fn new(vb: Loader, c: usize, groups: usize) -> candle_core::Result<Self> {
        let new_names = vb.contains_tensor("to_q.weight");
        let (q, k, v, o) = if new_names {
            ("to_q", "to_k", "to_v", "to_out.0")
        } else {
            ("query", "key", "value", "proj_attn")
        };
        Ok(Self {
            group_norm: GroupNorm::new(vb.pp("group_norm"), groups, c, 1e-6)?,
            to_q: attn_linear(&vb, q, c)?,
            to_k: attn_linear(&vb, k, c)?,
            to_v: attn_linear(&vb, v, c)?,
            to_out: attn_linear(&vb, o, c)?,
            engine: vb.engine(),
        })
    }

    pub(super) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let t = ops::to_tokens(self.engine, &self.group_norm.forward(x)?)?;
        // one head of dim c
        let a = ops::attention(
            self.engine,
            self.to_q.forward(&t)?,
            self.to_k.forward(&t)?,
            self.to_v.forward(&t)?,
            1,
        )?;
        ops::to_image_add(self.engine, &self.to_out.forward(&a)?, x)
    }
}

struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Conv2d>,
}

pub struct Vae {
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid_resnets: [ResnetBlock2D; 2],
    mid_attention: VaeAttention,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    pub scaling_factor: f64,
}

impl Vae {
    pub fn new(vb: Loader, c: &VaeConfig) -> Result<Self> {
        Self::build(vb, c).context("loading the VAE weights")
    }

    fn build(vb: Loader, c: &VaeConfig) -> candle_core::Result<Self> {
        let g = c.norm_num_groups;
        let eps = 1e-6;
        let boc = &c.block_out_channels;
        let last = *boc.last().expect("validated non-empty");
        let d = vb.pp("decoder");
        let post_quant_conv = if c.use_post_quant_conv {
            Some(Conv2d::new(
                vb.pp("post_quant_conv"),
                c.latent_channels,
                c.latent_channels,
                1,
                1,
                0,
            )?)
        } else {
            None
        };
        let mid = d.pp("mid_block");
        let mid_resnets = [
            ResnetBlock2D::new(mid.pp("resnets.0"), last, last, None, g, eps, 1.0)?,
            ResnetBlock2D::new(mid.pp("resnets.1"), last, last, None, g, eps, 1.0)?,
        ];
        let mid_attention = VaeAttention::new(mid.pp("attentions.0"), last, g)?;
        let reversed: Vec<usize> = boc.iter().rev().copied().collect();
        let mut up_blocks = Vec::new();
        let mut out_ch = reversed[0];
        for (i, &ch) in reversed.iter().enumerate() {
            let prev = out_ch;
            out_ch = ch;
            let ub = d.pp(format!("up_blocks.{i}"));
            let resnets = (0..c.layers_per_block + 1)
                .map(|j| {
                    let cin = if j == 0 { prev } else { out_ch };
                    ResnetBlock2D::new(
                        ub.pp(format!("resnets.{j}")),
                        cin,
                        out_ch,
                        None,
                        g,
                        eps,
                        1.0,
                    )
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let upsampler = if i + 1 < reversed.len() {
                Some(Conv2d::new(
                    ub.pp("upsamplers.0.conv"),
                    out_ch,
                    out_ch,
                    3,
                    1,
                    1,
                )?)
            } else {
                None
            };
            up_blocks.push(UpBlock { resnets, upsampler });
        }
        Ok(Self {
            post_quant_conv,
            conv_in: Conv2d::new(d.pp("conv_in"), c.latent_channels, last, 3, 1, 1)?,
            mid_resnets,
            mid_attention,
            up_blocks,
            conv_norm_out: GroupNorm::new(d.pp("conv_norm_out"), g, boc[0], eps)?,
            conv_out: Conv2d::new(d.pp("conv_out"), boc[0], c.out_channels, 3, 1, 1)?,
            scaling_factor: c.scaling_factor,
        })
    }

    /// `vae.decode(z).sample` for latents that are already divided by the scaling factor.
    fn decode_scaled(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(c) => c.forward(z)?,
            None => z.clone(),
        };
        let mut x = self.conv_in.forward(&z)?;
        x = self.mid_resnets[0].forward(&x, None)?;
        x = self.mid_attention.forward(&x)?;
        x = self.mid_resnets[1].forward(&x, None)?;
        for block in &self.up_blocks {
            for r in &block.resnets {
                x = r.forward(&x, None)?;
            }
            if let Some(up) = &block.upsampler {
                let (_, _, h, w) = x.dims4()?;
                x = up.forward(&x.upsample_nearest2d(h * 2, w * 2)?)?;
            }
        }
        let x = self.conv_norm_out.forward_act(&x, true)?;
        self.conv_out.forward(&x)
    }

    /// `vae.decode(latents / scaling_factor)`, then diffusers' post-processing to [0, 1];
    /// in tiles as `enable_tiling` decodes when `tiles` is given.
    pub fn decode(&self, latents: &Tensor, tiles: Option<Tiles>) -> Result<Tensor> {
        let image = self.decode_raw(latents, tiles)?;
        Ok(((image / 2.0)? + 0.5)?.clamp(0.0, 1.0)?)
    }

    /// The raw decoder output (before post-processing), one image at a time (like diffusers'
    /// `enable_vae_slicing`): on CPU a batch saves nothing and multiplies the peak memory of
    /// the 512x512 activations.
    pub fn decode_raw(&self, latents: &Tensor, tiles: Option<Tiles>) -> Result<Tensor> {
        let scaled = (latents / self.scaling_factor)?;
        let (_, _, h, w) = scaled.dims4()?;
        let images = (0..scaled.dim(0)?)
            .map(|i| {
                let z = scaled.narrow(0, i, 1)?;
                match tiles {
                    Some(t) if Tiles::needed(h, w, t.latent) => {
                        t.decode(&z, |tile| self.decode_scaled(tile))
                    }
                    _ => self.decode_scaled(&z),
                }
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&images, 0)?)
    }
}
