//! Where a model's files come from: a local diffusers folder, the Hugging Face cache (offline),
//! or the Hub through hf-hub into that same cache.

use anyhow::{bail, Result};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Which weight files to prefer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Precision {
    Full,
    Half,
}

/// A resolved model: every file the pipeline needs, as local paths.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// What the user asked for (repo id or folder), for messages and metadata.
    pub name: String,
    /// The commit of a Hub model, when known.
    pub revision: Option<String>,
    pub model_index: PathBuf,
    pub scheduler_config: PathBuf,
    pub tokenizer_dir: PathBuf,
    pub text_encoder_config: PathBuf,
    pub text_encoder_weights: PathBuf,
    pub unet_config: PathBuf,
    pub unet_weights: PathBuf,
    pub vae_config: PathBuf,
    pub vae_weights: PathBuf,
}

/// The files fetched for the tokenizer; the last two are optional.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
];

/// Weight file candidates for a component, best first.
pub fn weight_candidates(component: &str, precision: Precision) -> Vec<String> {
    let stem = if component == "text_encoder" {
        "model"
    } else {
        "diffusion_pytorch_model"
    };
    let bin_stem = if component == "text_encoder" {
        "pytorch_model"
    } else {
        "diffusion_pytorch_model"
    };
    let mut v = Vec::new();
    if precision == Precision::Half {
        v.push(format!("{component}/{stem}.fp16.safetensors"));
    }
    v.push(format!("{component}/{stem}.safetensors"));
    if precision == Precision::Half {
        v.push(format!("{component}/{bin_stem}.fp16.bin"));
    }
    v.push(format!("{component}/{bin_stem}.bin"));
    v
}

/// The relative paths of the files a generation needs, chosen from those the model has.
pub fn needed_files(
    available: &BTreeSet<String>,
    precision: Precision,
    source: &str,
) -> Result<Vec<String>> {
    let mut files: Vec<String> = vec![
        "model_index.json".into(),
        "scheduler/scheduler_config.json".into(),
        "text_encoder/config.json".into(),
        "unet/config.json".into(),
        "vae/config.json".into(),
    ];
    for f in &files {
        if !available.contains(f) {
            if f == "model_index.json" {
                bail!("{source} has no model_index.json: it is not a diffusers pipeline (single-file checkpoints are not supported yet)");
            }
            bail!("{source} is missing {f}");
        }
    }
    for f in TOKENIZER_FILES {
        if available.contains(*f) {
            files.push(f.to_string());
        } else if f.ends_with("vocab.json") || f.ends_with("merges.txt") {
            bail!("{source} is missing {f}");
        }
    }
    for component in ["text_encoder", "unet", "vae"] {
        let candidates = weight_candidates(component, precision);
        match candidates.iter().find(|c| available.contains(*c)) {
            Some(c) => files.push(c.clone()),
            None => bail!(
                "{source} has no weights for {component} (looked for {})",
                candidates.join(", ")
            ),
        }
    }
    Ok(files)
}

fn list_dir(root: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(rel) = p.strip_prefix(root) {
                out.insert(rel.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    out
}

impl ModelFiles {
    pub(crate) fn from_root(
        name: String,
        revision: Option<String>,
        root: &Path,
        files: &[String],
    ) -> Self {
        // `files` holds exactly one weight file per component, chosen by `needed_files`.
        let weights = |component: &str| -> PathBuf {
            let prefix = format!("{component}/");
            root.join(
                files
                    .iter()
                    .find(|f| f.starts_with(&prefix) && !f.ends_with(".json"))
                    .expect("chosen by needed_files"),
            )
        };
        Self {
            name,
            revision,
            model_index: root.join("model_index.json"),
            scheduler_config: root.join("scheduler/scheduler_config.json"),
            tokenizer_dir: root.join("tokenizer"),
            text_encoder_config: root.join("text_encoder/config.json"),
            text_encoder_weights: weights("text_encoder"),
            unet_config: root.join("unet/config.json"),
            unet_weights: weights("unet"),
            vae_config: root.join("vae/config.json"),
            vae_weights: weights("vae"),
        }
    }

    /// A diffusers-layout folder on disk.
    pub fn from_folder(dir: &Path, precision: Precision) -> Result<Self> {
        if !dir.is_dir() {
            bail!("model folder {} does not exist", dir.display());
        }
        let available = list_dir(dir);
        let files = needed_files(
            &available,
            precision,
            &format!("model folder {}", dir.display()),
        )?;
        Ok(Self::from_root(
            dir.display().to_string(),
            None,
            dir,
            &files,
        ))
    }
}

/// The Hugging Face hub cache folder: HF_HUB_CACHE, else HF_HOME/hub, else
/// ~/.cache/huggingface/hub (as Python's huggingface_hub resolves it).
pub fn hub_cache_dir() -> PathBuf {
    if let Ok(p) = std::env::var("HF_HUB_CACHE") {
        if !p.is_empty() {
            return PathBuf::from(p);
        }
    }
    if let Ok(p) = std::env::var("HF_HOME") {
        if !p.is_empty() {
            return PathBuf::from(p).join("hub");
        }
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| ".".into());
    PathBuf::from(home).join(".cache/huggingface/hub")
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

fn repo_folder(repo_id: &str) -> String {
    format!("models--{}", repo_id.replace('/', "--"))
}

/// Resolves `repo_id` at `revision` from the cache alone.
pub fn from_cache(repo_id: &str, revision: &str, precision: Precision) -> Result<ModelFiles> {
    let cache = hub_cache_dir();
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
    let available = list_dir(&snapshot);
    let files = needed_files(
        &available,
        precision,
        &format!("the cached copy of {repo_id}"),
    )
    .map_err(|e| anyhow::anyhow!("{e} (offline: run once without --offline to download it)"))?;
    let missing: Vec<&String> = files
        .iter()
        .filter(|f| !snapshot.join(f).exists())
        .collect();
    if !missing.is_empty() {
        bail!("offline and not in the cache: {:?}", missing);
    }
    Ok(ModelFiles::from_root(
        repo_id.to_string(),
        Some(commit),
        &snapshot,
        &files,
    ))
}

/// Resolves a `--model` value: an existing folder, else a Hub repo id (cache only when offline).
pub fn resolve(
    model: &str,
    revision: &str,
    precision: Precision,
    offline: bool,
    progress: bool,
) -> Result<ModelFiles> {
    let path = Path::new(model);
    if path.is_dir() {
        return ModelFiles::from_folder(path, precision);
    }
    let looks_like_path = model.starts_with('.')
        || model.starts_with('/')
        || model.contains('\\')
        || model.split('/').count() > 2;
    if looks_like_path || path.exists() {
        bail!("model folder {model} does not exist");
    }
    if offline {
        return from_cache(model, revision, precision);
    }
    crate::hub::fetch(model, revision, precision, progress)
}
