//! Rules of the test suite itself, read from the sources: which ignored tests
//! `make test` runs. A real-VM test is `#[ignore = "real VMs: ..."]` and runs in
//! `make test` (`--run-ignored all`); every other ignored test (a measurement, a
//! helper started by another test, a tool for a human) is named in the Makefile's
//! `NOT_IN_MAKE_TEST` and stays out. So a new ignored test has to say which it is.
//! And every package a test asks for with `support::require(tool, package)` is one
//! `scripts/deps.sh build test` installs.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const REAL_VMS: &str = "real VMs:";
const NEEDS_NETEM: &str = "needs netem";

/// One `#[test]` function: its ignore reason (`Some("")` for a bare `#[ignore]`)
/// and its body.
struct TestFn {
    file: String,
    ignore: Option<String>,
    body: String,
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Every test function of `text`, by name.
fn tests_in(file: &str, text: &str) -> Vec<(String, TestFn)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim() != "#[test]" {
            i += 1;
            continue;
        }
        let mut ignore = None;
        let mut j = i + 1;
        while j < lines.len() && lines[j].trim_start().starts_with("#[") {
            let a = lines[j].trim();
            if let Some(rest) = a.strip_prefix("#[ignore") {
                let reason = rest
                    .split_once('"')
                    .and_then(|(_, r)| r.rsplit_once('"'))
                    .map(|(r, _)| r.to_string())
                    .unwrap_or_default();
                ignore = Some(reason);
            }
            j += 1;
        }
        let sig = lines.get(j).copied().unwrap_or_default();
        let name = sig
            .trim_start()
            .trim_start_matches("pub ")
            .trim_start_matches("async ")
            .strip_prefix("fn ")
            .and_then(|r| r.split('(').next())
            .unwrap_or_else(|| panic!("{file}:{}: #[test] without a fn: {sig}", j + 1))
            .to_string();
        // The body: up to the closing brace at the fn's own indentation.
        let indent = sig.len() - sig.trim_start().len();
        let close = format!("{}}}", " ".repeat(indent));
        let mut k = j + 1;
        while k < lines.len() && lines[k] != close {
            k += 1;
        }
        let body = lines[j..k.min(lines.len())].join("\n");
        out.push((
            name,
            TestFn {
                file: file.to_string(),
                ignore,
                body,
            },
        ));
        i = k;
    }
    out
}

fn all_tests() -> BTreeMap<String, Vec<TestFn>> {
    let root = support::root();
    let mut files = Vec::new();
    rust_files(&root.join("tests"), &mut files);
    rust_files(&root.join("src"), &mut files);
    let mut by_name: BTreeMap<String, Vec<TestFn>> = BTreeMap::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let rel = f.strip_prefix(&root).unwrap().display().to_string();
        for (name, t) in tests_in(&rel, &text) {
            by_name.entry(name).or_default().push(t);
        }
    }
    by_name
}

/// The test names of the Makefile's `NOT_IN_MAKE_TEST := ...` (with `\` lines).
fn not_in_make_test(makefile: &str) -> Vec<String> {
    make_list(makefile, "NOT_IN_MAKE_TEST")
}

/// The words of the Makefile's `VAR := ...` (with `\` lines).
fn make_list(makefile: &str, var: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut lines = makefile.lines();
    let head = format!("{var} :=");
    while let Some(l) = lines.next() {
        let Some(rest) = l.strip_prefix(head.as_str()) else {
            continue;
        };
        let mut cur = rest.to_string();
        loop {
            let more = cur.trim_end().ends_with('\\');
            words.extend(
                cur.trim_end()
                    .trim_end_matches('\\')
                    .split_whitespace()
                    .map(str::to_string),
            );
            if !more {
                break;
            }
            cur = lines.next().unwrap_or_default().to_string();
        }
    }
    words
}

