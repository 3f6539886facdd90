//! Single-file checkpoints in the original (CompVis/LDM) naming: `model.safetensors` or
//! `model.ckpt` with `model.diffusion_model.*`, `first_stage_model.*` and
//! `cond_stage_model.*` keys (SDXL: `conditioner.embedders.0/1.*`), read in place through a renaming weight backend (the way
//! diffusers' `from_single_file` converts them), with configs from built-in copies of the
//! base models or from `--config-from`.
//!
//! `.ckpt` files are PyTorch zip checkpoints, read by [`super::pytorch`] (which refuses a
//! pickle that calls anything but the tensor-rebuild functions).

use crate::config::{ClipTextConfig, UNetConfig, VaeConfig};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

/// Which Stable Diffusion generation a checkpoint is, from its tensor names and shapes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Family {
    /// SD 1.x: CLIP ViT-L text encoder under `cond_stage_model.transformer`.
    Sd1,
    /// SD 2.x: OpenCLIP ViT-H text encoder under `cond_stage_model.model`.
    Sd2,
    /// SDXL: CLIP ViT-L under `conditioner.embedders.0.transformer`, OpenCLIP ViT-bigG under
    /// `conditioner.embedders.1.model`.
    Sdxl,
}

impl Family {
    pub fn builtin_name(&self) -> &'static str {
        match self {
            Family::Sd1 => "sd15",
            Family::Sd2 => "sd21",
            Family::Sdxl => "sdxl",
        }
    }
}

/// Where SDXL files keep their two text encoders.
const XL_CLIP_L: &str = "conditioner.embedders.0.transformer.";
const XL_OPEN_CLIP: &str = "conditioner.embedders.1.model.";

pub fn is_checkpoint_file(path: &str) -> bool {
    path.ends_with(".safetensors") || path.ends_with(".ckpt")
}

/// The opened checkpoint: a weight backend with LDM names.
pub struct Checkpoint {
    inner: Arc<dyn SimpleBackend>,
    keys: HashSet<String>,
    pub family: Family,
}

impl Checkpoint {
    pub fn open(path: &Path) -> Result<Self> {
        let name = path.to_string_lossy();
        let (inner, keys): (Arc<dyn SimpleBackend>, HashSet<String>) = if name.ends_with(".ckpt") {
            let t = super::pytorch::TorchCheckpoint::open(path)?;
            let keys = t.names().cloned().collect();
            (Arc::new(t), keys)
        } else {
            let t = super::safetensors::SafetensorsReader::open(path).with_context(|| {
                format!(
                    "cannot read {} (corrupt or incomplete file?)",
                    path.display()
                )
            })?;
            let keys = t.names().cloned().collect();
            (Arc::new(t), keys)
        };
        let family = detect_family(&keys).with_context(|| format!("{}", path.display()))?;
        Ok(Self {
            inner,
            keys,
            family,
        })
    }

    fn renamed(&self, map: NameMap) -> Renamed {
        Renamed {
            inner: self.inner.clone(),
            map,
        }
    }

