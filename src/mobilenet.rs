//! The MobileNet v1 embedding extractor that the Python tools run through TFLite
//! (`models/mobilenet/mobilenet_v1_1.0_224_quant_embedding_extractor.tflite`, Apache-2.0, built
//! into the binary): reading its weights out of the `.tflite` flatbuffer and running its
//! uint8-quantized graph with the integer arithmetic of XNNPACK, the kernels `ai-edge-litert`
//! runs on x86 (so that the embedding is the Python side's, not an approximation of it).
//!
//! The graph is a chain of `CONV_2D`, `DEPTHWISE_CONV_2D` and one `AVERAGE_POOL_2D`, every tensor
//! per-tensor quantized. Each layer's accumulator is the exact integer
//! `bias + Σ (x − x_zp)(w − w_zp)` (i16 operands, i32 sums); it is requantized as XNNPACK's
//! "fp32" scheme does: `clamp(round_half_even(acc · (s_x·s_w/s_y)) + y_zp, qmin, qmax)` with the
//! scale in f32. Pointwise and full convolutions are one integer matrix product each (im2col
//! for the first) with an AVX2 `vpmaddwd` kernel where the CPU has it (checked at run time; a
//! plain loop elsewhere); depthwise layers are direct loops over channels. The result is the
//! same integers whichever path runs.

use anyhow::{bail, ensure, Context, Result};

/// The model file, as shipped in `models/mobilenet/` (with its licence).
pub const MODEL_BYTES: &[u8] =
    include_bytes!("../models/mobilenet/mobilenet_v1_1.0_224_quant_embedding_extractor.tflite");
/// sha256 of [`MODEL_BYTES`] (the same as `tools/illmrec_tools/features.py`'s `MODEL_SHA256`).
pub const MODEL_SHA256: &str = "f409ef4f73fcbb9667841965623c5c8524aac33d41b9bf5f3667161fb4a76319";

// TFLite schema codes used here.
const OP_AVERAGE_POOL_2D: i32 = 1;
const OP_CONV_2D: i32 = 3;
const OP_DEPTHWISE_CONV_2D: i32 = 4;
const TYPE_INT32: u8 = 2;
const TYPE_UINT8: u8 = 3;
const PADDING_SAME: u8 = 0;
const ACT_NONE: u8 = 0;
const ACT_RELU: u8 = 1;
const ACT_RELU6: u8 = 3;

/// A minimal, bounds-checked flatbuffer table reader (just what the TFLite schema needs).
#[derive(Clone, Copy)]
struct Table<'a> {
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
    fn at(buf: &'a [u8], pos: usize) -> Result<Self> {
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

    fn root(buf: &'a [u8]) -> Result<Self> {
        Self::at(buf, read_u32(buf, 0)? as usize)
    }

    /// Where field `slot` is stored, if present.
    fn field(&self, slot: usize) -> Result<Option<usize>> {
        let entry = 4 + 2 * slot;
        if entry + 2 > self.vtable_len {
            return Ok(None);
        }
        let off = read_u16(self.buf, self.vtable + entry)? as usize;
        Ok((off != 0).then_some(self.pos + off))
    }

    fn scalar<const N: usize>(&self, slot: usize) -> Result<Option<[u8; N]>> {
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

    fn u8(&self, slot: usize, default: u8) -> Result<u8> {
        Ok(self.scalar::<1>(slot)?.map_or(default, |b| b[0]))
    }

    fn i32(&self, slot: usize, default: i32) -> Result<i32> {
        Ok(self.scalar::<4>(slot)?.map_or(default, i32::from_le_bytes))
    }

    /// The target of an offset field.
    fn indirect(&self, slot: usize) -> Result<Option<usize>> {
        match self.field(slot)? {
            None => Ok(None),
            Some(p) => Ok(Some(
                p.checked_add(read_u32(self.buf, p)? as usize)
                    .context("offset overflow")?,
            )),
        }
    }

    fn table(&self, slot: usize) -> Result<Option<Table<'a>>> {
        self.indirect(slot)?
            .map(|p| Table::at(self.buf, p))
            .transpose()
    }

    /// A vector field: (first element position, length).
    fn vector(&self, slot: usize, elem: usize) -> Result<(usize, usize)> {
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

    fn bytes(&self, slot: usize) -> Result<&'a [u8]> {
        let (start, len) = self.vector(slot, 1)?;
        Ok(&self.buf[start..start + len])
    }

    fn tables(&self, slot: usize) -> Result<Vec<Table<'a>>> {
        let (start, len) = self.vector(slot, 4)?;
        (0..len)
            .map(|i| {
                let p = start + 4 * i;
                Table::at(self.buf, p + read_u32(self.buf, p)? as usize)
            })
            .collect()
    }

    fn i32s(&self, slot: usize) -> Result<Vec<i32>> {
        Ok(self
            .bytes4(slot)?
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
            .collect())
    }

    fn f32s(&self, slot: usize) -> Result<Vec<f32>> {
        Ok(self
            .bytes4(slot)?
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect())
    }

    fn i64s(&self, slot: usize) -> Result<Vec<i64>> {
        let (start, len) = self.vector(slot, 8)?;
        Ok(self.buf[start..start + 8 * len]
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect())
    }

    fn bytes4(&self, slot: usize) -> Result<&'a [u8]> {
        let (start, len) = self.vector(slot, 4)?;
        Ok(&self.buf[start..start + 4 * len])
    }
}

