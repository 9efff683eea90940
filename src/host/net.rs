//! Host networking of a lab: the bridge, its addresses, IP forwarding and the
//! host routes to the nodes' pod ranges (links, addresses and routes go through
//! rtnetlink; NAT and forwarding rules live in [`super::nat`]).
//!
//! Ownership: the lab's bridge carries the ifalias `kthw-lab:<lab>` and every rule
//! of the lab's nft table carries that marker as its comment. Teardown finds what
//! it removes by those markers, so it works on half-built labs and without a plan.
//!
//! The public API is synchronous: every call builds a small current-thread tokio
//! runtime. Do not call it from inside an async context.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use ipnetwork::Ipv4Network;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteType,
};
use netlink_packet_route::AddressFamily;
use rtnetlink::{Handle, LinkBridge, LinkUnspec, RouteMessageBuilder};
use serde::{Deserialize, Serialize};

use crate::plan::LabPlan;

use super::nat;

/// The ownership marker of a lab: the bridge's ifalias and the nft rules' comment.
pub fn owner_marker(lab: &str) -> String {
    format!("kthw-lab:{lab}")
}

/// The lab's file that remembers who needs `net.ipv4.ip_forward`.
pub fn ip_forward_record_path(state_dir: &Path) -> PathBuf {
    state_dir.join("host").join("ip_forward.json")
}

/// Written just before the lab creates its bridge and removed once the bridge
/// carries the lab's ifalias. The kernel ignores IFLA_IFALIAS in the creating
/// request, so the alias takes a second one; a crash (SIGKILL) between the two leaves
/// an unmarked bridge, which this record (holding the bridge's name) lets the next
/// `ensure_network` adopt and `remove_network` delete. A bridge that was there before
/// the lab never gets a record, so it is never taken.
pub fn pending_bridge_path(state_dir: &Path, lab: &str) -> PathBuf {
    crate::plan::LabPaths::new(state_dir, lab)
        .root
        .join("network.pending-bridge")
}

/// The bridge a crashed creation left unmarked, if the record names one.
fn read_pending_bridge(path: &Path) -> Result<Option<String>, NetError> {
    match fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => Ok(Some(s.trim().to_string())),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(NetError::State {
            op: "read",
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn write_pending_bridge(path: &Path, bridge: &str) -> Result<(), NetError> {
    let st = |op: &'static str| {
        let path = path.to_path_buf();
        move |source| NetError::State { op, path, source }
    };
    fs::create_dir_all(path.parent().expect("record has a parent"))
        .map_err(st("create the directory of"))?;
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        // Private like everything under a lab's dir.
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(st("write"))?;
        f.write_all(bridge.as_bytes()).map_err(st("write"))?;
        f.sync_all().map_err(st("write"))?;
    }
    fs::rename(&tmp, path).map_err(st("replace"))
}

fn clear_pending_bridge(path: &Path) -> Result<(), NetError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(NetError::State {
            op: "remove",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// A bridge named `name` without any ifalias: what a crashed creation leaves.
fn is_unmarked_bridge(l: &LinkLite, name: &str) -> bool {
    l.name == name && l.kind.as_deref() == Some("bridge") && l.alias.is_none()
}

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
const RT_TABLE_LOCAL: u32 = 255;

// ---------------------------------------------------------------------------
// Domain types

/// A host route to a node's pod range via the node's address (flannel host-gw,
/// host side).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PodRoute {
    pub cidr: Ipv4Network,
    pub via: Ipv4Addr,
}

/// What the host network of one lab must look like.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSpec {
    pub lab: String,
    pub bridge: String,
    /// Ownership marker written to the bridge's ifalias, `kthw-lab:<lab>`.
    pub bridge_alias: String,
    /// The lab's nft table (family inet).
    pub nft_table: String,
    pub subnet: Ipv4Network,
    pub gateway: Ipv4Addr,
    pub nat: bool,
    /// `None`: the interface of the host's default route, if there is one.
    pub uplink: Option<String>,
    /// More addresses for the bridge besides the gateway (the API load balancer's /32).
    pub extra_addresses: Vec<Ipv4Network>,
    pub pod_routes: Vec<PodRoute>,
}

impl NetworkSpec {
    pub fn from_plan(plan: &LabPlan) -> NetworkSpec {
        let n = &plan.network;
        let mut extra_addresses = Vec::new();
        if plan.load_balancer.address != n.gateway {
            extra_addresses.push(
                Ipv4Network::new(plan.load_balancer.address, 32).expect("/32 is a valid prefix"),
            );
        }
        let pod_routes = plan
            .nodes
            .iter()
            .filter_map(|node| node.pod_cidr.map(|cidr| PodRoute { cidr, via: node.ip }))
            .collect();
        NetworkSpec {
            lab: plan.lab.clone(),
            bridge: n.bridge.clone(),
            bridge_alias: n.bridge_alias.clone(),
            nft_table: n.nft_table.clone(),
            subnet: n.subnet,
            gateway: n.gateway,
            nat: n.nat,
            uplink: n.uplink.clone(),
            extra_addresses,
            pod_routes,
        }
    }

    /// The gateway with the subnet's prefix, as set on the bridge.
    pub fn gateway_cidr(&self) -> Ipv4Network {
        Ipv4Network::new(self.gateway, self.subnet.prefix()).expect("prefix of a valid subnet")
    }

    /// Every IPv4 address the bridge must carry.
    pub fn bridge_addresses(&self) -> Vec<Ipv4Network> {
        let mut v = vec![self.gateway_cidr()];
        for a in &self.extra_addresses {
            if !v.contains(a) {
                v.push(*a);
            }
        }
        v
    }

    /// Catch specs that cannot work before touching anything.
    pub fn validate(&self) -> Result<(), NetError> {
        let bad = |what: String| Err(NetError::InvalidSpec { what });
        if self.bridge.is_empty() || self.bridge.len() > 15 || self.bridge.contains('/') {
            return bad(format!(
                "bridge name `{}` must have 1 to 15 bytes and no `/`",
                self.bridge
            ));
        }
        if !self.subnet.contains(self.gateway)
            || self.gateway == self.subnet.network()
            || self.gateway == self.subnet.broadcast()
        {
            return bad(format!(
                "gateway {} is not a host address of subnet {}",
                self.gateway, self.subnet
            ));
        }
        if self.bridge_alias.split_whitespace().count() != 1 {
            return bad(format!(
                "ownership marker `{}` must be one word",
                self.bridge_alias
            ));
        }
        let table_ok = !self.nft_table.is_empty()
            && self.nft_table.len() <= 64
            && self
                .nft_table
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !table_ok {
            return bad(format!(
                "nft table name `{}` must have 1 to 64 letters, digits or `_`",
                self.nft_table
            ));
        }
        for r in &self.pod_routes {
            if !self.subnet.contains(r.via) {
                return bad(format!(
                    "pod route {} goes via {}, outside subnet {}",
                    r.cidr, r.via, self.subnet
                ));
            }
        }
        if let Some(u) = &self.uplink {
            if u == &self.bridge {
                return bad(format!("uplink {u} is the lab's own bridge"));
            }
        }
        Ok(())
    }
}

/// What `ensure_network` changed. Empty (see [`NetworkReport::changed`]) on a re-run
/// against an unchanged host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NetworkReport {
    pub bridge_created: bool,
    pub bridge_set_up: bool,
    pub addresses_added: Vec<Ipv4Network>,
    pub addresses_removed: Vec<Ipv4Network>,
    pub routes: RouteReport,
    /// The nft table was (re)written.
    pub nft_table_written: bool,
    /// The lab turned `net.ipv4.ip_forward` on.
    pub ip_forward_enabled: bool,
    /// The interface masquerade is restricted to.
    pub uplink: Option<String>,
    /// Things that may break the lab but are not ours to change.
    pub warnings: Vec<String>,
}

