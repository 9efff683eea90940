//! Loopback fixtures: a child process killed on drop, a free port, waiting for a
//! listener, and a real sshd with throwaway keys that accepts root logins.

use std::collections::HashMap;
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kthw_lab::remote::{HostKey, SshRemote, SshTarget};

/// A server process, killed and reaped on drop (even after a panic).
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Wait (10 s at most) until 127.0.0.1:`port` accepts connections.
pub fn wait_listening(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// sshd on 127.0.0.1 with its own host key and one user key for root, in `dir`.
pub struct Sshd {
    _child: Killed,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

/// An ECDSA key pair in PEM (what libssh2 reads everywhere).
pub fn keygen(path: &Path) {
    assert!(Command::new(super::require("ssh-keygen", "openssh-client"))
        .args(["-q", "-t", "ecdsa", "-b", "256", "-m", "PEM", "-N", "", "-f"])
        .arg(path)
        .status()
        .expect("ssh-keygen")
        .success());
}

/// Start an sshd; a missing sshd fails the test (see [`super::require`]).
pub fn start_sshd() -> Sshd {
    let sshd = super::require("sshd", "openssh-server");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    keygen(&d.join("host_key"));
    keygen(&d.join("user_key"));
    std::fs::copy(d.join("user_key.pub"), d.join("authorized_keys")).unwrap();
    // sshd's privilege separation directory.
    std::fs::create_dir_all("/run/sshd").unwrap();
    let port = free_port();
    std::fs::write(
        d.join("sshd_config"),
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nPidFile {}\n\
             StrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
             PubkeyAuthentication yes\nPermitRootLogin prohibit-password\nLogLevel ERROR\n\
             MaxStartups 50\nMaxSessions 50\n",
            d.join("host_key").display(),
            d.join("authorized_keys").display(),
            d.join("sshd.pid").display()
        ),
    )
    .unwrap();
    let child = Killed(
        Command::new(&sshd)
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start sshd"),
    );
    // Listening is not enough: wait for the banner.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            let mut b = [0u8; 4];
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            if s.read_exact(&mut b).is_ok() && &b == b"SSH-" {
                break;
            }
        }
        assert!(Instant::now() < deadline, "sshd did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    Sshd {
        _child: child,
        port,
        dir,
    }
}

impl Sshd {
    /// The server's real host key.
    pub fn host_key(&self) -> HostKey {
        let line = std::fs::read_to_string(self.dir.path().join("host_key.pub")).unwrap();
        HostKey::from_openssh(&line).unwrap()
    }

    /// A remote where every one of `nodes` is this sshd, pinned to `key`.
    pub fn remote(&self, nodes: &[&str], key: HostKey) -> SshRemote {
        let targets: HashMap<String, SshTarget> = nodes
            .iter()
            .map(|n| {
                (
                    n.to_string(),
                    SshTarget {
                        addr: format!("127.0.0.1:{}", self.port),
                        user: "root".into(),
                        host_key: key.clone(),
                    },
                )
            })
            .collect();
        SshRemote::new(self.dir.path().join("user_key"), targets)
    }
}
