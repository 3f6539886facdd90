//! `sdgen serve`: the model loaded once, behind the HTTP APIs image tools already speak, the
//! web UI's (`a1111`) and OpenAI's (`openai`), on axum.
//!
//! Requests are queued to one generation worker (`worker`), which runs them one at a time in
//! arrival order; the HTTP side (`http`) checks, queues and waits. Safe by default: it listens
//! on 127.0.0.1, and anywhere else only with `--api-key`. SIGTERM or Ctrl-C stops accepting,
//! cancels the running job at its next step, answers the waiting ones with 503, and exits 0.

mod a1111;
mod http;
mod openai;
mod worker;

use crate::cli::ModelFlags;
use crate::device::{parse_device, parse_dtype};
use anyhow::{bail, Context, Result};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Parser;
use http::{Api, ApiError, Limits, Shared};
use serde_json::json;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "sdgen serve",
    version,
    about = "Serve a loaded model over HTTP: the web UI's API (/sdapi/v1/txt2img, ...) and OpenAI's (/v1/images/generations).",
    after_help = "Examples:\n  sdgen serve --model stable-diffusion-v1-5/stable-diffusion-v1-5 --port 7860\n  curl -s localhost:7860/sdapi/v1/txt2img -d '{\"prompt\":\"a cat\",\"seed\":42,\"steps\":20}' | jq -r '.images[0]' | base64 -d > cat.png\n  sdgen serve --host 0.0.0.0 --api-key \"$(cat key.txt)\""
)]
pub struct ServeArgs {
    #[command(flatten)]
    pub source: ModelFlags,

    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,

    /// f32 (matches diffusers), bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,

    /// A textual-inversion embedding (file or Hub file); repeatable.
    #[arg(long)]
    pub embedding: Vec<String>,

    /// The folder of the LoRA files that web UI prompts' <lora:NAME:W> tags name.
    #[arg(long, value_name = "DIR")]
    pub lora_dir: Option<PathBuf>,

    /// Address to listen on. Anything but a loopback address needs --api-key.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,

    /// Port to listen on (0: any free port, printed at start unless --quiet).
    #[arg(long, default_value_t = 7860)]
    pub port: u16,

    /// Require `Authorization: Bearer KEY` on every API route (not /health).
    #[arg(long, env = "SDGEN_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Largest request body, in MiB.
    #[arg(long, default_value_t = 16)]
    pub max_body_mib: usize,

    /// Largest width or height a request may ask for.
    #[arg(long, default_value_t = 2048)]
    pub max_side: usize,

    /// Most denoising steps a request may ask for.
    #[arg(long, default_value_t = 150)]
    pub max_steps: usize,

    /// Most images one request may ask for (batch_size x n_iter, or n).
    #[arg(long, default_value_t = 16)]
    pub max_images: usize,

    /// Requests that may wait behind the running one; more are answered 503.
    #[arg(long, default_value_t = 32)]
    pub queue: usize,

    /// No messages on stderr but errors.
    #[arg(short, long)]
    pub quiet: bool,
}

/// Runs the server until SIGTERM or Ctrl-C; returns the exit code.
pub fn run(args: ServeArgs) -> Result<i32> {
    if !args.host.is_loopback() && args.api_key.as_deref().unwrap_or("").is_empty() {
        bail!(
            "listening on {} (not a loopback address) needs --api-key (or SDGEN_API_KEY)",
            args.host
        );
    }
    if args.queue == 0 || args.max_images == 0 || args.max_steps == 0 || args.max_side == 0 {
        bail!("--queue, --max-images, --max-steps and --max-side must be at least 1");
    }
    let device = parse_device(&args.device)?;
    let dtype = parse_dtype(&args.dtype)?;
    let load = {
        let args = args.clone();
        move || {
            let model = args.source.request(dtype, !args.quiet);
            crate::app::load_pipeline(&model, device, dtype, &args.embedding, true)
        }
    };
    let (queue, worker) = worker::start(load, args.queue)?;
    let shared = Shared {
        queue: queue.clone(),
        limits: Limits {
            max_side: args.max_side,
            max_steps: args.max_steps,
            max_images: args.max_images,
        },
        api_key: args.api_key.filter(|k| !k.is_empty()).map(Arc::from),
        lora_dir: args.lora_dir.clone(),
        max_body: args.max_body_mib.saturating_mul(1 << 20),
    };
    let app = router(shared);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let addr = SocketAddr::new(args.host, args.port);
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let local = listener.local_addr()?;
        if !args.quiet {
            eprintln!(
                "serving {} on http://{local} (web UI API /sdapi/v1, OpenAI API /v1); Ctrl-C stops",
                queue.model.name
            );
        }
        let stopping = queue.clone();
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                stop_signal().await;
                stopping.shut_down();
            })
            .await
            .context("the HTTP server stopped")
    })?;
    if !args.quiet {
        eprintln!("stopped");
    }
    drop(queue);
    let _ = worker.join();
    Ok(crate::app::EXIT_OK)
}

