//! The start picture of image-to-image (`--image`): decoded (PNG, JPEG, WebP) within limits,
//! sized as diffusers' `VaeImageProcessor.preprocess` sizes it, as a (1, 3, h, w) tensor in
//! [-1, 1].
//!
//! Size: by default the picture's own, each side rounded down to a multiple of the VAE's
//! factor (8); `-W`/`-H` ask for another. Other sizes are resized as diffusers resizes them:
//! PIL's Lanczos resampling, ported here ([`lanczos`]) because the `image` crate's Lanczos-3
//! weighs and rounds differently.

use crate::pipeline::InitImage;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::path::Path;

/// The largest side and decoded size accepted (a decompression bomb is refused before its
/// pixels are allocated).
const MAX_SIDE: u32 = crate::pipeline::MAX_SIDE as u32;
const MAX_BYTES: u64 = 1 << 30;

/// A decoded picture, RGB8.
pub struct Picture {
    pub rgb: image::RgbImage,
}

impl Picture {
    pub fn open(path: &Path) -> Result<Self> {
        let what = || format!("cannot read the image {}", path.display());
        let reader = image::ImageReader::open(path)
            .with_context(what)?
            .with_guessed_format()
            .with_context(what)?;
        Self::decode(reader, &path.display().to_string())
    }

    /// A picture sent as bytes (the server's base64 images); `name` says which in errors.
    pub fn from_bytes(bytes: &[u8], name: &str) -> Result<Self> {
        let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .with_context(|| format!("cannot read the image {name}"))?;
        Self::decode(reader, name)
    }

    fn decode<R: std::io::BufRead + std::io::Seek>(
        mut reader: image::ImageReader<R>,
        name: &str,
    ) -> Result<Self> {
        let mut limits = image::Limits::default();
        limits.max_image_width = Some(MAX_SIDE);
        limits.max_image_height = Some(MAX_SIDE);
        limits.max_alloc = Some(MAX_BYTES);
        reader.limits(limits);
        let decoded = reader.decode().map_err(|e| match e {
            image::ImageError::Limits(_) => anyhow::anyhow!(
                "{name}: the image is larger than sdgen's limit of {MAX_SIDE} pixels a side (or 1 GiB decoded)"
            ),
            e => anyhow::anyhow!("{name}: {e} (a PNG, JPEG or WebP file is expected)"),
        })?;
        if decoded.width() == 0 || decoded.height() == 0 {
            bail!("{name}: the image has no pixels");
        }
        Ok(Self {
            rgb: decoded.to_rgb8(),
        })
    }

    /// diffusers' default size for it: each side rounded down to a multiple of `factor`.
    pub fn default_size(&self, factor: usize) -> Result<(usize, usize)> {
        let (w, h) = (self.rgb.width() as usize, self.rgb.height() as usize);
        let (w, h) = (w - w % factor, h - h % factor);
        if w == 0 || h == 0 {
            bail!(
                "the image is {}x{}, smaller than the model's {factor} pixels a side",
                self.rgb.width(),
                self.rgb.height()
            );
        }
        Ok((w, h))
    }

    /// (1, 3, height, width) in [-1, 1]: `2 x (pixel / 255) - 1`, resized first when the
    /// picture has another size.
    pub fn to_tensor(&self, width: usize, height: usize) -> Result<Tensor> {
        let rgb = if (self.rgb.width() as usize, self.rgb.height() as usize) == (width, height) {
            std::borrow::Cow::Borrowed(&self.rgb)
        } else {
            std::borrow::Cow::Owned(lanczos(&self.rgb, width, height))
        };
        let plane = width * height;
        let mut data = vec![0f32; 3 * plane];
        for (i, px) in rgb.pixels().enumerate() {
            for c in 0..3 {
                data[c * plane + i] = px[c] as f32 / 255.0 * 2.0 - 1.0;
            }
        }
        Ok(Tensor::from_vec(data, (1, 3, height, width), &Device::Cpu)?)
    }
}

impl Picture {
    /// The picture as PIL's "L" grayscale ((299 R + 587 G + 114 B) / 1000, PIL's rounding) at
    /// (width, height), resized when needed.
    pub fn gray(&self, width: usize, height: usize) -> image::GrayImage {
        let gray = image::GrayImage::from_fn(self.rgb.width(), self.rgb.height(), |x, y| {
            let p = self.rgb.get_pixel(x, y);
            let l = (p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000) >> 16;
            image::Luma([l as u8])
        });
        if (gray.width() as usize, gray.height() as usize) == (width, height) {
            gray
        } else {
            lanczos(&gray, width, height)
        }
    }

