//! LoRAs (`--lora FILE[:SCALE]`, `<lora:NAME:W>`): low-rank updates merged into the weights as
//! each layer reads them, before the layer prepares (packs) them for its kernels. The result
//! is diffusers' `load_lora_weights` + `fuse_lora(lora_scale=SCALE)`:
//! `W + SCALE x alpha / rank x up @ down` for each adapted layer, the LoRAs' updates added up.
//! Only the update of one layer is in memory at a time, so peak memory does not grow beyond
//! the LoRA files' own tensors.
//!
//! Formats: kohya / the web UI (`lora_unet_*`, `lora_te_*` with `lora_down`, `lora_up` and
//! `alpha`, convolutions included as LoCon trains them) and diffusers / PEFT (`unet.*`,
//! `text_encoder.*` with `lora_A`/`lora_B`, or `lora.down`/`lora.up`; `alpha` keys or PEFT's
//! `lora_adapter_metadata` when present, else alpha = rank). Both name the layers of the
//! diffusers models, so a layer is found by its name with dots as underscores. SDXL LoRAs
//! name the second text encoder `lora_te2_` / `text_encoder_2.` (the first `lora_te1_`), and
//! kohya's SDXL LoRAs name the U-Net's layers as the original (SGM) U-Net does
//! (`input_blocks_4_1_...`): [`sgm_unet_key`] renames them as diffusers'
//! `_maybe_map_sgm_blocks_to_diffusers` does.

use super::embedding::few;
use crate::weights::TensorFile;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// One LoRA to apply, with its multipliers for the text encoder and the U-Net.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub path: PathBuf,
    pub te_scale: f64,
    pub unet_scale: f64,
}

impl LoraSpec {
    /// `FILE` or `FILE:SCALE` (the last `:` followed by a number).
    pub fn parse(arg: &str) -> Result<Self> {
        let (path, scale) = match arg.rsplit_once(':') {
            Some((p, s)) if !p.is_empty() && s.trim().parse::<f64>().is_ok() => {
                (p, s.trim().parse::<f64>()?)
            }
            _ => (arg, 1.0),
        };
        if !scale.is_finite() {
            bail!("--lora {arg}: the scale must be a finite number");
        }
        Ok(Self {
            path: PathBuf::from(path),
            te_scale: scale,
            unet_scale: scale,
        })
    }
}

/// The models a LoRA adapts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    TextEncoder,
    /// SDXL's second text encoder (OpenCLIP ViT-bigG).
    TextEncoder2,
    Unet,
}

impl Part {
    fn describe(self) -> &'static str {
        match self {
            Part::TextEncoder => "text encoder",
            Part::TextEncoder2 => "second text encoder",
            Part::Unet => "U-Net",
        }
    }
}

/// One LoRA's update of one layer: `scale x up @ down`.
struct Update {
    up: Tensor,
    down: Tensor,
    scale: f64,
    file: usize,
}

/// The updates of a set of LoRAs for one part, by layer, and which layers were read.
pub struct LoraPatch {
    part: Part,
    files: Vec<PathBuf>,
    layers: HashMap<String, Vec<Update>>,
    used: RefCell<HashSet<String>>,
}

/// The layer key of a weight name: without `.weight`, dots as underscores, and the text
/// encoder's `text_model` prefix dropped (kohya names keep it, transformers 5 drops it).
fn layer_key(part: Part, module: &str) -> String {
    let key = module.replace('.', "_");
    match part {
        Part::TextEncoder | Part::TextEncoder2 => {
            key.strip_prefix("text_model_").unwrap_or(&key).to_string()
        }
        Part::Unet => key,
    }
}

/// How a U-Net's layers are numbered in the original (SGM) naming: `layers_per_block` from
/// its config.
#[derive(Clone, Copy, Debug)]
pub struct UnetShape {
    pub layers_per_block: usize,
}

