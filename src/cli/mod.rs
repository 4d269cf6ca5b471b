//! Argument definitions and dispatch. Each subcommand lives in its own file.

mod bank_cmd;
mod bench;
mod bench_catalog;
mod bench_models;
mod bundle_cmd;
mod embed;
mod eval_cmd;
mod images_cmd;
mod items_cmd;
pub mod messages;
mod model_check;
mod prompt_cmd;
mod recommend;
mod score;
mod serve;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use illmrec::engine::{self, ContextOptions, ModelOptions};
use illmrec::method::heads::WeightDtype;
use illmrec::recommender::{MissingImage, Options, Recommender};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "illmrec",
    version,
    about = "On-device I-LLMRec: LLM recommendation with one image token per item, on a memory-mapped GGUF model"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Recommend items for one history.
    Recommend(recommend::RecommendArgs),
    /// Score many users from a JSON-lines file.
    Score(score::ScoreArgs),
    /// Write the `[REC]` hidden state (and user vectors) of every history in a file to .npy.
    Embed(embed::EmbedArgs),
    /// Show the exact prompt (text, tokens, injected positions) for a history.
    Prompt(prompt_cmd::PromptArgs),
    /// Evaluate a bundle (or a reference ranker) on a prepared dataset: HR@k, NDCG@k, MRR.
    Eval(eval_cmd::EvalArgs),
    /// Build or inspect feature banks.
    #[command(subcommand)]
    Bank(bank_cmd::BankCommand),
    /// Encode image files into a feature matrix with the runtime's MobileNet.
    EncodeImages(images_cmd::EncodeImagesArgs),
    /// Add, replace or remove one item of a bundle (atomically).
    #[command(subcommand)]
    Items(items_cmd::ItemsCommand),
    /// Create or verify bundles.
    #[command(subcommand)]
    Bundle(bundle_cmd::BundleCommand),
    /// Write seeded random heads for a config (demos and tests before training).
    InitHeads(InitHeadsArgs),
    /// Measure load time, per-user latency, prompt size and memory on a dataset's histories.
    Bench(bench::BenchArgs),
    /// Measure a synthetic catalog (default 1M items): open time, RSS, top-k scan time per user
    /// against this machine's memory bandwidth. Needs no model.
    BenchCatalog(bench_catalog::BenchCatalogArgs),
    /// Compare GGUF models on a bundle, like llama-bench: size, load time, RSS, prompt
    /// processing, time per user, agreement with a reference model (and HR@5/NDCG@5 on a dataset).
    BenchModels(bench_models::BenchModelsArgs),
    /// Quantize a GGUF model with llama.cpp.
    Quantize(QuantizeArgs),
    /// Show the build's compute backends and a model's metadata.
    Info(InfoArgs),
    /// Run the kiosk: an HTTP API and a touch page over one loaded bundle.
    Serve(serve::ServeArgs),
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Recommend(a) => recommend::run(a),
        Command::Score(a) => score::run(a),
        Command::Embed(a) => embed::run(a),
        Command::Prompt(a) => prompt_cmd::run(a),
        Command::Eval(a) => eval_cmd::run(a),
        Command::Bank(c) => bank_cmd::run(c),
        Command::Bundle(c) => bundle_cmd::run(c),
        Command::EncodeImages(a) => images_cmd::run(a),
        Command::Items(c) => items_cmd::run(c),
        Command::InitHeads(a) => init_heads(a),
        Command::Bench(a) => bench::run(a),
        Command::BenchCatalog(a) => bench_catalog::run(a),
        Command::BenchModels(a) => bench_models::run(a),
        Command::Quantize(a) => quantize(a),
        Command::Info(a) => info(a),
        Command::Serve(a) => serve::run(a),
    }
}

