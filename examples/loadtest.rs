//! A bounded load test of `illmrec serve` on loopback: starts the release binary on the demo
//! bundle (or `--bundle DIR`), runs CLIENTS threads × REQUESTS mixed requests (recommend,
//! sessions and taps, catalog, health, and bad requests), reports p50/p99 latency, errors, RSS
//! before and after, then fires a burst at a one-slot queue to show the 503 + Retry-After
//! behaviour, and stops the server with SIGTERM. It stops by itself.
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
