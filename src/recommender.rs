//! The recommender: a bundle's model, heads, banks and catalog put together.
//!
//! A request goes: history ids → prompt segments (titles, adaptor-projected image features, the
//! `[REC]` vector) → tokens and injected vectors → the LLM's final hidden state at `[REC]` →
//! one user vector per modality (`f_u_m`) → dot products with the cached item vectors.

use crate::bank::{Bank, Modality};
use crate::bundle::Bundle;
use crate::catalog::{Catalog, Item};
use crate::heads::Heads;
use crate::item_vectors::ItemVectors;
use crate::llm::{Context, ContextOptions, GgufInfo, Input, Model, ModelOptions, Token};
use crate::prompt::{self, ItemBody, PromptItem, PromptStyle, Segment};
use crate::rank;
pub use crate::rank::Scored;
use anyhow::{bail, ensure, Context as _, Result};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What to write for a history item that has no image feature.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MissingImage {
    /// The item's description (or its genres), truncated, in place of the visual token.
    Text,
    /// Only the title.
    Title,
}

#[derive(Clone, Debug)]
pub struct Options {
    /// Model file; `None` uses the bundle's model or the default one.
    pub model: Option<PathBuf>,
    pub model_options: ModelOptions,
    pub context: ContextOptions,
    /// Most recent history items written into the prompt.
    pub max_history: usize,
    pub missing_image: MissingImage,
    /// Longest description written into a prompt, in tokens.
    pub description_tokens: usize,
    /// Where the item-vector cache goes (default: `<bundle>/cache`).
    pub cache_dir: Option<PathBuf>,
    /// Reuse the task text's KV cache across requests (on by default; off only to compare).
    pub reuse_prefix: bool,
    /// Write items in this style instead of the checkpoint's (benchmarks only: scores are then
    /// meaningless, since the heads were trained on the other style).
    pub prompt_style: Option<PromptStyle>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            model: None,
            model_options: ModelOptions::default(),
            context: ContextOptions::default(),
            max_history: 10,
            missing_image: MissingImage::Text,
            description_tokens: 64,
            cache_dir: None,
            reuse_prefix: true,
            prompt_style: None,
        }
    }
}

/// A user's representation: one vector per scoring modality, plus what went into the prompt.
#[derive(Clone, Debug)]
pub struct UserVector {
    /// `f_u_m(h)` per modality, in [`Recommender::modalities`] order.
    pub vectors: Vec<Vec<f32>>,
    /// The LLM's final hidden state at `[REC]`.
    pub hidden: Vec<f32>,
    /// History items that made it into the prompt (oldest first).
    pub used: Vec<u64>,
    /// Older history items dropped because the prompt would not fit the context.
    pub dropped_for_context: usize,
    /// Positions in the prompt (tokens plus injected vectors).
    pub prompt_positions: usize,
}

pub struct Recommender {
    pub bundle: Bundle,
    pub catalog: Catalog,
    pub heads: Heads,
    pub banks: BTreeMap<Modality, Bank>,
    pub items: ItemVectors,
    ctx: Context,
    opts: Options,
}

impl Recommender {
    /// Opens a bundle: loads the model (memory-mapped), heads, banks and catalog, checks that
    /// every shape agrees, builds or opens the item-vector cache, and prefills the task text.
    ///
    /// Every bundle file it reads (heads, heads config, items, banks) is checked against the
    /// manifest's sha256 first, so a changed byte anywhere in them is an error, never a different
    /// answer; only the model file is checked by size, `n_embd` and architecture alone (its
    /// sha256 is `bundle verify`'s).
    pub fn open(bundle_dir: &Path, opts: Options) -> Result<Self> {
        ensure!(opts.max_history >= 1, "--max-history must be at least 1");
        opts.context.check_threads()?;
        crate::llm::set_verbose(opts.model_options.verbose);
        let bundle = Bundle::open(bundle_dir)?;
        let model_path = bundle.model_path(opts.model.as_deref())?;
        let info = GgufInfo::read(&model_path)?;
        bundle.check_model(&model_path, &info)?;
        opts.context.check(&info)?;
        let m = &bundle.manifest;
        let heads = Heads::from_bytes(
            &bundle.read_verified(&m.heads)?,
            &bundle.file(&m.heads),
            &bundle.read_verified(&m.heads_config)?,
            &bundle.file(&m.heads_config),
        )?;
        let catalog = Catalog::parse(&bundle.read_verified(&m.items)?, &bundle.file(&m.items))?;
        let mut banks = BTreeMap::new();
        let mut digests = BTreeMap::new();
        for (name, file) in &m.banks {
            let modality = Modality::parse(name)?;
            let path = bundle.file(file);
            let bank = Bank::open(&path)?;
            ensure!(
                bank.modality == modality,
                "bank {} holds {} features but the manifest lists it as {modality}",
                path.display(),
                bank.modality
            );
            let digest = bank.file_sha256();
            bundle.check_digest(file, &digest)?;
            bank.check_contents()?;
            banks.insert(modality, bank);
            digests.insert(modality, digest);
        }
        check_dims(&heads, info.n_embd, &banks)?;
        let cache_dir = opts
            .cache_dir
            .clone()
            .unwrap_or_else(|| bundle.dir.join("cache"));
        let items = ItemVectors::open_or_build(&cache_dir, &heads, &banks, &digests, &catalog)?;
        let model = Arc::new(Model::load(&model_path, &opts.model_options)?);
        let mut ctx = Context::new(model, &opts.context)?;
        if opts.reuse_prefix {
            // The task text starts every prompt. Its last token may merge with the first item's
            // text ("[" + "{"), so the cached prefix stops one token short.
            let mut prefix = ctx.model().tokenize(&prompt::template().task, true)?;
            prefix.pop();
            ctx.set_prefix(&prefix)?;
        }
        Ok(Self {
            bundle,
            catalog,
            heads,
            banks,
            items,
            ctx,
            opts,
        })
    }

