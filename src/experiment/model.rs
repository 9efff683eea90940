//! An experiment file: what it requires of a lab, the probes sampled on a timeline,
//! the steps (faults) on a schedule, and the expectations the report checks.
//!
//! Decoded like scenarios: every problem is collected with `file:line:col` and the
//! field path, unknown keys included, before anything touches the lab.

use serde::Serialize;

use crate::actions::Phase;
use crate::scenario::decode::{parse_document, Ctx, Diagnostic, FromNode, MapReader};
use crate::scenario::yaml::{Kind, Node};

/// A time span written `200ms`, `1.5s`, `2m` or a plain number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Serialize)]
pub struct Secs(pub f64);

impl Secs {
    pub fn duration(self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.0.max(0.0))
    }
}

/// Parse `200ms`, `1.5s`, `2m`, `90` (seconds) (pure).
pub fn parse_secs(text: &str) -> Option<f64> {
    let t = text.trim();
    let (num, mul) = if let Some(n) = t.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else {
        (t, 1.0)
    };
    let v: f64 = num.trim().parse().ok()?;
    (v.is_finite() && v >= 0.0).then_some(v * mul)
}

impl FromNode for Secs {
    fn from_node(node: &Node, path: &str, cx: &mut Ctx) -> Option<Self> {
        cx.record(path, node.pos);
        let text = match &node.kind {
            Kind::Scalar { text, .. } if !node.is_null() => text.clone(),
            _ => {
                cx.error(
                    node.pos,
                    path,
                    format!(
                        "expected a time like 500ms or 20s, found {}",
                        node.kind_name()
                    ),
                );
                return None;
            }
        };
        match parse_secs(&text) {
            Some(v) => Some(Secs(v)),
            None => {
                cx.error(
                    node.pos,
                    path,
                    format!("expected a time like 500ms, 20s or 2m, found `{text}`"),
                );
                None
            }
        }
    }
}

/// A number that may have a fraction (availability, percent).
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Serialize)]
pub struct Num(pub f64);

impl FromNode for Num {
    fn from_node(node: &Node, path: &str, cx: &mut Ctx) -> Option<Self> {
        let text = String::from_node(node, path, cx)?;
        match text.trim().parse::<f64>() {
            Ok(v) if v.is_finite() => Some(Num(v)),
            _ => {
                cx.error(node.pos, path, format!("expected a number, found `{text}`"));
                None
            }
        }
    }
}

/// Which node a step or probe means, resolved when it runs: by name, by role and
/// index, by etcd role, or the node an earlier step chose.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub enum Selector {
    Name(String),
    Controller(u32),
    Worker(u32),
    EtcdLeader,
    EtcdFollower,
    /// The node(s) the step with this id acted on.
    Step(String),
    /// The node that holds a leader-election Lease in kube-system (the API's view).
    LeaseHolder(String),
    /// In a partition: every node not named in another group.
    Others,
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Selector::Name(n) => write!(f, "{n}"),
            Selector::Controller(i) => write!(f, "controller:{i}"),
            Selector::Worker(i) => write!(f, "worker:{i}"),
            Selector::EtcdLeader => f.write_str("etcd-leader"),
            Selector::EtcdFollower => f.write_str("etcd-follower"),
            Selector::Step(id) => write!(f, "step:{id}"),
            Selector::LeaseHolder(l) => write!(f, "lease-holder:{l}"),
            Selector::Others => f.write_str("others"),
        }
    }
}

impl From<Selector> for String {
    fn from(s: Selector) -> String {
        s.to_string()
    }
}

impl Selector {
    /// Parse a selector (pure); `Err` says what is accepted.
    pub fn parse(text: &str) -> Result<Selector, String> {
        let index = |s: &str| {
            s.parse::<u32>()
                .map_err(|_| format!("`{s}` is not an index"))
        };
        Ok(match text {
            "etcd-leader" => Selector::EtcdLeader,
            "etcd-follower" => Selector::EtcdFollower,
            "others" => Selector::Others,
            t if t.starts_with("controller:") => Selector::Controller(index(&t[11..])?),
            t if t.starts_with("worker:") => Selector::Worker(index(&t[7..])?),
            t if t.starts_with("step:") && !t[5..].is_empty() => Selector::Step(t[5..].into()),
            t if t.starts_with("lease-holder:") && !t[13..].is_empty() => {
                Selector::LeaseHolder(t[13..].into())
            }
            t if crate::scenario::validate::is_label(t, 63) => Selector::Name(t.into()),
            t => {
                return Err(format!(
                    "`{t}` is no node: use a node name, controller:N, worker:N, etcd-leader, etcd-follower, lease-holder:LEASE or step:ID"
                ))
            }
        })
    }