#[test]
fn every_ignored_test_is_either_a_real_vm_test_or_left_out_of_make_test_by_name() {
    let tests = all_tests();
    let makefile = std::fs::read_to_string(support::root().join("Makefile")).unwrap();
    let left_out = not_in_make_test(&makefile);
    assert!(
        !left_out.is_empty(),
        "NOT_IN_MAKE_TEST not found in the Makefile"
    );
    let mut problems = Vec::new();
    for name in &left_out {
        match tests.get(name) {
            None => problems.push(format!("NOT_IN_MAKE_TEST names `{name}`, which is no test")),
            Some(ts) => {
                for t in ts {
                    match &t.ignore {
                        None => problems.push(format!(
                            "{}: `{name}` is in NOT_IN_MAKE_TEST but not #[ignore]d",
                            t.file
                        )),
                        Some(r) if r.starts_with(REAL_VMS) => problems.push(format!(
                            "{}: `{name}` is a real-VM test (make test runs those) but also in NOT_IN_MAKE_TEST",
                            t.file
                        )),
                        Some(_) => {}
                    }
                }
            }
        }
    }
    let mut real_vm = 0;
    for (name, ts) in &tests {
        for t in ts {
            let boots = t.body.contains("enter(\"") || t.body.contains("real_vm_test(\"");
            match &t.ignore {
                // Run by make test where the kernel can (the Makefile's NEEDS_NETEM).
                Some(r)
                    if r.starts_with(NEEDS_NETEM)
                        && !make_list(&makefile, "NEEDS_NETEM").contains(name) =>
                {
                    problems.push(format!(
                        "{}: `{name}` says {NEEDS_NETEM:?} but is not in the Makefile's NEEDS_NETEM",
                        t.file
                    ))
                }
                Some(r) if r.starts_with(NEEDS_NETEM) => {}
                Some(r) if r.starts_with(REAL_VMS) => {
                    real_vm += 1;
                    if !boots {
                        problems.push(format!(
                            "{}: `{name}` says {REAL_VMS:?} but does not go through enter()/real_vm_test()",
                            t.file
                        ));
                    }
                }
                Some(r) if !left_out.contains(name) => problems.push(format!(
                    "{}: `{name}` is #[ignore = {r:?}]: make test would run it; start the reason with {REAL_VMS:?} if it is a real-VM test, else add it to NOT_IN_MAKE_TEST",
                    t.file
                )),
                Some(_) => {}
                None if boots => problems.push(format!(
                    "{}: `{name}` boots real VMs but is not #[ignore = \"{REAL_VMS} ...\"]: a plain cargo test would run it",
                    t.file
                )),
                None => {}
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // The real-VM tests of today: vm (1), vm_netns (4), e2e_lab, e2e_faults and
    // e2e_side_by_side (1 each).
    assert!(real_vm >= 8, "only {real_vm} real-VM tests found");
}

#[test]
fn the_scan_sees_attributes_and_bodies() {
    let text = "#[test]\n#[ignore = \"real VMs: x\"]\nfn a() {\n    if !enter(\"a\") {\n        return;\n    }\n}\n\n#[test]\nfn b() {\n    let x = 1;\n}\n\n    #[test]\n    #[ignore]\n    fn c() {\n        x();\n    }\n";
    let t = tests_in("t.rs", text);
    let names: Vec<&str> = t.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"]);
    assert_eq!(t[0].1.ignore.as_deref(), Some("real VMs: x"));
    assert!(t[0].1.body.contains("enter(\"a\")"));
    assert_eq!(t[1].1.ignore, None);
    assert!(!t[1].1.body.contains("enter"));
    assert_eq!(t[2].1.ignore.as_deref(), Some(""));
    assert_eq!(
        not_in_make_test("X := 1\nNOT_IN_MAKE_TEST := a b \\\n  c\nunit:\n"),
        ["a", "b", "c"]
    );
}

/// The packages of a group of `scripts/deps.sh` (`[group]="a b c"`).
fn deps_group(script: &str, group: &str) -> Vec<String> {
    let key = format!("[{group}]=\"");
    let line = script
        .lines()
        .find_map(|l| l.trim().strip_prefix(key.as_str()))
        .unwrap_or_else(|| panic!("no group {group} in scripts/deps.sh"));
    line.trim_end_matches('"')
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

#[test]
fn every_package_a_test_requires_is_installed_by_deps_sh() {
    let root = support::root();
    let script = std::fs::read_to_string(root.join("scripts/deps.sh")).unwrap();
    let mut installed = deps_group(&script, "build");
    installed.extend(deps_group(&script, "test"));
    assert!(installed.contains(&"openssh-server".to_string()));
    let mut files = Vec::new();
    rust_files(&root.join("tests"), &mut files);
    let mut asked = 0;
    let mut problems = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for call in text.split("require(\"").skip(1) {
            // `tool", "package")`
            let Some((tool, rest)) = call.split_once('"') else {
                continue;
            };
            let Some(pkg) = rest
                .strip_prefix(", \"")
                .and_then(|r| r.split_once('"'))
                .map(|(p, _)| p)
            else {
                continue;
            };
            asked += 1;
            if !installed.iter().any(|p| p == pkg) {
                problems.push(format!(
                    "{}: require(\"{tool}\", \"{pkg}\"): scripts/deps.sh build test does not install {pkg}",
                    f.strip_prefix(&root).unwrap().display()
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(asked >= 10, "only {asked} require() calls found");
}

/// The residue probes of the real-VM tests (`support::lab`) fail when their command
/// does: a failing `virsh`, `ip` or `nft` must never read as "nothing left".
#[test]
fn lab_probes_fail_when_their_command_fails() {
    use support::lab::{about_listed, json, sh, sh_may_fail};
    let fails = |f: &(dyn Fn() + std::panic::RefUnwindSafe)| std::panic::catch_unwind(f).is_err();
    assert_eq!(sh("echo hi"), "hi\n");
    assert!(fails(&|| {
        sh("echo partial; exit 3");
    }));
    // Empty output is not an empty list.
    assert!(fails(&|| {
        json("true");
    }));
    assert!(fails(&|| {
        json("echo '[]'; exit 1");
    }));
    assert_eq!(json("echo '[]'"), serde_json::json!([]));
    assert_eq!(sh_may_fail("exit 1"), None);
    assert_eq!(sh_may_fail("echo x").as_deref(), Some("x\n"));
    // A thing that went away between the listing and the question is skipped; one
    // still listed makes the failure real.
    assert_eq!(about_listed("exit 1", || false), None);
    assert!(fails(&|| {
        about_listed("exit 1", || true);
    }));
    assert_eq!(about_listed("echo y", || true).as_deref(), Some("y\n"));
}

/// The test outside netns-run fails when the copy inside ran no test: libtest exits
/// 0 for a name that matched nothing, or for an ignored test started without
/// `--include-ignored`, and that must not read as a pass.
#[test]
fn a_copy_inside_that_ran_nothing_fails_the_test_outside() {
    use std::process::Command;
    let ran_nothing = || {
        let mut c = Command::new("sh");
        c.args(["-c", "exit 0"]);
        support::run_inside(c, "probe");
    };
    assert!(std::panic::catch_unwind(ran_nothing).is_err());
    let mut c = Command::new("sh");
    c.args(["-c", "echo started > \"$KTHW_E2E_RAN_FILE\""]);
    support::run_inside(c, "probe");
    // A copy that failed still fails the test, with what it reported.
    let failed = || {
        let mut c = Command::new("sh");
        c.args([
            "-c",
            "echo 'inner reason' > \"$KTHW_E2E_PANIC_FILE\"; exit 3",
        ]);
        support::run_inside(c, "probe");
    };
    let e = std::panic::catch_unwind(failed).unwrap_err();
    let msg = e.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("inner reason"), "{msg}");
}
