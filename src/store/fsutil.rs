//! Small filesystem helpers: the one atomic-write path (and the one directory switch), reading
//! input files safely, hashing, and the library's few calls into the operating system outside
//! the engine (read-only memory maps, file locks, a process check, an atomic directory swap).
//!
//! Writes never replace what is not ours. For an output the user names ([`write_atomic`]): a
//! device or a FIFO (`/dev/null`, `/dev/stdout` on a pipe) is written through, not replaced; a
//! symlink is followed and its target replaced (the user chose it); a directory is refused. For
//! a file inside a folder the runtime owns (a bundle, its `cache/`: [`write_owned`]) nothing is
//! followed: a folder that is a symbolic link is refused, a symbolic link at the file's name is
//! replaced by the file (its target is never touched) and reported, so a write never lands
//! outside the folder. An output that is one of the command's inputs (the same file, through a
//! symlink or a hard link) is refused ([`refuse_input_as_output`]). Regular files are replaced atomically: a temporary file
//! `.<name>.tmp-<pid>.<random>` in the same folder is written, fsynced and renamed over the
//! target, so a crash leaves the old file or the new one, never a mix. A temporary file left by a
//! killed process (its pid no longer runs) is removed by the next write to the same name.

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// Where an output path really leads.
enum Output {
    /// A device, FIFO or socket: written through in place.
    Special(PathBuf),
    /// A regular file (existing or not) at this path, symlinks resolved.
    Regular(PathBuf),
}

/// Follows `path` to what a write should touch (see the module doc).
fn resolve_output(path: &Path) -> Result<Output> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => bail!("{} is a directory, not a file", path.display()),
        Ok(meta) if !meta.is_file() => return Ok(Output::Special(path.to_path_buf())),
        _ => {}
    }
    // A regular file or nothing yet: follow symlinks (dangling ones too) to the real name, so
    // that the link stays and its target is replaced.
    let mut real = path.to_path_buf();
    for _ in 0..40 {
        match std::fs::symlink_metadata(&real) {
            Ok(m) if m.file_type().is_symlink() => {
                let target = std::fs::read_link(&real)
                    .with_context(|| format!("cannot read the link {}", real.display()))?;
                real = match real.parent() {
                    Some(dir) if target.is_relative() => dir.join(target),
                    _ => target,
                };
            }
            _ => return Ok(Output::Regular(real)),
        }
    }
    bail!("{}: too many levels of symbolic links", path.display())
}

/// The folder and file name of `path` (the folder is "." for a bare name).
fn split_path(path: &Path) -> Result<(PathBuf, String)> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file path", path.display()))?;
    Ok((dir, name.to_string_lossy().into_owned()))
}

/// Prefix of every temporary name for `name`, before the pid.
fn temp_prefix(name: &str) -> String {
    format!(".{name}.tmp-")
}

/// The pid a temporary name for `name` was made by, if `entry` is one.
pub fn temp_owner(entry: &str, name: &str) -> Option<u32> {
    let rest = entry.strip_prefix(&temp_prefix(name))?;
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    let after = &rest[digits.len()..];
    // Old writes used `.<name>.tmp-<pid>`, current ones `.<name>.tmp-<pid>.<random>`.
    (after.is_empty() || after.starts_with('.'))
        .then(|| digits.parse().ok())
        .flatten()
}

/// Whether a process with this pid is running (pids of other users count as running).
fn pid_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    #[cfg(unix)]
    {
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            return false;
        };
        // SAFETY: signal 0 only checks that the process exists; it sends nothing.
        let r = unsafe { libc::kill(pid, 0) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
    #[cfg(not(unix))]
    {
        true
    }
}

/// Removes the temporary files (or folders) for `name` in `dir` whose writer is no longer
/// running: what a killed write left behind. Returns how many were removed.
pub fn remove_stale_temps(dir: &Path, name: &str) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let entry_name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = temp_owner(&entry_name, name) else {
            continue;
        };
        if pid_alive(pid) {
            continue;
        }
        let p = entry.path();
        let ok = match entry.file_type() {
            Ok(t) if t.is_dir() => std::fs::remove_dir_all(&p).is_ok(),
            _ => std::fs::remove_file(&p).is_ok(),
        };
        removed += ok as usize;
    }
    removed
}

