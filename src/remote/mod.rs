//! Running commands on, and copying files to, the lab's nodes.
//!
//! [`Remote`] is the seam the bootstrap phases use, in domain terms: run a command
//! on a node, put bytes at a path on a node. [`SshRemote`] is the real thing: one
//! SSH session per node, opened on first use and reused for every later step,
//! public-key authentication, and a pinned host key (the node's key is known from
//! its seed; anything else is refused before authenticating).

use std::collections::HashMap;
use std::fmt;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use sha2::{Digest, Sha256};
use ssh2::Session;

/// What a finished command left behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status == 0
    }
}

/// How many trailing lines of output an error carries.
const TAIL_LINES: usize = 12;

/// The last lines of a command's output, for error messages.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    all[start..].join("\n")
}

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("{node}: not a node of this lab")]
    UnknownNode { node: String },
    #[error("{node}: cannot connect to {addr}: {source}")]
    Connect {
        node: String,
        addr: String,
        source: std::io::Error,
    },
    #[error("{node}: ssh handshake with {addr} failed: {source}")]
    Handshake {
        node: String,
        addr: String,
        source: ssh2::Error,
    },
    #[error(
        "{node}: host key mismatch at {addr}: expected {expected}, the node presented {found}"
    )]
    HostKeyMismatch {
        node: String,
        addr: String,
        expected: String,
        found: String,
    },
    #[error("{node}: bad pinned host key: {reason}")]
    BadHostKey { node: String, reason: String },
    #[error("{node}: public-key login as {user} with {key} failed: {reason}")]
    Auth {
        node: String,
        user: String,
        key: String,
        reason: String,
    },
    #[error("{node}: `{cmd}` timed out after {secs}s{}", fmt_tail(.output_tail))]
    Timeout {
        node: String,
        cmd: String,
        secs: u64,
        output_tail: String,
    },
    #[error("{node}: `{cmd}` exited with status {status}{}", fmt_tail(.output_tail))]
    Command {
        node: String,
        cmd: String,
        status: i32,
        output_tail: String,
    },
    #[error("{node}: ssh failed while running `{cmd}`: {reason}")]
    Channel {
        node: String,
        cmd: String,
        reason: String,
    },
}

fn fmt_tail(t: &str) -> String {
    if t.trim().is_empty() {
        String::new()
    } else {
        format!("; last output:\n{t}")
    }
}

impl RemoteError {
    pub fn node(&self) -> &str {
        match self {
            RemoteError::UnknownNode { node }
            | RemoteError::Connect { node, .. }
            | RemoteError::Handshake { node, .. }
            | RemoteError::HostKeyMismatch { node, .. }
            | RemoteError::BadHostKey { node, .. }
            | RemoteError::Auth { node, .. }
            | RemoteError::Timeout { node, .. }
            | RemoteError::Command { node, .. }
            | RemoteError::Channel { node, .. } => node,
        }
    }

    /// What to do about it.
    pub fn hint(&self) -> Option<String> {
        Some(match self {
            RemoteError::UnknownNode { .. } => "check the node name against `kthw-lab plan`".into(),
            RemoteError::Connect { node, .. } => format!(
                "is {node} running and its sshd up? `virsh console` or the console log shows its boot"
            ),
            RemoteError::Handshake { .. } => {
                "the node's sshd closed the connection; it may still be starting, retry in a few seconds".into()
            }
            RemoteError::HostKeyMismatch { node, .. } => format!(
                "{node} is not the machine the lab created (or it was rebuilt): recreate it, or if you replaced it on purpose, update its pinned key in the lab's ssh dir"
            ),
            RemoteError::BadHostKey { .. } => {
                "the pinned key must be an OpenSSH public key line, e.g. `ecdsa-sha2-nistp256 AAAA...`".into()
            }
            RemoteError::Auth { user, key, .. } => format!(
                "the node must list the public half of {key} in ~{user}/.ssh/authorized_keys (written by its seed)"
            ),
            RemoteError::Timeout { .. } => {
                "the node may be overloaded (TCG is slow); rerun, the phases are idempotent".into()
            }
            RemoteError::Command { .. } => "the output above is the command's own; fix the cause and rerun".into(),
            RemoteError::Channel { .. } => "the SSH connection broke; rerun, a new one is opened".into(),
        })
    }
}