/// One tensor of the graph: shape, type, per-tensor quantization and constant data.
struct Tensor<'a> {
    shape: Vec<usize>,
    dtype: u8,
    scale: f32,
    zero_point: i32,
    data: &'a [u8],
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Quant {
    scale: f32,
    zero_point: i32,
}

enum Layer {
    /// A full convolution (`k`×`k`, im2col + one matrix product; k = 1 is pointwise).
    Conv {
        k: usize,
        stride: usize,
        same: bool,
        cin: usize,
        cout: usize,
        /// `w − w_zp`, [cout][kp] (TFLite's OHWI order, each row zero-padded to kp = k·k·cin
        /// rounded up to a multiple of [`LANES`]).
        weights: Vec<i16>,
        /// The same, packed for the AVX2 kernel ([`pack_pairs`]).
        packed: Vec<i16>,
        kp: usize,
        bias: Vec<i32>,
        scale: f32,
        out_zp: i32,
        qmin: i32,
        qmax: i32,
    },
    /// A depthwise 3×3-style convolution with depth multiplier 1.
    Depthwise {
        k: usize,
        stride: usize,
        same: bool,
        channels: usize,
        /// `w − w_zp`, [k·k][channels].
        weights: Vec<i16>,
        bias: Vec<i32>,
        scale: f32,
        out_zp: i32,
        qmin: i32,
        qmax: i32,
    },
    /// Average over the whole `k`×`k` input (one output position).
    AvgPool { k: usize, scale: f32 },
}

/// The loaded network.
pub struct MobileNet {
    input: Quant,
    input_size: usize,
    layers: Vec<Layer>,
    output: Quant,
    dim: usize,
}

/// Output activation range of a fused activation, in quantized units (TFLite's rule).
fn activation_range(act: u8, q: Quant) -> Result<(i32, i32)> {
    let quant = |x: f32| q.zero_point + (x / q.scale).round() as i32;
    Ok(match act {
        ACT_NONE => (0, 255),
        ACT_RELU => (quant(0.0).max(0), 255),
        ACT_RELU6 => (quant(0.0).max(0), quant(6.0).min(255)),
        other => bail!("fused activation {other} is not supported"),
    })
}

/// Output size and padding before, TFLite's SAME/VALID rule.
fn out_size(input: usize, k: usize, stride: usize, same: bool) -> (usize, usize) {
    if same {
        let out = input.div_ceil(stride);
        let total = ((out - 1) * stride + k).saturating_sub(input);
        (out, total / 2)
    } else {
        ((input - k) / stride + 1, 0)
    }
}

