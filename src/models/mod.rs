//! Model code: the architectures of the CLIP text encoder, the U-Net and the VAE decoder, with
//! the parameter names of transformers and diffusers. Which kernels run is not decided here:
//! layers prepare their weights for the model's [`Engine`] and call `ops`.

pub mod attention;
pub mod clip;
pub mod layers;
pub mod unet;
pub mod vae;

use crate::ops::Engine;
use candle_core::{Result, Shape, Tensor};
use candle_nn::VarBuilder;

/// A model's weights under a name prefix, and the engine its layers are prepared for: what
/// each layer's constructor takes (candle's `VarBuilder`, which it wraps, has no room for the
/// engine).
#[derive(Clone)]
pub struct Loader<'a> {
    vb: VarBuilder<'a>,
    engine: Engine,
}

impl<'a> Loader<'a> {
    pub fn new(vb: VarBuilder<'a>, engine: Engine) -> Self {
        Self { vb, engine }
    }

    /// The weights under `prefix.`.
    pub fn pp<S: ToString>(&self, prefix: S) -> Self {
        Self {
            vb: self.vb.pp(prefix),
            engine: self.engine,
        }
    }

    /// The tensor `name` (under this prefix) of shape `shape`, in the model's type and device.
    pub fn get<S: Into<Shape>>(&self, shape: S, name: &str) -> Result<Tensor> {
        self.vb.get(shape, name)
    }

    pub fn contains_tensor(&self, name: &str) -> bool {
        self.vb.contains_tensor(name)
    }

    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// candle's `VarBuilder` for this prefix, for candle's own layers (CLIP's embeddings and
    /// LayerNorms).
    pub fn candle(&self) -> VarBuilder<'a> {
        self.vb.clone()
    }
}
