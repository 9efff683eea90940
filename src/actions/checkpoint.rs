//! Checkpoints: the whole lab saved at one instant and put back in seconds, so an
//! experiment starts from the same state every time.
//!
//! A save pauses every node, takes an internal snapshot of each (memory, devices and
//! its qcow2 overlay, inside the overlay) while all of them are paused, then resumes
//! them all: no node runs, and nothing is written, between one node's save and the
//! next, so the etcd members are saved at the same instant. The checkpoint's record
//! (`checkpoints/NAME.json`) keeps the journal (which phases were done), the
//! balancer's config and what each node's snapshot is.
//!
//! A restore converges the host side first (bridge, NAT, host routes, balancer, as
//! the saved journal says they were), puts every node back paused, in parallel, and
//! resumes them together; then it sets the guests' clocks to the host's (a node
//! wakes with the clock of the moment it was saved), which is also a real SSH login
//! on each. The journal becomes the saved one.
//!
//! Ownership: `kthw-fresh` is `reset`'s; checkpoints are `kthw-cp-NAME` and the
//! user's. `destroy` removes them all with the overlays.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::phases::{connect_hypervisor, node_step, on_every_node, provision, PhaseOptions};
use super::{Journal, Phase, Progress, RunCtx};
use crate::error::{Error, Result};
use crate::host::libvirt::{DomainState, Hypervisor};
use crate::plan::LabPlan;

/// Version of the checkpoint record's shape.
pub const FORMAT: u32 = 1;

/// The libvirt snapshot name of checkpoint `name`.
pub fn snapshot_name(name: &str) -> String {
    format!("kthw-cp-{name}")
}

/// One node's part of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeCheckpoint {
    pub node: String,
    pub domain: String,
    pub snapshot: String,
    /// The domain definition's digest at save time: a snapshot of another
    /// definition is never reverted to.
    pub digest: String,
    /// Bytes the save added to the node's overlay (memory state and metadata).
    pub disk_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Checkpoint {
    pub format: u32,
    pub name: String,
    pub lab: String,
    /// Unix seconds.
    pub created: u64,
    /// The plan the lab had (a checkpoint of another plan is refused).
    pub plan_sha256: String,
    /// The journal at save time: which phases were done.
    pub journal: Journal,
    /// The balancer's config at save time, when the lab had one.
    pub lb_config: Option<serde_json::Value>,
    pub nodes: Vec<NodeCheckpoint>,
    /// How long the nodes were paused for the save.
    pub paused_s: f64,
}

impl Checkpoint {
    pub fn disk_bytes(&self) -> u64 {
        self.nodes.iter().map(|n| n.disk_bytes).sum()
    }

    /// The last phase done at save time.
    pub fn phase(&self) -> Option<Phase> {
        self.journal
            .phases
            .iter()
            .filter(|r| r.state == super::PhaseState::Done)
            .map(|r| r.phase)
            .max()
    }
}

fn dir(plan: &LabPlan) -> PathBuf {
    plan.paths.root.join("checkpoints")
}

pub fn record_path(plan: &LabPlan, name: &str) -> PathBuf {
    dir(plan).join(format!("{name}.json"))
}

fn usage(what: String, hint: &str) -> Error {
    Error::Usage {
        what,
        hint: hint.into(),
    }
}

/// A checkpoint name: lowercase letters, digits and dashes, up to 40.
pub fn check_name(name: &str) -> Result<()> {
    if crate::scenario::validate::is_label(name, 40) {
        Ok(())
    } else {
        Err(usage(
            format!("`{name}` is not a checkpoint name"),
            "use lowercase letters, digits and dashes (up to 40), e.g. `etcd-ready`",
        ))
    }
}

pub fn load(plan: &LabPlan, name: &str) -> Result<Checkpoint> {
    check_name(name)?;
    let p = record_path(plan, name);
    let bytes = match std::fs::read(&p) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let names: Vec<String> = list(plan)?.into_iter().map(|c| c.name).collect();
            return Err(Error::Other {
                what: format!("lab `{}` has no checkpoint `{name}`", plan.lab),
                hint: Some(if names.is_empty() {
                    format!(
                        "save one with `kthw-lab checkpoint save {} {name}`",
                        plan.lab
                    )
                } else {
                    format!("its checkpoints: {}", names.join(", "))
                }),
                source: None,
            });
        }
        Err(e) => {
            return Err(Error::with_source(
                format!("cannot read {}", p.display()),
                e,
            ))
        }
    };
    serde_json::from_slice(&bytes)
        .map_err(|e| Error::with_source(format!("{} is not a checkpoint record", p.display()), e))
}

