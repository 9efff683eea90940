//! The real phases this build can run, in pipeline order, and the removers that
//! undo them. Each phase is a thin adapter from the plan to a host module; the
//! runner reports any phase missing from the list.

use std::path::PathBuf;

use super::teardown::Remover;
use super::{Action, Phase, RunCtx};
use crate::cache::{CacheError, CachedImage, Catalog, Progress as CacheProgress};
use crate::error::{Error, Result};
use crate::host::net::{LinuxNet, NetError, NetHost, NetworkSpec};
use crate::plan::LabPlan;

/// Options that reach the phases from the command line.
#[derive(Debug, Clone)]
pub struct PhaseOptions {
    pub connect: String,
    pub state_dir: PathBuf,
    /// Where `images/` (the catalog and recipes) is looked up, besides the built-in one.
    pub catalog_roots: Vec<PathBuf>,
}

/// The phases `start` runs to bring a stopped lab back (after a host reboot, say):
/// the host network, the domains, SSH, and the balancer if the lab had one. The
/// nodes' own services are enabled units and come back with them.
pub fn start_actions(opts: &PhaseOptions, with_lb: bool) -> Vec<Box<dyn Action>> {
    let mut v: Vec<Box<dyn Action>> = vec![
        Box::new(NetworkPhase {
            net: LinuxNet::new(&opts.state_dir),
        }),
        Box::new(DomainsPhase { opts: opts.clone() }),
        Box::new(WaitSshPhase {
            connect: opts.connect.clone(),
        }),
    ];
    if with_lb {
        v.push(Box::new(LbPhase));
    }
    v
}

/// The host's side of a lab as its journal says it was built: the bridge, NAT and
/// forwarding always; the host's pod routes once `routes` ran; the balancer once
/// `lb` ran. What a checkpoint restore converges before it wakes the nodes.
pub fn ensure_host_side(cx: &RunCtx, opts: &PhaseOptions, journal: &super::Journal) -> Result<()> {
    NetworkPhase {
        net: LinuxNet::new(&opts.state_dir),
    }
    .run(cx)?;
    if journal.is_done(Phase::Routes) {
        LinuxNet::new(&opts.state_dir)
            .ensure_pod_routes(&NetworkSpec::from_plan(cx.plan))
            .map_err(net_error)?;
    }
    if journal.is_done(Phase::Lb) {
        LbPhase.run(cx)?;
    }
    Ok(())
}

/// Remove a lab's domains with their overlays and seeds (keys, certificates and
/// the network stay): what `reset` starts from.
pub fn remove_domains(plan: &LabPlan, connect: &str) -> Result<Vec<String>> {
    DomainsRemover {
        connect: connect.to_string(),
    }
    .remove(&plan.lab, Some(plan))
}