    /// Problems met while opening that did not stop it (a damaged item-vector cache that was
    /// rebuilt, a cache folder that could not be written), for the front end to show.
    pub fn warnings(&self) -> &[String] {
        &self.items.warnings
    }

    pub fn model(&self) -> &Model {
        self.ctx.model()
    }

    /// The LLM context (for tests and benchmarks that drive it directly).
    pub fn context(&mut self) -> &mut Context {
        &mut self.ctx
    }

    pub fn modalities(&self) -> &[Modality] {
        self.items.modalities()
    }

    /// Changes the options that act per request (benchmarks compare them on one loaded model).
    pub fn set_request_options(
        &mut self,
        reuse_prefix: bool,
        prompt_style: Option<PromptStyle>,
    ) -> Result<()> {
        ensure!(
            !reuse_prefix || !self.ctx.prefix().is_empty(),
            "this recommender was opened without the prefix cache"
        );
        ensure!(
            prompt_style != Some(PromptStyle::Image) || self.heads.adaptor.is_some(),
            "these heads have no adaptor, so items cannot be written as images"
        );
        self.opts.reuse_prefix = reuse_prefix;
        self.opts.prompt_style = prompt_style;
        Ok(())
    }

    /// The prompt items for a history (oldest first). Without `vectors`, visual items carry an
    /// empty vector: enough to measure the prompt without running the adaptor.
    fn prompt_items(&self, history: &[u64], vectors: bool) -> Result<Vec<PromptItem>> {
        history
            .iter()
            .map(|&id| self.prompt_item(self.catalog.item(id)?, vectors))
            .collect()
    }

    fn prompt_item(&self, item: &Item, vectors: bool) -> Result<PromptItem> {
        let body = match self.opts.prompt_style.unwrap_or(self.heads.config.prompt) {
            PromptStyle::Title => ItemBody::TitleOnly,
            PromptStyle::Description => {
                ItemBody::Description(self.description(item)?.unwrap_or_default())
            }
            PromptStyle::Image => match (
                self.banks.get(&Modality::Img).and_then(|b| b.get(item.id)),
                &self.heads.adaptor,
            ) {
                (Some(row), Some(adaptor)) => ItemBody::Visual(match vectors {
                    true => adaptor.forward(&row.to_f32()),
                    false => Vec::new(),
                }),
                _ => match self.opts.missing_image {
                    MissingImage::Title => ItemBody::TitleOnly,
                    MissingImage::Text => self
                        .description(item)?
                        .map_or(ItemBody::TitleOnly, ItemBody::Description),
                },
            },
        };
        Ok(PromptItem {
            title: item.title().to_string(),
            body,
        })
    }

    /// The item's description (else its genres), cut to `description_tokens` tokens.
    fn description(&self, item: &Item) -> Result<Option<String>> {
        let text = match (&item.description, item.genres.is_empty()) {
            (Some(d), _) if !d.trim().is_empty() => d.trim().to_string(),
            (_, false) => format!("Genres: {}", item.genres.join(", ")),
            _ => return Ok(None),
        };
        let tokens = self.model().tokenize(&text, false)?;
        if tokens.len() <= self.opts.description_tokens {
            return Ok(Some(text));
        }
        Ok(Some(
            self.model()
                .detokenize(&tokens[..self.opts.description_tokens])?,
        ))
    }

