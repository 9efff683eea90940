//! The certificate linter behind `kthw-lab certs check`: every certificate of the lab
//! against its plan — chain to the CA, validity window, key usages, subject, SANs, key
//! pair and file modes — reported as data, a table or JSON.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use rcgen::{KeyPair, PublicKeyData};
use serde::Serialize;
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::pem::Pem;
use x509_parser::public_key::PublicKey;

use super::{cert_path, issue, key_path, RENEW_BEFORE};
use crate::plan::{CertSpec, CertUsage, LabPlan};
use crate::scenario::KeyAlgorithm;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Severity {
    Error,
    Warning,
}

/// What was checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Check {
    /// The certificate or key file exists and is readable.
    File,
    /// The certificate parses as X.509 in PEM.
    Parse,
    /// Issued by the lab's CA and its signature verifies (the CA: self-signed).
    Chain,
    /// Now lies between notBefore and notAfter.
    Validity,
    /// More than 30 days left.
    Expiry,
    /// basicConstraints: CA:TRUE for the CA only.
    BasicConstraints,
    KeyUsage,
    ExtKeyUsage,
    /// Subject common name.
    SubjectCn,
    /// Subject organization (the Kubernetes group).
    SubjectO,
    /// Subject alternative names, the exact set.
    San,
    /// The key file parses and holds the certificate's private key.
    KeyPair,
    /// The key is of the scenario's algorithm.
    KeyAlgorithm,
    /// Key files 0600, the pki dir 0700.
    Mode,
    /// A kubeconfig embeds the current CA, certificate and key and the planned server.
    Kubeconfig,
}

impl Check {
    pub fn as_str(self) -> &'static str {
        match self {
            Check::File => "file",
            Check::Parse => "parse",
            Check::Chain => "chain",
            Check::Validity => "validity",
            Check::Expiry => "expiry",
            Check::BasicConstraints => "basic-constraints",
            Check::KeyUsage => "key-usage",
            Check::ExtKeyUsage => "ext-key-usage",
            Check::SubjectCn => "subject-cn",
            Check::SubjectO => "subject-o",
            Check::San => "san",
            Check::KeyPair => "key-pair",
            Check::KeyAlgorithm => "key-algorithm",
            Check::Mode => "mode",
            Check::Kubeconfig => "kubeconfig",
        }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One thing about one certificate that differs from the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// The certificate's name in the plan (its file stem).
    pub cert: String,
    pub check: Check,
    pub expected: String,
    pub found: String,
    pub severity: Severity,
}

fn finding(
    spec: &CertSpec,
    check: Check,
    expected: impl Into<String>,
    found: impl Into<String>,
) -> Finding {
    Finding {
        cert: spec.name.clone(),
        check,
        expected: expected.into(),
        found: found.into(),
        severity: Severity::Error,
    }
}

/// The first PEM block of `bytes`.
pub fn parse_pem(bytes: &[u8]) -> Result<Pem, String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(bytes).map_err(|e| format!("{e}"))?;
    if pem.label != "CERTIFICATE" {
        return Err(format!("a {} block, not a CERTIFICATE", pem.label));
    }
    Ok(pem)
}

fn join(v: impl IntoIterator<Item = impl AsRef<str>>) -> String {
    let s: Vec<String> = v.into_iter().map(|x| x.as_ref().to_string()).collect();
    if s.is_empty() {
        "(none)".into()
    } else {
        s.join(", ")
    }
}

fn key_algorithm_of(cert: &X509Certificate<'_>) -> String {
    match cert.public_key().parsed() {
        Ok(PublicKey::EC(p)) if p.key_size() == 256 => "ecdsa-p256".into(),
        Ok(PublicKey::EC(p)) => format!("ecdsa-{}", p.key_size()),
        Ok(PublicKey::RSA(r)) => format!("rsa-{}", r.key_size()),
        Ok(_) => "another algorithm".into(),
        Err(_) => "an unreadable key".into(),
    }
}