/// Run `f` for every item at once (one thread each), with a progress line per item
/// (named by `name`) that starts as `doing` and that `f` finishes. Results in order.
pub(crate) fn on_every_node<T, N, F>(
    items: &[T],
    name: N,
    progress: &super::Progress,
    doing: &str,
    f: F,
) -> Vec<Result<()>>
where
    T: Sync,
    N: Fn(&T) -> &str,
    F: Fn(&T, super::Line) -> Result<()> + Sync,
{
    std::thread::scope(|s| {
        let hs: Vec<_> = items
            .iter()
            .map(|item| {
                let (f, line) = (&f, progress.line(name(item), doing));
                s.spawn(move || f(item, line))
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("per-node thread panicked"))
            .collect()
    })
}

/// Report one node's libvirt step on its progress line: `ok` there when it worked
/// (the line finished, or only updated when more follows), else the error, which
/// becomes a provisioning error about `what`.
pub(crate) fn node_step(
    line: super::Line,
    r: std::result::Result<(), crate::host::libvirt::HypervisorError>,
    ok: &str,
    finished: bool,
    what: impl FnOnce() -> String,
) -> Result<()> {
    match r {
        Ok(()) if finished => {
            line.done(ok);
            Ok(())
        }
        Ok(()) => {
            line.set(ok);
            Ok(())
        }
        Err(e) => {
            line.fail(&e.to_string());
            Err(provision(what(), e.hint(), e))
        }
    }
}

/// Shut every domain of the lab down (ACPI, forced after `grace`), in parallel.
pub fn shutdown_domains(
    plan: &LabPlan,
    connect: &str,
    grace: std::time::Duration,
    progress: &super::Progress,
) -> Result<()> {
    use crate::host::libvirt::{DomainState, Hypervisor};
    use crate::remote::Remote;
    let hv = connect_hypervisor(connect)?;
    // The lean image runs no logind, which is what turns ACPI's power button into a
    // shutdown: ask each running guest to power off over SSH first (ACPI, then a
    // forced power-off, remain for a guest that does not answer).
    let remote = lab_remote(plan)
        .ok()
        .map(|r| r.with_connect_timeout(std::time::Duration::from_secs(3)));
    let results = on_every_node(
        &plan.nodes,
        |n| n.name.as_str(),
        progress,
        "shutting down",
        |n, line| {
            if let (Some(r), Ok(Some(DomainState::Running))) = (&remote, hv.state(&n.domain)) {
                let _ = r.exec(
                    &n.name,
                    "systemctl --no-block poweroff",
                    std::time::Duration::from_secs(10),
                );
            }
            shutdown_one(&hv, n, grace, line)
        },
    );
    results.into_iter().collect()
}

fn shutdown_one(
    hv: &crate::host::libvirt::Libvirt,
    n: &crate::plan::NodePlan,
    grace: std::time::Duration,
    line: super::Line,
) -> Result<()> {
    use crate::host::libvirt::Hypervisor;
    match hv.shutdown(&n.domain, grace) {
        Ok(true) => {
            line.done("off");
            Ok(())
        }
        Ok(false) => {
            line.done("forced off (the guest did not power off in time)");
            Ok(())
        }
        Err(e) => {
            line.fail(&e.to_string());
            Err(provision(
                format!("cannot shut down {}", n.domain),
                e.hint(),
                e,
            ))
        }
    }
}

pub fn actions(_plan: &LabPlan, opts: &PhaseOptions) -> Vec<Box<dyn Action>> {
    vec![
        Box::new(NetworkPhase {
            net: LinuxNet::new(&opts.state_dir),
        }),
        Box::new(ImagePhase { opts: opts.clone() }),
        Box::new(DisksPhase { opts: opts.clone() }),
        Box::new(DomainsPhase { opts: opts.clone() }),
        Box::new(WaitSshPhase {
            connect: opts.connect.clone(),
        }),
        Box::new(PkiPhase),
        Box::new(LbPhase),
        Box::new(BootstrapPhase {
            phase: Phase::Etcd,
            opts: opts.clone(),
        }),
        Box::new(BootstrapPhase {
            phase: Phase::Routes,
            opts: opts.clone(),
        }),
        Box::new(BootstrapPhase {
            phase: Phase::Runtime,
            opts: opts.clone(),
        }),
        Box::new(BootstrapPhase {
            phase: Phase::ControlPlane,
            opts: opts.clone(),
        }),
        Box::new(BootstrapPhase {
            phase: Phase::Workers,
            opts: opts.clone(),
        }),
        Box::new(BootstrapPhase {
            phase: Phase::Smoke,
            opts: opts.clone(),
        }),
    ]
}

pub(crate) fn pki_error(e: crate::pki::PkiError) -> Error {
    Error::Provision {
        what: "the lab's certificates".into(),
        hint: e.hint(),
        source: Some(Box::new(e)),
    }
}

/// Certificates, kubeconfigs and the encryption config, in the lab's state dir.
/// Existing keys and certificates that still match the plan are kept.
struct PkiPhase;

impl Action for PkiPhase {
    fn phase(&self) -> Phase {
        Phase::Pki
    }

    fn run(&self, cx: &RunCtx) -> Result<()> {
        let line = cx.progress.line("pki", "certificates");
        let report = crate::pki::ensure_pki(cx.plan).map_err(pki_error)?;
        line.set("kubeconfigs and encryption config");
        let kubeconfigs = crate::pki::ensure_kubeconfigs(cx.plan).map_err(pki_error)?;
        crate::pki::ensure_encryption_config(cx.plan).map_err(pki_error)?;
        let findings = crate::pki::lint(cx.plan);
        if let Some(f) = findings.first() {
            line.fail("the new certificates do not pass the linter");
            return Err(Error::Provision {
                what: format!(
                    "certificate `{}` fails check `{}` right after issuing ({} finding(s))",
                    f.cert,
                    f.check,
                    findings.len()
                ),
                hint: format!("see `kthw-lab certs check {}`", cx.plan.lab),
                source: None,
            });
        }
        use crate::pki::Outcome;
        let count = |o| report.with(o).len();
        line.done(&format!(
            "{} issued, {} re-issued, {} kept; {} kubeconfigs",
            count(Outcome::Issued),
            count(Outcome::Reissued),
            count(Outcome::Kept),
            kubeconfigs.len()
        ));
        Ok(())
    }
}

pub(crate) fn cache_error(what: String, e: CacheError) -> Error {
    Error::Provision {
        what,
        hint: e.hint(),
        source: Some(Box::new(e)),
    }
}

/// What the kernel command line adds for the image's first-boot path: an image whose
/// initrd applies the seed boots with cloud-init switched off (its generator honours
/// `cloud-init=disabled`), so not one Python process runs at boot.
pub fn first_boot_cmdline(first_boot: crate::cache::FirstBoot) -> &'static str {
    match first_boot {
        crate::cache::FirstBoot::CloudInit => "",
        crate::cache::FirstBoot::KthwSeed => "cloud-init=disabled",
    }
}

/// The lab's base image from the cache: pulled or built and verified on first use,
/// then just looked up (cheap), so every phase that needs its paths calls this.
pub(crate) fn lab_image(
    plan: &LabPlan,
    opts: &PhaseOptions,
    progress: CacheProgress,
) -> Result<CachedImage> {
    let catalog = Catalog::load(&opts.catalog_roots).map_err(|e| Error::Other {
        what: format!("the image catalog is invalid:\n{}", e.report().trim_end()),
        hint: Some(e.hint()),
        source: None,
    })?;
    crate::cache::blocking::ensure_image(&catalog, &plan.image, &opts.state_dir, progress)
        .map_err(|e| cache_error(format!("cannot get image `{}`", plan.image), e))
}

struct ImagePhase {
    opts: PhaseOptions,
}

impl Action for ImagePhase {
    fn phase(&self) -> Phase {
        Phase::Image
    }

    fn run(&self, cx: &RunCtx) -> Result<()> {
        let img = lab_image(cx.plan, &self.opts, CacheProgress::Auto)?;
        if let Some(a) = img.manifest.artifacts.first() {
            cx.note("image_digest", format!("{}:{}", a.file, a.checksum));
        }
        cx.note("image_source", img.manifest.source.clone());
        cx.progress.println(&format!(
            "    image {} {} ({})",
            img.name,
            if img.fetched {
                "is now cached"
            } else {
                "was already cached"
            },
            img.disk.display()
        ));
        Ok(())
    }
}

