//! Running an experiment: check the lab against `requires`, undo what an earlier
//! run left in force, go back to the checkpoint, start the probes, run the steps on
//! their schedule, stop, undo every fault still in force, read the register back,
//! check the history, and write the report.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::etcd::Etcd;
use super::history::{self, Op, OpKind, Outcome};
use super::model::{Action, Experiment, ProbeKind, Selector, When};
use super::probes::{self, Sampler};
use super::report::{self, Event, Report, StepReport};
use crate::actions::phases::{connect_hypervisor, lab_remote, PhaseOptions};
use crate::actions::{Cancel, Journal, Phase, Progress};
use crate::error::{Error, Result};
use crate::faults::{self, Fault, FaultStore};
use crate::host::libvirt::{DomainState, Hypervisor, Libvirt};
use crate::plan::LabPlan;
use crate::remote::{Remote, SshRemote};

/// What the run needs besides the experiment.
pub struct RunInput<'a> {
    pub plan: &'a LabPlan,
    pub plan_sha256: &'a str,
    pub opts: &'a PhaseOptions,
    pub file_label: &'a str,
    pub file_text: &'a str,
    pub progress: Progress,
    pub cancel: Cancel,
}

fn not_ready(what: String, hint: String) -> Error {
    Error::Other {
        what,
        hint: Some(hint),
        source: None,
    }
}

