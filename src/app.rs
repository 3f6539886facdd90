//! What the `sdgen` binary does with its arguments: one prompt from the command line, or a
//! prompts file, through one loaded pipeline.

use crate::batch::{parse_prompts, Job, Shard};
use crate::cli::Args;
use crate::device::{dtype_name, parse_device, parse_dtype};
use crate::interrupt;
use crate::output::{self, NameFields};
use crate::pipeline::{GeneratedImage, Pipeline, Request, Residency};
use crate::schedulers::{self, SCHEDULERS};
use crate::source::{self, offline_from_env, ModelRequest, Precision};
use anyhow::{bail, Context, Result};
use candle_core::DType;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Exit codes scripts can rely on.
pub const EXIT_OK: i32 = 0;
pub const EXIT_FAILED: i32 = 1;
pub const EXIT_INTERRUPTED: i32 = 130;

/// A seed from the clock and the process's random hasher keys, in torch's 32-bit seed range.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish() & 0xffff_ffff
}

fn print_schedulers() {
    for (name, class, about) in SCHEDULERS {
        println!("{name:<13} {class:<34} {about}");
    }
}

/// One image to produce: its job, its index within the job, its seed and file.
struct Planned {
    job: usize,
    index: usize,
    seed: u64,
    path: PathBuf,
}

