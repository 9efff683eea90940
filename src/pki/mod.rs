//! The lab's PKI: the CA, every certificate the plan specifies, the kubeconfigs that
//! embed them, the secrets encryption config, the certificate linter and the list of
//! files each node receives.
//!
//! Everything is issued in-process with rcgen into `paths.pki` (dir 0700, keys 0600).
//! Every `ensure_*` here is idempotent: what still matches the plan is kept byte for
//! byte; what the plan changed is issued again, reusing the existing key where it can.
//!
//! Order in the `pki` phase: [`ensure_pki`], then [`ensure_kubeconfigs`] (they embed the
//! certificates) and [`ensure_encryption_config`]; then copy [`distribution`] to the
//! nodes. `kthw-lab certs check LAB` prints [`lint::render_table`] (or [`lint::to_json`])
//! of [`lint()`] and fails when it returned any finding. `kthw-lab kubeconfig` prints
//! [`admin_kubeconfig`] or calls [`write_admin_kubeconfig`].

pub mod distribute;
pub mod issue;
pub mod lint;
pub mod store;

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::plan::{CertSpec, CertUsage, LabPlan};
use crate::render::encryption;
use crate::render::kubeconfig::{self, KubeconfigInput};

pub use distribute::{distribution, FileToInstall, NodeFiles};
pub use lint::{render_table, Check, Finding, Severity};
pub use store::{ensure_pki, CertOutcome, Outcome, PkiReport};

/// Certificates closer than this to their expiry are re-issued by `ensure_pki` and
/// flagged by the linter.
pub const RENEW_BEFORE: time::Duration = time::Duration::days(30);

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot create directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot parse the private key {path}")]
    BadKey {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("cannot parse the certificate {path}: {reason}")]
    BadCert { path: PathBuf, reason: String },
    #[error("cannot generate a key for {name}")]
    KeyGen {
        name: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("cannot issue the certificate {name}")]
    Issue {
        name: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("the plan has no certificate `{name}`")]
    NotInPlan { name: String },
    #[error("no certificate yet at {path}")]
    Missing { path: PathBuf },
}

impl PkiError {
    /// What the user can do about it.
    pub fn hint(&self) -> String {
        match self {
            PkiError::CreateDir { .. } | PkiError::Write { .. } => {
                "check that the lab's state dir is writable (run as root or pass --state-dir)"
                    .into()
            }
            PkiError::Read { .. } => "check the file's permissions; the pki dir is 0700".into(),
            PkiError::BadKey { path, .. } => format!(
                "the key was damaged or replaced by hand; remove {} to have a new one issued",
                path.display()
            ),
            PkiError::BadCert { path, .. } => format!(
                "remove {} to have it issued again from the plan",
                path.display()
            ),
            PkiError::KeyGen { .. } | PkiError::Issue { .. } => {
                "this is a bug in kthw-lab's certificate code; please report it with the scenario"
                    .into()
            }
            PkiError::NotInPlan { .. } => {
                "the plan was made by another version of kthw-lab; run `kthw-lab plan` again".into()
            }
            PkiError::Missing { .. } => {
                "the lab's certificates are made by `kthw-lab create` (phase pki)".into()
            }
        }
    }
}

/// The cert file of `name` in a pki dir: `NAME.pem`.
pub fn cert_path(pki: &Path, name: &str) -> PathBuf {
    pki.join(format!("{name}.pem"))
}

/// The key file of `name` in a pki dir: `NAME-key.pem`.
pub fn key_path(pki: &Path, name: &str) -> PathBuf {
    pki.join(format!("{name}-key.pem"))
}

/// Where the secrets encryption config lives on the host (beside the keys: it is one).
pub fn encryption_config_path(plan: &LabPlan) -> PathBuf {
    plan.paths.pki.join("encryption-config.yaml")
}

/// The CA's spec in the plan.
pub fn ca_spec(plan: &LabPlan) -> Result<&CertSpec, PkiError> {
    plan.certificates
        .iter()
        .find(|c| c.usage == CertUsage::Ca)
        .ok_or_else(|| PkiError::NotInPlan { name: "ca".into() })
}

fn spec_named<'a>(plan: &'a LabPlan, name: &str) -> Result<&'a CertSpec, PkiError> {
    plan.certificates
        .iter()
        .find(|c| c.name == name)
        .ok_or_else(|| PkiError::NotInPlan { name: name.into() })
}

/// One kubeconfig the lab needs: its file, the certificate it embeds, the API endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KubeconfigPlan {
    /// File name under `paths.kubeconfigs`.
    pub file: String,
    /// The certificate (file stem in the pki dir) it authenticates with.
    pub cert: String,
    /// The API server URL.
    pub server: String,
    /// The node it is installed on, for per-node kubeconfigs.
    pub node: Option<String>,
}

/// The API endpoint of components that run beside an apiserver.
pub const LOCAL_API: &str = "https://127.0.0.1:6443";