/// SIGTERM (what systemd, Docker and Kubernetes send) or Ctrl-C.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The routes; the API key checked on all but `/health`; bodies up to `shared.max_body` bytes.
pub fn router(shared: Shared) -> Router {
    let max_body = shared.max_body;
    let api = Router::new()
        .route("/sdapi/v1/txt2img", post(a1111::txt2img))
        .route("/sdapi/v1/img2img", post(a1111::img2img))
        .route("/sdapi/v1/samplers", get(a1111::samplers))
        .route("/sdapi/v1/sd-models", get(a1111::sd_models))
        .route(
            "/sdapi/v1/options",
            get(a1111::options).post(a1111::set_options),
        )
        .route("/sdapi/v1/progress", get(a1111::progress))
        .route("/sdapi/v1/interrupt", post(a1111::interrupt))
        .route("/v1/images/generations", post(openai::generations))
        .route_layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            require_key,
        ));
    Router::new()
        .route("/health", get(health))
        .merge(api)
        .fallback(not_found)
        .method_not_allowed_fallback(not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            refuse_large_bodies,
        ))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(shared)
}

/// A body whose Content-Length is over the limit is refused before it is read, so a client
/// that asked `Expect: 100-continue` (curl does for large bodies) never sends it. Bodies
/// without a length are cut at the limit as they are read (`DefaultBodyLimit`, 413 too).
async fn refuse_large_bodies(State(s): State<Shared>, request: Request, next: Next) -> Response {
    let length = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match length {
        Some(n) if n > s.max_body as u64 => ApiError::new(
            Api::of(request.uri().path()),
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the body is {n} bytes; this server takes at most {} (--max-body-mib)",
                s.max_body
            ),
        )
        .into_response(),
        _ => next.run(request).await,
    }
}

async fn require_key(State(s): State<Shared>, request: Request, next: Next) -> Response {
    if let Some(key) = &s.api_key {
        if !http::authorized(request.headers(), key) {
            let mut e = ApiError::new(
                Api::of(request.uri().path()),
                StatusCode::UNAUTHORIZED,
                "a valid API key is required: Authorization: Bearer KEY",
            );
            e.code = Some("invalid_api_key");
            let mut response = e.into_response();
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
            return response;
        }
    }
    next.run(request).await
}

/// `GET /health`: up, the model, the queue.
async fn health(State(s): State<Shared>) -> Json<serde_json::Value> {
    let p = s.queue.progress.lock().unwrap_or_else(|e| e.into_inner());
    Json(json!({
        "status": "ok",
        "model": s.queue.model.name,
        "running": p.running.is_some(),
        "queued": p.queued,
    }))
}

async fn not_allowed(request: Request) -> ApiError {
    let path = request.uri().path().to_string();
    ApiError::new(
        Api::of(&path),
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} is not allowed on {path}", request.method()),
    )
}

async fn not_found(request: Request) -> ApiError {
    let path = request.uri().path().to_string();
    ApiError::new(
        Api::of(&path),
        StatusCode::NOT_FOUND,
        format!("no such endpoint: {} {path}", request.method()),
    )
}
