//! Prometheus metrics: one process-wide registry ([`global`]), exposed in the OpenMetrics text
//! format (`GET /metrics`) on a plain-HTTP listener the operator chooses (`[metrics] listen`,
//! loopback by convention, like a node exporter). Scraping reads counters and the readiness
//! probe's cached results; it never touches a device or the store.
//!
//! The metrics (names as exposed):
//!
//! | name | type | labels | meaning |
//! |---|---|---|---|
//! | `warden_issuance_total` | counter | `ca`, `outcome` | CSRs answered (CMF REST and EST): `issued`, `refused` (4xx), `unavailable` (503), `failed` (500); `ca` is `none` when refused before a CA was chosen |
//! | `warden_issuance_duration_seconds` | histogram | `ca` | time from the decoded request to the answer |
//! | `warden_notifications_total` | counter | `outcome` | NFVO notifications on the SM callback: `accepted` (204), `refused` (4xx), `failed` (5xx) |
//! | `warden_notification_duration_seconds` | histogram | | time to authenticate, parse and journal durably |
//! | `warden_device_errors_total` | counter | `backend` | key-layer errors seen by the readiness probe (and by the recovery ladders that call [`Metrics::device_error`]) |
//! | `warden_device_recoveries_total` | counter | `backend` | a key or device usable again after errors |
//! | `warden_key_ready` | gauge | `name`, `key` | 1 if the probe's last signature with the key succeeded in time |
//! | `warden_store_ready` | gauge | | 1 if the probe's last durable write succeeded in time |
//! | `warden_ready` | gauge | | 1 if every check of `/readyz` passes |
//! | `warden_connections_open` | gauge | | HTTPS connections open |
//! | `warden_connections_refused_total` | counter | `reason` | HTTPS connections refused (caps, limits) |
//! | `warden_connections_closed_total` | counter | `reason` | HTTPS connections closed by a limit: handshake failed or timed out, headers, body or idle timeout |
//! | `warden_store_commit_duration_seconds` | histogram | `writer` | durable commits, measured by the caller |
//! | `warden_certificates_issued` | gauge | | certificates in the store |
//! | `warden_certificates_expiring` | gauge | | of those, with notAfter within `[health] expiry_warning_days` (not yet expired) |
//! | `warden_errors_total` | counter | `kind` | request errors by kind, also those whose log line was suppressed |
//! | `warden_log_lines_suppressed_total` | counter | `kind` | error lines not logged by the rate limit ([`crate::log_limit`]) |
//! | `warden_revocation_requests_total` | counter | `kind`, `status` | requests to the revocation listener: `kind` `crl`, `ocsp` or `other`; `status` the HTTP status (an OCSP error such as `tryLater` is a 200 with its OCSP status) |
//! | `warden_revocation_connections_refused_total` | counter | | revocation-listener connections closed at once: `max_connections` open already |

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::keys::BackendKind;

