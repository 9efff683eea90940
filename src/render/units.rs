//! systemd units and component configs for the bootstrap phases: pure text from the
//! plan, one function per file. Nothing here touches a node.
//!
//! Decisions written down once:
//! - **Pod CIDRs are static.** The plan gives every worker its range; the CNI bridge
//!   config and the host-gw routes use it directly. The controller-manager therefore
//!   runs with `--allocate-node-cidrs=false`: letting it allocate would hand out /24s
//!   in registration order, which need not match the plan, and `Node.spec.podCIDR`
//!   would then disagree with the addresses pods really get. Nothing in this lab reads
//!   `spec.podCIDR` (bridge + host-local take the range from the CNI file, kube-proxy
//!   uses `clusterCIDR`).
//! - **Cgroups: systemd** for both the kubelet and containerd's runc, as recommended on
//!   systemd hosts (single writer of the cgroup tree); they must agree.
//! - **Pod routes: a oneshot unit** `kthw-pod-routes.service` that runs
//!   `ip route replace` after `network-online.target` on every boot, plus a
//!   `networkd.conf` drop-in with `ManageForeignRoutes=no` so a restart of
//!   systemd-networkd does not delete them. A `[Route]` drop-in for the interface's
//!   `.network` file would be networkd-native, but its directory is named after a
//!   file the image/cloud-init chooses (`10-cloud-init-IFACE.network`, or whatever the
//!   lean boot writes), which this renderer cannot know; the unit does not care how
//!   the interface was configured.

use std::fmt::Write;

use crate::components::{ComponentCatalog, CNI_BIN, LOCAL_BIN};
use crate::plan::{LabPlan, NodePlan};
use crate::scenario::Role;

/// Where files live on the nodes: the PKI distribution's destinations plus the
/// units' and configs' own paths.
pub mod on_node {
    /// The certificate and kubeconfig destinations, decided by the PKI distribution.
    pub use crate::pki::distribute::on_node::*;

    pub const ETCD_DATA_DIR: &str = "/var/lib/etcd";
    pub const KUBELET_CONFIG: &str = "/var/lib/kubelet/kubelet-config.yaml";
    pub const KUBE_PROXY_CONFIG: &str = "/var/lib/kube-proxy/kube-proxy-config.yaml";
    pub const SCHEDULER_CONFIG: &str = "/etc/kubernetes/config/kube-scheduler.yaml";
    pub const CONTAINERD_CONFIG: &str = "/etc/containerd/config.toml";
    pub const CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";
    pub const CNI_CONF_DIR: &str = "/etc/cni/net.d";
    pub const SYSTEMD_DIR: &str = "/etc/systemd/system";

    pub fn k8s(file: &str) -> String {
        format!("{KUBERNETES_DIR}/{file}")
    }
    pub fn etcd_ca() -> String {
        format!("{ETCD_DIR}/ca.pem")
    }
}

/// containerd's config file format: version 2 for containerd 1.x, 3 for 2.x.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerdConfig {
    V2,
    V3,
}

/// Where each program is on the nodes: downloaded ones in /usr/local/bin (CNI in
/// /opt/cni/bin), image-provided ones at the image's package paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bins {
    pub etcd: String,
    pub etcdctl: String,
    pub kube_apiserver: String,
    pub kube_controller_manager: String,
    pub kube_scheduler: String,
    pub kubectl: String,
    pub kubelet: String,
    pub kube_proxy: String,
    pub containerd: String,
    pub runc: String,
    pub cni_bin_dir: String,
    pub containerd_config: ContainerdConfig,
}

impl Bins {
    /// Everything downloaded from upstream releases.
    pub fn downloaded() -> Bins {
        let b = |n: &str| format!("{LOCAL_BIN}/{n}");
        Bins {
            etcd: b("etcd"),
            etcdctl: b("etcdctl"),
            kube_apiserver: b("kube-apiserver"),
            kube_controller_manager: b("kube-controller-manager"),
            kube_scheduler: b("kube-scheduler"),
            kubectl: b("kubectl"),
            kubelet: b("kubelet"),
            kube_proxy: b("kube-proxy"),
            containerd: b("containerd"),
            runc: b("runc"),
            cni_bin_dir: CNI_BIN.into(),
            containerd_config: ContainerdConfig::V3,
        }
    }

