//! A small HTTP server on 127.0.0.1 that speaks the part of the Hub protocol hf-hub uses:
//! `GET /api/models/{repo}/revision/{rev}` (file list with sizes and LFS sha256) and
//! `GET /{repo}/resolve/{rev}/{path}` with `Range` (ETag, X-Repo-Commit, Content-Range),
//! with faults to inject: cut connections, corrupted bytes, error statuses, a token gate.

use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

pub const COMMIT: &str = "5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e";

#[derive(Default)]
pub struct State {
    pub repo: String,
    pub files: BTreeMap<String, Vec<u8>>,
    /// Every status answered for every request when set.
    pub status: Option<u16>,
    /// Requests must carry `Authorization: Bearer <token>` (else 401).
    pub token: Option<String>,
    /// Files whose next body is cut after half of its bytes (once each).
    pub cut_once: HashSet<String>,
    /// Files served with one byte flipped.
    pub corrupt: HashSet<String>,
    /// "path range" of each request.
    pub log: Vec<String>,
    /// Headers of every file answer replaced by these (a hostile endpoint).
    pub override_headers: Vec<(String, String)>,
    /// File answers are a 302 without a Location header.
    pub redirect_without_location: bool,
    /// The commit the file list names, when not [`COMMIT`].
    pub listed_commit: Option<String>,
}

pub struct HubServer {
    pub url: String,
    pub state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    addr: std::net::SocketAddr,
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn is_lfs(path: &str) -> bool {
    path.ends_with(".safetensors") || path.ends_with(".bin") || path.ends_with(".ckpt")
}

impl HubServer {
    pub fn start(repo: &str, files: BTreeMap<String, Vec<u8>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            repo: repo.to_string(),
            files,
            ..Default::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if sp.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(c) = conn {
                    let st = st.clone();
                    std::thread::spawn(move || {
                        let _ = handle(c, &st);
                    });
                }
            }
        });
        Self {
            url: format!("http://{addr}"),
            state,
            stop,
            addr,
        }
    }

    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().log.clone()
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

impl Drop for HubServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn respond(
    s: &mut TcpStream,
    status: u16,
    headers: &[(String, String)],
    body: &[u8],
    cut: Option<usize>,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        401 => "Unauthorized",
        404 => "Not Found",
        _ => "Error",
    };
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    match cut {
        Some(n) => {
            s.write_all(&body[..n])?;
            s.flush()?;
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        None => s.write_all(body)?,
    }
    s.flush()
}

fn handle(mut s: TcpStream, state: &Arc<Mutex<State>>) -> std::io::Result<()> {
    let mut reader = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let target = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut range = None;
    let mut auth = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
        let (k, v) = h.split_once(':').unwrap_or((&h, ""));
        match k.trim().to_ascii_lowercase().as_str() {
            "range" => range = Some(v.trim().to_string()),
            "authorization" => auth = Some(v.trim().to_string()),
            _ => {}
        }
    }
    let mut st = state.lock().unwrap();
    st.log
        .push(format!("{target} {}", range.clone().unwrap_or_default()));
    if let Some(code) = st.status {
        drop(st);
        return respond(&mut s, code, &[], b"{\"error\":\"injected\"}", None);
    }
    if let Some(tok) = &st.token {
        if auth.as_deref() != Some(&format!("Bearer {tok}")) {
            drop(st);
            return respond(
                &mut s,
                401,
                &[],
                b"{\"error\":\"Invalid credentials\"}",
                None,
            );
        }
    }
    let repo = st.repo.clone();
    let path = target.split('?').next().unwrap_or("").to_string();
    if path.starts_with("/api/models/") {
        if !path.starts_with(&format!("/api/models/{repo}/revision/")) {
            drop(st);
            return respond(
                &mut s,
                404,
                &[],
                b"{\"error\":\"Repository not found\"}",
                None,
            );
        }
        let siblings: Vec<serde_json::Value> = st
            .files
            .iter()
            .map(|(name, data)| {
                let mut v = serde_json::json!({"rfilename": name, "size": data.len()});
                if is_lfs(name) {
                    v["lfs"] = serde_json::json!({"sha256": sha256_hex(data), "size": data.len(), "pointerSize": 134});
                }
                v
            })
            .collect();
        let sha = st
            .listed_commit
            .clone()
            .unwrap_or_else(|| COMMIT.to_string());
        let body = serde_json::json!({"id": repo, "sha": sha, "siblings": siblings}).to_string();
        drop(st);
        return respond(
            &mut s,
            200,
            &[("Content-Type".into(), "application/json".into())],
            body.as_bytes(),
            None,
        );
    }
    let prefix = format!("/{repo}/resolve/");
    let Some(rest) = path.strip_prefix(&prefix) else {
        drop(st);
        return respond(&mut s, 404, &[], b"not found", None);
    };
    let file = rest
        .split_once('/')
        .map(|x| x.1)
        .unwrap_or("")
        .replace("%3D", "=");
    let Some(data) = st.files.get(&file).cloned() else {
        drop(st);
        return respond(
            &mut s,
            404,
            &[("X-Error-Code".into(), "EntryNotFound".into())],
            b"Entry not found",
            None,
        );
    };
    if st.redirect_without_location {
        drop(st);
        return respond(&mut s, 302, &[], b"", None);
    }
    let overrides = st.override_headers.clone();
    let digest = sha256_hex(&data);
    let mut served = data.clone();
    if st.corrupt.contains(&file) && !served.is_empty() {
        let i = served.len() / 2;
        served[i] ^= 0xff;
    }
    let size = data.len();
    let (start, end) = match range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
        Some(r) => {
            let (a, b) = r.split_once('-').unwrap_or((r, ""));
            let a: usize = a.parse().unwrap_or(0);
            let b: usize = if b.is_empty() {
                size - 1
            } else {
                b.parse().unwrap_or(size - 1)
            };
            (a, b.min(size - 1))
        }
        None => (0, size - 1),
    };
    let body = served[start..=end].to_vec();
    let full_body = end + 1 - start > 1;
    let cut = if full_body && st.cut_once.remove(&file) {
        Some(body.len() / 2)
    } else {
        None
    };
    drop(st);
    let mut headers = vec![
        ("X-Repo-Commit".to_string(), COMMIT.to_string()),
        ("Accept-Ranges".to_string(), "bytes".to_string()),
    ];
    if is_lfs(&file) {
        headers.push(("ETag".into(), format!("\"{}\"", &digest[..40])));
        headers.push(("X-Linked-Etag".into(), format!("\"{digest}\"")));
        headers.push(("X-Linked-Size".into(), size.to_string()));
    } else {
        headers.push(("ETag".into(), format!("\"{}\"", &digest[..40])));
    }
    for (k, v) in overrides {
        headers.retain(|(h, _)| !h.eq_ignore_ascii_case(&k));
        headers.push((k, v));
    }
    let status = if range.is_some() {
        headers.push((
            "Content-Range".into(),
            format!("bytes {start}-{end}/{size}"),
        ));
        206
    } else {
        200
    };
    respond(&mut s, status, &headers, &body, cut)
}

/// The files of a fixture model, keyed by their path in the repo.
pub fn model_files(dir: &std::path::Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p
                    .strip_prefix(dir)
                    .unwrap()
                    .to_string_lossy()
                    .replace('\\', "/");
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}
