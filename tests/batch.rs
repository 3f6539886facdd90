//! Prompt files: one model load for many images, per-line overrides, names that cannot
//! collide, live JSON lines, resumable runs (also after Ctrl-C), bad lines, sharding.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn sdgen_cmd(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sdgen"));
    cmd.args(args)
        .env(
            "HF_HUB_CACHE",
            std::env::temp_dir().join("sdgen-test-empty-cache"),
        )
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .env_remove("SLURM_ARRAY_TASK_ID")
        .env_remove("SLURM_ARRAY_TASK_COUNT")
        .env_remove("JOB_COMPLETION_INDEX");
    cmd
}

fn tiny() -> String {
    model_dir("tiny").display().to_string()
}

fn pngs(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".png"))
        .collect();
    v.sort();
    v
}

fn text_chunk(path: &Path, key: &str) -> String {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let reader = decoder.read_info().unwrap();
    let info = reader.info();
    info.uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == key)
        .map(|t| t.text.clone())
        .unwrap_or_default()
}

const PROMPTS: &str = r#"a cat
a dog
{"prompt": "a red fox", "steps": 3, "scheduler": "euler_a", "seed": 77}
# a comment, and a blank line

{"prompt": "two owls", "num_images": 2, "seed": 500}
{"prompt": "wide", "width": 48, "height": 32}
{"prompt": "named", "output": "OUT/custom-{seed}.png", "seed": 9}
{"prompt": "broken json"
a horse
{"prompt": "odd size", "width": 33}
a bird
a fish
a frog
"#;

fn write_prompts(dir: &Path) -> PathBuf {
    let p = dir.join("prompts.txt");
    std::fs::write(&p, PROMPTS.replace("OUT", dir.to_str().unwrap())).unwrap();
    p
}

#[test]
fn a_prompts_file_writes_every_image_with_its_parameters_and_reruns_skip() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = write_prompts(dir.path());
    let template = dir.path().join("img-{seed}.png");
    let args = [
        "--prompts",
        prompts.to_str().unwrap(),
        "-m",
        &tiny(),
        "-s",
        "1000",
        "--steps",
        "2",
        "-q",
        "--json",
        "-o",
        template.to_str().unwrap(),
    ];
    let o = sdgen_cmd(&args).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(
        o.status.code(),
        Some(1),
        "bad lines make the exit code 1: {err}"
    );
    assert!(err.contains("line 9:") && err.contains("JSON"), "{err}");
    assert!(
        err.contains("line 11:") && err.contains("multiples of 2"),
        "{err}"
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // 10 valid entries, one with two images: 11 images
    assert_eq!(lines.len(), 11, "{lines:?}");
    let names = pngs(dir.path());
    assert_eq!(names.len(), 11, "{names:?}");
    // the default template gets the line number, so equal seeds on different lines cannot collide
    assert!(names.contains(&"img-1000-1.png".to_string()), "{names:?}");
    assert!(names.contains(&"img-1000-2.png".to_string()), "{names:?}");
    assert!(names.contains(&"img-77-3.png".to_string()), "{names:?}");
    assert!(
        names.contains(&"img-500-6.png".to_string())
            && names.contains(&"img-501-6.png".to_string()),
        "{names:?}"
    );
    assert!(names.contains(&"custom-9.png".to_string()), "{names:?}");
    let fox = dir.path().join("img-77-3.png");
    assert_eq!(text_chunk(&fox, "prompt"), "a red fox");
    assert_eq!(text_chunk(&fox, "steps"), "3");
    assert_eq!(text_chunk(&fox, "scheduler"), "euler_a");
    assert_eq!(text_chunk(&fox, "prompts_line"), "3");
    let wide = lines.iter().find(|l| l["prompt"] == "wide").unwrap();
    assert_eq!(
        (
            wide["width"].as_u64(),
            wide["height"].as_u64(),
            wide["line"].as_u64()
        ),
        (Some(48), Some(32), Some(7))
    );

    // rerun: everything exists and is skipped
    let before: Vec<_> = names
        .iter()
        .map(|n| {
            std::fs::metadata(dir.path().join(n))
                .unwrap()
                .modified()
                .unwrap()
        })
        .collect();
    let o = sdgen_cmd(
        &args[..args.len() - 4]
            .iter()
            .chain(&["-o", template.to_str().unwrap()])
            .copied()
            .collect::<Vec<_>>(),
    )
    .output()
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 0);
    let after: Vec<_> = names
        .iter()
        .map(|n| {
            std::fs::metadata(dir.path().join(n))
                .unwrap()
                .modified()
                .unwrap()
        })
        .collect();
    assert_eq!(before, after);
}

#[test]
fn strict_stops_at_the_first_bad_line_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = write_prompts(dir.path());
    let template = dir.path().join("img-{seed}.png");
    let o = sdgen_cmd(&[
        "--prompts",
        prompts.to_str().unwrap(),
        "-m",
        &tiny(),
        "--steps",
        "2",
        "-q",
        "--strict",
        "-o",
        template.to_str().unwrap(),
    ])
    .output()
    .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(pngs(dir.path()).is_empty());
}

