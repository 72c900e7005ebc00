//! Security events of the HTTPS listener: refused requests (401, 403, 422, 500) and failed
//! TLS handshakes. Each is logged (rate limited, [`crate::log_limit`]), counted in
//! `warden_security_events_total{event,status}`, and put in the audit chain:
//!
//! - a request from an authenticated client (its TLS client certificate verified) that is
//!   refused is audited on its own (`security.refused`, actor = the certificate's identity):
//!   such a client is known and accountable, and each refusal may matter;
//! - unauthenticated events (no client certificate, failed handshakes) are only counted, and
//!   one `security.unauthenticated` record per [`SUMMARY_INTERVAL`] (and at shutdown) carries
//!   the counts since the last one. An anonymous flood thus adds at most one audit record per
//!   interval, never one per request: the audit chain cannot be grown without bound by
//!   anyone who can open a TCP connection.
//!
//! The audit writes happen on one thread of their own, in batches (one durable commit for
//! all events waiting), behind a bounded queue: when the queue is full an authenticated event
//! is not audited individually but counted in the next summary (`individual_dropped`), so
//! that a storm never blocks or slows the request path.

use std::collections::BTreeMap;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;

use super::{ClientIdentity, PeerCertificate};
use crate::store::{AuditEvent, Store};

/// How often the counts of unauthenticated events become one audit record.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(60);
/// Authenticated events waiting for the audit thread before they are only counted.
const QUEUE: usize = 1024;

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SecurityEvent {
    /// A request answered 401, 403, 422 or 500.
    Refused(u16),
    /// A TLS handshake that failed (protocol error, untrusted client certificate...).
    HandshakeFailed,
}

impl SecurityEvent {
    fn name(self) -> &'static str {
        match self {
            SecurityEvent::Refused(_) => "refused",
            SecurityEvent::HandshakeFailed => "handshake_failed",
        }
    }

    fn status(self) -> &'static str {
        match self {
            SecurityEvent::Refused(401) => "401",
            SecurityEvent::Refused(403) => "403",
            SecurityEvent::Refused(422) => "422",
            SecurityEvent::Refused(500) => "500",
            SecurityEvent::Refused(_) => "other",
            SecurityEvent::HandshakeFailed => "",
        }
    }
}

/// Whether a status is a security event.
pub fn is_security_status(status: u16) -> bool {
    matches!(status, 401 | 403 | 422 | 500)
}

/// The audit side, once the agent has a store ([`install`]).
struct Auditor {
    queue: SyncSender<AuditEvent>,
    counts: Mutex<Counts>,
    wake: SyncSender<AuditEvent>,
}

#[derive(Default)]
struct Counts {
    /// Unauthenticated events since the last summary, by (event, status).
    unauthenticated: BTreeMap<(&'static str, &'static str), u64>,
    /// Authenticated events not audited individually (queue full).
    individual_dropped: u64,
}

fn auditor() -> &'static OnceLock<Arc<Auditor>> {
    static AUDITOR: OnceLock<Arc<Auditor>> = OnceLock::new();
    &AUDITOR
}

/// Start auditing security events into `store` (once per process; later calls are no-ops).
pub fn install(store: Arc<Store>) {
    if auditor().get().is_some() {
        return;
    }
    let (queue, received) = std::sync::mpsc::sync_channel(QUEUE);
    let shared = Arc::new(Auditor {
        wake: queue.clone(),
        queue,
        counts: Mutex::new(Counts::default()),
    });
    if auditor().set(shared.clone()).is_err() {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("security-audit".into())
        .spawn(move || run(&shared, &store, &received));
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the security audit thread: security events are logged and counted only");
    }
}

/// Write the summary of unauthenticated events now (at shutdown), and wait until it and
/// every queued event are in the store (at most `wait`).
pub fn flush(wait: Duration) {
    let Some(auditor) = auditor().get() else {
        return;
    };
    let (done, finished) = std::sync::mpsc::sync_channel::<()>(1);
    FLUSHED.with_sender(done);
    // A marker event that asks the thread to summarize and report back.
    let _ = auditor.wake.try_send(AuditEvent::new("", FLUSH_MARKER, ""));
    let _ = finished.recv_timeout(wait);
}

const FLUSH_MARKER: &str = "\u{0}flush";

/// The sender the audit thread answers a flush on.
struct FlushWaiter(Mutex<Option<SyncSender<()>>>);

impl FlushWaiter {
    fn with_sender(&self, sender: SyncSender<()>) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(sender);
    }

    fn notify(&self) {
        if let Some(sender) = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            let _ = sender.try_send(());
        }
    }
}

