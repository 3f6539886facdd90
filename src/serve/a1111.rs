//! The web UI's API (AUTOMATIC1111's `/sdapi/v1/...`), as far as sdgen can honour it: what
//! clients such as `webuiapi`, chat front-ends and editor plugins call: txt2img, img2img (with
//! inpainting), the listings, progress and interrupt.
//!
//! Differences from the web UI, by design: the images are diffusers' (as the CLI's, seed for
//! seed), not the web UI's k-diffusion samplers'; samplers without an exact diffusers
//! equivalent are refused (400) instead of run approximately; `width`/`height` must be
//! multiples of the model's 8; fields sdgen has no use for (hires fix, face restoration,
//! scripts, subseeds, styles) are accepted and ignored, as the web UI ignores unknown ones.

use super::http::{base64, parse_body, unbase64, with_timing, Api, ApiError, Ask, Shared};
use super::worker::{utc_timestamp, Extras, Finished};
use crate::conditioning::PromptSyntax;
use crate::infotext::{Pictures, Source};
use crate::input_image::{self, Picture};
use crate::pipeline::Request;
use crate::rng::RngKind;
use crate::schedulers::WEB_UI_NAMES;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

const API: Api = Api::WebUi;

/// `POST /sdapi/v1/txt2img`'s body: the web UI's names and defaults (its API's
/// `StableDiffusionProcessingTxt2Img`). Unknown keys are ignored; `null` means the default.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct Txt2Img {
    pub prompt: Option<String>,
    pub negative_prompt: Option<String>,
    /// -1 (or null): random.
    pub seed: Option<i64>,
    pub steps: Option<usize>,
    pub cfg_scale: Option<f64>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub sampler_name: Option<String>,
    /// The web UI's older key for the sampler, used when `sampler_name` is absent.
    pub sampler_index: Option<String>,
    /// The web UI's schedule type (1.9+): "Automatic" or "Karras" map onto diffusers'.
    pub scheduler: Option<String>,
    pub batch_size: Option<usize>,
    pub n_iter: Option<usize>,
    pub override_settings: Option<Map<String, Value>>,
    pub send_images: Option<bool>,
}

/// The web UI API's defaults.
const DEFAULT_STEPS: usize = 50;
const DEFAULT_CFG: f64 = 7.0;
const DEFAULT_SAMPLER: &str = "Euler";

impl Txt2Img {
    /// The web UI name of the sampler and schedule asked for ("DPM++ 2M Karras"), or an error
    /// for a schedule diffusers has no exact equivalent of.
    fn sampler(&self) -> Result<String, ApiError> {
        let name = self
            .sampler_name
            .clone()
            .or_else(|| self.sampler_index.clone())
            .unwrap_or_else(|| DEFAULT_SAMPLER.into());
        match self.scheduler.as_deref().map(str::to_ascii_lowercase) {
            None => Ok(name),
            Some(s) if s == "automatic" || s.is_empty() => Ok(name),
            Some(s) if s == "karras" => {
                if name.to_ascii_lowercase().ends_with(" karras") {
                    return Ok(name);
                }
                let with = format!("{name} Karras");
                if WEB_UI_NAMES.iter().any(|w| w.0.eq_ignore_ascii_case(&with)) {
                    Ok(with)
                } else {
                    Err(ApiError::bad(
                        API,
                        format!("the sampler {name:?} has no Karras schedule in diffusers"),
                    ))
                }
            }
            Some(_) => Err(ApiError::bad(
                API,
                format!(
                    "the schedule type {:?} has no exact diffusers equivalent; use \"Automatic\" or \"Karras\"",
                    self.scheduler.as_deref().unwrap_or_default()
                ),
            )),
        }
    }

    fn ask(&self, sampler: String) -> Result<Ask, ApiError> {
        let seed = match self.seed {
            None | Some(-1) => None,
            Some(s) if s >= 0 => Some(s as u64),
            Some(s) => return Err(ApiError::bad(API, format!("seed {s}: -1 (random) or >= 0"))),
        };
        let overrides = self.override_settings.clone().unwrap_or_default();
        // the settings sdgen can honour; the others are ignored, as the web UI ignores keys
        // it does not know
        let clip_skip = match overrides.get("CLIP_stop_at_last_layers") {
            None | Some(Value::Null) => 1,
            Some(v) => v.as_u64().filter(|&v| v >= 1).ok_or_else(|| {
                ApiError::bad(
                    API,
                    format!("CLIP_stop_at_last_layers {v}: a whole number >= 1"),
                )
            })? as usize,
        };
        let rng = match overrides.get("randn_source").and_then(Value::as_str) {
            None | Some("CPU") => RngKind::TorchCpu,
            Some("GPU") | Some("NV") => RngKind::TorchCuda,
            Some(other) => {
                return Err(ApiError::bad(
                    API,
                    format!("randn_source {other:?}: \"CPU\", \"GPU\" or \"NV\""),
                ))
            }
        };
        let batch_size = self.batch_size.unwrap_or(1);
        let n_iter = self.n_iter.unwrap_or(1);
        Ok(Ask {
            prompt: self.prompt.clone().unwrap_or_default(),
            negative_prompt: self.negative_prompt.clone().unwrap_or_default(),
            seed,
            num_images: batch_size.saturating_mul(n_iter),
            batch_size: batch_size.max(1),
            steps: self.steps.unwrap_or(DEFAULT_STEPS),
            guidance: self.cfg_scale.unwrap_or(DEFAULT_CFG),
            scheduler: Some(sampler),
            width: Some(self.width.unwrap_or(512)),
            height: Some(self.height.unwrap_or(512)),
            clip_skip,
            prompt_syntax: PromptSyntax::A1111,
            rng,
        })
    }
}

