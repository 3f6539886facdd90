//! `EulerDiscreteScheduler` (s_churn = 0, the pipeline's default: deterministic).

use super::sigmas::{predict_original, scale_input, sigma_schedule, SigmaOptions, SigmaSchedule};
use super::{NoiseLevel, NoiseSource, Prediction, Scheduler, SchedulerConfig};
use anyhow::Result;
use candle_core::Tensor;

pub struct EulerScheduler {
    schedule: SigmaSchedule,
    prediction: Prediction,
}

impl EulerScheduler {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let opts = SigmaOptions {
            karras_allowed: true,
            final_sigma_allowed: true,
            ..Default::default()
        };
        Ok(Self {
            schedule: sigma_schedule(config, steps, opts)?,
            prediction: config.prediction()?,
        })
    }
}

impl Scheduler for EulerScheduler {
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
        _: &mut NoiseSource,
    ) -> Result<Tensor> {
        let sigma = self.schedule.sigmas[step];
        let pred_original = predict_original(self.prediction, sample, model_output, sigma)?;
        let derivative = ((sample - pred_original)? / sigma as f64)?;
        let dt = self.schedule.sigmas[step + 1] - sigma;
        Ok((sample + (derivative * dt as f64)?)?)
    }
}
