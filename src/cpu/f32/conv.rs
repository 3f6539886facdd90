//! 2-D convolution of f32 CPU tensors: Winograd F(2x2, 3x3) for 3x3 convolutions with enough
//! output tiles (`winograd`), else a blocked im2col + `gemm` that writes straight into the NCHW
//! output.

use crate::cpu::common::conv::{patch_row, ConvGeometry};
use crate::cpu::common::{contiguous, matmul, with_scratch, SharedOut};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

struct Conv2d {
    g: ConvGeometry,
    /// Fewest 2x2 output tiles (over the batch) for which a 3x3 convolution uses Winograd.
    winograd_min_tiles: usize,
}

impl CustomOp3 for Conv2d {
    fn name(&self) -> &'static str {
        "sdgen-conv2d"
    }

    /// x (b, cin, h, w), weight (cout, cin, kh, kw), bias (cout): blocks of output pixels are
    /// unfolded into a cache-sized patch matrix and multiplied by the weights with `gemm`,
    /// straight into the NCHW output (candle unfolds the whole image first, multiplies, then
    /// transposes the result into place).
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
        let x = contiguous::<f32>(xs, xl, "conv2d kernel")?;
        let w = contiguous::<f32>(ws, wl, "conv2d kernel")?;
        let bias = contiguous::<f32>(bs, bl, "conv2d kernel")?;
        let ConvGeometry { stride, padding } = self.g;
        // Winograd pays off once there are enough tiles to amortise transforming the weights
        // (measured, 2 threads: 320 ch at 64x64 57 -> 35 ms, 640 ch at 32x32 52 -> 40 ms, but
        // 1280 ch at 16x16 51 -> 75 ms)
        let tiles = h.div_ceil(2) * wd.div_ceil(2);
        if (kh, kw, stride, padding) == (3, 3, 1, 1) && b * tiles >= self.winograd_min_tiles {
            let out = crate::cpu::f32::winograd::conv3x3(x, b, cin, h, wd, w, bias, cout);
            return Ok((CpuStorage::F32(out), Shape::from((b, cout, h, wd))));
        }
        let (ho, wo) = self.g.output_size(h, wd, kh, kw);
        let p = ho * wo;
        let k = cin * kh * kw;
        // about 1 MiB of patches per block, at least 128 pixels (each block repacks the
        // weights; the thread keeps its largest patch buffer: 128 x 23040 values at most in SD)
        let pb = ((1usize << 20) / k).clamp(128, 2048).min(p);
        let blocks = p.div_ceil(pb);
        // every value is written below (bias, then gemm adds into it): no zero fill
        let mut out: Vec<f32> = Vec::with_capacity(b * cout * p);
        let dst = SharedOut(out.as_mut_ptr());
        (0..b * blocks).into_par_iter().for_each(|task| {
            let dst = dst;
            with_scratch(pb * k, |patches| {
                let (bi, blk) = (task / blocks, task % blocks);
                let p0 = blk * pb;
                let n = pb.min(p - p0);
                let xb = &x[bi * cin * h * wd..(bi + 1) * cin * h * wd];
                // patches: k rows (cin, ky, kx) x n columns (pixels p0..p0+n); each row is
                // filled one output-row segment at a time, a shifted copy of an input row
                for (kk, row) in patches[..k * n].chunks_mut(n).enumerate() {
                    let (c, ky, kx) = (kk / (kh * kw), (kk / kw) % kh, kk % kw);
                    let plane = &xb[c * h * wd..(c + 1) * h * wd];
                    patch_row(plane, h, wd, wo, ky, kx, self.g, p0, row, 0.0);
                }
                // SAFETY: this task owns out[bi, :, p0..p0+n]; all strides match the shapes.
                unsafe {
                    let base = dst.0.add(bi * cout * p + p0);
                    for co in 0..cout {
                        let o = std::slice::from_raw_parts_mut(
                            base.add(co * p).cast::<std::mem::MaybeUninit<f32>>(),
                            n,
                        );
                        o.fill(std::mem::MaybeUninit::new(bias[co]));
                    }
                    // out (cout x n, row stride p) += w (cout x k) @ patches (k x n)
                    matmul(
                        cout,
                        n,
                        k,
                        base,
                        p as isize,
                        true,
                        w.as_ptr(),
                        k as isize,
                        patches.as_ptr(),
                        n as isize,
                        1,
                        gemm::Parallelism::None,
                    );
                }
            });
        });
        // SAFETY: the tasks wrote all b x cout x p values.
        unsafe { out.set_len(b * cout * p) };
        Ok((CpuStorage::F32(out), Shape::from((b, cout, ho, wo))))
    }
}

/// The fewest 2x2 output tiles (over the batch) for which a 3x3 convolution uses Winograd by
/// default: it pays off once there are enough tiles to amortise transforming the weights.
pub const WINOGRAD_MIN_TILES: usize = 512;

/// 2-D convolution (groups 1, dilation 1) of f32 CPU tensors with the blocked kernel, or by
/// Winograd for 3x3 convolutions (stride 1, padding 1) with at least `winograd_min_tiles`
/// 2x2 output tiles over the batch (0: all of them, `usize::MAX`: none).
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    g: ConvGeometry,
    winograd_min_tiles: usize,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let op = Conv2d {
        g,
        winograd_min_tiles,
    };
    x.apply_op3_no_bwd(&weight.contiguous()?, &bias.contiguous()?, &op)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conv2d_matches_candle_for_each_geometry() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        // (cin, cout, h, w, kernel, stride, padding): padding on both sides of short rows,
        // stride 2 with odd and even sizes, 1x1, padding larger than 1
        let cases = [
            (3, 5, 7, 9, 3, 1, 1),
            (4, 6, 9, 8, 3, 2, 1),
            (4, 6, 8, 9, 3, 2, 0),
            (5, 3, 6, 6, 1, 1, 0),
            (2, 4, 5, 3, 3, 1, 2),
            (8, 8, 33, 70, 3, 1, 1),
        ];
        for (cin, cout, h, w, k, stride, padding) in cases {
            let x = Tensor::randn(0f32, 1.0, (2, cin, h, w), &dev)?;
            let wt = Tensor::randn(0f32, 1.0, (cout, cin, k, k), &dev)?;
            let b = Tensor::randn(0f32, 1.0, cout, &dev)?;
            let want = x
                .conv2d(&wt, padding, stride, 1, 1)?
                .broadcast_add(&b.reshape((1, cout, 1, 1))?)?;
            // the default threshold, then Winograd for every 3x3 (stride 1, padding 1), then none
            for min_tiles in [WINOGRAD_MIN_TILES, 0, usize::MAX] {
                let got = conv2d(&x, &wt, &b, ConvGeometry { stride, padding }, min_tiles)?;
                assert_eq!(got.dims(), want.dims());
                let diff = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(
                    diff < 1e-4,
                    "{cin}->{cout} {h}x{w} k{k} s{stride} p{padding} from {min_tiles} tiles: {diff}"
                );
            }
        }
        Ok(())
    }
}
