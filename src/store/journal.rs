//! The kill-safe, resumable output of a batch run (`illmrec score`, the Python bindings'
//! `score_batch`): records appended in input-line order, committed through a journal.
//!
//! The output of a run is written as it goes to `OUT.partial` (whole records, appended) beside a
//! journal `OUT.journal`. The journal's first line names the run (input digest, shard and
//! settings); each further line `L E` says that every input line up to number `L` is done and
//! that their records are the first `E` bytes of the partial file. An entry is appended only
//! after the partial file is fsynced up to `E`, and the journal is fsynced after it, so after a
//! kill (or a power loss) the last whole entry always points at records that are on disk.
//! Resuming cuts the partial file back to that entry's `E` (dropping records written after the
//! last commit and any torn one) and continues at line `L + 1`: no finished user is lost, none is
//! written twice. When the last line is done the partial file is renamed to `OUT` in one step and
//! the journal removed; until then an earlier `OUT` stays untouched.

use crate::store::fsutil;
use anyhow::{ensure, Context, Result};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where an interrupted run continues: input lines up to `line` are done and their records are
/// the first `end` bytes of the partial file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ResumePoint {
    pub line: usize,
    pub end: u64,
}

/// Why a journal cannot be resumed.
#[derive(Debug, PartialEq, Eq)]
pub enum JournalError {
    /// No readable header: not a journal of ours.
    NotAJournal,
    /// The journal belongs to a run with another input or other settings.
    OtherRun { journal: String },
}

impl std::fmt::Display for JournalError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JournalError::NotAJournal => write!(f, "it is not an illmrec score journal"),
            JournalError::OtherRun { journal } => write!(
                f,
                "it belongs to a run with another input or other settings ({journal})"
            ),
        }
    }
}

impl std::error::Error for JournalError {}

/// The journal's first line for a run named by `key` (see [`ResumableOutput::open`]).
pub fn journal_header(key: &serde_json::Value) -> String {
    serde_json::json!({"format": "illmrec-score-journal", "version": 1, "run": key}).to_string()
}

/// The journal line for a commit.
pub fn journal_entry(p: ResumePoint) -> String {
    format!("{} {}", p.line, p.end)
}

/// Where a run continues, from its journal and the partial file's length: the last whole entry
/// whose records are all in the partial file (entries after a torn or unreadable line are not
/// trusted). A journal with no entry resumes at the start.
pub fn resume_point(
    journal: &[u8],
    key: &serde_json::Value,
    partial_len: u64,
) -> std::result::Result<ResumePoint, JournalError> {
    let mut lines = journal.split_inclusive(|&b| b == b'\n');
    let header = lines.next().ok_or(JournalError::NotAJournal)?;
    let header = header
        .strip_suffix(b"\n")
        .ok_or(JournalError::NotAJournal)?;
    let parsed: serde_json::Value =
        serde_json::from_slice(header).map_err(|_| JournalError::NotAJournal)?;
    if parsed.get("format").and_then(|f| f.as_str()) != Some("illmrec-score-journal") {
        return Err(JournalError::NotAJournal);
    }
    if parsed.get("run") != Some(key) {
        return Err(JournalError::OtherRun {
            journal: parsed.get("run").map(|r| r.to_string()).unwrap_or_default(),
        });
    }
    let mut point = ResumePoint::default();
    for line in lines {
        let Some(entry) = line.strip_suffix(b"\n").and_then(parse_entry) else {
            break;
        };
        if entry.line < point.line || entry.end < point.end || entry.end > partial_len {
            break;
        }
        point = entry;
    }
    Ok(point)
}

fn parse_entry(bytes: &[u8]) -> Option<ResumePoint> {
    let text = std::str::from_utf8(bytes).ok()?;
    let (line, end) = text.split_once(' ')?;
    Some(ResumePoint {
        line: line.parse().ok()?,
        end: end.parse().ok()?,
    })
}

/// `path` with `suffix` added to its file name.
fn with_suffix(path: &Path, suffix: &str) -> Result<PathBuf> {
    let mut name = path
        .file_name()
        .with_context(|| format!("{} is not a file path", path.display()))?
        .to_os_string();
    name.push(suffix);
    Ok(path.with_file_name(name))
}

/// The partial file and journal that a run writing `out` keeps until it finishes.
pub fn work_files(out: &Path) -> Result<(PathBuf, PathBuf)> {
    Ok((with_suffix(out, ".partial")?, with_suffix(out, ".journal")?))
}

