//! Model code: the architectures of the CLIP text encoder, the U-Net and the VAE decoder, with
//! the parameter names of transformers and diffusers. Which kernels run is not decided here:
//! layers prepare their weights for the model's [`Engine`] and call `ops`.

pub mod attention;
pub mod clip;
pub mod layers;
pub mod unet;
pub mod vae;
pub mod vae_encoder;
pub mod vae_tiling;

use crate::addons::lora::LoraPatch;
use crate::ops::Engine;
use candle_core::{DType, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use std::rc::Rc;

/// A model's weights under a name prefix, the engine its layers are prepared for, and the
/// LoRAs merged into them: what each layer's constructor takes (candle's `VarBuilder`, which
/// it wraps, has no room for the engine).
#[derive(Clone)]
pub struct Loader<'a> {
    vb: VarBuilder<'a>,
    engine: Engine,
    lora: Option<Rc<LoraPatch>>,
}

impl<'a> Loader<'a> {
    pub fn new(vb: VarBuilder<'a>, engine: Engine, lora: Option<Rc<LoraPatch>>) -> Self {
        Self { vb, engine, lora }
    }

    /// The weights under `prefix.`.
    pub fn pp<S: ToString>(&self, prefix: S) -> Self {
        Self {
            vb: self.vb.pp(prefix),
            engine: self.engine,
            lora: self.lora.clone(),
        }
    }

    /// The tensor `name` (under this prefix) of shape `shape`, in the model's type and device,
    /// with the LoRAs' updates added (in f32, before the layer prepares it).
    pub fn get<S: Into<Shape>>(&self, shape: S, name: &str) -> Result<Tensor> {
        let shape = shape.into();
        let full = match self.vb.prefix() {
            p if p.is_empty() => name.to_string(),
            p => format!("{p}.{name}"),
        };
        let Some(lora) = self.lora.as_ref().filter(|l| l.adapts(&full)) else {
            return self.vb.get(shape, name);
        };
        let weight = self.vb.get_with_hints_dtype(
            shape.clone(),
            name,
            candle_nn::Init::Const(0.0),
            DType::F32,
        )?;
        let update = lora
            .update(&full, &shape, weight.device())
            .map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
        match update {
            Some(u) => (weight + u)?.to_dtype(self.vb.dtype()),
            None => weight.to_dtype(self.vb.dtype()),
        }
    }

    /// The LoRAs merged as weights are read.
    pub fn lora(&self) -> Option<&Rc<LoraPatch>> {
        self.lora.as_ref()
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
