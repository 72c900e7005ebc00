//! HTTPS server: hyper + rustls with the agent's TLS key in the HSM/TPM, routing, health,
//! readiness notification and draining on SIGTERM. Client certificates are requested (and
//! verified against the configured consumer roots) when the CMF is served; the identity in
//! a verified client certificate reaches handlers as [`ClientIdentity`].

pub mod admin;
pub mod attestation;
pub mod cmf;
pub mod direct;
pub mod est;
pub mod health;
pub mod revocation;
pub mod security;
pub mod sm;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::CertificateDer;
use tokio::net::TcpListener;

use crate::config::ServerConfig;
use crate::keys::backends::Backends;
use crate::keys::signer::{HardwareKey, SigningPool};
use crate::store::Store;

/// What request handlers share.
#[derive(Clone)]
pub struct AppState {
    pub backends: Backends,
    pub store: Arc<Store>,
    pub cmf: Option<Arc<crate::cmf::Cmf>>,
    pub sm: Option<Arc<crate::sm::Sm>>,
    /// CMF direct mode (notification endpoint, direct EST enrollment).
    pub direct: Option<Arc<crate::cmf::direct::Direct>>,
    /// Liveness and the cached readiness (`/livez`, `/healthz`, `/readyz`).
    pub health: health::Health,
}

/// The verified TLS client certificate (DER, leaf), when the client presented one.
#[derive(Clone, Debug, Default)]
pub struct PeerCertificate(pub Option<Arc<Vec<u8>>>);

/// The identity of the TLS client: the first DNS name of its verified certificate's
/// subjectAltName, else its subject commonName; `None` without a client certificate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientIdentity(pub Option<String>);

impl ClientIdentity {
    pub fn from_certificate(der: &[u8]) -> ClientIdentity {
        use der::Decode;
        let Ok(cert) = x509_cert::Certificate::from_der(der) else {
            return ClientIdentity(None);
        };
        if let Ok(Some((_, san))) = cert
            .tbs_certificate()
            .get_extension::<x509_cert::ext::pkix::SubjectAltName>()
        {
            for name in san.0 {
                if let x509_cert::ext::pkix::name::GeneralName::DnsName(dns) = name {
                    return ClientIdentity(Some(dns.to_string()));
                }
            }
        }
        let cn = cert
            .tbs_certificate()
            .subject()
            .common_name()
            .ok()
            .flatten()
            .map(|cn| cn.value().into_owned());
        ClientIdentity(cn)
    }
}

/// The roles a verified client certificate chain is trusted for. The TLS handshake accepts
/// a chain to any configured client root (one listener serves every role); each role then
/// accepts only chains to its own roots, so that a certificate from the NFVO's PKI that
/// carries a CMF consumer's name is not that consumer (issue 9 §4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrustedRoles {
    /// Chains to `cmf.client_ca`: a CMF consumer (REST API and EST).
    pub cmf_consumer: bool,
    /// Chains to `sm.notifications.client_ca`: the NFVO sending notifications (TLS_CERT).
    pub nfvo_notifier: bool,
}

/// Per-role client certificate verification: one rustls/webpki verifier per role, each
/// with only that role's trust anchors (the chain, clientAuth usage and validity are
/// checked as in the handshake, RFC 5280 6.1).
#[derive(Clone, Default)]
pub struct ClientTrust {
    cmf_consumer: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
    nfvo_notifier: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
}

impl std::fmt::Debug for ClientTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTrust")
            .field("cmf_consumer", &self.cmf_consumer.is_some())
            .field("nfvo_notifier", &self.nfvo_notifier.is_some())
            .finish()
    }
}

