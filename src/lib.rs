//! illmrec: an on-device runtime for I-LLMRec, an LLM recommender that writes each history item
//! as its title plus one visual token.
//!
//! # Layout
//!
//! Layers, each using only those listed before it:
//!
//! - [`store`]: files without a model: feature banks, the catalog, `.npy` and JSON-lines readers,
//!   verified-file stamps, atomic writes;
//! - [`engine`]: llama.cpp (the only FFI to llama.cpp and ggml): backend, GGUF, model, context,
//!   batching, saved states, quantization, CPU variants, OpenBLAS, illmrec's AVX-512 kernels;
//! - [`images`]: item images to feature rows (decoding, resizing, the MobileNet embedding);
//! - [`method`]: I-LLMRec outside the LLM: prompt, heads, item vectors, ranking, evaluation;
//! - [`bundle`]: the deployment folder: manifest, verification, creation, item edits;
//! - [`recommender`]: everything together: a bundle's model, heads and catalog answering
//!   requests, and batch scoring;
//! - [`bench`] (feature `bench`) and [`fuzz`] (feature `fuzz`): measuring and fuzzing tools.
//!
//! The front ends are not in the library: `src/main.rs` with `src/cli/` (one file per command)
//! and `src/server/` (the kiosk's HTTP service) make the `illmrec` binary; `tools/python` holds
//! the Python bindings. The library never prints: errors and warnings go up to them.

#![deny(unsafe_code)]

#[cfg(feature = "bench")]
pub mod bench;
pub mod bundle;
#[allow(unsafe_code)]
pub mod engine;
#[cfg(feature = "fuzz")]
pub mod fuzz;
pub mod images;
pub mod method;
pub mod recommender;
pub mod store;
