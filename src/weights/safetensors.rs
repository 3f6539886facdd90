//! safetensors files read tensor by tensor, on all threads, converted to the model's type.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// A safetensors file read tensor by tensor with positioned reads.
///
/// candle's memory-mapped reader keeps the whole file mapped while it copies each tensor out,
/// so loading the 3.4 GB SD 1.5 U-Net briefly needs twice that in resident memory; reading
/// each tensor into its own buffer needs the weights once.
pub struct SafetensorsReader {
    file: std::fs::File,
    data_start: u64,
    tensors: HashMap<String, (DType, Vec<usize>, u64, u64)>,
    /// Tensors of types sdgen cannot hold (e.g. int32 buffers): an error naming the type if
    /// one is asked for.
    unsupported: HashMap<String, ::safetensors::Dtype>,
    /// The header's `__metadata__` strings.
    pub metadata: HashMap<String, String>,
}

impl SafetensorsReader {
    pub fn open(path: &Path) -> Result<Self> {
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let len = file.metadata()?.len();
        let mut n = [0u8; 8];
        file.read_exact_at(&mut n, 0)
            .context("not a safetensors file (too short)")?;
        let header_len = u64::from_le_bytes(n);
        if header_len > 100_000_000 || 8 + header_len > len {
            // (also the safetensors crate's limit)
            bail!("not a safetensors file (bad header length)");
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact_at(&mut header, 8)?;
        // the safetensors crate's own checks, as Python's loader makes them: offsets in order,
        // contiguous from 0, each range the size its shape and type make (checked arithmetic:
        // offsets that wrap around or overlap, and shapes too large to allocate, are errors)
        let header: ::safetensors::tensor::Metadata = serde_json::from_slice(&header)
            .map_err(|e| anyhow::anyhow!("not a valid safetensors file: {e}"))?;
        let data_start = 8 + header_len;
        let data_end = data_start.checked_add(header.data_len() as u64);
        match data_end {
            Some(end) if end == len => {}
            Some(end) if end < len => bail!(
                "not a valid safetensors file: {} bytes after the tensors its header describes",
                len - end
            ),
            _ => bail!(
                "the file is truncated ({len} bytes; its header describes {} bytes of tensors after {data_start})",
                header.data_len()
            ),
        }
        let metadata = header.metadata().clone().unwrap_or_default();
        let mut tensors = HashMap::new();
        let mut unsupported = HashMap::new();
        for (name, info) in header.tensors() {
            use ::safetensors::Dtype as S;
            let dtype = match info.dtype {
                S::F32 => DType::F32,
                S::F16 => DType::F16,
                S::BF16 => DType::BF16,
                S::F64 => DType::F64,
                S::I64 => DType::I64,
                S::U32 => DType::U32,
                S::U8 => DType::U8,
                other => {
                    unsupported.insert(name, other);
                    continue;
                }
            };
            let (start, end) = info.data_offsets;
            tensors.insert(name, (dtype, info.shape.clone(), start as u64, end as u64));
        }
        Ok(Self {
            file,
            data_start,
            tensors,
            unsupported,
            metadata,
        })
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys().chain(self.unsupported.keys())
    }

    /// The tensor `name` in `want`: float tensors are read and converted on all threads
    /// (loading the 3.4 GB f32 U-Net went through one core: 2.2 s of a 4.2 s load in the
    /// kernel's page zeroing and copying, then candle's one-thread conversion for bf16).
    fn read(&self, name: &str, want: DType) -> candle_core::Result<Tensor> {
        if let Some(t) = self.unsupported.get(name) {
            candle_core::bail!("tensor {name} is stored as {t:?}, which sdgen cannot read");
        }
        let (dtype, shape, start, end) =
            self.tensors
                .get(name)
                .ok_or_else(|| candle_core::Error::CannotFindTensor {
                    path: name.to_string(),
                })?;
        let n: usize = shape.iter().product();
        let offset = self.data_start + start;
        debug_assert_eq!((end - start) as usize, n * dtype.size_in_bytes());
        let shape = shape.as_slice();
        match dtype {
            DType::F32 => converted(read_vec::<f32>(&self.file, n, offset)?, shape, want),
            DType::F16 => converted(read_vec::<half::f16>(&self.file, n, offset)?, shape, want),
            DType::BF16 => converted(read_vec::<half::bf16>(&self.file, n, offset)?, shape, want),
            _ => {
                let mut buf = vec![0u8; (end - start) as usize];
                self.file.read_exact_at(&mut buf, offset)?;
                Tensor::from_raw_buffer(&buf, *dtype, shape, &Device::Cpu)?.to_dtype(want)
            }
        }
    }
}

/// Reads `n` little-endian values straight into their final buffer (one copy, no zeroing),
/// large tensors in 4 MiB pieces on all threads. (Also the PyTorch reader's.)
pub(super) fn read_vec<T: candle_core::WithDType>(
    file: &std::fs::File,
    n: usize,
    offset: u64,
) -> std::io::Result<Vec<T>> {
    use rayon::prelude::*;
    const PIECE: usize = 4 << 20;
    let mut v: Vec<T> = Vec::with_capacity(n);
    // SAFETY: the byte view covers exactly the capacity; the reads fill all of it or one
    // fails (then the vector is dropped with length 0); T is a plain number type (any bits
    // are a value), little-endian as safetensors and torch store them, on a little-endian
    // target.
    unsafe {
        let bytes =
            std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, n * std::mem::size_of::<T>());
        if bytes.len() <= PIECE {
            file.read_exact_at(bytes, offset)?;
        } else {
            bytes
                .par_chunks_mut(PIECE)
                .enumerate()
                .try_for_each(|(i, piece)| {
                    file.read_exact_at(piece, offset + (i * PIECE) as u64)
                })?;
        }
        v.set_len(n);
    }
    Ok(v)
}

