//! `illmrec prompt`: shows the exact prompt for a history: text, token ids and the positions of
//! injected vectors. The Python tools compare their prompts against this.

use super::HistoryArgs;
use anyhow::Result;
use clap::Args;
use illmrec::method::prompt::render;
use illmrec::recommender::{tokenize, Piece};

#[derive(Args)]
pub struct PromptArgs {
    #[command(flatten)]
    user: HistoryArgs,
    /// Print JSON: {"text", "tokens" (null at injected positions), "history_used", "dropped"}.
    #[arg(long)]
    json: bool,
}

pub fn run(a: PromptArgs) -> Result<()> {
    let history = a.user.ids()?;
    let rec = a.user.bundle.open()?;
    let (segments, used, dropped) = rec.prompt(&history)?;
    let pieces = tokenize(rec.model(), &segments)?;
    let tokens: Vec<Option<i32>> = pieces
        .iter()
        .flat_map(|p| match p {
            Piece::Tokens(t) => t.iter().map(|&t| Some(t)).collect::<Vec<_>>(),
            Piece::Vector(_) => vec![None],
        })
        .collect();
    let text = render(&segments);
    if a.json {
        let out = serde_json::json!({"text": text, "tokens": tokens, "history_used": used, "dropped": dropped});
        println!("{out}");
    } else {
        println!("{text}");
        let injected = tokens.iter().filter(|t| t.is_none()).count();
        println!(
            "\n{} positions: {} tokens, {injected} injected vectors",
            tokens.len(),
            tokens.len() - injected
        );
    }
    Ok(())
}
