//! The linear layer (with the fused GEGLU projection), the convolutions and the attention for
//! bf16 CPU tensors on a bf16 [`Kernel`] (AMX tiles or AVX512-BF16 dot products, given by the
//! caller): bf16 inputs and weights, f32 accumulation, bias added in f32, result rounded to
//! bf16 once, as torch's bf16 CPU layers do. `ops` calls these for the weights it prepared
//! for them (packed panels, per-tap matrices).

use super::{interleave_pair, Kernel, BLOCK, KSTEP, PANEL};
use crate::cpu::common::bf16::{
    contiguous_bits, from_bits, narrow_biased_row, narrow_row, narrow_scaled_row,
    narrow_shifted_row, storage, widen,
};
use crate::cpu::common::conv::{patch_row, ConvGeometry};
use crate::cpu::common::SharedOut;
use crate::cpu::exp::{exp_row_bf16, row_max_f32};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::borrow::Cow;

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<u16>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `common::with_scratch` for bf16 values.
pub(crate) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [u16]) -> R) -> R {
    crate::cpu::common::scratch_in(&SCRATCH, len, f)
}

/// The three inputs of an op as bf16 bits.
pub(crate) fn bf16_inputs<'a>(
    op: &str,
    inputs: [(&'a CpuStorage, &Layout); 3],
) -> Result<[&'a [u16]; 3]> {
    let [a, b, c] = inputs;
    Ok([
        contiguous_bits(a.0, a.1, op)?,
        contiguous_bits(b.0, b.1, op)?,
        contiguous_bits(c.0, c.1, op)?,
    ])
}

/// Where the bias of a block comes from: one value per output row (convolution: channels are
/// rows) or per column (linear: features are columns); the slices start at the block.
#[derive(Clone, Copy)]
enum Bias<'a> {
    None,
    Rows(&'a [u16]),
    Cols(&'a [u16]),
}

/// Writes the first `rows` x `cols` values of a 32 x 32 block plus the bias, rounded to bf16,
/// to `dst` (row stride `ld`).
///
/// # Safety
/// `dst` has `rows` writable rows of `cols` values at stride `ld`, owned by the caller.
#[inline]
unsafe fn store(c: &[f32; 1024], dst: *mut u16, ld: usize, rows: usize, cols: usize, bias: Bias) {
    for i in 0..rows {
        let d = std::slice::from_raw_parts_mut(dst.add(i * ld), cols);
        let src = &c[i * BLOCK..i * BLOCK + cols];
        match bias {
            Bias::None => narrow_row(src, d),
            Bias::Rows(b) => narrow_shifted_row(src, widen(b[i]), d),
            Bias::Cols(b) => narrow_biased_row(src, &b[..cols], d),
        }
    }
}

struct LinearOp {
    kernel: Kernel,
    has_bias: bool,
    /// The weight's rows (output features); the panels hold them rounded up to 32.
    n: usize,
    /// The panels hold a GEGLU projection in [`geglu_order`]: the output is n / 2 features,
    /// hidden * gelu(gate), computed from the f32 accumulators.
    geglu: bool,
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "sdgen-linear-amx"
    }

    /// x (m x k rows, k a multiple of 32) times weight^T, the weight (n x k) given as VNNI
    /// panels ([`pack_linear_weight`]): each worker takes a range of rows and goes through
    /// the panels in cache-sized chunks, 32 x 32 outputs at a time.
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let kernel = self.kernel;
        let [x, wp, bias] = bf16_inputs("amx linear", [(xs, xl), (ps, pl), (bs, bl)])?;
        let (np, k) = pl.shape().dims2()?;
        let n = self.n;
        let dims = xl.shape().dims();
        if dims.last() != Some(&k) || k % KSTEP != 0 || np != n.next_multiple_of(BLOCK) {
            candle_core::bail!("amx linear: input {dims:?}, panels ({np}, {k}) for {n} outputs");
        }
        if self.geglu && (n % BLOCK != 0 || np != n) {
            candle_core::bail!("amx linear: a GEGLU projection of {n} features");
        }
        let m = x.len() / k;
        // the output's features: n, or n / 2 for a GEGLU projection
        let n_out = if self.geglu { n / 2 } else { n };
        let mut out: Vec<u16> = Vec::with_capacity(m * n_out);
        let dst = SharedOut(out.as_mut_ptr());
        let row_blocks = m.div_ceil(BLOCK);
        let threads = rayon::current_num_threads();
        let task_rows = row_blocks.div_ceil(4 * threads).max(1) * BLOCK;
        // columns per chunk: about 512 KiB of packed weights, reused by all the task's rows
        let chunk = ((256 << 10) / k).max(BLOCK) / BLOCK * BLOCK;
        (0..m.div_ceil(task_rows)).into_par_iter().for_each_init(
            || kernel.guard(),
            |_, t| {
                let dst = dst;
                let (r0, r1) = (t * task_rows, ((t + 1) * task_rows).min(m));
                let mut c = super::CBlock::zeroed();
                let c = &mut c.0;
                with_scratch(BLOCK * k, |pad| {
                    for c0 in (0..np).step_by(chunk) {
                        for m0 in (r0..r1).step_by(BLOCK) {
                            let rows = BLOCK.min(r1 - m0);
                            let a = if rows == BLOCK {
                                &x[m0 * k..]
                            } else {
                                pad.fill(0);
                                pad[..rows * k].copy_from_slice(&x[m0 * k..(m0 + rows) * k]);
                                &pad[..]
                            };
                            for n0 in (c0..(c0 + chunk).min(np)).step_by(BLOCK) {
                                // n0 < np, the multiple of 32 at or above n: n0 < n
                                let cols = BLOCK.min(n - n0);
                                let b = if self.has_bias {
                                    Bias::Cols(&bias[n0..])
                                } else {
                                    Bias::None
                                };
                                // SAFETY: a has 32 rows of k values (row stride k), wp two panels
                                // at n0 * k; the task owns output rows r0..r1 (for GEGLU
                                // the block gives outputs n0 / 2..n0 / 2 + 16 of them).
                                unsafe {
                                    kernel.block(
                                        k,
                                        a.as_ptr(),
                                        k,
                                        wp[n0 * k..].as_ptr(),
                                        c.as_mut_ptr(),
                                        BLOCK,
                                    );
                                    if self.geglu {
                                        let b = self.has_bias.then(|| &bias[n0..]);
                                        let d = dst.0.add(m0 * n_out + n0 / 2);
                                        crate::cpu::geglu::geglu_block(c, b, rows, d, n_out);
                                    } else {
                                        let d = dst.0.add(m0 * n + n0);
                                        store(c, d, n, rows, cols, b);
                                    }
                                }
                            }
                        }
                    }
                });
            },
        );
        // SAFETY: the tasks wrote all m x n_out values.
        unsafe { out.set_len(m * n_out) };
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("at least one dim") = n_out;
        Ok((storage(out), Shape::from(out_dims)))
    }
}

