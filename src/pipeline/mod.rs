//! The pipeline: diffusers' `StableDiffusionPipeline.__call__` on candle, its image-to-image
//! and inpainting siblings (`StableDiffusionImg2ImgPipeline`, `StableDiffusionInpaintPipeline`),
//! whose start is `start`'s, and `StableDiffusionXLPipeline`, whose text side is `xl`'s.

mod start;
mod xl;

use self::start::{start_index, Inpaint};
use self::xl::SecondEncoder;
pub use self::xl::SizeConditioning;
use crate::addons::embedding::Embedding;
use crate::addons::lora::{LoraPatch, LoraSpec, Part, UnetShape};
use crate::conditioning::{self, Chunks, Expansions, PromptSyntax};
pub use crate::config::Family;
use crate::config::{ClipTextConfig, ModelIndex, UNetConfig, VaeConfig};
pub use crate::models::unet::AddedConditioning;
use crate::models::unet::UNet2DConditionModel;
pub use crate::models::vae_encoder::LatentDistribution;
use crate::models::vae_encoder::VaeEncoder;
pub use crate::models::vae_tiling::Tiles;
use crate::models::{clip::ClipTextModel, vae::Vae, Loader};
use crate::ops::Engine;
use crate::rng::{Generator, RngKind};
use crate::schedulers::{self, NoiseSource, SchedulerConfig};
use crate::source::{ModelFiles, WeightFiles};
use crate::tokenizer::ClipTokenizer;
use crate::weights::{single_file::Checkpoint, var_builder};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;

/// The largest width or height accepted (a 16384x16384 image is 768 MiB of pixels).
pub const MAX_SIDE: usize = 16384;

/// What to generate.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: String,
    pub negative_prompt: String,
    /// One seed per image (a run with `--seed S` asks for S, S + 1, ...): image i's latents
    /// and ancestral noise come from `torch.Generator(device).manual_seed(seeds[i])`, the
    /// device's generator as `rng` says.
    pub seeds: Vec<u64>,
    pub steps: usize,
    pub guidance: f64,
    /// `--scheduler` name; `None` = the model's own.
    pub scheduler: Option<String>,
    pub width: usize,
    pub height: usize,
    pub batch_size: usize,
    /// "Clip skip" as the web UI and model pages count it: 1 = the text encoder's last layer,
    /// 2 = the one before (diffusers' `clip_skip=1`), ...; for the prompt and the negative
    /// prompt alike, as the web UI applies it.
    pub clip_skip: usize,
    /// How the prompts are read: diffusers' plain text or the web UI's syntax.
    pub prompt_syntax: PromptSyntax,
    /// The LoRAs merged into the text encoder and the U-Net for this request.
    pub loras: Vec<LoraSpec>,
    /// The generator behind `seeds`: torch's CPU one, or its CUDA one computed here.
    pub rng: RngKind,
    /// Image-to-image: the picture to start from.
    pub image: Option<InitImage>,
    /// Decode (and encode) in tiles as diffusers' `enable_vae_tiling` does (also done
    /// whenever the untiled VAE would not fit in memory).
    pub vae_tiling: bool,
    /// SDXL's size conditioning (ignored by SD 1.x/2.x).
    pub sizes: SizeConditioning,
}

/// The start of an image-to-image request (diffusers' `StableDiffusionImg2ImgPipeline`).
#[derive(Debug, Clone)]
pub struct InitImage {
    /// (1, 3, height, width) in [-1, 1] at the request's size, f32.
    pub pixels: Tensor,
    /// How much of the schedule runs, in [0, 1]: 1 starts from pure noise, 0.3 keeps most
    /// of the picture.
    pub strength: f64,
    /// Inpainting: (1, 1, height, width), 1 where the picture is repainted, 0 where it is
    /// kept (binarized as diffusers' mask processor does).
    pub mask: Option<Tensor>,
}

impl Request {
    pub fn num_images(&self) -> usize {
        self.seeds.len()
    }

    /// The prompt and the negative prompt as the text encoder reads them (without the
    /// prompt's `<lora:...>` tags in the web UI's syntax).
    pub fn texts(&self) -> Result<[std::borrow::Cow<'_, str>; 2]> {
        Ok([
            conditioning::positive_text(&self.prompt, self.prompt_syntax)?,
            self.negative_prompt.as_str().into(),
        ])
    }
}

/// A prompt's conditioning: the U-Net's context, and SDXL's pooled text embedding.
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// (1, 77 x chunks, cross_attention_dim).
    pub context: Tensor,
    /// (1, pooled width): SDXL's second text encoder's projected pooled output.
    pub pooled: Option<Tensor>,
}

impl Conditioning {
    /// Zeros of the same shapes: SDXL's unconditional half without a negative prompt
    /// (`force_zeros_for_empty_prompt`).
    fn zeros_like(&self) -> Result<Self> {
        Ok(Self {
            context: self.context.zeros_like()?,
            pooled: self.pooled.as_ref().map(Tensor::zeros_like).transpose()?,
        })
    }

    fn all_finite(&self) -> Result<bool> {
        Ok(all_finite(&self.context)? && self.pooled.as_ref().map_or(Ok(true), all_finite)?)
    }
}

/// Called after every denoising step with (steps done, total); an error stops the run there
/// (the server's cancelled jobs).
pub type StepCallback<'a> = &'a mut dyn FnMut(usize, usize) -> Result<()>;

/// One generated image: RGB8, row-major.
pub struct GeneratedImage {
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<u8>,
}

