//! `DPMSolverSinglestepScheduler` (DPM++ 2S): each second-order step spends one U-Net call on
//! a first-order sub-step, following the `order_list` diffusers builds.

use super::dpm_common::{
    alpha_sigma, data_prediction, dpm_schedule, dpmpp_first_order, lambda, DpmScheduleKind,
};
use super::{NoiseLevel, NoiseSource, Prediction, Scheduler, SchedulerConfig};
use anyhow::{bail, Result};
use candle_core::Tensor;

pub struct DpmppSinglestepScheduler {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    orders: Vec<usize>,
    heun: bool,
    prediction: Prediction,
    /// The last two data predictions (oldest first).
    model_outputs: Vec<Option<Tensor>>,
    /// The sample at the start of the current two-stage step.
    sample: Option<Tensor>,
}

impl DpmppSinglestepScheduler {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let (timesteps, sigmas) = dpm_schedule(config, steps, DpmScheduleKind::Singlestep)?;
        let order = config.usize_or("solver_order", 2);
        if !(1..=2).contains(&order) {
            bail!("scheduler config: solver_order={order} is not supported (1 or 2)");
        }
        if !matches!(
            config.str_or("algorithm_type", "dpmsolver++"),
            "dpmsolver++"
        ) {
            bail!("scheduler config: DPM++ 2S supports algorithm_type=dpmsolver++ only");
        }
        let heun = config.str_or("solver_type", "midpoint") == "heun";
        let final_zero = config.str_or("final_sigmas_type", "zero") == "zero";
        // diffusers turns lower_order_final on for odd step counts and for a zero final sigma
        let lower_order_final =
            config.bool_or("lower_order_final", false) || steps % order != 0 || final_zero;
        let mut orders: Vec<usize> = match (order, lower_order_final) {
            (1, _) => vec![1; steps],
            (_, true) if steps % 2 == 0 => [1, 2]
                .repeat(steps / 2 - 1)
                .into_iter()
                .chain([1, 1])
                .collect(),
            (_, true) => [1, 2].repeat(steps / 2).into_iter().chain([1]).collect(),
            (_, false) => [1, 2].repeat(steps / 2),
        };
        if final_zero {
            *orders.last_mut().expect("at least one step") = 1;
        }
        Ok(Self {
            timesteps,
            sigmas,
            orders,
            heun,
            prediction: config.prediction()?,
            model_outputs: vec![None, None],
            sample: None,
        })
    }
}

impl Scheduler for DpmppSinglestepScheduler {
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
        let x0 = data_prediction(self.prediction, self.sigmas[i], model_output, sample)?;
        self.model_outputs.remove(0);
        self.model_outputs.push(Some(x0));
        let mut order = self.orders[i];
        while self.model_outputs[2 - order].is_none() {
            order -= 1;
        }
        if order == 1 {
            self.sample = Some(sample.clone());
        }
        let start = self.sample.clone().expect("first stage sample");
        let m0 = self.model_outputs[1].as_ref().expect("current output");
        if order == 1 {
            return dpmpp_first_order(self.sigmas[i], self.sigmas[i + 1], m0, &start, None);
        }
        let m1 = self.model_outputs[0].as_ref().expect("previous output");
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (_, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
        let (lt, ls0, ls1) = (
            lambda(self.sigmas[i + 1]),
            lambda(self.sigmas[i]),
            lambda(self.sigmas[i - 1]),
        );
        let (h, h0) = (lt - ls1, ls0 - ls1);
        let r0 = h0 / h;
        let d1 = ((m0 - m1)? * (1.0 / r0) as f64)?;
        let e = (-h).exp() - 1.0;
        let x = ((&start * (sigma_t / sigma_s1) as f64)? - (m1 * (alpha_t * e) as f64)?)?;
        Ok(if self.heun {
            (x + (d1 * (alpha_t * (e / h + 1.0)) as f64)?)?
        } else {
            (x - (d1 * (0.5 * (alpha_t * e)) as f64)?)?
        })
    }
}
