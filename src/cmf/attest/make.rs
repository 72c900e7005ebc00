//! The consumer's side of TPM key attestation, for VNFM developers and tests: a CSR whose
//! key lives in a TPM, signed inside that TPM, carrying a TPM2_Certify statement by an
//! attestation key over the registered qualifying data.

use std::str::FromStr;
use std::sync::Arc;

use x509_cert::builder::{Builder, RequestBuilder};
use x509_cert::name::Name;
use x509_cert::request::CertReq;

use super::{tpm, AttestationBundle, AttestationStatement, FormatOid, TPM2_CERTIFY_FORMAT};
use crate::keys::signer::{HardwareKey, HardwareSignature};
use crate::keys::tpm::TpmKeyStore;
use crate::keys::{KeyAttestation, KeyRef, KeyStore};

/// The attestation bundle for `key`: TPM2_Certify by `attestation_key` with `nonce` as
/// qualifying data, the signature as the TPM returned it (TPMT_SIGNATURE), and the key's
/// TPMT_PUBLIC.
pub fn tpm_certify_bundle(
    store: &TpmKeyStore,
    key: &KeyRef,
    attestation_key: &KeyRef,
    nonce: &[u8],
) -> Result<AttestationBundle, String> {
    let evidence = store
        .certify(key, attestation_key, nonce)
        .map_err(|e| format!("TPM2_Certify: {e}"))?;
    let stmt_der = tpm::encode_statement(
        &evidence.attest,
        &evidence.signature,
        Some(&evidence.public_area),
    )
    .map_err(|e| format!("statement: {e}"))?;
    Ok(AttestationBundle {
        statements: vec![AttestationStatement {
            format: FormatOid::from_str(TPM2_CERTIFY_FORMAT).map_err(|e| e.to_string())?,
            stmt_der,
            hint: None,
        }],
        certs: Vec::new(),
    })
}

/// A CSR for `key` with `subject`, signed inside the TPM, carrying `bundle`.
pub fn csr_with_attestation(
    store: Arc<dyn KeyStore>,
    key: &KeyRef,
    subject: &str,
    bundle: Option<&AttestationBundle>,
) -> Result<CertReq, String> {
    let signer = HardwareKey::new(store, key.clone()).map_err(|e| e.to_string())?;
    let subject = Name::from_str(subject).map_err(|e| format!("subject '{subject}': {e}"))?;
    let mut builder = RequestBuilder::new(subject).map_err(|e| e.to_string())?;
    if let Some(bundle) = bundle {
        builder
            .add_attribute(bundle)
            .map_err(|e| format!("attestation attribute: {e}"))?;
    }
    builder
        .build::<_, HardwareSignature>(&signer)
        .map_err(|e| format!("signing the CSR in the TPM: {e}"))
}
