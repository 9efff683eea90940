//! The bootstrap phases on the nodes: etcd, pod routes, container runtime, control
//! plane, workers, smoke. Each is an idempotent ensure: it checks what is on the
//! node (file digests, unit state), changes only what differs, restarts only what it
//! changed, then checks again.
//!
//! The commands are built by pure functions (tested without any node); the phases
//! run them through a [`Remote`]. What runs against real nodes: `etcd`, `routes` and
//! `runtime`, in the VM end-to-end tests (`tests/e2e_lab.rs`, `e2e_faults.rs`,
//! `e2e_side_by_side.rs`: `create --until runtime`). `control-plane`, `workers` and
//! `smoke` never run against a node in any test: the Kubernetes server binaries
//! cannot be obtained on the machines the tests run on. They are covered only by
//! their pure parts (commands, manifests, the RBAC and smoke steps, the rendered
//! units and flags, the API client against fixtures), by the file-sync and
//! component-install steps over SSH on loopback, and, end to end, by the error
//! `create --from control-plane --until control-plane` gives when those binaries are
//! missing (`e2e_lab`). Tests never touch this host's systemd or routes.
//!
//! Wiring, for the runner: build a [`Bootstrap`] from the plan, the component
//! catalog and the cache dir; fill `files` from the PKI distribution
//! (`FileCopy { node, local: source, remote: dest, mode }`), set `admin_kubeconfig`
//! when an admin kubeconfig is among the first controller's files, and call
//! [`Bootstrap::use_image`] for components taken from the image. Then
//! `ensure_etcd`, `ensure_routes`, `ensure_runtime`, `ensure_control_plane`,
//! `ensure_workers`, `smoke`, in that order; map errors with
//! [`BootstrapError::into_error`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::actions::phase::Phase;
use crate::components::{
    cache_path, missing_components, missing_report, ArtifactKind, ChecksumSource, ComponentCatalog,
};
use crate::kube::{ApiClient, KubeError, PodInfo};
use crate::plan::{LabPlan, NodePlan};
use crate::remote::{all_ok, exec_all, sh_quote, Remote, RemoteError};
use crate::render::manifests::{self, SmokeWorkload};
use crate::render::units::{self, on_node, Bins, NodeOs, PodRoute, RenderedFile};
use crate::scenario::Role;

/// One certificate, key or kubeconfig to copy to a node (from the PKI's
/// distribution): `(node, local path, remote path, mode)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileCopy {
    pub node: String,
    pub local: PathBuf,
    pub remote: String,
    pub mode: u32,
}

/// Every PKI file of the lab as the phases copy it: the plan's distribution flattened.
pub fn file_copies(plan: &crate::plan::LabPlan) -> Vec<FileCopy> {
    crate::pki::distribution(plan)
        .into_iter()
        .flat_map(|nf| {
            let node = nf.node;
            nf.files.into_iter().map(move |f| FileCopy {
                node: node.clone(),
                local: f.source,
                remote: f.dest,
                mode: f.mode,
            })
        })
        .collect()
}

impl From<(String, PathBuf, String, u32)> for FileCopy {
    fn from((node, local, remote, mode): (String, PathBuf, String, u32)) -> Self {
        FileCopy {
            node,
            local,
            remote,
            mode,
        }
    }
}

/// Where a phase reports what it is waiting for (a progress line).
#[derive(Clone, Copy)]
pub struct Notify<'a>(pub &'a (dyn Fn(&str) + Sync));

impl std::fmt::Debug for Notify<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Notify")
    }
}

/// Everything the phases need besides the remote.
#[derive(Debug, Clone)]
pub struct Bootstrap<'a> {
    pub plan: &'a LabPlan,
    pub catalog: &'a ComponentCatalog,
    /// The download cache root (`CACHE/components/NAME-VERSION`).
    pub cache_dir: PathBuf,
    /// Components taken from the image's Debian packages instead of the cache.
    pub from_image: Vec<String>,
    /// Certificates, keys and kubeconfigs per node.
    pub files: Vec<FileCopy>,
    /// An admin kubeconfig already on the first controller (for RBAC and smoke);
    /// `None` skips what needs it. [`Bootstrap::with_files`] sets it when the PKI
    /// hands the controllers one.
    pub admin_kubeconfig: Option<String>,
    /// The API through the load balancer, from the host (lab CA + admin certificate);
    /// `None` skips the readiness wait and the workload smoke test.
    pub api: Option<ApiClient>,
    /// The smoke test's workload (image pinned by digest).
    pub smoke_workload: SmokeWorkload,
    /// Progress while waiting; `None` is silent.
    pub notify: Option<Notify<'a>>,
    pub bins: Bins,
    pub os: NodeOs,
    /// How long to wait for services to come up (TCG is slow).
    pub settle: Duration,
    /// Prefix for every path component installs write on the node (like DESTDIR);
    /// empty on real nodes.
    pub install_root: String,
}

impl<'a> Bootstrap<'a> {
    pub fn new(plan: &'a LabPlan, catalog: &'a ComponentCatalog, cache_dir: &Path) -> Self {
        Bootstrap {
            plan,
            catalog,
            cache_dir: cache_dir.to_path_buf(),
            from_image: Vec::new(),
            files: Vec::new(),
            admin_kubeconfig: None,
            api: None,
            smoke_workload: SmokeWorkload::builtin()
                .expect("components/smoke.yaml is compiled in and unit-tested"),
            notify: None,
            bins: Bins::downloaded(),
            os: NodeOs::default(),
            settle: Duration::from_secs(180),
            install_root: String::new(),
        }
    }

    /// Take `components` (`etcd`, `containerd`, `runc`, `cni-plugins`) from the
    /// image's Debian packages: skips their cache files and points the units at the
    /// package paths, keeping the two consistent.
    pub fn use_image(mut self, components: &[&str]) -> Self {
        self.from_image = components.iter().map(|c| c.to_string()).collect();
        if components.contains(&"etcd") {
            // etcdctl comes with it (package etcd-client).
            self.from_image.push("etcdctl".into());
        }
        self.bins = Bins::with_image(self.catalog, &self.plan.image, components);
        self
    }

    /// The PKI files to copy; the admin kubeconfig among the first controller's makes
    /// RBAC and the smoke workload possible.
    pub fn with_files(mut self, files: Vec<FileCopy>) -> Self {
        let first = self.plan.controllers().next().map(|c| c.name.clone());
        self.admin_kubeconfig = files
            .iter()
            .find(|f| Some(&f.node) == first.as_ref() && f.remote == on_node::ADMIN_KUBECONFIG)
            .map(|f| f.remote.clone());
        self.files = files;
        self
    }

