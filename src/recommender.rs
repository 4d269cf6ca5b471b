//! The recommender: a bundle's model, heads, banks and catalog put together.
//!
//! A request goes: history ids → prompt segments (titles, adaptor-projected image features, the
//! `[REC]` vector) → tokens and injected vectors → the LLM's final hidden state at `[REC]` →
//! one user vector per modality (`f_u_m`) → dot products with the cached item vectors.
//!
//! The read-only part (model, heads, banks, catalog, item vectors: [`Shared`]) is opened once
//! and shared by any number of [`Recommender`]s, each with its own llama.cpp context
//! ([`Recommender::worker`]), one per thread. Request methods return a typed [`RequestError`].

use crate::bank::{Bank, Modality};
use crate::bundle::Bundle;
use crate::catalog::{Catalog, Item};
use crate::heads::Heads;
use crate::item_vectors::ItemVectors;
use crate::llm::{
    Context, ContextOptions, GgufInfo, Input, Model, ModelOptions, SavedState, Token,
};
use crate::prompt::{self, ItemBody, PromptItem, PromptStyle, Segment};
use crate::rank;
pub use crate::rank::Scored;
use anyhow::{ensure, Context as _, Result};
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Most history ids one request may carry (only the newest `--max-history` reach the prompt).
pub const MAX_HISTORY_IDS: usize = 10_000;
/// Most candidate ids one request may carry.
pub const MAX_CANDIDATES: usize = 1_000_000;
/// Largest `top_k` one request may ask for.
pub const MAX_TOP_K: usize = 10_000;

/// Why a request could not be answered. Every variant but [`RequestError::NonFinite`] and
/// [`RequestError::Engine`] is the request's fault ([`RequestError::is_client_error`]).
#[derive(Debug)]
pub enum RequestError {
    /// Ids that are not in the catalog, each once, in the order given.
    UnknownItems(Vec<u64>),
    EmptyHistory,
    EmptyCandidates,
    /// A list longer than the request limits.
    TooManyItems {
        what: &'static str,
        given: usize,
        max: usize,
    },
    /// `top_k` outside 1..=[`MAX_TOP_K`].
    BadTopK(usize),
    /// The prompt for even the newest history item does not fit the context.
    DoesNotFit {
        n_ctx: usize,
    },
    /// A NaN or infinite vector or score: the heads or features are damaged.
    NonFinite(String),
    /// The LLM or another part of the engine failed.
    Engine(anyhow::Error),
}

impl RequestError {
    /// Whether the request itself is at fault (an HTTP 400), rather than the engine.
    pub fn is_client_error(&self) -> bool {
        !matches!(self, RequestError::NonFinite(_) | RequestError::Engine(_))
    }
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestError::UnknownItems(ids) if ids.len() == 1 => {
                write!(f, "item {} is not in the catalog", ids[0])
            }
            RequestError::UnknownItems(ids) => {
                const SHOWN: usize = 20;
                let list: Vec<String> = ids.iter().take(SHOWN).map(u64::to_string).collect();
                write!(f, "items {} are not in the catalog", list.join(", "))?;
                if ids.len() > SHOWN {
                    write!(f, " (and {} more)", ids.len() - SHOWN)?;
                }
                Ok(())
            }
            RequestError::EmptyHistory => {
                write!(f, "the history is empty: give at least one item id")
            }
            RequestError::EmptyCandidates => {
                write!(f, "the candidate list is empty: give at least one item id")
            }
            RequestError::TooManyItems { what, given, max } => {
                write!(f, "too many items: the {what} has {given} ids, at most {max} are accepted")
            }
            RequestError::BadTopK(k) => {
                write!(f, "top_k {k} is out of range: expected 1 to {MAX_TOP_K}")
            }
            RequestError::DoesNotFit { n_ctx } => write!(
                f,
                "the prompt for even one history item does not fit a context of {n_ctx} positions; raise --ctx"
            ),
            RequestError::NonFinite(what) => write!(f, "{what}"),
            RequestError::Engine(e) => write!(f, "{e:#}"),
        }
    }
}

