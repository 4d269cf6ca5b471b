//! A bounded load run against a started server: `clients` threads × `requests` each, a seeded
//! mix of routes (recommend, sessions and taps, catalog search, items, health, metrics) and bad
//! requests (unknown ids, malformed JSON, unknown routes). Used by `examples/loadtest.rs` (the
//! figures in the README) and by `tests/serve.rs` (a small run, correctness only).
#![allow(dead_code)]

use super::server::{agent, get, post};
use std::time::{Duration, Instant};

#[derive(Debug, Default, Clone)]
pub struct Outcome {
    /// Latency of each valid request answered 200/201.
    pub ok_latencies: Vec<Duration>,
    /// Valid requests refused with 503 (queue full) and whether each carried Retry-After.
    pub busy: usize,
    pub busy_without_retry_after: usize,
    /// Valid requests answered anything else (must stay 0).
    pub errors: Vec<String>,
    /// Bad requests answered 400/404 with an `{"error"}` body.
    pub bad_rejected: usize,
    /// Bad requests answered otherwise (must stay 0).
    pub bad_wrong: Vec<String>,
}

impl Outcome {
    fn merge(&mut self, o: Outcome) {
        self.ok_latencies.extend(o.ok_latencies);
        self.busy += o.busy;
        self.busy_without_retry_after += o.busy_without_retry_after;
        self.errors.extend(o.errors);
        self.bad_rejected += o.bad_rejected;
        self.bad_wrong.extend(o.bad_wrong);
    }

    pub fn percentile(&self, p: f64) -> Duration {
        let mut v = self.ok_latencies.clone();
        v.sort();
        if v.is_empty() {
            return Duration::ZERO;
        }
        v[((v.len() - 1) as f64 * p).round() as usize]
    }
}

/// A small seeded generator (xorshift), so that a run is repeatable.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[(self.next() % v.len() as u64) as usize]
    }
}

/// Runs the load and returns what happened. `ids` are catalog ids to draw histories from.
pub fn run(url: &str, clients: usize, requests: usize, ids: &[u64], seed: u64) -> Outcome {
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let url = url.to_string();
            let ids = ids.to_vec();
            std::thread::spawn(move || {
                client(&url, requests, &ids, seed.wrapping_add(c as u64 * 7919) | 1)
            })
        })
        .collect();
    let mut total = Outcome::default();
    for h in handles {
        total.merge(h.join().unwrap());
    }
    total
}

fn client(url: &str, requests: usize, ids: &[u64], seed: u64) -> Outcome {
    let a = agent();
    let mut rng = Rng(seed);
    let mut out = Outcome::default();
    let mut session: Option<String> = None;
    for _ in 0..requests {
        let kind = rng.next() % 10;
        let n = 1 + (rng.next() % 5) as usize;
        let history: Vec<u64> = (0..n).map(|_| *rng.pick(ids)).collect();
        let start = Instant::now();
        let (valid, reply, what) = match kind {
            0..=2 => (
                true,
                post(
                    &a,
                    &format!("{url}/v1/recommend"),
                    &serde_json::json!({"history": history, "top_k": 5}).to_string(),
                ),
                "recommend",
            ),
            3 | 4 => match &session {
                Some(s) => (
                    true,
                    post(
                        &a,
                        &format!("{url}/v1/sessions/{s}/items"),
                        &format!("{{\"id\": {}}}", rng.pick(ids)),
                    ),
                    "tap",
                ),
                None => (
                    true,
                    post(&a, &format!("{url}/v1/sessions"), "{}"),
                    "session",
                ),
            },
            5 => (
                true,
                get(
                    &a,
                    &format!(
                        "{url}/v1/items?query=the&offset={}&limit=12",
                        rng.next() % 50
                    ),
                ),
                "items",
            ),
            6 => (
                true,
                get(&a, &format!("{url}/v1/items/{}", rng.pick(ids))),
                "item",
            ),
            7 => (true, get(&a, &format!("{url}/healthz")), "healthz"),
            8 => (
                false,
                post(
                    &a,
                    &format!("{url}/v1/recommend"),
                    &format!("{{\"history\": [{}, 987654321]}}", history[0]),
                ),
                "unknown id",
            ),
            _ => match rng.next() % 3 {
                0 => (
                    false,
                    post(&a, &format!("{url}/v1/recommend"), "{\"history\": [1,"),
                    "malformed",
                ),
                1 => (
                    false,
                    get(&a, &format!("{url}/v1/nothing-here")),
                    "no route",
                ),
                _ => (
                    false,
                    post(&a, &format!("{url}/v1/recommend"), "{\"history\": []}"),
                    "empty",
                ),
            },
        };
        let elapsed = start.elapsed();
        if valid {
            match reply.status {
                200 | 201 => {
                    out.ok_latencies.push(elapsed);
                    if what == "session" {
                        session = reply.json()["session"].as_str().map(String::from);
                    }
                }
                503 => {
                    out.busy += 1;
                    if reply.retry_after.is_none() {
                        out.busy_without_retry_after += 1;
                    }
                }
                404 if what == "tap" => session = None, // evicted: start another
                s => out.errors.push(format!("{what}: {s} {}", reply.body)),
            }
        } else {
            let has_error = serde_json::from_str::<serde_json::Value>(&reply.body)
                .ok()
                .and_then(|v| v.get("error").cloned())
                .is_some();
            match (reply.status, has_error) {
                (400 | 404, true) => out.bad_rejected += 1,
                (s, _) => out.bad_wrong.push(format!("{what}: {s} {}", reply.body)),
            }
        }
    }
    out
}
