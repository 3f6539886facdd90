//! PyTorch zip checkpoints built by hand, good and hostile: every hostile one is an error that
//! says what is wrong (no panic, no abort, no allocation the file cannot back), and a good one
//! reads its tensors as torch would, strided views included.

use candle_core::{DType, Device};
use candle_nn::var_builder::SimpleBackend;
use sdgen::weights::pytorch::TorchCheckpoint;
use std::io::Write;
use std::path::PathBuf;

/// LONG1 with 8 bytes: any i64.
fn int(v: i64) -> Vec<u8> {
    let mut b = vec![0x8a, 8];
    b.extend_from_slice(&v.to_le_bytes());
    b
}

fn unicode(s: &str) -> Vec<u8> {
    let mut b = vec![b'X'];
    b.extend_from_slice(&(s.len() as u32).to_le_bytes());
    b.extend_from_slice(s.as_bytes());
    b
}

fn ints(v: &[i64]) -> Vec<u8> {
    let mut b = vec![b'('];
    for &x in v {
        b.extend(int(x));
    }
    b.push(b't');
    b
}

/// One state-dict entry as torch pickles it:
/// `_rebuild_tensor_v2(('storage', torch.<class>, key, 'cpu', numel), offset, size, stride,
/// False, OrderedDict())`.
struct Entry<'a> {
    name: &'a str,
    class: &'a str,
    key: &'a str,
    numel: i64,
    offset: i64,
    size: &'a [i64],
    stride: &'a [i64],
}

/// An entry in one line: name, storage class, storage key, its element count, and the view.
fn view<'a>(
    name: &'a str,
    (class, key, numel): (&'a str, &'a str, i64),
    offset: i64,
    size: &'a [i64],
    stride: &'a [i64],
) -> Entry<'a> {
    Entry {
        name,
        class,
        key,
        numel,
        offset,
        size,
        stride,
    }
}