    pub fn is_selector(&self) -> bool {
        !matches!(self, Selector::Name(_))
    }
}

impl FromNode for Selector {
    fn from_node(node: &Node, path: &str, cx: &mut Ctx) -> Option<Self> {
        let text = String::from_node(node, path, cx)?;
        match Selector::parse(&text) {
            Ok(s) => Some(s),
            Err(e) => {
                cx.error(node.pos, path, e);
                None
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ProbeKind {
    /// A linearizable put of the next value of the run's register.
    EtcdWrite,
    /// A linearizable get of the run's register.
    EtcdRead,
    /// Which member leads, as the members report it.
    EtcdLeader,
    /// `GET /readyz` through the balancer.
    ApiReady,
    /// List nodes through the balancer.
    ApiList,
    /// Which node holds a leader-election Lease in kube-system (the controller-manager's
    /// or the scheduler's), through the balancer.
    ApiLease { lease: String },
    /// A TCP connect.
    Tcp { node: Selector, port: u16 },
    /// An ICMP echo to a node.
    Ping { node: Selector },
    /// The balancer's view of its backends.
    LbBackends,
}

impl ProbeKind {
    pub fn word(&self) -> &'static str {
        match self {
            ProbeKind::EtcdWrite => "etcd-write",
            ProbeKind::EtcdRead => "etcd-read",
            ProbeKind::EtcdLeader => "etcd-leader",
            ProbeKind::ApiReady => "api-ready",
            ProbeKind::ApiList => "api-list",
            ProbeKind::ApiLease { .. } => "api-lease",
            ProbeKind::Tcp { .. } => "tcp",
            ProbeKind::Ping { .. } => "ping",
            ProbeKind::LbBackends => "lb-backends",
        }
    }

    pub const WORDS: &'static [&'static str] = &[
        "etcd-write",
        "etcd-read",
        "etcd-leader",
        "api-ready",
        "api-list",
        "api-lease",
        "tcp",
        "ping",
        "lb-backends",
    ];

    /// Whether the probe's value is a state worth counting changes of.
    pub fn has_changes(&self) -> bool {
        matches!(
            self,
            ProbeKind::EtcdLeader | ProbeKind::LbBackends | ProbeKind::ApiLease { .. }
        )
    }

    pub fn needs_api(&self) -> bool {
        matches!(
            self,
            ProbeKind::ApiReady | ProbeKind::ApiList | ProbeKind::ApiLease { .. }
        )
    }

    pub fn needs_etcd(&self) -> bool {
        matches!(
            self,
            ProbeKind::EtcdWrite | ProbeKind::EtcdRead | ProbeKind::EtcdLeader
        )
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProbeSpec {
    pub name: String,
    #[serde(flatten)]
    pub kind: ProbeKind,
    pub every: Secs,
    pub timeout: Secs,
}

/// When a step runs: at an offset from the start, or after the previous step ended.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum When {
    At(Secs),
    After(Secs),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Action {
    /// SIGKILL the unit's processes; with `keep_down` systemd's restart is
    /// cancelled, so it stays down until a `start-unit`.
    KillUnit {
        node: Selector,
        unit: String,
        keep_down: bool,
    },
    StopUnit {
        node: Selector,
        unit: String,
    },
    StartUnit {
        node: Selector,
        unit: String,
    },
    /// Power off without a shutdown.
    CrashNode {
        node: Selector,
    },
    /// Start a node that is off (after a crash).
    StartNode {
        node: Selector,
    },
    PauseNode {
        node: Selector,
    },
    ResumeNode {
        node: Selector,
    },
    /// A clean reboot from inside the guest.
    RebootNode {
        node: Selector,
    },
    /// Drop traffic between the groups, on the lab bridge.
    Partition {
        groups: Vec<Vec<Selector>>,
    },
    Heal,
    /// netem on the node's tap device.
    Delay {
        node: Selector,
        ms: u32,
        jitter_ms: u32,
        loss_percent: f64,
    },
    ClearDelay {
        node: Selector,
    },
    LbBackend {
        node: Selector,
        enabled: bool,
    },
    /// A deliberate rewind: the whole lab back to a checkpoint, probes running.
    RestoreCheckpoint {
        checkpoint: String,
    },
    Wait,
}

impl Action {
    pub fn word(&self) -> &'static str {
        match self {
            Action::KillUnit { .. } => "kill-unit",
            Action::StopUnit { .. } => "stop-unit",
            Action::StartUnit { .. } => "start-unit",
            Action::CrashNode { .. } => "crash-node",
            Action::StartNode { .. } => "start-node",
            Action::PauseNode { .. } => "pause-node",
            Action::ResumeNode { .. } => "resume-node",
            Action::RebootNode { .. } => "reboot-node",
            Action::Partition { .. } => "partition",
            Action::Heal => "heal",
            Action::Delay { .. } => "delay",
            Action::ClearDelay { .. } => "clear-delay",
            Action::LbBackend { .. } => "lb-backend",
            Action::RestoreCheckpoint { .. } => "restore-checkpoint",
            Action::Wait => "wait",
        }
    }

    /// Every action and the fields it takes besides `id`, `at`/`after` and `action`.
    pub const FIELDS: &'static [(&'static str, &'static [&'static str])] = &[
        ("kill-unit", &["node", "unit", "keep_down"]),
        ("stop-unit", &["node", "unit"]),
        ("start-unit", &["node", "unit"]),
        ("crash-node", &["node"]),
        ("start-node", &["node"]),
        ("pause-node", &["node"]),
        ("resume-node", &["node"]),
        ("reboot-node", &["node"]),
        ("partition", &["groups"]),
        ("heal", &[]),
        ("delay", &["node", "ms", "jitter_ms", "loss_percent"]),
        ("clear-delay", &["node"]),
        ("lb-backend", &["node", "state"]),
        ("restore-checkpoint", &["checkpoint"]),
        ("wait", &[]),
    ];

