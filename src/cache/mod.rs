//! The image catalog and the verified download cache shared by every lab.
//!
//! Layout under `<state_dir>/cache/`:
//! ```text
//! images/NAME/                  one directory per image
//!   FILE                        a downloaded disk (its upstream file name), or
//!   disk.qcow2 vmlinuz ...      the artifacts of a local build (plus the recipe's manifest.json)
//!   entry.json                  the cache's record: source, URL, size and digest per file
//!   FILE.part                   an unfinished download (resumed next time)
//! images/NAME.lock              flock held while NAME is checked, fetched or built
//! images/.NAME.build-*          a build in progress (moved to images/NAME when it succeeds)
//! components/NAME-VERSION       plain fetches ([`fetch`]), each with .manifest.json and .lock
//! ```
//! An entry counts as cached only when its `entry.json` exists and every file it
//! lists has the recorded size; `verify` re-hashes the files against the record (and
//! against the catalog's pinned digest, when there is one).

mod build;
pub mod catalog;
pub mod checksum;
mod error;
pub mod fetch;
mod import;
pub mod lock;
pub mod manifest;
mod progress;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use catalog::{
    BootMethod, Catalog, CatalogError, ChecksumSpec, DiskFormat, FirstBoot, ImageSource, ImageSpec,
    BUILTIN_IMAGE_NAMES,
};
pub use checksum::{Algorithm, Checksum};
pub use error::CacheError;
pub use fetch::{fetch, fetch_with, FetchOptions, Fetched};
pub use import::{ImportItem, ImportOutcome, ImportReport};
pub use manifest::{ArtifactRecord, Manifest};
pub use progress::Progress;

use manifest::sibling;

/// The cache's record inside an image directory (the recipe's own is manifest.json).
pub(crate) const ENTRY_MANIFEST: &str = "entry.json";

/// An image ready to use: paths of its files and how to boot it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedImage {
    pub name: String,
    pub dir: PathBuf,
    pub disk: PathBuf,
    pub format: DiskFormat,
    pub boot: BootMethod,
    pub first_boot: FirstBoot,
    /// Present for direct-kernel boot.
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    /// The recipe's own `manifest.json` (kernel command line, packages), if it wrote one.
    pub recipe_manifest: Option<PathBuf>,
    pub manifest: Manifest,
    /// Whether this call downloaded or built it (false: it was already cached).
    pub fetched: bool,
}

/// The result of re-hashing a cached image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub name: String,
    pub files: Vec<ArtifactRecord>,
    pub bytes: u64,
    pub elapsed: Duration,
}

/// The cache under one state directory.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
    opts: FetchOptions,
}

impl Cache {
    /// The cache of a state directory (`<state_dir>/cache`).
    pub fn new(state_dir: &Path) -> Cache {
        Cache::at(crate::state::cache_dir(state_dir))
    }

    /// A cache rooted exactly at `root`.
    pub fn at(root: impl Into<PathBuf>) -> Cache {
        Cache {
            root: root.into(),
            opts: FetchOptions::default(),
        }
    }

    pub fn with_options(mut self, opts: FetchOptions) -> Cache {
        self.opts = opts;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn options(&self) -> &FetchOptions {
        &self.opts
    }

    pub fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }

    pub fn image_dir(&self, name: &str) -> PathBuf {
        self.images_dir().join(name)
    }

    pub(crate) fn image_lock(&self, name: &str) -> PathBuf {
        self.images_dir().join(format!("{name}.lock"))
    }

    fn entry_manifest(&self, name: &str) -> PathBuf {
        self.image_dir(name).join(ENTRY_MANIFEST)
    }

    /// Where a component binary or archive is cached, e.g. `components/etcd-3.5.21`.
    pub fn component_path(&self, name: &str, version: &str) -> PathBuf {
        self.root
            .join("components")
            .join(format!("{name}-{version}"))
    }

