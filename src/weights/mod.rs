//! Reading weights: safetensors files (`safetensors`), PyTorch zip checkpoints (`pytorch`,
//! over our own `pickle` reader, which builds data and calls nothing), and single-file
//! checkpoints in the original LDM naming (`single_file`, renamed to diffusers' names as they
//! are read).

pub mod pickle;
pub mod pytorch;
pub mod safetensors;
pub mod single_file;

use self::pytorch::TorchCheckpoint;
use self::safetensors::SafetensorsReader;
use anyhow::{Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use std::path::Path;

/// candle's `SimpleBackend` for a file reader with `fn read(&self, name, dtype) -> Tensor` (on
/// the CPU) and a `contains` rule: shapes checked, tensors moved to the device.
macro_rules! simple_backend {
    ($reader:ty, $contains:expr) => {
        impl candle_nn::var_builder::SimpleBackend for $reader {
            fn get(
                &self,
                s: candle_core::Shape,
                name: &str,
                _: candle_nn::Init,
                dtype: candle_core::DType,
                dev: &candle_core::Device,
            ) -> candle_core::Result<candle_core::Tensor> {
                super::expect_shape(self.get_unchecked(name, dtype, dev)?, s, name)
            }

            fn get_unchecked(
                &self,
                name: &str,
                dtype: candle_core::DType,
                dev: &candle_core::Device,
            ) -> candle_core::Result<candle_core::Tensor> {
                self.read(name, dtype)?.to_device(dev)
            }

            fn contains_tensor(&self, name: &str) -> bool {
                ($contains)(self, name)
            }
        }
    };
}
pub(crate) use simple_backend;

/// `t` if it has shape `s`, else the error candle's own backends give.
pub fn expect_shape(t: Tensor, s: Shape, name: &str) -> candle_core::Result<Tensor> {
    if t.shape() != &s {
        return Err(candle_core::Error::UnexpectedShape {
            msg: format!("shape mismatch for {name}"),
            expected: s,
            got: t.shape().clone(),
        });
    }
    Ok(t)
}

/// One weight file's tensors: safetensors, or a PyTorch zip (`.bin`, `.ckpt`, `.pt`) through
/// our pickle reader; the reader is chosen by the extension here only.
pub struct TensorFile {
    backend: Box<dyn candle_nn::var_builder::SimpleBackend>,
    names: Vec<String>,
    metadata: std::collections::HashMap<String, String>,
}

impl TensorFile {
    pub fn open(path: &Path) -> Result<Self> {
        let is_safetensors = path.extension().is_some_and(|e| e == "safetensors");
        let opened: Result<Self> = if is_safetensors {
            SafetensorsReader::open(path).map(|r| Self {
                names: r.names().cloned().collect(),
                metadata: r.metadata.clone(),
                backend: Box::new(r),
            })
        } else {
            TorchCheckpoint::open(path).map(|r| Self {
                names: r.names().cloned().collect(),
                metadata: Default::default(),
                backend: Box::new(r),
            })
        };
        opened.with_context(|| {
            format!(
                "cannot read weights {} (corrupt or incomplete file? delete it and download again)",
                path.display()
            )
        })
    }

    /// The tensor names, in no particular order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// A safetensors `__metadata__` entry.
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).map(String::as_str)
    }

    /// The tensor `name` in f32 on the CPU.
    pub fn read_f32(&self, name: &str) -> candle_core::Result<Tensor> {
        self.backend.get_unchecked(name, DType::F32, &Device::Cpu)
    }
}

/// A `VarBuilder` over one weight file, read tensor by tensor; or, for a sharded
/// safetensors index (`*.safetensors.index.json`, what diffusers writes for weights over
/// 10 GB, such as SDXL's U-Net in f32), over the shards it names.
pub fn var_builder(path: &Path, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    let backend = if is_shard_index(path) {
        Box::new(Shards::open(path)?)
    } else {
        TensorFile::open(path)?.backend
    };
    Ok(VarBuilder::from_backend(backend, dtype, device.clone()))
}

/// Whether `path` is a sharded safetensors index (`X.safetensors.index.json`, or a variant's
/// `X.safetensors.index.fp16.json`).
pub fn is_shard_index(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.contains(".safetensors.index.") && n.ends_with(".json"))
}

/// The shard files a sharded index names (its `weight_map` values), in the index's folder.
/// A name that is not a plain file name (a folder, `..`) is refused: the index may come from
/// anywhere.
pub fn shard_files(index: &Path) -> Result<Vec<std::path::PathBuf>> {
    let v = crate::config::read_json(index)?;
    let map = v
        .get("weight_map")
        .and_then(serde_json::Value::as_object)
        .with_context(|| format!("{}: no weight_map object", index.display()))?;
    let mut names: Vec<&str> = Vec::new();
    for (tensor, file) in map {
        let file = file.as_str().with_context(|| {
            format!(
                "{}: weight_map[{tensor:?}] is not a file name",
                index.display()
            )
        })?;
        let plain = !file.is_empty()
            && file != "."
            && file != ".."
            && !file.contains(['/', '\\'])
            && file.ends_with(".safetensors");
        if !plain {
            anyhow::bail!(
                "{}: the shard {file:?} is not a .safetensors file beside the index; refusing it",
                index.display()
            );
        }
        if !names.contains(&file) {
            names.push(file);
        }
    }
    let dir = index.parent().unwrap_or(Path::new("."));
    Ok(names.into_iter().map(|n| dir.join(n)).collect())
}

/// The tensors of several shard files as one backend, each name read from the shard that
/// holds it.
struct Shards {
    files: Vec<TensorFile>,
    by_name: std::collections::HashMap<String, usize>,
}

impl Shards {
    fn open(index: &Path) -> Result<Self> {
        let files = shard_files(index)?
            .iter()
            .map(|p| TensorFile::open(p))
            .collect::<Result<Vec<_>>>()?;
        let mut by_name = std::collections::HashMap::new();
        for (i, f) in files.iter().enumerate() {
            for n in f.names() {
                by_name.insert(n.clone(), i);
            }
        }
        Ok(Self { files, by_name })
    }

    fn file(&self, name: &str) -> candle_core::Result<&TensorFile> {
        self.by_name
            .get(name)
            .map(|&i| &self.files[i])
            .ok_or_else(|| candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            })
    }
}

impl candle_nn::var_builder::SimpleBackend for Shards {
    fn get(
        &self,
        s: Shape,
        name: &str,
        init: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.file(name)?.backend.get(s, name, init, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.file(name)?.backend.get_unchecked(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }
}

/// The hex SHA-256 of `path`'s bytes from `skip` on (Hub downloads are checked with the whole
/// file's; the web UI names LoRAs and embeddings by the first 12 digits of theirs).
pub fn file_sha256(path: &Path, skip: u64) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    std::io::copy(&mut (&mut f).take(skip), &mut std::io::sink())?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(format!("{:x}", h.finalize()))
}
