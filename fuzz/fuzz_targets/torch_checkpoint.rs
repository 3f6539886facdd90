#![no_main]
use std::sync::LazyLock;

static DIR: LazyLock<tempfile::TempDir> = LazyLock::new(|| tempfile::tempdir().unwrap());

libfuzzer_sys::fuzz_target!(|data: &[u8]| sdgen::fuzz_entry::torch_checkpoint(DIR.path(), data));