/// A float type the safetensors files store, widened exactly to f32.
pub(super) trait StoredFloat: candle_core::WithDType + Sync {
    fn wide(self) -> f32;
}

impl StoredFloat for f32 {
    fn wide(self) -> f32 {
        self
    }
}

impl StoredFloat for half::f16 {
    fn wide(self) -> f32 {
        self.to_f32()
    }
}

impl StoredFloat for half::bf16 {
    fn wide(self) -> f32 {
        self.to_f32()
    }
}

/// `v` as a CPU tensor of `want`: as it is when the types agree, else converted on all
/// threads through f32 (which holds f16 and bf16 exactly), rounding as candle's `to_dtype`
/// does.
pub(super) fn converted<S: StoredFloat>(
    v: Vec<S>,
    shape: &[usize],
    want: DType,
) -> candle_core::Result<Tensor> {
    use rayon::prelude::*;
    fn map<S: StoredFloat, D: Send>(v: &[S], f: impl Fn(f32) -> D + Sync) -> Vec<D> {
        v.par_iter()
            .with_min_len(1 << 16)
            .map(|&x| f(x.wide()))
            .collect()
    }
    let dev = &Device::Cpu;
    match want {
        _ if want == S::DTYPE => Tensor::from_vec(v, shape, dev),
        DType::F32 => Tensor::from_vec(map(&v, |x| x), shape, dev),
        DType::F16 => Tensor::from_vec(map(&v, half::f16::from_f32), shape, dev),
        DType::BF16 => Tensor::from_vec(map(&v, half::bf16::from_f32), shape, dev),
        _ => Tensor::from_vec(v, shape, dev)?.to_dtype(want),
    }
}