/// Check the lab against the experiment before anything is touched (pure but for
/// the journal): the phase, the node counts, the nodes the file names.
pub fn check_requires(exp: &Experiment, plan: &LabPlan, journal: Option<&Journal>) -> Result<()> {
    let controllers = plan.controllers().count() as u32;
    let workers = plan.workers().count() as u32;
    let r = &exp.requires;
    let mut problems = Vec::new();
    if controllers < r.controllers {
        problems.push(format!(
            "it needs {} controller(s); lab `{}` has {controllers}",
            r.controllers, plan.lab
        ));
    }
    if workers < r.workers {
        problems.push(format!(
            "it needs {} worker(s); lab `{}` has {workers}",
            r.workers, plan.lab
        ));
    }
    let done = |p: Phase| journal.is_some_and(|j| j.is_done(p));
    if !done(r.phase) {
        problems.push(format!(
            "it needs phase `{}` done; lab `{}` {}",
            r.phase,
            plan.lab,
            match journal.and_then(|j| {
                j.phases
                    .iter()
                    .filter(|p| p.state == crate::actions::PhaseState::Done)
                    .map(|p| p.phase)
                    .max()
            }) {
                Some(p) => format!("is done up to `{p}`"),
                None => "was never created".to_string(),
            }
        ));
    }
    let lb_needed = exp.probes.iter().any(|p| p.kind == ProbeKind::LbBackends)
        || exp
            .steps
            .iter()
            .any(|s| matches!(s.action, Action::LbBackend { .. }));
    if lb_needed && !done(Phase::Lb) {
        problems.push("its balancer probes and steps need phase `lb` done".to_string());
    }
    let delays = exp
        .steps
        .iter()
        .any(|s| matches!(s.action, Action::Delay { .. }));
    if delays && faults::netem_available() == Some(false) {
        problems.push(
            "its delay steps need the netem qdisc, and this kernel was built without it (CONFIG_NET_SCH_NETEM)"
                .to_string(),
        );
    }
    let mut sels: Vec<&Selector> = exp
        .steps
        .iter()
        .flat_map(|s| s.action.selectors())
        .collect();
    for p in &exp.probes {
        if let ProbeKind::Tcp { node, .. } | ProbeKind::Ping { node } = &p.kind {
            sels.push(node);
        }
    }
    for s in sels {
        match s {
            Selector::Name(n) if plan.node(n).is_none() => {
                problems.push(format!("lab `{}` has no node `{n}`", plan.lab))
            }
            Selector::Controller(i) if *i >= controllers => problems.push(format!(
                "`controller:{i}` needs {} controllers; lab `{}` has {controllers}",
                i + 1,
                plan.lab
            )),
            Selector::Worker(i) if *i >= workers => problems.push(format!(
                "`worker:{i}` needs {} workers; lab `{}` has {workers}",
                i + 1,
                plan.lab
            )),
            _ => {}
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    Err(not_ready(
        format!(
            "experiment `{}` cannot run on lab `{}`: {}",
            exp.name,
            plan.lab,
            problems.join("; ")
        ),
        format!(
            "run it on a lab that has what `requires` says, or bring this one there (`kthw-lab create SCENARIO --until {}`); nothing was changed",
            r.phase
        ),
    ))
}

/// What the steps share while they run.
struct Ctx<'a> {
    plan: &'a LabPlan,
    plan_sha256: &'a str,
    opts: &'a PhaseOptions,
    hv: &'a Libvirt,
    remote: &'a SshRemote,
    etcd: Option<&'a Etcd>,
    store: FaultStore,
    by: String,
    /// Step id to the nodes it acted on.
    resolved: BTreeMap<String, Vec<String>>,
    progress: Progress,
}

impl Ctx<'_> {
    fn resolve(&self, sel: &Selector) -> std::result::Result<Vec<String>, String> {
        let plan = self.plan;
        let nth =
            |mut it: Box<dyn Iterator<Item = &crate::plan::NodePlan> + '_>, i: u32, what: &str| {
                it.nth(i as usize)
                    .map(|n| vec![n.name.clone()])
                    .ok_or_else(|| format!("the lab has no {what} {i}"))
            };
        match sel {
            Selector::Name(n) => plan
                .node(n)
                .map(|n| vec![n.name.clone()])
                .ok_or_else(|| format!("no node `{n}`")),
            Selector::Controller(i) => nth(Box::new(plan.controllers()), *i, "controller"),
            Selector::Worker(i) => nth(Box::new(plan.workers()), *i, "worker"),
            Selector::Step(id) => self
                .resolved
                .get(id)
                .cloned()
                .ok_or_else(|| format!("step `{id}` has not run")),
            Selector::Others => Ok(Vec::new()),
            Selector::LeaseHolder(lease) => {
                let api = crate::kube::ApiClient::for_lab(plan).map_err(|e| e.to_string())?;
                match api
                    .lease_holder(lease, Duration::from_secs(5))
                    .map_err(|e| e.to_string())?
                {
                    Some(h) if plan.node(&h).is_some() => Ok(vec![h]),
                    Some(h) => Err(format!(
                        "lease {lease} is held by `{h}`, no node of this lab"
                    )),
                    None => Err(format!("nobody holds lease {lease}")),
                }
            }
            Selector::EtcdLeader | Selector::EtcdFollower => {
                let etcd = self.etcd.ok_or("the lab has no etcd to ask")?;
                // The leader may be unknown for a moment (an election): ask again.
                let t0 = Instant::now();
                let leader = loop {
                    match etcd.leader(Duration::from_secs(2)) {
                        Ok((Some(l), _)) => break l,
                        Ok((None, d)) if t0.elapsed() > Duration::from_secs(10) => {
                            return Err(format!("etcd has no leader ({d})"))
                        }
                        Err(e) if t0.elapsed() > Duration::from_secs(10) => {
                            return Err(format!("cannot ask etcd who leads: {e}"))
                        }
                        _ => std::thread::sleep(Duration::from_millis(300)),
                    }
                };
                if *sel == Selector::EtcdLeader {
                    return Ok(vec![leader]);
                }
                plan.controllers()
                    .find(|n| n.name != leader)
                    .map(|n| vec![n.name.clone()])
                    .ok_or_else(|| "etcd has no follower (one member)".to_string())
            }
        }
    }

    fn one(&self, sel: &Selector) -> std::result::Result<String, String> {
        let v = self.resolve(sel)?;
        match v.as_slice() {
            [n] => Ok(n.clone()),
            _ => Err(format!("`{sel}` means {} nodes here, not one", v.len())),
        }
    }

    fn domain(&self, node: &str) -> std::result::Result<String, String> {
        self.plan
            .node(node)
            .map(|n| n.domain.clone())
            .ok_or_else(|| format!("no node `{node}`"))
    }

    fn record(&self, f: Fault) -> std::result::Result<(), String> {
        self.store.add(f, &self.by).map_err(|e| e.to_string())
    }

    fn forget(&self, f: impl Fn(&Fault) -> bool) {
        let _ = self.store.remove(f);
    }

    /// A libvirt action on one node's domain. A fault it `puts` in force is recorded
    /// before; the record of a fault it `undoes` goes after.
    fn vm(
        &self,
        node: &Selector,
        op: fn(
            &dyn Hypervisor,
            &str,
        ) -> std::result::Result<(), crate::host::libvirt::HypervisorError>,
        puts: Option<fn(String) -> Fault>,
        undoes: Option<fn(&Fault, &str) -> bool>,
    ) -> std::result::Result<(Vec<String>, Option<String>), String> {
        let n = self.one(node)?;
        if let Some(f) = puts {
            self.record(f(n.clone()))?;
        }
        op(self.hv, &self.domain(&n)?).map_err(|e| e.to_string())?;
        if let Some(gone) = undoes {
            let nn = n.clone();
            self.forget(move |f| gone(f, &nn));
        }
        Ok((vec![n], None))
    }

    fn ssh(&self, node: &str, cmd: &str) -> std::result::Result<String, String> {
        self.remote
            .run(node, cmd, Duration::from_secs(90))
            .map(|o| o.stdout.trim().to_string())
            .map_err(|e| e.to_string())
    }

    /// Run one action; the nodes it acted on and a detail line.
    fn act(
        &mut self,
        action: &Action,
        rewinds: &mut Vec<(f64, f64)>,
        t0: Instant,
    ) -> std::result::Result<(Vec<String>, Option<String>), String> {
        let hv: &dyn Hypervisor = self.hv;
        match action {
            Action::KillUnit {
                node,
                unit,
                keep_down,
            } => {
                let n = self.one(node)?;
                if *keep_down {
                    self.record(Fault::UnitDown {
                        node: n.clone(),
                        unit: unit.clone(),
                    })?;
                }
                self.ssh(&n, &faults::kill_unit_command(unit, *keep_down))?;
                Ok((vec![n], None))
            }
            Action::StopUnit { node, unit } => {
                let n = self.one(node)?;
                self.record(Fault::UnitDown {
                    node: n.clone(),
                    unit: unit.clone(),
                })?;
                self.ssh(&n, &faults::unit_command("stop", unit))?;
                Ok((vec![n], None))
            }
            Action::StartUnit { node, unit } => {
                let n = self.one(node)?;
                self.ssh(&n, &faults::unit_command("start", unit))?;
                let (nn, uu) = (n.clone(), unit.clone());
                self.forget(move |f| matches!(f, Fault::UnitDown { node, unit } if *node == nn && *unit == uu));
                Ok((vec![n], None))
            }
            Action::CrashNode { node } => self.vm(
                node,
                |h, d| h.power_off(d),
                Some(|n| Fault::Crashed { node: n }),
                None,
            ),
            Action::StartNode { node } => self.vm(
                node,
                |h, d| h.start(d),
                None,
                Some(|f, n| matches!(f, Fault::Crashed { node } if node == n)),
            ),
            Action::PauseNode { node } => self.vm(
                node,
                |h, d| h.suspend(d),
                Some(|n| Fault::Paused { node: n }),
                None,
            ),
            Action::ResumeNode { node } => self.vm(
                node,
                |h, d| h.resume(d),
                None,
                Some(|f, n| matches!(f, Fault::Paused { node } if node == n)),
            ),
            Action::RebootNode { node } => {
                let n = self.one(node)?;
                // The session drops as the guest goes down: only a refusal to start
                // the reboot is an error.
                let out =
                    self.remote
                        .exec(&n, "systemctl --no-block reboot", Duration::from_secs(30));
                if let Ok(o) = &out {
                    if !o.success() {
                        return Err(format!("systemctl reboot failed: {}", o.stderr.trim()));
                    }
                }
                Ok((vec![n], None))
            }
            Action::Partition { groups } => {
                let mut resolved: Vec<Vec<String>> = Vec::new();
                let mut others_at = None;
                for (i, g) in groups.iter().enumerate() {
                    let mut v = Vec::new();
                    for s in g {
                        if *s == Selector::Others {
                            others_at = Some(i);
                        } else {
                            v.extend(self.resolve(s)?);
                        }
                    }
                    resolved.push(v);
                }
                if let Some(i) = others_at {
                    let named: Vec<String> = resolved.iter().flatten().cloned().collect();
                    let rest: Vec<String> = self
                        .plan
                        .nodes
                        .iter()
                        .map(|n| n.name.clone())
                        .filter(|n| !named.contains(n))
                        .collect();
                    resolved[i].extend(rest);
                }
                for g in &mut resolved {
                    g.sort();
                    g.dedup();
                }
                self.record(Fault::Partition {
                    groups: resolved.clone(),
                })?;
                faults::apply_partition(self.plan, &resolved).map_err(|e| e.to_string())?;
                let detail = resolved
                    .iter()
                    .map(|g| format!("[{}]", g.join(",")))
                    .collect::<Vec<_>>()
                    .join(" | ");
                Ok((resolved.into_iter().flatten().collect(), Some(detail)))
            }
            Action::Heal => {
                let had = faults::heal(self.plan).map_err(|e| e.to_string())?;
                self.forget(|f| matches!(f, Fault::Partition { .. }));
                Ok((
                    Vec::new(),
                    Some(
                        if had {
                            "partition removed"
                        } else {
                            "no partition was in force"
                        }
                        .into(),
                    ),
                ))
            }
            Action::Delay {
                node,
                ms,
                jitter_ms,
                loss_percent,
            } => {
                let n = self.one(node)?;
                self.record(Fault::Delay {
                    node: n.clone(),
                    ms: *ms,
                    jitter_ms: *jitter_ms,
                    loss_percent: *loss_percent,
                })?;
                faults::apply_delay(hv, self.plan, &n, *ms, *jitter_ms, *loss_percent)
                    .map_err(|e| e.to_string())?;
                Ok((vec![n], None))
            }
            Action::ClearDelay { node } => {
                let n = self.one(node)?;
                faults::clear_delay(hv, self.plan, &n).map_err(|e| e.to_string())?;
                let nn = n.clone();
                self.forget(move |f| matches!(f, Fault::Delay { node, .. } if *node == nn));
                Ok((vec![n], None))
            }
            Action::LbBackend { node, enabled } => {
                let n = self.one(node)?;
                if !*enabled {
                    self.record(Fault::BackendDisabled { node: n.clone() })?;
                }
                faults::set_backend(self.plan, &n, *enabled).map_err(|e| e.to_string())?;
                if *enabled {
                    let nn = n.clone();
                    self.forget(
                        move |f| matches!(f, Fault::BackendDisabled { node } if *node == nn),
                    );
                }
                Ok((vec![n], None))
            }
            Action::RestoreCheckpoint { checkpoint } => {
                let start = t0.elapsed().as_secs_f64();
                let r = crate::actions::checkpoint::restore(
                    self.plan,
                    self.plan_sha256,
                    self.opts,
                    checkpoint,
                    &self.progress,
                )
                .map_err(|e| e.to_string())?;
                rewinds.push((start, t0.elapsed().as_secs_f64()));
                Ok((
                    self.plan.nodes.iter().map(|n| n.name.clone()).collect(),
                    Some(format!("restored in {:.1} s", r.total_s)),
                ))
            }
            Action::Wait => Ok((Vec::new(), None)),
        }
    }
}

