//! TPM 2.0 Certify statements (tcg-attest-tpm-certify, 2.23.133.20.1):
//!
//! ```text
//! stmt ::= SEQUENCE { tpmSAttest OCTET STRING, signature OCTET STRING,
//!                     tpmTPublic OCTET STRING OPTIONAL }
//! ```
//!
//! Checks, in this order (shared/attestation/README.md): TPMS_ATTEST magic and type; the
//! signature with the registered attester key; the Name of tpmTPublic equals the certified
//! Name (constant time); the object attributes; the key in tpmTPublic equals the CSR's; the
//! extraData equals the registered qualifying data.
//!
//! TPM structures are parsed here (TPM 2.0 Part 2; big-endian, every read bounds-checked,
//! no trailing octets), not with tss-esapi: the verifier must not depend on the TSS C
//! library nor trust its unmarshalling of hostile input.

use der::asn1::OctetString;
use der::{Decode, Encode, Sequence};
use sha2::Digest;
use spki::{EncodePublicKey, ObjectIdentifier};

use super::{constant_time_eq, AttestationError, Attester};
use crate::keys::{ecdsa_raw_to_der, SignatureScheme};
use crate::pki::{self, VerifyError};

/// TPM_GENERATED_VALUE (Part 2, 6.2).
pub const TPM_GENERATED_VALUE: u32 = 0xff54_4347;
/// TPM_ST_ATTEST_CERTIFY (Part 2, 6.9).
pub const TPM_ST_ATTEST_CERTIFY: u16 = 0x8017;
/// TPM_ST_ATTEST_QUOTE.
pub const TPM_ST_ATTEST_QUOTE: u16 = 0x8018;

/// TPMA_OBJECT bits (Part 2, 8.3).
pub const FIXED_TPM: u32 = 0x0000_0002;
pub const FIXED_PARENT: u32 = 0x0000_0010;
pub const SENSITIVE_DATA_ORIGIN: u32 = 0x0000_0020;
pub const RESTRICTED: u32 = 0x0001_0000;
pub const SIGN: u32 = 0x0004_0000;

const REQUIRED_ATTRIBUTES: [(u32, &str); 4] = [
    (FIXED_TPM, "fixedTPM"),
    (FIXED_PARENT, "fixedParent"),
    (SENSITIVE_DATA_ORIGIN, "sensitiveDataOrigin"),
    (SIGN, "sign"),
];
const FORBIDDEN_ATTRIBUTES: [(u32, &str); 1] = [(RESTRICTED, "restricted")];

// TPM_ALG_ID (Part 2, 6.3).
const ALG_RSA: u16 = 0x0001;
const ALG_SHA1: u16 = 0x0004;
const ALG_SHA256: u16 = 0x000b;
const ALG_SHA384: u16 = 0x000c;
const ALG_SHA512: u16 = 0x000d;
const ALG_NULL: u16 = 0x0010;
const ALG_RSASSA: u16 = 0x0014;
const ALG_RSAES: u16 = 0x0015;
const ALG_RSAPSS: u16 = 0x0016;
const ALG_ECDSA: u16 = 0x0018;
const ALG_ECDAA: u16 = 0x001a;
const ALG_ECC: u16 = 0x0023;
// TPM_ECC_CURVE (Part 2, 6.4).
const ECC_NIST_P256: u16 = 0x0003;
const ECC_NIST_P384: u16 = 0x0004;

const ID_EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");

/// Encode a tcg-attest-tpm-certify `stmt` (the DER TLV of the SEQUENCE).
pub fn encode_statement(
    tpm_s_attest: &[u8],
    signature: &[u8],
    tpm_t_public: Option<&[u8]>,
) -> Result<Vec<u8>, AttestationError> {
    let encode = |e: der::Error| AttestationError::Decode(format!("encoding a statement: {e}"));
    CertifyStatementWire {
        tpm_s_attest: OctetString::new(tpm_s_attest).map_err(encode)?,
        signature: OctetString::new(signature).map_err(encode)?,
        tpm_t_public: tpm_t_public
            .map(OctetString::new)
            .transpose()
            .map_err(encode)?,
    }
    .to_der()
    .map_err(encode)
}

/// The parts of a tcg-attest-tpm-certify `stmt`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertifyStatement {
    pub tpm_s_attest: Vec<u8>,
    pub signature: Vec<u8>,
    pub tpm_t_public: Option<Vec<u8>>,
}

