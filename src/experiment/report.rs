//! An experiment run's report: what ran when, every probe sample, the metrics per
//! probe and per step window, the history verdict, the expectations; and its two
//! human forms besides the JSON: the terminal summary and (in `chart`) the SVG.
//! Everything here is pure: a report in, text out.

use serde::{Deserialize, Serialize};

/// One probe sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// When the sample began, seconds from the run's start.
    pub t_s: f64,
    pub ok: bool,
    pub latency_ms: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What it saw: the value written or read, the leader, the backends up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// Which endpoint (node) answered or was asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// A failed write whose effect is unknown (a timeout).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub indeterminate: bool,
}

impl Sample {
    /// A sample of 5 ms with nothing else to say (tests and examples).
    pub fn bare(t_s: f64, ok: bool) -> Sample {
        Sample {
            t_s,
            ok,
            latency_ms: 5.0,
            error: None,
            value: None,
            endpoint: None,
            indeterminate: false,
        }
    }
}

/// Metrics of one probe over one window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowStats {
    pub window: String,
    pub from_s: f64,
    pub to_s: f64,
    pub samples: usize,
    /// Share of ok samples; `None` without samples.
    pub availability: Option<f64>,
    pub longest_outage_s: f64,
    /// From the window's start until the probe was ok again after its last failure
    /// in the window (0 when it never failed there; `None` when it never recovered).
    pub recovery_s: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// How often the observed value changed (leaders, backends; `None` for probes
    /// whose value is no state).
    pub changes: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeReport {
    pub kind: String,
    /// The node a tcp or ping probe was pointed at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    pub every_s: f64,
    pub timeout_s: f64,
    pub availability: Option<f64>,
    pub longest_outage_s: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub windows: Vec<WindowStats>,
    pub samples: Vec<Sample>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    pub index: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub action: String,
    /// The step as the file wrote it (selectors unresolved).
    pub written: String,
    /// The nodes its selectors resolved to when it ran.
    pub nodes: Vec<String>,
    pub planned_t_s: f64,
    pub actual_t_s: f64,
    pub end_t_s: f64,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExpectReport {
    pub clause: String,
    pub pass: bool,
    /// The measured value, when there is one.
    pub actual: Option<f64>,
    /// Set when the clause does not apply to this lab (its controller count).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub run_id: String,
    pub tool_version: String,
    /// Unix seconds.
    pub started: u64,
    pub experiment_file: String,
    pub experiment_sha256: String,
    pub scenario_sha256: String,
    pub plan_sha256: String,
    pub image: String,
    pub image_digest: Option<String>,
    pub versions: serde_json::Value,
    pub controllers: u32,
    pub workers: u32,
    pub checkpoint: Option<String>,
    pub host: HostFacts,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostFacts {
    pub kernel: String,
    pub cpus: usize,
    pub memory_mib: u64,
    pub accelerator: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExperimentInfo {
    pub name: String,
    pub description: String,
    pub duration_s: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub experiment: ExperimentInfo,
    pub lab: String,
    /// `completed`, or why the run could not complete.
    pub result: String,
    pub manifest: Manifest,
    pub steps: Vec<StepReport>,
    /// Keyed by probe name, in the file's order.
    pub probes: indexmap_like::OrderedMap<ProbeReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<super::history::Verdict>,
    /// Faults undone when the run ended (a fault the steps left in force).
    pub cleanup: Vec<String>,
    pub expect: Vec<ExpectReport>,
    /// Notable moments: leader changes, rewinds.
    pub events: Vec<Event>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub t_s: f64,
    pub what: String,
}

/// A JSON object whose keys keep their order (the probes in the file's order).
pub mod indexmap_like {
    use serde::de::{MapAccess, Visitor};
    use serde::ser::SerializeMap;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Debug, Clone, PartialEq, Default)]
    pub struct OrderedMap<V>(pub Vec<(String, V)>);

    impl<V> OrderedMap<V> {
        pub fn get(&self, k: &str) -> Option<&V> {
            self.0.iter().find(|(n, _)| n == k).map(|(_, v)| v)
        }
        pub fn iter(&self) -> impl Iterator<Item = (&String, &V)> {
            self.0.iter().map(|(k, v)| (k, v))
        }
        pub fn keys(&self) -> impl Iterator<Item = &String> {
            self.0.iter().map(|(k, _)| k)
        }
    }

    impl<V: Serialize> Serialize for OrderedMap<V> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut m = s.serialize_map(Some(self.0.len()))?;
            for (k, v) in &self.0 {
                m.serialize_entry(k, v)?;
            }
            m.end()
        }
    }

    impl<'de, V: Deserialize<'de>> Deserialize<'de> for OrderedMap<V> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V2<V>(std::marker::PhantomData<V>);
            impl<'de, V: Deserialize<'de>> Visitor<'de> for V2<V> {
                type Value = OrderedMap<V>;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("an object")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
                    let mut out = Vec::new();
                    while let Some((k, v)) = a.next_entry()? {
                        out.push((k, v));
                    }
                    Ok(OrderedMap(out))
                }
            }
            d.deserialize_map(V2(std::marker::PhantomData))
        }
    }
}