    /// The prompt for a history, as segments, after `--max-history` and context truncation;
    /// also returns how many items the context forced out.
    pub fn prompt(&self, history: &[u64]) -> Result<(Vec<Segment>, Vec<u64>, usize)> {
        ensure!(
            !history.is_empty(),
            "the history is empty: give at least one item id"
        );
        let recent = &history[history.len().saturating_sub(self.opts.max_history)..];
        let items = self.prompt_items(recent, false)?;
        let budget = self.ctx.n_ctx() - self.ctx.prefix().len();
        let model = self.model();
        let mut count = |text: &str, bos: bool| Ok(model.tokenize(text, bos)?.len());
        let Some(start) = prompt::fit(&items, &self.heads.rec_token, budget, &mut count)? else {
            bail!("the prompt for even one history item does not fit a context of {} positions; raise --ctx", self.ctx.n_ctx())
        };
        let kept = self.prompt_items(&recent[start..], true)?;
        let segments = prompt::build(&kept, &self.heads.rec_token);
        Ok((segments, recent[start..].to_vec(), start))
    }

    /// Runs the LLM on a history and projects the `[REC]` hidden state through the user heads.
    pub fn encode_user(&mut self, history: &[u64]) -> Result<UserVector> {
        let (segments, used, dropped) = self.prompt(history)?;
        let pieces = tokenize(self.model(), &segments)?;
        let inputs: Vec<Input> = pieces.iter().flat_map(|p| p.inputs()).collect();
        let hidden = self.ctx.last_hidden(&inputs, self.opts.reuse_prefix)?;
        let vectors = self.user_vectors(&hidden)?;
        Ok(UserVector {
            vectors,
            hidden,
            used,
            dropped_for_context: dropped,
            prompt_positions: inputs.len(),
        })
    }

    /// The user vectors `f_u_m(hidden)`, in [`Recommender::modalities`] order.
    pub fn user_vectors(&self, hidden: &[f32]) -> Result<Vec<Vec<f32>>> {
        let vectors: Vec<Vec<f32>> = self
            .modalities()
            .iter()
            .map(|m| self.heads.user[m].forward(hidden))
            .collect();
        for (m, v) in self.modalities().iter().zip(&vectors) {
            ensure!(
                v.iter().all(|x| x.is_finite()),
                "the {m} user head produced a non-finite vector: the heads are corrupt"
            );
        }
        Ok(vectors)
    }

    /// The `[REC]` hidden states of every prefix of `history` (`history[..1]`, …, `history[..n]`),
    /// each the state `encode_user` gives for that prefix (within llama.cpp's batch-shape
    /// tolerance), but decoding the items they share once: each prefix then costs its closing text
    /// and `[REC]` instead of a whole prompt. `history` must fit `--max-history` and the context.
    pub fn encode_prefixes(&mut self, history: &[u64]) -> Result<Vec<Vec<f32>>> {
        ensure!(
            !history.is_empty(),
            "the history is empty: give at least one item id"
        );
        ensure!(
            history.len() <= self.opts.max_history,
            "a history of {} items has prefixes longer than --max-history {}",
            history.len(),
            self.opts.max_history
        );
        let mut prompts = Vec::with_capacity(history.len());
        for k in 1..=history.len() {
            let (segments, _, dropped) = self.prompt(&history[..k])?;
            ensure!(
                dropped == 0,
                "the prompt for {k} items does not fit the context; raise --ctx"
            );
            prompts.push(segments);
        }
        let pieces = prompts
            .iter()
            .map(|s| tokenize(self.model(), s))
            .collect::<Result<Vec<_>>>()?;
        let inputs: Vec<Vec<Input>> = pieces
            .iter()
            .map(|p| p.iter().flat_map(|x| x.inputs()).collect())
            .collect();
        let shared = inputs.last().expect("non-empty history");
        let mut out = Vec::with_capacity(inputs.len());
        for group in inputs.chunks(crate::llm::MAX_BRANCHES) {
            let branches: Vec<(usize, Vec<Input>)> = group
                .iter()
                .map(|own| {
                    let common = shared
                        .iter()
                        .zip(own)
                        .take_while(|(a, b)| same_input(a, b))
                        .count();
                    let cut = common.min(own.len() - 1).max(1);
                    (cut, own[cut..].to_vec())
                })
                .collect();
            out.extend(
                self.ctx
                    .branch_hidden(shared, &branches, self.opts.reuse_prefix)?,
            );
        }
        Ok(out)
    }