/// Decode a tcg-attest-tpm-certify `stmt` (strict DER).
pub fn decode_statement(stmt_der: &[u8]) -> Result<CertifyStatement, AttestationError> {
    let wire = CertifyStatementWire::from_der(stmt_der)
        .map_err(|e| AttestationError::Decode(format!("TPM certify statement: {e}")))?;
    Ok(CertifyStatement {
        tpm_s_attest: wire.tpm_s_attest.as_bytes().to_vec(),
        signature: wire.signature.as_bytes().to_vec(),
        tpm_t_public: wire.tpm_t_public.map(|p| p.as_bytes().to_vec()),
    })
}

/// TPMS_ATTEST of a TPM2_Certify.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertifyInfo {
    pub qualified_signer: Vec<u8>,
    pub extra_data: Vec<u8>,
    pub clock: u64,
    pub reset_count: u32,
    pub restart_count: u32,
    pub safe: bool,
    pub firmware_version: u64,
    /// attested.certify.name: the Name of the certified object.
    pub name: Vec<u8>,
    pub qualified_name: Vec<u8>,
}

/// Parse a TPMS_ATTEST that must be a TPM2_Certify result (magic, then type 0x8017).
pub fn parse_certify_info(attest: &[u8]) -> Result<CertifyInfo, AttestationError> {
    let mut r = Reader::new(attest, "TPMS_ATTEST");
    check_header(&mut r)?;
    let qualified_signer = r.tpm2b()?.to_vec();
    let extra_data = r.tpm2b()?.to_vec();
    // TPMS_CLOCK_INFO
    let clock = r.u64()?;
    let reset_count = r.u32()?;
    let restart_count = r.u32()?;
    let safe = match r.u8()? {
        0 => false,
        1 => true,
        other => {
            return Err(AttestationError::Decode(format!(
                "TPMS_ATTEST: clockInfo.safe is {other}, not a TPMI_YES_NO"
            )))
        }
    };
    let firmware_version = r.u64()?;
    // TPMS_CERTIFY_INFO
    let name = r.tpm2b()?.to_vec();
    let qualified_name = r.tpm2b()?.to_vec();
    r.finish()?;
    Ok(CertifyInfo {
        qualified_signer,
        extra_data,
        clock,
        reset_count,
        restart_count,
        safe,
        firmware_version,
        name,
        qualified_name,
    })
}

/// The key in a TPMT_PUBLIC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TpmKey {
    Rsa { modulus: Vec<u8>, exponent: u32 },
    Ecc { curve: u16, x: Vec<u8>, y: Vec<u8> },
}

/// The parts of a TPMT_PUBLIC the verifier uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TpmPublic {
    pub name_alg: u16,
    pub object_attributes: u32,
    pub key: TpmKey,
}

/// Strip the TPM2B_PUBLIC size prefix when there is one: a bare TPMT_PUBLIC starts with its
/// type (0x0001, 0x0008, 0x0023, 0x0025), never with its own remaining length.
pub fn strip_tpm2b(public: &[u8]) -> &[u8] {
    match public {
        [hi, lo, rest @ ..] if usize::from(u16::from_be_bytes([*hi, *lo])) == rest.len() => rest,
        _ => public,
    }
}

/// Parse a TPMT_PUBLIC (RSA or ECC; no trailing octets).
pub fn parse_public(public: &[u8]) -> Result<TpmPublic, AttestationError> {
    let mut r = Reader::new(public, "tpmTPublic");
    let kind = r.u16()?;
    let name_alg = r.u16()?;
    let object_attributes = r.u32()?;
    let _auth_policy = r.tpm2b()?;
    let key = match kind {
        ALG_RSA => {
            symmetric(&mut r)?;
            let scheme = r.u16()?;
            if scheme != ALG_NULL && scheme != ALG_RSAES {
                let _hash = r.u16()?;
            }
            let _key_bits = r.u16()?;
            let exponent = r.u32()?;
            let modulus = r.tpm2b()?.to_vec();
            TpmKey::Rsa { modulus, exponent }
        }
        ALG_ECC => {
            symmetric(&mut r)?;
            let scheme = r.u16()?;
            if scheme != ALG_NULL {
                let _hash = r.u16()?;
                if scheme == ALG_ECDAA {
                    let _count = r.u16()?;
                }
            }
            let curve = r.u16()?;
            let kdf = r.u16()?;
            if kdf != ALG_NULL {
                let _hash = r.u16()?;
            }
            let x = r.tpm2b()?.to_vec();
            let y = r.tpm2b()?.to_vec();
            TpmKey::Ecc { curve, x, y }
        }
        other => {
            return Err(AttestationError::UnsupportedKey(format!(
                "tpmTPublic type 0x{other:04x} is neither RSA nor ECC"
            )))
        }
    };
    r.finish()?;
    Ok(TpmPublic {
        name_alg,
        object_attributes,
        key,
    })
}

