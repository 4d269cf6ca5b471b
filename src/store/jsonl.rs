//! The one JSON-lines reader for user files (`score`, `embed`): streams the file line by line as
//! bytes, so memory stays bounded by the longest line, and a line that is not UTF-8 or not valid
//! JSON is an error for that line alone, reported with its number. Also the line formats those
//! files use ([`ScoreLine`], [`HistoryLine`]).

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

/// A `score` input line: `{"user": <any>, "history": [ids], "candidates": [ids]?, "top_k": n?}`.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct ScoreLine {
    #[serde(default)]
    pub user: serde_json::Value,
    pub history: Vec<u64>,
    #[serde(default)]
    pub candidates: Option<Vec<u64>>,
    #[serde(default)]
    pub top_k: Option<usize>,
}

/// An `embed` input line: `{"history": [ids], ...}` (other fields are ignored).
#[derive(Deserialize, Debug)]
pub struct HistoryLine {
    pub history: Vec<u64>,
}

/// Longest line accepted; a longer one is an error for that line (its bytes are skipped).
pub const MAX_LINE: usize = 16 << 20;

/// A non-blank line and its 1-based number.
pub struct Line {
    pub number: usize,
    pub bytes: Vec<u8>,
    too_long: bool,
}

impl Line {
    /// Parses the line as `T`, with a message that says why it could not.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T> {
        anyhow::ensure!(!self.too_long, "line is longer than {} MiB", MAX_LINE >> 20);
        let text = std::str::from_utf8(&self.bytes).context("line is not valid UTF-8")?;
        Ok(serde_json::from_str(text)?)
    }
}

/// The non-blank lines of a file (or of any buffered reader).
pub struct Lines<R = BufReader<File>> {
    reader: R,
    number: usize,
}

pub fn open(path: &Path) -> Result<Lines> {
    let file = crate::store::fsutil::open_regular(path)?;
    Ok(Lines::new(BufReader::with_capacity(1 << 16, file)))
}

impl<R: BufRead> Lines<R> {
    pub fn new(reader: R) -> Self {
        Self { reader, number: 0 }
    }
}

/// Number of non-blank lines (one streaming pass).
pub fn count(path: &Path) -> Result<usize> {
    let mut n = 0;
    for line in open(path)? {
        line.with_context(|| format!("cannot read {}", path.display()))?;
        n += 1;
    }
    Ok(n)
}

impl<R: BufRead> Iterator for Lines<R> {
    type Item = std::io::Result<Line>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let mut bytes = Vec::new();
            let mut too_long = false;
            // Read at most MAX_LINE bytes into memory; drain the rest of an overlong line.
            let n = match (&mut self.reader)
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut bytes)
            {
                Ok(n) => n,
                Err(e) => return Some(Err(e)),
            };
            if n == 0 {
                return None;
            }
            self.number += 1;
            if bytes.len() > MAX_LINE && bytes.last() != Some(&b'\n') {
                too_long = true;
                bytes.clear();
                loop {
                    let buf = match self.reader.fill_buf() {
                        Ok(b) => b,
                        Err(e) => return Some(Err(e)),
                    };
                    if buf.is_empty() {
                        break;
                    }
                    let (used, end) = match buf.iter().position(|&b| b == b'\n') {
                        Some(i) => (i + 1, true),
                        None => (buf.len(), false),
                    };
                    self.reader.consume(used);
                    if end {
                        break;
                    }
                }
            }
            if !too_long && bytes.iter().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            return Some(Ok(Line {
                number: self.number,
                bytes,
                too_long,
            }));
        }
    }
}

use std::io::Read as _;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_numbers_blanks_and_bad_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("u.jsonl");
        std::fs::write(&p, b"{\"a\": 1}\n\n  \n\xff\xfe\n{\"a\": 2}").unwrap();
        let lines: Vec<Line> = open(&p).unwrap().map(|l| l.unwrap()).collect();
        assert_eq!(
            lines.iter().map(|l| l.number).collect::<Vec<_>>(),
            vec![1, 4, 5]
        );
        let v: serde_json::Value = lines[0].parse().unwrap();
        assert_eq!(v["a"], 1);
        let err = lines[1].parse::<serde_json::Value>().unwrap_err();
        assert!(err.to_string().contains("UTF-8"), "{err}");
        assert_eq!(lines[2].parse::<serde_json::Value>().unwrap()["a"], 2);
        assert_eq!(count(&p).unwrap(), 3);
    }
}
