//! The diffusers config files (`model_index.json`, `unet/config.json`, `vae/config.json`,
//! `text_encoder/config.json`) as plain structs, with the checks that turn a config this
//! pipeline cannot run into an error naming the field.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

/// Reads a config file as Python's `json` module writes it: `NaN`, `Infinity` and `-Infinity`
/// (which saved scheduler configs hold, e.g. `"lambda_min_clipped": -Infinity`) become the
/// strings `"NaN"`, `"Infinity"`, `"-Infinity"`, which [`py_f64`] reads as numbers.
pub fn read_json(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&python_literals_quoted(&text))
        .with_context(|| format!("{} is not valid JSON", path.display()))
}

/// `text` with Python's non-standard number literals outside strings put in quotes.
fn python_literals_quoted(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains("NaN") && !text.contains("Infinity") {
        return text.into();
    }
    let mut out = String::with_capacity(text.len() + 16);
    let (mut in_string, mut escaped) = (false, false);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            in_string = escaped || c != '"';
            escaped = !escaped && c == '\\';
        } else if c == '"' {
            in_string = true;
        } else if let Some(lit) = ["NaN", "Infinity", "-Infinity"]
            .into_iter()
            .find(|l| rest.starts_with(l))
        {
            out.push('"');
            out.push_str(lit);
            out.push('"');
            rest = &rest[lit.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out.into()
}

/// A number as Python writes it: a JSON number or one of the literals [`read_json`] quoted.
pub fn py_f64(v: &Value) -> Option<f64> {
    match v {
        Value::String(s) => match s.as_str() {
            "NaN" => Some(f64::NAN),
            "Infinity" => Some(f64::INFINITY),
            "-Infinity" => Some(f64::NEG_INFINITY),
            _ => None,
        },
        v => v.as_f64(),
    }
}

/// Deserializes a config struct, an error naming the key whose value does not fit.
fn parse<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let v = read_json(path)?;
    serde_path_to_error::deserialize(v)
        .map_err(|e| anyhow::anyhow!("{}: key {}: {}", path.display(), e.path(), e.inner()))
}

/// A boolean key: `null` reads as false, as diffusers' truth tests read the `None` it passes
/// on (re-saves by diffusers 0.17-0.27 hold `"upcast_attention": null` and the like).
fn null_is_false<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(false))
}

/// A float key, also as Python's `NaN` / `Infinity` / `-Infinity`.
fn float<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    let v = Value::deserialize(d)?;
    py_f64(&v).ok_or_else(|| serde::de::Error::custom(format!("expected a number, found {v}")))
}

/// An optional float key (`null` = none), as [`float`] reads it.
fn float_opt<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<f64>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        v => float(v).map(Some).map_err(serde::de::Error::custom),
    }
}

/// An error naming the first of `keys` whose value is 0.
fn check_positive(keys: &[(&str, usize)]) -> Result<()> {
    match keys.iter().find(|(_, v)| *v == 0) {
        Some((key, _)) => bail!("{key} is 0"),
        None => Ok(()),
    }
}

/// `attention_head_dim` / `num_attention_heads` may be one number for every block or a list
/// with one entry per block; an entry of `transformer_layers_per_block` /
/// `reverse_transformer_layers_per_block` one count for every layer of its block or a count
/// per layer (distilled SDXL U-Nets).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    /// The `n` values: the one number `n` times, or the list when it has `n` entries.
    fn values(&self, n: usize) -> Option<Vec<usize>> {
        match self {
            PerBlock::One(v) => Some(vec![*v; n]),
            PerBlock::Each(v) => (v.len() == n).then(|| v.clone()),
        }
    }

    /// How many values the list holds (1 for one number), for messages.
    fn len(&self) -> usize {
        match self {
            PerBlock::One(_) => 1,
            PerBlock::Each(v) => v.len(),
        }
    }

    pub fn expand(&self, n: usize, field: &str) -> Result<Vec<usize>> {
        self.values(n).with_context(|| {
            format!(
                "unet config: {field} has {} entries but there are {n} blocks",
                self.len()
            )
        })
    }

    /// The transformer counts of block `block`'s `layers` layers.
    fn per_layer(&self, layers: usize, field: &str, block: usize) -> Result<Vec<usize>> {
        self.values(layers).with_context(|| {
            format!(
                "unet config: {field}[{block}] has {} counts but the block has {layers} layers",
                self.len()
            )
        })
    }
}

