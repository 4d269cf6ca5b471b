//! `illmrec serve`: the kiosk's HTTP service (axum on tokio). It only parses requests and
//! writes answers: checking, prompting, scoring and ranking are the library's
//! ([`illmrec::recommender`], [`illmrec::catalog`]). LLM work runs on the [`pool::Pool`]'s
//! threads, one llama.cpp context each, behind a bounded queue.
//!
//! Routes: `GET /` (the touch page), `POST /v1/recommend`, `POST /v1/score` (JSON lines),
//! `GET /v1/items`, `GET /v1/items/{id}`, `GET /v1/items/{id}/image`, `POST /v1/sessions`,
//! `GET|DELETE /v1/sessions/{id}`, `POST /v1/sessions/{id}/items`,
//! `DELETE /v1/sessions/{id}/items/{item}`, `GET /healthz`, `GET /metrics`.

mod metrics;
mod pool;
mod sessions;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Path as UrlPath, Query, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use illmrec::catalog::Item;
use illmrec::recommender::{RequestError, Scored, Shared, UserVector};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use pool::Pool;

/// How the service runs (from `illmrec serve`'s flags).
pub struct Config {
    pub addr: SocketAddr,
    pub queue: usize,
    pub max_body: usize,
    /// Longest wait for a worker's answer, queueing included.
    pub request_timeout: Duration,
    /// Longest time to receive a request body.
    pub body_timeout: Duration,
    pub max_sessions: usize,
    pub session_idle: Duration,
    pub images: Option<PathBuf>,
    pub default_top_k: usize,
}

struct App {
    shared: Arc<Shared>,
    pool: Pool,
    sessions: Mutex<sessions::Sessions>,
    metrics: metrics::Metrics,
    cfg: Config,
}

type AppState = Arc<App>;

/// An error answer: `{"error": "..."}` with its status.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
}

impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> Self {
        let status = match e.is_client_error() {
            true => StatusCode::BAD_REQUEST,
            false => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, e.to_string())
    }
}

impl From<pool::PoolError> for ApiError {
    fn from(e: pool::PoolError) -> Self {
        match e {
            pool::PoolError::Busy => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is busy (request queue full); retry shortly",
            ),
            pool::PoolError::Closed => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is shutting down",
            ),
            pool::PoolError::Lost => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the LLM worker failed on this request",
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(json!({"error": self.message}))).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// A JSON request body: read within the size and time limits, parsed with serde; every failure
/// is an `{"error"}` answer (413 too large, 408 too slow, 400 malformed).
struct JsonBody<T>(T);

impl<T: serde::de::DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let bytes = read_body(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::bad(
                "the request body is empty: expected a JSON object",
            ));
        }
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::bad(format!("malformed JSON request: {e}")))
    }
}

async fn read_body(req: Request, state: &AppState) -> ApiResult<Bytes> {
    let limit = state.cfg.max_body;
    match tokio::time::timeout(state.cfg.body_timeout, Bytes::from_request(req, state)).await {
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "the request body did not arrive in time",
        )),
        Ok(Err(rejection)) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body is larger than the {limit}-byte limit"),
            ))
        }
        Ok(Err(rejection)) => Err(ApiError::bad(format!(
            "cannot read the request body: {}",
            rejection.body_text()
        ))),
        Ok(Ok(bytes)) => Ok(bytes),
    }
}

/// Starts the service on a bound listener and runs until SIGTERM or SIGINT, then stops
/// accepting, finishes the requests in flight and the queued jobs, and returns.
pub fn run(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    pool: Pool,
    cfg: Config,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let app = Arc::new(App {
        metrics: metrics::Metrics::new(&shared, &pool),
        sessions: Mutex::new(sessions::Sessions::new(cfg.max_sessions, cfg.session_idle)),
        shared,
        pool,
        cfg,
    });
    runtime.block_on(async {
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let expiry = tokio::spawn(expire_sessions(app.clone()));
        axum::serve(listener, router(app.clone()))
            .with_graceful_shutdown(shutdown_signal())
            .await?;
        expiry.abort();
        anyhow::Ok(())
    })?;
    app.pool.shutdown();
    Ok(())
}

fn router(app: AppState) -> Router {
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

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("cannot listen for SIGTERM");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    eprintln!("shutting down: finishing the requests in flight");
}

async fn expire_sessions(app: AppState) {
    let every = (app.cfg.session_idle / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        tokio::time::sleep(every).await;
        app.sessions.lock().unwrap().expire(Instant::now());
    }
}

const PAGE: &str = include_str!("page.html");

