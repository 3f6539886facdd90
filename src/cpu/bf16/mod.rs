//! bfloat16 matrix products on the CPU, f32 accumulators and bf16 inputs, on one of two
//! engines: Intel AMX tiles (`tdpbf16ps`, [`tiles`]) or, on CPUs with AVX512-BF16 and no AMX
//! (AMD Zen 4), vector dot products (`vdpbf16ps`, [`dot`]). [`Kernel`] is the one interface
//! the bf16 layers ([`layers`], [`winograd`]) call; the engine is chosen when a model's weights
//! are prepared (`ops`) and handed to every call, never read from global state.
//!
//! Why: neither candle nor the `gemm` crate has a bf16 product on the CPU (candle stops with
//! "unsupported dtype BF16 for op matmul"; `gemm` widens to f32), so `--dtype bf16` ran at f32
//! speed plus the conversions. torch reaches its bf16 speed on such CPUs through oneDNN's AMX
//! kernels. One AMX tile multiply does 16 x 16 x 32 multiply-adds; measured on one core of
//! this project's bench machine (Xeon with AMX, 2.6 GHz) the 32 x 32 block below runs at
//! 1.8-1.9 TFLOP/s with A in L1 and B in L1 or L2 (depth 320), 1.1-1.4 when both stream from
//! L2, against about 100 GFLOP/s for the f32 AVX-512 kernels.
//!
//! The instructions are written as inline assembly (the AMX intrinsics are not stable Rust).
//! Linux hands out the tile registers only to processes that ask (`arch_prctl`
//! `ARCH_REQ_XCOMP_PERM`); [`available`] asks once and says no when the CPU or the kernel
//! cannot, and [`Kernel::from_env`] then picks the dot products, or none: callers keep their
//! f32 path.
//!
//! Layouts (bf16 values as `u16` bits):
//! - A: row-major, `lda` elements between rows, used 32 rows and 32 columns at a time.
//! - B: "VNNI panels" of 16 columns: a panel holds k/2 rows of 64 bytes, row r being the 16
//!   pairs (B[2r][j], B[2r+1][j]) for its columns j. [`PANEL`] columns, `k * PANEL` elements.
//! - C: f32, produced 32 x 32 at a time into a caller's block.

use std::sync::OnceLock;

/// Columns per B panel (one tile is 16 rows of 16 f32 results).
pub const PANEL: usize = 16;
/// Rows and columns of the C block one call of [`Kernel::block`] produces (2 x 2 tiles).
pub const BLOCK: usize = 32;
/// The depth (k) step of one tile multiply: 32 bf16 values per A row (64 bytes).
pub const KSTEP: usize = 32;

/// A C block on the stack, its rows on cache lines: the tiles store 64-byte rows, and a row
/// across two lines costs both (see `allocator` for what misplaced rows cost).
#[repr(C, align(64))]
pub struct CBlock(pub [f32; BLOCK * BLOCK]);

impl CBlock {
    pub fn zeroed() -> Self {
        CBlock([0.0; BLOCK * BLOCK])
    }
}

/// The instructions the bf16 block products run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// AMX tiles (`tdpbf16ps`): Intel Xeon, Sapphire Rapids and later.
    Tiles,
    /// AVX512-BF16 vector dot products (`vdpbf16ps`, see `dot`): AMD Zen 4 and later,
    /// Intel Cooper Lake.
    Dot,
}

impl Kernel {
    /// The kernel for bf16 layers: `SDGEN_BF16_KERNEL=tiles|dot|f32` in the environment
    /// (`f32`: none, the layers widen to f32), else the fastest one this CPU and OS have:
    /// tiles, then dot products (`SDGEN_NO_AMX=1` leaves the tiles out). A kernel asked for
    /// that is not [`available`] falls back the same way.
    pub fn from_env() -> Option<Kernel> {
        let asked = std::env::var("SDGEN_BF16_KERNEL").unwrap_or_default();
        match asked.as_str() {
            "f32" => return None,
            "tiles" if available(Kernel::Tiles) => return Some(Kernel::Tiles),
            "dot" if available(Kernel::Dot) => return Some(Kernel::Dot),
            _ => {}
        }
        let no_tiles = std::env::var_os("SDGEN_NO_AMX").is_some_and(|v| v != "0");
        available_kernels()
            .into_iter()
            .find(|&k| !(no_tiles && k == Kernel::Tiles))
    }

