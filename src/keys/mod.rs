//! Hardware key layer.
//!
//! Every key nfv-warden uses (CA signing keys, the SM association keys, its own TLS identity,
//! keys held on behalf of VNFs) lives in a PKCS#11 token or a TPM 2.0 and never leaves it.
//! This module is the small core every backend implements ([`KeyStore`]: generate, public
//! key, sign, destroy, list) plus the stable names of keys ([`KeyRef`]): RFC 7512 `pkcs11:`
//! URIs and TPM persistent handles. Never slot numbers, never saved TPM contexts.
//!
//! Calls are blocking: a PKCS#11 or TPM operation holds a session or the TPM for its whole
//! duration. Async callers go through `tokio::task::spawn_blocking`.

pub mod backends;
pub mod pkcs11;
pub mod signer;
pub mod tpm;
mod uri;

use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sha2::Digest;

pub use uri::{Pkcs11Uri, TokenSelector};

/// Key types the layer generates. Sizes follow what CAs and TLS peers accept today.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KeyAlgorithm {
    #[serde(rename = "ec-p256")]
    EcP256,
    #[serde(rename = "ec-p384")]
    EcP384,
    #[serde(rename = "rsa-2048")]
    Rsa2048,
    #[serde(rename = "rsa-3072")]
    Rsa3072,
}

impl KeyAlgorithm {
    pub const ALL: [KeyAlgorithm; 4] = [
        KeyAlgorithm::EcP256,
        KeyAlgorithm::EcP384,
        KeyAlgorithm::Rsa2048,
        KeyAlgorithm::Rsa3072,
    ];

    pub fn is_rsa(self) -> bool {
        matches!(self, KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072)
    }

    /// RSA modulus size in bits; `None` for EC keys.
    pub fn rsa_bits(self) -> Option<u32> {
        match self {
            KeyAlgorithm::Rsa2048 => Some(2048),
            KeyAlgorithm::Rsa3072 => Some(3072),
            _ => None,
        }
    }

    /// The scheme used when a caller does not choose one: ECDSA with the curve's hash,
    /// RSA PKCS#1 v1.5 with SHA-256 (what X.509 issuers and most relying parties expect).
    pub fn default_scheme(self) -> SignatureScheme {
        match self {
            KeyAlgorithm::EcP256 => SignatureScheme::EcdsaSha256,
            KeyAlgorithm::EcP384 => SignatureScheme::EcdsaSha384,
            KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 => SignatureScheme::RsaPkcs1Sha256,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            KeyAlgorithm::EcP256 => "ec-p256",
            KeyAlgorithm::EcP384 => "ec-p384",
            KeyAlgorithm::Rsa2048 => "rsa-2048",
            KeyAlgorithm::Rsa3072 => "rsa-3072",
        }
    }
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyAlgorithm {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "ec-p256" | "p256" | "p-256" | "ecp256" => Ok(KeyAlgorithm::EcP256),
            "ec-p384" | "p384" | "p-384" | "ecp384" => Ok(KeyAlgorithm::EcP384),
            "rsa-2048" | "rsa2048" => Ok(KeyAlgorithm::Rsa2048),
            "rsa-3072" | "rsa3072" => Ok(KeyAlgorithm::Rsa3072),
            other => Err(KeyError::InvalidArgument(format!(
                "unknown key algorithm '{other}' (expected ec-p256, ec-p384, rsa-2048 or rsa-3072)"
            ))),
        }
    }
}

/// Signature schemes, with output in X.509 / TLS encoding: ECDSA as a DER `Ecdsa-Sig-Value`,
/// RSA as the raw PKCS#1 v1.5 or PSS signature (PSS with MGF1 of the same hash and a salt as
/// long as the hash, as TLS 1.3 requires).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SignatureScheme {
    EcdsaSha256,
    EcdsaSha384,
    RsaPkcs1Sha256,
    RsaPkcs1Sha384,
    RsaPssSha256,
    RsaPssSha384,
}

impl SignatureScheme {
    pub const ALL: [SignatureScheme; 6] = [
        SignatureScheme::EcdsaSha256,
        SignatureScheme::EcdsaSha384,
        SignatureScheme::RsaPkcs1Sha256,
        SignatureScheme::RsaPkcs1Sha384,
        SignatureScheme::RsaPssSha256,
        SignatureScheme::RsaPssSha384,
    ];