    /// The picture's RGB at (width, height), resized when needed.
    pub fn rgb_at(&self, width: usize, height: usize) -> image::RgbImage {
        if (self.rgb.width() as usize, self.rgb.height() as usize) == (width, height) {
            self.rgb.clone()
        } else {
            lanczos(&self.rgb, width, height)
        }
    }

    /// The mask as the user gives it to inpainting: [`gray`], blurred by `blur` pixels with
    /// PIL's Gaussian blur (diffusers' `mask_processor.blur`) when `blur` > 0.
    ///
    /// [`gray`]: Picture::gray
    pub fn mask_gray(&self, width: usize, height: usize, blur: f32) -> image::GrayImage {
        if blur <= 0.0 {
            return self.gray(width, height);
        }
        // diffusers blurs the mask as given, then its processor resizes it
        let (w, h) = (self.rgb.width() as usize, self.rgb.height() as usize);
        let blurred = gaussian_blur(&self.gray(w, h), blur);
        if (w, h) == (width, height) {
            blurred
        } else {
            lanczos(&blurred, width, height)
        }
    }

    /// Inpainting's mask at (width, height) as diffusers' mask processor makes it:
    /// [`binarize`] of [`Picture::mask_gray`].
    pub fn to_mask(&self, width: usize, height: usize, blur: f32) -> Result<Tensor> {
        binarize(&self.mask_gray(width, height, blur))
    }
}

/// diffusers' mask binarization: 0 below half, 1 from half up; (1, 1, height, width).
pub fn binarize(gray: &image::GrayImage) -> Result<Tensor> {
    let data: Vec<f32> = gray
        .pixels()
        .map(|p| if p[0] as f32 / 255.0 < 0.5 { 0.0 } else { 1.0 })
        .collect();
    let (w, h) = (gray.width() as usize, gray.height() as usize);
    Ok(Tensor::from_vec(data, (1, 1, h, w), &Device::Cpu)?)
}

/// Image-to-image's inputs at a request's size.
pub struct Start {
    /// What the pipeline starts from.
    pub init: InitImage,
    /// The picture and the blurred mask to lay back over each generated image where the mask
    /// keeps the picture (`--keep-unmasked`, the web UI's overlay).
    pub overlay: Option<(image::RgbImage, image::GrayImage)>,
}

/// `picture` (and inpainting's `mask`, blurred by `mask_blur` and binarized as diffusers'
/// mask processor does) at `width` x `height`, with `strength` or SD's default in diffusers
/// (0.8, 1 when inpainting; the CLI passes its model's, `Pipeline::default_strength`).
pub fn start(
    picture: &Picture,
    mask: Option<&Picture>,
    (width, height): (usize, usize),
    mask_blur: f32,
    strength: Option<f64>,
    keep_unmasked: bool,
) -> Result<Start> {
    let gray = mask.map(|m| m.mask_gray(width, height, mask_blur));
    let overlay = match &gray {
        Some(g) if keep_unmasked => Some((picture.rgb_at(width, height), g.clone())),
        _ => None,
    };
    let mask = gray.as_ref().map(binarize).transpose()?;
    let default = if mask.is_some() { 1.0 } else { 0.8 };
    Ok(Start {
        init: InitImage {
            pixels: picture.to_tensor(width, height)?,
            strength: strength.unwrap_or(default),
            mask,
        },
        overlay,
    })
}

