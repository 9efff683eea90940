//! Key generation and certificate issuance with rcgen. Pure: specs and keys in,
//! PEM text out; nothing here touches the disk.

use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
    PKCS_RSA_SHA256,
};
use time::{Duration, OffsetDateTime};

use crate::plan::{CertSpec, CertUsage};
use crate::scenario::KeyAlgorithm;

/// How long the CA is valid.
pub const CA_VALIDITY: Duration = Duration::days(3650);
/// How long a leaf certificate is valid.
pub const LEAF_VALIDITY: Duration = Duration::days(365);
/// Certificates start being valid this long before they are issued, so a VM whose
/// clock lags the host's a little still accepts them.
pub const BACKDATE: Duration = Duration::hours(1);

/// A fresh private key of the scenario's algorithm.
pub fn generate_key(alg: KeyAlgorithm) -> Result<KeyPair, rcgen::Error> {
    match alg {
        KeyAlgorithm::EcdsaP256 => KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256),
        // RSA key generation comes from aws-lc-rs (rcgen with ring could not do it).
        KeyAlgorithm::Rsa2048 => {
            KeyPair::generate_rsa_for(&PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
        }
    }
}

/// Whether `key` is of the scenario's algorithm (RSA keys of another size count as wrong).
pub fn key_matches_algorithm(key: &KeyPair, alg: KeyAlgorithm) -> bool {
    match alg {
        KeyAlgorithm::EcdsaP256 => key.algorithm() == &PKCS_ECDSA_P256_SHA256,
        KeyAlgorithm::Rsa2048 => {
            key.algorithm() == &PKCS_RSA_SHA256 && rsa_modulus_bits(key) == Some(2048)
        }
    }
}

/// Bits of an RSA key's modulus, from its PKCS#1 public key DER.
fn rsa_modulus_bits(key: &KeyPair) -> Option<usize> {
    use x509_parser::prelude::FromDer;
    let spki = rcgen::PublicKeyData::subject_public_key_info(key);
    let (_, info) = x509_parser::x509::SubjectPublicKeyInfo::from_der(&spki).ok()?;
    match info.parsed().ok()? {
        x509_parser::public_key::PublicKey::RSA(rsa) => Some(rsa.key_size()),
        _ => None,
    }
}

/// Key usages a certificate of `usage` carries. RSA leaves also get keyEncipherment,
/// which TLS 1.2 RSA key exchange needs; ECDSA keys cannot encipher.
pub fn key_usages(usage: CertUsage, rsa: bool) -> Vec<KeyUsagePurpose> {
    use KeyUsagePurpose::*;
    match usage {
        CertUsage::Ca => vec![DigitalSignature, KeyCertSign, CrlSign],
        CertUsage::SigningKey => vec![DigitalSignature],
        CertUsage::Client | CertUsage::Server | CertUsage::ClientServer => {
            if rsa {
                vec![DigitalSignature, KeyEncipherment]
            } else {
                vec![DigitalSignature]
            }
        }
    }
}

/// Extended key usages of a certificate of `usage`.
pub fn extended_key_usages(usage: CertUsage) -> Vec<ExtendedKeyUsagePurpose> {
    use ExtendedKeyUsagePurpose::*;
    match usage {
        CertUsage::Ca | CertUsage::SigningKey => vec![],
        CertUsage::Client => vec![ClientAuth],
        CertUsage::Server => vec![ServerAuth],
        CertUsage::ClientServer => vec![ServerAuth, ClientAuth],
    }
}

