//! The recommendation prompt, exactly as the reference builds it (its sections 1.3–1.5):
//!
//! `<task>{Title: A, Visual representation: [v_A]}, {Title: B, Visual representation: [v_B]}],
//! where each … (i.e.,{}). Please conduct … to be consumed: [REC]`
//!
//! where `[v_X]` is the adaptor output for item X's image feature and `[REC]` the learned vector,
//! each one injected position. The strings live in `prompt.json`, shared with the Python tools.

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
        serde_json::from_str(include_str!("prompt.json")).expect("src/prompt.json is valid")
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
