//! Running the balancer detached: the status socket, the pid file, start, stop, reload.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;

use super::stats::LbStatus;
use super::LbError;

/// Binds the status socket, replacing a stale one left by a killed balancer.
pub(crate) fn bind_control(path: &Path) -> Result<UnixListener, LbError> {
    let err = |source| LbError::ControlSocket {
        path: path.to_path_buf(),
        source,
    };
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another load balancer answers on it",
            )));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    UnixListener::bind(path).map_err(err)
}

/// Reads one request line from every connection (`status` when the client sends
/// nothing), writes `answer(request)`, then closes it.
pub(crate) async fn serve_control<F>(listener: UnixListener, answer: F)
where
    F: Fn(&str) -> Vec<u8> + Send + Sync + 'static,
{
    use tokio::io::AsyncReadExt;
    let answer = std::sync::Arc::new(answer);
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let answer = answer.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                // Up to a newline or the client's end of writing.
                let mut req = Vec::new();
                let mut buf = [0u8; 256];
                while !req.contains(&b'\n') && req.len() < 4096 {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let body = answer(String::from_utf8_lossy(&req).trim());
                let _ = stream.write_all(&body).await;
                let _ = stream.shutdown().await;
            })
            .await;
        });
    }
}

/// One request to a running balancer's control socket, its answer's bytes.
fn request(control_socket: &Path, req: &str) -> Result<Vec<u8>, LbError> {
    let err = |source| LbError::ControlSocket {
        path: control_socket.to_path_buf(),
        source,
    };
    let mut s = std::os::unix::net::UnixStream::connect(control_socket).map_err(err)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(err)?;
    s.set_write_timeout(Some(Duration::from_secs(5)))
        .map_err(err)?;
    s.write_all(format!("{req}\n").as_bytes()).map_err(err)?;
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut body = Vec::new();
    s.read_to_end(&mut body).map_err(err)?;
    Ok(body)
}

/// Asks a running balancer for its status over its control socket.
pub fn status(control_socket: &Path) -> Result<LbStatus, LbError> {
    let body = request(control_socket, "status")?;
    serde_json::from_slice(&body).map_err(|source| LbError::StatusAnswer {
        path: control_socket.to_path_buf(),
        source,
    })
}

/// Takes the backend `addr` (`IP:PORT`, or its name) out of rotation, or puts it
/// back, in a running balancer. Its established connections stay either way.
pub fn set_backend(control_socket: &Path, addr: &str, enabled: bool) -> Result<(), LbError> {
    let verb = if enabled { "enable" } else { "disable" };
    let body = request(control_socket, &format!("{verb} {addr}"))?;
    #[derive(serde::Deserialize)]
    struct Answer {
        ok: bool,
        error: Option<String>,
    }
    let a: Answer = serde_json::from_slice(&body).map_err(|source| LbError::StatusAnswer {
        path: control_socket.to_path_buf(),
        source,
    })?;
    if a.ok {
        Ok(())
    } else {
        Err(LbError::ControlSocket {
            path: control_socket.to_path_buf(),
            source: std::io::Error::other(a.error.unwrap_or_default()),
        })
    }
}

/// Starts `exe args` in its own session with stdin from /dev/null and stdout and stderr
/// appended to `log_file`, writes its pid to `pid_file` and returns it. Fails when the
/// process exits within the first moments (bad config, address in use); the error then
/// carries the end of the log.
pub fn spawn_detached(
    exe: &Path,
    args: &[OsString],
    pid_file: &Path,
    log_file: &Path,
) -> Result<u32, LbError> {
    let log_err = |source| LbError::LogFile {
        path: log_file.to_path_buf(),
        source,
    };
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_file)
        .map_err(log_err)?;
    let log2 = log.try_clone().map_err(log_err)?;
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .current_dir("/");
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let spawn_err = |source| LbError::Spawn {
        exe: exe.to_path_buf(),
        source,
    };
    let mut child = cmd.spawn().map_err(spawn_err)?;
    let pid = child.id();
    write_pid(pid_file, pid)?;
    let until = Instant::now() + Duration::from_millis(300);
    while Instant::now() < until {
        if let Ok(Some(st)) = child.try_wait() {
            let _ = std::fs::remove_file(pid_file);
            let tail = log_tail(log_file, 5);
            return Err(spawn_err(std::io::Error::other(format!(
                "exited at once with {st}; log {}: {tail}",
                log_file.display()
            ))));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Reap it if it exits while this process still runs.
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    Ok(pid)
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join(" | ")
}

fn write_pid(pid_file: &Path, pid: u32) -> Result<(), LbError> {
    let tmp = pid_file.with_extension("pid.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|source| LbError::PidFile {
        path: tmp.clone(),
        source,
    })?;
    writeln!(f, "{pid}")
        .and_then(|()| std::fs::rename(&tmp, pid_file))
        .map_err(|source| LbError::PidFile {
            path: pid_file.to_path_buf(),
            source,
        })
}

