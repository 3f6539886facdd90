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
//! diffusers models, so a layer is found by its name with dots as underscores.

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
    Unet,
}

impl Part {
    fn describe(self) -> &'static str {
        match self {
            Part::TextEncoder => "text encoder",
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
        Part::TextEncoder => key.strip_prefix("text_model_").unwrap_or(&key).to_string(),
        Part::Unet => key,
    }
}

/// (part, layer key, what) of a tensor name in either format; `None` for what is not a
/// LoRA tensor of SD 1.x/2.x.
fn classify(name: &str) -> Result<(Part, String, &'static str)> {
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
        (Part::Unet, m)
    } else if let Some(m) = stem.strip_prefix("lora_te_") {
        (Part::TextEncoder, m)
    } else if let Some(m) = stem.strip_prefix("unet.") {
        (Part::Unet, m)
    } else if let Some(m) = stem.strip_prefix("text_encoder.") {
        (Part::TextEncoder, m)
    } else if stem.starts_with("lora_te1_")
        || stem.starts_with("lora_te2_")
        || stem.starts_with("text_encoder_2.")
    {
        bail!("{name} belongs to an SDXL LoRA; this model is SD 1.x/2.x");
    } else {
        bail!("{name} names neither the U-Net nor the text encoder (lora_unet_/lora_te_ or unet./text_encoder.)");
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
    /// The updates `specs` make to `part`; `None` when they make none (every scale 0, or no
    /// LoRA has layers of this part).
    pub fn load(specs: &[LoraSpec], part: Part) -> Result<Option<Self>> {
        let mut patch = Self {
            part,
            files: Vec::new(),
            layers: HashMap::new(),
            used: RefCell::new(HashSet::new()),
        };
        for (i, spec) in specs.iter().enumerate() {
            let scale = match part {
                Part::TextEncoder => spec.te_scale,
                Part::Unet => spec.unet_scale,
            };
            patch.files.push(spec.path.clone());
            if scale != 0.0 {
                patch
                    .add_file(&spec.path, scale, i)
                    .with_context(|| format!("LoRA {}", spec.path.display()))?;
            }
        }
        Ok((!patch.layers.is_empty()).then_some(patch))
    }

    fn add_file(&mut self, path: &Path, scale: f64, index: usize) -> Result<()> {
        let file = TensorFile::open(path)?;
        let mut downs = HashMap::new();
        let mut ups = HashMap::new();
        let mut alphas = HashMap::new();
        let mut any = false;
        for name in file.names() {
            let (part, key, what) = classify(name)?;
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
        assert!(classify("lora_te1_text_model_x.lora_up.weight").is_err());
        assert!(classify("lora_unet_x.hada_w1_a").is_err());
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
