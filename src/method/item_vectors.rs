//! The catalog side of scoring: every item's projected vectors, `f_i_m(x_m(item))`, computed
//! once and kept in a memory-mapped cache file, so a request only runs the user heads and one
//! streaming scan.
//!
//! The cache file is named by a key over everything its contents derive from: the heads (weights
//! and config bytes), each bank's whole-file sha256, the catalog's ids, and this format's
//! version; a change to any of them is a different file (an older version's file is never read).
//!
//! Cache layout (little-endian): header (bincode fixed-int, `CacheHeader`) padded to 128
//! bytes; `count` u64 item ids (catalog order = ascending id); `count` presence bytes (bit `m`:
//! the item has modality slot `m`), padded to 64; then one f16 row per item: the concatenation
//! of its projected vectors over the modality slots (`n_modalities × proj_dim` values; an absent
//! modality is zeros). An item's score is the mean over the modalities it has of `u_m · v_m`,
//! which is one dot product of the concatenated user vector with the row, divided by the
//! item's modality count (the presence byte's popcount): [`ItemVectors::score`],
//! [`ItemVectors::top_k`] (a single pass, a bounded heap of k, the catalog is never sorted).
//!
//! Damage detection: the header's `payload` is the sha256 of everything after the 128 header
//! bytes. It is checked in full the first time a file version is opened; a passed check is
//! recorded as a [`crate::store::verified`] stamp in the cache folder, so later opens only read the
//! header and compare the file's stamp, and cost the same for any catalog size. A damaged cache
//! is reported and rebuilt, never used.

use crate::method::dot16::dot_f16;
use crate::method::heads::Heads;
use crate::method::rank::{NonFiniteScore, Scored, TopK};
use crate::store::bank::{Bank, Modality};
use crate::store::catalog::Catalog;
use crate::store::fsutil::{hex, write_atomic_path};
use crate::store::verified::Stamps;
use anyhow::{bail, ensure, Context, Result};
use bincode::{Decode, Encode};
use half::f16;
use memmap2::Mmap;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const MAGIC: [u8; 8] = *b"ILLMIVEC";
/// Bumped whenever the layout or the way vectors are computed changes (it is part of the key).
/// 3: one f16 row per item over all modalities, presence bits (2: f32 matrices per modality).
const VERSION: u32 = 3;
const HEADER_SPACE: usize = 128;

#[derive(Encode, Decode, Debug, PartialEq)]
struct CacheHeader {
    magic: [u8; 8],
    version: u32,
    proj_dim: u32,
    n_modalities: u32,
    modalities: [u8; 3],
    count: u64,
    key: [u8; 32],
    payload: [u8; 32],
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_little_endian()
        .with_fixed_int_encoding()
}

fn modality_codes(modalities: &[Modality]) -> [u8; 3] {
    let mut m = [255u8; 3];
    modalities
        .iter()
        .enumerate()
        .for_each(|(k, x)| m[k] = *x as u8);
    m
}

fn masks_offset(count: usize) -> usize {
    HEADER_SPACE + 8 * count
}

fn rows_offset(count: usize) -> usize {
    (masks_offset(count) + count).div_ceil(64) * 64
}

enum Storage {
    Mapped(Mmap),
    Memory(Vec<u8>),
}

/// Projected item vectors for the whole catalog.
pub struct ItemVectors {
    storage: Storage,
    modalities: Vec<Modality>,
    count: usize,
    proj_dim: usize,
    /// Where the cache file is, if it could be written.
    pub path: Option<PathBuf>,
    /// Whether this open computed the vectors (false: read from the cache).
    pub computed: bool,
    /// Whether this open read the whole file to check its sha256 (false: its stamp vouched
    /// for it, or the vectors were computed).
    pub checked_in_full: bool,
    /// What went wrong with the cache without failing the open (a damaged cache that was
    /// rebuilt, a folder that could not take the cache), for the front end to show.
    pub warnings: Vec<String>,
}

