//! The lab's Kubernetes API as the host sees it: through the load balancer, trusting
//! only the lab CA, authenticating with the admin client certificate. Used to wait
//! for the API after the control plane starts and by `status` to read node
//! readiness. Also the parsers for the API's (and `kubectl -o json`'s) list shapes.
//!
//! Requests are plain `GET`s with a deadline each; the client is built per call on a
//! small current-thread runtime, so callers stay synchronous.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::plan::LabPlan;

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("unusable TLS material ({what}): {reason}")]
    Tls { what: String, reason: String },
    #[error("GET {url}: {reason}")]
    Request { url: String, reason: String },
    #[error("GET {url}: HTTP {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("GET {url}: unexpected answer: {reason}")]
    Unexpected { url: String, reason: String },
    #[error("the API at {endpoint} was not ready after {secs} s; last answer: {last}")]
    NotReady {
        endpoint: String,
        secs: u64,
        last: String,
    },
}

impl KubeError {
    pub fn hint(&self) -> Option<String> {
        Some(match self {
            KubeError::Read { .. } => {
                "the admin certificate comes from the pki phase (`kthw-lab create --from pki`)"
                    .into()
            }
            KubeError::Tls { .. } => {
                "`kthw-lab certs check LAB` lints the lab's certificates".into()
            }
            KubeError::Request { .. } | KubeError::NotReady { .. } => {
                "`kthw-lab lb status` shows whether the balancer runs and which apiservers pass \
                 its health check; `journalctl -u kube-apiserver` on a controller shows why one does not"
                    .into()
            }
            KubeError::Status { status: 401, .. } | KubeError::Status { status: 403, .. } => {
                "the API refused the admin certificate: does the apiserver's --client-ca-file \
                 hold the lab CA? (`kthw-lab certs check LAB`)"
                    .into()
            }
            KubeError::Status { .. } | KubeError::Unexpected { .. } => return None,
        })
    }
}

/// An error and its sources on one line: reqwest's own message is only the outermost
/// layer ("error sending request"), the cause (refused, TLS) is further down.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let msg = s.to_string();
        if !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        cur = s.source();
    }
    out
}

