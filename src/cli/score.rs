//! `illmrec score`: batch scoring of a JSON-lines file of users, streamed line by line.
//!
//! Input lines: `{"user": <any>, "history": [ids], "candidates": [ids]?, "top_k": n?}`.
//! Output lines: `{"history_used": [ids], "items": [{"rank", "id", "score", "title", "year",
//! "genres"}...], "user": <same>}` (the field names of `recommend --json` and the HTTP API).
//! A line that cannot be scored (not UTF-8, not JSON, an unknown id, an empty history, ...) gets
//! `{"line": n, "error": "..."}` in its place, as `POST /v1/score` writes it, is reported on
//! stderr with its number and kind, and counted by kind; `--max-errors N` stops the run with a
//! non-zero exit past N such lines (the policy `embed` shares). Records are written as they are made through the library's resumable
//! output (`illmrec::recommender::batch`): `--resume` continues a killed run, `--shard I/N` takes every N-th
//! line. Memory is bounded by the longest line.

use super::{messages, UsersFileArgs};
use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use illmrec::recommender::batch::{self, BadLines, LineErrorKind, ScoreSettings, Shard};
use illmrec::store::fsutil;
use illmrec::store::journal::ResumableOutput;
use illmrec::store::jsonl::{self, ScoreLine};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;

/// Where records go: `(input line number, record)`.
type Sink<'a> = dyn FnMut(usize, &[u8]) -> Result<()> + 'a;

#[derive(Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    users: UsersFileArgs,
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
    let per_call = a.users.batch.per_call()?;
    let settings = ScoreSettings {
        top_k: a.top_k,
        include_seen: a.include_seen,
    };
    let (partial, journal) = illmrec::store::journal::work_files(&a.output)?;
    for out in [&a.output, &partial, &journal] {
        fsutil::refuse_input_as_output(out, "--output", &[&a.users.input])?;
    }
    let special = fsutil::is_special_output(&a.output)?;
    if a.resume && !special && illmrec::store::journal::is_finished(&a.output)? {
        eprintln!(
            "{} is complete: there is no interrupted run to resume (no {}); nothing to do. Run without --resume to score again.",
            a.output.display(),
            journal.display()
        );
        return Ok(());
    }
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
    for line in jsonl::open(&a.users.input)? {
        let line = line.with_context(|| format!("cannot read {}", a.users.input.display()))?;
        if a.shard.takes(line.number) {
            total += 1;
            done += (line.number <= start) as u64;
        }
    }
    let mut rec = a.users.bundle.open()?;
    if !rec.heads.config.trained {
        messages::untrained(&rec.heads.config.provenance);
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
    let mut scored = 0usize;
    let mut bad = BadLines::new(a.users.max_errors);
    let mut each_record = |w: &mut Sink| -> Result<()> {
        // Up to `per_call` taken lines are scored together, then written in line order.
        let mut pending: Vec<jsonl::Line> = Vec::new();
        let mut flush = |pending: &mut Vec<jsonl::Line>, w: &mut Sink| -> Result<()> {
            // A line that does not parse keeps its error; the others are scored together.
            let mut good: Vec<ScoreLine> = Vec::new();
            let mut parse_errors = Vec::new();
            for l in pending.iter() {
                match l.parse::<ScoreLine>() {
                    Ok(u) => {
                        good.push(u);
                        parse_errors.push(None);
                    }
                    Err(e) => parse_errors.push(Some(
                        e.context("not a valid user line (needs \"history\": [ids])"),
                    )),
                }
            }
            let mut records = batch::score_users(&mut rec, &good, settings, per_call).into_iter();
            for (line, parse_error) in pending.drain(..).zip(parse_errors) {
                let record = match parse_error {
                    Some(e) => Err((LineErrorKind::Malformed, e)),
                    None => records
                        .next()
                        .expect("one record per parsed line")
                        .and_then(|r| Ok((serde_json::to_string(&r)?, r.left_out)))
                        .map_err(|e| (LineErrorKind::of(&e), e)),
                };
                match record {
                    Ok((json, left_out)) => {
                        if !left_out.is_empty() {
                            bar.suspend(|| {
                                messages::warning(format_args!(
                                    "{}:{}: candidates {} have no feature in a scored modality: they cannot be ranked and are left out",
                                    a.users.input.display(),
                                    line.number,
                                    left_out.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
                                ))
                            });
                        }
                        w(line.number, json.as_bytes())?;
                        scored += 1;
                    }
                    Err((kind, e)) => {
                        bar.suspend(|| {
                            eprintln!(
                                "{}:{}: {kind} line: {} (an error record takes its place)",
                                a.users.input.display(),
                                line.number,
                                format!("{e:#}").replace('\n', " "),
                                kind = kind.describe(),
                            )
                        });
                        w(line.number, batch::error_record(line.number, &e).as_bytes())?;
                        bad.count(kind)?;
                    }
                }
                bar.inc(1);
            }
            Ok(())
        };
        for line in jsonl::open(&a.users.input)? {
            let line = line.with_context(|| format!("cannot read {}", a.users.input.display()))?;
            if line.number <= start || !a.shard.takes(line.number) {
                continue;
            }
            pending.push(line);
            if pending.len() == per_call {
                flush(&mut pending, w)?;
            }
        }
        flush(&mut pending, w)
    };
    match out.as_mut() {
        Some(o) => each_record(&mut |n, r| o.record(n, Some(r)))?,
        // A device or FIFO: written through as records come.
        None => fsutil::write_atomic(&a.output, |w| {
            each_record(&mut |_, r| {
                w.write_all(r)?;
                w.write_all(b"\n")?;
                w.flush()?;
                Ok(())
            })
        })?,
    }
    if let Some(o) = out {
        o.finish()?;
    }
    bar.finish_and_clear();
    eprintln!(
        "scored {scored} users; {} lines could not be scored ({}){}; wrote {}",
        bad.total(),
        bad.summary(),
        match done {
            0 => String::new(),
            d => format!(" ({d} done by an earlier run)"),
        },
        a.output.display()
    );
    if scored == 0 && bad.total() > 0 {
        bail!(
            "no line of {} could be scored ({})",
            a.users.input.display(),
            bad.summary()
        );
    }
    Ok(())
}

/// What names a run for `--resume`: the input's and bundle's contents, the shard, and every
/// setting that changes a record (threads and the cache folder do not).
fn run_key(a: &ScoreArgs, s: ScoreSettings) -> Result<serde_json::Value> {
    let r = &a.users.bundle.runtime;
    Ok(serde_json::json!({
        "input_sha256": fsutil::sha256_file(&a.users.input)?,
        "bundle_manifest_sha256": fsutil::sha256_file(&a.users.bundle.bundle.join("manifest.json"))?,
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
        "batch_users": a.users.batch.batch_users,
    }))
}
