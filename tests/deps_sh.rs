//! scripts/deps.sh against a package set of the test's own, never the machine's: a
//! private apt configuration (APT_CONFIG) with a dpkg status file and a local
//! `file:` repository holding stand-ins of Debian 12's qemu and of bookworm-backports'
//! qemu 10, whose qemu-utils breaks Debian 12's qemu-system-common as the real one
//! does. `DEPS_SIMULATE=1` makes the script only ask apt (`apt-get -s`), so nothing is
//! installed and no network is used.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sha2::{Digest, Sha256};

const OLD: &str = "1:7.2+dfsg-7+deb12u18";
const BPO: &str = "1:10.0.2+ds-2~bpo12+1";

fn stanza(pkg: &str, version: &str, extra: &str) -> String {
    format!(
        "Package: {pkg}\nVersion: {version}\nArchitecture: amd64\nMaintainer: test <test@example.invalid>\n{extra}Filename: pool/{pkg}_{version}.deb\nSize: 1\nDescription: stand-in for {pkg}\n\n"
    )
}

/// qemu-utils, qemu-system-common and qemu-system-x86 at `version`; the backport's
/// qemu-utils breaks the older qemu-system-common.
fn qemu(version: &str) -> String {
    let breaks = if version == BPO {
        "Breaks: qemu-system-common (<< 1:8.0+dfsg-5~)\n"
    } else {
        ""
    };
    [
        stanza("qemu-utils", version, breaks),
        stanza("qemu-system-common", version, ""),
        stanza("qemu-system-data", version, ""),
        stanza(
            "qemu-system-x86",
            version,
            &format!("Depends: qemu-system-common (= {version}), qemu-system-data (= {version})\n"),
        ),
    ]
    .concat()
}

/// `dists/SUITE` of the local repository: one Packages index and its Release.
fn suite(repo: &Path, name: &str, packages: &str, backports: bool) {
    let dir = repo.join("dists").join(name);
    std::fs::create_dir_all(dir.join("main/binary-amd64")).unwrap();
    std::fs::write(dir.join("main/binary-amd64/Packages"), packages).unwrap();
    let sha = hex::encode(Sha256::digest(packages.as_bytes()));
    let pin = if backports {
        "NotAutomatic: yes\nButAutomaticUpgrades: yes\n"
    } else {
        ""
    };
    std::fs::write(
        dir.join("Release"),
        format!(
            "Origin: Debian\nLabel: Debian\nSuite: {name}\nCodename: {name}\n{pin}Date: Sat, 01 Jan 2000 00:00:00 UTC\nArchitectures: amd64\nComponents: main\nSHA256:\n {sha} {} main/binary-amd64/Packages\n",
            packages.len()
        ),
    )
    .unwrap();
}

/// The packages of deps.sh's `build` and `test` groups (and kubectl's package).
fn wanted() -> Vec<String> {
    let script = std::fs::read_to_string(support::root().join("scripts/deps.sh")).unwrap();
    let mut out = vec!["kubernetes-client".to_string()];
    for g in ["build", "test"] {
        let key = format!("[{g}]=\"");
        let line = script
            .lines()
            .find_map(|l| l.trim().strip_prefix(key.as_str()))
            .unwrap();
        out.extend(
            line.trim_end_matches('"')
                .split_whitespace()
                .map(str::to_string),
        );
    }
    out
}

struct Apt {
    _dir: tempfile::TempDir,
    conf: PathBuf,
}

