//! Item images to feature rows, inside the runtime: decoding (JPEG, PNG, WebP) under size
//! limits, the preprocessing of `tools/illmrec_tools/features.py` (RGB, the whole picture resized
//! to 224×224 with Pillow's bilinear filter, reproduced bit for bit), and the MobileNet embedding
//! ([`crate::mobilenet`]); plus how a folder of images maps to item ids.
//!
//! Behaviour on unusual inputs (each one a test):
//! - a file that is not JPEG/PNG/WebP, corrupt or truncated: an error naming the file;
//! - a picture over [`MAX_SIDE`] pixels on a side or needing more than [`MAX_ALLOC`] bytes
//!   decoded (a decompression bomb: the header is read, nothing is allocated) or a file over
//!   [`MAX_FILE_BYTES`]: an error;
//! - alpha is dropped (not composited), greyscale is replicated to RGB, palette images are
//!   expanded: what Pillow's `convert("RGB")` does;
//! - 16-bit images are scaled to 8 bits (`v / 257`, rounded): Pillow keeps the high byte of
//!   16-bit RGB (within one level of this) and saturates 16-bit greyscale (this does not);
//! - CMYK (and YCCK) JPEGs: an error (convert them to RGB first);
//! - JPEGs are decoded by libjpeg-turbo's code (the `mozjpeg` crate builds it from source), the
//!   decoder Pillow uses, so the pixels are bit for bit Pillow's; PNG and WebP by the `image`
//!   crate;
//! - EXIF orientation is **ignored**, as in `features.py` (Pillow does not apply it unless asked):
//!   the pixels are encoded as stored, so the runtime's rows match the Python-made banks the
//!   heads were trained on. Rotate such photos before adding them.

use crate::mobilenet::MobileNet;
use anyhow::{bail, ensure, Context, Result};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Largest width or height accepted.
pub const MAX_SIDE: u32 = 16_384;
/// Largest decoded buffer accepted (bytes).
pub const MAX_ALLOC: u64 = 512 << 20;
/// Largest image file read.
pub const MAX_FILE_BYTES: u64 = 64 << 20;
/// File extensions taken as images when a folder is listed.
pub const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

/// A decoded RGB picture (8 bits per channel, row-major).
pub struct Rgb {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
}

/// Reads an image file and decodes it to RGB under the size limits.
pub fn load_rgb(path: &Path) -> Result<Rgb> {
    let file = crate::fsutil::open_regular(path)?;
    let len = file.metadata()?.len();
    ensure!(
        len <= MAX_FILE_BYTES,
        "{}: {len} bytes, larger than the {} MiB limit for an image file",
        path.display(),
        MAX_FILE_BYTES >> 20
    );
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {}", path.display()))?;
    decode_rgb(&bytes).with_context(|| format!("{}: cannot decode image", path.display()))
}

/// Decodes JPEG, PNG or WebP bytes to RGB under the size limits.
pub fn decode_rgb(bytes: &[u8]) -> Result<Rgb> {
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return decode_jpeg(bytes);
    }
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .context("cannot read the bytes")?;
    let Some(format) = reader.format() else {
        bail!("not an image (expected JPEG, PNG or WebP)");
    };
    ensure!(
        matches!(
            format,
            image::ImageFormat::Jpeg | image::ImageFormat::Png | image::ImageFormat::WebP
        ),
        "{format:?} images are not supported (expected JPEG, PNG or WebP)"
    );
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_ALLOC);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(l) => anyhow::anyhow!(
            "{l} (at most {MAX_SIDE}×{MAX_SIDE} pixels and {} MiB decoded)",
            MAX_ALLOC >> 20
        ),
        other => anyhow::anyhow!("{other}"),
    })?;
    let (width, height) = (img.width(), img.height());
    check_size(width as u64, height as u64, 3)?;
    let pixels = match img {
        image::DynamicImage::ImageRgb8(i) => i.into_raw(),
        other => other.to_rgb8().into_raw(),
    };
    Ok(Rgb {
        width,
        height,
        pixels,
    })
}

