//! The LLM engine: the only module that calls into llama.cpp and ggml (`llama-cpp-sys-2`), and
//! so the home of the FFI `unsafe`. Everything is checked before it reaches the C API, because
//! llama.cpp answers many mistakes with `GGML_ASSERT`, which aborts the whole process.
//!
//! What it offers:
//! - [`GgufInfo::read`]: GGUF metadata (architecture, `n_embd`) without loading the weights;
//!   [`token_embedding_row`]: one dequantised row of `token_embd.weight`, read from the file
//!   ([`gguf`]);
//! - [`Model`]: a memory-mapped (by default) GGUF model with its tokenizer ([`model`]);
//! - [`Context`]: a KV cache with a cached prefix ([`context`]), on which
//!   [`Context::last_hidden`] runs a sequence of token and embedding inputs and returns the final
//!   hidden state (after the final norm) at the last position only, and
//!   [`Context::many_hidden`] and [`Context::branch_hidden`] do the same for several prompts in
//!   shared batches ([`hidden`], [`batch`]);
//! - [`Context::session_hidden`]: the same, continuing from a saved KV state of an earlier
//!   prompt that shares its start (kiosk sessions, [`session`]);
//! - [`quantize()`]: llama.cpp's model quantizer;
//! - the process-wide parts ([`backend`]): initialisation, the log, the CPU code this build runs
//!   ([`cpu`], and ggml's CPU variants with the `cpu-variants` feature), OpenBLAS for ggml's BLAS
//!   backend ([`blas`]) and illmrec's AVX-512 kernels ([`kernels`]).
//!
//! Dependencies point one way: [`backend`] knows nothing of models; [`blas`] and [`kernels`]
//! are used by it and by [`model`]; the rest build on the model.

pub mod backend;
pub mod batch;
pub mod blas;
pub mod context;
pub mod cpu;
pub mod gguf;
pub mod hidden;
pub mod kernels;
pub mod model;
pub mod quantize;
pub mod session;
#[cfg(feature = "cpu-variants")]
mod variants;

pub use backend::{
    cpu_build, gpu_devices, gpu_fallback, has_blas_backend, set_verbose, supports_gpu_offload,
    system_info,
};
pub use batch::{batch_spans, group_prompts, kv_cells_needed};
pub use context::{
    check_threads, default_threads, max_threads, Context, ContextOptions, Input, MAX_BRANCHES,
};
pub use gguf::{token_embedding_row, GgufInfo};
pub use model::{default_gpu_layers, Model, ModelOptions};
pub use quantize::{quantize, QUANT_TYPES};
pub use session::{OwnedInput, SavedState};

/// A vocabulary token id.
pub type Token = i32;
