//! Scenarios: loading, defaults and validation.
//!
//! A scenario file names the lab, its network profile, image, node groups, load
//! balancer, cluster ranges and component versions. Loading collects every problem
//! with `file:line:col` and the field path before anything touches the host.

pub mod decode;
pub mod model;
pub mod validate;
pub mod yaml;

use std::path::{Path, PathBuf};

pub use decode::Diagnostic;
pub use model::*;

use decode::{Ctx, MapReader};
use yaml::{Kind, Node};

/// Network profiles and image names compiled into the binary, so a scenario works
/// from any directory. Files next to the scenario override them.
const BUILTIN_NETWORKS: &[(&str, &str)] =
    &[("default", include_str!("../../network/default.yaml"))];

/// Images the binary knows without a catalog file (the catalog in `images/` adds more):
/// the entries of the image catalog compiled into the binary.
pub const BUILTIN_IMAGES: &[&str] = crate::cache::BUILTIN_IMAGE_NAMES;

const SCENARIO_FIELDS: &[&str] = &[
    "name",
    "description",
    "network",
    "image",
    "accelerator",
    "ssh_user",
    "key_algorithm",
    "controllers",
    "workers",
    "load_balancer",
    "cluster",
    "versions",
    "from_image",
];

/// What validation needs to know about the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostLimits {
    /// Physical memory in MiB (from /proc/meminfo).
    pub memory_mib: u64,
}

/// Where profiles and catalogs are looked up.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// Directories that may hold `network/` and `images/`, searched in order.
    pub roots: Vec<PathBuf>,
}

impl Sources {
    /// The scenario's directory and its parent (a repo checkout keeps `scenarios/`
    /// beside `network/` and `images/`).
    pub fn for_scenario(path: &Path) -> Sources {
        let dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let dir = if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir
        };
        let mut roots = vec![dir.clone()];
        if let Some(parent) = dir
            .join("..")
            .canonicalize()
            .ok()
            .or_else(|| dir.parent().map(Path::to_path_buf))
        {
            roots.push(parent);
        }
        Sources { roots }
    }

    fn find(&self, kind: &str, name: &str) -> Option<PathBuf> {
        self.roots
            .iter()
            .map(|r| r.join(kind).join(format!("{name}.yaml")))
            .find(|p| p.is_file())
    }

    /// Names of every profile of a kind (files and built-ins), sorted.
    fn available(&self, kind: &str, builtin: &[&str]) -> Vec<String> {
        let mut names: Vec<String> = builtin.iter().map(|s| s.to_string()).collect();
        for r in &self.roots {
            if let Ok(rd) = std::fs::read_dir(r.join(kind)) {
                for e in rd.flatten() {
                    let p = e.path();
                    if p.extension().is_some_and(|x| x == "yaml") {
                        if let Some(stem) = p.file_stem().and_then(|s| s.to_str()) {
                            names.push(stem.to_string());
                        }
                    }
                }
            }
        }
        names.sort();
        names.dedup();
        names
    }
}

/// A scenario that failed to load: every problem found.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{} problem{} in {file}", diagnostics.len(), if diagnostics.len() == 1 { "" } else { "s" })]
pub struct ScenarioError {
    pub file: String,
    pub diagnostics: Vec<Diagnostic>,
}

/// Read and validate a scenario file.
pub fn load_file(path: &Path, host: &HostLimits) -> Result<Scenario, ScenarioError> {
    let label = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ScenarioError {
        file: label.clone(),
        diagnostics: vec![Diagnostic {
            file: label.clone(),
            line: 0,
            col: 0,
            path: String::new(),
            message: format!("cannot read the scenario: {e}"),
        }],
    })?;
    load_str(&text, &label, &Sources::for_scenario(path), host)
}