/// Side effects on the nodes, in domain terms.
pub trait Remote: Sync {
    /// Run `cmd` (a shell command line) on `node` as root; the output whatever the
    /// exit status. Errors are about not being able to run it (or a timeout).
    fn exec(&self, node: &str, cmd: &str, timeout: Duration) -> Result<Output, RemoteError>;

    /// Put `bytes` at `dest` on `node` atomically (a temporary file in the same
    /// directory, then `mv`), with `mode` and `owner` (`user:group`); parent
    /// directories are created.
    fn upload(
        &self,
        node: &str,
        bytes: &[u8],
        dest: &str,
        mode: u32,
        owner: &str,
    ) -> Result<(), RemoteError>;

    /// Like [`Remote::exec`], but a non-zero exit is an error naming the command.
    fn run(&self, node: &str, cmd: &str, timeout: Duration) -> Result<Output, RemoteError> {
        let out = self.exec(node, cmd, timeout)?;
        if out.success() {
            Ok(out)
        } else {
            Err(RemoteError::Command {
                node: node.to_string(),
                cmd: cmd.to_string(),
                status: out.status,
                output_tail: output_tail(&out),
            })
        }
    }

    /// sha256 of a file on the node, `None` when it does not exist.
    fn file_sha256(&self, node: &str, path: &str) -> Result<Option<String>, RemoteError> {
        let q = sh_quote(path);
        let out = self.run(
            node,
            &format!("if [ -f {q} ]; then sha256sum {q}; fi"),
            Duration::from_secs(30),
        )?;
        Ok(out.stdout.split_whitespace().next().map(|h| h.to_string()))
    }
}

fn output_tail(out: &Output) -> String {
    let mut t = tail(&out.stderr, TAIL_LINES);
    if t.trim().is_empty() {
        t = tail(&out.stdout, TAIL_LINES);
    }
    t
}

/// Run `f` for every node at once (one thread each), results in node order.
/// A thread that panicked reports as an error of its node instead of taking the
/// others down.
pub fn exec_all<R, T, E, F>(remote: &R, nodes: &[&str], f: F) -> Vec<(String, Result<T, E>)>
where
    R: Remote + ?Sized,
    T: Send,
    E: Send + From<RemoteError>,
    F: Fn(&R, &str) -> Result<T, E> + Sync,
{
    std::thread::scope(|s| {
        let handles: Vec<_> = nodes
            .iter()
            .map(|n| {
                let f = &f;
                s.spawn(move || f(remote, n))
            })
            .collect();
        nodes
            .iter()
            .zip(handles)
            .map(|(n, h)| {
                let r = h.join().unwrap_or_else(|_| {
                    Err(RemoteError::Channel {
                        node: n.to_string(),
                        cmd: String::new(),
                        reason: "worker thread panicked".into(),
                    }
                    .into())
                });
                (n.to_string(), r)
            })
            .collect()
    })
}

/// The first error of a parallel run, or all values.
pub fn all_ok<T>(
    results: Vec<(String, Result<T, RemoteError>)>,
) -> Result<Vec<(String, T)>, RemoteError> {
    results
        .into_iter()
        .map(|(n, r)| r.map(|v| (n, v)))
        .collect()
}

/// Quote a word for POSIX sh.
pub fn sh_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-:=,+@%".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The shell command that installs stdin at `dest` atomically.
pub fn upload_command(dest: &str, mode: u32, owner: &str, nonce: &str) -> String {
    let (dir, _) = dest.rsplit_once('/').unwrap_or((".", dest));
    let dir = if dir.is_empty() { "/" } else { dir };
    let tmp = format!("{dest}.kthw-tmp.{nonce}");
    format!(
        "set -e; umask 077; mkdir -p {d}; cat > {t}; chmod {m:o} {t}; chown {o} {t}; mv -f {t} {f}",
        d = sh_quote(dir),
        t = sh_quote(&tmp),
        m = mode,
        o = sh_quote(owner),
        f = sh_quote(dest),
    )
}

/// A node's pinned host key: the raw key blob of an OpenSSH public key line.
#[derive(Clone, PartialEq, Eq)]
pub struct HostKey {
    pub algorithm: String,
    pub blob: Vec<u8>,
}

