//! Where a denoising run starts: pure noise (text to image), a picture's latents noised to
//! the first timestep that runs (image to image, diffusers' `get_timesteps` and `add_noise`),
//! and inpainting's mask, masked picture and blending state. Each image's generator draws in
//! diffusers' order, so a seed gives diffusers' picture.

use super::{Generator, LatentDistribution, Pipeline, Request};
use crate::schedulers;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

/// Inpainting's state through the denoising loop (diffusers' `StableDiffusionInpaintPipeline`).
pub(super) struct Inpaint {
    /// (n, 1, h, w) at latent size (nearest), 1 = repaint.
    pub mask: Tensor,
    /// 9-channel (inpainting) U-Nets: the mask and the masked picture's latents, concatenated
    /// to the U-Net's input.
    pub condition: Option<Tensor>,
    /// Other U-Nets: the picture's latents and the start noise; after each step the kept part
    /// is the picture noised to the next timestep.
    pub blend: Option<(Tensor, Tensor)>,
}

impl Pipeline {
    /// Where the denoising of images `first..first+n` starts: the index in the timesteps,
    /// each image's generator, the latents, and inpainting's state. Each generator draws in
    /// diffusers' order: text to image, the latents; image to image, the picture's latent
    /// sample, then the noise `add_noise` puts on it; inpainting, the picture's latent sample
    /// (when the U-Net is not an inpainting one, or strength < 1), the noise, then the masked
    /// picture's latent sample.
    pub(super) fn start(
        &self,
        r: &Request,
        scheduler: &dyn schedulers::Scheduler,
        first: usize,
        n: usize,
    ) -> Result<(usize, Vec<Generator>, Tensor, Option<Inpaint>)> {
        let Some(image) = &r.image else {
            let (generators, latents) = self.initial_latents(r, first, n)?;
            let latents = (latents * scheduler.init_noise_sigma())?;
            return Ok((0, generators, latents, None));
        };
        let begin = start_index(r.steps, image.strength, scheduler)?;
        let level = scheduler.noise_level(begin);
        let pixels = image.pixels.to_device(&self.device)?;
        let tiles = self.tiles(r);
        let dist = self.encode_image(&pixels, tiles)?;
        let dims = dist.mean.dims().to_vec();
        let per_image = dist.mean.elem_count();
        let sf = self.vae_config.scaling_factor;
        let mut generators: Vec<Generator> = (first..first + n)
            .map(|i| Generator::new(r.rng, r.seeds[i]))
            .collect();
        // the noise, in the model's type
        let draws = |g: &mut Generator| -> Result<Tensor> {
            Ok(
                Tensor::from_vec(g.randn(per_image), dims.as_slice(), &Device::Cpu)?
                    .to_device(&self.device)?
                    .to_dtype(self.dtype)?,
            )
        };
        // a latent drawn from a distribution in the encoder's type (f32 when SDXL's VAE is
        // upcast), then in the model's type and scaled, as diffusers' prepare_latents does
        let sample = |dist: &LatentDistribution, g: &mut Generator| -> Result<Tensor> {
            let eps = draws(g)?.to_dtype(dist.mean.dtype())?;
            Ok((dist.sample(&eps)?.to_dtype(self.dtype)? * sf)?)
        };
        let Some(mask) = &image.mask else {
            let mut latents = Vec::with_capacity(n);
            for g in generators.iter_mut() {
                let clean = sample(&dist, g)?;
                latents.push(level.add_noise(&clean, &draws(g)?)?);
            }
            return Ok((begin, generators, Tensor::cat(&latents, 0)?, None));
        };
        let mask = mask.to_device(&self.device)?.to_dtype(self.dtype)?;
        let nine = self.unet_config.in_channels == 9;
        let full = image.strength == 1.0;
        let masked_dist = self.encode_image(&pixels.broadcast_mul(&(1.0 - &mask)?)?, tiles)?;
        let (mut latents, mut cleans, mut noises, mut masked) = (vec![], vec![], vec![], vec![]);
        for g in generators.iter_mut() {
            let clean = if !nine || !full {
                Some(sample(&dist, g)?)
            } else {
                None
            };
            let noise = draws(g)?;
            latents.push(match &clean {
                Some(c) if !full => level.add_noise(c, &noise)?,
                _ => (&noise * scheduler.init_noise_sigma())?,
            });
            cleans.extend(clean);
            noises.push(noise);
            masked.push(sample(&masked_dist, g)?);
        }
        let mask = nearest_to(&mask, dims[2], dims[3])?.repeat((n, 1, 1, 1))?;
        let inpaint = Inpaint {
            condition: nine
                .then(|| Tensor::cat(&[&mask, &Tensor::cat(&masked, 0)?], 1))
                .transpose()?,
            blend: (!nine)
                .then(|| -> Result<_> { Ok((Tensor::cat(&cleans, 0)?, Tensor::cat(&noises, 0)?)) })
                .transpose()?,
            mask,
        };
        Ok((begin, generators, Tensor::cat(&latents, 0)?, Some(inpaint)))
    }
}

/// Where image-to-image starts in the scheduler's timesteps, as diffusers' `get_timesteps`:
/// `floor(steps x strength)` steps run (the last ones), starting at index `t_start x order`.
pub(super) fn start_index(
    steps: usize,
    strength: f64,
    scheduler: &dyn schedulers::Scheduler,
) -> Result<usize> {
    if !(0.0..=1.0).contains(&strength) {
        bail!("--strength {strength} is outside [0, 1]");
    }
    let run = ((steps as f64 * strength) as usize).min(steps);
    if run == 0 {
        bail!(
            "--strength {strength} with --steps {steps} leaves no denoising step (steps x strength < 1): raise --strength or --steps"
        );
    }
    Ok((steps - run) * scheduler.order())
}

/// `F.interpolate(mask, size=(h, w))` (nearest): source index floor(i x in / out).
fn nearest_to(mask: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (_, _, mh, mw) = mask.dims4()?;
    let pick = |len: usize, out: usize| -> Vec<u32> {
        let scale = len as f32 / out as f32;
        (0..out)
            .map(|i| ((i as f32 * scale).floor() as usize).min(len - 1) as u32)
            .collect()
    };
    let rows = Tensor::new(pick(mh, h).as_slice(), mask.device())?;
    let cols = Tensor::new(pick(mw, w).as_slice(), mask.device())?;
    Ok(mask.index_select(&rows, 2)?.index_select(&cols, 3)?)
}
