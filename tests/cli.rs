//! The `sdgen` binary end to end on the tiny fixture models: files, determinism, grids,
//! metadata, JSON output, the Hugging Face cache layout, and one-line errors.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn sdgen(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sdgen"));
    cmd.args(args);
    // no network and no user cache in tests
    cmd.env(
        "HF_HUB_CACHE",
        std::env::temp_dir().join("sdgen-test-empty-cache"),
    );
    cmd.env("HF_ENDPOINT", "http://127.0.0.1:9");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("run sdgen")
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "sdgen failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
}

fn tiny() -> String {
    model_dir("tiny").display().to_string()
}

fn png_info(path: &Path) -> (u32, u32, Vec<(String, String)>) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let reader = decoder.read_info().unwrap();
    let info = reader.info();
    let mut text: Vec<(String, String)> = info
        .uncompressed_latin1_text
        .iter()
        .map(|t| (t.keyword.clone(), t.text.clone()))
        .collect();
    for t in &info.utf8_text {
        text.push((t.keyword.clone(), t.get_text().unwrap()));
    }
    (info.width, info.height, text)
}

fn meta<'a>(text: &'a [(String, String)], key: &str) -> &'a str {
    &text
        .iter()
        .find(|(k, _)| k == key)
        .unwrap_or_else(|| panic!("no {key} chunk"))
        .1
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|r| r.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

const FAST: &[&str] = &["--steps", "3", "-q"];

#[test]
fn writes_png_of_requested_size_with_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("nested/folder/cat-{seed}.png");
    let o = sdgen(
        &[
            &[
                "a cat on a beach",
                "-m",
                &tiny(),
                "-s",
                "42",
                "-W",
                "48",
                "-H",
                "32",
                "-n",
                "blurry",
                "-o",
                out.to_str().unwrap(),
            ],
            FAST,
        ]
        .concat(),
        &[],
    );
    ok(&o);
    let path = dir.path().join("nested/folder/cat-42.png");
    let (w, h, text) = png_info(&path);
    assert_eq!((w, h), (48, 32));
    assert_eq!(meta(&text, "prompt"), "a cat on a beach");
    assert_eq!(meta(&text, "negative_prompt"), "blurry");
    assert_eq!(meta(&text, "seed"), "42");
    assert_eq!(meta(&text, "steps"), "3");
    assert_eq!(meta(&text, "guidance"), "7.5");
    assert_eq!(meta(&text, "scheduler"), "pndm");
    assert_eq!(meta(&text, "width"), "48");
    assert!(meta(&text, "parameters").starts_with("a cat on a beach\nNegative prompt: blurry\nSteps: 3, Sampler: pndm, CFG scale: 7.5, Seed: 42, Size: 48x32"));
    assert!(meta(&text, "software").starts_with("sdgen "));
    assert!(o.stdout.is_empty(), "stdout must stay clean");
}

#[test]
fn unicode_prompt_round_trips_through_itxt() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    ok(&sdgen(
        &[
            &[
                "東京の夜景 🌃",
                "-m",
                &tiny(),
                "-s",
                "1",
                "-o",
                out.to_str().unwrap(),
            ],
            FAST,
        ]
        .concat(),
        &[],
    ));
    let (_, _, text) = png_info(&out);
    assert_eq!(meta(&text, "prompt"), "東京の夜景 🌃");
}