/// `transformer_layers_per_block`: one count, or one [`PerBlock`] per block (a list of counts
/// per layer inside it is how distilled SDXL U-Nets are described).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Depths {
    One(usize),
    Each(Vec<PerBlock>),
}

/// The transformer layers of every attention of a U-Net, as diffusers builds them: per down
/// block (one count per layer), the mid block, per up block (layers + 1 counts each).
#[derive(Debug, Clone, PartialEq)]
pub struct TransformerDepths {
    pub down: Vec<Vec<usize>>,
    pub mid: usize,
    pub up: Vec<Vec<usize>>,
}

fn default_true() -> bool {
    true
}
fn default_silu() -> String {
    "silu".into()
}
fn default_groups() -> usize {
    32
}
fn default_eps() -> f64 {
    1e-5
}
fn default_one() -> f64 {
    1.0
}
fn default_one_usize() -> usize {
    1
}
fn default_layers() -> usize {
    2
}
fn default_four() -> usize {
    4
}
fn default_three() -> usize {
    3
}
fn default_default() -> String {
    "default".into()
}
fn default_positional() -> String {
    "positional".into()
}
fn default_mid() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}

/// `sample_size`: one number for a square, or `[height, width]`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum SampleSize {
    Square(usize),
    HeightWidth([usize; 2]),
}

impl SampleSize {
    /// (height, width) in latent pixels.
    pub fn height_width(self) -> (usize, usize) {
        match self {
            SampleSize::Square(s) => (s, s),
            SampleSize::HeightWidth([h, w]) => (h, w),
        }
    }
}

/// `unet/config.json` of a `UNet2DConditionModel`.
#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfig {
    #[serde(rename = "_diffusers_version", default)]
    pub diffusers_version: Option<String>,
    #[serde(default)]
    pub sample_size: Option<SampleSize>,
    #[serde(default = "default_four")]
    pub in_channels: usize,
    #[serde(default = "default_four")]
    pub out_channels: usize,
    #[serde(default, deserialize_with = "null_is_false")]
    pub center_input_sample: bool,
    #[serde(default = "default_true", deserialize_with = "null_is_false")]
    pub flip_sin_to_cos: bool,
    #[serde(default, deserialize_with = "float")]
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    #[serde(default = "default_mid")]
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    #[serde(default)]
    pub only_cross_attention: Value,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_layers")]
    pub layers_per_block: usize,
    #[serde(default = "default_one_usize")]
    pub downsample_padding: usize,
    #[serde(default = "default_one", deserialize_with = "float")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "default_silu")]
    pub act_fn: String,
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_eps", deserialize_with = "float")]
    pub norm_eps: f64,
    pub cross_attention_dim: usize,
    #[serde(default)]
    pub transformer_layers_per_block: Option<Depths>,
    /// The up blocks' counts when they are not the down blocks' reversed (SSD-1B's
    /// asymmetric U-Net); needed when `transformer_layers_per_block` has per-layer counts.
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<Vec<PerBlock>>,
    #[serde(default)]
    pub attention_head_dim: Option<PerBlock>,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    #[serde(default, deserialize_with = "null_is_false")]
    pub dual_cross_attention: bool,
    #[serde(default, deserialize_with = "null_is_false")]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default, deserialize_with = "null_is_false")]
    pub upcast_attention: bool,
    #[serde(default = "default_default")]
    pub resnet_time_scale_shift: String,
    #[serde(default = "default_positional")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default = "default_three")]
    pub conv_in_kernel: usize,
    #[serde(default = "default_three")]
    pub conv_out_kernel: usize,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    /// SDXL's `text_time`: the width of each size number's sinusoidal embedding (256).
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    /// SDXL's `text_time`: the pooled text embedding and the six size embeddings, concatenated
    /// (2816 = 1280 + 6 x 256).
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
}

