//! PKCS#10 (RFC 2986) at the edge: size limit, strict DER with no trailing bytes, proof of
//! possession (the CSR's self-signature, verified over the exact bytes that were signed),
//! the names it asks for, and its key type. The core never sees raw CSR bytes again.

use base64::Engine;
use der::asn1::{AnyRef, BitStringRef};
use der::{Decode, Encode, Sequence};
use spki::AlgorithmIdentifierOwned;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::request::CertReq;

use super::CmfError;

/// Largest CSR accepted, DER (a TPM attestation with its certificates is a few KiB).
pub const MAX_CSR_DER: usize = 32 * 1024;

const ID_EXTENSION_REQ: der::asn1::ObjectIdentifier =
    der::asn1::ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.14");
const ID_CE_SUBJECT_ALT_NAME: der::asn1::ObjectIdentifier =
    der::asn1::ObjectIdentifier::new_unwrap("2.5.29.17");
const ID_AT_COMMON_NAME: der::asn1::ObjectIdentifier =
    der::asn1::ObjectIdentifier::new_unwrap("2.5.4.3");

/// Key types the CMF can certify.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CsrKeyType {
    EcP256,
    EcP384,
    Rsa(usize),
}

impl CsrKeyType {
    pub fn name(self) -> String {
        match self {
            CsrKeyType::EcP256 => "ec-p256".into(),
            CsrKeyType::EcP384 => "ec-p384".into(),
            CsrKeyType::Rsa(bits) => format!("rsa-{bits}"),
        }
    }

    pub fn is_rsa(self) -> bool {
        matches!(self, CsrKeyType::Rsa(_))
    }
}

/// A CSR that passed decoding and proof of possession.
#[derive(Clone, Debug)]
pub struct VerifiedCsr {
    pub request: CertReq,
    pub spki_der: Vec<u8>,
    pub key_type: CsrKeyType,
    /// Subject commonName values.
    pub common_names: Vec<String>,
    /// dNSName and URI subject alternative names requested.
    pub alt_names: Vec<String>,
    /// URIs the CMF itself vouches for from the VNF lifecycle (direct mode: the VNF
    /// instance's VNFC and VDU); never taken from the CSR, added to the SANs as they are.
    pub lifecycle_uris: Vec<String>,
}

impl VerifiedCsr {
    /// Every name the CSR asks to be certified, lower-cased, without duplicates.
    pub fn requested_names(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for name in self.common_names.iter().chain(&self.alt_names) {
            let name = name.to_ascii_lowercase();
            if !names.contains(&name) {
                names.push(name);
            }
        }
        names
    }
}

/// The CSR as sent: PEM (`CERTIFICATE REQUEST`) or base64 DER.
pub fn csr_der_from_text(text: &str) -> Result<Vec<u8>, CmfError> {
    let text = text.trim();
    if text.len() > MAX_CSR_DER * 2 {
        return Err(CmfError::PayloadTooLarge(MAX_CSR_DER));
    }
    let der = if text.starts_with("-----BEGIN") {
        let (label, der) = der::pem::decode_vec(text.as_bytes())
            .map_err(|e| CmfError::BadRequest(format!("csr: PEM: {e}")))?;
        if label != "CERTIFICATE REQUEST" && label != "NEW CERTIFICATE REQUEST" {
            return Err(CmfError::BadRequest(format!(
                "csr: PEM label '{label}', expected CERTIFICATE REQUEST"
            )));
        }
        der
    } else {
        let compact: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        base64::engine::general_purpose::STANDARD
            .decode(compact)
            .map_err(|e| CmfError::BadRequest(format!("csr: neither PEM nor base64 DER: {e}")))?
    };
    if der.len() > MAX_CSR_DER {
        return Err(CmfError::PayloadTooLarge(MAX_CSR_DER));
    }
    Ok(der)
}

/// The outer structure with the signed part kept as it was received.
#[derive(Sequence)]
struct RawCertReq<'a> {
    info: AnyRef<'a>,
    algorithm: AlgorithmIdentifierOwned,
    signature: BitStringRef<'a>,
}

