//! `sdgen serve` end to end on a loopback port with the tiny model: both APIs' images against
//! diffusers' references and the CLI's files, the answers' shapes, the errors, the API key,
//! the queue, interrupting, cancelling when a client leaves, and SIGTERM.

mod common;
use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `sdgen serve`, killed when dropped.
struct Server {
    child: Child,
    client: Client,
}

impl std::ops::Deref for Server {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

/// Requests to a server's port.
#[derive(Clone, Copy)]
struct Client {
    port: u16,
}

impl Server {
    /// Starts `sdgen serve` on the tiny model on a free port with `extra` flags; waits until it
    /// prints where it listens.
    fn start(extra: &[&str]) -> Server {
        Self::start_with("tiny", extra)
    }

    /// [`Server::start`] on the fixture model `model`.
    fn start_with(model: &str, extra: &[&str]) -> Server {
        let model = model_dir(model).display().to_string();
        let mut child = Command::new(env!("CARGO_BIN_EXE_sdgen"))
            .args(["serve", "--model", &model, "--port", "0"])
            .args(extra)
            .env(
                "HF_HUB_CACHE",
                std::env::temp_dir().join("sdgen-test-empty-cache"),
            )
            .env("HF_ENDPOINT", "http://127.0.0.1:9")
            .env_remove("SDGEN_API_KEY")
            .stderr(Stdio::piped())
            .spawn()
            .expect("start sdgen serve");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let port = loop {
            let line = lines
                .next()
                .expect("sdgen serve ended before listening")
                .unwrap();
            if let Some(rest) = line.split("http://127.0.0.1:").nth(1) {
                break rest.split(' ').next().unwrap().parse().unwrap();
            }
        };
        // keep draining stderr so that the server never blocks on it
        std::thread::spawn(move || for _ in lines {});
        Server {
            child,
            client: Client { port },
        }
    }
}

impl Client {
    fn url(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// One HTTP/1.1 request; (status, headers in lower case, body).
    fn call(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
        let mut s = TcpStream::connect(self.url()).unwrap();
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
            self.url(),
            body.len()
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(body).unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        Reply::parse(&raw)
    }

    fn post(&self, path: &str, body: &Value) -> Reply {
        self.call("POST", path, &[], body.to_string().as_bytes())
    }

    fn get(&self, path: &str) -> Reply {
        self.call("GET", path, &[], b"")
    }

    /// Polls `/sdapi/v1/progress` until `f` holds (at most 60 s).
    fn wait_progress(&self, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let t = Instant::now();
        loop {
            let p = self.get("/sdapi/v1/progress").json();
            if f(&p) {
                return p;
            }
            assert!(t.elapsed() < Duration::from_secs(60), "{what}: {p}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn parse(raw: &[u8]) -> Reply {
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no HTTP head in {:?}", String::from_utf8_lossy(raw)));
        let head = String::from_utf8_lossy(&raw[..split]).to_string();
        let mut lines = head.lines();
        let status = lines
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let mut body = raw[split + 4..].to_vec();
        if headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v == "chunked")
        {
            body = unchunk(&body);
        }
        Reply {
            status,
            headers,
            body,
        }
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{e}: status {}, body {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

fn unchunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let end = b.windows(2).position(|w| w == b"\r\n").unwrap();
        let n = usize::from_str_radix(std::str::from_utf8(&b[..end]).unwrap().trim(), 16).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&b[end + 2..end + 2 + n]);
        b = &b[end + 4 + n..];
    }
}

fn unbase64(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

/// The CLI's PNG files for `args` (written to a fresh folder as `img-{index}.png`).
fn cli_images(args: &[&str], n: usize) -> Vec<Vec<u8>> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("img-{index}.png");
    let tiny = model_dir("tiny").display().to_string();
    let o = Command::new(env!("CARGO_BIN_EXE_sdgen"))
        .args(["--model", &tiny, "--quiet", "-o", out.to_str().unwrap()])
        .args(args)
        .env(
            "HF_HUB_CACHE",
            std::env::temp_dir().join("sdgen-test-empty-cache"),
        )
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert_eq!(files.len(), n, "{files:?}");
    files.iter().map(|f| std::fs::read(f).unwrap()).collect()
}

fn assert_matches_reference(png: &[u8], reference_png: &str) {
    let got = image::load_from_memory(png).unwrap().to_rgb8();
    let want = image::open(reference(reference_png)).unwrap().to_rgb8();
    assert_eq!(got.dimensions(), want.dimensions());
    let (max, mean) = pixel_diff(got.as_raw(), want.as_raw());
    assert!(
        max <= 2 && mean <= 0.25,
        "{reference_png}: max {max}/255, mean {mean:.4}/255"
    );
}

fn e2e() -> Value {
    read_json("tiny/e2e.json")
}

#[test]
fn webui_txt2img_gives_diffusers_images_and_the_clis_files() {
    let server = Server::start(&[]);
    let meta = e2e();
    let (prompt, negative) = (
        meta["prompt"].as_str().unwrap(),
        meta["negative_prompt"].as_str().unwrap(),
    );
    let body = json!({
        "prompt": prompt, "negative_prompt": negative, "seed": 42, "steps": 6,
        "cfg_scale": 7.5, "width": 32, "height": 32, "sampler_name": "Euler",
        "batch_size": 2, "n_iter": 1,
        "enable_hr": false, "restore_faces": false, "some_future_key": {"a": 1},
    });
    let r = server.post("/sdapi/v1/txt2img", &body);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.header("server-timing").unwrap().starts_with("gen;dur="));
    let v = r.json();
    let images: Vec<Vec<u8>> = v["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| unbase64(i.as_str().unwrap()))
        .collect();
    assert_eq!(images.len(), 2);
    assert_matches_reference(&images[0], "tiny/e2e/euler-42.png");
    assert_matches_reference(&images[1], "tiny/e2e/euler-43.png");
    // the same bytes, metadata included, as the CLI writes for the same parameters
    let cli = cli_images(
        &[
            prompt,
            "-n",
            negative,
            "-s",
            "42",
            "--steps",
            "6",
            "-g",
            "7.5",
            "-W",
            "32",
            "-H",
            "32",
            "--scheduler",
            "Euler",
            "--num-images",
            "2",
            "--batch-size",
            "2",
            "--prompt-syntax",
            "a1111",
        ],
        2,
    );
    assert!(images == cli, "the server's PNGs differ from the CLI's");
    // the request echoed, the web UI's info
    assert_eq!(v["parameters"]["seed"], 42);
    assert_eq!(v["parameters"]["sampler_name"], "Euler");
    let info: Value = serde_json::from_str(v["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["all_seeds"], json!([42, 43]));
    assert_eq!(info["seed"], 42);
    assert_eq!(
        (info["width"].clone(), info["steps"].clone()),
        (json!(32), json!(6))
    );
    let infotext = info["infotexts"][1].as_str().unwrap();
    assert!(
        infotext.contains("Steps: 6, Sampler: Euler, CFG scale: 7.5, Seed: 43, Size: 32x32"),
        "{infotext}"
    );
}

/// SDXL through the web UI's API: diffusers' `StableDiffusionXLPipeline` image (the prompts
/// have no weights, so the web UI's syntax reads them as the plain one does).
#[test]
fn webui_txt2img_runs_sdxl() {
    let server = Server::start_with("tiny_xl", &[]);
    let meta = read_json("tiny_xl/e2e.json");
    let body = json!({
        "prompt": meta["prompt"], "negative_prompt": meta["negative_prompt"], "seed": 42,
        "steps": meta["steps"], "cfg_scale": 7.5, "width": 64, "height": 64,
        "sampler_name": "Euler",
    });
    let r = server.post("/sdapi/v1/txt2img", &body);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let images = r.json()["images"].as_array().unwrap().clone();
    assert_eq!(images.len(), 1);
    let png = unbase64(images[0].as_str().unwrap());
    assert_matches_reference(&png, "tiny_xl/e2e/euler-42.png");
}

fn b64_file(rel: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(std::fs::read(fixtures().join(rel)).unwrap())
}

/// The text chunk `key` of a PNG.
fn png_text(png: &[u8], key: &str) -> String {
    let reader = png::Decoder::new(std::io::Cursor::new(png))
        .read_info()
        .unwrap();
    let info = reader.info();
    info.uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == key)
        .map(|t| t.text.clone())
        .unwrap_or_else(|| panic!("no {key} chunk"))
}

#[test]
fn webui_img2img_and_inpainting_give_diffusers_images() {
    let server = Server::start(&[]);
    let meta = e2e();
    let base = json!({
        "prompt": meta["prompt"], "negative_prompt": meta["negative_prompt"], "seed": 42,
        "steps": 6, "cfg_scale": 7.5, "width": 32, "height": 32, "sampler_name": "Euler",
        "init_images": [format!("data:image/png;base64,{}", b64_file("img2img/tiny.png"))],
    });
    // image to image at strength 0.6
    let mut body = base.clone();
    body["denoising_strength"] = json!(0.6);
    let r = server.post("/sdapi/v1/img2img", &body);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    let png = unbase64(v["images"][0].as_str().unwrap());
    assert_matches_reference(&png, "img2img/tiny-euler-0.6.png");
    assert!(v["parameters"]["init_images"].is_null());
    let info: Value = serde_json::from_str(v["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["denoising_strength"], 0.6);
    // the CLI's pixels from the same file, and the same picture's hash in the metadata
    let picture = fixtures().join("img2img/tiny.png");
    let cli = cli_images(
        &[
            meta["prompt"].as_str().unwrap(),
            "-n",
            meta["negative_prompt"].as_str().unwrap(),
            "-s",
            "42",
            "--steps",
            "6",
            "-g",
            "7.5",
            "-W",
            "32",
            "-H",
            "32",
            "--scheduler",
            "Euler",
            "--prompt-syntax",
            "a1111",
            "--image",
            picture.to_str().unwrap(),
            "--strength",
            "0.6",
        ],
        1,
    );
    let pixels = |png: &[u8]| image::load_from_memory(png).unwrap().to_rgb8().into_raw();
    assert!(pixels(&png) == pixels(&cli[0]));
    assert_eq!(
        png_text(&png, "init_image_sha256"),
        png_text(&cli[0], "init_image_sha256")
    );
    // inpainting: the mask blurred by 4 (the web UI's default), the kept parts laid back
    let mut body = base.clone();
    body["denoising_strength"] = json!(1.0);
    body["mask"] = json!(b64_file("img2img/tiny-mask.png"));
    let r = server.post("/sdapi/v1/img2img", &body);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let png = unbase64(r.json()["images"][0].as_str().unwrap());
    assert_matches_reference(&png, "inpaint/blur4-overlay-tiny-euler-1.0.png");
    // pictures that cannot be used
    for (init, needle) in [
        (json!([]), "init_images"),
        (json!(["%%%"]), "not base64"),
        (json!(["aGVsbG8="]), "PNG, JPEG or WebP"),
    ] {
        let mut body = base.clone();
        body["init_images"] = init;
        let (status, message) = error_of(&server.post("/sdapi/v1/img2img", &body));
        assert_eq!(status, 400, "{message}");
        assert!(message.contains(needle), "{message}");
    }
}

#[test]
fn webui_seed_minus_one_is_random_and_reported() {
    let server = Server::start(&[]);
    let r = server.post(
        "/sdapi/v1/txt2img",
        &json!({"prompt": "a cat", "seed": -1, "steps": 1, "width": 32, "height": 32}),
    );
    assert_eq!(r.status, 200);
    let v = r.json();
    let info: Value = serde_json::from_str(v["info"].as_str().unwrap()).unwrap();
    let seed = info["seed"].as_u64().unwrap();
    assert!(seed <= u32::MAX as u64);
    // the seed reported reproduces the image
    let again = server.post(
        "/sdapi/v1/txt2img",
        &json!({"prompt": "a cat", "seed": seed, "steps": 1, "width": 32, "height": 32}),
    );
    assert_eq!(again.json()["images"], v["images"]);
    assert_eq!(v["parameters"]["seed"], -1);
}

#[test]
fn openai_generations_give_the_clis_images() {
    let server = Server::start(&[]);
    let r = server.post(
        "/v1/images/generations",
        &json!({"prompt": "a photo of a cat", "n": 2, "size": "32x32", "seed": 7, "steps": 3,
                "model": "dall-e-2", "response_format": "b64_json", "user": "u1"}),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert!(v["created"].as_u64().unwrap() > 1_700_000_000);
    let images: Vec<Vec<u8>> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| unbase64(d["b64_json"].as_str().unwrap()))
        .collect();
    let cli = cli_images(
        &[
            "a photo of a cat",
            "-s",
            "7",
            "--steps",
            "3",
            "-W",
            "32",
            "-H",
            "32",
            "--num-images",
            "2",
        ],
        2,
    );
    assert!(images == cli, "the server's PNGs differ from the CLI's");
}

#[test]
fn listings_and_health() {
    let server = Server::start(&[]);
    let h = server.get("/health");
    assert_eq!((h.status, h.json()["status"].clone()), (200, json!("ok")));
    let samplers = server.get("/sdapi/v1/samplers").json();
    let names: Vec<&str> = samplers
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"DPM++ 2M Karras") && names.contains(&"Euler a"),
        "{names:?}"
    );
    let models = server.get("/sdapi/v1/sd-models").json();
    assert!(models[0]["title"].as_str().unwrap().ends_with("tiny"));
    let p = server.get("/sdapi/v1/progress").json();
    assert_eq!(
        (p["progress"].clone(), p["state"]["job_count"].clone()),
        (json!(0.0), json!(0))
    );
    // clients set the model before they generate: the loaded one is fine, another is not
    let name = models[0]["title"].clone();
    let r = server.post(
        "/sdapi/v1/options",
        &json!({"sd_model_checkpoint": name, "x": 1}),
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        server.get("/sdapi/v1/options").json()["sd_model_checkpoint"],
        name
    );
    let r = server.post(
        "/sdapi/v1/options",
        &json!({"sd_model_checkpoint": "other.safetensors"}),
    );
    let (status, message) = error_of(&r);
    assert_eq!(status, 400);
    assert!(message.contains("serves"), "{message}");
}

/// (status, the error's message) of a JSON error answer, in either API's shape.
fn error_of(r: &Reply) -> (u16, String) {
    let v = r.json();
    let message = v["detail"]
        .as_str()
        .or(v["error"]["message"].as_str())
        .unwrap_or_else(|| panic!("not an error answer: {v}"));
    (r.status, message.to_string())
}

#[test]
fn bad_requests_are_4xx_json() {
    let server = Server::start(&["--max-body-mib", "1", "--max-steps", "20"]);
    let t2i = "/sdapi/v1/txt2img";
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (t2i, b"{\"prompt\": ".to_vec(), 400, "JSON"),
        (
            t2i,
            br#"{"prompt": "a", "steps": "many"}"#.to_vec(),
            422,
            "steps",
        ),
        (
            t2i,
            br#"{"prompt": "a", "steps": 21}"#.to_vec(),
            400,
            "steps 21",
        ),
        (
            t2i,
            br#"{"prompt": "a", "steps": 0}"#.to_vec(),
            400,
            "steps 0",
        ),
        (
            t2i,
            br#"{"prompt": "a", "width": 4096, "steps": 1}"#.to_vec(),
            400,
            "width 4096",
        ),
        (
            t2i,
            br#"{"prompt": "a", "width": 33, "height": 32, "steps": 1}"#.to_vec(),
            400,
            "multiples of 2",
        ),
        (
            t2i,
            br#"{"prompt": "a", "batch_size": 4, "n_iter": 5, "steps": 1}"#.to_vec(),
            400,
            "20 images",
        ),
        (
            t2i,
            br#"{"prompt": "a", "seed": -5}"#.to_vec(),
            400,
            "seed -5",
        ),
        (
            t2i,
            br#"{"prompt": "a", "sampler_name": "DPM fast", "steps": 1}"#.to_vec(),
            400,
            "DPM fast",
        ),
        (
            t2i,
            br#"{"prompt": "a", "sampler_name": "Euler", "scheduler": "Exponential"}"#.to_vec(),
            400,
            "Exponential",
        ),
        (
            t2i,
            br#"{"prompt": "a <lora:x:1>", "steps": 1}"#.to_vec(),
            400,
            "--lora-dir",
        ),
        (
            "/v1/images/generations",
            br#"{"n": 1}"#.to_vec(),
            400,
            "prompt is required",
        ),
        (
            "/v1/images/generations",
            br#"{"prompt": "a", "response_format": "url"}"#.to_vec(),
            400,
            "b64_json",
        ),
        (
            "/v1/images/generations",
            br#"{"prompt": "a", "size": "big"}"#.to_vec(),
            400,
            "WIDTHxHEIGHT",
        ),
        ("/v1/images/generations", br#"[1, 2]"#.to_vec(), 422, "JSON"),
    ];
    for (path, body, status, needle) in cases {
        let r = server.call("POST", path, &[], &body);
        let (got, message) = error_of(&r);
        assert_eq!(
            got,
            status,
            "{path} {}: {message}",
            String::from_utf8_lossy(&body[..body.len().min(80)])
        );
        assert!(
            message.contains(needle),
            "{path}: {message:?} lacks {needle:?}"
        );
        if path.starts_with("/v1/") {
            assert_eq!(r.json()["error"]["type"], "invalid_request_error");
        }
    }
    // a body over the limit is refused from its Content-Length, before it is sent (curl asks
    // with `Expect: 100-continue` for large bodies)
    let mut s = TcpStream::connect(server.url()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "POST {t2i} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        2 << 20
    )
    .unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let (status, message) = error_of(&Reply::parse(&raw));
    assert_eq!(status, 413, "{message}");
    assert!(message.contains("at most 1048576"), "{message}");
    let r = server.get("/sdapi/v1/nothing");
    assert_eq!(error_of(&r).0, 404);
    // the server still serves after all that
    let r = server.post(
        t2i,
        &json!({"prompt": "a", "steps": 1, "width": 32, "height": 32}),
    );
    assert_eq!(r.status, 200);
}

#[test]
fn the_api_key_is_required_when_set() {
    let server = Server::start(&["--api-key", "s3cret"]);
    let body = json!({"prompt": "a", "steps": 1, "width": 32, "height": 32}).to_string();
    for (headers, want) in [
        (vec![], 401),
        (vec![("Authorization", "Bearer wrong")], 401),
        (vec![("Authorization", "s3cret")], 401),
        (vec![("Authorization", "Bearer s3cret")], 200),
    ] {
        let r = server.call("POST", "/sdapi/v1/txt2img", &headers, body.as_bytes());
        assert_eq!(r.status, want, "{headers:?}");
        let r = server.call("POST", "/v1/images/generations", &headers, body.as_bytes());
        assert_eq!(r.status, want, "{headers:?}");
        if want == 401 {
            assert_eq!(r.json()["error"]["code"], "invalid_api_key");
        }
    }
    // health needs none
    assert_eq!(server.get("/health").status, 200);
}

#[test]
fn listening_beyond_loopback_needs_a_key() {
    let tiny = model_dir("tiny").display().to_string();
    let o = Command::new(env!("CARGO_BIN_EXE_sdgen"))
        .args([
            "serve", "--model", &tiny, "--host", "0.0.0.0", "--port", "0",
        ])
        .env_remove("SDGEN_API_KEY")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with("error: ") && err.contains("--api-key") && err.lines().count() == 1,
        "{err}"
    );
}

/// A request that runs for tens of seconds on the tiny model unless stopped (1000 steps, the
/// most its scheduler has, on 32x32 latents).
fn long_job() -> Value {
    json!({"prompt": "a", "seed": 1, "steps": 1000, "width": 64, "height": 64, "sampler_name": "Euler"})
}

#[test]
fn interrupt_answers_with_what_was_done_and_a_full_queue_is_503() {
    let server = Server::start(&["--queue", "1", "--max-steps", "1000"]);
    let running = {
        let client = server.client;
        std::thread::spawn(move || {
            let r = client.post("/sdapi/v1/txt2img", &long_job());
            (r.status, r.json())
        })
    };
    let p = server.wait_progress("the long job started", |p| {
        p["state"]["sampling_step"].as_u64() > Some(2)
    });
    assert_eq!(p["state"]["sampling_steps"], 1000);
    assert_eq!(p["state"]["job"], "txt2img");
    assert!(
        p["progress"].as_f64().unwrap() > 0.0 && p["eta_relative"].as_f64().unwrap() > 0.0,
        "{p}"
    );
    // one waits in the queue (its client leaves at once: it must not run), the next is refused
    {
        let mut waiting = TcpStream::connect(server.url()).unwrap();
        let body = json!({"prompt": "b", "steps": 1, "width": 32, "height": 32}).to_string();
        write!(
            waiting,
            "POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        server.wait_progress("one queued", |p| p["state"]["job_count"] == 2);
        let r = server.post("/sdapi/v1/txt2img", &json!({"prompt": "c", "steps": 1}));
        let (status, message) = error_of(&r);
        assert_eq!(status, 503, "{message}");
        assert!(message.contains("queue is full"), "{message}");
        assert!(r.header("retry-after").is_some());
    }
    let r = server.post("/sdapi/v1/interrupt", &json!({}));
    assert_eq!(r.status, 200);
    let (status, v) = running.join().unwrap();
    assert_eq!(status, 200);
    assert_eq!(v["images"], json!([]));
    let info: Value = serde_json::from_str(v["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["interrupted"], true);
    let p = server.wait_progress("idle", |p| p["state"]["job_count"] == 0);
    assert_eq!(p["state"]["interrupted"], true);
}

#[test]
fn a_client_that_leaves_cancels_its_job() {
    let server = Server::start(&["--max-steps", "1000"]);
    {
        let mut s = TcpStream::connect(server.url()).unwrap();
        let body = long_job().to_string();
        write!(
            s,
            "POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        server.wait_progress("the long job started", |p| {
            p["state"]["sampling_step"].as_u64() > Some(2)
        });
    } // the connection closes here
    let t = Instant::now();
    let p = server.wait_progress("cancelled", |p| p["state"]["job_count"] == 0);
    assert!(t.elapsed() < Duration::from_secs(10), "{p}");
    assert_eq!(p["state"]["interrupted"], false);
    // and the next request is served
    let r = server.post(
        "/sdapi/v1/txt2img",
        &json!({"prompt": "a", "steps": 1, "width": 32, "height": 32}),
    );
    assert_eq!(r.status, 200);
}

#[test]
fn sigterm_cancels_the_running_job_and_exits_cleanly() {
    let mut server = Server::start(&["--max-steps", "1000"]);
    let running = {
        let client = server.client;
        std::thread::spawn(move || error_of(&client.post("/sdapi/v1/txt2img", &long_job())))
    };
    server.wait_progress("the long job started", |p| {
        p["state"]["sampling_step"].as_u64() > Some(2)
    });
    let t = Instant::now();
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    let (status, message) = running.join().unwrap();
    assert_eq!(status, 503, "{message}");
    assert!(message.contains("shutting down"), "{message}");
    let code = server.child.wait().unwrap();
    assert_eq!(code.code(), Some(0));
    assert!(t.elapsed() < Duration::from_secs(10));
}
