//! `illmrec embed`: the final hidden state at `[REC]` for every history of a JSON-lines file, as a
//! `.npy` matrix (row k = the k-th non-blank line), plus on request the per-modality user vectors.
//!
//! Input lines are the `score` format (`{"history": [ids], ...}`; other fields are ignored, so
//! training windows can carry their target). With `--prefixes`, a line of n items gives n rows,
//! the states of its prefixes (1, 2, …, n items), decoding the shared items once. The run is
//! resumable: rows go to `OUT.partial` and are synced every few seconds; re-running the same
//! command continues after the last whole line.
//!
//! A line that cannot be embedded (malformed, an unknown item, ...) follows `score`'s policy:
//! it is reported on stderr with its number and kind and the run goes on, its row (its rows,
//! with `--prefixes`; none for a line that is not JSON) all NaN so that row k still belongs to
//! line k; `--max-errors N` stops the run with a non-zero exit past N such lines.

use super::{messages, UsersFileArgs};
use anyhow::{bail, Context, Result};
use clap::Args;
use illmrec::recommender::batch::{BadLines, LineErrorKind};
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
    let user_out = user_path(&a.output);
    for out in [&a.output, &user_out] {
        illmrec::store::fsutil::refuse_input_as_output(out, "--output", &[&a.users.input])?;
    }
    // First pass: how many rows each line gives (a line that does not parse: one NaN row, none
    // with --prefixes, since its length is unknown).
    let mut per_line = Vec::new();
    let mut parsed_lines = 0usize;
    for line in jsonl::open(&a.users.input)? {
        let line = line.with_context(|| format!("cannot read {}", a.users.input.display()))?;
        let rows = match line.parse::<HistoryLine>() {
            Ok(h) => {
                parsed_lines += 1;
                if a.prefixes {
                    h.history.len()
                } else {
                    1
                }
            }
            Err(_) => (!a.prefixes) as usize,
        };
        per_line.push(rows);
    }
    let n: usize = per_line.iter().sum();
    if n == 0 || parsed_lines == 0 {
        bail!("{} has no valid history lines", a.users.input.display());
    }
    let mut bad = BadLines::new(a.users.max_errors);
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
            let ordinal = lines_done;
            lines_done += 1;
            let malformed = h.is_err();
            let result = (|| -> Result<usize> {
                let h = h.context("not a valid history line (needs \"history\": [ids])")?;
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
                    let kind = match malformed {
                        true => LineErrorKind::Malformed,
                        false => LineErrorKind::of(&e),
                    };
                    let rows = per_line[ordinal];
                    bar.suspend(|| {
                        messages::warning(format_args!(
                            "{}:{}: {} line: {} (its {rows} row{} NaN)",
                            a.users.input.display(),
                            line.number,
                            kind.describe(),
                            format!("{e:#}").replace('\n', " "),
                            if rows == 1 { " is" } else { "s are" }
                        ))
                    });
                    for _ in 0..rows {
                        hidden.push(&vec![f32::NAN; n_embd])?;
                        if let Some(w) = user_writer.as_mut() {
                            w.push(&vec![f32::NAN; user_cols])?;
                        }
                    }
                    bar.inc(rows as u64);
                    if let Err(stop) = bad.count(kind) {
                        bar.abandon();
                        hidden.sync()?;
                        if let Some(w) = user_writer.as_mut() {
                            w.sync()?;
                        }
                        return Err(stop.context(format!(
                            "{}:{} (the rows before it are kept; fix the input and re-run to continue)",
                            a.users.input.display(),
                            line.number
                        )));
                    }
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
        "wrote {} ({n} × {n_embd} float32 hidden states; {} lines could not be embedded: {})",
        a.output.display(),
        bad.total(),
        bad.summary()
    );
    Ok(())
}