/// When the model's components are loaded and dropped.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Residency {
    /// Each component stays loaded once used: batches load the model once for many images.
    KeepAll,
    /// Load each component when first needed and drop it when the run is done with it (the
    /// text encoder after encoding, the U-Net before the last VAE decode): the lowest peak
    /// memory for a single run.
    Sequential,
}

/// The parts of a model that have weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    TextEncoder,
    /// SDXL's second text encoder.
    TextEncoder2,
    Unet,
    Vae,
    /// The VAE's encoder (image to image), from the VAE's weights.
    VaeEncoder,
}

pub struct Pipeline {
    pub files: ModelFiles,
    pub device: Device,
    pub dtype: DType,
    /// The implementations the components' operations run on (`ops`).
    pub engine: Engine,
    pub residency: Residency,
    /// SD 1.x/2.x or SDXL, from model_index.json.
    pub family: Family,
    /// SDXL: zeros for the unconditional half when there is no negative prompt.
    force_zeros_for_empty_prompt: bool,
    /// SDXL's refiner (`requires_aesthetics_score`): one text encoder, OpenCLIP with its
    /// projection (the Hub's `text_encoder_2/`), and an aesthetic score in the added
    /// conditioning.
    refiner: bool,
    tokenizer: ClipTokenizer,
    clip_config: ClipTextConfig,
    /// Textual-inversion embeddings, in the order of their token ids.
    embeddings: Vec<Embedding>,
    expansions: Expansions,
    /// The LoRAs the loaded text encoder and U-Net have merged.
    loras: RefCell<Vec<LoraSpec>>,
    text_encoder: RefCell<Option<Rc<ClipTextModel>>>,
    /// SDXL's second tokenizer and text encoder.
    second: Option<SecondEncoder>,
    unet: RefCell<Option<Rc<UNet2DConditionModel>>>,
    vae: RefCell<Option<Rc<Vae>>>,
    vae_encoder: RefCell<Option<Rc<VaeEncoder>>>,
    pub unet_config: UNetConfig,
    pub vae_config: VaeConfig,
    pub scheduler_config: SchedulerConfig,
    /// The `--scheduler` name of the model's own scheduler class, if supported.
    pub default_scheduler: Option<&'static str>,
}

impl Pipeline {
    /// The model of `files` on `device` in `dtype`, on that device's engine
    /// ([`Engine::for_device`]). Reads the configs and the tokenizer; each component's
    /// weights are read when it is first used.
    pub fn load(files: ModelFiles, device: Device, dtype: DType) -> Result<Self> {
        let engine = Engine::for_device(&device);
        Self::load_on(files, device, dtype, engine)
    }

    /// [`Pipeline::load`] on a given engine (tests and benchmarks compare engines this way).
    pub fn load_on(
        files: ModelFiles,
        device: Device,
        dtype: DType,
        engine: Engine,
    ) -> Result<Self> {
        crate::allocator::keep_freed_blocks();
        let index = ModelIndex::load(&files.model_index)?;
        let unet_config = UNetConfig::load(&files.unet_config)?;
        let vae_config = VaeConfig::load(&files.vae_config)?;
        let clip_config = ClipTextConfig::load(&files.text_encoder_config)?;
        let mut scheduler_config = SchedulerConfig::load(&files.scheduler_config)?;
        let tokenizer = ClipTokenizer::from_dir(&files.tokenizer_dir)?;
        check_tokenizer(
            &tokenizer,
            &clip_config,
            &files.tokenizer_dir,
            &files.text_encoder_config,
        )?;
        // the refiner's one encoder is in the first slot (`files::first_encoder`)
        let refiner = index.aesthetic_score;
        let second = match index.family {
            Family::Sd => None,
            Family::Sdxl if refiner => {
                if files.second_encoder.is_some() {
                    bail!("{}: a model that requires an aesthetic score (SDXL's refiner) with two text encoders is not one sdgen knows", files.model_index.display());
                }
                None
            }
            Family::Sdxl => {
                let Some(f) = &files.second_encoder else {
                    bail!("{}: an SDXL pipeline needs text_encoder_2/ and tokenizer_2/, which the model does not have", files.model_index.display());
                };
                let config = ClipTextConfig::load(&f.config)?;
                let tokenizer = ClipTokenizer::from_dir(&f.tokenizer_dir)?;
                check_tokenizer(&tokenizer, &config, &f.tokenizer_dir, &f.config)?;
                Some(SecondEncoder {
                    tokenizer,
                    config,
                    model: RefCell::new(None),
                })
            }
        };
        check_text_fits_unet(
            &clip_config,
            second.as_ref().map(|s| &s.config),
            &unet_config,
            index.family,
            refiner,
        )?;
        // diffusers builds the scheduler class model_index.json names, from this config
        if let Some(class) = index.scheduler_class {
            scheduler_config.set("_class_name", serde_json::Value::String(class));
        }
        scheduler_config.apply_pipeline_fixes();
        let default_scheduler = scheduler_config
            .class_name()
            .and_then(schedulers::name_for_class);
        Ok(Self {
            files,
            device,
            dtype,
            engine,
            residency: Residency::KeepAll,
            family: index.family,
            force_zeros_for_empty_prompt: index.force_zeros_for_empty_prompt,
            refiner,
            tokenizer,
            clip_config,
            embeddings: Vec::new(),
            expansions: Expansions::new(),
            loras: RefCell::new(Vec::new()),
            text_encoder: RefCell::new(None),
            second,
            unet: RefCell::new(None),
            vae: RefCell::new(None),
            vae_encoder: RefCell::new(None),
            unet_config,
            vae_config,
            scheduler_config,
            default_scheduler,
        })
    }