fn alg_word(alg: KeyAlgorithm) -> &'static str {
    match alg {
        KeyAlgorithm::EcdsaP256 => "ecdsa-p256",
        KeyAlgorithm::Rsa2048 => "rsa-2048",
    }
}

fn ku_names(ku: &x509_parser::extensions::KeyUsage) -> Vec<&'static str> {
    let all = [
        (ku.digital_signature(), "digitalSignature"),
        (ku.non_repudiation(), "nonRepudiation"),
        (ku.key_encipherment(), "keyEncipherment"),
        (ku.data_encipherment(), "dataEncipherment"),
        (ku.key_agreement(), "keyAgreement"),
        (ku.key_cert_sign(), "keyCertSign"),
        (ku.crl_sign(), "cRLSign"),
        (ku.encipher_only(), "encipherOnly"),
        (ku.decipher_only(), "decipherOnly"),
    ];
    all.iter().filter(|(on, _)| *on).map(|(_, n)| *n).collect()
}

fn expected_ku_names(usage: CertUsage, rsa: bool) -> Vec<&'static str> {
    use rcgen::KeyUsagePurpose::*;
    let want = issue::key_usages(usage, rsa);
    let order = [
        (DigitalSignature, "digitalSignature"),
        (ContentCommitment, "nonRepudiation"),
        (KeyEncipherment, "keyEncipherment"),
        (DataEncipherment, "dataEncipherment"),
        (KeyAgreement, "keyAgreement"),
        (KeyCertSign, "keyCertSign"),
        (CrlSign, "cRLSign"),
        (EncipherOnly, "encipherOnly"),
        (DecipherOnly, "decipherOnly"),
    ];
    order
        .iter()
        .filter(|(k, _)| want.contains(k))
        .map(|(_, n)| *n)
        .collect()
}

fn expected_eku_names(usage: CertUsage) -> Vec<&'static str> {
    issue::extended_key_usages(usage)
        .iter()
        .map(|e| match e {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth => "serverAuth",
            rcgen::ExtendedKeyUsagePurpose::ClientAuth => "clientAuth",
            _ => "other",
        })
        .collect()
}

fn ip_text(octets: &[u8]) -> String {
    match octets.len() {
        4 => Ipv4Addr::new(octets[0], octets[1], octets[2], octets[3]).to_string(),
        16 => {
            let mut b = [0u8; 16];
            b.copy_from_slice(octets);
            Ipv6Addr::from(b).to_string()
        }
        _ => format!("ip:{}", hex::encode(octets)),
    }
}

fn fmt_time(ts: i64) -> String {
    OffsetDateTime::from_unix_timestamp(ts)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ts.to_string())
}

