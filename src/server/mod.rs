//! `illmrec serve`: the kiosk's HTTP service (axum on tokio, behind its own hyper accept loop).
//! It only parses requests and writes answers: checking, prompting, scoring and ranking are the
//! library's ([`illmrec::recommender`], [`illmrec::store::catalog`]). LLM work runs on the
//! [`pool::Pool`]'s threads, one llama.cpp context each, behind a bounded queue.
//!
//! Routes: `GET /` (the touch page), `POST /v1/recommend`, `POST /v1/score` (JSON lines),
//! `GET /v1/items`, `GET /v1/items/{id}`, `GET /v1/items/{id}/image`, `GET /v1/popular`,
//! `POST /v1/sessions`, `GET|DELETE /v1/sessions/{id}`, `POST /v1/sessions/{id}/items`,
//! `DELETE /v1/sessions/{id}/items/{item}`, `POST /v1/admin/items`,
//! `PUT|DELETE /v1/admin/items/{id}`, `GET /health`, `/health/live`, `/health/ready`,
//! `/healthz`, `GET /metrics`, `GET /openapi.json`.
//!
//! The service listens before the bundle is loaded: until then `/health/ready` (and every route
//! that needs the bundle) answers 503. Catalog edits through the admin API are applied to the
//! bundle by the library ([`illmrec::bundle::edit`], under the bundle's lock), then the bundle is
//! read again and swapped in behind an `Arc`: a request keeps the catalog it started with.
//!
//! Files: this one starts and stops the service and holds its state; `conn.rs` the accept loop
//! (timeouts, the connection limit); [`routes`] the route table, request ids, keys and logs, a
//! file per route family; `api.rs` the error answers, request bodies and time limits; `pool.rs`
//! the LLM workers, `sessions.rs` the kiosk sessions' store, `metrics.rs` the Prometheus metrics.

mod api;
mod conn;
mod metrics;
mod pool;
mod routes;
mod sessions;

use illmrec::recommender::{Recommender, Shared};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
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
    /// Longest time to receive a request's headers.
    pub header_timeout: Duration,
    /// A connection with no request for this long is closed.
    pub idle_timeout: Duration,
    /// Open connections at most; beyond, the longest idle one is closed to make room, or the new
    /// one is refused (503, closed) when all are busy.
    pub max_connections: usize,
    pub max_sessions: usize,
    pub session_idle: Duration,
    pub images: Option<PathBuf>,
    pub default_top_k: usize,
    /// The token the admin routes require (`Authorization: Bearer`); `None`: no admin API.
    pub admin_token: Option<String>,
    /// The key every `/v1/` route but item pictures requires, when set.
    pub api_key: Option<String>,
    /// The row an empty session shows (else the items picked most on this kiosk).
    pub featured: Vec<u64>,
    /// Show the developer controls (scores) on the page.
    pub dev_controls: bool,
    /// Write a JSON line per request on stderr.
    pub request_log: bool,
}

/// What exists once the bundle is loaded.
pub(crate) struct Loaded {
    /// The bundle as it is now; an admin edit swaps in a new one.
    current: Arc<RwLock<Arc<Shared>>>,
    pool: Pool,
}

pub(crate) struct App {
    loaded: OnceLock<Loaded>,
    sessions: Mutex<sessions::Sessions>,
    metrics: metrics::Metrics,
    cfg: Config,
    /// Admin edits, one at a time (the bundle's lock also keeps out other processes).
    edits: tokio::sync::Mutex<()>,
    /// Items picked on this kiosk, for the empty session's row.
    picks: Mutex<HashMap<u64, u64>>,
    conns: conn::Stats,
    started: Instant,
    /// Item-vector caches written by reloads after an edit (see [`App::swap_arc`]).
    edit_caches: Mutex<std::collections::HashSet<PathBuf>>,
}

pub(crate) type AppState = Arc<App>;

impl App {
    fn loaded(&self) -> api::ApiResult<&Loaded> {
        self.loaded.get().ok_or_else(api::ApiError::loading)
    }

    /// The bundle as it is now (a request keeps the one it took for its whole run).
    pub(in crate::server) fn shared(&self) -> api::ApiResult<Arc<Shared>> {
        Ok(self.loaded()?.current.read().unwrap().clone())
    }

