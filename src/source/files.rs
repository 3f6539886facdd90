//! A model's files as local paths, and the choice of files from what a folder, cache snapshot
//! or repo holds: the diffusers layout (one weight file per component, safetensors before
//! `.bin`, the fp16 variant for half precision) or a single-file checkpoint.

use crate::weights::single_file;
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
    pub unet_config: PathBuf,
    pub vae_config: PathBuf,
    /// SDXL's second tokenizer and text encoder config (`tokenizer_2/`, `text_encoder_2/`).
    pub second_encoder: Option<SecondEncoder>,
    pub weights: WeightFiles,
    /// The private folder of a single-file checkpoint's built-in configs
    /// (`single_file::builtin_configs`), kept while the model's files are in use.
    pub builtin_configs: Option<std::sync::Arc<tempfile::TempDir>>,
}

/// The configs of SDXL's second text encoder (OpenCLIP ViT-bigG in the Hub's SDXL models).
#[derive(Debug, Clone)]
pub struct SecondEncoder {
    pub tokenizer_dir: PathBuf,
    pub config: PathBuf,
}

/// Where the weights are.
#[derive(Debug, Clone)]
pub enum WeightFiles {
    /// One file per component, diffusers layout.
    Diffusers {
        text_encoder: PathBuf,
        /// SDXL's second text encoder.
        text_encoder_2: Option<PathBuf>,
        unet: PathBuf,
        vae: PathBuf,
    },
    /// One checkpoint in the original LDM naming (see `weights::single_file`).
    SingleFile(PathBuf),
}

/// What `--model`, `--revision`, `--checkpoint` and `--config-from` ask for.
#[derive(Debug, Clone)]
pub struct ModelRequest<'a> {
    pub model: &'a str,
    pub revision: &'a str,
    /// A single-file checkpoint inside the folder or repo.
    pub checkpoint: Option<&'a str>,
    /// A diffusers folder whose configs and tokenizer serve a single-file checkpoint.
    pub config_from: Option<&'a Path>,
    pub precision: Precision,
    pub offline: bool,
    pub progress: bool,
}

/// What to take from a folder, cache snapshot or repo, given the files it has.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    Diffusers(Vec<String>),
    SingleFile(String),
}

