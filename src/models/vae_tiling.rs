//! diffusers' VAE tiling (`AutoencoderKL.enable_tiling`): large pictures decoded (and encoded)
//! in overlapping tiles, each blended into its upper and left neighbours over a quarter of a
//! tile, so memory follows the tile, not the picture.
//!
//! As diffusers computes it: tiles of `sample_size` pixels (the VAE config's; 32 when absent)
//! and `sample_size / 2^(blocks - 1)` latents, started every three quarters of a tile; blending
//! is linear over `extent` rows (columns), `a x (1 - y / extent) + b x (y / extent)`, each tile
//! blended in place (with its upper neighbour first, then its left one, which were blended
//! before it), then cropped to `tile - extent`.

use crate::config::VaeConfig;
use candle_core::{Result, Tensor, D};

const OVERLAP: f64 = 0.25;

/// The tile sizes of a VAE.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tiles {
    /// Picture pixels a side.
    pub sample: usize,
    /// Latent pixels a side.
    pub latent: usize,
}

impl Tiles {
    pub fn new(c: &VaeConfig) -> Self {
        let sample = c.sample_size.map_or(32, |s| s.height_width().0);
        let blocks = c.block_out_channels.len() as u32;
        Self {
            sample,
            latent: (sample as f64 / 2f64.powi(blocks as i32 - 1)) as usize,
        }
    }

    /// `tiled_decode`: latents (1, c, h, w) through `decode` tile by tile.
    pub fn decode(&self, z: &Tensor, decode: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let blend = (self.sample as f64 * OVERLAP) as usize;
        tiled(z, self.latent, self.sample - blend, blend, decode)
    }

    /// `_tiled_encode`: pictures (1, 3, h, w) through `encode` (to moments) tile by tile.
    pub fn encode(&self, x: &Tensor, encode: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let blend = (self.latent as f64 * OVERLAP) as usize;
        tiled(x, self.sample, self.latent - blend, blend, encode)
    }

    /// Whether a pass over `h` x `w` inputs (latents for decoding, pixels for encoding, `tile`
    /// a side) is tiled at all: diffusers tiles only what is larger than one tile.
    pub fn needed(h: usize, w: usize, tile: usize) -> bool {
        h > tile || w > tile
    }
}

/// Tiles of `tile` a side every `(1 - OVERLAP) x tile`, each through `f`, blended over
/// `blend` and cropped to `limit`.
fn tiled(
    x: &Tensor,
    tile: usize,
    limit: usize,
    blend: usize,
    f: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let stride = (tile as f64 * (1.0 - OVERLAP)) as usize;
    let mut rows: Vec<Vec<Tensor>> = Vec::new();
    for i in (0..h).step_by(stride) {
        let mut row = Vec::new();
        for j in (0..w).step_by(stride) {
            let t = x
                .narrow(2, i, tile.min(h - i))?
                .narrow(3, j, tile.min(w - j))?;
            row.push(f(&t)?);
        }
        rows.push(row);
    }
    let mut out_rows = Vec::with_capacity(rows.len());
    for i in 0..rows.len() {
        let mut out_row = Vec::with_capacity(rows[i].len());
        for j in 0..rows[i].len() {
            let mut t = rows[i][j].clone();
            if i > 0 {
                t = blend_into(&rows[i - 1][j], &t, blend, D::Minus2)?;
            }
            if j > 0 {
                t = blend_into(&rows[i][j - 1], &t, blend, D::Minus1)?;
            }
            // in place in diffusers: later tiles blend with this one as it is now
            rows[i][j] = t.clone();
            let (th, tw) = (t.dim(2)?, t.dim(3)?);
            out_row.push(t.narrow(2, 0, limit.min(th))?.narrow(3, 0, limit.min(tw))?);
        }
        out_rows.push(Tensor::cat(&out_row, 3)?);
    }
    Tensor::cat(&out_rows, 2)
}

/// `blend_v` (dim -2) / `blend_h` (dim -1): the first `extent` rows (columns) of `b` faded in
/// from the last ones of `a`.
fn blend_into(a: &Tensor, b: &Tensor, extent: usize, dim: D) -> Result<Tensor> {
    let (la, lb) = (a.dim(dim)?, b.dim(dim)?);
    let extent = extent.min(la).min(lb);
    if extent == 0 {
        return Ok(b.clone());
    }
    let mut parts = Vec::with_capacity(extent + 1);
    for y in 0..extent {
        let wb = y as f64 / extent as f64;
        let from_a = (a.narrow(dim, la - extent + y, 1)? * (1.0 - wb) as f32 as f64)?;
        let from_b = (b.narrow(dim, y, 1)? * wb as f32 as f64)?;
        parts.push((from_a + from_b)?);
    }
    parts.push(b.narrow(dim, extent, lb - extent)?);
    Tensor::cat(&parts, dim)
}
