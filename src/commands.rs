//! What each subcommand does, given a parsed command line.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::CommandFactory;

use crate::actions::{self, Cancel, Journal, Progress, Range, RunCtx, RunManifest, Runner};
use crate::cli::{Cli, Command, Output, StatusOutput};
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
        Command::Create {
            scenario,
            until,
            from,
            connect,
        } => cmd_create(
            &scenario,
            Range { from, until },
            &connect.connect,
            &state_dir,
        ),
        Command::Destroy {
            lab,
            purge_cache,
            connect,
        } => cmd_destroy(&lab, purge_cache, &connect.connect, &state_dir),
        Command::Recreate {
            scenario,
            until,
            connect,
        } => {
            let lab = load_plan(&scenario, &state_dir)?.lab;
            cmd_destroy(&lab, false, &connect.connect, &state_dir)?;
            cmd_create(
                &scenario,
                Range { from: None, until },
                &connect.connect,
                &state_dir,
            )
        }
        Command::Reset { lab, connect } => cmd_reset(&lab, &connect.connect, &state_dir),
        Command::Start { lab, connect } => cmd_start(&lab, &connect.connect, &state_dir),
        Command::Stop { lab, connect } => cmd_stop(&lab, &connect.connect, &state_dir),
        Command::List { output } => cmd_list(output, &state_dir),
        Command::Status {
            lab,
            output,
            connect,
        } => cmd_status(&lab, output, &connect.connect, &state_dir),
        Command::Ssh { lab, node, command } => cmd_ssh(&lab, &node, &command, &state_dir),
        Command::Kubeconfig { lab, write } => cmd_kubeconfig(&lab, write.as_deref(), &state_dir),
        Command::Logs { lab, node } => cmd_logs(&lab, &node, &state_dir),
        Command::Lb { command } => match command {
            crate::cli::LbCommand::Run { config } => {
                crate::lb::run_blocking(&config).map_err(actions::phases::lb_error)
            }
            crate::cli::LbCommand::Status { lab, output } => {
                cmd_lb_status(&lab, output, &state_dir)
            }
        },
        Command::Image { command } => cmd_image(command, &state_dir),
        Command::Checkpoint { command } => cmd_checkpoint(command, &state_dir),
        Command::Experiment { command } => cmd_experiment(command, &state_dir),
        Command::Certs {
            command: crate::cli::CertsCommand::Check { lab, output },
        } => cmd_certs_check(&lab, output, &state_dir),
        Command::Cache { command } => match command {
            crate::cli::CacheCommand::Import { dir } => cmd_cache_import(&dir, &state_dir),
        },
    }
}

/// Host limits for validation, read from the running kernel.
pub fn host_limits() -> Result<HostLimits> {
    let memory_mib = crate::host::facts::memory_mib()
        .map_err(|e| Error::with_source("cannot read the host's memory size", e))?;
    Ok(HostLimits { memory_mib })
}

/// Load, validate and plan a scenario file.
pub fn load_plan(path: &Path, state_dir: &Path) -> Result<crate::plan::LabPlan> {
    Ok(load_plan_text(path, state_dir)?.0)
}