#[test]
fn same_seed_gives_identical_files_other_seed_differs() {
    let dir = tempfile::tempdir().unwrap();
    let run = |seed: &str, name: &str| {
        let p = dir.path().join(name);
        ok(&sdgen(
            &[
                &[
                    "a cat",
                    "-m",
                    &tiny(),
                    "-s",
                    seed,
                    "-o",
                    p.to_str().unwrap(),
                ],
                FAST,
            ]
            .concat(),
            &[],
        ));
        std::fs::read(p).unwrap()
    };
    let a = run("7", "a.png");
    let b = run("7", "b.png");
    let c = run("8", "c.png");
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[test]
fn grid_and_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("img-{index}.png");
    let o = sdgen(
        &[
            &[
                "a cat",
                "-m",
                &tiny(),
                "-s",
                "100",
                "--num-images",
                "4",
                "--batch-size",
                "3",
                "--grid",
                "2x2",
                "--json",
                "-o",
                out.to_str().unwrap(),
            ],
            FAST,
        ]
        .concat(),
        &[],
    );
    ok(&o);
    let stdout = String::from_utf8(o.stdout).unwrap();
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["seed"], 100 + i as u64);
        assert_eq!(l["index"], i as u64);
        assert_eq!(l["steps"], 3);
        assert_eq!(l["scheduler"], "pndm");
        assert!(Path::new(l["path"].as_str().unwrap()).exists());
    }
    let (w, h, _) = png_info(&dir.path().join("img-0-grid.png"));
    assert_eq!((w, h), (64, 64));
    // image 2 of the batch equals the same seed generated alone
    let alone = dir.path().join("alone.png");
    ok(&sdgen(
        &[
            &[
                "a cat",
                "-m",
                &tiny(),
                "-s",
                "102",
                "-o",
                alone.to_str().unwrap(),
            ],
            FAST,
        ]
        .concat(),
        &[],
    ));
    let decode = |p: &Path| image::open(p).unwrap().to_rgb8().into_raw();
    assert_eq!(decode(&alone), decode(&dir.path().join("img-2.png")));
}

#[test]
fn scheduler_switch_changes_the_image_and_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.png");
    let b = dir.path().join("b.png");
    ok(&sdgen(
        &[
            &["a cat", "-m", &tiny(), "-s", "3", "-o", a.to_str().unwrap()],
            FAST,
        ]
        .concat(),
        &[],
    ));
    ok(&sdgen(
        &[
            &[
                "a cat",
                "-m",
                &tiny(),
                "-s",
                "3",
                "--scheduler",
                "euler_a",
                "-o",
                b.to_str().unwrap(),
            ],
            FAST,
        ]
        .concat(),
        &[],
    ));
    assert_ne!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    assert_eq!(meta(&png_info(&b).2, "scheduler"), "euler_a");
}

#[test]
fn list_schedulers() {
    let o = sdgen(&["--list-schedulers"], &[]);
    ok(&o);
    let s = String::from_utf8(o.stdout).unwrap();
    for name in ["pndm", "ddim", "euler", "euler_a", "lms"] {
        assert!(
            s.lines().any(|l| l.starts_with(name)),
            "{name} missing from {s}"
        );
    }
}

/// Lays the tiny model out as the Hub cache does: blobs, snapshots/REV with links, refs/main.
fn fake_hub_cache(root: &Path, repo: &str) -> String {
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo_dir = root.join(format!("models--{}", repo.replace('/', "--")));
    let snap = repo_dir.join("snapshots").join(commit);
    let blobs = repo_dir.join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let src = model_dir("tiny");
    let mut stack = vec![src.clone()];
    let mut n = 0;
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let rel = p.strip_prefix(&src).unwrap();
            let blob = blobs.join(format!("blob{n}"));
            n += 1;
            std::fs::copy(&p, &blob).unwrap();
            let link = snap.join(rel);
            std::fs::create_dir_all(link.parent().unwrap()).unwrap();
            std::os::unix::fs::symlink(&blob, &link).unwrap();
        }
    }
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs/main"), commit).unwrap();
    commit.to_string()
}

#[test]
fn resolves_a_repo_id_from_the_hub_cache_offline() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("hub");
    let commit = fake_hub_cache(&cache, "org/tiny-sd");
    let cache_s = cache.to_str().unwrap();
    for (flag, env) in [
        (Some("--offline"), None),
        (None, Some(("HF_HUB_OFFLINE", "1"))),
    ] {
        let out = dir.path().join(format!("o-{}.png", flag.is_some()));
        let mut args = vec![
            "a cat",
            "-m",
            "org/tiny-sd",
            "-s",
            "5",
            "-o",
            out.to_str().unwrap(),
        ];
        args.extend(FAST);
        if let Some(f) = flag {
            args.push(f);
        }
        let mut envs = vec![("HF_HUB_CACHE", cache_s)];
        envs.extend(env);
        ok(&sdgen(&args, &envs));
        let (_, _, text) = png_info(&out);
        assert_eq!(meta(&text, "model"), "org/tiny-sd");
        assert_eq!(meta(&text, "model_revision"), commit);
    }
    // HF_HOME/hub is the default cache under HF_HOME
    let out = dir.path().join("home.png");
    let o = sdgen(
        &[
            &[
                "a cat",
                "-m",
                "org/tiny-sd",
                "--offline",
                "-o",
                out.to_str().unwrap(),
            ],
            FAST,
        ]
        .concat(),
        &[
            ("HF_HUB_CACHE", ""),
            ("HF_HOME", dir.path().to_str().unwrap()),
        ],
    );
    ok(&o);
    // not cached: a clear error that names the cache and --offline
    let o = sdgen(
        &[&["a cat", "-m", "org/other", "--offline"], FAST].concat(),
        &[("HF_HUB_CACHE", cache_s)],
    );
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8(o.stderr).unwrap();
    assert!(err.contains("org/other") && err.contains("cache"), "{err}");
}

