//! OpenAI's image API (`POST /v1/images/generations`), for clients built on the `openai`
//! libraries: chat front-ends, agents.
//!
//! `size` is any `WIDTHxHEIGHT` the model can make (or `auto`: the model's own); images come
//! back as `b64_json` only (a `url` would need a file store); `model`, `quality`, `style` and
//! `user` are accepted and ignored. Beyond OpenAI's keys, `seed`, `negative_prompt`, `steps`,
//! `guidance` and `scheduler` may be given, as sdgen's flags are named.

use super::http::{base64, parse_body, with_timing, Api, ApiError, Ask, Shared};
use crate::conditioning::PromptSyntax;
use crate::rng::RngKind;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::Response;
use serde::Deserialize;
use serde_json::json;

const API: Api = Api::OpenAi;

/// `POST /v1/images/generations`'s body.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Generations {
    pub prompt: Option<String>,
    pub n: Option<usize>,
    pub size: Option<String>,
    pub response_format: Option<String>,
    pub model: Option<String>,
    pub seed: Option<u64>,
    pub negative_prompt: Option<String>,
    pub steps: Option<usize>,
    pub guidance: Option<f64>,
    pub scheduler: Option<String>,
}

/// `WIDTHxHEIGHT`, or `auto` (`None`: the model's size).
fn parse_size(size: &str) -> Result<Option<(usize, usize)>, ApiError> {
    if size == "auto" {
        return Ok(None);
    }
    let parsed = size
        .split_once('x')
        .and_then(|(w, h)| Some((w.parse().ok()?, h.parse().ok()?)));
    match parsed {
        Some(wh) => Ok(Some(wh)),
        None => Err(ApiError::bad(
            API,
            format!("size {size:?}: WIDTHxHEIGHT, such as 512x512, or auto"),
        )),
    }
}

/// `POST /v1/images/generations`.
pub async fn generations(
    State(s): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: Generations = parse_body(API, body)?;
    let prompt = match req.prompt {
        Some(p) if !p.is_empty() => p,
        _ => return Err(ApiError::bad(API, "prompt is required")),
    };
    match req.response_format.as_deref() {
        None | Some("b64_json") => {}
        Some(other) => {
            return Err(ApiError::bad(
                API,
                format!("response_format {other:?} is not supported; use \"b64_json\""),
            ))
        }
    }
    let size = parse_size(req.size.as_deref().unwrap_or("auto"))?;
    let n = req.n.unwrap_or(1);
    let ask = Ask {
        prompt,
        negative_prompt: req.negative_prompt.unwrap_or_default(),
        seed: req.seed,
        num_images: n,
        batch_size: 1,
        steps: req.steps.unwrap_or(50),
        guidance: req.guidance.unwrap_or(7.5),
        scheduler: req.scheduler,
        width: size.map(|s| s.0),
        height: size.map(|s| s.1),
        clip_skip: 1,
        prompt_syntax: PromptSyntax::Plain,
        rng: RngKind::TorchCpu,
    };
    let request = s.request(API, ask)?;
    let finished = s.generate(API, request, Default::default()).await?;
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let data: Vec<_> = finished
        .images
        .iter()
        .map(|i| json!({"b64_json": base64(&i.png)}))
        .collect();
    Ok(with_timing(
        &finished,
        json!({"created": created, "data": data}),
    ))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512x384").unwrap(), Some((512, 384)));
        assert_eq!(parse_size("auto").unwrap(), None);
        for bad in ["512", "x512", "512x", "ax512", "-8x8", "512X512"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