    /// Take the listed components (`etcd`, `containerd`, `runc`, `cni-plugins`) from
    /// the image's Debian packages, the rest downloaded. Unknown names are ignored;
    /// a component the image does not ship stays downloaded.
    pub fn with_image(catalog: &ComponentCatalog, image: &str, use_image: &[&str]) -> Bins {
        let mut b = Bins::downloaded();
        let path = |comp: &str, prog: &str| {
            use_image
                .contains(&comp)
                .then(|| catalog.from_image(image, comp))
                .flatten()
                .and_then(|c| c.paths.get(prog).cloned())
        };
        if let Some(p) = path("etcd", "etcd") {
            b.etcd = p;
            if let Some(c) = catalog
                .from_image(image, "etcdctl")
                .and_then(|c| c.paths.get("etcdctl"))
            {
                b.etcdctl = c.clone();
            }
        }
        if let Some(p) = path("containerd", "containerd") {
            b.containerd = p;
            b.containerd_config = ContainerdConfig::V2;
        }
        if let Some(p) = path("runc", "runc") {
            b.runc = p;
        }
        if let Some(p) = path("cni-plugins", "bridge") {
            if let Some((dir, _)) = p.rsplit_once('/') {
                b.cni_bin_dir = dir.to_string();
            }
        }
        b
    }
}

/// Facts about the node OS the kubelet needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeOs {
    /// The resolv.conf pods inherit; must not point at a 127.0.0.x stub resolver.
    pub resolv_conf: String,
    /// The `ip` program.
    pub ip: String,
}

impl Default for NodeOs {
    fn default() -> Self {
        NodeOs {
            resolv_conf: "/etc/resolv.conf".into(),
            ip: "/usr/bin/ip".into(),
        }
    }
}

/// One file to put on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedFile {
    pub path: String,
    pub mode: u32,
    pub content: String,
}

fn file(path: impl Into<String>, mode: u32, content: String) -> RenderedFile {
    RenderedFile {
        path: path.into(),
        mode,
        content,
    }
}

/// `ExecStart=BIN \` followed by one `--flag=value \` per line.
fn exec_start(bin: &str, flags: &[(&str, String)]) -> String {
    let mut s = format!("ExecStart={bin}");
    for (k, v) in flags {
        if v.is_empty() {
            let _ = write!(s, " \\\n  --{k}");
        } else {
            let _ = write!(s, " \\\n  --{k}={v}");
        }
    }
    s.push('\n');
    s
}

fn service(description: &str, doc: &str, after: &str, exec: String, extra: &str) -> String {
    format!(
        "[Unit]\nDescription={description}\nDocumentation={doc}\n{after}\n[Service]\n{exec}Restart=on-failure\nRestartSec=5\n{extra}\n[Install]\nWantedBy=multi-user.target\n"
    )
}

/// etcd on a controller: TLS for clients and peers with the node's etcd certificate,
/// client certificates required on both, the cluster from the plan.
pub fn etcd_service(plan: &LabPlan, node: &NodePlan, bins: &Bins) -> String {
    let ip = node.ip;
    let flags = [
        ("name", node.name.clone()),
        ("cert-file", on_node::etcd_cert(&node.name)),
        ("key-file", on_node::etcd_key(&node.name)),
        ("peer-cert-file", on_node::etcd_cert(&node.name)),
        ("peer-key-file", on_node::etcd_key(&node.name)),
        ("trusted-ca-file", on_node::etcd_ca()),
        ("peer-trusted-ca-file", on_node::etcd_ca()),
        ("client-cert-auth", String::new()),
        ("peer-client-cert-auth", String::new()),
        ("initial-advertise-peer-urls", format!("https://{ip}:2380")),
        ("listen-peer-urls", format!("https://{ip}:2380")),
        (
            "listen-client-urls",
            format!("https://{ip}:2379,https://127.0.0.1:2379"),
        ),
        ("advertise-client-urls", format!("https://{ip}:2379")),
        ("initial-cluster-token", format!("etcd-{}", plan.lab)),
        ("initial-cluster", plan.cluster.etcd_initial_cluster.clone()),
        ("initial-cluster-state", "new".into()),
        ("data-dir", on_node::ETCD_DATA_DIR.into()),
    ];
    service(
        "etcd",
        "https://github.com/etcd-io/etcd",
        "After=network-online.target\nWants=network-online.target\n",
        exec_start(&bins.etcd, &flags),
        "Type=notify\nLimitNOFILE=40000\n",
    )
}

