//! The AMX tile instructions (`ldtilecfg`, `tileloadd`, `tdpbf16ps`, `tilestored`) as inline
//! assembly, and the `arch_prctl` request for the tile registers; on other architectures
//! stand-ins that are never called ([`super::available`] says no there).

#[cfg(not(target_arch = "x86_64"))]
pub(super) use other::*;
#[cfg(target_arch = "x86_64")]
pub(super) use x86::*;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::asm;

    /// The 64-byte tile configuration (palette 1): tiles 0-3 hold C (16 rows x 16 f32),
    /// 4-5 A (16 rows x 32 bf16), 6-7 B (16 rows x 16 bf16 pairs).
    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    static CONFIG: TileConfig = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
        rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
    };

    pub fn request_permission() -> bool {
        // CPUID.(EAX=7, ECX=0): EDX bit 22 AMX-BF16, bit 24 AMX-TILE
        // SAFETY: cpuid is available on every x86_64 CPU.
        let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
        if leaf7.edx & (1 << 22) == 0 || leaf7.edx & (1 << 24) == 0 {
            return false;
        }
        #[cfg(target_os = "linux")]
        {
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            // SAFETY: asks the kernel for permission to use the AMX tile state; no memory.
            unsafe {
                libc::syscall(
                    libc::SYS_arch_prctl,
                    ARCH_REQ_XCOMP_PERM,
                    XFEATURE_XTILEDATA,
                ) == 0
            }
        }
        #[cfg(not(target_os = "linux"))]
        {
            false
        }
    }

    pub unsafe fn load_config() {
        asm!("ldtilecfg [{}]", in(reg) &CONFIG as *const TileConfig, options(nostack, readonly));
    }

    pub unsafe fn release() {
        asm!("tilerelease", options(nostack, nomem));
    }

    /// How far ahead (in values along a row of A) the A rows are prefetched.
    const PREFETCH: usize = 2 * super::super::KSTEP;

    /// C tiles 0-3 <- 0.
    #[inline]
    pub unsafe fn zero() {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
    }

    /// C tiles += A (32 rows at `a`, row stride `lda`, `k` columns) x B, B's two 16-column
    /// tiles at `b0` and `b1` with `sb` bytes between tile rows, advancing `b_step` values per
    /// depth step of 32.
    #[inline]
    pub unsafe fn accumulate(
        k: usize,
        a: *const u16,
        lda: usize,
        b0: *const u16,
        b1: *const u16,
        sb: isize,
        b_step: usize,
    ) {
        let sa = (lda * 2) as isize;
        let mut kk = 0;
        let mut step = 0;
        while kk < k {
            if kk + PREFETCH < k {
                // A's 32 rows are 32 streams too many for the hardware prefetchers (its tile
                // loads waited on L2): fetch each row's line two steps ahead. Convolutions
                // and linear layers 5-20% faster, measured; the same for B's rows was not.
                for r in 0..32 {
                    std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                        a.add(r * lda + kk + PREFETCH).cast(),
                    );
                }
            }
            asm!(
                // loads interleaved with the products that need them (tiles are not
                // renamed: 908 -> 1023 GFLOP/s on one core, measured)
                "tileloadd tmm4, [{a0} + {sa}*1]",
                "tileloadd tmm6, [{b0} + {sb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b1} + {sb}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a1} + {sa}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a.add(kk),
                a1 = in(reg) a.add(16 * lda + kk),
                b0 = in(reg) b0.add(step),
                b1 = in(reg) b1.add(step),
                sa = in(reg) sa,
                sb = in(reg) sb,
                options(nostack, readonly),
            );
            kk += super::super::KSTEP;
            step += b_step;
        }
    }

    /// C tiles 0 and 2 (a 32 x 16 block) += A (32 rows at `a`, row stride `lda`, `k`
    /// columns) x one panel of B from `b` (64-byte rows), C loaded from and stored to `c`
    /// (row stride `ldc`).
    #[inline]
    pub unsafe fn block_add_half(
        k: usize,
        a: *const u16,
        lda: usize,
        b: *const u16,
        c: *mut f32,
        ldc: usize,
    ) {
        let sa = (lda * 2) as isize;
        let sc = (ldc * 4) as isize;
        let c2 = c.add(16 * ldc);
        asm!(
            "tileloadd tmm0, [{c0} + {sc}*1]",
            "tileloadd tmm2, [{c2} + {sc}*1]",
            c0 = in(reg) c,
            c2 = in(reg) c2,
            sc = in(reg) sc,
            options(nostack, readonly),
        );
        let mut kk = 0;
        while kk < k {
            asm!(
                "tileloadd tmm4, [{a0} + {sa}*1]",
                "tileloadd tmm6, [{b0} + {sb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm5, [{a1} + {sa}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                a0 = in(reg) a.add(kk),
                a1 = in(reg) a.add(16 * lda + kk),
                b0 = in(reg) b.add(kk * super::super::PANEL),
                sa = in(reg) sa,
                sb = in(reg) 64isize,
                options(nostack, readonly),
            );
            kk += super::super::KSTEP;
        }
        asm!(
            "tilestored [{c0} + {sc}*1], tmm0",
            "tilestored [{c2} + {sc}*1], tmm2",
            c0 = in(reg) c,
            c2 = in(reg) c2,
            sc = in(reg) sc,
            options(nostack),
        );
    }

    /// C tiles <- 32 x 32 f32 at `c`, row stride `ldc`.
    #[inline]
    pub unsafe fn load(c: *const f32, ldc: usize) {
        let sc = (ldc * 4) as isize;
        let (c1, c2, c3) = (c.add(16), c.add(16 * ldc), c.add(16 * ldc + 16));
        asm!(
            "tileloadd tmm0, [{c0} + {sc}*1]",
            "tileloadd tmm1, [{c1} + {sc}*1]",
            "tileloadd tmm2, [{c2} + {sc}*1]",
            "tileloadd tmm3, [{c3} + {sc}*1]",
            c0 = in(reg) c,
            c1 = in(reg) c1,
            c2 = in(reg) c2,
            c3 = in(reg) c3,
            sc = in(reg) sc,
            options(nostack, readonly),
        );
    }

    /// C tiles -> 32 x 32 f32 at `c`, row stride `ldc`.
    #[inline]
    pub unsafe fn store(c: *mut f32, ldc: usize) {
        let sc = (ldc * 4) as isize;
        let (c1, c2, c3) = (c.add(16), c.add(16 * ldc), c.add(16 * ldc + 16));
        asm!(
            "tilestored [{c0} + {sc}*1], tmm0",
            "tilestored [{c1} + {sc}*1], tmm1",
            "tilestored [{c2} + {sc}*1], tmm2",
            "tilestored [{c3} + {sc}*1], tmm3",
            c0 = in(reg) c,
            c1 = in(reg) c1,
            c2 = in(reg) c2,
            c3 = in(reg) c3,
            sc = in(reg) sc,
            options(nostack),
        );
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod other {
    pub fn request_permission() -> bool {
        false
    }
    pub unsafe fn load_config() {}
    pub unsafe fn release() {}
    pub unsafe fn zero() {
        unreachable!("AMX is x86_64 only")
    }
    pub unsafe fn accumulate(
        _: usize,
        _: *const u16,
        _: usize,
        _: *const u16,
        _: *const u16,
        _: isize,
        _: usize,
    ) {
        unreachable!("AMX is x86_64 only")
    }
    pub unsafe fn store(_: *mut f32, _: usize) {
        unreachable!("AMX is x86_64 only")
    }
    pub unsafe fn load(_: *const f32, _: usize) {
        unreachable!("AMX is x86_64 only")
    }
    pub unsafe fn block_add_half(
        _: usize,
        _: *const u16,
        _: usize,
        _: *const u16,
        _: *mut f32,
        _: usize,
    ) {
        unreachable!("AMX is x86_64 only")
    }
}
