//! Downloads from the Hugging Face Hub through hf-hub into the shared cache, with what hf-hub
//! leaves to its caller: choosing the files, checking each download against the size and
//! sha256 the Hub announces, retrying and resuming dropped connections, and errors that say
//! what to do.

use super::cache::{from_cache, hub_cache_dir, repo_folder};
use super::files::{plan_files, ModelFiles, ModelRequest, Plan};
use crate::config::ModelIndex;
use anyhow::{bail, Context, Result};
use hf_hub::api::sync::{Api, ApiBuilder, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Attempts per file after a dropped connection; each one resumes where the last stopped.
const RETRIES: usize = 3;

#[derive(Debug, Deserialize)]
struct LfsInfo {
    sha256: String,
    size: u64,
}

#[derive(Debug, Deserialize)]
struct Sibling {
    rfilename: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    lfs: Option<LfsInfo>,
}

/// `GET /api/models/{repo}/revision/{rev}?blobs=true`.
#[derive(Debug, Deserialize)]
struct RepoInfo {
    sha: String,
    siblings: Vec<Sibling>,
}

fn api(progress: bool) -> Result<Api> {
    let mut builder = ApiBuilder::from_cache(Cache::new(hub_cache_dir()))
        .with_progress(progress)
        .with_retries(RETRIES);
    if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
        if !endpoint.is_empty() {
            builder = builder.with_endpoint(endpoint.trim_end_matches('/').to_string());
        }
    }
    if let Ok(token) = std::env::var("HF_TOKEN") {
        if !token.is_empty() {
            builder = builder.with_token(Some(token));
        }
    }
    builder
        .build()
        .context("cannot set up the Hugging Face Hub client")
}

/// What went wrong talking to the Hub, in the user's terms.
enum HubFailure {
    Unreachable(String),
    Status(u16),
    Other(String),
}

fn classify(e: &ureq::Error) -> HubFailure {
    match e {
        ureq::Error::StatusCode(code) => HubFailure::Status(*code),
        ureq::Error::Io(_)
        | ureq::Error::ConnectionFailed
        | ureq::Error::HostNotFound
        | ureq::Error::Timeout(_) => HubFailure::Unreachable(e.to_string()),
        other => HubFailure::Other(other.to_string()),
    }
}

fn failure_message(repo_id: &str, revision: &str, what: &str, f: &HubFailure) -> String {
    match f {
        HubFailure::Status(401 | 403) => format!(
            "{what}: the Hub refused access to {repo_id} (it may be gated or private, or not exist): set HF_TOKEN to a token that can read it (https://huggingface.co/settings/tokens)"
        ),
        HubFailure::Status(404) => format!(
            "{what}: {repo_id} (revision {revision}) was not found on the Hub: check the repo id and --revision (a private repo also needs HF_TOKEN)"
        ),
        HubFailure::Status(code) if *code >= 500 => format!(
            "{what}: the Hub answered with a server error ({code}) for {repo_id}; try again later (a cached model works with --offline)"
        ),
        HubFailure::Status(code) => format!("{what}: the Hub answered HTTP {code} for {repo_id}"),
        HubFailure::Unreachable(msg) => format!(
            "{what}: cannot reach the Hugging Face Hub ({msg}); check the network or HF_ENDPOINT, or use --offline with a cached model"
        ),
        HubFailure::Other(msg) => format!("{what}: {msg}"),
    }
}

