//! 3x3 convolution (stride 1, padding 1) by Winograd's F(2x2, 3x3) transform, f32 on the CPU.
//!
//! Why: the 3x3 convolutions are most of the U-Net's and almost all of the VAE decoder's work.
//! Direct (im2col + gemm) costs 36 multiply-adds per output pixel and input channel; F(2x2, 3x3)
//! computes each 2x2 block of outputs from a 4x4 input tile with 16, i.e. 2.25x fewer, as 16
//! independent matrix products (one per tile position) between transformed weights
//! (cout x cin) and transformed input tiles (cin x tiles). The transforms only add and
//! subtract (and halve, for the weights), so the rounding stays within a few ulps of the
//! direct sum; the parity suite checks the results against diffusers.
//!
//! Notation of Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (2015):
//! Y = A^T [ (G g G^T) . (B^T d B) ] A.

use crate::cpu::common::SharedOut;
use rayon::prelude::*;

/// Tile positions: 4 x 4.
const P: usize = 16;

/// U = G g G^T for every (cout, cin) filter, stored as 16 matrices of cout x cin.
fn transform_weights(w: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    let mut u = vec![0f32; P * cout * cin];
    let dst = SharedOut(u.as_mut_ptr());
    (0..cout).into_par_iter().for_each(|co| {
        let dst = dst;
        for ci in 0..cin {
            let g = &w[(co * cin + ci) * 9..(co * cin + ci + 1) * 9];
            for (p, v) in transform_filter(g.try_into().unwrap())
                .into_iter()
                .enumerate()
            {
                // SAFETY: filter co owns u[p][co][..] for every p.
                unsafe { *dst.0.add((p * cout + co) * cin + ci) = v };
            }
        }
    });
    u
}

/// U = G g G^T of one 3 x 3 filter g (row-major), G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1]:
/// the 16 values by tile position p = 4 i + j.
#[inline]
pub(crate) fn transform_filter(g: [f32; 9]) -> [f32; P] {
    // t = G g (4 x 3)
    let mut t = [[0f32; 3]; 4];
    for j in 0..3 {
        let (g0, g1, g2) = (g[j], g[3 + j], g[6 + j]);
        t[0][j] = g0;
        t[1][j] = 0.5 * (g0 + g1 + g2);
        t[2][j] = 0.5 * (g0 - g1 + g2);
        t[3][j] = g2;
    }
    // u = t G^T (4 x 4)
    let mut u = [0f32; P];
    for (i, row) in t.iter().enumerate() {
        u[i * 4] = row[0];
        u[i * 4 + 1] = 0.5 * (row[0] + row[1] + row[2]);
        u[i * 4 + 2] = 0.5 * (row[0] - row[1] + row[2]);
        u[i * 4 + 3] = row[2];
    }
    u
}

/// Per-thread buffers, carved from one allocation that the thread keeps between calls (a
/// fresh zeroed buffer per call cost a memset of tens of MB per convolution).
struct Scratch<'a> {
    /// transformed input tiles of a chunk: 16 matrices of cin x tiles
    v: &'a mut [f32],
    /// products: 16 matrices of cout x tiles
    m: &'a mut [f32],
    /// one input row split into odd and even columns
    xe: &'a mut [f32],
    xo: &'a mut [f32],
    /// column-transformed input rows r = 0..4 of a tile row: cols[r][c][tx]
    cols: &'a mut [f32],
    /// row-transformed products of a tile row: s[i][j][tx]
    s: &'a mut [f32],
}

impl<'a> Scratch<'a> {
    fn len(cin: usize, cout: usize, tiles: usize, tw: usize) -> usize {
        P * (cin + cout) * tiles + 2 * (tw + 1) + 24 * tw
    }

    fn carve(buf: &'a mut [f32], cin: usize, cout: usize, tiles: usize, tw: usize) -> Self {
        let (v, rest) = buf.split_at_mut(P * cin * tiles);
        let (m, rest) = rest.split_at_mut(P * cout * tiles);
        let (xe, rest) = rest.split_at_mut(tw + 1);
        let (xo, rest) = rest.split_at_mut(tw + 1);
        let (cols, rest) = rest.split_at_mut(16 * tw);
        let s = &mut rest[..8 * tw];
        Scratch {
            v,
            m,
            xe,
            xo,
            cols,
            s,
        }
    }
}