    /// The node selectors the action names.
    pub fn selectors(&self) -> Vec<&Selector> {
        match self {
            Action::KillUnit { node, .. }
            | Action::StopUnit { node, .. }
            | Action::StartUnit { node, .. }
            | Action::CrashNode { node }
            | Action::StartNode { node }
            | Action::PauseNode { node }
            | Action::ResumeNode { node }
            | Action::RebootNode { node }
            | Action::Delay { node, .. }
            | Action::ClearDelay { node }
            | Action::LbBackend { node, .. } => vec![node],
            Action::Partition { groups } => groups.iter().flatten().collect(),
            Action::Heal | Action::RestoreCheckpoint { .. } | Action::Wait => Vec::new(),
        }
    }

    /// A short text for the report and the summary, with the selectors as written.
    pub fn describe(&self) -> String {
        match self {
            Action::KillUnit {
                node,
                unit,
                keep_down,
            } => format!(
                "kill-unit {unit} on {node}{}",
                if *keep_down { " (held down)" } else { "" }
            ),
            Action::StopUnit { node, unit } => format!("stop-unit {unit} on {node}"),
            Action::StartUnit { node, unit } => format!("start-unit {unit} on {node}"),
            Action::Partition { groups } => format!(
                "partition {}",
                groups
                    .iter()
                    .map(|g| format!(
                        "[{}]",
                        g.iter()
                            .map(|s| s.to_string())
                            .collect::<Vec<_>>()
                            .join(",")
                    ))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
            Action::Delay {
                node,
                ms,
                jitter_ms,
                loss_percent,
            } => crate::faults::delay_text(&node.to_string(), *ms, *jitter_ms, *loss_percent),
            Action::LbBackend { node, enabled } => format!(
                "lb-backend {node} {}",
                if *enabled { "enable" } else { "disable" }
            ),
            Action::RestoreCheckpoint { checkpoint } => {
                format!("restore-checkpoint {checkpoint}")
            }
            Action::Heal | Action::Wait => self.word().to_string(),
            a => format!("{} {}", a.word(), a.selectors()[0]),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Step {
    pub id: Option<String>,
    pub when: When,
    #[serde(flatten)]
    pub action: Action,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    Availability,
    LongestOutageS,
    RecoveryS,
    P50Ms,
    P99Ms,
    Changes,
    /// The history check of the etcd register passes (no min/max).
    History,
}

impl Metric {
    pub const WORDS: &'static [(&'static str, Metric)] = &[
        ("availability", Metric::Availability),
        ("longest_outage_s", Metric::LongestOutageS),
        ("recovery_s", Metric::RecoveryS),
        ("p50_ms", Metric::P50Ms),
        ("p99_ms", Metric::P99Ms),
        ("changes", Metric::Changes),
        ("history", Metric::History),
    ];

    pub fn word(self) -> &'static str {
        Metric::WORDS
            .iter()
            .find(|(_, m)| *m == self)
            .map(|(w, _)| *w)
            .unwrap_or("?")
    }
}

impl crate::scenario::decode::Keyword for Metric {
    const WORDS: &'static [(&'static str, Self)] = Metric::WORDS;
}

