//! The VAE encoder of diffusers' `AutoencoderKL` (`Encoder` + `quant_conv`), with diffusers'
//! parameter names: images into the latent distribution that image-to-image starts from. Built
//! apart from the decoder ([`super::vae`]), so a text-to-image run never reads its weights.

use super::layers::{Conv2d, GroupNorm, ResnetBlock2D};
use super::vae::VaeAttention;
use super::vae_tiling::Tiles;
use super::Loader;
use crate::config::VaeConfig;
use anyhow::{Context, Result};
use candle_core::{Module, Tensor};

struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    /// `Downsample2D(padding=0)`: zero-pad right and bottom by one, then a stride-2 conv.
    downsampler: Option<Conv2d>,
}

pub struct VaeEncoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownBlock>,
    mid_resnets: [ResnetBlock2D; 2],
    mid_attention: VaeAttention,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    quant_conv: Option<Conv2d>,
}

/// `DiagonalGaussianDistribution`: the encoder's mean and standard deviation per latent.
pub struct LatentDistribution {
    pub mean: Tensor,
    pub std: Tensor,
}

impl VaeEncoder {
    pub fn new(vb: Loader, c: &VaeConfig) -> Result<Self> {
        Self::build(vb, c).context("loading the VAE encoder weights")
    }

    fn build(vb: Loader, c: &VaeConfig) -> candle_core::Result<Self> {
        let (g, eps) = (c.norm_num_groups, 1e-6);
        let boc = &c.block_out_channels;
        let last = *boc.last().expect("validated non-empty");
        let e = vb.pp("encoder");
        let mut down_blocks = Vec::new();
        let mut prev = boc[0];
        for (i, &ch) in boc.iter().enumerate() {
            let db = e.pp(format!("down_blocks.{i}"));
            let resnets = (0..c.layers_per_block)
                .map(|j| {
                    let cin = if j == 0 { prev } else { ch };
                    ResnetBlock2D::new(db.pp(format!("resnets.{j}")), cin, ch, None, g, eps, 1.0)
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let downsampler = (i + 1 < boc.len())
                .then(|| Conv2d::new(db.pp("downsamplers.0.conv"), ch, ch, 3, 2, 0))
                .transpose()?;
            down_blocks.push(DownBlock {
                resnets,
                downsampler,
            });
            prev = ch;
        }
        let mid = e.pp("mid_block");
        let moments = 2 * c.latent_channels;
        Ok(Self {
            conv_in: Conv2d::new(e.pp("conv_in"), c.in_channels, boc[0], 3, 1, 1)?,
            down_blocks,
            mid_resnets: [
                ResnetBlock2D::new(mid.pp("resnets.0"), last, last, None, g, eps, 1.0)?,
                ResnetBlock2D::new(mid.pp("resnets.1"), last, last, None, g, eps, 1.0)?,
            ],
            mid_attention: VaeAttention::new(mid.pp("attentions.0"), last, g)?,
            conv_norm_out: GroupNorm::new(e.pp("conv_norm_out"), g, last, eps)?,
            conv_out: Conv2d::new(e.pp("conv_out"), last, moments, 3, 1, 1)?,
            quant_conv: c
                .use_quant_conv
                .then(|| Conv2d::new(vb.pp("quant_conv"), moments, moments, 1, 1, 0))
                .transpose()?,
        })
    }

    /// `vae.encode(image).latent_dist` for images in [-1, 1], one at a time; in tiles as
    /// `enable_tiling` encodes when `tiles` is given.
    pub fn encode(&self, images: &Tensor, tiles: Option<Tiles>) -> Result<LatentDistribution> {
        let (_, _, h, w) = images.dims4()?;
        let moments = (0..images.dim(0)?)
            .map(|i| {
                let x = images.narrow(0, i, 1)?;
                match tiles {
                    Some(t) if Tiles::needed(h, w, t.sample) => {
                        t.encode(&x, |tile| self.moments(tile))
                    }
                    _ => self.moments(&x),
                }
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let moments = Tensor::cat(&moments, 0)?;
        let half = moments.dim(1)? / 2;
        let mean = moments.narrow(1, 0, half)?;
        let logvar = moments.narrow(1, half, half)?.clamp(-30.0, 20.0)?;
        Ok(LatentDistribution {
            mean,
            std: (logvar * 0.5)?.exp()?,
        })
    }

    fn moments(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = self.conv_in.forward(x)?;
        for block in &self.down_blocks {
            for r in &block.resnets {
                x = r.forward(&x, None)?;
            }
            if let Some(down) = &block.downsampler {
                x = down.forward(&x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?)?;
            }
        }
        x = self.mid_resnets[0].forward(&x, None)?;
        x = self.mid_attention.forward(&x)?;
        x = self.mid_resnets[1].forward(&x, None)?;
        let x = self
            .conv_out
            .forward(&self.conv_norm_out.forward_act(&x, true)?)?;
        match &self.quant_conv {
            Some(q) => q.forward(&x),
            None => Ok(x),
        }
    }
}

impl LatentDistribution {
    /// `latent_dist.sample(generator)`: mean + std x `noise` (drawn by the caller from the
    /// image's generator, in diffusers' order).
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        Ok((&self.mean + (&self.std * noise)?)?)
    }
}
