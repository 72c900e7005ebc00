//! The revocation listener: CRLs (RFC 5280 5, served as RFC 2585 / RFC 8555-style
//! `application/pkix-crl`) and the OCSP responder (RFC 6960 A.1: GET with the base64 request
//! in the path, POST `application/ocsp-request`), over plain HTTP on a listener of its own.
//!
//! Why its own plain-HTTP listener: relying parties fetch CRLs and OCSP responses without
//! client certificates, and many (openssl, most TLS stacks) do not fetch them over TLS at all,
//! since that could need the very revocation check being made (RFC 5280 8, RFC 6960 A.1).
//! The answers are signed, so the transport adds no integrity. Keeping them off the mTLS
//! listener also keeps that listener's "every CMF resource needs a client certificate" rule
//! whole. The listener is bounded like the others: at most `max_connections` open (more are
//! closed at once), `read_timeout_seconds` for request headers (and between requests on a
//! kept-alive connection) and for an OCSP POST body, `ocsp_max_request_bytes` per request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use base64::Engine;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

use crate::cmf::ocsp::{error_response, OcspError};
use crate::cmf::Cmf;

/// What the handlers share.
#[derive(Clone)]
struct Revocation {
    cmf: Arc<Cmf>,
    max_request: usize,
    read_timeout: Duration,
}

/// `/crl/{caId}.crl`, `/ocsp` (POST) and `/ocsp/{base64}` (GET).
pub fn routes(cmf: Arc<Cmf>) -> Router {
    let settings = &cmf.crls().settings;
    let state = Revocation {
        max_request: settings.ocsp_max_request_bytes,
        read_timeout: Duration::from_secs(settings.read_timeout_seconds),
        cmf: cmf.clone(),
    };
    Router::new()
        .route("/crl/{file}", get(crl))
        .route("/ocsp", axum::routing::post(ocsp))
        .route("/ocsp/", axum::routing::post(ocsp))
        .route("/ocsp/{*request}", get(ocsp))
        .fallback(not_found)
        .with_state(state)
        .layer(axum::middleware::from_fn(count_request))
}

/// Count each answered request in `/metrics` (`warden_revocation_requests_total`).
async fn count_request(request: Request, next: axum::middleware::Next) -> Response {
    let path = request.uri().path();
    let kind = if path.starts_with("/crl/") {
        "crl"
    } else if path == "/ocsp" || path.starts_with("/ocsp/") {
        "ocsp"
    } else {
        "other"
    };
    let response = next.run(request).await;
    crate::metrics::global()
        .revocation_requests
        .get_or_create(&crate::metrics::RevocationRequestLabels {
            kind,
            status: response.status().as_u16(),
        })
        .inc();
    response
}

/// `http://{address}` of the bound listener; when it listens on every address, the first DNS
/// name of the agent's TLS certificate instead (what relying parties can resolve).
pub fn default_base_url(
    bound: std::net::SocketAddr,
    server: &crate::config::ServerConfig,
) -> Result<String, String> {
    if !bound.ip().is_unspecified() {
        return Ok(format!("http://{bound}"));
    }
    let pem = std::fs::read_to_string(&server.tls_certificate)
        .map_err(|e| format!("{}: {e}", server.tls_certificate.display()))?;
    let leaf = crate::pki::certificates_from_pem(&pem)?.remove(0);
    let name = leaf
        .tbs_certificate()
        .get_extension::<x509_cert::ext::pkix::SubjectAltName>()
        .ok()
        .flatten()
        .and_then(|(_, san)| {
            san.0.into_iter().find_map(|n| match n {
                x509_cert::ext::pkix::name::GeneralName::DnsName(d) => Some(d.to_string()),
                _ => None,
            })
        })
        .ok_or_else(|| {
            format!(
                "cmf.revocation: listening on {bound}, and the TLS certificate has no DNS name \
                 to publish: set cmf.revocation.base_url"
            )
        })?;
    Ok(format!("http://{name}:{}", bound.port()))
}

