//! `DPMSolverMultistepScheduler` with `dpmsolver++` (DPM++ 2M) or `sde-dpmsolver++`
//! (DPM++ 2M SDE, fresh noise every step), solver order 1 or 2, midpoint or heun solver.

use super::sigmas::{interp, karras, sigma_to_t, training_sigmas};
use super::{round_half_even, NoiseSource, Prediction, Scheduler, SchedulerConfig, Spacing};
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
    prediction: Prediction,
    model_outputs: Vec<Tensor>,
    lower_order_nums: usize,
}

/// Timesteps of the DPM-Solver family (`linspace` over steps + 1 points, dropping the last;
/// `leading` over steps + 1 intervals), and sigmas (interpolated, or Karras over the whole
/// training range), with the final sigma appended. Shared by DPM++ 2M, DPM++ 2S, DEIS, UniPC.
pub fn dpm_schedule(config: &SchedulerConfig, steps: usize) -> Result<(Vec<f64>, Vec<f32>)> {
    let (base, log_sigmas) = training_sigmas(config)?;
    let train = base.len();
    if steps > train {
        bail!("--steps {steps} is more than the scheduler's {train} training timesteps");
    }
    if config.f64_or("lambda_min_clipped", f64::NEG_INFINITY) != f64::NEG_INFINITY {
        bail!("scheduler config: lambda_min_clipped is not supported");
    }
    let last = train;
    let offset = config.usize_or("steps_offset", 0) as i64;
    let mut timesteps: Vec<f64> = match config.spacing("linspace")? {
        Spacing::Linspace => {
            let step = (last - 1) as f64 / steps as f64;
            (1..=steps)
                .rev()
                .map(|i| {
                    round_half_even(if i == steps {
                        (last - 1) as f64
                    } else {
                        i as f64 * step
                    })
                })
                .collect()
        }
        Spacing::Leading => {
            let ratio = last / (steps + 1);
            (1..=steps)
                .rev()
                .map(|i| (i * ratio) as f64 + offset as f64)
                .collect()
        }
        Spacing::Trailing => {
            let ratio = train as f64 / steps as f64;
            let mut v = Vec::new();
            let mut x = last as f64;
            while x > 0.0 {
                v.push(round_half_even(x) - 1.0);
                x -= ratio;
            }
            v
        }
    };
    let base64: Vec<f64> = base.iter().map(|&s| s as f64).collect();
    let mut sigmas: Vec<f64> = if config.bool_or("use_karras_sigmas", false) {
        // diffusers flips the training sigmas: min = sigma(t=0), max = sigma(t=train-1)
        let s = karras(config, base64[0], base64[train - 1], steps);
        timesteps = s.iter().map(|&x| sigma_to_t(x, &log_sigmas)).collect();
        if config.str_or("beta_schedule", "linear") != "squaredcos_cap_v2" {
            timesteps = timesteps.iter().map(|&t| round_half_even(t)).collect();
        }
        s
    } else {
        timesteps.iter().map(|&t| interp(t, &base64)).collect()
    };
    let sigma_last = match config.str_or("final_sigmas_type", "zero") {
        "zero" => 0.0,
        "sigma_min" => base64[0],
        other => bail!("scheduler config: unsupported final_sigmas_type={other}"),
    };
    sigmas.push(sigma_last);
    // timesteps are int64 in diffusers
    let timesteps = timesteps.iter().map(|&t| t.trunc()).collect();
    Ok((timesteps, sigmas.iter().map(|&s| s as f32).collect()))
}

/// (alpha_t, sigma_t) of a VP sigma, float32 as diffusers computes them.
pub fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

pub fn lambda(sigma: f32) -> f32 {
    let (a, s) = alpha_sigma(sigma);
    a.ln() - s.ln()
}

impl DpmppMultistepScheduler {
    pub fn new(config: &SchedulerConfig, steps: usize, sde: bool) -> Result<Self> {
        let (timesteps, sigmas) = dpm_schedule(config, steps)?;
        let order = config.usize_or("solver_order", 2);
        if !(1..=2).contains(&order) {
            bail!("scheduler config: solver_order={order} is not supported (1 or 2)");
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

    fn first_order(
        &self,
        i: usize,
        m0: &Tensor,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (_, sigma_s) = alpha_sigma(self.sigmas[i]);
        let h = lambda(self.sigmas[i + 1]) - lambda(self.sigmas[i]);
        Ok(match noise {
            None => {
                ((sample * (sigma_t / sigma_s) as f64)?
                    - (m0 * (alpha_t * ((-h).exp() - 1.0)) as f64)?)?
            }
            Some(z) => {
                let x = ((sample * ((sigma_t / sigma_s) * (-h).exp()) as f64)?
                    + (m0 * (alpha_t * (1.0 - (-2.0 * h).exp())) as f64)?)?;
                (x + (z * (sigma_t * (1.0 - (-2.0 * h).exp()).sqrt()) as f64)?)?
            }
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

impl Scheduler for DpmppMultistepScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: &Tensor, _: usize) -> Result<Tensor> {
        Ok(sample.clone())
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
        // convert_model_output: the data prediction x0
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[step]);
        let x0 = match self.prediction {
            Prediction::Epsilon => ((sample - (model_output * sigma_t as f64)?)? / alpha_t as f64)?,
            Prediction::VPrediction => {
                ((sample * alpha_t as f64)? - (model_output * sigma_t as f64)?)?
            }
        };
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
            self.first_order(step, &x0, sample, z.as_ref())?
        } else {
            self.second_order(step, sample, z.as_ref())?
        };
        if self.lower_order_nums < self.order {
            self.lower_order_nums += 1;
        }
        Ok(prev)
    }
}