/// kube-apiserver on a controller. Several apiservers share the `kubernetes`
/// endpoints through the lease reconciler (the default, written out).
pub fn kube_apiserver_service(plan: &LabPlan, node: &NodePlan, bins: &Bins) -> String {
    let k = on_node::k8s;
    let flags = [
        ("advertise-address", node.ip.to_string()),
        ("allow-privileged", "true".into()),
        ("authorization-mode", "Node,RBAC".into()),
        ("bind-address", "0.0.0.0".into()),
        ("client-ca-file", k("ca.pem")),
        (
            "enable-admission-plugins",
            "NamespaceLifecycle,NodeRestriction,LimitRanger,ServiceAccount,DefaultStorageClass,ResourceQuota"
                .into(),
        ),
        ("encryption-provider-config", on_node::ENCRYPTION_CONFIG.into()),
        ("endpoint-reconciler-type", "lease".into()),
        ("etcd-cafile", k("ca.pem")),
        ("etcd-certfile", k("kube-apiserver-etcd-client.pem")),
        ("etcd-keyfile", k("kube-apiserver-etcd-client-key.pem")),
        ("etcd-servers", plan.cluster.etcd_endpoints.join(",")),
        ("event-ttl", "1h".into()),
        ("kubelet-certificate-authority", k("ca.pem")),
        ("kubelet-client-certificate", k("kube-apiserver-kubelet-client.pem")),
        ("kubelet-client-key", k("kube-apiserver-kubelet-client-key.pem")),
        // Reach kubelets by the address their serving certificate names, without
        // needing the workers' host names in the controllers' resolver.
        ("kubelet-preferred-address-types", "InternalIP,Hostname".into()),
        ("secure-port", "6443".into()),
        ("service-account-issuer", plan.load_balancer.endpoint.clone()),
        ("service-account-key-file", k("service-accounts.pem")),
        ("service-account-signing-key-file", k("service-accounts-key.pem")),
        ("service-cluster-ip-range", plan.cluster.service_cidr.to_string()),
        ("service-node-port-range", "30000-32767".into()),
        ("tls-cert-file", k("kube-apiserver.pem")),
        ("tls-private-key-file", k("kube-apiserver-key.pem")),
        ("v", "2".into()),
    ];
    service(
        "Kubernetes API Server",
        "https://github.com/kubernetes/kubernetes",
        "After=network-online.target etcd.service\nWants=network-online.target\n",
        exec_start(&bins.kube_apiserver, &flags),
        "",
    )
}

/// kube-controller-manager on a controller; see the module doc for why node CIDRs
/// are not allocated.
pub fn kube_controller_manager_service(plan: &LabPlan, bins: &Bins) -> String {
    let k = on_node::k8s;
    let flags = [
        ("allocate-node-cidrs", "false".into()),
        ("bind-address", "0.0.0.0".into()),
        ("cluster-cidr", plan.cluster.pod_cidr.to_string()),
        ("cluster-name", plan.cluster.name.clone()),
        ("cluster-signing-cert-file", k("ca.pem")),
        ("cluster-signing-key-file", k("ca-key.pem")),
        ("kubeconfig", k("kube-controller-manager.kubeconfig")),
        ("leader-elect", "true".into()),
        ("root-ca-file", k("ca.pem")),
        (
            "service-account-private-key-file",
            k("service-accounts-key.pem"),
        ),
        (
            "service-cluster-ip-range",
            plan.cluster.service_cidr.to_string(),
        ),
        ("use-service-account-credentials", "true".into()),
        ("v", "2".into()),
    ];
    service(
        "Kubernetes Controller Manager",
        "https://github.com/kubernetes/kubernetes",
        "After=kube-apiserver.service\n",
        exec_start(&bins.kube_controller_manager, &flags),
        "",
    )
}

pub fn kube_scheduler_service(bins: &Bins) -> String {
    let flags = [
        ("config", on_node::SCHEDULER_CONFIG.into()),
        ("v", "2".into()),
    ];
    service(
        "Kubernetes Scheduler",
        "https://github.com/kubernetes/kubernetes",
        "After=kube-apiserver.service\n",
        exec_start(&bins.kube_scheduler, &flags),
        "",
    )
}

