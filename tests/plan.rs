//! The plan: golden files for the shipped scenarios, determinism, and invariants
//! that must hold for every valid scenario (property tests).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnetwork::Ipv4Network;
use kthw_lab::plan::{plan, LabPlan};
use kthw_lab::scenario::{load_str, HostLimits, Role, Sources};
use proptest::prelude::*;

mod support;
use support::golden;

const HOST: HostLimits = HostLimits {
    memory_mib: 1 << 20,
};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn plan_text(text: &str) -> Result<LabPlan, String> {
    let src = Sources {
        roots: vec![root()],
    };
    let s = load_str(text, "s.yaml", &src, &HOST).map_err(|e| format!("{:#?}", e.diagnostics))?;
    Ok(plan(&s, text, Path::new("/var/lib/kthw-lab")))
}

#[test]
fn shipped_scenario_plans_match_golden_files() {
    for stem in ["1m1w", "2m2w", "3m3w", "side-by-side"] {
        let text = std::fs::read_to_string(root().join(format!("scenarios/{stem}.yaml"))).unwrap();
        let p = plan_text(&text).unwrap();
        golden(&format!("plan/{stem}.json"), &p.to_json());
        golden(
            &format!("plan/{stem}.txt"),
            &kthw_lab::plan::render_table(&p),
        );
    }
}

#[test]
fn seeds_layout_for_2m2w() {
    let text = std::fs::read_to_string(root().join("scenarios/2m2w.yaml")).unwrap();
    let p = plan_text(&text).unwrap();
    let ips: Vec<String> = p
        .nodes
        .iter()
        .map(|n| format!("{} {}", n.name, n.ip))
        .collect();
    assert_eq!(
        ips,
        [
            "m1 10.200.1.10",
            "m2 10.200.1.11",
            "n1 10.200.1.12",
            "n2 10.200.1.13"
        ]
    );
    assert_eq!(p.load_balancer.address, Ipv4Addr::new(10, 200, 1, 15));
    assert_eq!(p.network.bridge, "br0");
    assert_eq!(p.network.gateway_cidr, "10.200.1.1/24");
    assert_eq!(p.cluster.api_service_ip, Ipv4Addr::new(10, 32, 0, 1));
    assert_eq!(
        p.node("n1").unwrap().pod_cidr.unwrap().to_string(),
        "10.100.0.0/24"
    );
    assert_eq!(
        p.node("n2").unwrap().pod_cidr.unwrap().to_string(),
        "10.100.1.0/24"
    );
    assert_eq!(
        p.cluster.etcd_initial_cluster,
        "m1=https://10.200.1.10:2380,m2=https://10.200.1.11:2380"
    );
}

#[test]
fn plan_is_byte_identical_across_runs() {
    let text = std::fs::read_to_string(root().join("scenarios/3m3w.yaml")).unwrap();
    let a = plan_text(&text).unwrap().to_json();
    let b = plan_text(&text).unwrap().to_json();
    assert_eq!(a, b);
}

#[test]
fn macs_depend_on_lab_and_node_only() {
    let a = kthw_lab::plan::mac_for("lab", "m1", 0);
    assert_eq!(a, kthw_lab::plan::mac_for("lab", "m1", 0));
    assert_ne!(a, kthw_lab::plan::mac_for("lab2", "m1", 0));
    assert_ne!(a, kthw_lab::plan::mac_for("lab", "m1", 1));
    assert!(a.starts_with("52:54:00:"));
}

/// Parameters of a random scenario that should validate.
#[derive(Debug, Clone)]
struct Params {
    lab: String,
    subnet_b: u8,
    prefix: u8,
    controllers: u32,
    workers: u32,
    first_offset: u32,
    lb_gap: u32,
    pod_a: u8,
    node_pod_prefix: u8,
    explicit_names: bool,
}

fn params() -> impl Strategy<Value = Params> {
    (
        "[a-z][a-z0-9]{0,6}(-[a-z0-9]{1,4})?",
        0u8..=250,
        22u8..=26,
        1u32..=5,
        1u32..=12,
        2u32..=8,
        1u32..=6,
        16u8..=31,
        20u8..=26,
        any::<bool>(),
    )
        .prop_map(
            |(
                lab,
                subnet_b,
                prefix,
                controllers,
                workers,
                first_offset,
                lb_gap,
                pod_a,
                npp,
                explicit_names,
            )| Params {
                lab,
                subnet_b,
                prefix,
                controllers,
                workers,
                first_offset,
                lb_gap,
                pod_a,
                node_pod_prefix: npp,
                explicit_names,
            },
        )
}

