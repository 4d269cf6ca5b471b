//! Verified-file stamps: a whole-file check (a sha256 over gigabytes) runs once per file
//! version, not at every open, so opening a bank or the item-vector cache costs the same for any
//! catalog size.
//!
//! After a full check passes, a stamp is recorded in a folder (the bundle's cache folder): the
//! file's device, inode, size, mtime and ctime (nanoseconds) and a tag naming what was checked
//! (e.g. the sha256 the manifest expects). A later open whose file still has the same stamp and
//! the same tag skips the check. Any write through the file system changes mtime and ctime, and
//! ctime cannot be set back from user space, so an edited, truncated, replaced or copied file
//! never matches and is checked again in full. What a stamp cannot see is damage below the file
//! system (a flipped bit on the medium): `illmrec bundle verify` recomputes every sha256.
//!
//! A stamp is only recorded for a file whose last change is at least [`RACY_SECS`] older than the
//! start of its check, and whose stamp did not move during the check: a write in the same
//! timestamp tick as the check could otherwise keep the stamp while changing the bytes (git's
//! "racily clean" problem). Stamps are written atomically, one small JSON file per checked path;
//! a folder that cannot take them only costs the full check at every open.

use crate::store::fsutil::{hex, is_symlink, owned_dir, write_owned};
use anyhow::Result;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Seconds a file must be unchanged before its check may be stamped (covers file systems with
/// coarse timestamps).
pub const RACY_SECS: u64 = 2;

/// A file's identity and last change, as the file system reports them.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Stamp {
    /// The stamp of `path` now (`None` where the platform has no inode and ctime).
    pub fn of(path: &Path) -> Option<Stamp> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let m = std::fs::metadata(path).ok()?;
            let ns = |s: i64, n: i64| s as i128 * 1_000_000_000 + n as i128;
            Some(Stamp {
                dev: m.dev(),
                ino: m.ino(),
                size: m.size(),
                mtime_ns: ns(m.mtime(), m.mtime_nsec()),
                ctime_ns: ns(m.ctime(), m.ctime_nsec()),
            })
        }
        #[cfg(not(unix))]
        {
            let _ = path;
            None
        }
    }

    /// Whether the file's last change is older than `t`.
    fn changed_before(&self, t: SystemTime) -> bool {
        let Ok(d) = t.duration_since(SystemTime::UNIX_EPOCH) else {
            return false;
        };
        let t = d.as_nanos() as i128;
        self.mtime_ns < t && self.ctime_ns < t
    }
}

#[derive(serde::Serialize, serde::Deserialize, PartialEq)]
struct Record {
    path: String,
    tag: String,
    stamp: Stamp,
}

/// Where stamps are kept.
#[derive(Clone, Debug)]
pub struct Stamps {
    dir: PathBuf,
}

/// How a [`Stamps::check_once`] went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checked {
    /// The stamp matched: the check was skipped.
    Stamped,
    /// The check ran (and passed); `recorded` says whether a stamp now vouches for it.
    Full { recorded: bool },
}

impl Stamps {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    fn record_path(&self, path: &Path) -> PathBuf {
        let abs = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let h = Sha256::digest(abs.as_os_str().as_encoded_bytes());
        self.dir.join(format!("verified-{}.json", &hex(&h)[..16]))
    }

    fn record_for(path: &Path, tag: &[u8], stamp: Stamp) -> Record {
        let abs = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        Record {
            path: abs.display().to_string(),
            tag: hex(tag),
            stamp,
        }
    }

    /// Whether a stamp vouches that `path` passed the check named by `tag` and has not changed.
    pub fn is_verified(&self, path: &Path, tag: &[u8]) -> bool {
        let Some(now) = Stamp::of(path) else {
            return false;
        };
        let record = self.record_path(path);
        // A stamp is a file of ours: a link at its name vouches for nothing.
        if is_symlink(&record) {
            return false;
        }
        let Ok(text) = std::fs::read(record) else {
            return false;
        };
        serde_json::from_slice::<Record>(&text).is_ok_and(|r| r == Self::record_for(path, tag, now))
    }

