//! The accept loop: HTTP/1.1 connections served by hyper with a header-read timeout, an idle
//! timeout and a bound on open connections, so that clients that open sockets and send nothing
//! (or half a header) cannot starve the kiosk.
//!
//! - A request's headers must arrive within `header_timeout` (hyper closes the connection).
//! - A connection without a request in flight for `idle_timeout` is closed (keep-alive too).
//! - At most `max_connections` are open. A new one beyond takes the place of an idle one (no
//!   request in flight, so a half-sent header counts as idle): one that never sent a whole
//!   request if there is one, the oldest first, else the client connection idle the longest;
//!   when every connection has a request in flight, the new one is answered `503` with
//!   `Connection: close` and closed. Both are counted (`/metrics`) and logged, at most once a
//!   second.
//! - On shutdown, idle connections close at once and those with a request finish it first.

use super::AppState;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::task::AbortHandle;
use tower::ServiceExt;

/// Connection counts, for `/metrics` and `/health`.
#[derive(Default)]
pub(crate) struct Stats {
    pub open: AtomicUsize,
    pub accepted: AtomicU64,
    /// Refused with 503 because every connection had a request in flight.
    pub refused: AtomicU64,
    /// Closed to make room for a new connection.
    pub evicted: AtomicU64,
    /// Closed after `idle_timeout` without a request.
    pub idle_closed: AtomicU64,
    /// Closed by hyper: headers too slow, or malformed.
    pub header_errors: AtomicU64,
}

/// Milliseconds since the server started (a monotonic clock the connections share).
fn now_ms(start: Instant) -> u64 {
    start.elapsed().as_millis() as u64
}

struct Slot {
    abort: AbortHandle,
    inflight: Arc<AtomicUsize>,
    /// Whether a request was ever received on it (a client's keep-alive connection rather
    /// than a silent or half-header socket).
    served: Arc<AtomicBool>,
    /// When the last request ended (or the connection opened), in [`now_ms`].
    last: Arc<AtomicU64>,
}

#[derive(Default)]
struct Table {
    slots: HashMap<u64, Slot>,
    next: u64,
}

/// A client's connection is only taken over once idle for this long, so that an answer just
/// produced has been written.
const EVICT_AFTER_MS: u64 = 200;

/// The answer to a connection refused at the limit.
static REFUSAL: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
    let body = r#"{"error": "too many connections, each with a request in flight; retry shortly"}"#;
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
});

/// Logs an event at most once a second, with how many were not logged.
struct RateLog {
    last: Option<Instant>,
    skipped: u64,
}

impl RateLog {
    fn log(&mut self, event: &str, detail: impl FnOnce() -> String) {
        let now = Instant::now();
        if self.last.is_some_and(|t| now - t < Duration::from_secs(1)) {
            self.skipped += 1;
            return;
        }
        let skipped = std::mem::take(&mut self.skipped);
        self.last = Some(now);
        super::routes::log_event(event, &detail(), skipped);
    }
}

