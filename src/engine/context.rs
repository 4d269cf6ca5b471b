//! An inference context ([`Context`]): its options, the KV cache's sequences and cached prefix,
//! and the graph callback that copies out the final hidden states. The requests on it are in
//! [`super::hidden`] and [`super::session`], the batches in [`super::batch`].

use super::{GgufInfo, Model, Token};
use anyhow::{ensure, Context as _, Result};
use llama_cpp_sys_2 as sys;
use std::ffi::CStr;
use std::ptr::NonNull;
use std::sync::Arc;

/// The sequence that holds the shared prefix in the KV cache.
pub(super) const PREFIX_SEQ: i32 = 0;
/// The sequence a request is decoded on.
pub(super) const WORK_SEQ: i32 = 1;
/// Branches of one request (see [`Context::branch_hidden`]) use sequences from here on.
pub(super) const FIRST_BRANCH_SEQ: i32 = 2;
/// Most branches decoded together (each is one sequence and one output row).
pub const MAX_BRANCHES: usize = 16;

/// How to create an inference context.
#[derive(Clone, Debug)]
pub struct ContextOptions {
    /// KV-cache size in positions, shared by the cached prefix and one request.
    pub n_ctx: u32,
    /// Store the KV cache in f32 instead of llama.cpp's default f16 (for parity checks).
    pub kv_f32: bool,
    /// Flash attention: `Some(true)` (the default), `Some(false)` (the plain path, which
    /// multiplies every query by every KV cell llama.cpp attends over and masks afterwards), or
    /// `None` (llama.cpp decides). On the CPU both paths give the same result at any thread
    /// count: ggml computes each query row whole on one thread, except for a one-position batch
    /// over 512 or more cells, which [`super::batch_spans`] never sends.
    pub flash_attn: Option<bool>,
    /// Largest number of positions decoded in one call.
    pub n_batch: u32,
    pub n_threads: i32,
}

impl Default for ContextOptions {
    fn default() -> Self {
        Self {
            n_ctx: 2048,
            kv_f32: false,
            flash_attn: Some(true),
            n_batch: 512,
            n_threads: default_threads(),
        }
    }
}

pub fn default_threads() -> i32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as i32)
}

/// Most CPU threads accepted: four per available core (more only slows llama.cpp down, and
/// tens of thousands make it abort).
pub fn max_threads() -> i32 {
    default_threads().saturating_mul(4)
}

/// Checks a thread count against 1..=[`max_threads`].
pub fn check_threads(n: i32) -> Result<()> {
    ensure!(
        (1..=max_threads()).contains(&n),
        "--threads {n} is out of range: expected 1 to {} (4 × the {} available cores)",
        max_threads(),
        default_threads()
    );
    Ok(())
}

impl ContextOptions {
    /// Checks the thread count (before anything is loaded).
    pub fn check_threads(&self) -> Result<()> {
        check_threads(self.n_threads)
    }

    /// Checks the options against a model before any memory is allocated: the thread count,
    /// and a context no smaller than 16 positions and no larger than the model was trained
    /// for (its KV cache grows with it; llama.cpp would try to allocate whatever it is given).
    pub fn check(&self, info: &GgufInfo) -> Result<()> {
        self.check_threads()?;
        ensure!(
            self.n_ctx >= 16,
            "--ctx {} is too small: expected at least 16 positions",
            self.n_ctx
        );
        if let Some(max) = info.context_length {
            ensure!(
                self.n_ctx as usize <= max,
                "--ctx {} is larger than the model's training context ({max} positions)",
                self.n_ctx
            );
        }
        Ok(())
    }
}

/// One position of the LLM input: a vocabulary token or a vector in the input-embedding space.
#[derive(Clone, Copy, Debug)]
pub enum Input<'a> {
    Token(Token),
    Embedding(&'a [f32]),
}

/// An inference context with a KV cache. Holds at most one cached prefix (on its own sequence)
/// that requests starting with the same tokens reuse.
pub struct Context {
    pub(super) raw: NonNull<sys::llama_context>,
    pub(super) model: Arc<Model>,
    pub(super) n_ctx: usize,
    pub(super) n_batch: usize,
    pub(super) prefix: Vec<Token>,
    /// Where llama.cpp's graph callback leaves the outputs' hidden states; boxed so its address,
    /// handed to llama.cpp, stays fixed. Dropped after the context (fields drop after `drop`).
    pub(super) capture: Box<Capture>,
}