/// A fresh temporary file beside `real` (which it will replace), with the permissions of the
/// file it replaces, or the usual ones (0666 less the umask) for a new file.
fn temp_beside(real: &Path) -> Result<tempfile::NamedTempFile> {
    let (dir, name) = split_path(real)?;
    ensure_folder(&dir, real)?;
    remove_stale_temps(&dir, &name);
    let mut builder = tempfile::Builder::new();
    let prefix = format!("{}{}.", temp_prefix(&name), std::process::id());
    builder.prefix(&prefix);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    let tmp = builder
        .tempfile_in(&dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    if let Ok(meta) = std::fs::metadata(real) {
        tmp.as_file().set_permissions(meta.permissions())?;
    }
    Ok(tmp)
}

/// Fails with a clear message when the folder `dir` an output `path` goes into does not exist.
fn ensure_folder(dir: &Path, path: &Path) -> Result<()> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => bail!(
            "cannot write {}: {} is not a folder",
            path.display(),
            dir.display()
        ),
        Err(_) => bail!(
            "cannot write {}: the folder {} does not exist",
            path.display(),
            dir.display()
        ),
    }
}

/// Fsyncs a folder, so that a rename inside it is durable.
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Whether an output path leads to a device, FIFO or socket (written through in place, never
/// replaced) rather than to a regular file or nothing yet.
pub fn is_special_output(path: &Path) -> Result<bool> {
    Ok(matches!(resolve_output(path)?, Output::Special(_)))
}

/// The regular file an output path leads to (symlinks followed), for writers that keep work
/// files beside it; a device, FIFO, folder or missing folder is an error.
pub fn regular_output(path: &Path) -> Result<PathBuf> {
    match resolve_output(path)? {
        Output::Special(p) => bail!(
            "{} is not a regular file (a device or FIFO cannot take this output)",
            p.display()
        ),
        Output::Regular(real) => {
            ensure_folder(&split_path(&real)?.0, path)?;
            Ok(real)
        }
    }
}

/// Fsyncs the folder holding `path`, so that a rename to `path` survives a crash.
pub fn sync_parent(path: &Path) {
    if let Ok((dir, _)) = split_path(path) {
        sync_dir(&dir);
    }
}

/// Writes a file atomically (see the module doc): a crash at any point leaves either the old
/// file or the new one in place, never a partial one. A device or FIFO is written through.
pub fn write_atomic(path: &Path, write: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<()> {
    let result = (|| -> Result<()> {
        match resolve_output(path)? {
            Output::Special(p) => {
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .with_context(|| format!("cannot open {}", p.display()))?;
                let mut out = BufWriter::new(file);
                write(&mut out)?;
                out.flush()?;
                Ok(())
            }
            Output::Regular(real) => {
                let mut tmp = temp_beside(&real)?;
                let mut out = BufWriter::new(tmp.as_file_mut());
                write(&mut out)?;
                out.flush()?;
                drop(out);
                tmp.as_file().sync_all()?;
                persist(tmp.into_temp_path(), &real)
            }
        }
    })();
    result.with_context(|| format!("cannot write {}", path.display()))
}

/// Renames a synced temporary file over `real` and syncs the folder, so the rename survives a crash.
fn persist(tmp: tempfile::TempPath, real: &Path) -> Result<()> {
    tmp.persist(real)
        .map_err(|e| e.error)
        .with_context(|| format!("cannot move the new file to {}", real.display()))?;
    sync_dir(&split_path(real)?.0);
    Ok(())
}

/// Like [`write_atomic`] for a writer that needs a path (llama.cpp's quantizer): `write` fills
/// the temporary file at the path it is given, which then replaces `path`. Devices and FIFOs are
/// refused here, since the writer may seek.
pub fn write_atomic_path(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let result = (|| -> Result<()> {
        let real = match resolve_output(path)? {
            Output::Special(p) => bail!(
                "{} is not a regular file (a device or FIFO cannot take this output)",
                p.display()
            ),
            Output::Regular(real) => real,
        };
        let tmp = temp_beside(&real)?.into_temp_path();
        write(&tmp)?;
        File::open(&tmp)?.sync_all()?;
        persist(tmp, &real)
    })();
    result.with_context(|| format!("cannot write {}", path.display()))
}

/// Builds a folder beside `dir` and puts it in place of `dir` in one step: `build` fills the
/// new folder; then, if `dir` exists, the two are exchanged atomically (`renameat2
/// RENAME_EXCHANGE` on Linux) and the old one is removed. A crash before the exchange leaves the
/// old folder untouched; after it, the new one complete. The unfinished or replaced folder left
/// by a killed run is removed by the next call for the same name.
pub fn replace_dir(dir: &Path, build: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let (parent, name) = split_path(dir)?;
    ensure_folder(&parent, dir)?;
    if let Ok(m) = std::fs::symlink_metadata(dir) {
        anyhow::ensure!(
            m.is_dir(),
            "{} exists and is not a folder: refusing to replace it",
            dir.display()
        );
    }
    remove_stale_temps(&parent, &name);
    let mut builder = tempfile::Builder::new();
    let prefix = format!("{}{}.", temp_prefix(&name), std::process::id());
    builder.prefix(&prefix);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // Created like any folder (0777 less the umask), not tempfile's private 0700.
        builder.permissions(std::fs::Permissions::from_mode(0o777));
    }
    let tmp = builder
        .tempdir_in(&parent)
        .with_context(|| format!("cannot create a folder in {}", parent.display()))?;
    if let Ok(meta) = std::fs::metadata(dir) {
        std::fs::set_permissions(tmp.path(), meta.permissions())?;
    }
    build(tmp.path())?;
    sync_dir(tmp.path());
    match std::fs::symlink_metadata(dir) {
        Err(_) => {
            // Nothing to replace: one rename.
            let tmp = tmp.keep();
            std::fs::rename(&tmp, dir)
                .with_context(|| format!("cannot move the new folder to {}", dir.display()))?;
        }
        Ok(_) => {
            exchange(tmp.path(), dir).with_context(|| {
                format!("cannot put the new folder in place of {}", dir.display())
            })?;
            // `tmp` now holds the old folder; dropping it removes it.
        }
    }
    sync_dir(&parent);
    Ok(())
}

/// Swaps two paths in one step where the system can; elsewhere renames `b` aside first (a crash
/// between the two renames then leaves `b` under its temporary name).
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        use std::os::unix::ffi::OsStrExt;
        let ca = std::ffi::CString::new(a.as_os_str().as_bytes())?;
        let cb = std::ffi::CString::new(b.as_os_str().as_bytes())?;
        // SAFETY: two valid C strings, relative to the current folder.
        let r = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                ca.as_ptr(),
                libc::AT_FDCWD,
                cb.as_ptr(),
                libc::RENAME_EXCHANGE,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS)) {
            return Err(e);
        }
    }
    let aside = a.with_extension("swap");
    std::fs::rename(b, &aside)?;
    std::fs::rename(a, b)?;
    std::fs::rename(&aside, a)
}

