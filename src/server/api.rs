//! What every route shares: the error answer ([`ApiError`]), JSON request bodies read within the
//! size and time limits ([`JsonBody`], [`read_body`]), the wait for a worker's answer
//! ([`with_timeout`]) and item ids in paths ([`parse_id`]).

use super::{pool, App, AppState};
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use illmrec::recommender::RequestError;
use serde_json::json;

/// An error answer: `{"error": "..."}` with its status.
#[derive(Debug)]
pub(super) struct ApiError {
    pub(super) status: StatusCode,
    pub(super) message: String,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
    pub(super) fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    pub(super) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
    pub(super) fn loading() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is still loading its bundle; retry shortly",
        )
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

pub(super) type ApiResult<T> = Result<T, ApiError>;

/// A JSON request body: read within the size and time limits, parsed with serde; every failure
/// is an `{"error"}` answer (413 too large, 408 too slow, 400 malformed).
pub(super) struct JsonBody<T>(pub(super) T);

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

pub(super) async fn read_body(req: Request, state: &AppState) -> ApiResult<Bytes> {
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

pub(super) async fn with_timeout<T>(
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

pub(super) fn parse_id(text: &str) -> ApiResult<u64> {
    text.parse().map_err(|_| {
        ApiError::bad(format!(
            "'{text}' is not an item id (expected a non-negative integer)"
        ))
    })
}