/// The pid in the file, or `None` when there is no file.
fn read_pid(pid_file: &Path) -> Result<Option<u32>, LbError> {
    let text = match std::fs::read_to_string(pid_file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(LbError::PidFile {
                path: pid_file.to_path_buf(),
                source,
            })
        }
    };
    match text.trim().parse::<u32>() {
        Ok(pid) if pid > 1 => Ok(Some(pid)),
        _ => Err(LbError::BadPid {
            path: pid_file.to_path_buf(),
            content: text.trim().chars().take(40).collect(),
        }),
    }
}

/// Whether `pid` is a live (not zombie) process; reaps it when it is our zombie child.
fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name, which may contain spaces.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    if state == Some('Z') {
        // SAFETY: plain syscall; fails harmlessly with ECHILD when not our child.
        unsafe { libc::waitpid(pid as libc::pid_t, std::ptr::null_mut(), libc::WNOHANG) };
        return false;
    }
    true
}

fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|&c| c == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// A kthw-lab balancer: the program is `kthw-lab` or `kthw-lb` (any directory, maybe
/// replaced on disk since) and it was given a config file.
fn is_ours(args: &[String]) -> bool {
    let Some(prog) = args.first() else {
        return false;
    };
    let base = Path::new(prog)
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    (base.starts_with("kthw-lab") || base.starts_with("kthw-lb"))
        && args
            .iter()
            .any(|a| a == "--config" || a.starts_with("--config="))
}

fn signal(pid: u32, sig: libc::c_int) -> Result<(), LbError> {
    // SAFETY: plain syscall on a pid we checked.
    if unsafe { libc::kill(pid as libc::pid_t, sig) } == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ESRCH) {
        return Ok(());
    }
    Err(LbError::Signal { pid, source: e })
}

/// The live balancer recorded in `pid_file`, if any.
fn running_pid(pid_file: &Path) -> Result<Option<u32>, LbError> {
    let Some(pid) = read_pid(pid_file)? else {
        return Ok(None);
    };
    Ok((alive(pid) && is_ours(&cmdline(pid))).then_some(pid))
}

/// Whether the balancer recorded in `pid_file` runs (a reused pid does not count).
pub fn is_running(pid_file: &Path) -> bool {
    matches!(running_pid(pid_file), Ok(Some(_)))
}

/// Stops the balancer recorded in `pid_file` (SIGTERM, then SIGKILL after 5 s) and
/// removes the pid file. Succeeds when it is already gone or the pid now belongs to
/// another program, which is never signalled.
pub fn stop(pid_file: &Path) -> Result<(), LbError> {
    let Some(pid) = read_pid(pid_file)? else {
        return Ok(());
    };
    if alive(pid) {
        let args = cmdline(pid);
        if is_ours(&args) {
            signal(pid, libc::SIGTERM)?;
            if !wait_gone(pid, Duration::from_secs(5)) {
                tracing::warn!(pid, "load balancer ignored sigterm, sending sigkill");
                signal(pid, libc::SIGKILL)?;
                if !wait_gone(pid, Duration::from_secs(2)) {
                    return Err(LbError::StopTimeout { pid });
                }
            }
        } else {
            tracing::info!(pid, cmdline = ?args, "stale lb pid file names another program; not signalling it");
        }
    }
    match std::fs::remove_file(pid_file) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(LbError::PidFile {
            path: pid_file.to_path_buf(),
            source,
        }),
    }
}

fn wait_gone(pid: u32, within: Duration) -> bool {
    let until = Instant::now() + within;
    while Instant::now() < until {
        if !alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    !alive(pid)
}

/// What [`ensure_running`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ensured {
    /// No balancer ran: one was started with this pid.
    Started(u32),
    /// One already ran: it was told to re-read its config (SIGHUP).
    Reloaded(u32),
}

