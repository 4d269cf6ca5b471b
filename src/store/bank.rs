//! The feature bank: one modality's precomputed item features, memory-mapped.
//!
//! Layout (all integers little-endian):
//!
//! | offset        | size          | content                                                        |
//! |---------------|---------------|----------------------------------------------------------------|
//! | 0             | 88            | header, bincode 2 fixed-int encoding (see [`BankHeader`])      |
//! | 88            | 40            | zero padding                                                   |
//! | 128           | 8 × count     | item ids, u64, strictly ascending                              |
//! | rows_offset   | count×dim×w   | rows in id order, f32 (w = 4) or f16 (w = 2); 64-byte aligned  |
//!
//! The checksum is the sha256 of everything from byte 128 to the end of the file (ids and
//! rows). Opening reads only the header and checks the file size, so it costs the same for any
//! number of items; [`Bank::verify`] checks the checksum, the id order and that every value is
//! finite; a lookup is a binary search over the mapped id array and returns a borrowed row.

use crate::store::fsutil::{hex, open_regular, write_atomic};
use anyhow::{bail, ensure, Context, Result};
use bincode::{Decode, Encode};
use half::f16;
use memmap2::Mmap;
use sha2::{Digest, Sha256};
use std::fmt;
use std::path::{Path, PathBuf};

pub const BANK_MAGIC: [u8; 8] = *b"ILLMBANK";
pub const BANK_VERSION: u32 = 1;
const HEADER_LEN: usize = 88;
const IDS_OFFSET: u64 = 128;

/// The three item modalities of I-LLMRec, named as in the reference checkpoint keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Modality {
    Img,
    Cf,
    Text,
}

impl Modality {
    pub const ALL: [Modality; 3] = [Modality::Img, Modality::Cf, Modality::Text];

    pub fn name(self) -> &'static str {
        match self {
            Modality::Img => "img",
            Modality::Cf => "cf",
            Modality::Text => "text",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "img" | "image" => Ok(Modality::Img),
            "cf" => Ok(Modality::Cf),
            "text" => Ok(Modality::Text),
            _ => bail!("unknown modality '{s}' (expected img, cf or text)"),
        }
    }

    fn code(self) -> u8 {
        self as u8
    }

    fn from_code(c: u8) -> Result<Self> {
        Self::ALL
            .get(c as usize)
            .copied()
            .with_context(|| format!("unknown modality code {c}"))
    }
}

impl fmt::Display for Modality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
}

impl DType {
    pub fn width(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 => 2,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
        }
    }
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(DType::F32),
            "f16" => Ok(DType::F16),
            _ => bail!("unknown dtype '{s}' (expected f32 or f16)"),
        }
    }
}

/// The fixed-size bank header, exactly as stored (bincode 2, fixed-int, little-endian).
#[derive(Encode, Decode, Clone, Debug, PartialEq)]
pub struct BankHeader {
    pub magic: [u8; 8],
    pub version: u32,
    pub modality: u8,
    pub dtype: u8,
    pub reserved0: u16,
    pub dim: u32,
    pub reserved1: u32,
    pub count: u64,
    pub ids_offset: u64,
    pub rows_offset: u64,
    pub file_len: u64,
    /// sha256 of bytes [ids_offset, file_len).
    pub checksum: [u8; 32],
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_little_endian()
        .with_fixed_int_encoding()
}

fn rows_offset(count: u64) -> u64 {
    (IDS_OFFSET + 8 * count).div_ceil(64) * 64
}

/// A borrowed feature row, zero-copy from the mapping.
#[derive(Clone, Copy)]
pub enum Row<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

impl Row<'_> {
    pub fn to_f32(self) -> Vec<f32> {
        match self {
            Row::F32(r) => r.to_vec(),
            Row::F16(r) => r.iter().map(|v| v.to_f32()).collect(),
        }
    }
}

/// The bytes of a bank: a read-only mapping of the file, or (for tests and fuzzing) memory with
/// the 8-byte alignment the id array needs.
enum Storage {
    Mapped(Mmap),
    Memory(Vec<u64>, usize),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mapped(m) => m,
            Storage::Memory(words, len) => &bytemuck::cast_slice(words)[..*len],
        }
    }
}

/// A memory-mapped feature bank.
pub struct Bank {
    path: PathBuf,
    storage: Storage,
    pub header: BankHeader,
    pub modality: Modality,
    pub dtype: DType,
}