/// The process-wide metrics, created on first use.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// A histogram family whose members are made by a plain function (so the type can be named).
pub type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IssuanceLabels {
    pub ca: String,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CaLabels {
    pub ca: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub backend: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyLabels {
    /// What the key is for ("CA key default", "TLS key", "SM ns_lcm key").
    pub name: String,
    /// Its reference (`pkcs11:` URI or `tpm:handle=`).
    pub key: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriterLabels {
    pub writer: &'static str,
}

/// A security event of the HTTPS listener (see `api::security`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SecurityEventLabels {
    /// "refused" (a request answered 401/403/422/500) or "handshake_failed".
    pub event: &'static str,
    /// The HTTP status of a refusal; empty for handshakes.
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

/// Every metric of the agent. The fields are public so that each part of the agent updates
/// its own: a counter is one atomic add, cheap enough for every request.
pub struct Metrics {
    registry: Registry,
    pub issuance: Family<IssuanceLabels, Counter>,
    pub issuance_seconds: HistogramFamily<CaLabels>,
    pub notifications: Family<OutcomeLabels, Counter>,
    pub notification_seconds: Histogram,
    pub device_errors: Family<BackendLabels, Counter>,
    pub device_recoveries: Family<BackendLabels, Counter>,
    pub key_ready: Family<KeyLabels, Gauge>,
    pub store_ready: Gauge,
    pub ready: Gauge,
    pub connections_open: Gauge,
    pub connections_refused: Family<ReasonLabels, Counter>,
    pub connections_closed: Family<ReasonLabels, Counter>,
    pub store_commit_seconds: HistogramFamily<WriterLabels>,
    pub certificates_issued: Gauge,
    pub certificates_expiring: Gauge,
    pub errors: Family<KindLabels, Counter>,
    pub log_lines_suppressed: Family<KindLabels, Counter>,
    pub security_events: Family<SecurityEventLabels, Counter>,
    pub revocation_requests: Family<RevocationRequestLabels, Counter>,
    pub revocation_connections_refused: Counter,
}

/// A request to the revocation listener (CRLs, OCSP).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RevocationRequestLabels {
    /// "crl", "ocsp" or "other" (any other path).
    pub kind: &'static str,
    pub status: u16,
}

/// Latency buckets from 1 ms to about 16 s: a software token signs in about a millisecond,
/// a device that hangs shows in the top buckets.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("warden");
        let metrics = Metrics {
            registry: Registry::default(),
            issuance: Family::default(),
            issuance_seconds: Family::new_with_constructor(latency_histogram as fn() -> _),
            notifications: Family::default(),
            notification_seconds: latency_histogram(),
            device_errors: Family::default(),
            device_recoveries: Family::default(),
            key_ready: Family::default(),
            store_ready: Gauge::default(),
            ready: Gauge::default(),
            connections_open: Gauge::default(),
            connections_refused: Family::default(),
            connections_closed: Family::default(),
            store_commit_seconds: Family::new_with_constructor(latency_histogram as fn() -> _),
            certificates_issued: Gauge::default(),
            certificates_expiring: Gauge::default(),
            errors: Family::default(),
            log_lines_suppressed: Family::default(),
            security_events: Family::default(),
            revocation_requests: Family::default(),
            revocation_connections_refused: Counter::default(),
        };
        // The metrics are shared handles (Arc inside): the registry keeps clones for encoding.
        registry.register(
            "issuance",
            "CSRs answered, by CA and outcome (issued, refused, unavailable, failed)",
            metrics.issuance.clone(),
        );
        registry.register(
            "issuance_duration_seconds",
            "Time to answer a CSR, by CA",
            metrics.issuance_seconds.clone(),
        );
        registry.register(
            "notifications",
            "NFVO notifications on the SM callback, by outcome (accepted, refused, failed)",
            metrics.notifications.clone(),
        );
        registry.register(
            "notification_duration_seconds",
            "Time to authenticate, parse and durably journal a notification",
            metrics.notification_seconds.clone(),
        );
        registry.register(
            "device_errors",
            "Key-layer device errors, by backend",
            metrics.device_errors.clone(),
        );
        registry.register(
            "device_recoveries",
            "Keys or devices usable again after errors, by backend",
            metrics.device_recoveries.clone(),
        );
        registry.register(
            "key_ready",
            "1 if the readiness probe's last signature with the key succeeded in time",
            metrics.key_ready.clone(),
        );
        registry.register(
            "store_ready",
            "1 if the readiness probe's last durable store write succeeded in time",
            metrics.store_ready.clone(),
        );
        registry.register(
            "ready",
            "1 if every readiness check passes (/readyz answers 200)",
            metrics.ready.clone(),
        );
        registry.register(
            "connections_open",
            "HTTPS connections open",
            metrics.connections_open.clone(),
        );
        registry.register(
            "connections_refused",
            "HTTPS connections refused, by reason",
            metrics.connections_refused.clone(),
        );
        registry.register(
            "connections_closed",
            "HTTPS connections closed by a server limit, by reason",
            metrics.connections_closed.clone(),
        );
        registry.register(
            "store_commit_duration_seconds",
            "Durable store commits, by writer",
            metrics.store_commit_seconds.clone(),
        );
        registry.register(
            "certificates_issued",
            "Certificates recorded in the store",
            metrics.certificates_issued.clone(),
        );
        registry.register(
            "certificates_expiring",
            "Issued certificates not yet expired whose notAfter is within the warning window",
            metrics.certificates_expiring.clone(),
        );
        registry.register(
            "errors",
            "Request errors by kind, including those whose log line was suppressed",
            metrics.errors.clone(),
        );
        registry.register(
            "log_lines_suppressed",
            "Error log lines not written because of the per-kind rate limit",
            metrics.log_lines_suppressed.clone(),
        );
        registry.register(
            "security_events",
            "Refused requests (401, 403, 422, 500) and failed TLS handshakes",
            metrics.security_events.clone(),
        );
        registry.register(
            "revocation_requests",
            "Requests to the revocation listener, by kind (crl, ocsp, other) and HTTP status",
            metrics.revocation_requests.clone(),
        );
        registry.register(
            "revocation_connections_refused",
            "Revocation-listener connections closed at once because max_connections were open",
            metrics.revocation_connections_refused.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail; an encoder error would be a bug in a metric's
        // own encoding, and a partial text is still better than none for the scraper.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        text
    }

    /// Create the series the configuration implies, at zero, so that a scraper sees every
    /// metric (and can compute rates) before the first event: issuance per CA and outcome,
    /// device errors per configured backend, notification outcomes with an SM, the error
    /// kinds of the log rate limit.
    pub fn prepare(&self, config: &crate::config::Config, cas: &[crate::cmf::IssuingCa]) {
        for ca in cas {
            for outcome in ["issued", "refused", "unavailable", "failed"] {
                let _ = self.issuance.get_or_create(&IssuanceLabels {
                    ca: ca.id.clone(),
                    outcome,
                });
            }
            let _ = self
                .issuance_seconds
                .get_or_create(&CaLabels { ca: ca.id.clone() });
        }
        let mut backends = Vec::new();
        if config.pkcs11_backends().next().is_some() {
            backends.push(BackendKind::Pkcs11);
        }
        if config.tpm_backends().next().is_some() {
            backends.push(BackendKind::Tpm);
        }
        for backend in backends {
            let labels = BackendLabels {
                backend: backend_label(backend),
            };
            let _ = self.device_errors.get_or_create(&labels);
            let _ = self.device_recoveries.get_or_create(&labels);
        }
        if config.sm.is_some() {
            for outcome in ["accepted", "refused", "failed"] {
                let _ = self.notifications.get_or_create(&OutcomeLabels { outcome });
            }
        }
        for kind in crate::log_limit::KINDS {
            let _ = self.errors.get_or_create(&KindLabels { kind });
            let _ = self
                .log_lines_suppressed
                .get_or_create(&KindLabels { kind });
        }
    }

    /// One CSR answered: `outcome` from its HTTP status; its latency when it entered the
    /// pipeline (a request refused while being decoded is counted, not timed).
    pub fn issuance_answered(&self, ca: &str, status: u16, elapsed: Option<Duration>) {
        let outcome = match status {
            200..=299 => "issued",
            503 => "unavailable",
            400..=499 => "refused",
            _ => "failed",
        };
        self.issuance
            .get_or_create(&IssuanceLabels {
                ca: ca.to_string(),
                outcome,
            })
            .inc();
        if let Some(elapsed) = elapsed {
            self.issuance_seconds
                .get_or_create(&CaLabels { ca: ca.to_string() })
                .observe(elapsed.as_secs_f64());
        }
    }

    /// One notification answered with `status`.
    pub fn notification_answered(&self, status: u16, elapsed: Duration) {
        let outcome = match status {
            200..=299 => "accepted",
            400..=499 => "refused",
            _ => "failed",
        };
        self.notifications
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        self.notification_seconds.observe(elapsed.as_secs_f64());
    }

    /// A device error of `backend` (the hook of the key layer's recovery ladders).
    pub fn device_error(&self, backend: BackendKind) {
        self.device_errors
            .get_or_create(&BackendLabels {
                backend: backend_label(backend),
            })
            .inc();
    }

    /// A device of `backend` usable again after errors.
    pub fn device_recovery(&self, backend: BackendKind) {
        self.device_recoveries
            .get_or_create(&BackendLabels {
                backend: backend_label(backend),
            })
            .inc();
    }

    /// A durable commit by `writer` took `elapsed`.
    pub fn store_commit(&self, writer: &'static str, elapsed: Duration) {
        self.store_commit_seconds
            .get_or_create(&WriterLabels { writer })
            .observe(elapsed.as_secs_f64());
    }
}

fn backend_label(kind: BackendKind) -> &'static str {
    match kind {
        BackendKind::Pkcs11 => "pkcs11",
        BackendKind::Tpm => "tpm",
    }
}

