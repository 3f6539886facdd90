//! diffusers' `UNet2DConditionModel` for SD 1.x/2.x, built from the model's own
//! `unet/config.json` and named like diffusers' modules (down_blocks.N.attentions.M...).
//!
//! Owned here rather than taken from candle-transformers: candle's U-Net takes its per-block
//! settings from presets shaped like a few known checkpoints, and its attention blocks use an
//! approximate GELU (see attention.rs).

use super::attention::{Transformer2DConfig, Transformer2DModel};
use super::layers::{linear, Conv2d, GroupNorm, Linear, ResnetBlock2D};
use super::Loader;
use crate::config::{TextTime, UNetBlock, UNetConfig};
use anyhow::Context;
use candle_core::{DType, Device, Module, Result, Tensor};

fn conv3x3(vb: Loader, cin: usize, cout: usize, stride: usize) -> Result<Conv2d> {
    Conv2d::new(vb, cin, cout, 3, stride, 1)
}

/// diffusers' `Timesteps`: `get_timestep_embedding` of each number, `num_channels` wide.
struct Sinusoidal {
    num_channels: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
}

/// `Timesteps` followed by `TimestepEmbedding` (linear_1, SiLU, linear_2).
struct TimeEmbedding {
    proj: Sinusoidal,
    linear_1: Linear,
    linear_2: Linear,
}

impl Sinusoidal {
    /// (n, num_channels) f32 for the n numbers of `timesteps`.
    fn forward(&self, timesteps: &[f64], device: &Device) -> Result<Tensor> {
        let half = self.num_channels / 2;
        // diffusers: exp(-ln(10000) * arange(half, f32) / (half - shift)) in float32.
        let freqs: Vec<f32> = (0..half)
            .map(|i| {
                let exponent =
                    (-(10000f64.ln()) as f32 * i as f32) / (half as f64 - self.freq_shift) as f32;
                exponent.exp()
            })
            .collect();
        let mut data = Vec::with_capacity(timesteps.len() * half * 2);
        for &t in timesteps {
            let args: Vec<f32> = freqs.iter().map(|f| t as f32 * f).collect();
            let (sin, cos): (Vec<f32>, Vec<f32>) = args.iter().map(|a| (a.sin(), a.cos())).unzip();
            if self.flip_sin_to_cos {
                data.extend(cos);
                data.extend(sin);
            } else {
                data.extend(sin);
                data.extend(cos);
            }
        }
        Tensor::from_vec(data, (timesteps.len(), half * 2), device)
    }
}

impl TimeEmbedding {
    fn new(vb: Loader, proj: Sinusoidal, cin: usize, cout: usize) -> Result<Self> {
        Ok(Self {
            proj,
            linear_1: linear(cin, cout, vb.pp("linear_1"))?,
            linear_2: linear(cout, cout, vb.pp("linear_2"))?,
        })
    }

    /// The MLP of an (n, cin) input.
    fn mlp(&self, emb: &Tensor) -> Result<Tensor> {
        let emb = candle_nn::ops::silu(&self.linear_1.forward(emb)?)?;
        self.linear_2.forward(&emb)
    }

    fn forward(&self, timesteps: &[f64], dtype: DType, device: &Device) -> Result<Tensor> {
        self.mlp(&self.proj.forward(timesteps, device)?.to_dtype(dtype)?)
    }
}

/// SDXL's added conditioning (`addition_embed_type: "text_time"`) of one batch.
pub struct AddedConditioning {
    /// (batch, pooled width): the second text encoder's pooled, projected output.
    pub text_embeds: Tensor,
    /// Per image diffusers' `add_time_ids`: (original height, original width, crop top, crop
    /// left, target height, target width), or for the refiner the aesthetic score in place of
    /// the target size.
    pub time_ids: Vec<Vec<f64>>,
}