impl Bank {
    /// Maps a bank file and checks its header against the file size (constant time; the
    /// payload is checked by [`Bank::verify`]).
    pub fn open(path: &Path) -> Result<Self> {
        let file = open_regular(path)
            .with_context(|| format!("cannot open feature bank {}", path.display()))?;
        // The bank is read-only for its lifetime; a writer replaces the file by rename.
        let map = crate::store::fsutil::map_readonly(&file)
            .with_context(|| format!("cannot map {}", path.display()))?;
        Self::from_storage(path, Storage::Mapped(map))
    }

    /// A bank held in memory (`name` is only used in messages).
    pub fn from_bytes(name: &Path, bytes: &[u8]) -> Result<Self> {
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
        Self::from_storage(name, Storage::Memory(words, bytes.len()))
    }

    fn from_storage(path: &Path, storage: Storage) -> Result<Self> {
        let map = storage.bytes();
        let fail = |msg: String| anyhow::anyhow!("feature bank {}: {msg}", path.display());
        if map.len() < IDS_OFFSET as usize || map[..8] != BANK_MAGIC {
            return Err(fail(
                "not an illmrec feature bank (wrong magic bytes or too short)".into(),
            ));
        }
        let (header, _): (BankHeader, usize) =
            bincode::decode_from_slice(&map[..HEADER_LEN], bincode_config())
                .map_err(|e| fail(format!("unreadable header: {e}")))?;
        if header.version != BANK_VERSION {
            return Err(fail(format!(
                "format version {} is not supported (this build reads {BANK_VERSION})",
                header.version
            )));
        }
        let modality = Modality::from_code(header.modality).map_err(|e| fail(e.to_string()))?;
        let dtype = match header.dtype {
            0 => DType::F32,
            1 => DType::F16,
            c => return Err(fail(format!("unknown dtype code {c}"))),
        };
        if header.dim == 0 {
            return Err(fail("dimension is 0".into()));
        }
        let rows_at = header
            .count
            .checked_mul(8)
            .and_then(|n| n.checked_add(IDS_OFFSET + 63))
            .map(|n| n / 64 * 64);
        let expected_len = rows_at
            .and_then(|at| {
                header
                    .count
                    .checked_mul(header.dim as u64 * dtype.width() as u64)
                    .and_then(|n| n.checked_add(at))
            })
            .ok_or_else(|| fail("header sizes overflow".into()))?;
        if header.ids_offset != IDS_OFFSET
            || Some(header.rows_offset) != rows_at
            || header.file_len != expected_len
        {
            return Err(fail("header offsets are inconsistent".into()));
        }
        if map.len() as u64 != expected_len {
            return Err(fail(format!(
                "file is {} bytes but the header describes {expected_len} (truncated or padded file)",
                map.len()
            )));
        }
        Ok(Self {
            path: path.to_path_buf(),
            storage,
            header,
            modality,
            dtype,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn dim(&self) -> usize {
        self.header.dim as usize
    }
    pub fn len(&self) -> usize {
        self.header.count as usize
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn checksum_hex(&self) -> String {
        hex(&self.header.checksum)
    }

    /// The sorted item ids, borrowed from the mapping.
    pub fn ids(&self) -> &[u64] {
        let bytes =
            &self.storage.bytes()[IDS_OFFSET as usize..IDS_OFFSET as usize + 8 * self.len()];
        bytemuck::cast_slice(bytes)
    }

    /// Row index of an item id, or `None` when the bank has no feature for it.
    pub fn index_of(&self, id: u64) -> Option<usize> {
        self.ids().binary_search(&id).ok()
    }

    /// The `i`-th row, borrowed from the mapping.
    pub fn row_at(&self, i: usize) -> Row<'_> {
        let width = self.dim() * self.dtype.width();
        let start = self.header.rows_offset as usize + i * width;
        let bytes = &self.storage.bytes()[start..start + width];
        match self.dtype {
            DType::F32 => Row::F32(bytemuck::cast_slice(bytes)),
            DType::F16 => Row::F16(bytemuck::cast_slice(bytes)),
        }
    }

    pub fn get(&self, id: u64) -> Option<Row<'_>> {
        self.index_of(id).map(|i| self.row_at(i))
    }

    /// Like [`Bank::get`], but an unknown id is an error naming the bank.
    pub fn row(&self, id: u64) -> Result<Row<'_>> {
        self.get(id).with_context(|| {
            format!(
                "item {id} is not in the {} bank {}",
                self.modality,
                self.path.display()
            )
        })
    }

    /// Checks the payload: its sha256 against the header, then [`Bank::check_contents`].
    pub fn verify(&self) -> Result<()> {
        let digest = Sha256::digest(&self.storage.bytes()[IDS_OFFSET as usize..]);
        ensure!(
            digest.as_slice() == self.header.checksum,
            "feature bank {}: checksum mismatch (header {}, payload {}): the file is corrupt",
            self.path.display(),
            self.checksum_hex(),
            hex(&digest)
        );
        self.check_contents()
    }

    /// sha256 of the whole file (what a bundle manifest records).
    pub fn file_sha256(&self) -> [u8; 32] {
        Sha256::digest(self.storage.bytes()).into()
    }

    /// Checks what the checksum cannot: that the ids are strictly ascending (lookups are
    /// binary searches) and that every value is finite. One pass, no hashing.
    pub fn check_contents(&self) -> Result<()> {
        let ids = self.ids();
        if let Some(w) = ids.windows(2).find(|w| w[0] >= w[1]) {
            bail!(
                "feature bank {}: item ids are not strictly ascending ({} before {})",
                self.path.display(),
                w[0],
                w[1]
            );
        }
        for (i, &id) in ids.iter().enumerate() {
            let finite = match self.row_at(i) {
                Row::F32(r) => r.iter().all(|v| v.is_finite()),
                Row::F16(r) => r.iter().all(|v| v.is_finite()),
            };
            ensure!(
                finite,
                "feature bank {}: the row of item {id} has a NaN or infinite value",
                self.path.display()
            );
        }
        Ok(())
    }
}

/// Rows to write into a new bank, in any id order.
pub enum BankRows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

/// Writes a bank atomically (temporary file, fsync, rename). Ids must be unique; rows are
/// stored sorted by id.
pub fn write_bank(
    path: &Path,
    modality: Modality,
    dim: usize,
    ids: &[u64],
    rows: BankRows<'_>,
) -> Result<BankHeader> {
    let (header, bytes) = encode_bank(modality, dim, ids, rows)?;
    write_atomic(path, |out| Ok(out.write_all(&bytes)?))?;
    Ok(header)
}

/// A bank's bytes (what [`write_bank`] writes).
pub fn encode_bank(
    modality: Modality,
    dim: usize,
    ids: &[u64],
    rows: BankRows<'_>,
) -> Result<(BankHeader, Vec<u8>)> {
    ensure!(dim > 0, "feature dimension must be positive");
    let (n_values, dtype) = match rows {
        BankRows::F32(r) => (r.len(), DType::F32),
        BankRows::F16(r) => (r.len(), DType::F16),
    };
    ensure!(
        n_values == ids.len() * dim,
        "{} ids but {n_values} values: expected ids × dim = {} × {dim}",
        ids.len(),
        ids.len()
    );
    let finite = match rows {
        BankRows::F32(r) => r.iter().position(|v| !v.is_finite()),
        BankRows::F16(r) => r.iter().position(|v| !v.is_finite()),
    };
    if let Some(i) = finite {
        bail!(
            "the row of item {} has a NaN or infinite value",
            ids[i / dim]
        );
    }
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by_key(|&i| ids[i]);
    if let Some(w) = order.windows(2).find(|w| ids[w[0]] == ids[w[1]]) {
        bail!("item id {} appears more than once", ids[w[0]]);
    }
    let count = ids.len() as u64;
    let mut payload =
        Vec::with_capacity((rows_offset(count) - IDS_OFFSET) as usize + n_values * dtype.width());
    for &i in &order {
        payload.extend_from_slice(&ids[i].to_le_bytes());
    }
    payload.resize((rows_offset(count) - IDS_OFFSET) as usize, 0);
    for &i in &order {
        match rows {
            BankRows::F32(r) => r[i * dim..(i + 1) * dim]
                .iter()
                .for_each(|v| payload.extend_from_slice(&v.to_le_bytes())),
            BankRows::F16(r) => r[i * dim..(i + 1) * dim]
                .iter()
                .for_each(|v| payload.extend_from_slice(&v.to_le_bytes())),
        }
    }
    let header = BankHeader {
        magic: BANK_MAGIC,
        version: BANK_VERSION,
        modality: modality.code(),
        dtype: match dtype {
            DType::F32 => 0,
            DType::F16 => 1,
        },
        reserved0: 0,
        dim: u32::try_from(dim).context("dimension too large")?,
        reserved1: 0,
        count,
        ids_offset: IDS_OFFSET,
        rows_offset: rows_offset(count),
        file_len: IDS_OFFSET + payload.len() as u64,
        checksum: Sha256::digest(&payload).into(),
    };
    let mut bytes = vec![0u8; IDS_OFFSET as usize];
    let n = bincode::encode_into_slice(&header, &mut bytes, bincode_config())?;
    debug_assert_eq!(n, HEADER_LEN);
    bytes.extend_from_slice(&payload);
    Ok((header, bytes))
}
