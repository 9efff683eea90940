//! `scripts/netns-run` on its own (needs root and libvirt; `#[ignore]`d like the
//! real-VM tests, which `make test` runs, since each run starts a private libvirtd and
//! some a tiny qemu):
//! the command sees a private libvirtd in a fresh network namespace, its exit code comes
//! back, domains defined inside never reach the host's libvirt, and nothing is left after,
//! not even when netns-run itself is killed with SIGKILL (its watchdog reaps the
//! namespace; with the watchdog killed too, the next run does).

mod support;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn netns_run(script: &str) -> Output {
    let runner = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/netns-run");
    Command::new(runner)
        .args(["sh", "-c", script])
        .output()
        .expect("run scripts/netns-run")
}

fn namespaces() -> String {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
#[ignore = "real VMs: run by make test (--run-ignored all)"]
fn netns_run_isolates_libvirt_and_cleans_up() {
    support::real_vm_test("netns_run_isolates_libvirt_and_cleans_up");
    let xml = "<domain type='qemu'><name>kthw-netns-probe</name><memory unit='MiB'>64</memory>\
               <os><type arch='x86_64'>hvm</type></os></domain>";
    let script = format!(
        "set -e\n\
         echo ns=$KTHW_NETNS_NAME\n\
         ip -o link show lo | grep -q 'UP'\n\
         test \"$(ip -o link | wc -l)\" -eq 3\n\
         ip -o link show kthw-up0 >/dev/null\n\
         ip route | grep -q '^default dev kthw-up0'\n\
         virsh -q -c qemu:///system list --all --name | grep -c . || true\n\
         echo \"{xml}\" > /run/libvirt/probe.xml\n\
         virsh -q -c qemu:///system define /run/libvirt/probe.xml >/dev/null\n\
         virsh -q -c qemu:///system list --all --name\n\
         test -f /etc/libvirt/qemu/kthw-netns-probe.xml\n\
         exit 7\n"
    );
    let out = netns_run(&script);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(7),
        "the command's exit code comes back\nstdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ns=kthw-"), "{stdout}");
    assert!(stdout.contains("kthw-netns-probe"), "{stdout}");
    // The definition lived in the private tmpfs only.
    assert!(!std::path::Path::new("/etc/libvirt/qemu/kthw-netns-probe.xml").exists());
    // Our namespace is gone (others may come and go: engineers share this machine).
    let ns = stdout
        .lines()
        .find_map(|l| l.strip_prefix("ns="))
        .unwrap()
        .to_string();
    let after = namespaces();
    assert!(
        !after.split_whitespace().any(|w| w == ns),
        "namespace {ns} was left behind: {after}"
    );
}

#[test]
#[ignore = "real VMs: run by make test (--run-ignored all)"]
fn netns_run_passes_success_through() {
    support::real_vm_test("netns_run_passes_success_through");
    let out = netns_run("virsh -c qemu:///system list --all");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("Name"));
}

/// A netns-run whose command starts a real (tiny, diskless) qemu domain under the
/// private libvirtd, reports what runs in the namespace, then sleeps.
struct Running {
    child: Child,
    ns: String,
    /// qemu, libvirtd, virtlogd and the command (a sleep), by pid.
    pids: Vec<(u32, String)>,
}