/// Parse, resolve and validate scenario text. `label` names it in diagnostics.
pub fn load_str(
    text: &str,
    label: &str,
    sources: &Sources,
    host: &HostLimits,
) -> Result<Scenario, ScenarioError> {
    let fail = |diagnostics: Vec<Diagnostic>| ScenarioError {
        file: label.to_string(),
        diagnostics,
    };
    let root = decode::parse_document(text, label).map_err(|d| fail(vec![d]))?;
    let mut cx = Ctx::new(label);
    // Compiled in and tested: failing to load is a bug, reported rather than skipped.
    let catalog = crate::components::ComponentCatalog::builtin();
    if let Err(e) = &catalog {
        cx.error_at_path(
            "",
            format!(
                "the component catalog built into kthw-lab does not load (a bug): {}",
                e.report()
            ),
        );
    }
    let catalog = catalog.ok();
    let scenario = decode_scenario(&root, &mut cx, sources, catalog.as_ref());
    if let Some(s) = &scenario {
        validate::check(s, &mut cx, host);
        if let Some(cat) = &catalog {
            validate::check_versions(s, cat, &mut cx);
        }
    }
    if cx.has_errors() || scenario.is_none() {
        let mut d = cx.diagnostics;
        d.sort_by_key(|x| (x.file != label, x.line, x.col));
        return Err(fail(d));
    }
    Ok(scenario.expect("checked above"))
}

fn decode_scenario(
    root: &Node,
    cx: &mut Ctx,
    sources: &Sources,
    catalog: Option<&crate::components::ComponentCatalog>,
) -> Option<Scenario> {
    let mut m = MapReader::new(root, "", cx, SCENARIO_FIELDS)?;
    let name: Option<String> = m.req("name", cx);
    let description = m.opt("description", cx);
    let (network_profile, network) = read_network(m.section("network", cx), cx, sources);
    let image = m
        .opt("image", cx)
        .unwrap_or_else(|| "kthw-debian12".to_string());
    let images = sources.available("images", BUILTIN_IMAGES);
    if !images.contains(&image) && !cx.has_errors_at("image") {
        cx.error_at_path(
            "image",
            format!("unknown image `{image}` (available: {})", images.join(", ")),
        );
    }
    let accelerator = m
        .opt_keyword("accelerator", cx)
        .unwrap_or(Accelerator::Auto);
    let ssh_user = m.opt("ssh_user", cx).unwrap_or_else(|| "kthw".to_string());
    let key_algorithm = m
        .opt_keyword("key_algorithm", cx)
        .unwrap_or(KeyAlgorithm::EcdsaP256);
    let controllers = NodeGroup::read(
        m.section("controllers", cx),
        "controllers",
        cx,
        "controller-",
        2048,
    );
    let workers = NodeGroup::read(m.section("workers", cx), "workers", cx, "worker-", 2048);
    let load_balancer = read_lb(m.section("load_balancer", cx), cx);
    let cluster = read_cluster(
        m.section("cluster", cx),
        cx,
        name.as_deref().unwrap_or("kthw"),
    );
    let versions = read_versions(m.section("versions", cx), cx);
    let from_image: Vec<String> = m.opt("from_image", cx).unwrap_or_default();
    // An unknown image is one error (above), not one more per from_image entry.
    let image_known = !cx.has_errors_at("image");
    check_from_image(&from_image, image_known.then_some(&image[..]), catalog, cx);
    m.finish(cx);
    Some(Scenario {
        name: name.unwrap_or_default(),
        description,
        network_profile,
        network: network?,
        image,
        accelerator,
        ssh_user,
        key_algorithm,
        controllers,
        workers,
        load_balancer: load_balancer?,
        cluster,
        versions,
        from_image,
    })
}

