//! `status LAB`: what is really running, checked against the system, not the journal:
//! domains (libvirt), SSH logins, the units each node should run by now, host-gw
//! routes, etcd health over TLS, and the load balancer.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use super::{Journal, Phase};
use crate::plan::LabPlan;
use crate::remote::Remote;
use crate::scenario::Role;

#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    pub name: String,
    pub role: Role,
    pub ip: String,
    /// libvirt's view: running, shut off, ... or `absent`.
    pub domain: String,
    /// A real SSH login with the pinned host key worked.
    pub ssh: bool,
    /// Expected units and whether each is active.
    pub units: BTreeMap<String, bool>,
    /// Whether routes were checked (the `routes` phase has run).
    pub routes_checked: bool,
    /// Expected pod routes missing on the node (empty = all there).
    pub missing_routes: Vec<String>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LabStatus {
    pub lab: String,
    /// The last phase the journal records as done.
    pub last_phase: Option<Phase>,
    pub nodes: Vec<NodeStatus>,
    /// `None` when etcd is not expected yet.
    pub etcd_healthy: Option<bool>,
    pub etcd_unhealthy_endpoints: Vec<String>,
    /// Balancer backends and their health, when it answers.
    pub lb: Option<Vec<(String, bool)>>,
}

impl LabStatus {
    /// Everything expected by now is up.
    pub fn ok(&self) -> bool {
        self.nodes.iter().all(|n| {
            n.domain == "running"
                && n.ssh
                && n.units.values().all(|a| *a)
                && n.missing_routes.is_empty()
                && n.error.is_none()
        }) && self.etcd_healthy != Some(false)
    }
}

/// Units a node should run once `done` phases completed.
pub fn expected_units(role: Role, journal: &Journal) -> Vec<&'static str> {
    let mut u = Vec::new();
    match role {
        Role::Controller => {
            if journal.is_done(Phase::Etcd) {
                u.push("etcd");
            }
            if journal.is_done(Phase::ControlPlane) {
                u.extend([
                    "kube-apiserver",
                    "kube-controller-manager",
                    "kube-scheduler",
                ]);
            }
        }
        Role::Worker => {
            if journal.is_done(Phase::Runtime) {
                u.push("containerd");
            }
            if journal.is_done(Phase::Workers) {
                u.extend(["kubelet", "kube-proxy"]);
            }
        }
    }
    u
}

const QUICK: Duration = Duration::from_secs(20);

