//! sdgen: Stable Diffusion text-to-image on candle, matching diffusers seed for seed.
//!
//! The binary is a thin shell over [`app::run`]; tests use the same library.

pub mod allocator;
pub mod amx;
pub mod amx_ops;
pub mod app;
pub mod batch;
pub mod bf16_ops;
pub mod cli;
pub mod config;
pub mod device;
pub mod dpbf16;
pub mod hub;
pub mod interrupt;
pub mod kernels;
pub mod model_source;
pub mod models;
pub mod output;
pub mod pipeline;
pub mod rng;
pub mod schedulers;
pub mod single_file;
pub mod token_layout;
pub mod tokenizer;
pub mod winograd;
pub mod winograd_bf16;
