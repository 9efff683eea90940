//! The listener, backend choice with fall-through, and the bidirectional forwarder.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::Interest;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;

use super::health::{check_loop, Prober};
use super::select::{try_order, Candidate, HealthState, Policy};
use super::stats::{BackendCounters, LbStatus, ListenerCounters};
use super::{control, Backend, HealthConfig, LbConfig, LbError};

/// Each direction's copy buffer starts at this size when its first byte arrives (most
/// API requests and answers fit) ...
const BUF_START: usize = 16 * 1024;
/// ... and grows once to this size when a read fills it (bulk transfers, fewer syscalls).
const BUF_BULK: usize = 128 * 1024;

/// One backend as the running balancer sees it. Connections hold an `Arc` to it, so a
/// backend removed by a reload keeps serving the connections it already has.
pub(crate) struct BackendRt {
    pub name: String,
    pub addr: SocketAddr,
    pub counters: BackendCounters,
    pub health: Mutex<HealthState>,
}

impl BackendRt {
    fn new(b: &Backend) -> BackendRt {
        let health = HealthState::new();
        let counters = BackendCounters::default();
        counters.healthy.store(health.healthy, Relaxed);
        BackendRt {
            name: b.name.clone(),
            addr: b.addr,
            counters,
            health: Mutex::new(health),
        }
    }
}

/// The values a connection reads once, at accept.
#[derive(Debug, Clone)]
struct Settings {
    policy: Policy,
    connect_timeout: Duration,
    idle_timeout: Duration,
    first_byte_timeout: Duration,
    max_connections: u64,
}

impl Settings {
    fn from_config(c: &LbConfig) -> Settings {
        Settings {
            policy: c.policy,
            connect_timeout: Duration::from_millis(c.connect_timeout_ms),
            idle_timeout: Duration::from_millis(c.idle_timeout_ms),
            first_byte_timeout: Duration::from_millis(c.first_byte_timeout_ms),
            max_connections: c.max_connections as u64,
        }
    }
}

struct Shared {
    config_path: PathBuf,
    listen: SocketAddr,
    started: Instant,
    settings: RwLock<Arc<Settings>>,
    backends: RwLock<Arc<Vec<Arc<BackendRt>>>>,
    health_tasks: Mutex<Vec<JoinHandle<()>>>,
    listener: ListenerCounters,
    turn: AtomicU64,
    reloads: AtomicU64,
}

impl Shared {
    fn settings(&self) -> Arc<Settings> {
        self.settings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn backends(&self) -> Arc<Vec<Arc<BackendRt>>> {
        self.backends
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Installs a config: backends that keep their name and address keep their health
    /// state, counters and connections; health checks restart with the new settings.
    fn apply(&self, config: &LbConfig, prober: Prober) {
        let old = self.backends();
        let new: Vec<Arc<BackendRt>> = config
            .backends
            .iter()
            .map(|b| {
                old.iter()
                    .find(|o| o.name == b.name && o.addr == b.addr)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(BackendRt::new(b)))
            })
            .collect();
        for o in old.iter() {
            if !new.iter().any(|n| Arc::ptr_eq(n, o)) {
                tracing::info!(backend = %o.name, addr = %o.addr,
                    active = o.counters.active.load(Relaxed), "backend removed");
            }
        }
        for n in &new {
            if !old.iter().any(|o| Arc::ptr_eq(n, o)) {
                tracing::info!(backend = %n.name, addr = %n.addr, "backend added");
            }
        }
        *self.settings.write().unwrap_or_else(|e| e.into_inner()) =
            Arc::new(Settings::from_config(config));
        *self.backends.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(new.clone());
        self.restart_health(&new, Arc::new(prober), &config.health);
    }

    fn restart_health(&self, backends: &[Arc<BackendRt>], prober: Arc<Prober>, cfg: &HealthConfig) {
        let mut tasks = self.health_tasks.lock().unwrap_or_else(|e| e.into_inner());
        for t in tasks.drain(..) {
            t.abort();
        }
        for b in backends {
            tasks.push(tokio::spawn(check_loop(
                b.clone(),
                prober.clone(),
                cfg.clone(),
            )));
        }
    }

    fn stop_health(&self) {
        let mut tasks = self.health_tasks.lock().unwrap_or_else(|e| e.into_inner());
        for t in tasks.drain(..) {
            t.abort();
        }
    }

    fn status(&self) -> LbStatus {
        let l = &self.listener;
        LbStatus {
            pid: std::process::id(),
            listen: self.listen,
            policy: self.settings().policy,
            uptime_secs: self.started.elapsed().as_secs(),
            active: l.active.load(Relaxed),
            total: l.total.load(Relaxed),
            rejected_max_conn: l.rejected_max_conn.load(Relaxed),
            no_backend: l.no_backend.load(Relaxed),
            idle_timeouts: l.idle_timeouts.load(Relaxed),
            spliced: l.spliced.load(Relaxed),
            reloads: self.reloads.load(Relaxed),
            backends: self
                .backends()
                .iter()
                .map(|b| b.counters.snapshot(&b.name, b.addr))
                .collect(),
        }
    }
}

/// A cheap handle on a running balancer: status and reload, from any task.
#[derive(Clone)]
pub struct LbHandle {
    shared: Arc<Shared>,
}

impl LbHandle {
    /// The same report the control socket answers.
    pub fn status(&self) -> LbStatus {
        self.shared.status()
    }