impl NetworkReport {
    pub fn changed(&self) -> bool {
        self.bridge_created
            || self.bridge_set_up
            || !self.addresses_added.is_empty()
            || !self.addresses_removed.is_empty()
            || self.routes.changed()
            || self.nft_table_written
            || self.ip_forward_enabled
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RouteReport {
    pub added: Vec<PodRoute>,
    /// Routes on the lab's bridge that the spec no longer has, or had another gateway.
    pub removed: Vec<PodRoute>,
}

impl RouteReport {
    pub fn changed(&self) -> bool {
        !self.added.is_empty() || !self.removed.is_empty()
    }
}

/// What `remove_network` removed. Empty when everything was already gone.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RemovalReport {
    pub bridges_removed: Vec<String>,
    /// Routes that went away with the bridges.
    pub routes_removed: Vec<PodRoute>,
    pub tables_removed: Vec<String>,
    /// `net.ipv4.ip_forward` was set back to 0 (the lab turned it on, no lab needs it).
    pub ip_forward_restored: bool,
}

/// What a lab owns on the host right now, found by its markers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NetworkState {
    pub bridges: Vec<BridgeState>,
    pub tables: Vec<String>,
    pub ip_forward: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BridgeState {
    pub name: String,
    pub index: u32,
    pub up: bool,
    pub addresses: Vec<Ipv4Network>,
    pub routes: Vec<PodRoute>,
}

// ---------------------------------------------------------------------------
// Errors

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("invalid network spec: {what}")]
    InvalidSpec { what: String },
    #[error("cannot open a netlink socket")]
    Connect(#[source] io::Error),
    #[error("cannot {op} {resource} (netlink)")]
    Netlink {
        op: &'static str,
        resource: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("bridge {bridge} exists and is not owned by lab {lab} ({found})")]
    BridgeNotOwned {
        bridge: String,
        lab: String,
        found: String,
    },
    #[error("nft table inet {table} exists and is not owned by lab {lab}")]
    TableNotOwned { table: String, lab: String },
    #[error("subnet {subnet} overlaps host route {route} on {dev}")]
    SubnetOverlap {
        subnet: Ipv4Network,
        route: Ipv4Network,
        dev: String,
    },
    #[error("bridge {bridge} of lab {lab} does not exist")]
    BridgeMissing { bridge: String, lab: String },
    #[error("uplink {uplink} does not exist")]
    UplinkMissing { uplink: String },
    #[error("pod route {cidr} already exists on {dev}, not on the lab's bridge {bridge}")]
    RouteConflict {
        cidr: Ipv4Network,
        dev: String,
        bridge: String,
    },
    #[error("nft could not list the ruleset: {detail}")]
    NftList { detail: String },
    #[error("nft could not {op} table inet {table}: {detail}")]
    Nft {
        op: &'static str,
        table: String,
        detail: String,
    },
    #[error("cannot {op} {path}")]
    Sysctl {
        op: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot {op} ip_forward record {path}")]
    State {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the netlink runtime")]
    Runtime(#[source] io::Error),
}

impl NetError {
    /// What the user can do about it.
    pub fn hint(&self) -> String {
        match self {
            NetError::InvalidSpec { .. } => {
                "fix the network profile the scenario refers to".to_string()
            }
            NetError::Connect(_) | NetError::Runtime(_) => {
                "run kthw-lab as root (CAP_NET_ADMIN is needed for host networking)".to_string()
            }
            NetError::Netlink { source, .. } => match netlink_errno(source) {
                Some(libc::EPERM) | Some(libc::EACCES) => {
                    "run kthw-lab as root (CAP_NET_ADMIN is needed for host networking)".to_string()
                }
                _ => "check `ip -d link`, `ip addr` and `ip route` for a conflicting setup"
                    .to_string(),
            },
            NetError::BridgeNotOwned { bridge, lab, .. } => format!(
                "bridge {bridge} exists and is not owned by lab {lab}: choose another bridge in \
                 the network profile, or remove it with `ip link del {bridge}` if it is a leftover"
            ),
            NetError::TableNotOwned { table, lab } => format!(
                "nft table inet {table} exists and does not carry lab {lab}'s marker: remove it \
                 with `nft delete table inet {table}` if it is a leftover, or rename the lab"
            ),
            NetError::SubnetOverlap { route, dev, .. } => format!(
                "the lab's subnet collides with {route} on {dev}: choose a free subnet in the \
                 network profile (see `ip -4 route show table all`)"
            ),
            NetError::BridgeMissing { .. } => {
                "create the lab's network first (the `network` phase of `kthw-lab create`)"
                    .to_string()
            }
            NetError::UplinkMissing { uplink } => format!(
                "set `uplink` in the network profile to an existing interface (see `ip link`), \
                 or to `auto` for the default route's interface; {uplink} is not one"
            ),
            NetError::RouteConflict { cidr, dev, .. } => format!(
                "another interface already routes {cidr}: remove it with `ip route del {cidr} \
                 dev {dev}` if it is a leftover, or choose another cluster pod CIDR"
            ),
            NetError::NftList { .. } => {
                "check that nftables is installed and works: run `nft list ruleset` as root"
                    .to_string()
            }
            NetError::Nft { table, .. } => format!(
                "check that nftables is available (`nft list ruleset`) and run as root; inspect \
                 with `nft list table inet {table}`"
            ),
            NetError::Sysctl { .. } => {
                "run as root; net.ipv4.ip_forward must be writable (not a read-only /proc/sys)"
                    .to_string()
            }
            NetError::State { path, .. } => format!(
                "check that the state dir is writable; delete {} if it is corrupt",
                path.display()
            ),
        }
    }
}

fn netlink_errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

fn nl_err(
    op: &'static str,
    resource: impl Into<String>,
) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let resource = resource.into();
    move |source| NetError::Netlink {
        op,
        resource,
        source,
    }
}

// ---------------------------------------------------------------------------
// The seam

/// Host networking in domain terms.
pub trait NetHost {
    /// Bridge, addresses, ip_forward, the lab's nft table and the pod routes.
    /// Idempotent: a re-run against an unchanged host changes nothing.
    fn ensure_network(&self, spec: &NetworkSpec) -> Result<NetworkReport, NetError>;
    /// Only the pod routes (the `routes` phase), on the lab's existing bridge.
    fn ensure_pod_routes(&self, spec: &NetworkSpec) -> Result<RouteReport, NetError>;
    /// Remove what carries the lab's markers. Succeeds when it is already gone.
    fn remove_network(&self, lab: &str) -> Result<RemovalReport, NetError>;
    /// What the lab owns now.
    fn observe(&self, lab: &str) -> Result<NetworkState, NetError>;
    /// Err when `subnet` overlaps a route that is not on `own_bridge`.
    fn check_subnet_free(
        &self,
        subnet: Ipv4Network,
        own_bridge: Option<&str>,
    ) -> Result<(), NetError>;
    /// The interface of the main table's default route.
    fn default_route_uplink(&self) -> Result<Option<String>, NetError>;
}

/// The real host: rtnetlink, `nft -j`, /proc/sys. `state_dir` holds the ip_forward
/// record shared by every lab of the host.
#[derive(Debug, Clone)]
pub struct LinuxNet {
    state_dir: PathBuf,
}

impl LinuxNet {
    pub fn new(state_dir: impl Into<PathBuf>) -> LinuxNet {
        LinuxNet {
            state_dir: state_dir.into(),
        }
    }

    /// Runs `f` with a fresh netlink connection on a private current-thread runtime.
    /// Called from inside a tokio runtime (where a nested runtime would panic), it
    /// runs on a helper thread, which inherits the caller's network namespace.
    fn run<T: Send>(
        &self,
        f: impl AsyncFnOnce(&Nl) -> Result<T, NetError> + Send,
    ) -> Result<T, NetError> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return std::thread::scope(|s| {
                s.spawn(|| Self::run_here(f))
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p))
            });
        }
        Self::run_here(f)
    }

    fn run_here<T>(f: impl AsyncFnOnce(&Nl) -> Result<T, NetError>) -> Result<T, NetError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(NetError::Runtime)?;
        rt.block_on(async {
            let (conn, handle, _) = rtnetlink::new_connection().map_err(NetError::Connect)?;
            let task = tokio::spawn(conn);
            let out = f(&Nl { handle }).await;
            task.abort();
            out
        })
    }
}