impl ClientTrust {
    /// The roles of the configuration: `cmf.client_ca` for CMF consumers,
    /// `sm.notifications.client_ca` for the NFVO's notifications.
    pub fn from_config(config: &crate::config::Config) -> Result<ClientTrust, ServeError> {
        let verifier = |path: &std::path::Path| -> Result<_, ServeError> {
            let roots = load_roots(path)?;
            let verifier: Arc<dyn rustls::server::danger::ClientCertVerifier> =
                rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    Arc::new(rustls::crypto::ring::default_provider()),
                )
                .build()
                .map_err(|e| ServeError::Tls(e.to_string()))?;
            Ok(verifier)
        };
        Ok(ClientTrust {
            cmf_consumer: config
                .cmf
                .as_ref()
                .map(|cmf| verifier(&cmf.client_ca))
                .transpose()?,
            nfvo_notifier: config
                .sm
                .as_ref()
                .and_then(|sm| sm.notifications.client_ca.as_deref())
                .map(verifier)
                .transpose()?,
        })
    }

    /// The roles the chain (leaf first, as presented) is trusted for, now.
    pub fn roles(&self, chain: &[CertificateDer<'_>]) -> TrustedRoles {
        let Some((leaf, intermediates)) = chain.split_first() else {
            return TrustedRoles::default();
        };
        let now = rustls::pki_types::UnixTime::now();
        let trusted = |verifier: &Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>| {
            verifier
                .as_ref()
                .is_some_and(|v| v.verify_client_cert(leaf, intermediates, now).is_ok())
        };
        TrustedRoles {
            cmf_consumer: trusted(&self.cmf_consumer),
            nfvo_notifier: trusted(&self.nfvo_notifier),
        }
    }
}