/// Everything that removes a lab's things, consumers first.
pub fn removers(opts: &PhaseOptions) -> Vec<Box<dyn Remover>> {
    vec![
        Box::new(FaultsRemover),
        Box::new(LbRemover {
            state_dir: opts.state_dir.clone(),
        }),
        Box::new(DomainsRemover {
            connect: opts.connect.clone(),
        }),
        Box::new(NetworkRemover {
            net: LinuxNet::new(&opts.state_dir),
        }),
    ]
}

pub(crate) fn net_error(e: NetError) -> Error {
    Error::Provision {
        what: "the lab network on the host".into(),
        hint: e.hint(),
        source: Some(Box::new(e)),
    }
}

struct NetworkPhase {
    net: LinuxNet,
}

impl Action for NetworkPhase {
    fn phase(&self) -> Phase {
        Phase::Network
    }

    fn run(&self, cx: &RunCtx) -> Result<()> {
        let spec = NetworkSpec::from_plan(cx.plan);
        let line = cx.progress.line(&spec.bridge, "bridge, addresses, NAT");
        match self.net.ensure_network(&spec) {
            Ok(report) => {
                for w in &report.warnings {
                    cx.progress.println(&format!("warning: {w}"));
                }
                if let Some(u) = &report.uplink {
                    cx.note("uplink", u.clone());
                }
                line.done(if report.changed() {
                    "created"
                } else {
                    "already in place"
                });
                Ok(())
            }
            Err(e) => {
                line.fail(&e.to_string());
                Err(net_error(e))
            }
        }
    }
}

struct NetworkRemover {
    net: LinuxNet,
}

impl Remover for NetworkRemover {
    fn what(&self) -> &'static str {
        "network"
    }

    fn remove(&self, lab: &str, _plan: Option<&LabPlan>) -> Result<Vec<String>> {
        let r = self.net.remove_network(lab).map_err(net_error)?;
        let mut out: Vec<String> = r
            .bridges_removed
            .iter()
            .map(|b| format!("bridge {b}"))
            .collect();
        out.extend(r.tables_removed.iter().map(|t| format!("nft table {t}")));
        if !r.routes_removed.is_empty() {
            out.push(format!("{} pod routes", r.routes_removed.len()));
        }
        if r.ip_forward_restored {
            out.push("ip_forward restored to 0".into());
        }
        Ok(out)
    }

    fn residue(&self, lab: &str, _plan: Option<&LabPlan>) -> Result<Vec<String>> {
        let s = self.net.observe(lab).map_err(net_error)?;
        let mut out: Vec<String> = s
            .bridges
            .iter()
            .map(|b| format!("bridge {}", b.name))
            .collect();
        out.extend(s.tables.iter().map(|t| format!("nft table {t}")));
        Ok(out)
    }
}

pub(crate) fn lb_error(e: crate::lb::LbError) -> Error {
    Error::Provision {
        what: "the API load balancer".into(),
        hint: "look at the balancer's log (`lb.log` in the lab's lb directory); `kthw-lab lb status LAB` shows its backends".into(),
        source: Some(Box::new(e)),
    }
}

/// The API load balancer: this binary's `lb run`, detached, configured from the plan.
/// A running one is told to reload (SIGHUP), so re-runs converge without dropping
/// connections.
struct LbPhase;

impl Action for LbPhase {
    fn phase(&self) -> Phase {
        Phase::Lb
    }

    fn run(&self, cx: &RunCtx) -> Result<()> {
        use crate::lb::{self as control, config_from_plan, LbFiles};
        let files = LbFiles::of(cx.plan);
        let line = cx.progress.line(
            &cx.plan.load_balancer.name,
            &format!(
                "{} -> {}",
                cx.plan.load_balancer.endpoint,
                cx.plan.load_balancer.backends.join(" ")
            ),
        );
        let ca = crate::pki::cert_path(&cx.plan.paths.pki, "ca");
        let config = config_from_plan(cx.plan, &ca).map_err(lb_error)?;
        crate::state::ensure_dir_mode(&cx.plan.paths.lb, crate::state::PRIVATE_DIR_MODE).map_err(
            |e| Error::with_source(format!("cannot create {}", cx.plan.paths.lb.display()), e),
        )?;
        config.save(&files.config).map_err(lb_error)?;
        let exe = std::env::current_exe()
            .map_err(|e| Error::with_source("cannot find this program to start the balancer", e))?;
        let args: Vec<std::ffi::OsString> = vec![
            "-v".into(),
            "lb".into(),
            "run".into(),
            "--config".into(),
            files.config.clone().into(),
        ];
        let how = control::ensure_running(&exe, &args, &files.pid, &files.log).map_err(lb_error)?;
        // Ready when its control socket answers.
        let t0 = std::time::Instant::now();
        let status = loop {
            match control::status(&files.socket) {
                Ok(s) => break s,
                Err(e) if t0.elapsed() > std::time::Duration::from_secs(10) => {
                    line.fail("no answer on its control socket");
                    return Err(lb_error(e));
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
            }
        };
        let _ = status;
        line.done(&match how {
            control::Ensured::Started(pid) => format!("started (pid {pid})"),
            control::Ensured::Reloaded(pid) => format!("running, reloaded (pid {pid})"),
        });
        Ok(())
    }
}

/// Balancer processes of a lab, found by the marker in their command line: the
/// lab's config path `.../labs/LAB/lb/lb.json`.
pub fn lb_processes(lab: &str) -> Vec<u32> {
    let suffix = format!("/labs/{lab}/lb/lb.json");
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = raw
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let ours = args
            .windows(3)
            .any(|w| w[0] == "run" && w[1] == "--config" && w[2].ends_with(&suffix));
        if ours && args.iter().any(|a| a == "lb") {
            out.push(pid);
        }
    }
    out.sort();
    out
}