/// Serves `router` on `listener` until `stop` resolves, then lets the connections finish their
/// requests (up to the request timeout) and returns.
pub(super) async fn serve(
    listener: TcpListener,
    router: Router,
    app: AppState,
    stop: impl std::future::Future<Output = ()>,
) {
    let cfg = &app.cfg;
    let table = Arc::new(Mutex::new(Table::default()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut refusals = RateLog {
        last: None,
        skipped: 0,
    };
    let mut evictions = RateLog {
        last: None,
        skipped: 0,
    };
    let mut accept_errors = RateLog {
        last: None,
        skipped: 0,
    };
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut stop => break,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // Out of descriptors (EMFILE) or a connection reset before accept: wait a
                    // little rather than spin.
                    accept_errors.log("accept_error", || e.to_string());
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        app.conns.accepted.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        let mut t = table.lock().unwrap();
        if t.slots.len() >= cfg.max_connections {
            let now = now_ms(app.started);
            let victim = t
                .slots
                .iter()
                .filter(|(_, s)| {
                    s.inflight.load(Ordering::Acquire) == 0
                        && (!s.served.load(Ordering::Relaxed)
                            || now.saturating_sub(s.last.load(Ordering::Relaxed)) >= EVICT_AFTER_MS)
                })
                // Sockets that never sent a whole request go first, the oldest first; a
                // client's idle keep-alive connection only when there are none.
                .min_by_key(|(_, s)| {
                    (
                        s.served.load(Ordering::Relaxed),
                        s.last.load(Ordering::Relaxed),
                    )
                })
                .map(|(k, _)| *k);
            match victim.and_then(|k| t.slots.remove(&k)) {
                Some(slot) => {
                    slot.abort.abort();
                    app.conns.evicted.fetch_add(1, Ordering::Relaxed);
                    app.conns.open.fetch_sub(1, Ordering::Relaxed);
                    evictions.log("connection_evicted", || {
                        format!(
                            "{} connections open (the limit): closed the one idle the longest for {peer}",
                            cfg.max_connections
                        )
                    });
                }
                None => {
                    drop(t);
                    app.conns.refused.fetch_add(1, Ordering::Relaxed);
                    // The socket's send buffer is empty: this does not block. Then it closes.
                    let _ = stream.try_write(&REFUSAL);
                    refusals.log("connection_refused", || {
                        format!(
                            "{} connections open (the limit), each with a request in flight: refused {peer} with 503",
                            cfg.max_connections
                        )
                    });
                    continue;
                }
            }
        }
        let id = t.next;
        t.next += 1;
        let inflight = Arc::new(AtomicUsize::new(0));
        let served = Arc::new(AtomicBool::new(false));
        let last = Arc::new(AtomicU64::new(now_ms(app.started)));
        app.conns.open.fetch_add(1, Ordering::Relaxed);
        // The table stays locked until the slot is in it: a connection that ends at once
        // removes itself after.
        let handle = tokio::spawn(connection(
            stream,
            router.clone(),
            app.clone(),
            Track {
                inflight: inflight.clone(),
                served: served.clone(),
                last: last.clone(),
                start: app.started,
            },
            stop_rx.clone(),
            table.clone(),
            id,
        ));
        t.slots.insert(
            id,
            Slot {
                abort: handle.abort_handle(),
                inflight,
                served,
                last,
            },
        );
    }
    drop(listener);
    let _ = stop_tx.send(true);
    // Connections with a request finish it; the others close at once.
    let limit = Instant::now() + cfg.request_timeout + cfg.body_timeout + Duration::from_secs(5);
    while Instant::now() < limit && !table.lock().unwrap().slots.is_empty() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A connection's request count and last activity, shared with its slot.
#[derive(Clone)]
struct Track {
    inflight: Arc<AtomicUsize>,
    served: Arc<AtomicBool>,
    last: Arc<AtomicU64>,
    start: Instant,
}

/// Marks a request as ended when dropped (answered, failed or cancelled).
struct InFlight(Track);

impl InFlight {
    fn new(t: &Track) -> Self {
        t.inflight.fetch_add(1, Ordering::AcqRel);
        t.served.store(true, Ordering::Relaxed);
        Self(t.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.last.store(now_ms(self.0.start), Ordering::Relaxed);
        self.0.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn connection(
    stream: tokio::net::TcpStream,
    router: Router,
    app: AppState,
    track: Track,
    mut stop: tokio::sync::watch::Receiver<bool>,
    table: Arc<Mutex<Table>>,
    id: u64,
) {
    let cfg = &app.cfg;
    let service = {
        let track = track.clone();
        hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let guard = InFlight::new(&track);
            let router = router.clone();
            async move {
                let answer = router.oneshot(req.map(axum::body::Body::new)).await;
                drop(guard);
                answer
            }
        })
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_timeout)
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let idle_ms = cfg.idle_timeout.as_millis() as u64;
    let tick = (cfg.idle_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut stopping = *stop.borrow();
    if stopping {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if r.is_err() {
                    app.conns.header_errors.fetch_add(1, Ordering::Relaxed);
                }
                break;
            }
            _ = stop.changed(), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = tokio::time::sleep(tick) => {
                let idle = track.inflight.load(Ordering::Acquire) == 0
                    && now_ms(track.start).saturating_sub(track.last.load(Ordering::Relaxed)) >= idle_ms;
                if idle {
                    app.conns.idle_closed.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
        }
    }
    if table.lock().unwrap().slots.remove(&id).is_some() {
        app.conns.open.fetch_sub(1, Ordering::Relaxed);
    }
}
