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

use crate::bank::{Bank, Modality};
use crate::fsutil::{check_regular, hex, replace_dir, sha256_file};
use crate::llm::GgufInfo;
use crate::verified::Stamps;
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const MANIFEST: &str = "manifest.json";
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
        let bytes = crate::fsutil::read_regular(&path).with_context(|| {
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
        let bytes = crate::fsutil::read_regular(&p)?;
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
    /// `stamps`, the whole-file checks run once per file version (see [`crate::verified`]): a
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

/// What goes into a new bundle.
pub struct BundleSpec<'a> {
    pub heads: &'a Path,
    pub heads_config: &'a Path,
    pub items: &'a Path,
    pub banks: Vec<(Modality, &'a Path)>,
    /// The model to record; `model_is_default` leaves its path out of the manifest.
    pub model: &'a Path,
    pub model_is_default: bool,
}

/// Creates (or replaces) a bundle folder. The new bundle is assembled in a folder beside `dir`
/// (every file checked, written and fsynced, the manifest last) and then switched in place of
/// the old one in one step (see [`replace_dir`]), so a crash or kill at any point leaves either
/// the old bundle, usable, or the new one, complete. Files of the old folder that are not the
/// old bundle's (a licence, a model the bundle points to, the item-vector cache) are carried
/// over; a folder that is not a bundle is only replaced when it holds no sub-folder.
pub fn create(dir: &Path, spec: &BundleSpec<'_>) -> Result<Manifest> {
    // Write through a symlinked bundle folder to its target.
    let dir = match std::fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_symlink() => dir
            .canonicalize()
            .with_context(|| format!("cannot follow {}", dir.display()))?,
        _ => dir.to_path_buf(),
    };
    if let Ok(m) = std::fs::metadata(&dir) {
        ensure!(
            m.is_dir(),
            "{} exists and is not a folder: refusing to replace it",
            dir.display()
        );
    }
    let info = GgufInfo::read(spec.model)?;
    // The small inputs are read and checked before anything is written; banks are copied into
    // the new folder and checked there (so what is checked is what is shipped).
    let read = |src: &Path| {
        crate::fsutil::read_regular(src).with_context(|| format!("cannot read {}", src.display()))
    };
    let heads_bytes = read(spec.heads)?;
    let config_bytes = read(spec.heads_config)?;
    crate::heads::Heads::from_bytes(&heads_bytes, spec.heads, &config_bytes, spec.heads_config)?;
    let items_bytes = read(spec.items)?;
    crate::catalog::Catalog::parse(&items_bytes, spec.items)?;
    let small = [
        ("heads.safetensors", &heads_bytes),
        ("heads.json", &config_bytes),
        ("items.jsonl", &items_bytes),
    ];
    let mut banks = BTreeMap::new();
    for (m, path) in &spec.banks {
        crate::fsutil::check_regular(path)?;
        ensure!(
            banks
                .insert(m.name().to_string(), format!("{m}.bank"))
                .is_none(),
            "--bank {m} is given twice"
        );
    }
    let model_path = if spec.model_is_default {
        None
    } else {
        Some(relative_path(&absolute_folder(&dir)?, spec.model)?)
    };
    let model = ModelRef {
        path: model_path,
        size: std::fs::metadata(spec.model)?.len(),
        sha256: sha256_file(spec.model)?,
        n_embd: info.n_embd,
        architecture: info.architecture,
    };
    // What of the old folder is not ours to drop.
    let ours: Vec<String> = match Bundle::open(&dir) {
        Ok(old) => old.manifest.files.into_iter().map(|f| f.path).collect(),
        Err(_) => {
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for e in entries.flatten() {
                    ensure!(
                        !e.file_type()?.is_dir() || e.file_name() == "cache",
                        "{} exists, is not a bundle and holds the folder {}: refusing to replace it",
                        dir.display(),
                        e.path().display()
                    );
                }
            }
            Vec::new()
        }
    };
    let mut manifest = None;
    replace_dir(&dir, |tmp| {
        let mut files = Vec::new();
        for (name, bytes) in small {
            write_synced(&tmp.join(name), bytes)?;
            files.push(FileEntry {
                path: name.to_string(),
                size: bytes.len() as u64,
                sha256: hex(&Sha256::digest(bytes)),
            });
        }
        for (m, src) in &spec.banks {
            let name = format!("{m}.bank");
            let dst = tmp.join(&name);
            copy_synced(src, &dst)?;
            let bank = Bank::open(&dst).with_context(|| format!("bank {}", src.display()))?;
            ensure!(
                bank.modality == *m,
                "bank {} holds {} features, not {m}",
                src.display(),
                bank.modality
            );
            bank.verify()
                .with_context(|| format!("bank {}", src.display()))?;
            files.push(FileEntry {
                path: name,
                size: bank.header.file_len,
                sha256: hex(&bank.file_sha256()),
            });
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let new = files.iter().any(|f| f.path == name);
                if name == MANIFEST || new || ours.contains(&name) || name.contains(".tmp-") {
                    continue;
                }
                carry(&e.path(), &tmp.join(&name))?;
            }
        }
        let m = Manifest {
            format: "illmrec-bundle".into(),
            version: 1,
            model: model.clone(),
            heads: "heads.safetensors".into(),
            heads_config: "heads.json".into(),
            items: "items.jsonl".into(),
            banks: banks.clone(),
            files,
        };
        write_synced(
            &tmp.join(MANIFEST),
            serde_json::to_string_pretty(&m)?.as_bytes(),
        )?;
        manifest = Some(m);
        Ok(())
    })?;
    Ok(manifest.expect("replace_dir ran the build"))
}

