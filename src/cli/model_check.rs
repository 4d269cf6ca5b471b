//! Whether a command runs the model its bundle's manifest records. The heads were trained on
//! that model's hidden states, so another model (a quantized copy, `--model`, `ILLMREC_MODEL`)
//! changes the rankings; every command that opens a recommender says so once, on stderr.
//! The check compares file sizes (cheap; the sha256 is `bundle verify`'s).

use illmrec::bundle::{Bundle, DEFAULT_MODEL_FILE};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether `model` has the size the bundle's manifest records for its model.
pub fn is_manifest_model(bundle: &Bundle, model: &Path) -> bool {
    std::fs::metadata(model).is_ok_and(|m| m.len() == bundle.manifest.model.size)
}

/// The model the manifest records, in words: its path (or the default model) and size.
pub fn manifest_model(bundle: &Bundle) -> String {
    let m = &bundle.manifest.model;
    let name = match &m.path {
        Some(p) => bundle.dir.join(p).display().to_string(),
        None => format!("the default model {DEFAULT_MODEL_FILE}"),
    };
    format!("{name}, {} bytes", m.size)
}

/// The warning for a model that is not the manifest's, if it is not.
pub fn note(bundle: &Bundle, model: &Path) -> Option<String> {
    (!is_manifest_model(bundle, model)).then(|| {
        format!(
            "model {} is not the model the bundle's manifest records ({}): the bundle's heads were trained on that model's hidden states, so rankings on this one may differ",
            model.display(),
            manifest_model(bundle)
        )
    })
}

/// Prints [`note`] as a warning, at most once per process.
pub fn warn_once(bundle: &Bundle, model: &Path) {
    static SAID: AtomicBool = AtomicBool::new(false);
    if let Some(text) = note(bundle, model) {
        if !SAID.swap(true, Ordering::Relaxed) {
            super::messages::warning(text);
        }
    }
}