/// Every certificate of a PEM file as a trust anchor.
fn load_roots(path: &std::path::Path) -> Result<rustls::RootCertStore, ServeError> {
    let roots_err = |reason: String| ServeError::Certificate {
        path: path.display().to_string(),
        reason,
    };
    let pem = std::fs::read_to_string(path).map_err(|e| roots_err(format!("cannot read: {e}")))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in crate::pki::certificates_from_pem(&pem).map_err(roots_err)? {
        let der = der::Encode::to_der(&cert).map_err(|e| roots_err(e.to_string()))?;
        roots
            .add(CertificateDer::from(der))
            .map_err(|e| roots_err(e.to_string()))?;
    }
    Ok(roots)
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("TLS certificate {path}: {reason}")]
    Certificate { path: String, reason: String },
    #[error("TLS key: {0}")]
    Key(#[from] crate::keys::KeyError),
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Handshake signatures are made on this many threads of their own; the key layer's session
/// pool (4 by default) would only queue more.
const TLS_SIGNING_THREADS: usize = 4;

/// The rustls server configuration, with the certificate chain from `config` and its key in
/// the HSM/TPM. The chain is checked against the key before anything listens.
pub fn tls_config(
    config: &ServerConfig,
    backends: &Backends,
    client_roots: &[&std::path::Path],
) -> Result<Arc<rustls::ServerConfig>, ServeError> {
    tls_config_with_stats(config, backends, client_roots, &ServerStats::default())
}

/// [`tls_config`], handshake signatures made on a [`SigningPool`] with
/// `handshake_sign_timeout_seconds` as deadline, its misses counted in `stats`.
pub fn tls_config_with_stats(
    config: &ServerConfig,
    backends: &Backends,
    client_roots: &[&std::path::Path],
    stats: &ServerStats,
) -> Result<Arc<rustls::ServerConfig>, ServeError> {
    let path = config.tls_certificate.display().to_string();
    let cert_err = |reason: String| ServeError::Certificate {
        path: path.clone(),
        reason,
    };
    let pem = std::fs::read_to_string(&config.tls_certificate)
        .map_err(|e| cert_err(format!("cannot read: {e}")))?;
    let chain = crate::pki::certificates_from_pem(&pem).map_err(cert_err)?;
    let chain: Vec<CertificateDer<'static>> = chain
        .iter()
        .map(|c| der::Encode::to_der(c).map(CertificateDer::from))
        .collect::<Result<_, _>>()
        .map_err(|e| cert_err(e.to_string()))?;
    let store = backends.for_key(&config.tls_key)?;
    let key = HardwareKey::new(store, config.tls_key.clone())?;
    let pool = SigningPool::new(
        TLS_SIGNING_THREADS,
        config.max_handshakes,
        Duration::from_secs(config.handshake_sign_timeout_seconds),
        stats.tls_sign_timeouts.clone(),
    )
    .map_err(|e| ServeError::Tls(format!("cannot start the signing threads: {e}")))?;
    let certified = Arc::new(rustls::sign::CertifiedKey::new(
        chain,
        key.into_rustls_bounded(Arc::new(pool)),
    ));
    certified
        .keys_match()
        .map_err(|e| cert_err(format!("does not match the key {}: {e}", config.tls_key)))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ServeError::Tls(e.to_string()))?;
    let builder = match client_roots {
        [] => builder.with_no_client_auth(),
        paths => {
            // The union of every role's roots: the handshake cannot know the role yet (the
            // request path decides); [`ClientTrust`] checks the chain per role after it.
            let mut roots = rustls::RootCertStore::empty();
            for path in paths {
                roots.roots.extend(load_roots(path)?.roots);
            }
            // Unauthenticated clients may still reach /healthz; the CMF answers them 401.
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .allow_unauthenticated()
            .build()
            .map_err(|e| ServeError::Tls(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut tls = builder.with_cert_resolver(Arc::new(FixedCert(certified)));
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(tls))
}

#[derive(Debug)]
struct FixedCert(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for FixedCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// The routes. Later issues add the CMF and SM APIs here.
pub fn router(state: AppState) -> Router {
    let mut router = health::routes(state.health.clone());
    if let Some(cmf) = &state.cmf {
        let consumers_only = axum::middleware::from_fn(cmf::require_consumer_trust);
        router = router.merge(cmf::routes(cmf.clone()).route_layer(consumers_only.clone()));
        router = router.merge(attestation::routes(cmf.clone()).route_layer(consumers_only.clone()));
        router = router.merge(est::routes(cmf.clone()).route_layer(consumers_only.clone()));
        router = router.merge(revocation::consumer_routes(cmf.clone()).route_layer(consumers_only));
    }
    if let Some(direct) = &state.direct {
        router = router.merge(direct::routes(direct.clone()));
    }
    if let Some(sm) = &state.sm {
        router = router.merge(
            sm::routes(sm.clone())
                .route_layer(axum::middleware::from_fn_with_state(
                    sm.clone(),
                    require_nfvo_trust,
                ))
                .layer(axum::middleware::from_fn(
                    crate::metrics::track_notifications,
                )),
        );
    }
    security::install(state.store.clone());
    router
        .fallback(not_found)
        .layer(axum::middleware::from_fn(cmf::version_header))
        .layer(axum::middleware::from_fn(security::observe))
}

/// SOL 013 6.4 ProblemDetails (`application/problem+json`), the one shape of every error
/// response; `title` defaults to the status' reason phrase.
pub fn problem_details(status: u16, title: Option<&str>, detail: &str) -> axum::response::Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = serde_json::json!({
        "type": "about:blank",
        "title": title.or(code.canonical_reason()).unwrap_or("Error"),
        "status": code.as_u16(),
        "detail": detail,
    });
    let mut response = (code, body.to_string()).into_response();
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/problem+json"),
    );
    response
}

/// The SM's notification endpoint with TLS_CERT authentication: a client certificate that
/// does not chain to `sm.notifications.client_ca` (one of the CMF consumers', say) is
/// refused, 403, whatever name it carries.
async fn require_nfvo_trust(
    axum::extract::State(sm): axum::extract::State<Arc<crate::sm::Sm>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let presented = request
        .extensions()
        .get::<PeerCertificate>()
        .is_some_and(|peer| peer.0.is_some());
    let trusted = request
        .extensions()
        .get::<TrustedRoles>()
        .is_some_and(|roles| roles.nfvo_notifier);
    if presented && !trusted && sm.intake.requires_client_certificate() {
        let mut response = problem_details(
            403,
            None,
            "the client certificate does not chain to the NFVO's notification roots \
             (sm.notifications.client_ca)",
        );
        // The notification interface's own version, as on every answer of it.
        if let Ok(value) = axum::http::HeaderValue::from_str(&sm.nfvo.nslcm_version()) {
            response.headers_mut().insert("Version", value);
        }
        return response;
    }
    next.run(request).await
}

async fn not_found(uri: axum::http::Uri) -> axum::response::Response {
    cmf::problem_response(&crate::cmf::CmfError::NotFound(format!(
        "no resource at {}",
        uri.path()
    )))
}

/// Timeouts and caps of the HTTPS listener, from `[server]` (see `systemd/warden.toml`).
#[derive(Clone, Debug)]
pub struct ServerLimits {
    pub handshake_timeout: Duration,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub max_handshakes: usize,
    pub max_concurrent_streams: u32,
    /// On shutdown, how long in-flight requests may take before connections are closed.
    pub drain: Duration,
}

impl ServerLimits {
    pub fn from_config(config: &ServerConfig) -> ServerLimits {
        ServerLimits {
            handshake_timeout: Duration::from_secs(config.handshake_timeout_seconds),
            header_read_timeout: Duration::from_secs(config.header_read_timeout_seconds),
            body_read_timeout: Duration::from_secs(config.body_read_timeout_seconds),
            idle_timeout: Duration::from_secs(config.idle_timeout_seconds),
            max_connections: config.max_connections,
            max_handshakes: config.max_handshakes,
            max_concurrent_streams: config.max_concurrent_streams,
            drain: Duration::from_secs(config.drain_seconds),
        }
    }
}

/// What the listener counts, for metrics: gauges (`open_connections`,
/// `handshakes_in_flight`) and counters since start.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections open now (TLS handshakes included).
    pub open_connections: AtomicU64,
    /// TLS handshakes in progress now (waiting for a handshake slot included).
    pub handshakes_in_flight: AtomicU64,
    /// Connections taken in, under the cap.
    pub connections_accepted: AtomicU64,
    /// Connections closed at once because `max_connections` were open.
    pub connections_refused: AtomicU64,
    /// Handshakes not finished within `handshake_timeout_seconds`.
    pub handshake_timeouts: AtomicU64,
    /// Handshakes that failed (protocol errors, untrusted client certificates, signing).
    pub handshake_failures: AtomicU64,
    /// Handshake signatures that missed their deadline or found the signing queue full.
    pub tls_sign_timeouts: Arc<AtomicU64>,
    /// HTTP/1 connections closed because a request's headers did not arrive in time.
    pub header_read_timeouts: AtomicU64,
    /// Requests answered 408 because their body did not arrive in time.
    pub body_read_timeouts: AtomicU64,
    /// Connections closed after `idle_timeout_seconds` without a request.
    pub idle_timeouts: AtomicU64,
}

/// Files the process needs beside its connections: the PKCS#11 module's token files and
/// lock files, the store, the TPM, the admin socket, the log, the blocking threads' files.
pub const FILE_HEADROOM: u64 = 128;

/// Raise the soft open-file limit to the hard one (a systemd service starts with 1,024 unless
/// `LimitNOFILE=` says otherwise) and return the connection cap that fits under it with
/// [`FILE_HEADROOM`] to spare: `max_connections`, or fewer, with a warning. Running out of
/// file descriptors does not only refuse connections: the PKCS#11 module cannot open its
/// token files any more, and every handshake and signature fails.
pub fn fit_connections_to_file_limit(max_connections: usize) -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given and nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "cannot read the open-file limit; the connection cap is not checked against it"
        );
        return max_connections;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads the struct it is given; raising the soft limit up to the
        // hard one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            tracing::debug!(
                from = limit.rlim_cur,
                to = raised.rlim_cur,
                "raised the open-file limit"
            );
            limit = raised;
        }
    }
    let fits = limit.rlim_cur.saturating_sub(FILE_HEADROOM).max(1);
    let fits = usize::try_from(fits).unwrap_or(usize::MAX);
    if max_connections > fits {
        tracing::warn!(
            max_connections,
            open_file_limit = limit.rlim_cur,
            cap = fits,
            "server.max_connections does not fit the open-file limit with {FILE_HEADROOM} \
             files to spare; serving at most {fits} connections (raise LimitNOFILE=)"
        );
        fits
    } else {
        max_connections
    }
}

