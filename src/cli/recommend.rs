//! `illmrec recommend`: top-k items for one history.

use super::{messages, parse_ids, HistoryArgs};
use anyhow::{ensure, Result};
use clap::Args;
use std::collections::HashSet;

#[derive(Args)]
pub struct RecommendArgs {
    #[command(flatten)]
    user: HistoryArgs,
    /// How many items to return.
    #[arg(long, default_value_t = 10)]
    top_k: usize,
    /// Rank only these items (comma-separated ids) instead of the whole catalog.
    #[arg(long, value_name = "ID,ID,...")]
    candidates: Option<String>,
    /// Allow items of the history in the results.
    #[arg(long)]
    include_seen: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(a: RecommendArgs) -> Result<()> {
    let history = a.user.ids()?;
    ensure!(
        !history.is_empty(),
        "--history is empty: give at least one item id"
    );
    let candidates = a
        .candidates
        .as_deref()
        .map(|c| parse_ids(c, "--candidates"))
        .transpose()?;
    ensure!(
        candidates.as_ref().is_none_or(|c| !c.is_empty()),
        "--candidates is empty: give at least one item id, or leave it out to rank the whole catalog"
    );
    ensure!(a.top_k >= 1, "--top-k must be at least 1");
    let mut rec = a.user.bundle.open()?;
    for id in history.iter().chain(candidates.iter().flatten()) {
        rec.catalog.item(*id)?;
    }
    let user = rec.encode_user(&history)?;
    if user.dropped_for_context > 0 {
        messages::warning(format_args!(
            "dropped the {} oldest history items so that the prompt fits the context",
            user.dropped_for_context
        ));
    }
    let exclude: HashSet<u64> = if a.include_seen {
        HashSet::new()
    } else {
        history.iter().copied().collect()
    };
    if let Some(c) = &candidates {
        for id in rec.unscorable(c) {
            messages::warning(format_args!(
                "candidate {id} has no feature in a scored modality: it cannot be ranked and is left out"
            ));
        }
    }
    let top = rec.top_k(&user, a.top_k, candidates.as_deref(), &exclude)?;
    let cfg = &rec.heads.config;
    if !cfg.trained {
        messages::untrained(&cfg.provenance);
    }
    if a.json {
        let items = rec.ranked(&top);
        let out = serde_json::json!({
            "history": history,
            "history_used": user.used,
            "prompt_positions": user.prompt_positions,
            "trained": cfg.trained,
            "items": items,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "History ({} items in the prompt, {} positions):",
        user.used.len(),
        user.prompt_positions
    );
    for id in &user.used {
        println!("  {:>8}  {}", id, rec.catalog.item(*id)?.title());
    }
    println!("\n{:>4}  {:>8}  {:>10}  title", "rank", "id", "score");
    for (r, s) in top.iter().enumerate() {
        println!(
            "{:>4}  {:>8}  {:>10.4}  {}",
            r + 1,
            s.id,
            s.score,
            rec.catalog.item(s.id)?.title()
        );
    }
    Ok(())
}
