//! Decoding item images (JPEG, PNG, WebP) under size limits, and the preprocessing of
//! `tools/illmrec_tools/features.py`: RGB, the whole picture resized to 224×224 with Pillow's
//! bilinear filter, reproduced bit for bit.
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

use anyhow::{bail, ensure, Context, Result};
use std::io::Read;
use std::path::Path;

/// Largest width or height accepted.
pub const MAX_SIDE: u32 = 16_384;
/// Largest decoded buffer accepted (bytes).
pub const MAX_ALLOC: u64 = 512 << 20;
/// Largest image file read.
pub const MAX_FILE_BYTES: u64 = 64 << 20;

/// A decoded RGB picture (8 bits per channel, row-major).
pub struct Rgb {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
}

/// Reads an image file and decodes it to RGB under the size limits.
pub fn load_rgb(path: &Path) -> Result<Rgb> {
    let file = crate::store::fsutil::open_regular(path)?;
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
    // The header first: a decompression bomb is refused before anything is allocated.
    let (w, h) = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .context("cannot read the bytes")?
        .into_dimensions()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    check_size(w as u64, h as u64, 4)?;
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
/// normalised in f64 and rounded to 22-bit fixed point, one pass per axis with an 8-bit image in
/// between. Like Pillow (≥ 11, `ImagingResampleInner`), the vertical pass runs first when the
/// height shrinks by more than twice the rows the width shrinks by columns, else the horizontal
/// one; the order changes the rounding, so it is reproduced (checked against Pillow on random
/// sizes by `tools/tests/test_image_parity.py`).
pub fn resize_bilinear(src: &Rgb, out_w: u32, out_h: u32) -> Vec<u8> {
    let (in_w, in_h) = (src.width as usize, src.height as usize);
    let (out_w, out_h) = (out_w as usize, out_h as usize);
    let shrink_h = in_h as i64 - out_h as i64;
    let vertical_first = shrink_h > 0 && shrink_h > (in_w as i64 - out_w as i64) * 2;
    if vertical_first {
        let tmp = resample_pass(&src.pixels, in_w, in_h, out_h, false);
        resample_pass(&tmp, in_w, out_h, out_w, true)
    } else {
        let tmp = resample_pass(&src.pixels, in_w, in_h, out_w, true);
        resample_pass(&tmp, out_w, in_h, out_h, false)
    }
}

/// One axis of Pillow's resampling (`ImagingResampleHorizontal_8bpc` / `..Vertical_8bpc`):
/// a w×h RGB picture to `out` columns (`horizontal`) or rows; a no-op when the size is the same.
fn resample_pass(px: &[u8], w: usize, h: usize, out: usize, horizontal: bool) -> Vec<u8> {
    const PRECISION_BITS: u32 = 32 - 8 - 2;
    let in_size = if horizontal { w } else { h };
    if in_size == out {
        return px.to_vec();
    }
    // precompute_coeffs + normalize_coeffs_8bpc
    let scale = in_size as f64 / out as f64;
    let filterscale = scale.max(1.0);
    let support = filterscale; // bilinear support 1.0
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out);
    let mut k = vec![0i32; out * ksize];
    let mut wts = vec![0f64; ksize];
    for xx in 0..out {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let mut ww = 0.0;
        for (x, wx) in wts.iter_mut().enumerate().take(xmax) {
            let t = ((x + xmin) as f64 - center + 0.5) * ss;
            *wx = (1.0 - t.abs()).max(0.0);
            ww += *wx;
        }
        for x in 0..xmax {
            let v = if ww != 0.0 { wts[x] / ww } else { wts[x] };
            let f = v * (1u32 << PRECISION_BITS) as f64;
            k[xx * ksize + x] = if v < 0.0 {
                (-0.5 + f) as i32
            } else {
                (0.5 + f) as i32
            };
        }
        bounds.push((xmin, xmax));
    }
    let clip = |ss: i64| (ss >> PRECISION_BITS).clamp(0, 255) as u8;
    let half = 1i64 << (PRECISION_BITS - 1);
    if horizontal {
        let mut t = vec![0u8; h * out * 3];
        for y in 0..h {
            let row = &px[y * w * 3..][..w * 3];
            for (xx, &(xmin, xmax)) in bounds.iter().enumerate() {
                let kx = &k[xx * ksize..][..xmax];
                for c in 0..3 {
                    let mut ss = half;
                    for (x, &kv) in kx.iter().enumerate() {
                        ss += row[(x + xmin) * 3 + c] as i64 * kv as i64;
                    }
                    t[(y * out + xx) * 3 + c] = clip(ss);
                }
            }
        }
        t
    } else {
        let mut t = vec![0u8; out * w * 3];
        for (yy, &(ymin, ymax)) in bounds.iter().enumerate() {
            let ky = &k[yy * ksize..][..ymax];
            for x in 0..w * 3 {
                let mut ss = half;
                for (y, &kv) in ky.iter().enumerate() {
                    ss += px[(y + ymin) * w * 3 + x] as i64 * kv as i64;
                }
                t[yy * w * 3 + x] = clip(ss);
            }
        }
        t
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use image::{ImageBuffer, Luma, Rgb as P, Rgba};

    pub(crate) fn gradient(w: u32, h: u32) -> image::RgbImage {
        ImageBuffer::from_fn(w, h, |x, y| {
            P([
                (x * 7 % 256) as u8,
                (y * 5 % 256) as u8,
                ((x + y) % 256) as u8,
            ])
        })
    }

    fn png(img: &image::DynamicImage) -> Vec<u8> {
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    pub(crate) fn jpeg(img: &image::RgbImage) -> Vec<u8> {
        let mut out = std::io::Cursor::new(Vec::new());
        image::DynamicImage::ImageRgb8(img.clone())
            .write_to(&mut out, image::ImageFormat::Jpeg)
            .unwrap();
        out.into_inner()
    }

    #[test]
    fn colour_types_become_rgb_like_pillow_convert() {
        let rgb = gradient(5, 4);
        let d = decode_rgb(&png(&image::DynamicImage::ImageRgb8(rgb.clone()))).unwrap();
        assert_eq!((d.width, d.height), (5, 4));
        assert_eq!(d.pixels, rgb.as_raw().clone());
        // Alpha is dropped, not composited.
        let rgba = ImageBuffer::from_fn(5, 4, |x, y| {
            let p = rgb.get_pixel(x, y).0;
            Rgba([p[0], p[1], p[2], (x * 50) as u8])
        });
        assert_eq!(
            decode_rgb(&png(&rgba.into())).unwrap().pixels,
            rgb.as_raw().clone()
        );
        // Grey is replicated.
        let grey = ImageBuffer::from_fn(3, 2, |x, y| Luma([(x * 40 + y) as u8]));
        let d = decode_rgb(&png(&grey.clone().into())).unwrap();
        for (i, p) in grey.pixels().enumerate() {
            assert_eq!(&d.pixels[i * 3..i * 3 + 3], &[p.0[0]; 3]);
        }
        // 16 bits are scaled to 8 (v / 257, rounded).
        let deep: ImageBuffer<image::Rgb<u16>, Vec<u16>> = ImageBuffer::from_fn(2, 2, |x, y| {
            image::Rgb([257 * (x as u16 * 100), 65535, 257 * y as u16 + 128])
        });
        let d = decode_rgb(&png(&deep.into())).unwrap();
        assert_eq!(&d.pixels[..3], &[0, 255, 0]);
        assert_eq!(&d.pixels[3..6], &[100, 255, 0]);
    }

    #[test]
    fn bad_bytes_are_errors_never_panics() {
        let good = jpeg(&gradient(64, 48));
        for (bytes, needle) in [
            (&b"GIF89a...."[..], "not supported"),
            (&b"plain text, not a picture"[..], "not an image"),
            (&good[..good.len() / 2], "truncated JPEG"),
            (&good[..20], "JPEG"),
            (&b""[..], "not an image"),
        ] {
            let e = decode_rgb(bytes).err().expect("an error");
            assert!(format!("{e:#}").contains(needle), "{e:#}");
        }
        let mut corrupt = good.clone();
        for b in corrupt.iter_mut().skip(300).step_by(7) {
            *b = 0xFF;
        }
        let _ = decode_rgb(&corrupt); // an error or a picture, never a panic
        assert!(decode_rgb(&good).is_ok());
    }

    #[test]
    fn exif_orientation_is_ignored() {
        let img = gradient(40, 30);
        let plain = jpeg(&img);
        // APP1 "Exif" with a little-endian TIFF holding Orientation = 6 (rotate 90°).
        let tiff: &[u8] = &[
            b'I', b'I', 42, 0, 8, 0, 0, 0, 1, 0, 0x12, 0x01, 3, 0, 1, 0, 0, 0, 6, 0, 0, 0, 0, 0, 0,
            0,
        ];
        let mut app1 = vec![0xFF, 0xE1];
        let len = (2 + 6 + tiff.len()) as u16;
        app1.extend_from_slice(&len.to_be_bytes());
        app1.extend_from_slice(b"Exif\0\0");
        app1.extend_from_slice(tiff);
        let mut rotated = plain[..2].to_vec();
        rotated.extend_from_slice(&app1);
        rotated.extend_from_slice(&plain[2..]);
        let a = decode_rgb(&plain).unwrap();
        let b = decode_rgb(&rotated).unwrap();
        assert_eq!((b.width, b.height), (40, 30));
        assert_eq!(a.pixels, b.pixels);
    }

    #[test]
    fn cmyk_jpeg_is_refused() {
        let (w, h) = (16usize, 8usize);
        let bytes = std::panic::catch_unwind(|| {
            let mut c = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_CMYK);
            c.set_size(w, h);
            let mut c = c.start_compress(Vec::new()).unwrap();
            c.write_scanlines(&vec![100u8; w * h * 4]).unwrap();
            c.finish().unwrap()
        })
        .unwrap();
        let e = decode_rgb(&bytes).err().expect("an error");
        assert!(format!("{e:#}").contains("CMYK"), "{e:#}");
    }

    #[test]
    fn decompression_bombs_are_refused_from_the_header() {
        let e = check_size(50_000, 50_000, 3).unwrap_err();
        assert!(e.to_string().contains("50000×50000"), "{e}");
        assert!(check_size(224, 224, 3).is_ok());
        assert!(check_size(MAX_SIDE as u64 + 1, 10, 3).is_err());
    }

    #[test]
    fn resize_keeps_flat_pictures_flat_and_is_identity_at_size() {
        let flat = Rgb {
            width: 92,
            height: 138,
            pixels: vec![77; 92 * 138 * 3],
        };
        for (w, h) in [(224, 224), (50, 60), (92, 20), (300, 138)] {
            assert!(
                resize_bilinear(&flat, w, h).iter().all(|&v| v == 77),
                "{w}×{h}"
            );
        }
        let img = gradient(224, 224);
        let src = Rgb {
            width: 224,
            height: 224,
            pixels: img.as_raw().clone(),
        };
        assert_eq!(resize_bilinear(&src, 224, 224), src.pixels);
    }
}
