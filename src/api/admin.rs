//! The local admin API, on a Unix socket (mode 0600, the agent's user): what `warden check`,
//! `certs`, `audit`, `keys` and `sm` talk to while the agent holds the store and the devices.
//! Every running agent serves it. A caller whose uid (SO_PEERCRED) is neither the agent's
//! nor root is refused, whatever the socket's mode; the caller's uid goes into the audit
//! chain.
//!
//! ```text
//! GET    /ops/v1/check                       the agent's checks, with its open devices/store
//! GET    /ops/v1/certificates?consumer=&after=&limit=    a page of issued certificates
//! GET    /ops/v1/certificates/{serial}       one certificate, with its PEM
//! GET    /ops/v1/certificates/{serial}/pem?chain=true     PEM (and the CA chain)
//! POST   /ops/v1/certificates/{serial}/revoke  {reason}  revoke (audited with the caller)
//! GET    /ops/v1/audit/verify                the audit chain recomputed: entries, head hash
//! GET    /ops/v1/audit?after=&limit=         audit entries
//! GET    /ops/v1/keys                        keys of every backend
//! POST   /ops/v1/keys                        {backend, label, algorithm, purpose,
//!                                             vnfInstanceId}                      -> 201
//! GET    /ops/v1/keys/{key}                  one key (the reference percent-encoded)
//! DELETE /ops/v1/keys/{key}?vnfInstanceId=X  destroy, verify gone, record the erasure
//! POST   /ops/v1/keys/{key}/sign_test        {scheme, count}
//! GET    /ops/v1/registrations?consumer=     CMF registrations, every consumer's
//! POST   /ops/v1/registrations/{id}/transfer {to}: to another consumer, as policy permits
//! DELETE /ops/v1/registrations/{id}          deregister (as the consumer's DELETE does)
//!
//! (only with [sm] configured)
//! GET    /sm/v1/status                       NSs and VNFs, packages and integrity (6.3)
//! GET    /sm/v1/subscriptions                the NFVO's list
//! POST   /sm/v1/subscriptions                create or reconcile ours
//! DELETE /sm/v1/subscriptions/{id}
//! POST   /sm/v1/reconcile                    reconcile with the NFVO now
//! GET    /sm/v1/actions                      the enforcement journal
//! GET    /sm/v1/actions/{id}
//! POST   /sm/v1/actions/{id}/cancel            its unsent steps are never sent
//! POST   /sm/v1/terminations                 {vnfInstanceId, snapshot, allowReplacement,
//!                                             disablePackage, erase}            -> 202
//! GET    /sm/v1/erasures/{vnfInstanceId}     the VNF's erasure report
//! POST   /sm/v1/security_vnfs                {nsInstanceId, vnfInstanceId, vnfProfileId} -> 202
//! PATCH  /sm/v1/security_vnfs/{vnfId}        {nsInstanceId, vnfInstanceName, ...}       -> 202
//! DELETE /sm/v1/security_vnfs/{vnfId}?nsInstanceId=X                              -> 202
//! GET    /sm/v1/vim/...                      Sc-Vi queries (with [sm.vim]; src/vim/admin.rs)
//! ```

use std::os::unix::fs::PermissionsExt;
use std::path::Path as FsPath;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::cmf::Cmf;
use crate::config::Config;
use crate::keys::backends::Backends;
use crate::keys::KeyRef;
use crate::ops::{self, OpsError};
use crate::sm::{ActionKind, Sm, SmError, TerminateOptions};
use crate::store::Store;

/// Who called, from the socket's peer credentials: `cli:uid=N`.
#[derive(Clone, Debug)]
pub struct Caller(pub String);

/// What the admin API works with: the running agent's own configuration, devices and store.
#[derive(Clone)]
pub struct AdminState {
    pub config: Arc<Config>,
    pub backends: Backends,
    pub store: Arc<Store>,
    pub cmf: Option<Arc<Cmf>>,
    pub sm: Option<Arc<Sm>>,
}