fn read(path: &Path) -> Result<Vec<u8>, KubeError> {
    std::fs::read(path).map_err(|source| KubeError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// The API endpoint and the credentials to reach it.
#[derive(Clone)]
pub struct ApiClient {
    /// `https://ADDRESS:PORT`, no trailing slash.
    pub endpoint: String,
    ca_pem: Vec<u8>,
    /// Client certificate followed by its key, PEM.
    identity_pem: Vec<u8>,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl ApiClient {
    /// A client for `endpoint` with the CA and client certificate/key files.
    pub fn from_files(
        endpoint: &str,
        ca: &Path,
        cert: &Path,
        key: &Path,
    ) -> Result<ApiClient, KubeError> {
        let ca_pem = read(ca)?;
        let mut identity_pem = read(cert)?;
        if !identity_pem.ends_with(b"\n") {
            identity_pem.push(b'\n');
        }
        identity_pem.extend(read(key)?);
        Ok(ApiClient {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            ca_pem,
            identity_pem,
        })
    }

    /// The lab's API through its load balancer, as the admin.
    pub fn for_lab(plan: &LabPlan) -> Result<ApiClient, KubeError> {
        let pki = &plan.paths.pki;
        ApiClient::from_files(
            &plan.load_balancer.endpoint,
            &crate::pki::cert_path(pki, "ca"),
            &crate::pki::cert_path(pki, "admin"),
            &crate::pki::key_path(pki, "admin"),
        )
    }

    fn client(&self, timeout: Duration) -> Result<reqwest::Client, KubeError> {
        let ca = reqwest::Certificate::from_pem(&self.ca_pem).map_err(|e| KubeError::Tls {
            what: "lab CA".into(),
            reason: chain(&e),
        })?;
        let id = reqwest::Identity::from_pem(&self.identity_pem).map_err(|e| KubeError::Tls {
            what: "admin certificate and key".into(),
            reason: chain(&e),
        })?;
        reqwest::Client::builder()
            .tls_certs_only([ca])
            .identity(id)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .timeout(timeout)
            .no_proxy()
            .build()
            .map_err(|e| KubeError::Tls {
                what: "HTTP client".into(),
                reason: chain(&e),
            })
    }

    /// `GET path`; the status and body, whatever the status.
    pub fn get_raw(&self, path: &str, timeout: Duration) -> Result<(u16, String), KubeError> {
        let url = format!("{}{path}", self.endpoint);
        let client = self.client(timeout)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| KubeError::Request {
                url: url.clone(),
                reason: format!("cannot start the async runtime: {e}"),
            })?;
        rt.block_on(async {
            let resp = client
                .get(&url)
                .header("Accept", "application/json")
                .send()
                .await
                .map_err(|e| KubeError::Request {
                    url: url.clone(),
                    reason: chain(&e),
                })?;
            let status = resp.status().as_u16();
            let body = resp.text().await.map_err(|e| KubeError::Request {
                url: url.clone(),
                reason: chain(&e),
            })?;
            Ok((status, body))
        })
    }

    /// `GET path`, which must answer 200.
    pub fn get(&self, path: &str, timeout: Duration) -> Result<String, KubeError> {
        let (status, body) = self.get_raw(path, timeout)?;
        if status != 200 {
            return Err(KubeError::Status {
                url: format!("{}{path}", self.endpoint),
                status,
                body: crate::remote::tail(&body, 5),
            });
        }
        Ok(body)
    }

    /// One `GET /readyz`: ready means 200 and the body `ok`.
    pub fn readyz(&self, timeout: Duration) -> Result<(), KubeError> {
        let body = self.get("/readyz", timeout)?;
        if body.trim() == "ok" {
            Ok(())
        } else {
            Err(KubeError::Unexpected {
                url: format!("{}/readyz", self.endpoint),
                reason: format!(
                    "200 without the body `ok`: {:?}",
                    body.chars().take(80).collect::<String>()
                ),
            })
        }
    }

    /// Poll `/readyz` every `interval` until it passes or `timeout` is over; `notify`
    /// hears about every failed attempt (for a progress line).
    pub fn wait_ready(
        &self,
        timeout: Duration,
        interval: Duration,
        notify: &dyn Fn(&str),
    ) -> Result<(), KubeError> {
        let start = Instant::now();
        let deadline = start + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let err = match self.readyz(left.clamp(Duration::from_secs(1), Duration::from_secs(10)))
            {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(KubeError::NotReady {
                    endpoint: self.endpoint.clone(),
                    secs: timeout.as_secs(),
                    last: err.to_string(),
                });
            }
            notify(&format!(
                "waiting for {}/readyz ({} s left): {}",
                self.endpoint,
                left.as_secs(),
                first_line(&err.to_string())
            ));
            std::thread::sleep(interval.min(left));
        }
    }

    /// Every node and its Ready condition (`GET /api/v1/nodes`).
    pub fn nodes(&self, timeout: Duration) -> Result<Vec<NodeReady>, KubeError> {
        let body = self.get("/api/v1/nodes", timeout)?;
        parse_node_list(&body).map_err(|reason| KubeError::Unexpected {
            url: format!("{}/api/v1/nodes", self.endpoint),
            reason,
        })
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

// ---- the API's object shapes (only the fields read here) ---------------------------

#[derive(Debug, Deserialize)]
struct List<T> {
    kind: String,
    #[serde(default)]
    items: Vec<T>,
}

#[derive(Debug, Default, Deserialize)]
struct ObjectMeta {
    #[serde(default)]
    name: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Condition {
    #[serde(rename = "type")]
    type_: String,
    status: String,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct NodeAddress {
    #[serde(rename = "type")]
    type_: String,
    address: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NodeSystemInfo {
    #[serde(default)]
    kubelet_version: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NodeStatusJson {
    #[serde(default)]
    conditions: Vec<Condition>,
    #[serde(default)]
    addresses: Vec<NodeAddress>,
    #[serde(default)]
    node_info: Option<NodeSystemInfo>,
}

#[derive(Debug, Default, Deserialize)]
struct NodeJson {
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default)]
    status: NodeStatusJson,
}

/// The `status` of a node's `Ready` condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Readiness {
    /// `status: "True"`: the kubelet posts ready status.
    Ready,
    /// `status: "False"`: the kubelet reports itself not ready.
    NotReady,
    /// `status: "Unknown"`: the node controller stopped hearing from the kubelet.
    Unknown,
    /// No Ready condition yet (a node that just registered).
    NoCondition,
}

impl Readiness {
    pub fn as_str(self) -> &'static str {
        match self {
            Readiness::Ready => "Ready",
            Readiness::NotReady => "NotReady",
            Readiness::Unknown => "Unknown",
            Readiness::NoCondition => "no Ready condition",
        }
    }
}

/// One node as the API reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeReady {
    pub name: String,
    pub ready: Readiness,
    /// The Ready condition's reason and message (why it is not ready).
    pub reason: Option<String>,
    pub message: Option<String>,
    pub internal_ip: Option<String>,
    pub kubelet_version: Option<String>,
}

/// A `NodeList` (`GET /api/v1/nodes`, or `kubectl get nodes -o json`).
pub fn parse_node_list(json: &str) -> Result<Vec<NodeReady>, String> {
    let list: List<NodeJson> =
        serde_json::from_str(json).map_err(|e| format!("not a NodeList: {e}"))?;
    if list.kind != "NodeList" {
        return Err(format!("expected kind NodeList, got {}", list.kind));
    }
    Ok(list
        .items
        .into_iter()
        .map(|n| {
            let cond = n.status.conditions.iter().find(|c| c.type_ == "Ready");
            let ready = match cond.map(|c| c.status.as_str()) {
                Some("True") => Readiness::Ready,
                Some("False") => Readiness::NotReady,
                Some(_) => Readiness::Unknown,
                None => Readiness::NoCondition,
            };
            NodeReady {
                name: n.metadata.name,
                ready,
                reason: cond.and_then(|c| c.reason.clone()),
                message: cond.and_then(|c| c.message.clone()),
                internal_ip: n
                    .status
                    .addresses
                    .iter()
                    .find(|a| a.type_ == "InternalIP")
                    .map(|a| a.address.clone()),
                kubelet_version: n.status.node_info.and_then(|i| i.kubelet_version),
            }
        })
        .collect())
}

#[derive(Debug, Default, Deserialize)]
struct ContainerStateWaiting {
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct ContainerState {
    #[serde(default)]
    waiting: Option<ContainerStateWaiting>,
}

#[derive(Debug, Default, Deserialize)]
struct ContainerStatus {
    #[serde(default)]
    state: ContainerState,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodSpecJson {
    #[serde(default)]
    node_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodStatusJson {
    #[serde(default)]
    phase: Option<String>,
    #[serde(default, rename = "podIP")]
    pod_ip: Option<String>,
    #[serde(default)]
    conditions: Vec<Condition>,
    #[serde(default)]
    container_statuses: Vec<ContainerStatus>,
}

#[derive(Debug, Default, Deserialize)]
struct PodJson {
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default)]
    spec: PodSpecJson,
    #[serde(default)]
    status: PodStatusJson,
}

/// One pod: where it runs and whether it is ready.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PodInfo {
    pub name: String,
    /// `spec.nodeName`; `None` while unscheduled.
    pub node: Option<String>,
    pub phase: String,
    pub ip: Option<String>,
    /// The pod's Ready condition is True.
    pub ready: bool,
    /// Why a container waits (`ErrImagePull: ...`), or why the pod is unscheduled.
    pub waiting: Option<String>,
}

/// A `PodList` (`kubectl get pods -o json`).
pub fn parse_pod_list(json: &str) -> Result<Vec<PodInfo>, String> {
    let list: List<PodJson> =
        serde_json::from_str(json).map_err(|e| format!("not a PodList: {e}"))?;
    if list.kind != "PodList" && list.kind != "List" {
        return Err(format!("expected kind PodList, got {}", list.kind));
    }
    Ok(list
        .items
        .into_iter()
        .map(|p| {
            let cond = |t: &str| p.status.conditions.iter().find(|c| c.type_ == t);
            let waiting = p
                .status
                .container_statuses
                .iter()
                .filter_map(|c| c.state.waiting.as_ref())
                .map(|w| {
                    let reason = w.reason.clone().unwrap_or_else(|| "waiting".into());
                    match &w.message {
                        Some(m) => format!("{reason}: {m}"),
                        None => reason,
                    }
                })
                .next()
                .or_else(|| {
                    cond("PodScheduled")
                        .filter(|c| c.status == "False")
                        .map(|c| {
                            format!(
                                "{}: {}",
                                c.reason.as_deref().unwrap_or("Unschedulable"),
                                c.message.as_deref().unwrap_or("")
                            )
                        })
                });
            PodInfo {
                name: p.metadata.name,
                node: p.spec.node_name.filter(|n| !n.is_empty()),
                phase: p.status.phase.unwrap_or_else(|| "Unknown".into()),
                ip: p.status.pod_ip,
                ready: cond("Ready").is_some_and(|c| c.status == "True"),
                waiting,
            }
        })
        .collect())
}

/// `spec.clusterIP` of a Service (`kubectl get service NAME -o json`).
pub fn parse_service_cluster_ip(json: &str) -> Result<String, String> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("not a Service: {e}"))?;
    if v["kind"] != "Service" {
        return Err(format!("expected kind Service, got {}", v["kind"]));
    }
    match v["spec"]["clusterIP"].as_str() {
        Some(ip) if !ip.is_empty() && ip != "None" => Ok(ip.to_string()),
        other => Err(format!("the service has no cluster IP ({other:?})")),
    }
}

/// The API path of a leader-election Lease in `kube-system`.
pub fn lease_path(name: &str) -> String {
    format!("/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/{name}")
}

/// The node that holds a leader-election Lease (`GET` of [`lease_path`]): the host
/// part of `spec.holderIdentity` (client-go writes `HOSTNAME_UUID`); `None` when it
/// is held by nobody.
pub fn parse_lease_holder(json: &str) -> Result<Option<String>, String> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("not a Lease: {e}"))?;
    if v["kind"] != "Lease" {
        return Err(format!("expected kind Lease, got {}", v["kind"]));
    }
    Ok(v["spec"]["holderIdentity"]
        .as_str()
        .filter(|h| !h.is_empty())
        .map(|h| h.split('_').next().unwrap_or(h).to_string()))
}

impl ApiClient {
    /// The holder of the Lease `name` in `kube-system`.
    pub fn lease_holder(&self, name: &str, timeout: Duration) -> Result<Option<String>, KubeError> {
        let path = lease_path(name);
        let body = self.get(&path, timeout)?;
        parse_lease_holder(&body).map_err(|reason| KubeError::Unexpected {
            url: format!("{}{path}", self.endpoint),
            reason,
        })
    }
}
