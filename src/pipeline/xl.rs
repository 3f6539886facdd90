//! SDXL's side of the pipeline (diffusers' `StableDiffusionXLPipeline`): the second tokenizer
//! and text encoder, a prompt's context from both encoders with the pooled embedding, and the
//! size conditioning (`add_time_ids`, with the refiner's aesthetic score).

use super::{Component, Conditioning, Family, Pipeline};
use crate::conditioning::{self, PromptSyntax};
use crate::config::ClipTextConfig;
use crate::models::clip::ClipTextModel;
use crate::tokenizer::ClipTokenizer;
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use std::cell::RefCell;
use std::rc::Rc;

/// SDXL's size conditioning: diffusers' `original_size`, `crops_coords_top_left` and
/// `target_size`, each (height, width) / (top, left) in pixels; the same numbers for the
/// negative prompt, as diffusers' defaults give. The refiner takes its aesthetic scores in
/// the target size's place. SD 1.x/2.x models take none of it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SizeConditioning {
    /// `None`: the image's size (diffusers' default).
    pub original: Option<(usize, usize)>,
    pub crop_top_left: (usize, usize),
    /// `None`: the image's size (diffusers' default).
    pub target: Option<(usize, usize)>,
    /// The refiner's `aesthetic_score` (`None`: diffusers' 6).
    pub aesthetic_score: Option<f64>,
    /// The refiner's `negative_aesthetic_score`, for the unconditional half (`None`: 2.5).
    pub negative_aesthetic_score: Option<f64>,
}

impl SizeConditioning {
    /// diffusers' `add_time_ids` for an image of `height` x `width`: original height and
    /// width, crop top and left, target height and width.
    pub fn time_ids(&self, height: usize, width: usize) -> [f64; 6] {
        let (oh, ow) = self.original.unwrap_or((height, width));
        let (top, left) = self.crop_top_left;
        let (th, tw) = self.target.unwrap_or((height, width));
        [oh, ow, top, left, th, tw].map(|v| v as f64)
    }
}

/// The second tokenizer and text encoder (OpenCLIP ViT-bigG in the Hub's SDXL models).
pub(super) struct SecondEncoder {
    pub tokenizer: ClipTokenizer,
    pub config: ClipTextConfig,
    pub model: RefCell<Option<Rc<ClipTextModel>>>,
}

impl Pipeline {
    pub(super) fn text_encoder_2(&self) -> Result<Rc<ClipTextModel>> {
        let second = self.second_encoder()?;
        if let Some(m) = second.model.borrow().as_ref() {
            return Ok(m.clone());
        }
        let m = self.build(Component::TextEncoder2, |vb| {
            let m = ClipTextModel::with_projection(vb, &second.config)
                .context("loading the second text encoder's weights")?;
            let vectors: Vec<&Tensor> = self
                .embeddings()
                .iter()
                .filter_map(|e| e.vectors_2.as_ref())
                .collect();
            if vectors.is_empty() {
                return Ok(m);
            }
            Ok(m.with_extra_tokens(&Tensor::cat(&vectors, 0)?)?)
        })?;
        *second.model.borrow_mut() = Some(m.clone());
        Ok(m)
    }

    pub(super) fn second_encoder(&self) -> Result<&SecondEncoder> {
        self.second
            .as_ref()
            .context("this model has no second text encoder (not SDXL)")
    }