/// The TPM Name of a TPMT_PUBLIC: u16(nameAlg) || H_nameAlg(TPMT_PUBLIC) (Part 1, 16).
pub fn name_of(public: &[u8]) -> Result<Vec<u8>, AttestationError> {
    let public = strip_tpm2b(public);
    let mut r = Reader::new(public, "tpmTPublic");
    let _kind = r.u16()?;
    let name_alg = r.u16()?;
    let digest = match name_alg {
        ALG_SHA256 => sha2::Sha256::digest(public).to_vec(),
        ALG_SHA384 => sha2::Sha384::digest(public).to_vec(),
        ALG_SHA512 => sha2::Sha512::digest(public).to_vec(),
        found => return Err(AttestationError::UnsupportedNameAlg { found }),
    };
    let mut name = name_alg.to_be_bytes().to_vec();
    name.extend_from_slice(&digest);
    Ok(name)
}

/// Verify a tcg-attest-tpm-certify `stmt` (see the module documentation for the order);
/// returns TPMS_ATTEST.extraData, for the CMF's freshness check.
pub(super) fn verify(
    stmt_der: &[u8],
    csr_spki_der: &[u8],
    attester: &Attester,
) -> Result<Vec<u8>, AttestationError> {
    let statement = decode_statement(stmt_der)?;
    check_header(&mut Reader::new(&statement.tpm_s_attest, "TPMS_ATTEST"))?;
    verify_attest_signature(
        &attester.public_key_spki_der,
        &statement.tpm_s_attest,
        &statement.signature,
    )?;
    let info = parse_certify_info(&statement.tpm_s_attest)?;
    let public = statement
        .tpm_t_public
        .as_deref()
        .ok_or(AttestationError::MissingPublicKey)?;
    let public = strip_tpm2b(public);
    if !constant_time_eq(&name_of(public)?, &info.name) {
        return Err(AttestationError::NameMismatch);
    }
    let parsed = parse_public(public)?;
    check_attributes(parsed.object_attributes)?;
    let attested = spki_of(&parsed.key)?;
    if attested != canonical_spki(csr_spki_der)? {
        return Err(AttestationError::KeyMismatch);
    }
    if let Some(expected) = &attester.expected_qualifying_data {
        if !constant_time_eq(expected, &info.extra_data) {
            return Err(AttestationError::QualifyingData);
        }
    }
    Ok(info.extra_data)
}

/// fixedTPM, fixedParent, sensitiveDataOrigin and sign set; restricted clear (a restricted
/// key signs only TPM-generated structures, never a CSR or a certificate).
pub fn check_attributes(attributes: u32) -> Result<(), AttestationError> {
    let missing: Vec<&'static str> = REQUIRED_ATTRIBUTES
        .iter()
        .filter(|(bit, _)| attributes & bit == 0)
        .map(|(_, name)| *name)
        .collect();
    let forbidden: Vec<&'static str> = FORBIDDEN_ATTRIBUTES
        .iter()
        .filter(|(bit, _)| attributes & bit != 0)
        .map(|(_, name)| *name)
        .collect();
    if missing.is_empty() && forbidden.is_empty() {
        Ok(())
    } else {
        Err(AttestationError::Attributes { missing, forbidden })
    }
}

