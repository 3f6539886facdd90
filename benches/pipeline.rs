//! The CPU benchmark: text encoder, U-Net step (classifier-free guidance, batch 2) at 256x256
//! and 512x512, VAE decode at 512x512, model load, and the peak RSS of a whole 512x512
//! generation by the `sdgen` binary; for an SDXL model the same at SDXL's 1024x1024 (U-Net
//! step with the added conditioning, VAE decode, a whole generation; no 256 and 512 steps;
//! `SDGEN_BENCH_PARTS` names `unet1024` for its step). Prints one JSON object; `scripts/bench.sh` runs it beside
//! diffusers on the same weights and prints the ratios.
//!
//!     SDGEN_BENCH_MODEL=/path/to/sd15-random cargo bench --bench pipeline
//!
//! Timings are medians of a few runs after a warm-up; never asserted anywhere.
//! `SDGEN_BENCH_PARTS=unet512,vae` runs only some parts (load, text, unet256, unet512, vae,
//! generate, vae2048), to iterate on one of them. `vae2048` decodes 2048x2048 in tiles with
//! only the VAE loaded and reports the process's peak RSS: run it alone for that figure. `SDGEN_BENCH_DEVICE=cuda` (a build with `--features
//! cuda`) times the same parts on the GPU, waiting for the device after each run
//! (`SDGEN_CUDA_KERNELS=0`: on candle's kernels alone). `SDGEN_PROFILE_OPS=1` prints the time
//! per operation of the 512x512 steps (`ops::profile`; the timings are then not comparable).

use candle_core::{DType, Device, Tensor};
use sdgen::pipeline::Pipeline;
use sdgen::source::{ModelFiles, Precision};
use std::path::PathBuf;
use std::time::Instant;

