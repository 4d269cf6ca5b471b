//! The item catalog: `items.jsonl`, one JSON object per line with at least `id` and `title`.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Item {
    pub id: u64,
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub genres: Vec<String>,
}

impl Item {
    pub fn title(&self) -> &str {
        self.title.as_deref().unwrap_or("")
    }
}

pub struct Catalog {
    items: Vec<Item>,
    index: HashMap<u64, usize>,
}

impl Catalog {
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = crate::fsutil::read_regular(path)
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

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}