/// A linear layer's bf16 weight (n, k), k a multiple of 32, as the VNNI panels
/// [`linear_packed`] reads: (n rounded up to 32, k) values in panel order. Layers make them
/// once at load (packing them on every call cost 3-4% of a U-Net step).
pub fn pack_linear_weight(weight: &Tensor) -> Result<Tensor> {
    let (n, k) = weight.dims2()?;
    if k % KSTEP != 0 || weight.dtype() != DType::BF16 {
        candle_core::bail!("amx linear: weight ({n}, {k}) of {:?}", weight.dtype());
    }
    let np = n.next_multiple_of(BLOCK);
    let w = weight.flatten_all()?.to_vec1::<half::bf16>()?;
    // SAFETY: bf16 is a transparent u16.
    let w = unsafe { std::slice::from_raw_parts(w.as_ptr().cast::<u16>(), w.len()) };
    let mut panels = vec![0u16; k * np];
    panels
        .par_chunks_mut(k * BLOCK)
        .enumerate()
        .for_each(|(i, dst)| {
            super::pack_b(
                &w[i * BLOCK * k..],
                k,
                k,
                BLOCK.min(n - i * BLOCK),
                1,
                k,
                dst,
            );
        });
    Tensor::from_vec(from_bits(panels), (np, k), weight.device())
}

/// The weight (n, k) back from [`pack_linear_weight`]'s panels.
#[cfg(test)] // layers use the packed weights; the tests check the packing
pub fn unpack_linear_weight(panels: &Tensor, n: usize) -> Result<Tensor> {
    let (np, k) = panels.dims2()?;
    let p = panels.flatten_all()?.to_vec1::<half::bf16>()?;
    let mut w = Vec::with_capacity(n * k);
    for col in 0..n.min(np) {
        for r in 0..k {
            w.push(p[super::packed_index(k, r, col)]);
        }
    }
    Tensor::from_vec(w, (n, k), panels.device())
}

/// `nn.Linear` of bf16 CPU tensors on `kernel`: x (..., in), the weight (out, in) as
/// [`pack_linear_weight`] gives it, bias (out).
pub fn linear_packed(
    kernel: Kernel,
    x: &Tensor,
    panels: &Tensor,
    bias: Option<&Tensor>,
    n: usize,
) -> Result<Tensor> {
    apply_linear(kernel, x, panels, bias, n, false)
}

/// Runs [`LinearOp`] (no bias: an empty tensor in its place).
fn apply_linear(
    kernel: Kernel,
    x: &Tensor,
    panels: &Tensor,
    bias: Option<&Tensor>,
    n: usize,
    geglu: bool,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let none = Tensor::zeros(0, DType::BF16, x.device())?;
    let op = LinearOp {
        kernel,
        has_bias: bias.is_some(),
        n,
        geglu,
    };
    x.apply_op3_no_bwd(panels, &bias.unwrap_or(&none).contiguous()?, &op)
}

/// diffusers' GEGLU projection's weight (2 inner, k) or bias (2 inner) rows reordered so that
/// each 32 features are 16 hidden ones and the 16 gate ones that go with them: what
/// [`linear_geglu`] takes (after [`pack_linear_weight`] for the weight). `inner` a multiple
/// of 16.
pub fn geglu_order(t: &Tensor) -> Result<Tensor> {
    swap_row_groups(t, [2, t.dim(0)? / 32])
}

/// The inverse of [`geglu_order`].
#[cfg(test)] // layers use the packed weights; the tests check the packing
pub fn geglu_order_undone(t: &Tensor) -> Result<Tensor> {
    swap_row_groups(t, [t.dim(0)? / 32, 2])
}

