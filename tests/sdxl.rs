//! SDXL (`StableDiffusionXLPipeline`) against diffusers on the tiny random SDXL
//! (`scripts/make_fixtures.py --only-sdxl`): both text encoders and the pooled embedding, the
//! U-Net with its added conditioning, and whole images for several schedulers, with and
//! without a negative prompt, without guidance, with non-default size conditioning and at a
//! non-square size; and the add-ons (`--only-sdxl-addons`): LoRAs, embeddings, clip skip and
//! the web UI's prompt syntax.

mod common;
use candle_core::{DType, Device, Tensor};
use common::*;
use sdgen::pipeline::{AddedConditioning, Pipeline, Request, SizeConditioning};
use sdgen::source::{ModelFiles, Precision};

fn pipeline() -> Pipeline {
    let files = ModelFiles::from_folder(&model_dir("tiny_xl"), Precision::Full).unwrap();
    Pipeline::load(files, Device::Cpu, DType::F32).unwrap()
}

fn meta() -> serde_json::Value {
    read_json("tiny_xl/e2e.json")
}

/// The request of e2e.json's run `spec` (its scheduler, guidance and extra arguments).
fn request(p: &Pipeline, meta: &serde_json::Value, spec: &serde_json::Value) -> Request {
    let base = p.request(meta["prompt"].as_str().unwrap());
    let (mut height, mut width) = (base.height, base.width);
    if let (Some(h), Some(w)) = (spec["height"].as_u64(), spec["width"].as_u64()) {
        (height, width) = (h as usize, w as usize);
    }
    let pair = |key: &str| {
        spec[key].as_array().map(|a| {
            (
                a[0].as_u64().unwrap() as usize,
                a[1].as_u64().unwrap() as usize,
            )
        })
    };
    // "negative_prompt": null is diffusers' None: no negative prompt
    let negative = match spec.get("negative_prompt") {
        Some(serde_json::Value::Null) => String::new(),
        _ => meta["negative_prompt"].as_str().unwrap().into(),
    };
    Request {
        negative_prompt: negative,
        seeds: meta["seeds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_u64().unwrap())
            .collect(),
        steps: spec["num_inference_steps"]
            .as_u64()
            .or(meta["steps"].as_u64())
            .unwrap() as usize,
        guidance: spec["guidance"].as_f64().unwrap(),
        scheduler: Some(spec["scheduler"].as_str().unwrap().into()),
        width,
        height,
        batch_size: 2,
        sizes: SizeConditioning {
            original: pair("original_size"),
            crop_top_left: pair("crops_coords_top_left").unwrap_or((0, 0)),
            target: pair("target_size"),
            ..Default::default()
        },
        ..base
    }
}

/// The e2e euler run's request for seed 42 from the 64x64 `picture` at `strength`, with
/// `mask` for inpainting.
fn picture_request(
    p: &Pipeline,
    scheduler: &str,
    picture: &sdgen::input_image::Picture,
    strength: f64,
    mask: Option<&sdgen::input_image::Picture>,
) -> Request {
    let meta = meta();
    Request {
        seeds: vec![42],
        scheduler: Some(scheduler.into()),
        width: 64,
        height: 64,
        image: Some(sdgen::pipeline::InitImage {
            pixels: picture.to_tensor(64, 64).unwrap(),
            strength,
            mask: mask.map(|m| m.to_mask(64, 64, 0.0).unwrap()),
        }),
        ..request(p, &meta, &meta["runs"]["euler"])
    }
}

/// `rgb` within `max_tol`/255 (and a mean of `mean_tol`/255) of the reference PNG `png`.
fn assert_near(rgb: &[u8], png: &str, max_tol: u8, mean_tol: f64) {
    let want = image::open(reference(png)).unwrap().to_rgb8();
    let (max, mean) = pixel_diff(rgb, want.as_raw());
    eprintln!("{png}: max {max}/255, mean {mean:.4}/255");
    assert!(
        max <= max_tol && mean <= mean_tol,
        "{png}: max {max}/255, mean {mean:.4}/255"
    );
}

#[test]
fn both_text_encoders_and_the_pooled_embedding_match_diffusers() {
    let p = pipeline();
    let refs = load_tensors("tiny_xl/tensors.safetensors");
    let meta = meta();
    let spec = &meta["runs"]["euler"];
    let r = request(&p, &meta, spec);
    let cond = p.encode_prompt(&r.prompt, &r).unwrap();
    assert_close("prompt_embeds", &cond.context, &refs["prompt_embeds"], 1e-5);
    assert_close(
        "pooled",
        cond.pooled.as_ref().unwrap(),
        &refs["pooled"],
        1e-5,
    );
    let uncond = p.encode_prompt(&r.negative_prompt, &r).unwrap();
    assert_close(
        "negative_prompt_embeds",
        &uncond.context,
        &refs["negative_prompt_embeds"],
        1e-5,
    );
    assert_close(
        "negative_pooled",
        uncond.pooled.as_ref().unwrap(),
        &refs["negative_pooled"],
        1e-5,
    );
}

/// The added conditioning of the U-Net inputs in tiny_xl/tensors.safetensors.
fn reference_added(refs: &std::collections::HashMap<String, Tensor>) -> AddedConditioning {
    let ids: Vec<Vec<f32>> = refs["unet_time_ids"].to_vec2().unwrap();
    AddedConditioning {
        text_embeds: refs["unet_text_embeds"].clone(),
        time_ids: ids
            .iter()
            .map(|row| row.iter().map(|&v| f64::from(v)).collect())
            .collect(),
    }
}

#[test]
fn the_unet_with_added_conditioning_matches_diffusers() {
    let p = pipeline();
    let refs = load_tensors("tiny_xl/tensors.safetensors");
    let added = reference_added(&refs);
    let got = p
        .unet_forward_xl(&refs["unet_sample"], 500.0, &refs["unet_context"], &added)
        .unwrap();
    assert_close("unet t=500", &got, &refs["unet_out_t500"], 1e-4);
    // without the added conditioning the SDXL U-Net refuses to run
    let e = p
        .unet_forward(&refs["unet_sample"], 500.0, &refs["unet_context"])
        .unwrap_err();
    assert!(e.to_string().contains("added"), "{e}");
}

#[test]
fn every_recorded_image_matches_diffusers() {
    let meta = meta();
    let runs = meta["runs"].as_object().unwrap();
    assert!(runs.len() >= 9, "{runs:?}");
    for (run, spec) in runs {
        // a run's scheduler_config keys (SDXL-Turbo's "trailing") go into the model's config
        let mut p = pipeline();
        if let Some(keys) = spec["scheduler_config"].as_object() {
            for (k, v) in keys {
                p.scheduler_config.set(k, v.clone());
            }
        }
        let r = request(&p, &meta, spec);
        let images = p.generate_all(&r).unwrap();
        for (img, seed) in images.iter().zip(&r.seeds) {
            assert_eq!((img.width, img.height), (r.width, r.height));
            assert_near(&img.rgb, &format!("tiny_xl/e2e/{run}-{seed}.png"), 2, 0.25);
        }
    }
}

#[test]
fn zeros_without_a_negative_prompt_differ_from_encoding_the_empty_text() {
    // the reference images for "no negative prompt" (zeros) are not those of an encoded "":
    // check that the two conditionings differ, so that the image test above can tell them
    let p = pipeline();
    let meta = meta();
    let r = request(&p, &meta, &meta["runs"]["euler_no_negative"]);
    let empty = p.encode_prompt("", &r).unwrap();
    let zero = Tensor::zeros_like(&empty.context).unwrap();
    assert!(max_abs_diff(&to_vec(&empty.context), &to_vec(&zero)) > 0.1);
}

fn xl_lora(file: &str, scale: f64) -> sdgen::addons::lora::LoraSpec {
    sdgen::addons::lora::LoraSpec {
        path: fixtures().join("addons").join(file),
        te_scale: scale,
        unet_scale: scale,
    }
}

/// SDXL LoRAs against diffusers' `load_lora_weights` + `fuse_lora`: kohya's (the U-Net's
/// layers by their original SGM names, LoCon convolutions, both text encoders as
/// lora_te1_/lora_te2_) and PEFT's (U-Net attention, both encoders), alone and together.
#[test]
fn sdxl_loras_match_diffusers_fused() {
    let p = pipeline();
    for (png, loras) in [
        ("lora-kohya-0.8", vec![xl_lora("kohya_xl.safetensors", 0.8)]),
        ("lora-peft-1.0", vec![xl_lora("peft_xl.safetensors", 1.0)]),
        (
            "lora-kohya-0.8+peft-0.5",
            vec![
                xl_lora("kohya_xl.safetensors", 0.8),
                xl_lora("peft_xl.safetensors", 0.5),
            ],
        ),
    ] {
        let r = Request {
            loras,
            ..seed42_request(&p, &meta())
        };
        assert_image(&p, &r, &format!("tiny_xl/{png}.png"));
    }
    // and without: the plain model's image, which the LoRAs' images are far from
    let plain = p.generate_all(&seed42_request(&p, &meta())).unwrap();
    assert_differs(&plain[0].rgb, "tiny_xl/lora-kohya-0.8.png");
}

/// `rgb` more than 8/255 (4 times the images' tolerance) away from the reference PNG `png`
/// somewhere: the image tests can tell the feature from its absence.
fn assert_differs(rgb: &[u8], png: &str) {
    let want = image::open(reference(png)).unwrap().to_rgb8();
    let (max, _) = pixel_diff(rgb, want.as_raw());
    assert!(
        max > 8,
        "{png}: only {max}/255 from the image without the change"
    );
}

/// The same LoRAs on tiny_xl's single-file checkpoint (its weights renamed from the original
/// naming as they are read) give the same images.
#[test]
fn sdxl_loras_apply_to_a_single_file_checkpoint() {
    let file = fixtures().join("single_file/tiny_xl.safetensors");
    let files = ModelFiles::single_file(
        "tiny_xl.safetensors".into(),
        None,
        &file,
        Some(&model_dir("tiny_xl")),
    )
    .unwrap();
    let p = Pipeline::load(files, Device::Cpu, DType::F32).unwrap();
    let r = Request {
        loras: vec![
            xl_lora("kohya_xl.safetensors", 0.8),
            xl_lora("peft_xl.safetensors", 0.5),
        ],
        ..seed42_request(&p, &meta())
    };
    assert_image(&p, &r, "tiny_xl/lora-kohya-0.8+peft-0.5.png");
}

/// An SDXL LoRA on an SD 1.x model: one error naming the second text encoder.
#[test]
fn an_sdxl_lora_on_an_sd_model_is_refused() {
    let files = ModelFiles::from_folder(&model_dir("tiny"), Precision::Full).unwrap();
    let p = Pipeline::load(files, Device::Cpu, DType::F32).unwrap();
    let r = Request {
        loras: vec![xl_lora("kohya_xl.safetensors", 1.0)],
        ..seed42_request(&p, &read_json("tiny/e2e.json"))
    };
    let Err(e) = p.generate_all(&r) else {
        panic!("an SDXL LoRA ran on an SD 1.x model")
    };
    let e = format!("{e:#}");
    assert!(
        e.contains("second text encoder") && e.contains("SD 1.x"),
        "{e}"
    );
}

/// SDXL embeddings (clip_l and clip_g vectors; one word of 1 vector, one of 2, in the prompt
/// and the negative prompt) against diffusers' `load_textual_inversion` into each encoder.
#[test]
fn sdxl_embeddings_match_diffusers_textual_inversion() {
    let mut p = pipeline();
    for word in ["shinyxl", "dullxl"] {
        let f = fixtures().join(format!("addons/xl_emb/{word}.safetensors"));
        p.add_embedding(&f).unwrap();
    }
    let r = Request {
        prompt: "a shinyxl cat on a beach".into(),
        negative_prompt: "blurry, dullxl".into(),
        ..seed42_request(&p, &meta())
    };
    assert_image(&p, &r, "tiny_xl/embeddings.png");
    // without the embeddings the words are plain text, and the image another
    let plain = pipeline().generate_all(&r).unwrap();
    assert_differs(&plain[0].rgb, "tiny_xl/embeddings.png");
    // an SD 1.x embedding on SDXL, an SDXL one on SD 1.x: one error each
    let sd_emb = fixtures().join("addons/emb/glowcat.safetensors");
    let e = pipeline().add_embedding(&sd_emb).unwrap_err().to_string();
    assert!(e.contains("clip_l and clip_g"), "{e}");
    let files = ModelFiles::from_folder(&model_dir("tiny"), Precision::Full).unwrap();
    let mut sd = Pipeline::load(files, Device::Cpu, DType::F32).unwrap();
    let xl_emb = fixtures().join("addons/xl_emb/dullxl.safetensors");
    let e = sd.add_embedding(&xl_emb).unwrap_err().to_string();
    assert!(e.contains("SDXL embedding"), "{e}");
}

/// The web UI's "Clip skip: N" (diffusers' `clip_skip` N - 1) on both encoders, for the prompt
/// and the negative prompt, for every N the encoders allow.
#[test]
fn sdxl_clip_skip_matches_diffusers() {
    let p = pipeline();
    let mut checked = 0;
    for n in 2.. {
        let png = format!("tiny_xl/clip_skip/{n}.png");
        if !reference(&png).exists() {
            break;
        }
        assert_seed42_image(&p, &meta(), n, &png);
        checked += 1;
        // (the skip changes the image)
        let plain = p.generate_all(&seed42_request(&p, &meta())).unwrap();
        assert_differs(&plain[0].rgb, &png);
    }
    assert_eq!(checked, 2);
    // beyond the encoders' layers: refused before any work
    let r = Request {
        clip_skip: 4,
        ..seed42_request(&p, &meta())
    };
    let e = p.validate(&r).unwrap_err().to_string();
    assert!(e.contains("--clip-skip 4"), "{e}");
}

/// Prompts in the web UI's syntax (emphasis, BREAK, a prompt longer than one chunk, and
/// halves of different chunk counts run apart) against the fixture script's implementation of
/// the web UI's SDXL conditioning fed to diffusers.
#[test]
fn web_ui_prompts_match_its_sdxl_conditioning() {
    let p = pipeline();
    let cases = read_json("tiny_xl/a1111.json");
    let cases = cases.as_object().unwrap();
    assert_eq!(cases.len(), 3);
    for (name, pair) in cases {
        let r = Request {
            prompt: pair[0].as_str().unwrap().into(),
            negative_prompt: pair[1].as_str().unwrap().into(),
            prompt_syntax: sdgen::conditioning::PromptSyntax::A1111,
            ..seed42_request(&p, &meta())
        };
        let png = format!("tiny_xl/a1111-{name}.png");
        assert_image(&p, &r, &png);
        // read as plain text the weights and BREAKs are words: another image
        let plain = Request {
            prompt_syntax: Default::default(),
            ..r
        };
        assert_differs(&p.generate_all(&plain).unwrap()[0].rgb, &png);
    }
}

/// The binary on the tiny SDXL with the e2e prompts, seed 42, 6 steps, guidance 7.5 and
/// `scheduler`, writing `out`, with `extra` flags.
fn sdgen_xl(scheduler: &str, out: &std::path::Path, extra: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_sdgen"))
        .args(["a photo of a cat on a beach", "-n", "blurry, lowres"])
        .args(["--seed", "42", "--steps", "6", "--guidance", "7.5", "-q"])
        .args(["--scheduler", scheduler])
        .arg("--model")
        .arg(model_dir("tiny_xl"))
        .arg("-o")
        .arg(out)
        .args(extra)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap()
}

/// The binary on the tiny SDXL: the size-conditioning flags (WIDTHxHEIGHT, TOP,LEFT) reach
/// diffusers' original_size / crops_coords_top_left / target_size, and what SDXL does not run
/// yet is one `error:` line.
#[test]
fn the_cli_runs_sdxl_with_size_conditioning() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("xl.png");
    let run = |extra: &[&str]| sdgen_xl("euler", &out, extra);
    let o = run(&[
        "--original-size",
        "80x48",
        "--crop-top-left",
        "4,8",
        "--target-size",
        "32x64",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = image::open(&out).unwrap().to_rgb8();
    assert_near(
        got.as_raw(),
        "tiny_xl/e2e/euler_size_conditioning-42.png",
        2,
        0.25,
    );
    // the PNG says how it was conditioned, in the flags' forms
    let reader = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&out).unwrap()))
        .read_info()
        .unwrap();
    let text: Vec<(String, String)> = reader
        .info()
        .uncompressed_latin1_text
        .iter()
        .map(|t| (t.keyword.clone(), t.text.clone()))
        .collect();
    for (key, want) in [
        ("original_size", "80x48"),
        ("crop_top_left", "4,8"),
        ("target_size", "32x64"),
    ] {
        assert!(
            text.iter().any(|(k, v)| k == key && v == want),
            "{key}: {text:?}"
        );
    }

    std::fs::remove_file(&out).unwrap();
    let sd_embedding = fixtures().join("addons/emb/glowcat.safetensors");
    let o = run(&["--embedding", sd_embedding.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error: ") && err.contains("SDXL"), "{err}");
    assert!(!out.exists());
    // the refiner's aesthetic score on the base model: refused, not ignored
    let o = run(&["--aesthetic-score", "7"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with("error: ") && err.contains("refiner"),
        "{err}"
    );
    assert!(!out.exists());

    // the size flags on an SD 1.x model: refused, not ignored
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_sdgen"))
        .args(["a cat", "--original-size", "64x64", "-q", "-o"])
        .arg(&out)
        .arg("--model")
        .arg(model_dir("tiny"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("size conditioning"), "{err}");
    assert!(!out.exists());
}

/// A U-Net in shards (what diffusers saves for weights over 10 GB, such as SDXL's U-Net in
/// f32): the index and its shards are read as the single file; an index naming a shard
/// outside its folder is refused.
#[test]
fn sharded_weights_read_as_the_single_file() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("tiny_xl");
    copy_dir(&model_dir("tiny_xl"), &copy);
    let unet = copy.join("unet");
    let single = unet.join("diffusion_pytorch_model.safetensors");
    let tensors = candle_core::safetensors::load(&single, &Device::Cpu).unwrap();
    std::fs::remove_file(&single).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let half = names.len() / 2;
    let mut weight_map = serde_json::Map::new();
    for (i, part) in [&names[..half], &names[half..]].iter().enumerate() {
        let file = format!("diffusion_pytorch_model-0000{}-of-00002.safetensors", i + 1);
        let shard: std::collections::HashMap<String, Tensor> = part
            .iter()
            .map(|n| ((*n).clone(), tensors[*n].clone()))
            .collect();
        candle_core::safetensors::save(&shard, unet.join(&file)).unwrap();
        for n in part.iter() {
            weight_map.insert((*n).clone(), file.clone().into());
        }
    }
    let index = unet.join("diffusion_pytorch_model.safetensors.index.json");
    let write_index = |map: &serde_json::Map<String, serde_json::Value>| {
        let v = serde_json::json!({"metadata": {}, "weight_map": map});
        std::fs::write(&index, serde_json::to_vec(&v).unwrap()).unwrap();
    };
    write_index(&weight_map);

    let files = ModelFiles::from_folder(&copy, Precision::Full).unwrap();
    let p = Pipeline::load(files, Device::Cpu, DType::F32).unwrap();
    let meta = meta();
    let r = request(&p, &meta, &meta["runs"]["euler"]);
    let images = p.generate_all(&r).unwrap();
    let want = image::open(reference("tiny_xl/e2e/euler-42.png"))
        .unwrap()
        .to_rgb8();
    let (max, _) = pixel_diff(&images[0].rgb, want.as_raw());
    assert!(max <= 2, "max {max}/255");

    let first = weight_map.keys().next().unwrap().clone();
    weight_map.insert(first, "../evil.safetensors".into());
    write_index(&weight_map);
    let files = ModelFiles::from_folder(&copy, Precision::Full).unwrap();
    let p = Pipeline::load(files, Device::Cpu, DType::F32).unwrap();
    let e = format!("{:#}", p.generate_all(&r).err().unwrap());
    assert!(e.contains("refusing"), "{e}");
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// Every case of `tiny_xl/{kind}/cases.json` (its picture, and its mask for inpainting)
/// against diffusers' image on `p`; how many were checked.
fn check_picture_cases(p: &Pipeline, kind: &str) -> usize {
    let cases = read_json(&format!("tiny_xl/{kind}/cases.json"));
    let open = |key: &str| {
        cases[key]
            .as_str()
            .map(|f| sdgen::input_image::Picture::open(&fixtures().join(f)).unwrap())
    };
    let (picture, mask) = (open("picture").unwrap(), open("mask"));
    // the pictures are at the model's sizes: their own size is the request's
    assert_eq!(
        picture.default_size(p.vae_scale_factor()).unwrap(),
        (64, 64)
    );
    let mut checked = 0;
    for case in cases["cases"].as_array().unwrap() {
        let scheduler = case["scheduler"].as_str().unwrap();
        let strength = case["strength"].as_f64().unwrap();
        let mut r = picture_request(p, scheduler, &picture, strength, mask.as_ref());
        // the refiner's aesthetic scores, where the case sets them
        r.sizes.aesthetic_score = case["aesthetic_score"].as_f64();
        r.sizes.negative_aesthetic_score = case["negative_aesthetic_score"].as_f64();
        let png = format!("tiny_xl/{kind}/{}", case["png"].as_str().unwrap());
        assert_near(&p.generate_all(&r).unwrap()[0].rgb, &png, 2, 0.25);
        checked += 1;
    }
    checked
}

/// Image to image against diffusers' `StableDiffusionXLImg2ImgPipeline` (the base model's, no
/// aesthetic score) from the committed 64x64 picture, for the recorded schedulers and strengths.
#[test]
fn img2img_matches_diffusers() {
    assert!(check_picture_cases(&pipeline(), "img2img") >= 4);
}

/// Image to image in half precision: the picture is encoded in f32 (`force_upcast`), its
/// latents then join the model's type; the images stay near diffusers' f32 one.
#[test]
fn img2img_in_half_precision_stays_near_f32() {
    let picture = sdgen::input_image::Picture::open(&fixtures().join("img2img/tiny2.png")).unwrap();
    for (dtype, max_tol) in [(DType::BF16, 24), (DType::F16, 4)] {
        let files = ModelFiles::from_folder(&model_dir("tiny_xl"), Precision::Half).unwrap();
        let p = Pipeline::load(files, Device::Cpu, dtype).unwrap();
        let r = picture_request(&p, "euler", &picture, 0.6, None);
        eprint!("{dtype:?}: ");
        let rgb = &p.generate_all(&r).unwrap()[0].rgb;
        assert_near(rgb, "tiny_xl/img2img/euler-0.6.png", max_tol, 2.5);
    }
}

/// Inpainting against diffusers' `StableDiffusionXLInpaintPipeline` with tiny_xl's 4-channel
/// U-Net (the masked blending): strength 1, below 1, and diffusers' default 0.9999.
#[test]
fn inpainting_matches_diffusers() {
    assert!(check_picture_cases(&pipeline(), "inpaint") >= 3);
}

/// tiny_xl in `dir` with the U-Net of the fixture folder `unet`, as the fixture script
/// composes it.
fn tiny_xl_with_unet(dir: &std::path::Path, unet: &str) {
    copy_dir(&model_dir("tiny_xl"), dir);
    for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(model_dir(unet).join(f), dir.join("unet").join(f)).unwrap();
    }
}

/// A U-Net with per-layer transformer counts and the up blocks' own counts
/// (`reverse_transformer_layers_per_block`, as distilled SDXL U-Nets such as SSD-1B configure
/// them) against diffusers' output for the same inputs.
#[test]
fn an_asymmetric_unet_matches_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    tiny_xl_with_unet(dir.path(), "tiny_xl_asym_unet");
    let files = ModelFiles::from_folder(dir.path(), Precision::Full).unwrap();
    let p = Pipeline::load(files, Device::Cpu, DType::F32).unwrap();
    let refs = load_tensors("tiny_xl/tensors.safetensors");
    let want = load_tensors("tiny_xl/asym_unet.safetensors");
    let added = reference_added(&refs);
    let got = p
        .unet_forward_xl(&refs["unet_sample"], 500.0, &refs["unet_context"], &added)
        .unwrap();
    assert_close("asymmetric unet t=500", &got, &want["out_t500"], 1e-4);
}

/// SDXL's refiner (the Hub's layout: model_index.json with `requires_aesthetics_score` and no
/// `text_encoder`; only `text_encoder_2/` and `tokenizer_2/`) against diffusers'
/// `StableDiffusionXLImg2ImgPipeline`: the one OpenCLIP encoder, the aesthetic scores (6 and
/// 2.5) in the added conditioning, the negative prompt encoded (no zeros).
#[test]
fn the_refiner_matches_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    tiny_xl_with_unet(dir.path(), "tiny_xl_refiner_unet");
    for gone in ["text_encoder", "tokenizer"] {
        std::fs::remove_dir_all(dir.path().join(gone)).unwrap();
    }
    let index = dir.path().join("model_index.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
    v["_class_name"] = "StableDiffusionXLImg2ImgPipeline".into();
    v["requires_aesthetics_score"] = true.into();
    v["force_zeros_for_empty_prompt"] = false.into();
    v["text_encoder"] = serde_json::json!([null, null]);
    v["tokenizer"] = serde_json::json!([null, null]);
    std::fs::write(&index, v.to_string()).unwrap();
    let files = ModelFiles::from_folder(dir.path(), Precision::Full).unwrap();
    let p = Pipeline::load(files, Device::Cpu, DType::F32).unwrap();
    assert_eq!(check_picture_cases(&p, "refiner"), 3);
    // without a picture: refused before any work
    let e = p
        .validate(&seed42_request(&p, &meta()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("--image"), "{e}");
}

/// Inpainting with a 9-channel U-Net (the Hub's SDXL inpainting model's structure: tiny_xl
/// with models/tiny_xl_inpaint_unet, model_index StableDiffusionXLInpaintPipeline) against
/// diffusers: strengths 0.9999 (its default), 1 and 0.6.
#[test]
fn nine_channel_inpainting_matches_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    tiny_xl_with_unet(dir.path(), "tiny_xl_inpaint_unet");
    let index = dir.path().join("model_index.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
    v["_class_name"] = "StableDiffusionXLInpaintPipeline".into();
    v["requires_aesthetics_score"] = false.into();
    std::fs::write(&index, v.to_string()).unwrap();
    let files = ModelFiles::from_folder(dir.path(), Precision::Full).unwrap();
    let p = Pipeline::load(files, Device::Cpu, DType::F32).unwrap();
    assert_eq!(check_picture_cases(&p, "inpaint9"), 3);
}

/// The CLI's default strength is the SDXL pipelines': `--mask` without `--strength` gives
/// diffusers' default inpainting image (0.9999: 5 of 6 steps).
#[test]
fn the_cli_defaults_to_sdxls_strengths() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("xl.png");
    let (picture, mask) = (
        fixtures().join("img2img/tiny2.png"),
        fixtures().join("img2img/tiny2-mask.png"),
    );
    let o = sdgen_xl(
        "dpmpp_2m",
        &out,
        &[
            "--image",
            picture.to_str().unwrap(),
            "--mask",
            mask.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = image::open(&out).unwrap().to_rgb8();
    assert_near(got.as_raw(), "tiny_xl/inpaint/dpmpp_2m-0.9999.png", 2, 0.25);
}