    /// Whether 3x3 convolutions on this kernel go through Winograd ([`winograd`]) rather than
    /// the direct product ([`layers::conv2d_3x3`]): on the dot products, where it is 1.8-2.3x
    /// faster on every convolution shape of SD 1.5's U-Net and VAE; not on AMX tiles, where
    /// the direct convolution's products are fast enough that the transforms cost more than
    /// the products they save (0.5-1.3x; one machine, 2 threads: BENCHMARKS.md, session 6).
    pub fn prefers_winograd(self) -> bool {
        self == Kernel::Dot
    }
}

/// Whether this CPU and OS can run `k` (asked once).
pub fn available(k: Kernel) -> bool {
    match k {
        Kernel::Tiles => {
            static TILES: OnceLock<bool> = OnceLock::new();
            *TILES.get_or_init(imp::request_permission)
        }
        Kernel::Dot => dot::supported(),
    }
}

/// Every kernel this CPU and OS can run, fastest first.
pub fn available_kernels() -> Vec<Kernel> {
    [Kernel::Tiles, Kernel::Dot]
        .into_iter()
        .filter(|&k| available(k))
        .collect()
}

/// What a thread needs before it calls a kernel's blocks: for the tiles, their configuration
/// loaded on the thread for the life of the guard (released, `tilerelease`, when dropped);
/// nothing for the dot products.
pub struct TileGuard(bool);

impl Drop for TileGuard {
    fn drop(&mut self) {
        if self.0 {
            // SAFETY: a configuration was loaded by `Kernel::guard`.
            unsafe { imp::release() };
        }
    }
}

impl Kernel {
    /// The depth step of this kernel's blocks: `k` is a multiple of it ([`KSTEP`] on the
    /// tiles, a pair of values for the dot products).
    pub fn kstep(self) -> usize {
        match self {
            Kernel::Tiles => KSTEP,
            Kernel::Dot => 2,
        }
    }

    /// The guard every thread that calls this kernel's blocks holds.
    pub fn guard(self) -> TileGuard {
        match self {
            Kernel::Tiles => {
                assert!(
                    available(self),
                    "AMX tiles used on a CPU or OS without them"
                );
                // SAFETY: AMX is supported and this process has the permission.
                unsafe { imp::load_config() };
                TileGuard(true)
            }
            Kernel::Dot => TileGuard(false),
        }
    }

    /// C (32 x 32 f32 at `c`, row stride `ldc`) = A (32 rows, `k` columns, row stride `lda`) x
    /// B (two consecutive VNNI panels of depth `k` starting at `b`); `k` a multiple of
    /// [`Kernel::kstep`].
    ///
    /// # Safety
    /// This kernel's [`TileGuard`] lives on this thread; `a` has 32 readable rows of `k`
    /// values at stride `lda`, `b` has `2 * k * PANEL` readable values, `c` 32 writable rows
    /// of 32 values at stride `ldc`.
    #[inline]
    pub unsafe fn block(
        self,
        k: usize,
        a: *const u16,
        lda: usize,
        b: *const u16,
        c: *mut f32,
        ldc: usize,
    ) {
        debug_assert_eq!(k % self.kstep(), 0);
        match self {
            Kernel::Tiles => {
                imp::zero();
                imp::accumulate(k, a, lda, b, b.add(k * PANEL), 64, KSTEP * PANEL);
                imp::store(c, ldc);
            }
            Kernel::Dot => dot::block(k, a, lda, b, k * PANEL, c, ldc, false),
        }
    }

