//! The diffusers scheduler family, one file per scheduler behind one interface.
//!
//! candle-transformers ships DDIM, DDPM, Euler a and UniPC, but not PNDM (the SD 1.5 default),
//! LMS or plain Euler, and its configs cannot express `timestep_spacing`/`steps_offset` the way
//! `scheduler_config.json` does. To give diffusers' exact `set_timesteps` / `scale_model_input`
//! / `step` arithmetic for every scheduler, they are all written here from diffusers' sources.
//!
//! Like diffusers' `from_config`, a scheduler reads the keys of the model's
//! `scheduler_config.json` that it knows; the others take that scheduler's own defaults.

pub mod brownian_tree;
pub mod ddim;
pub mod ddpm;
pub mod deis;
pub mod dpm2;
pub mod dpm_common;
pub mod dpmpp_2m;
pub mod dpmpp_2s;
pub mod dpmpp_sde;
pub mod euler;
pub mod euler_ancestral;
pub mod heun;
pub mod lms;
pub mod pndm;
pub mod sigmas;
pub mod unipc;

use crate::rng::{Generator, RngKind};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde_json::Value;
use std::path::Path;

/// Per-image noise for ancestral steps: image i of the batch draws from generator i, as
/// diffusers does when called with a list of generators; the SDE scheduler seeds its Brownian
/// trees with the images' seeds, on generators of the same kind.
pub struct NoiseSource<'a> {
    pub generators: &'a mut [Generator],
    pub seeds: &'a [u64],
    pub rng: RngKind,
}

impl NoiseSource<'_> {
    /// `randn_tensor(shape, generator=[...])`: one draw of shape[1..] per generator, stacked.
    pub fn randn_like(&mut self, like: &Tensor) -> Result<Tensor> {
        let dims = like.dims().to_vec();
        let per_image: usize = dims[1..].iter().product();
        if dims[0] != self.generators.len() {
            bail!(
                "batch of {} but {} generators",
                dims[0],
                self.generators.len()
            );
        }
        let mut data = Vec::with_capacity(per_image * dims[0]);
        for g in self.generators.iter_mut() {
            data.extend(g.randn(per_image));
        }
        Ok(Tensor::from_vec(data, dims, like.device())?.to_dtype(like.dtype())?)
    }
}

/// How a scheduler's `add_noise` noises a clean sample for a start in the middle of its
/// schedule (image-to-image).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NoiseLevel {
    /// The Euler family: `x + noise * sigma`.
    Sigma(f32),
    /// The DPM-Solver family: `alpha_t * x + sigma_t * noise`, alpha_t = 1 / sqrt(sigma^2 + 1),
    /// sigma_t = sigma * alpha_t.
    AlphaSigma(f32),
    /// DDPM, DDIM, PNDM: `sqrt(a) * x + sqrt(1 - a) * noise`, a = alphas_cumprod[t].
    AlphasCumprod(f32),
}

impl NoiseLevel {
    /// `scheduler.add_noise(original, noise, t)`, in f32 as diffusers computes it.
    pub fn add_noise(self, original: &Tensor, noise: &Tensor) -> Result<Tensor> {
        Ok(match self {
            NoiseLevel::Sigma(s) => (original + (noise * s as f64)?)?,
            NoiseLevel::AlphaSigma(s) => {
                let alpha = 1.0 / (s * s + 1.0).sqrt();
                ((original * alpha as f64)? + (noise * (s * alpha) as f64)?)?
            }
            NoiseLevel::AlphasCumprod(a) => {
                ((original * a.sqrt() as f64)? + (noise * (1.0 - a).sqrt() as f64)?)?
            }
        })
    }
}

/// One scheduler of the diffusers family.
pub trait Scheduler {
    /// How many entries of `timesteps` one inference step takes (2 for Heun, DPM2 and DPM++
    /// SDE, which call the U-Net twice per step): image-to-image starts at a multiple of it.
    fn order(&self) -> usize {
        1
    }
    /// The noise `add_noise` puts on a clean sample to start at index `begin` of `timesteps`
    /// (diffusers' `set_begin_index`).
    fn noise_level(&self, begin: usize) -> NoiseLevel;
    /// The timesteps at which the U-Net is called, in order (PNDM, Heun and DPM2 repeat some).
    fn timesteps(&self) -> &[f64];
    /// `init_noise_sigma`: the factor applied to the initial Gaussian latents (1 for the
    /// schedulers that work on unscaled samples).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// `scale_model_input` for the call at index `step` (the identity unless overridden).
    fn scale_model_input(&self, sample: &Tensor, _step: usize) -> Result<Tensor> {
        Ok(sample.clone())
    }
    /// `step` for the call at index `step`: returns `prev_sample`.
    fn step(
        &mut self,
        model_output: &Tensor,
        step: usize,
        sample: &Tensor,
        noise: &mut NoiseSource,
    ) -> Result<Tensor>;
}