/// Each listed component must be one an image can provide, listed once, and
/// provided by the scenario's image according to the component catalog. `image` is
/// `None` when it is unknown (already reported): what it ships cannot be checked.
/// `catalog` is `None` only when the built-in catalog failed to load (reported).
fn check_from_image(
    list: &[String],
    image: Option<&str>,
    catalog: Option<&crate::components::ComponentCatalog>,
    cx: &mut Ctx,
) {
    for (i, c) in list.iter().enumerate() {
        let path = format!("from_image[{i}]");
        if !model::IMAGE_COMPONENTS.contains(&c.as_str()) {
            cx.error_at_path(
                &path,
                format!(
                    "`{c}` is not one of: {}",
                    model::IMAGE_COMPONENTS.join(", ")
                ),
            );
        } else if list[..i].contains(c) {
            cx.error_at_path(&path, format!("`{c}` is listed twice"));
        } else if let (Some(cat), Some(image)) = (catalog, image) {
            if cat.from_image(image, c).is_none() {
                cx.error_at_path(
                    &path,
                    format!("image `{image}` does not ship `{c}`; remove it from from_image to download the pinned release"),
                );
            }
        }
    }
}

/// `network: NAME` or `network: { profile: NAME, <overrides> }`.
fn read_network(
    node: Option<&Node>,
    cx: &mut Ctx,
    sources: &Sources,
) -> (String, Option<NetworkProfile>) {
    let path = "network";
    let (profile, overrides) = match node {
        None => ("default".to_string(), model::NetworkFields::default()),
        Some(
            n @ Node {
                kind: Kind::Scalar { .. },
                ..
            },
        ) => match <String as decode::FromNode>::from_node(n, path, cx) {
            Some(p) => (p, model::NetworkFields::default()),
            None => return ("default".into(), None),
        },
        Some(n) => {
            static FIELDS: &[&str] = &[
                "profile", "bridge", "subnet", "gateway", "nat", "uplink", "dns",
            ];
            let Some(mut m) = MapReader::new(n, path, cx, FIELDS) else {
                return ("default".into(), None);
            };
            let profile = m
                .opt("profile", cx)
                .unwrap_or_else(|| "default".to_string());
            let f = model::NetworkFields::read(&mut m, cx);
            m.finish(cx);
            (profile, f)
        }
    };
    let base = load_profile(&profile, cx, sources);
    let Some(base) = base else {
        return (profile, None);
    };
    let f = overrides.over(base);
    let profile_path = format!("network (profile {profile})");
    let mut missing = |what: &str| {
        cx.error_at_path(
            path,
            format!("{profile_path} does not set `{what}`; set it in the profile or inline under network"),
        );
    };
    let (Some(bridge), Some(subnet), Some(gateway)) = (f.bridge.clone(), f.subnet, f.gateway)
    else {
        if f.bridge.is_none() {
            missing("bridge");
        }
        if f.subnet.is_none() {
            missing("subnet");
        }
        if f.gateway.is_none() {
            missing("gateway");
        }
        return (profile, None);
    };
    (
        profile,
        Some(NetworkProfile {
            bridge,
            subnet,
            gateway,
            nat: f.nat.unwrap_or(true),
            uplink: f.uplink,
            dns: f.dns.unwrap_or_default(),
        }),
    )
}

fn load_profile(name: &str, cx: &mut Ctx, sources: &Sources) -> Option<model::NetworkFields> {
    let (label, text) = if let Some(p) = sources.find("network", name) {
        match std::fs::read_to_string(&p) {
            Ok(t) => (p.display().to_string(), t),
            Err(e) => {
                cx.error_at_path(
                    "network",
                    format!("cannot read network profile {}: {e}", p.display()),
                );
                return None;
            }
        }
    } else if let Some((_, t)) = BUILTIN_NETWORKS.iter().find(|(n, _)| *n == name) {
        (format!("<built-in network/{name}.yaml>"), t.to_string())
    } else {
        let builtin: Vec<&str> = BUILTIN_NETWORKS.iter().map(|(n, _)| *n).collect();
        cx.error_at_path(
            "network",
            format!(
                "no network profile `{name}` (available: {})",
                sources.available("network", &builtin).join(", ")
            ),
        );
        return None;
    };
    let node = match decode::parse_document(&text, &label) {
        Ok(n) => n,
        Err(d) => {
            cx.diagnostics.push(d);
            return None;
        }
    };
    // Profile problems are reported against the profile file itself.
    let mut pcx = Ctx::new(label);
    let fields = <model::NetworkFields as decode::FromNode>::from_node(&node, "", &mut pcx);
    let failed = pcx.has_errors();
    cx.diagnostics.append(&mut pcx.diagnostics);
    if failed {
        None
    } else {
        fields
    }
}

