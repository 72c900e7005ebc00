//! OCSP responder (RFC 6960), one for every CA of the CMF, answering from the durable
//! certificate records: `good` for a certificate this CA issued and did not revoke,
//! `revoked` with time and reason, `unknown` for a serial the CA never issued (2.2).
//!
//! The ASN.1 types are written here on der 0.8 (`x509-ocsp` exists only for the older
//! RustCrypto generation, der 0.7 / x509-cert 0.2, which does not mix with ours).
//!
//! Signing: responses are signed by the CA key itself, in the HSM/TPM (RFC 6960 2.6 allows
//! the CA that issued the certificate to sign). A delegated responder certificate
//! (id-kp-OCSPSigning) would put a second key in the same device, protected no better, and
//! its id-pkix-ocsp-nocheck certificate could not itself be revoked, so it must be short-lived
//! and renewed; it pays off when the CA key must stay offline or be used rarely, which is not
//! this CMF's case (the CA key signs every issued certificate already). The CA certificate is
//! included in `certs` so clients find the signer without configuration. A request whose
//! certificates belong to different CAs cannot be answered under one signature and is
//! `unauthorized` (2.3), as is one for a CA this responder does not serve.
//!
//! Nonce (RFC 8954): a request nonce of 1 to 32 octets is echoed in the response; an empty or
//! longer one is a `malformedRequest`. Without a nonce the response may be cached until its
//! nextUpdate (`[cmf.revocation] ocsp_validity_seconds`).

use std::time::{Duration, SystemTime};

use der::asn1::{BitString, GeneralizedTime, Null, ObjectIdentifier, OctetString};
use der::{Choice, Decode, Encode, Enumerated, Sequence};
use sha1::Digest as _;
use spki::AlgorithmIdentifierOwned;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::CrlReason;
use x509_cert::ext::{Extension, Extensions};
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;
use x509_cert::Certificate;

use super::revoke::RevocationReason;
use super::{Cmf, IssuingCa, CERTIFICATES};

/// id-pkix-ocsp-basic (RFC 6960 4.2.1).
pub const ID_PKIX_OCSP_BASIC: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.48.1.1");
/// id-pkix-ocsp-nonce (RFC 6960 4.4.1).
pub const ID_PKIX_OCSP_NONCE: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.48.1.2");
const SHA1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.14.3.2.26");
const SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.1");
const SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.2");
const SHA512: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.3");

/// Requests per OCSPRequest answered at most (RFC 5019 2.1.1 allows clients one).
pub const MAX_REQUESTS: usize = 16;
/// RFC 8954 2.1: nonces of 1 to 32 octets.
pub const MAX_NONCE: usize = 32;

/// `Version ::= INTEGER { v1(0) }`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Enumerated)]
#[asn1(type = "INTEGER")]
#[repr(u8)]
pub enum Version {
    #[default]
    V1 = 0,
}

/// RFC 6960 4.1.1.
#[derive(Clone, Debug, PartialEq, Eq, Sequence)]
pub struct OcspRequest {
    pub tbs_request: TbsRequest,
    #[asn1(context_specific = "0", optional = "true", tag_mode = "EXPLICIT")]
    pub optional_signature: Option<RequestSignature>,
}

#[derive(Clone, Debug, PartialEq, Eq, Sequence)]
pub struct TbsRequest {
    #[asn1(
        context_specific = "0",
        default = "Default::default",
        tag_mode = "EXPLICIT"
    )]
    pub version: Version,
    #[asn1(context_specific = "1", optional = "true", tag_mode = "EXPLICIT")]
    pub requestor_name: Option<GeneralName>,
    pub request_list: Vec<Request>,
    #[asn1(context_specific = "2", optional = "true", tag_mode = "EXPLICIT")]
    pub request_extensions: Option<Extensions>,
}