fn sleep_until(t0: Instant, at: f64, cancel: &Cancel) -> bool {
    loop {
        if cancel.is_cancelled() {
            return false;
        }
        let now = t0.elapsed().as_secs_f64();
        if now >= at {
            return true;
        }
        std::thread::sleep(Duration::from_secs_f64((at - now).min(0.05)));
    }
}

/// `YYYYMMDD-HHMMSS` UTC of now.
fn stamp() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{:04}{:02}{:02}-{:02}{:02}{:02}",
        now.year(),
        now.month() as u8,
        now.day(),
        now.hour(),
        now.minute(),
        now.second()
    )
}

/// Facts from the lab's latest `create` manifest: the image digest and the
/// accelerator.
fn create_notes(plan: &LabPlan) -> BTreeMap<String, String> {
    let dir = plan.paths.root.join("runs");
    let mut names: Vec<std::path::PathBuf> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with("-create.json"))
        .collect();
    names.sort();
    names
        .last()
        .and_then(|p| std::fs::read(p).ok())
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| serde_json::from_value(v["notes"].clone()).ok())
        .unwrap_or_default()
}

/// Where a run's files go.
pub fn runs_dir(plan: &LabPlan) -> std::path::PathBuf {
    plan.paths.root.join("experiments")
}

/// Run `exp` against the lab. `Ok` whenever the run completed (expectations may
/// have failed: the report says which); the report is also written when it did not.
pub fn run(exp: &Experiment, input: RunInput) -> (Option<Report>, Result<()>) {
    let plan = input.plan;
    // The lab as the run will find it: the checkpoint's, when it starts from one.
    let journal = match &exp.from_checkpoint {
        Some(cp) => match crate::actions::checkpoint::load(plan, cp) {
            Ok(c) => Some(c.journal),
            Err(e) => return (None, Err(e)),
        },
        None => Journal::read(&plan.paths.journal),
    };
    if let Err(e) = check_requires(exp, plan, journal.as_ref()) {
        return (None, Err(e));
    }
    let hv = match connect_hypervisor(&input.opts.connect) {
        Ok(hv) => hv,
        Err(e) => return (None, Err(e)),
    };
    let remote = match lab_remote(plan) {
        Ok(r) => r,
        Err(e) => return (None, Err(e)),
    };
    let progress = input.progress.clone();
    let run_id = format!("{}-{}", stamp(), exp.name);
    let by = format!("experiment {} (run {run_id})", exp.name);
    // What an earlier run left in force goes first.
    let left = faults::clear(plan, &hv, Some(&remote), Duration::from_secs(120));
    for u in &left.undone {
        progress.println(&format!("    undone from an earlier run: {u}"));
    }
    if !left.failed.is_empty() {
        return (
            None,
            Err(not_ready(
                format!(
                    "faults of an earlier run could not be undone: {}",
                    left.failed.join("; ")
                ),
                format!("`kthw-lab status {}` shows the lab; `kthw-lab experiment clean {}` tries again", plan.lab, plan.lab),
            )),
        );
    }
    if let Some(cp) = &exp.from_checkpoint {
        let line = progress.line("checkpoint", &format!("restoring `{cp}`"));
        match crate::actions::checkpoint::restore(
            plan,
            input.plan_sha256,
            input.opts,
            cp,
            &progress,
        ) {
            Ok(r) => line.done(&format!("restored in {:.1} s", r.total_s)),
            Err(e) => {
                line.fail("failed");
                return (None, Err(e));
            }
        }
    }
    // Every node must run (a node off or paused would make the first steps lie).
    for n in &plan.nodes {
        let st = hv.state(&n.domain).ok().flatten();
        if st != Some(DomainState::Running) {
            return (
                None,
                Err(not_ready(
                    format!(
                        "node `{}` is not running ({})",
                        n.name,
                        st.map(|s| format!("{s:?}").to_lowercase())
                            .unwrap_or("no domain".into())
                    ),
                    format!("`kthw-lab start {}` brings the lab back", plan.lab),
                )),
            );
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return (
                None,
                Err(Error::with_source("cannot start the async runtime", e)),
            )
        }
    };
    let etcd_done = journal.as_ref().is_some_and(|j| j.is_done(Phase::Etcd));
    let etcd = if etcd_done {
        match super::etcd::Tls::of_lab(plan) {
            Ok(tls) => Some(Arc::new(Etcd::new(
                rt.handle().clone(),
                tls,
                super::etcd::members_of(plan),
            ))),
            Err(e) => {
                return (
                    None,
                    Err(not_ready(
                        format!("etcd cannot be probed: {e}"),
                        "the etcd client certificate comes from phase `pki`".into(),
                    )),
                )
            }
        }
    } else {
        None
    };
    let key = probes::register_key(&run_id);
    // Samplers, one per probe.
    let resolver = Ctx {
        plan,
        plan_sha256: input.plan_sha256,
        opts: input.opts,
        hv: &hv,
        remote: &remote,
        etcd: etcd.as_deref(),
        store: FaultStore::of(plan),
        by: by.clone(),
        resolved: BTreeMap::new(),
        progress: progress.clone(),
    };
    let (samplers, targets) = match samplers(exp, &resolver, etcd.as_ref(), &key) {
        Ok(x) => x,
        Err(e) => return (None, Err(e)),
    };
    drop(resolver);
    let started = crate::actions::journal::now_unix();
    progress.println(&format!(
        "==> experiment `{}`: {} probe(s), {} step(s), {:.0} s (run {run_id})",
        exp.name,
        exp.probes.len(),
        exp.steps.len(),
        exp.duration.0
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let end = exp.duration.duration();
    let mut rewinds: Vec<(f64, f64)> = Vec::new();
    let mut steps: Vec<StepReport> = Vec::new();
    let mut failure: Option<String> = None;
    let samples: Vec<(String, Vec<report::Sample>)> = std::thread::scope(|s| {
        let handles: Vec<_> = samplers
            .into_iter()
            .zip(&exp.probes)
            .map(|((name, mut sampler), spec)| {
                let stop = stop.clone();
                let (every, timeout) = (spec.every.duration(), spec.timeout.duration());
                s.spawn(move || {
                    let v = probes::run(sampler.as_mut(), every, timeout, t0, end, &stop);
                    (name, v)
                })
            })
            .collect();
        // The steps, on this thread.
        let mut cx = Ctx {
            plan,
            plan_sha256: input.plan_sha256,
            opts: input.opts,
            hv: &hv,
            remote: &remote,
            etcd: etcd.as_deref(),
            store: FaultStore::of(plan),
            by: by.clone(),
            resolved: BTreeMap::new(),
            progress: progress.clone(),
        };
        let planned = exp.planned();
        let mut prev_end = 0.0;
        for (i, step) in exp.steps.iter().enumerate() {
            let at = match step.when {
                When::At(a) => a.0,
                When::After(d) => prev_end + d.0,
            };
            if !sleep_until(t0, at, &input.cancel) {
                failure = Some("interrupted".into());
                break;
            }
            let actual = t0.elapsed().as_secs_f64();
            let line = progress.line(
                &step.id.clone().unwrap_or_else(|| format!("step {}", i + 1)),
                &format!("{:.1} s: {}", actual, step.action.describe()),
            );
            let r = cx.act(&step.action, &mut rewinds, t0);
            let end_t = t0.elapsed().as_secs_f64();
            prev_end = end_t;
            let (nodes, detail, error) = match r {
                Ok((nodes, detail)) => {
                    line.done(&format!(
                        "{}{}",
                        if nodes.is_empty() {
                            "done".to_string()
                        } else {
                            format!("on {}", nodes.join(","))
                        },
                        detail
                            .as_ref()
                            .map(|d| format!(": {d}"))
                            .unwrap_or_default(),
                    ));
                    (nodes, detail, None)
                }
                Err(e) => {
                    line.fail(&e);
                    (Vec::new(), None, Some(e))
                }
            };
            if let Some(id) = &step.id {
                cx.resolved.insert(id.clone(), nodes.clone());
            }
            let failed = error.is_some();
            steps.push(StepReport {
                index: i,
                id: step.id.clone(),
                action: step.action.word().into(),
                written: step.action.describe(),
                nodes,
                planned_t_s: planned[i],
                actual_t_s: actual,
                end_t_s: end_t,
                ok: !failed,
                error: error.clone(),
                detail,
            });
            if failed {
                failure = Some(format!(
                    "step {} ({}) failed: {}",
                    i + 1,
                    step.action.word(),
                    error.unwrap_or_default()
                ));
                break;
            }
        }
        if failure.is_none() && !sleep_until(t0, exp.duration.0, &input.cancel) {
            failure = Some("interrupted".into());
        }
        stop.store(true, Ordering::SeqCst);
        handles
            .into_iter()
            .map(|h| h.join().expect("probe thread"))
            .collect()
    });
    // Nothing stays in force.
    let line = progress.line("cleanup", "undoing faults still in force");
    let cleared = faults::clear(plan, &hv, Some(&remote), Duration::from_secs(120));
    if cleared.failed.is_empty() {
        line.done(&if cleared.undone.is_empty() {
            "nothing was left in force".to_string()
        } else {
            cleared.undone.join("; ")
        });
    } else {
        line.fail(&cleared.failed.join("; "));
    }
    // The register read back, once etcd answers again.
    let has_writes = exp.probes.iter().any(|p| p.kind == ProbeKind::EtcdWrite);
    let mut final_value = None;
    if has_writes {
        if let Some(e) = &etcd {
            let line = progress.line("history", "reading the register back");
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(60) {
                let r = e.get(&key, Duration::from_secs(2));
                if r.outcome == Outcome::Ok {
                    final_value = r.value.and_then(|v| v.parse::<u64>().ok());
                    break;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            match final_value {
                Some(v) => line.done(&format!("final value {v}")),
                None => line.fail("etcd did not answer within 60 s"),
            }
        }
    }
    let history = has_writes.then(|| {
        let mut ops = Vec::new();
        for (name, v) in &samples {
            let kind = exp.probes.iter().find(|p| &p.name == name).map(|p| &p.kind);
            for s in v {
                let parsed = s.value.as_deref().and_then(|x| x.parse::<u64>().ok());
                let (k, outcome) = match kind {
                    Some(ProbeKind::EtcdWrite) => (
                        OpKind::Write {
                            value: parsed.unwrap_or(0),
                        },
                        if s.ok {
                            Outcome::Ok
                        } else if s.indeterminate {
                            Outcome::Indeterminate
                        } else {
                            Outcome::Fail
                        },
                    ),
                    Some(ProbeKind::EtcdRead) if s.ok => (
                        OpKind::Read {
                            value: parsed.unwrap_or(0),
                        },
                        Outcome::Ok,
                    ),
                    _ => continue,
                };
                ops.push(Op {
                    kind: k,
                    invoke_s: s.t_s,
                    complete_s: s.t_s + s.latency_ms / 1000.0,
                    outcome,
                });
            }
        }
        history::check(&ops, &rewinds, final_value)
    });
    // The report.
    let duration = exp.duration.0;
    let wins = report::windows(&steps, duration);
    let mut probes_out = Vec::new();
    let mut events = Vec::new();
    for (name, v) in samples {
        let spec = exp.probes.iter().find(|p| p.name == name).expect("probe");
        let whole = report::window_stats("whole", &v, 0.0, duration);
        if spec.kind == ProbeKind::EtcdLeader {
            let mut last: Option<&str> = None;
            for s in v.iter().filter(|s| s.ok) {
                let l = s.value.as_deref();
                if last.is_some() && l != last {
                    events.push(Event {
                        t_s: s.t_s,
                        what: format!(
                            "etcd leader changed from {} to {}",
                            last.unwrap_or("?"),
                            l.unwrap_or("?")
                        ),
                    });
                }
                last = l;
            }
        }
        probes_out.push((
            name.clone(),
            report::ProbeReport {
                kind: spec.kind.word().into(),
                target: targets.get(&name).cloned(),
                every_s: spec.every.0,
                timeout_s: spec.timeout.0,
                availability: whole.availability,
                longest_outage_s: whole.longest_outage_s,
                p50_ms: whole.p50_ms,
                p99_ms: whole.p99_ms,
                windows: wins
                    .iter()
                    .map(|(w, a, b)| {
                        let mut st = report::window_stats(w, &v, *a, *b);
                        if !spec.kind.has_changes() {
                            st.changes = None;
                        }
                        st
                    })
                    .collect(),
                samples: v,
            },
        ));
    }
    for (a, b) in &rewinds {
        events.push(Event {
            t_s: *a,
            what: format!("deliberate rewind to a checkpoint (until {b:.1} s)"),
        });
    }
    events.sort_by(|a, b| a.t_s.total_cmp(&b.t_s));
    let notes = create_notes(plan);
    use sha2::Digest;
    let manifest = report::Manifest {
        run_id: run_id.clone(),
        tool_version: env!("CARGO_PKG_VERSION").into(),
        started,
        experiment_file: input.file_label.to_string(),
        experiment_sha256: hex::encode(sha2::Sha256::digest(input.file_text.as_bytes())),
        scenario_sha256: plan.scenario_sha256.clone(),
        plan_sha256: input.plan_sha256.to_string(),
        image: plan.image.clone(),
        image_digest: notes.get("image_digest").cloned(),
        versions: serde_json::to_value(&plan.versions).unwrap_or_default(),
        controllers: plan.controllers().count() as u32,
        workers: plan.workers().count() as u32,
        checkpoint: exp.from_checkpoint.clone(),
        host: report::HostFacts {
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            memory_mib: crate::host::facts::memory_mib().unwrap_or(0),
            accelerator: notes.get("accelerator").cloned(),
        },
    };
    let mut rep = Report {
        experiment: report::ExperimentInfo {
            name: exp.name.clone(),
            description: exp.description.clone(),
            duration_s: duration,
        },
        lab: plan.lab.clone(),
        result: failure.clone().unwrap_or_else(|| "completed".into()),
        manifest,
        steps,
        probes: report::indexmap_like::OrderedMap(probes_out),
        history,
        cleanup: cleared.undone.clone(),
        expect: Vec::new(),
        events,
    };
    rep.expect = report::check_expectations(&exp.expect, &rep, rep.manifest.controllers);
    if failure.is_some() {
        // A run that stopped early measured something else than the file says.
        for x in &mut rep.expect {
            x.pass = false;
            x.skipped = Some("the run did not complete".into());
        }
    }
    if let Err(e) = write_report(plan, &rep) {
        return (Some(rep), Err(e));
    }
    let result = match failure {
        None if cleared.failed.is_empty() => Ok(()),
        None => Err(not_ready(
            format!(
                "the run completed, but faults are still in force: {}",
                cleared.failed.join("; ")
            ),
            format!("`kthw-lab experiment clean {}` tries again", plan.lab),
        )),
        Some(f) if f == "interrupted" => Err(Error::Interrupted {
            phase: format!("experiment {}", exp.name),
        }),
        Some(f) => Err(not_ready(
            format!("the run could not complete: {f}"),
            format!(
                "the report says what ran; `kthw-lab status {}` shows the lab",
                plan.lab
            ),
        )),
    };
    (Some(rep), result)
}

/// One sampler per probe, and the node each tcp or ping probe is pointed at.
#[allow(clippy::type_complexity)]
fn samplers(
    exp: &Experiment,
    cx: &Ctx,
    etcd: Option<&Arc<Etcd>>,
    key: &str,
) -> Result<(Vec<(String, Box<dyn Sampler>)>, BTreeMap<String, String>)> {
    let plan = cx.plan;
    let mut out: Vec<(String, Box<dyn Sampler>)> = Vec::new();
    let mut targets = BTreeMap::new();
    let mut target = |name: &str, node: &Selector| -> Result<std::net::Ipv4Addr> {
        let n = cx.one(node).map_err(|e| {
            not_ready(
                format!("probe `{name}`: {e}"),
                "fix the probe's node".into(),
            )
        })?;
        targets.insert(name.to_string(), n.clone());
        Ok(plan.node(&n).expect("resolved").ip)
    };
    for p in &exp.probes {
        let s: Box<dyn Sampler> = match &p.kind {
            ProbeKind::EtcdWrite | ProbeKind::EtcdRead | ProbeKind::EtcdLeader => {
                let e = etcd
                    .ok_or_else(|| {
                        not_ready(
                            "the lab's etcd is not up".into(),
                            "run create up to `etcd`".into(),
                        )
                    })?
                    .clone();
                match p.kind {
                    ProbeKind::EtcdWrite => Box::new(probes::EtcdWrite {
                        etcd: e,
                        key: key.to_string(),
                        next: 0,
                    }),
                    ProbeKind::EtcdRead => Box::new(probes::EtcdRead {
                        etcd: e,
                        key: key.to_string(),
                    }),
                    _ => Box::new(probes::EtcdLeader { etcd: e }),
                }
            }
            ProbeKind::ApiReady | ProbeKind::ApiList | ProbeKind::ApiLease { .. } => {
                let api = crate::kube::ApiClient::for_lab(plan).map_err(|e| {
                    not_ready(
                        format!("the API cannot be probed: {e}"),
                        "the admin certificate comes from phase `pki`".into(),
                    )
                })?;
                match &p.kind {
                    ProbeKind::ApiReady => Box::new(probes::ApiReady { api }),
                    ProbeKind::ApiLease { lease } => Box::new(probes::ApiLease {
                        api,
                        lease: lease.clone(),
                    }),
                    _ => Box::new(probes::ApiList { api }),
                }
            }
            ProbeKind::Tcp { node, port } => Box::new(probes::Tcp {
                addr: (target(&p.name, node)?, *port).into(),
            }),
            ProbeKind::Ping { node } => Box::new(probes::Ping {
                ip: target(&p.name, node)?,
                seq: 0,
            }),
            ProbeKind::LbBackends => Box::new(probes::LbBackends {
                socket: crate::lb::LbFiles::of(plan).socket,
            }),
        };
        out.push((p.name.clone(), s));
    }
    Ok((out, targets))
}

/// Where the reports of a destroyed lab are kept.
pub fn archive_dir(state_dir: &std::path::Path, lab: &str) -> std::path::PathBuf {
    state_dir.join("reports").join(lab)
}

/// Move the lab's experiment reports out of its state dir, into
/// [`archive_dir`]; how many were moved. A run id already there keeps both: the
/// newer one gets a suffix.
pub fn archive_reports(
    lab_dir: &std::path::Path,
    state_dir: &std::path::Path,
    lab: &str,
) -> std::io::Result<usize> {
    let from = lab_dir.join("experiments");
    let rd = match std::fs::read_dir(&from) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let to = archive_dir(state_dir, lab);
    let mut n = 0;
    for e in rd {
        let e = e?;
        if !e.file_type()?.is_dir() {
            continue;
        }
        std::fs::create_dir_all(&to)?;
        let mut dest = to.join(e.file_name());
        let mut i = 1;
        while dest.exists() {
            dest = to.join(format!("{}-{i}", e.file_name().to_string_lossy()));
            i += 1;
        }
        std::fs::rename(e.path(), &dest)?;
        n += 1;
    }
    Ok(n)
}

/// The report's directory for a run.
pub fn report_dir(plan: &LabPlan, run_id: &str) -> std::path::PathBuf {
    runs_dir(plan).join(run_id)
}

fn write_report(plan: &LabPlan, rep: &Report) -> Result<()> {
    let dir = report_dir(plan, &rep.manifest.run_id);
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::with_source(format!("cannot create {}", dir.display()), e))?;
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.join(name);
        crate::actions::journal::write_atomic(&p, bytes, 0o644)
            .map_err(|e| Error::with_source(format!("cannot write {}", p.display()), e))
    };
    let mut json = serde_json::to_string_pretty(rep).expect("report serializes");
    json.push('\n');
    write("report.json", json.as_bytes())?;
    write("timeline.svg", super::chart::svg(rep).as_bytes())?;
    write("summary.txt", report::summary(rep).as_bytes())?;
    Ok(())
}
