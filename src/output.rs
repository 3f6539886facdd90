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

/// Whether an image may be written to `path`: nothing there, or, with `overwrite`, a regular
/// file. Nothing else is ever replaced: a folder, or a device node, pipe, socket or link (as
/// root, `-o /dev/null --overwrite` replaced the device with a PNG).
pub fn check_writable(path: &Path, overwrite: bool) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot check {}", path.display())),
        Ok(m) if m.is_dir() => bail!("{} is a directory; choose a file name", path.display()),
        Ok(m) if !m.file_type().is_file() => bail!(
            "{} is not a regular file (a device, pipe, socket or link); sdgen only replaces regular files",
            path.display()
        ),
        Ok(_) if !overwrite => bail!(
            "{} already exists; pass --overwrite to replace it or choose another --output",
            path.display()
        ),
        Ok(_) => Ok(()),
    }
}

/// The longest file name the temporary `.NAME.PID.N.tmp` leaves room for (NAME_MAX is 255
/// bytes on Linux, macOS and Windows file systems).
const MAX_NAME: usize = 255 - ".".len() - ".4194304.99.tmp".len();

/// What can be checked of an output path before any work: a file name (not empty, not ending
/// in `/`, short enough for its temporary file), and a folder to hold it: the nearest part of
/// the path that exists is a folder this user can write into.
pub fn check_target(path: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let raw = path.as_os_str().as_bytes();
    if raw.is_empty() {
        bail!("the output path is empty");
    }
    if raw.ends_with(b"/") {
        bail!(
            "{} ends with '/': give a file name, e.g. {}image.png",
            path.display(),
            path.display()
        );
    }
    let Some(name) = path.file_name() else {
        bail!("{} has no file name", path.display());
    };
    if name.len() > MAX_NAME {
        bail!(
            "the file name of {} is {} bytes long; at most {MAX_NAME} fit",
            path.display(),
            name.len()
        );
    }
    let mut dir = folder_of(path);
    loop {
        match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => return check_can_write_into(dir),
            Ok(_) => bail!(
                "cannot write {}: {} is a file, not a folder",
                path.display(),
                dir.display()
            ),
            // missing, or under a file: the part above tells which
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                ) =>
            {
                dir = folder_of(dir);
            }
            Err(e) => return Err(e).with_context(|| format!("cannot write {}", path.display())),
        }
    }
}

/// The folder `path` is in: its parent, or `.` for a bare name.
fn folder_of(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Whether this user may create files in `dir` (`access(W_OK | X_OK)`).
fn check_can_write_into(dir: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: a NUL-terminated path that lives across the call.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(e).with_context(|| format!("cannot write into the folder {}", dir.display()));
    }
    Ok(())
}

/// Removes the temporary files `.NAME.PID.N.tmp` that a killed run left beside `paths`: only
/// for those names, only regular files, only when process PID is gone. Each folder is read
/// once. Returns the files removed.
pub fn remove_stale_temps<'a>(paths: impl Iterator<Item = &'a Path>) -> Vec<PathBuf> {
    use std::collections::{HashMap, HashSet};
    let mut by_dir: HashMap<&Path, HashSet<&std::ffi::OsStr>> = HashMap::new();
    for p in paths {
        if let Some(name) = p.file_name() {
            by_dir.entry(folder_of(p)).or_default().insert(name);
        }
    }
    let mut removed = Vec::new();
    for (dir, names) in by_dir {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in entries.flatten() {
            let file = e.file_name();
            let Some(f) = file.to_str() else { continue };
            let Some((name, pid)) = temp_owner(f) else {
                continue;
            };
            let ours = names.contains(std::ffi::OsStr::new(name));
            let regular = e.file_type().is_ok_and(|t| t.is_file());
            if ours && regular && !process_alive(pid) && std::fs::remove_file(e.path()).is_ok() {
                removed.push(e.path());
            }
        }
    }
    removed
}

/// `(NAME, PID)` of a temporary file name `.NAME.PID.N.tmp`.
fn temp_owner(file: &str) -> Option<(&str, u32)> {
    let rest = file.strip_prefix('.')?.strip_suffix(".tmp")?;
    let (rest, n) = rest.rsplit_once('.')?;
    let (name, pid) = rest.rsplit_once('.')?;
    n.parse::<u32>().ok()?;
    Some((name, pid.parse().ok()?))
}

fn process_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    // SAFETY: signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// What [`write_atomic`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// The image is at its path.
    New,
    /// Without `overwrite`: another process wrote the path while this one generated (a second
    /// batch worker, say); its file was left as it is.
    AlreadyThere,
}

