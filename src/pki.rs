//! X.509 helpers shared by the CA and the CMF: signature verification with RustCrypto
//! (x509-cert does not verify), PEM handling, serial numbers.

use der::{Decode, Encode};
use sha2::Digest;
use spki::{AlgorithmIdentifierOwned, ObjectIdentifier};
use x509_cert::Certificate;

const ECDSA_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
const ECDSA_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.3");
const RSA_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.11");
const RSA_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.12");
const RSA_PSS: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.10");
const SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.1");
const SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.2");

/// Why a signature did not verify.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("unsupported signature algorithm {0}")]
    UnsupportedAlgorithm(String),
    #[error("public key: {0}")]
    PublicKey(String),
    #[error("signature encoding: {0}")]
    Encoding(String),
    #[error("signature does not verify")]
    BadSignature,
}

/// Verify `signature` over `message` with the key in `spki_der`, under `algorithm`
/// (ECDSA P-256/P-384 with SHA-256/384, RSA PKCS#1 v1.5 and PSS with SHA-256/384).
pub fn verify_signature(
    spki_der: &[u8],
    algorithm: &AlgorithmIdentifierOwned,
    message: &[u8],
    signature: &[u8],
) -> Result<(), VerifyError> {
    use signature::Verifier;

    let bad = |_| VerifyError::BadSignature;
    match algorithm.oid {
        ECDSA_SHA256 | ECDSA_SHA384 => {
            // ring first: its P-256/P-384 verification is several times faster than the
            // portable RustCrypto arithmetic, and a CSR's proof of possession is on every
            // request. A signature must pass both checks that run: what ring accepts is
            // accepted; what it refuses goes through RustCrypto only for a precise reason,
            // and stays refused even if RustCrypto were to accept it.
            if let Some(verified) = verify_ecdsa_ring(spki_der, algorithm.oid, message, signature) {
                if verified {
                    return Ok(());
                }
                return verify_ecdsa_rustcrypto(spki_der, algorithm.oid, message, signature)
                    .and(Err(VerifyError::BadSignature));
            }
            verify_ecdsa_rustcrypto(spki_der, algorithm.oid, message, signature)
        }
        RSA_SHA256 | RSA_SHA384 => {
            let key = rsa_key(spki_der)?;
            let sig = rsa::pkcs1v15::Signature::try_from(signature)
                .map_err(|e| VerifyError::Encoding(e.to_string()))?;
            if algorithm.oid == RSA_SHA256 {
                rsa::pkcs1v15::VerifyingKey::<sha2::Sha256>::new(key).verify(message, &sig)
            } else {
                rsa::pkcs1v15::VerifyingKey::<sha2::Sha384>::new(key).verify(message, &sig)
            }
            .map_err(bad)
        }
        RSA_PSS => {
            let key = rsa_key(spki_der)?;
            let params = algorithm
                .parameters
                .as_ref()
                .ok_or_else(|| VerifyError::Encoding("RSASSA-PSS without parameters".into()))?;
            let params_der = params
                .to_der()
                .map_err(|e| VerifyError::Encoding(e.to_string()))?;
            let params = rsa::pkcs1::RsaPssParams::<der::Any>::try_from(params_der.as_slice())
                .map_err(|e| VerifyError::Encoding(format!("RSASSA-PSS parameters: {e}")))?;
            let salt = usize::from(params.salt_len);
            let sig = rsa::pss::Signature::try_from(signature)
                .map_err(|e| VerifyError::Encoding(e.to_string()))?;
            match params.hash.oid {
                SHA256 => rsa::pss::VerifyingKey::<sha2::Sha256>::new_with_salt_len(key, salt)
                    .verify(message, &sig),
                SHA384 => rsa::pss::VerifyingKey::<sha2::Sha384>::new_with_salt_len(key, salt)
                    .verify(message, &sig),
                other => {
                    return Err(VerifyError::UnsupportedAlgorithm(format!(
                        "RSASSA-PSS with hash {other}"
                    )))
                }
            }
            .map_err(bad)
        }
        other => Err(VerifyError::UnsupportedAlgorithm(other.to_string())),
    }
}

