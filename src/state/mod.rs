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
