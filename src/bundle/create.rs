//! Writing bundles: [`create`] assembles a new bundle beside the old folder and switches it in
//! one step; [`update`] changes some files of an existing bundle the same way (item edits).

use super::{Bundle, BundleLock, FileEntry, Manifest, ModelRef, MANIFEST};
use crate::engine::GgufInfo;
use crate::store::bank::{Bank, Modality};
use crate::store::fsutil::{hex, replace_dir, sha256_file};
use anyhow::{ensure, Context, Result};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

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
/// over; a folder that is not a bundle is only replaced when it holds no sub-folder. An existing
/// folder's bundle lock is held throughout (see [`super::LOCK`]).
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
    // Another writer of the same folder (an item edit, a second create) waits for this one.
    let _lock = match dir.is_dir() {
        true => Some(super::lock(&dir)?),
        false => None,
    };
    let info = GgufInfo::read(spec.model)?;
    // The small inputs are read and checked before anything is written; banks are copied into
    // the new folder and checked there (so what is checked is what is shipped).
    let read = |src: &Path| {
        crate::store::fsutil::read_regular(src)
            .with_context(|| format!("cannot read {}", src.display()))
    };
    let heads_bytes = read(spec.heads)?;
    let config_bytes = read(spec.heads_config)?;
    crate::method::heads::Heads::from_bytes(
        &heads_bytes,
        spec.heads,
        &config_bytes,
        spec.heads_config,
    )?;
    let items_bytes = read(spec.items)?;
    crate::store::catalog::Catalog::parse(&items_bytes, spec.items)?;
    let small = [
        ("heads.safetensors", &heads_bytes),
        ("heads.json", &config_bytes),
        ("items.jsonl", &items_bytes),
    ];
    let mut banks = BTreeMap::new();
    for (m, path) in &spec.banks {
        crate::store::fsutil::check_regular(path)?;
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
///
/// `lock` is the bundle's lock ([`super::lock`]), taken by the caller before it read what it
/// changes, so that two writers never both start from the same old bundle.
pub fn update(
    lock: &BundleLock,
    changed: &[(String, Vec<u8>)],
    extra: impl FnOnce(&Path) -> Result<()>,
) -> Result<Manifest> {
    let dir = lock.dir();
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
            // The cache is the runtime's own folder: a link there is not carried (the new bundle
            // gets a real `cache/`, and nothing is written where the link pointed).
            if name == "cache" && crate::store::fsutil::is_symlink(&e.path()) {
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
    let mut src = crate::store::fsutil::open_regular(from)?;
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