/// The plan and the scenario text it came from.
pub fn load_plan_text(path: &Path, state_dir: &Path) -> Result<(crate::plan::LabPlan, String)> {
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
    let plan = crate::plan::plan(&sc, &text, &absolute(state_dir));
    Ok((plan, text))
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

/// The plan without the scenario's hash: two scenarios that plan the same lab
/// (comments, key order) are the same lab.
fn plan_identity(plan: &crate::plan::LabPlan) -> String {
    let mut p = plan.clone();
    p.scenario_sha256.clear();
    p.description = None;
    p.to_json()
}

/// The sha256 of the plan's identity: what the journal and checkpoints are
/// recorded against.
pub fn plan_sha(plan: &crate::plan::LabPlan) -> String {
    sha256_hex(&plan_identity(plan))
}

fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

fn cmd_create(path: &Path, range: Range, connect: &str, state_dir: &Path) -> Result<()> {
    let fault = actions::injected_fault_from_env()?;
    let state_dir = absolute(state_dir);
    let (plan, _text) = load_plan_text(path, &state_dir)?;
    let saved = crate::state::read_plan(&state_dir, &plan.lab).map_err(|e| {
        Error::with_source(
            format!("cannot read the saved plan of lab `{}`", plan.lab),
            e,
        )
    })?;
    if let Some(old) = &saved {
        if plan_identity(old) != plan_identity(&plan) {
            return Err(Error::LabExists {
                lab: plan.lab.clone(),
                hint: format!(
                    "`kthw-lab recreate {}` rebuilds it from this scenario; `kthw-lab destroy {}` removes it",
                    path.display(),
                    plan.lab
                ),
            });
        }
    }
    let others = crate::state::other_plans(&state_dir, &plan.lab);
    let mut findings = crate::host::preflight::check_host(&plan, &state_dir, &others);
    let needs = range.hypervisor_needs();
    findings.extend(crate::host::preflight::check_hypervisor(
        &plan, &state_dir, connect, needs,
    ));
    if !findings.is_empty() {
        let mut hints: Vec<String> = findings.iter().map(|f| f.hint.clone()).collect();
        hints.dedup();
        return Err(Error::Preflight {
            problems: findings
                .iter()
                .map(|f| format!("{}: {}", f.check, f.problem))
                .collect(),
            hints,
        });
    }
    crate::state::record_plan(&plan).map_err(|e| {
        Error::with_source(
            format!("cannot record the plan in {}", plan.paths.root.display()),
            e,
        )
    })?;
    let progress = Progress::new();
    let cancel = Cancel::new();
    cancel
        .install_signal_handlers()
        .map_err(|e| Error::with_source("cannot install the Ctrl-C handler", e))?;
    let opts = actions::phases::PhaseOptions {
        connect: connect.to_string(),
        state_dir: state_dir.clone(),
        catalog_roots: scenario::Sources::for_scenario(path).roots,
    };
    let runner = Runner::new(actions::phases::actions(&plan, &opts)).inject(fault);
    let plan_sha = sha256_hex(&plan_identity(&plan));
    let mut journal = Journal::open(&plan.paths.journal, &plan.lab, &plan_sha).map_err(|e| {
        Error::with_source(
            format!("cannot read the journal {}", plan.paths.journal.display()),
            e,
        )
    })?;
    let cx = RunCtx::new(&plan, progress.clone(), cancel);
    progress.println(&format!(
        "creating lab `{}` ({} nodes) from {}",
        plan.lab,
        plan.nodes.len(),
        path.display()
    ));
    let started = actions::journal::now_unix();
    let t0 = std::time::Instant::now();
    let (timings, result) = runner.run(&cx, &mut journal, range);
    if !timings.is_empty() {
        eprint!("\n{}", actions::render_timings(&timings));
    }
    let manifest = RunManifest {
        lab: plan.lab.clone(),
        command: "create".into(),
        started,
        seconds: t0.elapsed().as_secs_f64(),
        result: match &result {
            Ok(()) => "ok".into(),
            Err(e) => e.to_string(),
        },
        scenario_sha256: plan.scenario_sha256.clone(),
        plan_sha256: plan_sha,
        image: plan.image.clone(),
        versions: plan.versions.clone(),
        notes: cx.notes.lock().expect("notes lock").clone(),
        phases: timings,
    };
    let mpath = actions::manifest_path(&plan, started, "create");
    let mut json = serde_json::to_string_pretty(&manifest).expect("manifest serializes");
    json.push('\n');
    if let Err(e) = actions::journal::write_atomic(&mpath, json.as_bytes(), 0o600) {
        tracing::warn!("cannot write the run manifest {}: {e}", mpath.display());
    }
    result?;
    match range.until {
        Some(p) => eprintln!("lab `{}` is ready up to phase `{p}`", plan.lab),
        None => eprintln!("lab `{}` is ready", plan.lab),
    }
    Ok(())
}

/// One row per lab with a state dir: its network, nodes and how far it got.
fn cmd_list(output: StatusOutput, state_dir: &Path) -> Result<()> {
    #[derive(serde::Serialize)]
    struct Row {
        lab: String,
        nodes: usize,
        bridge: String,
        subnet: String,
        api: String,
        last_phase: Option<String>,
        state: String,
    }
    let names = crate::state::lab_names(state_dir).map_err(|e| {
        Error::with_source(format!("cannot list labs under {}", state_dir.display()), e)
    })?;
    let mut rows = Vec::new();
    for name in names {
        let Ok(Some(plan)) = crate::state::read_plan(state_dir, &name) else {
            rows.push(Row {
                lab: name,
                nodes: 0,
                bridge: "-".into(),
                subnet: "-".into(),
                api: "-".into(),
                last_phase: None,
                state: "no readable plan (destroy removes what is left)".into(),
            });
            continue;
        };
        let journal = Journal::read(&plan.paths.journal);
        let last = journal.as_ref().and_then(|j| j.phases.last().cloned());
        rows.push(Row {
            lab: plan.lab.clone(),
            nodes: plan.nodes.len(),
            bridge: plan.network.bridge.clone(),
            subnet: plan.network.subnet.to_string(),
            api: plan.load_balancer.endpoint.clone(),
            last_phase: last.as_ref().map(|r| r.phase.name().to_string()),
            state: last
                .map(|r| crate::plan::table::plain_word(&r.state))
                .unwrap_or_else(|| "planned".into()),
        });
    }
    emit(output, &rows, |rows| {
        if rows.is_empty() {
            return format!("no labs under {}\n", state_dir.display());
        }
        let mut t = vec![vec![
            "LAB".to_string(),
            "NODES".into(),
            "BRIDGE".into(),
            "SUBNET".into(),
            "API".into(),
            "LAST PHASE".into(),
            "STATE".into(),
        ]];
        for r in rows {
            t.push(vec![
                r.lab.clone(),
                r.nodes.to_string(),
                r.bridge.clone(),
                r.subnet.clone(),
                r.api.clone(),
                r.last_phase.clone().unwrap_or_else(|| "-".into()),
                r.state.clone(),
            ]);
        }
        crate::plan::rows_to_text(&t)
    });
    Ok(())
}

/// A lab's plan by name, or a clear error naming the labs that exist.
pub fn saved_plan(state_dir: &Path, lab: &str) -> Result<crate::plan::LabPlan> {
    match crate::state::read_plan(state_dir, lab) {
        Ok(Some(p)) => Ok(p),
        Ok(None) => {
            let names = crate::state::lab_names(state_dir).unwrap_or_default();
            Err(Error::Other {
                what: format!("no lab named `{lab}` under {}", state_dir.display()),
                hint: Some(if names.is_empty() {
                    "create one with `kthw-lab create SCENARIO`".into()
                } else {
                    format!("labs here: {}", names.join(", "))
                }),
                source: None,
            })
        }
        Err(e) => Err(Error::with_source(
            format!("cannot read the plan of lab `{lab}`"),
            e,
        )),
    }
}

fn cmd_logs(lab: &str, node: &str, state_dir: &Path) -> Result<()> {
    let plan = saved_plan(state_dir, lab)?;
    let n = lab_node(&plan, node)?;
    match std::fs::read(&n.console_log) {
        Ok(bytes) => {
            let _ = std::io::stdout().lock().write_all(&bytes);
            Ok(())
        }
        Err(e) => Err(Error::Other {
            what: format!(
                "cannot read the console log of `{node}` ({})",
                n.console_log.display()
            ),
            hint: Some("the log appears once the node's VM has started (phase `domains`)".into()),
            source: Some(Box::new(e)),
        }),
    }
}

/// `destroy LAB|SCENARIO`: the lab's name, from a scenario file when given one.
fn lab_name_of(arg: &str, state_dir: &Path) -> Result<String> {
    let p = Path::new(arg);
    if p.is_file() {
        return Ok(load_plan(p, state_dir)?.lab);
    }
    if crate::scenario::validate::is_label(arg, 32) {
        return Ok(arg.to_string());
    }
    Err(Error::Usage {
        what: format!("`{arg}` is neither a scenario file nor a lab name"),
        hint: "give a lab name (see `kthw-lab list`) or the scenario file it was created from"
            .into(),
    })
}

fn cmd_destroy(arg: &str, purge_cache: bool, connect: &str, state_dir: &Path) -> Result<()> {
    let state_dir = absolute(state_dir);
    let lab = lab_name_of(arg, &state_dir)?;
    // The plan helps (paths, bridge name) but is not required: removers find the
    // lab's things by their ownership markers.
    let plan = crate::state::read_plan(&state_dir, &lab).ok().flatten();
    let opts = actions::phases::PhaseOptions {
        connect: connect.to_string(),
        state_dir: state_dir.clone(),
        catalog_roots: catalog_roots(),
    };
    let progress = Progress::new();
    progress.println(&format!("destroying lab `{lab}`"));
    let report = actions::teardown::teardown(
        &lab,
        plan.as_ref(),
        &actions::phases::removers(&opts),
        &progress,
    );
    let report = report.into_result(&lab)?;
    let lab_dir = crate::plan::LabPaths::new(&state_dir, &lab).root;
    // Experiment reports are the user's results, not the lab's state: they outlive
    // it (a 3-member run is compared with a 2-member one made after it).
    match crate::experiment::run::archive_reports(&lab_dir, &state_dir, &lab) {
        Ok(0) => {}
        Ok(n) => progress.println(&format!(
            "kept {n} experiment report(s) in {}",
            crate::experiment::run::archive_dir(&state_dir, &lab).display()
        )),
        Err(e) => {
            return Err(Error::with_source(
                format!(
                "cannot keep the experiment reports of lab `{lab}` (nothing of them was removed)"
            ),
                e,
            ))
        }
    }
    match std::fs::remove_dir_all(&lab_dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(Error::with_source(
                format!("cannot remove the lab's state dir {}", lab_dir.display()),
                e,
            ))
        }
    }
    if purge_cache {
        let cache = crate::cache::Cache::new(&state_dir);
        cache.purge().map_err(|e| {
            actions::phases::cache_error(
                format!("cannot purge the cache {}", cache.root().display()),
                e,
            )
        })?;
        progress.println(&format!(
            "removed the shared cache {}",
            cache.root().display()
        ));
    }
    eprintln!(
        "lab `{lab}` destroyed in {:.1} s ({} removed, nothing left)",
        report.seconds,
        report.removed.len()
    );
    Ok(())
}

