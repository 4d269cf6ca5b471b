//! How image files map to item ids: a folder's image files, ids from file names, or an explicit
//! id-to-file map.

use anyhow::{bail, ensure, Context, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// File extensions taken as images when a folder is listed.
pub const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

/// The image files of a folder (by extension, see [`IMAGE_EXTENSIONS`]), sorted by name.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let p = e?.path();
        let is_image = p
            .extension()
            .and_then(|x| x.to_str())
            .is_some_and(|x| IMAGE_EXTENSIONS.contains(&x.to_ascii_lowercase().as_str()));
        if is_image && p.is_file() {
            files.push(p);
        }
    }
    files.sort();
    ensure!(
        !files.is_empty(),
        "{} holds no image file ({})",
        dir.display(),
        IMAGE_EXTENSIONS.join(", ")
    );
    Ok(files)
}

/// An item id from a file name: `123.jpg` → 123.
pub fn id_from_file_name(path: &Path) -> Result<u64> {
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    stem.parse().with_context(|| {
        format!(
            "{}: the file name is not an item id (name files <id>.jpg, or give a mapping file)",
            path.display()
        )
    })
}

/// A mapping file: one `ID,FILE` (or `ID<TAB>FILE`) per line, FILE relative to `base`; blank
/// lines and lines starting with `#` are skipped. Returns (id, path) in file order.
pub fn read_id_map(path: &Path, base: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let text = crate::store::fsutil::read_regular_string(path)?;
    let mut out = Vec::new();
    let mut seen = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (id, file) = line
            .split_once([',', '\t'])
            .with_context(|| format!("{} line {}: expected ID,FILE", path.display(), n + 1))?;
        let id: u64 = id.trim().parse().with_context(|| {
            format!(
                "{} line {}: '{}' is not an item id",
                path.display(),
                n + 1,
                id.trim()
            )
        })?;
        if let Some(prev) = seen.insert(id, n + 1) {
            bail!(
                "{} line {}: item {id} is already mapped on line {prev}",
                path.display(),
                n + 1
            );
        }
        out.push((id, base.join(file.trim())));
    }
    ensure!(!out.is_empty(), "{} maps no image", path.display());
    Ok(out)
}

/// (id, file) pairs for a set of image paths: each path a file (id from its name) or a folder
/// (its images, ids from their names); or, with a mapping file, the files it names relative to
/// the single folder given.
pub fn image_ids(inputs: &[PathBuf], map: Option<&Path>) -> Result<Vec<(u64, PathBuf)>> {
    ensure!(!inputs.is_empty(), "no image given");
    if let Some(map) = map {
        ensure!(
            inputs.len() == 1 && inputs[0].is_dir(),
            "a mapping file needs exactly one image folder"
        );
        return read_id_map(map, &inputs[0]);
    }
    let mut out = Vec::new();
    for p in inputs {
        let files = if p.is_dir() {
            list_images(p)?
        } else {
            vec![p.clone()]
        };
        for f in files {
            out.push((id_from_file_name(&f)?, f));
        }
    }
    let mut ids: Vec<u64> = out.iter().map(|(i, _)| *i).collect();
    ids.sort_unstable();
    if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
        bail!("item {} has more than one image", w[0]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::decode::tests::{gradient, jpeg};

    #[test]
    fn ids_come_from_file_names_or_a_map() {
        let dir = tempfile::tempdir().unwrap();
        let good = jpeg(&gradient(8, 8));
        for name in ["12.jpg", "3.PNG", "notes.txt"] {
            std::fs::write(dir.path().join(name), &good).unwrap();
        }
        let pairs = image_ids(&[dir.path().to_path_buf()], None).unwrap();
        let ids: Vec<u64> = pairs.iter().map(|p| p.0).collect();
        assert_eq!(ids, vec![12, 3]);
        std::fs::write(dir.path().join("poster.jpg"), &good).unwrap();
        let e = image_ids(&[dir.path().to_path_buf()], None).unwrap_err();
        assert!(e.to_string().contains("not an item id"), "{e}");
        let map = dir.path().join("map.csv");
        std::fs::write(&map, "# id,file\n7,poster.jpg\n8\t12.jpg\n").unwrap();
        let pairs = image_ids(&[dir.path().to_path_buf()], Some(&map)).unwrap();
        assert_eq!(pairs.iter().map(|p| p.0).collect::<Vec<_>>(), vec![7, 8]);
        std::fs::write(&map, "7,poster.jpg\n7,12.jpg\n").unwrap();
        assert!(image_ids(&[dir.path().to_path_buf()], Some(&map)).is_err());
    }
}