    /// The U-Net weights under diffusers names.
    pub fn unet(&self, c: &UNetConfig, dtype: DType, dev: &Device) -> Result<VarBuilder<'static>> {
        let layers = c.layers_per_block;
        let attn: Vec<bool> = c
            .blocks()?
            .iter()
            .rev()
            .map(|b| b.cross_attention.is_some())
            .collect();
        let map = move |name: &str| {
            unet_name(name, layers, &attn)
                .map(|n| Source::whole(format!("model.diffusion_model.{n}")))
        };
        Ok(VarBuilder::from_backend(
            Box::new(self.renamed(Box::new(map))),
            dtype,
            dev.clone(),
        ))
    }

    /// The VAE weights under diffusers names.
    pub fn vae(&self, c: &VaeConfig, dtype: DType, dev: &Device) -> Result<VarBuilder<'static>> {
        let n = c.block_out_channels.len();
        let map = move |name: &str| {
            vae_name(name, n).map(|n| Source::whole(format!("first_stage_model.{n}")))
        };
        Ok(VarBuilder::from_backend(
            Box::new(self.renamed(Box::new(map))),
            dtype,
            dev.clone(),
        ))
    }

    /// The text encoder's weights under transformers' CLIPTextModel names.
    pub fn text_encoder(
        &self,
        c: &ClipTextConfig,
        dtype: DType,
        dev: &Device,
    ) -> Result<VarBuilder<'static>> {
        let map: NameMap = match self.family {
            Family::Sd1 => {
                // newer files nest CLIP under `text_model.`, older ones do not
                let nested = self.keys.contains(
                    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
                );
                Box::new(move |name: &str| {
                    if nested {
                        Some(Source::whole(format!(
                            "cond_stage_model.transformer.{name}"
                        )))
                    } else {
                        name.strip_prefix("text_model.")
                            .map(|r| Source::whole(format!("cond_stage_model.transformer.{r}")))
                    }
                })
            }
            Family::Sd2 => {
                let d = c.hidden_size;
                Box::new(move |name: &str| open_clip_name(name, d, "cond_stage_model.model."))
            }
            // SDXL files nest CLIP-L under `text_model.`, as transformers names it
            Family::Sdxl => {
                Box::new(|name: &str| Some(Source::whole(format!("{XL_CLIP_L}{name}"))))
            }
        };
        Ok(VarBuilder::from_backend(
            Box::new(self.renamed(map)),
            dtype,
            dev.clone(),
        ))
    }

    /// SDXL's second text encoder under transformers' CLIPTextModelWithProjection names.
    pub fn text_encoder_2(
        &self,
        c: &ClipTextConfig,
        dtype: DType,
        dev: &Device,
    ) -> Result<VarBuilder<'static>> {
        if self.family != Family::Sdxl {
            bail!("the checkpoint has no second text encoder (not SDXL)");
        }
        let d = c.hidden_size;
        let map = move |name: &str| {
            if name == "text_projection.weight" {
                // OpenCLIP keeps the projection as [hidden, projection]: x @ P
                return Some(Source {
                    name: format!("{XL_OPEN_CLIP}text_projection"),
                    rows: None,
                    transpose: true,
                });
            }
            open_clip_name(name, d, XL_OPEN_CLIP)
        };
        Ok(VarBuilder::from_backend(
            Box::new(self.renamed(Box::new(map))),
            dtype,
            dev.clone(),
        ))
    }
}

fn detect_family(keys: &HashSet<String>) -> Result<Family> {
    if !keys.contains("model.diffusion_model.input_blocks.0.0.weight") {
        bail!("not a Stable Diffusion checkpoint in the original layout (no model.diffusion_model.input_blocks.0.0.weight)");
    }
    if keys.iter().any(|k| k.starts_with("conditioner.embedders.")) {
        let clip_l = format!("{XL_CLIP_L}text_model.embeddings.token_embedding.weight");
        let open_clip = format!("{XL_OPEN_CLIP}token_embedding.weight");
        if keys.contains(&clip_l) && keys.contains(&open_clip) {
            return Ok(Family::Sdxl);
        }
        bail!("an SDXL-style checkpoint without SDXL base's two text encoders ({clip_l} and {open_clip}): the refiner and other variants are not supported");
    }
    if keys.contains("cond_stage_model.model.token_embedding.weight") {
        return Ok(Family::Sd2);
    }
    if keys
        .iter()
        .any(|k| k.starts_with("cond_stage_model.transformer."))
    {
        return Ok(Family::Sd1);
    }
    bail!("cannot tell the text encoder of this checkpoint (no cond_stage_model.transformer.* or cond_stage_model.model.* keys)")
}

/// Maps a diffusers (or transformers) tensor name to where the checkpoint keeps it.
type NameMap = Box<dyn Fn(&str) -> Option<Source> + Send + Sync>;

/// Where a diffusers-named tensor lives in the checkpoint: a name, and optionally a slice of
/// rows (OpenCLIP stores q, k and v stacked in one `in_proj`) or a transposition (OpenCLIP's
/// `text_projection`).
struct Source {
    name: String,
    rows: Option<(usize, usize)>,
    transpose: bool,
}

impl Source {
    fn whole(name: String) -> Self {
        Self {
            name,
            rows: None,
            transpose: false,
        }
    }
}

struct Renamed {
    inner: Arc<dyn SimpleBackend>,
    map: NameMap,
}

