//! The model-level parity checks (text encoder, U-Net, VAE against the recorded diffusers
//! outputs), for `parity_models`.

use super::*;
use candle_core::DType;
use sdgen::ops::Engine;
use sdgen::pipeline::Pipeline;
use sdgen::source::{ModelFiles, Precision};

pub const TOL: f32 = 1e-4;

pub fn pipeline(model: &str) -> Pipeline {
    pipeline_on(model, Engine::for_device(&Device::Cpu))
}

/// The model in f32 on the CPU, its operations on `engine`.
pub fn pipeline_on(model: &str, engine: Engine) -> Pipeline {
    let files = ModelFiles::from_folder(&model_dir(model), Precision::Full).unwrap();
    Pipeline::load_on(files, Device::Cpu, DType::F32, engine).unwrap()
}

pub fn text_encoder(model: &str) {
    let p = pipeline(model);
    let refs = load_tensors(&format!("{model}/tensors.safetensors"));
    let prompts = [
        "a photo of a cat on a beach",
        "",
        "emoji 😀🐱🚀 party",
        &"word ".repeat(100),
    ];
    for (i, prompt) in prompts.iter().enumerate() {
        let got = p.encode_text(prompt, Default::default(), 1).unwrap();
        assert_close(
            &format!("{model} text{i}"),
            &got,
            &refs[&format!("text{i}")],
            TOL,
        );
    }
}

pub fn unet(model: &str) {
    unet_on(model, Engine::for_device(&Device::Cpu));
}

pub fn unet_on(model: &str, engine: Engine) {
    let p = pipeline_on(model, engine);
    let refs = load_tensors(&format!("{model}/tensors.safetensors"));
    let sample = &refs["unet_sample"];
    let context = &refs["unet_context"];
    for t in ["1", "500", "999", "37.5"] {
        let got = p.unet_forward(sample, t.parse().unwrap(), context).unwrap();
        assert_close(
            &format!("{model} unet t={t}"),
            &got,
            &refs[&format!("unet_out_t{t}")],
            TOL,
        );
    }
    let ctx1 = context.narrow(0, 0, 1).unwrap();
    let got = p
        .unet_forward(&refs["unet_odd_sample"], 250.0, &ctx1)
        .unwrap();
    assert_close(
        &format!("{model} unet odd size"),
        &got,
        &refs["unet_odd_out"],
        TOL,
    );
}

pub fn vae(model: &str) {
    vae_on(model, Engine::for_device(&Device::Cpu));
}

pub fn vae_on(model: &str, engine: Engine) {
    let p = pipeline_on(model, engine);
    let refs = load_tensors(&format!("{model}/tensors.safetensors"));
    let got = p.vae_decode_raw(&refs["vae_latents"], None).unwrap();
    assert_close(&format!("{model} vae"), &got, &refs["vae_decoded"], TOL);
}