impl MobileNet {
    /// The shipped model.
    pub fn shipped() -> Result<Self> {
        Self::from_tflite(MODEL_BYTES)
    }

    /// Reads a uint8-quantized chain of CONV_2D / DEPTHWISE_CONV_2D / AVERAGE_POOL_2D from
    /// `.tflite` bytes; anything else in the graph is an error.
    pub fn from_tflite(buf: &[u8]) -> Result<Self> {
        let model = Table::root(buf).context("not a TFLite model")?;
        let codes: Vec<i32> = model
            .tables(1)?
            .iter()
            .map(|c| {
                let deprecated = c.u8(0, 0)? as i32;
                let code = c.i32(3, 0)?;
                Ok(code.max(deprecated))
            })
            .collect::<Result<_>>()?;
        let buffers = model.tables(4)?;
        let subgraphs = model.tables(2)?;
        ensure!(subgraphs.len() == 1, "expected one subgraph");
        let g = subgraphs[0];
        let tensors: Vec<Tensor> = g
            .tables(0)?
            .iter()
            .map(|t| {
                let shape = t
                    .i32s(0)?
                    .into_iter()
                    .map(|d| usize::try_from(d).context("negative dimension"))
                    .collect::<Result<Vec<_>>>()?;
                let buffer = t.i32(2, 0)? as usize;
                let data = match buffers.get(buffer) {
                    Some(b) => b.bytes(0)?,
                    None => &[],
                };
                let (scale, zero_point) = match t.table(4)? {
                    Some(q) => {
                        let s = q.f32s(2)?;
                        let z = q.i64s(3)?;
                        ensure!(s.len() <= 1, "per-channel quantization is not supported");
                        (
                            s.first().copied().unwrap_or(0.0),
                            z.first().copied().unwrap_or(0) as i32,
                        )
                    }
                    None => (0.0, 0),
                };
                Ok(Tensor {
                    shape,
                    dtype: t.u8(1, 0)?,
                    scale,
                    zero_point,
                    data,
                })
            })
            .collect::<Result<_>>()?;
        let get = |i: i32| -> Result<&Tensor> {
            tensors
                .get(usize::try_from(i).context("bad tensor index")?)
                .context("tensor index out of range")
        };
        let quant = |t: &Tensor| -> Result<Quant> {
            ensure!(
                t.dtype == TYPE_UINT8 && t.scale > 0.0 && t.scale.is_finite(),
                "expected a uint8 tensor with a positive scale"
            );
            Ok(Quant {
                scale: t.scale,
                zero_point: t.zero_point,
            })
        };
        let inputs = g.i32s(1)?;
        ensure!(inputs.len() == 1, "expected one input");
        let input_t = get(inputs[0])?;
        let input = quant(input_t)?;
        ensure!(
            input_t.shape.len() == 4
                && input_t.shape[0] == 1
                && input_t.shape[1] == input_t.shape[2]
                && input_t.shape[3] == 3,
            "expected a 1×S×S×3 input, found {:?}",
            input_t.shape
        );
        let input_size = input_t.shape[1];
        let (mut size, mut channels, mut current) = (input_size, 3usize, input);
        let mut layers = Vec::new();
        let mut last = inputs[0];
        let mut output = input;
        for op in g.tables(3)? {
            let code = *codes
                .get(op.i32(0, 0)? as usize)
                .context("bad opcode index")?;
            let ins = op.i32s(1)?;
            let outs = op.i32s(2)?;
            ensure!(
                !ins.is_empty() && outs.len() == 1 && ins[0] == last,
                "the graph is not a single chain"
            );
            let out_t = get(outs[0])?;
            let out_q = quant(out_t)?;
            let opts = op.table(4)?;
            match code {
                OP_CONV_2D | OP_DEPTHWISE_CONV_2D => {
                    ensure!(ins.len() == 3, "convolution without bias");
                    let w = get(ins[1])?;
                    let b = get(ins[2])?;
                    let wq = quant(w)?;
                    ensure!(
                        (0..=255).contains(&wq.zero_point)
                            && (0..=255).contains(&current.zero_point),
                        "zero points must be within 0..=255"
                    );
                    ensure!(
                        b.dtype == TYPE_INT32 && w.shape.len() == 4 && w.shape[1] == w.shape[2],
                        "unexpected convolution weights"
                    );
                    let opts = opts.context("convolution without options")?;
                    let same = opts.u8(0, 0)? == PADDING_SAME;
                    let (sw, sh) = (opts.i32(1, 1)?, opts.i32(2, 1)?);
                    ensure!(sw == sh && sw >= 1, "unequal strides are not supported");
                    let act_slot = if code == OP_CONV_2D { 3 } else { 4 };
                    let (dil_w, dil_h) = if code == OP_CONV_2D {
                        (opts.i32(4, 1)?, opts.i32(5, 1)?)
                    } else {
                        (opts.i32(5, 1)?, opts.i32(6, 1)?)
                    };
                    ensure!(dil_w == 1 && dil_h == 1, "dilation is not supported");
                    let (qmin, qmax) = activation_range(opts.u8(act_slot, 0)?, out_q)?;
                    let k = w.shape[1];
                    let stride = sw as usize;
                    let weights: Vec<i16> = w
                        .data
                        .iter()
                        .map(|&v| (v as i32 - wq.zero_point) as i16)
                        .collect();
                    ensure!(
                        weights.len() == w.shape.iter().product::<usize>(),
                        "weights size does not match their shape"
                    );
                    let bias: Vec<i32> = b
                        .data
                        .chunks_exact(4)
                        .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
                        .collect();
                    // XNNPACK's requantization scale, in f32 as it computes it.
                    let scale = current.scale * wq.scale / out_q.scale;
                    let (out, _) = out_size(size, k, stride, same);
                    if code == OP_CONV_2D {
                        let cout = w.shape[0];
                        ensure!(
                            w.shape[3] == channels && bias.len() == cout,
                            "convolution shapes do not chain"
                        );
                        let kk = k * k * channels;
                        let kp = kk.div_ceil(LANES) * LANES;
                        let mut padded = vec![0i16; cout * kp];
                        for (dst, src) in padded.chunks_exact_mut(kp).zip(weights.chunks_exact(kk))
                        {
                            dst[..kk].copy_from_slice(src);
                        }
                        layers.push(Layer::Conv {
                            k,
                            stride,
                            same,
                            cin: channels,
                            cout,
                            packed: pack_pairs(&padded, cout, kp),
                            weights: padded,
                            kp,
                            bias,
                            scale,
                            out_zp: out_q.zero_point,
                            qmin,
                            qmax,
                        });
                        channels = cout;
                    } else {
                        ensure!(
                            w.shape[0] == 1 && w.shape[3] == channels && bias.len() == channels,
                            "only depth multiplier 1 is supported"
                        );
                        layers.push(Layer::Depthwise {
                            k,
                            stride,
                            same,
                            channels,
                            weights,
                            bias,
                            scale,
                            out_zp: out_q.zero_point,
                            qmin,
                            qmax,
                        });
                    }
                    size = out;
                }
                OP_AVERAGE_POOL_2D => {
                    let opts = opts.context("pooling without options")?;
                    let (fw, fh) = (opts.i32(3, 0)?, opts.i32(4, 0)?);
                    ensure!(
                        fw == fh && fw as usize == size,
                        "only a global average pool is supported"
                    );
                    let n = (size * size) as f32;
                    layers.push(Layer::AvgPool {
                        k: size,
                        scale: current.scale / (out_q.scale * n),
                    });
                    size = 1;
                }
                other => bail!("TFLite operator {other} is not supported"),
            }
            ensure!(
                out_t.shape == [1, size, size, channels],
                "output shape {:?} does not match the computed one",
                out_t.shape
            );
            current = out_q;
            output = out_q;
            last = outs[0];
        }
        ensure!(
            g.i32s(2)? == [last] && size == 1 && !layers.is_empty(),
            "the graph's output is not a 1×1 pooled embedding"
        );
        Ok(Self {
            input,
            input_size,
            layers,
            output,
            dim: channels,
        })
    }