/// SDXL's added conditioning (`addition_embed_type: "text_time"`): the widths it needs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TextTime {
    /// Each of the size numbers' sinusoidal embedding width.
    pub time_embed_dim: usize,
    /// The input of `add_embedding`: the pooled text embedding plus `time_embed_dim` for each
    /// of the pipeline's `add_time_ids` (6; 5 for the refiner).
    pub input_dim: usize,
}

impl TextTime {
    /// The pooled text embedding's width this U-Net expects with `time_ids` numbers (`None`
    /// when they leave no room for it).
    pub fn pooled_dim(&self, time_ids: usize) -> Option<usize> {
        self.input_dim
            .checked_sub(time_ids * self.time_embed_dim)
            .filter(|&d| d > 0)
    }
}

/// What one down (and its mirrored up) block holds, resolved from the per-block fields.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UNetBlock {
    pub out_channels: usize,
    /// `Some(layers)` for a CrossAttn block with that many transformer layers.
    pub cross_attention: Option<usize>,
    pub num_heads: usize,
}

impl UNetConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let mut c: Self = parse(path)?;
        c.fix_legacy_sample_size();
        c.validate()
            .with_context(|| format!("{}: this U-Net cannot be run by sdgen", path.display()))?;
        Ok(c)
    }

    /// What `StableDiffusionPipeline.__init__` does to configs written before diffusers 0.9:
    /// a square `sample_size` below 64 becomes 64 (those configs said 32 for a 512 model).
    fn fix_legacy_sample_size(&mut self) {
        let before_0_9 = self.diffusers_version.as_deref().is_some_and(|v| {
            let mut parts = v.split('.').map(|p| {
                let digits: String = p.chars().take_while(char::is_ascii_digit).collect();
                digits.parse::<u64>().unwrap_or(0)
            });
            let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
            (major, minor) < (0, 9)
        });
        if let Some(SampleSize::Square(s)) = self.sample_size {
            if before_0_9 && s < 64 {
                self.sample_size = Some(SampleSize::Square(64));
            }
        }
    }

    fn validate(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 {
            bail!("block_out_channels is empty");
        }
        check_positive(&[
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("layers_per_block", self.layers_per_block),
            ("norm_num_groups", self.norm_num_groups),
            ("cross_attention_dim", self.cross_attention_dim),
        ])?;
        if self.block_out_channels.contains(&0) {
            bail!("block_out_channels holds 0");
        }
        if let Some(size) = self.sample_size {
            let (h, w) = size.height_width();
            if !(1..=1024).contains(&h) || !(1..=1024).contains(&w) {
                bail!("sample_size {h}x{w} is outside 1..=1024 (latent pixels; SD 1.5 says 64)");
            }
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            bail!("down_block_types/up_block_types must have one entry per block_out_channels");
        }
        for (i, t) in self.down_block_types.iter().enumerate() {
            let up = &self.up_block_types[n - 1 - i];
            let ok = matches!(
                (t.as_str(), up.as_str()),
                ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D") | ("DownBlock2D", "UpBlock2D")
            );
            if !ok {
                bail!("unsupported block pair down_block_types[{i}]={t} / up_block_types[{}]={up} (supported: CrossAttnDownBlock2D/CrossAttnUpBlock2D, DownBlock2D/UpBlock2D)", n - 1 - i);
            }
        }
        match self.mid_block_type.as_deref() {
            // None: no mid block (BK-SDM's block-removed U-Nets)
            Some("UNetMidBlock2DCrossAttn") | None => {}
            Some(other) => {
                bail!(
                    "unsupported mid_block_type {other} (supported: UNetMidBlock2DCrossAttn, null)"
                )
            }
        }
        match &self.only_cross_attention {
            Value::Null | Value::Bool(false) => {}
            Value::Array(a) if a.iter().all(|v| v == &Value::Bool(false)) => {}
            v => bail!("unsupported only_cross_attention={v}"),
        }
        if self.act_fn != "silu" {
            bail!("unsupported act_fn={} (supported: silu)", self.act_fn);
        }
        if self.dual_cross_attention {
            bail!("unsupported dual_cross_attention=true");
        }
        if let Some(t) = &self.class_embed_type {
            bail!("unsupported class_embed_type={t}");
        }
        self.text_time()?;
        if self.resnet_time_scale_shift != "default" {
            bail!(
                "unsupported resnet_time_scale_shift={}",
                self.resnet_time_scale_shift
            );
        }
        if self.time_embedding_type != "positional" {
            bail!(
                "unsupported time_embedding_type={}",
                self.time_embedding_type
            );
        }
        if self.time_cond_proj_dim.is_some() {
            bail!("unsupported time_cond_proj_dim (LCM-distilled U-Nets are not supported)");
        }
        if self.encoder_hid_dim.is_some() {
            bail!("unsupported encoder_hid_dim");
        }
        if self.conv_in_kernel != 3 || self.conv_out_kernel != 3 {
            bail!("unsupported conv_in_kernel/conv_out_kernel (only 3 is supported)");
        }
        // inpainting U-Nets take 9 channels (latents, mask, masked picture) and give 4
        if self.in_channels != self.out_channels && self.in_channels != self.out_channels * 2 + 1 {
            bail!(
                "in_channels={} and out_channels={}: neither a text-to-image nor an inpainting U-Net",
                self.in_channels,
                self.out_channels
            );
        }
        let blocks = self.blocks()?;
        for (i, b) in blocks.iter().enumerate() {
            if b.num_heads == 0 {
                bail!("block {i} has 0 attention heads (attention_head_dim / num_attention_heads)");
            }
            if b.cross_attention == Some(0) {
                bail!("block {i} has 0 transformer layers (transformer_layers_per_block)");
            }
            if b.out_channels % b.num_heads != 0 {
                bail!("block {i}: {} channels are not divisible by {} attention heads (attention_head_dim)", b.out_channels, b.num_heads);
            }
            if b.out_channels % self.norm_num_groups != 0 {
                bail!(
                    "block {i}: {} channels are not divisible by norm_num_groups={}",
                    b.out_channels,
                    self.norm_num_groups
                );
            }
        }
        Ok(())
    }

    /// The `text_time` added conditioning of an SDXL U-Net (`None`: no added conditioning).
    pub fn text_time(&self) -> Result<Option<TextTime>> {
        match self.addition_embed_type.as_deref() {
            None => Ok(None),
            Some("text_time") => {
                let (Some(time_embed_dim), Some(input_dim)) = (
                    self.addition_time_embed_dim,
                    self.projection_class_embeddings_input_dim,
                ) else {
                    bail!("addition_embed_type=text_time needs addition_time_embed_dim and projection_class_embeddings_input_dim");
                };
                if time_embed_dim == 0 || time_embed_dim % 2 != 0 || input_dim <= 6 * time_embed_dim
                {
                    bail!("addition_time_embed_dim={time_embed_dim} and projection_class_embeddings_input_dim={input_dim} leave no room for the pooled text embedding (it needs more than 6 x addition_time_embed_dim, an even number)");
                }
                Ok(Some(TextTime {
                    time_embed_dim,
                    input_dim,
                }))
            }
            Some(t) => bail!("unsupported addition_embed_type={t} (supported: text_time, SDXL's)"),
        }
    }

    /// Per-block settings. Like diffusers, `num_attention_heads` falls back to the
    /// (misnamed) `attention_head_dim`, which in SD 1.x/2.x configs is the number of heads.
    pub fn blocks(&self) -> Result<Vec<UNetBlock>> {
        let n = self.block_out_channels.len();
        let heads = match (&self.num_attention_heads, &self.attention_head_dim) {
            (Some(h), _) => h.expand(n, "num_attention_heads")?,
            (None, Some(h)) => h.expand(n, "attention_head_dim")?,
            (None, None) => vec![8; n],
        };
        let depths = self.transformer_depths()?;
        Ok((0..n)
            .map(|i| UNetBlock {
                out_channels: self.block_out_channels[i],
                cross_attention: (self.down_block_types[i] == "CrossAttnDownBlock2D")
                    .then(|| depths.down[i].iter().copied().max().unwrap_or(1)),
                num_heads: heads[i],
            })
            .collect())
    }

    /// The transformer layers of each attention, as diffusers' `UNet2DConditionModel` reads
    /// `transformer_layers_per_block` (one count; or per block one count or a count per layer;
    /// the mid block takes the last block's, its first count) and
    /// `reverse_transformer_layers_per_block` (the up blocks'; else the down blocks' reversed,
    /// which diffusers refuses when they have per-layer counts).
    pub fn transformer_depths(&self) -> Result<TransformerDepths> {
        let n = self.block_out_channels.len();
        let field = "transformer_layers_per_block";
        let per_block: Vec<PerBlock> = match &self.transformer_layers_per_block {
            None => vec![PerBlock::One(1); n],
            Some(Depths::One(v)) => vec![PerBlock::One(*v); n],
            Some(Depths::Each(v)) if v.len() == n => v.clone(),
            Some(Depths::Each(v)) => bail!(
                "unet config: {field} has {} entries but there are {n} blocks",
                v.len()
            ),
        };
        let lpb = self.layers_per_block;
        let down = per_block
            .iter()
            .enumerate()
            .map(|(i, d)| d.per_layer(lpb, field, i))
            .collect::<Result<Vec<_>>>()?;
        // the mid block (one layer) takes the last block's count, or its first per-layer one
        let mid = match &per_block[n - 1] {
            PerBlock::One(v) => *v,
            PerBlock::Each(v) => *v
                .first()
                .with_context(|| format!("unet config: {field}[{}] is empty", n - 1))?,
        };
        let up = match &self.reverse_transformer_layers_per_block {
            Some(r) if r.len() != n => bail!(
                "unet config: reverse_transformer_layers_per_block has {} entries but there are {n} blocks",
                r.len()
            ),
            Some(r) => r
                .iter()
                .enumerate()
                .map(|(i, d)| d.per_layer(lpb + 1, "reverse_transformer_layers_per_block", i))
                .collect::<Result<Vec<_>>>()?,
            None => {
                if per_block.iter().any(|d| matches!(d, PerBlock::Each(_))) {
                    bail!("unet config: {field} has per-layer counts but there is no reverse_transformer_layers_per_block for the up blocks (diffusers refuses such a config too)");
                }
                per_block
                    .iter()
                    .rev()
                    .enumerate()
                    .map(|(i, d)| d.per_layer(lpb + 1, field, n - 1 - i))
                    .collect::<Result<Vec<_>>>()?
            }
        };
        Ok(TransformerDepths { down, mid, up })
    }
}

