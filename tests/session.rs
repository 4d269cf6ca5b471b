//! The library API the kiosk server stands on, on the real default model and the shipped demo
//! bundle: workers sharing one opened recommender from several threads, kiosk sessions that
//! continue from a saved KV state (equal to cold requests to float rounding), and typed request
//! errors.

mod common;

use common::{cosine, rel_diff};
use illmrec::recommender::{Options, Recommender, RequestError, SessionState};
use std::collections::HashSet;
use std::path::Path;

fn demo() -> Recommender {
    common::model_path();
    let cache = std::env::temp_dir().join(format!("illmrec-session-test-{}", std::process::id()));
    Recommender::open(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo-bundle"),
        Options {
            context: illmrec::engine::ContextOptions {
                n_threads: 2,
                ..Default::default()
            },
            cache_dir: Some(cache),
            ..Options::default()
        },
    )
    .unwrap()
}

/// Scores of every catalog item for a user vector.
fn all_scores(rec: &Recommender, user: &illmrec::recommender::UserVector) -> Vec<f32> {
    let ids: Vec<u64> = rec.catalog.items().iter().map(|i| i.id).collect();
    rec.score_items(user, &ids)
        .unwrap()
        .into_iter()
        .map(|s| s.unwrap_or(0.0))
        .collect()
}

#[test]
fn sessions_match_cold_requests_and_decode_less() {
    let mut rec = demo();
    let mut cold = rec.worker().unwrap();
    let mut session = SessionState::default();
    let taps: [&[u64]; 5] = [
        &[260],
        &[260, 1198],
        &[260, 1198, 1196],
        &[260, 1198, 1196, 1210],
        // an item removed from the middle: the state is cut back to the common start
        &[260, 1196, 1210],
    ];
    let (mut previous, mut closing_len) = (0, None);
    for (n, history) in taps.iter().enumerate() {
        let (user, decoded) = rec.encode_session(&mut session, history).unwrap();
        let reference = cold.encode_user(history).unwrap();
        assert_eq!(user.used, reference.used);
        assert_eq!(user.prompt_positions, reference.prompt_positions);
        let rel = rel_diff(&all_scores(&rec, &user), &all_scores(&rec, &reference));
        let cos = cosine(&user.hidden, &reference.hidden);
        eprintln!(
            "tap {n}: {history:?} decoded {decoded} of {} positions, hidden cosine {cos:.5}, rel score diff {rel:.2e}",
            user.prompt_positions
        );
        // The session decodes the new item in a batch of its own where the cold request decodes
        // the whole prompt in one. On the default model (f32 weights, flash attention off) that
        // changes only float rounding: the tolerance of the PyTorch parity table (README
        // "Parity with PyTorch"). Quantized models are not held to it (README "Quantized
        // deployments": their activations are quantized per batch row).
        assert!(
            rel <= 5e-3,
            "tap {n}: scores differ from a cold request by {rel}"
        );
        assert!(
            cos >= 0.9999,
            "tap {n}: hidden cosine {cos} to a cold request"
        );
        let exclude: HashSet<u64> = history.iter().copied().collect();
        let a: Vec<u64> = rec
            .top_k(&user, 10, None, &exclude)
            .unwrap()
            .iter()
            .map(|s| s.id)
            .collect();
        let b: Vec<u64> = rec
            .top_k(&reference, 10, None, &exclude)
            .unwrap()
            .iter()
            .map(|s| s.id)
            .collect();
        let overlap = a.iter().filter(|id| b.contains(id)).count();
        assert!(overlap >= 9, "tap {n}: top-10 {a:?} against cold {b:?}");
        if (1..4).contains(&n) {
            // One new item: its own positions, then the closing text and [REC] (plus up to two
            // positions of margin after an item without an image), whatever the history's length.
            let closing = decoded - (user.prompt_positions - previous);
            let first = *closing_len.get_or_insert(closing);
            assert!(
                closing.abs_diff(first) <= 2,
                "tap {n}: {closing} closing positions, then {first}"
            );
            assert!(
                closing < previous / 2,
                "tap {n} decoded {decoded} positions"
            );
        }
        previous = user.prompt_positions;
        assert!(session.size() > 0);
    }
}

#[test]
fn workers_on_threads_agree_with_one_context() {
    let mut rec = demo();
    let histories: Vec<Vec<u64>> = vec![vec![260, 1198], vec![1, 2, 3], vec![589], vec![1210, 260]];
    let want: Vec<Vec<f32>> = histories
        .iter()
        .map(|h| rec.encode_user(h).unwrap().hidden)
        .collect();
    let got: Vec<Vec<Vec<f32>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let mut worker = rec.worker().unwrap();
                let histories = &histories;
                s.spawn(move || {
                    histories
                        .iter()
                        .map(|h| worker.encode_user(h).unwrap().hidden)
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for states in got {
        for (a, b) in states.iter().zip(&want) {
            // same prompt, same batch shapes: the same numbers
            assert_eq!(a, b);
        }
    }
}

#[test]
fn request_errors_are_typed() {
    let mut rec = demo();
    match rec.check_request(&[260, 999_999_999, 1, 888_888_888, 999_999_999], None, 10) {
        Err(RequestError::UnknownItems(ids)) => assert_eq!(ids, vec![999_999_999, 888_888_888]),
        other => panic!("{other:?}"),
    }
    let e = rec.check_request(&[260, 5_000_000], None, 10).unwrap_err();
    assert_eq!(e.to_string(), "item 5000000 is not in the catalog");
    assert!(e.is_client_error());
    assert!(matches!(
        rec.check_request(&[], None, 10),
        Err(RequestError::EmptyHistory)
    ));
    assert!(matches!(
        rec.check_request(&[260], Some(&[]), 10),
        Err(RequestError::EmptyCandidates)
    ));
    assert!(matches!(
        rec.check_request(&[260], None, 0),
        Err(RequestError::BadTopK(0))
    ));
    let long = vec![260u64; illmrec::recommender::MAX_HISTORY_IDS + 1];
    assert!(matches!(
        rec.check_request(&long, None, 10),
        Err(RequestError::TooManyItems {
            what: "history",
            ..
        })
    ));
    assert!(matches!(
        rec.encode_user(&[]),
        Err(RequestError::EmptyHistory)
    ));
    assert!(matches!(
        rec.encode_user(&[7_777_777]),
        Err(RequestError::UnknownItems(_))
    ));
    // the CLI keeps working through anyhow
    let as_anyhow: anyhow::Result<()> = rec
        .encode_user(&[7_777_777])
        .map(|_| ())
        .map_err(Into::into);
    assert!(format!("{:#}", as_anyhow.unwrap_err()).contains("item 7777777 is not in the catalog"));
}
