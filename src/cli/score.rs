//! `illmrec score`: batch scoring of a JSON-lines file of users.
//!
//! Input lines: `{"user": <any>, "history": [ids], "candidates": [ids]?, "top_k": n?}`.
//! Output lines: `{"user": <same>, "items": [{"id", "score"}...], "history_used": n}`.
//! A malformed line (not UTF-8, not JSON, unknown ids) is reported on stderr with its number,
//! skipped and counted. Input and output are streamed: memory is bounded by the longest line.

use super::{untrained_warning, RuntimeArgs};
use anyhow::{bail, Context, Result};
use clap::Args;
use illmrec::fsutil::write_atomic;
use illmrec::jsonl::{self, ScoreLine};
use illmrec::recommender::Recommender;
use indicatif::{ProgressBar, ProgressStyle};
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

pub fn run(a: ScoreArgs) -> Result<()> {
    let total = jsonl::count(&a.input)?;
    let mut rec = super::open_recommender(&a.bundle, a.runtime.options())?;
    if !rec.heads.config.trained {
        eprintln!("{}", untrained_warning(&rec.heads.config.provenance));
    }
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} users  {per_sec}  ETA {eta}").unwrap(),
    );
    let (mut scored, mut skipped) = (0usize, 0usize);
    // Lines stream in and results stream out to the temporary file that replaces the output at
    // the end: memory stays bounded by one line, and a killed run leaves the old output.
    write_atomic(&a.output, |w| {
        for line in jsonl::open(&a.input)? {
            let line = line.with_context(|| format!("cannot read {}", a.input.display()))?;
            match score_line(&mut rec, &line, &a) {
                Ok(json) => {
                    writeln!(w, "{json}")?;
                    scored += 1;
                }
                Err(e) => {
                    bar.suspend(|| {
                        eprintln!(
                            "{}:{}: skipped: {}",
                            a.input.display(),
                            line.number,
                            format!("{e:#}").replace('\n', " ")
                        )
                    });
                    skipped += 1;
                }
            }
            bar.inc(1);
        }
        Ok(())
    })?;
    bar.finish_and_clear();
    eprintln!(
        "scored {scored} users, skipped {skipped} malformed lines; wrote {}",
        a.output.display()
    );
    if scored == 0 && skipped > 0 {
        bail!("no line of {} could be scored", a.input.display());
    }
    Ok(())
}

fn score_line(rec: &mut Recommender, line: &jsonl::Line, a: &ScoreArgs) -> Result<String> {
    let u: ScoreLine = line
        .parse()
        .context("not a valid user line (needs \"history\": [ids])")?;
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