    fn say(&self, msg: &str) {
        if let Some(n) = self.notify {
            (n.0)(msg);
        }
    }

    fn uses_image(&self, component: &str) -> bool {
        self.from_image.iter().any(|c| c == component)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("{0}")]
    MissingComponents(String),
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error("cannot read {path}: {source}")]
    Local {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: sha256 {got} does not match the catalog's pinned {want}")]
    CacheMismatch {
        path: PathBuf,
        want: String,
        got: String,
    },
    #[error("{node}: {what} did not become ready: {detail}")]
    NotReady {
        node: String,
        what: String,
        detail: String,
    },
    #[error(transparent)]
    Api(#[from] KubeError),
    #[error("{step}: {detail}")]
    Smoke {
        step: String,
        detail: String,
        hint: String,
    },
}

impl BootstrapError {
    /// The crate error for the runner: exit code 12, the chain, and the hint.
    pub fn into_error(self, what: &str) -> crate::error::Error {
        crate::error::Error::Bootstrap {
            what: what.to_string(),
            hint: self.hint().unwrap_or_default(),
            source: Some(Box::new(self)),
        }
    }

    pub fn hint(&self) -> Option<String> {
        match self {
            BootstrapError::MissingComponents(_) => {
                Some("see the hint lines above; `kthw-lab cache import DIR` adds the files".into())
            }
            BootstrapError::Remote(e) => e.hint(),
            BootstrapError::Local { .. } => {
                Some("run the pki phase first (`kthw-lab create --from pki`)".into())
            }
            BootstrapError::CacheMismatch { path, .. } => Some(format!(
                "remove {} and download or import it again",
                path.display()
            )),
            BootstrapError::NotReady { node, what, .. } => Some(format!(
                "look at `journalctl -u {what}` on {node}; the phase can be rerun"
            )),
            BootstrapError::Api(e) => e.hint(),
            BootstrapError::Smoke { hint, .. } => Some(hint.clone()),
        }
    }
}

/// What a phase changed, per node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PhaseReport {
    /// node -> paths written and units restarted.
    pub changed: BTreeMap<String, Vec<String>>,
    pub notes: Vec<String>,
}

impl PhaseReport {
    fn merge(&mut self, node: &str, items: Vec<String>) {
        if !items.is_empty() {
            self.changed
                .entry(node.to_string())
                .or_default()
                .extend(items);
        }
    }

    pub fn is_noop(&self) -> bool {
        self.changed.is_empty()
    }
}

const SHORT: Duration = Duration::from_secs(60);

// ---- pure command builders ------------------------------------------------------

/// Reload units, enable them, restart those whose inputs changed and start the rest
/// (a no-op for running ones). `--no-block` for etcd, whose first member only
/// reports ready once a quorum is up.
pub fn systemd_apply_cmd(units: &[&str], changed: bool, no_block: bool) -> String {
    let list = units.join(" ");
    let nb = if no_block { " --no-block" } else { "" };
    let action = if changed { "restart" } else { "start" };
    // A daemon-reload costs seconds under emulation: only when a file changed, or when
    // systemd says its loaded copy is stale (a run killed between upload and reload).
    // `enable --no-reload` only makes the symlinks; starting needs no reload for them.
    let reload = if changed {
        "systemctl daemon-reload".to_string()
    } else {
        format!(
            "if systemctl show -p NeedDaemonReload --value {list} | grep -qx yes; then systemctl daemon-reload; fi"
        )
    };
    // `enable` of a unit that also has a SysV script (Debian's etcd has one) runs
    // update-rc.d through systemd-sysv-install: Perl, about 6 s on an idle TCG guest
    // and over a minute on a loaded one, for rc.d links that systemd never reads (a
    // native unit of the same name hides the script). SYSTEMCTL_SKIP_SYSV=1 skips that
    // hook: 0.2 s. And only when not enabled yet.
    let sc = "SYSTEMCTL_SKIP_SYSV=1 systemctl";
    format!(
        "{reload} && {{ {sc} is-enabled --quiet {list} || {sc} --no-reload enable {list}; }} && systemctl{nb} {action} {list}"
    )
}

/// `systemctl is-active` for several units; one state per line, in order.
pub fn is_active_cmd(units: &[&str]) -> String {
    format!("systemctl is-active {} || true", units.join(" "))
}

/// The units of `units` that are not `active` in `is-active` output.
pub fn inactive_units<'u>(units: &[&'u str], output: &str) -> Vec<(&'u str, String)> {
    let states: Vec<&str> = output.lines().map(str::trim).collect();
    units
        .iter()
        .enumerate()
        .filter_map(|(i, u)| {
            let s = states.get(i).copied().unwrap_or("unknown");
            (s != "active").then(|| (*u, s.to_string()))
        })
        .collect()
}

/// etcd health over TLS with the controller's own etcd certificate, every member.
pub fn etcd_health_cmd(plan: &LabPlan, node: &NodePlan, bins: &Bins) -> String {
    etcd_health_cmd_with(
        &bins.etcdctl,
        &plan.cluster.etcd_endpoints,
        &on_node::etcd_ca(),
        &on_node::etcd_cert(&node.name),
        &on_node::etcd_key(&node.name),
    )
}

/// [`etcd_health_cmd`] with explicit paths.
pub fn etcd_health_cmd_with(
    etcdctl: &str,
    endpoints: &[String],
    ca: &str,
    cert: &str,
    key: &str,
) -> String {
    format!(
        "ETCDCTL_API=3 {etcdctl} --endpoints={eps} --cacert={ca} --cert={cert} --key={key} --command-timeout=5s endpoint health",
        eps = endpoints.join(","),
        ca = sh_quote(ca),
        cert = sh_quote(cert),
        key = sh_quote(key),
    )
}

/// Endpoints reported unhealthy (or missing) by `etcdctl endpoint health`.
pub fn unhealthy_endpoints(plan: &LabPlan, output: &str) -> Vec<String> {
    plan.cluster
        .etcd_endpoints
        .iter()
        .filter(|ep| {
            !output
                .lines()
                .any(|l| l.starts_with(ep.as_str()) && l.contains("is healthy"))
        })
        .cloned()
        .collect()
}

/// Installing one file from a release archive already on the node.
pub fn extract_cmd(archive: &str, inside: &str, dest: &str, mode: u32) -> String {
    let dir = format!("{archive}.d");
    format!(
        "set -e; rm -rf {d}; mkdir -p {d}; tar -xzf {a} -C {d} {i}; install -D -m {m:o} {d}/{i} {t}; rm -rf {d}",
        d = sh_quote(&dir),
        a = sh_quote(archive),
        i = sh_quote(inside.trim_start_matches("./")),
        m = mode,
        t = sh_quote(dest),
    )
}

