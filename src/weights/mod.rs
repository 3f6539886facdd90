//! Reading weights: safetensors files (`safetensors`), PyTorch `.bin` pickles (candle's reader,
//! which only rebuilds tensors), and single-file checkpoints in the original LDM naming
//! (`single_file`, renamed to diffusers' names as they are read).

pub mod safetensors;
pub mod single_file;

use self::safetensors::SafetensorsReader;
use anyhow::{Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use std::path::Path;

/// `t` if it has shape `s`, else the error candle's own backends give.
pub fn expect_shape(t: Tensor, s: Shape, name: &str) -> candle_core::Result<Tensor> {
    if t.shape() != &s {
        return Err(candle_core::Error::UnexpectedShape {
            msg: format!("shape mismatch for {name}"),
            expected: s,
            got: t.shape().clone(),
        });
    }
    Ok(t)
}

/// A `VarBuilder` over one weight file: safetensors (read tensor by tensor) or a PyTorch
/// `.bin`, which candle reads with a pickle reader that only rebuilds tensors and never runs
/// code.
pub fn var_builder(path: &Path, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    let is_safetensors = path.extension().is_some_and(|e| e == "safetensors");
    let vb = if is_safetensors {
        SafetensorsReader::open(path)
            .map(|r| VarBuilder::from_backend(Box::new(r), dtype, device.clone()))
    } else {
        VarBuilder::from_pth(path, dtype, device).map_err(anyhow::Error::from)
    };
    vb.with_context(|| {
        format!(
            "cannot read weights {} (corrupt or incomplete file? delete it and download again)",
            path.display()
        )
    })
}
