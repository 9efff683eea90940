//! The pki dir on disk: `<paths.pki>/NAME.pem` and `NAME-key.pem`, dir 0700, keys 0600,
//! every write atomic (temp file in the same dir, fsync, rename). Decides, per
//! certificate, whether what is there can be kept or must be issued again.

use std::fs;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use rcgen::KeyPair;
use serde::Serialize;
use time::OffsetDateTime;

use super::lint::{self, Finding};
use super::{cert_path, issue, key_path, PkiError};
use crate::plan::{CertSpec, CertUsage, LabPlan};
use crate::scenario::KeyAlgorithm;

/// Mode of private keys (and of anything else secret).
pub const KEY_MODE: u32 = 0o600;
/// Mode of certificates.
pub const CERT_MODE: u32 = 0o644;
/// Mode of the pki and kubeconfig dirs.
pub const DIR_MODE: u32 = 0o700;

/// What `ensure_pki` did with one certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Key and certificate were there and still match the plan.
    Kept,
    /// A new key and certificate were made.
    Issued,
    /// The key was kept, the certificate issued again.
    Reissued,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertOutcome {
    pub name: String,
    pub outcome: Outcome,
    /// Why it was (re)issued; empty when kept.
    pub reasons: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PkiReport {
    pub certs: Vec<CertOutcome>,
}

impl PkiReport {
    /// Names of the certificates with `outcome`.
    pub fn with(&self, outcome: Outcome) -> Vec<&str> {
        self.certs
            .iter()
            .filter(|c| c.outcome == outcome)
            .map(|c| c.name.as_str())
            .collect()
    }

    /// One line per certificate: `issued kubelet-n3 (no key yet)`.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        for c in &self.certs {
            let what = match c.outcome {
                Outcome::Kept => "kept",
                Outcome::Issued => "issued",
                Outcome::Reissued => "reissued",
            };
            s.push_str(&format!("{what:<9} {}", c.name));
            if !c.reasons.is_empty() {
                s.push_str(&format!(" ({})", c.reasons.join("; ")));
            }
            s.push('\n');
        }
        s
    }
}

/// Create `dir` (and parents) and make it 0700.
pub fn ensure_dir(dir: &Path) -> Result<(), PkiError> {
    let err = |source| PkiError::CreateDir {
        path: dir.to_path_buf(),
        source,
    };
    fs::create_dir_all(dir).map_err(err)?;
    let mode = fs::metadata(dir).map_err(err)?.permissions().mode() & 0o7777;
    if mode != DIR_MODE {
        fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE)).map_err(err)?;
    }
    Ok(())
}

/// The file's bytes, or `None` when it does not exist.
pub fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, PkiError> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(source) => Err(PkiError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Replace `path` with `bytes` atomically: a reader sees the old file or the new one,
/// never half of it, and a crash leaves at most a stray temp file.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    let err = |source| PkiError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp{}", std::process::id()));
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        // The mode given to open() is filtered by the umask; set it exactly.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(err)
}

/// Give an existing file exactly `mode` (a kept key someone made readable).
fn ensure_mode(path: &Path, mode: u32) -> Result<(), PkiError> {
    let m = fs::metadata(path)
        .map_err(|source| PkiError::Read {
            path: path.to_path_buf(),
            source,
        })?
        .permissions()
        .mode()
        & 0o7777;
    if m != mode {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(|source| {
            PkiError::Write {
                path: path.to_path_buf(),
                source,
            }
        })?;
    }
    Ok(())
}

/// Write unless the file already holds exactly `bytes` (and has `mode`). Returns whether
/// it wrote.
pub fn write_if_changed(path: &Path, bytes: &[u8], mode: u32) -> Result<bool, PkiError> {
    if read_optional(path)?.as_deref() == Some(bytes) {
        ensure_mode(path, mode)?;
        return Ok(false);
    }
    write_atomic(path, bytes, mode)?;
    Ok(true)
}

fn alg_word(alg: KeyAlgorithm) -> &'static str {
    match alg {
        KeyAlgorithm::EcdsaP256 => "ecdsa-p256",
        KeyAlgorithm::Rsa2048 => "rsa-2048",
    }
}

/// The existing key of `spec` if it is of the plan's algorithm, else a new one (written
/// before any certificate for it). The second value says why a new key was made.
fn load_or_generate_key(
    pki: &Path,
    spec: &CertSpec,
    alg: KeyAlgorithm,
) -> Result<(KeyPair, Option<String>), PkiError> {
    let path = key_path(pki, &spec.name);
    let reason = match read_optional(&path)? {
        Some(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let key = KeyPair::from_pem(&text).map_err(|source| PkiError::BadKey {
                path: path.clone(),
                source,
            })?;
            if issue::key_matches_algorithm(&key, alg) {
                ensure_mode(&path, KEY_MODE)?;
                return Ok((key, None));
            }
            format!("key algorithm changed to {}", alg_word(alg))
        }
        None => "no key yet".to_string(),
    };
    let key = issue::generate_key(alg).map_err(|source| PkiError::KeyGen {
        name: spec.name.clone(),
        source,
    })?;
    write_atomic(&path, key.serialize_pem().as_bytes(), KEY_MODE)?;
    Ok((key, Some(reason)))
}

