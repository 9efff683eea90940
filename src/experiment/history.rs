//! The history check, Jepsen-style and small: one register in etcd, written by
//! one writer with increasing values (1, 2, 3, ... one per attempt) and read by
//! linearizable gets. Every operation's invoke and completion times are recorded;
//! the check then looks for what a linearizable register can never show:
//!
//! - a **lost write**: the final value is older than the last acknowledged write;
//! - a **stale read**: a read returns a value older than a write acknowledged, or a
//!   value read, before the read began (reads never go backwards);
//! - a **read from nowhere**: a value no write had been invoked for when the read
//!   completed.
//!
//! Writes whose outcome is unknown (a timeout, a connection cut mid-request) are
//! *indeterminate*: they may or may not have taken effect. They are counted and
//! shown, and allowed either way, never counted as failures of the check. A
//! deliberate rewind (a checkpoint restore in the middle of a run) starts a new
//! epoch: the register is back to what the checkpoint held (never written by this
//! run), and operations that straddle the rewind are left out.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Ok,
    /// Known not to have taken effect (refused before it was sent).
    Fail,
    /// Unknown: it may have taken effect.
    Indeterminate,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Op {
    pub kind: OpKind,
    pub invoke_s: f64,
    pub complete_s: f64,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum OpKind {
    /// The value written.
    Write { value: u64 },
    /// The value read (0 = the register was never written).
    Read { value: u64 },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Anomaly {
    pub kind: String,
    /// When the offending operation began; `None` for the final read-back.
    pub at_s: Option<f64>,
    pub what: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// `ok`, or `anomalies`.
    pub verdict: String,
    pub writes: usize,
    pub acknowledged: usize,
    pub failed: usize,
    pub indeterminate: usize,
    pub reads: usize,
    pub reads_ok: usize,
    /// Operations left out because they straddle a rewind.
    pub straddling_rewinds: usize,
    pub rewinds: Vec<(f64, f64)>,
    pub last_acknowledged: Option<u64>,
    /// The value read back at the end, `None` when it could not be read.
    pub final_value: Option<u64>,
    pub anomalies: Vec<Anomaly>,
}

impl Verdict {
    pub fn ok(&self) -> bool {
        self.anomalies.is_empty()
    }
}

/// Check a history (pure). `rewinds` are `(start, end)` of each deliberate rewind;
/// `final_value` is the register read back after the run (`None`: unreadable).
pub fn check(ops: &[Op], rewinds: &[(f64, f64)], final_value: Option<u64>) -> Verdict {
    let mut anomalies = Vec::new();
    let writes: Vec<&Op> = ops
        .iter()
        .filter(|o| matches!(o.kind, OpKind::Write { .. }))
        .collect();
    let reads: Vec<&Op> = ops
        .iter()
        .filter(|o| matches!(o.kind, OpKind::Read { .. }))
        .collect();
    let count = |o: Outcome| writes.iter().filter(|w| w.outcome == o).count();
    // Epoch boundaries: the end of each rewind starts a new epoch.
    let mut bounds: Vec<f64> = vec![f64::NEG_INFINITY];
    let mut sorted = rewinds.to_vec();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    for (_, end) in &sorted {
        bounds.push(*end);
    }
    let epoch_of = |o: &Op| -> Option<usize> {
        for (i, (start, end)) in sorted.iter().enumerate() {
            // Straddles the rewind (or runs during it).
            if o.invoke_s < *end && o.complete_s > *start {
                let _ = i;
                return None;
            }
        }
        Some(bounds.iter().rposition(|b| o.invoke_s >= *b).unwrap_or(0))
    };
    let straddling = ops.iter().filter(|o| epoch_of(o).is_none()).count();
    let value = |o: &Op| match o.kind {
        OpKind::Write { value } | OpKind::Read { value } => value,
    };
    let epochs = bounds.len();
    let mut last_epoch_acked: Option<u64> = None;
    let mut last_epoch_max_invoked: u64 = 0;
    for e in 0..epochs {
        let ws: Vec<&Op> = writes
            .iter()
            .copied()
            .filter(|o| epoch_of(o) == Some(e))
            .collect();
        let rs: Vec<&Op> = reads
            .iter()
            .copied()
            .filter(|o| epoch_of(o) == Some(e) && o.outcome == Outcome::Ok)
            .collect();
        for r in &rs {
            let v = value(r);
            // What must be visible: acknowledged writes and reads completed before
            // this read began.
            let floor_w = ws
                .iter()
                .filter(|w| w.outcome == Outcome::Ok && w.complete_s < r.invoke_s)
                .map(|w| value(w))
                .max();
            let floor_r = rs
                .iter()
                .filter(|o| o.complete_s < r.invoke_s)
                .map(|o| (value(o), o.invoke_s))
                .max_by_key(|(v, _)| *v);
            if let Some(fw) = floor_w {
                if v < fw {
                    anomalies.push(Anomaly {
                        kind: "stale-read".into(),
                        at_s: Some(r.invoke_s),
                        what: format!(
                            "the read at {:.2} s returned {v}, but the write of {fw} was acknowledged before it began",
                            r.invoke_s
                        ),
                    });
                    continue;
                }
            }
            if let Some((fr, at)) = floor_r {
                if v < fr {
                    anomalies.push(Anomaly {
                        kind: "stale-read".into(),
                        at_s: Some(r.invoke_s),
                        what: format!(
                            "the read at {:.2} s returned {v}, older than {fr} read at {at:.2} s: reads went backwards",
                            r.invoke_s
                        ),
                    });
                    continue;
                }
            }
            let ceiling = ws
                .iter()
                .filter(|w| w.invoke_s < r.complete_s)
                .map(|w| value(w))
                .max()
                .unwrap_or(0);
            if v > ceiling {
                anomalies.push(Anomaly {
                    kind: "read-from-nowhere".into(),
                    at_s: Some(r.invoke_s),
                    what: format!(
                        "the read at {:.2} s returned {v}, which no write had been sent for",
                        r.invoke_s
                    ),
                });
            }
        }
        if e == epochs - 1 {
            last_epoch_acked = ws
                .iter()
                .filter(|w| w.outcome == Outcome::Ok)
                .map(|w| value(w))
                .max();
            last_epoch_max_invoked = ws.iter().map(|w| value(w)).max().unwrap_or(0);
        }
    }
    if let (Some(fin), Some(acked)) = (final_value, last_epoch_acked) {
        if fin < acked {
            anomalies.push(Anomaly {
                kind: "lost-write".into(),
                at_s: None,
                what: format!(
                    "the register ends at {fin}, but the write of {acked} was acknowledged"
                ),
            });
        }
    }
    if let Some(fin) = final_value {
        if fin > last_epoch_max_invoked && !writes.is_empty() {
            anomalies.push(Anomaly {
                kind: "read-from-nowhere".into(),
                at_s: None,
                what: format!("the register ends at {fin}, which no write had been sent for"),
            });
        }
    }
    Verdict {
        verdict: if anomalies.is_empty() {
            "ok".into()
        } else {
            "anomalies".into()
        },
        writes: writes.len(),
        acknowledged: count(Outcome::Ok),
        failed: count(Outcome::Fail),
        indeterminate: count(Outcome::Indeterminate),
        reads: reads.len(),
        reads_ok: reads.iter().filter(|r| r.outcome == Outcome::Ok).count(),
        straddling_rewinds: straddling,
        rewinds: sorted,
        last_acknowledged: writes
            .iter()
            .filter(|w| w.outcome == Outcome::Ok)
            .map(|w| value(w))
            .max(),
        final_value,
        anomalies,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(v: u64, a: f64, b: f64, o: Outcome) -> Op {
        Op {
            kind: OpKind::Write { value: v },
            invoke_s: a,
            complete_s: b,
            outcome: o,
        }
    }
    fn r(v: u64, a: f64, b: f64) -> Op {
        Op {
            kind: OpKind::Read { value: v },
            invoke_s: a,
            complete_s: b,
            outcome: Outcome::Ok,
        }
    }

    #[test]
    fn a_clean_history_passes() {
        let ops = vec![
            w(1, 0.0, 0.1, Outcome::Ok),
            r(1, 0.2, 0.3),
            w(2, 0.4, 0.5, Outcome::Ok),
            r(2, 0.6, 0.7),
        ];
        let v = check(&ops, &[], Some(2));
        assert!(v.ok(), "{v:?}");
        assert_eq!((v.writes, v.acknowledged, v.reads_ok), (2, 2, 2));
    }

    #[test]
    fn a_read_may_see_a_concurrent_or_indeterminate_write_or_not() {
        let ops = vec![
            w(1, 0.0, 0.1, Outcome::Ok),
            w(2, 0.2, 1.2, Outcome::Indeterminate),
            r(1, 0.3, 0.4),
            r(2, 0.5, 0.6),
            w(3, 1.3, 1.4, Outcome::Fail),
        ];
        let v = check(&ops, &[], Some(2));
        assert!(v.ok(), "{v:?}");
        assert_eq!((v.failed, v.indeterminate), (1, 1));
    }

    #[test]
    fn stale_reads_lost_writes_and_reads_from_nowhere_are_found() {
        let ops = vec![
            w(1, 0.0, 0.1, Outcome::Ok),
            w(2, 0.2, 0.3, Outcome::Ok),
            r(1, 0.4, 0.5),
        ];
        let v = check(&ops, &[], Some(2));
        assert_eq!(v.anomalies.len(), 1, "{v:?}");
        assert_eq!(v.anomalies[0].kind, "stale-read");

        // The write's outcome is unknown, so only the first read pins it down.
        let ops = vec![
            w(1, 0.0, 0.1, Outcome::Indeterminate),
            r(1, 0.2, 0.3),
            r(0, 0.4, 0.5),
        ];
        let v = check(&ops, &[], Some(1));
        assert_eq!(v.anomalies[0].kind, "stale-read", "{v:?}");
        assert!(v.anomalies[0].what.contains("backwards"));

        let ops = vec![w(1, 0.0, 0.1, Outcome::Ok), w(2, 0.2, 0.3, Outcome::Ok)];
        let v = check(&ops, &[], Some(1));
        assert_eq!(v.anomalies[0].kind, "lost-write", "{v:?}");

        let ops = vec![w(1, 0.0, 0.1, Outcome::Ok), r(5, 0.2, 0.3)];
        let v = check(&ops, &[], Some(1));
        assert_eq!(v.anomalies[0].kind, "read-from-nowhere", "{v:?}");
    }

    #[test]
    fn a_rewind_starts_a_new_epoch() {
        // Before the rewind the register reached 2; the checkpoint never saw this
        // run's register, so after it reads 0 and writes start over from what the
        // writer sends next.
        let ops = vec![
            w(1, 0.0, 0.1, Outcome::Ok),
            w(2, 0.2, 0.3, Outcome::Ok),
            w(3, 0.9, 3.0, Outcome::Indeterminate),
            r(0, 5.2, 5.3),
            w(4, 5.4, 5.5, Outcome::Ok),
            r(4, 5.6, 5.7),
        ];
        let v = check(&ops, &[(1.0, 5.0)], Some(4));
        assert!(v.ok(), "{v:?}");
        assert_eq!(v.straddling_rewinds, 1);
        // Without the rewind mark the same history is an anomaly.
        assert!(!check(&ops, &[], Some(4)).ok());
    }
}
