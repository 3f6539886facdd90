//! The operations the models are made of, and the one place that decides which implementation
//! runs each of them.
//!
//! Model code (`models/`) describes the architecture: it reads its weights under diffusers'
//! names, prepares them here once at load (`LinearWeights::prepare`, `ConvWeights::prepare`,
//! ...) and calls [`linear`], [`conv2d`], [`group_norm`], [`attention`] and the rest. What runs
//! is decided by an [`Engine`], chosen once per model when it is loaded:
//! - [`Engine::Cpu`]: sdgen's CPU kernels (`crate::cpu`); bf16 matrix work on the
//!   [`Bf16Kernel`] the engine names (AMX tiles or AVX512-BF16 dot products), each weight
//!   rearranged at load into the layout its kernel reads; other types widened to f32.
//! - `Engine::Cuda` (`cuda` feature): sdgen's CUDA kernels (`crate::cuda`) for attention in
//!   f16/bf16, GroupNorm and GEGLU, cuDNN convolutions in f16/bf16 (`SDGEN_CUDA_CONV`);
//!   candle's CUDA kernels (the reference) for the rest.
//! - [`Engine::Reference`]: candle's own ops composed ([`reference`]), on any device; the
//!   kernel tests compare the other engines against it. `SDGEN_CUDA_KERNELS=0` runs CUDA
//!   models on it (to compare).
//!
//! A prepared weight is a variant that names its implementation, so `forward` matches on it and
//! reads no global state: two models loaded with different engines run side by side in one
//! process (the tests compare the engines that way).

pub mod profile;
pub mod reference;
#[cfg(test)]
mod tests;

use crate::cpu;
use candle_core::{DType, Device, Result, Tensor};

pub use crate::cpu::bf16::Kernel as Bf16Kernel;
pub use crate::cpu::common::conv::ConvGeometry;

/// Which implementations a model's operations run on; chosen when the model is loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// candle's ops composed ([`reference`]): any device.
    Reference,
    /// sdgen's CPU kernels.
    Cpu(CpuEngine),
    /// sdgen's CUDA kernels where it has them, candle's elsewhere.
    #[cfg(feature = "cuda")]
    Cuda,
}

/// The choices inside the CPU engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuEngine {
    /// The bf16 matrix products of bf16 layers; `None`: bf16 is widened to f32 for the f32
    /// kernels (and back), as on CPUs without AMX or AVX512-BF16.
    pub bf16: Option<Bf16Kernel>,
    /// The fewest 2x2 output tiles (over the batch) for which an f32 3x3 convolution goes
    /// through Winograd: 0 all of them, `usize::MAX` none.
    pub winograd_min_tiles: usize,
}

impl CpuEngine {
    /// The CPU engine with bf16 on `bf16` and the measured Winograd threshold.
    pub fn with_bf16(bf16: Option<Bf16Kernel>) -> Self {
        Self {
            bf16,
            winograd_min_tiles: cpu::f32::conv::WINOGRAD_MIN_TILES,
        }
    }
}

impl Default for CpuEngine {
    /// The fastest bf16 kernel this CPU has, or the one `SDGEN_BF16_KERNEL` names
    /// ([`Bf16Kernel::from_env`]).
    fn default() -> Self {
        Self::with_bf16(Bf16Kernel::from_env())
    }
}

impl Engine {
    /// The engine for models on `device`: the CPU kernels on the CPU, sdgen's CUDA kernels on
    /// a CUDA device (the reference with `SDGEN_CUDA_KERNELS=0`), the reference elsewhere.
    pub fn for_device(device: &Device) -> Self {
        if device.is_cpu() {
            return Engine::Cpu(CpuEngine::default());
        }
        #[cfg(feature = "cuda")]
        if device.is_cuda() && std::env::var("SDGEN_CUDA_KERNELS").as_deref() != Ok("0") {
            return Engine::Cuda;
        }
        Engine::Reference
    }

    /// The bf16 kernel bf16 layers run on, if any.
    fn bf16_kernel(self) -> Option<Bf16Kernel> {
        match self {
            Engine::Cpu(c) => c.bf16,
            _ => None,
        }
    }
}

