//! Enrollment over Secure Transport (RFC 7030) in front of the CMF's CSR pipeline: the same
//! consumers (mTLS identity), registrations, key policy, attestation, issuance and durable
//! record as `POST /certmgmt/v1/certificate_signing_requests`; only the encoding differs.
//!
//! ```text
//! GET  /.well-known/est[/{label}]/cacerts          CA chain, certs-only PKCS#7 (4.1)
//! POST /.well-known/est[/{label}]/simpleenroll     PKCS#10 -> certs-only PKCS#7 (4.2.1)
//! POST /.well-known/est[/{label}]/simplereenroll   renewal of a certificate held (4.2.2)
//! ```
//!
//! The certType is always VNFCI_CERT: EST enrolls VNFC instances. The vnfcId is the path
//! label (RFC 7030 3.2.2) when there is one, else the CSR's subject commonName. Bodies are
//! base64 DER both ways (RFC 7030 4.1.3, 4.2.1; RFC 8951 clarifies base64 is always used).
//! Errors carry the REST API's statuses, with ProblemDetails bodies.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use base64::Engine;
use cms::cert::CertificateChoices;
use cms::content_info::{CmsVersion, ContentInfo};
use cms::signed_data::{CertificateSet, EncapsulatedContentInfo, SignedData, SignerInfos};
use der::{Decode, Encode};
use x509_cert::Certificate;

use super::cmf::{problem_response, read_body, Problem};
use super::ClientIdentity;
use crate::cmf::csr::VerifiedCsr;
use crate::cmf::names::{stored_index_key, SubjectName};
use crate::cmf::register::owned_by;
use crate::cmf::{issue, CertType, Cmf, CmfError, Consumer, CERTIFICATES, REGISTRATIONS, SUBJECTS};

/// The media type of EST responses that carry certificates (RFC 7030 4.1.3, 4.2.3).
pub const PKCS7_CERTS_ONLY: &str = "application/pkcs7-mime; smime-type=certs-only";
/// The media type of a simple (re)enrollment request body (RFC 7030 4.2.1).
pub const PKCS10: &str = "application/pkcs10";

/// The certificate type EST enrolls.
const EST_CERT_TYPE: CertType = CertType::VnfciCert;

pub fn routes(cmf: Arc<Cmf>) -> Router {
    Router::new()
        .route("/.well-known/est/cacerts", get(cacerts))
        .route("/.well-known/est/simpleenroll", post(simpleenroll))
        .route("/.well-known/est/simplereenroll", post(simplereenroll))
        .route("/.well-known/est/{label}/cacerts", get(cacerts_labelled))
        .route(
            "/.well-known/est/{label}/simpleenroll",
            post(simpleenroll_labelled),
        )
        .route(
            "/.well-known/est/{label}/simplereenroll",
            post(simplereenroll_labelled),
        )
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(cmf)
}

/// A degenerate ("certs-only") SignedData holding `certificates` (RFC 5652 5.1, RFC 7030
/// 4.1.3): version 1, no digest algorithms, no content, no signers, no CRLs.
pub fn certs_only(certificates: Vec<Certificate>) -> Result<Vec<u8>, der::Error> {
    let mut set = CertificateSet(Default::default());
    for certificate in certificates {
        // A DER SET OF is sorted by encoding; `insert` keeps it so.
        set.0.insert(CertificateChoices::Certificate(certificate))?;
    }
    let signed_data = SignedData {
        version: CmsVersion::V1,
        digest_algorithms: Default::default(),
        encap_content_info: EncapsulatedContentInfo {
            econtent_type: const_oid::db::rfc5911::ID_DATA,
            econtent: None,
        },
        certificates: Some(set),
        crls: None,
        signer_infos: SignerInfos(Default::default()),
    };
    ContentInfo {
        content_type: const_oid::db::rfc5911::ID_SIGNED_DATA,
        content: der::Any::from_der(&signed_data.to_der()?)?,
    }
    .to_der()
}

/// Which enrollment operation (RFC 7030 4.2.1 or 4.2.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Operation {
    Enroll,
    Reenroll,
}

async fn cacerts(State(cmf): State<Arc<Cmf>>) -> Response {
    respond(ca_certificates(&cmf))
}

async fn cacerts_labelled(State(cmf): State<Arc<Cmf>>, Path(_label): Path<String>) -> Response {
    // The label selects the vnfcId of an enrollment; every label has the same issuing CA.
    respond(ca_certificates(&cmf))
}