/// ECDSA with ring, for an uncompressed P-256 or P-384 point: `Some(true)` verified,
/// `Some(false)` refused, `None` when ring cannot take this key (then RustCrypto decides).
fn verify_ecdsa_ring(
    spki_der: &[u8],
    algorithm: ObjectIdentifier,
    message: &[u8],
    signature: &[u8],
) -> Option<bool> {
    use ring::signature as rs;
    const ID_EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
    const SECP256R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
    const SECP384R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");
    let spki = spki::SubjectPublicKeyInfoRef::from_der(spki_der).ok()?;
    if spki.algorithm.oid != ID_EC_PUBLIC_KEY {
        return None;
    }
    let curve: ObjectIdentifier = spki.algorithm.parameters?.decode_as().ok()?;
    let point = spki.subject_public_key.as_bytes()?;
    let sha256 = algorithm == ECDSA_SHA256;
    let (alg, len): (&'static rs::EcdsaVerificationAlgorithm, usize) = match (curve, sha256) {
        (SECP256R1, true) => (&rs::ECDSA_P256_SHA256_ASN1, 65),
        (SECP256R1, false) => (&rs::ECDSA_P256_SHA384_ASN1, 65),
        (SECP384R1, true) => (&rs::ECDSA_P384_SHA256_ASN1, 97),
        (SECP384R1, false) => (&rs::ECDSA_P384_SHA384_ASN1, 97),
        _ => return None,
    };
    if point.len() != len || point[0] != 0x04 {
        return None;
    }
    Some(
        rs::UnparsedPublicKey::new(alg, point)
            .verify(message, signature)
            .is_ok(),
    )
}

/// ECDSA with RustCrypto (any point encoding), with the precise reason for a refusal.
fn verify_ecdsa_rustcrypto(
    spki_der: &[u8],
    algorithm: ObjectIdentifier,
    message: &[u8],
    signature: &[u8],
) -> Result<(), VerifyError> {
    use rsa::pkcs8::DecodePublicKey;
    use signature::hazmat::PrehashVerifier;

    let bad = |_| VerifyError::BadSignature;
    let digest = if algorithm == ECDSA_SHA256 {
        sha2::Sha256::digest(message).to_vec()
    } else {
        sha2::Sha384::digest(message).to_vec()
    };
    if let Ok(key) = p256::ecdsa::VerifyingKey::from_public_key_der(spki_der) {
        let sig = p256::ecdsa::Signature::from_der(signature)
            .map_err(|e| VerifyError::Encoding(e.to_string()))?;
        key.verify_prehash(&digest, &sig).map_err(bad)
    } else if let Ok(key) = p384::ecdsa::VerifyingKey::from_public_key_der(spki_der) {
        let sig = p384::ecdsa::Signature::from_der(signature)
            .map_err(|e| VerifyError::Encoding(e.to_string()))?;
        key.verify_prehash(&digest, &sig).map_err(bad)
    } else {
        Err(VerifyError::PublicKey(
            "not an EC P-256 or P-384 public key".into(),
        ))
    }
}

fn rsa_key(spki_der: &[u8]) -> Result<rsa::PublicKey, VerifyError> {
    use rsa::pkcs8::DecodePublicKey;
    let key = rsa::PublicKey::from_public_key_der(spki_der)
        .map_err(|e| VerifyError::PublicKey(e.to_string()))?;
    Ok(key)
}

/// Verify that `issuer` signed `cert`.
pub fn verify_certificate_signature(
    cert: &Certificate,
    issuer: &Certificate,
) -> Result<(), VerifyError> {
    let tbs = cert
        .tbs_certificate()
        .to_der()
        .map_err(|e| VerifyError::Encoding(e.to_string()))?;
    let spki = issuer
        .tbs_certificate()
        .subject_public_key_info()
        .to_der()
        .map_err(|e| VerifyError::Encoding(e.to_string()))?;
    let signature = cert
        .signature()
        .as_bytes()
        .ok_or_else(|| VerifyError::Encoding("signature has unused bits".into()))?;
    verify_signature(&spki, cert.signature_algorithm(), &tbs, signature)
}