/// The `--scheduler` names, the diffusers class each one is, and a one-line description.
pub const SCHEDULERS: &[(&str, &str, &str)] = &[
    (
        "pndm",
        "PNDMScheduler",
        "pseudo numerical methods (PLMS); SD 1.x default",
    ),
    (
        "ddim",
        "DDIMScheduler",
        "denoising diffusion implicit models, deterministic (eta 0)",
    ),
    (
        "euler",
        "EulerDiscreteScheduler",
        "Euler method on the Karras ODE",
    ),
    (
        "euler_a",
        "EulerAncestralDiscreteScheduler",
        "Euler ancestral: adds fresh noise every step",
    ),
    ("lms", "LMSDiscreteScheduler", "linear multistep (order 4)"),
    (
        "ddpm",
        "DDPMScheduler",
        "denoising diffusion probabilistic models, ancestral",
    ),
    (
        "heun",
        "HeunDiscreteScheduler",
        "Heun's 2nd-order method (2 U-Net calls per step)",
    ),
    (
        "dpm2",
        "KDPM2DiscreteScheduler",
        "DPM2, 2nd order (2 U-Net calls per step)",
    ),
    (
        "dpm2_a",
        "KDPM2AncestralDiscreteScheduler",
        "DPM2 ancestral (2 U-Net calls per step, adds noise)",
    ),
    (
        "dpmpp_2m",
        "DPMSolverMultistepScheduler",
        "DPM-Solver++ 2M, 2nd-order multistep (solver_order 3: DPM++ 3M)",
    ),
    (
        "dpmpp_2m_sde",
        "DPMSolverMultistepScheduler",
        "DPM-Solver++ 2M SDE (algorithm_type sde-dpmsolver++), adds noise",
    ),
    (
        "dpmpp_2s",
        "DPMSolverSinglestepScheduler",
        "DPM-Solver++ 2S, 2nd-order singlestep",
    ),
    (
        "dpmpp_sde",
        "DPMSolverSDEScheduler",
        "DPM++ SDE: 2nd order with Brownian-tree noise seeded by the image's seed",
    ),
    (
        "deis",
        "DEISMultistepScheduler",
        "diffusion exponential integrator sampler, 2nd order (solver_order 1-3)",
    ),
    (
        "unipc",
        "UniPCMultistepScheduler",
        "unified predictor-corrector (bh2), 2nd order (solver_order 1-3)",
    ),
];

/// The web UI's (AUTOMATIC1111 / k-diffusion) sampler names, as diffusers' scheduler overview
/// maps them to its classes: the name, the sdgen scheduler, and whether Karras sigmas come with
/// it (`use_karras_sigmas=True`). DDIM, PLMS and UniPC are the same algorithms under the same
/// names. So the `Sampler:` of a web UI `parameters` chunk can be passed to `--scheduler`.
pub const WEB_UI_NAMES: &[(&str, &str, bool)] = &[
    ("DPM++ 2M", "dpmpp_2m", false),
    ("DPM++ 2M Karras", "dpmpp_2m", true),
    ("DPM++ 2M SDE", "dpmpp_2m_sde", false),
    ("DPM++ 2M SDE Karras", "dpmpp_2m_sde", true),
    ("DPM2", "dpm2", false),
    ("DPM2 Karras", "dpm2", true),
    ("DPM2 a", "dpm2_a", false),
    ("DPM2 a Karras", "dpm2_a", true),
    ("Euler", "euler", false),
    ("Euler a", "euler_a", false),
    ("Heun", "heun", false),
    ("LMS", "lms", false),
    ("LMS Karras", "lms", true),
    ("DDIM", "ddim", false),
    ("PLMS", "pndm", false),
    ("UniPC", "unipc", false),
    ("DPM++ SDE", "dpmpp_sde", false),
    ("DPM++ SDE Karras", "dpmpp_sde", true),
];

