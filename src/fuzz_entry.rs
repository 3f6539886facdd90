//! Entry points for the fuzz targets of `fuzz/` (scripts/fuzz.sh): each parser of untrusted
//! bytes, reached from bytes alone. Results are dropped; only a panic, an abort or a hang is a
//! finding. Not part of the library's interface.

use crate::config::{ClipTextConfig, UNetConfig, VaeConfig};
use crate::schedulers::{self, SchedulerConfig};
use crate::weights::pytorch::TorchCheckpoint;
use crate::weights::safetensors::SafetensorsReader;
use candle_core::{DType, Device};
use candle_nn::var_builder::SimpleBackend;
use std::path::Path;

/// `bytes` written to `dir/name`, then `f` on that path.
fn via_file<T>(dir: &Path, name: &str, bytes: &[u8], f: impl FnOnce(&Path) -> T) -> T {
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("the fuzz folder is writable");
    f(&path)
}

/// The pickle reader on raw bytes, calls to torch's rebuild functions allowed.
pub fn pickle(bytes: &[u8]) {
    let allowed = |m: &str, _: &str| m == "torch._utils" || m == "collections";
    let _ = crate::weights::pickle::parse(bytes, &allowed);
}

/// Every tensor of `names` read from `file` (errors dropped).
fn read_every<'a>(file: &dyn SimpleBackend, names: impl Iterator<Item = &'a String>) {
    for n in names {
        let _ = file.get_unchecked(n, DType::F32, &Device::Cpu);
    }
}

/// A PyTorch zip checkpoint file: opened, then every tensor read.
pub fn torch_checkpoint(dir: &Path, bytes: &[u8]) {
    via_file(dir, "fuzz.ckpt", bytes, |p| {
        if let Ok(c) = TorchCheckpoint::open(p) {
            read_every(&c, c.names());
        }
    })
}

/// A safetensors file: opened, then every tensor read.
pub fn safetensors(dir: &Path, bytes: &[u8]) {
    via_file(dir, "fuzz.safetensors", bytes, |p| {
        if let Ok(r) = SafetensorsReader::open(p) {
            read_every(&r, r.names());
        }
    })
}

/// One of the model's config files (the first byte picks which), then what the pipeline
/// derives from it: the U-Net's blocks, the VAE's scale factor, every scheduler at a step
/// count from the second byte.
pub fn config(dir: &Path, bytes: &[u8]) {
    let Some((&which, rest)) = bytes.split_first() else {
        return;
    };
    let steps = rest.first().map_or(1, |&b| b as usize);
    match which % 4 {
        0 => via_file(dir, "unet.json", rest, |p| {
            if let Ok(c) = UNetConfig::load(p) {
                let _ = c.blocks();
            }
        }),
        1 => via_file(dir, "vae.json", rest, |p| {
            if let Ok(c) = VaeConfig::load(p) {
                let _ = c.scale_factor();
            }
        }),
        2 => via_file(dir, "clip.json", rest, |p| {
            let _ = ClipTextConfig::load(p);
        }),
        _ => via_file(dir, "scheduler.json", rest, |p| {
            if let Ok(mut c) = SchedulerConfig::load(p) {
                c.apply_pipeline_fixes();
                for (name, ..) in schedulers::SCHEDULERS {
                    if let Ok((_, s)) = schedulers::build(Some(name), &c, steps) {
                        let _ = s.timesteps().len();
                    }
                }
            }
        }),
    }
}