/// Runs sdgen expecting failure: exit code 1, one `error:` line, no file left in `dir`.
fn fails(args: &[&str], dir: &Path, expect: &str) {
    let before = files_in(dir);
    let o = sdgen(args, &[]);
    assert_eq!(o.status.code(), Some(1), "{args:?} should fail");
    let err = String::from_utf8(o.stderr).unwrap();
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got {err:?}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(err.contains(expect), "{err:?} should mention {expect:?}");
    assert!(!err.contains("panicked") && !err.contains("backtrace"));
    assert_eq!(files_in(dir), before, "files changed after {args:?}");
}

fn copy_model(to: &Path) {
    let src = model_dir("tiny2");
    let mut stack = vec![src.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let t = to.join(p.strip_prefix(&src).unwrap());
            if p.is_dir() {
                std::fs::create_dir_all(&t).unwrap();
                stack.push(p);
            } else {
                std::fs::copy(&p, &t).unwrap();
            }
        }
    }
}

#[test]
fn bad_input_gives_one_line_errors_and_no_files() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let out = out_dir.join("img.png");
    let o = out.to_str().unwrap();
    let tiny2 = model_dir("tiny2").display().to_string();
    fails(
        &["a cat", "-m", &tiny2, "-W", "60", "-o", o, "-q"],
        &out_dir,
        "multiples of 8",
    );
    fails(
        &["a cat", "-m", &tiny2, "--steps", "0", "-o", o, "-q"],
        &out_dir,
        "--steps",
    );
    fails(
        &["a cat", "-m", &tiny2, "--scheduler", "fancy", "-o", o, "-q"],
        &out_dir,
        "pndm",
    );
    fails(
        &["a cat", "-m", "./no/such/model", "-o", o, "-q"],
        &out_dir,
        "does not exist",
    );
    fails(
        &["a cat", "-m", &tiny2, "--device", "cuda", "-o", o, "-q"],
        &out_dir,
        "cuda",
    );

    let broken = dir.path().join("broken");
    copy_model(&broken);
    std::fs::remove_file(broken.join("unet/config.json")).unwrap();
    fails(
        &["a cat", "-m", broken.to_str().unwrap(), "-o", o, "-q"],
        &out_dir,
        "unet/config.json",
    );

    let corrupt = dir.path().join("corrupt");
    copy_model(&corrupt);
    let w = corrupt.join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    fails(
        &["a cat", "-m", corrupt.to_str().unwrap(), "-o", o, "-q"],
        &out_dir,
        "diffusion_pytorch_model.safetensors",
    );

    std::fs::write(&out, b"precious").unwrap();
    fails(
        &["a cat", "-m", &tiny2, "-o", o, "-q", "--steps", "2"],
        &out_dir,
        "--overwrite",
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    ok(&sdgen(
        &[
            "a cat",
            "-m",
            &tiny2,
            "-o",
            o,
            "-q",
            "--steps",
            "2",
            "--overwrite",
        ],
        &[],
    ));
    assert_ne!(std::fs::read(&out).unwrap(), b"precious");
}