impl Renamed {
    fn load(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let src = (self.map)(name).ok_or_else(|| candle_core::Error::CannotFindTensor {
            path: name.to_string(),
        })?;
        if !self.inner.contains_tensor(&src.name) {
            return Err(candle_core::Error::CannotFindTensor {
                path: format!("{} (checkpoint key {})", name, src.name),
            });
        }
        // a tensor that is there but cannot be read says why (its type, a short read)
        let t = self.inner.get_unchecked(&src.name, dtype, dev)?;
        let t = match src.rows {
            Some((start, len)) => t.narrow(0, start, len)?.contiguous()?,
            None => t,
        };
        if src.transpose {
            t.t()?.contiguous()
        } else {
            Ok(t)
        }
    }
}

impl SimpleBackend for Renamed {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        super::expect_shape(self.load(name, dtype, dev)?, s, name)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        (self.map)(name).is_some_and(|s| self.inner.contains_tensor(&s.name))
    }
}

/// `ResnetBlock2D` parameter names of the LDM U-Net.
fn unet_resnet(rest: &str) -> String {
    for (d, l) in [
        ("norm1.", "in_layers.0."),
        ("conv1.", "in_layers.2."),
        ("time_emb_proj.", "emb_layers.1."),
        ("norm2.", "out_layers.0."),
        ("conv2.", "out_layers.3."),
        ("conv_shortcut.", "skip_connection."),
    ] {
        if let Some(r) = rest.strip_prefix(d) {
            return format!("{l}{r}");
        }
    }
    rest.to_string()
}

fn split_index(s: &str) -> Option<(usize, &str)> {
    let (i, rest) = s.split_once('.')?;
    Some((i.parse().ok()?, rest))
}

/// diffusers U-Net name -> LDM name (without `model.diffusion_model.`), as diffusers'
/// `convert_ldm_unet_checkpoint` lays them out. `up_has_attn[b]`: whether up block b has
/// attentions (its upsampler then sits at index 2 instead of 1).
fn unet_name(name: &str, layers: usize, up_has_attn: &[bool]) -> Option<String> {
    let per = layers + 1;
    if let Some(r) = name.strip_prefix("conv_in.") {
        return Some(format!("input_blocks.0.0.{r}"));
    }
    if let Some(r) = name.strip_prefix("time_embedding.linear_1.") {
        return Some(format!("time_embed.0.{r}"));
    }
    if let Some(r) = name.strip_prefix("time_embedding.linear_2.") {
        return Some(format!("time_embed.2.{r}"));
    }
    // SDXL's added conditioning
    if let Some(r) = name.strip_prefix("add_embedding.linear_1.") {
        return Some(format!("label_emb.0.0.{r}"));
    }
    if let Some(r) = name.strip_prefix("add_embedding.linear_2.") {
        return Some(format!("label_emb.0.2.{r}"));
    }
    if let Some(r) = name.strip_prefix("conv_norm_out.") {
        return Some(format!("out.0.{r}"));
    }
    if let Some(r) = name.strip_prefix("conv_out.") {
        return Some(format!("out.2.{r}"));
    }
    if let Some(r) = name.strip_prefix("down_blocks.") {
        let (b, r) = split_index(r)?;
        if let Some(r) = r.strip_prefix("resnets.") {
            let (l, r) = split_index(r)?;
            return Some(format!(
                "input_blocks.{}.0.{}",
                1 + b * per + l,
                unet_resnet(r)
            ));
        }
        if let Some(r) = r.strip_prefix("attentions.") {
            let (l, r) = split_index(r)?;
            return Some(format!("input_blocks.{}.1.{r}", 1 + b * per + l));
        }
        if let Some(r) = r.strip_prefix("downsamplers.0.conv.") {
            return Some(format!("input_blocks.{}.0.op.{r}", 1 + b * per + layers));
        }
        return None;
    }
    if let Some(r) = name.strip_prefix("mid_block.") {
        if let Some(r) = r.strip_prefix("resnets.0.") {
            return Some(format!("middle_block.0.{}", unet_resnet(r)));
        }
        if let Some(r) = r.strip_prefix("attentions.0.") {
            return Some(format!("middle_block.1.{r}"));
        }
        if let Some(r) = r.strip_prefix("resnets.1.") {
            return Some(format!("middle_block.2.{}", unet_resnet(r)));
        }
        return None;
    }
    if let Some(r) = name.strip_prefix("up_blocks.") {
        let (b, r) = split_index(r)?;
        if let Some(r) = r.strip_prefix("resnets.") {
            let (l, r) = split_index(r)?;
            return Some(format!(
                "output_blocks.{}.0.{}",
                b * per + l,
                unet_resnet(r)
            ));
        }
        if let Some(r) = r.strip_prefix("attentions.") {
            let (l, r) = split_index(r)?;
            return Some(format!("output_blocks.{}.1.{r}", b * per + l));
        }
        if let Some(r) = r.strip_prefix("upsamplers.0.conv.") {
            let slot = if *up_has_attn.get(b)? { 2 } else { 1 };
            return Some(format!(
                "output_blocks.{}.{slot}.conv.{r}",
                b * per + layers
            ));
        }
        return None;
    }
    None
}

