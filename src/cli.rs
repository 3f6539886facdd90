//! Command-line arguments.

use crate::conditioning::PromptSyntax;
use crate::rng::RngKind;
use crate::source::{offline_from_env, ModelRequest, Precision};
use candle_core::DType;
use clap::Parser;
use std::path::PathBuf;

pub const DEFAULT_MODEL: &str = "stable-diffusion-v1-5/stable-diffusion-v1-5";

#[derive(Parser, Debug, Clone)]
#[command(
    name = "sdgen",
    version,
    about = "Text-to-image with Stable Diffusion 1.x/2.x and SDXL on candle: the same image as diffusers for the same seed.",
    after_help = "Examples:\n  sdgen \"a photo of a cat on a beach\" --seed 42 --steps 50\n  sdgen \"a cat\" -n \"blurry, lowres\" --scheduler ddim --num-images 6 --grid 2x3\n  sdgen \"a cat\" --model ./my-local-model --width 640 --height 384 -o out/cat-{seed}.png\n  sdgen \"(red fox:1.3), snow <lora:watercolor:0.8>\" --prompt-syntax a1111 --lora-dir ./loras --clip-skip 2\n  sdgen --list-schedulers\n  sdgen serve --port 7860    (an HTTP server with the web UI's and OpenAI's APIs: sdgen serve --help)"
)]
pub struct Args {
    /// The text prompt.
    #[arg(required_unless_present_any = ["list_schedulers", "download_only", "prompts"])]
    pub prompt: Option<String>,

    /// Negative prompt (empty: diffusers' unconditional embedding of "").
    #[arg(short = 'n', long, default_value = "")]
    pub negative_prompt: String,

    #[command(flatten)]
    pub source: ModelFlags,

    /// Seed (torch CPU generator); image i uses seed + i. Random when omitted (and reported).
    #[arg(short = 's', long)]
    pub seed: Option<u64>,

    /// Denoising steps.
    #[arg(long, default_value_t = 50)]
    pub steps: usize,

