//! Collisions between labs on one host, found before anything is created.

mod support;

use std::path::{Path, PathBuf};

use kthw_lab::host::preflight::lab_conflicts;
use kthw_lab::plan::{plan, LabPlan};
use kthw_lab::scenario::{load_str, HostLimits, Sources};

fn plan_of(text: &str) -> LabPlan {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let s = load_str(
        text,
        "s.yaml",
        &Sources { roots: vec![root] },
        &HostLimits { memory_mib: 65536 },
    )
    .unwrap_or_else(|e| panic!("{:#?}", e.diagnostics));
    plan(&s, text, Path::new("/var/lib/kthw-lab"))
}

fn shipped(stem: &str) -> LabPlan {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    plan_of(&std::fs::read_to_string(root.join(format!("scenarios/{stem}.yaml"))).unwrap())
}

#[test]
fn shipped_side_by_side_lab_coexists_with_the_default_one() {
    let a = shipped("2m2w");
    let b = shipped("side-by-side");
    assert_eq!(lab_conflicts(&a, std::slice::from_ref(&b)), vec![]);
    assert_eq!(lab_conflicts(&b, &[a]), vec![]);
}

#[test]
fn two_labs_on_the_same_network_collide_with_a_clear_message() {
    let a = shipped("2m2w");
    let b = shipped("3m3w");
    let found = lab_conflicts(&b, &[a]);
    let problems: Vec<&str> = found.iter().map(|f| f.problem.as_str()).collect();
    assert!(
        problems.contains(&"lab `k2m2w` already uses bridge br0"),
        "{problems:#?}"
    );
    assert!(
        problems.contains(&"lab `k2m2w` has node subnet 10.200.1.0/24, which overlaps this lab's node subnet 10.200.1.0/24"),
        "{problems:#?}"
    );
    assert!(
        problems.contains(&"lab `k2m2w` has pod range 10.100.0.0/16, which overlaps this lab's pod range 10.100.0.0/16"),
        "{problems:#?}"
    );
    assert!(found
        .iter()
        .all(|f| f.hint.contains("destroy `k2m2w` first")));
}

#[test]
fn a_pod_range_inside_another_labs_node_subnet_collides() {
    let a = shipped("side-by-side");
    let b = plan_of(
        "name: x\nnetwork: {bridge: br7, subnet: 10.77.0.0/24, gateway: 10.77.0.1}\ncontrollers: {count: 1}\nworkers: {count: 1}\nload_balancer: {address: 10.77.0.15}\ncluster: {pod_cidr: 10.201.0.0/16, service_cidr: 10.34.0.0/24}\n",
    );
    let found = lab_conflicts(&b, &[a]);
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(
        found[0].problem,
        "lab `side` has node subnet 10.201.1.0/24, which overlaps this lab's pod range 10.201.0.0/16"
    );
}

#[test]
fn service_ranges_may_repeat_across_labs() {
    let a = shipped("side-by-side");
    let b = plan_of(
        "name: x\nnetwork: {bridge: br7, subnet: 10.77.0.0/24, gateway: 10.77.0.1}\ncontrollers: {count: 1}\nworkers: {count: 1}\nload_balancer: {address: 10.77.0.15}\ncluster: {pod_cidr: 10.120.0.0/16, service_cidr: 10.33.0.0/24}\n",
    );
    assert_eq!(lab_conflicts(&b, &[a]), vec![]);
}

// ---- can qemu reach the lab's files? ----

use kthw_lab::host::preflight::{
    check_qemu_reach, first_closed, is_local_system, qemu_reach, qemu_user_setting, resolve_ids,
    DirAccess, Ids,
};

const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
    nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n\
    libvirt-qemu:x:64055:108:Libvirt Qemu,,,:/var/lib/libvirt:/usr/sbin/nologin\n\
    100:x:1100:1100::/home/100:/bin/sh\n";
const GROUP: &str =
    "root:x:0:\nkvm:x:108:libvirt-qemu\nlibvirt:x:109:alice\nlibvirt-qemu:x:64055:libvirt-qemu\n";

#[test]
fn qemu_conf_user_is_the_first_setting_or_debians_default() {
    assert_eq!(qemu_user_setting(None), "libvirt-qemu");
    // Debian's file: every setting commented out.
    assert_eq!(
        qemu_user_setting(Some(
            "#       user = \"qemu\"   # A user named \"qemu\"\n#user = \"libvirt-qemu\"\n#group = \"libvirt-qemu\"\n"
        )),
        "libvirt-qemu"
    );
    // libvirt takes the first of repeated settings; other keys ending in user do not count.
    assert_eq!(
        qemu_user_setting(Some(
            "swtpm_user = \"tss\"\nuser = \"root\"  # comment\nuser = \"libvirt-qemu\"\n"
        )),
        "root"
    );
}

/// scripts/netns-run's private qemu.conf starts with its own settings, so its
/// `user = "root"` is the one libvirt (and the preflight check) takes even when the
/// host's file sets another user: the real-VM tests' state dirs under 0700
/// tempdirs pass there.
#[test]
fn netns_runs_private_qemu_conf_runs_qemu_as_root_over_any_host_setting() {
    let script = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/netns-run"),
    )
    .unwrap();
    let lines: Vec<&str> = script.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.contains("printf '# kthw-lab netns-run"))
        .expect("netns-run writes its qemu.conf lines with printf");
    let cat = lines
        .iter()
        .position(|l| l.contains("cat /etc/libvirt/qemu.conf"))
        .expect("netns-run copies the host's qemu.conf");
    assert!(
        at < cat,
        "netns-run's own settings must come before the host's"
    );
    let printed = lines[at]
        .split_once("printf '")
        .and_then(|(_, r)| r.split_once('\''))
        .map(|(p, _)| p.replace("\\n", "\n"))
        .unwrap();
    let host = "#user = \"libvirt-qemu\"\nuser = \"libvirt-qemu\"\n";
    assert_eq!(qemu_user_setting(Some(&format!("{printed}{host}"))), "root");
    // The same lines after the host's would lose: the order is what matters.
    assert_eq!(
        qemu_user_setting(Some(&format!("{host}{printed}"))),
        "libvirt-qemu"
    );
}