/// Faults an experiment left in force that outlive the domains: the partition
/// table on the host (delays go with the tap devices, paused nodes with the
/// domains, the record with the state dir).
struct FaultsRemover;

fn partition_table_of(lab: &str, plan: Option<&LabPlan>) -> String {
    match plan {
        Some(p) => crate::faults::partition_table(p),
        None => format!("kthw_{}_faults", lab.replace('-', "_")),
    }
}

impl Remover for FaultsRemover {
    fn what(&self) -> &'static str {
        "experiment faults"
    }

    fn remove(&self, lab: &str, plan: Option<&LabPlan>) -> Result<Vec<String>> {
        let table = partition_table_of(lab, plan);
        match crate::faults::remove_partition_table(&table) {
            Ok(true) => Ok(vec![format!("partition table {table}")]),
            Ok(false) => Ok(Vec::new()),
            Err(e) => Err(provision(
                format!("the partition table {table}"),
                e.hint(),
                e,
            )),
        }
    }

    fn residue(&self, lab: &str, plan: Option<&LabPlan>) -> Result<Vec<String>> {
        let table = partition_table_of(lab, plan);
        match crate::faults::partition_table_exists(&table) {
            Ok(true) => Ok(vec![format!("nft table bridge {table}")]),
            Ok(false) => Ok(Vec::new()),
            Err(e) => Err(provision(
                format!("the partition table {table}"),
                e.hint(),
                e,
            )),
        }
    }
}

struct LbRemover {
    state_dir: PathBuf,
}

impl Remover for LbRemover {
    fn what(&self) -> &'static str {
        "load balancer"
    }

    fn remove(&self, lab: &str, _plan: Option<&LabPlan>) -> Result<Vec<String>> {
        let files =
            crate::lb::plan::LbFiles::new(&crate::plan::LabPaths::new(&self.state_dir, lab).lb);
        let mut out = Vec::new();
        if crate::lb::is_running(&files.pid) {
            crate::lb::stop(&files.pid).map_err(lb_error)?;
            out.push("balancer process".to_string());
        }
        // Also one whose pid file is gone (state dir removed by hand).
        for pid in lb_processes(lab) {
            // SAFETY: plain kill(2) on a pid whose command line names this lab's config.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            let t0 = std::time::Instant::now();
            while std::path::Path::new(&format!("/proc/{pid}")).exists()
                && t0.elapsed() < std::time::Duration::from_secs(5)
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            out.push(format!("balancer process {pid}"));
        }
        Ok(out)
    }

    fn residue(&self, lab: &str, _plan: Option<&LabPlan>) -> Result<Vec<String>> {
        Ok(lb_processes(lab)
            .into_iter()
            .map(|p| format!("process {p}"))
            .collect())
    }
}

/// Map a module error with a `hint()` into a provisioning error.
pub(crate) fn provision<E: std::error::Error + Send + Sync + 'static>(
    what: String,
    hint: String,
    e: E,
) -> Error {
    Error::Provision {
        what,
        hint,
        source: Some(Box::new(e)),
    }
}

/// Fails with [`connect_hypervisor`]'s one error when libvirt cannot be reached: for
/// commands that need it, before they change anything (`stop` would stop the
/// balancer and leave the VMs running, `start` would bring up the network first).
pub fn require_libvirt(uri: &str) -> Result<()> {
    connect_hypervisor(uri).map(|_| ())
}

/// libvirt, or one error that says where it could not be reached and why, once,
/// with how to start it.
pub(crate) fn connect_hypervisor(uri: &str) -> Result<crate::host::libvirt::Libvirt> {
    crate::host::libvirt::Libvirt::connect(Some(uri)).map_err(|e| Error::Provision {
        what: e.to_string(),
        hint: e.hint(),
        source: None,
    })
}

/// Per-node overlays on the cached base image, and their cloud-init seeds. The
/// lab's SSH keys (user key and one pinned host key per node) are made here once.
struct DisksPhase {
    opts: PhaseOptions,
}

impl Action for DisksPhase {
    fn phase(&self) -> Phase {
        Phase::Disks
    }

    fn run(&self, cx: &RunCtx) -> Result<()> {
        use crate::host::{disks, seed, ssh};
        let img = lab_image(cx.plan, &self.opts, CacheProgress::Lines)?;
        let keys = ssh::ensure_lab_keys(cx.plan)
            .map_err(|e| provision("the lab's ssh keys".into(), e.hint(), e))?;
        crate::state::ensure_node_dirs(cx.plan).map_err(|e| {
            Error::with_source(
                format!(
                    "cannot create the node directories under {}",
                    cx.plan.paths.root.display()
                ),
                e,
            )
        })?;
        for n in &cx.plan.nodes {
            cx.check_cancel(Phase::Disks)?;
            let line = cx.progress.line(&n.name, "overlay and seed");
            let outcome = disks::ensure_overlay(&img.disk, &n.disk_path, n.disk_gib)
                .map_err(|e| provision(format!("overlay for node `{}`", n.name), e.hint(), e))?;
            disks::check_image(&n.disk_path)
                .map_err(|e| provision(format!("overlay for node `{}`", n.name), e.hint(), e))?;
            let seed_keys = keys.seed_keys(&n.name).ok_or_else(|| {
                Error::other(format!("no host key was made for node `{}`", n.name))
            })?;
            let files = crate::render::cloudinit::render_seed(cx.plan, n, &seed_keys);
            seed::write_seed(&n.seed_path, &files)
                .map_err(|e| provision(format!("seed for node `{}`", n.name), e.hint(), e))?;
            line.done(&format!("{outcome:?}").to_lowercase());
        }
        Ok(())
    }
}