/// Print `v` as a table or as JSON on standard output.
fn emit<T: serde::Serialize>(output: StatusOutput, v: &T, table: impl FnOnce(&T) -> String) {
    let text = match output {
        StatusOutput::Table => table(v),
        StatusOutput::Json => {
            let mut s = serde_json::to_string_pretty(v).expect("output serializes");
            s.push('\n');
            s
        }
    };
    // A closed pipe (e.g. `| head`) is not an error worth reporting.
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

/// A node of a lab by name, or an error listing the lab's nodes.
fn lab_node<'p>(plan: &'p crate::plan::LabPlan, node: &str) -> Result<&'p crate::plan::NodePlan> {
    plan.node(node).ok_or_else(|| {
        let names: Vec<&str> = plan.nodes.iter().map(|n| n.name.as_str()).collect();
        Error::Other {
            what: format!("lab `{}` has no node `{node}`", plan.lab),
            hint: Some(format!("its nodes: {}", names.join(", "))),
            source: None,
        }
    })
}

/// Catalog roots for commands that have no scenario: the current directory (a
/// checkout of this repository) on top of the built-in catalog.
fn catalog_roots() -> Vec<PathBuf> {
    std::env::current_dir().into_iter().collect()
}

fn load_catalog() -> Result<crate::cache::Catalog> {
    crate::cache::Catalog::load(&catalog_roots()).map_err(|e| Error::Other {
        what: format!("the image catalog is invalid:\n{}", e.report().trim_end()),
        hint: Some(e.hint()),
        source: None,
    })
}

