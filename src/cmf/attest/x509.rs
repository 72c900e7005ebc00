//! X.509 key-attestation certificates (format 2.25.125255839134299394918079992035184396081.1):
//! HSM attesters (YubiHSM 2, YubiKey PIV, Android Keystore) attest a key with a certificate
//! over it, signed by the device's attestation key.
//!
//! ```text
//! stmt ::= SEQUENCE SIZE(1..MAX) OF Certificate    -- leaf first
//! ```
//!
//! Checks: the leaf's signature verifies with the registered attester key (the trust
//! anchor; further certificates are informative); the leaf's SubjectPublicKeyInfo is
//! byte-equal to the CSR's; the leaf is within its validity window now.

use std::time::SystemTime;

use der::{Decode, Encode};
use x509_cert::Certificate;

use super::{AttestationError, Attester};
use crate::pki::{self, VerifyError};

/// Encode a statement from a chain, leaf first.
pub fn encode_statement(chain: &[Certificate]) -> Result<Vec<u8>, AttestationError> {
    chain
        .to_vec()
        .to_der()
        .map_err(|e| AttestationError::Decode(format!("encoding a certificate chain: {e}")))
}

/// Decode a statement (strict DER, at least one certificate).
pub fn decode_statement(stmt_der: &[u8]) -> Result<Vec<Certificate>, AttestationError> {
    let chain = Vec::<Certificate>::from_der(stmt_der)
        .map_err(|e| AttestationError::Decode(format!("key attestation certificates: {e}")))?;
    if chain.is_empty() {
        return Err(AttestationError::Decode(
            "key attestation certificates: empty SEQUENCE (SIZE(1..MAX))".to_string(),
        ));
    }
    Ok(chain)
}

pub(super) fn verify(
    stmt_der: &[u8],
    csr_spki_der: &[u8],
    attester: &Attester,
) -> Result<(), AttestationError> {
    verify_at(stmt_der, csr_spki_der, attester, SystemTime::now())
}

/// [`verify`] at a given time.
pub fn verify_at(
    stmt_der: &[u8],
    csr_spki_der: &[u8],
    attester: &Attester,
    now: SystemTime,
) -> Result<(), AttestationError> {
    let chain = decode_statement(stmt_der)?;
    let leaf = &chain[0];
    let tbs = leaf
        .tbs_certificate()
        .to_der()
        .map_err(|e| AttestationError::Decode(format!("leaf certificate: {e}")))?;
    let signature = leaf.signature().as_bytes().ok_or_else(|| {
        AttestationError::Decode("leaf certificate: signature has unused bits".to_string())
    })?;
    match pki::verify_signature(
        &attester.public_key_spki_der,
        leaf.signature_algorithm(),
        &tbs,
        signature,
    ) {
        Ok(()) => {}
        Err(VerifyError::BadSignature | VerifyError::Encoding(_)) => {
            return Err(AttestationError::BadSignature)
        }
        // The registered key is EC and the certificate says RSA (or the reverse): not
        // signed by that key.
        Err(VerifyError::PublicKey(_)) => return Err(AttestationError::BadSignature),
        Err(VerifyError::UnsupportedAlgorithm(e)) => {
            return Err(AttestationError::UnsupportedSignature(e))
        }
    }
    let leaf_spki = leaf
        .tbs_certificate()
        .subject_public_key_info()
        .to_der()
        .map_err(|e| AttestationError::Decode(format!("leaf certificate: {e}")))?;
    if leaf_spki != csr_spki_der {
        return Err(AttestationError::KeyMismatch);
    }
    let validity = leaf.tbs_certificate().validity();
    if now < validity.not_before.to_system_time() {
        return Err(AttestationError::NotYetValid {
            not_before: validity.not_before.to_string(),
        });
    }
    if now > validity.not_after.to_system_time() {
        return Err(AttestationError::Expired {
            not_after: validity.not_after.to_string(),
        });
    }
    Ok(())
}