fn scenario_text(p: &Params) -> String {
    let base = u32::from(Ipv4Addr::new(10, p.subnet_b, 0, 0));
    let subnet = Ipv4Network::new(Ipv4Addr::from(base), p.prefix).unwrap();
    let first = base + p.first_offset;
    let lb = first + p.controllers + p.workers + p.lb_gap - 1;
    let names = |prefix: &str, n: u32| -> String {
        if p.explicit_names {
            let v: Vec<String> = (0..n).map(|i| format!("{prefix}{}", i + 1)).collect();
            format!("  names: [{}]\n", v.join(", "))
        } else {
            format!("  prefix: {prefix}-\n")
        }
    };
    format!(
        "name: {lab}\nnetwork:\n  bridge: kb{b}\n  subnet: {subnet}\n  gateway: {gw}\ncontrollers:\n  count: {c}\n{cn}  first_ip: {first}\n  memory_mib: 512\nworkers:\n  count: {w}\n{wn}  memory_mib: 512\nload_balancer:\n  address: {lb}\ncluster:\n  pod_cidr: 172.{pa}.0.0/16\n  node_pod_prefix: {npp}\n  service_cidr: 192.168.{b}.0/24\n",
        lab = p.lab,
        b = p.subnet_b,
        gw = Ipv4Addr::from(base + 1),
        c = p.controllers,
        cn = names("cp", p.controllers),
        first = Ipv4Addr::from(first),
        w = p.workers,
        wn = names("wk", p.workers),
        lb = Ipv4Addr::from(lb),
        pa = p.pod_a,
        npp = p.node_pod_prefix,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn plan_invariants_hold(p in params()) {
        let text = scenario_text(&p);
        let lp = plan_text(&text).map_err(|e| TestCaseError::fail(format!("{text}\n{e}")))?;
        let net = lp.network.subnet;
        let mut ips = BTreeSet::new();
        let mut macs = BTreeSet::new();
        let mut names = BTreeSet::new();
        let mut domains = BTreeSet::new();
        let mut pods: Vec<Ipv4Network> = Vec::new();
        for n in &lp.nodes {
            prop_assert!(net.contains(n.ip), "{} outside {net}", n.ip);
            prop_assert!(n.ip != net.network() && n.ip != net.broadcast());
            prop_assert!(n.ip != lp.network.gateway, "node on the gateway");
            prop_assert!(n.ip != lp.load_balancer.address, "node on the LB");
            prop_assert!(ips.insert(n.ip), "duplicate ip {}", n.ip);
            prop_assert!(n.mac.starts_with("52:54:00:") && n.mac.len() == 17);
            prop_assert!(macs.insert(n.mac.clone()), "duplicate mac");
            prop_assert!(names.insert(n.name.clone()));
            prop_assert!(domains.insert(n.domain.clone()));
            match (n.role, n.pod_cidr) {
                (Role::Worker, Some(c)) => {
                    prop_assert!(lp.cluster.pod_cidr.contains(c.network()));
                    prop_assert_eq!(c.prefix(), p.node_pod_prefix);
                    prop_assert!(pods.iter().all(|o| !o.contains(c.network()) && !c.contains(o.network())));
                    pods.push(c);
                }
                (Role::Controller, None) => {}
                (r, c) => prop_assert!(false, "{r:?} with pod cidr {c:?}"),
            }
        }
        prop_assert_eq!(lp.nodes.len() as u32, p.controllers + p.workers);
        prop_assert!(lp.network.bridge.len() <= 15);
        prop_assert!(net.contains(lp.load_balancer.address));
        let api = lp.certificates.iter().find(|c| c.name == "kube-apiserver").unwrap();
        for c in lp.controllers() {
            prop_assert!(api.ip_addresses.contains(&c.ip));
            prop_assert!(api.dns_names.contains(&c.name));
        }
        prop_assert!(api.ip_addresses.contains(&lp.load_balancer.address));
        prop_assert!(api.ip_addresses.contains(&lp.cluster.api_service_ip));
        let kubelets = lp.certificates.iter().filter(|c| c.name.starts_with("kubelet-")).count();
        prop_assert_eq!(kubelets as u32, p.workers);
        // Same input, byte-identical output.
        prop_assert_eq!(lp.to_json(), plan_text(&text).unwrap().to_json());
    }
}
