//! The prompt, token for token, against literal strings written from the reference (not from
//! src/prompt.json), and history truncation.

mod common;

use illmrec::method::prompt::{render, Segment};
use illmrec::recommender::{tokenize, MissingImage, Options, Recommender};
use std::path::PathBuf;
use std::sync::OnceLock;

const TASK: &str = "Your job is to recommend a suitable next item based on a user's interacted items. This user has chronologically interacted with following items: [";
const CLOSE: &str = "], where each interacted item's information is contained in curly brackets (i.e.,{}). Please conduct an analysis of user preferences based on the interacted items, and then generate a recommendation token for the next item to be consumed: ";

fn bundle() -> &'static (PathBuf, Vec<u64>) {
    static B: OnceLock<(PathBuf, Vec<u64>)> = OnceLock::new();
    B.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("prompt-test");
        let _ = std::fs::remove_dir_all(&dir);
        let ids = common::build_bundle(&dir, 40);
        (dir.join("bundle"), ids)
    })
}

fn open(opts: Options) -> Recommender {
    Recommender::open(
        &bundle().0,
        Options {
            context: illmrec::engine::ContextOptions {
                n_threads: 2,
                ..opts.context.clone()
            },
            ..opts
        },
    )
    .unwrap()
}

/// Items with an image feature (the test bundle leaves every third item without one).
fn with_image(n: usize) -> Vec<u64> {
    bundle()
        .1
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 3 != 2)
        .map(|(_, &id)| id)
        .take(n)
        .collect()
}

fn title(id: u64) -> String {
    common::movies(40)
        .into_iter()
        .find(|m| m.0 == id)
        .unwrap()
        .1
}

/// The expected prompt: its text chunks between injected positions.
fn expected_chunks(ids: &[u64]) -> Vec<String> {
    let mut chunks = vec![TASK.to_string()];
    for (k, id) in ids.iter().enumerate() {
        let last = chunks.last_mut().unwrap();
        if k > 0 {
            last.push_str("}, ");
        }
        last.push_str(&format!("{{Title: {}, Visual representation: ", title(*id)));
        chunks.push(String::new());
    }
    let last = chunks.last_mut().unwrap();
    last.push('}');
    last.push_str(CLOSE);
    chunks
}

#[test]
fn prompt_for_1_2_and_10_items_token_for_token() {
    let rec = open(Options::default());
    for n in [1, 2, 10] {
        let ids = with_image(n);
        let (segments, used, dropped) = rec.prompt(&ids).unwrap();
        assert_eq!((used.as_slice(), dropped), (ids.as_slice(), 0));
        let chunks = expected_chunks(&ids);
        let texts: Vec<&String> = segments
            .iter()
            .filter_map(|s| {
                if let Segment::Text(t) = s {
                    Some(t)
                } else {
                    None
                }
            })
            .collect();
        assert_eq!(texts, chunks.iter().collect::<Vec<_>>(), "{n} items: text");
        // Text, vector, text, vector, ..., text, [REC]: one injected position per item, then [REC].
        assert_eq!(segments.len(), 2 * n + 2);
        for (k, s) in segments.iter().enumerate() {
            assert_eq!(matches!(s, Segment::Vector(_)), k % 2 == 1, "segment {k}");
        }
        let Segment::Vector(rec_vec) = segments.last().unwrap() else {
            unreachable!()
        };
        assert_eq!(rec_vec, &rec.heads.rec_token);
        for (k, id) in ids.iter().enumerate() {
            let Segment::Vector(v) = &segments[2 * k + 1] else {
                unreachable!()
            };
            let feature = rec.banks[&illmrec::store::bank::Modality::Img]
                .row(*id)
                .unwrap()
                .to_f32();
            assert_eq!(
                v,
                &rec.heads.adaptor.as_ref().unwrap().forward(&feature),
                "item {k}: adaptor output injected as is"
            );
        }
        // Token for token: each chunk tokenized on its own, BOS only at the start.
        let model = rec.model();
        let pieces = tokenize(model, &segments).unwrap();
        let mut got = Vec::new();
        let mut want = Vec::new();
        for (k, (piece, seg)) in pieces.iter().zip(&segments).enumerate() {
            match (piece, seg) {
                (illmrec::recommender::Piece::Tokens(t), Segment::Text(text)) => {
                    got.extend(t.iter().map(|&t| Some(t)));
                    want.extend(model.tokenize(text, k == 0).unwrap().into_iter().map(Some));
                }
                _ => {
                    got.push(None);
                    want.push(None);
                }
            }
        }
        assert_eq!(got, want, "{n} items: tokens");
        assert_eq!(got[0], Some(2), "BOS first");
        assert_eq!(got.iter().filter(|t| **t == Some(2)).count(), 1, "one BOS");
        let rendered = render(&segments);
        assert!(rendered.ends_with("to be consumed: <REC>"), "{rendered}");
        println!("{n} items: {} positions", got.len());
    }
}

#[test]
fn missing_images_become_text_or_title() {
    let ids = bundle().1.clone();
    let missing = ids[2];
    let history = [ids[0], missing, ids[1]];
    let t = title(missing);
    let rec = open(Options::default());
    let text = render(&rec.prompt(&history).unwrap().0);
    assert!(
        text.contains(&format!("{{Title: {t}, Description: Genres: Drama}}")),
        "{text}"
    );
    assert_eq!(text.matches("<v>").count(), 2);
    let rec = open(Options {
        missing_image: MissingImage::Title,
        ..Options::default()
    });
    let text = render(&rec.prompt(&history).unwrap().0);
    assert!(
        text.contains(&format!("{{Title: {t}}}, {{Title: ")),
        "{text}"
    );
}

