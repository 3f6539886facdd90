//! bfloat16 block products with AVX512-BF16 vector dot products (`vdpbf16ps`), for CPUs that
//! have AVX512-BF16 but no AMX tiles: AMD Zen 4 and Zen 5, Intel Cooper Lake. The blocks and
//! layouts are those of the tile kernels in `tiles` (A row-major; B in VNNI pair rows, the
//! operand `vdpbf16ps` takes as it is; C f32, 32 x 32 per call), so the bf16 layers of
//! `layers` and `winograd` run on either, chosen by `super::Kernel`.
//!
//! Why: without these, such CPUs widened bf16 to f32 for the f32 kernels, so `--dtype bf16`
//! ran slower than f32, while torch (oneDNN's avx512_core_bf16 kernels, the same instruction)
//! runs its bf16 U-Net 1.7x faster than f32 on Zen 4. One 512-bit `vdpbf16ps` does 32
//! multiply-adds (16 f32 lanes, each summing a pair of products), an f32 FMA 16. On this
//! project's Intel bench machine it issues only every other cycle (1.9 G/s against 7.5 G/s
//! for `vfmadd231ps`, measured on one core): half the FMAs' flops there, where the tiles are
//! used anyway.
//!
//! Each call computes its 32 rows in groups of [`ROWS`] (8 rows x 2 vectors of 16 columns =
//! 16 accumulators, 19 of the 32 vector registers with B's two vectors and A's broadcast
//! pair); B's pair rows are read once per group, from L1.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Rows of C per register block.
const ROWS: usize = 8;

/// Whether the CPU has AVX512-BF16 (and AVX512F).
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// C (R rows at `c`, row stride `ldc`, 16 x W columns) = (or += with `add`) the sum over
/// `taps` of A_t x B_t: A_t R rows of `2 * pairs` values at its pointer (row stride `lda`);
/// B_t `pairs` pair rows at its pointer, `sb` values from one to the next, each 16 column
/// pairs (32 values) for the first 16 columns and the next 16 columns' pairs `b1` values on.
///
/// # Safety
/// The CPU has AVX512-BF16 ([`supported`]); every pointer covers what is read or written.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows<const R: usize, const W: usize>(
    taps: &[(*const u16, *const u16)],
    pairs: usize,
    lda: usize,
    sb: usize,
    b1: usize,
    c: *mut f32,
    ldc: usize,
    add: bool,
) {
    let mut acc = [[_mm512_setzero_ps(); W]; R];
    if add {
        for (r, row) in acc.iter_mut().enumerate() {
            for (w, v) in row.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(c.add(r * ldc + 16 * w));
            }
        }
    }
    for &(a, b) in taps {
        for p in 0..pairs {
            let bp = b.add(p * sb);
            let mut bv = [_mm512_setzero_si512(); W];
            for (w, v) in bv.iter_mut().enumerate() {
                *v = _mm512_loadu_si512(bp.add(w * b1).cast());
            }
            for (r, row) in acc.iter_mut().enumerate() {
                // the pair (A[r][2p], A[r][2p + 1]) in every 32-bit lane
                let pair = a.add(r * lda + 2 * p).cast::<i32>().read_unaligned();
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                for (v, bw) in row.iter_mut().zip(&bv) {
                    *v = _mm512_dpbf16_ps(*v, av, std::mem::transmute::<__m512i, __m512bh>(*bw));
                }
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (w, v) in row.iter().enumerate() {
            _mm512_storeu_ps(c.add(r * ldc + 16 * w), *v);
        }
    }
}

/// `Kernel::block` and `block_add` on vectors: C (32 x 32) = or += A (32 rows of `k`) x
/// two panels of B, the first at `b`, the second `panel_len` values on (pair rows of 32
/// values).
///
/// # Safety
/// As `Kernel::block_add`, on a CPU with AVX512-BF16.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn block(
    k: usize,
    a: *const u16,
    lda: usize,
    b: *const u16,
    panel_len: usize,
    c: *mut f32,
    ldc: usize,
    add: bool,
) {
    for g in (0..32).step_by(ROWS) {
        rows::<ROWS, 2>(
            &[(a.add(g * lda), b)],
            k / 2,
            lda,
            32,
            panel_len,
            c.add(g * ldc),
            ldc,
            add,
        );
    }
}

/// `Kernel::block_add_half` on vectors: C (32 x 16) += A (32 rows of `k`) x one panel at `b`.
///
/// # Safety
/// As `Kernel::block_add_half`, on a CPU with AVX512-BF16.
#[cfg(target_arch = "x86_64")]
pub unsafe fn block_add_half(
    k: usize,
    a: *const u16,
    lda: usize,
    b: *const u16,
    c: *mut f32,
    ldc: usize,
) {
    for g in (0..32).step_by(2 * ROWS) {
        rows::<{ 2 * ROWS }, 1>(
            &[(a.add(g * lda), b)],
            k / 2,
            lda,
            32,
            0,
            c.add(g * ldc),
            ldc,
            true,
        );
    }
}

/// `Kernel::block_taps` on vectors: C (32 x 32) = the sum over taps t of A_t x B_t, A_t at
/// `a + t * a_tap`, B_t's pair rows at `b + b_taps[t]`, `ldb` values apart (at most 9 taps).
///
/// # Safety
/// As `Kernel::block_taps`, on a CPU with AVX512-BF16.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn block_taps(
    k: usize,
    a: *const u16,
    lda: usize,
    a_tap: usize,
    b: *const u16,
    ldb: usize,
    b_taps: &[usize],
    c: *mut f32,
    ldc: usize,
) {
    assert!(b_taps.len() <= 9);
    let mut taps = [(a, b); 9];
    for g in (0..32).step_by(ROWS) {
        for (t, &bt) in b_taps.iter().enumerate() {
            taps[t] = (a.add(t * a_tap + g * lda), b.add(bt));
        }
        rows::<ROWS, 2>(
            &taps[..b_taps.len()],
            k / 2,
            lda,
            ldb,
            32,
            c.add(g * ldc),
            ldc,
            false,
        );
    }
}

// Elsewhere [`super::Kernel::Dot`] is never available: stand-ins that are never called.
#[cfg(not(target_arch = "x86_64"))]
pub(super) use other::*;
#[cfg(not(target_arch = "x86_64"))]
mod other {
    pub unsafe fn block(
        _: usize,
        _: *const u16,
        _: usize,
        _: *const u16,
        _: usize,
        _: *mut f32,
        _: usize,
        _: bool,
    ) {
        unreachable!("AVX512-BF16 is x86_64 only")
    }
    pub unsafe fn block_add_half(
        _: usize,
        _: *const u16,
        _: usize,
        _: *const u16,
        _: *mut f32,
        _: usize,
    ) {
        unreachable!("AVX512-BF16 is x86_64 only")
    }
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn block_taps(
        _: usize,
        _: *const u16,
        _: usize,
        _: usize,
        _: *const u16,
        _: usize,
        _: &[usize],
        _: *mut f32,
        _: usize,
    ) {
        unreachable!("AVX512-BF16 is x86_64 only")
    }
}
