//! Prompt files (`--prompts`): one prompt per line, or JSON Lines whose objects override the
//! command line's settings; and sharding a file across machines (`--shard I/N`, Slurm array
//! jobs, Kubernetes indexed Jobs).

use crate::conditioning::PromptSyntax;
use crate::rng::RngKind;
use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// One image-producing entry: the command line's settings with a line's overrides applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// 1-based line in the prompts file (`None` for the command-line prompt).
    pub line: Option<usize>,
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: Option<u64>,
    pub steps: usize,
    pub guidance: f64,
    pub scheduler: Option<String>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub num_images: usize,
    pub output: Option<String>,
    /// Clip skip as the web UI counts it (1 = the last layer).
    pub clip_skip: usize,
    pub prompt_syntax: PromptSyntax,
    /// `--lora` values (`FILE[:SCALE]`).
    pub loras: Vec<String>,
    pub rng: RngKind,
    /// Image-to-image's start picture, its strength (`None`: diffusers' default) and
    /// inpainting's mask.
    pub image: Option<String>,
    pub strength: Option<f64>,
    pub mask: Option<String>,
}

/// The keys a JSON line may set.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LineOverrides {
    prompt: String,
    negative_prompt: Option<String>,
    seed: Option<u64>,
    steps: Option<usize>,
    guidance: Option<f64>,
    scheduler: Option<String>,
    width: Option<usize>,
    height: Option<usize>,
    num_images: Option<usize>,
    output: Option<String>,
    clip_skip: Option<usize>,
    prompt_syntax: Option<PromptSyntax>,
    rng: Option<RngKind>,
    image: Option<String>,
    strength: Option<f64>,
    mask: Option<String>,
    /// One `FILE[:SCALE]` or a list of them: replaces the command line's --lora.
    lora: Option<OneOrMany>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// A line that could not be used, with its 1-based number.
#[derive(Debug, Clone, PartialEq)]
pub struct BadLine {
    pub line: usize,
    pub message: String,
}

/// Parses a prompts file against `defaults`. Blank lines and lines starting with `#` are
/// skipped; a line starting with `{` is a JSON object, anything else is a plain prompt.
pub fn parse_prompts(text: &str, defaults: &Job) -> (Vec<Job>, Vec<BadLine>) {
    let mut jobs = Vec::new();
    let mut bad = Vec::new();
    // a UTF-8 byte order mark (Windows editors write one) is not part of the first line
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let mut job = Job {
            line: Some(line),
            ..defaults.clone()
        };
        if trimmed.starts_with('{') {
            match serde_json::from_str::<LineOverrides>(trimmed) {
                Ok(o) => {
                    job.prompt = o.prompt;
                    job.negative_prompt = o.negative_prompt.unwrap_or(job.negative_prompt);
                    job.seed = o.seed.or(job.seed);
                    job.steps = o.steps.unwrap_or(job.steps);
                    job.guidance = o.guidance.unwrap_or(job.guidance);
                    job.scheduler = o.scheduler.or(job.scheduler);
                    job.width = o.width.or(job.width);
                    job.height = o.height.or(job.height);
                    job.num_images = o.num_images.unwrap_or(job.num_images);
                    job.output = o.output.or(job.output);
                    job.clip_skip = o.clip_skip.unwrap_or(job.clip_skip);
                    job.prompt_syntax = o.prompt_syntax.unwrap_or(job.prompt_syntax);
                    job.rng = o.rng.unwrap_or(job.rng);
                    job.image = o.image.or(job.image);
                    job.strength = o.strength.or(job.strength);
                    job.mask = o.mask.or(job.mask);
                    match o.lora {
                        Some(OneOrMany::One(l)) => job.loras = vec![l],
                        Some(OneOrMany::Many(l)) => job.loras = l,
                        None => {}
                    }
                }
                Err(e) => {
                    bad.push(BadLine {
                        line,
                        message: format!("invalid JSON line: {e}"),
                    });
                    continue;
                }
            }
        } else {
            job.prompt = trimmed.to_string();
        }
        if job.steps == 0 || job.num_images == 0 {
            bad.push(BadLine {
                line,
                message: "steps and num_images must be at least 1".into(),
            });
            continue;
        }
        if let Some(s) = job.strength.filter(|s| !(0.0..=1.0).contains(s)) {
            bad.push(BadLine {
                line,
                message: format!("strength {s} is outside [0, 1]"),
            });
            continue;
        }
        if job.mask.is_some() && job.image.is_none() {
            bad.push(BadLine {
                line,
                message: "a mask needs an image".into(),
            });
            continue;
        }
        if let Err(e) = check_sizes(job.width, job.height, job.num_images) {
            bad.push(BadLine {
                line,
                message: format!("{e:#}"),
            });
            continue;
        }
        jobs.push(job);
    }
    (jobs, bad)
}

/// Which slice of the prompts this process handles: (index, count), 0-based index.
/// The most images one prompt may ask for (a run's plan holds a path for each).
pub const MAX_IMAGES: usize = 1_000_000;