/// The idempotent step for `create`, a re-run of it, and `start` after a reboot: when
/// the balancer of `pid_file` runs, reload it (changed backends are picked up without
/// dropping connections); otherwise start `exe args` detached (a stale pid file, e.g.
/// from before a reboot, is replaced).
pub fn ensure_running(
    exe: &Path,
    args: &[OsString],
    pid_file: &Path,
    log_file: &Path,
) -> Result<Ensured, LbError> {
    if let Some(pid) = running_pid(pid_file)? {
        signal(pid, libc::SIGHUP)?;
        return Ok(Ensured::Reloaded(pid));
    }
    // Started by a run that was killed before it wrote the pid file: the balancer
    // holds the listen address, so a second one could never start. Adopt it.
    if let Some(pid) = orphan(args) {
        write_pid(pid_file, pid)?;
        signal(pid, libc::SIGHUP)?;
        return Ok(Ensured::Reloaded(pid));
    }
    spawn_detached(exe, args, pid_file, log_file).map(Ensured::Started)
}

/// A live balancer started with exactly `args` (they name its config file), found
/// in /proc.
fn orphan(args: &[OsString]) -> Option<u32> {
    let want: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort();
    pids.into_iter().find(|pid| {
        let c = cmdline(*pid);
        c.len() == want.len() + 1 && c[1..] == want[..] && is_ours(&c) && alive(*pid)
    })
}

/// Sends SIGHUP to the balancer in `pid_file` so it re-reads its config.
pub fn reload(pid_file: &Path) -> Result<(), LbError> {
    let path: PathBuf = pid_file.to_path_buf();
    let Some(pid) = read_pid(pid_file)? else {
        return Err(LbError::PidFile {
            path,
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
    };
    if !alive(pid) {
        return Err(LbError::NotRunning { pid, path });
    }
    let args = cmdline(pid);
    if !is_ours(&args) {
        return Err(LbError::NotOurs {
            pid,
            path,
            cmdline: args.join(" "),
        });
    }
    signal(pid, libc::SIGHUP)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn recognises_only_our_balancer() {
        assert!(is_ours(&v(&[
            "/usr/bin/kthw-lab",
            "lb",
            "run",
            "--config",
            "/x/lb.json"
        ])));
        assert!(is_ours(&v(&["kthw-lb", "--config=/x/lb.json"])));
        assert!(!is_ours(&v(&["/usr/bin/kthw-lab", "create", "x.yaml"])));
        assert!(!is_ours(&v(&["/usr/sbin/haproxy", "--config", "x"])));
        assert!(!is_ours(&[]));
    }

    #[test]
    fn pid_file_parsing() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("lb.pid");
        assert_eq!(read_pid(&p).unwrap(), None);
        std::fs::write(&p, "1234\n").unwrap();
        assert_eq!(read_pid(&p).unwrap(), Some(1234));
        std::fs::write(&p, "garbage").unwrap();
        assert!(matches!(read_pid(&p), Err(LbError::BadPid { .. })));
        std::fs::write(&p, "1").unwrap();
        assert!(read_pid(&p).is_err(), "pid 1 is never ours");
    }

    #[test]
    fn stop_leaves_a_foreign_process_alone() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("lb.pid");
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        write_pid(&p, child.id()).unwrap();
        assert!(!is_running(&p));
        stop(&p).unwrap();
        assert!(!p.exists());
        assert!(child.try_wait().unwrap().is_none(), "sleep must still run");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[tokio::test]
    async fn control_socket_replaces_a_stale_file_but_not_a_live_balancer() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("lb.sock");
        drop(std::os::unix::net::UnixListener::bind(&p).unwrap());
        assert!(p.exists(), "a killed balancer leaves its socket file");
        let live = bind_control(&p).unwrap();
        let e = bind_control(&p).unwrap_err();
        assert!(
            e.to_string().starts_with("cannot use control socket"),
            "{e}"
        );
        drop(live);
    }

    #[test]
    fn stop_without_pid_file_is_fine() {
        let d = tempfile::tempdir().unwrap();
        stop(&d.path().join("none.pid")).unwrap();
    }
}
