//! A bounded load test of `illmrec serve` on loopback: starts the release binary on the demo
//! bundle (or `--bundle DIR`), runs CLIENTS threads × REQUESTS mixed requests (recommend,
//! sessions and taps, catalog, health, and bad requests), reports p50/p99 latency, errors, RSS
//! before and after, then times kiosk taps against cold requests (the demo's sample history
//! tapped one item at a time, each tap followed by `/v1/recommend` for the same history, on an
//! otherwise idle server with one context), fires a burst at a one-slot queue to show the 503 +
//! Retry-After behaviour, and stops the server with SIGTERM. It stops by itself.
//!
//!   cargo build --release && cargo run --release --example loadtest -- [CLIENTS] [REQUESTS] [CONTEXTS]

#[path = "../tests/common/load.rs"]
pub mod load;
#[path = "../tests/common/server.rs"]
pub mod server;

use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num =
        |i: usize, default: usize| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let (clients, requests, contexts) = (num(0, 8), num(1, 200), num(2, 2));
    let bin = concat!(env!("CARGO_MANIFEST_DIR"), "/target/release/illmrec");
    let threads = (2 / contexts).max(1).to_string();
    let ctx = contexts.to_string();
    let srv = server::Server::start(
        bin,
        &["--contexts", &ctx, "--threads", &threads, "--queue", "64"],
    );
    let catalog: Vec<u64> = {
        let v = server::get(&server::agent(), &format!("{}/v1/items?limit=500", srv.url)).json();
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_u64().unwrap())
            .collect()
    };
    let rss_before = srv.rss_kib().unwrap_or(0);
    let start = Instant::now();
    let out = load::run(&srv.url, clients, requests, &catalog, 42);
    let wall = start.elapsed();
    let rss_after = srv.rss_kib().unwrap_or(0);
    let valid = out.ok_latencies.len() + out.busy + out.errors.len();
    println!("load: {clients} clients x {requests} requests, {contexts} context(s) x {threads} thread(s), queue 64, wall {:.1} s", wall.as_secs_f64());
    println!(
        "  valid requests {valid}: {} answered, {} refused 503 ({} without Retry-After), {} errors",
        out.ok_latencies.len(),
        out.busy,
        out.busy_without_retry_after,
        out.errors.len()
    );
    println!(
        "  bad requests: {} rejected with 400/404 + error, {} answered otherwise",
        out.bad_rejected,
        out.bad_wrong.len()
    );
    println!(
        "  latency of answered valid requests: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        out.percentile(0.5).as_secs_f64() * 1e3,
        out.percentile(0.99).as_secs_f64() * 1e3,
        out.percentile(1.0).as_secs_f64() * 1e3
    );
    println!(
        "  RSS before {} MiB, after {} MiB",
        rss_before / 1024,
        rss_after / 1024
    );
    for e in out.errors.iter().chain(&out.bad_wrong).take(5) {
        println!("  ! {e}");
    }
    drop(srv);

    // Per-tap latency against a cold request: one context, nothing else running.
    let srv = server::Server::start(bin, &["--contexts", "1", "--threads", "2"]);
    let a = server::agent();
    let sample: Vec<u64> = [260u64, 1198, 1196, 1210, 589]
        .into_iter()
        .filter(|id| catalog.contains(id))
        .collect();
    let history: Vec<u64> = if sample.len() == 5 {
        sample
    } else {
        catalog[..5].to_vec()
    };
    let rounds = 3;
    let mut taps = vec![vec![]; history.len()];
    let mut colds = vec![vec![]; history.len()];
    let mut positions = vec![(0u64, 0u64); history.len()];
    for _ in 0..rounds {
        let s = server::post(&a, &format!("{}/v1/sessions", srv.url), "").json()["session"]
            .as_str()
            .unwrap()
            .to_string();
        for (n, id) in history.iter().enumerate() {
            let t = Instant::now();
            let tap = server::post(
                &a,
                &format!("{}/v1/sessions/{s}/items", srv.url),
                &format!("{{\"id\": {id}}}"),
            );
            taps[n].push(t.elapsed().as_secs_f64() * 1e3);
            let tap = tap.json();
            let t = Instant::now();
            let body = format!("{{\"history\": {:?}}}", &history[..=n]);
            let cold = server::post(&a, &format!("{}/v1/recommend", srv.url), &body);
            colds[n].push(t.elapsed().as_secs_f64() * 1e3);
            assert_eq!(cold.status, 200, "{}", cold.body);
            positions[n] = (
                tap["prompt_positions"].as_u64().unwrap_or(0),
                tap["decoded_positions"].as_u64().unwrap_or(0),
            );
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!("taps: history {history:?} tapped one item at a time, {rounds} rounds, medians, 1 context x 2 threads");
    println!("| history items | prompt positions | decoded by the tap | tap ms | cold `/v1/recommend` ms | cold / tap |");
    println!("|---|---|---|---|---|---|");
    for n in 0..history.len() {
        let (t, c) = (median(&mut taps[n]), median(&mut colds[n]));
        println!(
            "| {} | {} | {} | {t:.0} | {c:.0} | {:.2}× |",
            n + 1,
            positions[n].0,
            positions[n].1,
            c / t
        );
    }
    drop(srv);

    // The queue bound: a burst of 16 simultaneous cold requests at 1 context with 2 slots.
    let srv = server::Server::start(bin, &["--contexts", "1", "--queue", "2"]);
    let handles: Vec<_> = catalog
        .iter()
        .take(16)
        .map(|&id| {
            let url = srv.url.clone();
            std::thread::spawn(move || {
                server::post(
                    &server::agent(),
                    &format!("{url}/v1/recommend"),
                    &format!("{{\"history\": [{id}]}}"),
                )
            })
        })
        .collect();
    let replies: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let busy = replies.iter().filter(|r| r.status == 503).count();
    let with_retry = replies
        .iter()
        .filter(|r| r.status == 503 && r.retry_after.is_some())
        .count();
    println!(
        "burst: 16 simultaneous requests, 1 context, queue 2: {} answered 200, {busy} refused 503 ({with_retry} with Retry-After), {} other",
        replies.iter().filter(|r| r.status == 200).count(),
        replies.iter().filter(|r| r.status != 200 && r.status != 503).count()
    );
    let mut srv = srv;
    let t = Instant::now();
    let status = srv.terminate(Duration::from_secs(60));
    println!(
        "SIGTERM: exit {:?} after {:.2} s",
        status.and_then(|s| s.code()),
        t.elapsed().as_secs_f64()
    );
    let ok = out.errors.is_empty() && out.bad_wrong.is_empty() && out.busy_without_retry_after == 0;
    std::process::exit(if ok { 0 } else { 1 });
}
