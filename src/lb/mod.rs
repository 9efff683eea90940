//! The built-in layer-4 load balancer for the Kubernetes API (`kthw-lab lb`).
//!
//! It listens on the plan's LB address (port 6443) and forwards raw TCP to every
//! controller's apiserver, with no TLS termination. Backends are chosen by round robin
//! or least connections among the healthy ones; a backend that refuses or times out is
//! skipped for that connection and the next one is tried. Active health checks (TCP
//! connect, or HTTPS `GET /readyz` verified against the lab CA) move a backend down after
//! `fall` consecutive failures and up after `rise` consecutive successes.
//!
//! Layout:
//! - [`select`]: pure backend selection and the health state machine,
//! - `health`: the probers and the per-backend check loop,
//! - `proxy`: thread-per-core acceptors (SO_REUSEPORT, one current-thread runtime each)
//!   and the forwarder (idle and first-byte timeouts, half-close, splice for bulk),
//! - [`stats`]: counters and the status report,
//! - `control`: the status socket, pid file, detach/stop/reload.
//!
//! # Wiring into the CLI
//! - `kthw-lab lb run --config FILE` calls [`run_blocking`] (own runtime; SIGTERM/SIGINT
//!   stop, SIGHUP reloads). Inside an existing runtime use [`run`].
//! - `create` (the `lb` phase) builds the config with [`config_from_plan`], saves it
//!   with [`LbConfig::save`] at [`LbFiles`]`::of(plan).config`, then calls
//!   [`ensure_running`]`(exe, ["lb", "run", "--config", FILE], pid, log)`: it starts the
//!   balancer detached, or reloads the running one on a re-run. `start LAB` after a
//!   reboot calls the same. `destroy` calls [`stop`] (fine when already gone).
//! - `kthw-lab lb status LAB [--output json]`: [`status`]`(control_socket)`, then
//!   [`render_table`] or `serde_json` of the [`LbStatus`].
//!
//! # Config file (JSON; every field but `listen` and `backends` has a default)
//! ```json
//! {
//!   "listen": "10.240.0.2:6443",
//!   "backends": [{"name": "controller-0", "addr": "10.240.0.10:6443"},
//!                {"name": "controller-1", "addr": "10.240.0.11:6443"}],
//!   "policy": "round_robin",
//!   "health": {"kind": {"https": {"ca_pem_path": "/var/lib/kthw-lab/lab1/pki/ca.pem",
//!                                 "path": "/readyz"}},
//!              "interval_ms": 2000, "timeout_ms": 1000, "rise": 2, "fall": 3},
//!   "connect_timeout_ms": 3000, "idle_timeout_ms": 3600000,
//!   "first_byte_timeout_ms": 10000, "max_connections": 10000,
//!   "control_socket": "/var/lib/kthw-lab/lab1/lb.sock", "threads": 0
//! }
//! ```

mod control;
mod health;
pub mod plan;
mod proxy;
pub mod select;
pub mod stats;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use control::{
    ensure_running, is_running, reload, set_backend, spawn_detached, status, stop, Ensured,
};
pub use plan::{config_from_plan, LbFiles};
pub use proxy::{run, run_blocking, LbHandle, LbServer};
pub use select::Policy;
pub use stats::{render_table, BackendStatus, LbStatus};

/// Everything that can go wrong in the load balancer.
#[derive(Debug, thiserror::Error)]
pub enum LbError {
    #[error("cannot read lb config {path}")]
    ReadConfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot parse lb config {path}")]
    ParseConfig {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("invalid lb config {path}: {reason}")]
    InvalidConfig { path: PathBuf, reason: String },
    #[error("cannot load the health-check ca {path}: {reason}")]
    Ca { path: PathBuf, reason: String },
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot use control socket {path}")]
    ControlSocket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bad status answer from control socket {path}")]
    StatusAnswer {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot use pid file {path}")]
    PidFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pid file {path} holds {content:?}, not a process id")]
    BadPid { path: PathBuf, content: String },
    #[error("process {pid} from {path} is not a kthw-lab load balancer (cmdline {cmdline:?})")]
    NotOurs {
        pid: u32,
        path: PathBuf,
        cmdline: String,
    },
    #[error("load balancer {pid} from {path} is not running")]
    NotRunning { pid: u32, path: PathBuf },
    #[error("cannot open lb log file {path}")]
    LogFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start {exe}")]
    Spawn {
        exe: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot signal load balancer {pid}")]
    Signal {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("load balancer {pid} did not exit after sigterm and sigkill")]
    StopTimeout { pid: u32 },
    #[error("cannot start a load balancer thread")]
    Thread(#[source] std::io::Error),
    #[error("cannot install signal handler")]
    SignalHandler(#[source] std::io::Error),
}

/// One apiserver behind the load balancer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
}

/// How a backend's health is probed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
/// JSON: `"tcp"` or `{"https": {"ca_pem_path": "...", "path": "/readyz"}}`.
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum HealthKind {
    /// A TCP connect that succeeds within the timeout.
    Tcp,
    /// `GET path` over TLS, the server verified against the CA in `ca_pem_path`;
    /// healthy when the answer is `200`.
    Https {
        ca_pem_path: PathBuf,
        #[serde(default = "default_readyz")]
        path: String,
        /// Name checked against the server certificate; the backend IP when absent
        /// (the apiserver certificate carries every controller IP).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        server_name: Option<String>,
    },
}

fn default_readyz() -> String {
    "/readyz".to_string()
}

/// Active health checking.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    pub kind: HealthKind,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    /// Consecutive successes that bring a down backend up.
    pub rise: u32,
    /// Consecutive failures that bring an up backend down.
    pub fall: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            kind: HealthKind::Tcp,
            interval_ms: 2000,
            timeout_ms: 1000,
            rise: 2,
            fall: 3,
        }
    }
}