/// PIL's `Image.resize(size, LANCZOS)` on 8-bit pixels (`Resample.c`): per axis (width
/// first, then height; an axis of the same size is left alone), each output pixel the
/// normalized Lanczos-3 weights of the inputs within 3 x max(scale, 1) of its centre, in
/// fixed point with 22 fractional bits, rounded and clipped to 0..255 after each axis.
/// Checked against PIL 13 on random pictures scaled down and up while writing it.
pub fn lanczos<P>(
    img: &image::ImageBuffer<P, Vec<u8>>,
    width: usize,
    height: usize,
) -> image::ImageBuffer<P, Vec<u8>>
where
    P: image::Pixel<Subpixel = u8>,
{
    let c = P::CHANNEL_COUNT as usize;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut data = img.as_raw().clone();
    if w != width {
        data = resample_rows(&data, (w, h), c, width);
    }
    if h != height {
        // columns as rows: transpose, resample, transpose back
        let t = transpose(&data, (width, h), c);
        let r = resample_rows(&t, (h, width), c, height);
        data = transpose(&r, (height, width), c);
    }
    image::ImageBuffer::from_raw(width as u32, height as u32, data).expect("sized above")
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn lanczos_weight(x: f64) -> f64 {
    let sinc = |x: f64| {
        if x == 0.0 {
            1.0
        } else {
            let x = x * std::f64::consts::PI;
            x.sin() / x
        }
    };
    if (-3.0..3.0).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

/// Each row of `(w, h)` pixels of `c` channels resampled to `out` pixels.
fn resample_rows(data: &[u8], (w, h): (usize, usize), c: usize, out: usize) -> Vec<u8> {
    let scale = w as f64 / out as f64;
    let filter_scale = scale.max(1.0);
    let support = 3.0 * filter_scale;
    let coeffs: Vec<(usize, Vec<i64>)> = (0..out)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(w as i64) as usize - xmin;
            let k: Vec<f64> = (0..xmax)
                .map(|x| lanczos_weight((x as f64 + xmin as f64 - center + 0.5) / filter_scale))
                .collect();
            let total: f64 = k.iter().sum();
            let fixed = k
                .iter()
                .map(|&v| {
                    let v = if total != 0.0 { v / total } else { v };
                    let f = v * (1u64 << PRECISION_BITS) as f64;
                    (if v < 0.0 { f - 0.5 } else { f + 0.5 }) as i64
                })
                .collect();
            (xmin, fixed)
        })
        .collect();
    let mut result = vec![0u8; out * h * c];
    for y in 0..h {
        let row = &data[y * w * c..(y + 1) * w * c];
        for (xx, (xmin, k)) in coeffs.iter().enumerate() {
            for ch in 0..c {
                let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                for (x, kv) in k.iter().enumerate() {
                    ss += row[(x + xmin) * c + ch] as i64 * kv;
                }
                result[(y * out + xx) * c + ch] = (ss >> PRECISION_BITS).clamp(0, 255) as u8;
            }
        }
    }
    result
}

/// (w, h) pixels of `c` channels to (h, w).
fn transpose(data: &[u8], (w, h): (usize, usize), c: usize) -> Vec<u8> {
    let mut out = vec![0u8; data.len()];
    for y in 0..h {
        for x in 0..w {
            let (src, dst) = ((y * w + x) * c, (x * h + y) * c);
            out[dst..dst + c].copy_from_slice(&data[src..src + c]);
        }
    }
    out
}

/// PIL's `ImageFilter.GaussianBlur(radius)` on an 8-bit image (`BoxBlur.c`): three box blurs
/// of a fractional radius (`_gaussian_blur_radius`, in f32 as PIL's C computes it) along the
/// rows, then three along the columns, each in 24-bit fixed point with the edges extended.
/// Checked against PIL 13 on random masks for radii 2 to 33 while writing it.
pub fn gaussian_blur(img: &image::GrayImage, radius: f32) -> image::GrayImage {
    let box_radius = {
        let sigma2 = radius * radius / 3.0;
        let l_box = (12.0 * sigma2 as f64 + 1.0).sqrt() as f32;
        let l = ((l_box as f64 - 1.0) / 2.0).floor() as f32;
        let a = (2.0 * l + 1.0) * (l * (l + 1.0) - 3.0 * sigma2);
        l + a / (6.0 * (sigma2 - (l + 1.0) * (l + 1.0)))
    };
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut rows: Vec<Vec<u8>> = (0..h)
        .map(|y| img.as_raw()[y * w..(y + 1) * w].to_vec())
        .collect();
    for _ in 0..3 {
        rows = rows.iter().map(|r| box_blur_line(r, box_radius)).collect();
    }
    let mut cols: Vec<Vec<u8>> = (0..w)
        .map(|x| rows.iter().map(|r| r[x]).collect())
        .collect();
    for _ in 0..3 {
        cols = cols.iter().map(|c| box_blur_line(c, box_radius)).collect();
    }
    image::GrayImage::from_fn(w as u32, h as u32, |x, y| {
        image::Luma([cols[x as usize][y as usize]])
    })
}