/// `ip -j route show` -> the expected routes that are missing.
pub fn missing_routes(expected: &[PodRoute], ip_json: &str) -> Result<Vec<PodRoute>, String> {
    let v: serde_json::Value =
        serde_json::from_str(ip_json).map_err(|e| format!("`ip -j route` output: {e}"))?;
    let routes = v.as_array().ok_or("`ip -j route` output is not a list")?;
    Ok(expected
        .iter()
        .filter(|r| {
            !routes.iter().any(|x| {
                x["dst"].as_str() == Some(r.dst.as_str())
                    && x["gateway"].as_str() == Some(r.via.as_str())
            })
        })
        .cloned()
        .collect())
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

// ---- steps on one node -------------------------------------------------------------

/// sha256 of each existing file among `paths`, in one round trip.
pub fn digests_cmd(paths: &[&str]) -> String {
    let list: Vec<String> = paths.iter().map(|p| sh_quote(p)).collect();
    format!(
        "for f in {}; do if [ -f \"$f\" ]; then sha256sum \"$f\"; fi; done",
        list.join(" ")
    )
}

/// `sha256sum` lines -> path -> digest.
pub fn parse_digests(output: &str) -> BTreeMap<String, String> {
    output
        .lines()
        .filter_map(|l| {
            let (hash, path) = l.split_once("  ")?;
            Some((path.to_string(), hash.to_string()))
        })
        .collect()
}

fn remote_digests<R: Remote + ?Sized>(
    remote: &R,
    node: &str,
    paths: &[&str],
) -> Result<BTreeMap<String, String>, RemoteError> {
    if paths.is_empty() {
        return Ok(BTreeMap::new());
    }
    Ok(parse_digests(
        &remote.run(node, &digests_cmd(paths), SHORT)?.stdout,
    ))
}

/// Put each file on the node unless it is already there byte for byte; the paths
/// written. Check (one digest round trip), act (atomic uploads of what differs),
/// check (digests of what was written).
pub fn sync_files<R: Remote + ?Sized>(
    remote: &R,
    node: &str,
    files: &[RenderedFile],
) -> Result<Vec<String>, RemoteError> {
    let paths: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
    let have = remote_digests(remote, node, &paths)?;
    let mut written = Vec::new();
    for f in files {
        let want = sha256_hex(f.content.as_bytes());
        if have.get(&f.path) == Some(&want) {
            continue;
        }
        remote.upload(node, f.content.as_bytes(), &f.path, f.mode, "root:root")?;
        written.push(f.path.clone());
    }
    let paths: Vec<&str> = written.iter().map(String::as_str).collect();
    let now = remote_digests(remote, node, &paths)?;
    for f in files.iter().filter(|f| written.contains(&f.path)) {
        let want = sha256_hex(f.content.as_bytes());
        if now.get(&f.path) != Some(&want) {
            return Err(RemoteError::Channel {
                node: node.to_string(),
                cmd: format!("upload {}", f.path),
                reason: format!(
                    "content differs after upload (sha256 {:?}, wanted {want})",
                    now.get(&f.path)
                ),
            });
        }
    }
    Ok(written)
}

/// Copy the PKI files of `node` whose remote path passes `keep`.
fn sync_copies<R: Remote + ?Sized>(
    remote: &R,
    node: &str,
    copies: &[FileCopy],
    keep: impl Fn(&str) -> bool,
) -> Result<Vec<String>, BootstrapError> {
    let mut files = Vec::new();
    for c in copies.iter().filter(|c| c.node == node && keep(&c.remote)) {
        let bytes = std::fs::read(&c.local).map_err(|source| BootstrapError::Local {
            path: c.local.clone(),
            source,
        })?;
        files.push(RenderedFile {
            path: c.remote.clone(),
            mode: c.mode,
            // PEM and kubeconfigs are text.
            content: String::from_utf8_lossy(&bytes).into_owned(),
        });
    }
    Ok(sync_files(remote, node, &files)?)
}

/// Install a component's files from the cache unless the node has them already:
/// single binaries are compared by digest, archives by a marker naming the digest of
/// the archive their files came from. A cached file that does not match the
/// catalog's pinned sha256 is refused.
pub fn install_component<R: Remote + ?Sized>(
    b: &Bootstrap,
    remote: &R,
    node: &str,
    name: &str,
) -> Result<Vec<String>, BootstrapError> {
    if b.uses_image(name) {
        return Ok(Vec::new());
    }
    let Some((version, rel)) = b.catalog.release_for(name, &b.plan.versions) else {
        return Err(BootstrapError::MissingComponents(format!(
            "{name}: the component catalog has no version for this plan"
        )));
    };
    let local = cache_path(&b.cache_dir, name, version);
    let bytes = std::fs::read(&local).map_err(|_| {
        BootstrapError::MissingComponents(missing_report(&missing_components(
            b.catalog,
            b.plan,
            &b.cache_dir,
            &b.from_image.iter().map(String::as_str).collect::<Vec<_>>(),
        )))
    })?;
    let digest = sha256_hex(&bytes);
    if let ChecksumSource::Sha256(want) = &rel.checksum {
        if *want != digest {
            return Err(BootstrapError::CacheMismatch {
                path: local,
                want: want.clone(),
                got: digest,
            });
        }
    }
    let root = b.install_root.trim_end_matches('/');
    let at = |p: &str| format!("{root}{p}");
    let mut done = Vec::new();
    match rel.kind {
        ArtifactKind::Binary => {
            let f = &rel.install[0];
            let to = at(&f.to);
            if remote.file_sha256(node, &to)?.as_deref() != Some(digest.as_str()) {
                remote.upload(node, &bytes, &to, f.mode, "root:root")?;
                done.push(to);
            }
        }
        ArtifactKind::TarGz => {
            // A marker records which archive the installed files came from.
            let marker = at(&format!("/var/lib/kthw/components/{name}.sha256"));
            let have = remote
                .run(
                    node,
                    &format!("cat {} 2>/dev/null || true", sh_quote(&marker)),
                    SHORT,
                )?
                .stdout;
            let all_there = rel
                .install
                .iter()
                .map(|f| format!("[ -x {} ]", sh_quote(&at(&f.to))));
            let check = all_there.collect::<Vec<_>>().join(" && ");
            let present = remote.exec(node, &check, SHORT)?.success();
            if have.trim() != digest || !present {
                let archive = at(&format!("/var/cache/kthw/{}", rel.file_name()));
                remote.upload(node, &bytes, &archive, 0o600, "root:root")?;
                for f in &rel.install {
                    let from = f.from.as_deref().unwrap_or_default();
                    let to = at(&f.to);
                    remote.run(node, &extract_cmd(&archive, from, &to, f.mode), SHORT)?;
                    done.push(to);
                }
                remote.upload(
                    node,
                    format!("{digest}\n").as_bytes(),
                    &marker,
                    0o644,
                    "root:root",
                )?;
                remote.run(node, &format!("rm -f {}", sh_quote(&archive)), SHORT)?;
            }
        }
    }
    Ok(done)
}

/// Fail early, with one message, when the cache lacks any of `names`.
fn require_cached(b: &Bootstrap, names: &[&str]) -> Result<(), BootstrapError> {
    let from_image: Vec<&str> = b.from_image.iter().map(String::as_str).collect();
    let missing: Vec<_> = missing_components(b.catalog, b.plan, &b.cache_dir, &from_image)
        .into_iter()
        .filter(|m| names.contains(&m.component.as_str()))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(BootstrapError::MissingComponents(missing_report(&missing)))
    }
}