    /// Take the backend at `addr` out of rotation (`enabled == false`) or put it back.
    /// Its established connections are left alone either way.
    pub fn set_backend(&self, addr: &str, enabled: bool) -> Result<(), String> {
        let backends = self.shared.backends();
        let found: Vec<&Arc<BackendRt>> = backends
            .iter()
            .filter(|b| b.addr.to_string() == addr || b.name == addr)
            .collect();
        if found.is_empty() {
            let known: Vec<String> = backends.iter().map(|b| b.addr.to_string()).collect();
            return Err(format!(
                "no backend {addr} (backends: {})",
                known.join(", ")
            ));
        }
        for b in found {
            b.counters.disabled.store(!enabled, Relaxed);
            tracing::info!(backend = %b.name, addr = %b.addr, enabled, "backend set by hand");
        }
        Ok(())
    }

    /// The answer to one control request: `status` (or nothing) gives the status
    /// JSON; `enable ADDR` and `disable ADDR` give `{"ok": true}` or an error.
    pub fn answer(&self, request: &str) -> Vec<u8> {
        let mut words = request.split_whitespace();
        let reply = |r: Result<(), String>| {
            serde_json::to_vec(&match r {
                Ok(()) => serde_json::json!({"ok": true}),
                Err(e) => serde_json::json!({"ok": false, "error": e}),
            })
            .expect("json")
        };
        match (words.next(), words.next()) {
            (None | Some("status"), _) => {
                serde_json::to_vec(&self.status()).expect("status serializes")
            }
            (Some(verb @ ("enable" | "disable")), Some(addr)) => {
                reply(self.set_backend(addr, verb == "enable"))
            }
            _ => reply(Err(format!(
                "unknown request `{}` (status, enable ADDR, disable ADDR)",
                request.trim()
            ))),
        }
    }

