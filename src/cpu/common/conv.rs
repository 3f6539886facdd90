//! Convolution geometry and the patch rows the im2col convolutions (f32 and bf16) build.

/// Convolution geometry (groups = 1, dilation = 1).
#[derive(Clone, Copy, Debug)]
pub struct ConvGeometry {
    pub stride: usize,
    pub padding: usize,
}

impl ConvGeometry {
    /// Output height and width for an h x w input and a kh x kw kernel.
    pub fn output_size(&self, h: usize, w: usize, kh: usize, kw: usize) -> (usize, usize) {
        (
            (h + 2 * self.padding - kh) / self.stride + 1,
            (w + 2 * self.padding - kw) / self.stride + 1,
        )
    }
}

/// One row of a convolution's patch matrix: for kernel tap (ky, kx) of one input plane
/// (h x wd), the input value under each output pixel p0, p0 + 1, ... (output width wo), zero
/// in the padding. Whole in-bounds runs are copied at once.
#[allow(clippy::too_many_arguments)]
pub(crate) fn patch_row<T: Copy>(
    plane: &[T],
    h: usize,
    wd: usize,
    wo: usize,
    ky: usize,
    kx: usize,
    g: ConvGeometry,
    p0: usize,
    row: &mut [T],
    zero: T,
) {
    let ConvGeometry { stride, padding } = g;
    let mut idx = 0;
    while idx < row.len() {
        let (oy, ox0) = ((p0 + idx) / wo, (p0 + idx) % wo);
        let seg = (wo - ox0).min(row.len() - idx);
        let out_seg = &mut row[idx..idx + seg];
        let iy = (oy * stride + ky) as isize - padding as isize;
        if iy < 0 || iy as usize >= h {
            out_seg.fill(zero);
        } else {
            let in_row = &plane[iy as usize * wd..(iy as usize + 1) * wd];
            // ix = (ox0 + j) * stride + kx - padding is in the row for j in
            // lo..hi; zeros outside (the padding)
            let first = (ox0 * stride + kx) as isize - padding as isize;
            let lo = if first >= 0 {
                0
            } else {
                ((-first) as usize).div_ceil(stride).min(seg)
            };
            let hi = if first >= wd as isize {
                lo
            } else {
                ((wd as isize - first) as usize)
                    .div_ceil(stride)
                    .clamp(lo, seg)
            };
            out_seg[..lo].fill(zero);
            out_seg[hi..].fill(zero);
            if hi > lo {
                let start = (first + (lo * stride) as isize) as usize;
                if stride == 1 {
                    out_seg[lo..hi].copy_from_slice(&in_row[start..start + hi - lo]);
                } else {
                    for (o, i) in out_seg[lo..hi].iter_mut().zip((start..).step_by(stride)) {
                        *o = in_row[i];
                    }
                }
            }
        }
        idx += seg;
    }
}