/// Poll until every unit is active, or the settle time is up.
fn wait_active<R: Remote + ?Sized>(
    b: &Bootstrap,
    remote: &R,
    node: &str,
    units: &[&str],
) -> Result<(), BootstrapError> {
    let deadline = std::time::Instant::now() + b.settle;
    loop {
        let out = remote.exec(node, &is_active_cmd(units), SHORT)?;
        let bad = inactive_units(units, &out.stdout);
        if bad.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            let (unit, state) = &bad[0];
            let log = remote
                .exec(
                    node,
                    &format!("journalctl -u {unit} -n 15 --no-pager || true"),
                    SHORT,
                )
                .map(|o| o.stdout)
                .unwrap_or_default();
            return Err(BootstrapError::NotReady {
                node: node.to_string(),
                what: unit.to_string(),
                detail: format!("state {state}; last log lines:\n{log}"),
            });
        }
        std::thread::sleep(Duration::from_secs(3));
    }
}

fn node_names(plan: &LabPlan, role: Option<Role>) -> Vec<&str> {
    plan.nodes
        .iter()
        .filter(|n| role.is_none_or(|r| n.role == r))
        .map(|n| n.name.as_str())
        .collect()
}

fn collect(
    results: Vec<(String, Result<Vec<String>, BootstrapError>)>,
) -> Result<PhaseReport, BootstrapError> {
    let mut report = PhaseReport::default();
    for (node, r) in results {
        report.merge(&node, r?);
    }
    Ok(report)
}

/// Run `f` on every node at once, results in node order.
fn par<R, F>(remote: &R, nodes: &[&str], f: F) -> Vec<(String, Result<Vec<String>, BootstrapError>)>
where
    R: Remote + ?Sized,
    F: Fn(&R, &str) -> Result<Vec<String>, BootstrapError> + Sync,
{
    exec_all(remote, nodes, f)
}

/// Whether a worker file belongs to the container runtime (phase `runtime`): kernel
/// modules and sysctls, containerd's config and unit, the CNI configuration.
fn is_runtime_file(path: &str) -> bool {
    let under = |dir: &str| path.starts_with(&format!("{}/", dir.trim_end_matches('/')));
    under("/etc/modules-load.d")
        || under("/etc/sysctl.d")
        || under("/etc/containerd")
        || under(on_node::CNI_CONF_DIR)
        || path == format!("{}/containerd.service", on_node::SYSTEMD_DIR)
}

/// Whether a worker file belongs to kubelet or kube-proxy (phase `workers`).
fn is_kubelet_file(path: &str) -> bool {
    let under = |dir: &str| path.starts_with(&format!("{dir}/"));
    under(on_node::KUBELET_DIR)
        || under(on_node::KUBE_PROXY_DIR)
        || path == format!("{}/kubelet.service", on_node::SYSTEMD_DIR)
        || path == format!("{}/kube-proxy.service", on_node::SYSTEMD_DIR)
}

fn is_etcd_unit(path: &str) -> bool {
    path == format!("{}/etcd.service", on_node::SYSTEMD_DIR)
}

/// The rendered files phase `phase` installs on `node` (certificates, keys and
/// kubeconfigs come from the PKI as [`FileCopy`]s, apart from these). Every file the
/// renderer makes for a node (`units::controller_files`/`worker_files` and
/// `units::route_files`, the set the golden files cover) belongs to exactly one phase,
/// and a test holds it so: a file under a new directory must be given to a phase
/// here, or it would be golden-tested and never installed.
pub fn phase_files(
    phase: Phase,
    plan: &LabPlan,
    node: &NodePlan,
    bins: &Bins,
    os: &NodeOs,
) -> Vec<RenderedFile> {
    let role_files = || match node.role {
        Role::Controller => units::controller_files(plan, node, bins),
        Role::Worker => units::worker_files(plan, node, bins, os),
    };
    let pick = |keep: &dyn Fn(&str) -> bool| -> Vec<RenderedFile> {
        role_files().into_iter().filter(|f| keep(&f.path)).collect()
    };
    match (phase, node.role) {
        (Phase::Etcd, Role::Controller) => pick(&is_etcd_unit),
        (Phase::Routes, _) => units::route_files(plan, node, os),
        (Phase::Runtime, Role::Worker) => pick(&is_runtime_file),
        // Everything else a controller gets: the control plane's units and configs.
        (Phase::ControlPlane, Role::Controller) => pick(&|p| !is_etcd_unit(p)),
        (Phase::Workers, Role::Worker) => pick(&is_kubelet_file),
        _ => Vec::new(),
    }
}

// ---- phases -------------------------------------------------------------------------

