//! `illmrec items add|remove|replace`: change one item of a bundle in place (atomically).

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use illmrec::bundle::edit::{edit, Edit, EditReport, NewItem};
use illmrec::images::ImageEncoder;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum ItemsCommand {
    /// Add an item (its image encoded by the runtime) to a bundle.
    Add(ItemArgs),
    /// Put a new title / description / genres / image in place of an item's.
    Replace(ItemArgs),
    /// Remove an item from a bundle.
    Remove {
        /// The bundle folder.
        #[arg(long, value_name = "DIR")]
        bundle: PathBuf,
        /// The item id.
        #[arg(long)]
        id: u64,
    },
}

#[derive(Args)]
pub struct ItemArgs {
    /// The bundle folder (changed in place: the new bundle is switched in in one step).
    #[arg(long, value_name = "DIR")]
    bundle: PathBuf,
    /// The item id.
    #[arg(long)]
    id: u64,
    /// Its title.
    #[arg(long)]
    title: String,
    /// Its description.
    #[arg(long)]
    description: Option<String>,
    /// Its genres, comma-separated.
    #[arg(long, value_delimiter = ',')]
    genres: Vec<String>,
    /// Its image (JPEG, PNG or WebP), encoded with the runtime's MobileNet.
    #[arg(long, value_name = "FILE")]
    image: Option<PathBuf>,
}

pub fn run(cmd: ItemsCommand) -> Result<()> {
    let (bundle, e) = match cmd {
        ItemsCommand::Add(a) => (a.bundle.clone(), Edit::Add(new_item(a)?)),
        ItemsCommand::Replace(a) => (a.bundle.clone(), Edit::Replace(new_item(a)?)),
        ItemsCommand::Remove { bundle, id } => (bundle, Edit::Remove(id)),
    };
    let t = std::time::Instant::now();
    let report = edit(&bundle, &e)?;
    print_report(&bundle, &e, &report, t.elapsed().as_secs_f64());
    Ok(())
}

fn new_item(a: ItemArgs) -> Result<NewItem> {
    let photo = match &a.image {
        Some(p) => {
            let bytes = std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
            let t = std::time::Instant::now();
            let row = ImageEncoder::new()?.encode_file(p)?;
            eprintln!(
                "encoded {} in {:.1} ms",
                p.display(),
                t.elapsed().as_secs_f64() * 1e3
            );
            // Stored in the bundle (`images/<id>.<ext>`), so that the kiosk shows it.
            Some((bytes, row))
        }
        None => None,
    };
    Ok(NewItem::new(a.id, a.title, a.description, a.genres, photo))
}

fn print_report(bundle: &std::path::Path, e: &Edit, r: &EditReport, seconds: f64) {
    for w in &r.warnings {
        super::messages::warning(w);
    }
    let verb = match e {
        Edit::Add(_) => "added",
        Edit::Replace(_) => "replaced",
        Edit::Remove(_) => "removed",
    };
    println!(
        "{verb} item {} in {} ({} items, {:.2} s; item vectors in {})",
        r.id,
        bundle.display(),
        r.catalog_len,
        seconds,
        r.cache.display()
    );
    if matches!(e, Edit::Remove(_)) {
        return;
    }
    let has: Vec<&str> = r.has.iter().map(|m| m.name()).collect();
    println!("item {} is scored on: {}", r.id, has.join(", "));
    for (m, why) in &r.lacks {
        println!("no {m} row: {why}");
    }
}
