//! The touch page (`GET /`) and the catalog: `GET /v1/items` (search, pages),
//! `GET /v1/items/{id}`, `GET /v1/items/{id}/image`, `GET /v1/popular` (the empty session's
//! row); and how an item is shown in every answer.

use crate::server::api::{parse_id, ApiError, ApiResult};
use crate::server::{App, AppState};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use illmrec::recommender::{Scored, Shared};
use illmrec::store::catalog::Item;
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::PathBuf;

const PAGE: &str = include_str!("../page.html");

pub(super) async fn page(State(app): State<AppState>) -> Response {
    // Developer controls (show scores) only with --dev-controls.
    let page = match app.cfg.dev_controls {
        true => PAGE.replace(
            "<body class=\"hide-scores\">",
            "<body class=\"hide-scores dev\">",
        ),
        false => PAGE.to_string(),
    };
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'; connect-src 'self'",
            ),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        page,
    )
        .into_response()
}

/// The item's picture: from `--images` when given, else (or when not found there) a photo
/// stored in the bundle.
fn picture(app: &App, shared: &Shared, item: &Item) -> Option<PathBuf> {
    let dir = &shared.bundle.dir;
    illmrec::store::catalog::image_file(item, dir, app.cfg.images.as_deref()).or_else(|| {
        app.cfg
            .images
            .as_ref()
            .and_then(|_| illmrec::store::catalog::image_file(item, dir, None))
    })
}

/// An item as the API shows it.
pub(super) fn item_json(app: &App, shared: &Shared, item: &Item, score: Option<f32>) -> Value {
    let has_image = picture(app, shared, item).is_some();
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
pub(super) fn ranked_json(app: &App, shared: &Shared, top: &[Scored]) -> Vec<Value> {
    top.iter()
        .zip(shared.ranked(top))
        .filter_map(|(s, r)| {
            let mut v = item_json(app, shared, shared.catalog.get(s.id)?, Some(s.score));
            v["rank"] = json!(r.rank);
            Some(v)
        })
        .collect()
}

/// The row an empty session shows: `--featured` items, else those picked most on this kiosk,
/// topped up in catalog order; and which of these it is.
pub(super) fn popular_row(app: &App, shared: &Shared, limit: usize) -> (Vec<Value>, &'static str) {
    let mut ids: Vec<u64> = Vec::new();
    let mut source = "catalog";
    let featured: Vec<u64> = app
        .cfg
        .featured
        .iter()
        .copied()
        .filter(|id| shared.catalog.get(*id).is_some())
        .collect();
    if !featured.is_empty() {
        source = "featured";
        ids = featured;
    } else {
        let mut picked: Vec<(u64, u64)> = app
            .picks
            .lock()
            .unwrap()
            .iter()
            .map(|(&id, &n)| (id, n))
            .filter(|(id, _)| shared.catalog.get(*id).is_some())
            .collect();
        picked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        if !picked.is_empty() {
            source = "picked_here";
        }
        ids.extend(picked.into_iter().map(|(id, _)| id));
    }
    ids.truncate(limit);
    if ids.len() < limit {
        for item in shared.catalog.search("", 0, limit * 2).items {
            if ids.len() >= limit {
                break;
            }
            if !ids.contains(&item.id) {
                ids.push(item.id);
            }
        }
    }
    let items = ids
        .iter()
        .filter_map(|id| shared.catalog.get(*id))
        .map(|i| item_json(app, shared, i, None))
        .collect();
    (items, source)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PopularQuery {
    #[serde(default)]
    limit: Option<usize>,
}

pub(super) async fn popular(
    State(app): State<AppState>,
    q: Result<Query<PopularQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = q.map_err(|e| ApiError::bad(format!("bad query: {}", e.body_text())))?;
    let limit = q.limit.unwrap_or(app.cfg.default_top_k);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::bad(format!(
            "limit {limit} is out of range: expected 1 to {MAX_PAGE}"
        )));
    }
    let shared = app.shared()?;
    let (items, source) = popular_row(&app, &shared, limit);
    Ok(Json(json!({"source": source, "items": items})))
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
    let shared = app.shared()?;
    let page = shared.catalog.search(&q.query, q.offset, limit);
    Ok(Json(json!({
        "total": page.total,
        "offset": q.offset,
        "items": page.items.iter().map(|i| item_json(&app, &shared, i, None)).collect::<Vec<_>>(),
    })))
}

fn known_item<'a>(shared: &'a Shared, id: &str) -> ApiResult<&'a Item> {
    let id = parse_id(id)?;
    shared
        .catalog
        .get(id)
        .ok_or_else(|| ApiError::not_found(format!("item {id} is not in the catalog")))
}

pub(super) async fn item(
    State(app): State<AppState>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Json<Value>> {
    let shared = app.shared()?;
    let item = known_item(&shared, &id)?;
    let mut v = item_json(&app, &shared, item, None);
    v["description"] = json!(item.description);
    Ok(Json(v))
}

const MAX_IMAGE_BYTES: u64 = 16 << 20;

pub(super) async fn image(
    State(app): State<AppState>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Response> {
    let shared = app.shared()?;
    let item = known_item(&shared, &id)?;
    let path = picture(&app, &shared, item)
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
            // A replaced photo keeps its URL: revalidate rather than cache for long.
            (header::CACHE_CONTROL, "max-age=60"),
        ],
        bytes,
    )
        .into_response())
}