/// Every bf16 kernel this CPU and OS can run, fastest first (for tests and benchmarks that
/// compare them).
pub fn bf16_kernels() -> Vec<Bf16Kernel> {
    cpu::bf16::available_kernels()
}

/// Runs `f` on f32 versions of `xs` (the tensors themselves when they are f32 already) and
/// gives its result in the type of `xs[0]`: how other types reach the f32 CPU kernels.
/// candle has no CPU matmul for bf16 and its f16 one is far slower than the f32 kernels;
/// torch's CPU kernels accumulate narrow types in f32 too. Weights stay in the narrow type
/// (half the memory); activations are rounded back to it between layers, as in torch.
fn in_f32(xs: &[&Tensor], f: impl FnOnce(&[Tensor]) -> Result<Tensor>) -> Result<Tensor> {
    let dtype = xs[0].dtype();
    let wide = xs
        .iter()
        .map(|t| t.to_dtype(DType::F32))
        .collect::<Result<Vec<_>>>()?;
    f(&wide)?.to_dtype(dtype)
}

/// Whether every tensor is bf16 (on the CPU engine, tensors are on the CPU).
fn all_bf16(xs: &[&Tensor]) -> bool {
    xs.iter().all(|t| t.dtype() == DType::BF16)
}

/// A linear layer's weight (out, in) and bias (out), prepared for its engine.
pub struct LinearWeights {
    weight: LinearWeight,
    bias: Option<Tensor>,
}

enum LinearWeight {
    Reference(Tensor),
    /// The f32 kernel (`cpu::f32::linear`); other types widened.
    CpuF32(Tensor),
    /// bf16 on `kernel`: the weight as the VNNI panels the product reads
    /// (`cpu::bf16::layers::pack_linear_weight`, packing per call cost 3-4% of a U-Net step);
    /// `out` the weight's rows.
    Bf16Panels {
        panels: Tensor,
        out: usize,
        kernel: Bf16Kernel,
    },
    /// diffusers' GEGLU projection (2 inner, in) on `kernel`, in `geglu_order` and packed, so
    /// that the GELU runs on the product's f32 accumulators and the [hidden | gate]
    /// projection is never in memory; the bias is in `geglu_order` too.
    Bf16Geglu {
        panels: Tensor,
        kernel: Bf16Kernel,
    },
    /// diffusers' GEGLU projection on CUDA: candle's product, then sdgen's GEGLU kernel.
    #[cfg(feature = "cuda")]
    CudaGeglu(Tensor),
}

impl LinearWeights {
    /// weight (out, in), bias (out), for `engine`.
    pub fn prepare(engine: Engine, weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let weight = match engine {
            Engine::Cpu(c) => match c.bf16 {
                Some(kernel) if all_bf16(&[&weight]) && cpu::bf16::layers::linear_fits(&weight) => {
                    LinearWeight::Bf16Panels {
                        panels: cpu::bf16::layers::pack_linear_weight(&weight)?,
                        out: weight.dim(0)?,
                        kernel,
                    }
                }
                _ => LinearWeight::CpuF32(weight),
            },
            _ => LinearWeight::Reference(weight),
        };
        Ok(Self { weight, bias })
    }

    /// The projection of diffusers' `GEGLU` (weight (2 inner, in), bias (2 inner)), for
    /// [`geglu`]: fused with the GELU for bf16 on a bf16 kernel.
    pub fn prepare_geglu(engine: Engine, weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        use cpu::bf16::layers::{geglu_order, linear_fits, pack_linear_weight};
        #[cfg(feature = "cuda")]
        if engine == Engine::Cuda {
            return Ok(Self {
                weight: LinearWeight::CudaGeglu(weight),
                bias,
            });
        }
        match engine.bf16_kernel() {
            Some(kernel)
                if all_bf16(&[&weight]) && linear_fits(&weight) && weight.dim(0)? % 32 == 0 =>
            {
                Ok(Self {
                    weight: LinearWeight::Bf16Geglu {
                        panels: pack_linear_weight(&geglu_order(&weight)?)?,
                        kernel,
                    },
                    bias: bias.as_ref().map(geglu_order).transpose()?,
                })
            }
            _ => Self::prepare(engine, weight, bias),
        }
    }

