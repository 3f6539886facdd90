//! Helpers shared by the integration tests: fixture paths, tensor comparisons, a loopback Hub.
#![allow(dead_code)]

pub mod hub_server;
pub mod models;

use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn model_dir(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

pub fn reference(rel: &str) -> PathBuf {
    fixtures().join("reference").join(rel)
}

pub fn load_tensors(rel: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(reference(rel), &Device::Cpu).expect("reference tensors")
}

pub fn to_vec(t: &Tensor) -> Vec<f32> {
    t.to_dtype(candle_core::DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Largest |a - b|.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// max |a - b| / max |b|: the error relative to the reference's scale.
pub fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().map(|x| x.abs()).fold(0.0, f32::max).max(1e-12);
    max_abs_diff(a, b) / scale
}

pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, rel_tol: f32) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let (g, w) = (to_vec(got), to_vec(want));
    let r = rel_diff(&g, &w);
    eprintln!("{what}: relative difference {r:.2e}");
    assert!(
        r <= rel_tol,
        "{what}: relative difference {r:e} > {rel_tol:e}"
    );
}

pub fn read_json(rel: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(reference(rel)).unwrap()).unwrap()
}

/// Max and mean absolute pixel difference, in 1/255 units.
pub fn pixel_diff(got: &[u8], want: &[u8]) -> (u8, f64) {
    assert_eq!(got.len(), want.len());
    let mut max = 0u8;
    let mut sum = 0u64;
    for (a, b) in got.iter().zip(want) {
        let d = a.abs_diff(*b);
        max = max.max(d);
        sum += d as u64;
    }
    (max, sum as f64 / got.len() as f64)
}

/// A copy of the tiny model with `edits` merged in, as scripts/make_fixtures.py makes it.
pub fn edited_tiny(edits: &serde_json::Value, dir: &std::path::Path) {
    let tiny = model_dir("tiny");
    for entry in walk(&tiny) {
        let rel = entry.strip_prefix(&tiny).unwrap();
        let to = dir.join(rel);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&entry, &to).unwrap();
    }
    for (rel, change) in edits.as_object().unwrap() {
        let path = dir.join(rel);
        let mut cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let cfg_map = cfg.as_object_mut().unwrap();
        for (k, v) in change.as_object().unwrap() {
            if k == "$delete" {
                for gone in v.as_array().unwrap() {
                    cfg_map.remove(gone.as_str().unwrap());
                }
            } else {
                cfg_map.insert(k.clone(), v.clone());
            }
        }
        let text = serde_json::to_string_pretty(&cfg).unwrap();
        std::fs::write(&path, text.replace("\"-Infinity\"", "-Infinity")).unwrap();
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The request of diffusers' seed-42 images: the model's e2e prompt pair (`meta`: its
/// e2e.json) at its default size and scheduler, guidance 7.5.
pub fn seed42_request(
    pipeline: &sdgen::pipeline::Pipeline,
    meta: &serde_json::Value,
) -> sdgen::pipeline::Request {
    sdgen::pipeline::Request {
        negative_prompt: meta["negative_prompt"].as_str().unwrap().into(),
        seeds: vec![42],
        steps: meta["steps"].as_u64().unwrap() as usize,
        ..pipeline.request(meta["prompt"].as_str().unwrap())
    }
}

/// [`seed42_request`] with `clip_skip`, against the PNG `png` under the references.
pub fn assert_seed42_image(
    pipeline: &sdgen::pipeline::Pipeline,
    meta: &serde_json::Value,
    clip_skip: usize,
    png: &str,
) {
    let request = sdgen::pipeline::Request {
        clip_skip,
        ..seed42_request(pipeline, meta)
    };
    assert_image(pipeline, &request, png);
}

/// The request's first image against the PNG `png` under the references: max 2/255, mean
/// 0.25/255.
pub fn assert_image(
    pipeline: &sdgen::pipeline::Pipeline,
    request: &sdgen::pipeline::Request,
    png: &str,
) {
    let img = &pipeline.generate_all(request).unwrap()[0];
    let want = image::open(reference(png)).unwrap().to_rgb8();
    assert_eq!(
        (img.width as u32, img.height as u32),
        want.dimensions(),
        "{png}"
    );
    let (max, mean) = pixel_diff(&img.rgb, want.as_raw());
    eprintln!("{png}: max {max}/255, mean {mean:.4}/255");
    assert!(
        max <= 2 && mean <= 0.25,
        "{png}: max {max}/255, mean {mean:.4}/255"
    );
}