/// Web UI samplers without an exact diffusers (and so sdgen) equivalent, and why.
const WEB_UI_UNMATCHED: &[(&str, &str)] = &[
    (
        "DPM++ 2S a",
        "diffusers has no exact equivalent (dpmpp_2s is close, not the same)",
    ),
    (
        "DPM++ 2S a Karras",
        "diffusers has no exact equivalent (dpmpp_2s --karras is close, not the same)",
    ),
    ("DPM adaptive", "diffusers has no equivalent"),
    ("DPM fast", "diffusers has no equivalent"),
];

/// A `--scheduler` name: sdgen's own (`dpmpp_2m`) or the web UI's (`DPM++ 2M Karras`, any
/// case): the sdgen scheduler and whether it asks for Karras sigmas.
pub fn resolve_name(name: &str) -> Result<(&'static str, bool)> {
    if let Some(s) = SCHEDULERS.iter().find(|s| s.0 == name) {
        return Ok((s.0, false));
    }
    if let Some((_, s, karras)) = WEB_UI_NAMES.iter().find(|w| w.0.eq_ignore_ascii_case(name)) {
        return Ok((s, *karras));
    }
    if let Some((w, why)) = WEB_UI_UNMATCHED
        .iter()
        .find(|w| w.0.eq_ignore_ascii_case(name))
    {
        bail!("the web UI's sampler {w:?} cannot be reproduced: {why}");
    }
    bail!(
        "unknown scheduler {name:?}; known: {} (or a web UI sampler name such as \"DPM++ 2M Karras\"; see --list-schedulers)",
        known_names()
    )
}

pub fn name_for_class(class: &str) -> Option<&'static str> {
    SCHEDULERS.iter().find(|s| s.1 == class).map(|s| s.0)
}

pub fn known_names() -> String {
    SCHEDULERS
        .iter()
        .map(|s| s.0)
        .collect::<Vec<_>>()
        .join(", ")
}

/// `prediction_type`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Prediction {
    Epsilon,
    VPrediction,
}

/// `timestep_spacing`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Spacing {
    Leading,
    Linspace,
    Trailing,
}

/// The model's `scheduler_config.json` plus command-line overrides. Getters take the default of
/// the scheduler that asks, as diffusers' `from_config` does.
#[derive(Debug, Clone, Default)]
pub struct SchedulerConfig {
    pub values: serde_json::Map<String, Value>,
}

/// What a `scheduler_config.json` key holds, for the keys the schedulers read.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Bool,
    Number,
    Count,
    Text,
}

const KEY_KINDS: &[(&str, Kind)] = &[
    ("num_train_timesteps", Kind::Count),
    ("steps_offset", Kind::Count),
    ("solver_order", Kind::Count),
    ("noise_sampler_seed", Kind::Count),
    ("beta_start", Kind::Number),
    ("beta_end", Kind::Number),
    ("clip_sample_range", Kind::Number),
    ("lambda_min_clipped", Kind::Number),
    ("sigma_min", Kind::Number),
    ("sigma_max", Kind::Number),
    ("clip_sample", Kind::Bool),
    ("set_alpha_to_one", Kind::Bool),
    ("skip_prk_steps", Kind::Bool),
    ("thresholding", Kind::Bool),
    ("use_karras_sigmas", Kind::Bool),
    ("lower_order_final", Kind::Bool),
    ("euler_at_final", Kind::Bool),
    ("predict_x0", Kind::Bool),
    ("rescale_betas_zero_snr", Kind::Bool),
    ("beta_schedule", Kind::Text),
    ("prediction_type", Kind::Text),
    ("timestep_spacing", Kind::Text),
    ("final_sigmas_type", Kind::Text),
    ("algorithm_type", Kind::Text),
    ("solver_type", Kind::Text),
    ("variance_type", Kind::Text),
    ("interpolation_type", Kind::Text),
];

/// The largest `num_train_timesteps` accepted (every SD model says 1000).
const MAX_TRAIN_TIMESTEPS: u64 = 100_000;