    /// Re-reads the config file and swaps backends and settings; established connections
    /// are untouched. On error the running config stays. Must run inside the runtime.
    pub fn reload(&self) -> Result<(), LbError> {
        let s = &self.shared;
        let config = LbConfig::load(&s.config_path)?;
        let prober = Prober::new(&config.health.kind)?;
        if config.listen != s.listen {
            tracing::warn!(running = %s.listen, configured = %config.listen,
                "listen address changed; it takes effect at the next start");
        }
        s.apply(&config, prober);
        s.reloads.fetch_add(1, Relaxed);
        tracing::info!(config = %s.config_path.display(), backends = config.backends.len(), "config reloaded");
        Ok(())
    }
}

/// A bound balancer, not yet accepting.
pub struct LbServer {
    shared: Arc<Shared>,
    /// The first listener; the other acceptor threads bind their own (SO_REUSEPORT).
    listener: std::net::TcpListener,
    threads: usize,
    control: Option<tokio::net::UnixListener>,
    control_path: PathBuf,
}

fn bind_listener(addr: SocketAddr, reuseport: bool) -> Result<TcpListener, LbError> {
    let err = |source| LbError::Listen { addr, source };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    // One listener per acceptor thread; the kernel spreads new connections over them.
    socket.set_reuseport(reuseport).map_err(err)?;
    // The LB address lives on the lab bridge; after a host reboot the balancer may start
    // before the address is back. Free bind lets it listen anyway.
    set_freebind(&socket, addr);
    socket.bind(addr).map_err(err)?;
    socket.listen(4096).map_err(err)
}

fn set_freebind(socket: &TcpSocket, addr: SocketAddr) {
    let one: libc::c_int = 1;
    let (level, opt) = if addr.is_ipv4() {
        (libc::IPPROTO_IP, libc::IP_FREEBIND)
    } else {
        (libc::IPPROTO_IPV6, libc::IPV6_FREEBIND)
    };
    // SAFETY: valid fd owned by `socket`, pointer and length describe a c_int.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            opt,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "cannot set freebind");
    }
}