/// `--timestep-spacing trailing` with DDIM at 3, 6 and 24 steps indexed its table at -1 (a
/// panic); PNDM at 1000 steps with the model's steps_offset 1 indexed past it (diffusers stops
/// there too): now images, and one error line.
#[test]
fn scheduler_step_counts_that_panicked() {
    let dir = tempfile::tempdir().unwrap();
    for steps in ["3", "6", "24"] {
        let out = dir.path().join(format!("ddim-{steps}.png"));
        ok(&sdgen(
            &[
                "a cat",
                "-m",
                &tiny(),
                "-s",
                "1",
                "-W",
                "64",
                "-H",
                "64",
                "-q",
                "--scheduler",
                "ddim",
                "--timestep-spacing",
                "trailing",
                "--steps",
                steps,
                "-o",
                out.to_str().unwrap(),
            ],
            &[],
        ));
        assert!(out.exists());
    }
    let out = dir.path().join("pndm.png");
    let o = sdgen(
        &[
            "a cat",
            "-m",
            &tiny(),
            "-q",
            "--scheduler",
            "pndm",
            "--steps",
            "1000",
            "-o",
            out.to_str().unwrap(),
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with("error: ") && err.lines().count() == 1,
        "{err}"
    );
    assert!(err.contains("reaches timestep 1000"), "{err}");
    assert!(!out.exists());
}

/// Sizes and counts that cannot fit are refused before any work, with the number that would be
/// needed (they were allocation aborts); planning is linear (20k images planned in 38 s before
/// the model was even looked at).
#[test]
fn absurd_requests_are_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let o = dir.path().join("x-{index}.png");
    let o = o.to_str().unwrap();
    let t = tiny();
    let base = ["a cat", "-m", &t, "-o", o, "-q", "--steps", "1"];
    let cases: &[(&[&str], &str)] = &[
        (&["-W", "2147483648"], "limit of 16384"),
        (&["-W", "100000", "-H", "100000"], "limit of 16384"),
        (&["--num-images", "1000000000"], "1000000 one prompt"),
        (
            &["--grid", "100000x100000", "--num-images", "1000000"],
            "needs --num-images",
        ),
        (
            &["--grid", "4294967296x4294967296", "--num-images", "1"],
            "needs --num-images",
        ),
    ];
    for (extra, want) in cases {
        let args: Vec<&str> = base.iter().chain(extra.iter()).copied().collect();
        fails(&args, dir.path(), want);
    }
    // the model's own estimate: more than any test machine has (16384^2 f32 VAE: 512 GiB)
    let args: Vec<&str> = base
        .iter()
        .chain(&["-W", "16384", "-H", "16384"])
        .copied()
        .collect();
    fails(&args, dir.path(), "GiB");
    // 20k images planned, then the missing model is the error
    fails(
        &[
            "a cat",
            "-m",
            "./no/such/model",
            "-o",
            o,
            "-q",
            "--num-images",
            "20000",
        ],
        dir.path(),
        "does not exist",
    );
}

/// Output paths that cannot be written are found before the model is even looked at (they
/// were found after generating), each in one line; `-g -5` is a guidance (clap suggested
/// `-- -5`, which makes it the prompt); a leftover temporary file of a killed run is removed.
#[test]
fn output_problems_are_found_first_and_said_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("afile"), b"x").unwrap();
    let long = format!("{}/{}.png", d.display(), "x".repeat(240));
    let cases: Vec<(String, &str)> = vec![
        (String::new(), "empty"),
        (format!("{}/out/", d.display()), "ends with '/'"),
        (
            format!("{}/afile/img.png", d.display()),
            "is a file, not a folder",
        ),
        (
            format!("{}/afile/deeper/img.png", d.display()),
            "is a file, not a folder",
        ),
        (long, "bytes long"),
        (d.display().to_string(), "is a directory"),
    ];
    for (out, want) in &cases {
        // the model does not exist: the output is checked before it
        fails(
            &["a cat", "-m", "./no/such/model", "-o", out, "-q"],
            d,
            want,
        );
    }

    let out = d.join("neg.png");
    ok(&sdgen(
        &[
            "a cat",
            "-m",
            &tiny(),
            "-g",
            "-5",
            "--steps",
            "1",
            "-q",
            "-o",
            out.to_str().unwrap(),
        ],
        &[],
    ));
    let (_, _, text) = png_info(&out);
    assert_eq!(meta(&text, "prompt"), "a cat");

    // a killed run's temporary file for this name (its process is gone) is cleaned up; another
    // name's is left alone
    let stale = d.join(".img.png.4194303.0.tmp");
    let other = d.join(".other.png.4194303.0.tmp");
    std::fs::write(&stale, b"half").unwrap();
    std::fs::write(&other, b"half").unwrap();
    let img = d.join("img.png");
    let o = sdgen(
        &[
            "a cat",
            "-m",
            &tiny(),
            "--steps",
            "1",
            "-o",
            img.to_str().unwrap(),
        ],
        &[],
    );
    ok(&o);
    assert!(!stale.exists() && other.exists() && img.exists());
    assert!(String::from_utf8_lossy(&o.stderr).contains("left by a run that was killed"));
}

