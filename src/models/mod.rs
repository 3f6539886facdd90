//! Model code: the CLIP text encoder, the U-Net and the VAE, and weight loading.

pub mod attention;
pub mod clip;
pub mod layers;
pub mod unet;
pub mod vae;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use std::path::Path;

/// A `VarBuilder` over one weight file: safetensors (memory-mapped) or a PyTorch `.bin`, which
/// candle reads with a pickle reader that only rebuilds tensors and never runs code.
pub fn var_builder(path: &Path, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    let is_safetensors = path.extension().is_some_and(|e| e == "safetensors");
    let vb = if is_safetensors {
        // SAFETY: the file is mapped read-only; sdgen never writes model files while they are
        // mapped, and a file truncated under us is a fault candle cannot guard against either.
        unsafe { VarBuilder::from_mmaped_safetensors(&[path], dtype, device) }
    } else {
        VarBuilder::from_pth(path, dtype, device)
    };
    vb.with_context(|| {
        format!(
            "cannot read weights {} (corrupt or incomplete file? delete it and download again)",
            path.display()
        )
    })
}
