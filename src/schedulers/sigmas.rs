//! The sigma schedule shared by the k-diffusion style schedulers (Euler, Euler a, LMS, Heun,
//! DPM2): `set_timesteps` of diffusers' `EulerDiscreteScheduler` and friends, and the helpers
//! (interpolation, Karras sigmas, sigma-to-timestep) the DPM-Solver family reuses.

use super::{SchedulerConfig, Spacing};
use anyhow::{bail, Result};
use candle_core::Tensor;

pub struct SigmaSchedule {
    /// The timesteps handed to the U-Net (float32 values, as diffusers stores them).
    pub timesteps: Vec<f64>,
    /// One sigma per timestep plus the final sigma, float32 as diffusers stores them.
    pub sigmas: Vec<f32>,
    pub init_noise_sigma: f64,
    /// log of the training sigmas (float32), for `sigma_to_t`.
    pub log_sigmas: Vec<f32>,
}

/// What the scheduler class accepts or does differently.
#[derive(Clone, Copy, Default)]
pub struct SigmaOptions {
    pub karras_allowed: bool,
    pub final_sigma_allowed: bool,
    /// KDPM2 rounds the timesteps of Karras sigmas.
    pub round_karras_timesteps: bool,
}

/// `np.interp(x, arange(len(fp)), fp)`.
pub fn interp(x: f64, fp: &[f64]) -> f64 {
    let last = fp.len() - 1;
    if x <= 0.0 {
        return fp[0];
    }
    if x >= last as f64 {
        return fp[last];
    }
    let j = x.floor() as usize;
    let slope = fp[j + 1] - fp[j];
    slope * (x - j as f64) + fp[j]
}

/// `_sigma_to_t`: the fractional timestep whose log-sigma matches, by linear interpolation.
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    let mut low = 0;
    for (i, ls) in log_sigmas.iter().enumerate() {
        if log_sigma - *ls as f64 >= 0.0 {
            low = i;
        }
    }
    let low = low.min(n - 2);
    let high = low + 1;
    let (l, h) = (log_sigmas[low] as f64, log_sigmas[high] as f64);
    let w = ((l - log_sigma) / (l - h)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * high as f64
}

/// `_convert_to_karras`: rho = 7 interpolation between sigma_max and sigma_min, `n` values
/// (the config's `sigma_min`/`sigma_max` win over the given ones, as in diffusers).
pub fn karras(config: &SchedulerConfig, sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let sigma_min = config.f64_or("sigma_min", sigma_min);
    let sigma_max = config.f64_or("sigma_max", sigma_max);
    let rho = 7.0f64;
    let (min_inv, max_inv) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    (0..n)
        .map(|i| {
            let ramp = if n > 1 {
                i as f64 / (n - 1) as f64
            } else {
                0.0
            };
            (max_inv + ramp * (min_inv - max_inv)).powf(rho)
        })
        .collect()
}

/// ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5 in float32, and its log.
pub fn training_sigmas(config: &SchedulerConfig) -> Result<(Vec<f32>, Vec<f32>)> {
    let ac = config.alphas_cumprod()?;
    let sigmas: Vec<f32> = ac.iter().map(|a| ((1.0 - a) / a).sqrt()).collect();
    let logs = sigmas.iter().map(|s| s.ln()).collect();
    Ok((sigmas, logs))
}

/// Float timesteps of the Euler family per `timestep_spacing`, descending.
pub fn spaced_timesteps(spacing: Spacing, train: usize, steps: usize, offset: f64) -> Vec<f64> {
    match spacing {
        Spacing::Linspace => {
            let step = (train - 1) as f64 / (steps - 1).max(1) as f64;
            (0..steps)
                .rev()
                .map(|i| {
                    if i + 1 == steps && steps > 1 {
                        (train - 1) as f64
                    } else {
                        i as f64 * step
                    }
                })
                .map(|t| t as f32 as f64)
                .collect()
        }
        Spacing::Leading => {
            let ratio = train / steps;
            (0..steps)
                .rev()
                .map(|i| (i * ratio) as f64 + offset)
                .collect()
        }
        Spacing::Trailing => super::trailing_timesteps(train, steps),
    }
}

