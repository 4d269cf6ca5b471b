//! The evaluation protocol: leave-one-out, 1 target + 100 negatives per user, rank 0 = best with
//! ties broken against the target, HR@k and NDCG@k; plus the reference rankers (popularity,
//! random) and the resumable per-user ranks file.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::Path;

/// One user of a split: the interactions before the target, the target and its negatives.
#[derive(Deserialize, Clone, Debug)]
pub struct Case {
    pub user: serde_json::Value,
    pub history: Vec<u64>,
    pub target: u64,
    pub negatives: Vec<u64>,
}

impl Case {
    /// The user as a stable string key (for the ranks file).
    pub fn key(&self) -> String {
        self.user.to_string()
    }

    /// Target first, then the negatives.
    pub fn candidates(&self) -> Vec<u64> {
        std::iter::once(self.target)
            .chain(self.negatives.iter().copied())
            .collect()
    }
}

/// Reads `<dataset>/<split>.jsonl`.
pub fn load_split(dataset: &Path, split: &str) -> Result<Vec<Case>> {
    let path = dataset.join(format!("{split}.jsonl"));
    let text = crate::store::fsutil::read_regular_string(&path).with_context(|| {
        format!(
            "cannot read {} (is {} a prepared dataset?)",
            path.display(),
            dataset.display()
        )
    })?;
    let mut cases = Vec::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let case: Case = serde_json::from_str(line)
            .with_context(|| format!("{} line {}: not a valid case", path.display(), n + 1))?;
        if case.history.is_empty() || case.negatives.is_empty() {
            bail!(
                "{} line {}: empty history or no negatives",
                path.display(),
                n + 1
            );
        }
        cases.push(case);
    }
    Ok(cases)
}

/// Rank of the target among the candidates: the number of negatives scoring at least as high
/// (ties count against the target). A missing score (`None`) is the lowest possible score.
pub fn rank_of_target(target: Option<f32>, negatives: &[Option<f32>]) -> usize {
    let t = target.unwrap_or(f32::NEG_INFINITY);
    negatives
        .iter()
        .filter(|s| s.unwrap_or(f32::NEG_INFINITY) >= t)
        .count()
}

/// Ranking metrics over users.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Metrics {
    pub n_users: usize,
    #[serde(rename = "hr@1")]
    pub hr1: f64,
    #[serde(rename = "hr@5")]
    pub hr5: f64,
    #[serde(rename = "hr@10")]
    pub hr10: f64,
    #[serde(rename = "ndcg@5")]
    pub ndcg5: f64,
    #[serde(rename = "ndcg@10")]
    pub ndcg10: f64,
    pub mrr: f64,
}

impl Metrics {
    pub fn from_ranks(ranks: &[usize]) -> Self {
        let n = ranks.len().max(1) as f64;
        let hr = |k: usize| ranks.iter().filter(|&&r| r < k).count() as f64 / n;
        let ndcg = |k: usize| {
            ranks
                .iter()
                .filter(|&&r| r < k)
                .map(|&r| 1.0 / ((r + 2) as f64).log2())
                .sum::<f64>()
                / n
        };
        Self {
            n_users: ranks.len(),
            hr1: hr(1),
            hr5: hr(5),
            hr10: hr(10),
            ndcg5: ndcg(5),
            ndcg10: ndcg(10),
            mrr: ranks.iter().map(|&r| 1.0 / (r + 1) as f64).sum::<f64>() / n,
        }
    }
}

/// Interaction counts per item in `<dataset>/train.jsonl` (the popularity ranker's scores).
pub fn popularity(dataset: &Path) -> Result<HashMap<u64, f32>> {
    #[derive(Deserialize)]
    struct Train {
        items: Vec<u64>,
    }
    let path = dataset.join("train.jsonl");
    let text = crate::store::fsutil::read_regular_string(&path)?;
    let mut counts = HashMap::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let t: Train = serde_json::from_str(line)
            .with_context(|| format!("{} line {}: not a valid row", path.display(), n + 1))?;
        for id in t.items {
            *counts.entry(id).or_insert(0.0) += 1.0;
        }
    }
    Ok(counts)
}

/// A seeded pseudo-random score for (user, item): the random ranker.
pub fn random_score(seed: u64, user: &str, item: u64) -> f32 {
    let mut h: u64 = seed ^ 0xcbf2_9ce4_8422_2325;
    for b in user.bytes().chain(item.to_le_bytes()) {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    (h >> 40) as f32 / (1u64 << 24) as f32
}

/// One line of the ranks file.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct RankLine {
    pub user: String,
    pub target: u64,
    pub rank: usize,
}

/// The per-user ranks file: appended and flushed after every user, so an interrupted run loses
/// nothing that finished.
pub struct RanksFile {
    file: std::fs::File,
    pub done: Vec<RankLine>,
}

