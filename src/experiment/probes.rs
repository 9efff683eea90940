//! Probes: each samples one thing from the host on its own thread, every `every`,
//! each sample bounded by its timeout, independently of the steps.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::etcd::Etcd;
use super::history::Outcome;
use super::report::Sample;

/// What one sample saw.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    pub ok: bool,
    pub error: Option<String>,
    pub value: Option<String>,
    pub endpoint: Option<String>,
    pub indeterminate: bool,
}

impl Seen {
    fn ok(value: Option<String>) -> Seen {
        Seen {
            ok: true,
            value,
            ..Seen::default()
        }
    }

    fn failed(error: impl Into<String>) -> Seen {
        Seen {
            ok: false,
            error: Some(error.into()),
            ..Seen::default()
        }
    }
}

/// One kind of probe, sampled from one thread.
pub trait Sampler: Send {
    fn sample(&mut self, timeout: Duration) -> Seen;
}

/// Sample every `every` (a sample that overruns delays the next one, never
/// overlaps it) from `t0` until `stop` is set or `end` is reached.
pub fn run(
    sampler: &mut dyn Sampler,
    every: Duration,
    timeout: Duration,
    t0: Instant,
    end: Duration,
    stop: &AtomicBool,
) -> Vec<Sample> {
    let mut out = Vec::new();
    let mut next = Duration::ZERO;
    loop {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let now = t0.elapsed();
        if now >= end {
            break;
        }
        if now < next {
            std::thread::sleep((next - now).min(Duration::from_millis(50)));
            continue;
        }
        let start = t0.elapsed();
        let seen = sampler.sample(timeout);
        let took = t0.elapsed() - start;
        out.push(Sample {
            t_s: start.as_secs_f64(),
            ok: seen.ok,
            latency_ms: took.as_secs_f64() * 1000.0,
            error: seen.error,
            value: seen.value,
            endpoint: seen.endpoint,
            indeterminate: seen.indeterminate,
        });
        next = start + every;
    }
    out
}

/// The run's register key: unique per run, so a checkpoint never holds it.
pub fn register_key(run_id: &str) -> String {
    format!("/kthw-lab/experiments/{run_id}/register")
}

/// A put of the next value of the register; every attempt gets a new value.
pub struct EtcdWrite {
    pub etcd: Arc<Etcd>,
    pub key: String,
    pub next: u64,
}

impl Sampler for EtcdWrite {
    fn sample(&mut self, timeout: Duration) -> Seen {
        self.next += 1;
        let r = self.etcd.put(&self.key, self.next, timeout);
        Seen {
            ok: r.outcome == Outcome::Ok,
            error: r.error,
            value: Some(self.next.to_string()),
            endpoint: Some(r.endpoint),
            indeterminate: r.outcome == Outcome::Indeterminate,
        }
    }
}

pub struct EtcdRead {
    pub etcd: Arc<Etcd>,
    pub key: String,
}

impl Sampler for EtcdRead {
    fn sample(&mut self, timeout: Duration) -> Seen {
        let r = self.etcd.get(&self.key, timeout);
        Seen {
            ok: r.outcome == Outcome::Ok,
            error: r.error,
            value: r.value,
            endpoint: Some(r.endpoint),
            indeterminate: false,
        }
    }
}

pub struct EtcdLeader {
    pub etcd: Arc<Etcd>,
}

impl Sampler for EtcdLeader {
    fn sample(&mut self, timeout: Duration) -> Seen {
        match self.etcd.leader(timeout) {
            Ok((Some(l), detail)) => Seen {
                endpoint: Some(detail),
                ..Seen::ok(Some(l))
            },
            Ok((None, detail)) => Seen::failed(format!("no leader ({detail})")),
            Err(e) => Seen::failed(e),
        }
    }
}

pub struct ApiReady {
    pub api: crate::kube::ApiClient,
}

impl Sampler for ApiReady {
    fn sample(&mut self, timeout: Duration) -> Seen {
        match self.api.readyz(timeout) {
            Ok(()) => Seen::ok(None),
            Err(e) => Seen::failed(e.to_string()),
        }
    }
}

pub struct ApiList {
    pub api: crate::kube::ApiClient,
}

impl Sampler for ApiList {
    fn sample(&mut self, timeout: Duration) -> Seen {
        match self.api.nodes(timeout) {
            Ok(nodes) => Seen::ok(Some(format!("{} nodes", nodes.len()))),
            Err(e) => Seen::failed(e.to_string()),
        }
    }
}

pub struct ApiLease {
    pub api: crate::kube::ApiClient,
    pub lease: String,
}

impl Sampler for ApiLease {
    fn sample(&mut self, timeout: Duration) -> Seen {
        match self.api.lease_holder(&self.lease, timeout) {
            Ok(Some(holder)) => Seen::ok(Some(holder)),
            Ok(None) => Seen::failed(format!("nobody holds lease {}", self.lease)),
            Err(e) => Seen::failed(e.to_string()),
        }
    }
}