/// etcd on every controller, started together (a member waits for its peers), then
/// healthy over TLS on every endpoint.
pub fn ensure_etcd<R: Remote + ?Sized>(
    b: &Bootstrap,
    remote: &R,
) -> Result<PhaseReport, BootstrapError> {
    require_cached(b, &["etcd"])?;
    let controllers = node_names(b.plan, Some(Role::Controller));
    let report = collect(par(remote, &controllers, |r, name| {
        let node = b.plan.node(name).expect("planned node");
        let mut changed = install_component(b, r, name, "etcd")?;
        changed.extend(sync_copies(r, name, &b.files, |p| {
            p.starts_with(on_node::ETCD_DIR)
        })?);
        r.run(
            name,
            &format!("install -d -m 700 {}", on_node::ETCD_DATA_DIR),
            SHORT,
        )?;
        let files = phase_files(Phase::Etcd, b.plan, node, &b.bins, &b.os);
        changed.extend(sync_files(r, name, &files)?);
        r.run(
            name,
            &systemd_apply_cmd(&["etcd"], !changed.is_empty(), true),
            SHORT,
        )?;
        if !changed.is_empty() {
            changed.push("restarted etcd".into());
        }
        Ok(changed)
    }))?;
    // Check: every member healthy, seen from every controller.
    let deadline = std::time::Instant::now() + b.settle;
    for name in &controllers {
        let node = b.plan.node(name).expect("planned node");
        loop {
            let out = remote.exec(name, &etcd_health_cmd(b.plan, node, &b.bins), SHORT)?;
            let bad = unhealthy_endpoints(b.plan, &format!("{}{}", out.stdout, out.stderr));
            if bad.is_empty() {
                break;
            }
            if std::time::Instant::now() >= deadline {
                return Err(BootstrapError::NotReady {
                    node: name.to_string(),
                    what: "etcd".into(),
                    detail: format!(
                        "unhealthy: {}\n{}",
                        bad.join(", "),
                        crate::remote::tail(&out.stderr, 10)
                    ),
                });
            }
            std::thread::sleep(Duration::from_secs(3));
        }
    }
    Ok(report)
}

/// Host-gw routes on every node: the unit and the networkd drop-in, the unit
/// (re)started when it changed, then each route checked with `ip -j route`.
pub fn ensure_routes<R: Remote + ?Sized>(
    b: &Bootstrap,
    remote: &R,
) -> Result<PhaseReport, BootstrapError> {
    let nodes = node_names(b.plan, None);
    collect(par(remote, &nodes, |r, name| {
        let node = b.plan.node(name).expect("planned node");
        let files = phase_files(Phase::Routes, b.plan, node, &b.bins, &b.os);
        let mut changed = sync_files(r, name, &files)?;
        let unit = units::POD_ROUTES_UNIT.trim_end_matches(".service");
        r.run(
            name,
            &systemd_apply_cmd(&[unit], !changed.is_empty(), false),
            SHORT,
        )?;
        let expected = units::pod_routes(b.plan, node);
        let out = r.run(name, &format!("{} -j route show", b.os.ip), SHORT)?;
        let missing =
            missing_routes(&expected, &out.stdout).map_err(|detail| BootstrapError::NotReady {
                node: name.to_string(),
                what: units::POD_ROUTES_UNIT.into(),
                detail,
            })?;
        if !missing.is_empty() {
            return Err(BootstrapError::NotReady {
                node: name.to_string(),
                what: units::POD_ROUTES_UNIT.into(),
                detail: missing
                    .iter()
                    .map(|m| format!("no route to {} via {}", m.dst, m.via))
                    .collect::<Vec<_>>()
                    .join("; "),
            });
        }
        if !changed.is_empty() {
            changed.push(format!("restarted {}", units::POD_ROUTES_UNIT));
        }
        Ok(changed)
    }))
}

const RUNTIME_UNITS: &[&str] = &["containerd"];

/// Components a lab works without (debugging clients): installed when cached, fetched
/// with one quick attempt, and not fetched again for a lab once that attempt failed.
pub const OPTIONAL_COMPONENTS: &[&str] = &["crictl"];

/// Kernel settings, containerd, runc, CNI plugins and crictl on every worker.
pub fn ensure_runtime<R: Remote + ?Sized>(
    b: &Bootstrap,
    remote: &R,
) -> Result<PhaseReport, BootstrapError> {
    require_cached(b, &["containerd", "runc", "cni-plugins"])?;
    // crictl is a debugging client, not needed to run pods: installed when cached.
    let from_image: Vec<&str> = b.from_image.iter().map(String::as_str).collect();
    let missing = missing_components(b.catalog, b.plan, &b.cache_dir, &from_image);
    let absent: Vec<&str> = OPTIONAL_COMPONENTS
        .iter()
        .copied()
        .filter(|c| missing.iter().any(|m| m.component == *c))
        .collect();
    let mut components = vec!["runc", "cni-plugins", "containerd"];
    components.extend(OPTIONAL_COMPONENTS.iter().filter(|c| !absent.contains(c)));
    let workers = node_names(b.plan, Some(Role::Worker));
    let mut report = collect(par(remote, &workers, |r, name| {
        let node = b.plan.node(name).expect("planned node");
        let mut changed = Vec::new();
        for c in &components {
            changed.extend(install_component(b, r, name, c)?);
        }
        let files = phase_files(Phase::Runtime, b.plan, node, &b.bins, &b.os);
        changed.extend(sync_files(r, name, &files)?);
        r.run(
            name,
            "modprobe overlay && modprobe br_netfilter && sysctl --system >/dev/null && swapoff -a",
            SHORT,
        )?;
        r.run(
            name,
            &systemd_apply_cmd(RUNTIME_UNITS, !changed.is_empty(), false),
            SHORT,
        )?;
        wait_active(b, r, name, RUNTIME_UNITS)?;
        if !changed.is_empty() {
            changed.push("restarted containerd".into());
        }
        Ok(changed)
    }))?;
    for c in absent {
        report.notes.push(format!(
            "{c} is not in the cache, so it was not installed (`kthw-lab cache import DIR` adds it)"
        ));
    }
    Ok(report)
}

const CONTROL_UNITS: &[&str] = &[
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
];