/// t's rows as groups (outer, inner, 16 rows each), the two group indices swapped.
fn swap_row_groups(t: &Tensor, [outer, inner]: [usize; 2]) -> Result<Tensor> {
    let mut split = vec![outer, inner, 16];
    split.extend(&t.dims()[1..]);
    t.reshape(split)?
        .transpose(0, 1)?
        .contiguous()?
        .reshape(t.shape())
}

/// diffusers' `GEGLU` (projection to [hidden | gate], then hidden * gelu(gate), exact erf)
/// of bf16 CPU tensors on `kernel` in one pass: the weight (2 inner, in) as
/// `pack_linear_weight(geglu_order(weight))`, the bias as `geglu_order(bias)`. The GELU is
/// taken from the f32 accumulators as each block is stored, so the 2 inner-wide projection
/// is never written (for SD 1.5's 320 -> 2560 over 8192 tokens: 42 MB written and read
/// again, and a separate pass).
pub fn linear_geglu(
    kernel: Kernel,
    x: &Tensor,
    panels: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    apply_linear(kernel, x, panels, bias, panels.dim(0)?, true)
}

/// `nn.Linear` of bf16 CPU tensors on `kernel`: x (..., in), weight (out, in), bias (out); `in`
/// a multiple of 32 (see [`linear_fits`]). Packs the weight for this call.
#[cfg(test)] // layers use the packed weights; the tests check the packing
pub fn linear(
    kernel: Kernel,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    linear_packed(
        kernel,
        x,
        &pack_linear_weight(weight)?,
        bias,
        weight.dim(0)?,
    )
}

/// Whether [`linear`] takes a weight of this shape (input features a multiple of 32).
pub fn linear_fits(weight: &Tensor) -> bool {
    weight.dim(1).is_ok_and(|k| k % KSTEP == 0)
}

struct Conv2dOp {
    kernel: Kernel,
    g: ConvGeometry,
}

impl CustomOp3 for Conv2dOp {
    fn name(&self) -> &'static str {
        "sdgen-conv2d-amx"
    }

    /// x (b, cin, h, w), weight (cout, cin, kh, kw), bias (cout): the weights are the A
    /// matrix as they are (cout x cin*kh*kw, padded with zeros to multiples of 32 only when
    /// they are not); each task unfolds a block of output pixels straight into VNNI panels
    /// and writes the NCHW output 32 channels x 32 pixels at a time.
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, cin, h, wd) = xl.shape().dims4()?;
        let (cout, _, kh, kw) = wl.shape().dims4()?;
        let kernel = self.kernel;
        let [x, w, bias] = bf16_inputs("amx conv2d", [(xs, xl), (ws, wl), (bs, bl)])?;
        let ConvGeometry { stride, padding } = self.g;
        let (ho, wo) = self.g.output_size(h, wd, kh, kw);
        let p = ho * wo;
        let k = cin * kh * kw;
        let (kp, mp) = (k.next_multiple_of(KSTEP), cout.next_multiple_of(BLOCK));
        let a: Cow<[u16]> = if (kp, mp) == (k, cout) {
            Cow::Borrowed(w)
        } else {
            let mut a = vec![0u16; mp * kp];
            for (dst, src) in a.chunks_mut(kp).zip(w.chunks(k)) {
                dst[..k].copy_from_slice(src);
            }
            Cow::Owned(a)
        };
        // pixels per task: about 1 MiB of panels (of 256 KiB to 2 MiB, measured best on the
        // 320 and 640 channel layers and within 10% on the others)
        let pb = ((512 << 10) / kp).clamp(BLOCK, 1024) / BLOCK * BLOCK;
        let pb = pb.min(p.next_multiple_of(BLOCK));
        let blocks = p.div_ceil(pb);
        let mut out: Vec<u16> = Vec::with_capacity(b * cout * p);
        let dst = SharedOut(out.as_mut_ptr());
        let a = &a[..];
        (0..b * blocks).into_par_iter().for_each_init(
            || kernel.guard(),
            |_, task| {
                let dst = dst;
                let (bi, p0) = (task / blocks, (task % blocks) * pb);
                let n = pb.min(p - p0);
                let np = n.next_multiple_of(BLOCK);
                let xb = &x[bi * cin * h * wd..(bi + 1) * cin * h * wd];
                with_scratch(kp * np + 2 * np, |buf| {
                    let (panels, rows) = buf.split_at_mut(kp * np);
                    let (r0, r1) = rows.split_at_mut(np);
                    // row pair (2 r2, 2 r2 + 1) of the patch matrix, interleaved into the panels
                    let direct = (kh, kw, stride, padding) == (1, 1, 1, 0) && n == np;
                    for r2 in 0..kp / 2 {
                        let pair = [2 * r2, 2 * r2 + 1];
                        if direct && pair[1] < k {
                            // 1x1: the patch rows are the input planes themselves
                            let row = |c: usize| &xb[c * h * wd + p0..][..n];
                            interleave_pair(
                                row(pair[0]),
                                row(pair[1]),
                                panels,
                                kp * PANEL,
                                r2 * 2 * PANEL,
                            );
                            continue;
                        }
                        for (row, kk) in [&mut *r0, &mut *r1].into_iter().zip(pair) {
                            row[n..].fill(0);
                            if kk < k {
                                let (c, ky, kx) = (kk / (kh * kw), (kk / kw) % kh, kk % kw);
                                let plane = &xb[c * h * wd..(c + 1) * h * wd];
                                patch_row(plane, h, wd, wo, ky, kx, self.g, p0, &mut row[..n], 0);
                            } else {
                                row[..n].fill(0);
                            }
                        }
                        interleave_pair(r0, r1, panels, kp * PANEL, r2 * 2 * PANEL);
                    }
                    let mut c = super::CBlock::zeroed();
                    let c = &mut c.0;
                    for m0 in (0..cout).step_by(BLOCK) {
                        for n0 in (0..n).step_by(BLOCK) {
                            // SAFETY: a has mp >= m0 + 32 rows of kp values, panels two panels
                            // at n0 * kp; this task owns out[bi, :, p0..p0+n].
                            unsafe {
                                kernel.block(
                                    kp,
                                    a[m0 * kp..].as_ptr(),
                                    kp,
                                    panels[n0 * kp..].as_ptr(),
                                    c.as_mut_ptr(),
                                    BLOCK,
                                );
                                store(
                                    &c,
                                    dst.0.add(bi * cout * p + m0 * p + p0 + n0),
                                    p,
                                    BLOCK.min(cout - m0),
                                    BLOCK.min(n - n0),
                                    Bias::Rows(&bias[m0..]),
                                );
                            }
                        }
                    }
                });
            },
        );
        // SAFETY: the tasks wrote all b x cout x p values.
        unsafe { out.set_len(b * cout * p) };
        Ok((storage(out), Shape::from((b, cout, ho, wo))))
    }
}

