//! The SSH wait against a real OpenSSH server on loopback (no VM needed): a login with
//! the lab's user key and the pinned host key works, a different host key is refused at
//! once, and a node that never answers times out naming the node and its console log.

#[path = "boot_fixture.rs"]
mod fixture;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kthw_lab::host::ssh::{ensure_key, exec, login, wait_for_ssh, KeyPair, SshError, SshTarget};

mod support;

use support::loopback::{free_port, wait_listening, Killed};

struct Sshd {
    _child: Killed,
    addr: SocketAddr,
}

/// sshd on 127.0.0.1 with `host` as its only host key, accepting `user`'s key for root.
fn sshd(dir: &Path, host: &KeyPair, user: &KeyPair) -> Sshd {
    let sshd = support::require("sshd", "openssh-server");
    // SAFETY: geteuid has no preconditions and cannot fail.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "sshd with its privilege separation needs root"
    );
    std::fs::create_dir_all("/run/sshd").unwrap();
    let auth = dir.join("authorized_keys");
    std::fs::write(&auth, format!("{}\n", user.public_openssh)).unwrap();
    let port = free_port();
    let child = Command::new(sshd)
        .args(["-D", "-e", "-f", "/dev/null", "-p", &port.to_string()])
        .arg("-h")
        .arg(&host.private_path)
        .args([
            "-o",
            "ListenAddress=127.0.0.1",
            "-o",
            "PidFile=none",
            "-o",
            "StrictModes=no",
        ])
        .args(["-o", "UsePAM=no", "-o", "PermitRootLogin=prohibit-password"])
        .arg("-o")
        .arg(format!("AuthorizedKeysFile={}", auth.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let child = Killed(child);
    wait_listening(port, "sshd");
    Sshd {
        _child: child,
        addr: format!("127.0.0.1:{port}").parse().unwrap(),
    }
}

fn target(addr: SocketAddr, user: &KeyPair, host: &KeyPair, console: PathBuf) -> SshTarget {
    SshTarget {
        node: "m1".into(),
        addr,
        user: "root".into(),
        private_key: user.private_path.clone(),
        public_key: user.public_path.clone(),
        host_key: host.public_blob.clone(),
        host_fingerprint: host.fingerprint.clone(),
        console_log: console,
    }
}

#[test]
fn login_with_pinned_host_key_and_refusal_of_another() {
    let dir = tempfile::tempdir().unwrap();
    let user = ensure_key(&dir.path().join("id_ed25519"), "kthw@test").unwrap();
    let host = ensure_key(&dir.path().join("host_ed25519"), "root@m1").unwrap();
    let other = ensure_key(&dir.path().join("other_ed25519"), "root@other").unwrap();
    let server = sshd(dir.path(), &host, &user);
    let console = dir.path().join("m1.log");
    let lines = std::sync::Mutex::new(Vec::new());
    let progress = |l: &str| lines.lock().unwrap().push(l.to_string());
    let t = target(server.addr, &user, &host, console.clone());
    let took = wait_for_ssh(&t, Duration::from_secs(20), &progress).unwrap();
    assert!(took < Duration::from_secs(20));
    assert_eq!(
        lines.lock().unwrap().last().unwrap(),
        &format!("m1: ssh ok after {} s", took.as_secs())
    );
    let s = login(&t, Duration::from_secs(5)).unwrap();
    assert_eq!(exec(&s, "m1", "echo hello").unwrap(), "hello\n");
    let err = exec(&s, "m1", "echo oops >&2; exit 3").unwrap_err();
    assert!(
        matches!(&err, SshError::Command { status: 3, stderr_tail, .. } if stderr_tail == "oops"),
        "{err}"
    );

    // The server's key is not the pinned one: refused at once, never retried.
    let wrong = target(server.addr, &user, &other, console);
    let t0 = Instant::now();
    let err = wait_for_ssh(&wrong, Duration::from_secs(30), &progress).unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(10));
    match &err {
        SshError::HostKeyMismatch { expected, got, .. } => {
            assert_eq!(expected, &other.fingerprint);
            assert_eq!(got, &host.fingerprint);
        }
        e => panic!("expected a host key mismatch, got {e}"),
    }
    assert!(
        err.to_string()
            .starts_with("m1: host key mismatch at 127.0.0.1:"),
        "{err}"
    );
}

#[test]
fn timeout_names_the_node_and_its_console_log() {
    let dir = tempfile::tempdir().unwrap();
    let user = ensure_key(&dir.path().join("id_ed25519"), "kthw@test").unwrap();
    let host = ensure_key(&dir.path().join("host_ed25519"), "root@m1").unwrap();
    let console = dir.path().join("console/m1.log");
    // Nothing listens on this loopback port.
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let t = target(addr, &user, &host, console.clone());
    let lines = std::sync::Mutex::new(Vec::new());
    let progress = |l: &str| lines.lock().unwrap().push(l.to_string());
    let err = wait_for_ssh(&t, Duration::from_secs(3), &progress).unwrap_err();
    assert!(matches!(err, SshError::Timeout { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.starts_with("m1: no ssh login after "), "{msg}");
    assert!(msg.contains("connect"), "{msg}");
    assert!(!msg.contains("console log ends"), "no log yet: {msg}");
    let hint = err.hint();
    assert!(hint.contains(&console.display().to_string()), "{hint}");
    assert!(hint.contains("TCG"), "{hint}");

    // With a console log, the error ends with its last lines, terminal escapes and
    // carriage returns dropped.
    std::fs::create_dir_all(console.parent().unwrap()).unwrap();
    let mut log: String = (1..=20).map(|i| format!("boot line {i}\r\n")).collect();
    log.push_str(
        "\u{1b}[0;1mKernel panic\u{1b}[0m - not syncing: VFS: unable to mount root fs\r\n\n",
    );
    std::fs::write(&console, log).unwrap();
    let msg = wait_for_ssh(&t, Duration::from_secs(1), &progress)
        .unwrap_err()
        .to_string();
    let (_, tail) = msg
        .split_once("\nthe console log ends with:\n")
        .unwrap_or_else(|| panic!("no console tail: {msg}"));
    let tail: Vec<&str> = tail.lines().map(str::trim).collect();
    assert_eq!(tail.len(), 12, "{msg}");
    assert_eq!(tail[0], "boot line 10");
    assert_eq!(
        tail[11],
        "Kernel panic - not syncing: VFS: unable to mount root fs"
    );
}
