//! SSH for the lab: the lab's user key and every node's host key (generated here,
//! kept across runs), and waiting until a real login works on each node, with the
//! server's host key checked against the node's pinned key (no trust on first use).

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ssh_key::{Algorithm, HashAlg, LineEnding, PrivateKey, PublicKey};

use crate::plan::LabPlan;
use crate::render::cloudinit::SeedKeys;

/// How often a node's progress line is repeated while waiting.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(10);
/// Pause between login attempts on one node.
pub const RETRY_EVERY: Duration = Duration::from_secs(1);
/// Pause after a refused or failed TCP connect: costs the guest nothing, so it is short
/// (the login is tried within a quarter second of sshd listening).
pub const CONNECT_RETRY_EVERY: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("ssh key {path}: {what}")]
    KeyIo {
        path: PathBuf,
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("ssh key {path}: {what}")]
    KeyFormat {
        path: PathBuf,
        what: String,
        #[source]
        source: ssh_key::Error,
    },
    #[error("{node}: no ssh login after {} s ({addr}); last attempt: {last_error}{console}", waited.as_secs())]
    Timeout {
        node: String,
        addr: SocketAddr,
        waited: Duration,
        last_error: String,
        console: Box<Console>,
    },
    #[error("{node}: host key mismatch at {addr}: expected {expected}, got {got}")]
    HostKeyMismatch {
        node: String,
        addr: SocketAddr,
        expected: String,
        got: String,
    },
    #[error("{node}: ssh session failed during {what}: {message}")]
    Session {
        node: String,
        what: String,
        message: String,
    },
    #[error("{node}: `{command}` exited with {status}: {stderr_tail}")]
    Command {
        node: String,
        command: String,
        status: i32,
        stderr_tail: String,
    },
}

impl SshError {
    pub fn hint(&self) -> String {
        match self {
            SshError::KeyIo { path, .. } | SshError::KeyFormat { path, .. } => format!(
                "the lab's ssh keys live in {}; remove a damaged key only together with the lab (kthw-lab destroy), since nodes pin them",
                path.parent().unwrap_or(Path::new("/")).display()
            ),
            SshError::Timeout { console, .. } => format!(
                "look at the console log {}; under TCG a first boot takes 10-60 s, more on a loaded host",
                console.log.display()
            ),
            SshError::HostKeyMismatch { addr, .. } => format!(
                "something else answers at {addr}, or the node was not booted from this lab's seed: check for another lab on the same subnet"
            ),
            SshError::Session { .. } | SshError::Command { .. } => {
                "log in by hand with the lab's key to look around (kthw-lab ssh NODE)".into()
            }
        }
    }
}

/// An ed25519 key pair on disk with its OpenSSH texts.
#[derive(Debug, Clone)]
pub struct KeyPair {
    pub private_path: PathBuf,
    pub public_path: PathBuf,
    /// `-----BEGIN OPENSSH PRIVATE KEY-----...`
    pub private_openssh: String,
    /// `ssh-ed25519 AAAA... comment`
    pub public_openssh: String,
    /// The public key's SSH wire encoding: what a server sends as its host key.
    pub public_blob: Vec<u8>,
    /// `SHA256:...`
    pub fingerprint: String,
}

/// The lab's user key and one host key per node.
#[derive(Debug, Clone)]
pub struct LabKeys {
    pub user: KeyPair,
    pub hosts: BTreeMap<String, KeyPair>,
    pub known_hosts: PathBuf,
}

impl LabKeys {
    /// The keys that go into `node`'s seed.
    pub fn seed_keys(&self, node: &str) -> Option<SeedKeys<'_>> {
        let host = self.hosts.get(node)?;
        Some(SeedKeys {
            user_public: &self.user.public_openssh,
            host_private: &host.private_openssh,
            host_public: &host.public_openssh,
        })
    }
}

fn key_io(path: &Path, what: &str) -> impl FnOnce(io::Error) -> SshError {
    let (path, what) = (path.to_path_buf(), what.to_string());
    move |source| SshError::KeyIo { path, what, source }
}

fn key_fmt(path: &Path, what: &str) -> impl FnOnce(ssh_key::Error) -> SshError {
    let (path, what) = (path.to_path_buf(), what.to_string());
    move |source| SshError::KeyFormat { path, what, source }
}

/// Write `content` to `path` with `mode`, atomically (temp file + rename).
fn write_private(path: &Path, content: &[u8], mode: u32) -> Result<(), SshError> {
    let tmp = path.with_extension("tmp");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(key_io(&tmp, "create"))?;
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(key_io(&tmp, "set permissions"))?;
    f.write_all(content).map_err(key_io(&tmp, "write"))?;
    f.sync_all().map_err(key_io(&tmp, "sync"))?;
    fs::rename(&tmp, path).map_err(key_io(path, "rename into place"))
}