/// Preflight helper: Err when `subnet` overlaps any route of the host that is not on
/// `own_bridge` (default routes excepted).
pub fn check_subnet_free(subnet: Ipv4Network, own_bridge: Option<&str>) -> Result<(), NetError> {
    LinuxNet::new(PathBuf::new()).check_subnet_free(subnet, own_bridge)
}

/// Preflight helper: the interface of the host's default route, if any.
pub fn default_route_uplink() -> Option<String> {
    LinuxNet::new(PathBuf::new())
        .default_route_uplink()
        .ok()
        .flatten()
}

impl NetHost for LinuxNet {
    fn ensure_network(&self, spec: &NetworkSpec) -> Result<NetworkReport, NetError> {
        spec.validate()?;
        // Refusals come before any change: they must not leave a bridge behind.
        nat::check_table_owner(&spec.nft_table, &spec.bridge_alias, &spec.lab)?;
        if let Some(u) = &spec.uplink {
            let exists = self.run(async |nl| Ok(nl.links().await?.iter().any(|l| &l.name == u)))?;
            if !exists {
                return Err(NetError::UplinkMissing { uplink: u.clone() });
            }
        }
        let pending = pending_bridge_path(&self.state_dir, &spec.lab);
        let (mut report, bridge) = self.run(async |nl| ensure_bridge(nl, spec, &pending).await)?;

        let forward = ForwardRecord::acquire(&self.state_dir, &spec.lab)?;
        report.ip_forward_enabled = forward;

        let uplink = match &spec.uplink {
            Some(u) => Some(u.clone()),
            None => self.default_route_uplink()?,
        };
        // A default route out of our own bridge is no uplink.
        let uplink = uplink.filter(|u| u != &spec.bridge);
        if spec.nat && uplink.is_none() {
            report.warnings.push(format!(
                "no uplink found (no default route): masquerade applies to every interface \
                 but {}",
                spec.bridge
            ));
        }
        report.uplink = uplink.clone();
        let rules = nat::LabRules {
            lab: spec.lab.clone(),
            marker: spec.bridge_alias.clone(),
            table: spec.nft_table.clone(),
            bridge: spec.bridge.clone(),
            subnet: spec.subnet,
            nat: spec.nat,
            uplink,
        };
        report.nft_table_written = nat::ensure_table(&rules)?;
        report
            .warnings
            .extend(nat::foreign_forward_drop_warnings(&spec.nft_table)?);

        report.routes = self.run(async |nl| ensure_routes(nl, spec, bridge).await)?;
        Ok(report)
    }

