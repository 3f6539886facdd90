//! The Hugging Face cache shared with Python's `huggingface_hub`: where it is, and a model
//! resolved from it alone (offline).

use super::files::{list_dir, plan_files, ModelFiles, ModelRequest, Plan};
use anyhow::{bail, Result};
use std::path::PathBuf;

/// The Hugging Face hub cache folder as Python's huggingface_hub resolves it: HF_HUB_CACHE,
/// else HF_HOME/hub, else XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub,
/// the home folder from HOME or, when HOME is unset, the user database (as Python's
/// `expanduser` does; it was the current folder).
pub fn hub_cache_dir() -> Result<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(p) = var("HF_HUB_CACHE") {
        return Ok(p);
    }
    if let Some(p) = var("HF_HOME") {
        return Ok(p.join("hub"));
    }
    if let Some(p) = var("XDG_CACHE_HOME") {
        return Ok(p.join("huggingface/hub"));
    }
    match std::env::home_dir() {
        Some(home) if home.is_absolute() => Ok(home.join(".cache/huggingface/hub")),
        _ => bail!("cannot tell where the Hugging Face cache is: HOME is unset and the user has no home folder; set HF_HOME or HF_HUB_CACHE"),
    }
}

/// Whether HF_HUB_OFFLINE asks for cache-only operation.
pub fn offline_from_env() -> bool {
    matches!(
        std::env::var("HF_HUB_OFFLINE")
            .ok()
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some("1" | "true" | "yes" | "on")
    )
}

/// The cache folder of a model repo: `models--ORG--NAME`.
pub(crate) fn repo_folder(repo_id: &str) -> String {
    format!("models--{}", repo_id.replace('/', "--"))
}

/// The cached snapshot folder of a repo at `revision` (a commit, or a branch or tag the
/// cache has a ref for), and its commit.
fn snapshot(repo_id: &str, revision: &str) -> Result<(PathBuf, String)> {
    let cache = hub_cache_dir()?;
    let repo_dir = cache.join(repo_folder(repo_id));
    let commit = if revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit()) {
        revision.to_string()
    } else {
        let ref_path = repo_dir.join("refs").join(revision);
        match std::fs::read_to_string(&ref_path) {
            Ok(c) => c.trim().to_string(),
            Err(_) => bail!(
                "{repo_id} (revision {revision}) is not in the Hugging Face cache at {}; run once without --offline to download it",
                cache.display()
            ),
        }
    };
    let snapshot = repo_dir.join("snapshots").join(&commit);
    if !snapshot.is_dir() {
        bail!(
            "{repo_id}: the cache has no snapshot {commit} at {}; run once without --offline to download it",
            snapshot.display()
        );
    }
    Ok((snapshot, commit))
}

/// One file of a repo from the cache alone.
pub fn cached_file(repo_id: &str, revision: &str, file: &str) -> Result<PathBuf> {
    let (snapshot, _) = snapshot(repo_id, revision)?;
    let path = snapshot.join(file);
    if !path.is_file() {
        bail!(
            "{file} of {repo_id} is not in the Hugging Face cache ({}); run once without --offline to download it",
            snapshot.display()
        );
    }
    Ok(path)
}

/// Resolves a repo from the cache alone.
pub fn from_cache(req: &ModelRequest) -> Result<ModelFiles> {
    let (repo_id, revision) = (req.model, req.revision);
    let (snapshot, commit) = snapshot(repo_id, revision)?;
    let available = list_dir(&snapshot, req.checkpoint);
    let plan = plan_files(
        &available,
        req.precision,
        &format!("the cached copy of {repo_id}"),
        req.checkpoint,
    )
    .map_err(|e| anyhow::anyhow!("{e} (offline: run once without --offline to download it)"))?;
    match plan {
        Plan::Diffusers(files) => Ok(ModelFiles::from_root(
            repo_id.to_string(),
            Some(commit),
            &snapshot,
            &files,
        )),
        Plan::SingleFile(f) => ModelFiles::single_file(
            repo_id.to_string(),
            Some(commit),
            &snapshot.join(f),
            req.config_from,
        ),
    }
}
