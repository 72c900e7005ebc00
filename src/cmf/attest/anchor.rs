//! Anchoring an attester key in a TPM PKI, before a certificate says "TPM" (issue 10 §2).
//!
//! A registered attester key proves nothing by itself: the consumer chose it, and a
//! software key can sign a hand-made TPMS_ATTEST with fixedTPM set. The TCG policies
//! 2.23.133.11.1.1 / .2 are asserted only for an attester the CMF has tied to a TPM whose
//! manufacturer (or an attestation CA) it trusts, in one of two ways:
//!
//! - **AK certificate**: a certificate chain from the AK (leaf, EKU tcg-kp-AIKCertificate
//!   2.23.133.8.3 when it has an EKU) to a configured root, whose public key is the
//!   registered attester key; given at Register or in the CSR's AttestationBundle `certs`;
//! - **EK credential activation**: the EK certificate chains to a configured (manufacturer)
//!   root, the AK's public area has the attributes of an attestation key and its key is the
//!   registered one, and the consumer proves with TPM2_ActivateCredential that the AK and
//!   that EK live in one TPM ([`super::credential`], [`super::service`]).
//!
//! Paths are built and checked by rustls-webpki (signatures, validity, basicConstraints,
//! keyUsage, name constraints, EKU). Not checked: revocation of EK/AK certificates (no CRL
//! or OCSP fetching from here), and certificate policies of the roots.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use der::{Decode, Encode};
use rustls::pki_types::{CertificateDer, UnixTime};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use x509_cert::Certificate;

use super::AttestationError;

/// tcg-kp-EKCertificate 2.23.133.8.1, DER content octets.
const TCG_KP_EK_CERTIFICATE: &[u8] = &[0x67, 0x81, 0x05, 0x08, 0x01];
/// tcg-kp-AIKCertificate 2.23.133.8.3, DER content octets.
const TCG_KP_AIK_CERTIFICATE: &[u8] = &[0x67, 0x81, 0x05, 0x08, 0x03];

/// How an attester was anchored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AnchorMethod {
    /// An AK certificate chain to a configured root.
    AkCertificate,
    /// EK certificate to a configured root, and TPM2_ActivateCredential.
    EkCredentialActivation,
}

/// The anchor recorded with a registration's attester.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttesterAnchor {
    pub method: AnchorMethod,
    /// Subject of the configured root the chain ends at.
    pub root: String,
    /// SHA-256 of the AK or EK certificate, hex.
    pub certificate_sha256: String,
    /// RFC 3339 UTC.
    pub anchored_at: String,
}

/// What a certificate chain is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    EndorsementKey,
    AttestationKey,
}

/// A verified chain: the leaf's key and where it ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedChain {
    pub leaf_spki_der: Vec<u8>,
    pub leaf_sha256: String,
    pub root: String,
}

/// The configured TPM manufacturer and attestation roots.
#[derive(Clone, Debug, Default)]
pub struct TrustRoots {
    /// (certificate DER, subject).
    roots: Vec<(Vec<u8>, String)>,
}

impl TrustRoots {
    /// Read every certificate of every PEM file.
    pub fn load(paths: &[PathBuf]) -> Result<TrustRoots, String> {
        let mut roots = Vec::new();
        for path in paths {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cmf.attestation.roots: {}: {e}", path.display()))?;
            let certs = crate::pki::certificates_from_pem(&text)
                .map_err(|e| format!("cmf.attestation.roots: {}: {e}", path.display()))?;
            for cert in certs {
                let der = cert
                    .to_der()
                    .map_err(|e| format!("cmf.attestation.roots: {}: {e}", path.display()))?;
                webpki::anchor_from_trusted_cert(&CertificateDer::from(der.as_slice())).map_err(
                    |e| {
                        format!(
                            "cmf.attestation.roots: {}: not a usable root: {e}",
                            path.display()
                        )
                    },
                )?;
                roots.push((der, cert.tbs_certificate().subject().to_string()));
            }
        }
        Ok(TrustRoots { roots })
    }

    pub fn is_empty(&self) -> bool {
        self.roots.is_empty()
    }

    /// Verify `leaf` through `intermediates` (any order) to a configured root, now.
    pub fn verify(
        &self,
        leaf: &[u8],
        intermediates: &[Vec<u8>],
        purpose: Purpose,
    ) -> Result<VerifiedChain, AttestationError> {
        self.verify_at(leaf, intermediates, purpose, SystemTime::now())
    }

