//! PyTorch zip checkpoints (`torch.save` since torch 1.6: diffusers' `.bin` files and LDM
//! `.ckpt` files): the tensor table from `data.pkl`, read with our own [`pickle`] reader, and
//! each tensor read from its storage record when it is asked for.
//!
//! Everything in the table is checked against the archive before a byte is allocated: each
//! storage is an uncompressed record of exactly the size its type and element count give, each
//! tensor's shape and strides stay inside its storage (in checked arithmetic), and a tensor of a
//! type sdgen cannot hold is an error naming it only if it is asked for. So the size of any
//! allocation is bounded by the file's own size.
//!
//! [`pickle`]: super::pickle

use super::pickle::{self, Id, Object, Pickle};
use super::safetensors::{converted, read_vec};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// The functions a checkpoint's pickle may call: tensor and parameter rebuilding, ordered
/// dicts, and the numpy scalar constructors training frameworks store step counters with.
/// (Anything else is refused: a `.ckpt` can run code when Python loads it.)
const ALLOWED_CALLS: &[(&str, &str)] = &[
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
];

/// The largest `data.pkl` read: a full SD checkpoint's is about 200 KB.
const MAX_PICKLE_BYTES: u64 = 256 << 20;

/// A storage type torch pickles by its legacy class name: its element size, and the candle
/// type it is read as (`None`: a type sdgen has no use for, such as `BoolStorage`).
fn storage_type(class: &str) -> Option<(usize, Option<DType>)> {
    Some(match class {
        "FloatStorage" => (4, Some(DType::F32)),
        "HalfStorage" => (2, Some(DType::F16)),
        "BFloat16Storage" => (2, Some(DType::BF16)),
        "DoubleStorage" => (8, Some(DType::F64)),
        "LongStorage" => (8, Some(DType::I64)),
        "IntStorage" => (4, Some(DType::I32)),
        "ShortStorage" => (2, Some(DType::I16)),
        "ByteStorage" => (1, Some(DType::U8)),
        "CharStorage" | "BoolStorage" | "QInt8Storage" | "QUInt8Storage" => (1, None),
        "ComplexFloatStorage" => (8, None),
        "ComplexDoubleStorage" => (16, None),
        _ => return None,
    })
}

/// Where a storage's bytes are in the file.
#[derive(Debug, Clone, Copy)]
struct Storage {
    start: u64,
    elements: usize,
}