/// diffusers VAE name -> LDM name (without `first_stage_model.`); `n` = number of blocks.
fn vae_name(name: &str, n: usize) -> Option<String> {
    let resnet = |r: &str| r.replace("conv_shortcut.", "nin_shortcut.");
    let mid = |r: &str| -> Option<String> {
        if let Some(x) = r.strip_prefix("resnets.0.") {
            return Some(format!("mid.block_1.{}", resnet(x)));
        }
        if let Some(x) = r.strip_prefix("resnets.1.") {
            return Some(format!("mid.block_2.{}", resnet(x)));
        }
        let x = r.strip_prefix("attentions.0.")?;
        for (d, l) in [
            ("group_norm.", "norm."),
            ("to_q.", "q."),
            ("to_k.", "k."),
            ("to_v.", "v."),
            ("to_out.0.", "proj_out."),
        ] {
            if let Some(t) = x.strip_prefix(d) {
                return Some(format!("mid.attn_1.{l}{t}"));
            }
        }
        None
    };
    for part in ["encoder", "decoder"] {
        let Some(r) = name.strip_prefix(part).and_then(|r| r.strip_prefix('.')) else {
            continue;
        };
        if let Some(x) = r.strip_prefix("mid_block.") {
            return mid(x).map(|m| format!("{part}.{m}"));
        }
        if let Some(x) = r.strip_prefix("conv_norm_out.") {
            return Some(format!("{part}.norm_out.{x}"));
        }
        if r.starts_with("conv_in.") || r.starts_with("conv_out.") {
            return Some(format!("{part}.{r}"));
        }
        if let Some(x) = r.strip_prefix("down_blocks.") {
            let (i, x) = split_index(x)?;
            if let Some(y) = x.strip_prefix("resnets.") {
                let (j, y) = split_index(y)?;
                return Some(format!("encoder.down.{i}.block.{j}.{}", resnet(y)));
            }
            let y = x.strip_prefix("downsamplers.0.conv.")?;
            return Some(format!("encoder.down.{i}.downsample.conv.{y}"));
        }
        if let Some(x) = r.strip_prefix("up_blocks.") {
            let (i, x) = split_index(x)?;
            let k = n.checked_sub(1 + i)?;
            if let Some(y) = x.strip_prefix("resnets.") {
                let (j, y) = split_index(y)?;
                return Some(format!("decoder.up.{k}.block.{j}.{}", resnet(y)));
            }
            let y = x.strip_prefix("upsamplers.0.conv.")?;
            return Some(format!("decoder.up.{k}.upsample.conv.{y}"));
        }
        return None;
    }
    if name.starts_with("quant_conv.") || name.starts_with("post_quant_conv.") {
        return Some(name.to_string());
    }
    None
}

/// transformers CLIPTextModel name -> OpenCLIP name under `p` (SD 2.x
/// `cond_stage_model.model.`, SDXL's second encoder `conditioner.embedders.1.model.`);
/// `d` = hidden size (q, k, v are row slices of `in_proj`).
fn open_clip_name(name: &str, d: usize, p: &str) -> Option<Source> {
    let r = name.strip_prefix("text_model.")?;
    match r {
        "embeddings.token_embedding.weight" => {
            return Some(Source::whole(format!("{p}token_embedding.weight")))
        }
        "embeddings.position_embedding.weight" => {
            return Some(Source::whole(format!("{p}positional_embedding")))
        }
        _ => {}
    }
    if let Some(x) = r.strip_prefix("final_layer_norm.") {
        return Some(Source::whole(format!("{p}ln_final.{x}")));
    }
    let (i, x) = split_index(r.strip_prefix("encoder.layers.")?)?;
    let block = format!("{p}transformer.resblocks.{i}.");
    for (which, q) in [("q_proj.", 0usize), ("k_proj.", 1), ("v_proj.", 2)] {
        if let Some(t) = x
            .strip_prefix("self_attn.")
            .and_then(|y| y.strip_prefix(which))
        {
            return Some(Source {
                name: format!("{block}attn.in_proj_{t}"),
                rows: Some((q * d, d)),
                transpose: false,
            });
        }
    }
    for (dn, on) in [
        ("self_attn.out_proj.", "attn.out_proj."),
        ("layer_norm1.", "ln_1."),
        ("layer_norm2.", "ln_2."),
        ("mlp.fc1.", "mlp.c_fc."),
        ("mlp.fc2.", "mlp.c_proj."),
    ] {
        if let Some(t) = x.strip_prefix(dn) {
            return Some(Source::whole(format!("{block}{on}{t}")));
        }
    }
    None
}