/// The cache key: the format version, the heads checksum (weights and config), each bank's
/// whole-file sha256, and the catalog's ids.
pub fn cache_key(
    heads: &Heads,
    bank_digests: &BTreeMap<Modality, [u8; 32]>,
    catalog: &Catalog,
) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(MAGIC);
    h.update(VERSION.to_le_bytes());
    h.update(heads.checksum);
    for (m, digest) in bank_digests {
        h.update(m.name().as_bytes());
        h.update(digest);
    }
    h.update((catalog.len() as u64).to_le_bytes());
    for item in catalog.items() {
        h.update(item.id.to_le_bytes());
    }
    h.finalize().into()
}

/// The cache file's name for a key.
pub fn cache_file_name(key: &[u8; 32]) -> String {
    format!("item-vectors-{}.bin", &hex(key)[..16])
}

/// What an opened cache must match.
pub struct Expect<'a> {
    pub key: &'a [u8; 32],
    pub modalities: &'a [Modality],
    pub count: usize,
}

impl ItemVectors {
    /// Opens the cache in `cache_dir` if it matches and is intact, else computes the vectors
    /// and tries to write the cache there (a read-only location only costs the recomputation
    /// next time). `bank_digests` are the banks' whole-file sha256 (see [`Bank::file_sha256`]).
    pub fn open_or_build(
        cache_dir: &Path,
        heads: &Heads,
        banks: &BTreeMap<Modality, Bank>,
        bank_digests: &BTreeMap<Modality, [u8; 32]>,
        catalog: &Catalog,
    ) -> Result<Self> {
        let key = cache_key(heads, bank_digests, catalog);
        let path = cache_dir.join(cache_file_name(&key));
        let modalities = heads.modalities();
        let expect = Expect {
            key: &key,
            modalities: &modalities,
            count: catalog.len(),
        };
        let stamps = Stamps::new(cache_dir);
        let mut warnings = Vec::new();
        let dir_is_link = crate::store::fsutil::is_symlink(cache_dir);
        // A link at the cache's name is never read (it is not a file of ours): it is replaced
        // by the rebuilt cache below.
        if !dir_is_link && path.exists() && !crate::store::fsutil::is_symlink(&path) {
            match Self::open(&path, &expect, Some(&stamps)) {
                Ok(v) => return Ok(v),
                Err(e) => warnings.push(format!(
                    "the item-vector cache {} is damaged ({e:#}); rebuilding it",
                    path.display()
                )),
            }
        }
        let bytes = build(&key, heads, banks, catalog, None)?;
        let written = crate::store::fsutil::owned_dir(cache_dir).and_then(|_| {
            crate::store::fsutil::write_owned(&path, |out| Ok(out.write_all(&bytes)?))
        });
        let mut v = Self::from_storage(Storage::Memory(bytes), &expect)?;
        v.computed = true;
        match written {
            Err(e) => warnings.push(format!(
                "item vectors are not cached ({e:#}); they will be recomputed next time"
            )),
            Ok(replaced) => {
                warnings.extend(replaced.note(&path));
                v.path = Some(path);
            }
        }
        v.warnings = warnings;
        Ok(v)
    }

    /// Opens a cache file: its header must match `expect` and its size the header; its payload
    /// sha256 is checked in full unless a stamp in `stamps` vouches for this file version (see
    /// the module doc).
    pub fn open(path: &Path, expect: &Expect, stamps: Option<&Stamps>) -> Result<Self> {
        let file = crate::store::fsutil::open_regular(path)?;
        // Cache files are replaced only by rename, never written in place.
        let map = crate::store::fsutil::map_readonly(&file).context("cannot map it")?;
        let mut v = Self::from_storage(Storage::Mapped(map), expect)?;
        let header = v.header()?;
        let tag = [&header.key[..], &header.payload[..]].concat();
        let checked = Stamps::check_once(stamps, path, &tag, || {
            ensure!(
                Sha256::digest(&v.bytes()[HEADER_SPACE..]).as_slice() == header.payload,
                "checksum mismatch"
            );
            Ok(())
        })?;
        v.checked_in_full = matches!(checked, crate::store::verified::Checked::Full { .. });
        v.path = Some(path.to_path_buf());
        Ok(v)
    }