async fn simpleenroll(
    State(cmf): State<Arc<Cmf>>,
    Extension(identity): Extension<ClientIdentity>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    respond(enroll(&cmf, &identity, None, Operation::Enroll, &headers, body).await)
}

async fn simplereenroll(
    State(cmf): State<Arc<Cmf>>,
    Extension(identity): Extension<ClientIdentity>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    respond(enroll(&cmf, &identity, None, Operation::Reenroll, &headers, body).await)
}

async fn simpleenroll_labelled(
    State(cmf): State<Arc<Cmf>>,
    Extension(identity): Extension<ClientIdentity>,
    Path(label): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    respond(
        enroll(
            &cmf,
            &identity,
            Some(label),
            Operation::Enroll,
            &headers,
            body,
        )
        .await,
    )
}

async fn simplereenroll_labelled(
    State(cmf): State<Arc<Cmf>>,
    Extension(identity): Extension<ClientIdentity>,
    Path(label): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    respond(
        enroll(
            &cmf,
            &identity,
            Some(label),
            Operation::Reenroll,
            &headers,
            body,
        )
        .await,
    )
}

async fn method_not_allowed() -> Problem {
    Problem(CmfError::MethodNotAllowed(
        "EST: cacerts is GET, simpleenroll and simplereenroll are POST (RFC 7030 3.2.2)".into(),
    ))
}

/// The chain of the CA that issues VNFCI_CERT, from that CA up to the root.
fn ca_certificates(cmf: &Cmf) -> Result<Vec<u8>, CmfError> {
    let ca = issue::chain_for(cmf, EST_CERT_TYPE).ok_or_else(|| {
        CmfError::NotFound(format!("EST: no configured CA issues {EST_CERT_TYPE}"))
    })?;
    let certificates = ca
        .chain_der
        .iter()
        .map(|der| Certificate::from_der(der))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CmfError::Internal(format!("CA '{}' chain: {e}", ca.id)))?;
    certs_only(certificates).map_err(|e| CmfError::Internal(format!("PKCS#7 encoding: {e}")))
}

/// simpleenroll / simplereenroll: the caller, the request body, the vnfcId, the renewal
/// rule, then the shared pipeline; the issued certificate as certs-only PKCS#7 DER.
async fn enroll(
    cmf: &Arc<Cmf>,
    identity: &ClientIdentity,
    label: Option<String>,
    operation: Operation,
    headers: &HeaderMap,
    body: Body,
) -> Result<Vec<u8>, CmfError> {
    let consumer = cmf.consumer(identity.0.as_deref());
    let media_type = check_pkcs10(headers);
    // The body (bounded) is read before any refusal is sent: over HTTP/2 an answer sent
    // before the request body is consumed resets the stream, which curl-based EST clients
    // report as a transport error instead of the status.
    let body = read_body(headers, body, cmf.max_body_bytes()).await;
    let consumer = consumer?;
    media_type?;
    let der = pkcs10_der(&body?)?;
    let verified = issue::verify_blocking(der).await?;
    let vnfc_id = match label {
        Some(label) => label,
        None => verified.common_names.first().cloned().ok_or_else(|| {
            CmfError::BadRequest(
                "EST: the vnfcId is the path label or the CSR's subject commonName; this \
                 request has neither"
                    .into(),
            )
        })?,
    };
    if operation == Operation::Reenroll {
        let (store_cmf, consumer, vnfc_id, verified) = (
            cmf.clone(),
            consumer.clone(),
            vnfc_id.clone(),
            verified.clone(),
        );
        tokio::task::spawn_blocking(move || {
            check_renewal(&store_cmf, &consumer, &vnfc_id, &verified)
        })
        .await
        .map_err(|e| CmfError::Internal(format!("re-enrollment check: {e}")))??;
    }
    let issued = cmf
        .enroll_verified(&consumer, EST_CERT_TYPE, Some(vnfc_id), verified, false)
        .await?;
    let certificate = crate::pki::certificates_from_pem(&issued.certificate)
        .map_err(CmfError::Internal)?
        .remove(0);
    certs_only(vec![certificate]).map_err(|e| CmfError::Internal(format!("PKCS#7 encoding: {e}")))
}

/// A simple (re)enrollment body is `application/pkcs10` (RFC 7030 4.2.1).
fn check_pkcs10(headers: &HeaderMap) -> Result<(), CmfError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = content_type.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case(PKCS10) {
        Ok(())
    } else {
        Err(CmfError::UnsupportedMediaType(format!(
            "Content-Type '{content_type}': expected {PKCS10} (RFC 7030 4.2.1)"
        )))
    }
}

