//! The history-length sweep behind `illmrec bench --sweep` (the paper's Fig. 3): per-request
//! latency and prompt positions against the number of history items, for items written as an
//! image token, as their title only and with their description, beside an engine-only row that
//! decodes the image prompt's positions as plain tokens through the same llama.cpp context, so
//! that the runtime's overhead over bare llama.cpp is a ratio measured in the same run.
//!
//! [`run`] drives a [`Recommender`]; everything after it is pure: summaries ([`summarize`],
//! [`percentile`]) here, the report's markdown, CSV and PNG renderings and the machine facts in
//! [`super::report`].

use crate::engine::{Input, Token};
use crate::method::prompt::PromptStyle;
use crate::recommender::{self, Piece, Recommender};
use anyhow::{anyhow, bail, ensure, Context as _, Result};
use serde::Serialize;
use std::collections::HashSet;
use std::time::Instant;

/// One timed configuration of the sweep.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Style {
    /// Each item as its title plus one visual token (the I-LLMRec prompt).
    Image,
    /// Each item as its title only.
    Title,
    /// Each item as its title and description (cut to `--description-tokens`).
    Description,
    /// The image prompt's positions as plain tokens (every injected vector, `[REC]` included,
    /// replaced by one fixed token) through the same context: llama.cpp alone.
    Engine,
}

impl Style {
    pub const ALL: [Style; 4] = [
        Style::Image,
        Style::Title,
        Style::Description,
        Style::Engine,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Style::Image => "image",
            Style::Title => "title",
            Style::Description => "description",
            Style::Engine => "engine",
        }
    }

    /// The label used in tables and plots.
    pub fn label(self) -> &'static str {
        match self {
            Style::Image => "image token",
            Style::Title => "title only",
            Style::Description => "description",
            Style::Engine => "engine only (image prompt's positions)",
        }
    }

    fn prompt_style(self) -> PromptStyle {
        match self {
            Style::Title => PromptStyle::Title,
            Style::Description => PromptStyle::Description,
            Style::Image | Style::Engine => PromptStyle::Image,
        }
    }
}

/// What to measure.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    /// History lengths (items), ascending, distinct, at least 1.
    pub lengths: Vec<usize>,
    /// Users timed per length.
    pub users: usize,
    /// Untimed rounds (every style at the longest length) before measuring.
    pub warmup: usize,
}

/// The history lengths 1..=20 (the paper's Fig. 3 range).
pub fn default_lengths() -> Vec<usize> {
    (1..=20).collect()
}

/// Checks and normalises a list of lengths: sorted, duplicates removed, none zero, not empty.
pub fn check_lengths(lengths: &[usize]) -> Result<Vec<usize>> {
    ensure!(!lengths.is_empty(), "no history length given to sweep over");
    ensure!(
        lengths.iter().all(|&l| l >= 1),
        "a history length must be at least 1 item"
    );
    let mut l = lengths.to_vec();
    l.sort_unstable();
    l.dedup();
    Ok(l)
}

/// Mean and percentiles of a set of samples.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Summary {
    pub n: usize,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
}

/// The `q`-quantile (0..=1) of ascending `sorted` samples, interpolated linearly between the two
/// nearest ranks (numpy's default); `None` when there is no sample.
pub fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    let at = q.clamp(0.0, 1.0) * (n - 1) as f64;
    let (lo, hi) = (at.floor() as usize, at.ceil() as usize);
    Some(sorted[lo] + (sorted[hi] - sorted[lo]) * (at - lo as f64))
}

/// Summarises samples (any order); `None` when there is none.
pub fn summarize(samples: &[f64]) -> Option<Summary> {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    Some(Summary {
        n: s.len(),
        mean: s.iter().sum::<f64>() / s.len().max(1) as f64,
        p50: percentile(&s, 0.5)?,
        p90: percentile(&s, 0.9)?,
    })
}

/// One (length, style) cell of the sweep.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Row {
    pub length: usize,
    pub style: Style,
    pub users: usize,
    pub mean_positions: f64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
}

/// Builds a row from per-user samples (milliseconds and prompt positions).
pub fn row(length: usize, style: Style, ms: &[f64], positions: &[usize]) -> Option<Row> {
    let s = summarize(ms)?;
    Some(Row {
        length,
        style,
        users: s.n,
        mean_positions: positions.iter().sum::<usize>() as f64 / positions.len().max(1) as f64,
        mean_ms: s.mean,
        p50_ms: s.p50,
        p90_ms: s.p90,
    })
}

/// The histories timed at `length`: the newest `length` items of the first `users` histories
/// that have that many items, all of them `known` (in the catalog).
pub fn pick(
    histories: &[Vec<u64>],
    length: usize,
    users: usize,
    known: impl Fn(u64) -> bool,
) -> Vec<&[u64]> {
    histories
        .iter()
        .filter(|h| h.len() >= length)
        .map(|h| &h[h.len() - length..])
        .filter(|h| h.iter().all(|&id| known(id)))
        .take(users)
        .collect()
}

