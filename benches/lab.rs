//! `cargo bench --bench lab` (`make bench-lab`): time to a ready lab, kthw-lab side by
//! side with two baselines on the same machine, the same offline base image and the same
//! VM size, in one run:
//! - the tutorial way by hand (benches/baseline/tutorial-lab.sh: qemu-img overlays,
//!   genisoimage cloud-init ISOs, `virsh define`/`start`, ssh polling);
//! - virt-lightning (benches/baseline/virt-lightning.sh), installed from PyPI into the
//!   target dir, booting the same image made disk-bootable (bootable-disk.sh); when it
//!   cannot be installed its columns say why instead.
//!
//! Everything runs inside `scripts/netns-run` (a namespace with its own libvirtd, which
//! offers only TCG: `KTHW_NETNS_NO_KVM=1`): no lab touches the host network.
//!
//! Rows:
//! - boot to SSH for 1, 2 and 4 nodes: from the start of `create` (or of the baseline
//!   script) until every node accepted a login; then teardown of the same nodes;
//! - peak qemu RSS (VmHWM) and disk written (overlay allocation) per node;
//! - where the time goes for one node: kernel, initrd, systemd, network, sshd, login,
//!   read from the guest's own kernel log and journal;
//! - 2m2w: `create --until runtime` with its phases, `checkpoint save` and three
//!   `checkpoint restore`s (ratio to create: what going back costs without one), `reset`,
//!   `destroy`.
//!
//! Ratios are kthw-lab / baseline (lower is better), so they survive a noisy machine.
//! Environment: `LAB_BENCH_NODES` (comma list, default 1,2,4; empty: no boot rows),
//! `LAB_BENCH_SKIP_2M2W=1`,
//! `LAB_BENCH_SKIP_VL=1` (no virt-lightning).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

const BIN: &str = env!("CARGO_BIN_EXE_kthw-lab");
const MEMORY_MIB: u32 = 1024;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The bench's own state dir (image cache included), inside the target dir.
fn state_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    let dir = if target.is_absolute() {
        target
    } else {
        root().join(target)
    };
    dir.join("kthw-bench-state")
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

fn kthw(args: &[&str]) -> Output {
    run(Command::new(BIN)
        .arg("--state-dir")
        .arg(state_dir())
        .args(args)
        .current_dir(root())
        .env("KTHW_LAB_PLAIN", "1"))
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let t = Instant::now();
    let v = f();
    (v, t.elapsed().as_secs_f64())
}

fn main() {
    if std::env::args().any(|a| a == "--inside") {
        inside();
        return;
    }
    // The image first (outside: building needs the mirror), then everything else in a
    // namespace of its own.
    let (_, secs) = timed(|| kthw(&["image", "pull", "kthw-debian12"]));
    println!("offline image ready in {secs:.0} s");
    let vl = prepare_virt_lightning();
    let me = std::env::current_exe().unwrap();
    let mut cmd = Command::new(root().join("scripts/netns-run"));
    cmd.arg(me).arg("--inside").env("KTHW_NETNS_NO_KVM", "1");
    match &vl {
        Ok(()) => cmd.env_remove(VL_SKIPPED),
        Err(why) => cmd.env(VL_SKIPPED, why),
    };
    let status = cmd.status().unwrap();
    assert!(status.success(), "the benchmark failed inside netns-run");
}

/// Set inside the namespace when virt-lightning is not measured: why.
const VL_SKIPPED: &str = "LAB_BENCH_VL_SKIPPED";

fn vl_venv() -> PathBuf {
    state_dir().join("virt-lightning-venv")
}

fn bootable_disk() -> PathBuf {
    state_dir().join("kthw-debian12-bootable.qcow2")
}

