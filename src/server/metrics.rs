//! The service's Prometheus metrics (OpenMetrics text at `/metrics`): requests by route, method
//! and status, histograms per route of latency, queue wait and compute, positions decoded,
//! queue depth and capacity, sessions, positions decoded per session tap, connections, and
//! what model and heads are being served.

use super::conn::Stats;
use super::pool::Timing;
use axum::http::{Method, StatusCode};
use illmrec::recommender::Shared;
use prometheus_client::encoding::{text::encode, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    method: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

pub struct Metrics {
    registry: Mutex<Registry>,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabels, Histogram>,
    queue_wait: Family<RouteLabels, Histogram>,
    compute: Family<RouteLabels, Histogram>,
    decoded: Family<RouteLabels, Counter>,
    queue_depth: Gauge,
    queue_capacity: Gauge,
    contexts: Gauge,
    trained: Gauge,
    items: Gauge,
    ready: Gauge,
    sessions: Gauge,
    session_bytes: Gauge,
    tap_positions: Histogram,
    connections: Gauge,
    connection_events: Family<EventLabels, Gauge>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    event: String,
}

fn latency_histogram() -> Histogram {
    // 1 ms to about 33 s
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

fn gauge(registry: &mut Registry, name: &str, help: &str) -> Gauge {
    let g = Gauge::default();
    registry.register(name, help, g.clone());
    g
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("illmrec");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by route, method and status",
            requests.clone(),
        );
        let histograms = || {
            Family::<RouteLabels, Histogram>::new_with_constructor(
                latency_histogram as fn() -> Histogram,
            )
        };
        let latency = histograms();
        registry.register(
            "http_request_duration_seconds",
            "Time from request to response, by route",
            latency.clone(),
        );
        let queue_wait = histograms();
        registry.register(
            "queue_wait_seconds",
            "Time LLM jobs waited for a worker, per request, by route",
            queue_wait.clone(),
        );
        let compute = histograms();
        registry.register(
            "compute_seconds",
            "Time LLM jobs ran on a worker, per request, by route",
            compute.clone(),
        );
        let decoded = Family::<RouteLabels, Counter>::default();
        registry.register(
            "decoded_positions",
            "Prompt positions decoded by the LLM (the cached task prefix not counted), by route",
            decoded.clone(),
        );
        let queue_depth = gauge(
            &mut registry,
            "queue_depth",
            "LLM jobs waiting for a worker",
        );
        let queue_capacity = gauge(
            &mut registry,
            "queue_capacity",
            "Most LLM jobs that may wait (more are answered 503)",
        );
        let contexts = gauge(
            &mut registry,
            "contexts",
            "llama.cpp contexts (LLM worker threads)",
        );
        let trained = gauge(
            &mut registry,
            "trained",
            "1 when the bundle's heads are trained, 0 when random",
        );
        let items = gauge(&mut registry, "catalog_items", "Items in the catalog");
        let ready = gauge(
            &mut registry,
            "ready",
            "1 once the bundle is loaded and requests are served",
        );
        let sessions = gauge(&mut registry, "sessions", "Kiosk sessions held");
        let session_bytes = gauge(
            &mut registry,
            "session_state_bytes",
            "Bytes of saved KV state held by sessions",
        );
        let tap_positions = Histogram::new(exponential_buckets(8.0, 2.0, 9));
        registry.register(
            "session_decoded_positions",
            "Prompt positions decoded per session request",
            tap_positions.clone(),
        );
        let connections = gauge(&mut registry, "connections", "Open HTTP connections");
        let connection_events = Family::<EventLabels, Gauge>::default();
        registry.register(
            "connection_events",
            "Connections accepted, evicted (to make room at the limit), refused (503 at the limit, all busy), closed idle, or closed on a header error, since start",
            connection_events.clone(),
        );
        Self {
            registry: Mutex::new(registry),
            requests,
            latency,
            queue_wait,
            compute,
            decoded,
            queue_depth,
            queue_capacity,
            contexts,
            trained,
            items,
            ready,
            sessions,
            session_bytes,
            tap_positions,
            connections,
            connection_events,
        }
    }

    /// What is known once the bundle is loaded.
    pub fn loaded(&self, shared: &Shared, pool: &super::Pool) {
        self.queue_capacity.set(pool.capacity as i64);
        self.contexts.set(pool.contexts as i64);
        self.trained.set(shared.heads.config.trained as i64);
        self.items.set(shared.catalog.len() as i64);
        self.ready.set(1);
        let model = shared.model();
        self.registry.lock().unwrap().register(
            "model",
            "The model and heads served",
            Info::new(vec![
                ("path".to_string(), model.path.display().to_string()),
                ("architecture".to_string(), model.info.architecture.clone()),
                (
                    "name".to_string(),
                    model.info.name.clone().unwrap_or_default(),
                ),
                ("n_embd".to_string(), model.info.n_embd.to_string()),
                (
                    "prompt".to_string(),
                    format!("{:?}", shared.heads.config.prompt).to_lowercase(),
                ),
                (
                    "trained".to_string(),
                    shared.heads.config.trained.to_string(),
                ),
                ("version".to_string(), env!("CARGO_PKG_VERSION").to_string()),
            ]),
        );
    }

    pub fn catalog_items(&self, n: usize) {
        self.items.set(n as i64);
    }

    pub fn observe(
        &self,
        route: &str,
        method: &Method,
        status: StatusCode,
        elapsed: Duration,
        timing: &Timing,
    ) {
        self.requests
            .get_or_create(&RequestLabels {
                route: route.to_string(),
                method: method.to_string(),
                status: status.as_u16(),
            })
            .inc();
        let r = RouteLabels {
            route: route.to_string(),
        };
        self.latency
            .get_or_create(&r)
            .observe(elapsed.as_secs_f64());
        if !timing.compute.is_zero() {
            self.queue_wait
                .get_or_create(&r)
                .observe(timing.queue.as_secs_f64());
            self.compute
                .get_or_create(&r)
                .observe(timing.compute.as_secs_f64());
        }
        if timing.decoded > 0 {
            self.decoded.get_or_create(&r).inc_by(timing.decoded as u64);
        }
    }

    pub fn session_tap(&self, decoded: usize) {
        self.tap_positions.observe(decoded as f64);
    }

    pub fn render(
        &self,
        queue_depth: usize,
        sessions: usize,
        session_bytes: usize,
        conns: &Stats,
    ) -> String {
        self.queue_depth.set(queue_depth as i64);
        self.sessions.set(sessions as i64);
        self.session_bytes.set(session_bytes as i64);
        self.connections
            .set(conns.open.load(Ordering::Relaxed) as i64);
        for (event, n) in [
            ("accepted", &conns.accepted),
            ("evicted", &conns.evicted),
            ("refused", &conns.refused),
            ("idle_closed", &conns.idle_closed),
            ("header_error", &conns.header_errors),
        ] {
            self.connection_events
                .get_or_create(&EventLabels {
                    event: event.to_string(),
                })
                .set(n.load(Ordering::Relaxed) as i64);
        }
        let mut text = String::new();
        encode(&mut text, &self.registry.lock().unwrap()).expect("writing to a String cannot fail");
        text
    }
}
