//! The building blocks of the U-Net and the VAE decoder with diffusers' parameter names: linear
//! layer, convolution, LayerNorm, GroupNorm and `ResnetBlock2D`. Each reads its weights and
//! prepares them for the model's engine once, at load; `ops` runs them.

use super::Loader;
use crate::ops::{self, ConvGeometry, ConvWeights, Engine, LinearWeights, NormWeights};
use candle_core::{Module, Result, Tensor, D};

/// `nn.Linear`.
pub struct Linear {
    weights: LinearWeights,
}

impl Linear {
    /// weight (out, in), bias (out), prepared for `engine`.
    pub fn new(engine: Engine, weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Ok(Self {
            weights: LinearWeights::prepare(engine, weight, bias)?,
        })
    }

    /// The projection of diffusers' `GEGLU` (weight (2 inner, in), bias (2 inner)), for
    /// [`Linear::forward_geglu`].
    pub fn geglu_projection(engine: Engine, weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Ok(Self {
            weights: LinearWeights::prepare_geglu(engine, weight, bias)?,
        })
    }

    /// Whether [`Linear::forward_geglu`] runs fused: the [hidden | gate] projection is then
    /// never in memory.
    pub fn geglu_fused(&self) -> bool {
        self.weights.geglu_fused()
    }

    /// hidden * gelu(gate) (exact erf) of this layer's output [hidden | gate].
    pub fn forward_geglu(&self, x: &Tensor) -> Result<Tensor> {
        ops::geglu(x, &self.weights)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::linear(x, &self.weights)
    }
}

/// `candle_nn::linear` for [`Linear`].
pub fn linear(cin: usize, cout: usize, vb: Loader) -> Result<Linear> {
    Linear::new(
        vb.engine(),
        vb.get((cout, cin), "weight")?,
        Some(vb.get(cout, "bias")?),
    )
}

/// `candle_nn::linear_no_bias` for [`Linear`].
pub fn linear_no_bias(cin: usize, cout: usize, vb: Loader) -> Result<Linear> {
    Linear::new(vb.engine(), vb.get((cout, cin), "weight")?, None)
}

/// `nn.Conv2d` (groups 1, dilation 1, with bias).
pub struct Conv2d {
    weights: ConvWeights,
}

impl Conv2d {
    pub fn new(
        vb: Loader,
        cin: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        Ok(Self {
            weights: ConvWeights::prepare(
                vb.engine(),
                vb.get((cout, cin, kernel, kernel), "weight")?,
                vb.get(cout, "bias")?,
                ConvGeometry { stride, padding },
            )?,
        })
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::conv2d(x, &self.weights)
    }
}

/// `nn.LayerNorm` (weight and bias).
pub struct LayerNorm {
    weights: NormWeights,
    eps: f64,
}

impl LayerNorm {
    pub fn new(dim: usize, eps: f64, vb: Loader) -> Result<Self> {
        Ok(Self {
            weights: NormWeights::layer_norm(
                vb.engine(),
                vb.get(dim, "weight")?,
                vb.get(dim, "bias")?,
            )?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm(x, &self.weights, self.eps)
    }
}

/// `nn.GroupNorm` with affine parameters, optionally fused with the SiLU that follows it.
pub struct GroupNorm {
    weights: NormWeights,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn new(vb: Loader, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weights: NormWeights::group_norm(
                vb.engine(),
                vb.get(channels, "weight")?,
                vb.get(channels, "bias")?,
            )?,
            groups,
            eps,
        })
    }

    pub fn forward_act(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        ops::group_norm(x, &self.weights, self.groups, self.eps, silu)
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, false)
    }
}

/// diffusers' `ResnetBlock2D` (time-embedding shift, "default" scale-shift, SiLU).
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
    engine: Engine,
}

impl ResnetBlock2D {
    pub fn new(
        vb: Loader,
        cin: usize,
        cout: usize,
        temb_channels: Option<usize>,
        groups: usize,
        eps: f64,
        output_scale_factor: f64,
    ) -> Result<Self> {
        Ok(Self {
            norm1: GroupNorm::new(vb.pp("norm1"), groups, cin, eps)?,
            conv1: Conv2d::new(vb.pp("conv1"), cin, cout, 3, 1, 1)?,
            time_emb_proj: temb_channels
                .map(|t| linear(t, cout, vb.pp("time_emb_proj")))
                .transpose()?,
            norm2: GroupNorm::new(vb.pp("norm2"), groups, cout, eps)?,
            conv2: Conv2d::new(vb.pp("conv2"), cout, cout, 3, 1, 1)?,
            conv_shortcut: (cin != cout)
                .then(|| Conv2d::new(vb.pp("conv_shortcut"), cin, cout, 1, 1, 0))
                .transpose()?,
            output_scale_factor,
            engine: vb.engine(),
        })
    }

    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_act(x, true)?)?;
        let h = match (temb, &self.time_emb_proj) {
            (Some(t), Some(p)) => {
                let t = p.forward(&candle_nn::ops::silu(t)?)?;
                ops::add(
                    self.engine,
                    &h,
                    &t.unsqueeze(D::Minus1)?.unsqueeze(D::Minus1)?,
                )?
            }
            _ => h,
        };
        let h = self.conv2.forward(&self.norm2.forward_act(&h, true)?)?;
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        let out = ops::add(self.engine, &shortcut, &h)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}
