//! Hub downloads against a loopback Hub (tests/common/hub_server.rs): first download then
//! generation, cache-only second run, a connection cut mid-file, a corrupted byte, 404/401/500
//! answers, the token, the fp16 variant, and hostile answers (names that would leave the
//! cache, a redirect without Location). No test reaches the internet.

mod common;
use common::hub_server::{self, model_files, HubServer, COMMIT};
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const REPO: &str = "org/tiny-sd";

fn sdgen(args: &[&str], server: &str, cache: &Path, extra_env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sdgen"));
    cmd.args(args)
        .env("HF_ENDPOINT", server)
        .env("HF_HUB_CACHE", cache)
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE");
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: &Output) {
    assert!(o.status.success(), "sdgen failed: {}", stderr(o));
}

/// The tiny model as a Hub repo, plus files the pipeline must not fetch.
fn repo_files() -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut files = model_files(&model_dir("tiny"));
    files.insert("safety_checker/config.json".into(), b"{}".to_vec());
    files.insert("safety_checker/model.safetensors".into(), vec![0u8; 64]);
    files.insert(
        "feature_extractor/preprocessor_config.json".into(),
        b"{}".to_vec(),
    );
    files.insert(
        "unet/diffusion_pytorch_model.bin".into(),
        b"not a pickle".to_vec(),
    );
    // the fixture weights are float16 already: the same bytes make a valid fp16 variant
    for c in [
        "unet/diffusion_pytorch_model",
        "vae/diffusion_pytorch_model",
        "text_encoder/model",
    ] {
        let full = files[&format!("{c}.safetensors")].clone();
        files.insert(format!("{c}.fp16.safetensors"), full);
    }
    files
}

fn generate(server: &HubServer, cache: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "a cat",
        "-m",
        REPO,
        "-s",
        "1",
        "--steps",
        "2",
        "-q",
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend(extra);
    sdgen(&args, &server.url, cache, &[])
}

fn fetched(server: &HubServer) -> Vec<String> {
    server
        .requests()
        .iter()
        .filter_map(|r| r.split_whitespace().next())
        .filter_map(|p| p.strip_prefix(&format!("/{REPO}/resolve/main/")))
        .map(str::to_string)
        .collect()
}

#[test]
fn download_then_generate_then_cache_only() {
    let server = HubServer::start(REPO, repo_files());
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("hub");
    let out = dir.path().join("a.png");
    ok(&generate(&server, &cache, &out, &[]));
    assert!(out.exists());
    // the standard cache layout, shared with Python's huggingface_hub
    let repo_dir = cache.join("models--org--tiny-sd");
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main"))
            .unwrap()
            .trim(),
        COMMIT
    );
    assert!(repo_dir
        .join(format!(
            "snapshots/{COMMIT}/unet/diffusion_pytorch_model.safetensors"
        ))
        .exists());
    assert!(std::fs::read_dir(repo_dir.join("blobs")).unwrap().count() >= 10);
    // only what the pipeline needs
    let files = fetched(&server);
    assert!(files
        .iter()
        .any(|f| f == "unet/diffusion_pytorch_model.safetensors"));
    assert!(
        !files
            .iter()
            .any(|f| f.starts_with("safety_checker") || f.starts_with("feature_extractor")),
        "{files:?}"
    );
    assert!(
        !files
            .iter()
            .any(|f| f.ends_with(".bin") || f.contains(".fp16.")),
        "{files:?}"
    );

    // second run: the server is gone; the cache is enough, with or without --offline
    server.stop();
    let out2 = dir.path().join("b.png");
    let o = sdgen(
        &[
            "a cat",
            "-m",
            REPO,
            "-s",
            "1",
            "--steps",
            "2",
            "-o",
            out2.to_str().unwrap(),
        ],
        &server.url,
        &cache,
        &[],
    );
    ok(&o);
    assert!(
        stderr(&o).contains("using the cached copy"),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&out2).unwrap());
    let out3 = dir.path().join("c.png");
    ok(&sdgen(
        &[
            "a cat",
            "-m",
            REPO,
            "-s",
            "1",
            "--steps",
            "2",
            "-q",
            "--offline",
            "-o",
            out3.to_str().unwrap(),
        ],
        &server.url,
        &cache,
        &[],
    ));
}