/// Decode strictly and check proof of possession.
pub fn verify(der: &[u8]) -> Result<VerifiedCsr, CmfError> {
    if der.len() > MAX_CSR_DER {
        return Err(CmfError::PayloadTooLarge(MAX_CSR_DER));
    }
    // Strict DER; `from_der` refuses trailing bytes.
    let raw = RawCertReq::from_der(der)
        .map_err(|e| CmfError::BadRequest(format!("csr: not a DER PKCS#10 request: {e}")))?;
    let request = CertReq::from_der(der)
        .map_err(|e| CmfError::BadRequest(format!("csr: not a DER PKCS#10 request: {e}")))?;
    if request.info.version != x509_cert::request::Version::V1 {
        return Err(CmfError::BadRequest("csr: version must be 0 (v1)".into()));
    }
    let spki_der = request
        .info
        .public_key
        .to_der()
        .map_err(|e| CmfError::BadRequest(format!("csr: public key: {e}")))?;
    let key_type = key_type_of(&spki_der).map_err(CmfError::Unprocessable)?;
    // Proof of possession (RFC 2986 4.2): over the CertificationRequestInfo as received.
    let signed = raw
        .info
        .to_der()
        .map_err(|e| CmfError::BadRequest(format!("csr: {e}")))?;
    let signature = raw
        .signature
        .as_bytes()
        .ok_or_else(|| CmfError::BadRequest("csr: signature BIT STRING has unused bits".into()))?;
    crate::pki::verify_signature(&spki_der, &raw.algorithm, &signed, signature).map_err(|e| {
        CmfError::Unprocessable(format!(
            "csr: proof of possession failed: the CSR signature does not verify with its own \
             public key ({e})"
        ))
    })?;

    let mut common_names = Vec::new();
    for atv in request.info.subject.iter() {
        if atv.oid == ID_AT_COMMON_NAME {
            common_names.push(directory_string(&atv.value).ok_or_else(|| {
                CmfError::BadRequest("csr: subject commonName is not a string".into())
            })?);
        }
    }
    let mut alt_names = Vec::new();
    for attribute in request.info.attributes.iter() {
        if attribute.oid != ID_EXTENSION_REQ {
            continue;
        }
        for value in attribute.values.iter() {
            let extensions: x509_cert::ext::Extensions = value
                .decode_as()
                .map_err(|e| CmfError::BadRequest(format!("csr: extensionRequest: {e}")))?;
            for extension in extensions {
                if extension.extn_id != ID_CE_SUBJECT_ALT_NAME {
                    continue;
                }
                let san = SubjectAltName::from_der(extension.extn_value.as_bytes())
                    .map_err(|e| CmfError::BadRequest(format!("csr: subjectAltName: {e}")))?;
                for name in san.0 {
                    match name {
                        GeneralName::DnsName(dns) => alt_names.push(dns.to_string()),
                        GeneralName::UniformResourceIdentifier(uri) => {
                            alt_names.push(uri.to_string())
                        }
                        other => {
                            return Err(CmfError::Unprocessable(format!(
                                "csr: subjectAltName {} is not allowed: only dNSName and URI \
                                 names are certified",
                                general_name_kind(&other)
                            )))
                        }
                    }
                }
            }
        }
    }
    if common_names.is_empty() && alt_names.is_empty() {
        return Err(CmfError::Unprocessable(
            "csr: no subject commonName and no subjectAltName: nothing to certify".into(),
        ));
    }
    Ok(VerifiedCsr {
        request,
        spki_der,
        key_type,
        common_names,
        alt_names,
        lifecycle_uris: Vec::new(),
    })
}

/// The key type of a SubjectPublicKeyInfo, refusing what the CMF does not certify.
pub fn key_type_of(spki_der: &[u8]) -> Result<CsrKeyType, String> {
    use rsa::pkcs8::DecodePublicKey;
    use rsa::traits::PublicKeyParts;
    if p256::PublicKey::from_public_key_der(spki_der).is_ok() {
        return Ok(CsrKeyType::EcP256);
    }
    if p384::PublicKey::from_public_key_der(spki_der).is_ok() {
        return Ok(CsrKeyType::EcP384);
    }
    if let Ok(key) = rsa::PublicKey::from_public_key_der(spki_der) {
        let bits = key.n().bit_width() as usize;
        if bits < 2048 {
            return Err(format!(
                "RSA key of {bits} bits: at least 2048 are required"
            ));
        }
        return Ok(CsrKeyType::Rsa(bits));
    }
    Err("public key is not EC P-256, EC P-384 or RSA".into())
}

fn directory_string(value: &der::Any) -> Option<String> {
    if let Ok(s) = value.decode_as::<der::asn1::Utf8StringRef<'_>>() {
        return Some(s.as_str().to_string());
    }
    if let Ok(s) = value.decode_as::<der::asn1::PrintableStringRef<'_>>() {
        return Some(s.as_str().to_string());
    }
    if let Ok(s) = value.decode_as::<der::asn1::Ia5StringRef<'_>>() {
        return Some(s.as_str().to_string());
    }
    None
}

fn general_name_kind(name: &GeneralName) -> &'static str {
    match name {
        GeneralName::OtherName(_) => "otherName",
        GeneralName::Rfc822Name(_) => "rfc822Name",
        GeneralName::DnsName(_) => "dNSName",
        GeneralName::DirectoryName(_) => "directoryName",
        GeneralName::EdiPartyName(_) => "ediPartyName",
        GeneralName::UniformResourceIdentifier(_) => "uniformResourceIdentifier",
        GeneralName::IpAddress(_) => "iPAddress",
        GeneralName::RegisteredId(_) => "registeredID",
    }
}
