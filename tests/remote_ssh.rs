//! SshRemote against a real OpenSSH server on 127.0.0.1, started by the test with its
//! own host key, authorized key and config in a temp dir. Several "nodes" are names
//! for the same server. Loopback only.
//!
//! Needs sshd (openssh-server) and ssh-keygen (openssh-client); a test fails naming
//! the package when either is missing.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use kthw_lab::remote::{all_ok, exec_all, HostKey, Remote, RemoteError};

mod support;

use support::loopback::{keygen, start_sshd, Sshd};

fn scratch(sshd: &Sshd, name: &str) -> PathBuf {
    let p = sshd.dir.path().join("scratch").join(name);
    std::fs::create_dir_all(&p).unwrap();
    p
}

const T: Duration = Duration::from_secs(20);

#[test]
fn exec_reports_status_stdout_and_stderr_on_one_reused_session() {
    let sshd = start_sshd();
    let r = sshd.remote(&["m1"], sshd.host_key());
    let out = r.exec("m1", "echo out; echo err >&2; exit 3", T).unwrap();
    assert_eq!(out.status, 3);
    assert_eq!(out.stdout, "out\n");
    assert_eq!(out.stderr, "err\n");
    assert_eq!(r.open_sessions(), 1);
    for i in 0..5 {
        let out = r.exec("m1", &format!("echo {i}"), T).unwrap();
        assert_eq!(out.stdout, format!("{i}\n"));
    }
    assert_eq!(r.open_sessions(), 1, "one session per node, reused");
    let big = r.exec("m1", "seq 1 200000", T).unwrap();
    assert_eq!(big.stdout.lines().count(), 200000);
    // run() turns a failure into an error naming node, command, status and output.
    let e = r
        .run("m1", "echo one; echo boom >&2; false", T)
        .unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, RemoteError::Command { status: 1, .. }), "{msg}");
    assert!(
        msg.starts_with("m1: `echo one; echo boom >&2; false` exited with status 1"),
        "{msg}"
    );
    assert!(msg.contains("boom"), "{msg}");
    assert!(e.hint().is_some());
}

#[test]
fn a_command_that_overruns_its_timeout_fails_and_the_next_one_works() {
    let sshd = start_sshd();
    let r = sshd.remote(&["n1"], sshd.host_key());
    let t0 = Instant::now();
    let e = r
        .exec("n1", "echo started; sleep 31.5", Duration::from_secs(1))
        .unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    assert!(matches!(e, RemoteError::Timeout { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("n1: `echo started; sleep 31.5` timed out after 1s"),
        "{msg}"
    );
    assert!(msg.ends_with("last output:\nstarted"), "{msg}");
    // The node's own `timeout` stopped the command: nothing is left running there.
    let left = Command::new("pgrep")
        .args(["-f", "sleep 31.5"])
        .output()
        .unwrap();
    assert!(left.stdout.is_empty(), "still running: {left:?}");
    let out = r.exec("n1", "echo again", T).unwrap();
    assert_eq!(out.stdout, "again\n");
}

#[test]
fn upload_sets_content_mode_and_owner_atomically() {
    let sshd = start_sshd();
    let r = sshd.remote(&["n1"], sshd.host_key());
    let dir = scratch(&sshd, "up");
    let dest = dir.join("sub/dir/etcd.service");
    let dest_s = dest.to_str().unwrap();
    let content: Vec<u8> = (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect();
    r.upload("n1", &content, dest_s, 0o640, "nobody:nogroup")
        .unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), content);
    let md = std::fs::metadata(&dest).unwrap();
    assert_eq!(md.permissions().mode() & 0o7777, 0o640);
    let nobody = Command::new("id").args(["-u", "nobody"]).output().unwrap();
    let uid: u32 = String::from_utf8_lossy(&nobody.stdout)
        .trim()
        .parse()
        .unwrap();
    assert_eq!(md.uid(), uid);
    let ino = md.ino();
    // Replacing goes through a new file and a rename: a new inode, no temp left.
    r.upload("n1", b"v2\n", dest_s, 0o600, "root:root").unwrap();
    let md2 = std::fs::metadata(&dest).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), b"v2\n");
    assert_eq!(md2.permissions().mode() & 0o7777, 0o600);
    assert_eq!(md2.uid(), 0);
    assert_ne!(md2.ino(), ino, "replaced by rename, not rewritten in place");
    let names: Vec<String> = std::fs::read_dir(dest.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["etcd.service"]);
    // The content check the phases use.
    let sum = r.file_sha256("n1", dest_s).unwrap().unwrap();
    assert_eq!(sum, kthw_lab_sha256(b"v2\n"));
    assert_eq!(
        r.file_sha256("n1", dir.join("missing").to_str().unwrap())
            .unwrap(),
        None
    );
    // A failing upload (unknown owner) leaves the old file and no temp behind.
    let e = r
        .upload("n1", b"v3\n", dest_s, 0o600, "no-such-user-kthw")
        .unwrap_err();
    assert!(e.to_string().contains("upload"), "{e}");
    assert_eq!(std::fs::read(&dest).unwrap(), b"v2\n");
    assert_eq!(
        std::fs::read_dir(dest.parent().unwrap()).unwrap().count(),
        1
    );
}

fn kthw_lab_sha256(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

#[test]
fn a_wrong_host_key_is_refused_before_logging_in() {
    let sshd = start_sshd();
    let other = sshd.dir.path().join("other_host_key");
    keygen(&other);
    let wrong = HostKey::from_openssh(
        &std::fs::read_to_string(format!("{}.pub", other.display())).unwrap(),
    )
    .unwrap();
    let r = sshd.remote(&["m2"], wrong.clone());
    let e = r.exec("m2", "touch /should-not-exist", T).unwrap_err();
    match &e {
        RemoteError::HostKeyMismatch {
            node,
            expected,
            found,
            ..
        } => {
            assert_eq!(node, "m2");
            assert!(
                expected.contains(&HostKey::fingerprint(&wrong.blob)),
                "{expected}"
            );
            assert_eq!(found, &HostKey::fingerprint(&sshd.host_key().blob));
        }
        other => panic!("expected a host key mismatch, got {other}"),
    }
    assert!(e.to_string().contains("host key mismatch"), "{e}");
    assert!(e.hint().unwrap().contains("m2"));
    assert_eq!(r.open_sessions(), 0);
    // An unknown node is an error of its own.
    assert!(matches!(
        r.exec("zz", "true", T),
        Err(RemoteError::UnknownNode { .. })
    ));
}

#[test]
fn exec_all_runs_nodes_in_parallel_and_keeps_node_order() {
    let sshd = start_sshd();
    let nodes = ["m1", "m2", "n1", "n2"];
    let r = sshd.remote(&nodes, sshd.host_key());
    let t0 = Instant::now();
    let res = exec_all(&r, &nodes, |r, n| {
        r.run(n, &format!("sleep 2; echo {n}"), T)
            .map(|o| o.stdout.trim().to_string())
    });
    let took = t0.elapsed();
    let got = all_ok(res).unwrap();
    assert_eq!(
        got,
        nodes
            .iter()
            .map(|n| (n.to_string(), n.to_string()))
            .collect::<Vec<_>>()
    );
    assert!(took < Duration::from_secs(6), "took {took:?}: not parallel");
    assert_eq!(r.open_sessions(), 4);
    // One failing node is reported as that node's error.
    let res = exec_all(&r, &nodes, |r, n| {
        r.run(n, if n == "n1" { "exit 7" } else { "true" }, T)
            .map(|_| ())
    });
    let e = all_ok(res).unwrap_err();
    assert_eq!(e.node(), "n1");
}