impl std::error::Error for RequestError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RequestError::Engine(e) => Some(e.as_ref()),
            _ => None,
        }
    }
}

impl From<anyhow::Error> for RequestError {
    fn from(e: anyhow::Error) -> Self {
        match e.downcast::<rank::NonFiniteScore>() {
            Ok(n) => RequestError::NonFinite(n.to_string()),
            Err(e) => RequestError::Engine(e),
        }
    }
}

impl From<rank::NonFiniteScore> for RequestError {
    fn from(e: rank::NonFiniteScore) -> Self {
        RequestError::NonFinite(e.to_string())
    }
}

type RequestResult<T> = std::result::Result<T, RequestError>;

/// What a kiosk session keeps between taps: the KV state of its last prompt up to its last item.
#[derive(Clone, Debug, Default)]
pub struct SessionState {
    saved: Option<SavedState>,
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

/// The read-only part of a recommender, shared by its workers.
pub struct Shared {
    pub bundle: Bundle,
    pub catalog: Catalog,
    pub heads: Heads,
    pub banks: BTreeMap<Modality, Bank>,
    pub items: ItemVectors,
    model: Arc<Model>,
    opts: Options,
}

impl Shared {
    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn options(&self) -> &Options {
        &self.opts
    }

    pub fn modalities(&self) -> &[Modality] {
        self.items.modalities()
    }

    /// Checks a request before any work: a non-empty history and candidate list within the
    /// limits, a `top_k` in range, and every id in the catalog (all unknown ids are listed).
    pub fn check_request(
        &self,
        history: &[u64],
        candidates: Option<&[u64]>,
        top_k: usize,
    ) -> RequestResult<()> {
        if history.is_empty() {
            return Err(RequestError::EmptyHistory);
        }
        if history.len() > MAX_HISTORY_IDS {
            return Err(RequestError::TooManyItems {
                what: "history",
                given: history.len(),
                max: MAX_HISTORY_IDS,
            });
        }
        match candidates {
            Some([]) => return Err(RequestError::EmptyCandidates),
            Some(c) if c.len() > MAX_CANDIDATES => {
                return Err(RequestError::TooManyItems {
                    what: "candidate list",
                    given: c.len(),
                    max: MAX_CANDIDATES,
                })
            }
            _ => {}
        }
        if !(1..=MAX_TOP_K).contains(&top_k) {
            return Err(RequestError::BadTopK(top_k));
        }
        self.check_ids(history.iter().chain(candidates.into_iter().flatten()))
    }

    /// Every id in the catalog, or all those that are not (each once, in order).
    pub fn check_ids<'a>(&self, ids: impl IntoIterator<Item = &'a u64>) -> RequestResult<()> {
        let mut unknown = Vec::new();
        let mut seen = HashSet::new();
        for &id in ids {
            if self.catalog.get(id).is_none() && seen.insert(id) {
                unknown.push(id);
            }
        }
        match unknown.is_empty() {
            true => Ok(()),
            false => Err(RequestError::UnknownItems(unknown)),
        }
    }

    /// The user vectors `f_u_m(hidden)`, in [`Shared::modalities`] order.
    pub fn user_vectors(&self, hidden: &[f32]) -> RequestResult<Vec<Vec<f32>>> {
        let vectors: Vec<Vec<f32>> = self
            .modalities()
            .iter()
            .map(|m| self.heads.user[m].forward(hidden))
            .collect();
        for (m, v) in self.modalities().iter().zip(&vectors) {
            if !v.iter().all(|x| x.is_finite()) {
                return Err(RequestError::NonFinite(format!(
                    "the {m} user head produced a non-finite vector: the heads are corrupt"
                )));
            }
        }
        Ok(vectors)
    }