    /// [`fetch_with`] using this cache's options.
    pub async fn fetch(
        &self,
        url: &str,
        expected: &Checksum,
        dest: &Path,
        progress: Progress,
    ) -> Result<Fetched, CacheError> {
        fetch_with(&self.opts, &[url.to_string()], expected, dest, progress).await
    }

    /// The record of a complete cached entry, if there is one.
    pub fn cached(&self, spec: &ImageSpec) -> Option<Manifest> {
        let m = Manifest::read(&self.entry_manifest(&spec.name)).ok()??;
        self.is_complete(spec, &m).then_some(m)
    }

    fn is_complete(&self, spec: &ImageSpec, m: &Manifest) -> bool {
        let dir = self.image_dir(&spec.name);
        let source_ok = match &spec.source {
            ImageSource::Download { .. } => m.source == "download" || m.source == "import",
            ImageSource::Build { .. } => m.source == "build",
        };
        source_ok
            && spec.artifact_names().iter().all(|name| {
                m.artifact(name).is_some_and(|rec| {
                    std::fs::metadata(dir.join(name)).is_ok_and(|md| md.len() == rec.size)
                })
            })
            && match &spec.source {
                ImageSource::Download {
                    checksum: ChecksumSpec::Pinned(pin),
                    ..
                } => m.artifact(&spec.disk).is_some_and(|r| r.checksum == *pin),
                ImageSource::Build {
                    recipe_path: Some(recipe),
                    ..
                } => recipe_unchanged(recipe, m),
                _ => true,
            }
    }

    fn image_for(&self, spec: &ImageSpec, manifest: Manifest, fetched: bool) -> CachedImage {
        let dir = self.image_dir(&spec.name);
        let recipe_manifest = dir.join("manifest.json");
        CachedImage {
            name: spec.name.clone(),
            disk: dir.join(&spec.disk),
            format: spec.format,
            boot: spec.boot,
            first_boot: spec.first_boot,
            kernel: spec.kernel.as_ref().map(|k| dir.join(k)),
            initrd: spec.initrd.as_ref().map(|i| dir.join(i)),
            recipe_manifest: recipe_manifest.is_file().then_some(recipe_manifest),
            dir,
            manifest,
            fetched,
        }
    }

    /// Make `name` available: return it when cached, else download and verify it or
    /// build it, as its catalog entry says. Holds the entry's lock throughout, so a
    /// concurrent caller waits and then finds it done.
    pub async fn ensure_image(
        &self,
        catalog: &Catalog,
        name: &str,
        progress: Progress,
    ) -> Result<CachedImage, CacheError> {
        let spec = lookup(catalog, name)?;
        let _lock = lock::lock(&self.image_lock(name), name, progress).await?;
        if let Some(m) = self.cached(spec) {
            return Ok(self.image_for(spec, m, false));
        }
        let m = match &spec.source {
            ImageSource::Download { .. } => self.pull_locked(spec, progress).await?,
            ImageSource::Build { .. } => build::build_locked(self, spec, progress).await?,
        };
        Ok(self.image_for(spec, m, true))
    }

    /// Build a `source: build` image even when it is cached (`force`), or only when
    /// it is missing; a download entry is pulled like [`Cache::ensure_image`].
    pub async fn build_image(
        &self,
        catalog: &Catalog,
        name: &str,
        progress: Progress,
        force: bool,
    ) -> Result<CachedImage, CacheError> {
        let spec = lookup(catalog, name)?;
        if !force || !matches!(spec.source, ImageSource::Build { .. }) {
            return self.ensure_image(catalog, name, progress).await;
        }
        let _lock = lock::lock(&self.image_lock(name), name, progress).await?;
        let m = build::build_locked(self, spec, progress).await?;
        Ok(self.image_for(spec, m, true))
    }

