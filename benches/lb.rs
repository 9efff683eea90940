//! `cargo bench --bench lb`: the built-in balancer side by side with HAProxy and nginx
//! stream, same backends on loopback, configured equivalently: TCP mode, round robin over
//! two backends, 3 s connect timeout, 1 h idle timeout, half-close passed on (nginx's
//! `proxy_half_close on`; HAProxy and kthw-lab do it by default), 2 threads or workers,
//! 8000 connections at most, TCP health checks every 2 s (nginx open source has none).
//!
//! Rows: long-transfer throughput, short-connection rate, latency added by the proxy
//! (request on an open connection, and a whole new connection), peak RSS. Every load is
//! bounded by count and time. Environment: `LB_BENCH_SECS` (seconds per load, default 1),
//! `LB_BENCH_ROUNDS` (rounds of throughput and rate loads, median reported, default 5),
//! `LB_BENCH_ONLY` (comma list of kthw,haproxy,nginx).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Backend protocol: first byte `S` + u64 LE length: the backend streams that many
/// bytes and closes; first byte `E`: echo until EOF, then close.
async fn backend(listener: TcpListener) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let _ = s.set_nodelay(true);
            let mut cmd = [0u8; 1];
            if s.read_exact(&mut cmd).await.is_err() {
                return;
            }
            match cmd[0] {
                b'S' => {
                    let mut len = [0u8; 8];
                    if s.read_exact(&mut len).await.is_err() {
                        return;
                    }
                    let mut left = u64::from_le_bytes(len);
                    let chunk = vec![0x5au8; 256 * 1024];
                    while left > 0 {
                        let n = left.min(chunk.len() as u64) as usize;
                        if s.write_all(&chunk[..n]).await.is_err() {
                            return;
                        }
                        left -= n as u64;
                    }
                    let _ = s.shutdown().await;
                }
                b'E' => {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if s.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    let _ = s.shutdown().await;
                }
                _ => {}
            }
        });
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Proxy {
    name: &'static str,
    child: Child,
    addr: SocketAddr,
}

impl Proxy {
    /// Peak resident memory of the proxy and its children (nginx workers), in MB.
    fn peak_rss_mb(&self) -> f64 {
        let root = self.child.id();
        let mut pids = vec![root];
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for e in dir.flatten() {
                let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                    continue;
                };
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                let ppid = stat
                    .rsplit_once(')')
                    .and_then(|(_, r)| r.split_whitespace().nth(1))
                    .and_then(|p| p.parse::<u32>().ok());
                if ppid == Some(root) {
                    pids.push(pid);
                }
            }
        }
        let mut kb = 0u64;
        for pid in pids {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            for line in status.lines() {
                if let Some(v) = line.strip_prefix("VmHWM:") {
                    kb += v
                        .trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .unwrap_or(0);
                }
            }
        }
        kb as f64 / 1024.0
    }

    fn stop(self) {
        drop(self);
    }
}

