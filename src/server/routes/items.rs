//! The touch page (`GET /`) and the catalog: `GET /v1/items` (search, pages),
//! `GET /v1/items/{id}`, `GET /v1/items/{id}/image`; and how an item is shown in every answer.

use crate::server::api::{parse_id, ApiError, ApiResult};
use crate::server::{App, AppState};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use illmrec::recommender::Scored;
use illmrec::store::catalog::Item;
use serde::Deserialize;
use serde_json::{json, Value};

const PAGE: &str = include_str!("../page.html");

pub(super) async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'; connect-src 'self'",
            ),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
        .into_response()
}

/// An item as the API shows it.
pub(super) fn item_json(app: &App, item: &Item, score: Option<f32>) -> Value {
    let has_image = illmrec::store::catalog::image_file(
        item,
        &app.shared.bundle.dir,
        app.cfg.images.as_deref(),
    )
    .is_some();
    let mut v = json!({
        "id": item.id,
        "title": item.title(),
        "year": item.year(),
        "genres": item.genres,
        "image": has_image.then(|| format!("/v1/items/{}/image", item.id)),
    });
    if let Some(s) = score {
        v["score"] = json!(s);
    }
    v
}

/// Ranked items with the library's field names ([`illmrec::recommender::RankedItem`]: `rank`,
/// `id`, `score`, `title`, `year`, `genres`) and the kiosk's `image`.
pub(super) fn ranked_json(app: &App, top: &[Scored]) -> Vec<Value> {
    top.iter()
        .zip(app.shared.ranked(top))
        .filter_map(|(s, r)| {
            let mut v = item_json(app, app.shared.catalog.get(s.id)?, Some(s.score));
            v["rank"] = json!(r.rank);
            Some(v)
        })
        .collect()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ItemsQuery {
    #[serde(default)]
    query: String,
    #[serde(default)]
    offset: usize,
    #[serde(default)]
    limit: Option<usize>,
}

const MAX_PAGE: usize = 500;

pub(super) async fn items(
    State(app): State<AppState>,
    q: Result<Query<ItemsQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = q.map_err(|e| ApiError::bad(format!("bad query: {}", e.body_text())))?;
    let limit = q.limit.unwrap_or(48);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::bad(format!(
            "limit {limit} is out of range: expected 1 to {MAX_PAGE}"
        )));
    }
    let page = app.shared.catalog.search(&q.query, q.offset, limit);
    Ok(Json(json!({
        "total": page.total,
        "offset": q.offset,
        "items": page.items.iter().map(|i| item_json(&app, i, None)).collect::<Vec<_>>(),
    })))
}

fn known_item<'a>(app: &'a App, id: &str) -> ApiResult<&'a Item> {
    let id = parse_id(id)?;
    app.shared
        .catalog
        .get(id)
        .ok_or_else(|| ApiError::not_found(format!("item {id} is not in the catalog")))
}

pub(super) async fn item(
    State(app): State<AppState>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Json<Value>> {
    let item = known_item(&app, &id)?;
    let mut v = item_json(&app, item, None);
    v["description"] = json!(item.description);
    Ok(Json(v))
}

const MAX_IMAGE_BYTES: u64 = 16 << 20;

pub(super) async fn image(
    State(app): State<AppState>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Response> {
    let item = known_item(&app, &id)?;
    let path = illmrec::store::catalog::image_file(
        item,
        &app.shared.bundle.dir,
        app.cfg.images.as_deref(),
    )
    .ok_or_else(|| ApiError::not_found(format!("item {} has no image", item.id)))?;
    let too_big = std::fs::metadata(&path).map_or(true, |m| m.len() > MAX_IMAGE_BYTES);
    if too_big {
        return Err(ApiError::not_found(format!(
            "item {} has no usable image",
            item.id
        )));
    }
    let bytes = tokio::fs::read(&path)
        .await
        .map_err(|_| ApiError::not_found(format!("item {} has no readable image", item.id)))?;
    Ok((
        [
            (
                header::CONTENT_TYPE,
                illmrec::store::catalog::image_type(&path),
            ),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        bytes,
    )
        .into_response())
}
