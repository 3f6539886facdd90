//! Output files: name templates, PNG encoding with generation metadata, grids, and atomic
//! writes (temporary file + rename, never overwriting unless asked).

use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Values a file-name template can use.
pub struct NameFields<'a> {
    pub seed: u64,
    pub index: usize,
    pub prompt: &'a str,
    /// The line of a prompts file (1-based), when there is one.
    pub line: Option<usize>,
}

/// A filesystem-safe slug of the prompt: lowercase ASCII letters and digits, '-' between words,
/// at most 60 characters.
pub fn slug(prompt: &str) -> String {
    let mut s = String::new();
    for ch in prompt.chars() {
        if ch.is_ascii_alphanumeric() {
            s.push(ch.to_ascii_lowercase());
        } else if !s.ends_with('-') && !s.is_empty() {
            s.push('-');
        }
        if s.len() >= 60 {
            break;
        }
    }
    let s = s.trim_matches('-').to_string();
    if s.is_empty() {
        "image".into()
    } else {
        s
    }
}

/// Expands `{seed}`, `{index}`, `{prompt}` and `{line}` in an output template.
pub fn render_template(template: &str, f: &NameFields) -> Result<String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let close = rest[open..]
            .find('}')
            .with_context(|| format!("output template {template:?} has an unclosed '{{'"))?;
        let key = &rest[open + 1..open + close];
        match key {
            "seed" => out.push_str(&f.seed.to_string()),
            "index" => out.push_str(&f.index.to_string()),
            "prompt" => out.push_str(&slug(f.prompt)),
            "line" => out.push_str(&f.line.unwrap_or(0).to_string()),
            other => bail!("output template {template:?}: unknown field {{{other}}} (known: {{seed}}, {{index}}, {{prompt}}, {{line}})"),
        }
        rest = &rest[open + close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Whether the template names each image differently by itself.
pub fn template_is_unique(template: &str) -> bool {
    template.contains("{seed}") || template.contains("{index}")
}

/// Inserts `-suffix` before the extension: `out/cat.png` -> `out/cat-suffix.png`.
pub fn with_suffix(path: &str, suffix: &str) -> String {
    let p = Path::new(path);
    match (p.file_stem(), p.extension()) {
        (Some(stem), Some(ext)) => p
            .with_file_name(format!(
                "{}-{suffix}.{}",
                stem.to_string_lossy(),
                ext.to_string_lossy()
            ))
            .to_string_lossy()
            .into_owned(),
        _ => format!("{path}-{suffix}"),
    }
}

/// PNG text metadata, written in order. Latin-1 text goes into tEXt chunks (what PNG-info
/// viewers read), anything else into iTXt (UTF-8).
pub type Metadata = Vec<(String, String)>;

/// Encodes RGB8 pixels as a PNG with the metadata chunks.
pub fn encode_png(width: usize, height: usize, rgb: &[u8], metadata: &Metadata) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut buf, width as u32, height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        for (k, v) in metadata {
            if v.chars().all(|c| (c as u32) < 256) {
                enc.add_text_chunk(k.clone(), v.clone())?;
            } else {
                enc.add_itxt_chunk(k.clone(), v.clone())?;
            }
        }
        let mut writer = enc.write_header()?;
        writer.write_image_data(rgb)?;
        writer.finish()?;
    }
    Ok(buf)
}

/// Refuses to go on when `path` exists and overwriting was not asked for.
pub fn check_writable(path: &Path, overwrite: bool) -> Result<()> {
    if path.exists() && !overwrite {
        bail!(
            "{} already exists; pass --overwrite to replace it or choose another --output",
            path.display()
        );
    }
    if path.is_dir() {
        bail!("{} is a directory", path.display());
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, then a rename.
/// Missing folders are created. Without `overwrite` an existing file is an error.
pub fn write_atomic(path: &Path, bytes: &[u8], overwrite: bool) -> Result<()> {
    check_writable(path, overwrite)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create folder {}", dir.display()))?;
    let name = path.file_name().context("output path has no file name")?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> Result<()> {
        let mut f = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        if !overwrite && path.exists() {
            bail!(
                "{} appeared while generating; not overwriting it",
                path.display()
            );
        }
        std::fs::rename(&tmp, path)
            .with_context(|| format!("cannot move the image to {}", path.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// diffusers' `make_image_grid`: images placed row by row, `rows` x `cols`.
pub fn grid(
    images: &[(usize, usize, &[u8])],
    rows: usize,
    cols: usize,
) -> Result<(usize, usize, Vec<u8>)> {
    if images.len() != rows * cols {
        bail!(
            "--grid {rows}x{cols} needs exactly {} images, but {} were generated (set --num-images {})",
            rows * cols,
            images.len(),
            rows * cols
        );
    }
    let (w, h) = (images[0].0, images[0].1);
    let (gw, gh) = (w * cols, h * rows);
    let mut out = vec![0u8; gw * gh * 3];
    for (i, (iw, ih, px)) in images.iter().enumerate() {
        if *iw != w || *ih != h {
            bail!("grid images differ in size");
        }
        let (x0, y0) = ((i % cols) * w, (i / cols) * h);
        for y in 0..h {
            let src = &px[y * w * 3..(y + 1) * w * 3];
            let dst = ((y0 + y) * gw + x0) * 3;
            out[dst..dst + w * 3].copy_from_slice(src);
        }
    }
    Ok((gw, gh, out))
}

/// Parses `RxC`, e.g. `3x2`.
pub fn parse_grid(s: &str) -> Result<(usize, usize)> {
    let (r, c) = s
        .split_once(['x', 'X'])
        .with_context(|| format!("--grid {s:?}: expected ROWSxCOLS, e.g. 2x3"))?;
    let r: usize = r
        .trim()
        .parse()
        .with_context(|| format!("--grid {s:?}: bad row count"))?;
    let c: usize = c
        .trim()
        .parse()
        .with_context(|| format!("--grid {s:?}: bad column count"))?;
    if r == 0 || c == 0 {
        bail!("--grid {s:?}: rows and columns must be at least 1");
    }
    Ok((r, c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_expand() {
        let f = NameFields {
            seed: 42,
            index: 3,
            prompt: "A Cat, on a beach!",
            line: Some(7),
        };
        assert_eq!(
            render_template("out/{prompt}-{seed}-{index}-{line}.png", &f).unwrap(),
            "out/a-cat-on-a-beach-42-3-7.png"
        );
        assert!(render_template("{nope}.png", &f).is_err());
        assert_eq!(with_suffix("out/cat.png", "grid"), "out/cat-grid.png");
    }

    #[test]
    fn grid_places_images_row_by_row() {
        let a = vec![1u8; 2 * 2 * 3];
        let b = vec![2u8; 2 * 2 * 3];
        let (w, h, px) = grid(&[(2, 2, &a), (2, 2, &b)], 1, 2).unwrap();
        assert_eq!((w, h), (4, 2));
        assert_eq!(&px[0..12], &[1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2]);
        assert!(grid(&[(2, 2, &a)], 2, 2).is_err());
    }
}
