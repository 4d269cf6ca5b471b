//! The item catalog: `items.jsonl`, one JSON object per line with at least `id` and `title`,
//! and optionally `description`, `genres` and `image` (a path relative to the bundle). Also the
//! catalog search the kiosk page browses with, and the resolution of an item's image file.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Item {
    pub id: u64,
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub genres: Vec<String>,
    /// The item's picture: a path relative to the bundle folder (or to `--images`). One that
    /// [`check_image_path`] refuses (absolute, `..`) is ignored by [`image_file`] rather than an
    /// error, because datasets made by the tools record posters relative to the repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

impl Item {
    pub fn title(&self) -> &str {
        self.title.as_deref().unwrap_or("")
    }

    /// The year in a MovieLens-style title, "Heat (1995)" → 1995.
    pub fn year(&self) -> Option<u16> {
        let t = self.title().trim_end();
        let inner = t.strip_suffix(')')?;
        let open = inner.rfind('(')?;
        let y = &inner[open + 1..];
        (y.len() == 4 && y.bytes().all(|b| b.is_ascii_digit()))
            .then(|| y.parse().ok())
            .flatten()
    }

    /// Whether every word of `query` (lower-case) is in the title or a genre.
    fn matches(&self, words: &[String]) -> bool {
        let title = self.title().to_lowercase();
        words.iter().all(|w| {
            title.contains(w.as_str())
                || self
                    .genres
                    .iter()
                    .any(|g| g.to_lowercase().contains(w.as_str()))
        })
    }
}

/// Checks an item's `image` path: relative, made of plain names only (no `..`, no root, no
/// drive or backslash tricks, no empty or hidden-dot components), so that joined to the bundle
/// folder it can only name a file inside it.
pub fn check_image_path(path: &str) -> Result<()> {
    use std::path::Component;
    let p = Path::new(path);
    let ok = !path.is_empty()
        && !path.contains('\\')
        && !path.contains('\0')
        && p.components()
            .all(|c| matches!(c, Component::Normal(n) if !n.to_string_lossy().starts_with('.')));
    if !ok {
        bail!("image path '{path}' must be relative and stay inside the bundle folder");
    }
    Ok(())
}

/// The file holding an item's image, if it has one: with `images_dir`, `images_dir/<image>` or,
/// for an item without an `image` field, `images_dir/<id>.{jpg,jpeg,png,webp}`; without it,
/// `<bundle_dir>/<image>`. Only a regular file whose real path (symlinks resolved) stays inside
/// its base folder counts.
pub fn image_file(item: &Item, bundle_dir: &Path, images_dir: Option<&Path>) -> Option<PathBuf> {
    let base = images_dir.unwrap_or(bundle_dir);
    let own = item
        .image
        .as_deref()
        .filter(|p| check_image_path(p).is_ok());
    let candidates: Vec<PathBuf> = match (own, images_dir) {
        (Some(rel), _) => vec![base.join(rel)],
        (None, Some(dir)) => ["jpg", "jpeg", "png", "webp"]
            .iter()
            .map(|ext| dir.join(format!("{}.{ext}", item.id)))
            .collect(),
        (None, None) => return None,
    };
    let base = base.canonicalize().ok()?;
    candidates.into_iter().find_map(|p| {
        let real = p.canonicalize().ok()?;
        (real.starts_with(&base) && real.metadata().ok()?.is_file()).then_some(real)
    })
}

/// The media type of an image file, from its extension.
pub fn image_type(path: &Path) -> &'static str {
    match path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .as_deref()
    {
        Some("png") => "image/png",
        Some("webp") => "image/webp",
        Some("gif") => "image/gif",
        _ => "image/jpeg",
    }
}

/// A page of catalog search results.
#[derive(Debug, PartialEq)]
pub struct Page<'a> {
    /// Items matching the query, in id order.
    pub total: usize,
    pub items: Vec<&'a Item>,
}

pub struct Catalog {
    items: Vec<Item>,
    index: HashMap<u64, usize>,
}