/// Stopped however the benchmark ends, so no proxy outlives it.
impl Drop for Proxy {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SAFETY: plain kill(2) on our own, not yet reaped, child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_listening(addr: SocketAddr, child: &mut Child, name: &str, log: &Path) {
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        if std::net::TcpStream::connect(addr).is_ok() {
            return;
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "{name} exited with {st}: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{name} did not listen on {addr}");
}

fn spawn(name: &'static str, cmd: &mut Command, addr: SocketAddr, log: PathBuf) -> Proxy {
    let out = std::fs::File::create(&log).unwrap();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
    wait_listening(addr, &mut child, name, &log);
    Proxy { name, child, addr }
}

fn start_kthw(dir: &Path, backends: &[SocketAddr]) -> Proxy {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let config = kthw_lab::lb::LbConfig {
        listen: addr,
        backends: backends
            .iter()
            .enumerate()
            .map(|(i, a)| kthw_lab::lb::Backend {
                name: format!("b{i}"),
                addr: *a,
            })
            .collect(),
        policy: kthw_lab::lb::Policy::RoundRobin,
        health: kthw_lab::lb::HealthConfig {
            kind: kthw_lab::lb::HealthKind::Tcp,
            interval_ms: 2000,
            timeout_ms: 1000,
            rise: 2,
            fall: 3,
        },
        connect_timeout_ms: 3000,
        idle_timeout_ms: 3_600_000,
        first_byte_timeout_ms: 10_000,
        max_connections: 8_000,
        control_socket: dir.join("kthw-lb.sock"),
        threads: std::env::var("LB_BENCH_KTHW_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2),
    };
    let path = dir.join("kthw-lb.json");
    config.save(&path).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kthw-lb"));
    cmd.arg("--config").arg(&path).env("RUST_LOG", "warn");
    spawn("kthw-lab", &mut cmd, addr, dir.join("kthw-lb.log"))
}

fn start_haproxy(dir: &Path, backends: &[SocketAddr]) -> Proxy {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let servers: String = backends
        .iter()
        .enumerate()
        .map(|(i, a)| format!("    server b{i} {a} check inter 2s rise 2 fall 3\n"))
        .collect();
    let cfg = format!(
        "global\n    maxconn 8000\n    nbthread 2\n\
         defaults\n    mode tcp\n    timeout connect 3s\n    timeout client 1h\n    timeout server 1h\n\
         frontend fe\n    bind {addr}\n    default_backend be\n\
         backend be\n    balance roundrobin\n{servers}"
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, cfg).unwrap();
    let mut cmd = Command::new("haproxy");
    cmd.arg("-db").arg("-f").arg(&path);
    spawn("haproxy", &mut cmd, addr, dir.join("haproxy.log"))
}

fn start_nginx(dir: &Path, backends: &[SocketAddr]) -> Proxy {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let servers: String = backends
        .iter()
        .map(|a| format!("        server {a};\n"))
        .collect();
    let d = dir.display();
    let cfg = format!(
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
         daemon off;\nmaster_process on;\nworker_processes 2;\n\
         pid {d}/nginx.pid;\nerror_log {d}/nginx-error.log warn;\n\
         events {{ worker_connections 8000; }}\n\
         stream {{\n    upstream be {{\n{servers}    }}\n    server {{\n        listen {addr};\n        \
         proxy_pass be;\n        proxy_connect_timeout 3s;\n        proxy_timeout 1h;\n        proxy_half_close on;\n    }}\n}}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, cfg).unwrap();
    let mut cmd = Command::new("nginx");
    cmd.arg("-c")
        .arg(&path)
        .arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join("nginx-error.log"));
    spawn("nginx", &mut cmd, addr, dir.join("nginx.log"))
}

#[derive(Debug, Clone, Default)]
struct Figures {
    mb_per_s: f64,
    conn_per_s: f64,
    req_p50_us: f64,
    req_p99_us: f64,
    conn_p50_us: f64,
    conn_p99_us: f64,
    rss_mb: f64,
}

/// Parallel long downloads for `secs`: MB/s through `addr`.
async fn throughput(addr: SocketAddr, streams: usize, secs: f64) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let total = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..streams {
        let (stop, total) = (stop.clone(), total.clone());
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let mut req = vec![b'S'];
            req.extend_from_slice(&(64u64 << 30).to_le_bytes());
            s.write_all(&req).await.unwrap();
            let mut buf = vec![0u8; 256 * 1024];
            while !stop.load(Relaxed) {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        total.fetch_add(n as u64, Relaxed);
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Relaxed);
    let bytes = total.load(Relaxed);
    let elapsed = t0.elapsed().as_secs_f64();
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
    }
    bytes as f64 / elapsed / 1e6
}

/// One short connection: connect, one byte there and back, close.
async fn short_conn(addr: SocketAddr) -> std::io::Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    s.write_all(b"Ex").await?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await?;
    Ok(())
}

