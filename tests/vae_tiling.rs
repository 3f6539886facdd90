//! VAE tiling against diffusers' `vae.enable_tiling()` on tiny (tiles of 32 pixels / 16
//! latents, so 64x64 pictures are decoded and encoded in 3x3 overlapping tiles).

mod common;

use candle_core::{DType, Device};
use common::{assert_image, fixtures, model_dir, read_json, seed42_request};
use sdgen::input_image::Picture;
use sdgen::pipeline::{InitImage, Pipeline, Request};
use sdgen::source::{ModelFiles, Precision};

fn tiny() -> Pipeline {
    let files = ModelFiles::from_folder(&model_dir("tiny"), Precision::Full).unwrap();
    Pipeline::load(files, Device::Cpu, DType::F32).unwrap()
}

fn request(p: &Pipeline, tiling: bool) -> Request {
    Request {
        scheduler: Some("euler".into()),
        width: 64,
        height: 64,
        vae_tiling: tiling,
        sizes: Default::default(),
        ..seed42_request(p, &read_json("tiny/e2e.json"))
    }
}

#[test]
fn tiled_decode_matches_diffusers() {
    let p = tiny();
    assert_image(&p, &request(&p, true), "vae_tiling/txt2img-64.png");
    // untiled, the same request gives diffusers' untiled image (45/255 away from the tiled)
    assert_image(&p, &request(&p, false), "vae_tiling/txt2img-64-untiled.png");
}

#[test]
fn tiled_encode_and_decode_match_diffusers() {
    let p = tiny();
    let picture = Picture::open(&fixtures().join("img2img/tiny2.png")).unwrap();
    let r = Request {
        image: Some(InitImage {
            pixels: picture.to_tensor(64, 64).unwrap(),
            strength: 0.6,
            mask: None,
        }),
        ..request(&p, true)
    };
    assert_image(&p, &r, "vae_tiling/img2img-64.png");
}