    pub fn hash_algorithm(self) -> HashAlgorithm {
        match self {
            SignatureScheme::EcdsaSha256
            | SignatureScheme::RsaPkcs1Sha256
            | SignatureScheme::RsaPssSha256 => HashAlgorithm::Sha256,
            SignatureScheme::EcdsaSha384
            | SignatureScheme::RsaPkcs1Sha384
            | SignatureScheme::RsaPssSha384 => HashAlgorithm::Sha384,
        }
    }

    pub fn is_ecdsa(self) -> bool {
        matches!(
            self,
            SignatureScheme::EcdsaSha256 | SignatureScheme::EcdsaSha384
        )
    }

    pub fn is_pss(self) -> bool {
        matches!(
            self,
            SignatureScheme::RsaPssSha256 | SignatureScheme::RsaPssSha384
        )
    }

    /// Whether a key of `algorithm` can produce this scheme. ECDSA is allowed with either
    /// hash on either curve (TLS 1.2 permits it; X.509 issuers pick the curve's hash).
    pub fn fits(self, algorithm: KeyAlgorithm) -> bool {
        self.is_ecdsa() != algorithm.is_rsa()
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SignatureScheme::EcdsaSha256 => "ecdsa-sha256",
            SignatureScheme::EcdsaSha384 => "ecdsa-sha384",
            SignatureScheme::RsaPkcs1Sha256 => "rsa-pkcs1-sha256",
            SignatureScheme::RsaPkcs1Sha384 => "rsa-pkcs1-sha384",
            SignatureScheme::RsaPssSha256 => "rsa-pss-sha256",
            SignatureScheme::RsaPssSha384 => "rsa-pss-sha384",
        }
    }
}

impl fmt::Display for SignatureScheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SignatureScheme {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SignatureScheme::ALL
            .into_iter()
            .find(|scheme| scheme.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                KeyError::InvalidArgument(format!(
                    "unknown signature scheme '{s}' (expected one of ecdsa-sha256, ecdsa-sha384, \
                     rsa-pkcs1-sha256, rsa-pkcs1-sha384, rsa-pss-sha256, rsa-pss-sha384)"
                ))
            })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HashAlgorithm {
    Sha256,
    Sha384,
}

impl HashAlgorithm {
    pub fn digest(self, message: &[u8]) -> Vec<u8> {
        match self {
            HashAlgorithm::Sha256 => sha2::Sha256::digest(message).to_vec(),
            HashAlgorithm::Sha384 => sha2::Sha384::digest(message).to_vec(),
        }
    }

    pub fn output_len(self) -> usize {
        match self {
            HashAlgorithm::Sha256 => 32,
            HashAlgorithm::Sha384 => 48,
        }
    }
}

/// A stable name for a key or object held by a backend.
///
/// - `pkcs11:token=ca-token;object=issuing-ca;id=%01` (RFC 7512; the token by `token` label
///   or `serial`, the object by `object` label and/or `id`);
/// - `tpm:handle=0x81000100` for a persistent TPM key, `tpm:handle=0x01500000` for an NV
///   index (erasure only).
///
/// ```
/// use nfv_warden::keys::{BackendKind, KeyRef};
///
/// let ca: KeyRef = "pkcs11:token=warden;object=issuing%20ca".parse().unwrap();
/// assert_eq!(ca.backend(), BackendKind::Pkcs11);
/// assert_eq!(ca.to_string(), "pkcs11:token=warden;object=issuing%20ca");
///
/// let tls: KeyRef = "tpm:handle=0x81000100".parse().unwrap();
/// assert_eq!(tls.backend(), BackendKind::Tpm);
///
/// // Slot numbers are not stable names, and a PIN never goes in a URI.
/// assert!("pkcs11:slot-id=0;object=ca".parse::<KeyRef>().is_err());
/// assert!("pkcs11:token=warden;object=ca?pin-value=1234".parse::<KeyRef>().is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum KeyRef {
    Pkcs11(Pkcs11Uri),
    Tpm(TpmHandle),
}

impl KeyRef {
    pub fn backend(&self) -> BackendKind {
        match self {
            KeyRef::Pkcs11(_) => BackendKind::Pkcs11,
            KeyRef::Tpm(_) => BackendKind::Tpm,
        }
    }
}

impl fmt::Display for KeyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyRef::Pkcs11(uri) => uri.fmt(f),
            KeyRef::Tpm(handle) => handle.fmt(f),
        }
    }
}

