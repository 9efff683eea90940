//! From the lab plan to the balancer's config, and the balancer's files in the lab's
//! state dir (`paths.lb`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::{Backend, HealthConfig, HealthKind, LbConfig, LbError};
use crate::plan::LabPlan;

/// The balancer's files, all in the lab's `lb` directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LbFiles {
    pub config: PathBuf,
    pub pid: PathBuf,
    pub log: PathBuf,
    pub socket: PathBuf,
}

impl LbFiles {
    pub fn new(lb_dir: &Path) -> LbFiles {
        LbFiles {
            config: lb_dir.join("lb.json"),
            pid: lb_dir.join("lb.pid"),
            log: lb_dir.join("lb.log"),
            socket: lb_dir.join("lb.sock"),
        }
    }

    pub fn of(plan: &LabPlan) -> LbFiles {
        LbFiles::new(&plan.paths.lb)
    }
}

/// The config for a lab: listen on the plan's LB address and port, every controller's
/// apiserver as a backend (named after its node), `GET /readyz` over TLS checked against
/// the lab CA at `ca_pem_path`, the other values at their defaults.
pub fn config_from_plan(plan: &LabPlan, ca_pem_path: &Path) -> Result<LbConfig, LbError> {
    let lb = &plan.load_balancer;
    let files = LbFiles::of(plan);
    let backends = lb
        .backends
        .iter()
        .map(|b| {
            let addr: SocketAddr = b.parse().map_err(|_| LbError::InvalidConfig {
                path: plan.paths.plan.clone(),
                reason: format!("load balancer backend {b:?} is not IP:PORT"),
            })?;
            let name = plan
                .nodes
                .iter()
                .find(|n| std::net::IpAddr::V4(n.ip) == addr.ip())
                .map_or_else(|| addr.to_string(), |n| n.name.clone());
            Ok(Backend { name, addr })
        })
        .collect::<Result<Vec<_>, LbError>>()?;
    Ok(LbConfig {
        listen: SocketAddr::from((lb.address, lb.port)),
        backends,
        health: HealthConfig {
            kind: HealthKind::Https {
                ca_pem_path: ca_pem_path.to_path_buf(),
                path: "/readyz".into(),
                server_name: None,
            },
            ..HealthConfig::default()
        },
        control_socket: files.socket,
        ..LbConfig::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn golden(name: &str) -> LabPlan {
        let path = format!(
            "{}/tests/golden/plan/{name}.json",
            env!("CARGO_MANIFEST_DIR")
        );
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn every_controller_is_a_backend_named_after_its_node() {
        let plan = golden("2m2w");
        let c = config_from_plan(&plan, Path::new("/pki/ca.pem")).unwrap();
        let lb = &plan.load_balancer;
        assert_eq!(c.listen, SocketAddr::from((lb.address, lb.port)));
        assert_eq!(c.backends.len(), lb.backends.len());
        for (b, want) in c.backends.iter().zip(&lb.backends) {
            assert_eq!(&b.addr.to_string(), want);
            let node = plan.nodes.iter().find(|n| n.name == b.name).unwrap();
            assert_eq!(std::net::IpAddr::V4(node.ip), b.addr.ip());
        }
        assert_eq!(c.control_socket, plan.paths.lb.join("lb.sock"));
        assert!(matches!(c.health.kind, HealthKind::Https { ref path, .. } if path == "/readyz"));
        c.validate(Path::new("plan")).unwrap();
    }

    #[test]
    fn a_backend_that_is_not_an_address_is_an_error() {
        let mut plan = golden("1m1w");
        plan.load_balancer.backends.push("nonsense".into());
        let e = config_from_plan(&plan, Path::new("/ca.pem")).unwrap_err();
        assert!(e.to_string().contains("\"nonsense\" is not IP:PORT"), "{e}");
    }
}