fn entry(e: &Entry) -> Vec<u8> {
    let mut b = unicode(e.name);
    b.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n((");
    b.extend(unicode("storage"));
    b.extend_from_slice(format!("ctorch\n{}\n", e.class).as_bytes());
    b.extend(unicode(e.key));
    b.extend(unicode("cpu"));
    b.extend(int(e.numel));
    b.extend_from_slice(b"tQ");
    b.extend(int(e.offset));
    b.extend(ints(e.size));
    b.extend(ints(e.stride));
    b.extend_from_slice(b"\x89ccollections\nOrderedDict\n)RtR");
    b
}

fn state_dict(entries: &[Entry]) -> Vec<u8> {
    let mut b = b"\x80\x02}(".to_vec();
    for e in entries {
        b.extend(entry(e));
    }
    b.extend_from_slice(b"u.");
    b
}

/// A torch zip archive `archive/data.pkl` + `archive/data/<key>` records, in a temp file;
/// with `deflate_marked`, the records' headers say "deflated" (the bytes stay as they are: the
/// reader must refuse before inflating).
fn archive(
    pickle: &[u8],
    storages: &[(&str, Vec<u8>)],
    deflate_marked: bool,
) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.ckpt");
    let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    z.start_file("archive/data.pkl", stored).unwrap();
    z.write_all(pickle).unwrap();
    for (key, bytes) in storages {
        z.start_file(format!("archive/data/{key}"), stored).unwrap();
        z.write_all(bytes).unwrap();
    }
    let mut bytes = z.finish().unwrap().into_inner();
    if deflate_marked {
        // the method field: at 8 in a local header (PK\3\4), at 10 in a central one (PK\1\2)
        for i in 0..bytes.len().saturating_sub(4) {
            let at = match &bytes[i..i + 4] {
                b"PK\x03\x04" => 8,
                b"PK\x01\x02" => 10,
                _ => continue,
            };
            let name_at = i + if at == 8 { 30 } else { 46 };
            if bytes[name_at..].starts_with(b"archive/data/") {
                bytes[i + at] = 8;
            }
        }
    }
    std::fs::write(&path, bytes).unwrap();
    (dir, path)
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn open_err(pickle: &[u8], storages: &[(&str, Vec<u8>)]) -> String {
    let (_dir, path) = archive(pickle, storages, false);
    match TorchCheckpoint::open(&path) {
        Ok(_) => panic!("a hostile checkpoint was accepted"),
        Err(e) => format!("{e:#}"),
    }
}

const SIX: [f32; 6] = [0., 1., 2., 3., 4., 5.];

#[test]
fn good_tensors_read_as_torch_stores_them() {
    let entries = [
        view("w", ("FloatStorage", "0", 6), 0, &[2, 3], &[3, 1]),
        // a transposed view of the same storage, and a slice from offset 2
        view("t", ("FloatStorage", "0", 6), 0, &[3, 2], &[1, 3]),
        view("s", ("FloatStorage", "0", 6), 2, &[4], &[1]),
        view("e", ("FloatStorage", "0", 6), 0, &[0, 3], &[3, 1]),
        view("ids", ("LongStorage", "1", 2), 0, &[2], &[1]),
        view("mask", ("BoolStorage", "2", 1), 0, &[1], &[1]),
    ];
    let storages = [
        ("0", f32_bytes(&SIX)),
        (
            "1",
            [7i64, -1].iter().flat_map(|x| x.to_le_bytes()).collect(),
        ),
        ("2", vec![1u8]),
    ];
    let (_dir, path) = archive(&state_dict(&entries), &storages, false);
    let c = TorchCheckpoint::open(&path).unwrap();
    let get = |n: &str| c.get_unchecked(n, DType::F32, &Device::Cpu);
    assert_eq!(
        get("w").unwrap().to_vec2::<f32>().unwrap(),
        [[0., 1., 2.], [3., 4., 5.]]
    );
    assert_eq!(
        get("t").unwrap().to_vec2::<f32>().unwrap(),
        [[0., 3.], [1., 4.], [2., 5.]]
    );
    assert_eq!(
        get("s").unwrap().to_vec1::<f32>().unwrap(),
        [2., 3., 4., 5.]
    );
    assert_eq!(get("e").unwrap().dims(), [0, 3]);
    let ids = c.get_unchecked("ids", DType::I64, &Device::Cpu).unwrap();
    assert_eq!(ids.to_vec1::<i64>().unwrap(), [7, -1]);
    // a type sdgen cannot hold is an error naming it, only when it is asked for
    let e = get("mask").unwrap_err().to_string();
    assert!(e.contains("mask") && e.contains("BoolStorage"), "{e}");
    let bf = c.get_unchecked("w", DType::BF16, &Device::Cpu).unwrap();
    assert_eq!(bf.dtype(), DType::BF16);
}

#[test]
fn hostile_tables_are_errors() {
    let one = |e: Entry, storages: &[(&str, Vec<u8>)]| open_err(&state_dict(&[e]), storages);
    let six = || vec![("0", f32_bytes(&SIX))];
    let base = || Entry {
        name: "w",
        class: "FloatStorage",
        key: "0",
        numel: 6,
        offset: 0,
        size: &[2, 3],
        stride: &[3, 1],
    };
    let cases: Vec<(String, &str)> = vec![
        // a 14 KB file that asks for 4 TiB: the id's count is checked against the record
        (
            one(
                Entry {
                    numel: 1 << 40,
                    size: &[1 << 20, 1 << 20],
                    stride: &[1 << 20, 1],
                    ..base()
                },
                &six(),
            ),
            "not the 1099511627776 x 4",
        ),
        (
            one(
                Entry {
                    size: &[3, 3],
                    ..base()
                },
                &six(),
            ),
            "does not fit",
        ),
        (
            one(
                Entry {
                    offset: 1,
                    ..base()
                },
                &six(),
            ),
            "does not fit",
        ),
        (
            one(
                Entry {
                    offset: -1,
                    ..base()
                },
                &six(),
            ),
            "offset",
        ),
        (
            one(
                Entry {
                    size: &[-1, 3],
                    ..base()
                },
                &six(),
            ),
            "negative",
        ),
        (
            one(
                Entry {
                    size: &[i64::MAX, 2],
                    stride: &[2, 1],
                    ..base()
                },
                &six(),
            ),
            "does not fit",
        ),
        (
            one(
                Entry {
                    size: &[2, 3],
                    stride: &[3],
                    ..base()
                },
                &six(),
            ),
            "rank",
        ),
        (
            one(
                Entry {
                    key: "../../etc/passwd",
                    ..base()
                },
                &six(),
            ),
            "not a plain name",
        ),
        (one(Entry { key: "9", ..base() }, &six()), "missing"),
        (
            one(
                Entry {
                    class: "EvilStorage",
                    ..base()
                },
                &six(),
            ),
            "unknown storage type",
        ),
        (
            one(base(), &[("0", f32_bytes(&SIX[..5]))]),
            "holds 20 bytes",
        ),
    ];
    for (err, want) in &cases {
        assert!(
            err.contains(want) && err.contains("tensor w"),
            "want {want:?}: {err}"
        );
    }
    // rebuild calls with too few arguments, or a storage that is not a persistent id
    let short = b"\x80\x02}(X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n)Ru.";
    assert!(open_err(short, &[]).contains("0 arguments"));
    let no_pid =
        b"\x80\x02}(X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n(K\x00K\x00))tRu.";
    assert!(open_err(no_pid, &[]).contains("not a persistent id"));
    // a compressed record (torch never writes one) is refused before it is inflated
    let (_dir, path) = archive(&state_dict(&[base()]), &six(), true);
    let e = format!("{:#}", TorchCheckpoint::open(&path).err().unwrap());
    assert!(e.contains("compressed"), "{e}");
}

#[test]
fn hostile_pickles_are_errors() {
    // 604-byte-class memo bomb: a list doubled 300 times through the memo
    let mut bomb = b"\x80\x02]q\x00".to_vec();
    for _ in 0..300 {
        bomb.extend_from_slice(b"h\x00h\x00\x86q\x00");
    }
    bomb.push(b'.');
    assert!(open_err(&bomb, &[]).contains("no dict of tensors"));
    // nesting 100k deep
    let mut deep = b"\x80\x02".to_vec();
    deep.extend(std::iter::repeat_n(b']', 100_000));
    deep.extend(std::iter::repeat_n(b'a', 99_999));
    deep.push(b'.');
    assert!(open_err(&deep, &[]).contains("no dict of tensors"));
    // code
    let evil = b"\x80\x02cposix\nsystem\nX\x02\x00\x00\x00id\x85R.";
    let e = open_err(evil, &[]);
    assert!(e.contains("posix.system") && e.contains("refusing"), "{e}");
    // not a zip, two pickles, none
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("old.ckpt");
    std::fs::write(&p, b"\x80\x02}q\x00.").unwrap();
    let e = format!("{:#}", TorchCheckpoint::open(&p).err().unwrap());
    assert!(e.contains("not a PyTorch zip checkpoint"), "{e}");
    let e = open_err(b"", &[("x", vec![])]);
    assert!(e.contains("ends early"), "{e}");
}

/// Through the binary: one `error:` line naming the file and the tensor, exit 1.
#[test]
fn the_cli_names_the_file_and_the_tensor() {
    let e = Entry {
        name: "model.diffusion_model.input_blocks.0.0.weight",
        class: "FloatStorage",
        key: "0",
        numel: 1 << 40,
        offset: 0,
        size: &[1 << 40],
        stride: &[1],
    };
    let (_dir, path) = archive(&state_dict(&[e]), &[("0", f32_bytes(&SIX))], false);
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_sdgen"))
        .args(["a cat", "-m", path.to_str().unwrap(), "-q"])
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: ")
            && err.contains("model.ckpt")
            && err.contains("input_blocks.0.0.weight"),
        "{err}"
    );
}