#[test]
fn qemus_user_resolves_by_name_uid_and_groups() {
    let q = resolve_ids("libvirt-qemu", PASSWD, GROUP).unwrap();
    assert_eq!((q.uid, q.gid), (64055, 108));
    assert_eq!(q.groups, [108, 64055]);
    assert_eq!(resolve_ids("+0", PASSWD, GROUP).unwrap().uid, 0);
    assert_eq!(
        resolve_ids("+64055", PASSWD, GROUP).unwrap().name,
        "libvirt-qemu"
    );
    // A name first, a uid only when no user has that name (as libvirt reads it).
    assert_eq!(resolve_ids("100", PASSWD, GROUP).unwrap().uid, 1100);
    assert_eq!(resolve_ids("65534", PASSWD, GROUP).unwrap().name, "nobody");
    assert_eq!(resolve_ids("+4242", PASSWD, GROUP).unwrap().uid, 4242);
    assert_eq!(resolve_ids("nosuchuser", PASSWD, GROUP), None);
}

fn dir(path: &str, mode: u32, uid: u32, gid: u32) -> DirAccess {
    DirAccess {
        path: PathBuf::from(path),
        mode,
        uid,
        gid,
    }
}

#[test]
fn the_first_directory_qemu_cannot_enter_is_named_with_the_fix() {
    let q = resolve_ids("libvirt-qemu", PASSWD, GROUP).unwrap();
    let root = Ids {
        name: "root".into(),
        uid: 0,
        gid: 0,
        groups: vec![],
    };
    let mktemp = [
        dir("/", 0o755, 0, 0),
        dir("/tmp", 0o1777, 0, 0),
        dir("/tmp/tmp.abc", 0o700, 0, 0),
        dir("/tmp/tmp.abc/state", 0o755, 0, 0),
    ];
    assert_eq!(
        first_closed(&mktemp, &q).unwrap().path,
        PathBuf::from("/tmp/tmp.abc")
    );
    assert_eq!(first_closed(&mktemp, &root), None);
    // Traversable for others, for the group qemu is in, or for qemu as the owner.
    let open = [
        dir("/", 0o755, 0, 0),
        dir("/home/alice", 0o711, 1000, 1000),
        dir("/srv/kvm-only", 0o710, 0, 108),
        dir("/srv/qemus", 0o700, 64055, 64055),
    ];
    assert_eq!(first_closed(&open, &q), None);
    // The group bit does not count for someone outside the group, nor others' for the owner.
    assert!(first_closed(&[dir("/srv/g", 0o701, 0, 109)], &q).is_none());
    assert!(first_closed(&[dir("/srv/g", 0o770, 0, 109)], &q).is_some());
    assert!(first_closed(&[dir("/srv/o", 0o011, 64055, 0)], &q).is_some());

    let f = qemu_reach(&q, Path::new("/etc/libvirt/qemu.conf"), &mktemp).unwrap();
    assert_eq!(f.check, "qemu access");
    assert_eq!(
        f.problem,
        "qemu runs as libvirt-qemu (uid 64055, `user` in /etc/libvirt/qemu.conf), which cannot enter /tmp/tmp.abc (mode 0700, owner uid 0): libvirt would fail to start the lab's domains (\"Cannot access storage file\")"
    );
    assert!(f.hint.contains("chmod o+x /tmp/tmp.abc"), "{}", f.hint);
    assert!(f.hint.contains("--state-dir"), "{}", f.hint);
    assert_eq!(qemu_reach(&root, Path::new("/x"), &mktemp), None);
    assert_eq!(qemu_reach(&q, Path::new("/x"), &open), None);
}

#[test]
fn only_the_local_system_daemon_runs_qemu_as_its_own_user() {
    assert!(is_local_system("qemu:///system"));
    assert!(is_local_system("qemu+unix:///system?socket=/run/x"));
    assert!(!is_local_system("qemu:///session"));
    assert!(!is_local_system("test:///default"));
    assert!(!is_local_system("qemu+ssh://host/system"));
}

/// The check as create runs it, on this host's qemu.conf: a state dir under a 0700
/// directory is refused when qemu runs as a user, and passes once it is 0711.
#[test]
fn a_state_dir_under_a_closed_directory_is_found_on_this_host() {
    let conf = std::fs::read_to_string(kthw_lab::host::preflight::QEMU_CONF).ok();
    let user = qemu_user_setting(conf.as_deref());
    let who = resolve_ids(
        &user,
        &std::fs::read_to_string("/etc/passwd").unwrap(),
        &std::fs::read_to_string("/etc/group").unwrap(),
    );
    let tmp = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let state = tmp.path().join("state");
    let p = support::plan_1m1w(&state);
    let found = check_qemu_reach(&p, &state);
    match who {
        Some(w) if w.uid != 0 => {
            assert_eq!(found.len(), 1, "{found:#?}");
            assert!(
                found[0]
                    .hint
                    .contains(&format!("chmod o+x {}", tmp.path().display())),
                "{found:#?}"
            );
            std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
            assert_eq!(check_qemu_reach(&p, &state), vec![]);
        }
        // qemu runs as root here (inside scripts/netns-run, say): nothing to find.
        _ => assert_eq!(found, vec![]),
    }
}