fn cmd_image(command: crate::cli::ImageCommand, state_dir: &Path) -> Result<()> {
    use crate::cache::{blocking, Progress as CacheProgress};
    use crate::cli::ImageCommand;
    let state_dir = absolute(state_dir);
    let catalog = load_catalog()?;
    let fail = |name: &str, e: crate::cache::CacheError| {
        actions::phases::cache_error(format!("image `{name}`"), e)
    };
    match command {
        ImageCommand::List => {
            let text = crate::cache::render_list(&catalog, &state_dir);
            let _ = std::io::stdout().lock().write_all(text.as_bytes());
        }
        ImageCommand::Pull { name } => {
            let img = blocking::ensure_image(&catalog, &name, &state_dir, CacheProgress::Auto)
                .map_err(|e| fail(&name, e))?;
            eprintln!(
                "image `{name}` {} ({})",
                match (img.fetched, img.manifest.source.as_str()) {
                    (false, _) => "already cached",
                    (true, "build") => "built from its recipe",
                    (true, _) => "downloaded and verified",
                },
                img.disk.display()
            );
        }
        ImageCommand::Build { name } => {
            let t0 = std::time::Instant::now();
            let img = blocking::build_image(&catalog, &name, &state_dir, CacheProgress::Auto, true)
                .map_err(|e| fail(&name, e))?;
            eprintln!(
                "image `{name}` built in {:.0} s ({})",
                t0.elapsed().as_secs_f64(),
                img.disk.display()
            );
        }
        ImageCommand::Verify { name } => {
            let r = crate::cache::verify_image(&catalog, &name, &state_dir)
                .map_err(|e| fail(&name, e))?;
            for f in &r.files {
                println!("{}  {}  {} bytes  ok", f.checksum, f.file, f.size);
            }
            eprintln!(
                "image `{name}` verified: {} files, {} MiB in {:.1} s",
                r.files.len(),
                r.bytes >> 20,
                r.elapsed.as_secs_f64()
            );
        }
    }
    Ok(())
}

fn cmd_cache_import(dir: &Path, state_dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        return Err(Error::Usage {
            what: format!("{} is not a directory", dir.display()),
            hint: "give the directory that holds the downloaded images or release files".into(),
        });
    }
    // Component releases (Kubernetes binaries, etcd, containerd, ...).
    let components = crate::components::ComponentCatalog::builtin()
        .map_err(|e| Error::other(format!("the component catalog is invalid: {e}")))?;
    let imported = crate::components::import::import_dir(
        &components,
        dir,
        &crate::state::cache_dir(&absolute(state_dir)),
    );
    let mut out = std::io::stdout().lock();
    if !imported.is_empty() {
        let _ = out.write_all(crate::components::import::render(&imported).as_bytes());
    }
    let component_failures = imported.iter().filter(|i| i.outcome.is_err()).count();
    // Images.
    let catalog = load_catalog()?;
    let report = crate::cache::blocking::import_dir(
        &catalog,
        dir,
        &absolute(state_dir),
        crate::cache::Progress::Auto,
    )
    .map_err(|e| {
        actions::phases::cache_error(format!("cannot import from {}", dir.display()), e)
    })?;
    if !report.items.is_empty() || imported.is_empty() {
        let _ = out.write_all(report.render().as_bytes());
    }
    let failed = report.failures().count() + component_failures;
    if failed > 0 {
        return Err(Error::Other {
            what: format!("{failed} file(s) in {} could not be imported", dir.display()),
            hint: Some("see the table above; a file whose checksum does not match is left out of the cache".into()),
            source: None,
        });
    }
    Ok(())
}

