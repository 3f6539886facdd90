//! The home of sdgen's own CUDA kernels, compiled only with the `cuda` feature; the same shape
//! as `cpu/` (`common/`, then a folder per number type or engine).
//!
//! Empty today: on a CUDA device every operation runs on `ops::Engine::Reference`, candle's
//! CUDA kernels (checked on an H200 against the committed diffusers images; 2.7-3x slower
//! than diffusers per U-Net step, BENCHMARKS.md). A kernel added here gets a variant of
//! `ops::Engine` (and of the prepared weights it needs) and an arm in each `ops` function it
//! serves; model code does not change.