    /// Side of the square RGB input (224).
    pub fn input_size(&self) -> usize {
        self.input_size
    }

    /// Embedding dimension (1024).
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The quantized embedding (uint8) of an `input_size`² RGB image (row-major, uint8 RGB).
    pub fn run_quantized(&self, rgb: &[u8]) -> Result<Vec<u8>> {
        let s = self.input_size;
        ensure!(
            rgb.len() == s * s * 3,
            "expected {s}×{s}×3 pixels, got {} bytes",
            rgb.len()
        );
        // Activations are kept as (q − zero point), in i16.
        let mut x: Vec<i16> = rgb
            .iter()
            .map(|&v| (v as i32 - self.input.zero_point) as i16)
            .collect();
        let mut size = s;
        let mut channels = 3;
        let mut scratch = Vec::new();
        for layer in &self.layers {
            match layer {
                Layer::Conv {
                    k,
                    stride,
                    same,
                    cin,
                    cout,
                    weights,
                    packed,
                    kp,
                    bias,
                    scale,
                    out_zp,
                    qmin,
                    qmax,
                } => {
                    let (out, pad) = out_size(size, *k, *stride, *same);
                    let a: &[i16] = if *k == 1 && *stride == 1 && cin == kp {
                        &x
                    } else {
                        im2col(&x, size, *cin, *k, *stride, out, pad, *kp, &mut scratch);
                        &scratch
                    };
                    let m = out * out;
                    let mut y = vec![0i16; m * cout];
                    let rq = Requant {
                        scale: *scale,
                        lo: (qmin - out_zp) as f32,
                        hi: (qmax - out_zp) as f32,
                    };
                    gemm(a, m, *kp, weights, packed, *cout, bias, &rq, &mut y);
                    x = y;
                    size = out;
                    channels = *cout;
                }
                Layer::Depthwise {
                    k,
                    stride,
                    same,
                    channels: c,
                    weights,
                    bias,
                    scale,
                    out_zp,
                    qmin,
                    qmax,
                } => {
                    let (out, pad) = out_size(size, *k, *stride, *same);
                    let rq = Requant {
                        scale: *scale,
                        lo: (qmin - out_zp) as f32,
                        hi: (qmax - out_zp) as f32,
                    };
                    let mut y = vec![0i16; out * out * c];
                    let shape = DwShape {
                        size,
                        c: *c,
                        k: *k,
                        stride: *stride,
                        out,
                        pad,
                    };
                    depthwise(&x, weights, bias, &shape, &rq, &mut y);
                    x = y;
                    size = out;
                }
                Layer::AvgPool { k, scale } => {
                    let mut sum = vec![0i32; channels];
                    for p in 0..k * k {
                        for (s, v) in sum.iter_mut().zip(&x[p * channels..][..channels]) {
                            *s += *v as i32;
                        }
                    }
                    let zp = self.output.zero_point;
                    let rq = Requant {
                        scale: *scale,
                        lo: (0 - zp) as f32,
                        hi: (255 - zp) as f32,
                    };
                    x = sum.iter().map(|s| rq.apply(*s)).collect();
                    size = 1;
                }
            }
        }
        debug_assert_eq!(size, 1);
        Ok(x.iter()
            .map(|v| (*v as i32 + self.output.zero_point) as u8)
            .collect())
    }