fn cmd_kubeconfig(lab: &str, write: Option<&Path>, state_dir: &Path) -> Result<()> {
    let plan = saved_plan(state_dir, lab)?;
    let missing = |e: crate::pki::PkiError| Error::Other {
        what: format!("lab `{lab}` has no admin kubeconfig yet"),
        hint: Some(format!(
            "it is made by phase `pki`: run `kthw-lab create SCENARIO --until pki` ({e})"
        )),
        source: None,
    };
    match write {
        Some(dest) => {
            crate::pki::write_admin_kubeconfig(&plan, dest).map_err(missing)?;
            eprintln!(
                "wrote {} (mode 0600); use it with: export KUBECONFIG={}",
                dest.display(),
                absolute(dest).display()
            );
        }
        None => {
            let text = crate::pki::admin_kubeconfig(&plan).map_err(missing)?;
            let _ = std::io::stdout().lock().write_all(text.as_bytes());
        }
    }
    Ok(())
}

fn cmd_certs_check(lab: &str, output: StatusOutput, state_dir: &Path) -> Result<()> {
    let plan = saved_plan(state_dir, lab)?;
    let mut findings = crate::pki::lint(&plan);
    findings.extend(crate::pki::lint_kubeconfigs(&plan));
    emit(output, &findings, |f| crate::pki::lint::render_table(f));
    if findings.is_empty() {
        Ok(())
    } else {
        Err(Error::Other {
            what: format!(
                "{} finding(s) in the certificates of lab `{lab}`",
                findings.len()
            ),
            hint: Some(
                "`kthw-lab create SCENARIO --until pki` re-issues what no longer matches the plan (keys are kept); the table above says what is wrong"
                    .into(),
            ),
            source: None,
        })
    }
}

fn cmd_lb_status(lab: &str, output: StatusOutput, state_dir: &Path) -> Result<()> {
    let plan = saved_plan(state_dir, lab)?;
    let files = crate::lb::plan::LbFiles::of(&plan);
    let status = crate::lb::status(&files.socket).map_err(|e| Error::Other {
        what: format!("the load balancer of lab `{lab}` does not answer"),
        hint: Some(format!(
            "it runs from phase `lb` of create; `kthw-lab start {lab}` brings it back after a reboot (log: {})",
            files.log.display()
        )),
        source: Some(Box::new(e)),
    })?;
    emit(output, &status, crate::lb::render_table);
    Ok(())
}

fn cmd_status(lab: &str, output: StatusOutput, connect: &str, state_dir: &Path) -> Result<()> {
    let plan = saved_plan(state_dir, lab)?;
    let journal = read_journal(&plan)
        .unwrap_or_else(|| Journal::open(&plan.paths.journal, lab, "").expect("a new journal"));
    let st = actions::status::collect(&plan, &journal, connect);
    emit(output, &st, actions::status::render_table);
    if st.ok() {
        Ok(())
    } else if !st.faults.is_empty() {
        Err(Error::Other {
            what: format!("lab `{lab}` has faults in force: {}", st.faults.join("; ")),
            hint: Some(format!(
                "an experiment put them there (a run that was killed, say): `kthw-lab experiment clean {lab}` undoes them, and so does the next `experiment run`"
            )),
            source: None,
        })
    } else {
        Err(Error::Other {
            what: format!("lab `{lab}` is not fully up"),
            hint: Some(format!(
                "the table says what is down; `kthw-lab logs {lab} NODE` shows a node's console, and running create again repairs what it can"
            )),
            source: None,
        })
    }
}

/// `ssh LAB NODE [-- CMD]`: the system's ssh client with the lab's key and the
/// node's pinned host key (no trust-on-first-use prompt).
fn cmd_ssh(lab: &str, node: &str, command: &[String], state_dir: &Path) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let plan = saved_plan(state_dir, lab)?;
    let n = lab_node(&plan, node)?;
    let key = crate::host::ssh::user_key_path(&plan);
    let known = plan.paths.ssh.join("known_hosts");
    if !key.exists() {
        return Err(Error::Other {
            what: format!("lab `{lab}` has no ssh key yet ({})", key.display()),
            hint: Some("keys are made by phase `disks` of create".into()),
            source: None,
        });
    }
    let mut cmd = std::process::Command::new("ssh");
    cmd.arg("-i")
        .arg(&key)
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known.display()))
        .args([
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "LogLevel=ERROR",
            "-l",
            &plan.ssh_user,
            &n.ip.to_string(),
        ]);
    if !command.is_empty() {
        cmd.arg("--").args(command);
    }
    let e = cmd.exec();
    Err(Error::Other {
        what: "cannot run ssh".into(),
        hint: Some(
            "install the OpenSSH client: apt-get install --no-install-recommends openssh-client"
                .into(),
        ),
        source: Some(Box::new(e)),
    })
}