    /// Scores of the given items (`None` for an item with no feature in any scored modality).
    /// A NaN or infinite score is an error ([`rank::NonFiniteScore`]), never a number to rank.
    pub fn score_items(&self, user: &UserVector, ids: &[u64]) -> RequestResult<Vec<Option<f32>>> {
        self.check_ids(ids)?;
        let query = self.items.query(&user.vectors);
        ids.iter()
            .map(|&id| {
                let i = self.catalog.position(id).expect("checked above");
                match self.items.score(&query, i) {
                    Some(s) if !s.is_finite() => Err(rank::NonFiniteScore { id, score: s }.into()),
                    score => Ok(score),
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
    ) -> RequestResult<Vec<Scored>> {
        Ok(match candidates {
            Some([]) => return Err(RequestError::EmptyCandidates),
            Some(ids) => {
                let scores = self.score_items(user, ids)?;
                rank::top_k(ids.iter().copied().zip(scores), exclude, k)?
            }
            None => self
                .items
                .top_k(&self.items.query(&user.vectors), exclude, k)?,
        })
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
    /// for an unchanged bank, see [`crate::verified`]), so a changed byte anywhere in them is an
    /// error, never a different answer; only the model file is checked by size, `n_embd` and architecture alone (its
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
        let cache_dir = opts
            .cache_dir
            .clone()
            .unwrap_or_else(|| bundle.dir.join("cache"));
        let (banks, digests) =
            bundle.open_banks(Some(&crate::verified::Stamps::new(&cache_dir)))?;
        check_dims(&heads, info.n_embd, &banks)?;
        let items = ItemVectors::open_or_build(&cache_dir, &heads, &banks, &digests, &catalog)?;
        let model = Arc::new(Model::load(&model_path, &opts.model_options)?);
        Self::on(Arc::new(Shared {
            bundle,
            catalog,
            heads,
            banks,
            items,
            model,
            opts,
        }))
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

    /// [`Recommender::encode_user`] for several histories, decoded together: up to `per_call`
    /// users per llama.cpp call sequence (each on a sequence of its own sharing the cached
    /// prefix; as many as fit the context, see [`crate::llm::group_prompts`]). Results are per
    /// history, in order; a history that cannot be prompted gets its own error and does not stop
    /// the others, and a group whose decode fails is retried one user at a time so that the error
    /// lands on the user that caused it. With `per_call` 1 this is `encode_user` on each.
    ///
    /// A batched state equals `encode_user`'s within llama.cpp's batch-shape noise.
    pub fn encode_users(
        &mut self,
        histories: &[&[u64]],
        per_call: usize,
    ) -> Vec<RequestResult<UserVector>> {
        if per_call <= 1 {
            return histories.iter().map(|h| self.encode_user(h)).collect();
        }
        let mut results: Vec<Option<RequestResult<UserVector>>> =
            (0..histories.len()).map(|_| None).collect();
        // Prompted users: (index, segments, used ids, dropped count).
        let mut prompted = Vec::new();
        for (k, h) in histories.iter().enumerate() {
            match self.prompt(h) {
                Ok((segments, used, dropped)) => prompted.push((k, segments, used, dropped)),
                Err(e) => results[k] = Some(Err(e)),
            }
        }
        let mut ready = Vec::new(); // (index in `prompted`, inputs)
        for (j, (k, segments, _, _)) in prompted.iter().enumerate() {
            match tokenize(self.model(), segments) {
                Ok(pieces) => ready.push((j, pieces)),
                Err(e) => results[*k] = Some(Err(e.into())),
            }
        }
        let inputs: Vec<Vec<Input>> = ready
            .iter()
            .map(|(_, pieces)| pieces.iter().flat_map(|p| p.inputs()).collect())
            .collect();
        let lens: Vec<usize> = inputs.iter().map(Vec::len).collect();
        let shared: Vec<usize> = inputs
            .iter()
            .map(|i| match self.reuse_prefix {
                true => self.ctx.shared_prefix_len(i),
                false => 0,
            })
            .collect();
        let groups = crate::llm::group_prompts(
            &lens,
            &shared,
            self.ctx.prefix().len(),
            self.ctx.n_ctx(),
            per_call,
        );
        let mut hidden: Vec<Option<Result<Vec<f32>>>> = (0..inputs.len()).map(|_| None).collect();
        for group in groups {
            let batch: Vec<&[Input]> = inputs[group.clone()].iter().map(Vec::as_slice).collect();
            let states = match batch.len() {
                1 => self
                    .ctx
                    .last_hidden(batch[0], self.reuse_prefix)
                    .map(|h| vec![h]),
                _ => self.ctx.many_hidden(&batch, self.reuse_prefix),
            };
            match states {
                Ok(states) => {
                    for (r, h) in group.zip(states) {
                        hidden[r] = Some(Ok(h));
                    }
                }
                // One at a time, so that each user gets its own answer or error.
                Err(_) => {
                    for (r, one) in group.zip(batch) {
                        hidden[r] = Some(self.ctx.last_hidden(one, self.reuse_prefix));
                    }
                }
            }
        }
        for (((j, _), hidden), inputs) in ready.iter().zip(hidden).zip(&inputs) {
            let (k, _, used, dropped) = &prompted[*j];
            let user = hidden
                .expect("every tokenized prompt was decoded")
                .map_err(RequestError::from)
                .and_then(|hidden| {
                    Ok(UserVector {
                        vectors: self.user_vectors(&hidden)?,
                        hidden,
                        used: used.clone(),
                        dropped_for_context: *dropped,
                        prompt_positions: inputs.len(),
                    })
                });
            results[*k] = Some(user);
        }
        results
            .into_iter()
            .map(|r| r.expect("every history has a result"))
            .collect()
    }

    /// Like [`Recommender::encode_user`] for a kiosk session's history, continuing from the
    /// session's saved KV state where the new prompt shares its start with the last one (a tap
    /// that adds an item decodes that item, the closing text and `[REC]`), and saving the state
    /// up to the history's last visual token for the next call. Also returns how many positions
    /// were decoded. The state agrees with `encode_user` within llama.cpp's batch-shape noise.
    pub fn encode_session(
        &mut self,
        session: &mut SessionState,
        history: &[u64],
    ) -> RequestResult<(UserVector, usize)> {
        let (segments, used, dropped) = self.prompt(history)?;
        let pieces = tokenize(self.model(), &segments)?;
        let inputs: Vec<Input> = pieces.iter().flat_map(|p| p.inputs()).collect();
        let t = prompt::template();
        let tail = format!("{}{}{}", t.list_close, t.closing, t.instruction);
        let save_at = session_cut(&inputs, self.model().tokenize(&tail, false)?.len());
        let (hidden, saved, decoded) = match self.ctx.session_hidden(
            session.saved.as_ref(),
            &inputs,
            save_at,
            self.reuse_prefix,
        ) {
            Ok(r) => r,
            Err(e) => {
                session.saved = None;
                return Err(e.into());
            }
        };
        session.saved = Some(saved);
        let vectors = self.user_vectors(&hidden)?;
        Ok((
            UserVector {
                vectors,
                hidden,
                used,
                dropped_for_context: dropped,
                prompt_positions: inputs.len(),
            },
            decoded,
        ))
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
                    .branch_hidden(shared, &branches, self.reuse_prefix)?,
            );
        }
        Ok(out)
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

/// Where a session saves its prompt's KV state: at the end of the newest item, where the next
/// prompt (whose closing text becomes another item) starts to differ. That is after the last
/// injected vector before `[REC]` when the newest item is written with its visual token, else
/// `tail` positions (the closing text's tokens) plus a margin of two before `[REC]` (tokens may
/// merge across the join; the next call compares positions and rolls back to the common start).
fn session_cut(inputs: &[Input], tail: usize) -> usize {
    let last = inputs.len() - 1;
    let after_vector = inputs[..last]
        .iter()
        .rposition(|i| matches!(i, Input::Embedding(_)))
        .map_or(0, |i| i + 1);
    after_vector
        .max(last.saturating_sub(tail + 2))
        .clamp(1.min(last), last)
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
