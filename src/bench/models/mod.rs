//! `illmrec bench-models`, the library part: one GGUF model measured on a bundle ([`measure`],
//! run in a process of its own so that models do not share memory), the quantized copies it
//! makes and reuses ([`ensure_quantized`]), and the comparison of several models with a reference
//! on the same users ([`row`], [`Report`]) as markdown, CSV, JSON and a PNG plot. Time is
//! measured, never asserted; the agreement metrics are in [`super::agreement`]. The quantized
//! copies are in `quantized.rs`, the rows, report and plot in `report.rs`.

mod quantized;
mod report;
pub use quantized::*;
pub use report::*;

use super::sweep::summarize;
use crate::engine::Input;
use crate::method::eval::{rank_of_target, Metrics};
use crate::method::rank;
use crate::recommender::{Options, Recommender};
use anyhow::{ensure, Context as _, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

use std::path::{Path, PathBuf};
use std::time::Instant;

/// One user to score: a history, and either the candidates to rank (a dataset user: target
/// first, then its negatives) or the whole catalog.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UserCase {
    pub history: Vec<u64>,
    /// Candidates to rank; `None` ranks every catalog item outside the history.
    #[serde(default)]
    pub candidates: Option<Vec<u64>>,
    /// The held-out item (then `candidates[0]`), for HR@5 and NDCG@5.
    #[serde(default)]
    pub target: Option<u64>,
}

/// What one model's process measures (the file the parent writes for its child).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Job {
    pub model: PathBuf,
    pub users: Vec<UserCase>,
    /// Untimed requests first (the first users again).
    pub warmup: usize,
    /// Positions of the prompt-processing test (0: none).
    pub pp: usize,
    /// Timed runs of the prompt-processing test (after one untimed run).
    pub pp_runs: usize,
    /// Length of the compared top lists.
    pub top_k: usize,
}

/// One user's result on one model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UserResult {
    /// The whole request: prompt, LLM, heads, scoring and the top list.
    pub ms: f64,
    pub positions: usize,
    /// The top `k` ids, best first.
    pub top: Vec<u64>,
    /// Scores of the candidates (or of every catalog item outside the history, in catalog
    /// order); `None` for an item without a feature in any scored modality.
    pub scores: Vec<Option<f32>>,
    /// The target's rank among the candidates (0 = best), for dataset users.
    pub rank: Option<usize>,
}

/// One model measured in a process of its own.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Measured {
    pub model: PathBuf,
    /// `Recommender::open`: bundle, heads, item vectors, the model's load and the task prefix.
    pub load_s: f64,
    /// The item-vector cache was computed during the load (the load time is then not the
    /// model's alone).
    pub item_vectors_built: bool,
    pub rss_after_load_mib: f64,
    pub peak_rss_mib: f64,
    pub pp_positions: usize,
    pub pp_seconds: Vec<f64>,
    pub users: Vec<UserResult>,
    /// The recommender's warnings (a rebuilt cache), for the parent to show once.
    pub warnings: Vec<String>,
}

/// A field of /proc/self/status in MiB (0 where unavailable).
pub fn status_mib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Opens the bundle on `job.model` and measures it: the load, RSS after it, `job.warmup`
/// untimed requests, every user's request, the prompt-processing test and the peak RSS. Meant to
/// run in a fresh process (the peak RSS is the process's).
pub fn measure(bundle: &Path, mut opts: Options, job: &Job) -> Result<Measured> {
    ensure!(!job.users.is_empty(), "no user to measure");
    opts.model = Some(job.model.clone());
    let t = Instant::now();
    let mut rec = Recommender::open(bundle, opts)?;
    let load_s = t.elapsed().as_secs_f64();
    let rss_after_load_mib = status_mib("VmRSS");
    for i in 0..job.warmup {
        request(&mut rec, &job.users[i % job.users.len()], job.top_k)?;
    }
    let users = job
        .users
        .iter()
        .enumerate()
        .map(|(i, case)| request(&mut rec, case, job.top_k).with_context(|| format!("user {i}")))
        .collect::<Result<Vec<_>>>()?;
    let mut pp_seconds = Vec::new();
    if job.pp > 0 {
        let tokens = pp_tokens(&rec, job.pp)?;
        let inputs: Vec<Input> = tokens.iter().map(|&t| Input::Token(t)).collect();
        for run in 0..=job.pp_runs {
            let t = Instant::now();
            std::hint::black_box(rec.context().last_hidden(&inputs, false)?);
            if run > 0 {
                pp_seconds.push(t.elapsed().as_secs_f64());
            }
        }
    }
    Ok(Measured {
        model: job.model.clone(),
        load_s,
        item_vectors_built: rec.items.computed,
        rss_after_load_mib,
        peak_rss_mib: status_mib("VmHWM"),
        pp_positions: job.pp,
        pp_seconds,
        users,
        warnings: rec.warnings().to_vec(),
    })
}

/// One timed request and the scores compared across models.
fn request(rec: &mut Recommender, case: &UserCase, k: usize) -> Result<UserResult> {
    let t = Instant::now();
    let user = rec.encode_user(&case.history)?;
    Ok(match &case.candidates {
        None => {
            let exclude: HashSet<u64> = case.history.iter().copied().collect();
            let top = rec.top_k(&user, k, None, &exclude)?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            let ids: Vec<u64> = rec
                .catalog
                .items()
                .iter()
                .map(|i| i.id)
                .filter(|id| !exclude.contains(id))
                .collect();
            UserResult {
                ms,
                positions: user.prompt_positions,
                top: top.iter().map(|s| s.id).collect(),
                scores: rec.score_items(&user, &ids)?,
                rank: None,
            }
        }
        Some(candidates) => {
            let scores = rec.score_items(&user, candidates)?;
            let top = rank::top_k(
                candidates.iter().copied().zip(scores.iter().copied()),
                &HashSet::new(),
                k,
            )?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            let rank = match (case.target, scores.split_first()) {
                (Some(_), Some((target, negatives))) => Some(rank_of_target(*target, negatives)),
                _ => None,
            };
            UserResult {
                ms,
                positions: user.prompt_positions,
                top: top.iter().map(|s| s.id).collect(),
                scores,
                rank,
            }
        }
    })
}

/// `n` plain tokens for the prompt-processing test: the catalog's titles, in order, as one text
/// (the same tokens for every model of one tokenizer), starting with BOS.
fn pp_tokens(rec: &Recommender, n: usize) -> Result<Vec<crate::engine::Token>> {
    let mut text = String::new();
    let mut tokens = Vec::new();
    for item in rec.catalog.items().iter().cycle().take(100_000) {
        text.push_str(item.title());
        text.push_str(", ");
        if text.len() >= 4 * n {
            tokens = rec.model().tokenize(&text, true)?;
            if tokens.len() >= n {
                break;
            }
        }
    }
    ensure!(
        tokens.len() >= n,
        "the catalog's titles are too short for a {n}-position test"
    );
    tokens.truncate(n);
    Ok(tokens)
}