    fn header(&self) -> Result<CacheHeader> {
        let bytes = self.bytes();
        ensure!(bytes.len() >= HEADER_SPACE, "cache too short");
        Ok(bincode::decode_from_slice(&bytes[..HEADER_SPACE], config())?.0)
    }

    /// Checks the header and the size (not the payload's checksum).
    fn from_storage(storage: Storage, expect: &Expect) -> Result<Self> {
        let mut v = Self {
            storage,
            modalities: expect.modalities.to_vec(),
            count: expect.count,
            proj_dim: 0,
            path: None,
            computed: false,
            checked_in_full: false,
            warnings: Vec::new(),
        };
        let h = v.header()?;
        ensure!(
            h.magic == MAGIC && h.version == VERSION && &h.key == expect.key,
            "its header does not match its name"
        );
        ensure!(
            h.count as usize == expect.count
                && h.n_modalities as usize == expect.modalities.len()
                && h.modalities == modality_codes(expect.modalities),
            "its header does not match the catalog"
        );
        v.proj_dim = h.proj_dim as usize;
        ensure!(
            Some(v.bytes().len())
                == (v.count)
                    .checked_mul(v.width() * 2)
                    .and_then(|n| n.checked_add(rows_offset(v.count))),
            "it has the wrong size"
        );
        Ok(v)
    }

    fn bytes(&self) -> &[u8] {
        match &self.storage {
            Storage::Mapped(m) => m,
            Storage::Memory(v) => v,
        }
    }

    fn masks(&self) -> &[u8] {
        &self.bytes()[masks_offset(self.count)..masks_offset(self.count) + self.count]
    }

    fn rows(&self) -> &[f16] {
        bytemuck::cast_slice(&self.bytes()[rows_offset(self.count)..])
    }

    /// The rows' bytes as mapped (for measuring the plain read rate of the same memory).
    pub fn rows_bytes(&self) -> &[u8] {
        &self.bytes()[rows_offset(self.count)..]
    }

    /// Values per item row: `n_modalities × proj_dim`.
    pub fn width(&self) -> usize {
        self.modalities.len() * self.proj_dim
    }