    /// C (32 x 32 f32 at `c`, row stride `ldc`) += A (32 rows, `k` columns, row stride `lda`)
    /// x B, B's first panel read from `b` (any depth offset into a panel) and its second
    /// `panel_len` values further on; `k` a multiple of [`Kernel::kstep`].
    ///
    /// # Safety
    /// As [`Kernel::block`], with `k * PANEL` readable values at `b` and at `b + panel_len`.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    pub unsafe fn block_add(
        self,
        k: usize,
        a: *const u16,
        lda: usize,
        b: *const u16,
        panel_len: usize,
        c: *mut f32,
        ldc: usize,
    ) {
        debug_assert_eq!(k % self.kstep(), 0);
        match self {
            Kernel::Tiles => {
                imp::load(c, ldc);
                imp::accumulate(k, a, lda, b, b.add(panel_len), 64, KSTEP * PANEL);
                imp::store(c, ldc);
            }
            Kernel::Dot => dot::block(k, a, lda, b, panel_len, c, ldc, true),
        }
    }

    /// As [`Kernel::block_add`] for a C block of 32 x 16 (one panel of B at `b`).
    ///
    /// # Safety
    /// As [`Kernel::block_add`], with `k * PANEL` readable values at `b` and 32 rows of 16
    /// values at `c`.
    #[inline]
    pub unsafe fn block_add_half(
        self,
        k: usize,
        a: *const u16,
        lda: usize,
        b: *const u16,
        c: *mut f32,
        ldc: usize,
    ) {
        debug_assert_eq!(k % self.kstep(), 0);
        match self {
            Kernel::Tiles => imp::block_add_half(k, a, lda, b, c, ldc),
            Kernel::Dot => dot::block_add_half(k, a, lda, b, c, ldc),
        }
    }

    /// C (32 x 32 f32 at `c`, row stride `ldc`) = the sum over taps t of A_t x B_t: the
    /// product of a direct convolution. A_t: 32 rows of `k` values at `a + t * a_tap`, row
    /// stride `lda`. B_t: "pair planes", the k/2 rows of B pairs (B[2r][j], B[2r+1][j]) for
    /// consecutive columns j, `ldb` values from one pair row to the next; B_t's first column
    /// at `b + b_taps[t]`. `k` a multiple of [`Kernel::kstep`], at most 9 taps.
    ///
    /// # Safety
    /// This kernel's [`TileGuard`] lives on this thread; for each tap, `a + t * a_tap` has 32
    /// readable rows of `k` values at stride `lda`, `b + b_taps[t]` has k/2 readable rows of
    /// 64 values at stride `ldb`; `c` 32 writable rows of 32 values at stride `ldc`.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    pub unsafe fn block_taps(
        self,
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
        debug_assert_eq!(k % self.kstep(), 0);
        match self {
            Kernel::Tiles => {
                imp::zero();
                for (t, &bt) in b_taps.iter().enumerate() {
                    let b0 = b.add(bt);
                    // 16 pairs of 2 values per tile row: the second tile 32 values on
                    imp::accumulate(
                        k,
                        a.add(t * a_tap),
                        lda,
                        b0,
                        b0.add(2 * PANEL),
                        (ldb * 2) as isize,
                        KSTEP / 2 * ldb,
                    );
                }
                imp::store(c, ldc);
            }
            Kernel::Dot => dot::block_taps(k, a, lda, a_tap, b, ldb, b_taps, c, ldc),
        }
    }

    /// The blocks of C's 32 rows and `n` columns (a multiple of [`BLOCK`]): [`Kernel::block`]
    /// for the panels at `b` (row stride `ldc` in C).
    ///
    /// # Safety
    /// As [`Kernel::block`] for each 32 columns: `b` has `k * n` values, `c` 32 rows of `n`
    /// values.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    pub unsafe fn block_row(
        self,
        k: usize,
        a: *const u16,
        lda: usize,
        b: *const u16,
        n: usize,
        c: *mut f32,
        ldc: usize,
    ) {
        for n0 in (0..n).step_by(BLOCK) {
            self.block(k, a, lda, b.add(n0 * k), c.add(n0), ldc);
        }
    }
}

mod dot;
pub(crate) mod layers;
mod tiles;
pub(crate) mod winograd;

use tiles as imp;

