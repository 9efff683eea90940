//! The whole tool on real VMs: `create --until runtime` of a small lab through the
//! binary, a second create that converges, the LB and certificate checks, then
//! `destroy` and a residue check against the real system (libvirt, links, nft,
//! processes, files). Runs inside `scripts/netns-run` (a namespace with its own
//! libvirtd); `#[ignore]`d as a real-VM test (`make test` runs it), and then fails
//! (not skips) when anything is missing.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::lab::{
    destroy_leaves_nothing, enter, kthw, plan_json, sh, stand_in_uplink, state_dir,
};
use support::text;

fn scenario(tmp: &Path) -> PathBuf {
    let f = tmp.join("e2e.yaml");
    std::fs::write(
        &f,
        "name: e2e\nnetwork:\n  bridge: kbr0\n  subnet: 10.240.1.0/24\n  gateway: 10.240.1.1\n  uplink: upl0\naccelerator: auto\ncontrollers: {count: 2, names: [c1, c2], memory_mib: 640, disk_gib: 4}\nworkers: {count: 2, names: [w1, w2], memory_mib: 640, disk_gib: 4}\nload_balancer: {name: api, address: 10.240.1.15}\ncluster: {pod_cidr: 10.241.0.0/16, service_cidr: 10.242.0.0/24}\nfrom_image: [etcd, containerd, runc, cni-plugins]\n",
    )
    .unwrap();
    f
}

fn ssh(state: &Path, node: &str, cmd: &str) -> String {
    let o = kthw(state, &["ssh", "e2e", node, "--", cmd]);
    assert!(o.status.success(), "ssh {node} `{cmd}` failed");
    text(&o.stdout)
}

