//! `illmrec bundle create|verify`.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use illmrec::bundle::{self, Bundle, BundleSpec};
use illmrec::store::bank::Modality;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum BundleCommand {
    /// Assemble a bundle folder from heads, items and banks.
    Create(CreateArgs),
    /// Check the sha256 of every file of a bundle, and of its model.
    Verify {
        /// The bundle folder.
        dir: PathBuf,
        /// Check this model instead of the bundle's.
        #[arg(long)]
        model: Option<PathBuf>,
    },
}

#[derive(Args)]
pub struct CreateArgs {
    /// Output bundle folder.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Heads weights (.safetensors).
    #[arg(long, value_name = "FILE")]
    heads: PathBuf,
    /// Heads config (heads.json).
    #[arg(long, value_name = "FILE")]
    heads_config: PathBuf,
    /// items.jsonl.
    #[arg(long, value_name = "FILE")]
    items: PathBuf,
    /// A bank per modality, as MODALITY=FILE (repeatable).
    #[arg(long = "bank", value_name = "MODALITY=FILE")]
    banks: Vec<String>,
    /// The GGUF model the bundle points to (its path is stored relative to the bundle)
    /// [default: the default model, stored without a path].
    #[arg(long, value_name = "FILE")]
    model: Option<PathBuf>,
}

pub fn run(cmd: BundleCommand) -> Result<()> {
    match cmd {
        BundleCommand::Create(a) => create(a),
        BundleCommand::Verify { dir, model } => {
            let b = Bundle::open(&dir)?;
            for line in b.verify(model.as_deref())? {
                println!("{line}");
            }
            println!("bundle {} verified", dir.display());
            Ok(())
        }
    }
}

fn create(a: CreateArgs) -> Result<()> {
    let banks = a
        .banks
        .iter()
        .map(|s| {
            let (m, p) = s
                .split_once('=')
                .with_context(|| format!("--bank {s}: expected MODALITY=FILE"))?;
            Ok((Modality::parse(m)?, std::path::Path::new(p)))
        })
        .collect::<Result<Vec<_>>>()?;
    let (model, model_is_default) = match &a.model {
        Some(p) => (p.clone(), false),
        None => (bundle::default_model_path()?, true),
    };
    let spec = BundleSpec {
        heads: &a.heads,
        heads_config: &a.heads_config,
        items: &a.items,
        banks,
        model: &model,
        model_is_default,
    };
    let manifest = bundle::create(&a.out, &spec)?;
    println!(
        "wrote bundle {} ({} files; model {} n_embd {})",
        a.out.display(),
        manifest.files.len(),
        manifest.model.architecture,
        manifest.model.n_embd
    );
    Ok(())
}
