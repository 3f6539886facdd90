#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sdgen::fuzz_entry::pickle(data));
