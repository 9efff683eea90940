//! Nothing under a lab's directory can be read by another local user: the node disks
//! (every node secret once bootstrapped, the CA key on the controllers), the seeds
//! (each node's SSH host private key), the PKI, SSH keys, kubeconfigs, the journal,
//! the balancer's files and the console logs (the guests' serial output). The files
//! are made by the tool's own code paths into a state dir that `nobody` can traverse,
//! then read as `nobody` one by one.

#[path = "boot_fixture.rs"]
mod fixture;
mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use kthw_lab::host::disks::ensure_overlay;
use kthw_lab::host::seed::write_seed;
use kthw_lab::host::ssh::ensure_lab_keys;
use kthw_lab::render::cloudinit::render_seed;

/// Every file under `dir`, directories walked (symlinks not followed).
fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let t = e.file_type().unwrap();
        if t.is_dir() {
            files_under(&e.path(), out);
        } else if !t.is_symlink() {
            out.push(e.path());
        }
    }
}

/// Whether user `nobody` (65534, no groups) can read `path`.
fn nobody_reads(setpriv: &Path, path: &Path) -> bool {
    Command::new(setpriv)
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
        .arg(path)
        .output()
        .unwrap()
        .status
        .success()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn no_file_under_a_lab_is_readable_by_another_user() {
    let setpriv = support::require("setpriv", "util-linux");
    let qemu_img = support::require("qemu-img", "qemu-utils");
    // SAFETY: geteuid has no preconditions and cannot fail.
    assert_eq!(unsafe { libc::geteuid() }, 0, "setpriv --reuid needs root");
    let tmp = tempfile::tempdir().unwrap();
    // A tempdir is 0700: open it to others so only the lab's own modes protect it.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let state = tmp.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    let plan = fixture::lab_plan("leak", 1, 1, 512, &state);

    // What create makes, through the same functions, in the same order.
    kthw_lab::state::record_plan(&plan).unwrap();
    let journal = kthw_lab::actions::Journal::open(&plan.paths.journal, "leak", "sha").unwrap();
    journal.save().unwrap();
    let keys = ensure_lab_keys(&plan).unwrap();
    kthw_lab::state::ensure_node_dirs(&plan).unwrap();
    let base = state.join("cache/images/test/disk.qcow2");
    std::fs::create_dir_all(base.parent().unwrap()).unwrap();
    base_image(&qemu_img, &base);
    for n in &plan.nodes {
        ensure_overlay(&base, &n.disk_path, 4).unwrap();
        let files = render_seed(&plan, n, &keys.seed_keys(&n.name).unwrap());
        write_seed(&n.seed_path, &files).unwrap();
    }
    kthw_lab::pki::store::ensure_pki(&plan).unwrap();
    kthw_lab::pki::ensure_kubeconfigs(&plan).unwrap();
    kthw_lab::pki::ensure_encryption_config(&plan).unwrap();
    // The balancer: its directory as the lb phase makes it, its config, and the log
    // and pid file of a detached process (a sleep stands in for the balancer).
    kthw_lab::state::ensure_dir_mode(&plan.paths.lb, kthw_lab::state::PRIVATE_DIR_MODE).unwrap();
    let lb = kthw_lab::lb::LbFiles::of(&plan);
    let ca = kthw_lab::pki::cert_path(&plan.paths.pki, "ca");
    kthw_lab::lb::config_from_plan(&plan, &ca)
        .unwrap()
        .save(&lb.config)
        .unwrap();
    let pid =
        kthw_lab::lb::spawn_detached(Path::new("/bin/sleep"), &["30".into()], &lb.pid, &lb.log)
            .unwrap();
    // SAFETY: kill(2) on the process this test just started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    // A run manifest, as create writes it.
    let manifest = kthw_lab::actions::manifest_path(&plan, 1, "create");
    kthw_lab::actions::journal::write_atomic(&manifest, b"{}\n", 0o600).unwrap();

    // The probe works: a file left readable in the lab's directory is read.
    let control = plan.paths.root.join("control-readable");
    std::fs::write(&control, "x").unwrap();
    std::fs::set_permissions(&control, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(
        nobody_reads(&setpriv, &control),
        "nobody cannot read a 0644 file in the lab dir: the check would prove nothing"
    );
    std::fs::remove_file(&control).unwrap();

    let mut files = Vec::new();
    files_under(&plan.paths.root, &mut files);
    let expect = [
        plan.paths.plan.clone(),
        plan.paths.journal.clone(),
        plan.nodes[0].disk_path.clone(),
        plan.nodes[1].seed_path.clone(),
        plan.nodes[0].console_log.clone(),
        lb.config.clone(),
        lb.log.clone(),
        manifest,
        ca,
    ];
    for e in &expect {
        assert!(
            files.contains(e),
            "{} was not made: {files:#?}",
            e.display()
        );
    }
    assert!(files.len() > 30, "only {} files: {files:#?}", files.len());
    let readable: Vec<String> = files
        .iter()
        .filter(|f| nobody_reads(&setpriv, f))
        .map(|f| format!("{} (mode {:o})", f.display(), mode(f)))
        .collect();
    assert!(
        readable.is_empty(),
        "readable by nobody:\n{}",
        readable.join("\n")
    );
    // The node files are private themselves, not only through a directory, and the
    // directories above them stay traversable for qemu's own user.
    for n in &plan.nodes {
        for f in [&n.disk_path, &n.seed_path, &n.console_log] {
            assert_eq!(mode(f), 0o600, "{}", f.display());
        }
    }
    for d in [
        &plan.paths.root,
        &plan.paths.disks,
        &plan.paths.seeds,
        &plan.paths.console,
    ] {
        assert_eq!(
            mode(d) & 0o001,
            0o001,
            "qemu cannot traverse {}",
            d.display()
        );
    }
}

/// An overlay or console log made world-readable by an older version becomes private
/// on the next run.
#[test]
fn files_made_readable_by_an_older_version_are_made_private() {
    let qemu_img = support::require("qemu-img", "qemu-utils");
    let tmp = tempfile::tempdir().unwrap();
    let plan = fixture::lab_plan("old", 1, 0, 512, tmp.path());
    let base = tmp.path().join("base.qcow2");
    base_image(&qemu_img, &base);
    let n = &plan.nodes[0];
    kthw_lab::state::ensure_node_dirs(&plan).unwrap();
    ensure_overlay(&base, &n.disk_path, 4).unwrap();
    for f in [&n.disk_path, &n.console_log] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    ensure_overlay(&base, &n.disk_path, 4).unwrap();
    kthw_lab::state::ensure_node_dirs(&plan).unwrap();
    for f in [&n.disk_path, &n.console_log] {
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }
}

/// An empty 1 GiB qcow2 to put overlays on.
fn base_image(qemu_img: &std::path::Path, base: &std::path::Path) {
    assert!(Command::new(qemu_img)
        .args(["create", "-q", "-f", "qcow2"])
        .arg(base)
        .arg("1G")
        .status()
        .unwrap()
        .success());
}
