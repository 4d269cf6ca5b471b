//! What the command line says on stderr beside a command's output: warnings, the untrained-heads
//! warning and the one-line error. The library never prints; its errors come up to `main` and
//! its warnings (as data, e.g. `Recommender::warnings`) to the commands, which print them here.

use std::fmt::Display;

/// `warning: TEXT` on stderr.
pub fn warning(text: impl Display) {
    eprintln!("warning: {text}");
}

/// The warning printed whenever a bundle's heads were never trained.
pub fn untrained(provenance: &str) {
    eprintln!(
        "WARNING: this bundle's heads are randomly initialised, not trained ({provenance}); the ranking is NOT meaningful."
    );
}

/// A failed command's error on one line: the error and its causes, outermost first.
pub fn error(e: &anyhow::Error) {
    eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
}
