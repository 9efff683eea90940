//! Errors of the image catalog and the download cache, each with a hint.

use std::path::PathBuf;

use super::catalog::CatalogError;
use super::checksum::{Checksum, SumsError};

/// Something the cache could not do.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),

    #[error("no image `{name}` in the catalog (available: {})", available.join(", "))]
    UnknownImage {
        name: String,
        available: Vec<String>,
    },

    #[error("cannot reach {url}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },

    #[error("{url} answered {status}")]
    HttpStatus { url: String, status: u16 },

    #[error("the download of {url} kept failing ({attempts} attempts)")]
    Transfer {
        url: String,
        attempts: u32,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    #[error("checksum mismatch for {url}: expected {expected}, got {actual} (the partial file {} was deleted)", part.display())]
    ChecksumMismatch {
        url: String,
        part: PathBuf,
        expected: Checksum,
        actual: Checksum,
    },

    #[error("checksum mismatch for {}: expected {expected}, got {actual}", path.display())]
    ImportMismatch {
        path: PathBuf,
        expected: Checksum,
        actual: Checksum,
    },

    #[error("cannot get the checksum of `{file}` from {source_name}")]
    ChecksumList {
        file: String,
        source_name: String,
        #[source]
        source: SumsError,
    },

    #[error("no checksum for {} in {}: no checksum file beside it and {url} is unreachable", file.display(), dir.display())]
    NoChecksumOffline {
        file: PathBuf,
        dir: PathBuf,
        url: String,
        #[source]
        source: Box<CacheError>,
    },

    #[error("image `{name}` is not in the cache ({})", dir.display())]
    NotCached { name: String, dir: PathBuf },

    #[error("cached file {} changed: expected {expected}, got {actual}", path.display())]
    CachedFileChanged {
        name: String,
        path: PathBuf,
        expected: Checksum,
        actual: Checksum,
    },

    #[error("the recipe of image `{name}` is missing: {recipe}")]
    RecipeMissing { name: String, recipe: String },

    #[error("building image `{name}` with {} failed ({status}){}", recipe.display(), tail_suffix(tail))]
    BuildFailed {
        name: String,
        recipe: PathBuf,
        status: String,
        tail: Vec<String>,
    },

    #[error("the recipe {} exited 0 but did not write {}", recipe.display(), missing.display())]
    BuildOutputMissing {
        name: String,
        recipe: PathBuf,
        missing: PathBuf,
    },

    #[error("cannot {op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("invalid manifest {}", path.display())]
    Manifest {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("cannot set up the HTTP client")]
    Client {
        #[source]
        source: reqwest::Error,
    },
}

fn tail_suffix(tail: &[String]) -> String {
    match tail.last() {
        Some(l) => format!(": {l}"),
        None => String::new(),
    }
}

impl CacheError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CacheError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// What the user can do about it.
    pub fn hint(&self) -> String {
        match self {
            CacheError::Catalog(e) => e.hint(),
            CacheError::UnknownImage { .. } => {
                "`kthw-lab image list` shows the catalog; add images/NAME.yaml to define a new image".into()
            }
            CacheError::Unreachable { url, .. } => format!(
                "this host cannot reach {url}: download the file elsewhere and use `kthw-lab cache import DIR`"
            ),
            CacheError::HttpStatus { status, .. } if *status == 404 || *status == 410 => {
                "the file is gone upstream: update the URL in the catalog entry (images/NAME.yaml), or import a copy with `kthw-lab cache import DIR`".into()
            }
            CacheError::HttpStatus { .. } => {
                "the server refused the download; try again later, or import a copy with `kthw-lab cache import DIR`".into()
            }
            CacheError::Transfer { .. } => {
                "run the command again: it resumes from the partial file; or import a copy with `kthw-lab cache import DIR`".into()
            }
            CacheError::ChecksumMismatch { .. } => {
                "the download was corrupted or the upstream file changed; run `kthw-lab image pull NAME` again, or import a verified copy with `kthw-lab cache import DIR`".into()
            }
            CacheError::ImportMismatch { .. } => {
                "this copy is not the file the catalog expects (corrupted, or another release): download it again".into()
            }
            CacheError::ChecksumList { .. } => {
                "the checksum file does not list this image: the catalog's file name or checksum URL is out of date (images/NAME.yaml)".into()
            }
            CacheError::NoChecksumOffline { url, .. } => {
                let file = super::catalog::url_file_name(url).unwrap_or("the checksum file");
                format!("put {file} (from {url}) in the same directory and import again")
            }
            CacheError::NotCached { name, .. } => {
                format!("fetch it first with `kthw-lab image pull {name}` (or `kthw-lab image build {name}`)")
            }
            CacheError::CachedFileChanged { name, .. } => format!(
                "the cached copy was modified or damaged on disk and is no longer trusted; `kthw-lab image pull {name}` (or `image build {name}`) fetches it again"
            ),
            CacheError::RecipeMissing { .. } => {
                "run kthw-lab from a checkout of its repository (the recipe lives in images/), or pass a directory holding images/ with its recipe".into()
            }
            CacheError::BuildFailed { status, recipe, .. } if status.starts_with("could not start") => {
                format!(
                    "the recipe must be an executable file with a #! line: chmod +x {}",
                    recipe.display()
                )
            }
            CacheError::BuildFailed { .. } => {
                "read the recipe's output above; the partial build was removed, so running the build again starts clean".into()
            }
            CacheError::BuildOutputMissing { .. } => {
                "the recipe and the catalog entry disagree on the artifact names (images/NAME.yaml: disk, kernel, initrd)".into()
            }
            CacheError::Io { .. } => {
                "check the permissions and free space of the state directory (--state-dir)".into()
            }
            CacheError::Manifest { path, .. } => format!(
                "delete {} and fetch the image again",
                path.parent().unwrap_or(path).display()
            ),
            CacheError::Client { .. } => "the TLS setup of this host failed; check its CA certificates".into(),
        }
    }
}
