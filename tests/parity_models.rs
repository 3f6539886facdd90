//! Text encoder, U-Net and VAE outputs against diffusers/transformers on the same weights (f32).

mod common;
use candle_core::{DType, Device, Tensor};
use common::models::{pipeline, text_encoder, unet, unet_on, vae, vae_on, TOL};
use common::*;
use sdgen::ops::{CpuEngine, Engine};
use sdgen::pipeline::Pipeline;
use sdgen::source::{ModelFiles, Precision};

#[test]
fn text_encoder_sd1() {
    text_encoder("tiny");
}
#[test]
fn text_encoder_sd2_gelu_no_prefix() {
    text_encoder("tiny2");
}
#[test]
fn unet_sd1_conv_projection_int_heads() {
    unet("tiny");
}
#[test]
fn unet_sd2_linear_projection_head_list() {
    unet("tiny2");
}
#[test]
fn vae_two_blocks() {
    vae("tiny");
}
#[test]
fn vae_four_blocks() {
    vae("tiny2");
}

/// The U-Net and VAE checks again with every f32 3x3 convolution computed by Winograd's
/// F(2x2, 3x3) (the tiny models' latents are too small to reach it by default), then with none
/// of them (the direct kernel alone), each on a model loaded with that engine.
#[test]
fn unet_and_vae_match_diffusers_with_winograd_everywhere_then_nowhere() {
    for min_tiles in [0, usize::MAX] {
        let engine = Engine::Cpu(CpuEngine {
            winograd_min_tiles: min_tiles,
            ..CpuEngine::default()
        });
        for model in ["tiny", "tiny2"] {
            unet_on(model, engine);
            vae_on(model, engine);
        }
    }
}

#[test]
fn vae_batch_decodes_each_image_like_a_single_one() {
    let p = pipeline("tiny");
    let lat = Tensor::randn(0f32, 1.0, (3, 4, 16, 16), &Device::Cpu).unwrap();
    let all = p.vae_decode_raw(&lat, None).unwrap();
    for i in 0..3 {
        let one = p
            .vae_decode_raw(&lat.narrow(0, i, 1).unwrap(), None)
            .unwrap();
        assert_eq!(
            to_vec(&all.narrow(0, i, 1).unwrap()),
            to_vec(&one),
            "image {i}"
        );
    }
}

#[test]
fn pytorch_bin_weights_load_like_safetensors() {
    // a copy of tiny whose U-Net is only a PyTorch .bin (read without running pickle code)
    let dir = tempfile::tempdir().unwrap();
    let src = model_dir("tiny");
    for rel in [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json",
        "unet/config.json",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ] {
        let to = dir.path().join(rel);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(src.join(rel), to).unwrap();
    }
    std::fs::copy(
        fixtures().join("bin/tiny-unet.bin"),
        dir.path().join("unet/diffusion_pytorch_model.bin"),
    )
    .unwrap();
    let files = ModelFiles::from_folder(dir.path(), Precision::Full).unwrap();
    let p = Pipeline::load(files, Device::Cpu, DType::F32).unwrap();
    let refs = load_tensors("tiny/tensors.safetensors");
    let got = p
        .unet_forward(&refs["unet_sample"], 500.0, &refs["unet_context"])
        .unwrap();
    assert_close("tiny unet from .bin", &got, &refs["unet_out_t500"], TOL);
}

/// The VAE encoder (image-to-image's start): `vae.encode(x).latent_dist` mean and std, and its
/// `sample(generator=manual_seed(5))`, for a batch of two random images, on both layouts
/// (tiny2: four blocks, three downsamplers).
#[test]
fn vae_encoder_matches_diffusers() {
    for model in ["tiny", "tiny2"] {
        let p = pipeline(model);
        let refs = load_tensors(&format!("{model}/vae_encoder.safetensors"));
        let dist = p.encode_image(&refs["image"], None).unwrap();
        assert_close(&format!("{model} mean"), &dist.mean, &refs["mean"], TOL);
        assert_close(&format!("{model} std"), &dist.std, &refs["std"], TOL);
        let want = &refs["sample_seed5"];
        let noise = sdgen::rng::TorchGenerator::new(5).randn(want.elem_count());
        let noise = Tensor::from_vec(noise, want.dims(), &Device::Cpu).unwrap();
        let sample = dist.sample(&noise).unwrap();
        assert_close(&format!("{model} sample"), &sample, want, TOL);
    }
}
