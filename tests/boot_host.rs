//! Host-side pieces of booting, against the real things: CIDATA seeds read back with
//! fatfs and `blkid`, qcow2 overlays checked by `qemu-img check`, SSH keys on disk, and
//! the libvirt Hypervisor over libvirt's in-process test driver (`test:///default`).

#[path = "boot_fixture.rs"]
mod fixture;
mod support;

use support::require;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use kthw_lab::host::accel::Accel;
use kthw_lab::host::disks::{check_image, ensure_overlay, image_info, DiskError, DiskOutcome};
use kthw_lab::host::libvirt::{
    remove_lab, start_all, DefineOutcome, DomainState, Hypervisor, HypervisorError, Libvirt,
};
use kthw_lab::host::seed::{read_seed, remove_seed, write_seed};
use kthw_lab::host::ssh::ensure_lab_keys;
use kthw_lab::render::cloudinit::render_seed;
use kthw_lab::render::domain::{render_domain, Boot, DomainOptions, SeedKind};

fn opts() -> DomainOptions {
    DomainOptions {
        accel: Accel::Tcg,
        boot: Boot::DirectKernel {
            kernel: "/nonexistent/vmlinuz".into(),
            initrd: "/nonexistent/initrd.img".into(),
            extra_cmdline: String::new(),
        },
        seed: SeedKind::Fat,
    }
}

#[test]
fn keys_are_generated_once_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let plan = fixture::lab_plan("keys", 2, 1, 512, dir.path());
    let a = ensure_lab_keys(&plan).unwrap();
    let b = ensure_lab_keys(&plan).unwrap();
    assert_eq!(a.user.public_openssh, b.user.public_openssh);
    assert_eq!(a.hosts.len(), 3);
    for (name, k) in &a.hosts {
        assert_eq!(
            k.public_blob, b.hosts[name].public_blob,
            "{name} key was regenerated"
        );
        assert!(k.public_openssh.starts_with("ssh-ed25519 "));
        assert!(k.private_openssh.contains("BEGIN OPENSSH PRIVATE KEY"));
    }
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&plan.paths.ssh), 0o700);
    assert_eq!(mode(&a.user.private_path), 0o600);
    for k in a.hosts.values() {
        assert_eq!(mode(&k.private_path), 0o600);
    }
    let known = std::fs::read_to_string(&a.known_hosts).unwrap();
    assert!(known.contains("m1,10.200.1.10 ssh-ed25519 "), "{known}");
    // OpenSSH itself accepts the key files.
    let out = Command::new(require("ssh-keygen", "openssh-client"))
        .arg("-y")
        .arg("-f")
        .arg(&a.user.private_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .nth(1),
        a.user.public_openssh.split_whitespace().nth(1)
    );
}

#[test]
fn seed_is_a_cidata_fat_volume_with_the_rendered_files() {
    let dir = tempfile::tempdir().unwrap();
    let plan = fixture::lab_plan("seed", 1, 1, 512, dir.path());
    let keys = ensure_lab_keys(&plan).unwrap();
    let node = &plan.nodes[0];
    let files = render_seed(&plan, node, &keys.seed_keys(&node.name).unwrap());
    write_seed(&node.seed_path, &files).unwrap();
    let first = std::fs::read(&node.seed_path).unwrap();
    write_seed(&node.seed_path, &files).unwrap();
    assert!(
        first == std::fs::read(&node.seed_path).unwrap(),
        "the same seed content gave different volumes"
    );
    let (label, entries) = read_seed(&node.seed_path).unwrap();
    assert_eq!(label, "CIDATA");
    let names: Vec<&str> = entries.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "kthw/address",
            "kthw/authorized_keys",
            "kthw/eth0.network",
            "kthw/gateway",
            "kthw/hostname",
            "kthw/hosts",
            "kthw/mac",
            "kthw/resolv.conf",
            "kthw/ssh_host_ed25519_key",
            "kthw/ssh_host_ed25519_key.pub",
            "kthw/user",
            "meta-data",
            "network-config",
            "user-data",
        ]
    );
    let user_data = &entries[names.iter().position(|n| *n == "user-data").unwrap()];
    assert_eq!(user_data.1, files.user_data);
    for (name, content) in &files.kthw {
        let read = &entries[names
            .iter()
            .position(|n| *n == format!("kthw/{name}"))
            .unwrap()];
        assert_eq!(&read.1, content, "kthw/{name} reads back as written");
    }
    assert!(user_data
        .1
        .contains(keys.hosts["m1"].public_openssh.as_str()));
    let out = Command::new(require("blkid", "util-linux"))
        .args(["-p", "-o", "export"])
        .arg(&node.seed_path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("LABEL=CIDATA"), "{text}");
    assert!(text.contains("TYPE=vfat"), "{text}");
    remove_seed(&node.seed_path).unwrap();
    remove_seed(&node.seed_path).unwrap();
    assert!(!node.seed_path.exists());
}