/// Every admin route of this agent: the operator's, and the SM's when it runs.
pub fn router(state: AdminState) -> Router {
    let sm = state.sm.clone();
    let ops = Router::new()
        .route("/ops/v1/check", get(check))
        .route("/ops/v1/certificates", get(certificates))
        .route("/ops/v1/certificates/{serial}", get(certificate))
        .route("/ops/v1/certificates/{serial}/pem", get(certificate_pem))
        .route(
            "/ops/v1/certificates/{serial}/revoke",
            post(certificate_revoke),
        )
        .route("/ops/v1/audit/verify", get(audit_verify))
        .route("/ops/v1/audit", get(audit_list))
        .route("/ops/v1/keys", get(keys_list).post(keys_generate))
        .route("/ops/v1/keys/{key}", get(key_show).delete(key_destroy))
        .route("/ops/v1/keys/{key}/sign_test", post(key_sign_test))
        .route("/ops/v1/registrations", get(registrations_list))
        .route(
            "/ops/v1/registrations/{id}",
            axum::routing::delete(registration_delete),
        )
        .route(
            "/ops/v1/registrations/{id}/transfer",
            post(registration_transfer),
        )
        .route("/cmf/v1/direct/vnfs", get(direct_vnfs))
        .route("/cmf/v1/direct/vnfcs/{id}", get(direct_vnfc))
        .with_state(Arc::new(state));
    match sm {
        Some(sm) => ops
            .merge(routes(sm.clone()))
            .merge(crate::vim::admin::routes(sm)),
        None => ops.route(
            "/sm/v1/{*rest}",
            axum::routing::any(|| async {
                problem(
                    404,
                    "this agent runs no Security Manager ([sm] is not configured)",
                )
            }),
        ),
    }
    .fallback(|| async { problem(404, "no such admin resource") })
}

pub fn routes(sm: Arc<Sm>) -> Router {
    Router::new()
        .route("/sm/v1/status", get(status))
        .route("/sm/v1/subscriptions", get(subscriptions).post(subscribe))
        .route(
            "/sm/v1/subscriptions/{id}",
            axum::routing::delete(unsubscribe),
        )
        .route("/sm/v1/reconcile", post(reconcile))
        .route("/sm/v1/actions", get(actions))
        .route("/sm/v1/actions/{id}", get(action))
        .route("/sm/v1/actions/{id}/cancel", post(cancel_action))
        .route("/sm/v1/terminations", post(terminate))
        .route("/sm/v1/erasures/{vnf}", get(erasure))
        .route("/sm/v1/vim/events", get(vim_events))
        .route("/sm/v1/hosts/{host}/out_of_use", post(host_out_of_use))
        .route("/sm/v1/security_vnfs", post(add_security_vnf))
        .route(
            "/sm/v1/security_vnfs/{vnf}",
            axum::routing::patch(modify_security_vnf).delete(remove_security_vnf),
        )
        .with_state(sm)
}

