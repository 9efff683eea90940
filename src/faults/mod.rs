//! Faults put in force on a lab on purpose: by an experiment's steps (partitions,
//! link delays, paused or crashed nodes, units held down, balancer backends taken
//! out) and by a checkpoint save (every node paused for a moment).
//!
//! Each fault is recorded in the lab's `faults.json` *before* it is applied, and
//! its record goes only once it is undone. So a run killed at any moment leaves a
//! record of whatever it may have put in force, and the next `experiment run`,
//! `checkpoint`, `status` or `destroy` finds and undoes it. The host-side faults
//! are also found by their markers without any record: the lab's partition table
//! (`nft` family bridge, named after the lab's NAT table) and a `netem` qdisc on a
//! tap device of one of the lab's domains (the tool never puts one there otherwise).
//!
//! Everything is done from the host: nft on the lab bridge, tc on the tap devices,
//! libvirt for the VMs, the balancer's control socket, and SSH (systemctl) for
//! units. Nothing inside a guest is changed to make a partition or a delay.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::host::libvirt::{DomainState, Hypervisor, HypervisorError};
use crate::plan::LabPlan;
use crate::remote::{Remote, RemoteError};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netem_in_a_kernel_config() {
        assert_eq!(
            netem_in_config("CONFIG_A=y\nCONFIG_NET_SCH_NETEM=m\n"),
            Some(true)
        );
        assert_eq!(
            netem_in_config("# CONFIG_NET_SCH_NETEM is not set\n"),
            Some(false)
        );
        assert_eq!(netem_in_config("CONFIG_NET_SCH_HTB=y\n"), None);
    }

    #[test]
    fn netem_arguments() {
        assert_eq!(
            netem_args("vnet3", 200, 0, 0.0).join(" "),
            "qdisc replace dev vnet3 root netem delay 200ms"
        );
        assert_eq!(
            netem_args("vnet3", 50, 10, 1.5).join(" "),
            "qdisc replace dev vnet3 root netem delay 50ms 10ms loss 1.5%"
        );
    }

    #[test]
    fn a_partition_drops_both_ways_between_groups_only() {
        let a: Ipv4Addr = "10.0.0.1".parse().unwrap();
        let b: Ipv4Addr = "10.0.0.2".parse().unwrap();
        let c: Ipv4Addr = "10.0.0.3".parse().unwrap();
        let s = partition_script("kthw_l_faults", "br9", "l", &[vec![a], vec![b, c]]);
        assert!(
            s.starts_with("add table bridge kthw_l_faults\ndelete table bridge kthw_l_faults\n")
        );
        assert!(s.contains("ip saddr { 10.0.0.1 } ip daddr { 10.0.0.2, 10.0.0.3 } counter drop"));
        assert!(s.contains("ip saddr { 10.0.0.2, 10.0.0.3 } ip daddr { 10.0.0.1 } counter drop"));
        assert_eq!(s.matches("drop").count(), 2);
        // Three groups: every ordered pair.
        let s = partition_script("t", "br9", "l", &[vec![a], vec![b], vec![c]]);
        assert_eq!(s.matches("drop").count(), 6);
    }

    #[test]
    fn kill_holds_the_unit_down_unless_told_not_to() {
        assert_eq!(
            kill_unit_command("etcd", true),
            "systemctl kill --signal=SIGKILL etcd; systemctl stop etcd"
        );
        assert_eq!(
            kill_unit_command("etcd", false),
            "systemctl kill --signal=SIGKILL etcd"
        );
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    #[error("`{cmd}` failed: {detail}")]
    Command { cmd: String, detail: String },
    #[error("cannot run `{prog}`")]
    Spawn {
        prog: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error("cannot use the fault record {path}")]
    Record {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the load balancer's control socket: {0}")]
    Balancer(String),
    #[error("node `{node}` has no tap device (is its domain running?)")]
    NoTap { node: String },
}

impl FaultError {
    pub fn hint(&self) -> String {
        match self {
            FaultError::Command { cmd, .. } if cmd.starts_with("nft") => {
                "install nftables (apt-get install --no-install-recommends nftables); partitions are nft rules on the lab bridge".into()
            }
            FaultError::Command { cmd, detail } if cmd.starts_with("tc") && detail.contains("qdisc kind is unknown") => {
                "this kernel has no netem qdisc: `modprobe sch_netem` (Debian's kernels ship it); a kernel built without CONFIG_NET_SCH_NETEM cannot delay links".into()
            }
            FaultError::Command { cmd, .. } if cmd.starts_with("tc") => {
                "install iproute2 and make sure the sch_netem module can load (modprobe sch_netem)".into()
            }
            FaultError::Command { .. } | FaultError::Spawn { .. } => {
                "the command above says why; run it by hand to see more".into()
            }
            FaultError::Hypervisor(e) => e.hint(),
            FaultError::Remote(e) => e
                .hint()
                .unwrap_or_else(|| "check the node with `kthw-lab ssh LAB NODE`".into()),
            FaultError::Record { path, .. } => format!(
                "check the permissions of {}; the lab's state dir must be writable",
                path.display()
            ),
            FaultError::Balancer(_) => {
                "the balancer runs from phase `lb`; `kthw-lab start LAB` brings it back".into()
            }
            FaultError::NoTap { .. } => {
                "start the node first (`kthw-lab start LAB`, or a `start-node` step)".into()
            }
        }
    }
}

/// One fault in force, in terms of the lab's node names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Fault {
    /// Traffic between the groups is dropped on the lab bridge.
    Partition { groups: Vec<Vec<String>> },
    /// A netem qdisc on the node's tap device.
    Delay {
        node: String,
        ms: u32,
        jitter_ms: u32,
        loss_percent: f64,
    },
    /// The node's vCPUs are frozen.
    Paused { node: String },
    /// The node was powered off without a shutdown.
    Crashed { node: String },
    /// A unit killed or stopped and held down.
    UnitDown { node: String, unit: String },
    /// The balancer sends nothing to this backend.
    BackendDisabled { node: String },
}

