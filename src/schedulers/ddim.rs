//! `DDIMScheduler` with eta = 0 (the pipeline's default), `set_alpha_to_one`, `clip_sample`.

use super::{discrete_timesteps, NoiseLevel, NoiseSource, Prediction, Scheduler, SchedulerConfig};
use anyhow::Result;
use candle_core::Tensor;

pub struct DdimScheduler {
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    timesteps: Vec<f64>,
    step_ratio: i64,
    prediction: Prediction,
    clip_sample: Option<f64>,
}

impl DdimScheduler {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let alphas_cumprod = config.alphas_cumprod()?;
        let train = alphas_cumprod.len();
        let spacing = config.spacing("leading")?;
        let offset = config.usize_or("steps_offset", 0);
        let timesteps = discrete_timesteps(spacing, train, steps, offset)?;
        let final_alpha_cumprod = if config.bool_or("set_alpha_to_one", true) {
            1.0
        } else {
            alphas_cumprod[0]
        };
        if config.bool_or("thresholding", false) {
            anyhow::bail!("scheduler config: thresholding=true is not supported");
        }
        let clip_sample = config
            .bool_or("clip_sample", true)
            .then(|| config.f64_or("clip_sample_range", 1.0));
        Ok(Self {
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps: timesteps.iter().map(|&t| t as f64).collect(),
            step_ratio: (train / steps) as i64,
            prediction: config.prediction()?,
            clip_sample,
        })
    }
}

impl Scheduler for DdimScheduler {
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
        _: &mut NoiseSource,
    ) -> Result<Tensor> {
        let t = self.timesteps[step] as i64;
        let prev_t = t - self.step_ratio;
        let alpha_t = self.alphas_cumprod[t as usize];
        let alpha_prev = if prev_t >= 0 {
            self.alphas_cumprod[prev_t as usize]
        } else {
            self.final_alpha_cumprod
        };
        let beta_t = 1.0 - alpha_t;
        let (sqrt_a, sqrt_b) = (alpha_t.sqrt() as f64, beta_t.sqrt() as f64);
        let (mut pred_original, pred_epsilon) = match self.prediction {
            Prediction::Epsilon => (
                ((sample - (model_output * sqrt_b)?)? / sqrt_a)?,
                model_output.clone(),
            ),
            Prediction::VPrediction => (
                ((sample * sqrt_a)? - (model_output * sqrt_b)?)?,
                ((model_output * sqrt_a)? + (sample * sqrt_b)?)?,
            ),
        };
        if let Some(r) = self.clip_sample {
            pred_original = pred_original.clamp(-r, r)?;
        }
        let direction = (pred_epsilon * (1.0 - alpha_prev).sqrt() as f64)?;
        Ok(((pred_original * alpha_prev.sqrt() as f64)? + direction)?)
    }
}