/// sha256 of a whole file, as lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = open_regular(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// Maps a file read-only. Callers keep the rule that makes this sound: the files mapped (feature
/// banks, the item-vector cache) are replaced by rename, never written in place, and a rename
/// leaves an existing mapping intact.
pub fn map_readonly(file: &File) -> std::io::Result<memmap2::Mmap> {
    // SAFETY: see above: nothing writes into a mapped file while it is mapped.
    unsafe { memmap2::Mmap::map(file) }
}

fn flock(file: &File, wait: bool) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::io::AsRawFd;
        let op = match wait {
            true => libc::LOCK_EX,
            false => libc::LOCK_EX | libc::LOCK_NB,
        };
        loop {
            // SAFETY: flock on a valid open descriptor.
            let r = unsafe { libc::flock(file.as_raw_fd(), op) };
            if r == 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
    let _ = (file, wait);
    Ok(())
}

/// Opens (creating it if needed) the lock file `path` and takes its exclusive lock: the one lock
/// helper of the crate (a bundle's writers, a batch run's journal). With `wait`, waits while
/// another process holds it; without, answers `None` at once when one does. The file is opened
/// without following a symbolic link (one at `path` is refused). The lock is released when the
/// file is dropped (or the process ends, however it ends).
pub fn lock_path(path: &Path, wait: bool) -> Result<Option<File>> {
    let file = open_no_follow(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false),
        path,
    )?;
    match flock(&file, wait) {
        Ok(()) => Ok(Some(file)),
        Err(e) if !wait && e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot lock {}", path.display())),
    }
}