fn describe(f: &Finding) -> String {
    format!(
        "{}: expected {}, found {}",
        f.check.as_str(),
        f.expected,
        f.found
    )
}

/// Findings that make an existing certificate unfit to keep; empty = keep it.
fn reasons_to_reissue(
    spec: &CertSpec,
    pem: Option<&[u8]>,
    ca_pem: &[u8],
    key: &KeyPair,
    alg: KeyAlgorithm,
    now: OffsetDateTime,
) -> Vec<String> {
    let Some(pem) = pem else {
        return vec!["no certificate yet".into()];
    };
    let ca = match lint::parse_pem(ca_pem) {
        Ok(ca) => ca,
        Err(e) => return vec![format!("the CA does not parse: {e}")],
    };
    let ca_cert = match ca.parse_x509() {
        Ok(c) => c,
        Err(e) => return vec![format!("the CA does not parse: {e}")],
    };
    lint::check_cert(spec, pem, Some(&ca_cert), Some(key), alg, now)
        .iter()
        .map(describe)
        .collect()
}

/// Make sure every certificate of the plan is in `paths.pki` and matches the plan; see
/// the module docs for what is kept.
pub fn ensure_pki(plan: &LabPlan) -> Result<PkiReport, PkiError> {
    ensure_pki_at(plan, OffsetDateTime::now_utc())
}

/// [`ensure_pki`] with the clock given, for tests.
pub fn ensure_pki_at(plan: &LabPlan, now: OffsetDateTime) -> Result<PkiReport, PkiError> {
    let pki = &plan.paths.pki;
    let alg = plan.key_algorithm;
    ensure_dir(pki)?;
    let ca_spec = super::ca_spec(plan)?;
    let mut certs = Vec::new();

    // The CA first: every leaf is checked against (and signed by) the CA on disk.
    let (ca_key, ca_key_reason) = load_or_generate_key(pki, ca_spec, alg)?;
    let ca_file = cert_path(pki, &ca_spec.name);
    let existing = read_optional(&ca_file)?;
    let mut reasons = match &existing {
        Some(pem) => reasons_to_reissue(ca_spec, Some(pem), pem, &ca_key, alg, now),
        None => vec!["no certificate yet".into()],
    };
    let ca_pem = if reasons.is_empty() && ca_key_reason.is_none() {
        certs.push(CertOutcome {
            name: ca_spec.name.clone(),
            outcome: Outcome::Kept,
            reasons,
        });
        existing.expect("checked above")
    } else {
        let pem =
            issue::self_signed_ca(ca_spec, &ca_key, now).map_err(|source| PkiError::Issue {
                name: ca_spec.name.clone(),
                source,
            })?;
        write_atomic(&ca_file, pem.as_bytes(), CERT_MODE)?;
        let outcome = match ca_key_reason {
            Some(r) => {
                reasons = vec![r];
                Outcome::Issued
            }
            None => Outcome::Reissued,
        };
        certs.push(CertOutcome {
            name: ca_spec.name.clone(),
            outcome,
            reasons,
        });
        pem.into_bytes()
    };
    let ca_text = String::from_utf8_lossy(&ca_pem).into_owned();

    for spec in plan
        .certificates
        .iter()
        .filter(|c| c.usage != CertUsage::Ca)
    {
        let (key, key_reason) = load_or_generate_key(pki, spec, alg)?;
        let new_key = key_reason.is_some();
        let file = cert_path(pki, &spec.name);
        let existing = read_optional(&file)?;
        let reasons = match key_reason {
            Some(r) => vec![r],
            None => reasons_to_reissue(spec, existing.as_deref(), &ca_pem, &key, alg, now),
        };
        if reasons.is_empty() {
            certs.push(CertOutcome {
                name: spec.name.clone(),
                outcome: Outcome::Kept,
                reasons,
            });
            continue;
        }
        let pem = issue::issue_leaf(spec, &key, &ca_text, &ca_key, now).map_err(|source| {
            PkiError::Issue {
                name: spec.name.clone(),
                source,
            }
        })?;
        write_atomic(&file, pem.as_bytes(), CERT_MODE)?;
        let outcome = if new_key {
            Outcome::Issued
        } else {
            Outcome::Reissued
        };
        certs.push(CertOutcome {
            name: spec.name.clone(),
            outcome,
            reasons,
        });
    }
    Ok(PkiReport { certs })
}