fn default_scaling() -> f64 {
    0.18215
}

/// `vae/config.json` of an `AutoencoderKL`.
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    /// The picture size the VAE was trained at (diffusers' tile size with tiling; its first
    /// number for a list).
    #[serde(default)]
    pub sample_size: Option<SampleSize>,
    #[serde(default = "default_three")]
    pub in_channels: usize,
    #[serde(default = "default_three")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_one_usize")]
    pub layers_per_block: usize,
    #[serde(default = "default_four")]
    pub latent_channels: usize,
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_scaling", deserialize_with = "float")]
    pub scaling_factor: f64,
    #[serde(default, deserialize_with = "float_opt")]
    pub shift_factor: Option<f64>,
    #[serde(default = "default_silu")]
    pub act_fn: String,
    #[serde(default)]
    pub up_block_types: Vec<String>,
    #[serde(default = "default_true", deserialize_with = "null_is_false")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true", deserialize_with = "null_is_false")]
    pub use_post_quant_conv: bool,
    #[serde(default = "default_true", deserialize_with = "null_is_false")]
    pub mid_block_add_attention: bool,
    /// Whether the VAE must run in float32 when the model runs in half precision (SDXL's VAE
    /// overflows in f16): diffusers' `force_upcast`, true unless the config says otherwise.
    #[serde(default = "default_true", deserialize_with = "null_is_false")]
    pub force_upcast: bool,
    /// Per-channel latent statistics (some newer VAEs); SD's and SDXL's hold none.
    #[serde(default)]
    pub latents_mean: Option<Value>,
    #[serde(default)]
    pub latents_std: Option<Value>,
}

