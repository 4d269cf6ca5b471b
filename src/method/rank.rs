//! Ranking: the `k` best of scored items, as a pure function with no model behind it.
//!
//! Every caller that turns (id, score) pairs into a ranked list goes through [`top_k`], so an id
//! always stays paired with its own score: filtering happens on the pairs, never on the ids alone.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashSet};
use std::fmt;

/// An item and its score.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Scored {
    pub id: u64,
    pub score: f32,
}

/// A score that cannot be ranked.
#[derive(Clone, Debug, PartialEq)]
pub struct NonFiniteScore {
    pub id: u64,
    pub score: f32,
}

impl fmt::Display for NonFiniteScore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "item {} scored {} (not a finite number): the heads or the item vectors are corrupt",
            self.id, self.score
        )
    }
}

impl std::error::Error for NonFiniteScore {}

/// The `k` best of `scored`, skipping ids in `exclude` and items without a score (`None`: no
/// feature in any scored modality). Order: higher score first, ties by lower id, so the result
/// is deterministic. An id given twice appears once. A NaN or infinite score is an error, never a
/// rank. Selection streams through a [`TopK`] of at most `k` entries: the list is never sorted or
/// collected.
pub fn top_k(
    scored: impl IntoIterator<Item = (u64, Option<f32>)>,
    exclude: &HashSet<u64>,
    k: usize,
) -> Result<Vec<Scored>, NonFiniteScore> {
    let mut seen = HashSet::new();
    let mut top = TopK::new(k, exclude);
    for (id, score) in scored {
        let Some(score) = score else { continue };
        // Checked before the duplicate filter: a broken score is an error wherever it sits.
        if !score.is_finite() {
            return Err(NonFiniteScore { id, score });
        }
        if seen.insert(id) {
            top.push(id, score)?;
        }
    }
    Ok(top.into_sorted())
}

/// An entry ordered so that the greatest is the worst: lower score, then higher id.
#[derive(Clone, Debug)]
struct Worst(Scored);

impl PartialEq for Worst {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Worst {}
impl PartialOrd for Worst {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Worst {
    fn cmp(&self, o: &Self) -> Ordering {
        o.0.score
            .total_cmp(&self.0.score)
            .then(self.0.id.cmp(&o.0.id))
    }
}

/// The `k` best of a stream of unique ids: a bounded heap whose top is the worst kept entry,
/// so each pushed item costs one comparison unless it enters. The order is [`top_k`]'s (score by
/// `total_cmp`, higher first; ties by lower id), a strict total order over distinct ids, so the
/// result equals a full sort's first `k` whatever the push order. Ids in `exclude` never enter;
/// the exclusion set is consulted only for items good enough to enter.
pub struct TopK<'a> {
    k: usize,
    heap: BinaryHeap<Worst>,
    exclude: &'a HashSet<u64>,
}

impl<'a> TopK<'a> {
    pub fn new(k: usize, exclude: &'a HashSet<u64>) -> Self {
        Self {
            k,
            heap: BinaryHeap::with_capacity(k.min(1 << 16) + 1),
            exclude,
        }
    }

    /// Offers one item. The caller guarantees each id is pushed at most once.
    #[inline]
    pub fn push(&mut self, id: u64, score: f32) -> Result<(), NonFiniteScore> {
        if !score.is_finite() {
            return Err(NonFiniteScore { id, score });
        }
        let e = Worst(Scored { id, score });
        if self.heap.len() < self.k {
            if !self.exclude.contains(&id) {
                self.heap.push(e);
            }
        } else if let Some(mut worst) = self.heap.peek_mut() {
            if e < *worst && !self.exclude.contains(&id) {
                *worst = e;
            }
        }
        Ok(())
    }

    /// The kept entries, best first.
    pub fn into_sorted(self) -> Vec<Scored> {
        self.heap
            .into_sorted_vec()
            .into_iter()
            .map(|w| w.0)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[Scored]) -> Vec<u64> {
        v.iter().map(|s| s.id).collect()
    }

    fn pairs(ids: &[u64], scores: &[f32]) -> Vec<(u64, Option<f32>)> {
        ids.iter()
            .copied()
            .zip(scores.iter().map(|&s| Some(s)))
            .collect()
    }

    fn ex(ids: &[u64]) -> HashSet<u64> {
        ids.iter().copied().collect()
    }

    /// Each kept id carries its own score, wherever the excluded ids sit in the list.
    #[test]
    fn excluded_ids_do_not_shift_scores() {
        let ids_ = [260, 1876, 1198, 1918];
        let scores = [5.99, 10.03, 3.84, 8.63];
        for exclude in [&[260][..], &[1198], &[1918], &[260, 1198], &[260, 1918]] {
            let top = top_k(pairs(&ids_, &scores), &ex(exclude), 10).unwrap();
            for s in &top {
                let i = ids_.iter().position(|&x| x == s.id).unwrap();
                assert_eq!(s.score, scores[i], "item {} with exclude {exclude:?}", s.id);
                assert!(!exclude.contains(&s.id));
            }
            assert_eq!(top.len(), ids_.len() - exclude.len());
        }
        let top = top_k(pairs(&ids_, &scores), &ex(&[260, 1198]), 10).unwrap();
        assert_eq!(
            top,
            vec![
                Scored {
                    id: 1876,
                    score: 10.03
                },
                Scored {
                    id: 1918,
                    score: 8.63
                }
            ]
        );
    }