/// How many users `score`, `eval` and `embed` decode per llama.cpp call.
#[derive(Args, Clone, Copy, Debug)]
pub struct BatchArgs {
    /// Users whose prompts are decoded together in one llama.cpp call sequence (one KV sequence
    /// each, sharing the cached task text), 1 to 16. Scores equal one-at-a-time's within
    /// llama.cpp's batch-shape noise; see the README's batching table for what it buys.
    #[arg(long, default_value_t = 1, value_name = "N",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=illmrec::engine::MAX_BRANCHES as u64))]
    pub batch_users: usize,
}

impl BatchArgs {
    /// The checked number of users per call.
    pub fn per_call(&self) -> Result<usize> {
        let max = illmrec::engine::MAX_BRANCHES;
        anyhow::ensure!(
            (1..=max).contains(&self.batch_users),
            "--batch-users {} is out of range: expected 1 to {max}",
            self.batch_users
        );
        Ok(self.batch_users)
    }
}

/// The bundle to open and how to run its model (`recommend`, `prompt`, `score`, `embed`, `serve`).
#[derive(Args, Clone, Debug)]
pub struct BundleArgs {
    /// The bundle folder (manifest.json, heads, items, banks).
    #[arg(long, value_name = "DIR")]
    pub bundle: PathBuf,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

impl BundleArgs {
    /// Opens the bundle's recommender with these options (warnings on stderr).
    pub fn open(&self) -> Result<Recommender> {
        open_recommender(&self.bundle, self.runtime.options())
    }
}

/// One user's history on a bundle (`recommend`, `prompt`).
#[derive(Args)]
pub struct HistoryArgs {
    #[command(flatten)]
    pub bundle: BundleArgs,
    /// The user's history, oldest first: comma-separated item ids.
    #[arg(long, value_name = "ID,ID,...")]
    pub history: String,
}

impl HistoryArgs {
    /// The history's item ids.
    pub fn ids(&self) -> Result<Vec<u64>> {
        parse_ids(&self.history, "--history")
    }
}

/// A JSON-lines file of users run through a bundle's model, several per llama.cpp call
/// (`score`, `embed`).
#[derive(Args)]
pub struct UsersFileArgs {
    #[command(flatten)]
    pub bundle: BundleArgs,
    #[command(flatten)]
    pub batch: BatchArgs,
    /// JSON-lines input, one user per line (`{"history": [ids], ...}`).
    #[arg(long, value_name = "FILE")]
    pub input: PathBuf,
    /// Stop with a non-zero exit once more than N lines could not be used (malformed, an unknown
    /// item, invalid, failed) [default: no limit: each bad line is reported and the run goes on].
    #[arg(long, value_name = "N")]
    pub max_errors: Option<usize>,
}

/// Options shared by every command that runs the model.
#[derive(Args, Clone, Debug)]
pub struct RuntimeArgs {
    /// GGUF model to use instead of the bundle's (or the default) model.
    #[arg(long, value_name = "FILE")]
    pub model: Option<PathBuf>,
    /// CPU threads for the LLM [default: all cores].
    #[arg(long)]
    pub threads: Option<i32>,
    /// Layers to offload to the GPU (CUDA/Metal builds) [default: all on GPU builds, 0 otherwise].
    #[arg(long)]
    pub n_gpu_layers: Option<i32>,
    /// Read the model into memory instead of memory-mapping it.
    #[arg(long)]
    pub no_mmap: bool,
    /// Lock the model in RAM.
    #[arg(long)]
    pub mlock: bool,
    /// Context size in positions.
    #[arg(long = "ctx", default_value_t = 2048)]
    pub n_ctx: u32,
    /// Keep the KV cache in f32 instead of f16 (slower; for parity checks against PyTorch).
    #[arg(long)]
    pub kv_f32: bool,
    /// Flash attention: on (the default: ggml's tiled CPU kernel skips the masked blocks, 1.2×
    /// faster here), off (every KV cell multiplied, then masked), or auto (llama.cpp decides).
    /// Scores do not depend on the thread count either way.
    #[arg(long, value_enum, default_value_t = FlashAttn::On)]
    pub flash_attn: FlashAttn,
    /// Most recent history items written into the prompt.
    #[arg(long, default_value_t = 10)]
    pub max_history: usize,
    /// What a history item without an image feature becomes in the prompt.
    #[arg(long, value_enum, default_value_t = MissingImageArg::Text)]
    pub missing_image: MissingImageArg,
    /// Longest description written into a prompt, in tokens.
    #[arg(long, default_value_t = 64)]
    pub description_tokens: usize,
    /// Folder for the item-vector cache [default: <bundle>/cache].
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Recompute the fixed task text for every request instead of reusing its KV cache.
    #[arg(long)]
    pub no_prefix_cache: bool,
    /// Show llama.cpp's own log.
    #[arg(long)]
    pub verbose: bool,
}

/// `--missing-image` (the library's [`MissingImage`], kept free of clap).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MissingImageArg {
    /// The item's description (or its genres), truncated, in place of the visual token.
    Text,
    /// Only the title.
    Title,
}

