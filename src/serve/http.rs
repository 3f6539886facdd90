//! What both APIs share on the HTTP side: errors as JSON in each API's own shape, request
//! bodies read and checked, the API key, the limits, and the turn of an API's request into
//! the pipeline's.

use super::worker::{Extras, Finished, JobError, Queue, SubmitError};
use crate::conditioning::PromptSyntax;
use crate::pipeline::Request;
use crate::rng::RngKind;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::json;
use std::path::PathBuf;
use std::sync::Arc;

/// Which API a route belongs to: its errors take that API's shape.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Api {
    /// The web UI's: `{"error": "Bad Request", "detail": "..."}` (its FastAPI errors).
    WebUi,
    /// OpenAI's: `{"error": {"message": "...", "type": "...", "param": null, "code": ...}}`.
    OpenAi,
}

impl Api {
    /// The API of a request path.
    pub fn of(path: &str) -> Api {
        if path.starts_with("/v1/") {
            Api::OpenAi
        } else {
            Api::WebUi
        }
    }
}

/// An error answer: a 4xx for the client's mistakes, 5xx for the server's.
#[derive(Debug)]
pub struct ApiError {
    pub api: Api,
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `code` (e.g. `invalid_api_key`).
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(api: Api, status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            api,
            status,
            message: message.into(),
            code: None,
        }
    }

    pub fn bad(api: Api, message: impl Into<String>) -> Self {
        Self::new(api, StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = match self.api {
            Api::WebUi => json!({
                "error": self.status.canonical_reason().unwrap_or("Error"),
                "detail": self.message,
            }),
            Api::OpenAi => json!({"error": {
                "message": self.message,
                "type": if self.status.is_server_error() { "server_error" } else { "invalid_request_error" },
                "param": null,
                "code": self.code,
            }}),
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert("retry-after", HeaderValue::from_static("5"));
        }
        response
    }
}

/// The server's limits on what one request may ask for.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_side: usize,
    pub max_steps: usize,
    /// Images per request (the web UI's batch_size x n_iter, OpenAI's n).
    pub max_images: usize,
}

/// What the handlers share.
#[derive(Clone)]
pub struct Shared {
    pub queue: Queue,
    pub limits: Limits,
    pub api_key: Option<Arc<str>>,
    /// Where the web UI prompts' `<lora:NAME:W>` tags are looked up.
    pub lora_dir: Option<PathBuf>,
    /// The largest request body, in bytes.
    pub max_body: usize,
}

/// A JSON body: bad JSON is a 400, the wrong type for a known key a 422 (as FastAPI answers),
/// a body over the limit a 413. Any content type is read as JSON (`curl -d` sends a form's).
pub fn parse_body<T: DeserializeOwned>(
    api: Api,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = body.map_err(|e| ApiError::new(api, e.status(), e.body_text()))?;
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{')
        && serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_ok()
    {
        return Err(ApiError::new(
            api,
            StatusCode::UNPROCESSABLE_ENTITY,
            "the body must be a JSON object",
        ));
    }
    let de = &mut serde_json::Deserializer::from_slice(&body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let at = e.path().to_string();
        let (status, message) = match e.inner().classify() {
            serde_json::error::Category::Data => (
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("{at}: {}", e.inner()),
            ),
            _ => (
                StatusCode::BAD_REQUEST,
                format!("the body is not valid JSON: {}", e.inner()),
            ),
        };
        ApiError::new(api, status, message)
    })
}

