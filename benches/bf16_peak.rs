//! The CPU's peak rate of bf16 products: how many `vdpbf16ps` (AVX512-BF16, 512-bit: 32
//! multiply-adds each) and, for the clock, `vfmadd231ps` (16) one core issues a second, on
//! every core at once. No memory is touched: twelve independent accumulators, so neither
//! latency nor loads limit the rate. What the bf16 layers reach is measured against this
//! (BENCHMARKS.md: the SDXL bf16 step's lower bound).
//!
//!     cargo bench --bench bf16_peak
//!
//! Prints one JSON object; on CPUs without AVX512-BF16 it says so and exits 0.

use std::time::Instant;

const ITERS: u64 = 200_000_000;

/// Seconds for `ITERS` iterations of 12 independent `$insn`s on zmm registers.
macro_rules! timed_loop {
    ($insn:literal) => {{
        let start = Instant::now();
        // SAFETY: register-only arithmetic on zmm0-11, 20, 21 (declared clobbered) and a
        // counter; the caller checked the CPU has the instruction.
        unsafe {
            std::arch::asm!(
                "vpxord zmm20, zmm20, zmm20",
                "vpxord zmm21, zmm21, zmm21",
                "2:",
                concat!($insn, " zmm0, zmm20, zmm21"),
                concat!($insn, " zmm1, zmm20, zmm21"),
                concat!($insn, " zmm2, zmm20, zmm21"),
                concat!($insn, " zmm3, zmm20, zmm21"),
                concat!($insn, " zmm4, zmm20, zmm21"),
                concat!($insn, " zmm5, zmm20, zmm21"),
                concat!($insn, " zmm6, zmm20, zmm21"),
                concat!($insn, " zmm7, zmm20, zmm21"),
                concat!($insn, " zmm8, zmm20, zmm21"),
                concat!($insn, " zmm9, zmm20, zmm21"),
                concat!($insn, " zmm10, zmm20, zmm21"),
                concat!($insn, " zmm11, zmm20, zmm21"),
                "dec {n}",
                "jnz 2b",
                n = inout(reg) ITERS => _,
                out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _,
                out("zmm4") _, out("zmm5") _, out("zmm6") _, out("zmm7") _,
                out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _,
                out("zmm20") _, out("zmm21") _,
                options(nostack, nomem),
            );
        }
        start.elapsed().as_secs_f64()
    }};
}

#[cfg(target_arch = "x86_64")]
fn main() {
    if !(is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")) {
        println!("{{\"avx512bf16\": false}}");
        return;
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // every core runs the loops at once (all-core clocks), each reporting its rates
    let per_core: Vec<(f64, f64)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let instructions = (12 * ITERS) as f64;
                    let dot = instructions / timed_loop!("vdpbf16ps");
                    let fma = instructions / timed_loop!("vfmadd231ps");
                    (dot, fma)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let dot: f64 = per_core.iter().map(|p| p.0).sum();
    let fma: f64 = per_core.iter().map(|p| p.1).sum();
    println!(
        "{{\"threads\": {threads}, \"vdpbf16ps_per_s\": {dot:.4e}, \"bf16_gflops\": {:.1}, \"vfmadd231ps_per_s\": {fma:.4e}, \"f32_gflops\": {:.1}}}",
        dot * 64.0 / 1e9,
        fma * 32.0 / 1e9
    );
}

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    println!("{{\"avx512bf16\": false}}");
}