static FLUSHED: FlushWaiter = FlushWaiter(Mutex::new(None));

/// Record one event: log (rate limited), count, audit (individually when `identity` is the
/// verified client's, else in the next summary).
pub fn record(event: SecurityEvent, identity: Option<&str>, what: &str, detail: &str) {
    crate::metrics::global()
        .security_events
        .get_or_create(&crate::metrics::SecurityEventLabels {
            event: event.name(),
            status: event.status(),
        })
        .inc();
    let kind = match (event, identity.is_some()) {
        (SecurityEvent::HandshakeFailed, _) => "security.handshake",
        (_, true) => "security.refused",
        (_, false) => "security.unauthenticated",
    };
    if crate::log_limit::allow(kind) {
        tracing::warn!(
            event = event.name(),
            status = event.status(),
            client = identity.unwrap_or("-"),
            request = what,
            detail,
            "security event"
        );
    }
    let Some(auditor) = auditor().get() else {
        return;
    };
    match identity {
        Some(identity) => {
            let audit = AuditEvent::new(identity, "security.refused", what)
                .with_detail(serde_json::json!({ "status": event.status(), "detail": detail }));
            match auditor.queue.try_send(audit) {
                Ok(()) => {}
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                    auditor.counts().individual_dropped += 1;
                }
            }
        }
        None => {
            *auditor
                .counts()
                .unauthenticated
                .entry((event.name(), event.status()))
                .or_default() += 1;
        }
    }
}

impl Auditor {
    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The summary record of the counts since the last one, if there were any.
    fn take_summary(&self) -> Option<AuditEvent> {
        let counts = std::mem::take(&mut *self.counts());
        if counts.unauthenticated.is_empty() && counts.individual_dropped == 0 {
            return None;
        }
        let total: u64 = counts.unauthenticated.values().sum();
        let by_kind: serde_json::Map<String, serde_json::Value> = counts
            .unauthenticated
            .iter()
            .map(|((event, status), n)| {
                let key = if status.is_empty() {
                    (*event).to_string()
                } else {
                    format!("{event} {status}")
                };
                (key, serde_json::Value::from(*n))
            })
            .collect();
        Some(
            AuditEvent::new("anonymous", "security.unauthenticated", "https").with_detail(
                serde_json::json!({
                    "events": total,
                    "by_kind": by_kind,
                    "individual_dropped": counts.individual_dropped,
                    "interval_seconds": SUMMARY_INTERVAL.as_secs(),
                }),
            ),
        )
    }
}

fn run(auditor: &Auditor, store: &Store, received: &Receiver<AuditEvent>) {
    let mut next_summary = Instant::now() + SUMMARY_INTERVAL;
    loop {
        let wait = next_summary.saturating_duration_since(Instant::now());
        let first = match received.recv_timeout(wait) {
            Ok(event) => Some(event),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let mut batch: Vec<AuditEvent> = first.into_iter().collect();
        batch.extend(received.try_iter().take(QUEUE));
        let flush = batch.iter().any(|e| e.action == FLUSH_MARKER);
        batch.retain(|e| e.action != FLUSH_MARKER);
        if flush || Instant::now() >= next_summary {
            batch.extend(auditor.take_summary());
            next_summary = Instant::now() + SUMMARY_INTERVAL;
        }
        if !batch.is_empty() {
            let n = batch.len();
            let written = store.write(|tx| {
                for event in batch {
                    tx.audit(event);
                }
                Ok(())
            });
            if let Err(e) = written {
                // Counted and logged already; the audit records of this batch are lost, and
                // the store error is the operator's signal.
                if crate::log_limit::allow("security.audit") {
                    tracing::error!(error = %crate::error::chain(&e), events = n, "cannot audit security events");
                }
            }
        }
        if flush {
            FLUSHED.notify();
        }
    }
}

/// Middleware: every response with a security status becomes a [`SecurityEvent`].
pub async fn observe(request: Request, next: Next) -> Response {
    let identity = request
        .extensions()
        .get::<ClientIdentity>()
        .and_then(|identity| identity.0.clone());
    let has_certificate = request
        .extensions()
        .get::<PeerCertificate>()
        .is_some_and(|peer| peer.0.is_some());
    let what = format!("{} {}", request.method(), request.uri().path());
    let response = next.run(request).await;
    let status = response.status().as_u16();
    if is_security_status(status) {
        let identity = identity.filter(|_| has_certificate);
        record(
            SecurityEvent::Refused(status),
            identity.as_deref(),
            &what,
            "",
        );
    }
    response
}