impl From<MissingImageArg> for MissingImage {
    fn from(a: MissingImageArg) -> Self {
        match a {
            MissingImageArg::Text => MissingImage::Text,
            MissingImageArg::Title => MissingImage::Title,
        }
    }
}

/// `--dtype` of written heads (the library's [`WeightDtype`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DtypeArg {
    F32,
    F16,
    Bf16,
}

impl From<DtypeArg> for WeightDtype {
    fn from(a: DtypeArg) -> Self {
        match a {
            DtypeArg::F32 => WeightDtype::F32,
            DtypeArg::F16 => WeightDtype::F16,
            DtypeArg::Bf16 => WeightDtype::Bf16,
        }
    }
}

impl RuntimeArgs {
    /// The runtime options, after saying once on stderr when layers meant for a GPU will run on
    /// the CPU.
    pub fn options(&self) -> Options {
        let n_gpu_layers = self.n_gpu_layers.unwrap_or_else(engine::default_gpu_layers);
        if n_gpu_layers > 0 {
            let (built, devices) = (engine::supports_gpu_offload(), engine::gpu_devices());
            if let Some(line) =
                engine::gpu_fallback(n_gpu_layers, self.n_gpu_layers.is_some(), built, &devices)
            {
                messages::warning(line);
            }
        }
        Options {
            model: self.model.clone(),
            model_options: ModelOptions {
                n_gpu_layers: self.n_gpu_layers.unwrap_or_else(engine::default_gpu_layers),
                use_mmap: !self.no_mmap,
                use_mlock: self.mlock,
                verbose: self.verbose,
            },
            context: ContextOptions {
                n_ctx: self.n_ctx,
                kv_f32: self.kv_f32,
                flash_attn: match self.flash_attn {
                    FlashAttn::Auto => None,
                    FlashAttn::On => Some(true),
                    FlashAttn::Off => Some(false),
                },
                n_batch: 512,
                n_threads: self.threads.unwrap_or_else(engine::default_threads),
            },
            max_history: self.max_history,
            missing_image: self.missing_image.into(),
            description_tokens: self.description_tokens,
            cache_dir: self.cache_dir.clone(),
            reuse_prefix: !self.no_prefix_cache,
            prompt_style: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FlashAttn {
    Auto,
    On,
    Off,
}

/// Opens a recommender and shows on stderr what went wrong without stopping it, and (once) that
/// the model is not the one the bundle's manifest records.
pub fn open_recommender(bundle: &std::path::Path, opts: Options) -> Result<Recommender> {
    let rec = Recommender::open(bundle, opts)?;
    model_check::warn_once(&rec.bundle, &rec.model().path);
    for w in rec.warnings() {
        messages::warning(w);
    }
    Ok(rec)
}

/// Parses "1,2,3" into item ids, naming the entry that is not a number.
pub fn parse_ids(text: &str, what: &str) -> Result<Vec<u64>> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<u64>().with_context(|| {
                format!("{what}: '{s}' is not an item id (expected a non-negative integer)")
            })
        })
        .collect()
}