fn check_size(width: u64, height: u64, channels: u64) -> Result<()> {
    ensure!(width > 0 && height > 0, "the image is empty");
    ensure!(
        width <= MAX_SIDE as u64 && height <= MAX_SIDE as u64 && width * height * channels <= MAX_ALLOC,
        "the image is {width}×{height} pixels, over the limit (at most {MAX_SIDE}×{MAX_SIDE} pixels and {} MiB decoded)",
        MAX_ALLOC >> 20
    );
    Ok(())
}

/// JPEG through libjpeg-turbo's decoder (mozjpeg's build of it), as Pillow decodes it: ISLOW
/// IDCT, fancy upsampling, the same YCbCr→RGB tables, so the pixels are Pillow's bit for bit.
/// libjpeg reports errors by unwinding, caught here; a file cut short (libjpeg only warns and
/// fills in grey) is refused by looking for the end-of-image marker after the last scan.
fn decode_jpeg(bytes: &[u8]) -> Result<Rgb> {
    let last_scan = bytes
        .windows(2)
        .rposition(|w| w == [0xFF, 0xDA])
        .context("not a complete JPEG: no image data")?;
    ensure!(
        bytes[last_scan..].windows(2).any(|w| w == [0xFF, 0xD9]),
        "truncated JPEG: no end-of-image marker after the image data"
    );
    let decoded = std::panic::catch_unwind(|| -> Result<Rgb> {
        let d = mozjpeg::Decompress::new_mem(bytes)?;
        let (width, height) = (d.width(), d.height());
        check_size(width as u64, height as u64, 4)?;
        use mozjpeg::ColorSpace as C;
        ensure!(
            !matches!(d.color_space(), C::JCS_CMYK | C::JCS_YCCK),
            "CMYK JPEGs are not supported: convert the image to RGB first"
        );
        let mut started = d.rgb()?;
        let pixels: Vec<u8> = started.read_scanlines()?;
        started.finish()?;
        ensure!(
            pixels.len() == width * height * 3,
            "the JPEG data is incomplete"
        );
        Ok(Rgb {
            width: width as u32,
            height: height as u32,
            pixels,
        })
    });
    match decoded {
        Ok(r) => r,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "libjpeg failed".into());
            bail!("{}", msg.trim_start_matches("libjpeg fatal error: "))
        }
    }
}

