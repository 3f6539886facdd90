//! 3x3 convolutions (stride 1, padding 1) of bf16 CPU tensors by Winograd's F(2x2, 3x3) on
//! the bf16 block kernels (`super::Kernel`: AMX tiles or AVX512-BF16 dot products).
//!
//! Why: the direct bf16 convolution (`layers::conv2d_3x3`) does 36 multiply-adds per output
//! pixel and input channel; F(2x2, 3x3) does 16 per 2 x 2 outputs, 2.25x fewer, as 16
//! products of transformed weights (cout x cin) and transformed input tiles (cin x tiles),
//! the same transforms as the f32 path (`f32::winograd`). The transformed weights and inputs are
//! rounded to bf16 for the kernels (sums stay f32), one rounding more than torch's direct
//! bf16 convolution: the test below bounds the difference from f32 on the same bf16 inputs,
//! and the image tests bound the images.
//!
//! Layouts: U, the transformed weights, (16, cout', cin) with cout' = cout rounded up to 32
//! (made once at load, [`weights`]); per task, V (16 matrices of cin x tiles) in the kernels'
//! VNNI panels, M (16 matrices of 32 x tiles, f32) per 32 output channels, then the output
//! transform, bias and rounding into the output rows.

use super::layers::{bf16_inputs, with_scratch};
use super::Kernel;
use super::{BLOCK, KSTEP, PANEL};
use crate::cpu::common::bf16::{from_bits, narrow_row, storage, widen};
use crate::cpu::common::SharedOut;
use crate::cpu::f32::winograd::{
    input_columns, output_row, transform_filter, transform_output_columns, transform_rows,
};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Tile positions: 4 x 4.
const P: usize = 16;

/// U = G g G^T of bf16 weights (cout, cin, 3, 3), rounded to bf16: (16, cout', cin), rows
/// from cout to cout' (a multiple of 32) zero.
pub fn weights(weight: &Tensor) -> Result<Tensor> {
    let (cout, cin, _, _) = weight.dims4()?;
    let w = weight
        .to_dtype(DType::BF16)?
        .flatten_all()?
        .to_vec1::<half::bf16>()?;
    let mp = cout.next_multiple_of(BLOCK);
    let mut bits = vec![0u16; P * mp * cin];
    let dst = SharedOut(bits.as_mut_ptr());
    (0..cout).into_par_iter().for_each_init(
        || vec![0f32; P * cin],
        |rows, co| {
            let dst = dst;
            // the filter's 16 rows of U (one per tile position), then rounded in place
            for ci in 0..cin {
                let g: [f32; 9] = std::array::from_fn(|k| w[(co * cin + ci) * 9 + k].to_f32());
                for (q, u) in transform_filter(g).into_iter().enumerate() {
                    rows[q * cin + ci] = u;
                }
            }
            for q in 0..P {
                // SAFETY: filter co owns row co of every U_q (co < cout <= mp).
                let d =
                    unsafe { std::slice::from_raw_parts_mut(dst.0.add((q * mp + co) * cin), cin) };
                narrow_row(&rows[q * cin..(q + 1) * cin], d);
            }
        },
    );
    Tensor::from_vec(from_bits(bits), (P, mp, cin), weight.device())
}

/// conv3x3(x, weight) + bias with padding 1 for bf16 CPU tensors: x (b, cin, h, w), `u` from
/// [`weights`], bias (cout).
pub fn conv3x3(
    kernel: Kernel,
    x: &Tensor,
    u: &Tensor,
    bias: &Tensor,
    cout: usize,
) -> Result<Tensor> {
    x.contiguous()?.apply_op3_no_bwd(
        &u.contiguous()?,
        &bias.contiguous()?,
        &Conv3x3Op { kernel, cout },
    )
}

struct Conv3x3Op {
    kernel: Kernel,
    cout: usize,
}

