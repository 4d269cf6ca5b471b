//! The service's Prometheus metrics (OpenMetrics text at `/metrics`): requests by route, method
//! and status, a latency histogram per route, queue depth and capacity, sessions, positions
//! decoded per session tap, and what model and heads are being served.

use axum::http::{Method, StatusCode};
use illmrec::recommender::Shared;
use prometheus_client::encoding::{text::encode, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
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
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabels, Histogram>,
    queue_depth: Gauge,
    sessions: Gauge,
    session_bytes: Gauge,
    tap_positions: Histogram,
}

fn latency_histogram() -> Histogram {
    // 1 ms to about 33 s
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

impl Metrics {
    pub fn new(shared: &Shared, pool: &super::Pool) -> Self {
        let mut registry = Registry::with_prefix("illmrec");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by route, method and status",
            requests.clone(),
        );
        let latency = Family::<RouteLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "http_request_duration_seconds",
            "Time from request to response, by route",
            latency.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "queue_depth",
            "LLM jobs waiting for a worker",
            queue_depth.clone(),
        );
        let capacity: Gauge = Gauge::default();
        capacity.set(pool.capacity as i64);
        registry.register(
            "queue_capacity",
            "Most LLM jobs that may wait (more are answered 503)",
            capacity,
        );
        let contexts: Gauge = Gauge::default();
        contexts.set(pool.contexts as i64);
        registry.register(
            "contexts",
            "llama.cpp contexts (LLM worker threads)",
            contexts,
        );
        let sessions = Gauge::default();
        registry.register("sessions", "Kiosk sessions held", sessions.clone());
        let session_bytes = Gauge::default();
        registry.register(
            "session_state_bytes",
            "Bytes of saved KV state held by sessions",
            session_bytes.clone(),
        );
        let tap_positions = Histogram::new(exponential_buckets(8.0, 2.0, 9));
        registry.register(
            "session_decoded_positions",
            "Prompt positions decoded per session request",
            tap_positions.clone(),
        );
        let trained: Gauge = Gauge::default();
        trained.set(shared.heads.config.trained as i64);
        registry.register(
            "trained",
            "1 when the bundle's heads are trained, 0 when random",
            trained,
        );
        let items: Gauge = Gauge::default();
        items.set(shared.catalog.len() as i64);
        registry.register("catalog_items", "Items in the catalog", items);
        let model = shared.model();
        registry.register(
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
        Self {
            registry,
            requests,
            latency,
            queue_depth,
            sessions,
            session_bytes,
            tap_positions,
        }
    }

    pub fn observe(&self, route: &str, method: &Method, status: StatusCode, elapsed: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                route: route.to_string(),
                method: method.to_string(),
                status: status.as_u16(),
            })
            .inc();
        self.latency
            .get_or_create(&RouteLabels {
                route: route.to_string(),
            })
            .observe(elapsed.as_secs_f64());
    }

    pub fn session_tap(&self, decoded: usize) {
        self.tap_positions.observe(decoded as f64);
    }

    pub fn render(&self, queue_depth: usize, sessions: usize, session_bytes: usize) -> String {
        self.queue_depth.set(queue_depth as i64);
        self.sessions.set(sessions as i64);
        self.session_bytes.set(session_bytes as i64);
        let mut text = String::new();
        encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }
}