#[test]
fn a_cut_connection_is_resumed() {
    let server = HubServer::start(REPO, repo_files());
    server
        .state
        .lock()
        .unwrap()
        .cut_once
        .insert("unet/diffusion_pytorch_model.safetensors".into());
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("hub");
    ok(&generate(&server, &cache, &dir.path().join("a.png"), &[]));
    let unet: Vec<String> = server
        .requests()
        .into_iter()
        .filter(|r| r.contains("unet/diffusion_pytorch_model.safetensors"))
        .collect();
    let size = repo_files()["unet/diffusion_pytorch_model.safetensors"].len();
    let resumed = unet.iter().any(|r| {
        r.split("bytes=")
            .nth(1)
            .and_then(|x| x.split('-').next())
            .and_then(|x| x.parse::<usize>().ok())
            .is_some_and(|start| start > 0 && start < size)
    });
    assert!(resumed, "no resumed range request: {unet:?}");
}

#[test]
fn a_corrupted_download_is_refused_and_not_kept() {
    let server = HubServer::start(REPO, repo_files());
    server
        .state
        .lock()
        .unwrap()
        .corrupt
        .insert("text_encoder/model.safetensors".into());
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("hub");
    let out = dir.path().join("a.png");
    let o = generate(&server, &cache, &out, &[]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("checksum") && err.contains("text_encoder/model.safetensors"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!out.exists());
    let snap = cache.join(format!(
        "models--org--tiny-sd/snapshots/{COMMIT}/text_encoder/model.safetensors"
    ));
    assert!(!snap.exists(), "a corrupt file stayed in the cache");
    // offline, the incomplete cache is refused rather than used
    let o = sdgen(
        &["a cat", "-m", REPO, "--offline", "-q"],
        &server.url,
        &cache,
        &[],
    );
    assert_eq!(o.status.code(), Some(1));
    // the next run with a healthy server downloads it again and works
    server.state.lock().unwrap().corrupt.clear();
    ok(&generate(&server, &cache, &out, &[]));
}

#[test]
fn error_answers_become_clear_messages() {
    let server = HubServer::start(REPO, repo_files());
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("hub");
    let run = |model: &str, env: &[(&str, &str)]| {
        sdgen(
            &[
                "a cat",
                "-m",
                model,
                "-q",
                "--steps",
                "2",
                "-o",
                dir.path().join("x.png").to_str().unwrap(),
            ],
            &server.url,
            &cache,
            env,
        )
    };

    let o = run("org/unknown", &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("not found") && stderr(&o).contains("org/unknown"),
        "{}",
        stderr(&o)
    );

    server.state.lock().unwrap().token = Some("secret".into());
    let o = run(REPO, &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("HF_TOKEN"), "{}", stderr(&o));
    ok(&run(REPO, &[("HF_TOKEN", "secret")]));
    server.state.lock().unwrap().token = None;

    let fresh = dir.path().join("hub2");
    server.state.lock().unwrap().status = Some(500);
    let o = sdgen(&["a cat", "-m", REPO, "-q"], &server.url, &fresh, &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("server error (500)"), "{}", stderr(&o));
    for o in [&o] {
        assert_eq!(stderr(o).lines().count(), 1);
    }

    let closed = sdgen(
        &["a cat", "-m", REPO, "-q"],
        "http://127.0.0.1:9",
        &fresh,
        &[],
    );
    assert_eq!(closed.status.code(), Some(1));
    assert!(
        stderr(&closed).contains("cannot reach"),
        "{}",
        stderr(&closed)
    );
}

#[test]
fn other_pipelines_and_missing_weights_are_refused() {
    let mut files = repo_files();
    files.insert(
        "model_index.json".into(),
        br#"{"_class_name": "StableDiffusion3Pipeline"}"#.to_vec(),
    );
    let server = HubServer::start(REPO, files);
    let dir = tempfile::tempdir().unwrap();
    let o = sdgen(
        &["--download-only", "-m", REPO, "-q"],
        &server.url,
        &dir.path().join("hub"),
        &[],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("StableDiffusion3Pipeline"),
        "{}",
        stderr(&o)
    );
    assert!(!fetched(&server)
        .iter()
        .any(|f| f.starts_with("unet/diffusion")));

    let mut files = repo_files();
    files.retain(|k, _| !k.starts_with("vae/diffusion_pytorch_model"));
    let server = HubServer::start(REPO, files);
    let o = sdgen(
        &["--download-only", "-m", REPO, "-q"],
        &server.url,
        &dir.path().join("hub3"),
        &[],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no weights for vae"), "{}", stderr(&o));

    let mut files = repo_files();
    files.remove("model_index.json");
    let server = HubServer::start(REPO, files);
    let o = sdgen(
        &["--download-only", "-m", REPO, "-q"],
        &server.url,
        &dir.path().join("hub4"),
        &[],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("model_index.json"), "{}", stderr(&o));
}

#[test]
fn download_only_fetches_the_fp16_variant_for_half_precision() {
    let server = HubServer::start(REPO, repo_files());
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("hub");
    let o = sdgen(
        &["--download-only", "-m", REPO, "--dtype", "f16", "-q"],
        &server.url,
        &cache,
        &[],
    );
    ok(&o);
    let printed = String::from_utf8(o.stdout).unwrap();
    assert!(printed.trim().ends_with(COMMIT), "{printed}");
    let files = fetched(&server);
    for c in [
        "unet/diffusion_pytorch_model",
        "vae/diffusion_pytorch_model",
        "text_encoder/model",
    ] {
        assert!(
            files.contains(&format!("{c}.fp16.safetensors")),
            "{files:?}"
        );
        assert!(!files.contains(&format!("{c}.safetensors")), "{files:?}");
    }
}

/// Every file the cache holds, resolved: each link must point inside the cache.
fn links_leaving(cache: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![cache.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                todo.push(p);
            } else if t.is_symlink() {
                let target = d.join(std::fs::read_link(&p).unwrap());
                let inside = std::fs::canonicalize(&target)
                    .map(|t| t.starts_with(std::fs::canonicalize(cache).unwrap()))
                    .unwrap_or(false);
                if !inside {
                    out.push(p);
                }
            }
        }
    }
    out
}

