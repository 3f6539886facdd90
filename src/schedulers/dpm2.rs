//! `KDPM2DiscreteScheduler` (DPM2) and `KDPM2AncestralDiscreteScheduler` (DPM2 a): a step to
//! the log-midpoint sigma, then a second evaluation there; N steps call the U-Net 2N - 1 times.
//! The ancestral variant steps to sigma_down and adds noise scaled by sigma_up.

use super::sigmas::{
    lerp_half, predict_original, scale_input, sigma_schedule, sigma_to_t, SigmaOptions,
};
use super::{NoiseLevel, NoiseSource, Prediction, Scheduler, SchedulerConfig};
use anyhow::Result;
use candle_core::Tensor;

pub struct Dpm2Scheduler {
    ancestral: bool,
    timesteps: Vec<f64>,
    /// Interleaved like diffusers: [x0, x1, x1, x2, x2, ..., xn, xn, xn].
    sigmas: Vec<f32>,
    sigmas_interpol: Vec<f32>,
    sigmas_up: Vec<f32>,
    sigmas_down: Vec<f32>,
    init_noise_sigma: f64,
    prediction: Prediction,
    first_sample: Option<Tensor>,
}

fn interleave(v: &[f32]) -> Vec<f32> {
    let mut out = vec![v[0]];
    for &x in &v[1..] {
        out.extend([x, x]);
    }
    out.push(*v.last().unwrap());
    out
}

impl Dpm2Scheduler {
    pub fn new(config: &SchedulerConfig, steps: usize, ancestral: bool) -> Result<Self> {
        let opts = SigmaOptions {
            karras_allowed: true,
            round_karras_timesteps: true,
            ..Default::default()
        };
        if config.str_or("final_sigmas_type", "zero") != "zero" {
            anyhow::bail!("scheduler config: final_sigmas_type is not supported by DPM2");
        }
        let s = sigma_schedule(config, steps, opts)?;
        let sigmas = &s.sigmas;
        let n = sigmas.len();
        let ln = |x: f32| x.ln();
        let (interpol, up, down): (Vec<f32>, Vec<f32>, Vec<f32>) = if ancestral {
            let next: Vec<f32> = (0..n)
                .map(|i| if i + 1 < n { sigmas[i + 1] } else { 0.0 })
                .collect();
            let up: Vec<f32> = (0..n)
                .map(|i| {
                    (next[i] * next[i] * (sigmas[i] * sigmas[i] - next[i] * next[i])
                        / (sigmas[i] * sigmas[i]))
                        .sqrt()
                })
                .collect();
            let mut down: Vec<f32> = (0..n)
                .map(|i| (next[i] * next[i] - up[i] * up[i]).sqrt())
                .collect();
            down[n - 1] = 0.0;
            let mut interpol: Vec<f32> = (0..n)
                .map(|i| lerp_half(ln(sigmas[i]), ln(down[i])).exp())
                .collect();
            interpol[n - 2] = 0.0;
            interpol[n - 1] = 0.0;
            (interpol, up, down)
        } else {
            let interpol = (0..n)
                .map(|i| {
                    let prev = sigmas[(i + n - 1) % n];
                    lerp_half(ln(sigmas[i]), ln(prev)).exp()
                })
                .collect();
            (interpol, vec![0.0; n], vec![0.0; n])
        };
        // timesteps: [t0, ti1, t1, ti2, t2, ...] with ti = sigma_to_t(interpolated sigma)
        let t_interpol: Vec<f64> = interpol
            .iter()
            .map(|&x| sigma_to_t(x as f64, &s.log_sigmas) as f32 as f64)
            .collect();
        let mut timesteps = vec![s.timesteps[0]];
        let offset = if ancestral { 0 } else { 1 };
        for (k, &t) in s.timesteps[1..].iter().enumerate() {
            timesteps.push(t_interpol[k + offset]);
            timesteps.push(t);
        }
        Ok(Self {
            ancestral,
            timesteps,
            sigmas: interleave(sigmas),
            sigmas_interpol: interleave(&interpol),
            sigmas_up: interleave(&up),
            sigmas_down: interleave(&down),
            init_noise_sigma: s.init_noise_sigma,
            prediction: config.prediction()?,
            first_sample: None,
        })
    }
}

impl Scheduler for Dpm2Scheduler {
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
        let sigma = if self.first_sample.is_none() {
            self.sigmas[step]
        } else if self.ancestral {
            self.sigmas_interpol[step - 1]
        } else {
            self.sigmas_interpol[step]
        };
        Ok(scale_input(sample, sigma)?)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step: usize,
        sample: &Tensor,
        noise: &mut NoiseSource,
    ) -> Result<Tensor> {
        let first_order = self.first_sample.is_none();
        let i = step;
        let (sigma, sigma_interpol, sigma_next, sigma_up, sigma_down) =
            match (first_order, self.ancestral) {
                (true, false) => (
                    self.sigmas[i],
                    self.sigmas_interpol[i + 1],
                    self.sigmas[i + 1],
                    0.0,
                    0.0,
                ),
                (false, false) => (
                    self.sigmas[i - 1],
                    self.sigmas_interpol[i],
                    self.sigmas[i],
                    0.0,
                    0.0,
                ),
                (true, true) => (
                    self.sigmas[i],
                    self.sigmas_interpol[i],
                    0.0,
                    self.sigmas_up[i],
                    0.0,
                ),
                (false, true) => (
                    self.sigmas[i - 1],
                    self.sigmas_interpol[i - 1],
                    0.0,
                    self.sigmas_up[i - 1],
                    self.sigmas_down[i - 1],
                ),
            };
        let sigma_input = if first_order { sigma } else { sigma_interpol };
        let pred_original = predict_original(self.prediction, sample, model_output, sigma_input)?;
        if first_order {
            let derivative = ((sample - pred_original)? / sigma as f64)?;
            let dt = sigma_interpol - sigma;
            self.first_sample = Some(sample.clone());
            return Ok((sample + (derivative * dt as f64)?)?);
        }
        let derivative = ((sample - pred_original)? / sigma_interpol as f64)?;
        let first = self.first_sample.take().expect("first-order sample");
        if self.ancestral {
            let dt = sigma_down - sigma;
            let prev = (first + (derivative * dt as f64)?)?;
            let z = noise.randn_like(model_output)?;
            Ok((prev + (z * sigma_up as f64)?)?)
        } else {
            let dt = sigma_next - sigma;
            Ok((first + (derivative * dt as f64)?)?)
        }
    }
}