/// Serve until `shutdown` resolves, then drain for at most `limits.drain` before closing
/// what is left.
///
/// Every connection holds one of `max_connections` permits from accept to close; beyond them
/// a new connection is accepted and closed at once (counted, warned about at most every 10
/// s), so that the process never runs out of file descriptors. The TLS handshake (at most
/// `max_handshakes` at once) has `handshake_timeout` in total; HTTP/1 headers have
/// `header_read_timeout` (hyper's timer); each request body has `body_read_timeout` in
/// total; a connection without a request in flight for `idle_timeout` is closed.
///
/// Handshake signatures: rustls signs synchronously in the middle of its state machine, on
/// whatever thread drives it, and a signature by a device can block (a hung TPM, a busy
/// HSM). The handshake is therefore split: the ClientHello is read asynchronously
/// (`LazyConfigAcceptor`, no signing), then `into_stream`, the one call that answers it and
/// signs (TLS 1.3 CertificateVerify, TLS 1.2 ServerKeyExchange), runs on tokio's blocking
/// pool, and the rest of the handshake, which signs nothing on our side, runs on the worker
/// again. The signature itself is made on the signing threads of the TLS key's
/// [`SigningPool`] and waited for at most its deadline, so a hung device fails the handshake
/// instead of holding a thread for ever. The one exception, a second ClientHello after a
/// HelloRetryRequest, is answered from the worker; there the pool announces its wait with
/// `block_in_place`, so the worker's other tasks move on.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    trust: ClientTrust,
    app: Router,
    limits: ServerLimits,
    stats: Arc<ServerStats>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    serve_with(listener, Some(tls), trust, app, limits, stats, shutdown).await;
}