/// The diffusers layer key of a U-Net layer that kohya names as the original U-Net does
/// (`input_blocks_{i}_{j}_...`, `middle_block_{i}_...`, `output_blocks_{i}_{j}_...`, and
/// `time_embed`, `label_emb`, `out_2`), as diffusers' `_maybe_map_sgm_blocks_to_diffusers`
/// and `_convert_unet_lora_key` rename them: input block i >= 1 is down block (i - 1) / (L + 1),
/// layer (i - 1) % (L + 1) (L = layers per block; module 0 the resnet, 1 the attention, `op`
/// the downsampler); output block i is up block i / (L + 1), layer i % (L + 1) (module 2 the
/// upsampler); the middle block's 0, 1, 2 are resnet 0, the attention, resnet 1. `None` for a
/// key in diffusers' own naming.
fn sgm_unet_key(module: &str, shape: UnetShape) -> Option<String> {
    let step = shape.layers_per_block + 1;
    let direct = [
        ("input_blocks_0_0", "conv_in"),
        ("out_2", "conv_out"),
        ("time_embed_0", "time_embedding_linear_1"),
        ("time_embed_2", "time_embedding_linear_2"),
        ("label_emb_0_0", "add_embedding_linear_1"),
        ("label_emb_0_2", "add_embedding_linear_2"),
    ];
    if let Some((_, d)) = direct.iter().find(|(k, _)| *k == module) {
        return Some(d.to_string());
    }
    // "{i}_{rest}" -> (i, rest)
    let index = |s: &str| -> Option<(usize, String)> {
        let (i, rest) = s.split_once('_')?;
        Some((i.parse().ok()?, rest.to_string()))
    };
    // a resnet's layers: in_layers.2, out_layers.3, emb_layers.1, skip_connection
    let resnet = |rest: &str| -> String {
        [
            ("in_layers_2", "conv1"),
            ("out_layers_3", "conv2"),
            ("emb_layers_1", "time_emb_proj"),
            ("skip_connection", "conv_shortcut"),
        ]
        .iter()
        .find(|(k, _)| *k == rest)
        .map_or(rest.to_string(), |(_, d)| d.to_string())
    };
    if let Some(s) = module.strip_prefix("input_blocks_") {
        let (i, s) = index(s)?;
        let (j, rest) = index(s.as_str())?;
        let (block, layer) = ((i.checked_sub(1)?) / step, (i - 1) % step);
        return Some(match (j, rest.as_str()) {
            (0, "op") => format!("down_blocks_{block}_downsamplers_0_conv"),
            (0, _) => format!("down_blocks_{block}_resnets_{layer}_{}", resnet(&rest)),
            _ => format!("down_blocks_{block}_attentions_{layer}_{rest}"),
        });
    }
    if let Some(s) = module.strip_prefix("middle_block_") {
        let (i, rest) = index(s)?;
        return Some(match i {
            0 => format!("mid_block_resnets_0_{}", resnet(&rest)),
            1 => format!("mid_block_attentions_0_{rest}"),
            _ => format!("mid_block_resnets_1_{}", resnet(&rest)),
        });
    }
    if let Some(s) = module.strip_prefix("output_blocks_") {
        let (i, s) = index(s)?;
        let (j, rest) = index(s.as_str())?;
        let (block, layer) = (i / step, i % step);
        return Some(match j {
            0 => format!("up_blocks_{block}_resnets_{layer}_{}", resnet(&rest)),
            1 => format!("up_blocks_{block}_attentions_{layer}_{rest}"),
            _ => format!("up_blocks_{block}_upsamplers_0_{rest}"),
        });
    }
    None
}

/// Whether a kohya U-Net module name is in the original (SGM) naming.
fn is_sgm(module: &str) -> bool {
    ["input_blocks_", "middle_block_", "output_blocks_"]
        .iter()
        .any(|p| module.starts_with(p))
}

