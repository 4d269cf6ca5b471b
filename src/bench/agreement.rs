//! Pure helpers of `illmrec bench-models` ([`super::models`]): how far two models' rankings of
//! the same users agree ([`top_k_overlap`], [`top1_agrees`], [`spearman`] with tied ranks
//! averaged), the seeded random histories it scores when no input is given
//! ([`random_histories`]) and the quantization type a GGUF file records ([`gguf_file_type`]).

use anyhow::{ensure, Context as _, Result};
use std::collections::HashSet;
use std::io::Read;
use std::path::Path;

/// The share of the first `k` ids of `a` that are among the first `k` ids of `b`: 1.0 when the
/// two top-`k` sets are equal (whatever their order), 0.0 when disjoint. Shorter lists (fewer
/// than `k` candidates) are compared over the longer one's length; two empty lists agree fully.
pub fn top_k_overlap(a: &[u64], b: &[u64], k: usize) -> f64 {
    let (a, b) = (&a[..a.len().min(k)], &b[..b.len().min(k)]);
    let n = a.len().max(b.len());
    if n == 0 {
        return 1.0;
    }
    let set: HashSet<u64> = b.iter().copied().collect();
    let mut seen = HashSet::new();
    let common = a
        .iter()
        .filter(|id| set.contains(id) && seen.insert(**id))
        .count();
    common as f64 / n as f64
}

/// Whether both rankings put the same item first (both empty counts as agreeing).
pub fn top1_agrees(a: &[u64], b: &[u64]) -> bool {
    a.first() == b.first()
}

/// Ranks 1..=n of the values, tied values sharing the mean of their ranks (the "fractional"
/// ranking Spearman's coefficient needs). NaN is not expected (scores are checked finite).
pub fn average_ranks(values: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&i, &j| values[i].total_cmp(&values[j]));
    let mut ranks = vec![0.0; values.len()];
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && values[order[end]] == values[order[start]] {
            end += 1;
        }
        // Positions start..end (0-based) hold one value: ranks start+1 ..= end, averaged.
        let mean = (start + 1 + end) as f64 / 2.0;
        for &i in &order[start..end] {
            ranks[i] = mean;
        }
        start = end;
    }
    ranks
}

/// Spearman's rank correlation of two equally long score lists: Pearson's correlation of their
/// average ranks ([`average_ranks`]), so ties are handled exactly. `None` with fewer than two
/// values, different lengths, or when either list is constant (no order to compare). Identical
/// lists give exactly 1.0.
pub fn spearman(a: &[f64], b: &[f64]) -> Option<f64> {
    if a.len() != b.len() || a.len() < 2 {
        return None;
    }
    let (ra, rb) = (average_ranks(a), average_ranks(b));
    if ra == rb {
        // Constant lists have no order to agree on.
        return (ra.iter().any(|&r| r != ra[0])).then_some(1.0);
    }
    let n = a.len() as f64;
    let (ma, mb) = (ra.iter().sum::<f64>() / n, rb.iter().sum::<f64>() / n);
    let (mut cov, mut va, mut vb) = (0.0, 0.0, 0.0);
    for (x, y) in ra.iter().zip(&rb) {
        cov += (x - ma) * (y - mb);
        va += (x - ma) * (x - ma);
        vb += (y - mb) * (y - mb);
    }
    if va == 0.0 || vb == 0.0 {
        return None;
    }
    Some((cov / (va.sqrt() * vb.sqrt())).clamp(-1.0, 1.0))
}

/// Spearman's coefficient over the candidates both lists score (`None` entries, items without a
/// feature in any scored modality, are left out of both).
pub fn spearman_scored(a: &[Option<f32>], b: &[Option<f32>]) -> Option<f64> {
    if a.len() != b.len() {
        return None;
    }
    let (x, y): (Vec<f64>, Vec<f64>) = a
        .iter()
        .zip(b)
        .filter_map(|(x, y)| Some((f64::from((*x)?), f64::from((*y)?))))
        .unzip();
    spearman(&x, &y)
}

