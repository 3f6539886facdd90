//! `EulerAncestralDiscreteScheduler`: an Euler step to sigma_down, then fresh noise scaled by
//! sigma_up, drawn from each image's generator at every step (the last one included).

use super::sigmas::{predict_original, scale_input, sigma_schedule, SigmaOptions, SigmaSchedule};
use super::{NoiseLevel, NoiseSource, Prediction, Scheduler, SchedulerConfig};
use anyhow::Result;
use candle_core::Tensor;

pub struct EulerAncestralScheduler {
    schedule: SigmaSchedule,
    prediction: Prediction,
}

impl EulerAncestralScheduler {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let opts = SigmaOptions {
            karras_allowed: false,
            final_sigma_allowed: false,
            ..Default::default()
        };
        Ok(Self {
            schedule: sigma_schedule(config, steps, opts)?,
            prediction: config.prediction()?,
        })
    }
}

impl Scheduler for EulerAncestralScheduler {
    fn noise_level(&self, begin: usize) -> NoiseLevel {
        NoiseLevel::Sigma(self.schedule.sigmas[begin])
    }

    fn timesteps(&self) -> &[f64] {
        &self.schedule.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.schedule.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, step: usize) -> Result<Tensor> {
        Ok(scale_input(sample, self.schedule.sigmas[step])?)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step: usize,
        sample: &Tensor,
        noise: &mut NoiseSource,
    ) -> Result<Tensor> {
        let sigma_from = self.schedule.sigmas[step];
        let sigma_to = self.schedule.sigmas[step + 1];
        let pred_original = predict_original(self.prediction, sample, model_output, sigma_from)?;
        let sigma_up = (sigma_to * sigma_to * (sigma_from * sigma_from - sigma_to * sigma_to)
            / (sigma_from * sigma_from))
            .sqrt();
        let sigma_down = (sigma_to * sigma_to - sigma_up * sigma_up).sqrt();
        let derivative = ((sample - pred_original)? / sigma_from as f64)?;
        let dt = sigma_down - sigma_from;
        let prev = (sample + (derivative * dt as f64)?)?;
        let z = noise.randn_like(model_output)?;
        Ok((prev + (z * sigma_up as f64)?)?)
    }
}