impl LbServer {
    /// Loads the config, binds the listener and the control socket, starts health checks
    /// (on the caller's runtime).
    pub async fn bind(config_path: &Path) -> Result<LbServer, LbError> {
        let config = LbConfig::load(config_path)?;
        let prober = Prober::new(&config.health.kind)?;
        let threads = match config.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let listen_err = |source| LbError::Listen {
            addr: config.listen,
            source,
        };
        // The control socket first: it refuses when a balancer already answers on it,
        // before SO_REUSEPORT would let a second one share the port silently.
        let control = control::bind_control(&config.control_socket)?;
        let listener = bind_listener(config.listen, threads > 1)?;
        let listen = listener.local_addr().map_err(listen_err)?;
        let listener = listener.into_std().map_err(listen_err)?;
        let shared = Arc::new(Shared {
            config_path: config_path.to_path_buf(),
            listen,
            started: Instant::now(),
            settings: RwLock::new(Arc::new(Settings::from_config(&config))),
            backends: RwLock::new(Arc::new(Vec::new())),
            health_tasks: Mutex::new(Vec::new()),
            listener: ListenerCounters::default(),
            turn: AtomicU64::new(0),
            reloads: AtomicU64::new(0),
        });
        shared.apply(&config, prober);
        tracing::info!(listen = %listen, backends = config.backends.len(),
            policy = ?config.policy, threads, "load balancer listening");
        Ok(LbServer {
            shared,
            listener,
            threads,
            control: Some(control),
            control_path: config.control_socket.clone(),
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.listen
    }

    pub fn handle(&self) -> LbHandle {
        LbHandle {
            shared: self.shared.clone(),
        }
    }

    /// Accepts until `shutdown` completes, then closes the listeners and the connections
    /// in flight. Connections are served by `threads` acceptor threads, each with its own
    /// single-threaded runtime and listener (thread per core, no cross-thread wake-ups);
    /// health checks, the control socket and reloads run on the caller's runtime.
    pub async fn serve(mut self, shutdown: impl Future<Output = ()>) -> Result<(), LbError> {
        let handle = self.handle();
        let control_task = self.control.take().map(|l| {
            let h = handle.clone();
            tokio::spawn(control::serve_control(l, move |req| h.answer(req)))
        });
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut first = Some(self.listener);
        let mut joins = Vec::new();
        let mut result = Ok(());
        for i in 0..self.threads {
            let listener = first.take();
            let shared = self.shared.clone();
            let (stop, ready) = (stop_rx.clone(), ready_tx.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("kthw-lb-{i}"))
                .spawn(move || acceptor_thread(shared, listener, stop, ready));
            match spawned {
                Ok(j) => joins.push(j),
                Err(e) => {
                    result = Err(LbError::Thread(e));
                    break;
                }
            }
        }
        drop(ready_tx);
        if result.is_ok() {
            for _ in 0..joins.len() {
                match ready_rx.recv().await {
                    Some(Ok(())) => {}
                    Some(Err(e)) => {
                        result = Err(e);
                        break;
                    }
                    None => break,
                }
            }
        }
        if result.is_ok() {
            shutdown.await;
            tracing::info!("load balancer stopping");
        }
        let _ = stop_tx.send(true);
        let _ = tokio::task::spawn_blocking(move || {
            for j in joins {
                let _ = j.join();
            }
        })
        .await;
        if let Some(t) = control_task {
            t.abort();
        }
        self.shared.stop_health();
        let _ = std::fs::remove_file(&self.control_path);
        result
    }
}

/// One acceptor: its own current-thread runtime, listener, and the connections it
/// accepted. Reports binding success or failure on `ready` before accepting.
fn acceptor_thread(
    shared: Arc<Shared>,
    listener: Option<std::net::TcpListener>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    ready: tokio::sync::mpsc::UnboundedSender<Result<(), LbError>>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(LbError::Thread(e)));
            return;
        }
    };
    rt.block_on(async move {
        let addr = shared.listen;
        let bound = match listener {
            Some(l) => TcpListener::from_std(l).map_err(|source| LbError::Listen { addr, source }),
            None => bind_listener(addr, true),
        };
        let listener = match bound {
            Ok(l) => l,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let _ = ready.send(Ok(()));
        loop {
            tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => break,
                accepted = listener.accept() => match accepted {
                    Ok((client, _peer)) => admit(&shared, client),
                    Err(e) => {
                        // Out of descriptors or similar: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
    });
    // Dropping the runtime closes this thread's connections.
}

fn admit(shared: &Arc<Shared>, client: TcpStream) {
    let settings = shared.settings();
    let l = &shared.listener;
    let max = settings.max_connections;
    if l.active
        .fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1))
        .is_err()
    {
        l.rejected_max_conn.fetch_add(1, Relaxed);
        drop(client);
        return;
    }
    l.total.fetch_add(1, Relaxed);
    let shared = shared.clone();
    tokio::spawn(async move {
        let _guard = Decrement(&shared.listener.active);
        serve_client(&shared, &settings, client).await;
    });
}

/// Decrements a gauge when dropped, so every exit path counts.
struct Decrement<'a>(&'a AtomicU64);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Connects to the first backend that answers, in selection order.
async fn connect_backend(
    shared: &Shared,
    settings: &Settings,
) -> Option<(Arc<BackendRt>, TcpStream)> {
    let backends = shared.backends();
    let candidates: Vec<Candidate> = backends
        .iter()
        .map(|b| Candidate {
            healthy: b.counters.healthy.load(Relaxed) && !b.counters.disabled.load(Relaxed),
            active: b.counters.active.load(Relaxed),
        })
        .collect();
    let turn = shared.turn.fetch_add(1, Relaxed);
    for i in try_order(settings.policy, &candidates, turn) {
        let b = &backends[i];
        match connect_fast(b.addr, settings.connect_timeout).await {
            Ok(Ok(s)) => return Some((b.clone(), s)),
            Ok(Err(e)) => {
                b.counters.connect_failures.fetch_add(1, Relaxed);
                tracing::debug!(backend = %b.name, error = %e, "connect failed, trying the next backend");
            }
            Err(_) => {
                b.counters.connect_failures.fetch_add(1, Relaxed);
                tracing::debug!(backend = %b.name, "connect timed out, trying the next backend");
            }
        }
    }
    None
}

/// Connects without a trip through the event loop when the handshake is already done
/// by the time connect(2) returns (always on loopback, often on a bridge): a zero-timeout
/// poll(2) tells. Otherwise waits for writability, bounded by `timeout`.
/// Outer error: timed out; inner: refused or failed.
async fn connect_fast(
    addr: SocketAddr,
    timeout: Duration,
) -> Result<std::io::Result<TcpStream>, tokio::time::error::Elapsed> {
    let attempt = || -> std::io::Result<(TcpStream, bool)> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM.nonblocking().cloexec(),
            None,
        )?;
        let pending = match socket.connect(&addr.into()) {
            Ok(()) => false,
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => true,
            Err(e) => return Err(e),
        };
        let done = !pending || {
            let mut pfd = libc::pollfd {
                fd: socket.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            };
            // SAFETY: one valid pollfd, zero timeout.
            let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
            rc == 1 && pfd.revents != 0
        };
        if done {
            if let Some(e) = socket.take_error()? {
                return Err(e);
            }
        }
        let std: std::net::TcpStream = socket.into();
        Ok((TcpStream::from_std(std)?, done))
    };
    let (stream, done) = match attempt() {
        Ok(v) => v,
        Err(e) => return Ok(Err(e)),
    };
    if done {
        return Ok(Ok(stream));
    }
    tokio::time::timeout(timeout, async {
        stream.writable().await?;
        match stream.take_error()? {
            Some(e) => Err(e),
            None => Ok(()),
        }
    })
    .await
    .map(|r| r.map(|()| stream))
}