/// Opens `path` with `opts` without following a symbolic link at its name (`O_NOFOLLOW`): a link
/// there is refused with a message naming it.
pub fn open_no_follow(opts: &mut std::fs::OpenOptions, path: &Path) -> Result<File> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.custom_flags(libc::O_NOFOLLOW);
    }
    match opts.open(path) {
        Ok(f) => Ok(f),
        Err(_) if is_symlink(path) => bail!(
            "refusing to open {}: it is a symbolic link (the runtime does not write through links)",
            path.display()
        ),
        Err(e) => Err(e).with_context(|| format!("cannot open {}", path.display())),
    }
}

/// Whether `path` itself (not what it points to) is a symbolic link.
pub fn is_symlink(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
}

/// Makes sure `dir`, a folder the runtime owns (a bundle's `cache/`), is a real folder: creates
/// it when missing; a symbolic link or a file there is refused with a message naming it, so
/// nothing is written wherever it points.
pub fn owned_dir(dir: &Path) -> Result<()> {
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_symlink() => bail!(
            "refusing to write into {}: it is a symbolic link, and the runtime writes only inside its own folders (replace the link with a folder)",
            dir.display()
        ),
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => bail!("{} exists and is not a folder", dir.display()),
        Err(_) => {
            let (parent, _) = split_path(dir)?;
            ensure_folder(&parent, dir)?;
            match std::fs::create_dir(dir) {
                Ok(()) => Ok(()),
                // Made by another process meanwhile: check it again.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => match std::fs::symlink_metadata(dir) {
                    Ok(m) if m.is_dir() => Ok(()),
                    _ => bail!("{} exists and is not a folder", dir.display()),
                },
                Err(e) => Err(e).with_context(|| format!("cannot create {}", dir.display())),
            }
        }
    }
}

/// What [`write_owned`] found at the file's name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Replaced {
    /// A regular file or nothing.
    File,
    /// A symbolic link (to this target), replaced by the file: the target was not touched.
    Link(PathBuf),
}

impl Replaced {
    /// A one-line note for a replaced link (None when there was none).
    pub fn note(&self, path: &Path) -> Option<String> {
        match self {
            Replaced::File => None,
            Replaced::Link(target) => Some(format!(
                "{} was a symbolic link to {}: replaced the link with the file (its target was not written)",
                path.display(),
                target.display()
            )),
        }
    }
}

/// Writes a file inside a folder the runtime owns (the bundle, its `cache/`), atomically as
/// [`write_atomic`] does, but following nothing (see the module doc): the folder must be a real
/// folder, not a link; a symbolic link at the file's name is replaced by the new file (the
/// rename replaces the link, never its target) and reported in the result; a device, FIFO or
/// folder at the name is refused.
pub fn write_owned(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> Result<()>,
) -> Result<Replaced> {
    let result = (|| -> Result<Replaced> {
        let (dir, _) = split_path(path)?;
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.file_type().is_symlink() => bail!(
                "the folder {} is a symbolic link, and the runtime writes only inside its own folders",
                dir.display()
            ),
            _ => ensure_folder(&dir, path)?,
        }
        let replaced = match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_symlink() => {
                Replaced::Link(std::fs::read_link(path).unwrap_or_else(|_| PathBuf::from("?")))
            }
            Ok(m) if m.is_dir() => bail!("{} is a directory, not a file", path.display()),
            Ok(m) if !m.is_file() => bail!(
                "{} is not a regular file (a device, FIFO or socket is not replaced)",
                path.display()
            ),
            _ => Replaced::File,
        };
        // `temp_beside` creates the temporary with O_EXCL (no link is followed there) and takes
        // the mode of what `path` leads to only for a regular file of ours.
        let mut tmp = temp_beside(path)?;
        if replaced != Replaced::File {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                tmp.as_file()
                    .set_permissions(std::fs::Permissions::from_mode(0o644))?;
            }
        }
        let mut out = BufWriter::new(tmp.as_file_mut());
        write(&mut out)?;
        out.flush()?;
        drop(out);
        tmp.as_file().sync_all()?;
        // rename(2) replaces the name itself: a link there is replaced, its target untouched.
        persist(tmp.into_temp_path(), path)?;
        Ok(replaced)
    })();
    result.with_context(|| format!("cannot write {}", path.display()))
}

/// The device and inode of what `path` leads to (symlinks followed), if it exists.
pub fn file_id(path: &Path) -> Option<(u64, u64)> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