/// Packs B (`kv` x `n`, element (r, j) at `src[r * rs + j * cs]`) into VNNI panels of depth
/// `k` (a multiple of the kernel's [`Kernel::kstep`], at least `kv`), with zero rows from `kv`
/// to `k` and zero columns up to `n` rounded up to [`BLOCK`]. `dst` must hold
/// `k * n.next_multiple_of(BLOCK)` values.
pub fn pack_b(src: &[u16], k: usize, kv: usize, n: usize, rs: usize, cs: usize, dst: &mut [u16]) {
    let np = n.next_multiple_of(BLOCK);
    assert!(dst.len() >= k * np && kv <= k && k % 2 == 0);
    if n == 0 || kv == 0 {
        dst[..k * np].fill(0);
        return;
    }
    assert!((kv - 1) * rs + (n - 1) * cs < src.len());
    let dst = &mut dst[..k * np];
    if kv < k || n < np {
        dst.fill(0);
    }
    // element (r, col) goes to panel col / 16, row r / 2, pair position col % 16, r % 2
    let at = |r: usize, col: usize| packed_index(k, r, col);
    // SAFETY (both loops): r < kv and col < n, so the source index is within the asserted
    // bound and the destination index below k * np.
    if cs == 1 {
        // rows contiguous in the source: whole panels' columns a row pair at a time (the
        // attention's V: element by element this took ~5% of a 1024-token attention), then
        // the rest element by element
        let full = if rs >= n { n / PANEL * PANEL } else { 0 };
        for r in (0..kv & !1).step_by(2) {
            if full > 0 {
                let (r0, r1) = (&src[r * rs..][..full], &src[(r + 1) * rs..][..full]);
                interleave_pair(r0, r1, dst, k * PANEL, r * PANEL);
            }
        }
        for r in 0..kv {
            let first = if r < kv & !1 { full } else { 0 };
            for col in first..n {
                unsafe { *dst.get_unchecked_mut(at(r, col)) = *src.get_unchecked(r * rs + col) };
            }
        }
    } else if rs == 1 && kv % 2 == 0 {
        // columns contiguous (a weight row per column): the pairs move as 32-bit words
        for col in 0..n {
            let s = src[col * cs..col * cs + kv].as_ptr();
            for r2 in 0..kv / 2 {
                // SAFETY: 2 r2 + 1 < kv values from s; at(2 r2, col) + 1 < k * np.
                unsafe {
                    let pair = s.add(2 * r2).cast::<u32>().read_unaligned();
                    dst.as_mut_ptr()
                        .add(at(2 * r2, col))
                        .cast::<u32>()
                        .write_unaligned(pair);
                }
            }
        }
    } else {
        // columns contiguous (or neither): read column by column
        for col in 0..n {
            for r in 0..kv {
                unsafe {
                    *dst.get_unchecked_mut(at(r, col)) = *src.get_unchecked(r * rs + col * cs)
                };
            }
        }
    }
}

/// Where [`pack_b`] puts element (r, col) of B in panels of depth `k`: panel col / 16, row
/// r / 2, pair position col % 16, r % 2.
#[inline(always)]
pub fn packed_index(k: usize, r: usize, col: usize) -> usize {
    (col / PANEL) * k * PANEL + (r / 2) * 2 * PANEL + (col % PANEL) * 2 + (r & 1)
}

/// Writes rows `r0` and `r1` (a row pair of B, `r0.len()` a multiple of [`PANEL`] columns) into
/// VNNI panels of `panel_len` values each, at `offset` within every panel.
pub fn interleave_pair(
    r0: &[u16],
    r1: &[u16],
    panels: &mut [u16],
    panel_len: usize,
    offset: usize,
) {
    interleave(r0, r1, panels, panel_len, offset)
}

#[inline(always)]
fn interleave_body(r0: &[u16], r1: &[u16], panels: &mut [u16], panel_len: usize, offset: usize) {
    for (q, (s0, s1)) in r0
        .chunks_exact(PANEL)
        .zip(r1.chunks_exact(PANEL))
        .enumerate()
    {
        let d = &mut panels[q * panel_len + offset..][..2 * PANEL];
        for j in 0..PANEL {
            d[2 * j] = s0[j];
            d[2 * j + 1] = s1[j];
        }
    }
}

/// out = r0[0], r1[0], r0[1], r1[1], ...: a row pair as VNNI pairs.
pub fn zip_pairs(r0: &[u16], r1: &[u16], out: &mut [u16]) {
    zip(r0, r1, out)
}

#[inline(always)]
fn zip_body(r0: &[u16], r1: &[u16], out: &mut [u16]) {
    for ((o, &a), &b) in out.chunks_exact_mut(2).zip(r0).zip(r1) {
        o[0] = a;
        o[1] = b;
    }
}

crate::cpu::common::simd_dispatch!(zip => zip_body(r0: &[u16], r1: &[u16], out: &mut [u16]) -> ());

