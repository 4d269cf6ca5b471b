//! Encodings beyond one user: several users decoded together ([`Recommender::encode_users`]),
//! a kiosk session continuing from its saved state ([`Recommender::encode_session`]), every
//! prefix of a history ([`Recommender::encode_prefixes`]), and the prompt's segments made ready
//! for the LLM ([`tokenize`]).

use super::request::{RequestError, RequestResult};
use super::{Recommender, SessionState, UserVector};
use crate::engine::{Input, Model, Token};
use crate::method::prompt::{self, Segment};
use anyhow::{ensure, Result};

impl Recommender {
    /// [`Recommender::encode_user`] for several histories, decoded together: up to `per_call`
    /// users per llama.cpp call sequence (each on a sequence of its own sharing the cached
    /// prefix; as many as fit the context, see [`crate::engine::group_prompts`]). Results are per
    /// history, in order; a history that cannot be prompted gets its own error and does not stop
    /// the others, and a group whose decode fails is retried one user at a time so that the error
    /// lands on the user that caused it. With `per_call` 1 this is `encode_user` on each.
    ///
    /// A batched state equals `encode_user`'s within llama.cpp's batch-shape noise.
    pub fn encode_users(
        &mut self,
        histories: &[&[u64]],
        per_call: usize,
    ) -> Vec<RequestResult<UserVector>> {
        if per_call <= 1 {
            return histories.iter().map(|h| self.encode_user(h)).collect();
        }
        let mut results: Vec<Option<RequestResult<UserVector>>> =
            (0..histories.len()).map(|_| None).collect();
        // Prompted users: (index, segments, used ids, dropped count).
        let mut prompted = Vec::new();
        for (k, h) in histories.iter().enumerate() {
            match self.prompt(h) {
                Ok((segments, used, dropped)) => prompted.push((k, segments, used, dropped)),
                Err(e) => results[k] = Some(Err(e)),
            }
        }
        let mut ready = Vec::new(); // (index in `prompted`, inputs)
        for (j, (k, segments, _, _)) in prompted.iter().enumerate() {
            match tokenize(self.model(), segments) {
                Ok(pieces) => ready.push((j, pieces)),
                Err(e) => results[*k] = Some(Err(e.into())),
            }
        }
        let inputs: Vec<Vec<Input>> = ready
            .iter()
            .map(|(_, pieces)| pieces.iter().flat_map(|p| p.inputs()).collect())
            .collect();
        let lens: Vec<usize> = inputs.iter().map(Vec::len).collect();
        let shared: Vec<usize> = inputs
            .iter()
            .map(|i| match self.reuse_prefix {
                true => self.ctx.shared_prefix_len(i),
                false => 0,
            })
            .collect();
        let groups = crate::engine::group_prompts(
            &lens,
            &shared,
            self.ctx.prefix().len(),
            self.ctx.n_ctx(),
            per_call,
        );
        let mut hidden: Vec<Option<Result<Vec<f32>>>> = (0..inputs.len()).map(|_| None).collect();
        for group in groups {
            let batch: Vec<&[Input]> = inputs[group.clone()].iter().map(Vec::as_slice).collect();
            let states = match batch.len() {
                1 => self
                    .ctx
                    .last_hidden(batch[0], self.reuse_prefix)
                    .map(|h| vec![h]),
                _ => self.ctx.many_hidden(&batch, self.reuse_prefix),
            };
            match states {
                Ok(states) => {
                    for (r, h) in group.zip(states) {
                        hidden[r] = Some(Ok(h));
                    }
                }
                // One at a time, so that each user gets its own answer or error.
                Err(_) => {
                    for (r, one) in group.zip(batch) {
                        hidden[r] = Some(self.ctx.last_hidden(one, self.reuse_prefix));
                    }
                }
            }
        }
        for (((j, _), hidden), inputs) in ready.iter().zip(hidden).zip(&inputs) {
            let (k, _, used, dropped) = &prompted[*j];
            let user = hidden
                .expect("every tokenized prompt was decoded")
                .map_err(RequestError::from)
                .and_then(|hidden| {
                    Ok(UserVector {
                        vectors: self.user_vectors(&hidden)?,
                        hidden,
                        used: used.clone(),
                        dropped_for_context: *dropped,
                        prompt_positions: inputs.len(),
                    })
                });
            results[*k] = Some(user);
        }
        results
            .into_iter()
            .map(|r| r.expect("every history has a result"))
            .collect()
    }