/// Runs the command; returns the exit code (errors that stop everything come back as `Err`).
pub fn run(args: Args) -> Result<i32> {
    if args.list_schedulers {
        print_schedulers();
        return Ok(EXIT_OK);
    }
    let messages = !args.quiet;
    let device = parse_device(&args.device)?;
    let dtype = parse_dtype(&args.dtype)?;
    let precision = if dtype == DType::F32 {
        Precision::Full
    } else {
        Precision::Half
    };
    let offline = args.offline || offline_from_env();
    let model_request = ModelRequest {
        model: &args.model,
        revision: &args.revision,
        checkpoint: args.checkpoint.as_deref(),
        config_from: args.config_from.as_deref(),
        precision,
        offline,
        progress: messages,
    };
    if args.download_only {
        let files = source::resolve(&model_request)?;
        let root = files
            .model_index
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        if args.json {
            println!(
                "{}",
                json!({"model": files.name, "revision": files.revision, "path": root})
            );
        } else {
            println!("{root}");
        }
        return Ok(EXIT_OK);
    }
    if let Some(s) = &args.scheduler {
        if !SCHEDULERS.iter().any(|x| x.0 == s) {
            bail!(
                "unknown scheduler {s:?}; known: {}",
                schedulers::known_names()
            );
        }
    }
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if args.num_images == 0 || args.batch_size == 0 {
        bail!("--num-images and --batch-size must be at least 1");
    }
    let batch_mode = args.prompts.is_some();
    let grid = args.grid.as_deref().map(output::parse_grid).transpose()?;
    if let Some((r, c)) = grid {
        if batch_mode {
            bail!("--grid cannot be combined with --prompts");
        }
        if r * c != args.num_images {
            bail!("--grid {r}x{c} needs --num-images {}", r * c);
        }
    }

    // 1. the jobs: the command-line prompt, or this shard's lines of the prompts file
    let defaults = Job {
        line: None,
        prompt: args.prompt.clone().unwrap_or_default(),
        negative_prompt: args.negative_prompt.clone(),
        seed: args.seed,
        steps: args.steps,
        guidance: args.guidance,
        scheduler: args.scheduler.clone(),
        width: args.width,
        height: args.height,
        num_images: args.num_images,
        output: None,
    };
    let mut failed_lines = 0usize;
    let jobs: Vec<Job> = match &args.prompts {
        None => vec![defaults.clone()],
        Some(file) => {
            let text = if file == "-" {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                    .context("cannot read prompts from stdin")?;
                s
            } else {
                std::fs::read_to_string(file)
                    .with_context(|| format!("cannot read the prompts file {file}"))?
            };
            let (jobs, bad) = parse_prompts(&text, &defaults);
            for b in &bad {
                eprintln!("error: {file} line {}: {}", b.line, b.message);
            }
            if !bad.is_empty() && args.strict {
                bail!("{} bad line(s) in {file} (--strict)", bad.len());
            }
            failed_lines += bad.len();
            let shard = match &args.shard {
                Some(s) => Some(Shard::parse(s)?),
                None => Shard::from_env(|k| std::env::var(k).ok())?,
            };
            match shard {
                Some(s) => {
                    if messages {
                        eprintln!(
                            "shard {}/{}: every {}th prompt line from #{}",
                            s.index,
                            s.count,
                            s.count,
                            s.index + 1
                        );
                    }
                    jobs.into_iter()
                        .enumerate()
                        .filter(|(k, _)| s.takes(*k))
                        .map(|(_, j)| j)
                        .collect()
                }
                None => jobs,
            }
        }
    };

    // 2. seeds and file names, settled (and checked) before any model work
    let mut seeds_random = Vec::new();
    let mut plan: Vec<Planned> = Vec::new();
    for (j, job) in jobs.iter().enumerate() {
        let base = job.seed.unwrap_or_else(|| {
            let s = random_seed();
            seeds_random.push(j);
            s
        });
        let mut template = job.output.clone().unwrap_or_else(|| args.output.clone());
        if batch_mode && job.output.is_none() && !template.contains("{line}") {
            template = output::with_suffix(&template, "{line}");
        }
        if job.num_images > 1 && !output::template_is_unique(&template) {
            template = output::with_suffix(&template, "{index}");
        }
        for i in 0..job.num_images {
            let seed = base.wrapping_add(i as u64);
            let f = NameFields {
                seed,
                index: i,
                prompt: &job.prompt,
                line: job.line,
            };
            plan.push(Planned {
                job: j,
                index: i,
                seed,
                path: PathBuf::from(output::render_template(&template, &f)?),
            });
        }
    }
    for (k, p) in plan.iter().enumerate() {
        if plan[..k].iter().any(|q| q.path == p.path) {
            bail!("two images would be written to {}; put {{seed}}, {{index}} or {{line}} in --output", p.path.display());
        }
    }
    let mut skipped = 0usize;
    if batch_mode && !args.overwrite {
        // resumable: what a previous run wrote is kept
        plan.retain(|p| {
            let exists = p.path.exists();
            if exists {
                skipped += 1;
                if messages {
                    eprintln!("skip: {} exists", p.path.display());
                }
            }
            !exists
        });
    } else {
        for p in &plan {
            output::check_writable(&p.path, args.overwrite)?;
        }
    }
    let grid_path =
        grid.map(|_| PathBuf::from(output::with_suffix(&plan[0].path.to_string_lossy(), "grid")));
    if let Some(g) = &grid_path {
        output::check_writable(g, args.overwrite)?;
    }
    if plan.is_empty() {
        if messages {
            eprintln!(
                "nothing to do: {skipped} image(s) already exist, {failed_lines} bad line(s)"
            );
        }
        return Ok(if failed_lines > 0 {
            EXIT_FAILED
        } else {
            EXIT_OK
        });
    }

    // 3. the model, loaded once
    let files = source::resolve(&model_request)?;
    let spinner = messages.then(|| {
        let s = ProgressBar::new_spinner();
        s.set_message(format!("loading {}", files.name));
        s.enable_steady_tick(std::time::Duration::from_millis(120));
        s
    });
    let mut pipeline = Pipeline::load(files, device, dtype)?;
    if batch_mode {
        // many prompts: load once, keep everything, find bad weights before any work
        pipeline.preload()?;
    } else {
        pipeline.residency = Residency::Sequential;
    }
    if let Some(s) = spinner {
        s.finish_and_clear();
    }
    apply_scheduler_overrides(&mut pipeline, &args);
    interrupt::install();

    // 4. generation, image by image as each is decoded
    let bars = Bars::new(messages, plan.len());
    let mut written = 0usize;
    let mut grid_images: Vec<GeneratedImage> = Vec::new();
    let mut outcome: Result<()> = Ok(());
    for (j, job) in jobs.iter().enumerate() {
        let todo: Vec<&Planned> = plan.iter().filter(|p| p.job == j).collect();
        if todo.is_empty() {
            continue;
        }
        let size = pipeline.default_size();
        let request = Request {
            prompt: job.prompt.clone(),
            negative_prompt: job.negative_prompt.clone(),
            seeds: todo.iter().map(|p| p.seed).collect(),
            steps: job.steps,
            guidance: job.guidance,
            scheduler: job.scheduler.clone(),
            width: job.width.unwrap_or(size),
            height: job.height.unwrap_or(size),
            batch_size: args.batch_size,
        };
        let where_ = job.line.map(|l| format!("line {l}: ")).unwrap_or_default();
        if let Err(e) = pipeline.validate(&request) {
            if !batch_mode || args.strict {
                outcome = Err(e);
                break;
            }
            bars.println(&format!("error: {where_}{e:#}"));
            failed_lines += 1;
            continue;
        }
        if messages {
            for (what, text) in [
                ("prompt", &request.prompt),
                ("negative prompt", &request.negative_prompt),
            ] {
                if pipeline.tokenize(text)?.1 {
                    bars.println(&format!("warning: {where_}the {what} is longer than 77 CLIP tokens and was truncated"));
                }
            }
            if seeds_random.contains(&j) {
                bars.println(&format!(
                    "{where_}seed: {} (pass --seed {} to reproduce)",
                    request.seeds[0], request.seeds[0]
                ));
            }
        }
        let scheduler_name = request
            .scheduler
            .clone()
            .or(pipeline.default_scheduler.map(str::to_string))
            .unwrap_or_else(|| "pndm".into());
        let mut k = 0;
        let result = pipeline.generate(
            &request,
            &mut |done, total| bars.step(done, total),
            &mut |img| {
                let p = todo[k];
                k += 1;
                let meta = metadata(&pipeline, &request, job, &scheduler_name, &img);
                let png = output::encode_png(img.width, img.height, &img.rgb, &meta)?;
                output::write_atomic(&p.path, &png, args.overwrite)?;
                written += 1;
                bars.image_done();
                if args.json {
                    let mut out = std::io::stdout().lock();
                    writeln!(
                        out,
                        "{}",
                        image_json(&pipeline, &request, job, &scheduler_name, &img, p)
                    )?;
                    out.flush()?;
                } else if messages {
                    bars.println(&format!("wrote {}", p.path.display()));
                }
                if grid.is_some() {
                    grid_images.push(img);
                }
                Ok(())
            },
        );
        if let Err(e) = result {
            outcome = Err(e);
            break;
        }
    }
    bars.finish();

    if let Err(e) = outcome {
        if e.downcast_ref::<interrupt::Interrupted>().is_some() {
            eprintln!("interrupted: {written} image(s) written, {} not generated; run the same command again to continue", plan.len() - written);
            return Ok(EXIT_INTERRUPTED);
        }
        if written > 0 || skipped > 0 {
            eprintln!("stopped after {written} written and {skipped} skipped image(s)");
        }
        return Err(e);
    }
    if let (Some((rows, cols)), Some(gpath)) = (grid, grid_path) {
        let cells: Vec<(usize, usize, &[u8])> = grid_images
            .iter()
            .map(|i| (i.width, i.height, i.rgb.as_slice()))
            .collect();
        let (w, h, px) = output::grid(&cells, rows, cols)?;
        let first = &grid_images[0];
        let mut meta = vec![("grid".to_string(), format!("{rows}x{cols}"))];
        meta.push(("prompt".into(), jobs[0].prompt.clone()));
        meta.push(("seed".into(), first.seed.to_string()));
        output::write_atomic(
            &gpath,
            &output::encode_png(w, h, &px, &meta)?,
            args.overwrite,
        )?;
        if messages && !args.json {
            eprintln!("wrote {}", gpath.display());
        }
    }
    if batch_mode && messages {
        eprintln!("done: {written} written, {skipped} skipped (already there), {failed_lines} bad line(s)");
    }
    Ok(if failed_lines > 0 {
        EXIT_FAILED
    } else {
        EXIT_OK
    })
}