/// Check one certificate (PEM in `pem`) against `spec`. `ca` is the lab's CA (`None`
/// when it is missing: the chain is then reported broken); for the CA spec itself the
/// certificate is checked as self-signed. `key`, when given, must be the certificate's
/// private key.
pub fn check_cert(
    spec: &CertSpec,
    pem: &[u8],
    ca: Option<&X509Certificate<'_>>,
    key: Option<&KeyPair>,
    alg: KeyAlgorithm,
    now: OffsetDateTime,
) -> Vec<Finding> {
    let mut out = Vec::new();
    let pem = match parse_pem(pem) {
        Ok(p) => p,
        Err(e) => return vec![finding(spec, Check::Parse, "a PEM certificate", e)],
    };
    let cert = match pem.parse_x509() {
        Ok(c) => c,
        Err(e) => {
            return vec![finding(
                spec,
                Check::Parse,
                "an X.509 certificate",
                e.to_string(),
            )]
        }
    };

    // Chain.
    let is_ca_spec = spec.usage == CertUsage::Ca;
    let signer = if is_ca_spec { Some(&cert) } else { ca };
    match signer {
        None => out.push(finding(
            spec,
            Check::Chain,
            "signed by the lab CA",
            "no CA to verify against",
        )),
        Some(signer) => {
            if cert.issuer().as_raw() != signer.subject().as_raw() {
                out.push(finding(
                    spec,
                    Check::Chain,
                    format!("issuer {}", signer.subject()),
                    format!("issuer {}", cert.issuer()),
                ));
            } else if cert.verify_signature(Some(signer.public_key())).is_err() {
                out.push(finding(
                    spec,
                    Check::Chain,
                    "a signature by the lab CA's key",
                    "a signature that does not verify (another CA with the same name?)",
                ));
            }
        }
    }

    // Validity window.
    let v = cert.validity();
    let (nb, na, t) = (
        v.not_before.timestamp(),
        v.not_after.timestamp(),
        now.unix_timestamp(),
    );
    if t < nb {
        out.push(finding(
            spec,
            Check::Validity,
            format!("valid now ({})", fmt_time(t)),
            format!("not before {}", fmt_time(nb)),
        ));
    } else if t > na {
        out.push(finding(
            spec,
            Check::Validity,
            format!("valid now ({})", fmt_time(t)),
            format!("expired {}", fmt_time(na)),
        ));
    } else if na - t < RENEW_BEFORE.whole_seconds() {
        let mut f = finding(
            spec,
            Check::Expiry,
            format!("more than {} days left", RENEW_BEFORE.whole_days()),
            format!("expires {}", fmt_time(na)),
        );
        f.severity = Severity::Warning;
        out.push(f);
    }

    // Basic constraints.
    match cert.basic_constraints() {
        Ok(bc) => {
            let ca_flag = bc.as_ref().is_some_and(|b| b.value.ca);
            if is_ca_spec && !ca_flag {
                out.push(finding(
                    spec,
                    Check::BasicConstraints,
                    "CA:TRUE",
                    "not a CA",
                ));
            } else if !is_ca_spec && ca_flag {
                out.push(finding(
                    spec,
                    Check::BasicConstraints,
                    "CA:FALSE",
                    "CA:TRUE",
                ));
            }
        }
        Err(e) => out.push(finding(
            spec,
            Check::BasicConstraints,
            "one basicConstraints",
            e.to_string(),
        )),
    }

    // Key usages; RSA leaves carry keyEncipherment as well.
    let rsa = matches!(cert.public_key().parsed(), Ok(PublicKey::RSA(_)));
    let want_ku = expected_ku_names(spec.usage, rsa);
    let have_ku: Vec<String> = match cert.key_usage() {
        Ok(Some(ku)) => ku_names(ku.value).into_iter().map(String::from).collect(),
        Ok(None) => vec![],
        Err(e) => vec![format!("invalid ({e})")],
    };
    let want_set: BTreeSet<String> = want_ku.iter().map(|s| s.to_string()).collect();
    if want_set != have_ku.iter().cloned().collect::<BTreeSet<_>>() {
        out.push(finding(
            spec,
            Check::KeyUsage,
            join(&want_ku),
            join(&have_ku),
        ));
    }
    let want_eku = expected_eku_names(spec.usage);
    let have_eku: Vec<String> = match cert.extended_key_usage() {
        Ok(Some(e)) => {
            let e = e.value;
            let mut v = Vec::new();
            if e.any {
                v.push("anyExtendedKeyUsage".to_string());
            }
            if e.server_auth {
                v.push("serverAuth".into());
            }
            if e.client_auth {
                v.push("clientAuth".into());
            }
            for (on, n) in [
                (e.code_signing, "codeSigning"),
                (e.email_protection, "emailProtection"),
                (e.time_stamping, "timeStamping"),
                (e.ocsp_signing, "OCSPSigning"),
            ] {
                if on {
                    v.push(n.into());
                }
            }
            v.extend(e.other.iter().map(|o| o.to_id_string()));
            v
        }
        Ok(None) => vec![],
        Err(e) => vec![format!("invalid ({e})")],
    };
    let want_set: BTreeSet<String> = want_eku.iter().map(|s| s.to_string()).collect();
    let have_set: BTreeSet<String> = have_eku.iter().cloned().collect();
    if want_set != have_set {
        out.push(finding(
            spec,
            Check::ExtKeyUsage,
            join(&want_eku),
            join(&have_eku),
        ));
    }

    // Subject.
    let cns: Vec<String> = cert
        .subject()
        .iter_common_name()
        .map(|a| a.as_str().unwrap_or("(unreadable)").to_string())
        .collect();
    if cns != [spec.common_name.clone()] {
        out.push(finding(
            spec,
            Check::SubjectCn,
            &spec.common_name,
            join(&cns),
        ));
    }
    let os: Vec<String> = cert
        .subject()
        .iter_organization()
        .map(|a| a.as_str().unwrap_or("(unreadable)").to_string())
        .collect();
    let want_o: Vec<String> = spec.organization.iter().cloned().collect();
    if os != want_o {
        out.push(finding(spec, Check::SubjectO, join(&want_o), join(&os)));
    }

    // SANs: the exact set, one finding per name missing or extra.
    let mut want: BTreeSet<String> = spec.dns_names.iter().cloned().collect();
    want.extend(spec.ip_addresses.iter().map(|ip| ip.to_string()));
    let mut have = BTreeSet::new();
    match cert.subject_alternative_name() {
        Ok(Some(san)) => {
            for g in &san.value.general_names {
                have.insert(match g {
                    GeneralName::DNSName(d) => d.to_string(),
                    GeneralName::IPAddress(b) => ip_text(b),
                    other => format!("{other:?}"),
                });
            }
        }
        Ok(None) => {}
        Err(e) => out.push(finding(
            spec,
            Check::San,
            "one subjectAltName",
            e.to_string(),
        )),
    }
    for missing in want.difference(&have) {
        out.push(finding(
            spec,
            Check::San,
            format!("SAN {missing}"),
            "absent",
        ));
    }
    for extra in have.difference(&want) {
        out.push(finding(spec, Check::San, "absent", format!("SAN {extra}")));
    }

    // Key algorithm and key pair.
    let have_alg = key_algorithm_of(&cert);
    if have_alg != alg_word(alg) {
        out.push(finding(spec, Check::KeyAlgorithm, alg_word(alg), have_alg));
    }
    if let Some(key) = key {
        if key.subject_public_key_info() != cert.public_key().raw {
            out.push(finding(
                spec,
                Check::KeyPair,
                "the key file's public key",
                "a certificate for another key",
            ));
        }
    }
    out
}