/// virt-lightning from PyPI and the base image made disk-bootable, outside the
/// namespace (pip needs the registry). `Err` says why it will not be measured.
fn prepare_virt_lightning() -> Result<(), String> {
    if std::env::var_os("LAB_BENCH_SKIP_VL").is_some() {
        return Err("LAB_BENCH_SKIP_VL is set".into());
    }
    let script = root().join("benches/baseline/virt-lightning.sh");
    let (out, secs) = timed(|| {
        Command::new(&script)
            .arg("install")
            .arg(vl_venv())
            .stdin(Stdio::null())
            .output()
    });
    match out {
        Ok(o) if o.status.success() => println!("virt-lightning ready in {secs:.0} s"),
        Ok(o) => {
            let err = String::from_utf8_lossy(&o.stderr);
            let last = err.lines().last().unwrap_or("no output").to_string();
            println!("virt-lightning is not measured: pip install failed: {last}");
            return Err(format!("pip install failed: {last}"));
        }
        Err(e) => return Err(format!("{}: {e}", script.display())),
    }
    let image = state_dir().join("cache/images/kthw-debian12");
    let (_, secs) = timed(|| {
        run(
            Command::new(root().join("benches/baseline/bootable-disk.sh"))
                .arg(&image)
                .arg(bootable_disk()),
        )
    });
    println!("disk-bootable copy of the image ready in {secs:.0} s");
    Ok(())
}

/// One system's figures for one node count.
#[derive(Default, Clone)]
struct Boot {
    to_ssh: f64,
    teardown: f64,
    rss_mib: Vec<f64>,
    disk_mib: Vec<f64>,
    /// Of `disk_mib`: the saved fresh state (memory of the internal snapshot) that
    /// makes `reset` fast; empty for the baseline, which saves none.
    state_mib: Vec<f64>,
    markers: Vec<(&'static str, Option<f64>)>,
}

fn inside() {
    // libvirt probes qemu once per daemon: pay that before any timing.
    run(Command::new("virsh").args(["-q", "-c", "qemu:///system", "domcapabilities"]));
    let image = state_dir().join("cache/images/kthw-debian12");
    let counts: Vec<u32> = std::env::var("LAB_BENCH_NODES")
        .unwrap_or_else(|_| "1,2,4".into())
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().expect("LAB_BENCH_NODES: numbers"))
        .collect();
    let vl_skipped = std::env::var(VL_SKIPPED).ok();
    let work = tempfile::tempdir().unwrap();
    let mut rows = Vec::new();
    for &n in &counts {
        let ours = boot_kthw(n, work.path());
        let base = boot_baseline(n, work.path(), &image);
        let vl = vl_skipped
            .is_none()
            .then(|| boot_virt_lightning(n, work.path()));
        rows.push((n, ours, base, vl));
    }
    let lab = (std::env::var_os("LAB_BENCH_SKIP_2M2W").is_none()).then(|| full_lab(work.path()));