/// Writes `bytes` to `path` atomically: a new temporary file in the same folder (never an
/// existing one, so a planted link is not followed), then moved into place. Missing folders
/// are created. Without `overwrite` an existing file is an error, and the move itself refuses
/// to replace a file that appeared meanwhile ([`Written::AlreadyThere`]).
pub fn write_atomic(path: &Path, bytes: &[u8], overwrite: bool) -> Result<Written> {
    check_writable(path, overwrite)?;
    let dir = folder_of(path);
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create folder {}", dir.display()))?;
    let name = path.file_name().context("output path has no file name")?;
    let (tmp, mut f) = create_temp(dir, &name.to_string_lossy())?;
    let result = (|| -> Result<Written> {
        f.write_all(bytes)
            .and_then(|()| f.sync_all())
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        drop(f);
        if overwrite {
            check_writable(path, true)?;
            std::fs::rename(&tmp, path)
                .with_context(|| format!("cannot move the image to {}", path.display()))?;
            return Ok(Written::New);
        }
        match move_no_replace(&tmp, path) {
            Ok(()) => Ok(Written::New),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(Written::AlreadyThere),
            Err(e) => {
                Err(e).with_context(|| format!("cannot move the image to {}", path.display()))
            }
        }
    })();
    if !matches!(result, Ok(Written::New)) {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// A new file `.NAME.PID.N.tmp` in `dir`, created exclusively (`O_EXCL`: an existing file or
/// link of that name is never opened).
fn create_temp(dir: &Path, name: &str) -> Result<(PathBuf, std::fs::File)> {
    let pid = std::process::id();
    for n in 0.. {
        let tmp = dir.join(format!(".{name}.{pid}.{n}.tmp"));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 100 => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot write {}", tmp.display())),
        }
    }
    unreachable!("the loop returns")
}

/// Moves `from` to `to` unless `to` exists (then `AlreadyExists`), in one step: the check and
/// the move cannot be split by another writer. `renameat2(RENAME_NOREPLACE)` on Linux; where
/// the file system lacks it, a hard link (which refuses an existing name too), then `from`
/// removed.
fn move_no_replace(from: &Path, to: &Path) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let c = |p: &Path| CString::new(p.as_os_str().as_bytes());
        let (cfrom, cto) = (c(from)?, c(to)?);
        // SAFETY: two NUL-terminated paths that live across the call.
        let r = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                cfrom.as_ptr(),
                libc::AT_FDCWD,
                cto.as_ptr(),
                libc::RENAME_NOREPLACE,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if !matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) {
            return Err(e);
        }
    }
    std::fs::hard_link(from, to)?;
    std::fs::remove_file(from)
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

    #[test]
    fn only_regular_files_are_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.png");
        std::fs::write(&file, b"old").unwrap();
        assert!(check_writable(&file, false).is_err());
        check_writable(&file, true).unwrap();
        check_writable(&dir.path().join("new.png"), false).unwrap();
        let link = dir.path().join("link.png");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        for (path, what) in [
            (Path::new("/dev/null"), "not a regular file"),
            (link.as_path(), "not a regular file"),
            (dir.path(), "is a directory"),
        ] {
            for overwrite in [false, true] {
                let e = write_atomic(path, b"png", overwrite)
                    .unwrap_err()
                    .to_string();
                assert!(e.contains(what), "{}: {e}", path.display());
            }
        }
        assert_eq!(std::fs::read(&file).unwrap(), b"old");
        assert_eq!(write_atomic(&file, b"new", true).unwrap(), Written::New);
        assert_eq!(std::fs::read(&file).unwrap(), b"new");
    }

    #[test]
    fn the_final_move_never_replaces_and_links_are_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"victim").unwrap();
        // a link planted where the temporary file would go is not opened
        let pid = std::process::id();
        let planted = dir.path().join(format!(".x.png.{pid}.0.tmp"));
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        let out = dir.path().join("x.png");
        assert_eq!(write_atomic(&out, b"png", false).unwrap(), Written::New);
        assert_eq!(std::fs::read(&out).unwrap(), b"png");
        assert_eq!(std::fs::read(&victim).unwrap(), b"victim");
        // a file that appears between the check and the move is kept, and the temporary
        // file does not stay behind
        let (tmp, _) = create_temp(dir.path(), "y.png").unwrap();
        std::fs::write(&tmp, b"mine").unwrap();
        let other = dir.path().join("y.png");
        std::fs::write(&other, b"theirs").unwrap();
        let e = move_no_replace(&tmp, &other).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&other).unwrap(), b"theirs");
        move_no_replace(&tmp, &dir.path().join("z.png")).unwrap();
        assert!(!tmp.exists());
    }
}
