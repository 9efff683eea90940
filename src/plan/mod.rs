//! The lab plan: a pure function from a scenario to every name, address, MAC,
//! path and certificate subject the lab will have. Same input, byte-identical output.

mod certs;
pub mod table;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::scenario::{Accelerator, KeyAlgorithm, Role, Scenario, Versions};

pub use certs::{CertSpec, CertUsage};
pub use table::{render_table, rows_to_text};

/// Version of the plan's shape; bumped when fields change meaning.
pub const PLAN_FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabPlan {
    pub format: u32,
    pub lab: String,
    pub description: Option<String>,
    /// sha256 of the scenario text the plan came from.
    pub scenario_sha256: String,
    pub image: String,
    pub accelerator: Accelerator,
    pub ssh_user: String,
    pub key_algorithm: KeyAlgorithm,
    pub network: NetworkPlan,
    pub load_balancer: LbPlan,
    pub cluster: ClusterPlan,
    pub nodes: Vec<NodePlan>,
    pub certificates: Vec<CertSpec>,
    pub versions: Versions,
    pub paths: LabPaths,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkPlan {
    pub profile: String,
    pub bridge: String,
    pub subnet: Ipv4Network,
    pub gateway: Ipv4Addr,
    /// The gateway with the subnet's prefix, as set on the bridge.
    pub gateway_cidr: String,
    pub nat: bool,
    /// `None` = the host's default-route interface, found at create time.
    pub uplink: Option<String>,
    pub dns: Vec<Ipv4Addr>,
    /// Ownership marker written to the bridge's ifalias.
    pub bridge_alias: String,
    /// The nft table (family inet) that holds the lab's NAT and forward rules.
    pub nft_table: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LbPlan {
    pub name: String,
    pub address: Ipv4Addr,
    pub port: u16,
    /// `https://ADDRESS:PORT`, the API endpoint of every kubeconfig but the local ones.
    pub endpoint: String,
    /// Controller apiservers behind it, `IP:6443`.
    pub backends: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterPlan {
    pub name: String,
    pub pod_cidr: Ipv4Network,
    pub node_pod_prefix: u8,
    pub service_cidr: Ipv4Network,
    pub api_service_ip: Ipv4Addr,
    pub dns_service_ip: Ipv4Addr,
    pub domain: String,
    /// `https://IP:2379` of every controller.
    pub etcd_endpoints: Vec<String>,
    /// `NAME=https://IP:2380,...`, etcd's --initial-cluster.
    pub etcd_initial_cluster: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePlan {
    pub name: String,
    pub role: Role,
    /// Index within its role.
    pub index: u32,
    /// The libvirt domain name: `LAB-NAME`, unique across labs.
    pub domain: String,
    pub ip: Ipv4Addr,
    pub mac: String,
    /// The node's pod range (workers only).
    pub pod_cidr: Option<Ipv4Network>,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    pub disk_path: PathBuf,
    pub seed_path: PathBuf,
    pub console_log: PathBuf,
}

/// Where the lab keeps its files. Every on-disk name of a lab comes from here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabPaths {
    pub root: PathBuf,
    pub plan: PathBuf,
    pub journal: PathBuf,
    pub disks: PathBuf,
    pub seeds: PathBuf,
    pub console: PathBuf,
    pub pki: PathBuf,
    pub ssh: PathBuf,
    pub kubeconfigs: PathBuf,
    pub lb: PathBuf,
}

impl LabPaths {
    pub fn new(state_dir: &Path, lab: &str) -> LabPaths {
        let root = state_dir.join("labs").join(lab);
        LabPaths {
            plan: root.join("plan.json"),
            journal: root.join("journal.json"),
            disks: root.join("disks"),
            seeds: root.join("seeds"),
            console: root.join("console"),
            pki: root.join("pki"),
            ssh: root.join("ssh"),
            kubeconfigs: root.join("kubeconfigs"),
            lb: root.join("lb"),
            root,
        }
    }
}

/// Stable MAC under the QEMU/KVM prefix 52:54:00 from a hash of lab and node.
/// `salt` > 0 re-rolls the hash when two nodes of a lab would collide.
pub fn mac_for(lab: &str, node: &str, salt: u32) -> String {
    let mut h = Sha256::new();
    h.update(lab.as_bytes());
    h.update(b"/");
    h.update(node.as_bytes());
    if salt > 0 {
        h.update(salt.to_be_bytes());
    }
    let d = h.finalize();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", d[0], d[1], d[2])
}

/// The `i`-th block of `prefix` inside `net`.
pub fn nth_subnet(net: Ipv4Network, prefix: u8, i: u32) -> Option<Ipv4Network> {
    if prefix < net.prefix() || prefix > 32 {
        return None;
    }
    let count = 1u64 << (prefix - net.prefix());
    if i as u64 >= count {
        return None;
    }
    let size = 1u64 << (32 - prefix);
    let base = u32::from(net.network()) as u64 + i as u64 * size;
    Ipv4Network::new(Ipv4Addr::from(base as u32), prefix).ok()
}

/// Plan a validated scenario. `scenario_text` is hashed into the plan so a later run
/// can tell whether the scenario changed.
pub fn plan(s: &Scenario, scenario_text: &str, state_dir: &Path) -> LabPlan {
    let paths = LabPaths::new(state_dir, &s.name);
    let mut macs: Vec<String> = Vec::new();
    let mut nodes = Vec::new();
    for slot in s.node_slots() {
        let group = match slot.role {
            Role::Controller => &s.controllers,
            Role::Worker => &s.workers,
        };
        let mut salt = 0;
        let mut mac = mac_for(&s.name, &slot.name, salt);
        while macs.contains(&mac) {
            salt += 1;
            mac = mac_for(&s.name, &slot.name, salt);
        }
        macs.push(mac.clone());
        let pod_cidr = match slot.role {
            Role::Worker => nth_subnet(s.cluster.pod_cidr, s.cluster.node_pod_prefix, slot.index),
            Role::Controller => None,
        };
        nodes.push(NodePlan {
            domain: format!("{}-{}", s.name, slot.name),
            ip: slot.ip.expect("validated: every node has an address"),
            mac,
            pod_cidr,
            vcpus: group.vcpus,
            memory_mib: group.memory_mib,
            disk_gib: group.disk_gib,
            disk_path: paths.disks.join(format!("{}.qcow2", slot.name)),
            seed_path: paths.seeds.join(format!("{}-cidata.img", slot.name)),
            console_log: paths.console.join(format!("{}.log", slot.name)),
            name: slot.name,
            role: slot.role,
            index: slot.index,
        });
    }
    let controllers: Vec<&NodePlan> = nodes
        .iter()
        .filter(|n| n.role == Role::Controller)
        .collect();
    let n = &s.network;
    let network = NetworkPlan {
        profile: s.network_profile.clone(),
        bridge: n.bridge.clone(),
        subnet: n.subnet,
        gateway: n.gateway,
        gateway_cidr: format!("{}/{}", n.gateway, n.subnet.prefix()),
        nat: n.nat,
        uplink: n.uplink.clone(),
        dns: if n.dns.is_empty() {
            vec![n.gateway]
        } else {
            n.dns.clone()
        },
        bridge_alias: format!("kthw-lab:{}", s.name),
        nft_table: format!("kthw_{}", s.name.replace('-', "_")),
    };
    let lb = &s.load_balancer;
    let load_balancer = LbPlan {
        name: lb.name.clone(),
        address: lb.address,
        port: lb.port,
        endpoint: format!("https://{}:{}", lb.address, lb.port),
        backends: controllers
            .iter()
            .map(|c| format!("{}:6443", c.ip))
            .collect(),
    };
    let c = &s.cluster;
    let cluster = ClusterPlan {
        name: c.name.clone(),
        pod_cidr: c.pod_cidr,
        node_pod_prefix: c.node_pod_prefix,
        service_cidr: c.service_cidr,
        api_service_ip: c.api_service_ip,
        dns_service_ip: c.dns_service_ip,
        domain: c.domain.clone(),
        etcd_endpoints: controllers
            .iter()
            .map(|c| format!("https://{}:2379", c.ip))
            .collect(),
        etcd_initial_cluster: controllers
            .iter()
            .map(|c| format!("{}=https://{}:2380", c.name, c.ip))
            .collect::<Vec<_>>()
            .join(","),
    };
    let certificates = certs::plan_certs(&nodes, &load_balancer, &cluster);
    LabPlan {
        format: PLAN_FORMAT,
        lab: s.name.clone(),
        description: s.description.clone(),
        scenario_sha256: hex::encode(Sha256::digest(scenario_text.as_bytes())),
        image: s.image.clone(),
        accelerator: s.accelerator,
        ssh_user: s.ssh_user.clone(),
        key_algorithm: s.key_algorithm,
        network,
        load_balancer,
        cluster,
        nodes,
        certificates,
        versions: s.versions.clone(),
        paths,
    }
}

impl LabPlan {
    pub fn node(&self, name: &str) -> Option<&NodePlan> {
        self.nodes.iter().find(|n| n.name == name)
    }

    pub fn controllers(&self) -> impl Iterator<Item = &NodePlan> {
        self.nodes.iter().filter(|n| n.role == Role::Controller)
    }

    pub fn workers(&self) -> impl Iterator<Item = &NodePlan> {
        self.nodes.iter().filter(|n| n.role == Role::Worker)
    }

    /// Canonical JSON: the form saved in the state dir and printed by `plan --output json`.
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("plan serializes");
        s.push('\n');
        s
    }
}