fn read_lb(node: Option<&Node>, cx: &mut Ctx) -> Option<LoadBalancer> {
    let Some(node) = node else {
        cx.error_at_path(
            "load_balancer",
            "missing required section `load_balancer` (at least `address`)",
        );
        return None;
    };
    let mut m = MapReader::new(node, "load_balancer", cx, &["name", "address", "port"])?;
    let name = m.opt("name", cx).unwrap_or_else(|| "lb".to_string());
    let address = m.req("address", cx);
    let port = m.opt("port", cx).unwrap_or(6443);
    m.finish(cx);
    Some(LoadBalancer {
        name,
        address: address?,
        port,
    })
}

fn read_cluster(node: Option<&Node>, cx: &mut Ctx, lab: &str) -> Cluster {
    const FIELDS: &[&str] = &[
        "name",
        "pod_cidr",
        "node_pod_prefix",
        "service_cidr",
        "api_service_ip",
        "dns_service_ip",
        "domain",
    ];
    let mut c = Cluster {
        name: lab.to_string(),
        pod_cidr: "10.100.0.0/16".parse().expect("literal"),
        node_pod_prefix: 24,
        service_cidr: "10.32.0.0/24".parse().expect("literal"),
        api_service_ip: std::net::Ipv4Addr::new(10, 32, 0, 1),
        dns_service_ip: std::net::Ipv4Addr::new(10, 32, 0, 10),
        domain: "cluster.local".into(),
    };
    let Some(node) = node else { return c };
    let Some(mut m) = MapReader::new(node, "cluster", cx, FIELDS) else {
        return c;
    };
    if let Some(v) = m.opt("name", cx) {
        c.name = v;
    }
    if let Some(v) = m.opt("pod_cidr", cx) {
        c.pod_cidr = v;
    }
    if let Some(v) = m.opt("node_pod_prefix", cx) {
        c.node_pod_prefix = v;
    }
    let service: Option<ipnetwork::Ipv4Network> = m.opt("service_cidr", cx);
    if let Some(v) = service {
        c.service_cidr = v;
        // Derived defaults follow a changed service range.
        c.api_service_ip = v.nth(1).unwrap_or(v.network());
        c.dns_service_ip = v.nth(10).unwrap_or(v.network());
    }
    if let Some(v) = m.opt("api_service_ip", cx) {
        c.api_service_ip = v;
    }
    if let Some(v) = m.opt("dns_service_ip", cx) {
        c.dns_service_ip = v;
    }
    if let Some(v) = m.opt("domain", cx) {
        c.domain = v;
    }
    m.finish(cx);
    c
}

fn read_versions(node: Option<&Node>, cx: &mut Ctx) -> Versions {
    let mut v = Versions::default();
    let Some(node) = node else { return v };
    let Some(mut m) = MapReader::new(node, "versions", cx, model::VERSION_FIELDS) else {
        return v;
    };
    for (key, slot) in [
        ("kubernetes", &mut v.kubernetes),
        ("etcd", &mut v.etcd),
        ("containerd", &mut v.containerd),
        ("runc", &mut v.runc),
        ("cni_plugins", &mut v.cni_plugins),
        ("crictl", &mut v.crictl),
    ] {
        if let Some(s) = m.opt::<String>(key, cx) {
            *slot = s.trim_start_matches('v').to_string();
        }
    }
    m.finish(cx);
    v
}