    /// Whether [`geglu`] runs fused: the [hidden | gate] projection is then never in memory.
    pub fn geglu_fused(&self) -> bool {
        matches!(self.weight, LinearWeight::Bf16Geglu { .. })
    }
}

/// `nn.Linear`: x (..., in) -> (..., out).
pub fn linear(x: &Tensor, w: &LinearWeights) -> Result<Tensor> {
    let _span = profile::span("linear", x);
    let bias = w.bias.as_ref();
    match &w.weight {
        LinearWeight::Reference(weight) => reference::linear(x, weight, bias),
        LinearWeight::CpuF32(weight) => match bias {
            Some(b) => in_f32(&[x, weight, b], |t| {
                cpu::f32::linear::linear(&t[0], &t[1], Some(&t[2]))
            }),
            None => in_f32(&[x, weight], |t| {
                cpu::f32::linear::linear(&t[0], &t[1], None)
            }),
        },
        LinearWeight::Bf16Panels {
            panels,
            out,
            kernel,
        } => cpu::bf16::layers::linear_packed(*kernel, x, panels, bias, *out),
        LinearWeight::Bf16Geglu { .. } => {
            candle_core::bail!("a GEGLU projection runs through ops::geglu")
        }
        #[cfg(feature = "cuda")]
        LinearWeight::CudaGeglu(_) => {
            candle_core::bail!("a GEGLU projection runs through ops::geglu")
        }
    }
}

/// diffusers' `GEGLU`: the projection to [hidden | gate], then hidden * gelu(gate) (exact erf).
pub fn geglu(x: &Tensor, w: &LinearWeights) -> Result<Tensor> {
    let _span = profile::span("geglu", x);
    match &w.weight {
        LinearWeight::Bf16Geglu { panels, kernel } => {
            cpu::bf16::layers::linear_geglu(*kernel, x, panels, w.bias.as_ref())
        }
        LinearWeight::Reference(_) => reference::geglu(&linear(x, w)?),
        #[cfg(feature = "cuda")]
        LinearWeight::CudaGeglu(weight) => {
            crate::cuda::geglu(&reference::linear(x, weight, w.bias.as_ref())?)
        }
        LinearWeight::CpuF32(_) | LinearWeight::Bf16Panels { .. } => {
            let h = linear(x, w)?;
            if h.dtype() == DType::BF16 {
                cpu::geglu::geglu(&h)
            } else {
                in_f32(&[&h], |t| cpu::geglu::geglu(&t[0]))
            }
        }
    }
}

/// A convolution's weights (cout, cin, kh, kw), bias (cout) and geometry (groups 1, dilation
/// 1), prepared for its engine.
pub struct ConvWeights {
    weight: ConvWeight,
    bias: Tensor,
    geometry: ConvGeometry,
}

enum ConvWeight {
    Reference(Tensor),
    /// cuDNN with kept plans (`crate::cuda::conv2d`; `crate::cuda::conv_takes`).
    #[cfg(feature = "cuda")]
    Cudnn(Tensor),
    /// The f32 kernels (im2col, or Winograd from `winograd_min_tiles` tiles); other types
    /// widened.
    CpuF32 {
        weight: Tensor,
        winograd_min_tiles: usize,
    },
    /// bf16 on `kernel`, any geometry: im2col on the block products.
    Bf16Im2col {
        weight: Tensor,
        kernel: Bf16Kernel,
    },
    /// A bf16 3x3 convolution (stride 1, padding 1) on AMX tiles, direct: one cout x cin
    /// matrix per tap (`conv3x3_taps`), made at load in place of the loaded weights
    /// (rearranging them per call cost as much as the convolution on the deep layers).
    Bf16Taps {
        taps: Tensor,
        cout: usize,
        kernel: Bf16Kernel,
    },
    /// A bf16 3x3 convolution on the dot products, by Winograd (`cpu::bf16::winograd`), its
    /// weights transformed at load (16/9 of the loaded ones).
    Bf16Winograd {
        u: Tensor,
        cout: usize,
        kernel: Bf16Kernel,
    },
}

