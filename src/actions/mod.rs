//! The phase runner: runs the lab's phases in order, each an idempotent ensure,
//! recording progress in the journal so an interrupted run resumes where it stood.

pub mod bootstrap;
pub mod checkpoint;
pub mod journal;
pub mod phase;
pub mod phases;
pub mod progress;
pub mod status;
pub mod teardown;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

pub use journal::{Journal, PhaseRecord, PhaseState};
pub use phase::Phase;
pub use progress::{Line, Progress};

use crate::error::{Error, Result};
use crate::plan::LabPlan;

/// Set by Ctrl-C (SIGINT) or SIGTERM; phases check it between steps.
#[derive(Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    pub fn new() -> Cancel {
        Cancel::default()
    }

    /// The first Ctrl-C asks the run to stop at the next step boundary; a second
    /// one exits at once.
    pub fn install_signal_handlers(&self) -> std::io::Result<()> {
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register_conditional_shutdown(sig, 130, self.0.clone())?;
            signal_hook::flag::register(sig, self.0.clone())?;
        }
        Ok(())
    }

    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// What a phase gets to work with.
pub struct RunCtx<'a> {
    pub plan: &'a LabPlan,
    pub progress: Progress,
    pub cancel: Cancel,
    /// Facts for the run manifest (e.g. the image digest), keyed by name.
    pub notes: Mutex<BTreeMap<String, String>>,
    /// Set by the runner from the journal: no phase from [`Phase::FIRST_ON_GUESTS`] on
    /// has run on these nodes, so they are as freshly booted (and `wait-ssh` may save
    /// that state for `reset`). False unless the runner knows.
    pub guests_fresh: std::sync::atomic::AtomicBool,
}

impl<'a> RunCtx<'a> {
    pub fn new(plan: &'a LabPlan, progress: Progress, cancel: Cancel) -> Self {
        RunCtx {
            plan,
            progress,
            cancel,
            notes: Mutex::new(BTreeMap::new()),
            guests_fresh: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Call between steps: stops cleanly after a Ctrl-C.
    pub fn check_cancel(&self, phase: Phase) -> Result<()> {
        if self.cancel.is_cancelled() {
            Err(Error::Interrupted {
                phase: phase.name().into(),
            })
        } else {
            Ok(())
        }
    }

    pub fn note(&self, key: &str, value: impl Into<String>) {
        self.notes
            .lock()
            .expect("notes lock")
            .insert(key.to_string(), value.into());
    }
}

/// One phase of the pipeline: an idempotent ensure (check, act, check).
pub trait Action: Send + Sync {
    fn phase(&self) -> Phase;
    fn run(&self, cx: &RunCtx) -> Result<()>;
}

/// Which phases to run: `--from` and `--until`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Range {
    pub from: Option<Phase>,
    pub until: Option<Phase>,
}

impl Range {
    pub fn phases(&self) -> Vec<Phase> {
        Phase::ALL
            .into_iter()
            .filter(|p| self.from.is_none_or(|f| *p >= f) && self.until.is_none_or(|u| *p <= u))
            .collect()
    }