    /// Like [`Recommender::encode_user`] for a kiosk session's history, continuing from the
    /// session's saved KV state where the new prompt shares its start with the last one (a tap
    /// that adds an item decodes that item, the closing text and `[REC]`), and saving the state
    /// up to the history's last visual token for the next call. Also returns how many positions
    /// were decoded. The state agrees with `encode_user` within llama.cpp's batch-shape noise.
    pub fn encode_session(
        &mut self,
        session: &mut SessionState,
        history: &[u64],
    ) -> RequestResult<(UserVector, usize)> {
        let (segments, used, dropped) = self.prompt(history)?;
        let pieces = tokenize(self.model(), &segments)?;
        let inputs: Vec<Input> = pieces.iter().flat_map(|p| p.inputs()).collect();
        let t = prompt::template();
        let tail = format!("{}{}{}", t.list_close, t.closing, t.instruction);
        let save_at = session_cut(&inputs, self.model().tokenize(&tail, false)?.len());
        let (hidden, saved, decoded) = match self.ctx.session_hidden(
            session.saved.as_ref(),
            &inputs,
            save_at,
            self.reuse_prefix,
        ) {
            Ok(r) => r,
            Err(e) => {
                session.saved = None;
                return Err(e.into());
            }
        };
        session.saved = Some(saved);
        let vectors = self.user_vectors(&hidden)?;
        Ok((
            UserVector {
                vectors,
                hidden,
                used,
                dropped_for_context: dropped,
                prompt_positions: inputs.len(),
            },
            decoded,
        ))
    }

    /// The `[REC]` hidden states of every prefix of `history` (`history[..1]`, …, `history[..n]`),
    /// each the state `encode_user` gives for that prefix (within llama.cpp's batch-shape
    /// tolerance), but decoding the items they share once: each prefix then costs its closing text
    /// and `[REC]` instead of a whole prompt. `history` must fit `--max-history` and the context.
    pub fn encode_prefixes(&mut self, history: &[u64]) -> Result<Vec<Vec<f32>>> {
        ensure!(
            !history.is_empty(),
            "the history is empty: give at least one item id"
        );
        ensure!(
            history.len() <= self.opts.max_history,
            "a history of {} items has prefixes longer than --max-history {}",
            history.len(),
            self.opts.max_history
        );
        let mut prompts = Vec::with_capacity(history.len());
        for k in 1..=history.len() {
            let (segments, _, dropped) = self.prompt(&history[..k])?;
            ensure!(
                dropped == 0,
                "the prompt for {k} items does not fit the context; raise --ctx"
            );
            prompts.push(segments);
        }
        let pieces = prompts
            .iter()
            .map(|s| tokenize(self.model(), s))
            .collect::<Result<Vec<_>>>()?;
        let inputs: Vec<Vec<Input>> = pieces
            .iter()
            .map(|p| p.iter().flat_map(|x| x.inputs()).collect())
            .collect();
        let shared = inputs.last().expect("non-empty history");
        let mut out = Vec::with_capacity(inputs.len());
        for group in inputs.chunks(crate::engine::MAX_BRANCHES) {
            let branches: Vec<(usize, Vec<Input>)> = group
                .iter()
                .map(|own| {
                    let common = shared
                        .iter()
                        .zip(own)
                        .take_while(|(a, b)| same_input(a, b))
                        .count();
                    let cut = common.min(own.len() - 1).max(1);
                    (cut, own[cut..].to_vec())
                })
                .collect();
            out.extend(
                self.ctx
                    .branch_hidden(shared, &branches, self.reuse_prefix)?,
            );
        }
        Ok(out)
    }
}

/// A prompt segment made ready for the LLM.
pub enum Piece<'a> {
    Tokens(Vec<Token>),
    Vector(&'a [f32]),
}

impl Piece<'_> {
    pub(super) fn inputs(&self) -> Vec<Input<'_>> {
        match self {
            Piece::Tokens(t) => t.iter().map(|&t| Input::Token(t)).collect(),
            Piece::Vector(v) => vec![Input::Embedding(v)],
        }
    }
}

/// Tokenizes each text segment on its own (the first with BOS), as the reference tokenizer
/// splits the text around its `<i_vis>` placeholders.
pub fn tokenize<'a>(model: &Model, segments: &'a [Segment]) -> Result<Vec<Piece<'a>>> {
    segments
        .iter()
        .enumerate()
        .map(|(i, s)| match s {
            Segment::Text(t) => Ok(Piece::Tokens(model.tokenize(t, i == 0)?)),
            Segment::Vector(v) => Ok(Piece::Vector(v)),
        })
        .collect()
}

/// Where a session saves its prompt's KV state: at the end of the newest item, where the next
/// prompt (whose closing text becomes another item) starts to differ. That is after the last
/// injected vector before `[REC]` when the newest item is written with its visual token, else
/// `tail` positions (the closing text's tokens) plus a margin of two before `[REC]` (tokens may
/// merge across the join; the next call compares positions and rolls back to the common start).
fn session_cut(inputs: &[Input], tail: usize) -> usize {
    let last = inputs.len() - 1;
    let after_vector = inputs[..last]
        .iter()
        .rposition(|i| matches!(i, Input::Embedding(_)))
        .map_or(0, |i| i + 1);
    after_vector
        .max(last.saturating_sub(tail + 2))
        .clamp(1.min(last), last)
}

/// Whether two inputs are the same position (token id, or vector by value).
fn same_input(a: &Input, b: &Input) -> bool {
    match (a, b) {
        (Input::Token(x), Input::Token(y)) => x == y,
        (Input::Embedding(x), Input::Embedding(y)) => x == y,
        _ => false,
    }
}
