//! Preflight: what must hold on the host before a lab touches it. Each check says
//! what is wrong and what to do; all failures are reported together.

use std::path::{Path, PathBuf};

use crate::plan::LabPlan;
use crate::scenario::validate::overlaps;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub check: &'static str,
    pub problem: String,
    pub hint: String,
}

/// Conflicts between a lab and the other labs on this host (pure).
pub fn lab_conflicts(plan: &LabPlan, others: &[LabPlan]) -> Vec<Finding> {
    let mut out = Vec::new();
    for o in others {
        let mut clash = |what: String| {
            out.push(Finding {
                check: "other labs",
                problem: format!("lab `{}` {what}", o.lab),
                hint: format!(
                    "give this lab its own network (e.g. `network: lab2`, or an inline bridge and subnet), or destroy `{}` first",
                    o.lab
                ),
            })
        };
        if o.network.bridge == plan.network.bridge {
            clash(format!("already uses bridge {}", plan.network.bridge));
        }
        let ranges = |p: &LabPlan| {
            [
                ("node subnet", p.network.subnet),
                ("pod range", p.cluster.pod_cidr),
                ("service range", p.cluster.service_cidr),
            ]
        };
        for (what, mine) in ranges(plan) {
            for (theirs_what, theirs) in ranges(o) {
                // Service ranges live only inside each cluster: they may repeat.
                if what == "service range" && theirs_what == "service range" {
                    continue;
                }
                if overlaps(mine, theirs) {
                    clash(format!(
                        "has {theirs_what} {theirs}, which overlaps this lab's {what} {mine}"
                    ));
                }
            }
        }
        for n in &plan.nodes {
            if o.nodes.iter().any(|x| x.domain == n.domain) {
                clash(format!("already has a domain named {}", n.domain));
            }
        }
    }
    out
}

/// Programs a lab needs on PATH, with the Debian package that provides each.
pub const PROGRAMS: &[(&str, &str)] = &[
    ("qemu-img", "qemu-utils"),
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("nft", "nftables"),
    ("ssh", "openssh-client"),
];

pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Free bytes on the filesystem holding `path` (or its nearest existing parent).
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let mut p = path.to_path_buf();
    while !p.exists() {
        if !p.pop() {
            break;
        }
    }
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid NUL-terminated path and s a properly sized out-parameter.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(s.f_bavail as u64 * s.f_frsize as u64)
}

/// Disk a lab needs at least: the base image once plus room for overlays to grow
/// during bootstrap (measured at 15-40 MB per node after boot; binaries add more).
pub fn disk_needed(plan: &LabPlan) -> u64 {
    const BASE: u64 = 2 << 30;
    const PER_NODE: u64 = 512 << 20;
    BASE + PER_NODE * plan.nodes.len() as u64
}

/// Host checks that need no daemon: root, programs, disk, other labs.
pub fn check_host(plan: &LabPlan, state_dir: &Path, others: &[LabPlan]) -> Vec<Finding> {
    let mut out = Vec::new();
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        out.push(Finding {
            check: "privileges",
            problem: "creating a bridge, NAT rules and system VMs needs root".into(),
            hint: "run with sudo".into(),
        });
    }
    for (prog, pkg) in PROGRAMS {
        if find_program(prog).is_none() {
            out.push(Finding {
                check: "programs",
                problem: format!("`{prog}` is not installed"),
                hint: format!("apt-get install --no-install-recommends {pkg} (or run `make lab`, which installs every host package)"),
            });
        }
    }
    match free_bytes(state_dir) {
        Ok(free) if free < disk_needed(plan) => out.push(Finding {
            check: "disk",
            problem: format!(
                "{} has {} MiB free; this lab needs about {} MiB",
                state_dir.display(),
                free >> 20,
                disk_needed(plan) >> 20
            ),
            hint: "free some space or point --state-dir at a larger filesystem".into(),
        }),
        Ok(_) => {}
        Err(e) => out.push(Finding {
            check: "disk",
            problem: format!("cannot tell free space under {}: {e}", state_dir.display()),
            hint: "check that --state-dir points at a writable place".into(),
        }),
    }
    out.extend(lab_conflicts(plan, others));
    for (what, range) in [
        ("node subnet", plan.network.subnet),
        ("pod range", plan.cluster.pod_cidr),
    ] {
        if let Err(e) = crate::host::net::check_subnet_free(range, Some(&plan.network.bridge)) {
            out.push(Finding {
                check: "host routes",
                problem: format!("the lab's {what}: {e}"),
                hint: e.hint(),
            });
        }
    }
    out
}

