//! The trained I-LLMRec modules that run outside the LLM: the adaptor (image feature → one
//! input embedding), the learned `[REC]` vector, and the user/item retrieval heads.
//!
//! Weights use the reference checkpoint's `rec_module/model.safetensors` key names:
//! `adaptor.proj_v2c.*`, `adaptor.layernorm.*`, `adaptor.interface.*`, `rec_token`,
//! `f_{u,i}_{img,cf,text}.mlp.{0,1,3}.*`, in f32, f16 or bf16. A JSON config beside them
//! ([`HeadsConfig`]) says which modalities exist and their dimensions.

use crate::method::prompt::PromptStyle;
use crate::store::bank::Modality;
use crate::store::fsutil::{hex, read_regular};
use anyhow::{bail, ensure, Context, Result};
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

/// `heads.json`: what the checkpoint holds and how it was made.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct HeadsConfig {
    /// Always "illmrec-heads".
    pub format: String,
    pub version: u32,
    /// The LLM's hidden size (`n_embd`): adaptor output, `[REC]` and user-head input.
    pub llm_dim: usize,
    /// Output size of every head (512 in the reference).
    pub proj_dim: usize,
    /// Hidden size inside every head (1024 in the reference).
    pub hidden_dim: usize,
    /// How each history item is written into the prompt.
    #[serde(default)]
    pub prompt: PromptStyle,
    /// Image-feature size the adaptor takes (required when `prompt` is "image").
    #[serde(default)]
    pub image_dim: Option<usize>,
    /// Hidden size inside the adaptor (512 in the reference).
    #[serde(default = "default_adaptor_dim")]
    pub adaptor_dim: usize,
    /// Item-feature size of each modality present ("img", "cf", "text").
    pub item_dims: BTreeMap<String, usize>,
    #[serde(default = "default_adaptor_eps")]
    pub adaptor_ln_eps: f64,
    #[serde(default = "default_head_eps")]
    pub head_ln_eps: f64,
    /// False for randomly initialised heads: every output then says the ranking is meaningless.
    pub trained: bool,
    /// Free text: how these weights were produced.
    #[serde(default)]
    pub provenance: String,
}

/// Largest size accepted for any dimension in `heads.json` (the reference's largest is 2560).
pub const MAX_DIM: usize = 65536;
/// Most parameters [`random_tensors`] makes (1 GiB of f32), so a config with huge sizes is an
/// error rather than an allocation that fails.
pub const MAX_RANDOM_PARAMS: u64 = 1 << 28;
/// Largest LayerNorm epsilon accepted (PyTorch's default is 1e-5, the adaptor's 1e-8).
pub const MAX_LN_EPS: f64 = 1e-2;

fn default_adaptor_dim() -> usize {
    512
}
fn default_adaptor_eps() -> f64 {
    1e-8
}
fn default_head_eps() -> f64 {
    1e-5
}

impl HeadsConfig {
    pub fn modalities(&self) -> Result<Vec<Modality>> {
        let mut out: Vec<Modality> = self
            .item_dims
            .keys()
            .map(|k| Modality::parse(k))
            .collect::<Result<_>>()?;
        out.sort();
        Ok(out)
    }

    /// Number of weights of a full checkpoint for this config (sizes are at most [`MAX_DIM`], so
    /// this cannot overflow).
    pub fn parameter_count(&self) -> u64 {
        let linear = |i: usize, o: usize| (i as u64 + 1) * o as u64;
        let head = |i: usize| {
            linear(i, self.hidden_dim)
                + 2 * self.hidden_dim as u64
                + linear(self.hidden_dim, self.proj_dim)
        };
        let mut n = self.llm_dim as u64;
        if self.prompt == PromptStyle::Image {
            n += linear(self.image_dim.unwrap_or(0), self.adaptor_dim)
                + 2 * self.adaptor_dim as u64
                + linear(self.adaptor_dim, self.llm_dim);
        }
        for d in self.item_dims.values() {
            n += head(self.llm_dim) + head(*d);
        }
        n
    }