impl SchedulerConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let c = match crate::config::read_json(path)? {
            Value::Object(values) => Self { values },
            _ => bail!("{}: expected a JSON object", path.display()),
        };
        c.check().with_context(|| format!("{}", path.display()))?;
        Ok(c)
    }

    /// Every key the schedulers read holds its kind of value (or null, read as the
    /// scheduler's default, false for a flag, as diffusers' truth tests read None): a value of
    /// the wrong type is an error, not a silent default.
    pub fn check(&self) -> Result<()> {
        for (key, kind) in KEY_KINDS {
            let Some(v) = self.values.get(*key) else {
                continue;
            };
            let ok = match kind {
                _ if v.is_null() => true,
                Kind::Bool => v.is_boolean(),
                Kind::Number => crate::config::py_f64(v).is_some(),
                Kind::Count => v.as_u64().is_some(),
                Kind::Text => v.is_string(),
            };
            if !ok {
                let want = match kind {
                    Kind::Bool => "true or false",
                    Kind::Number => "a number",
                    Kind::Count => "a whole number >= 0",
                    Kind::Text => "a string",
                };
                bail!("scheduler config key {key} is {v}; expected {want}");
            }
        }
        let train = self
            .values
            .get("num_train_timesteps")
            .and_then(Value::as_u64);
        if train.is_some_and(|t| t == 0 || t > MAX_TRAIN_TIMESTEPS) {
            bail!(
                "scheduler config key num_train_timesteps is {}; expected 1 to {MAX_TRAIN_TIMESTEPS}",
                train.unwrap_or(0)
            );
        }
        Ok(())
    }

    /// What `StableDiffusionPipeline.__init__` does to the scheduler it is given, so that a
    /// config of 2022 (CompVis v1-4's) gives today's image: `steps_offset` becomes 1 (every
    /// scheduler here has the key, 0 by default) and `clip_sample` false where it is true or
    /// where the model's scheduler class defaults it to true. Command-line options come after.
    pub fn apply_pipeline_fixes(&mut self) {
        self.set("steps_offset", Value::from(1));
        let clips_by_default = matches!(self.class_name(), Some("DDIMScheduler" | "DDPMScheduler"));
        let clip = self.values.get("clip_sample");
        if clip == Some(&Value::Bool(true)) || (clip.is_none() && clips_by_default) {
            self.set("clip_sample", Value::Bool(false));
        }
    }

    pub fn class_name(&self) -> Option<&str> {
        self.values.get("_class_name").and_then(Value::as_str)
    }

    pub fn set(&mut self, key: &str, v: Value) {
        self.values.insert(key.to_string(), v);
    }

    pub fn f64_or(&self, key: &str, default: f64) -> f64 {
        self.values
            .get(key)
            .and_then(crate::config::py_f64)
            .unwrap_or(default)
    }

    pub fn usize_or(&self, key: &str, default: usize) -> usize {
        self.values
            .get(key)
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .unwrap_or(default)
    }

    /// A flag: null is false (diffusers passes the None on and tests its truth).
    pub fn bool_or(&self, key: &str, default: bool) -> bool {
        match self.values.get(key) {
            Some(Value::Null) => false,
            Some(v) => v.as_bool().unwrap_or(default),
            None => default,
        }
    }

    pub fn str_or<'a>(&'a self, key: &str, default: &'a str) -> &'a str {
        self.values
            .get(key)
            .and_then(Value::as_str)
            .unwrap_or(default)
    }

    pub fn prediction(&self) -> Result<Prediction> {
        match self.str_or("prediction_type", "epsilon") {
            "epsilon" => Ok(Prediction::Epsilon),
            "v_prediction" => Ok(Prediction::VPrediction),
            other => bail!("scheduler config: unsupported prediction_type={other} (supported: epsilon, v_prediction)"),
        }
    }

    pub fn spacing(&self, default: &str) -> Result<Spacing> {
        match self.str_or("timestep_spacing", default) {
            "leading" => Ok(Spacing::Leading),
            "linspace" => Ok(Spacing::Linspace),
            "trailing" => Ok(Spacing::Trailing),
            other => bail!("scheduler config: unsupported timestep_spacing={other} (supported: leading, linspace, trailing)"),
        }
    }

    pub fn train_timesteps(&self) -> usize {
        self.usize_or("num_train_timesteps", 1000)
    }

    /// `alphas_cumprod` as diffusers computes it: betas in float32, the running product
    /// accumulated in double (torch's CPU cumprod) and stored as float32.
    pub fn alphas_cumprod(&self) -> Result<Vec<f32>> {
        if self.bool_or("rescale_betas_zero_snr", false) {
            bail!("scheduler config: rescale_betas_zero_snr=true is not supported");
        }
        if self
            .values
            .get("trained_betas")
            .is_some_and(|v| !v.is_null())
        {
            bail!("scheduler config: trained_betas is not supported");
        }
        let n = self.train_timesteps();
        let start = self.f64_or("beta_start", 0.0001);
        let end = self.f64_or("beta_end", 0.02);
        let betas: Vec<f32> = match self.str_or("beta_schedule", "linear") {
            "linear" => linspace_f32(start as f32, end as f32, n),
            "scaled_linear" => linspace_f32(start.sqrt() as f32, end.sqrt() as f32, n)
                .into_iter()
                .map(|b| b * b)
                .collect(),
            "squaredcos_cap_v2" => {
                let alpha_bar = |t: f64| {
                    ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
                        .cos()
                        .powi(2)
                };
                (0..n)
                    .map(|i| {
                        let t1 = i as f64 / n as f64;
                        let t2 = (i + 1) as f64 / n as f64;
                        (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
                    })
                    .collect()
            }
            other => bail!("scheduler config: unsupported beta_schedule={other}"),
        };
        if let Some(b) = betas.iter().find(|b| !(0.0..1.0).contains(*b)) {
            bail!("scheduler config: beta_start={start} / beta_end={end} give a beta of {b}; betas must lie in [0, 1)");
        }
        let mut acc = 1f64;
        Ok(betas
            .iter()
            .map(|b| {
                acc *= (1.0f32 - b) as f64;
                acc as f32
            })
            .collect())
    }
}

