//! diffusers' GEGLU after its projection in one pass (`kernels/geglu.cu`).

use super::launch::view;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaStorageSlice as S, WrapErr};
use candle_core::{CpuStorage, CudaDevice, CudaStorage, CustomOp1, Layout, Result, Shape, Tensor};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/geglu.ptx"));

/// hidden * gelu_erf(gate) of h = [hidden | gate] (last dimension): (..., 2 inner) ->
/// (..., inner).
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    h.contiguous()?.apply_op1_no_bwd(&Geglu)
}

struct Geglu;

fn run<T: DeviceRepr>(
    dev: &CudaDevice,
    name: &str,
    h: CudaView<T>,
    rows: usize,
    inner: usize,
) -> Result<CudaSlice<T>> {
    let func = dev.get_or_load_custom_func(name, "sdgen_geglu", PTX)?;
    let n = rows * inner;
    // SAFETY: every element is written by the kernel.
    let out = unsafe { dev.alloc::<T>(n)? };
    let mut b = func.builder();
    b.arg(&h);
    b.arg(&out);
    candle_core::builder_arg!(b, rows, inner as i32);
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(256).min(65535) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the kernel reads rows x 2 inner elements of h and writes rows x inner of out.
    unsafe { b.launch(cfg) }.w()?;
    Ok(out)
}

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "sdgen-geglu"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("sdgen's CUDA GEGLU runs on CUDA tensors only")
    }

    fn cuda_fwd(&self, h: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = h.device();
        let mut dims = l.shape().dims().to_vec();
        let two_inner = *dims.last().unwrap_or(&0);
        if two_inner % 2 != 0 || two_inner == 0 {
            candle_core::bail!("GEGLU of an odd last dimension {two_inner}");
        }
        let inner = two_inner / 2;
        let rows = l.shape().elem_count() / two_inner;
        let slice = match &h.slice {
            S::F32(s) => S::F32(run(dev, "sdgen_geglu_f32", view(s, l)?, rows, inner)?),
            S::F16(s) => S::F16(run(dev, "sdgen_geglu_f16", view(s, l)?, rows, inner)?),
            S::BF16(s) => S::BF16(run(dev, "sdgen_geglu_bf16", view(s, l)?, rows, inner)?),
            _ => candle_core::bail!("no CUDA GEGLU for {:?}", h.dtype()),
        };
        *dims.last_mut().unwrap() = inner;
        Ok((
            CudaStorage {
                slice,
                device: dev.clone(),
            },
            Shape::from(dims),
        ))
    }
}
