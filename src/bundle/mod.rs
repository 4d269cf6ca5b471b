//! A bundle: one folder with everything a deployment needs, described by `manifest.json`.
//!
//! ```text
//! bundle/
//!   manifest.json        sizes and sha256 of every file; the model's path, size, sha256, n_embd, architecture
//!   heads.safetensors    adaptor, [REC], retrieval heads (reference key names)
//!   heads.json           their config (dims, modalities, prompt style, provenance)
//!   items.jsonl          id, title, optional description
//!   img.bank, cf.bank, text.bank   one feature bank per modality present
//! ```
//!
//! The model is pointed to, not copied: `model.path` is relative to the bundle folder, or absent
//! for the default model (see [`default_model_path`]).

mod create;
pub mod edit;

pub use create::{create, update, BundleSpec};

use crate::engine::GgufInfo;
use crate::store::bank::{Bank, Modality};
use crate::store::fsutil::{check_regular, hex, sha256_file};
use crate::store::verified::Stamps;
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const MANIFEST: &str = "manifest.json";
/// The lock file inside a bundle folder: every writer of the bundle ([`create`] into an existing
/// folder, [`update`], the item edits of [`edit`], on the command line or in the kiosk) holds its
/// exclusive lock from reading the bundle to switching the new one in, so concurrent edits
/// queue and none is lost. Readers take no lock: they see the old bundle or the new one.
pub const LOCK: &str = ".illmrec.lock";

/// A held bundle lock (see [`LOCK`]); released when dropped.
pub struct BundleLock {
    _file: std::fs::File,
    dir: PathBuf,
}