    /// Classifier-free guidance scale; <= 1 skips the unconditional pass.
    #[arg(
        short = 'g',
        long,
        default_value_t = 7.5,
        allow_negative_numbers = true
    )]
    pub guidance: f64,

    /// Scheduler name (see --list-schedulers); default: the model's own scheduler.
    #[arg(long)]
    pub scheduler: Option<String>,

    /// Use Karras sigmas (schedulers that support them).
    #[arg(long)]
    pub karras: bool,

    /// Override the scheduler's timestep_spacing (leading, linspace, trailing).
    #[arg(long)]
    pub timestep_spacing: Option<String>,

    /// Override the scheduler's prediction_type (epsilon, v_prediction).
    #[arg(long)]
    pub prediction_type: Option<String>,

    /// Set any scheduler_config.json key, e.g. `--scheduler-option use_karras_sigmas=true`
    /// (values are JSON, else strings). Repeatable.
    #[arg(long, value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub scheduler_option: Vec<(String, serde_json::Value)>,

    /// Image width in pixels (default: the model's native size).
    #[arg(short = 'W', long)]
    pub width: Option<usize>,

    /// Image height in pixels (default: the model's native size).
    #[arg(short = 'H', long)]
    pub height: Option<usize>,

    /// SDXL's size conditioning: the original size the model is told the picture had, as
    /// WIDTHxHEIGHT (diffusers' original_size; default: the image's size).
    #[arg(long, value_name = "WxH", value_parser = parse_size)]
    pub original_size: Option<(usize, usize)>,

    /// SDXL's size conditioning: the crop's top-left corner as TOP,LEFT (diffusers'
    /// crops_coords_top_left; default 0,0).
    #[arg(long, value_name = "TOP,LEFT", value_parser = parse_pair)]
    pub crop_top_left: Option<(usize, usize)>,

    /// SDXL's size conditioning: the target size as WIDTHxHEIGHT (diffusers' target_size;
    /// default: the image's size).
    #[arg(long, value_name = "WxH", value_parser = parse_size)]
    pub target_size: Option<(usize, usize)>,

    /// SDXL refiner's aesthetic score for the prompt (diffusers' aesthetic_score; default 6).
    #[arg(long, value_name = "SCORE")]
    pub aesthetic_score: Option<f64>,

    /// SDXL refiner's aesthetic score for the negative prompt (diffusers'
    /// negative_aesthetic_score; default 2.5).
    #[arg(long, value_name = "SCORE")]
    pub negative_aesthetic_score: Option<f64>,

    /// Number of images (seeds seed, seed+1, ...).
    #[arg(long, default_value_t = 1)]
    pub num_images: usize,

    /// Clip skip as model pages give it: 1 = the text encoder's last layer, 2 = the one before
    /// (diffusers' clip_skip=1); for the prompt and the negative prompt.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub clip_skip: usize,

    /// How prompts are read: plain (diffusers: the text as it is, cut at 77 tokens) or a1111
    /// (the web UI's (emphasis:1.3), [less], BREAK, any length, <lora:NAME:W> tags).
    #[arg(long, value_enum, default_value_t = PromptSyntax::Plain, value_name = "SYNTAX")]
    pub prompt_syntax: PromptSyntax,

    /// Merge a LoRA (kohya/web UI or diffusers/PEFT .safetensors, .pt, .bin; a file or
    /// OWNER/REPO/FILE on the Hub) into the text encoder and the U-Net, at SCALE (default 1).
    /// Repeatable; the LoRAs add up.
    #[arg(long, value_name = "FILE[:SCALE]")]
    pub lora: Vec<String>,

    /// Where --prompt-syntax a1111 finds the LoRAs its <lora:NAME:W> tags name
    /// (NAME.safetensors, .pt, .ckpt or .bin).
    #[arg(long, value_name = "DIR")]
    pub lora_dir: Option<PathBuf>,

    /// Add a textual-inversion embedding (web UI .pt/.safetensors, diffusers
    /// learned_embeds; a file or OWNER/REPO/FILE on the Hub): its name (the file name for web
    /// UI files) becomes a prompt word. Repeatable.
    #[arg(long, value_name = "FILE")]
    pub embedding: Vec<String>,

    /// The generator the seed seeds: torch-cpu (torch.Generator("cpu"), diffusers on the CPU)
    /// or torch-cuda (torch.Generator("cuda") computed here: seeds from GPU scripts and the
    /// web UI on NVIDIA cards).
    #[arg(long, value_enum, default_value_t = RngKind::TorchCpu, value_name = "RNG")]
    pub rng: RngKind,

    /// Image-to-image: start from this picture (PNG, JPEG, WebP) instead of pure noise; the
    /// size defaults to the picture's (rounded down to a multiple of 8).
    #[arg(long, value_name = "FILE")]
    pub image: Option<PathBuf>,

    /// With --image: how much of the schedule runs, in [0, 1] (1 = from pure noise; lower
    /// keeps more of the picture, and runs steps x strength steps). Default: diffusers' (0.8,
    /// 1 with --mask; SDXL 0.3, 0.9999 with --mask).
    #[arg(long, value_name = "S")]
    pub strength: Option<f64>,

    /// Inpainting, with --image: repaint where this mask is white (kept where black); an
    /// inpainting model (9-channel U-Net) or any model through diffusers' masked blending.
    #[arg(long, value_name = "FILE", requires = "image")]
    pub mask: Option<PathBuf>,

    /// With --mask: blur the mask by this radius first (PIL's Gaussian blur, diffusers'
    /// mask_processor.blur): the repainted area's edge moves where the blur crosses half, and
    /// --keep-unmasked pastes with soft edges. 0 = no blur.
    #[arg(long, default_value_t = 0.0, value_name = "R", requires = "mask")]
    pub mask_blur: f32,

    /// With --mask: paste the picture back where the mask keeps it (black; gray blends), as
    /// diffusers' image_processor.apply_overlay does, so the kept pixels are the picture's own.
    #[arg(long, requires = "mask")]
    pub keep_unmasked: bool,

    /// Decode (and encode) the VAE in overlapping tiles, as diffusers' enable_vae_tiling: large
    /// pictures in bounded memory (also chosen whenever the whole picture would not fit).
    #[arg(long)]
    pub vae_tiling: bool,

    /// Images per U-Net batch.
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,

    /// Prompts file, one per line or JSON Lines with per-line overrides ("-" = stdin). The model
    /// loads once; existing outputs are skipped, so a rerun continues an interrupted batch.
    #[arg(long, value_name = "FILE")]
    pub prompts: Option<String>,

    /// Stop at the first bad line of --prompts instead of reporting and skipping it.
    #[arg(long)]
    pub strict: bool,

    /// Process only shard I of N of --prompts (default: from SLURM_ARRAY_TASK_ID/COUNT, or
    /// JOB_COMPLETION_INDEX with SDGEN_SHARDS).
    #[arg(long, value_name = "I/N")]
    pub shard: Option<String>,

    /// Output file or template with {seed}, {index}, {prompt}, {line}.
    #[arg(short = 'o', long, default_value = "sdgen-{seed}.png")]
    pub output: String,

    /// Also write a ROWSxCOLS grid of all images (next to the first output, suffixed -grid).
    #[arg(long, value_name = "RxC")]
    pub grid: Option<String>,

    /// Replace existing output files.
    #[arg(long)]
    pub overwrite: bool,

    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,

    /// f32 (matches diffusers), bf16 (half the memory; fast on CPUs with AMX) or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,

    /// No progress bars or messages (errors still go to stderr).
    #[arg(short = 'q', long)]
    pub quiet: bool,

    /// Print one JSON object per written image on stdout.
    #[arg(long)]
    pub json: bool,

    /// Only download the model's files into the Hugging Face cache (for later --offline use).
    #[arg(long)]
    pub download_only: bool,

    /// List the schedulers and exit.
    #[arg(long)]
    pub list_schedulers: bool,
}