/// One tensor of the table: a view of a storage.
#[derive(Debug, Clone)]
struct TensorView {
    storage: Storage,
    /// The storage's class name, and its element type when sdgen can hold it.
    class: String,
    dtype: Option<DType>,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

/// A PyTorch zip checkpoint's tensors, read on demand.
pub struct TorchCheckpoint {
    file: std::fs::File,
    tensors: HashMap<String, TensorView>,
}

impl TorchCheckpoint {
    /// Reads and checks the tensor table of `path`. When the pickle holds a dict with a
    /// `state_dict` dict (the LDM `.ckpt` layout), the tensors are that dict's.
    pub fn open(path: &Path) -> Result<Self> {
        let refuse = |e: anyhow::Error| e.context(format!("refusing {}", path.display()));
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let mut zip = zip::ZipArchive::new(std::io::BufReader::new(&file)).map_err(|_| {
            anyhow::anyhow!(
                "{} is not a PyTorch zip checkpoint (files from torch older than 1.6 are not supported: load and save it again with a current torch, or convert it to .safetensors)",
                path.display()
            )
        })?;
        let len = file.metadata()?.len();
        let (prefix, pickle) = read_pickle(&mut zip).map_err(refuse)?;
        let tensors = tensor_table(&pickle, &prefix, &mut zip, len).map_err(refuse)?;
        Ok(Self { file, tensors })
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    /// The tensor `name` in `want` on the CPU.
    fn read(&self, name: &str, want: DType) -> candle_core::Result<Tensor> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            })?;
        let Some(dtype) = t.dtype else {
            candle_core::bail!(
                "tensor {name} is stored as torch.{}, which sdgen cannot read",
                t.class
            )
        };
        let es = dtype.size_in_bytes();
        let n: usize = t.shape.iter().product();
        let contiguous = is_contiguous(&t.shape, &t.stride);
        // the elements the view spans, from its first (checked at open to lie in the storage)
        let span = match n {
            0 => 0,
            _ if contiguous => n,
            _ => span(&t.shape, &t.stride).expect("checked at open"),
        };
        let at = t.storage.start + (t.offset * es) as u64;
        let shape = t.shape.as_slice();
        macro_rules! read {
            ($ty:ty) => {{
                let v = read_vec::<$ty>(&self.file, span, at)?;
                if contiguous {
                    v
                } else {
                    gather(&v, shape, &t.stride)
                }
            }};
        }
        match dtype {
            DType::F32 => converted(read!(f32), shape, want),
            DType::F16 => converted(read!(half::f16), shape, want),
            DType::BF16 => converted(read!(half::bf16), shape, want),
            DType::F64 => Tensor::from_vec(read!(f64), shape, &Device::Cpu)?.to_dtype(want),
            DType::I64 => Tensor::from_vec(read!(i64), shape, &Device::Cpu)?.to_dtype(want),
            DType::I32 => Tensor::from_vec(read!(i32), shape, &Device::Cpu)?.to_dtype(want),
            DType::I16 => Tensor::from_vec(read!(i16), shape, &Device::Cpu)?.to_dtype(want),
            DType::U8 => Tensor::from_vec(read!(u8), shape, &Device::Cpu)?.to_dtype(want),
            other => candle_core::bail!("tensor {name}: unexpected type {other:?}"),
        }
    }
}

super::simple_backend!(TorchCheckpoint, |r: &TorchCheckpoint, name: &str| r
    .tensors
    .contains_key(name));

/// The archive's one `<prefix>/data.pkl`, parsed.
fn read_pickle<R: std::io::Read + std::io::Seek>(
    zip: &mut zip::ZipArchive<R>,
) -> Result<(String, Pickle)> {
    let pickles: Vec<String> = zip
        .file_names()
        .filter_map(|n| n.ok())
        .filter(|n| n.matches('/').count() == 1 && n.ends_with("/data.pkl"))
        .map(|n| n.into_owned())
        .collect();
    let [name] = pickles.as_slice() else {
        bail!(
            "a PyTorch checkpoint has one <name>/data.pkl; this file has {}",
            pickles.len()
        );
    };
    let mut data = Vec::new();
    let entry = zip.by_name(name)?;
    use std::io::Read;
    entry.take(MAX_PICKLE_BYTES + 1).read_to_end(&mut data)?;
    if data.len() as u64 > MAX_PICKLE_BYTES {
        bail!("its data.pkl is larger than {} MiB", MAX_PICKLE_BYTES >> 20);
    }
    let allowed = |m: &str, n: &str| ALLOWED_CALLS.contains(&(m, n));
    let pickle = pickle::parse(&data, &allowed).map_err(|e| {
        anyhow::anyhow!("{e:#} (a .ckpt can run code when loaded by Python; convert it to .safetensors with a tool you trust)")
    })?;
    let prefix = name.strip_suffix("data.pkl").expect("filtered").to_string();
    Ok((prefix, pickle))
}

/// The tensors of the pickled dict (or of its `state_dict`), checked against the archive.
/// How many levels of dicts below the top one give tensor names.
const NESTED_DICTS: usize = 2;