/// Changes some files of an existing bundle, as [`create`] does: the new bundle is assembled
/// beside the old one (the changed files written and fsynced, every other file of the old folder
/// hard-linked or copied over, then `extra` runs on the new folder, the manifest last) and
/// switched in place of the old one in one step, so a kill at any point leaves the old bundle,
/// usable, or the new one, complete. `changed` names manifest files and their new bytes; the
/// manifest's entries for them are updated, the model reference is kept as it is.
pub fn update(
    dir: &Path,
    changed: &[(String, Vec<u8>)],
    extra: impl FnOnce(&Path) -> Result<()>,
) -> Result<Manifest> {
    let old = Bundle::open(dir)?;
    for (name, _) in changed {
        old.manifest.entry(name)?;
    }
    let dir = match std::fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_symlink() => dir
            .canonicalize()
            .with_context(|| format!("cannot follow {}", dir.display()))?,
        _ => dir.to_path_buf(),
    };
    let mut manifest = old.manifest.clone();
    for entry in manifest.files.iter_mut() {
        if let Some((_, bytes)) = changed.iter().find(|(n, _)| *n == entry.path) {
            entry.size = bytes.len() as u64;
            entry.sha256 = hex(&Sha256::digest(bytes));
        }
    }
    replace_dir(&dir, |tmp| {
        for (name, bytes) in changed {
            write_synced(&tmp.join(name), bytes)?;
        }
        for e in std::fs::read_dir(&dir)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name == MANIFEST || name.contains(".tmp-") || changed.iter().any(|(n, _)| *n == name)
            {
                continue;
            }
            carry(&e.path(), &tmp.join(&name))?;
        }
        extra(tmp)?;
        write_synced(
            &tmp.join(MANIFEST),
            serde_json::to_string_pretty(&manifest)?.as_bytes(),
        )?;
        Ok(())
    })?;
    Ok(manifest)
}

/// Copies a file and fsyncs the copy.
fn copy_synced(from: &Path, to: &Path) -> Result<()> {
    let mut src = crate::fsutil::open_regular(from)?;
    let mut dst =
        std::fs::File::create(to).with_context(|| format!("cannot create {}", to.display()))?;
    std::io::copy(&mut src, &mut dst).with_context(|| format!("cannot copy {}", from.display()))?;
    dst.sync_all()?;
    Ok(())
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

/// Puts a file or folder of the old bundle folder into the new one (hard links where possible).
fn carry(from: &Path, to: &Path) -> Result<()> {
    let meta = std::fs::symlink_metadata(from)?;
    if meta.is_dir() {
        std::fs::create_dir(to)?;
        for e in std::fs::read_dir(from)? {
            let e = e?;
            carry(&e.path(), &to.join(e.file_name()))?;
        }
    } else if meta.file_type().is_symlink() {
        #[cfg(unix)]
        std::os::unix::fs::symlink(std::fs::read_link(from)?, to)?;
    } else if std::fs::hard_link(from, to).is_err() {
        std::fs::copy(from, to).with_context(|| format!("cannot carry {} over", from.display()))?;
    }
    Ok(())
}

/// `dir` made absolute, whether or not it exists yet.
fn absolute_folder(dir: &Path) -> Result<PathBuf> {
    if let Ok(p) = dir.canonicalize() {
        return Ok(p);
    }
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let parent = parent
        .canonicalize()
        .with_context(|| format!("the folder {} does not exist", parent.display()))?;
    Ok(parent.join(dir.file_name().context("the bundle path has no name")?))
}

/// `target` expressed relative to `base` (absolute).
fn relative_path(base: &Path, target: &Path) -> Result<String> {
    let target = target
        .canonicalize()
        .with_context(|| format!("model {} not found", target.display()))?;
    let common = base
        .components()
        .zip(target.components())
        .take_while(|(a, b)| a == b)
        .count();
    let mut rel = PathBuf::new();
    for _ in base.components().skip(common) {
        rel.push("..");
    }
    for c in target.components().skip(common) {
        rel.push(c);
    }
    Ok(rel.to_string_lossy().into_owned())
}