    async fn pull_locked(
        &self,
        spec: &ImageSpec,
        progress: Progress,
    ) -> Result<Manifest, CacheError> {
        let ImageSource::Download {
            urls,
            file,
            checksum,
        } = &spec.source
        else {
            unreachable!("pull of a build entry");
        };
        let dir = self.image_dir(&spec.name);
        std::fs::create_dir_all(&dir).map_err(|e| CacheError::io("create", &dir, e))?;
        let client = self.opts.client()?;
        let (expected, checksum_source) =
            resolve_expected(&client, &self.opts, checksum, file).await?;
        let manifest_path = dir.join(ENTRY_MANIFEST);
        // Drop the old record first: a crash must never leave a record describing
        // bytes that are no longer there.
        remove_if_exists(&manifest_path)?;
        let dest = dir.join(file);
        let mut url = None;
        let mut kept = None;
        if dest.exists() {
            // A file moved into place by a run that died before writing the record.
            let (sum, n) = fetch::hash_path(expected.algorithm, dest.clone()).await?;
            if sum == expected {
                kept = Some(n);
            } else {
                remove_if_exists(&dest)?;
            }
        }
        let size = match kept {
            Some(n) => n,
            None => {
                let label = format!("{}/{file}", spec.name);
                let got = fetch::download_verified(
                    &client, &self.opts, urls, &expected, &dest, &label, progress,
                )
                .await?;
                url = got.url;
                got.size
            }
        };
        let m = Manifest {
            name: spec.name.clone(),
            source: "download".into(),
            url: url.or_else(|| urls.first().cloned()),
            checksum_source: Some(checksum_source),
            recipe_sha256: None,
            fetched_at: manifest::now_rfc3339(),
            artifacts: vec![ArtifactRecord {
                file: file.clone(),
                size,
                checksum: expected,
            }],
        };
        m.write(&manifest_path)?;
        remove_strays(&dir, &[file.as_str(), ENTRY_MANIFEST]);
        Ok(m)
    }

    /// Re-hash a cached image's files against its record (and the catalog's pin).
    /// A mismatch also drops the entry's record, so the next ensure fetches again.
    pub fn verify_image(&self, catalog: &Catalog, name: &str) -> Result<VerifyReport, CacheError> {
        let spec = lookup(catalog, name)?;
        let _lock = lock::lock_blocking(&self.image_lock(name), name, Progress::Quiet)?;
        let dir = self.image_dir(name);
        let not_cached = || CacheError::NotCached {
            name: name.to_string(),
            dir: dir.clone(),
        };
        let m = Manifest::read(&dir.join(ENTRY_MANIFEST))?.ok_or_else(not_cached)?;
        let started = Instant::now();
        let mut files = Vec::new();
        let mut bytes = 0;
        for art in spec.artifact_names() {
            let rec = m.artifact(art).ok_or_else(not_cached)?;
            let expected = match &spec.source {
                ImageSource::Download {
                    checksum: ChecksumSpec::Pinned(pin),
                    ..
                } if art == spec.disk => pin.clone(),
                _ => rec.checksum.clone(),
            };
            let path = dir.join(art);
            if !path.is_file() {
                return Err(not_cached());
            }
            let (actual, size) = checksum::hash_file(expected.algorithm, &path)
                .map_err(|e| CacheError::io("read", &path, e))?;
            if actual != expected {
                // Forget the entry, so the next pull or build replaces it instead of
                // trusting a record that no longer describes the bytes.
                remove_if_exists(&dir.join(ENTRY_MANIFEST))?;
                return Err(CacheError::CachedFileChanged {
                    name: name.to_string(),
                    path,
                    expected,
                    actual,
                });
            }
            bytes += size;
            files.push(ArtifactRecord {
                file: art.to_string(),
                size,
                checksum: actual,
            });
        }
        Ok(VerifyReport {
            name: name.to_string(),
            files,
            bytes,
            elapsed: started.elapsed(),
        })
    }

