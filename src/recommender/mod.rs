//! The recommender: a bundle's model, heads, banks and catalog put together.
//!
//! A request goes: history ids → prompt segments (titles, adaptor-projected image features, the
//! `[REC]` vector) → tokens and injected vectors → the LLM's final hidden state at `[REC]` →
//! one user vector per modality (`f_u_m`) → dot products with the cached item vectors.
//!
//! The read-only part (model, heads, banks, catalog, item vectors: [`Shared`]) is opened once
//! and shared by any number of [`Recommender`]s, each with its own llama.cpp context
//! ([`Recommender::worker`]), one per thread. Request methods return a typed [`RequestError`].
//!
//! Files: this one opens a bundle and prompts and encodes one user; `request.rs` holds the
//! request limits and errors, `shared.rs` the shared part and scoring, `encode.rs` the batched,
//! session and prefix encodings, [`batch`] the records of batch scoring.

pub mod batch;
mod encode;
mod request;
mod shared;

pub use crate::method::rank::Scored;
pub use encode::{tokenize, Piece};
pub use request::{RequestError, MAX_CANDIDATES, MAX_HISTORY_IDS, MAX_TOP_K};
pub use shared::{RankedItem, Shared, UserVector};

use crate::bundle::Bundle;
use crate::engine::{Context, ContextOptions, GgufInfo, Input, Model, ModelOptions, SavedState};
use crate::method::heads::Heads;
use crate::method::item_vectors::ItemVectors;
use crate::method::prompt::{self, ItemBody, PromptItem, PromptStyle, Segment};
use crate::store::bank::{Bank, Modality};
use crate::store::catalog::{Catalog, Item};
use anyhow::{ensure, Context as _, Result};
use request::RequestResult;
use std::collections::BTreeMap;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What a kiosk session keeps between taps: the KV state of its last prompt up to its last item.
#[derive(Clone, Debug, Default)]
pub struct SessionState {
    pub(super) saved: Option<SavedState>,
}

impl SessionState {
    /// Bytes held (the KV state dominates: about 18 KiB per position for Gemma 3 270M, f16 KV).
    pub fn size(&self) -> usize {
        self.saved.as_ref().map_or(0, SavedState::size)
    }
}

/// What to write for a history item that has no image feature.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

/// A recommender: the shared read-only part and one llama.cpp context of its own. Dereferences
/// to [`Shared`] (catalog, heads, banks, item vectors, scoring).
pub struct Recommender {
    shared: Arc<Shared>,
    ctx: Context,
    reuse_prefix: bool,
    prompt_style: Option<PromptStyle>,
}

impl Deref for Recommender {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.shared
    }
}

/// Compile-time check: the shared part may be used from any thread, a worker moved to one.
const _: () = {
    const fn shareable<T: Send + Sync>() {}
    const fn movable<T: Send>() {}
    shareable::<Shared>();
    movable::<Recommender>();
};

impl Recommender {
    /// Opens a bundle: loads the model (memory-mapped), heads, banks and catalog, checks that
    /// every shape agrees, builds or opens the item-vector cache, and prefills the task text.
    ///
    /// Every bundle file it reads (heads, heads config, items, banks) is checked against the
    /// manifest's sha256 first (banks once per file version: a stamp in the cache folder vouches
    /// for an unchanged bank, see [`crate::store::verified`]), so a changed byte anywhere in them is an
    /// error, never a different answer; only the model file is checked by size, `n_embd` and architecture alone (its
    /// sha256 is `bundle verify`'s).
    pub fn open(bundle_dir: &Path, opts: Options) -> Result<Self> {
        ensure!(opts.max_history >= 1, "--max-history must be at least 1");
        opts.context.check_threads()?;
        crate::engine::set_verbose(opts.model_options.verbose);
        let bundle = Bundle::open(bundle_dir)?;
        let model_path = bundle.model_path(opts.model.as_deref())?;
        let info = GgufInfo::read(&model_path)?;
        bundle.check_model(&model_path, &info)?;
        opts.context.check(&info)?;
        let parts = read_parts(bundle, &opts, info.n_embd)?;
        let model = Arc::new(Model::load(&model_path, &opts.model_options)?);
        Self::on(Arc::new(parts.with(model, opts)))
    }

    /// Puts a reloaded shared part ([`Shared::reload`], on the same model) in place of this
    /// one's; the context and its cached task prefix are kept.
    pub fn set_shared(&mut self, shared: Arc<Shared>) -> Result<()> {
        ensure!(
            Arc::ptr_eq(&self.shared.model, &shared.model),
            "a reloaded bundle must keep the loaded model"
        );
        self.shared = shared;
        Ok(())
    }

    /// A recommender with a context of its own on an opened shared part (one per worker thread).
    pub fn on(shared: Arc<Shared>) -> Result<Self> {
        let mut ctx = Context::new(shared.model.clone(), &shared.opts.context)?;
        if shared.opts.reuse_prefix {
            // The task text starts every prompt. Its last token may merge with the first item's
            // text ("[" + "{"), so the cached prefix stops one token short.
            let mut prefix = ctx.model().tokenize(&prompt::template().task, true)?;
            prefix.pop();
            ctx.set_prefix(&prefix)?;
        }
        Ok(Self {
            reuse_prefix: shared.opts.reuse_prefix,
            prompt_style: shared.opts.prompt_style,
            shared,
            ctx,
        })
    }

    /// Another recommender on the same shared part, with a new context (for another thread).
    pub fn worker(&self) -> Result<Self> {
        Self::on(self.shared.clone())
    }

