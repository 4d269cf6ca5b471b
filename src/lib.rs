//! illmrec: an on-device runtime for I-LLMRec, an LLM recommender that writes each history item
//! as its title plus one visual token.
//!
//! Layout:
//! - [`llm`]: the llama.cpp engine (FFI `unsafe`);
//! - [`cpu`]: CPU feature and AMX probes, and the choice of ggml's CPU variant (CPUID `unsafe`);
//! - [`heads`]: adaptor, `[REC]` and retrieval heads from a checkpoint;
//! - [`bank`]: memory-mapped feature banks;
//! - [`catalog`], [`bundle`]: items and the deployment folder;
//! - [`prompt`]: the reference prompt;
//! - [`item_vectors`]: the cached catalog side of scoring;
//! - [`image_encoder`], [`mobilenet`]: item images to features inside the runtime;
//! - [`items_edit`]: adding, removing and replacing an item of a bundle;
//! - [`eval`]: the evaluation protocol (HR@k, NDCG@k, reference rankers);
//! - [`rank`]: top-k selection over scored ids (pure);
//! - [`dot16`]: f32 · f16 dot products (the catalog scan's kernel);
//! - [`verified`]: stamps that let whole-file checks run once per file version;
//! - [`synthetic`]: a synthetic catalog of N items and its measurements (`bench-catalog`);
//! - [`sweep`]: the history-length sweep of `bench --sweep` (the paper's Fig. 3) and its
//!   tables and plot;
//! - [`batch`]: batch scoring records, `--shard` selection and the resumable output;
//! - [`recommender`]: everything together;
//! - [`npy`], [`jsonl`], [`fsutil`]: file helpers;
//! - [`fuzz`]: seeded mutation fuzzing of every parser of outside bytes (tests and
//!   `examples/fuzz.rs`).

pub mod bank;
pub mod batch;
pub mod blas;
pub mod bundle;
pub mod catalog;
pub mod cpu;
pub mod dot16;
pub mod eval;
pub mod fsutil;
pub mod fuzz;
pub mod heads;
pub mod image_encoder;
pub mod item_vectors;
pub mod items_edit;
pub mod jsonl;
pub mod kernels;
pub mod llm;
pub mod mobilenet;
pub mod npy;
pub mod prompt;
pub mod rank;
pub mod recommender;
pub mod sweep;
pub mod synthetic;
pub mod verified;
