//! One advisory lock (flock) per cache entry, so two labs or processes never fetch
//! or build the same thing at once: the second waits, then finds the work done.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use super::error::CacheError;
use super::progress::Progress;

/// Held while an entry is checked, fetched or built; released on drop (and by the
/// kernel if the process dies, so a crash never leaves a stale lock).
#[derive(Debug)]
pub struct EntryLock {
    _file: File,
    pub path: PathBuf,
}

fn open(path: &Path) -> Result<File, CacheError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| CacheError::io("create", dir, e))?;
    }
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| CacheError::io("open the lock file", path, e))
}

/// Take the lock, waiting (without blocking the async runtime) while another
/// process or thread holds it.
pub async fn lock(path: &Path, what: &str, progress: Progress) -> Result<EntryLock, CacheError> {
    let file = open(path)?;
    if fs2::FileExt::try_lock_exclusive(&file).is_err() {
        progress.note(&format!(
            "waiting for another kthw-lab that is fetching or building {what} (lock {})",
            path.display()
        ));
        let owned = path.to_path_buf();
        let file =
            tokio::task::spawn_blocking(move || fs2::FileExt::lock_exclusive(&file).map(|()| file))
                .await
                .expect("the lock task does not panic")
                .map_err(|e| CacheError::io("lock", &owned, e))?;
        return Ok(EntryLock {
            _file: file,
            path: owned,
        });
    }
    Ok(EntryLock {
        _file: file,
        path: path.to_path_buf(),
    })
}

/// The same, for synchronous callers.
pub fn lock_blocking(path: &Path, what: &str, progress: Progress) -> Result<EntryLock, CacheError> {
    let file = open(path)?;
    if fs2::FileExt::try_lock_exclusive(&file).is_err() {
        progress.note(&format!(
            "waiting for another kthw-lab that is fetching or building {what} (lock {})",
            path.display()
        ));
        fs2::FileExt::lock_exclusive(&file).map_err(|e| CacheError::io("lock", path, e))?;
    }
    Ok(EntryLock {
        _file: file,
        path: path.to_path_buf(),
    })
}