fn tensor_table<R: std::io::Read + std::io::Seek>(
    p: &Pickle,
    prefix: &str,
    zip: &mut zip::ZipArchive<R>,
    file_len: u64,
) -> Result<HashMap<String, TensorView>> {
    let dict = match p.dict_get(p.root, "state_dict") {
        Some(sd) if matches!(p.get(sd), Object::Dict(_)) => sd,
        _ => p.root,
    };
    let Object::Dict(items) = p.get(dict) else {
        bail!("its pickle holds no dict of tensors");
    };
    let mut storages: HashMap<String, Storage> = HashMap::new();
    let mut tensors = HashMap::new();
    // dicts inside the dict give dotted names (an A1111 embedding's `string_to_param.*`), a
    // few levels down; walked with a stack, not recursion
    // (each inner dict once: a memo can make one dict appear under many keys)
    let mut seen = std::collections::HashSet::new();
    let mut dicts = vec![(items, String::new(), 0)];
    while let Some((items, outer, depth)) = dicts.pop() {
        for &(k, v) in items {
            let Some(name) = p.str(k) else { continue };
            let name = format!("{outer}{name}");
            if let Object::Dict(inner) = p.get(v) {
                if depth < NESTED_DICTS && seen.insert(v) {
                    dicts.push((inner, format!("{name}."), depth + 1));
                }
                continue;
            }
            let Some(rebuild) = tensor_rebuild(p, v) else {
                continue; // not a tensor: a step counter, `_metadata`, ...
            };
            let t = tensor_view(p, rebuild, (prefix, &mut *zip, file_len), &mut storages)
                .with_context(|| format!("tensor {name}"))?;
            tensors.insert(name, t);
        }
    }
    Ok(tensors)
}

/// The arguments of `_rebuild_tensor(_v2)` that make `v`, looking through a parameter.
fn tensor_rebuild(p: &Pickle, v: Id) -> Option<&[Id]> {
    let Object::Call { func, args, .. } = p.get(v) else {
        return None;
    };
    match p.global(*func)? {
        ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => p.items(*args),
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
            tensor_rebuild(p, *p.items(*args)?.first()?)
        }
        _ => None,
    }
}

/// Checks a `_rebuild_tensor(storage, offset, size, stride, ...)` against its storage.
fn tensor_view<R: std::io::Read + std::io::Seek>(
    p: &Pickle,
    args: &[Id],
    archive: (&str, &mut zip::ZipArchive<R>, u64),
    storages: &mut HashMap<String, Storage>,
) -> Result<TensorView> {
    let [storage, offset, size, stride, ..] = args else {
        bail!(
            "its rebuild call has {} arguments, not at least 4",
            args.len()
        );
    };
    let Object::PersistentId(pid) = p.get(*storage) else {
        bail!("its storage is not a persistent id");
    };
    // ('storage', torch.<Type>Storage, key, location, element count)
    let pid = p.items(*pid).unwrap_or(&[]);
    let (Some("storage"), Some(("torch", class)), Some(key), Some(elements)) = (
        pid.first().and_then(|&i| p.str(i)),
        pid.get(1).and_then(|&i| p.global(i)),
        pid.get(2).and_then(|&i| p.str(i)),
        pid.get(4).and_then(|&i| p.int(i)),
    ) else {
        bail!("its storage id is not ('storage', torch.<Type>Storage, key, location, count)");
    };
    let Some((es, dtype)) = storage_type(class) else {
        bail!("unknown storage type torch.{class}");
    };
    let elements = usize::try_from(elements).context("negative element count")?;
    let storage = match storages.get(key) {
        Some(s) => *s,
        None => {
            let s = storage_record(archive, key, es, elements)?;
            storages.insert(key.to_string(), s);
            s
        }
    };
    if storage.elements != elements {
        bail!(
            "storage {key} is given {elements} elements here and {} elsewhere",
            storage.elements
        );
    }
    let ints = |id: Id, what: &str| -> Result<Vec<usize>> {
        let v = p
            .items(id)
            .with_context(|| format!("its {what} is not a tuple"))?;
        v.iter()
            .map(|&i| p.int(i).and_then(|x| usize::try_from(x).ok()))
            .collect::<Option<Vec<_>>>()
            .with_context(|| format!("its {what} holds a negative or non-integer value"))
    };
    let shape = ints(*size, "size")?;
    let stride = ints(*stride, "stride")?;
    let offset = p
        .int(*offset)
        .and_then(|x| usize::try_from(x).ok())
        .context("its storage offset is not a non-negative integer")?;
    if shape.len() != stride.len() {
        bail!("its size {shape:?} and stride {stride:?} differ in rank");
    }
    // the view's last element must lie in the storage
    let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let end = if n == Some(0) {
        Some(offset)
    } else {
        span(&shape, &stride).and_then(|s| s.checked_add(offset))
    };
    match (n, end) {
        (Some(n), Some(end)) if end <= elements && n.checked_mul(es).is_some() => {}
        _ => bail!(
            "its view (offset {offset}, size {shape:?}, stride {stride:?}) does not fit its storage of {elements} elements"
        ),
    }
    Ok(TensorView {
        storage,
        class: class.to_string(),
        dtype,
        offset,
        shape,
        stride,
    })
}