/// Bind the admin socket at `path`, mode 0600, replacing a socket left by a crash. Done
/// before the agent reports itself ready, so the socket is there once it is.
pub fn bind(path: &FsPath) -> std::io::Result<tokio::net::UnixListener> {
    if path.exists() {
        // A socket left by a crash; a live agent would hold the store lock, so no other
        // agent is using it.
        std::fs::remove_file(path)?;
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    // Created 0600 by bind itself (umask 0177 around it) rather than chmod-ed afterwards,
    // so there is no moment in which another user could connect. The umask is process-wide:
    // this runs at start, before any request could make the agent create a file, and a file
    // created meanwhile would only get a narrower mode.
    let old = umask(0o177);
    let bound = tokio::net::UnixListener::bind(path);
    umask(old);
    let listener = bound?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serve the admin API on `listener` (bound at `path`) until `shutdown`, then remove the
/// socket.
pub async fn serve(
    listener: tokio::net::UnixListener,
    path: &FsPath,
    state: AdminState,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let app = router(state);
    // SAFETY: geteuid has no preconditions and cannot fail.
    let own_uid = unsafe { libc::geteuid() };
    let mut shutdown = shutdown;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        // EMFILE and the like: wait for the resource rather than spin.
                        tracing::warn!(error = %e, "admin socket accept");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let uid = stream.peer_cred().ok().map(|cred| cred.uid());
                let app = match uid {
                    Some(uid) if uid == own_uid || uid == 0 => {
                        app.clone().layer(Extension(Caller(format!("cli:uid={uid}"))))
                    }
                    other => {
                        tracing::warn!(uid = ?other, "admin socket: caller refused");
                        let detail = match other {
                            Some(uid) => format!(
                                "uid {uid} may not use the admin socket (only uid {own_uid}, the agent's, and root)"
                            ),
                            None => "the caller's uid is unknown (SO_PEERCRED failed)".to_string(),
                        };
                        Router::new().fallback(move || {
                            let detail = detail.clone();
                            async move { problem(403, &detail) }
                        })
                    }
                };
                tokio::spawn(async move {
                    let service = TowerToHyperService::new(app);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            _ = shutdown.changed() => break,
        }
    }
    let _ = std::fs::remove_file(path);
}

fn umask(mask: libc::mode_t) -> libc::mode_t {
    // SAFETY: umask has no preconditions and cannot fail; it returns the previous mask.
    unsafe { libc::umask(mask) }
}

/// Run an operation on a blocking thread (store and device work) and answer with its JSON.
async fn blocking<T, F>(status: StatusCode, f: F) -> Response
where
    T: serde::Serialize + Send + 'static,
    F: FnOnce() -> Result<T, OpsError> + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(value)) => (status, Json(value)).into_response(),
        Ok(Err(e)) => ops_error(&e),
        Err(e) => problem(500, &format!("operation failed: {e}")),
    }
}

fn ops_error(e: &OpsError) -> Response {
    problem(e.status(), &crate::error::chain(e))
}

/// CMF direct mode: the VNF inventory (`warden cmf vnfs`).
async fn direct_vnfs(State(state): State<Arc<AdminState>>) -> Response {
    let store = state.store.clone();
    match tokio::task::spawn_blocking(move || crate::cmf::direct::vnfs_view(&store)).await {
        Ok(Ok(view)) => Json(view).into_response(),
        Ok(Err(e)) => problem(503, &format!("store: {e}")),
        Err(e) => problem(500, &e.to_string()),
    }
}

/// CMF direct mode: one VNFC (`warden cmf vnfc`).
async fn direct_vnfc(State(state): State<Arc<AdminState>>, Path(id): Path<String>) -> Response {
    let store = state.store.clone();
    match tokio::task::spawn_blocking(move || crate::cmf::direct::vnfc_view(&store, &id)).await {
        Ok(Ok(Some(view))) => Json(view).into_response(),
        Ok(Ok(None)) => problem(404, "no such VNFC in the direct-mode inventory"),
        Ok(Err(e)) => problem(503, &format!("store: {e}")),
        Err(e) => problem(500, &e.to_string()),
    }
}

async fn check(State(state): State<Arc<AdminState>>) -> Response {
    blocking(StatusCode::OK, move || {
        Ok(ops::check::AgentCheck {
            pid: std::process::id(),
            lines: ops::check::running(
                &state.config,
                &state.backends,
                &state.store,
                state.cmf.as_deref(),
            ),
        })
    })
    .await
}

async fn certificates(
    State(state): State<Arc<AdminState>>,
    Query(query): Query<ops::certs::CertificateQuery>,
) -> Response {
    blocking(StatusCode::OK, move || {
        ops::certs::list(&state.store, &query)
    })
    .await
}

async fn certificate(State(state): State<Arc<AdminState>>, Path(serial): Path<String>) -> Response {
    blocking(StatusCode::OK, move || {
        ops::certs::show(&state.store, &serial)
    })
    .await
}

#[derive(Deserialize)]
struct PemQuery {
    #[serde(default)]
    chain: bool,
}