// Metrics ---------------------------------------------------------------------------

/// The `q` quantile (0..=1) of `v` by nearest rank (pure).
pub fn quantile(v: &[f64], q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    Some(s[rank - 1])
}

/// Metrics of `samples` whose start falls in `[from, to)` (pure). Outages are runs
/// of failed samples, measured from the first failure to the next ok sample (or
/// the window's end).
pub fn window_stats(name: &str, samples: &[Sample], from: f64, to: f64) -> WindowStats {
    let inside: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.t_s >= from && s.t_s < to)
        .collect();
    let ok = inside.iter().filter(|s| s.ok).count();
    let mut longest: f64 = 0.0;
    let mut down_since: Option<f64> = None;
    for s in &inside {
        match (s.ok, down_since) {
            (false, None) => down_since = Some(s.t_s),
            (true, Some(d)) => {
                longest = longest.max(s.t_s - d);
                down_since = None;
            }
            _ => {}
        }
    }
    if let Some(d) = down_since {
        // Until the next ok sample after the window, or the window's end.
        let end = samples
            .iter()
            .find(|s| s.t_s >= to && s.ok)
            .map(|s| s.t_s.min(to))
            .unwrap_or(to);
        longest = longest.max(end - d);
    }
    let last_fail = inside
        .iter()
        .filter(|s| !s.ok)
        .map(|s| s.t_s)
        .fold(None, |a: Option<f64>, t| Some(a.map_or(t, |a| a.max(t))));
    let recovery_s = match last_fail {
        None => Some(0.0),
        Some(lf) => samples
            .iter()
            .find(|s| s.t_s > lf && s.ok)
            .map(|s| s.t_s - from),
    };
    let lat: Vec<f64> = inside
        .iter()
        .filter(|s| s.ok)
        .map(|s| s.latency_ms)
        .collect();
    let mut changes = 0;
    let mut last: Option<&str> = samples
        .iter()
        .rev()
        .find(|s| s.t_s < from && s.ok)
        .and_then(|s| s.value.as_deref());
    for s in inside.iter().filter(|s| s.ok) {
        let v = s.value.as_deref();
        if last.is_some() && v != last {
            changes += 1;
        }
        if v.is_some() {
            last = v;
        }
    }
    WindowStats {
        window: name.to_string(),
        from_s: from,
        to_s: to,
        samples: inside.len(),
        availability: (!inside.is_empty()).then(|| ok as f64 / inside.len() as f64),
        longest_outage_s: longest,
        recovery_s,
        p50_ms: quantile(&lat, 0.5),
        p99_ms: quantile(&lat, 0.99),
        changes: Some(changes),
    }
}

