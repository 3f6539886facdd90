//! The tiny model with the config shapes real Hub models have (`fixtures/configs/real_world.json`:
//! nulls for flags, a saved DPM++ config with `-Infinity`, configs of 2022 that the pipeline
//! fixes at load, the scheduler class named only by model_index.json, BK-SDM without a mid
//! block, a [height, width] sample_size) gives diffusers' image for each.

mod common;
use candle_core::{DType, Device};
use common::*;
use sdgen::pipeline::{Pipeline, Request};
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
        let (height, width) = pipeline.default_size();
        let request = Request {
            prompt: meta["prompt"].as_str().unwrap().into(),
            negative_prompt: meta["negative_prompt"].as_str().unwrap().into(),
            seeds: vec![42],
            steps: meta["steps"].as_u64().unwrap() as usize,
            guidance: 7.5,
            scheduler: None,
            width,
            height,
            batch_size: 1,
            clip_skip: 1,
        };
        let img = &pipeline.generate_all(&request).unwrap()[0];
        let want = image::open(reference(&format!("real_world/{name}.png")))
            .unwrap()
            .to_rgb8();
        assert_eq!(
            (img.width as u32, img.height as u32),
            want.dimensions(),
            "{name}"
        );
        let (max, mean) = pixel_diff(&img.rgb, want.as_raw());
        eprintln!("{name}: max {max}/255, mean {mean:.4}/255");
        assert!(
            max <= 2 && mean <= 0.25,
            "{name}: max {max}/255, mean {mean:.4}/255"
        );
    }
}