    /// Loads every component now (to find bad weights before any work).
    pub fn preload(&self) -> Result<()> {
        self.text_encoder()?;
        if self.second.is_some() {
            self.text_encoder_2()?;
        }
        self.unet()?;
        self.vae()?;
        Ok(())
    }

    /// Adds a textual-inversion embedding: its words become tokens of the tokenizer(s), its
    /// vectors rows of the text encoder's (encoders') token embedding.
    pub fn add_embedding(&mut self, path: &Path) -> Result<()> {
        if self.refiner {
            bail!(
                "{}: textual-inversion embeddings on SDXL's refiner are not supported",
                path.display()
            );
        }
        let hidden_2 = self.second.as_ref().map(|s| s.config.hidden_size);
        let e = Embedding::load(path, self.clip_config.hidden_size, hidden_2)?;
        let ids = self.tokenizer.add_tokens(&e.tokens())?;
        if let Some(second) = &mut self.second {
            // SDXL's tokenizers share their vocabulary: the words get the same ids in both,
            // and the same rows after both encoders' vocabularies
            let same_vocab = second.config.vocab_size == self.clip_config.vocab_size;
            if second.tokenizer.add_tokens(&e.tokens())? != ids || !same_vocab {
                bail!(
                    "{}: the two tokenizers give the embedding's words different ids (tokenizers of different vocabularies)",
                    path.display()
                );
            }
        }
        let next = self.clip_config.vocab_size
            + self
                .embeddings
                .iter()
                .map(|e| e.vectors.dims()[0])
                .sum::<usize>();
        if ids.first().is_some_and(|&id| id as usize != next) {
            bail!(
                "{}: the tokenizer gives the embedding id {}, but the text encoder's vocabulary ends at {} (a tokenizer smaller than the text encoder's vocab_size {})",
                path.display(),
                ids[0],
                next,
                self.clip_config.vocab_size
            );
        }
        self.expansions.insert(ids[0], (e.name.clone(), ids));
        self.embeddings.push(e);
        *self.text_encoder.borrow_mut() = None;
        self.drop_text_encoder_2();
        Ok(())
    }

    pub fn embeddings(&self) -> &[Embedding] {
        &self.embeddings
    }

    /// The token id of the embedding word `name`.
    pub fn embedding_id(&self, name: &str) -> Option<u32> {
        self.expansions
            .iter()
            .find(|(_, (n, _))| n == name)
            .map(|(&id, _)| id)
    }

    /// Merges `loras` into the text encoders and the U-Net from now on (all are read again
    /// when the set changes).
    fn use_loras(&self, loras: &[LoraSpec]) {
        if self.loras.borrow().as_slice() != loras {
            *self.loras.borrow_mut() = loras.to_vec();
            *self.text_encoder.borrow_mut() = None;
            self.drop_text_encoder_2();
            *self.unet.borrow_mut() = None;
        }
    }

    /// The VAE's type: float32 for an SDXL model in float16 whose VAE config asks for
    /// `force_upcast` (SDXL's VAE overflows in f16), as `StableDiffusionXLPipeline` upcasts;
    /// else the model's.
    fn vae_dtype(&self) -> DType {
        let upcast =
            self.family == Family::Sdxl && self.dtype == DType::F16 && self.vae_config.force_upcast;
        if upcast {
            DType::F32
        } else {
            self.dtype
        }
    }

    /// The VAE encoder's type: float32 for an SDXL model in half precision (f16 or bf16) whose
    /// VAE config asks for `force_upcast`, as `StableDiffusionXLImg2ImgPipeline` encodes; else
    /// the model's.
    fn vae_encoder_dtype(&self) -> DType {
        let upcast =
            self.family == Family::Sdxl && self.dtype != DType::F32 && self.vae_config.force_upcast;
        if upcast {
            DType::F32
        } else {
            self.dtype
        }
    }