impl FromStr for KeyRef {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.starts_with("pkcs11:") {
            Ok(KeyRef::Pkcs11(s.parse()?))
        } else if s.starts_with("tpm:") {
            Ok(KeyRef::Tpm(s.parse()?))
        } else {
            Err(KeyError::InvalidReference(format!(
                "'{s}' is neither a pkcs11: URI nor a tpm:handle= reference"
            )))
        }
    }
}

impl Serialize for KeyRef {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for KeyRef {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A TPM handle in the persistent-object range (0x81xxxxxx) or the NV-index range
/// (0x01xxxxxx).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TpmHandle(pub u32);

impl TpmHandle {
    /// TPM 2.0 Part 2, 7.2: the top octet of a handle is its type.
    pub fn is_persistent(self) -> bool {
        self.0 >> 24 == 0x81
    }

    pub fn is_nv_index(self) -> bool {
        self.0 >> 24 == 0x01
    }
}

impl fmt::Display for TpmHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tpm:handle=0x{:08x}", self.0)
    }
}

impl FromStr for TpmHandle {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            KeyError::InvalidReference(format!(
                "'{s}' is not a TPM reference (expected tpm:handle=0x81xxxxxx or tpm:handle=0x01xxxxxx)"
            ))
        };
        let value = s.strip_prefix("tpm:handle=").ok_or_else(bad)?;
        let hex = value
            .strip_prefix("0x")
            .or_else(|| value.strip_prefix("0X"))
            .ok_or_else(bad)?;
        let handle = TpmHandle(u32::from_str_radix(hex, 16).map_err(|_| bad())?);
        if handle.is_persistent() || handle.is_nv_index() {
            Ok(handle)
        } else {
            Err(bad())
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Pkcs11,
    Tpm,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Pkcs11 => "pkcs11",
            BackendKind::Tpm => "tpm",
        })
    }
}

/// What to generate. `label` names the key on a PKCS#11 token (CKA_LABEL; CKA_ID is derived
/// from the public key). A TPM has no labels: the backend places the key at the next free
/// persistent handle of its configured range and the label is kept for display only.
#[derive(Clone, Debug)]
pub struct KeySpec {
    pub label: String,
    pub algorithm: KeyAlgorithm,
}

/// A public key as SubjectPublicKeyInfo DER, with its algorithm.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicKey {
    pub algorithm: KeyAlgorithm,
    pub spki_der: Vec<u8>,
}

/// A key as listed by a backend.
#[derive(Clone, Debug)]
pub struct KeyInfo {
    pub reference: KeyRef,
    pub label: String,
    pub public_key: PublicKey,
}

/// Proof that an object was erased: what, on which device, when, and whether the backend
/// looked again afterwards and found it gone. VNF-termination erasure stores these.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErasureRecord {
    /// The reference that was erased (`pkcs11:` URI or `tpm:handle=`).
    pub object: String,
    /// What was destroyed, e.g. "private key, public key" or "persistent key".
    pub kind: String,
    /// The device: token label and serial, or TPM manufacturer and firmware.
    pub device: String,
    /// RFC 3339 UTC time at which the destroy call returned.
    pub erased_at: String,
    /// True when a fresh lookup after the destroy found nothing.
    pub verified: bool,
}

impl ErasureRecord {
    pub fn new(object: String, kind: String, device: String, verified: bool) -> Self {
        ErasureRecord {
            object,
            kind,
            device,
            erased_at: rfc3339_now(),
            verified,
        }
    }
}

/// The core every backend implements.
pub trait KeyStore: Send + Sync {
    /// Which backend this is.
    fn kind(&self) -> BackendKind;

    /// A one-line description of the device (token label and serial, TPM vendor).
    fn device(&self) -> String;

    /// Generate a non-extractable key pair inside the device.
    fn generate(&self, spec: &KeySpec) -> Result<KeyInfo, KeyError>;

    /// The public key of `key`, read from the device.
    fn public_key(&self, key: &KeyRef) -> Result<PublicKey, KeyError>;

    /// Sign `message` (the backend hashes it) with `key` under `scheme`; the result is in
    /// X.509 / TLS encoding (DER ECDSA, raw RSA).
    fn sign(
        &self,
        key: &KeyRef,
        scheme: SignatureScheme,
        message: &[u8],
    ) -> Result<Vec<u8>, KeyError>;