    /// `StableDiffusionXLPipeline.encode_prompt` for one text: each encoder's hidden state
    /// `skip + 1` layers before its last (the second-to-last with `skip` 0), concatenated,
    /// encoder 1 first; the pooled embedding from encoder 2 (the refiner has only that one
    /// encoder, in the first slot, and takes both from it). In the web UI's syntax, as its
    /// SDXL conditioner does: each encoder reads the prompt in 77-token chunks through its own
    /// tokenizer, each chunk's state weighted with the mean restored (per encoder), the chunks'
    /// contexts one after the other, the pooled embedding the first chunk's (unweighted).
    pub(super) fn encode_xl(
        &self,
        text: &str,
        syntax: PromptSyntax,
        skip: usize,
    ) -> Result<Conditioning> {
        // each encoder with its tokenizer's chunks (the embeddings' words spelled out per
        // tokenizer, diffusers' maybe_convert_prompt); the refiner has the one encoder
        let mut encoders = vec![(
            self.text_encoder()?,
            conditioning::tokenize(&self.tokenizer, &self.expansions, text, syntax)?,
        )];
        if let Some(second) = &self.second {
            encoders.push((
                self.text_encoder_2()?,
                conditioning::tokenize(&second.tokenizer, &self.expansions, text, syntax)?,
            ));
        }
        let n = encoders[0].1.ids.len();
        if encoders.iter().any(|(_, c)| c.ids.len() != n) {
            bail!("the two tokenizers cut the prompt into different numbers of chunks (tokenizers of different vocabularies?)");
        }
        let mut contexts = Vec::with_capacity(n);
        let mut pooled = None;
        for i in 0..n {
            let mut states = Vec::with_capacity(encoders.len());
            for (encoder, chunks) in &encoders {
                let out = encoder.forward_xl(&chunks.ids_tensor(i, &self.device)?, skip)?;
                states.push(chunks.emphasize(i, out.hidden)?);
                // the last encoder pools (the second; the refiner's one)
                if i == 0 {
                    pooled = out.pooled;
                }
            }
            contexts.push(Tensor::cat(&states, 2)?);
        }
        Ok(Conditioning {
            context: Tensor::cat(&contexts, 1)?,
            pooled,
        })
    }

    /// A request's SDXL-specific inputs, checked before any work: the refiner's picture and
    /// aesthetic scores, and size conditioning only for SDXL models.
    pub(super) fn validate_added_conditioning(&self, r: &super::Request) -> Result<()> {
        if self.refiner && r.image.is_none() {
            bail!("this is SDXL's refiner, an image-to-image model (StableDiffusionXLImg2ImgPipeline): give it --image");
        }
        if self.refiner && r.sizes.target.is_some() {
            bail!("--target-size is not part of the refiner's conditioning (it takes an aesthetic score instead)");
        }
        let scores = [r.sizes.aesthetic_score, r.sizes.negative_aesthetic_score];
        if !self.refiner && scores.iter().any(Option::is_some) {
            bail!("--aesthetic-score and --negative-aesthetic-score are the conditioning of SDXL's refiner; this model does not take them");
        }
        if scores.iter().flatten().any(|s| !s.is_finite()) {
            bail!("the aesthetic scores must be finite numbers");
        }
        if self.family == Family::Sd && r.sizes != SizeConditioning::default() {
            bail!("--original-size, --crop-top-left and --target-size are SDXL's size conditioning; this model is SD 1.x/2.x");
        }
        Ok(())
    }

    /// diffusers' `add_time_ids` of a request's rows: its size conditioning, or for the
    /// refiner (`requires_aesthetics_score`) the original size, the crop and the aesthetic
    /// score (diffusers' defaults: 6, and 2.5 for the unconditional, `negative`, half).
    pub(super) fn time_ids(&self, r: &super::Request, negative: bool) -> Vec<f64> {
        let ids = r.sizes.time_ids(r.height, r.width);
        if !self.refiner {
            return ids.to_vec();
        }
        let s = &r.sizes;
        let score = if negative {
            s.negative_aesthetic_score.unwrap_or(2.5)
        } else {
            s.aesthetic_score.unwrap_or(6.0)
        };
        vec![ids[0], ids[1], ids[2], ids[3], score]
    }

    /// Drops the second text encoder (after encoding, for the lowest peak memory).
    pub(super) fn drop_text_encoder_2(&self) {
        if let Some(second) = &self.second {
            *second.model.borrow_mut() = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_ids_default_to_the_image_size_height_first() {
        let s = SizeConditioning::default();
        assert_eq!(s.time_ids(48, 80), [48.0, 80.0, 0.0, 0.0, 48.0, 80.0]);
        let s = SizeConditioning {
            original: Some((1024, 768)),
            crop_top_left: (4, 8),
            target: None,
            ..Default::default()
        };
        assert_eq!(s.time_ids(64, 32), [1024.0, 768.0, 4.0, 8.0, 64.0, 32.0]);
    }
}