#[test]
fn hostile_hub_answers_never_touch_files_outside_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let canary = dir.path().join("canary");
    let canary_abs = canary.to_str().unwrap().to_string();
    type Setup = Box<dyn Fn(&mut hub_server::State)>;
    let header = |k: &'static str, v: String| -> Setup {
        Box::new(move |st: &mut hub_server::State| {
            st.override_headers.push((k.to_string(), v.clone()))
        })
    };
    // from <cache>/models--org--tiny-sd/blobs, ../../../canary is the canary above the cache
    let cases: Vec<(&str, Setup)> = vec![
        (
            "an etag climbing out",
            header("X-Linked-Etag", "\"../../../canary\"".into()),
        ),
        (
            "a plain etag climbing out",
            header("ETag", "\"../../../canary\"".into()),
        ),
        (
            "an absolute etag",
            header("X-Linked-Etag", format!("\"{canary_abs}\"")),
        ),
        (
            "a commit climbing out",
            header("X-Repo-Commit", "../../../../evil".into()),
        ),
        (
            "another commit than listed",
            header("X-Repo-Commit", "0".repeat(40)),
        ),
        (
            "a listed commit climbing out",
            Box::new(|st: &mut hub_server::State| st.listed_commit = Some("../../../x".into())),
        ),
        (
            "a redirect without Location",
            Box::new(|st: &mut hub_server::State| st.redirect_without_location = true),
        ),
    ];
    for (what, setup) in cases {
        std::fs::write(&canary, b"keep").unwrap();
        let server = HubServer::start(REPO, repo_files());
        setup(&mut server.state.lock().unwrap());
        let cache = dir.path().join(format!("hub-{}", what.replace(' ', "-")));
        let out = dir.path().join("a.png");
        let o = generate(&server, &cache, &out, &[]);
        let err = stderr(&o);
        eprintln!("{what}: {err}");
        // an error, not a panic (exit 101) or a success
        assert_eq!(o.status.code(), Some(1), "{what}: {err}");
        assert!(
            err.starts_with("error: ") && err.lines().count() == 1,
            "{what}: {err}"
        );
        assert_eq!(std::fs::read(&canary).unwrap(), b"keep", "{what}");
        assert!(!out.exists(), "{what}");
        assert!(!dir.path().join("evil").exists(), "{what}");
        assert_eq!(links_leaving(&cache), Vec::<PathBuf>::new(), "{what}");
        let stray: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n != "canary" && !n.starts_with("hub-"))
            .collect();
        assert!(stray.is_empty(), "{what}: {stray:?}");
    }
}