/// V = B^T d B for the tiles of tile rows `ty0..ty1` of one image: 16 matrices of
/// cin x tiles (tiles = (ty1 - ty0) x tw). B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1].
///
/// Inlined into [`conv3x3`]'s task (as is [`transform_output`]): left to LLVM, whether it was
/// depended on how the crate is cut into code-generation units, and called out of line the
/// two transforms made the f32 VAE decode 5-8% slower (perf: 1849 samples against 1559).
#[inline(always)]
fn transform_input(
    x: &[f32],
    cin: usize,
    h: usize,
    w: usize,
    ty0: usize,
    ty1: usize,
    sc: &mut Scratch<'_>,
) {
    let tw = w.div_ceil(2);
    let tiles = (ty1 - ty0) * tw;
    let Scratch {
        v, xe, xo, cols, ..
    } = sc;
    for ci in 0..cin {
        let plane = &x[ci * h * w..(ci + 1) * h * w];
        for ty in ty0..ty1 {
            for r in 0..4 {
                let iy = (2 * ty + r) as isize - 1;
                let out = &mut cols[r * 4 * tw..(r + 1) * 4 * tw];
                if iy < 0 || iy as usize >= h {
                    out.fill(0.0);
                    continue;
                }
                let row = &plane[iy as usize * w..(iy as usize + 1) * w];
                // xe[k] = x[2k - 1], xo[k] = x[2k] (zero outside the row)
                for k in 0..=tw {
                    xe[k] = if k >= 1 && 2 * k - 1 < w {
                        row[2 * k - 1]
                    } else {
                        0.0
                    };
                    xo[k] = if 2 * k < w { row[2 * k] } else { 0.0 };
                }
                let (c0, rest) = out.split_at_mut(tw);
                let (c1, rest) = rest.split_at_mut(tw);
                let (c2, c3) = rest.split_at_mut(tw);
                for t in 0..tw {
                    [c0[t], c1[t], c2[t], c3[t]] =
                        input_columns([xe[t], xo[t], xe[t + 1], xo[t + 1]]);
                }
            }
            let base = (ty - ty0) * tw;
            transform_rows(cols, tw, v, |p| (p * cin + ci) * tiles + base);
        }
    }
}

/// The column half of V = B^T d B for one tile and input row: d B from the row's four
/// values d = [x[2t - 1], x[2t], x[2t + 1], x[2t + 2]].
#[inline(always)]
pub(crate) fn input_columns(d: [f32; 4]) -> [f32; 4] {
    [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]
}

/// The row half of V = B^T d B for one tile row of one channel, from its column-transformed
/// input rows `cols[r][c][tx]` (r, c < 4, tx < tw): tile position p = 4 i + c of tile tx to
/// `v[at(p) + tx]`.
#[inline]
pub(crate) fn transform_rows(cols: &[f32], tw: usize, v: &mut [f32], at: impl Fn(usize) -> usize) {
    let col = |r: usize, c: usize| &cols[(r * 4 + c) * tw..(r * 4 + c + 1) * tw];
    for c in 0..4 {
        let (r0, r1, r2, r3) = (col(0, c), col(1, c), col(2, c), col(3, c));
        // slices and zips (indexed stores through `at` stayed scalar)
        let rows = [
            (r0, r2, -1.0),
            (r1, r2, 1.0),
            (r2, r1, -1.0),
            (r1, r3, -1.0),
        ];
        for (i, (a, b, sign)) in rows.into_iter().enumerate() {
            let dst = &mut v[at(i * 4 + c)..][..tw];
            for ((o, &a), &b) in dst.iter_mut().zip(a).zip(b) {
                *o = a + sign * b;
            }
        }
    }
}