    /// [`Self::verify`] at a given time.
    pub fn verify_at(
        &self,
        leaf: &[u8],
        intermediates: &[Vec<u8>],
        purpose: Purpose,
        now: SystemTime,
    ) -> Result<VerifiedChain, AttestationError> {
        if self.roots.is_empty() {
            return Err(AttestationError::Anchor(
                "no TPM manufacturer or attestation roots are configured \
                 ([cmf.attestation] roots)"
                    .into(),
            ));
        }
        let what = match purpose {
            Purpose::EndorsementKey => "EK certificate",
            Purpose::AttestationKey => "AK certificate",
        };
        let anchors = self
            .roots
            .iter()
            .filter_map(|(der, _)| {
                webpki::anchor_from_trusted_cert(&CertificateDer::from(der.as_slice()))
                    .ok()
                    .map(|a| a.to_owned())
            })
            .collect::<Vec<_>>();
        let leaf_der = CertificateDer::from(leaf);
        let end_entity = webpki::EndEntityCert::try_from(&leaf_der)
            .map_err(|e| AttestationError::Anchor(format!("{what}: {e}")))?;
        let intermediates: Vec<CertificateDer<'_>> = intermediates
            .iter()
            .map(|c| CertificateDer::from(c.as_slice()))
            .collect();
        let since_epoch = now
            .duration_since(UNIX_EPOCH)
            .map_err(|_| AttestationError::Anchor("the clock is before 1970".into()))?;
        let usage = match purpose {
            Purpose::EndorsementKey => webpki::KeyUsage::required_if_present(TCG_KP_EK_CERTIFICATE),
            Purpose::AttestationKey => {
                webpki::KeyUsage::required_if_present(TCG_KP_AIK_CERTIFICATE)
            }
        };
        let path = end_entity
            .verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                &anchors,
                &intermediates,
                UnixTime::since_unix_epoch(since_epoch),
                usage,
                None,
                None,
            )
            .map_err(|e| {
                AttestationError::Anchor(format!("{what} does not chain to a configured root: {e}"))
            })?;
        let anchor_subject: &[u8] = path.anchor().subject.as_ref();
        let root = self
            .roots
            .iter()
            .find(|(der, _)| {
                webpki::anchor_from_trusted_cert(&CertificateDer::from(der.as_slice()))
                    .is_ok_and(|a| a.subject.as_ref() == anchor_subject)
            })
            .map(|(_, subject)| subject.clone())
            .unwrap_or_default();
        let certificate = Certificate::from_der(leaf)
            .map_err(|e| AttestationError::Anchor(format!("{what}: {e}")))?;
        let leaf_spki_der = certificate
            .tbs_certificate()
            .subject_public_key_info()
            .to_der()
            .map_err(|e| AttestationError::Anchor(format!("{what}: {e}")))?;
        Ok(VerifiedChain {
            leaf_spki_der,
            leaf_sha256: hex::encode(sha2::Sha256::digest(leaf)),
            root,
        })
    }

    /// Anchor `attester_spki_der` by an AK certificate among `certs` (a CSR bundle's path
    /// hints, or the chain given at Register): the first certificate of that key that
    /// chains, the others serving as intermediates.
    pub fn anchor_by_ak_certificate(
        &self,
        certs: &[Vec<u8>],
        attester_spki_der: &[u8],
    ) -> Result<AttesterAnchor, AttestationError> {
        let attester = super::tpm::canonical_spki(attester_spki_der)?;
        let mut last = AttestationError::Anchor(
            "no certificate of the attester key is among the certificates given".into(),
        );
        for (index, der) in certs.iter().enumerate() {
            let Ok(cert) = Certificate::from_der(der) else {
                continue;
            };
            let Ok(spki) = cert.tbs_certificate().subject_public_key_info().to_der() else {
                continue;
            };
            if super::tpm::canonical_spki(&spki).ok().as_deref() != Some(attester.as_slice()) {
                continue;
            }
            let others: Vec<Vec<u8>> = certs
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != index)
                .map(|(_, c)| c.clone())
                .collect();
            match self.verify(der, &others, Purpose::AttestationKey) {
                Ok(chain) => {
                    return Ok(AttesterAnchor {
                        method: AnchorMethod::AkCertificate,
                        root: chain.root,
                        certificate_sha256: chain.leaf_sha256,
                        anchored_at: crate::keys::rfc3339_now(),
                    })
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

/// Certificates given as PEM (one or more blocks) or base64 DER strings, in order.
pub fn certificates_from_text(texts: &[String], field: &str) -> Result<Vec<Vec<u8>>, String> {
    use base64::Engine;
    let mut out = Vec::new();
    for (i, text) in texts.iter().enumerate() {
        let text = text.trim();
        if text.starts_with("-----BEGIN") {
            let certs = crate::pki::certificates_from_pem(text)
                .map_err(|e| format!("{field}[{i}]: {e}"))?;
            for cert in certs {
                out.push(cert.to_der().map_err(|e| format!("{field}[{i}]: {e}"))?);
            }
        } else {
            let der = base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|e| format!("{field}[{i}]: base64: {e}"))?;
            Certificate::from_der(&der)
                .map_err(|e| format!("{field}[{i}]: not a certificate: {e}"))?;
            out.push(der);
        }
    }
    Ok(out)
}