/// The control plane on every controller (in parallel: each apiserver only needs
/// etcd), then the RBAC that lets apiservers reach kubelets.
pub fn ensure_control_plane<R: Remote + ?Sized>(
    b: &Bootstrap,
    remote: &R,
) -> Result<PhaseReport, BootstrapError> {
    require_cached(
        b,
        &[
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
            "kubectl",
        ],
    )?;
    let controllers = node_names(b.plan, Some(Role::Controller));
    let mut report = collect(par(remote, &controllers, |r, name| {
        let node = b.plan.node(name).expect("planned node");
        let mut changed = Vec::new();
        for c in [
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
            "kubectl",
        ] {
            changed.extend(install_component(b, r, name, c)?);
        }
        changed.extend(sync_copies(r, name, &b.files, |p| {
            !p.starts_with(on_node::ETCD_DIR)
        })?);
        if b.files
            .iter()
            .any(|f| f.node == name && f.remote == on_node::ADMIN_KUBECONFIG)
        {
            // `sudo kubectl ...` on the controller finds the admin kubeconfig.
            r.run(name, &root_kubeconfig_cmd(), SHORT)?;
        }
        let files = phase_files(Phase::ControlPlane, b.plan, node, &b.bins, &b.os);
        changed.extend(sync_files(r, name, &files)?);
        r.run(
            name,
            &systemd_apply_cmd(CONTROL_UNITS, !changed.is_empty(), false),
            SHORT,
        )?;
        wait_active(b, r, name, CONTROL_UNITS)?;
        if !changed.is_empty() {
            changed.push("restarted the control plane".into());
        }
        Ok(changed)
    }))?;
    match &b.api {
        Some(api) => {
            b.say(&format!("waiting for the API at {}", api.endpoint));
            api.wait_ready(b.settle, Duration::from_secs(3), &|m| b.say(m))?;
        }
        None => report.notes.push(
            "no admin certificate on the host: the API was not checked through the load balancer"
                .into(),
        ),
    }
    match rbac_steps(b)? {
        Some(steps) => {
            b.say("applying the RBAC for apiserver-to-kubelet");
            let written = sync_files(remote, &steps.node, std::slice::from_ref(&steps.manifest))?;
            remote.run(&steps.node, &steps.apply, SHORT)?;
            for (what, cmd) in &steps.verify {
                let out = remote.exec(&steps.node, cmd, SHORT)?;
                if out.stdout.trim() != "yes" {
                    return Err(BootstrapError::NotReady {
                        node: steps.node.clone(),
                        what: "kube-apiserver".into(),
                        detail: format!(
                            "after applying {}, `{cmd}` answered {:?} for {what}{}",
                            steps.manifest.path,
                            out.stdout.trim(),
                            crate::remote::tail(&out.stderr, 5)
                        ),
                    });
                }
            }
            report.merge(&steps.node, written);
        }
        None => report.notes.push(
            "no admin kubeconfig on the controllers: RBAC for apiserver-to-kubelet not applied"
                .into(),
        ),
    }
    Ok(report)
}

/// Point root's default kubeconfig at the admin kubeconfig (idempotent).
pub fn root_kubeconfig_cmd() -> String {
    format!(
        "install -d -m 700 /root/.kube && ln -sfn {} /root/.kube/config",
        on_node::ADMIN_KUBECONFIG
    )
}

/// `kubectl --kubeconfig KC ARGS` with the node's kubectl.
pub fn kubectl_cmd(b: &Bootstrap, kubeconfig: &str, args: &str) -> String {
    format!(
        "{} --kubeconfig {} {args}",
        b.bins.kubectl,
        sh_quote(kubeconfig)
    )
}

/// Where the RBAC manifest for apiserver-to-kubelet lands on the first controller.
pub const RBAC_MANIFEST: &str = "/var/lib/kubernetes/kthw-rbac-apiserver-to-kubelet.yaml";

/// The RBAC step of the control-plane phase, as data: the manifest to put on the
/// first controller, the idempotent `kubectl apply`, and one `kubectl auth can-i`
/// per kubelet API subresource that must then answer `yes` for the apiserver's
/// kubelet client user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbacSteps {
    pub node: String,
    pub manifest: RenderedFile,
    pub apply: String,
    /// (subresource, command).
    pub verify: Vec<(String, String)>,
}

/// `None` when there is no admin kubeconfig on the controllers to apply it with.
pub fn rbac_steps(b: &Bootstrap) -> Result<Option<RbacSteps>, BootstrapError> {
    let (Some(kc), Some(first)) = (&b.admin_kubeconfig, b.plan.controllers().next()) else {
        return Ok(None);
    };
    let user = manifests::apiserver_kubelet_user(b.plan).ok_or_else(|| {
        BootstrapError::MissingComponents(format!(
            "the plan has no `{}` certificate, so there is no user to bind",
            manifests::APISERVER_KUBELET_CLIENT_CERT
        ))
    })?;
    let verify = manifests::KUBELET_API_RESOURCES
        .iter()
        .map(|r| {
            let sub = r.trim_start_matches("nodes/");
            (
                r.to_string(),
                kubectl_cmd(
                    b,
                    kc,
                    &format!(
                        "auth can-i get nodes --subresource={sub} --as={}",
                        sh_quote(user)
                    ),
                ),
            )
        })
        .collect();
    Ok(Some(RbacSteps {
        node: first.name.clone(),
        manifest: RenderedFile {
            path: RBAC_MANIFEST.into(),
            mode: 0o644,
            content: manifests::rbac_apiserver_to_kubelet(user),
        },
        apply: kubectl_cmd(b, kc, &format!("apply -f {RBAC_MANIFEST}")),
        verify,
    }))
}

const WORKER_UNITS: &[&str] = &["kubelet", "kube-proxy"];

/// kubelet and kube-proxy on every worker, in parallel.
pub fn ensure_workers<R: Remote + ?Sized>(
    b: &Bootstrap,
    remote: &R,
) -> Result<PhaseReport, BootstrapError> {
    require_cached(b, &["kubelet", "kube-proxy", "kubectl"])?;
    let workers = node_names(b.plan, Some(Role::Worker));
    collect(par(remote, &workers, |r, name| {
        let node = b.plan.node(name).expect("planned node");
        let mut changed = Vec::new();
        for c in ["kubelet", "kube-proxy", "kubectl"] {
            changed.extend(install_component(b, r, name, c)?);
        }
        changed.extend(sync_copies(r, name, &b.files, |_| true)?);
        let files = phase_files(Phase::Workers, b.plan, node, &b.bins, &b.os);
        changed.extend(sync_files(r, name, &files)?);
        r.run(
            name,
            &systemd_apply_cmd(WORKER_UNITS, !changed.is_empty(), false),
            SHORT,
        )?;
        wait_active(b, r, name, WORKER_UNITS)?;
        if !changed.is_empty() {
            changed.push("restarted kubelet and kube-proxy".into());
        }
        Ok(changed)
    }))
}

/// What the smoke check saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SmokeReport {
    pub etcd_healthy: bool,
    /// node -> units not active.
    pub inactive: BTreeMap<String, Vec<String>>,
    /// node -> routes missing.
    pub missing_routes: BTreeMap<String, Vec<String>>,
    /// The workload test through a service, when it ran (it failing is an error).
    pub workload: Option<WorkloadReport>,
    /// Why a check did not run.
    pub notes: Vec<String>,
}

impl SmokeReport {
    pub fn ok(&self) -> bool {
        self.etcd_healthy && self.inactive.is_empty() && self.missing_routes.is_empty()
    }
}

/// What the workload test proved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkloadReport {
    pub service_ip: String,
    /// The worker the requests were sent from.
    pub client: String,
    pub pods: Vec<PodInfo>,
    /// worker -> answers from the smoke pod on it.
    pub answers: BTreeMap<String, usize>,
    pub requests: usize,
}