pub fn render_findings(findings: &[Finding]) -> String {
    findings
        .iter()
        .map(|f| format!("{}: {}", f.check, f.problem))
        .collect::<Vec<_>>()
        .join("; ")
}

// ---- the hypervisor: libvirt answers, and qemu's user reaches the lab's files ----

/// What of the hypervisor a run needs, from the phases it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HypervisorNeeds {
    /// Talks to libvirt (defines or starts domains, saves their fresh state).
    pub libvirt: bool,
    /// Starts domains: qemu opens the lab's disks, seeds, kernel and initrd.
    pub qemu_opens_files: bool,
}

/// libvirt answers at `uri`, and qemu can reach the lab's files: checked before
/// anything is made, instead of failing at phase `domains` after the network, the
/// image and the disks.
pub fn check_hypervisor(
    plan: &LabPlan,
    state_dir: &Path,
    uri: &str,
    needs: HypervisorNeeds,
) -> Vec<Finding> {
    let mut out = Vec::new();
    if needs.libvirt {
        if let Err(e) = crate::host::libvirt::Libvirt::connect(Some(uri)) {
            out.push(Finding {
                check: "libvirt",
                problem: e.to_string(),
                hint: e.hint(),
            });
        }
    }
    if needs.qemu_opens_files && is_local_system(uri) {
        out.extend(check_qemu_reach(plan, state_dir));
    }
    out
}

/// The system daemon's qemu driver config, read by the libvirtd this host runs (and
/// by the private one of `scripts/netns-run`, which mounts its own copy over it).
pub const QEMU_CONF: &str = "/etc/libvirt/qemu.conf";
/// The user Debian's libvirt runs qemu as when qemu.conf does not say.
pub const DEFAULT_QEMU_USER: &str = "libvirt-qemu";

/// Whether `uri` is the local system daemon, whose qemu runs as qemu.conf's `user`
/// (`qemu:///session` runs qemu as the caller; other drivers run no qemu here).
pub fn is_local_system(uri: &str) -> bool {
    uri.starts_with("qemu:///system") || uri.starts_with("qemu+unix:///system")
}

/// qemu.conf's `user` (pure): the first uncommented `user = "..."`, as libvirt's
/// own parser takes the first of repeated settings; Debian's default without one.
pub fn qemu_user_setting(conf: Option<&str>) -> String {
    conf.into_iter()
        .flat_map(str::lines)
        .filter_map(|l| {
            let (key, value) = l.split_once('=')?;
            (key.trim() == "user").then(|| value.trim())
        })
        .find_map(|v| {
            let v = v.split('#').next().unwrap_or_default().trim();
            Some(v.strip_prefix('"')?.strip_suffix('"')?.to_string())
        })
        .unwrap_or_else(|| DEFAULT_QEMU_USER.to_string())
}

/// A user's ids as the kernel checks them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ids {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (libvirt gives qemu those of its user).
    pub groups: Vec<u32>,
}

/// The ids of qemu.conf's `user` (pure, from /etc/passwd and /etc/group text):
/// `NAME`, `+UID`, or a number that names no user (then a uid), as libvirt reads it.
pub fn resolve_ids(user: &str, passwd: &str, group: &str) -> Option<Ids> {
    let entries: Vec<Vec<&str>> = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 4)
        .collect();
    let by_name = |n: &str| entries.iter().find(|f| f[0] == n);
    let by_uid = |u: u32| entries.iter().find(|f| f[2].parse() == Ok(u));
    let entry = match user.strip_prefix('+') {
        Some(uid) => by_uid(uid.parse().ok()?),
        None => by_name(user).or_else(|| user.parse().ok().and_then(by_uid)),
    };
    let (name, uid, gid) = match entry {
        Some(f) => (f[0].to_string(), f[2].parse().ok()?, f[3].parse().ok()?),
        // `+UID` without a passwd entry: that uid, its group unknown (the uid's own).
        None => {
            let uid: u32 = user.strip_prefix('+')?.parse().ok()?;
            (user.to_string(), uid, uid)
        }
    };
    let groups = group
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 4 && f[3].split(',').any(|m| m.trim() == name))
        .filter_map(|f| f[2].parse().ok())
        .collect();
    Some(Ids {
        name,
        uid,
        gid,
        groups,
    })
}