/// The overall bar (images) above the per-image step bar; hidden with --quiet or without a
/// terminal.
struct Bars {
    multi: Option<MultiProgress>,
    images: Option<ProgressBar>,
    steps: Option<ProgressBar>,
}

impl Bars {
    fn new(enabled: bool, total_images: usize) -> Self {
        if !enabled {
            return Self {
                multi: None,
                images: None,
                steps: None,
            };
        }
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let images = (total_images > 1).then(|| {
            let b = multi.add(ProgressBar::new(total_images as u64));
            b.set_style(
                ProgressStyle::with_template("images    [{bar:30}] {pos}/{len} eta {eta}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            b
        });
        let steps = multi.add(ProgressBar::new(0));
        steps.set_style(
            ProgressStyle::with_template("denoising [{bar:30}] {pos}/{len} steps {per_sec}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        Self {
            multi: Some(multi),
            images,
            steps: Some(steps),
        }
    }

    fn step(&self, done: usize, total: usize) {
        if let Some(b) = &self.steps {
            b.set_length(total as u64);
            b.set_position(done as u64);
        }
    }

    fn image_done(&self) {
        if let Some(b) = &self.images {
            b.inc(1);
        }
    }

    fn println(&self, msg: &str) {
        match &self.multi {
            Some(m) if !m.is_hidden() => {
                let _ = m.println(msg);
            }
            _ => eprintln!("{msg}"),
        }
    }

    fn finish(&self) {
        for b in [&self.images, &self.steps].into_iter().flatten() {
            b.finish_and_clear();
        }
    }
}

/// Applies --karras / --timestep-spacing / --prediction-type / --scheduler-option.
fn apply_scheduler_overrides(p: &mut Pipeline, args: &Args) {
    if args.karras {
        p.scheduler_config.set("use_karras_sigmas", json!(true));
    }
    if let Some(s) = &args.timestep_spacing {
        p.scheduler_config.set("timestep_spacing", json!(s));
    }
    if let Some(s) = &args.prediction_type {
        p.scheduler_config.set("prediction_type", json!(s));
    }
    for (k, v) in &args.scheduler_option {
        p.scheduler_config.set(k, v.clone());
    }
}

fn metadata(
    p: &Pipeline,
    r: &Request,
    job: &Job,
    scheduler: &str,
    img: &GeneratedImage,
) -> output::Metadata {
    let model = p.files.name.clone();
    let revision = p.files.revision.clone().unwrap_or_default();
    let mut params = format!("{}\n", r.prompt);
    if !r.negative_prompt.is_empty() {
        params.push_str(&format!("Negative prompt: {}\n", r.negative_prompt));
    }
    params.push_str(&format!(
        "Steps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {}, Version: sdgen {}",
        r.steps, scheduler, r.guidance, img.seed, img.width, img.height, model, VERSION
    ));
    let mut meta = vec![
        ("parameters".into(), params),
        ("prompt".into(), r.prompt.clone()),
        ("negative_prompt".into(), r.negative_prompt.clone()),
        ("seed".into(), img.seed.to_string()),
        ("steps".into(), r.steps.to_string()),
        ("guidance".into(), r.guidance.to_string()),
        ("scheduler".into(), scheduler.to_string()),
        ("width".into(), img.width.to_string()),
        ("height".into(), img.height.to_string()),
        ("model".into(), model),
        ("model_revision".into(), revision),
        ("dtype".into(), dtype_name(p.dtype).to_string()),
        ("software".into(), format!("sdgen {VERSION}")),
    ];
    if let Some(line) = job.line {
        meta.push(("prompts_line".into(), line.to_string()));
    }
    meta
}

fn image_json(
    p: &Pipeline,
    r: &Request,
    job: &Job,
    scheduler: &str,
    img: &GeneratedImage,
    planned: &Planned,
) -> serde_json::Value {
    json!({
        "path": planned.path.display().to_string(),
        "line": job.line,
        "index": planned.index,
        "seed": img.seed,
        "prompt": r.prompt,
        "negative_prompt": r.negative_prompt,
        "steps": r.steps,
        "guidance": r.guidance,
        "scheduler": scheduler,
        "width": img.width,
        "height": img.height,
        "model": p.files.name,
        "revision": p.files.revision,
        "dtype": dtype_name(p.dtype),
    })
}
