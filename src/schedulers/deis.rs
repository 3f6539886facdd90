//! `DEISMultistepScheduler` (algorithm "deis", solver "logrho"), order 1, 2 or 3.

use super::dpm_common::{alpha_sigma, data_prediction, dpm_schedule, lambda, DpmScheduleKind};
use super::{NoiseLevel, NoiseSource, Prediction, Scheduler, SchedulerConfig};
use anyhow::{bail, Result};
use candle_core::Tensor;

pub struct DeisScheduler {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    order: usize,
    lower_order_final: bool,
    prediction: Prediction,
    /// Noise predictions of the last steps (oldest first).
    model_outputs: Vec<Tensor>,
    lower_order_nums: usize,
}

impl DeisScheduler {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let (timesteps, sigmas) = dpm_schedule(config, steps, DpmScheduleKind::Deis)?;
        let order = config.usize_or("solver_order", 2);
        if !(1..=3).contains(&order) {
            bail!("scheduler config: solver_order={order} is not supported (1, 2 or 3)");
        }
        Ok(Self {
            timesteps,
            sigmas,
            order,
            lower_order_final: config.bool_or("lower_order_final", true),
            prediction: config.prediction()?,
            model_outputs: Vec::new(),
            lower_order_nums: 0,
        })
    }
}

impl Scheduler for DeisScheduler {
    fn noise_level(&self, begin: usize) -> NoiseLevel {
        NoiseLevel::AlphaSigma(self.sigmas[begin])
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        _: &mut NoiseSource,
    ) -> Result<Tensor> {
        let n = self.timesteps.len();
        let lower_order_final = i == n - 1 && self.lower_order_final && n < 15;
        let lower_order_second = i + 2 == n && self.lower_order_final && n < 15;
        // convert_model_output: x0, then back to the noise it implies
        let (alpha_s, sigma_s) = alpha_sigma(self.sigmas[i]);
        let x0 = data_prediction(self.prediction, self.sigmas[i], model_output, sample)?;
        let eps = ((sample - (x0 * alpha_s as f64)?)? / sigma_s as f64)?;
        self.model_outputs.push(eps);
        if self.model_outputs.len() > self.order {
            self.model_outputs.remove(0);
        }
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let k = self.model_outputs.len();
        let m0 = &self.model_outputs[k - 1];
        let prev = if self.order == 1 || self.lower_order_nums < 1 || lower_order_final {
            let h = lambda(self.sigmas[i + 1]) - lambda(self.sigmas[i]);
            ((sample * (alpha_t / alpha_s) as f64)? - (m0 * (sigma_t * (h.exp() - 1.0)) as f64)?)?
        } else if self.order == 2 || self.lower_order_nums < 2 || lower_order_second {
            let m1 = &self.model_outputs[k - 2];
            let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
            let (rho_t, rho_s0, rho_s1) =
                (sigma_t / alpha_t, sigma_s / alpha_s, sigma_s1 / alpha_s1);
            let ind = |t: f32, b: f32, c: f32| t * (-c.ln() + t.ln() - 1.0) / (b.ln() - c.ln());
            let coef1 = ind(rho_t, rho_s0, rho_s1) - ind(rho_s0, rho_s0, rho_s1);
            let coef2 = ind(rho_t, rho_s1, rho_s0) - ind(rho_s0, rho_s1, rho_s0);
            let inner =
                (((sample / alpha_s as f64)? + (m0 * coef1 as f64)?)? + (m1 * coef2 as f64)?)?;
            (inner * alpha_t as f64)?
        } else {
            // multistep_deis_third_order_update, float32 scalars as numpy computes them there
            let (m1, m2) = (&self.model_outputs[k - 2], &self.model_outputs[k - 3]);
            let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
            let (alpha_s2, sigma_s2) = alpha_sigma(self.sigmas[i - 2]);
            let (rho_t, rho_s0, rho_s1, rho_s2) = (
                sigma_t / alpha_t,
                sigma_s / alpha_s,
                sigma_s1 / alpha_s1,
                sigma_s2 / alpha_s2,
            );
            // the integral of the Lagrange basis polynomial through b (zero at c and d)
            let ind = |t: f32, b: f32, c: f32, d: f32| {
                let (lt, lb, lc, ld) = (t.ln(), b.ln(), c.ln(), d.ln());
                let numerator =
                    t * (lc * (ld - lt + 1.0) - ld * lt + ld + lt.powi(2) - 2.0 * lt + 2.0);
                numerator / ((lb - lc) * (lb - ld))
            };
            let coef1 = ind(rho_t, rho_s0, rho_s1, rho_s2) - ind(rho_s0, rho_s0, rho_s1, rho_s2);
            let coef2 = ind(rho_t, rho_s1, rho_s2, rho_s0) - ind(rho_s0, rho_s1, rho_s2, rho_s0);
            let coef3 = ind(rho_t, rho_s2, rho_s0, rho_s1) - ind(rho_s0, rho_s2, rho_s0, rho_s1);
            let inner =
                (((sample / alpha_s as f64)? + (m0 * coef1 as f64)?)? + (m1 * coef2 as f64)?)?;
            ((inner + (m2 * coef3 as f64)?)? * alpha_t as f64)?
        };
        if self.lower_order_nums < self.order {
            self.lower_order_nums += 1;
        }
        Ok(prev)
    }
}