    /// Destroy every object `key` names, then look again and report.
    fn destroy(&self, key: &KeyRef) -> Result<ErasureRecord, KeyError>;

    /// The key pairs this backend holds.
    fn list(&self) -> Result<Vec<KeyInfo>, KeyError>;
}

/// TPM2_Certify evidence: the TPM's statement that it holds a key, signed by an attestation
/// key. The byte strings are exactly what a tcg-attest-tpm-certify statement carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertifyEvidence {
    /// TPMS_ATTEST (type TPM_ST_ATTEST_CERTIFY), as signed.
    pub attest: Vec<u8>,
    /// TPMT_SIGNATURE, marshalled.
    pub signature: Vec<u8>,
    /// TPMT_PUBLIC of the certified key, marshalled (no TPM2B size prefix).
    pub public_area: Vec<u8>,
}

/// Key attestation: a capability of backends that can prove a key is theirs (a TPM). Not
/// part of [`KeyStore`]: a PKCS#11 token has no standard equivalent.
pub trait KeyAttestation: Send + Sync {
    /// Create an attestation key (AK): a restricted signing key (fixedTPM, fixedParent,
    /// sensitiveDataOrigin, userWithAuth, restricted, sign) with a fixed scheme (EC P-256:
    /// ECDSA-SHA256; RSA-2048: RSASSA-SHA256), persisted like any other key. A restricted
    /// key signs only TPM-generated structures, so it cannot be used to forge an attestation.
    fn create_attestation_key(&self, spec: &KeySpec) -> Result<KeyInfo, KeyError>;

    /// TPM2_Certify `key` with `attestation_key`, binding `qualifying_data` (a nonce; at
    /// most 64 octets) into the evidence's extraData.
    fn certify(
        &self,
        key: &KeyRef,
        attestation_key: &KeyRef,
        qualifying_data: &[u8],
    ) -> Result<CertifyEvidence, KeyError>;
}

/// Errors of the key layer. Device errors carry the PKCS#11 function or TPM command that
/// failed and its source.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("invalid key reference: {0}")]
    InvalidReference(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("key not found: {0}")]
    NotFound(String),
    #[error("key already exists: {0}")]
    AlreadyExists(String),
    #[error("{0} is not supported by this backend")]
    Unsupported(String),
    #[error("key reference {0} belongs to another backend")]
    WrongBackend(String),
    #[error("PIN rejected by the token ({function}): not retrying, to avoid locking it")]
    PinIncorrect { function: &'static str },
    #[error("PIN: {0}")]
    Pin(String),
    #[error("PKCS#11 module {module}: {reason}")]
    Module { module: String, reason: String },
    #[error("token {0} not found")]
    TokenNotFound(String),
    /// The device cannot serve now (token missing, library being re-initialized, out of
    /// file descriptors or memory, TPM restarting): transient, retry later. `device` names
    /// it for the operator and the HTTP client, e.g. "token warden (SoftHSM project)".
    #[error("{device} unavailable during {operation}: {reason}")]
    Unavailable {
        device: String,
        operation: &'static str,
        reason: String,
    },
    #[error("{function} failed: {source}")]
    Pkcs11 {
        function: &'static str,
        #[source]
        source: cryptoki::error::Error,
    },
    #[error("TPM {command} failed: {source}")]
    Tpm {
        command: &'static str,
        #[source]
        source: tss_esapi::Error,
    },
    #[error("TPM: {0}")]
    TpmOther(String),
    #[error("encoding: {0}")]
    Encoding(String),
}

impl KeyError {
    /// A transient device error (see [`KeyError::Unavailable`]).
    pub fn unavailable(
        device: impl Into<String>,
        operation: &'static str,
        reason: impl Into<String>,
    ) -> KeyError {
        KeyError::Unavailable {
            device: device.into(),
            operation,
            reason: reason.into(),
        }
    }

    /// Transient errors mean "try again later" (HTTP 503 with Retry-After); everything else
    /// is permanent for the request that caused it.
    pub fn is_transient(&self) -> bool {
        matches!(self, KeyError::Unavailable { .. })
    }

