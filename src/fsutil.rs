//! Making directory entries durable: the lowest layer, used by the log, the store, the processor and ops.
//!
//! `fsync` of a file makes its bytes durable, not its name: a new file or directory survives a power
//! cut only once the directory holding it has been synced too. ext4 often carries a new entry along
//! with a later sync, but a durability promise cannot rest on that, so every directory eps creates goes
//! through [`create_dir_durable`], and every new file's directory through [`sync_dir`], before anything
//! in it is acknowledged or committed.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// Syncs the directory `dir` (its entries: files created, renamed or removed in it).
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `path` and any missing parents like `create_dir_all`, and makes each new entry durable by
/// syncing the directory that holds it. The entry of `path` itself is synced into its parent even when
/// `path` already existed: an earlier run may have created it and stopped before syncing.
pub fn create_dir_durable(path: &Path) -> io::Result<()> {
    let mut missing: Vec<PathBuf> = Vec::new();
    let mut at = Some(path);
    while let Some(dir) = at {
        if dir.as_os_str().is_empty() || dir.is_dir() {
            break;
        }
        missing.push(dir.to_path_buf());
        at = dir.parent();
    }
    for dir in missing.iter().rev() {
        match std::fs::create_dir(dir) {
            Ok(()) => {}
            // Another process created it meanwhile: it still needs its entry synced below.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => {}
            Err(e) => return Err(with_path(e, "cannot create the directory", dir)),
        }
        sync_parent(dir)?;
    }
    if missing.is_empty() {
        sync_parent(path)?;
    }
    Ok(())
}

fn sync_parent(dir: &Path) -> io::Result<()> {
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    sync_dir(parent).map_err(|e| with_path(e, "cannot sync the directory", parent))
}

/// The error with the operation and the path in its text, so the operator knows what failed where.
pub fn with_path(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

/// Space on the filesystem holding `path`: (bytes available to an unprivileged user, total bytes).
/// What the server's `eps_data_dir_*_bytes` gauges show, so "disk nearly full" is alertable from eps's
/// own `/metrics`.
pub fn disk_space(path: &Path) -> io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is a valid NUL-terminated string and stat a writable statvfs for the call.
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let block = stat.f_frsize as u64;
    Ok((stat.f_bavail as u64 * block, stat.f_blocks as u64 * block))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_every_missing_level_and_accepts_an_existing_one() {
        let tmp = tempfile::tempdir().unwrap();
        let deep = tmp.path().join("a/b/c");
        create_dir_durable(&deep).unwrap();
        assert!(deep.is_dir());
        create_dir_durable(&deep).unwrap();
        let file = tmp.path().join("f");
        std::fs::write(&file, "x").unwrap();
        let err = create_dir_durable(&file.join("d")).unwrap_err();
        assert!(err.to_string().contains("cannot create the directory"), "{err}");
    }
}
