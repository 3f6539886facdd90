//! LoRAs, textual-inversion embeddings and the web UI's prompt syntax against the references
//! of scripts/make_fixtures.py (`record_addons`): diffusers' `load_lora_weights` +
//! `fuse_lora`, `load_textual_inversion`, and the web UI's chunking and emphasis as its
//! documented algorithm gives them.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_image, fixtures, model_dir, read_json, seed42_request};
use sdgen::addons::lora::LoraSpec;
use sdgen::conditioning::PromptSyntax;
use sdgen::pipeline::{Pipeline, Request};
use sdgen::source::{ModelFiles, Precision};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn addon(rel: &str) -> PathBuf {
    fixtures().join("addons").join(rel)
}

fn load(dir: &Path) -> Pipeline {
    let files = ModelFiles::from_folder(dir, Precision::Full).unwrap();
    Pipeline::load(files, Device::Cpu, DType::F32).unwrap()
}

fn addons_json() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(addon("addons.json")).unwrap()).unwrap()
}

fn embedding_files() -> [PathBuf; 3] {
    [
        addon("emb/shinyfox.pt"),
        addon("emb/glowcat.safetensors"),
        addon("emb/learned_embeds.safetensors"),
    ]
}

fn with_embeddings(mut p: Pipeline) -> Pipeline {
    for f in embedding_files() {
        p.add_embedding(&f).unwrap();
    }
    p
}

fn lora(file: &str, scale: f64) -> LoraSpec {
    LoraSpec {
        path: addon(file),
        te_scale: scale,
        unet_scale: scale,
    }
}

fn tiny_request(p: &Pipeline) -> Request {
    seed42_request(p, &read_json("tiny/e2e.json"))
}

#[test]
fn loras_match_diffusers_fused() {
    let p = load(&model_dir("tiny"));
    for (png, loras) in [
        ("lora-kohya-0.8", vec![lora("kohya.safetensors", 0.8)]),
        ("lora-peft-1.0", vec![lora("peft.safetensors", 1.0)]),
        (
            "lora-kohya-0.8+peft-0.5",
            vec![
                lora("kohya.safetensors", 0.8),
                lora("peft.safetensors", 0.5),
            ],
        ),
    ] {
        let r = Request {
            loras,
            ..tiny_request(&p)
        };
        assert_image(&p, &r, &format!("addons/{png}.png"));
    }
    // the same pipeline without LoRAs is the plain model again
    assert_image(&p, &tiny_request(&p), "tiny/e2e/pndm-42.png");
}

/// SD 2.x-shaped: linear projections (kohya's 2-D downs), the gelu text encoder.
#[test]
fn lora_on_the_sd2_shaped_model() {
    let p = load(&model_dir("tiny2"));
    let r = Request {
        loras: vec![lora("kohya_tiny2.safetensors", 0.7)],
        ..seed42_request(&p, &read_json("tiny2/e2e.json"))
    };
    assert_image(&p, &r, "addons/lora-tiny2-kohya-0.7.png");
}

#[test]
fn lora_tags_of_the_web_ui_syntax() {
    let p = load(&model_dir("tiny"));
    // a plain prompt in the web UI's syntax encodes as diffusers' (weights 1, padding = end)
    let mut r = tiny_request(&p);
    r.prompt = format!("{} <lora:kohya:0.8>", r.prompt);
    r.prompt_syntax = PromptSyntax::A1111;
    r.loras = vec![lora("kohya.safetensors", 0.8)];
    assert_image(&p, &r, "addons/lora-kohya-0.8.png");
    // the web UI reads tags in the prompt only: a negative prompt's are words
    r.negative_prompt = "blurry <lora:kohya:0.8>".into();
    let [prompt, negative] = r.texts().unwrap();
    assert!(!prompt.contains("<lora") && negative.contains("<lora:kohya:0.8>"));
}