#[test]
fn shards_cover_the_file_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("p.txt");
    std::fs::write(
        &prompts,
        (0..10)
            .map(|i| format!("prompt number {i}\n"))
            .collect::<String>(),
    )
    .unwrap();
    let mut all = Vec::new();
    for i in 0..3 {
        let out = dir.path().join(format!("s{i}"));
        std::fs::create_dir_all(&out).unwrap();
        let template = out.join("{line}.png");
        let mut cmd = sdgen_cmd(&[
            "--prompts",
            prompts.to_str().unwrap(),
            "-m",
            &tiny(),
            "-s",
            "1",
            "--steps",
            "1",
            "-q",
            "-o",
            template.to_str().unwrap(),
        ]);
        if i == 2 {
            // the Slurm array environment instead of the flag
            cmd.env("SLURM_ARRAY_TASK_ID", "12")
                .env("SLURM_ARRAY_TASK_MIN", "10")
                .env("SLURM_ARRAY_TASK_COUNT", "3");
        } else {
            cmd.args(["--shard", &format!("{i}/3")]);
        }
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        all.extend(pngs(&out));
    }
    all.sort_by_key(|n| n.trim_end_matches(".png").parse::<usize>().unwrap());
    let want: Vec<String> = (1..=10).map(|l| format!("{l}.png")).collect();
    assert_eq!(all, want);
}

#[test]
fn prompts_from_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let template = dir.path().join("{prompt}.png");
    let mut child = sdgen_cmd(&[
        "--prompts",
        "-",
        "-m",
        &tiny(),
        "--steps",
        "1",
        "-q",
        "-o",
        template.to_str().unwrap(),
    ])
    .stdin(Stdio::piped())
    .spawn()
    .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"one cat\ntwo cats\n")
        .unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(pngs(dir.path()), vec!["one-cat-1.png", "two-cats-2.png"]);
}

#[test]
fn ctrl_c_leaves_no_partial_file_and_a_rerun_finishes_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("p.txt");
    std::fs::write(
        &prompts,
        (0..6)
            .map(|i| format!("slow prompt {i}\n"))
            .collect::<String>(),
    )
    .unwrap();
    let template = dir.path().join("{line}.png");
    // enough steps that the batch takes a while on the tiny model
    let args = [
        "--prompts",
        prompts.to_str().unwrap(),
        "-m",
        &tiny(),
        "-s",
        "3",
        "--steps",
        "60",
        "--scheduler",
        "euler",
        "-q",
        "-o",
        template.to_str().unwrap(),
    ];
    let child = sdgen_cmd(&args).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while pngs(dir.path()).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    let done = pngs(dir.path()).len();
    assert!(done >= 1 && done < 6, "{done} images after Ctrl-C: {err}");
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    let o = sdgen_cmd(&args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(pngs(dir.path()).len(), 6);
}

/// Runs a prompts file of `text` on the tiny model, one step each, into `dir/img.png`.
fn run_prompts(dir: &Path, text: &str) -> (std::process::Output, String) {
    let prompts = dir.join("p.txt");
    std::fs::write(&prompts, text).unwrap();
    let out = dir.join("img.png");
    let o = sdgen_cmd(&[
        "--prompts",
        prompts.to_str().unwrap(),
        "-m",
        &tiny(),
        "-o",
        out.to_str().unwrap(),
        "--steps",
        "1",
        "-q",
    ])
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    (o, err)
}

/// A line asking for an absurd size or count is a bad line named by its number; the others
/// are made (it aborted the whole batch).
#[test]
fn an_absurd_line_is_a_bad_line_and_the_rest_run() {
    let dir = tempfile::tempdir().unwrap();
    let (o, err) = run_prompts(
        dir.path(),
        "{\"prompt\": \"a\", \"width\": 100000}\n{\"prompt\": \"b\", \"num_images\": 1000000000}\nc\n",
    );
    assert!(err.contains("line 1: width 100000"), "{err}");
    assert!(err.contains("line 2: num_images 1000000000"), "{err}");
    assert_eq!(pngs(dir.path()), ["img-3.png"], "{err}");
    assert_ne!(
        o.status.code(),
        Some(0),
        "bad lines must show in the exit code: {err}"
    );
}

/// A prompts file saved with a UTF-8 byte order mark reads its first JSON line as JSON (it
/// became a literal prompt); a line whose output cannot be written is a bad line, named.
#[test]
fn a_bom_and_a_bad_output_line() {
    let dir = tempfile::tempdir().unwrap();
    let (_, err) = run_prompts(
        dir.path(),
        "\u{feff}{\"prompt\": \"a\", \"seed\": 5}\n{\"prompt\": \"b\", \"output\": \"\"}\n",
    );
    assert!(err.contains("line 2: the output path is empty"), "{err}");
    assert_eq!(pngs(dir.path()), ["img-1.png"], "{err}");
    assert_eq!(text_chunk(&dir.path().join("img-1.png"), "prompt"), "a");
    assert_eq!(text_chunk(&dir.path().join("img-1.png"), "seed"), "5");
}