#[test]
fn truncation_keeps_the_newest_items() {
    let ids = bundle().1.clone();
    let history = &ids[..14];
    let rec = open(Options::default());
    let (_, used, dropped) = rec.prompt(history).unwrap();
    assert_eq!(
        used,
        history[4..].to_vec(),
        "--max-history 10 keeps the 10 newest"
    );
    assert_eq!(dropped, 0);

    let small = open(Options {
        context: illmrec::engine::ContextOptions {
            n_ctx: 200,
            ..Default::default()
        },
        ..Options::default()
    });
    let (_, used, dropped) = small.prompt(history).unwrap();
    assert!(
        dropped > 0 && !used.is_empty(),
        "a 200-position context cannot hold 10 items"
    );
    assert_eq!(
        used,
        history[4 + dropped..].to_vec(),
        "the oldest items are dropped first"
    );
}

#[test]
fn the_cached_prefix_is_shared_by_every_prompt() {
    let mut rec = open(Options::default());
    let (segments, _, _) = rec.prompt(&with_image(3)).unwrap();
    let pieces = tokenize(rec.model(), &segments).unwrap();
    let illmrec::recommender::Piece::Tokens(first) = &pieces[0] else {
        unreachable!()
    };
    let inputs: Vec<illmrec::engine::Input> = first
        .iter()
        .map(|&t| illmrec::engine::Input::Token(t))
        .collect();
    let ctx = rec.context();
    assert!(!ctx.prefix().is_empty());
    assert_eq!(ctx.shared_prefix_len(&inputs), ctx.prefix().len());
}

/// Context fitting (`prompt::fit`, about linear) gives what the scan it replaced gave: the first
/// start whose prompt fits, every earlier start too long. Checked on the real tokenizer with
/// images, descriptions in their place and titles only, and with the scan's own measure: the
/// prompt of `history[s..]` needs dropping for every `s` before the answer, and not after it.
#[test]
fn fitting_matches_a_scan_over_every_start() {
    let ids = bundle().1.clone();
    let mut history: Vec<u64> = ids.iter().rev().copied().collect();
    history.extend(&ids);
    for (missing, n_ctx) in [
        (MissingImage::Text, 400),
        (MissingImage::Title, 300),
        (MissingImage::Text, 1500),
    ] {
        let rec = open(Options {
            context: illmrec::engine::ContextOptions {
                n_ctx,
                ..Default::default()
            },
            max_history: history.len(),
            missing_image: missing,
            ..Options::default()
        });
        let task = &illmrec::method::prompt::template().task;
        let budget = n_ctx as usize - (rec.model().tokenize(task, true).unwrap().len() - 1);
        let (segments, used, dropped) = rec.prompt(&history).unwrap();
        assert!(dropped > 0, "{missing:?} {n_ctx}: nothing to fit");
        let positions: usize = tokenize(rec.model(), &segments)
            .unwrap()
            .iter()
            .map(|p| match p {
                illmrec::recommender::Piece::Tokens(t) => t.len(),
                illmrec::recommender::Piece::Vector(_) => 1,
            })
            .sum();
        assert!(positions <= budget, "{positions} > {budget}");
        assert_eq!(used, history[dropped..].to_vec());
        for s in 0..dropped {
            assert!(
                rec.prompt(&history[s..]).unwrap().2 > 0,
                "{missing:?} {n_ctx}: start {s} fits, but the fit chose {dropped}"
            );
        }
    }
}

/// `encode_prefixes` (one decode, a branch per prefix) gives every prefix the state a cold
/// `encode_user` gives it: the full history exactly (same batch shapes), the shorter prefixes
/// within llama.cpp's batch-shape noise; with items lacking an image among them too.
#[test]
fn prefix_branches_match_cold_prompts() {
    let mut rec = open(Options::default());
    let ids = bundle().1.clone();
    let history: Vec<u64> = ids[..8].to_vec(); // items 2 and 5 have no image
    let states = rec.encode_prefixes(&history).unwrap();
    assert_eq!(states.len(), history.len());
    for k in 1..=history.len() {
        let cold = rec.encode_user(&history[..k]).unwrap().hidden;
        let got = &states[k - 1];
        let dot: f32 = cold.iter().zip(got).map(|(a, b)| a * b).sum();
        let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        let cos = dot / (norm(&cold) * norm(got));
        if k == history.len() {
            // The same prompt, but its [REC] row shares a batch with the other branches'
            // (llama.cpp tiles multi-row batches differently): batch-shape noise only.
            assert!(cos > 0.995, "full history: cosine {cos}");
        } else {
            assert!(cos > 0.99, "prefix of {k} items: cosine {cos}");
        }
    }
    // More prefixes than one batch of branches holds.
    let long: Vec<u64> = ids[..20].to_vec();
    let mut opts = Options::default();
    opts.max_history = 20;
    let mut rec = open(opts);
    assert_eq!(rec.encode_prefixes(&long).unwrap().len(), 20);
    assert!(rec.encode_prefixes(&[]).is_err());
}