/// SplitMix64: a small seeded generator (the crate has no `rand` dependency).
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` ≥ 1), by rejection, so no id is favoured.
    pub fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let v = self.next_u64();
            if v < zone {
                return v % n;
            }
        }
    }
}

/// `users` histories of `len` distinct ids each, drawn uniformly from `ids` with a generator
/// seeded by `seed` (the same arguments give the same histories on every machine). `len` is cut
/// to the number of ids.
pub fn random_histories(ids: &[u64], users: usize, len: usize, seed: u64) -> Vec<Vec<u64>> {
    let mut rng = SplitMix64::new(seed);
    let len = len.min(ids.len());
    (0..users)
        .map(|_| {
            // A partial Fisher-Yates shuffle of the positions: `len` distinct draws.
            let mut pool: Vec<usize> = (0..ids.len()).collect();
            (0..len)
                .map(|i| {
                    let j = i + rng.below((pool.len() - i) as u64) as usize;
                    pool.swap(i, j);
                    ids[pool[i]]
                })
                .collect()
        })
        .collect()
}

/// `general.file_type` of a GGUF file (llama.cpp's `llama_ftype`: 0 all F32, 7 Q8_0, 15 Q4_K_M,
/// 32 BF16, ...), read from its header alone; `None` when the file does not record it.
pub fn gguf_file_type(path: &Path) -> Result<Option<u32>> {
    let file = crate::store::fsutil::open_regular(path)?;
    // The metadata comes first; the largest part of a header is the tokenizer's arrays (a few
    // MiB for a 262k-token vocabulary), so 64 MiB is far more than any header needs.
    let mut bytes = Vec::new();
    file.take(64 << 20)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {}", path.display()))?;
    parse_gguf_file_type(&bytes)
        .with_context(|| format!("{} is not a readable GGUF", path.display()))
}

/// [`gguf_file_type`] on the bytes of a GGUF header (version 2 or 3, little-endian).
pub fn parse_gguf_file_type(bytes: &[u8]) -> Result<Option<u32>> {
    let mut r = Reader { bytes, at: 0 };
    ensure!(r.take(4)? == b"GGUF", "wrong magic bytes");
    let version = r.u32()?;
    ensure!((2..=3).contains(&version), "GGUF version {version}");
    let _tensors = r.u64()?;
    let kvs = r.u64()?;
    for _ in 0..kvs {
        let key = r.string()?;
        let ty = r.u32()?;
        if key == b"general.file_type" {
            return Ok(match ty {
                4 => Some(r.u32()?),
                5 => u32::try_from(r.i32()?).ok(),
                _ => None,
            });
        }
        r.skip_value(ty)?;
    }
    Ok(None)
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.at.checked_add(n).context("length overflow")?;
        ensure!(end <= self.bytes.len(), "header truncated");
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn i32(&mut self) -> Result<i32> {
        Ok(i32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn string(&mut self) -> Result<&'a [u8]> {
        let n = usize::try_from(self.u64()?).context("string length")?;
        self.take(n)
    }
    /// Skips one value of GGUF type `ty` (arrays recursively).
    fn skip_value(&mut self, ty: u32) -> Result<()> {
        let size = match ty {
            0 | 1 | 7 => 1, // u8, i8, bool
            2 | 3 => 2,     // u16, i16
            4..=6 => 4,     // u32, i32, f32
            10..=12 => 8,   // u64, i64, f64
            8 => {
                self.string()?;
                return Ok(());
            }
            9 => {
                let inner = self.u32()?;
                let n = self.u64()?;
                for _ in 0..n {
                    self.skip_value(inner)?;
                }
                return Ok(());
            }
            _ => anyhow::bail!("unknown GGUF value type {ty}"),
        };
        self.take(size)?;
        Ok(())
    }
}

/// The name of a `llama_ftype` as `illmrec quantize --type` spells it (`f32`, `q8_0`, ...), or
/// `ftype N` for one it does not offer.
pub fn file_type_name(ftype: u32) -> String {
    crate::engine::QUANT_TYPES
        .iter()
        .find(|(_, t)| *t as u64 == ftype as u64)
        .map_or_else(|| format!("ftype {ftype}"), |(n, _)| n.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_overlap_counts_common_ids_regardless_of_order() {
        assert_eq!(top_k_overlap(&[1, 2, 3], &[3, 2, 1], 3), 1.0);
        assert_eq!(top_k_overlap(&[1, 2, 3, 4], &[1, 2, 5, 6], 4), 0.5);
        assert_eq!(top_k_overlap(&[1, 2], &[3, 4], 2), 0.0);
        // Only the first k of each count.
        assert_eq!(top_k_overlap(&[1, 2, 9], &[2, 1, 8], 2), 1.0);
        assert_eq!(top_k_overlap(&[1, 9, 2], &[2, 1, 8], 2), 0.5);
        // Shorter lists: over the longer one's length; a repeated id counts once.
        assert_eq!(top_k_overlap(&[1], &[1, 2], 10), 0.5);
        assert_eq!(top_k_overlap(&[1, 1], &[1, 2], 10), 0.5);
        assert_eq!(top_k_overlap(&[], &[], 10), 1.0);
        assert!(top1_agrees(&[4, 1], &[4, 2]));
        assert!(!top1_agrees(&[4, 1], &[1, 4]));
    }

    #[test]
    fn average_ranks_share_ties() {
        assert_eq!(average_ranks(&[10.0, 30.0, 20.0]), vec![1.0, 3.0, 2.0]);
        assert_eq!(
            average_ranks(&[1.0, 2.0, 2.0, 3.0]),
            vec![1.0, 2.5, 2.5, 4.0]
        );
        assert_eq!(average_ranks(&[5.0, 5.0, 5.0]), vec![2.0, 2.0, 2.0]);
        assert_eq!(average_ranks(&[]), Vec::<f64>::new());
    }

    #[test]
    fn spearman_by_hand() {
        let a = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(
            spearman(&a, &a),
            Some(1.0),
            "identical lists give exactly 1"
        );
        assert_eq!(
            spearman(&a, &[2.0, 4.0, 6.0, 8.0, 100.0]),
            Some(1.0),
            "the same order: the same ranks"
        );
        let r = spearman(&a, &[5.0, 4.0, 3.0, 2.0, 1.0]).unwrap();
        assert!((r + 1.0).abs() < 1e-12, "{r}");
        // One swap of neighbours among 5: 1 - 6·2 / (5·24) = 0.9.
        let r = spearman(&a, &[1.0, 2.0, 4.0, 3.0, 5.0]).unwrap();
        assert!((r - 0.9).abs() < 1e-12, "{r}");
        // With ties (scipy.stats.spearmanr([1,2,2,3], [1,2,3,4]) = 0.9486832980505138).
        let r = spearman(&[1.0, 2.0, 2.0, 3.0], &[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert!((r - 0.948_683_298_050_513_8).abs() < 1e-12, "{r}");
        assert_eq!(spearman(&[1.0, 1.0], &[1.0, 2.0]), None, "a constant list");
        assert_eq!(spearman(&[3.0, 3.0], &[3.0, 3.0]), None);
        assert_eq!(spearman(&[1.0], &[1.0]), None);
        assert_eq!(spearman(&[1.0, 2.0], &[1.0]), None);
    }

    #[test]
    fn spearman_scored_skips_unscored_items() {
        let a = [Some(1.0), None, Some(3.0), Some(2.0)];
        let b = [Some(10.0), Some(99.0), Some(30.0), None];
        assert_eq!(spearman_scored(&a, &b), Some(1.0));
        assert_eq!(spearman_scored(&a, &a), Some(1.0));
        assert_eq!(spearman_scored(&[None, None], &[None, None]), None);
    }

    #[test]
    fn random_histories_are_seeded_distinct_and_from_the_ids() {
        let ids: Vec<u64> = (100..150).collect();
        let h = random_histories(&ids, 4, 10, 7);
        assert_eq!(h, random_histories(&ids, 4, 10, 7));
        assert_ne!(h, random_histories(&ids, 4, 10, 8));
        assert_eq!(h.len(), 4);
        for user in &h {
            assert_eq!(user.len(), 10);
            let set: HashSet<u64> = user.iter().copied().collect();
            assert_eq!(set.len(), 10, "distinct items: {user:?}");
            assert!(user.iter().all(|id| ids.contains(id)));
        }
        assert_ne!(h[0], h[1]);
        assert_eq!(random_histories(&ids[..3], 1, 10, 1)[0].len(), 3);
        let mut rng = SplitMix64::new(1);
        assert!((0..1000).all(|_| rng.below(3) < 3));
    }

    fn kv_string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    #[test]
    fn file_type_is_read_past_other_keys_and_arrays() {
        let mut h = b"GGUF".to_vec();
        h.extend(3u32.to_le_bytes());
        h.extend(0u64.to_le_bytes());
        h.extend(4u64.to_le_bytes());
        kv_string(&mut h, "general.architecture");
        h.extend(8u32.to_le_bytes());
        kv_string(&mut h, "gemma3");
        kv_string(&mut h, "tokenizer.ggml.tokens");
        h.extend(9u32.to_le_bytes());
        h.extend(8u32.to_le_bytes());
        h.extend(2u64.to_le_bytes());
        kv_string(&mut h, "<a>");
        kv_string(&mut h, "<bb>");
        kv_string(&mut h, "gemma3.rope.freq_base");
        h.extend(6u32.to_le_bytes());
        h.extend(1.5f32.to_le_bytes());
        kv_string(&mut h, "general.file_type");
        h.extend(4u32.to_le_bytes());
        h.extend(7u32.to_le_bytes());
        assert_eq!(parse_gguf_file_type(&h).unwrap(), Some(7));
        assert_eq!(file_type_name(7), "q8_0");
        assert_eq!(file_type_name(0), "f32");
        assert_eq!(file_type_name(15), "q4_k_m");
        assert_eq!(file_type_name(999), "ftype 999");
        // Without the key; truncated; not a GGUF.
        let cut = h.len() - (8 + 17 + 4 + 4);
        let mut without = h[..cut].to_vec();
        without[16..24].copy_from_slice(&3u64.to_le_bytes());
        assert_eq!(parse_gguf_file_type(&without).unwrap(), None);
        assert!(parse_gguf_file_type(&h[..h.len() - 2]).is_err());
        assert!(parse_gguf_file_type(b"GGML....").is_err());
    }

    #[test]
    fn the_default_models_file_types() {
        let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
        for (file, want) in [
            ("gemma-3-270m-f32.gguf", 0),
            ("gemma-3-270m-q4_k_m.gguf", 15),
        ] {
            let p = models.join(file);
            if p.is_file() {
                assert_eq!(gguf_file_type(&p).unwrap(), Some(want), "{file}");
            }
        }
    }
}
