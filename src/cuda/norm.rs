//! GroupNorm (+ SiLU) in one kernel (`kernels/norm.cu`).

use super::launch::view;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaStorageSlice as S, WrapErr};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp3, DType, Layout, Result, Shape, Tensor,
};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/norm.ptx"));

/// `nn.GroupNorm` over x (b, c, ...) with f32 weight and bias (c), then SiLU when `silu`;
/// statistics in f32, the result in x's type.
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    if weight.dtype() != DType::F32 || bias.dtype() != DType::F32 {
        candle_core::bail!("the CUDA GroupNorm takes f32 weights");
    }
    let c = x.dim(1)?;
    if c % groups != 0 || weight.elem_count() != c || bias.elem_count() != c {
        candle_core::bail!(
            "GroupNorm: {c} channels, {groups} groups, {} weights",
            weight.elem_count()
        );
    }
    x.contiguous()?.apply_op3_no_bwd(
        &weight.contiguous()?,
        &bias.contiguous()?,
        &GroupNorm {
            groups,
            eps: eps as f32,
            silu,
        },
    )
}

struct GroupNorm {
    groups: usize,
    eps: f32,
    silu: bool,
}

impl GroupNorm {
    #[allow(clippy::too_many_arguments)]
    fn run<T: DeviceRepr>(
        &self,
        dev: &CudaDevice,
        name: &str,
        x: CudaView<T>,
        weight: &CudaView<f32>,
        bias: &CudaView<f32>,
        (batch, channels, pixels): (usize, usize, usize),
    ) -> Result<CudaSlice<T>> {
        let func = dev.get_or_load_custom_func(name, "sdgen_norm", PTX)?;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(batch * channels * pixels)? };
        let mut b = func.builder();
        b.arg(&x);
        b.arg(&out);
        b.arg(weight);
        b.arg(bias);
        candle_core::builder_arg!(
            b,
            channels as i32,
            pixels as i32,
            self.groups as i32,
            self.eps,
            self.silu as i32
        );
        let cfg = LaunchConfig {
            grid_dim: ((batch * self.groups) as u32, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the kernel reads batch x channels x pixels elements of x and channels of the
        // weights, and writes as many of out, all of them allocated above or checked by the
        // caller (contiguous views of those sizes).
        unsafe { b.launch(cfg) }.w()?;
        Ok(out)
    }
}

impl CustomOp3 for GroupNorm {
    fn name(&self) -> &'static str {
        "sdgen-group-norm"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("sdgen's CUDA GroupNorm runs on CUDA tensors only")
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = x.device();
        let dims = xl.shape().dims();
        let (batch, channels) = (dims[0], dims[1]);
        let geometry = (
            batch,
            channels,
            xl.shape().elem_count() / (batch * channels),
        );
        let (w, b) = match (&w.slice, &b.slice) {
            (S::F32(w), S::F32(b)) => (view(w, wl)?, view(b, bl)?),
            _ => candle_core::bail!("the CUDA GroupNorm takes f32 weights"),
        };
        let slice = match &x.slice {
            S::F32(s) => {
                S::F32(self.run(dev, "sdgen_group_norm_f32", view(s, xl)?, &w, &b, geometry)?)
            }
            S::F16(s) => {
                S::F16(self.run(dev, "sdgen_group_norm_f16", view(s, xl)?, &w, &b, geometry)?)
            }
            S::BF16(s) => {
                S::BF16(self.run(dev, "sdgen_group_norm_bf16", view(s, xl)?, &w, &b, geometry)?)
            }
            _ => candle_core::bail!("no CUDA GroupNorm for {:?}", x.dtype()),
        };
        Ok((
            CudaStorage {
                slice,
                device: dev.clone(),
            },
            xl.shape().clone(),
        ))
    }
}