/// Verify the attester's signature over tpmSAttest, encoded either as a TPMT_SIGNATURE or
/// raw (RSA PKCS#1 v1.5 octets; ECDSA as DER or r || s), raw meaning SHA-256.
pub fn verify_attest_signature(
    attester_spki_der: &[u8],
    attest: &[u8],
    signature: &[u8],
) -> Result<(), AttestationError> {
    let attester_is_rsa = match spki::SubjectPublicKeyInfoRef::from_der(attester_spki_der)
        .map_err(|e| AttestationError::AttesterKey(e.to_string()))?
        .algorithm
        .oid
    {
        RSA_ENCRYPTION => true,
        ID_EC_PUBLIC_KEY => false,
        other => {
            return Err(AttestationError::AttesterKey(format!(
                "key algorithm {other} is neither RSA nor EC"
            )))
        }
    };
    let candidates: Vec<(SignatureScheme, Vec<u8>)> = match parse_tpmt_signature(signature)? {
        Some(TpmtSignature { scheme, bytes }) => {
            if scheme.is_ecdsa() == attester_is_rsa {
                // An RSA signature cannot come from an EC key, and vice versa.
                return Err(AttestationError::BadSignature);
            }
            vec![(scheme, bytes)]
        }
        None if attester_is_rsa => vec![(SignatureScheme::RsaPkcs1Sha256, signature.to_vec())],
        None => {
            let mut candidates = Vec::new();
            if signature.first() == Some(&0x30) {
                candidates.push((SignatureScheme::EcdsaSha256, signature.to_vec()));
            }
            if let Ok(der) = ecdsa_raw_to_der(signature) {
                candidates.push((SignatureScheme::EcdsaSha256, der));
            }
            candidates
        }
    };
    let mut outcome = Err(AttestationError::BadSignature);
    for (scheme, bytes) in candidates {
        let algorithm = crate::keys::signer::signature_algorithm_identifier(scheme)
            .map_err(|e| AttestationError::UnsupportedSignature(e.to_string()))?;
        outcome = match pki::verify_signature(attester_spki_der, &algorithm, attest, &bytes) {
            Ok(()) => return Ok(()),
            Err(VerifyError::BadSignature | VerifyError::Encoding(_)) => {
                Err(AttestationError::BadSignature)
            }
            Err(VerifyError::PublicKey(e)) => Err(AttestationError::AttesterKey(e)),
            Err(VerifyError::UnsupportedAlgorithm(e)) => {
                Err(AttestationError::UnsupportedSignature(e))
            }
        };
    }
    outcome
}

/// A TPMT_SIGNATURE as a scheme and an X.509-encoded signature (DER ECDSA, raw RSA).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TpmtSignature {
    pub scheme: SignatureScheme,
    pub bytes: Vec<u8>,
}

/// Parse `signature` as a TPMT_SIGNATURE (RSASSA, RSAPSS, ECDSA). `Ok(None)` when it is not
/// one (then it is a raw signature); an error for a TPMT_SIGNATURE with a hash this verifier
/// does not accept (SHA-1, SHA-512).
pub fn parse_tpmt_signature(signature: &[u8]) -> Result<Option<TpmtSignature>, AttestationError> {
    let mut r = Reader::new(signature, "TPMT_SIGNATURE");
    let (Ok(alg), Ok(hash)) = (r.u16(), r.u16()) else {
        return Ok(None);
    };
    if ![ALG_RSASSA, ALG_RSAPSS, ALG_ECDSA].contains(&alg)
        || ![ALG_SHA1, ALG_SHA256, ALG_SHA384, ALG_SHA512].contains(&hash)
    {
        return Ok(None);
    }
    let bytes = if alg == ALG_ECDSA {
        let (Ok(r_value), Ok(s_value)) = (r.tpm2b(), r.tpm2b()) else {
            return Ok(None);
        };
        // Equal halves for r || s; DER drops the padding again.
        let size = r_value.len().max(s_value.len());
        let mut raw = vec![0; size - r_value.len()];
        raw.extend_from_slice(r_value);
        raw.extend(std::iter::repeat_n(0, size - s_value.len()));
        raw.extend_from_slice(s_value);
        match ecdsa_raw_to_der(&raw) {
            Ok(der) => der,
            Err(_) => return Ok(None),
        }
    } else {
        let Ok(bytes) = r.tpm2b() else {
            return Ok(None);
        };
        bytes.to_vec()
    };
    if r.finish().is_err() {
        return Ok(None);
    }
    let scheme = match (alg, hash) {
        (ALG_RSASSA, ALG_SHA256) => SignatureScheme::RsaPkcs1Sha256,
        (ALG_RSASSA, ALG_SHA384) => SignatureScheme::RsaPkcs1Sha384,
        (ALG_RSAPSS, ALG_SHA256) => SignatureScheme::RsaPssSha256,
        (ALG_RSAPSS, ALG_SHA384) => SignatureScheme::RsaPssSha384,
        (ALG_ECDSA, ALG_SHA256) => SignatureScheme::EcdsaSha256,
        (ALG_ECDSA, ALG_SHA384) => SignatureScheme::EcdsaSha384,
        _ => {
            return Err(AttestationError::UnsupportedSignature(format!(
                "TPMT_SIGNATURE scheme 0x{alg:04x} with hash 0x{hash:04x} (SHA-256 or SHA-384 \
                 required)"
            )))
        }
    };
    Ok(Some(TpmtSignature { scheme, bytes }))
}