/// This process's peak resident memory so far (VmHWM), MB.
fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmHWM:"))?.to_string();
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Median wall time of `runs` calls of `f` after a warm-up; on a GPU each call ends when the
/// device has finished its work (kernels are queued asynchronously).
fn time<T>(dev: &Device, runs: usize, mut f: impl FnMut() -> T) -> f64 {
    f(); // warm-up
    dev.synchronize().unwrap();
    median(
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                std::hint::black_box(f());
                dev.synchronize().unwrap();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

/// Peak RSS (MB) and wall time of `sdgen` generating one `size` x `size` image with `steps`
/// steps.
fn whole_generation(
    model: &str,
    steps: usize,
    size: usize,
    dtype: &str,
    device: &str,
) -> (f64, f64) {
    // the bench runs from <target>/release/deps: its sdgen is two folders up
    let exe = std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.parent()?.parent()?.join("sdgen")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release/sdgen"));
    let out = std::env::temp_dir().join(format!("sdgen-bench-{}.png", std::process::id()));
    let t = Instant::now();
    let status = std::process::Command::new(&exe)
        .args([
            "bench",
            "-m",
            model,
            "-s",
            "1",
            "--steps",
            &steps.to_string(),
            "-W",
            &size.to_string(),
            "-H",
            &size.to_string(),
        ])
        .args([
            "--dtype",
            dtype,
            "--device",
            device,
            "-q",
            "--overwrite",
            "-o",
            out.to_str().unwrap(),
        ])
        .status()
        .expect("run target/release/sdgen (cargo build --release first)");
    let wall = t.elapsed().as_secs_f64();
    assert!(status.success());
    let _ = std::fs::remove_file(out);
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    (usage.ru_maxrss as f64 / 1024.0, wall)
}

fn main() {
    let model = std::env::var("SDGEN_BENCH_MODEL").expect(
        "set SDGEN_BENCH_MODEL to a full-size diffusers folder (scripts/bench.sh makes one)",
    );
    let dtype = match std::env::var("SDGEN_BENCH_DTYPE").as_deref() {
        Ok("bf16") => DType::BF16,
        Ok("f16") => DType::F16,
        _ => DType::F32,
    };
    let device = std::env::var("SDGEN_BENCH_DEVICE").unwrap_or_else(|_| "cpu".into());
    let dev = sdgen::device::parse_device(&device).unwrap();
    let precision = if dtype == DType::F32 {
        Precision::Full
    } else {
        Precision::Half
    };
    let parts = std::env::var("SDGEN_BENCH_PARTS").unwrap_or_default();
    let want = |part: &str| parts.is_empty() || parts.split(',').any(|p| p == part);
    let nan = f64::NAN;
    // first, while this process is small: Linux carries the parent's RSS at the fork into the
    // child's peak (ru_maxrss), which made the figure the bench's own size with the model
    // loaded rather than the generation's
    let xl = std::path::Path::new(&model)
        .join("text_encoder_2/config.json")
        .exists();
    let size = if xl { 1024 } else { 512 };
    let (rss_mb, gen_wall) = if want("generate") {
        whole_generation(&model, 2, size, sdgen::device::dtype_name(dtype), &device)
    } else {
        (nan, nan)
    };
    let (vae2048, vae2048_rss) = if want("vae2048") {
        let files = ModelFiles::from_folder(model.as_ref(), precision).unwrap();
        let p = Pipeline::load(files, dev.clone(), dtype).unwrap();
        let lat = Tensor::randn(0f32, 1.0, (1, 4, 256, 256), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let tiles = Some(sdgen::pipeline::Tiles::new(&p.vae_config));
        let t = Instant::now();
        p.vae_decode_raw(&lat, tiles).unwrap();
        (t.elapsed().as_secs_f64(), peak_rss_mb())
    } else {
        (nan, nan)
    };
    let t = Instant::now();
    let files = ModelFiles::from_folder(model.as_ref(), precision).unwrap();
    let p = Pipeline::load(files, dev.clone(), dtype).unwrap();
    p.preload().unwrap();
    let load = t.elapsed().as_secs_f64();
    if xl {
        return sdxl(&p, &dev, &device, load, gen_wall, rss_mb, want);
    }
    let text = if want("text") {
        time(&dev, 3, || {
            p.encode_text("a photo of a cat on a beach", Default::default(), 1)
                .unwrap()
        })
    } else {
        nan
    };
    // images per U-Net call (SDGEN_BENCH_BATCH, default 1): twice as many rows with CFG
    let rows = 2 * std::env::var("SDGEN_BENCH_BATCH")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1);
    let ctx = Tensor::randn(
        0f32,
        1.0,
        (rows, 77, p.unet_config.cross_attention_dim),
        &dev,
    )
    .unwrap()
    .to_dtype(dtype)
    .unwrap();
    let unet = |size: usize, runs: usize| {
        let x = Tensor::randn(0f32, 1.0, (rows, 4, size / 8, size / 8), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        time(&dev, runs, || p.unet_forward(&x, 500.0, &ctx).unwrap())
    };
    // a GPU step takes tens of milliseconds: more runs for a steadier median
    let more = if dev.is_cpu() { 1 } else { 10 };
    let unet256 = if want("unet256") {
        unet(256, 3 * more)
    } else {
        nan
    };
    sdgen::ops::profile::report(); // SDGEN_PROFILE_OPS=1: from here on
    let unet512 = if want("unet512") {
        unet(512, 2 * more)
    } else {
        nan
    };
    let profile = sdgen::ops::profile::report();
    if !profile.is_empty() {
        eprintln!("time per operation over the 512x512 U-Net steps (warm-up included):\n{profile}");
    }
    let lat = Tensor::randn(0f32, 1.0, (1, 4, 64, 64), &dev)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let vae = if want("vae") {
        time(&dev, more, || p.vae_decode_raw(&lat, None).unwrap())
    } else {
        nan
    };
    drop(p);
    println!(
        "{}",
        serde_json::json!({
            "impl": "sdgen",
            "dtype": sdgen::device::dtype_name(dtype),
            "device": device,
            "threads": std::env::var("RAYON_NUM_THREADS").ok(),
            "load_s": load,
            "text_encoder_s": text,
            "unet_step_256_s": unet256,
            "unet_step_512_s": unet512,
            "vae_decode_512_s": vae,
            "generation_512_2steps_s": gen_wall,
            "peak_rss_mb": rss_mb,
            "vae_decode_2048_tiled_s": vae2048,
            "vae_decode_2048_tiled_peak_rss_mb": vae2048_rss,
        })
    );
}

/// The SDXL measurements at 1024x1024: both text encoders, a U-Net step with classifier-free
/// guidance (batch 2) and the added conditioning, a VAE decode.
fn sdxl(
    p: &Pipeline,
    dev: &Device,
    device: &str,
    load: f64,
    gen_wall: f64,
    rss_mb: f64,
    want: impl Fn(&str) -> bool,
) {
    let nan = f64::NAN;
    let dtype = p.dtype;
    let request = sdgen::pipeline::Request {
        seeds: vec![1],
        steps: 1,
        guidance: 5.0,
        width: 1024,
        height: 1024,
        ..p.request("a photo of a cat on a beach")
    };
    let text = if want("text") {
        time(dev, 3, || {
            p.encode_prompt(&request.prompt, &request).unwrap()
        })
    } else {
        nan
    };
    let randn = |shape: &[usize]| {
        Tensor::randn(0f32, 1.0, shape, dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    let ctx = randn(&[2, 77, p.unet_config.cross_attention_dim]);
    let pooled = p
        .unet_config
        .text_time()
        .unwrap()
        .unwrap()
        .pooled_dim(6)
        .unwrap();
    let added = sdgen::pipeline::AddedConditioning {
        text_embeds: randn(&[2, pooled]),
        time_ids: vec![vec![1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]; 2],
    };
    sdgen::ops::profile::report(); // SDGEN_PROFILE_OPS=1: from here on
    let unet1024 = if want("unet1024") {
        let x = randn(&[2, 4, 128, 128]);
        time(dev, 1, || {
            p.unet_forward_xl(&x, 500.0, &ctx, &added).unwrap()
        })
    } else {
        nan
    };
    let profile = sdgen::ops::profile::report();
    if !profile.is_empty() {
        eprintln!(
            "time per operation over the 1024x1024 U-Net steps (warm-up included):\n{profile}"
        );
    }
    let vae = if want("vae") {
        let lat = randn(&[1, 4, 128, 128]);
        time(dev, 1, || p.vae_decode_raw(&lat, None).unwrap())
    } else {
        nan
    };
    println!(
        "{}",
        serde_json::json!({
            "impl": "sdgen",
            "family": "sdxl",
            "dtype": sdgen::device::dtype_name(dtype),
            "device": device,
            "threads": std::env::var("RAYON_NUM_THREADS").ok(),
            "load_s": load,
            "text_encoder_s": text,
            "unet_step_1024_s": unet1024,
            "vae_decode_1024_s": vae,
            "generation_1024_2steps_s": gen_wall,
            "peak_rss_mb": rss_mb,
        })
    );
}
