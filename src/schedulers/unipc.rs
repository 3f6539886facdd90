//! `UniPCMultistepScheduler` (predict_x0, bh2), order 1 or 2: each step first corrects the
//! previous prediction with the new model output (UniC), then predicts ahead (UniP).

use super::dpm_common::{alpha_sigma, data_prediction, dpm_schedule, lambda, DpmScheduleKind};
use super::{NoiseSource, Prediction, Scheduler, SchedulerConfig};
use anyhow::{bail, Result};
use candle_core::Tensor;

pub struct UniPcScheduler {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    order: usize,
    lower_order_final: bool,
    bh2: bool,
    disable_corrector: Vec<usize>,
    prediction: Prediction,
    /// Data predictions of the last steps (oldest first).
    model_outputs: Vec<Tensor>,
    lower_order_nums: usize,
    last_sample: Option<Tensor>,
    this_order: usize,
}

impl UniPcScheduler {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let (timesteps, sigmas) = dpm_schedule(config, steps, DpmScheduleKind::UniPc)?;
        let order = config.usize_or("solver_order", 2);
        if !(1..=2).contains(&order) {
            bail!("scheduler config: solver_order={order} is not supported (1 or 2)");
        }
        if !config.bool_or("predict_x0", true) {
            bail!("scheduler config: predict_x0=false is not supported");
        }
        if config.values.get("solver_p").is_some_and(|v| !v.is_null()) {
            bail!("scheduler config: solver_p is not supported");
        }
        let bh2 = match config.str_or("solver_type", "bh2") {
            "bh2" => true,
            "bh1" => false,
            other => bail!("scheduler config: unsupported solver_type={other} (bh1, bh2)"),
        };
        let disable_corrector = config
            .values
            .get("disable_corrector")
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_u64())
                    .map(|x| x as usize)
                    .collect()
            })
            .unwrap_or_default();
        Ok(Self {
            timesteps,
            sigmas,
            order,
            lower_order_final: config.bool_or("lower_order_final", true),
            bh2,
            disable_corrector,
            prediction: config.prediction()?,
            model_outputs: Vec::new(),
            lower_order_nums: 0,
            last_sample: None,
            this_order: 1,
        })
    }

    /// (h, h_phi_1, B_h, [b_1, ..., b_order]) for the step from sigma_s0 to sigma_t.
    fn coefficients(&self, sigma_s0: f32, sigma_t: f32, order: usize) -> (f32, f32, f32, Vec<f32>) {
        let h = lambda(sigma_t) - lambda(sigma_s0);
        let hh = -h;
        let h_phi_1 = hh.exp_m1();
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let b_h = if self.bh2 { hh.exp_m1() } else { hh };
        let mut factorial = 1.0f32;
        let mut b = Vec::new();
        for i in 1..=order {
            b.push(h_phi_k * factorial / b_h);
            factorial *= (i + 1) as f32;
            h_phi_k = h_phi_k / hh - 1.0 / factorial;
        }
        (h, h_phi_1, b_h, b)
    }

    /// `multistep_uni_p_bh_update`: the prediction from sigmas[i] to sigmas[i + 1].
    fn predict(&self, i: usize, sample: &Tensor, order: usize) -> Result<Tensor> {
        let k = self.model_outputs.len();
        let m0 = &self.model_outputs[k - 1];
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (_, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let (h, h_phi_1, b_h, _) = self.coefficients(self.sigmas[i], self.sigmas[i + 1], order);
        let x = ((sample * (sigma_t / sigma_s0) as f64)? - (m0 * (alpha_t * h_phi_1) as f64)?)?;
        if order == 1 {
            return Ok(x);
        }
        let rk = (lambda(self.sigmas[i - 1]) - lambda(self.sigmas[i])) / h;
        let d1 = ((&self.model_outputs[k - 2] - m0)? / rk as f64)?;
        let pred_res = (d1 * 0.5)?;
        Ok((x - (pred_res * (alpha_t * b_h) as f64)?)?)
    }

    /// `multistep_uni_c_bh_update`: corrects the sample at sigmas[i] with the new output.
    fn correct(
        &self,
        i: usize,
        model_t: &Tensor,
        last_sample: &Tensor,
        order: usize,
    ) -> Result<Tensor> {
        let k = self.model_outputs.len();
        let m0 = &self.model_outputs[k - 1];
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i]);
        let (_, sigma_s0) = alpha_sigma(self.sigmas[i - 1]);
        let (h, h_phi_1, b_h, b) = self.coefficients(self.sigmas[i - 1], self.sigmas[i], order);
        let x =
            ((last_sample * (sigma_t / sigma_s0) as f64)? - (m0 * (alpha_t * h_phi_1) as f64)?)?;
        let d1_t = (model_t - m0)?;
        let (corr_res, rho_last) = if order == 1 {
            (None, 0.5f32)
        } else {
            // solve [[1, 1], [rk, 1]] rho = b
            let rk = (lambda(self.sigmas[i - 2]) - lambda(self.sigmas[i - 1])) / h;
            let (b1, b2) = (b[0] as f64, b[1] as f64);
            let rk64 = rk as f64;
            let rho0 = (b1 - b2) / (1.0 - rk64);
            let rho1 = b1 - rho0;
            let d1 = ((&self.model_outputs[k - 2] - m0)? / rk as f64)?;
            (Some((d1 * rho0 as f32 as f64)?), rho1 as f32)
        };
        let inner = match corr_res {
            Some(c) => (c + (d1_t * rho_last as f64)?)?,
            None => (d1_t * rho_last as f64)?,
        };
        Ok((x - (inner * (alpha_t * b_h) as f64)?)?)
    }
}

impl Scheduler for UniPcScheduler {
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
        let use_corrector = i > 0 && !self.disable_corrector.contains(&(i - 1));
        let sample = match (&self.last_sample, use_corrector) {
            (Some(last), true) => self.correct(i, &x0, last, self.this_order)?,
            _ => sample.clone(),
        };
        self.model_outputs.push(x0);
        if self.model_outputs.len() > self.order {
            self.model_outputs.remove(0);
        }
        let n = self.timesteps.len();
        let this_order = if self.lower_order_final {
            self.order.min(n - i)
        } else {
            self.order
        };
        self.this_order = this_order.min(self.lower_order_nums + 1);
        self.last_sample = Some(sample.clone());
        let prev = self.predict(i, &sample, self.this_order)?;
        if self.lower_order_nums < self.order {
            self.lower_order_nums += 1;
        }
        Ok(prev)
    }
}
