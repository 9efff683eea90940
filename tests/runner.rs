//! The phase runner: journal, resume, --from/--until, Ctrl-C between phases, and
//! the errors a user sees. Phases here are injected doubles that record calls or
//! fail at a chosen step; the real phases are tested against the real system.

mod support;

use std::path::Path;
use std::sync::{Arc, Mutex};

use kthw_lab::actions::{
    render_timings, Action, Cancel, Journal, Phase, PhaseState, Progress, Range, RunCtx, Runner,
};
use kthw_lab::error::Error;
use kthw_lab::plan::LabPlan;

fn lab_plan(state: &Path) -> LabPlan {
    support::plan_1m1w(state)
}

type Log = Arc<Mutex<Vec<Phase>>>;

struct Step {
    phase: Phase,
    log: Log,
    fail: bool,
    cancel_after: Option<Cancel>,
}

impl Action for Step {
    fn phase(&self) -> Phase {
        self.phase
    }
    fn run(&self, cx: &RunCtx) -> kthw_lab::error::Result<()> {
        self.log.lock().unwrap().push(self.phase);
        let line = cx.progress.line("node-a", "working");
        if self.fail {
            line.fail("boom");
            return Err(Error::Provision {
                what: format!("{} could not be made", self.phase),
                hint: "fix the thing".into(),
                source: None,
            });
        }
        line.done("ok");
        if let Some(c) = &self.cancel_after {
            c.cancel();
        }
        Ok(())
    }
}

fn runner(
    phases: &[Phase],
    log: &Log,
    fail: Option<Phase>,
    cancel_after: Option<(Phase, Cancel)>,
) -> Runner {
    Runner::new(
        phases
            .iter()
            .map(|p| {
                Box::new(Step {
                    phase: *p,
                    log: log.clone(),
                    fail: fail == Some(*p),
                    cancel_after: cancel_after
                        .as_ref()
                        .filter(|(cp, _)| cp == p)
                        .map(|(_, c)| c.clone()),
                }) as Box<dyn Action>
            })
            .collect(),
    )
}

const FIRST5: [Phase; 5] = [
    Phase::Network,
    Phase::Image,
    Phase::Disks,
    Phase::Domains,
    Phase::WaitSsh,
];

#[test]
fn runs_in_order_until_the_requested_phase_and_journals_it() {
    let dir = tempfile::tempdir().unwrap();
    let p = lab_plan(dir.path());
    let log = Log::default();
    let r = runner(&FIRST5, &log, None, None);
    let cx = RunCtx::new(&p, Progress::capturing(), Cancel::new());
    let mut j = Journal::open(&p.paths.journal, &p.lab, "h1").unwrap();
    let (timings, res) = r.run(
        &cx,
        &mut j,
        Range {
            from: None,
            until: Some(Phase::Disks),
        },
    );
    res.unwrap();
    assert_eq!(
        *log.lock().unwrap(),
        vec![Phase::Network, Phase::Image, Phase::Disks]
    );
    assert_eq!(timings.len(), 3);
    let saved = Journal::open(&p.paths.journal, &p.lab, "h1").unwrap();
    assert!(saved.is_done(Phase::Network) && saved.is_done(Phase::Disks));
    assert!(saved.get(Phase::Domains).is_none());
    let lines = cx.progress.captured();
    assert!(
        lines.iter().any(|l| l.starts_with("==> network:")),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("  node-a: ok (")),
        "{lines:?}"
    );
    let table = render_timings(&timings);
    assert!(table.starts_with("PHASE"), "{table}");
    assert!(
        table.contains("disks") && table.contains("total"),
        "{table}"
    );
}

#[test]
fn a_failing_phase_is_journaled_and_the_error_names_phase_and_hints_resume() {
    let dir = tempfile::tempdir().unwrap();
    let p = lab_plan(dir.path());
    let log = Log::default();
    let r = runner(&FIRST5, &log, Some(Phase::Disks), None);
    let cx = RunCtx::new(&p, Progress::capturing(), Cancel::new());
    let mut j = Journal::open(&p.paths.journal, &p.lab, "h1").unwrap();
    let (_, res) = r.run(&cx, &mut j, Range::default());
    let e = res.unwrap_err();
    assert_eq!(e.exit_code(), 10, "keeps the cause's exit code");
    let report = e.report();
    assert!(
        report.starts_with("error: phase `disks` of lab `k1m1w` failed\n"),
        "{report}"
    );
    assert!(
        report.contains("caused by: host provisioning failed: disks could not be made"),
        "{report}"
    );
    assert!(report.contains("hint: fix the thing"), "{report}");
    assert!(report.contains("hint: after fixing the cause, run the same command again to resume; `kthw-lab destroy k1m1w`"), "{report}");
    let saved = Journal::open(&p.paths.journal, &p.lab, "h1").unwrap();
    assert_eq!(saved.get(Phase::Disks).unwrap().state, PhaseState::Failed);
    assert!(saved
        .get(Phase::Disks)
        .unwrap()
        .error
        .as_deref()
        .unwrap()
        .contains("disks could not be made"));
    assert!(
        saved.get(Phase::Domains).is_none(),
        "nothing after the failure ran"
    );

    // The next run converges: every phase runs again (each is an idempotent ensure).
    let log2 = Log::default();
    let r2 = runner(&FIRST5, &log2, None, None);
    let mut j2 = Journal::open(&p.paths.journal, &p.lab, "h1").unwrap();
    r2.run(
        &cx,
        &mut j2,
        Range {
            from: None,
            until: Some(Phase::WaitSsh),
        },
    )
    .1
    .unwrap();
    assert_eq!(*log2.lock().unwrap(), FIRST5.to_vec());
    let saved = Journal::open(&p.paths.journal, &p.lab, "h1").unwrap();
    assert!(FIRST5.iter().all(|ph| saved.is_done(*ph)));
}