/// Short connections from `clients` concurrent loops for `secs` (and at most 200k).
async fn conn_rate(addr: SocketAddr, clients: usize, secs: f64) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (done, errors) = (done.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline && done.load(Relaxed) < 200_000 {
                match tokio::time::timeout(Duration::from_secs(2), short_conn(addr)).await {
                    Ok(Ok(())) => done.fetch_add(1, Relaxed),
                    _ => errors.fetch_add(1, Relaxed),
                };
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let e = errors.load(Relaxed);
    if e > 0 {
        eprintln!("  ({e} short connections failed against {addr})");
    }
    done.load(Relaxed) as f64 / t0.elapsed().as_secs_f64()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn p50_p99(mut samples: Vec<f64>) -> (f64, f64) {
    samples.sort_by(f64::total_cmp);
    (percentile(&samples, 0.5), percentile(&samples, 0.99))
}

/// Round trips of 64 bytes on one open connection per target, the targets taking turns
/// so that noise from the shared host hits all of them alike: (p50, p99) in us each.
async fn request_latency(targets: &[SocketAddr], n: usize) -> Vec<(f64, f64)> {
    let mut conns = Vec::new();
    for &a in targets {
        let mut s = TcpStream::connect(a).await.unwrap();
        s.set_nodelay(true).unwrap();
        s.write_all(b"E").await.unwrap();
        conns.push(s);
    }
    let msg = [0x42u8; 64];
    let mut back = [0u8; 64];
    let mut samples = vec![Vec::with_capacity(n); targets.len()];
    for i in 0..n + 200 {
        for (k, s) in conns.iter_mut().enumerate() {
            let t = Instant::now();
            s.write_all(&msg).await.unwrap();
            s.read_exact(&mut back).await.unwrap();
            if i >= 200 {
                samples[k].push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
    }
    samples.into_iter().map(p50_p99).collect()
}

/// Whole short connections one after another, targets taking turns: (p50, p99) in us.
async fn connect_latency(targets: &[SocketAddr], n: usize) -> Vec<(f64, f64)> {
    let mut samples = vec![Vec::with_capacity(n); targets.len()];
    for i in 0..n + 50 {
        for (k, &a) in targets.iter().enumerate() {
            let t = Instant::now();
            short_conn(a).await.unwrap();
            if i >= 50 {
                samples[k].push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
    }
    samples.into_iter().map(p50_p99).collect()
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is understood.
    let secs: f64 = std::env::var("LB_BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.0);
    let rounds: usize = std::env::var("LB_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let only = std::env::var("LB_BENCH_ONLY").unwrap_or_else(|_| "kthw,haproxy,nginx".into());
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let backends: Vec<SocketAddr> = rt.block_on(async {
        let mut v = Vec::new();
        for _ in 0..2 {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            v.push(l.local_addr().unwrap());
            tokio::spawn(backend(l));
        }
        v
    });
    eprintln!(
        "lb bench: {rounds} rounds of {secs} s per load, backends {backends:?}, dir {}",
        dir.path().display()
    );
    type Starter = fn(&Path, &[SocketAddr]) -> Proxy;
    let starters: [(&str, Starter); 3] = [
        ("kthw", start_kthw),
        ("haproxy", start_haproxy),
        ("nginx", start_nginx),
    ];
    // All proxies run side by side; each load goes to one target at a time.
    let proxies: Vec<Proxy> = starters
        .iter()
        .filter(|(key, _)| only.split(',').any(|o| o == *key))
        .map(|(_, start)| start(dir.path(), &backends))
        .collect();
    let mut targets = vec![backends[0]];
    targets.extend(proxies.iter().map(|p| p.addr));
    let mut figures = vec![Figures::default(); targets.len()];
    let name = |i: usize| {
        if i == 0 {
            "direct"
        } else {
            proxies[i - 1].name
        }
    };
    // The host is shared (2 cores, other jobs): several short rounds, targets taking
    // turns inside each round, and the median per target.
    let mut mbs = vec![Vec::new(); targets.len()];
    let mut rates = vec![Vec::new(); targets.len()];
    for round in 1..=rounds {
        for (i, &t) in targets.iter().enumerate() {
            eprintln!("round {round}/{rounds}: {} on {t}: throughput ...", name(i));
            mbs[i].push(rt.block_on(throughput(t, 4, secs)));
        }
        for (i, &t) in targets.iter().enumerate() {
            eprintln!(
                "round {round}/{rounds}: {} on {t}: connection rate ...",
                name(i)
            );
            rates[i].push(rt.block_on(conn_rate(t, 32, secs)));
        }
    }
    let mut spread = Vec::new();
    for i in 0..targets.len() {
        spread.push(format!(
            "  {:<10} throughput {:?} MB/s, rate {:?} conn/s",
            name(i),
            mbs[i].iter().map(|v| v.round()).collect::<Vec<_>>(),
            rates[i].iter().map(|v| v.round()).collect::<Vec<_>>()
        ));
        figures[i].mb_per_s = median(&mut mbs[i]);
        figures[i].conn_per_s = median(&mut rates[i]);
    }
    eprintln!("latency, all targets in turn ...");
    for (i, (p50, p99)) in rt
        .block_on(request_latency(&targets, 5000))
        .into_iter()
        .enumerate()
    {
        figures[i].req_p50_us = p50;
        figures[i].req_p99_us = p99;
    }
    for (i, (p50, p99)) in rt
        .block_on(connect_latency(&targets, 1000))
        .into_iter()
        .enumerate()
    {
        figures[i].conn_p50_us = p50;
        figures[i].conn_p99_us = p99;
    }
    let direct = figures[0].clone();
    let mut results: Vec<(&'static str, Figures)> = Vec::new();
    for (p, f) in proxies.into_iter().zip(figures.into_iter().skip(1)) {
        let mut f = f;
        f.rss_mb = p.peak_rss_mb();
        results.push((p.name, f));
        p.stop();
    }

    println!();
    println!(
        "direct to backend: {:.0} MB/s, {:.0} conn/s, request p50/p99 {:.1}/{:.1} us, new connection p50/p99 {:.1}/{:.1} us",
        direct.mb_per_s, direct.conn_per_s, direct.req_p50_us, direct.req_p99_us, direct.conn_p50_us, direct.conn_p99_us
    );
    println!();
    type Row = (&'static str, fn(&Figures, &Figures) -> f64, bool);
    let rows: [Row; 7] = [
        ("long-transfer throughput (MB/s)", |f, _| f.mb_per_s, true),
        ("short connections (conn/s)", |f, _| f.conn_per_s, true),
        (
            "added latency p50, request (us)",
            |f, d| f.req_p50_us - d.req_p50_us,
            false,
        ),
        (
            "added latency p99, request (us)",
            |f, d| f.req_p99_us - d.req_p99_us,
            false,
        ),
        (
            "added latency p50, new conn (us)",
            |f, d| f.conn_p50_us - d.conn_p50_us,
            false,
        ),
        (
            "added latency p99, new conn (us)",
            |f, d| f.conn_p99_us - d.conn_p99_us,
            false,
        ),
        ("peak RSS (MB)", |f, _| f.rss_mb, false),
    ];
    let col = |name: &str| results.iter().find(|(n, _)| *n == name).map(|(_, f)| f);
    print!("{:<34}", "");
    for (n, _) in &results {
        print!("{n:>12}");
    }
    println!("{:>16}", "kthw/haproxy");
    for (label, get, higher_better) in rows {
        print!("{label:<34}");
        for (_, f) in &results {
            print!("{:>12.1}", get(f, &direct));
        }
        match (col("kthw-lab"), col("haproxy")) {
            (Some(k), Some(h)) => {
                let (k, h) = (get(k, &direct), get(h, &direct));
                let ratio = if h.abs() < f64::EPSILON {
                    f64::NAN
                } else {
                    k / h
                };
                let better = if higher_better { k >= h } else { k <= h };
                println!("{:>12.2} {}", ratio, if better { "ok " } else { "worse" });
            }
            _ => println!(),
        }
    }
    println!();
    println!("(ratios: higher is better for throughput and rate, lower for latency and RSS)");
    println!("rounds, in order (medians above):");
    for line in spread {
        println!("{line}");
    }
    drop(rt);
}