    pub fn item_dim(&self, m: Modality) -> Option<usize> {
        self.item_dims.get(m.name()).copied()
    }

    /// Parses and validates `heads.json` bytes.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let cfg: Self = serde_json::from_slice(bytes)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks what serde cannot: the format, the modality names, and that every size and epsilon
    /// is in a range a real checkpoint uses (an epsilon of 0, -1 or 1e300 would silently turn
    /// the LayerNorms into something else).
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.format == "illmrec-heads",
            "format is '{}', expected 'illmrec-heads'",
            self.format
        );
        ensure!(
            self.version == 1,
            "version {} is not supported (expected 1)",
            self.version
        );
        ensure!(!self.item_dims.is_empty(), "item_dims names no modality");
        self.modalities()?;
        let dims = [
            ("llm_dim", Some(self.llm_dim)),
            ("proj_dim", Some(self.proj_dim)),
            ("hidden_dim", Some(self.hidden_dim)),
            ("adaptor_dim", Some(self.adaptor_dim)),
            ("image_dim", self.image_dim),
        ]
        .into_iter()
        .chain(self.item_dims.iter().map(|(k, v)| (k.as_str(), Some(*v))));
        for (name, dim) in dims {
            if let Some(d) = dim {
                ensure!(
                    (1..=MAX_DIM).contains(&d),
                    "{name} is {d}; expected 1 to {MAX_DIM}"
                );
            }
        }
        for (name, eps) in [
            ("adaptor_ln_eps", self.adaptor_ln_eps),
            ("head_ln_eps", self.head_ln_eps),
        ] {
            ensure!(
                eps.is_finite() && eps > 0.0 && eps <= MAX_LN_EPS,
                "{name} is {eps}; expected a LayerNorm epsilon above 0 and at most {MAX_LN_EPS}"
            );
        }
        if self.prompt == PromptStyle::Image {
            ensure!(
                self.image_dim.is_some(),
                "prompt style 'image' needs image_dim for the adaptor"
            );
        }
        Ok(())
    }
}

/// y = W x + b with W stored row-major as [out, in] (PyTorch's layout).
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub n_in: usize,
    pub n_out: usize,
}

impl Linear {
    pub fn forward(&self, x: &[f32], out: &mut [f32]) {
        debug_assert_eq!(x.len(), self.n_in);
        for (o, (w, b)) in out
            .iter_mut()
            .zip(self.weight.chunks_exact(self.n_in).zip(&self.bias))
        {
            *o = dot(w, x) + b;
        }
    }
}

#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub eps: f64,
}

impl LayerNorm {
    pub fn forward(&self, x: &mut [f32]) {
        let n = x.len() as f64;
        let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        let inv = 1.0 / (var + self.eps).sqrt();
        for ((v, w), b) in x.iter_mut().zip(&self.weight).zip(&self.bias) {
            *v = ((*v as f64 - mean) * inv) as f32 * w + b;
        }
    }
}

/// Dot product with eight independent accumulators, so that the compiler vectorises it.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

pub fn gelu_erf(x: f32) -> f32 {
    let x = x as f64;
    (0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))) as f32
}

/// A retrieval head: Linear(in→hidden) → LayerNorm → ReLU → Linear(hidden→proj).
#[derive(Clone, Debug)]
pub struct Head {
    pub l0: Linear,
    pub norm: LayerNorm,
    pub l3: Linear,
}