/// `torch.linspace(start, end, n, dtype=float32)`: the first half counts up from start, the
/// second half down from end, as ATen's kernel does.
pub fn linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (n - 1 - i) as f32
            }
        })
        .collect()
}

/// Builds the scheduler named `name` (or the model's own when `None`) for `steps` steps.
pub fn build(
    name: Option<&str>,
    config: &SchedulerConfig,
    steps: usize,
) -> Result<(String, Box<dyn Scheduler>)> {
    let name = match name {
        Some(n) => {
            let (n, karras) = resolve_name(n)?;
            if karras && !config.bool_or("use_karras_sigmas", false) {
                let mut with = config.clone();
                with.set("use_karras_sigmas", Value::Bool(true));
                return build(Some(n), &with, steps);
            }
            n.to_string()
        }
        None => {
            let class = config.class_name().unwrap_or("PNDMScheduler");
            if class == "DPMSolverMultistepScheduler"
                && config.str_or("algorithm_type", "dpmsolver++") == "sde-dpmsolver++"
            {
                return build(Some("dpmpp_2m_sde"), config, steps);
            }
            name_for_class(class)
                .with_context(|| format!("the model's scheduler {class} is not supported; pick one with --scheduler ({})", known_names()))?
                .to_string()
        }
    };
    if steps == 0 {
        bail!("--steps must be at least 1");
    }
    config.check()?;
    let train = config.train_timesteps();
    if steps > train {
        // diffusers' set_timesteps refuses this too
        bail!("--steps {steps} is more than the scheduler's {train} training timesteps (num_train_timesteps)");
    }
    let sched: Box<dyn Scheduler> = match name.as_str() {
        "pndm" => Box::new(pndm::PndmScheduler::new(config, steps)?),
        "ddim" => Box::new(ddim::DdimScheduler::new(config, steps)?),
        "euler" => Box::new(euler::EulerScheduler::new(config, steps)?),
        "euler_a" => Box::new(euler_ancestral::EulerAncestralScheduler::new(
            config, steps,
        )?),
        "lms" => Box::new(lms::LmsScheduler::new(config, steps)?),
        "ddpm" => Box::new(ddpm::DdpmScheduler::new(config, steps)?),
        "heun" => Box::new(heun::HeunScheduler::new(config, steps)?),
        "dpm2" => Box::new(dpm2::Dpm2Scheduler::new(config, steps, false)?),
        "dpm2_a" => Box::new(dpm2::Dpm2Scheduler::new(config, steps, true)?),
        "dpmpp_2m" => Box::new(dpmpp_2m::DpmppMultistepScheduler::new(
            config, steps, false,
        )?),
        "dpmpp_2m_sde" => Box::new(dpmpp_2m::DpmppMultistepScheduler::new(config, steps, true)?),
        "dpmpp_2s" => Box::new(dpmpp_2s::DpmppSinglestepScheduler::new(config, steps)?),
        "dpmpp_sde" => Box::new(dpmpp_sde::DpmppSdeScheduler::new(config, steps)?),
        "deis" => Box::new(deis::DeisScheduler::new(config, steps)?),
        "unipc" => Box::new(unipc::UniPcScheduler::new(config, steps)?),
        other => bail!("unknown scheduler {other:?}; known: {}", known_names()),
    };
    Ok((name, sched))
}

