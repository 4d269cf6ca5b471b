//! Adding, removing and replacing one item of a bundle on the device: its `items.jsonl` line,
//! its rows in the feature banks, the manifest's hashes and the item-vector cache, changed
//! together in one atomic switch ([`crate::bundle::update`]): a kill leaves the old bundle intact.
//!
//! What a new item gets: an image row when an image feature is given (the runtime computes it
//! with [`crate::images`]); no text row (the runtime has no text encoder: all-MiniLM-L6-v2
//! runs in the Python tools only); no collaborative-filtering row (it comes from training on
//! interactions). It is then scored on the modalities it has, as any item missing one is
//! (the mean of its modalities' dot products), and as a history item it is written with its
//! visual token. [`EditReport`] says which rows it has and why the others are missing.

use crate::bundle::Bundle;
use crate::method::heads::Heads;
use crate::method::item_vectors::{write_extended, ItemVectors};
use crate::store::bank::{encode_bank, Bank, BankRows, DType, Modality, Row};
use crate::store::catalog::{Catalog, Item};
use anyhow::{bail, ensure, Context, Result};
use half::f16;
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

/// An item to add or to put in place of an existing one.
#[derive(Clone, Debug)]
pub struct NewItem {
    pub item: Item,
    /// Its image feature (the img bank's dimension), if it has an image.
    pub image: Option<Vec<f32>>,
    /// The photo itself (JPEG, PNG or WebP bytes), stored in the bundle as
    /// `images/<id>.<ext>` and recorded as the item's `image`, so that the kiosk shows it.
    pub photo: Option<Vec<u8>>,
}

impl NewItem {
    /// An item from its catalog fields (genres trimmed, empty ones dropped) and, when it has one,
    /// its photo's bytes with the photo's image feature.
    pub fn new(
        id: u64,
        title: String,
        description: Option<String>,
        genres: Vec<String>,
        photo: Option<(Vec<u8>, Vec<f32>)>,
    ) -> NewItem {
        let (photo, image) = photo.map_or((None, None), |(b, f)| (Some(b), Some(f)));
        NewItem {
            item: Item {
                id,
                title: Some(title),
                description,
                genres: genres
                    .into_iter()
                    .map(|g| g.trim().to_string())
                    .filter(|g| !g.is_empty())
                    .collect(),
                image: None,
            },
            image,
            photo,
        }
    }
}

/// The folder of a bundle that holds the photos stored by [`edit`].
pub const PHOTOS: &str = "images";

/// The file extension of a photo's bytes (`jpg`, `png`, `webp`), from its magic number.
pub fn photo_ext(bytes: &[u8]) -> Option<&'static str> {
    match bytes {
        [0xff, 0xd8, 0xff, ..] => Some("jpg"),
        [0x89, b'P', b'N', b'G', ..] => Some("png"),
        [b'R', b'I', b'F', b'F', _, _, _, _, b'W', b'E', b'B', b'P', ..] => Some("webp"),
        _ => None,
    }
}

#[derive(Clone, Debug)]
pub enum Edit {
    Add(NewItem),
    Remove(u64),
    /// Replace an item's catalog line, and its image row when an image is given. Its cf row is
    /// kept (it is the same item, with the same interactions); its text row is kept only when
    /// title, description and genres are unchanged (otherwise it would describe the old text).
    Replace(NewItem),
}

/// What an edit did.
#[derive(Clone, Debug)]
pub struct EditReport {
    pub id: u64,
    pub catalog_len: usize,
    /// The modalities the item has a row in now (empty after a removal).
    pub has: Vec<Modality>,
    /// The bundle's modalities the item has no row in, with the reason.
    pub lacks: Vec<(Modality, String)>,
    /// The item-vector cache written for the new bundle.
    pub cache: PathBuf,
    /// What did not stop the edit but should be said (a damaged cache rebuilt, a symbolic
    /// link in the cache folder replaced).
    pub warnings: Vec<String>,
}

/// Why an item has no row in a modality when the runtime adds it.
fn missing_reason(m: Modality) -> &'static str {
    match m {
        Modality::Img => "no image given",
        Modality::Text => "the runtime has no text encoder (all-MiniLM-L6-v2 runs in the Python tools); compute the row there and rebuild the bank to add it",
        Modality::Cf => "collaborative-filtering rows come from training on interactions",
    }
}