    pub fn modalities(&self) -> &[Modality] {
        &self.modalities
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes one full scan reads: the rows, the presence bytes and the ids.
    pub fn scan_bytes(&self) -> usize {
        self.count * (self.width() * 2 + 1 + 8)
    }

    /// Item ids in catalog order.
    pub fn ids(&self) -> &[u64] {
        bytemuck::cast_slice(&self.bytes()[HEADER_SPACE..masks_offset(self.count)])
    }

    /// Whether item `i` (catalog position) has a feature in modality slot `m`.
    pub fn has(&self, i: usize, m: usize) -> bool {
        self.masks()[i] & (1 << m) != 0
    }

    /// Item `i`'s row: its f16 vectors over all modality slots, concatenated.
    pub fn row(&self, i: usize) -> &[f16] {
        let w = self.width();
        &self.rows()[i * w..(i + 1) * w]
    }

    /// Projected vector of item `i` in modality slot `m`, widened to f32 (zeros when absent).
    pub fn vector(&self, i: usize, m: usize) -> Vec<f32> {
        self.row(i)[m * self.proj_dim..(m + 1) * self.proj_dim]
            .iter()
            .map(|v| v.to_f32())
            .collect()
    }

    /// The user's vectors (one per modality slot, in [`ItemVectors::modalities`] order)
    /// concatenated: the query of [`ItemVectors::score`] and [`ItemVectors::top_k`].
    pub fn query(&self, user: &[Vec<f32>]) -> Vec<f32> {
        assert!(
            user.len() == self.modalities.len() && user.iter().all(|u| u.len() == self.proj_dim),
            "user vectors do not match the item vectors' modalities and dimension"
        );
        user.concat()
    }

    /// Score of item `i`: the mean over the modalities the item has of the dot products
    /// `u_m · v_m(i)`, computed as one dot product over the concatenation divided by the item's
    /// modality count; `None` when the item has no feature at all.
    #[inline]
    pub fn score(&self, query: &[f32], i: usize) -> Option<f32> {
        let n = self.masks()[i].count_ones();
        (n > 0).then(|| dot_f16(query, self.row(i)) / n as f32)
    }

    /// The `k` best items of the whole catalog for `query`, skipping `exclude`, in one pass
    /// over the rows (see [`TopK`] for the order; ids are unique by construction).
    pub fn top_k(
        &self,
        query: &[f32],
        exclude: &HashSet<u64>,
        k: usize,
    ) -> Result<Vec<Scored>, NonFiniteScore> {
        assert_eq!(query.len(), self.width(), "query length");
        let (ids, masks, rows, w) = (self.ids(), self.masks(), self.rows(), self.width());
        let mut top = TopK::new(k, exclude);
        for (i, (&id, &mask)) in ids.iter().zip(masks).enumerate() {
            let n = mask.count_ones();
            if n > 0 {
                top.push(id, dot_f16(query, &rows[i * w..(i + 1) * w]) / n as f32)?;
            }
        }
        Ok(top.into_sorted())
    }
}

/// Writes the layout: header space, ids, presence bytes, then rows pushed one at a time while
/// hashing the payload; [`CacheWriter::finish`] writes the header last. The one writer of both
/// computed caches and synthetic ones.
struct CacheWriter<W: Write + Seek> {
    out: W,
    hash: Sha256,
    header: CacheHeader,
    width: usize,
    rows: u64,
}

impl<W: Write + Seek> CacheWriter<W> {
    fn new(
        mut out: W,
        key: &[u8; 32],
        modalities: &[Modality],
        proj_dim: usize,
        ids: &[u64],
        masks: &[u8],
    ) -> Result<Self> {
        ensure!(ids.len() == masks.len(), "one presence byte per item");
        // Checked here, not at open (which must not read the whole file): the payload's sha256
        // then vouches for the presence bytes.
        ensure!(
            masks.iter().all(|&m| m < 1 << modalities.len()),
            "a presence byte names a modality the cache does not have"
        );
        ensure!(
            !modalities.is_empty() && modalities.len() <= 3,
            "1 to 3 modalities"
        );
        let header = CacheHeader {
            magic: MAGIC,
            version: VERSION,
            proj_dim: u32::try_from(proj_dim)?,
            n_modalities: modalities.len() as u32,
            modalities: modality_codes(modalities),
            count: ids.len() as u64,
            key: *key,
            payload: [0; 32],
        };
        out.write_all(&[0u8; HEADER_SPACE])?;
        let mut w = Self {
            out,
            hash: Sha256::new(),
            header,
            width: modalities.len() * proj_dim,
            rows: 0,
        };
        for id in ids {
            w.put(&id.to_le_bytes())?;
        }
        w.put(masks)?;
        w.put(&vec![
            0u8;
            rows_offset(ids.len())
                - masks_offset(ids.len())
                - ids.len()
        ])?;
        Ok(w)
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.out.write_all(bytes)?;
        self.hash.update(bytes);
        Ok(())
    }

    fn push_row(&mut self, row: &[f16]) -> Result<()> {
        ensure!(
            row.len() == self.width,
            "row of {} values, expected {}",
            row.len(),
            self.width
        );
        let bytes: Vec<u8> = row.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.put(&bytes)?;
        self.rows += 1;
        Ok(())
    }