/// KubeSchedulerConfiguration (kubescheduler.config.k8s.io/v1).
pub fn kube_scheduler_config() -> String {
    format!(
        "apiVersion: kubescheduler.config.k8s.io/v1\nkind: KubeSchedulerConfiguration\nclientConnection:\n  kubeconfig: \"{}\"\nleaderElection:\n  leaderElect: true\n",
        on_node::k8s("kube-scheduler.kubeconfig")
    )
}

/// containerd's config: CRI with runc (systemd cgroups) and the CNI directories.
/// Version 3 (containerd 2.x) puts the CRI runtime under
/// `plugins.'io.containerd.cri.v1.runtime'`; version 2 (1.x, the image's package)
/// under `plugins."io.containerd.grpc.v1.cri"` (containerd's docs/cri/config.md).
pub fn containerd_config(bins: &Bins) -> String {
    let (header, cri) = match bins.containerd_config {
        ContainerdConfig::V3 => ("version = 3", "plugins.'io.containerd.cri.v1.runtime'"),
        ContainerdConfig::V2 => ("version = 2", "plugins.\"io.containerd.grpc.v1.cri\""),
    };
    let mut s = format!("{header}\n\n");
    let _ = writeln!(s, "[{cri}.containerd]");
    let _ = writeln!(s, "  default_runtime_name = 'runc'\n");
    let _ = writeln!(s, "[{cri}.containerd.runtimes.runc]");
    let _ = writeln!(s, "  runtime_type = 'io.containerd.runc.v2'\n");
    let _ = writeln!(s, "[{cri}.containerd.runtimes.runc.options]");
    let _ = writeln!(s, "  BinaryName = '{}'", bins.runc);
    let _ = writeln!(s, "  SystemdCgroup = true\n");
    let _ = writeln!(s, "[{cri}.cni]");
    let _ = writeln!(s, "  bin_dir = '{}'", bins.cni_bin_dir);
    let _ = writeln!(s, "  conf_dir = '{}'", on_node::CNI_CONF_DIR);
    s
}

pub fn containerd_service(bins: &Bins) -> String {
    let exec = format!(
        "ExecStartPre=-/sbin/modprobe overlay\nExecStart={} --config {}\n",
        bins.containerd,
        on_node::CONTAINERD_CONFIG
    );
    service(
        "containerd container runtime",
        "https://containerd.io",
        "After=network.target local-fs.target\n",
        exec,
        "Type=notify\nDelegate=yes\nKillMode=process\nLimitNPROC=infinity\nLimitCORE=infinity\nLimitNOFILE=infinity\nTasksMax=infinity\nOOMScoreAdjust=-999\n",
    )
}

/// `10-bridge.conf`: the node's pod range from the plan, host-local IPAM.
pub fn cni_bridge_conf(node: &NodePlan) -> String {
    let cidr = node
        .pod_cidr
        .map(|c| c.to_string())
        .unwrap_or_else(|| "0.0.0.0/32".into());
    format!(
        r#"{{
  "cniVersion": "1.0.0",
  "name": "bridge",
  "type": "bridge",
  "bridge": "cni0",
  "isGateway": true,
  "ipMasq": true,
  "ipam": {{
    "type": "host-local",
    "ranges": [
      [{{"subnet": "{cidr}"}}]
    ],
    "routes": [{{"dst": "0.0.0.0/0"}}]
  }}
}}
"#
    )
}

pub fn cni_loopback_conf() -> String {
    "{\n  \"cniVersion\": \"1.0.0\",\n  \"name\": \"lo\",\n  \"type\": \"loopback\"\n}\n".into()
}

/// KubeletConfiguration (kubelet.config.k8s.io/v1beta1) for a worker. Field names as
/// in the config-api reference (kubelet-config.v1beta1): `containerRuntimeEndpoint`
/// is required there; `registerNode` replaces the deprecated `--register-node`.
pub fn kubelet_config(plan: &LabPlan, node: &NodePlan, os: &NodeOs) -> String {
    let pod_cidr = node.pod_cidr.map(|c| c.to_string()).unwrap_or_default();
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: "0.0.0.0"
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: "{ca}"
authorization:
  mode: Webhook
cgroupDriver: systemd
clusterDomain: "{domain}"
clusterDNS:
  - "{dns}"
containerRuntimeEndpoint: "unix://{sock}"
podCIDR: "{pod_cidr}"
registerNode: true
resolvConf: "{resolv}"
runtimeRequestTimeout: "15m"
tlsCertFile: "{cert}"
tlsPrivateKeyFile: "{key}"
"#,
        ca = on_node::KUBELET_CA,
        domain = plan.cluster.domain,
        dns = plan.cluster.dns_service_ip,
        sock = on_node::CONTAINERD_SOCKET,
        resolv = os.resolv_conf,
        cert = on_node::KUBELET_CERT,
        key = on_node::KUBELET_KEY,
    )
}

