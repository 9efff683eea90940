//! The scenario model: what a user writes, with defaults applied.

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};

use super::decode::{Ctx, FromNode, Keyword, MapReader};
use super::yaml::Node;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accelerator {
    Auto,
    Kvm,
    Tcg,
}

impl Keyword for Accelerator {
    const WORDS: &'static [(&'static str, Self)] = &[
        ("auto", Accelerator::Auto),
        ("kvm", Accelerator::Kvm),
        ("tcg", Accelerator::Tcg),
    ];
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyAlgorithm {
    #[serde(rename = "ecdsa-p256")]
    EcdsaP256,
    #[serde(rename = "rsa-2048")]
    Rsa2048,
}

impl Keyword for KeyAlgorithm {
    const WORDS: &'static [(&'static str, Self)] = &[
        ("ecdsa-p256", KeyAlgorithm::EcdsaP256),
        ("rsa-2048", KeyAlgorithm::Rsa2048),
    ];
}

/// The lab network: bridge, node subnet, gateway and NAT.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkProfile {
    pub bridge: String,
    pub subnet: Ipv4Network,
    pub gateway: Ipv4Addr,
    pub nat: bool,
    /// Interface NAT masquerades out of; `None` = the default route's interface.
    pub uplink: Option<String>,
    /// Name servers the nodes use; empty = the gateway.
    pub dns: Vec<Ipv4Addr>,
}

pub(crate) const NETWORK_FIELDS: &[&str] = &["bridge", "subnet", "gateway", "nat", "uplink", "dns"];

/// Partial network settings: a profile file, or the inline overrides of a scenario.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkFields {
    pub bridge: Option<String>,
    pub subnet: Option<Ipv4Network>,
    pub gateway: Option<Ipv4Addr>,
    pub nat: Option<bool>,
    pub uplink: Option<String>,
    pub dns: Option<Vec<Ipv4Addr>>,
}

impl NetworkFields {
    pub(crate) fn read(m: &mut MapReader, cx: &mut Ctx) -> Self {
        NetworkFields {
            bridge: m.opt("bridge", cx),
            subnet: m.opt("subnet", cx),
            gateway: m.opt("gateway", cx),
            nat: m.opt("nat", cx),
            uplink: m.opt::<String>("uplink", cx).filter(|u| u != "auto"),
            dns: m.opt("dns", cx),
        }
    }

    /// Fields set here win over `base`.
    pub fn over(self, base: NetworkFields) -> NetworkFields {
        NetworkFields {
            bridge: self.bridge.or(base.bridge),
            subnet: self.subnet.or(base.subnet),
            gateway: self.gateway.or(base.gateway),
            nat: self.nat.or(base.nat),
            uplink: self.uplink.or(base.uplink),
            dns: self.dns.or(base.dns),
        }
    }
}

/// Controllers or workers: how many and how big.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeGroup {
    pub count: u32,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    /// Host names; `None` = `{prefix}{index}`.
    pub names: Option<Vec<String>>,
    pub prefix: String,
    /// Address of the first node; `None` = after the previous group.
    pub first_ip: Option<Ipv4Addr>,
}

const GROUP_FIELDS: &[&str] = &[
    "count",
    "vcpus",
    "memory_mib",
    "disk_gib",
    "names",
    "prefix",
    "first_ip",
];

impl NodeGroup {
    pub(crate) fn read(
        node: Option<&Node>,
        path: &str,
        cx: &mut Ctx,
        default_prefix: &str,
        default_memory: u64,
    ) -> NodeGroup {
        let mut g = NodeGroup {
            count: 1,
            vcpus: 1,
            memory_mib: default_memory,
            disk_gib: 10,
            names: None,
            prefix: default_prefix.to_string(),
            first_ip: None,
        };
        let Some(node) = node else {
            cx.error(
                cx.pos_of(""),
                path,
                format!("missing required section `{path}` (at least `count`)"),
            );
            return g;
        };
        let Some(mut m) = MapReader::new(node, path, cx, GROUP_FIELDS) else {
            return g;
        };
        let names: Option<Vec<String>> = m.opt("names", cx);
        let count: Option<u32> = m.opt("count", cx);
        match (count, &names) {
            (Some(c), _) => g.count = c,
            (None, Some(n)) => g.count = n.len() as u32,
            (None, None) => {
                // Only complain when the field is truly absent, not when it was malformed.
                if !cx.has_errors_at(&m.child_path("count")) {
                    cx.error(
                        m.pos,
                        &m.child_path("count"),
                        "missing required field `count`",
                    );
                }
            }
        }
        g.names = names;
        if let Some(v) = m.opt("vcpus", cx) {
            g.vcpus = v;
        }
        if let Some(v) = m.opt("memory_mib", cx) {
            g.memory_mib = v;
        }
        if let Some(v) = m.opt("disk_gib", cx) {
            g.disk_gib = v;
        }
        if let Some(v) = m.opt("prefix", cx) {
            g.prefix = v;
        }
        g.first_ip = m.opt("first_ip", cx);
        m.finish(cx);
        g
    }

