//! The MobileNet v1 embedding extractor that the Python tools run through TFLite
//! (`models/mobilenet/mobilenet_v1_1.0_224_quant_embedding_extractor.tflite`, Apache-2.0, built
//! into the binary): reading its weights out of the `.tflite` flatbuffer and running its
//! uint8-quantized graph with the integer arithmetic of XNNPACK, the kernels `ai-edge-litert`
//! runs on x86 (so that the embedding is the Python side's, not an approximation of it). The file
//! is read by `images/tflite.rs`; the kernels are in `images/kernels.rs`.
//!
//! The graph is a chain of `CONV_2D`, `DEPTHWISE_CONV_2D` and one `AVERAGE_POOL_2D`, every tensor
//! per-tensor quantized. Each layer's accumulator is the exact integer
//! `bias + Σ (x − x_zp)(w − w_zp)` (i16 operands, i32 sums); it is requantized as XNNPACK's
//! "fp32" scheme does: `clamp(round_half_even(acc · (s_x·s_w/s_y)) + y_zp, qmin, qmax)` with the
//! scale in f32. Pointwise and full convolutions are one integer matrix product each (im2col
//! for the first) with an AVX2 `vpmaddwd` kernel where the CPU has it (checked at run time; a
//! plain loop elsewhere); depthwise layers are direct loops over channels. The result is the
//! same integers whichever path runs.

use super::kernels::{depthwise, gemm, im2col, pack_pairs, DwShape, Requant, LANES};
use super::tflite::{
    Table, ACT_NONE, ACT_RELU, ACT_RELU6, OP_AVERAGE_POOL_2D, OP_CONV_2D, OP_DEPTHWISE_CONV_2D,
    PADDING_SAME, TYPE_INT32, TYPE_UINT8,
};
use anyhow::{bail, ensure, Context, Result};

/// The model file, as shipped in `models/mobilenet/` (with its licence).
pub const MODEL_BYTES: &[u8] =
    include_bytes!("../../models/mobilenet/mobilenet_v1_1.0_224_quant_embedding_extractor.tflite");
/// sha256 of [`MODEL_BYTES`] (the same as `tools/illmrec_tools/features.py`'s `MODEL_SHA256`).
pub const MODEL_SHA256: &str = "f409ef4f73fcbb9667841965623c5c8524aac33d41b9bf5f3667161fb4a76319";

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

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    #[test]
    fn shipped_model_is_the_python_sides() {
        assert_eq!(
            crate::store::fsutil::hex(&Sha256::digest(MODEL_BYTES)),
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
    fn not_a_tflite_model_is_an_error() {
        assert!(MobileNet::from_tflite(&[]).is_err());
        assert!(MobileNet::from_tflite(&[1, 2, 3, 4, 5, 6, 7, 8, 9]).is_err());
        let mut cut = MODEL_BYTES[..MODEL_BYTES.len() / 2].to_vec();
        assert!(MobileNet::from_tflite(&cut).is_err());
        cut.clear();
    }
}