    /// The dequantized embedding, `(q − zp) · scale` in f32, as `features.py` computes it.
    pub fn run(&self, rgb: &[u8]) -> Result<Vec<f32>> {
        let q = self.run_quantized(rgb)?;
        Ok(q.iter()
            .map(|&v| (v as f32 - self.output.zero_point as f32) * self.output.scale)
            .collect())
    }
}

/// XNNPACK's fp32 requantization: `clamp(acc · scale)` rounded half to even, as (q − zp).
struct Requant {
    scale: f32,
    lo: f32,
    hi: f32,
}

impl Requant {
    #[inline(always)]
    fn apply(&self, acc: i32) -> i16 {
        // Round half to even by the 1.5·2^23 trick (exact for |v| < 2^22; v is within ±255
        // after the clamp): the same as `round_ties_even`, without a libm call.
        const MAGIC: f32 = 12_582_912.0;
        let v = (acc as f32 * self.scale).max(self.lo).min(self.hi);
        ((v + MAGIC) - MAGIC) as i16
    }
}

/// Geometry of a depthwise layer.
#[derive(Clone, Copy)]
struct DwShape {
    size: usize,
    c: usize,
    k: usize,
    stride: usize,
    out: usize,
    pad: usize,
}

/// A depthwise convolution over channels-last i16 activations (AVX2 build of the same loop
/// where the CPU has it).
fn depthwise(x: &[i16], w: &[i16], bias: &[i32], g: &DwShape, rq: &Requant, y: &mut [i16]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has the feature the function is compiled for.
            return unsafe { depthwise_avx2(x, w, bias, g, rq, y) };
        }
    }
    depthwise_generic(x, w, bias, g, rq, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn depthwise_avx2(
    x: &[i16],
    w: &[i16],
    bias: &[i32],
    g: &DwShape,
    rq: &Requant,
    y: &mut [i16],
) {
    depthwise_generic(x, w, bias, g, rq, y)
}

#[inline(always)]
fn depthwise_generic(x: &[i16], w: &[i16], bias: &[i32], g: &DwShape, rq: &Requant, y: &mut [i16]) {
    let DwShape {
        size,
        c,
        k,
        stride,
        out,
        pad,
    } = *g;
    let mut acc = vec![0i32; c];
    for oy in 0..out {
        for ox in 0..out {
            acc.copy_from_slice(bias);
            for ky in 0..k {
                let iy = (oy * stride + ky) as isize - pad as isize;
                if iy < 0 || iy >= size as isize {
                    continue;
                }
                for kx in 0..k {
                    let ix = (ox * stride + kx) as isize - pad as isize;
                    if ix < 0 || ix >= size as isize {
                        continue;
                    }
                    let src = &x[(iy as usize * size + ix as usize) * c..][..c];
                    let wk = &w[(ky * k + kx) * c..][..c];
                    for ((a, s), w) in acc.iter_mut().zip(src).zip(wk) {
                        *a += *s as i32 * *w as i32;
                    }
                }
            }
            let dst = &mut y[(oy * out + ox) * c..][..c];
            for (d, a) in dst.iter_mut().zip(&acc) {
                *d = rq.apply(*a);
            }
        }
    }
}

/// Width of the k-blocks of the matrix kernel (k is padded to a multiple of it).
const LANES: usize = 32;

/// `out[i][j] = requant(bias[j] + Σ_k a[i][k]·w[j][k])` for a [m×kp], w [n×kp] (kp a multiple of
/// [`LANES`]), out [m×n]: the exact integer product, with AVX2's `vpmaddwd` when the CPU has it
/// (chosen at run time; `wp` is `w` packed for it), else a plain loop.
#[allow(clippy::too_many_arguments)]
fn gemm(
    a: &[i16],
    m: usize,
    kp: usize,
    w: &[i16],
    wp: &[i16],
    n: usize,
    bias: &[i32],
    rq: &Requant,
    out: &mut [i16],
) {
    debug_assert!(kp.is_multiple_of(LANES));
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has the feature the function is compiled for; it checks the
            // slice lengths before reading through pointers.
            if n.is_multiple_of(16) {
                return unsafe { gemm_avx2(a, m, kp, wp, n, bias, rq, out) };
            }
        }
    }
    gemm_generic(a, m, kp, w, n, bias, rq, out)
}

