//! What the `sdgen` binary does with its arguments: one prompt from the command line, or a
//! prompts file, through one loaded pipeline.

use crate::addons::lora::LoraSpec;
use crate::batch::{self, parse_prompts, Job, Shard};
use crate::cli::Args;
use crate::conditioning::PromptSyntax;
use crate::device::{dtype_name, parse_device, parse_dtype};
use crate::infotext::{self, FileHashes, Pictures};
use crate::input_image::Picture;
use crate::interrupt;
use crate::output::{self, NameFields, Written};
use crate::pipeline::{GeneratedImage, Pipeline, Request, Residency, SizeConditioning};
use crate::schedulers::{self, SCHEDULERS};
use crate::source::{self, offline_from_env, ModelRequest, WeightFiles};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Exit codes scripts can rely on.
pub const EXIT_OK: i32 = 0;
pub const EXIT_FAILED: i32 = 1;
pub const EXIT_INTERRUPTED: i32 = 130;

/// A seed from the clock and the process's random hasher keys, in torch's 32-bit seed range.
pub(crate) fn random_seed() -> u64 {
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
    println!("\nweb UI sampler names (as diffusers maps them; any case):");
    for (web, name, karras) in schedulers::WEB_UI_NAMES {
        let k = if *karras { " with Karras sigmas" } else { "" };
        println!("{web:<20} = {name}{k}");
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
    let device = parse_device(&args.device)?;
    let dtype = parse_dtype(&args.dtype)?;
    let model = args.source.request(dtype, !args.quiet);
    if args.download_only {
        return download_only(&model, args.json);
    }
    let grid = check_flags(&args)?;
    let mut jobs = read_jobs(&args)?;
    let plan = plan_images(&args, &mut jobs, grid)?;
    if plan.images.is_empty() {
        if !args.quiet {
            eprintln!(
                "nothing to do: {} image(s) already exist, {} bad line(s)",
                plan.skipped, jobs.bad_lines
            );
        }
        return Ok(exit_code(jobs.bad_lines));
    }
    let pipeline = load_model(&args, &model, device, dtype)?;
    if let Some(((rows, cols), _)) = &plan.grid {
        check_grid_memory(&args, &pipeline, rows * cols)?;
    }
    interrupt::install();
    let done = generate(&args, &pipeline, &jobs.list, &plan);
    report(&args, &jobs, &plan, done)
}

/// `--download-only`: fills the cache and prints where the model is.
fn download_only(model: &ModelRequest, json: bool) -> Result<i32> {
    let files = source::resolve(model)?;
    // the folder the download went to: the snapshot, or the checkpoint's (a single file's
    // configs are built in, in a folder that lives only as long as this process)
    let root = match &files.weights {
        WeightFiles::SingleFile(ckpt) => ckpt.parent(),
        WeightFiles::Diffusers { .. } => files.model_index.parent(),
    }
    .map(|p| p.display().to_string())
    .unwrap_or_default();
    if json {
        println!(
            "{}",
            json!({"model": files.name, "revision": files.revision, "path": root})
        );
    } else {
        println!("{root}");
    }
    Ok(EXIT_OK)
}

/// The checks of the flags that need no model; the grid's rows and columns.
fn check_flags(args: &Args) -> Result<Option<(usize, usize)>> {
    if let Some(s) = &args.scheduler {
        schedulers::resolve_name(s)?;
    }
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if args.num_images == 0 || args.batch_size == 0 {
        bail!("--num-images and --batch-size must be at least 1");
    }
    if let Some(s) = args.strength.filter(|s| !(0.0..=1.0).contains(s)) {
        bail!("--strength {s} is outside [0, 1]");
    }
    batch::check_sizes(args.width, args.height, args.num_images)?;
    let grid = args.grid.as_deref().map(output::parse_grid).transpose()?;
    if let Some((r, c)) = grid {
        if args.prompts.is_some() {
            bail!("--grid cannot be combined with --prompts");
        }
        if r.checked_mul(c) != Some(args.num_images) {
            bail!("--grid {r}x{c} needs --num-images {}", r.saturating_mul(c));
        }
    }
    Ok(grid)
}

/// The jobs of a run, and how many lines of the prompts file could not be used.
struct Jobs {
    list: Vec<Job>,
    bad_lines: usize,
}

/// The command-line prompt, or this shard's lines of the prompts file.
fn read_jobs(args: &Args) -> Result<Jobs> {
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
        clip_skip: args.clip_skip,
        prompt_syntax: args.prompt_syntax,
        loras: args.lora.clone(),
        rng: args.rng,
        image: args.image.as_ref().map(|p| p.display().to_string()),
        strength: args.strength,
        mask: args.mask.as_ref().map(|p| p.display().to_string()),
    };
    let Some(file) = &args.prompts else {
        return Ok(Jobs {
            list: vec![defaults],
            bad_lines: 0,
        });
    };
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
    let shard = match &args.shard {
        Some(s) => Some(Shard::parse(s)?),
        None => Shard::from_env(|k| std::env::var(k).ok())?,
    };
    let list = match shard {
        Some(s) => {
            if !args.quiet {
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
    };
    Ok(Jobs {
        list,
        bad_lines: bad.len(),
    })
}

/// Every image of a run with its seed and file, settled (and checked) before any model work.
struct ImagePlan {
    images: Vec<Planned>,
    /// The jobs whose seed was drawn at random (printed, so that they can be reproduced).
    seeds_random: Vec<usize>,
    /// Images a previous run already wrote (batches resume).
    skipped: usize,
    grid: Option<((usize, usize), PathBuf)>,
    /// Each job's LoRAs, their files found.
    loras: HashMap<usize, Vec<LoraSpec>>,
}

fn plan_images(args: &Args, jobs: &mut Jobs, grid: Option<(usize, usize)>) -> Result<ImagePlan> {
    let batch_mode = args.prompts.is_some();
    let mut seeds_random = Vec::new();
    let mut images: Vec<Planned> = Vec::new();
    // each path and the line (or command line) that writes it
    let mut owners: HashMap<PathBuf, Option<usize>> = HashMap::new();
    let mut loras = HashMap::new();
    let mut resolved = HashMap::new();
    for (j, job) in jobs.list.iter().enumerate() {
        let planned = plan_job(args, j, job, &owners)
            .and_then(|p| Ok((p, job_loras(args, job, &mut resolved)?)));
        match planned {
            Ok(((planned, random_seed), job_loras)) => {
                loras.insert(j, job_loras);
                for p in &planned {
                    owners.insert(p.path.clone(), job.line);
                }
                images.extend(planned);
                if random_seed {
                    seeds_random.push(j);
                }
            }
            // in a batch, a line whose images cannot be written is a bad line, not the end
            Err(e) if batch_mode && !args.strict => {
                let file = args.prompts.as_deref().unwrap_or("-");
                eprintln!("error: {file} line {}: {e:#}", job.line.unwrap_or(0));
                jobs.bad_lines += 1;
            }
            Err(e) => {
                return Err(match job.line {
                    Some(l) => e.context(format!("line {l}")),
                    None => e,
                })
            }
        }
    }
    for gone in output::remove_stale_temps(images.iter().map(|p| p.path.as_path())) {
        if !args.quiet {
            eprintln!("removed {}, left by a run that was killed", gone.display());
        }
    }
    let mut skipped = 0usize;
    if batch_mode && !args.overwrite {
        // resumable: what a previous run wrote is kept
        images.retain(|p| {
            let exists = p.path.exists();
            if exists {
                skipped += 1;
                if !args.quiet {
                    eprintln!("skip: {} exists", p.path.display());
                }
            }
            !exists
        });
    }
    let grid = match (grid, images.first()) {
        (Some(g), Some(first)) => {
            let path = PathBuf::from(output::with_suffix(&first.path.to_string_lossy(), "grid"));
            output::check_target(&path)?;
            output::check_writable(&path, args.overwrite)?;
            Some((g, path))
        }
        _ => None,
    };
    Ok(ImagePlan {
        images,
        seeds_random,
        skipped,
        grid,
        loras,
    })
}

/// One job's images (and whether its seed was drawn at random), each path checked: a file
/// name and a folder it can be written to, no image of the run written there already, and
/// outside a resumable batch nothing there that may not be replaced.
fn plan_job(
    args: &Args,
    j: usize,
    job: &Job,
    owners: &HashMap<PathBuf, Option<usize>>,
) -> Result<(Vec<Planned>, bool)> {
    let batch_mode = args.prompts.is_some();
    for picture in job.image.iter().chain(&job.mask) {
        // decoded with the model loaded; a missing file is found now
        if !std::path::Path::new(picture).is_file() {
            bail!("the image {picture} does not exist (or is not a file)");
        }
    }
    let random = job.seed.is_none();
    let base = job.seed.unwrap_or_else(random_seed);
    let mut template = job.output.clone().unwrap_or_else(|| args.output.clone());
    if batch_mode && job.output.is_none() && !template.contains("{line}") {
        template = output::with_suffix(&template, "{line}");
    }
    if job.num_images > 1 && !output::template_is_unique(&template) {
        template = output::with_suffix(&template, "{index}");
    }
    let mut planned: Vec<Planned> = Vec::with_capacity(job.num_images);
    let mut mine = std::collections::HashSet::new();
    for i in 0..job.num_images {
        let seed = base.wrapping_add(i as u64);
        let f = NameFields {
            seed,
            index: i,
            prompt: &job.prompt,
            line: job.line,
        };
        let path = PathBuf::from(output::render_template(&template, &f)?);
        let taken_by = owners.get(&path).map(|l| match l {
            Some(l) => format!("line {l}"),
            None => "the command line".into(),
        });
        if taken_by.is_some() || !mine.insert(path.clone()) {
            bail!(
                "two images would be written to {} (also by {}); put {{seed}}, {{index}} or {{line}} in the output name",
                path.display(),
                taken_by.unwrap_or_else(|| "this line".into())
            );
        }
        output::check_target(&path)?;
        if !batch_mode || args.overwrite {
            output::check_writable(&path, args.overwrite)?;
        }
        planned.push(Planned {
            job: j,
            index: i,
            seed,
            path,
        });
    }
    Ok((planned, random))
}

/// The LoRAs of a job: its --lora values (local files or Hub files, each resolved once a
/// run: `resolved`), then in the a1111 syntax the prompt's `<lora:NAME:W>` tags, found in
/// --lora-dir.
fn job_loras(
    args: &Args,
    job: &Job,
    resolved: &mut HashMap<PathBuf, PathBuf>,
) -> Result<Vec<LoraSpec>> {
    let mut loras = Vec::new();
    for l in &job.loras {
        let mut spec = LoraSpec::parse(l)?;
        if let Some(p) = resolved.get(&spec.path) {
            spec.path = p.clone();
        } else {
            let offline = args.source.offline || offline_from_env();
            let p = source::resolve_file(&spec.path.to_string_lossy(), offline, !args.quiet)
                .context("--lora")?;
            resolved.insert(spec.path.clone(), p.clone());
            spec.path = p;
        }
        loras.push(spec);
    }
    if job.prompt_syntax == PromptSyntax::A1111 {
        loras.extend(lora_tag_files(&job.prompt, args.lora_dir.as_deref())?);
    }
    Ok(loras)
}

/// The LoRAs a web UI prompt's `<lora:NAME:W>` tags name, found in `lora_dir`.
pub(crate) fn lora_tag_files(
    prompt: &str,
    lora_dir: Option<&std::path::Path>,
) -> Result<Vec<LoraSpec>> {
    let (_, tags) = crate::prompt_syntax::take_lora_tags(prompt)?;
    let mut loras = Vec::new();
    for tag in tags {
        let Some(dir) = lora_dir else {
            bail!(
                "the prompt's <lora:{}> tag needs --lora-dir, the folder of the LoRA files",
                tag.name
            );
        };
        if tag.name.is_empty() || tag.name.starts_with('.') || tag.name.contains(['/', '\\']) {
            bail!(
                "<lora:{}>: a LoRA name is a file name in --lora-dir, without folders",
                tag.name
            );
        }
        let path = ["safetensors", "pt", "ckpt", "bin"]
            .iter()
            .map(|ext| dir.join(format!("{}.{ext}", tag.name)))
            .find(|p| p.is_file())
            .with_context(|| {
                format!(
                    "<lora:{}>: no {}.safetensors (.pt, .ckpt, .bin) in {}",
                    tag.name,
                    tag.name,
                    dir.display()
                )
            })?;
        loras.push(LoraSpec {
            path,
            te_scale: tag.te_scale,
            unet_scale: tag.unet_scale,
        });
    }
    Ok(loras)
}

/// The model, loaded once, with the scheduler overrides applied.
fn load_model(args: &Args, model: &ModelRequest, device: Device, dtype: DType) -> Result<Pipeline> {
    // many prompts: load once, keep everything, find bad weights before any work
    let mut pipeline = load_pipeline(
        model,
        device,
        dtype,
        &args.embedding,
        args.prompts.is_some(),
    )?;
    apply_scheduler_overrides(&mut pipeline, args);
    Ok(pipeline)
}

/// A model with its `embeddings` (files or Hub files), with a spinner while it loads. `keep`:
/// every component loaded now and kept (many requests); else each loaded when first needed
/// and dropped after (one run, the lowest peak memory).
pub(crate) fn load_pipeline(
    model: &ModelRequest,
    device: Device,
    dtype: DType,
    embeddings: &[String],
    keep: bool,
) -> Result<Pipeline> {
    let files = source::resolve(model)?;
    let spinner = model.progress.then(|| {
        let s = ProgressBar::new_spinner();
        s.set_message(format!("loading {}", files.name));
        s.enable_steady_tick(std::time::Duration::from_millis(120));
        s
    });
    let mut pipeline = Pipeline::load(files, device, dtype)?;
    for e in embeddings {
        let path = source::resolve_file(e, model.offline, model.progress)
            .with_context(|| format!("--embedding {e}"))?;
        pipeline.add_embedding(&path)?;
    }
    if keep {
        pipeline.preload()?;
    } else {
        pipeline.residency = Residency::Sequential;
    }
    if let Some(s) = spinner {
        s.finish_and_clear();
    }
    Ok(pipeline)
}

/// An error and its causes on one line, without the backtraces candle appends on the lines
/// after a message: what `error:` prints, and what the server answers.
pub fn one_line(e: &anyhow::Error) -> String {
    e.chain()
        .map(|c| c.to_string().lines().next().unwrap_or_default().to_string())
        .collect::<Vec<_>>()
        .join(": ")
}

/// What the generation phase did.
struct Done {
    /// `Err` when something stopped the run (an interruption among them).
    outcome: Result<()>,
    written: usize,
    /// Images another run wrote while this one generated them (batches: left as they are).
    written_meanwhile: usize,
    /// Jobs that failed their checks and were skipped (batches without --strict).
    bad_jobs: usize,
    grid_images: Vec<GeneratedImage>,
}

/// Generates the planned images job by job, writing each as soon as it is decoded.
fn generate(args: &Args, pipeline: &Pipeline, jobs: &[Job], plan: &ImagePlan) -> Done {
    let messages = !args.quiet;
    let batch_mode = args.prompts.is_some();
    let bars = Bars::new(messages, plan.images.len());
    let mut done = Done {
        outcome: Ok(()),
        written: 0,
        written_meanwhile: 0,
        bad_jobs: 0,
        grid_images: Vec::new(),
    };
    // the plan lists each job's images together, in job order
    let mut rest = plan.images.as_slice();
    let mut hashes = FileHashes::default();
    for (j, job) in jobs.iter().enumerate() {
        let n = rest.iter().take_while(|p| p.job == j).count();
        let (todo, later) = rest.split_at(n);
        rest = later;
        if todo.is_empty() {
            continue;
        }
        let where_ = job.line.map(|l| format!("line {l}: ")).unwrap_or_default();
        let start = match start_picture(pipeline, job) {
            Ok(s) => s,
            Err(e) if batch_mode && !args.strict => {
                bars.println(&format!("error: {where_}{e:#}"));
                done.bad_jobs += 1;
                continue;
            }
            Err(e) => {
                done.outcome = Err(e);
                break;
            }
        };
        let (default_h, default_w) = match &start {
            Some(s) => (s.size.1, s.size.0),
            None => pipeline.default_size(),
        };
        let (width, height) = (
            job.width.unwrap_or(default_w),
            job.height.unwrap_or(default_h),
        );
        let prepared = start.as_ref().map(|s| {
            crate::input_image::start(
                &s.picture,
                s.mask.as_ref(),
                (width, height),
                args.mask_blur,
                job.strength
                    .or(Some(pipeline.default_strength(s.mask.is_some()))),
                args.keep_unmasked,
            )
        });
        let (image, overlay) = match prepared {
            None => (None, None),
            Some(Ok(s)) => (Some(s.init), s.overlay),
            Some(Err(e)) if batch_mode && !args.strict => {
                bars.println(&format!("error: {where_}{e:#}"));
                done.bad_jobs += 1;
                continue;
            }
            Some(Err(e)) => {
                done.outcome = Err(e);
                break;
            }
        };
        let request = Request {
            prompt: job.prompt.clone(),
            negative_prompt: job.negative_prompt.clone(),
            seeds: todo.iter().map(|p| p.seed).collect(),
            steps: job.steps,
            guidance: job.guidance,
            scheduler: job.scheduler.clone(),
            width,
            height,
            batch_size: args.batch_size,
            clip_skip: job.clip_skip,
            prompt_syntax: job.prompt_syntax,
            loras: plan.loras.get(&j).cloned().unwrap_or_default(),
            rng: job.rng,
            image,
            vae_tiling: args.vae_tiling,
            sizes: SizeConditioning {
                original: args.original_size,
                crop_top_left: args.crop_top_left.unwrap_or((0, 0)),
                target: args.target_size,
                aesthetic_score: args.aesthetic_score,
                negative_aesthetic_score: args.negative_aesthetic_score,
            },
        };
        if let Err(e) = pipeline.validate(&request) {
            if !batch_mode || args.strict {
                done.outcome = Err(e);
                break;
            }
            bars.println(&format!("error: {where_}{e:#}"));
            done.bad_jobs += 1;
            continue;
        }
        if messages {
            if let Err(e) = warn_about(pipeline, &request, &bars, &where_) {
                done.outcome = Err(e);
                break;
            }
            if plan.seeds_random.contains(&j) {
                bars.println(&format!(
                    "{where_}seed: {} (pass --seed {} to reproduce)",
                    request.seeds[0], request.seeds[0]
                ));
            }
        }
        let scheduler_name = infotext::scheduler_name(pipeline, request.scheduler.as_deref());
        let pictures = match Pictures::files(
            job.image.as_deref(),
            job.mask.as_deref(),
            args.keep_unmasked,
            args.mask_blur,
        ) {
            Ok(p) => p,
            Err(e) => {
                done.outcome = Err(e);
                break;
            }
        };
        let mut k = 0;
        let result = pipeline.generate(
            &request,
            &mut |steps, total| {
                bars.step(steps, total);
                Ok(())
            },
            &mut |mut img| {
                if let Some((picture, mask)) = &overlay {
                    crate::input_image::overlay(&mut img.rgb, picture, mask);
                }
                let p = &todo[k];
                k += 1;
                let meta = infotext::metadata(
                    pipeline,
                    &request,
                    job.line,
                    &pictures,
                    &scheduler_name,
                    &img,
                    &mut hashes,
                )?;
                let png = output::encode_png(img.width, img.height, &img.rgb, &meta)?;
                match output::write_atomic(&p.path, &png, args.overwrite)? {
                    Written::New => done.written += 1,
                    Written::AlreadyThere if batch_mode => {
                        // another worker of the same batch made it first
                        done.written_meanwhile += 1;
                        bars.image_done();
                        bars.println(&format!("skip: {} was written meanwhile", p.path.display()));
                        return Ok(());
                    }
                    Written::AlreadyThere => bail!(
                        "{} appeared while generating; not overwriting it",
                        p.path.display()
                    ),
                }
                bars.image_done();
                if args.json {
                    let mut out = std::io::stdout().lock();
                    writeln!(
                        out,
                        "{}",
                        image_json(pipeline, &request, job, &scheduler_name, &img, p)
                    )?;
                    out.flush()?;
                } else if messages {
                    bars.println(&format!("wrote {}", p.path.display()));
                }
                if plan.grid.is_some() {
                    done.grid_images.push(img);
                }
                Ok(())
            },
        );
        if let Err(e) = result {
            done.outcome = Err(e);
            break;
        }
    }
    bars.finish();
    done
}

/// A job's start picture, its mask, and the default size (the picture's, rounded down).
struct StartPictures {
    picture: Picture,
    mask: Option<Picture>,
    /// (width, height)
    size: (usize, usize),
}

/// A job's start picture and mask, decoded once, or none (text to image).
fn start_picture(pipeline: &Pipeline, job: &Job) -> Result<Option<StartPictures>> {
    let Some(path) = &job.image else {
        return Ok(None);
    };
    let picture = Picture::open(std::path::Path::new(path))?;
    let size = picture.default_size(pipeline.vae_scale_factor())?;
    let mask = job
        .mask
        .as_ref()
        .map(|m| Picture::open(std::path::Path::new(m)))
        .transpose()?;
    Ok(Some(StartPictures {
        picture,
        mask,
        size,
    }))
}

/// Warns about prompts that were cut at CLIP's 77 tokens.
fn warn_about(pipeline: &Pipeline, request: &Request, bars: &Bars, where_: &str) -> Result<()> {
    for (what, text) in ["prompt", "negative prompt"]
        .into_iter()
        .zip(request.texts()?)
    {
        if pipeline.tokenize(&text, request.prompt_syntax)?.truncated {
            bars.println(&format!(
                "warning: {where_}the {what} is longer than 77 CLIP tokens and was truncated"
            ));
        }
    }
    Ok(())
}

/// The end of a run: the interruption or error, the grid, the summary; the exit code.
fn report(args: &Args, jobs: &Jobs, plan: &ImagePlan, done: Done) -> Result<i32> {
    let (written, skipped) = (done.written, plan.skipped + done.written_meanwhile);
    if let Err(e) = done.outcome {
        if e.downcast_ref::<interrupt::Interrupted>().is_some() {
            let left = plan.images.len() - written - done.written_meanwhile;
            eprintln!("interrupted: {written} image(s) written, {left} not generated; run the same command again to continue");
            return Ok(EXIT_INTERRUPTED);
        }
        if written > 0 || skipped > 0 {
            eprintln!("stopped after {written} written and {skipped} skipped image(s)");
        }
        return Err(e);
    }
    if let Some(((rows, cols), path)) = &plan.grid {
        write_grid(args, &jobs.list[0], &done.grid_images, (*rows, *cols), path)?;
    }
    let bad_lines = jobs.bad_lines + done.bad_jobs;
    if args.prompts.is_some() && !args.quiet {
        eprintln!(
            "done: {written} written, {skipped} skipped (already there), {bad_lines} bad line(s)"
        );
    }
    Ok(exit_code(bad_lines))
}

fn exit_code(bad_lines: usize) -> i32 {
    if bad_lines > 0 {
        EXIT_FAILED
    } else {
        EXIT_OK
    }
}

/// `--grid` keeps every image until the grid is written, then the grid itself: refused before
/// any work when that cannot fit in memory.
fn check_grid_memory(args: &Args, pipeline: &Pipeline, n: usize) -> Result<()> {
    let (dh, dw) = pipeline.default_size();
    let (w, h) = (
        args.width.unwrap_or(dw) as u64,
        args.height.unwrap_or(dh) as u64,
    );
    let need = (n as u64).saturating_mul(w * h * 3 * 2);
    match crate::allocator::beyond_memory(need) {
        Some((need, have)) => bail!(
            "--grid of {n} {w}x{h} images needs about {need:.1} GiB; this machine has {have:.1} GiB"
        ),
        None => Ok(()),
    }
}

/// `--grid`: all images of the run in one PNG.
fn write_grid(
    args: &Args,
    job: &Job,
    images: &[GeneratedImage],
    (rows, cols): (usize, usize),
    path: &std::path::Path,
) -> Result<()> {
    let cells: Vec<(usize, usize, &[u8])> = images
        .iter()
        .map(|i| (i.width, i.height, i.rgb.as_slice()))
        .collect();
    let (w, h, px) = output::grid(&cells, rows, cols)?;
    let meta = vec![
        ("grid".to_string(), format!("{rows}x{cols}")),
        ("prompt".into(), job.prompt.clone()),
        ("seed".into(), images[0].seed.to_string()),
    ];
    let png = output::encode_png(w, h, &px, &meta)?;
    if output::write_atomic(path, &png, args.overwrite)? == Written::AlreadyThere {
        bail!(
            "{} appeared while generating; not overwriting it",
            path.display()
        );
    }
    if !args.quiet && !args.json {
        eprintln!("wrote {}", path.display());
    }
    Ok(())
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
        "rng": r.rng.name(),
    })
}