/// A private apt (simulating whatever it is asked to install, as a belt besides
/// DEPS_SIMULATE): the repository (bookworm always, bookworm-backports when
/// `with_backports`) and a dpkg status where everything deps.sh wants is installed
/// except qemu-system-x86 and its companions, with qemu-utils at `qemu_utils`.
fn private_apt(with_backports: bool, qemu_utils: &str) -> Apt {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    suite(&repo, "bookworm", &qemu(OLD), false);
    suite(&repo, "bookworm-backports", &qemu(BPO), true);
    let mut sources = format!("deb [trusted=yes] file:{} bookworm main\n", repo.display());
    if with_backports {
        sources.push_str(&format!(
            "deb [trusted=yes] file:{} bookworm-backports main\n",
            repo.display()
        ));
    }
    std::fs::write(d.join("sources.list"), sources).unwrap();
    let mut status = String::new();
    for p in wanted() {
        if p.starts_with("qemu-") {
            continue;
        }
        status.push_str(&format!(
            "Package: {p}\nStatus: install ok installed\nPriority: optional\nSection: misc\nMaintainer: test <test@example.invalid>\nArchitecture: amd64\nVersion: 1.0\nDescription: stand-in\n\n"
        ));
    }
    let breaks = if qemu_utils == BPO {
        "Breaks: qemu-system-common (<< 1:8.0+dfsg-5~)\n"
    } else {
        ""
    };
    status.push_str(&format!(
        "Package: qemu-utils\nStatus: install ok installed\nPriority: optional\nSection: otherosfs\nMaintainer: test <test@example.invalid>\nArchitecture: amd64\nVersion: {qemu_utils}\n{breaks}Description: stand-in\n\n"
    ));
    let dpkg = d.join("dpkg");
    std::fs::create_dir_all(dpkg.join("updates")).unwrap();
    std::fs::create_dir_all(dpkg.join("info")).unwrap();
    std::fs::write(dpkg.join("status"), status).unwrap();
    std::fs::write(dpkg.join("available"), "").unwrap();
    for sub in ["lists/partial", "cache/archives/partial"] {
        std::fs::create_dir_all(d.join(sub)).unwrap();
    }
    let conf = d.join("apt.conf");
    std::fs::write(
        &conf,
        format!(
            "Dir::Etc::SourceList \"{0}/sources.list\";\nDir::Etc::SourceParts \"/dev/null\";\n\
             Dir::Etc::Preferences \"/dev/null\";\nDir::Etc::PreferencesParts \"/dev/null\";\n\
             Dir::State::Lists \"{0}/lists\";\nDir::Cache \"{0}/cache\";\n\
             Dir::State::status \"{0}/dpkg/status\";\nDebug::NoLocking \"true\";\n\
             APT::Architecture \"amd64\";\nAPT::Architectures {{ \"amd64\"; }};\nAcquire::Languages \"none\";\n\
             APT::Get::Simulate \"true\";\n",
            d.display()
        ),
    )
    .unwrap();
    Apt { _dir: dir, conf }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn deps_sh(apt: &Apt) -> Output {
    Command::new(support::root().join("scripts/deps.sh"))
        .args(["build", "test"])
        .env("APT_CONFIG", &apt.conf)
        .env("DEPS_SIMULATE", "1")
        .output()
        .unwrap()
}

fn apt_get_s(apt: &Apt, args: &[&str]) -> Output {
    Command::new(support::require("apt-get", "apt"))
        .arg("-s")
        .args(args)
        .env("APT_CONFIG", &apt.conf)
        .output()
        .unwrap()
}

fn update(apt: &Apt) {
    let o = Command::new("apt-get")
        .args(["update", "-qq"])
        .env("APT_CONFIG", &apt.conf)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
}

#[test]
fn a_backported_qemu_utils_gets_qemu_system_x86_from_backports() {
    support::require("dpkg-query", "dpkg");
    let apt = private_apt(true, BPO);
    update(&apt);
    // The stand-ins reproduce the defect: the default release's qemu-system-x86
    // cannot go beside the backported qemu-utils.
    let plain = apt_get_s(
        &apt,
        &["install", "--no-install-recommends", "qemu-system-x86"],
    );
    let said = format!("{}{}", text(&plain.stdout), text(&plain.stderr));
    assert!(!plain.status.success(), "{said}");
    assert!(said.contains("generated breaks"), "{said}");

    let o = deps_sh(&apt);
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert!(o.status.success(), "{err}\n{out}");
    assert!(
        err.contains("deps.sh: apt-get install -t bookworm-backports qemu-system-x86"),
        "{err}"
    );
    assert!(
        out.contains(&format!("Inst qemu-system-x86 ({BPO} ")),
        "{out}"
    );
    assert!(
        out.contains(&format!("Inst qemu-system-common ({BPO} ")),
        "{out}"
    );
    assert!(!out.contains("Remv"), "{out}");
}

#[test]
fn a_backport_no_source_offers_stops_with_what_to_do() {
    support::require("dpkg-query", "dpkg");
    let apt = private_apt(false, BPO);
    update(&apt);
    let o = deps_sh(&apt);
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert_eq!(o.status.code(), Some(1), "{err}\n{out}");
    assert!(
        err.contains(&format!(
            "qemu-utils {BPO} is a backport, but no enabled apt source offers it"
        )),
        "{err}"
    );
    assert!(err.contains("hint: enable bookworm-backports"), "{err}");
    assert!(err.contains("qemu-utils/bookworm"), "{err}");
    // It stopped before asking apt to install anything.
    assert!(!out.contains("Inst "), "{out}");
}

#[test]
fn debian_12s_qemu_utils_gets_debian_12s_qemu_system_x86() {
    support::require("dpkg-query", "dpkg");
    let apt = private_apt(true, OLD);
    update(&apt);
    let o = deps_sh(&apt);
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert!(o.status.success(), "{err}\n{out}");
    assert!(!err.contains("-t "), "{err}");
    assert!(
        out.contains(&format!("Inst qemu-system-x86 ({OLD} ")),
        "{out}"
    );
    assert!(!out.contains("Remv"), "{out}");
}
