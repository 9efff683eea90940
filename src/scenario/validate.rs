//! Semantic checks on a decoded scenario. Every rule reports through `Ctx`, so one
//! run lists every problem; a rule is skipped when a field it reads already failed
//! to decode (its default would only produce noise).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

use super::decode::{Ctx, Keyword};
use super::model::{NodeGroup, Role, Scenario};
use super::HostLimits;
use crate::components::{ComponentCatalog, VersionOf};

/// Memory kept for the host itself when checking guest totals.
pub const HOST_RESERVE_MIB: u64 = 1024;
pub const MAX_CONTROLLERS: u32 = 9;
pub const MAX_IFNAME: usize = 15;

/// A name usable as a host name label: lowercase letters, digits, '-'; starts with
/// a letter, does not end with '-', at most `max` bytes.
pub fn is_label(s: &str, max: usize) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= max
        && b[0].is_ascii_lowercase()
        && b[b.len() - 1] != b'-'
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

fn is_dns_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(|l| is_label(l, 63))
}

fn is_user_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 32
        && (b[0].is_ascii_lowercase() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-')
}

fn is_version(s: &str) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|c| c.is_ascii_digit()))
}

/// Usable host address of a subnet: not its network or broadcast address
/// (for /31 and /32 every address is usable).
pub fn is_usable_host(net: Ipv4Network, ip: Ipv4Addr) -> bool {
    net.contains(ip) && (net.prefix() >= 31 || (ip != net.network() && ip != net.broadcast()))
}

pub fn overlaps(a: Ipv4Network, b: Ipv4Network) -> bool {
    a.contains(b.network()) || b.contains(a.network())
}

pub fn check(s: &Scenario, cx: &mut Ctx, host: &HostLimits) {
    let ok = |cx: &Ctx, paths: &[&str]| paths.iter().all(|p| !cx.has_errors_at(p));

    if ok(cx, &["name"]) && !is_label(&s.name, 32) {
        cx.error_at_path(
            "name",
            format!(
                "`{}` is not a valid lab name: use 1-32 lowercase letters, digits and '-', starting with a letter and not ending with '-'",
                s.name
            ),
        );
    }
    if ok(cx, &["ssh_user"]) {
        if s.ssh_user == "root" {
            cx.error_at_path(
                "ssh_user",
                "use a non-root user; the lab gives it passwordless sudo",
            );
        } else if !is_user_name(&s.ssh_user) {
            cx.error_at_path(
                "ssh_user",
                format!(
                    "`{}` is not a valid user name: use up to 32 lowercase letters, digits, '_' and '-', starting with a letter or '_'",
                    s.ssh_user
                ),
            );
        }
    }
    check_network(s, cx);
    check_groups(s, cx);
    check_addresses(s, cx);
    check_cluster(s, cx);
    check_memory(s, cx, host);
    for (key, v) in [
        ("kubernetes", &s.versions.kubernetes),
        ("etcd", &s.versions.etcd),
        ("containerd", &s.versions.containerd),
        ("runc", &s.versions.runc),
        ("cni_plugins", &s.versions.cni_plugins),
        ("crictl", &s.versions.crictl),
    ] {
        let path = format!("versions.{key}");
        if ok(cx, &[&path]) && !is_version(v) {
            cx.error_at_path(&path, format!("`{v}` is not a release version like 1.32.3"));
        }
    }
}

/// Every version the lab will download must be one the component catalog has a
/// release (URL and checksum) for; otherwise `create` fails only after the VMs have
/// booted. Run after [`check`], which rejects what is not a version at all. A
/// component taken from the image (`from_image`) does not use its `versions` entry,
/// so that entry is not checked (it is the release used once the component leaves
/// `from_image`; the image's own version is in the catalog's `provided_by_image`).
pub fn check_versions(s: &Scenario, catalog: &ComponentCatalog, cx: &mut Ctx) {
    for (key, of) in VersionOf::WORDS {
        let path = format!("versions.{key}");
        if cx.has_errors_at(&path) {
            continue;
        }
        let version = of.pick(&s.versions);
        let used: Vec<_> = catalog
            .components
            .iter()
            .filter(|c| c.version_of == *of && !s.from_image.contains(&c.name))
            .collect();
        let lacking: Vec<_> = used
            .iter()
            .filter(|c| !c.versions.contains_key(version))
            .collect();
        if lacking.is_empty() {
            continue;
        }
        let mut known: Vec<&str> = lacking
            .iter()
            .flat_map(|c| c.versions.keys().map(String::as_str))
            .collect();
        known.sort();
        known.dedup();
        let known = if known.is_empty() {
            "none".to_string()
        } else {
            known.join(", ")
        };
        let what = if lacking.len() == used.len() {
            format!("{key} {version}")
        } else {
            let names: Vec<&str> = lacking.iter().map(|c| c.name.as_str()).collect();
            format!("{} {version}", names.join(", "))
        };
        cx.error_at_path(
            &path,
            format!(
                "{what} is not in the component catalog, which knows {key} {known}: pick one of those, or add the release with its checksum to components/catalog.yaml"
            ),
        );
    }
}

