//! CPU kernels that candle's op-by-op execution cannot match: a fused attention that never
//! materialises the whole score matrix, with a vectorised exp for its softmax.
//!
//! Why: at 512x512 each self-attention of the SD 1.5 U-Net scores 2 x 8 x 4096 x 4096 pairs.
//! Done op by op (matmul, scale, softmax, matmul) that is about 1 GB written and read back
//! several times per layer, plus a scalar `expf` per score. Here each worker takes a block of
//! query rows of one head, computes its scores into a cache-sized scratch buffer with `gemm`,
//! applies softmax in place with a polynomial exp that the compiler vectorises, and multiplies
//! by V straight into the output.

use crate::cpu::common::{contiguous, matmul, with_scratch, SharedOut};
use crate::cpu::exp::softmax_row;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Query rows per block: 64 rows x 4096 keys x 4 bytes = 1 MiB of scores, within L2.
/// Work is split across threads by head (batch x heads items).
const ROWS: usize = 64;

/// Per-thread buffers of the fused attention.
struct Scratch<'a> {
    scores: &'a mut [f32],
    kt: &'a mut [f32],
    vp: &'a mut [f32],
    o: &'a mut [f32],
}

/// softmax(q k^T * scale) v for (batch, tq, d) x (batch, tk, d) x (batch, tk, dv), f32,
/// contiguous.
struct FusedAttention {
    scale: f32,
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "sdgen-fused-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, tq, d) = ql.shape().dims3()?;
        let (_, tk, _) = kl.shape().dims3()?;
        let (_, _, dv) = vl.shape().dims3()?;
        let q = contiguous::<f32>(qs, ql, "fused attention")?;
        let k = contiguous::<f32>(ks, kl, "fused attention")?;
        let v = contiguous::<f32>(vs, vl, "fused attention")?;
        // every value is written below: no zero fill
        let mut out: Vec<f32> = Vec::with_capacity(b * tq * dv);
        let dst = SharedOut(out.as_mut_ptr());
        // V's rows padded to a multiple of 16 values: with 40 (SD 1.5 at 64x64) `gemm` would
        // repack V for every block of rows
        let dvp = dv.next_multiple_of(16);
        let len = ROWS * tk + d * tk + tk * dvp + ROWS * dvp;
        (0..b).into_par_iter().for_each(|h| {
            let dst = dst;
            with_scratch(len, |buf| {
                let (scores, rest) = buf.split_at_mut(ROWS * tk);
                let (kt, rest) = rest.split_at_mut(d * tk);
                let (vp, o) = rest.split_at_mut(tk * dvp);
                let sc = Scratch { scores, kt, vp, o };
                let k_h = &k[h * tk * d..(h + 1) * tk * d];
                let v_h = &v[h * tk * dv..(h + 1) * tk * dv];
                // K^T (d x tk) once per head: `gemm` then reads it in place instead of
                // repacking K for every block of rows
                for (key, row) in k_h.chunks_exact(d).enumerate() {
                    for (j, &x) in row.iter().enumerate() {
                        sc.kt[j * tk + key] = x;
                    }
                }
                for (src, dstrow) in v_h.chunks_exact(dv).zip(sc.vp.chunks_exact_mut(dvp)) {
                    dstrow[..dv].copy_from_slice(src);
                    dstrow[dv..].fill(0.0);
                }
                for row0 in (0..tq).step_by(ROWS) {
                    let rows = ROWS.min(tq - row0);
                    let q_blk = &q[(h * tq + row0) * d..(h * tq + row0 + rows) * d];
                    let s = &mut sc.scores[..rows * tk];
                    // SAFETY: every pointer covers rows/cols x strides of its slice.
                    unsafe {
                        // s = q_blk (rows x d) @ kt (d x tk)
                        matmul(
                            rows,
                            tk,
                            d,
                            s.as_mut_ptr(),
                            tk as isize,
                            false,
                            q_blk.as_ptr(),
                            d as isize,
                            sc.kt.as_ptr(),
                            tk as isize,
                            1,
                            gemm::Parallelism::None,
                        );
                    }
                    let mut inv = [0f32; ROWS];
                    for (r, row) in s.chunks_mut(tk).enumerate() {
                        inv[r] = 1.0 / softmax_row(row, self.scale);
                    }
                    unsafe {
                        // o = s (rows x tk) @ vp (tk x dvp)
                        matmul(
                            rows,
                            dvp,
                            tk,
                            sc.o.as_mut_ptr(),
                            dvp as isize,
                            false,
                            s.as_ptr(),
                            tk as isize,
                            sc.vp.as_ptr(),
                            dvp as isize,
                            1,
                            gemm::Parallelism::None,
                        );
                    }
                    for (r, o) in sc.o.chunks_exact(dvp).take(rows).enumerate() {
                        // SAFETY: head h owns out[h * tq * dv..(h + 1) * tq * dv]; this writes
                        // row row0 + r of it.
                        let out_row = unsafe {
                            std::slice::from_raw_parts_mut(
                                dst.0
                                    .add((h * tq + row0 + r) * dv)
                                    .cast::<std::mem::MaybeUninit<f32>>(),
                                dv,
                            )
                        };
                        for (y, &x) in out_row.iter_mut().zip(&o[..dv]) {
                            y.write(x * inv[r]);
                        }
                    }
                }
            });
        });
        // SAFETY: the heads wrote all b x tq x dv values.
        unsafe { out.set_len(b * tq * dv) };
        Ok((CpuStorage::F32(out), Shape::from((b, tq, dv))))
    }
}

/// softmax(q k^T / sqrt(d)) v over (batch, heads, len, dim) f32 CPU tensors.
pub fn fused_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (b, h, tq, d) = q.dims4()?;
    let tk = k.dim(2)?;
    let dv = v.dim(3)?;
    let q3 = q.reshape((b * h, tq, d))?.contiguous()?;
    let k3 = k.reshape((b * h, tk, d))?.contiguous()?;
    let v3 = v.reshape((b * h, tk, dv))?.contiguous()?;
    let op = FusedAttention {
        scale: 1.0 / (d as f32).sqrt(),
    };
    q3.apply_op3_no_bwd(&k3, &v3, &op)?.reshape((b, h, tq, dv))
}