/// The built-in configs of `family` (compiled into the binary), written into a private folder
/// made anew for this call (mode 0700, an unpredictable name, created exclusively) and removed
/// when the returned guard is dropped. A fixed folder under the temporary directory let another
/// local user plant links there (overwriting the victim's files) or swap the configs between
/// their check and their use.
pub fn builtin_configs(family: Family) -> Result<tempfile::TempDir> {
    macro_rules! files {
        ($dir:literal) => {
            [
                (
                    "model_index.json",
                    include_str!(concat!("../../assets/configs/", $dir, "/model_index.json")),
                ),
                (
                    "scheduler/scheduler_config.json",
                    include_str!(concat!(
                        "../../assets/configs/",
                        $dir,
                        "/scheduler/scheduler_config.json"
                    )),
                ),
                (
                    "text_encoder/config.json",
                    include_str!(concat!(
                        "../../assets/configs/",
                        $dir,
                        "/text_encoder/config.json"
                    )),
                ),
                (
                    "unet/config.json",
                    include_str!(concat!("../../assets/configs/", $dir, "/unet/config.json")),
                ),
                (
                    "vae/config.json",
                    include_str!(concat!("../../assets/configs/", $dir, "/vae/config.json")),
                ),
                (
                    "tokenizer/special_tokens_map.json",
                    include_str!(concat!(
                        "../../assets/configs/",
                        $dir,
                        "/tokenizer/special_tokens_map.json"
                    )),
                ),
                (
                    "tokenizer/vocab.json",
                    include_str!("../../assets/clip-tokenizer/vocab.json"),
                ),
                (
                    "tokenizer/merges.txt",
                    include_str!("../../assets/clip-tokenizer/merges.txt"),
                ),
            ]
        };
    }
    let mut files = match family {
        Family::Sd1 => files!("sd15").to_vec(),
        Family::Sd2 => files!("sd21").to_vec(),
        Family::Sdxl => files!("sdxl").to_vec(),
    };
    if family == Family::Sdxl {
        files.extend([
            (
                "text_encoder_2/config.json",
                include_str!("../../assets/configs/sdxl/text_encoder_2/config.json"),
            ),
            (
                "tokenizer_2/special_tokens_map.json",
                include_str!("../../assets/configs/sdxl/tokenizer_2/special_tokens_map.json"),
            ),
            (
                "tokenizer_2/vocab.json",
                include_str!("../../assets/clip-tokenizer/vocab.json"),
            ),
            (
                "tokenizer_2/merges.txt",
                include_str!("../../assets/clip-tokenizer/merges.txt"),
            ),
        ]);
    }
    use std::os::unix::fs::PermissionsExt;
    let root = tempfile::Builder::new()
        .prefix(&format!("sdgen-configs-{}-", family.builtin_name()))
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir()
        .context("cannot make a folder for the built-in configs")?;
    for (rel, text) in files {
        let p = root.path().join(rel);
        std::fs::create_dir_all(p.parent().expect("has parent"))?;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&p)
            .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()))
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    Ok(root)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn unet_names_follow_the_ldm_layout() {
        // SD 1.5: 4 blocks, 2 layers, up block 0 without attention
        let attn = [false, true, true, true];
        let m = |n: &str| unet_name(n, 2, &attn).unwrap();
        assert_eq!(m("conv_in.weight"), "input_blocks.0.0.weight");
        assert_eq!(
            m("down_blocks.0.resnets.1.conv1.weight"),
            "input_blocks.2.0.in_layers.2.weight"
        );
        assert_eq!(
            m("down_blocks.1.attentions.0.proj_in.weight"),
            "input_blocks.4.1.proj_in.weight"
        );
        assert_eq!(
            m("down_blocks.2.downsamplers.0.conv.bias"),
            "input_blocks.9.0.op.bias"
        );
        assert_eq!(
            m("down_blocks.1.resnets.0.conv_shortcut.weight"),
            "input_blocks.4.0.skip_connection.weight"
        );
        assert_eq!(
            m("mid_block.attentions.0.norm.weight"),
            "middle_block.1.norm.weight"
        );
        assert_eq!(
            m("mid_block.resnets.1.time_emb_proj.weight"),
            "middle_block.2.emb_layers.1.weight"
        );
        assert_eq!(
            m("up_blocks.0.upsamplers.0.conv.weight"),
            "output_blocks.2.1.conv.weight"
        );
        assert_eq!(
            m("up_blocks.1.upsamplers.0.conv.weight"),
            "output_blocks.5.2.conv.weight"
        );
        assert_eq!(
            m("up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k.weight"),
            "output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight"
        );
        assert_eq!(m("time_embedding.linear_2.bias"), "time_embed.2.bias");
        assert_eq!(m("conv_norm_out.weight"), "out.0.weight");
    }

    #[test]
    fn vae_and_open_clip_names() {
        assert_eq!(
            vae_name("decoder.up_blocks.0.resnets.2.conv1.weight", 4).unwrap(),
            "decoder.up.3.block.2.conv1.weight"
        );
        assert_eq!(
            vae_name("decoder.up_blocks.3.resnets.0.conv_shortcut.weight", 4).unwrap(),
            "decoder.up.0.block.0.nin_shortcut.weight"
        );
        assert_eq!(
            vae_name("encoder.down_blocks.1.downsamplers.0.conv.weight", 4).unwrap(),
            "encoder.down.1.downsample.conv.weight"
        );
        assert_eq!(
            vae_name("decoder.mid_block.attentions.0.to_out.0.bias", 4).unwrap(),
            "decoder.mid.attn_1.proj_out.bias"
        );
        assert_eq!(
            vae_name("decoder.conv_norm_out.weight", 4).unwrap(),
            "decoder.norm_out.weight"
        );
        assert_eq!(
            vae_name("post_quant_conv.weight", 4).unwrap(),
            "post_quant_conv.weight"
        );
        let k = open_clip_name(
            "text_model.encoder.layers.3.self_attn.k_proj.weight",
            1024,
            "cond_stage_model.model.",
        )
        .unwrap();
        assert_eq!(
            (k.name.as_str(), k.rows),
            (
                "cond_stage_model.model.transformer.resblocks.3.attn.in_proj_weight",
                Some((1024, 1024))
            )
        );
        let f = open_clip_name(
            "text_model.final_layer_norm.bias",
            1024,
            "cond_stage_model.model.",
        )
        .unwrap();
        assert_eq!(f.name, "cond_stage_model.model.ln_final.bias");
    }

    #[test]
    fn builtin_configs_parse() {
        for family in [Family::Sd1, Family::Sd2, Family::Sdxl] {
            let guard = builtin_configs(family).unwrap();
            let dir = guard.path();
            // private: only this user may list, plant or swap files there
            let mode = std::fs::metadata(dir).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700, "{mode:o}");
            let unet = UNetConfig::load(&dir.join("unet/config.json")).unwrap();
            let clip = ClipTextConfig::load(&dir.join("text_encoder/config.json")).unwrap();
            let second = match family {
                Family::Sdxl => {
                    crate::tokenizer::ClipTokenizer::from_dir(&dir.join("tokenizer_2")).unwrap();
                    let c = ClipTextConfig::load(&dir.join("text_encoder_2/config.json")).unwrap();
                    assert_eq!(
                        c.projection_dim,
                        unet.text_time().unwrap().and_then(|t| t.pooled_dim(6))
                    );
                    c.hidden_size
                }
                _ => 0,
            };
            assert_eq!(unet.cross_attention_dim, clip.hidden_size + second);
            VaeConfig::load(&dir.join("vae/config.json")).unwrap();
            crate::tokenizer::ClipTokenizer::from_dir(&dir.join("tokenizer")).unwrap();
            // a folder of its own for each model, gone with its guard
            let other = builtin_configs(family).unwrap();
            assert_ne!(other.path(), dir);
            let dir = dir.to_path_buf();
            drop(guard);
            assert!(!dir.exists());
        }
    }
}