fn check_network(s: &Scenario, cx: &mut Ctx) {
    let n = &s.network;
    let b = n.bridge.as_bytes();
    if b.len() > MAX_IFNAME {
        cx.error_at_path(
            "network.bridge",
            format!(
                "bridge name `{}` is {} bytes; Linux interface names are at most {MAX_IFNAME}",
                n.bridge,
                b.len()
            ),
        );
    } else if b.is_empty()
        || n.bridge == "."
        || n.bridge == ".."
        || b.iter()
            .any(|c| *c == b'/' || *c == b':' || c.is_ascii_whitespace() || !c.is_ascii_graphic())
    {
        cx.error_at_path(
            "network.bridge",
            format!(
                "`{}` is not a valid interface name: use letters, digits, '-', '_' or '.'",
                n.bridge
            ),
        );
    }
    if n.subnet.prefix() > 29 {
        cx.error_at_path(
            "network.subnet",
            format!(
                "{} is too small for a lab: use a /29 or larger (e.g. a /24)",
                n.subnet
            ),
        );
    }
    if !is_usable_host(n.subnet, n.gateway) {
        cx.error_at_path(
            "network.gateway",
            format!(
                "gateway {} is not a usable address of the node subnet {} (valid: {} to {})",
                n.gateway,
                n.subnet,
                first_host(n.subnet),
                last_host(n.subnet)
            ),
        );
    }
    if let Some(u) = &n.uplink {
        if u.len() > MAX_IFNAME || u.is_empty() {
            cx.error_at_path(
                "network.uplink",
                format!("`{u}` cannot be an interface name (1-{MAX_IFNAME} bytes), or use `auto`"),
            );
        }
    }
}

fn first_host(net: Ipv4Network) -> Ipv4Addr {
    if net.prefix() >= 31 {
        net.network()
    } else {
        Ipv4Addr::from(u32::from(net.network()) + 1)
    }
}

fn last_host(net: Ipv4Network) -> Ipv4Addr {
    if net.prefix() >= 31 {
        net.broadcast()
    } else {
        Ipv4Addr::from(u32::from(net.broadcast()) - 1)
    }
}

fn check_group(g: &NodeGroup, path: &str, min: u32, max: u32, cx: &mut Ctx) {
    let count_path = format!("{path}.count");
    if !cx.has_errors_at(&count_path) {
        if g.count < min {
            cx.error_at_path(
                &count_path,
                format!("must be at least {min} (got {})", g.count),
            );
        } else if g.count > max {
            cx.error_at_path(
                &count_path,
                format!("must be at most {max} (got {})", g.count),
            );
        }
    }
    if let Some(names) = &g.names {
        if names.len() as u32 != g.count && !cx.has_errors_at(&count_path) {
            cx.error_at_path(
                &format!("{path}.names"),
                format!("{} names given but count is {}", names.len(), g.count),
            );
        }
    }
    if g.vcpus == 0 {
        cx.error_at_path(&format!("{path}.vcpus"), "must be at least 1");
    }
    if g.memory_mib < 256 {
        cx.error_at_path(
            &format!("{path}.memory_mib"),
            format!(
                "{} MiB is too little to boot a node: use at least 256",
                g.memory_mib
            ),
        );
    }
    if g.disk_gib < 2 {
        cx.error_at_path(
            &format!("{path}.disk_gib"),
            format!("{} GiB cannot hold the image: use at least 2", g.disk_gib),
        );
    }
    if g.names.is_none() && !cx.has_errors_at(&format!("{path}.prefix")) {
        let sample = format!("{}{}", g.prefix, g.count.saturating_sub(1));
        if !is_label(&sample, 63) {
            cx.error_at_path(
                &format!("{path}.prefix"),
                format!(
                    "prefix `{}` makes node names like `{sample}` that are not valid hostnames: use lowercase letters, digits and '-', starting with a letter",
                    g.prefix
                ),
            );
        }
    }
}

