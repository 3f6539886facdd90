//! What the kernels' wrappers share: the contiguous device view of a tensor's storage and the
//! kernels' type suffixes. (A kernel is loaded with `CudaDevice::get_or_load_custom_func`,
//! once per device and module.)

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView};
use candle_core::{Layout, Result};

/// The elements `layout` covers, which must be contiguous (the wrappers make them so).
pub fn view<'a, T>(slice: &'a CudaSlice<T>, layout: &Layout) -> Result<CudaView<'a, T>> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(slice.slice(start..end)),
        None => candle_core::bail!("an sdgen CUDA kernel was given a non-contiguous tensor"),
    }
}

/// The type suffix of a kernel's name.
pub fn type_name(dtype: candle_core::DType) -> Result<&'static str> {
    use candle_core::DType;
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        other => candle_core::bail!("no sdgen CUDA kernel for {other:?}"),
    })
}