/// `add_time_proj` and `add_embedding`: the size numbers' embeddings, concatenated after the
/// pooled text embedding, through an MLP into the time embedding's width.
struct TextTimeEmbedding {
    embedding: TimeEmbedding,
    text_time: TextTime,
}

impl TextTimeEmbedding {
    fn forward(&self, added: &AddedConditioning, dtype: DType) -> Result<Tensor> {
        let text = &added.text_embeds;
        let (b, pooled) = text.dims2()?;
        let ids = added.time_ids.first().map_or(0, Vec::len);
        let fits = added.time_ids.len() == b
            && added.time_ids.iter().all(|t| t.len() == ids)
            && self.text_time.pooled_dim(ids) == Some(pooled);
        if !fits {
            candle_core::bail!(
                "added conditioning: text_embeds {:?} and {} rows of {ids} time_ids for a U-Net whose add_embedding takes {} values",
                text.dims(),
                added.time_ids.len(),
                self.text_time.input_dim
            );
        }
        let numbers: Vec<f64> = added.time_ids.iter().flatten().copied().collect();
        let times = self
            .embedding
            .proj
            .forward(&numbers, text.device())?
            .reshape((b, ()))?;
        // diffusers concatenates in float32 (the sinusoids' type) and casts to the model's
        let emb = Tensor::cat(&[&text.to_dtype(DType::F32)?, &times], 1)?.to_dtype(dtype)?;
        self.embedding.mlp(&emb)
    }
}

struct CrossAttnBlock {
    resnets: Vec<ResnetBlock2D>,
    /// Empty for a DownBlock2D / UpBlock2D.
    attentions: Vec<Transformer2DModel>,
    sampler: Option<Conv2d>,
}

/// `ResnetBlock2D` settings shared by every U-Net block.
fn resnet(
    vb: Loader,
    cin: usize,
    cout: usize,
    c: &UNetConfig,
    temb: usize,
    scale: f64,
) -> Result<ResnetBlock2D> {
    ResnetBlock2D::new(
        vb,
        cin,
        cout,
        Some(temb),
        c.norm_num_groups,
        c.norm_eps,
        scale,
    )
}

fn transformer(
    vb: Loader,
    channels: usize,
    block: &UNetBlock,
    layers: usize,
    c: &UNetConfig,
) -> Result<Transformer2DModel> {
    Transformer2DModel::new(
        vb,
        &Transformer2DConfig {
            heads: block.num_heads,
            dim_head: channels / block.num_heads,
            in_channels: channels,
            num_layers: layers,
            norm_num_groups: c.norm_num_groups,
            cross_attention_dim: c.cross_attention_dim,
            use_linear_projection: c.use_linear_projection,
        },
    )
}

pub struct UNet2DConditionModel {
    conv_in: Conv2d,
    time_embedding: TimeEmbedding,
    down_blocks: Vec<CrossAttnBlock>,
    mid_resnets: Vec<ResnetBlock2D>,
    mid_attentions: Vec<Transformer2DModel>,
    up_blocks: Vec<CrossAttnBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    center_input_sample: bool,
    /// SDXL's `add_embedding`.
    text_time: Option<TextTimeEmbedding>,
}

impl UNet2DConditionModel {
    pub fn new(vb: Loader, c: &UNetConfig) -> anyhow::Result<Self> {
        Self::build(vb, c).context("loading the U-Net weights")
    }

