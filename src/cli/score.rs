//! `illmrec score`: batch scoring of a JSON-lines file of users, streamed line by line.
//!
//! Input lines: `{"user": <any>, "history": [ids], "candidates": [ids]?, "top_k": n?}`.
//! Output lines: `{"history_used": n, "items": [{"id", "score"}...], "user": <same>}`.
//! A malformed line (not UTF-8, not JSON, unknown ids) is reported on stderr with its number,
//! skipped and counted. Records are written as they are made through the library's resumable
//! output (`illmrec::batch`): `--resume` continues a killed run, `--shard I/N` takes every N-th
//! line. Memory is bounded by the longest line.

use super::{untrained_warning, RuntimeArgs};
use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use illmrec::batch::{self, ResumableOutput, ScoreSettings, Shard};
use illmrec::fsutil;
use illmrec::jsonl::{self, ScoreLine};
use illmrec::recommender::Recommender;
use indicatif::{ProgressBar, ProgressStyle};
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
    /// JSON-lines output. Records go to OUT.partial as they are made (with a journal
    /// OUT.journal); OUT is replaced in one step when the last user is done.
    #[arg(long, value_name = "FILE")]
    output: PathBuf,
    /// Items per user when a line gives no top_k.
    #[arg(long, default_value_t = 10)]
    top_k: usize,
    /// Allow items of the history in the results.
    #[arg(long)]
    include_seen: bool,
    /// Continue an interrupted run of the same command (same input, shard and settings) after
    /// its last committed user, instead of starting over.
    #[arg(long)]
    resume: bool,
    /// Score only shard I of N (0 ≤ I < N): input line n (1-based, blank lines counted) belongs
    /// to shard (n − 1) mod N. N processes given 0/N … N−1/N split the input exactly.
    #[arg(long, value_name = "I/N", default_value = "0/1")]
    shard: Shard,
}

pub fn run(a: ScoreArgs) -> Result<()> {
    ensure!(a.top_k >= 1, "--top-k must be at least 1");
    let settings = ScoreSettings {
        top_k: a.top_k,
        include_seen: a.include_seen,
    };
    let special = fsutil::is_special_output(&a.output)?;
    ensure!(
        !(special && a.resume),
        "--resume needs a regular output file, and {} is a device or FIFO",
        a.output.display()
    );
    let mut out = match special {
        true => None,
        false => {
            let key = run_key(&a, settings)?;
            Some(ResumableOutput::open(&a.output, &key, a.resume)?)
        }
    };
    let start = out.as_ref().map_or(0, |o| o.resume_point().line);
    let (mut total, mut done) = (0u64, 0u64);
    for line in jsonl::open(&a.input)? {
        let line = line.with_context(|| format!("cannot read {}", a.input.display()))?;
        if a.shard.takes(line.number) {
            total += 1;
            done += (line.number <= start) as u64;
        }
    }
    let mut rec = super::open_recommender(&a.bundle, a.runtime.options())?;
    if !rec.heads.config.trained {
        eprintln!("{}", untrained_warning(&rec.heads.config.provenance));
    }
    if done > 0 {
        eprintln!(
            "resuming {}: {done} of {total} users done, continuing after line {start}",
            a.output.display()
        );
    }
    let bar = ProgressBar::new(total).with_position(done);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} users  {per_sec}  ETA {eta}").unwrap(),
    );
    let (mut scored, mut skipped) = (0usize, 0usize);
    let mut each_record = |w: &mut dyn FnMut(usize, Option<&[u8]>) -> Result<()>| -> Result<()> {
        for line in jsonl::open(&a.input)? {
            let line = line.with_context(|| format!("cannot read {}", a.input.display()))?;
            if line.number <= start || !a.shard.takes(line.number) {
                continue;
            }
            match score_line(&mut rec, &line, settings) {
                Ok(json) => {
                    w(line.number, Some(json.as_bytes()))?;
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
                    w(line.number, None)?;
                    skipped += 1;
                }
            }
            bar.inc(1);
        }
        Ok(())
    };
    match out.as_mut() {
        Some(o) => each_record(&mut |n, r| o.record(n, r))?,
        // A device or FIFO: written through as records come.
        None => fsutil::write_atomic(&a.output, |w| {
            each_record(&mut |_, r| {
                if let Some(r) = r {
                    w.write_all(r)?;
                    w.write_all(b"\n")?;
                    w.flush()?;
                }
                Ok(())
            })
        })?,
    }
    if let Some(o) = out {
        o.finish()?;
    }
    bar.finish_and_clear();
    eprintln!(
        "scored {scored} users, skipped {skipped} malformed lines{}; wrote {}",
        match done {
            0 => String::new(),
            d => format!(" ({d} done by an earlier run)"),
        },
        a.output.display()
    );
    if scored == 0 && skipped > 0 {
        bail!("no line of {} could be scored", a.input.display());
    }
    Ok(())
}

/// What names a run for `--resume`: the input's and bundle's contents, the shard, and every
/// setting that changes a record (threads and the cache folder do not).
fn run_key(a: &ScoreArgs, s: ScoreSettings) -> Result<serde_json::Value> {
    let r = &a.runtime;
    Ok(serde_json::json!({
        "input_sha256": fsutil::sha256_file(&a.input)?,
        "bundle_manifest_sha256": fsutil::sha256_file(&a.bundle.join("manifest.json"))?,
        "model": r.model,
        "shard": a.shard.to_string(),
        "settings": s,
        "max_history": r.max_history,
        "missing_image": format!("{:?}", r.missing_image),
        "description_tokens": r.description_tokens,
        "ctx": r.n_ctx,
        "kv_f32": r.kv_f32,
        "flash_attn": format!("{:?}", r.flash_attn),
        "prefix_cache": !r.no_prefix_cache,
    }))
}

fn score_line(rec: &mut Recommender, line: &jsonl::Line, s: ScoreSettings) -> Result<String> {
    let u: ScoreLine = line
        .parse()
        .context("not a valid user line (needs \"history\": [ids])")?;
    Ok(serde_json::to_string(&batch::score_user(rec, &u, s)?)?)
}