#[test]
#[ignore = "real VMs: run by make test (--run-ignored all)"]
fn create_until_runtime_converges_and_destroy_leaves_nothing() {
    if !enter("create_until_runtime_converges_and_destroy_leaves_nothing") {
        return;
    }
    stand_in_uplink();
    let tmp = tempfile::tempdir().unwrap();
    let state = state_dir(tmp.path());
    let f = scenario(tmp.path());
    let f = f.to_str().unwrap();

    let t0 = std::time::Instant::now();
    let o = kthw(&state, &["create", f, "--until", "runtime"]);
    let err = text(&o.stderr);
    assert!(o.status.success(), "create failed");
    println!(
        "create --until runtime took {:.0} s",
        t0.elapsed().as_secs_f64()
    );
    for phase in [
        "network", "image", "disks", "domains", "wait-ssh", "pki", "lb", "etcd", "routes",
        "runtime",
    ] {
        assert!(
            err.contains(&format!("==> {phase}:")),
            "no {phase} phase in:\n{err}"
        );
    }
    assert!(err.contains("w2: ssh ok after"), "{err}");
    assert!(
        err.contains("lab `e2e` is ready up to phase `runtime`"),
        "{err}"
    );

    // Domains run under the private libvirtd, carrying the lab's marker.
    let doms = sh("virsh -q -c qemu:///system list --name");
    for d in ["e2e-c1", "e2e-c2", "e2e-w1", "e2e-w2"] {
        assert!(doms.contains(d), "{doms}");
    }
    let xml = sh("virsh -c qemu:///system dumpxml e2e-w1");
    assert!(
        xml.contains("name=\"e2e\"") && xml.contains("role=\"worker\""),
        "{xml}"
    );

    // ssh through the tool: pinned host key, the lab user, sudo.
    assert_eq!(ssh(&state, "w1", "hostname").trim(), "w1");
    assert!(ssh(&state, "c2", "sudo systemctl is-active etcd").contains("active"));
    assert!(ssh(&state, "w2", "sudo systemctl is-active containerd").contains("active"));
    // Enabled too, so they come back after a reboot (etcd's SysV script is left alone).
    assert_eq!(
        ssh(&state, "c2", "systemctl is-enabled etcd").trim(),
        "enabled"
    );
    assert_eq!(
        ssh(&state, "w2", "systemctl is-enabled containerd").trim(),
        "enabled"
    );
    assert!(ssh(&state, "w1", "sudo cat /etc/cni/net.d/10-bridge.conf").contains("10.241.0.0/24"));

    // etcd: one cluster of two members, healthy over TLS.
    let health = ssh(
        &state,
        "c1",
        "sudo etcdctl --endpoints=https://10.240.1.10:2379,https://10.240.1.11:2379 --cacert=/etc/etcd/ca.pem --cert=/etc/etcd/etcd-c1.pem --key=/etc/etcd/etcd-c1-key.pem endpoint health 2>&1",
    );
    assert_eq!(health.matches("is healthy").count(), 2, "{health}");
    let members = ssh(
        &state,
        "c2",
        "sudo etcdctl --endpoints=https://127.0.0.1:2379 --cacert=/etc/etcd/ca.pem --cert=/etc/etcd/etcd-c2.pem --key=/etc/etcd/etcd-c2-key.pem member list",
    );
    assert!(
        members.contains("c1") && members.contains("c2"),
        "{members}"
    );
    // Without a client certificate etcd refuses the client.
    let anon = ssh(&state, "c1", "etcdctl --endpoints=https://10.240.1.10:2379 --cacert=/etc/etcd/ca.pem endpoint health 2>&1 || true");
    assert!(!anon.contains("is healthy"), "{anon}");

    // host-gw: each pod range is routed via its worker, on the nodes and on the host.
    let r = ssh(&state, "w1", "ip route");
    assert!(r.contains("10.241.1.0/24 via 10.240.1.13"), "{r}");
    let r = ssh(&state, "c1", "ip route");
    assert!(
        r.contains("10.241.0.0/24 via 10.240.1.12") && r.contains("10.241.1.0/24 via 10.240.1.13"),
        "{r}"
    );
    let r = sh("ip route");
    assert!(r.contains("10.241.0.0/24 via 10.240.1.12"), "{r}");
    // Real packets across the routes: give each worker its pod gateway address (what
    // the bridge plugin does for the first pod) and ping across.
    for (w, gw) in [("w1", "10.241.0.1/24"), ("w2", "10.241.1.1/24")] {
        ssh(&state, w, &format!("sudo ip link add cni0 type bridge && sudo ip addr add {gw} dev cni0 && sudo ip link set cni0 up"));
    }
    ssh(&state, "w1", "ping -c1 -W5 10.241.1.1");
    ssh(&state, "c2", "ping -c1 -W5 10.241.0.1");
    assert!(Command::new("ping")
        .args(["-c1", "-W5", "10.241.1.1"])
        .status()
        .unwrap()
        .success());

    // The balancer runs, with both controllers as backends.
    let o = kthw(&state, &["lb", "status", "e2e", "-o", "json"]);
    assert!(o.status.success());
    let st: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(st["backends"].as_array().unwrap().len(), 2, "{st}");

    // Certificates match the plan; the admin kubeconfig points at the balancer.
    assert!(kthw(&state, &["certs", "check", "e2e"]).status.success());
    let o = kthw(&state, &["kubeconfig", "e2e"]);
    assert!(text(&o.stdout).contains("https://10.240.1.15:6443"));

    // status checks the real system: every expected unit active, routes present.
    let o = kthw(&state, &["status", "e2e", "-o", "json"]);
    assert!(o.status.success(), "status says the lab is not up");
    let st: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(st["etcd_healthy"], true, "{st}");
    assert_eq!(st["last_phase"], "runtime", "{st}");
    assert_eq!(st["nodes"][0]["units"]["etcd"], true, "{st}");
    assert_eq!(st["nodes"][3]["units"]["containerd"], true, "{st}");
    // Every node's first boot was saved: reset will go back to it.
    for i in 0..4 {
        assert_eq!(st["nodes"][i]["fresh_state"], true, "{st}");
    }
    assert!(
        text(&kthw(&state, &["status", "e2e"]).stdout).contains("etcd: healthy on every endpoint")
    );
    assert!(text(&kthw(&state, &["status", "e2e"]).stdout)
        .contains("reset: back to every node's saved fresh state"));

    // Running create again converges: nothing rebuilt, the balancer reloaded.
    let t1 = std::time::Instant::now();
    let o = kthw(&state, &["create", f, "--until", "runtime"]);
    assert!(o.status.success());
    let err = text(&o.stderr);
    assert!(err.contains("already in place"), "{err}");
    assert!(err.contains("running, reloaded"), "{err}");
    println!("second create took {:.1} s", t1.elapsed().as_secs_f64());
    // --from a later phase works once the earlier ones are done.
    assert!(kthw(
        &state,
        &["create", f, "--from", "routes", "--until", "runtime"]
    )
    .status
    .success());

    // The Kubernetes binaries are not in the cache here: the next phase says so.
    let o = kthw(
        &state,
        &[
            "create",
            f,
            "--from",
            "control-plane",
            "--until",
            "control-plane",
        ],
    );
    assert_eq!(o.status.code(), Some(12));
    let err = text(&o.stderr);
    assert!(
        err.contains("kube-apiserver") && err.contains("cache import"),
        "{err}"
    );

    // stop powers the VMs off and stops the balancer; start brings the same lab back
    // (as after a host reboot) without bootstrapping: the services are enabled units.
    let o = kthw(&state, &["stop", "e2e"]);
    assert!(o.status.success());
    assert_eq!(
        sh("virsh -q -c qemu:///system list --name").trim(),
        "",
        "domains still run"
    );
    assert!(
        !sh("ps -eo args").contains("labs/e2e/lb/lb.json"),
        "balancer still runs"
    );
    let t3 = std::time::Instant::now();
    let o = kthw(&state, &["start", "e2e"]);
    assert!(o.status.success());
    println!("start took {:.1} s", t3.elapsed().as_secs_f64());
    assert!(kthw(&state, &["lb", "status", "e2e"]).status.success());
    // etcd and containerd come back by themselves (wait for etcd's quorum).
    let mut up = false;
    for _ in 0..30 {
        if kthw(&state, &["status", "e2e"]).status.success() {
            up = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_secs(5));
    }
    assert!(up, "the lab is not fully up after start");
    let r = ssh(&state, "w1", "ip route");
    assert!(
        r.contains("10.241.1.0/24 via 10.240.1.13"),
        "routes survive a reboot: {r}"
    );

    // reset: every node back to the state saved after its first boot (no new boot),
    // same keys (the pinned login still works), its clock set again (the state is
    // minutes old by now).
    let t4 = std::time::Instant::now();
    let o = kthw(&state, &["reset", "e2e"]);
    assert!(o.status.success());
    println!("reset took {:.1} s", t4.elapsed().as_secs_f64());
    let err = text(&o.stderr);
    assert!(
        err.contains("every node back to its saved fresh state"),
        "{err}"
    );
    let guest: f64 = ssh(&state, "w2", "date +%s.%N").trim().parse().unwrap();
    let host = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (host - guest).abs() < 10.0,
        "w2's clock is {:.1} s off after reset",
        host - guest
    );
    assert_eq!(ssh(&state, "c1", "hostname").trim(), "c1");
    let etcd = ssh(&state, "c1", "systemctl is-active etcd || true");
    assert!(
        !etcd.starts_with("active"),
        "a reset node has no etcd running: {etcd}"
    );
    assert!(ssh(
        &state,
        "c1",
        "test -e /etc/etcd/ca.pem && echo yes || echo no"
    )
    .contains("no"));
    // The nodes bootstrap again from there: etcd forms its cluster anew.
    let o = kthw(&state, &["create", f, "--until", "etcd"]);
    assert!(o.status.success(), "create after reset failed");
    let health = ssh(
        &state,
        "c2",
        "sudo etcdctl --endpoints=https://10.240.1.10:2379,https://10.240.1.11:2379 --cacert=/etc/etcd/ca.pem --cert=/etc/etcd/etcd-c2.pem --key=/etc/etcd/etcd-c2-key.pem endpoint health 2>&1",
    );
    assert_eq!(health.matches("is healthy").count(), 2, "{health}");

    // Destroy, then prove nothing is left on the real system.
    let plan = plan_json(&state, f);
    let secs = destroy_leaves_nothing(&state, &plan);
    println!("destroy took {secs:.1} s");
    assert!(!sh("ip -o link").contains("vnet"), "tap devices left");
    // The shared image stays cached.
    assert!(state.join("cache/images/kthw-debian12").exists());
}
