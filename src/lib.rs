//! sdgen: Stable Diffusion text-to-image on candle, matching diffusers seed for seed.
//!
//! The binary is a thin shell over [`app::run`]; tests use the same library. Layers, each
//! importing only those below it:
//! - `app`, `cli`, `batch`, `output`, `infotext`, `input_image`, `interrupt`: what the binary
//!   does; `serve`: the same pipeline behind HTTP APIs (`sdgen serve`).
//! - `pipeline`: the denoising loop over the models; `schedulers`, `rng`, `tokenizer`;
//!   `conditioning` (prompts into the U-Net's context, plain or in the web UI's
//!   `prompt_syntax`).
//! - `source` (where a model's files are: folder, cache, Hub) and `weights` (reading them);
//!   `config` (the models' json files); `addons` (LoRAs, merged as `models` read their
//!   weights, and textual-inversion embeddings), over `weights`.
//! - `models`: the architectures, calling `ops`.
//! - `ops`: the operations, and the one place that chooses their implementation.
//! - `cpu` (and `cuda` with the `cuda` feature): the kernels. `allocator`: the process's
//!   allocator.

pub mod addons;
pub(crate) mod allocator;
pub mod app;
pub(crate) mod batch;
pub mod cli;
pub mod conditioning;
pub(crate) mod config;
pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
pub mod device;
#[doc(hidden)]
pub mod fuzz_entry;
pub(crate) mod infotext;
pub mod input_image;
pub(crate) mod interrupt;
pub(crate) mod models;
pub mod ops;
pub(crate) mod output;
pub mod pipeline;
pub mod prompt_syntax;
pub mod rng;
pub mod schedulers;
pub mod serve;
pub mod source;
pub mod tokenizer;
pub mod weights;