/// SubjectPublicKeyInfo DER of a TPM key, in RustCrypto's canonical encoding.
pub fn spki_of(key: &TpmKey) -> Result<Vec<u8>, AttestationError> {
    let unsupported = |why: String| AttestationError::UnsupportedKey(why);
    let der = match key {
        TpmKey::Rsa { modulus, exponent } => {
            // Part 2, 12.2.3.5: an exponent of zero means 2^16 + 1.
            let exponent = if *exponent == 0 { 65_537 } else { *exponent };
            let start = modulus
                .iter()
                .position(|&b| b != 0)
                .unwrap_or(modulus.len());
            let modulus = &modulus[start..];
            let bits = u32::try_from(modulus.len() * 8)
                .map_err(|_| unsupported("RSA modulus too large".to_string()))?;
            let n = rsa::BoxedUint::from_be_slice(modulus, bits)
                .map_err(|e| unsupported(format!("RSA modulus: {e:?}")))?;
            let e = rsa::BoxedUint::from_be_slice(&exponent.to_be_bytes(), 32)
                .map_err(|e| unsupported(format!("RSA exponent: {e:?}")))?;
            rsa::PublicKey::new(n, e)
                .map_err(|e| unsupported(format!("RSA key in tpmTPublic: {e}")))?
                .to_public_key_der()
        }
        TpmKey::Ecc { curve, x, y } => {
            let size = match *curve {
                ECC_NIST_P256 => 32,
                ECC_NIST_P384 => 48,
                other => return Err(unsupported(format!("ECC curve 0x{other:04x}"))),
            };
            let mut point = vec![0x04];
            point.extend_from_slice(&pad_left(x, size)?);
            point.extend_from_slice(&pad_left(y, size)?);
            let bad = |e| unsupported(format!("ECC point in tpmTPublic: {e}"));
            if *curve == ECC_NIST_P256 {
                p256::PublicKey::from_sec1_bytes(&point)
                    .map_err(bad)?
                    .to_public_key_der()
            } else {
                p384::PublicKey::from_sec1_bytes(&point)
                    .map_err(bad)?
                    .to_public_key_der()
            }
        }
    };
    der.map(|d| d.as_bytes().to_vec())
        .map_err(|e| unsupported(format!("encoding the attested key: {e}")))
}

/// The CSR's SubjectPublicKeyInfo decoded (RSA, EC P-256, EC P-384) and encoded again, so
/// equal keys compare equal whatever optional encoding choices the CSR made.
pub fn canonical_spki(spki_der: &[u8]) -> Result<Vec<u8>, AttestationError> {
    use rsa::pkcs8::DecodePublicKey;
    let decode = |e: String| AttestationError::Decode(format!("CSR public key: {e}"));
    let info =
        spki::SubjectPublicKeyInfoRef::from_der(spki_der).map_err(|e| decode(e.to_string()))?;
    let der = match info.algorithm.oid {
        RSA_ENCRYPTION => rsa::PublicKey::from_public_key_der(spki_der)
            .map_err(|e| decode(e.to_string()))?
            .to_public_key_der(),
        ID_EC_PUBLIC_KEY => {
            if let Ok(key) = p256::PublicKey::from_public_key_der(spki_der) {
                key.to_public_key_der()
            } else {
                p384::PublicKey::from_public_key_der(spki_der)
                    .map_err(|e| decode(format!("not a P-256 or P-384 key: {e}")))?
                    .to_public_key_der()
            }
        }
        other => return Err(decode(format!("algorithm {other} is neither RSA nor EC"))),
    };
    der.map(|d| d.as_bytes().to_vec())
        .map_err(|e| decode(e.to_string()))
}

