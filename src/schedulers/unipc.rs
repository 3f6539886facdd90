//! `UniPCMultistepScheduler` (predict_x0, bh1 or bh2), order 1, 2 or 3: each step first
//! corrects the previous prediction with the new model output (UniC), then predicts ahead
//! (UniP).

use super::dpm_common::{alpha_sigma, data_prediction, dpm_schedule, lambda, DpmScheduleKind};
use super::{NoiseLevel, NoiseSource, Prediction, Scheduler, SchedulerConfig};
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
        if !(1..=3).contains(&order) {
            bail!("scheduler config: solver_order={order} is not supported (1, 2 or 3)");
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

    /// The earlier outputs' ratios `rk_j = (lambda(sigmas[s0 - j]) - lambda(sigmas[s0])) / h`
    /// and differences `D1_j = (m_j - m0) / rk_j`, j = 1..order-1 (m_j the j-th output before
    /// the newest).
    fn differences(&self, s0: usize, h: f32, order: usize) -> Result<(Vec<f32>, Vec<Tensor>)> {
        let k = self.model_outputs.len();
        let m0 = &self.model_outputs[k - 1];
        let lambda_s0 = lambda(self.sigmas[s0]);
        let mut rks = Vec::new();
        let mut d1s = Vec::new();
        for j in 1..order {
            let rk = (lambda(self.sigmas[s0 - j]) - lambda_s0) / h;
            d1s.push(((&self.model_outputs[k - 1 - j] - m0)? / rk as f64)?);
            rks.push(rk);
        }
        Ok((rks, d1s))
    }

    /// `multistep_uni_p_bh_update`: the prediction from sigmas[i] to sigmas[i + 1].
    fn predict(&self, i: usize, sample: &Tensor, order: usize) -> Result<Tensor> {
        let k = self.model_outputs.len();
        let m0 = &self.model_outputs[k - 1];
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (_, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let (h, h_phi_1, b_h, b) = self.coefficients(self.sigmas[i], self.sigmas[i + 1], order);
        let x = ((sample * (sigma_t / sigma_s0) as f64)? - (m0 * (alpha_t * h_phi_1) as f64)?)?;
        if order == 1 {
            return Ok(x);
        }
        let (rks, d1s) = self.differences(i, h, order)?;
        // order 2: diffusers' simplified 0.5; else R[:-1, :-1] rho = b[:-1]
        let rhos = if order == 2 {
            vec![0.5]
        } else {
            solve(&powers(&rks, order - 1), &b[..order - 1])
        };
        let pred_res = weighted_sum(&rhos, &d1s)?;
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
        // order 1: diffusers' simplified 0.5; else R rho = b with R over [rk_1.., 1]
        let rhos = if order == 1 {
            vec![0.5f32]
        } else {
            let (mut rks, d1s) = self.differences(i - 1, h, order)?;
            rks.push(1.0);
            let rhos = solve(&powers(&rks, order), &b);
            let corr = weighted_sum(&rhos[..order - 1], &d1s)?;
            let inner = (corr + (d1_t * rhos[order - 1] as f64)?)?;
            return Ok((x - (inner * (alpha_t * b_h) as f64)?)?);
        };
        let inner = (d1_t * rhos[0] as f64)?;
        Ok((x - (inner * (alpha_t * b_h) as f64)?)?)
    }
}

/// The `n` x `n` matrix of `torch.pow(rks, p)`, row p = 0..n, over the first `n` of `rks`, in
/// float32 as torch computes it.
fn powers(rks: &[f32], n: usize) -> Vec<Vec<f32>> {
    (0..n)
        .map(|p| rks[..n].iter().map(|r| r.powi(p as i32)).collect())
        .collect()
}

/// `torch.linalg.solve(a, b)` for the small systems of UniPC: Gaussian elimination with
/// partial pivoting (LAPACK's gesv), in f64, rounded to float32.
fn solve(a: &[Vec<f32>], b: &[f32]) -> Vec<f32> {
    let n = b.len();
    let mut m: Vec<Vec<f64>> = a
        .iter()
        .zip(b)
        .map(|(row, &bi)| row.iter().map(|&x| x as f64).chain([bi as f64]).collect())
        .collect();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&r, &s| m[r][col].abs().total_cmp(&m[s][col].abs()))
            .expect("a non-empty system");
        m.swap(col, pivot);
        let (above, below) = m.split_at_mut(col + 1);
        let p = &above[col];
        for row in below {
            let f = row[col] / p[col];
            for (x, y) in row[col..].iter_mut().zip(&p[col..]) {
                *x -= f * y;
            }
        }
    }
    let mut x = vec![0f64; n];
    for r in (0..n).rev() {
        let s: f64 = (r + 1..n).map(|c| m[r][c] * x[c]).sum();
        x[r] = (m[r][n] - s) / m[r][r];
    }
    x.into_iter().map(|v| v as f32).collect()
}

/// `einsum("k,bkc...->bc...", rhos, D1s)`: the sum of rho_j x D1_j.
fn weighted_sum(rhos: &[f32], d1s: &[Tensor]) -> Result<Tensor> {
    let mut acc = (&d1s[0] * rhos[0] as f64)?;
    for (r, d) in rhos.iter().zip(d1s).skip(1) {
        acc = (acc + (d * *r as f64)?)?;
    }
    Ok(acc)
}

impl Scheduler for UniPcScheduler {
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