/// libvirt domains from the plan, defined (or updated) and started together.
struct DomainsPhase {
    opts: PhaseOptions,
}

impl Action for DomainsPhase {
    fn phase(&self) -> Phase {
        Phase::Domains
    }

    fn run(&self, cx: &RunCtx) -> Result<()> {
        use crate::cache::BootMethod;
        use crate::host::{accel, libvirt};
        use crate::render::domain::{render_domain, Boot, DomainOptions, SeedKind};
        let img = lab_image(cx.plan, &self.opts, CacheProgress::Lines)?;
        let choice = accel::decide(cx.plan.accelerator, accel::probe());
        if let Some(w) = &choice.warning {
            cx.progress.println(&format!("warning: {w}"));
        }
        cx.note("accelerator", choice.accel.domain_type());
        let boot = match img.boot {
            BootMethod::DirectKernel => Boot::DirectKernel {
                kernel: img.kernel.clone().ok_or_else(|| {
                    Error::other(format!(
                        "image `{}` boots its kernel directly but has none",
                        img.name
                    ))
                })?,
                initrd: img.initrd.clone().ok_or_else(|| {
                    Error::other(format!(
                        "image `{}` boots its kernel directly but has no initrd",
                        img.name
                    ))
                })?,
                extra_cmdline: first_boot_cmdline(img.first_boot).to_string(),
            },
            BootMethod::Firmware => Boot::Firmware,
        };
        let opts = DomainOptions {
            accel: choice.accel,
            boot,
            seed: SeedKind::Fat,
        };
        let hv = connect_hypervisor(&self.opts.connect)?;
        let mut names = Vec::new();
        for n in &cx.plan.nodes {
            let xml = render_domain(cx.plan, n, &opts)
                .map_err(|e| provision(format!("domain XML for node `{}`", n.name), e.hint(), e))?;
            libvirt::Hypervisor::ensure_domain(&hv, &xml)
                .map_err(|e| provision(format!("domain of node `{}`", n.name), e.hint(), e))?;
            names.push(n.domain.clone());
        }
        cx.check_cancel(Phase::Domains)?;
        let line = cx
            .progress
            .line("domains", &format!("starting {} domain(s)", names.len()));
        for (name, r) in names.iter().zip(libvirt::start_all(&hv, &names)) {
            r.map_err(|e| provision(format!("cannot start domain {name}"), e.hint(), e))?;
        }
        line.done(&format!(
            "{} running ({})",
            names.len(),
            choice.accel.domain_type()
        ));
        Ok(())
    }
}

/// Every node accepts a real SSH login with its pinned host key. Nodes still as
/// freshly booted get that state saved as their [`FRESH_SNAPSHOT`] (memory and disk,
/// inside the overlay), each as soon as its login worked, while the others may still
/// boot: `reset` goes back to it in seconds instead of booting again. Nodes that already
/// have one for their current definition are left alone. A node whose state cannot be
/// saved only costs a slower `reset` (it boots again), so that is a warning, not a
/// failure.
///
/// [`FRESH_SNAPSHOT`]: crate::host::libvirt::FRESH_SNAPSHOT
struct WaitSshPhase {
    connect: String,
}

/// A node with a domain, and its saved fresh state.
pub(crate) struct FreshState<'p> {
    pub node: &'p crate::plan::NodePlan,
    /// What its snapshot's description must be for its current domain definition.
    pub description: String,
    /// It has such a snapshot.
    pub saved: bool,
}

/// The fresh state of every node of the plan that has a domain.
pub(crate) fn fresh_states<'p>(
    hv: &crate::host::libvirt::Libvirt,
    plan: &'p LabPlan,
) -> Result<Vec<FreshState<'p>>> {
    use crate::host::libvirt::{fresh_description, Hypervisor};
    let domains = hv
        .list_lab_domains(&plan.lab)
        .map_err(|e| provision(format!("domains of lab `{}`", plan.lab), e.hint(), e))?;
    let mut out = Vec::new();
    for n in &plan.nodes {
        let Some(d) = domains.iter().find(|d| d.name == n.domain) else {
            continue;
        };
        let description = fresh_description(&d.marker.digest);
        let have = hv
            .fresh_snapshot(&n.domain)
            .map_err(|e| provision(format!("snapshots of {}", n.domain), e.hint(), e))?;
        out.push(FreshState {
            node: n,
            saved: have.as_deref() == Some(description.as_str()),
            description,
        });
    }
    Ok(out)
}