impl ConvWeights {
    pub fn prepare(
        engine: Engine,
        weight: Tensor,
        bias: Tensor,
        geometry: ConvGeometry,
    ) -> Result<Self> {
        use cpu::bf16::layers::{conv3x3_fits, conv3x3_taps};
        let cout = weight.dim(0)?;
        let weight = match engine {
            Engine::Cpu(c) => match c.bf16 {
                Some(kernel) if all_bf16(&[&weight, &bias]) => {
                    if !conv3x3_fits(&weight, geometry) {
                        ConvWeight::Bf16Im2col { weight, kernel }
                    } else if kernel.prefers_winograd() {
                        ConvWeight::Bf16Winograd {
                            u: cpu::bf16::winograd::weights(&weight)?,
                            cout,
                            kernel,
                        }
                    } else {
                        ConvWeight::Bf16Taps {
                            taps: conv3x3_taps(&weight)?,
                            cout,
                            kernel,
                        }
                    }
                }
                _ => ConvWeight::CpuF32 {
                    weight,
                    winograd_min_tiles: c.winograd_min_tiles,
                },
            },
            #[cfg(feature = "cuda")]
            Engine::Cuda if crate::cuda::conv_takes(weight.dtype()) => ConvWeight::Cudnn(weight),
            _ => ConvWeight::Reference(weight),
        };
        Ok(Self {
            weight,
            bias,
            geometry,
        })
    }
}

/// `nn.Conv2d`: x (b, cin, h, w) -> (b, cout, ho, wo).
pub fn conv2d(x: &Tensor, w: &ConvWeights) -> Result<Tensor> {
    let _span = profile::span("conv2d", x);
    let (bias, g) = (&w.bias, w.geometry);
    match &w.weight {
        ConvWeight::Reference(weight) => reference::conv2d(x, weight, bias, g),
        #[cfg(feature = "cuda")]
        ConvWeight::Cudnn(weight) => crate::cuda::conv2d(x, weight, g.padding, g.stride)?
            .broadcast_add(&bias.reshape((1, (), 1, 1))?),
        ConvWeight::CpuF32 {
            weight,
            winograd_min_tiles,
        } => in_f32(&[x, weight, bias], |t| {
            cpu::f32::conv::conv2d(&t[0], &t[1], &t[2], g, *winograd_min_tiles)
        }),
        ConvWeight::Bf16Im2col { weight, kernel } => {
            cpu::bf16::layers::conv2d(*kernel, x, weight, bias, g)
        }
        ConvWeight::Bf16Taps { taps, cout, kernel } => {
            cpu::bf16::layers::conv2d_3x3(*kernel, x, taps, bias, *cout)
        }
        ConvWeight::Bf16Winograd { u, cout, kernel } => {
            cpu::bf16::winograd::conv3x3(*kernel, x, u, bias, *cout)
        }
    }
}

/// A normalisation's affine parameters (channels), prepared for its engine.
pub struct NormWeights {
    weight: Tensor,
    bias: Tensor,
    engine: Engine,
}

impl NormWeights {
    /// A GroupNorm's weight and bias (channels). The CPU and CUDA kernels compute in f32
    /// and take them in f32 (exact) whatever the model's type: converted here once.
    pub fn group_norm(engine: Engine, weight: Tensor, bias: Tensor) -> Result<Self> {
        let (weight, bias) = match engine {
            Engine::Reference => (weight, bias),
            _ => (weight.to_dtype(DType::F32)?, bias.to_dtype(DType::F32)?),
        };
        Ok(Self {
            weight,
            bias,
            engine,
        })
    }

    /// A LayerNorm's weight and bias (features), in the model's type.
    pub fn layer_norm(engine: Engine, weight: Tensor, bias: Tensor) -> Result<Self> {
        Ok(Self {
            weight,
            bias,
            engine,
        })
    }
}

