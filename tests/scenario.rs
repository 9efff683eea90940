//! Validation table: every rule with its exact message and position.

use std::path::PathBuf;

use kthw_lab::scenario::{load_str, HostLimits, Sources};

const HOST: HostLimits = HostLimits { memory_mib: 32768 };

fn sources() -> Sources {
    Sources {
        roots: vec![PathBuf::from(env!("CARGO_MANIFEST_DIR"))],
    }
}

/// A valid scenario every case starts from.
const BASE: &str = "\
name: lab
controllers:
  count: 2
  names: [m1, m2]
workers:
  count: 2
  names: [n1, n2]
load_balancer:
  address: 10.200.1.15
cluster:
  pod_cidr: 10.100.0.0/16
  service_cidr: 10.32.0.0/24
";

fn problems(text: &str) -> Vec<String> {
    problems_with(text, &HOST)
}

fn problems_with(text: &str, host: &HostLimits) -> Vec<String> {
    match load_str(text, "s.yaml", &sources(), host) {
        Ok(_) => vec![],
        Err(e) => e.diagnostics.iter().map(|d| d.to_string()).collect(),
    }
}

fn with(from: &str, to: &str) -> String {
    assert!(BASE.contains(from), "base has no `{from}`");
    BASE.replacen(from, to, 1)
}

#[test]
fn zero_workers_is_a_control_plane_only_lab() {
    let text = with("  count: 2\n  names: [n1, n2]", "  count: 0");
    let s = load_str(&text, "s.yaml", &sources(), &HOST).unwrap();
    let plan = kthw_lab::plan::plan(&s, &text, std::path::Path::new("/var/lib/kthw-lab"));
    let names: Vec<&str> = plan.nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["m1", "m2"]);
}

#[test]
fn base_is_valid() {
    assert_eq!(problems(BASE), Vec::<String>::new());
}

#[test]
fn shipped_scenarios_are_valid() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let r = kthw_lab::scenario::load_file(&p, &HOST);
        assert!(r.is_ok(), "{}: {:?}", p.display(), r.err());
        n += 1;
    }
    assert!(n >= 3);
}