/// Put every node back to its freshly booted state (see [`WaitSshPhase`]), in
/// parallel. `Ok(false)` when some node has no such state for its current definition:
/// nothing was touched, and the caller boots the nodes again instead.
pub fn revert_to_fresh_states(
    plan: &LabPlan,
    connect: &str,
    progress: &super::Progress,
) -> Result<bool> {
    use crate::host::libvirt::Hypervisor;
    let hv = connect_hypervisor(connect)?;
    let states = fresh_states(&hv, plan)?;
    if states.len() != plan.nodes.len() || !states.iter().all(|s| s.saved) {
        return Ok(false);
    }
    let results = on_every_node(
        &plan.nodes,
        |n| n.name.as_str(),
        progress,
        "going back to its fresh state",
        |n, line| {
            node_step(
                line,
                hv.revert_to_fresh(&n.domain),
                "back to its fresh state",
                true,
                || format!("cannot revert {}", n.domain),
            )
        },
    );
    results.into_iter().collect::<Result<Vec<()>>>()?;
    Ok(true)
}

/// Set every node's clock to the host's, in parallel: a node put back to a saved
/// state wakes up with the clock of the moment it was saved.
pub fn sync_clocks(plan: &LabPlan) -> Result<()> {
    use crate::remote::Remote;
    let remote = lab_remote(plan)?;
    let nodes: Vec<&str> = plan.nodes.iter().map(|n| n.name.as_str()).collect();
    let results = crate::remote::exec_all(&remote, &nodes, |r, node| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        r.run(
            node,
            &format!(
                "date -u -s @{}.{:09} >/dev/null",
                now.as_secs(),
                now.subsec_nanos()
            ),
            std::time::Duration::from_secs(30),
        )
    });
    for (node, r) in results {
        r.map_err(|e| Error::with_source(format!("cannot set the clock of {node}"), e))?;
    }
    Ok(())
}

/// How long to wait for first boot: TCG emulation is slow, and several guests
/// share the host's cores.
fn ssh_timeout(plan: &LabPlan) -> std::time::Duration {
    let per_node = if crate::host::accel::decide(plan.accelerator, crate::host::accel::probe())
        .accel
        == crate::host::accel::Accel::Kvm
    {
        60
    } else {
        120
    };
    std::time::Duration::from_secs(180 + per_node * plan.nodes.len() as u64)
}

impl Action for WaitSshPhase {
    fn phase(&self) -> Phase {
        Phase::WaitSsh
    }

    fn run(&self, cx: &RunCtx) -> Result<()> {
        use crate::host::ssh;
        let keys = ssh::ensure_lab_keys(cx.plan)
            .map_err(|e| provision("the lab's ssh keys".into(), e.hint(), e))?;
        let targets = ssh::targets(cx.plan, &keys);
        let lines: std::collections::BTreeMap<String, super::Line> = targets
            .iter()
            .map(|t| (t.node.clone(), cx.progress.line(&t.node, "waiting for ssh")))
            .collect();
        let report = |msg: &str| {
            if let Some((node, rest)) = msg.split_once(": ") {
                if let Some(l) = lines.get(node) {
                    l.set(rest);
                    return;
                }
            }
            cx.progress.println(msg);
        };
        // The nodes this run booted, and whether each already has its fresh state.
        let fresh = if cx.guests_fresh.load(std::sync::atomic::Ordering::SeqCst) {
            let hv = connect_hypervisor(&self.connect)?;
            let states = fresh_states(&hv, cx.plan)?;
            Some((hv, states))
        } else {
            None
        };
        // Per node: the outcome of saving its fresh state, when one was saved.
        let saved: std::sync::Mutex<
            std::collections::BTreeMap<String, std::result::Result<(), String>>,
        > = Default::default();
        let on_ready = |t: &ssh::SshTarget, _took: std::time::Duration| {
            use crate::host::libvirt::Hypervisor;
            let Some((hv, states)) = &fresh else { return };
            let Some(s) = states.iter().find(|s| s.node.name == t.node && !s.saved) else {
                return;
            };
            if let Some(l) = lines.get(&t.node) {
                l.set("ssh login ok, saving its fresh state");
            }
            let r = hv
                .take_fresh_snapshot(&s.node.domain, &s.description)
                .map_err(|e| e.to_string());
            saved
                .lock()
                .expect("fresh-state outcomes")
                .insert(t.node.clone(), r);
        };
        match ssh::wait_for_all(&targets, ssh_timeout(cx.plan), &report, &on_ready) {
            Ok(times) => {
                let mut lines = lines;
                let saved = saved.into_inner().expect("fresh-state outcomes");
                for (node, took) in times {
                    let Some(l) = lines.remove(&node) else {
                        continue;
                    };
                    let login = format!("ssh login ok after {:.0} s", took.as_secs_f64());
                    match saved.get(&node) {
                        None => l.done(&login),
                        Some(Ok(())) => l.done(&format!("{login}, fresh state saved for reset")),
                        Some(Err(e)) => l.fail(&format!(
                            "{login}; fresh state not saved ({e}); `reset` will boot this node again"
                        )),
                    }
                }
                Ok(())
            }
            Err(e) => {
                for (_, l) in lines {
                    l.fail("no login");
                }
                Err(Error::Boot {
                    what: e.to_string(),
                    hint: e.hint(),
                })
            }
        }
    }
}

/// The lab's domains, found by their metadata marker, with their overlays and seeds.
struct DomainsRemover {
    connect: String,
}

fn plan_files(plan: Option<&LabPlan>) -> Vec<PathBuf> {
    plan.map(|p| {
        p.nodes
            .iter()
            .flat_map(|n| [n.disk_path.clone(), n.seed_path.clone()])
            .collect()
    })
    .unwrap_or_default()
}