/// The load balancer configuration (a JSON file written from the plan).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LbConfig {
    pub listen: SocketAddr,
    pub backends: Vec<Backend>,
    pub policy: Policy,
    pub health: HealthConfig,
    /// Time allowed for the TCP connect to one backend before the next is tried.
    pub connect_timeout_ms: u64,
    /// A connection with no byte in either direction for this long is closed.
    pub idle_timeout_ms: u64,
    /// A client that has sent nothing this long after connecting is closed (a TLS
    /// client always speaks first), so silent clients cannot pin a backend connection.
    pub first_byte_timeout_ms: u64,
    /// Client connections served at once; further clients are closed at accept.
    pub max_connections: usize,
    /// Unix socket that answers status requests.
    pub control_socket: PathBuf,
    /// Acceptor threads, each with its own listener and runtime; 0 = one per CPU.
    /// Read at start only.
    pub threads: usize,
}

impl Default for LbConfig {
    fn default() -> Self {
        LbConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 6443)),
            backends: Vec::new(),
            policy: Policy::RoundRobin,
            health: HealthConfig::default(),
            connect_timeout_ms: 3000,
            // kubectl watches and exec sessions sit idle between events; the apiserver
            // itself bounds watches, so one hour only reaps truly dead clients.
            idle_timeout_ms: 3_600_000,
            first_byte_timeout_ms: 10_000,
            max_connections: 10_000,
            control_socket: PathBuf::from("lb.sock"),
            threads: 0,
        }
    }
}

impl LbConfig {
    /// Reads and validates a JSON config file.
    pub fn load(path: &Path) -> Result<LbConfig, LbError> {
        let text = std::fs::read_to_string(path).map_err(|source| LbError::ReadConfig {
            path: path.to_path_buf(),
            source,
        })?;
        let config: LbConfig =
            serde_json::from_str(&text).map_err(|source| LbError::ParseConfig {
                path: path.to_path_buf(),
                source,
            })?;
        config.validate(path)?;
        Ok(config)
    }

    /// Writes the config as pretty JSON (atomically: temp file then rename).
    pub fn save(&self, path: &Path) -> Result<(), LbError> {
        let text = serde_json::to_string_pretty(self).expect("lb config serializes");
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text + "\n")
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|source| LbError::ReadConfig {
                path: path.to_path_buf(),
                source,
            })
    }

    /// Checks the values that would make the balancer misbehave.
    pub fn validate(&self, path: &Path) -> Result<(), LbError> {
        let bad = |reason: String| LbError::InvalidConfig {
            path: path.to_path_buf(),
            reason,
        };
        let mut names = std::collections::HashSet::new();
        for b in &self.backends {
            if b.name.is_empty() {
                return Err(bad(format!("backend {} has an empty name", b.addr)));
            }
            if !names.insert(b.name.as_str()) {
                return Err(bad(format!("backend name {} appears twice", b.name)));
            }
        }
        let h = &self.health;
        if h.rise == 0 || h.fall == 0 {
            return Err(bad("health rise and fall must be at least 1".into()));
        }
        if h.interval_ms == 0 || h.timeout_ms == 0 {
            return Err(bad(
                "health interval_ms and timeout_ms must be positive".into()
            ));
        }
        if self.connect_timeout_ms == 0
            || self.idle_timeout_ms == 0
            || self.first_byte_timeout_ms == 0
        {
            return Err(bad(
                "connect_timeout_ms, idle_timeout_ms and first_byte_timeout_ms must be positive"
                    .into(),
            ));
        }
        if self.threads > 256 {
            return Err(bad(format!("threads {} is more than 256", self.threads)));
        }
        if self.max_connections == 0 {
            return Err(bad("max_connections must be at least 1".into()));
        }
        if let HealthKind::Https { path: p, .. } = &h.kind {
            if !p.starts_with('/') || p.contains(['\r', '\n', ' ']) {
                return Err(bad(format!(
                    "health path {p:?} must be an absolute request path"
                )));
            }
        }
        Ok(())
    }
}