    fn ensure_pod_routes(&self, spec: &NetworkSpec) -> Result<RouteReport, NetError> {
        spec.validate()?;
        self.run(async |nl| {
            let link = owned_bridge(nl, spec).await?;
            ensure_routes(nl, spec, link.index).await
        })
    }

    fn remove_network(&self, lab: &str) -> Result<RemovalReport, NetError> {
        let marker = owner_marker(lab);
        // Each step finds its targets by marker, so a failure part-way leaves a state
        // that the next run finishes.
        let tables_removed = nat::remove_tables(&marker)?;
        let pending_path = pending_bridge_path(&self.state_dir, lab);
        let pending = read_pending_bridge(&pending_path)?;
        let (bridges_removed, routes_removed) = self.run(async |nl| {
            let mut names = Vec::new();
            let mut routes = Vec::new();
            let links = nl.links().await?;
            let all_routes = nl.routes_v4().await?;
            // Only bridges: the marker is only ever written on a bridge the lab made;
            // and the unmarked one a crashed creation left, named by the record.
            let owned = links.iter().filter(|l| {
                (l.alias.as_deref() == Some(&marker) && l.kind.as_deref() == Some("bridge"))
                    || pending.as_deref().is_some_and(|p| is_unmarked_bridge(l, p))
            });
            for l in owned {
                routes.extend(pod_routes_on(&all_routes, l.index));
                match nl.del_link(l.index).await {
                    Ok(()) => names.push(l.name.clone()),
                    Err(e) if netlink_errno(&e) == Some(libc::ENODEV) => {}
                    Err(e) => return Err(nl_err("delete", format!("bridge {}", l.name))(e)),
                }
            }
            Ok((names, routes))
        })?;
        clear_pending_bridge(&pending_path)?;
        Ok(RemovalReport {
            bridges_removed,
            routes_removed,
            tables_removed,
            ip_forward_restored: ForwardRecord::release(&self.state_dir, lab)?,
        })
    }

    fn observe(&self, lab: &str) -> Result<NetworkState, NetError> {
        let marker = owner_marker(lab);
        let pending = read_pending_bridge(&pending_bridge_path(&self.state_dir, lab))?;
        let bridges = self.run(async |nl| {
            let links = nl.links().await?;
            let routes = nl.routes_v4().await?;
            let mut out = Vec::new();
            for l in links.into_iter().filter(|l| {
                (l.alias.as_deref() == Some(&marker) && l.kind.as_deref() == Some("bridge"))
                    || pending.as_deref().is_some_and(|p| is_unmarked_bridge(l, p))
            }) {
                let addresses = nl
                    .addrs_v4(l.index)
                    .await?
                    .into_iter()
                    .map(|(n, _)| n)
                    .collect();
                out.push(BridgeState {
                    routes: pod_routes_on(&routes, l.index),
                    name: l.name,
                    index: l.index,
                    up: l.up,
                    addresses,
                });
            }
            Ok(out)
        })?;
        Ok(NetworkState {
            bridges,
            tables: nat::owned_tables(&marker)?,
            ip_forward: read_ip_forward()?,
        })
    }

    fn check_subnet_free(
        &self,
        subnet: Ipv4Network,
        own_bridge: Option<&str>,
    ) -> Result<(), NetError> {
        self.run(async |nl| {
            let links = nl.links().await?;
            let own = own_bridge.and_then(|b| links.iter().find(|l| l.name == b).map(|l| l.index));
            let routes = nl.routes_v4().await?;
            match first_overlap(subnet, &routes, own) {
                None => Ok(()),
                Some(r) => Err(NetError::SubnetOverlap {
                    subnet,
                    route: r.dst,
                    dev: link_name(&links, r.oif),
                }),
            }
        })
    }

