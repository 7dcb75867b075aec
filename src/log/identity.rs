//! The file log's identity: a random id written once, durably, in the log directory (`log/log-id`).
//!
//! Byte positions say nothing about which log they are positions of: a log directory deleted and
//! started again, or a processor pointed at another data directory with the same store, has positions
//! that look valid and hold other events. The store binds the file log's checkpoint to this id
//! (see `processor::bind_log_identity`), so a processor refuses a log whose id is not the one its
//! checkpoint counts.
//!
//! The id is made when the log is opened by its writer (the server, holding the directory's writer
//! lock) and has none: a new log, or one an older eps made. Written to a temporary file, synced, renamed
//! into place, the directory synced: after a crash it is whole or absent.

use std::io::{self, Write as _};
use std::path::Path;

use rand::Rng as _;

/// File name of the id, inside the log directory.
pub const LOG_ID_FILE: &str = "log-id";

/// The log's identity as the store records it: `file log <32 hex digits>`.
pub fn read(dir: &Path) -> io::Result<Option<String>> {
    match std::fs::read_to_string(dir.join(LOG_ID_FILE)) {
        Ok(text) => {
            let id = text.trim();
            if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} does not hold a log id: {:?}", dir.join(LOG_ID_FILE).display(), text),
                ));
            }
            Ok(Some(format!("file log {id}")))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(crate::fsutil::with_path(e, "reading", &dir.join(LOG_ID_FILE))),
    }
}

/// The log's identity, made (durably) if the existing directory `dir` has none yet. Only the log's
/// writer calls it, holding the directory's writer lock, so no two processes make one at once.
pub fn ensure(dir: &Path) -> io::Result<String> {
    if let Some(id) = read(dir)? {
        return Ok(id);
    }
    let id = format!("{:032x}", rand::rng().random::<u128>());
    let tmp = dir.join(format!(".{LOG_ID_FILE}.tmp"));
    let path = dir.join(LOG_ID_FILE);
    (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(format!("{id}\n").as_bytes())?;
        file.sync_all()?;
        // Whole or absent: a crash leaves at most the temporary file, replaced next time.
        std::fs::rename(&tmp, &path)
    })()
    .map_err(|e| crate::fsutil::with_path(e, "writing", &path))?;
    crate::fsutil::sync_dir(dir)?;
    read(dir)?.ok_or_else(|| io::Error::other(format!("{} vanished", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()).unwrap(), None);
        let id = ensure(dir.path()).unwrap();
        assert!(id.starts_with("file log ") && id.len() == "file log ".len() + 32, "{id}");
        assert_eq!(ensure(dir.path()).unwrap(), id);
        assert_eq!(read(dir.path()).unwrap(), Some(id.clone()));
        let other = tempfile::tempdir().unwrap();
        assert_ne!(ensure(other.path()).unwrap(), id);
        // Only the id is left in the directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