/// Every kubeconfig of the lab: admin (host, through the LB), one per worker kubelet and
/// kube-proxy (through the LB), controller-manager and scheduler (the local apiserver).
pub fn kubeconfig_plans(plan: &LabPlan) -> Vec<KubeconfigPlan> {
    let lb = plan.load_balancer.endpoint.clone();
    let mut out = vec![KubeconfigPlan {
        file: "admin.kubeconfig".into(),
        cert: "admin".into(),
        server: lb.clone(),
        node: None,
    }];
    for w in plan.workers() {
        out.push(KubeconfigPlan {
            file: format!("{}.kubeconfig", w.name),
            cert: format!("kubelet-{}", w.name),
            server: lb.clone(),
            node: Some(w.name.clone()),
        });
    }
    out.push(KubeconfigPlan {
        file: "kube-proxy.kubeconfig".into(),
        cert: "kube-proxy".into(),
        server: lb,
        node: None,
    });
    for c in ["kube-controller-manager", "kube-scheduler"] {
        out.push(KubeconfigPlan {
            file: format!("{c}.kubeconfig"),
            cert: c.into(),
            server: LOCAL_API.into(),
            node: None,
        });
    }
    out
}

fn read_required(path: &Path) -> Result<String, PkiError> {
    match store::read_optional(path)? {
        Some(b) => String::from_utf8(b).map_err(|_| PkiError::BadCert {
            path: path.to_path_buf(),
            reason: "not UTF-8 PEM text".into(),
        }),
        None => Err(PkiError::Missing {
            path: path.to_path_buf(),
        }),
    }
}

/// Render one kubeconfig from the certificates on disk.
pub fn render_kubeconfig(plan: &LabPlan, k: &KubeconfigPlan) -> Result<String, PkiError> {
    let pki = &plan.paths.pki;
    let ca = ca_spec(plan)?;
    let spec = spec_named(plan, &k.cert)?;
    let ca_pem = read_required(&cert_path(pki, &ca.name))?;
    let cert_pem = read_required(&cert_path(pki, &spec.name))?;
    let key_pem = read_required(&key_path(pki, &spec.name))?;
    Ok(kubeconfig::render(&KubeconfigInput {
        cluster: &plan.cluster.name,
        server: &k.server,
        user: &spec.common_name,
        ca_pem: &ca_pem,
        cert_pem: &cert_pem,
        key_pem: &key_pem,
    }))
}

/// A file `ensure_*` looked after, and whether it had to write it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileOutcome {
    pub path: PathBuf,
    pub written: bool,
}

/// Write every kubeconfig under `paths.kubeconfigs` (dir 0700, files 0600). A file whose
/// content is already right is left alone.
pub fn ensure_kubeconfigs(plan: &LabPlan) -> Result<Vec<FileOutcome>, PkiError> {
    let dir = &plan.paths.kubeconfigs;
    store::ensure_dir(dir)?;
    let mut out = Vec::new();
    for k in kubeconfig_plans(plan) {
        let text = render_kubeconfig(plan, &k)?;
        let path = dir.join(&k.file);
        let written = store::write_if_changed(&path, text.as_bytes(), 0o600)?;
        out.push(FileOutcome { path, written });
    }
    Ok(out)
}

/// The admin kubeconfig (API through the LB), for `kthw-lab kubeconfig`.
pub fn admin_kubeconfig(plan: &LabPlan) -> Result<String, PkiError> {
    let k = kubeconfig_plans(plan)
        .into_iter()
        .find(|k| k.cert == "admin")
        .expect("the admin kubeconfig is always planned");
    render_kubeconfig(plan, &k)
}

/// Write the admin kubeconfig to `dest` (mode 0600, atomically), for
/// `kthw-lab kubeconfig --write FILE`.
pub fn write_admin_kubeconfig(plan: &LabPlan, dest: &Path) -> Result<(), PkiError> {
    let text = admin_kubeconfig(plan)?;
    store::write_atomic(dest, text.as_bytes(), 0o600)
}

/// Write the secrets encryption config with a fresh random 32-byte key, unless one with
/// a valid key is already there: the key must survive re-runs, or the secrets already
/// stored in etcd could no longer be read.
pub fn ensure_encryption_config(plan: &LabPlan) -> Result<FileOutcome, PkiError> {
    store::ensure_dir(&plan.paths.pki)?;
    let path = encryption_config_path(plan);
    if let Some(existing) = store::read_optional(&path)? {
        let text = String::from_utf8_lossy(&existing);
        if encryption::parse_key(&text).is_some() {
            return Ok(FileOutcome {
                path,
                written: false,
            });
        }
    }
    let key: [u8; 32] = rand::random();
    store::write_atomic(&path, encryption::render(&key).as_bytes(), 0o600)?;
    Ok(FileOutcome {
        path,
        written: true,
    })
}

/// Check every certificate of the lab against its plan, now; see [`lint::lint`].
pub fn lint(plan: &LabPlan) -> Vec<Finding> {
    lint::lint(plan, time::OffsetDateTime::now_utc())
}

/// Check the kubeconfigs on the host against the certificates and the plan; see
/// [`lint::lint_kubeconfigs`]. `certs check` can append these to [`lint()`]'s.
pub fn lint_kubeconfigs(plan: &LabPlan) -> Vec<Finding> {
    lint::lint_kubeconfigs(plan)
}