impl Drop for Running {
    /// A failed assertion must not leak the run: killing netns-run hands its
    /// namespace to the watchdog (or to the next run).
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_busy_netns_run() -> Running {
    let runner = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/netns-run");
    let script = "set -e\n\
        echo \"<domain type='qemu'><name>kthw-reap-probe</name><memory unit='MiB'>32</memory>\
        <os><type arch='x86_64'>hvm</type></os><features><tcg><tb-cache unit='MiB'>16</tb-cache></tcg>\
        </features></domain>\" > /run/libvirt/probe.xml\n\
        virsh -q -c qemu:///system create /run/libvirt/probe.xml >/dev/null\n\
        echo ns=$KTHW_NETNS_NAME\n\
        echo pid=$(cat /run/libvirt/qemu/kthw-reap-probe.pid) qemu-system\n\
        echo pid=$(cat /run/libvirt/libvirtd.pid) libvirtd\n\
        echo pid=$(cat /run/libvirt/virtlogd.pid) virtlogd\n\
        echo pid=$$ sleep\n\
        echo ready\n\
        exec sleep 600\n";
    let mut child = Command::new(runner)
        .args(["sh", "-c", script])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run scripts/netns-run");
    let out = BufReader::new(child.stdout.take().unwrap());
    let mut r = Running {
        child,
        ns: String::new(),
        pids: Vec::new(),
    };
    for line in out.lines() {
        let line = line.unwrap();
        if let Some(n) = line.strip_prefix("ns=") {
            r.ns = n.to_string();
        } else if let Some(rest) = line.strip_prefix("pid=") {
            let (pid, what) = rest.split_once(' ').unwrap();
            r.pids.push((pid.parse().unwrap(), what.to_string()));
        } else if line == "ready" {
            break;
        }
    }
    assert!(r.ns.starts_with("kthw-"), "no namespace reported");
    assert_eq!(r.pids.len(), 4, "{:?}", r.pids);
    // `ready` comes just before the shell execs into sleep: give it a moment.
    let t0 = Instant::now();
    while !r.pids.iter().all(|(p, w)| alive_as(*p, w)) && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for (pid, what) in &r.pids {
        assert!(
            alive_as(*pid, what),
            "{what} ({pid}) does not run in {}",
            r.ns
        );
    }
    r
}

/// True when `pid` runs and its command line mentions `what` (so a reused pid
/// does not count).
fn alive_as(pid: u32, what: &str) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let zombie = stat
        .rsplit_once(") ")
        .is_some_and(|(_, rest)| rest.starts_with('Z'));
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    !zombie && String::from_utf8_lossy(&cmd).contains(what)
}

fn has_namespace(ns: &str) -> bool {
    namespaces().split_whitespace().any(|w| w == ns)
}

/// Wait up to `limit` for the namespace and every process of it to be gone.
fn gone_within(r: &Running, limit: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if !has_namespace(&r.ns) && r.pids.iter().all(|(p, w)| !alive_as(*p, w)) {
            return Some(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}

fn sigkill(pid: u32) {
    // SAFETY: kill(2) on a process this test started (or its watchdog).
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
}

fn leftovers(r: &Running) -> String {
    format!(
        "namespace {} present: {}; still running: {:?}",
        r.ns,
        has_namespace(&r.ns),
        r.pids
            .iter()
            .filter(|(p, w)| alive_as(*p, w))
            .collect::<Vec<_>>()
    )
}

#[test]
#[ignore = "real VMs: run by make test (--run-ignored all)"]
fn netns_run_killed_with_sigkill_leaves_nothing_behind() {
    support::real_vm_test("netns_run_killed_with_sigkill_leaves_nothing_behind");
    let mut r = start_busy_netns_run();
    sigkill(r.child.id());
    let _ = r.child.wait();
    let took = gone_within(&r, Duration::from_secs(20));
    assert!(
        took.is_some(),
        "the watchdog did not reap: {}",
        leftovers(&r)
    );
    println!(
        "watchdog reaped {} in {:.1} s",
        r.ns,
        took.unwrap().as_secs_f64()
    );
}

/// The watchdog's pid: a netns-run `--watchdog NS` process.
fn watchdog_of(ns: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        let ours = args
            .windows(2)
            .any(|w| w[0] == b"--watchdog" && w[1] == ns.as_bytes());
        ours.then_some(pid)
    })
}

#[test]
#[ignore = "real VMs: run by make test (--run-ignored all)"]
fn the_next_netns_run_reaps_what_a_killed_one_and_its_watchdog_left() {
    support::real_vm_test("the_next_netns_run_reaps_what_a_killed_one_and_its_watchdog_left");
    let mut r = start_busy_netns_run();
    let wd = watchdog_of(&r.ns).expect("netns-run starts a watchdog");
    sigkill(wd);
    sigkill(r.child.id());
    let _ = r.child.wait();
    // Nobody is left to clean up: the namespace and its processes leak...
    assert!(
        has_namespace(&r.ns) && r.pids.iter().all(|(p, w)| alive_as(*p, w)),
        "expected a leak to reap: {}",
        leftovers(&r)
    );
    // ...until the next run, which reaps it before it starts. (Another test's
    // netns-run running at the same time may reap it first; either way only the
    // reaper can have removed it.)
    let out = netns_run("true");
    assert!(out.status.success());
    println!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        gone_within(&r, Duration::from_secs(5)).is_some(),
        "{}",
        leftovers(&r)
    );
}
