//! `illmrec serve` as a client sees it: the real binary on an ephemeral loopback port, the real
//! default model and the shipped demo bundle. Routes and their errors, equality with the CLI,
//! kiosk sessions, the queue bound, a small load run, and faults (oversize body, slow client,
//! client gone mid-request, SIGTERM under load).

mod common;

use common::server::{agent, delete, get, post, put, Server};
use common::{illmrec_ok, BIN};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const SAMPLE: &str = "260,1198,1196,1210,589";

fn ids(items: &Value) -> Vec<u64> {
    items
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_u64().unwrap())
        .collect()
}

#[test]
fn routes_answer_and_bad_input_gets_clear_errors() {
    common::model_path();
    let server = Server::start(BIN, &["--max-body", "65536"]);
    let (a, u) = (agent(), &server.url);

    let h = get(&a, &format!("{u}/healthz"));
    assert_eq!(h.status, 200);
    assert_eq!(h.json()["status"], "ok");
    assert_eq!(h.json()["catalog_items"], 1297);

    let page = get(&a, &format!("{u}/"));
    assert_eq!(page.status, 200);
    assert!(page.content_type.starts_with("text/html"));
    assert!(page.body.contains("<main>") && page.body.contains("/v1/sessions"));
    // nothing from elsewhere: no absolute URLs in src/href/fetch
    for bad in ["src=\"http", "href=\"http", "fetch(\"http", "//cdn"] {
        assert!(!page.body.contains(bad), "{bad}");
    }

    let items = get(&a, &format!("{u}/v1/items?query=star%20wars&limit=3"));
    assert_eq!(items.status, 200);
    let v = items.json();
    assert_eq!(v["total"], 8);
    assert_eq!(v["items"].as_array().unwrap().len(), 3);
    assert!(v["items"][0]["title"]
        .as_str()
        .unwrap()
        .contains("Star Wars"));
    let genre = get(&a, &format!("{u}/v1/items?query=film-noir&limit=500")).json();
    assert!(genre["total"].as_u64().unwrap() > 0);
    assert!(genre["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|i| i["genres"].to_string().contains("Film-Noir")));

    let item = get(&a, &format!("{u}/v1/items/260")).json();
    assert_eq!(item["year"], 1977);
    assert_eq!(item["image"], Value::Null); // the demo bundle ships no pictures
    assert_eq!(get(&a, &format!("{u}/v1/items/260/image")).status, 404);

    let expect_error = |r: common::server::Reply, status: u16, needle: &str| {
        assert_eq!(r.status, status, "{}", r.body);
        let msg = r.json()["error"].as_str().unwrap_or_default().to_string();
        assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
    };
    expect_error(
        get(&a, &format!("{u}/v1/items/4")),
        404,
        "item 4 is not in the catalog",
    );
    expect_error(
        get(&a, &format!("{u}/v1/items/abc")),
        400,
        "'abc' is not an item id",
    );
    expect_error(get(&a, &format!("{u}/v1/items?limit=0")), 400, "limit 0");
    expect_error(
        get(&a, &format!("{u}/v1/items?offset=-1")),
        400,
        "bad query",
    );
    expect_error(get(&a, &format!("{u}/v2/anything")), 404, "no such route");
    expect_error(
        put(&a, &format!("{u}/v1/recommend"), "{}"),
        405,
        "PUT is not allowed",
    );
    expect_error(
        get(&a, &format!("{u}/v1/recommend")),
        405,
        "GET is not allowed",
    );
    let rec = format!("{u}/v1/recommend");
    expect_error(post(&a, &rec, "{\"history\": [260,"), 400, "malformed JSON");
    expect_error(post(&a, &rec, ""), 400, "body is empty");
    expect_error(post(&a, &rec, "[1,2]"), 400, "malformed JSON");
    expect_error(
        post(&a, &rec, "{\"history\": [260], \"colour\": 1}"),
        400,
        "unknown field",
    );
    expect_error(post(&a, &rec, "{\"history\": [-5]}"), 400, "malformed JSON");
    expect_error(
        post(&a, &rec, "{\"history\": []}"),
        400,
        "the history is empty",
    );
    expect_error(
        post(&a, &rec, "{\"history\": [260, 4, 987654321, 4]}"),
        400,
        "items 4, 987654321 are not in the catalog",
    );
    expect_error(
        post(&a, &rec, "{\"history\": [260], \"candidates\": []}"),
        400,
        "candidate list is empty",
    );
    expect_error(
        post(&a, &rec, "{\"history\": [260], \"top_k\": 0}"),
        400,
        "top_k 0",
    );
    let many = json!({"history": vec![260; 10_001]}).to_string();
    expect_error(post(&a, &rec, &many), 400, "too many items");
    let huge = json!({"history": vec![260; 20_000]}).to_string();
    expect_error(post(&a, &rec, &huge), 413, "65536-byte limit");

    let score = post(&a, &format!("{u}/v1/score"), "{\"user\": \"a\", \"history\": [260, 1198]}\nnot json\n{\"user\": 7, \"history\": [589], \"candidates\": [1240, 1214], \"top_k\": 1}\n");
    assert_eq!(score.status, 200);
    let lines: Vec<Value> = score
        .body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["user"], "a");
    assert_eq!(lines[0]["items"].as_array().unwrap().len(), 10);
    assert_eq!(lines[1]["line"], 2);
    assert!(lines[1]["error"]
        .as_str()
        .unwrap()
        .contains("not a valid user line"));
    assert_eq!(lines[2]["user"], 7);
    assert_eq!(lines[2]["items"].as_array().unwrap().len(), 1);

    let metrics = get(&a, &format!("{u}/metrics"));
    assert_eq!(metrics.status, 200);
    for needle in [
        "illmrec_http_requests_total{route=\"/v1/recommend\",method=\"POST\",status=\"400\"}",
        "illmrec_http_requests_total{route=\"/v1/score\",method=\"POST\",status=\"200\"} 1",
        "illmrec_http_requests_total{route=\"unmatched\",method=\"GET\",status=\"404\"} 1",
        "illmrec_http_request_duration_seconds_bucket{le=",
        "illmrec_queue_depth 0",
        "illmrec_queue_capacity 16",
        "illmrec_trained 1",
        "illmrec_model_info{",
        "n_embd=\"640\"",
    ] {
        assert!(
            metrics.body.contains(needle),
            "metrics lack {needle}:\n{}",
            metrics.body
        );
    }
    // still serving after all that
    assert_eq!(get(&a, &format!("{u}/healthz")).status, 200);
}

#[test]
fn recommend_equals_the_cli() {
    let server = Server::start(BIN, &[]);
    let a = agent();
    let cli: Value = serde_json::from_str(&illmrec_ok(&[
        "recommend",
        "--bundle",
        &common::s(&common::server::demo_bundle()),
        "--history",
        SAMPLE,
        "--json",
        "--threads",
        "2",
        "--cache-dir",
        &common::s(&std::env::temp_dir().join(format!("illmrec-serve-cli-{}", std::process::id()))),
    ]))
    .unwrap();
    let history: Vec<u64> = SAMPLE.split(',').map(|s| s.parse().unwrap()).collect();
    let api = post(
        &a,
        &format!("{}/v1/recommend", server.url),
        &json!({"history": history}).to_string(),
    )
    .json();
    assert_eq!(ids(&api["items"]), ids(&cli["items"]));
    for (x, y) in api["items"]
        .as_array()
        .unwrap()
        .iter()
        .zip(cli["items"].as_array().unwrap())
    {
        assert_eq!(
            x["score"].as_f64(),
            y["score"].as_f64(),
            "same prompt, same batches: same numbers"
        );
        assert_eq!(x["title"], y["title"]);
    }
    assert_eq!(api["prompt_positions"], cli["prompt_positions"]);
    assert_eq!(api["trained"], true);
    // candidates and include_seen
    let c = post(&a, &format!("{}/v1/recommend", server.url), &json!({"history": history, "candidates": [260, 1240, 1214], "top_k": 3, "include_seen": true}).to_string()).json();
    let got = ids(&c["items"]);
    assert_eq!(got.len(), 3);
    assert!(got.contains(&260));
}

#[test]
fn sessions_follow_taps_and_agree_with_cold_requests() {
    let server = Server::start(BIN, &["--max-sessions", "2"]);
    let (a, u) = (agent(), &server.url);
    let created = post(&a, &format!("{u}/v1/sessions"), "");
    assert_eq!(created.status, 201);
    let s = created.json()["session"].as_str().unwrap().to_string();
    // An empty session shows a row to start from (unscored), not an empty column.
    assert_eq!(created.json()["items"].as_array().unwrap().len(), 10);
    assert_eq!(created.json()["row"], "catalog");
    let mut history = vec![];
    for id in [260u64, 1196, 1210] {
        history.push(id);
        let tap = post(
            &a,
            &format!("{u}/v1/sessions/{s}/items"),
            &json!({"id": id}).to_string(),
        );
        assert_eq!(tap.status, 200, "{}", tap.body);
        let tap = tap.json();
        assert_eq!(tap["history"], json!(history));
        let cold = post(
            &a,
            &format!("{u}/v1/recommend"),
            &json!({"history": history}).to_string(),
        )
        .json();
        assert_eq!(tap["prompt_positions"], cold["prompt_positions"]);
        let (t, c) = (ids(&tap["items"]), ids(&cold["items"]));
        // a tap equals a cold request to float rounding (tests/session.rs): near-ties may swap
        let overlap = t.iter().filter(|x| c.contains(x)).count();
        assert!(overlap >= 9, "session {t:?} against cold {c:?}");
        let top = cold["items"][0]["score"].as_f64().unwrap().abs();
        for (a, b) in tap["items"]
            .as_array()
            .unwrap()
            .iter()
            .zip(cold["items"].as_array().unwrap())
        {
            if a["id"] == b["id"] {
                let d = (a["score"].as_f64().unwrap() - b["score"].as_f64().unwrap()).abs();
                assert!(
                    d <= 5e-3 * top,
                    "item {}: tap {} cold {}",
                    a["id"],
                    a["score"],
                    b["score"]
                );
            }
        }
        assert!(
            !t.iter().any(|x| history.contains(x)),
            "seen items are excluded"
        );
        if history.len() > 1 {
            let decoded = tap["decoded_positions"].as_u64().unwrap();
            let cold_decoded = cold["prompt_positions"].as_u64().unwrap() - 29; // the task prefix
            assert!(
                decoded < cold_decoded,
                "tap decoded {decoded} positions, a cold request {cold_decoded}"
            );
        }
    }
    let removed = delete(&a, &format!("{u}/v1/sessions/{s}/items/1196"));
    assert_eq!(removed.status, 200);
    assert_eq!(removed.json()["history"], json!([260, 1210]));
    assert_eq!(
        get(&a, &format!("{u}/v1/sessions/{s}")).json()["history"],
        json!([260, 1210])
    );
    let bad = post(
        &a,
        &format!("{u}/v1/sessions/{s}/items"),
        "{\"id\": 987654321}",
    );
    assert_eq!(bad.status, 400);
    assert!(bad.body.contains("item 987654321 is not in the catalog"));
    assert_eq!(
        delete(&a, &format!("{u}/v1/sessions/{s}/items/42")).status,
        404
    );
    // A session with a history from the start; two more sessions evict the least recently used.
    let with = post(
        &a,
        &format!("{u}/v1/sessions"),
        "{\"history\": [589], \"top_k\": 3}",
    );
    assert_eq!(with.status, 201);
    assert_eq!(with.json()["items"].as_array().unwrap().len(), 3);
    let t = with.json()["session"].as_str().unwrap().to_string();
    assert_eq!(get(&a, &format!("{u}/v1/sessions/{t}")).status, 200); // t is newer than s now
    post(&a, &format!("{u}/v1/sessions"), "");
    let gone = post(&a, &format!("{u}/v1/sessions/{s}/items"), "{\"id\": 589}");
    assert_eq!(gone.status, 404);
    assert!(gone.json()["error"]
        .as_str()
        .unwrap()
        .contains("does not exist"));
    assert_eq!(get(&a, &format!("{u}/v1/sessions/{t}")).status, 200);
    assert_eq!(delete(&a, &format!("{u}/v1/sessions/{t}")).status, 204);
    assert_eq!(get(&a, &format!("{u}/v1/sessions/{t}")).status, 404);
    let m = get(&a, &format!("{u}/metrics")).body;
    assert!(m.contains("illmrec_sessions 1"), "{m}");
    assert!(m.contains("illmrec_session_decoded_positions_count"), "{m}");
}

#[test]
fn a_full_queue_answers_503_with_retry_after_and_load_stays_correct() {
    let server = Server::start(BIN, &["--queue", "1", "--contexts", "1"]);
    let u = server.url.clone();
    let rss_before = server.rss_kib().unwrap();
    // 8 simultaneous cold requests on one context with room for one waiting: some are refused
    let known = [260u64, 1198, 1196, 1210, 589, 1, 2, 3];
    let handles: Vec<_> = known
        .iter()
        .map(|&id| {
            let u = u.clone();
            std::thread::spawn(move || {
                post(
                    &agent(),
                    &format!("{u}/v1/recommend"),
                    &json!({"history": [id]}).to_string(),
                )
            })
        })
        .collect();
    let replies: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let busy: Vec<_> = replies.iter().filter(|r| r.status == 503).collect();
    let ok = replies.iter().filter(|r| r.status == 200).count();
    assert_eq!(
        busy.len() + ok,
        8,
        "{:?}",
        replies
            .iter()
            .map(|r| (r.status, &r.body))
            .collect::<Vec<_>>()
    );
    assert!(
        ok >= 1 && !busy.is_empty(),
        "{ok} answered, {} refused",
        busy.len()
    );
    for r in busy {
        assert_eq!(r.retry_after.as_deref(), Some("1"));
        assert!(r.json()["error"].as_str().unwrap().contains("busy"));
    }
    // a small mixed load, valid and bad requests: every valid one answered (or refused with
    // 503 + Retry-After), every bad one 400/404 with an error
    let catalog: Vec<u64> = vec![1, 2, 3, 260, 589, 1196, 1198, 1210, 1240, 2571];
    let out = common::load::run(&u, 3, 12, &catalog, 7);
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    assert!(out.bad_wrong.is_empty(), "{:?}", out.bad_wrong);
    assert_eq!(out.busy_without_retry_after, 0);
    assert!(!out.ok_latencies.is_empty());
    let rss_after = server.rss_kib().unwrap();
    eprintln!("RSS {rss_before} KiB before, {rss_after} KiB after");
    assert_eq!(
        get(&agent(), &format!("{u}/healthz")).json()["queue_depth"],
        0
    );
}

#[test]
fn faults_leave_the_server_serving_and_sigterm_drains() {
    let mut server = Server::start(
        BIN,
        &["--body-timeout", "1", "--contexts", "2", "--threads", "1"],
    );
    let u = server.url.clone();
    let addr = u.trim_start_matches("http://").to_string();
    let a = agent();

    // A client that goes away mid-request: sends a recommend and closes at once.
    for _ in 0..3 {
        let mut s = TcpStream::connect(&addr).unwrap();
        let body = "{\"history\": [260, 1198, 1196]}";
        write!(s, "POST /v1/recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
        drop(s);
    }
    // A client that stops halfway through its body: 408 after the body timeout.
    let mut slow = TcpStream::connect(&addr).unwrap();
    write!(
        slow,
        "POST /v1/recommend HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{{\"hist"
    )
    .unwrap();
    // A client that sends its headers one byte at a time, slowly, alongside the others.
    let slow_headers = std::thread::spawn({
        let addr = addr.clone();
        move || {
            let mut s = TcpStream::connect(&addr).unwrap();
            for b in b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" {
                s.write_all(&[*b]).unwrap();
                std::thread::sleep(Duration::from_millis(20));
            }
            let mut reply = String::new();
            s.read_to_string(&mut reply).unwrap();
            reply
        }
    });
    let start = Instant::now();
    let r = post(&a, &format!("{u}/v1/recommend"), "{\"history\": [589]}");
    assert_eq!(r.status, 200, "{}", r.body);
    slow.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut reply = vec![0u8; 4096];
    let n = slow.read(&mut reply).unwrap();
    let reply = String::from_utf8_lossy(&reply[..n]).to_string();
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("did not arrive in time"), "{reply}");
    assert!(start.elapsed() < Duration::from_secs(30));
    assert!(slow_headers.join().unwrap().starts_with("HTTP/1.1 200"));

    // SIGTERM under load: requests in flight are answered, then the process exits 0.
    let load: Vec<_> = (0..4)
        .map(|i| {
            let u = u.clone();
            std::thread::spawn(move || {
                let a = agent();
                let mut statuses = vec![];
                for j in 0..3 {
                    let ids = [260u64, 1198, 1196, 1210, 589, 1, 2];
                    let r = a
                        .post(format!("{u}/v1/recommend"))
                        .send(json!({"history": [ids[i + j]]}).to_string());
                    match r {
                        Ok(r) => statuses.push(r.status().as_u16()),
                        Err(_) => statuses.push(0), // refused after the listener closed
                    }
                }
                statuses
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    let status = server
        .terminate(Duration::from_secs(120))
        .expect("the server did not exit after SIGTERM");
    assert!(
        status.success(),
        "exit status {status:?}: {}",
        server.stderr.lock().unwrap()
    );
    let statuses: Vec<u16> = load.into_iter().flat_map(|h| h.join().unwrap()).collect();
    assert!(statuses.contains(&200), "{statuses:?}");
    // every request either answered in full (200), refused as shutting down (503), or not
    // accepted at all (0): never a 500 or a broken answer
    assert!(
        statuses.iter().all(|s| [0, 200, 503].contains(s)),
        "{statuses:?}"
    );
    let log = server.stderr.lock().unwrap().clone();
    assert!(
        log.contains("shutting down") && log.contains("stopped"),
        "{log}"
    );
}

#[test]
fn remote_addresses_need_allow_remote() {
    let out = common::illmrec(&[
        "serve",
        "--bundle",
        &common::s(&common::server::demo_bundle()),
        "--addr",
        "0.0.0.0:0",
    ]);
    common::assert_clean_error(&out, "without --allow-remote");
}