/// [`serve`] without TLS, for the plain-HTTP metrics listener: the same connection cap,
/// header-read, body and idle timeouts and drain (the handshake limits do not apply), so
/// that a client of that listener can hold no more than a client of the HTTPS one.
pub async fn serve_plain(
    listener: TcpListener,
    app: Router,
    limits: ServerLimits,
    stats: Arc<ServerStats>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    // No client certificates without TLS: no role is ever trusted on this listener.
    serve_with(
        listener,
        None,
        ClientTrust::default(),
        app,
        limits,
        stats,
        shutdown,
    )
    .await;
}

async fn serve_with(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    trust: ClientTrust,
    app: Router,
    limits: ServerLimits,
    stats: Arc<ServerStats>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams);
    let connections = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let (closing, _) = tokio::sync::watch::channel(false);
    let shared = Arc::new(Connections {
        tls,
        trust,
        app,
        builder,
        handshakes: Arc::new(tokio::sync::Semaphore::new(limits.max_handshakes)),
        limits: limits.clone(),
        stats: stats.clone(),
        closing: closing.clone(),
    });
    let mut refusals = EveryTenSeconds::default();
    let mut accept_failures = EveryTenSeconds::default();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // EMFILE / ENFILE / ENOBUFS: the pending connection stays in the
                        // backlog; try again shortly instead of spinning.
                        if accept_failures.due() {
                            tracing::warn!(error = %e, failures = accept_failures.take(), "accept failed");
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(permit) = connections.clone().try_acquire_owned() else {
                    stats.connections_refused.fetch_add(1, Ordering::Relaxed);
                    crate::metrics::global()
                        .connections_refused
                        .get_or_create(&crate::metrics::ReasonLabels {
                            reason: "max_connections",
                        })
                        .inc();
                    if refusals.due() {
                        tracing::warn!(
                            refused = refusals.take(),
                            max_connections = limits.max_connections,
                            "connection cap reached: new connections are closed at once"
                        );
                    }
                    // Closing it at once tells the client now, and frees the descriptor.
                    drop(tcp);
                    continue;
                };
                stats.connections_accepted.fetch_add(1, Ordering::Relaxed);
                // Without TCP_NODELAY a TLS 1.2 handshake took 44 ms instead of 0.3 ms here.
                let _ = tcp.set_nodelay(true);
                let shared = shared.clone();
                tokio::spawn(async move {
                    let _open = Gauge::up(&shared.stats, |s| &s.open_connections);
                    let _counted = crate::metrics::OpenConnection::new();
                    shared.serve_connection(tcp, peer).await;
                    drop(permit);
                });
            }
            () = &mut shutdown => {
                break;
            }
        }
    }
    drop(listener);
    tracing::info!("draining connections");
    let _ = closing.send(true);
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    tokio::select! {
        _ = connections.acquire_many(all) => tracing::info!("all connections closed"),
        () = tokio::time::sleep(limits.drain) => tracing::warn!(seconds = limits.drain.as_secs(), "drain timed out; closing"),
    }
    // The last summary of unauthenticated security events, durable before the process ends.
    // It may wait as long as the drain could (the unit's TimeoutStopSec covers both): a slow
    // disk must not lose the last summary.
    let wait = limits.drain.max(Duration::from_secs(5));
    let _ = tokio::task::spawn_blocking(move || security::flush(wait)).await;
}

/// What every connection task shares.
struct Connections {
    /// `None`: plain HTTP ([`serve_plain`]).
    tls: Option<Arc<rustls::ServerConfig>>,
    trust: ClientTrust,
    app: Router,
    builder: auto::Builder<TokioExecutor>,
    handshakes: Arc<tokio::sync::Semaphore>,
    limits: ServerLimits,
    stats: Arc<ServerStats>,
    closing: tokio::sync::watch::Sender<bool>,
}

/// After a graceful close (idle, shutdown) was started, how long the peer gets to finish
/// before the connection is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

