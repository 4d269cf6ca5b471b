//! Item images to feature rows, inside the runtime, as `tools/illmrec_tools/features.py` makes
//! them: decoding and preprocessing ([`decode`]), the MobileNet embedding ([`mobilenet`], read
//! from its TFLite file by `tflite` and run on integer `kernels`), the encoder that puts them
//! together ([`ImageEncoder`]), and how a folder of images maps to item ids ([`ids`]).

pub mod decode;
pub mod ids;
#[allow(unsafe_code)]
mod kernels;
pub mod mobilenet;
mod tflite;

use anyhow::{Context, Result};
use decode::{load_rgb, resize_bilinear, Rgb};
use mobilenet::MobileNet;
use std::path::{Path, PathBuf};

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
