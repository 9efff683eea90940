//! Filling the cache offline from a directory of files downloaded elsewhere.
//!
//! A file is matched to a catalog entry by name (the entry's file name, or the last
//! segment of one of its URLs). Its expected digest is the pinned one, or comes from
//! a checksum list in the same directory (the checksum URL's file name first, e.g.
//! `SHA256SUMS`, then any other `*SUMS*` file listing it), or, as a last resort, from
//! the checksum URL over the network. The file is copied while being hashed and
//! only lands in the cache when the digest matches.

use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use super::catalog::url_file_name;
use super::checksum::{find_in_sums, Algorithm, Checksum, Hasher};
use super::error::CacheError;
use super::manifest::{self, sibling, ArtifactRecord, Manifest};
use super::progress::Progress;
use super::{lock, remove_if_exists, Cache, Catalog, ChecksumSpec, ImageSource, ImageSpec};

/// What happened to one file of an import.
#[derive(Debug)]
pub enum ImportOutcome {
    Imported {
        checksum: Checksum,
        size: u64,
    },
    /// The image was already cached; the file was not read.
    AlreadyCached,
    Failed(CacheError),
}

#[derive(Debug)]
pub struct ImportItem {
    pub image: String,
    pub file: PathBuf,
    pub outcome: ImportOutcome,
}

/// The result of `cache import DIR`.
#[derive(Debug, Default)]
pub struct ImportReport {
    pub items: Vec<ImportItem>,
    /// Files in the directory that match no catalog entry (checksum lists excluded).
    pub unmatched: Vec<PathBuf>,
}

impl ImportReport {
    pub fn imported(&self) -> usize {
        self.items
            .iter()
            .filter(|i| matches!(i.outcome, ImportOutcome::Imported { .. }))
            .count()
    }

    /// The failures, if any.
    pub fn failures(&self) -> impl Iterator<Item = (&ImportItem, &CacheError)> {
        self.items.iter().filter_map(|i| match &i.outcome {
            ImportOutcome::Failed(e) => Some((i, e)),
            _ => None,
        })
    }

    /// One line per file.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for i in &self.items {
            let what = match &i.outcome {
                ImportOutcome::Imported { checksum, size } => format!(
                    "imported ({}, {})",
                    indicatif::BinaryBytes(*size),
                    checksum.short()
                ),
                ImportOutcome::AlreadyCached => "already cached".into(),
                ImportOutcome::Failed(e) => format!("failed: {e}"),
            };
            out.push_str(&format!("{}: {} {what}\n", i.image, i.file.display()));
        }
        for u in &self.unmatched {
            out.push_str(&format!(
                "ignored: {} (matches no catalog entry)\n",
                u.display()
            ));
        }
        if self.items.is_empty() {
            out.push_str("no file in the directory matches a catalog entry\n");
        }
        out
    }
}

fn is_checksum_list(name: &str) -> bool {
    name.contains("SUMS") || name.ends_with(".sha256") || name.ends_with(".sha512")
}

pub(crate) async fn import_dir(
    cache: &Cache,
    catalog: &Catalog,
    dir: &Path,
    progress: Progress,
) -> Result<ImportReport, CacheError> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| CacheError::io("read the directory", dir, e))?
        .flatten()
        .filter(|e| e.path().is_file())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    let mut used = vec![false; names.len()];
    let mut report = ImportReport::default();
    for spec in catalog.list() {
        let ImageSource::Download { urls, file, .. } = &spec.source else {
            continue;
        };
        let mut candidates = vec![file.as_str()];
        candidates.extend(urls.iter().filter_map(|u| url_file_name(u)));
        let Some(idx) = names.iter().position(|n| candidates.contains(&n.as_str())) else {
            continue;
        };
        used[idx] = true;
        let src = dir.join(&names[idx]);
        let outcome = match import_one(cache, spec, dir, &src, &names, progress).await {
            Ok(Some((checksum, size))) => ImportOutcome::Imported { checksum, size },
            Ok(None) => ImportOutcome::AlreadyCached,
            Err(e) => ImportOutcome::Failed(e),
        };
        report.items.push(ImportItem {
            image: spec.name.clone(),
            file: src,
            outcome,
        });
    }
    report.unmatched = names
        .iter()
        .zip(&used)
        .filter(|(n, u)| !**u && !is_checksum_list(n))
        .map(|(n, _)| dir.join(n))
        .collect();
    Ok(report)
}