crate::cpu::common::simd_dispatch!(interleave => interleave_body(r0: &[u16], r1: &[u16], panels: &mut [u16], panel_len: usize, offset: usize) -> ());

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    /// Whether /proc/cpuinfo lists the AMX flags (so that the tests below cannot pass by
    /// quietly not running the kernel on a machine that has it).
    fn cpu_lists_amx() -> bool {
        std::fs::read_to_string("/proc/cpuinfo")
            .map(|s| s.contains(" amx_bf16") && s.contains(" amx_tile"))
            .unwrap_or(false)
    }

    /// Whether /proc/cpuinfo lists AVX512-BF16.
    fn cpu_lists_avx512_bf16() -> bool {
        std::fs::read_to_string("/proc/cpuinfo")
            .map(|s| s.contains(" avx512_bf16"))
            .unwrap_or(false)
    }

    #[test]
    fn kernels_are_available_where_the_cpu_lists_them() {
        assert_eq!(available(Kernel::Tiles), cpu_lists_amx());
        assert_eq!(available(Kernel::Dot), cpu_lists_avx512_bf16());
        let env = |k| std::env::var_os(k).is_some();
        if !env("SDGEN_NO_AMX") && !env("SDGEN_BF16_KERNEL") {
            assert_eq!(Kernel::from_env(), available_kernels().first().copied());
        }
    }

    #[test]
    fn blocks_match_a_direct_product() {
        // no kernel here (checked against /proc/cpuinfo above): nothing to run
        for kernel in available_kernels() {
            blocks_match_a_direct_product_on(kernel);
        }
    }

    /// Every element of B lands where `packed_index` says, the padding zero, for each of
    /// `pack_b`'s paths (rows contiguous with whole and partial panels and an odd last row,
    /// columns contiguous, neither).
    #[test]
    fn pack_b_places_every_element() {
        let src: Vec<u16> = (1..=5000u16).collect();
        // (k, kv, n, rs, cs)
        for (k, kv, n, rs, cs) in [
            (8usize, 7usize, 40usize, 50usize, 1usize),
            (6, 6, 32, 33, 1),
            (10, 9, 20, 1, 12),
            (4, 3, 5, 7, 2),
        ] {
            let np = n.next_multiple_of(BLOCK);
            let mut dst = vec![u16::MAX; k * np];
            pack_b(&src, k, kv, n, rs, cs, &mut dst);
            let mut want = vec![0u16; k * np];
            for r in 0..kv {
                for col in 0..n {
                    want[packed_index(k, r, col)] = src[r * rs + col * cs];
                }
            }
            assert_eq!(dst, want, "k {k} kv {kv} n {n} rs {rs} cs {cs}");
        }
    }

    fn blocks_match_a_direct_product_on(kernel: Kernel) {
        let (k, lda, n) = (96, 100, 32);
        let val = |i: usize| bf16::from_f32(((i * 37 % 101) as f32 - 50.0) / 16.0);
        let a: Vec<bf16> = (0..32 * lda).map(val).collect();
        let b: Vec<bf16> = (0..k * 40).map(|i| val(i * 3 + 1)).collect(); // k x 40, use 32 cols from col 5
        let bits = |v: &[bf16]| v.iter().map(|x| x.to_bits()).collect::<Vec<u16>>();
        let bb = bits(&b);
        let mut packed = vec![0u16; k * n];
        pack_b(&bb[5..], k, k, n, 40, 1, &mut packed);
        // C into a wider matrix (row stride 50) to check the stride
        let mut c = vec![f32::NAN; 32 * 50];
        let _g = kernel.guard();
        unsafe {
            kernel.block(
                k,
                bits(&a).as_ptr(),
                lda,
                packed.as_ptr(),
                c.as_mut_ptr(),
                50,
            )
        };
        for i in 0..32 {
            for j in 0..n {
                let want: f64 = (0..k)
                    .map(|kk| a[i * lda + kk].to_f64() * b[kk * 40 + 5 + j].to_f64())
                    .sum();
                // inputs are multiples of 1/16 below 4: exact products, f32 sums exact too
                assert_eq!(c[i * 50 + j] as f64, want, "{kernel:?} ({i}, {j})");
            }
        }
    }
}
