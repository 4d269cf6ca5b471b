//! `illmrec score`: batch scoring of a JSON-lines file of users.
//!
//! Input lines: `{"user": <any>, "history": [ids], "candidates": [ids]?, "top_k": n?}`.
//! Output lines: `{"user": <same>, "items": [{"id", "score"}...], "history_used": n}`.
//! A malformed line is reported on stderr with its number, skipped and counted.

use super::{untrained_warning, RuntimeArgs};
use anyhow::{bail, Context, Result};
use clap::Args;
use illmrec::fsutil::write_atomic;
use illmrec::recommender::Recommender;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;
use std::collections::HashSet;
use std::path::PathBuf;

#[derive(Args)]
pub struct ScoreArgs {
    /// The bundle folder (manifest.json, heads, items, banks).
    #[arg(long, value_name = "DIR")]
    bundle: std::path::PathBuf,
    #[command(flatten)]
    runtime: RuntimeArgs,
    /// JSON-lines input, one user per line.
    #[arg(long, value_name = "FILE")]
    input: PathBuf,
    /// JSON-lines output, written atomically when all users are done.
    #[arg(long, value_name = "FILE")]
    output: PathBuf,
    /// Items per user when a line gives no top_k.
    #[arg(long, default_value_t = 10)]
    top_k: usize,
    /// Allow items of the history in the results.
    #[arg(long)]
    include_seen: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserLine {
    #[serde(default)]
    user: serde_json::Value,
    history: Vec<u64>,
    #[serde(default)]
    candidates: Option<Vec<u64>>,
    #[serde(default)]
    top_k: Option<usize>,
}

pub fn run(a: ScoreArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.input)
        .with_context(|| format!("cannot read {}", a.input.display()))?;
    let lines: Vec<(usize, &str)> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, l)| (n + 1, l))
        .collect();
    let mut rec = Recommender::open(&a.bundle, a.runtime.options())?;
    if !rec.heads.config.trained {
        eprintln!("{}", untrained_warning(&rec.heads.config.provenance));
    }
    let bar = ProgressBar::new(lines.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} users  {per_sec}  ETA {eta}").unwrap(),
    );
    let mut out = Vec::new();
    let mut skipped = 0usize;
    for (n, line) in lines {
        match score_line(&mut rec, line, &a) {
            Ok(json) => out.push(json),
            Err(e) => {
                bar.suspend(|| {
                    eprintln!(
                        "{}:{n}: skipped: {}",
                        a.input.display(),
                        format!("{e:#}").replace('\n', " ")
                    )
                });
                skipped += 1;
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    write_atomic(&a.output, |w| {
        for line in &out {
            writeln!(w, "{line}")?;
        }
        Ok(())
    })?;
    eprintln!(
        "scored {} users, skipped {skipped} malformed lines; wrote {}",
        out.len(),
        a.output.display()
    );
    if out.is_empty() && skipped > 0 {
        bail!("no line of {} could be scored", a.input.display());
    }
    Ok(())
}

fn score_line(rec: &mut Recommender, line: &str, a: &ScoreArgs) -> Result<String> {
    let u: UserLine =
        serde_json::from_str(line).context("not a valid user line (needs \"history\": [ids])")?;
    if u.history.is_empty() {
        bail!("history is empty");
    }
    for id in u.history.iter().chain(u.candidates.iter().flatten()) {
        rec.catalog.item(*id)?;
    }
    let user = rec.encode_user(&u.history)?;
    let exclude: HashSet<u64> = if a.include_seen {
        HashSet::new()
    } else {
        u.history.iter().copied().collect()
    };
    let top = rec.top_k(
        &user,
        u.top_k.unwrap_or(a.top_k),
        u.candidates.as_deref(),
        &exclude,
    )?;
    Ok(
        serde_json::json!({"user": u.user, "items": top, "history_used": user.used.len()})
            .to_string(),
    )
}