/// The name llama.cpp gives the final-norm hidden states of a batch's outputs (its `t_embd`,
/// what `llama_get_embeddings_ith` returns), the tensor before the LM head.
const HIDDEN_TENSOR: &[u8] = b"result_norm";

/// Filled by [`capture_hidden`] while a batch with outputs runs.
#[derive(Default)]
pub(super) struct Capture {
    pub(super) active: bool,
    pub(super) rows: Vec<f32>,
}

/// llama.cpp's graph callback (`cb_eval`). Asked about every node, it wants only
/// [`HIDDEN_TENSOR`] and only while a batch with outputs runs; given it, it copies the rows and
/// stops the rest of that graph split: the LM head that follows (262,144 × 640 for Gemma 3, read
/// for every request) is never needed, because the runtime reads hidden states, not logits.
/// Reading the states this way lets the outputs ride in the same batch as the positions before
/// them, where llama.cpp's own embeddings output would make every position of the batch an
/// output.
unsafe extern "C" fn capture_hidden(
    t: *mut sys::ggml_tensor,
    ask: bool,
    user: *mut std::ffi::c_void,
) -> bool {
    // SAFETY: `user` is the context's boxed Capture, used only during its `&mut self` calls;
    // `t` is a live graph node with a NUL-terminated name.
    let cap = &mut *(user as *mut Capture);
    if !cap.active || CStr::from_ptr((*t).name.as_ptr()).to_bytes() != HIDDEN_TENSOR {
        return false; // not needed (ask) / not reached for unneeded nodes
    }
    if ask {
        return true;
    }
    let n = sys::ggml_nelements(t) as usize;
    let start = cap.rows.len();
    cap.rows.resize(start + n, 0.0);
    sys::ggml_backend_tensor_get(
        t,
        cap.rows[start..].as_mut_ptr().cast(),
        0,
        n * std::mem::size_of::<f32>(),
    );
    false // stop this split here: nothing after the hidden states is used
}

// SAFETY: a llama_context may move between threads; `&mut self` on every call that uses it keeps
// it to one thread at a time (it is not Sync).
unsafe impl Send for Context {}

impl Context {
    /// Creates a context on a shared model.
    pub fn new(model: Arc<Model>, opts: &ContextOptions) -> Result<Self> {
        opts.check(&model.info)?;
        let n_batch = opts.n_batch.clamp(1, opts.n_ctx);
        let mut capture = Box::<Capture>::default();
        // SAFETY: default params are a valid struct; the context holds an Arc of the model, so the
        // model outlives it, and owns `capture`, which outlives the llama.cpp context.
        let raw = unsafe {
            let mut p = sys::llama_context_default_params();
            p.n_ctx = opts.n_ctx;
            p.n_batch = n_batch;
            p.n_ubatch = n_batch;
            p.n_seq_max = FIRST_BRANCH_SEQ as u32 + MAX_BRANCHES as u32;
            // Only the last position of a request (or of each branch) is ever an output: keep the
            // output buffer (n_vocab floats per row) small instead of the default n_batch rows.
            // llama.cpp reserves at least n_seq_max output rows.
            p.n_outputs_max = p.n_seq_max;
            p.cb_eval = Some(capture_hidden);
            p.cb_eval_user_data = (&mut *capture as *mut Capture).cast();
            p.n_threads = opts.n_threads;
            p.n_threads_batch = opts.n_threads;
            p.pooling_type = sys::LLAMA_POOLING_TYPE_NONE;
            // Hidden states come from the graph callback (`capture_hidden`): with llama.cpp's
            // embeddings on, every position of a batch would be an output.
            p.embeddings = false;
            p.kv_unified = true;
            p.flash_attn_type = match opts.flash_attn {
                None => sys::LLAMA_FLASH_ATTN_TYPE_AUTO,
                Some(true) => sys::LLAMA_FLASH_ATTN_TYPE_ENABLED,
                Some(false) => sys::LLAMA_FLASH_ATTN_TYPE_DISABLED,
            };
            if opts.kv_f32 {
                p.type_k = sys::GGML_TYPE_F32;
                p.type_v = sys::GGML_TYPE_F32;
            }
            sys::llama_init_from_model(model.raw.as_ptr(), p)
        };
        let raw =
            NonNull::new(raw).context("llama.cpp could not create a context (out of memory?)")?;
        Ok(Context {
            raw,
            model,
            n_ctx: opts.n_ctx as usize,
            n_batch: n_batch as usize,
            prefix: Vec::new(),
            capture,
        })
    }

    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub(super) fn memory(&self) -> sys::llama_memory_t {
        // SAFETY: valid context.
        unsafe { sys::llama_get_memory(self.raw.as_ptr()) }
    }