    fn default_route_uplink(&self) -> Result<Option<String>, NetError> {
        self.run(async |nl| {
            let routes = nl.routes_v4().await?;
            let Some(oif) = routes
                .iter()
                .filter(|r| r.dst.prefix() == 0 && r.table == u32::from(RouteHeader::RT_TABLE_MAIN))
                .filter(|r| r.kind == RouteType::Unicast)
                .min_by_key(|r| r.priority)
                .and_then(|r| r.oif)
            else {
                return Ok(None);
            };
            let links = nl.links().await?;
            Ok(links.into_iter().find(|l| l.index == oif).map(|l| l.name))
        })
    }
}

// ---------------------------------------------------------------------------
// Steps

async fn owned_bridge(nl: &Nl, spec: &NetworkSpec) -> Result<LinkLite, NetError> {
    let links = nl.links().await?;
    match links.into_iter().find(|l| l.name == spec.bridge) {
        Some(l) => {
            check_bridge_owner(&l, spec)?;
            Ok(l)
        }
        None => Err(NetError::BridgeMissing {
            bridge: spec.bridge.clone(),
            lab: spec.lab.clone(),
        }),
    }
}

async fn set_bridge_alias(nl: &Nl, index: u32, spec: &NetworkSpec) -> Result<(), NetError> {
    nl.handle
        .link()
        .change(
            LinkUnspec::new_with_index(index)
                .alias(spec.bridge_alias.clone())
                .build(),
        )
        .execute()
        .await
        .map_err(nl_err(
            "set the ifalias of",
            format!("bridge {}", spec.bridge),
        ))
}

fn check_bridge_owner(l: &LinkLite, spec: &NetworkSpec) -> Result<(), NetError> {
    let is_bridge = l.kind.as_deref() == Some("bridge");
    if is_bridge && l.alias.as_deref() == Some(spec.bridge_alias.as_str()) {
        return Ok(());
    }
    let found = match (&l.kind, &l.alias) {
        (k, _) if !is_bridge => format!("it is a {} link", k.as_deref().unwrap_or("non-bridge")),
        (_, None) => "it has no ifalias".to_string(),
        (_, Some(a)) => format!("its ifalias is `{a}`"),
    };
    Err(NetError::BridgeNotOwned {
        bridge: spec.bridge.clone(),
        lab: spec.lab.clone(),
        found,
    })
}

async fn ensure_bridge(
    nl: &Nl,
    spec: &NetworkSpec,
    pending: &Path,
) -> Result<(NetworkReport, u32), NetError> {
    let mut report = NetworkReport::default();
    let links = nl.links().await?;
    let mut existing = links.iter().find(|l| l.name == spec.bridge).cloned();
    let routes = nl.routes_v4().await?;
    let own_index = existing.as_ref().map(|l| l.index);
    if let Some(l) = &mut existing {
        let ours_unmarked = is_unmarked_bridge(l, &spec.bridge)
            && read_pending_bridge(pending)?.as_deref() == Some(spec.bridge.as_str());
        if ours_unmarked {
            // Our own creation, cut off before the alias was set: finish it.
            set_bridge_alias(nl, l.index, spec).await?;
            l.alias = Some(spec.bridge_alias.clone());
        }
        check_bridge_owner(l, spec)?;
        clear_pending_bridge(pending)?;
    }
    if let Some(r) = first_overlap(spec.subnet, &routes, own_index) {
        return Err(NetError::SubnetOverlap {
            subnet: spec.subnet,
            route: r.dst,
            dev: link_name(&links, r.oif),
        });
    }
    let link = match existing {
        Some(l) => l,
        None => {
            // Recorded first: the alias is only set by a second request (below).
            write_pending_bridge(pending, &spec.bridge)?;
            nl.handle
                .link()
                .add(
                    LinkBridge::new(&spec.bridge)
                        .alias(spec.bridge_alias.clone())
                        .build(),
                )
                .execute()
                .await
                .map_err(nl_err("create", format!("bridge {}", spec.bridge)))?;
            report.bridge_created = true;
            let links = nl.links().await?;
            let l = links
                .into_iter()
                .find(|l| l.name == spec.bridge)
                .ok_or_else(|| NetError::Netlink {
                    op: "find the new",
                    resource: format!("bridge {}", spec.bridge),
                    source: rtnetlink::Error::RequestFailed,
                })?;
            if l.alias.as_deref() != Some(spec.bridge_alias.as_str()) {
                // Kernels ignore IFLA_IFALIAS on creation (6.x does): set it now.
                set_bridge_alias(nl, l.index, spec).await?;
            }
            clear_pending_bridge(pending)?;
            l
        }
    };
    if !link.up {
        nl.handle
            .link()
            .change(LinkUnspec::new_with_index(link.index).up().build())
            .execute()
            .await
            .map_err(nl_err("set up", format!("bridge {}", spec.bridge)))?;
        // A freshly created bridge already comes up (LinkBridge::new sets IFF_UP).
        report.bridge_set_up = !report.bridge_created;
    }

    let want = spec.bridge_addresses();
    let have = nl.addrs_v4(link.index).await?;
    for (net, msg) in &have {
        if !want.contains(net) {
            nl.handle
                .address()
                .del(msg.clone())
                .execute()
                .await
                .map_err(nl_err(
                    "delete",
                    format!("address {net} from bridge {}", spec.bridge),
                ))?;
            report.addresses_removed.push(*net);
        }
    }
    for net in &want {
        if !have.iter().any(|(h, _)| h == net) {
            nl.handle
                .address()
                .add(link.index, net.ip().into(), net.prefix())
                .execute()
                .await
                .map_err(nl_err(
                    "add",
                    format!("address {net} to bridge {}", spec.bridge),
                ))?;
            report.addresses_added.push(*net);
        }
    }
    Ok((report, link.index))
}