/// 2-D convolution (groups 1, dilation 1) of bf16 CPU tensors on `kernel`.
pub fn conv2d(
    kernel: Kernel,
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    g: ConvGeometry,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    x.apply_op3_no_bwd(
        &weight.contiguous()?,
        &bias.contiguous()?,
        &Conv2dOp { kernel, g },
    )
}

/// Whether [`conv2d_3x3`] (and `winograd::conv3x3`) takes this convolution: 3x3, stride
/// 1, padding 1, input channels a multiple of 32 (the tiles' depth step, so that either
/// kernel takes the weights).
pub fn conv3x3_fits(weight: &Tensor, g: ConvGeometry) -> bool {
    matches!(weight.dims4(), Ok((_, cin, 3, 3)) if cin % KSTEP == 0)
        && (g.stride, g.padding) == (1, 1)
}

/// A 3x3 convolution's weights (cout, cin, 3, 3) as [`conv2d_3x3`] takes them: one cout x cin
/// matrix per tap (ky, kx), rows padded with zeros to a multiple of 32: (9, cout', cin).
pub fn conv3x3_taps(weight: &Tensor) -> Result<Tensor> {
    let (cout, cin, kh, kw) = weight.dims4()?;
    let taps = kh * kw;
    let mp = cout.next_multiple_of(BLOCK);
    let w = weight.flatten_all()?.to_vec1::<half::bf16>()?;
    // on all threads: candle's permute-then-copy ran on one (a quarter of a bf16 load)
    let mut out = vec![half::bf16::ZERO; taps * mp * cin];
    let dst = SharedOut(out.as_mut_ptr());
    (0..cout).into_par_iter().for_each(|co| {
        let dst = dst;
        for ci in 0..cin {
            for t in 0..taps {
                // SAFETY: output channel co owns row co of every tap (co < cout <= mp).
                unsafe { *dst.0.add((t * mp + co) * cin + ci) = w[(co * cin + ci) * taps + t] };
            }
        }
    });
    Tensor::from_vec(out, (taps, mp, cin), weight.device())
}

/// The weights (cout, cin, 3, 3) back from [`conv3x3_taps`].
#[cfg(test)] // layers use the packed weights; the tests check the packing
pub fn conv3x3_weight(taps: &Tensor, cout: usize) -> Result<Tensor> {
    let (ntaps, _, cin) = taps.dims3()?;
    if ntaps != 9 {
        candle_core::bail!("amx conv3x3: taps {:?}", taps.dims());
    }
    taps.narrow(1, 0, cout)?
        .reshape((3, 3, cout, cin))?
        .permute((2, 3, 0, 1))?
        .contiguous()
}

struct Conv3x3Op {
    kernel: Kernel,
    cout: usize,
}

