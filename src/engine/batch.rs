//! Batches: how positions of one or several sequences are cut into llama.cpp calls
//! ([`batch_spans`]), how prompts are grouped to fit the KV cache ([`group_prompts`]), and the
//! calls themselves (filling llama.cpp's batch, reading the outputs' hidden states).

use super::context::MAX_BRANCHES;
use super::{Context, Input};
use anyhow::{bail, ensure, Result};
use llama_cpp_sys_2 as sys;

/// KV cells that several prompts decoded together hold at once: the cached prefix plus each
/// prompt's positions after the part it shares with the prefix (those cells are shared).
pub fn kv_cells_needed(prefix: usize, lens: &[usize], shared: &[usize]) -> usize {
    prefix
        + lens
            .iter()
            .zip(shared.iter().chain(std::iter::repeat(&0)))
            .map(|(&n, &s)| n - s.min(n))
            .sum::<usize>()
}

/// Splits prompts (in order) into consecutive groups for [`Context::many_hidden`]: each group
/// holds at most `per_call` prompts (and at most [`MAX_BRANCHES`]) whose KV cells fit `n_ctx`
/// together; a prompt that fits only alone is a group of its own. `shared[k]` is how many of
/// prompt k's leading positions come from the cached prefix of `prefix` positions.
pub fn group_prompts(
    lens: &[usize],
    shared: &[usize],
    prefix: usize,
    n_ctx: usize,
    per_call: usize,
) -> Vec<std::ops::Range<usize>> {
    let per_call = per_call.clamp(1, MAX_BRANCHES);
    let mut groups = Vec::new();
    let mut start = 0;
    let mut cells = prefix;
    for (k, (&n, &s)) in lens.iter().zip(shared).enumerate() {
        let own = n - s.min(n);
        if k > start && (k - start == per_call || cells + own > n_ctx) {
            groups.push(start..k);
            start = k;
            cells = prefix;
        }
        cells += own;
    }
    if start < lens.len() {
        groups.push(start..lens.len());
    }
    groups
}

/// One position of a batch: its input, sequence and position.
#[derive(Clone, Copy)]
struct Entry<'a> {
    input: Input<'a>,
    seq: i32,
    pos: usize,
}

impl Context {
    /// Decodes several sequences' tails together: tail `(seq, pos0, inputs)` continues `seq` at
    /// position `pos0`. All positions share batches; the last position of every tail is an
    /// output, and those hidden states are returned in order.
    pub(super) fn decode_tails(
        &mut self,
        tails: &[(i32, usize, &[Input])],
    ) -> Result<Vec<Vec<f32>>> {
        let entry = |seq, pos0: usize, j: usize, input| Entry {
            input,
            seq,
            pos: pos0 + j,
        };
        let mut entries: Vec<Entry> = tails
            .iter()
            .flat_map(|&(seq, pos0, inputs)| {
                inputs[..inputs.len() - 1]
                    .iter()
                    .enumerate()
                    .map(move |(j, &input)| entry(seq, pos0, j, input))
            })
            .collect();
        entries.extend(tails.iter().map(|&(seq, pos0, inputs)| {
            entry(seq, pos0, inputs.len() - 1, inputs[inputs.len() - 1])
        }));
        self.decode_entries(&entries, tails.len())
    }

    /// Decodes `inputs` at positions `pos0..` on `seq`, in calls of at most n_batch positions.
    /// With `output`, the hidden state of the last input is returned.
    pub(super) fn decode(
        &mut self,
        inputs: &[Input],
        seq: i32,
        pos0: usize,
        output: bool,
    ) -> Result<Option<Vec<f32>>> {
        let entries: Vec<Entry> = inputs
            .iter()
            .enumerate()
            .map(|(k, &input)| Entry {
                input,
                seq,
                pos: pos0 + k,
            })
            .collect();
        let n_out = usize::from(output && !entries.is_empty());
        Ok(self.decode_entries(&entries, n_out)?.pop())
    }

