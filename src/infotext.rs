//! What a generated PNG says about how it was made: the web UI's `parameters` infotext (which
//! the web UI, ComfyUI and image sites read back) and sdgen's own keys, for the CLI's files and
//! the server's answers alike.

use crate::app::VERSION;
use crate::conditioning::PromptSyntax;
use crate::device::dtype_name;
use crate::output::Metadata;
use crate::pipeline::{GeneratedImage, Pipeline, Request};
use anyhow::Result;
use std::collections::HashMap;
use std::path::PathBuf;

/// A picture an image-to-image request started from: its name (a file's path) and the
/// SHA-256 of its bytes.
#[derive(Debug, Clone)]
pub struct Source {
    pub name: String,
    pub sha256: String,
}

impl Source {
    pub fn file(path: &str) -> Result<Self> {
        Ok(Self {
            name: path.to_string(),
            sha256: crate::weights::file_sha256(std::path::Path::new(path), 0)?,
        })
    }

    pub fn bytes(name: &str, bytes: &[u8]) -> Self {
        use sha2::{Digest, Sha256};
        Self {
            name: name.to_string(),
            sha256: format!("{:x}", Sha256::digest(bytes)),
        }
    }
}

/// The pictures an image-to-image request started from, and how its mask was used.
#[derive(Debug, Default, Clone)]
pub struct Pictures {
    /// The start picture.
    pub image: Option<Source>,
    /// Inpainting's mask.
    pub mask: Option<Source>,
    /// `--keep-unmasked`.
    pub keep_unmasked: bool,
    /// `--mask-blur`.
    pub mask_blur: f32,
}

impl Pictures {
    /// The CLI's: files, hashed once per job.
    pub fn files(
        image: Option<&str>,
        mask: Option<&str>,
        keep_unmasked: bool,
        mask_blur: f32,
    ) -> Result<Self> {
        Ok(Self {
            image: image.map(Source::file).transpose()?,
            mask: mask.map(Source::file).transpose()?,
            keep_unmasked,
            mask_blur,
        })
    }
}

/// The scheduler a request runs, as sdgen names it: the request's (`--scheduler`), else the
/// model's own, else PNDM (diffusers' default for SD 1.x).
pub fn scheduler_name(p: &Pipeline, requested: Option<&str>) -> String {
    requested
        .map(str::to_string)
        .or(p.default_scheduler.map(str::to_string))
        .unwrap_or_else(|| "pndm".into())
}

/// The web UI's short hashes of LoRA files, computed once per file.
#[derive(Default)]
pub struct FileHashes(HashMap<PathBuf, String>);

impl FileHashes {
    /// The first 12 hex digits of the SHA-256 the web UI names a LoRA by: of the tensor data
    /// for safetensors (its "addnet" hash, header skipped), of the whole file otherwise.
    fn lora(&mut self, path: &std::path::Path) -> Result<String> {
        if let Some(h) = self.0.get(path) {
            return Ok(h.clone());
        }
        let skip = if path.extension().is_some_and(|e| e == "safetensors") {
            let mut n = [0u8; 8];
            std::io::Read::read_exact(&mut std::fs::File::open(path)?, &mut n)?;
            u64::from_le_bytes(n).saturating_add(8)
        } else {
            0
        };
        let h = crate::weights::file_sha256(path, skip)?[..12].to_string();
        self.0.insert(path.to_path_buf(), h.clone());
        Ok(h)
    }
}