impl CustomOp3 for Conv3x3Op {
    fn name(&self) -> &'static str {
        "sdgen-winograd-bf16"
    }

    /// Tasks take a chunk of tile rows (of the images one after the other, so that small
    /// images share the weights' pass; about 512 KiB of V) and a range of output channels:
    /// V transformed from the input (two channels at a time, the pairs the panels hold), then
    /// per 32 output channels the 16 products on the kernel and the output transform.
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, cin, h, w) = xl.shape().dims4()?;
        let (np, mp, ucin) = ul.shape().dims3()?;
        let cout = self.cout;
        if np != P || ucin != cin || cin % KSTEP != 0 || mp < cout || mp % BLOCK != 0 {
            candle_core::bail!(
                "winograd bf16: input {:?}, weights {:?}",
                xl.dims(),
                ul.dims()
            );
        }
        let kernel = self.kernel;
        let [x, u, bias] = bf16_inputs("winograd bf16", [(xs, xl), (us, ul), (bs, bl)])?;
        let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
        // tile rows g = image x th + ty per chunk: about 512 KiB of V, and a whole number of
        // 32-tile blocks where the tile rows allow it (tw dividing 32)
        let grows = b * th;
        let step = if BLOCK % tw == 0 { BLOCK / tw } else { 1 };
        let want = ((256 << 10) / (P * cin)).max(1).div_ceil(tw);
        let rows = want.next_multiple_of(step).min(grows);
        let chunks = grows.div_ceil(rows);
        let tp_max = (rows * tw).next_multiple_of(BLOCK);
        let threads = rayon::current_num_threads();
        let mblocks = mp / BLOCK;
        let msplit = (4 * threads).div_ceil(chunks).min(mblocks);
        let mchunk = mblocks.div_ceil(msplit) * BLOCK;
        let p = h * w;
        let mut out: Vec<u16> = Vec::with_capacity(b * cout * p);
        let dst = SharedOut(out.as_mut_ptr());
        // scratch: V and two rounded rows (u16); M, two channels' f32 V, the transforms' rows
        let u16_len = P * cin * tp_max + 2 * tp_max;
        let f32_len = P * BLOCK * tp_max + 2 * P * tp_max + (tw + 2) + 16 * tw + 10 * tw;
        (0..chunks * msplit).into_par_iter().for_each_init(
            || kernel.guard(),
            |_, task| {
                let dst = dst;
                let (chunk, mc) = (task / msplit, task % msplit);
                let (g0, g1) = (chunk * rows, ((chunk + 1) * rows).min(grows));
                let tp = ((g1 - g0) * tw).next_multiple_of(BLOCK);
                let (m_lo, m_hi) = (mc * mchunk, ((mc + 1) * mchunk).min(cout));
                if m_lo >= m_hi {
                    return;
                }
                with_scratch(u16_len, |ubuf| {
                    crate::cpu::common::with_scratch(f32_len, |fbuf| {
                        let (v, r01) = ubuf.split_at_mut(P * cin * tp);
                        let (r0, r1) = r01[..2 * tp].split_at_mut(tp);
                        let (m, rest) = fbuf.split_at_mut(P * BLOCK * tp);
                        let (vf, rest) = rest.split_at_mut(2 * P * tp);
                        let (words, rest) = rest.split_at_mut(tw + 2);
                        let (cols, rest) = rest.split_at_mut(16 * tw);
                        let (s, rest) = rest.split_at_mut(8 * tw);
                        let yrow = &mut rest[..2 * tw];
                        // the tiles past the chunk's are zero (their products are not used)
                        vf.fill(0.0);
                        for ci in (0..cin).step_by(2) {
                            for (k, vk) in vf.chunks_exact_mut(P * tp).enumerate() {
                                for g in g0..g1 {
                                    let (bi, ty) = (g / th, g % th);
                                    let plane = &x[(bi * cin + ci + k) * p..][..p];
                                    let row = |iy: usize| (iy < h).then(|| &plane[iy * w..][..w]);
                                    columns(row, w, ty, words, cols);
                                    let base = (g - g0) * tw;
                                    transform_rows(cols, tw, vk, |q| q * tp + base);
                                }
                            }
                            for q in 0..P {
                                narrow_row(&vf[q * tp..(q + 1) * tp], r0);
                                narrow_row(&vf[(P + q) * tp..(P + q + 1) * tp], r1);
                                super::interleave_pair(
                                    r0,
                                    r1,
                                    &mut v[q * cin * tp..],
                                    cin * PANEL,
                                    ci * PANEL,
                                );
                            }
                        }
                        for m0 in (m_lo..m_hi).step_by(BLOCK) {
                            let nrows = BLOCK.min(cout - m0);
                            for q in 0..P {
                                for n0 in (0..tp).step_by(BLOCK) {
                                    // SAFETY: u holds 16 x mp rows of cin values (m0 + 32 <=
                                    // mp); V_q's panels cover tp columns of depth cin; M_q is
                                    // 32 x tp.
                                    unsafe {
                                        kernel.block(
                                            cin,
                                            u[(q * mp + m0) * cin..].as_ptr(),
                                            cin,
                                            v[q * cin * tp + n0 * cin..].as_ptr(),
                                            m[q * BLOCK * tp + n0..].as_mut_ptr(),
                                            tp,
                                        );
                                    }
                                }
                            }
                            for i in 0..nrows {
                                let co = m0 + i;
                                for g in g0..g1 {
                                    let (bi, ty) = (g / th, g % th);
                                    let base = (g - g0) * tw;
                                    let mat = |q: usize| &m[(q * BLOCK + i) * tp + base..][..tw];
                                    transform_output_columns(mat, tw, s);
                                    for r in 0..2 {
                                        let oy = 2 * ty + r;
                                        if oy >= h {
                                            break;
                                        }
                                        let y = &mut yrow[..w];
                                        output_row(s, tw, r, widen(bias[co]), y);
                                        // SAFETY: this task owns output channels m_lo..m_hi
                                        // of tile rows g0..g1 (output rows 2 ty, 2 ty + 1 of
                                        // image bi).
                                        let d = unsafe {
                                            std::slice::from_raw_parts_mut(
                                                dst.0.add((bi * cout + co) * p + oy * w),
                                                w,
                                            )
                                        };
                                        narrow_row(y, d);
                                    }
                                }
                            }
                        }
                    })
                });
            },
        );
        // SAFETY: the tasks wrote every output row of every channel of every image.
        unsafe { out.set_len(b * cout * p) };
        Ok((storage(out), Shape::from((b, cout, h, w))))
    }
}