/// The windows of a run (pure): `whole`, `before` (to the first step), and one per
/// step with an id, from its actual start to the next step's (or the end).
pub fn windows(steps: &[StepReport], duration: f64) -> Vec<(String, f64, f64)> {
    let mut out = vec![("whole".to_string(), 0.0, duration)];
    let first = steps.first().map(|s| s.actual_t_s).unwrap_or(duration);
    out.push(("before".to_string(), 0.0, first));
    for (i, s) in steps.iter().enumerate() {
        let end = steps.get(i + 1).map(|n| n.actual_t_s).unwrap_or(duration);
        if let Some(id) = &s.id {
            out.push((id.clone(), s.actual_t_s, end));
        }
    }
    out
}

/// The value of `metric` for a window, `None` when it has none.
pub fn metric_value(w: &WindowStats, metric: super::model::Metric) -> Option<f64> {
    use super::model::Metric;
    match metric {
        Metric::Availability => w.availability,
        Metric::LongestOutageS => Some(w.longest_outage_s),
        Metric::RecoveryS => w.recovery_s,
        Metric::P50Ms => w.p50_ms,
        Metric::P99Ms => w.p99_ms,
        Metric::Changes => w.changes.map(|c| c as f64),
        Metric::History => None,
    }
}

/// Check every expectation against the report (pure).
pub fn check_expectations(
    expect: &[super::model::Expect],
    report: &Report,
    controllers: u32,
) -> Vec<ExpectReport> {
    use super::model::Metric;
    expect
        .iter()
        .map(|x| {
            let clause = x.text();
            if !x.applies(controllers) {
                return ExpectReport {
                    clause,
                    pass: true,
                    actual: None,
                    skipped: Some(format!("not for a lab with {controllers} controller(s)")),
                };
            }
            if x.metric == Metric::History {
                let pass = report.history.as_ref().is_some_and(|h| h.ok());
                return ExpectReport {
                    clause,
                    pass,
                    actual: None,
                    skipped: None,
                };
            }
            let w = report
                .probes
                .get(&x.probe)
                .and_then(|p| p.windows.iter().find(|w| w.window == x.window));
            let actual = w.and_then(|w| metric_value(w, x.metric));
            let pass = actual
                .is_some_and(|a| x.min.is_none_or(|m| a >= m) && x.max.is_none_or(|m| a <= m));
            ExpectReport {
                clause,
                pass,
                actual,
                skipped: None,
            }
        })
        .collect()
}

// The terminal summary ------------------------------------------------------------------

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map(f).unwrap_or_else(|| "-".into())
}

/// One line per probe over the run: a cell per `cell_s` seconds, `█` all ok, `▒`
/// some failed, `░` all failed, ` ` no sample; step starts marked on a ruler above.
pub fn timeline(report: &Report, width: usize) -> String {
    let dur = report.experiment.duration_s.max(0.001);
    let width = width.max(10);
    let cell = dur / width as f64;
    let name_w = report
        .probes
        .keys()
        .map(|k| k.len())
        .max()
        .unwrap_or(4)
        .max(5);
    let mut out = String::new();
    let mut ruler: Vec<char> = vec!['─'; width];
    let mut labels = String::new();
    for s in &report.steps {
        let i = ((s.actual_t_s / cell) as usize).min(width - 1);
        ruler[i] = '┬';
        labels.push_str(&format!(
            "  {} at {:.1} s: {}{}\n",
            s.id.clone()
                .unwrap_or_else(|| format!("step {}", s.index + 1)),
            s.actual_t_s,
            s.written,
            if s.nodes.is_empty() {
                String::new()
            } else {
                format!(" -> {}", s.nodes.join(","))
            }
        ));
    }
    out.push_str(&format!(
        "{:name_w$}  {}  (one cell = {:.2} s)\n",
        "steps",
        ruler.iter().collect::<String>(),
        cell
    ));
    for (name, p) in report.probes.iter() {
        let mut line = String::new();
        for c in 0..width {
            let (a, b) = (c as f64 * cell, (c + 1) as f64 * cell);
            let in_cell: Vec<&Sample> = p
                .samples
                .iter()
                .filter(|s| s.t_s >= a && s.t_s < b)
                .collect();
            let oks = in_cell.iter().filter(|s| s.ok).count();
            // A cell no sample began in shows the one still in flight (a sample that
            // waits for its timeout spans several cells).
            let in_flight = p
                .samples
                .iter()
                .rev()
                .find(|s| s.t_s < a)
                .filter(|s| s.t_s + s.latency_ms / 1000.0 >= a);
            line.push(if in_cell.is_empty() {
                match in_flight {
                    Some(s) if s.ok => '█',
                    Some(_) => '░',
                    None => ' ',
                }
            } else if oks == in_cell.len() {
                '█'
            } else if oks == 0 {
                '░'
            } else {
                '▒'
            });
        }
        out.push_str(&format!("{name:name_w$}  {line}\n"));
    }
    out.push_str(&labels);
    out
}