/// One expectation: a metric of a probe in a window, within bounds; optionally only
/// for labs with a given number of controllers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Expect {
    pub probe: String,
    /// `whole` (the default), `before` (up to the first step) or a step's id (from
    /// that step to the next one).
    pub window: String,
    pub metric: Metric,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub controllers_at_least: Option<u32>,
    pub controllers_at_most: Option<u32>,
}

impl Expect {
    /// The clause as a person reads it.
    pub fn text(&self) -> String {
        let mut s = if self.metric == Metric::History {
            format!("{}: history check passes", self.probe)
        } else {
            let mut b = Vec::new();
            if let Some(m) = self.min {
                b.push(format!(">= {m}"));
            }
            if let Some(m) = self.max {
                b.push(format!("<= {m}"));
            }
            format!(
                "{}: {} in {} {}",
                self.probe,
                self.metric.word(),
                match self.window.as_str() {
                    "whole" => "the whole run".to_string(),
                    "before" => "the window before the first step".to_string(),
                    w => format!("window `{w}`"),
                },
                b.join(" and ")
            )
        };
        match (self.controllers_at_least, self.controllers_at_most) {
            (Some(a), Some(b)) => s.push_str(&format!(" (labs with {a}-{b} controllers)")),
            (Some(a), None) => s.push_str(&format!(" (labs with {a}+ controllers)")),
            (None, Some(b)) => s.push_str(&format!(" (labs with at most {b} controllers)")),
            (None, None) => {}
        }
        s
    }

