//! Inpainting against diffusers' `StableDiffusionInpaintPipeline` (scripts/make_fixtures.py
//! `record_inpaint`): a 9-channel inpainting U-Net (tiny with models/tiny_inpaint_unet) and the
//! masked blending of a plain model, several schedulers and strengths, a mask with gray areas
//! on both sides of the binarization threshold.

mod common;

use candle_core::{DType, Device};
use common::{assert_image, fixtures, model_dir, read_json, seed42_request};
use sdgen::input_image::Picture;
use sdgen::pipeline::{InitImage, Pipeline, Request};
use sdgen::source::{ModelFiles, Precision};
use std::path::Path;

fn load(dir: &Path) -> Pipeline {
    let files = ModelFiles::from_folder(dir, Precision::Full).unwrap();
    Pipeline::load(files, Device::Cpu, DType::F32).unwrap()
}

/// tiny with the 9-channel U-Net, as the fixture script composes it.
fn tiny_inpaint(dir: &Path) -> Pipeline {
    common::edited_tiny(
        &serde_json::json!({"model_index.json": {"_class_name": "StableDiffusionInpaintPipeline"}}),
        dir,
    );
    for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(
            model_dir("tiny_inpaint_unet").join(f),
            dir.join("unet").join(f),
        )
        .unwrap();
    }
    load(dir)
}

fn request(p: &Pipeline, scheduler: &str, strength: f64, blur: f32) -> Request {
    let picture = Picture::open(&fixtures().join("img2img/tiny.png")).unwrap();
    let mask = Picture::open(&fixtures().join("img2img/tiny-mask.png")).unwrap();
    Request {
        scheduler: Some(scheduler.into()),
        width: 32,
        height: 32,
        image: Some(InitImage {
            pixels: picture.to_tensor(32, 32).unwrap(),
            strength,
            mask: Some(mask.to_mask(32, 32, blur).unwrap()),
        }),
        ..seed42_request(p, &read_json("tiny/e2e.json"))
    }
}

#[test]
fn inpainting_matches_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    let (tiny, inpaint) = (load(&model_dir("tiny")), tiny_inpaint(dir.path()));
    let cases = read_json("inpaint/cases.json");
    for case in cases["cases"].as_array().unwrap() {
        let p = if case["model"] == "tiny" {
            &tiny
        } else {
            &inpaint
        };
        let r = request(
            p,
            case["scheduler"].as_str().unwrap(),
            case["strength"].as_f64().unwrap(),
            0.0,
        );
        assert_image(p, &r, &format!("inpaint/{}", case["png"].as_str().unwrap()));
    }
}

/// An inpainting model needs a picture and a mask.
#[test]
fn an_inpainting_model_without_a_mask_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = tiny_inpaint(dir.path());
    let r = seed42_request(&p, &read_json("tiny/e2e.json"));
    let e = format!("{:#}", p.validate(&r).unwrap_err());
    assert!(e.contains("inpainting model"), "{e}");
}

/// A 40x40 mask for a 32x32 picture: resized with PIL's Lanczos, then binarized.
#[test]
fn masks_of_another_size_are_resized_as_diffusers_resizes_them() {
    let p = load(&model_dir("tiny"));
    let mut r = request(&p, "euler", 1.0, 0.0);
    let mask = Picture::open(&fixtures().join("img2img/tiny-mask-40.png")).unwrap();
    r.image.as_mut().unwrap().mask = Some(mask.to_mask(32, 32, 0.0).unwrap());
    assert_image(&p, &r, "inpaint/mask40-tiny-euler-1.0.png");
}

/// `--mask-blur 4`: diffusers' `mask_processor.blur(mask, 4)` (PIL's Gaussian blur) before the
/// pipeline binarizes it, and the blurred mask's soft overlay.
#[test]
fn blurred_masks_are_pils() {
    let p = load(&model_dir("tiny"));
    assert_image(
        &p,
        &request(&p, "euler", 1.0, 4.0),
        "inpaint/blur4-tiny-euler-1.0.png",
    );
    let rgb = |rel: &str| image::open(fixtures().join(rel)).unwrap().to_rgb8();
    let mut generated = rgb("reference/inpaint/blur4-tiny-euler-1.0.png").into_raw();
    let picture = Picture::open(&fixtures().join("img2img/tiny.png")).unwrap();
    let mask = Picture::open(&fixtures().join("img2img/tiny-mask.png")).unwrap();
    let blurred = mask.mask_gray(32, 32, 4.0);
    sdgen::input_image::overlay(&mut generated, &picture.rgb_at(32, 32), &blurred);
    let want = rgb("reference/inpaint/blur4-overlay-tiny-euler-1.0.png").into_raw();
    assert_eq!(common::pixel_diff(&generated, &want).0, 0);
}

/// `--keep-unmasked`: diffusers' `apply_overlay` (PIL's paste, unpremultiply and alpha
/// composite) of the picture over an inpainted image, with the mask as given: exact.
#[test]
fn overlay_is_pils() {
    let rgb = |rel: &str| image::open(fixtures().join(rel)).unwrap().to_rgb8();
    let mut generated = rgb("reference/inpaint/tiny-euler-1.0.png").into_raw();
    let picture = Picture::open(&fixtures().join("img2img/tiny.png")).unwrap();
    let mask = Picture::open(&fixtures().join("img2img/tiny-mask.png")).unwrap();
    sdgen::input_image::overlay(&mut generated, &picture.rgb_at(32, 32), &mask.gray(32, 32));
    let want = rgb("reference/inpaint/overlay-tiny-euler-1.0.png").into_raw();
    assert_eq!(common::pixel_diff(&generated, &want).0, 0);
    // where the mask keeps (black), the picture's own pixels
    assert_eq!(&generated[..3], &picture.rgb.as_raw()[..3]);
}