    println!();
    println!("boot to SSH under TCG ({MEMORY_MIB} MiB, 1 vCPU per node; 2 host cores)");
    if let Some(why) = &vl_skipped {
        println!("virt-lightning: not measured ({why})");
    }
    figure_table(&rows, SECONDS, |b| b.to_ssh);
    println!();
    println!("teardown of the same nodes");
    figure_table(&rows, SECONDS, |b| b.teardown);
    println!();
    println!("per node after boot: peak qemu RSS (VmHWM), MiB, and ratios kthw-lab / baseline");
    figure_table(&rows, (9, 0, "", 6), |b| mean(&b.rss_mib));
    println!();
    println!("per node after boot: overlay disk allocated, MiB; kthw-lab's overlay also holds");
    println!("the node's saved fresh state (for `reset`): ratios with it, and without it (w/o)");
    println!(
        "{:<6} {:>9} {:>7} {:>9} {:>6} {:>6} {:>9} {:>6} {:>6}",
        "nodes", "kthw-lab", "state", "tutorial", "ratio", "w/o", "virt-ltng", "ratio", "w/o"
    );
    for (n, o, b, v) in &rows {
        let (dc, ds, db) = (mean(&o.disk_mib), mean(&o.state_mib), mean(&b.disk_mib));
        let dv = v.as_ref().map(|v| mean(&v.disk_mib));
        println!(
            "{:<6} {:>9.1} {:>7.1} {:>9.1} {:>6.2} {:>6.2} {} {} {}",
            n,
            dc,
            ds,
            db,
            dc / db,
            (dc - ds) / db,
            cell(dv, 9, 1, ""),
            cell(dv.map(|dv| dc / dv), 6, 2, ""),
            cell(dv.map(|dv| (dc - ds) / dv), 6, 2, ""),
        );
    }
    if let Some((n, o, b, v)) = rows.iter().min_by_key(|r| r.0) {
        println!();
        println!(
            "where the time goes, {n} node(s): seconds since the kernel started (guest clock)"
        );
        println!(
            "{:<34} {:>9} {:>9} {:>9}",
            "milestone", "kthw-lab", "tutorial", "virt-ltng"
        );
        let none = Boot::default();
        let v = v.as_ref().unwrap_or(&none);
        let f = |v: Option<&Option<f64>>| {
            v.and_then(|v| *v)
                .map_or("-".to_string(), |s| format!("{s:.1}"))
        };
        for (i, (name, a)) in o.markers.iter().enumerate() {
            println!(
                "{name:<34} {:>9} {:>9} {:>9}",
                f(Some(a)),
                f(b.markers.get(i).map(|m| &m.1)),
                f(v.markers.get(i).map(|m| &m.1))
            );
        }
        // The command's time that the guest's clock does not see.
        let outside = |x: &Boot| {
            let login = x.markers.iter().find(|m| m.0 == FIRST_LOGIN)?.1?;
            Some(x.to_ssh - login)
        };
        println!(
            "{:<34} {:>9} {:>9} {:>9}",
            "outside the guest's boot (*)",
            f(Some(&outside(o))),
            f(Some(&outside(b))),
            f(Some(&outside(v)))
        );
        println!("(*) boot to SSH minus the first login on the guest clock: the host's setup,");
        println!("    firmware and bootloader (virt-lightning boots from the disk through SeaBIOS");
        println!("    and syslinux), and what the command does after the login (kthw-lab: saving");
        println!("    the fresh state for `reset`; the baselines: their polling interval)");
    }
    if let Some(lab) = lab {
        println!();
        println!("2m2w (4 nodes): create --until runtime, reset, destroy");
        for (phase, secs) in &lab.phases {
            println!("  {phase:<12} {secs:>7.1} s");
        }
        println!("{:<14} {:>7.1} s", "create", lab.create);
        println!(
            "{:<14} {:>7.1} s   (nodes paused {:.1} s)",
            "checkpoint", lab.save, lab.paused
        );
        let r = &lab.restores;
        let worst = r.iter().cloned().fold(0.0, f64::max);
        println!(
            "{:<14} {:>7.1} s   mean of {} (min {:.1}, max {:.1}); ratio to create {:.2}; target <= 15 s {}",
            "restore",
            mean(r),
            r.len(),
            r.iter().cloned().fold(f64::INFINITY, f64::min),
            worst,
            mean(r) / lab.create,
            if worst <= 15.0 { "met" } else { "NOT met" }
        );
        println!(
            "{:<14} {:>7.1} s   ratio to create {:.2}",
            "reset",
            lab.reset,
            lab.reset / lab.create
        );
        println!("{:<14} {:>7.1} s", "destroy", lab.destroy);
    }
}

