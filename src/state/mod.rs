//! The state directory: where labs keep their plans, keys, disks and logs, and
//! where the shared download cache lives.

use std::path::{Path, PathBuf};

/// Default state dir: /var/lib/kthw-lab for root, the XDG state dir otherwise.
pub fn default_state_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    default_state_dir_for(
        uid,
        std::env::var_os("XDG_STATE_HOME").map(PathBuf::from),
        std::env::var_os("HOME").map(PathBuf::from),
    )
}

pub fn default_state_dir_for(
    uid: u32,
    xdg_state: Option<PathBuf>,
    home: Option<PathBuf>,
) -> PathBuf {
    if uid == 0 {
        return PathBuf::from("/var/lib/kthw-lab");
    }
    match (xdg_state, home) {
        (Some(x), _) if x.is_absolute() => x.join("kthw-lab"),
        (_, Some(h)) => h.join(".local/state/kthw-lab"),
        _ => PathBuf::from("/tmp/kthw-lab"),
    }
}

/// The download cache shared by every lab under a state dir.
pub fn cache_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("cache")
}

/// The directory holding one directory per lab.
pub fn labs_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("labs")
}

/// The saved plan of a lab, if the lab has a state dir.
pub fn read_plan(state_dir: &Path, lab: &str) -> std::io::Result<Option<crate::plan::LabPlan>> {
    let p = crate::plan::LabPaths::new(state_dir, lab).plan;
    match std::fs::read(&p) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} is not a readable plan: {e}", p.display()),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Record a plan before the first side effect. The lab dir is 0711: qemu runs as
/// its own user under qemu:///system and must reach the disks, seeds and console
/// logs below it; keys and certificates sit in 0700 directories of their own.
pub fn record_plan(plan: &crate::plan::LabPlan) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(&plan.paths.root)?;
    std::fs::set_permissions(&plan.paths.root, std::fs::Permissions::from_mode(0o711))?;
    crate::actions::journal::write_atomic(&plan.paths.plan, plan.to_json().as_bytes(), 0o600)
}

/// Directories qemu must traverse to open a node's files by name (disks, seeds,
/// console logs): 0711. Under qemu:///system qemu runs as its own user, which libvirt
/// hands each disk to; nobody else can list them, and every file in them is 0600.
pub const QEMU_DIR_MODE: u32 = 0o711;

/// Directories only this tool reads (the load balancer's config, log and pid): 0700.
pub const PRIVATE_DIR_MODE: u32 = 0o700;

/// Create `dir` (and its parents) and give it exactly `mode`.
pub fn ensure_dir_mode(dir: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    if std::fs::metadata(dir)?.permissions().mode() & 0o7777 != mode {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// The directories of a lab's node files, and each node's console log made 0600 before
/// its domain first starts: libvirt's virtlogd appends the guest's serial console to
/// it (what the guest prints, secrets included) and keeps an existing file's mode.
pub fn ensure_node_dirs(plan: &crate::plan::LabPlan) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    for dir in [&plan.paths.disks, &plan.paths.seeds, &plan.paths.console] {
        ensure_dir_mode(dir, QEMU_DIR_MODE)?;
    }
    for n in &plan.nodes {
        let f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&n.console_log)?;
        if f.metadata()?.permissions().mode() & 0o077 != 0 {
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        }
    }
    Ok(())
}

/// Names of every lab with a state dir, sorted.
pub fn lab_names(state_dir: &Path) -> std::io::Result<Vec<String>> {
    let mut names = Vec::new();
    match std::fs::read_dir(labs_dir(state_dir)) {
        Ok(rd) => {
            for e in rd {
                let e = e?;
                if e.file_type()?.is_dir() {
                    if let Some(n) = e.file_name().to_str() {
                        names.push(n.to_string());
                    }
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    names.sort();
    Ok(names)
}

/// Plans of every other lab on this host (unreadable ones are skipped).
pub fn other_plans(state_dir: &Path, lab: &str) -> Vec<crate::plan::LabPlan> {
    lab_names(state_dir)
        .unwrap_or_default()
        .into_iter()
        .filter(|n| n != lab)
        .filter_map(|n| read_plan(state_dir, &n).ok().flatten())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_uses_var_lib() {
        assert_eq!(
            default_state_dir_for(0, None, Some("/root".into())),
            PathBuf::from("/var/lib/kthw-lab")
        );
    }

    #[test]
    fn users_use_xdg_then_home() {
        assert_eq!(
            default_state_dir_for(1000, Some("/x/state".into()), Some("/home/u".into())),
            PathBuf::from("/x/state/kthw-lab")
        );
        assert_eq!(
            default_state_dir_for(1000, Some("relative".into()), Some("/home/u".into())),
            PathBuf::from("/home/u/.local/state/kthw-lab")
        );
    }
}