/// The CSR DER from a base64 body; whitespace and line breaks are allowed (RFC 2045 6.8).
fn pkcs10_der(body: &[u8]) -> Result<Vec<u8>, CmfError> {
    let compact: Vec<u8> = body
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(compact)
        .map_err(|e| CmfError::BadRequest(format!("EST: the body is not base64 DER: {e}")))
}

/// RFC 7030 4.2.2: a re-enrollment renews a certificate; its subject and subjectAltName must
/// be those of the certificate being renewed. In delegation mode the TLS client is the VNFM,
/// not the VNFC, so the certificate being renewed is one this consumer obtained for this
/// vnfcId under the same registration, with the same names.
fn check_renewal(
    cmf: &Cmf,
    consumer: &Consumer,
    vnfc_id: &str,
    verified: &VerifiedCsr,
) -> Result<(), CmfError> {
    // In the canonical form the records keep (names.rs).
    let mut names: Vec<String> = verified
        .requested_names()
        .iter()
        .map(|n| SubjectName::parse(n).map_or_else(|_| n.clone(), |s| s.canonical()))
        .collect();
    names.sort();
    let (registration, held) = cmf.store.read(|tx| {
        let Some(id) = tx.get(&SUBJECTS, &stored_index_key(vnfc_id))? else {
            return Ok((None, false));
        };
        let Some(registration) = tx.get(&REGISTRATIONS, &id)? else {
            return Ok((None, false));
        };
        // Linear in the certificates of this CA; an index by registration is the next step
        // if re-enrollment volume calls for it.
        let held = tx
            .list(&CERTIFICATES, &format!("{}/", registration.ca_id))?
            .into_iter()
            .any(|(_, record)| {
                let mut subjects = record.subjects;
                subjects.sort();
                record.consumer == consumer.id
                    && record.registration_id == registration.id
                    && record.cert_type == EST_CERT_TYPE
                    && subjects == names
            });
        Ok((Some(registration), held))
    })?;
    let registration = registration.ok_or_else(|| {
        CmfError::Unprocessable(format!(
            "vnfcId '{vnfc_id}' is not registered for {EST_CERT_TYPE}"
        ))
    })?;
    owned_by(&registration, consumer).map_err(|_| {
        CmfError::Forbidden(format!("vnfcId '{vnfc_id}' is managed by another consumer"))
    })?;
    if !held {
        return Err(CmfError::Unprocessable(format!(
            "simplereenroll: no certificate for vnfcId '{vnfc_id}' with the names [{}] was \
             issued to '{}'; a re-enrollment must keep the subject of the certificate it \
             renews (RFC 7030 4.2.2), use simpleenroll for a new one",
            names.join(", "),
            consumer.id
        )));
    }
    Ok(())
}

/// 200 with a base64 certs-only PKCS#7 body, or the error as ProblemDetails.
fn respond(outcome: Result<Vec<u8>, CmfError>) -> Response {
    let der = match outcome {
        Ok(der) => der,
        Err(e) => return problem_response(&e),
    };
    let mut response = (StatusCode::OK, base64_lines(&der)).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(PKCS7_CERTS_ONLY),
    );
    headers.insert(
        HeaderName::from_static("content-transfer-encoding"),
        HeaderValue::from_static("base64"),
    );
    response
}

/// Base64 in lines of 64 characters (RFC 2045 6.8 allows at most 76).
fn base64_lines(der: &[u8]) -> String {
    let text = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::with_capacity(text.len() + text.len() / 64 + 1);
    for chunk in text.as_bytes().chunks(64) {
        // Base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_lines_round_trip() {
        let der: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let text = base64_lines(&der);
        assert!(text.lines().all(|l| l.len() <= 64));
        let compact: String = text.lines().collect();
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(compact)
                .unwrap(),
            der
        );
    }

    #[test]
    fn certs_only_of_nothing_is_a_valid_signed_data() {
        let der = certs_only(Vec::new()).unwrap();
        let info = ContentInfo::from_der(&der).unwrap();
        assert_eq!(info.content_type, const_oid::db::rfc5911::ID_SIGNED_DATA);
        let signed: SignedData = info.content.decode_as().unwrap();
        assert_eq!(signed.version, CmsVersion::V1);
        assert!(signed.signer_infos.0.is_empty());
        assert!(signed.crls.is_none());
    }
}