pub fn kubelet_service(bins: &Bins) -> String {
    let flags = [
        ("config", on_node::KUBELET_CONFIG.into()),
        ("kubeconfig", on_node::KUBELET_KUBECONFIG.into()),
        ("v", "2".into()),
    ];
    service(
        "Kubernetes Kubelet",
        "https://github.com/kubernetes/kubernetes",
        "After=containerd.service\nRequires=containerd.service\n",
        exec_start(&bins.kubelet, &flags),
        "",
    )
}

/// KubeProxyConfiguration (kubeproxy.config.k8s.io/v1alpha1), iptables mode; with
/// `clusterCIDR` set, traffic from outside the pod range is told apart from pods'.
pub fn kube_proxy_config(plan: &LabPlan) -> String {
    format!(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nclientConnection:\n  kubeconfig: \"{}\"\nmode: \"iptables\"\nclusterCIDR: \"{}\"\n",
        on_node::KUBE_PROXY_KUBECONFIG,
        plan.cluster.pod_cidr
    )
}

pub fn kube_proxy_service(bins: &Bins) -> String {
    let flags = [("config", on_node::KUBE_PROXY_CONFIG.into())];
    service(
        "Kubernetes Kube Proxy",
        "https://github.com/kubernetes/kubernetes",
        "After=network-online.target\nWants=network-online.target\n",
        exec_start(&bins.kube_proxy, &flags),
        "",
    )
}

/// `/etc/modules-load.d/kthw-k8s.conf`.
pub fn worker_modules() -> String {
    "# kthw-lab: container overlay filesystem and bridged traffic through iptables\noverlay\nbr_netfilter\n".into()
}

/// `/etc/sysctl.d/90-kthw-k8s.conf`.
pub fn worker_sysctl() -> String {
    "# kthw-lab: pods reach each other and services through the node\nnet.ipv4.ip_forward = 1\nnet.bridge.bridge-nf-call-iptables = 1\nnet.bridge.bridge-nf-call-ip6tables = 1\n".into()
}

/// One host-gw route: another worker's pod range via that worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRoute {
    pub dst: String,
    pub via: String,
    pub worker: String,
}

/// The routes `node` needs: every other worker's pod range via that worker's IP.
pub fn pod_routes(plan: &LabPlan, node: &NodePlan) -> Vec<PodRoute> {
    plan.workers()
        .filter(|w| w.name != node.name)
        .filter_map(|w| {
            w.pod_cidr.map(|c| PodRoute {
                dst: c.to_string(),
                via: w.ip.to_string(),
                worker: w.name.clone(),
            })
        })
        .collect()
}

pub const POD_ROUTES_UNIT: &str = "kthw-pod-routes.service";

/// `kthw-pod-routes.service`: re-applies the node's pod routes at every boot.
pub fn pod_routes_service(plan: &LabPlan, node: &NodePlan, os: &NodeOs) -> String {
    let mut exec = String::new();
    for r in pod_routes(plan, node) {
        let _ = writeln!(
            exec,
            "# pods on {}\nExecStart={} route replace {} via {} proto static",
            r.worker, os.ip, r.dst, r.via
        );
    }
    if exec.is_empty() {
        // A oneshot service needs a command; this node has no other worker to reach.
        exec.push_str("# no other worker\nExecStart=/usr/bin/true\n");
    }
    format!(
        "[Unit]\nDescription=kthw-lab host-gw routes to the other workers' pod ranges\nAfter=network-online.target systemd-networkd.service\nWants=network-online.target\nStartLimitIntervalSec=0\n\n[Service]\nType=oneshot\nRemainAfterExit=yes\n# At boot the gateway may not be reachable yet (eth0 without its address): retry.\nRestart=on-failure\nRestartSec=1\n{exec}\n[Install]\nWantedBy=multi-user.target\n"
    )
}