/// Runs the sweep on `histories` (oldest item first). For each length, every picked user gets
/// every style in turn (so load from other processes weighs on all styles alike): a whole
/// request (prompt, LLM, user heads, top 10) for the three prompt styles, and the engine-only
/// decode. The prefix cache is used when the recommender has one. `progress` is told each
/// length as it starts. Fails when the recommender's `max_history` is below the longest length,
/// when the heads have no adaptor, when no history is long enough for a length, or when a prompt
/// does not fit the context (never truncates silently).
pub fn run(
    rec: &mut Recommender,
    histories: &[Vec<u64>],
    plan: &Plan,
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<Row>> {
    let lengths = check_lengths(&plan.lengths)?;
    ensure!(plan.users >= 1, "at least 1 user per length is needed");
    let longest = *lengths.last().expect("checked non-empty");
    ensure!(
        rec.options().max_history >= longest,
        "the recommender writes at most {} items into a prompt, below the longest length {longest}",
        rec.options().max_history
    );
    ensure!(
        rec.heads.adaptor.is_some(),
        "these heads have no adaptor, so items cannot be written as image tokens"
    );
    let reuse = !rec.context().prefix().is_empty();
    let filler = *rec
        .model()
        .tokenize(" ", false)?
        .first()
        .context("the tokenizer gives no token for a space")?;
    let known = |rec: &Recommender, id: u64| rec.catalog.get(id).is_some();

    let warm = {
        let r: &Recommender = rec;
        let mut w = pick(histories, longest, plan.warmup, |id| known(r, id));
        if w.is_empty() && plan.warmup > 0 {
            w = histories
                .iter()
                .map(|h| &h[h.len().saturating_sub(longest)..])
                .filter(|h| !h.is_empty() && h.iter().all(|&id| known(r, id)))
                .take(plan.warmup)
                .collect();
        }
        w
    };
    for h in warm {
        for style in Style::ALL {
            request(rec, h, style, reuse, filler)?;
        }
    }

    let mut rows = Vec::new();
    for &length in &lengths {
        progress(length);
        let picked = {
            let r: &Recommender = rec;
            pick(histories, length, plan.users, |id| known(r, id))
        };
        if picked.is_empty() {
            bail!("no history has {length} items that are all in the bundle's catalog; sweep shorter lengths");
        }
        let mut ms = vec![Vec::new(); Style::ALL.len()];
        let mut positions = vec![Vec::new(); Style::ALL.len()];
        for h in picked {
            for (k, style) in Style::ALL.into_iter().enumerate() {
                let (t, p) = request(rec, h, style, reuse, filler)?;
                ms[k].push(t);
                positions[k].push(p);
            }
        }
        for (k, style) in Style::ALL.into_iter().enumerate() {
            rows.extend(row(length, style, &ms[k], &positions[k]));
        }
    }
    Ok(rows)
}

/// Times one request of `style` on `history`: milliseconds and prompt positions.
fn request(
    rec: &mut Recommender,
    history: &[u64],
    style: Style,
    reuse: bool,
    filler: Token,
) -> Result<(f64, usize)> {
    rec.set_request_options(reuse, Some(style.prompt_style()))?;
    let n_ctx = rec.context().n_ctx();
    let too_long = |positions: usize| {
        anyhow!(
            "the {} prompt of {} items does not fit the context of {n_ctx} positions ({positions} needed with the cached prefix); raise --ctx",
            style.name(),
            history.len()
        )
    };
    if style == Style::Engine {
        let (segments, _, dropped) = rec.prompt(history)?;
        let pieces = recommender::tokenize(rec.model(), &segments)?;
        let inputs: Vec<Input> = pieces
            .iter()
            .flat_map(|p| match p {
                Piece::Tokens(t) => t.iter().map(|&t| Input::Token(t)).collect(),
                Piece::Vector(_) => vec![Input::Token(filler)],
            })
            .collect();
        if dropped > 0 {
            return Err(too_long(inputs.len() + rec.context().prefix().len()));
        }
        let t = Instant::now();
        std::hint::black_box(rec.context().last_hidden(&inputs, reuse)?);
        return Ok((t.elapsed().as_secs_f64() * 1e3, inputs.len()));
    }
    let t = Instant::now();
    let user = rec.encode_user(history)?;
    let exclude: HashSet<u64> = history.iter().copied().collect();
    std::hint::black_box(rec.top_k(&user, 10, None, &exclude)?);
    let ms = t.elapsed().as_secs_f64() * 1e3;
    if user.dropped_for_context > 0 {
        return Err(too_long(
            user.prompt_positions + rec.context().prefix().len(),
        ));
    }
    Ok((ms, user.prompt_positions))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_between_ranks() {
        assert_eq!(percentile(&[], 0.5), None);
        assert_eq!(percentile(&[3.0], 0.9), Some(3.0));
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 0.5), Some(2.5));
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 0.0), Some(1.0));
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 1.0), Some(4.0));
        let p90 = percentile(
            &[0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0],
            0.9,
        );
        assert!((p90.unwrap() - 81.0).abs() < 1e-9);
    }

    #[test]
    fn summaries_sort_their_samples() {
        let s = summarize(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!(s.n, 4);
        assert_eq!(s.mean, 2.5);
        assert_eq!(s.p50, 2.5);
        assert!((s.p90 - 3.7).abs() < 1e-9);
        assert!(summarize(&[]).is_none());
    }

    #[test]
    fn lengths_are_checked_and_normalised() {
        assert_eq!(check_lengths(&[4, 1, 2, 4]).unwrap(), vec![1, 2, 4]);
        assert!(check_lengths(&[]).is_err());
        assert!(check_lengths(&[0, 3]).is_err());
        assert_eq!(default_lengths().len(), 20);
    }

    #[test]
    fn picking_takes_the_newest_items_of_long_enough_known_histories() {
        let h = vec![vec![1, 2, 3], vec![4], vec![5, 6, 99, 7], vec![8, 9]];
        let known = |id: u64| id != 99;
        assert_eq!(pick(&h, 2, 10, known), vec![&[2u64, 3][..], &[8u64, 9][..]]);
        assert_eq!(pick(&h, 1, 2, known), vec![&[3u64][..], &[4u64][..]]);
        assert_eq!(pick(&h, 2, 10, |_| true).len(), 3);
        assert!(pick(&h, 5, 10, known).is_empty());
    }
}