/// Y = A^T m A + bias for tile rows `ty0..ty1` into `out`, one image's output (cout, h, w)
/// starting at its first value. A^T = [1 1 1 0; 0 1 -1 -1].
///
/// # Safety
/// `out` must be valid for writes of cout x h x w values; only output rows 2 ty0..2 ty1 are
/// written.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn transform_output(
    cout: usize,
    h: usize,
    w: usize,
    ty0: usize,
    ty1: usize,
    bias: &[f32],
    out: *mut f32,
    sc: &mut Scratch<'_>,
) {
    let tw = w.div_ceil(2);
    let tiles = (ty1 - ty0) * tw;
    let Scratch { m, s, .. } = sc;
    for co in 0..cout {
        for ty in ty0..ty1 {
            let base = (ty - ty0) * tw;
            let mat = |p: usize| &m[(p * cout + co) * tiles + base..][..tw];
            transform_output_columns(mat, tw, s);
            for i in 0..2 {
                let oy = 2 * ty + i;
                if oy >= h {
                    break;
                }
                // SAFETY: row oy of channel co is inside out (caller's contract).
                let row = unsafe { std::slice::from_raw_parts_mut(out.add((co * h + oy) * w), w) };
                output_row(s, tw, i, bias[co], row);
            }
        }
    }
}

/// The first half of Y = A^T m A for one output channel's tile row, A^T = [1 1 1 0; 0 1 -1
/// -1]: s = A^T m, `s[i][j][tx]` (2 x 4 rows of tw) from `mat(p)`, the tw products of tile
/// position p = 4 i + j.
#[inline]
pub(crate) fn transform_output_columns<'a>(
    mat: impl Fn(usize) -> &'a [f32],
    tw: usize,
    s: &mut [f32],
) {
    let (s0, s1) = s.split_at_mut(4 * tw);
    for j in 0..4 {
        let (m0, m1, m2, m3) = (mat(j), mat(4 + j), mat(8 + j), mat(12 + j));
        let (s0, s1) = (&mut s0[j * tw..(j + 1) * tw], &mut s1[j * tw..(j + 1) * tw]);
        let m = m0.iter().zip(m1).zip(m2.iter().zip(m3));
        for (((&a, &b), (&c, &d)), (s0, s1)) in m.zip(s0.iter_mut().zip(s1)) {
            *s0 = a + b + c;
            *s1 = b - c - d;
        }
    }
}

/// Output row i (0 or 1) of the tile row: y = s A + bias, tile tx's two values at `out[2 tx]`
/// and `out[2 tx + 1]` (`out` is the image row: at an odd width the last tile's second value
/// falls outside).
#[inline]
pub(crate) fn output_row(s: &[f32], tw: usize, i: usize, bias: f32, out: &mut [f32]) {
    let si = |j: usize| &s[(i * 4 + j) * tw..(i * 4 + j + 1) * tw];
    let abcd = si(0).iter().zip(si(1)).zip(si(2).iter().zip(si(3)));
    for (pair, ((&a, &b), (&c, &d))) in out.chunks_mut(2).zip(abcd) {
        pair[0] = a + b + c + bias;
        if let Some(y1) = pair.get_mut(1) {
            *y1 = b - c - d + bias;
        }
    }
}