    /// Scores of the given items (`None` for an item with no feature in any scored modality).
    /// A NaN or infinite score is an error ([`rank::NonFiniteScore`]), never a number to rank.
    pub fn score_items(&self, user: &UserVector, ids: &[u64]) -> Result<Vec<Option<f32>>> {
        ids.iter()
            .map(|&id| {
                let i = self
                    .catalog
                    .position(id)
                    .with_context(|| format!("item {id} is not in the catalog"))?;
                let score = self.items.score(&user.vectors, i);
                match score {
                    Some(s) if !s.is_finite() => Err(rank::NonFiniteScore { id, score: s }.into()),
                    _ => Ok(score),
                }
            })
            .collect()
    }

    /// The `k` best items, from `candidates` or the whole catalog, skipping `exclude` (see
    /// [`rank::top_k`] for the order and the handling of duplicates and non-finite scores).
    pub fn top_k(
        &self,
        user: &UserVector,
        k: usize,
        candidates: Option<&[u64]>,
        exclude: &HashSet<u64>,
    ) -> Result<Vec<Scored>> {
        Ok(match candidates {
            Some([]) => bail!("the candidate list is empty: give at least one item id"),
            Some(ids) => {
                let scores = self.score_items(user, ids)?;
                rank::top_k(ids.iter().copied().zip(scores), exclude, k)?
            }
            None => rank::top_k(
                (0..self.items.len())
                    .map(|i| (self.items.ids()[i], self.items.score(&user.vectors, i))),
                exclude,
                k,
            )?,
        })
    }
}

/// Checks the heads' dimensions against the model and the banks, naming the tensor that differs.
fn check_dims(heads: &Heads, n_embd: usize, banks: &BTreeMap<Modality, Bank>) -> Result<()> {
    let cfg = &heads.config;
    ensure!(
        cfg.llm_dim == n_embd,
        "heads tensor 'rec_token' has shape [1, {}] but the model needs [1, {n_embd}] (its n_embd): these heads were trained for another LLM",
        cfg.llm_dim
    );
    for m in heads.modalities() {
        let bank = banks.get(&m).with_context(|| {
            format!("the heads score the {m} modality, but the bundle has no {m} bank")
        })?;
        let dim = cfg.item_dim(m).unwrap();
        ensure!(
            dim == bank.dim(),
            "heads tensor 'f_i_{m}.mlp.0.weight' has shape [{}, {dim}] but the {m} bank's features are {}-d (expected [{}, {}])",
            cfg.hidden_dim,
            bank.dim(),
            cfg.hidden_dim,
            bank.dim()
        );
    }
    if let (Some(adaptor), PromptStyle::Image) = (&heads.adaptor, cfg.prompt) {
        let bank = banks
            .get(&Modality::Img)
            .context("the heads write images into the prompt, but the bundle has no img bank")?;
        ensure!(
            adaptor.proj.n_in == bank.dim(),
            "heads tensor 'adaptor.proj_v2c.weight' has shape [{}, {}] but the img bank's features are {}-d (expected [{}, {}])",
            adaptor.proj.n_out,
            adaptor.proj.n_in,
            bank.dim(),
            adaptor.proj.n_out,
            bank.dim()
        );
    }
    Ok(())
}

/// A prompt segment made ready for the LLM.
pub enum Piece<'a> {
    Tokens(Vec<Token>),
    Vector(&'a [f32]),
}

impl Piece<'_> {
    fn inputs(&self) -> Vec<Input<'_>> {
        match self {
            Piece::Tokens(t) => t.iter().map(|&t| Input::Token(t)).collect(),
            Piece::Vector(v) => vec![Input::Embedding(v)],
        }
    }
}

/// Whether two inputs are the same position (token id, or vector by value).
fn same_input(a: &Input, b: &Input) -> bool {
    match (a, b) {
        (Input::Token(x), Input::Token(y)) => x == y,
        (Input::Embedding(x), Input::Embedding(y)) => x == y,
        _ => false,
    }
}

/// Tokenizes each text segment on its own (the first with BOS), as the reference tokenizer
/// splits the text around its `<i_vis>` placeholders.
pub fn tokenize<'a>(model: &Model, segments: &'a [Segment]) -> Result<Vec<Piece<'a>>> {
    segments
        .iter()
        .enumerate()
        .map(|(i, s)| match s {
            Segment::Text(t) => Ok(Piece::Tokens(model.tokenize(t, i == 0)?)),
            Segment::Vector(v) => Ok(Piece::Vector(v)),
        })
        .collect()
}