fn check_groups(s: &Scenario, cx: &mut Ctx) {
    check_group(&s.controllers, "controllers", 1, MAX_CONTROLLERS, cx);
    // Zero workers is a control-plane-only lab (etcd and the API without kubelets).
    check_group(&s.workers, "workers", 0, 250, cx);
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    for slot in s.node_slots() {
        if slot.name_path.ends_with(".prefix") {
            // Reported once per group by check_group.
        } else if !is_label(&slot.name, 63) {
            cx.error_at_path(
                &slot.name_path,
                format!(
                    "`{}` is not a valid hostname: use 1-63 lowercase letters, digits and '-', starting with a letter and not ending with '-'",
                    slot.name
                ),
            );
        }
        if let Some(first) = seen.get(&slot.name) {
            cx.error_at_path(
                &slot.name_path,
                format!("duplicate node name `{}` (also at {first})", slot.name),
            );
        } else {
            seen.insert(slot.name.clone(), slot.name_path.clone());
        }
    }
    let lb = &s.load_balancer.name;
    if !is_label(lb, 63) {
        cx.error_at_path(
            "load_balancer.name",
            format!("`{lb}` is not a valid hostname: use lowercase letters, digits and '-'"),
        );
    } else if let Some(first) = seen.get(lb) {
        cx.error_at_path(
            "load_balancer.name",
            format!("`{lb}` is already a node name (at {first}); the load balancer needs its own"),
        );
    }
}

fn check_addresses(s: &Scenario, cx: &mut Ctx) {
    let net = s.network.subnet;
    if cx.has_errors_at("network.subnet") {
        return;
    }
    // Reserved addresses and who holds them, to name the other side of a collision.
    let mut taken: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    if is_usable_host(net, s.network.gateway) {
        taken.insert(s.network.gateway, "the gateway (network.gateway)".into());
    }
    let lb = s.load_balancer.address;
    if !cx.has_errors_at("load_balancer.address") {
        if !is_usable_host(net, lb) {
            cx.error_at_path(
                "load_balancer.address",
                format!(
                    "{lb} is not a usable address of the node subnet {net} (valid: {} to {})",
                    first_host(net),
                    last_host(net)
                ),
            );
        } else if lb == s.network.gateway {
            cx.error_at_path(
                "load_balancer.address",
                format!("{lb} is the gateway; the load balancer needs its own address"),
            );
        } else {
            taken.insert(lb, "the load balancer (load_balancer.address)".into());
        }
    }
    let slots = s.node_slots();
    // A group whose count is already wrong, or that overflows the subnet, gets one
    // message and no per-node collision noise.
    let mut skip = [false, false];
    for (gi, (role, group, g)) in [
        (Role::Controller, "controllers", &s.controllers),
        (Role::Worker, "workers", &s.workers),
    ]
    .into_iter()
    .enumerate()
    {
        if cx.has_errors_at(&format!("{group}.count"))
            || cx.has_errors_at(&format!("{group}.first_ip"))
        {
            skip[gi] = true;
            continue;
        }
        let mine: Vec<_> = slots.iter().filter(|x| x.role == role).collect();
        if mine
            .iter()
            .any(|x| !x.ip.is_some_and(|ip| is_usable_host(net, ip)))
        {
            skip[gi] = true;
            let first = mine
                .first()
                .and_then(|x| x.ip)
                .map(|ip| ip.to_string())
                .unwrap_or_else(|| "?".into());
            cx.error_at_path(
                &format!("{group}.count"),
                format!(
                    "{} {group} starting at {first} do not fit in the node subnet {net} (usable: {} to {}); lower the count or move {group}.first_ip",
                    g.count,
                    first_host(net),
                    last_host(net)
                ),
            );
        }
    }
    for slot in slots {
        let gi = (slot.role == Role::Worker) as usize;
        if skip[gi] {
            continue;
        }
        let group = if gi == 0 { "controllers" } else { "workers" };
        let ip = slot.ip.expect("checked to fit");
        if let Some(holder) = taken.get(&ip) {
            cx.error_at_path(
                &format!("{group}.first_ip"),
                format!("node `{}` would get {ip}, which is {holder}", slot.name),
            );
        } else {
            taken.insert(ip, format!("node `{}`", slot.name));
        }
    }
}

