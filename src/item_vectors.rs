//! The catalog side of scoring: every item's projected vector per modality, `f_i_m(x_m(item))`,
//! computed once and kept in a memory-mapped cache file, so a request only runs the user heads
//! and dot products.
//!
//! The cache file is named by a key over everything its contents derive from: the heads (weights
//! and config bytes), each bank's whole-file sha256, the catalog's ids, and this format's
//! version; a change to any of them is a different file. The file carries the sha256 of its own
//! payload, checked at every open: a damaged cache is reported and rebuilt, never used.
//!
//! Cache layout (little-endian): header (bincode fixed-int, [`CacheHeader`]) padded to 128
//! bytes; `count` u64 item ids (catalog order = ascending id); `count × n_modalities` presence
//! bytes, padded to 64; then per modality a `count × proj_dim` f32 matrix (absent rows are zero).
//! The header's `payload` is the sha256 of everything after the 128 header bytes.

use crate::bank::{Bank, Modality};
use crate::catalog::Catalog;
use crate::fsutil::{hex, write_atomic};
use crate::heads::{dot, Heads};
use anyhow::{bail, ensure, Context, Result};
use bincode::{Decode, Encode};
use memmap2::Mmap;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

const MAGIC: [u8; 8] = *b"ILLMIVEC";
/// Bumped whenever the layout or the way vectors are computed changes (it is part of the key).
const VERSION: u32 = 2;
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
        let path = cache_dir.join(format!("item-vectors-{}.bin", &hex(&key)[..16]));
        let modalities = heads.modalities();
        let mut warnings = Vec::new();
        if let Ok(file) = crate::fsutil::open_regular(&path) {
            // SAFETY: cache files are replaced only by rename, never written in place.
            if let Ok(map) = unsafe { Mmap::map(&file) } {
                match Self::from_storage(Storage::Mapped(map), &key, &modalities, catalog.len()) {
                    Ok(v) => {
                        return Ok(Self {
                            path: Some(path),
                            ..v
                        })
                    }
                    Err(e) => warnings.push(format!(
                        "the item-vector cache {} is damaged ({e}); rebuilding it",
                        path.display()
                    )),
                }
            }
        }
        let bytes = build(&key, heads, banks, catalog, None)?;
        let written = std::fs::create_dir_all(cache_dir)
            .map_err(anyhow::Error::from)
            .and_then(|_| match std::fs::metadata(&path) {
                // Something that is not ours sits at the cache's name (a FIFO would block).
                Ok(m) if !m.is_file() => {
                    Err(anyhow::anyhow!("{} is not a regular file", path.display()))
                }
                _ => write_atomic(&path, |out| Ok(out.write_all(&bytes)?)),
            });
        let mut v = Self::from_storage(Storage::Memory(bytes), &key, &modalities, catalog.len())?;
        v.computed = true;
        match written {
            Err(e) => warnings.push(format!(
                "item vectors are not cached ({e:#}); they will be recomputed next time"
            )),
            Ok(()) => v.path = Some(path),
        }
        v.warnings = warnings;
        Ok(v)
    }

    fn from_storage(
        storage: Storage,
        key: &[u8; 32],
        modalities: &[Modality],
        count: usize,
    ) -> Result<Self> {
        let bytes = match &storage {
            Storage::Mapped(m) => &m[..],
            Storage::Memory(v) => &v[..],
        };
        ensure!(bytes.len() >= HEADER_SPACE, "cache too short");
        let (h, _): (CacheHeader, usize) =
            bincode::decode_from_slice(&bytes[..HEADER_SPACE], config())?;
        ensure!(
            h.magic == MAGIC && h.version == VERSION && &h.key == key,
            "its header does not match its name"
        );
        ensure!(
            h.count as usize == count && h.n_modalities as usize == modalities.len(),
            "its header does not match the catalog"
        );
        ensure!(
            Sha256::digest(&bytes[HEADER_SPACE..]).as_slice() == h.payload,
            "checksum mismatch"
        );
        let len = bytes.len();
        let v = Self {
            storage,
            modalities: modalities.to_vec(),
            count,
            proj_dim: h.proj_dim as usize,
            path: None,
            computed: false,
            warnings: Vec::new(),
        };
        ensure!(
            Some(len)
                == (modalities.len() * count)
                    .checked_mul(v.proj_dim * 4)
                    .and_then(|n| n.checked_add(v.matrix_offset())),
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

    fn mask_offset(&self) -> usize {
        HEADER_SPACE + 8 * self.count
    }

    fn matrix_offset(&self) -> usize {
        (self.mask_offset() + self.count * self.modalities.len()).div_ceil(64) * 64
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

    /// Item ids in catalog order.
    pub fn ids(&self) -> &[u64] {
        bytemuck::cast_slice(&self.bytes()[HEADER_SPACE..self.mask_offset()])
    }

    /// Whether item `i` (catalog position) has a feature in modality slot `m`.
    pub fn has(&self, i: usize, m: usize) -> bool {
        self.bytes()[self.mask_offset() + i * self.modalities.len() + m] != 0
    }

    /// Projected vector of item `i` in modality slot `m`.
    pub fn vector(&self, i: usize, m: usize) -> &[f32] {
        let start = self.matrix_offset() + (m * self.count + i) * self.proj_dim * 4;
        bytemuck::cast_slice(&self.bytes()[start..start + self.proj_dim * 4])
    }

    /// Score of item `i` for a user: the mean over the modalities the item has of the dot
    /// products `u_m · v_m(i)`; `None` when the item has no feature at all.
    pub fn score(&self, user: &[Vec<f32>], i: usize) -> Option<f32> {
        let (mut sum, mut n) = (0f32, 0u32);
        for (m, u) in user.iter().enumerate() {
            if self.has(i, m) {
                sum += dot(u, self.vector(i, m));
                n += 1;
            }
        }
        (n > 0).then(|| sum / n as f32)
    }
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
    std::fs::create_dir_all(cache_dir)
        .with_context(|| format!("cannot create {}", cache_dir.display()))?;
    let path = cache_dir.join(format!("item-vectors-{}.bin", &hex(&key)[..16]));
    write_atomic(&path, |out| Ok(out.write_all(&bytes)?))?;
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
    // Position in the old cache of each item whose vectors can be copied.
    let reusable: HashMap<u64, usize> = match reuse {
        Some((old, changed)) if old.modalities == heads.modalities() => old
            .ids()
            .iter()
            .enumerate()
            .filter(|(_, id)| !changed.contains(id))
            .map(|(j, id)| (*id, j))
            .collect(),
        _ => HashMap::new(),
    };
    let modalities = heads.modalities();
    let count = catalog.len();
    let proj_dim = heads.config.proj_dim;
    let header = CacheHeader {
        magic: MAGIC,
        version: VERSION,
        proj_dim: proj_dim as u32,
        n_modalities: modalities.len() as u32,
        modalities: {
            let mut m = [255u8; 3];
            modalities
                .iter()
                .enumerate()
                .for_each(|(k, x)| m[k] = *x as u8);
            m
        },
        count: count as u64,
        key: *key,
        payload: [0; 32],
    };
    let mut out = vec![0u8; HEADER_SPACE];
    for item in catalog.items() {
        out.extend_from_slice(&item.id.to_le_bytes());
    }
    let mut mask = vec![0u8; count * modalities.len()];
    let mut matrices = Vec::with_capacity(modalities.len());
    for (slot, m) in modalities.iter().enumerate() {
        let bank = banks
            .get(m)
            .with_context(|| format!("the heads score {m}, but the bundle has no {m} bank"))?;
        bank.verify()?;
        let mut rows = Vec::new();
        let mut present = Vec::new();
        let mut copied = Vec::new();
        for (i, item) in catalog.items().iter().enumerate() {
            if let (Some(&j), Some((old, _))) = (reusable.get(&item.id), reuse) {
                if old.has(j, slot) {
                    copied.push((i, old.vector(j, slot)));
                    mask[i * modalities.len() + slot] = 1;
                }
                continue;
            }
            if let Some(row) = bank.get(item.id) {
                rows.extend(row.to_f32());
                present.push(i);
                mask[i * modalities.len() + slot] = 1;
            }
        }
        let projected = heads.item[m].forward_rows(&rows);
        if let Some(k) = projected.iter().position(|v| !v.is_finite()) {
            bail!(
                "item {} projects to a non-finite {m} vector: the heads or the {m} bank are corrupt",
                catalog.items()[present[k / proj_dim]].id
            );
        }
        let mut matrix = vec![0f32; count * proj_dim];
        for (k, &i) in present.iter().enumerate() {
            matrix[i * proj_dim..(i + 1) * proj_dim]
                .copy_from_slice(&projected[k * proj_dim..(k + 1) * proj_dim]);
        }
        for (i, v) in copied {
            matrix[i * proj_dim..(i + 1) * proj_dim].copy_from_slice(v);
        }
        matrices.push(matrix);
    }
    out.extend_from_slice(&mask);
    out.resize(out.len().div_ceil(64) * 64, 0);
    for matrix in matrices {
        out.extend(matrix.iter().flat_map(|v| v.to_le_bytes()));
    }
    let header = CacheHeader {
        payload: Sha256::digest(&out[HEADER_SPACE..]).into(),
        ..header
    };
    bincode::encode_into_slice(&header, &mut out[..HEADER_SPACE], config())?;
    Ok(out)
}
