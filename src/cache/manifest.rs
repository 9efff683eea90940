//! The small JSON record written beside every cached entry: where it came from,
//! when, and the size and digest of each file, so `verify` can re-check it later.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::checksum::Checksum;
use super::error::CacheError;

/// One file of a cached entry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ArtifactRecord {
    /// File name inside the entry's directory (or the entry's own name).
    pub file: String,
    pub size: u64,
    pub checksum: Checksum,
}

/// The record of one cached entry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    /// Image name, or the file name for a plain fetch.
    pub name: String,
    /// `download`, `import` or `build`.
    pub source: String,
    /// The URL the file came from (for an import: the catalog's first URL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Where the expected digest came from: `pinned`, a checksum-file URL or path,
    /// or `recipe` for a local build (whose digests are recorded, not checked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum_source: Option<String>,
    /// For a build: the sha256 of the recipe that produced it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipe_sha256: Option<String>,
    /// RFC 3339, UTC.
    pub fetched_at: String,
    pub artifacts: Vec<ArtifactRecord>,
}

impl Manifest {
    pub fn read(path: &Path) -> Result<Option<Manifest>, CacheError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(CacheError::io("read", path, e)),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|source| CacheError::Manifest {
                path: path.to_path_buf(),
                source,
            })
    }

    /// Write atomically (temp file, fsync, rename).
    pub fn write(&self, path: &Path) -> Result<(), CacheError> {
        let mut text = serde_json::to_string_pretty(self).expect("a manifest serializes");
        text.push('\n');
        write_atomic(path, text.as_bytes())
    }

    pub fn artifact(&self, file: &str) -> Option<&ArtifactRecord> {
        self.artifacts.iter().find(|a| a.file == file)
    }
}

pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> Result<(), CacheError> {
    use std::io::Write;
    let tmp = sibling(path, ".tmp");
    let res = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(CacheError::io("write", path, e));
    }
    sync_parent(path);
    Ok(())
}

/// `path` with `suffix` appended to its file name.
pub(crate) fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

/// Make a rename durable; failure only weakens durability, so it is ignored.
pub(crate) fn sync_parent(path: &Path) {
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

/// The current time as RFC 3339 UTC, e.g. `2026-11-22T01:02:03Z`.
pub fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    rfc3339(secs)
}

/// Format seconds since the Unix epoch as RFC 3339 UTC.
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (era arithmetic over
/// 400-year cycles of 146097 days, years starting in March).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(4_102_444_799), "2099-12-31T23:59:59Z");
    }

    #[test]
    fn manifest_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.json");
        assert_eq!(Manifest::read(&p).unwrap(), None);
        let m = Manifest {
            name: "x".into(),
            source: "download".into(),
            url: Some("http://127.0.0.1/x".into()),
            checksum_source: Some("pinned".into()),
            recipe_sha256: None,
            fetched_at: now_rfc3339(),
            artifacts: vec![ArtifactRecord {
                file: "x".into(),
                size: 3,
                checksum: format!("sha256:{}", "0".repeat(64)).parse().unwrap(),
            }],
        };
        m.write(&p).unwrap();
        assert_eq!(Manifest::read(&p).unwrap(), Some(m));
    }
}
