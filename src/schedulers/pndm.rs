//! `PNDMScheduler`: Runge-Kutta warm-up steps (unless `skip_prk_steps`) then linear multistep
//! (PLMS). With `skip_prk_steps` (every SD 1.x config) N steps call the U-Net N+1 times.

use super::{discrete_timesteps, NoiseLevel, NoiseSource, Prediction, Scheduler, SchedulerConfig};
use anyhow::Result;
use candle_core::Tensor;

pub struct PndmScheduler {
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    prk_timesteps: Vec<i64>,
    timesteps: Vec<f64>,
    step_ratio: i64,
    prediction: Prediction,
    skip_prk_steps: bool,
    counter: usize,
    ets: Vec<Tensor>,
    cur_sample: Option<Tensor>,
    cur_model_output: Option<Tensor>,
}

impl PndmScheduler {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let alphas_cumprod = config.alphas_cumprod()?;
        let train = alphas_cumprod.len();
        let spacing = config.spacing("leading")?;
        let offset = config.usize_or("steps_offset", 0);
        // ascending, as diffusers' `_timesteps`
        let mut base = discrete_timesteps(spacing, train, steps, offset)?;
        base.reverse();
        let skip_prk_steps = config.bool_or("skip_prk_steps", false);
        let step_ratio = (train / steps) as i64;
        let (prk, plms): (Vec<i64>, Vec<i64>) = if skip_prk_steps {
            let n = base.len();
            let mut plms: Vec<i64> = base[..n - 1].to_vec();
            if n >= 2 {
                plms.push(base[n - 2]);
            }
            plms.push(base[n - 1]);
            plms.reverse();
            (Vec::new(), plms)
        } else {
            if base.len() < 3 {
                anyhow::bail!("the PNDM scheduler with Runge-Kutta steps needs at least 3 steps (or skip_prk_steps=true)");
            }
            let order = 4.min(base.len());
            let last: Vec<i64> = base[base.len() - order..].to_vec();
            let half = step_ratio / 2;
            let mut prk: Vec<i64> = last.iter().flat_map(|&t| [t, t + half]).collect();
            // prk_timesteps[:-1].repeat(2)[1:-1], reversed
            prk.pop();
            let rep: Vec<i64> = prk.iter().flat_map(|&t| [t, t]).collect();
            let mut prk: Vec<i64> = rep[1..rep.len() - 1].to_vec();
            prk.reverse();
            let mut plms: Vec<i64> = base[..base.len().saturating_sub(3)].to_vec();
            plms.reverse();
            (prk, plms)
        };
        let timesteps = prk.iter().chain(plms.iter()).map(|&t| t as f64).collect();
        let final_alpha_cumprod = if config.bool_or("set_alpha_to_one", false) {
            1.0
        } else {
            alphas_cumprod[0]
        };
        Ok(Self {
            alphas_cumprod,
            final_alpha_cumprod,
            prk_timesteps: prk,
            timesteps,
            step_ratio,
            prediction: config.prediction()?,
            skip_prk_steps,
            counter: 0,
            ets: Vec::new(),
            cur_sample: None,
            cur_model_output: None,
        })
    }

    fn alpha(&self, t: i64) -> f32 {
        if t >= 0 {
            self.alphas_cumprod[t as usize]
        } else {
            self.final_alpha_cumprod
        }
    }

    /// `_get_prev_sample`: formula (9) of the PNDM paper.
    fn prev_sample(
        &self,
        sample: &Tensor,
        t: i64,
        prev_t: i64,
        model_output: &Tensor,
    ) -> Result<Tensor> {
        let a_t = self.alpha(t);
        let a_prev = self.alpha(prev_t);
        let b_t = 1.0 - a_t;
        let b_prev = 1.0 - a_prev;
        let model_output = match self.prediction {
            Prediction::Epsilon => model_output.clone(),
            Prediction::VPrediction => {
                ((model_output * a_t.sqrt() as f64)? + (sample * b_t.sqrt() as f64)?)?
            }
        };
        let sample_coeff = (a_prev / a_t).sqrt();
        let denom = a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt();
        let correction = ((model_output * (a_prev - a_t) as f64)? / denom as f64)?;
        Ok(((sample * sample_coeff as f64)? - correction)?)
    }

    fn step_prk(&mut self, model_output: &Tensor, t: i64, sample: &Tensor) -> Result<Tensor> {
        let diff_to_prev = if self.counter % 2 == 1 {
            0
        } else {
            self.step_ratio / 2
        };
        let prev_t = t - diff_to_prev;
        let t = self.prk_timesteps[self.counter / 4 * 4];
        let acc = |cur: &Option<Tensor>, x: Tensor| -> Result<Tensor> {
            Ok(match cur {
                None => x,
                Some(c) => (c + x)?,
            })
        };
        let model_output = match self.counter % 4 {
            0 => {
                self.cur_model_output =
                    Some(acc(&self.cur_model_output, (model_output * (1.0 / 6.0))?)?);
                self.ets.push(model_output.clone());
                self.cur_sample = Some(sample.clone());
                model_output.clone()
            }
            1 | 2 => {
                self.cur_model_output =
                    Some(acc(&self.cur_model_output, (model_output * (1.0 / 3.0))?)?);
                model_output.clone()
            }
            _ => {
                let out = acc(&self.cur_model_output, (model_output * (1.0 / 6.0))?)?;
                self.cur_model_output = None;
                out
            }
        };
        let cur_sample = self.cur_sample.clone().unwrap_or_else(|| sample.clone());
        let prev = self.prev_sample(&cur_sample, t, prev_t, &model_output)?;
        self.counter += 1;
        Ok(prev)
    }

    fn step_plms(&mut self, model_output: &Tensor, t: i64, sample: &Tensor) -> Result<Tensor> {
        let (mut t, mut prev_t) = (t, t - self.step_ratio);
        if self.counter != 1 {
            if self.ets.len() > 3 {
                self.ets.drain(..self.ets.len() - 3);
            }
            self.ets.push(model_output.clone());
        } else {
            prev_t = t;
            t += self.step_ratio;
        }
        let e = &self.ets;
        let n = e.len();
        let mut sample = sample.clone();
        let model_output = if n == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.clone());
            model_output.clone()
        } else if n == 1 && self.counter == 1 {
            sample = self.cur_sample.take().expect("PLMS warm-up sample");
            ((model_output + &e[0])? / 2.0)?
        } else if n == 2 {
            (((&e[1] * 3.0)? - &e[0])? / 2.0)?
        } else if n == 3 {
            ((((&e[2] * 23.0)? - (&e[1] * 16.0)?)? + (&e[0] * 5.0)?)? / 12.0)?
        } else {
            ((((((&e[n - 1] * 55.0)? - (&e[n - 2] * 59.0)?)? + (&e[n - 3] * 37.0)?)?
                - (&e[n - 4] * 9.0)?)?)
                * (1.0 / 24.0))?
        };
        let prev = self.prev_sample(&sample, t, prev_t, &model_output)?;
        self.counter += 1;
        Ok(prev)
    }
}

impl Scheduler for PndmScheduler {
    fn noise_level(&self, begin: usize) -> NoiseLevel {
        NoiseLevel::AlphasCumprod(self.alphas_cumprod[self.timesteps[begin] as usize])
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step: usize,
        sample: &Tensor,
        _: &mut NoiseSource,
    ) -> Result<Tensor> {
        let t = self.timesteps[step] as i64;
        if self.counter < self.prk_timesteps.len() && !self.skip_prk_steps {
            self.step_prk(model_output, t, sample)
        } else {
            self.step_plms(model_output, t, sample)
        }
    }
}
