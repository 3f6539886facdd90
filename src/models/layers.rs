//! The building blocks of the U-Net and the VAE decoder with diffusers' parameter names:
//! linear layer, convolution and GroupNorm that use sdgen's CPU kernels on the CPU (see
//! `kernels`; bf16 on AMX tiles where the CPU has them, see `amx_ops`; other types widened to
//! f32) and candle's ops elsewhere, and `ResnetBlock2D`.

use crate::amx_ops;
use crate::bf16_ops::add;
use crate::kernels::{self, ConvGeometry};
use crate::winograd_bf16;
use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

/// Whether a layer runs on sdgen's CPU kernels: every float type on the CPU. bf16 linear
/// layers and convolutions run on AMX tiles where the CPU has them (`amx_ops`); otherwise the
/// kernels are f32 and bf16 and f16 widen to f32 while their layer runs ([`in_f32`]). candle
/// has no CPU matmul for bf16 (`--dtype bf16` stopped with "unsupported dtype BF16 for op
/// matmul") and its f16 one is far slower than the f32 kernels; torch's CPU bf16 kernels
/// accumulate in f32 too. Weights stay in the narrow type (half the memory); activations are
/// rounded back to it between layers, as in torch.
pub(crate) fn on_cpu(x: &Tensor) -> bool {
    x.device().is_cpu()
}

/// Runs `f` on f32 versions of `xs` (the tensors themselves when they are f32 already) and
/// gives its result in the type of `xs[0]`.
pub(crate) fn in_f32(
    xs: &[&Tensor],
    f: impl FnOnce(&[Tensor]) -> Result<Tensor>,
) -> Result<Tensor> {
    let dtype = xs[0].dtype();
    let wide = xs
        .iter()
        .map(|t| t.to_dtype(DType::F32))
        .collect::<Result<Vec<_>>>()?;
    f(&wide)?.to_dtype(dtype)
}

/// `nn.Linear`: sdgen's kernel for f32 on the CPU (see `kernels::linear`), candle's elsewhere.
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
}

/// A linear layer's weight: as loaded (out, in), or, for bf16 on a CPU with AMX, as the VNNI
/// panels the AMX product reads (`amx_ops::pack_linear_weight`), packed once at load in
/// place of the loaded one.
enum LinearWeight {
    Plain(Tensor),
    Packed {
        panels: Tensor,
        out: usize,
    },
    /// A GEGLU projection's weight and bias in `amx_ops::geglu_order`, the weight packed.
    PackedGeglu {
        panels: Tensor,
        bias: Option<Tensor>,
    },
}

impl LinearWeight {
    /// The weight as loaded (from the panels when the AMX kernels were turned off after load).
    fn plain(&self) -> Result<Tensor> {
        match self {
            LinearWeight::Plain(w) => Ok(w.clone()),
            LinearWeight::Packed { panels, out } => amx_ops::unpack_linear_weight(panels, *out),
            LinearWeight::PackedGeglu { panels, .. } => {
                amx_ops::geglu_order_undone(&amx_ops::unpack_linear_weight(panels, panels.dim(0)?)?)
            }
        }
    }
}

