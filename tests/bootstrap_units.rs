//! Rendered units and configs for the 2m2w plan: golden files, structural checks,
//! and every rendered flag checked against the flags catalog taken from the
//! Kubernetes command-line reference.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kthw_lab::components::ComponentCatalog;
use kthw_lab::plan::{plan, LabPlan};
use kthw_lab::render::units::{self, Bins, NodeOs};
use kthw_lab::scenario::{load_str, HostLimits, Role, Sources};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn plan_2m2w() -> LabPlan {
    let text = std::fs::read_to_string(root().join("scenarios/2m2w.yaml")).unwrap();
    let src = Sources {
        roots: vec![root()],
    };
    let host = HostLimits { memory_mib: 65536 };
    let s = load_str(&text, "2m2w.yaml", &src, &host)
        .unwrap_or_else(|e| panic!("{:#?}", e.diagnostics));
    plan(&s, &text, Path::new("/var/lib/kthw-lab"))
}

/// Golden name for a node file: `NODE/` + path with `/` turned into `_`.
fn golden_name(node: &str, path: &str) -> String {
    format!(
        "units/{node}/{}",
        path.trim_start_matches('/').replace('/', "_")
    )
}

fn all_files(p: &LabPlan, bins: &Bins) -> Vec<(String, units::RenderedFile)> {
    let os = NodeOs::default();
    let mut out = Vec::new();
    for n in &p.nodes {
        let mut files = match n.role {
            Role::Controller => units::controller_files(p, n, bins),
            Role::Worker => units::worker_files(p, n, bins, &os),
        };
        files.extend(units::route_files(p, n, &os));
        out.extend(files.into_iter().map(|f| (n.name.clone(), f)));
    }
    out
}

#[test]
fn rendered_files_match_golden_files() {
    let p = plan_2m2w();
    for (node, f) in all_files(&p, &Bins::downloaded()) {
        support::golden(&golden_name(&node, &f.path), &f.content);
    }
}

#[test]
fn image_packages_change_paths_and_containerd_config_version() {
    let p = plan_2m2w();
    let cat = ComponentCatalog::builtin().unwrap();
    let bins = Bins::with_image(
        &cat,
        &p.image,
        &["etcd", "containerd", "runc", "cni-plugins"],
    );
    assert_eq!(bins.etcd, "/usr/bin/etcd");
    assert_eq!(bins.etcdctl, "/usr/bin/etcdctl");
    assert_eq!(bins.runc, "/usr/sbin/runc");
    assert_eq!(bins.cni_bin_dir, "/usr/lib/cni");
    assert_eq!(bins.kubelet, "/usr/local/bin/kubelet");
    let n1 = p.node("n1").unwrap();
    let m1 = p.node("m1").unwrap();
    support::golden(
        "units/image-packages/n1_etc_containerd_config.toml",
        &units::containerd_config(&bins),
    );
    assert!(units::etcd_service(&p, m1, &bins).contains("ExecStart=/usr/bin/etcd \\"));
    let _ = n1;
}

#[test]
fn etcd_units_carry_the_whole_cluster_and_the_node_certificate() {
    let p = plan_2m2w();
    let bins = Bins::downloaded();
    for c in p.controllers() {
        let u = units::etcd_service(&p, c, &bins);
        assert!(u.contains(&format!(
            "--initial-cluster={}",
            p.cluster.etcd_initial_cluster
        )));
        assert!(u.contains(&format!("--cert-file=/etc/etcd/etcd-{}.pem", c.name)));
        assert!(u.contains(&format!("--listen-peer-urls=https://{}:2380", c.ip)));
        assert!(u.contains("--client-cert-auth"));
        assert!(u.contains("--peer-client-cert-auth"));
        assert!(!u.contains("http://"), "no plain-http URL in\n{u}");
        let a = units::kube_apiserver_service(&p, c, &bins);
        assert!(a.contains(&format!("--advertise-address={}", c.ip)));
        assert!(a.contains("--etcd-servers=https://10.200.1.10:2379,https://10.200.1.11:2379"));
    }
}

#[test]
fn each_node_routes_to_every_other_workers_pod_range() {
    let p = plan_2m2w();
    let os = NodeOs::default();
    for n in &p.nodes {
        let routes = units::pod_routes(&p, n);
        let others: Vec<_> = p.workers().filter(|w| w.name != n.name).collect();
        assert_eq!(routes.len(), others.len(), "{}", n.name);
        for w in others {
            let line = format!(
                "ExecStart=/usr/bin/ip route replace {} via {} proto static",
                w.pod_cidr.unwrap(),
                w.ip
            );
            assert!(
                units::pod_routes_service(&p, n, &os).contains(&line),
                "{}: {line}",
                n.name
            );
        }
    }
}