#[derive(Clone, Debug, PartialEq, Eq, Sequence)]
pub struct RequestSignature {
    pub signature_algorithm: AlgorithmIdentifierOwned,
    pub signature: BitString,
    #[asn1(context_specific = "0", optional = "true", tag_mode = "EXPLICIT")]
    pub certs: Option<Vec<Certificate>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Sequence)]
pub struct Request {
    pub req_cert: CertId,
    #[asn1(context_specific = "0", optional = "true", tag_mode = "EXPLICIT")]
    pub single_request_extensions: Option<Extensions>,
}

#[derive(Clone, Debug, PartialEq, Eq, Sequence)]
pub struct CertId {
    pub hash_algorithm: AlgorithmIdentifierOwned,
    pub issuer_name_hash: OctetString,
    pub issuer_key_hash: OctetString,
    pub serial_number: SerialNumber,
}

/// RFC 6960 4.2.1.
#[derive(Clone, Debug, PartialEq, Eq, Sequence)]
pub struct OcspResponse {
    pub response_status: OcspResponseStatus,
    #[asn1(context_specific = "0", optional = "true", tag_mode = "EXPLICIT")]
    pub response_bytes: Option<ResponseBytes>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Enumerated)]
#[repr(u32)]
pub enum OcspResponseStatus {
    Successful = 0,
    MalformedRequest = 1,
    InternalError = 2,
    TryLater = 3,
    SigRequired = 5,
    Unauthorized = 6,
}

#[derive(Clone, Debug, PartialEq, Eq, Sequence)]
pub struct ResponseBytes {
    pub response_type: ObjectIdentifier,
    pub response: OctetString,
}

#[derive(Clone, Debug, PartialEq, Eq, Sequence)]
pub struct BasicOcspResponse {
    pub tbs_response_data: ResponseData,
    pub signature_algorithm: AlgorithmIdentifierOwned,
    pub signature: BitString,
    #[asn1(context_specific = "0", optional = "true", tag_mode = "EXPLICIT")]
    pub certs: Option<Vec<Certificate>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Sequence)]
pub struct ResponseData {
    #[asn1(
        context_specific = "0",
        default = "Default::default",
        tag_mode = "EXPLICIT"
    )]
    pub version: Version,
    pub responder_id: ResponderId,
    pub produced_at: GeneralizedTime,
    pub responses: Vec<SingleResponse>,
    #[asn1(context_specific = "1", optional = "true", tag_mode = "EXPLICIT")]
    pub response_extensions: Option<Extensions>,
}

#[derive(Clone, Debug, PartialEq, Eq, Choice)]
pub enum ResponderId {
    #[asn1(context_specific = "1", tag_mode = "EXPLICIT", constructed = "true")]
    ByName(Name),
    /// SHA-1 of the responder's public key (the BIT STRING's value).
    #[asn1(context_specific = "2", tag_mode = "EXPLICIT", constructed = "true")]
    ByKey(OctetString),
}

#[derive(Clone, Debug, PartialEq, Eq, Sequence)]
pub struct SingleResponse {
    pub cert_id: CertId,
    pub cert_status: CertStatus,
    pub this_update: GeneralizedTime,
    #[asn1(context_specific = "0", optional = "true", tag_mode = "EXPLICIT")]
    pub next_update: Option<GeneralizedTime>,
    #[asn1(context_specific = "1", optional = "true", tag_mode = "EXPLICIT")]
    pub single_extensions: Option<Extensions>,
}

#[derive(Clone, Debug, PartialEq, Eq, Choice)]
pub enum CertStatus {
    #[asn1(context_specific = "0", tag_mode = "IMPLICIT")]
    Good(Null),
    #[asn1(context_specific = "1", tag_mode = "IMPLICIT", constructed = "true")]
    Revoked(RevokedInfo),
    #[asn1(context_specific = "2", tag_mode = "IMPLICIT")]
    Unknown(Null),
}

#[derive(Clone, Debug, PartialEq, Eq, Sequence)]
pub struct RevokedInfo {
    pub revocation_time: GeneralizedTime,
    #[asn1(context_specific = "0", optional = "true", tag_mode = "EXPLICIT")]
    pub revocation_reason: Option<CrlReason>,
}