    fn build(vb: Loader, c: &UNetConfig) -> anyhow::Result<Self> {
        let blocks = c.blocks()?;
        let depths = c.transformer_depths()?;
        let n = blocks.len();
        let ch0 = c.block_out_channels[0];
        let temb = ch0 * 4;
        let conv_in = conv3x3(vb.pp("conv_in"), c.in_channels, ch0, 1)?;
        let sinusoidal = |num_channels| Sinusoidal {
            num_channels,
            flip_sin_to_cos: c.flip_sin_to_cos,
            freq_shift: c.freq_shift,
        };
        let time_embedding =
            TimeEmbedding::new(vb.pp("time_embedding"), sinusoidal(ch0), ch0, temb)?;
        let text_time = match c.text_time()? {
            None => None,
            Some(
                t @ TextTime {
                    time_embed_dim,
                    input_dim,
                },
            ) => Some(TextTimeEmbedding {
                embedding: TimeEmbedding::new(
                    vb.pp("add_embedding"),
                    sinusoidal(time_embed_dim),
                    input_dim,
                    temb,
                )?,
                text_time: t,
            }),
        };

        let mut down_blocks = Vec::with_capacity(n);
        let mut output_channel = ch0;
        for (i, block) in blocks.iter().enumerate() {
            let input_channel = output_channel;
            output_channel = block.out_channels;
            let vb = vb.pp(format!("down_blocks.{i}"));
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..c.layers_per_block {
                let cin = if j == 0 {
                    input_channel
                } else {
                    output_channel
                };
                resnets.push(resnet(
                    vb.pp(format!("resnets.{j}")),
                    cin,
                    output_channel,
                    c,
                    temb,
                    1.0,
                )?);
                if block.cross_attention.is_some() {
                    attentions.push(transformer(
                        vb.pp(format!("attentions.{j}")),
                        output_channel,
                        block,
                        depths.down[i][j],
                        c,
                    )?);
                }
            }
            let sampler = if i + 1 < n {
                Some(Conv2d::new(
                    vb.pp("downsamplers.0.conv"),
                    output_channel,
                    output_channel,
                    3,
                    2,
                    c.downsample_padding,
                )?)
            } else {
                None
            };
            down_blocks.push(CrossAttnBlock {
                resnets,
                attentions,
                sampler,
            });
        }

        let last = blocks[n - 1];
        let mid_ch = last.out_channels;
        let mid_layers = depths.mid;
        let vbm = vb.pp("mid_block");
        let scale = c.mid_block_scale_factor;
        // `mid_block_type: null` (BK-SDM): no mid block, as diffusers skips it
        let (mid_resnets, mid_attentions) = if c.mid_block_type.is_some() {
            (
                vec![
                    resnet(vbm.pp("resnets.0"), mid_ch, mid_ch, c, temb, scale)?,
                    resnet(vbm.pp("resnets.1"), mid_ch, mid_ch, c, temb, scale)?,
                ],
                vec![transformer(
                    vbm.pp("attentions.0"),
                    mid_ch,
                    &last,
                    mid_layers,
                    c,
                )?],
            )
        } else {
            (Vec::new(), Vec::new())
        };

        let mut up_blocks = Vec::with_capacity(n);
        let reversed: Vec<UNetBlock> = blocks.iter().rev().copied().collect();
        let mut output_channel = reversed[0].out_channels;
        for (i, block) in reversed.iter().enumerate() {
            let prev_output_channel = output_channel;
            output_channel = block.out_channels;
            let input_channel = reversed[(i + 1).min(n - 1)].out_channels;
            let vb = vb.pp(format!("up_blocks.{i}"));
            let num_layers = c.layers_per_block + 1;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..num_layers {
                let skip = if j == num_layers - 1 {
                    input_channel
                } else {
                    output_channel
                };
                let cin = if j == 0 {
                    prev_output_channel
                } else {
                    output_channel
                };
                resnets.push(resnet(
                    vb.pp(format!("resnets.{j}")),
                    cin + skip,
                    output_channel,
                    c,
                    temb,
                    1.0,
                )?);
                if block.cross_attention.is_some() {
                    attentions.push(transformer(
                        vb.pp(format!("attentions.{j}")),
                        output_channel,
                        block,
                        depths.up[i][j],
                        c,
                    )?);
                }
            }
            let sampler = if i + 1 < n {
                Some(conv3x3(
                    vb.pp("upsamplers.0.conv"),
                    output_channel,
                    output_channel,
                    1,
                )?)
            } else {
                None
            };
            up_blocks.push(CrossAttnBlock {
                resnets,
                attentions,
                sampler,
            });
        }

        Ok(Self {
            conv_in,
            time_embedding,
            down_blocks,
            mid_resnets,
            mid_attentions,
            up_blocks,
            conv_norm_out: GroupNorm::new(
                vb.pp("conv_norm_out"),
                c.norm_num_groups,
                ch0,
                c.norm_eps,
            )?,
            conv_out: conv3x3(vb.pp("conv_out"), ch0, c.out_channels, 1)?,
            center_input_sample: c.center_input_sample,
            text_time,
        })
    }

