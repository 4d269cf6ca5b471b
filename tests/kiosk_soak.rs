//! The kiosk soak test (issue 27): the real server on loopback under bounded mixed load for
//! several minutes: shoppers (cold recommendations, session taps and removals, catalog
//! searches, the popular row), item edits through the admin API (add with a photo, replace,
//! remove, in a loop), and floods of idle and half-header connections every 30 s. It reports,
//! per interval, requests, errors, p50/p99 latency and the server's RSS, and fails on any lost
//! request (a valid request answered other than 200/201, or a 503 without Retry-After) or RSS
//! that does not come back.
//!
//! Not in the default suite (it runs minutes):
//!
//! ```sh
//! ILLMREC_SOAK_SECS=300 cargo test --release --test kiosk_soak -- --ignored --nocapture
//! ```

mod common;

use base64::Engine;
use common::server::{agent, get, Server};
use common::BIN;
use serde_json::{json, Value};
use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct Window {
    latencies: Vec<Duration>,
    errors: Vec<String>,
    busy: u64,
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[(self.next() % v.len() as u64) as usize]
    }
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e3
}

fn call(
    a: &ureq::Agent,
    method: &str,
    url: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> Result<(u16, bool, String), String> {
    let mut req = ureq::http::Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let mut r = a
        .run(req.body(body.unwrap_or("").to_string()).unwrap())
        .map_err(|e| format!("{method} {url}: {e}"))?;
    let retry = r.headers().contains_key("retry-after");
    let text = r.body_mut().read_to_string().unwrap_or_default();
    Ok((r.status().as_u16(), retry, text))
}

fn photo(shade: u8) -> String {
    let img = image::RgbImage::from_fn(80, 120, |x, y| {
        image::Rgb([shade, (x * 2) as u8, (y * 2) as u8])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
    base64::engine::general_purpose::STANDARD.encode(out.into_inner())
}

#[test]
#[ignore = "runs minutes: ILLMREC_SOAK_SECS=300 cargo test --release --test kiosk_soak -- --ignored --nocapture"]
fn kiosk_soak() {
    let secs: u64 = std::env::var("ILLMREC_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let every: u64 = 30;
    let tmp = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("kiosk-soak");
    let bundle = common::copy_bundle(&common::server::demo_bundle(), &tmp.join("bundle"));
    let token = "soak-admin-token-0123456789";
    std::fs::write(tmp.join("token"), token).unwrap();
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
            "--max-connections",
            "128",
            "--max-sessions",
            "16",
            "--header-timeout",
            "5",
            "--idle-timeout",
            "10",
        ],
    );
    let u = server.url.clone();
    let addr = server.addr();
    let catalog: Vec<u64> = vec![
        1, 2, 3, 32, 50, 110, 260, 296, 318, 356, 480, 589, 593, 1196, 1198, 1210, 1240, 2571,
    ];
    let window = Arc::new(Mutex::new(Window::default()));
    let total = Arc::new(Mutex::new(Window::default()));
    let requests = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let record = |w: &Arc<Mutex<Window>>,
                  t: &Arc<Mutex<Window>>,
                  what: &str,
                  r: Result<(u16, bool, String), String>,
                  took: Duration,
                  ok: &[u16]| {
        let mut w = w.lock().unwrap();
        let mut t = t.lock().unwrap();
        match r {
            Ok((s, _, _)) if ok.contains(&s) => {
                w.latencies.push(took);
                t.latencies.push(took);
            }
            Ok((503, true, _)) => {
                w.busy += 1;
                t.busy += 1;
            }
            Ok((s, _, body)) => {
                let e = format!("{what}: {s} {body}");
                w.errors.push(e.clone());
                t.errors.push(e);
            }
            Err(e) => {
                w.errors.push(format!("{what}: {e}"));
                t.errors.push(format!("{what}: {e}"));
            }
        }
    };
    let rss_start = server.rss_kib().unwrap();
    // The level memory must come back to: the first interval's, once sessions are warm.
    let mut rss0 = 0;
    let mut samples: Vec<String> = vec![];
    std::thread::scope(|scope| {
        // Shoppers.
        for c in 0..3u64 {
            let (u, window, total, requests, stop, catalog) = (
                u.clone(),
                window.clone(),
                total.clone(),
                requests.clone(),
                stop.clone(),
                catalog.clone(),
            );
            scope.spawn(move || {
                let a = agent();
                let mut rng = Rng(0x9e37_79b9 + c);
                let mut session: Option<String> = None;
                let mut picks: Vec<u64> = vec![];
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let kind = rng.next() % 10;
                    let (what, r, ok): (&str, _, &[u16]) = match kind {
                        0..=2 => {
                            let h: Vec<u64> = (0..1 + rng.next() % 6)
                                .map(|_| rng.pick(&catalog))
                                .collect();
                            (
                                "recommend",
                                call(
                                    &a,
                                    "POST",
                                    &format!("{u}/v1/recommend"),
                                    Some(&json!({"history": h}).to_string()),
                                    None,
                                ),
                                &[200],
                            )
                        }
                        3..=6 => {
                            if session.is_none() || picks.len() >= 8 {
                                let r =
                                    call(&a, "POST", &format!("{u}/v1/sessions"), Some("{}"), None);
                                session = r
                                    .as_ref()
                                    .ok()
                                    .and_then(|(_, _, b)| serde_json::from_str::<Value>(b).ok())
                                    .and_then(|v| v["session"].as_str().map(str::to_string));
                                picks.clear();
                                ("session", r, &[201])
                            } else if kind == 6 && !picks.is_empty() {
                                let id = picks.remove(0);
                                let s = session.clone().unwrap();
                                (
                                    "untap",
                                    call(
                                        &a,
                                        "DELETE",
                                        &format!("{u}/v1/sessions/{s}/items/{id}"),
                                        None,
                                        None,
                                    ),
                                    &[200],
                                )
                            } else {
                                let id = rng.pick(&catalog);
                                let s = session.clone().unwrap();
                                if !picks.contains(&id) {
                                    picks.push(id);
                                }
                                let r = call(
                                    &a,
                                    "POST",
                                    &format!("{u}/v1/sessions/{s}/items"),
                                    Some(&json!({"id": id}).to_string()),
                                    None,
                                );
                                if matches!(r, Ok((404, _, _))) {
                                    session = None; // evicted: start again, as the page does
                                }
                                ("tap", r, &[200, 404])
                            }
                        }
                        7 | 8 => (
                            "search",
                            call(
                                &a,
                                "GET",
                                &format!(
                                    "{u}/v1/items?query=the&limit=24&offset={}",
                                    rng.next() % 200
                                ),
                                None,
                                None,
                            ),
                            &[200],
                        ),
                        _ => (
                            "popular",
                            call(&a, "GET", &format!("{u}/v1/popular"), None, None),
                            &[200],
                        ),
                    };
                    requests.fetch_add(1, Ordering::Relaxed);
                    record(&window, &total, what, r, t.elapsed(), ok);
                }
            });
        }
        // Item edits: add with a photo, replace, remove, in a loop.
        {
            let (u, window, total, requests, stop) = (
                u.clone(),
                window.clone(),
                total.clone(),
                requests.clone(),
                stop.clone(),
            );
            scope.spawn(move || {
                let a = agent();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let id = 980_000 + n % 3;
                    for (method, url, body) in [
                        ("POST", format!("{u}/v1/admin/items"), Some(json!({"id": id, "title": format!("Soak Item {n} (2026)"), "genres": ["Drama"], "photo": photo((n * 40) as u8)}))),
                        ("PUT", format!("{u}/v1/admin/items/{id}"), Some(json!({"title": format!("Soak Item {n}, Recut (2026)"), "photo": photo((n * 40 + 20) as u8)}))),
                        ("DELETE", format!("{u}/v1/admin/items/{id}"), None),
                    ] {
                        let t = Instant::now();
                        let b = body.map(|b| b.to_string());
                        let r = call(&a, method, &url, b.as_deref(), Some(token));
                        requests.fetch_add(1, Ordering::Relaxed);
                        record(&window, &total, &format!("admin {method}"), r, t.elapsed(), &[200, 201]);
                        for _ in 0..30 {
                            if stop.load(Ordering::Relaxed) {
                                return;
                            }
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                    n += 1;
                }
            });
        }
        // Floods: every 30 s, 300 idle or half-header connections held for 10 s.
        {
            let (addr, stop) = (addr.clone(), stop.clone());
            scope.spawn(move || {
                let start = Instant::now();
                let mut round = 0;
                while !stop.load(Ordering::Relaxed) {
                    if start.elapsed() >= Duration::from_secs(15 + round * every) {
                        round += 1;
                        let mut held = vec![];
                        for i in 0..300 {
                            if let Ok(mut s) = TcpStream::connect(&addr) {
                                if i % 2 == 0 {
                                    let _ = s.write_all(
                                        b"GET /v1/items HTTP/1.1\r\nHost: x\r\nX-Half: ",
                                    );
                                }
                                held.push(s);
                            }
                        }
                        let t = Instant::now();
                        while t.elapsed() < Duration::from_secs(10) && !stop.load(Ordering::Relaxed)
                        {
                            std::thread::sleep(Duration::from_millis(100));
                        }
                        drop(held);
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            });
        }
        // The sampler, and the clock.
        let start = Instant::now();
        let a = agent();
        println!("| t (s) | requests | ok | busy (503) | errors | p50 ms | p99 ms | connections | RSS MiB |");
        println!("|---|---|---|---|---|---|---|---|---|");
        let mut last_requests = 0;
        while start.elapsed() < Duration::from_secs(secs) {
            std::thread::sleep(Duration::from_secs(every));
            let mut w = std::mem::take(&mut *window.lock().unwrap());
            let n = requests.load(Ordering::Relaxed);
            let h = get(&a, &format!("{u}/health"));
            let conns = if h.status == 200 {
                h.json()["connections"].as_u64().unwrap_or(0)
            } else {
                0
            };
            let rss = server.rss_kib().unwrap_or(0);
            let line = format!(
                "| {} | {} | {} | {} | {} | {:.0} | {:.0} | {} | {:.0} |",
                start.elapsed().as_secs(),
                n - last_requests,
                w.latencies.len(),
                w.busy,
                w.errors.len(),
                pct(&mut w.latencies, 0.5),
                pct(&mut w.latencies, 0.99),
                conns,
                rss as f64 / 1024.0
            );
            last_requests = n;
            if rss0 == 0 {
                rss0 = rss;
            }
            println!("{line}");
            samples.push(line);
            for e in w.errors.iter().take(3) {
                println!("  error: {e}");
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
    // After the load: connections drain, memory settles.
    std::thread::sleep(Duration::from_secs(12));
    let rss_end = server.rss_kib().unwrap();
    let mut t = std::mem::take(&mut *total.lock().unwrap());
    let m = get(&agent(), &format!("{u}/metrics")).body;
    let events: Vec<&str> = m
        .lines()
        .filter(|l| l.starts_with("illmrec_connection"))
        .collect();
    println!(
        "total: {} requests answered, {} busy (503 + Retry-After), {} errors; p50 {:.0} ms, p99 {:.0} ms; RSS {:.0} MiB idle at start, {:.0} MiB after the first interval, {:.0} MiB after the load; {}",
        t.latencies.len(),
        t.busy,
        t.errors.len(),
        pct(&mut t.latencies, 0.5),
        pct(&mut t.latencies, 0.99),
        rss_start as f64 / 1024.0,
        rss0 as f64 / 1024.0,
        rss_end as f64 / 1024.0,
        events.join(", ")
    );
    assert!(
        t.errors.is_empty(),
        "{:?}",
        &t.errors[..t.errors.len().min(20)]
    );
    assert!(t.latencies.len() > 100);
    assert!(
        rss_end < rss0 + 128 * 1024,
        "RSS {rss0} KiB at start, {rss_end} KiB at the end"
    );
    let h = get(&agent(), &format!("{u}/health")).json();
    assert!(h["connections"].as_u64().unwrap() <= 2, "{h}");
}
