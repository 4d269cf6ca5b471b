//! Operations: `GET /healthz` and `GET /metrics` (OpenMetrics text).

use crate::server::AppState;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

pub(super) async fn healthz(State(app): State<AppState>) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "contexts": app.pool.contexts,
        "queue_depth": app.pool.depth(),
        "queue_capacity": app.pool.capacity,
        "sessions": app.sessions.lock().unwrap().len(),
        "catalog_items": app.shared.catalog.len(),
        "trained": app.shared.heads.config.trained,
    }))
}

pub(super) async fn metrics_text(State(app): State<AppState>) -> Response {
    let (n, bytes) = {
        let s = app.sessions.lock().unwrap();
        (s.len(), s.bytes())
    };
    let text = app.metrics.render(app.pool.depth(), n, bytes);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}
