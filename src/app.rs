//! What the `sdgen` binary does with its arguments.

use crate::cli::Args;
use crate::device::{dtype_name, parse_device, parse_dtype};
use crate::model_source::{self, offline_from_env, Precision};
use crate::output::{self, NameFields};
use crate::pipeline::{GeneratedImage, Pipeline, Request};
use crate::schedulers::{self, SCHEDULERS};
use anyhow::{bail, Result};
use candle_core::DType;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use std::path::PathBuf;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

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

fn messages(args: &Args) -> bool {
    !args.quiet
}

pub fn run(args: Args) -> Result<()> {
    if args.list_schedulers {
        print_schedulers();
        return Ok(());
    }
    let prompt = args.prompt.clone().unwrap_or_default();
    let device = parse_device(&args.device)?;
    let dtype = parse_dtype(&args.dtype)?;
    let precision = if dtype == DType::F32 {
        Precision::Full
    } else {
        Precision::Half
    };
    let offline = args.offline || offline_from_env();
    if args.download_only {
        let files = model_source::resolve(
            &args.model,
            &args.revision,
            precision,
            offline,
            messages(&args),
        )?;
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
        return Ok(());
    }
    if let Some(s) = &args.scheduler {
        if !SCHEDULERS.iter().any(|x| x.0 == s) {
            bail!(
                "unknown scheduler {s:?}; known: {}",
                schedulers::known_names()
            );
        }
    }
    let grid = args.grid.as_deref().map(output::parse_grid).transpose()?;
    if let Some((r, c)) = grid {
        if r * c != args.num_images {
            bail!("--grid {r}x{c} needs --num-images {}", r * c);
        }
    }
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if args.num_images == 0 || args.batch_size == 0 {
        bail!("--num-images and --batch-size must be at least 1");
    }
    let seed = args.seed.unwrap_or_else(random_seed);

    // Output names are settled (and checked) before any model work.
    let mut template = args.output.clone();
    if args.num_images > 1 && !output::template_is_unique(&template) {
        template = output::with_suffix(&template, "{index}");
    }
    let paths: Vec<PathBuf> = (0..args.num_images)
        .map(|i| {
            let f = NameFields {
                seed: seed.wrapping_add(i as u64),
                index: i,
                prompt: &prompt,
                line: None,
            };
            output::render_template(&template, &f).map(PathBuf::from)
        })
        .collect::<Result<_>>()?;
    for (i, p) in paths.iter().enumerate() {
        if paths[..i].contains(p) {
            bail!(
                "two images would be written to {}; put {{seed}} or {{index}} in --output",
                p.display()
            );
        }
        output::check_writable(p, args.overwrite)?;
    }
    let grid_path =
        grid.map(|_| PathBuf::from(output::with_suffix(&paths[0].to_string_lossy(), "grid")));
    if let Some(g) = &grid_path {
        output::check_writable(g, args.overwrite)?;
    }

    let files = model_source::resolve(
        &args.model,
        &args.revision,
        precision,
        offline,
        messages(&args),
    )?;
    let spinner = if messages(&args) {
        let s = ProgressBar::new_spinner();
        s.set_message(format!("loading {}", files.name));
        s.enable_steady_tick(std::time::Duration::from_millis(120));
        Some(s)
    } else {
        None
    };
    let mut pipeline = Pipeline::load(files, device, dtype)?;
    if let Some(s) = spinner {
        s.finish_and_clear();
    }
    apply_scheduler_overrides(&mut pipeline, &args);

    let size = pipeline.default_size();
    let request = Request {
        prompt: prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        seed,
        steps: args.steps,
        guidance: args.guidance,
        scheduler: args.scheduler.clone(),
        width: args.width.unwrap_or(size),
        height: args.height.unwrap_or(size),
        num_images: args.num_images,
        batch_size: args.batch_size,
    };
    pipeline.validate(&request)?;
    if messages(&args) {
        for (what, text) in [
            ("prompt", &request.prompt),
            ("negative prompt", &request.negative_prompt),
        ] {
            if pipeline.tokenize(text)?.1 {
                eprintln!("warning: the {what} is longer than 77 CLIP tokens and was truncated");
            }
        }
    }
    if args.seed.is_none() && messages(&args) {
        eprintln!("seed: {seed} (pass --seed {seed} to reproduce)");
    }
    let scheduler_name = request
        .scheduler
        .clone()
        .or(pipeline.default_scheduler.map(str::to_string))
        .unwrap_or_else(|| "pndm".into());

    let bar = if messages(&args) {
        let b = ProgressBar::new(0);
        b.set_style(
            ProgressStyle::with_template(
                "{spinner} denoising [{bar:30}] {pos}/{len} steps {per_sec} eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        Some(b)
    } else {
        None
    };
    let images = pipeline.generate(&request, &mut |done, total| {
        if let Some(b) = &bar {
            b.set_length(total as u64);
            b.set_position(done as u64);
        }
    })?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }

    for (i, (img, path)) in images.iter().zip(&paths).enumerate() {
        let meta = metadata(&pipeline, &request, &scheduler_name, img);
        let png = output::encode_png(img.width, img.height, &img.rgb, &meta)?;
        output::write_atomic(path, &png, args.overwrite)?;
        if args.json {
            println!(
                "{}",
                image_json(&pipeline, &request, &scheduler_name, img, i, path)
            );
        } else if messages(&args) {
            eprintln!("wrote {}", path.display());
        }
    }
    if let (Some((rows, cols)), Some(gpath)) = (grid, grid_path) {
        let cells: Vec<(usize, usize, &[u8])> = images
            .iter()
            .map(|i| (i.width, i.height, i.rgb.as_slice()))
            .collect();
        let (w, h, px) = output::grid(&cells, rows, cols)?;
        let mut meta = metadata(&pipeline, &request, &scheduler_name, &images[0]);
        meta.push(("grid".into(), format!("{rows}x{cols}")));
        output::write_atomic(
            &gpath,
            &output::encode_png(w, h, &px, &meta)?,
            args.overwrite,
        )?;
        if messages(&args) && !args.json {
            eprintln!("wrote {}", gpath.display());
        }
    }
    Ok(())
}

/// Applies --karras / --timestep-spacing / --prediction-type to the scheduler config.
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
}

fn metadata(p: &Pipeline, r: &Request, scheduler: &str, img: &GeneratedImage) -> output::Metadata {
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
    vec![
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
    ]
}

fn image_json(
    p: &Pipeline,
    r: &Request,
    scheduler: &str,
    img: &GeneratedImage,
    index: usize,
    path: &std::path::Path,
) -> serde_json::Value {
    json!({
        "path": path.display().to_string(),
        "index": index,
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