impl HostKey {
    /// Parse `ALGO BASE64 [comment]`, as in a `*.pub` file or known_hosts (without host).
    pub fn from_openssh(line: &str) -> Result<HostKey, String> {
        let mut it = line.split_whitespace();
        let algorithm = it.next().ok_or("empty key")?.to_string();
        let b64 = it.next().ok_or("no key data after the algorithm")?;
        let blob = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| format!("key data is not base64: {e}"))?;
        // The blob starts with the algorithm name as an SSH string.
        let ok = blob.len() > 4 && {
            let n = u32::from_be_bytes([blob[0], blob[1], blob[2], blob[3]]) as usize;
            blob.get(4..4 + n) == Some(algorithm.as_bytes())
        };
        if !ok {
            return Err(format!("key data does not start with `{algorithm}`"));
        }
        Ok(HostKey { algorithm, blob })
    }

    /// `SHA256:...`, as `ssh-keygen -l` prints it.
    pub fn fingerprint(blob: &[u8]) -> String {
        let d = Sha256::digest(blob);
        format!(
            "SHA256:{}",
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(d)
        )
    }
}

impl fmt::Debug for HostKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.algorithm, HostKey::fingerprint(&self.blob))
    }
}

/// Where and how to reach one node.
#[derive(Debug, Clone)]
pub struct SshTarget {
    /// `host:port`.
    pub addr: String,
    pub user: String,
    pub host_key: HostKey,
}

/// The real [`Remote`]: one reused SSH session per node.
pub struct SshRemote {
    targets: HashMap<String, SshTarget>,
    /// The lab's private key; `KEY.pub` beside it is used when present.
    key: PathBuf,
    connect_timeout: Duration,
    sessions: Mutex<HashMap<String, Arc<Mutex<Session>>>>,
}

impl SshRemote {
    pub fn new(key: PathBuf, targets: HashMap<String, SshTarget>) -> SshRemote {
        SshRemote {
            targets,
            key,
            connect_timeout: Duration::from_secs(10),
            sessions: Mutex::new(HashMap::new()),
        }
    }

    pub fn with_connect_timeout(mut self, t: Duration) -> SshRemote {
        self.connect_timeout = t;
        self
    }

    /// How many sessions are open (for tests and progress output).
    pub fn open_sessions(&self) -> usize {
        self.sessions.lock().expect("session pool").len()
    }

    fn target(&self, node: &str) -> Result<&SshTarget, RemoteError> {
        self.targets
            .get(node)
            .ok_or_else(|| RemoteError::UnknownNode {
                node: node.to_string(),
            })
    }

    /// The node's session, connecting (and checking its host key) on first use.
    fn session(&self, node: &str) -> Result<Arc<Mutex<Session>>, RemoteError> {
        if let Some(s) = self.sessions.lock().expect("session pool").get(node) {
            return Ok(s.clone());
        }
        let s = Arc::new(Mutex::new(self.connect(node)?));
        let mut pool = self.sessions.lock().expect("session pool");
        Ok(pool.entry(node.to_string()).or_insert(s).clone())
    }

    fn forget(&self, node: &str) {
        self.sessions.lock().expect("session pool").remove(node);
    }

    fn connect(&self, node: &str) -> Result<Session, RemoteError> {
        let t = self.target(node)?;
        let conn_err = |source| RemoteError::Connect {
            node: node.to_string(),
            addr: t.addr.clone(),
            source,
        };
        let addr = t
            .addr
            .to_socket_addrs()
            .map_err(conn_err)?
            .next()
            .ok_or_else(|| conn_err(std::io::Error::new(ErrorKind::NotFound, "no address")))?;
        let tcp = TcpStream::connect_timeout(&addr, self.connect_timeout).map_err(conn_err)?;
        let mut sess = Session::new().map_err(|e| RemoteError::Handshake {
            node: node.to_string(),
            addr: t.addr.clone(),
            source: e,
        })?;
        sess.set_tcp_stream(tcp);
        sess.set_timeout(self.connect_timeout.as_millis() as u32);
        sess.handshake().map_err(|e| RemoteError::Handshake {
            node: node.to_string(),
            addr: t.addr.clone(),
            source: e,
        })?;
        // Pin before authenticating: never offer our key to an impostor.
        let (blob, _) = sess.host_key().ok_or_else(|| RemoteError::BadHostKey {
            node: node.to_string(),
            reason: "the server sent no host key".into(),
        })?;
        if blob != t.host_key.blob.as_slice() {
            return Err(RemoteError::HostKeyMismatch {
                node: node.to_string(),
                addr: t.addr.clone(),
                expected: format!("{:?}", t.host_key),
                found: HostKey::fingerprint(blob),
            });
        }
        let pubkey = PathBuf::from(format!("{}.pub", self.key.display()));
        let pubkey = pubkey.is_file().then_some(pubkey);
        sess.userauth_pubkey_file(&t.user, pubkey.as_deref(), &self.key, None)
            .map_err(|e| RemoteError::Auth {
                node: node.to_string(),
                user: t.user.clone(),
                key: self.key.display().to_string(),
                reason: e.message().to_string(),
            })?;
        if !sess.authenticated() {
            return Err(RemoteError::Auth {
                node: node.to_string(),
                user: t.user.clone(),
                key: self.key.display().to_string(),
                reason: "the server did not accept the key".into(),
            });
        }
        Ok(sess)
    }

