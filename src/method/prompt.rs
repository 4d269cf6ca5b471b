//! The recommendation prompt, exactly as the reference builds it (its sections 1.3–1.5):
//!
//! `<task>{Title: A, Visual representation: [v_A]}, {Title: B, Visual representation: [v_B]}],
//! where each … (i.e.,{}). Please conduct … to be consumed: [REC]`
//!
//! where `[v_X]` is the adaptor output for item X's image feature and `[REC]` the learned vector,
//! each one injected position. The strings live in `prompt.json`, shared with the Python tools.
//!
//! [`fit`] chooses how many of the oldest items to drop so that the prompt fits the context,
//! with a token counter passed in (so it is tested without a model).

use serde::{Deserialize, Serialize};
use std::sync::OnceLock;

/// The fixed strings of the prompt.
#[derive(Deserialize, Debug)]
pub struct Template {
    pub task: String,
    pub item_open: String,
    pub item_visual: String,
    pub item_description: String,
    pub item_close: String,
    pub item_separator: String,
    pub list_close: String,
    pub closing: String,
    pub instruction: String,
    pub unknown_title: String,
}

pub fn template() -> &'static Template {
    static T: OnceLock<Template> = OnceLock::new();
    T.get_or_init(|| {
        serde_json::from_str(include_str!("../prompt.json")).expect("src/prompt.json is valid")
    })
}

/// How each history item is written into the prompt (the checkpoint decides).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PromptStyle {
    /// I-LLMRec: title plus one injected visual token.
    #[default]
    Image,
    /// Title only (attribute-based, TALLRec-style).
    Title,
    /// Title plus description text (TRSR-style).
    Description,
}

/// What stands for an item in the prompt besides its title.
#[derive(Clone, Debug, PartialEq)]
pub enum ItemBody {
    /// The adaptor's output for the item's image feature, injected as one position.
    Visual(Vec<f32>),
    /// Text written in place of the visual token (description, or fallback for a missing image).
    Description(String),
    /// Nothing but the title.
    TitleOnly,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PromptItem {
    pub title: String,
    pub body: ItemBody,
}

/// A prompt as alternating text and injected vectors, ending with the `[REC]` vector.
#[derive(Clone, Debug, PartialEq)]
pub enum Segment {
    Text(String),
    Vector(Vec<f32>),
}

/// Builds the segments for `items` (oldest first), closing with `rec_token`.
pub fn build(items: &[PromptItem], rec_token: &[f32]) -> Vec<Segment> {
    let t = template();
    let mut segments = Vec::new();
    let mut text = t.task.clone();
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            text.push_str(&t.item_separator);
        }
        text.push_str(&t.item_open);
        text.push_str(if item.title.is_empty() {
            &t.unknown_title
        } else {
            &item.title
        });
        match &item.body {
            ItemBody::Visual(v) => {
                text.push_str(&t.item_visual);
                segments.push(Segment::Text(std::mem::take(&mut text)));
                segments.push(Segment::Vector(v.clone()));
            }
            ItemBody::Description(d) => {
                text.push_str(&t.item_description);
                text.push_str(d);
            }
            ItemBody::TitleOnly => {}
        }
        text.push_str(&t.item_close);
    }
    text.push_str(&t.list_close);
    text.push_str(&t.closing);
    text.push_str(&t.instruction);
    segments.push(Segment::Text(text));
    segments.push(Segment::Vector(rec_token.to_vec()));
    segments
}

/// Positions of a prompt: each text segment tokenized on its own (`count(text, bos)`, BOS on
/// the first segment only) plus one per injected vector.
pub fn positions(
    segments: &[Segment],
    count: &mut dyn FnMut(&str, bool) -> anyhow::Result<usize>,
) -> anyhow::Result<usize> {
    let mut n = 0;
    for (i, s) in segments.iter().enumerate() {
        n += match s {
            Segment::Text(t) => count(t, i == 0)?,
            Segment::Vector(_) => 1,
        };
    }
    Ok(n)
}

