//! `cache import DIR` for component releases: files named as upstream names them,
//! verified against the catalog's pinned sha256, or against upstream's published
//! checksum file placed beside them (`FILE.sha256`, as dl.k8s.io serves it), then
//! copied into the cache where the bootstrap looks for them.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{cache_path, parse_checksum_file, ChecksumSource, ComponentCatalog};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imported {
    pub component: String,
    pub version: String,
    pub file: PathBuf,
    /// `Ok(how it was verified)` or why it was not imported.
    pub outcome: Result<String, String>,
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// The digest a file must have, and where that digest came from.
fn expected(
    checksum: &ChecksumSource,
    file: &Path,
    entry_name: &str,
) -> Result<(String, String), String> {
    match checksum {
        ChecksumSource::Sha256(h) => Ok((h.to_ascii_lowercase(), "pinned sha256".into())),
        ChecksumSource::Url { url, entry } => {
            for suffix in [".sha256", ".sha256sum"] {
                let side = PathBuf::from(format!("{}{suffix}", file.display()));
                if let Ok(text) = std::fs::read_to_string(&side) {
                    return parse_checksum_file(&text, entry.as_deref())
                        .map(|h| (h, format!("{}", side.display())))
                        .ok_or_else(|| {
                            format!("{} holds no sha256 for {entry_name}", side.display())
                        });
                }
            }
            Err(format!(
                "no checksum to verify it: put upstream's checksum file ({url}) beside it as {entry_name}.sha256"
            ))
        }
    }
}

/// Import every file of `dir` that the catalog knows, for any version it lists.
pub fn import_dir(catalog: &ComponentCatalog, dir: &Path, cache_dir: &Path) -> Vec<Imported> {
    let mut out = Vec::new();
    for c in &catalog.components {
        for (version, release) in &c.versions {
            let name = release.file_name();
            let file = dir.join(name);
            if !file.is_file() {
                continue;
            }
            let outcome = expected(&release.checksum, &file, name).and_then(|(want, how)| {
                let got = sha256_file(&file)
                    .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
                if got != want {
                    return Err(format!("sha256 {got} does not match {want} ({how})"));
                }
                let dest = cache_path(cache_dir, &c.name, version);
                if dest.is_file() && sha256_file(&dest).ok().as_deref() == Some(want.as_str()) {
                    return Ok(format!("already cached, verified by {how}"));
                }
                copy_atomic(&file, &dest)
                    .map_err(|e| format!("cannot copy to {}: {e}", dest.display()))?;
                Ok(format!("verified by {how}"))
            });
            out.push(Imported {
                component: c.name.clone(),
                version: version.clone(),
                file,
                outcome,
            });
        }
    }
    out
}

fn copy_atomic(from: &Path, to: &Path) -> std::io::Result<()> {
    let dir = to.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.import-{}",
        to.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    std::fs::copy(from, &tmp)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, to)
}

pub fn render(items: &[Imported]) -> String {
    let mut rows = vec![vec![
        "COMPONENT".to_string(),
        "VERSION".into(),
        "FILE".into(),
        "RESULT".into(),
    ]];
    for i in items {
        rows.push(vec![
            i.component.clone(),
            i.version.clone(),
            i.file
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
            match &i.outcome {
                Ok(how) => format!("imported ({how})"),
                Err(e) => format!("FAILED: {e}"),
            },
        ]);
    }
    crate::plan::rows_to_text(&rows)
}