/// With HOME unset the cache is under the user's home folder from the user database, as
/// Python's huggingface_hub finds it (it was `./.cache` under the current folder).
#[test]
fn the_cache_without_home_is_the_users_not_the_current_folders() {
    let o = Command::new(env!("CARGO_BIN_EXE_sdgen"))
        .args(["a cat", "-m", "org/none", "--offline", "-q"])
        .env_remove("HOME")
        .env_remove("HF_HOME")
        .env_remove("HF_HUB_CACHE")
        .env_remove("XDG_CACHE_HOME")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let at = err
        .split(" cache at ")
        .nth(1)
        .unwrap_or_else(|| panic!("{err}"));
    assert!(
        at.starts_with('/') && at.contains("/.cache/huggingface/hub"),
        "{err}"
    );
    let xdg = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_sdgen"))
        .args(["a cat", "-m", "org/none", "--offline", "-q"])
        .env_remove("HF_HOME")
        .env_remove("HF_HUB_CACHE")
        .env("XDG_CACHE_HOME", xdg.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("{}/huggingface/hub", xdg.path().display())),
        "{err}"
    );
}

/// `--clip-skip` is recorded as the web UI writes it, and one past the text encoder's layers is
/// an error before any work.
#[test]
fn clip_skip_is_recorded_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("c.png");
    let o = out.to_str().unwrap();
    ok(&sdgen(
        &[
            "a cat",
            "-m",
            &tiny(),
            "--clip-skip",
            "2",
            "--steps",
            "1",
            "-q",
            "-o",
            o,
        ],
        &[],
    ));
    let (_, _, text) = png_info(&out);
    assert_eq!(meta(&text, "clip_skip"), "2");
    assert!(meta(&text, "parameters").contains(", Clip skip: 2, RNG: CPU, Version: sdgen"));
    let plain = dir.path().join("p.png");
    let p = plain.to_str().unwrap();
    ok(&sdgen(
        &["a cat", "-m", &tiny(), "--steps", "1", "-q", "-o", p],
        &[],
    ));
    let (_, _, text) = png_info(&plain);
    assert!(!meta(&text, "parameters").contains("Clip skip"));
    let bad = dir.path().join("b.png");
    fails(
        &[
            "a cat",
            "-m",
            &tiny(),
            "--clip-skip",
            "4",
            "-q",
            "-o",
            bad.to_str().unwrap(),
        ],
        dir.path(),
        "--clip-skip 4 is outside 1..=3",
    );
}

/// A web UI sampler name runs (and is recorded as given, so the chunk replays); one without an
/// exact equivalent is one error line before any work.
#[test]
fn web_ui_sampler_names() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("w.png");
    let o = out.to_str().unwrap();
    ok(&sdgen(
        &[
            "a cat",
            "-m",
            &tiny(),
            "--scheduler",
            "DPM++ 2M Karras",
            "--steps",
            "2",
            "-q",
            "-o",
            o,
        ],
        &[],
    ));
    let (_, _, text) = png_info(&out);
    assert_eq!(meta(&text, "scheduler"), "DPM++ 2M Karras");
    assert!(meta(&text, "parameters").contains("Sampler: DPM++ 2M Karras,"));
    let bad = dir.path().join("b.png");
    fails(
        &[
            "a cat",
            "-m",
            &tiny(),
            "--scheduler",
            "DPM++ 2S a",
            "-q",
            "-o",
            bad.to_str().unwrap(),
        ],
        dir.path(),
        "cannot be reproduced",
    );
}