/// (part, layer key, what) of a tensor name in either format, kohya's SGM U-Net names
/// renamed for a U-Net of `shape`.
fn classify(name: &str, shape: UnetShape) -> Result<(Part, String, &'static str)> {
    const SUFFIXES: [(&str, &str); 7] = [
        (".lora_down.weight", "down"),
        (".lora_up.weight", "up"),
        (".lora_A.weight", "down"),
        (".lora_B.weight", "up"),
        (".lora.down.weight", "down"),
        (".lora.up.weight", "up"),
        (".alpha", "alpha"),
    ];
    let Some((stem, what)) = SUFFIXES
        .iter()
        .find_map(|(s, w)| name.strip_suffix(s).map(|stem| (stem, *w)))
    else {
        bail!(
            "{name} is not a LoRA tensor sdgen can apply (LyCORIS LoHa/LoKr, DoRA, biases and Tucker-decomposed convolutions are not supported)"
        );
    };
    let (part, module) = if let Some(m) = stem.strip_prefix("lora_unet_") {
        if let Some(key) = sgm_unet_key(m, shape) {
            return Ok((Part::Unet, key, what));
        }
        (Part::Unet, m)
    } else if let Some(m) = stem
        .strip_prefix("lora_te_")
        .or_else(|| stem.strip_prefix("lora_te1_"))
    {
        (Part::TextEncoder, m)
    } else if let Some(m) = stem.strip_prefix("lora_te2_") {
        (Part::TextEncoder2, m)
    } else if let Some(m) = stem.strip_prefix("unet.") {
        (Part::Unet, m)
    } else if let Some(m) = stem.strip_prefix("text_encoder.") {
        (Part::TextEncoder, m)
    } else if let Some(m) = stem.strip_prefix("text_encoder_2.") {
        (Part::TextEncoder2, m)
    } else {
        bail!("{name} names neither the U-Net nor a text encoder (lora_unet_/lora_te_/lora_te1_/lora_te2_ or unet./text_encoder./text_encoder_2.)");
    };
    Ok((part, layer_key(part, module), what))
}

/// PEFT's `lora_adapter_metadata` for one part: rank and alpha, default and per layer.
struct PeftConfig {
    alpha: Option<f64>,
    alpha_pattern: Vec<(String, f64)>,
    rslora: bool,
}

fn peft_config(file: &TensorFile, part: Part) -> Result<PeftConfig> {
    let prefix = match part {
        Part::Unet => "unet.",
        Part::TextEncoder => "text_encoder.",
        Part::TextEncoder2 => "text_encoder_2.",
    };
    let mut c = PeftConfig {
        alpha: None,
        alpha_pattern: Vec::new(),
        rslora: false,
    };
    let Some(raw) = file.metadata("lora_adapter_metadata") else {
        return Ok(c);
    };
    let meta: serde_json::Value =
        serde_json::from_str(raw).context("its lora_adapter_metadata is not JSON")?;
    let get = |k: &str| meta.get(format!("{prefix}{k}"));
    c.alpha = get("lora_alpha").and_then(serde_json::Value::as_f64);
    if let Some(p) = get("alpha_pattern").and_then(serde_json::Value::as_object) {
        for (k, v) in p {
            if let Some(a) = v.as_f64() {
                c.alpha_pattern.push((layer_key(part, k), a));
            }
        }
    }
    c.rslora = get("use_rslora").and_then(serde_json::Value::as_bool) == Some(true);
    if get("use_dora").and_then(serde_json::Value::as_bool) == Some(true) {
        bail!("it is a DoRA, which sdgen does not apply");
    }
    Ok(c)
}

impl LoraPatch {
    /// The updates `specs` make to `part` of a model whose U-Net has `shape`; `None` when
    /// they make none (every scale 0, or no LoRA has layers of this part).
    pub fn load(specs: &[LoraSpec], part: Part, shape: UnetShape) -> Result<Option<Self>> {
        let mut patch = Self {
            part,
            files: Vec::new(),
            layers: HashMap::new(),
            used: RefCell::new(HashSet::new()),
        };
        for (i, spec) in specs.iter().enumerate() {
            let scale = match part {
                Part::TextEncoder | Part::TextEncoder2 => spec.te_scale,
                Part::Unet => spec.unet_scale,
            };
            patch.files.push(spec.path.clone());
            if scale != 0.0 {
                patch
                    .add_file(&spec.path, scale, i, shape)
                    .with_context(|| format!("LoRA {}", spec.path.display()))?;
            }
        }
        Ok((!patch.layers.is_empty()).then_some(patch))
    }

