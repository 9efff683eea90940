//! Real-VM lab tests: entering `scripts/netns-run`, driving the binary, and proving
//! that nothing of a lab is left on the real system after `destroy`.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ipnetwork::Ipv4Network;
use serde_json::Value;

use super::{root, text};

/// Set for the copy of the test binary that runs inside netns-run.
pub const INSIDE: &str = "KTHW_E2E_INSIDE";

/// Outside: build the image, then re-run `test` inside netns-run. True when the
/// caller is inside and should do the work. The test is `#[ignore = "real VMs: ..."]`
/// (see [`super::real_vm_test`]), so its copy inside is started with
/// `--include-ignored`.
pub fn enter(test: &str) -> bool {
    if std::env::var_os(INSIDE).is_some() {
        super::report_panics_outward();
        return true;
    }
    super::real_vm_test(test);
    let image = super::shared_image();
    let mut cmd = Command::new(root().join("scripts/netns-run"));
    cmd.arg(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--include-ignored"])
        .env(INSIDE, "1")
        .env("KTHW_E2E_CACHE", image.parent().unwrap().parent().unwrap());
    super::run_inside(cmd, test);
    false
}

/// A shell command's standard output, or why it failed (exit status and stderr).
pub fn try_sh(cmd: &str) -> Result<String, String> {
    let o = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    if o.status.success() {
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    } else {
        Err(format!(
            "`{cmd}` failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ))
    }
}

/// A shell command's standard output; the test fails when the command does (a probe
/// whose command fails must never read as "nothing there").
pub fn sh(cmd: &str) -> String {
    try_sh(cmd).unwrap_or_else(|e| panic!("{e}"))
}

/// For the rare command whose failure is an expected answer (asking libvirt about a
/// domain that may not be defined yet): its output, `None` when it failed.
pub fn sh_may_fail(cmd: &str) -> Option<String> {
    try_sh(cmd).ok()
}

/// `cmd` about one thing a listing just showed (a domain, a pool). It may fail only
/// because the thing went away in the meantime (another lab destroyed beside this
/// one): then `None`. If `still_listed` says it is still there, the failure is real
/// and fails the test.
pub fn about_listed(cmd: &str, still_listed: impl FnOnce() -> bool) -> Option<String> {
    match try_sh(cmd) {
        Ok(out) => Some(out),
        Err(e) if still_listed() => panic!("{e}"),
        Err(_) => None,
    }
}

fn domain_listed(d: &str) -> bool {
    sh("virsh -q -c qemu:///system list --all --name")
        .split_whitespace()
        .any(|x| x == d)
}

fn pool_listed(p: &str) -> bool {
    sh("virsh -q -c qemu:///system pool-list --all --name")
        .split_whitespace()
        .any(|x| x == p)
}

/// The binary with plain progress lines; the user's view goes to the test log.
pub fn kthw(state: &Path, args: &[&str]) -> Output {
    kthw_env(state, args, &[])
}

pub fn kthw_env(state: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let o = kthw_cmd(state, args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    eprintln!(
        "$ {}kthw-lab {}\n{}{}",
        env.iter()
            .map(|(k, v)| format!("{k}={v} "))
            .collect::<String>(),
        args.join(" "),
        text(&o.stdout),
        text(&o.stderr)
    );
    o
}

pub fn kthw_cmd(state: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kthw-lab"));
    c.arg("--state-dir")
        .arg(state)
        .args(args)
        .current_dir(root())
        .env("KTHW_LAB_PLAIN", "1")
        .env_remove(kthw_lab::actions::INJECT_FAULT_ENV);
    c
}

/// A state dir whose cache is the shared one (the image is built once).
pub fn state_dir(tmp: &Path) -> PathBuf {
    let state = tmp.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let cache = std::env::var_os("KTHW_E2E_CACHE").expect("set by enter()");
    std::os::unix::fs::symlink(cache, state.join("cache")).unwrap();
    state
}

/// A stand-in uplink (a veth pair, no way out) for scenarios that name `upl0`.
pub fn stand_in_uplink() {
    sh("ip link add upl0 type veth peer name upl1; ip link set upl0 up; ip link set upl1 up");
}

/// The lab's plan as the tool computes it for this state dir.
pub fn plan_json(state: &Path, scenario: &str) -> Value {
    let o = kthw_cmd(state, &["plan", scenario, "-o", "json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "plan failed: {}", text(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// A command's JSON output; a failing command, or output that is not JSON (empty
/// included: `ip -j` and `nft -j` print `[]` or an object when there is nothing),
/// fails the test.
pub fn json(cmd: &str) -> Value {
    let out = sh(cmd);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("`{cmd}`: {e}: {out:?}"))
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

/// Everything of the lab in `plan` still on the real system, by kind: libvirt
/// domains and volumes, links (bridge, taps), addresses, routes, nft tables,
/// processes (balancer, qemu) and the lab's state dir. Another lab's things do not
/// count, so this also works with a second lab running beside.
pub fn residue(plan: &Value, state: &Path) -> Vec<String> {
    let lab = s(&plan["lab"]);
    let net = &plan["network"];
    let bridge = s(&net["bridge"]);
    let domains: BTreeSet<&str> = plan["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| s(&n["domain"]))
        .collect();
    let lab_dir = state.join("labs").join(lab);
    let mut left = Vec::new();

    // libvirt: domains by name or by the lab's metadata marker; taps of the others.
    let marker = format!("name=\"{lab}\" role=");
    let mut other_taps = BTreeSet::new();
    for d in sh("virsh -q -c qemu:///system list --all --name").split_whitespace() {
        if domains.contains(d) {
            left.push(format!("domain {d}"));
            continue;
        }
        // Another lab's domain may be undefined between the list and these questions.
        let Some(xml) = about_listed(&format!("virsh -c qemu:///system dumpxml {d}"), || {
            domain_listed(d)
        }) else {
            continue;
        };
        if xml.contains(&marker) {
            left.push(format!("domain {d}"));
        } else if let Some(ifs) =
            about_listed(&format!("virsh -q -c qemu:///system domiflist {d}"), || {
                domain_listed(d)
            })
        {
            for l in ifs.lines() {
                if let Some(tap) = l.split_whitespace().next() {
                    other_taps.insert(tap.to_string());
                }
            }
        }
    }
    for pool in sh("virsh -q -c qemu:///system pool-list --all --name").split_whitespace() {
        let Some(vols) = about_listed(
            &format!("virsh -q -c qemu:///system vol-list --pool {pool}"),
            || pool_listed(pool),
        ) else {
            continue;
        };
        for l in vols
            .lines()
            .filter(|l| l.contains(lab_dir.to_str().unwrap()))
        {
            left.push(format!("volume {}", l.trim()));
        }
    }

    // Links: the bridge (by name or by the lab's alias), ports on it, stray taps.
    let alias = s(&net["bridge_alias"]);
    for l in json("ip -j -d link show").as_array().unwrap() {
        let name = s(&l["ifname"]);
        if name == bridge || s(&l["ifalias"]) == alias {
            left.push(format!("link {name}"));
        } else if s(&l["master"]) == bridge {
            left.push(format!("link {name} on {bridge}"));
        } else if s(&l["linkinfo"]["info_kind"]) == "tun" && !other_taps.contains(name) {
            left.push(format!("tap {name}"));
        }
    }

    // Addresses: the gateway and the balancer's address.
    let ours: BTreeSet<&str> = [s(&net["gateway"]), s(&plan["load_balancer"]["address"])].into();
    for l in json("ip -j addr show").as_array().unwrap() {
        for a in l["addr_info"].as_array().into_iter().flatten() {
            if ours.contains(s(&a["local"])) {
                left.push(format!("address {} on {}", s(&a["local"]), s(&l["ifname"])));
            }
        }
    }

    // Routes into the lab's node subnet or pod range.
    let nets: Vec<Ipv4Network> = [s(&net["subnet"]), s(&plan["cluster"]["pod_cidr"])]
        .iter()
        .map(|c| c.parse().unwrap())
        .collect();
    for r in json("ip -j route show table all").as_array().unwrap() {
        let dst = s(&r["dst"]);
        let addr = dst.split('/').next().unwrap_or_default();
        let via = s(&r["gateway"]);
        let hit = |a: &str| {
            a.parse::<Ipv4Addr>()
                .is_ok_and(|ip| nets.iter().any(|n| n.contains(ip)))
        };
        if hit(addr) || hit(via) {
            left.push(format!("route {dst} via {via} dev {}", s(&r["dev"])));
        }
    }

    // nft: the lab's table.
    let table = s(&net["nft_table"]);
    for t in json("nft -j list tables")
        .get("nftables")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if s(&t["table"]["name"]) == table {
            left.push(format!("nft table {} {table}", s(&t["table"]["family"])));
        }
    }

    // Processes: the balancer (its config path is the marker) and qemu of the domains.
    let lb_marker = format!("/labs/{lab}/lb/lb.json");
    for line in sh("ps -eo pid=,args=").lines() {
        let qemu = domains
            .iter()
            .any(|d| line.contains(&format!("guest={d},")));
        if line.contains(&lb_marker) || qemu {
            left.push(format!("process {}", line.trim()));
        }
    }

    if lab_dir.exists() {
        left.push(format!("state dir {}", lab_dir.display()));
    }
    left
}

/// `destroy` succeeded and nothing of the lab is left.
pub fn destroy_leaves_nothing(state: &Path, plan: &Value) -> f64 {
    let lab = s(&plan["lab"]);
    let t = std::time::Instant::now();
    let o = kthw(state, &["destroy", lab]);
    let secs = t.elapsed().as_secs_f64();
    assert!(o.status.success(), "destroy {lab} failed");
    let left = residue(plan, state);
    assert!(
        left.is_empty(),
        "lab {lab} left after destroy:\n{}",
        left.join("\n")
    );
    secs
}