/// The consumer's revocation task resource on the CMF API (mTLS), in SOL 013 task-resource
/// style (5.4.1.2: a POST on `{resource}/{task}`), beside the IFA 033 resources:
///
/// ```text
/// POST /certmgmt/v1/certificates/{serialNumber}/revoke   {"reason": "keyCompromise"}  -> 200
/// ```
///
/// The body is optional (reason `unspecified`). Only the consumer that requested a
/// certificate can revoke it; any other serial is 404, so serials of other consumers are not
/// disclosed. A certificate revoked before is 200 with `revokedNow: false` and the first
/// revocation's time and reason (idempotent).
pub fn consumer_routes(cmf: Arc<Cmf>) -> Router {
    Router::new()
        .route(
            "/certmgmt/v1/certificates/{serial}/revoke",
            axum::routing::post(consumer_revoke),
        )
        // A resource of the CMF API: the SOL 013 `Version` header as on every other one.
        .route_layer(axum::middleware::from_fn(super::cmf::require_version))
        .with_state(cmf)
}

async fn consumer_revoke(
    State(cmf): State<Arc<Cmf>>,
    axum::Extension(identity): axum::Extension<super::ClientIdentity>,
    axum::extract::Path(serial): axum::extract::Path<String>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Result<Response, super::cmf::Problem> {
    use crate::cmf::revoke::{RevocationReason, RevokeRequest};
    use crate::cmf::CmfError;
    let consumer = cmf.consumer(identity.0.as_deref())?;
    let empty = match headers.get(header::CONTENT_LENGTH) {
        Some(length) => length.as_bytes() == b"0",
        None => !headers.contains_key(header::TRANSFER_ENCODING),
    };
    let request: RevokeRequest = if empty {
        RevokeRequest::default()
    } else {
        super::cmf::json_body(&headers, body, cmf.max_body_bytes()).await?
    };
    let reason = match request.reason.as_deref() {
        None => RevocationReason::Unspecified,
        Some(text) => text
            .parse::<RevocationReason>()
            .map_err(CmfError::BadRequest)?,
    };
    let status = cmf.revoke_by_consumer(&consumer, &serial, reason).await?;
    Ok(axum::Json(status).into_response())
}

/// Counters of the revocation listener.
#[derive(Debug, Default)]
pub struct RevocationStats {
    pub connections_refused: AtomicU64,
}

/// Serve `app` over plain HTTP/1.1 until `shutdown` resolves (then in-flight requests get a
/// few seconds).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    max_connections: usize,
    read_timeout: Duration,
    stats: Arc<RevocationStats>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let connections = Arc::new(tokio::sync::Semaphore::new(max_connections.max(1)));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(read_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (tcp, _) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        if crate::log_limit::allow("revocation.accept") {
                            tracing::warn!(error = %e, "revocation listener: accept failed");
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(permit) = connections.clone().try_acquire_owned() else {
                    stats.connections_refused.fetch_add(1, Ordering::Relaxed);
                    crate::metrics::global().revocation_connections_refused.inc();
                    if crate::log_limit::allow("revocation.refused") {
                        tracing::warn!(max_connections, "revocation listener: connection cap reached, closing new connections");
                    }
                    drop(tcp);
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let connection = builder.serve_connection(
                    TokioIo::new(tcp),
                    TowerToHyperService::new(app.clone()),
                );
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    let _ = connection.await;
                    drop(permit);
                });
            }
            _ = &mut shutdown => break,
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
}