/// Applies one edit to the bundle in `dir`, holding the bundle's lock ([`crate::bundle::lock`])
/// from reading it to switching the new one in: concurrent edits (command line or kiosk) queue,
/// and each lands.
pub fn edit(dir: &Path, edit: &Edit) -> Result<EditReport> {
    let lock = crate::bundle::lock(dir)?;
    let bundle = Bundle::open(dir)?;
    let m = &bundle.manifest;
    let heads_bytes = bundle.read_verified(&m.heads)?;
    let config_bytes = bundle.read_verified(&m.heads_config)?;
    let heads = Heads::from_bytes(
        &heads_bytes,
        &bundle.file(&m.heads),
        &config_bytes,
        &bundle.file(&m.heads_config),
    )?;
    let items_bytes = bundle.read_verified(&m.items)?;
    let catalog = Catalog::parse(&items_bytes, &bundle.file(&m.items))?;
    let (banks, digests) = bundle.open_banks(None)?;

    let (id, new) = match edit {
        Edit::Add(n) => {
            ensure!(
                catalog.get(n.item.id).is_none(),
                "item {} is already in the catalog (use `items replace`)",
                n.item.id
            );
            (n.item.id, Some(n))
        }
        Edit::Replace(n) => {
            catalog.item(n.item.id)?;
            (n.item.id, Some(n))
        }
        Edit::Remove(id) => {
            catalog.item(*id)?;
            ensure!(catalog.len() > 1, "item {id} is the catalog's only item");
            (*id, None)
        }
    };
    let mut photo: Option<(&[u8], String)> = None;
    if let Some(n) = new {
        ensure!(!n.item.title().trim().is_empty(), "item {id} needs a title");
        if let Some(bytes) = &n.photo {
            let ext = photo_ext(bytes).with_context(|| {
                format!("the photo of item {id} is not a JPEG, PNG or WebP file")
            })?;
            photo = Some((bytes, format!("{PHOTOS}/{id}.{ext}")));
        }
        if let Some(row) = &n.image {
            let bank = banks.get(&Modality::Img).with_context(|| {
                format!(
                    "bundle {} has no img bank: an image cannot be added",
                    dir.display()
                )
            })?;
            ensure!(
                row.len() == bank.dim(),
                "the image feature has {} values, the img bank {} per item",
                row.len(),
                bank.dim()
            );
            if let Some(i) = row.iter().position(|v| !v.is_finite()) {
                bail!("the image feature of item {id} has a NaN or infinite value at {i}");
            }
        }
    }

    // items.jsonl: other lines are kept byte for byte.
    let text = std::str::from_utf8(&items_bytes).context("items.jsonl is not UTF-8")?;
    let mut lines: Vec<String> = Vec::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            continue;
        }
        let item: Item = serde_json::from_str(line)?;
        if item.id == id {
            if let Some(n) = new {
                // A replacement without a photo keeps the old one's.
                let image = match &photo {
                    Some((_, rel)) => Some(rel.clone()),
                    None => n.item.image.clone().or(item.image.clone()),
                };
                lines.push(item_line(&n.item, image)?);
            }
        } else {
            lines.push(line.to_string());
        }
    }
    if let Edit::Add(n) = edit {
        let image = photo.as_ref().map(|(_, rel)| rel.clone());
        lines.push(item_line(&n.item, image.or(n.item.image.clone()))?);
    }
    let mut new_items = lines.join("\n");
    new_items.push('\n');
    let new_catalog = Catalog::parse(new_items.as_bytes(), &bundle.file(&m.items))?;

    // The banks that change.
    let old_item = catalog.get(id);
    let text_same = match (old_item, new) {
        (Some(o), Some(n)) => {
            o.title == n.item.title
                && o.description == n.item.description
                && o.genres == n.item.genres
        }
        _ => false,
    };
    let mut changed_files: Vec<(String, Vec<u8>)> = vec![(m.items.clone(), new_items.into_bytes())];
    let mut new_banks_bytes: BTreeMap<Modality, Vec<u8>> = BTreeMap::new();
    for (modality, bank) in &banks {
        // The row the item has after the edit: None = absent, Some(None) = keep the old one.
        let row: Option<Option<&[f32]>> = match (edit, modality) {
            (Edit::Remove(_), _) => None,
            (Edit::Add(n), Modality::Img) => n.image.as_deref().map(Some),
            (Edit::Add(_), _) => None,
            (Edit::Replace(n), Modality::Img) => match &n.image {
                Some(r) => Some(Some(r.as_slice())),
                None => bank.get(id).map(|_| None),
            },
            (Edit::Replace(_), Modality::Cf) => bank.get(id).map(|_| None),
            (Edit::Replace(_), Modality::Text) => {
                (text_same && bank.get(id).is_some()).then_some(None)
            }
        };
        let unchanged = match row {
            None => bank.get(id).is_none(),
            Some(None) => true,
            Some(Some(_)) => false,
        };
        if unchanged {
            continue;
        }
        let bytes = rebuild_bank(bank, id, row.flatten())?;
        let file = &m.banks[modality.name()];
        changed_files.push((file.clone(), bytes.clone()));
        new_banks_bytes.insert(*modality, bytes);
    }

    // What the item has now.
    let mut has = Vec::new();
    let mut lacks = Vec::new();
    if new.is_some() {
        for (modality, bank) in &banks {
            let present = match new_banks_bytes.get(modality) {
                Some(bytes) => Bank::from_bytes(Path::new("new"), bytes)?.get(id).is_some(),
                None => bank.get(id).is_some(),
            };
            if present {
                has.push(*modality);
            } else {
                lacks.push((*modality, missing_reason(*modality).to_string()));
            }
        }
        let scored: Vec<Modality> = heads.modalities();
        ensure!(
            has.iter().any(|m| scored.contains(m)),
            "item {id} would have no feature the heads score ({}): give it an image",
            scored
                .iter()
                .map(|m| m.name())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }

    // The item-vector cache of the old bundle (opened or computed), extended to the new one.
    let old_vectors = ItemVectors::open_or_build(
        &bundle.dir.join("cache"),
        &heads,
        &banks,
        &digests,
        &catalog,
    )?;
    let cache_link = bundle.dir.join("cache");
    let mut warnings = Vec::new();
    if !crate::store::fsutil::is_symlink(&cache_link) {
        warnings.extend(old_vectors.warnings.iter().cloned());
    } else {
        warnings.push(format!(
            "{} is a symbolic link: the edited bundle gets a cache folder of its own (the link's target was not written)",
            cache_link.display()
        ));
    }
    let changed_ids: HashSet<u64> = [id].into_iter().collect();
    let mut cache_name = PathBuf::new();
    let catalog_len = new_catalog.len();
    let stale = old_vectors
        .path
        .as_ref()
        .and_then(|p| p.file_name().map(|n| n.to_owned()));
    crate::bundle::update(&lock, &changed_files, |tmp| {
        let mut new_banks = BTreeMap::new();
        let mut new_digests = BTreeMap::new();
        for (modality, file) in &m.banks {
            let modality = Modality::parse(modality)?;
            let bank = Bank::open(&tmp.join(file))?;
            bank.verify()?;
            new_digests.insert(modality, bank.file_sha256());
            new_banks.insert(modality, bank);
        }
        // The item's stored photo: the old one goes when the item goes or gets a new one (the
        // file is unlinked, never written through: it is a hard link to the old bundle's).
        if matches!(edit, Edit::Remove(_)) || photo.is_some() {
            for ext in ["jpg", "png", "webp"] {
                let _ = std::fs::remove_file(tmp.join(PHOTOS).join(format!("{id}.{ext}")));
            }
        }
        if let Some((bytes, rel)) = &photo {
            std::fs::create_dir_all(tmp.join(PHOTOS))?;
            let path = tmp.join(rel);
            let mut f = std::fs::File::create(&path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            std::io::Write::write_all(&mut f, bytes)?;
            f.sync_all()?;
        }
        let cache_dir = tmp.join("cache");
        if let Some(stale) = &stale {
            let _ = std::fs::remove_file(cache_dir.join(stale));
        }
        let path = write_extended(
            &cache_dir,
            &old_vectors,
            &changed_ids,
            &heads,
            &new_banks,
            &new_digests,
            &new_catalog,
        )?;
        cache_name = PathBuf::from(path.file_name().expect("a file name"));
        Ok(())
    })?;
    Ok(EditReport {
        id,
        catalog_len,
        has,
        lacks,
        cache: bundle.dir.join("cache").join(cache_name),
        warnings,
    })
}

/// The catalog line of an item: id, title, and description / genres / image when present.
fn item_line(item: &Item, image: Option<String>) -> Result<String> {
    let mut obj = serde_json::Map::new();
    obj.insert("id".into(), item.id.into());
    obj.insert("title".into(), item.title().into());
    if let Some(d) = item.description.as_deref().filter(|d| !d.is_empty()) {
        obj.insert("description".into(), d.into());
    }
    if !item.genres.is_empty() {
        obj.insert("genres".into(), item.genres.clone().into());
    }
    if let Some(image) = image {
        obj.insert("image".into(), image.into());
    }
    Ok(serde_json::to_string(&obj)?)
}

/// A bank's bytes with item `id`'s row removed, or set to `row`; other rows are copied as they
/// are (same dtype, so an f16 bank stays bit-identical for them).
fn rebuild_bank(bank: &Bank, id: u64, row: Option<&[f32]>) -> Result<Vec<u8>> {
    let dim = bank.dim();
    let mut ids = Vec::with_capacity(bank.len() + 1);
    let (mut f32s, mut f16s): (Vec<f32>, Vec<f16>) = (Vec::new(), Vec::new());
    for (i, &other) in bank.ids().iter().enumerate() {
        if other == id {
            continue;
        }
        ids.push(other);
        match bank.row_at(i) {
            Row::F32(r) => f32s.extend_from_slice(r),
            Row::F16(r) => f16s.extend_from_slice(r),
        }
    }
    if let Some(r) = row {
        ids.push(id);
        match bank.dtype {
            DType::F32 => f32s.extend_from_slice(r),
            DType::F16 => f16s.extend(r.iter().map(|v| f16::from_f32(*v))),
        }
    }
    ensure!(!ids.is_empty(), "the {} bank would be empty", bank.modality);
    let rows = match bank.dtype {
        DType::F32 => BankRows::F32(&f32s),
        DType::F16 => BankRows::F16(&f16s),
    };
    Ok(encode_bank(bank.modality, dim, &ids, rows)?.1)
}
