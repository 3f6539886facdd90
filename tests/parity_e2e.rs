//! Whole generations (tokenizer, text encoder, scheduler loop with CFG, U-Net, VAE, 8-bit
//! conversion) against diffusers' images for every scheduler, on both tiny models.

mod common;
use candle_core::{DType, Device};
use common::*;
use sdgen::ops::{self, Bf16Kernel, CpuEngine, Engine};
use sdgen::pipeline::{Pipeline, Request};
use sdgen::schedulers::SCHEDULERS;
use sdgen::source::{ModelFiles, Precision};

fn check_model(model: &str, batch_size: usize) {
    let files = ModelFiles::from_folder(&model_dir(model), Precision::Full).unwrap();
    let pipeline = Pipeline::load(files, Device::Cpu, DType::F32).unwrap();
    let meta = read_json(&format!("{model}/e2e.json"));
    let seeds: Vec<u64> = meta["seeds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_u64().unwrap())
        .collect();
    let mut checked = 0;
    for (run, spec) in meta["runs"].as_object().unwrap() {
        let scheduler = spec["scheduler"].as_str().unwrap();
        if !SCHEDULERS.iter().any(|s| s.0 == scheduler) {
            continue;
        }
        let request = Request {
            negative_prompt: meta["negative_prompt"].as_str().unwrap().into(),
            seeds: seeds.clone(),
            steps: meta["steps"].as_u64().unwrap() as usize,
            guidance: spec["guidance"].as_f64().unwrap(),
            scheduler: Some(scheduler.into()),
            batch_size,
            ..pipeline.request(meta["prompt"].as_str().unwrap())
        };
        let images = pipeline.generate_all(&request).unwrap();
        for (img, seed) in images.iter().zip(&seeds) {
            assert_eq!(img.seed, *seed);
            let want = image::open(reference(&format!("{model}/e2e/{run}-{seed}.png")))
                .unwrap()
                .to_rgb8();
            assert_eq!((img.width as u32, img.height as u32), want.dimensions());
            let (max, mean) = pixel_diff(&img.rgb, want.as_raw());
            eprintln!("{model} {run} seed {seed}: max {max}/255, mean {mean:.4}/255");
            assert!(
                max <= 2 && mean <= 0.25,
                "{model} {run} seed {seed}: max {max}/255, mean {mean:.4}/255"
            );
        }
        checked += 1;
    }
    assert!(checked >= SCHEDULERS.len(), "only {checked} runs checked");
}

#[test]
fn sd1_tiny_every_scheduler_matches_diffusers() {
    check_model("tiny", 2);
}

#[test]
fn sd2_tiny_every_scheduler_matches_diffusers_one_image_per_batch() {
    // batch size 1: each image alone reproduces diffusers' batch of two
    check_model("tiny2", 1);
}

/// `--dtype bf16` / `f16` on the CPU: bf16 on each bf16 kernel the CPU has (AMX tiles,
/// AVX512-BF16 dot products; `cpu::bf16`), and widened to f32 for the f32 kernels as on other
/// CPUs (`ops::in_f32`). The images must stay near the f32 ones.
#[test]
fn bf16_and_f16_images_stay_near_f32() {
    // (tiny_xl in f16: its VAE runs in f32, force_upcast)
    for model in ["tiny", "tiny2", "tiny_xl"] {
        let generate = |dtype: DType, bf16: Option<Bf16Kernel>| {
            let precision = if dtype == DType::F32 {
                Precision::Full
            } else {
                Precision::Half
            };
            let files = ModelFiles::from_folder(&model_dir(model), precision).unwrap();
            let engine = Engine::Cpu(CpuEngine::with_bf16(bf16));
            let pipeline = Pipeline::load_on(files, Device::Cpu, dtype, engine).unwrap();
            let request = Request {
                seeds: vec![11, 12],
                steps: 6,
                scheduler: Some("euler".into()),
                batch_size: 2,
                ..pipeline.request("a red fox in the snow")
            };
            pipeline.generate_all(&request).unwrap()
        };
        let reference = generate(DType::F32, None);
        // bf16 on every kernel this CPU has (AMX tiles, AVX512-BF16 dot products), then on
        // the widening path the other CPUs take; each model loaded on its own engine
        let mut runs: Vec<(DType, Option<Bf16Kernel>, u8, f64)> = ops::bf16_kernels()
            .into_iter()
            .map(|k| (DType::BF16, Some(k), 24, 2.5))
            .collect();
        runs.push((DType::BF16, None, 24, 2.5));
        runs.push((DType::F16, None, 4, 0.3));
        for (dtype, kernel, max_tol, mean_tol) in runs {
            let path = match kernel {
                Some(k) => format!(" on {k:?}"),
                None if dtype == DType::BF16 => " widened to f32".into(),
                None => String::new(),
            };
            let images = generate(dtype, kernel);
            for (img, want) in images.iter().zip(&reference) {
                let (max, mean) = pixel_diff(&img.rgb, &want.rgb);
                eprintln!(
                    "{model} {dtype:?}{path} seed {}: max {max}/255, mean {mean:.4}/255",
                    img.seed
                );
                assert!(
                    max <= max_tol && mean <= mean_tol,
                    "{model} {dtype:?}{path} seed {}: max {max}/255, mean {mean:.4}/255",
                    img.seed
                );
            }
        }
    }
}

/// `--clip-skip N` as the web UI counts it (N - 1 layers skipped, then the final layer norm)
/// on the prompt and the negative prompt: diffusers' images made from such embeddings.
#[test]
fn clip_skip_as_the_web_ui_counts_it_matches_diffusers() {
    for (model, skips) in [("tiny", &[2usize, 3][..]), ("tiny2", &[2][..])] {
        let files = ModelFiles::from_folder(&model_dir(model), Precision::Full).unwrap();
        let pipeline = Pipeline::load(files, Device::Cpu, DType::F32).unwrap();
        let meta = read_json(&format!("{model}/e2e.json"));
        for &clip_skip in skips {
            assert_seed42_image(
                &pipeline,
                &meta,
                clip_skip,
                &format!("{model}/clip_skip/{clip_skip}.png"),
            );
        }
    }
}

/// `--rng torch-cuda`: diffusers' seed-42 images with torch's CUDA generator (the fixture
/// script's implementation of it drawing the latents and, for euler_a, every step's noise).
#[test]
fn images_with_torch_cuda_noise() {
    let files = ModelFiles::from_folder(&model_dir("tiny"), Precision::Full).unwrap();
    let pipeline = Pipeline::load(files, Device::Cpu, DType::F32).unwrap();
    let meta = read_json("tiny/e2e.json");
    for scheduler in ["pndm", "euler_a"] {
        let request = Request {
            scheduler: Some(scheduler.into()),
            rng: sdgen::rng::RngKind::TorchCuda,
            ..seed42_request(&pipeline, &meta)
        };
        assert_image(
            &pipeline,
            &request,
            &format!("tiny/rng_cuda/{scheduler}.png"),
        );
    }
}

/// `dpmpp_sde` (the web UI's "DPM++ SDE"), its Brownian tree seeded with the image's seed:
/// diffusers' images with `noise_sampler_seed=42`, with and without Karras sigmas.
#[test]
fn sde_images_match_diffusers() {
    let files = ModelFiles::from_folder(&model_dir("tiny"), Precision::Full).unwrap();
    let pipeline = Pipeline::load(files, Device::Cpu, DType::F32).unwrap();
    let meta = read_json("tiny/e2e.json");
    for (scheduler, png) in [
        ("dpmpp_sde", "dpmpp_sde"),
        ("DPM++ SDE Karras", "dpmpp_sde_karras"),
    ] {
        let request = Request {
            scheduler: Some(scheduler.into()),
            ..seed42_request(&pipeline, &meta)
        };
        assert_image(&pipeline, &request, &format!("tiny/sde/{png}-42.png"));
    }
}
