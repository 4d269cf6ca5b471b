//! The route table ([`router`]), request metrics and the answers for unknown routes. Each family
//! of routes has its file: `recommend.rs` (`POST /v1/recommend`, `POST /v1/score`), `items.rs`
//! (the page and the catalog), `sessions.rs` (kiosk sessions), `status.rs` (health, metrics).

mod items;
mod recommend;
mod sessions;
mod status;

use super::api::ApiError;
use super::AppState;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use items::{image, item, items, page};
use recommend::{recommend, score};
use sessions::{create_session, delete_session, get_session, session_add, session_remove};
use status::{healthz, metrics_text};
use std::time::{Duration, Instant};

pub(crate) fn router(app: AppState) -> Router {
    let api = Router::new()
        .route("/", get(page))
        .route("/v1/recommend", post(recommend))
        .route("/v1/score", post(score))
        .route("/v1/items", get(items))
        .route("/v1/items/{id}", get(item))
        .route("/v1/items/{id}/image", get(image))
        .route("/v1/sessions", post(create_session))
        .route("/v1/sessions/{id}", get(get_session).delete(delete_session))
        .route("/v1/sessions/{id}/items", post(session_add))
        .route(
            "/v1/sessions/{id}/items/{item}",
            axum::routing::delete(session_remove),
        )
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text))
        .method_not_allowed_fallback(method_not_allowed)
        .route_layer(middleware::from_fn_with_state(app.clone(), track));
    api.fallback(not_found)
        .layer(DefaultBodyLimit::max(app.cfg.max_body))
        .with_state(app)
}

/// Counts every routed request by route and status and times it.
async fn track(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("unmatched".to_string(), |p| p.as_str().to_string());
    let method = req.method().clone();
    let start = Instant::now();
    let response = next.run(req).await;
    app.metrics
        .observe(&route, &method, response.status(), start.elapsed());
    response
}

async fn not_found(State(app): State<AppState>, method: Method, uri: axum::http::Uri) -> ApiError {
    app.metrics
        .observe("unmatched", &method, StatusCode::NOT_FOUND, Duration::ZERO);
    ApiError::not_found(format!("no such route: {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}", uri.path()),
    )
}