    /// Authentication failures that retrying would make worse (a rejected PIN counts against
    /// the token's retry limit; a failed TPM authorization against its dictionary-attack
    /// counter) or that no retry can fix (an unreadable PIN).
    pub fn is_authentication(&self) -> bool {
        use tss_esapi::constants::response_code::Tss2ResponseCodeKind as Rc;
        match self {
            KeyError::PinIncorrect { .. } | KeyError::Pin(_) => true,
            KeyError::Tpm {
                source: tss_esapi::Error::Tss2Error(rc),
                ..
            } => matches!(rc.kind(), Some(Rc::AuthFail | Rc::BadAuth | Rc::Lockout)),
            _ => false,
        }
    }
}

/// RFC 3339 UTC timestamp with seconds precision.
pub fn rfc3339_now() -> String {
    rfc3339(SystemTime::now())
}

pub fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

/// Encode a raw ECDSA signature (r || s, as PKCS#11 and the TPM return it) as a DER
/// `Ecdsa-Sig-Value` (RFC 5480 / RFC 3279 2.2.3).
pub fn ecdsa_raw_to_der(raw: &[u8]) -> Result<Vec<u8>, KeyError> {
    if raw.is_empty() || raw.len() % 2 != 0 {
        return Err(KeyError::Encoding(format!(
            "ECDSA signature of {} bytes is not r || s",
            raw.len()
        )));
    }
    let (r, s) = raw.split_at(raw.len() / 2);
    let mut body = Vec::with_capacity(raw.len() + 8);
    der_unsigned_integer(r, &mut body);
    der_unsigned_integer(s, &mut body);
    let mut out = Vec::with_capacity(body.len() + 3);
    out.push(0x30);
    der_length(body.len(), &mut out);
    out.extend_from_slice(&body);
    Ok(out)
}

fn der_unsigned_integer(bytes: &[u8], out: &mut Vec<u8>) {
    let start = bytes
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(bytes.len().saturating_sub(1));
    let trimmed = &bytes[start..];
    let pad = trimmed.first().is_some_and(|&b| b & 0x80 != 0);
    out.push(0x02);
    der_length(trimmed.len() + usize::from(pad), out);
    if pad {
        out.push(0);
    }
    out.extend_from_slice(trimmed);
}

fn der_length(len: usize, out: &mut Vec<u8>) {
    if len < 0x80 {
        out.push(len as u8);
    } else if len < 0x100 {
        out.extend_from_slice(&[0x81, len as u8]);
    } else if len < 0x1_0000 {
        out.extend_from_slice(&[0x82, (len >> 8) as u8, len as u8]);
    } else {
        // Not reachable for ECDSA signatures; correct all the same.
        out.extend_from_slice(&[0x83, (len >> 16) as u8, (len >> 8) as u8, len as u8]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_refs_round_trip() {
        for text in [
            "tpm:handle=0x81000100",
            "tpm:handle=0x01500000",
            "pkcs11:token=ca%20token;object=issuing-ca;id=%01%02",
            "pkcs11:serial=1a2b3c;object=tls",
        ] {
            let parsed: KeyRef = text.parse().unwrap();
            assert_eq!(parsed.to_string(), text);
        }
    }

    #[test]
    fn bad_references_are_refused() {
        for text in [
            "slot=0",
            "tpm:handle=0x80000001",
            "tpm:handle=81000100",
            "pkcs11:object=x",
            "pkcs11:token=a;slot-id=1;object=x",
        ] {
            assert!(text.parse::<KeyRef>().is_err(), "{text} accepted");
        }
    }

    #[test]
    fn der_lengths_of_every_size() {
        for (len, expected) in [
            (0x7f, vec![0x7f]),
            (0x80, vec![0x81, 0x80]),
            (0x1234, vec![0x82, 0x12, 0x34]),
            (0x1_2345, vec![0x83, 0x01, 0x23, 0x45]),
        ] {
            let mut out = Vec::new();
            der_length(len, &mut out);
            assert_eq!(out, expected, "{len:#x}");
        }
    }

    #[test]
    fn ecdsa_der_encoding_matches_rustcrypto() {
        let mut raw = [0u8; 64];
        raw[0] = 0x80; // high bit: needs a leading zero
        raw[31] = 1;
        raw[33] = 0x7f; // leading zero byte to strip
        raw[63] = 2;
        let der = ecdsa_raw_to_der(&raw).unwrap();
        let sig = p256::ecdsa::Signature::from_slice(&raw).unwrap();
        assert_eq!(der, sig.to_der().as_bytes());
    }
}