impl Connections {
    async fn serve_connection(self: &Arc<Self>, tcp: tokio::net::TcpStream, peer: SocketAddr) {
        let Some(config) = self.tls.clone() else {
            let (identity, certificate) = (ClientIdentity(None), PeerCertificate(None));
            return self
                .serve_io(tcp, identity, certificate, TrustedRoles::default(), peer)
                .await;
        };
        let deadline = tokio::time::Instant::now() + self.limits.handshake_timeout;
        let tls = match tokio::time::timeout_at(deadline, self.handshake(tcp, config)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                self.stats
                    .handshake_failures
                    .fetch_add(1, Ordering::Relaxed);
                crate::metrics::connection_closed("handshake_failed");
                security::record(
                    security::SecurityEvent::HandshakeFailed,
                    None,
                    &peer.to_string(),
                    &e.to_string(),
                );
                return;
            }
            Err(_) => {
                self.stats
                    .handshake_timeouts
                    .fetch_add(1, Ordering::Relaxed);
                crate::metrics::connection_closed("handshake_timeout");
                tracing::debug!(%peer, "TLS handshake timed out");
                return;
            }
        };
        let chain = tls.get_ref().1.peer_certificates();
        let leaf = chain
            .and_then(|chain| chain.first())
            .map(|leaf| Arc::new(leaf.to_vec()));
        let identity = leaf.as_ref().map_or(ClientIdentity(None), |leaf| {
            ClientIdentity::from_certificate(leaf)
        });
        // Once per connection: the chain does not change within it.
        let roles = chain.map_or_else(TrustedRoles::default, |chain| self.trust.roles(chain));
        let peer_certificate = PeerCertificate(leaf);
        self.serve_io(tls, identity, peer_certificate, roles, peer)
            .await;
    }

    /// HTTP on an established connection (TLS or plain), until it ends, is closed by a
    /// limit, or the server drains.
    async fn serve_io<I>(
        self: &Arc<Self>,
        io: I,
        identity: ClientIdentity,
        peer_certificate: PeerCertificate,
        roles: TrustedRoles,
        peer: SocketAddr,
    ) where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let activity = Arc::new(Activity::new());
        let service = {
            let app = TowerToHyperService::new(self.app.clone());
            let activity = activity.clone();
            let shared = self.clone();
            hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                shared.call(
                    app.clone(),
                    request,
                    (identity.clone(), peer_certificate.clone(), roles),
                    &activity,
                )
            })
        };
        let conn = self
            .builder
            .serve_connection_with_upgrades(TokioIo::new(io), service);
        tokio::pin!(conn);
        let mut closing = self.closing.subscribe();
        let mut grace: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
        loop {
            let idle_check =
                tokio::time::sleep_until(activity.next_check(self.limits.idle_timeout));
            tokio::select! {
                ended = conn.as_mut() => {
                    if let Err(e) = ended {
                        if e.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_timeout) {
                            self.stats.header_read_timeouts.fetch_add(1, Ordering::Relaxed);
                            crate::metrics::connection_closed("header_read_timeout");
                        }
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                    return;
                }
                () = idle_check, if grace.is_none() => {
                    if activity.idle_for(self.limits.idle_timeout) {
                        self.stats.idle_timeouts.fetch_add(1, Ordering::Relaxed);
                        crate::metrics::connection_closed("idle_timeout");
                        tracing::debug!(%peer, "idle connection closed");
                        conn.as_mut().graceful_shutdown();
                        grace = Some(Box::pin(tokio::time::sleep(CLOSE_GRACE)));
                    }
                }
                _ = closing.wait_for(|closing| *closing), if grace.is_none() => {
                    // HTTP/1: closed once the request in flight is answered; HTTP/2: GOAWAY.
                    conn.as_mut().graceful_shutdown();
                    grace = Some(Box::pin(tokio::time::sleep(self.limits.drain)));
                }
                () = async { if let Some(grace) = grace.as_mut() { grace.await } }, if grace.is_some() => {
                    tracing::debug!(%peer, "connection dropped after its grace period");
                    return;
                }
            }
        }
    }

    /// The TLS handshake, its signature off the tokio workers (see [`serve`]).
    async fn handshake(
        &self,
        tcp: tokio::net::TcpStream,
        config: Arc<rustls::ServerConfig>,
    ) -> std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
        let _in_flight = Gauge::up(&self.stats, |s| &s.handshakes_in_flight);
        let _slot = self
            .handshakes
            .acquire()
            .await
            .map_err(std::io::Error::other)?;
        let start =
            tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp).await?;
        let accept = tokio::task::spawn_blocking(move || start.into_stream(config))
            .await
            .map_err(std::io::Error::other)?;
        accept.await
    }

    /// One request: the body under its deadline, the TLS identity attached, and the
    /// connection's activity kept until the response body is sent.
    fn call(
        self: &Arc<Self>,
        app: TowerToHyperService<Router>,
        request: hyper::Request<hyper::body::Incoming>,
        (identity, peer_certificate, roles): (ClientIdentity, PeerCertificate, TrustedRoles),
        activity: &Arc<Activity>,
    ) -> impl std::future::Future<
        Output = Result<hyper::Response<ResponseBody>, std::convert::Infallible>,
    > + Send
           + 'static {
        #[allow(unused_imports)]
        use hyper::service::Service as _;
        let busy = Activity::begin(activity);
        let version = request.version();
        let timed_out = Arc::new(AtomicBool::new(false));
        // HTTP/2: a request body dropped before the response is sent makes h2 reset the
        // stream with CANCEL, and clients (curl) then lose the response (a 413 or 415 sent
        // before the body was read). Kept until the response body is done, the reset is
        // NO_ERROR after a complete response, as RFC 9113 8.1 allows.
        let parked = (version == hyper::Version::HTTP_2).then(|| Arc::new(ParkedBody::default()));
        let body_timeout = self.limits.body_read_timeout;
        let body_deadline = tokio::time::Instant::now() + body_timeout;
        let mut request = request.map(|body| RequestBody {
            inner: Some(body),
            deadline_at: body_deadline,
            deadline: None,
            timeout: body_timeout,
            timed_out: timed_out.clone(),
            parked: parked.clone(),
        });
        request.extensions_mut().insert(identity);
        request.extensions_mut().insert(peer_certificate);
        request.extensions_mut().insert(roles);
        let stats = self.stats.clone();
        async move {
            let response = match app.call(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            if let Some(parked) = &parked {
                parked.drain(body_deadline).await;
            }
            let response = if timed_out.load(Ordering::Relaxed) {
                stats.body_read_timeouts.fetch_add(1, Ordering::Relaxed);
                crate::metrics::connection_closed("body_read_timeout");
                let mut response = problem_details(
                    408,
                    None,
                    &format!(
                        "the request body did not arrive within {} s",
                        body_timeout.as_secs()
                    ),
                );
                if version < hyper::Version::HTTP_2 {
                    // The rest of the body may still come: this connection cannot carry
                    // another request (RFC 9110 15.5.9).
                    response.headers_mut().insert(
                        axum::http::header::CONNECTION,
                        axum::http::HeaderValue::from_static("close"),
                    );
                }
                response
            } else {
                response
            };
            Ok(response.map(|inner| ResponseBody {
                inner,
                _busy: busy,
                _parked: parked,
            }))
        }
    }
}