/// The PNG text chunks of an image: the web UI's `parameters` infotext first, then sdgen's own
/// keys. `line` is the prompts file's line that asked for it.
pub fn metadata(
    p: &Pipeline,
    r: &Request,
    line: Option<usize>,
    pictures: &Pictures,
    scheduler: &str,
    img: &GeneratedImage,
    hashes: &mut FileHashes,
) -> Result<Metadata> {
    let Pictures {
        image: image_source,
        mask: mask_source,
        keep_unmasked,
        mask_blur,
    } = pictures;
    let (keep_unmasked, mask_blur) = (*keep_unmasked, *mask_blur);
    let model = p.files.name.clone();
    let revision = p.files.revision.clone().unwrap_or_default();
    let mut params = format!("{}\n", r.prompt);
    if !r.negative_prompt.is_empty() {
        params.push_str(&format!("Negative prompt: {}\n", r.negative_prompt));
    }
    params.push_str(&format!(
        "Steps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {}",
        r.steps, scheduler, r.guidance, img.seed, img.width, img.height, model
    ));
    if r.clip_skip > 1 {
        // the web UI writes it only when it is not 1, after the model
        params.push_str(&format!(", Clip skip: {}", r.clip_skip));
    }
    // the web UI's noise source: CPU (torch's CPU generator) or NV (torch's CUDA one)
    params.push_str(&format!(", RNG: {}", r.rng.web_ui_name()));
    if let Some(image) = &r.image {
        params.push_str(&format!(", Denoising strength: {}", image.strength));
        if image.mask.is_some() && mask_blur > 0.0 {
            params.push_str(&format!(", Mask blur: {mask_blur}"));
        }
    }
    // the embeddings the prompts use and the LoRAs, named and hashed as the web UI does
    let mut ids = std::collections::HashSet::new();
    for text in r.texts()? {
        ids.extend(
            p.tokenize(&text, r.prompt_syntax)?
                .ids
                .into_iter()
                .flatten(),
        );
    }
    let used: Vec<String> = p
        .embeddings()
        .iter()
        .filter(|e| p.embedding_id(&e.name).is_some_and(|id| ids.contains(&id)))
        .map(|e| format!("{}: {}", e.name.replace([':', ','], ""), e.short_hash))
        .collect();
    if !used.is_empty() {
        params.push_str(&format!(", TI hashes: \"{}\"", used.join(", ")));
    }
    let mut lora_hashes = Vec::new();
    for l in &r.loras {
        let name = l.path.file_stem().unwrap_or_default().to_string_lossy();
        lora_hashes.push(format!(
            "{}: {}",
            name.replace([':', ','], ""),
            hashes.lora(&l.path)?
        ));
    }
    if !lora_hashes.is_empty() {
        params.push_str(&format!(", Lora hashes: \"{}\"", lora_hashes.join(", ")));
    }
    params.push_str(&format!(", Version: sdgen {VERSION}"));
    let mut meta = vec![
        ("parameters".into(), params),
        ("prompt".into(), r.prompt.clone()),
        ("negative_prompt".into(), r.negative_prompt.clone()),
        ("seed".into(), img.seed.to_string()),
        ("steps".into(), r.steps.to_string()),
        ("guidance".into(), r.guidance.to_string()),
        ("scheduler".into(), scheduler.to_string()),
        ("width".into(), img.width.to_string()),
        ("height".into(), img.height.to_string()),
        ("model".into(), model),
        ("model_revision".into(), revision),
        ("dtype".into(), dtype_name(p.dtype).to_string()),
        ("clip_skip".into(), r.clip_skip.to_string()),
        ("prompt_syntax".into(), syntax_name(r.prompt_syntax).into()),
        ("rng".into(), r.rng.name().into()),
        ("software".into(), format!("sdgen {VERSION}")),
    ];
    if let Some(line) = line {
        meta.push(("prompts_line".into(), line.to_string()));
    }
    // SDXL's size conditioning, when not the image's size (the flags' WxH and TOP,LEFT forms)
    let sizes = &r.sizes;
    if let Some((h, w)) = sizes.original {
        meta.push(("original_size".into(), format!("{w}x{h}")));
    }
    if sizes.crop_top_left != (0, 0) {
        let (top, left) = sizes.crop_top_left;
        meta.push(("crop_top_left".into(), format!("{top},{left}")));
    }
    if let Some((h, w)) = sizes.target {
        meta.push(("target_size".into(), format!("{w}x{h}")));
    }
    if let Some(s) = sizes.aesthetic_score {
        meta.push(("aesthetic_score".into(), s.to_string()));
    }
    if let Some(s) = sizes.negative_aesthetic_score {
        meta.push(("negative_aesthetic_score".into(), s.to_string()));
    }
    if !r.loras.is_empty() {
        let list: Vec<String> = r
            .loras
            .iter()
            .map(|l| format!("{}:{}:{}", l.path.display(), l.te_scale, l.unet_scale))
            .collect();
        meta.push(("loras".into(), list.join("\n")));
    }
    if let (Some(image), Some(source)) = (&r.image, image_source) {
        meta.push(("init_image".into(), source.name.clone()));
        meta.push(("init_image_sha256".into(), source.sha256.clone()));
        meta.push(("strength".into(), image.strength.to_string()));
        if keep_unmasked && mask_source.is_some() {
            meta.push(("keep_unmasked".into(), "true".into()));
        }
        if mask_blur > 0.0 && mask_source.is_some() {
            meta.push(("mask_blur".into(), mask_blur.to_string()));
        }
        if let Some(mask) = mask_source {
            meta.push(("mask".into(), mask.name.clone()));
            meta.push(("mask_sha256".into(), mask.sha256.clone()));
        }
    }
    if !p.embeddings().is_empty() {
        let list: Vec<String> = p
            .embeddings()
            .iter()
            .map(|e| e.path.display().to_string())
            .collect();
        meta.push(("embeddings".into(), list.join("\n")));
    }
    Ok(meta)
}

fn syntax_name(s: PromptSyntax) -> &'static str {
    match s {
        PromptSyntax::Plain => "plain",
        PromptSyntax::A1111 => "a1111",
    }
}