/// out (b, cout, h, w) = conv3x3(x (b, cin, h, w), weight (cout, cin, 3, 3), padding 1) + bias,
/// all contiguous f32. Work is split into chunks of tile rows, each done start to end (input
/// transform, 16 products, output transform) by one thread, so that a chunk's buffers stay
/// near that core.
#[allow(clippy::too_many_arguments)]
pub fn conv3x3(
    x: &[f32],
    b: usize,
    cin: usize,
    h: usize,
    w: usize,
    weight: &[f32],
    bias: &[f32],
    cout: usize,
) -> Vec<f32> {
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let u = transform_weights(weight, cout, cin);
    // about 512 tiles per chunk: fewer and `gemm` repacks U too often for the work it does,
    // more and a chunk's buffers leave the cache (measured 256..1024 and whole images)
    // and at most ~12 MB of scratch per thread (16 x (cin + cout) x tiles values), which the
    // thread keeps: 512 tiles of the 960 -> 320 convolution at 64x64 took 42 MB per thread.
    // Measured on the f32 512x512 generation: peak RSS 3600 -> 3518 MiB with this cap and
    // the im2col one in `conv`, U-Net step and VAE decode no slower.
    let max_tiles = (12 << 20) / (4 * P * (cin + cout));
    let rows = 512usize.min(max_tiles).div_ceil(tw).clamp(1, th);
    let chunks = th.div_ceil(rows);
    // every value is written by the output transforms: no zero fill
    let mut out: Vec<f32> = Vec::with_capacity(b * cout * h * w);
    let dst = SharedOut(out.as_mut_ptr());
    // one worker per thread, each taking every `workers`-th chunk (equal sizes) with its own
    // scratch
    let tasks = b * chunks;
    let workers = rayon::current_num_threads().clamp(1, tasks);
    let len = Scratch::len(cin, cout, rows * tw, tw);
    (0..workers).into_par_iter().for_each(|worker| {
        let dst = dst;
        crate::cpu::common::with_scratch(len, |buf| {
            for task in (worker..tasks).step_by(workers) {
                let (bi, chunk) = (task / chunks, task % chunks);
                let (ty0, ty1) = (chunk * rows, ((chunk + 1) * rows).min(th));
                let tiles = (ty1 - ty0) * tw;
                let mut sc = Scratch::carve(buf, cin, cout, tiles, tw);
                let xb = &x[bi * cin * h * w..(bi + 1) * cin * h * w];
                transform_input(xb, cin, h, w, ty0, ty1, &mut sc);
                // the 16 products M[p] (cout x tiles) = U[p] (cout x cin) V[p] (cin x tiles)
                for p in 0..P {
                    // SAFETY: all pointers cover the shapes and strides given.
                    unsafe {
                        crate::cpu::common::matmul(
                            cout,
                            tiles,
                            cin,
                            sc.m.as_mut_ptr().add(p * cout * tiles),
                            tiles as isize,
                            false,
                            u.as_ptr().add(p * cout * cin),
                            cin as isize,
                            sc.v.as_ptr().add(p * cin * tiles),
                            tiles as isize,
                            1,
                            gemm::Parallelism::None,
                        );
                    }
                }
                // SAFETY: this task writes output rows 2 ty0..2 ty1 of image bi only.
                unsafe {
                    let out_b = dst.0.add(bi * cout * h * w);
                    transform_output(cout, h, w, ty0, ty1, bias, out_b, &mut sc)
                };
            }
        });
    });
    // SAFETY: the chunks cover every tile row of every image, so all values were written.
    unsafe { out.set_len(b * cout * h * w) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn direct(
        x: &[f32],
        cin: usize,
        h: usize,
        w: usize,
        wt: &[f32],
        bias: &[f32],
        cout: usize,
    ) -> Vec<f32> {
        let mut out = vec![0f32; cout * h * w];
        for co in 0..cout {
            for oy in 0..h {
                for ox in 0..w {
                    let mut s = bias[co] as f64;
                    for ci in 0..cin {
                        for ky in 0..3 {
                            for kx in 0..3 {
                                let (iy, ix) = (oy as isize + ky - 1, ox as isize + kx - 1);
                                if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                                    s += x[(ci * h + iy as usize) * w + ix as usize] as f64
                                        * wt[((co * cin + ci) * 3 + ky as usize) * 3 + kx as usize]
                                            as f64;
                                }
                            }
                        }
                    }
                    out[(co * h + oy) * w + ox] = s as f32;
                }
            }
        }
        out
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    }

    #[test]
    fn matches_direct_convolution_on_even_and_odd_sizes() {
        for (cin, cout, h, w) in [
            (3, 4, 8, 8),
            (5, 2, 7, 9),
            (2, 3, 1, 1),
            (4, 4, 2, 5),
            (8, 6, 11, 6),
        ] {
            let x = values(2 * cin * h * w, 1);
            let wt = values(cout * cin * 9, 2);
            let bias = values(cout, 3);
            let got = conv3x3(&x, 2, cin, h, w, &wt, &bias, cout);
            for bi in 0..2 {
                let want = direct(&x[bi * cin * h * w..], cin, h, w, &wt, &bias, cout);
                let g = &got[bi * cout * h * w..(bi + 1) * cout * h * w];
                for (i, (a, b)) in g.iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() < 1e-5,
                        "{cin}->{cout} {h}x{w} image {bi} at {i}: {a} vs {b}"
                    );
                }
            }
        }
    }
}
