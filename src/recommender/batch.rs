//! Batch scoring of many users (`illmrec score`, the Python bindings' `score_batch`): the record
//! of one user and `--shard I/N` selection. The records go to the kill-safe, resumable output of
//! [`crate::store::journal`].

use crate::recommender::{RankedItem, Recommender, RequestError};
use crate::store::jsonl::ScoreLine;
use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};

/// Settings of a batch that a line may not override: `top_k` is the default for lines without
/// their own, and seen items are excluded unless `include_seen`.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct ScoreSettings {
    pub top_k: usize,
    pub include_seen: bool,
}

/// One output record: `{"history_used": [ids], "items": [{"rank", "id", "score", "title",
/// "year", "genres"}...], "user": <as given>}`: the field names of `recommend --json` and of the
/// HTTP API (see [`RankedItem`]).
#[derive(Clone, Debug, Serialize)]
pub struct ScoreRecord {
    /// History items that made it into the prompt (oldest first).
    pub history_used: Vec<u64>,
    pub items: Vec<RankedItem>,
    pub user: serde_json::Value,
    /// The line's candidates that have no feature in any scored modality, so `items` leaves
    /// them out; the front ends say so. Not part of the record's JSON.
    #[serde(skip)]
    pub left_out: Vec<u64>,
}

/// Why a line of a batch could not be scored or embedded: the kinds a run counts apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LineErrorKind {
    /// Not UTF-8, not JSON, or not a user line (no `history`, a field of the wrong type).
    Malformed,
    /// An id that is not in the catalog.
    UnknownItem,
    /// A well-formed line asking for what cannot be answered (an empty history or candidate
    /// list, `top_k` out of range, too many ids, a prompt that does not fit the context).
    Invalid,
    /// The engine failed on it (or a score came out non-finite).
    Failed,
}

impl LineErrorKind {
    /// The kind of a line's error: the [`RequestError`] in its chain decides; any other error
    /// of a line that parsed is a failure of the engine.
    pub fn of(e: &anyhow::Error) -> Self {
        match e.downcast_ref::<RequestError>() {
            Some(RequestError::UnknownItems(_)) => LineErrorKind::UnknownItem,
            Some(r) if r.is_client_error() => LineErrorKind::Invalid,
            _ => LineErrorKind::Failed,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            LineErrorKind::Malformed => "malformed",
            LineErrorKind::UnknownItem => "with an unknown item",
            LineErrorKind::Invalid => "invalid",
            LineErrorKind::Failed => "failed",
        }
    }
}

/// The record written in place of a line that could not be scored, as `POST /v1/score` writes
/// it: `{"line": n, "error": "..."}` (so output line k always stands for the k-th taken line).
pub fn error_record(line: usize, e: &anyhow::Error) -> String {
    serde_json::json!({"line": line, "error": format!("{e:#}").replace('\n', " ")}).to_string()
}

/// The bad-line policy of every batch command (`score`, `embed`): a bad line is reported with
/// its number and kind and the run goes on, until more than `max_errors` lines went bad.
#[derive(Clone, Debug, Default)]
pub struct BadLines {
    pub max_errors: Option<usize>,
    counts: BTreeMap<LineErrorKind, usize>,
}

impl BadLines {
    pub fn new(max_errors: Option<usize>) -> Self {
        Self {
            max_errors,
            counts: BTreeMap::new(),
        }
    }

    /// Counts a bad line; an error once more than `max_errors` lines went bad.
    pub fn count(&mut self, kind: LineErrorKind) -> Result<()> {
        *self.counts.entry(kind).or_default() += 1;
        if let Some(max) = self.max_errors {
            ensure!(
                self.total() <= max,
                "more than --max-errors {max} bad lines ({}): stopped",
                self.summary()
            );
        }
        Ok(())
    }

    pub fn total(&self) -> usize {
        self.counts.values().sum()
    }

    /// Lines per kind.
    pub fn counts(&self) -> &BTreeMap<LineErrorKind, usize> {
        &self.counts
    }