async fn serve_client(shared: &Shared, settings: &Settings, client: TcpStream) {
    let Some((backend, server)) = connect_backend(shared, settings).await else {
        shared.listener.no_backend.fetch_add(1, Relaxed);
        tracing::debug!("no backend accepted the connection");
        return;
    };
    let c = &backend.counters;
    c.active.fetch_add(1, Relaxed);
    c.total.fetch_add(1, Relaxed);
    let _guard = Decrement(&c.active);
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    if let Ended::Idle = forward(client, server, settings, c, &shared.listener.spliced).await {
        shared.listener.idle_timeouts.fetch_add(1, Relaxed);
    }
}

enum Ended {
    Done,
    Error,
    Idle,
}

/// Activity clock of one connection, shared by its two directions (same task).
struct Activity {
    start: Instant,
    /// Milliseconds since `start` of the last byte moved in either direction.
    last_ms: AtomicU64,
    client_spoke: AtomicBool,
}

impl Activity {
    fn touch(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Relaxed);
    }

    /// When the connection must be closed if nothing happens before.
    fn deadline(&self, s: &Settings) -> Instant {
        let idle = self.start + Duration::from_millis(self.last_ms.load(Relaxed)) + s.idle_timeout;
        if self.client_spoke.load(Relaxed) {
            idle
        } else {
            idle.min(self.start + s.first_byte_timeout)
        }
    }
}

/// Copies both directions until both have ended, one fails, or the connection idles out.
/// End of stream on one side is passed on as a write shutdown to the other side, and the
/// other direction keeps flowing (half-close).
async fn forward(
    client: TcpStream,
    server: TcpStream,
    settings: &Settings,
    counters: &BackendCounters,
    spliced: &AtomicU64,
) -> Ended {
    let (cr, cw) = (&client, &client);
    let (sr, sw) = (&server, &server);
    let activity = Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
        client_spoke: AtomicBool::new(false),
    };
    let (up_ended, down_ended) = (AtomicBool::new(false), AtomicBool::new(false));
    let up = pump(
        cr,
        sw,
        &activity,
        &counters.bytes_in,
        Some(&activity.client_spoke),
        spliced,
        [&up_ended, &down_ended],
    );
    let down = pump(
        sr,
        cw,
        &activity,
        &counters.bytes_out,
        None,
        spliced,
        [&down_ended, &up_ended],
    );
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    let timer = tokio::time::sleep_until(activity.deadline(settings).into());
    tokio::pin!(timer);
    let ended = loop {
        tokio::select! {
            r = &mut up, if !up_done => match r {
                Ok(()) => up_done = true,
                Err(_) => break Ended::Error,
            },
            r = &mut down, if !down_done => match r {
                Ok(()) => down_done = true,
                Err(_) => break Ended::Error,
            },
            () = &mut timer => {
                let deadline = activity.deadline(settings);
                if Instant::now() >= deadline {
                    break Ended::Idle;
                }
                timer.as_mut().reset(deadline.into());
            }
        }
        if up_done && down_done {
            break Ended::Done;
        }
    };
    if let Ended::Error = ended {
        // A reset or failed write on one side: the other side must not mistake the end
        // for a clean end of stream, so both are closed with a reset too.
        for s in [&client, &server] {
            let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
        }
    }
    ended
}