    /// Root commands go through `sudo -n` unless we log in as root. The node's own
    /// `timeout` kills the command when it overruns, so nothing lingers there.
    fn wrap(&self, node: &str, cmd: &str, timeout: Duration) -> Result<String, RemoteError> {
        let t = self.target(node)?;
        let secs = timeout.as_secs().max(1);
        let inner = format!("timeout -k 5 {secs} sh -c {}", sh_quote(cmd));
        Ok(if t.user == "root" {
            inner
        } else {
            format!("sudo -n {inner}")
        })
    }

    fn run_channel(
        &self,
        node: &str,
        cmd: &str,
        stdin: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Output, RemoteError> {
        let wrapped = self.wrap(node, cmd, timeout)?;
        let sess = self.session(node)?;
        let started = std::time::Instant::now();
        let result = {
            let sess = sess.lock().expect("session");
            // The node's `timeout` fires first; this one catches a dead connection.
            let local = timeout + Duration::from_secs(10);
            sess.set_timeout(local.as_millis().clamp(1, u32::MAX as u128) as u32);
            run_on(&sess, &wrapped, stdin)
        };
        tracing::debug!(
            node,
            cmd,
            secs = format!("{:.2}", started.elapsed().as_secs_f64()),
            status = result.as_ref().map(|o| o.status).ok(),
            "remote command"
        );
        match result {
            // 124: coreutils `timeout` stopped the command (137 when it had to kill).
            Ok(out)
                if (out.status == TIMEOUT_STATUS || out.status == TIMEOUT_KILLED)
                    && started.elapsed() + Duration::from_millis(200) >= timeout =>
            {
                Err(RemoteError::Timeout {
                    node: node.to_string(),
                    cmd: cmd.to_string(),
                    secs: timeout.as_secs().max(1),
                    output_tail: output_tail(&out),
                })
            }
            Ok(out) => Ok(out),
            Err(ChannelFailure::Timeout(partial)) => {
                // The session is in an unknown state: open a fresh one next time.
                self.forget(node);
                Err(RemoteError::Timeout {
                    node: node.to_string(),
                    cmd: cmd.to_string(),
                    secs: timeout.as_secs(),
                    output_tail: tail(&partial, TAIL_LINES),
                })
            }
            Err(ChannelFailure::Other(reason)) => {
                self.forget(node);
                Err(RemoteError::Channel {
                    node: node.to_string(),
                    cmd: cmd.to_string(),
                    reason,
                })
            }
        }
    }
}

/// Exit status of coreutils `timeout` when the command overran.
const TIMEOUT_STATUS: i32 = 124;
/// ... and when it had to send SIGKILL after the grace period.
const TIMEOUT_KILLED: i32 = 137;

enum ChannelFailure {
    Timeout(String),
    Other(String),
}

fn classify(e: std::io::Error, partial: &[u8]) -> ChannelFailure {
    if e.kind() == ErrorKind::TimedOut {
        ChannelFailure::Timeout(String::from_utf8_lossy(partial).into_owned())
    } else {
        ChannelFailure::Other(e.to_string())
    }
}

fn ssh_fail(e: ssh2::Error) -> ChannelFailure {
    let io: std::io::Error = e.into();
    classify(io, &[])
}

fn run_on(sess: &Session, cmd: &str, stdin: Option<&[u8]>) -> Result<Output, ChannelFailure> {
    let mut ch = sess.channel_session().map_err(ssh_fail)?;
    ch.exec(cmd).map_err(ssh_fail)?;
    if let Some(bytes) = stdin {
        ch.write_all(bytes).map_err(|e| classify(e, &[]))?;
    }
    ch.send_eof().map_err(ssh_fail)?;
    let mut stdout = Vec::new();
    if let Err(e) = ch.read_to_end(&mut stdout) {
        return Err(classify(e, &stdout));
    }
    let mut stderr = Vec::new();
    if let Err(e) = ch.stderr().read_to_end(&mut stderr) {
        return Err(classify(e, &stderr));
    }
    ch.wait_close().map_err(ssh_fail)?;
    let status = ch.exit_status().map_err(ssh_fail)?;
    Ok(Output {
        status,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    })
}

impl Remote for SshRemote {
    fn exec(&self, node: &str, cmd: &str, timeout: Duration) -> Result<Output, RemoteError> {
        self.run_channel(node, cmd, None, timeout)
    }