#[test]
fn ctrl_c_stops_between_phases() {
    let dir = tempfile::tempdir().unwrap();
    let p = lab_plan(dir.path());
    let log = Log::default();
    let cancel = Cancel::new();
    let r = runner(&FIRST5, &log, None, Some((Phase::Image, cancel.clone())));
    let cx = RunCtx::new(&p, Progress::capturing(), cancel);
    let mut j = Journal::open(&p.paths.journal, &p.lab, "h1").unwrap();
    let (_, res) = r.run(&cx, &mut j, Range::default());
    let e = res.unwrap_err();
    assert!(matches!(e, Error::Interrupted { .. }), "{e}");
    assert_eq!(e.exit_code(), 130);
    assert_eq!(e.to_string(), "interrupted during phase `disks`");
    assert_eq!(*log.lock().unwrap(), vec![Phase::Network, Phase::Image]);
    assert!(j.is_done(Phase::Image));
}

#[test]
fn from_requires_earlier_phases_done_for_this_plan() {
    let dir = tempfile::tempdir().unwrap();
    let p = lab_plan(dir.path());
    let log = Log::default();
    let r = runner(&FIRST5, &log, None, None);
    let cx = RunCtx::new(&p, Progress::capturing(), Cancel::new());
    let mut j = Journal::open(&p.paths.journal, &p.lab, "h1").unwrap();
    let e = r
        .run(
            &cx,
            &mut j,
            Range {
                from: Some(Phase::Domains),
                until: None,
            },
        )
        .1
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "cannot start at `domains`: earlier phases have not completed for this plan: network, image, disks"
    );
    assert!(log.lock().unwrap().is_empty(), "nothing ran");

    r.run(
        &cx,
        &mut j,
        Range {
            from: None,
            until: Some(Phase::Disks),
        },
    )
    .1
    .unwrap();
    log.lock().unwrap().clear();
    r.run(
        &cx,
        &mut j,
        Range {
            from: Some(Phase::Domains),
            until: Some(Phase::WaitSsh),
        },
    )
    .1
    .unwrap();
    assert_eq!(*log.lock().unwrap(), vec![Phase::Domains, Phase::WaitSsh]);

    // A changed plan invalidates the journal: --from is refused again.
    let mut other = Journal::open(&p.paths.journal, &p.lab, "h2").unwrap();
    assert!(other.phases.is_empty());
    assert!(r
        .run(
            &cx,
            &mut other,
            Range {
                from: Some(Phase::Domains),
                until: None
            }
        )
        .1
        .is_err());
}

#[test]
fn from_after_until_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = lab_plan(dir.path());
    let r = runner(&FIRST5, &Log::default(), None, None);
    let cx = RunCtx::new(&p, Progress::capturing(), Cancel::new());
    let mut j = Journal::open(&p.paths.journal, &p.lab, "h1").unwrap();
    let e = r
        .run(
            &cx,
            &mut j,
            Range {
                from: Some(Phase::Disks),
                until: Some(Phase::Network),
            },
        )
        .1
        .unwrap_err();
    assert_eq!(e.to_string(), "--from disks comes after --until network");
    assert_eq!(e.exit_code(), 2);
}

#[test]
fn a_phase_this_build_cannot_run_is_named_with_where_the_lab_stands() {
    let dir = tempfile::tempdir().unwrap();
    let p = lab_plan(dir.path());
    let log = Log::default();
    let r = runner(&FIRST5, &log, None, None);
    let cx = RunCtx::new(&p, Progress::capturing(), Cancel::new());
    let mut j = Journal::open(&p.paths.journal, &p.lab, "h1").unwrap();
    let (timings, res) = r.run(&cx, &mut j, Range::default());
    let e = res.unwrap_err();
    assert_eq!(timings.len(), 5);
    assert_eq!(
        e.to_string(),
        "phase `pki` (certificates, kubeconfigs, encryption config) is not available yet in this version"
    );
    assert!(
        e.report()
            .contains("hint: the lab is complete up to `wait-ssh`; use `--until wait-ssh`"),
        "{}",
        e.report()
    );
}