/// Pillow's `Image.resize(size, Image.Resampling.BILINEAR)` on 8-bit RGB, bit for bit: a
/// separable convolution whose triangle filter widens with the downscaling factor, weights
/// normalised in f64 and rounded to 22-bit fixed point, horizontal pass first.
pub fn resize_bilinear(src: &Rgb, out_w: u32, out_h: u32) -> Vec<u8> {
    const PRECISION_BITS: u32 = 32 - 8 - 2;
    let (in_w, in_h) = (src.width as usize, src.height as usize);
    let (out_w, out_h) = (out_w as usize, out_h as usize);
    if in_w == out_w && in_h == out_h {
        return src.pixels.clone();
    }
    struct Coeffs {
        ksize: usize,
        bounds: Vec<(usize, usize)>,
        k: Vec<i32>,
    }
    fn coeffs(in_size: usize, out_size: usize) -> Coeffs {
        let scale = in_size as f64 / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = 1.0 * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let mut bounds = Vec::with_capacity(out_size);
        let mut k = vec![0i32; out_size * ksize];
        let mut w = vec![0f64; ksize];
        for xx in 0..out_size {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
            let mut ww = 0.0;
            for (x, wx) in w.iter_mut().enumerate().take(xmax) {
                let t = ((x + xmin) as f64 - center + 0.5) * ss;
                *wx = (1.0 - t.abs()).max(0.0);
                ww += *wx;
            }
            for x in 0..xmax {
                let v = if ww != 0.0 { w[x] / ww } else { w[x] };
                let f = v * (1u32 << PRECISION_BITS) as f64;
                k[xx * ksize + x] = if v < 0.0 {
                    (-0.5 + f) as i32
                } else {
                    (0.5 + f) as i32
                };
            }
            bounds.push((xmin, xmax));
        }
        Coeffs { ksize, bounds, k }
    }
    let clip = |ss: i64| (ss >> PRECISION_BITS).clamp(0, 255) as u8;
    let half = 1i64 << (PRECISION_BITS - 1);
    let horiz = coeffs(in_w, out_w);
    let vert = coeffs(in_h, out_h);
    let need_h = in_w != out_w;
    let need_v = in_h != out_h;
    // Horizontal pass over the rows the vertical pass reads.
    let (first_row, rows) = if need_v {
        let first = vert.bounds[0].0;
        let (lb, ln) = vert.bounds[out_h - 1];
        (first, lb + ln - first)
    } else {
        (0, in_h)
    };
    let tmp: Vec<u8> = if need_h {
        let mut t = vec![0u8; rows * out_w * 3];
        for y in 0..rows {
            let row = &src.pixels[(y + first_row) * in_w * 3..][..in_w * 3];
            for xx in 0..out_w {
                let (xmin, xmax) = horiz.bounds[xx];
                let k = &horiz.k[xx * horiz.ksize..][..xmax];
                for c in 0..3 {
                    let mut ss = half;
                    for (x, &kx) in k.iter().enumerate() {
                        ss += row[(x + xmin) * 3 + c] as i64 * kx as i64;
                    }
                    t[(y * out_w + xx) * 3 + c] = clip(ss);
                }
            }
        }
        t
    } else {
        src.pixels[first_row * in_w * 3..(first_row + rows) * in_w * 3].to_vec()
    };
    if !need_v {
        return tmp;
    }
    let mut out = vec![0u8; out_h * out_w * 3];
    for yy in 0..out_h {
        let (ymin, ymax) = vert.bounds[yy];
        let ymin = ymin - first_row;
        let k = &vert.k[yy * vert.ksize..][..ymax];
        for x in 0..out_w * 3 {
            let mut ss = half;
            for (y, &ky) in k.iter().enumerate() {
                ss += tmp[(y + ymin) * out_w * 3 + x] as i64 * ky as i64;
            }
            out[yy * out_w * 3 + x] = clip(ss);
        }
    }
    out
}

/// The runtime's image encoder: decode, resize, embed.
pub struct ImageEncoder {
    net: MobileNet,
}

impl ImageEncoder {
    /// The shipped MobileNet v1 embedding extractor.
    pub fn new() -> Result<Self> {
        Ok(Self {
            net: MobileNet::shipped()?,
        })
    }

    /// Feature dimension (1024).
    pub fn dim(&self) -> usize {
        self.net.dim()
    }

    /// The 224×224 RGB input of a decoded picture.
    pub fn preprocess(&self, rgb: &Rgb) -> Vec<u8> {
        let s = self.net.input_size() as u32;
        resize_bilinear(rgb, s, s)
    }

    /// Embedding of a decoded picture.
    pub fn encode_rgb(&self, rgb: &Rgb) -> Result<Vec<f32>> {
        self.net.run(&self.preprocess(rgb))
    }

    /// Embedding of an image file.
    pub fn encode_file(&self, path: &Path) -> Result<Vec<f32>> {
        self.encode_rgb(&load_rgb(path)?)
    }

    /// Encodes files on `threads` threads (one picture per thread at a time); `done` is called
    /// after each file. Results are in the order of `paths`.
    pub fn encode_files(
        &self,
        paths: &[PathBuf],
        threads: usize,
        done: &(dyn Fn() + Sync),
    ) -> Vec<Result<Vec<f32>>> {
        let threads = threads.clamp(1, paths.len().max(1));
        let next = std::sync::atomic::AtomicUsize::new(0);
        let mut results: Vec<Option<Result<Vec<f32>>>> = (0..paths.len()).map(|_| None).collect();
        let slots = std::sync::Mutex::new(&mut results);
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= paths.len() {
                        break;
                    }
                    let r = self.encode_file(&paths[i]);
                    slots.lock().unwrap()[i] = Some(r);
                    done();
                });
            }
        });
        results
            .into_iter()
            .map(|r| r.expect("every file was encoded"))
            .collect()
    }
}