fn check_cluster(s: &Scenario, cx: &mut Ctx) {
    let c = &s.cluster;
    // The cluster name defaults to the lab name, already checked above.
    if c.name != s.name && !cx.has_errors_at("cluster.name") && !is_label(&c.name, 63) {
        cx.error_at_path(
            "cluster.name",
            format!(
                "`{}` is not a valid cluster name: use lowercase letters, digits and '-'",
                c.name
            ),
        );
    }
    if !cx.has_errors_at("cluster.domain") && !is_dns_name(&c.domain) {
        cx.error_at_path(
            "cluster.domain",
            format!(
                "`{}` is not a valid DNS domain like cluster.local",
                c.domain
            ),
        );
    }
    let ranges = [
        ("network.subnet", s.network.subnet),
        ("cluster.pod_cidr", c.pod_cidr),
        ("cluster.service_cidr", c.service_cidr),
    ];
    for i in 0..ranges.len() {
        for j in i + 1..ranges.len() {
            let (pa, a) = ranges[i];
            let (pb, b) = ranges[j];
            if cx.has_errors_at(pa) || cx.has_errors_at(pb) {
                continue;
            }
            if overlaps(a, b) {
                cx.error_at_path(
                    pb,
                    format!("{b} overlaps {pa} {a}; node, pod and service ranges must be disjoint"),
                );
            }
        }
    }
    if !cx.has_errors_at("cluster.pod_cidr") && !cx.has_errors_at("cluster.node_pod_prefix") {
        let p = c.pod_cidr.prefix();
        let np = c.node_pod_prefix;
        if np < p || np > 28 {
            cx.error_at_path(
                "cluster.node_pod_prefix",
                format!(
                    "/{np} cannot split {}: use a prefix from /{p} to /28",
                    c.pod_cidr
                ),
            );
        } else {
            let blocks: u64 = 1u64 << (np - p);
            let need = s.workers.count as u64;
            if blocks < need && !cx.has_errors_at("workers.count") {
                cx.error_at_path(
                    "cluster.pod_cidr",
                    format!(
                        "{} holds {blocks} /{np} node range{}, but {need} workers need one each; use a larger pod_cidr or a longer node_pod_prefix",
                        c.pod_cidr,
                        if blocks == 1 { "" } else { "s" }
                    ),
                );
            }
        }
    }
    if !cx.has_errors_at("cluster.service_cidr") {
        let svc = c.service_cidr;
        if svc.prefix() > 28 {
            cx.error_at_path(
                "cluster.service_cidr",
                format!("{svc} is too small for services: use a /28 or larger"),
            );
            return;
        }
        for (path, ip) in [
            ("cluster.api_service_ip", c.api_service_ip),
            ("cluster.dns_service_ip", c.dns_service_ip),
        ] {
            if !cx.has_errors_at(path) && !is_usable_host(svc, ip) {
                cx.error_at_path(
                    path,
                    format!(
                        "{ip} is not a usable address of the service range {svc} (valid: {} to {})",
                        first_host(svc),
                        last_host(svc)
                    ),
                );
            }
        }
        if c.api_service_ip == c.dns_service_ip && !cx.has_errors_at("cluster.dns_service_ip") {
            cx.error_at_path(
                "cluster.dns_service_ip",
                format!(
                    "{} is also the API service IP; DNS needs its own",
                    c.dns_service_ip
                ),
            );
        }
    }
}

fn check_memory(s: &Scenario, cx: &mut Ctx, host: &HostLimits) {
    let paths = [
        "controllers.count",
        "controllers.memory_mib",
        "workers.count",
        "workers.memory_mib",
    ];
    if paths.iter().any(|p| cx.has_errors_at(p)) {
        return;
    }
    let need = s.controllers.count as u64 * s.controllers.memory_mib
        + s.workers.count as u64 * s.workers.memory_mib;
    let have = host.memory_mib.saturating_sub(HOST_RESERVE_MIB);
    if need > have {
        cx.error_at_path(
            "workers.memory_mib",
            format!(
                "the lab's guests need {need} MiB in all ({} x {} + {} x {}), more than this host can give ({} MiB of memory, {HOST_RESERVE_MIB} kept for the host); lower counts or memory_mib",
                s.controllers.count,
                s.controllers.memory_mib,
                s.workers.count,
                s.workers.memory_mib,
                host.memory_mib
            ),
        );
    }
}