/// One directory on the way to a file qemu opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirAccess {
    pub path: PathBuf,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// The first of `dirs` that `who` may not enter (no search permission by the owner,
/// group and other bits; ACLs are not read). Root enters everything.
pub fn first_closed<'d>(dirs: &'d [DirAccess], who: &Ids) -> Option<&'d DirAccess> {
    if who.uid == 0 {
        return None;
    }
    dirs.iter().find(|d| {
        let bit = if d.uid == who.uid {
            0o100
        } else if d.gid == who.gid || who.groups.contains(&d.gid) {
            0o010
        } else {
            0o001
        };
        d.mode & bit == 0
    })
}

/// The finding when qemu, running as `who` (per `conf`), cannot enter one of `dirs`
/// on the way to the lab's files (pure).
pub fn qemu_reach(who: &Ids, conf: &Path, dirs: &[DirAccess]) -> Option<Finding> {
    let d = first_closed(dirs, who)?;
    Some(Finding {
        check: "qemu access",
        problem: format!(
            "qemu runs as {} (uid {}, `user` in {}), which cannot enter {} (mode {:04o}, owner uid {}): libvirt would fail to start the lab's domains (\"Cannot access storage file\")",
            who.name,
            who.uid,
            conf.display(),
            d.path.display(),
            d.mode & 0o7777,
            d.uid
        ),
        hint: format!(
            "let it through with `chmod o+x {}` (every directory above the lab's files must be traversable), or pass a --state-dir under directories it can enter (root's default is /var/lib/kthw-lab)",
            d.path.display()
        ),
    })
}

/// `dir` and each of its ancestors that exists, root first; also those of the path
/// with symlinks resolved (the kernel walks both).
fn dirs_on_the_way(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    let mut existing = dir.to_path_buf();
    while !existing.exists() {
        if !existing.pop() {
            return out;
        }
    }
    let mut chains = vec![existing.clone()];
    if let Ok(real) = existing.canonicalize() {
        chains.push(real);
    }
    for c in chains {
        let mut ancestors: Vec<PathBuf> = c.ancestors().map(Path::to_path_buf).collect();
        ancestors.reverse();
        for a in ancestors {
            if !out.contains(&a) {
                out.push(a);
            }
        }
    }
    out
}

/// Whether qemu, as qemu.conf's user, can reach the directories of the lab's disks,
/// seeds and image (read from this host: the config, /etc/passwd, /etc/group and
/// the directories' modes). Nothing to say when qemu runs as root, or when the user
/// cannot be resolved (libvirtd would not start then either).
pub fn check_qemu_reach(plan: &LabPlan, state_dir: &Path) -> Vec<Finding> {
    use std::os::unix::fs::MetadataExt;
    let conf = std::fs::read_to_string(QEMU_CONF).ok();
    let user = qemu_user_setting(conf.as_deref());
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let Some(who) = resolve_ids(&user, &read("/etc/passwd"), &read("/etc/group")) else {
        return Vec::new();
    };
    let image = crate::cache::Cache::new(state_dir).image_dir(&plan.image);
    let mut dirs: Vec<DirAccess> = Vec::new();
    for target in [&plan.paths.disks, &plan.paths.seeds, &image] {
        for p in dirs_on_the_way(target) {
            if dirs.iter().any(|d| d.path == p) {
                continue;
            }
            if let Ok(m) = std::fs::metadata(&p) {
                dirs.push(DirAccess {
                    path: p,
                    mode: m.mode(),
                    uid: m.uid(),
                    gid: m.gid(),
                });
            }
        }
    }
    qemu_reach(&who, Path::new(QEMU_CONF), &dirs)
        .into_iter()
        .collect()
}
