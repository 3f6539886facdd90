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
use std::path::PathBuf;

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

/// A weight file named on the command line (a LoRA, an embedding): a local file, else
/// `OWNER/REPO/FILE` on the Hub at `main` (cache only when offline).
pub fn resolve_file(spec: &str, offline: bool, progress: bool) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    let parts: Vec<&str> = spec.splitn(3, '/').collect();
    let hub_like = parts.len() == 3
        && parts.iter().all(|p| !p.is_empty())
        && !spec.starts_with('.')
        && !spec.contains('\\');
    if !hub_like {
        bail!("{spec} does not exist (a file, or OWNER/REPO/FILE on the Hugging Face Hub)");
    }
    let repo_id = format!("{}/{}", parts[0], parts[1]);
    if offline {
        cache::cached_file(&repo_id, "main", parts[2])
    } else {
        hub::fetch_file(&repo_id, "main", parts[2], progress)
    }
}