/// A `huggingface-cli login` token (the `token` file beside the cache) is sent with the file
/// list and the downloads alike, as hf-hub sends it, when HF_TOKEN is not set.
#[test]
fn the_login_token_file_is_used_without_hf_token() {
    let server = HubServer::start(REPO, repo_files());
    server.state.lock().unwrap().token = Some("secret".into());
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("hub");
    std::fs::write(dir.path().join("token"), "secret\n").unwrap();
    ok(&generate(&server, &cache, &dir.path().join("a.png"), &[]));
    assert!(fetched(&server)
        .iter()
        .any(|f| f == "unet/diffusion_pytorch_model.safetensors"));
}

/// `--lora OWNER/REPO/FILE` and `--embedding OWNER/REPO/FILE`: each file downloaded once into
/// the cache, the image the local files give; offline, the cached files.
#[test]
fn loras_and_embeddings_from_the_hub() {
    const ADDONS: &str = "org/addons";
    let addon = |rel: &str| fixtures().join("addons").join(rel);
    let files = std::collections::BTreeMap::from([
        (
            "kohya.safetensors".to_string(),
            std::fs::read(addon("kohya.safetensors")).unwrap(),
        ),
        (
            "emb/shinyfox.pt".to_string(),
            std::fs::read(addon("emb/shinyfox.pt")).unwrap(),
        ),
    ]);
    let server = HubServer::start(ADDONS, files);
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("hub");
    let tiny = model_dir("tiny");
    let run = |out: &Path, lora: &str, emb: &str, env: &[(&str, &str)]| {
        let args = [
            "a shinyfox",
            "-m",
            tiny.to_str().unwrap(),
            "-s",
            "1",
            "--steps",
            "2",
            "-q",
            "--lora",
            lora,
            "--embedding",
            emb,
            "-o",
            out.to_str().unwrap(),
        ];
        sdgen(&args, &server.url, &cache, env)
    };
    let (hub, local, offline) = (
        dir.path().join("hub.png"),
        dir.path().join("local.png"),
        dir.path().join("offline.png"),
    );
    ok(&run(
        &hub,
        "org/addons/kohya.safetensors:0.8",
        "org/addons/emb/shinyfox.pt",
        &[],
    ));
    let local_lora = format!("{}:0.8", addon("kohya.safetensors").display());
    ok(&run(
        &local,
        &local_lora,
        addon("emb/shinyfox.pt").to_str().unwrap(),
        &[],
    ));
    let pixels = |p: &Path| image::open(p).unwrap().to_rgb8().into_raw();
    assert_eq!(pixels(&hub), pixels(&local));
    let downloads = || -> std::collections::BTreeSet<String> {
        server
            .requests()
            .iter()
            .filter_map(|r| r.split_whitespace().next())
            .filter_map(|p| p.strip_prefix("/org/addons/resolve/main/"))
            .map(str::to_string)
            .collect()
    };
    let requests = server.requests().len();
    assert_eq!(
        downloads().into_iter().collect::<Vec<_>>(),
        ["emb/shinyfox.pt", "kohya.safetensors"]
    );
    let snapshot = cache.join("models--org--addons/snapshots").join(COMMIT);
    assert!(snapshot.join("kohya.safetensors").is_file());
    ok(&run(
        &offline,
        "org/addons/kohya.safetensors:0.8",
        "org/addons/emb/shinyfox.pt",
        &[("HF_HUB_OFFLINE", "1")],
    ));
    assert_eq!(pixels(&offline), pixels(&local));
    assert_eq!(
        server.requests().len(),
        requests,
        "offline runs ask the Hub nothing"
    );
    let missing = run(
        &dir.path().join("m.png"),
        "org/addons/nothere.safetensors",
        "org/addons/emb/shinyfox.pt",
        &[],
    );
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        stderr(&missing).contains("has no file nothere.safetensors"),
        "{}",
        stderr(&missing)
    );
}

/// The flags of the tiny models' e2e euler image for seed 42 (6 steps, guidance 7.5) from
/// REPO, written to `out`, with `extra`.
fn euler_42<'a>(out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "a photo of a cat on a beach",
        "-n",
        "blurry, lowres",
        "-m",
        REPO,
        "-s",
        "42",
        "--steps",
        "6",
        "--scheduler",
        "euler",
        "--guidance",
        "7.5",
        "-q",
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    args
}

