//! Operations: `GET /health` (also `/healthz`), `/health/live`, `/health/ready` (503 while the
//! bundle loads), `GET /metrics` (OpenMetrics text) and `GET /openapi.json`.

use crate::server::AppState;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;

const OPENAPI: &str = include_str!("../openapi.json");

fn status_of(ready: bool) -> StatusCode {
    match ready {
        true => StatusCode::OK,
        false => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// Everything at once: 200 when ready, 503 while loading.
pub(super) async fn health(State(app): State<AppState>) -> Response {
    let mut v = json!({
        "status": if app.ready() { "ok" } else { "loading" },
        "live": true,
        "ready": app.ready(),
        "uptime_s": app.started.elapsed().as_secs(),
        "connections": app.conns.open.load(Ordering::Relaxed),
        "max_connections": app.cfg.max_connections,
        "sessions": app.sessions.lock().unwrap().len(),
    });
    if let (Ok(shared), Ok(pool)) = (app.shared(), app.pool()) {
        v["contexts"] = json!(pool.contexts);
        v["queue_depth"] = json!(pool.depth());
        v["queue_capacity"] = json!(pool.capacity);
        v["catalog_items"] = json!(shared.catalog.len());
        v["trained"] = json!(shared.heads.config.trained);
    }
    (status_of(app.ready()), Json(v)).into_response()
}

/// The process answers.
pub(super) async fn live() -> Json<Value> {
    Json(json!({"live": true}))
}

/// The bundle is loaded: requests are served (503 until then).
pub(super) async fn ready(State(app): State<AppState>) -> Response {
    let ready = app.ready();
    (status_of(ready), Json(json!({"ready": ready}))).into_response()
}

pub(super) async fn metrics_text(State(app): State<AppState>) -> Response {
    let (n, bytes) = {
        let s = app.sessions.lock().unwrap();
        (s.len(), s.bytes())
    };
    let depth = app.pool().map_or(0, |p| p.depth());
    let text = app.metrics.render(depth, n, bytes, &app.conns);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

pub(super) async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}