impl Head {
    pub fn n_in(&self) -> usize {
        self.l0.n_in
    }
    pub fn n_out(&self) -> usize {
        self.l3.n_out
    }

    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        let mut hidden = vec![0f32; self.l0.n_out];
        self.l0.forward(x, &mut hidden);
        self.norm.forward(&mut hidden);
        hidden.iter_mut().for_each(|v| *v = v.max(0.0));
        let mut out = vec![0f32; self.l3.n_out];
        self.l3.forward(&hidden, &mut out);
        out
    }

    /// Forward over `rows.len() / n_in` inputs, spread over the available cores.
    pub fn forward_rows(&self, rows: &[f32]) -> Vec<f32> {
        let n = rows.len() / self.n_in();
        let mut out = vec![0f32; n * self.n_out()];
        let threads = std::thread::available_parallelism()
            .map_or(1, |t| t.get())
            .min(n.max(1));
        let per = n.div_ceil(threads.max(1)).max(1);
        std::thread::scope(|s| {
            for (inp, res) in rows
                .chunks(per * self.n_in())
                .zip(out.chunks_mut(per * self.n_out()))
            {
                s.spawn(move || {
                    for (x, y) in inp
                        .chunks_exact(self.n_in())
                        .zip(res.chunks_exact_mut(self.n_out()))
                    {
                        y.copy_from_slice(&self.forward(x));
                    }
                });
            }
        });
        out
    }
}

/// The adaptor: Linear(image→adaptor_dim) → LayerNorm(eps 1e-8) → GELU(erf) → Linear(→llm_dim).
#[derive(Clone, Debug)]
pub struct Adaptor {
    pub proj: Linear,
    pub norm: LayerNorm,
    pub interface: Linear,
}

impl Adaptor {
    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        let mut hidden = vec![0f32; self.proj.n_out];
        self.proj.forward(x, &mut hidden);
        self.norm.forward(&mut hidden);
        hidden.iter_mut().for_each(|v| *v = gelu_erf(*v));
        let mut out = vec![0f32; self.interface.n_out];
        self.interface.forward(&hidden, &mut out);
        out
    }
}

/// Everything of a checkpoint that runs in Rust.
pub struct Heads {
    pub config: HeadsConfig,
    pub adaptor: Option<Adaptor>,
    pub rec_token: Vec<f32>,
    pub user: BTreeMap<Modality, Head>,
    pub item: BTreeMap<Modality, Head>,
    /// sha256 of the weights file and the config, for cache keys.
    pub checksum: [u8; 32],
}

impl Heads {
    /// Loads `weights` (safetensors) with its `config` (JSON) and checks every shape against the
    /// config. A mismatch is an error naming the tensor and both shapes.
    pub fn load(weights: &Path, config: &Path) -> Result<Self> {
        let config_bytes = read_regular(config)
            .with_context(|| format!("cannot read heads config {}", config.display()))?;
        let weight_bytes = read_regular(weights)
            .with_context(|| format!("cannot open heads {}", weights.display()))?;
        Self::from_bytes(&weight_bytes, weights, &config_bytes, config)
    }

    /// Like [`Heads::load`] from bytes already read (the paths only name them in messages).
    /// Every weight must be finite: a NaN or infinity is an error naming the tensor.
    pub fn from_bytes(
        weights: &[u8],
        weights_name: &Path,
        config: &[u8],
        config_name: &Path,
    ) -> Result<Self> {
        let cfg = HeadsConfig::parse(config)
            .with_context(|| format!("heads config {} is not valid", config_name.display()))?;
        let tensors = SafeTensors::deserialize(weights).map_err(|e| {
            anyhow::anyhow!(
                "heads {} is not a valid safetensors file: {e}",
                weights_name.display()
            )
        })?;
        let mut hasher = Sha256::new();
        hasher.update(weights);
        hasher.update(config);
        let reader = TensorReader {
            tensors: &tensors,
            file: weights_name,
        };
        Self::from_reader(cfg, &reader, hasher.finalize().into())
    }

