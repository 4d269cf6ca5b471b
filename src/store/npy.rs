//! Minimal reader for NumPy `.npy` files: little-endian, C order, 1-D or 2-D, the dtypes that
//! feature matrices and id lists use.

use anyhow::{bail, Context, Result};
use half::f16;
use std::path::Path;

/// A 1-D or 2-D array read from a `.npy` file.
pub struct NpyArray {
    pub shape: Vec<usize>,
    pub data: NpyData,
}

pub enum NpyData {
    F32(Vec<f32>),
    F16(Vec<f16>),
    I64(Vec<i64>),
}

impl NpyArray {
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = crate::store::fsutil::read_regular(path)?;
        Self::parse(&bytes).with_context(|| format!("{} is not a usable .npy file", path.display()))
    }

    pub fn parse(bytes: &[u8]) -> Result<Self> {
        if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
            bail!("missing the .npy magic bytes");
        }
        let major = bytes[6];
        let (header_len, start) = match major {
            1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
            2 | 3 => {
                if bytes.len() < 12 {
                    bail!("truncated header");
                }
                (
                    u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize,
                    12,
                )
            }
            v => bail!("unsupported .npy version {v}"),
        };
        let header = bytes
            .get(start..start + header_len)
            .context("truncated header")?;
        let header = std::str::from_utf8(header).context("header is not text")?;
        let descr = dict_value(header, "descr").context("header has no 'descr'")?;
        let quote = descr
            .chars()
            .next()
            .filter(|c| *c == '\'' || *c == '"')
            .context("'descr' is not a string")?;
        let descr = descr[1..].split(quote).next().unwrap_or("");
        if dict_value(header, "fortran_order").is_some_and(|v| v.starts_with("True")) {
            bail!("Fortran-ordered arrays are not supported; save with np.ascontiguousarray");
        }
        let shape_text = dict_value(header, "shape").context("header has no 'shape'")?;
        let shape_text = shape_text
            .trim_start_matches('(')
            .split(')')
            .next()
            .unwrap_or("");
        let shape: Vec<usize> = shape_text
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().with_context(|| format!("bad shape entry '{s}'")))
            .collect::<Result<_>>()?;
        if shape.is_empty() || shape.len() > 2 {
            bail!("expected a 1-D or 2-D array, found shape {shape:?}");
        }
        let count = shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .with_context(|| format!("shape {shape:?} is too large"))?;
        let payload = &bytes[start + header_len..];
        let need = |width: usize| -> Result<&[u8]> {
            let len = count
                .checked_mul(width)
                .with_context(|| format!("shape {shape:?} is too large"))?;
            payload.get(..len).with_context(|| {
                format!(
                    "payload is truncated: {} bytes for {count} values of {width} bytes",
                    payload.len()
                )
            })
        };
        let data = match descr {
            "<f4" => NpyData::F32(
                need(4)?
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            "<f2" => NpyData::F16(
                need(2)?
                    .chunks_exact(2)
                    .map(|c| f16::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            "<i8" => NpyData::I64(
                need(8)?
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            "<u8" => NpyData::I64(
                need(8)?
                    .chunks_exact(8)
                    .map(|c| {
                        i64::try_from(u64::from_le_bytes(c.try_into().unwrap()))
                            .context("id does not fit in i64")
                    })
                    .collect::<Result<_>>()?,
            ),
            "<i4" => NpyData::I64(
                need(4)?
                    .chunks_exact(4)
                    .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
                    .collect(),
            ),
            other => bail!("unsupported dtype '{other}' (expected <f4, <f2, <i8, <u8 or <i4)"),
        };
        Ok(Self { shape, data })
    }
}

/// Value text following `'key':` in the header's Python dict literal.
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let at = header.find(&format!("'{key}'"))?;
    let rest = &header[at + key.len() + 2..];
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    Some(rest)
}

/// Writes a 2-D little-endian f32 `.npy` (used by tests and tools).
pub fn encode_f32(rows: usize, cols: usize, values: &[f32]) -> Vec<u8> {
    encode(
        "<f4",
        &format!("({rows}, {cols})"),
        &values
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<_>>(),
    )
}

/// Writes a 1-D little-endian i64 `.npy`.
pub fn encode_i64(values: &[i64]) -> Vec<u8> {
    encode(
        "<i8",
        &format!("({},)", values.len()),
        &values
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<_>>(),
    )
}

fn encode(descr: &str, shape: &str, payload: &[u8]) -> Vec<u8> {
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(payload);
    out
}

/// Appends f32 rows of a 2-D `.npy` file that is written over several runs: rows go to
/// `<out>.partial` (a complete `.npy` header for the final row count, then the rows so far) and
/// the file is renamed to `out` when the last row is in. A run killed at any point leaves every
/// row it synced; [`RowWriter::open`] on the same `out`, row count and width continues after the
/// last whole row (a torn row is cut off).
pub struct RowWriter {
    file: std::fs::File,
    partial: std::path::PathBuf,
    out: std::path::PathBuf,
    rows: usize,
    cols: usize,
    done: usize,
    header_len: u64,
}

impl RowWriter {
    /// Opens or resumes `out` for `rows` × `cols` values. `resume: false` starts over.
    pub fn open(out: &Path, rows: usize, cols: usize, resume: bool) -> Result<Self> {
        use std::io::{Seek, SeekFrom, Write};
        let mut name = out
            .file_name()
            .with_context(|| format!("{} is not a file path", out.display()))?
            .to_os_string();
        name.push(".partial");
        let partial = out.with_file_name(name);
        let header = encode("<f4", &format!("({rows}, {cols})"), &[]);
        let row_bytes = (cols * 4) as u64;
        let existing = resume
            .then(|| std::fs::read(&partial).ok())
            .flatten()
            .filter(|b| b.len() >= header.len() && b[..header.len()] == header[..]);
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(existing.is_none())
            .open(&partial)
            .with_context(|| format!("cannot open {}", partial.display()))?;
        let done = match existing {
            Some(bytes) => ((bytes.len() - header.len()) as u64 / row_bytes) as usize,
            None => {
                file.write_all(&header)?;
                0
            }
        };
        let done = done.min(rows);
        let end = header.len() as u64 + done as u64 * row_bytes;
        file.set_len(end)?;
        file.seek(SeekFrom::Start(end))?;
        Ok(Self {
            file,
            partial,
            out: out.to_path_buf(),
            rows,
            cols,
            done,
            header_len: header.len() as u64,
        })
    }

    /// Rows already written (by this run or an earlier one).
    pub fn done(&self) -> usize {
        self.done
    }

    /// Drops the rows after the first `rows` (to resume at a boundary the caller knows).
    pub fn truncate(&mut self, rows: usize) -> Result<()> {
        use std::io::{Seek, SeekFrom};
        if rows < self.done {
            let end = self.header_len + (rows * self.cols * 4) as u64;
            self.file.set_len(end)?;
            self.file.seek(SeekFrom::Start(end))?;
            self.done = rows;
        }
        Ok(())
    }

    pub fn push(&mut self, row: &[f32]) -> Result<()> {
        use std::io::Write;
        anyhow::ensure!(
            row.len() == self.cols,
            "row has {} values, expected {}",
            row.len(),
            self.cols
        );
        anyhow::ensure!(self.done < self.rows, "all {} rows are written", self.rows);
        let bytes: Vec<u8> = row.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.file.write_all(&bytes)?;
        self.done += 1;
        Ok(())
    }

    /// Makes the rows written so far durable.
    pub fn sync(&mut self) -> Result<()> {
        self.file.sync_data()?;
        Ok(())
    }

    /// Syncs and, when every row is in, moves the file to its final name; returns whether it did.
    pub fn finish(mut self) -> Result<bool> {
        self.sync()?;
        if self.done < self.rows {
            return Ok(false);
        }
        debug_assert_eq!(
            self.file.metadata()?.len(),
            self.header_len + (self.rows * self.cols * 4) as u64
        );
        std::fs::rename(&self.partial, &self.out)
            .with_context(|| format!("cannot move {} into place", self.out.display()))?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run killed mid-row resumes after the last whole row; the finished file is a valid .npy.
    #[test]
    fn row_writer_resumes_after_a_torn_row() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("s.npy");
        let mut w = RowWriter::open(&out, 3, 2, true).unwrap();
        w.push(&[1.0, 2.0]).unwrap();
        w.sync().unwrap();
        assert!(!w.finish().unwrap(), "not all rows are in");
        // A torn second row: half of its bytes.
        let partial = dir.path().join("s.npy.partial");
        let mut bytes = std::fs::read(&partial).unwrap();
        bytes.extend_from_slice(&3.0f32.to_le_bytes());
        std::fs::write(&partial, &bytes).unwrap();
        let mut w = RowWriter::open(&out, 3, 2, true).unwrap();
        assert_eq!(w.done(), 1);
        w.push(&[3.0, 4.0]).unwrap();
        w.push(&[5.0, 6.0]).unwrap();
        assert!(w.finish().unwrap());
        assert!(!partial.exists());
        let a = NpyArray::read(&out).unwrap();
        assert_eq!(a.shape, vec![3, 2]);
        match a.data {
            NpyData::F32(v) => assert_eq!(v, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
            _ => panic!("not f32"),
        }
        // Another shape or restart: starts over.
        let w = RowWriter::open(&dir.path().join("t.npy"), 2, 2, true).unwrap();
        assert_eq!(w.done(), 0);
    }
}
