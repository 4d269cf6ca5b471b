//! Kiosk sessions: `POST /v1/sessions`, `GET|DELETE /v1/sessions/{id}`,
//! `POST /v1/sessions/{id}/items` (a tap) and `DELETE /v1/sessions/{id}/items/{item}`. Each answer
//! continues from the session's saved KV state.

use super::items::popular_row;
use super::recommend::{answer, exclusions};
use crate::server::api::{parse_id, read_body, with_timeout, ApiError, ApiResult, JsonBody};
use crate::server::pool::count_decoded;
use crate::server::{sessions as store, AppState};
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use illmrec::recommender::RequestError;
use serde::Deserialize;
use serde_json::{json, Value};
use std::time::Instant;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct SessionRequest {
    #[serde(default)]
    history: Vec<u64>,
    #[serde(default)]
    top_k: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TapRequest {
    id: u64,
    #[serde(default)]
    top_k: Option<usize>,
}

/// Recommendations for a session's current history, continuing from its saved KV state.
async fn session_answer(app: &AppState, id: &str, top_k: Option<usize>) -> ApiResult<Value> {
    let k = top_k.unwrap_or(app.cfg.default_top_k);
    let shared = app.shared()?;
    let (history, state, generation) = {
        let mut sessions = app.sessions.lock().unwrap();
        let generation = sessions.generation;
        let s = sessions
            .get(id, Instant::now())
            .ok_or_else(|| session_missing(id))?;
        (s.history.clone(), s.state.take(), generation)
    };
    if history.is_empty() {
        if let Some(s) = app.sessions.lock().unwrap().get(id, Instant::now()) {
            s.state = state;
        }
        // Something to start from: the featured or popular row, unscored.
        let (items, source) = popular_row(app, &shared, k);
        return Ok(json!({
            "session": id,
            "history": history,
            "items": items,
            "row": source,
            "trained": shared.heads.config.trained,
        }));
    }
    shared.check_request(&history, None, k)?;
    let h = history.clone();
    let result = with_timeout(app, async {
        Ok(app
            .pool()?
            .run(move |rec| {
                let mut state = state.unwrap_or_default();
                let r = rec
                    .encode_session(&mut state, &h)
                    .and_then(|(user, decoded)| {
                        let top = rec.top_k(&user, k, None, &exclusions(&h, false))?;
                        Ok((user, top, decoded))
                    });
                (r, state, rec.shared().clone())
            })
            .await?)
    })
    .await?;
    let (r, state, shared) = result;
    // Keep the new state unless the history changed meanwhile (another tap won the race) or
    // the catalog changed (the state may hold an item's old prompt).
    {
        let mut sessions = app.sessions.lock().unwrap();
        let current = sessions.generation == generation;
        if let Some(s) = sessions.get(id, Instant::now()) {
            if s.history == history && current {
                s.state = Some(state);
            }
        }
    }
    let (user, top, decoded) = r?;
    app.metrics.session_tap(decoded);
    count_decoded(decoded);
    let mut v = answer(app, &shared, &history, &user, &top);
    v["session"] = json!(id);
    v["decoded_positions"] = json!(decoded);
    Ok(v)
}

fn session_missing(id: &str) -> ApiError {
    ApiError::not_found(format!(
        "session {id} does not exist (it may have expired or been evicted): create a new one"
    ))
}

pub(super) async fn create_session(
    State(app): State<AppState>,
    req: Request,
) -> ApiResult<Response> {
    let body = read_body(req, &app).await?;
    let r: SessionRequest = if body.iter().all(u8::is_ascii_whitespace) {
        SessionRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad(format!("malformed JSON request: {e}")))?
    };
    if !r.history.is_empty() {
        app.shared()?
            .check_request(&r.history, None, r.top_k.unwrap_or(app.cfg.default_top_k))?;
    }
    let id = store::new_id();
    app.sessions
        .lock()
        .unwrap()
        .insert(id.clone(), r.history, Instant::now());
    let v = session_answer(&app, &id, r.top_k).await?;
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

pub(super) async fn get_session(
    State(app): State<AppState>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Json<Value>> {
    let mut sessions = app.sessions.lock().unwrap();
    let s = sessions
        .get(&id, Instant::now())
        .ok_or_else(|| session_missing(&id))?;
    Ok(Json(json!({"session": id, "history": s.history})))
}

pub(super) async fn delete_session(
    State(app): State<AppState>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<StatusCode> {
    match app.sessions.lock().unwrap().remove(&id) {
        true => Ok(StatusCode::NO_CONTENT),
        false => Err(session_missing(&id)),
    }
}

pub(super) async fn session_add(
    State(app): State<AppState>,
    UrlPath(id): UrlPath<String>,
    JsonBody(tap): JsonBody<TapRequest>,
) -> ApiResult<Json<Value>> {
    app.shared()?.check_ids(&[tap.id])?;
    {
        let mut sessions = app.sessions.lock().unwrap();
        let s = sessions
            .get(&id, Instant::now())
            .ok_or_else(|| session_missing(&id))?;
        if s.history.len() >= illmrec::recommender::MAX_HISTORY_IDS {
            return Err(RequestError::TooManyItems {
                what: "session history",
                given: s.history.len() + 1,
                max: illmrec::recommender::MAX_HISTORY_IDS,
            }
            .into());
        }
        s.history.push(tap.id);
    }
    *app.picks.lock().unwrap().entry(tap.id).or_default() += 1;
    Ok(Json(session_answer(&app, &id, tap.top_k).await?))
}

pub(super) async fn session_remove(
    State(app): State<AppState>,
    UrlPath((id, item)): UrlPath<(String, String)>,
) -> ApiResult<Json<Value>> {
    let item = parse_id(&item)?;
    {
        let mut sessions = app.sessions.lock().unwrap();
        let s = sessions
            .get(&id, Instant::now())
            .ok_or_else(|| session_missing(&id))?;
        let before = s.history.len();
        s.history.retain(|&x| x != item);
        if s.history.len() == before {
            return Err(ApiError::not_found(format!(
                "item {item} is not in session {id}'s history"
            )));
        }
    }
    Ok(Json(session_answer(&app, &id, None).await?))
}