/// The column half of V = B^T d B for tile row `ty` of one bf16 channel (`row(iy)` its input
/// row iy, `None` below the image): `cols[r][c][tx]` for the tile's input rows r < 4 and
/// columns c < 4, as `winograd::transform_input` makes them from f32. The row is copied with
/// a zero either side into `words` (tw + 2 values), whose 32-bit word t is then the pair
/// (x[2t - 1], x[2t]): a bf16 value is the top half of its f32, so each is one shift or
/// mask, in vector code.
fn columns<'a>(
    row: impl Fn(usize) -> Option<&'a [u16]>,
    w: usize,
    ty: usize,
    words: &mut [f32],
    cols: &mut [f32],
) {
    let tw = w.div_ceil(2);
    // SAFETY: f32 and u32 have the same size and alignment; the u16 view covers the same
    // 2 (tw + 2) halves and is dropped before the words are read.
    let words: &mut [u32] =
        unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast(), tw + 2) };
    for r in 0..4 {
        let out = &mut cols[r * 4 * tw..(r + 1) * 4 * tw];
        let Some(row) = (2 * ty + r).checked_sub(1).and_then(&row) else {
            out.fill(0.0);
            continue;
        };
        {
            // SAFETY: as above.
            let halves: &mut [u16] =
                unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast(), 2 * (tw + 2)) };
            halves[0] = 0;
            halves[1..=w].copy_from_slice(row);
            halves[w + 1..].fill(0);
        }
        let (c0, rest) = out.split_at_mut(tw);
        let (c1, rest) = rest.split_at_mut(tw);
        let (c2, c3) = rest.split_at_mut(tw);
        let lo = |x: u32| f32::from_bits(x << 16);
        let hi = |x: u32| f32::from_bits(x & 0xffff_0000);
        let pairs = words.iter().zip(&words[1..]);
        let outs = c0.iter_mut().zip(c1).zip(c2.iter_mut().zip(c3));
        for ((&w0, &w1), ((c0, c1), (c2, c3))) in pairs.zip(outs) {
            [*c0, *c1, *c2, *c3] = input_columns([lo(w0), hi(w0), lo(w1), hi(w1)]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::bf16::layers::tests::{conv_f32, rand, rel_diff};

    /// Integers -2..=2 (x) or halves -1..=1 (weights, bias): every transformed value, product
    /// and sum exact in bf16 and f32, so that only the result's rounding is left.
    fn small(shape: &[usize], seed: u64, scale: f64) -> Tensor {
        let t = rand(shape, seed).to_dtype(DType::F32).unwrap();
        ((t * 5.0).unwrap().round().unwrap() * scale)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap()
    }

    #[test]
    fn matches_f32_on_the_same_bf16_inputs() {
        // no kernel here (checked against /proc/cpuinfo in `bf16`'s tests): nothing to run
        for kernel in crate::cpu::bf16::available_kernels() {
            {
                // (b, cin, h, w, cout): odd sizes, tile rows of 1..32 tiles, chunks of
                // several tile rows, cout not a multiple of 32 (and below it)
                for &(b, cin, h, w, cout) in &[
                    (2usize, 32usize, 9usize, 7usize, 40usize),
                    (1, 64, 5, 1, 3),
                    (2, 96, 16, 16, 64),
                    (1, 32, 40, 33, 32),
                    (1, 64, 64, 64, 32),
                ] {
                    let case = format!("{kernel:?} ({b}, {cin}, {h}, {w}, {cout})");
                    // exact values: only the result rounded (2^-9, as the direct convolution)
                    let (x, wt, bias) = (
                        small(&[b, cin, h, w], 1, 1.0),
                        small(&[cout, cin, 3, 3], 2, 0.5),
                        small(&[cout], 3, 0.5),
                    );
                    let d = diff_from_f32(kernel, &x, &wt, &bias);
                    assert!(d < 1.0 / 256.0, "{case} exact: {d}");
                    // spread values: the transformed inputs and weights rounded to bf16 too
                    // (measured 0.004-0.010 on these shapes, the direct convolution below
                    // 0.004)
                    let (x, wt, bias) = (
                        rand(&[b, cin, h, w], 7),
                        rand(&[cout, cin, 3, 3], 8),
                        rand(&[cout], 9),
                    );
                    let d = diff_from_f32(kernel, &x, &wt, &bias);
                    assert!(d < 1.0 / 64.0, "{case}: {d}");
                }
            }
        }
    }

    /// [`conv3x3`]'s largest difference from candle's f32 convolution of the same values.
    fn diff_from_f32(kernel: Kernel, x: &Tensor, wt: &Tensor, bias: &Tensor) -> f32 {
        let cout = wt.dim(0).unwrap();
        let g = crate::cpu::common::conv::ConvGeometry {
            stride: 1,
            padding: 1,
        };
        assert!(crate::cpu::bf16::layers::conv3x3_fits(wt, g));
        let got = conv3x3(kernel, x, &weights(wt).unwrap(), bias, cout).unwrap();
        let want = conv_f32(x, wt, bias, g);
        assert_eq!(got.dims(), want.dims());
        rel_diff(&got, &want)
    }
}