/// sdgen with the e2e prompt pair, seed 42 and 6 euler steps on tiny, plus `extra`, into
/// `out` (the settings of the seed-42 references).
fn seed42_euler(extra: &[&str], out: &Path) -> Output {
    let tiny = tiny();
    let mut args = vec![
        "a photo of a cat on a beach",
        "-n",
        "blurry, lowres",
        "-m",
        &tiny,
        "-s",
        "42",
        "--steps",
        "6",
        "--scheduler",
        "euler",
        "-q",
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend(extra);
    sdgen(&args, &[])
}

fn addon(rel: &str) -> String {
    model_dir("tiny")
        .join("../../addons")
        .join(rel)
        .to_string_lossy()
        .into_owned()
}

/// The first 12 hex digits of the SHA-256 of `path`'s bytes after `skip`.
fn short_sha256(path: &str, skip: usize) -> String {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(path).unwrap();
    format!("{:x}", Sha256::digest(&bytes[skip..]))[..12].to_string()
}

/// LoRAs (flag, `<lora:...>` tag, JSON line) and embeddings from the command line: recorded
/// with the web UI's hashes; a missing LoRA, a tag without --lora-dir and a weight that is no
/// number are one-line errors before any work.
#[test]
fn loras_and_embeddings_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("a.png");
    let addons = addon("");
    let (kohya, peft, shinyfox) = (
        addon("kohya.safetensors"),
        addon("peft.safetensors"),
        addon("emb/shinyfox.pt"),
    );
    ok(&sdgen(
        &[
            "a (shinyfox:1.2) <lora:kohya:0.8>",
            "-m",
            &tiny(),
            "--prompt-syntax",
            "a1111",
            "--lora-dir",
            &addons,
            "--lora",
            &format!("{peft}:0.5"),
            "--embedding",
            &shinyfox,
            "--steps",
            "1",
            "-q",
            "-o",
            out.to_str().unwrap(),
        ],
        &[],
    ));
    let (_, _, text) = png_info(&out);
    let header = |p: &str| {
        let b = std::fs::read(p).unwrap();
        8 + u64::from_le_bytes(b[..8].try_into().unwrap()) as usize
    };
    let params = meta(&text, "parameters");
    assert!(
        params.contains(&format!(
            "TI hashes: \"shinyfox: {}\"",
            short_sha256(&shinyfox, 0)
        )),
        "{params}"
    );
    assert!(
        params.contains(&format!(
            "Lora hashes: \"peft: {}, kohya: {}\"",
            short_sha256(&peft, header(&peft)),
            short_sha256(&kohya, header(&kohya))
        )),
        "{params}"
    );
    assert_eq!(meta(&text, "prompt_syntax"), "a1111");
    assert_eq!(
        meta(&text, "loras"),
        format!(
            "{peft}:0.5:0.5\n{}/kohya.safetensors:0.8:0.8",
            addons.trim_end_matches('/')
        )
    );
    // a JSON line's lora replaces the command line's
    let prompts = dir.path().join("p.jsonl");
    std::fs::write(
        &prompts,
        format!(
            "{{\"prompt\": \"a fox\", \"lora\": \"{kohya}:0.25\", \"output\": \"{}/j.png\"}}\n",
            dir.path().display()
        ),
    )
    .unwrap();
    ok(&sdgen(
        &[
            "--prompts",
            prompts.to_str().unwrap(),
            "-m",
            &tiny(),
            "--lora",
            &peft,
            "--steps",
            "1",
            "-q",
        ],
        &[],
    ));
    let (_, _, text) = png_info(&dir.path().join("j.png"));
    assert_eq!(meta(&text, "loras"), format!("{kohya}:0.25:0.25"));

    let bad = dir.path().join("bad.png");
    let b = bad.to_str().unwrap();
    let base = ["-m", &tiny(), "--steps", "1", "-q", "-o", b];
    let with = |extra: &[&str]| -> Vec<String> {
        extra
            .iter()
            .chain(base.iter())
            .map(|s| s.to_string())
            .collect()
    };
    for (args, expect) in [
        (
            with(&["a fox", "--lora", "nothere.safetensors"]),
            "--lora: nothere.safetensors does not exist",
        ),
        (
            with(&["a <lora:kohya>", "--prompt-syntax", "a1111"]),
            "needs --lora-dir",
        ),
        (
            with(&[
                "a <lora:nothere>",
                "--prompt-syntax",
                "a1111",
                "--lora-dir",
                &addons,
            ]),
            "no nothere.safetensors",
        ),
        (
            with(&[
                "a <lora:../kohya>",
                "--prompt-syntax",
                "a1111",
                "--lora-dir",
                &addons,
            ]),
            "without folders",
        ),
        (
            with(&["(a fox:1.2.3)", "--prompt-syntax", "a1111"]),
            "cannot read the weight",
        ),
        (
            with(&["a fox", "--embedding", &kohya]),
            "not a textual-inversion embedding",
        ),
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        fails(&args, dir.path(), expect);
    }
}