async fn certificate_pem(
    State(state): State<Arc<AdminState>>,
    Path(serial): Path<String>,
    Query(query): Query<PemQuery>,
) -> Response {
    blocking(StatusCode::OK, move || {
        ops::certs::export(&state.store, &state.config, &serial, query.chain)
            .map(|pem| json!({ "pem": pem }))
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    #[serde(default)]
    reason: Option<String>,
}

async fn certificate_revoke(
    State(state): State<Arc<AdminState>>,
    Extension(caller): Extension<Caller>,
    Path(serial): Path<String>,
    Json(body): Json<RevokeBody>,
) -> Response {
    let Some(cmf) = &state.cmf else {
        return problem(
            409,
            "this agent does not run the CMF ([cmf] is not configured): nothing to revoke",
        );
    };
    let reason = match body.reason.as_deref() {
        None => crate::cmf::revoke::RevocationReason::Unspecified,
        Some(text) => match text.parse::<crate::cmf::revoke::RevocationReason>() {
            Ok(reason) => reason,
            Err(e) => return problem(400, &e),
        },
    };
    match cmf.revoke_by_operator(&serial, reason, &caller.0).await {
        Ok(status) => (StatusCode::OK, Json(status)).into_response(),
        Err(e) => problem(e.status(), &e.to_string()),
    }
}

async fn registrations_list(
    State(state): State<Arc<AdminState>>,
    Query(query): Query<ops::registrations::RegistrationQuery>,
) -> Response {
    blocking(StatusCode::OK, move || {
        ops::registrations::list(&state.store, &state.config, &query)
    })
    .await
}

async fn registration_transfer(
    State(state): State<Arc<AdminState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Json(request): Json<ops::registrations::TransferRequest>,
) -> Response {
    blocking(StatusCode::OK, move || {
        // The running CMF's policy; an agent without [cmf] has none to transfer under.
        let policies = match &state.cmf {
            Some(cmf) => cmf.policies().clone(),
            None => crate::cmf::names::Policies::from_config(&state.config)
                .map_err(OpsError::Refused)?,
        };
        ops::registrations::transfer(
            &state.store,
            &state.config,
            &policies,
            &id,
            &request.to,
            &caller.0,
        )
    })
    .await
}

async fn registration_delete(
    State(state): State<Arc<AdminState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Response {
    let cmf = state.cmf.clone();
    blocking(StatusCode::OK, move || {
        let (registration, revoked) = ops::registrations::delete(&state.store, &id, &caller.0)?;
        // The running agent remakes the CRLs of the CAs that just got revocations.
        if let Some(cmf) = &cmf {
            cmf.crl_signal.mark(
                revoked
                    .revoked
                    .iter()
                    .filter_map(|key| key.split_once('/').map(|(ca, _)| ca.to_string())),
            );
        }
        Ok(registration)
    })
    .await
}

async fn audit_verify(State(state): State<Arc<AdminState>>) -> Response {
    blocking(StatusCode::OK, move || ops::audit::verify(&state.store)).await
}

#[derive(Deserialize)]
struct AuditQuery {
    after: Option<u64>,
    limit: Option<usize>,
}

async fn audit_list(
    State(state): State<Arc<AdminState>>,
    Query(query): Query<AuditQuery>,
) -> Response {
    blocking(StatusCode::OK, move || {
        ops::audit::list(&state.store, query.after, query.limit.unwrap_or(20))
    })
    .await
}

async fn keys_list(State(state): State<Arc<AdminState>>) -> Response {
    blocking(StatusCode::OK, move || {
        ops::keys::list(&state.backends, Some(&state.store))
    })
    .await
}

async fn keys_generate(
    State(state): State<Arc<AdminState>>,
    Extension(caller): Extension<Caller>,
    Json(request): Json<ops::keys::GenerateRequest>,
) -> Response {
    blocking(StatusCode::CREATED, move || {
        ops::keys::generate(&state.backends, &state.store, &request, &caller.0)
    })
    .await
}

fn key_ref(text: &str) -> Result<KeyRef, Box<Response>> {
    text.parse::<KeyRef>()
        .map_err(|e| Box::new(problem(400, &e.to_string())))
}

async fn key_show(State(state): State<Arc<AdminState>>, Path(key): Path<String>) -> Response {
    let key = match key_ref(&key) {
        Ok(k) => k,
        Err(r) => return *r,
    };
    blocking(StatusCode::OK, move || {
        ops::keys::show(&state.backends, &key)
    })
    .await
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DestroyQuery {
    vnf_instance_id: Option<String>,
}

async fn key_destroy(
    State(state): State<Arc<AdminState>>,
    Extension(caller): Extension<Caller>,
    Path(key): Path<String>,
    Query(query): Query<DestroyQuery>,
) -> Response {
    let key = match key_ref(&key) {
        Ok(k) => k,
        Err(r) => return *r,
    };
    blocking(StatusCode::OK, move || {
        ops::keys::destroy(
            &state.backends,
            &state.store,
            &key,
            query.vnf_instance_id,
            &caller.0,
        )
    })
    .await
}

#[derive(Deserialize)]
struct SignTestRequest {
    scheme: Option<String>,
    #[serde(default)]
    count: Option<u32>,
}

async fn key_sign_test(
    State(state): State<Arc<AdminState>>,
    Path(key): Path<String>,
    Json(request): Json<SignTestRequest>,
) -> Response {
    let key = match key_ref(&key) {
        Ok(k) => k,
        Err(r) => return *r,
    };
    let scheme = match request.scheme.as_deref().map(str::parse) {
        Some(Ok(s)) => Some(s),
        Some(Err(e)) => return problem(400, &format!("scheme: {e}")),
        None => None,
    };
    blocking(StatusCode::OK, move || {
        ops::keys::sign_test(&state.backends, &key, scheme, request.count.unwrap_or(1))
    })
    .await
}

fn problem(status: u16, detail: &str) -> Response {
    super::problem_details(status, None, detail)
}

fn error(e: SmError) -> Response {
    // The whole cause chain (e.g. the ENOSPC under a store error), on one line.
    problem(e.status(), &crate::error::chain(&e))
}

fn accepted(value: Value) -> Response {
    (StatusCode::ACCEPTED, Json(value)).into_response()
}

async fn status(State(sm): State<Arc<Sm>>) -> Response {
    match sm.status().await {
        Ok(v) => Json(v).into_response(),
        Err(e) => error(e),
    }
}

async fn subscriptions(State(sm): State<Arc<Sm>>) -> Response {
    match sm.subscriptions().await {
        Ok(v) => Json(v).into_response(),
        Err(e) => error(e),
    }
}

async fn subscribe(State(sm): State<Arc<Sm>>) -> Response {
    match sm.reconcile_subscription().await {
        Ok(id) => Json(json!({ "id": id, "callbackUri": sm.callback_uri })).into_response(),
        Err(e) => error(e),
    }
}

async fn unsubscribe(State(sm): State<Arc<Sm>>, Path(id): Path<String>) -> Response {
    match sm.delete_subscription(&id).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => error(e),
    }
}

async fn reconcile(State(sm): State<Arc<Sm>>) -> Response {
    match sm.reconcile_now().await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => error(e),
    }
}

async fn actions(State(sm): State<Arc<Sm>>) -> Response {
    match sm.actions().await {
        Ok(v) => Json(v).into_response(),
        Err(e) => error(e),
    }
}

#[derive(serde::Deserialize)]
struct EventsQuery {
    limit: Option<usize>,
}

/// The journaled Sc-Vi events (AMQP and Aodh), newest last.
async fn vim_events(
    State(sm): State<Arc<Sm>>,
    axum::extract::Query(q): axum::extract::Query<EventsQuery>,
) -> Response {
    match sm.vi_events(q.limit.unwrap_or(100)).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => error(e),
    }
}

/// SecEnforce.004: take a host out of use (body: `{"disposition": "migrate"|"terminate"}`,
/// optional; the policy's otherwise).
async fn host_out_of_use(
    State(sm): State<Arc<Sm>>,
    Extension(caller): Extension<Caller>,
    Path(host): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let request: crate::sm::hosts::OutOfUseRequest = if body.is_empty() {
        Default::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => return problem(400, &format!("the request: {e}")),
        }
    };
    match sm.host_out_of_use(&host, request, &caller.0).await {
        Ok(a) => (axum::http::StatusCode::ACCEPTED, Json(a)).into_response(),
        Err(e) => error(e),
    }
}

