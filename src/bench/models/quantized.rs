//! The quantized copies `bench-models --quantize` makes from a model and reuses while the source
//! is unchanged (written atomically into a cache folder the runtime owns, with a source stamp).

use super::*;
use anyhow::{Context as _, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// A quantized copy of a model, made or found in the cache folder.
#[derive(Clone, Debug, Serialize)]
pub struct Quantized {
    pub path: PathBuf,
    pub source: PathBuf,
    pub type_name: String,
    /// Found from an earlier run (same source file, size and modification time).
    pub reused: bool,
    pub seconds: f64,
}

/// Where [`ensure_quantized`] keeps the `type_name` copy of `source`: `DIR/<stem>.<type>.gguf`.
pub fn quantized_path(dir: &Path, source: &Path, type_name: &str) -> PathBuf {
    let stem = source
        .file_stem()
        .map_or("model".into(), |s| s.to_string_lossy().into_owned());
    dir.join(format!("{stem}.{}.gguf", type_name.to_ascii_lowercase()))
}

/// The default cache folder of quantized copies: `cache/quantized/` beside the source model
/// (`models/cache/quantized/` for the default model; `cache/` folders are git-ignored).
pub fn default_quantize_dir(source: &Path) -> PathBuf {
    source
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
        .join("cache")
        .join("quantized")
}

/// What identifies the source of a quantized copy: its canonical path, size and modification
/// time (written beside the copy as `<copy>.source`).
fn source_stamp(source: &Path, type_name: &str) -> Result<String> {
    let meta = std::fs::metadata(source)
        .with_context(|| format!("cannot read the model {}", source.display()))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let canonical = source.canonicalize().unwrap_or_else(|_| source.into());
    Ok(format!(
        "{{\"source\": {}, \"size\": {}, \"mtime_ns\": {mtime}, \"type\": {}}}\n",
        serde_json::to_string(&canonical.display().to_string())?,
        meta.len(),
        serde_json::to_string(&type_name.to_ascii_lowercase())?
    ))
}

/// The `type_name` copy of `source` in `dir`: reused when an earlier run made it from the same
/// file (path, size and modification time recorded beside it), else quantized with llama.cpp's
/// quantizer ([`crate::engine::quantize()`], which writes a temporary file and renames it into
/// place, so a kill leaves no half-written model). The stamp is written after the model, also
/// atomically, so a copy without its stamp is made again.
pub fn ensure_quantized(
    source: &Path,
    dir: &Path,
    type_name: &str,
    threads: i32,
) -> Result<Quantized> {
    let path = quantized_path(dir, source, type_name);
    let stamp_path = PathBuf::from(format!("{}.source", path.display()));
    let stamp = source_stamp(source, type_name)?;
    let t = Instant::now();
    let reused = path.is_file()
        && std::fs::read_to_string(&stamp_path).ok().as_deref() == Some(stamp.as_str())
        && crate::engine::GgufInfo::read(&path).is_ok();
    if !reused {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the cache folder {}", dir.display()))?;
        crate::engine::quantize(source, &path, type_name, threads)?;
        crate::store::fsutil::write_atomic(&stamp_path, |w| Ok(w.write_all(stamp.as_bytes())?))?;
    }
    Ok(Quantized {
        path,
        source: source.to_path_buf(),
        type_name: type_name.to_ascii_lowercase(),
        reused,
        seconds: t.elapsed().as_secs_f64(),
    })
}