/// `init_noise_sigma` of the Euler family.
pub fn init_noise_sigma(sigmas: &[f32], spacing: Spacing) -> f64 {
    let max = sigmas.iter().cloned().fold(f32::MIN, f32::max);
    match spacing {
        Spacing::Linspace | Spacing::Trailing => max as f64,
        Spacing::Leading => (max * max + 1.0).sqrt() as f64,
    }
}

pub fn sigma_schedule(
    config: &SchedulerConfig,
    steps: usize,
    opts: SigmaOptions,
) -> Result<SigmaSchedule> {
    let (base, log_sigmas) = training_sigmas(config)?;
    let train = base.len();
    if steps > train {
        bail!("--steps {steps} is more than the scheduler's {train} training timesteps");
    }
    let spacing = config.spacing("linspace")?;
    let offset = config.usize_or("steps_offset", 0) as f64;
    let mut timesteps = spaced_timesteps(spacing, train, steps, offset);
    let base64: Vec<f64> = base.iter().map(|&s| s as f64).collect();
    match config.str_or("interpolation_type", "linear") {
        "linear" => {}
        other => {
            bail!("scheduler config: unsupported interpolation_type={other} (supported: linear)")
        }
    }
    let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| interp(t, &base64)).collect();
    if config.bool_or("use_karras_sigmas", false) {
        if !opts.karras_allowed {
            bail!("this scheduler does not support Karras sigmas (--karras)");
        }
        sigmas = karras(config, *sigmas.last().unwrap(), sigmas[0], steps);
        timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &log_sigmas)).collect();
        if opts.round_karras_timesteps {
            timesteps = timesteps
                .iter()
                .map(|&t| super::round_half_even(t))
                .collect();
        }
    }
    let last = match config.str_or("final_sigmas_type", "zero") {
        "zero" => 0.0,
        "sigma_min" if opts.final_sigma_allowed => base64[0],
        other => bail!("scheduler config: unsupported final_sigmas_type={other}"),
    };
    sigmas.push(last);
    let sigmas: Vec<f32> = sigmas.iter().map(|&s| s as f32).collect();
    let timesteps = timesteps.iter().map(|&t| t as f32 as f64).collect();
    let init_noise_sigma = init_noise_sigma(&sigmas, spacing);
    Ok(SigmaSchedule {
        timesteps,
        sigmas,
        init_noise_sigma,
        log_sigmas,
    })
}

/// The sigmas of the two-evaluation schedulers (Heun, DPM++ SDE): diffusers'
/// `cat([s[:1], s[1:-1].repeat_interleave(2), s[-1:]])`.
pub fn repeat_inner(s: &[f32]) -> Vec<f32> {
    let n = s.len();
    let mut out = vec![s[0]];
    for &x in &s[1..n - 1] {
        out.extend([x, x]);
    }
    out.push(s[n - 1]);
    out
}

/// `sample / (sigma^2 + 1)^0.5`, the input scaling of every sigma-based scheduler.
pub fn scale_input(sample: &Tensor, sigma: f32) -> candle_core::Result<Tensor> {
    sample / ((sigma * sigma + 1.0).sqrt() as f64)
}

/// The denoised estimate x0 from the model output at `sigma`.
pub fn predict_original(
    prediction: super::Prediction,
    sample: &Tensor,
    model_output: &Tensor,
    sigma: f32,
) -> candle_core::Result<Tensor> {
    match prediction {
        super::Prediction::Epsilon => sample - (model_output * sigma as f64)?,
        super::Prediction::VPrediction => {
            let s2 = sigma * sigma + 1.0;
            (model_output * (-sigma / s2.sqrt()) as f64)? + (sample / s2 as f64)?
        }
    }
}

/// `torch.lerp(a, b, 0.5)` as ATen computes it for weight >= 0.5.
pub fn lerp_half(a: f32, b: f32) -> f32 {
    b - (b - a) * 0.5
}