/// When a connection last had no request in flight.
struct Activity {
    in_flight: std::sync::atomic::AtomicUsize,
    idle_since: std::sync::Mutex<tokio::time::Instant>,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            in_flight: std::sync::atomic::AtomicUsize::new(0),
            idle_since: std::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }

    fn begin(activity: &Arc<Activity>) -> Busy {
        activity.in_flight.fetch_add(1, Ordering::SeqCst);
        Busy(activity.clone())
    }

    fn idle_since(&self) -> tokio::time::Instant {
        // A poisoned lock only means a panic elsewhere held it; the instant is still valid.
        *self
            .idle_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether no request has been in flight for `idle`.
    fn idle_for(&self, idle: Duration) -> bool {
        self.in_flight.load(Ordering::SeqCst) == 0 && self.idle_since().elapsed() >= idle
    }

    /// When to look again: `idle` after the connection went idle, or after now while busy.
    fn next_check(&self, idle: Duration) -> tokio::time::Instant {
        if self.in_flight.load(Ordering::SeqCst) == 0 {
            self.idle_since() + idle
        } else {
            tokio::time::Instant::now() + idle
        }
    }
}

/// A request in flight, until its response body is dropped.
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        *self
            .0
            .idle_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = tokio::time::Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An HTTP/2 request body the handler dropped unread, kept until the response is done.
#[derive(Default)]
struct ParkedBody(std::sync::Mutex<Option<hyper::body::Incoming>>);

/// The most of an unread HTTP/2 request body read and discarded before the answer.
const DRAIN_LIMIT: usize = 4 << 20;

