//! What the benchmark plots share: the embedded font (DejaVu Sans, so no system font is needed),
//! the error of a failed drawing call, and the RGB drawing buffer encoded as PNG.

use anyhow::{anyhow, Context as _, Result};

/// The font family the plots use; [`register_font`] makes it available.
pub const FONT: &str = "illmrec-sans";

/// Registers [`FONT`] once per process.
pub fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // DejaVu Sans is a valid TrueType font; a failure here would show as missing text.
        let _ = plotters::style::register_font(
            FONT,
            plotters::style::FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
}

/// A plotters error as this crate's.
pub fn draw_error(e: &dyn std::fmt::Display) -> anyhow::Error {
    anyhow!("cannot draw the plot: {e}")
}

/// An RGB buffer of `width`×`height` pixels as a PNG file's bytes.
pub fn png(width: u32, height: u32, buf: Vec<u8>) -> Result<Vec<u8>> {
    let img = image::RgbImage::from_raw(width, height, buf)
        .context("the plot buffer does not match its size")?;
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .context("cannot encode the plot as PNG")?;
    Ok(out.into_inner())
}
