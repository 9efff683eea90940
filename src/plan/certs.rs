//! Which certificates a lab has: subjects, SANs and usages, decided from the plan.
//! Generating them is the pki module's job; this is only the specification.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::{ClusterPlan, LbPlan, NodePlan};
use crate::scenario::Role;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CertUsage {
    /// The cluster CA (self-signed, signs everything else).
    Ca,
    /// TLS client authentication only.
    Client,
    /// TLS server authentication only.
    Server,
    /// Both (kubelet serving + client, etcd server + peer).
    ClientServer,
    /// Only the key pair matters (service-account token signing).
    SigningKey,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertSpec {
    /// File stem in the lab's pki dir: NAME.pem and NAME-key.pem.
    pub name: String,
    /// What it is for, in words.
    pub purpose: String,
    pub common_name: String,
    pub organization: Option<String>,
    pub usage: CertUsage,
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<Ipv4Addr>,
    /// The node it belongs to, for per-node certificates.
    pub node: Option<String>,
}

fn spec(name: &str, purpose: &str, cn: &str, o: Option<&str>, usage: CertUsage) -> CertSpec {
    CertSpec {
        name: name.to_string(),
        purpose: purpose.to_string(),
        common_name: cn.to_string(),
        organization: o.map(str::to_string),
        usage,
        dns_names: Vec::new(),
        ip_addresses: Vec::new(),
        node: None,
    }
}

pub(super) fn plan_certs(nodes: &[NodePlan], lb: &LbPlan, cluster: &ClusterPlan) -> Vec<CertSpec> {
    use CertUsage::*;
    let controllers: Vec<&NodePlan> = nodes
        .iter()
        .filter(|n| n.role == Role::Controller)
        .collect();
    let mut out = vec![
        spec(
            "ca",
            "cluster certificate authority",
            "Kubernetes",
            Some("Kubernetes"),
            Ca,
        ),
        spec(
            "admin",
            "cluster administrator (kubectl from the host)",
            "admin",
            Some("system:masters"),
            Client,
        ),
    ];
    for w in nodes.iter().filter(|n| n.role == Role::Worker) {
        let mut c = spec(
            &format!("kubelet-{}", w.name),
            "kubelet: node authorizer client and serving certificate",
            &format!("system:node:{}", w.name),
            Some("system:nodes"),
            ClientServer,
        );
        c.dns_names = vec![w.name.clone()];
        c.ip_addresses = vec![w.ip];
        c.node = Some(w.name.clone());
        out.push(c);
    }
    out.push(spec(
        "kube-controller-manager",
        "kube-controller-manager client",
        "system:kube-controller-manager",
        Some("system:kube-controller-manager"),
        Client,
    ));
    out.push(spec(
        "kube-scheduler",
        "kube-scheduler client",
        "system:kube-scheduler",
        Some("system:kube-scheduler"),
        Client,
    ));
    out.push(spec(
        "kube-proxy",
        "kube-proxy client",
        "system:kube-proxy",
        Some("system:node-proxier"),
        Client,
    ));
    let mut api = spec(
        "kube-apiserver",
        "API server serving certificate",
        "kubernetes",
        Some("Kubernetes"),
        Server,
    );
    api.ip_addresses.push(cluster.api_service_ip);
    api.ip_addresses.extend(controllers.iter().map(|c| c.ip));
    api.ip_addresses.push(lb.address);
    api.ip_addresses.push(Ipv4Addr::LOCALHOST);
    api.dns_names
        .extend(controllers.iter().map(|c| c.name.clone()));
    api.dns_names.push(lb.name.clone());
    api.dns_names.push("localhost".into());
    for n in ["kubernetes", "kubernetes.default", "kubernetes.default.svc"] {
        api.dns_names.push(n.into());
    }
    api.dns_names
        .push(format!("kubernetes.default.svc.{}", cluster.domain));
    out.push(api);
    out.push(spec(
        "kube-apiserver-kubelet-client",
        "API server client to kubelets (logs, exec)",
        "kube-apiserver-kubelet-client",
        Some("Kubernetes"),
        Client,
    ));
    out.push(spec(
        "kube-apiserver-etcd-client",
        "API server client to etcd",
        "kube-apiserver-etcd-client",
        Some("Kubernetes"),
        Client,
    ));
    out.push(spec(
        "service-accounts",
        "service-account token signing key pair",
        "service-accounts",
        Some("Kubernetes"),
        SigningKey,
    ));
    for c in &controllers {
        let mut e = spec(
            &format!("etcd-{}", c.name),
            "etcd server and peer certificate",
            &format!("etcd-{}", c.name),
            Some("etcd"),
            ClientServer,
        );
        e.dns_names = vec![c.name.clone(), "localhost".into()];
        e.ip_addresses = vec![c.ip, Ipv4Addr::LOCALHOST];
        e.node = Some(c.name.clone());
        out.push(e);
    }
    out
}