fn repo_info(repo: &ApiRepo) -> std::result::Result<RepoInfo, HubFailure> {
    let mut response = repo
        .info_request()
        .query("blobs", "true")
        .call()
        .map_err(|e| classify(&e))?;
    response
        .body_mut()
        .read_json::<RepoInfo>()
        .map_err(|e| HubFailure::Other(format!("unexpected answer from the Hub: {e}")))
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Checks a fresh download against what the Hub announced; a bad file is removed from the
/// cache (blob and snapshot link) so that it is never used.
fn verify(path: &Path, sibling: &Sibling) -> Result<()> {
    let expected_size = sibling.lfs.as_ref().map(|l| l.size).or(sibling.size);
    let size = std::fs::metadata(path)?.len();
    let mut problem = None;
    if let Some(want) = expected_size {
        if size != want {
            problem = Some(format!("{size} bytes instead of {want}"));
        }
    }
    if problem.is_none() {
        if let Some(lfs) = &sibling.lfs {
            let got = sha256_file(path)?;
            if !got.eq_ignore_ascii_case(&lfs.sha256) {
                problem = Some(format!("sha256 {got} instead of {}", lfs.sha256));
            }
        }
    }
    if let Some(problem) = problem {
        if let Ok(blob) = std::fs::canonicalize(path) {
            let _ = std::fs::remove_file(blob);
        }
        let _ = std::fs::remove_file(path);
        bail!(
            "the download of {} does not match the Hub's checksum ({problem}); it was removed from the cache, run again to download it anew",
            sibling.rfilename
        );
    }
    Ok(())
}

/// The cached copy of `file` at `commit`, when it is complete.
fn cached(repo_id: &str, commit: &str, file: &str) -> Option<PathBuf> {
    let p = hub_cache_dir()
        .join(repo_folder(repo_id))
        .join("snapshots")
        .join(commit)
        .join(file);
    p.exists().then_some(p)
}

/// Downloads (or reuses) the files a model needs into the shared cache: the diffusers
/// components, or one single-file checkpoint.
pub fn fetch(req: &ModelRequest) -> Result<ModelFiles> {
    let (repo_id, revision, progress) = (req.model, req.revision, req.progress);
    let api = api(progress)?;
    let repo = api.repo(Repo::with_revision(
        repo_id.to_string(),
        RepoType::Model,
        revision.to_string(),
    ));
    let info = match repo_info(&repo) {
        Ok(info) => info,
        Err(f) => {
            // Offline when cached: an unreachable (or failing) Hub is not needed for a model
            // that is complete in the cache.
            if matches!(f, HubFailure::Unreachable(_) | HubFailure::Status(500..)) {
                if let Ok(files) = from_cache(req) {
                    if progress {
                        eprintln!(
                            "warning: {}; using the cached copy",
                            failure_message(repo_id, revision, "Hub", &f)
                        );
                    }
                    return Ok(files);
                }
            }
            bail!(failure_message(
                repo_id,
                revision,
                "cannot list the files of the model",
                &f
            ));
        }
    };
    let by_name: BTreeMap<&str, &Sibling> = info
        .siblings
        .iter()
        .map(|s| (s.rfilename.as_str(), s))
        .collect();
    let available: BTreeSet<String> = by_name.keys().map(|s| s.to_string()).collect();
    let plan = plan_files(&available, req.precision, repo_id, req.checkpoint)?;
    let files = match &plan {
        Plan::Diffusers(files) => files.clone(),
        Plan::SingleFile(f) => vec![f.clone()],
    };
    let mut paths = Vec::new();
    for f in &files {
        let path = match cached(repo_id, &info.sha, f) {
            Some(p) => p,
            None => {
                let p = repo.download(f).map_err(|e| {
                    let failure = match &e {
                        hf_hub::api::sync::ApiError::RequestError(re) => classify(re),
                        other => HubFailure::Other(other.to_string()),
                    };
                    anyhow::anyhow!(failure_message(
                        repo_id,
                        revision,
                        &format!("downloading {f}"),
                        &failure
                    ))
                })?;
                verify(&p, by_name[f.as_str()])?;
                p
            }
        };
        if f == "model_index.json" {
            // Refuse other pipelines before the big downloads.
            ModelIndex::load(&path)?;
        }
        paths.push(path);
    }
    match plan {
        Plan::Diffusers(files) => {
            let root = paths[0]
                .parent()
                .context("model_index.json has no folder")?;
            Ok(ModelFiles::from_root(
                repo_id.to_string(),
                Some(info.sha),
                root,
                &files,
            ))
        }
        Plan::SingleFile(_) => ModelFiles::single_file(
            repo_id.to_string(),
            Some(info.sha),
            &paths[0],
            req.config_from,
        ),
    }
}