fn check_header(r: &mut Reader<'_>) -> Result<(), AttestationError> {
    let magic = r.u32()?;
    if magic != TPM_GENERATED_VALUE {
        return Err(AttestationError::BadMagic { found: magic });
    }
    let kind = r.u16()?;
    if kind != TPM_ST_ATTEST_CERTIFY {
        return Err(AttestationError::NotCertify { found: kind });
    }
    Ok(())
}

fn symmetric(r: &mut Reader<'_>) -> Result<(), AttestationError> {
    // TPMT_SYM_DEF_OBJECT: algorithm, then keyBits and mode unless NULL.
    if r.u16()? != ALG_NULL {
        let _key_bits = r.u16()?;
        let _mode = r.u16()?;
    }
    Ok(())
}

fn pad_left(bytes: &[u8], size: usize) -> Result<Vec<u8>, AttestationError> {
    let start = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
    let bytes = &bytes[start..];
    if bytes.len() > size {
        return Err(AttestationError::UnsupportedKey(format!(
            "{}-octet ECC coordinate exceeds the {size}-octet field",
            bytes.len()
        )));
    }
    let mut out = vec![0; size - bytes.len()];
    out.extend_from_slice(bytes);
    Ok(out)
}

#[derive(Sequence)]
struct CertifyStatementWire {
    tpm_s_attest: OctetString,
    signature: OctetString,
    #[asn1(optional = "true")]
    tpm_t_public: Option<OctetString>,
}

/// Bounds-checked big-endian reader over a TPM structure.
struct Reader<'a> {
    bytes: &'a [u8],
    position: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8], what: &'static str) -> Self {
        Reader {
            bytes,
            position: 0,
            what,
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], AttestationError> {
        let end = self
            .position
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| {
                AttestationError::Decode(format!(
                    "{}: truncated at offset {} (needs {n} more octets)",
                    self.what, self.position
                ))
            })?;
        let out = &self.bytes[self.position..end];
        self.position = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], AttestationError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, AttestationError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, AttestationError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, AttestationError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, AttestationError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A TPM2B: u16 size, then that many octets.
    fn tpm2b(&mut self) -> Result<&'a [u8], AttestationError> {
        let size = self.u16()?;
        self.take(usize::from(size))
    }

    fn finish(&self) -> Result<(), AttestationError> {
        if self.position == self.bytes.len() {
            Ok(())
        } else {
            Err(AttestationError::Decode(format!(
                "{}: {} trailing octets",
                self.what,
                self.bytes.len() - self.position
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_input_does_not_panic() {
        let mut seed = 0x1234_5678u32;
        for len in 0..300 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                    (seed >> 16) as u8
                })
                .collect();
            let _ = parse_certify_info(&bytes);
            let _ = parse_public(&bytes);
            let _ = parse_tpmt_signature(&bytes);
            let _ = name_of(&bytes);
            let mut header = vec![0xff, 0x54, 0x43, 0x47, 0x80, 0x17];
            header.extend_from_slice(&bytes);
            let _ = parse_certify_info(&header);
        }
        // Sizes pointing past the end.
        assert!(matches!(
            parse_certify_info(&[0xff, 0x54, 0x43, 0x47, 0x80, 0x17, 0xff, 0xff]),
            Err(AttestationError::Decode(_))
        ));
    }

    #[test]
    fn header_checks() {
        assert_eq!(
            parse_certify_info(&[0xff, 0x54, 0x43, 0x48, 0x80, 0x17]),
            Err(AttestationError::BadMagic { found: 0xff54_4348 })
        );
        assert_eq!(
            parse_certify_info(&[0xff, 0x54, 0x43, 0x47, 0x80, 0x18]),
            Err(AttestationError::NotCertify { found: 0x8018 })
        );
    }

    #[test]
    fn attribute_rules() {
        assert!(check_attributes(0x0004_0072).is_ok());
        assert_eq!(
            check_attributes(0x0005_0070),
            Err(AttestationError::Attributes {
                missing: vec!["fixedTPM"],
                forbidden: vec!["restricted"],
            })
        );
    }

    #[test]
    fn tpm2b_prefix_is_stripped_only_when_it_is_one() {
        let bare = [0x00, 0x23, 0x00, 0x0b, 0x00];
        assert_eq!(strip_tpm2b(&bare), &bare);
        let prefixed = [0x00, 0x05, 0x00, 0x23, 0x00, 0x0b, 0x00];
        assert_eq!(strip_tpm2b(&prefixed), &bare);
    }
}