/// The size and count limits that need no model (the model's own come at generation).
pub fn check_sizes(width: Option<usize>, height: Option<usize>, num_images: usize) -> Result<()> {
    let max = crate::pipeline::MAX_SIDE;
    for (flag, v) in [("width", width), ("height", height)] {
        if let Some(v) = v.filter(|&v| v > max) {
            bail!("{flag} {v} is larger than sdgen's limit of {max} pixels");
        }
    }
    if num_images > MAX_IMAGES {
        bail!("num_images {num_images} is more than the {MAX_IMAGES} one prompt may ask for");
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// `I/N` with 0 <= I < N.
    pub fn parse(s: &str) -> Result<Self> {
        let (i, n) = s
            .split_once('/')
            .with_context(|| format!("--shard {s:?}: expected I/N, e.g. 0/4"))?;
        let index: usize = i
            .trim()
            .parse()
            .with_context(|| format!("--shard {s:?}: bad index"))?;
        let count: usize = n
            .trim()
            .parse()
            .with_context(|| format!("--shard {s:?}: bad count"))?;
        Self::new(index, count).with_context(|| format!("--shard {s:?}"))
    }

    fn new(index: usize, count: usize) -> Result<Self> {
        if count == 0 || index >= count {
            bail!("the shard index must be in 0..{count}");
        }
        Ok(Self { index, count })
    }

    /// From the scheduler's environment: Slurm array jobs (SLURM_ARRAY_TASK_ID, relative to
    /// SLURM_ARRAY_TASK_MIN, over SLURM_ARRAY_TASK_COUNT), or a Kubernetes indexed Job
    /// (JOB_COMPLETION_INDEX over SDGEN_SHARDS, which the Job spec sets to its completions).
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let num = |k: &str| -> Result<Option<usize>> {
            match get(k) {
                None => Ok(None),
                Some(v) if v.trim().is_empty() => Ok(None),
                Some(v) => Ok(Some(
                    v.trim()
                        .parse()
                        .with_context(|| format!("{k}={v:?} is not a number"))?,
                )),
            }
        };
        if let (Some(id), Some(count)) =
            (num("SLURM_ARRAY_TASK_ID")?, num("SLURM_ARRAY_TASK_COUNT")?)
        {
            let min = num("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
            let index = id
                .checked_sub(min)
                .context("SLURM_ARRAY_TASK_ID is below SLURM_ARRAY_TASK_MIN")?;
            return Self::new(index, count)
                .map(Some)
                .context("Slurm array environment");
        }
        if let Some(index) = num("JOB_COMPLETION_INDEX")? {
            let count = num("SDGEN_SHARDS")?.context(
                "JOB_COMPLETION_INDEX is set but SDGEN_SHARDS (the number of completions) is not",
            )?;
            return Self::new(index, count)
                .map(Some)
                .context("Kubernetes indexed Job environment");
        }
        Ok(None)
    }

    /// Whether the `k`-th entry (0-based, among the file's prompt lines) belongs to this shard.
    pub fn takes(&self, k: usize) -> bool {
        k % self.count == self.index
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Job {
        Job {
            line: None,
            prompt: String::new(),
            negative_prompt: "neg".into(),
            seed: Some(1),
            steps: 20,
            guidance: 7.5,
            scheduler: None,
            width: None,
            height: None,
            num_images: 1,
            output: None,
            clip_skip: 1,
            prompt_syntax: PromptSyntax::Plain,
            loras: Vec::new(),
            rng: RngKind::TorchCpu,
            image: None,
            strength: None,
            mask: None,
        }
    }

    #[test]
    fn plain_and_json_lines() {
        let text = "a cat\n\n# comment\n{\"prompt\": \"a dog\", \"steps\": 5, \"seed\": 9, \"scheduler\": \"ddim\"}\n{bad json\n{\"prompt\": \"x\", \"num_images\": 0}\n{\"prompt\": \"y\", \"colour\": 1}\n";
        let (jobs, bad) = parse_prompts(text, &defaults());
        assert_eq!(jobs.len(), 2);
        assert_eq!(
            (jobs[0].line, jobs[0].prompt.as_str(), jobs[0].steps),
            (Some(1), "a cat", 20)
        );
        assert_eq!(
            (
                jobs[1].line,
                jobs[1].prompt.as_str(),
                jobs[1].steps,
                jobs[1].seed
            ),
            (Some(4), "a dog", 5, Some(9))
        );
        assert_eq!(jobs[1].scheduler.as_deref(), Some("ddim"));
        assert_eq!(jobs[1].negative_prompt, "neg");
        assert_eq!(
            bad.iter().map(|b| b.line).collect::<Vec<_>>(),
            vec![5, 6, 7]
        );
    }

    #[test]
    fn shards_from_flags_and_environment() {
        assert_eq!(Shard::parse("1/3").unwrap(), Shard { index: 1, count: 3 });
        assert!(Shard::parse("3/3").is_err());
        assert!(Shard::parse("x").is_err());
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|p| p.0 == k).map(|p| p.1.to_string())
        };
        let slurm = Shard::from_env(env(&[
            ("SLURM_ARRAY_TASK_ID", "5"),
            ("SLURM_ARRAY_TASK_MIN", "4"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ]));
        assert_eq!(slurm.unwrap(), Some(Shard { index: 1, count: 3 }));
        let k8s = Shard::from_env(env(&[("JOB_COMPLETION_INDEX", "2"), ("SDGEN_SHARDS", "4")]));
        assert_eq!(k8s.unwrap(), Some(Shard { index: 2, count: 4 }));
        assert!(Shard::from_env(env(&[("JOB_COMPLETION_INDEX", "2")])).is_err());
        assert_eq!(Shard::from_env(env(&[])).unwrap(), None);
        let s = Shard { index: 1, count: 3 };
        assert_eq!(
            (0..7).filter(|&k| s.takes(k)).collect::<Vec<_>>(),
            vec![1, 4]
        );
    }
}