async fn crl(
    State(state): State<Revocation>,
    axum::extract::Path(file): axum::extract::Path<String>,
) -> Response {
    let Some(ca_id) = file.strip_suffix(".crl") else {
        return problem(
            404,
            &format!("no resource /crl/{file}: CRLs are /crl/{{caId}}.crl"),
        );
    };
    if !state.cmf.cas().iter().any(|ca| ca.id == ca_id) {
        return problem(404, &format!("no CA '{ca_id}'"));
    }
    let Some(current) = state.cmf.current_crl(ca_id) else {
        let mut response = problem(
            503,
            &format!("the CRL of '{ca_id}' has not been made yet (the CA key may be unavailable)"),
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("10"));
        return response;
    };
    let mut response = (StatusCode::OK, Body::from(current.der.to_vec())).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/pkix-crl"),
    );
    headers.insert(header::CACHE_CONTROL, cache_until(current.next_update));
    if let Ok(modified) = HeaderValue::from_str(&httpdate::fmt_http_date(current.this_update)) {
        headers.insert(header::LAST_MODIFIED, modified);
    }
    response
}

/// OCSP over HTTP (RFC 6960 A.1): the request from the path (GET) or the body (POST).
async fn ocsp(State(state): State<Revocation>, request: Request) -> Response {
    let der = match *request.method() {
        Method::GET => {
            let path = request.uri().path();
            let encoded = path.strip_prefix("/ocsp/").unwrap_or_default();
            if encoded.len() > state.max_request * 2 {
                return problem(414, "OCSP request too long");
            }
            let decoded = percent_encoding::percent_decode_str(encoded).collect::<Vec<u8>>();
            let text: Vec<u8> = decoded
                .into_iter()
                .filter(|b| !b.is_ascii_whitespace())
                .collect();
            match base64::engine::general_purpose::STANDARD.decode(&text) {
                Ok(der) => der,
                Err(_) => {
                    return ocsp_error(&OcspError::Malformed("the path is not base64".into()))
                }
            }
        }
        _ => {
            let content_type = request
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_ascii_lowercase();
            if !content_type.starts_with("application/ocsp-request") {
                return problem(
                    415,
                    "an OCSP request is POSTed as application/ocsp-request (RFC 6960 A.1)",
                );
            }
            let body = axum::body::to_bytes(request.into_body(), state.max_request);
            match tokio::time::timeout(state.read_timeout, body).await {
                Ok(Ok(bytes)) => bytes.to_vec(),
                Ok(Err(_)) => {
                    return problem(
                        413,
                        &format!("OCSP request larger than {} bytes", state.max_request),
                    )
                }
                Err(_) => return problem(408, "the request body did not arrive in time"),
            }
        }
    };
    match state.cmf.ocsp(&der).await {
        Ok(answer) => {
            let mut response = (StatusCode::OK, Body::from(answer.der)).into_response();
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/ocsp-response"),
            );
            headers.insert(
                header::CACHE_CONTROL,
                if answer.nonce {
                    HeaderValue::from_static("no-store")
                } else {
                    cache_until(answer.next_update)
                },
            );
            response
        }
        Err(e) => ocsp_error(&e),
    }
}

/// An OCSP error status (RFC 6960 2.3) is an OCSP response, HTTP 200: OCSP clients read the
/// status from the body.
fn ocsp_error(error: &OcspError) -> Response {
    match error {
        OcspError::Internal(_) | OcspError::TryLater(_) => {
            if crate::log_limit::allow("revocation.ocsp") {
                tracing::warn!(error = %error, "OCSP request not answered");
            }
        }
        _ => tracing::debug!(error = %error, "OCSP request refused"),
    }
    let mut response = (StatusCode::OK, Body::from(error_response(error.status()))).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/ocsp-response"),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// RFC 5019 6.2 style caching: until the object's nextUpdate.
fn cache_until(next_update: SystemTime) -> HeaderValue {
    let seconds = next_update
        .duration_since(SystemTime::now())
        .map(|d| d.as_secs())
        .unwrap_or(0);
    HeaderValue::from_str(&format!(
        "max-age={seconds}, public, no-transform, must-revalidate"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("no-cache"))
}

fn problem(status: u16, detail: &str) -> Response {
    super::problem_details(status, None, detail)
}

async fn not_found(uri: axum::http::Uri) -> Response {
    problem(404, &format!("no resource at {}", uri.path()))
}
