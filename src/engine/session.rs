//! Kiosk sessions: the saved KV state of a prompt's start ([`SavedState`]) and
//! [`Context::session_hidden`], which continues from it.

use super::context::{check_finite, PREFIX_SEQ, WORK_SEQ};
use super::{Context, Input, Token};
use anyhow::{ensure, Context as _, Result};
use llama_cpp_sys_2 as sys;

/// A position of a saved prompt, owned (see [`SavedState`]).
#[derive(Clone, Debug, PartialEq)]
pub enum OwnedInput {
    Token(Token),
    Embedding(Vec<f32>),
}

impl OwnedInput {
    pub fn of(input: &Input) -> Self {
        match input {
            Input::Token(t) => OwnedInput::Token(*t),
            Input::Embedding(v) => OwnedInput::Embedding(v.to_vec()),
        }
    }

    fn same(&self, input: &Input) -> bool {
        match (self, input) {
            (OwnedInput::Token(a), Input::Token(b)) => a == b,
            (OwnedInput::Embedding(a), Input::Embedding(b)) => a.as_slice() == *b,
            _ => false,
        }
    }
}

/// The KV cache of the start of a prompt (positions `0..inputs.len()`), as llama.cpp's sequence
/// state bytes, with the inputs it holds. Any context on the same model and options can continue
/// from it ([`Context::session_hidden`]).
#[derive(Clone, Debug, Default)]
pub struct SavedState {
    pub inputs: Vec<OwnedInput>,
    pub kv: Vec<u8>,
}

impl SavedState {
    /// Bytes held (KV state and inputs).
    pub fn size(&self) -> usize {
        self.kv.len()
            + self
                .inputs
                .iter()
                .map(|i| match i {
                    OwnedInput::Token(_) => 4,
                    OwnedInput::Embedding(v) => 4 * v.len(),
                })
                .sum::<usize>()
    }

    /// How many leading positions of `inputs` this state holds (its common start with them).
    pub fn common_len(&self, inputs: &[Input]) -> usize {
        self.inputs
            .iter()
            .zip(inputs)
            .take_while(|(a, b)| a.same(b))
            .count()
    }
}

impl Context {
    /// Like [`Context::last_hidden`], but continues from `saved` when it shares a start with
    /// `inputs` longer than the cached task prefix (only the positions after the common start
    /// are decoded), and saves the KV state of `inputs[..save_at]` for the next call. Returns the
    /// hidden state, the new saved state and how many positions were decoded.
    ///
    /// The positions are decoded in other batch shapes than a cold [`Context::last_hidden`], so
    /// the state agrees with it within llama.cpp's batch-shape noise, not bit for bit.
    pub fn session_hidden(
        &mut self,
        saved: Option<&SavedState>,
        inputs: &[Input],
        save_at: usize,
        reuse_prefix: bool,
    ) -> Result<(Vec<f32>, SavedState, usize)> {
        ensure!(!inputs.is_empty(), "empty input");
        ensure!(
            save_at < inputs.len(),
            "save point {save_at} is not before the last of {} inputs",
            inputs.len()
        );
        for input in inputs {
            self.check_input(input)?;
        }
        let prefix = if reuse_prefix {
            self.shared_prefix_len(inputs)
        } else {
            0
        };
        let common = saved.map_or(0, |s| s.common_len(inputs).min(inputs.len() - 1));
        let restore = saved.filter(|_| common > prefix);
        let needed = self.prefix.len() + inputs.len();
        self.check_fits(needed, inputs.len())?;
        let mem = self.memory();
        let ctx = self.raw.as_ptr();
        let (hidden, kv, decoded) = self.on_sequences(&[WORK_SEQ], &[], |c| {
            let start = match restore {
                Some(state) => {
                    // SAFETY: the bytes came from llama_state_seq_get_data on a context of the
                    // same model and options; llama.cpp checks them and returns 0 when they do
                    // not fit.
                    let n = unsafe {
                        sys::llama_state_seq_set_data(
                            ctx,
                            state.kv.as_ptr(),
                            state.kv.len(),
                            WORK_SEQ,
                        )
                    };
                    ensure!(n > 0, "llama.cpp could not restore a saved session state");
                    // SAFETY: as above; drops what the state holds past the common start.
                    unsafe { sys::llama_memory_seq_rm(mem, WORK_SEQ, common as i32, -1) };
                    common
                }
                None => {
                    if prefix > 0 {
                        // SAFETY: as above.
                        unsafe {
                            sys::llama_memory_seq_cp(mem, PREFIX_SEQ, WORK_SEQ, 0, prefix as i32)
                        };
                    }
                    prefix
                }
            };
            let start = if start > save_at {
                // SAFETY: as above.
                unsafe { sys::llama_memory_seq_rm(mem, WORK_SEQ, save_at as i32, -1) };
                save_at
            } else {
                start
            };
            // One batch for everything after the common start, as a cold request decodes it
            // (batch shapes decide llama.cpp's kernels: fewer than 64 rows take ggml's flash-
            // attention path with f16 accumulators); the positions from `save_at` on are then
            // dropped and the rest saved. A position's KV cells do not depend on later ones.
            let hidden = c.decode(&inputs[start..], WORK_SEQ, start, true)?;
            // SAFETY: as above.
            unsafe { sys::llama_memory_seq_rm(mem, WORK_SEQ, save_at as i32, -1) };
            // SAFETY: the buffer has the size llama.cpp asked for.
            let kv = unsafe {
                let size = sys::llama_state_seq_get_size(ctx, WORK_SEQ);
                let mut kv = vec![0u8; size];
                let n = sys::llama_state_seq_get_data(ctx, kv.as_mut_ptr(), size, WORK_SEQ);
                ensure!(n == size, "llama.cpp could not save the session state");
                kv
            };
            Ok((hidden, kv, inputs.len() - start))
        })?;
        let hidden = hidden.context("no hidden state was produced")?;
        check_finite([hidden.as_slice()])?;
        let state = SavedState {
            inputs: inputs[..save_at].iter().map(OwnedInput::of).collect(),
            kv,
        };
        Ok((hidden, state, decoded))
    }
}
