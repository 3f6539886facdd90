//! `--device` and `--dtype`.

use anyhow::{bail, Result};
use candle_core::{DType, Device};

/// `auto` (CUDA when built with it and a GPU is present, else CPU), `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            if cfg!(feature = "cuda") {
                if let Ok(d) = Device::new_cuda(0) {
                    return Ok(d);
                }
            }
            Ok(Device::Cpu)
        }
        _ => {
            let ordinal = match s.strip_prefix("cuda") {
                Some("") => 0,
                Some(rest) => match rest.strip_prefix(':').and_then(|n| n.parse::<usize>().ok()) {
                    Some(n) => n,
                    None => bail!("--device {s:?}: expected auto, cpu, cuda or cuda:N"),
                },
                None => bail!("--device {s:?}: expected auto, cpu, cuda or cuda:N"),
            };
            if !cfg!(feature = "cuda") {
                bail!("--device {s}: this sdgen was built without CUDA support; rebuild with `cargo build --release --features cuda`, or use --device cpu");
            }
            Device::new_cuda(ordinal)
                .map_err(|e| anyhow::anyhow!("--device {s}: cannot open the GPU: {e}"))
        }
    }
}

/// `f32`, `f16` or `bf16`.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" | "float32" => Ok(DType::F32),
        "f16" | "float16" | "fp16" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        other => bail!("--dtype {other:?}: expected f32, f16 or bf16"),
    }
}

pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ => "f32",
    }
}
