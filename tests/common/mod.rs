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