/// Feature rows of many images, in input order.
pub struct Encoded {
    pub ids: Vec<u64>,
    /// `ids.len()` × `dim` values, row-major.
    pub rows: Vec<f32>,
    pub dim: usize,
    /// Wall time of decoding, resizing and encoding them all.
    pub seconds: f64,
}

impl ImageEncoder {
    /// Encodes (id, file) pairs on `threads` threads; the first file that fails stops it with an
    /// error naming the file (and its id).
    pub fn encode_all(
        &self,
        pairs: &[(u64, PathBuf)],
        threads: usize,
        done: &(dyn Fn() + Sync),
    ) -> Result<Encoded> {
        let t = std::time::Instant::now();
        let paths: Vec<PathBuf> = pairs.iter().map(|(_, p)| p.clone()).collect();
        let results = self.encode_files(&paths, threads, done);
        let seconds = t.elapsed().as_secs_f64();
        let mut rows = Vec::with_capacity(pairs.len() * self.dim());
        for ((id, _), r) in pairs.iter().zip(results) {
            rows.extend(r.with_context(|| format!("item {id}"))?);
        }
        Ok(Encoded {
            ids: pairs.iter().map(|(id, _)| *id).collect(),
            rows,
            dim: self.dim(),
            seconds,
        })
    }
}

/// The image files of a folder (by extension, see [`IMAGE_EXTENSIONS`]), sorted by name.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let p = e?.path();
        let is_image = p
            .extension()
            .and_then(|x| x.to_str())
            .is_some_and(|x| IMAGE_EXTENSIONS.contains(&x.to_ascii_lowercase().as_str()));
        if is_image && p.is_file() {
            files.push(p);
        }
    }
    files.sort();
    ensure!(
        !files.is_empty(),
        "{} holds no image file ({})",
        dir.display(),
        IMAGE_EXTENSIONS.join(", ")
    );
    Ok(files)
}

/// An item id from a file name: `123.jpg` → 123.
pub fn id_from_file_name(path: &Path) -> Result<u64> {
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    stem.parse().with_context(|| {
        format!(
            "{}: the file name is not an item id (name files <id>.jpg, or give a mapping file)",
            path.display()
        )
    })
}

/// A mapping file: one `ID,FILE` (or `ID<TAB>FILE`) per line, FILE relative to `base`; blank
/// lines and lines starting with `#` are skipped. Returns (id, path) in file order.
pub fn read_id_map(path: &Path, base: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let text = crate::fsutil::read_regular_string(path)?;
    let mut out = Vec::new();
    let mut seen = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (id, file) = line
            .split_once([',', '\t'])
            .with_context(|| format!("{} line {}: expected ID,FILE", path.display(), n + 1))?;
        let id: u64 = id.trim().parse().with_context(|| {
            format!(
                "{} line {}: '{}' is not an item id",
                path.display(),
                n + 1,
                id.trim()
            )
        })?;
        if let Some(prev) = seen.insert(id, n + 1) {
            bail!(
                "{} line {}: item {id} is already mapped on line {prev}",
                path.display(),
                n + 1
            );
        }
        out.push((id, base.join(file.trim())));
    }
    ensure!(!out.is_empty(), "{} maps no image", path.display());
    Ok(out)
}

/// (id, file) pairs for a set of image paths: each path a file (id from its name) or a folder
/// (its images, ids from their names); or, with a mapping file, the files it names relative to
/// the single folder given.
pub fn image_ids(inputs: &[PathBuf], map: Option<&Path>) -> Result<Vec<(u64, PathBuf)>> {
    ensure!(!inputs.is_empty(), "no image given");
    if let Some(map) = map {
        ensure!(
            inputs.len() == 1 && inputs[0].is_dir(),
            "a mapping file needs exactly one image folder"
        );
        return read_id_map(map, &inputs[0]);
    }
    let mut out = Vec::new();
    for p in inputs {
        let files = if p.is_dir() {
            list_images(p)?
        } else {
            vec![p.clone()]
        };
        for f in files {
            out.push((id_from_file_name(&f)?, f));
        }
    }
    let mut ids: Vec<u64> = out.iter().map(|(i, _)| *i).collect();
    ids.sort_unstable();
    if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
        bail!("item {} has more than one image", w[0]);
    }
    Ok(out)
}