impl VaeConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let c: Self = parse(path)?;
        let bad = |why: String| -> Result<Self> {
            bail!("{}: this VAE cannot be run by sdgen: {why}", path.display())
        };
        if c.act_fn != "silu" {
            return bad(format!("unsupported act_fn={}", c.act_fn));
        }
        if let Some(t) = c.up_block_types.iter().find(|t| *t != "UpDecoderBlock2D") {
            return bad(format!("unsupported up_block_types entry {t}"));
        }
        if !c.mid_block_add_attention {
            return bad("unsupported mid_block_add_attention=false".into());
        }
        if c.shift_factor.is_some_and(|s| s != 0.0) {
            return bad("unsupported shift_factor".into());
        }
        if c.latents_mean.is_some() || c.latents_std.is_some() {
            return bad("unsupported latents_mean / latents_std".into());
        }
        if c.block_out_channels.is_empty() {
            return bad("block_out_channels is empty".into());
        }
        if let Err(e) = check_positive(&[
            ("layers_per_block", c.layers_per_block),
            ("latent_channels", c.latent_channels),
            ("norm_num_groups", c.norm_num_groups),
        ]) {
            return bad(e.to_string());
        }
        if let Some(ch) = c
            .block_out_channels
            .iter()
            .find(|&&ch| ch == 0 || ch % c.norm_num_groups != 0)
        {
            return bad(format!("{ch} channels (block_out_channels) are not a positive multiple of norm_num_groups={}", c.norm_num_groups));
        }
        if c.block_out_channels.len() > 6 {
            return bad(format!(
                "{} blocks (block_out_channels): SD VAEs have 4",
                c.block_out_channels.len()
            ));
        }
        if c.in_channels != 3 || c.out_channels != 3 {
            return bad(format!(
                "in_channels={} / out_channels={}: an RGB VAE has 3",
                c.in_channels, c.out_channels
            ));
        }
        if !c.scaling_factor.is_finite() || c.scaling_factor == 0.0 {
            return bad(format!(
                "scaling_factor={} (latents are divided by it)",
                c.scaling_factor
            ));
        }
        Ok(c)
    }

    /// 2^(number of blocks - 1): 8 for every SD 1.x/2.x VAE.
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