async fn page() -> Response {
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
fn item_json(app: &App, item: &Item, score: Option<f32>) -> Value {
    let has_image =
        illmrec::catalog::image_file(item, &app.shared.bundle.dir, app.cfg.images.as_deref())
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

fn ranked_json(app: &App, top: &[Scored]) -> Vec<Value> {
    top.iter()
        .filter_map(|s| {
            app.shared
                .catalog
                .get(s.id)
                .map(|i| item_json(app, i, Some(s.score)))
        })
        .collect()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecommendRequest {
    history: Vec<u64>,
    #[serde(default)]
    candidates: Option<Vec<u64>>,
    #[serde(default)]
    top_k: Option<usize>,
    #[serde(default)]
    include_seen: bool,
}

fn exclusions(history: &[u64], include_seen: bool) -> HashSet<u64> {
    match include_seen {
        true => HashSet::new(),
        false => history.iter().copied().collect(),
    }
}

/// The answer for a user vector: top items and what went into the prompt.
fn answer(app: &App, history: &[u64], user: &UserVector, top: &[Scored]) -> Value {
    json!({
        "history": history,
        "history_used": user.used,
        "prompt_positions": user.prompt_positions,
        "trained": app.shared.heads.config.trained,
        "items": ranked_json(app, top),
    })
}

async fn with_timeout<T>(
    app: &App,
    fut: impl std::future::Future<Output = ApiResult<T>>,
) -> ApiResult<T> {
    tokio::time::timeout(app.cfg.request_timeout, fut)
        .await
        .unwrap_or_else(|_| {
            Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the request took longer than {} s; retry shortly",
                    app.cfg.request_timeout.as_secs_f32()
                ),
            ))
        })
}

async fn recommend(
    State(app): State<AppState>,
    JsonBody(r): JsonBody<RecommendRequest>,
) -> ApiResult<Json<Value>> {
    let k = r.top_k.unwrap_or(app.cfg.default_top_k);
    app.shared
        .check_request(&r.history, r.candidates.as_deref(), k)?;
    let history = r.history.clone();
    let (user, top) = with_timeout(&app, async {
        Ok(app
            .pool
            .run(move |rec| {
                let user = rec.encode_user(&r.history)?;
                let exclude = exclusions(&r.history, r.include_seen);
                let top = rec.top_k(&user, k, r.candidates.as_deref(), &exclude)?;
                Ok::<_, RequestError>((user, top))
            })
            .await??)
    })
    .await?;
    Ok(Json(answer(&app, &history, &user, &top)))
}

