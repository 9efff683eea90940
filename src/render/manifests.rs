//! Kubernetes objects the bootstrap applies with `kubectl` on a controller: the RBAC
//! that lets the API server reach kubelets, and the smoke workload. Pure text from
//! the plan (and, for the workload, from `components/smoke.yaml`).

use serde::Deserialize;

use super::kubeconfig::yaml_quote;
use crate::plan::LabPlan;

/// The certificate whose CN the API server presents to kubelets
/// (`--kubelet-client-certificate`).
pub const APISERVER_KUBELET_CLIENT_CERT: &str = "kube-apiserver-kubelet-client";

/// The user the API server is to kubelets: the CN of its kubelet client certificate,
/// as the plan specifies it. `None` when the plan has no such certificate.
pub fn apiserver_kubelet_user(plan: &LabPlan) -> Option<&str> {
    plan.certificates
        .iter()
        .find(|c| c.name == APISERVER_KUBELET_CLIENT_CERT)
        .map(|c| c.common_name.as_str())
}

/// Name of the ClusterRole (and the ClusterRoleBinding's role reference).
pub const KUBELET_API_ROLE: &str = "system:kube-apiserver-to-kubelet";
/// Name of the ClusterRoleBinding.
pub const KUBELET_API_BINDING: &str = "system:kube-apiserver";

/// The kubelet API subresources the API server needs for logs, exec, port-forward,
/// metrics and stats: `nodes/proxy` carries exec/attach/logs/port-forward.
pub const KUBELET_API_RESOURCES: &[&str] = &[
    "nodes/proxy",
    "nodes/stats",
    "nodes/log",
    "nodes/spec",
    "nodes/metrics",
];

/// A ClusterRole over the kubelet API subresources and a ClusterRoleBinding of it to
/// `user` (the API server's kubelet client identity). The kubelets authorize with
/// `Webhook` mode, so without this `kubectl logs/exec` get 403 from the kubelet.
pub fn rbac_apiserver_to_kubelet(user: &str) -> String {
    let resources: String = KUBELET_API_RESOURCES
        .iter()
        .map(|r| format!("      - {r}\n"))
        .collect();
    format!(
        r#"apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  annotations:
    rbac.authorization.kubernetes.io/autoupdate: "true"
  labels:
    kubernetes.io/bootstrapping: rbac-defaults
    app.kubernetes.io/managed-by: kthw-lab
  name: {role}
rules:
  - apiGroups:
      - ""
    resources:
{resources}    verbs:
      - "*"
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  labels:
    app.kubernetes.io/managed-by: kthw-lab
  name: {binding}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: {role}
subjects:
  - apiGroup: rbac.authorization.k8s.io
    kind: User
    name: {user}
"#,
        role = yaml_quote(KUBELET_API_ROLE),
        binding = yaml_quote(KUBELET_API_BINDING),
        user = yaml_quote(user),
    )
}

/// The smoke workload's image and ports (`components/smoke.yaml`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmokeWorkload {
    /// Image reference, pinned by digest.
    pub image: String,
    /// The container's command: serves the pod's hostname over HTTP.
    pub command: Vec<String>,
    pub container_port: u16,
    pub service_port: u16,
}

pub const SMOKE_DATA: &str = include_str!("../../components/smoke.yaml");

impl SmokeWorkload {
    /// The shipped workload.
    pub fn builtin() -> Result<SmokeWorkload, String> {
        let w: SmokeWorkload =
            yaml_serde::from_str(SMOKE_DATA).map_err(|e| format!("components/smoke.yaml: {e}"))?;
        if !w.image.contains("@sha256:") {
            return Err(format!(
                "components/smoke.yaml: image {} is not pinned by digest",
                w.image
            ));
        }
        Ok(w)
    }
}

/// Name of the smoke Deployment and Service, and the value of their
/// `app.kubernetes.io/name` label.
pub const SMOKE_NAME: &str = "kthw-smoke";
/// Namespace of the smoke objects.
pub const SMOKE_NAMESPACE: &str = "default";
/// Label selector matching the smoke pods.
pub const SMOKE_SELECTOR: &str = "app.kubernetes.io/name=kthw-smoke";

/// A Deployment with one replica per worker, kept apart by a required pod
/// anti-affinity on `kubernetes.io/hostname` (at most one smoke pod per node, so with
/// as many replicas as workers every worker runs exactly one), and a ClusterIP
/// Service in front of them.
pub fn smoke_manifest(plan: &LabPlan, w: &SmokeWorkload) -> String {
    let replicas = plan.workers().count();
    let command: String = w
        .command
        .iter()
        .map(|c| format!("            - {}\n", yaml_quote(c)))
        .collect();
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
  namespace: {ns}
  labels:
    app.kubernetes.io/name: {name}
    app.kubernetes.io/managed-by: kthw-lab
spec:
  replicas: {replicas}
  selector:
    matchLabels:
      app.kubernetes.io/name: {name}
  template:
    metadata:
      labels:
        app.kubernetes.io/name: {name}
        app.kubernetes.io/managed-by: kthw-lab
    spec:
      affinity:
        podAntiAffinity:
          requiredDuringSchedulingIgnoredDuringExecution:
            - labelSelector:
                matchLabels:
                  app.kubernetes.io/name: {name}
              topologyKey: kubernetes.io/hostname
      terminationGracePeriodSeconds: 5
      containers:
        - name: serve-hostname
          image: {image}
          command:
{command}          ports:
            - name: http
              containerPort: {cport}
              protocol: TCP
          readinessProbe:
            httpGet:
              path: /
              port: http
            periodSeconds: 2
          resources:
            requests:
              cpu: 10m
              memory: 16Mi
---
apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: {ns}
  labels:
    app.kubernetes.io/name: {name}
    app.kubernetes.io/managed-by: kthw-lab
spec:
  type: ClusterIP
  selector:
    app.kubernetes.io/name: {name}
  ports:
    - name: http
      port: {sport}
      targetPort: http
      protocol: TCP
"#,
        name = SMOKE_NAME,
        ns = SMOKE_NAMESPACE,
        image = yaml_quote(&w.image),
        cport = w.container_port,
        sport = w.service_port,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_workload_is_pinned_by_digest() {
        let w = SmokeWorkload::builtin().unwrap();
        let (_, digest) = w.image.split_once("@sha256:").unwrap();
        assert_eq!(digest.len(), 64);
        assert!(digest.bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(w.command.iter().any(|c| c == "serve-hostname"));
    }

    #[test]
    fn rbac_quotes_the_user() {
        let y = rbac_apiserver_to_kubelet("a: b");
        assert!(y.contains("name: \"a: b\""));
    }
}