async fn ensure_routes(nl: &Nl, spec: &NetworkSpec, bridge: u32) -> Result<RouteReport, NetError> {
    let mut report = RouteReport::default();
    let links = nl.links().await?;
    let routes = nl.routes_v4().await?;
    let main = u32::from(RouteHeader::RT_TABLE_MAIN);
    // Stale routes on our bridge: gateway routes the spec does not have.
    for r in routes
        .iter()
        .filter(|r| r.table == main && r.oif == Some(bridge) && r.gateway.is_some())
    {
        let pr = PodRoute {
            cidr: r.dst,
            via: r.gateway.expect("filtered"),
        };
        if !spec.pod_routes.contains(&pr) {
            nl.handle
                .route()
                .del(r.msg.clone())
                .execute()
                .await
                .map_err(nl_err(
                    "delete",
                    format!("route {} via {}", pr.cidr, pr.via),
                ))?;
            report.removed.push(pr);
        }
    }
    for pr in &spec.pod_routes {
        let same_dst: Vec<&RouteLite> = routes
            .iter()
            .filter(|r| r.table == main && r.dst == pr.cidr && r.kind == RouteType::Unicast)
            .collect();
        if same_dst
            .iter()
            .any(|r| r.oif == Some(bridge) && r.gateway == Some(pr.via))
        {
            continue;
        }
        if let Some(r) = same_dst.iter().find(|r| r.oif != Some(bridge)) {
            return Err(NetError::RouteConflict {
                cidr: pr.cidr,
                dev: link_name(&links, r.oif),
                bridge: spec.bridge.clone(),
            });
        }
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(pr.cidr.network(), pr.cidr.prefix())
            .gateway(pr.via)
            .output_interface(bridge)
            .build();
        nl.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(nl_err("add", format!("route {} via {}", pr.cidr, pr.via)))?;
        report.added.push(*pr);
    }
    Ok(report)
}

fn pod_routes_on(routes: &[RouteLite], index: u32) -> Vec<PodRoute> {
    routes
        .iter()
        .filter(|r| r.oif == Some(index) && r.table == u32::from(RouteHeader::RT_TABLE_MAIN))
        .filter_map(|r| r.gateway.map(|via| PodRoute { cidr: r.dst, via }))
        .collect()
}

/// The first route that overlaps `subnet`, ignoring default routes, the local
/// table, non-unicast routes and routes on `own` (the lab's own bridge).
fn first_overlap(
    subnet: Ipv4Network,
    routes: &[RouteLite],
    own: Option<u32>,
) -> Option<&RouteLite> {
    routes.iter().find(|r| {
        r.dst.prefix() > 0
            && r.table != RT_TABLE_LOCAL
            && r.kind == RouteType::Unicast
            && (own.is_none() || r.oif != own)
            && overlaps(subnet, r.dst)
    })
}

pub(crate) fn overlaps(a: Ipv4Network, b: Ipv4Network) -> bool {
    a.contains(b.network()) || b.contains(a.network())
}

fn link_name(links: &[LinkLite], oif: Option<u32>) -> String {
    oif.and_then(|i| links.iter().find(|l| l.index == i))
        .map(|l| l.name.clone())
        .unwrap_or_else(|| "no device".to_string())
}

// ---------------------------------------------------------------------------
// Thin netlink layer

#[derive(Debug, Clone)]
struct LinkLite {
    index: u32,
    name: String,
    alias: Option<String>,
    kind: Option<String>,
    up: bool,
}

#[derive(Debug, Clone)]
struct RouteLite {
    dst: Ipv4Network,
    gateway: Option<Ipv4Addr>,
    oif: Option<u32>,
    table: u32,
    kind: RouteType,
    priority: u32,
    msg: RouteMessage,
}

struct Nl {
    handle: Handle,
}

impl Nl {
    async fn links(&self) -> Result<Vec<LinkLite>, NetError> {
        let msgs: Vec<_> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl_err("list", "links"))?;
        Ok(msgs
            .into_iter()
            .map(|m| {
                let mut l = LinkLite {
                    index: m.header.index,
                    name: String::new(),
                    alias: None,
                    kind: None,
                    up: m.header.flags.contains(LinkFlags::Up),
                };
                for a in m.attributes {
                    match a {
                        LinkAttribute::IfName(n) => l.name = n,
                        LinkAttribute::IfAlias(s) => l.alias = Some(s),
                        LinkAttribute::LinkInfo(infos) => {
                            for i in infos {
                                if let LinkInfo::Kind(k) = i {
                                    l.kind = Some(match k {
                                        InfoKind::Bridge => "bridge".to_string(),
                                        other => other.to_string(),
                                    });
                                }
                            }
                        }
                        _ => {}
                    }
                }
                l
            })
            .collect())
    }

    async fn addrs_v4(&self, index: u32) -> Result<Vec<(Ipv4Network, AddressMessage)>, NetError> {
        let msgs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(nl_err("list", format!("addresses of link {index}")))?;
        Ok(msgs
            .into_iter()
            .filter(|m| m.header.family == AddressFamily::Inet)
            .filter_map(|m| {
                let ip = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(std::net::IpAddr::V4(ip)) => Some(*ip),
                    _ => None,
                });
                let ip = ip.or_else(|| {
                    m.attributes.iter().find_map(|a| match a {
                        AddressAttribute::Address(std::net::IpAddr::V4(ip)) => Some(*ip),
                        _ => None,
                    })
                })?;
                let net = Ipv4Network::new(ip, m.header.prefix_len).ok()?;
                Some((net, m))
            })
            .collect())
    }

    async fn routes_v4(&self) -> Result<Vec<RouteLite>, NetError> {
        // Without NETLINK_GET_STRICT_CHK the kernel dumps every table.
        let msgs: Vec<RouteMessage> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(nl_err("list", "routes"))?;
        Ok(msgs
            .into_iter()
            .filter(|m| m.header.address_family == AddressFamily::Inet)
            .map(|m| {
                let mut dst = Ipv4Addr::UNSPECIFIED;
                let mut gateway = None;
                let mut oif = None;
                let mut priority = 0;
                let mut table = u32::from(m.header.table);
                for a in &m.attributes {
                    match a {
                        RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = *ip,
                        RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gateway = Some(*ip),
                        RouteAttribute::Oif(i) => oif = Some(*i),
                        RouteAttribute::Table(t) => table = *t,
                        RouteAttribute::Priority(p) => priority = *p,
                        _ => {}
                    }
                }
                let dst = Ipv4Network::new(dst, m.header.destination_prefix_length)
                    .unwrap_or_else(|_| Ipv4Network::new(Ipv4Addr::UNSPECIFIED, 0).expect("0/0"));
                RouteLite {
                    dst,
                    gateway,
                    oif,
                    table,
                    kind: m.header.kind,
                    priority,
                    msg: m,
                }
            })
            .collect())
    }

    async fn del_link(&self, index: u32) -> Result<(), rtnetlink::Error> {
        self.handle.link().del(index).execute().await
    }
}

