//! torch-compatible random numbers: the initial latents and every scheduler noise draw come
//! from one generator per image, seeded as diffusers seeds it.
//!
//! - `torch_cpu`: `torch.Generator("cpu")` (MT19937, torch's CPU normal kernels); the default.
//! - `torch_cuda`: `torch.Generator("cuda")` (Philox4x32-10, curand's Box-Muller, torch's CUDA
//!   distribution-kernel layout), computed on the host: the seeds of GPU scripts and of the web
//!   UI's default "GPU" noise on NVIDIA cards.

mod seed_sequence;
mod torch_cpu;
mod torch_cuda;

pub use seed_sequence::SeedSequence;
pub use torch_cpu::{Mt19937, TorchGenerator};
pub use torch_cuda::CudaGenerator;

/// Which generator draws the noise (`--rng`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RngKind {
    /// torch.Generator("cpu"): diffusers on the CPU, and scripts that seed a CPU generator.
    #[default]
    TorchCpu,
    /// torch.Generator("cuda"): diffusers on an NVIDIA GPU, the web UI's "GPU" / "NV" noise.
    TorchCuda,
}

impl RngKind {
    pub fn name(self) -> &'static str {
        match self {
            RngKind::TorchCpu => "torch-cpu",
            RngKind::TorchCuda => "torch-cuda",
        }
    }

    /// The web UI's name for this noise source (its `RNG` infotext field).
    pub fn web_ui_name(self) -> &'static str {
        match self {
            RngKind::TorchCpu => "CPU",
            RngKind::TorchCuda => "NV",
        }
    }
}

/// One image's generator.
#[derive(Clone)]
pub enum Generator {
    Cpu(TorchGenerator),
    Cuda(CudaGenerator),
}

impl Generator {
    /// `torch.Generator(device).manual_seed(seed)`.
    pub fn new(kind: RngKind, seed: u64) -> Self {
        match kind {
            RngKind::TorchCpu => Generator::Cpu(TorchGenerator::new(seed)),
            RngKind::TorchCuda => Generator::Cuda(CudaGenerator::new(seed)),
        }
    }

    /// `torch.randn(n, generator=self)` in float32, flat (row-major for any shape of n
    /// elements).
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        match self {
            Generator::Cpu(g) => g.randn(n),
            Generator::Cuda(g) => g.randn(n),
        }
    }
}