super::simple_backend!(SafetensorsReader, |r: &SafetensorsReader, name: &str| {
    r.tensors.contains_key(name) || r.unsupported.contains_key(name)
});

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::var_builder::SimpleBackend;

    /// The reader's conversions give what candle's `to_dtype` gives (NaN, infinities,
    /// subnormals, rounding ties), also for a tensor read in several pieces.
    #[test]
    fn reads_and_converts_as_candle_does() {
        let special = [
            f32::NAN,
            f32::INFINITY,
            -f32::INFINITY,
            1e-40,
            -3e-39,
            f32::from_bits(0x3f80_8000), // a tie between two bf16 values
            f32::from_bits(0x3f81_8000),
            65519.0,
            1e-7,
            -0.0,
        ];
        // 3M values: 12 MB of f32, read in 4 MiB pieces
        let big: Vec<f32> = (0..3_000_000u32)
            .map(|i| {
                special
                    .get(i as usize)
                    .copied()
                    .unwrap_or((i.wrapping_mul(7919) % 10007) as f32 / 313.0 - 16.0)
            })
            .collect();
        let dev = Device::Cpu;
        let t32 = Tensor::from_vec(big, (3, 1_000_000), &dev).unwrap();
        let t16 = t32.to_dtype(DType::F16).unwrap();
        let tb16 = t32.to_dtype(DType::BF16).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        candle_core::safetensors::save(
            &HashMap::from([
                ("f32".to_string(), t32.clone()),
                ("f16".to_string(), t16.clone()),
                ("bf16".to_string(), tb16.clone()),
            ]),
            &path,
        )
        .unwrap();
        let r = SafetensorsReader::open(&path).unwrap();
        let bits = |t: &Tensor| -> Vec<u32> {
            match t.dtype() {
                DType::F32 => t
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect(),
                DType::F16 => t
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<half::f16>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits() as u32)
                    .collect(),
                _ => t
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<half::bf16>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits() as u32)
                    .collect(),
            }
        };
        for (name, src) in [("f32", &t32), ("f16", &t16), ("bf16", &tb16)] {
            for want in [DType::F32, DType::F16, DType::BF16] {
                let got = r.read(name, want).unwrap();
                assert_eq!(got.dims(), src.dims());
                assert_eq!(got.dtype(), want);
                assert!(
                    bits(&got) == bits(&src.to_dtype(want).unwrap()),
                    "{name} -> {want:?}"
                );
            }
        }
    }

    /// Headers that used to panic, or to read past the data, or to allocate what the file
    /// does not hold, are errors before any tensor is read.
    #[test]
    fn hostile_headers_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, header: &str, data_len: usize| {
            let path = dir.path().join(name);
            let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
            bytes.extend(header.as_bytes());
            bytes.extend(vec![0u8; data_len]);
            std::fs::write(&path, bytes).unwrap();
            path
        };
        let f32x2 = |offsets: &str| {
            format!(r#"{{"a":{{"dtype":"F32","shape":[2],"data_offsets":{offsets}}}}}"#)
        };
        let cases = [
            ("no offsets", f32x2("[]"), 8, "not a valid safetensors file"),
            ("one offset", f32x2("[0]"), 8, "not a valid safetensors file"),
            ("end before start", f32x2("[8,0]"), 8, "not a valid safetensors file"),
            (
                "wrapping start",
                f32x2("[18446744073709551608,0]"),
                8,
                "not a valid safetensors file",
            ),
            (
                "overlapping",
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#.to_string(),
                12,
                "not a valid safetensors file",
            ),
            (
                "shape overflowing",
                r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#.to_string(),
                8,
                "not a valid safetensors file",
            ),
            (
                "1 GiB declared, 8 bytes there",
                r#"{"a":{"dtype":"F32","shape":[268435456],"data_offsets":[0,1073741824]}}"#.to_string(),
                8,
                "truncated",
            ),
            ("bytes after the data", f32x2("[0,8]"), 12, "bytes after the tensors"),
            ("not JSON", "{\"a\":".to_string(), 0, "not a valid safetensors file"),
        ];
        for (what, header, data_len, want) in cases {
            let path = file("x.safetensors", &header, data_len);
            let err = match SafetensorsReader::open(&path) {
                Ok(_) => panic!("{what}: accepted"),
                Err(e) => format!("{e:#}"),
            };
            assert!(err.contains(want), "{what}: {err}");
        }
        // the same header with its 8 bytes reads
        let path = file("ok.safetensors", &f32x2("[0,8]"), 8);
        let r = SafetensorsReader::open(&path).unwrap();
        assert_eq!(r.read("a", DType::F32).unwrap().dims(), &[2]);
        // a tensor of a type sdgen cannot hold is there, and an error naming its type (it was
        // "cannot find tensor")
        let path = file(
            "i32.safetensors",
            r#"{"a":{"dtype":"I32","shape":[2],"data_offsets":[0,8]}}"#,
            8,
        );
        let r = SafetensorsReader::open(&path).unwrap();
        assert!(r.contains_tensor("a"));
        let err = r.read("a", DType::F32).unwrap_err().to_string();
        assert!(err.contains("tensor a") && err.contains("I32"), "{err}");
    }
}
