//! The phases of `create`, in the order they run.
//!
//! Routes come right after etcd because they need nothing but the plan, and the
//! container runtime is its own phase before the Kubernetes components: on a host
//! where the Kubernetes binaries cannot be obtained, `--until runtime` still builds
//! everything else for real.

use serde::{Deserialize, Serialize};

#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Network,
    Image,
    Disks,
    Domains,
    WaitSsh,
    Pki,
    Lb,
    Etcd,
    Routes,
    Runtime,
    ControlPlane,
    Workers,
    Smoke,
}

impl Phase {
    /// The first phase that changes the guests (the ones before only boot them or
    /// work on the host): until it has run, the nodes are as freshly booted.
    pub const FIRST_ON_GUESTS: Phase = Phase::Etcd;

    pub const ALL: [Phase; 13] = [
        Phase::Network,
        Phase::Image,
        Phase::Disks,
        Phase::Domains,
        Phase::WaitSsh,
        Phase::Pki,
        Phase::Lb,
        Phase::Etcd,
        Phase::Routes,
        Phase::Runtime,
        Phase::ControlPlane,
        Phase::Workers,
        Phase::Smoke,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Network => "network",
            Phase::Image => "image",
            Phase::Disks => "disks",
            Phase::Domains => "domains",
            Phase::WaitSsh => "wait-ssh",
            Phase::Pki => "pki",
            Phase::Lb => "lb",
            Phase::Etcd => "etcd",
            Phase::Runtime => "runtime",
            Phase::ControlPlane => "control-plane",
            Phase::Workers => "workers",
            Phase::Routes => "routes",
            Phase::Smoke => "smoke",
        }
    }

    /// What the phase does, for progress lines.
    pub fn describe(self) -> &'static str {
        match self {
            Phase::Network => "bridge, gateway address, forwarding and NAT",
            Phase::Image => "base image in the cache, verified",
            Phase::Disks => "per-node overlays and cloud-init seeds",
            Phase::Domains => "libvirt domains defined and started",
            Phase::WaitSsh => "every node accepts an SSH login",
            Phase::Pki => "certificates, kubeconfigs, encryption config",
            Phase::Lb => "API load balancer on the host",
            Phase::Etcd => "etcd cluster with TLS on the controllers",
            Phase::ControlPlane => "apiserver, controller-manager, scheduler",
            Phase::Runtime => "kernel modules, sysctls, containerd, runc and CNI on the workers",
            Phase::Workers => "kubelet and kube-proxy on the workers",
            Phase::Routes => "host-gw pod routes on every node and the host",
            Phase::Smoke => "a deployment and a service across workers",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
