//! The read-only part of a recommender ([`Shared`]): checking requests, the user heads, scoring
//! and ranking items.

use super::request::{RequestError, RequestResult, MAX_CANDIDATES, MAX_HISTORY_IDS, MAX_TOP_K};
use super::Options;
use crate::bundle::Bundle;
use crate::engine::Model;
use crate::method::heads::Heads;
use crate::method::item_vectors::ItemVectors;
use crate::method::rank::{self, Scored};
use crate::store::bank::{Bank, Modality};
use crate::store::catalog::Catalog;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

/// A user's representation: one vector per scoring modality, plus what went into the prompt.
#[derive(Clone, Debug)]
pub struct UserVector {
    /// `f_u_m(h)` per modality, in [`Shared::modalities`] order.
    pub vectors: Vec<Vec<f32>>,
    /// The LLM's final hidden state at `[REC]`.
    pub hidden: Vec<f32>,
    /// History items that made it into the prompt (oldest first).
    pub used: Vec<u64>,
    /// Older history items dropped because the prompt would not fit the context.
    pub dropped_for_context: usize,
    /// Positions in the prompt (tokens plus injected vectors).
    pub prompt_positions: usize,
}

/// One ranked item as every front end shows it: `recommend --json`, `score`'s records and the
/// HTTP API's answers use these field names (the kiosk adds `image`).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct RankedItem {
    /// 1 for the best.
    pub rank: usize,
    pub id: u64,
    pub score: f32,
    pub title: String,
    /// The year in the title's trailing "(1995)", if any.
    pub year: Option<u16>,
    pub genres: Vec<String>,
}

/// The read-only part of a recommender, shared by its workers.
pub struct Shared {
    pub bundle: Bundle,
    pub catalog: Catalog,
    pub heads: Heads,
    pub banks: BTreeMap<Modality, Bank>,
    pub items: ItemVectors,
    pub(super) model: Arc<Model>,
    pub(super) opts: Options,
}

impl Shared {
    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn options(&self) -> &Options {
        &self.opts
    }

    pub fn modalities(&self) -> &[Modality] {
        self.items.modalities()
    }

    /// Checks a request before any work: a non-empty history and candidate list within the
    /// limits, a `top_k` in range, and every id in the catalog (all unknown ids are listed).
    pub fn check_request(
        &self,
        history: &[u64],
        candidates: Option<&[u64]>,
        top_k: usize,
    ) -> RequestResult<()> {
        if history.is_empty() {
            return Err(RequestError::EmptyHistory);
        }
        if history.len() > MAX_HISTORY_IDS {
            return Err(RequestError::TooManyItems {
                what: "history",
                given: history.len(),
                max: MAX_HISTORY_IDS,
            });
        }
        match candidates {
            Some([]) => return Err(RequestError::EmptyCandidates),
            Some(c) if c.len() > MAX_CANDIDATES => {
                return Err(RequestError::TooManyItems {
                    what: "candidate list",
                    given: c.len(),
                    max: MAX_CANDIDATES,
                })
            }
            _ => {}
        }
        if !(1..=MAX_TOP_K).contains(&top_k) {
            return Err(RequestError::BadTopK(top_k));
        }
        self.check_ids(history.iter().chain(candidates.into_iter().flatten()))
    }