/// Read-only checks over the whole lab (etcd health, units active, routes present),
/// then, when they pass and the API can be reached, the workload test
/// ([`smoke_workload`]).
pub fn smoke<R: Remote + ?Sized>(b: &Bootstrap, remote: &R) -> Result<SmokeReport, BootstrapError> {
    let mut rep = SmokeReport::default();
    let controllers: Vec<&NodePlan> = b.plan.controllers().collect();
    if let Some(c) = controllers.first() {
        let out = remote.exec(&c.name, &etcd_health_cmd(b.plan, c, &b.bins), SHORT)?;
        rep.etcd_healthy =
            unhealthy_endpoints(b.plan, &format!("{}{}", out.stdout, out.stderr)).is_empty();
    }
    let nodes = node_names(b.plan, None);
    let results = all_ok(exec_all(remote, &nodes, |r, name| {
        let node = b.plan.node(name).expect("planned node");
        let mut units: Vec<&str> = match node.role {
            Role::Controller => vec!["etcd"],
            Role::Worker => RUNTIME_UNITS.to_vec(),
        };
        units.extend(match node.role {
            Role::Controller => CONTROL_UNITS,
            Role::Worker => WORKER_UNITS,
        });
        let act = r.exec(name, &is_active_cmd(&units), SHORT)?;
        let inactive: Vec<String> = inactive_units(&units, &act.stdout)
            .into_iter()
            .map(|(u, s)| format!("{u} ({s})"))
            .collect();
        let routes = r.run(name, &format!("{} -j route show", b.os.ip), SHORT)?;
        let missing = missing_routes(&units::pod_routes(b.plan, node), &routes.stdout)
            .unwrap_or_default()
            .into_iter()
            .map(|m| format!("{} via {}", m.dst, m.via))
            .collect::<Vec<_>>();
        Ok((inactive, missing))
    }))?;
    for (node, (inactive, missing)) in results {
        if !inactive.is_empty() {
            rep.inactive.insert(node.clone(), inactive);
        }
        if !missing.is_empty() {
            rep.missing_routes.insert(node, missing);
        }
    }
    if !rep.ok() {
        rep.notes
            .push("the workload test did not run: the checks above failed first".into());
        return Ok(rep);
    }
    match &b.api {
        Some(api) => {
            b.say(&format!("checking the API at {}", api.endpoint));
            api.wait_ready(SMOKE_API_WAIT, Duration::from_secs(3), &|m| b.say(m))?;
        }
        None => {
            rep.notes.push(
                "the workload test did not run: no admin certificate on the host to reach the API"
                    .into(),
            );
            return Ok(rep);
        }
    }
    match smoke_steps(b)? {
        Some(steps) => rep.workload = Some(smoke_workload(b, remote, &steps)?),
        None => rep
            .notes
            .push("the workload test did not run: no admin kubeconfig on the controllers".into()),
    }
    Ok(rep)
}

/// How long smoke waits for an API the control-plane phase already saw ready.
const SMOKE_API_WAIT: Duration = Duration::from_secs(60);
/// Requests per round through the service.
const REQUESTS_PER_ROUND: usize = 20;

/// Where the smoke manifest lands on the first controller.
pub const SMOKE_MANIFEST: &str = "/var/lib/kubernetes/kthw-smoke.yaml";

/// The workload test as data: every command is built here, from the plan, so the
/// wiring is checked without a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmokeSteps {
    /// Where `kubectl` runs (the first controller, with the admin kubeconfig).
    pub controller: String,
    /// The worker the requests are sent from.
    pub client: String,
    pub manifest: RenderedFile,
    /// Removes leftover smoke objects and waits until they are gone; succeeds when
    /// there are none.
    pub cleanup: String,
    /// Removes the test's own objects after a pass, without waiting.
    pub remove: String,
    pub apply: String,
    pub pods: String,
    pub service: String,
    pub service_port: u16,
}

/// `None` when there is no admin kubeconfig or no worker.
pub fn smoke_steps(b: &Bootstrap) -> Result<Option<SmokeSteps>, BootstrapError> {
    let (Some(kc), Some(controller), Some(client)) = (
        &b.admin_kubeconfig,
        b.plan.controllers().next(),
        b.plan.workers().next(),
    ) else {
        return Ok(None);
    };
    let ns = manifests::SMOKE_NAMESPACE;
    Ok(Some(SmokeSteps {
        controller: controller.name.clone(),
        client: client.name.clone(),
        manifest: RenderedFile {
            path: SMOKE_MANIFEST.into(),
            mode: 0o644,
            content: manifests::smoke_manifest(b.plan, &b.smoke_workload),
        },
        cleanup: kubectl_cmd(
            b,
            kc,
            &format!("delete -f {SMOKE_MANIFEST} --ignore-not-found --wait=true --timeout=120s"),
        ),
        remove: kubectl_cmd(
            b,
            kc,
            &format!("delete -f {SMOKE_MANIFEST} --ignore-not-found --wait=false"),
        ),
        apply: kubectl_cmd(b, kc, &format!("apply -f {SMOKE_MANIFEST}")),
        pods: kubectl_cmd(
            b,
            kc,
            &format!("get pods -n {ns} -l {} -o json", manifests::SMOKE_SELECTOR),
        ),
        service: kubectl_cmd(
            b,
            kc,
            &format!("get service -n {ns} {} -o json", manifests::SMOKE_NAME),
        ),
        service_port: b.smoke_workload.service_port,
    }))
}

/// `count` HTTP requests from a node to `ip:port`, one `reply:BODY` line each
/// (`reply:` alone when a request got nothing). Plain bash `/dev/tcp`: no curl
/// needed on the node. The smoke pods answer with their pod name.
pub fn service_requests_cmd(ip: &str, port: u16, count: usize) -> String {
    format!(
        "for i in $(seq 1 {count}); do r=$(timeout 3 bash -c 'exec 3<>/dev/tcp/{ip}/{port} && printf \"GET / HTTP/1.0\\r\\n\\r\\n\" >&3 && cat <&3' 2>/dev/null | tail -n 1 | tr -d '\\r'); echo \"reply:$r\"; done"
    )
}

/// The non-empty bodies among [`service_requests_cmd`]'s lines, and how many
/// requests there were.
pub fn parse_replies(output: &str) -> (Vec<String>, usize) {
    let mut replies = Vec::new();
    let mut total = 0;
    for l in output.lines() {
        if let Some(r) = l.strip_prefix("reply:") {
            total += 1;
            let r = r.trim();
            if !r.is_empty() {
                replies.push(r.to_string());
            }
        }
    }
    (replies, total)
}

