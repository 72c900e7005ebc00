//! The CMF's attestation resources beside Register, an extension of IFA 033 11.2 (which
//! leaves the anchoring of attesters and freshness to local policy); ProblemDetails errors
//! and mutual TLS as on every CMF resource. Semantics: [`crate::cmf::attest::service`].
//!
//! ```text
//! POST /certmgmt/v1/registrations/{registrationId}/attestation_nonces                   -> 201
//! POST /certmgmt/v1/registrations/{registrationId}/ak_challenges                        -> 201 + Location
//! POST /certmgmt/v1/registrations/{registrationId}/ak_challenges/{challengeId}/answer   -> 200
//! ```

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Json, Router};

use super::cmf::{json_body, Problem};
use super::ClientIdentity;
use crate::cmf::Cmf;

pub fn routes(cmf: Arc<Cmf>) -> Router {
    Router::new()
        .route(
            "/certmgmt/v1/registrations/{id}/attestation_nonces",
            post(create_nonce),
        )
        .route(
            "/certmgmt/v1/registrations/{id}/ak_challenges",
            post(create_challenge),
        )
        .route(
            "/certmgmt/v1/registrations/{id}/ak_challenges/{challenge}/answer",
            post(answer_challenge),
        )
        // Resources of the CMF API: the SOL 013 `Version` header as on every other one.
        .route_layer(axum::middleware::from_fn(super::cmf::require_version))
        .with_state(cmf)
}

async fn create_nonce(
    State(cmf): State<Arc<Cmf>>,
    Extension(identity): Extension<ClientIdentity>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let consumer = cmf.consumer(identity.0.as_deref())?;
    let nonce = cmf.attestation_nonce(&consumer, &id).await?;
    Ok((StatusCode::CREATED, Json(nonce)).into_response())
}

async fn create_challenge(
    State(cmf): State<Arc<Cmf>>,
    Extension(identity): Extension<ClientIdentity>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    let consumer = cmf.consumer(identity.0.as_deref())?;
    let request = json_body(&headers, body, cmf.max_body_bytes()).await?;
    let (location, challenge) = cmf.ak_challenge(&consumer, &id, request).await?;
    let mut response = (StatusCode::CREATED, Json(challenge)).into_response();
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    Ok(response)
}

async fn answer_challenge(
    State(cmf): State<Arc<Cmf>>,
    Extension(identity): Extension<ClientIdentity>,
    Path((id, challenge)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    let consumer = cmf.consumer(identity.0.as_deref())?;
    let answer = json_body(&headers, body, cmf.max_body_bytes()).await?;
    let registration = cmf
        .answer_ak_challenge(&consumer, &id, &challenge, answer)
        .await?;
    Ok(Json(registration).into_response())
}