/// Whether the output `out` of a batch is finished: it exists as a regular file and no run of
/// it was left unfinished (no journal, no partial file beside it). `--resume` then has nothing
/// to continue.
pub fn is_finished(out: &Path) -> Result<bool> {
    let out = fsutil::regular_output(out)?;
    let (partial, journal) = work_files(&out)?;
    Ok(out.is_file() && !partial.exists() && !journal.exists())
}

/// How often finished records are made durable (and so survive a kill without being redone).
pub const COMMIT_EVERY: Duration = Duration::from_secs(1);

/// The kill-safe output of a batch (see the module doc). Records are appended with
/// [`ResumableOutput::record`] in input-line order; [`ResumableOutput::finish`] puts the result in
/// place. Memory does not grow with the number of records.
pub struct ResumableOutput {
    out: PathBuf,
    partial_path: PathBuf,
    journal_path: PathBuf,
    partial: File,
    journal: File,
    /// Durable point (journaled).
    committed: ResumePoint,
    /// Written point (may be ahead of the journal).
    written: ResumePoint,
    last_commit: Instant,
}

impl ResumableOutput {
    /// Opens the output `out` for the run named by `key` (anything that changes the records:
    /// input digest, shard, settings). With `resume`, an interrupted run with the same key
    /// continues where its journal says ([`ResumableOutput::resume_point`]); a journal of another
    /// run is an error. Without `resume`, any earlier partial output is discarded. Two runs on
    /// the same output at once are refused (the journal is locked).
    pub fn open(out: &Path, key: &serde_json::Value, resume: bool) -> Result<Self> {
        let out = fsutil::regular_output(out)?;
        let (partial_path, journal_path) = work_files(&out)?;
        let Some(mut journal) = fsutil::lock_path(&journal_path, false)? else {
            anyhow::bail!(
                "another run is writing {} (its journal {} is locked)",
                out.display(),
                journal_path.display()
            );
        };
        let partial = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&partial_path)
            .with_context(|| format!("cannot open {}", partial_path.display()))?;
        let mut point = ResumePoint::default();
        let header = journal_header(key);
        if resume {
            let bytes = std::fs::read(&journal_path)?;
            if !bytes.is_empty() {
                let len = partial.metadata()?.len();
                point = resume_point(&bytes, key, len).map_err(|e| {
                    anyhow::anyhow!(
                        "cannot resume from {}: {e}; run without --resume to start over",
                        journal_path.display()
                    )
                })?;
            }
        }
        if point == ResumePoint::default() {
            // A fresh journal: header only.
            journal.set_len(0)?;
            journal.write_all(format!("{header}\n").as_bytes())?;
            journal.sync_data()?;
        }
        partial.set_len(point.end)?;
        partial.sync_data()?;
        use std::io::Seek;
        let mut partial = partial;
        partial.seek(std::io::SeekFrom::Start(point.end))?;
        journal.seek(std::io::SeekFrom::End(0))?;
        Ok(Self {
            out,
            partial_path,
            journal_path,
            partial,
            journal,
            committed: point,
            written: point,
            last_commit: Instant::now(),
        })
    }

    /// Where this run starts: input lines up to `line` were done by an earlier run.
    pub fn resume_point(&self) -> ResumePoint {
        self.committed
    }

    /// Records input line `number` as done, with its record (`None` for a skipped line); commits
    /// when [`COMMIT_EVERY`] has passed since the last commit.
    pub fn record(&mut self, number: usize, record: Option<&[u8]>) -> Result<()> {
        ensure!(
            number > self.written.line,
            "line {number} comes after line {} in this output",
            self.written.line
        );
        if let Some(bytes) = record {
            ensure!(!bytes.contains(&b'\n'), "a record must be a single line");
            let mut buf = Vec::with_capacity(bytes.len() + 1);
            buf.extend_from_slice(bytes);
            buf.push(b'\n');
            self.partial
                .write_all(&buf)
                .with_context(|| format!("cannot write {}", self.partial_path.display()))?;
            self.written.end += buf.len() as u64;
        }
        self.written.line = number;
        if self.last_commit.elapsed() >= COMMIT_EVERY {
            self.commit()?;
        }
        Ok(())
    }

    /// Makes every record written so far durable: fsyncs the partial file, then appends and
    /// fsyncs a journal entry.
    pub fn commit(&mut self) -> Result<()> {
        if self.written != self.committed {
            self.partial.sync_data()?;
            self.journal
                .write_all(format!("{}\n", journal_entry(self.written)).as_bytes())?;
            self.journal.sync_data()?;
            self.committed = self.written;
        }
        self.last_commit = Instant::now();
        Ok(())
    }

    /// Puts the records in place of the output (one rename) and removes the journal.
    pub fn finish(mut self) -> Result<PathBuf> {
        self.commit()?;
        std::fs::rename(&self.partial_path, &self.out).with_context(|| {
            format!(
                "cannot move {} to {}",
                self.partial_path.display(),
                self.out.display()
            )
        })?;
        fsutil::sync_parent(&self.out);
        std::fs::remove_file(&self.journal_path)
            .with_context(|| format!("cannot remove {}", self.journal_path.display()))?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn resume_point_takes_the_last_whole_entry_on_disk() {
        let key = json!({"input": "abc", "shard": "0/1"});
        let head = journal_header(&key) + "\n";
        let j = |rest: &str| format!("{head}{rest}").into_bytes();
        let p = |line, end| ResumePoint { line, end };
        assert_eq!(resume_point(&j(""), &key, 0), Ok(p(0, 0)));
        assert_eq!(resume_point(&j("3 120\n7 300\n"), &key, 300), Ok(p(7, 300)));
        // A torn last entry is ignored.
        assert_eq!(resume_point(&j("3 120\n7 30"), &key, 300), Ok(p(3, 120)));
        // An entry pointing past the partial file's end (its records never reached the disk).
        assert_eq!(resume_point(&j("3 120\n7 300\n"), &key, 200), Ok(p(3, 120)));
        // Garbage stops the scan; going backwards too.
        assert_eq!(
            resume_point(&j("3 120\nxx\n9 400\n"), &key, 900),
            Ok(p(3, 120))
        );
        assert_eq!(resume_point(&j("3 120\n2 130\n"), &key, 900), Ok(p(3, 120)));
        assert!(matches!(
            resume_point(&j("3 120\n"), &json!({"input": "other"}), 900),
            Err(JournalError::OtherRun { .. })
        ));
        assert_eq!(
            resume_point(b"hello\n", &key, 0),
            Err(JournalError::NotAJournal)
        );
        assert_eq!(
            resume_point(head.trim_end().as_bytes(), &key, 0),
            Err(JournalError::NotAJournal),
            "a torn header"
        );
    }

    #[test]
    fn output_resumes_without_losing_or_repeating_a_record() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("ranked.jsonl");
        std::fs::write(&out, "previous\n").unwrap();
        let key = json!({"run": 1});
        let mut o = ResumableOutput::open(&out, &key, false).unwrap();
        o.record(1, Some(b"{\"a\":1}")).unwrap();
        o.record(2, None).unwrap();
        o.record(4, Some(b"{\"a\":4}")).unwrap();
        o.commit().unwrap();
        o.record(5, Some(b"{\"a\":5}")).unwrap(); // written, not committed: redone on resume
        assert!(o.record(5, None).is_err(), "lines go forward");
        drop(o); // as if killed
        let (partial, journal) = work_files(&out).unwrap();
        // A torn record after the last commit.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&partial)
            .unwrap();
        f.write_all(b"{\"a\":").unwrap();
        drop(f);
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "previous\n");
        let e = ResumableOutput::open(&out, &json!({"run": 2}), true)
            .err()
            .unwrap();
        assert!(format!("{e:#}").contains("another input"), "{e:#}");
        let mut o = ResumableOutput::open(&out, &key, true).unwrap();
        assert_eq!(o.resume_point().line, 4);
        o.record(5, Some(b"{\"a\":5}")).unwrap();
        o.record(6, Some(b"{\"a\":6}")).unwrap();
        assert_eq!(o.finish().unwrap(), out);
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "{\"a\":1}\n{\"a\":4}\n{\"a\":5}\n{\"a\":6}\n"
        );
        assert!(!partial.exists() && !journal.exists());
        // Without --resume an unfinished run is discarded.
        let mut o = ResumableOutput::open(&out, &key, false).unwrap();
        o.record(1, Some(b"x")).unwrap();
        o.commit().unwrap();
        drop(o);
        let o = ResumableOutput::open(&out, &key, false).unwrap();
        assert_eq!(o.resume_point(), ResumePoint::default());
        assert_eq!(std::fs::metadata(&partial).unwrap().len(), 0);
    }

    #[test]
    fn a_second_writer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("o.jsonl");
        let _first = ResumableOutput::open(&out, &json!(1), false).unwrap();
        let e = ResumableOutput::open(&out, &json!(1), true).err().unwrap();
        assert!(format!("{e:#}").contains("another run"), "{e:#}");
    }
}