/// Every checkpoint record of the lab, oldest first.
pub fn list(plan: &LabPlan) -> Result<Vec<Checkpoint>> {
    let d = dir(plan);
    let rd = match std::fs::read_dir(&d) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(Error::with_source(
                format!("cannot read {}", d.display()),
                e,
            ))
        }
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let p = e.path();
        if p.extension().and_then(|x| x.to_str()) != Some("json") {
            continue;
        }
        if let Ok(c) = std::fs::read(&p)
            .map_err(|_| ())
            .and_then(|b| serde_json::from_slice::<Checkpoint>(&b).map_err(|_| ()))
        {
            out.push(c);
        }
    }
    out.sort_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));
    Ok(out)
}

fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

fn hv_error(what: String) -> impl FnOnce(crate::host::libvirt::HypervisorError) -> Error {
    move |e| provision(what, e.hint(), e)
}

/// Refuse to save or restore while an experiment's fault is in force: a snapshot
/// would carry it (a paused node) or outlive it (a partition is not in a snapshot).
fn no_faults(plan: &LabPlan, hv: &dyn Hypervisor) -> Result<()> {
    let faults = crate::faults::observe(plan, Some(hv));
    if faults.is_empty() {
        return Ok(());
    }
    Err(Error::Other {
        what: format!(
            "lab `{}` has faults in force: {}",
            plan.lab,
            faults.join("; ")
        ),
        hint: Some(format!(
            "`kthw-lab experiment clean {}` undoes them",
            plan.lab
        )),
        source: None,
    })
}

