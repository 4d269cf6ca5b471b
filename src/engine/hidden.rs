//! Final hidden states for whole prompts: one prompt ([`Context::last_hidden`]), the branches of
//! one shared start ([`Context::branch_hidden`]) and several independent prompts decoded together
//! ([`Context::many_hidden`]).

use super::context::{check_finite, FIRST_BRANCH_SEQ, MAX_BRANCHES, WORK_SEQ};
use super::{kv_cells_needed, Context, Input};
use anyhow::{ensure, Context as _, Result};
use llama_cpp_sys_2 as sys;

impl Context {
    /// Runs `inputs` and returns the final hidden state (after the final norm) at the last
    /// position. The inputs that match the cached prefix are copied from the KV cache when
    /// `reuse_prefix` is set, and recomputed in a batch of their own otherwise; either way the
    /// rest is decoded in the same batches, so both paths compute the same thing.
    pub fn last_hidden(&mut self, inputs: &[Input], reuse_prefix: bool) -> Result<Vec<f32>> {
        ensure!(!inputs.is_empty(), "empty input");
        for input in inputs {
            self.check_input(input)?;
        }
        let shared = self.shared_prefix_len(inputs);
        let copied = if reuse_prefix { shared } else { 0 };
        self.check_fits(self.prefix.len() + inputs.len() - copied, inputs.len())?;
        let hidden = self.on_sequences(&[WORK_SEQ], &[(WORK_SEQ, copied)], |c| {
            if !reuse_prefix {
                c.decode(&inputs[..shared], WORK_SEQ, 0, false)?;
            }
            c.decode(&inputs[shared..], WORK_SEQ, shared, true)
        })?;
        let hidden = hidden.context("no hidden state was produced")?;
        check_finite([hidden.as_slice()])?;
        Ok(hidden)
    }

    /// Final hidden states at the end of several inputs that share a start, decoding the shared
    /// part once: `shared` is decoded (after the cached prefix, as in [`Context::last_hidden`]),
    /// then branch k continues from the first `cut_k` positions of `shared` with its own `suffix_k`
    /// (on a sequence of its own that shares those KV cells), all branches' suffixes in the same
    /// batches. Returns one hidden state per branch, at its last position. Up to
    /// [`MAX_BRANCHES`] branches; `0 < cut_k <= shared.len()` and every suffix is non-empty.
    ///
    /// This is how a window of history items yields the states of all its prefixes for the price
    /// of one prompt plus the closing text per prefix, and how a kiosk session extends its history.
    pub fn branch_hidden(
        &mut self,
        shared: &[Input],
        branches: &[(usize, Vec<Input>)],
        reuse_prefix: bool,
    ) -> Result<Vec<Vec<f32>>> {
        ensure!(!shared.is_empty(), "empty input");
        ensure!(
            !branches.is_empty() && branches.len() <= MAX_BRANCHES,
            "between 1 and {MAX_BRANCHES} branches, not {}",
            branches.len()
        );
        for (cut, suffix) in branches {
            ensure!(
                *cut >= 1 && *cut <= shared.len() && !suffix.is_empty(),
                "branch cut {cut} outside 1..={} or empty suffix",
                shared.len()
            );
        }
        for input in shared
            .iter()
            .chain(branches.iter().flat_map(|(_, s)| s.iter()))
        {
            self.check_input(input)?;
        }
        let shared_prefix = self.shared_prefix_len(shared);
        let longest = branches.iter().map(|(c, s)| c + s.len()).max().unwrap_or(0);
        let suffixes: usize = branches.iter().map(|(_, s)| s.len()).sum();
        let needed = self.prefix.len() + shared.len() + suffixes
            - if reuse_prefix { shared_prefix } else { 0 };
        ensure!(
            needed <= self.n_ctx && longest <= self.n_ctx,
            "{} branches of up to {longest} positions need {needed} KV cells, the context has {}; raise --ctx",
            branches.len(),
            self.n_ctx
        );
        let branch_seqs = FIRST_BRANCH_SEQ..FIRST_BRANCH_SEQ + branches.len() as i32;
        let seqs: Vec<i32> = std::iter::once(WORK_SEQ)
            .chain(branch_seqs.clone())
            .collect();
        let copied = if reuse_prefix { shared_prefix } else { 0 };
        let hidden = self.on_sequences(&seqs, &[(WORK_SEQ, copied)], |c| {
            let start = if reuse_prefix { shared_prefix } else { 0 };
            // The shared part, up to the longest cut (what no branch uses is not decoded).
            let shared_end = branches.iter().map(|(c, _)| *c).max().unwrap_or(0);
            c.decode(
                &shared[start.min(shared_end)..shared_end],
                WORK_SEQ,
                start.min(shared_end),
                false,
            )?;
            let mem = c.memory();
            for (seq, (cut, _)) in branch_seqs.clone().zip(branches) {
                // SAFETY: valid memory handle and sequence ids below n_seq_max.
                unsafe { sys::llama_memory_seq_cp(mem, WORK_SEQ, seq, 0, *cut as i32) };
            }
            let tails: Vec<(i32, usize, &[Input])> = branch_seqs
                .clone()
                .zip(branches)
                .map(|(seq, (cut, suffix))| (seq, *cut, suffix.as_slice()))
                .collect();
            c.decode_tails(&tails)
        })?;
        check_finite(hidden.iter().map(Vec::as_slice))?;
        Ok(hidden)
    }

