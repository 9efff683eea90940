//! The binary as a user runs it: outputs, exit codes, errors with hints.

mod support;

use std::path::PathBuf;
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kthw-lab"))
        .args(args)
        .current_dir(root())
        .env("KTHW_LAB_STATE_DIR", "/var/lib/kthw-lab")
        .env_remove("KTHW_LAB_CONNECT")
        .output()
        .expect("run kthw-lab")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn plan_table_shows_nodes_and_addresses() {
    let o = run(&["plan", "scenarios/2m2w.yaml"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    for want in [
        "NAME",
        "POD CIDR",
        "m1",
        "10.200.1.10",
        "n2",
        "10.200.1.13",
        "10.100.1.0/24",
        "10.200.1.15",
        "10.32.0.1",
        "10.200.1.1",
        "52:54:00:",
    ] {
        assert!(out.contains(want), "missing {want} in\n{out}");
    }
}

#[test]
fn plan_json_is_stable_and_matches_golden() {
    let a = run(&["plan", "scenarios/2m2w.yaml", "--output", "json"]);
    let b = run(&["plan", "scenarios/2m2w.yaml", "-o", "json"]);
    assert!(a.status.success());
    assert_eq!(a.stdout, b.stdout);
    let golden = std::fs::read_to_string(root().join("tests/golden/plan/2m2w.json")).unwrap();
    assert_eq!(text(&a.stdout), golden);
    let v: serde_json::Value = serde_json::from_slice(&a.stdout).unwrap();
    assert_eq!(v["nodes"].as_array().unwrap().len(), 4);
}

#[test]
fn plan_yaml_parses() {
    let o = run(&["plan", "scenarios/1m1w.yaml", "--output", "yaml"]);
    assert!(o.status.success());
    let v: serde_json::Value = yaml_serde::from_slice(&o.stdout).unwrap();
    assert_eq!(v["lab"], "k1m1w");
}

#[test]
fn state_dir_flag_moves_every_path() {
    let o = run(&[
        "--state-dir",
        "/srv/labs",
        "plan",
        "scenarios/1m1w.yaml",
        "-o",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["paths"]["root"], "/srv/labs/labs/k1m1w");
    assert_eq!(
        v["nodes"][0]["disk_path"],
        "/srv/labs/labs/k1m1w/disks/controller-0.qcow2"
    );
}

#[test]
fn bad_scenario_exits_2_with_every_problem_and_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.yaml");
    std::fs::write(&f, "name: lab\ncontrollers: {count: 0}\nworkers: {count: 1, cpu: 2}\nload_balancer: {address: 10.1.1.1}\n").unwrap();
    let o = run(&["plan", f.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let err = text(&o.stderr);
    assert!(err.contains("error: invalid scenario"), "{err}");
    assert!(
        err.contains("bad.yaml:2:22: controllers.count: must be at least 1 (got 0)"),
        "{err}"
    );
    assert!(err.contains("workers.cpu: unknown field `cpu`"), "{err}");
    assert!(
        err.contains("load_balancer.address: 10.1.1.1 is not a usable address"),
        "{err}"
    );
    assert!(err.contains("\nhint: "), "{err}");
    assert!(o.stdout.is_empty());
}

#[test]
fn missing_scenario_file_is_a_clear_error() {
    let o = run(&["plan", "scenarios/nope.yaml"]);
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o.stderr);
    assert!(
        err.starts_with("error: cannot read scenario scenarios/nope.yaml\n"),
        "{err}"
    );
    assert!(
        err.contains("caused by: No such file or directory"),
        "{err}"
    );
    assert!(err.contains("hint: "), "{err}");
}

#[test]
fn completions_are_generated() {
    for shell in ["bash", "zsh", "fish"] {
        let o = run(&["completions", shell]);
        assert!(o.status.success());
        assert!(text(&o.stdout).contains("kthw-lab"));
    }
}

#[test]
fn usage_errors_exit_2() {
    let o = run(&["plan"]);
    assert_eq!(o.status.code(), Some(2));
    let o = run(&["create", "x.yaml", "--until", "nowhere"]);
    assert_eq!(o.status.code(), Some(2));
}

/// Seed a state dir with the recorded plan of a scenario, as `create` leaves it.
fn seed_state(state: &std::path::Path, scenario: &str) {
    let o = Command::new(env!("CARGO_BIN_EXE_kthw-lab"))
        .args([
            "--state-dir",
            state.to_str().unwrap(),
            "plan",
            scenario,
            "-o",
            "json",
        ])
        .current_dir(root())
        .output()
        .unwrap();
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let dir = state.join("labs").join(v["lab"].as_str().unwrap());
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("plan.json"), &o.stdout).unwrap();
}

fn run_in(state: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kthw-lab"))
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .current_dir(root())
        .output()
        .unwrap()
}

#[test]
fn create_refuses_a_changed_scenario_for_an_existing_lab_before_touching_anything() {
    let dir = tempfile::tempdir().unwrap();
    seed_state(dir.path(), "scenarios/1m1w.yaml");
    let changed = dir.path().join("changed.yaml");
    let original = std::fs::read_to_string(root().join("scenarios/1m1w.yaml")).unwrap();
    std::fs::write(
        &changed,
        original.replace("address: 10.200.1.15", "address: 10.200.1.16"),
    )
    .unwrap();
    // The changed scenario must still find the shipped network profile.
    std::fs::create_dir_all(dir.path().join("network")).unwrap();
    std::fs::copy(
        root().join("network/default.yaml"),
        dir.path().join("network/default.yaml"),
    )
    .unwrap();
    let o = run_in(dir.path(), &["create", changed.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o.stderr));
    let err = text(&o.stderr);
    assert!(
        err.starts_with("error: lab `k1m1w` already exists with a different scenario\n"),
        "{err}"
    );
    assert!(err.contains("hint: `kthw-lab recreate"), "{err}");
    assert!(!dir.path().join("labs/k1m1w/journal.json").exists());
}

#[test]
fn list_shows_recorded_labs_and_json_parses() {
    let dir = tempfile::tempdir().unwrap();
    let o = run_in(dir.path(), &["list"]);
    assert!(o.status.success());
    assert!(text(&o.stdout).starts_with("no labs under"));
    seed_state(dir.path(), "scenarios/1m1w.yaml");
    seed_state(dir.path(), "scenarios/side-by-side.yaml");
    let o = run_in(dir.path(), &["list"]);
    let out = text(&o.stdout);
    assert!(out.starts_with("LAB"), "{out}");
    assert!(
        out.contains("k1m1w") && out.contains("side") && out.contains("br1"),
        "{out}"
    );
    let o = run_in(dir.path(), &["list", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    assert_eq!(v[0]["state"], "planned");
}

#[test]
fn logs_names_the_nodes_and_the_missing_log() {
    let dir = tempfile::tempdir().unwrap();
    seed_state(dir.path(), "scenarios/1m1w.yaml");
    let o = run_in(dir.path(), &["logs", "k1m1w", "nope"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("hint: its nodes: controller-0, worker-0"));
    let o = run_in(dir.path(), &["logs", "k1m1w", "worker-0"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("hint: the log appears once the node's VM has started"));
    let log = dir.path().join("labs/k1m1w/console/worker-0.log");
    std::fs::create_dir_all(log.parent().unwrap()).unwrap();
    std::fs::write(&log, "Debian GNU/Linux 12 worker-0 ttyS0\n").unwrap();
    let o = run_in(dir.path(), &["logs", "k1m1w", "worker-0"]);
    assert!(o.status.success());
    assert_eq!(text(&o.stdout), "Debian GNU/Linux 12 worker-0 ttyS0\n");
    let o = run_in(dir.path(), &["logs", "other", "worker-0"]);
    assert!(text(&o.stderr).contains("hint: labs here: k1m1w"));
}

#[test]
fn destroy_removes_the_state_dir_and_is_safe_to_repeat() {
    let dir = tempfile::tempdir().unwrap();
    seed_state(dir.path(), "scenarios/1m1w.yaml");
    assert!(dir.path().join("labs/k1m1w/plan.json").exists());
    // No daemon in this test: libvirt's in-process test driver stands in.
    let o = run_in(
        dir.path(),
        &["destroy", "k1m1w", "--connect", "test:///default"],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("lab `k1m1w` destroyed in"));
    assert!(!dir.path().join("labs/k1m1w").exists());
    let o = run_in(
        dir.path(),
        &[
            "destroy",
            "scenarios/1m1w.yaml",
            "--connect",
            "test:///default",
        ],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let o = run_in(dir.path(), &["destroy", "Not A Lab"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("is neither a scenario file nor a lab name"));
}

#[test]
fn certs_check_and_kubeconfig_read_the_labs_pki() {
    let dir = tempfile::tempdir().unwrap();
    seed_state(dir.path(), "scenarios/2m2w.yaml");
    let o = run_in(dir.path(), &["kubeconfig", "k2m2w"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("made by phase `pki`"),
        "{}",
        text(&o.stderr)
    );

    let plan: kthw_lab::plan::LabPlan =
        serde_json::from_slice(&std::fs::read(dir.path().join("labs/k2m2w/plan.json")).unwrap())
            .unwrap();
    kthw_lab::pki::ensure_pki(&plan).unwrap();
    kthw_lab::pki::ensure_kubeconfigs(&plan).unwrap();

    let o = run_in(dir.path(), &["certs", "check", "k2m2w"]);
    assert!(o.status.success(), "{}{}", text(&o.stdout), text(&o.stderr));
    let o = run_in(dir.path(), &["certs", "check", "k2m2w", "-o", "json"]);
    assert_eq!(text(&o.stdout).trim(), "[]");

    let o = run_in(dir.path(), &["kubeconfig", "k2m2w"]);
    assert!(o.status.success());
    assert!(text(&o.stdout).contains("server: \"https://10.200.1.15:6443\""));
    let dest = dir.path().join("admin.kubeconfig");
    let o = run_in(
        dir.path(),
        &["kubeconfig", "k2m2w", "--write", dest.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&dest).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // A certificate replaced by one with a wrong SAN is a finding, exit non-zero.
    let other = dir.path().join("labs/k2m2w/pki/kube-apiserver.pem");
    std::fs::copy(dir.path().join("labs/k2m2w/pki/admin.pem"), &other).unwrap();
    let o = run_in(dir.path(), &["certs", "check", "k2m2w"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stdout).contains("kube-apiserver"),
        "{}",
        text(&o.stdout)
    );
    assert!(text(&o.stderr).contains("finding(s) in the certificates of lab `k2m2w`"));
}

#[test]
fn cache_import_verifies_component_files_before_caching_them() {
    use sha2::Digest;
    let state = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // A stand-in file: import only verifies and copies bytes, it never runs them.
    let body = b"test fixture, not a kube-apiserver binary\n";
    std::fs::write(dir.path().join("kube-apiserver"), body).unwrap();
    let digest = hex::encode(sha2::Sha256::digest(body));
    std::fs::write(dir.path().join("kube-apiserver.sha256"), &digest).unwrap();
    // A file whose pinned sha256 (from the catalog) cannot match.
    std::fs::write(
        dir.path().join("crictl-v1.32.0-linux-amd64.tar.gz"),
        b"wrong bytes",
    )
    .unwrap();

    let o = run_in(
        state.path(),
        &["cache", "import", dir.path().to_str().unwrap()],
    );
    let out = text(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{out}{}", text(&o.stderr));
    assert!(
        out.contains("kube-apiserver") && out.contains("imported (verified by"),
        "{out}"
    );
    assert!(
        out.contains("crictl") && out.contains("FAILED: sha256"),
        "{out}"
    );
    assert!(text(&o.stderr).contains("1 file(s)"), "{}", text(&o.stderr));
    let cached = state.path().join("cache/components/kube-apiserver-1.32.3");
    assert_eq!(std::fs::read(&cached).unwrap(), body);
    assert!(!state.path().join("cache/components/crictl-1.32.0").exists());

    // Without its checksum file, a file with no pinned digest is refused.
    std::fs::remove_file(dir.path().join("kube-apiserver.sha256")).unwrap();
    std::fs::remove_file(dir.path().join("crictl-v1.32.0-linux-amd64.tar.gz")).unwrap();
    std::fs::write(dir.path().join("kube-apiserver"), b"other").unwrap();
    let o = run_in(
        state.path(),
        &["cache", "import", dir.path().to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stdout).contains("no checksum to verify it"),
        "{}",
        text(&o.stdout)
    );
    assert_eq!(
        std::fs::read(&cached).unwrap(),
        body,
        "the verified copy stays"
    );
}

#[test]
fn an_unknown_phase_in_the_fault_hook_is_refused_before_anything_happens() {
    let state = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_kthw-lab"))
        .args(["create", "scenarios/1m1w.yaml"])
        .current_dir(root())
        .env("KTHW_LAB_STATE_DIR", state.path())
        .env("KTHW_LAB_INJECT_FAULT", "netwrk")
        .output()
        .expect("run kthw-lab");
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    let err = text(&o.stderr);
    assert!(
        err.contains("KTHW_LAB_INJECT_FAULT=netwrk names no phase"),
        "{err}"
    );
    assert!(err.contains("hint: phases: network, image, disks"), "{err}");
    assert_eq!(
        std::fs::read_dir(state.path()).unwrap().count(),
        0,
        "nothing was written"
    );
}

/// `reset` reverts to the state saved after the first boot (see commands.rs
/// cmd_reset); its help says so, not that it makes new overlays.
#[test]
fn reset_help_describes_the_saved_fresh_state() {
    let o = run(&["reset", "--help"]);
    assert!(o.status.success());
    let help = text(&o.stdout);
    assert!(!help.contains("overlay"), "{help}");
    assert!(
        help.contains("saved right after their first boot"),
        "{help}"
    );
    assert!(help.contains("boots again"), "{help}");
}

/// A version the component catalog has no release for is refused by `plan`, before
/// anything boots, with its position and the versions the catalog knows.
#[test]
fn plan_refuses_a_version_the_catalog_does_not_know() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("v.yaml");
    std::fs::write(
        &f,
        "name: lab\ncontrollers: {count: 1}\nworkers: {count: 1}\nload_balancer: {address: 10.200.1.15}\nversions:\n  kubernetes: 9.99.0\n",
    )
    .unwrap();
    let o = run(&["plan", f.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let err = text(&o.stderr);
    assert!(
        err.contains("v.yaml:6:15: versions.kubernetes: kubernetes 9.99.0 is not in the component catalog, which knows kubernetes 1.32.3"),
        "{err}"
    );
    assert!(err.contains("hint: "), "{err}");
}

/// libvirtd down: every command that needs it says so once, with how to start it,
/// before it changes anything. Run in a namespace of the test's own, so that `start`
/// or `create` could not touch the host's network even if they went on.
#[test]
fn every_command_that_needs_libvirt_says_once_that_it_cannot_reach_it() {
    let ns = support::Netns::new("nolibvirt");
    let dir = tempfile::tempdir().unwrap();
    seed_state(dir.path(), "scenarios/1m1w.yaml");
    std::fs::write(
        dir.path().join("labs/k1m1w/journal.json"),
        r#"{"lab":"k1m1w","plan_sha256":"x","phases":[{"phase":"network","state":"done","started":1,"seconds":1},{"phase":"domains","state":"done","started":1,"seconds":1}]}"#,
    )
    .unwrap();
    let uri = "qemu+unix:///system?socket=/nonexistent/libvirt-sock";
    let cause = "Failed to connect socket to '/nonexistent/libvirt-sock'";
    for (args, code) in [
        (vec!["destroy", "k1m1w"], 10),
        (vec!["stop", "k1m1w"], 10),
        (vec!["start", "k1m1w"], 10),
        (vec!["reset", "k1m1w"], 10),
        (vec!["status", "k1m1w"], 1),
        (vec!["create", "scenarios/1m1w.yaml"], 3),
    ] {
        let mut all = args.clone();
        all.extend(["--connect", uri]);
        let o = ns.kthw(dir.path(), &all);
        let out = format!("{}{}", text(&o.stdout), text(&o.stderr));
        assert_eq!(o.status.code(), Some(code), "{args:?}:\n{out}");
        assert_eq!(out.matches(cause).count(), 1, "{args:?}:\n{out}");
        assert!(
            out.contains("libvirtd is not running: start it with `"),
            "{args:?}:\n{out}"
        );
    }
    // Nothing was started or changed: no bridge in the namespace, the lab still there.
    assert!(!ns.sh("ip -o link").contains("br0"));
    assert!(dir.path().join("labs/k1m1w/plan.json").exists());
}