/// Save the lab as checkpoint `name`.
pub fn save(
    plan: &LabPlan,
    plan_sha256: &str,
    connect: &str,
    name: &str,
    progress: &Progress,
) -> Result<Checkpoint> {
    check_name(name)?;
    let rec = record_path(plan, name);
    if rec.exists() {
        return Err(usage(
            format!("lab `{}` has a checkpoint `{name}` already", plan.lab),
            "delete it first (`kthw-lab checkpoint delete LAB NAME`) or choose another name",
        ));
    }
    let journal = Journal::read(&plan.paths.journal).filter(|j| j.is_done(Phase::WaitSsh));
    let Some(journal) = journal else {
        return Err(Error::Other {
            what: format!("lab `{}` has no booted nodes to save", plan.lab),
            hint: Some("create it first, at least `--until wait-ssh`".into()),
            source: None,
        });
    };
    let hv = connect_hypervisor(connect)?;
    no_faults(plan, &hv)?;
    let domains = hv
        .list_lab_domains(&plan.lab)
        .map_err(hv_error(format!("domains of lab `{}`", plan.lab)))?;
    let mut nodes = Vec::new();
    for n in &plan.nodes {
        let d = domains.iter().find(|d| d.name == n.domain);
        match d {
            Some(d) if d.state == DomainState::Running => nodes.push(NodeCheckpoint {
                node: n.name.clone(),
                domain: n.domain.clone(),
                snapshot: snapshot_name(name),
                digest: d.marker.digest.clone(),
                disk_bytes: 0,
            }),
            other => {
                return Err(Error::Other {
                    what: format!(
                        "node `{}` is not running ({})",
                        n.name,
                        match other {
                            Some(d) => format!("{:?}", d.state).to_lowercase(),
                            None => "no domain".into(),
                        }
                    ),
                    hint: Some(format!(
                        "a checkpoint saves running nodes: `kthw-lab start {}` first",
                        plan.lab
                    )),
                    source: None,
                })
            }
        }
    }
    let lb_config = std::fs::read(crate::lb::LbFiles::of(plan).config)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let before: Vec<u64> = plan.nodes.iter().map(|n| allocated(&n.disk_path)).collect();
    // A save killed in the middle leaves paused nodes: recorded first, so the next
    // command that looks resumes them.
    let store = crate::faults::FaultStore::of(plan);
    let by = format!("checkpoint save {name}");
    for n in &plan.nodes {
        store
            .add(
                crate::faults::Fault::Paused {
                    node: n.name.clone(),
                },
                &by,
            )
            .map_err(|e| Error::with_source("cannot record the pause", e))?;
    }
    let t_pause = Instant::now();
    let paused = on_every_node(
        &plan.nodes,
        |n| n.name.as_str(),
        progress,
        "pausing",
        |n, line| {
            node_step(
                line,
                hv.suspend(&n.domain),
                "paused, saving memory and disk",
                false,
                || format!("cannot pause {}", n.domain),
            )
        },
    );
    let saved: Vec<Result<()>> = if paused.iter().all(|r| r.is_ok()) {
        std::thread::scope(|s| {
            let hs: Vec<_> = plan
                .nodes
                .iter()
                .map(|n| {
                    let hv = &hv;
                    s.spawn(move || {
                        hv.take_snapshot(
                            &n.domain,
                            &snapshot_name(name),
                            &format!("kthw-lab checkpoint `{name}` of lab `{}`", plan.lab),
                        )
                        .map_err(hv_error(format!("cannot save {}", n.domain)))
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().expect("snapshot thread"))
                .collect()
        })
    } else {
        Vec::new()
    };
    let failed = paused.iter().chain(saved.iter()).any(|r| r.is_err()) || saved.is_empty();
    if failed {
        for n in &plan.nodes {
            let _ = hv.delete_snapshot(&n.domain, &snapshot_name(name));
        }
    }
    // Resume every node, whatever happened above.
    let resumed = on_every_node(
        &plan.nodes,
        |n| n.name.as_str(),
        progress,
        "resuming",
        |n, line| {
            node_step(
                line,
                hv.resume(&n.domain),
                if failed { "resumed" } else { "saved, running" },
                true,
                || format!("cannot resume {}", n.domain),
            )
        },
    );
    let paused_s = t_pause.elapsed().as_secs_f64();
    if resumed.iter().all(|r| r.is_ok()) {
        let _ = store.remove(|f| matches!(f, crate::faults::Fault::Paused { .. }));
    }
    for r in paused.into_iter().chain(saved).chain(resumed) {
        r?;
    }
    for (i, n) in plan.nodes.iter().enumerate() {
        nodes[i].disk_bytes = allocated(&n.disk_path).saturating_sub(before[i]);
    }
    let cp = Checkpoint {
        format: FORMAT,
        name: name.to_string(),
        lab: plan.lab.clone(),
        created: super::journal::now_unix(),
        plan_sha256: plan_sha256.to_string(),
        journal,
        lb_config,
        nodes,
        paused_s,
    };
    let mut json = serde_json::to_string_pretty(&cp).expect("checkpoint serializes");
    json.push('\n');
    super::journal::write_atomic(&rec, json.as_bytes(), 0o600)
        .map_err(|e| Error::with_source(format!("cannot write {}", rec.display()), e))?;
    Ok(cp)
}

/// Why a checkpoint cannot be restored now, `None` when it can.
pub fn problem(cp: &Checkpoint, plan_sha256: &str, hv: &dyn Hypervisor) -> Option<String> {
    if cp.plan_sha256 != plan_sha256 {
        return Some("saved for another plan of this lab".into());
    }
    let domains = match hv.list_lab_domains(&cp.lab) {
        Ok(d) => d,
        Err(e) => return Some(e.to_string()),
    };
    for n in &cp.nodes {
        let Some(d) = domains.iter().find(|d| d.name == n.domain) else {
            return Some(format!("node `{}` has no domain", n.node));
        };
        match hv.snapshot(&n.domain, &n.snapshot) {
            Ok(Some(_)) => {}
            Ok(None) => {
                return Some(format!(
                    "node `{}` has lost its snapshot (its disk was made anew)",
                    n.node
                ))
            }
            Err(e) => return Some(e.to_string()),
        }
        if d.marker.digest != n.digest {
            return Some(format!(
                "the domain of `{}` was redefined since the save",
                n.node
            ));
        }
    }
    None
}

/// Timings of a restore, per step.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    pub checkpoint: String,
    pub faults_cleared: Vec<String>,
    pub host_s: f64,
    pub revert_s: f64,
    pub clocks_s: f64,
    pub total_s: f64,
}

/// Put the lab back to checkpoint `name`.
pub fn restore(
    plan: &LabPlan,
    plan_sha256: &str,
    opts: &PhaseOptions,
    name: &str,
    progress: &Progress,
) -> Result<RestoreReport> {
    let t0 = Instant::now();
    let cp = load(plan, name)?;
    let hv = connect_hypervisor(&opts.connect)?;
    if let Some(why) = problem(&cp, plan_sha256, &hv) {
        return Err(Error::Other {
            what: format!("checkpoint `{name}` cannot be restored: {why}"),
            hint: Some(format!(
                "`kthw-lab checkpoint list {}` shows which checkpoints are usable",
                plan.lab
            )),
            source: None,
        });
    }
    // Faults of an earlier experiment on the host go first (they are not part of
    // the saved state); the ones on the guests go with the revert.
    let cleared = crate::faults::clear_host_side(plan, &hv);
    if !cleared.failed.is_empty() {
        return Err(Error::Other {
            what: format!(
                "faults in force could not be undone: {}",
                cleared.failed.join("; ")
            ),
            hint: Some(format!(
                "`kthw-lab status {}` shows them; `kthw-lab experiment clean {}` tries again",
                plan.lab, plan.lab
            )),
            source: None,
        });
    }
    for u in &cleared.undone {
        progress.println(&format!("    undone: {u}"));
    }
    // The host side, as the saved journal says it was built (the balancer's config
    // comes from the plan, which is the one the checkpoint was saved with).
    let cx = RunCtx::new(plan, progress.clone(), super::Cancel::new());
    super::phases::ensure_host_side(&cx, opts, &cp.journal)?;
    let host_s = t0.elapsed().as_secs_f64();
    // Every node back, paused; then all resumed at once.
    let t1 = Instant::now();
    let reverted = on_every_node(
        &cp.nodes,
        |n| n.node.as_str(),
        progress,
        "going back to the checkpoint",
        |n, line| {
            node_step(
                line,
                hv.revert_snapshot(&n.domain, &n.snapshot, true),
                "back, paused",
                false,
                || format!("cannot revert {}", n.domain),
            )
        },
    );
    let resumed = on_every_node(
        &cp.nodes,
        |n| n.node.as_str(),
        progress,
        "resuming",
        |n, line| {
            node_step(line, hv.resume(&n.domain), "running", true, || {
                format!("cannot resume {}", n.domain)
            })
        },
    );
    for r in reverted.into_iter().chain(resumed) {
        r?;
    }
    let _ = crate::faults::forget_guest_side(plan);
    let revert_s = t1.elapsed().as_secs_f64();
    let t2 = Instant::now();
    let line = progress.line("clocks", "setting the guests' clocks over SSH");
    match super::phases::sync_clocks(plan) {
        Ok(()) => line.done("set; every node answers SSH"),
        Err(e) => {
            line.fail(&e.to_string());
            return Err(e);
        }
    }
    let clocks_s = t2.elapsed().as_secs_f64();
    let mut journal = cp.journal.clone();
    journal.plan_sha256 = plan_sha256.to_string();
    journal
        .save_to(&plan.paths.journal)
        .map_err(|e| Error::with_source("cannot write the journal", e))?;
    Ok(RestoreReport {
        checkpoint: name.to_string(),
        faults_cleared: cleared.undone,
        host_s,
        revert_s,
        clocks_s,
        total_s: t0.elapsed().as_secs_f64(),
    })
}

/// Delete checkpoint `name`: its snapshot on every node, then its record.
pub fn delete(plan: &LabPlan, connect: &str, name: &str) -> Result<Vec<String>> {
    let cp = load(plan, name)?;
    let hv = connect_hypervisor(connect)?;
    let mut removed = Vec::new();
    for n in &cp.nodes {
        if hv
            .delete_snapshot(&n.domain, &n.snapshot)
            .map_err(hv_error(format!(
                "cannot delete the snapshot of {}",
                n.domain
            )))?
        {
            removed.push(n.node.clone());
        }
    }
    let p = record_path(plan, name);
    std::fs::remove_file(&p)
        .map_err(|e| Error::with_source(format!("cannot remove {}", p.display()), e))?;
    Ok(removed)
}

/// One row of `checkpoint list`.
#[derive(Debug, Clone, Serialize)]
pub struct ListRow {
    pub name: String,
    pub created: u64,
    pub phase: Option<Phase>,
    pub nodes: usize,
    pub disk_bytes: u64,
    pub paused_s: f64,
    /// `None` when it can be restored; else why not.
    pub problem: Option<String>,
}

pub fn rows(plan: &LabPlan, plan_sha256: &str, connect: &str) -> Result<Vec<ListRow>> {
    let cps = list(plan)?;
    let hv = if cps.is_empty() {
        None
    } else {
        Some(connect_hypervisor(connect)?)
    };
    Ok(cps
        .iter()
        .map(|c| ListRow {
            name: c.name.clone(),
            created: c.created,
            phase: c.phase(),
            nodes: c.nodes.len(),
            disk_bytes: c.disk_bytes(),
            paused_s: c.paused_s,
            problem: hv.as_ref().and_then(|hv| problem(c, plan_sha256, hv)),
        })
        .collect())
}

/// `YYYY-MM-DD HH:MM:SS` UTC of unix seconds (pure).
pub fn utc(secs: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .map(|t| {
            format!(
                "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
                t.year(),
                t.month() as u8,
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            )
        })
        .unwrap_or_else(|_| secs.to_string())
}

pub fn render_rows(rows: &[ListRow]) -> String {
    if rows.is_empty() {
        return "no checkpoints\n".into();
    }
    let mut t = vec![vec![
        "NAME".to_string(),
        "CREATED (UTC)".into(),
        "PHASE".into(),
        "NODES".into(),
        "DISK".into(),
        "PAUSED".into(),
        "STATE".into(),
    ]];
    for r in rows {
        t.push(vec![
            r.name.clone(),
            utc(r.created),
            r.phase.map(|p| p.name().to_string()).unwrap_or("-".into()),
            r.nodes.to_string(),
            format!("{:.0} MiB", r.disk_bytes as f64 / (1024.0 * 1024.0)),
            format!("{:.1} s", r.paused_s),
            r.problem.clone().unwrap_or_else(|| "ok".into()),
        ]);
    }
    crate::plan::rows_to_text(&t)
}
