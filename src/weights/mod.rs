//! Reading weights: safetensors files (`safetensors`), PyTorch zip checkpoints (`pytorch`,
//! over our own `pickle` reader, which builds data and calls nothing), and single-file
//! checkpoints in the original LDM naming (`single_file`, renamed to diffusers' names as they
//! are read).

pub mod pickle;
pub mod pytorch;
pub mod safetensors;
pub mod single_file;

use self::pytorch::TorchCheckpoint;
use self::safetensors::SafetensorsReader;
use anyhow::{Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use std::path::Path;

/// candle's `SimpleBackend` for a file reader with `fn read(&self, name, dtype) -> Tensor` (on
/// the CPU) and a `contains` rule: shapes checked, tensors moved to the device.
macro_rules! simple_backend {
    ($reader:ty, $contains:expr) => {
        impl candle_nn::var_builder::SimpleBackend for $reader {
            fn get(
                &self,
                s: candle_core::Shape,
                name: &str,
                _: candle_nn::Init,
                dtype: candle_core::DType,
                dev: &candle_core::Device,
            ) -> candle_core::Result<candle_core::Tensor> {
                super::expect_shape(self.get_unchecked(name, dtype, dev)?, s, name)
            }

            fn get_unchecked(
                &self,
                name: &str,
                dtype: candle_core::DType,
                dev: &candle_core::Device,
            ) -> candle_core::Result<candle_core::Tensor> {
                self.read(name, dtype)?.to_device(dev)
            }

            fn contains_tensor(&self, name: &str) -> bool {
                ($contains)(self, name)
            }
        }
    };
}
pub(crate) use simple_backend;

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

/// A `VarBuilder` over one weight file: safetensors or a PyTorch `.bin`, read tensor by
/// tensor.
pub fn var_builder(path: &Path, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    let is_safetensors = path.extension().is_some_and(|e| e == "safetensors");
    let backend: Result<Box<dyn candle_nn::var_builder::SimpleBackend>> = if is_safetensors {
        SafetensorsReader::open(path).map(|r| Box::new(r) as _)
    } else {
        TorchCheckpoint::open(path).map(|r| Box::new(r) as _)
    };
    let backend = backend.with_context(|| {
        format!(
            "cannot read weights {} (corrupt or incomplete file? delete it and download again)",
            path.display()
        )
    })?;
    Ok(VarBuilder::from_backend(backend, dtype, device.clone()))
}