async fn action(State(sm): State<Arc<Sm>>, Path(id): Path<String>) -> Response {
    match sm.action(&id).await {
        Ok(Some(a)) => Json(a).into_response(),
        Ok(None) => problem(404, &format!("no action {id}")),
        Err(e) => error(e),
    }
}

async fn cancel_action(
    State(sm): State<Arc<Sm>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Response {
    match sm.cancel(&id, &caller.0).await {
        Ok(a) => Json(a).into_response(),
        Err(e) => error(e),
    }
}

async fn erasure(State(sm): State<Arc<Sm>>, Path(vnf): Path<String>) -> Response {
    match sm.erasure_report(&vnf).await {
        Ok(Some(r)) => Json(r).into_response(),
        Ok(None) => problem(404, &format!("no erasure report for VNF instance {vnf}")),
        Err(e) => error(e),
    }
}

fn field<'a>(body: &'a Value, name: &str) -> Result<&'a str, Box<Response>> {
    body[name]
        .as_str()
        .ok_or_else(|| Box::new(problem(400, &format!("'{name}' is required"))))
}

async fn terminate(
    State(sm): State<Arc<Sm>>,
    Extension(caller): Extension<Caller>,
    Json(body): Json<Value>,
) -> Response {
    let vnf = match field(&body, "vnfInstanceId") {
        Ok(v) => v.to_string(),
        Err(r) => return *r,
    };
    let flag = |name: &str| body[name].as_bool().unwrap_or(false);
    let options = TerminateOptions {
        snapshot: flag("snapshot"),
        allow_replacement: flag("allowReplacement"),
        disable_package: flag("disablePackage"),
        erase: flag("erase"),
    };
    match sm.terminate(&vnf, options, &caller.0).await {
        Ok(action) => accepted(serde_json::to_value(action).unwrap_or_default()),
        Err(e) => error(e),
    }
}

