//! The local admin API of the SM, on a Unix socket (mode 0600, the agent's user): what
//! `warden sm ...` talks to while the agent holds the store. The caller is identified by its
//! uid (SO_PEERCRED) in the audit chain.
//!
//! ```text
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
use serde_json::{json, Value};

use crate::sm::{ActionKind, Sm, SmError, TerminateOptions};

/// Who called, from the socket's peer credentials.
#[derive(Clone, Debug)]
pub struct Caller(pub String);

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
        .route("/sm/v1/security_vnfs", post(add_security_vnf))
        .route(
            "/sm/v1/security_vnfs/{vnf}",
            axum::routing::patch(modify_security_vnf).delete(remove_security_vnf),
        )
        .fallback(|| async { problem(404, "no such admin resource") })
        .with_state(sm)
}

/// Serve the admin API on `path` until `shutdown`.
pub async fn serve(
    path: &FsPath,
    sm: Arc<Sm>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    if path.exists() {
        // A socket left by a crash; a live agent would hold the store lock, so no other
        // agent is using it.
        std::fs::remove_file(path)?;
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let app = routes(sm);
    let mut shutdown = shutdown;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "admin socket accept");
                        continue;
                    }
                };
                let caller = match stream.peer_cred() {
                    Ok(cred) => format!("cli:uid={}", cred.uid()),
                    Err(_) => "cli:unknown".to_string(),
                };
                let app = app.clone().layer(Extension(Caller(caller)));
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
    Ok(())
}

fn problem(status: u16, detail: &str) -> Response {
    super::problem_details(status, None, detail)
}

fn error(e: SmError) -> Response {
    problem(e.status(), &e.to_string())
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