/// `nn.GroupNorm` with affine parameters over x (b, c, ...), followed by SiLU when `silu`.
pub fn group_norm(
    x: &Tensor,
    w: &NormWeights,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let _span = profile::span("group_norm", x);
    match w.engine {
        Engine::Reference => reference::group_norm(x, &w.weight, &w.bias, groups, eps, silu),
        Engine::Cpu(_) if x.dtype() == DType::BF16 => {
            // bf16 in and out: the kernel widens a group at a time
            cpu::norm::group_norm(x, groups, &w.weight, &w.bias, eps, silu)
        }
        Engine::Cpu(_) => in_f32(&[x, &w.weight, &w.bias], |t| {
            cpu::norm::group_norm(&t[0], groups, &t[1], &t[2], eps, silu)
        }),
        #[cfg(feature = "cuda")]
        Engine::Cuda => crate::cuda::group_norm(x, &w.weight, &w.bias, groups, eps, silu),
    }
}

/// `nn.LayerNorm` (weight and bias) over the last dimension.
pub fn layer_norm(x: &Tensor, w: &NormWeights, eps: f64) -> Result<Tensor> {
    let _span = profile::span("layer_norm", x);
    let dtype = x.dtype();
    match w.engine {
        Engine::Cpu(_)
            if matches!(dtype, DType::F32 | DType::BF16) && w.weight.dtype() == dtype =>
        {
            cpu::norm::layer_norm(x, &w.weight, &w.bias, eps as f32)
        }
        _ => reference::layer_norm(x, &w.weight, &w.bias, eps),
    }
}

/// softmax(q k^T / sqrt(d)) v with the heads side by side in the last dim, as the projections
/// give them and the output projection takes them: q (b, tq, heads x d), k (b, tk, heads x d),
/// v (b, tk, heads x dv) -> (b, tq, heads x dv). bf16 on a bf16 kernel runs on that layout as
/// it is; otherwise the heads are split into (b, heads, t, d) (no copy for one head) and
/// merged back.
pub fn attention(engine: Engine, q: Tensor, k: Tensor, v: Tensor, heads: usize) -> Result<Tensor> {
    let _span = profile::span("attention", &q);
    #[cfg(feature = "cuda")]
    if engine == Engine::Cuda && crate::cuda::attention_takes(&q, &k, &v, heads) {
        return crate::cuda::attention(&q, &k, &v, heads);
    }
    if let Some(kernel) = engine.bf16_kernel() {
        if all_bf16(&[&q, &k, &v]) {
            return cpu::bf16::layers::attention(kernel, &q, &k, &v, heads);
        }
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
    let out = match engine {
        Engine::Cpu(_) => in_f32(&[&q, &k, &v], |t| {
            cpu::f32::attention::fused_attention(&t[0], &t[1], &t[2])
        })?,
        _ => reference::attention(&q, &k, &v)?,
    };
    let dv = out.dim(3)?;
    out.transpose(1, 2)?.reshape((b, tq, heads * dv))
}

/// (b, c, h, w) -> (b, h w, c): an image's pixels as tokens, channels last.
pub fn to_tokens(engine: Engine, x: &Tensor) -> Result<Tensor> {
    let _span = profile::span("to_tokens", x);
    match engine {
        Engine::Cpu(_) if cpu::token_layout::takes(x) => cpu::token_layout::to_tokens(x),
        _ => reference::to_tokens(x),
    }
}

/// residual (b, c, h, w) + tokens (b, h w, c) seen as an image: a transformer's output.
pub fn to_image_add(engine: Engine, tokens: &Tensor, residual: &Tensor) -> Result<Tensor> {
    let _span = profile::span("to_image_add", tokens);
    match engine {
        Engine::Cpu(_)
            if cpu::token_layout::takes(tokens) && tokens.dtype() == residual.dtype() =>
        {
            cpu::token_layout::to_image_add(tokens, residual)
        }
        _ => {
            let (b, c, h, w) = residual.dims4()?;
            let image = tokens.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?;
            add(engine, &image.contiguous()?, residual)
        }
    }
}

/// a + b, b broadcast to a's shape: residual additions and the time embedding's shift.
pub fn add(engine: Engine, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let _span = profile::span("add", a);
    match engine {
        Engine::Cpu(_) if cpu::elementwise::takes(a, b) => cpu::elementwise::add(a, b),
        _ => a.broadcast_add(b),
    }
}
