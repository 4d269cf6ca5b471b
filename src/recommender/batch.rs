//! Batch scoring of many users (`illmrec score`, the Python bindings' `score_batch`): the record
//! of one user and `--shard I/N` selection. The records go to the kill-safe, resumable output of
//! [`crate::store::journal`].

use crate::method::rank::Scored;
use crate::recommender::Recommender;
use crate::store::jsonl::ScoreLine;
use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;
use std::collections::HashSet;

/// Settings of a batch that a line may not override: `top_k` is the default for lines without
/// their own, and seen items are excluded unless `include_seen`.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct ScoreSettings {
    pub top_k: usize,
    pub include_seen: bool,
}

/// One output record: `{"history_used": n, "items": [{"id", "score"}...], "user": <as given>}`
/// (fields in this order, as `illmrec score` has always written them).
#[derive(Clone, Debug, Serialize)]
pub struct ScoreRecord {
    pub history_used: usize,
    pub items: Vec<Scored>,
    pub user: serde_json::Value,
}

/// Checks a user line (non-empty history, every id in the catalog) without running the model.
pub fn check_line(rec: &Recommender, u: &ScoreLine) -> Result<()> {
    ensure!(!u.history.is_empty(), "history is empty");
    if let Some(c) = &u.candidates {
        ensure!(
            !c.is_empty(),
            "the candidate list is empty: give at least one item id"
        );
    }
    ensure!(u.top_k != Some(0), "top_k must be at least 1");
    for id in u.history.iter().chain(u.candidates.iter().flatten()) {
        rec.catalog.item(*id)?;
    }
    Ok(())
}

/// Scores one user line: the LLM on its history, then its top-k over its candidates or the
/// catalog (history items excluded unless `include_seen`).
pub fn score_user(rec: &mut Recommender, u: &ScoreLine, s: ScoreSettings) -> Result<ScoreRecord> {
    check_line(rec, u)?;
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
    let checked: Vec<Result<()>> = lines.iter().map(|u| check_line(rec, u)).collect();
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
    let items = rec.top_k(
        user,
        u.top_k.unwrap_or(s.top_k),
        u.candidates.as_deref(),
        &exclude,
    )?;
    Ok(ScoreRecord {
        history_used: user.used.len(),
        items,
        user: u.user.clone(),
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
            history_used: 2,
            items: vec![Scored { id: 5, score: 1.5 }],
            user: json!("u1"),
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"history_used":2,"items":[{"id":5,"score":1.5}],"user":"u1"}"#
        );
    }
}