/// Chooses between the diffusers layout and a single-file checkpoint (`--checkpoint`, or the
/// only checkpoint at the root of a folder without model_index.json).
pub fn plan_files(
    available: &BTreeSet<String>,
    precision: Precision,
    source: &str,
    checkpoint: Option<&str>,
) -> Result<Plan> {
    if let Some(c) = checkpoint {
        if !available.contains(c) {
            bail!("{source} has no checkpoint {c:?}");
        }
        return Ok(Plan::SingleFile(c.to_string()));
    }
    if available.contains("model_index.json") {
        return needed_files(available, precision, source).map(Plan::Diffusers);
    }
    let candidates: Vec<&String> = available
        .iter()
        .filter(|f| !f.contains('/') && single_file::is_checkpoint_file(f))
        .collect();
    match candidates.as_slice() {
        [one] => Ok(Plan::SingleFile(one.to_string())),
        [] => bail!("{source} has no model_index.json and no .safetensors/.ckpt checkpoint at its root: it is not a Stable Diffusion model sdgen can read"),
        many => bail!(
            "{source} holds several checkpoints; pick one with --checkpoint NAME: {}",
            many.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// The files fetched for a tokenizer folder; the last two are optional.
pub const TOKENIZER_FILES: &[&str] = &[
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "tokenizer_config.json",
];

/// Weight file candidates for a component, best first.
pub fn weight_candidates(component: &str, precision: Precision) -> Vec<String> {
    // transformers' file names for the text encoders, diffusers' for the rest
    let (stem, bin_stem) = if component.starts_with("text_encoder") {
        ("model", "pytorch_model")
    } else {
        ("diffusion_pytorch_model", "diffusion_pytorch_model")
    };
    // a sharded index (diffusers shards weights over 10 GB: SDXL's U-Net in f32) after the
    // single file of the same precision
    let mut v = Vec::new();
    if precision == Precision::Half {
        v.push(format!("{component}/{stem}.fp16.safetensors"));
        v.push(format!("{component}/{stem}.safetensors.index.fp16.json"));
    }
    v.push(format!("{component}/{stem}.safetensors"));
    v.push(format!("{component}/{stem}.safetensors.index.json"));
    if precision == Precision::Half {
        v.push(format!("{component}/{bin_stem}.fp16.bin"));
    }
    v.push(format!("{component}/{bin_stem}.bin"));
    v
}

/// Whether a model's files hold SDXL's second text encoder (its config).
pub fn has_second_encoder(available: &BTreeSet<String>) -> bool {
    available.contains("text_encoder_2/config.json")
}

/// The text encoders of a model whose files `has` (a relative path): the folders of its
/// (first) encoder and tokenizer, `text_encoder/` and `tokenizer/`, or for a model with only
/// SDXL's second encoder (the refiner, whose model_index.json names no `text_encoder`)
/// `text_encoder_2/` and `tokenizer_2/`, which then serve as its one encoder; and whether
/// SDXL's second encoder comes beside the first.
fn encoders(has: impl Fn(&str) -> bool) -> (&'static str, &'static str, bool) {
    let second = has("text_encoder_2/config.json");
    if has("text_encoder/config.json") || !second {
        ("text_encoder", "tokenizer", second)
    } else {
        ("text_encoder_2", "tokenizer_2", false)
    }
}

/// The relative paths of the files a generation needs, chosen from those the model has (SDXL's
/// second tokenizer and text encoder too when it has them).
pub fn needed_files(
    available: &BTreeSet<String>,
    precision: Precision,
    source: &str,
) -> Result<Vec<String>> {
    let (encoder, tokenizer, second) = encoders(|f| available.contains(f));
    let mut files: Vec<String> = vec![
        "model_index.json".into(),
        "scheduler/scheduler_config.json".into(),
        format!("{encoder}/config.json"),
        "unet/config.json".into(),
        "vae/config.json".into(),
    ];
    if second {
        files.push("text_encoder_2/config.json".into());
    }
    for f in &files {
        if !available.contains(f) {
            if f == "model_index.json" {
                bail!("{source} has no model_index.json: it is not a diffusers pipeline");
            }
            bail!("{source} is missing {f}");
        }
    }
    let tokenizers: &[&str] = if second {
        &["tokenizer", "tokenizer_2"]
    } else {
        &[tokenizer]
    };
    for dir in tokenizers {
        for (i, name) in TOKENIZER_FILES.iter().enumerate() {
            let f = format!("{dir}/{name}");
            if available.contains(&f) {
                files.push(f);
            } else if i < 2 {
                bail!("{source} is missing {f}");
            }
        }
    }
    let components: &[&str] = if second {
        &["text_encoder", "text_encoder_2", "unet", "vae"]
    } else {
        &[encoder, "unet", "vae"]
    };
    for &component in components {
        let candidates = weight_candidates(component, precision);
        match candidates.iter().find(|c| available.contains(*c)) {
            Some(c) if c.ends_with(".json") => {
                files.push(c.clone());
                let shards = shards_listed(available, c);
                if shards.is_empty() {
                    bail!("{source} has the shard index {c} but none of its shards");
                }
                files.extend(shards);
            }
            Some(c) => files.push(c.clone()),
            None => bail!(
                "{source} has no weights for {component} (looked for {})",
                candidates.join(", ")
            ),
        }
    }
    Ok(files)
}

/// The shards of the sharded index `index` among `available`, by diffusers' naming:
/// `X.safetensors.index.json` has `X-00001-of-0000N.safetensors`, ...; the fp16 variant's
/// `X.safetensors.index.fp16.json` has `X.fp16-00001-of-0000N.safetensors`, ... (the index's
/// own list is checked against the folder when the weights are read).
fn shards_listed(available: &BTreeSet<String>, index: &str) -> Vec<String> {
    let (stem, variant) = match index.strip_suffix(".safetensors.index.fp16.json") {
        Some(stem) => (stem, ".fp16"),
        None => (index.trim_end_matches(".safetensors.index.json"), ""),
    };
    let prefix = format!("{stem}{variant}-");
    available
        .iter()
        .filter(|f| {
            f.strip_prefix(&prefix)
                .and_then(|r| r.strip_suffix(".safetensors"))
                .is_some_and(|r| {
                    r.split_once("-of-").is_some_and(|(a, b)| {
                        !a.is_empty()
                            && !b.is_empty()
                            && a.bytes().chain(b.bytes()).all(|c| c.is_ascii_digit())
                    })
                })
        })
        .cloned()
        .collect()
}

/// The files of a model folder that sdgen may use, as paths relative to `root`: those at its
/// root and one folder down (the diffusers layout; single-file checkpoints), and `checkpoint`
/// (`--checkpoint`, at any depth) when it is a file there. The walk goes no deeper: a folder
/// holding a link to itself, or `--model /`, hung the unbounded walk.
pub(super) fn list_dir(root: &Path, checkpoint: Option<&str>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![(root.to_path_buf(), 0)];
    while let Some((dir, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                if depth == 0 {
                    stack.push((p, depth + 1));
                }
            } else if let Ok(rel) = p.strip_prefix(root) {
                out.insert(rel.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    if let Some(c) = checkpoint {
        if root.join(c).is_file() {
            out.insert(c.to_string());
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
        // `files` holds one weight file per component, chosen by `needed_files`: a single
        // file, or a shard index (then the weights are read through it) with its shards
        let weights = |component: &str| -> PathBuf {
            let prefix = format!("{component}/");
            let mine = || files.iter().filter(|f| f.starts_with(&prefix));
            let index = mine().find(|f| f.contains(".safetensors.index."));
            root.join(
                index
                    .or_else(|| mine().find(|f| !f.ends_with(".json")))
                    .expect("chosen by needed_files"),
            )
        };
        let mut m = Self::configs_from(name, revision, root);
        // what needed_files chose, whatever else the folder holds
        let (first, tokenizer, second) = encoders(|f| files.iter().any(|g| g == f));
        m.tokenizer_dir = root.join(tokenizer);
        m.text_encoder_config = root.join(first).join("config.json");
        if !second {
            m.second_encoder = None;
        }
        m.weights = WeightFiles::Diffusers {
            text_encoder: weights(first),
            text_encoder_2: second.then(|| weights("text_encoder_2")),
            unet: weights("unet"),
            vae: weights("vae"),
        };
        m
    }

    fn configs_from(name: String, revision: Option<String>, root: &Path) -> Self {
        // SDXL's (the weights of a diffusers folder are chosen by needed_files; this is for
        // the configs of a single-file checkpoint)
        let second_encoder =
            root.join("text_encoder_2/config.json")
                .is_file()
                .then(|| SecondEncoder {
                    tokenizer_dir: root.join("tokenizer_2"),
                    config: root.join("text_encoder_2/config.json"),
                });
        Self {
            name,
            revision,
            model_index: root.join("model_index.json"),
            scheduler_config: root.join("scheduler/scheduler_config.json"),
            tokenizer_dir: root.join("tokenizer"),
            text_encoder_config: root.join("text_encoder/config.json"),
            unet_config: root.join("unet/config.json"),
            vae_config: root.join("vae/config.json"),
            second_encoder,
            weights: WeightFiles::SingleFile(PathBuf::new()),
            builtin_configs: None,
        }
    }

    /// A single-file checkpoint with the configs of `config_from`, else the built-in ones of
    /// its family (SD 1.5, SD 2.1 or SDXL base, told apart by its text encoders).
    pub fn single_file(
        name: String,
        revision: Option<String>,
        checkpoint: &Path,
        config_from: Option<&Path>,
    ) -> Result<Self> {
        let (root, builtin) = match config_from {
            Some(dir) => {
                if !dir.join("unet/config.json").exists() {
                    bail!(
                        "--config-from {}: not a diffusers folder (no unet/config.json)",
                        dir.display()
                    );
                }
                (dir.to_path_buf(), None)
            }
            None => {
                let family = single_file::Checkpoint::open(checkpoint)?.family;
                let dir = single_file::builtin_configs(family)?;
                (dir.path().to_path_buf(), Some(std::sync::Arc::new(dir)))
            }
        };
        let mut m = Self::configs_from(name, revision, &root);
        m.weights = WeightFiles::SingleFile(checkpoint.to_path_buf());
        m.builtin_configs = builtin;
        Ok(m)
    }

    /// A folder: diffusers layout, or a checkpoint in it.
    pub fn from_folder(dir: &Path, precision: Precision) -> Result<Self> {
        Self::from_folder_with(dir, precision, None, None)
    }

    pub(super) fn from_folder_with(
        dir: &Path,
        precision: Precision,
        checkpoint: Option<&str>,
        config_from: Option<&Path>,
    ) -> Result<Self> {
        if !dir.is_dir() {
            bail!("model folder {} does not exist", dir.display());
        }
        let available = list_dir(dir, checkpoint);
        let source = format!("model folder {}", dir.display());
        match plan_files(&available, precision, &source, checkpoint)? {
            Plan::Diffusers(files) => Ok(Self::from_root(
                dir.display().to_string(),
                None,
                dir,
                &files,
            )),
            Plan::SingleFile(f) => Self::single_file(
                dir.join(&f).display().to_string(),
                None,
                &dir.join(&f),
                config_from,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SDXL's refiner has no `text_encoder/` or `tokenizer/`: its `text_encoder_2/` and
    /// `tokenizer_2/` are planned as its one encoder, and a folder of that layout reads so.
    #[test]
    fn the_refiners_one_encoder_is_its_second() {
        let names = [
            "model_index.json",
            "scheduler/scheduler_config.json",
            "text_encoder_2/config.json",
            "text_encoder_2/model.safetensors",
            "tokenizer_2/vocab.json",
            "tokenizer_2/merges.txt",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",
        ];
        let available: BTreeSet<String> = names.map(String::from).into();
        let files = needed_files(&available, Precision::Full, "m").unwrap();
        assert_eq!(files.len(), names.len(), "{files:?}");
        let dir = tempfile::tempdir().unwrap();
        let m = ModelFiles::from_root("m".into(), None, dir.path(), &files);
        assert_eq!(m.tokenizer_dir, dir.path().join("tokenizer_2"));
        assert_eq!(
            m.text_encoder_config,
            dir.path().join("text_encoder_2/config.json")
        );
        assert!(m.second_encoder.is_none());
        let WeightFiles::Diffusers {
            text_encoder,
            text_encoder_2,
            ..
        } = m.weights
        else {
            panic!("a diffusers layout")
        };
        assert_eq!(
            text_encoder,
            dir.path().join("text_encoder_2/model.safetensors")
        );
        assert!(text_encoder_2.is_none());
    }

    /// A sharded U-Net is planned as its index and the shards the listing has, by diffusers'
    /// names (the fp16 variant's too), after a single file of the same precision.
    #[test]
    fn sharded_weights_are_planned_with_their_shards() {
        let mut available: BTreeSet<String> = [
            "model_index.json",
            "scheduler/scheduler_config.json",
            "text_encoder/config.json",
            "text_encoder/model.safetensors",
            "tokenizer/vocab.json",
            "tokenizer/merges.txt",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors.index.json",
            "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
            "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
            "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
            "unet/diffusion_pytorch_model.fp16-00001-of-00001.safetensors",
            "unet/diffusion_pytorch_model-notashard.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",
        ]
        .map(String::from)
        .into();
        let full = needed_files(&available, Precision::Full, "m").unwrap();
        let unet: Vec<&String> = full.iter().filter(|f| f.starts_with("unet/")).collect();
        assert_eq!(
            unet,
            [
                "unet/config.json",
                "unet/diffusion_pytorch_model.safetensors.index.json",
                "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
                "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
            ]
        );
        let half = needed_files(&available, Precision::Half, "m").unwrap();
        assert!(
            half.contains(&"unet/diffusion_pytorch_model.fp16-00001-of-00001.safetensors".into())
        );
        assert!(!half.contains(&"unet/diffusion_pytorch_model-00001-of-00002.safetensors".into()));
        // a single file of the same precision comes first
        available.insert("unet/diffusion_pytorch_model.safetensors".into());
        let full = needed_files(&available, Precision::Full, "m").unwrap();
        assert!(!full.iter().any(|f| f.contains("-of-")), "{full:?}");
        // an index without its shards
        available
            .retain(|f| !f.contains("-of-") && f != "unet/diffusion_pytorch_model.safetensors");
        let e = needed_files(&available, Precision::Full, "m").unwrap_err();
        assert!(e.to_string().contains("none of its shards"), "{e}");
    }

    /// A folder that links to itself, and the file system's root, are listed in bounded time.
    #[test]
    fn the_folder_walk_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("unet/deeper")).unwrap();
        std::fs::write(root.join("model_index.json"), "{}").unwrap();
        std::fs::write(root.join("unet/config.json"), "{}").unwrap();
        std::fs::write(root.join("unet/deeper/x.ckpt"), "").unwrap();
        std::os::unix::fs::symlink(root, root.join("loop")).unwrap();
        std::os::unix::fs::symlink(root, root.join("unet/loop")).unwrap();
        let files = list_dir(root, None);
        assert!(files.contains("model_index.json") && files.contains("unet/config.json"));
        assert!(files.contains("loop/model_index.json"), "{files:?}");
        assert!(
            !files.iter().any(|f| f.matches('/').count() > 1),
            "{files:?}"
        );
        // a deeper --checkpoint is found where it is named
        let files = list_dir(root, Some("unet/deeper/x.ckpt"));
        assert!(files.contains("unet/deeper/x.ckpt"));
        // `--model /`: an answer (no model there), not a walk of the whole file system
        let e = ModelFiles::from_folder(Path::new("/"), Precision::Full).unwrap_err();
        assert!(e.to_string().contains("no model_index.json"), "{e}");
    }
}
