//! `DDPMScheduler`: ancestral sampling with fresh noise at every step but the last.

use super::{discrete_timesteps, NoiseLevel, NoiseSource, Prediction, Scheduler, SchedulerConfig};
use anyhow::{bail, Result};
use candle_core::Tensor;

#[derive(Clone, Copy, PartialEq)]
enum Variance {
    FixedSmall,
    FixedSmallLog,
    FixedLarge,
}

pub struct DdpmScheduler {
    alphas_cumprod: Vec<f32>,
    timesteps: Vec<f64>,
    prediction: Prediction,
    clip_sample: Option<f64>,
    variance: Variance,
}

impl DdpmScheduler {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let alphas_cumprod = config.alphas_cumprod()?;
        let train = alphas_cumprod.len();
        let spacing = config.spacing("leading")?;
        let offset = config.usize_or("steps_offset", 0);
        let timesteps = discrete_timesteps(spacing, train, steps, offset)?;
        if config.bool_or("thresholding", false) {
            bail!("scheduler config: thresholding=true is not supported");
        }
        let variance = match config.str_or("variance_type", "fixed_small") {
            "fixed_small" => Variance::FixedSmall,
            "fixed_small_log" => Variance::FixedSmallLog,
            "fixed_large" => Variance::FixedLarge,
            other => bail!("scheduler config: unsupported variance_type={other}"),
        };
        Ok(Self {
            alphas_cumprod,
            timesteps: timesteps.iter().map(|&t| t as f64).collect(),
            prediction: config.prediction()?,
            clip_sample: config
                .bool_or("clip_sample", true)
                .then(|| config.f64_or("clip_sample_range", 1.0)),
            variance,
        })
    }
}

impl Scheduler for DdpmScheduler {
    fn noise_level(&self, begin: usize) -> NoiseLevel {
        NoiseLevel::AlphasCumprod(self.alphas_cumprod[self.timesteps[begin] as usize])
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step: usize,
        sample: &Tensor,
        noise: &mut NoiseSource,
    ) -> Result<Tensor> {
        let t = self.timesteps[step] as usize;
        let a_t = self.alphas_cumprod[t];
        let a_prev = match self.timesteps.get(step + 1) {
            Some(&p) => self.alphas_cumprod[p as usize],
            None => 1.0,
        };
        let b_t = 1.0 - a_t;
        let b_prev = 1.0 - a_prev;
        let current_alpha = a_t / a_prev;
        let current_beta = 1.0 - current_alpha;
        let mut pred_original = match self.prediction {
            Prediction::Epsilon => {
                ((sample - (model_output * b_t.sqrt() as f64)?)? / a_t.sqrt() as f64)?
            }
            Prediction::VPrediction => {
                ((sample * a_t.sqrt() as f64)? - (model_output * b_t.sqrt() as f64)?)?
            }
        };
        if let Some(r) = self.clip_sample {
            pred_original = pred_original.clamp(-r, r)?;
        }
        let original_coeff = a_prev.sqrt() * current_beta / b_t;
        let sample_coeff = current_alpha.sqrt() * b_prev / b_t;
        let mut prev =
            ((pred_original * original_coeff as f64)? + (sample * sample_coeff as f64)?)?;
        if t > 0 {
            let z = noise.randn_like(model_output)?;
            let variance = (b_prev / b_t * current_beta).max(1e-20);
            let std = match self.variance {
                Variance::FixedSmall => variance.sqrt(),
                Variance::FixedSmallLog => (0.5 * variance.ln()).exp(),
                Variance::FixedLarge => current_beta.sqrt(),
            };
            prev = (prev + (z * std as f64)?)?;
        }
        Ok(prev)
    }
}