/// The expected digest of `file` and where it was found.
async fn expected_for(
    cache: &Cache,
    spec: &ImageSpec,
    dir: &Path,
    src: &Path,
    names: &[String],
) -> Result<(Checksum, String), CacheError> {
    let ImageSource::Download { file, checksum, .. } = &spec.source else {
        unreachable!("only downloads are imported");
    };
    let (url, algorithm) = match checksum {
        ChecksumSpec::Pinned(c) => return Ok((c.clone(), "pinned".into())),
        ChecksumSpec::File { url, algorithm } => (url, *algorithm),
    };
    let src_name = src
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let preferred = url_file_name(url).unwrap_or("");
    let mut lists: Vec<&String> = names.iter().filter(|n| *n == preferred).collect();
    lists.extend(
        names
            .iter()
            .filter(|n| *n != preferred && is_checksum_list(n)),
    );
    let mut first_err = None;
    for list in lists {
        let path = dir.join(list);
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        for wanted in [file.as_str(), src_name.as_str()] {
            match find_in_sums(&text, algorithm, wanted) {
                Ok(sum) => return Ok((sum, path.display().to_string())),
                Err(super::checksum::SumsError::Missing { .. }) => {}
                Err(e) if list == preferred && first_err.is_none() => {
                    first_err = Some(CacheError::ChecksumList {
                        file: wanted.to_string(),
                        source_name: path.display().to_string(),
                        source: e,
                    })
                }
                Err(_) => {}
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    let client = cache.options().client()?;
    match super::resolve_expected(&client, cache.options(), checksum, file).await {
        Ok(found) => Ok(found),
        Err(e @ (CacheError::Unreachable { .. } | CacheError::Transfer { .. })) => {
            Err(CacheError::NoChecksumOffline {
                file: src.to_path_buf(),
                dir: dir.to_path_buf(),
                url: url.clone(),
                source: Box::new(e),
            })
        }
        Err(e) => Err(e),
    }
}

/// `Ok(None)` when the image is already cached.
async fn import_one(
    cache: &Cache,
    spec: &ImageSpec,
    dir: &Path,
    src: &Path,
    names: &[String],
    progress: Progress,
) -> Result<Option<(Checksum, u64)>, CacheError> {
    let ImageSource::Download { urls, file, .. } = &spec.source else {
        unreachable!("only downloads are imported");
    };
    let _lock = lock::lock(&cache.image_lock(&spec.name), &spec.name, progress).await?;
    if cache.cached(spec).is_some() {
        return Ok(None);
    }
    let (expected, checksum_source) = expected_for(cache, spec, dir, src, names).await?;
    let entry_dir = cache.image_dir(&spec.name);
    std::fs::create_dir_all(&entry_dir).map_err(|e| CacheError::io("create", &entry_dir, e))?;
    let manifest_path = entry_dir.join(super::ENTRY_MANIFEST);
    remove_if_exists(&manifest_path)?;
    let dest = entry_dir.join(file);
    let part = sibling(&dest, ".part");
    progress.note(&format!(
        "importing {} as image {} (checking {expected})",
        src.display(),
        spec.name
    ));
    let (src_owned, part_owned, alg) = (src.to_path_buf(), part.clone(), expected.algorithm);
    let (actual, size) =
        tokio::task::spawn_blocking(move || copy_hashing(alg, &src_owned, &part_owned))
            .await
            .expect("the copy task does not panic")?;
    if actual != expected {
        let _ = std::fs::remove_file(&part);
        return Err(CacheError::ImportMismatch {
            path: src.to_path_buf(),
            expected,
            actual,
        });
    }
    std::fs::rename(&part, &dest).map_err(|e| CacheError::io("move into place", &dest, e))?;
    manifest::sync_parent(&dest);
    Manifest {
        name: spec.name.clone(),
        source: "import".into(),
        url: urls.first().cloned(),
        checksum_source: Some(checksum_source),
        recipe_sha256: None,
        fetched_at: manifest::now_rfc3339(),
        artifacts: vec![ArtifactRecord {
            file: file.clone(),
            size,
            checksum: actual.clone(),
        }],
    }
    .write(&manifest_path)?;
    super::remove_strays(&entry_dir, &[file.as_str(), super::ENTRY_MANIFEST]);
    Ok(Some((actual, size)))
}

/// Copy `src` to `dest` (synced) while hashing it.
fn copy_hashing(alg: Algorithm, src: &Path, dest: &Path) -> Result<(Checksum, u64), CacheError> {
    let mut input = std::fs::File::open(src).map_err(|e| CacheError::io("read", src, e))?;
    let out = std::fs::File::create(dest).map_err(|e| CacheError::io("create", dest, e))?;
    let mut out = BufWriter::with_capacity(1 << 20, out);
    let mut hasher = Hasher::new(alg);
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CacheError::io("read", src, e)),
        };
        hasher.update(&buf[..k]);
        out.write_all(&buf[..k])
            .map_err(|e| CacheError::io("write", dest, e))?;
        n += k as u64;
    }
    out.flush()
        .and_then(|()| out.get_ref().sync_all())
        .map_err(|e| CacheError::io("write", dest, e))?;
    Ok((hasher.finish(), n))
}