pub fn summary(report: &Report) -> String {
    let mut out = format!(
        "experiment `{}` on lab `{}`: {} ({:.1} s{})\n",
        report.experiment.name,
        report.lab,
        report.result,
        report.experiment.duration_s,
        report
            .manifest
            .checkpoint
            .as_ref()
            .map(|c| format!(", from checkpoint `{c}`"))
            .unwrap_or_default()
    );
    out.push_str(&format!(
        "lab: {} controller(s), {} worker(s); run {}\n\n",
        report.manifest.controllers, report.manifest.workers, report.manifest.run_id
    ));
    let mut t = vec![vec![
        "STEP".to_string(),
        "PLANNED".into(),
        "AT".into(),
        "ACTION".into(),
        "NODES".into(),
        "RESULT".into(),
    ]];
    for s in &report.steps {
        t.push(vec![
            s.id.clone().unwrap_or_else(|| (s.index + 1).to_string()),
            format!("{:.1} s", s.planned_t_s),
            format!("{:.1} s", s.actual_t_s),
            s.written.clone(),
            if s.nodes.is_empty() {
                "-".into()
            } else {
                s.nodes.join(",")
            },
            match (&s.error, s.ok) {
                (Some(e), _) => format!("failed: {e}"),
                (None, true) => format!(
                    "ok ({:.1} s){}",
                    s.end_t_s - s.actual_t_s,
                    s.detail
                        .as_ref()
                        .map(|d| format!(": {d}"))
                        .unwrap_or_default()
                ),
                (None, false) => "failed".into(),
            },
        ]);
    }
    if report.steps.is_empty() {
        out.push_str("no steps\n");
    } else {
        out.push_str(&crate::plan::rows_to_text(&t));
    }
    out.push('\n');
    let mut t = vec![vec![
        "PROBE".to_string(),
        "WINDOW".into(),
        "SAMPLES".into(),
        "AVAILABLE".into(),
        "LONGEST OUTAGE".into(),
        "RECOVERY".into(),
        "P50".into(),
        "P99".into(),
        "CHANGES".into(),
    ]];
    for (name, p) in report.probes.iter() {
        for w in p
            .windows
            .iter()
            .filter(|w| w.window != "before" || w.samples > 0)
        {
            t.push(vec![
                if w.window == "whole" {
                    name.clone()
                } else {
                    String::new()
                },
                w.window.clone(),
                w.samples.to_string(),
                opt(w.availability, |a| format!("{:.1}%", a * 100.0)),
                format!("{:.1} s", w.longest_outage_s),
                step_recovery(w),
                opt(w.p50_ms, |v| format!("{v:.0} ms")),
                opt(w.p99_ms, |v| format!("{v:.0} ms")),
                w.changes.map(|c| c.to_string()).unwrap_or("-".into()),
            ]);
        }
    }
    out.push_str(&crate::plan::rows_to_text(&t));
    out.push('\n');
    out.push_str(&timeline(report, 60));
    if let Some(h) = &report.history {
        out.push_str(&format!(
            "\nhistory: {} ({} writes: {} acknowledged, {} failed, {} indeterminate; {} reads ok; last acknowledged {}, final value {}{})\n",
            h.verdict,
            h.writes,
            h.acknowledged,
            h.failed,
            h.indeterminate,
            h.reads_ok,
            h.last_acknowledged.map(|v| v.to_string()).unwrap_or("-".into()),
            h.final_value.map(|v| v.to_string()).unwrap_or("unreadable".into()),
            if h.rewinds.is_empty() {
                String::new()
            } else {
                format!("; {} rewind(s), {} operation(s) across them left out", h.rewinds.len(), h.straddling_rewinds)
            }
        ));
        for a in &h.anomalies {
            out.push_str(&format!("  anomaly {}: {}\n", a.kind, a.what));
        }
    }
    for e in &report.events {
        out.push_str(&format!("event at {:.1} s: {}\n", e.t_s, e.what));
    }
    if !report.cleanup.is_empty() {
        out.push_str(&format!(
            "left in force by the steps and undone at the end: {}\n",
            report.cleanup.join("; ")
        ));
    }
    if !report.expect.is_empty() {
        out.push_str("\nexpect\n");
        for x in &report.expect {
            out.push_str(&format!(
                "  {}  {}{}\n",
                match (&x.skipped, x.pass) {
                    (Some(_), _) => "skip",
                    (None, true) => "pass",
                    (None, false) => "FAIL",
                },
                x.clause,
                match (&x.skipped, x.actual) {
                    (Some(why), _) => format!(" ({why})"),
                    (None, Some(a)) => format!(" (measured {})", trim_num(a)),
                    (None, None) => String::new(),
                }
            ));
        }
    }
    out
}