    /// Decodes entries (any mix of sequences), in calls of at most n_batch positions. The last
    /// `n_out` entries (at most [`MAX_BRANCHES`]) are outputs: they ride in the same calls as
    /// the positions before them, and their hidden states are returned in order.
    fn decode_entries(&mut self, entries: &[Entry], n_out: usize) -> Result<Vec<Vec<f32>>> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        debug_assert!(n_out <= MAX_BRANCHES.min(self.n_batch) && n_out <= entries.len());
        let first_out = entries.len() - n_out;
        let n_embd = self.model.n_embd();
        let ctx = self.raw.as_ptr();
        let mut rows = Vec::with_capacity(n_out);
        for span in batch_spans(entries.len(), self.n_batch) {
            let chunk_start = span.start;
            let chunk = &entries[span];
            let chunk_out = (chunk_start + chunk.len()).saturating_sub(first_out.max(chunk_start));
            self.capture.rows.clear();
            self.capture.active = chunk_out > 0;
            // SAFETY: the batch is created for this context, filled within n_batch entries with
            // checked tokens and n_embd-long vectors (copied by llama.cpp), and freed below.
            let status = unsafe {
                let batch = sys::llama_batch_ext_init(ctx);
                ensure!(!batch.is_null(), "cannot allocate a batch");
                let mut fill_error = None;
                for (k, e) in chunk.iter().enumerate() {
                    let idx = match e.input {
                        Input::Token(t) => sys::llama_batch_ext_add_token(batch, e.seq, t),
                        Input::Embedding(v) => {
                            let embd = sys::llama_embd {
                                data: v.as_ptr(),
                                n_rows: 1,
                                n_embd,
                            };
                            sys::llama_batch_ext_add_embd(batch, e.seq, embd)
                        }
                    };
                    let pos = e.pos as sys::llama_pos;
                    let is_out = chunk_start + k >= first_out;
                    if idx < 0
                        || !sys::llama_batch_ext_set_pos(batch, idx, &pos)
                        || !sys::llama_batch_ext_set_output_embd(batch, idx, is_out)
                    {
                        fill_error = Some(idx);
                        break;
                    }
                }
                let status = match fill_error {
                    Some(idx) => Err(idx),
                    None => Ok(sys::llama_process(
                        ctx,
                        sys::LLAMA_PROCESS_TYPE_DECODE,
                        batch,
                    )),
                };
                sys::llama_batch_ext_free(batch);
                status
            };
            self.capture.active = false;
            match status {
                Err(code) => bail!("cannot build the llama.cpp batch (code {code})"),
                Ok(0) => {}
                Ok(1) => bail!("the KV cache is full; raise --ctx"),
                Ok(code) => bail!("llama.cpp decode failed with code {code}"),
            }
            ensure!(
                self.capture.rows.len() == chunk_out * n_embd,
                "llama.cpp's graph gave {} hidden values for {chunk_out} outputs of {n_embd} \
                 (a model without a `result_norm` tensor?)",
                self.capture.rows.len()
            );
            rows.extend(self.capture.rows.chunks(n_embd).map(<[f32]>::to_vec));
        }
        Ok(rows)
    }
}

/// How `decode_entries` cuts `len` positions into llama.cpp calls of at most `n_batch`: in
/// order, never a one-position call after a longer one (the tail borrows a position from the call
/// before it). ggml's CPU flash attention splits a lone query's KV cells across threads, which
/// would make that position's state depend on the thread count.
pub fn batch_spans(len: usize, n_batch: usize) -> Vec<std::ops::Range<usize>> {
    let n_batch = n_batch.max(1);
    let mut spans: Vec<std::ops::Range<usize>> = (0..len)
        .step_by(n_batch)
        .map(|start| start..(start + n_batch).min(len))
        .collect();
    if let [.., before, last] = spans.as_mut_slice() {
        if last.len() == 1 && before.len() > 2 {
            before.end -= 1;
            last.start -= 1;
        }
    }
    spans
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_are_grouped_in_order_within_the_context_and_the_call_size() {
        // prefix 10, context 100: own cells are n - shared.
        let lens = [30, 30, 30, 30, 96, 5];
        let shared = [10, 10, 10, 10, 10, 0];
        // 10 + 4 × 20 = 90 fit; 86 more do not; 86 alone fits (10 + 86 = 96); 5 more do not
        // (101 > 100): a group of their own.
        assert_eq!(
            group_prompts(&lens, &shared, 10, 100, 8),
            vec![0..4, 4..5, 5..6]
        );
        assert_eq!(
            group_prompts(&lens, &shared, 10, 100, 2),
            vec![0..2, 2..4, 4..5, 5..6]
        );
        assert_eq!(group_prompts(&lens, &shared, 10, 100, 1).len(), lens.len());
        // per_call is capped at MAX_BRANCHES and at least 1.
        let many = vec![1; 40];
        let zero = vec![0; 40];
        let g = group_prompts(&many, &zero, 0, 10_000, 100);
        assert!(g.iter().all(|r| r.len() <= MAX_BRANCHES));
        assert_eq!(g.iter().map(|r| r.len()).sum::<usize>(), 40);
        assert_eq!(group_prompts(&many, &zero, 0, 10_000, 0).len(), 40);
        assert!(group_prompts(&[], &[], 0, 100, 4).is_empty());
        assert_eq!(kv_cells_needed(10, &[30, 30], &[10, 0]), 10 + 20 + 30);
    }

    #[test]
    fn calls_cover_the_positions_in_order_without_a_lone_last_position() {
        let covers = |spans: &[std::ops::Range<usize>], len: usize, n_batch: usize| {
            assert_eq!(spans.first().map_or(0, |r| r.start), 0);
            assert_eq!(spans.last().map_or(0, |r| r.end), len);
            assert!(spans.windows(2).all(|w| w[0].end == w[1].start));
            assert!(spans.iter().all(|r| !r.is_empty() && r.len() <= n_batch));
        };
        assert_eq!(batch_spans(513, 512), vec![0..511, 511..513]);
        assert_eq!(batch_spans(1025, 512), vec![0..512, 512..1023, 1023..1025]);
        assert_eq!(batch_spans(512, 512), vec![0..512]);
        assert_eq!(batch_spans(514, 512), vec![0..512, 512..514]);
        assert_eq!(batch_spans(1, 512), vec![0..1]);
        assert!(batch_spans(0, 512).is_empty());
        for n_batch in [3, 4, 64, 512] {
            for len in 0..3 * n_batch + 2 {
                let spans = batch_spans(len, n_batch);
                covers(&spans, len, n_batch);
                assert!(
                    len < 2 || spans.iter().all(|r| r.len() >= 2),
                    "{len} {n_batch}"
                );
            }
        }
        // Calls of one or two positions cannot avoid it; they still cover everything.
        covers(&batch_spans(5, 2), 5, 2);
        covers(&batch_spans(3, 1), 3, 1);
        covers(&batch_spans(3, 0), 3, 1);
    }
}