    /// The weights of `component`, for the model's engine, with the LoRAs' updates.
    fn loader(&self, component: Component) -> Result<Loader<'static>> {
        let device = &self.device;
        let dtype = match component {
            Component::Vae => self.vae_dtype(),
            Component::VaeEncoder => self.vae_encoder_dtype(),
            _ => self.dtype,
        };
        let vb = match &self.files.weights {
            WeightFiles::Diffusers {
                text_encoder,
                text_encoder_2,
                unet,
                vae,
            } => {
                let path = match component {
                    Component::TextEncoder => text_encoder,
                    Component::TextEncoder2 => text_encoder_2
                        .as_ref()
                        .context("the model has no text_encoder_2 weights")?,
                    Component::Unet => unet,
                    Component::Vae | Component::VaeEncoder => vae,
                };
                var_builder(path, dtype, device)?
            }
            WeightFiles::SingleFile(path) => {
                let ckpt = Checkpoint::open(path)?;
                match component {
                    Component::TextEncoder => {
                        ckpt.text_encoder(&self.clip_config, dtype, device)?
                    }
                    Component::TextEncoder2 => {
                        ckpt.text_encoder_2(&self.second_encoder()?.config, dtype, device)?
                    }
                    Component::Unet => ckpt.unet(&self.unet_config, dtype, device)?,
                    Component::Vae | Component::VaeEncoder => {
                        ckpt.vae(&self.vae_config, dtype, device)?
                    }
                }
            }
        };
        let part = match component {
            // the refiner's one encoder is SDXL's second (its LoRA layers are named so)
            Component::TextEncoder if self.refiner => Some(Part::TextEncoder2),
            Component::TextEncoder => Some(Part::TextEncoder),
            Component::TextEncoder2 => Some(Part::TextEncoder2),
            Component::Unet => Some(Part::Unet),
            Component::Vae | Component::VaeEncoder => None,
        };
        let shape = UnetShape {
            layers_per_block: self.unet_config.layers_per_block,
        };
        let loras = self.loras.borrow();
        if component == Component::TextEncoder
            && self.family == Family::Sd
            && LoraPatch::load(&loras, Part::TextEncoder2, shape)?.is_some()
        {
            bail!("a LoRA has layers of SDXL's second text encoder (lora_te2_ / text_encoder_2.); this model is SD 1.x/2.x");
        }
        let lora = match part {
            Some(part) => LoraPatch::load(&loras, part, shape)?.map(Rc::new),
            None => None,
        };
        Ok(Loader::new(vb, self.engine, lora))
    }

    /// Builds a component, explaining a single-file checkpoint that does not fit its configs.
    fn build<T>(
        &self,
        component: Component,
        f: impl FnOnce(Loader<'static>) -> Result<T>,
    ) -> Result<Rc<T>> {
        let r = self.loader(component).and_then(|vb| {
            let lora = vb.lora().cloned();
            let built = f(vb)?;
            if let Some(lora) = lora {
                lora.check_all_used()?;
            }
            Ok(built)
        });
        match (r, &self.files.weights) {
            (Err(e), WeightFiles::SingleFile(_)) => {
                let configs = self.files.model_index.parent().unwrap_or(Path::new("."));
                Err(e.context(if self.files.builtin_configs.is_some() {
                    "the checkpoint does not fit sdgen's built-in configs for its family (pass --config-from with the model's diffusers configs)".to_string()
                } else {
                    format!(
                        "the checkpoint does not fit the configs in {}",
                        configs.display()
                    )
                }))
            }
            (r, _) => r.map(Rc::new),
        }
    }

    fn text_encoder(&self) -> Result<Rc<ClipTextModel>> {
        if let Some(m) = self.text_encoder.borrow().as_ref() {
            return Ok(m.clone());
        }
        let m = self.build(Component::TextEncoder, |vb| {
            let m = if self.refiner {
                ClipTextModel::with_projection(vb, &self.clip_config)
            } else {
                ClipTextModel::new(vb, &self.clip_config)
            }
            .context("loading the text encoder weights")?;
            if self.embeddings.is_empty() {
                return Ok(m);
            }
            let vectors: Vec<&Tensor> = self.embeddings.iter().map(|e| &e.vectors).collect();
            Ok(m.with_extra_tokens(&Tensor::cat(&vectors, 0)?)?)
        })?;
        *self.text_encoder.borrow_mut() = Some(m.clone());
        Ok(m)
    }

    fn unet(&self) -> Result<Rc<UNet2DConditionModel>> {
        if let Some(m) = self.unet.borrow().as_ref() {
            return Ok(m.clone());
        }
        let m = self.build(Component::Unet, |vb| {
            UNet2DConditionModel::new(vb, &self.unet_config)
        })?;
        *self.unet.borrow_mut() = Some(m.clone());
        Ok(m)
    }

    fn vae(&self) -> Result<Rc<Vae>> {
        if let Some(m) = self.vae.borrow().as_ref() {
            return Ok(m.clone());
        }
        let m = self.build(Component::Vae, |vb| Vae::new(vb, &self.vae_config))?;
        *self.vae.borrow_mut() = Some(m.clone());
        Ok(m)
    }

    fn vae_encoder(&self) -> Result<Rc<VaeEncoder>> {
        if let Some(m) = self.vae_encoder.borrow().as_ref() {
            return Ok(m.clone());
        }
        let m = self.build(Component::VaeEncoder, |vb| {
            VaeEncoder::new(vb, &self.vae_config)
        })?;
        *self.vae_encoder.borrow_mut() = Some(m.clone());
        Ok(m)
    }

    /// `vae.encode(images).latent_dist` for (n, 3, h, w) images in [-1, 1] (the encoder is
    /// read on first use), in tiles when `tiles` is given.
    pub fn encode_image(
        &self,
        images: &Tensor,
        tiles: Option<Tiles>,
    ) -> Result<LatentDistribution> {
        self.vae_encoder()?
            .encode(&images.to_dtype(self.vae_encoder_dtype())?, tiles)
    }

    /// The VAE's tiles for request `r`: with `--vae-tiling`, and whenever the untiled VAE
    /// would not fit in memory.
    fn tiles(&self, r: &Request) -> Option<Tiles> {
        let untiled = self.vae_bytes(r.width, r.height);
        (r.vae_tiling || crate::allocator::beyond_memory(untiled).is_some())
            .then(|| Tiles::new(&self.vae_config))
    }

    /// The VAE's activations at `width` x `height` pixels (the decoder's last block, a few
    /// tensors of its first block's width alive at once).
    fn vae_bytes(&self, width: usize, height: usize) -> u64 {
        let elem = self.vae_dtype().size_in_bytes() as u64;
        self.vae_config.block_out_channels[0] as u64 * (width * height) as u64 * 4 * elem
    }

    pub fn vae_scale_factor(&self) -> usize {
        self.vae_config.scale_factor()
    }

    /// diffusers' default (height, width): unet sample_size x the VAE scale factor.
    /// A request for one image of `prompt` with diffusers' defaults on this model: its
    /// default size and scheduler, 50 steps, guidance 7.5, seed 0, no negative prompt, nothing
    /// else; callers change what they need (`Request { seeds, ..p.request(prompt) }`).
    pub fn request(&self, prompt: impl Into<String>) -> Request {
        let (height, width) = self.default_size();
        Request {
            prompt: prompt.into(),
            negative_prompt: String::new(),
            seeds: vec![0],
            steps: 50,
            guidance: 7.5,
            scheduler: None,
            width,
            height,
            batch_size: 1,
            clip_skip: 1,
            prompt_syntax: PromptSyntax::Plain,
            loras: Vec::new(),
            rng: Default::default(),
            image: None,
            vae_tiling: false,
            sizes: SizeConditioning::default(),
        }
    }

    pub fn default_size(&self) -> (usize, usize) {
        let (h, w) = self
            .unet_config
            .sample_size
            .map_or((64, 64), |s| s.height_width());
        (h * self.vae_scale_factor(), w * self.vae_scale_factor())
    }

    /// diffusers' default strength for image to image (`masked`: inpainting) with this
    /// model's pipeline: 0.8 and 1 for SD 1.x/2.x, 0.3 and 0.9999 for SDXL.
    pub fn default_strength(&self, masked: bool) -> f64 {
        match (self.family, masked) {
            (Family::Sd, false) => 0.8,
            (Family::Sd, true) => 1.0,
            (Family::Sdxl, false) => 0.3,
            (Family::Sdxl, true) => 0.9999,
        }
    }

    /// Checks a request before any work is done.
    pub fn validate(&self, r: &Request) -> Result<()> {
        let f = self.vae_scale_factor();
        if r.width == 0 || r.height == 0 || r.width % f != 0 || r.height % f != 0 {
            bail!(
                "width and height must be positive multiples of {f} for this model (got {}x{})",
                r.width,
                r.height
            );
        }
        if r.width > MAX_SIDE || r.height > MAX_SIDE {
            bail!(
                "{}x{} is larger than sdgen's limit of {MAX_SIDE} pixels a side",
                r.width,
                r.height
            );
        }
        if let Some((need, have)) = crate::allocator::beyond_memory(self.activation_bytes(r)) {
            bail!(
                "{}x{} (batch {}) needs about {need:.1} GiB for its activations alone; this machine has {have:.1} GiB: choose a smaller size or --batch-size",
                r.width,
                r.height,
                r.batch_size.min(r.seeds.len()),
            );
        }
        if r.steps == 0 {
            bail!("--steps must be at least 1");
        }
        if r.seeds.is_empty() || r.batch_size == 0 {
            bail!("--num-images and --batch-size must be at least 1");
        }
        // (SDXL: the smaller of the two encoders)
        let layers = match &self.second {
            Some(second) => {
                (self.clip_config.num_hidden_layers).min(second.config.num_hidden_layers)
            }
            None => self.clip_config.num_hidden_layers,
        };
        if r.clip_skip == 0 || r.clip_skip > layers {
            bail!(
                "--clip-skip {} is outside 1..={layers} (the text encoder has {layers} layers; 1 uses the last)",
                r.clip_skip
            );
        }
        if !r.guidance.is_finite() {
            bail!("--guidance must be a finite number");
        }
        self.validate_added_conditioning(r)?;
        // the web UI's syntax can be wrong (a weight that is no number), or too long
        for text in r.texts()? {
            self.tokenize(&text, r.prompt_syntax)?;
        }
        // Builds the scheduler once to surface configuration errors early.
        let (_, scheduler) =
            schedulers::build(r.scheduler.as_deref(), &self.scheduler_config, r.steps)?;
        if let Some(image) = &r.image {
            let want = [1, 3, r.height, r.width];
            if image.pixels.dims() != want {
                bail!(
                    "the start image is {:?}, not {want:?} (internal error)",
                    image.pixels.dims()
                );
            }
            start_index(r.steps, image.strength, scheduler.as_ref())?;
            if let Some(mask) = &image.mask {
                if mask.dims() != [1, 1, r.height, r.width] {
                    bail!(
                        "the mask is {:?}, not [1, 1, {}, {}] (internal error)",
                        mask.dims(),
                        r.height,
                        r.width
                    );
                }
            }
        }
        let inpainting_unet = self.unet_config.in_channels == 9;
        let masked = r.image.as_ref().is_some_and(|i| i.mask.is_some());
        if inpainting_unet && !masked {
            bail!("this is an inpainting model (a 9-channel U-Net): give it --image and --mask");
        }
        if !inpainting_unet && self.unet_config.in_channels != self.vae_config.latent_channels {
            bail!(
                "the U-Net takes {} channels, the VAE makes {}: sdgen runs 4-channel models and 9-channel inpainting ones",
                self.unet_config.in_channels,
                self.vae_config.latent_channels
            );
        }
        Ok(())
    }

    /// The half-precision cause of the non-finite errors ("" in f32).
    fn overflow_hint(&self) -> String {
        match self.dtype {
            DType::F32 => String::new(),
            d => format!(
                ", or {} overflowed: try --dtype f32",
                crate::device::dtype_name(d)
            ),
        }
    }

    /// A rough estimate of a request's peak activation memory, the larger of the U-Net
    /// at full latent size (the batch twice for guidance; GEGLU's 8x-wide hidden layer is the
    /// largest tensor) and the VAE decoder's last block at full image size (one image at a
    /// time, a few tensors of its first block's width alive at once). Weights come on top.
    fn activation_bytes(&self, r: &Request) -> u64 {
        let elem = self.dtype.size_in_bytes() as u64;
        let f = self.vae_scale_factor() as u64;
        let (w, h) = (r.width as u64, r.height as u64);
        let batch = r.batch_size.min(r.seeds.len()) as u64 * 2;
        let unet_ch = self.unet_config.block_out_channels[0] as u64;
        let unet = batch * (w / f) * (h / f) * unet_ch * 16 * elem;
        let vae = match self.tiles(r) {
            Some(t) => self.vae_bytes(t.sample.min(r.width), t.sample.min(r.height)),
            None => self.vae_bytes(r.width, r.height),
        };
        unet.max(vae)
    }

    /// The token ids of `prompt` read in `syntax` (with whether words were cut off).
    pub fn tokenize(&self, prompt: &str, syntax: PromptSyntax) -> Result<Chunks> {
        conditioning::tokenize(&self.tokenizer, &self.expansions, prompt, syntax)
    }

    /// The U-Net's context for `prompt`: (1, 77 x chunks, hidden); `encode_prompt`'s
    /// text-encoder pass in the plain syntax.
    pub fn encode_text(
        &self,
        prompt: &str,
        syntax: PromptSyntax,
        clip_skip: usize,
    ) -> Result<Tensor> {
        let chunks = self.tokenize(prompt, syntax)?;
        let text_encoder = self.text_encoder()?;
        conditioning::encode(
            &text_encoder,
            &chunks,
            clip_skip.saturating_sub(1),
            &self.device,
        )
    }

    /// A prompt's conditioning in the request's syntax and clip skip: the text encoder's
    /// output for SD 1.x/2.x, both encoders' and the pooled embedding for SDXL.
    pub fn encode_prompt(&self, text: &str, r: &Request) -> Result<Conditioning> {
        match self.family {
            Family::Sd => Ok(Conditioning {
                context: self.encode_text(text, r.prompt_syntax, r.clip_skip)?,
                pooled: None,
            }),
            Family::Sdxl => self.encode_xl(text, r.prompt_syntax, r.clip_skip.saturating_sub(1)),
        }
    }

    /// The unconditional half for classifier-free guidance: the negative prompt's
    /// conditioning, or for SDXL without a negative prompt zeros shaped like `cond` when
    /// model_index.json says `force_zeros_for_empty_prompt` (diffusers' `negative_prompt=None`;
    /// an empty `--negative-prompt` counts as none).
    fn encode_negative(
        &self,
        negative: &str,
        cond: &Conditioning,
        r: &Request,
    ) -> Result<Conditioning> {
        let zeros =
            self.family == Family::Sdxl && self.force_zeros_for_empty_prompt && negative.is_empty();
        if zeros {
            cond.zeros_like()
        } else {
            self.encode_prompt(negative, r)
        }
    }

    /// One U-Net call without added conditioning (SD 1.x/2.x).
    pub fn unet_forward(&self, sample: &Tensor, timestep: f64, context: &Tensor) -> Result<Tensor> {
        Ok(self.unet()?.forward(sample, timestep, context, None)?)
    }

    /// One U-Net call with SDXL's added conditioning.
    pub fn unet_forward_xl(
        &self,
        sample: &Tensor,
        timestep: f64,
        context: &Tensor,
        added: &AddedConditioning,
    ) -> Result<Tensor> {
        Ok(self
            .unet()?
            .forward(sample, timestep, context, Some(added))?)
    }

    /// The VAE decoder's raw output for `latents`, in `tiles` when given.
    pub fn vae_decode_raw(&self, latents: &Tensor, tiles: Option<Tiles>) -> Result<Tensor> {
        self.vae()?.decode_raw(latents, tiles)
    }

    /// The initial latents of images `first..first+n` (one generator each), drawn on the host.
    pub fn initial_latents(
        &self,
        r: &Request,
        first: usize,
        n: usize,
    ) -> Result<(Vec<Generator>, Tensor)> {
        let f = self.vae_scale_factor();
        let c = self.vae_config.latent_channels;
        let (h, w) = (r.height / f, r.width / f);
        let mut generators: Vec<Generator> = (first..first + n)
            .map(|i| Generator::new(r.rng, r.seeds[i]))
            .collect();
        let mut data = Vec::with_capacity(n * c * h * w);
        for g in generators.iter_mut() {
            data.extend(g.randn(c * h * w));
        }
        let latents = Tensor::from_vec(data, (n, c, h, w), &Device::Cpu)?
            .to_device(&self.device)?
            .to_dtype(self.dtype)?;
        Ok((generators, latents))
    }

    /// Runs the whole request, handing each image to `on_image` as soon as it is decoded, in
    /// the order of `r.seeds`.
    pub fn generate(
        &self,
        r: &Request,
        on_step: StepCallback,
        on_image: &mut dyn FnMut(GeneratedImage) -> Result<()>,
    ) -> Result<()> {
        self.validate(r)?;
        self.use_loras(&r.loras);
        let cfg = r.guidance > 1.0;
        let [prompt, negative] = r.texts()?;
        let cond = self.encode_prompt(&prompt, r)?;
        let uncond = if cfg {
            Some(self.encode_negative(&negative, &cond, r)?)
        } else {
            None
        };
        for c in std::iter::once(&cond).chain(uncond.as_ref()) {
            if !c.all_finite()? {
                bail!("the text encoder's output holds NaN or infinity (are its weights finite?)");
            }
        }
        if self.residency == Residency::Sequential {
            *self.text_encoder.borrow_mut() = None;
            self.drop_text_encoder_2();
            crate::allocator::release_free_memory();
        }
        let n_images = r.num_images();
        let total_steps = {
            let (_, s) =
                schedulers::build(r.scheduler.as_deref(), &self.scheduler_config, r.steps)?;
            let begin = match &r.image {
                Some(image) => start_index(r.steps, image.strength, s.as_ref())?,
                None => 0,
            };
            (s.timesteps().len() - begin) * n_images.div_ceil(r.batch_size)
        };
        let mut done = 0;
        let mut first = 0;
        while first < n_images {
            let n = r.batch_size.min(n_images - first);
            let latents = self.denoise(r, first, n, &cond, uncond.as_ref(), &mut |_, _| {
                done += 1;
                on_step(done, total_steps)
            })?;
            if self.residency == Residency::Sequential && first + n >= n_images {
                *self.unet.borrow_mut() = None;
                crate::allocator::release_free_memory();
            }
            let vae = self.vae()?;
            let latents = latents.to_dtype(self.vae_dtype())?;
            for i in 0..n {
                let image = vae.decode(&latents.narrow(0, i, 1)?, self.tiles(r))?;
                if !all_finite(&image)? {
                    bail!(
                        "the VAE decoder's output holds NaN or infinity (are its weights finite, is scaling_factor {} right{}?)",
                        self.vae_config.scaling_factor,
                        self.overflow_hint()
                    );
                }
                on_image(GeneratedImage {
                    seed: r.seeds[first + i],
                    width: r.width,
                    height: r.height,
                    rgb: to_rgb8(&image.get(0)?)?,
                })?;
            }
            first += n;
        }
        Ok(())
    }

    /// [`Pipeline::generate`] collecting the images.
    pub fn generate_all(&self, r: &Request) -> Result<Vec<GeneratedImage>> {
        let mut out = Vec::new();
        self.generate(r, &mut |_, _| Ok(()), &mut |img| {
            out.push(img);
            Ok(())
        })?;
        Ok(out)
    }

    /// The denoising loop for images `first..first+n`; returns the final latents.
    pub fn denoise(
        &self,
        r: &Request,
        first: usize,
        n: usize,
        cond: &Conditioning,
        uncond: Option<&Conditioning>,
        on_step: StepCallback,
    ) -> Result<Tensor> {
        let (_, mut scheduler) =
            schedulers::build(r.scheduler.as_deref(), &self.scheduler_config, r.steps)?;
        let (begin, mut generators, mut latents, inpaint) =
            self.start(r, scheduler.as_ref(), first, n)?;
        let unet = self.unet()?;
        // SDXL's added conditioning of the images' rows for these halves (each with whether
        // it is the unconditional one), in this order
        let added = |halves: &[(&Conditioning, bool)]| -> Result<Option<AddedConditioning>> {
            if !unet.takes_added_conditioning() {
                return Ok(None);
            }
            let pooled = halves
                .iter()
                .map(|(c, _)| {
                    c.pooled
                        .as_ref()
                        .context("no pooled text embedding for SDXL's U-Net")?
                        .repeat((n, 1))
                        .map_err(anyhow::Error::from)
                })
                .collect::<Result<Vec<_>>>()?;
            let time_ids = halves
                .iter()
                .flat_map(|&(_, negative)| vec![self.time_ids(r, negative); n])
                .collect();
            Ok(Some(AddedConditioning {
                text_embeds: Tensor::cat(&pooled, 0)?,
                time_ids,
            }))
        };
        let added_cond = added(&[(cond, false)])?;
        let added_uncond = uncond.map(|u| added(&[(u, true)])).transpose()?.flatten();
        let added_both = uncond
            .map(|u| added(&[(u, true), (cond, false)]))
            .transpose()?
            .flatten();
        let cond = cond.context.repeat((n, 1, 1))?;
        let uncond = uncond.map(|u| u.context.repeat((n, 1, 1))).transpose()?;
        // one U-Net pass for both halves when their contexts have the same length; the web
        // UI's long prompts may not (it then runs them apart, as here)
        let batched = match &uncond {
            Some(u) if u.dim(1)? == cond.dim(1)? => Some(Tensor::cat(&[u, &cond], 0)?),
            _ => None,
        };
        let timesteps = scheduler.timesteps().to_vec();
        for (i, &t) in timesteps.iter().enumerate().skip(begin) {
            let model_input = scheduler.scale_model_input(&latents, i)?;
            let model_input = match inpaint.as_ref().and_then(|p| p.condition.as_ref()) {
                Some(c) => Tensor::cat(&[&model_input, c], 1)?,
                None => model_input,
            };
            let noise_pred = match (&uncond, &batched) {
                (_, Some(context)) => unet.forward(
                    &Tensor::cat(&[&model_input, &model_input], 0)?,
                    t,
                    context,
                    added_both.as_ref(),
                )?,
                (Some(u), None) => Tensor::cat(
                    &[
                        &unet.forward(&model_input, t, u, added_uncond.as_ref())?,
                        &unet.forward(&model_input, t, &cond, added_cond.as_ref())?,
                    ],
                    0,
                )?,
                (None, None) => unet.forward(&model_input, t, &cond, added_cond.as_ref())?,
            };
            let at = || {
                format!(
                    "step {} of {} (timestep {t})",
                    i + 1 - begin,
                    timesteps.len() - begin
                )
            };
            if !all_finite(&noise_pred)? {
                bail!(
                    "the U-Net's output holds NaN or infinity at {} (are its weights finite{}?)",
                    at(),
                    self.overflow_hint()
                );
            }
            let noise_pred = if uncond.is_some() {
                let u = noise_pred.narrow(0, 0, n)?;
                let c = noise_pred.narrow(0, n, n)?;
                (&u + ((c - &u)? * r.guidance)?)?
            } else {
                noise_pred
            };
            if !all_finite(&noise_pred)? {
                bail!(
                    "guidance {:e} takes the prediction past the range of numbers at {}: choose a smaller --guidance",
                    r.guidance,
                    at()
                );
            }
            let mut noise = NoiseSource {
                generators: &mut generators,
                seeds: &r.seeds[first..first + n],
                rng: r.rng,
            };
            latents = scheduler.step(&noise_pred, i, &latents, &mut noise)?;
            if let Some(Inpaint {
                mask,
                blend: Some((clean, start_noise)),
                ..
            }) = &inpaint
            {
                // the kept part: the picture, noised to the next timestep (clean at the end)
                let kept = if i + 1 < timesteps.len() {
                    scheduler.noise_level(i + 1).add_noise(clean, start_noise)?
                } else {
                    clean.clone()
                };
                latents = (kept.broadcast_mul(&(1.0 - mask)?)? + latents.broadcast_mul(mask)?)?;
            }
            if !all_finite(&latents)? {
                bail!(
                    "the latents hold NaN or infinity after {}: the scheduler's config (betas, sigmas) or the guidance put them out of range",
                    at()
                );
            }
            crate::interrupt::check()?;
            on_step(i + 1 - begin, timesteps.len() - begin)?;
        }
        Ok(latents)
    }
}

