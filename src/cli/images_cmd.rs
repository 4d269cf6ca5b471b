//! `illmrec encode-images`: image files to a feature matrix (.npy) and its ids, with the
//! runtime's own MobileNet encoder; also the image path of `bank build --images`.

use anyhow::{ensure, Result};
use clap::Args;
use illmrec::images::ids::image_ids;
use illmrec::images::{Encoded, ImageEncoder};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct EncodeImagesArgs {
    /// Image files and/or folders (JPEG, PNG, WebP); ids come from the file names (`123.jpg`).
    #[arg(long, value_name = "DIR|FILE", num_args = 1.., required = true)]
    images: Vec<PathBuf>,
    /// Mapping file instead of file names: one `ID,FILE` per line, FILE relative to the single
    /// folder given to --images.
    #[arg(long, value_name = "FILE")]
    map: Option<PathBuf>,
    /// Output N×1024 float32 matrix (.npy, written atomically).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Output ids, one per line in row order (for `bank build --ids`).
    #[arg(long, value_name = "FILE")]
    ids: PathBuf,
    /// Images encoded at the same time [default: all cores].
    #[arg(long)]
    pub threads: Option<usize>,
}

/// Encodes images with a progress bar on stderr.
pub fn encode(images: &[PathBuf], map: Option<&Path>, threads: Option<usize>) -> Result<Encoded> {
    let pairs = image_ids(images, map)?;
    let threads =
        threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    ensure!(threads >= 1, "--threads must be at least 1");
    let encoder = ImageEncoder::new()?;
    let bar = ProgressBar::new(pairs.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} images  {per_sec}  ETA {eta}").unwrap(),
    );
    let done = || bar.inc(1);
    let encoded = encoder.encode_all(&pairs, threads, &done);
    bar.finish_and_clear();
    let encoded = encoded?;
    eprintln!(
        "encoded {} images in {:.2} s ({:.1} ms per image: decode + resize + MobileNet, {threads} thread{})",
        encoded.ids.len(),
        encoded.seconds,
        encoded.seconds * 1e3 / encoded.ids.len() as f64,
        if threads == 1 { "" } else { "s" }
    );
    Ok(encoded)
}

pub fn run(a: EncodeImagesArgs) -> Result<()> {
    let inputs: Vec<&Path> = a
        .images
        .iter()
        .chain(&a.map)
        .map(PathBuf::as_path)
        .collect();
    illmrec::store::fsutil::refuse_input_as_output(&a.out, "--out", &inputs)?;
    illmrec::store::fsutil::refuse_input_as_output(&a.ids, "--ids", &inputs)?;
    anyhow::ensure!(
        a.out != a.ids && !illmrec::store::fsutil::same_file(&a.out, &a.ids),
        "--out and --ids are the same file {}: give two files",
        a.out.display()
    );
    let e = encode(&a.images, a.map.as_deref(), a.threads)?;
    let n = e.ids.len();
    illmrec::store::fsutil::write_atomic(&a.out, |out| {
        Ok(out.write_all(&illmrec::store::npy::encode_f32(n, e.dim, &e.rows))?)
    })?;
    let ids: String = e.ids.iter().map(|id| format!("{id}\n")).collect();
    illmrec::store::fsutil::write_atomic(&a.ids, |out| Ok(out.write_all(ids.as_bytes())?))?;
    println!(
        "wrote {} ({n} × {}) and {}",
        a.out.display(),
        e.dim,
        a.ids.display()
    );
    Ok(())
}