/// Whether two paths lead to the same file: the same name, a symbolic link to it or a hard link
/// of it (same device and inode).
pub fn same_file(a: &Path, b: &Path) -> bool {
    matches!((file_id(a), file_id(b)), (Some(x), Some(y)) if x == y)
}

/// Refuses an output that is one of the command's inputs (see [`same_file`]): writing it would
/// destroy what the command reads. `what` names the output's flag (`--output`).
pub fn refuse_input_as_output(output: &Path, what: &str, inputs: &[&Path]) -> Result<()> {
    for input in inputs {
        if same_file(output, input) {
            bail!(
                "{what} {} is the input {} (the same file{}): refusing to overwrite what the command reads; choose another output",
                output.display(),
                input.display(),
                match (output == *input, is_symlink(output) || is_symlink(input)) {
                    (true, _) => "",
                    (false, true) => ", through a symbolic link",
                    (false, false) => ", through a hard link",
                }
            );
        }
    }
    Ok(())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Opens an input file for reading, refusing anything but a regular file (a directory, a FIFO
/// that would block forever, a device) with a message that names the path.
pub fn open_regular(path: &Path) -> Result<File> {
    check_regular(path)?;
    File::open(path).with_context(|| format!("cannot open {}", path.display()))
}

/// Reads a whole regular file (see [`open_regular`]).
pub fn read_regular(path: &Path) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    open_regular(path)?
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(bytes)
}

/// Reads a whole regular file as UTF-8 text.
pub fn read_regular_string(path: &Path) -> Result<String> {
    String::from_utf8(read_regular(path)?)
        .map_err(|_| anyhow::anyhow!("{} is not UTF-8 text", path.display()))
}

/// Fails unless `path` (after following symlinks) is a regular file.
pub fn check_regular(path: &Path) -> Result<()> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot open {}", path.display()))?;
    anyhow::ensure!(
        !meta.is_dir(),
        "{} is a directory, not a file",
        path.display()
    );
    anyhow::ensure!(
        meta.is_file(),
        "{} is not a regular file (a FIFO, socket or device cannot be read as input)",
        path.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str) -> Result<()> {
        write_atomic(path, |w| Ok(w.write_all(text.as_bytes())?))
    }

    #[test]
    fn replaces_a_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.txt");
        write(&p, "one").unwrap();
        write(&p, "two").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[cfg(unix)]
    #[test]
    fn keeps_the_mode_of_the_file_it_replaces() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.txt");
        std::fs::write(&p, "old").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        write(&p, "new").unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        let fresh = dir.path().join("fresh.txt");
        write(&fresh, "x").unwrap();
        let usual = dir.path().join("usual.txt");
        std::fs::write(&usual, "x").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            mode(&fresh),
            mode(&usual),
            "a new file gets the usual mode, not 0600"
        );
    }

    #[cfg(unix)]
    #[test]
    fn writes_through_symlinks_and_special_files() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("real.txt");
        std::fs::write(&target, "old").unwrap();
        let link = dir.path().join("link.txt");
        std::os::unix::fs::symlink("real.txt", &link).unwrap();
        write(&link, "new").unwrap();
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "new");
        // A dangling link gets its target created.
        let dangling = dir.path().join("dangling");
        std::os::unix::fs::symlink("made.txt", &dangling).unwrap();
        write(&dangling, "made").unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("made.txt")).unwrap(),
            "made"
        );
        // /dev/null stays a device.
        write(Path::new("/dev/null"), "discarded").unwrap();
        assert!(!std::fs::metadata("/dev/null").unwrap().is_file());
        let err = write(dir.path(), "x").unwrap_err();
        assert!(format!("{err:#}").contains("is a directory"), "{err:#}");
        let err = write(&dir.path().join("missing/out.txt"), "x").unwrap_err();
        assert!(format!("{err:#}").contains("does not exist"), "{err:#}");
    }

    #[test]
    fn stale_temporaries_of_dead_writers_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.bin");
        // A pid far above any pid_max: never running.
        let dead = dir.path().join(".out.bin.tmp-2147483600");
        let dead_new = dir.path().join(".out.bin.tmp-2147483601.AbCdEf");
        let live = dir
            .path()
            .join(format!(".out.bin.tmp-{}.x", std::process::id()));
        let other = dir.path().join(".other.bin.tmp-2147483600");
        for f in [&dead, &dead_new, &live, &other] {
            std::fs::write(f, "junk").unwrap();
        }
        write(&p, "data").unwrap();
        assert!(!dead.exists() && !dead_new.exists());
        assert!(live.exists(), "a running writer's file is left alone");
        assert!(other.exists(), "another name's file is left alone");
        assert_eq!(temp_owner(".out.bin.tmp-12.Ab", "out.bin"), Some(12));
        assert_eq!(temp_owner(".out.bin.tmp-12x", "out.bin"), None);
        assert_eq!(temp_owner(".out.bin.tmp-", "out.bin"), None);
    }

    #[test]
    fn replace_dir_switches_in_one_step() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("bundle");
        replace_dir(&d, |p| Ok(std::fs::write(p.join("a"), "1")?)).unwrap();
        assert_eq!(std::fs::read_to_string(d.join("a")).unwrap(), "1");
        replace_dir(&d, |p| Ok(std::fs::write(p.join("b"), "2")?)).unwrap();
        assert!(!d.join("a").exists());
        assert_eq!(std::fs::read_to_string(d.join("b")).unwrap(), "2");
        // A failed build leaves the old folder as it was and nothing beside it.
        let err = replace_dir(&d, |_| bail!("boom")).unwrap_err();
        assert!(err.to_string().contains("boom"));
        assert_eq!(std::fs::read_to_string(d.join("b")).unwrap(), "2");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // A file is never exchanged for a folder.
        let f = dir.path().join("file");
        std::fs::write(&f, "mine").unwrap();
        let err = replace_dir(&f, |_| Ok(())).unwrap_err();
        assert!(err.to_string().contains("is not a folder"), "{err}");
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "mine");
    }

    #[cfg(unix)]
    #[test]
    fn owned_writes_never_follow_links() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let owned = dir.path().join("bundle");
        std::fs::create_dir(&owned).unwrap();
        // A link at the file's name: replaced, its target untouched, and said.
        let link = owned.join("cache.bin");
        symlink(&victim, &link).unwrap();
        let r = write_owned(&link, |w| Ok(w.write_all(b"cache")?)).unwrap();
        assert_eq!(r, Replaced::Link(victim.clone()));
        assert!(r.note(&link).unwrap().contains("symbolic link"));
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert!(std::fs::symlink_metadata(&link).unwrap().is_file());
        assert_eq!(
            write_owned(&link, |w| Ok(w.write_all(b"again")?)).unwrap(),
            Replaced::File
        );
        // A folder that is a link: refused, nothing written where it points.
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        let cache = owned.join("cache");
        symlink(&elsewhere, &cache).unwrap();
        let e = owned_dir(&cache).unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        let e = write_owned(&cache.join("x"), |w| Ok(w.write_all(b"x")?)).unwrap_err();
        assert!(format!("{e:#}").contains("symbolic link"), "{e:#}");
        assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
        owned_dir(&owned.join("real")).unwrap();
        owned_dir(&owned.join("real")).unwrap();
        // A lock file that is a link is refused; a held lock answers None without waiting.
        let lock_link = owned.join("lock");
        symlink(&victim, &lock_link).unwrap();
        assert!(lock_path(&lock_link, false).is_err());
        let lock = owned.join("real.lock");
        let held = lock_path(&lock, false).unwrap();
        assert!(held.is_some());
        assert!(lock_path(&lock, false).unwrap().is_none());
        drop(held);
        assert!(lock_path(&lock, true).unwrap().is_some());
    }

    #[cfg(unix)]
    #[test]
    fn an_output_that_is_an_input_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in");
        std::fs::write(&input, "data").unwrap();
        let hard = dir.path().join("hard");
        std::fs::hard_link(&input, &hard).unwrap();
        let soft = dir.path().join("soft");
        std::os::unix::fs::symlink(&input, &soft).unwrap();
        for out in [&input, &hard, &soft] {
            let e = refuse_input_as_output(out, "--output", &[&input]).unwrap_err();
            assert!(e.to_string().contains("is the input"), "{e}");
        }
        let e = refuse_input_as_output(&hard, "--output", &[&input]).unwrap_err();
        assert!(e.to_string().contains("hard link"), "{e}");
        refuse_input_as_output(&dir.path().join("new"), "--output", &[&input]).unwrap();
        std::fs::write(dir.path().join("other"), "data").unwrap();
        refuse_input_as_output(&dir.path().join("other"), "--output", &[&input]).unwrap();
    }
}
