//! Helpers every CPU kernel shares: the SIMD dispatch macro, the `gemm` call, per-thread
//! scratch buffers, raw views of candle's CPU storage, and the output pointer that parallel
//! workers share. A leaf: nothing here imports another kernel module, `ops` or `models`.

pub(crate) mod bf16;
pub(crate) mod conv;

use candle_core::{CpuStorage, Layout, Result};

/// Defines `$name`, which runs `$body` (an `#[inline(always)]` function whose loops are
/// written to vectorise) compiled for AVX-512 (16 lanes) or else AVX2 + FMA (8 lanes) when the
/// CPU has them, else as built. Each lane computes the same operations in the same order
/// whatever the width, so all three give the same results.
macro_rules! simd_dispatch {
    ($vis:vis $name:ident => $body:ident ($($arg:ident : $ty:ty),*) -> $ret:ty) => {
        $vis fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn with_avx512($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn with_avx2($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports the features the function is compiled for.
                    return unsafe { with_avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports the features the function is compiled for.
                    return unsafe { with_avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

pub(crate) use simd_dispatch;

/// C (m x n, row stride `ldc`) = A (m x k, row stride `lda`) x B, plus C's values when
/// `accumulate`; B (k x n) is given by its row and column strides. The `gemm` crate's call with
/// the arguments every kernel here shares.
///
/// # Safety
/// The pointers must cover those shapes and strides; C must not overlap A or B.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul(
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    ldc: isize,
    accumulate: bool,
    a: *const f32,
    lda: isize,
    b: *const f32,
    b_rs: isize,
    b_cs: isize,
    parallelism: gemm::Parallelism,
) {
    // SAFETY: the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            ldc,
            accumulate,
            a,
            1,
            lda,
            b,
            b_cs,
            b_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's scratch buffer of `len` values, kept between calls (grown, never
/// shrunk). Its contents are whatever the last user left: callers write before they read.
/// Must not be re-entered from `f` on the same thread (a nested call gets a fresh buffer).
pub(crate) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    scratch_in(&SCRATCH, len, f)
}

/// [`with_scratch`] for the thread-local buffer `key` (one per element type).
pub(crate) fn scratch_in<T: Copy + Default, R>(
    key: &'static std::thread::LocalKey<std::cell::RefCell<Vec<T>>>,
    len: usize,
    f: impl FnOnce(&mut [T]) -> R,
) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                buf.resize(len, T::default());
            }
            f(&mut buf[..len])
        }
        Err(_) => f(&mut vec![T::default(); len]),
    })
}

/// The data of a contiguous CPU tensor of element type `T`.
pub(crate) fn contiguous<'a, T: candle_core::WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
) -> Result<&'a [T]> {
    let Ok(v) = s.as_slice::<T>() else {
        candle_core::bail!("{op}: {} only", T::DTYPE.as_str());
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{op}: inputs must be contiguous"),
    }
}

/// A raw output pointer shared by workers that write disjoint regions (the kernels here, in
/// `f32/` and in `bf16/`).
pub(crate) struct SharedOut<T>(pub(crate) *mut T);
// derived Clone/Copy would require T: Copy; the pointer is always copyable
impl<T> Clone for SharedOut<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SharedOut<T> {}
// SAFETY: every worker writes a region no other worker touches.
unsafe impl<T> Send for SharedOut<T> {}
unsafe impl<T> Sync for SharedOut<T> {}
