//! Files without a model: the feature bank and catalog formats, the readers of user files
//! (JSON lines, `.npy`), verified-file stamps, and the filesystem helpers every layer writes
//! through. Nothing here knows about the LLM or the heads.

pub mod bank;
pub mod catalog;
#[allow(unsafe_code)]
pub mod fsutil;
pub mod journal;
pub mod jsonl;
pub mod npy;
pub mod verified;
