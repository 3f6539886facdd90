//! Fused attention for f16/bf16 on the tensor cores (`kernels/attention.cu`).

use super::launch::{type_name, view};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaStorageSlice as S, WrapErr};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp3, DType, Layout, Result, Shape, Tensor,
};

// `PTX`, the (module name, PTX) per padded head width 16, 32, ... 160, and `MAX_D`, the widest
// (SD's 40/80/160, SD 2's and SDXL's 64 among them): written by build.rs with the modules
include!(concat!(env!("OUT_DIR"), "/attention_modules.rs"));

/// The entry point for element type `ty` (`f16`, `bf16`) and padded head width `dp`.
fn kernel_name(ty: &str, dp: usize) -> String {
    format!("sdgen_attention_{ty}_{dp}")
}

/// The kernel's tile: query rows per block and keys per step.
const BM: usize = 64;
const BN: usize = 64;

/// Whether [`attention`] takes these inputs: CUDA, f16 or bf16, one head dimension for
/// queries, keys and values of at most `MAX_D` (160).
pub fn attention_takes(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> bool {
    let d = q.dim(2).unwrap_or(0) / heads.max(1);
    q.device().is_cuda()
        && matches!(q.dtype(), DType::F16 | DType::BF16)
        && k.dtype() == q.dtype()
        && v.dtype() == q.dtype()
        && q.rank() == 3
        && k.dims() == v.dims()
        && k.dim(2).ok() == q.dim(2).ok()
        && d > 0
        && d * heads == q.dim(2).unwrap_or(0)
        && d <= MAX_D
}

/// softmax(q k^T / sqrt(d)) v, heads side by side in the last dim: q (b, tq, heads x d),
/// k and v (b, tk, heads x d) -> (b, tq, heads x d).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    if !attention_takes(q, k, v, heads) {
        candle_core::bail!(
            "sdgen's CUDA attention does not take {:?} {:?}",
            q.dims(),
            q.dtype()
        );
    }
    q.contiguous()?
        .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &Attention { heads })
}

struct Attention {
    heads: usize,
}

/// The shared memory a block of the kernel for head dimension `dp` takes (`Layout` there).
fn shared_bytes(dp: usize) -> usize {
    let ldt = dp + 8;
    (BM + 2 * BN) * ldt * 2 + BM * (BN + 4) * 4 + BM * (BN + 8) * 2 + BM * (dp + 4) * 4 + 2 * BM * 4
}

impl Attention {
    #[allow(clippy::too_many_arguments)]
    fn run<T: DeviceRepr>(
        &self,
        dev: &CudaDevice,
        dtype: DType,
        q: CudaView<T>,
        k: CudaView<T>,
        v: CudaView<T>,
        (b, tq, tk, d): (usize, usize, usize, usize),
    ) -> Result<CudaSlice<T>> {
        let dp = d.div_ceil(16) * 16;
        let name = kernel_name(type_name(dtype)?, dp);
        let (module, ptx) = PTX[dp / 16 - 1];
        let func = dev.get_or_load_custom_func(&name, module, ptx)?;
        let smem = shared_bytes(dp);
        func.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .w()?;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(b * tq * self.heads * d)? };
        let scale_log2 = (1.0 / (d as f64).sqrt() * std::f64::consts::LOG2_E) as f32;
        let mut builder = func.builder();
        builder.arg(&q);
        builder.arg(&k);
        builder.arg(&v);
        builder.arg(&out);
        candle_core::builder_arg!(
            builder,
            tq as i32,
            tk as i32,
            self.heads as i32,
            d as i32,
            scale_log2
        );
        let cfg = LaunchConfig {
            grid_dim: (tq.div_ceil(BM) as u32, self.heads as u32, b as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        // SAFETY: the kernel reads b x tq (q) and b x tk (k, v) rows of heads x d elements and
        // writes b x tq such rows of out: the sizes checked by `attention_takes` and allocated
        // above; its shared memory is `shared_bytes(dp)`, allowed above.
        unsafe { builder.launch(cfg) }.w()?;
        Ok(out)
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "sdgen-attention"
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
        candle_core::bail!("sdgen's CUDA attention runs on CUDA tensors only")
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        ql: &Layout,
        k: &CudaStorage,
        kl: &Layout,
        v: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = q.device();
        let (b, tq, hd) = ql.shape().dims3()?;
        let tk = kl.shape().dims3()?.1;
        let geometry = (b, tq, tk, hd / self.heads);
        let slice = match (&q.slice, &k.slice, &v.slice) {
            (S::F16(q), S::F16(k), S::F16(v)) => S::F16(self.run(
                dev,
                DType::F16,
                view(q, ql)?,
                view(k, kl)?,
                view(v, vl)?,
                geometry,
            )?),
            (S::BF16(q), S::BF16(k), S::BF16(v)) => S::BF16(self.run(
                dev,
                DType::BF16,
                view(q, ql)?,
                view(k, kl)?,
                view(v, vl)?,
                geometry,
            )?),
            _ => candle_core::bail!("sdgen's CUDA attention takes f16 or bf16"),
        };
        Ok((
            CudaStorage {
                slice,
                device: dev.clone(),
            },
            ql.shape().clone(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::{kernel_name, MAX_D, PTX};

    /// Each module defines the entry points the launch asks for (no GPU needed: the PTX text).
    /// A name that the preprocessor left unexpanded once passed the build and failed on the GPU.
    #[test]
    fn each_module_has_its_entry_points() {
        assert_eq!(PTX.len(), MAX_D / 16);
        for (i, (_, ptx)) in PTX.iter().enumerate() {
            for ty in ["f16", "bf16"] {
                let entry = format!(".entry {}(", kernel_name(ty, 16 * (i + 1)));
                assert!(ptx.contains(&entry), "module {i} lacks {entry}");
            }
        }
    }
}