    /// The shared, read-only part.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
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
        self.reuse_prefix = reuse_prefix;
        self.prompt_style = prompt_style;
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
        let body = match self.prompt_style.unwrap_or(self.heads.config.prompt) {
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
    pub fn prompt(&self, history: &[u64]) -> RequestResult<(Vec<Segment>, Vec<u64>, usize)> {
        if history.is_empty() {
            return Err(RequestError::EmptyHistory);
        }
        self.check_ids(history)?;
        let recent = &history[history.len().saturating_sub(self.opts.max_history)..];
        let items = self.prompt_items(recent, false)?;
        let budget = self.ctx.n_ctx() - self.ctx.prefix().len();
        let model = self.model();
        let mut count = |text: &str, bos: bool| Ok(model.tokenize(text, bos)?.len());
        let Some(start) = prompt::fit(&items, &self.heads.rec_token, budget, &mut count)? else {
            return Err(RequestError::DoesNotFit {
                n_ctx: self.ctx.n_ctx(),
            });
        };
        let kept = self.prompt_items(&recent[start..], true)?;
        let segments = prompt::build(&kept, &self.heads.rec_token);
        Ok((segments, recent[start..].to_vec(), start))
    }

    /// Runs the LLM on a history and projects the `[REC]` hidden state through the user heads.
    pub fn encode_user(&mut self, history: &[u64]) -> RequestResult<UserVector> {
        let (segments, used, dropped) = self.prompt(history)?;
        let pieces = tokenize(self.model(), &segments)?;
        let inputs: Vec<Input> = pieces.iter().flat_map(|p| p.inputs()).collect();
        let hidden = self.ctx.last_hidden(&inputs, self.reuse_prefix)?;
        let vectors = self.user_vectors(&hidden)?;
        Ok(UserVector {
            vectors,
            hidden,
            used,
            dropped_for_context: dropped,
            prompt_positions: inputs.len(),
        })
    }
}

/// What [`Recommender::open`] and [`Shared::reload`] read from the bundle besides the model.
struct Parts {
    bundle: Bundle,
    catalog: Catalog,
    heads: Heads,
    banks: BTreeMap<Modality, Bank>,
    items: ItemVectors,
}

impl Parts {
    fn with(self, model: Arc<Model>, opts: Options) -> Shared {
        Shared {
            bundle: self.bundle,
            catalog: self.catalog,
            heads: self.heads,
            banks: self.banks,
            items: self.items,
            model,
            opts,
        }
    }
}

fn read_parts(bundle: Bundle, opts: &Options, n_embd: usize) -> Result<Parts> {
    let m = &bundle.manifest;
    let heads = Heads::from_bytes(
        &bundle.read_verified(&m.heads)?,
        &bundle.file(&m.heads),
        &bundle.read_verified(&m.heads_config)?,
        &bundle.file(&m.heads_config),
    )?;
    let catalog = Catalog::parse(&bundle.read_verified(&m.items)?, &bundle.file(&m.items))?;
    // A cache folder the user names may be a link they chose (followed); the bundle's own
    // `cache/` is the runtime's, and a link there is not followed.
    let cache_dir = match &opts.cache_dir {
        Some(d) => d.canonicalize().unwrap_or_else(|_| d.clone()),
        None => bundle.dir.join("cache"),
    };
    let stamps = crate::store::verified::Stamps::new(&cache_dir);
    let mut warnings = stamps.remove_links();
    if crate::store::fsutil::is_symlink(&cache_dir) {
        warnings.push(format!(
            "the cache folder {} is a symbolic link: nothing is written there (the runtime writes only inside its own folders; replace the link with a folder)",
            cache_dir.display()
        ));
    }
    let (banks, digests) = bundle.open_banks(Some(&stamps))?;
    check_dims(&heads, n_embd, &banks)?;
    warnings.extend(unscored_banks(&bundle, &heads));
    let mut items = ItemVectors::open_or_build(&cache_dir, &heads, &banks, &digests, &catalog)?;
    warnings.append(&mut items.warnings);
    items.warnings = warnings;
    Ok(Parts {
        bundle,
        catalog,
        heads,
        banks,
        items,
    })
}

impl Shared {
    /// The bundle read again from its folder (after an item edit: catalog, heads, banks, item
    /// vectors, each checked as [`Recommender::open`] checks them), on the same loaded model and
    /// options; workers take it with [`Recommender::set_shared`].
    pub fn reload(&self) -> Result<Shared> {
        let bundle = Bundle::open(&self.bundle.dir)?;
        let parts = read_parts(bundle, &self.opts, self.model.info.n_embd)?;
        Ok(parts.with(self.model.clone(), self.opts.clone()))
    }
}

/// Checks the heads' dimensions against the model and the banks, naming the tensor that differs.
/// A warning for each bank the manifest lists that the heads do not score (absent from
/// heads.json's `item_dims`) and the prompt does not use: its features are ignored.
fn unscored_banks(bundle: &Bundle, heads: &Heads) -> Vec<String> {
    let scored = heads.modalities();
    let names: Vec<&str> = scored.iter().map(|m| m.name()).collect();
    bundle
        .manifest
        .banks
        .iter()
        .filter_map(|(name, file)| {
            let m = Modality::parse(name).ok()?;
            let in_prompt = m == Modality::Img
                && heads.adaptor.is_some()
                && heads.config.prompt == PromptStyle::Image;
            (!scored.contains(&m)).then(|| {
                format!(
                    "the bundle's {m} bank {} is not scored: {} lists no '{m}' in item_dims (it scores {}), so {}",
                    bundle.file(file).display(),
                    bundle.file(&bundle.manifest.heads_config).display(),
                    names.join(", "),
                    match in_prompt {
                        true => "its features only reach the prompt",
                        false => "its features are ignored",
                    }
                )
            })
        })
        .collect()
}

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
