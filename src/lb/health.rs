//! Active health checks: the probers and the per-backend check loop.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::proxy::BackendRt;
use super::select::Transition;
use super::{HealthConfig, HealthKind, LbError};

/// How one probe is made; built once per config (the CA is read at load and reload).
pub(crate) enum Prober {
    Tcp,
    Https {
        tls: TlsConnector,
        path: String,
        server_name: Option<ServerName<'static>>,
    },
}

/// A rustls client config that trusts only the CA certificates in `ca_pem_path`.
pub(crate) fn client_config(ca_pem_path: &Path) -> Result<rustls::ClientConfig, LbError> {
    let ca_err = |reason: String| LbError::Ca {
        path: ca_pem_path.to_path_buf(),
        reason,
    };
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca_pem_path).map_err(|e| ca_err(e.to_string()))?;
    for cert in certs {
        let cert = cert.map_err(|e| ca_err(e.to_string()))?;
        roots.add(cert).map_err(|e| ca_err(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(ca_err("no certificate in the file".into()));
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ca_err(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

impl Prober {
    pub(crate) fn new(kind: &HealthKind) -> Result<Prober, LbError> {
        Ok(match kind {
            HealthKind::Tcp => Prober::Tcp,
            HealthKind::Https {
                ca_pem_path,
                path,
                server_name,
            } => {
                let config = client_config(ca_pem_path)?;
                let server_name = match server_name {
                    None => None,
                    Some(n) => Some(ServerName::try_from(n.clone()).map_err(|e| LbError::Ca {
                        path: ca_pem_path.clone(),
                        reason: format!("bad server_name {n:?}: {e}"),
                    })?),
                };
                Prober::Https {
                    tls: TlsConnector::from(Arc::new(config)),
                    path: path.clone(),
                    server_name,
                }
            }
        })
    }

    /// One probe, bounded by `timeout`; the error says what failed.
    pub(crate) async fn probe(&self, addr: SocketAddr, timeout: Duration) -> Result<(), String> {
        match tokio::time::timeout(timeout, self.probe_unbounded(addr)).await {
            Ok(r) => r,
            Err(_) => Err(format!("timed out after {} ms", timeout.as_millis())),
        }
    }

    async fn probe_unbounded(&self, addr: SocketAddr) -> Result<(), String> {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let (tls, path, server_name) = match self {
            Prober::Tcp => return Ok(()),
            Prober::Https {
                tls,
                path,
                server_name,
            } => (tls, path, server_name),
        };
        let _ = tcp.set_nodelay(true);
        let name = server_name
            .clone()
            .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()));
        let mut stream = tls
            .connect(name, tcp)
            .await
            .map_err(|e| format!("tls: {e}"))?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: kthw-lab-lb\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("send: {e}"))?;
        let mut head = Vec::with_capacity(256);
        let mut buf = [0u8; 1024];
        while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 4096 {
            let n = stream
                .read(&mut buf)
                .await
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        let line_end = head
            .windows(2)
            .position(|w| w == b"\r\n")
            .unwrap_or(head.len());
        let line = String::from_utf8_lossy(&head[..line_end]).into_owned();
        let mut parts = line.split(' ');
        let version = parts.next().unwrap_or("");
        let code = parts.next().unwrap_or("");
        if !version.starts_with("HTTP/1.") {
            return Err(format!("GET {path}: not an http answer: {line:?}"));
        }
        if code != "200" {
            return Err(format!("GET {path}: {}", line.trim()));
        }
        Ok(())
    }
}

/// Probes one backend forever at the configured interval, applying rise/fall.
pub(crate) async fn check_loop(backend: Arc<BackendRt>, prober: Arc<Prober>, cfg: HealthConfig) {
    let mut tick = tokio::time::interval(Duration::from_millis(cfg.interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let timeout = Duration::from_millis(cfg.timeout_ms);
    loop {
        tick.tick().await;
        let result = prober.probe(backend.addr, timeout).await;
        let transition = {
            let mut state = backend.health.lock().unwrap_or_else(|e| e.into_inner());
            let t = state.record(result.is_ok(), cfg.rise, cfg.fall);
            backend.counters.healthy.store(state.healthy, Relaxed);
            t
        };
        {
            let mut last = backend
                .counters
                .last_check_error
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            *last = result.as_ref().err().cloned();
        }
        match (transition, &result) {
            (Some(Transition::Down), Err(e)) => tracing::warn!(
                backend = %backend.name,
                addr = %backend.addr,
                fall = cfg.fall,
                error = %e,
                "backend down"
            ),
            (Some(Transition::Up), _) => tracing::info!(
                backend = %backend.name,
                addr = %backend.addr,
                rise = cfg.rise,
                "backend up"
            ),
            (None, Err(e)) => {
                tracing::debug!(backend = %backend.name, addr = %backend.addr, error = %e, "health check failed")
            }
            _ => {}
        }
    }
}
