//! Image to image against diffusers' `StableDiffusionImg2ImgPipeline` (scripts/make_fixtures.py
//! `record_img2img`): every scheduler at strength 0.6, a few other strengths, both model
//! layouts, from the committed pictures at their own size.

mod common;

use candle_core::{DType, Device};
use common::{assert_image, fixtures, model_dir, read_json, seed42_request};
use sdgen::input_image::Picture;
use sdgen::pipeline::{InitImage, Pipeline, Request};
use sdgen::source::{ModelFiles, Precision};

fn load(model: &str) -> Pipeline {
    let files = ModelFiles::from_folder(&model_dir(model), Precision::Full).unwrap();
    Pipeline::load(files, Device::Cpu, DType::F32).unwrap()
}

fn request(p: &Pipeline, model: &str, scheduler: &str, strength: f64) -> Request {
    let picture = Picture::open(&fixtures().join(format!("img2img/{model}.png"))).unwrap();
    let (width, height) = picture.default_size(p.vae_scale_factor()).unwrap();
    Request {
        scheduler: Some(scheduler.into()),
        width,
        height,
        image: Some(InitImage {
            pixels: picture.to_tensor(width, height).unwrap(),
            strength,
            mask: None,
        }),
        ..seed42_request(p, &read_json(&format!("{model}/e2e.json")))
    }
}

#[test]
fn img2img_matches_diffusers_for_every_scheduler() {
    let cases = read_json("img2img/cases.json");
    let (tiny, tiny2) = (load("tiny"), load("tiny2"));
    let mut checked = 0;
    for case in cases["cases"].as_array().unwrap() {
        let model = case["model"].as_str().unwrap();
        let p = if model == "tiny" { &tiny } else { &tiny2 };
        let r = request(
            p,
            model,
            case["scheduler"].as_str().unwrap(),
            case["strength"].as_f64().unwrap(),
        );
        assert_image(p, &r, &format!("img2img/{}", case["png"].as_str().unwrap()));
        checked += 1;
    }
    assert!(checked >= sdgen::schedulers::SCHEDULERS.len() + 4);
}

/// A picture of 45x37 (no multiple of tiny's factor 2): diffusers' preprocessing resizes it
/// to 44x36 with PIL's Lanczos, as sdgen does.
#[test]
fn pictures_are_resized_as_diffusers_resizes_them() {
    let p = load("tiny");
    let picture = Picture::open(&fixtures().join("img2img/odd.png")).unwrap();
    let (width, height) = picture.default_size(p.vae_scale_factor()).unwrap();
    assert_eq!((width, height), (44, 36));
    let r = Request {
        scheduler: Some("euler".into()),
        width,
        height,
        image: Some(InitImage {
            pixels: picture.to_tensor(width, height).unwrap(),
            strength: 0.6,
            mask: None,
        }),
        ..seed42_request(&p, &read_json("tiny/e2e.json"))
    };
    assert_image(&p, &r, "img2img/tiny-odd-euler-0.6.png");
}

/// The resize itself, down and up, byte for byte against PIL's `resize(LANCZOS)`.
#[test]
fn lanczos_is_pils() {
    let picture = Picture::open(&fixtures().join("img2img/odd.png")).unwrap();
    for (w, h) in [(44, 36), (64, 80)] {
        let want = image::open(common::reference(&format!("img2img/odd-pil-{w}x{h}.png")))
            .unwrap()
            .to_rgb8();
        assert_eq!(
            sdgen::input_image::lanczos(&picture.rgb, w, h),
            want,
            "{w}x{h}"
        );
    }
}

/// A strength that leaves no step, and one outside [0, 1], are errors before any work.
#[test]
fn strengths_that_cannot_run() {
    let p = load("tiny");
    for (strength, expect) in [(0.1, "leaves no denoising step"), (1.5, "outside [0, 1]")] {
        let r = request(&p, "tiny", "euler", strength);
        let e = format!("{:#}", p.validate(&r).unwrap_err());
        assert!(e.contains(expect), "{e}");
    }
}
