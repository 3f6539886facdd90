//! `LMSDiscreteScheduler` (order 4). The coefficients are integrals of Lagrange polynomials of
//! degree < 4, which Gauss-Legendre quadrature with 4 nodes integrates exactly (diffusers uses
//! scipy's adaptive quadrature, exact for such polynomials too).

use super::sigmas::{predict_original, scale_input, sigma_schedule, SigmaOptions, SigmaSchedule};
use super::{NoiseLevel, NoiseSource, Prediction, Scheduler, SchedulerConfig};
use anyhow::Result;
use candle_core::Tensor;

const ORDER: usize = 4;

pub struct LmsScheduler {
    schedule: SigmaSchedule,
    prediction: Prediction,
    derivatives: Vec<Tensor>,
}

impl LmsScheduler {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let opts = SigmaOptions {
            karras_allowed: true,
            final_sigma_allowed: false,
            ..Default::default()
        };
        Ok(Self {
            schedule: sigma_schedule(config, steps, opts)?,
            prediction: config.prediction()?,
            derivatives: Vec::new(),
        })
    }

    fn lms_coefficient(&self, order: usize, t: usize, current: usize) -> f64 {
        let s = |i: usize| self.schedule.sigmas[i] as f64;
        let basis = |tau: f64| -> f64 {
            (0..order)
                .filter(|&k| k != current)
                .map(|k| (tau - s(t - k)) / (s(t - current) - s(t - k)))
                .product()
        };
        let (a, b) = (s(t), s(t + 1));
        const NODES: [(f64, f64); 4] = [
            (-0.861_136_311_594_052_6, 0.347_854_845_137_453_9),
            (-0.339_981_043_584_856_3, 0.652_145_154_862_546_1),
            (0.339_981_043_584_856_3, 0.652_145_154_862_546_1),
            (0.861_136_311_594_052_6, 0.347_854_845_137_453_9),
        ];
        let (mid, half) = ((a + b) / 2.0, (b - a) / 2.0);
        NODES
            .iter()
            .map(|(x, w)| w * basis(mid + half * x))
            .sum::<f64>()
            * half
    }
}

impl Scheduler for LmsScheduler {
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
        self.derivatives
            .push(((sample - pred_original)? / sigma as f64)?);
        if self.derivatives.len() > ORDER {
            self.derivatives.remove(0);
        }
        let order = (step + 1).min(ORDER);
        // diffusers: sample + sum(coeff * derivative for ...), the sum taken first.
        let mut sum: Option<Tensor> = None;
        for (current, derivative) in self.derivatives.iter().rev().enumerate().take(order) {
            let term = (derivative * self.lms_coefficient(order, step, current))?;
            sum = Some(match sum {
                None => term,
                Some(s) => (s + term)?,
            });
        }
        Ok((sample + sum.expect("at least one derivative"))?)
    }
}
