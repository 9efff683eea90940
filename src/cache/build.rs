//! Images built locally by a recipe (`recipe OUTDIR`), placed atomically.
//!
//! The recipe writes into a fresh directory inside the cache (same filesystem), so a
//! finished build moves into place with one rename; a failed or interrupted one never
//! appears under `images/NAME` and is removed (now, or by the next build).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt, BufReader};

use super::checksum::Algorithm;
use super::error::CacheError;
use super::manifest::{self, ArtifactRecord, Manifest};
use super::progress::Progress;
use super::{fetch, Cache, ImageSource, ImageSpec, ENTRY_MANIFEST};

/// Lines of recipe output kept for the error message.
const TAIL_LINES: usize = 20;

fn unique_suffix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{}-{nanos:09}", std::process::id())
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => status.to_string(),
    }
}

/// Remove leftovers of builds that died (the caller holds the entry's lock).
fn remove_stale(images: &Path, name: &str) {
    let prefixes = [format!(".{name}.build-"), format!(".{name}.old-")];
    let Ok(rd) = std::fs::read_dir(images) else {
        return;
    };
    for e in rd.flatten() {
        let file_name = e.file_name();
        let n = file_name.to_string_lossy();
        if prefixes.iter().any(|p| n.starts_with(p.as_str())) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Run the recipe and place its output; the caller holds the entry's lock.
pub(crate) async fn build_locked(
    cache: &Cache,
    spec: &ImageSpec,
    progress: Progress,
) -> Result<Manifest, CacheError> {
    let ImageSource::Build {
        recipe,
        recipe_path,
    } = &spec.source
    else {
        unreachable!("build of a download entry");
    };
    let recipe_path = match recipe_path {
        Some(p) if p.is_file() => p
            .canonicalize()
            .map_err(|e| CacheError::io("resolve", p, e))?,
        Some(p) => {
            return Err(CacheError::RecipeMissing {
                name: spec.name.clone(),
                recipe: p.display().to_string(),
            })
        }
        None => {
            return Err(CacheError::RecipeMissing {
                name: spec.name.clone(),
                recipe: format!(
                    "images/{recipe} (the built-in catalog entry has no recipe file beside it)"
                ),
            })
        }
    };
    let images = cache.images_dir();
    std::fs::create_dir_all(&images).map_err(|e| CacheError::io("create", &images, e))?;
    remove_stale(&images, &spec.name);
    let tmp = images.join(format!(".{}.build-{}", spec.name, unique_suffix()));
    std::fs::create_dir(&tmp).map_err(|e| CacheError::io("create", &tmp, e))?;

    let result = run_and_place(cache, spec, &recipe_path, &tmp, progress).await;
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

async fn run_and_place(
    cache: &Cache,
    spec: &ImageSpec,
    recipe: &Path,
    tmp: &Path,
    progress: Progress,
) -> Result<Manifest, CacheError> {
    let failed = |status: String, tail: Vec<String>| CacheError::BuildFailed {
        name: spec.name.clone(),
        recipe: recipe.to_path_buf(),
        status,
        tail,
    };
    progress.note(&format!(
        "building image {} with {} (output in {})",
        spec.name,
        recipe.display(),
        tmp.display()
    ));
    let mut child = tokio::process::Command::new(recipe)
        .arg(tmp)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| failed(format!("could not start it: {e}"), Vec::new()))?;
    let mut out = BufReader::new(child.stdout.take().expect("piped")).lines();
    let mut err = BufReader::new(child.stderr.take().expect("piped")).lines();
    let mut tail: VecDeque<String> = VecDeque::new();
    let (mut out_open, mut err_open) = (true, true);
    while out_open || err_open {
        let line = tokio::select! {
            l = out.next_line(), if out_open => match l {
                Ok(Some(l)) => Some(l),
                _ => {
                    out_open = false;
                    None
                }
            },
            l = err.next_line(), if err_open => match l {
                Ok(Some(l)) => Some(l),
                _ => {
                    err_open = false;
                    None
                }
            },
        };
        if let Some(line) = line {
            if progress != Progress::Quiet {
                eprintln!("  {}| {line}", spec.name);
            }
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    }
    let status = child
        .wait()
        .await
        .map_err(|e| failed(format!("could not wait for it: {e}"), Vec::new()))?;
    if !status.success() {
        return Err(failed(describe(status), tail.into()));
    }

    let mut artifacts = Vec::new();
    for art in spec.artifact_names() {
        let p = tmp.join(art);
        if !p.is_file() {
            return Err(CacheError::BuildOutputMissing {
                name: spec.name.clone(),
                recipe: recipe.to_path_buf(),
                missing: p,
            });
        }
        let (checksum, size) = fetch::hash_path(Algorithm::Sha256, p).await?;
        artifacts.push(ArtifactRecord {
            file: art.to_string(),
            size,
            checksum,
        });
    }
    let (recipe_sum, _) = fetch::hash_path(Algorithm::Sha256, recipe.to_path_buf()).await?;
    let m = Manifest {
        name: spec.name.clone(),
        source: "build".into(),
        url: None,
        checksum_source: Some("recipe".into()),
        recipe_sha256: Some(recipe_sum.hex().to_string()),
        fetched_at: manifest::now_rfc3339(),
        artifacts,
    };
    m.write(&tmp.join(ENTRY_MANIFEST))?;
    place(tmp, &cache.image_dir(&spec.name))?;
    progress.note(&format!("image {} is built", spec.name));
    Ok(m)
}

/// Move the finished build directory to `dest`, replacing what was there.
fn place(tmp: &Path, dest: &Path) -> Result<(), CacheError> {
    let old: Option<PathBuf> = if dest.exists() {
        let name = dest
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let old = dest.with_file_name(format!(".{name}.old-{}", unique_suffix()));
        std::fs::rename(dest, &old).map_err(|e| CacheError::io("move aside", dest, e))?;
        Some(old)
    } else {
        None
    };
    if let Err(e) = std::fs::rename(tmp, dest) {
        if let Some(old) = &old {
            let _ = std::fs::rename(old, dest);
        }
        return Err(CacheError::io("move into place", dest, e));
    }
    manifest::sync_parent(dest);
    if let Some(old) = old {
        let _ = std::fs::remove_dir_all(old);
    }
    Ok(())
}