#[test]
fn an_injected_fault_fails_the_phase_after_its_work_and_the_next_run_converges() {
    let dir = tempfile::tempdir().unwrap();
    let p = lab_plan(dir.path());
    let log = Log::default();
    let r = runner(&FIRST5, &log, None, None).inject_fault(Some(Phase::Disks));
    let cx = RunCtx::new(&p, Progress::capturing(), Cancel::new());
    let mut j = Journal::open(&p.paths.journal, &p.lab, "h1").unwrap();
    let (timings, res) = r.run(&cx, &mut j, Range::default());
    let e = res.unwrap_err();
    // The action itself ran to the end: its side effects happened.
    assert_eq!(
        *log.lock().unwrap(),
        vec![Phase::Network, Phase::Image, Phase::Disks]
    );
    assert!(cx
        .progress
        .captured()
        .iter()
        .any(|l| l == "  node-a: ok (0.0 s)"));
    assert_eq!(e.exit_code(), 1);
    let report = e.report();
    assert!(
        report.contains("caused by: injected fault: phase `disks` failed on purpose"),
        "{report}"
    );
    assert!(
        report.contains("hint: unset KTHW_LAB_INJECT_FAULT"),
        "{report}"
    );
    assert_eq!(timings.last().unwrap().state, PhaseState::Failed);
    let saved = Journal::open(&p.paths.journal, &p.lab, "h1").unwrap();
    assert_eq!(saved.get(Phase::Disks).unwrap().state, PhaseState::Failed);
    assert!(saved.get(Phase::Domains).is_none());

    // Without the hook the same runner converges.
    let log2 = Log::default();
    let r2 = runner(&FIRST5, &log2, None, None).inject_fault(None);
    let mut j2 = Journal::open(&p.paths.journal, &p.lab, "h1").unwrap();
    r2.run(
        &cx,
        &mut j2,
        Range {
            from: None,
            until: Some(Phase::WaitSsh),
        },
    )
    .1
    .unwrap();
    assert!(FIRST5.iter().all(|ph| j2.is_done(*ph)));
}

#[test]
fn the_fault_hook_names_a_phase_and_optionally_a_kill() {
    use kthw_lab::actions::{parse_injected_fault, InjectedFault};
    assert_eq!(parse_injected_fault("").unwrap(), None);
    assert_eq!(
        parse_injected_fault("disks").unwrap(),
        Some(InjectedFault {
            phase: Phase::Disks,
            kill: false
        })
    );
    assert_eq!(
        parse_injected_fault("wait-ssh:kill").unwrap(),
        Some(InjectedFault {
            phase: Phase::WaitSsh,
            kill: true
        })
    );
    for bad in ["disk", "disks:crash", ":kill", "kill"] {
        let e = parse_injected_fault(bad).unwrap_err();
        assert_eq!(e.exit_code(), 2, "{bad}");
        assert!(e.to_string().contains(bad), "{bad}: {e}");
    }
}

#[test]
fn guests_count_as_fresh_until_a_phase_that_changes_them_has_run() {
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let p = lab_plan(dir.path());
    let log = Log::default();
    let all: Vec<Phase> = Phase::ALL
        .into_iter()
        .filter(|p| *p <= Phase::Etcd)
        .collect();
    let r = runner(&all, &log, None, None);
    let mut j = Journal::open(&p.paths.journal, &p.lab, "h1").unwrap();
    let until = |u| Range {
        from: None,
        until: Some(u),
    };
    // Only the runner knows: a context it has not run with says "not fresh".
    let cx = RunCtx::new(&p, Progress::capturing(), Cancel::new());
    assert!(!cx.guests_fresh.load(Ordering::SeqCst));
    // Host-side phases after wait-ssh (pki, lb) leave the guests fresh.
    r.run(&cx, &mut j, until(Phase::Lb)).1.unwrap();
    assert!(cx.guests_fresh.load(Ordering::SeqCst));
    let cx = RunCtx::new(&p, Progress::capturing(), Cancel::new());
    r.run(&cx, &mut j, until(Phase::Etcd)).1.unwrap();
    assert!(
        cx.guests_fresh.load(Ordering::SeqCst),
        "etcd ran in this run, after wait-ssh"
    );
    // The next run finds etcd in the journal: the nodes have been changed.
    let cx = RunCtx::new(&p, Progress::capturing(), Cancel::new());
    r.run(&cx, &mut j, until(Phase::WaitSsh)).1.unwrap();
    assert!(!cx.guests_fresh.load(Ordering::SeqCst));
    // What `reset` does after going back to the saved state: forget etcd.
    j.invalidate_from(Phase::FIRST_ON_GUESTS);
    let cx = RunCtx::new(&p, Progress::capturing(), Cancel::new());
    r.run(&cx, &mut j, until(Phase::WaitSsh)).1.unwrap();
    assert!(cx.guests_fresh.load(Ordering::SeqCst));
}
