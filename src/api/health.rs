//! Liveness, readiness and what systemd sees.
//!
//! ```text
//! GET /livez    200 while the process serves requests (liveness); no device, no store
//! GET /healthz  the same (kept for existing probes)
//! GET /readyz   200 or 503 with every check: can each configured key sign, does the store
//!               accept durable commits (the cached result of the readiness probe)
//! ```
//!
//! Both are unauthenticated, so neither touches a device nor the store: they read what the
//! background probe ([`crate::probe`]) found at its last round. A load balancer takes the
//! agent out of rotation on `/readyz`; a supervisor restarts it only on liveness (`/livez`,
//! systemd's watchdog): restarting does not bring a token or a disk back.
//!
//! systemd (`Type=notify`): `READY=1` once the listener is bound, `STATUS=` with the
//! readiness summary whenever it changes (shown by `systemctl status`), and `WATCHDOG=1`
//! every half `WatchdogSec=` from a task of the serving runtime, so a wedged event loop is
//! restarted by systemd.

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use crate::keys::backends::Backends;
use crate::probe::Probe;

/// What the health routes read: the cached probe and the configured backend types.
#[derive(Clone)]
pub struct Health {
    pub probe: Probe,
    /// The backend types, for the liveness body (read from the configuration, never from a
    /// device).
    pub backends: Vec<&'static str>,
}

impl Health {
    pub fn new(probe: Probe, backends: &Backends) -> Health {
        let mut kinds = Vec::new();
        if backends.pkcs11.is_some() {
            kinds.push("pkcs11");
        }
        if backends.tpm.is_some() {
            kinds.push("tpm");
        }
        Health {
            probe,
            backends: kinds,
        }
    }
}

/// `/livez`, `/healthz`, `/readyz`.
pub fn routes(health: Health) -> Router {
    Router::new()
        .route("/livez", get(livez))
        .route("/healthz", get(livez))
        .route("/readyz", get(readyz))
        .with_state(health)
}

/// The plain-HTTP metrics listener's routes: `/metrics`, and the same health routes for
/// probes that do not speak TLS.
pub fn metrics_routes(health: Health) -> Router {
    routes(health).route("/metrics", get(crate::metrics::handler))
}

/// The limits of the metrics listener (`[metrics]`): the HTTPS listener's mechanism
/// ([`super::serve_plain`]) with a small connection cap; no request of its own has a body.
pub fn metrics_limits(config: &crate::config::MetricsConfig) -> super::ServerLimits {
    use std::time::Duration;
    super::ServerLimits {
        // No TLS on this listener: the handshake limits are never used.
        handshake_timeout: Duration::from_secs(config.header_read_timeout_seconds),
        header_read_timeout: Duration::from_secs(config.header_read_timeout_seconds),
        body_read_timeout: Duration::from_secs(config.header_read_timeout_seconds),
        idle_timeout: Duration::from_secs(config.idle_timeout_seconds),
        max_connections: config.max_connections,
        max_handshakes: 1,
        max_concurrent_streams: 1,
        drain: Duration::from_secs(1),
    }
}

/// Serve [`metrics_routes`] on `listener` under `limits` until `shutdown` resolves.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    health: Health,
    limits: super::ServerLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    super::serve_plain(
        listener,
        metrics_routes(health),
        limits,
        std::sync::Arc::new(super::ServerStats::default()),
        shutdown,
    )
    .await;
}

async fn livez(State(health): State<Health>) -> Response {
    let backends: Vec<serde_json::Value> = health
        .backends
        .iter()
        .map(|kind| serde_json::json!({ "type": kind }))
        .collect();
    no_store(
        Json(serde_json::json!({
            "status": "ok",
            "version": env!("CARGO_PKG_VERSION"),
            "backends": backends,
        }))
        .into_response(),
    )
}

async fn readyz(State(health): State<Health>) -> Response {
    let readiness = health.probe.readiness();
    let ready = readiness.is_ready();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut response = (
        status,
        Json(serde_json::json!({
            "status": if ready { "ready" } else { "not ready" },
            "summary": readiness.summary(),
            "checks": readiness.checks,
        })),
    )
        .into_response();
    if !ready {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    }
    no_store(response)
}

fn no_store(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// systemd's view: `STATUS=` on every readiness change (and a log line), and the watchdog
/// when `WatchdogSec=` is set. Both run as tasks of the current (serving) runtime.
pub fn notify_systemd(probe: &Probe, serving: SocketAddr) {
    let mut changes = probe.subscribe();
    tokio::spawn(async move {
        let mut last = String::new();
        // The log gets a line when the state changes (which checks fail), not each time a
        // failing check's reason reads differently: a device away for an hour is one WARN,
        // not one per probe round. STATUS= always carries the latest reason.
        let mut last_state: Option<Vec<(String, bool)>> = None;
        loop {
            let (summary, ready, state) = {
                let readiness = changes.borrow_and_update();
                // Which checks fail, and whether each has been probed yet.
                let failing: Vec<(String, bool)> = readiness
                    .checks
                    .iter()
                    .filter(|c| !c.ready)
                    .map(|c| (c.name.clone(), c.checked_at.is_some()))
                    .collect();
                (readiness.summary(), readiness.is_ready(), failing)
            };
            if summary != last {
                if last_state.as_ref() != Some(&state) {
                    if last_state.is_none() || ready {
                        tracing::info!(%summary, "readiness");
                    } else {
                        tracing::warn!(%summary, "readiness");
                    }
                    last_state = Some(state);
                }
                let status = format!("serving on {serving}; {summary}");
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&status)]);
                last = summary;
            }
            if changes.changed().await.is_err() {
                return;
            }
        }
    });
    if let Some(timeout) = sd_notify::watchdog_enabled() {
        // sd_watchdog_enabled(3): ping at half the timeout. A ping comes only from a task
        // of this runtime, so it stops when the event loop does.
        let every = (timeout / 2).max(Duration::from_millis(100));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            }
        });
    }
}
