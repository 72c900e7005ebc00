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
        .with_state(cmf)
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
