//! Ranking: the `k` best of scored items, as a pure function with no model behind it.
//!
//! Every caller that turns (id, score) pairs into a ranked list goes through [`top_k`], so an id
//! always stays paired with its own score: filtering happens on the pairs, never on the ids alone.

use std::collections::HashSet;
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
/// rank. Selection is O(n + k log k): the whole list is never sorted.
pub fn top_k(
    scored: impl IntoIterator<Item = (u64, Option<f32>)>,
    exclude: &HashSet<u64>,
    k: usize,
) -> Result<Vec<Scored>, NonFiniteScore> {
    let mut seen = HashSet::new();
    let mut kept = Vec::new();
    for (id, score) in scored {
        let Some(score) = score else { continue };
        if !score.is_finite() {
            return Err(NonFiniteScore { id, score });
        }
        if !exclude.contains(&id) && seen.insert(id) {
            kept.push(Scored { id, score });
        }
    }
    let better = |a: &Scored, b: &Scored| b.score.total_cmp(&a.score).then(a.id.cmp(&b.id));
    if k == 0 {
        return Ok(Vec::new());
    }
    if kept.len() > k {
        kept.select_nth_unstable_by(k - 1, better);
        kept.truncate(k);
    }
    kept.sort_unstable_by(better);
    Ok(kept)
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