    fn finish(mut self) -> Result<W> {
        ensure!(
            self.rows == self.header.count,
            "{} rows for {} items",
            self.rows,
            self.header.count
        );
        let header = CacheHeader {
            payload: self.hash.finalize().into(),
            ..self.header
        };
        let mut space = [0u8; HEADER_SPACE];
        bincode::encode_into_slice(&header, &mut space, config())?;
        self.out.seek(SeekFrom::Start(0))?;
        self.out.write_all(&space)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Writes a cache file atomically from rows produced one at a time (`row(i, buf)` fills item
/// `i`'s row; absent modalities must be zeros). Used for catalogs too large to hold in memory,
/// e.g. the synthetic ones of `illmrec bench-catalog`.
pub fn write_cache(
    path: &Path,
    key: &[u8; 32],
    modalities: &[Modality],
    proj_dim: usize,
    ids: &[u64],
    masks: &[u8],
    mut row: impl FnMut(usize, &mut [f16]) -> Result<()>,
) -> Result<()> {
    write_atomic_path(path, |tmp| {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(tmp)?;
        let mut w = CacheWriter::new(
            std::io::BufWriter::with_capacity(1 << 20, file),
            key,
            modalities,
            proj_dim,
            ids,
            masks,
        )?;
        let mut buf = vec![f16::ZERO; w.width];
        for i in 0..ids.len() {
            row(i, &mut buf)?;
            w.push_row(&buf)?;
        }
        w.finish()?
            .into_inner()
            .map_err(|e| e.into_error())?
            .sync_all()?;
        Ok(())
    })
}

/// Writes the cache file of a changed catalog into `cache_dir` (atomically) and returns its
/// path. The vectors of `old` (the same heads over the catalog before the change) are reused for
/// every item whose features did not change (ids not in `changed`); only the others are
/// projected. The file is byte for byte the one [`ItemVectors::open_or_build`] would compute.
pub fn write_extended(
    cache_dir: &Path,
    old: &ItemVectors,
    changed: &HashSet<u64>,
    heads: &Heads,
    banks: &BTreeMap<Modality, Bank>,
    bank_digests: &BTreeMap<Modality, [u8; 32]>,
    catalog: &Catalog,
) -> Result<PathBuf> {
    let key = cache_key(heads, bank_digests, catalog);
    let bytes = build(&key, heads, banks, catalog, Some((old, changed)))?;
    crate::store::fsutil::owned_dir(cache_dir)?;
    let path = cache_dir.join(cache_file_name(&key));
    crate::store::fsutil::write_owned(&path, |out| Ok(out.write_all(&bytes)?))?;
    Ok(path)
}

/// Computes the cache file's bytes, reusing the rows of an older cache where allowed.
fn build(
    key: &[u8; 32],
    heads: &Heads,
    banks: &BTreeMap<Modality, Bank>,
    catalog: &Catalog,
    reuse: Option<(&ItemVectors, &HashSet<u64>)>,
) -> Result<Vec<u8>> {
    let modalities = heads.modalities();
    // Position in the old cache of each item whose vectors can be copied.
    let reusable: HashMap<u64, usize> = match reuse {
        Some((old, changed)) if old.modalities == modalities => old
            .ids()
            .iter()
            .enumerate()
            .filter(|(_, id)| !changed.contains(id))
            .map(|(j, id)| (*id, j))
            .collect(),
        _ => HashMap::new(),
    };
    let count = catalog.len();
    let proj_dim = heads.config.proj_dim;
    let width = modalities.len() * proj_dim;
    let mut masks = vec![0u8; count];
    let mut rows = vec![f16::ZERO; count * width];
    for (slot, m) in modalities.iter().enumerate() {
        let bank = banks
            .get(m)
            .with_context(|| format!("the heads score {m}, but the bundle has no {m} bank"))?;
        bank.verify()?;
        let mut inputs = Vec::new();
        let mut present = Vec::new();
        let span = slot * proj_dim..(slot + 1) * proj_dim;
        for (i, item) in catalog.items().iter().enumerate() {
            if let (Some(&j), Some((old, _))) = (reusable.get(&item.id), reuse) {
                if old.has(j, slot) {
                    rows[i * width..(i + 1) * width][span.clone()]
                        .copy_from_slice(&old.row(j)[span.clone()]);
                    masks[i] |= 1 << slot;
                }
                continue;
            }
            if let Some(row) = bank.get(item.id) {
                inputs.extend(row.to_f32());
                present.push(i);
                masks[i] |= 1 << slot;
            }
        }
        let projected = heads.item[m].forward_rows(&inputs);
        for (k, &i) in present.iter().enumerate() {
            let v = &projected[k * proj_dim..(k + 1) * proj_dim];
            let out = &mut rows[i * width..(i + 1) * width][span.clone()];
            for (o, x) in out.iter_mut().zip(v) {
                *o = f16::from_f32(*x);
                if !o.is_finite() {
                    bail!(
                        "item {} projects to a {m} value ({x}) that is not a finite f16: the heads or the {m} bank are corrupt",
                        catalog.items()[i].id
                    );
                }
            }
        }
    }
    let ids: Vec<u64> = catalog.items().iter().map(|i| i.id).collect();
    let mut w = CacheWriter::new(
        std::io::Cursor::new(Vec::with_capacity(rows_offset(count) + rows.len() * 2)),
        key,
        &modalities,
        proj_dim,
        &ids,
        &masks,
    )?;
    for row in rows.chunks_exact(width.max(1)).take(count) {
        w.push_row(row)?;
    }
    Ok(w.finish()?.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODS: [Modality; 3] = [Modality::Img, Modality::Cf, Modality::Text];

    struct Data {
        ids: Vec<u64>,
        masks: Vec<u8>,
        /// f32 vectors per item and slot (zeros when absent), already rounded through f16.
        vectors: Vec<[Vec<f32>; 3]>,
    }

    fn rng(seed: u64) -> impl FnMut() -> f32 {
        let mut x = seed;
        move || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    fn data(n: usize, dim: usize) -> Data {
        let mut r = rng(7);
        let ids: Vec<u64> = (0..n as u64).map(|i| 10 + 3 * i).collect();
        // Every presence pattern, including none.
        let masks: Vec<u8> = (0..n).map(|i| (i % 8) as u8).collect();
        let vectors = masks
            .iter()
            .map(|&m| {
                std::array::from_fn(|s| {
                    (0..dim)
                        .map(|_| {
                            let v = f16::from_f32(r() * 4.0).to_f32();
                            if m & (1 << s) != 0 {
                                v
                            } else {
                                0.0
                            }
                        })
                        .collect()
                })
            })
            .collect();
        Data {
            ids,
            masks,
            vectors,
        }
    }

    fn write(dir: &Path, d: &Data, dim: usize, key: &[u8; 32]) -> PathBuf {
        let path = dir.join(cache_file_name(key));
        write_cache(&path, key, &MODS, dim, &d.ids, &d.masks, |i, buf| {
            for (s, v) in d.vectors[i].iter().enumerate() {
                for (o, x) in buf[s * dim..(s + 1) * dim].iter_mut().zip(v) {
                    *o = f16::from_f32(*x);
                }
            }
            Ok(())
        })
        .unwrap();
        path
    }

    fn expect<'a>(key: &'a [u8; 32], n: usize) -> Expect<'a> {
        Expect {
            key,
            modalities: &MODS,
            count: n,
        }
    }

    /// Written, reopened: ids, presence, vectors, and scores equal to an f64 reference of the
    /// per-modality mean (the pre-concatenation definition) to f32 rounding.
    #[test]
    fn round_trip_and_scores_match_the_per_modality_mean() {
        let (n, dim) = (40, 37);
        let d = data(n, dim);
        let dir = tempfile::tempdir().unwrap();
        let key = [5u8; 32];
        let path = write(dir.path(), &d, dim, &key);
        let v = ItemVectors::open(&path, &expect(&key, n), None).unwrap();
        assert!(v.checked_in_full);
        assert_eq!(v.ids(), &d.ids[..]);
        assert_eq!(v.width(), 3 * dim);
        let mut r = rng(11);
        let user: Vec<Vec<f32>> = (0..3).map(|_| (0..dim).map(|_| r()).collect()).collect();
        let q = v.query(&user);
        for i in 0..n {
            for s in 0..3 {
                assert_eq!(v.has(i, s), d.masks[i] & (1 << s) != 0);
                assert_eq!(v.vector(i, s), d.vectors[i][s]);
            }
            let present: Vec<usize> = (0..3).filter(|&s| v.has(i, s)).collect();
            let want = (!present.is_empty()).then(|| {
                present
                    .iter()
                    .map(|&s| {
                        user[s]
                            .iter()
                            .zip(&d.vectors[i][s])
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                    })
                    .sum::<f64>()
                    / present.len() as f64
            });
            match (v.score(&q, i), want) {
                (None, None) => {}
                (Some(got), Some(want)) => {
                    assert!(
                        (got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "{got} {want}"
                    )
                }
                other => panic!("item {i}: {other:?}"),
            }
        }
    }

    /// The catalog scan's top-k equals a brute-force sort of every score, with exclusions.
    #[test]
    fn scan_top_k_equals_a_full_sort() {
        let (n, dim) = (300, 16);
        let d = data(n, dim);
        let dir = tempfile::tempdir().unwrap();
        let key = [6u8; 32];
        let path = write(dir.path(), &d, dim, &key);
        let v = ItemVectors::open(&path, &expect(&key, n), None).unwrap();
        let mut r = rng(3);
        let user: Vec<Vec<f32>> = (0..3).map(|_| (0..dim).map(|_| r()).collect()).collect();
        let q = v.query(&user);
        let exclude: HashSet<u64> = d.ids.iter().copied().filter(|id| id % 5 == 0).collect();
        let mut all: Vec<Scored> = (0..n)
            .filter_map(|i| {
                Some(Scored {
                    id: v.ids()[i],
                    score: v.score(&q, i)?,
                })
            })
            .filter(|s| !exclude.contains(&s.id))
            .collect();
        all.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.id.cmp(&b.id)));
        for k in [1, 10, 100, 1000] {
            assert_eq!(
                v.top_k(&q, &exclude, k).unwrap(),
                all[..k.min(all.len())].to_vec()
            );
        }
    }

    /// A changed byte anywhere is found at the next open, also after a stamp was recorded (the
    /// write changes the stamp); a header that does not match is refused without hashing.
    #[test]
    fn damage_is_detected() {
        let (n, dim) = (20, 8);
        let d = data(n, dim);
        let dir = tempfile::tempdir().unwrap();
        let key = [9u8; 32];
        let path = write(dir.path(), &d, dim, &key);
        let stamps = Stamps::new(dir.path());
        std::thread::sleep(std::time::Duration::from_millis(
            crate::store::verified::RACY_SECS * 1000 + 100,
        ));
        let first = ItemVectors::open(&path, &expect(&key, n), Some(&stamps)).unwrap();
        assert!(first.checked_in_full);
        drop(first);
        let again = ItemVectors::open(&path, &expect(&key, n), Some(&stamps)).unwrap();
        assert!(
            !again.checked_in_full,
            "the stamp vouches for an unchanged file"
        );
        drop(again);
        let good = std::fs::read(&path).unwrap();
        for pos in [HEADER_SPACE + 3, masks_offset(n) + 1, good.len() - 1] {
            let mut bad = good.clone();
            bad[pos] ^= 0x10;
            std::fs::write(&path, &bad).unwrap();
            let err = ItemVectors::open(&path, &expect(&key, n), Some(&stamps))
                .err()
                .unwrap_or_else(|| panic!("byte {pos}: damage not detected"));
            let msg = format!("{err:#}");
            assert!(msg.contains("checksum mismatch"), "{msg}");
        }
        std::fs::write(&path, &good).unwrap();
        assert!(ItemVectors::open(&path, &expect(&[1u8; 32], n), None).is_err());
        assert!(ItemVectors::open(&path, &expect(&key, n + 1), None).is_err());
        std::fs::write(&path, &good[..good.len() - 2]).unwrap();
        let err = ItemVectors::open(&path, &expect(&key, n), None)
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains("wrong size"));
    }
}
