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