/// `--rng torch-cuda` (and a JSON line's `rng`) is recorded as the web UI names the noise
/// source, and gives another image than the CPU generator's.
#[test]
fn the_generator_is_chosen_and_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let (cpu, cuda) = (dir.path().join("cpu.png"), dir.path().join("cuda.png"));
    for (out, rng) in [(&cpu, "torch-cpu"), (&cuda, "torch-cuda")] {
        ok(&sdgen(
            &[
                "a cat",
                "-m",
                &tiny(),
                "-s",
                "3",
                "--steps",
                "2",
                "--rng",
                rng,
                "-q",
                "-o",
                out.to_str().unwrap(),
            ],
            &[],
        ));
    }
    let (_, _, text) = png_info(&cuda);
    assert_eq!(meta(&text, "rng"), "torch-cuda");
    assert!(meta(&text, "parameters").contains(", RNG: NV,"));
    let pixels = |p: &Path| image::open(p).unwrap().to_rgb8().into_raw();
    assert_ne!(pixels(&cpu), pixels(&cuda));
    let prompts = dir.path().join("p.jsonl");
    std::fs::write(
        &prompts,
        format!(
            "{{\"prompt\": \"a cat\", \"seed\": 3, \"rng\": \"torch-cuda\", \"output\": \"{}/line.png\"}}\n",
            dir.path().display()
        ),
    )
    .unwrap();
    ok(&sdgen(
        &[
            "--prompts",
            prompts.to_str().unwrap(),
            "-m",
            &tiny(),
            "--steps",
            "2",
            "-q",
        ],
        &[],
    ));
    assert_eq!(pixels(&dir.path().join("line.png")), pixels(&cuda));
}

/// `--image` / `--strength` from the command line and a JSON line: diffusers' img2img image,
/// recorded as the web UI records it; missing, broken and unusable inputs are one-line errors.
#[test]
fn image_to_image_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let picture = model_dir("tiny").join("../../img2img/tiny.png");
    let pic = picture.to_str().unwrap();
    let out = dir.path().join("i.png");
    ok(&seed42_euler(&["--image", pic, "--strength", "0.6"], &out));
    let pixels = |p: &Path| image::open(p).unwrap().to_rgb8().into_raw();
    let want = model_dir("tiny").join("../../reference/img2img/tiny-euler-0.6.png");
    let (max, _) = common::pixel_diff(&pixels(&out), &pixels(&want));
    assert!(max <= 1, "max {max}/255");
    let (w, h, text) = png_info(&out);
    assert_eq!((w, h), (32, 32));
    assert!(meta(&text, "parameters").contains(", Denoising strength: 0.6"));
    assert_eq!(meta(&text, "init_image"), pic);
    assert_eq!(meta(&text, "strength"), "0.6");
    // a JSON line's image and strength
    let prompts = dir.path().join("p.jsonl");
    std::fs::write(
        &prompts,
        format!(
            "{{\"prompt\": \"a photo of a cat on a beach\", \"image\": \"{pic}\", \"strength\": 0.6, \"seed\": 42, \"output\": \"{}/j.png\"}}\n",
            dir.path().display()
        ),
    )
    .unwrap();
    ok(&sdgen(
        &[
            "--prompts",
            prompts.to_str().unwrap(),
            "-m",
            &tiny(),
            "-n",
            "blurry, lowres",
            "--steps",
            "6",
            "--scheduler",
            "euler",
            "-q",
        ],
        &[],
    ));
    assert_eq!(pixels(&dir.path().join("j.png")), pixels(&out));

    let broken = dir.path().join("broken.png");
    std::fs::write(&broken, b"not a png").unwrap();
    let bad = dir.path().join("bad.png");
    let b = bad.to_str().unwrap();
    let model = tiny();
    for (args, expect) in [
        (vec!["a cat", "--image", "nothere.png"], "does not exist"),
        (
            vec!["a cat", "--image", broken.to_str().unwrap()],
            "a PNG, JPEG or WebP file is expected",
        ),
        (
            vec!["a cat", "--image", pic, "--strength", "1.5"],
            "outside [0, 1]",
        ),
        (
            vec!["a cat", "--image", pic, "--strength", "0.1", "--steps", "6"],
            "leaves no denoising step",
        ),
    ] {
        let mut all = args.clone();
        all.extend(["-m", &model, "-q", "-o", b]);
        fails(&all, dir.path(), expect);
    }
}

