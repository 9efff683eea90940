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
    /// It has a saved fresh state for its current definition (`reset` goes back to it
    /// instead of booting the node again).
    pub fresh_state: bool,
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
    /// The Kubernetes API through the load balancer and the nodes it knows.
    pub kubernetes: KubeStatus,
    /// Faults an experiment (or a killed checkpoint save) left in force.
    pub faults: Vec<String>,
    /// The lab's checkpoints, by name.
    pub checkpoints: Vec<String>,
    /// Why libvirt could not be asked about the domains, and what to do (once for
    /// the lab, instead of an unknown state per node without a reason).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub libvirt_error: Option<(String, String)>,
}

/// What the API says, asked from this host through the load balancer as the admin.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum KubeStatus {
    /// Not asked: the control plane is not there yet (or no admin certificate).
    NotChecked { reason: String },
    /// Asked, no usable answer.
    Unreachable { endpoint: String, error: String },
    /// `/api/v1/nodes` answered.
    Up {
        endpoint: String,
        nodes: Vec<crate::kube::NodeReady>,
        /// Workers of the plan the API does not know (kubelet never registered).
        unregistered: Vec<String>,
    },
}

impl KubeStatus {
    /// `false` when the API should answer and does not, or a worker is not Ready.
    pub fn ok(&self) -> bool {
        match self {
            KubeStatus::NotChecked { .. } => true,
            KubeStatus::Unreachable { .. } => false,
            KubeStatus::Up {
                nodes,
                unregistered,
                ..
            } => {
                unregistered.is_empty()
                    && nodes
                        .iter()
                        .all(|n| n.ready == crate::kube::Readiness::Ready)
            }
        }
    }

    /// The API's view of one planned node, for the table.
    pub fn node_cell(&self, node: &str, role: Role) -> String {
        match self {
            KubeStatus::Up {
                nodes,
                unregistered,
                ..
            } => match nodes.iter().find(|n| n.name == node) {
                Some(n) => n.ready.as_str().to_string(),
                None if unregistered.iter().any(|u| u == node) => "not registered".into(),
                // Controllers run no kubelet in this lab.
                None if role == Role::Controller => "-".into(),
                None => "not registered".into(),
            },
            _ => "-".into(),
        }
    }
}

/// Ask the API through the load balancer, once the control-plane phase is done.
pub fn kube_status(plan: &LabPlan, journal: &Journal) -> KubeStatus {
    if !journal.is_done(Phase::ControlPlane) {
        return KubeStatus::NotChecked {
            reason: "the control-plane phase has not completed yet".into(),
        };
    }
    let api = match crate::kube::ApiClient::for_lab(plan) {
        Ok(a) => a,
        Err(e) => {
            return KubeStatus::NotChecked {
                reason: format!("no admin credentials on this host: {e}"),
            }
        }
    };
    match api.nodes(QUICK) {
        Ok(nodes) => {
            let unregistered = if journal.is_done(Phase::Workers) {
                plan.workers()
                    .filter(|w| !nodes.iter().any(|n| n.name == w.name))
                    .map(|w| w.name.clone())
                    .collect()
            } else {
                Vec::new()
            };
            KubeStatus::Up {
                endpoint: api.endpoint.clone(),
                nodes,
                unregistered,
            }
        }
        Err(e) => KubeStatus::Unreachable {
            endpoint: api.endpoint.clone(),
            error: e.to_string(),
        },
    }
}