/// An SDXL repo: the second tokenizer and text encoder are fetched with the rest (the fp16
/// variant for half precision), nothing else; the cached model then gives diffusers' image.
#[test]
fn an_sdxl_repo_fetches_both_encoders() {
    let mut files = model_files(&model_dir("tiny_xl"));
    let te2 = files["text_encoder_2/model.safetensors"].clone();
    files.insert("text_encoder_2/model.fp16.safetensors".into(), te2);
    files.insert("text_encoder_2/model.onnx".into(), b"not needed".to_vec());
    files.insert("vae_1_0/config.json".into(), b"{}".to_vec());
    let server = HubServer::start(REPO, files);
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("hub");
    let o = sdgen(
        &["--download-only", "-m", REPO, "-q", "--dtype", "f16"],
        &server.url,
        &cache,
        &[],
    );
    ok(&o);
    let got = fetched(&server);
    for want in [
        "tokenizer_2/vocab.json",
        "tokenizer_2/merges.txt",
        "text_encoder_2/config.json",
        "text_encoder_2/model.fp16.safetensors",
    ] {
        assert!(got.iter().any(|f| f == want), "{want}: {got:?}");
    }
    assert!(
        !got.iter()
            .any(|f| f.ends_with(".onnx") || f.starts_with("vae_1_0")),
        "{got:?}"
    );
    // f32 from the same repo, then the image diffusers makes
    let out = dir.path().join("xl.png");
    let o = sdgen(&euler_42(&out, &[]), &server.url, &cache, &[]);
    ok(&o);
    let got = image::open(&out).unwrap().to_rgb8();
    let want = image::open(reference("tiny_xl/e2e/euler-42.png"))
        .unwrap()
        .to_rgb8();
    let (max, _) = pixel_diff(got.as_raw(), want.as_raw());
    assert!(max <= 2, "max {max}/255");
}

/// SDXL's refiner from the Hub (model_index.json with `requires_aesthetics_score` and null
/// `text_encoder` / `tokenizer`): only `text_encoder_2/` and `tokenizer_2/` of the encoders are
/// fetched, and the cached model gives diffusers' image-to-image image.
#[test]
fn the_sdxl_refiner_fetches_its_one_encoder() {
    let mut files = model_files(&model_dir("tiny_xl"));
    files.retain(|f, _| !f.starts_with("text_encoder/") && !f.starts_with("tokenizer/"));
    for (f, bytes) in model_files(&model_dir("tiny_xl_refiner_unet")) {
        files.insert(format!("unet/{f}"), bytes);
    }
    let mut index: serde_json::Value = serde_json::from_slice(&files["model_index.json"]).unwrap();
    index["_class_name"] = "StableDiffusionXLImg2ImgPipeline".into();
    index["requires_aesthetics_score"] = true.into();
    index["force_zeros_for_empty_prompt"] = false.into();
    index["text_encoder"] = serde_json::json!([null, null]);
    index["tokenizer"] = serde_json::json!([null, null]);
    files.insert("model_index.json".into(), index.to_string().into_bytes());
    let server = HubServer::start(REPO, files);
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("hub");
    let out = dir.path().join("refined.png");
    let picture = fixtures().join("img2img/tiny2.png");
    let picture = picture.to_str().unwrap();
    let args = euler_42(&out, &["--image", picture, "--strength", "0.3"]);
    let o = sdgen(&args, &server.url, &cache, &[]);
    ok(&o);
    let got = fetched(&server);
    assert!(
        got.iter().any(|f| f == "text_encoder_2/model.safetensors")
            && got.iter().any(|f| f == "tokenizer_2/vocab.json")
            && !got
                .iter()
                .any(|f| f.starts_with("text_encoder/") || f.starts_with("tokenizer/")),
        "{got:?}"
    );
    let got = image::open(&out).unwrap().to_rgb8();
    let want = image::open(reference("tiny_xl/refiner/euler-0.3.png"))
        .unwrap()
        .to_rgb8();
    let (max, _) = pixel_diff(got.as_raw(), want.as_raw());
    assert!(max <= 2, "max {max}/255");
}