fn raw_recv(s: &TcpStream, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    let spare = buf.spare_capacity_mut();
    // SAFETY: writes at most spare.len() bytes into the vector's spare capacity.
    let n = unsafe {
        libc::recv(
            s.as_raw_fd(),
            spare.as_mut_ptr().cast(),
            spare.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel initialised these n bytes.
    unsafe { buf.set_len(buf.len() + n as usize) };
    Ok(n as usize)
}

fn raw_send(s: &TcpStream, data: &[u8]) -> std::io::Result<usize> {
    // SAFETY: reads data.len() bytes from a valid slice.
    let n = unsafe {
        libc::send(
            s.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

fn would_block(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
    )
}

/// Reads what is there (at least one byte, or 0 at end of stream) into `buf`, which is
/// (re)allocated with `size` bytes of capacity. With `speculative`, reads first without
/// asking the event loop (the data is likely there: a fresh connection whose client
/// spoke first, or a read that filled the buffer). While waiting, no buffer is held, so
/// a quiet connection costs no copy memory.
///
/// Raw reads leave tokio's readiness as it was; that only ever costs a spurious wake-up,
/// since every later arrival is a new epoll edge.
async fn read_some(
    s: &TcpStream,
    buf: &mut Vec<u8>,
    size: usize,
    speculative: bool,
) -> std::io::Result<usize> {
    if speculative {
        if buf.capacity() < size {
            *buf = Vec::with_capacity(size);
        }
        match raw_recv(s, buf) {
            Err(e) if would_block(&e) => {}
            r => return r,
        }
    }
    *buf = Vec::new();
    s.readable().await?;
    *buf = Vec::with_capacity(size);
    s.async_io(Interest::READABLE, || raw_recv(s, buf)).await
}

/// Writes everything, trying the socket first and the event loop only when it is full.
async fn write_all(s: &TcpStream, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        let n = match raw_send(s, data) {
            Ok(n) => n,
            Err(e) if would_block(&e) => {
                s.async_io(Interest::WRITABLE, || raw_send(s, data)).await?
            }
            Err(e) => return Err(e),
        };
        data = &data[n..];
    }
    Ok(())
}

/// Passes end of stream on: the peer reads EOF and can still send (half-close).
fn shutdown_write(s: &TcpStream) -> std::io::Result<()> {
    // SAFETY: valid socket fd borrowed from `s`.
    if unsafe { libc::shutdown(s.as_raw_fd(), libc::SHUT_WR) } == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    // The peer may be gone already; the other direction will report it.
    if e.raw_os_error() == Some(libc::ENOTCONN) {
        return Ok(());
    }
    Err(e)
}

/// Copies one direction. Starts with a small user-space buffer (allocated at the first
/// byte, never zeroed); a direction that keeps filling the large buffer is a bulk
/// transfer and switches to splice(2) through a pipe, so its bytes stay in the kernel.
async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    activity: &Activity,
    bytes: &AtomicU64,
    first: Option<&AtomicBool>,
    spliced: &AtomicU64,
    ended: [&AtomicBool; 2],
) -> std::io::Result<()> {
    let mut buf: Vec<u8> = Vec::new();
    let mut size = BUF_START;
    // The client of a fresh connection has usually spoken already.
    let mut speculative = first.is_some();
    loop {
        buf.clear();
        let n = read_some(from, &mut buf, size, speculative).await?;
        if n == 0 {
            return pass_on_eof(to, ended);
        }
        let full = n == buf.capacity();
        if !full {
            forget_readable(from);
        }
        speculative = full;
        if let Some(flag) = first {
            flag.store(true, Relaxed);
        }
        activity.touch();
        // Counted before the write, so a peer that got the bytes sees them counted.
        bytes.fetch_add(n as u64, Relaxed);
        write_all(to, &buf[..n]).await?;
        activity.touch();
        if full {
            if size < BUF_BULK {
                size = BUF_BULK;
            } else if let Some(pipe) = Pipe::new() {
                drop(buf);
                spliced.fetch_add(1, Relaxed);
                return splice_loop(from, to, &pipe, activity, bytes, ended).await;
            }
        }
    }
}

/// A read shorter than the buffer emptied the socket: drop its readable state now rather
/// than learn it from one more read failing with EAGAIN (a syscall per message saved).
///
/// Only sound where the I/O driver cannot run between the read and this call, that is
/// on the current-thread runtimes of the acceptor threads: there, data that arrives later
/// is a new epoll edge with a new tick, which this clear cannot erase. End of stream is
/// never cleared by tokio, so an EOF that came with the data is not lost either.
fn forget_readable(s: &TcpStream) {
    let _ = s.try_io(Interest::READABLE, || {
        Err::<(), _>(std::io::ErrorKind::WouldBlock.into())
    });
}

/// End of stream from one side. `ended` is [this direction, the other]. When the other
/// direction has ended too, the connection closes right away and close(2) sends the FIN,
/// so the shutdown call is skipped.
fn pass_on_eof(to: &TcpStream, ended: [&AtomicBool; 2]) -> std::io::Result<()> {
    ended[0].store(true, Relaxed);
    if ended[1].load(Relaxed) {
        return Ok(());
    }
    shutdown_write(to)
}

/// A non-blocking pipe used as the in-kernel buffer of splice(2).
struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

impl Pipe {
    /// `None` when no pipe can be made (out of descriptors): the caller keeps copying.
    fn new() -> Option<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: fds is a valid two-element array for pipe2 to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return None;
        }
        // SAFETY: pipe2 succeeded, both descriptors are new and owned here.
        let pipe = unsafe {
            Pipe {
                r: OwnedFd::from_raw_fd(fds[0]),
                w: OwnedFd::from_raw_fd(fds[1]),
            }
        };
        // Best effort: a bigger pipe means fewer splices per megabyte.
        // SAFETY: fcntl on our own descriptor.
        unsafe {
            libc::fcntl(
                pipe.w.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                BUF_BULK as libc::c_int,
            )
        };
        Some(pipe)
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> std::io::Result<usize> {
    // SAFETY: plain syscall on descriptors owned by the caller; null offsets (streams).
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Socket to pipe, pipe to socket, until end of stream. The pipe is drained before the
/// next read, so a full pipe never blocks the read side.
async fn splice_loop(
    from: &TcpStream,
    to: &TcpStream,
    pipe: &Pipe,
    activity: &Activity,
    bytes: &AtomicU64,
    ended: [&AtomicBool; 2],
) -> std::io::Result<()> {
    let (from_fd, to_fd) = (from.as_raw_fd(), to.as_raw_fd());
    let (pr, pw) = (pipe.r.as_raw_fd(), pipe.w.as_raw_fd());
    loop {
        let n = from
            .async_io(Interest::READABLE, || splice(from_fd, pw, BUF_BULK))
            .await?;
        if n == 0 {
            return pass_on_eof(to, ended);
        }
        activity.touch();
        bytes.fetch_add(n as u64, Relaxed);
        let mut left = n;
        while left > 0 {
            left -= to
                .async_io(Interest::WRITABLE, || splice(pr, to_fd, left))
                .await?;
        }
        activity.touch();
    }
}

/// Runs the balancer in the foreground until `shutdown` completes; SIGHUP reloads the
/// config file (changed backends, policy, timeouts, health checks) without dropping
/// established connections.
pub async fn run(config_path: &Path, shutdown: impl Future<Output = ()>) -> Result<(), LbError> {
    let server = LbServer::bind(config_path).await?;
    let handle = server.handle();
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(LbError::SignalHandler)?;
    let reloader = tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("sighup: reloading config");
            if let Err(e) = handle.reload() {
                let mut chain = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    chain.push_str(": ");
                    chain.push_str(&s.to_string());
                    src = s.source();
                }
                tracing::error!(error = %chain, "reload failed, keeping the running config");
            }
        }
    });
    let r = server.serve(shutdown).await;
    reloader.abort();
    r
}

/// Runs the balancer until SIGTERM or SIGINT on a runtime of its own (the foreground
/// of `kthw-lab lb run`): a current-thread runtime for health checks, control and
/// signals, plus the acceptor threads.
pub fn run_blocking(config_path: &Path) -> Result<(), LbError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(LbError::Thread)?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(LbError::SignalHandler)?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        run(config_path, shutdown).await
    })
}
