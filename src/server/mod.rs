//! `illmrec serve`: the kiosk's HTTP service (axum on tokio). It only parses requests and
//! writes answers: checking, prompting, scoring and ranking are the library's
//! ([`illmrec::recommender`], [`illmrec::store::catalog`]). LLM work runs on the [`pool::Pool`]'s
//! threads, one llama.cpp context each, behind a bounded queue.
//!
//! Routes: `GET /` (the touch page), `POST /v1/recommend`, `POST /v1/score` (JSON lines),
//! `GET /v1/items`, `GET /v1/items/{id}`, `GET /v1/items/{id}/image`, `POST /v1/sessions`,
//! `GET|DELETE /v1/sessions/{id}`, `POST /v1/sessions/{id}/items`,
//! `DELETE /v1/sessions/{id}/items/{item}`, `GET /healthz`, `GET /metrics`.
//!
//! Files: this one starts and stops the service; [`routes`] holds the route table and a file per
//! route family; `api.rs` the error answers, request bodies and time limits; `pool.rs` the
//! LLM workers, `sessions.rs` the kiosk sessions' store, `metrics.rs` the Prometheus metrics.

mod api;
mod metrics;
mod pool;
mod routes;
mod sessions;

use illmrec::recommender::Shared;
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

pub(crate) struct App {
    shared: Arc<Shared>,
    pool: Pool,
    sessions: Mutex<sessions::Sessions>,
    metrics: metrics::Metrics,
    cfg: Config,
}

pub(crate) type AppState = Arc<App>;

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
        axum::serve(listener, routes::router(app.clone()))
            .with_graceful_shutdown(shutdown_signal())
            .await?;
        expiry.abort();
        anyhow::Ok(())
    })?;
    app.pool.shutdown();
    Ok(())
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