/// AVX2: blocks of 4 rows × 16 output channels; each `vpmaddwd` multiplies a broadcast pair of
/// inputs with the same pair of 8 channels' weights (`wp`, packed by [`pack_pairs`]), so the
/// sums come out as vectors of channels and are requantized 8 at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_avx2(
    a: &[i16],
    m: usize,
    kp: usize,
    wp: &[i16],
    n: usize,
    bias: &[i32],
    rq: &Requant,
    out: &mut [i16],
) {
    use std::arch::x86_64::*;
    assert!(a.len() >= m * kp && wp.len() >= n * kp && out.len() >= m * n && bias.len() >= n);
    assert!(kp.is_multiple_of(2) && n.is_multiple_of(16));
    let (scale, lo, hi) = (
        _mm256_set1_ps(rq.scale),
        _mm256_set1_ps(rq.lo),
        _mm256_set1_ps(rq.hi),
    );
    let store = |acc: __m256i, j: usize, row: &mut [i16]| {
        let b = _mm256_loadu_si256(bias.as_ptr().add(j) as *const __m256i);
        let f = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(acc, b)), scale);
        // Rounds half to even (the default MXCSR mode), as XNNPACK does.
        let q = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(f, lo), hi));
        let mut v = [0i32; 8];
        _mm256_storeu_si256(v.as_mut_ptr() as *mut __m256i, q);
        for (d, x) in row[j..j + 8].iter_mut().zip(v) {
            *d = x as i16;
        }
    };
    let rows4 = m / 4 * 4;
    for i0 in (0..m).step_by(4) {
        let nrows = if i0 < rows4 { 4 } else { m - i0 };
        for j0 in (0..n).step_by(16) {
            let mut acc = [[_mm256_setzero_si256(); 2]; 4];
            for kk in 0..kp / 2 {
                let w = wp.as_ptr().add((kk * n + j0) * 2);
                let w0 = _mm256_loadu_si256(w as *const __m256i);
                let w1 = _mm256_loadu_si256(w.add(16) as *const __m256i);
                for (i, acc_i) in acc.iter_mut().enumerate().take(nrows) {
                    let pair =
                        (a.as_ptr().add((i0 + i) * kp + 2 * kk) as *const i32).read_unaligned();
                    let x = _mm256_set1_epi32(pair);
                    acc_i[0] = _mm256_add_epi32(acc_i[0], _mm256_madd_epi16(x, w0));
                    acc_i[1] = _mm256_add_epi32(acc_i[1], _mm256_madd_epi16(x, w1));
                }
            }
            for (i, acc_i) in acc.iter().enumerate().take(nrows) {
                let row = &mut out[(i0 + i) * n..][..n];
                store(acc_i[0], j0, row);
                store(acc_i[1], j0 + 8, row);
            }
        }
    }
}