/// The lab's journal shows that phase `domains` never started, so libvirt holds
/// nothing of it (and need not be reachable to destroy the lab).
fn never_defined_domains(plan: Option<&LabPlan>) -> bool {
    plan.and_then(|p| super::Journal::read(&p.paths.journal))
        .is_some_and(|j| j.get(Phase::Domains).is_none())
}

impl Remover for DomainsRemover {
    fn what(&self) -> &'static str {
        "domains"
    }

    fn remove(&self, lab: &str, plan: Option<&LabPlan>) -> Result<Vec<String>> {
        let hv = match connect_hypervisor(&self.connect) {
            Ok(hv) => hv,
            Err(_) if never_defined_domains(plan) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let r = crate::host::libvirt::remove_lab(&hv, lab, &plan_files(plan))
            .map_err(|e| provision(format!("domains of lab `{lab}`"), e.hint(), e))?;
        let mut out = r.domains.clone();
        if !r.files.is_empty() {
            out.push(format!("{} disk and seed file(s)", r.files.len()));
        }
        Ok(out)
    }

    fn residue(&self, lab: &str, plan: Option<&LabPlan>) -> Result<Vec<String>> {
        let hv = match connect_hypervisor(&self.connect) {
            Ok(hv) => hv,
            Err(_) if never_defined_domains(plan) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut out: Vec<String> = crate::host::libvirt::Hypervisor::list_lab_domains(&hv, lab)
            .map_err(|e| provision(format!("domains of lab `{lab}`"), e.hint(), e))?
            .into_iter()
            .map(|d| format!("domain {}", d.name))
            .collect();
        out.extend(
            plan_files(plan)
                .into_iter()
                .filter(|f| f.exists())
                .map(|f| format!("file {}", f.display())),
        );
        Ok(out)
    }
}

/// One SSH session per node, with the lab's user key and each node's pinned host key.
pub fn lab_remote(plan: &LabPlan) -> Result<crate::remote::SshRemote> {
    use crate::remote::{HostKey, SshRemote, SshTarget};
    let keys = crate::host::ssh::ensure_lab_keys(plan)
        .map_err(|e| provision("the lab's ssh keys".into(), e.hint(), e))?;
    let mut targets = std::collections::HashMap::new();
    for n in &plan.nodes {
        let host = keys
            .hosts
            .get(&n.name)
            .ok_or_else(|| Error::other(format!("no host key for node `{}`", n.name)))?;
        let host_key = HostKey::from_openssh(&host.public_openssh).map_err(|e| {
            Error::other(format!("host key of node `{}` is unreadable: {e}", n.name))
        })?;
        targets.insert(
            n.name.clone(),
            SshTarget {
                addr: format!("{}:22", n.ip),
                user: plan.ssh_user.clone(),
                host_key,
            },
        );
    }
    Ok(SshRemote::new(keys.user.private_path.clone(), targets))
}

/// etcd, routes, runtime, control plane, workers and smoke: configured over SSH from
/// the plan, with the certificates the PKI hands each node.
struct BootstrapPhase {
    phase: Phase,
    opts: PhaseOptions,
}

impl Action for BootstrapPhase {
    fn phase(&self) -> Phase {
        self.phase
    }

    fn run(&self, cx: &RunCtx) -> Result<()> {
        use crate::actions::bootstrap::{self, Bootstrap};
        let catalog = crate::components::ComponentCatalog::builtin().map_err(|e| Error::Other {
            what: format!("the component catalog is invalid: {e}"),
            hint: None,
            source: None,
        })?;
        let from_image: Vec<&str> = cx.plan.from_image.iter().map(String::as_str).collect();
        let files = bootstrap::file_copies(cx.plan);
        let mut b = Bootstrap::new(
            cx.plan,
            &catalog,
            &crate::state::cache_dir(&self.opts.state_dir),
        )
        .use_image(&from_image)
        .with_files(files);
        if matches!(self.phase, Phase::ControlPlane | Phase::Smoke) {
            // The API through the load balancer, as the admin, from this host.
            match crate::kube::ApiClient::for_lab(cx.plan) {
                Ok(api) => b.api = Some(api),
                Err(e) => cx.progress.println(&format!(
                    "    note: the API cannot be checked from here: {e}"
                )),
            }
        }
        let needed: &[&str] = match self.phase {
            Phase::Etcd => &["etcd"],
            Phase::Runtime => &["containerd", "runc", "cni-plugins", "crictl"],
            Phase::ControlPlane => &[
                "kube-apiserver",
                "kube-controller-manager",
                "kube-scheduler",
                "kubectl",
            ],
            Phase::Workers => &["kubelet", "kube-proxy", "kubectl"],
            _ => &[],
        };
        fetch_components(cx, &catalog, &self.opts.state_dir, needed);
        let remote = lab_remote(cx.plan)?;
        let nodes: Vec<&str> = match self.phase {
            Phase::Etcd | Phase::ControlPlane => {
                cx.plan.controllers().map(|n| n.name.as_str()).collect()
            }
            Phase::Runtime | Phase::Workers => cx.plan.workers().map(|n| n.name.as_str()).collect(),
            _ => cx.plan.nodes.iter().map(|n| n.name.as_str()).collect(),
        };
        let line = cx.progress.line(self.phase.name(), &nodes.join(", "));
        let say = |m: &str| line.set(m);
        b.notify = Some(bootstrap::Notify(&say));
        let fail = |e: bootstrap::BootstrapError| e.into_error(&format!("phase `{}`", self.phase));
        let report = match self.phase {
            Phase::Etcd => bootstrap::ensure_etcd(&b, &remote),
            Phase::Routes => {
                // The host side of host-gw: the host reaches every pod range too.
                let net = LinuxNet::new(&self.opts.state_dir);
                net.ensure_pod_routes(&NetworkSpec::from_plan(cx.plan))
                    .map_err(net_error)?;
                bootstrap::ensure_routes(&b, &remote)
            }
            Phase::Runtime => bootstrap::ensure_runtime(&b, &remote),
            Phase::ControlPlane => bootstrap::ensure_control_plane(&b, &remote),
            Phase::Workers => bootstrap::ensure_workers(&b, &remote),
            Phase::Smoke => {
                let r = match bootstrap::smoke(&b, &remote) {
                    Ok(r) => r,
                    Err(e) => {
                        line.fail(e.to_string().lines().next().unwrap_or("failed"));
                        return Err(fail(e));
                    }
                };
                for note in &r.notes {
                    cx.progress.println(&format!("    note: {note}"));
                }
                if !r.ok() {
                    line.fail("checks failed");
                    return Err(Error::Bootstrap {
                        what: format!(
                            "smoke checks failed: etcd healthy: {}, inactive units: {:?}, missing routes: {:?}",
                            r.etcd_healthy, r.inactive, r.missing_routes
                        ),
                        hint: format!("`kthw-lab ssh {} NODE` and `journalctl -u UNIT` show why", cx.plan.lab),
                        source: None,
                    });
                }
                let mut msg = "etcd healthy, every unit active, every route present".to_string();
                if let Some(w) = &r.workload {
                    msg.push_str(&format!(
                        "; {} requests from {} to service {} answered by the pods on {}",
                        w.requests,
                        w.client,
                        w.service_ip,
                        w.answers
                            .iter()
                            .map(|(n, k)| format!("{n} ({k})"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
                line.done(&msg);
                return Ok(());
            }
            other => unreachable!("{other} is not a bootstrap phase"),
        };
        match report {
            Ok(r) => {
                for note in &r.notes {
                    cx.progress.println(&format!("    note: {note}"));
                }
                let changed: Vec<String> = r
                    .changed
                    .iter()
                    .map(|(n, items)| format!("{n}: {} change(s)", items.len()))
                    .collect();
                line.done(&if changed.is_empty() {
                    "already in place".to_string()
                } else {
                    changed.join(", ")
                });
                Ok(())
            }
            Err(e) => {
                line.fail(e.to_string().lines().next().unwrap_or("failed"));
                Err(fail(e))
            }
        }
    }
}

/// Download the components a phase needs that are neither cached nor taken from the
/// image, each verified against the catalog's pinned sha256 or upstream's published
/// checksum file. A download that fails is left to the phase, which then names
/// every missing file and how to import it; on an offline host this costs seconds.
fn fetch_components(
    cx: &RunCtx,
    catalog: &crate::components::ComponentCatalog,
    state_dir: &std::path::Path,
    needed: &[&str],
) {
    use crate::cache::{blocking, Algorithm, Checksum};
    use crate::components::{parse_checksum_file, ChecksumSource, MissingReason};
    let from_image: Vec<&str> = cx.plan.from_image.iter().map(String::as_str).collect();
    let cache_dir = crate::state::cache_dir(state_dir);
    let missing = crate::components::missing_components(catalog, cx.plan, &cache_dir, &from_image);
    for m in missing
        .iter()
        .filter(|m| needed.contains(&m.component.as_str()) && m.reason == MissingReason::NotCached)
    {
        let Some((_, release)) = catalog.release_for(&m.component, &cx.plan.versions) else {
            continue;
        };
        let optional = super::bootstrap::OPTIONAL_COMPONENTS.contains(&m.component.as_str());
        // An optional download that failed once for this lab is not retried on every
        // run (offline, each try costs seconds); `cache import` still adds it.
        let gave_up = cx
            .plan
            .paths
            .root
            .join(format!("fetch-failed-{}-{}", m.component, m.version));
        if optional && gave_up.exists() {
            continue;
        }
        let line = cx.progress.line(
            &m.component,
            &format!("downloading {} {}", m.file_name, m.version),
        );
        let expected = match &release.checksum {
            ChecksumSource::Sha256(hex) => {
                Checksum::new(Algorithm::Sha256, hex).map_err(|e| e.to_string())
            }
            ChecksumSource::Url { url, entry } => blocking::fetch_text(url)
                .map_err(|e| format!("checksum list {url}: {e}"))
                .and_then(|text| {
                    parse_checksum_file(&text, entry.as_deref())
                        .ok_or_else(|| format!("no sha256 for {} in {url}", m.file_name))
                })
                .and_then(|hex| Checksum::new(Algorithm::Sha256, &hex).map_err(|e| e.to_string())),
        };
        let opts = if optional {
            crate::cache::FetchOptions::quick()
        } else {
            crate::cache::FetchOptions::default()
        };
        let result = expected.and_then(|c| {
            blocking::fetch_with(
                &opts,
                &release.url,
                &c,
                &m.expected_path,
                CacheProgress::Lines,
            )
            .map_err(|e| e.to_string())
        });
        match result {
            Ok(_) => line.done("downloaded and verified"),
            Err(e) if optional => {
                let _ = super::journal::write_atomic(&gave_up, format!("{e}\n").as_bytes(), 0o600);
                line.fail(&format!("{e} (optional: not retried for this lab)"));
            }
            Err(e) => line.fail(&e),
        }
    }
}