fn default_act() -> String {
    "quick_gelu".into()
}
fn default_ln_eps() -> f64 {
    1e-5
}
fn default_max_pos() -> usize {
    77
}
fn default_eos() -> i64 {
    49407
}

/// `eos_token_id` as transformers 5 allows it: a number, a list (its first entry counts), or
/// null (the default).
fn eos_id<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<i64, D::Error> {
    let v = Value::deserialize(d)?;
    let first = match &v {
        Value::Array(a) => a.first(),
        v => Some(v),
    };
    match first {
        None | Some(Value::Null) => Ok(default_eos()),
        Some(n) => n.as_i64().ok_or_else(|| {
            serde::de::Error::custom(format!("expected a token id or a list of them, found {v}"))
        }),
    }
}

/// `text_encoder/config.json` of a transformers `CLIPTextModel`.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_ln_eps", deserialize_with = "float")]
    pub layer_norm_eps: f64,
    /// The width of `CLIPTextModelWithProjection`'s `text_projection` (SDXL's second encoder).
    #[serde(default)]
    pub projection_dim: Option<usize>,
    /// Where the pooled output is taken: 2 (older configs, SDXL's) means at the largest id, as
    /// transformers still reads it; another id, at its first occurrence.
    #[serde(default = "default_eos", deserialize_with = "eos_id")]
    pub eos_token_id: i64,
}

