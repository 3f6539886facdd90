//! Prompts into the U-Net's context: token ids in chunks of 77, and the text encoder's output
//! for them.
//!
//! Two syntaxes. `plain` is diffusers' `encode_prompt`: the prompt as it is, cut at 77 tokens
//! (a textual-inversion word of n vectors spelled out as diffusers' `maybe_convert_prompt`
//! does). `a1111` is the web UI's `FrozenCLIPEmbedderWithCustomWords`: the prompt parsed for
//! emphasis ([`crate::prompt_syntax`]), any length, in chunks of 75 tokens (a chunk ends early
//! at `BREAK`, and moves the words after a comma within the last 20 tokens to the next chunk,
//! the web UI's default `comma_padding_backtrack`), each chunk encoded on its own, its outputs
//! multiplied by the words' weights and rescaled to the unweighted mean (the "Original"
//! emphasis), the chunks' outputs concatenated.

use crate::models::clip::ClipTextModel;
use crate::prompt_syntax::{self, Piece};
use crate::tokenizer::{ClipTokenizer, MAX_LENGTH};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;

/// How the prompt text is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PromptSyntax {
    /// The text as it is, cut at 77 tokens: diffusers' images.
    #[default]
    Plain,
    /// AUTOMATIC1111's web UI: (emphasis:1.3), [less], \( escapes, BREAK, any length,
    /// <lora:NAME:W> tags.
    A1111,
}

/// Tokens in a chunk between the start and end tokens (the web UI's `chunk_length`).
const CHUNK: usize = MAX_LENGTH - 2;
/// How far back a comma may be for the web UI to move the words after it to the next chunk.
const COMMA_BACKTRACK: usize = 20;
/// The most chunks a prompt may have (7500 tokens).
pub const MAX_CHUNKS: usize = 100;

/// The textual-inversion words the tokenizer knows: each one's first token id and the ids of
/// all its vectors.
pub type Expansions = HashMap<u32, (String, Vec<u32>)>;

/// A prompt as the text encoder reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunks {
    /// 77 ids per chunk.
    pub ids: Vec<Vec<u32>>,
    /// 77 weights per chunk (`a1111`); `None`: all 1, outputs used as they are (`plain`).
    pub weights: Option<Vec<Vec<f32>>>,
    /// Whether words were cut off (`plain` beyond 77 tokens).
    pub truncated: bool,
}

/// The ids of `prompt` in `syntax` (a positive prompt's `<lora:...>` tags taken out first:
/// [`positive_text`]).
pub fn tokenize(
    tok: &ClipTokenizer,
    expansions: &Expansions,
    prompt: &str,
    syntax: PromptSyntax,
) -> Result<Chunks> {
    match syntax {
        PromptSyntax::Plain => plain(tok, expansions, prompt),
        PromptSyntax::A1111 => web_ui(tok, expansions, &prompt_syntax::parse(prompt)?),
    }
}

/// The text of a positive prompt the text encoder reads: in the `a1111` syntax without its
/// `<lora:...>` tags (the web UI takes them out of the prompt; a negative prompt keeps them as
/// words).
pub fn positive_text(prompt: &str, syntax: PromptSyntax) -> Result<std::borrow::Cow<'_, str>> {
    Ok(match syntax {
        PromptSyntax::Plain => prompt.into(),
        PromptSyntax::A1111 => prompt_syntax::take_lora_tags(prompt)?.0.into(),
    })
}

fn plain(tok: &ClipTokenizer, expansions: &Expansions, prompt: &str) -> Result<Chunks> {
    // maybe_convert_prompt: each multi-vector word found becomes "NAME NAME_1 ..." in the text
    let mut text = prompt.to_string();
    let mut seen = std::collections::HashSet::new();
    for id in tok.ids(prompt)? {
        if let Some((name, ids)) = expansions.get(&id) {
            if ids.len() > 1 && seen.insert(id) {
                let spelled: Vec<String> = std::iter::once(name.clone())
                    .chain((1..ids.len()).map(|i| format!("{name}_{i}")))
                    .collect();
                text = text.replace(name.as_str(), &spelled.join(" "));
            }
        }
    }
    let e = tok.encode(&text)?;
    Ok(Chunks {
        ids: vec![e.ids],
        weights: None,
        truncated: e.truncated,
    })
}

