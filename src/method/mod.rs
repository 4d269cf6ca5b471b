//! I-LLMRec's computation outside the LLM: the prompt, the trained heads (adaptor, `[REC]`,
//! retrieval heads), the cached item vectors and their f16 scan, ranking and the evaluation
//! protocol. Pure Rust over [`crate::store`]: no llama.cpp here.

#[allow(unsafe_code)]
pub mod dot16;
pub mod eval;
pub mod heads;
pub mod item_vectors;
pub mod prompt;
pub mod rank;