impl ClipTextConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let c: Self = parse(path)?;
        if !matches!(c.hidden_act.as_str(), "quick_gelu" | "gelu") {
            bail!(
                "{}: unsupported hidden_act={} (supported: quick_gelu, gelu)",
                path.display(),
                c.hidden_act
            );
        }
        check_positive(&[
            ("vocab_size", c.vocab_size),
            ("hidden_size", c.hidden_size),
            ("intermediate_size", c.intermediate_size),
            ("num_hidden_layers", c.num_hidden_layers),
            ("num_attention_heads", c.num_attention_heads),
        ])
        .with_context(|| format!("{}", path.display()))?;
        if c.max_position_embeddings < 77 {
            bail!(
                "{}: max_position_embeddings={} is shorter than the 77 tokens of a prompt",
                path.display(),
                c.max_position_embeddings
            );
        }
        if c.hidden_size % c.num_attention_heads != 0 {
            bail!(
                "{}: hidden_size is not divisible by num_attention_heads",
                path.display()
            );
        }
        Ok(c)
    }
}

/// The pipeline family a `model_index.json` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// SD 1.x / 2.x (`StableDiffusionPipeline` and its siblings): one text encoder.
    Sd,
    /// SDXL (`StableDiffusionXLPipeline`): two text encoders and the size conditioning.
    Sdxl,
}

/// `model_index.json`, checked to name a pipeline sdgen runs: its family, its scheduler's
/// class, and SDXL's `force_zeros_for_empty_prompt`.
#[derive(Debug, Clone)]
pub struct ModelIndex {
    pub family: Family,
    pub scheduler_class: Option<String>,
    /// SDXL: with no negative prompt, the unconditional half is zeros rather than the
    /// encoding of "" (true unless the file says otherwise, as diffusers' default).
    pub force_zeros_for_empty_prompt: bool,
    /// SDXL's `requires_aesthetics_score` (the refiner): the added conditioning ends with an
    /// aesthetic score instead of the target size.
    pub aesthetic_score: bool,
}

