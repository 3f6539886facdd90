//! Downloads from the Hugging Face Hub into the shared cache (the layout of Python's
//! `huggingface_hub`): the file list through hf-hub, then each file resolved and transferred
//! here, with what hf-hub leaves to its caller: choosing the files, checking every name the
//! server sends before it becomes a path, checking each download against the size and sha256
//! the Hub announces, retrying and resuming dropped connections, and errors that say what to
//! do.
//!
//! Why not hf-hub's `download`: it builds cache paths from the server's `ETag` and
//! `X-Repo-Commit` unchecked (an endpoint, mirror or proxy answering `../` or an absolute path
//! overwrote any file the user can write, or linked outside the cache), panics on a redirect
//! without `Location`, and asks for those headers again for the transfer, so a check before
//! calling it would not hold against a server that answers differently the second time.

use super::cache::{cached_file, from_cache, hub_cache_dir, repo_folder};
use super::files::{plan_files, ModelFiles, ModelRequest, Plan};
use crate::config::ModelIndex;
use anyhow::{bail, Context, Result};
use hf_hub::api::sync::{Api, ApiBuilder, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

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

/// The Hub token: HF_TOKEN when set and not empty, else the `token` file a
/// `huggingface-cli login` leaves beside the cache (hf-hub's rule).
fn token() -> Option<String> {
    std::env::var("HF_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .or_else(|| Cache::new(hub_cache_dir().ok()?).token())
}

/// hf-hub's client, for the file list and the files' URLs (the downloads are [`download`]'s).
fn api() -> Result<Api> {
    let mut builder = ApiBuilder::from_cache(Cache::new(hub_cache_dir()?)).with_token(token());
    if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
        if !endpoint.is_empty() {
            builder = builder.with_endpoint(endpoint.trim_end_matches('/').to_string());
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
            let got = crate::weights::file_sha256(path, 0)?;
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
        .ok()?
        .join(repo_folder(repo_id))
        .join("snapshots")
        .join(commit)
        .join(file);
    p.exists().then_some(p)
}

/// The repo's file list at `revision`, its commit checked; when the Hub cannot be reached
/// (or fails), what `cached` finds in the cache instead, with a warning.
fn listing<T>(
    repo: &ApiRepo,
    (repo_id, revision): (&str, &str),
    progress: bool,
    cached: impl FnOnce() -> Result<T>,
) -> Result<std::result::Result<RepoInfo, T>> {
    let info = match repo_info(repo) {
        Ok(info) => info,
        Err(f) => {
            // Offline when cached: an unreachable (or failing) Hub is not needed for what is
            // complete in the cache.
            if matches!(f, HubFailure::Unreachable(_) | HubFailure::Status(500..)) {
                if let Ok(found) = cached() {
                    if progress {
                        eprintln!(
                            "warning: {}; using the cached copy",
                            failure_message(repo_id, revision, "Hub", &f)
                        );
                    }
                    return Ok(Err(found));
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
    if !is_hex(&info.sha, 40..=40) {
        bail!(
            "the Hub named the commit of {repo_id} {:?}, not a commit hash; refusing to use it as a folder name (check HF_ENDPOINT)",
            info.sha
        );
    }
    Ok(Ok(info))
}

fn hub_repo(api: &Api, repo_id: &str, revision: &str) -> ApiRepo {
    api.repo(Repo::with_revision(
        repo_id.to_string(),
        RepoType::Model,
        revision.to_string(),
    ))
}

/// One file of a repo (a LoRA, an embedding) at `revision`, downloaded into the shared cache
/// or found there.
pub fn fetch_file(repo_id: &str, revision: &str, file: &str, progress: bool) -> Result<PathBuf> {
    if !is_plain_repo_path(file) {
        bail!("{file:?} is not a file name inside a repo");
    }
    let api = api()?;
    let repo = hub_repo(&api, repo_id, revision);
    let info = match listing(&repo, (repo_id, revision), progress, || {
        cached_file(repo_id, revision, file)
    })? {
        Ok(info) => info,
        Err(path) => return Ok(path),
    };
    let Some(sibling) = info.siblings.iter().find(|s| s.rfilename == file) else {
        bail!("{repo_id} (revision {revision}) has no file {file}");
    };
    let place = Place {
        repo_id,
        revision,
        commit: &info.sha,
        file,
    };
    let path = cached_or_download(&Client::new(), &repo, &place, sibling, progress)?;
    write_ref(repo_id, revision, &info.sha)?;
    Ok(path)
}

/// Downloads (or reuses) the files a model needs into the shared cache: the diffusers
/// components, or one single-file checkpoint.
pub fn fetch(req: &ModelRequest) -> Result<ModelFiles> {
    let (repo_id, revision, progress) = (req.model, req.revision, req.progress);
    let api = api()?;
    let repo = hub_repo(&api, repo_id, revision);
    let info = match listing(&repo, (repo_id, revision), progress, || from_cache(req))? {
        Ok(info) => info,
        Err(files) => return Ok(files),
    };
    let client = Client::new();
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
    if let Some(bad) = files.iter().find(|f| !is_plain_repo_path(f)) {
        bail!("the Hub listed a file {bad:?} that would leave the model's folder; refusing it");
    }
    let mut paths = Vec::new();
    for f in &files {
        let place = Place {
            repo_id,
            revision,
            commit: &info.sha,
            file: f,
        };
        let path = cached_or_download(&client, &repo, &place, by_name[f.as_str()], progress)?;
        if f == "model_index.json" {
            // Refuse other pipelines, and SDXL without its second encoder, before the big
            // downloads.
            let index = ModelIndex::load(&path)?;
            if index.family == crate::config::Family::Sdxl
                && !super::files::has_second_encoder(&available)
            {
                bail!("{repo_id} is an SDXL pipeline without text_encoder_2/config.json");
            }
        }
        paths.push(path);
    }
    write_ref(repo_id, revision, &info.sha)?;
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

/// Whether `s` is a hex digest of `len` characters: the only commit and blob names that may
/// become paths in the cache.
fn is_hex(s: &str, len: std::ops::RangeInclusive<usize>) -> bool {
    len.contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A path inside a repo (`unet/config.json`) none of whose parts leaves its folder.
fn is_plain_repo_path(p: &str) -> bool {
    !p.is_empty()
        && !p.contains('\\')
        && Path::new(p)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

/// The HTTP clients of the downloads: one that stops at the first answer (to read the Hub's
/// headers before a redirect to its CDN), one that follows redirects for the bytes; both send
/// the [`token`], the second only to the host it was given for.
struct Client {
    first_answer: ureq::Agent,
    follow: ureq::Agent,
    token: Option<String>,
}

impl Client {
    fn new() -> Self {
        Self {
            first_answer: ureq::Agent::config_builder()
                .max_redirects(0)
                .build()
                .into(),
            follow: ureq::Agent::config_builder()
                .redirect_auth_headers(ureq::config::RedirectAuthHeaders::SameHost)
                .build()
                .into(),
            token: token(),
        }
    }

    fn get(
        &self,
        agent: &ureq::Agent,
        url: &str,
        range: &str,
    ) -> ureq::RequestBuilder<ureq::typestate::WithoutBody> {
        let request = agent
            .get(url)
            .header("User-Agent", concat!("sdgen/", env!("CARGO_PKG_VERSION")))
            .header("Range", range);
        match &self.token {
            Some(t) => request.header("Authorization", format!("Bearer {t}")),
            None => request,
        }
    }
}

/// `scheme://host[:port]` of a URL.
fn origin(url: &str) -> &str {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    match url[after_scheme..].find('/') {
        Some(i) => &url[..after_scheme + i],
        None => url,
    }
}

/// The commit and the blob name the Hub gives for one file (`X-Repo-Commit`, and
/// `X-Linked-Etag` or `ETag`), following the Hub's own relative redirects (a renamed repo);
/// an absolute redirect (to the CDN) carries them itself.
fn resolve(client: &Client, url: &str) -> std::result::Result<(String, String), HubFailure> {
    let mut url = url.to_string();
    for _ in 0..5 {
        let response = client
            .get(&client.first_answer, &url, "bytes=0-0")
            .call()
            .map_err(|e| classify(&e))?;
        let header = |k: &str| {
            response
                .headers()
                .get(k)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        if response.status().is_redirection() {
            let Some(location) = header("location") else {
                return Err(HubFailure::Other(
                    "the Hub answered a redirect without a Location".into(),
                ));
            };
            if location.starts_with('/') && !location.starts_with("//") {
                url = format!("{}{location}", origin(&url));
                continue;
            }
        }
        let missing = |h: &str| HubFailure::Other(format!("the Hub's answer has no {h} header"));
        let commit = header("x-repo-commit").ok_or_else(|| missing("X-Repo-Commit"))?;
        let etag = header("x-linked-etag")
            .or_else(|| header("etag"))
            .ok_or_else(|| missing("ETag"))?;
        let etag = etag.trim_start_matches("W/").trim_matches('"').to_string();
        return Ok((commit, etag));
    }
    Err(HubFailure::Other(
        "the Hub redirected too many times".into(),
    ))
}

/// Appends `url`'s bytes to `part` (a partial file from an earlier run is resumed), retrying
/// a dropped connection from where it stopped; `size` from the file list.
fn transfer(
    client: &Client,
    url: &str,
    part: &Path,
    size: Option<u64>,
    bar: &ProgressBar,
) -> std::result::Result<(), HubFailure> {
    let io = |e: std::io::Error| HubFailure::Other(format!("{}: {e}", part.display()));
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(part)
        .map_err(io)?;
    let mut failure = None;
    for attempt in 0..=RETRIES {
        if attempt > 0 {
            std::thread::sleep(std::time::Duration::from_millis(300 << attempt));
        }
        let mut have = file.metadata().map_err(io)?.len();
        if size.is_some_and(|s| have > s) {
            file.set_len(0).map_err(io)?;
            have = 0;
        }
        if size == Some(have) {
            return Ok(());
        }
        let response = match client
            .get(&client.follow, url, &format!("bytes={have}-"))
            .call()
        {
            Ok(r) => r,
            Err(e) => {
                let f = classify(&e);
                if matches!(f, HubFailure::Status(code) if code < 500) {
                    return Err(f);
                }
                failure = Some(f);
                continue;
            }
        };
        if response.status() != 206 && have > 0 {
            // the server sent the whole file, not the rest
            file.set_len(0).map_err(io)?;
            have = 0;
        }
        bar.set_position(have);
        let mut body = bar.wrap_read(response.into_body().into_reader());
        match std::io::copy(&mut body, &mut file) {
            Ok(_) => return Ok(()),
            Err(e) => failure = Some(HubFailure::Unreachable(e.to_string())),
        }
    }
    Err(failure.unwrap_or(HubFailure::Other("no answer".into())))
}

/// Which file of which repo a download is for.
struct Place<'a> {
    repo_id: &'a str,
    revision: &'a str,
    /// The commit the file list gave for the revision (checked: 40 hex digits).
    commit: &'a str,
    file: &'a str,
}

/// The cached copy of a file at its commit, else [`download`]'s.
fn cached_or_download(
    client: &Client,
    repo: &ApiRepo,
    place: &Place,
    sibling: &Sibling,
    progress: bool,
) -> Result<PathBuf> {
    match cached(place.repo_id, place.commit, place.file) {
        Some(p) => Ok(p),
        None => download(client, repo, place, sibling, progress),
    }
}

/// Downloads a file of the repo at its commit into the shared cache: the blob `blobs/ETAG`
/// and its link `snapshots/COMMIT/FILE`, both named only from checked hex digests, then
/// checked against the listing's size and sha256.
fn download(
    client: &Client,
    repo: &ApiRepo,
    place: &Place,
    sibling: &Sibling,
    progress: bool,
) -> Result<PathBuf> {
    let Place {
        repo_id,
        revision,
        commit,
        file,
    } = *place;
    let url = repo.url(file);
    let what = format!("downloading {file}");
    let fail = |f: HubFailure| anyhow::anyhow!(failure_message(repo_id, revision, &what, &f));
    let (served_commit, etag) = resolve(client, &url).map_err(fail)?;
    if served_commit != commit {
        bail!(
            "{what}: the Hub's answers disagree: commit {commit:?} in the file list, {served_commit:?} for the file (check HF_ENDPOINT, or run again if the branch just moved)"
        );
    }
    if !is_hex(&etag, 32..=128) {
        bail!("{what}: the Hub named the file's blob {etag:?}, not a hash; refusing to use it as a file name (check HF_ENDPOINT)");
    }
    let repo_dir = hub_cache_dir()?.join(repo_folder(repo_id));
    let blobs = repo_dir.join("blobs");
    std::fs::create_dir_all(&blobs)
        .with_context(|| format!("cannot create {}", blobs.display()))?;
    let blob = blobs.join(&etag);
    if !blob.is_file() {
        let part = blobs.join(format!("{etag}.incomplete"));
        let size = sibling.lfs.as_ref().map(|l| l.size).or(sibling.size);
        let bar = if progress {
            let b = ProgressBar::new(size.unwrap_or(0));
            b.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            b.set_message(file.to_string());
            b
        } else {
            ProgressBar::hidden()
        };
        transfer(client, &url, &part, size, &bar).map_err(fail)?;
        bar.finish_and_clear();
        std::fs::rename(&part, &blob)
            .with_context(|| format!("cannot move the download to {}", blob.display()))?;
    }
    let pointer = repo_dir.join("snapshots").join(commit).join(file);
    let folder = pointer.parent().expect("inside the snapshot");
    std::fs::create_dir_all(folder)
        .with_context(|| format!("cannot create {}", folder.display()))?;
    // from snapshots/COMMIT/a/b/FILE up to the repo folder: one level per part of FILE, one
    // for COMMIT
    let ups = Path::new(file).components().count() + 1;
    let target: PathBuf = std::iter::repeat_n(Path::new(".."), ups)
        .collect::<PathBuf>()
        .join("blobs")
        .join(&etag);
    let _ = std::fs::remove_file(&pointer);
    std::os::unix::fs::symlink(&target, &pointer)
        .with_context(|| format!("cannot link {}", pointer.display()))?;
    verify(&pointer, sibling)?;
    Ok(pointer)
}

/// `refs/REVISION` holds the commit a branch or tag name resolved to, for offline use.
fn write_ref(repo_id: &str, revision: &str, commit: &str) -> Result<()> {
    if revision == commit || !is_plain_repo_path(revision) {
        return Ok(());
    }
    let path = hub_cache_dir()?
        .join(repo_folder(repo_id))
        .join("refs")
        .join(revision);
    std::fs::create_dir_all(path.parent().expect("inside refs"))?;
    std::fs::write(&path, commit).with_context(|| format!("cannot write {}", path.display()))
}