#[test]
fn overlays_sit_on_the_base_and_pass_qemu_img_check() {
    require("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&base)
        .arg("2G")
        .status()
        .unwrap();
    assert!(st.success());
    let overlay = dir.path().join("disks/m1.qcow2");
    assert_eq!(
        ensure_overlay(&base, &overlay, 4).unwrap(),
        DiskOutcome::Created
    );
    assert_eq!(
        ensure_overlay(&base, &overlay, 4).unwrap(),
        DiskOutcome::Exists
    );
    check_image(&overlay).unwrap();
    let info = image_info(&overlay).unwrap();
    assert_eq!(info.format, "qcow2");
    assert_eq!(info.virtual_size, 4 << 30);
    assert_eq!(info.backing_file.as_deref(), Some(base.to_str().unwrap()));
    assert_eq!(info.backing_format.as_deref(), Some("qcow2"));
    // An overlay is small: never a full copy of the base.
    assert!(std::fs::metadata(&overlay).unwrap().len() < 1 << 20);
    // Another base is refused rather than silently used.
    let other = dir.path().join("other.qcow2");
    std::fs::copy(&base, &other).unwrap();
    let err = ensure_overlay(&other, &overlay, 4).unwrap_err();
    assert!(matches!(err, DiskError::WrongBacking { .. }), "{err}");
    let err = ensure_overlay(&dir.path().join("missing.qcow2"), &overlay, 4).unwrap_err();
    assert!(matches!(err, DiskError::BaseMissing { .. }), "{err}");
    assert!(err.hint().contains("build.sh"));
}

fn test_driver() -> Libvirt {
    Libvirt::connect(Some("test:///default")).expect("libvirt test driver")
}

#[test]
fn hypervisor_on_the_test_driver() {
    let hv = test_driver();
    let dir = tempfile::tempdir().unwrap();
    let plan = fixture::lab_plan("tdrv", 1, 2, 512, dir.path());
    let other = fixture::lab_plan("tdrvother", 1, 1, 512, dir.path());
    for p in [&plan, &other] {
        for n in &p.nodes {
            let xml = render_domain(p, n, &opts()).unwrap();
            assert_eq!(hv.ensure_domain(&xml).unwrap(), DefineOutcome::Defined);
            // Idempotent: the same definition is left alone.
            assert_eq!(hv.ensure_domain(&xml).unwrap(), DefineOutcome::Unchanged);
        }
    }
    // A changed definition is redefined.
    let mut bigger = plan.clone();
    bigger.nodes[0].memory_mib = 768;
    let xml = render_domain(&bigger, &bigger.nodes[0], &opts()).unwrap();
    assert_eq!(hv.ensure_domain(&xml).unwrap(), DefineOutcome::Updated);
    assert_eq!(hv.ensure_domain(&xml).unwrap(), DefineOutcome::Unchanged);

    // Listed by the metadata marker, not by name: the built-in `test` domain and the
    // other lab are not ours.
    let found = hv.list_lab_domains("tdrv").unwrap();
    let names: Vec<&str> = found.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["tdrv-m1", "tdrv-n1", "tdrv-n2"]);
    assert_eq!(found[0].marker.role, "controller");
    assert_eq!(found[1].marker.node, "n1");
    assert_eq!(
        found[0].disk_files,
        vec![
            plan.nodes[0].disk_path.clone(),
            plan.nodes[0].seed_path.clone()
        ]
    );
    assert!(found.iter().all(|d| d.state == DomainState::ShutOff));

    let names: Vec<String> = plan.nodes.iter().map(|n| n.domain.clone()).collect();
    for r in start_all(&hv, &names) {
        r.unwrap();
    }
    hv.start("tdrv-m1").unwrap(); // already running: fine
    assert_eq!(hv.state("tdrv-m1").unwrap(), Some(DomainState::Running));
    assert_eq!(hv.state("no-such-domain").unwrap(), None);

    // The fresh-state snapshot: none at first, then the one taken (a second take
    // replaces it), and a revert to it works. remove_lab below must undefine a domain
    // that has one.
    assert_eq!(hv.fresh_snapshot("tdrv-m1").unwrap(), None);
    assert_eq!(hv.fresh_snapshot("no-such-domain").unwrap(), None);
    hv.take_fresh_snapshot("tdrv-m1", "first & <old>").unwrap();
    assert_eq!(
        hv.fresh_snapshot("tdrv-m1").unwrap().as_deref(),
        Some("first & <old>")
    );
    let desc = kthw_lab::host::libvirt::fresh_description(&found[0].marker.digest);
    hv.take_fresh_snapshot("tdrv-m1", &desc).unwrap();
    assert_eq!(hv.fresh_snapshot("tdrv-m1").unwrap(), Some(desc));
    hv.revert_to_fresh("tdrv-m1").unwrap();
    assert_eq!(hv.state("tdrv-m1").unwrap(), Some(DomainState::Running));
    let err = hv.revert_to_fresh("tdrv-n1").unwrap_err();
    assert!(
        err.to_string().contains("no snapshot `kthw-fresh`"),
        "{err}"
    );

    // What checkpoints and experiments do: pause and resume (idempotent), named
    // snapshots beside the fresh one, a revert that leaves the domain paused, a
    // plug pulled, and deleting a snapshot.
    hv.suspend("tdrv-n1").unwrap();
    hv.suspend("tdrv-n1").unwrap();
    assert_eq!(hv.state("tdrv-n1").unwrap(), Some(DomainState::Paused));
    hv.take_snapshot("tdrv-n1", "kthw-cp-one", "checkpoint one")
        .unwrap();
    hv.resume("tdrv-n1").unwrap();
    hv.resume("tdrv-n1").unwrap();
    assert_eq!(hv.state("tdrv-n1").unwrap(), Some(DomainState::Running));
    hv.take_snapshot("tdrv-n1", "kthw-cp-two", "checkpoint two")
        .unwrap();
    assert_eq!(
        hv.snapshot_names("tdrv-n1").unwrap(),
        ["kthw-cp-one", "kthw-cp-two"]
    );
    assert_eq!(
        hv.snapshot_names("no-such-domain").unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(
        hv.snapshot("tdrv-n1", "kthw-cp-two").unwrap().as_deref(),
        Some("checkpoint two")
    );
    hv.revert_snapshot("tdrv-n1", "kthw-cp-two", true).unwrap();
    assert_eq!(hv.state("tdrv-n1").unwrap(), Some(DomainState::Paused));
    hv.resume("tdrv-n1").unwrap();
    assert!(hv.delete_snapshot("tdrv-n1", "kthw-cp-one").unwrap());
    assert!(!hv.delete_snapshot("tdrv-n1", "kthw-cp-one").unwrap());
    assert_eq!(hv.snapshot("tdrv-n1", "kthw-cp-one").unwrap(), None);
    hv.power_off("tdrv-n2").unwrap();
    assert_eq!(hv.state("tdrv-n2").unwrap(), Some(DomainState::ShutOff));
    hv.power_off("tdrv-n2").unwrap(); // already off: fine
    hv.start("tdrv-n2").unwrap();
    assert!(hv.suspend("no-such-domain").is_err());

    // A domain of that name owned by another lab is not touched.
    let mut clash = other.clone();
    clash.nodes[0].domain = "tdrv-m1".into();
    let xml = render_domain(&clash, &clash.nodes[0], &opts()).unwrap();
    let err = hv.ensure_domain(&xml).unwrap_err();
    assert!(matches!(err, HypervisorError::NotOurs { .. }), "{err}");

    // Remove: files the domains referenced go too; twice is fine.
    for n in &plan.nodes {
        std::fs::create_dir_all(n.disk_path.parent().unwrap()).unwrap();
        std::fs::create_dir_all(n.seed_path.parent().unwrap()).unwrap();
        std::fs::write(&n.disk_path, b"overlay").unwrap();
        std::fs::write(&n.seed_path, b"seed").unwrap();
    }
    let report = remove_lab(&hv, "tdrv", &[]).unwrap();
    assert_eq!(report.domains.len(), 3);
    assert_eq!(report.files.len(), 6);
    assert!(plan
        .nodes
        .iter()
        .all(|n| !n.disk_path.exists() && !n.seed_path.exists()));
    assert!(hv.list_lab_domains("tdrv").unwrap().is_empty());
    assert_eq!(remove_lab(&hv, "tdrv", &[]).unwrap(), Default::default());
    hv.destroy_and_undefine("tdrv-m1").unwrap();
    // The other lab is still there.
    assert_eq!(hv.list_lab_domains("tdrvother").unwrap().len(), 2);
    assert!(hv.state("test").unwrap().is_some());
}

#[test]
fn connect_error_names_the_uri() {
    let err = Libvirt::connect(Some("qemu+unix:///system?socket=/nonexistent/sock"))
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .starts_with("cannot connect to libvirt at qemu+unix"),
        "{err}"
    );
    assert!(
        err.hint().contains("libvirtd is not running"),
        "{}",
        err.hint()
    );
}