/// How `figure_table` lays out a figure: its width, decimals and unit, and the width of
/// a ratio column.
type Layout = (usize, usize, &'static str, usize);
const SECONDS: Layout = (8, 1, " s", 7);

/// One table, a row per node count: a figure (`value` of each run) for kthw-lab, the
/// tutorial baseline and virt-lightning (when it ran), and the ratios kthw-lab / each.
fn figure_table(
    rows: &[(u32, Boot, Boot, Option<Boot>)],
    (width, decimals, unit, ratio): Layout,
    value: impl Fn(&Boot) -> f64,
) {
    let head = width + unit.len();
    println!(
        "{:<6} {:>head$} {:>head$} {:>ratio$} {:>head$} {:>ratio$}",
        "nodes", "kthw-lab", "tutorial", "ratio", "virt-ltng", "ratio"
    );
    for (n, o, b, v) in rows {
        let (fo, fb, fv) = (value(o), value(b), v.as_ref().map(&value));
        println!(
            "{:<6} {} {} {:>ratio$.2} {} {}",
            n,
            cell(Some(fo), width, decimals, unit),
            cell(Some(fb), width, decimals, unit),
            fo / fb,
            cell(fv, width, decimals, unit),
            cell(fv.map(|fv| fo / fv), ratio, 2, ""),
        );
    }
}

/// A right-aligned table cell of `width` characters (plus `unit`), or "-" when the
/// figure was not measured.
fn cell(v: Option<f64>, width: usize, decimals: usize, unit: &str) -> String {
    match v {
        Some(v) => format!("{v:>width$.decimals$}{unit}"),
        None => format!("{:>w$}", "-", w = width + unit.len()),
    }
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// A scenario of `n` nodes: one controller and `n - 1` workers.
fn scenario(dir: &Path, name: &str, n: u32) -> PathBuf {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &path,
        format!(
            "name: {name}\n\
             controllers:\n  count: 1\n  memory_mib: {MEMORY_MIB}\n\
             workers:\n  count: {}\n  memory_mib: {MEMORY_MIB}\n\
             load_balancer:\n  address: 10.200.1.15\n\
             from_image: [etcd, containerd, runc, cni-plugins]\n",
            n - 1
        ),
    )
    .unwrap();
    path
}

fn boot_kthw(n: u32, dir: &Path) -> Boot {
    let lab = format!("bench{n}");
    let s = scenario(dir, &lab, n);
    let (_, to_ssh) = timed(|| kthw(&["create", s.to_str().unwrap(), "--until", "wait-ssh"]));
    println!("kthw-lab: {n} node(s) to ssh in {to_ssh:.1} s");
    let domains: Vec<String> = (0..n)
        .map(|i| {
            if i == 0 {
                format!("{lab}-controller-0")
            } else {
                format!("{lab}-worker-{}", i - 1)
            }
        })
        .collect();
    let disks: Vec<PathBuf> = domains
        .iter()
        .map(|d| {
            let node = d.strip_prefix(&format!("{lab}-")).unwrap();
            state_dir()
                .join("labs")
                .join(&lab)
                .join("disks")
                .join(format!("{node}.qcow2"))
        })
        .collect();
    let markers = if n == 1 {
        let journal = kthw(&["ssh", &lab, "controller-0", "--", GUEST_LOG]);
        milestones(&String::from_utf8_lossy(&journal.stdout))
    } else {
        Vec::new()
    };
    let rss_mib = domains.iter().map(|d| qemu_hwm_mib(d)).collect();
    let disk_mib = disks.iter().map(|p| allocated_mib(p)).collect();
    let state_mib = disks.iter().map(|p| saved_state_mib(p)).collect();
    let (_, teardown) = timed(|| kthw(&["destroy", &lab]));
    Boot {
        to_ssh,
        teardown,
        rss_mib,
        disk_mib,
        state_mib,
        markers,
    }
}

fn boot_baseline(n: u32, dir: &Path, image: &Path) -> Boot {
    let script = root().join("benches/baseline/tutorial-lab.sh");
    let work = dir.join(format!("baseline{n}"));
    let mut up = Command::new(&script);
    up.arg("up")
        .arg(&work)
        .arg(n.to_string())
        .arg(image)
        .arg(MEMORY_MIB.to_string());
    let mut down = Command::new(&script);
    down.arg("down").arg(&work);
    boot_with_script(
        "baseline",
        n,
        &work,
        ("base-node-", "10.250.0.11"),
        up,
        down,
        |d| work.join(format!("{d}.qcow2")),
    )
}

/// virt-lightning (benches/baseline/virt-lightning.sh) bringing up `n` nodes from the
/// disk-bootable copy of the same image.
fn boot_virt_lightning(n: u32, dir: &Path) -> Boot {
    let script = root().join("benches/baseline/virt-lightning.sh");
    let work = dir.join(format!("vl{n}"));
    let mut up = Command::new(&script);
    up.arg("up")
        .arg(vl_venv())
        .arg(&work)
        .arg(n.to_string())
        .arg(bootable_disk())
        .arg(MEMORY_MIB.to_string());
    let mut down = Command::new(&script);
    down.arg("down").arg(vl_venv()).arg(&work);
    boot_with_script(
        "virt-lightning",
        n,
        &work,
        ("vl-node-", "192.168.123.11"),
        up,
        down,
        |d| Path::new("/var/lib/virt-lightning/pool").join(format!("{d}-0.qcow2")),
    )
}

/// Times a baseline script's `up` (returns once every node accepts a login), reads
/// what it costs per node (domains `PREFIXi`, the first at `first_ip`; `disk` names a
/// domain's overlay), then times its `down`. A baseline saves no state for a reset, so
/// there is no saved-state size to report.
fn boot_with_script(
    label: &str,
    n: u32,
    work: &Path,
    (prefix, first_ip): (&str, &str),
    mut up: Command,
    mut down: Command,
    disk: impl Fn(&str) -> PathBuf,
) -> Boot {
    let (_, to_ssh) = timed(|| run(&mut up));
    println!("{label}: {n} node(s) to ssh in {to_ssh:.1} s");
    let domains: Vec<String> = (0..n).map(|i| format!("{prefix}{i}")).collect();
    let markers = if n == 1 {
        guest_milestones(&work.join("id"), first_ip)
    } else {
        Vec::new()
    };
    let rss_mib = domains.iter().map(|d| qemu_hwm_mib(d)).collect();
    let disk_mib = domains.iter().map(|d| allocated_mib(&disk(d))).collect();
    let (_, teardown) = timed(|| run(&mut down));
    Boot {
        to_ssh,
        teardown,
        rss_mib,
        disk_mib,
        state_mib: Vec::new(),
        markers,
    }
}

/// The guest's kernel log and journal since boot, with monotonic timestamps.
/// It waits for the boot to finish first: an early sshd lets the first login in before
/// journald has read the kernel log.
/// (A poll: `systemctl is-system-running --wait` as the user hung on a node whose boot
/// had finished.)
const GUEST_LOG: &str = "for i in $(seq 300); do \
     case $(systemctl is-system-running) in initializing|starting) sleep 1 ;; *) break ;; esac; \
     done; sudo journalctl -b -o short-monotonic --no-pager";

/// [`milestones`] of a baseline's node, read as its user `kthw` with the key `id`.
fn guest_milestones(id: &Path, ip: &str) -> Vec<(&'static str, Option<f64>)> {
    let out = run(Command::new("ssh").arg("-i").arg(id).args([
        "-q",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        &format!("kthw@{ip}"),
        GUEST_LOG,
    ]));
    milestones(&String::from_utf8_lossy(&out.stdout))
}

/// The milestone of [`milestones`] that ends the boot.
const FIRST_LOGIN: &str = "first login accepted";

/// Milestones of one boot, seconds since the kernel started, from the guest's journal
/// (kernel messages included).
fn milestones(log: &str) -> Vec<(&'static str, Option<f64>)> {
    // Every needle of a row must be on the line.
    const MARKS: &[(&str, &[&str])] = &[
        ("kernel done, initrd starts", &["Run /init as init process"]),
        ("root filesystem mounted", &["EXT4-fs (vda", "): mounted"]),
        ("systemd starts", &["running in system mode"]),
        (
            "cloud-init-local done",
            &["Finished cloud-init-local.service"],
        ),
        ("sysinit.target", &["Reached target sysinit.target"]),
        (
            "cloud-init (network) done",
            &["Finished cloud-init.service"],
        ),
        ("eth0 configured", &["eth0: Gained carrier"]),
        ("sshd listening", &["Server listening on 0.0.0.0 port 22"]),
        (FIRST_LOGIN, &["Accepted publickey"]),
        ("cloud-final done", &["Finished cloud-final.service"]),
    ];
    MARKS
        .iter()
        .map(|(name, needles)| {
            let at = log
                .lines()
                .find(|l| needles.iter().all(|n| l.contains(n)))
                .and_then(|l| {
                    let l = l.trim_start();
                    let inner = l.strip_prefix('[')?.split(']').next()?;
                    inner.trim().parse::<f64>().ok()
                });
            (*name, at)
        })
        .collect()
}

/// Peak RSS of the qemu process running `domain` (VmHWM), MiB.
fn qemu_hwm_mib(domain: &str) -> f64 {
    let needle = format!("guest={domain},");
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline);
        if !cmdline.starts_with("/usr/bin/qemu-system") || !cmdline.contains(&needle) {
            continue;
        }
        let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
        if let Some(kb) = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        {
            return kb / 1024.0;
        }
    }
    f64::NAN
}

