//! The SM's callback endpoint for the NFVO (SOL 005 6.4.18, SOL 013 8), and the OAuth 2.0
//! token endpoint the NFVO uses when the subscription asked for OAUTH2_CLIENT_CREDENTIALS.
//!
//! ```text
//! GET  /sm/v1/notifications     test notification endpoint          -> 204
//! POST /sm/v1/notifications     a notification, journaled durably   -> 204
//! POST /sm/v1/oauth2/token      RFC 6749 4.4 client credentials     -> 200 token
//! ```

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};

use super::{ClientIdentity, PeerCertificate};
use crate::sm::intake::{self, Credentials, Denied, Journaled};
use crate::sm::Sm;

/// The NS LCM notification interface version we implement (SOL 005 v3.7.1).
const NOTIFICATION_API_VERSION: &str = "2.3.0";

pub fn routes(sm: Arc<Sm>) -> Router {
    Router::new()
        .route(
            "/sm/v1/notifications",
            get(test_notification).post(notification),
        )
        .route("/sm/v1/oauth2/token", post(token))
        .route("/sm/v1/vim/alarms", post(aodh_alarm))
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(sm)
}

/// A ProblemDetails response of the notification interface (with its `Version`).
fn problem(status: u16, detail: &str) -> Response {
    versioned(super::problem_details(status, None, detail))
}

fn versioned(mut response: Response) -> Response {
    response.headers_mut().insert(
        "Version",
        HeaderValue::from_static(NOTIFICATION_API_VERSION),
    );
    response
}

fn no_content() -> Response {
    versioned(StatusCode::NO_CONTENT.into_response())
}

async fn method_not_allowed() -> Response {
    problem(405, "this method is not supported on this resource")
}

fn authenticate(
    sm: &Sm,
    headers: &HeaderMap,
    identity: &ClientIdentity,
    peer: &PeerCertificate,
) -> Option<Response> {
    let credentials = Credentials {
        authorization: headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok()),
        client_certificate: peer.0.as_deref().map(Vec::as_slice),
        client_identity: identity.0.as_deref(),
    };
    let denied = sm.intake.authenticate(&credentials).err()?;
    Some(match denied {
        Denied::Unauthenticated { challenge, detail } => {
            let mut response = problem(401, &detail);
            if let Ok(value) = HeaderValue::from_str(&challenge) {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, value);
            }
            response
        }
        Denied::Forbidden(detail) => problem(403, &detail),
    })
}

/// SOL 013 8.3.3: the NFVO tests the endpoint with a GET before it creates a subscription.
async fn test_notification(
    State(sm): State<Arc<Sm>>,
    Extension(identity): Extension<ClientIdentity>,
    Extension(peer): Extension<PeerCertificate>,
    headers: HeaderMap,
) -> Response {
    let response = authenticate(&sm, &headers, &identity, &peer).unwrap_or_else(no_content);
    negotiated(&sm, response)
}

/// The answer carries the NS LCM API version negotiated with the NFVO (SOL 013 4.9), which
/// is the version of the notifications it sends; the constant until then.
fn negotiated(sm: &Sm, mut response: Response) -> Response {
    if let Ok(value) = HeaderValue::from_str(&sm.nfvo.nslcm_version()) {
        response.headers_mut().insert("Version", value);
    }
    response
}

/// Authenticate, parse, journal durably, answer 204; processing happens after.
/// Aodh's REST alarm action (`alarm.state_transition`), HTTP basic authentication against
/// `[sm.telemetry.aodh]` (IFA 033 Security.005 source authentication). Journaled like the
/// AMQP events: it makes the SM re-read the VIM, it never enforces by itself.
async fn aodh_alarm(State(sm): State<Arc<Sm>>, headers: HeaderMap, body: Body) -> Response {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if let Err(detail) = sm.aodh_authenticate(authorization) {
        let mut response = problem(401, &detail);
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"warden-sm-vim\""),
        );
        return response;
    }
    let bytes = match super::cmf::read_body(&headers, body, sm.intake.max_body_bytes).await {
        Ok(b) => b,
        Err(_) => return problem(413, "the alarm is larger than the SM accepts"),
    };
    match sm.aodh_alarm(&bytes).await {
        Ok(_) => no_content(),
        Err(e) => problem(e.status(), &e.to_string()),
    }
}

async fn notification(
    State(sm): State<Arc<Sm>>,
    Extension(identity): Extension<ClientIdentity>,
    Extension(peer): Extension<PeerCertificate>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let response = receive(&sm, identity, peer, headers, body).await;
    negotiated(&sm, response)
}

async fn receive(
    sm: &Arc<Sm>,
    identity: ClientIdentity,
    peer: PeerCertificate,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Some(response) = authenticate(sm, &headers, &identity, &peer) {
        return response;
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    if let Err(detail) = intake::check_content_type(content_type) {
        return problem(415, &detail);
    }
    let limit = sm.intake.max_body_bytes;
    let bytes = match super::cmf::read_body(&headers, body, limit).await {
        Ok(b) => b,
        Err(_) => {
            return problem(
                413,
                &format!("the notification is larger than {limit} bytes"),
            )
        }
    };
    let parsed = match intake::parse(&bytes) {
        Ok(Some(n)) => n,
        Ok(None) => {
            tracing::debug!("notification of an unknown type ignored");
            return no_content();
        }
        Err(reason) => return problem(400, &reason),
    };
    let subscription = parsed.body["subscriptionId"].as_str().unwrap_or_default();
    if !sm.is_own_subscription(subscription) {
        return problem(
            422,
            &format!("subscriptionId {subscription} is not this SM's subscription"),
        );
    }
    let received = crate::keys::rfc3339_now();
    let key = intake::pending_key(&parsed.id);
    // The processor may start its (read-only) NFVO queries while the journal commit is in
    // flight; it acts only once told the notification is durable and new.
    let durable = sm.notify_received(key.clone(), parsed.body.clone());
    let queued = durable.is_some();
    let outcome = sm
        .journal
        .write_async(move |tx| intake::journal(tx, &parsed, &received, &key))
        .await;
    if let Some(durable) = durable {
        let _ = durable.send(matches!(outcome, Ok(Journaled::New(_))));
    }
    match outcome {
        Ok(Journaled::New(key)) => {
            if !queued {
                // The queue of bodies is full: the journal holds this one; hand over its key.
                sm.notify_stored(key);
            }
            no_content()
        }
        Ok(Journaled::Duplicate) | Ok(Journaled::Ignored) => no_content(),
        Err(e) => {
            // Not durable: the NFVO must not take it as delivered.
            if crate::log_limit::allow("sm.journal") {
                tracing::error!(error = %e, "journaling a notification");
            }
            let mut response = problem(503, "the notification could not be stored; retry");
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            response
        }
    }
}

async fn token(State(sm): State<Arc<Sm>>, headers: HeaderMap, body: Body) -> Response {
    let bytes = match super::cmf::read_body(&headers, body, 4096).await {
        Ok(b) => b,
        Err(_) => return problem(413, "token request too large"),
    };
    let form = String::from_utf8_lossy(&bytes);
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let (status, body) = match sm.intake.issue_token(authorization, &form) {
        Ok(token) => (200, token),
        Err(e) => (e.status, e.body),
    };
    let mut response = (
        StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
        body.to_string(),
    )
        .into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if status == 401 {
        h.insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"warden-sm\""),
        );
    }
    response
}