impl CustomOp3 for Conv3x3Op {
    fn name(&self) -> &'static str {
        "sdgen-conv3x3-amx"
    }

    /// x (b, cin, h, w), taps (9, cout', cin) from [`conv3x3_taps`], bias (cout): a direct
    /// convolution, no patch matrix. The input is copied once into zero-bordered "pair
    /// planes" ((h + 2) x (w + 2) pixels, channels 2r and 2r + 1 side by side), the layout a
    /// tile of B reads with one row per channel pair; a tap (ky, kx) is then the same planes
    /// read ky (w + 2) + kx pixels further on. Outputs are computed over the padded width
    /// (w + 2 columns per row, the last two discarded) and the 9 taps accumulate on the
    /// tiles. Against the im2col path (which unfolds 9 x cin rows per pixel block) this
    /// moves 9x less data before the products: 1280 channels at 16x16 12-13 -> 10 ms, 2560
    /// -> 1280 at 8x8 8.4-8.8 -> 7.4 ms, 320 channels at 64x64 about the same (2 threads,
    /// batch 2).
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, cin, h, wd) = xl.shape().dims4()?;
        let (ntaps, mp, tcin) = tl.shape().dims3()?;
        let cout = self.cout;
        if ntaps != 9 || tcin != cin || cin % KSTEP != 0 || mp < cout || mp % BLOCK != 0 {
            candle_core::bail!("amx conv3x3: input {:?}, taps {:?}", xl.dims(), tl.dims());
        }
        let kernel = self.kernel;
        let [x, taps, bias] = bf16_inputs("amx conv3x3", [(xs, xl), (ts, tl), (bs, bl)])?;
        let wp = wd + 2;
        let ncols = h * wp;
        let ncp = ncols.next_multiple_of(BLOCK);
        // a plane holds the padded image and what the last column block reads past it
        let plane = (ncp + 2 * wp + 2).next_multiple_of(PANEL);
        let (pairs, ldb) = (cin / 2, 2 * plane);
        let mut pp = vec![0u16; b * pairs * ldb];
        pp.par_chunks_mut(ldb).enumerate().for_each(|(i, dst)| {
            let (bi, r) = (i / pairs, i % pairs);
            let c0 = &x[(bi * cin + 2 * r) * h * wd..][..h * wd];
            let c1 = &x[(bi * cin + 2 * r + 1) * h * wd..][..h * wd];
            for y in 0..h {
                let row = &mut dst[((y + 1) * wp + 1) * 2..][..2 * wd];
                super::zip_pairs(&c0[y * wd..][..wd], &c1[y * wd..][..wd], row);
            }
        });
        // column blocks of about 512 KiB of pair planes; the output channels split too when
        // that leaves fewer than 4 tasks per thread
        let pb = ((256 << 10) / cin).clamp(BLOCK, 2048) / BLOCK * BLOCK;
        let pb = pb.min(ncp);
        let blocks = ncp.div_ceil(pb);
        let threads = rayon::current_num_threads();
        let mblocks = mp / BLOCK;
        let msplit = (4 * threads).div_ceil(b * blocks).min(mblocks);
        let mchunk = mblocks.div_ceil(msplit) * BLOCK;
        let p = h * wd;
        let mut out: Vec<u16> = Vec::with_capacity(b * cout * p);
        let dst = SharedOut(out.as_mut_ptr());
        let (pp, taps) = (&pp[..], taps);
        let mut b_taps = [0usize; 9];
        for (t, bt) in b_taps.iter_mut().enumerate() {
            *bt = 2 * ((t / 3) * wp + t % 3);
        }
        (0..b * blocks * msplit).into_par_iter().for_each_init(
            || kernel.guard(),
            |_, task| {
                let dst = dst;
                let (bi, blk, mc) = (
                    task / (blocks * msplit),
                    task / msplit % blocks,
                    task % msplit,
                );
                let (q0, q1) = (blk * pb, ((blk + 1) * pb).min(ncp));
                let (m_lo, m_hi) = (mc * mchunk, ((mc + 1) * mchunk).min(cout));
                let planes = &pp[bi * pairs * ldb..(bi + 1) * pairs * ldb];
                let mut c = super::CBlock::zeroed();
                let c = &mut c.0;
                for m0 in (m_lo..m_hi).step_by(BLOCK) {
                    let rows = BLOCK.min(cout - m0);
                    for n0 in (q0..q1).step_by(BLOCK) {
                        // SAFETY: taps has 9 x mp rows of cin values (m0 + 32 <= mp); the
                        // planes hold cin / 2 rows of ldb values, and n0 + 31 plus the
                        // largest tap offset is within a plane; this task owns output
                        // channels m_lo..m_hi of the pixels in columns q0..q1 of image bi.
                        unsafe {
                            kernel.block_taps(
                                cin,
                                taps[m0 * cin..].as_ptr(),
                                cin,
                                mp * cin,
                                planes[2 * n0..].as_ptr(),
                                ldb,
                                &b_taps,
                                c.as_mut_ptr(),
                                BLOCK,
                            );
                        }
                        // the block's columns n0..n0 + 32 are pixels (q / wp, q % wp): runs
                        // of valid ones (x < w, y < h) go to the output rows
                        let mut j = 0;
                        while j < BLOCK {
                            let q = n0 + j;
                            let (y, xx) = (q / wp, q % wp);
                            if y >= h {
                                break;
                            }
                            if xx >= wd {
                                j += wp - xx;
                                continue;
                            }
                            let len = (wd - xx).min(BLOCK - j);
                            for i in 0..rows {
                                // SAFETY: channel m0 + i < cout, pixel y * wd + xx + len <= p,
                                // owned by this task (see above).
                                let d = unsafe {
                                    std::slice::from_raw_parts_mut(
                                        dst.0.add((bi * cout + m0 + i) * p + y * wd + xx),
                                        len,
                                    )
                                };
                                narrow_shifted_row(
                                    &c[i * BLOCK + j..][..len],
                                    widen(bias[m0 + i]),
                                    d,
                                );
                            }
                            j += len;
                        }
                    }
                }
            },
        );
        // SAFETY: the tasks wrote all b x cout x p values.
        unsafe { out.set_len(b * cout * p) };
        Ok((storage(out), Shape::from((b, cout, h, wd))))
    }
}

/// A 3x3 convolution, stride 1, padding 1, of bf16 CPU tensors on `kernel`, the weights given as
/// [`conv3x3_taps`] makes them (see [`conv3x3_fits`]); `cout` the output channels.
pub fn conv2d_3x3(
    kernel: Kernel,
    x: &Tensor,
    taps: &Tensor,
    bias: &Tensor,
    cout: usize,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    x.apply_op3_no_bwd(
        &taps.contiguous()?,
        &bias.contiguous()?,
        &Conv3x3Op { kernel, cout },
    )
}