    /// What the run needs of the hypervisor, for preflight: libvirt when it defines
    /// and starts domains or saves their fresh state, and qemu's access to the lab's
    /// files when it starts them.
    pub fn hypervisor_needs(&self) -> crate::host::preflight::HypervisorNeeds {
        let p = self.phases();
        crate::host::preflight::HypervisorNeeds {
            libvirt: p.contains(&Phase::Domains) || p.contains(&Phase::WaitSsh),
            qemu_opens_files: p.contains(&Phase::Domains),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PhaseTiming {
    pub phase: Phase,
    pub seconds: f64,
    pub state: PhaseState,
}

/// Saved in the lab's `runs/` directory after every run, so experiments can be
/// reproduced and compared.
#[derive(Debug, Clone, Serialize)]
pub struct RunManifest {
    pub lab: String,
    pub command: String,
    pub started: u64,
    pub seconds: f64,
    pub result: String,
    pub scenario_sha256: String,
    pub plan_sha256: String,
    pub image: String,
    pub versions: crate::scenario::Versions,
    pub notes: BTreeMap<String, String>,
    pub phases: Vec<PhaseTiming>,
}

pub struct Runner {
    actions: Vec<Box<dyn Action>>,
    fault: Option<InjectedFault>,
}

/// The test hook's environment variable: `KTHW_LAB_INJECT_FAULT=PHASE` makes that
/// phase fail right after its action succeeded, before the journal records it done;
/// `PHASE:kill` makes the process SIGKILL itself at that very point instead (a crash
/// at the worst moment, deterministic even for phases that last milliseconds).
pub const INJECT_FAULT_ENV: &str = "KTHW_LAB_INJECT_FAULT";

/// What `KTHW_LAB_INJECT_FAULT` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InjectedFault {
    pub phase: Phase,
    /// SIGKILL instead of an error.
    pub kill: bool,
}

/// The fault named by `KTHW_LAB_INJECT_FAULT`, if set; an unknown name is a usage
/// error (a typo must not silently test nothing).
pub fn injected_fault_from_env() -> Result<Option<InjectedFault>> {
    let Some(v) = std::env::var_os(INJECT_FAULT_ENV) else {
        return Ok(None);
    };
    parse_injected_fault(&v.to_string_lossy())
}

/// The value of `KTHW_LAB_INJECT_FAULT`: `PHASE` or `PHASE:kill`; empty is none.
pub fn parse_injected_fault(v: &str) -> Result<Option<InjectedFault>> {
    if v.is_empty() {
        return Ok(None);
    }
    let (name, kill) = match v.strip_suffix(":kill") {
        Some(name) => (name, true),
        None => (v, false),
    };
    Phase::ALL
        .into_iter()
        .find(|p| p.name() == name)
        .map(|phase| Some(InjectedFault { phase, kill }))
        .ok_or_else(|| Error::Usage {
            what: format!("{INJECT_FAULT_ENV}={v} names no phase"),
            hint: format!("phases: {} (add `:kill` for a SIGKILL)", phase_list()),
        })
}

impl Runner {
    pub fn new(actions: Vec<Box<dyn Action>>) -> Runner {
        Runner {
            actions,
            fault: None,
        }
    }

    /// The hook of [`INJECT_FAULT_ENV`]: an error or a SIGKILL after `f.phase`'s work.
    pub fn inject(mut self, f: Option<InjectedFault>) -> Runner {
        self.fault = f;
        self
    }

    /// Test hook: make `phase` fail after its action has done its work (every side
    /// effect happened) but before the journal records it done, as a crash or an
    /// error at the worst moment would.
    pub fn inject_fault(self, phase: Option<Phase>) -> Runner {
        self.inject(phase.map(|phase| InjectedFault { phase, kill: false }))
    }

    /// The phases this build can run.
    pub fn available(&self) -> Vec<Phase> {
        self.actions.iter().map(|a| a.phase()).collect()
    }

    /// Run the phases in `range`. Every phase is an idempotent ensure, so phases
    /// that completed before run again cheaply and converge; `--from` additionally
    /// requires every earlier phase to have completed for this plan.
    pub fn run(
        &self,
        cx: &RunCtx,
        journal: &mut Journal,
        range: Range,
    ) -> (Vec<PhaseTiming>, Result<()>) {
        let mut timings = Vec::new();
        let fresh = !journal
            .phases
            .iter()
            .any(|r| r.phase >= Phase::FIRST_ON_GUESTS);
        cx.guests_fresh
            .store(fresh, std::sync::atomic::Ordering::SeqCst);
        let result = self.run_inner(cx, journal, range, &mut timings);
        (timings, result)
    }

    fn run_inner(
        &self,
        cx: &RunCtx,
        journal: &mut Journal,
        range: Range,
        timings: &mut Vec<PhaseTiming>,
    ) -> Result<()> {
        if let (Some(f), Some(u)) = (range.from, range.until) {
            if f > u {
                return Err(Error::Usage {
                    what: format!("--from {f} comes after --until {u}"),
                    hint: format!("phases run in this order: {}", phase_list()),
                });
            }
        }
        if let Some(from) = range.from {
            let missing: Vec<&str> = Phase::ALL
                .iter()
                .filter(|p| **p < from && !journal.is_done(**p))
                .map(|p| p.name())
                .collect();
            if !missing.is_empty() {
                return Err(Error::Usage {
                    what: format!(
                        "cannot start at `{from}`: earlier phases have not completed for this plan: {}",
                        missing.join(", ")
                    ),
                    hint: "run `create` without --from; finished phases are checked again quickly and left as they are".into(),
                });
            }
        }
        let save = |j: &Journal| {
            j.save().map_err(|e| {
                Error::with_source(
                    format!(
                        "cannot write the journal {}",
                        cx.plan.paths.journal.display()
                    ),
                    e,
                )
            })
        };
        for phase in range.phases() {
            cx.check_cancel(phase)?;
            let Some(action) = self.actions.iter().find(|a| a.phase() == phase) else {
                let done: Vec<&str> = timings.iter().map(|t| t.phase.name()).collect();
                return Err(Error::NotAvailable {
                    what: format!("phase `{phase}` ({})", phase.describe()),
                    hint: if done.is_empty() && self.available().is_empty() {
                        "this version cannot run any phase yet; `kthw-lab plan` shows the lab it would build".into()
                    } else if done.is_empty() {
                        format!("this version can run: {}", names(&self.available()))
                    } else {
                        format!(
                            "the lab is complete up to `{}`; use `--until {}` to stop there, and continue by hand from the plan (`kthw-lab plan`)",
                            done.last().expect("not empty"),
                            done.last().expect("not empty")
                        )
                    },
                });
            };
            let started = journal::now_unix();
            journal.set(PhaseRecord {
                phase,
                state: PhaseState::Running,
                started,
                seconds: 0.0,
                error: None,
            });
            save(journal)?;
            // Announced once the journal knows: whoever watches the output (a test
            // that kills the run mid-phase, say) finds the phase recorded as running.
            cx.progress
                .println(&format!("==> {phase}: {}", phase.describe()));
            let t0 = Instant::now();
            let r = match (action.run(cx), self.fault) {
                (
                    Ok(()),
                    Some(InjectedFault {
                        phase: p,
                        kill: true,
                    }),
                ) if p == phase => {
                    // SAFETY: kill(2) on this very process; nothing runs after it.
                    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
                    unreachable!("SIGKILL cannot be caught")
                }
                (
                    Ok(()),
                    Some(InjectedFault {
                        phase: p,
                        kill: false,
                    }),
                ) if p == phase => Err(Error::InjectedFault {
                    phase: phase.name().into(),
                }),
                (r, _) => r,
            };
            let seconds = t0.elapsed().as_secs_f64();
            let state = match &r {
                Ok(()) => PhaseState::Done,
                Err(Error::Interrupted { .. }) => PhaseState::Interrupted,
                Err(_) => PhaseState::Failed,
            };
            journal.set(PhaseRecord {
                phase,
                state,
                started,
                seconds,
                error: r.as_ref().err().map(|e| e.to_string()),
            });
            save(journal)?;
            timings.push(PhaseTiming {
                phase,
                seconds,
                state,
            });
            match r {
                Ok(()) => cx
                    .progress
                    .println(&format!("    {phase} done in {seconds:.1} s")),
                Err(e) => {
                    cx.progress
                        .println(&format!("    {phase} stopped after {seconds:.1} s"));
                    return Err(match e {
                        e @ Error::Interrupted { .. } => e,
                        e => Error::Phase {
                            phase: phase.name().into(),
                            lab: cx.plan.lab.clone(),
                            source: Box::new(e),
                        },
                    });
                }
            }
        }
        Ok(())
    }
}

fn names(phases: &[Phase]) -> String {
    phases
        .iter()
        .map(|p| p.name())
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn phase_list() -> String {
    names(&Phase::ALL)
}

/// The end-of-run table: each phase with its time, and the total.
pub fn render_timings(timings: &[PhaseTiming]) -> String {
    let mut rows = vec![vec!["PHASE".to_string(), "TIME".into(), "RESULT".into()]];
    let mut total = 0.0;
    for t in timings {
        total += t.seconds;
        let state = serde_json::to_value(t.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        rows.push(vec![
            t.phase.name().into(),
            format!("{:.1} s", t.seconds),
            state,
        ]);
    }
    rows.push(vec!["total".into(), format!("{total:.1} s"), String::new()]);
    crate::plan::rows_to_text(&rows)
}

/// Where a run's manifest goes.
pub fn manifest_path(plan: &LabPlan, started: u64, command: &str) -> PathBuf {
    plan.paths
        .root
        .join("runs")
        .join(format!("{started}-{command}.json"))
}