    fn from_reader(cfg: HeadsConfig, r: &TensorReader<'_>, checksum: [u8; 32]) -> Result<Self> {
        let head = |prefix: &str, n_in: usize| -> Result<Head> {
            Ok(Head {
                l0: r.linear(&format!("{prefix}.mlp.0"), n_in, cfg.hidden_dim)?,
                norm: r.layer_norm(&format!("{prefix}.mlp.1"), cfg.hidden_dim, cfg.head_ln_eps)?,
                l3: r.linear(&format!("{prefix}.mlp.3"), cfg.hidden_dim, cfg.proj_dim)?,
            })
        };
        let mut user = BTreeMap::new();
        let mut item = BTreeMap::new();
        for m in cfg.modalities()? {
            user.insert(m, head(&format!("f_u_{m}"), cfg.llm_dim)?);
            item.insert(m, head(&format!("f_i_{m}"), cfg.item_dim(m).unwrap())?);
        }
        let adaptor = match cfg.prompt {
            PromptStyle::Image => {
                let image_dim = cfg.image_dim.unwrap();
                Some(Adaptor {
                    proj: r.linear("adaptor.proj_v2c", image_dim, cfg.adaptor_dim)?,
                    norm: r.layer_norm("adaptor.layernorm", cfg.adaptor_dim, cfg.adaptor_ln_eps)?,
                    interface: r.linear("adaptor.interface", cfg.adaptor_dim, cfg.llm_dim)?,
                })
            }
            _ => None,
        };
        let rec_token = r.tensor("rec_token", &[1, cfg.llm_dim])?;
        Ok(Self {
            config: cfg,
            adaptor,
            rec_token,
            user,
            item,
            checksum,
        })
    }

    pub fn checksum_hex(&self) -> String {
        hex(&self.checksum)
    }

    pub fn modalities(&self) -> Vec<Modality> {
        self.user.keys().copied().collect()
    }
}

struct TensorReader<'a> {
    tensors: &'a SafeTensors<'a>,
    file: &'a Path,
}

impl TensorReader<'_> {
    /// Reads a tensor as f32 after checking its shape.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let view = self.tensors.tensor(name).map_err(|_| {
            anyhow::anyhow!(
                "heads {}: tensor '{name}' is missing (expected shape {shape:?})",
                self.file.display()
            )
        })?;
        if view.shape() != shape {
            bail!(
                "heads {}: tensor '{name}' has shape {:?}, expected {shape:?}",
                self.file.display(),
                view.shape()
            );
        }
        let data = view.data();
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => bail!(
                "heads {}: tensor '{name}' has dtype {other:?}; expected F32, F16 or BF16",
                self.file.display()
            ),
        };
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            bail!(
                "heads {}: tensor '{name}' has a non-finite value ({} at index {i}): the weights are corrupt",
                self.file.display(),
                values[i]
            );
        }
        Ok(values)
    }

    fn linear(&self, prefix: &str, n_in: usize, n_out: usize) -> Result<Linear> {
        Ok(Linear {
            weight: self.tensor(&format!("{prefix}.weight"), &[n_out, n_in])?,
            bias: self.tensor(&format!("{prefix}.bias"), &[n_out])?,
            n_in,
            n_out,
        })
    }

    fn layer_norm(&self, prefix: &str, n: usize, eps: f64) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: self.tensor(&format!("{prefix}.weight"), &[n])?,
            bias: self.tensor(&format!("{prefix}.bias"), &[n])?,
            eps,
        })
    }
}

/// Storage precision for written heads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightDtype {
    F32,
    F16,
    Bf16,
}