/// Space the overlay really takes on the host, MiB.
fn allocated_mib(path: &Path) -> f64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() as f64 * 512.0 / 1048576.0)
        .unwrap_or(f64::NAN)
}

/// Memory state saved in the image's internal snapshots, MiB (`qemu-img info`).
fn saved_state_mib(path: &Path) -> f64 {
    let out = run(Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(path));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let bytes: u64 = info["snapshots"]
        .as_array()
        .map(|s| s.iter().filter_map(|x| x["vm-state-size"].as_u64()).sum())
        .unwrap_or(0);
    bytes as f64 / 1048576.0
}

struct FullLab {
    create: f64,
    phases: Vec<(String, f64)>,
    save: f64,
    paused: f64,
    restores: Vec<f64>,
    reset: f64,
    destroy: f64,
}

fn full_lab(dir: &Path) -> FullLab {
    let s = root().join("scenarios/2m2w.yaml");
    let s = s.to_str().unwrap();
    let (_, create) = timed(|| kthw(&["create", s, "--until", "runtime"]));
    println!("kthw-lab: 2m2w create --until runtime in {create:.1} s");
    let phases = last_run_phases("k2m2w");
    let (_, save) = timed(|| kthw(&["checkpoint", "save", "k2m2w", "bench"]));
    println!("kthw-lab: 2m2w checkpoint save in {save:.1} s");
    let o = kthw(&["checkpoint", "list", "k2m2w", "-o", "json"]);
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let paused = list[0]["paused_s"].as_f64().unwrap_or(f64::NAN);
    let mut restores = Vec::new();
    for i in 0..3 {
        let (_, t) = timed(|| kthw(&["checkpoint", "restore", "k2m2w", "bench"]));
        println!("kthw-lab: 2m2w checkpoint restore {} in {t:.1} s", i + 1);
        restores.push(t);
    }
    let (_, reset) = timed(|| kthw(&["reset", "k2m2w"]));
    println!("kthw-lab: 2m2w reset in {reset:.1} s");
    let (_, destroy) = timed(|| kthw(&["destroy", "k2m2w"]));
    let _ = dir;
    FullLab {
        create,
        phases,
        save,
        paused,
        restores,
        reset,
        destroy,
    }
}

/// Phase timings of the lab's newest create run, from its run manifest.
fn last_run_phases(lab: &str) -> Vec<(String, f64)> {
    let runs = state_dir().join("labs").join(lab).join("runs");
    let newest = std::fs::read_dir(&runs)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .max()
        .expect("a run manifest");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(newest).unwrap()).unwrap();
    v["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["phase"].as_str().unwrap_or("?").to_string(),
                p["seconds"].as_f64().unwrap_or(f64::NAN),
            )
        })
        .collect()
}