impl RanksFile {
    /// Opens `path`; with `resume` the finished users are read back (a partial last line from an
    /// interruption is dropped), otherwise the file starts empty.
    pub fn open(path: &Path, resume: bool) -> Result<Self> {
        let mut done = Vec::new();
        if resume && path.exists() {
            let text = crate::store::fsutil::read_regular_string(path)?;
            let mut good_len = 0;
            for line in text.split_inclusive('\n') {
                match (
                    line.ends_with('\n'),
                    serde_json::from_str::<RankLine>(line.trim_end()),
                ) {
                    (true, Ok(r)) => {
                        done.push(r);
                        good_len += line.len();
                    }
                    _ => break,
                }
            }
            let file = std::fs::OpenOptions::new().write(true).open(path)?;
            file.set_len(good_len as u64)?;
        } else if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .truncate(false)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        if !resume {
            file.set_len(0)?;
        }
        Ok(Self { file, done })
    }

    pub fn done_users(&self) -> HashSet<String> {
        self.done.iter().map(|r| r.user.clone()).collect()
    }

    pub fn append(&mut self, line: RankLine) -> Result<()> {
        writeln!(self.file, "{}", serde_json::to_string(&line)?)?;
        self.file.flush()?;
        self.done.push(line);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_are_pessimistic_about_ties() {
        assert_eq!(rank_of_target(Some(1.0), &[Some(0.5), Some(0.2)]), 0);
        assert_eq!(
            rank_of_target(Some(1.0), &[Some(1.0), Some(0.2)]),
            1,
            "a tie counts against the target"
        );
        assert_eq!(
            rank_of_target(Some(0.0), &[Some(1.0), Some(2.0), Some(-1.0)]),
            2
        );
        assert_eq!(
            rank_of_target(None, &[None, Some(-5.0)]),
            2,
            "an unscorable target is last"
        );
        assert_eq!(rank_of_target(Some(-5.0), &[None, None]), 0);
    }

    #[test]
    fn metrics_by_hand() {
        // Ranks 0, 4, 5: HR@1 = 1/3, HR@5 = 2/3 (rank 4 is the fifth place), HR@10 = 1.
        let m = Metrics::from_ranks(&[0, 4, 5]);
        assert_eq!(m.n_users, 3);
        assert!((m.hr1 - 1.0 / 3.0).abs() < 1e-12);
        assert!((m.hr5 - 2.0 / 3.0).abs() < 1e-12);
        assert!((m.hr10 - 1.0).abs() < 1e-12);
        // NDCG@5 = (1/log2(2) + 1/log2(6)) / 3; NDCG@10 adds 1/log2(7).
        let want5 = (1.0 + 1.0 / 6f64.log2()) / 3.0;
        assert!((m.ndcg5 - want5).abs() < 1e-12);
        assert!((m.ndcg10 - (want5 + 1.0 / 7f64.log2() / 3.0)).abs() < 1e-12);
        assert!((m.mrr - (1.0 + 1.0 / 5.0 + 1.0 / 6.0) / 3.0).abs() < 1e-12);
        let all_ties = rank_of_target(Some(0.0), &[Some(0.0); 100]);
        assert_eq!(
            Metrics::from_ranks(&[all_ties]).hr10,
            0.0,
            "a constant scorer scores nothing"
        );
    }

    #[test]
    fn random_scores_are_seeded() {
        assert_eq!(random_score(1, "u", 5), random_score(1, "u", 5));
        assert_ne!(random_score(1, "u", 5), random_score(2, "u", 5));
        assert!((0.0..1.0).contains(&random_score(3, "x", 9)));
    }

    #[test]
    fn ranks_file_resumes_after_a_partial_line() {
        let dir = std::env::temp_dir().join(format!("illmrec-ranks-{}", std::process::id()));
        let path = dir.join("ranks.jsonl");
        let mut f = RanksFile::open(&path, false).unwrap();
        f.append(RankLine {
            user: "1".into(),
            target: 3,
            rank: 0,
        })
        .unwrap();
        f.append(RankLine {
            user: "2".into(),
            target: 4,
            rank: 7,
        })
        .unwrap();
        drop(f);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(b"{\"user\": \"3\", \"tar");
        std::fs::write(&path, bytes).unwrap();
        let mut f = RanksFile::open(&path, true).unwrap();
        assert_eq!(f.done.len(), 2);
        f.append(RankLine {
            user: "3".into(),
            target: 5,
            rank: 1,
        })
        .unwrap();
        let lines = std::fs::read_to_string(&path).unwrap();
        assert_eq!(lines.lines().count(), 3, "{lines}");
        assert!(RanksFile::open(&path, false).unwrap().done.is_empty());
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "",
            "a fresh run starts empty"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
