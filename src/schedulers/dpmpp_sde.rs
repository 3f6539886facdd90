//! `DPMSolverSDEScheduler` (the web UI's "DPM++ SDE"): DPM-Solver++(2S) with SDE noise, each
//! step a first-order half to the midpoint (in log-sigma) and a second-order completion, both
//! adding Brownian noise; N steps call the U-Net 2N - 1 times.
//!
//! The noise is torchsde's Brownian tree ([`super::brownian_tree`]) over [smallest positive
//! sigma, largest sigma], one per image, seeded with the image's seed, as the web UI seeds it
//! and as diffusers does with `noise_sampler_seed=seed` (a `noise_sampler_seed` in the
//! scheduler config wins, as in diffusers). Scalars are f32 as diffusers keeps them (0-d f32
//! tensors).

use super::brownian_tree::BrownianTree;
use super::sigmas::{
    predict_original, repeat_inner, scale_input, sigma_schedule, sigma_to_t, SigmaOptions,
};
use super::{NoiseLevel, NoiseSource, Prediction, Scheduler, SchedulerConfig};
use anyhow::{bail, Result};
use candle_core::Tensor;

pub struct DpmppSdeScheduler {
    /// [t0, mid0, t1, mid1, ..., t_{n-1}]: each step's timestep, then its midpoint's.
    timesteps: Vec<f64>,
    /// [s0, s1, s1, s2, s2, ..., 0] as diffusers interleaves them.
    sigmas: Vec<f32>,
    init_noise_sigma: f64,
    prediction: Prediction,
    seed: Option<u64>,
    /// (sample, midpoint sigma) of the first-order half of the current step.
    first: Option<(Tensor, f32)>,
    trees: Vec<BrownianTree>,
}

/// `sigma_fn` and `t_fn`: t = -ln(sigma), each rounded once to f32 (torch's f32 exp and log
/// are correctly rounded here, where libm's f32 ones can be an ulp off, and an ulp can move
/// a Brownian-tree query across a rounding boundary of its 1e-6 grid).
fn sigma_of(t: f32) -> f32 {
    (-(t as f64)).exp() as f32
}

fn t_of(sigma: f32) -> f32 {
    -(sigma as f64).ln() as f32
}

impl DpmppSdeScheduler {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let opts = SigmaOptions {
            karras_allowed: true,
            ..Default::default()
        };
        let s = sigma_schedule(config, steps, opts)?;
        let n = s.sigmas.len();
        let sigmas = repeat_inner(&s.sigmas);
        // the midpoints' timesteps, from the sigmas in f64 as numpy has them
        let t: Vec<f64> = s.sigmas[..n - 1]
            .iter()
            .map(|&x| -(x as f64).ln())
            .collect();
        let mut timesteps = vec![s.timesteps[0]];
        for i in 1..t.len() {
            let mid = (-(t[i - 1] + (t[i] - t[i - 1]) * 0.5)).exp();
            timesteps.push(sigma_to_t(mid, &s.log_sigmas));
            timesteps.push(s.timesteps[i]);
        }
        Ok(Self {
            timesteps,
            sigmas,
            init_noise_sigma: s.init_noise_sigma,
            prediction: config.prediction()?,
            seed: config
                .values
                .get("noise_sampler_seed")
                .and_then(|v| v.as_u64()),
            first: None,
            trees: Vec::new(),
        })
    }

    /// The Brownian noise of each image between sigmas `a` > `b`, scaled to unit variance.
    fn noise(&self, a: f32, b: f32, like: &Tensor) -> Result<Tensor> {
        let scale = (b - a).abs().sqrt();
        let mut data = Vec::with_capacity(like.elem_count());
        for tree in &self.trees {
            // diffusers sorts the pair, and the sign of the reversed order makes -W
            let w = tree.increment(b as f64, a as f64);
            data.extend(w.into_iter().map(|v| v * -1.0 / scale));
        }
        Ok(Tensor::from_vec(data, like.dims(), like.device())?.to_dtype(like.dtype())?)
    }
}

impl Scheduler for DpmppSdeScheduler {
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
        let sigma = match &self.first {
            None => self.sigmas[step],
            Some((_, mid)) => *mid,
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
        if self.trees.is_empty() {
            let positive = self.sigmas.iter().filter(|&&s| s > 0.0);
            let min = positive.clone().fold(f32::MAX, |a, &b| a.min(b));
            let max = self.sigmas.iter().fold(f32::MIN, |a, &b| a.max(b));
            let per_image = sample.elem_count() / sample.dim(0)?;
            if noise.seeds.len() != sample.dim(0)? {
                bail!(
                    "batch of {} but {} seeds",
                    sample.dim(0)?,
                    noise.seeds.len()
                );
            }
            self.trees = noise
                .seeds
                .iter()
                .map(|&s| {
                    let seed = self.seed.unwrap_or(s);
                    BrownianTree::new(min as f64, max as f64, per_image, seed, noise.rng)
                })
                .collect();
        }
        let first_order = self.first.is_none();
        let (sigma, sigma_next) = if first_order {
            (self.sigmas[step], self.sigmas[step + 1])
        } else {
            (self.sigmas[step - 1], self.sigmas[step])
        };
        let t = t_of(sigma);
        let t_next = t_of(sigma_next);
        let t_proposed = t + (t_next - t) * 0.5;
        let sigma_input = if first_order {
            sigma
        } else {
            sigma_of(t_proposed)
        };
        let pred_original = predict_original(self.prediction, sample, model_output, sigma_input)?;
        if sigma_next == 0.0 {
            let derivative = ((sample - &pred_original)? / sigma as f64)?;
            return Ok((sample + (derivative * (sigma_next - sigma) as f64)?)?);
        }
        let (t_next, x) = match self.first.take() {
            None => (t_proposed, sample.clone()),
            Some((x, _)) => (t_next, x),
        };
        let sigma_from = sigma_of(t);
        let sigma_to = sigma_of(t_next);
        let sigma_up = sigma_to.min(
            (sigma_to * sigma_to * (sigma_from * sigma_from - sigma_to * sigma_to)
                / (sigma_from * sigma_from))
                .sqrt(),
        );
        let sigma_down = (sigma_to * sigma_to - sigma_up * sigma_up).sqrt();
        let ancestral_t = t_of(sigma_down);
        let ratio = sigma_of(ancestral_t) / sigma_of(t);
        let prev = ((&x * ratio as f64)? - (&pred_original * (t - ancestral_t).exp_m1() as f64)?)?;
        let w = self.noise(sigma_of(t), sigma_of(t_next), &prev)?;
        let prev = (prev + (w * sigma_up as f64)?)?;
        if first_order {
            self.first = Some((x, sigma_of(t_next)));
        }
        Ok(prev)
    }
}
