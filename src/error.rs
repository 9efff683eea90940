//! The tool's top-level error: each variant maps to a documented exit code and
//! carries the hints printed under the cause chain.

use crate::scenario::ScenarioError;

/// Documented exit codes (see README).
pub mod exit {
    pub const OTHER: i32 = 1;
    pub const BAD_SCENARIO: i32 = 2;
    pub const PREFLIGHT: i32 = 3;
    pub const LAB_EXISTS: i32 = 4;
    pub const HOST_PROVISIONING: i32 = 10;
    pub const BOOT_TIMEOUT: i32 = 11;
    pub const BOOTSTRAP: i32 = 12;
    /// Stopped by Ctrl-C (128 + SIGINT).
    pub const INTERRUPTED: i32 = 130;
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The diagnostics are printed by `report`, one per line.
    #[error("invalid scenario {}: {} problem{}", .0.file, .0.diagnostics.len(), if .0.diagnostics.len() == 1 { "" } else { "s" })]
    Scenario(ScenarioError),
    /// Every failed host check; printed one per line by `report`.
    #[error("preflight failed: the host is not ready for this lab ({} problem{})", problems.len(), if problems.len() == 1 { "" } else { "s" })]
    Preflight {
        problems: Vec<String>,
        hints: Vec<String>,
    },
    #[error("lab `{lab}` already exists with a different scenario")]
    LabExists { lab: String, hint: String },
    #[error("host provisioning failed: {what}")]
    Provision {
        what: String,
        hint: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    #[error("node did not come up: {what}")]
    Boot { what: String, hint: String },
    #[error("bootstrap failed: {what}")]
    Bootstrap {
        what: String,
        hint: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    #[error("{what} is not available yet in this version")]
    NotAvailable { what: String, hint: String },
    #[error("{what}")]
    Usage { what: String, hint: String },
    #[error("interrupted during phase `{phase}`")]
    Interrupted { phase: String },
    /// The test hook `KTHW_LAB_INJECT_FAULT` failed this phase on purpose.
    #[error("injected fault: phase `{phase}` failed on purpose after its work was done (KTHW_LAB_INJECT_FAULT)")]
    InjectedFault { phase: String },
    #[error("phase `{phase}` of lab `{lab}` failed")]
    Phase {
        phase: String,
        lab: String,
        #[source]
        source: Box<Error>,
    },
    #[error("{what}")]
    Other {
        what: String,
        hint: Option<String>,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

impl From<ScenarioError> for Error {
    fn from(e: ScenarioError) -> Self {
        Error::Scenario(e)
    }
}

impl Error {
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Scenario(_) => exit::BAD_SCENARIO,
            Error::Preflight { .. } => exit::PREFLIGHT,
            Error::LabExists { .. } => exit::LAB_EXISTS,
            Error::Provision { .. } => exit::HOST_PROVISIONING,
            Error::Boot { .. } => exit::BOOT_TIMEOUT,
            Error::Bootstrap { .. } => exit::BOOTSTRAP,
            Error::NotAvailable { .. } | Error::Other { .. } | Error::InjectedFault { .. } => {
                exit::OTHER
            }
            Error::Usage { .. } => exit::BAD_SCENARIO,
            Error::Interrupted { .. } => exit::INTERRUPTED,
            Error::Phase { source, .. } => source.exit_code(),
        }
    }

    pub fn hints(&self) -> Vec<String> {
        match self {
            Error::Scenario(_) => {
                vec!["fix the fields above and run again; nothing on the host was changed".into()]
            }
            Error::Preflight { hints, .. } => hints.clone(),
            Error::LabExists { hint, .. }
            | Error::Provision { hint, .. }
            | Error::Boot { hint, .. }
            | Error::Bootstrap { hint, .. }
            | Error::NotAvailable { hint, .. }
            | Error::Usage { hint, .. } => vec![hint.clone()],
            Error::Interrupted { .. } => vec![
                "run the same command again to resume; `kthw-lab destroy LAB` removes everything the lab made so far".into(),
            ],
            Error::Phase { lab, source, .. } => {
                let mut h = source.hints();
                h.push(format!(
                    "after fixing the cause, run the same command again to resume; `kthw-lab destroy {lab}` removes everything the lab made so far"
                ));
                h
            }
            Error::Other { hint, .. } => hint.iter().cloned().collect(),
            Error::InjectedFault { .. } => {
                vec!["unset KTHW_LAB_INJECT_FAULT; it is a test hook".into()]
            }
        }
    }

    pub fn other(what: impl Into<String>) -> Error {
        Error::Other {
            what: what.into(),
            hint: None,
            source: None,
        }
    }

    pub fn with_source(
        what: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Error {
        Error::Other {
            what: what.into(),
            hint: None,
            source: Some(Box::new(source)),
        }
    }

    /// The error followed by its causes, one per line, then the hints.
    pub fn report(&self) -> String {
        let mut out = format!("error: {self}\n");
        if let Error::Scenario(e) = self {
            for d in &e.diagnostics {
                out.push_str(&format!("  {d}\n"));
            }
        }
        if let Error::Preflight { problems, .. } = self {
            for p in problems {
                out.push_str(&format!("  {p}\n"));
            }
        }
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            out.push_str(&format!("  caused by: {c}\n"));
            cause = c.source();
        }
        for h in self.hints() {
            out.push_str(&format!("hint: {h}\n"));
        }
        out
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