    fn add_file(&mut self, path: &Path, scale: f64, index: usize, shape: UnetShape) -> Result<()> {
        let file = TensorFile::open(path)?;
        // diffusers: a file with U-Net layers in both namings keeps only the diffusers ones
        let unet_modules: Vec<&str> = file
            .names()
            .iter()
            .filter_map(|n| n.strip_prefix("lora_unet_"))
            .collect();
        let diffusers_named = |m: &&str| {
            ["down_blocks_", "mid_block_", "up_blocks_"]
                .iter()
                .any(|p| m.starts_with(p))
        };
        let skip_sgm =
            unet_modules.iter().any(|m| is_sgm(m)) && unet_modules.iter().any(diffusers_named);
        let mut downs = HashMap::new();
        let mut ups = HashMap::new();
        let mut alphas = HashMap::new();
        let mut any = false;
        for name in file.names() {
            if skip_sgm && name.strip_prefix("lora_unet_").is_some_and(is_sgm) {
                continue;
            }
            let (part, key, what) = classify(name, shape)?;
            any = true;
            if part != self.part {
                continue;
            }
            let t = file.read_f32(name)?;
            match what {
                "down" => {
                    downs.insert(key, (name.clone(), t));
                }
                "up" => {
                    ups.insert(key, (name.clone(), t));
                }
                _ => {
                    let a = t.flatten_all()?.to_vec1::<f32>()?;
                    let [a] = a.as_slice() else {
                        bail!("{name} holds {} values, not one", a.len());
                    };
                    alphas.insert(key, (name.clone(), *a as f64));
                }
            }
        }
        if !any {
            bail!("the file holds no tensors");
        }
        let peft = peft_config(&file, self.part)?;
        // diffusers: layers without an alpha take the most frequent one of the file
        let mut by_name: Vec<&(String, f64)> = alphas.values().collect();
        by_name.sort_by(|a, b| a.0.cmp(&b.0));
        let common_alpha = most_common(by_name.iter().map(|(_, a)| *a));
        for (key, (down_name, down)) in downs {
            let Some((_, up)) = ups.remove(&key) else {
                bail!("{down_name} has no matching up (lora_B) tensor");
            };
            let rank = down.dims()[0];
            if up.rank() < 2 || up.dims()[1] != rank || up.dims()[2..].iter().any(|&d| d != 1) {
                bail!(
                    "layer {key}: up {:?} and down {:?} do not make a rank-{rank} update",
                    up.dims(),
                    down.dims()
                );
            }
            let alpha = alphas
                .remove(&key)
                .map(|(_, a)| a)
                .or_else(|| {
                    peft.alpha_pattern
                        .iter()
                        .find(|(k, _)| key == *k || key.ends_with(&format!("_{k}")))
                        .map(|(_, a)| *a)
                })
                .or(common_alpha)
                .or(peft.alpha)
                .unwrap_or(rank as f64);
            let per_rank = if peft.rslora {
                alpha / (rank as f64).sqrt()
            } else {
                alpha / rank as f64
            };
            self.layers.entry(key).or_default().push(Update {
                up,
                down,
                scale: scale * per_rank,
                file: index,
            });
        }
        if let Some((_, (name, _))) = ups.into_iter().next() {
            bail!("{name} has no matching down (lora_A) tensor");
        }
        if let Some((_, (name, _))) = alphas.into_iter().next() {
            bail!("{name} is the alpha of a layer without up and down tensors");
        }
        Ok(())
    }

    /// Whether the weight `name` (its full name in the part) has updates.
    pub fn adapts(&self, name: &str) -> bool {
        name.strip_suffix(".weight")
            .is_some_and(|m| self.layers.contains_key(&layer_key(self.part, m)))
    }

