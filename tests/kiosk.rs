//! The kiosk as a service that lives in a store (issue 27.4, issue 28 §2), against the real
//! binary on loopback: floods of idle and half-header connections do not starve good requests
//! and leave no connection or memory behind; the connection limit refuses clearly; catalog
//! edits through the admin API reach the running server (with their photos) while requests are
//! in flight; health, readiness, request ids, the API key, the OpenAPI document and the split
//! metrics.

mod common;

use base64::Engine;
use common::server::{agent, get, post, Server};
use common::BIN;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn ids(items: &Value) -> Vec<u64> {
    items
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_u64().unwrap())
        .collect()
}

/// A metric's value in OpenMetrics text (the first line starting with `name`).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

/// Whether the server closed `s` (EOF or reset) within `limit`.
fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // a 408/400 answer before the close
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

#[test]
fn a_flood_of_idle_and_half_header_connections_does_not_starve_good_requests() {
    let server = Server::start(
        BIN,
        &[
            "--max-connections",
            "64",
            "--header-timeout",
            "2",
            "--idle-timeout",
            "3",
            "--request-log",
            "off",
        ],
    );
    let (u, addr) = (server.url.clone(), server.addr());
    let a = agent();
    let rec = format!("{u}/v1/recommend");
    let good = json!({"history": [260, 1198, 1196]}).to_string();
    let warm = post(&a, &rec, &good);
    assert_eq!(warm.status, 200, "{}", warm.body);
    let want = ids(&warm.json()["items"]);
    std::thread::sleep(Duration::from_millis(500));
    let rss_before = server.rss_kib().unwrap();

    // The flood: 400 connections (over six times the limit), kept coming for 12 s, half of them
    // silent, half sending a header a few bytes at a time and never finishing it.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let (addr, stop) = (addr.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut held: Vec<TcpStream> = Vec::new();
            let start = Instant::now();
            let mut opened = 0;
            while start.elapsed() < Duration::from_secs(12)
                && !stop.load(std::sync::atomic::Ordering::Relaxed)
            {
                if let Ok(mut s) = TcpStream::connect(&addr) {
                    if opened % 2 == 1 {
                        let _ = s.write_all(b"POST /v1/recommend HTTP/1.1\r\nHost: x\r\nX-Slow: ");
                    }
                    opened += 1;
                    held.push(s);
                }
                if held.len() > 400 {
                    held.remove(0);
                }
                // Keep the half headers trickling (one byte each, on a few of them).
                for s in held.iter_mut().skip(opened % 7).step_by(37) {
                    let _ = s.write_all(b"a");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            (opened, held)
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    // Good requests during the flood, each on a new connection: all answered, correctly.
    for i in 0..6 {
        let t = Instant::now();
        let r = post(&agent(), &rec, &good);
        assert_eq!(r.status, 200, "request {i} during the flood: {}", r.body);
        assert_eq!(ids(&r.json()["items"]), want);
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "request {i} took {:?}",
            t.elapsed()
        );
        let h = get(&agent(), &format!("{u}/health"));
        assert_eq!(h.status, 200);
        assert!(
            h.json()["connections"].as_u64().unwrap() <= 64,
            "{}",
            h.body
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (opened, mut held) = flood.join().unwrap();
    assert!(opened > 200, "the flood opened only {opened} connections");
    // Every flood connection still held is closed by the server within the timeouts.
    let deadline = Instant::now() + Duration::from_secs(10);
    for s in held.iter_mut() {
        let left = deadline.saturating_duration_since(Instant::now()) + Duration::from_millis(50);
        assert!(closed_within(s, left), "a flood connection is still open");
    }
    drop(held);
    std::thread::sleep(Duration::from_secs(1));
    let m = get(&a, &format!("{u}/metrics")).body;
    assert!(
        metric(&m, "illmrec_connection_events{event=\"evicted\"}") > 0.0,
        "{m}"
    );
    let closed = metric(&m, "illmrec_connection_events{event=\"idle_closed\"}")
        + metric(&m, "illmrec_connection_events{event=\"header_error\"}");
    assert!(closed > 0.0, "{m}");
    assert!(metric(&m, "illmrec_connections ") <= 2.0, "{m}");
    // Memory back to its level: within 64 MiB of before the flood.
    let rss_after = server.rss_kib().unwrap();
    eprintln!(
        "RSS {rss_before} KiB before the flood, {rss_after} KiB after ({opened} flood connections)"
    );
    assert!(
        rss_after < rss_before + 64 * 1024,
        "RSS {rss_before} KiB before, {rss_after} KiB after"
    );
    assert_eq!(post(&a, &rec, &good).status, 200);
}

#[test]
fn beyond_the_limit_with_every_connection_busy_a_new_one_is_refused_with_503() {
    let server = Server::start(
        BIN,
        &[
            "--max-connections",
            "2",
            "--body-timeout",
            "4",
            "--request-log",
            "off",
        ],
    );
    let addr = server.addr();
    // Two connections in a request (headers sent, body awaited): both busy.
    let mut busy: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut s = TcpStream::connect(&addr).unwrap();
            write!(
                s,
                "POST /v1/recommend HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n\r\n{{\"hi"
            )
            .unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(400));
    let mut third = TcpStream::connect(&addr).unwrap();
    let _ = write!(third, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
    third
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reply = String::new();
    let _ = third.read_to_string(&mut reply);
    assert!(reply.starts_with("HTTP/1.1 503"), "{reply:?}");
    assert!(
        reply.contains("retry-after: 1") && reply.contains("too many connections"),
        "{reply}"
    );
    // The busy ones get their 408 after the body timeout; then there is room again.
    for s in busy.iter_mut() {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut r = String::new();
        let _ = s.read_to_string(&mut r);
        assert!(r.starts_with("HTTP/1.1 408"), "{r}");
    }
    drop(busy);
    std::thread::sleep(Duration::from_millis(300));
    let m = get(&agent(), &format!("{}/metrics", server.url)).body;
    assert!(
        metric(&m, "illmrec_connection_events{event=\"refused\"}") >= 1.0,
        "{m}"
    );
    let log = server.stderr.lock().unwrap().clone();
    assert!(log.contains("\"event\":\"connection_refused\""), "{log}");
}

/// A small JPEG: a gradient in the given colour.
fn photo(rgb: [u8; 3]) -> Vec<u8> {
    let img = image::RgbImage::from_fn(96, 144, |x, y| {
        image::Rgb([
            rgb[0].saturating_add((x / 2) as u8),
            rgb[1].saturating_add((y / 3) as u8),
            rgb[2],
        ])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
    out.into_inner()
}

fn send(
    a: &ureq::Agent,
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> common::server::Reply {
    let mut req = ureq::http::Request::builder().method(method).uri(url);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    req = req.header("content-type", "application/json");
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let r = a.run(req.body(body).unwrap());
    let mut r = r.expect("HTTP request failed");
    let text = r.body_mut().read_to_string().unwrap_or_default();
    common::server::Reply {
        status: r.status().as_u16(),
        retry_after: None,
        content_type: String::new(),
        body: text,
    }
}

#[test]
fn items_edited_through_the_admin_api_reach_the_running_server_with_their_photos() {
    let tmp = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("kiosk-admin");
    let bundle = common::copy_bundle(&common::server::demo_bundle(), &tmp.join("bundle"));
    let token = "an-admin-token-of-some-length";
    std::fs::write(tmp.join("token"), format!("{token}\n")).unwrap();
    let server = Server::start_with(
        BIN,
        &bundle,
        &[
            "--admin-token-file",
            &common::s(&tmp.join("token")),
            "--contexts",
            "2",
            "--threads",
            "1",
        ],
    );
    let (u, a) = (server.url.clone(), agent());
    let admin = format!("{u}/v1/admin/items");
    let jpeg = photo([200, 40, 40]);
    let b64 = base64::engine::general_purpose::STANDARD.encode(&jpeg);
    let new_item = json!({"id": 990001, "title": "Kiosk Test Movie (2026)", "genres": ["Drama", "Sci-Fi"], "photo": b64});

    // The token is required.
    assert_eq!(send(&a, "POST", &admin, None, Some(&new_item)).status, 401);
    assert_eq!(
        send(
            &a,
            "POST",
            &admin,
            Some("wrong-token-wrong-token"),
            Some(&new_item)
        )
        .status,
        401
    );
    assert_eq!(get(&a, &format!("{u}/v1/items/990001")).status, 404);

    // Requests in flight all along the edits: every one answered 200.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (u, stop) = (u.clone(), stop.clone());
        std::thread::spawn(move || {
            let a = agent();
            let mut statuses = vec![];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = post(
                    &a,
                    &format!("{u}/v1/recommend"),
                    "{\"history\": [260, 1196]}",
                );
                statuses.push((r.status, r.body));
            }
            statuses
        })
    };

    let added = send(&a, "POST", &admin, Some(token), Some(&new_item));
    assert_eq!(added.status, 201, "{}", added.body);
    let v = added.json();
    assert_eq!(v["catalog_items"], 1298);
    assert_eq!(v["item"]["image"], "/v1/items/990001/image");
    assert!(v["scored_on"].to_string().contains("img"), "{v}");
    // Again: a conflict, not a second item.
    assert_eq!(
        send(&a, "POST", &admin, Some(token), Some(&new_item)).status,
        409
    );

    // The running server knows it at once: item, photo (the bytes sent), search, history,
    // recommendations.
    let item = get(&a, &format!("{u}/v1/items/990001")).json();
    assert_eq!(item["title"], "Kiosk Test Movie (2026)");
    let mut img = a.get(format!("{u}/v1/items/990001/image")).call().unwrap();
    assert_eq!(img.status().as_u16(), 200);
    assert_eq!(img.body_mut().read_to_vec().unwrap(), jpeg);
    assert_eq!(
        get(&a, &format!("{u}/v1/items?query=kiosk%20test")).json()["total"],
        1
    );
    let r = post(
        &a,
        &format!("{u}/v1/recommend"),
        &json!({"history": [260, 1196], "candidates": [990001, 1, 2, 3], "top_k": 4}).to_string(),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(ids(&r.json()["items"]).contains(&990001));
    let all = post(
        &a,
        &format!("{u}/v1/recommend"),
        &json!({"history": [260, 1196], "top_k": 2000}).to_string(),
    )
    .json();
    assert!(
        ids(&all["items"]).contains(&990001),
        "the new item is ranked with the catalog"
    );
    let with = post(
        &a,
        &format!("{u}/v1/recommend"),
        "{\"history\": [990001, 260]}",
    );
    assert_eq!(with.status, 200, "{}", with.body);
    // A session that tapped it, then the item is replaced: the session goes on.
    let s = post(&a, &format!("{u}/v1/sessions"), "{\"history\": [990001]}").json()["session"]
        .as_str()
        .unwrap()
        .to_string();
    let green = photo([20, 180, 60]);
    let replaced = send(
        &a,
        "PUT",
        &format!("{admin}/990001"),
        Some(token),
        Some(
            &json!({"title": "Kiosk Test Movie, Recut (2026)", "photo": base64::engine::general_purpose::STANDARD.encode(&green)}),
        ),
    );
    assert_eq!(replaced.status, 200, "{}", replaced.body);
    assert_eq!(
        get(&a, &format!("{u}/v1/items/990001")).json()["title"],
        "Kiosk Test Movie, Recut (2026)"
    );
    let mut img = a.get(format!("{u}/v1/items/990001/image")).call().unwrap();
    assert_eq!(img.body_mut().read_to_vec().unwrap(), green);
    let tap = post(&a, &format!("{u}/v1/sessions/{s}/items"), "{\"id\": 260}");
    assert_eq!(tap.status, 200, "{}", tap.body);
    assert_eq!(tap.json()["history"], json!([990001, 260]));

    // Bad edits: clear errors, nothing changed.
    let bad = send(
        &a,
        "POST",
        &admin,
        Some(token),
        Some(&json!({"id": 990002, "title": "X", "photo": "not base64!"})),
    );
    assert_eq!(bad.status, 400);
    assert!(bad.body.contains("not base64"), "{}", bad.body);
    let bad = send(
        &a,
        "POST",
        &admin,
        Some(token),
        Some(&json!({"id": 990002, "title": "X", "photo": "aGVsbG8="})),
    );
    assert_eq!(bad.status, 400);
    assert!(bad.body.contains("not a JPEG, PNG or WebP"), "{}", bad.body);
    assert_eq!(
        send(&a, "DELETE", &format!("{admin}/4"), Some(token), None).status,
        404
    );

    // Removed: gone from the catalog, from the session's history, and its photo from the bundle.
    let removed = send(&a, "DELETE", &format!("{admin}/990001"), Some(token), None);
    assert_eq!(removed.status, 200, "{}", removed.body);
    assert_eq!(removed.json()["catalog_items"], 1297);
    assert_eq!(get(&a, &format!("{u}/v1/items/990001")).status, 404);
    let gone = post(&a, &format!("{u}/v1/recommend"), "{\"history\": [990001]}");
    assert_eq!(gone.status, 400);
    assert_eq!(
        get(&a, &format!("{u}/v1/sessions/{s}")).json()["history"],
        json!([260])
    );
    assert!(!bundle.join("images/990001.jpg").exists());

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let statuses = load.join().unwrap();
    assert!(statuses.len() >= 2, "{}", statuses.len());
    for (status, body) in &statuses {
        assert_eq!(*status, 200, "a request during the edits: {body}");
    }
    let m = get(&a, &format!("{u}/metrics")).body;
    assert_eq!(metric(&m, "illmrec_catalog_items"), 1297.0);
    let log = server.stderr.lock().unwrap().clone();
    assert!(log.contains("\"event\":\"catalog_edit\""), "{log}");
    // The edited bundle still verifies.
    common::illmrec_ok(&["bundle", "verify", &common::s(&bundle)]);
}

#[test]
fn service_conventions_health_ids_keys_openapi_and_metrics() {
    let tmp = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("kiosk-conventions");
    std::fs::create_dir_all(&tmp).unwrap();
    let key = "kiosk-api-key-0123456789";
    std::fs::write(tmp.join("key"), key).unwrap();
    // Ready only once loaded: right after the listening line, /health says 503 "loading".
    let mut server = Server::spawn(
        BIN,
        &common::server::demo_bundle(),
        &[
            "--api-key-file",
            &common::s(&tmp.join("key")),
            "--featured",
            "589,1,999999999",
            "--cache-dir",
            &common::s(&tmp.join("fresh-cache")),
        ],
    );
    let a = agent();
    let u = server.url.clone();
    let first = get(&a, &format!("{u}/health/ready"));
    let early = get(&a, &format!("{u}/health"));
    assert_eq!(get(&a, &format!("{u}/health/live")).status, 200);
    server.wait_ready(Duration::from_secs(300));
    assert_eq!(first.status, 503, "{}", first.body);
    assert_eq!(first.json()["ready"], false);
    if early.status == 503 {
        assert_eq!(early.json()["status"], "loading");
    }
    let h = get(&a, &format!("{u}/health"));
    assert_eq!(h.status, 200);
    assert_eq!(h.json()["ready"], true);
    assert_eq!(h.json()["catalog_items"], 1297);

    // The API key: required on /v1/, in either header; pictures, health and the page are open.
    let r = get(&a, &format!("{u}/v1/items?limit=1"));
    assert_eq!(r.status, 401);
    assert!(r.json()["error"].as_str().unwrap().contains("API key"));
    let ok = a
        .get(format!("{u}/v1/items?limit=1"))
        .header("x-api-key", key)
        .call()
        .unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    let ok = a
        .get(format!("{u}/v1/items?limit=1"))
        .header("authorization", format!("Bearer {key}"))
        .call()
        .unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    assert_eq!(get(&a, &format!("{u}/v1/items/260/image")).status, 404); // open, no picture
    assert_eq!(get(&a, &format!("{u}/")).status, 200);

    // X-Request-ID: echoed when given, made when not; in the JSON log line with the timings.
    let mut r = a
        .post(format!("{u}/v1/recommend"))
        .header("x-api-key", key)
        .header("x-request-id", "kiosk-req-42")
        .header("content-type", "application/json")
        .send("{\"history\": [260, 1198]}")
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.headers().get("x-request-id").unwrap(), "kiosk-req-42");
    let _ = r.body_mut().read_to_string();
    let made = a.get(format!("{u}/health")).call().unwrap();
    let id = made
        .headers()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(id.len(), 16);
    std::thread::sleep(Duration::from_millis(200));
    let log = server.stderr.lock().unwrap().clone();
    let line: Value = log
        .lines()
        .find(|l| l.contains("kiosk-req-42"))
        .map(|l| serde_json::from_str(l).unwrap())
        .unwrap_or_else(|| panic!("no log line for the request: {log}"));
    assert_eq!(line["event"], "request");
    assert_eq!(line["route"], "/v1/recommend");
    assert_eq!(line["status"], 200);
    assert!(line["compute_ms"].as_f64().unwrap() > 0.0, "{line}");
    assert!(
        line["queue_ms"].as_f64().is_some() && line["decoded_positions"].as_u64().unwrap() > 10,
        "{line}"
    );
    assert!(line["ts"].as_str().unwrap().ends_with('Z'));

    // Metrics split queue wait from compute and count positions decoded.
    let m = get(&a, &format!("{u}/metrics")).body;
    for needle in [
        "illmrec_queue_wait_seconds_count{route=\"/v1/recommend\"} 1",
        "illmrec_compute_seconds_count{route=\"/v1/recommend\"} 1",
        "illmrec_decoded_positions_total{route=\"/v1/recommend\"}",
        "illmrec_ready 1",
        "illmrec_connections ",
    ] {
        assert!(m.contains(needle), "metrics lack {needle}:\n{m}");
    }

    // The empty session shows the configured row (unknown ids skipped).
    let s = a
        .post(format!("{u}/v1/sessions"))
        .header("x-api-key", key)
        .send("{}")
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    let s: Value = serde_json::from_str(&s).unwrap();
    assert_eq!(s["row"], "featured");
    assert_eq!(ids(&s["items"])[..2], [589, 1]);

    // The OpenAPI document lists every route.
    let doc = get(&a, &format!("{u}/openapi.json"));
    assert_eq!(doc.status, 200);
    let doc = doc.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/v1/recommend",
        "/v1/score",
        "/v1/items",
        "/v1/items/{id}",
        "/v1/items/{id}/image",
        "/v1/popular",
        "/v1/sessions",
        "/v1/sessions/{id}",
        "/v1/sessions/{id}/items",
        "/v1/sessions/{id}/items/{item}",
        "/v1/admin/items",
        "/v1/admin/items/{id}",
        "/health",
        "/health/live",
        "/health/ready",
        "/metrics",
        "/openapi.json",
    ] {
        assert!(
            doc["paths"][path].is_object(),
            "the OpenAPI document lacks {path}"
        );
    }
    // Without --admin-token-file the admin API is off.
    let off = a
        .post(format!("{u}/v1/admin/items"))
        .header("x-api-key", key)
        .send("{}")
        .unwrap();
    assert_eq!(off.status().as_u16(), 403);
}