/// The web UI's `tokenize_line`: the parsed prompt in chunks of 77 ids and weights.
pub fn web_ui(tok: &ClipTokenizer, expansions: &Expansions, pieces: &[Piece]) -> Result<Chunks> {
    struct Building {
        ids: Vec<Vec<u32>>,
        weights: Vec<Vec<f32>>,
        chunk: Vec<u32>,
        chunk_w: Vec<f32>,
        last_comma: Option<usize>,
    }
    impl Building {
        /// `next_chunk`: pads the chunk to 75 with end tokens and closes it.
        fn next_chunk(&mut self, start: u32, end: u32) {
            let mut ids = Vec::with_capacity(MAX_LENGTH);
            ids.push(start);
            ids.append(&mut self.chunk);
            ids.resize(MAX_LENGTH - 1, end);
            ids.push(end);
            let mut w = Vec::with_capacity(MAX_LENGTH);
            w.push(1.0);
            w.append(&mut self.chunk_w);
            w.resize(MAX_LENGTH, 1.0);
            self.ids.push(ids);
            self.weights.push(w);
            self.last_comma = None;
        }
    }
    let (start, end) = (tok.bos_id, tok.eos_id);
    let mut b = Building {
        ids: Vec::new(),
        weights: Vec::new(),
        chunk: Vec::new(),
        chunk_w: Vec::new(),
        last_comma: None,
    };
    for piece in pieces {
        let (text, weight) = match piece {
            Piece::Break => {
                b.next_chunk(start, end);
                continue;
            }
            Piece::Text(t, w) => (t, *w as f32),
        };
        for id in tok.ids(text)? {
            if Some(id) == tok.comma_id {
                b.last_comma = Some(b.chunk.len());
            } else if let Some(comma) = b
                .last_comma
                .filter(|&c| b.chunk.len() == CHUNK && b.chunk.len() - c <= COMMA_BACKTRACK)
            {
                // the words after the comma move to the next chunk
                let moved = b.chunk.split_off(comma + 1);
                let moved_w = b.chunk_w.split_off(comma + 1);
                b.next_chunk(start, end);
                b.chunk = moved;
                b.chunk_w = moved_w;
            }
            if b.chunk.len() == CHUNK {
                b.next_chunk(start, end);
            }
            match expansions.get(&id) {
                None => {
                    b.chunk.push(id);
                    b.chunk_w.push(weight);
                }
                Some((_, vectors)) => {
                    // an embedding's vectors stay in one chunk
                    if b.chunk.len() + vectors.len() > CHUNK {
                        b.next_chunk(start, end);
                    }
                    b.chunk.extend(vectors);
                    b.chunk_w.extend(std::iter::repeat_n(weight, vectors.len()));
                }
            }
            if b.ids.len() > MAX_CHUNKS {
                bail!(
                    "the prompt is longer than {MAX_CHUNKS} chunks of {CHUNK} tokens, sdgen's limit"
                );
            }
        }
    }
    if !b.chunk.is_empty() || b.ids.is_empty() {
        b.next_chunk(start, end);
    }
    // SD 2.x pads with another token than the end token: after the first end token
    if tok.pad_id != end {
        for ids in &mut b.ids {
            if let Some(first_end) = ids.iter().position(|&i| i == end) {
                for id in &mut ids[first_end + 1..] {
                    *id = tok.pad_id;
                }
            }
        }
    }
    Ok(Chunks {
        ids: b.ids,
        weights: Some(b.weights),
        truncated: false,
    })
}

/// The text encoder's output for `chunks`: (1, 77 x chunks, hidden), `skip` layers before the
/// last (see [`ClipTextModel::forward`]), weighted as the web UI weighs when `chunks` has
/// weights.
pub fn encode(te: &ClipTextModel, chunks: &Chunks, skip: usize, device: &Device) -> Result<Tensor> {
    let mut out = Vec::with_capacity(chunks.ids.len());
    for i in 0..chunks.ids.len() {
        let z = te.forward(&chunks.ids_tensor(i, device)?, skip)?;
        out.push(chunks.emphasize(i, z)?);
    }
    Ok(Tensor::cat(&out, 1)?)
}

impl Chunks {
    /// Chunk `i`'s ids as a (1, 77) tensor.
    pub fn ids_tensor(&self, i: usize, device: &Device) -> Result<Tensor> {
        Ok(Tensor::new(self.ids[i].as_slice(), device)?.unsqueeze(0)?)
    }

    /// The text encoder's output `z` (1, 77, hidden) of chunk `i` with the chunk's weights
    /// applied as the web UI's "Original" emphasis does: z * w, scaled back to z's mean;
    /// unchanged without weights (`plain`).
    pub fn emphasize(&self, i: usize, z: Tensor) -> Result<Tensor> {
        Ok(match &self.weights {
            None => z,
            // all 1: the web UI's z * (mean / mean) is z, except that it is NaN where the mean
            // is exactly 0 (the tiny model's unit LayerNorms with zero bias give that)
            Some(w) if w[i].iter().all(|&x| x == 1.0) => z,
            Some(w) => {
                let dtype = z.dtype();
                let z = z.to_dtype(DType::F32)?;
                let original_mean = z.mean_all()?;
                let w = Tensor::new(w[i].as_slice(), z.device())?.reshape((1, MAX_LENGTH, 1))?;
                let z = z.broadcast_mul(&w)?;
                let new_mean = z.mean_all()?;
                z.broadcast_mul(&(original_mean / new_mean)?)?
                    .to_dtype(dtype)?
            }
        })
    }
}
