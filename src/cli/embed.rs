//! `illmrec embed`: the final hidden state at `[REC]` for every history of a JSON-lines file, as a
//! `.npy` matrix (row k = the k-th non-blank line), plus on request the per-modality user vectors.
//!
//! Input lines are the `score` format (`{"history": [ids], ...}`; other fields are ignored, so
//! training windows can carry their target). With `--prefixes`, a line of n items gives n rows,
//! the states of its prefixes (1, 2, …, n items), decoding the shared items once. The run is
//! resumable: rows go to `OUT.partial` and are synced every few seconds; re-running the same
//! command continues after the last whole line.

use super::RuntimeArgs;
use anyhow::{bail, Context, Result};
use clap::Args;
use illmrec::jsonl::{self, HistoryLine};
use illmrec::npy::RowWriter;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct EmbedArgs {
    /// The bundle folder (its adaptor and `[REC]` vector shape the prompt).
    #[arg(long, value_name = "DIR")]
    bundle: PathBuf,
    #[command(flatten)]
    runtime: RuntimeArgs,
    /// JSON-lines input, one history per line.
    #[arg(long, value_name = "FILE")]
    input: PathBuf,
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
    // First pass: every line parses, and how many rows each gives.
    let mut per_line = Vec::new();
    for line in jsonl::open(&a.input)? {
        let line = line.with_context(|| format!("cannot read {}", a.input.display()))?;
        let h: HistoryLine = line.parse().with_context(|| {
            format!(
                "{}:{}: not a valid history line (needs \"history\": [ids])",
                a.input.display(),
                line.number
            )
        })?;
        per_line.push(if a.prefixes { h.history.len() } else { 1 });
    }
    let n: usize = per_line.iter().sum();
    if n == 0 {
        bail!("{} has no history lines", a.input.display());
    }
    let mut rec = super::open_recommender(&a.bundle, a.runtime.options())?;
    let n_embd = rec.model().n_embd();
    let user_cols = rec.modalities().len() * rec.heads.config.proj_dim;
    let mut hidden = RowWriter::open(&a.output, n, n_embd, !a.restart)?;
    let mut user = match a.user_vectors {
        true => Some(RowWriter::open(
            &user_path(&a.output),
            n,
            user_cols,
            !a.restart,
        )?),
        false => None,
    };
    // Resume after the last line whose rows are all in both files.
    let have = user
        .as_ref()
        .map_or(hidden.done(), |u| u.done().min(hidden.done()));
    let (mut lines_done, mut rows_done) = (0, 0);
    while lines_done < per_line.len() && rows_done + per_line[lines_done] <= have {
        rows_done += per_line[lines_done];
        lines_done += 1;
    }
    hidden.truncate(rows_done)?;
    if let Some(u) = user.as_mut() {
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
    for line in jsonl::open(&a.input)?.skip(lines_done) {
        let line = line.with_context(|| format!("cannot read {}", a.input.display()))?;
        let result = (|| -> Result<usize> {
            let h: HistoryLine = line.parse()?;
            if a.prefixes {
                let states = rec.encode_prefixes(&h.history)?;
                for state in &states {
                    hidden.push(state)?;
                    if let Some(w) = user.as_mut() {
                        w.push(&rec.user_vectors(state)?.concat())?;
                    }
                }
                Ok(states.len())
            } else {
                let u = rec.encode_user(&h.history)?;
                hidden.push(&u.hidden)?;
                if let Some(w) = user.as_mut() {
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
                if let Some(w) = user.as_mut() {
                    w.sync()?;
                }
                return Err(e.context(format!(
                    "{}:{} (the lines before it are kept; fix it and re-run to continue)",
                    a.input.display(),
                    line.number
                )));
            }
        }
        if last_sync.elapsed() > Duration::from_secs(5) {
            hidden.sync()?;
            if let Some(w) = user.as_mut() {
                w.sync()?;
            }
            last_sync = Instant::now();
        }
    }
    bar.finish_and_clear();
    if let Some(w) = user {
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