/// Named tensors of a full checkpoint for `cfg`, initialised as PyTorch does (Linear weights and
/// biases U(±1/√in), LayerNorm weight 1 and bias 0, `rec_token` Xavier-uniform), from a seeded
/// generator. Used for demos and tests before a trained checkpoint exists.
pub fn random_tensors(cfg: &HeadsConfig, seed: u64) -> Result<Vec<(String, Vec<usize>, Vec<f32>)>> {
    cfg.validate()?;
    let params = cfg.parameter_count();
    ensure!(
        params <= MAX_RANDOM_PARAMS,
        "these heads would have {params} parameters; random heads are limited to {MAX_RANDOM_PARAMS}"
    );
    let mut rng = SplitMix64(seed);
    let mut out = Vec::new();
    let linear = |out: &mut Vec<_>, rng: &mut SplitMix64, name: &str, n_in: usize, n_out: usize| {
        let bound = 1.0 / (n_in as f64).sqrt();
        out.push((
            format!("{name}.weight"),
            vec![n_out, n_in],
            (0..n_in * n_out).map(|_| rng.uniform(bound)).collect(),
        ));
        out.push((
            format!("{name}.bias"),
            vec![n_out],
            (0..n_out).map(|_| rng.uniform(bound)).collect(),
        ));
    };
    let norm = |out: &mut Vec<_>, name: &str, n: usize| {
        out.push((format!("{name}.weight"), vec![n], vec![1.0; n]));
        out.push((format!("{name}.bias"), vec![n], vec![0.0; n]));
    };
    if cfg.prompt == PromptStyle::Image {
        linear(
            &mut out,
            &mut rng,
            "adaptor.proj_v2c",
            cfg.image_dim.unwrap(),
            cfg.adaptor_dim,
        );
        norm(&mut out, "adaptor.layernorm", cfg.adaptor_dim);
        linear(
            &mut out,
            &mut rng,
            "adaptor.interface",
            cfg.adaptor_dim,
            cfg.llm_dim,
        );
    }
    for m in cfg.modalities()? {
        for (side, n_in) in [("u", cfg.llm_dim), ("i", cfg.item_dim(m).unwrap())] {
            let prefix = format!("f_{side}_{m}.mlp");
            linear(
                &mut out,
                &mut rng,
                &format!("{prefix}.0"),
                n_in,
                cfg.hidden_dim,
            );
            norm(&mut out, &format!("{prefix}.1"), cfg.hidden_dim);
            linear(
                &mut out,
                &mut rng,
                &format!("{prefix}.3"),
                cfg.hidden_dim,
                cfg.proj_dim,
            );
        }
    }
    let bound = (6.0 / (1.0 + cfg.llm_dim as f64)).sqrt();
    out.push((
        "rec_token".into(),
        vec![1, cfg.llm_dim],
        (0..cfg.llm_dim).map(|_| rng.uniform(bound)).collect(),
    ));
    Ok(out)
}

/// Writes named tensors as a safetensors file, atomically.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    dtype: WeightDtype,
) -> Result<()> {
    let bytes = encode_safetensors(tensors, dtype)?;
    crate::store::fsutil::write_atomic(path, |out| Ok(out.write_all(&bytes)?))
}

/// Named tensors as safetensors bytes (what [`write_safetensors`] writes).
pub fn encode_safetensors(
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    dtype: WeightDtype,
) -> Result<Vec<u8>> {
    let encoded: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, shape, values)| {
            let bytes = match dtype {
                WeightDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                WeightDtype::F16 => values
                    .iter()
                    .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                    .collect(),
                WeightDtype::Bf16 => values
                    .iter()
                    .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                    .collect(),
            };
            (name.clone(), shape.clone(), bytes)
        })
        .collect();
    let st_dtype = match dtype {
        WeightDtype::F32 => Dtype::F32,
        WeightDtype::F16 => Dtype::F16,
        WeightDtype::Bf16 => Dtype::BF16,
    };
    let views = encoded
        .iter()
        .map(|(name, shape, bytes)| {
            Ok((
                name.as_str(),
                safetensors::tensor::TensorView::new(st_dtype, shape.clone(), bytes)?,
            ))
        })
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    Ok(safetensors::serialize(views, None)?)
}

/// A tiny seeded generator (SplitMix64): reproducible weights (and synthetic catalogs) without
/// another dependency.
pub(crate) struct SplitMix64(pub(crate) u64);

impl SplitMix64 {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-bound, bound).
    pub(crate) fn uniform(&mut self, bound: f64) -> f32 {
        let unit = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        ((unit * 2.0 - 1.0) * bound) as f32
    }
}
