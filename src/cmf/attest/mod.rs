//! Placeholder until the attestation verifiers land from the `attest` branch.
#![allow(dead_code)]

use std::str::FromStr;

#[derive(Debug, Clone, Default)]
pub struct Formats;

impl Formats {
    pub fn with_alias_named(self, _oid: &str, _kind: &str) -> Result<Formats, String> {
        Err("not built yet".into())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatOid(pub Vec<u8>);

impl FromStr for FormatOid {
    type Err = String;
    fn from_str(_s: &str) -> Result<Self, Self::Err> {
        Err("not built yet".into())
    }
}

pub struct Attester {
    pub public_key_spki_der: Vec<u8>,
    pub format: FormatOid,
    pub expected_qualifying_data: Option<Vec<u8>>,
}

pub struct Verified {
    pub format: FormatOid,
    pub tpm_fixed: bool,
    pub tpm_residency: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("attestation verification is not built yet")]
pub struct AttestationError;

pub fn verify_csr_attestation(
    _formats: &Formats,
    _attributes: &x509_cert::attr::Attributes,
    _csr_spki_der: &[u8],
    _attester: &Attester,
) -> Result<Verified, AttestationError> {
    Err(AttestationError)
}