/// An error when the tokenizer has ids the text encoder's embedding lacks.
fn check_tokenizer(
    tok: &ClipTokenizer,
    config: &ClipTextConfig,
    dir: &Path,
    config_path: &Path,
) -> Result<()> {
    if tok.max_id as usize >= config.vocab_size {
        bail!(
            "{}: the tokenizer has ids up to {}, past the text encoder's vocab_size {} ({})",
            dir.display(),
            tok.max_id,
            config.vocab_size,
            config_path.display()
        );
    }
    Ok(())
}

/// An error when the text encoders' outputs do not fit the U-Net: the hidden sizes (summed for
/// SDXL's two) against `cross_attention_dim`, and for SDXL the pooling encoder's projection
/// (the second; the refiner's one) against the pooled width of the added conditioning with
/// its 6 size numbers (5 for the refiner: the aesthetic score replaces the target size).
fn check_text_fits_unet(
    first: &ClipTextConfig,
    second: Option<&ClipTextConfig>,
    unet: &UNetConfig,
    family: Family,
    refiner: bool,
) -> Result<()> {
    let hidden = first.hidden_size + second.map_or(0, |c| c.hidden_size);
    if hidden != unet.cross_attention_dim {
        bail!(
            "the text encoders' hidden size {hidden} does not match the U-Net's cross_attention_dim {}",
            unet.cross_attention_dim
        );
    }
    let pooling = match family {
        Family::Sd => None,
        Family::Sdxl => Some(second.unwrap_or(first)),
    };
    let ids = if refiner { 5 } else { 6 };
    match (unet.text_time()?, pooling) {
        (None, None) => Ok(()),
        (Some(t), Some(c)) if c.projection_dim.is_some() && c.projection_dim == t.pooled_dim(ids) => {
            Ok(())
        }
        (Some(t), Some(c)) => bail!(
            "the pooling text encoder's projection_dim {:?} does not match the U-Net's pooled width {:?} (projection_class_embeddings_input_dim - {ids} x addition_time_embed_dim)",
            c.projection_dim,
            t.pooled_dim(ids)
        ),
        (Some(_), None) => {
            bail!("the U-Net takes SDXL's added conditioning, but model_index.json names a one-encoder pipeline")
        }
        (None, Some(_)) => {
            bail!("model_index.json names an SDXL pipeline, but the U-Net has no addition_embed_type text_time")
        }
    }
}

/// Whether every value of `t` is a finite number (x - x is 0 for those, NaN otherwise): a
/// NaN or infinity would otherwise end as a black image and exit 0.
fn all_finite(t: &Tensor) -> Result<bool> {
    let s = (t - t)?
        .sum_all()?
        .to_dtype(DType::F32)?
        .to_scalar::<f32>()?;
    Ok(s == 0.0)
}

/// (3, H, W) in [0, 1] to RGB8 with diffusers' `(x * 255).round()`.
pub fn to_rgb8(img: &Tensor) -> Result<Vec<u8>> {
    let (c, h, w) = img.dims3()?;
    if c != 3 {
        bail!("the VAE produced {c} channels, expected 3");
    }
    let data: Vec<f32> = img
        .to_dtype(DType::F32)?
        .permute((1, 2, 0))?
        .flatten_all()?
        .to_vec1()?;
    debug_assert_eq!(data.len(), h * w * 3);
    Ok(data
        .iter()
        .map(|v| (v * 255.0).round_ties_even().clamp(0.0, 255.0) as u8)
        .collect())
}