/// Recovery is measured from a step: the windows that start with none show `-`, and
/// one whose probe never came back says so.
fn step_recovery(w: &WindowStats) -> String {
    if w.window == "whole" || w.window == "before" {
        return "-".into();
    }
    opt(w.recovery_s, |r| format!("{r:.1} s")).replace('-', "never")
}

fn trim_num(v: f64) -> String {
    if (v - v.round()).abs() < 1e-9 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

/// Two runs side by side: every probe window of either, with both values (pure).
pub fn compare(a: &Report, b: &Report) -> String {
    let mut out = format!(
        "A: {} `{}` on `{}` ({} controllers, {} workers){}\nB: {} `{}` on `{}` ({} controllers, {} workers){}\n\n",
        a.manifest.run_id,
        a.experiment.name,
        a.lab,
        a.manifest.controllers,
        a.manifest.workers,
        a.manifest.checkpoint.as_ref().map(|c| format!(", from `{c}`")).unwrap_or_default(),
        b.manifest.run_id,
        b.experiment.name,
        b.lab,
        b.manifest.controllers,
        b.manifest.workers,
        b.manifest.checkpoint.as_ref().map(|c| format!(", from `{c}`")).unwrap_or_default(),
    );
    let mut t = vec![vec![
        "PROBE".to_string(),
        "WINDOW".into(),
        "AVAILABLE A".into(),
        "AVAILABLE B".into(),
        "OUTAGE A".into(),
        "OUTAGE B".into(),
        "RECOVERY A".into(),
        "RECOVERY B".into(),
        "P99 A".into(),
        "P99 B".into(),
    ]];
    let mut names: Vec<&String> = a.probes.keys().collect();
    for k in b.probes.keys() {
        if !names.contains(&k) {
            names.push(k);
        }
    }
    for name in names {
        let (pa, pb) = (a.probes.get(name), b.probes.get(name));
        let mut wins: Vec<String> = Vec::new();
        for p in [pa, pb].into_iter().flatten() {
            for w in &p.windows {
                if !wins.contains(&w.window) {
                    wins.push(w.window.clone());
                }
            }
        }
        for (i, w) in wins.iter().enumerate() {
            let wa = pa.and_then(|p| p.windows.iter().find(|x| &x.window == w));
            let wb = pb.and_then(|p| p.windows.iter().find(|x| &x.window == w));
            let pct = |w: Option<&WindowStats>| {
                opt(w.and_then(|w| w.availability), |v| {
                    format!("{:.1}%", v * 100.0)
                })
            };
            let secs = |w: Option<&WindowStats>| {
                w.map(|w| format!("{:.1} s", w.longest_outage_s))
                    .unwrap_or("-".into())
            };
            let rec = |w: Option<&WindowStats>| w.map(step_recovery).unwrap_or("-".into());
            let p99 =
                |w: Option<&WindowStats>| opt(w.and_then(|w| w.p99_ms), |v| format!("{v:.0} ms"));
            t.push(vec![
                if i == 0 { name.clone() } else { String::new() },
                w.clone(),
                pct(wa),
                pct(wb),
                secs(wa),
                secs(wb),
                rec(wa),
                rec(wb),
                p99(wa),
                p99(wb),
            ]);
        }
    }
    out.push_str(&crate::plan::rows_to_text(&t));
    let verdict = |r: &Report| {
        r.history
            .as_ref()
            .map(|h| h.verdict.clone())
            .unwrap_or("-".into())
    };
    out.push_str(&format!("\nhistory: A {}, B {}\n", verdict(a), verdict(b)));
    let steps = |r: &Report| {
        r.steps
            .iter()
            .map(|s| format!("{} -> {}", s.written, s.nodes.join(",")))
            .collect::<Vec<_>>()
            .join("; ")
    };
    out.push_str(&format!("steps: A {}\n       B {}\n", steps(a), steps(b)));
    let passed = |r: &Report| {
        let applied: Vec<&ExpectReport> = r.expect.iter().filter(|x| x.skipped.is_none()).collect();
        format!(
            "{}/{}",
            applied.iter().filter(|x| x.pass).count(),
            applied.len()
        )
    };
    out.push_str(&format!(
        "expect passed: A {}, B {}\n",
        passed(a),
        passed(b)
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(t: f64, ok: bool) -> Sample {
        Sample {
            latency_ms: 10.0,
            ..Sample::bare(t, ok)
        }
    }

    #[test]
    fn outages_recovery_and_availability_of_a_window() {
        let samples: Vec<Sample> = (0..20)
            .map(|i| s(i as f64 * 0.5, !(6..10).contains(&i)))
            .collect();
        // Fails at 3.0, 3.5, 4.0, 4.5; ok again at 5.0.
        let w = window_stats("kill", &samples, 2.0, 8.0);
        assert_eq!(w.samples, 12);
        assert!((w.availability.unwrap() - 8.0 / 12.0).abs() < 1e-9);
        assert!((w.longest_outage_s - 2.0).abs() < 1e-9, "{w:?}");
        assert!((w.recovery_s.unwrap() - 3.0).abs() < 1e-9, "{w:?}");
        let calm = window_stats("before", &samples, 0.0, 2.0);
        assert_eq!(calm.recovery_s, Some(0.0));
        assert_eq!(calm.availability, Some(1.0));
    }

    #[test]
    fn an_outage_that_never_ends_has_no_recovery() {
        let samples: Vec<Sample> = (0..10).map(|i| s(i as f64, i < 5)).collect();
        let w = window_stats("w", &samples, 4.0, 10.0);
        assert_eq!(w.recovery_s, None);
        assert!((w.longest_outage_s - 5.0).abs() < 1e-9);
    }

    #[test]
    fn leader_changes_are_counted() {
        let mut v: Vec<Sample> = (0..6).map(|i| s(i as f64, true)).collect();
        for (i, l) in ["m1", "m1", "m2", "m2", "m3", "m3"].iter().enumerate() {
            v[i].value = Some(l.to_string());
        }
        assert_eq!(window_stats("w", &v, 0.0, 6.0).changes, Some(2));
        // A window counts the change its first sample shows against the one before.
        assert_eq!(window_stats("w", &v, 2.0, 6.0).changes, Some(2));
        assert_eq!(window_stats("w", &v, 3.0, 6.0).changes, Some(1));
    }

    #[test]
    fn quantiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(|i| i as f64).collect();
        assert_eq!(quantile(&v, 0.5), Some(50.0));
        assert_eq!(quantile(&v, 0.99), Some(99.0));
        assert_eq!(quantile(&[], 0.5), None);
    }
}
