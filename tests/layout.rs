//! The rule for what may import what (README, Layout), checked on the source: model code names
//! no kernel module, the kernels import neither `ops` nor the models, and `cpu/common/` and
//! `cpu/f32/` stay below the code that uses them.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(rust_files(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out
}

/// The code of a file before its unit tests (tests may compare with anything).
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

/// (file, line) of every line of the files under `src/<under>` that mentions one of `names`.
fn mentions(under: &str, names: &[&str]) -> Vec<String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut found = Vec::new();
    for f in rust_files(&src.join(under)) {
        for (i, line) in code(&f).lines().enumerate() {
            let line = line.trim_start();
            if line.starts_with("//") {
                continue;
            }
            if names.iter().any(|n| line.contains(n)) {
                found.push(format!("{}:{}: {line}", f.display(), i + 1));
            }
        }
    }
    found
}

#[test]
fn models_name_no_kernel_module() {
    let found = mentions("models", &["crate::cpu", "crate::cuda", "cpu::"]);
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn kernels_import_neither_ops_nor_models() {
    let up = [
        "crate::ops",
        "crate::models",
        "crate::pipeline",
        "crate::source",
    ];
    let found = mentions("cpu", &up);
    assert!(found.is_empty(), "{found:#?}");
    let found = mentions(
        "cpu/common",
        &["crate::cpu::f32", "crate::cpu::bf16", "super::super"],
    );
    assert!(found.is_empty(), "{found:#?}");
    let found = mentions("cpu/f32", &["crate::cpu::bf16", "super::super::bf16"]);
    assert!(found.is_empty(), "{found:#?}");
}