/// Parse every CERTIFICATE block of a PEM text, in order.
pub fn certificates_from_pem(pem: &str) -> Result<Vec<Certificate>, String> {
    let mut certs = Vec::new();
    let mut rest = pem;
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    while let Some(start) = rest.find(BEGIN) {
        let after = &rest[start..];
        let end = after
            .find(END)
            .ok_or_else(|| "unterminated CERTIFICATE block".to_string())?;
        let block = &after[..end + END.len()];
        let (label, der) =
            der::pem::decode_vec(block.as_bytes()).map_err(|e| format!("PEM: {e}"))?;
        if label != "CERTIFICATE" {
            return Err(format!("unexpected PEM label {label}"));
        }
        certs.push(Certificate::from_der(&der).map_err(|e| format!("certificate DER: {e}"))?);
        rest = &after[end + END.len()..];
    }
    if certs.is_empty() {
        return Err("no CERTIFICATE in PEM".into());
    }
    Ok(certs)
}

/// PEM of one DER object.
pub fn to_pem(label: &'static str, der: &[u8]) -> Result<String, String> {
    der::pem::encode_string(label, der::pem::LineEnding::LF, der).map_err(|e| e.to_string())
}

/// PEM of a certificate.
pub fn certificate_pem(cert: &Certificate) -> Result<String, String> {
    let der = cert.to_der().map_err(|e| e.to_string())?;
    to_pem("CERTIFICATE", &der)
}

/// A positive serial number of 128 random bits (RFC 5280 4.1.2.2: at most 20 octets;
/// CA/B BR 7.1: at least 64 bits of CSPRNG output).
pub fn random_serial() -> Result<x509_cert::serial_number::SerialNumber, String> {
    // All 128 bits random: read as an unsigned integer, so the DER INTEGER gets a leading
    // 0x00 octet when the top bit is set (17 octets, still within 20) and stays positive.
    let mut bytes = [0u8; 16];
    loop {
        getrandom::fill(&mut bytes).map_err(|e| format!("random serial: {e}"))?;
        // Zero is not a positive integer (probability 2^-128, but the rule is absolute).
        if bytes.iter().any(|&b| b != 0) {
            break;
        }
    }
    x509_cert::serial_number::SerialNumber::new(&bytes).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use der::Encode;

    /// RFC 5280 4.1.2.2 and the README: 128 random bits, a positive DER INTEGER of at most 20
    /// octets. Over 64 serials every one of the 128 bits is seen both set and clear (a fixed
    /// bit would show; the chance that a random one does not is 128 * 2^-63).
    #[test]
    fn serials_carry_128_random_bits_and_stay_positive_within_20_octets() {
        let mut ones = [0u8; 16];
        let mut zeros = [0u8; 16];
        for _ in 0..64 {
            let serial = super::random_serial().unwrap();
            let der = serial.to_der().unwrap();
            assert_eq!(der[0], 0x02, "INTEGER");
            let content = &der[2..];
            assert_eq!(usize::from(der[1]), content.len());
            assert!(content.len() <= 20, "{} octets", content.len());
            assert_eq!(content[0] & 0x80, 0, "positive");
            assert!(content.iter().any(|&b| b != 0), "non-zero");
            // The 128-bit value, right-aligned.
            let value = content.strip_prefix(&[0]).unwrap_or(content);
            assert!(value.len() <= 16);
            let mut bits = [0u8; 16];
            bits[16 - value.len()..].copy_from_slice(value);
            for i in 0..16 {
                ones[i] |= bits[i];
                zeros[i] |= !bits[i];
            }
        }
        assert_eq!(ones, [0xff; 16], "bits never set");
        assert_eq!(zeros, [0xff; 16], "bits never clear");
    }
}