impl ModelIndex {
    pub const SUPPORTED: &'static [&'static str] = &[
        "StableDiffusionPipeline",
        "StableDiffusionImg2ImgPipeline",
        "StableDiffusionInpaintPipeline",
        "AltDiffusionPipeline",
    ];
    pub const SUPPORTED_XL: &'static [&'static str] = &[
        "StableDiffusionXLPipeline",
        "StableDiffusionXLImg2ImgPipeline",
        "StableDiffusionXLInpaintPipeline",
    ];

    pub fn load(path: &Path) -> Result<Self> {
        let v = read_json(path)?;
        let class_name = v
            .get("_class_name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let family = if Self::SUPPORTED.contains(&class_name.as_str()) {
            Family::Sd
        } else if Self::SUPPORTED_XL.contains(&class_name.as_str()) {
            Family::Sdxl
        } else {
            bail!(
                "{}: the model is a {:?}, not a Stable Diffusion 1.x/2.x or SDXL pipeline (expected StableDiffusionPipeline or StableDiffusionXLPipeline)",
                path.display(),
                class_name
            );
        };
        let scheduler_class = v
            .get("scheduler")
            .and_then(|s| s.get(1))
            .and_then(Value::as_str)
            .map(str::to_string);
        let force_zeros_for_empty_prompt = v
            .get("force_zeros_for_empty_prompt")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        let aesthetic_score = family == Family::Sdxl
            && v.get("requires_aesthetics_score").and_then(Value::as_bool) == Some(true);
        Ok(Self {
            family,
            scheduler_class,
            force_zeros_for_empty_prompt,
            aesthetic_score,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn depths(extra: Value) -> Result<TransformerDepths> {
        let mut v = serde_json::json!({"in_channels": 4, "out_channels": 4,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "block_out_channels": [320, 640, 1280], "layers_per_block": 2,
            "cross_attention_dim": 2048});
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::from_value::<UNetConfig>(v)?.transformer_depths()
    }

    /// diffusers' reading of `transformer_layers_per_block` and
    /// `reverse_transformer_layers_per_block`.
    #[test]
    fn transformer_depths_per_block_and_per_layer() {
        // SDXL base: one count per block, the up blocks reversed, the mid block the last one's
        let d = depths(serde_json::json!({"transformer_layers_per_block": [1, 2, 10]})).unwrap();
        assert_eq!(d.down, vec![vec![1, 1], vec![2, 2], vec![10, 10]]);
        assert_eq!(d.mid, 10);
        assert_eq!(d.up, vec![vec![10; 3], vec![2; 3], vec![1; 3]]);
        // per-layer counts with the up blocks' own (mid: the last block's first count)
        let d = depths(serde_json::json!({
            "transformer_layers_per_block": [1, [2, 1], [4, 10]],
            "reverse_transformer_layers_per_block": [[4, 4, 10], [2, 1, 1], 1]}))
        .unwrap();
        assert_eq!(d.down, vec![vec![1, 1], vec![2, 1], vec![4, 10]]);
        assert_eq!(d.mid, 4);
        assert_eq!(d.up, vec![vec![4, 4, 10], vec![2, 1, 1], vec![1, 1, 1]]);
        // per-layer counts without the up blocks' (diffusers refuses it), wrong lengths
        for bad in [
            serde_json::json!({"transformer_layers_per_block": [1, [2, 1], 3]}),
            serde_json::json!({"transformer_layers_per_block": [1, [2, 1, 1], 3],
                "reverse_transformer_layers_per_block": [3, 1, 1]}),
            serde_json::json!({"transformer_layers_per_block": [1, 2],
                "reverse_transformer_layers_per_block": [3, 1, 1]}),
            serde_json::json!({"transformer_layers_per_block": 1,
                "reverse_transformer_layers_per_block": [[3, 1], 1, 1]}),
        ] {
            assert!(depths(bad.clone()).is_err(), "{bad}");
        }
    }

    /// model_index.json files shaped as the Hub's SDXL inpainting model (9-channel U-Net,
    /// no aesthetic score) and SDXL refiner (aesthetic score, no first text encoder) have them.
    #[test]
    fn sdxl_inpainting_and_refiner_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model_index.json");
        let inpainting = serde_json::json!({
            "_class_name": "StableDiffusionXLInpaintPipeline",
            "_diffusers_version": "0.21.0.dev0",
            "force_zeros_for_empty_prompt": true,
            "requires_aesthetics_score": false,
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "unet": ["diffusers", "UNet2DConditionModel"],
        });
        std::fs::write(&path, inpainting.to_string()).unwrap();
        let index = ModelIndex::load(&path).unwrap();
        assert_eq!((index.family, index.aesthetic_score), (Family::Sdxl, false));
        let refiner = serde_json::json!({
            "_class_name": "StableDiffusionXLImg2ImgPipeline",
            "force_zeros_for_empty_prompt": false,
            "requires_aesthetics_score": true,
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "text_encoder": [null, null],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        });
        std::fs::write(&path, refiner.to_string()).unwrap();
        let index = ModelIndex::load(&path).unwrap();
        assert!(index.aesthetic_score && !index.force_zeros_for_empty_prompt);
    }

    fn clip(extra: Value) -> std::result::Result<ClipTextConfig, serde_json::Error> {
        let mut v = serde_json::json!({"vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2});
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::from_value(v)
    }

    /// `eos_token_id` in the forms transformers writes: a number, a list, null, absent.
    #[test]
    fn eos_token_id_forms() {
        let id = |extra| clip(extra).unwrap().eos_token_id;
        assert_eq!(id(serde_json::json!({"eos_token_id": 2})), 2);
        assert_eq!(id(serde_json::json!({"eos_token_id": [49407, 2]})), 49407);
        assert_eq!(id(serde_json::json!({"eos_token_id": null})), 49407);
        assert_eq!(id(serde_json::json!({})), 49407);
        assert!(clip(serde_json::json!({"eos_token_id": "x"})).is_err());
    }
}
