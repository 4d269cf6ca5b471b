//! `illmrec eval`: the paper's protocol on a prepared dataset, for a bundle or a reference ranker.

use super::{messages, BatchArgs, RuntimeArgs};
use anyhow::{bail, ensure, Context, Result};
use clap::{Args, ValueEnum};
use illmrec::method::eval::{
    load_split, popularity, random_score, rank_of_target, Metrics, RankLine, RanksFile,
};
use illmrec::recommender::Recommender;
use illmrec::store::fsutil::write_atomic;
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Ranker {
    /// The bundle's LLM recommender.
    Llm,
    /// Interaction counts in the training split.
    Popularity,
    /// Seeded random scores.
    Random,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Split {
    Valid,
    Test,
}

#[derive(Args)]
pub struct EvalArgs {
    /// The bundle to evaluate (needed for --ranker llm).
    #[arg(long, value_name = "DIR")]
    bundle: Option<PathBuf>,
    /// A prepared dataset folder (valid.jsonl / test.jsonl / train.jsonl).
    #[arg(long, value_name = "DIR")]
    dataset: PathBuf,
    /// Which split's targets to rank.
    #[arg(long, value_enum, default_value_t = Split::Test)]
    split: Split,
    /// Who ranks the candidates.
    #[arg(long, value_enum, default_value_t = Ranker::Llm)]
    ranker: Ranker,
    /// Evaluate only the first N users.
    #[arg(long)]
    limit: Option<usize>,
    /// Seed of the random ranker.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Output folder for summary.json and ranks.jsonl [default: <dataset>/runs/<bundle or ranker>-<split>].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Continue an interrupted run from its ranks.jsonl.
    #[arg(long)]
    resume: bool,
    #[command(flatten)]
    runtime: RuntimeArgs,
    #[command(flatten)]
    batch: BatchArgs,
}

pub fn run(a: EvalArgs) -> Result<()> {
    let split = match a.split {
        Split::Valid => "valid",
        Split::Test => "test",
    };
    let mut cases = load_split(&a.dataset, split)?;
    if let Some(n) = a.limit {
        cases.truncate(n);
    }
    ensure!(!cases.is_empty(), "no users to evaluate");
    let name = match (a.ranker, &a.bundle) {
        (Ranker::Llm, Some(b)) => b
            .canonicalize()?
            .file_name()
            .map_or("bundle".into(), |n| n.to_string_lossy().into_owned()),
        (Ranker::Llm, None) => bail!("--ranker llm needs --bundle"),
        (r, _) => format!("{r:?}").to_lowercase(),
    };
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| a.dataset.join("runs").join(format!("{name}-{split}")));
    let mut ranks = RanksFile::open(&out.join("ranks.jsonl"), a.resume)?;
    let done = ranks.done_users();
    let todo: Vec<_> = cases.iter().filter(|c| !done.contains(&c.key())).collect();
    if a.resume {
        eprintln!("resuming: {} users done, {} to go", done.len(), todo.len());
    }

    let per_call = a.batch.per_call()?;
    let mut scorer = Scorer::new(&a)?;
    let bar = ProgressBar::new(todo.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} users  {per_sec}  ETA {eta}").unwrap(),
    );
    let started = Instant::now();
    for chunk in todo.chunks(per_call) {
        for (case, scores) in chunk.iter().zip(scorer.scores(chunk, per_call)?) {
            let rank = rank_of_target(scores[0], &scores[1..]);
            ranks.append(RankLine {
                user: case.key(),
                target: case.target,
                rank,
            })?;
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();

    let wanted: std::collections::HashSet<String> = cases.iter().map(|c| c.key()).collect();
    let all: Vec<usize> = ranks
        .done
        .iter()
        .filter(|r| wanted.contains(&r.user))
        .map(|r| r.rank)
        .collect();
    let metrics = Metrics::from_ranks(&all);
    let mut summary = serde_json::to_value(&metrics)?;
    let extra = serde_json::json!({
        "dataset": a.dataset.display().to_string(),
        "split": split,
        "ranker": format!("{:?}", a.ranker).to_lowercase(),
        "bundle": a.bundle.as_ref().map(|b| b.display().to_string()),
        "trained": scorer.trained(),
        "max_history": a.runtime.max_history,
        "missing_image": format!("{:?}", a.runtime.missing_image).to_lowercase(),
        "users_this_run": todo.len(),
        "users_per_second": if seconds > 0.0 { todo.len() as f64 / seconds } else { 0.0 },
    });
    summary
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    let text = serde_json::to_string_pretty(&summary)?;
    write_atomic(&out.join("summary.json"), |w| {
        Ok(w.write_all(text.as_bytes())?)
    })?;
    println!("{text}");
    eprintln!("wrote {}", out.display());
    Ok(())
}

enum Scorer {
    Llm(Box<Recommender>),
    Popularity(HashMap<u64, f32>),
    Random(u64),
}

impl Scorer {
    fn new(a: &EvalArgs) -> Result<Self> {
        Ok(match a.ranker {
            Ranker::Llm => {
                let bundle = a.bundle.as_ref().context("--ranker llm needs --bundle")?;
                let rec = super::open_recommender(bundle, a.runtime.options())?;
                if !rec.heads.config.trained {
                    messages::untrained(&rec.heads.config.provenance);
                }
                Scorer::Llm(Box::new(rec))
            }
            Ranker::Popularity => Scorer::Popularity(popularity(&a.dataset)?),
            Ranker::Random => Scorer::Random(a.seed),
        })
    }

    fn trained(&self) -> Option<bool> {
        match self {
            Scorer::Llm(rec) => Some(rec.heads.config.trained),
            _ => None,
        }
    }

    /// Scores of each case's candidates, target first; the LLM decodes `per_call` users together.
    fn scores(
        &mut self,
        cases: &[&illmrec::method::eval::Case],
        per_call: usize,
    ) -> Result<Vec<Vec<Option<f32>>>> {
        let candidates: Vec<Vec<u64>> = cases.iter().map(|c| c.candidates()).collect();
        Ok(match self {
            Scorer::Llm(rec) => {
                for (case, candidates) in cases.iter().zip(&candidates) {
                    if let Some(id) = case
                        .history
                        .iter()
                        .chain(candidates)
                        .find(|&&id| rec.catalog.get(id).is_none())
                    {
                        anyhow::bail!(
                            "user {}: item {id} is not in the bundle's catalog; a bundle is evaluated on a \
                             dataset prepared for its catalog (for the demo bundle: prepare --dataset \
                             ml-latest-small --min-item-ratings 20, see the README)",
                            case.key()
                        );
                    }
                }
                let histories: Vec<&[u64]> = cases.iter().map(|c| c.history.as_slice()).collect();
                let users = rec.encode_users(&histories, per_call);
                let mut out = Vec::new();
                for ((case, candidates), user) in cases.iter().zip(&candidates).zip(users) {
                    let user = user.with_context(|| format!("user {}", case.key()))?;
                    out.push(rec.score_items(&user, candidates)?);
                }
                out
            }
            Scorer::Popularity(counts) => candidates
                .iter()
                .map(|c| {
                    c.iter()
                        .map(|id| Some(counts.get(id).copied().unwrap_or(0.0)))
                        .collect()
                })
                .collect(),
            Scorer::Random(seed) => cases
                .iter()
                .zip(&candidates)
                .map(|(case, c)| {
                    c.iter()
                        .map(|&id| Some(random_score(*seed, &case.key(), id)))
                        .collect()
                })
                .collect(),
        })
    }
}