/// `ImagingLineBoxBlur8`: one line, a box of `radius` (fractional: the two far pixels get
/// the remaining weight), edges repeated.
fn box_blur_line(line: &[u8], radius_f: f32) -> Vec<u8> {
    let n = line.len();
    let last = n - 1;
    let radius = radius_f as usize;
    let ww = ((1u32 << 24) as f32 / (radius_f * 2.0 + 1.0)) as u64;
    let fw = ((1u64 << 24) - (radius as u64 * 2 + 1) * ww) / 2;
    let edge_a = (radius + 1).min(n);
    let edge_b = n.saturating_sub(radius + 1);
    let px = |i: usize| line[i] as i64;
    let mut acc: i64 = px(0) * (radius as i64 + 1);
    for x in 0..edge_a.saturating_sub(1) {
        acc += px(x);
    }
    acc += px(last) * (radius as i64 - edge_a as i64 + 1);
    let mut out = vec![0u8; n];
    let mut step = |x: usize, sub: usize, add: usize, left: usize, right: usize| {
        acc += px(add) - px(sub);
        let bulk = acc as u64 * ww + (px(left) + px(right)) as u64 * fw;
        out[x] = ((bulk + (1 << 23)) >> 24) as u8;
    };
    // (the three spans of PIL's loop, by where the box touches an edge)
    if edge_a <= edge_b {
        for x in 0..edge_a {
            step(x, 0, x + radius, 0, x + radius + 1);
        }
        for x in edge_a..edge_b {
            step(
                x,
                x - radius - 1,
                x + radius,
                x - radius - 1,
                x + radius + 1,
            );
        }
        for x in edge_b..=last {
            step(x, x - radius - 1, last, x - radius - 1, last);
        }
    } else {
        for x in 0..edge_b {
            step(x, 0, x + radius, 0, x + radius + 1);
        }
        for x in edge_b..edge_a {
            step(x, 0, last, 0, last);
        }
        for x in edge_a..=last {
            step(x, x - radius - 1, last, x - radius - 1, last);
        }
    }
    out
}

/// diffusers' `image_processor.apply_overlay(mask, picture, generated)`: the picture pasted
/// back over the generated image where the mask is black, blended where it is gray (the mask
/// as given, not binarized), with PIL's integer arithmetic: the picture premultiplied by the
/// inverted mask (`paste`), unpremultiplied (`RGBa` to `RGBA`), then `alpha_composite` over
/// the generated image (7 bits of extra precision). `generated` is RGB8, changed in place.
pub fn overlay(generated: &mut [u8], picture: &image::RgbImage, mask: &image::GrayImage) {
    let div255 = |a: u32| {
        let t = a + 128;
        ((t >> 8) + t) >> 8
    };
    const P: u32 = 7;
    for ((out, src), m) in generated
        .chunks_exact_mut(3)
        .zip(picture.pixels())
        .zip(mask.pixels())
    {
        let alpha = 255 - m[0] as u32;
        if alpha == 0 {
            continue;
        }
        let coef1 = alpha * 255 * 255 * (1 << P) / (alpha * 255 + 255 * (255 - alpha));
        let coef2 = 255 * (1 << P) - coef1;
        for c in 0..3 {
            let premultiplied = div255(src[c] as u32 * alpha);
            let straight = if alpha == 255 {
                premultiplied
            } else {
                (255 * premultiplied / alpha).min(255)
            };
            let t = straight * coef1 + out[c] as u32 * coef2 + (0x80 << P);
            out[c] = ((((t >> 8) + t) >> 8) >> P) as u8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_down_and_pixels_map_to_minus_one_one() {
        let mut rgb = image::RgbImage::new(21, 17);
        rgb.put_pixel(0, 0, image::Rgb([0, 255, 51]));
        let p = Picture { rgb };
        assert_eq!(p.default_size(8).unwrap(), (16, 16));
        assert!(p.default_size(32).is_err());
        let t = Picture {
            rgb: image::RgbImage::from_pixel(8, 8, image::Rgb([0, 255, 51])),
        }
        .to_tensor(8, 8)
        .unwrap();
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!((v[0], v[64], v[128]), (-1.0, 1.0, 51.0 / 255.0 * 2.0 - 1.0));
        // another size: resized
        assert_eq!(p.to_tensor(16, 8).unwrap().dims(), &[1, 3, 8, 16]);
    }
}
