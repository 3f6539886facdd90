//! The CLIP BPE tokenizer, built from the `tokenizer/vocab.json` + `merges.txt` that Stable
//! Diffusion repos ship (they have no `tokenizer.json`).
//!
//! The `tokenizers` pipeline assembled here is the one transformers' CLIPTokenizer(Fast)
//! uses: NFC, whitespace runs to one space, lower-casing, CLIP's split pattern, byte-level
//! alphabet, BPE with the `</w>` end-of-word suffix.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::Path;

pub const MAX_LENGTH: usize = 77;

pub struct ClipTokenizer {
    inner: tokenizers::Tokenizer,
    pub bos_id: u32,
    pub eos_id: u32,
    pub pad_id: u32,
    /// The largest id of vocab.json (what the text encoder's embedding must hold).
    pub max_id: u32,
    /// `,</w>`, where the web UI's chunking prefers to break a long prompt.
    pub comma_id: Option<u32>,
}

/// Token ids of one prompt, padded to 77, and whether it had to be truncated.
pub struct Encoded {
    pub ids: Vec<u32>,
    pub truncated: bool,
}

fn token_name(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl ClipTokenizer {
    /// Loads `dir/vocab.json` and `dir/merges.txt`; the pad token comes from
    /// `special_tokens_map.json` or `tokenizer_config.json` (`<|endoftext|>` for SD 1.x, `!` for
    /// SD 2.x), defaulting to the end-of-text token.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let vocab_path = dir.join("vocab.json");
        let vocab: Value = crate::config::read_json(&vocab_path)?;
        let merges_path = dir.join("merges.txt");
        let merges_text = std::fs::read_to_string(&merges_path)
            .with_context(|| format!("cannot read {}", merges_path.display()))?;
        let merges: Vec<Value> = merges_text
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
            .map(|l| Value::String(l.to_string()))
            .collect();
        let mut pad = None;
        for name in ["special_tokens_map.json", "tokenizer_config.json"] {
            let p = dir.join(name);
            if pad.is_none() && p.exists() {
                pad = token_name(crate::config::read_json(&p)?.get("pad_token"));
            }
        }
        let pad = pad.unwrap_or_else(|| "<|endoftext|>".to_string());
        let id_of = |tok: &str| -> Result<u32> {
            vocab
                .get(tok)
                .and_then(Value::as_u64)
                .map(|v| v as u32)
                .with_context(|| format!("{}: no token {tok:?}", vocab_path.display()))
        };
        let bos_id = id_of("<|startoftext|>")?;
        let eos_id = id_of("<|endoftext|>")?;
        let pad_id = id_of(&pad)?;
        let added = |id: u32, content: &str, normalized: bool| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": normalized, "special": true})
        };
        let mut added_tokens = vec![
            added(bos_id, "<|startoftext|>", true),
            added(eos_id, "<|endoftext|>", false),
        ];
        if pad_id != bos_id && pad_id != eos_id {
            // A pad token that is an ordinary vocabulary entry ("!" in SD 2.x) becomes a special
            // token, so every HF tokenizer splits it out on its own.
            added_tokens.push(added(pad_id, &pad, false));
        }
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added_tokens,
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "NFC"},
                {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
                {"type": "Lowercase"}
            ]},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": "<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+"},
                 "behavior": "Removed", "invert": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
            ]},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": "<|endoftext|>",
                      "continuing_subword_prefix": "", "end_of_word_suffix": "</w>",
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": merges}
        });
        let inner: tokenizers::Tokenizer = serde_json::from_value(spec).map_err(|e| {
            anyhow::anyhow!(
                "cannot build the CLIP tokenizer from {}: {e}",
                dir.display()
            )
        })?;
        let max_id = vocab
            .as_object()
            .and_then(|m| m.values().filter_map(Value::as_u64).max())
            .unwrap_or(0) as u32;
        Ok(Self {
            inner,
            bos_id,
            eos_id,
            pad_id,
            max_id,
            comma_id: vocab.get(",</w>").and_then(Value::as_u64).map(|v| v as u32),
        })
    }

    /// Adds words as transformers' `add_tokens` does (matched in the normalized text, so in
    /// any case), returning their ids: the next ones after the vocabulary, in order. A word
    /// the vocabulary already has is an error, as in diffusers' `load_textual_inversion`.
    pub fn add_tokens(&mut self, words: &[String]) -> Result<Vec<u32>> {
        for w in words {
            if self.inner.token_to_id(w).is_some() {
                bail!("the token {w:?} is already in the tokenizer's vocabulary: rename the embedding file");
            }
        }
        let added: Vec<tokenizers::AddedToken> = words
            .iter()
            .map(|w| tokenizers::AddedToken::from(w.clone(), false))
            .collect();
        self.inner
            .add_tokens(added)
            .map_err(|e| anyhow::anyhow!("cannot add tokens to the tokenizer: {e}"))?;
        words
            .iter()
            .map(|w| {
                self.inner
                    .token_to_id(w)
                    .with_context(|| format!("internal error: token {w:?} not added"))
            })
            .collect()
    }

    /// The ids of `text` without start, end or padding, however long
    /// (`tokenizer(text, add_special_tokens=False, truncation=False)`).
    pub fn ids(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("cannot tokenize the prompt: {e}"))?
            .get_ids()
            .to_vec())
    }

    /// `tokenizer(prompt, padding="max_length", max_length=77, truncation=True)`.
    pub fn encode(&self, prompt: &str) -> Result<Encoded> {
        let mut body = self.ids(prompt)?;
        let truncated = body.len() > MAX_LENGTH - 2;
        body.truncate(MAX_LENGTH - 2);
        let mut ids = Vec::with_capacity(MAX_LENGTH);
        ids.push(self.bos_id);
        ids.extend(body);
        ids.push(self.eos_id);
        ids.resize(MAX_LENGTH, self.pad_id);
        if ids.len() != MAX_LENGTH {
            bail!("internal error: token sequence of length {}", ids.len());
        }
        Ok(Encoded { ids, truncated })
    }
}