// ---------------------------------------------------------------------------
// net.ipv4.ip_forward bookkeeping

/// Who needs ip_forward, and what it was before the first lab turned it on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardRecord {
    /// The value before any lab touched it.
    pub original: bool,
    pub labs: BTreeSet<String>,
}

/// What to do with the sysctl and the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ForwardStep {
    pub record: Option<ForwardRecord>,
    pub write: Option<bool>,
}

impl ForwardRecord {
    /// Pure: `lab` needs forwarding; the sysctl reads `current`.
    pub(crate) fn plan_acquire(
        rec: Option<ForwardRecord>,
        current: bool,
        lab: &str,
    ) -> ForwardStep {
        let mut rec = rec.unwrap_or(ForwardRecord {
            original: current,
            labs: BTreeSet::new(),
        });
        rec.labs.insert(lab.to_string());
        ForwardStep {
            record: Some(rec),
            write: (!current).then_some(true),
        }
    }

    /// Pure: `lab` no longer needs forwarding. Restores the original value only when
    /// it was off and no lab is left; never touches the sysctl without a record.
    pub(crate) fn plan_release(
        rec: Option<ForwardRecord>,
        current: bool,
        lab: &str,
    ) -> ForwardStep {
        let Some(mut rec) = rec else {
            return ForwardStep {
                record: None,
                write: None,
            };
        };
        rec.labs.remove(lab);
        if rec.labs.is_empty() {
            ForwardStep {
                record: None,
                write: (!rec.original && current).then_some(false),
            }
        } else {
            ForwardStep {
                record: Some(rec),
                write: None,
            }
        }
    }

    /// Returns whether the sysctl was turned on.
    fn acquire(state_dir: &Path, lab: &str) -> Result<bool, NetError> {
        Self::step(state_dir, |rec| {
            Ok(Self::plan_acquire(rec, read_ip_forward()?, lab))
        })
    }

    /// Returns whether the sysctl was turned back off.
    fn release(state_dir: &Path, lab: &str) -> Result<bool, NetError> {
        Self::step(state_dir, |rec| {
            Ok(Self::plan_release(rec, read_ip_forward()?, lab))
        })
    }

    /// Under an exclusive lock: load, decide, save the record, then write the sysctl
    /// (record before side effect, so a crash never loses the original value).
    fn step(
        state_dir: &Path,
        decide: impl FnOnce(Option<ForwardRecord>) -> Result<ForwardStep, NetError>,
    ) -> Result<bool, NetError> {
        use fs2::FileExt;
        let path = ip_forward_record_path(state_dir);
        let st = |op: &'static str, p: &Path| {
            let path = p.to_path_buf();
            move |source| NetError::State { op, path, source }
        };
        let dir = path.parent().expect("record has a parent");
        fs::create_dir_all(dir).map_err(st("create the directory of", &path))?;
        let lock_path = dir.join("ip_forward.lock");
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(st("open the lock of", &path))?;
        lock.lock_exclusive().map_err(st("lock", &path))?;
        let rec = match fs::read(&path) {
            Ok(bytes) => Some(serde_json::from_slice(&bytes).map_err(|e| NetError::State {
                op: "parse",
                path: path.clone(),
                source: io::Error::new(io::ErrorKind::InvalidData, e),
            })?),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(st("read", &path)(e)),
        };
        let step = decide(rec)?;
        match &step.record {
            Some(r) => {
                let tmp = path.with_extension("json.tmp");
                let text = serde_json::to_vec_pretty(r).expect("record serializes");
                fs::write(&tmp, text).map_err(st("write", &path))?;
                fs::rename(&tmp, &path).map_err(st("replace", &path))?;
            }
            None => match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(st("remove", &path)(e)),
            },
        }
        if let Some(v) = step.write {
            write_ip_forward(v)?;
        }
        Ok(step.write.is_some())
    }
}

fn read_ip_forward() -> Result<bool, NetError> {
    let s = fs::read_to_string(IP_FORWARD).map_err(|source| NetError::Sysctl {
        op: "read",
        path: IP_FORWARD.to_string(),
        source,
    })?;
    Ok(s.trim() == "1")
}