fn parse_key_value(s: &str) -> Result<(String, serde_json::Value), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))?;
    let value =
        serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.to_string()));
    Ok((k.trim().to_string(), value))
}

/// Which model to load and from where: the flags `sdgen` and `sdgen serve` share.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelFlags {
    /// Hub repo id, local diffusers folder, or single-file checkpoint (.safetensors/.ckpt).
    #[arg(short = 'm', long, default_value = DEFAULT_MODEL)]
    pub model: String,

    /// A single-file checkpoint (.safetensors/.ckpt, original LDM naming) inside the --model
    /// folder or Hub repo, e.g. v1-5-pruned-emaonly.safetensors.
    #[arg(long, value_name = "NAME")]
    pub checkpoint: Option<String>,

    /// A diffusers folder whose configs, tokenizer and scheduler serve a single-file
    /// checkpoint (default: built-in SD 1.5 / SD 2.1 configs, chosen from the checkpoint).
    #[arg(long, value_name = "DIR")]
    pub config_from: Option<PathBuf>,

    /// Hub revision (branch, tag or commit).
    #[arg(long, default_value = "main")]
    pub revision: String,

    /// Use only the local Hugging Face cache (also HF_HUB_OFFLINE=1).
    #[arg(long)]
    pub offline: bool,
}

impl ModelFlags {
    /// What the flags ask for, in `dtype` (half-precision weights where the Hub has them), with
    /// download progress bars when `progress`.
    pub fn request(&self, dtype: DType, progress: bool) -> ModelRequest<'_> {
        ModelRequest {
            model: &self.model,
            revision: &self.revision,
            checkpoint: self.checkpoint.as_deref(),
            config_from: self.config_from.as_deref(),
            precision: if dtype == DType::F32 {
                Precision::Full
            } else {
                Precision::Half
            },
            offline: self.offline || offline_from_env(),
            progress,
        }
    }
}

/// `WIDTHxHEIGHT` as (height, width), diffusers' order for sizes.
fn parse_size(s: &str) -> Result<(usize, usize), String> {
    let (w, h) = parse_two(s, &['x', 'X'], "WIDTHxHEIGHT, e.g. 1024x768")?;
    Ok((h, w))
}

/// `A,B` as (A, B).
fn parse_pair(s: &str) -> Result<(usize, usize), String> {
    parse_two(s, &[','], "TOP,LEFT, e.g. 0,0")
}

/// Two whole numbers split at one of `separators`; else an error saying `form`.
fn parse_two(s: &str, separators: &[char], form: &str) -> Result<(usize, usize), String> {
    let bad = || format!("{s:?} is not {form}");
    let (a, b) = s.split_once(separators).ok_or_else(bad)?;
    let num = |v: &str| v.trim().parse::<usize>().map_err(|_| bad());
    Ok((num(a)?, num(b)?))
}