    /// Decodes `tokens` once on the prefix sequence, so that later requests that start with
    /// them skip that work. Replaces any earlier prefix.
    pub fn set_prefix(&mut self, tokens: &[Token]) -> Result<()> {
        self.model.check_tokens(tokens)?;
        ensure!(
            tokens.len() < self.n_ctx / 2,
            "prefix of {} tokens does not fit a context of {}",
            tokens.len(),
            self.n_ctx
        );
        // SAFETY: valid memory handle; removing a whole sequence cannot fail.
        unsafe { sys::llama_memory_seq_rm(self.memory(), PREFIX_SEQ, -1, -1) };
        self.prefix.clear();
        let inputs: Vec<Input> = tokens.iter().map(|&t| Input::Token(t)).collect();
        self.decode(&inputs, PREFIX_SEQ, 0, false)?;
        self.prefix = tokens.to_vec();
        Ok(())
    }

    pub fn prefix(&self) -> &[Token] {
        &self.prefix
    }

    /// Length of the common start of the cached prefix and the inputs' tokens, leaving at least
    /// the last input to be decoded.
    pub fn shared_prefix_len(&self, inputs: &[Input]) -> usize {
        let n = self
            .prefix
            .iter()
            .zip(inputs)
            .take_while(|(p, i)| matches!(i, Input::Token(t) if t == *p))
            .count();
        n.min(inputs.len() - 1)
    }

    /// Fails when a prompt of `len` positions, needing `needed` KV cells beside the cached
    /// prefix's, does not fit the context.
    pub(super) fn check_fits(&self, needed: usize, len: usize) -> Result<()> {
        ensure!(
            needed <= self.n_ctx,
            "prompt of {len} positions does not fit the context ({} positions, {} held by the cached prefix); raise --ctx",
            self.n_ctx,
            self.prefix.len()
        );
        Ok(())
    }

    pub(super) fn check_input(&self, input: &Input) -> Result<()> {
        match input {
            Input::Token(t) => self.model.check_tokens(&[*t]),
            Input::Embedding(v) => {
                let n_embd = self.model.n_embd();
                ensure!(
                    v.len() == n_embd,
                    "injected vector has {} values, the model's n_embd is {n_embd}",
                    v.len()
                );
                ensure!(
                    v.iter().all(|x| x.is_finite()),
                    "injected vector contains NaN or infinity"
                );
                Ok(())
            }
        }
    }
}

impl Context {
    /// Runs `work` on the KV sequences `seqs` of one request: they are emptied first, each
    /// `(seq, n)` of `copies` then holds the cached prefix's first `n` cells (shared, not
    /// copied), and all of them are emptied again afterwards whatever happened, so that a
    /// request never leaves cells behind.
    pub(super) fn on_sequences<T>(
        &mut self,
        seqs: &[i32],
        copies: &[(i32, usize)],
        work: impl FnOnce(&mut Self) -> Result<T>,
    ) -> Result<T> {
        let mem = self.memory();
        // SAFETY: valid memory handle and sequence ids below n_seq_max.
        unsafe {
            for &seq in seqs {
                sys::llama_memory_seq_rm(mem, seq, -1, -1);
            }
            for &(seq, n) in copies {
                if n > 0 {
                    sys::llama_memory_seq_cp(mem, PREFIX_SEQ, seq, 0, n as i32);
                }
            }
        }
        let result = work(self);
        // SAFETY: as above; frees the request's cells whatever happened.
        unsafe {
            for &seq in seqs {
                sys::llama_memory_seq_rm(mem, seq, -1, -1);
            }
        }
        result
    }
}

/// Fails when a hidden state holds a NaN or an infinity.
pub(super) fn check_finite<'a>(states: impl IntoIterator<Item = &'a [f32]>) -> Result<()> {
    ensure!(
        states.into_iter().flatten().all(|x| x.is_finite()),
        "the model produced a non-finite hidden state"
    );
    Ok(())
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: freed once, before the model it borrows.
        unsafe { sys::llama_free(self.raw.as_ptr()) }
    }
}