/// Keys per chunk of the attention's scores: 32 rows of them take 32 KiB in f32 and 16 KiB
/// rounded to bf16, near the core's L1 (whole rows of 4096 keys went through L2).
const KEYS: usize = 256;

struct AttentionOp {
    kernel: Kernel,
    heads: usize,
    scale: f32,
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "sdgen-attention-amx"
    }

    /// q (b, tq, heads x d), k (b, tk, heads x d), v (b, tk, heads x dv), the layout the
    /// projections produce and the output projection takes (no head transposes). Each task
    /// takes a range of query rows of one head: K^T and V of the head packed into panels
    /// once, then per 32 rows the scores (f32) on the tiles, softmax in f32 (unnormalised,
    /// then rounded to bf16 as torch does for its second product), the product with V on the
    /// tiles, and the division by the row sums when the result is rounded to bf16.
    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let kernel = self.kernel;
        let [q, k, v] = bf16_inputs("amx attention", [(qs, ql), (ks, kl), (vs, vl)])?;
        let (b, tq, hd) = ql.shape().dims3()?;
        let (_, tk, _) = kl.shape().dims3()?;
        let (_, _, hdv) = vl.shape().dims3()?;
        let h = self.heads;
        let (d, dv) = (hd / h, hdv / h);
        let (dp, tkp, dvp) = (
            // the depth of the scores' product: the dot products take SD's head dim 40 as
            // it is (the tiles pad it to 64)
            d.next_multiple_of(kernel.kstep()),
            tk.next_multiple_of(BLOCK),
            dv.next_multiple_of(BLOCK),
        );
        // at least 4 tasks per thread: one head can be split into ranges of rows (each task
        // packs the head's K and V again)
        let threads = rayon::current_num_threads();
        let chunks = (4 * threads).div_ceil(b * h).min(tq.div_ceil(BLOCK));
        let chunk_rows = tq.div_ceil(chunks).next_multiple_of(BLOCK);
        let mut out: Vec<u16> = Vec::with_capacity(b * tq * hdv);
        let dst = SharedOut(out.as_mut_ptr());
        let kc_max = KEYS.min(tkp);
        let u16_len = dp * tkp + tkp * dvp + BLOCK * dp + BLOCK * kc_max;
        let f32_len = BLOCK * kc_max + BLOCK * dvp;
        let scale = self.scale;
        (0..b * h * chunks).into_par_iter().for_each_init(
            || kernel.guard(),
            |_, task| {
                let dst = dst;
                let (bi, hi, ci) = (task / (h * chunks), task / chunks % h, task % chunks);
                let (r0, r1) = (ci * chunk_rows, ((ci + 1) * chunk_rows).min(tq));
                if r0 >= r1 {
                    return;
                }
                with_scratch(u16_len, |buf| {
                    crate::cpu::common::with_scratch(f32_len, |fbuf| {
                        let (kpan, rest) = buf.split_at_mut(dp * tkp);
                        let (vpan, rest) = rest.split_at_mut(tkp * dvp);
                        let (qblk, pblk) = rest.split_at_mut(BLOCK * dp);
                        let (s, o) = fbuf.split_at_mut(BLOCK * kc_max);
                        // K^T: element (dim, key) of the head; V: element (key, j)
                        let kh = &k[bi * tk * hd + hi * d..];
                        super::pack_b(kh, dp, d, tk, 1, hd, kpan);
                        let vh = &v[bi * tk * hdv + hi * dv..];
                        super::pack_b(vh, tkp, tk, dv, hdv, 1, vpan);
                        for m0 in (r0..r1).step_by(BLOCK) {
                            let rows = BLOCK.min(r1 - m0);
                            for (i, qrow) in qblk.chunks_exact_mut(dp).enumerate() {
                                if i < rows {
                                    let src = &q[(bi * tq + m0 + i) * hd + hi * d..][..d];
                                    qrow[..d].copy_from_slice(src);
                                    qrow[d..].fill(0);
                                } else {
                                    qrow.fill(0);
                                }
                            }
                            // per row: the largest scaled score so far, the sum of the
                            // exps taken relative to it, and the output O (o, unnormalised)
                            let mut max = [f32::NEG_INFINITY; BLOCK];
                            let mut sum = [0f32; BLOCK];
                            o.fill(0.0);
                            for kc0 in (0..tkp).step_by(KEYS) {
                                let kc = KEYS.min(tkp - kc0);
                                // the chunk's keys below tk (kc0 < tk: tkp - tk < 32 <= KEYS)
                                let valid = kc.min(tk - kc0);
                                let (s, p) = (&mut s[..BLOCK * kc], &mut pblk[..BLOCK * kc]);
                                // SAFETY: qblk is 32 x dp, kpan's panels from key kc0 on hold
                                // kc columns of depth dp, s 32 x kc.
                                unsafe {
                                    kernel.block_row(
                                        dp,
                                        qblk.as_ptr(),
                                        dp,
                                        kpan[kc0 * dp..].as_ptr(),
                                        kc,
                                        s.as_mut_ptr(),
                                        kc,
                                    );
                                }
                                for (i, (srow, prow)) in
                                    s.chunks_exact(kc).zip(p.chunks_exact_mut(kc)).enumerate()
                                {
                                    if i >= rows {
                                        prow.fill(0);
                                        continue;
                                    }
                                    let srow = &srow[..valid];
                                    let chunk_max = row_max_f32(srow) * scale;
                                    if chunk_max > max[i] {
                                        // a new largest score: what was summed so far was
                                        // relative to the old one
                                        let alpha = (max[i] - chunk_max).exp();
                                        sum[i] *= alpha;
                                        for x in &mut o[i * dvp..(i + 1) * dvp] {
                                            *x *= alpha;
                                        }
                                        max[i] = chunk_max;
                                    }
                                    // the padded keys (zero scores) stay out of the softmax
                                    sum[i] += exp_row_bf16(srow, scale, max[i], &mut prow[..valid]);
                                    prow[valid..].fill(0);
                                }
                                for n0 in (0..dvp).step_by(BLOCK) {
                                    let b = vpan[n0 * tkp + kc0 * PANEL..].as_ptr();
                                    // SAFETY: p is 32 x kc (row stride kc), vpan's two panels
                                    // at n0 hold keys kc0..kc0 + kc from kc0 * PANEL on
                                    // (panels of depth tkp), o 32 x dvp.
                                    unsafe {
                                        let c = o.as_mut_ptr().add(n0);
                                        if dv - n0 <= PANEL {
                                            // one panel is enough (head dim 40: 48 columns
                                            // computed instead of 64)
                                            kernel.block_add_half(kc, p.as_ptr(), kc, b, c, dvp);
                                        } else {
                                            kernel.block_add(
                                                kc,
                                                p.as_ptr(),
                                                kc,
                                                b,
                                                tkp * PANEL,
                                                c,
                                                dvp,
                                            );
                                        }
                                    }
                                }
                            }
                            for (i, orow) in o.chunks_exact(dvp).take(rows).enumerate() {
                                // SAFETY: this task owns rows r0..r1 of head hi of batch bi:
                                // out[bi, m0 + i, hi * dv..(hi + 1) * dv].
                                let out_row = unsafe {
                                    std::slice::from_raw_parts_mut(
                                        dst.0.add((bi * tq + m0 + i) * hdv + hi * dv),
                                        dv,
                                    )
                                };
                                narrow_scaled_row(&orow[..dv], 1.0 / sum[i], out_row);
                            }
                        }
                    })
                });
            },
        );
        // SAFETY: the tasks wrote all b x tq x heads x dv values.
        unsafe { out.set_len(b * tq * hdv) };
        Ok((storage(out), Shape::from((b, tq, hdv))))
    }
}