    pub fn applies(&self, controllers: u32) -> bool {
        self.controllers_at_least.is_none_or(|a| controllers >= a)
            && self.controllers_at_most.is_none_or(|b| controllers <= b)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Requires {
    pub phase: Phase,
    pub controllers: u32,
    pub workers: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Experiment {
    pub name: String,
    pub description: String,
    pub requires: Requires,
    pub from_checkpoint: Option<String>,
    pub duration: Secs,
    pub probes: Vec<ProbeSpec>,
    pub steps: Vec<Step>,
    pub expect: Vec<Expect>,
}

impl Experiment {
    /// The planned start of every step, in seconds from the run's start, as far as
    /// the file says (`after` counts from the previous step's planned start).
    pub fn planned(&self) -> Vec<f64> {
        let mut t = 0.0;
        self.steps
            .iter()
            .map(|s| {
                t = match s.when {
                    When::At(a) => a.0,
                    When::After(d) => t + d.0,
                };
                t
            })
            .collect()
    }

    /// The windows the file can name: `whole`, `before`, and each step id.
    pub fn window_names(&self) -> Vec<String> {
        let mut v = vec!["whole".to_string(), "before".to_string()];
        v.extend(self.steps.iter().filter_map(|s| s.id.clone()));
        v
    }
}

/// An experiment file that failed to load: every problem found.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{} problem{} in {file}", diagnostics.len(), if diagnostics.len() == 1 { "" } else { "s" })]
pub struct ExperimentFileError {
    pub file: String,
    pub diagnostics: Vec<Diagnostic>,
}

const TOP: &[&str] = &[
    "name",
    "description",
    "requires",
    "from_checkpoint",
    "duration",
    "probes",
    "steps",
    "expect",
];

/// Parse and validate experiment text; `label` names it in diagnostics.
pub fn load_str(text: &str, label: &str) -> Result<Experiment, ExperimentFileError> {
    let fail = |diagnostics: Vec<Diagnostic>| ExperimentFileError {
        file: label.to_string(),
        diagnostics,
    };
    let root = parse_document(text, label).map_err(|d| fail(vec![d]))?;
    let mut cx = Ctx::new(label);
    let exp = decode(&root, &mut cx);
    if let Some(e) = &exp {
        validate(e, &mut cx);
    }
    if cx.has_errors() || exp.is_none() {
        let mut d = cx.diagnostics;
        d.sort_by_key(|x| (x.line, x.col));
        return Err(fail(d));
    }
    Ok(exp.expect("checked above"))
}

fn decode(root: &Node, cx: &mut Ctx) -> Option<Experiment> {
    let mut m = MapReader::new(root, "", cx, TOP)?;
    let name: Option<String> = m.req("name", cx);
    let description: String = m.opt("description", cx).unwrap_or_default();
    let requires = read_requires(m.section("requires", cx), cx);
    let from_checkpoint: Option<String> = m.opt("from_checkpoint", cx);
    let duration: Option<Secs> = m.req("duration", cx);
    let probes = match m.section("probes", cx) {
        Some(n) => read_list(n, "probes", cx, read_probe),
        None => {
            cx.error_at_path("probes", "an experiment needs at least one probe");
            Vec::new()
        }
    };
    let steps = match m.section("steps", cx) {
        Some(n) => read_list(n, "steps", cx, read_step),
        None => Vec::new(),
    };
    let expect = match m.section("expect", cx) {
        Some(n) => read_list(n, "expect", cx, read_expect),
        None => Vec::new(),
    };
    m.finish(cx);
    Some(Experiment {
        name: name?,
        description,
        requires: requires?,
        from_checkpoint,
        duration: duration?,
        probes,
        steps,
        expect,
    })
}

fn read_list<T>(
    node: &Node,
    path: &str,
    cx: &mut Ctx,
    item: fn(&Node, &str, &mut Ctx) -> Option<T>,
) -> Vec<T> {
    cx.record(path, node.pos);
    match &node.kind {
        Kind::Seq(items) => items
            .iter()
            .enumerate()
            .filter_map(|(i, n)| item(n, &format!("{path}[{i}]"), cx))
            .collect(),
        _ => {
            cx.error(
                node.pos,
                path,
                format!("expected a list, found {}", node.kind_name()),
            );
            Vec::new()
        }
    }
}

fn read_requires(node: Option<&Node>, cx: &mut Ctx) -> Option<Requires> {
    let Some(node) = node else {
        cx.error_at_path(
            "requires",
            "missing required field `requires` (the phase and nodes the lab must have)",
        );
        return None;
    };
    let mut m = MapReader::new(node, "requires", cx, &["phase", "controllers", "workers"])?;
    let phase_text: Option<String> = m.req("phase", cx);
    let controllers = m.opt("controllers", cx).unwrap_or(1);
    let workers = m.opt("workers", cx).unwrap_or(0);
    m.finish(cx);
    let phase_text = phase_text?;
    let phase = Phase::ALL.into_iter().find(|p| p.name() == phase_text);
    let Some(phase) = phase else {
        cx.error_at_path(
            "requires.phase",
            format!(
                "`{phase_text}` is no phase (phases: {})",
                crate::actions::phase_list()
            ),
        );
        return None;
    };
    Some(Requires {
        phase,
        controllers,
        workers,
    })
}

const PROBE_FIELDS: &[&str] = &["name", "kind", "every", "timeout", "node", "port", "lease"];

fn read_probe(node: &Node, path: &str, cx: &mut Ctx) -> Option<ProbeSpec> {
    let mut m = MapReader::new(node, path, cx, PROBE_FIELDS)?;
    let kind: Option<String> = m.req("kind", cx);
    let name: Option<String> = m.opt("name", cx);
    let every: Secs = m.opt("every", cx).unwrap_or(Secs(0.25));
    let timeout: Secs = m.opt("timeout", cx).unwrap_or(Secs(1.0));
    let target: Option<Selector> = m.opt("node", cx);
    let port: Option<u16> = m.opt("port", cx);
    let lease: Option<String> = m.opt("lease", cx);
    m.finish(cx);
    if kind.as_deref() != Some("api-lease") && lease.is_some() {
        cx.error_at_path(
            &format!("{path}.lease"),
            format!(
                "probe kind `{}` takes no lease",
                kind.as_deref().unwrap_or("?")
            ),
        );
    }
    let kind_text = kind?;
    let wants_node = matches!(kind_text.as_str(), "tcp" | "ping");
    if !wants_node && target.is_some() {
        cx.error_at_path(
            &format!("{path}.node"),
            format!("probe kind `{kind_text}` takes no node"),
        );
    }
    if kind_text != "tcp" && port.is_some() {
        cx.error_at_path(
            &format!("{path}.port"),
            format!("probe kind `{kind_text}` takes no port"),
        );
    }
    let kind = match kind_text.as_str() {
        "etcd-write" => ProbeKind::EtcdWrite,
        "etcd-read" => ProbeKind::EtcdRead,
        "etcd-leader" => ProbeKind::EtcdLeader,
        "api-ready" => ProbeKind::ApiReady,
        "api-list" => ProbeKind::ApiList,
        "api-lease" => match lease {
            Some(lease) => ProbeKind::ApiLease { lease },
            None => {
                cx.error_at_path(
                    &format!("{path}.lease"),
                    "probe kind `api-lease` needs `lease` (kube-controller-manager or kube-scheduler)",
                );
                return None;
            }
        },
        "lb-backends" => ProbeKind::LbBackends,
        "tcp" | "ping" => {
            let Some(node) = target else {
                cx.error_at_path(
                    &format!("{path}.node"),
                    format!("probe kind `{kind_text}` needs `node`"),
                );
                return None;
            };
            if kind_text == "ping" {
                ProbeKind::Ping { node }
            } else {
                let Some(port) = port else {
                    cx.error_at_path(&format!("{path}.port"), "probe kind `tcp` needs `port`");
                    return None;
                };
                ProbeKind::Tcp { node, port }
            }
        }
        other => {
            cx.error_at_path(
                &format!("{path}.kind"),
                format!(
                    "`{other}` is no probe kind (kinds: {})",
                    ProbeKind::WORDS.join(", ")
                ),
            );
            return None;
        }
    };
    Some(ProbeSpec {
        name: name.unwrap_or_else(|| kind.word().to_string()),
        kind,
        every,
        timeout,
    })
}

const STEP_FIELDS: &[&str] = &[
    "id",
    "at",
    "after",
    "action",
    "node",
    "unit",
    "keep_down",
    "groups",
    "ms",
    "jitter_ms",
    "loss_percent",
    "state",
    "checkpoint",
];

fn read_step(node: &Node, path: &str, cx: &mut Ctx) -> Option<Step> {
    let mut m = MapReader::new(node, path, cx, STEP_FIELDS)?;
    let id: Option<String> = m.opt("id", cx);
    let at: Option<Secs> = m.opt("at", cx);
    let after: Option<Secs> = m.opt("after", cx);
    let action: Option<String> = m.req("action", cx);
    let when = match (at, after) {
        (Some(a), None) => Some(When::At(a)),
        (None, Some(a)) => Some(When::After(a)),
        (None, None) => {
            cx.error_at_path(
                path,
                "a step needs `at` (from the start) or `after` (the previous step)",
            );
            None
        }
        (Some(_), Some(_)) => {
            cx.error_at_path(&format!("{path}.after"), "give `at` or `after`, not both");
            None
        }
    };
    let action_word = action?;
    let Some((_, fields)) = Action::FIELDS.iter().find(|(w, _)| *w == action_word) else {
        let words: Vec<&str> = Action::FIELDS.iter().map(|(w, _)| *w).collect();
        cx.error_at_path(
            &format!("{path}.action"),
            format!(
                "`{action_word}` is no action (actions: {})",
                words.join(", ")
            ),
        );
        m.finish(cx);
        return None;
    };
    // Fields that exist but do not belong to this action.
    if let Kind::Map(entries) = &node.kind {
        for (k, _) in entries {
            let common = ["id", "at", "after", "action"].contains(&k.name.as_str());
            if !common
                && STEP_FIELDS.contains(&k.name.as_str())
                && !fields.contains(&k.name.as_str())
            {
                cx.error(
                    k.pos,
                    &format!("{path}.{}", k.name),
                    format!(
                        "action `{action_word}` takes no `{}` (it takes: {})",
                        k.name,
                        if fields.is_empty() {
                            "nothing more".to_string()
                        } else {
                            fields.join(", ")
                        }
                    ),
                );
            }
        }
    }
    let need_node = |m: &mut MapReader, cx: &mut Ctx| -> Option<Selector> { m.req("node", cx) };
    let need_unit = |m: &mut MapReader, cx: &mut Ctx| -> Option<String> { m.req("unit", cx) };
    let action = match action_word.as_str() {
        "kill-unit" => {
            let node = need_node(&mut m, cx);
            let unit = need_unit(&mut m, cx);
            let keep_down = m.opt("keep_down", cx).unwrap_or(true);
            Action::KillUnit {
                node: node?,
                unit: unit?,
                keep_down,
            }
        }
        "stop-unit" | "start-unit" => {
            let node = need_node(&mut m, cx);
            let unit = need_unit(&mut m, cx);
            let (node, unit) = (node?, unit?);
            if action_word == "stop-unit" {
                Action::StopUnit { node, unit }
            } else {
                Action::StartUnit { node, unit }
            }
        }
        "crash-node" => Action::CrashNode {
            node: need_node(&mut m, cx)?,
        },
        "start-node" => Action::StartNode {
            node: need_node(&mut m, cx)?,
        },
        "pause-node" => Action::PauseNode {
            node: need_node(&mut m, cx)?,
        },
        "resume-node" => Action::ResumeNode {
            node: need_node(&mut m, cx)?,
        },
        "reboot-node" => Action::RebootNode {
            node: need_node(&mut m, cx)?,
        },
        "partition" => {
            let groups: Option<Vec<Vec<Selector>>> = m.req("groups", cx);
            let groups = groups?;
            if groups.len() < 2 {
                cx.error_at_path(
                    &format!("{path}.groups"),
                    "a partition needs at least two groups, e.g. [[etcd-leader], [others]]",
                );
            }
            Action::Partition { groups }
        }
        "heal" => Action::Heal,
        "delay" => {
            let node = need_node(&mut m, cx);
            let ms: Option<u32> = m.req("ms", cx);
            let jitter_ms = m.opt("jitter_ms", cx).unwrap_or(0);
            let loss: Num = m.opt("loss_percent", cx).unwrap_or(Num(0.0));
            if !(0.0..=100.0).contains(&loss.0) {
                cx.error_at_path(
                    &format!("{path}.loss_percent"),
                    "loss_percent must be between 0 and 100",
                );
            }
            Action::Delay {
                node: node?,
                ms: ms?,
                jitter_ms,
                loss_percent: loss.0,
            }
        }
        "clear-delay" => Action::ClearDelay {
            node: need_node(&mut m, cx)?,
        },
        "lb-backend" => {
            let node = need_node(&mut m, cx);
            let state: Option<String> = m.req("state", cx);
            let enabled = match state.as_deref() {
                Some("enable") => Some(true),
                Some("disable") => Some(false),
                Some(other) => {
                    cx.error_at_path(
                        &format!("{path}.state"),
                        format!("`{other}` is not one of: enable, disable"),
                    );
                    None
                }
                None => None,
            };
            Action::LbBackend {
                node: node?,
                enabled: enabled?,
            }
        }
        "restore-checkpoint" => Action::RestoreCheckpoint {
            checkpoint: m.req("checkpoint", cx)?,
        },
        "wait" => Action::Wait,
        _ => unreachable!("checked against Action::FIELDS"),
    };
    m.finish(cx);
    Some(Step {
        id,
        when: when?,
        action,
    })
}

const EXPECT_FIELDS: &[&str] = &[
    "probe",
    "window",
    "metric",
    "min",
    "max",
    "controllers_at_least",
    "controllers_at_most",
];

fn read_expect(node: &Node, path: &str, cx: &mut Ctx) -> Option<Expect> {
    let mut m = MapReader::new(node, path, cx, EXPECT_FIELDS)?;
    let probe: Option<String> = m.req("probe", cx);
    let window: String = m.opt("window", cx).unwrap_or_else(|| "whole".into());
    let metric: Option<Metric> = match m.node("metric") {
        Some(n) => crate::scenario::decode::keyword(n, &format!("{path}.metric"), cx),
        None => {
            cx.error_at_path(&format!("{path}.metric"), "missing required field `metric`");
            None
        }
    };
    let min: Option<Num> = m.opt("min", cx);
    let max: Option<Num> = m.opt("max", cx);
    let controllers_at_least = m.opt("controllers_at_least", cx);
    let controllers_at_most = m.opt("controllers_at_most", cx);
    m.finish(cx);
    let metric = metric?;
    if metric == Metric::History && (min.is_some() || max.is_some()) {
        cx.error_at_path(path, "metric `history` takes no min or max");
    }
    if metric != Metric::History && min.is_none() && max.is_none() {
        cx.error_at_path(
            path,
            format!("metric `{}` needs `min` or `max`", metric.word()),
        );
    }
    Some(Expect {
        probe: probe?,
        window,
        metric,
        min: min.map(|n| n.0),
        max: max.map(|n| n.0),
        controllers_at_least,
        controllers_at_most,
    })
}

/// Checks across fields (pure).
fn validate(e: &Experiment, cx: &mut Ctx) {
    if !crate::scenario::validate::is_label(&e.name, 63) {
        cx.error_at_path(
            "name",
            format!(
                "`{}` is not a name: lowercase letters, digits and dashes",
                e.name
            ),
        );
    }
    if e.duration.0 <= 0.0 || e.duration.0 > 3600.0 {
        cx.error_at_path("duration", "duration must be more than 0 s and at most 1 h");
    }
    if let Some(c) = &e.from_checkpoint {
        if !crate::scenario::validate::is_label(c, 40) {
            cx.error_at_path("from_checkpoint", format!("`{c}` is not a checkpoint name"));
        }
    }
    if e.requires.controllers == 0 {
        cx.error_at_path(
            "requires.controllers",
            "an experiment needs at least 1 controller",
        );
    }
    let mut names: Vec<&str> = Vec::new();
    for (i, p) in e.probes.iter().enumerate() {
        let path = format!("probes[{i}]");
        if names.contains(&p.name.as_str()) {
            cx.error_at_path(
                &format!("{path}.name"),
                format!("probe name `{}` is used twice: give one a `name`", p.name),
            );
        }
        names.push(&p.name);
        if p.every.0 < 0.05 {
            cx.error_at_path(&format!("{path}.every"), "probes sample at most every 50ms");
        }
        if p.timeout.0 <= 0.0 || p.timeout.0 > 30.0 {
            cx.error_at_path(
                &format!("{path}.timeout"),
                "a sample's timeout must be more than 0 and at most 30s",
            );
        }
        if p.kind.needs_api() && e.requires.phase < Phase::ControlPlane {
            cx.error_at_path(
                &format!("{path}.kind"),
                format!(
                    "probe `{}` goes to the API, which exists from phase `control-plane`: set requires.phase to control-plane or later",
                    p.kind.word()
                ),
            );
        }
        if p.kind.needs_etcd() && e.requires.phase < Phase::Etcd {
            cx.error_at_path(
                &format!("{path}.kind"),
                format!(
                    "probe `{}` needs etcd, which exists from phase `etcd`: set requires.phase to etcd or later",
                    p.kind.word()
                ),
            );
        }
    }
    if e.probes.is_empty() && !cx.has_errors_at("probes") {
        cx.error_at_path("probes", "an experiment needs at least one probe");
    }
    // Steps: ids unique, step references to earlier ids, times in order and within
    // the duration.
    let planned = e.planned();
    let mut ids: Vec<&str> = Vec::new();
    for (i, s) in e.steps.iter().enumerate() {
        let path = format!("steps[{i}]");
        for sel in s.action.selectors() {
            match sel {
                Selector::Step(id) if !ids.contains(&id.as_str()) => cx.error_at_path(
                    &format!("{path}.node"),
                    format!(
                        "`step:{id}` names no earlier step (ids so far: {})",
                        if ids.is_empty() {
                            "none".to_string()
                        } else {
                            ids.join(", ")
                        }
                    ),
                ),
                Selector::LeaseHolder(_) if e.requires.phase < Phase::ControlPlane => cx
                    .error_at_path(
                        &format!("{path}.node"),
                        "`lease-holder:` asks the API, which exists from phase `control-plane`: set requires.phase to control-plane or later",
                    ),
                Selector::Others if !matches!(s.action, Action::Partition { .. }) => cx
                    .error_at_path(
                        &format!("{path}.node"),
                        "`others` is only for partition groups",
                    ),
                _ => {}
            }
        }
        if let Some(id) = &s.id {
            if ids.contains(&id.as_str()) || ["whole", "before"].contains(&id.as_str()) {
                cx.error_at_path(
                    &format!("{path}.id"),
                    format!("step id `{id}` is used twice or reserved (whole, before)"),
                );
            } else if !crate::scenario::validate::is_label(id, 40) {
                cx.error_at_path(
                    &format!("{path}.id"),
                    format!("`{id}` is not an id: lowercase letters, digits and dashes"),
                );
            }
            ids.push(id);
        }
        if i > 0 && planned[i] < planned[i - 1] {
            cx.error_at_path(
                &format!("{path}.at"),
                format!(
                    "this step is planned at {:.1} s, before the previous one ({:.1} s)",
                    planned[i],
                    planned[i - 1]
                ),
            );
        }
        if planned[i] >= e.duration.0 {
            cx.error_at_path(
                path.as_str(),
                format!(
                    "this step is planned at {:.1} s, not before the end of the run ({:.1} s)",
                    planned[i], e.duration.0
                ),
            );
        }
    }
    let windows = e.window_names();
    for (i, x) in e.expect.iter().enumerate() {
        let path = format!("expect[{i}]");
        let probe = e.probes.iter().find(|p| p.name == x.probe);
        match probe {
            None => cx.error_at_path(
                &format!("{path}.probe"),
                format!(
                    "no probe named `{}` (probes: {})",
                    x.probe,
                    names.join(", ")
                ),
            ),
            Some(p) => {
                if x.metric == Metric::History && p.kind != ProbeKind::EtcdWrite {
                    cx.error_at_path(
                        &format!("{path}.metric"),
                        "the history check is of an etcd-write probe",
                    );
                }
                if x.metric == Metric::Changes && !p.kind.has_changes() {
                    cx.error_at_path(
                        &format!("{path}.metric"),
                        "`changes` counts the changes of an etcd-leader or lb-backends probe",
                    );
                }
            }
        }
        if !windows.contains(&x.window) {
            cx.error_at_path(
                &format!("{path}.window"),
                format!("no window `{}` (windows: {})", x.window, windows.join(", ")),
            );
        }
    }
}