/// The record `<prefix>data/<key>`: stored uncompressed (as torch writes it), exactly
/// `elements` x `es` bytes long, and inside the file.
fn storage_record<R: std::io::Read + std::io::Seek>(
    (prefix, zip, file_len): (&str, &mut zip::ZipArchive<R>, u64),
    key: &str,
    es: usize,
    elements: usize,
) -> Result<Storage> {
    if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        bail!("its storage key {key:?} is not a plain name");
    }
    let name = format!("{prefix}data/{key}");
    let entry = zip
        .by_name_raw(name.as_bytes())
        .with_context(|| format!("its storage record {name} is missing"))?;
    if entry.compression() != zip::CompressionMethod::Stored || entry.encrypted() {
        bail!("its storage record {name} is compressed or encrypted (torch stores them plain)");
    }
    let want = elements.checked_mul(es).map(|b| b as u64);
    if want != Some(entry.size()) || entry.compressed_size() != entry.size() {
        bail!(
            "its storage record {name} holds {} bytes, not the {elements} x {es} its id says",
            entry.size()
        );
    }
    let start = entry.data_start().context("no data offset")?;
    if start
        .checked_add(entry.size())
        .is_none_or(|end| end > file_len)
    {
        bail!("its storage record {name} runs past the end of the file");
    }
    Ok(Storage { start, elements })
}

fn is_contiguous(shape: &[usize], stride: &[usize]) -> bool {
    let mut expect = 1;
    for (&d, &s) in shape.iter().zip(stride).rev() {
        if d != 1 && s != expect {
            return false;
        }
        expect *= d;
    }
    true
}

/// 1 + the largest storage index a view with these sizes and strides reaches from its offset
/// (`None` when it overflows); only called for views with no zero size.
fn span(shape: &[usize], stride: &[usize]) -> Option<usize> {
    shape
        .iter()
        .zip(stride)
        .try_fold(1usize, |a, (&d, &s)| a.checked_add((d - 1).checked_mul(s)?))
}

/// The elements of a strided view of `v`, in row-major order.
fn gather<T: Copy>(v: &[T], shape: &[usize], stride: &[usize]) -> Vec<T> {
    let n: usize = shape.iter().product();
    let mut out = Vec::with_capacity(n);
    let mut index = vec![0usize; shape.len()];
    for _ in 0..n {
        let at: usize = index.iter().zip(stride).map(|(i, s)| i * s).sum();
        out.push(v[at]);
        for d in (0..shape.len()).rev() {
            index[d] += 1;
            if index[d] < shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_and_gathers() {
        assert!(is_contiguous(&[2, 3], &[3, 1]));
        assert!(is_contiguous(&[1, 3], &[7, 1]));
        assert!(!is_contiguous(&[2, 3], &[1, 2]));
        // a transposed 2x3 (stored 3x2 row-major)
        let v = [0, 1, 2, 3, 4, 5];
        assert_eq!(gather(&v, &[2, 3], &[1, 2]), [0, 2, 4, 1, 3, 5]);
        // an expanded row
        assert_eq!(gather(&v, &[2, 2], &[0, 1]), [0, 1, 0, 1]);
        assert_eq!(span(&[2, 3], &[1, 2]), Some(6));
        assert_eq!(span(&[2, usize::MAX], &[1, 2]), None);
    }
}