#[test]
fn lora_errors_name_the_layer_or_the_keys() {
    // tiny2's layers have other shapes: the first adapted one is named
    let p = load(&model_dir("tiny2"));
    let r = Request {
        loras: vec![lora("kohya.safetensors", 1.0)],
        ..seed42_request(&p, &read_json("tiny2/e2e.json"))
    };
    let e = format!("{:#}", p.generate_all(&r).err().unwrap());
    assert!(
        e.contains("kohya.safetensors") && e.contains("layer "),
        "{e}"
    );
    // a LoRA whose layers the model lacks
    let dir = tempfile::tempdir().unwrap();
    let odd = dir.path().join("odd.safetensors");
    let t = |shape: &[usize]| Tensor::ones(shape, DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &HashMap::from([
            (
                "lora_unet_no_such_block_to_q.lora_down.weight".to_string(),
                t(&[2, 16]),
            ),
            (
                "lora_unet_no_such_block_to_q.lora_up.weight".to_string(),
                t(&[16, 2]),
            ),
        ]),
        &odd,
    )
    .unwrap();
    let p = load(&model_dir("tiny"));
    let r = Request {
        loras: vec![LoraSpec {
            path: odd,
            te_scale: 1.0,
            unet_scale: 1.0,
        }],
        ..tiny_request(&p)
    };
    let e = format!("{:#}", p.generate_all(&r).err().unwrap());
    assert!(
        e.contains("match nothing in the model's U-Net") && e.contains("no_such_block_to_q"),
        "{e}"
    );
}

#[test]
fn embeddings_match_diffusers_textual_inversion() {
    let p = with_embeddings(load(&model_dir("tiny")));
    let refs = addons_json();
    let e = &refs["embeddings"];
    let prompt = e["prompt"].as_str().unwrap();
    let want: Vec<u32> = serde_json::from_value(e["plain_ids"].clone()).unwrap();
    assert_eq!(
        p.tokenize(prompt, PromptSyntax::Plain).unwrap().ids,
        vec![want]
    );
    let r = Request {
        prompt: prompt.into(),
        negative_prompt: e["negative_prompt"].as_str().unwrap().into(),
        ..tiny_request(&p)
    };
    assert_image(&p, &r, "addons/embeddings.png");
}

#[test]
fn embedding_errors() {
    let mut p = load(&model_dir("tiny2"));
    // 16 values per vector, tiny2's encoder is 8 wide
    let e = format!(
        "{:#}",
        p.add_embedding(&addon("emb/glowcat.safetensors"))
            .unwrap_err()
    );
    assert!(e.contains("takes 8"), "{e}");
    let mut p = load(&model_dir("tiny"));
    p.add_embedding(&addon("emb/glowcat.safetensors")).unwrap();
    let e = format!(
        "{:#}",
        p.add_embedding(&addon("emb/glowcat.safetensors"))
            .unwrap_err()
    );
    assert!(e.contains("already in the tokenizer"), "{e}");
}

/// The web UI's chunks (ids and weights) of every case, for both tokenizers (tiny2 pads
/// with '!' after the first end token).
#[test]
fn web_ui_chunks_match_its_algorithm() {
    let refs = addons_json();
    for model in ["tiny", "tiny2"] {
        let mut p = load(&model_dir(model));
        if model == "tiny" {
            p = with_embeddings(p);
        }
        for case in refs["a1111"][model].as_array().unwrap() {
            let prompt = case["prompt"].as_str().unwrap();
            let text = sdgen::conditioning::positive_text(prompt, PromptSyntax::A1111).unwrap();
            let got = p.tokenize(&text, PromptSyntax::A1111).unwrap();
            let want = case["chunks"].as_array().unwrap();
            assert_eq!(got.ids.len(), want.len(), "{model} {prompt:?}: chunks");
            let weights = got.weights.as_ref().unwrap();
            for (i, w) in want.iter().enumerate() {
                let ids: Vec<u32> = serde_json::from_value(w["ids"].clone()).unwrap();
                let ws: Vec<f64> = serde_json::from_value(w["weights"].clone()).unwrap();
                let ws: Vec<f32> = ws.iter().map(|&x| x as f32).collect();
                assert_eq!(got.ids[i], ids, "{model} {prompt:?}: chunk {i} ids");
                assert_eq!(weights[i], ws, "{model} {prompt:?}: chunk {i} weights");
            }
        }
    }
}