#[test]
fn cni_and_kubelet_use_the_nodes_planned_pod_range() {
    let p = plan_2m2w();
    for w in p.workers() {
        let cidr = w.pod_cidr.unwrap().to_string();
        let v: serde_json::Value = serde_json::from_str(&units::cni_bridge_conf(w)).unwrap();
        assert_eq!(v["ipam"]["ranges"][0][0]["subnet"], cidr.as_str());
        assert_eq!(v["ipam"]["type"], "host-local");
        let lo: serde_json::Value = serde_json::from_str(&units::cni_loopback_conf()).unwrap();
        assert_eq!(lo["type"], "loopback");
        let k: serde_json::Value =
            yaml_serde::from_str(&units::kubelet_config(&p, w, &NodeOs::default())).unwrap();
        assert_eq!(k["podCIDR"], cidr.as_str());
        assert_eq!(k["cgroupDriver"], "systemd");
        assert_eq!(
            k["clusterDNS"][0],
            p.cluster.dns_service_ip.to_string().as_str()
        );
    }
    assert!(units::containerd_config(&Bins::downloaded()).contains("SystemdCgroup = true"));
}

#[test]
fn yaml_documents_parse() {
    let p = plan_2m2w();
    for text in [units::kube_scheduler_config(), units::kube_proxy_config(&p)] {
        let _: serde_json::Value = yaml_serde::from_str(&text).unwrap();
    }
}

// ---- flags catalog ------------------------------------------------------------

#[derive(Debug)]
struct FlagCatalog {
    /// component -> flag -> status (`ok`, `deprecated`, `removed`).
    flags: BTreeMap<String, BTreeMap<String, String>>,
}

