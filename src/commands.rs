//! What each subcommand does, given a parsed command line.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::CommandFactory;

use crate::cli::{Cli, Command, Output};
use crate::error::{Error, Result};
use crate::scenario::{self, HostLimits};

pub fn run(cli: Cli) -> Result<()> {
    let state_dir = cli
        .state_dir
        .clone()
        .unwrap_or_else(crate::state::default_state_dir);
    match cli.command {
        Command::Plan { scenario, output } => cmd_plan(&scenario, output, &state_dir),
        Command::Completions { shell } => {
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "kthw-lab", &mut std::io::stdout());
            Ok(())
        }
        Command::Create { .. } => not_yet("create", 8),
        Command::Destroy { .. } => not_yet("destroy", 8),
        Command::Recreate { .. } => not_yet("recreate", 8),
        Command::Reset { .. } => not_yet("reset", 8),
        Command::Start { .. } => not_yet("start", 8),
        Command::Stop { .. } => not_yet("stop", 8),
        Command::List { .. } => not_yet("list", 8),
        Command::Status { .. } => not_yet("status", 8),
        Command::Ssh { .. } => not_yet("ssh", 8),
        Command::Kubeconfig { .. } => not_yet("kubeconfig", 5),
        Command::Logs { .. } => not_yet("logs", 8),
        Command::Lb { .. } => not_yet("lb", 6),
        Command::Image { .. } => not_yet("image", 4),
        Command::Certs { .. } => not_yet("certs", 5),
        Command::Cache { .. } => not_yet("cache", 7),
    }
}

fn not_yet(command: &str, issue: u32) -> Result<()> {
    Err(Error::NotAvailable {
        what: format!("`kthw-lab {command}`"),
        hint: format!(
            "it is being built (tracked as issue {issue}); `kthw-lab plan SCENARIO` works today"
        ),
    })
}

/// Host limits for validation, read from the running kernel.
pub fn host_limits() -> Result<HostLimits> {
    let memory_mib = crate::host::facts::memory_mib()
        .map_err(|e| Error::with_source("cannot read the host's memory size", e))?;
    Ok(HostLimits { memory_mib })
}

/// Load, validate and plan a scenario file.
pub fn load_plan(path: &Path, state_dir: &Path) -> Result<crate::plan::LabPlan> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Other {
        what: format!("cannot read scenario {}", path.display()),
        hint: Some("give the path of a scenario file, e.g. scenarios/2m2w.yaml".into()),
        source: Some(Box::new(e)),
    })?;
    let label = path.display().to_string();
    let sc = scenario::load_str(
        &text,
        &label,
        &scenario::Sources::for_scenario(path),
        &host_limits()?,
    )?;
    Ok(crate::plan::plan(&sc, &text, &absolute(state_dir)))
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_path_buf())
    }
}

fn cmd_plan(path: &Path, output: Output, state_dir: &Path) -> Result<()> {
    let plan = load_plan(path, state_dir)?;
    let text = match output {
        Output::Table => crate::plan::render_table(&plan),
        Output::Json => plan.to_json(),
        Output::Yaml => yaml_serde::to_string(&plan)
            .map_err(|e| Error::with_source("cannot render the plan as YAML", e))?,
    };
    let mut out = std::io::stdout().lock();
    // A closed pipe (e.g. `| head`) is not an error worth reporting.
    let _ = out.write_all(text.as_bytes());
    Ok(())
}
