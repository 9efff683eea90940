//! Shared test support: network namespaces the test creates and always deletes, the
//! one way a test asks for a host tool, and the gate of the real-VM tests.
#![allow(dead_code)]

pub mod lab;
pub mod loopback;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The path of `tool` (on PATH, or in /usr/sbin and /sbin, where Debian puts sshd and
/// friends); panics naming the Debian package when it is missing. A test that cannot
/// run its check fails: it never passes without having checked anything.
/// `scripts/deps.sh build test` installs every package named here.
pub fn require(tool: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "missing {tool}: apt-get install --no-install-recommends {package} (or scripts/deps.sh build test)"
            )
        })
}

/// The gate of every real-VM test (and of tests that start `scripts/netns-run`):
/// such a test is `#[ignore = "real VMs: ..."]`, so a plain `cargo test` lists it as
/// ignored instead of booting VMs or passing without having run, and `make test`
/// runs it (`--run-ignored all`). A real-VM test someone forgot to mark fails here
/// instead of running in every `cargo test`. Also checks the one thing all of them
/// need: root (namespaces, libvirtd).
pub fn real_vm_test(test: &str) {
    // nextest passes `--ignored` to an ignored test; `cargo test -- --include-ignored`
    // and `--ignored` pass themselves through.
    let ignored_run = std::env::args().any(|a| a == "--ignored" || a == "--include-ignored");
    assert!(
        ignored_run,
        "{test} boots real VMs but is not #[ignore]d: mark it #[ignore = \"real VMs: run by make test (--run-ignored all)\"]"
    );
    // SAFETY: geteuid has no preconditions and cannot fail.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "{test} needs root (network namespaces, a private libvirtd)"
    );
}

/// The plan of the shipped `scenarios/1m1w.yaml` with its state under `state`.
pub fn plan_1m1w(state: &std::path::Path) -> kthw_lab::plan::LabPlan {
    use kthw_lab::scenario::{load_str, HostLimits, Sources};
    let text = std::fs::read_to_string(root().join("scenarios/1m1w.yaml")).unwrap();
    let s = load_str(
        &text,
        "1m1w.yaml",
        &Sources {
            roots: vec![root()],
        },
        &HostLimits { memory_mib: 65536 },
    )
    .unwrap();
    kthw_lab::plan::plan(&s, &text, state)
}

/// A network namespace owned by one test; deleted on drop, even after a panic.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!(
            "kthwt-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap()
            .success();
        assert!(ok, "ip netns add {name} failed (tests need root)");
        let ns = Netns { name };
        ns.sh("ip link set lo up");
        ns
    }

    /// Run a program inside the namespace.
    pub fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, prog]);
        c
    }

    /// Run a shell snippet inside the namespace; panics on failure.
    pub fn sh(&self, script: &str) -> String {
        let o = self.cmd("sh").args(["-ec", script]).output().unwrap();
        assert!(
            o.status.success(),
            "in {}: `{script}` failed: {}",
            self.name,
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    pub fn json(&self, script: &str) -> serde_json::Value {
        serde_json::from_str(&self.sh(script)).unwrap()
    }

    /// The kthw-lab binary inside the namespace.
    pub fn kthw(&self, state: &std::path::Path, args: &[&str]) -> Output {
        self.cmd(env!("CARGO_BIN_EXE_kthw-lab"))
            .arg("--state-dir")
            .arg(state)
            .args(args)
            .current_dir(root())
            .env("KTHW_LAB_PLAIN", "1")
            .output()
            .unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// A state dir shared by the real-VM tests so the offline image is built once (the
/// cache's lock makes concurrent tests wait for one build rather than run two).
pub fn shared_state() -> PathBuf {
    target_dir().join("kthw-test-state")
}

/// Build (or reuse) the offline image in the shared cache; returns its directory.
pub fn shared_image() -> PathBuf {
    let catalog = kthw_lab::cache::Catalog::load(&[root()]).expect("catalog");
    let t = std::time::Instant::now();
    let img = kthw_lab::cache::blocking::ensure_image(
        &catalog,
        "kthw-debian12",
        &shared_state(),
        kthw_lab::cache::Progress::Lines,
    )
    .unwrap_or_else(|e| panic!("offline image: {e}\nhint: {}", e.hint()));
    println!(
        "image {} in {:.0} s at {}",
        if img.fetched { "built" } else { "reused" },
        t.elapsed().as_secs_f64(),
        img.dir.display()
    );
    img.dir
}

/// Where the copy of a test that runs inside `scripts/netns-run` writes its panic, so
/// the test outside fails with that message and not only "failed inside": the inner
/// output is thousands of lines, and a CI excerpt shows only its head and tail.
const PANIC_FILE: &str = "KTHW_E2E_PANIC_FILE";

/// Where the copy inside says that it started, so the test outside can tell a run
/// from a copy that matched no test (a wrong name, or an ignored test started
/// without `--include-ignored`), which libtest reports as success.
const RAN_FILE: &str = "KTHW_E2E_RAN_FILE";

/// Inside netns-run: say that the test started, and write every panic to the file
/// the test outside reads, too.
pub fn report_panics_outward() {
    if let Some(ran) = std::env::var_os(RAN_FILE) {
        std::fs::write(ran, "started\n").expect("tell the test outside that this one runs");
    }
    let Some(path) = std::env::var_os(PANIC_FILE) else {
        return;
    };
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
        {
            let _ = writeln!(f, "{info}");
        }
        prev(info);
    }));
}

/// Outside: run `cmd` (netns-run with one test inside) and fail with what made the
/// test inside panic.
pub fn run_inside(mut cmd: Command, test: &str) {
    let file = tempfile::NamedTempFile::new().unwrap();
    let ran = tempfile::NamedTempFile::new().unwrap();
    let st = cmd
        .env(PANIC_FILE, file.path())
        .env(RAN_FILE, ran.path())
        .status()
        .expect("run scripts/netns-run");
    if st.success() {
        let started = std::fs::read_to_string(ran.path()).unwrap_or_default();
        assert!(
            started.contains("started"),
            "{test} did not run inside scripts/netns-run: the copy there matched no test (is it ignored and started without --include-ignored?)"
        );
        return;
    }
    let why = std::fs::read_to_string(file.path()).unwrap_or_default();
    let why = why.trim();
    const KEEP: usize = 4000;
    let why = match why.char_indices().nth(KEEP) {
        Some((at, _)) => format!("{} [... cut at {KEEP} characters]", &why[..at]),
        None if why.is_empty() => "no panic reported; see the output above".to_string(),
        None => why.to_string(),
    };
    // Printed last, with no backtrace of this outer frame after it: the tail of a CI
    // log then ends on the reason.
    eprintln!("{test} failed inside scripts/netns-run ({st}):\n{why}");
    std::panic::resume_unwind(Box::new(format!("{test} failed: {why}")));
}

/// Compare `actual` with the golden file `tests/golden/<rel>`; `UPDATE_GOLDEN=1`
/// rewrites it (review the diff).
pub fn golden(rel: &str, actual: &str) {
    let path = root().join("tests/golden").join(rel);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with UPDATE_GOLDEN=1 to create it)",
            path.display()
        )
    });
    assert!(
        expected == actual,
        "{} differs from the golden file; run with UPDATE_GOLDEN=1 if the change is intended\n--- expected\n{expected}\n--- actual\n{actual}",
        path.display()
    );
}