/// Load the ed25519 key at `private_path`, or generate and store it when absent.
/// An existing key is never replaced (nodes pin it).
pub fn ensure_key(private_path: &Path, comment: &str) -> Result<KeyPair, SshError> {
    let public_path = PathBuf::from(format!("{}.pub", private_path.display()));
    let key = if private_path.exists() {
        let text = fs::read_to_string(private_path).map_err(key_io(private_path, "read"))?;
        let key = PrivateKey::from_openssh(&text).map_err(key_fmt(private_path, "parse"))?;
        if key.algorithm() != Algorithm::Ed25519 {
            return Err(SshError::KeyFormat {
                path: private_path.to_path_buf(),
                what: format!("expected an ed25519 key, found {}", key.algorithm()),
                source: ssh_key::Error::AlgorithmUnknown,
            });
        }
        let mode = fs::metadata(private_path)
            .map_err(key_io(private_path, "stat"))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            fs::set_permissions(private_path, fs::Permissions::from_mode(0o600))
                .map_err(key_io(private_path, "tighten permissions"))?;
        }
        key
    } else {
        let mut rng = ssh_key::rand_core::OsRng;
        let mut key = PrivateKey::random(&mut rng, Algorithm::Ed25519)
            .map_err(key_fmt(private_path, "generate"))?;
        key.set_comment(comment);
        let text = key
            .to_openssh(LineEnding::LF)
            .map_err(key_fmt(private_path, "encode"))?;
        write_private(private_path, text.as_bytes(), 0o600)?;
        key
    };
    let public = key.public_key();
    let public_openssh = public
        .to_openssh()
        .map_err(key_fmt(&public_path, "encode"))?;
    let current = fs::read_to_string(&public_path).unwrap_or_default();
    if current.trim() != public_openssh {
        write_private(
            &public_path,
            format!("{public_openssh}\n").as_bytes(),
            0o644,
        )?;
    }
    Ok(KeyPair {
        private_openssh: key
            .to_openssh(LineEnding::LF)
            .map_err(key_fmt(private_path, "encode"))?
            .to_string(),
        public_blob: public.to_bytes().map_err(key_fmt(&public_path, "encode"))?,
        fingerprint: public.fingerprint(HashAlg::Sha256).to_string(),
        public_openssh,
        private_path: private_path.to_path_buf(),
        public_path,
    })
}

/// Path of the lab's user private key.
pub fn user_key_path(plan: &LabPlan) -> PathBuf {
    plan.paths.ssh.join("id_ed25519")
}

/// Path of a node's host private key.
pub fn host_key_path(plan: &LabPlan, node: &str) -> PathBuf {
    plan.paths.ssh.join("hosts").join(format!("{node}_ed25519"))
}

/// Ensure the lab's user key and every node's host key exist under `plan.paths.ssh`
/// (dir 0700, private keys 0600), and write a `known_hosts` pinning every node.
pub fn ensure_lab_keys(plan: &LabPlan) -> Result<LabKeys, SshError> {
    let dir = &plan.paths.ssh;
    for d in [dir.clone(), dir.join("hosts")] {
        fs::create_dir_all(&d).map_err(key_io(&d, "create directory"))?;
        fs::set_permissions(&d, fs::Permissions::from_mode(0o700))
            .map_err(key_io(&d, "set permissions"))?;
    }
    let user = ensure_key(
        &user_key_path(plan),
        &format!("{}@kthw-lab-{}", plan.ssh_user, plan.lab),
    )?;
    let mut hosts = BTreeMap::new();
    let mut known = String::new();
    for n in &plan.nodes {
        let k = ensure_key(&host_key_path(plan, &n.name), &format!("root@{}", n.domain))?;
        let bare =
            PublicKey::from_openssh(&k.public_openssh).map_err(key_fmt(&k.public_path, "parse"))?;
        let mut bare = bare;
        bare.set_comment("");
        let line = bare
            .to_openssh()
            .map_err(key_fmt(&k.public_path, "encode"))?;
        known.push_str(&format!("{},{} {}\n", n.name, n.ip, line.trim()));
        hosts.insert(n.name.clone(), k);
    }
    let known_hosts = dir.join("known_hosts");
    if fs::read_to_string(&known_hosts).unwrap_or_default() != known {
        write_private(&known_hosts, known.as_bytes(), 0o644)?;
    }
    Ok(LabKeys {
        user,
        hosts,
        known_hosts,
    })
}