    fn upload(
        &self,
        node: &str,
        bytes: &[u8],
        dest: &str,
        mode: u32,
        owner: &str,
    ) -> Result<(), RemoteError> {
        if !dest.starts_with('/') {
            return Err(RemoteError::Channel {
                node: node.to_string(),
                cmd: format!("upload {dest}"),
                reason: "the destination must be an absolute path".into(),
            });
        }
        let nonce = format!("{}.{}", std::process::id(), rand::random::<u32>());
        let cmd = upload_command(dest, mode, owner, &nonce);
        // Size-proportional time: 60 s plus a second per MiB.
        let timeout = Duration::from_secs(60 + (bytes.len() as u64 >> 20));
        let out = self.run_channel(node, &cmd, Some(bytes), timeout)?;
        if !out.success() {
            // Leave nothing half-written behind.
            let tmp = format!("{dest}.kthw-tmp.{nonce}");
            let _ = self.exec(
                node,
                &format!("rm -f {}", sh_quote(&tmp)),
                Duration::from_secs(30),
            );
            return Err(RemoteError::Command {
                node: node.to_string(),
                cmd: format!("upload {dest} (mode {mode:o}, owner {owner})"),
                status: out.status,
                output_tail: output_tail(&out),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(sh_quote("/etc/x.conf"), "/etc/x.conf");
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert_eq!(sh_quote(""), "''");
        assert_eq!(sh_quote("$(reboot)"), "'$(reboot)'");
    }

    #[test]
    fn upload_command_is_atomic_in_the_same_directory() {
        let c = upload_command(
            "/etc/systemd/system/etcd.service",
            0o644,
            "root:root",
            "1.2",
        );
        assert!(c.contains("cat > /etc/systemd/system/etcd.service.kthw-tmp.1.2"));
        assert!(c.contains("chmod 644"));
        assert!(c.ends_with(
            "mv -f /etc/systemd/system/etcd.service.kthw-tmp.1.2 /etc/systemd/system/etcd.service"
        ));
        assert!(c.contains("mkdir -p /etc/systemd/system"));
    }

    #[test]
    fn host_key_lines() {
        // ssh-ed25519 blob: string "ssh-ed25519" + 32-byte key.
        let mut blob = Vec::new();
        blob.extend_from_slice(&11u32.to_be_bytes());
        blob.extend_from_slice(b"ssh-ed25519");
        blob.extend_from_slice(&32u32.to_be_bytes());
        blob.extend_from_slice(&[7u8; 32]);
        let b64 = base64::engine::general_purpose::STANDARD.encode(&blob);
        let k = HostKey::from_openssh(&format!("ssh-ed25519 {b64} root@n1")).unwrap();
        assert_eq!(k.blob, blob);
        assert!(HostKey::from_openssh(&format!("ssh-rsa {b64}")).is_err());
        assert!(HostKey::from_openssh("ssh-ed25519").is_err());
        assert!(HostKey::fingerprint(&blob).starts_with("SHA256:"));
    }

    #[test]
    fn tails() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("", 3), "");
    }
}