/// `--mask` with `--image`: diffusers' inpainting image for a plain model (strength defaults
/// to 1 as in diffusers), the mask recorded; a mask without an image is refused by clap.
#[test]
fn inpainting_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let pics = model_dir("tiny").join("../../img2img");
    let (pic, mask) = (pics.join("tiny.png"), pics.join("tiny-mask.png"));
    let out = dir.path().join("m.png");
    ok(&seed42_euler(
        &[
            "--image",
            pic.to_str().unwrap(),
            "--mask",
            mask.to_str().unwrap(),
        ],
        &out,
    ));
    let pixels = |p: &Path| image::open(p).unwrap().to_rgb8().into_raw();
    let want = model_dir("tiny").join("../../reference/inpaint/tiny-euler-1.0.png");
    let (max, _) = common::pixel_diff(&pixels(&out), &pixels(&want));
    assert!(max <= 1, "max {max}/255");
    let (_, _, text) = png_info(&out);
    assert_eq!(meta(&text, "mask"), mask.to_str().unwrap());
    assert_eq!(meta(&text, "strength"), "1");
    let o = sdgen(
        &["a cat", "-m", &tiny(), "--mask", mask.to_str().unwrap()],
        &[],
    );
    assert_eq!(
        o.status.code(),
        Some(2),
        "clap refuses --mask without --image"
    );
    // --keep-unmasked: the picture pasted back as diffusers' apply_overlay pastes it
    let kept = dir.path().join("k.png");
    ok(&seed42_euler(
        &[
            "--image",
            pic.to_str().unwrap(),
            "--mask",
            mask.to_str().unwrap(),
            "--keep-unmasked",
        ],
        &kept,
    ));
    let want = model_dir("tiny").join("../../reference/inpaint/overlay-tiny-euler-1.0.png");
    let (max, _) = common::pixel_diff(&pixels(&kept), &pixels(&want));
    assert!(max <= 1, "max {max}/255");
    let (_, _, text) = png_info(&kept);
    assert_eq!(meta(&text, "keep_unmasked"), "true");
}

/// `--vae-tiling` gives diffusers' tiled image; a picture over the size limit is refused
/// before it is decoded.
#[test]
fn vae_tiling_and_oversized_pictures() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t.png");
    ok(&seed42_euler(
        &["-W", "64", "-H", "64", "--vae-tiling"],
        &out,
    ));
    let pixels = |p: &Path| image::open(p).unwrap().to_rgb8().into_raw();
    let want = model_dir("tiny").join("../../reference/vae_tiling/txt2img-64.png");
    let (max, _) = common::pixel_diff(&pixels(&out), &pixels(&want));
    assert!(max <= 1, "max {max}/255");
    // 16385 x 1 pixels: a valid PNG of a few bytes, one pixel past the limit
    let wide = dir.path().join("wide.png");
    image::GrayImage::new(16385, 1).save(&wide).unwrap();
    let bad = dir.path().join("bad.png");
    fails(
        &[
            "a cat",
            "-m",
            &tiny(),
            "--image",
            wide.to_str().unwrap(),
            "-q",
            "-o",
            bad.to_str().unwrap(),
        ],
        dir.path(),
        "larger than sdgen's limit",
    );
}