/// Why the metrics listener could not start.
#[derive(Debug, thiserror::Error)]
#[error("metrics listener on {addr}: {source}")]
pub struct ListenError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// The OpenMetrics content type (OpenMetrics 1.0, section "Overall Structure").
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `GET /metrics`.
pub async fn handler() -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        [(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)],
        global().encode(),
    )
        .into_response()
}

/// Middleware for the SM callback routes: counts and times each notification (`POST`).
pub async fn track_notifications(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if request.method() != axum::http::Method::POST
        || request.uri().path() != "/sm/v1/notifications"
    {
        return next.run(request).await;
    }
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    global().notification_answered(response.status().as_u16(), started.elapsed());
    response
}

/// Counts an open connection in `warden_connections_open` until dropped.
pub struct OpenConnection(());

impl OpenConnection {
    pub fn new() -> OpenConnection {
        global().connections_open.inc();
        OpenConnection(())
    }
}

impl Default for OpenConnection {
    fn default() -> Self {
        OpenConnection::new()
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        global().connections_open.dec();
    }
}

/// One more HTTPS connection closed by a server limit (`warden_connections_closed_total`).
pub fn connection_closed(reason: &'static str) {
    global()
        .connections_closed
        .get_or_create(&ReasonLabels { reason })
        .inc();
}

#[cfg(test)]
mod tests {
    /// The reference config's commented `[metrics]` section parses once enabled.
    #[test]
    fn reference_config_metrics_section_parses() {
        let text = include_str!("../systemd/warden.toml")
            .replace("# [metrics]\n# listen", "[metrics]\nlisten");
        let config = crate::config::Config::parse(&text).expect("parses");
        let metrics = config.metrics.expect("[metrics] present");
        assert_eq!(metrics.listen.to_string(), "127.0.0.1:9464");
        assert_eq!(config.health.probe_seconds, 10);
    }

    #[test]
    fn encoding_names_every_family_with_the_prefix() {
        let metrics = super::global();
        metrics.issuance_answered("test-ca", 201, Some(std::time::Duration::from_millis(3)));
        let text = metrics.encode();
        assert!(text.contains("warden_issuance_total{ca=\"test-ca\",outcome=\"issued\"}"));
        assert!(text.contains("warden_issuance_duration_seconds_count{ca=\"test-ca\"}"));
        assert!(text.trim_end().ends_with("# EOF"));
    }
}
