//! Textual-inversion embeddings (`--embedding FILE`): new words whose token vectors come from a
//! file, as diffusers' `load_textual_inversion` and the web UI load them.
//!
//! Formats: the web UI's `.pt` (`string_to_param` → `*`, read by our tensor-only pickle
//! reader) and `.safetensors` (`emb_params`), named by the file's stem as the web UI names
//! them; diffusers' `learned_embeds` (one tensor, named by its key). A file of n vectors adds
//! the tokens `NAME`, `NAME_1`, ..., `NAME_{n-1}` (diffusers' multi-vector convention).
//! SDXL embeddings hold the vectors of both text encoders (`clip_l` for the first, `clip_g`
//! for the second), named by the file's stem: diffusers loads them with
//! `load_textual_inversion` once per encoder and tokenizer, under the same word.

use crate::weights::TensorFile;
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use std::path::{Path, PathBuf};

pub struct Embedding {
    /// The word that stands for the vectors in prompts.
    pub name: String,
    /// (n, hidden) f32 on the CPU.
    pub vectors: Tensor,
    /// SDXL's: (n, hidden of the second text encoder), f32 on the CPU.
    pub vectors_2: Option<Tensor>,
    pub path: PathBuf,
    /// The first 12 hex digits of the file's SHA-256 (the web UI's "TI hashes").
    pub short_hash: String,
}

impl Embedding {
    /// Reads `path`; its vectors must have `hidden` values (the text encoder's width), and for
    /// an SDXL model (`hidden_2`: the second encoder's width) the file must hold both
    /// encoders' vectors.
    pub fn load(path: &Path, hidden: usize, hidden_2: Option<usize>) -> Result<Self> {
        let file = TensorFile::open(path)?;
        let stem = || {
            path.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        let names = file.names();
        let sdxl = names.iter().any(|n| n == "clip_l" || n == "clip_g");
        let (name, key) = if sdxl != hidden_2.is_some() {
            if sdxl {
                bail!(
                    "{} is an SDXL embedding (clip_l/clip_g vectors); this model is SD 1.x/2.x",
                    path.display()
                )
            }
            bail!(
                "{} is an SD 1.x/2.x embedding; this SDXL model takes embeddings with clip_l and clip_g vectors",
                path.display()
            )
        } else if sdxl {
            (stem(), "clip_l".to_string())
        } else if let Some(k) = names
            .iter()
            .find(|n| *n == "emb_params" || *n == "string_to_param.*")
        {
            (stem(), k.clone())
        } else if names.len() == 1 {
            (names[0].clone(), names[0].clone())
        } else {
            bail!(
                "{} is not a textual-inversion embedding sdgen knows (expected string_to_param, emb_params, or one tensor; found {})",
                path.display(),
                few(names)
            )
        };
        let read = |key: &str, hidden: usize, encoder: &str| -> Result<Tensor> {
            if !names.iter().any(|n| n == key) {
                bail!(
                    "{}: the SDXL embedding has no {key} vectors",
                    path.display()
                );
            }
            let vectors = file.read_f32(key)?;
            let vectors = match vectors.rank() {
                1 => vectors.unsqueeze(0)?,
                2 => vectors,
                _ => bail!(
                    "{}: the embedding {key} has shape {:?}, not (vectors, {hidden})",
                    path.display(),
                    vectors.dims()
                ),
            };
            let (n, h) = vectors.dims2()?;
            if h != hidden || n == 0 {
                bail!(
                    "{}: the embedding has {n} vectors of {h} values; this model's {encoder} takes {hidden} (an embedding for another model family?)",
                    path.display()
                );
            }
            Ok(vectors)
        };
        let vectors = read(&key, hidden, "text encoder")?;
        let vectors_2 = match hidden_2 {
            Some(h2) => {
                let v = read("clip_g", h2, "second text encoder")?;
                if v.dims()[0] != vectors.dims()[0] {
                    bail!(
                        "{}: {} clip_l vectors but {} clip_g vectors",
                        path.display(),
                        vectors.dims()[0],
                        v.dims()[0]
                    );
                }
                Some(v)
            }
            None => None,
        };
        if name.is_empty() || name.chars().any(char::is_whitespace) {
            bail!(
                "{}: the embedding's name {name:?} cannot be a prompt word",
                path.display()
            );
        }
        let short_hash = crate::weights::file_sha256(path, 0)
            .with_context(|| format!("hashing {}", path.display()))?[..12]
            .to_string();
        Ok(Self {
            name,
            vectors,
            vectors_2,
            path: path.to_path_buf(),
            short_hash,
        })
    }

    /// The tokens of its vectors, in order: `NAME`, `NAME_1`, ...
    pub fn tokens(&self) -> Vec<String> {
        (0..self.vectors.dims()[0])
            .map(|i| match i {
                0 => self.name.clone(),
                i => format!("{}_{i}", self.name),
            })
            .collect()
    }
}

/// Up to five names of `names`, for messages.
pub(crate) fn few(names: &[String]) -> String {
    let mut sorted: Vec<&str> = names.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    let shown = sorted[..sorted.len().min(5)].join(", ");
    match sorted.len() {
        0 => "nothing".into(),
        n if n > 5 => format!("{shown}, ... ({n} in all)"),
        _ => shown,
    }
}