impl Linear {
    /// weight (out, in), bias (out).
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let weight = if amx_ops::handles(&[&weight]) && amx_ops::linear_fits(&weight) {
            LinearWeight::Packed {
                panels: amx_ops::pack_linear_weight(&weight)?,
                out: weight.dim(0)?,
            }
        } else {
            LinearWeight::Plain(weight)
        };
        Ok(Self { weight, bias })
    }

    /// The projection of diffusers' `GEGLU` (weight (2 inner, in), bias (2 inner)), for
    /// [`Linear::forward_geglu`]: for bf16 on a CPU with AMX packed so that the GELU runs on
    /// the product's f32 accumulators (`amx_ops::linear_geglu`).
    pub fn geglu_projection(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let inner2 = weight.dim(0)?;
        if amx_ops::handles(&[&weight]) && amx_ops::linear_fits(&weight) && inner2 % 32 == 0 {
            let geglu_bias = bias.as_ref().map(amx_ops::geglu_order).transpose()?;
            return Ok(Self {
                weight: LinearWeight::PackedGeglu {
                    panels: amx_ops::pack_linear_weight(&amx_ops::geglu_order(&weight)?)?,
                    bias: geglu_bias,
                },
                bias,
            });
        }
        Self::new(weight, bias)
    }

    /// Whether [`Linear::forward_geglu`] of `x` runs fused: the [hidden | gate] projection is
    /// then never in memory.
    pub fn geglu_fused(&self, x: &Tensor) -> bool {
        matches!(&self.weight, LinearWeight::PackedGeglu { panels, .. } if amx_ops::handles(&[x, panels]))
    }

    /// hidden * gelu(gate) (exact erf) of this layer's output [hidden | gate].
    pub fn forward_geglu(&self, x: &Tensor) -> Result<Tensor> {
        if let LinearWeight::PackedGeglu { panels, bias } = &self.weight {
            if amx_ops::handles(&[x, panels]) {
                return amx_ops::linear_geglu(x, panels, bias.as_ref());
            }
        }
        let h = self.forward(x)?;
        if on_cpu(&h) {
            return if h.dtype() == DType::BF16 {
                kernels::geglu(&h)
            } else {
                in_f32(&[&h], |t| kernels::geglu(&t[0]))
            };
        }
        let half = h.dim(D::Minus1)? / 2;
        let hidden = h.narrow(D::Minus1, 0, half)?;
        let gate = h.narrow(D::Minus1, half, half)?;
        hidden * gate.gelu_erf()?
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let LinearWeight::Packed { panels, out } = &self.weight {
            if amx_ops::handles(&[x, panels]) {
                return amx_ops::linear_packed(x, panels, self.bias.as_ref(), *out);
            }
        }
        let weight = self.weight.plain()?;
        if amx_ops::handles(&[x, &weight]) && amx_ops::linear_fits(&weight) {
            return amx_ops::linear(x, &weight, self.bias.as_ref());
        }
        if on_cpu(x) {
            return match &self.bias {
                Some(b) => in_f32(&[x, &weight, b], |t| {
                    kernels::linear(&t[0], &t[1], Some(&t[2]))
                }),
                None => in_f32(&[x, &weight], |t| kernels::linear(&t[0], &t[1], None)),
            };
        }
        candle_nn::Linear::new(weight, self.bias.clone()).forward(x)
    }
}

/// `candle_nn::linear` for [`Linear`].
pub fn linear(cin: usize, cout: usize, vb: VarBuilder) -> Result<Linear> {
    Linear::new(vb.get((cout, cin), "weight")?, Some(vb.get(cout, "bias")?))
}

/// `candle_nn::linear_no_bias` for [`Linear`].
pub fn linear_no_bias(cin: usize, cout: usize, vb: VarBuilder) -> Result<Linear> {
    Linear::new(vb.get((cout, cin), "weight")?, None)
}

/// `nn.Conv2d` (groups 1, dilation 1, with bias).
pub struct Conv2d {
    weight: ConvWeight,
    bias: Tensor,
    geometry: ConvGeometry,
}

/// A convolution's weights: as loaded (cout, cin, kh, kw), or, for bf16 3x3 convolutions on a
/// CPU with a bf16 kernel, as the per-tap matrices the direct convolution reads
/// (`amx_ops::conv3x3_taps`, on AMX tiles) or the Winograd-transformed ones
/// (`winograd_bf16::weights`, on AVX512-BF16 dot products: see `winograd_bf16::preferred`),
/// made once at load in place of the loaded ones so that the memory stays about the same
/// (rearranging them per call cost as much as the convolution on the deep layers).
enum ConvWeight {
    Plain(Tensor),
    Taps { taps: Tensor, cout: usize },
    Winograd { u: Tensor, cout: usize },
}

impl ConvWeight {
    /// The weights as loaded (from the taps when the bf16 kernels were turned off after
    /// load).
    fn plain(&self) -> Result<Tensor> {
        match self {
            ConvWeight::Plain(w) => Ok(w.clone()),
            ConvWeight::Taps { taps, cout } => amx_ops::conv3x3_weight(taps, *cout),
            ConvWeight::Winograd { .. } => candle_core::bail!(
                "a convolution's weights were transformed for the bf16 kernels at load, which \
                 are now off: load the model again"
            ),
        }
    }
}