/// softmax(q k^T / sqrt(d)) v for bf16 CPU tensors on `kernel`, heads side by side in the last
/// dim: q (b, tq, heads x d), k (b, tk, heads x d), v (b, tk, heads x dv) -> (b, tq, heads x dv).
pub fn attention(
    kernel: Kernel,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
) -> Result<Tensor> {
    let d = q.dim(2)? / heads;
    let op = AttentionOp {
        kernel,
        heads,
        scale: 1.0 / (d as f32).sqrt(),
    };
    q.contiguous()?
        .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::{Device, Module};

    /// Hash-spread values in [-0.5, 0.5) rounded to bf16.
    pub(crate) fn rand(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n as u64)
            .map(|i| {
                let h = (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    ^ seed.wrapping_mul(0xD1B5_4A32_D192_ED03);
                ((h >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap()
    }

    /// Largest difference between a bf16 result and the f32 reference computed from the same
    /// bf16 inputs, in units of the reference's largest magnitude.
    pub(crate) fn rel_diff(got: &Tensor, want: &Tensor) -> f32 {
        let got = got
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(got.len(), want.len());
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        got.iter()
            .zip(&want)
            .fold(0f32, |a, (g, w)| a.max((g - w).abs()))
            / scale
    }

    fn f32(t: &Tensor) -> Tensor {
        t.to_dtype(DType::F32).unwrap()
    }

    /// The reference for the bf16 convolutions: candle's f32 convolution of the same values
    /// plus the bias.
    pub(crate) fn conv_f32(x: &Tensor, w: &Tensor, bias: &Tensor, g: ConvGeometry) -> Tensor {
        let cout = w.dim(0).unwrap();
        f32(x)
            .conv2d(&f32(w), g.padding, g.stride, 1, 1)
            .unwrap()
            .broadcast_add(&f32(bias).reshape((1, cout, 1, 1)).unwrap())
            .unwrap()
    }

    /// Runs `check` on each bf16 kernel this CPU has (`bf16`'s tests check that list against
    /// /proc/cpuinfo, so none of these can pass by not running a kernel the CPU has).
    pub(crate) fn on_each_kernel(check: impl Fn(Kernel)) {
        for k in crate::cpu::bf16::available_kernels() {
            check(k);
        }
    }

    #[test]
    fn linear_matches_f32_on_the_same_bf16_inputs() {
        on_each_kernel(|kernel| {
            // rows not a multiple of 32, outputs not a multiple of 32, with and without bias
            for &(m, k, n, bias) in &[
                (77usize, 64usize, 40usize, true),
                (200, 96, 70, false),
                (64, 32, 32, true),
            ] {
                let x = rand(&[2, m, k], 1);
                let w = rand(&[n, k], 2);
                let b = rand(&[n], 3);
                let got = linear(kernel, &x, &w, bias.then_some(&b)).unwrap();
                let want = candle_nn::Linear::new(f32(&w), bias.then(|| f32(&b)))
                    .forward(&f32(&x))
                    .unwrap();
                assert_eq!(got.dims(), want.dims());
                let d = rel_diff(&got, &want);
                // one bf16 rounding of the result: 2^-8 relative
                assert!(d < 1.0 / 256.0, "{:?} ({m}, {k}, {n}): {d}", kernel);
            }
        });
    }

    #[test]
    fn geglu_projection_matches_f32_on_the_same_bf16_inputs() {
        on_each_kernel(|kernel| {
            // (rows, k, inner): rows not a multiple of 32, two and three blocks of features
            for &(m, k, inner) in &[(70usize, 64usize, 32usize), (33, 96, 48)] {
                let x = rand(&[m, k], 11);
                let w = rand(&[2 * inner, k], 12);
                let b = rand(&[2 * inner], 13);
                let panels = pack_linear_weight(&geglu_order(&w).unwrap()).unwrap();
                let got =
                    linear_geglu(kernel, &x, &panels, Some(&geglu_order(&b).unwrap())).unwrap();
                let h = f32(&x)
                    .matmul(&f32(&w).t().unwrap())
                    .unwrap()
                    .broadcast_add(&f32(&b))
                    .unwrap();
                let want = (h.narrow(1, 0, inner).unwrap()
                    * h.narrow(1, inner, inner).unwrap().gelu_erf().unwrap())
                .unwrap();
                assert_eq!(got.dims(), want.dims());
                let d = rel_diff(&got, &want);
                assert!(d < 1.0 / 256.0, "{:?} ({m}, {k}, {inner}): {d}", kernel);
                let back = geglu_order_undone(&geglu_order(&w).unwrap()).unwrap();
                let same = back.eq(&w).unwrap().to_dtype(DType::F32).unwrap();
                assert_eq!(same.mean_all().unwrap().to_scalar::<f32>().unwrap(), 1.0);
            }
        });
    }

    #[test]
    fn linear_weight_panels_unpack_to_the_weight() {
        // n not a multiple of 32 (padded panels), k over several depth steps
        let w = rand(&[45, 96], 3);
        let panels = pack_linear_weight(&w).unwrap();
        assert_eq!(panels.dims(), &[64, 96]);
        let back = unpack_linear_weight(&panels, 45).unwrap();
        let same = back.eq(&w).unwrap().to_dtype(DType::F32).unwrap();
        assert_eq!(same.mean_all().unwrap().to_scalar::<f32>().unwrap(), 1.0);
    }

    #[test]
    fn conv2d_matches_f32_on_the_same_bf16_inputs() {
        on_each_kernel(|kernel| {
            // (b, cin, h, w, cout, kernel, stride, padding): padded k (4*9) and cout (3), strided,
            // 1x1, pixel counts not a multiple of 32
            for &(b, cin, h, wd, cout, kk, s, pad) in &[
                (
                    2usize, 4usize, 9usize, 7usize, 32usize, 3usize, 1usize, 1usize,
                ),
                (1, 32, 10, 10, 3, 3, 1, 1),
                (2, 32, 9, 9, 64, 3, 2, 1),
                (1, 64, 6, 5, 32, 1, 1, 0),
            ] {
                let x = rand(&[b, cin, h, wd], 4);
                let w = rand(&[cout, cin, kk, kk], 5);
                let bias = rand(&[cout], 6);
                let g = ConvGeometry {
                    stride: s,
                    padding: pad,
                };
                let got = conv2d(kernel, &x, &w, &bias, g).unwrap();
                let want = conv_f32(&x, &w, &bias, g);
                assert_eq!(got.dims(), want.dims());
                let d = rel_diff(&got, &want);
                assert!(
                    d < 1.0 / 256.0,
                    "{:?} ({b}, {cin}, {h}, {wd}, {cout}, {kk}): {d}",
                    kernel
                );
            }
        });
    }

    #[test]
    fn direct_conv3x3_matches_f32_on_the_same_bf16_inputs() {
        on_each_kernel(|kernel| {
            // (b, cin, h, w, cout): odd sizes, cout not a multiple of 32 (and below it), several
            // column blocks and channel blocks, a row narrower than the padding's 2 columns
            for &(b, cin, h, wd, cout) in &[
                (2usize, 32usize, 9usize, 7usize, 40usize),
                (1, 64, 5, 1, 3),
                (2, 96, 16, 16, 64),
                (1, 32, 40, 33, 32),
            ] {
                let x = rand(&[b, cin, h, wd], 7);
                let w = rand(&[cout, cin, 3, 3], 8);
                let bias = rand(&[cout], 9);
                let g = ConvGeometry {
                    stride: 1,
                    padding: 1,
                };
                assert!(conv3x3_fits(&w, g));
                let taps = conv3x3_taps(&w).unwrap();
                let back = conv3x3_weight(&taps, cout).unwrap();
                let same = back.eq(&w).unwrap().to_dtype(DType::F32).unwrap();
                assert_eq!(same.mean_all().unwrap().to_scalar::<f32>().unwrap(), 1.0);
                let got = conv2d_3x3(kernel, &x, &taps, &bias, cout).unwrap();
                let want = conv_f32(&x, &w, &bias, g);
                assert_eq!(got.dims(), want.dims());
                let d = rel_diff(&got, &want);
                assert!(
                    d < 1.0 / 256.0,
                    "{:?} ({b}, {cin}, {h}, {wd}, {cout}): {d}",
                    kernel
                );
            }
        });
    }
}
