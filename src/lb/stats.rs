//! Counters kept while the balancer runs, and the status report built from them.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::select::Policy;

/// Live counters of one backend, shared by its health task and its connections.
#[derive(Debug, Default)]
pub(crate) struct BackendCounters {
    pub healthy: AtomicBool,
    /// Taken out by hand (`set_backend`): no new connection goes to it, whatever its
    /// health; its established connections stay.
    pub disabled: AtomicBool,
    pub active: AtomicU64,
    pub total: AtomicU64,
    /// Connects that were refused or timed out (the next backend was tried).
    pub connect_failures: AtomicU64,
    /// Client to backend.
    pub bytes_in: AtomicU64,
    /// Backend to client.
    pub bytes_out: AtomicU64,
    pub last_check_error: Mutex<Option<String>>,
}

/// Counters of the whole listener.
#[derive(Debug, Default)]
pub(crate) struct ListenerCounters {
    pub active: AtomicU64,
    pub total: AtomicU64,
    /// Clients closed at accept because `max_connections` was reached.
    pub rejected_max_conn: AtomicU64,
    /// Clients closed because no backend accepted the connection.
    pub no_backend: AtomicU64,
    pub idle_timeouts: AtomicU64,
    /// Connection directions that turned out to be bulk and moved to splice(2).
    pub spliced: AtomicU64,
}

impl BackendCounters {
    pub(crate) fn snapshot(&self, name: &str, addr: SocketAddr) -> BackendStatus {
        BackendStatus {
            name: name.to_string(),
            addr,
            healthy: self.healthy.load(Relaxed),
            disabled: self.disabled.load(Relaxed),
            active: self.active.load(Relaxed),
            total: self.total.load(Relaxed),
            connect_failures: self.connect_failures.load(Relaxed),
            bytes_in: self.bytes_in.load(Relaxed),
            bytes_out: self.bytes_out.load(Relaxed),
            last_check_error: self
                .last_check_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }
}

/// One backend in `kthw-lab lb status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub name: String,
    pub addr: SocketAddr,
    pub healthy: bool,
    /// Taken out of rotation through the control socket.
    #[serde(default)]
    pub disabled: bool,
    pub active: u64,
    pub total: u64,
    pub connect_failures: u64,
    /// Bytes from clients to this backend.
    pub bytes_in: u64,
    /// Bytes from this backend to clients.
    pub bytes_out: u64,
    /// The last failed health check, cleared by a passing one.
    pub last_check_error: Option<String>,
}

/// What `kthw-lab lb status` reports (also as JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LbStatus {
    pub pid: u32,
    pub listen: SocketAddr,
    pub policy: Policy,
    pub uptime_secs: u64,
    pub active: u64,
    pub total: u64,
    pub rejected_max_conn: u64,
    pub no_backend: u64,
    pub idle_timeouts: u64,
    /// Connection directions that turned out to be bulk and moved to zero-copy splice.
    #[serde(default)]
    pub spliced: u64,
    pub reloads: u64,
    pub backends: Vec<BackendStatus>,
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The human form of [`LbStatus`]: a summary line and one row per backend.
pub fn render_table(s: &LbStatus) -> String {
    let mut out = String::new();
    let policy = match s.policy {
        Policy::RoundRobin => "round-robin",
        Policy::LeastConn => "least-conn",
    };
    let _ = writeln!(
        out,
        "listen {}  policy {}  pid {}  up {}s  active {}  total {}  rejected {}  no-backend {}  idle-closed {}  reloads {}",
        s.listen,
        policy,
        s.pid,
        s.uptime_secs,
        s.active,
        s.total,
        s.rejected_max_conn,
        s.no_backend,
        s.idle_timeouts,
        s.reloads
    );
    let header = [
        "BACKEND",
        "ADDRESS",
        "HEALTH",
        "ACTIVE",
        "TOTAL",
        "FAILED",
        "BYTES IN",
        "BYTES OUT",
        "LAST CHECK ERROR",
    ];
    let rows: Vec<[String; 9]> = s
        .backends
        .iter()
        .map(|b| {
            [
                b.name.clone(),
                b.addr.to_string(),
                match (b.disabled, b.healthy) {
                    (true, _) => "disabled",
                    (false, true) => "up",
                    (false, false) => "down",
                }
                .to_string(),
                b.active.to_string(),
                b.total.to_string(),
                b.connect_failures.to_string(),
                human_bytes(b.bytes_in),
                human_bytes(b.bytes_out),
                b.last_check_error.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: &[&str]| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                let _ = write!(l, "{c:<w$}  ", w = widths[i]);
            }
        }
        l.trim_end().to_string() + "\n"
    };
    out.push_str(&line(&header));
    for r in &rows {
        let cells: Vec<&str> = r.iter().map(String::as_str).collect();
        out.push_str(&line(&cells));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_has_one_row_per_backend_and_aligned_columns() {
        let s = LbStatus {
            pid: 42,
            listen: "127.0.0.1:6443".parse().unwrap(),
            policy: Policy::LeastConn,
            uptime_secs: 5,
            active: 1,
            total: 9,
            rejected_max_conn: 0,
            no_backend: 0,
            idle_timeouts: 0,
            spliced: 0,
            reloads: 1,
            backends: vec![
                BackendStatus {
                    name: "controller-0".into(),
                    addr: "10.240.0.10:6443".parse().unwrap(),
                    healthy: true,
                    disabled: false,
                    active: 1,
                    total: 5,
                    connect_failures: 0,
                    bytes_in: 2048,
                    bytes_out: 10,
                    last_check_error: None,
                },
                BackendStatus {
                    name: "c1".into(),
                    addr: "10.240.0.11:6443".parse().unwrap(),
                    healthy: false,
                    disabled: false,
                    active: 0,
                    total: 4,
                    connect_failures: 2,
                    bytes_in: 0,
                    bytes_out: 0,
                    last_check_error: Some("connect refused".into()),
                },
            ],
        };
        let t = render_table(&s);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(lines[0].contains("policy least-conn"));
        assert!(lines[2].starts_with("controller-0  10.240.0.10:6443  up "));
        assert!(lines[2].contains("2.0 KiB"));
        assert!(lines[3].starts_with("c1            10.240.0.11:6443  down"));
        assert!(lines[3].ends_with("connect refused"));
        let col = lines[1].find("HEALTH").unwrap();
        assert_eq!(&lines[3][col..col + 4], "down");
    }

    #[test]
    fn status_round_trips_as_json() {
        let s = LbStatus {
            pid: 1,
            listen: "127.0.0.1:1".parse().unwrap(),
            policy: Policy::RoundRobin,
            uptime_secs: 0,
            active: 0,
            total: 0,
            rejected_max_conn: 0,
            no_backend: 0,
            idle_timeouts: 0,
            spliced: 0,
            reloads: 0,
            backends: vec![],
        };
        let j = serde_json::to_string(&s).unwrap();
        assert!(j.contains("\"policy\":\"round_robin\""));
        assert_eq!(serde_json::from_str::<LbStatus>(&j).unwrap(), s);
    }
}
