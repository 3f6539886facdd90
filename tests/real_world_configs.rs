//! The tiny model with the config shapes real Hub models have (`fixtures/configs/real_world.json`:
//! nulls for flags, a saved DPM++ config with `-Infinity`, configs of 2022 that the pipeline
//! fixes at load, the scheduler class named only by model_index.json, BK-SDM without a mid
//! block, a [height, width] sample_size) gives diffusers' image for each.

mod common;
use candle_core::{DType, Device};
use common::*;
use sdgen::pipeline::Pipeline;
use sdgen::source::{ModelFiles, Precision};
use serde_json::Value;

/// The variants, with Python's `-Infinity` literal read as a string (and written back bare).
fn variants() -> serde_json::Map<String, Value> {
    let text = std::fs::read_to_string(fixtures().join("configs/real_world.json")).unwrap();
    let v: Value = serde_json::from_str(&text.replace(": -Infinity", ": \"-Infinity\"")).unwrap();
    v["variants"].as_object().unwrap().clone()
}

#[test]
fn real_world_config_shapes_give_diffusers_images() {
    let meta = read_json("tiny/e2e.json");
    let variants = variants();
    assert_eq!(variants.len(), 3);
    for (name, edits) in &variants {
        let dir = tempfile::tempdir().unwrap();
        edited_tiny(edits, dir.path());
        let files = ModelFiles::from_folder(dir.path(), Precision::Full).unwrap();
        let pipeline = Pipeline::load(files, Device::Cpu, DType::F32)
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert_seed42_image(&pipeline, &meta, 1, &format!("real_world/{name}.png"));
    }
}

/// The Hub's SDXL base configs (`fixtures/configs/sdxl-base-1.0`: nulls, unknown keys, the
/// misnamed attention_head_dim, [1, 2, 10] transformer layers) load: the family, the default
/// size and scheduler, and the encoders' widths against the U-Net's are as diffusers reads them.
/// The weights are not read (the tiny SDXL's files stand in for the listing).
#[test]
fn sdxl_base_configs_load() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = model_dir("tiny_xl");
    let real = fixtures().join("configs/sdxl-base-1.0");
    for sub in ["tokenizer", "tokenizer_2"] {
        std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        for e in std::fs::read_dir(tiny.join(sub)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dir.path().join(sub).join(e.file_name())).unwrap();
        }
    }
    for rel in [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder_2/config.json",
        "unet/config.json",
        "vae/config.json",
    ] {
        let to = dir.path().join(rel);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(real.join(rel), to).unwrap();
    }
    for rel in [
        "text_encoder/model.fp16.safetensors",
        "text_encoder_2/model.fp16.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    ] {
        std::fs::write(dir.path().join(rel), b"").unwrap();
    }
    let files = ModelFiles::from_folder(dir.path(), Precision::Half).unwrap();
    let p = Pipeline::load(files, Device::Cpu, DType::F32).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(p.family, sdgen::pipeline::Family::Sdxl);
    assert_eq!(p.default_size(), (1024, 1024));
    assert_eq!(p.default_scheduler, Some("euler"));
    assert_eq!(p.vae_config.scaling_factor, 0.13025);
}
