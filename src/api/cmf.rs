//! The CMF's REST resources (IFA 033 11.2), with SOL 013 conventions: `Version` header on
//! every response, `api_versions`, errors as ProblemDetails (`application/problem+json`),
//! consumers authenticated by their TLS client certificate.
//!
//! ```text
//! GET    /certmgmt/api_versions
//! GET    /certmgmt/v1/registrations                       the caller's registrations
//! POST   /certmgmt/v1/registrations                       Register (11.2.2)      -> 201 + Location
//! GET    /certmgmt/v1/registrations/{registrationId}
//! DELETE /certmgmt/v1/registrations/{registrationId}                             -> 204
//! POST   /certmgmt/v1/certificate_signing_requests        CSR (11.2.3)           -> 201
//! ```

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Request, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::de::DeserializeOwned;

use super::ClientIdentity;
use crate::cmf::{Cmf, CmfError};

/// The version of this API (SOL 013 4.6: `Version` header, api_versions).
pub const API_VERSION: &str = "1.0.0";

/// Every version of this API the CMF serves, as `api_versions` lists them. A request must
/// name one of them in its `Version` header ([`require_version`]).
pub const SUPPORTED_VERSIONS: &[&str] = &[API_VERSION];

pub fn routes(cmf: Arc<Cmf>) -> Router {
    Router::new()
        .route("/certmgmt/api_versions", get(api_versions))
        .route(
            "/certmgmt/v1/registrations",
            get(list_registrations).post(create_registration),
        )
        .route(
            "/certmgmt/v1/registrations/{id}",
            get(read_registration).delete(delete_registration),
        )
        .route("/certmgmt/v1/certificate_signing_requests", post(sign_csr))
        .method_not_allowed_fallback(method_not_allowed)
        // Only the routes of this API: EST (RFC 7030), health and the SM's callback have no
        // `Version` header.
        .route_layer(axum::middleware::from_fn(require_version))
        .with_state(cmf)
}

/// Per-role trust (issue 9 §4): a client certificate on the CMF's routes (REST and EST) must
/// chain to the consumer roots (`cmf.client_ca`); one that chains only to another role's
/// roots (the NFVO's notification roots) is refused, 403, whatever name it carries.
/// Without a certificate the handlers answer (401, or EST cacerts served).
pub async fn require_consumer_trust(request: Request<Body>, next: Next) -> Response {
    let presented = request
        .extensions()
        .get::<super::PeerCertificate>()
        .is_some_and(|peer| peer.0.is_some());
    let trusted = request
        .extensions()
        .get::<super::TrustedRoles>()
        .is_some_and(|roles| roles.cmf_consumer);
    if presented && !trusted {
        return problem_response(&CmfError::Forbidden(
            "the client certificate does not chain to the CMF's consumer roots (cmf.client_ca)"
                .into(),
        ));
    }
    next.run(request).await
}

/// SOL 013 9.2: the API consumer names the API version it uses in the `Version` header of
/// every request (the ETSI OpenAPI definitions make it `required: true` on every resource,
/// `api_versions` included). Missing: 400 (a malformed request, SOL 013 6.4); a version
/// this CMF does not serve: 406, both as ProblemDetails naming the supported versions.
pub async fn require_version(request: Request<Body>, next: Next) -> Response {
    let supported = SUPPORTED_VERSIONS.join(", ");
    let values: Vec<_> = request.headers().get_all("Version").iter().collect();
    let refusal = match values.as_slice() {
        [] => Some(CmfError::BadRequest(format!(
            "the Version header is required (SOL 013 9.2); this API serves version(s) {supported}"
        ))),
        [one] => match one.to_str() {
            Ok(version) if SUPPORTED_VERSIONS.contains(&version.trim()) => None,
            Ok(version) => Some(CmfError::NotAcceptable(format!(
                "API version '{}' is not supported; this API serves version(s) {supported} \
                 (GET /certmgmt/api_versions)",
                version.escape_debug()
            ))),
            Err(_) => Some(CmfError::NotAcceptable(format!(
                "the Version header is not text; this API serves version(s) {supported}"
            ))),
        },
        _ => Some(CmfError::BadRequest(format!(
            "more than one Version header; send one of {supported}"
        ))),
    };
    match refusal {
        Some(error) => problem_response(&error),
        None => next.run(request).await,
    }
}

