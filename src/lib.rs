//! illmrec: an on-device runtime for I-LLMRec, an LLM recommender that writes each history item
//! as its title plus one visual token.
//!
//! # Layout
//!
//! Layers, each using only those listed before it (`docs/architecture.md` has the table and the
//! path of one request through them):
//!
//! - [`store`]: files without a model: feature banks, the catalog, `.npy` and JSON-lines readers,
//!   the resumable batch output, verified-file stamps, atomic writes;
//! - [`engine`]: llama.cpp and ggml, the only FFI to them: backend, GGUF, model, context,
//!   batches, saved session states, quantization, CPU variants, OpenBLAS, illmrec's AVX-512
//!   kernels (`engine/kernels.cpp`); it uses [`store::fsutil`] only;
//! - [`images`]: item images to feature rows (decoding, the TFLite reader, MobileNet and its
//!   integer kernels);
//! - [`method`]: I-LLMRec outside the LLM: prompt (strings in `src/prompt.json`, shared with the
//!   Python tools), heads, item vectors and their scan, ranking, evaluation;
//! - [`bundle`]: the deployment folder: manifest, verification, creation, item edits;
//! - [`recommender`]: everything together: a bundle's model, heads and catalog answering
//!   requests, and batch scoring;
//! - `bench` (feature `bench`) and `fuzz` (feature `fuzz`): measuring and fuzzing tools.
//!
//! The front ends are not in the library: `src/main.rs` with `src/cli/` (one file per command,
//! `cli/messages.rs` for what is printed) and `src/server/` (the kiosk's HTTP service, a file per
//! route family under `server/routes/`) make the `illmrec` binary (feature `cli`); `tools/python`
//! holds the Python bindings, which use the library without default features. The library never
//! prints or exits: errors, and warnings as data, go up to them.
//!
//! `unsafe` is denied in the crate and allowed only in [`engine`] (the FFI, dlopen, CPUID),
//! [`store::fsutil`] (memory maps, `flock`, `kill`, `renameat2`), [`method::dot16`] and
//! `images/kernels.rs` (SIMD kernels) and `bench/synthetic.rs` (a SIMD memory read).

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