/// Replies (pod names) counted per node the pod runs on; replies naming no known
/// pod are counted under `?`.
pub fn answers_by_node(replies: &[String], pods: &[PodInfo]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for r in replies {
        let node = pods
            .iter()
            .find(|p| &p.name == r)
            .and_then(|p| p.node.clone())
            .unwrap_or_else(|| "?".into());
        *out.entry(node).or_insert(0) += 1;
    }
    out
}

/// Workers without a ready smoke pod, each with what its pod (if any) waits for.
pub fn workers_without_ready_pod(plan: &LabPlan, pods: &[PodInfo]) -> Vec<String> {
    let mut out: Vec<String> = plan
        .workers()
        .filter(|w| {
            !pods
                .iter()
                .any(|p| p.ready && p.node.as_deref() == Some(w.name.as_str()))
        })
        .map(|w| {
            match pods
                .iter()
                .find(|p| p.node.as_deref() == Some(w.name.as_str()))
            {
                Some(p) => format!(
                    "{}: pod {} is {}{}",
                    w.name,
                    p.name,
                    p.phase,
                    p.waiting
                        .as_deref()
                        .map(|w| format!(" ({w})"))
                        .unwrap_or_default()
                ),
                None => format!("{}: no smoke pod scheduled there", w.name),
            }
        })
        .collect();
    for p in pods.iter().filter(|p| p.node.is_none()) {
        out.push(format!(
            "pod {} is not scheduled{}",
            p.name,
            p.waiting
                .as_deref()
                .map(|w| format!(" ({w})"))
                .unwrap_or_default()
        ));
    }
    out
}

fn smoke_error(step: &str, detail: String, hint: String) -> BootstrapError {
    BootstrapError::Smoke {
        step: format!("smoke workload: {step}"),
        detail,
        hint,
    }
}

/// A Deployment with a pod on every worker behind a ClusterIP service; requests
/// from one worker to the service IP until every worker's pod has answered, which
/// proves scheduling, the runtime, pod networking across workers (host-gw routes)
/// and kube-proxy's service translation. Leftovers of an earlier run are removed
/// first; the objects are removed after a pass and kept after a failure so they can
/// be inspected (the next run removes them).
pub fn smoke_workload<R: Remote + ?Sized>(
    b: &Bootstrap,
    remote: &R,
    steps: &SmokeSteps,
) -> Result<WorkloadReport, BootstrapError> {
    let c = steps.controller.as_str();
    let kept = format!(
        "the smoke objects were kept: `kthw-lab ssh {lab} {c} -- sudo kubectl get pods,svc -l {sel} -o wide`, \
         then `sudo kubectl describe pod -l {sel}`; rerunning the phase removes and recreates them",
        lab = b.plan.lab,
        sel = manifests::SMOKE_SELECTOR
    );
    sync_files(remote, c, std::slice::from_ref(&steps.manifest))?;
    b.say("removing leftover smoke objects");
    remote.run(c, &steps.cleanup, Duration::from_secs(150))?;
    remote.run(c, &steps.apply, SHORT)?;

    // Pods: one ready on every worker.
    let deadline = std::time::Instant::now() + b.settle;
    let pods = loop {
        let out = remote.run(c, &steps.pods, SHORT)?;
        let pods = crate::kube::parse_pod_list(&out.stdout)
            .map_err(|e| smoke_error("reading the smoke pods", e, kept.clone()))?;
        let missing = workers_without_ready_pod(b.plan, &pods);
        if missing.is_empty() {
            break pods;
        }
        if std::time::Instant::now() >= deadline {
            let pulling = missing
                .iter()
                .any(|m| m.contains("ErrImagePull") || m.contains("ImagePullBackOff"));
            let hint = if pulling {
                format!(
                    "the workers pull {} from the registry through the lab's NAT: check the host's uplink; {kept}",
                    b.smoke_workload.image
                )
            } else {
                format!(
                    "`kthw-lab status {}` shows which nodes are Ready; {kept}",
                    b.plan.lab
                )
            };
            return Err(smoke_error(
                "pods not ready on every worker",
                format!("after {} s: {}", b.settle.as_secs(), missing.join("; ")),
                hint,
            ));
        }
        b.say(&format!(
            "waiting for a ready smoke pod on every worker: {}",
            missing.join("; ")
        ));
        std::thread::sleep(Duration::from_secs(3));
    };

    let svc = remote.run(c, &steps.service, SHORT)?;
    let ip = crate::kube::parse_service_cluster_ip(&svc.stdout)
        .map_err(|e| smoke_error("reading the smoke service", e, kept.clone()))?;

    // Requests from one worker through the service until every worker answered.
    let workers: Vec<&str> = node_names(b.plan, Some(Role::Worker));
    let cmd = service_requests_cmd(&ip, steps.service_port, REQUESTS_PER_ROUND);
    let deadline = std::time::Instant::now() + SMOKE_REQUESTS_WAIT;
    let mut answers: BTreeMap<String, usize> = BTreeMap::new();
    let mut requests = 0;
    loop {
        let out = remote.run(&steps.client, &cmd, Duration::from_secs(120))?;
        let (replies, total) = parse_replies(&out.stdout);
        requests += total;
        for (node, n) in answers_by_node(&replies, &pods) {
            *answers.entry(node).or_insert(0) += n;
        }
        let silent: Vec<&str> = workers
            .iter()
            .copied()
            .filter(|w| !answers.contains_key(*w))
            .collect();
        if silent.is_empty() {
            break;
        }
        if std::time::Instant::now() >= deadline {
            let heard = if answers.is_empty() {
                "no answer at all".to_string()
            } else {
                answers
                    .iter()
                    .map(|(n, k)| format!("{k} from the pod on {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let hint = format!(
                "on {client}: `ip route` must route each other worker's pod range via that worker, \
                 `journalctl -u kube-proxy` shows kube-proxy's errors and `iptables -t nat -S KUBE-SERVICES` \
                 must list {ip}; {kept}",
                client = steps.client
            );
            return Err(smoke_error(
                "requests through the service",
                format!(
                    "{requests} requests from {} to {ip}:{}: {heard}; never answered by the pod on {}",
                    steps.client,
                    steps.service_port,
                    silent.join(", ")
                ),
                hint,
            ));
        }
        b.say(&format!(
            "{requests} requests to {ip} from {}; still waiting for an answer from {}",
            steps.client,
            silent.join(", ")
        ));
        std::thread::sleep(Duration::from_secs(2));
    }
    remote.run(c, &steps.remove, SHORT)?;
    Ok(WorkloadReport {
        service_ip: ip,
        client: steps.client.clone(),
        pods,
        answers,
        requests,
    })
}

/// How long requests through the service may take to reach every worker's pod.
const SMOKE_REQUESTS_WAIT: Duration = Duration::from_secs(90);