    /// Final hidden states at the end of several independent prompts (several users), decoded
    /// together: request k runs on a sequence of its own, starting from the cached prefix's KV
    /// cells where it begins with them and `reuse_prefix` is set (one shared copy of the prefix,
    /// no recomputation), and all requests' remaining positions share llama.cpp batches of up to
    /// n_batch positions; the last position of each is an output. Returns one hidden state per
    /// request, in order. Up to [`MAX_BRANCHES`] requests whose positions fit the context
    /// together (see [`super::group_prompts`]).
    ///
    /// Each state equals its request's [`Context::last_hidden`] within llama.cpp's batch-shape
    /// noise (the positions are summed in other batch shapes), not bit for bit.
    pub fn many_hidden(
        &mut self,
        requests: &[&[Input]],
        reuse_prefix: bool,
    ) -> Result<Vec<Vec<f32>>> {
        ensure!(
            !requests.is_empty() && requests.len() <= MAX_BRANCHES,
            "between 1 and {MAX_BRANCHES} requests per call, not {}",
            requests.len()
        );
        for inputs in requests {
            ensure!(!inputs.is_empty(), "empty input");
            for input in inputs.iter() {
                self.check_input(input)?;
            }
        }
        let lens: Vec<usize> = requests.iter().map(|r| r.len()).collect();
        let shared: Vec<usize> = requests
            .iter()
            .map(|r| match reuse_prefix {
                true => self.shared_prefix_len(r),
                false => 0,
            })
            .collect();
        let needed = kv_cells_needed(self.prefix.len(), &lens, &shared);
        ensure!(
            needed <= self.n_ctx,
            "{} prompts of {} positions in all need {needed} KV cells, the context has {}; raise --ctx or batch fewer users",
            requests.len(),
            lens.iter().sum::<usize>(),
            self.n_ctx
        );
        let seqs: Vec<i32> = (FIRST_BRANCH_SEQ..FIRST_BRANCH_SEQ + requests.len() as i32).collect();
        let copies: Vec<(i32, usize)> = seqs.iter().copied().zip(shared.iter().copied()).collect();
        let hidden = self.on_sequences(&seqs, &copies, |c| {
            let tails: Vec<(i32, usize, &[Input])> = seqs
                .iter()
                .zip(requests.iter().zip(&shared))
                .map(|(&seq, (inputs, &start))| (seq, start, &inputs[start..]))
                .collect();
            c.decode_tails(&tails)
        })?;
        check_finite(hidden.iter().map(Vec::as_slice))?;
        Ok(hidden)
    }
}