impl Catalog {
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = crate::store::fsutil::read_regular(path)
            .with_context(|| format!("cannot read items {}", path.display()))?;
        Self::parse(&bytes, path)
    }

    /// Parses `items.jsonl` bytes (`path` only names them in messages).
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self> {
        let mut items = Vec::new();
        for (n, line) in bytes.split(|&b| b == b'\n').enumerate() {
            if line.iter().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            let item: Item = std::str::from_utf8(line)
                .map_err(anyhow::Error::from)
                .and_then(|l| Ok(serde_json::from_str(l)?))
                .with_context(|| {
                    format!(
                        "{} line {}: not a valid item (needs an integer \"id\")",
                        path.display(),
                        n + 1
                    )
                })?;
            items.push(item);
        }
        Self::new(items).with_context(|| format!("items {}", path.display()))
    }

    pub fn new(mut items: Vec<Item>) -> Result<Self> {
        if items.is_empty() {
            bail!("the catalog has no items");
        }
        items.sort_by_key(|i| i.id);
        if let Some(w) = items.windows(2).find(|w| w[0].id == w[1].id) {
            bail!("item id {} appears more than once", w[0].id);
        }
        let index = items
            .iter()
            .enumerate()
            .map(|(i, item)| (item.id, i))
            .collect();
        Ok(Self { items, index })
    }

    pub fn get(&self, id: u64) -> Option<&Item> {
        self.index.get(&id).map(|&i| &self.items[i])
    }

    /// Like [`Catalog::get`], but an unknown id is an error.
    pub fn item(&self, id: u64) -> Result<&Item> {
        self.get(id)
            .with_context(|| format!("item {id} is not in the catalog"))
    }

    /// Position of an item in id order.
    pub fn position(&self, id: u64) -> Option<usize> {
        self.index.get(&id).copied()
    }

    /// All items, sorted by id.
    pub fn items(&self) -> &[Item] {
        &self.items
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Items whose title or genres contain every word of `query` (case-insensitive; an empty
    /// query matches everything), in id order, `limit` of them from `offset`.
    pub fn search(&self, query: &str, offset: usize, limit: usize) -> Page<'_> {
        let words: Vec<String> = query.split_whitespace().map(str::to_lowercase).collect();
        let mut total = 0;
        let mut items = Vec::new();
        for item in self.items.iter().filter(|i| i.matches(&words)) {
            if total >= offset && items.len() < limit {
                items.push(item);
            }
            total += 1;
        }
        Page { total, items }
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> Catalog {
        let lines = [
            r#"{"id": 6, "title": "Heat (1995)", "genres": ["Action", "Crime"]}"#,
            r#"{"id": 1, "title": "Toy Story (1995)", "genres": ["Animation", "Comedy"], "image": "img/1.jpg"}"#,
            r#"{"id": 2, "title": "Jumanji", "genres": ["Adventure"]}"#,
        ];
        Catalog::parse(lines.join("\n").as_bytes(), Path::new("items.jsonl")).unwrap()
    }

    #[test]
    fn search_matches_every_word_in_title_or_genres() {
        let c = catalog();
        let ids = |p: Page| p.items.iter().map(|i| i.id).collect::<Vec<_>>();
        assert_eq!(ids(c.search("", 0, 10)), vec![1, 2, 6]);
        assert_eq!(ids(c.search("  TOY  ", 0, 10)), vec![1]);
        assert_eq!(ids(c.search("1995 crime", 0, 10)), vec![6]);
        assert_eq!(ids(c.search("adventure", 0, 10)), vec![2]);
        assert_eq!(c.search("1995", 1, 1).total, 2);
        assert_eq!(ids(c.search("1995", 1, 1)), vec![6]);
        assert_eq!(ids(c.search("1995", 5, 10)), Vec::<u64>::new());
        assert_eq!(c.search("nothing", 0, 10).total, 0);
    }

    #[test]
    fn years_and_images() {
        let c = catalog();
        assert_eq!(c.get(6).unwrap().year(), Some(1995));
        assert_eq!(c.get(2).unwrap().year(), None);
        assert_eq!(c.get(1).unwrap().image.as_deref(), Some("img/1.jpg"));
        for bad in [
            "../x.jpg",
            "/etc/passwd",
            "a/../../b",
            "",
            ".hidden",
            "a\\..\\b",
            "./a",
        ] {
            assert!(check_image_path(bad).is_err(), "{bad}");
        }
        for good in ["a.jpg", "posters/12.png"] {
            check_image_path(good).unwrap();
        }
        // an escaping path is no image (never an error: datasets record repository paths)
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("7.jpg"), b"x").unwrap();
        std::fs::write(dir.path().join("a.png"), b"x").unwrap();
        let item = |image: Option<&str>| Item {
            id: 7,
            title: None,
            description: None,
            genres: vec![],
            image: image.map(String::from),
        };
        let sub = dir.path().join("bundle");
        std::fs::create_dir(&sub).unwrap();
        assert_eq!(image_file(&item(Some("../a.png")), &sub, None), None);
        assert_eq!(image_file(&item(None), &sub, None), None);
        let found = |i: Item| {
            image_file(&i, &sub, Some(dir.path())).map(|p| p.file_name().unwrap().to_owned())
        };
        assert_eq!(found(item(Some("a.png"))).unwrap(), "a.png");
        assert_eq!(found(item(Some("../x/a.png"))).unwrap(), "7.jpg");
        assert_eq!(found(item(None)).unwrap(), "7.jpg");
        assert_eq!(image_type(Path::new("a.PNG")), "image/png");
    }
}