impl Conv2d {
    pub fn new(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let geometry = ConvGeometry { stride, padding };
        let weight = vb.get((cout, cin, kernel, kernel), "weight")?;
        let weight = if !amx_ops::handles(&[&weight]) {
            ConvWeight::Plain(weight)
        } else if amx_ops::conv3x3_fits(&weight, geometry) {
            if winograd_bf16::preferred() {
                ConvWeight::Winograd {
                    u: winograd_bf16::weights(&weight)?,
                    cout,
                }
            } else {
                ConvWeight::Taps {
                    taps: amx_ops::conv3x3_taps(&weight)?,
                    cout,
                }
            }
        } else {
            ConvWeight::Plain(weight)
        };
        Ok(Self {
            weight,
            bias: vb.get(cout, "bias")?,
            geometry,
        })
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.weight {
            ConvWeight::Taps { taps, cout } if amx_ops::handles(&[x, taps, &self.bias]) => {
                return amx_ops::conv2d_3x3(x, taps, &self.bias, *cout);
            }
            ConvWeight::Winograd { u, cout } if amx_ops::handles(&[x, u, &self.bias]) => {
                return winograd_bf16::conv3x3(x, u, &self.bias, *cout);
            }
            _ => {}
        }
        let weight = self.weight.plain()?;
        if amx_ops::handles(&[x, &weight, &self.bias]) {
            return amx_ops::conv2d(x, &weight, &self.bias, self.geometry);
        }
        if on_cpu(x) {
            return in_f32(&[x, &weight, &self.bias], |t| {
                kernels::conv2d(&t[0], &t[1], &t[2], self.geometry)
            });
        }
        let g = self.geometry;
        let y = x.conv2d(&weight, g.padding, g.stride, 1, 1)?;
        y.broadcast_add(&self.bias.reshape((1, (), 1, 1))?)
    }
}

/// `nn.LayerNorm` (weight and bias): sdgen's kernel for f32 and bf16 on the CPU
/// (`kernels::layer_norm`), candle's otherwise.
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        if on_cpu(x) && matches!(dtype, DType::F32 | DType::BF16) && self.weight.dtype() == dtype {
            return kernels::layer_norm(x, &self.weight, &self.bias, self.eps as f32);
        }
        candle_nn::LayerNorm::new(self.weight.clone(), self.bias.clone(), self.eps).forward(x)
    }
}

/// `nn.GroupNorm` with affine parameters, optionally fused with the SiLU that follows it.
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn new(vb: VarBuilder, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(channels, "weight")?,
            bias: vb.get(channels, "bias")?,
            groups,
            eps,
        })
    }

    pub fn forward_act(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        if on_cpu(x) && x.dtype() == DType::BF16 {
            // bf16 in and out: the kernel widens a group at a time
            let (w, b) = (
                self.weight.to_dtype(DType::F32)?,
                self.bias.to_dtype(DType::F32)?,
            );
            return kernels::group_norm(x, self.groups, &w, &b, self.eps, silu);
        }
        if on_cpu(x) {
            return in_f32(&[x, &self.weight, &self.bias], |t| {
                kernels::group_norm(&t[0], self.groups, &t[1], &t[2], self.eps, silu)
            });
        }
        let c = x.dim(1)?;
        let gn = candle_nn::GroupNorm::new(
            self.weight.clone(),
            self.bias.clone(),
            c,
            self.groups,
            self.eps,
        )?;
        let y = gn.forward(x)?;
        if silu {
            candle_nn::ops::silu(&y)
        } else {
            Ok(y)
        }
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
}

impl ResnetBlock2D {
    pub fn new(
        vb: VarBuilder,
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
        })
    }

    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_act(x, true)?)?;
        let h = match (temb, &self.time_emb_proj) {
            (Some(t), Some(p)) => {
                let t = p.forward(&candle_nn::ops::silu(t)?)?;
                add(&h, &t.unsqueeze(D::Minus1)?.unsqueeze(D::Minus1)?)?
            }
            _ => h,
        };
        let h = self.conv2.forward(&self.norm2.forward_act(&h, true)?)?;
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        let out = add(&shortcut, &h)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}