pub struct Tcp {
    pub addr: SocketAddr,
}

impl Sampler for Tcp {
    fn sample(&mut self, timeout: Duration) -> Seen {
        match TcpStream::connect_timeout(&self.addr, timeout) {
            Ok(_) => Seen::ok(None),
            Err(e) => Seen::failed(e.to_string()),
        }
    }
}

/// An ICMP echo through a raw socket (the tool runs as root).
pub struct Ping {
    pub ip: Ipv4Addr,
    pub seq: u16,
}

/// The internet checksum of `data` (RFC 1071) (pure).
pub fn icmp_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += w as u32;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMP echo request (pure).
pub fn echo_request(id: u16, seq: u16) -> Vec<u8> {
    let mut p = vec![8u8, 0, 0, 0];
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(b"kthw-lab");
    let c = icmp_checksum(&p);
    p[2..4].copy_from_slice(&c.to_be_bytes());
    p
}

fn ping_once(ip: Ipv4Addr, seq: u16, timeout: Duration) -> Result<(), String> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))
        .map_err(|e| format!("cannot open an ICMP socket (needs root): {e}"))?;
    let id = (std::process::id() & 0xffff) as u16;
    let dest: SocketAddr = (ip, 0).into();
    s.send_to(&echo_request(id, seq), &dest.into())
        .map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1500];
    loop {
        let left = timeout.saturating_sub(t0.elapsed());
        if left.is_zero() {
            return Err("no echo reply in time".into());
        }
        s.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
        let (n, from) = match s.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err("no echo reply in time".into())
            }
            Err(e) => return Err(e.to_string()),
        };
        // SAFETY: recv_from initialised the first `n` bytes.
        let b: Vec<u8> = buf[..n]
            .iter()
            .map(|x| unsafe { x.assume_init() })
            .collect();
        let ihl = (b.first().copied().unwrap_or(0) & 0x0f) as usize * 4;
        let icmp = match b.get(ihl..) {
            Some(i) if i.len() >= 8 => i,
            _ => continue,
        };
        let from_ip = from.as_socket_ipv4().map(|a| *a.ip());
        if icmp[0] == 0
            && u16::from_be_bytes([icmp[4], icmp[5]]) == id
            && u16::from_be_bytes([icmp[6], icmp[7]]) == seq
            && from_ip == Some(ip)
        {
            return Ok(());
        }
    }
}

impl Sampler for Ping {
    fn sample(&mut self, timeout: Duration) -> Seen {
        self.seq = self.seq.wrapping_add(1);
        match ping_once(self.ip, self.seq, timeout) {
            Ok(()) => Seen::ok(None),
            Err(e) => Seen::failed(e),
        }
    }
}

/// The balancer's view: ok while at least one backend takes connections; the value
/// lists those.
pub struct LbBackends {
    pub socket: std::path::PathBuf,
}

impl Sampler for LbBackends {
    fn sample(&mut self, _timeout: Duration) -> Seen {
        match crate::lb::status(&self.socket) {
            Ok(s) => {
                let up: Vec<String> = s
                    .backends
                    .iter()
                    .filter(|b| b.healthy && !b.disabled)
                    .map(|b| b.name.clone())
                    .collect();
                if up.is_empty() {
                    Seen {
                        value: Some(String::new()),
                        ..Seen::failed("no backend up")
                    }
                } else {
                    Seen::ok(Some(up.join(",")))
                }
            }
            Err(e) => Seen::failed(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_requests_carry_a_valid_checksum() {
        let p = echo_request(0x1234, 7);
        assert_eq!(p[0], 8);
        // A packet with its checksum in place sums to zero.
        assert_eq!(icmp_checksum(&p), 0);
    }

    struct Flaky(u32);
    impl Sampler for Flaky {
        fn sample(&mut self, _t: Duration) -> Seen {
            self.0 += 1;
            if self.0 % 3 == 0 {
                Seen::failed("every third")
            } else {
                Seen::ok(Some(self.0.to_string()))
            }
        }
    }

    #[test]
    fn samples_are_spaced_and_stop_at_the_end() {
        let stop = AtomicBool::new(false);
        let t0 = Instant::now();
        let v = run(
            &mut Flaky(0),
            Duration::from_millis(50),
            Duration::from_millis(10),
            t0,
            Duration::from_millis(500),
            &stop,
        );
        assert!((8..=11).contains(&v.len()), "{} samples", v.len());
        for w in v.windows(2) {
            assert!(w[1].t_s - w[0].t_s >= 0.049, "{w:?}");
        }
        assert_eq!(v.iter().filter(|s| !s.ok).count(), v.len() / 3);
    }
}