pub fn collect(plan: &LabPlan, journal: &Journal, connect: &str) -> LabStatus {
    use crate::host::libvirt::{Hypervisor, Libvirt};
    let hv = Libvirt::connect(Some(connect)).ok();
    let remote = super::phases::lab_remote(plan).ok();
    let bins = crate::components::ComponentCatalog::builtin()
        .ok()
        .map(|c| {
            let from: Vec<&str> = plan.from_image.iter().map(String::as_str).collect();
            crate::render::units::Bins::with_image(&c, &plan.image, &from)
        });
    let routes_done = journal.is_done(Phase::Routes);
    let nodes: Vec<NodeStatus> = std::thread::scope(|s| {
        let handles: Vec<_> = plan
            .nodes
            .iter()
            .map(|n| {
                let hv = hv.as_ref();
                let remote = remote.as_ref();
                s.spawn(move || {
                    let domain = match hv.map(|h| h.state(&n.domain)) {
                        Some(Ok(Some(st))) => format!("{st:?}").to_lowercase(),
                        Some(Ok(None)) => "absent".into(),
                        Some(Err(_)) | None => "unknown".into(),
                    };
                    let mut st = NodeStatus {
                        name: n.name.clone(),
                        role: n.role,
                        ip: n.ip.to_string(),
                        domain,
                        ssh: false,
                        units: BTreeMap::new(),
                        routes_checked: false,
                        missing_routes: Vec::new(),
                        error: None,
                    };
                    let Some(r) = remote else {
                        st.error = Some("no ssh keys for this lab".into());
                        return st;
                    };
                    match r.exec(&n.name, "true", QUICK) {
                        Ok(o) if o.success() => st.ssh = true,
                        Ok(o) => st.error = Some(format!("`true` exited {}", o.status)),
                        Err(e) => {
                            st.error = Some(e.to_string());
                            return st;
                        }
                    }
                    let units = expected_units(n.role, journal);
                    if !units.is_empty() {
                        let cmd = crate::actions::bootstrap::is_active_cmd(&units);
                        if let Ok(o) = r.exec(&n.name, &cmd, QUICK) {
                            let bad = crate::actions::bootstrap::inactive_units(&units, &o.stdout);
                            for u in &units {
                                st.units
                                    .insert(u.to_string(), !bad.iter().any(|(b, _)| b == u));
                            }
                        }
                    }
                    if routes_done {
                        let expected = crate::render::units::pod_routes(plan, n);
                        if let Ok(o) = r.exec(&n.name, "ip -j route show", QUICK) {
                            st.routes_checked = true;
                            match crate::actions::bootstrap::missing_routes(&expected, &o.stdout) {
                                Ok(m) => {
                                    st.missing_routes = m
                                        .iter()
                                        .map(|r| format!("{} via {}", r.dst, r.via))
                                        .collect()
                                }
                                Err(e) => st.error = Some(e),
                            }
                        }
                    }
                    st
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("status thread"))
            .collect()
    });
    let (mut etcd_healthy, mut etcd_unhealthy) = (None, Vec::new());
    if journal.is_done(Phase::Etcd) {
        let c = plan.controllers().next();
        if let (Some(c), Some(r), Some(bins)) = (c, remote.as_ref(), bins.as_ref()) {
            let cmd = crate::actions::bootstrap::etcd_health_cmd(plan, c, bins);
            match r.exec(&c.name, &cmd, QUICK) {
                Ok(o) => {
                    let text = format!("{}{}", o.stdout, o.stderr);
                    etcd_unhealthy = crate::actions::bootstrap::unhealthy_endpoints(plan, &text);
                    etcd_healthy = Some(etcd_unhealthy.is_empty());
                }
                Err(_) => etcd_healthy = Some(false),
            }
        }
    }
    let lb = crate::lb::status(&crate::lb::LbFiles::of(plan).socket)
        .ok()
        .map(|s| {
            s.backends
                .iter()
                .map(|b| (b.name.clone(), b.healthy))
                .collect()
        });
    LabStatus {
        lab: plan.lab.clone(),
        last_phase: Phase::ALL
            .iter()
            .rev()
            .find(|p| journal.is_done(**p))
            .copied(),
        nodes,
        etcd_healthy,
        etcd_unhealthy_endpoints: etcd_unhealthy,
        lb,
    }
}

pub fn render_table(s: &LabStatus) -> String {
    let mut rows = vec![vec![
        "NODE".to_string(),
        "ROLE".into(),
        "IP".into(),
        "DOMAIN".into(),
        "SSH".into(),
        "SERVICES".into(),
        "ROUTES".into(),
    ]];
    for n in &s.nodes {
        let units = if n.units.is_empty() {
            "-".to_string()
        } else {
            n.units
                .iter()
                .map(|(u, a)| format!("{u} {}", if *a { "active" } else { "DOWN" }))
                .collect::<Vec<_>>()
                .join(", ")
        };
        rows.push(vec![
            n.name.clone(),
            n.role.as_str().into(),
            n.ip.clone(),
            n.domain.clone(),
            if n.ssh { "ok".into() } else { "no".into() },
            units,
            if !n.routes_checked {
                "-".into()
            } else if n.missing_routes.is_empty() {
                "ok".into()
            } else {
                format!("missing {}", n.missing_routes.join(", "))
            },
        ]);
    }
    let mut out = crate::plan::rows_to_text(&rows);
    out.push_str(&format!(
        "\nlast phase: {}\n",
        s.last_phase.map(|p| p.name()).unwrap_or("none")
    ));
    match s.etcd_healthy {
        Some(true) => out.push_str("etcd: healthy on every endpoint\n"),
        Some(false) => out.push_str(&format!(
            "etcd: UNHEALTHY {}\n",
            s.etcd_unhealthy_endpoints.join(" ")
        )),
        None => {}
    }
    match &s.lb {
        Some(b) => out.push_str(&format!(
            "load balancer: running; backends {}\n",
            b.iter()
                .map(|(n, h)| format!("{n} {}", if *h { "up" } else { "down" }))
                .collect::<Vec<_>>()
                .join(", ")
        )),
        None => out.push_str("load balancer: not answering\n"),
    }
    for n in s.nodes.iter().filter(|n| n.error.is_some()) {
        out.push_str(&format!(
            "{}: {}\n",
            n.name,
            n.error.as_deref().unwrap_or("")
        ));
    }
    out
}