impl BundleLock {
    /// The bundle folder this lock is for.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Takes the exclusive lock of the bundle folder `dir`, waiting while another writer holds it.
/// The lock file is kept in the folder (and carried into each new version of it, as a hard link
/// to the same file, so a writer waiting on the old folder's lock and one arriving after the
/// switch wait on the same lock).
pub fn lock(dir: &Path) -> Result<BundleLock> {
    let meta = std::fs::metadata(dir)
        .with_context(|| format!("{} is not a bundle: it does not exist", dir.display()))?;
    ensure!(meta.is_dir(), "{} is not a folder", dir.display());
    let file = crate::store::fsutil::lock_path(&dir.join(LOCK), true)?
        .expect("a waiting lock is always taken");
    Ok(BundleLock {
        _file: file,
        dir: dir.to_path_buf(),
    })
}
/// File name of the default model inside `models/`: Gemma 3 270M, the Q4_K_M release dequantized to
/// f32 by `illmrec quantize` (`models/fetch-default-model.sh` makes it). On CPUs it is as fast as
/// Q4_K_M for this small model and, unlike Q4_K_M, its scores do not move with the batch split.
pub const DEFAULT_MODEL_FILE: &str = "gemma-3-270m-f32.gguf";
pub const DEFAULT_MODEL_SHA256: &str =
    "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818";

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Manifest {
    /// Always "illmrec-bundle".
    pub format: String,
    pub version: u32,
    pub model: ModelRef,
    pub heads: String,
    pub heads_config: String,
    pub items: String,
    /// Bank file per modality name ("img", "cf", "text").
    pub banks: BTreeMap<String, String>,
    /// Every file of the bundle folder with its size and sha256.
    pub files: Vec<FileEntry>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ModelRef {
    /// Relative to the bundle folder; absent means the default model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    pub size: u64,
    pub sha256: String,
    pub n_embd: usize,
    pub architecture: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct FileEntry {
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

/// An opened bundle: its manifest and resolved paths.
pub struct Bundle {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Manifest {
    /// Parses and checks `manifest.json` bytes: format, version, and that every bundle file is
    /// a plain name inside the bundle folder (no absolute path, no `..`), listed in `files`.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let manifest: Manifest = serde_json::from_slice(bytes)?;
        ensure!(
            manifest.format == "illmrec-bundle",
            "format is '{}', expected 'illmrec-bundle'",
            manifest.format
        );
        ensure!(
            manifest.version == 1,
            "bundle version {} is not supported (expected 1)",
            manifest.version
        );
        for entry in &manifest.files {
            let p = Path::new(&entry.path);
            ensure!(
                !entry.path.is_empty()
                    && p.components()
                        .all(|c| matches!(c, std::path::Component::Normal(_))),
                "file '{}' is not a name inside the bundle folder",
                entry.path
            );
            ensure!(
                entry.sha256.len() == 64 && entry.sha256.bytes().all(|b| b.is_ascii_hexdigit()),
                "file '{}' has no valid sha256",
                entry.path
            );
            ensure!(
                manifest
                    .files
                    .iter()
                    .filter(|f| f.path == entry.path)
                    .count()
                    == 1,
                "file '{}' is listed more than once",
                entry.path
            );
        }
        for name in [&manifest.heads, &manifest.heads_config, &manifest.items]
            .into_iter()
            .chain(manifest.banks.values())
        {
            ensure!(
                manifest.files.iter().any(|f| &f.path == name),
                "{name} is not listed in files"
            );
        }
        for m in manifest.banks.keys() {
            Modality::parse(m)?;
        }
        Ok(manifest)
    }

    /// The manifest entry of a bundle file.
    pub fn entry(&self, name: &str) -> Result<&FileEntry> {
        self.files
            .iter()
            .find(|f| f.path == name)
            .with_context(|| format!("{name} is not listed in the manifest"))
    }
}

impl Bundle {
    /// Reads the manifest and checks that every listed file exists, is a regular file and has
    /// its recorded size (cheap; hashes are checked by [`Bundle::read_verified`] for what a
    /// recommender reads, and by [`Bundle::verify`] for everything).
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST);
        let bytes = crate::store::fsutil::read_regular(&path).with_context(|| {
            format!(
                "{} is not a bundle: cannot read {}",
                dir.display(),
                path.display()
            )
        })?;
        let manifest = Manifest::parse(&bytes)
            .with_context(|| format!("bundle manifest {} is not valid", path.display()))?;
        let bundle = Self {
            dir: dir.to_path_buf(),
            manifest,
        };
        for entry in &bundle.manifest.files {
            let p = bundle.file(&entry.path);
            let meta = std::fs::metadata(&p)
                .with_context(|| format!("bundle file {} is missing", p.display()))?;
            check_regular(&p)?;
            ensure!(
                meta.len() == entry.size,
                "bundle file {} is {} bytes, the manifest says {} (modified or truncated; run `illmrec bundle verify`)",
                p.display(),
                meta.len(),
                entry.size
            );
        }
        Ok(bundle)
    }

    /// Reads a bundle file whole and checks it against the manifest's sha256.
    pub fn read_verified(&self, name: &str) -> Result<Vec<u8>> {
        let entry = self.manifest.entry(name)?;
        let p = self.file(name);
        let bytes = crate::store::fsutil::read_regular(&p)?;
        self.check_digest(name, &Sha256::digest(&bytes))?;
        debug_assert_eq!(bytes.len() as u64, entry.size);
        Ok(bytes)
    }

    /// Compares a file's sha256 with the manifest's.
    pub fn check_digest(&self, name: &str, digest: &[u8]) -> Result<()> {
        let entry = self.manifest.entry(name)?;
        ensure!(
            hex(digest) == entry.sha256,
            "bundle file {} does not match its sha256 in the manifest (modified or corrupt; run `illmrec bundle verify`)",
            self.file(name).display()
        );
        Ok(())
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Opens every bank the manifest lists, each checked against its modality, its manifest
    /// sha256 and for finite values; returns the banks and their digests by modality. With
    /// `stamps`, the whole-file checks run once per file version (see [`crate::store::verified`]): a
    /// bank whose stamp matches costs a header read, whatever its size.
    pub fn open_banks(
        &self,
        stamps: Option<&Stamps>,
    ) -> Result<(BTreeMap<Modality, Bank>, BTreeMap<Modality, [u8; 32]>)> {
        let mut banks = BTreeMap::new();
        let mut digests = BTreeMap::new();
        for (name, file) in &self.manifest.banks {
            let modality = Modality::parse(name)?;
            let path = self.file(file);
            let bank = Bank::open(&path)?;
            ensure!(
                bank.modality == modality,
                "bank {} holds {} features but the manifest lists it as {modality}",
                path.display(),
                bank.modality
            );
            let entry = self.manifest.entry(file)?;
            let digest: [u8; 32] = unhex(&entry.sha256)
                .and_then(|d| d.try_into().ok())
                .with_context(|| format!("the manifest's sha256 of {file} is not 64 hex digits"))?;
            // The tag names both checks, so a stamp of another kind of check never stands in.
            let tag = [b"bank sha256+finite ".as_slice(), &digest].concat();
            Stamps::check_once(stamps, &path, &tag, || {
                self.check_digest(file, &bank.file_sha256())?;
                bank.check_contents()
            })?;
            banks.insert(modality, bank);
            digests.insert(modality, digest);
        }
        Ok((banks, digests))
    }

    pub fn bank_paths(&self) -> Result<BTreeMap<Modality, PathBuf>> {
        self.manifest
            .banks
            .iter()
            .map(|(m, f)| Ok((Modality::parse(m)?, self.file(f))))
            .collect()
    }

    /// The model file: `explicit` if given, else the manifest's path, else the default model.
    pub fn model_path(&self, explicit: Option<&Path>) -> Result<PathBuf> {
        if let Some(p) = explicit {
            return Ok(p.to_path_buf());
        }
        match &self.manifest.model.path {
            Some(p) => Ok(self.dir.join(p)),
            None => default_model_path(),
        }
    }

    /// Checks the model file against the manifest's size, n_embd and architecture (cheap).
    pub fn check_model(&self, path: &Path, info: &GgufInfo) -> Result<()> {
        let m = &self.manifest.model;
        ensure!(
            info.n_embd == m.n_embd,
            "model {} has n_embd {}, but the bundle was built for n_embd {} ({})",
            path.display(),
            info.n_embd,
            m.n_embd,
            m.architecture
        );
        if info.architecture != m.architecture {
            bail!(
                "model {} is a '{}' model, the bundle expects '{}'",
                path.display(),
                info.architecture,
                m.architecture
            );
        }
        Ok(())
    }

    /// Recomputes the sha256 of every file and of the model; returns one line per checked file.
    pub fn verify(&self, model_override: Option<&Path>) -> Result<Vec<String>> {
        let mut report = Vec::new();
        let mut bad = Vec::new();
        for entry in &self.manifest.files {
            let p = self.file(&entry.path);
            let actual = sha256_file(&p)?;
            if actual == entry.sha256 {
                report.push(format!("ok        {}", entry.path));
            } else {
                report.push(format!(
                    "MISMATCH  {} (sha256 {actual}, manifest {})",
                    entry.path, entry.sha256
                ));
                bad.push(entry.path.clone());
            }
        }
        for (m, p) in self.bank_paths()? {
            let bank = Bank::open(&p)?;
            ensure!(
                bank.modality == m,
                "bank {} holds {} features but is listed as {m}",
                p.display(),
                bank.modality
            );
            if let Err(e) = bank.verify() {
                report.push(format!("CORRUPT   {}: {e}", p.display()));
                bad.push(p.display().to_string());
            }
        }
        let model = self.model_path(model_override)?;
        let actual = sha256_file(&model)?;
        if actual == self.manifest.model.sha256 {
            report.push(format!("ok        model {}", model.display()));
        } else {
            report.push(format!(
                "MISMATCH  model {} (sha256 {actual}, manifest {})",
                model.display(),
                self.manifest.model.sha256
            ));
            bad.push(model.display().to_string());
        }
        if !bad.is_empty() {
            bail!(
                "{}\nbundle {} failed verification: {}",
                report.join("\n"),
                self.dir.display(),
                bad.join(", ")
            );
        }
        Ok(report)
    }
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    (s.len().is_multiple_of(2) && s.is_ascii())
        .then(|| {
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
                .collect()
        })
        .flatten()
}

/// Where the default model lives: `$ILLMREC_MODEL`, else `models/gemma-3-270m-f32.gguf` in the
/// current folder or in the source checkout this binary was built from.
pub fn default_model_path() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("ILLMREC_MODEL") {
        return Ok(PathBuf::from(p));
    }
    let candidates = [
        PathBuf::from("models").join(DEFAULT_MODEL_FILE),
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models")
            .join(DEFAULT_MODEL_FILE),
    ];
    candidates.iter().find(|p| p.is_file()).cloned().with_context(|| {
        format!(
            "no model given and the default model is missing: run models/fetch-default-model.sh, set ILLMREC_MODEL or pass --model (looked for {})",
            candidates[1].display()
        )
    })
}