/// Weights [n][kp] reordered as [kp/2][n][2] (pairs of consecutive k per channel), the layout
/// of the AVX2 kernel.
fn pack_pairs(w: &[i16], n: usize, kp: usize) -> Vec<i16> {
    let mut out = vec![0i16; n * kp];
    for j in 0..n {
        for k in 0..kp {
            out[((k / 2) * n + j) * 2 + k % 2] = w[j * kp + k];
        }
    }
    out
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn gemm_generic(
    a: &[i16],
    m: usize,
    kp: usize,
    w: &[i16],
    n: usize,
    bias: &[i32],
    rq: &Requant,
    out: &mut [i16],
) {
    for i in 0..m {
        let row = &a[i * kp..][..kp];
        let dst = &mut out[i * n..][..n];
        for (j, d) in dst.iter_mut().enumerate() {
            let col = &w[j * kp..][..kp];
            *d = rq.apply(dot(row, col) + bias[j]);
        }
    }
}

/// Σ a·b in i32 (the pattern compilers turn into `pmaddwd`).
#[inline(always)]
fn dot(a: &[i16], b: &[i16]) -> i32 {
    a.iter().zip(b).map(|(x, y)| *x as i32 * *y as i32).sum()
}

/// Rows of k×k×c input patches, each zero-padded to kp (zero = the input's zero point, which is
/// also what lies outside the image).
#[allow(clippy::too_many_arguments)]
fn im2col(
    x: &[i16],
    size: usize,
    c: usize,
    k: usize,
    stride: usize,
    out: usize,
    pad: usize,
    kp: usize,
    dst: &mut Vec<i16>,
) {
    dst.clear();
    dst.resize(out * out * kp, 0);
    let mut row = 0;
    for oy in 0..out {
        for ox in 0..out {
            let patch = &mut dst[row * kp..][..kp];
            for ky in 0..k {
                let iy = (oy * stride + ky) as isize - pad as isize;
                if iy < 0 || iy >= size as isize {
                    continue;
                }
                for kx in 0..k {
                    let ix = (ox * stride + kx) as isize - pad as isize;
                    if ix < 0 || ix >= size as isize {
                        continue;
                    }
                    patch[(ky * k + kx) * c..][..c]
                        .copy_from_slice(&x[(iy as usize * size + ix as usize) * c..][..c]);
                }
            }
            row += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    #[test]
    fn shipped_model_is_the_python_sides() {
        assert_eq!(
            crate::fsutil::hex(&Sha256::digest(MODEL_BYTES)),
            MODEL_SHA256
        );
        let net = MobileNet::shipped().unwrap();
        assert_eq!((net.input_size(), net.dim()), (224, 1024));
        assert_eq!(net.layers.len(), 28);
    }

    #[test]
    fn embedding_is_finite_non_negative_and_depends_on_the_picture() {
        let net = MobileNet::shipped().unwrap();
        let grey = net.run(&vec![128u8; 224 * 224 * 3]).unwrap();
        let noise: Vec<u8> = (0..224 * 224 * 3)
            .map(|i| ((i * 2654435761usize) >> 13) as u8)
            .collect();
        let other = net.run(&noise).unwrap();
        assert_eq!(grey.len(), 1024);
        assert!(grey
            .iter()
            .chain(&other)
            .all(|v| v.is_finite() && *v >= 0.0));
        assert_ne!(grey, other);
        assert_eq!(other, net.run(&noise).unwrap());
        assert!(net.run(&[0u8; 10]).is_err());
    }

    #[test]
    fn every_matrix_kernel_gives_the_same_integers() {
        let (m, kp, n) = (13, 64, 48);
        let a: Vec<i16> = (0..m * kp).map(|i| ((i * 37 % 511) as i16) - 255).collect();
        let w: Vec<i16> = (0..n * kp).map(|i| ((i * 91 % 401) as i16) - 200).collect();
        let bias: Vec<i32> = (0..n as i32).map(|j| j * 1000 - 20000).collect();
        let rq = Requant {
            scale: 1e-4,
            lo: 0.0,
            hi: 255.0,
        };
        let mut fast = vec![0i16; m * n];
        let mut plain = vec![0i16; m * n];
        gemm(
            &a,
            m,
            kp,
            &w,
            &pack_pairs(&w, n, kp),
            n,
            &bias,
            &rq,
            &mut fast,
        );
        gemm_generic(&a, m, kp, &w, n, &bias, &rq, &mut plain);
        assert_eq!(fast, plain);
        assert!(plain.iter().any(|&v| v > 0 && v < 255));
    }

    #[test]
    fn not_a_tflite_model_is_an_error() {
        assert!(MobileNet::from_tflite(&[]).is_err());
        assert!(MobileNet::from_tflite(&[1, 2, 3, 4, 5, 6, 7, 8, 9]).is_err());
        let mut cut = MODEL_BYTES[..MODEL_BYTES.len() / 2].to_vec();
        assert!(MobileNet::from_tflite(&cut).is_err());
        cut.clear();
    }
}
