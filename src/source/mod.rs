//! Where a model's files come from: a local diffusers folder or single-file checkpoint, the
//! Hugging Face cache (offline), or the Hub through hf-hub into that same cache.
//!
//! `files` (what a model is made of, and which files to take) is used by `cache` (the shared
//! cache) and `hub` (downloads, falling back to the cache); [`resolve`] picks among them.

mod cache;
mod files;
mod hub;

pub use cache::{hub_cache_dir, offline_from_env};
pub use files::{ModelFiles, ModelRequest, Precision, WeightFiles};

use crate::weights::single_file;
use anyhow::{bail, Result};
use std::path::Path;

/// Resolves a `--model` value: a checkpoint file, a folder, else a Hub repo id (cache only
/// when offline).
pub fn resolve(req: &ModelRequest) -> Result<ModelFiles> {
    let path = Path::new(req.model);
    if path.is_file() {
        if !single_file::is_checkpoint_file(req.model) {
            bail!("{}: a model file must be a .safetensors or .ckpt checkpoint (or pass a diffusers folder)", req.model);
        }
        return ModelFiles::single_file(req.model.to_string(), None, path, req.config_from);
    }
    if path.is_dir() {
        return ModelFiles::from_folder_with(path, req.precision, req.checkpoint, req.config_from);
    }
    let looks_like_path = req.model.starts_with('.')
        || req.model.starts_with('/')
        || req.model.contains('\\')
        || req.model.split('/').count() > 2
        || single_file::is_checkpoint_file(req.model);
    if looks_like_path {
        bail!("model {} does not exist", req.model);
    }
    if req.offline {
        return cache::from_cache(req);
    }
    hub::fetch(req)
}