/// The DER of an OCSPResponse with an error status and no body.
pub fn error_response(status: OcspResponseStatus) -> Vec<u8> {
    let response = OcspResponse {
        response_status: status,
        response_bytes: None,
    };
    // Invariant: an ENUMERATED in a SEQUENCE always encodes.
    response
        .to_der()
        .unwrap_or_else(|_| vec![0x30, 0x03, 0x0a, 0x01, status as u8])
}

/// Why a request got no `successful` answer.
#[derive(Debug, thiserror::Error)]
pub enum OcspError {
    #[error("malformed OCSP request: {0}")]
    Malformed(String),
    #[error("not authoritative: {0}")]
    Unauthorized(String),
    #[error("try later: {0}")]
    TryLater(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl OcspError {
    pub fn status(&self) -> OcspResponseStatus {
        match self {
            OcspError::Malformed(_) => OcspResponseStatus::MalformedRequest,
            OcspError::Unauthorized(_) => OcspResponseStatus::Unauthorized,
            OcspError::TryLater(_) => OcspResponseStatus::TryLater,
            OcspError::Internal(_) => OcspResponseStatus::InternalError,
        }
    }
}

/// A successful answer: the OCSPResponse DER, and whether it carries a nonce (then it must
/// not be cached).
#[derive(Debug)]
pub struct Answer {
    pub der: Vec<u8>,
    pub nonce: bool,
    pub next_update: SystemTime,
}

impl Cmf {
    /// Answer an OCSPRequest (DER).
    pub async fn ocsp(&self, request_der: &[u8]) -> Result<Answer, OcspError> {
        let request =
            OcspRequest::from_der(request_der).map_err(|e| OcspError::Malformed(e.to_string()))?;
        let tbs = &request.tbs_request;
        if tbs.request_list.is_empty() || tbs.request_list.len() > MAX_REQUESTS {
            return Err(OcspError::Malformed(format!(
                "1 to {MAX_REQUESTS} requests per OCSPRequest"
            )));
        }
        let nonce = nonce_extension(tbs.request_extensions.as_deref())?;
        // Every request must be for the same CA: one signature answers them all.
        let mut ca: Option<&IssuingCa> = None;
        for single in &tbs.request_list {
            let found = self.ca_of(&single.req_cert)?;
            match ca {
                Some(first) if first.id != found.id => {
                    return Err(OcspError::Unauthorized(
                        "the requests are for certificates of different CAs".into(),
                    ))
                }
                _ => ca = Some(found),
            }
        }
        let ca = ca.ok_or_else(|| OcspError::Malformed("no request".into()))?;
        let keys: Vec<(CertId, String)> = tbs
            .request_list
            .iter()
            .map(|r| {
                (
                    r.req_cert.clone(),
                    format!(
                        "{}/{}",
                        ca.id,
                        hex::encode(r.req_cert.serial_number.as_bytes())
                    ),
                )
            })
            .collect();
        let store = self.store.clone();
        let lookups: Vec<String> = keys.iter().map(|(_, k)| k.clone()).collect();
        let records = tokio::task::spawn_blocking(move || {
            store.read(|tx| {
                lookups
                    .iter()
                    .map(|key| tx.get(&CERTIFICATES, key))
                    .collect::<Result<Vec<_>, _>>()
            })
        })
        .await
        .map_err(|e| OcspError::Internal(e.to_string()))?
        .map_err(|e| OcspError::TryLater(format!("store: {e}")))?;
        let now = whole_seconds(SystemTime::now());
        let next_update = now + Duration::from_secs(self.crls.settings.ocsp_validity_seconds);
        let gt = |t: SystemTime| {
            GeneralizedTime::from_system_time(t).map_err(|e| OcspError::Internal(e.to_string()))
        };
        let mut responses = Vec::with_capacity(keys.len());
        for ((cert_id, _), record) in keys.into_iter().zip(records) {
            let status = match record {
                None => CertStatus::Unknown(Null),
                Some(record) => match record.revocation {
                    None => CertStatus::Good(Null),
                    Some(revocation) => {
                        let at = humantime::parse_rfc3339_weak(&revocation.revoked_at)
                            .map_err(|e| OcspError::Internal(format!("revocation time: {e}")))?;
                        let reason = RevocationReason::parse(&revocation.reason)
                            .filter(|r| *r != RevocationReason::Unspecified)
                            .map(RevocationReason::crl_reason);
                        CertStatus::Revoked(RevokedInfo {
                            revocation_time: gt(at)?,
                            revocation_reason: reason,
                        })
                    }
                },
            };
            responses.push(SingleResponse {
                cert_id,
                cert_status: status,
                this_update: gt(now)?,
                next_update: Some(gt(next_update)?),
                single_extensions: None,
            });
        }
        let ca_cert = ca.issuer.certificate().clone();
        let data = ResponseData {
            version: Version::V1,
            responder_id: ResponderId::ByKey(
                OctetString::new(sha1::Sha1::digest(public_key_bits(&ca_cert)).to_vec())
                    .map_err(|e| OcspError::Internal(e.to_string()))?,
            ),
            produced_at: gt(now)?,
            responses,
            response_extensions: nonce.clone().map(|n| vec![n]),
        };
        let key = ca.issuer.key().clone();
        let der = tokio::task::spawn_blocking(move || sign_response(&key, data, ca_cert))
            .await
            .map_err(|e| OcspError::Internal(e.to_string()))??;
        Ok(Answer {
            der,
            nonce: nonce.is_some(),
            next_update,
        })
    }

    /// The CA a CertID names: issuer name and key hashes under its hash algorithm.
    fn ca_of(&self, id: &CertId) -> Result<&IssuingCa, OcspError> {
        let hash = |data: &[u8]| -> Result<Vec<u8>, OcspError> {
            Ok(match id.hash_algorithm.oid {
                SHA1 => sha1::Sha1::digest(data).to_vec(),
                SHA256 => sha2::Sha256::digest(data).to_vec(),
                SHA384 => sha2::Sha384::digest(data).to_vec(),
                SHA512 => sha2::Sha512::digest(data).to_vec(),
                other => {
                    return Err(OcspError::Malformed(format!(
                        "CertID hash algorithm {other} (SHA-1 or SHA-2 expected)"
                    )))
                }
            })
        };
        for ca in self.cas.iter() {
            let cert = ca.issuer.certificate();
            let name = cert
                .tbs_certificate()
                .subject()
                .to_der()
                .map_err(|e| OcspError::Internal(e.to_string()))?;
            if hash(&name)? == id.issuer_name_hash.as_bytes()
                && hash(public_key_bits(cert))? == id.issuer_key_hash.as_bytes()
            {
                return Ok(ca);
            }
        }
        Err(OcspError::Unauthorized(
            "no CA of this responder matches the CertID".into(),
        ))
    }
}

/// The request's nonce extension, checked (RFC 8954 2.1), to echo unchanged.
fn nonce_extension(extensions: Option<&[Extension]>) -> Result<Option<Extension>, OcspError> {
    let Some(extension) = extensions
        .unwrap_or_default()
        .iter()
        .find(|e| e.extn_id == ID_PKIX_OCSP_NONCE)
    else {
        return Ok(None);
    };
    // Nonce ::= OCTET STRING, inside the extension's OCTET STRING.
    let nonce = OctetString::from_der(extension.extn_value.as_bytes())
        .map_err(|e| OcspError::Malformed(format!("nonce: {e}")))?;
    let length = nonce.as_bytes().len();
    if length == 0 || length > MAX_NONCE {
        return Err(OcspError::Malformed(format!(
            "nonce of {length} octets (RFC 8954: 1 to {MAX_NONCE})"
        )));
    }
    Ok(Some(extension.clone()))
}

/// Sign the response data with the CA key (blocking) and wrap it as an OCSPResponse.
fn sign_response(
    key: &crate::keys::signer::HardwareKey,
    data: ResponseData,
    ca_cert: Certificate,
) -> Result<Vec<u8>, OcspError> {
    let internal = |e: &dyn std::fmt::Display| OcspError::Internal(e.to_string());
    let tbs = data.to_der().map_err(|e| internal(&e))?;
    let signature = key.sign(&tbs).map_err(|e| {
        if e.is_transient() || matches!(e, crate::keys::KeyError::NotFound(_)) {
            OcspError::TryLater(format!("the CA key is unavailable: {e}"))
        } else {
            OcspError::Internal(format!("signing: {e}"))
        }
    })?;
    let basic = BasicOcspResponse {
        tbs_response_data: data,
        signature_algorithm: crate::keys::signer::signature_algorithm_identifier(key.scheme())
            .map_err(|e| internal(&e))?,
        signature: BitString::from_bytes(&signature).map_err(|e| internal(&e))?,
        certs: Some(vec![ca_cert]),
    };
    let response = OcspResponse {
        response_status: OcspResponseStatus::Successful,
        response_bytes: Some(ResponseBytes {
            response_type: ID_PKIX_OCSP_BASIC,
            response: OctetString::new(basic.to_der().map_err(|e| internal(&e))?)
                .map_err(|e| internal(&e))?,
        }),
    };
    response.to_der().map_err(|e| internal(&e))
}

/// The subjectPublicKey BIT STRING's value (what CertID and ResponderID hash, RFC 6960 4.1.1).
fn public_key_bits(cert: &Certificate) -> &[u8] {
    cert.tbs_certificate()
        .subject_public_key_info()
        .subject_public_key
        .raw_bytes()
}

fn whole_seconds(time: SystemTime) -> SystemTime {
    let secs = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_responses_are_the_rfc_encoding() {
        // SEQUENCE { ENUMERATED 1 }
        assert_eq!(
            error_response(OcspResponseStatus::MalformedRequest),
            [0x30, 0x03, 0x0a, 0x01, 0x01]
        );
        assert_eq!(
            error_response(OcspResponseStatus::Unauthorized),
            [0x30, 0x03, 0x0a, 0x01, 0x06]
        );
    }

    #[test]
    fn cert_status_tags_are_implicit() {
        assert_eq!(CertStatus::Good(Null).to_der().unwrap(), [0x80, 0x00]);
        assert_eq!(CertStatus::Unknown(Null).to_der().unwrap(), [0x82, 0x00]);
        let revoked = CertStatus::Revoked(RevokedInfo {
            revocation_time: GeneralizedTime::from_unix_duration(Duration::from_secs(0)).unwrap(),
            revocation_reason: Some(CrlReason::KeyCompromise),
        })
        .to_der()
        .unwrap();
        assert_eq!(revoked[0], 0xa1);
        // [0] EXPLICIT ENUMERATED 1 at the end.
        assert_eq!(
            &revoked[revoked.len() - 5..],
            [0xa0, 0x03, 0x0a, 0x01, 0x01]
        );
    }

    #[test]
    fn nonces_outside_rfc_8954_bounds_are_malformed() {
        let ext = |len: usize| Extension {
            extn_id: ID_PKIX_OCSP_NONCE,
            critical: false,
            extn_value: OctetString::new(OctetString::new(vec![7; len]).unwrap().to_der().unwrap())
                .unwrap(),
        };
        assert!(nonce_extension(Some(&[ext(16)])).unwrap().is_some());
        assert!(nonce_extension(Some(&[ext(32)])).unwrap().is_some());
        assert!(matches!(
            nonce_extension(Some(&[ext(0)])),
            Err(OcspError::Malformed(_))
        ));
        assert!(matches!(
            nonce_extension(Some(&[ext(33)])),
            Err(OcspError::Malformed(_))
        ));
        assert!(nonce_extension(None).unwrap().is_none());
    }
}