fn load_flags(version: &str) -> FlagCatalog {
    let path = root().join(format!("components/flags/v{version}.yaml"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let v: serde_json::Value = yaml_serde::from_str(&text).unwrap();
    let mut flags = BTreeMap::new();
    let comps = v["components"].as_object().expect("components mapping");
    for (comp, body) in comps {
        assert!(
            body["source"].is_string(),
            "{comp}: every list names its source"
        );
        let mut m = BTreeMap::new();
        for f in body["flags"].as_array().expect("flags list") {
            match f {
                serde_json::Value::String(name) => {
                    m.insert(name.clone(), "ok".to_string());
                }
                serde_json::Value::Object(o) => {
                    let name = o["name"].as_str().unwrap().to_string();
                    let status = o["status"].as_str().unwrap().to_string();
                    assert!(
                        ["ok", "deprecated", "removed"].contains(&status.as_str()),
                        "{comp} {name}: {status}"
                    );
                    m.insert(name, status);
                }
                other => panic!("{comp}: unexpected {other}"),
            }
        }
        flags.insert(comp.clone(), m);
    }
    FlagCatalog { flags }
}

/// Problems with the flags of the units among `files`: unknown to the catalog, or
/// marked deprecated/removed. Also returns how many flags were looked at.
fn flag_problems(
    cat: &FlagCatalog,
    minor: &str,
    files: &[(String, units::RenderedFile)],
) -> (usize, Vec<String>) {
    let mut checked = 0;
    let mut problems = Vec::new();
    for (node, f) in files {
        if !f.path.ends_with(".service") {
            continue;
        }
        let Some((program, flags)) = units::exec_start_flags(&f.content) else {
            continue;
        };
        let comp = program.rsplit('/').next().unwrap();
        let Some(known) = cat.flags.get(comp) else {
            // etcd, containerd and ip are not Kubernetes components.
            assert!(
                ["etcd", "containerd", "ip", "true"].contains(&comp),
                "{node} {}: no flag list for {comp}",
                f.path
            );
            continue;
        };
        for flag in flags {
            checked += 1;
            match known.get(&flag).map(String::as_str) {
                Some("ok") => {}
                Some(status) => problems.push(format!("{node} {comp} --{flag}: {status}")),
                None => problems.push(format!(
                    "{node} {comp} --{flag}: not in components/flags/v{minor}.yaml"
                )),
            }
        }
    }
    (checked, problems)
}

fn k8s_minor(p: &LabPlan) -> String {
    let mut it = p.versions.kubernetes.split('.');
    format!("{}.{}", it.next().unwrap(), it.next().unwrap())
}

#[test]
fn every_rendered_flag_exists_and_is_current_in_the_pinned_version() {
    let p = plan_2m2w();
    let minor = k8s_minor(&p);
    let cat = load_flags(&minor);
    let (checked, problems) = flag_problems(&cat, &minor, &all_files(&p, &Bins::downloaded()));
    assert!(checked > 30, "only {checked} flags checked");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_flag_check_catches_unknown_deprecated_and_removed_flags() {
    let p = plan_2m2w();
    let cat = load_flags(&k8s_minor(&p));
    let bad = |bin: &str, flag: &str| {
        (
            "n1".to_string(),
            units::RenderedFile {
                path: "/etc/systemd/system/x.service".into(),
                mode: 0o644,
                content: format!("[Service]\nExecStart=/usr/local/bin/{bin} \\\n  --{flag}=1\n"),
            },
        )
    };
    let files = vec![
        bad("kubelet", "register-node"),
        bad("kube-apiserver", "apiserver-count"),
        bad("kube-scheduler", "no-such-flag"),
        bad("kube-proxy", "config"),
    ];
    let (checked, problems) = flag_problems(&cat, "1.32", &files);
    assert_eq!(checked, 4);
    assert_eq!(
        problems,
        [
            "n1 kubelet --register-node: deprecated",
            "n1 kube-apiserver --apiserver-count: removed",
            "n1 kube-scheduler --no-such-flag: not in components/flags/v1.32.yaml",
        ]
    );
}

#[test]
fn exec_start_parser_joins_continuation_lines() {
    let unit = "[Service]\nExecStart=/usr/local/bin/x \\\n  --a=1 \\\n  --b \\\n  --c=d=e\nRestart=always\n";
    let (prog, flags) = units::exec_start_flags(unit).unwrap();
    assert_eq!(prog, "/usr/local/bin/x");
    assert_eq!(flags, ["a", "b", "c"]);
}

#[test]
fn a_lone_worker_gets_a_valid_routes_unit_without_routes() {
    let text = std::fs::read_to_string(root().join("scenarios/1m1w.yaml")).unwrap();
    let src = Sources {
        roots: vec![root()],
    };
    let s = load_str(&text, "1m1w.yaml", &src, &HostLimits { memory_mib: 65536 }).unwrap();
    let p = plan(&s, &text, Path::new("/var/lib/kthw-lab"));
    let os = NodeOs::default();
    let worker = p.workers().next().unwrap();
    let controller = p.controllers().next().unwrap();
    let w = units::pod_routes_service(&p, worker, &os);
    assert!(units::pod_routes(&p, worker).is_empty());
    assert!(w.contains("ExecStart=/usr/bin/true"), "{w}");
    let c = units::pod_routes_service(&p, controller, &os);
    assert!(
        c.contains(&format!(
            "route replace {} via {} proto static",
            worker.pod_cidr.unwrap(),
            worker.ip
        )),
        "{c}"
    );
}

/// The etcd unit's flags and the etcdctl health command's flags, checked against
/// the `--help` of the real etcd/etcdctl 3.4 that Debian ships (the image's
/// packages, installed here by `scripts/deps.sh test`).
#[test]
fn etcd_flags_exist_in_the_debian_etcd_binaries() {
    // The image's paths, which the unit names: the host's packages put them there too.
    let (etcd, etcdctl) = ("/usr/bin/etcd", "/usr/bin/etcdctl");
    assert_eq!(support::require("etcd", "etcd-server"), Path::new(etcd));
    assert_eq!(
        support::require("etcdctl", "etcd-client"),
        Path::new(etcdctl)
    );
    let help = |bin: &str| {
        let out = std::process::Command::new(bin)
            .arg("--help")
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let known = |text: &str, flag: &str| {
        text.lines().any(|l| {
            let l = l.trim_start();
            l.starts_with(&format!("--{flag} ")) || l.starts_with(&format!("--{flag}="))
        })
    };
    let p = plan_2m2w();
    let cat = ComponentCatalog::builtin().unwrap();
    let bins = Bins::with_image(&cat, &p.image, &["etcd"]);
    let m1 = p.node("m1").unwrap();
    let etcd_help = help(etcd);
    assert!(
        !known(&etcd_help, "no-such-flag"),
        "the check must be able to fail"
    );
    let (prog, flags) = units::exec_start_flags(&units::etcd_service(&p, m1, &bins)).unwrap();
    assert_eq!(prog, etcd);
    for f in &flags {
        assert!(known(&etcd_help, f), "etcd 3.4 has no --{f}");
    }
    let ctl_help = help(etcdctl);
    let cmd = kthw_lab::actions::bootstrap::etcd_health_cmd(&p, m1, &bins);
    for w in cmd.split_whitespace().filter_map(|w| w.strip_prefix("--")) {
        let f = w.split('=').next().unwrap();
        assert!(known(&ctl_help, f), "etcdctl 3.4 has no --{f}");
    }
    assert!(ctl_help.contains("endpoint health"));
}

/// Every rendered unit passes `systemd-analyze verify` (offline, read-only). The
/// only complaint allowed is a downloaded binary that is not installed on this
/// machine.
#[test]
fn rendered_units_pass_systemd_analyze_verify() {
    let tool = support::require("systemd-analyze", "systemd");
    let p = plan_2m2w();
    let dir = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for (node, f) in all_files(&p, &Bins::downloaded()) {
        let Some(name) = f.path.strip_prefix("/etc/systemd/system/") else {
            continue;
        };
        let nd = dir.path().join(&node);
        std::fs::create_dir_all(&nd).unwrap();
        let unit = nd.join(name);
        std::fs::write(&unit, &f.content).unwrap();
        let out = std::process::Command::new(&tool)
            .args(["verify", "--man=no"])
            .arg(&unit)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let problems: Vec<&str> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .filter(|l| !(l.contains("/usr/local/bin/") && l.contains("is not executable")))
            .collect();
        assert!(
            problems.is_empty(),
            "{node} {name}:\n{}",
            problems.join("\n")
        );
        checked += 1;
    }
    assert!(checked >= 12, "only {checked} units verified");
}

fn plan_of(label: &str, text: &str) -> LabPlan {
    let src = Sources {
        roots: vec![root()],
    };
    let s = load_str(text, label, &src, &HostLimits { memory_mib: 65536 })
        .unwrap_or_else(|e| panic!("{label}: {:#?}", e.diagnostics));
    plan(&s, text, Path::new("/var/lib/kthw-lab"))
}

/// Every file rendered for a node (what the golden files cover) is installed by
/// exactly one bootstrap phase, and no phase installs a file that is not rendered.
/// A file the path filters of `runtime` and `workers` do not take would otherwise be
/// golden-tested and never reach a node.
#[test]
fn every_rendered_file_is_installed_by_exactly_one_phase() {
    use kthw_lab::actions::bootstrap::phase_files;
    use kthw_lab::actions::phase::Phase;
    let mut plans: Vec<LabPlan> = ["1m1w", "2m2w", "3m3w", "side-by-side"]
        .iter()
        .map(|stem| {
            let f = format!("scenarios/{stem}.yaml");
            plan_of(&f, &std::fs::read_to_string(root().join(&f)).unwrap())
        })
        .collect();
    plans.push(plan_of(
        "no-workers.yaml",
        "name: cp\ncontrollers: {count: 1}\nworkers: {count: 0}\nload_balancer: {address: 10.200.1.15}\n",
    ));
    let cat = ComponentCatalog::builtin().unwrap();
    let os = NodeOs::default();
    let mut checked = 0;
    for p in &plans {
        for bins in [
            Bins::downloaded(),
            Bins::with_image(
                &cat,
                &p.image,
                &["etcd", "containerd", "runc", "cni-plugins"],
            ),
        ] {
            for (node, f) in all_files(p, &bins) {
                let n = p.node(&node).unwrap();
                let by: Vec<Phase> = Phase::ALL
                    .into_iter()
                    .filter(|ph| {
                        phase_files(*ph, p, n, &bins, &os)
                            .iter()
                            .any(|x| x.path == f.path)
                    })
                    .collect();
                assert_eq!(
                    by.len(),
                    1,
                    "{}: {node} {} is installed by {by:?}: every rendered file needs exactly one phase (actions/bootstrap.rs phase_files)",
                    p.lab,
                    f.path
                );
                // The phase installs the rendered content, not another version of it.
                let installed = phase_files(by[0], p, n, &bins, &os);
                let same = installed.iter().find(|x| x.path == f.path).unwrap();
                assert_eq!(same, &f, "{}: {node} {}", p.lab, f.path);
                checked += 1;
            }
            for n in &p.nodes {
                let rendered: Vec<String> = all_files(p, &bins)
                    .into_iter()
                    .filter(|(node, _)| *node == n.name)
                    .map(|(_, f)| f.path)
                    .collect();
                for ph in Phase::ALL {
                    for f in phase_files(ph, p, n, &bins, &os) {
                        assert!(
                            rendered.contains(&f.path),
                            "{}: phase {} installs {} on {}, which is not among the rendered (golden-tested) files",
                            p.lab,
                            ph.name(),
                            f.path,
                            n.name
                        );
                    }
                }
            }
        }
    }
    assert!(checked > 100, "only {checked} files checked");
}
