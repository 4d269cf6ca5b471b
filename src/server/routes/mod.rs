//! The route table ([`router`]) and what wraps every request: its id (`X-Request-ID`, taken from
//! the client when sane, else made, and echoed), its metrics (route, status, latency, queue wait,
//! compute, positions decoded), its JSON log line, the API key and the admin token, and the 503
//! while the bundle loads. Each family of routes has its file: `recommend.rs`
//! (`POST /v1/recommend`, `POST /v1/score`), `items.rs` (the page, the catalog, the empty
//! session's row), `sessions.rs` (kiosk sessions), `admin.rs` (catalog edits), `status.rs`
//! (health, metrics, the OpenAPI document).

mod admin;
mod items;
mod recommend;
mod sessions;
mod status;

use super::api::ApiError;
use super::pool::{Timing, TIMING};
use super::AppState;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use items::{image, item, items, page, popular};
use recommend::{recommend, score};
use serde_json::json;
use sessions::{create_session, delete_session, get_session, session_add, session_remove};
use status::{health, live, metrics_text, openapi, ready};
use std::cell::Cell;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Largest admin request body (an item with its photo, base64).
pub(super) const MAX_ADMIN_BODY: usize = 24 << 20;

pub(crate) fn router(app: AppState) -> Router {
    // Routes that need the loaded bundle (503 until then), behind the API key when one is set.
    let v1 = Router::new()
        .route("/v1/recommend", post(recommend))
        .route("/v1/score", post(score))
        .route("/v1/items", get(items))
        .route("/v1/items/{id}", get(item))
        .route("/v1/popular", get(popular))
        .route("/v1/sessions", post(create_session))
        .route("/v1/sessions/{id}", get(get_session).delete(delete_session))
        .route("/v1/sessions/{id}/items", post(session_add))
        .route(
            "/v1/sessions/{id}/items/{item}",
            axum::routing::delete(session_remove),
        )
        .route_layer(middleware::from_fn_with_state(app.clone(), api_key))
        // Pictures are shown by <img>, which sends no key: they are catalog content.
        .route("/v1/items/{id}/image", get(image))
        .layer(DefaultBodyLimit::max(app.cfg.max_body));
    let admin = Router::new()
        .route("/v1/admin/items", post(admin::add))
        .route(
            "/v1/admin/items/{id}",
            put(admin::replace).delete(admin::remove),
        )
        .route_layer(middleware::from_fn_with_state(app.clone(), admin_token))
        .layer(DefaultBodyLimit::max(MAX_ADMIN_BODY.max(app.cfg.max_body)));
    let open = Router::new()
        .route("/", get(page))
        .route("/health", get(health))
        .route("/healthz", get(health))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics_text))
        .route("/openapi.json", get(openapi));
    Router::new()
        .merge(v1)
        .merge(admin)
        .merge(open)
        .route_layer(middleware::from_fn(mark_route))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(app.clone(), track))
        .with_state(app)
}

/// A client's `X-Request-ID` is kept when it is 1 to 128 visible ASCII characters.
fn request_id(req: &Request) -> String {
    req.headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| super::sessions::new_id()[..16].to_string())
}

/// The route a request matched, filled in by [`mark_route`] once routed.
#[derive(Clone, Default)]
struct RouteSlot(std::sync::Arc<std::sync::Mutex<Option<String>>>);

async fn mark_route(req: Request, next: Next) -> Response {
    if let (Some(slot), Some(p)) = (
        req.extensions().get::<RouteSlot>(),
        req.extensions().get::<axum::extract::MatchedPath>(),
    ) {
        *slot.0.lock().unwrap() = Some(p.as_str().to_string());
    }
    next.run(req).await
}

/// Ids, timing, metrics and the log line of every request.
async fn track(State(app): State<AppState>, mut req: Request, next: Next) -> Response {
    let slot = RouteSlot::default();
    req.extensions_mut().insert(slot.clone());
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let id = request_id(&req);
    let start = Instant::now();
    let timing = Cell::new(Timing::default());
    let (mut response, timing) = TIMING
        .scope(timing, async {
            let r = next.run(req).await;
            (r, TIMING.with(|t| t.get()))
        })
        .await;
    let elapsed = start.elapsed();
    let route = slot
        .0
        .lock()
        .unwrap()
        .take()
        .unwrap_or_else(|| "unmatched".to_string());
    let status = response.status();
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", v);
    }
    app.metrics
        .observe(&route, &method, status, elapsed, &timing);
    if app.cfg.request_log {
        let line = json!({
            "ts": timestamp(SystemTime::now()),
            "event": "request",
            "request_id": id,
            "method": method.as_str(),
            "path": path,
            "route": route,
            "status": status.as_u16(),
            "ms": ms(elapsed),
            "queue_ms": ms(timing.queue),
            "compute_ms": ms(timing.compute),
            "decoded_positions": timing.decoded,
        });
        eprintln!("{line}");
    }
    response
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 100.0
}

/// A JSON log line for a server event (connections refused or closed, catalog edits).
pub(crate) fn log_event(event: &str, detail: &str, not_logged: u64) {
    let mut line = json!({"ts": timestamp(SystemTime::now()), "event": event, "detail": detail});
    if not_logged > 0 {
        line["not_logged_since_last"] = json!(not_logged);
    }
    eprintln!("{line}");
}

/// RFC 3339 UTC with milliseconds.
fn timestamp(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// The bearer token or `X-API-Key` of a request.
fn presented_key(req: &Request) -> Option<&str> {
    let h = req.headers();
    h.get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| h.get("x-api-key").and_then(|v| v.to_str().ok()))
        .map(str::trim)
}

/// Compares without stopping at the first difference.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

async fn api_key(State(app): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(key) = &app.cfg.api_key {
        if !presented_key(&req).is_some_and(|k| same_secret(k, key)) {
            return unauthorized(
                "this server requires an API key (Authorization: Bearer KEY or X-API-Key: KEY)",
            );
        }
    }
    next.run(req).await
}

async fn admin_token(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let Some(token) = &app.cfg.admin_token else {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "the admin API is off: start serve with --admin-token-file",
        )
        .into_response();
    };
    if !presented_key(&req).is_some_and(|k| same_secret(k, token)) {
        return unauthorized(
            "the admin API requires the admin token (Authorization: Bearer TOKEN)",
        );
    }
    next.run(req).await
}

fn unauthorized(message: &str) -> Response {
    let mut r = ApiError::new(StatusCode::UNAUTHORIZED, message).into_response();
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("no such route: {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}", uri.path()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339() {
        let t = UNIX_EPOCH + Duration::from_millis(1_765_000_000_123);
        assert_eq!(timestamp(t), "2025-12-06T05:46:40.123Z");
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(timestamp(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "abcd"));
    }
}