/// The smallest `start` such that the prompt for `items[start..]` has at most `budget`
/// positions, or `None` when not even the newest item alone fits. The answer is the one a scan
/// `start = 0, 1, 2, …` with a full count each would give, in about linear time:
///
/// 1. the whole prompt is counted; if it fits, `start` is 0;
/// 2. otherwise each item's text is counted once on its own, and the suffix sums of those counts
///    give an estimate of every `start`'s length (exact up to tokens merging across an item's
///    boundary), whose first fitting `start` is taken;
/// 3. from there, exact counts step to the first `start` that fits and whose predecessor does
///    not — each of them costs one prompt no longer than about `budget`.
///
/// Step 3 returns the scan's answer whenever dropping an item never lengthens the prompt, which
/// holds for any tokenizer whose merges cannot turn a removed `{Title: …}, ` into a gain.
pub fn fit(
    items: &[PromptItem],
    rec_token: &[f32],
    budget: usize,
    count: &mut dyn FnMut(&str, bool) -> anyhow::Result<usize>,
) -> anyhow::Result<Option<usize>> {
    let n = items.len();
    let exact = |start: usize, count: &mut dyn FnMut(&str, bool) -> anyhow::Result<usize>| {
        positions(&build(&items[start..], rec_token), count)
    };
    if n == 0 || exact(0, count)? <= budget {
        return Ok((n > 0).then_some(0));
    }
    // Estimates: the prompt without items, plus each item's own text and vector.
    let fixed = positions(&build(&[], rec_token), count)?;
    let t = template();
    let mut own = Vec::with_capacity(n);
    for (k, item) in items.iter().enumerate() {
        let mut text = String::new();
        if k > 0 {
            text.push_str(&t.item_separator);
        }
        text.push_str(&item_text(item));
        let vector = matches!(item.body, ItemBody::Visual(_)) as usize;
        own.push(count(&text, false)? + vector);
    }
    let mut suffix = fixed;
    let mut start = n;
    for k in (0..n).rev() {
        suffix += own[k];
        if suffix > budget {
            break;
        }
        start = k;
    }
    let mut start = start.min(n - 1);
    if exact(start, count)? <= budget {
        while start > 0 && exact(start - 1, count)? <= budget {
            start -= 1;
        }
        return Ok(Some(start));
    }
    loop {
        start += 1;
        if start == n {
            return Ok(None);
        }
        if exact(start, count)? <= budget {
            return Ok(Some(start));
        }
    }
}

/// An item's text as the prompt writes it, without the separator (a visual item's vector
/// position left out).
fn item_text(item: &PromptItem) -> String {
    let t = template();
    let mut text = t.item_open.clone();
    text.push_str(if item.title.is_empty() {
        &t.unknown_title
    } else {
        &item.title
    });
    match &item.body {
        ItemBody::Visual(_) => text.push_str(&t.item_visual),
        ItemBody::Description(d) => {
            text.push_str(&t.item_description);
            text.push_str(d);
        }
        ItemBody::TitleOnly => {}
    }
    text.push_str(&t.item_close);
    text
}

/// The prompt as one string with `<v>` and `<REC>` marking the injected positions (for display
/// and for comparing with the Python tools).
pub fn render(segments: &[Segment]) -> String {
    let n = segments.len();
    segments
        .iter()
        .enumerate()
        .map(|(i, s)| match s {
            Segment::Text(t) => t.clone(),
            Segment::Vector(_) if i + 1 == n => "<REC>".to_string(),
            Segment::Vector(_) => "<v>".to_string(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy tokenizer with merges across boundaries: words and punctuation runs are tokens,
    /// "}, {" is a single token, and a long word costs one token per 4 characters.
    fn toy(text: &str, bos: bool) -> anyhow::Result<usize> {
        let text = text.replace("}, {", " \u{1} ");
        let mut n = bos as usize;
        for word in text.split_whitespace() {
            n += word.len().div_ceil(4).max(1);
        }
        Ok(n)
    }

    /// The scan `fit` stands for: every start, a full count each.
    fn scan(items: &[PromptItem], budget: usize) -> Option<usize> {
        (0..items.len())
            .find(|&s| positions(&build(&items[s..], &[0.0]), &mut toy).unwrap() <= budget)
    }

    fn items(n: usize, seed: u64) -> Vec<PromptItem> {
        let mut x = seed;
        (0..n)
            .map(|i| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let words = 1 + (x >> 60) as usize;
                let title = (0..words)
                    .map(|w| format!("w{i}x{w}"))
                    .collect::<Vec<_>>()
                    .join(" ");
                let body = match (x >> 40) % 3 {
                    0 => ItemBody::Visual(vec![0.0]),
                    1 => ItemBody::Description(format!("about item {i} longwordlongword")),
                    _ => ItemBody::TitleOnly,
                };
                PromptItem {
                    title: if (x >> 30).is_multiple_of(7) {
                        String::new()
                    } else {
                        title
                    },
                    body,
                }
            })
            .collect()
    }

    #[test]
    fn fit_gives_the_scans_answer() {
        for seed in 0..20 {
            for n in [1, 2, 5, 40, 200] {
                let items = items(n, seed);
                let full = positions(&build(&items, &[0.0]), &mut toy).unwrap();
                for budget in [0, 10, 60, 61, 100, 333, full - 1, full, full + 5] {
                    let got = fit(&items, &[0.0], budget, &mut toy).unwrap();
                    assert_eq!(
                        got,
                        scan(&items, budget),
                        "seed {seed}, {n} items, budget {budget}"
                    );
                }
            }
        }
    }

    #[test]
    fn fit_counts_about_linearly() {
        let items = items(2000, 3);
        let mut tokens_counted = 0usize;
        let mut counting = |t: &str, bos: bool| {
            tokens_counted += t.len();
            toy(t, bos)
        };
        let start = fit(&items, &[0.0], 500, &mut counting).unwrap().unwrap();
        assert!(start > 1500, "{start}");
        let whole: usize = render(&build(&items, &[0.0])).len();
        // The scan would count about 2000 × whole / 2 bytes.
        assert!(
            tokens_counted < 8 * whole,
            "{tokens_counted} bytes counted, prompt {whole}"
        );
    }
}