    /// The sum of the updates of the weight `name`, in the weight's `shape`, f32 on `device`.
    pub fn update(&self, name: &str, shape: &Shape, device: &Device) -> Result<Option<Tensor>> {
        let Some(module) = name.strip_suffix(".weight") else {
            return Ok(None);
        };
        let key = layer_key(self.part, module);
        let Some(updates) = self.layers.get(&key) else {
            return Ok(None);
        };
        self.used.borrow_mut().insert(key.clone());
        let mut total: Option<Tensor> = None;
        for u in updates {
            let delta = (u.up.flatten_from(1)?.matmul(&u.down.flatten_from(1)?)? * u.scale)?;
            if delta.elem_count() != shape.elem_count() {
                bail!(
                    "LoRA {}: layer {module} of the {} is {:?}, the LoRA's update is {:?} (a LoRA for another model?)",
                    self.files[u.file].display(),
                    self.part.describe(),
                    shape.dims(),
                    delta.dims()
                );
            }
            let delta = delta.reshape(shape)?;
            total = Some(match total {
                None => delta,
                Some(t) => (t + delta)?,
            });
        }
        Ok(match total {
            Some(t) => Some(t.to_device(device)?.to_dtype(DType::F32)?),
            None => None,
        })
    }

    /// An error naming the layers no weight of the model read (after the part is built).
    pub fn check_all_used(&self) -> Result<()> {
        let used = self.used.borrow();
        let unused: Vec<String> = self
            .layers
            .keys()
            .filter(|k| !used.contains(*k))
            .cloned()
            .collect();
        if unused.is_empty() {
            return Ok(());
        }
        let files: HashSet<usize> = unused
            .iter()
            .flat_map(|k| self.layers[k].iter().map(|u| u.file))
            .collect();
        let names: Vec<String> = files
            .iter()
            .map(|&f| self.files[f].display().to_string())
            .collect();
        bail!(
            "LoRA {}: {} of its layers match nothing in the model's {}: {} (a LoRA for another model family?)",
            names.join(", "),
            unused.len(),
            self.part.describe(),
            few(&unused)
        )
    }
}

