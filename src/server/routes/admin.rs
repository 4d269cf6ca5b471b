//! Catalog edits on a running kiosk, behind the admin token: `POST /v1/admin/items` (add),
//! `PUT /v1/admin/items/{id}` (replace), `DELETE /v1/admin/items/{id}` (remove). An item comes
//! with its photo (base64 JPEG, PNG or WebP): the runtime encodes it into the img bank, and the
//! photo is stored in the bundle, so the page shows it.
//!
//! The library applies the edit to the bundle folder ([`illmrec::bundle::edit::edit`], under the
//! bundle's lock, switched in atomically); the bundle is then read again and swapped in behind
//! an `Arc`: requests in flight finish on the catalog they started with, the next ones see the
//! new one. Edits run one at a time.

use super::items::item_json;
use crate::server::api::{parse_id, read_body, ApiError, ApiResult};
use crate::server::AppState;
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use illmrec::bundle::edit::{edit, photo_ext, Edit, EditReport, NewItem};
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ItemRequest {
    #[serde(default)]
    id: Option<u64>,
    title: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    genres: Vec<String>,
    /// The photo, base64 (standard alphabet; a `data:` URL prefix is accepted).
    #[serde(default)]
    photo: Option<String>,
}

async fn item_request(req: Request, app: &AppState) -> ApiResult<ItemRequest> {
    let body = read_body(req, app).await?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad(
            "the request body is empty: expected {\"title\", \"photo\"?, ...}",
        ));
    }
    serde_json::from_slice(&body).map_err(|e| ApiError::bad(format!("malformed JSON request: {e}")))
}

/// The photo's bytes and its image feature, or a 400 naming what is wrong.
fn photo(id: u64, b64: &str) -> ApiResult<(Vec<u8>, Vec<f32>)> {
    let b64 = match b64.split_once(";base64,") {
        Some((head, rest)) if head.starts_with("data:") => rest,
        _ => b64,
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|e| ApiError::bad(format!("the photo of item {id} is not base64: {e}")))?;
    if photo_ext(&bytes).is_none() {
        return Err(ApiError::bad(format!(
            "the photo of item {id} is not a JPEG, PNG or WebP file"
        )));
    }
    let rgb = illmrec::images::decode::decode_rgb(&bytes)
        .map_err(|e| ApiError::bad(format!("cannot decode the photo of item {id}: {e:#}")))?;
    let feature = illmrec::images::ImageEncoder::new()
        .and_then(|enc| enc.encode_rgb(&rgb))
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot encode the photo of item {id}: {e:#}"),
            )
        })?;
    Ok((bytes, feature))
}

fn new_item(id: u64, r: ItemRequest) -> ApiResult<NewItem> {
    let photo = match &r.photo {
        Some(b64) => Some(photo(id, b64)?),
        None => None,
    };
    Ok(NewItem::new(id, r.title, r.description, r.genres, photo))
}

/// Applies an edit to the bundle and swaps the reloaded bundle in.
async fn apply(
    app: &AppState,
    id: u64,
    make: impl FnOnce() -> ApiResult<Edit> + Send + 'static,
) -> ApiResult<Value> {
    let _one_at_a_time = app.edits.lock().await;
    let shared = app.shared()?;
    let known = shared.catalog.get(id).is_some();
    let t = std::time::Instant::now();
    let result = tokio::task::spawn_blocking(move || {
        let e = make()?;
        match (&e, known) {
            (Edit::Add(_), true) => {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    format!(
                    "item {id} is already in the catalog (PUT /v1/admin/items/{id} replaces it)"
                ),
                ))
            }
            (Edit::Replace(_) | Edit::Remove(_), false) => {
                return Err(ApiError::not_found(format!(
                    "item {id} is not in the catalog"
                )))
            }
            _ => {}
        }
        let report: EditReport = edit(&shared.bundle.dir, &e)
            .map_err(|err| ApiError::bad(format!("cannot apply the edit: {err:#}")))?;
        let reloaded = shared.reload().map_err(|err| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the edit was applied but the bundle could not be read again: {err:#}"),
            )
        })?;
        Ok((e, report, reloaded))
    })
    .await
    .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the edit failed"))?;
    let (e, report, reloaded) = result?;
    let removed = matches!(e, Edit::Remove(_)).then_some(id);
    let verb = match e {
        Edit::Add(_) => "added",
        Edit::Replace(_) => "replaced",
        Edit::Remove(_) => "removed",
    };
    let shared = std::sync::Arc::new(reloaded);
    let item = shared
        .catalog
        .get(id)
        .map(|i| item_json(app, &shared, i, None));
    app.swap_arc(shared, removed)?;
    super::log_event(
        "catalog_edit",
        &format!(
            "{verb} item {id}: {} items, {:.2} s",
            report.catalog_len,
            t.elapsed().as_secs_f64()
        ),
        0,
    );
    Ok(json!({
        "id": id,
        "edit": verb,
        "catalog_items": report.catalog_len,
        "item": item,
        "scored_on": report.has.iter().map(|m| m.name()).collect::<Vec<_>>(),
        "missing": report.lacks.iter().map(|(m, why)| json!({"modality": m.name(), "reason": why})).collect::<Vec<_>>(),
    }))
}

pub(super) async fn add(State(app): State<AppState>, req: Request) -> ApiResult<Response> {
    let r = item_request(req, &app).await?;
    let id =
        r.id.ok_or_else(|| ApiError::bad("the new item needs an \"id\""))?;
    let v = apply(&app, id, move || Ok(Edit::Add(new_item(id, r)?))).await?;
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

pub(super) async fn replace(
    State(app): State<AppState>,
    UrlPath(id): UrlPath<String>,
    req: Request,
) -> ApiResult<Json<Value>> {
    let id = parse_id(&id)?;
    let r = item_request(req, &app).await?;
    if r.id.is_some_and(|given| given != id) {
        return Err(ApiError::bad(format!(
            "the body's id {} differs from the path's {id}",
            r.id.unwrap_or_default()
        )));
    }
    Ok(Json(
        apply(&app, id, move || Ok(Edit::Replace(new_item(id, r)?))).await?,
    ))
}

pub(super) async fn remove(
    State(app): State<AppState>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Json<Value>> {
    let id = parse_id(&id)?;
    Ok(Json(apply(&app, id, move || Ok(Edit::Remove(id))).await?))
}
