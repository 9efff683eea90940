//! `kthw-lab create --until network` and `destroy` for real, inside a network
//! namespace the test creates (never in the machine's own namespace).

mod support;

use support::{text, Netns};

/// A 1m1w lab whose NAT leaves through `upl0`, a veth inside the namespace.
fn scenario(dir: &std::path::Path, name: &str, bridge: &str, third: u8) -> std::path::PathBuf {
    let f = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &f,
        format!(
            "name: {name}\nnetwork:\n  bridge: {bridge}\n  subnet: 10.{third}.1.0/24\n  gateway: 10.{third}.1.1\n  uplink: upl0\ncontrollers: {{count: 1, memory_mib: 512}}\nworkers: {{count: 2, memory_mib: 512}}\nload_balancer: {{address: 10.{third}.1.15}}\ncluster: {{pod_cidr: 10.1{third}.0.0/16, service_cidr: 10.{third}.200.0/24}}\n"
        ),
    )
    .unwrap();
    f
}

#[test]
fn create_until_network_then_destroy_leaves_nothing() {
    let ns = Netns::new("cli");
    ns.sh(
        "ip link add upl0 type veth peer name upl1 && ip link set upl0 up && ip link set upl1 up",
    );
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let f = scenario(dir.path(), "ka", "kbr0", 77);
    let f = f.to_str().unwrap();

    let o = ns.kthw(&state, &["create", f, "--until", "network"]);
    let err = text(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("==> network: bridge, gateway address, forwarding and NAT"),
        "{err}"
    );
    assert!(
        err.contains("lab `ka` is ready up to phase `network`"),
        "{err}"
    );
    assert!(
        err.contains("PHASE") && err.contains("total"),
        "timing summary: {err}"
    );

    let link = ns.json("ip -j -d link show kbr0");
    assert_eq!(link[0]["ifalias"], "kthw-lab:ka");
    let addrs = ns.sh("ip -4 -o addr show dev kbr0");
    assert!(
        addrs.contains("10.77.1.1/24") && addrs.contains("10.77.1.15/32"),
        "{addrs}"
    );
    let routes = ns.sh("ip -4 route show dev kbr0");
    assert!(routes.contains("10.177.0.0/24 via 10.77.1.11"), "{routes}");
    assert!(routes.contains("10.177.1.0/24 via 10.77.1.12"), "{routes}");
    ns.sh("nft list table inet kthw_ka >/dev/null");
    assert_eq!(ns.sh("sysctl -n net.ipv4.ip_forward").trim(), "1");

    // The journal and a run manifest were written.
    let journal: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("labs/ka/journal.json")).unwrap())
            .unwrap();
    assert_eq!(journal["phases"][0]["phase"], "network");
    assert_eq!(journal["phases"][0]["state"], "done");
    assert_eq!(
        std::fs::read_dir(state.join("labs/ka/runs"))
            .unwrap()
            .count(),
        1
    );

    // Running it again converges without changing anything.
    let before = ns.sh("ip -j addr show kbr0; nft -j list table inet kthw_ka");
    let o = ns.kthw(&state, &["create", f, "--until", "network"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("already in place"),
        "{}",
        text(&o.stderr)
    );
    assert_eq!(
        before,
        ns.sh("ip -j addr show kbr0; nft -j list table inet kthw_ka")
    );

    // A second lab on another bridge and subnet coexists; one on the same bridge is refused.
    let g = scenario(dir.path(), "kb", "kbr1", 78);
    let o = ns.kthw(
        &state,
        &["create", g.to_str().unwrap(), "--until", "network"],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let clash = scenario(dir.path(), "kc", "kbr0", 79);
    let o = ns.kthw(
        &state,
        &["create", clash.to_str().unwrap(), "--until", "network"],
    );
    assert_eq!(o.status.code(), Some(3), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("lab `ka` already uses bridge kbr0"),
        "{}",
        text(&o.stderr)
    );
    assert!(
        !ns.sh("ip -o link").contains("kbr0@"),
        "nothing new on the bridge"
    );

    let o = ns.kthw(&state, &["list"]);
    let out = text(&o.stdout);
    assert!(
        out.contains("ka") && out.contains("kb") && out.contains("network"),
        "{out}"
    );

    let o = ns.kthw(&state, &["destroy", "ka"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("bridge kbr0"),
        "{}",
        text(&o.stderr)
    );
    assert!(!ns.sh("ip -o link").contains("kbr0"));
    assert!(!ns.sh("nft list tables").contains("kthw_ka"));
    assert!(!state.join("labs/ka").exists());
    // The other lab still needs forwarding.
    assert_eq!(ns.sh("sysctl -n net.ipv4.ip_forward").trim(), "1");
    assert!(ns.sh("ip -o link").contains("kbr1"));

    let o = ns.kthw(&state, &["destroy", "kb"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(!ns.sh("nft list tables").contains("kthw_"));
    assert_eq!(ns.sh("sysctl -n net.ipv4.ip_forward").trim(), "0");
    // Destroy twice is fine (with no state dir left, libvirt is asked: its test
    // driver here, as no daemon runs in this namespace).
    let o = ns.kthw(&state, &["destroy", "kb", "--connect", "test:///default"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
}

#[test]
fn destroy_finds_a_lab_by_its_markers_when_the_state_dir_is_gone() {
    let ns = Netns::new("cli");
    ns.sh("ip link add upl0 type veth peer name upl1 && ip link set upl0 up");
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let f = scenario(dir.path(), "kd", "kbr2", 76);
    let o = ns.kthw(
        &state,
        &["create", f.to_str().unwrap(), "--until", "network"],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    std::fs::remove_dir_all(state.join("labs")).unwrap();
    // Without a state dir nothing says VMs were never made: libvirt is asked (its
    // in-process test driver here, as no daemon runs in this namespace).
    let o = ns.kthw(&state, &["destroy", "kd", "--connect", "test:///default"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(!ns.sh("ip -o link").contains("kbr2"));
    assert!(!ns.sh("nft list tables").contains("kthw_kd"));
}
