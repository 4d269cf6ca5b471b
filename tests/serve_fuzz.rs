//! The fuzz campaign's HTTP targets: the server's request parser (hyper behind illmrec's accept
//! loop, request lines, headers, bodies) and the session API, through the real binary on
//! loopback. Case `i` is a pure function of (seed, i), as in `illmrec::fuzz`: a valid request
//! (recommend, score, items, sessions and taps on a live session, health) is mutated by byte
//! edits of the whole request, of its request line, or JSON-tree edits of its body. Each case
//! must get an HTTP answer other than a 500 (or a clean close), and the server must answer a
//! good request at the end.
//!
//! `ILLMREC_HTTP_FUZZ_CASES` sets the number of cases (default 600; the campaign in
//! docs/kiosk.md ran more), `ILLMREC_HTTP_FUZZ_SEED` the seed.

mod common;

use common::server::{agent, post, Server};
use common::BIN;
use illmrec::fuzz::{mutate_bytes, mutate_json, Rng};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

struct Seed {
    method: &'static str,
    path: String,
    body: Option<Value>,
}

fn seeds(session: &str) -> Vec<Seed> {
    let s = |method, path: &str, body: Option<Value>| Seed {
        method,
        path: path.to_string(),
        body,
    };
    vec![
        s(
            "POST",
            "/v1/recommend",
            Some(json!({"history": [260, 1198], "top_k": 3})),
        ),
        s(
            "POST",
            "/v1/recommend",
            Some(
                json!({"history": [589], "candidates": [1, 2, 260], "top_k": 2, "include_seen": true}),
            ),
        ),
        s("GET", "/v1/items?query=star%20wars&offset=0&limit=5", None),
        s("GET", "/v1/items/260", None),
        s("GET", "/v1/popular?limit=3", None),
        s(
            "POST",
            "/v1/sessions",
            Some(json!({"history": [260], "top_k": 2})),
        ),
        s("POST", "/v1/sessions", Some(json!({}))),
        s(
            "POST",
            &format!("/v1/sessions/{session}/items"),
            Some(json!({"id": 1196, "top_k": 2})),
        ),
        s("GET", &format!("/v1/sessions/{session}"), None),
        s(
            "DELETE",
            &format!("/v1/sessions/{session}/items/1196"),
            None,
        ),
        s("GET", "/health", None),
    ]
}

fn raw(method: &str, path: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nX-Request-ID: fuzz\r\n"
    )
    .into_bytes();
    if !body.is_empty() || method == "POST" {
        r.extend_from_slice(
            format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            )
            .as_bytes(),
        );
    }
    r.extend_from_slice(b"\r\n");
    r.extend_from_slice(body);
    r
}

/// Case `i`: the request bytes.
fn case(seed: u64, i: u64, seeds: &[Seed], pool: &[Vec<u8>]) -> Vec<u8> {
    let mut rng = Rng::new(seed, i);
    let s = &seeds[rng.below(seeds.len())];
    let body = s.body.as_ref().map(|b| b.to_string()).unwrap_or_default();
    match rng.below(3) {
        // JSON-tree edits of the body, well framed.
        0 => {
            let mut v = s.body.clone().unwrap_or(json!({}));
            for _ in 0..1 + rng.below(3) {
                mutate_json(&mut rng, &mut v);
            }
            raw(s.method, &s.path, v.to_string().as_bytes())
        }
        // Byte edits of the request line.
        1 => {
            let mut line = format!("{} {}", s.method, s.path).into_bytes();
            mutate_bytes(&mut rng, &mut line, pool);
            let line = String::from_utf8_lossy(&line).replace(['\r', '\n'], "");
            let mut r = format!("{line} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n").into_bytes();
            r.extend_from_slice(format!("Content-Length: {}\r\n\r\n{body}", body.len()).as_bytes());
            r
        }
        // Byte edits anywhere in the request: the parser itself.
        _ => {
            let mut r = raw(s.method, &s.path, body.as_bytes());
            mutate_bytes(&mut rng, &mut r, pool);
            r
        }
    }
}