    #[test]
    fn duplicates_appear_once() {
        let top = top_k(
            pairs(&[3, 1, 3, 2, 1], &[0.5, 0.9, 0.5, 0.1, 0.9]),
            &ex(&[]),
            10,
        )
        .unwrap();
        assert_eq!(ids(&top), vec![1, 3, 2]);
    }

    #[test]
    fn all_excluded_gives_nothing() {
        let top = top_k(pairs(&[1, 2], &[0.1, 0.2]), &ex(&[1, 2]), 5).unwrap();
        assert!(top.is_empty());
        assert!(top_k(pairs(&[1, 2], &[0.1, 0.2]), &ex(&[]), 0)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn ties_put_the_lower_id_first() {
        let top = top_k(pairs(&[9, 4, 7, 1], &[1.0, 1.0, 2.0, 1.0]), &ex(&[]), 3).unwrap();
        assert_eq!(ids(&top), vec![7, 1, 4]);
        // -0.0 and 0.0 order by total_cmp, so the result never depends on input order.
        let a = top_k(pairs(&[1, 2], &[0.0, -0.0]), &ex(&[]), 2).unwrap();
        let b = top_k(pairs(&[2, 1], &[-0.0, 0.0]), &ex(&[]), 2).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn non_finite_scores_are_errors() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let err = top_k(pairs(&[1, 2, 3], &[0.1, bad, 0.3]), &ex(&[]), 2).unwrap_err();
            assert_eq!(err.id, 2);
            assert!(err.to_string().contains("item 2"), "{err}");
        }
        // Even an excluded item's NaN is reported: the model is broken either way.
        assert!(top_k(pairs(&[1, 2], &[0.1, f32::NAN]), &ex(&[2]), 2).is_err());
    }

    #[test]
    fn unscored_items_are_skipped() {
        let top = top_k([(1, Some(0.2)), (2, None), (3, Some(0.9))], &ex(&[]), 5).unwrap();
        assert_eq!(ids(&top), vec![3, 1]);
    }

    /// The streaming heap gives a full sort's first k for every push order, k and exclusion,
    /// with many ties (the candidate-score bug lived in tie handling).
    #[test]
    fn streaming_top_k_matches_a_full_sort_in_any_order() {
        let mut x = 99u64;
        let mut next = || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            x >> 33
        };
        let items: Vec<(u64, f32)> = (0..300)
            .map(|i| (i * 7 % 300, (next() % 20) as f32 / 3.0 - 2.0))
            .collect();
        let exclude: HashSet<u64> = items
            .iter()
            .map(|p| p.0)
            .filter(|id| id % 11 == 0)
            .collect();
        let mut full: Vec<Scored> = items
            .iter()
            .filter(|p| !exclude.contains(&p.0))
            .map(|&(id, score)| Scored { id, score })
            .collect();
        full.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.id.cmp(&b.id)));
        for round in 0..5 {
            let mut order = items.clone();
            // A seeded shuffle per round (round 0: as given).
            for i in (1..order.len())
                .rev()
                .take(if round == 0 { 0 } else { usize::MAX })
            {
                order.swap(i, next() as usize % (i + 1));
            }
            for k in [0, 1, 3, 10, 100, 272, 400] {
                let mut top = TopK::new(k, &exclude);
                for &(id, s) in &order {
                    top.push(id, s).unwrap();
                }
                assert_eq!(
                    top.into_sorted(),
                    full[..k.min(full.len())].to_vec(),
                    "k {k} round {round}"
                );
            }
        }
    }

    #[test]
    fn streaming_top_k_rejects_non_finite_scores() {
        let none = HashSet::new();
        let mut top = TopK::new(2, &none);
        top.push(1, 0.5).unwrap();
        assert_eq!(top.push(2, f32::NAN).unwrap_err().id, 2);
    }

    /// Partial selection gives exactly what a full sort would, for every k.
    #[test]
    fn selection_matches_a_full_sort() {
        let mut x = 12345u64;
        let items: Vec<(u64, Option<f32>)> = (0..500)
            .map(|i| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (i, Some(((x >> 40) % 50) as f32 / 7.0))
            })
            .collect();
        let mut full: Vec<Scored> = items
            .iter()
            .map(|&(id, s)| Scored {
                id,
                score: s.unwrap(),
            })
            .collect();
        full.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.id.cmp(&b.id)));
        for k in [1, 2, 10, 99, 500, 600] {
            let top = top_k(items.clone(), &ex(&[]), k).unwrap();
            assert_eq!(top, full[..k.min(500)].to_vec(), "k = {k}");
        }
    }
}
