//! sdgen's own CUDA kernels (`cuda` feature): the operations where candle's CUDA path costs
//! most, each a candle custom op over one kernel file in `kernels/` (compiled to PTX by
//! `build.rs` for `CUDA_COMPUTE_CAP`, loaded once per device).
//! - [`attention`]: fused attention on the tensor cores for f16/bf16 (flash-attention style);
//!   candle materialised the scores in f32.
//! - [`group_norm`]: GroupNorm (+ SiLU) in one kernel; candle_nn's is eleven.
//! - [`geglu`]: diffusers' GEGLU after its projection in one pass; candle's is four kernels.
//! - [`conv2d`]: convolutions through cuDNN with plans kept per shape, for f16 and bf16
//!   (`SDGEN_CUDA_CONV=cudnn|im2col` overrides); candle's im2col copied every patch.
//!
//! `ops` decides when they run ([`crate::ops::Engine::Cuda`]); every other operation runs on
//! candle's CUDA kernels (`ops::reference`). The tests in `ops` compare each against the
//! reference on a GPU (`cargo test --features cuda`).

mod attention;
mod conv;
mod geglu;
mod launch;
mod norm;

pub use attention::{attention, attention_takes};
#[cfg(test)]
pub use conv::conv2d_with;
pub use conv::{conv2d, conv_takes};
pub use geglu::geglu;
pub use norm::group_norm;
