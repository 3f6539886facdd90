//! Single-file checkpoints in the original LDM naming give the same images as the diffusers
//! folder they were converted from (the fixture script checks them with diffusers'
//! from_single_file); pickles that call anything but tensor rebuilding are refused.

mod common;
use candle_core::{DType, Device};
use common::hub_server::{model_files, HubServer};
use common::*;
use sdgen::pipeline::{Pipeline, Request};
use sdgen::source::{ModelFiles, Precision};
use std::path::{Path, PathBuf};
use std::process::Command;

fn single(name: &str) -> PathBuf {
    fixtures().join("single_file").join(name)
}

fn images(files: ModelFiles, scheduler: &str) -> Vec<Vec<u8>> {
    let p = Pipeline::load(files, Device::Cpu, DType::F32).unwrap();
    let r = Request {
        negative_prompt: "blurry".into(),
        seeds: vec![42, 43],
        steps: 4,
        scheduler: Some(scheduler.into()),
        batch_size: 2,
        ..p.request("a photo of a cat on a beach")
    };
    p.generate_all(&r)
        .unwrap()
        .into_iter()
        .map(|i| i.rgb)
        .collect()
}

fn same_images_as_folder(model: &str, file: &str) {
    let folder = ModelFiles::from_folder(&model_dir(model), Precision::Full).unwrap();
    let ckpt =
        ModelFiles::single_file(file.into(), None, &single(file), Some(&model_dir(model))).unwrap();
    assert_eq!(images(folder, "euler_a"), images(ckpt, "euler_a"), "{file}");
}

#[test]
fn sd1_safetensors_matches_the_diffusers_folder() {
    same_images_as_folder("tiny", "tiny.safetensors");
}

#[test]
fn sd1_ckpt_matches_the_diffusers_folder() {
    same_images_as_folder("tiny", "tiny.ckpt");
}

#[test]
fn sd2_open_clip_safetensors_matches_the_diffusers_folder() {
    same_images_as_folder("tiny2", "tiny2.safetensors");
}

#[test]
fn sdxl_safetensors_matches_the_diffusers_folder() {
    // both text encoders (CLIP-L, OpenCLIP with its transposed projection) and the U-Net's
    // label_emb, in SDXL's original naming
    same_images_as_folder("tiny_xl", "tiny_xl.safetensors");
}

fn sdgen(args: &[&str], envs: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sdgen"));
    cmd.args(args)
        .env(
            "HF_HUB_CACHE",
            std::env::temp_dir().join("sdgen-test-empty-cache"),
        )
        .env("HF_ENDPOINT", "http://127.0.0.1:9");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[test]
fn a_pickle_that_calls_os_system_is_refused() {
    let _ = std::fs::remove_file("/tmp/sdgen-pwned");
    let o = sdgen(
        &["a cat", "-m", single("evil.ckpt").to_str().unwrap(), "-q"],
        &[],
    );
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("refusing") && err.contains("system"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!Path::new("/tmp/sdgen-pwned").exists());
}

#[test]
fn the_family_is_detected_and_a_mismatched_config_is_a_clear_error() {
    // without --config-from, the built-in SD 1.5 configs are used: the tiny weights do not fit
    let o = sdgen(
        &[
            "a cat",
            "-m",
            single("tiny.safetensors").to_str().unwrap(),
            "-q",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("shape") || err.contains("cannot find"),
        "{err}"
    );
    let c = sdgen::weights::single_file::Checkpoint::open(&single("tiny2.safetensors")).unwrap();
    assert_eq!(c.family, sdgen::weights::single_file::Family::Sd2);
    let c = sdgen::weights::single_file::Checkpoint::open(&single("tiny.ckpt")).unwrap();
    assert_eq!(c.family, sdgen::weights::single_file::Family::Sd1);
    let c = sdgen::weights::single_file::Checkpoint::open(&single("tiny_xl.safetensors")).unwrap();
    assert_eq!(c.family, sdgen::weights::single_file::Family::Sdxl);
    // the tiny SDXL with the built-in SDXL base configs: one error naming the misfit
    let o = sdgen(
        &[
            "a cat",
            "-m",
            single("tiny_xl.safetensors").to_str().unwrap(),
            "-q",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("built-in configs") && (err.contains("shape") || err.contains("cannot find")),
        "{err}"
    );
}

#[test]
fn a_hub_repo_holding_only_checkpoints() {
    let mut files = std::collections::BTreeMap::new();
    files.insert(
        "tiny.safetensors".to_string(),
        std::fs::read(single("tiny.safetensors")).unwrap(),
    );
    files.insert("README.md".to_string(), b"hi".to_vec());
    let server = HubServer::start("org/ckpt", files.clone());
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("hub");
    let cfg = model_dir("tiny");
    let out = dir.path().join("a.png");
    let envs = [
        ("HF_ENDPOINT", server.url.as_str()),
        ("HF_HUB_CACHE", cache.to_str().unwrap()),
    ];
    let o = sdgen(
        &[
            "a cat",
            "-m",
            "org/ckpt",
            "--config-from",
            cfg.to_str().unwrap(),
            "-s",
            "1",
            "--steps",
            "2",
            "-q",
            "-o",
            out.to_str().unwrap(),
        ],
        &envs,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // the same with the folder form gives the same image
    let out2 = dir.path().join("b.png");
    let o = sdgen(
        &[
            "a cat",
            "-m",
            cfg.to_str().unwrap(),
            "-s",
            "1",
            "--steps",
            "2",
            "-q",
            "-o",
            out2.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success());
    let px = |p: &Path| image::open(p).unwrap().to_rgb8().into_raw();
    assert_eq!(px(&out), px(&out2));

    // several checkpoints: ask for one
    files.insert(
        "other.ckpt".to_string(),
        std::fs::read(single("tiny.ckpt")).unwrap(),
    );
    let server = HubServer::start("org/two", files);
    let envs = [
        ("HF_ENDPOINT", server.url.as_str()),
        ("HF_HUB_CACHE", cache.to_str().unwrap()),
    ];
    let o = sdgen(&["a cat", "-m", "org/two", "-q"], &envs);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--checkpoint")
            && err.contains("other.ckpt")
            && err.contains("tiny.safetensors"),
        "{err}"
    );
    let out3 = dir.path().join("c.png");
    let o = sdgen(
        &[
            "a cat",
            "-m",
            "org/two",
            "--checkpoint",
            "other.ckpt",
            "--config-from",
            cfg.to_str().unwrap(),
            "-s",
            "1",
            "--steps",
            "2",
            "-q",
            "-o",
            out3.to_str().unwrap(),
        ],
        &envs,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(px(&out3), px(&out2));
    let _ = model_files;
}
