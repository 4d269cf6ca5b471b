//! A minimal, bounds-checked reader of TFLite's flatbuffer format: just the tables, scalars and
//! vectors that loading the MobileNet graph ([`super::mobilenet`]) needs.

use anyhow::{ensure, Context, Result};

// TFLite schema codes used here.
pub(super) const OP_AVERAGE_POOL_2D: i32 = 1;
pub(super) const OP_CONV_2D: i32 = 3;
pub(super) const OP_DEPTHWISE_CONV_2D: i32 = 4;
pub(super) const TYPE_INT32: u8 = 2;
pub(super) const TYPE_UINT8: u8 = 3;
pub(super) const PADDING_SAME: u8 = 0;
pub(super) const ACT_NONE: u8 = 0;
pub(super) const ACT_RELU: u8 = 1;
pub(super) const ACT_RELU6: u8 = 3;

/// A minimal, bounds-checked flatbuffer table reader (just what the TFLite schema needs).
#[derive(Clone, Copy)]
pub(super) struct Table<'a> {
    buf: &'a [u8],
    pos: usize,
    vtable: usize,
    vtable_len: usize,
}

fn read_u32(buf: &[u8], pos: usize) -> Result<u32> {
    let b = buf
        .get(pos..pos.checked_add(4).context("offset overflow")?)
        .context("flatbuffer offset out of bounds")?;
    Ok(u32::from_le_bytes(b.try_into().unwrap()))
}

fn read_u16(buf: &[u8], pos: usize) -> Result<u16> {
    let b = buf
        .get(pos..pos.checked_add(2).context("offset overflow")?)
        .context("flatbuffer offset out of bounds")?;
    Ok(u16::from_le_bytes(b.try_into().unwrap()))
}

impl<'a> Table<'a> {
    pub(super) fn at(buf: &'a [u8], pos: usize) -> Result<Self> {
        let soffset = read_u32(buf, pos)? as i32 as i64;
        let vtable = usize::try_from(pos as i64 - soffset).context("bad vtable offset")?;
        let vtable_len = read_u16(buf, vtable)? as usize;
        ensure!(vtable_len >= 4, "bad vtable");
        Ok(Self {
            buf,
            pos,
            vtable,
            vtable_len,
        })
    }

    pub(super) fn root(buf: &'a [u8]) -> Result<Self> {
        Self::at(buf, read_u32(buf, 0)? as usize)
    }

    /// Where field `slot` is stored, if present.
    pub(super) fn field(&self, slot: usize) -> Result<Option<usize>> {
        let entry = 4 + 2 * slot;
        if entry + 2 > self.vtable_len {
            return Ok(None);
        }
        let off = read_u16(self.buf, self.vtable + entry)? as usize;
        Ok((off != 0).then_some(self.pos + off))
    }

    pub(super) fn scalar<const N: usize>(&self, slot: usize) -> Result<Option<[u8; N]>> {
        match self.field(slot)? {
            None => Ok(None),
            Some(p) => Ok(Some(
                self.buf
                    .get(p..p + N)
                    .context("flatbuffer field out of bounds")?
                    .try_into()
                    .unwrap(),
            )),
        }
    }

    pub(super) fn u8(&self, slot: usize, default: u8) -> Result<u8> {
        Ok(self.scalar::<1>(slot)?.map_or(default, |b| b[0]))
    }

    pub(super) fn i32(&self, slot: usize, default: i32) -> Result<i32> {
        Ok(self.scalar::<4>(slot)?.map_or(default, i32::from_le_bytes))
    }

    /// The target of an offset field.
    pub(super) fn indirect(&self, slot: usize) -> Result<Option<usize>> {
        match self.field(slot)? {
            None => Ok(None),
            Some(p) => Ok(Some(
                p.checked_add(read_u32(self.buf, p)? as usize)
                    .context("offset overflow")?,
            )),
        }
    }

    pub(super) fn table(&self, slot: usize) -> Result<Option<Table<'a>>> {
        self.indirect(slot)?
            .map(|p| Table::at(self.buf, p))
            .transpose()
    }

    /// A vector field: (first element position, length).
    pub(super) fn vector(&self, slot: usize, elem: usize) -> Result<(usize, usize)> {
        let Some(p) = self.indirect(slot)? else {
            return Ok((0, 0));
        };
        let len = read_u32(self.buf, p)? as usize;
        let end = len
            .checked_mul(elem)
            .and_then(|n| n.checked_add(p + 4))
            .context("vector length overflow")?;
        ensure!(end <= self.buf.len(), "flatbuffer vector out of bounds");
        Ok((p + 4, len))
    }

    pub(super) fn bytes(&self, slot: usize) -> Result<&'a [u8]> {
        let (start, len) = self.vector(slot, 1)?;
        Ok(&self.buf[start..start + len])
    }

    pub(super) fn tables(&self, slot: usize) -> Result<Vec<Table<'a>>> {
        let (start, len) = self.vector(slot, 4)?;
        (0..len)
            .map(|i| {
                let p = start + 4 * i;
                Table::at(self.buf, p + read_u32(self.buf, p)? as usize)
            })
            .collect()
    }

    pub(super) fn i32s(&self, slot: usize) -> Result<Vec<i32>> {
        Ok(self
            .bytes4(slot)?
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
            .collect())
    }

    pub(super) fn f32s(&self, slot: usize) -> Result<Vec<f32>> {
        Ok(self
            .bytes4(slot)?
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect())
    }

    pub(super) fn i64s(&self, slot: usize) -> Result<Vec<i64>> {
        let (start, len) = self.vector(slot, 8)?;
        Ok(self.buf[start..start + 8 * len]
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect())
    }

    pub(super) fn bytes4(&self, slot: usize) -> Result<&'a [u8]> {
        let (start, len) = self.vector(slot, 4)?;
        Ok(&self.buf[start..start + 4 * len])
    }
}