    pub(in crate::server) fn pool(&self) -> api::ApiResult<&Pool> {
        Ok(&self.loaded()?.pool)
    }

    pub(crate) fn ready(&self) -> bool {
        self.loaded.get().is_some()
    }

    /// Swaps in a reloaded bundle: new requests and the workers' next jobs use it; sessions
    /// keep their histories (less any removed item) and decode their next prompt cold.
    pub(in crate::server) fn swap_arc(
        &self,
        new: Arc<Shared>,
        removed: Option<u64>,
    ) -> api::ApiResult<()> {
        let loaded = self.loaded()?;
        let items = new.catalog.len();
        let old = std::mem::replace(&mut *loaded.current.write().unwrap(), new.clone());
        // A --cache-dir outside the bundle would keep every edit's item-vector cache: the
        // replaced one goes when an earlier edit of this server wrote it (unlinking is safe while
        // a request still maps it). The bundle's own cache folder is the edit's to manage.
        if let (Some(before), Some(now)) = (&old.items.path, &new.items.path) {
            let mut ours = self.edit_caches.lock().unwrap();
            if before != now && ours.remove(before) && !before.starts_with(&old.bundle.dir) {
                let _ = std::fs::remove_file(before);
            }
            if new.items.computed {
                ours.insert(now.clone());
            }
        }
        self.sessions.lock().unwrap().catalog_changed(removed);
        if let Some(id) = removed {
            self.picks.lock().unwrap().remove(&id);
        }
        self.metrics.catalog_items(items);
        Ok(())
    }
}

/// Opens the bundle and the workers' recommenders (runs while the service already answers).
pub type Loader = Box<dyn FnOnce() -> anyhow::Result<Vec<Recommender>> + Send>;

/// Starts the service on a bound listener, loads the bundle with `load` meanwhile, and runs
/// until SIGTERM or SIGINT (or a failed load), then stops accepting, finishes the requests in
/// flight and the queued jobs, and returns.
pub fn run(listener: std::net::TcpListener, cfg: Config, load: Loader) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let app = Arc::new(App {
        metrics: metrics::Metrics::new(),
        sessions: Mutex::new(sessions::Sessions::new(cfg.max_sessions, cfg.session_idle)),
        loaded: OnceLock::new(),
        edits: tokio::sync::Mutex::new(()),
        picks: Mutex::new(HashMap::new()),
        conns: conn::Stats::default(),
        started: Instant::now(),
        edit_caches: Mutex::new(Default::default()),
        cfg,
    });
    let failed: Arc<Mutex<Option<anyhow::Error>>> = Arc::new(Mutex::new(None));
    runtime.block_on(async {
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let (load_failed_tx, load_failed_rx) = tokio::sync::oneshot::channel::<()>();
        let loader = {
            let (app, failed) = (app.clone(), failed.clone());
            tokio::task::spawn_blocking(move || {
                let t = Instant::now();
                match load() {
                    Ok(workers) => {
                        let shared = workers[0].shared().clone();
                        let current = Arc::new(RwLock::new(shared.clone()));
                        let queue = app.cfg.queue;
                        let pool = Pool::new(workers, queue, current.clone());
                        app.metrics.loaded(&shared, &pool);
                        let _ = app.loaded.set(Loaded { current, pool });
                        eprintln!(
                            "ready: {} ({} items) loaded in {:.1} s",
                            shared.bundle.dir.display(),
                            shared.catalog.len(),
                            t.elapsed().as_secs_f64()
                        );
                    }
                    Err(e) => {
                        *failed.lock().unwrap() = Some(e);
                        let _ = load_failed_tx.send(());
                    }
                }
            })
        };
        let expiry = tokio::spawn(expire_sessions(app.clone()));
        let stop = async {
            tokio::select! {
                _ = shutdown_signal() => {},
                Ok(()) = load_failed_rx => {},
            }
        };
        conn::serve(listener, routes::router(app.clone()), app.clone(), stop).await;
        expiry.abort();
        let _ = loader.await;
        anyhow::Ok(())
    })?;
    if let Some(e) = failed.lock().unwrap().take() {
        return Err(e);
    }
    if let Some(l) = app.loaded.get() {
        l.pool.shutdown();
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            let _ = ctrl_c.await;
            return;
        };
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
