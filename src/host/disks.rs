//! Per-node disks: a qcow2 overlay on the cached base image (never a full copy),
//! made with `qemu-img create -f qcow2 -b BASE -F qcow2 OVERLAY SIZE`.
//!
//! An overlay holds everything the node writes, its keys and, on a controller, the
//! cluster's CA key: it is 0600. libvirt's dynamic ownership hands it to qemu's user
//! while the domain runs (and back to root after).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("base image {path} is missing")]
    BaseMissing { path: PathBuf },
    #[error("`{command}` failed for {path}: {output_tail}")]
    Command {
        path: PathBuf,
        command: String,
        output_tail: String,
    },
    #[error("cannot run `{command}` for {path}")]
    Spawn {
        path: PathBuf,
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("overlay {path} sits on {found}, not on {expected}")]
    WrongBacking {
        path: PathBuf,
        found: String,
        expected: PathBuf,
    },
    #[error("cannot parse `qemu-img info` of {path}: {what}")]
    Info { path: PathBuf, what: String },
    #[error("cannot {what} {path}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

impl DiskError {
    pub fn hint(&self) -> String {
        match self {
            DiskError::BaseMissing { .. } => {
                "build or fetch the image first (images/kthw-debian12/build.sh DIR for the offline image)".into()
            }
            DiskError::Spawn { .. } => {
                "install qemu-img: apt-get install --no-install-recommends qemu-utils".into()
            }
            DiskError::WrongBacking { path, .. } => format!(
                "the overlay belongs to another image: destroy the lab (or remove {}) and create again",
                path.display()
            ),
            DiskError::Command { .. } | DiskError::Info { .. } | DiskError::Io { .. } => {
                "check free space and permissions of the lab's disks directory".into()
            }
        }
    }
}

/// What [`ensure_overlay`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskOutcome {
    Created,
    Exists,
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.trim_end().lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

fn run(path: &Path, args: &[&str]) -> Result<String, DiskError> {
    run_accepting(path, args, &[])
}

/// [`run`], also taking the exit statuses in `ok` as success.
fn run_accepting(path: &Path, args: &[&str], ok: &[i32]) -> Result<String, DiskError> {
    let command = format!("qemu-img {}", args.join(" "));
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .map_err(|source| DiskError::Spawn {
            path: path.to_path_buf(),
            command: command.clone(),
            source,
        })?;
    if !out.status.success() && !out.status.code().is_some_and(|c| ok.contains(&c)) {
        let mut all = String::from_utf8_lossy(&out.stdout).into_owned();
        all.push_str(&String::from_utf8_lossy(&out.stderr));
        return Err(DiskError::Command {
            path: path.to_path_buf(),
            command,
            output_tail: tail(&all, 5),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What `qemu-img info` says about an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub format: String,
    pub virtual_size: u64,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
}

pub fn image_info(path: &Path) -> Result<ImageInfo, DiskError> {
    let p = path.to_string_lossy();
    let out = run(path, &["info", "--output=json", "-U", &p])?;
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| DiskError::Info {
        path: path.to_path_buf(),
        what: e.to_string(),
    })?;
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
    Ok(ImageInfo {
        format: s("format").unwrap_or_default(),
        virtual_size: v.get("virtual-size").and_then(|x| x.as_u64()).unwrap_or(0),
        backing_file: s("backing-filename"),
        backing_format: s("backing-filename-format"),
    })
}

/// The mode of a node's overlay.
pub const OVERLAY_MODE: u32 = 0o600;

/// Make `path` readable by its owner only (a file made by an older version was
/// world-readable); leaves a file that is already private alone.
fn make_private(path: &Path) -> Result<(), DiskError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |what| {
        move |source| DiskError::Io {
            path: path.to_path_buf(),
            what,
            source,
        }
    };
    let mode = fs::metadata(path)
        .map_err(io("read the mode of"))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(OVERLAY_MODE))
            .map_err(io("make private"))?;
    }
    Ok(())
}

/// Ensure `overlay` is a qcow2 overlay of `base` (absolute path) of `size_gib` GiB,
/// readable by its owner only. An existing overlay on the same base is kept as it is
/// (it holds the node's state), its mode made private if it was not.
pub fn ensure_overlay(
    base: &Path,
    overlay: &Path,
    size_gib: u64,
) -> Result<DiskOutcome, DiskError> {
    let base = fs::canonicalize(base).map_err(|_| DiskError::BaseMissing {
        path: base.to_path_buf(),
    })?;
    if overlay.exists() {
        let info = image_info(overlay)?;
        let found = info.backing_file.unwrap_or_default();
        if info.format != "qcow2" || Path::new(&found) != base {
            return Err(DiskError::WrongBacking {
                path: overlay.to_path_buf(),
                found: if found.is_empty() {
                    format!("no backing file ({} image)", info.format)
                } else {
                    found
                },
                expected: base,
            });
        }
        make_private(overlay)?;
        return Ok(DiskOutcome::Exists);
    }
    if let Some(dir) = overlay.parent() {
        fs::create_dir_all(dir).map_err(|source| DiskError::Io {
            path: dir.to_path_buf(),
            what: "create",
            source,
        })?;
    }
    let tmp = overlay.with_extension("qcow2.tmp");
    let _ = fs::remove_file(&tmp);
    let b = base.to_string_lossy();
    let t = tmp.to_string_lossy();
    let size = format!("{size_gib}G");
    if let Err(e) = run(
        overlay,
        &[
            "create", "-q", "-f", "qcow2", "-b", &b, "-F", "qcow2", &t, &size,
        ],
    ) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    // qemu-img creates it by the umask (0644 as a rule): private before it has a name.
    if let Err(e) = make_private(&tmp) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, overlay).map_err(|source| DiskError::Io {
        path: overlay.to_path_buf(),
        what: "rename into place",
        source,
    })?;
    Ok(DiskOutcome::Created)
}

/// `qemu-img check` of an image: Ok when it reports no errors, or only leaked
/// clusters (exit status 3: space allocated and not used, no data at risk). The image
/// may be in use by a running guest (`-U`), and a guest just put back to a snapshot
/// typically shows leaks until qemu writes its refcounts out.
pub fn check_image(path: &Path) -> Result<(), DiskError> {
    let p = path.to_string_lossy();
    run_accepting(path, &["check", "-q", "-U", &p], &[3]).map(|_| ())
}

/// Remove a file the lab owns (overlay, seed); fine when it is already gone.
pub fn remove_file(path: &Path) -> Result<(), DiskError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DiskError::Io {
            path: path.to_path_buf(),
            what: "remove",
            source,
        }),
    }
}