    /// Every id in the catalog, or all those that are not (each once, in order).
    pub fn check_ids<'a>(&self, ids: impl IntoIterator<Item = &'a u64>) -> RequestResult<()> {
        let mut unknown = Vec::new();
        let mut seen = HashSet::new();
        for &id in ids {
            if self.catalog.get(id).is_none() && seen.insert(id) {
                unknown.push(id);
            }
        }
        match unknown.is_empty() {
            true => Ok(()),
            false => Err(RequestError::UnknownItems(unknown)),
        }
    }

    /// The user vectors `f_u_m(hidden)`, in [`Shared::modalities`] order.
    pub fn user_vectors(&self, hidden: &[f32]) -> RequestResult<Vec<Vec<f32>>> {
        let vectors: Vec<Vec<f32>> = self
            .modalities()
            .iter()
            .map(|m| self.heads.user[m].forward(hidden))
            .collect();
        for (m, v) in self.modalities().iter().zip(&vectors) {
            if !v.iter().all(|x| x.is_finite()) {
                return Err(RequestError::NonFinite(format!(
                    "the {m} user head produced a non-finite vector: the heads are corrupt"
                )));
            }
        }
        if vectors.iter().flatten().all(|x| *x == 0.0) {
            return Err(RequestError::Degenerate(format!(
                "the user heads in {} give an all-zero user vector: every item would score 0.0 and the ranking would be the id order (the heads are zeroed or damaged; retrain or rebuild the bundle)",
                self.bundle.file(&self.bundle.manifest.heads).display()
            )));
        }
        Ok(vectors)
    }

    /// Scores of the given items (`None` for an item with no feature in any scored modality).
    /// A NaN or infinite score is an error ([`rank::NonFiniteScore`]), never a number to rank.
    pub fn score_items(&self, user: &UserVector, ids: &[u64]) -> RequestResult<Vec<Option<f32>>> {
        self.check_ids(ids)?;
        let query = self.items.query(&user.vectors);
        ids.iter()
            .map(|&id| {
                let i = self.catalog.position(id).expect("checked above");
                match self.items.score(&query, i) {
                    Some(s) if !s.is_finite() => Err(rank::NonFiniteScore { id, score: s }.into()),
                    score => Ok(score),
                }
            })
            .collect()
    }

    /// The ids among `ids` that have no feature in any scored modality: they cannot be scored,
    /// and a ranking leaves them out (the front ends say so, naming them). Unknown ids are not
    /// listed (they are [`RequestError::UnknownItems`]).
    pub fn unscorable(&self, ids: &[u64]) -> Vec<u64> {
        let mut seen = HashSet::new();
        ids.iter()
            .copied()
            .filter(|&id| {
                self.catalog
                    .position(id)
                    .is_some_and(|i| !(0..self.modalities().len()).any(|m| self.items.has(i, m)))
                    && seen.insert(id)
            })
            .collect()
    }

    /// Ranked items with their catalog fields, in the order given (see [`RankedItem`]).
    pub fn ranked(&self, top: &[Scored]) -> Vec<RankedItem> {
        top.iter()
            .enumerate()
            .map(|(i, s)| {
                let item = self.catalog.get(s.id);
                RankedItem {
                    rank: i + 1,
                    id: s.id,
                    score: s.score,
                    title: item.map_or("", |i| i.title()).to_string(),
                    year: item.and_then(|i| i.year()),
                    genres: item.map(|i| i.genres.clone()).unwrap_or_default(),
                }
            })
            .collect()
    }

    /// The `k` best items, from `candidates` or the whole catalog, skipping `exclude` (see
    /// [`rank::top_k`] for the order and the handling of duplicates and non-finite scores).
    pub fn top_k(
        &self,
        user: &UserVector,
        k: usize,
        candidates: Option<&[u64]>,
        exclude: &HashSet<u64>,
    ) -> RequestResult<Vec<Scored>> {
        Ok(match candidates {
            Some([]) => return Err(RequestError::EmptyCandidates),
            Some(ids) => {
                if ids.iter().all(|id| exclude.contains(id)) {
                    return Err(RequestError::NothingToRank(
                        "every candidate is in the history, and seen items are excluded: nothing to rank (give other candidates, or include seen items)".into(),
                    ));
                }
                let scores = self.score_items(user, ids)?;
                let top = rank::top_k(ids.iter().copied().zip(scores), exclude, k)?;
                if top.is_empty() {
                    let none: Vec<String> =
                        self.unscorable(ids).iter().map(u64::to_string).collect();
                    return Err(RequestError::NothingToRank(format!(
                        "no candidate can be ranked: items {} have no feature in a scored modality ({})",
                        none.join(", "),
                        self.modalities()
                            .iter()
                            .map(|m| m.name())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                }
                top
            }
            None => self
                .items
                .top_k(&self.items.query(&user.vectors), exclude, k)?,
        })
    }
}