/// `/etc/systemd/networkd.conf.d/kthw-foreign-routes.conf`: keep routes that
/// systemd-networkd did not configure itself (ours) when it restarts.
pub fn networkd_keep_foreign_routes() -> String {
    "# kthw-lab: the pod routes come from kthw-pod-routes.service, not from .network files\n[Network]\nManageForeignRoutes=no\n".into()
}

fn unit_path(name: &str) -> String {
    format!("{}/{name}", on_node::SYSTEMD_DIR)
}

/// Everything a controller gets from the renderer (certificates come from the PKI).
pub fn controller_files(plan: &LabPlan, node: &NodePlan, bins: &Bins) -> Vec<RenderedFile> {
    vec![
        file(
            unit_path("etcd.service"),
            0o644,
            etcd_service(plan, node, bins),
        ),
        file(
            unit_path("kube-apiserver.service"),
            0o644,
            kube_apiserver_service(plan, node, bins),
        ),
        file(
            unit_path("kube-controller-manager.service"),
            0o644,
            kube_controller_manager_service(plan, bins),
        ),
        file(
            unit_path("kube-scheduler.service"),
            0o644,
            kube_scheduler_service(bins),
        ),
        file(on_node::SCHEDULER_CONFIG, 0o644, kube_scheduler_config()),
    ]
}

/// Everything a worker gets from the renderer.
pub fn worker_files(
    plan: &LabPlan,
    node: &NodePlan,
    bins: &Bins,
    os: &NodeOs,
) -> Vec<RenderedFile> {
    vec![
        file("/etc/modules-load.d/kthw-k8s.conf", 0o644, worker_modules()),
        file("/etc/sysctl.d/90-kthw-k8s.conf", 0o644, worker_sysctl()),
        file(on_node::CONTAINERD_CONFIG, 0o644, containerd_config(bins)),
        file(
            unit_path("containerd.service"),
            0o644,
            containerd_service(bins),
        ),
        file(
            format!("{}/10-bridge.conf", on_node::CNI_CONF_DIR),
            0o644,
            cni_bridge_conf(node),
        ),
        file(
            format!("{}/99-loopback.conf", on_node::CNI_CONF_DIR),
            0o644,
            cni_loopback_conf(),
        ),
        file(
            on_node::KUBELET_CONFIG,
            0o644,
            kubelet_config(plan, node, os),
        ),
        file(unit_path("kubelet.service"), 0o644, kubelet_service(bins)),
        file(on_node::KUBE_PROXY_CONFIG, 0o644, kube_proxy_config(plan)),
        file(
            unit_path("kube-proxy.service"),
            0o644,
            kube_proxy_service(bins),
        ),
    ]
}

/// The pod-route files every node gets (controllers too, so the API server can
/// reach pods).
pub fn route_files(plan: &LabPlan, node: &NodePlan, os: &NodeOs) -> Vec<RenderedFile> {
    vec![
        file(
            "/etc/systemd/networkd.conf.d/kthw-foreign-routes.conf",
            0o644,
            networkd_keep_foreign_routes(),
        ),
        file(
            unit_path(POD_ROUTES_UNIT),
            0o644,
            pod_routes_service(plan, node, os),
        ),
    ]
}

/// The units of a node's role, in start order.
pub fn units_for(role: Role) -> &'static [&'static str] {
    match role {
        Role::Controller => &[
            "etcd",
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
        ],
        Role::Worker => &["containerd", "kubelet", "kube-proxy"],
    }
}

/// The program and `--flag` names of a unit's `ExecStart` (continuation lines
/// joined). Used to check rendered flags against the flags catalog.
pub fn exec_start_flags(unit: &str) -> Option<(String, Vec<String>)> {
    let mut joined = String::new();
    let mut in_exec = false;
    for line in unit.lines() {
        let l = line.trim();
        if !in_exec {
            if let Some(rest) = l.strip_prefix("ExecStart=") {
                in_exec = true;
                joined.push_str(rest.trim_end_matches('\\'));
                if !l.ends_with('\\') {
                    break;
                }
            }
        } else {
            joined.push(' ');
            joined.push_str(l.trim_end_matches('\\'));
            if !l.ends_with('\\') {
                break;
            }
        }
    }
    if !in_exec {
        return None;
    }
    let mut words = joined.split_whitespace();
    let program = words.next()?.to_string();
    let flags = words
        .filter_map(|w| w.strip_prefix("--"))
        .map(|w| w.split('=').next().unwrap_or(w).to_string())
        .collect();
    Some((program, flags))
}