/// The value that occurs most often (the first of those on a tie), as Python's
/// `Counter.most_common()[0]`.
fn most_common(values: impl Iterator<Item = f64>) -> Option<f64> {
    let mut counts: Vec<(f64, usize)> = Vec::new();
    for v in values {
        match counts.iter_mut().find(|(x, _)| *x == v) {
            Some((_, n)) => *n += 1,
            None => counts.push((v, 1)),
        }
    }
    let mut best: Option<(f64, usize)> = None;
    for (v, n) in counts {
        if best.is_none_or(|(_, m)| n > m) {
            best = Some((v, n));
        }
    }
    best.map(|(v, _)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SDXL: UnetShape = UnetShape {
        layers_per_block: 2,
    };

    fn classify(name: &str) -> Result<(Part, String, &'static str)> {
        super::classify(name, SDXL)
    }

    #[test]
    fn both_formats_name_the_same_layer() {
        let kohya = classify(
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
        )
        .unwrap();
        let peft = classify(
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight",
        )
        .unwrap();
        assert_eq!(kohya, peft);
        let te_kohya =
            classify("lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha").unwrap();
        let te_peft =
            classify("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.alpha").unwrap();
        assert_eq!(te_kohya, te_peft);
        assert_eq!(
            te_kohya.1,
            layer_key(Part::TextEncoder, "encoder.layers.0.self_attn.q_proj")
        );
        assert_eq!(
            classify("lora_te1_text_model_x.lora_up.weight").unwrap().0,
            Part::TextEncoder
        );
        assert_eq!(
            classify("lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha").unwrap(),
            classify("text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_A.weight")
                .map(|(p, k, _)| (p, k, "alpha"))
                .unwrap()
        );
        assert!(classify("lora_unet_x.hada_w1_a").is_err());
        assert!(classify("lora_te3_x.alpha").is_err());
    }

    /// kohya's SDXL names (the original U-Net's) against the diffusers module each one is:
    /// the pairs diffusers' `_maybe_map_sgm_blocks_to_diffusers` makes for SDXL base (2
    /// layers per block; down block 0 without attentions, up block 2 without an upsampler).
    #[test]
    fn sgm_unet_names_map_to_diffusers_layers() {
        for (sgm, diffusers) in [
            ("input_blocks_0_0", "conv_in"),
            (
                "input_blocks_1_0_in_layers_2",
                "down_blocks_0_resnets_0_conv1",
            ),
            (
                "input_blocks_2_0_emb_layers_1",
                "down_blocks_0_resnets_1_time_emb_proj",
            ),
            ("input_blocks_3_0_op", "down_blocks_0_downsamplers_0_conv"),
            (
                "input_blocks_4_0_skip_connection",
                "down_blocks_1_resnets_0_conv_shortcut",
            ),
            (
                "input_blocks_4_1_transformer_blocks_1_attn2_to_k",
                "down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k",
            ),
            (
                "input_blocks_8_1_proj_in",
                "down_blocks_2_attentions_1_proj_in",
            ),
            ("middle_block_0_out_layers_3", "mid_block_resnets_0_conv2"),
            (
                "middle_block_1_transformer_blocks_9_ff_net_0_proj",
                "mid_block_attentions_0_transformer_blocks_9_ff_net_0_proj",
            ),
            ("middle_block_2_in_layers_2", "mid_block_resnets_1_conv1"),
            (
                "output_blocks_0_1_proj_out",
                "up_blocks_0_attentions_0_proj_out",
            ),
            ("output_blocks_2_2_conv", "up_blocks_0_upsamplers_0_conv"),
            (
                "output_blocks_5_1_transformer_blocks_0_attn1_to_out_0",
                "up_blocks_1_attentions_2_transformer_blocks_0_attn1_to_out_0",
            ),
            (
                "output_blocks_8_0_skip_connection",
                "up_blocks_2_resnets_2_conv_shortcut",
            ),
            ("out_2", "conv_out"),
            ("time_embed_2", "time_embedding_linear_2"),
            ("label_emb_0_0", "add_embedding_linear_1"),
        ] {
            let name = format!("lora_unet_{sgm}.lora_down.weight");
            assert_eq!(
                classify(&name).unwrap(),
                (Part::Unet, diffusers.to_string(), "down"),
                "{sgm}"
            );
        }
        // diffusers' own names pass through
        assert_eq!(
            classify("lora_unet_up_blocks_0_attentions_0_proj_out.alpha")
                .unwrap()
                .1,
            "up_blocks_0_attentions_0_proj_out"
        );
    }

    /// A file with U-Net layers in both namings: only the diffusers-named ones are applied,
    /// as diffusers drops the others.
    #[test]
    fn both_namings_in_one_file_keep_the_diffusers_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mixed.safetensors");
        let t = |rows: usize, cols: usize| {
            Tensor::ones((rows, cols), DType::F32, &Device::Cpu).unwrap()
        };
        let tensors: HashMap<String, Tensor> = [
            (
                "lora_unet_up_blocks_0_attentions_0_proj_out.lora_down.weight",
                t(2, 4),
            ),
            (
                "lora_unet_up_blocks_0_attentions_0_proj_out.lora_up.weight",
                t(4, 2),
            ),
            (
                "lora_unet_output_blocks_0_1_proj_in.lora_down.weight",
                t(2, 4),
            ),
            (
                "lora_unet_output_blocks_0_1_proj_in.lora_up.weight",
                t(4, 2),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let spec = LoraSpec {
            path,
            te_scale: 1.0,
            unet_scale: 1.0,
        };
        let patch = LoraPatch::load(&[spec], Part::Unet, SDXL).unwrap().unwrap();
        let keys: Vec<&String> = patch.layers.keys().collect();
        assert_eq!(keys, ["up_blocks_0_attentions_0_proj_out"]);
    }

    #[test]
    fn scales_parse_from_the_end() {
        let s = LoraSpec::parse("a:b.safetensors:0.5").unwrap();
        assert_eq!(
            (s.path.to_str().unwrap(), s.unet_scale),
            ("a:b.safetensors", 0.5)
        );
        let s = LoraSpec::parse("x.safetensors").unwrap();
        assert_eq!(s.te_scale, 1.0);
        assert!(LoraSpec::parse("x.safetensors:inf").is_err());
    }

    #[test]
    fn most_common_takes_the_first_on_a_tie() {
        assert_eq!(most_common([4.0, 8.0, 8.0, 4.0].into_iter()), Some(4.0));
        assert_eq!(most_common([1.0, 8.0, 8.0].into_iter()), Some(8.0));
        assert_eq!(most_common(std::iter::empty()), None);
    }
}
