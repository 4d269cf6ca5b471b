//! What a request may ask for, and why it could not be answered ([`RequestError`]).

use crate::method::rank;
use std::fmt;

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
    /// The heads give an answer with no information (an all-zero user vector: every item would
    /// score 0.0 and the ranking would be the id order); names the heads file.
    Degenerate(String),
    /// Candidates given, but none can be ranked: every one is in the history (excluded), or
    /// none has a feature in a scored modality.
    NothingToRank(String),
    /// The LLM or another part of the engine failed.
    Engine(anyhow::Error),
}

impl RequestError {
    /// Whether the request itself is at fault (an HTTP 400), rather than the engine.
    pub fn is_client_error(&self) -> bool {
        !matches!(
            self,
            RequestError::NonFinite(_) | RequestError::Degenerate(_) | RequestError::Engine(_)
        )
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
            RequestError::NonFinite(what)
            | RequestError::Degenerate(what)
            | RequestError::NothingToRank(what) => write!(f, "{what}"),
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

pub(super) type RequestResult<T> = std::result::Result<T, RequestError>;