/// (case, scenario text, exact diagnostics)
fn table() -> Vec<(&'static str, String, Vec<&'static str>)> {
    vec![
        (
            "malformed yaml",
            "name: lab\ncontrollers: [1, 2\n".into(),
            vec!["s.yaml:3:1: invalid YAML: while parsing a flow sequence, expected ',' or ']'"],
        ),
        (
            "several documents",
            format!("{BASE}---\nname: other\n"),
            vec!["s.yaml:1:1: invalid YAML: a scenario is one YAML document; found several (---)"],
        ),
        (
            "wrong type: count",
            with("  count: 2\n  names: [m1, m2]", "  count: two\n  names: [m1, m2]"),
            vec!["s.yaml:3:10: controllers.count: expected a whole number, found `two`"],
        ),
        (
            "wrong type: section",
            with("load_balancer:\n  address: 10.200.1.15", "load_balancer: [10.200.1.15]"),
            vec!["s.yaml:8:16: load_balancer: expected a mapping of name, address, port, found a list"],
        ),
        (
            "wrong type: address",
            with("address: 10.200.1.15", "address: 10.200.1"),
            vec!["s.yaml:9:12: load_balancer.address: expected an IPv4 address like 10.200.1.10, found `10.200.1`"],
        ),
        (
            "cidr with host bits",
            with("pod_cidr: 10.100.0.0/16", "pod_cidr: 10.100.0.1/16"),
            vec!["s.yaml:11:13: cluster.pod_cidr: `10.100.0.1/16` has host bits set: did you mean 10.100.0.0/16?"],
        ),
        (
            "unknown key at top level",
            format!("{BASE}colour: blue\n"),
            vec!["s.yaml:13:1: colour: unknown field `colour`, expected one of: name, description, network, image, accelerator, ssh_user, key_algorithm, controllers, workers, load_balancer, cluster, versions, from_image"],
        ),
        (
            "unknown key in a section",
            with("  count: 2\n  names: [n1, n2]", "  count: 2\n  names: [n1, n2]\n  cpus: 4"),
            vec!["s.yaml:8:3: workers.cpus: unknown field `cpus`, expected one of: count, vcpus, memory_mib, disk_gib, names, prefix, first_ip"],
        ),
        (
            "duplicate key",
            with("name: lab", "name: lab\nname: lab2"),
            vec!["s.yaml:2:1: name: field `name` is given twice"],
        ),
        (
            "missing name",
            with("name: lab\n", ""),
            vec!["s.yaml:1:1: name: missing required field `name`"],
        ),
        (
            "bad keyword",
            with("name: lab", "name: lab\naccelerator: hvf"),
            vec!["s.yaml:2:14: accelerator: `hvf` is not one of: auto, kvm, tcg"],
        ),
        (
            "zero controllers",
            with("  count: 2\n  names: [m1, m2]", "  count: 0"),
            vec!["s.yaml:3:10: controllers.count: must be at least 1 (got 0)"],
        ),
        (
            "too many controllers",
            with("  count: 2\n  names: [m1, m2]", "  count: 11"),
            vec!["s.yaml:3:10: controllers.count: must be at least 1 (got 11)".replace("at least 1", "at most 9").leak()],
        ),
        (
            "too many nodes for the subnet",
            with("  count: 2\n  names: [n1, n2]", "  count: 250")
                .replace("pod_cidr: 10.100.0.0/16", "pod_cidr: 10.96.0.0/12"),
            vec!["s.yaml:6:10: workers.count: 250 workers starting at 10.200.1.12 do not fit in the node subnet 10.200.1.0/24 (usable: 10.200.1.1 to 10.200.1.254); lower the count or move workers.first_ip"],
        ),
        (
            "names and count disagree",
            with("  count: 2\n  names: [m1, m2]", "  count: 3\n  names: [m1, m2]"),
            vec!["s.yaml:4:3: controllers.names: 2 names given but count is 3"],
        ),
        (
            "duplicate names across groups",
            with("names: [n1, n2]", "names: [n1, m2]"),
            vec!["s.yaml:7:15: workers.names[1]: duplicate node name `m2` (also at controllers.names[1])"],
        ),
        (
            "name is not a hostname",
            with("names: [m1, m2]", "names: [m1, M_2]"),
            vec!["s.yaml:4:15: controllers.names[1]: `M_2` is not a valid hostname: use 1-63 lowercase letters, digits and '-', starting with a letter and not ending with '-'"],
        ),
        (
            "prefix makes bad hostnames",
            with("  count: 2\n  names: [n1, n2]", "  count: 2\n  prefix: Worker_"),
            vec!["s.yaml:7:11: workers.prefix: prefix `Worker_` makes node names like `Worker_1` that are not valid hostnames: use lowercase letters, digits and '-', starting with a letter"],
        ),
        (
            "load balancer name is a node name",
            with("address: 10.200.1.15", "address: 10.200.1.15\n  name: m1"),
            vec!["s.yaml:10:9: load_balancer.name: `m1` is already a node name (at controllers.names[0]); the load balancer needs its own"],
        ),
        (
            "lab name invalid",
            with("name: lab", "name: My_Lab"),
            vec!["s.yaml:1:7: name: `My_Lab` is not a valid lab name: use 1-32 lowercase letters, digits and '-', starting with a letter and not ending with '-'"],
        ),
        (
            "pod cidr overlaps node subnet",
            with("pod_cidr: 10.100.0.0/16", "pod_cidr: 10.200.0.0/16"),
            vec!["s.yaml:11:13: cluster.pod_cidr: 10.200.0.0/16 overlaps network.subnet 10.200.1.0/24; node, pod and service ranges must be disjoint"],
        ),
        (
            "service cidr overlaps pod cidr",
            with("service_cidr: 10.32.0.0/24", "service_cidr: 10.100.5.0/24"),
            vec!["s.yaml:12:17: cluster.service_cidr: 10.100.5.0/24 overlaps cluster.pod_cidr 10.100.0.0/16; node, pod and service ranges must be disjoint"],
        ),
        (
            "gateway outside the subnet",
            with("name: lab", "name: lab\nnetwork:\n  gateway: 10.9.9.1"),
            vec!["s.yaml:3:12: network.gateway: gateway 10.9.9.1 is not a usable address of the node subnet 10.200.1.0/24 (valid: 10.200.1.1 to 10.200.1.254)"],
        ),
        (
            "gateway is the broadcast address",
            with("name: lab", "name: lab\nnetwork:\n  gateway: 10.200.1.255"),
            vec!["s.yaml:3:12: network.gateway: gateway 10.200.1.255 is not a usable address of the node subnet 10.200.1.0/24 (valid: 10.200.1.1 to 10.200.1.254)"],
        ),
        (
            "load balancer outside the subnet",
            with("address: 10.200.1.15", "address: 10.200.2.15"),
            vec!["s.yaml:9:12: load_balancer.address: 10.200.2.15 is not a usable address of the node subnet 10.200.1.0/24 (valid: 10.200.1.1 to 10.200.1.254)"],
        ),
        (
            "load balancer is the gateway",
            with("address: 10.200.1.15", "address: 10.200.1.1"),
            vec!["s.yaml:9:12: load_balancer.address: 10.200.1.1 is the gateway; the load balancer needs its own address"],
        ),
        (
            "node collides with the load balancer",
            with("address: 10.200.1.15", "address: 10.200.1.11"),
            vec!["s.yaml:2:1: controllers.first_ip: node `m2` would get 10.200.1.11, which is the load balancer (load_balancer.address)"],
        ),
        (
            "node collides with the gateway",
            with("  count: 2\n  names: [m1, m2]", "  count: 2\n  names: [m1, m2]\n  first_ip: 10.200.1.1"),
            vec!["s.yaml:5:13: controllers.first_ip: node `m1` would get 10.200.1.1, which is the gateway (network.gateway)"],
        ),
        (
            "groups overlap",
            with("  count: 2\n  names: [n1, n2]", "  count: 2\n  names: [n1, n2]\n  first_ip: 10.200.1.11"),
            vec!["s.yaml:8:13: workers.first_ip: node `n1` would get 10.200.1.11, which is node `m2`"],
        ),
        (
            "pod cidr too small for the workers",
            with("pod_cidr: 10.100.0.0/16", "pod_cidr: 10.100.0.0/24"),
            vec!["s.yaml:11:13: cluster.pod_cidr: 10.100.0.0/24 holds 1 /24 node range, but 2 workers need one each; use a larger pod_cidr or a longer node_pod_prefix"],
        ),
        (
            "node pod prefix shorter than the pod cidr",
            with("pod_cidr: 10.100.0.0/16", "pod_cidr: 10.100.0.0/16\n  node_pod_prefix: 12"),
            vec!["s.yaml:12:20: cluster.node_pod_prefix: /12 cannot split 10.100.0.0/16: use a prefix from /16 to /28"],
        ),
        (
            "api service ip outside the service range",
            with("service_cidr: 10.32.0.0/24", "service_cidr: 10.32.0.0/24\n  api_service_ip: 10.33.0.1"),
            vec!["s.yaml:13:19: cluster.api_service_ip: 10.33.0.1 is not a usable address of the service range 10.32.0.0/24 (valid: 10.32.0.1 to 10.32.0.254)"],
        ),
        (
            "dns ip equals api ip",
            with("service_cidr: 10.32.0.0/24", "service_cidr: 10.32.0.0/24\n  dns_service_ip: 10.32.0.1"),
            vec!["s.yaml:13:19: cluster.dns_service_ip: 10.32.0.1 is also the API service IP; DNS needs its own"],
        ),
        (
            "bridge name over 15 bytes",
            with("name: lab", "name: lab\nnetwork:\n  bridge: kthw-bridge-0001"),
            vec!["s.yaml:3:11: network.bridge: bridge name `kthw-bridge-0001` is 16 bytes; Linux interface names are at most 15"],
        ),
        (
            "unknown network profile",
            with("name: lab", "name: lab\nnetwork: nope"),
            vec!["s.yaml:2:10: network: no network profile `nope` (available: default, lab2)"],
        ),
        (
            "unknown image",
            with("name: lab", "name: lab\nimage: windows"),
            vec!["s.yaml:2:8: image: unknown image `windows` (available: debian-12, kthw-debian12, ubuntu-24.04)"],
        ),
        (
            "memory beyond the host",
            with("  count: 2\n  names: [n1, n2]", "  count: 2\n  names: [n1, n2]\n  memory_mib: 20000"),
            vec!["s.yaml:8:15: workers.memory_mib: the lab's guests need 44096 MiB in all (2 x 2048 + 2 x 20000), more than this host can give (32768 MiB of memory, 1024 kept for the host); lower counts or memory_mib"],
        ),
        (
            "root ssh user",
            with("name: lab", "name: lab\nssh_user: root"),
            vec!["s.yaml:2:11: ssh_user: use a non-root user; the lab gives it passwordless sudo"],
        ),
        (
            "unknown component from the image",
            with("name: lab", "name: lab\nfrom_image: [etcd, kubelet]"),
            vec!["s.yaml:2:20: from_image[1]: `kubelet` is not one of: etcd, containerd, runc, cni-plugins"],
        ),
        (
            "component the image does not ship",
            with("name: lab", "name: lab\nimage: debian-12\nfrom_image: [etcd]"),
            vec!["s.yaml:3:14: from_image[0]: image `debian-12` does not ship `etcd`; remove it from from_image to download the pinned release"],
        ),
        (
            "bad version",
            with("name: lab", "name: lab\nversions:\n  kubernetes: latest"),
            vec!["s.yaml:3:15: versions.kubernetes: `latest` is not a release version like 1.32.3"],
        ),
        (
            // One error for the image, none more for each from_image entry.
            "unknown image with components from it",
            with("name: lab", "name: lab\nimage: windows\nfrom_image: [etcd, containerd, runc, cni-plugins]"),
            vec!["s.yaml:2:8: image: unknown image `windows` (available: debian-12, kthw-debian12, ubuntu-24.04)"],
        ),
        (
            "kubernetes version the catalog does not know",
            with("name: lab", "name: lab\nversions:\n  kubernetes: 9.99.0"),
            vec!["s.yaml:3:15: versions.kubernetes: kubernetes 9.99.0 is not in the component catalog, which knows kubernetes 1.32.3: pick one of those, or add the release with its checksum to components/catalog.yaml"],
        ),
        (
            "every downloaded component's version is checked",
            with("name: lab", "name: lab\nversions: {etcd: 3.4.0, containerd: 1.0.0, runc: 1.0.0, cni_plugins: 1.0.0, crictl: 1.0.0}"),
            vec![
                "s.yaml:2:18: versions.etcd: etcd 3.4.0 is not in the component catalog, which knows etcd 3.5.21: pick one of those, or add the release with its checksum to components/catalog.yaml",
                "s.yaml:2:37: versions.containerd: containerd 1.0.0 is not in the component catalog, which knows containerd 2.0.4: pick one of those, or add the release with its checksum to components/catalog.yaml",
                "s.yaml:2:50: versions.runc: runc 1.0.0 is not in the component catalog, which knows runc 1.2.6: pick one of those, or add the release with its checksum to components/catalog.yaml",
                "s.yaml:2:70: versions.cni_plugins: cni_plugins 1.0.0 is not in the component catalog, which knows cni_plugins 1.6.2: pick one of those, or add the release with its checksum to components/catalog.yaml",
                "s.yaml:2:85: versions.crictl: crictl 1.0.0 is not in the component catalog, which knows crictl 1.32.0: pick one of those, or add the release with its checksum to components/catalog.yaml",
            ],
        ),
        (
            // Taken from the image's package: its `versions` entry is not used.
            "the version of a component from the image is not checked",
            with("name: lab", "name: lab\nversions: {etcd: 3.4.0, containerd: 1.0.0}\nfrom_image: [etcd, containerd]"),
            vec![],
        ),
    ]
}

