//! Direct mode's HTTP side (IFA 033 10.3.2): the notification endpoint the VNFM posts VNF
//! LCM notifications to (SOL 003 5.4.20 callback; SOL 013 8: test GET answered 204,
//! authentication as the subscription asked, journal before the 204), the OAuth 2.0 token
//! endpoint of that subscription, and direct EST enrollment of VNFC instances.
//!
//! ```text
//! GET|POST /cmf/v1/direct/notifications/{vnfm}
//! POST     /cmf/v1/direct/token/{vnfm}                      (OAUTH2_CLIENT_CREDENTIALS)
//! POST     /.well-known/est/direct/{vnfm}/simpleenroll      (RFC 7030 4.2.1)
//! ```

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine;

use super::cmf::{problem_response, read_body};
use super::problem_details;
use crate::cmf::direct::{parse_notification, Direct};
use crate::cmf::CmfError;
use crate::sm::intake::{check_content_type, Credentials, Denied};

pub fn routes(direct: Arc<Direct>) -> Router {
    Router::new()
        .route(
            "/cmf/v1/direct/notifications/{vnfm}",
            get(test_notification).post(notification),
        )
        .route("/cmf/v1/direct/token/{vnfm}", post(token))
        // One enrollment path per VNFM (so per trust domain): RFC 7030 3.2.2 labels are one
        // segment, but `/.well-known/est/{label}` belongs to the EST front; the VNFC gets
        // the whole URL in its enrollment credential (`estUrl`), so it builds nothing.
        .route(
            "/.well-known/est/direct/{vnfm}/simpleenroll",
            post(simpleenroll),
        )
        .with_state(direct)
}

fn authenticate(direct: &Direct, vnfm: &str, headers: &HeaderMap) -> Option<Response> {
    let Some(intake) = direct.intake(vnfm) else {
        return Some(problem_details(
            404,
            Some("Not Found"),
            &format!("no VNFM '{vnfm}' is followed in direct mode"),
        ));
    };
    let credentials = Credentials {
        authorization: headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok()),
        client_certificate: None,
        client_identity: None,
    };
    match intake.authenticate(&credentials).err()? {
        Denied::Unauthenticated { challenge, detail } => {
            let mut response = problem_details(401, Some("Unauthorized"), &detail);
            if let Ok(value) = HeaderValue::from_str(&challenge) {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, value);
            }
            Some(response)
        }
        Denied::Forbidden(detail) => Some(problem_details(403, Some("Forbidden"), &detail)),
    }
}

/// SOL 013 8.3.5 / SOL 003 5.4.20.3.2: the VNFM's test of the callback URI.
async fn test_notification(
    State(direct): State<Arc<Direct>>,
    Path(vnfm): Path<String>,
    headers: HeaderMap,
) -> Response {
    authenticate(&direct, &vnfm, &headers).unwrap_or_else(|| StatusCode::NO_CONTENT.into_response())
}

async fn notification(
    State(direct): State<Arc<Direct>>,
    Path(vnfm): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let body = read_body(&headers, body, direct.max_body_bytes()).await;
    if let Some(response) = authenticate(&direct, &vnfm, &headers) {
        return response;
    }
    if let Err(detail) = check_content_type(
        headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
    ) {
        return problem_details(415, Some("Unsupported Media Type"), &detail);
    }
    let body = match body {
        Ok(body) => body,
        Err(e) => return problem_response(&e),
    };
    let parsed = match parse_notification(&body) {
        Ok(Some(value)) => value,
        // Another type: acknowledged, nothing to do (SOL 013 8.3.3 lets a subscriber ignore).
        Ok(None) => return StatusCode::NO_CONTENT.into_response(),
        Err(detail) => return problem_details(400, Some("Bad Request"), &detail),
    };
    // The 204 says "received": only once the journal entry is durable.
    match direct.journal(&vnfm, parsed).await {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => problem_response(&CmfError::from(e)),
    }
}

/// RFC 6749 4.4 token endpoint named in the subscription (OAUTH2_CLIENT_CREDENTIALS).
async fn token(
    State(direct): State<Arc<Direct>>,
    Path(vnfm): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Some(intake) = direct.intake(&vnfm) else {
        return problem_details(404, Some("Not Found"), "unknown VNFM");
    };
    let body = match read_body(&headers, body, 8 * 1024).await {
        Ok(body) => body,
        Err(e) => return problem_response(&e),
    };
    let form = String::from_utf8_lossy(&body);
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let (status, body) = match intake.issue_token(authorization, &form) {
        Ok(value) => (200, value),
        Err(e) => (e.status, e.body),
    };
    let mut response = (
        StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
        body.to_string(),
    )
        .into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// EST simpleenroll of a direct-mode VNFC (RFC 7030 4.2.1 request and response encodings;
/// 3.2.3 HTTP Basic client authentication with the enrollment credential).
async fn simpleenroll(
    State(direct): State<Arc<Direct>>,
    Path(vnfm): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let body = read_body(&headers, body, 64 * 1024).await;
    if !direct.follows(&vnfm) {
        return problem_details(
            404,
            Some("Not Found"),
            &format!("no VNFM '{vnfm}' is followed in direct mode (no such enrollment path)"),
        );
    }
    let outcome = async {
        let essence = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if essence != super::est::PKCS10 {
            return Err(CmfError::UnsupportedMediaType(format!(
                "Content-Type '{essence}': expected {} (RFC 7030 4.2.1)",
                super::est::PKCS10
            )));
        }
        let body = body?;
        let compact: Vec<u8> = body
            .iter()
            .copied()
            .filter(|b| !b.is_ascii_whitespace())
            .collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(compact)
            .map_err(|e| CmfError::BadRequest(format!("EST: the body is not base64 DER: {e}")))?;
        let verified = crate::cmf::issue::verify_blocking(der).await?;
        let issued = direct
            .enroll(
                &vnfm,
                headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok()),
                verified,
            )
            .await?;
        let certificate = crate::pki::certificates_from_pem(&issued.certificate)
            .map_err(CmfError::Internal)?
            .remove(0);
        super::est::certs_only(vec![certificate])
            .map_err(|e| CmfError::Internal(format!("PKCS#7 encoding: {e}")))
    }
    .await;
    match outcome {
        Ok(der) => {
            let text = base64::engine::general_purpose::STANDARD.encode(der);
            let mut response = (StatusCode::OK, text).into_response();
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(super::est::PKCS7_CERTS_ONLY),
            );
            response.headers_mut().insert(
                header::HeaderName::from_static("content-transfer-encoding"),
                HeaderValue::from_static("base64"),
            );
            response
        }
        Err(e) => {
            let mut response = problem_response(&e);
            if matches!(e, CmfError::Unauthenticated(_)) {
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"warden-est-direct\""),
                );
            }
            response
        }
    }
}