fn write_ip_forward(on: bool) -> Result<(), NetError> {
    fs::write(IP_FORWARD, if on { "1\n" } else { "0\n" }).map_err(|source| NetError::Sysctl {
        op: "write",
        path: IP_FORWARD.to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    fn spec() -> NetworkSpec {
        NetworkSpec {
            lab: "t".into(),
            bridge: "br0".into(),
            bridge_alias: owner_marker("t"),
            nft_table: "kthw_t".into(),
            subnet: net("10.200.1.0/24"),
            gateway: "10.200.1.1".parse().unwrap(),
            nat: true,
            uplink: None,
            extra_addresses: vec![net("10.200.1.2/32"), net("10.200.1.1/24")],
            pod_routes: vec![],
        }
    }

    #[test]
    fn overlap_is_symmetric_containment() {
        assert!(overlaps(net("10.0.0.0/8"), net("10.200.1.0/24")));
        assert!(overlaps(net("10.200.1.0/24"), net("10.0.0.0/8")));
        assert!(overlaps(net("10.200.1.0/24"), net("10.200.1.128/25")));
        assert!(!overlaps(net("10.200.1.0/24"), net("10.200.2.0/24")));
        assert!(!overlaps(net("192.168.0.0/16"), net("10.0.0.0/8")));
    }

    #[test]
    fn bridge_addresses_are_gateway_first_without_duplicates() {
        assert_eq!(
            spec().bridge_addresses(),
            vec![net("10.200.1.1/24"), net("10.200.1.2/32")]
        );
    }

    #[test]
    fn validate_rejects_bad_specs() {
        assert!(spec().validate().is_ok());
        let mut s = spec();
        s.gateway = "10.9.9.9".parse().unwrap();
        assert!(s.validate().is_err());
        let mut s = spec();
        s.gateway = "10.200.1.0".parse().unwrap();
        assert!(s.validate().is_err());
        let mut s = spec();
        s.bridge = "a-very-long-bridge-name".into();
        assert!(s.validate().is_err());
        let mut s = spec();
        s.uplink = Some("br0".into());
        assert!(s.validate().is_err());
        let mut s = spec();
        s.nft_table = "kthw t".into();
        assert!(s.validate().is_err());
        let mut s = spec();
        s.pod_routes = vec![PodRoute {
            cidr: net("10.244.0.0/24"),
            via: "10.9.9.9".parse().unwrap(),
        }];
        assert!(s.validate().is_err());
    }

    #[test]
    fn forward_first_lab_turns_it_on_and_remembers_off() {
        let st = ForwardRecord::plan_acquire(None, false, "a");
        assert_eq!(st.write, Some(true));
        let rec = st.record.unwrap();
        assert!(!rec.original);
        assert_eq!(rec.labs.iter().collect::<Vec<_>>(), vec!["a"]);
    }

    #[test]
    fn forward_already_on_is_left_alone() {
        let st = ForwardRecord::plan_acquire(None, true, "a");
        assert_eq!(st.write, None);
        let st = ForwardRecord::plan_release(st.record, true, "a");
        assert_eq!(
            st,
            ForwardStep {
                record: None,
                write: None
            }
        );
    }

    #[test]
    fn forward_restored_only_when_last_lab_leaves() {
        let a = ForwardRecord::plan_acquire(None, false, "a").record;
        let b = ForwardRecord::plan_acquire(a, true, "b");
        assert_eq!(b.write, None);
        let after_a = ForwardRecord::plan_release(b.record, true, "a");
        assert_eq!(after_a.write, None);
        assert!(after_a.record.as_ref().unwrap().labs.contains("b"));
        let after_b = ForwardRecord::plan_release(after_a.record, true, "b");
        assert_eq!(
            after_b,
            ForwardStep {
                record: None,
                write: Some(false)
            }
        );
    }

    #[test]
    fn forward_release_without_record_touches_nothing() {
        assert_eq!(
            ForwardRecord::plan_release(None, true, "a"),
            ForwardStep {
                record: None,
                write: None
            }
        );
    }

    #[test]
    fn spec_from_a_real_plan() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/2m2w.yaml");
        let text = fs::read_to_string(&path).unwrap();
        let host = crate::scenario::HostLimits {
            memory_mib: 1 << 20,
        };
        let scenario = crate::scenario::load_file(&path, &host).unwrap();
        let plan = crate::plan::plan(&scenario, &text, Path::new("/nonexistent"));
        let s = NetworkSpec::from_plan(&plan);
        s.validate().unwrap();
        // remove_network(lab) finds the bridge by the same marker the plan writes.
        assert_eq!(s.bridge_alias, owner_marker(&plan.lab));
        assert_eq!(s.nft_table, plan.network.nft_table);
        assert_eq!(s.gateway_cidr().to_string(), plan.network.gateway_cidr);
        // The load balancer listens on the bridge.
        assert_eq!(
            s.extra_addresses,
            vec![Ipv4Network::new(plan.load_balancer.address, 32).unwrap()]
        );
        // One route per worker, via the worker's address.
        let workers: Vec<_> = plan.nodes.iter().filter(|n| n.pod_cidr.is_some()).collect();
        assert_eq!(s.pod_routes.len(), workers.len());
        assert!(!s.pod_routes.is_empty());
        for (r, w) in s.pod_routes.iter().zip(workers) {
            assert_eq!((r.cidr, r.via), (w.pod_cidr.unwrap(), w.ip));
        }
    }

    #[test]
    fn hints_name_the_resource() {
        let e = NetError::BridgeNotOwned {
            bridge: "br0".into(),
            lab: "x".into(),
            found: "it has no ifalias".into(),
        };
        assert_eq!(
            e.to_string(),
            "bridge br0 exists and is not owned by lab x (it has no ifalias)"
        );
        assert!(e.hint().contains("ip link del br0"));
    }
}
