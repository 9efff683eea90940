//! Real VMs (TCG here, KVM where it works). Every test here is
//! `#[ignore = "real VMs: ..."]`: `make test` runs them (`--run-ignored all`), a plain
//! `cargo test` lists them as ignored.
//!
//! Each test re-runs itself inside `scripts/netns-run` (a private network namespace with
//! its own libvirtd), so bridges, tap devices, VMs and lab addresses never exist in the
//! machine's own namespace. The offline image is built (or reused) from
//! `images/kthw-debian12/build.sh` into `$KTHW_IMAGE_DIR` (default: `<target>/kthw-image`).
//!
//! - `vm_two_nodes_boot_login_and_leave_nothing`: two nodes boot from seeds, a real SSH
//!   login with the pinned host key works on each, hostname/IP//etc/hosts are checked,
//!   then everything is removed and nothing is left.
//! - `vm_measure_boot_1_and_4_nodes`: a measurement, not a check: boot-to-SSH of one
//!   node alone and of four started together, and qemu RSS per node. `make test` leaves
//!   it out (the Makefile's `NOT_IN_MAKE_TEST`); run it by name with
//!   `cargo nextest run --run-ignored only vm_measure_boot_1_and_4_nodes`.
//!
//! Run, anything missing (root, qemu, libvirt, mmdebstrap, ...) is a failure, not a skip.

#[path = "boot_fixture.rs"]
mod fixture;
mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use kthw_lab::actions::phases::first_boot_cmdline;
use kthw_lab::cache::FirstBoot;
use kthw_lab::host::accel::{self, Accel};
use kthw_lab::host::disks::{check_image, ensure_overlay};
use kthw_lab::host::libvirt::{remove_lab, start_all, Hypervisor, Libvirt};
use kthw_lab::host::seed::write_seed;
use kthw_lab::host::ssh::{self, ensure_lab_keys, exec, exec_timeout, login, targets, LabKeys};
use kthw_lab::plan::LabPlan;
use kthw_lab::render::cloudinit::{render_etc_hosts, render_seed};
use kthw_lab::render::domain::{render_domain, Boot, DomainOptions, SeedKind};
use kthw_lab::scenario::Accelerator;

const INSIDE: &str = "KTHW_VM_TEST_INSIDE";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"))
}

/// The offline image in the shared test cache (built once by whichever test needs it
/// first; `support::shared_image` builds it before entering the namespace).
fn image_dir() -> PathBuf {
    std::env::var_os("KTHW_IMAGE_DIR")
        .map(PathBuf::from)
        .expect("KTHW_IMAGE_DIR is set by enter()")
}

/// Outside: check prerequisites, build the image, and re-run `test` inside netns-run.
/// Returns true when the caller is already inside and should do the work.
fn enter(test: &str) -> bool {
    if std::env::var_os(INSIDE).is_some() {
        support::report_panics_outward();
        return true;
    }
    support::real_vm_test(test);
    for (tool, pkg) in [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("qemu-img", "qemu-utils"),
        ("libvirtd", "libvirt-daemon-system"),
        ("virtlogd", "libvirt-daemon-system"),
        ("virsh", "libvirt-clients"),
        ("mmdebstrap", "mmdebstrap"),
        ("mkfs.ext4", "e2fsprogs"),
        ("ip", "iproute2"),
        ("unshare", "util-linux"),
    ] {
        support::require(tool, pkg);
    }
    let dir = support::shared_image();
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(repo().join("scripts/netns-run"));
    cmd.arg(exe)
        .args([
            "--exact",
            test,
            "--nocapture",
            "--include-ignored",
            "--test-threads=1",
        ])
        .env(INSIDE, "1")
        .env("KTHW_IMAGE_DIR", &dir);
    support::run_inside(cmd, test);
    false
}

fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The lab bridge, test-local (the real bridge code is another module's): inside the
/// namespace only.
fn bridge(plan: &LabPlan) {
    assert!(
        std::env::var_os("KTHW_NETNS_NAME").is_some(),
        "not inside netns-run"
    );
    let br = &plan.network.bridge;
    sh(&format!(
        "ip link add {br} type bridge && ip addr add {} dev {br} && ip link set {br} up",
        plan.network.gateway_cidr
    ));
}

fn accel() -> Accel {
    let c = accel::decide(Accelerator::Auto, accel::probe());
    if let Some(w) = c.warning {
        println!("warning: {w}");
    }
    c.accel
}

/// The nodes a test boots through cloud-init instead of the image's lean first boot
/// (the same seed serves both; only the kernel command line differs).
const CLOUD_INIT_NODES: &[&str] = &["n1"];

/// Disks, seeds and domains for `nodes` of `plan`; returns the domain names. Nodes in
/// `cloud_init` boot as a cloud image would (cloud-init reads the NoCloud files); the
/// others as kthw-lab boots the offline image (its initrd applies the kthw/ files).
fn provision(
    plan: &LabPlan,
    keys: &LabKeys,
    hv: &dyn Hypervisor,
    nodes: &[&str],
    cloud_init: &[&str],
) -> Vec<String> {
    let img = image_dir();
    let opts_for = |node: &str| DomainOptions {
        accel: accel(),
        boot: Boot::DirectKernel {
            kernel: img.join("vmlinuz"),
            initrd: img.join("initrd.img"),
            extra_cmdline: first_boot_cmdline(if cloud_init.contains(&node) {
                FirstBoot::CloudInit
            } else {
                FirstBoot::KthwSeed
            })
            .to_string(),
        },
        seed: SeedKind::Fat,
    };
    std::fs::create_dir_all(&plan.paths.console).unwrap();
    let mut names = Vec::new();
    for n in plan
        .nodes
        .iter()
        .filter(|n| nodes.contains(&n.name.as_str()))
    {
        ensure_overlay(&img.join("disk.qcow2"), &n.disk_path, n.disk_gib).unwrap();
        check_image(&n.disk_path).unwrap();
        let files = render_seed(plan, n, &keys.seed_keys(&n.name).unwrap());
        write_seed(&n.seed_path, &files).unwrap();
        let xml = render_domain(plan, n, &opts_for(&n.name)).unwrap();
        hv.ensure_domain(&xml).unwrap();
        names.push(n.domain.clone());
    }
    names
}

/// Start `names` together and wait for a real login on each; per-node seconds.
fn boot(
    plan: &LabPlan,
    keys: &LabKeys,
    hv: &dyn Hypervisor,
    names: &[String],
    timeout: Duration,
) -> Vec<(String, Duration)> {
    let t0 = Instant::now();
    for r in start_all(hv, names) {
        r.unwrap();
    }
    println!(
        "started {} domain(s) in {:.1} s",
        names.len(),
        t0.elapsed().as_secs_f64()
    );
    let wanted: Vec<_> = targets(plan, keys)
        .into_iter()
        .filter(|t| names.iter().any(|d| d.ends_with(&format!("-{}", t.node))))
        .collect();
    let progress = |line: &str| println!("{line}");
    match ssh::wait_for_all(&wanted, timeout, &progress, &|_, _| {}) {
        Ok(r) => r,
        // A boot timeout carries the end of the node's console log.
        Err(e) => panic!("{e}\nhint: {}", e.hint()),
    }
}

/// RSS of each running qemu, by domain name (pid files of the private libvirtd).
fn qemu_rss_mib(names: &[String]) -> Vec<(String, u64)> {
    names
        .iter()
        .filter_map(|d| {
            let pid = std::fs::read_to_string(format!("/run/libvirt/qemu/{d}.pid")).ok()?;
            let status = std::fs::read_to_string(format!("/proc/{}/status", pid.trim())).ok()?;
            let kib: u64 = status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some((d.clone(), kib / 1024))
        })
        .collect()
}

/// Remove the lab and prove nothing is left: no domain, overlay, seed or tap device.
fn remove_and_prove_empty(plan: &LabPlan, hv: &dyn Hypervisor) {
    let extra: Vec<PathBuf> = plan
        .nodes
        .iter()
        .flat_map(|n| [n.disk_path.clone(), n.seed_path.clone()])
        .collect();
    let t = Instant::now();
    let report = remove_lab(hv, &plan.lab, &extra).unwrap();
    println!(
        "removed {} domain(s) and {} file(s) in {:.1} s",
        report.domains.len(),
        report.files.len(),
        t.elapsed().as_secs_f64()
    );
    assert!(hv.list_lab_domains(&plan.lab).unwrap().is_empty());
    for n in &plan.nodes {
        assert!(!n.disk_path.exists(), "{} left", n.disk_path.display());
        assert!(!n.seed_path.exists(), "{} left", n.seed_path.display());
        assert_eq!(hv.state(&n.domain).unwrap(), None, "{} left", n.domain);
    }
    let taps = sh("ip -o link show type tun");
    assert!(taps.trim().is_empty(), "tap devices left: {taps}");
    let left = sh("virsh -q -c qemu:///system list --all --name");
    assert!(left.trim().is_empty(), "domains left: {left}");
    // Twice is fine.
    assert_eq!(
        remove_lab(hv, &plan.lab, &extra).unwrap(),
        Default::default()
    );
}

/// A fresh state dir under the target dir. Kept when the test fails (console logs);
/// the test removes it at its end.
fn state_dir(tag: &str) -> PathBuf {
    let base = target_dir().join("vm-tests");
    std::fs::create_dir_all(&base).unwrap();
    let dir = tempfile::Builder::new()
        .prefix(tag)
        .tempdir_in(base)
        .unwrap()
        .keep();
    println!("state dir {}", dir.display());
    std::fs::canonicalize(dir).unwrap()
}

#[test]
#[ignore = "real VMs: run by make test (--run-ignored all)"]
fn vm_two_nodes_boot_login_and_leave_nothing() {
    if !enter("vm_two_nodes_boot_login_and_leave_nothing") {
        return;
    }
    let dir = state_dir("two-");
    let plan = fixture::lab_plan("vmt", 1, 1, 640, &dir);
    bridge(&plan);
    let hv = Libvirt::connect(None).unwrap();
    let keys = ensure_lab_keys(&plan).unwrap();
    let names = provision(&plan, &keys, &hv, &["m1", "n1"], CLOUD_INIT_NODES);
    let took = boot(&plan, &keys, &hv, &names, Duration::from_secs(420));
    for (node, d) in &took {
        println!("MEASURE two-nodes {node}: boot-to-ssh {} s", d.as_secs());
    }
    for (d, rss) in qemu_rss_mib(&names) {
        println!("MEASURE two-nodes {d}: qemu RSS {rss} MiB");
    }
    let hosts = render_etc_hosts(&plan);
    for t in targets(&plan, &keys) {
        let node = plan.node(&t.node).unwrap();
        let s = login(&t, Duration::from_secs(20)).unwrap_or_else(|e| panic!("{}: {e:?}", t.node));
        assert_eq!(exec(&s, &t.node, "hostname").unwrap().trim(), node.name);
        let addr = exec(&s, &t.node, "ip -4 -o addr show dev eth0").unwrap();
        assert!(
            addr.contains(&format!("inet {}/24", node.ip)),
            "{}: {addr}",
            t.node
        );
        let mac = exec(&s, &t.node, "cat /sys/class/net/eth0/address").unwrap();
        assert_eq!(mac.trim(), node.mac);
        assert_eq!(exec(&s, &t.node, "cat /etc/hosts").unwrap(), hosts);
        assert_eq!(exec(&s, &t.node, "sudo -n id -u").unwrap().trim(), "0");
        // The other node answers by name (from /etc/hosts) over the bridge.
        let other = plan.nodes.iter().find(|n| n.name != node.name).unwrap();
        exec(&s, &t.node, &format!("ping -c1 -W5 {}", other.name)).unwrap();
        // Each VM has its own machine-id.
        let mid = exec(&s, &t.node, "cat /etc/machine-id").unwrap();
        assert_eq!(mid.trim().len(), 32, "{}: machine-id {mid:?}", t.node);
        let size_check = "df -B1 --output=size / | tail -n1";
        let grown = |size: u64| size > (node.disk_gib - 1) << 30;
        if CLOUD_INIT_NODES.contains(&node.name.as_str()) {
            // cloud-init finishes without errors (and sshd keeps its pinned key meanwhile).
            let t0 = Instant::now();
            let status = exec_timeout(
                &s,
                &t.node,
                "cloud-init status --wait --long",
                Duration::from_secs(300),
            )
            .unwrap();
            println!(
                "{}: cloud-init done {} s after login:\n{status}",
                t.node,
                t0.elapsed().as_secs()
            );
            assert!(status.contains("status: done"), "{}: {status}", t.node);
            // The initrd left this boot to cloud-init: only its network file is there.
            let net = exec(&s, &t.node, "ls /etc/systemd/network/").unwrap();
            assert_eq!(net.trim(), "10-cloud-init-eth0.network", "{}", t.node);
            let schema = exec(&s, &t.node, "sudo cloud-init schema --system 2>&1 || true").unwrap();
            println!("{}: cloud-init schema --system: {}", t.node, schema.trim());
        } else {
            // The lean path: cloud-init never ran; the initrd applied the seed.
            let status = exec(&s, &t.node, "cloud-init status || true").unwrap();
            assert!(status.contains("disabled"), "{}: {status}", t.node);
            let net = exec(&s, &t.node, "ls /etc/systemd/network/").unwrap();
            assert_eq!(net.trim(), "10-kthw-eth0.network", "{}", t.node);
        }
        // The root filesystem grows to the overlay's size (cloud-init's resize_rootfs, or
        // kthw-growfs.service on the lean path, both off the path to the first login).
        let t0 = Instant::now();
        let size = loop {
            let size: u64 = exec(&s, &t.node, size_check)
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            if grown(size) || t0.elapsed() > Duration::from_secs(180) {
                break size;
            }
            std::thread::sleep(Duration::from_secs(2));
        };
        assert!(
            grown(size),
            "{}: root filesystem is {size} bytes, disk is {} GiB",
            t.node,
            node.disk_gib
        );
        let units = exec(
            &s,
            &t.node,
            "systemctl --failed --no-legend --plain || true",
        )
        .unwrap();
        println!("{}: failed units: [{}]", t.node, units.trim());
        let blame = exec(
            &s,
            &t.node,
            "systemd-analyze 2>&1; systemd-analyze blame 2>&1 | head -n 8",
        )
        .unwrap();
        println!("{}: {blame}", t.node);
        println!(
            "{}: hostname, address, mac, /etc/hosts, sudo, ping {} ok",
            t.node, other.name
        );
    }
    // Still the pinned key and a working login after cloud-init's last stage.
    for t in targets(&plan, &keys) {
        login(&t, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("{} after cloud-init: {e:?}", t.node));
    }
    remove_and_prove_empty(&plan, &hv);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
#[ignore = "measurement: boots 1 then 4 VMs (several minutes under TCG); not in make test"]
fn vm_measure_boot_1_and_4_nodes() {
    if !enter("vm_measure_boot_1_and_4_nodes") {
        return;
    }
    let dir = state_dir("measure-");
    let plan = fixture::lab_plan("vmm", 2, 2, 640, &dir);
    bridge(&plan);
    let hv = Libvirt::connect(None).unwrap();
    let keys = ensure_lab_keys(&plan).unwrap();

    let one = provision(&plan, &keys, &hv, &["m1"], &[]);
    let took = boot(&plan, &keys, &hv, &one, Duration::from_secs(400));
    println!(
        "MEASURE 1-node {}: boot-to-ssh {} s",
        took[0].0,
        took[0].1.as_secs()
    );
    for (d, rss) in qemu_rss_mib(&one) {
        println!("MEASURE 1-node {d}: qemu RSS {rss} MiB");
    }
    remove_and_prove_empty(&plan, &hv);

    let four = provision(&plan, &keys, &hv, &["m1", "m2", "n1", "n2"], &[]);
    let t = Instant::now();
    let took = boot(&plan, &keys, &hv, &four, Duration::from_secs(600));
    for (node, d) in &took {
        println!("MEASURE 4-nodes {node}: boot-to-ssh {} s", d.as_secs());
    }
    println!("MEASURE 4-nodes all: {} s", t.elapsed().as_secs());
    for (d, rss) in qemu_rss_mib(&four) {
        println!("MEASURE 4-nodes {d}: qemu RSS {rss} MiB");
    }
    remove_and_prove_empty(&plan, &hv);
    std::fs::remove_dir_all(&dir).unwrap();
}