/// The API lines of the table.
pub fn render_kube(k: &KubeStatus) -> String {
    match k {
        KubeStatus::NotChecked { reason } => format!("kubernetes api: not checked: {reason}\n"),
        KubeStatus::Unreachable { endpoint, error } => {
            format!("kubernetes api: NOT ANSWERING at {endpoint}: {error}\n")
        }
        KubeStatus::Up {
            endpoint,
            nodes,
            unregistered,
        } => {
            let mut out = format!(
                "kubernetes api: answering at {endpoint}; nodes: {}\n",
                if nodes.is_empty() {
                    "none registered".to_string()
                } else {
                    nodes
                        .iter()
                        .map(|n| format!("{} {}", n.name, n.ready.as_str()))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            );
            for n in nodes
                .iter()
                .filter(|n| n.ready != crate::kube::Readiness::Ready)
            {
                out.push_str(&format!(
                    "  {} is {}: {} {}\n",
                    n.name,
                    n.ready.as_str(),
                    n.reason.as_deref().unwrap_or("-"),
                    n.message.as_deref().unwrap_or("")
                ));
            }
            if !unregistered.is_empty() {
                out.push_str(&format!(
                    "  never registered (kubelet not talking to the API): {}\n",
                    unregistered.join(", ")
                ));
            }
            out
        }
    }
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
            && self.kubernetes.ok()
            && self.faults.is_empty()
            && self.libvirt_error.is_none()
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
    let (hv, libvirt_error) = match Libvirt::connect(Some(connect)) {
        Ok(hv) => (Some(hv), None),
        Err(e) => (None, Some((e.to_string(), e.hint()))),
    };
    let remote = super::phases::lab_remote(plan).ok();
    let bins = crate::components::ComponentCatalog::builtin()
        .ok()
        .map(|c| {
            let from: Vec<&str> = plan.from_image.iter().map(String::as_str).collect();
            crate::render::units::Bins::with_image(&c, &plan.image, &from)
        });
    let routes_done = journal.is_done(Phase::Routes);
    let saved: Vec<String> = hv
        .as_ref()
        .and_then(|h| super::phases::fresh_states(h, plan).ok())
        .map(|v| {
            v.into_iter()
                .filter(|s| s.saved)
                .map(|s| s.node.name.clone())
                .collect()
        })
        .unwrap_or_default();
    let nodes: Vec<NodeStatus> = std::thread::scope(|s| {
        let handles: Vec<_> = plan
            .nodes
            .iter()
            .map(|n| {
                let hv = hv.as_ref();
                let remote = remote.as_ref();
                let fresh_state = saved.contains(&n.name);
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
                        fresh_state,
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
        kubernetes: kube_status(plan, journal),
        faults: crate::faults::observe(plan, hv.as_ref().map(|h| h as &dyn Hypervisor)),
        checkpoints: super::checkpoint::list(plan)
            .unwrap_or_default()
            .into_iter()
            .map(|c| c.name)
            .collect(),
        libvirt_error,
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
        "K8S NODE".into(),
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
            s.kubernetes.node_cell(&n.name, n.role),
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
    out.push_str(&render_kube(&s.kubernetes));
    match &s.libvirt_error {
        // Without libvirt nothing is known of the saved fresh states either.
        Some((error, hint)) => out.push_str(&format!(
            "libvirt: {error}: domain states unknown\n  hint: {hint}\n"
        )),
        None => out.push_str(&render_reset(&s.nodes)),
    }
    if !s.checkpoints.is_empty() {
        out.push_str(&format!("checkpoints: {}\n", s.checkpoints.join(", ")));
    }
    if !s.faults.is_empty() {
        out.push_str(&format!(
            "FAULTS IN FORCE: {}; `kthw-lab experiment clean {}` undoes them\n",
            s.faults.join("; "),
            s.lab
        ));
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

/// What `reset` would do: go back to every node's saved fresh state, or boot them.
fn render_reset(nodes: &[NodeStatus]) -> String {
    let unsaved: Vec<&str> = nodes
        .iter()
        .filter(|n| !n.fresh_state)
        .map(|n| n.name.as_str())
        .collect();
    if unsaved.is_empty() {
        "reset: back to every node's saved fresh state\n".into()
    } else {
        format!(
            "reset: boots the nodes again (no saved fresh state on {})\n",
            unsaved.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::parse_node_list;

    fn up() -> KubeStatus {
        KubeStatus::Up {
            endpoint: "https://10.200.1.15:6443".into(),
            nodes: parse_node_list(include_str!("../../tests/fixtures/kube/nodes-2m2w.json"))
                .unwrap(),
            unregistered: vec![],
        }
    }

    #[test]
    fn a_not_ready_worker_is_shown_with_its_reason_and_fails_status() {
        let k = up();
        assert!(!k.ok());
        let t = render_kube(&k);
        assert!(t.starts_with(
            "kubernetes api: answering at https://10.200.1.15:6443; nodes: n1 Ready, n2 NotReady\n"
        ));
        assert!(t.contains("  n2 is NotReady: KubeletNotReady container runtime network not ready"));
        assert_eq!(k.node_cell("n1", Role::Worker), "Ready");
        assert_eq!(k.node_cell("n2", Role::Worker), "NotReady");
        assert_eq!(k.node_cell("m1", Role::Controller), "-");
        let v = serde_json::to_value(&k).unwrap();
        assert_eq!(v["state"], "up");
        assert_eq!(v["nodes"][1]["ready"], "not-ready");
    }

    #[test]
    fn the_reset_line_names_the_nodes_without_a_saved_state() {
        let node = |name: &str, fresh_state| NodeStatus {
            name: name.into(),
            role: Role::Worker,
            ip: "10.200.1.12".into(),
            domain: "running".into(),
            fresh_state,
            ssh: true,
            units: BTreeMap::new(),
            routes_checked: false,
            missing_routes: vec![],
            error: None,
        };
        assert_eq!(
            render_reset(&[node("n1", true), node("n2", true)]),
            "reset: back to every node's saved fresh state\n"
        );
        assert_eq!(
            render_reset(&[node("n1", true), node("n2", false), node("n3", false)]),
            "reset: boots the nodes again (no saved fresh state on n2, n3)\n"
        );
    }

    #[test]
    fn before_the_control_plane_status_says_so_and_stays_ok() {
        let k = KubeStatus::NotChecked {
            reason: "the control-plane phase has not completed yet".into(),
        };
        assert!(k.ok());
        assert_eq!(
            render_kube(&k),
            "kubernetes api: not checked: the control-plane phase has not completed yet\n"
        );
        assert_eq!(serde_json::to_value(&k).unwrap()["state"], "not-checked");
        let down = KubeStatus::Unreachable {
            endpoint: "https://10.200.1.15:6443".into(),
            error: "connection refused".into(),
        };
        assert!(!down.ok());
        assert!(render_kube(&down).contains("NOT ANSWERING"));
    }
}
