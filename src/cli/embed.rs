//! `illmrec embed`: the final hidden state at `[REC]` for every history of a JSON-lines file, as a
//! `.npy` matrix (row k = the k-th non-blank line), plus on request the per-modality user vectors.
//!
//! Input lines are the `score` format (`{"history": [ids], ...}`; other fields are ignored, so
//! training windows can carry their target). The run is resumable: rows go to `OUT.partial` and
//! are synced every few seconds; re-running the same command continues after the last whole row.

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
    /// Start over instead of continuing an interrupted run.
    #[arg(long)]
    restart: bool,
}

fn user_path(output: &Path) -> PathBuf {
    let stem = output.file_stem().unwrap_or_default().to_string_lossy();
    output.with_file_name(format!("{stem}.user.npy"))
}

pub fn run(a: EmbedArgs) -> Result<()> {
    let n = jsonl::count(&a.input)?;
    if n == 0 {
        bail!("{} has no history lines", a.input.display());
    }
    let mut rec = super::open_recommender(&a.bundle, a.runtime.options())?;
    let n_embd = rec.model().n_embd();
    let mut hidden = RowWriter::open(&a.output, n, n_embd, !a.restart)?;
    let user_cols = rec.modalities().len() * rec.heads.config.proj_dim;
    let mut user = match a.user_vectors {
        true => Some(RowWriter::open(
            &user_path(&a.output),
            n,
            user_cols,
            !a.restart,
        )?),
        false => None,
    };
    // Both files resume from the row both have.
    let start = user
        .as_ref()
        .map_or(hidden.done(), |u| u.done().min(hidden.done()));
    if hidden.done() != start {
        hidden = RowWriter::open(&a.output, n, n_embd, false)?;
    }
    if let Some(u) = user.as_mut().filter(|u| u.done() != start) {
        *u = RowWriter::open(&user_path(&a.output), n, user_cols, false)?;
    }
    let start = hidden.done();
    if start > 0 {
        eprintln!("resuming {} at row {start} of {n}", a.output.display());
    }
    let bar = ProgressBar::new(n as u64).with_position(start as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} histories  {per_sec}  ETA {eta}")
            .unwrap(),
    );
    let mut last_sync = Instant::now();
    for line in jsonl::open(&a.input)?.skip(start) {
        let line = line.with_context(|| format!("cannot read {}", a.input.display()))?;
        let result = (|| -> Result<()> {
            let h: HistoryLine = line
                .parse()
                .context("not a valid history line (needs \"history\": [ids])")?;
            let u = rec.encode_user(&h.history)?;
            hidden.push(&u.hidden)?;
            if let Some(w) = user.as_mut() {
                w.push(&u.vectors.concat())?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            bar.abandon();
            hidden.sync()?;
            if let Some(w) = user.as_mut() {
                w.sync()?;
            }
            return Err(e.context(format!(
                "{}:{} (rows before it are kept; fix the line and re-run to continue)",
                a.input.display(),
                line.number
            )));
        }
        bar.inc(1);
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