fn check_mode(spec: &CertSpec, path: &Path, want: u32, out: &mut Vec<Finding>) {
    if let Ok(m) = std::fs::metadata(path) {
        let mode = m.permissions().mode() & 0o7777;
        if mode & !want != 0 {
            out.push(finding(
                spec,
                Check::Mode,
                format!(
                    "{} mode {want:04o}",
                    path.file_name().unwrap_or_default().to_string_lossy()
                ),
                format!("{mode:04o}"),
            ));
        }
    }
}

/// The `cert` of findings about the pki dir itself.
pub const PKI_DIR: &str = "(pki dir)";

/// Lint every certificate of the plan in `paths.pki`, at time `now`.
pub fn lint(plan: &LabPlan, now: OffsetDateTime) -> Vec<Finding> {
    let pki = &plan.paths.pki;
    let alg = plan.key_algorithm;
    let mut out = Vec::new();
    let Ok(ca_spec) = super::ca_spec(plan) else {
        return out;
    };
    if let Ok(m) = std::fs::metadata(pki) {
        let mode = m.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            out.push(Finding {
                cert: PKI_DIR.into(),
                check: Check::Mode,
                expected: format!("{} mode 0700", pki.display()),
                found: format!("{mode:04o}"),
                severity: Severity::Error,
            });
        }
    }
    let ca_bytes = std::fs::read(cert_path(pki, &ca_spec.name)).ok();
    let ca_pem = ca_bytes.as_deref().and_then(|b| parse_pem(b).ok());
    let ca_cert = ca_pem.as_ref().and_then(|p| p.parse_x509().ok());

    for spec in &plan.certificates {
        let cfile = cert_path(pki, &spec.name);
        let kfile = key_path(pki, &spec.name);
        let key = match std::fs::read_to_string(&kfile) {
            Ok(text) => match KeyPair::from_pem(&text) {
                Ok(k) => Some(k),
                Err(e) => {
                    out.push(finding(
                        spec,
                        Check::KeyPair,
                        "a PEM private key",
                        format!("{} ({e})", kfile.display()),
                    ));
                    None
                }
            },
            Err(e) => {
                out.push(finding(
                    spec,
                    Check::File,
                    kfile.display().to_string(),
                    e.to_string(),
                ));
                None
            }
        };
        check_mode(spec, &kfile, 0o600, &mut out);
        match std::fs::read(&cfile) {
            Ok(pem) => out.extend(check_cert(
                spec,
                &pem,
                ca_cert.as_ref(),
                key.as_ref(),
                alg,
                now,
            )),
            Err(e) => out.push(finding(
                spec,
                Check::File,
                cfile.display().to_string(),
                e.to_string(),
            )),
        }
    }
    out
}