/// Certificate parameters for `spec`, valid from `now - BACKDATE` for `validity`.
pub fn params_for(
    spec: &CertSpec,
    rsa: bool,
    now: OffsetDateTime,
    validity: Duration,
) -> Result<CertificateParams, rcgen::Error> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, spec.common_name.as_str());
    if let Some(o) = &spec.organization {
        dn.push(DnType::OrganizationName, o.as_str());
    }
    p.distinguished_name = dn;
    p.not_before = now - BACKDATE;
    p.not_after = now + validity;
    p.serial_number = Some(random_serial());
    p.key_usages = key_usages(spec.usage, rsa);
    p.extended_key_usages = extended_key_usages(spec.usage);
    for d in &spec.dns_names {
        p.subject_alt_names
            .push(SanType::DnsName(d.as_str().try_into()?));
    }
    for ip in &spec.ip_addresses {
        p.subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(*ip)));
    }
    if spec.usage == CertUsage::Ca {
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    } else {
        // Writes basicConstraints CA:FALSE and a subject key identifier.
        p.is_ca = IsCa::ExplicitNoCa;
        p.use_authority_key_identifier_extension = true;
    }
    Ok(p)
}

/// A positive 128-bit serial: unique per issuance, unlike rcgen's default (a hash of the
/// public key), which would repeat when a certificate is re-issued for the same key.
fn random_serial() -> SerialNumber {
    let mut b: [u8; 16] = rand::random();
    b[0] &= 0x7f;
    b[0] |= 0x01;
    SerialNumber::from_slice(&b)
}

fn is_rsa(key: &KeyPair) -> bool {
    key.algorithm() == &PKCS_RSA_SHA256
}

/// A self-signed CA certificate for `spec` and `key`, as PEM.
pub fn self_signed_ca(
    spec: &CertSpec,
    key: &KeyPair,
    now: OffsetDateTime,
) -> Result<String, rcgen::Error> {
    let params = params_for(spec, is_rsa(key), now, CA_VALIDITY)?;
    Ok(params.self_signed(key)?.pem())
}

/// A leaf certificate for `spec` over `key`, signed by the CA (`ca_cert_pem` + `ca_key`).
pub fn issue_leaf(
    spec: &CertSpec,
    key: &KeyPair,
    ca_cert_pem: &str,
    ca_key: &KeyPair,
    now: OffsetDateTime,
) -> Result<String, rcgen::Error> {
    let issuer = Issuer::from_ca_cert_pem(ca_cert_pem, ca_key)?;
    let params = params_for(spec, is_rsa(key), now, LEAF_VALIDITY)?;
    Ok(params.signed_by(key, &issuer)?.pem())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(usage: CertUsage) -> CertSpec {
        CertSpec {
            name: "x".into(),
            purpose: "test".into(),
            common_name: "x".into(),
            organization: Some("o".into()),
            usage,
            dns_names: vec!["x.example".into()],
            ip_addresses: vec![std::net::Ipv4Addr::new(10, 0, 0, 1)],
            node: None,
        }
    }

    #[test]
    fn ecdsa_keys_match_their_algorithm() {
        let k = generate_key(KeyAlgorithm::EcdsaP256).unwrap();
        assert!(key_matches_algorithm(&k, KeyAlgorithm::EcdsaP256));
        assert!(!key_matches_algorithm(&k, KeyAlgorithm::Rsa2048));
    }

    #[test]
    fn rsa_keys_are_2048_bits() {
        let k = generate_key(KeyAlgorithm::Rsa2048).unwrap();
        assert_eq!(rsa_modulus_bits(&k), Some(2048));
        assert!(key_matches_algorithm(&k, KeyAlgorithm::Rsa2048));
        assert!(!key_matches_algorithm(&k, KeyAlgorithm::EcdsaP256));
    }

    #[test]
    fn serials_differ_per_issuance() {
        let k = generate_key(KeyAlgorithm::EcdsaP256).unwrap();
        let now = OffsetDateTime::now_utc();
        let a = self_signed_ca(&spec(CertUsage::Ca), &k, now).unwrap();
        let b = self_signed_ca(&spec(CertUsage::Ca), &k, now).unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn leaf_usages_follow_the_spec() {
        assert_eq!(
            extended_key_usages(CertUsage::ClientServer),
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth
            ]
        );
        assert!(key_usages(CertUsage::Server, true).contains(&KeyUsagePurpose::KeyEncipherment));
        assert!(!key_usages(CertUsage::Server, false).contains(&KeyUsagePurpose::KeyEncipherment));
    }
}