/// Integer timesteps for DDIM/PNDM-style schedulers, descending, per `timestep_spacing`.
pub fn discrete_timesteps(
    spacing: Spacing,
    train: usize,
    steps: usize,
    offset: usize,
) -> Result<Vec<i64>> {
    if steps > train {
        bail!("--steps {steps} is more than the scheduler's {train} training timesteps");
    }
    let ts: Vec<i64> = match spacing {
        Spacing::Leading => {
            let ratio = train / steps;
            (0..steps)
                .rev()
                .map(|i| (i * ratio + offset) as i64)
                .collect()
        }
        Spacing::Linspace => {
            let step = (train - 1) as f64 / (steps - 1).max(1) as f64;
            (0..steps)
                .rev()
                .map(|i| round_half_even(i as f64 * step) as i64)
                .collect()
        }
        Spacing::Trailing => trailing_timesteps(train, steps)
            .into_iter()
            .map(|t| t as i64)
            .collect(),
    };
    if let Some(t) = ts.iter().find(|&&t| t < 0 || t as usize >= train) {
        // diffusers stops with an IndexError above the table (PNDM, --steps 1000, steps_offset
        // 1) and, at -1 (trailing spacing for 62 of the step counts up to 1000, 61 the first),
        // reads its last entry through Python's negative index: not reproduced
        bail!(
            "--steps {steps} with {spacing:?} timestep spacing and steps_offset {offset} reaches timestep {t}, outside the scheduler's {train} training timesteps; choose another number of steps"
        );
    }
    Ok(ts)
}

/// `np.round(np.arange(train, 0, -train / steps)) - 1`: the `trailing` spacing every
/// scheduler family shares, descending. numpy's `arange` as it computes it: the length
/// ceil((stop - start) / step), then start + i x delta with delta = (start + step) - start.
/// Subtracting the step again and again drifted: 1000 - 6 x 166.67 stayed above 0, a seventh
/// timestep -1 followed, and DDIM indexed its table at -1 (`--timestep-spacing trailing
/// --steps 3`, `6`, `24` panicked).
pub fn trailing_timesteps(train: usize, steps: usize) -> Vec<f64> {
    let start = train as f64;
    let step = -start / steps as f64;
    let delta = (start + step) - start;
    let len = ((0.0 - start) / step).ceil() as usize;
    (0..len)
        .map(|i| round_half_even(start + i as f64 * delta) - 1.0)
        .collect()
}

/// numpy's round: half to even.
pub fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 {
        2.0 * (x / 2.0).round()
    } else {
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// numpy's `np.round(np.arange(1000, 0, -1000 / steps)) - 1`, as printed by numpy 2.4.
    #[test]
    fn trailing_spacing_is_numpys() {
        let t = |steps| trailing_timesteps(1000, steps);
        assert_eq!(t(3), [999.0, 666.0, 332.0]);
        assert_eq!(t(6), [999.0, 832.0, 666.0, 499.0, 332.0, 166.0]);
        let t24 = t(24);
        assert_eq!(t24.len(), 24);
        assert_eq!(t24[..4], [999.0, 957.0, 916.0, 874.0]);
        assert_eq!(t24[21..], [124.0, 82.0, 41.0]);
        // numpy's own length: one more, ending at -1, for 61 steps
        let t61 = t(61);
        assert_eq!(t61.len(), 62);
        assert_eq!(t61[59..], [32.0, 15.0, -1.0]);
    }

    #[test]
    fn timesteps_outside_the_table_are_errors() {
        // PNDM's leading spacing with steps_offset 1 at 1000 steps reaches 1000
        let e = discrete_timesteps(Spacing::Leading, 1000, 1000, 1).unwrap_err();
        assert!(e.to_string().contains("reaches timestep 1000"), "{e}");
        let e = discrete_timesteps(Spacing::Trailing, 1000, 61, 0).unwrap_err();
        assert!(e.to_string().contains("reaches timestep -1"), "{e}");
        assert_eq!(
            discrete_timesteps(Spacing::Trailing, 1000, 6, 0).unwrap(),
            [999, 832, 666, 499, 332, 166]
        );
        assert_eq!(
            discrete_timesteps(Spacing::Leading, 1000, 1000, 0)
                .unwrap()
                .len(),
            1000
        );
    }
}