#[derive(Args)]
struct InitHeadsArgs {
    /// heads.json describing the dims, modalities and prompt style.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Output safetensors file.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    dtype: DtypeArg,
}

fn init_heads(a: InitHeadsArgs) -> Result<()> {
    illmrec::store::fsutil::refuse_input_as_output(&a.out, "--out", &[&a.config])?;
    let bytes = illmrec::store::fsutil::read_regular(&a.config)?;
    let cfg = illmrec::method::heads::HeadsConfig::parse(&bytes)
        .with_context(|| format!("heads config {} is not valid", a.config.display()))?;
    anyhow::ensure!(
        !cfg.trained,
        "{} says trained: true, but these weights would be random; set it to false",
        a.config.display()
    );
    let tensors = illmrec::method::heads::random_tensors(&cfg, a.seed)?;
    illmrec::method::heads::write_safetensors(&a.out, &tensors, a.dtype.into())?;
    let params: usize = tensors.iter().map(|t| t.2.len()).sum();
    println!(
        "wrote {} ({} tensors, {params} parameters, seed {})",
        a.out.display(),
        tensors.len(),
        a.seed
    );
    Ok(())
}

#[derive(Args)]
struct QuantizeArgs {
    /// Input GGUF (f32, f16, bf16 or an already quantized model).
    input: PathBuf,
    /// Output GGUF.
    output: PathBuf,
    /// Target type: f32, f16, bf16, q8_0, q6_k, q5_k_m, q5_0, q4_k_m, q4_0, q3_k_m, q2_k.
    #[arg(long = "type")]
    ty: String,
    #[arg(long)]
    threads: Option<i32>,
    /// Show llama.cpp's own log.
    #[arg(long)]
    verbose: bool,
}

fn quantize(a: QuantizeArgs) -> Result<()> {
    engine::set_verbose(a.verbose);
    illmrec::store::fsutil::refuse_input_as_output(&a.output, "the output", &[&a.input])?;
    engine::quantize(
        &a.input,
        &a.output,
        &a.ty,
        a.threads.unwrap_or_else(engine::default_threads),
    )?;
    let size = std::fs::metadata(&a.output)?.len();
    println!(
        "wrote {} ({:.1} MiB, {})",
        a.output.display(),
        size as f64 / (1 << 20) as f64,
        a.ty
    );
    Ok(())
}

#[derive(Args)]
struct InfoArgs {
    /// A GGUF model to describe [default: the default model, if present].
    #[arg(long)]
    model: Option<PathBuf>,
}

fn info(a: InfoArgs) -> Result<()> {
    println!("illmrec {}", env!("CARGO_PKG_VERSION"));
    let devices = engine::gpu_devices();
    println!(
        "GPU offload: {}",
        if !devices.is_empty() {
            format!("available: {}", devices.join(", "))
        } else if engine::supports_gpu_offload() {
            "built in, but no GPU found (no device, driver or CUDA runtime): running on the CPU"
                .into()
        } else {
            "not in this build".to_string()
        }
    );
    println!("cpu: {}", illmrec::engine::cpu::Features::detect());
    println!("cpu build: {}", engine::cpu_build());
    println!("backends: {}", engine::system_info().trim());
    println!("blas: {}", illmrec::engine::blas::describe());
    println!("kernels: {}", illmrec::engine::kernels::describe());
    let model = match a.model {
        Some(m) => Some(m),
        None => illmrec::bundle::default_model_path().ok(),
    };
    if let Some(path) = model {
        let info = engine::GgufInfo::read(&path)?;
        println!(
            "model: {} ({}, n_embd {}, context {}, input scale {:.4})",
            path.display(),
            info.architecture,
            info.n_embd,
            info.context_length.map_or("?".into(), |c| c.to_string()),
            info.input_scale()
        );
    }
    Ok(())
}