impl Fault {
    pub fn describe(&self) -> String {
        match self {
            Fault::Partition { groups } => format!(
                "partition {}",
                groups
                    .iter()
                    .map(|g| format!("[{}]", g.join(",")))
                    .collect::<Vec<_>>()
                    .join(" | ")
            ),
            Fault::Delay {
                node,
                ms,
                jitter_ms,
                loss_percent,
            } => delay_text(node, *ms, *jitter_ms, *loss_percent),
            Fault::Paused { node } => format!("{node} paused"),
            Fault::Crashed { node } => format!("{node} powered off"),
            Fault::UnitDown { node, unit } => format!("{unit} down on {node}"),
            Fault::BackendDisabled { node } => format!("balancer backend {node} disabled"),
        }
    }
}

/// `delay 200 ms on NODE ±20 ms, 1% loss` (pure).
pub fn delay_text(node: &str, ms: u32, jitter_ms: u32, loss_percent: f64) -> String {
    let mut s = format!("delay {ms} ms on {node}");
    if jitter_ms > 0 {
        s.push_str(&format!(" ±{jitter_ms} ms"));
    }
    if loss_percent > 0.0 {
        s.push_str(&format!(", {loss_percent}% loss"));
    }
    s
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultRecord {
    #[serde(flatten)]
    pub fault: Fault,
    /// Unix seconds.
    pub since: u64,
    /// Who put it in force: `experiment NAME (run ID)` or `checkpoint save NAME`.
    pub by: String,
}

/// The lab's record of faults in force: `faults.json` in its state dir.
pub struct FaultStore {
    path: PathBuf,
}

#[derive(Default, Serialize, Deserialize)]
struct StoreFile {
    faults: Vec<FaultRecord>,
}

impl FaultStore {
    pub fn of(plan: &LabPlan) -> FaultStore {
        FaultStore::at(plan.paths.root.join("faults.json"))
    }

    pub fn at(path: PathBuf) -> FaultStore {
        FaultStore { path }
    }

    fn err(&self) -> impl FnOnce(std::io::Error) -> FaultError + '_ {
        move |source| FaultError::Record {
            path: self.path.clone(),
            source,
        }
    }

    pub fn load(&self) -> Result<Vec<FaultRecord>, FaultError> {
        match std::fs::read(&self.path) {
            Ok(b) => serde_json::from_slice::<StoreFile>(&b)
                .map(|f| f.faults)
                .map_err(|e| self.err()(std::io::Error::new(std::io::ErrorKind::InvalidData, e))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(self.err()(e)),
        }
    }

    fn save(&self, faults: Vec<FaultRecord>) -> Result<(), FaultError> {
        if faults.is_empty() {
            return match std::fs::remove_file(&self.path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(self.err()(e)),
            };
        }
        let mut json =
            serde_json::to_string_pretty(&StoreFile { faults }).expect("faults serialize");
        json.push('\n');
        crate::actions::journal::write_atomic(&self.path, json.as_bytes(), 0o600)
            .map_err(self.err())
    }

    /// Record `fault` (before it is applied). A fault already recorded is not added
    /// twice.
    pub fn add(&self, fault: Fault, by: &str) -> Result<(), FaultError> {
        let mut all = self.load()?;
        if !all.iter().any(|r| r.fault == fault) {
            all.push(FaultRecord {
                fault,
                since: crate::actions::journal::now_unix(),
                by: by.to_string(),
            });
        }
        self.save(all)
    }

    /// Forget every record for which `gone` says the fault is undone.
    pub fn remove(&self, gone: impl Fn(&Fault) -> bool) -> Result<(), FaultError> {
        let all = self.load()?;
        self.save(all.into_iter().filter(|r| !gone(&r.fault)).collect())
    }
}

fn run(prog: &str, args: &[&str], stdin: Option<&str>) -> Result<String, FaultError> {
    use std::io::Write;
    let mut cmd = Command::new(prog);
    cmd.args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        });
    let mut child = cmd.spawn().map_err(|source| FaultError::Spawn {
        prog: prog.to_string(),
        source,
    })?;
    if let (Some(text), Some(mut input)) = (stdin, child.stdin.take()) {
        let _ = input.write_all(text.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|source| FaultError::Spawn {
            prog: prog.to_string(),
            source,
        })?;
    if !out.status.success() {
        return Err(FaultError::Command {
            cmd: format!("{prog} {}", args.join(" ")),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

// Partitions ---------------------------------------------------------------------

/// The lab's partition table (family bridge): its NAT table's name with `_faults`.
pub fn partition_table(plan: &LabPlan) -> String {
    format!("{}_faults", plan.network.nft_table)
}

/// The nft script that replaces the lab's partition table with one that drops
/// every IPv4 packet between two different groups, on the lab bridge (pure; the
/// addresses are the lab's own: labs never share a subnet, preflight sees to it). The
/// table is added, deleted and written again in one batch: atomic, and fine whether
/// or not it existed. ARP still passes, so the nodes see each other's addresses and
/// only their packets are lost, as with a broken switch path.
pub fn partition_script(table: &str, bridge: &str, lab: &str, groups: &[Vec<Ipv4Addr>]) -> String {
    let set = |g: &[Ipv4Addr]| {
        let ips: Vec<String> = g.iter().map(|ip| ip.to_string()).collect();
        format!("{{ {} }}", ips.join(", "))
    };
    let mut rules = String::new();
    for (i, a) in groups.iter().enumerate() {
        for (j, b) in groups.iter().enumerate() {
            if i == j || a.is_empty() || b.is_empty() {
                continue;
            }
            rules.push_str(&format!(
                "    ip saddr {} ip daddr {} counter drop comment \"kthw-lab:{lab} partition on {bridge}\"\n",
                set(a),
                set(b)
            ));
        }
    }
    format!(
        "add table bridge {table}\ndelete table bridge {table}\ntable bridge {table} {{\n  chain forward {{\n    type filter hook forward priority -200; policy accept;\n{rules}  }}\n}}\n"
    )
}

/// Drop traffic between the groups of `plan`'s nodes (node names).
pub fn apply_partition(plan: &LabPlan, groups: &[Vec<String>]) -> Result<(), FaultError> {
    let ips: Vec<Vec<Ipv4Addr>> = groups
        .iter()
        .map(|g| {
            g.iter()
                .filter_map(|n| plan.node(n).map(|p| p.ip))
                .collect()
        })
        .collect();
    let script = partition_script(
        &partition_table(plan),
        &plan.network.bridge,
        &plan.lab,
        &ips,
    );
    run("nft", &["-f", "-"], Some(&script)).map(|_| ())
}

/// Remove the lab's partition table; `true` when there was one.
pub fn heal(plan: &LabPlan) -> Result<bool, FaultError> {
    remove_partition_table(&partition_table(plan))
}

/// Whether the lab's partition table exists.
pub fn partition_in_force(plan: &LabPlan) -> Result<bool, FaultError> {
    partition_table_exists(&partition_table(plan))
}

/// Remove the bridge table `table`; `true` when there was one.
pub fn remove_partition_table(table: &str) -> Result<bool, FaultError> {
    let had = partition_table_exists(table)?;
    if had {
        run(
            "nft",
            &["-f", "-"],
            Some(&format!(
                "add table bridge {table}\ndelete table bridge {table}\n"
            )),
        )?;
    }
    Ok(had)
}

/// Whether the bridge table `table` exists.
pub fn partition_table_exists(table: &str) -> Result<bool, FaultError> {
    let out = run("nft", &["-j", "list", "tables", "bridge"], None)?;
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| FaultError::Command {
        cmd: "nft -j list tables bridge".into(),
        detail: format!("unreadable output: {e}"),
    })?;
    Ok(v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|o| o["table"]["name"].as_str() == Some(table)))
}

// Link delay ----------------------------------------------------------------------

/// `tc` arguments that put `ms` of delay (± `jitter_ms`, with `loss_percent` loss) on
/// everything the tap sends to the guest (pure). Its round trips with any peer grow
/// by `ms`.
pub fn netem_args(tap: &str, ms: u32, jitter_ms: u32, loss_percent: f64) -> Vec<String> {
    let mut a: Vec<String> = ["qdisc", "replace", "dev", tap, "root", "netem", "delay"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    a.push(format!("{ms}ms"));
    if jitter_ms > 0 {
        a.push(format!("{jitter_ms}ms"));
    }
    if loss_percent > 0.0 {
        a.push("loss".into());
        a.push(format!("{loss_percent}%"));
    }
    a
}

fn taps(hv: &dyn Hypervisor, plan: &LabPlan, node: &str) -> Result<Vec<String>, FaultError> {
    let n = plan.node(node).ok_or_else(|| FaultError::NoTap {
        node: node.to_string(),
    })?;
    if !matches!(
        hv.state(&n.domain)?,
        Some(DomainState::Running | DomainState::Paused)
    ) {
        return Ok(Vec::new());
    }
    Ok(hv.tap_devices(&n.domain)?)
}

pub fn apply_delay(
    hv: &dyn Hypervisor,
    plan: &LabPlan,
    node: &str,
    ms: u32,
    jitter_ms: u32,
    loss_percent: f64,
) -> Result<(), FaultError> {
    let taps = taps(hv, plan, node)?;
    if taps.is_empty() {
        return Err(FaultError::NoTap {
            node: node.to_string(),
        });
    }
    for tap in taps {
        delay_device(&tap, ms, jitter_ms, loss_percent)?;
    }
    Ok(())
}

/// Put netem on a device's egress: everything it sends waits `ms`.
pub fn delay_device(
    dev: &str,
    ms: u32,
    jitter_ms: u32,
    loss_percent: f64,
) -> Result<(), FaultError> {
    let args = netem_args(dev, ms, jitter_ms, loss_percent);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run("tc", &args, None).map(|_| ())
}

/// Remove a netem root qdisc from a device; `true` when there was one.
pub fn undelay_device(dev: &str) -> Result<bool, FaultError> {
    if !netem_on(dev)? {
        return Ok(false);
    }
    run("tc", &["qdisc", "del", "dev", dev, "root"], None)?;
    Ok(true)
}

/// Whether this kernel can delay packets with netem: `Some(false)` only when its
/// config says netem was not built (no module to load either); `None` when it
/// cannot tell (tc loads the module on first use).
pub fn netem_available() -> Option<bool> {
    if Path::new("/sys/module/sch_netem").exists() {
        return Some(true);
    }
    let out = Command::new("zcat").arg("/proc/config.gz").output().ok()?;
    if !out.status.success() {
        return None;
    }
    netem_in_config(&String::from_utf8_lossy(&out.stdout))
}

/// What a kernel config says of netem (pure).
pub fn netem_in_config(config: &str) -> Option<bool> {
    for line in config.lines() {
        if line == "CONFIG_NET_SCH_NETEM=y" || line == "CONFIG_NET_SCH_NETEM=m" {
            return Some(true);
        }
        if line == "# CONFIG_NET_SCH_NETEM is not set" {
            return Some(false);
        }
    }
    None
}

/// Whether a netem qdisc is the root qdisc of `tap`.
pub fn netem_on(tap: &str) -> Result<bool, FaultError> {
    let out = run("tc", &["-j", "qdisc", "show", "dev", tap], None)?;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .any(|q| q["kind"] == "netem" && q["root"] == true))
}

/// Remove the delay on the node's taps; `true` when there was one.
pub fn clear_delay(hv: &dyn Hypervisor, plan: &LabPlan, node: &str) -> Result<bool, FaultError> {
    let mut had = false;
    for tap in taps(hv, plan, node)? {
        had |= undelay_device(&tap)?;
    }
    Ok(had)
}

// Units ----------------------------------------------------------------------------

/// The shell command that SIGKILLs a unit's processes; with `hold`, systemd's
/// restart is cancelled too, so the unit stays down until started again.
pub fn kill_unit_command(unit: &str, hold: bool) -> String {
    let u = crate::remote::sh_quote(unit);
    if hold {
        format!("systemctl kill --signal=SIGKILL {u}; systemctl stop {u}")
    } else {
        format!("systemctl kill --signal=SIGKILL {u}")
    }
}

pub fn unit_command(verb: &str, unit: &str) -> String {
    format!("systemctl {verb} {}", crate::remote::sh_quote(unit))
}

// The balancer ---------------------------------------------------------------------

/// The backend address of a controller in the balancer's config: `IP:PORT` of its
/// apiserver.
pub fn backend_of(plan: &LabPlan, node: &str) -> Option<String> {
    let ip = plan.node(node)?.ip.to_string();
    plan.load_balancer
        .backends
        .iter()
        .find(|b| b.split(':').next() == Some(ip.as_str()))
        .cloned()
}

pub fn set_backend(plan: &LabPlan, node: &str, enabled: bool) -> Result<(), FaultError> {
    let addr = backend_of(plan, node)
        .ok_or_else(|| FaultError::Balancer(format!("`{node}` is no backend of the balancer")))?;
    let files = crate::lb::LbFiles::of(plan);
    crate::lb::set_backend(&files.socket, &addr, enabled)
        .map_err(|e| FaultError::Balancer(e.to_string()))
}

// Finding and undoing what is in force ------------------------------------------------

/// Every fault in force on the lab now: the records, and what the markers show
/// without a record (a partition table, a netem qdisc, a paused domain).
pub fn observe(plan: &LabPlan, hv: Option<&dyn Hypervisor>) -> Vec<String> {
    let mut out: Vec<String> = FaultStore::of(plan)
        .load()
        .unwrap_or_default()
        .iter()
        .map(|r| format!("{} (by {})", r.fault.describe(), r.by))
        .collect();
    if partition_in_force(plan).unwrap_or(false) && !out.iter().any(|s| s.starts_with("partition"))
    {
        out.push(format!(
            "partition table {} on {}",
            partition_table(plan),
            plan.network.bridge
        ));
    }
    if let Some(hv) = hv {
        for n in &plan.nodes {
            let state = hv.state(&n.domain).ok().flatten();
            if state == Some(DomainState::Paused)
                && !out
                    .iter()
                    .any(|s| s.starts_with(&format!("{} paused", n.name)))
            {
                out.push(format!("{} paused", n.name));
            }
            if state == Some(DomainState::Running) {
                for tap in hv.tap_devices(&n.domain).unwrap_or_default() {
                    if netem_on(&tap).unwrap_or(false)
                        && !out
                            .iter()
                            .any(|s| s.starts_with("delay") && s.contains(&n.name))
                    {
                        out.push(format!("delay on {} (netem on {tap})", n.name));
                    }
                }
            }
        }
    }
    out
}

/// What [`clear`] did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct ClearReport {
    pub undone: Vec<String>,
    pub failed: Vec<String>,
}

impl ClearReport {
    pub fn is_empty(&self) -> bool {
        self.undone.is_empty() && self.failed.is_empty()
    }
}

/// Undo every fault in force on the lab: the host-side ones first ([`clear_host_side`]),
/// then the VMs (paused ones resumed, crashed ones started), and the units last (a
/// started node needs time before SSH answers: up to `ssh_wait`). A fault that
/// cannot be undone stays recorded and is reported.
pub fn clear(
    plan: &LabPlan,
    hv: &dyn Hypervisor,
    remote: Option<&dyn Remote>,
    ssh_wait: Duration,
) -> ClearReport {
    let mut rep = clear_host_side(plan, hv);
    let store = FaultStore::of(plan);
    let records = store.load().unwrap_or_default();
    let done = |f: &Fault, rep: &mut ClearReport, r: Result<(), FaultError>| match r {
        Ok(()) => {
            rep.undone.push(f.describe());
            let f = f.clone();
            let _ = store.remove(|x| *x == f);
        }
        Err(e) => rep.failed.push(format!("{}: {e}", f.describe())),
    };
    for r in &records {
        let f = &r.fault;
        let node = match f {
            Fault::Paused { node } | Fault::Crashed { node } => node,
            _ => continue,
        };
        let res = match plan.node(node) {
            None => Ok(()),
            Some(n) if matches!(f, Fault::Paused { .. }) => {
                hv.resume(&n.domain).map_err(FaultError::from)
            }
            Some(n) => hv.start(&n.domain).map_err(FaultError::from),
        };
        done(f, &mut rep, res);
    }
    for r in &records {
        let Fault::UnitDown { node, unit } = &r.fault else {
            continue;
        };
        let Some(remote) = remote else {
            rep.failed
                .push(format!("{}: no SSH to the node", r.fault.describe()));
            continue;
        };
        let t0 = std::time::Instant::now();
        let res = loop {
            match remote.run(node, &unit_command("start", unit), Duration::from_secs(60)) {
                Ok(_) => break Ok(()),
                Err(e) if t0.elapsed() >= ssh_wait => break Err(FaultError::from(e)),
                Err(_) => std::thread::sleep(Duration::from_millis(500)),
            }
        };
        done(&r.fault, &mut rep, res);
    }
    rep
}

/// Undo the faults that live on the host: the partition and every delay (found by
/// their markers, recorded or not) and backends taken out of the balancer.
pub fn clear_host_side(plan: &LabPlan, hv: &dyn Hypervisor) -> ClearReport {
    let store = FaultStore::of(plan);
    let records = store.load().unwrap_or_default();
    let mut rep = ClearReport::default();
    match heal(plan) {
        Ok(true) => rep
            .undone
            .push(format!("partition (table {})", partition_table(plan))),
        Ok(false) => {}
        Err(e) => rep.failed.push(format!("partition: {e}")),
    }
    if !partition_in_force(plan).unwrap_or(true) {
        let _ = store.remove(|x| matches!(x, Fault::Partition { .. }));
    }
    let mut delays_left = false;
    for n in &plan.nodes {
        match clear_delay(hv, plan, &n.name) {
            Ok(true) => rep.undone.push(format!("delay on {}", n.name)),
            Ok(false) => {}
            Err(e) => {
                delays_left = true;
                rep.failed.push(format!("delay on {}: {e}", n.name))
            }
        }
    }
    if !delays_left {
        let _ = store.remove(|x| matches!(x, Fault::Delay { .. }));
    }
    for r in &records {
        let Fault::BackendDisabled { node } = &r.fault else {
            continue;
        };
        let res = match set_backend(plan, node, true) {
            // A balancer that is not running has every backend enabled when it
            // starts again.
            Err(FaultError::Balancer(_))
                if !crate::lb::is_running(&crate::lb::LbFiles::of(plan).pid) =>
            {
                Ok(())
            }
            r => r,
        };
        match res {
            Ok(()) => {
                rep.undone.push(r.fault.describe());
                let f = r.fault.clone();
                let _ = store.remove(|x| *x == f);
            }
            Err(e) => rep.failed.push(format!("{}: {e}", r.fault.describe())),
        }
    }
    rep
}

/// Forget the records of faults on the guests (paused, crashed, units down): what a
/// checkpoint restore makes moot, since every node goes back to its saved state.
pub fn forget_guest_side(plan: &LabPlan) -> Result<(), FaultError> {
    FaultStore::of(plan).remove(|f| {
        matches!(
            f,
            Fault::Paused { .. } | Fault::Crashed { .. } | Fault::UnitDown { .. }
        )
    })
}
