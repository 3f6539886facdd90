//! sdgen's CPU kernels: the work candle's CPU backend does not do, or does slowly, for Stable
//! Diffusion. Each kernel's module says why it exists and what it measured against candle.
//!
//! - `common/`: what every kernel shares (the SIMD dispatch macro, the `gemm` call, scratch
//!   buffers, bf16 numbers as bits, convolution geometry and patch rows).
//! - `f32/`: f32 kernels on `gemm` and AVX-512/AVX2 loops: fused attention, convolution (im2col
//!   and Winograd), linear layer.
//! - `bf16/`: bf16 matrix products on one of two engines, AMX tiles (`tiles`) or AVX512-BF16
//!   dot products (`dot`), behind one [`bf16::Kernel`], and the layers built on them (linear,
//!   GEGLU projection, direct and Winograd convolutions, attention).
//! - `norm`, `geglu`, `elementwise`, `token_layout`: one kernel each for f32 and bf16 values
//!   (computed in f32, bf16 rounded once); `exp`: the exp and softmax rows they share.
//!
//! Import rule: nothing under `cpu/` imports `ops` or `models` (the `ops` layer chooses which of
//! these runs); `common/` imports nothing else of `cpu/`; `f32/` imports no `bf16/` code.

pub mod bf16;
pub(crate) mod common;
pub(crate) mod elementwise;
pub(crate) mod exp;
pub(crate) mod f32;
pub(crate) mod geglu;
pub(crate) mod norm;
pub(crate) mod token_layout;