#[test]
fn the_connect_hint_says_how_to_start_libvirtd_on_this_kind_of_host() {
    use kthw_lab::host::libvirt::connect_hint;
    let gone =
        "Failed to connect socket to '/var/run/libvirt/libvirt-sock': No such file or directory";
    let with = connect_hint("qemu:///system", gone, true);
    assert!(with.contains("`systemctl start libvirtd`"), "{with}");
    let without = connect_hint("qemu:///system", gone, false);
    assert!(without.contains("`virtlogd -d; libvirtd -d`"), "{without}");
    let refused = connect_hint(
        "qemu+unix:///system?socket=/run/x",
        "Failed to connect socket to '/run/x': Connection refused",
        false,
    );
    assert!(refused.contains("libvirtd is not running"), "{refused}");
    let denied = connect_hint(
        "qemu:///system",
        "Failed to connect socket to '/var/run/libvirt/libvirt-sock': Permission denied",
        true,
    );
    assert!(denied.contains("run as root"), "{denied}");
    // Another daemon than the local system one: no start command to give.
    let remote = connect_hint(
        "qemu+ssh://h/system",
        "Cannot recv data: Connection reset",
        true,
    );
    assert!(!remote.contains("systemctl"), "{remote}");
    assert!(remote.contains("qemu+ssh://h/system"), "{remote}");
}

/// The tap devices of a running domain, as libvirt's live XML names them (what a
/// delay step puts netem on).
#[test]
fn tap_devices_come_from_the_live_interface_targets() {
    let xml = r#"<domain type="qemu"><name>l-n1</name><devices>
      <disk type="file" device="disk"><target dev="vda" bus="virtio"/></disk>
      <interface type="bridge"><mac address="52:54:00:00:00:01"/><source bridge="br0"/><target dev="vnet7"/><model type="virtio"/></interface>
      <interface type="bridge"><source bridge="br1"/><target dev="vnet8"/></interface>
      <interface type="bridge"><source bridge="br2"/></interface>
    </devices></domain>"#;
    assert_eq!(
        kthw_lab::host::libvirt::parse_tap_devices(xml),
        ["vnet7", "vnet8"]
    );
    assert!(
        kthw_lab::host::libvirt::parse_tap_devices("<domain><name>x</name></domain>").is_empty()
    );
}