fn phase_options(connect: &str, state_dir: &Path) -> actions::phases::PhaseOptions {
    actions::phases::PhaseOptions {
        connect: connect.to_string(),
        state_dir: absolute(state_dir),
        catalog_roots: catalog_roots(),
    }
}

fn read_journal(plan: &crate::plan::LabPlan) -> Option<Journal> {
    Journal::read(&plan.paths.journal)
}

/// `stop LAB`: the balancer stops, the VMs power off; disks, keys, certificates and
/// the network stay, so `start` brings the same lab back without bootstrapping.
fn cmd_stop(lab: &str, connect: &str, state_dir: &Path) -> Result<()> {
    let plan = saved_plan(state_dir, lab)?;
    actions::phases::require_libvirt(connect)?;
    let progress = Progress::new();
    let files = crate::lb::LbFiles::of(&plan);
    if crate::lb::is_running(&files.pid) {
        crate::lb::stop(&files.pid).map_err(actions::phases::lb_error)?;
        progress.println("load balancer stopped");
    }
    let t0 = std::time::Instant::now();
    actions::phases::shutdown_domains(
        &plan,
        connect,
        std::time::Duration::from_secs(60),
        &progress,
    )?;
    eprintln!(
        "lab `{lab}` stopped in {:.1} s; `kthw-lab start {lab}` brings it back",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `start LAB`: after a host reboot (or `stop`), bring back the bridge, NAT and
/// routes, the domains, SSH, and the balancer. Nothing is bootstrapped again: the
/// nodes' services are enabled units.
fn cmd_start(lab: &str, connect: &str, state_dir: &Path) -> Result<()> {
    let plan = saved_plan(state_dir, lab)?;
    let journal = read_journal(&plan);
    let done = |p: actions::Phase| journal.as_ref().is_some_and(|j| j.is_done(p));
    if !done(actions::Phase::Domains) {
        return Err(Error::Other {
            what: format!("lab `{lab}` has no VMs yet"),
            hint: Some("create it first: `kthw-lab create SCENARIO`".into()),
            source: None,
        });
    }
    actions::phases::require_libvirt(connect)?;
    let opts = phase_options(connect, state_dir);
    let progress = Progress::new();
    let cx = RunCtx::new(&plan, progress.clone(), Cancel::new());
    let mut timings = Vec::new();
    for a in actions::phases::start_actions(&opts, done(actions::Phase::Lb)) {
        progress.println(&format!("==> {}: {}", a.phase(), a.phase().describe()));
        let t0 = std::time::Instant::now();
        a.run(&cx)?;
        timings.push(actions::PhaseTiming {
            phase: a.phase(),
            seconds: t0.elapsed().as_secs_f64(),
            state: actions::PhaseState::Done,
        });
    }
    eprint!("\n{}", actions::render_timings(&timings));
    eprintln!("lab `{lab}` is running again");
    Ok(())
}

/// `reset LAB`: the VMs back to their freshly booted state. Each node goes back to
/// the state saved right after its first boot reached SSH (memory and disk, in its
/// overlay), and its clock is set; a node without one (a lab made by an older
/// version, say) boots again from a new overlay on the cached base. Either way the
/// same seeds, keys and certificates are used; phases after `wait-ssh` must run
/// again (`create` does that).
fn cmd_reset(lab: &str, connect: &str, state_dir: &Path) -> Result<()> {
    let plan = saved_plan(state_dir, lab)?;
    let Some(mut journal) = read_journal(&plan) else {
        return Err(Error::Other {
            what: format!("lab `{lab}` has no journal: it was never created"),
            hint: Some("create it first: `kthw-lab create SCENARIO`".into()),
            source: None,
        });
    };
    actions::phases::require_libvirt(connect)?;
    let opts = phase_options(connect, state_dir);
    let progress = Progress::new();
    let t0 = std::time::Instant::now();
    let reverted = match actions::phases::revert_to_fresh_states(&plan, connect, &progress) {
        Ok(true) => true,
        Ok(false) => {
            progress.println("not every node has a saved fresh state: booting them again");
            false
        }
        Err(e) => {
            progress.println(&format!(
                "going back to the saved fresh state failed ({e}): booting the nodes again"
            ));
            false
        }
    };
    if reverted {
        journal.invalidate_from(actions::Phase::FIRST_ON_GUESTS);
    } else {
        let removed = actions::phases::remove_domains(&plan, connect)?;
        progress.println(&format!("removed {}", removed.join(", ")));
        journal.invalidate_from(actions::Phase::Disks);
    }
    journal
        .save_to(&plan.paths.journal)
        .map_err(|e| Error::with_source("cannot write the journal", e))?;
    let runner = Runner::new(actions::phases::actions(&plan, &opts));
    let cx = RunCtx::new(&plan, progress.clone(), Cancel::new());
    let (timings, result) = runner.run(
        &cx,
        &mut journal,
        Range {
            from: Some(actions::Phase::Disks),
            until: Some(actions::Phase::WaitSsh),
        },
    );
    eprint!("\n{}", actions::render_timings(&timings));
    result?;
    if reverted {
        actions::phases::sync_clocks(&plan)?;
    }
    eprintln!(
        "lab `{lab}` reset in {:.1} s ({}): same keys and certificates; run `kthw-lab create SCENARIO` to bootstrap it again",
        t0.elapsed().as_secs_f64(),
        if reverted {
            "every node back to its saved fresh state"
        } else {
            "fresh VMs booted"
        },
    );
    Ok(())
}

fn cmd_checkpoint(command: crate::cli::CheckpointCommand, state_dir: &Path) -> Result<()> {
    use crate::actions::checkpoint;
    use crate::cli::CheckpointCommand as C;
    match command {
        C::Save { lab, name, connect } => {
            let plan = saved_plan(state_dir, &lab)?;
            let progress = Progress::new();
            progress.println(&format!("saving checkpoint `{name}` of lab `{lab}`"));
            let t0 = std::time::Instant::now();
            let cp = checkpoint::save(&plan, &plan_sha(&plan), &connect.connect, &name, &progress)?;
            eprintln!(
                "checkpoint `{name}` saved in {:.1} s (nodes paused {:.1} s, {:.0} MiB on disk, at phase `{}`); `kthw-lab checkpoint restore {lab} {name}` goes back to it",
                t0.elapsed().as_secs_f64(),
                cp.paused_s,
                cp.disk_bytes() as f64 / (1024.0 * 1024.0),
                cp.phase().map(|p| p.name()).unwrap_or("-")
            );
            Ok(())
        }
        C::Restore { lab, name, connect } => {
            let plan = saved_plan(state_dir, &lab)?;
            let opts = phase_options(&connect.connect, state_dir);
            let progress = Progress::new();
            progress.println(&format!("restoring checkpoint `{name}` of lab `{lab}`"));
            let r = checkpoint::restore(&plan, &plan_sha(&plan), &opts, &name, &progress)?;
            let rows = vec![
                vec!["STEP".to_string(), "TIME".into()],
                vec!["host side".into(), format!("{:.1} s", r.host_s)],
                vec!["nodes reverted".into(), format!("{:.1} s", r.revert_s)],
                vec!["clocks + ssh".into(), format!("{:.1} s", r.clocks_s)],
                vec!["total".into(), format!("{:.1} s", r.total_s)],
            ];
            eprint!("\n{}", crate::plan::rows_to_text(&rows));
            eprintln!("lab `{lab}` is back at checkpoint `{name}`");
            Ok(())
        }
        C::List {
            lab,
            output,
            connect,
        } => {
            let plan = saved_plan(state_dir, &lab)?;
            let rows = checkpoint::rows(&plan, &plan_sha(&plan), &connect.connect)?;
            emit(output, &rows, |r| checkpoint::render_rows(r));
            Ok(())
        }
        C::Delete { lab, name, connect } => {
            let plan = saved_plan(state_dir, &lab)?;
            let nodes = checkpoint::delete(&plan, &connect.connect, &name)?;
            eprintln!(
                "checkpoint `{name}` deleted ({} node snapshot(s))",
                nodes.len()
            );
            Ok(())
        }
    }
}

/// A report by run id (searched under every lab) or by path (a report.json or its
/// directory).
fn find_report(run: &str, state_dir: &Path) -> Result<(PathBuf, crate::experiment::Report)> {
    let p = Path::new(run);
    let mut candidates = vec![p.to_path_buf(), p.join("report.json")];
    for lab in crate::state::lab_names(state_dir).unwrap_or_default() {
        candidates.push(
            crate::plan::LabPaths::new(state_dir, &lab)
                .root
                .join("experiments")
                .join(run)
                .join("report.json"),
        );
    }
    // Reports of labs destroyed since.
    let archive = state_dir.join("reports");
    for e in std::fs::read_dir(&archive).into_iter().flatten().flatten() {
        candidates.push(e.path().join(run).join("report.json"));
    }
    let Some(path) = candidates.into_iter().find(|c| c.is_file()) else {
        return Err(Error::Other {
            what: format!("no experiment report `{run}`"),
            hint: Some(format!(
                "give a run id (the directories under {0}/labs/LAB/experiments, or {0}/reports/LAB for destroyed labs) or a report.json path",
                state_dir.display()
            )),
            source: None,
        });
    };
    let bytes = std::fs::read(&path)
        .map_err(|e| Error::with_source(format!("cannot read {}", path.display()), e))?;
    let rep = serde_json::from_slice(&bytes).map_err(|e| {
        Error::with_source(format!("{} is not an experiment report", path.display()), e)
    })?;
    Ok((path, rep))
}

fn cmd_experiment(command: crate::cli::ExperimentCommand, state_dir: &Path) -> Result<()> {
    use crate::cli::ExperimentCommand as C;
    use crate::experiment;
    match command {
        C::List => {
            let mut rows = vec![vec![
                "NAME".to_string(),
                "NEEDS".into(),
                "DURATION".into(),
                "DESCRIPTION".into(),
            ]];
            for (name, text) in experiment::SHIPPED {
                let e = experiment::load_str(text, name).map_err(|e| {
                    Error::other(format!("shipped experiment `{name}` is invalid: {e}"))
                })?;
                rows.push(vec![
                    name.to_string(),
                    format!(
                        "{}, {}+ controllers{}",
                        e.requires.phase,
                        e.requires.controllers,
                        if e.requires.workers > 0 {
                            format!(", {}+ workers", e.requires.workers)
                        } else {
                            String::new()
                        }
                    ),
                    format!("{:.0} s", e.duration.0),
                    e.description.clone(),
                ]);
            }
            let _ = std::io::stdout()
                .lock()
                .write_all(crate::plan::rows_to_text(&rows).as_bytes());
            Ok(())
        }
        C::Show { run, output, svg } => {
            let (path, rep) = find_report(&run, state_dir)?;
            if let Some(f) = svg {
                std::fs::write(&f, crate::experiment::chart::svg(&rep))
                    .map_err(|e| Error::with_source(format!("cannot write {}", f.display()), e))?;
                eprintln!("wrote {}", f.display());
            }
            match output {
                StatusOutput::Json => emit(output, &rep, |_| String::new()),
                StatusOutput::Table => {
                    let mut text = crate::experiment::report::summary(&rep);
                    text.push_str(&format!("\nreport: {}\n", path.display()));
                    let _ = std::io::stdout().lock().write_all(text.as_bytes());
                }
            }
            Ok(())
        }
        C::Compare { a, b } => {
            let (_, ra) = find_report(&a, state_dir)?;
            let (_, rb) = find_report(&b, state_dir)?;
            let _ = std::io::stdout()
                .lock()
                .write_all(crate::experiment::report::compare(&ra, &rb).as_bytes());
            Ok(())
        }
        C::Clean { lab, connect } => {
            let plan = saved_plan(state_dir, &lab)?;
            let hv = actions::phases::connect_hypervisor(&connect.connect)?;
            let remote = actions::phases::lab_remote(&plan)?;
            let r = crate::faults::clear(
                &plan,
                &hv,
                Some(&remote),
                std::time::Duration::from_secs(120),
            );
            for u in &r.undone {
                eprintln!("undone: {u}");
            }
            if !r.failed.is_empty() {
                return Err(Error::Other {
                    what: format!("could not undo: {}", r.failed.join("; ")),
                    hint: Some(format!("`kthw-lab status {lab}` shows the lab")),
                    source: None,
                });
            }
            if r.undone.is_empty() {
                eprintln!("no fault was in force on lab `{lab}`");
            }
            Ok(())
        }
        C::Run {
            lab,
            file,
            output,
            connect,
        } => {
            let (label, text) = experiment::read(&file).map_err(|e| Error::Other {
                what: format!("cannot read experiment {}", file.display()),
                hint: Some(format!(
                    "give an experiment file, or the name of a shipped one ({})",
                    experiment::SHIPPED
                        .iter()
                        .map(|(n, _)| *n)
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
                source: Some(Box::new(e)),
            })?;
            let exp = experiment::load_str(&text, &label).map_err(|e| {
                Error::Scenario(crate::scenario::ScenarioError {
                    file: e.file,
                    diagnostics: e.diagnostics,
                })
            })?;
            let plan = saved_plan(state_dir, &lab)?;
            let opts = phase_options(&connect.connect, state_dir);
            let progress = Progress::new();
            let cancel = Cancel::new();
            cancel
                .install_signal_handlers()
                .map_err(|e| Error::with_source("cannot install the Ctrl-C handler", e))?;
            let sha = plan_sha(&plan);
            let (rep, result) = experiment::run::run(
                &exp,
                experiment::run::RunInput {
                    plan: &plan,
                    plan_sha256: &sha,
                    opts: &opts,
                    file_label: &label,
                    file_text: &text,
                    progress: progress.clone(),
                    cancel,
                },
            );
            if let Some(rep) = &rep {
                eprint!("\n{}", crate::experiment::report::summary(rep));
                eprintln!(
                    "\nreport: {}",
                    experiment::run::report_dir(&plan, &rep.manifest.run_id).display()
                );
                if output == StatusOutput::Json {
                    emit(output, rep, |_| String::new());
                }
            }
            result
        }
    }
}