    /// Fill the cache from a directory of already-downloaded files (offline).
    pub async fn import_dir(
        &self,
        catalog: &Catalog,
        dir: &Path,
        progress: Progress,
    ) -> Result<ImportReport, CacheError> {
        import::import_dir(self, catalog, dir, progress).await
    }

    /// Delete the whole cache (`destroy --purge-cache`). Entries being fetched right
    /// now by another process are not waited for: their downloads fail and can be
    /// run again.
    pub fn purge(&self) -> Result<(), CacheError> {
        match std::fs::remove_dir_all(&self.root) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(CacheError::io("remove", &self.root, e)),
        }
    }

    /// A table of the catalog and what is cached.
    pub fn render_list(&self, catalog: &Catalog) -> String {
        let mut rows = vec![[
            "NAME".to_string(),
            "SOURCE".into(),
            "BOOT".into(),
            "CACHED".into(),
            "SIZE".into(),
            "DIGEST".into(),
        ]];
        for spec in catalog.list() {
            let (cached, size, digest) = match self.cached(spec) {
                Some(m) => {
                    let size: u64 = m.artifacts.iter().map(|a| a.size).sum();
                    let digest = m
                        .artifact(&spec.disk)
                        .map(|a| a.checksum.short())
                        .unwrap_or_default();
                    (
                        format!("yes ({})", m.source),
                        indicatif::BinaryBytes(size).to_string(),
                        digest,
                    )
                }
                None => {
                    let part = sibling(&self.image_dir(&spec.name).join(&spec.disk), ".part");
                    match std::fs::metadata(&part) {
                        Ok(md) => (
                            format!("partial ({})", indicatif::BinaryBytes(md.len())),
                            "-".into(),
                            "-".into(),
                        ),
                        Err(_) => ("no".into(), "-".into(), "-".into()),
                    }
                }
            };
            rows.push([
                spec.name.clone(),
                spec.source_word().into(),
                spec.boot_word().into(),
                cached,
                size,
                digest,
            ]);
        }
        let mut widths = [0usize; 6];
        for r in &rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let mut out = String::new();
        for r in &rows {
            let mut line = String::new();
            for (i, (c, w)) in r.iter().zip(widths).enumerate() {
                if i + 1 == r.len() {
                    line.push_str(c);
                } else {
                    line.push_str(&format!("{c:<w$}  "));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// A built entry is current only while its recipe is the one that built it: an edited
/// recipe (say, a new first-boot path) must not keep serving the old image. A recipe
/// that cannot be read keeps the entry (the build would fail the same way).
fn recipe_unchanged(recipe: &Path, m: &Manifest) -> bool {
    use sha2::{Digest, Sha256};
    let (Some(recorded), Ok(bytes)) = (&m.recipe_sha256, std::fs::read(recipe)) else {
        return true;
    };
    hex::encode(Sha256::digest(&bytes)) == *recorded
}

fn lookup<'c>(catalog: &'c Catalog, name: &str) -> Result<&'c ImageSpec, CacheError> {
    catalog.get(name).ok_or_else(|| CacheError::UnknownImage {
        name: name.to_string(),
        available: catalog.names(),
    })
}

/// Remove files an earlier catalog entry left in an image directory (say, the
/// previous upstream file name), keeping `keep` and unfinished `.part` files.
pub(crate) fn remove_strays(dir: &Path, keep: &[&str]) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let is_file = e.file_type().is_ok_and(|t| t.is_file());
        if is_file && !keep.contains(&name.as_str()) && !name.ends_with(".part") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

pub(crate) fn remove_if_exists(path: &Path) -> Result<(), CacheError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CacheError::io("remove", path, e)),
    }
}