/// `score` lines in, `score` lines out (a line that cannot be scored answers `{"line", "error"}`
/// in its place, so output line n is always input line n).
async fn score(State(app): State<AppState>, req: Request) -> ApiResult<Response> {
    let body = read_body(req, &app).await?;
    let mut out = String::new();
    let lines = illmrec::jsonl::Lines::new(std::io::Cursor::new(body.to_vec()));
    let mut n = 0;
    for line in lines {
        n += 1;
        let result: ApiResult<Value> = async {
            let line = line.map_err(|e| ApiError::bad(format!("{e:#}")))?;
            let u: illmrec::jsonl::ScoreLine = line
                .parse()
                .map_err(|e| ApiError::bad(format!("not a valid user line: {e:#}")))?;
            let k = u.top_k.unwrap_or(app.cfg.default_top_k);
            app.shared
                .check_request(&u.history, u.candidates.as_deref(), k)?;
            let user_field = u.user.clone();
            let (used, top) = with_timeout(&app, async {
                Ok(app
                    .pool
                    .run(move |rec| {
                        let user = rec.encode_user(&u.history)?;
                        let exclude = exclusions(&u.history, false);
                        let top = rec.top_k(&user, k, u.candidates.as_deref(), &exclude)?;
                        Ok::<_, RequestError>((user.used.len(), top))
                    })
                    .await??)
            })
            .await?;
            Ok(json!({"user": user_field, "items": top, "history_used": used}))
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ItemsQuery {
    #[serde(default)]
    query: String,
    #[serde(default)]
    offset: usize,
    #[serde(default)]
    limit: Option<usize>,
}

const MAX_PAGE: usize = 500;

async fn items(
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

fn parse_id(text: &str) -> ApiResult<u64> {
    text.parse().map_err(|_| {
        ApiError::bad(format!(
            "'{text}' is not an item id (expected a non-negative integer)"
        ))
    })
}

fn known_item<'a>(app: &'a App, id: &str) -> ApiResult<&'a Item> {
    let id = parse_id(id)?;
    app.shared
        .catalog
        .get(id)
        .ok_or_else(|| ApiError::not_found(format!("item {id} is not in the catalog")))
}

async fn item(State(app): State<AppState>, UrlPath(id): UrlPath<String>) -> ApiResult<Json<Value>> {
    let item = known_item(&app, &id)?;
    let mut v = item_json(&app, item, None);
    v["description"] = json!(item.description);
    Ok(Json(v))
}

const MAX_IMAGE_BYTES: u64 = 16 << 20;

async fn image(State(app): State<AppState>, UrlPath(id): UrlPath<String>) -> ApiResult<Response> {
    let item = known_item(&app, &id)?;
    let path =
        illmrec::catalog::image_file(item, &app.shared.bundle.dir, app.cfg.images.as_deref())
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
            (header::CONTENT_TYPE, illmrec::catalog::image_type(&path)),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        bytes,
    )
        .into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SessionRequest {
    #[serde(default)]
    history: Vec<u64>,
    #[serde(default)]
    top_k: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TapRequest {
    id: u64,
    #[serde(default)]
    top_k: Option<usize>,
}

/// Recommendations for a session's current history, continuing from its saved KV state.
async fn session_answer(app: &AppState, id: &str, top_k: Option<usize>) -> ApiResult<Value> {
    let k = top_k.unwrap_or(app.cfg.default_top_k);
    let (history, state) = {
        let mut sessions = app.sessions.lock().unwrap();
        let s = sessions
            .get(id, Instant::now())
            .ok_or_else(|| session_missing(id))?;
        (s.history.clone(), s.state.take())
    };
    if history.is_empty() {
        if let Some(s) = app.sessions.lock().unwrap().get(id, Instant::now()) {
            s.state = state;
        }
        return Ok(
            json!({"session": id, "history": history, "items": [], "trained": app.shared.heads.config.trained}),
        );
    }
    app.shared.check_request(&history, None, k)?;
    let h = history.clone();
    let result = with_timeout(app, async {
        Ok(app
            .pool
            .run(move |rec| {
                let mut state = state.unwrap_or_default();
                let r = rec
                    .encode_session(&mut state, &h)
                    .and_then(|(user, decoded)| {
                        let top = rec.top_k(&user, k, None, &exclusions(&h, false))?;
                        Ok((user, top, decoded))
                    });
                (r, state)
            })
            .await?)
    })
    .await?;
    let (r, state) = result;
    // Keep the new state unless the history changed meanwhile (another tap won the race).
    if let Some(s) = app.sessions.lock().unwrap().get(id, Instant::now()) {
        if s.history == history {
            s.state = Some(state);
        }
    }
    let (user, top, decoded) = r?;
    app.metrics.session_tap(decoded);
    let mut v = answer(app, &history, &user, &top);
    v["session"] = json!(id);
    v["decoded_positions"] = json!(decoded);
    Ok(v)
}

fn session_missing(id: &str) -> ApiError {
    ApiError::not_found(format!(
        "session {id} does not exist (it may have expired or been evicted): create a new one"
    ))
}

async fn create_session(State(app): State<AppState>, req: Request) -> ApiResult<Response> {
    let body = read_body(req, &app).await?;
    let r: SessionRequest = if body.iter().all(u8::is_ascii_whitespace) {
        SessionRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad(format!("malformed JSON request: {e}")))?
    };
    if !r.history.is_empty() {
        app.shared
            .check_request(&r.history, None, r.top_k.unwrap_or(app.cfg.default_top_k))?;
    }
    let id = sessions::new_id();
    app.sessions
        .lock()
        .unwrap()
        .insert(id.clone(), r.history, Instant::now());
    let v = session_answer(&app, &id, r.top_k).await?;
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

async fn get_session(
    State(app): State<AppState>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Json<Value>> {
    let mut sessions = app.sessions.lock().unwrap();
    let s = sessions
        .get(&id, Instant::now())
        .ok_or_else(|| session_missing(&id))?;
    Ok(Json(json!({"session": id, "history": s.history})))
}

async fn delete_session(
    State(app): State<AppState>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<StatusCode> {
    match app.sessions.lock().unwrap().remove(&id) {
        true => Ok(StatusCode::NO_CONTENT),
        false => Err(session_missing(&id)),
    }
}

async fn session_add(
    State(app): State<AppState>,
    UrlPath(id): UrlPath<String>,
    JsonBody(tap): JsonBody<TapRequest>,
) -> ApiResult<Json<Value>> {
    app.shared.check_ids(&[tap.id])?;
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
    Ok(Json(session_answer(&app, &id, tap.top_k).await?))
}

async fn session_remove(
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

async fn healthz(State(app): State<AppState>) -> Json<Value> {
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

async fn metrics_text(State(app): State<AppState>) -> Response {
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