    /// Runs `check` on `path` unless a stamp vouches for it; after a pass, records a stamp when
    /// the file was stable (see the module doc). The check's error is returned as is.
    pub fn check_once(
        stamps: Option<&Stamps>,
        path: &Path,
        tag: &[u8],
        check: impl FnOnce() -> Result<()>,
    ) -> Result<Checked> {
        if stamps.is_some_and(|s| s.is_verified(path, tag)) {
            return Ok(Checked::Stamped);
        }
        let started = SystemTime::now();
        let before = Stamp::of(path);
        check()?;
        let recorded = match (stamps, before) {
            (Some(s), Some(before)) => {
                Stamp::of(path).as_ref() == Some(&before)
                    && before.changed_before(started - Duration::from_secs(RACY_SECS))
                    && s.record(path, tag, before).is_ok()
            }
            _ => false,
        };
        Ok(Checked::Full { recorded })
    }

    /// Writes a stamp. Nothing is written through a symbolic link: a stamp folder that is a
    /// link is refused, a link at a stamp's name is replaced (see
    /// [`crate::store::fsutil::write_owned`]).
    fn record(&self, path: &Path, tag: &[u8], stamp: Stamp) -> Result<()> {
        owned_dir(&self.dir)?;
        let json = serde_json::to_vec(&Self::record_for(path, tag, stamp))?;
        write_owned(&self.record_path(path), |out| Ok(out.write_all(&json)?))?;
        Ok(())
    }

    /// Removes the symbolic links named like stamps in the stamp folder (a stamp is a file the
    /// runtime writes; a link there would have it write into the link's target) and says which.
    /// A stamp folder that is itself a link is left alone: nothing is written into it.
    pub fn remove_links(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if is_symlink(&self.dir) {
            return notes;
        }
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return notes;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let is_link = e.file_type().is_ok_and(|t| t.is_symlink());
            if is_link && name.starts_with("verified-") && name.ends_with(".json") {
                let p = e.path();
                let target = std::fs::read_link(&p).unwrap_or_default();
                if std::fs::remove_file(&p).is_ok() {
                    notes.push(format!(
                        "{} was a symbolic link to {}: removed the link (stamps are written only inside the cache folder; its target was not touched)",
                        p.display(),
                        target.display()
                    ));
                }
            }
        }
        notes
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// A stable file is checked once, then stamped; a rewrite (same size), a different tag, a
    /// replacement or a missing stamp folder each bring the full check back.
    #[test]
    fn stamps_skip_only_unchanged_files() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("data.bin");
        std::fs::write(&file, b"0123456789").unwrap();
        let stamps = Stamps::new(dir.path().join("cache"));
        let runs = Cell::new(0);
        let check = || {
            runs.set(runs.get() + 1);
            Ok(())
        };
        // Too fresh to stamp: a write in the same tick could go unseen.
        assert_eq!(
            Stamps::check_once(Some(&stamps), &file, b"tag", check).unwrap(),
            Checked::Full { recorded: false }
        );
        std::thread::sleep(Duration::from_millis(RACY_SECS * 1000 + 100));
        assert_eq!(
            Stamps::check_once(Some(&stamps), &file, b"tag", check).unwrap(),
            Checked::Full { recorded: true }
        );
        assert_eq!(
            Stamps::check_once(Some(&stamps), &file, b"tag", check).unwrap(),
            Checked::Stamped
        );
        assert_eq!(runs.get(), 2);
        assert!(!stamps.is_verified(&file, b"other tag"));
        assert!(Stamps::check_once(None, &file, b"tag", check).is_ok());
        assert_eq!(runs.get(), 3);
        // Same size, new bytes, written in place.
        std::fs::write(&file, b"0123456780").unwrap();
        assert!(!stamps.is_verified(&file, b"tag"));
        // A failing check is an error and records nothing.
        let err = Stamps::check_once(Some(&stamps), &file, b"tag", || anyhow::bail!("damaged"));
        assert_eq!(err.unwrap_err().to_string(), "damaged");
        assert!(!stamps.is_verified(&file, b"tag"));
        // A stamp folder that cannot be created: the check still passes, nothing recorded.
        let blocked = Stamps::new(file.join("not-a-dir"));
        std::thread::sleep(Duration::from_millis(RACY_SECS * 1000 + 100));
        assert_eq!(
            Stamps::check_once(Some(&blocked), &file, b"tag", check).unwrap(),
            Checked::Full { recorded: false }
        );
    }
}