/// The digest a download must have, and where it came from.
pub(crate) async fn resolve_expected(
    client: &reqwest::Client,
    opts: &FetchOptions,
    spec: &ChecksumSpec,
    file: &str,
) -> Result<(Checksum, String), CacheError> {
    match spec {
        ChecksumSpec::Pinned(c) => Ok((c.clone(), "pinned".into())),
        ChecksumSpec::File { url, algorithm } => {
            let text = fetch::fetch_text(client, opts, url, 4 << 20).await?;
            let sum = checksum::find_in_sums(&text, *algorithm, file).map_err(|source| {
                CacheError::ChecksumList {
                    file: file.to_string(),
                    source_name: url.clone(),
                    source,
                }
            })?;
            Ok((sum, url.clone()))
        }
    }
}

/// [`Cache::ensure_image`] on the cache of `state_dir`.
pub async fn ensure_image(
    catalog: &Catalog,
    name: &str,
    state_dir: &Path,
    progress: Progress,
) -> Result<CachedImage, CacheError> {
    Cache::new(state_dir)
        .ensure_image(catalog, name, progress)
        .await
}

/// [`Cache::verify_image`] on the cache of `state_dir` (blocking: it hashes files).
pub fn verify_image(
    catalog: &Catalog,
    name: &str,
    state_dir: &Path,
) -> Result<VerifyReport, CacheError> {
    Cache::new(state_dir).verify_image(catalog, name)
}

/// [`Cache::import_dir`] on the cache of `state_dir`.
pub async fn import_dir(
    catalog: &Catalog,
    dir: &Path,
    state_dir: &Path,
    progress: Progress,
) -> Result<ImportReport, CacheError> {
    Cache::new(state_dir)
        .import_dir(catalog, dir, progress)
        .await
}

/// [`Cache::render_list`] on the cache of `state_dir`.
pub fn render_list(catalog: &Catalog, state_dir: &Path) -> String {
    Cache::new(state_dir).render_list(catalog)
}

/// Synchronous wrappers for callers without a tokio runtime (each runs its own;
/// do not call them from inside one).
pub mod blocking {
    use super::*;

    fn runtime() -> Result<tokio::runtime::Runtime, CacheError> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| CacheError::io("start the async runtime for", "the download", e))
    }

    pub fn ensure_image(
        catalog: &Catalog,
        name: &str,
        state_dir: &Path,
        progress: Progress,
    ) -> Result<CachedImage, CacheError> {
        runtime()?.block_on(super::ensure_image(catalog, name, state_dir, progress))
    }

    pub fn build_image(
        catalog: &Catalog,
        name: &str,
        state_dir: &Path,
        progress: Progress,
        force: bool,
    ) -> Result<CachedImage, CacheError> {
        runtime()?.block_on(Cache::new(state_dir).build_image(catalog, name, progress, force))
    }

    pub fn import_dir(
        catalog: &Catalog,
        dir: &Path,
        state_dir: &Path,
        progress: Progress,
    ) -> Result<ImportReport, CacheError> {
        runtime()?.block_on(super::import_dir(catalog, dir, state_dir, progress))
    }

    pub fn fetch(
        url: &str,
        expected: &Checksum,
        dest: &Path,
        progress: Progress,
    ) -> Result<Fetched, CacheError> {
        runtime()?.block_on(super::fetch(url, expected, dest, progress))
    }

    /// [`fetch`] with explicit options (e.g. [`FetchOptions::quick`] for a file the
    /// caller can do without).
    pub fn fetch_with(
        opts: &FetchOptions,
        url: &str,
        expected: &Checksum,
        dest: &Path,
        progress: Progress,
    ) -> Result<Fetched, CacheError> {
        runtime()?.block_on(super::fetch::fetch_with(
            opts,
            &[url.to_string()],
            expected,
            dest,
            progress,
        ))
    }

    /// A small text file, e.g. a published checksum list (at most 4 MiB).
    pub fn fetch_text(url: &str) -> Result<String, CacheError> {
        let opts = FetchOptions::default();
        let client = opts.client()?;
        runtime()?.block_on(super::fetch::fetch_text(&client, &opts, url, 4 << 20))
    }
}