/// One node to log in to.
#[derive(Debug, Clone)]
pub struct SshTarget {
    pub node: String,
    pub addr: SocketAddr,
    pub user: String,
    pub private_key: PathBuf,
    pub public_key: PathBuf,
    /// Wire encoding of the host key the node must present.
    pub host_key: Vec<u8>,
    pub host_fingerprint: String,
    pub console_log: PathBuf,
}

/// Targets for every node of the plan, port 22.
pub fn targets(plan: &LabPlan, keys: &LabKeys) -> Vec<SshTarget> {
    plan.nodes
        .iter()
        .filter_map(|n| {
            let host = keys.hosts.get(&n.name)?;
            Some(SshTarget {
                node: n.name.clone(),
                addr: SocketAddr::new(n.ip.into(), 22),
                user: plan.ssh_user.clone(),
                private_key: keys.user.private_path.clone(),
                public_key: keys.user.public_path.clone(),
                host_key: host.public_blob.clone(),
                host_fingerprint: host.fingerprint.clone(),
                console_log: n.console_log.clone(),
            })
        })
        .collect()
}

/// Why one login attempt failed.
#[derive(Debug)]
pub enum LoginFailure {
    /// Not up yet (refused, reset, banner without working auth, ...): try again.
    NotYet(String),
    /// The server is not the node we planned: never retried.
    Fatal(SshError),
}

fn fingerprint_of(blob: &[u8]) -> String {
    PublicKey::from_bytes(blob)
        .map(|k| k.fingerprint(HashAlg::Sha256).to_string())
        .unwrap_or_else(|_| format!("an unparsable key of {} bytes", blob.len()))
}

/// One real login: TCP, handshake, host key check, public key auth, and `true` run in a
/// session. `io_timeout` bounds every blocking step.
pub fn login(t: &SshTarget, io_timeout: Duration) -> Result<ssh2::Session, LoginFailure> {
    let not_yet =
        |what: &str, e: &dyn std::fmt::Display| LoginFailure::NotYet(format!("{what}: {e}"));
    let tcp =
        TcpStream::connect_timeout(&t.addr, io_timeout).map_err(|e| not_yet("connect", &e))?;
    tcp.set_read_timeout(Some(io_timeout)).ok();
    tcp.set_write_timeout(Some(io_timeout)).ok();
    let mut s = ssh2::Session::new().map_err(|e| not_yet("session", &e))?;
    s.set_timeout(io_timeout.as_millis().min(u32::MAX as u128) as u32);
    s.set_tcp_stream(tcp);
    s.method_pref(ssh2::MethodType::HostKey, "ssh-ed25519")
        .map_err(|e| not_yet("host key preference", &e))?;
    s.handshake().map_err(|e| not_yet("handshake", &e))?;
    let got = s
        .host_key()
        .map(|(k, _)| k.to_vec())
        .ok_or_else(|| LoginFailure::NotYet("no host key offered".into()))?;
    if got != t.host_key {
        return Err(LoginFailure::Fatal(SshError::HostKeyMismatch {
            node: t.node.clone(),
            addr: t.addr,
            expected: t.host_fingerprint.clone(),
            got: fingerprint_of(&got),
        }));
    }
    s.userauth_pubkey_file(&t.user, Some(&t.public_key), &t.private_key, None)
        .map_err(|e| not_yet("public key auth", &e))?;
    if !s.authenticated() {
        return Err(LoginFailure::NotYet("not authenticated".into()));
    }
    let (status, _, stderr) = exec_raw(&s, "true").map_err(|e| not_yet("run `true`", &e))?;
    if status != 0 {
        return Err(LoginFailure::NotYet(format!(
            "`true` exited {status}: {stderr}"
        )));
    }
    Ok(s)
}

/// Default bound on one remote command of [`exec`].
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(120);

fn exec_raw(s: &ssh2::Session, command: &str) -> Result<(i32, String, String), String> {
    let mut ch = s.channel_session().map_err(|e| e.to_string())?;
    ch.exec(command).map_err(|e| e.to_string())?;
    let mut out = String::new();
    let mut err = String::new();
    ch.read_to_string(&mut out)
        .map_err(|e| format!("reading stdout: {e}"))?;
    ch.stderr()
        .read_to_string(&mut err)
        .map_err(|e| format!("reading stderr: {e}"))?;
    ch.wait_close().map_err(|e| e.to_string())?;
    let status = ch.exit_status().map_err(|e| e.to_string())?;
    Ok((status, out, err))
}

/// How many console lines a boot timeout shows.
const CONSOLE_TAIL_LINES: usize = 12;

/// A node's console log and its last lines when it did not come up: where its boot
/// stopped, in the error itself.
#[derive(Debug)]
pub struct Console {
    pub log: PathBuf,
    /// Its last non-blank lines; empty when the log is missing or blank. Terminal
    /// escapes (`ESC [ ... final`) and other control characters of the guest's console
    /// (carriage returns) are dropped.
    pub tail: Vec<String>,
}