/// Check every planned kubeconfig under `paths.kubeconfigs` against what
/// [`super::ensure_kubeconfigs`] would write now: a kubeconfig left behind by a
/// re-issued certificate or a moved load balancer is flagged. `cert` is the file name.
pub fn lint_kubeconfigs(plan: &LabPlan) -> Vec<Finding> {
    let mut out = Vec::new();
    for k in super::kubeconfig_plans(plan) {
        let path = plan.paths.kubeconfigs.join(&k.file);
        let f = |expected: String, found: String| Finding {
            cert: k.file.clone(),
            check: Check::Kubeconfig,
            expected,
            found,
            severity: Severity::Error,
        };
        let want = match super::render_kubeconfig(plan, &k) {
            Ok(w) => w,
            Err(e) => {
                out.push(f("its certificate".into(), e.to_string()));
                continue;
            }
        };
        match std::fs::read_to_string(&path) {
            Ok(have) if have == want => {
                let mode = std::fs::metadata(&path)
                    .map(|m| m.permissions().mode() & 0o7777)
                    .unwrap_or(0);
                if mode & 0o077 != 0 {
                    out.push(Finding {
                        check: Check::Mode,
                        ..f("mode 0600".into(), format!("{mode:04o}"))
                    });
                }
            }
            Ok(have) => {
                let server_line = |t: &str| {
                    t.lines()
                        .find(|l| l.trim_start().starts_with("server:"))
                        .map(|l| l.trim().to_string())
                        .unwrap_or_default()
                };
                let found = if server_line(&have) != server_line(&want) {
                    format!("{} (another endpoint)", server_line(&have))
                } else {
                    "other certificates or keys embedded".into()
                };
                out.push(f(
                    format!("the current certificates and server {}", k.server),
                    found,
                ));
            }
            Err(e) => out.push(f(path.display().to_string(), e.to_string())),
        }
    }
    out
}

/// The findings as an aligned table, or a one-line all-clear.
pub fn render_table(findings: &[Finding]) -> String {
    if findings.is_empty() {
        return "every certificate matches the plan\n".into();
    }
    let head = ["CERT", "CHECK", "SEVERITY", "EXPECTED", "FOUND"];
    let rows: Vec<[String; 5]> = findings
        .iter()
        .map(|f| {
            [
                f.cert.clone(),
                f.check.to_string(),
                match f.severity {
                    Severity::Error => "error".into(),
                    Severity::Warning => "warning".into(),
                },
                f.expected.clone(),
                f.found.clone(),
            ]
        })
        .collect();
    let mut w = head.map(str::len);
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: [&str; 5]| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i == 4 {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<width$}  ", width = w[i]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut s = line(head);
    for r in &rows {
        s.push_str(&line([&r[0], &r[1], &r[2], &r[3], &r[4]]));
    }
    let errors = findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .count();
    s.push_str(&format!(
        "{} finding(s): {errors} error(s), {} warning(s)\n",
        findings.len(),
        findings.len() - errors
    ));
    s
}

/// The findings as pretty JSON (an array), for `--output json`.
pub fn to_json(findings: &[Finding]) -> String {
    let mut s = serde_json::to_string_pretty(findings).expect("findings serialize");
    s.push('\n');
    s
}