async fn add_security_vnf(
    State(sm): State<Arc<Sm>>,
    Extension(caller): Extension<Caller>,
    Json(body): Json<Value>,
) -> Response {
    let (ns, vnf) = match (field(&body, "nsInstanceId"), field(&body, "vnfInstanceId")) {
        (Ok(ns), Ok(vnf)) => (ns.to_string(), vnf.to_string()),
        (Err(r), _) | (_, Err(r)) => return *r,
    };
    security(&sm, ActionKind::SecurityVnfAdd, &ns, &vnf, &body, &caller).await
}

async fn modify_security_vnf(
    State(sm): State<Arc<Sm>>,
    Extension(caller): Extension<Caller>,
    Path(vnf): Path<String>,
    Json(body): Json<Value>,
) -> Response {
    let ns = match field(&body, "nsInstanceId") {
        Ok(ns) => ns.to_string(),
        Err(r) => return *r,
    };
    security(
        &sm,
        ActionKind::SecurityVnfModify,
        &ns,
        &vnf,
        &body,
        &caller,
    )
    .await
}

async fn remove_security_vnf(
    State(sm): State<Arc<Sm>>,
    Extension(caller): Extension<Caller>,
    Path(vnf): Path<String>,
    Query(query): Query<std::collections::BTreeMap<String, String>>,
) -> Response {
    let Some(ns) = query.get("nsInstanceId") else {
        return problem(400, "'nsInstanceId' query parameter is required");
    };
    security(
        &sm,
        ActionKind::SecurityVnfRemove,
        ns,
        &vnf,
        &Value::Null,
        &caller,
    )
    .await
}

async fn security(
    sm: &Arc<Sm>,
    kind: ActionKind,
    ns: &str,
    vnf: &str,
    body: &Value,
    caller: &Caller,
) -> Response {
    match sm.security_vnf(kind, ns, vnf, body, &caller.0).await {
        Ok(action) => accepted(serde_json::to_value(action).unwrap_or_default()),
        Err(e) => error(e),
    }
}