#[test]
fn every_rule_reports_its_exact_message() {
    let mut failures = Vec::new();
    for (case, text, expected) in table() {
        let got = problems(&text);
        if got != expected {
            failures.push(format!(
                "{case}:\n  expected {expected:#?}\n  got      {got:#?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn all_problems_are_reported_at_once() {
    let text = "\
name: Bad
controllers:
  count: 0
workers:
  count: 1
  extra: 1
load_balancer:
  address: 10.9.9.9
cluster:
  pod_cidr: 10.200.0.0/16
";
    let got = problems(text);
    assert_eq!(got.len(), 5, "{got:#?}");
    assert!(got[0].starts_with("s.yaml:1:7: name:"));
    assert!(got[1].starts_with("s.yaml:3:10: controllers.count:"));
    assert!(got[2].starts_with("s.yaml:6:3: workers.extra:"));
    assert!(got[3].starts_with("s.yaml:8:12: load_balancer.address:"));
    assert!(got[4].starts_with("s.yaml:10:13: cluster.pod_cidr:"));
}

#[test]
fn profile_errors_point_into_the_profile_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("network")).unwrap();
    std::fs::write(
        dir.path().join("network/odd.yaml"),
        "bridge: br9\nsubnet: 10.9.0.0/24\ngateway: 10.9.0.1\nmtu: 9000\n",
    )
    .unwrap();
    let src = Sources {
        roots: vec![dir.path().to_path_buf()],
    };
    let text = "name: lab\nnetwork: odd\ncontrollers: {count: 1}\nworkers: {count: 1}\nload_balancer: {address: 10.9.0.15}\n";
    let err = load_str(text, "s.yaml", &src, &HOST).unwrap_err();
    let got: Vec<String> = err.diagnostics.iter().map(|d| d.to_string()).collect();
    let file = dir.path().join("network/odd.yaml").display().to_string();
    assert_eq!(
        got,
        vec![format!(
            "{file}:4:1: mtu: unknown field `mtu`, expected one of: bridge, subnet, gateway, nat, uplink, dns"
        )]
    );
}

#[test]
fn inline_network_overrides_the_profile() {
    let text = with(
        "name: lab",
        "name: lab\nnetwork:\n  profile: default\n  bridge: kthw9\n  uplink: eth7",
    );
    let s = load_str(&text, "s.yaml", &sources(), &HOST).unwrap();
    assert_eq!(s.network.bridge, "kthw9");
    assert_eq!(s.network.uplink.as_deref(), Some("eth7"));
    assert_eq!(s.network.subnet.to_string(), "10.200.1.0/24");
    assert!(s.network.nat);
}

#[test]
fn memory_check_uses_the_host_limit() {
    let small = HostLimits { memory_mib: 4096 };
    let got = problems_with(BASE, &small);
    assert_eq!(got.len(), 1, "{got:#?}");
    assert!(got[0].contains("need 8192 MiB"), "{}", got[0]);
}
