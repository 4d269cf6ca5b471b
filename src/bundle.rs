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
use crate::fsutil::{sha256_file, write_atomic};
use crate::llm::GgufInfo;
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const MANIFEST: &str = "manifest.json";
/// File name of the default model inside `models/`.
pub const DEFAULT_MODEL_FILE: &str = "gemma-3-270m-q4_k_m.gguf";
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

impl Bundle {
    /// Reads the manifest and checks that every listed file exists with its recorded size
    /// (cheap; hashes are checked by [`Bundle::verify`]).
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "{} is not a bundle: cannot read {}",
                dir.display(),
                path.display()
            )
        })?;
        let manifest: Manifest = serde_json::from_str(&text)
            .with_context(|| format!("bundle manifest {} is not valid", path.display()))?;
        ensure!(
            manifest.format == "illmrec-bundle",
            "{}: format is '{}', expected 'illmrec-bundle'",
            path.display(),
            manifest.format
        );
        ensure!(
            manifest.version == 1,
            "{}: bundle version {} is not supported (expected 1)",
            path.display(),
            manifest.version
        );
        let bundle = Self {
            dir: dir.to_path_buf(),
            manifest,
        };
        for entry in &bundle.manifest.files {
            let p = bundle.file(&entry.path);
            let meta = std::fs::metadata(&p)
                .with_context(|| format!("bundle file {} is missing", p.display()))?;
            ensure!(
                meta.len() == entry.size,
                "bundle file {} is {} bytes, the manifest says {} (modified or truncated; run `illmrec bundle verify`)",
                p.display(),
                meta.len(),
                entry.size
            );
        }
        for name in [
            &bundle.manifest.heads,
            &bundle.manifest.heads_config,
            &bundle.manifest.items,
        ]
        .into_iter()
        .chain(bundle.manifest.banks.values())
        {
            ensure!(
                bundle.manifest.files.iter().any(|f| &f.path == name),
                "{}: {name} is not listed in files",
                path.display()
            );
        }
        Ok(bundle)
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
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

/// Where the default model lives: `$ILLMREC_MODEL`, else `models/gemma-3-270m-q4_k_m.gguf` in the
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

/// Creates (or replaces) a bundle folder: copies the files in, hashes them, writes the manifest
/// last and atomically, so a bundle with a manifest is always complete.
pub fn create(dir: &Path, spec: &BundleSpec<'_>) -> Result<Manifest> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let info = GgufInfo::read(spec.model)?;
    let mut files = Vec::new();
    let mut copy = |src: &Path, name: &str| -> Result<String> {
        let dst = dir.join(name);
        if src.canonicalize().ok() != dst.canonicalize().ok() {
            let bytes =
                std::fs::read(src).with_context(|| format!("cannot read {}", src.display()))?;
            write_atomic(&dst, |out| Ok(out.write_all(&bytes)?))?;
        }
        files.push(FileEntry {
            path: name.to_string(),
            size: std::fs::metadata(&dst)?.len(),
            sha256: sha256_file(&dst)?,
        });
        Ok(name.to_string())
    };
    let heads = copy(spec.heads, "heads.safetensors")?;
    let heads_config = copy(spec.heads_config, "heads.json")?;
    let items = copy(spec.items, "items.jsonl")?;
    let mut banks = BTreeMap::new();
    for (m, path) in &spec.banks {
        let bank = Bank::open(path)?;
        ensure!(
            bank.modality == *m,
            "bank {} holds {} features, not {m}",
            path.display(),
            bank.modality
        );
        banks.insert(m.name().to_string(), copy(path, &format!("{m}.bank"))?);
    }
    let model_path = if spec.model_is_default {
        None
    } else {
        Some(relative_path(dir, spec.model)?)
    };
    let manifest = Manifest {
        format: "illmrec-bundle".into(),
        version: 1,
        model: ModelRef {
            path: model_path,
            size: std::fs::metadata(spec.model)?.len(),
            sha256: sha256_file(spec.model)?,
            n_embd: info.n_embd,
            architecture: info.architecture,
        },
        heads,
        heads_config,
        items,
        banks,
        files,
    };
    let json = serde_json::to_string_pretty(&manifest)?;
    write_atomic(&dir.join(MANIFEST), |out| {
        Ok(out.write_all(json.as_bytes())?)
    })?;
    Ok(manifest)
}

/// `target` expressed relative to `base` (both made absolute first).
fn relative_path(base: &Path, target: &Path) -> Result<String> {
    let base = base.canonicalize()?;
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