/// A web UI prompt without weights encodes as diffusers' plain one (same chunk for a short
/// prompt, the emphasis's rescaling by mean / mean skipped), also where the text encoder's
/// output has a mean of exactly 0 (the tiny model: the web UI's arithmetic gives NaN there).
#[test]
fn web_ui_prompts_without_weights_encode_as_plain_ones() {
    let p = load(&model_dir("tiny"));
    for (prompt, negative) in [
        ("a cat", ""),
        ("a photo of a cat on a beach", "blurry, lowres"),
    ] {
        let plain = Request {
            prompt: prompt.into(),
            negative_prompt: negative.into(),
            ..tiny_request(&p)
        };
        let web = Request {
            prompt_syntax: PromptSyntax::A1111,
            ..plain.clone()
        };
        let (a, b) = (
            p.generate_all(&plain).unwrap(),
            p.generate_all(&web).unwrap(),
        );
        assert!(a[0].rgb == b[0].rgb, "{prompt:?} / {negative:?}");
    }
}

/// tiny with the random text-encoder LayerNorms of addons/tiny_ln_norms.safetensors, as the
/// fixture script builds it.
fn tiny_ln(dir: &Path) -> Pipeline {
    common::edited_tiny(&serde_json::json!({}), dir);
    let te = dir.join("text_encoder/model.safetensors");
    let mut tensors = candle_core::safetensors::load(&te, &Device::Cpu).unwrap();
    tensors.extend(
        candle_core::safetensors::load(addon("tiny_ln_norms.safetensors"), &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &te).unwrap();
    load(dir)
}

#[test]
fn web_ui_emphasis_and_long_prompts_match() {
    let dir = tempfile::tempdir().unwrap();
    let p = tiny_ln(dir.path());
    let refs = addons_json();
    for (name, pair) in refs["a1111_images"].as_object().unwrap() {
        let r = Request {
            prompt: pair[0].as_str().unwrap().into(),
            negative_prompt: pair[1].as_str().unwrap().into(),
            prompt_syntax: PromptSyntax::A1111,
            ..tiny_request(&p)
        };
        assert_image(&p, &r, &format!("addons/a1111-{name}.png"));
    }
}

/// A LoRA in bf16, on each bf16 kernel this CPU has and on the widening path: merged in f32
/// before the weights are packed, the image stays as near diffusers' f32 one as the plain
/// model's bf16 images do (without the LoRA it is 109/255 away).
#[test]
fn loras_in_bf16_on_the_packed_layouts() {
    use sdgen::ops::{self, CpuEngine, Engine};
    let mut kernels: Vec<_> = ops::bf16_kernels().into_iter().map(Some).collect();
    kernels.push(None);
    let want = image::open(common::reference("addons/lora-kohya-0.8.png"))
        .unwrap()
        .to_rgb8();
    for kernel in kernels {
        let files = ModelFiles::from_folder(&model_dir("tiny"), Precision::Half).unwrap();
        let engine = Engine::Cpu(CpuEngine::with_bf16(kernel));
        let p = Pipeline::load_on(files, Device::Cpu, DType::BF16, engine).unwrap();
        let r = Request {
            loras: vec![lora("kohya.safetensors", 0.8)],
            ..tiny_request(&p)
        };
        let img = &p.generate_all(&r).unwrap()[0];
        let (max, mean) = common::pixel_diff(&img.rgb, want.as_raw());
        eprintln!("bf16 {kernel:?}: max {max}/255, mean {mean:.4}/255");
        assert!(
            max <= 24 && mean <= 2.5,
            "bf16 {kernel:?}: max {max}/255, mean {mean:.4}/255"
        );
    }
}