    /// The host names of this group, in order.
    pub fn node_names(&self) -> Vec<String> {
        match &self.names {
            Some(n) => n.clone(),
            None => (0..self.count)
                .map(|i| format!("{}{i}", self.prefix))
                .collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadBalancer {
    pub name: String,
    pub address: Ipv4Addr,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cluster {
    /// Name used in kubeconfigs.
    pub name: String,
    /// cluster-cidr: split into one block per worker.
    pub pod_cidr: Ipv4Network,
    /// Prefix length of each worker's pod block.
    pub node_pod_prefix: u8,
    pub service_cidr: Ipv4Network,
    pub api_service_ip: Ipv4Addr,
    pub dns_service_ip: Ipv4Addr,
    pub domain: String,
}

/// Component versions installed on the nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Versions {
    pub kubernetes: String,
    pub etcd: String,
    pub containerd: String,
    pub runc: String,
    pub cni_plugins: String,
    pub crictl: String,
}

impl Default for Versions {
    fn default() -> Self {
        Versions {
            kubernetes: "1.32.3".into(),
            etcd: "3.5.21".into(),
            containerd: "2.0.4".into(),
            runc: "1.2.6".into(),
            cni_plugins: "1.6.2".into(),
            crictl: "1.32.0".into(),
        }
    }
}

pub(crate) const VERSION_FIELDS: &[&str] = &[
    "kubernetes",
    "etcd",
    "containerd",
    "runc",
    "cni_plugins",
    "crictl",
];

/// A whole scenario with its network profile resolved and defaults applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scenario {
    /// The lab's name: used in domain names, the nft table and the state dir.
    pub name: String,
    pub description: Option<String>,
    /// The network profile the scenario started from.
    pub network_profile: String,
    pub network: NetworkProfile,
    pub image: String,
    pub accelerator: Accelerator,
    pub ssh_user: String,
    pub key_algorithm: KeyAlgorithm,
    pub controllers: NodeGroup,
    pub workers: NodeGroup,
    pub load_balancer: LoadBalancer,
    pub cluster: Cluster,
    pub versions: Versions,
}

impl FromNode for NetworkFields {
    fn from_node(node: &Node, path: &str, cx: &mut Ctx) -> Option<Self> {
        let mut m = MapReader::new(node, path, cx, NETWORK_FIELDS)?;
        let f = NetworkFields::read(&mut m, cx);
        m.finish(cx);
        Some(f)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Controller,
    Worker,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Controller => "controller",
            Role::Worker => "worker",
        }
    }
}

/// A node's place in the lab before planning: name, role and address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSlot {
    pub name: String,
    pub role: Role,
    /// Field path of the name, e.g. `workers.names[1]` or `workers.prefix`.
    pub name_path: String,
    /// `None` when the address would run past 255.255.255.255.
    pub ip: Option<Ipv4Addr>,
    /// Index inside its group.
    pub index: u32,
}

impl Scenario {
    /// Every node in order (controllers first) with its address: controllers from
    /// `controllers.first_ip` (default: subnet + 10), workers right after them unless
    /// `workers.first_ip` says otherwise.
    pub fn node_slots(&self) -> Vec<NodeSlot> {
        let base = u32::from(self.network.subnet.network());
        let c_first = self
            .controllers
            .first_ip
            .map(u32::from)
            .unwrap_or(base.saturating_add(10));
        let w_first = self
            .workers
            .first_ip
            .map(u32::from)
            .unwrap_or(c_first.saturating_add(self.controllers.count));
        let mut out = Vec::new();
        for (group, role, first, path) in [
            (&self.controllers, Role::Controller, c_first, "controllers"),
            (&self.workers, Role::Worker, w_first, "workers"),
        ] {
            for (i, name) in group.node_names().into_iter().enumerate() {
                let name_path = if group.names.is_some() {
                    format!("{path}.names[{i}]")
                } else {
                    format!("{path}.prefix")
                };
                out.push(NodeSlot {
                    name,
                    role,
                    name_path,
                    ip: first.checked_add(i as u32).map(Ipv4Addr::from),
                    index: i as u32,
                });
            }
        }
        out
    }
}