    /// Whether the U-Net takes SDXL's added conditioning.
    pub fn takes_added_conditioning(&self) -> bool {
        self.text_time.is_some()
    }

    /// One denoising call: `sample` (batch, C, h, w), the same `timestep` for the whole batch,
    /// `context` (batch, 77, cross_attention_dim), and for SDXL the added conditioning.
    /// Returns the model output (noise or v).
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        context: &Tensor,
        added: Option<&AddedConditioning>,
    ) -> Result<Tensor> {
        let (b, _, h, w) = sample.dims4()?;
        let n = self.down_blocks.len();
        let up_factor = 1usize << (n - 1);
        let forward_upsample_size = h % up_factor != 0 || w % up_factor != 0;
        let sample = if self.center_input_sample {
            ((sample * 2.0)? - 1.0)?
        } else {
            sample.clone()
        };
        let emb =
            self.time_embedding
                .forward(&vec![timestep; b], sample.dtype(), sample.device())?;
        let emb = match (&self.text_time, added) {
            (Some(text_time), Some(added)) => (emb + text_time.forward(added, sample.dtype())?)?,
            (None, None) => emb,
            (Some(_), None) => {
                candle_core::bail!("this U-Net (SDXL's) needs the added text and size conditioning")
            }
            (None, Some(_)) => {
                candle_core::bail!("this U-Net takes no added conditioning (not SDXL's)")
            }
        };

        let mut xs = self.conv_in.forward(&sample)?;
        let mut res_stack = vec![xs.clone()];
        for block in &self.down_blocks {
            for (j, resnet) in block.resnets.iter().enumerate() {
                xs = resnet.forward(&xs, Some(&emb))?;
                if let Some(attn) = block.attentions.get(j) {
                    xs = attn.forward(&xs, context)?;
                }
                res_stack.push(xs.clone());
            }
            if let Some(down) = &block.sampler {
                xs = down.forward(&xs)?;
                res_stack.push(xs.clone());
            }
        }

        if let Some((first, rest)) = self.mid_resnets.split_first() {
            xs = first.forward(&xs, Some(&emb))?;
            for (attn, resnet) in self.mid_attentions.iter().zip(rest) {
                xs = attn.forward(&xs, context)?;
                xs = resnet.forward(&xs, Some(&emb))?;
            }
        }

        for (i, block) in self.up_blocks.iter().enumerate() {
            for (j, resnet) in block.resnets.iter().enumerate() {
                let skip = res_stack.pop().expect("skip connection");
                xs = Tensor::cat(&[&xs, &skip], 1)?;
                xs = resnet.forward(&xs, Some(&emb))?;
                if let Some(attn) = block.attentions.get(j) {
                    xs = attn.forward(&xs, context)?;
                }
            }
            if let Some(up) = &block.sampler {
                let (th, tw) = if forward_upsample_size && i + 1 < n {
                    let (_, _, sh, sw) = res_stack.last().expect("skip").dims4()?;
                    (sh, sw)
                } else {
                    let (_, _, xh, xw) = xs.dims4()?;
                    (xh * 2, xw * 2)
                };
                xs = up.forward(&xs.upsample_nearest2d(th, tw)?)?;
            }
        }

        let xs = self.conv_norm_out.forward_act(&xs, true)?;
        self.conv_out.forward(&xs)
    }
}
