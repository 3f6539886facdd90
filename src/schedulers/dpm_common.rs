//! What the DPM-Solver family (DPM++ 2M, DPM++ 2S, DEIS, UniPC) shares: the timestep and
//! sigma schedule of their `set_timesteps`, the VP (alpha, sigma, lambda) of a sigma, and the
//! conversion of the model output into a data prediction.

use super::sigmas::{interp, karras, sigma_to_t, training_sigmas};
use super::{round_half_even, Prediction, SchedulerConfig, Spacing};
use anyhow::{bail, Result};
use candle_core::Tensor;

/// The per-class differences of `set_timesteps`.
#[derive(Clone, Copy, PartialEq)]
pub enum DpmScheduleKind {
    /// DPMSolverMultistep: spacing from the config; final sigma per `final_sigmas_type`;
    /// Karras timesteps rounded unless the betas are `squaredcos_cap_v2`.
    Multistep,
    /// DPMSolverSinglestep: always linspace; Karras timesteps always rounded.
    Singlestep,
    /// DEIS: the final sigma is always sigma_min.
    Deis,
    /// UniPC: like Multistep, Karras timesteps always rounded.
    UniPc,
}

/// Timesteps of the DPM-Solver family (`linspace` over steps + 1 points, dropping the last;
/// `leading` over steps + 1 intervals), and sigmas (interpolated, or Karras over the whole
/// training range), with the final sigma appended. Shared by DPM++ 2M, DPM++ 2S, DEIS, UniPC.
pub fn dpm_schedule(
    config: &SchedulerConfig,
    steps: usize,
    kind: DpmScheduleKind,
) -> Result<(Vec<f64>, Vec<f32>)> {
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
    let spacing = if kind == DpmScheduleKind::Singlestep {
        Spacing::Linspace
    } else {
        config.spacing("linspace")?
    };
    let mut timesteps: Vec<f64> = match spacing {
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
        Spacing::Trailing => super::trailing_timesteps(train, steps),
    };
    let base64: Vec<f64> = base.iter().map(|&s| s as f64).collect();
    let mut sigmas: Vec<f64> = if config.bool_or("use_karras_sigmas", false) {
        // diffusers flips the training sigmas: min = sigma(t=0), max = sigma(t=train-1)
        let s = karras(config, base64[0], base64[train - 1], steps);
        timesteps = s.iter().map(|&x| sigma_to_t(x, &log_sigmas)).collect();
        if kind != DpmScheduleKind::Multistep
            || config.str_or("beta_schedule", "linear") != "squaredcos_cap_v2"
        {
            timesteps = timesteps.iter().map(|&t| round_half_even(t)).collect();
        }
        s
    } else {
        timesteps.iter().map(|&t| interp(t, &base64)).collect()
    };
    let final_type = if kind == DpmScheduleKind::Deis {
        "sigma_min"
    } else {
        config.str_or("final_sigmas_type", "zero")
    };
    let sigma_last = match final_type {
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

/// `convert_model_output` of the `++`/x0 algorithms: the data prediction x0.
pub fn data_prediction(
    prediction: Prediction,
    sigma: f32,
    model_output: &Tensor,
    sample: &Tensor,
) -> candle_core::Result<Tensor> {
    let (alpha_t, sigma_t) = alpha_sigma(sigma);
    match prediction {
        Prediction::Epsilon => (sample - (model_output * sigma_t as f64)?)? / alpha_t as f64,
        Prediction::VPrediction => (sample * alpha_t as f64)? - (model_output * sigma_t as f64)?,
    }
}

/// The first-order DPM-Solver++ update from sigma_s to sigma_t (with noise for the SDE variant).
pub fn dpmpp_first_order(
    sigma_s: f32,
    sigma_t: f32,
    x0: &Tensor,
    sample: &Tensor,
    noise: Option<&Tensor>,
) -> Result<Tensor> {
    let (alpha_t, sigma_t_) = alpha_sigma(sigma_t);
    let (_, sigma_s_) = alpha_sigma(sigma_s);
    let h = lambda(sigma_t) - lambda(sigma_s);
    Ok(match noise {
        None => {
            ((sample * (sigma_t_ / sigma_s_) as f64)?
                - (x0 * (alpha_t * ((-h).exp() - 1.0)) as f64)?)?
        }
        Some(z) => {
            let x = ((sample * ((sigma_t_ / sigma_s_) * (-h).exp()) as f64)?
                + (x0 * (alpha_t * (1.0 - (-2.0 * h).exp())) as f64)?)?;
            (x + (z * (sigma_t_ * (1.0 - (-2.0 * h).exp()).sqrt()) as f64)?)?
        }
    })
}
