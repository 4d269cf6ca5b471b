//! `illmrec embed`: the final hidden state at `[REC]` for every history of a JSON-lines file, as a
//! `.npy` matrix (row k = the k-th non-blank line), plus on request the per-modality user vectors.
//!
//! Input lines are the `score` format (`{"history": [ids], ...}`; other fields are ignored, so
//! training windows can carry their target). With `--prefixes`, a line of n items gives n rows,
//! the states of its prefixes (1, 2, …, n items), decoding the shared items once. The run is
//! resumable: rows go to `OUT.partial` and are synced every few seconds; re-running the same
//! command continues after the last whole line.

use super::UsersFileArgs;
use anyhow::{bail, Context, Result};
use clap::Args;
use illmrec::store::jsonl::{self, HistoryLine};
use illmrec::store::npy::RowWriter;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct EmbedArgs {
    /// The bundle, and the input: one history per line. `--batch-users` does not combine with
    /// `--prefixes`, whose windows already decode up to 16 prefixes together.
    #[command(flatten)]
    users: UsersFileArgs,
    /// Output `.npy`: float32 [lines, n_embd], the LLM's final-norm hidden state at `[REC]`.
    #[arg(long, value_name = "FILE")]
    output: PathBuf,
    /// Also write the user vectors f_u_m(h) of every scored modality, concatenated in the
    /// bundle's modality order, to `<output stem>.user.npy` (float32 [lines, modalities × proj_dim]).
    #[arg(long)]
    user_vectors: bool,
    /// One row per prefix of each history (its first 1, 2, …, n items) instead of one per line;
    /// the shared items are decoded once (about 4× cheaper per row for 10-item lines).
    #[arg(long)]
    prefixes: bool,
    /// Start over instead of continuing an interrupted run.
    #[arg(long)]
    restart: bool,
}

fn user_path(output: &Path) -> PathBuf {
    let stem = output.file_stem().unwrap_or_default().to_string_lossy();
    output.with_file_name(format!("{stem}.user.npy"))
}

pub fn run(a: EmbedArgs) -> Result<()> {
    let per_call = match a.prefixes {
        true => 1,
        false => a.users.batch.per_call()?,
    };
    // First pass: every line parses, and how many rows each gives.
    let mut per_line = Vec::new();
    for line in jsonl::open(&a.users.input)? {
        let line = line.with_context(|| format!("cannot read {}", a.users.input.display()))?;
        let h: HistoryLine = line.parse().with_context(|| {
            format!(
                "{}:{}: not a valid history line (needs \"history\": [ids])",
                a.users.input.display(),
                line.number
            )
        })?;
        per_line.push(if a.prefixes { h.history.len() } else { 1 });
    }
    let n: usize = per_line.iter().sum();
    if n == 0 {
        bail!("{} has no history lines", a.users.input.display());
    }
    let mut rec = a.users.bundle.open()?;
    let n_embd = rec.model().n_embd();
    let user_cols = rec.modalities().len() * rec.heads.config.proj_dim;
    let mut hidden = RowWriter::open(&a.output, n, n_embd, !a.restart)?;
    let mut user_writer = match a.user_vectors {
        true => Some(RowWriter::open(
            &user_path(&a.output),
            n,
            user_cols,
            !a.restart,
        )?),
        false => None,
    };
    // Resume after the last line whose rows are all in both files.
    let have = user_writer
        .as_ref()
        .map_or(hidden.done(), |u| u.done().min(hidden.done()));
    let (mut lines_done, mut rows_done) = (0, 0);
    while lines_done < per_line.len() && rows_done + per_line[lines_done] <= have {
        rows_done += per_line[lines_done];
        lines_done += 1;
    }
    hidden.truncate(rows_done)?;
    if let Some(u) = user_writer.as_mut() {
        u.truncate(rows_done)?;
    }
    if rows_done > 0 {
        eprintln!(
            "resuming {} at line {} of {} (row {rows_done} of {n})",
            a.output.display(),
            lines_done + 1,
            per_line.len()
        );
    }
    let bar = ProgressBar::new(n as u64).with_position(rows_done as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} states  {per_sec}  ETA {eta}").unwrap(),
    );
    let mut last_sync = Instant::now();
    // Lines are taken `per_call` at a time (one with --prefixes); a group's rows are written in
    // line order, and a bad line stops the run after the rows of the lines before it.
    let lines = jsonl::open(&a.users.input)?.skip(lines_done);
    let mut group: Vec<jsonl::Line> = Vec::new();
    let mut lines = lines.peekable();
    while lines.peek().is_some() {
        group.clear();
        while group.len() < per_call {
            match lines.next() {
                Some(line) => group.push(
                    line.with_context(|| format!("cannot read {}", a.users.input.display()))?,
                ),
                None => break,
            }
        }
        let parsed: Vec<Result<HistoryLine>> = group.iter().map(|l| l.parse()).collect();
        let encoded = match a.prefixes {
            true => Vec::new(),
            false => {
                let histories: Vec<&[u64]> = parsed
                    .iter()
                    .map(|h| h.as_ref().map_or(&[][..], |h| h.history.as_slice()))
                    .collect();
                rec.encode_users(&histories, per_call)
            }
        };
        let mut encoded = encoded.into_iter();
        for (line, h) in group.iter().zip(parsed) {
            let user = encoded.next();
            let result = (|| -> Result<usize> {
                let h = h?;
                if a.prefixes {
                    let states = rec.encode_prefixes(&h.history)?;
                    for state in &states {
                        hidden.push(state)?;
                        if let Some(w) = user_writer.as_mut() {
                            w.push(&rec.user_vectors(state)?.concat())?;
                        }
                    }
                    Ok(states.len())
                } else {
                    let u = user.expect("one encoded user per line")?;
                    hidden.push(&u.hidden)?;
                    if let Some(w) = user_writer.as_mut() {
                        w.push(&u.vectors.concat())?;
                    }
                    Ok(1)
                }
            })();
            match result {
                Ok(rows) => bar.inc(rows as u64),
                Err(e) => {
                    bar.abandon();
                    hidden.sync()?;
                    if let Some(w) = user_writer.as_mut() {
                        w.sync()?;
                    }
                    return Err(e.context(format!(
                        "{}:{} (the lines before it are kept; fix it and re-run to continue)",
                        a.users.input.display(),
                        line.number
                    )));
                }
            }
        }
        if last_sync.elapsed() > Duration::from_secs(5) {
            hidden.sync()?;
            if let Some(w) = user_writer.as_mut() {
                w.sync()?;
            }
            last_sync = Instant::now();
        }
    }
    bar.finish_and_clear();
    if let Some(w) = user_writer {
        w.finish()?;
        eprintln!("wrote {}", user_path(&a.output).display());
    }
    hidden.finish()?;
    eprintln!(
        "wrote {} ({n} × {n_embd} float32 hidden states)",
        a.output.display()
    );
    Ok(())
}