/// Sends a case and returns the status (0: closed without an answer).
fn send(addr: &str, bytes: &[u8]) -> Result<u16, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    // Longer than the server's --request-timeout: a slow LLM answer is a 503, never silence.
    s.set_read_timeout(Some(Duration::from_secs(90))).unwrap();
    let _ = s.write_all(bytes);
    let mut reply = Vec::new();
    let started = Instant::now();
    let _ = s.read_to_end(&mut reply);
    if started.elapsed() >= Duration::from_secs(89) {
        return Err(format!(
            "no close within 90 s (answer: {:?})",
            String::from_utf8_lossy(&reply[..reply.len().min(64)])
        ));
    }
    if reply.is_empty() {
        return Ok(0);
    }
    let head = String::from_utf8_lossy(&reply[..reply.len().min(64)]).to_string();
    head.strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("not an HTTP answer: {head:?}"))
}

#[test]
fn the_http_parser_and_the_session_api_survive_mutated_requests() {
    let cases: u64 = std::env::var("ILLMREC_HTTP_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    let seed: u64 = std::env::var("ILLMREC_HTTP_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let server = Server::start(
        BIN,
        &[
            "--header-timeout",
            "1",
            "--body-timeout",
            "1",
            "--request-log",
            "off",
            "--queue",
            "64",
            "--request-timeout",
            "30",
        ],
    );
    let addr = server.addr();
    let created = post(
        &agent(),
        &format!("{}/v1/sessions", server.url),
        "{\"history\": [260]}",
    );
    assert_eq!(created.status, 201);
    let session = created.json()["session"].as_str().unwrap().to_string();
    let seeds = std::sync::Arc::new(seeds(&session));
    let pool: Vec<Vec<u8>> = seeds
        .iter()
        .map(|s| {
            raw(
                s.method,
                &s.path,
                s.body
                    .as_ref()
                    .map(|b| b.to_string())
                    .unwrap_or_default()
                    .as_bytes(),
            )
        })
        .collect();
    let pool = std::sync::Arc::new(pool);
    // ILLMREC_HTTP_FUZZ_ONLY=i,j,...: replay these cases, printing each request and answer.
    if let Ok(only) = std::env::var("ILLMREC_HTTP_FUZZ_ONLY") {
        for i in only.split(',').filter_map(|v| v.trim().parse::<u64>().ok()) {
            let bytes = case(seed, i, &seeds, &pool);
            eprintln!("case {i}: {:?}", String::from_utf8_lossy(&bytes));
            let t = Instant::now();
            eprintln!("  -> {:?} in {:?}", send(&addr, &bytes), t.elapsed());
        }
        return;
    }
    let threads = 4;
    let start = Instant::now();
    let results: Vec<(u64, Result<u16, String>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (seeds, pool, addr) = (seeds.clone(), pool.clone(), addr.clone());
                scope.spawn(move || {
                    (t..cases)
                        .step_by(threads as usize)
                        .map(|i| (i, send(&addr, &case(seed, i, &seeds, &pool))))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let mut by_status = std::collections::BTreeMap::<u16, u64>::new();
    let mut failures = vec![];
    for (i, r) in &results {
        match r {
            Ok(status) => {
                *by_status.entry(*status).or_default() += 1;
                if *status >= 500 && *status != 503 {
                    failures.push(format!("case {i}: status {status}"));
                }
            }
            Err(e) => failures.push(format!("case {i}: {e}")),
        }
    }
    eprintln!(
        "HTTP fuzz: {} cases (seed {seed}) in {:.0} s, answers by status (0 = closed): {by_status:?}",
        results.len(),
        start.elapsed().as_secs_f64()
    );
    assert_eq!(results.len() as u64, cases);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Still serving, correctly.
    let r = post(
        &agent(),
        &format!("{}/v1/recommend", server.url),
        "{\"history\": [260, 1198]}",
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let h = agent()
        .get(format!("{}/health", server.url))
        .call()
        .unwrap();
    assert_eq!(h.status().as_u16(), 200);
    // Some cases got past the parser into the routes, some were refused by it.
    assert!(
        by_status.get(&200).copied().unwrap_or(0) > 0,
        "{by_status:?}"
    );
    assert!(
        by_status.get(&400).copied().unwrap_or(0) > 0,
        "{by_status:?}"
    );
}
