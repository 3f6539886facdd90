//! `DPMSolverMultistepScheduler` with `dpmsolver++` (DPM++ 2M) or `sde-dpmsolver++`
//! (DPM++ 2M SDE, fresh noise every step), solver order 1, 2 or 3 (DPM++ 3M), midpoint or
//! heun solver (for order 2).

use super::dpm_common::{
    alpha_sigma, data_prediction, dpm_schedule, dpmpp_first_order, lambda, DpmScheduleKind,
};
use super::{NoiseLevel, NoiseSource, Scheduler, SchedulerConfig};
use anyhow::{bail, Result};
use candle_core::Tensor;

pub struct DpmppMultistepScheduler {
    sde: bool,
    heun: bool,
    order: usize,
    lower_order_final: bool,
    euler_at_final: bool,
    final_zero: bool,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    prediction: super::Prediction,
    model_outputs: Vec<Tensor>,
    lower_order_nums: usize,
}

impl DpmppMultistepScheduler {
    pub fn new(config: &SchedulerConfig, steps: usize, sde: bool) -> Result<Self> {
        let (timesteps, sigmas) = dpm_schedule(config, steps, DpmScheduleKind::Multistep)?;
        let order = config.usize_or("solver_order", 2);
        if !(1..=3).contains(&order) {
            bail!("scheduler config: solver_order={order} is not supported (1, 2 or 3)");
        }
        let heun = match config.str_or("solver_type", "midpoint") {
            "midpoint" | "logrho" | "bh1" | "bh2" => false,
            "heun" => true,
            other => bail!("scheduler config: unsupported solver_type={other}"),
        };
        if config.bool_or("thresholding", false) {
            bail!("scheduler config: thresholding=true is not supported");
        }
        let final_zero = config.str_or("final_sigmas_type", "zero") == "zero";
        Ok(Self {
            sde,
            heun,
            order,
            lower_order_final: config.bool_or("lower_order_final", true),
            euler_at_final: config.bool_or("euler_at_final", false),
            final_zero,
            timesteps,
            sigmas,
            prediction: config.prediction()?,
            model_outputs: Vec::new(),
            lower_order_nums: 0,
        })
    }

    fn second_order(&self, i: usize, sample: &Tensor, noise: Option<&Tensor>) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (_, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let (lt, ls0, ls1) = (
            lambda(self.sigmas[i + 1]),
            lambda(self.sigmas[i]),
            lambda(self.sigmas[i - 1]),
        );
        let n = self.model_outputs.len();
        let (m0, m1) = (&self.model_outputs[n - 1], &self.model_outputs[n - 2]);
        let (h, h0) = (lt - ls0, ls0 - ls1);
        let r0 = h0 / h;
        let d1 = ((m0 - m1)? * (1.0 / r0) as f64)?;
        Ok(match noise {
            None => {
                let e = (-h).exp() - 1.0;
                let x = ((sample * (sigma_t / sigma_s0) as f64)? - (m0 * (alpha_t * e) as f64)?)?;
                if self.heun {
                    (x + (d1 * (alpha_t * (e / h + 1.0)) as f64)?)?
                } else {
                    (x - (d1 * (0.5 * (alpha_t * e)) as f64)?)?
                }
            }
            Some(z) => {
                let e2 = 1.0 - (-2.0 * h).exp();
                let x = ((sample * ((sigma_t / sigma_s0) * (-h).exp()) as f64)?
                    + (m0 * (alpha_t * e2) as f64)?)?;
                let x = if self.heun {
                    (x + (d1 * (alpha_t * (e2 / (-2.0 * h) + 1.0)) as f64)?)?
                } else {
                    (x + (d1 * (0.5 * (alpha_t * e2)) as f64)?)?
                };
                (x + (z * (sigma_t * e2.sqrt()) as f64)?)?
            }
        })
    }
}

impl DpmppMultistepScheduler {
    /// `multistep_dpm_solver_third_order_update` of the `++` algorithms, in float32 scalars as
    /// diffusers computes them.
    fn third_order(&self, i: usize, sample: &Tensor, noise: Option<&Tensor>) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (_, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let (lt, ls0, ls1, ls2) = (
            lambda(self.sigmas[i + 1]),
            lambda(self.sigmas[i]),
            lambda(self.sigmas[i - 1]),
            lambda(self.sigmas[i - 2]),
        );
        let n = self.model_outputs.len();
        let (m0, m1, m2) = (
            &self.model_outputs[n - 1],
            &self.model_outputs[n - 2],
            &self.model_outputs[n - 3],
        );
        let (h, h0, h1) = (lt - ls0, ls0 - ls1, ls1 - ls2);
        let (r0, r1) = (h0 / h, h1 / h);
        let d1_0 = ((m0 - m1)? * (1.0 / r0) as f64)?;
        let d1_1 = ((m1 - m2)? * (1.0 / r1) as f64)?;
        let diff = (&d1_0 - &d1_1)?;
        let d1 = (&d1_0 + (&diff * (r0 / (r0 + r1)) as f64)?)?;
        let d2 = (diff * (1.0 / (r0 + r1)) as f64)?;
        Ok(match noise {
            None => {
                let e = (-h).exp() - 1.0;
                let x = ((sample * (sigma_t / sigma_s0) as f64)? - (m0 * (alpha_t * e) as f64)?)?;
                let x = (x + (d1 * (alpha_t * (e / h + 1.0)) as f64)?)?;
                (x - (d2 * (alpha_t * ((e + h) / (h * h) - 0.5)) as f64)?)?
            }
            Some(z) => {
                let e2 = 1.0 - (-2.0 * h).exp();
                let x = ((sample * (sigma_t / sigma_s0 * (-h).exp()) as f64)?
                    + (m0 * (alpha_t * e2) as f64)?)?;
                let x = (x + (d1 * (alpha_t * (e2 / (-2.0 * h) + 1.0)) as f64)?)?;
                let two_h = 2.0 * h;
                let x = (x + (d2 * (alpha_t * ((e2 - two_h) / (two_h * two_h) - 0.5)) as f64)?)?;
                (x + (z * (sigma_t * e2.sqrt()) as f64)?)?
            }
        })
    }
}

impl Scheduler for DpmppMultistepScheduler {
    fn noise_level(&self, begin: usize) -> NoiseLevel {
        NoiseLevel::AlphaSigma(self.sigmas[begin])
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
        let n = self.timesteps.len();
        let lower_order_final = step == n - 1
            && (self.euler_at_final || (self.lower_order_final && n < 15) || self.final_zero);
        let lower_order_second = step + 2 == n && self.lower_order_final && n < 15;
        let x0 = data_prediction(self.prediction, self.sigmas[step], model_output, sample)?;
        self.model_outputs.push(x0.clone());
        if self.model_outputs.len() > self.order {
            self.model_outputs.remove(0);
        }
        let z = if self.sde {
            Some(noise.randn_like(model_output)?)
        } else {
            None
        };
        let prev = if self.order == 1 || self.lower_order_nums < 1 || lower_order_final {
            dpmpp_first_order(
                self.sigmas[step],
                self.sigmas[step + 1],
                &x0,
                sample,
                z.as_ref(),
            )?
        } else if self.order == 2 || self.lower_order_nums < 2 || lower_order_second {
            self.second_order(step, sample, z.as_ref())?
        } else {
            self.third_order(step, sample, z.as_ref())?
        };
        if self.lower_order_nums < self.order {
            self.lower_order_nums += 1;
        }
        Ok(prev)
    }
}