/// `POST /sdapi/v1/txt2img`.
pub async fn txt2img(
    State(s): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: Txt2Img = parse_body(API, body)?;
    let sampler = req.sampler()?;
    let request = s.request(API, req.ask(sampler.clone())?)?;
    let finished = s.generate(API, request.clone(), Extras::default()).await?;
    let echo = serde_json::to_value(&req).unwrap_or(Value::Null);
    Ok(answer(
        &s,
        &request,
        &sampler,
        &finished,
        echo,
        req.send_images,
    ))
}

/// `POST /sdapi/v1/img2img`'s body: txt2img's keys and the start picture's.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct Img2Img {
    #[serde(flatten)]
    pub base: Txt2Img,
    /// base64 pictures; the first is used.
    pub init_images: Option<Vec<String>>,
    pub denoising_strength: Option<f64>,
    /// base64 inpainting mask: white is repainted.
    pub mask: Option<String>,
    pub mask_blur: Option<f32>,
    /// 1: black is repainted.
    pub inpainting_mask_invert: Option<u8>,
}

/// The web UI API's defaults for image-to-image.
const DEFAULT_STRENGTH: f64 = 0.75;
const DEFAULT_MASK_BLUR: f32 = 4.0;

/// `POST /sdapi/v1/img2img`: the first of `init_images` resized to `width` x `height` (the
/// web UI's "just resize", Lanczos), `denoising_strength`, and with `mask` inpainting with the
/// web UI's overlay of the kept parts. `inpainting_fill` and `inpaint_full_res` are ignored:
/// the whole picture is inpainted, as diffusers does.
pub async fn img2img(
    State(s): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let mut req: Img2Img = parse_body(API, body)?;
    let first = req
        .init_images
        .take()
        .unwrap_or_default()
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::bad(API, "init_images: one base64 picture is required"))?;
    let picture_bytes = unbase64(API, "init_images[0]", &first)?;
    let mask_bytes = req
        .mask
        .take()
        .map(|m| unbase64(API, "mask", &m))
        .transpose()?;
    let sampler = req.base.sampler()?;
    let mut request = s.request(API, req.base.ask(sampler.clone())?)?;
    let strength = req.denoising_strength.unwrap_or(DEFAULT_STRENGTH);
    if !(0.0..=1.0).contains(&strength) {
        return Err(ApiError::bad(
            API,
            format!("denoising_strength {strength} is outside [0, 1]"),
        ));
    }
    let blur = req.mask_blur.unwrap_or(DEFAULT_MASK_BLUR);
    if !(0.0..=64.0).contains(&blur) {
        return Err(ApiError::bad(
            API,
            format!("mask_blur {blur} is outside [0, 64]"),
        ));
    }
    let invert = req.inpainting_mask_invert.unwrap_or(0) != 0;
    let size = (request.width, request.height);
    // decoding, resizing and blurring take a while for large pictures: off the async threads
    let start = tokio::task::block_in_place(|| -> anyhow::Result<_> {
        let picture = Picture::from_bytes(&picture_bytes, "init_images[0]")?;
        let mask = mask_bytes
            .as_ref()
            .map(|b| Picture::from_bytes(b, "mask"))
            .transpose()?
            .map(|mut m| {
                if invert {
                    image::imageops::invert(&mut m.rgb);
                }
                m
            });
        input_image::start(&picture, mask.as_ref(), size, blur, Some(strength), true)
    })
    .map_err(|e| ApiError::bad(API, crate::app::one_line(&e)))?;
    request.image = Some(start.init);
    let extras = Extras {
        pictures: Pictures {
            image: Some(Source::bytes("init_images[0]", &picture_bytes)),
            mask: mask_bytes.as_ref().map(|b| Source::bytes("mask", b)),
            keep_unmasked: mask_bytes.is_some(),
            mask_blur: blur,
        },
        overlay: start.overlay,
    };
    let finished = s.generate(API, request.clone(), extras).await?;
    let echo = serde_json::to_value(&req).unwrap_or(Value::Null);
    Ok(answer(
        &s,
        &request,
        &sampler,
        &finished,
        echo,
        req.base.send_images,
    ))
}