/// A CmfError as ProblemDetails.
pub struct Problem(pub CmfError);

impl From<CmfError> for Problem {
    fn from(e: CmfError) -> Self {
        Problem(e)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        problem_response(&self.0)
    }
}

pub fn problem_response(error: &CmfError) -> Response {
    let mut response =
        super::problem_details(error.status(), Some(error.title()), &error.to_string());
    let headers = response.headers_mut();
    match error {
        CmfError::Unavailable(_) => {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        CmfError::Unauthenticated(_) => {
            // No HTTP auth scheme fits client certificates; name the mechanism.
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("TLS-client-certificate"),
            );
        }
        _ => {}
    }
    response
}

/// SOL 013 4.6: the `Version` header on every response.
pub async fn version_header(request: Request<Body>, next: Next) -> Response {
    let mut response = next.run(request).await;
    // Handlers of other APIs (the SM's callback) set their own.
    if !response.headers().contains_key("Version") {
        response
            .headers_mut()
            .insert("Version", HeaderValue::from_static(API_VERSION));
    }
    response
}

async fn method_not_allowed() -> Problem {
    Problem(CmfError::MethodNotAllowed(
        "this method is not supported on this resource".into(),
    ))
}

async fn api_versions() -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "uriPrefix": "/certmgmt/v1",
        "apiVersions": [{ "version": API_VERSION, "isDeprecated": false }],
    }))
}

async fn list_registrations(
    State(cmf): State<Arc<Cmf>>,
    Extension(identity): Extension<ClientIdentity>,
) -> Result<Response, Problem> {
    let consumer = cmf.consumer(identity.0.as_deref())?;
    let list = blocking(move || cmf.registrations(&consumer)).await?;
    Ok(Json(list).into_response())
}

async fn create_registration(
    State(cmf): State<Arc<Cmf>>,
    Extension(identity): Extension<ClientIdentity>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    let consumer = cmf.consumer(identity.0.as_deref())?;
    let request = json_body(&headers, body, cmf.max_body_bytes()).await?;
    let registration = cmf.register(&consumer, request).await?;
    let location = format!("/certmgmt/v1/registrations/{}", registration.id);
    let mut response = (StatusCode::CREATED, Json(registration)).into_response();
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    Ok(response)
}

async fn read_registration(
    State(cmf): State<Arc<Cmf>>,
    Extension(identity): Extension<ClientIdentity>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let consumer = cmf.consumer(identity.0.as_deref())?;
    let registration = blocking(move || cmf.registration(&consumer, &id)).await?;
    Ok(Json(registration).into_response())
}

async fn delete_registration(
    State(cmf): State<Arc<Cmf>>,
    Extension(identity): Extension<ClientIdentity>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let consumer = cmf.consumer(identity.0.as_deref())?;
    cmf.delete_registration(&consumer, &id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn sign_csr(
    State(cmf): State<Arc<Cmf>>,
    Extension(identity): Extension<ClientIdentity>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    let consumer = cmf.consumer(identity.0.as_deref())?;
    let request = json_body(&headers, body, cmf.max_body_bytes()).await?;
    let issued = cmf.sign_csr(&consumer, request).await?;
    Ok((StatusCode::CREATED, Json(issued)).into_response())
}

/// Content type, size limit and JSON decoding, each with its own status.
pub async fn json_body<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<T, CmfError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = content_type.split(';').next().unwrap_or("").trim();
    if !essence.eq_ignore_ascii_case("application/json") {
        return Err(CmfError::UnsupportedMediaType(format!(
            "Content-Type '{content_type}': expected application/json"
        )));
    }
    let bytes = read_body(headers, body, limit).await?;
    serde_json::from_slice(&bytes).map_err(|e| CmfError::BadRequest(format!("request body: {e}")))
}

/// The body, refusing more than `limit` bytes (413) before reading it where possible.
pub async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<axum::body::Bytes, CmfError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(CmfError::PayloadTooLarge(limit));
    }
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| CmfError::PayloadTooLarge(limit))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CmfError> + Send + 'static,
) -> Result<T, CmfError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CmfError::Internal(format!("worker: {e}")))?
}