    /// "2 malformed, 1 with an unknown item" (or "none").
    pub fn summary(&self) -> String {
        if self.counts.is_empty() {
            return "none".into();
        }
        self.counts
            .iter()
            .map(|(k, n)| format!("{n} {}", k.describe()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Checks a user line (non-empty history and candidates within the limits, `top_k` in range,
/// every id in the catalog) without running the model: the checks of `POST /v1/score`.
pub fn check_line(rec: &Recommender, u: &ScoreLine, s: ScoreSettings) -> Result<()> {
    rec.check_request(
        &u.history,
        u.candidates.as_deref(),
        u.top_k.unwrap_or(s.top_k),
    )?;
    Ok(())
}

/// Scores one user line: the LLM on its history, then its top-k over its candidates or the
/// catalog (history items excluded unless `include_seen`).
pub fn score_user(rec: &mut Recommender, u: &ScoreLine, s: ScoreSettings) -> Result<ScoreRecord> {
    check_line(rec, u, s)?;
    let user = rec.encode_user(&u.history)?;
    record(rec, u, s, &user)
}

/// [`score_user`] for several lines, their LLM prompts decoded together `per_call` users at a
/// time ([`Recommender::encode_users`]); one result per line, in order, each line's error its
/// own. With `per_call` 1 each result is exactly `score_user`'s; with more, each user's scores
/// equal it within llama.cpp's batch-shape noise.
pub fn score_users(
    rec: &mut Recommender,
    lines: &[ScoreLine],
    s: ScoreSettings,
    per_call: usize,
) -> Vec<Result<ScoreRecord>> {
    if per_call <= 1 {
        return lines.iter().map(|u| score_user(rec, u, s)).collect();
    }
    let checked: Vec<Result<()>> = lines.iter().map(|u| check_line(rec, u, s)).collect();
    let ok: Vec<&ScoreLine> = lines
        .iter()
        .zip(&checked)
        .filter(|(_, c)| c.is_ok())
        .map(|(u, _)| u)
        .collect();
    let histories: Vec<&[u64]> = ok.iter().map(|u| u.history.as_slice()).collect();
    let mut users = rec.encode_users(&histories, per_call).into_iter();
    lines
        .iter()
        .zip(checked)
        .map(|(u, checked)| {
            checked?;
            let user = users.next().expect("one user per checked line")?;
            record(rec, u, s, &user)
        })
        .collect()
}

/// The record of a user line whose history is encoded: its top-k over its candidates or the
/// catalog (history items excluded unless `include_seen`).
fn record(
    rec: &Recommender,
    u: &ScoreLine,
    s: ScoreSettings,
    user: &crate::recommender::UserVector,
) -> Result<ScoreRecord> {
    let exclude: HashSet<u64> = match s.include_seen {
        true => HashSet::new(),
        false => u.history.iter().copied().collect(),
    };
    let top = rec.top_k(
        user,
        u.top_k.unwrap_or(s.top_k),
        u.candidates.as_deref(),
        &exclude,
    )?;
    Ok(ScoreRecord {
        history_used: user.used.clone(),
        items: rec.ranked(&top),
        user: u.user.clone(),
        left_out: u
            .candidates
            .as_deref()
            .map(|c| rec.unscorable(c))
            .unwrap_or_default(),
    })
}

/// Which lines of the input a run takes: line number `n` (1-based, as in error messages, blank
/// lines counted) belongs to shard `(n - 1) mod count`. Shards are deterministic and need no
/// coordinator: N processes given `0/N` … `N-1/N` split a file exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// Every line.
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    /// Whether input line `number` (1-based) is this shard's.
    pub fn takes(&self, number: usize) -> bool {
        number >= 1 && (number - 1) % self.count == self.index
    }
}

impl std::str::FromStr for Shard {
    type Err = anyhow::Error;

    /// Parses `I/N` with `N ≥ 1` and `0 ≤ I < N`.
    fn from_str(text: &str) -> Result<Self> {
        let Some((i, n)) = text.split_once('/') else {
            bail!("'{text}' is not a shard: expected I/N, e.g. 0/4")
        };
        let parse = |s: &str, what: &str| {
            s.trim().parse::<usize>().with_context(|| {
                format!("'{text}' is not a shard: {what} '{s}' is not a non-negative integer")
            })
        };
        let (index, count) = (parse(i, "index")?, parse(n, "count")?);
        ensure!(
            count >= 1,
            "'{text}' is not a shard: the count must be at least 1"
        );
        ensure!(
            index < count,
            "'{text}' is not a shard: the index must be below the count (0 to {})",
            count - 1
        );
        Ok(Shard { index, count })
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn shards_parse_and_split_every_line_once() {
        let s: Shard = "1/3".parse().unwrap();
        assert_eq!(s, Shard { index: 1, count: 3 });
        assert_eq!(s.to_string(), "1/3");
        for bad in ["3/3", "0/0", "1", "-1/2", "a/2", "1/b", "", "/"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
        let e = "4/4".parse::<Shard>().unwrap_err().to_string();
        assert!(e.contains("below the count"), "{e}");
        let shards: Vec<Shard> = (0..3).map(|i| Shard { index: i, count: 3 }).collect();
        for n in 1..100 {
            assert_eq!(shards.iter().filter(|s| s.takes(n)).count(), 1, "line {n}");
        }
        assert!(shards[0].takes(1) && shards[1].takes(2) && shards[0].takes(4));
        assert!((1..50).all(|n| Shard::ALL.takes(n)));
        assert!(!Shard::ALL.takes(0));
    }

    #[test]
    fn record_fields_keep_the_score_order() {
        let r = ScoreRecord {
            history_used: vec![3, 4],
            items: vec![RankedItem {
                rank: 1,
                id: 5,
                score: 1.5,
                title: "Heat (1995)".into(),
                year: Some(1995),
                genres: vec!["Crime".into()],
            }],
            user: json!("u1"),
            left_out: vec![9],
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"history_used":[3,4],"items":[{"rank":1,"id":5,"score":1.5,"title":"Heat (1995)","year":1995,"genres":["Crime"]}],"user":"u1"}"#
        );
    }

    #[test]
    fn bad_lines_count_kinds_and_stop_past_the_limit() {
        let mut b = BadLines::new(Some(2));
        b.count(LineErrorKind::Malformed).unwrap();
        b.count(LineErrorKind::UnknownItem).unwrap();
        let e = b.count(LineErrorKind::UnknownItem).unwrap_err().to_string();
        assert!(e.contains("--max-errors 2"), "{e}");
        assert_eq!(b.summary(), "1 malformed, 2 with an unknown item");
        let unknown = anyhow::Error::from(RequestError::UnknownItems(vec![7]));
        assert_eq!(LineErrorKind::of(&unknown), LineErrorKind::UnknownItem);
        let empty = anyhow::Error::from(RequestError::EmptyHistory);
        assert_eq!(LineErrorKind::of(&empty), LineErrorKind::Invalid);
        assert_eq!(
            LineErrorKind::of(&anyhow::anyhow!("boom")),
            LineErrorKind::Failed
        );
        assert_eq!(
            error_record(4, &unknown.context("x")),
            r#"{"error":"x: item 7 is not in the catalog","line":4}"#
        );
        let mut unlimited = BadLines::new(None);
        for _ in 0..100 {
            unlimited.count(LineErrorKind::Failed).unwrap();
        }
    }
}
