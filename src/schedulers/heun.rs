//! `HeunDiscreteScheduler`: Heun's second-order method; N steps call the U-Net 2N - 1 times.

use super::sigmas::{predict_original, repeat_inner, scale_input, sigma_schedule, SigmaOptions};
use super::{NoiseLevel, NoiseSource, Prediction, Scheduler, SchedulerConfig};
use anyhow::Result;
use candle_core::Tensor;

pub struct HeunScheduler {
    timesteps: Vec<f64>,
    /// [s0, s1, s1, s2, s2, ..., 0] as diffusers interleaves them.
    sigmas: Vec<f32>,
    init_noise_sigma: f64,
    prediction: Prediction,
    clip_sample: Option<f64>,
    /// (derivative, dt, sample) of the first-order half of the current step.
    first: Option<(Tensor, f32, Tensor)>,
}

impl HeunScheduler {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let opts = SigmaOptions {
            karras_allowed: true,
            ..Default::default()
        };
        let s = sigma_schedule(config, steps, opts)?;
        let sigmas = repeat_inner(&s.sigmas);
        let mut timesteps = vec![s.timesteps[0]];
        for &t in &s.timesteps[1..] {
            timesteps.extend([t, t]);
        }
        Ok(Self {
            timesteps,
            sigmas,
            init_noise_sigma: s.init_noise_sigma,
            prediction: config.prediction()?,
            clip_sample: config
                .bool_or("clip_sample", false)
                .then(|| config.f64_or("clip_sample_range", 1.0)),
            first: None,
        })
    }
}

impl Scheduler for HeunScheduler {
    fn order(&self) -> usize {
        2
    }

    fn noise_level(&self, begin: usize) -> NoiseLevel {
        NoiseLevel::Sigma(self.sigmas[begin])
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, step: usize) -> Result<Tensor> {
        Ok(scale_input(sample, self.sigmas[step])?)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step: usize,
        sample: &Tensor,
        _: &mut NoiseSource,
    ) -> Result<Tensor> {
        let first_order = self.first.is_none();
        let (sigma, sigma_next) = if first_order {
            (self.sigmas[step], self.sigmas[step + 1])
        } else {
            (self.sigmas[step - 1], self.sigmas[step])
        };
        let sigma_input = if first_order { sigma } else { sigma_next };
        let mut pred_original =
            predict_original(self.prediction, sample, model_output, sigma_input)?;
        if let Some(r) = self.clip_sample {
            pred_original = pred_original.clamp(-r, r)?;
        }
        let (prev_sample, derivative, dt) = match self.first.take() {
            None => {
                let derivative = ((sample - &pred_original)? / sigma as f64)?;
                let dt = sigma_next - sigma;
                self.first = Some((derivative.clone(), dt, sample.clone()));
                (sample.clone(), derivative, dt)
            }
            Some((prev_derivative, dt, first_sample)) => {
                let derivative = ((sample - &pred_original)? / sigma_next as f64)?;
                let derivative = ((prev_derivative + derivative)? / 2.0)?;
                (first_sample, derivative, dt)
            }
        };
        Ok((prev_sample + (derivative * dt as f64)?)?)
    }
}
