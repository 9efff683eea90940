//! Which PKI files go to which node, where they land and with what mode: data the
//! bootstrap phases copy. Controllers get the CA key (the controller-manager signs
//! kubelet CSRs with it); workers never get any CA key.

use std::path::PathBuf;

use serde::Serialize;

use super::{cert_path, encryption_config_path, key_path, kubeconfig_plans};
use crate::plan::LabPlan;
use crate::scenario::Role;

/// Where the files live on the nodes. Unit and config renderers use these too, so the
/// paths are written down once.
pub mod on_node {
    /// API server, controller-manager and scheduler files on controllers.
    pub const KUBERNETES_DIR: &str = "/var/lib/kubernetes";
    /// etcd's certificates on controllers.
    pub const ETCD_DIR: &str = "/etc/etcd";
    /// The kubelet's files on workers.
    pub const KUBELET_DIR: &str = "/var/lib/kubelet";
    /// kube-proxy's kubeconfig on workers.
    pub const KUBE_PROXY_DIR: &str = "/var/lib/kube-proxy";
    /// The encryption config, on controllers.
    pub const ENCRYPTION_CONFIG: &str = "/var/lib/kubernetes/encryption-config.yaml";
    /// On a worker: the kubelet's certificate and key (whatever the node's name).
    pub const KUBELET_CERT: &str = "/var/lib/kubelet/kubelet.pem";
    pub const KUBELET_KEY: &str = "/var/lib/kubelet/kubelet-key.pem";
    pub const KUBELET_CA: &str = "/var/lib/kubelet/ca.pem";
    pub const KUBELET_KUBECONFIG: &str = "/var/lib/kubelet/kubeconfig";
    pub const KUBE_PROXY_KUBECONFIG: &str = "/var/lib/kube-proxy/kubeconfig";
    /// On a controller: the admin kubeconfig (API through the load balancer), for
    /// `kubectl` on the node and the phases that apply objects with it.
    pub const ADMIN_KUBECONFIG: &str = "/var/lib/kubernetes/admin.kubeconfig";

    /// On a controller: `/etc/etcd/etcd-NODE.pem` and `etcd-NODE-key.pem`.
    pub fn etcd_cert(node: &str) -> String {
        format!("{ETCD_DIR}/etcd-{node}.pem")
    }
    pub fn etcd_key(node: &str) -> String {
        format!("{ETCD_DIR}/etcd-{node}-key.pem")
    }
}

/// One file to copy onto a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileToInstall {
    /// The file on the host.
    pub source: PathBuf,
    /// Absolute path on the node.
    pub dest: String,
    /// Permission bits, e.g. 0o600 for keys.
    pub mode: u32,
    /// `user:group` that owns it on the node.
    pub owner: String,
}

/// Everything one node receives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeFiles {
    pub node: String,
    pub role: Role,
    pub files: Vec<FileToInstall>,
}

const ROOT: &str = "root:root";

fn file(source: PathBuf, dest: String, mode: u32) -> FileToInstall {
    FileToInstall {
        source,
        dest,
        mode,
        owner: ROOT.into(),
    }
}

/// The files of every node, in plan order.
pub fn distribution(plan: &LabPlan) -> Vec<NodeFiles> {
    let pki = &plan.paths.pki;
    let kc = &plan.paths.kubeconfigs;
    let cert =
        |name: &str, dir: &str| file(cert_path(pki, name), format!("{dir}/{name}.pem"), 0o644);
    let key =
        |name: &str, dir: &str| file(key_path(pki, name), format!("{dir}/{name}-key.pem"), 0o600);
    let kubeconfigs = kubeconfig_plans(plan);
    let kubeconfig_file = |cert_name: &str| {
        kubeconfigs
            .iter()
            .find(|k| k.cert == cert_name)
            .map(|k| kc.join(&k.file))
            .expect("every component's kubeconfig is planned")
    };
    let mut out = Vec::new();
    for node in &plan.nodes {
        let mut files = Vec::new();
        match node.role {
            Role::Controller => {
                let k8s = on_node::KUBERNETES_DIR;
                files.push(cert("ca", k8s));
                files.push(key("ca", k8s));
                for name in [
                    "kube-apiserver",
                    "service-accounts",
                    "kube-apiserver-etcd-client",
                    "kube-apiserver-kubelet-client",
                ] {
                    files.push(cert(name, k8s));
                    files.push(key(name, k8s));
                }
                files.push(file(
                    kubeconfig_file("admin"),
                    on_node::ADMIN_KUBECONFIG.into(),
                    0o600,
                ));
                for c in ["kube-controller-manager", "kube-scheduler"] {
                    files.push(file(
                        kubeconfig_file(c),
                        format!("{k8s}/{c}.kubeconfig"),
                        0o600,
                    ));
                }
                files.push(file(
                    encryption_config_path(plan),
                    on_node::ENCRYPTION_CONFIG.into(),
                    0o600,
                ));
                let etcd = on_node::ETCD_DIR;
                let stem = format!("etcd-{}", node.name);
                files.push(cert("ca", etcd));
                files.push(file(
                    cert_path(pki, &stem),
                    on_node::etcd_cert(&node.name),
                    0o644,
                ));
                files.push(file(
                    key_path(pki, &stem),
                    on_node::etcd_key(&node.name),
                    0o600,
                ));
            }
            Role::Worker => {
                let stem = format!("kubelet-{}", node.name);
                files.push(file(
                    cert_path(pki, "ca"),
                    on_node::KUBELET_CA.into(),
                    0o644,
                ));
                files.push(file(
                    cert_path(pki, &stem),
                    on_node::KUBELET_CERT.into(),
                    0o644,
                ));
                files.push(file(
                    key_path(pki, &stem),
                    on_node::KUBELET_KEY.into(),
                    0o600,
                ));
                files.push(file(
                    kubeconfig_file(&stem),
                    on_node::KUBELET_KUBECONFIG.into(),
                    0o600,
                ));
                files.push(file(
                    kubeconfig_file("kube-proxy"),
                    on_node::KUBE_PROXY_KUBECONFIG.into(),
                    0o600,
                ));
            }
        }
        out.push(NodeFiles {
            node: node.name.clone(),
            role: node.role,
            files,
        });
    }
    out
}