impl ParkedBody {
    /// Read and discard what the handler left of the body, up to [`DRAIN_LIMIT`] bytes and
    /// the body's deadline, so that the answer (a 413 or 415 sent unread) ends a complete
    /// exchange: a stream reset while the client still uploads, even RST_STREAM(NO_ERROR)
    /// after the response as RFC 9113 8.1 allows, makes curl 7.88 report "stream error"
    /// instead of the status. A body beyond the bound is left to that reset.
    async fn drain(&self, deadline: tokio::time::Instant) {
        use http_body_util::BodyExt;
        let taken = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let Some(mut body) = taken else { return };
        let mut read = 0usize;
        let drained = tokio::time::timeout_at(deadline, async {
            while read <= DRAIN_LIMIT {
                match body.frame().await {
                    Some(Ok(frame)) => {
                        read += frame.data_ref().map_or(0, |data| data.len());
                    }
                    Some(Err(_)) | None => return true,
                }
            }
            false
        })
        .await;
        if drained != Ok(true) {
            *self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(body);
        }
    }
}

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RequestBodyError {
    #[error("reading the request body: {0}")]
    Read(#[source] hyper::Error),
    #[error("the request body did not arrive within {0:?}")]
    Deadline(Duration),
}

/// The request body with a deadline for all of it.
struct RequestBody {
    inner: Option<hyper::body::Incoming>,
    deadline_at: tokio::time::Instant,
    /// The timer, set only once the body makes the reader wait (most bodies arrive with
    /// their headers).
    deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    timeout: Duration,
    timed_out: Arc<AtomicBool>,
    parked: Option<Arc<ParkedBody>>,
}

impl hyper::body::Body for RequestBody {
    type Data = hyper::body::Bytes;
    type Error = RequestBodyError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        use std::task::Poll;
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        if let Poll::Ready(frame) = std::pin::Pin::new(inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(RequestBodyError::Read)));
        }
        let deadline = this
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(this.deadline_at)));
        if std::future::Future::poll(deadline.as_mut(), cx).is_ready() {
            this.timed_out.store(true, Ordering::Relaxed);
            return Poll::Ready(Some(Err(RequestBodyError::Deadline(this.timeout))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner
            .as_ref()
            .is_none_or(hyper::body::Body::is_end_stream)
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.as_ref().map_or_else(
            || hyper::body::SizeHint::with_exact(0),
            hyper::body::Body::size_hint,
        )
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        if let (Some(parked), Some(inner)) = (&self.parked, self.inner.take()) {
            if !hyper::body::Body::is_end_stream(&inner) {
                *parked
                    .0
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(inner);
            }
        }
    }
}

/// The response body, holding the request's activity mark (and an unread HTTP/2 request
/// body) until hyper has sent it and drops it.
pub struct ResponseBody {
    inner: axum::body::Body,
    _busy: Busy,
    _parked: Option<Arc<ParkedBody>>,
}

impl hyper::body::Body for ResponseBody {
    type Data = hyper::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// A gauge of [`ServerStats`] held up while this lives.
struct Gauge<'a>(&'a AtomicU64);

impl<'a> Gauge<'a> {
    fn up(stats: &'a ServerStats, gauge: impl Fn(&ServerStats) -> &AtomicU64) -> Gauge<'a> {
        let gauge = gauge(stats);
        gauge.fetch_add(1, Ordering::Relaxed);
        Gauge(gauge)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A warning at most once per 10 s, with the count of events since the last one: a flood
/// of refused connections or failed accepts must not also flood the log.
#[derive(Default)]
struct EveryTenSeconds {
    last: Option<std::time::Instant>,
    since_last: u64,
}

impl EveryTenSeconds {
    /// Count one event; whether to warn now.
    fn due(&mut self) -> bool {
        self.since_last += 1;
        self.last
            .is_none_or(|last| last.elapsed() >= Duration::from_secs(10))
    }

    /// The events since the last warning, which is now.
    fn take(&mut self) -> u64 {
        self.last = Some(std::time::Instant::now());
        std::mem::take(&mut self.since_last)
    }
}

/// Resolve on SIGTERM or SIGINT.
pub fn termination_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    // The handlers are installed now, when this is called, not when the future is first
    // polled: called before READY=1, a SIGTERM that follows READY at once is a clean stop
    // (the default action would kill the process with status 15).
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM: stopping"),
                    _ = int.recv() => tracing::info!("SIGINT: stopping"),
                }
            }
            _ => {
                // Without signal handlers, only Ctrl-C via the default path can stop us.
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}