/// The web UI's answer: the images, the request echoed, and `info`, its `Processed.js()`
/// with sdgen's values where it has them.
fn answer(
    s: &Shared,
    request: &Request,
    sampler: &str,
    finished: &Finished,
    echo: Value,
    send_images: Option<bool>,
) -> Response {
    let seeds = &request.seeds;
    let n = seeds.len();
    let infotexts: Vec<&str> = finished
        .images
        .iter()
        .map(|i| i.parameters.as_str())
        .collect();
    let info = json!({
        "prompt": request.prompt,
        "all_prompts": vec![&request.prompt; n],
        "negative_prompt": request.negative_prompt,
        "all_negative_prompts": vec![&request.negative_prompt; n],
        "seed": seeds[0],
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": vec![-1; n],
        "subseed_strength": 0,
        "width": request.width,
        "height": request.height,
        "sampler_name": sampler,
        "cfg_scale": request.guidance,
        "steps": request.steps,
        "batch_size": request.batch_size,
        "restore_faces": false,
        "face_restoration_model": null,
        "sd_model_name": s.queue.model.name,
        "sd_model_hash": null,
        "sd_vae_name": null,
        "sd_vae_hash": null,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": request.image.as_ref().map(|i| i.strength),
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": [],
        "job_timestamp": utc_timestamp(),
        "clip_skip": request.clip_skip,
        "is_using_inpainting_conditioning": false,
        "version": format!("sdgen {}", crate::app::VERSION),
        "interrupted": finished.interrupted,
    });
    let images: Vec<String> = if send_images.unwrap_or(true) {
        finished.images.iter().map(|i| base64(&i.png)).collect()
    } else {
        Vec::new()
    };
    with_timing(
        finished,
        json!({"images": images, "parameters": echo, "info": info.to_string()}),
    )
}

/// `GET /sdapi/v1/samplers`: the web UI's sampler names sdgen reproduces exactly.
pub async fn samplers() -> Json<Value> {
    Json(Value::Array(
        WEB_UI_NAMES
            .iter()
            .map(|(web, name, karras)| {
                let options = if *karras {
                    json!({"scheduler": "karras"})
                } else {
                    json!({})
                };
                json!({"name": web, "aliases": [name], "options": options})
            })
            .collect(),
    ))
}

/// `GET /sdapi/v1/sd-models`: the one loaded model.
pub async fn sd_models(State(s): State<Shared>) -> Json<Value> {
    let m = &s.queue.model;
    Json(json!([{
        "title": m.name,
        "model_name": m.name,
        "hash": null,
        "sha256": null,
        "filename": m.name,
        "config": null,
    }]))
}

/// `GET /sdapi/v1/options`: the settings clients read (the loaded model among them).
pub async fn options(State(s): State<Shared>) -> Json<Value> {
    Json(json!({
        "sd_model_checkpoint": s.queue.model.name,
        "CLIP_stop_at_last_layers": 1,
        "randn_source": "CPU",
    }))
}

/// `POST /sdapi/v1/options`: clients set `sd_model_checkpoint` before they generate (Open
/// WebUI does): the loaded model is accepted, another is a 400 (one model per server); the
/// other settings are ignored (those sdgen honours go in a request's `override_settings`).
pub async fn set_options(
    State(s): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let options: Map<String, Value> = parse_body(API, body)?;
    match options.get("sd_model_checkpoint") {
        None | Some(Value::Null) => {}
        Some(Value::String(m)) if *m == s.queue.model.name => {}
        Some(other) => {
            return Err(ApiError::bad(
                API,
                format!(
                    "sd_model_checkpoint {other}: this server serves {} only; start sdgen serve with another --model to change it",
                    s.queue.model.name
                ),
            ))
        }
    }
    Ok(Json(Value::Null))
}

/// `GET /sdapi/v1/progress`: the running job's fraction, step and estimated seconds left.
pub async fn progress(State(s): State<Shared>) -> Response {
    let p = s.queue.progress.lock().unwrap_or_else(|e| e.into_inner());
    let (fraction, eta, step, total, timestamp) = match &p.running {
        Some(r) if r.total > 0 => {
            let f = r.step as f64 / r.total as f64;
            let elapsed = r.started.elapsed().as_secs_f64();
            let eta = if f > 0.0 { elapsed / f - elapsed } else { 0.0 };
            (f, eta, r.step, r.total, r.timestamp.clone())
        }
        Some(r) => (0.0, 0.0, 0, 0, r.timestamp.clone()),
        None => (0.0, 0.0, 0, 0, String::new()),
    };
    let kind = p.running.as_ref().map_or("", |r| r.kind);
    let running = p.running.is_some();
    Json(json!({
        "progress": fraction,
        "eta_relative": eta,
        "state": {
            "skipped": false,
            "interrupted": p.interrupted,
            "job": kind,
            "job_count": p.queued + usize::from(running),
            "job_timestamp": timestamp,
            "job_no": 0,
            "sampling_step": step,
            "sampling_steps": total,
        },
        "current_image": null,
        "textinfo": null,
    }))
    .into_response()
}

/// `POST /sdapi/v1/interrupt`: the running job stops at its next step and answers with the
/// images it finished.
pub async fn interrupt(State(s): State<Shared>) -> Json<Value> {
    s.queue.interrupt();
    Json(json!({}))
}