impl Console {
    fn read(log: &Path) -> Console {
        let text = std::fs::read(log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let lines: Vec<String> = text
            .lines()
            .map(printable)
            .filter(|l| !l.trim().is_empty())
            .collect();
        Console {
            log: log.to_path_buf(),
            tail: lines[lines.len().saturating_sub(CONSOLE_TAIL_LINES)..].to_vec(),
        }
    }
}

/// A block that starts on a new line, or nothing.
impl std::fmt::Display for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.tail.is_empty() {
            return Ok(());
        }
        write!(
            f,
            "\nthe console log ends with:\n  {}",
            self.tail.join("\n  ")
        )
    }
}

fn printable(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.next_if_eq(&'[').is_some() {
                // Parameters and intermediates, up to the final byte.
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
        } else if !c.is_control() {
            out.push(c);
        }
    }
    out
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.trim_end().lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// Run `command` on a logged-in session, bounded by [`EXEC_TIMEOUT`]; its stdout when it
/// exits 0.
pub fn exec(s: &ssh2::Session, node: &str, command: &str) -> Result<String, SshError> {
    exec_timeout(s, node, command, EXEC_TIMEOUT)
}

/// [`exec`] with its own bound on the whole command.
pub fn exec_timeout(
    s: &ssh2::Session,
    node: &str,
    command: &str,
    timeout: Duration,
) -> Result<String, SshError> {
    let before = s.timeout();
    s.set_timeout(timeout.as_millis().clamp(1, u32::MAX as u128) as u32);
    let result = exec_raw(s, command);
    s.set_timeout(before);
    let (status, out, err) = result.map_err(|message| SshError::Session {
        node: node.to_string(),
        what: format!("`{command}` (bound {} s)", timeout.as_secs()),
        message,
    })?;
    if status != 0 {
        return Err(SshError::Command {
            node: node.to_string(),
            command: command.to_string(),
            status,
            stderr_tail: tail(&err, 5),
        });
    }
    Ok(out)
}

/// Wait until a real login works on one node, printing progress through `progress`.
/// Returns the time it took.
pub fn wait_for_ssh(
    t: &SshTarget,
    timeout: Duration,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<Duration, SshError> {
    let start = Instant::now();
    let mut next_report = PROGRESS_EVERY;
    let mut last_error = String::from("no attempt yet");
    loop {
        let remaining = timeout.saturating_sub(start.elapsed());
        if remaining.is_zero() {
            return Err(SshError::Timeout {
                node: t.node.clone(),
                addr: t.addr,
                waited: start.elapsed(),
                last_error,
                console: Box::new(Console::read(&t.console_log)),
            });
        }
        let io = remaining.clamp(Duration::from_millis(200), Duration::from_secs(10));
        match login(t, io) {
            Ok(_) => {
                let took = start.elapsed();
                progress(&format!("{}: ssh ok after {} s", t.node, took.as_secs()));
                return Ok(took);
            }
            Err(LoginFailure::Fatal(e)) => return Err(e),
            Err(LoginFailure::NotYet(e)) => last_error = e,
        }
        if start.elapsed() >= next_report {
            progress(&format!(
                "{}: waiting for ssh ({} s)",
                t.node,
                start.elapsed().as_secs()
            ));
            next_report += PROGRESS_EVERY;
        }
        let pause = if last_error.starts_with("connect:") {
            CONNECT_RETRY_EVERY
        } else {
            RETRY_EVERY
        };
        std::thread::sleep(pause.min(timeout.saturating_sub(start.elapsed())));
    }
}

/// Wait for every target concurrently (one thread each). Returns each node's time to its
/// first working login, in the order of `targets`, or the first error by that order.
/// `on_ready` runs in a node's thread as soon as that node accepted its login, while
/// the others may still be booting.
pub fn wait_for_all(
    targets: &[SshTarget],
    timeout: Duration,
    progress: &(dyn Fn(&str) + Sync),
    on_ready: &(dyn Fn(&SshTarget, Duration) + Sync),
) -> Result<Vec<(String, Duration)>, SshError> {
    let results: Vec<Result<Duration, SshError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = targets
            .iter()
            .map(|t| {
                scope.spawn(move || {
                    let took = wait_for_ssh(t, timeout, progress)?;
                    on_ready(t, took);
                    Ok(took)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("ssh wait thread panicked"))
            .collect()
    });
    targets
        .iter()
        .zip(results)
        .map(|(t, r)| r.map(|d| (t.node.clone(), d)))
        .collect()
}
