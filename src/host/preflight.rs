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
    let _ = (plan, state_dir, needs.qemu_opens_files);
    out
}

/// Whether `uri` is the local system daemon, whose qemu runs as qemu.conf's `user`
/// (`qemu:///session` runs qemu as the caller; other drivers run no qemu here).
pub fn is_local_system(uri: &str) -> bool {
    uri.starts_with("qemu:///system") || uri.starts_with("qemu+unix:///system")
}
