//! Recommendations for a history: `POST /v1/recommend` (one user) and `POST /v1/score` (JSON
//! lines of users, as the `score` command reads them).

use super::items::ranked_json;
use crate::server::api::{read_body, with_timeout, ApiError, ApiResult, JsonBody};
use crate::server::pool::count_decoded;
use crate::server::{App, AppState};
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use illmrec::recommender::{Recommender, RequestError, Scored, Shared, UserVector};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashSet;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RecommendRequest {
    history: Vec<u64>,
    #[serde(default)]
    candidates: Option<Vec<u64>>,
    #[serde(default)]
    top_k: Option<usize>,
    #[serde(default)]
    include_seen: bool,
}

pub(super) fn exclusions(history: &[u64], include_seen: bool) -> HashSet<u64> {
    match include_seen {
        true => HashSet::new(),
        false => history.iter().copied().collect(),
    }
}

/// The answer for a user vector: top items and what went into the prompt (`shared`: the
/// bundle the worker scored with).
pub(super) fn answer(
    app: &App,
    shared: &Shared,
    history: &[u64],
    user: &UserVector,
    top: &[Scored],
) -> Value {
    json!({
        "history": history,
        "history_used": user.used,
        "prompt_positions": user.prompt_positions,
        "trained": shared.heads.config.trained,
        "items": ranked_json(app, shared, top),
    })
}

/// Positions a cold request decodes: its prompt less the cached task prefix.
pub(super) fn cold_decoded(rec: &mut Recommender, user: &UserVector) -> usize {
    let prefix = rec.context().prefix().len();
    user.prompt_positions.saturating_sub(prefix)
}

pub(super) async fn recommend(
    State(app): State<AppState>,
    JsonBody(r): JsonBody<RecommendRequest>,
) -> ApiResult<Json<Value>> {
    let k = r.top_k.unwrap_or(app.cfg.default_top_k);
    app.shared()?
        .check_request(&r.history, r.candidates.as_deref(), k)?;
    let history = r.history.clone();
    let (user, top, shared, decoded) = with_timeout(&app, async {
        Ok(app
            .pool()?
            .run(move |rec| {
                let user = rec.encode_user(&r.history)?;
                let exclude = exclusions(&r.history, r.include_seen);
                let top = rec.top_k(&user, k, r.candidates.as_deref(), &exclude)?;
                let decoded = cold_decoded(rec, &user);
                Ok::<_, RequestError>((user, top, rec.shared().clone(), decoded))
            })
            .await??)
    })
    .await?;
    count_decoded(decoded);
    Ok(Json(answer(&app, &shared, &history, &user, &top)))
}

/// `score` lines in, `score` lines out (a line that cannot be scored answers `{"line", "error"}`
/// in its place, so output line n is always input line n).
pub(super) async fn score(State(app): State<AppState>, req: Request) -> ApiResult<Response> {
    let body = read_body(req, &app).await?;
    let mut out = String::new();
    let lines = illmrec::store::jsonl::Lines::new(std::io::Cursor::new(body.to_vec()));
    let mut n = 0;
    for line in lines {
        n += 1;
        let result: ApiResult<Value> = async {
            let line = line.map_err(|e| ApiError::bad(format!("{e:#}")))?;
            let u: illmrec::store::jsonl::ScoreLine = line
                .parse()
                .map_err(|e| ApiError::bad(format!("not a valid user line: {e:#}")))?;
            let k = u.top_k.unwrap_or(app.cfg.default_top_k);
            app.shared()?
                .check_request(&u.history, u.candidates.as_deref(), k)?;
            let user_field = u.user.clone();
            let (used, top, decoded) = with_timeout(&app, async {
                Ok(app
                    .pool()?
                    .run(move |rec| {
                        let user = rec.encode_user(&u.history)?;
                        let exclude = exclusions(&u.history, false);
                        let top = rec.top_k(&user, k, u.candidates.as_deref(), &exclude)?;
                        let decoded = cold_decoded(rec, &user);
                        Ok::<_, RequestError>((user.used, top, decoded))
                    })
                    .await??)
            })
            .await?;
            count_decoded(decoded);
            // The fields of `illmrec score`'s records (`ScoreRecord`).
            let items = app.shared()?.ranked(&top);
            Ok(json!({"history_used": used, "items": items, "user": user_field}))
        }
        .await;
        match result {
            Ok(v) => out.push_str(&v.to_string()),
            // A full queue or shutdown stops the batch: the client retries it whole.
            Err(e) if e.status == StatusCode::SERVICE_UNAVAILABLE => return Err(e),
            Err(e) => out.push_str(&json!({"line": n, "error": e.message}).to_string()),
        }
        out.push('\n');
    }
    if n == 0 {
        return Err(ApiError::bad(
            "the request body has no lines: expected JSON lines like the score command's input",
        ));
    }
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], out).into_response())
}