/// Whether `headers` carry `Authorization: Bearer <key>` (compared in constant time).
pub fn authorized(headers: &HeaderMap, key: &str) -> bool {
    let Some(given) = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    let (a, b) = (given.trim().as_bytes(), key.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// One API request in the pipeline's terms, before the server's checks.
pub struct Ask {
    pub prompt: String,
    pub negative_prompt: String,
    /// `None`: drawn at random.
    pub seed: Option<u64>,
    pub num_images: usize,
    pub batch_size: usize,
    pub steps: usize,
    pub guidance: f64,
    pub scheduler: Option<String>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub clip_skip: usize,
    pub prompt_syntax: PromptSyntax,
    pub rng: RngKind,
}

impl Shared {
    /// `ask` checked against the limits and the model, as a pipeline request.
    pub fn request(&self, api: Api, ask: Ask) -> Result<Request, ApiError> {
        let l = &self.limits;
        let bad = |m: String| Err(ApiError::bad(api, m));
        let (dh, dw) = self.queue.model.default_size;
        let (width, height) = (ask.width.unwrap_or(dw), ask.height.unwrap_or(dh));
        if ask.steps == 0 || ask.steps > l.max_steps {
            return bad(format!(
                "steps {} is outside this server's 1..={}",
                ask.steps, l.max_steps
            ));
        }
        for (what, v) in [("width", width), ("height", height)] {
            if v == 0 || v > l.max_side {
                return bad(format!(
                    "{what} {v} is outside this server's 1..={}",
                    l.max_side
                ));
            }
        }
        if ask.num_images == 0 || ask.num_images > l.max_images {
            return bad(format!(
                "{} images asked for; this server makes 1..={} per request",
                ask.num_images, l.max_images
            ));
        }
        if !ask.guidance.is_finite() {
            return bad(format!("guidance {} is not a number", ask.guidance));
        }
        if let Some(s) = &ask.scheduler {
            crate::schedulers::resolve_name(s)
                .map_err(|e| ApiError::bad(api, crate::app::one_line(&e)))?;
        }
        let loras = match ask.prompt_syntax {
            PromptSyntax::A1111 => {
                crate::app::lora_tag_files(&ask.prompt, self.lora_dir.as_deref())
                    .map_err(|e| ApiError::bad(api, crate::app::one_line(&e)))?
            }
            PromptSyntax::Plain => Vec::new(),
        };
        let base = ask.seed.unwrap_or_else(crate::app::random_seed);
        Ok(Request {
            prompt: ask.prompt,
            negative_prompt: ask.negative_prompt,
            seeds: (0..ask.num_images as u64)
                .map(|i| base.wrapping_add(i))
                .collect(),
            steps: ask.steps,
            guidance: ask.guidance,
            scheduler: ask.scheduler,
            width,
            height,
            batch_size: ask.batch_size.min(ask.num_images),
            clip_skip: ask.clip_skip,
            prompt_syntax: ask.prompt_syntax,
            loras,
            rng: ask.rng,
            image: None,
            vae_tiling: false,
            sizes: Default::default(),
        })
    }

    /// Queues `request` and waits for its images.
    pub async fn generate(
        &self,
        api: Api,
        request: Request,
        extras: Extras,
    ) -> Result<Finished, ApiError> {
        let ticket = self.queue.submit(request, extras).map_err(|e| match e {
            SubmitError::QueueFull(n) => ApiError::new(
                api,
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the queue is full ({n} requests wait); try again later"),
            ),
            SubmitError::ShuttingDown => shutting_down(api),
        })?;
        ticket.wait().await.map_err(|e| match e {
            JobError::Invalid(m) => ApiError::bad(api, m),
            JobError::ShuttingDown => shutting_down(api),
            // nobody is left to read it
            JobError::Cancelled => ApiError::new(api, StatusCode::REQUEST_TIMEOUT, "cancelled"),
            JobError::Failed(m) => ApiError::new(api, StatusCode::INTERNAL_SERVER_ERROR, m),
        })
    }
}

fn shutting_down(api: Api) -> ApiError {
    ApiError::new(
        api,
        StatusCode::SERVICE_UNAVAILABLE,
        "the server is shutting down",
    )
}

/// `Server-Timing: gen;dur=MS`: the job's own time, so that clients can tell the HTTP layer's
/// share of a request.
pub fn with_timing(finished: &Finished, body: serde_json::Value) -> Response {
    let mut response = axum::Json(body).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("gen;dur={:.1}", finished.seconds * 1000.0)) {
        response.headers_mut().insert("server-timing", v);
    }
    response
}

pub fn base64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A base64 picture as the web UI's clients send it, with or without a `data:...;base64,`
/// prefix.
pub fn unbase64(api: Api, what: &str, text: &str) -> Result<Vec<u8>, ApiError> {
    use base64::Engine;
    let data = match text.strip_prefix("data:") {
        Some(rest) => rest.split_once(',').map_or(rest, |(_, d)| d),
        None => text,
    };
    base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| ApiError::bad(api, format!("{what}: not base64: {e}")))
}
