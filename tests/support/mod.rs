//! Shared test support: network namespaces the test creates and always deletes.
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
