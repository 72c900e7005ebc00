//! The Sc-Vi client: OpenStack APIs through Keystone v3 (IFA 033 clause 8, the VIM as the
//! producer of the Telemetry Information Management interface).
//!
//! - Authentication: Keystone v3 `POST /v3/auth/tokens`, with an application credential
//!   (preferred: bound to one project, role-limited, revocable on its own) or a password
//!   scoped to a project. The token (`X-Subject-Token`) is renewed before its `expires_at`
//!   and once more when a service answers 401 (revoked, or Keystone restarted with new keys).
//! - Endpoints come from the token's catalog, by service type, interface and region.
//! - Microversions are pinned (see [`COMPUTE_MICROVERSION`] and the others): the answers'
//!   shapes are what this code was written and tested against, whatever the cloud's maximum.
//! - Transport: hyper HTTP/1.1 over rustls, the project's stack (as [`crate::client`]), with a
//!   pool of keep-alive connections per endpoint, a per-request timeout and a cap on the
//!   response size. TLS uses the configured roots and, when configured, the SM's own client
//!   key in the HSM/TPM (IFA 033 Security.001: a key of its own for Sc-Vi). `http://` is
//!   accepted only to loopback addresses (a development cloud on this host).
//! - Lists: [`VimClient::get_all`] follows OpenStack paging (`limit`/`marker`, `*_links`
//!   `next`, Glance's `next`, a `Link` header) to the end: the caller gets the complete list
//!   or an error, never a shorter list.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};

use crate::config::VimConfig;
use crate::keys::backends::Backends;
use crate::keys::signer::HardwareKey;

/// Nova microversion. 2.79 because:
/// - servers carry `OS-EXT-SRV-ATTR:host`/`hypervisor_hostname` (admin), `tags` (2.26),
///   the embedded flavor (2.47, no flavor lookups per server), `OS-EXT-AZ:availability_zone`;
/// - hypervisors are addressed by UUID (2.53) and still report `vcpus`, `memory_mb`,
///   `local_gb`, `running_vms` and their use; 2.88 removed those fields (and
///   `/os-hypervisors/statistics`) in favour of Placement. Capacity is read from Placement
///   anyway; 2.79 keeps the hypervisor figures as a cross-check for clouds whose Placement
///   the SM user may not read, and is supported by every Nova since Train.
pub const COMPUTE_MICROVERSION: &str = "2.79";
/// Placement 1.39 (Zed's maximum; >= 1.14 nested providers, 1.19 aggregates with generation,
/// 1.9 `/usages?project_id=`): the capacity and usage view.
pub const PLACEMENT_MICROVERSION: &str = "1.39";
/// Cinder 3.60: volume lists filterable by time, `volumes_links` paging, attachment details
/// with host names (3.27 attachments API); supported since Ussuri.
pub const VOLUME_MICROVERSION: &str = "3.60";

/// How long a TLS client handshake waits for its signature by the HSM/TPM.
const CLIENT_SIGN_DEADLINE: Duration = Duration::from_secs(5);
/// Idle connections kept per endpoint.
const POOL_PER_ENDPOINT: usize = 8;
/// Pages followed at most for one list (a loop guard: `page_size` x this many items).
const MAX_PAGES: usize = 10_000;

/// The OpenStack services the SM reads on Sc-Vi.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Service {
    /// Nova.
    Compute,
    /// Placement (capacity, usage, aggregates of resource providers).
    Placement,
    /// Neutron.
    Network,
    /// Cinder v3.
    Volume,
    /// Glance v2.
    Image,
    /// Aodh.
    Alarm,
    /// Keystone itself, through its catalog endpoint (`/v3/...` below it): users, roles,
    /// application credentials.
    Identity,
}

impl Service {
    pub const ALL: [Service; 7] = [
        Service::Compute,
        Service::Placement,
        Service::Network,
        Service::Volume,
        Service::Image,
        Service::Alarm,
        Service::Identity,
    ];

    /// Catalog service types, preferred first (Cinder registers `block-storage` and the
    /// older `volumev3`).
    pub fn catalog_types(self) -> &'static [&'static str] {
        match self {
            Service::Compute => &["compute"],
            Service::Placement => &["placement"],
            Service::Network => &["network"],
            Service::Volume => &["block-storage", "volumev3"],
            Service::Image => &["image"],
            Service::Alarm => &["alarming"],
            Service::Identity => &["identity"],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Service::Compute => "compute",
            Service::Placement => "placement",
            Service::Network => "network",
            Service::Volume => "volume",
            Service::Image => "image",
            Service::Alarm => "alarm",
            Service::Identity => "identity",
        }
    }

    /// The `OpenStack-API-Version` header value, for services with microversions.
    fn microversion(self) -> Option<String> {
        match self {
            Service::Compute => Some(format!("compute {COMPUTE_MICROVERSION}")),
            Service::Placement => Some(format!("placement {PLACEMENT_MICROVERSION}")),
            Service::Volume => Some(format!("volume {VOLUME_MICROVERSION}")),
            _ => None,
        }
    }
}

impl std::fmt::Display for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A failure talking to the VIM. Every variant names what was asked.
#[derive(Debug, thiserror::Error)]
pub enum VimError {
    /// The configuration or a local resource (roots, key, secret) is unusable.
    #[error("VIM client: {0}")]
    Setup(String),
    /// Keystone refused or failed the authentication.
    #[error("Keystone {url}: {reason}")]
    Auth {
        url: String,
        status: Option<u16>,
        reason: String,
    },
    /// The token's catalog has no endpoint for the service (not deployed, or not visible to
    /// this user, region or interface).
    #[error("{service}: no endpoint in the Keystone catalog ({reason})")]
    NoEndpoint { service: Service, reason: String },
    /// Nothing reached the service (connect or TLS failure).
    #[error("{service} {what}: unreachable: {reason}")]
    Unreachable {
        service: Service,
        what: String,
        reason: String,
    },
    /// The request may have reached the service; no (complete) answer came back.
    #[error("{service} {what}: no answer: {reason}")]
    NoAnswer {
        service: Service,
        what: String,
        reason: String,
    },
    /// The service answered with an error status; `message` is OpenStack's own message.
    #[error("{service} {what}: {status}: {message}")]
    Refused {
        service: Service,
        what: String,
        status: u16,
        message: String,
    },
    /// The answer is not what the API defines (not JSON, a list without its key, a page loop).
    #[error("{service} {what}: unexpected answer: {reason}")]
    Invalid {
        service: Service,
        what: String,
        reason: String,
    },
    /// The answer exceeded `max_response_bytes`.
    #[error("{service} {what}: answer larger than {limit} bytes")]
    TooLarge {
        service: Service,
        what: String,
        limit: usize,
    },
}

impl VimError {
    /// The HTTP status of a refused request (or of Keystone's refusal).
    pub fn status(&self) -> Option<u16> {
        match self {
            VimError::Refused { status, .. } => Some(*status),
            VimError::Auth { status, .. } => *status,
            _ => None,
        }
    }

    /// The service the request went to.
    pub fn service(&self) -> Option<Service> {
        match self {
            VimError::NoEndpoint { service, .. }
            | VimError::Unreachable { service, .. }
            | VimError::NoAnswer { service, .. }
            | VimError::Refused { service, .. }
            | VimError::Invalid { service, .. }
            | VimError::TooLarge { service, .. } => Some(*service),
            VimError::Setup(_) | VimError::Auth { .. } => None,
        }
    }

    /// OpenStack's message of a refusal (or the error text).
    pub fn message(&self) -> String {
        match self {
            VimError::Refused { message, .. } => message.clone(),
            VimError::Auth { reason, .. } => reason.clone(),
            other => other.to_string(),
        }
    }

    /// Worth another attempt later: the VIM unreachable, overloaded or failing (5xx, 429,
    /// 409 "in a task state"), or Keystone unreachable.
    pub fn is_transient(&self) -> bool {
        match self {
            VimError::Unreachable { .. } | VimError::NoAnswer { .. } => true,
            VimError::Refused { status, .. } => matches!(status, 409 | 429 | 500..=599),
            VimError::Auth { status, .. } => status.is_none_or(|s| matches!(s, 429 | 500..=599)),
            VimError::Setup(_)
            | VimError::NoEndpoint { .. }
            | VimError::Invalid { .. }
            | VimError::TooLarge { .. } => false,
        }
    }
}

/// Checks a VIM URL: `https://`, or `http://` to a loopback address only.
pub fn check_url(what: &str, url: &str) -> Result<(), String> {
    let parsed = Endpoint::parse(url).map_err(|e| format!("{what}: {e}"))?;
    if !parsed.tls && !parsed.is_loopback() {
        return Err(format!(
            "{what}: '{url}': http:// only to a loopback address; use https:// \
             (IFA 033 Security.005: telemetry confidentiality)"
        ));
    }
    Ok(())
}

/// A parsed endpoint URL.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Endpoint {
    tls: bool,
    /// `host:port` as in the URL (the pool key together with `tls`).
    authority: String,
    host: String,
    port: u16,
    /// Path prefix without a trailing slash ("" or "/v2.1").
    path: String,
}

impl Endpoint {
    fn parse(url: &str) -> Result<Endpoint, String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!("'{url}': not an http(s) URL"));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(format!("'{url}': no host (or user info, not allowed)"));
        }
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("'{url}': bad IPv6 literal"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| format!("'{url}': bad port"))?,
                None => default_port,
            };
            (h.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (
                    h.to_string(),
                    p.parse().map_err(|_| format!("'{url}': bad port"))?,
                ),
                None => (authority.to_string(), default_port),
            }
        };
        Ok(Endpoint {
            tls,
            authority: authority.to_string(),
            host,
            port,
            path: path.to_string(),
        })
    }

    fn is_loopback(&self) -> bool {
        self.host == "localhost"
            || self
                .host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }

    fn key(&self) -> String {
        format!(
            "{}://{}",
            if self.tls { "https" } else { "http" },
            self.authority
        )
    }
}

/// The token and what came with it.
struct Token {
    value: SecretString,
    /// When to renew: before `expires_at` by `renew_before` (or half the lifetime when the
    /// token lives shorter than twice that).
    renew_at: SystemTime,
    endpoints: HashMap<Service, Endpoint>,
    missing: HashMap<Service, String>,
    info: TokenInfo,
    /// Bumped on each issue: a 401 renews only the token that was refused.
    serial: u64,
}

/// What the SM may show about its VIM session (never the token itself).
#[derive(Clone, Debug, serde::Serialize)]
pub struct TokenInfo {
    pub user_id: String,
    pub project_id: String,
    pub project_name: String,
    pub roles: Vec<String>,
    /// RFC 3339.
    pub expires_at: String,
    pub auth_method: String,
    /// The configured region (the NFVI-PoP of the answers).
    pub region: Option<String>,
    /// Every service type in the catalog (to tell "not deployed" from "not mapped").
    pub catalog_types: Vec<String>,
    /// Service -> endpoint URL found in the catalog.
    pub endpoints: std::collections::BTreeMap<String, String>,
}

enum Credentials {
    AppCredential {
        id: String,
        secret: SecretString,
    },
    Password {
        user: String,
        user_domain: String,
        project: String,
        project_domain: String,
        secret: SecretString,
    },
}

impl Credentials {
    fn body(&self) -> Value {
        match self {
            Credentials::AppCredential { id, secret } => json!({"auth": {"identity": {
                "methods": ["application_credential"],
                "application_credential": {"id": id, "secret": secret.expose_secret()}}}}),
            Credentials::Password {
                user,
                user_domain,
                project,
                project_domain,
                secret,
            } => json!({"auth": {
                "identity": {"methods": ["password"], "password": {"user": {
                    "name": user, "domain": {"name": user_domain},
                    "password": secret.expose_secret()}}},
                "scope": {"project": {"name": project, "domain": {"name": project_domain}}}}}),
        }
    }

    fn method(&self) -> &'static str {
        match self {
            Credentials::AppCredential { .. } => "application_credential",
            Credentials::Password { .. } => "password",
        }
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

struct Inner {
    auth: Endpoint,
    credentials: Credentials,
    region: Option<String>,
    interface: String,
    tls: Option<tokio_rustls::TlsConnector>,
    timeout: Duration,
    max_body: usize,
    page_size: usize,
    renew_before: Duration,
    token: tokio::sync::Mutex<Option<Arc<Token>>>,
    serial: AtomicU64,
    pool: std::sync::Mutex<HashMap<String, Vec<Sender>>>,
}

/// The VIM client: cheap to clone, shared by every task of the SM.
#[derive(Clone)]
pub struct VimClient {
    inner: Arc<Inner>,
}

/// A response read whole.
struct Response {
    status: u16,
    headers: hyper::HeaderMap,
    body: Bytes,
}

impl VimClient {
    /// Builds the client and authenticates once (a wrong credential or an unreachable
    /// Keystone fails here, not at the first query). `backends` is needed only when
    /// `[sm.vim.client]` names a key in the HSM/TPM.
    pub async fn connect(
        config: &VimConfig,
        backends: Option<&Backends>,
    ) -> Result<VimClient, VimError> {
        check_url("sm.vim.auth_url", &config.auth_url).map_err(VimError::Setup)?;
        let auth = Endpoint::parse(&config.auth_url).map_err(VimError::Setup)?;
        let credentials = match (&config.application_credential, &config.password) {
            (Some(ac), None) => Credentials::AppCredential {
                id: ac.id.clone(),
                secret: ac
                    .secret
                    .read()
                    .map_err(|e| VimError::Setup(format!("application credential: {e}")))?,
            },
            (None, Some(p)) => Credentials::Password {
                user: p.user.clone(),
                user_domain: p.user_domain.clone(),
                project: p.project.clone(),
                project_domain: p.project_domain.clone(),
                secret: p
                    .secret
                    .read()
                    .map_err(|e| VimError::Setup(format!("password: {e}")))?,
            },
            _ => {
                return Err(VimError::Setup(
                    "exactly one of application_credential or password".into(),
                ))
            }
        };
        let tls = tls_connector(config, backends)?;
        let inner = Inner {
            auth,
            credentials,
            region: config.region.clone(),
            interface: config.interface.clone(),
            tls,
            timeout: Duration::from_secs(config.timeout_seconds.max(1)),
            max_body: config.max_response_bytes,
            page_size: config.page_size.max(1),
            renew_before: Duration::from_secs(config.renew_before_seconds),
            token: tokio::sync::Mutex::new(None),
            serial: AtomicU64::new(0),
            pool: std::sync::Mutex::new(HashMap::new()),
        };
        let client = VimClient {
            inner: Arc::new(inner),
        };
        client.current_token().await?;
        Ok(client)
    }

    /// GET a JSON document. `path_and_query` is relative to the service's catalog endpoint
    /// (`/servers/detail` for Nova, `/v2.0/ports` for Neutron, `/v2/images` for Glance,
    /// `/volumes/detail` for Cinder, `/resource_providers` for Placement, `/v2/alarms` for
    /// Aodh).
    pub async fn get(&self, service: Service, path_and_query: &str) -> Result<Value, VimError> {
        let (response, what) = self.call(service, "GET", path_and_query, None).await?;
        parse_json(service, &what, &response.body)
    }

    /// POST JSON; `None` for an answer without a body (202, 204).
    pub async fn post(
        &self,
        service: Service,
        path: &str,
        body: &Value,
    ) -> Result<Option<Value>, VimError> {
        let (response, what) = self.call(service, "POST", path, Some(body)).await?;
        optional_json(service, &what, &response.body)
    }

    /// PUT JSON; `None` for an answer without a body.
    pub async fn put(
        &self,
        service: Service,
        path: &str,
        body: &Value,
    ) -> Result<Option<Value>, VimError> {
        let (response, what) = self.call(service, "PUT", path, Some(body)).await?;
        optional_json(service, &what, &response.body)
    }

    /// DELETE. A 404 is an error with its status: whether "already gone" is success is the
    /// caller's judgement.
    pub async fn delete(&self, service: Service, path: &str) -> Result<(), VimError> {
        self.call(service, "DELETE", path, None).await.map(|_| ())
    }

    /// Every item of an OpenStack list: `key` is the list's member (`servers`, `ports`,
    /// `images`, `volumes`, ...). Pages of `page_size` are requested (unless the path sets
    /// `limit` itself) and followed to the end; any failure on the way is an error.
    pub async fn get_all(
        &self,
        service: Service,
        path_and_query: &str,
        key: &str,
    ) -> Result<Vec<Value>, VimError> {
        let mut path = path_and_query.to_string();
        if !has_param(&path, "limit") {
            path.push(if path.contains('?') { '&' } else { '?' });
            path.push_str(&format!("limit={}", self.inner.page_size));
        }
        let mut items = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut absolute = false;
        for _ in 0..MAX_PAGES {
            let (response, what) = if absolute {
                self.call_absolute(service, "GET", &path, None).await?
            } else {
                self.call(service, "GET", &path, None).await?
            };
            let page = parse_json(service, &what, &response.body)?;
            // Aodh answers a bare array; the others an object with the list under `key`.
            let list = match &page {
                Value::Array(items) => Some(items),
                other => other.get(key).and_then(Value::as_array),
            }
            .ok_or_else(|| VimError::Invalid {
                service,
                what: what.clone(),
                reason: format!("no '{key}' list"),
            })?;
            let empty = list.is_empty();
            items.extend(list.iter().cloned());
            let Some(next) = next_page(&page, key, &response.headers) else {
                return Ok(items);
            };
            // Nova answers a last full page with a `next` link to an empty page: done then.
            if empty {
                return Ok(items);
            }
            let (next_path, next_absolute) = self.next_path(service, &next).await?;
            if !seen.insert(next_path.clone()) {
                return Err(VimError::Invalid {
                    service,
                    what,
                    reason: format!("paging loops back to {next_path}"),
                });
            }
            path = next_path;
            absolute = next_absolute;
        }
        Err(VimError::Invalid {
            service,
            what: path_and_query.into(),
            reason: format!("more than {MAX_PAGES} pages"),
        })
    }

    /// The session's identity, roles, expiry and endpoints (never the token).
    pub async fn token_info(&self) -> Result<TokenInfo, VimError> {
        Ok(self.current_token().await?.info.clone())
    }

    /// The current token. For the operator's diagnostics and for tests that revoke it; the
    /// SM itself never shows or logs it.
    pub async fn token(&self) -> Result<SecretString, VimError> {
        Ok(self.current_token().await?.value.clone())
    }

    /// Tokens issued by Keystone to this client so far (1 after `connect`).
    pub fn tokens_issued(&self) -> u64 {
        self.inner.serial.load(Ordering::Relaxed)
    }

    /// The catalog endpoint of a service, if the token's catalog has one.
    pub async fn endpoint(&self, service: Service) -> Result<String, VimError> {
        let token = self.current_token().await?;
        endpoint_of(&token, service).map(|e| format!("{}{}", e.key(), e.path))
    }

    /// Whether the catalog has the service.
    pub async fn has_service(&self, service: Service) -> Result<bool, VimError> {
        Ok(self.current_token().await?.endpoints.contains_key(&service))
    }

    /// Revoke the current token at Keystone (`DELETE /v3/auth/tokens`), e.g. at shutdown:
    /// a token the SM no longer uses should not stay valid for hours. The next request
    /// authenticates again.
    pub async fn revoke(&self) -> Result<(), VimError> {
        let Some(token) = self.inner.token.lock().await.take() else {
            return Ok(());
        };
        self.revoke_token_with(&token.value, &token.value).await
    }

    /// Revoke any token (`DELETE /v3/auth/tokens`, X-Subject-Token), authorised by this
    /// client's own token: an operator's tool for a leaked token, and how the tests revoke
    /// another client's session.
    pub async fn revoke_token(&self, token: &SecretString) -> Result<(), VimError> {
        let own = self.current_token().await?;
        self.revoke_token_with(&own.value, token).await
    }

    async fn revoke_token_with(
        &self,
        auth: &SecretString,
        token: &SecretString,
    ) -> Result<(), VimError> {
        let headers = vec![
            ("x-auth-token", auth.expose_secret().to_string()),
            ("x-subject-token", token.expose_secret().to_string()),
        ];
        let path = format!("{}/auth/tokens", self.inner.auth.path);
        let response = self
            .send(&self.inner.auth, "DELETE", &path, &headers, None)
            .await
            .map_err(|(e, _)| self.auth_error(None, e))?;
        if response.status >= 400 && response.status != 404 {
            return Err(self.auth_error(Some(response.status), error_message(&response.body)));
        }
        Ok(())
    }

    fn auth_error(&self, status: Option<u16>, reason: String) -> VimError {
        VimError::Auth {
            url: format!(
                "{}{}/auth/tokens",
                self.inner.auth.key(),
                self.inner.auth.path
            ),
            status,
            reason,
        }
    }

    /// The valid token, renewed when due.
    async fn current_token(&self) -> Result<Arc<Token>, VimError> {
        let mut slot = self.inner.token.lock().await;
        if let Some(token) = slot.as_ref() {
            if SystemTime::now() < token.renew_at {
                return Ok(token.clone());
            }
        }
        let token = Arc::new(self.issue().await?);
        *slot = Some(token.clone());
        Ok(token)
    }

    /// After a 401 with token `serial`: renew unless another task already did.
    async fn renew_after_401(&self, serial: u64) -> Result<Arc<Token>, VimError> {
        let mut slot = self.inner.token.lock().await;
        if let Some(token) = slot.as_ref() {
            if token.serial != serial && SystemTime::now() < token.renew_at {
                return Ok(token.clone());
            }
        }
        let token = Arc::new(self.issue().await?);
        *slot = Some(token.clone());
        Ok(token)
    }

    /// `POST /v3/auth/tokens` (Keystone v3 API, "Password authentication with scoped
    /// authorization" / "Authenticating with an Application Credential").
    async fn issue(&self) -> Result<Token, VimError> {
        let path = format!("{}/auth/tokens", self.inner.auth.path);
        let body = serde_json::to_vec(&self.inner.credentials.body())
            .map_err(|e| VimError::Setup(e.to_string()))?;
        let headers = vec![("content-type", "application/json".to_string())];
        let response = self
            .send(
                &self.inner.auth,
                "POST",
                &path,
                &headers,
                Some(Bytes::from(body)),
            )
            .await
            .map_err(|(e, _)| self.auth_error(None, e))?;
        if response.status != 201 {
            return Err(self.auth_error(Some(response.status), error_message(&response.body)));
        }
        let value = response
            .headers
            .get("x-subject-token")
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| self.auth_error(Some(201), "no X-Subject-Token header".into()))?
            .to_string();
        let doc: Value = serde_json::from_slice(&response.body)
            .map_err(|e| self.auth_error(Some(201), format!("token body is not JSON: {e}")))?;
        let t = &doc["token"];
        let expires_text = t["expires_at"]
            .as_str()
            .ok_or_else(|| self.auth_error(Some(201), "token without expires_at".into()))?;
        let expires_at = humantime::parse_rfc3339_weak(expires_text.trim_end_matches('Z'))
            .map_err(|e| self.auth_error(Some(201), format!("expires_at '{expires_text}': {e}")))?;
        let renew_at = renew_at(SystemTime::now(), expires_at, self.inner.renew_before);
        let (endpoints, missing) = self.catalog(&t["catalog"])?;
        let info = TokenInfo {
            user_id: t["user"]["id"].as_str().unwrap_or_default().to_string(),
            project_id: t["project"]["id"].as_str().unwrap_or_default().to_string(),
            project_name: t["project"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            roles: t["roles"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r["name"].as_str().map(String::from))
                .collect(),
            expires_at: expires_text.to_string(),
            auth_method: self.inner.credentials.method().to_string(),
            region: self.inner.region.clone(),
            catalog_types: t["catalog"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| e["type"].as_str().map(String::from))
                .collect(),
            endpoints: endpoints
                .iter()
                .map(|(s, e)| (s.name().to_string(), format!("{}{}", e.key(), e.path)))
                .collect(),
        };
        if info.project_id.is_empty() {
            return Err(self.auth_error(
                Some(201),
                "the token is not scoped to a project (the SM needs a project-scoped token)".into(),
            ));
        }
        let serial = self.inner.serial.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::info!(
            user = %info.user_id,
            project = %info.project_id,
            expires_at = %info.expires_at,
            method = info.auth_method,
            "VIM: Keystone token issued"
        );
        Ok(Token {
            value: SecretString::from(value),
            renew_at,
            endpoints,
            missing,
            info,
            serial,
        })
    }

    /// Picks each service's endpoint from the catalog: by type, interface and region.
    #[allow(clippy::type_complexity)]
    fn catalog(
        &self,
        catalog: &Value,
    ) -> Result<(HashMap<Service, Endpoint>, HashMap<Service, String>), VimError> {
        let mut endpoints = HashMap::new();
        let mut missing = HashMap::new();
        let entries = catalog.as_array().cloned().unwrap_or_default();
        for service in Service::ALL {
            let mut found = None;
            'types: for kind in service.catalog_types() {
                for entry in entries.iter().filter(|e| e["type"].as_str() == Some(kind)) {
                    for ep in entry["endpoints"].as_array().into_iter().flatten() {
                        let interface_ok =
                            ep["interface"].as_str() == Some(self.inner.interface.as_str());
                        let region_ok = match &self.inner.region {
                            Some(r) => {
                                ep["region"].as_str() == Some(r)
                                    || ep["region_id"].as_str() == Some(r)
                            }
                            None => true,
                        };
                        if interface_ok && region_ok {
                            if let Some(url) = ep["url"].as_str() {
                                found = Some(url.to_string());
                                break 'types;
                            }
                        }
                    }
                }
            }
            match found {
                Some(url) => {
                    check_url(&format!("catalog endpoint of {service}"), &url)
                        .map_err(VimError::Setup)?;
                    let endpoint = Endpoint::parse(&url).map_err(VimError::Setup)?;
                    endpoints.insert(service, endpoint);
                }
                None => {
                    missing.insert(
                        service,
                        format!(
                            "no '{}' endpoint with interface {}{}",
                            service.catalog_types().join("' or '"),
                            self.inner.interface,
                            self.inner
                                .region
                                .as_ref()
                                .map(|r| format!(" in region {r}"))
                                .unwrap_or_default()
                        ),
                    );
                }
            }
        }
        Ok((endpoints, missing))
    }

    /// One request to a service, renewing the token once on 401. Success is a status < 400.
    async fn call(
        &self,
        service: Service,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(Response, String), VimError> {
        let token = self.current_token().await?;
        let endpoint = endpoint_of(&token, service)?;
        let full = format!("{}{}", endpoint.path, path);
        self.call_with(service, method, &full, body, token).await
    }

    /// [`Self::call`] with a path already absolute on the endpoint's authority (a next link).
    async fn call_absolute(
        &self,
        service: Service,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(Response, String), VimError> {
        let token = self.current_token().await?;
        self.call_with(service, method, path, body, token).await
    }

    async fn call_with(
        &self,
        service: Service,
        method: &str,
        full: &str,
        body: Option<&Value>,
        mut token: Arc<Token>,
    ) -> Result<(Response, String), VimError> {
        let what = format!("{method} {full}");
        let bytes = match body {
            Some(b) => {
                Some(Bytes::from(serde_json::to_vec(b).map_err(|e| {
                    VimError::Setup(format!("{what}: body: {e}"))
                })?))
            }
            None => None,
        };
        let mut renewed = false;
        loop {
            let endpoint = endpoint_of(&token, service)?.clone();
            let mut headers = vec![
                ("x-auth-token", token.value.expose_secret().to_string()),
                ("accept", "application/json".to_string()),
            ];
            if bytes.is_some() {
                headers.push(("content-type", "application/json".to_string()));
            }
            if let Some(v) = service.microversion() {
                headers.push(("openstack-api-version", v));
            }
            if service == Service::Compute {
                // Nova before 2.27 reads only its own header; sent too for older proxies.
                headers.push((
                    "x-openstack-nova-api-version",
                    COMPUTE_MICROVERSION.to_string(),
                ));
            }
            let response = match self
                .send(&endpoint, method, full, &headers, bytes.clone())
                .await
            {
                Ok(r) => r,
                Err((reason, Sent::No)) => {
                    return Err(VimError::Unreachable {
                        service,
                        what,
                        reason,
                    })
                }
                Err((reason, Sent::Maybe)) => {
                    return Err(VimError::NoAnswer {
                        service,
                        what,
                        reason,
                    })
                }
                Err((_, Sent::TooLarge)) => {
                    return Err(VimError::TooLarge {
                        service,
                        what,
                        limit: self.inner.max_body,
                    })
                }
            };
            if response.status == 401 && !renewed {
                // Revoked or expired early (Keystone key rotation, a restart): one renewal.
                tracing::info!(%service, "VIM: 401, renewing the Keystone token");
                token = self.renew_after_401(token.serial).await?;
                renewed = true;
                continue;
            }
            if response.status >= 400 {
                return Err(VimError::Refused {
                    service,
                    what,
                    status: response.status,
                    message: error_message(&response.body),
                });
            }
            return Ok((response, what));
        }
    }

    /// A next-page link as a path on the service's endpoint: absolute URLs keep their path
    /// (the catalog's authority is used: proxies may rewrite hosts), relative links (Glance's
    /// `next`) are relative to the endpoint's path.
    async fn next_path(&self, service: Service, next: &str) -> Result<(String, bool), VimError> {
        if next.starts_with("http://") || next.starts_with("https://") {
            let rest = next.split_once("://").map(|(_, r)| r).unwrap_or(next);
            let path = rest.find('/').map(|i| &rest[i..]).unwrap_or("/");
            return Ok((path.to_string(), true));
        }
        let token = self.current_token().await?;
        let endpoint = endpoint_of(&token, service)?;
        Ok((format!("{}{}", endpoint.path, next), true))
    }

    /// One HTTP exchange on a pooled connection, bounded by the timeout and the size cap. A
    /// pooled keep-alive connection the server closed meanwhile (found out only when using
    /// it) is replaced once by a fresh one: nothing was sent on it.
    async fn send(
        &self,
        endpoint: &Endpoint,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: Option<Bytes>,
    ) -> Result<Response, (String, Sent)> {
        let key = endpoint.key();
        let pooled = {
            let mut pool = self.inner.pool.lock().unwrap_or_else(|p| p.into_inner());
            let list = pool.entry(key.clone()).or_default();
            let mut found = None;
            while let Some(sender) = list.pop() {
                if !sender.is_closed() {
                    found = Some(sender);
                    break;
                }
            }
            found
        };
        let was_pooled = pooled.is_some();
        let first = self
            .exchange(endpoint, pooled, method, path, headers, body.clone())
            .await;
        let (sender, response, keep) = match first {
            Err((reason, Sent::No)) if was_pooled => {
                tracing::debug!(%reason, "VIM: stale pooled connection, retrying on a fresh one");
                self.exchange(endpoint, None, method, path, headers, body)
                    .await?
            }
            other => other?,
        };
        if keep && !sender.is_closed() {
            let mut pool = self.inner.pool.lock().unwrap_or_else(|p| p.into_inner());
            let list = pool.entry(key).or_default();
            if list.len() < POOL_PER_ENDPOINT {
                list.push(sender);
            }
        }
        Ok(response)
    }

    async fn exchange(
        &self,
        endpoint: &Endpoint,
        pooled: Option<Sender>,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: Option<Bytes>,
    ) -> Result<(Sender, Response, bool), (String, Sent)> {
        let exchange = async {
            let mut sender = match pooled {
                Some(s) => s,
                None => self.open(endpoint).await.map_err(|e| (e, Sent::No))?,
            };
            sender
                .ready()
                .await
                .map_err(|e| (format!("connection: {e}"), Sent::No))?;
            let mut builder = hyper::Request::builder()
                .method(method)
                .uri(path)
                .header(hyper::header::HOST, &endpoint.authority)
                .header(hyper::header::USER_AGENT, "nfv-warden-sm");
            for (name, value) in headers {
                builder = builder.header(*name, value);
            }
            let request = builder
                .body(Full::new(body.unwrap_or_default()))
                .map_err(|e| (e.to_string(), Sent::No))?;
            let response = sender.send_request(request).await.map_err(|e| {
                // hyper tells when the request never left (a closed connection).
                let sent = if e.is_canceled() {
                    Sent::No
                } else {
                    Sent::Maybe
                };
                (e.to_string(), sent)
            })?;
            let status = response.status().as_u16();
            // HTTP/1.0 servers (Keystone's WSGI server) close after each answer.
            let keep = response.version() == hyper::Version::HTTP_11;
            let headers = response.headers().clone();
            let body = Limited::new(response.into_body(), self.inner.max_body)
                .collect()
                .await
                .map_err(|e| {
                    if e.downcast_ref::<http_body_util::LengthLimitError>()
                        .is_some()
                    {
                        (String::new(), Sent::TooLarge)
                    } else {
                        (format!("reading the answer: {e}"), Sent::Maybe)
                    }
                })?
                .to_bytes();
            Ok::<_, (String, Sent)>((
                sender,
                Response {
                    status,
                    headers,
                    body,
                },
                keep,
            ))
        };
        tokio::time::timeout(self.inner.timeout, exchange)
            .await
            .map_err(|_| {
                (
                    format!("no complete answer within {:?}", self.inner.timeout),
                    Sent::Maybe,
                )
            })?
    }

    async fn open(&self, endpoint: &Endpoint) -> Result<Sender, String> {
        let address = if endpoint.host.contains(':') {
            format!("[{}]:{}", endpoint.host, endpoint.port)
        } else {
            format!("{}:{}", endpoint.host, endpoint.port)
        };
        let tcp = tokio::net::TcpStream::connect(&address)
            .await
            .map_err(|e| format!("connect {address}: {e}"))?;
        tcp.set_nodelay(true).map_err(|e| e.to_string())?;
        if endpoint.tls {
            let connector = self.inner.tls.as_ref().ok_or_else(|| {
                format!("{address}: https endpoint but no TLS roots (sm.vim.ca) configured")
            })?;
            let name = ServerName::try_from(endpoint.host.clone())
                .map_err(|e| format!("'{}': {e}", endpoint.host))?;
            let tls = connector
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS handshake with {address}: {e}"))?;
            let (sender, connection) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                    .await
                    .map_err(|e| format!("HTTP handshake: {e}"))?;
            tokio::spawn(async move {
                let _ = connection.await;
            });
            Ok(sender)
        } else {
            let (sender, connection) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                    .await
                    .map_err(|e| format!("HTTP handshake: {e}"))?;
            tokio::spawn(async move {
                let _ = connection.await;
            });
            Ok(sender)
        }
    }
}

/// Whether a failed exchange may have reached the server.
enum Sent {
    No,
    Maybe,
    TooLarge,
}

/// When to renew a token: `renew_before` ahead of its expiry, or half-way through its life
/// when that is shorter (a short-lived token is not renewed on every request, nor used
/// until it expires mid-request).
fn renew_at(now: SystemTime, expires_at: SystemTime, renew_before: Duration) -> SystemTime {
    let lifetime = expires_at.duration_since(now).unwrap_or(Duration::ZERO);
    expires_at - renew_before.min(lifetime / 2)
}

fn endpoint_of(token: &Token, service: Service) -> Result<&Endpoint, VimError> {
    token
        .endpoints
        .get(&service)
        .ok_or_else(|| VimError::NoEndpoint {
            service,
            reason: token
                .missing
                .get(&service)
                .cloned()
                .unwrap_or_else(|| "not in the catalog".into()),
        })
}

/// The TLS connector: the configured roots and, when configured, the SM's Sc-Vi key.
fn tls_connector(
    config: &VimConfig,
    backends: Option<&Backends>,
) -> Result<Option<tokio_rustls::TlsConnector>, VimError> {
    let Some(ca) = &config.ca else {
        if config.client.is_some() {
            return Err(VimError::Setup(
                "sm.vim.client needs sm.vim.ca (TLS roots of the VIM)".into(),
            ));
        }
        return Ok(None);
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)
        .map_err(|e| VimError::Setup(format!("{}: {e}", ca.display())))?
    {
        let cert = cert.map_err(|e| VimError::Setup(format!("{}: {e}", ca.display())))?;
        roots
            .add(cert)
            .map_err(|e| VimError::Setup(format!("{}: {e}", ca.display())))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| VimError::Setup(e.to_string()))?
        .with_root_certificates(roots);
    let tls = match &config.client {
        None => builder.with_no_client_auth(),
        Some(client) => {
            let setup = |e: String| VimError::Setup(format!("sm.vim.client: {e}"));
            let backends = backends.ok_or_else(|| {
                setup("a client key is configured but no HSM/TPM backends were given".into())
            })?;
            let pem = std::fs::read_to_string(&client.certificate).map_err(|e| {
                setup(format!(
                    "{}: {e} (issue it with the operator's PKI for the key {})",
                    client.certificate.display(),
                    client.key
                ))
            })?;
            let chain: Vec<CertificateDer<'static>> = crate::pki::certificates_from_pem(&pem)
                .map_err(setup)?
                .iter()
                .map(|c| der::Encode::to_der(c).map(CertificateDer::from))
                .collect::<Result<_, _>>()
                .map_err(|e| setup(e.to_string()))?;
            let store = backends
                .for_key(&client.key)
                .map_err(|e| setup(e.to_string()))?;
            let key =
                HardwareKey::new(store, client.key.clone()).map_err(|e| setup(e.to_string()))?;
            // Sign on a pool's threads with a deadline: a hung HSM/TPM fails that handshake
            // instead of holding a runtime worker (as the Sc-Or clients).
            let pool = crate::keys::signer::SigningPool::new(
                1,
                16,
                CLIENT_SIGN_DEADLINE,
                Arc::new(AtomicU64::new(0)),
            )
            .map_err(|e| setup(format!("signing thread: {e}")))?;
            let key = key.into_rustls_bounded(Arc::new(pool));
            let certified = Arc::new(rustls::sign::CertifiedKey::new(chain, key));
            builder.with_client_cert_resolver(Arc::new(FixedClientCert(certified)))
        }
    };
    Ok(Some(tokio_rustls::TlsConnector::from(Arc::new(tls))))
}

#[derive(Debug)]
struct FixedClientCert(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for FixedClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.0.key.choose_scheme(sigschemes)?;
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn has_param(path: &str, name: &str) -> bool {
    path.split_once('?')
        .is_some_and(|(_, q)| q.split('&').any(|kv| kv.split('=').next() == Some(name)))
}

/// The next page of a list: `<key>_links` rel=next (Nova, Neutron, Cinder), `next` (Glance),
/// or a `Link: <...>; rel="next"` header (Aodh).
fn next_page(page: &Value, key: &str, headers: &hyper::HeaderMap) -> Option<String> {
    if let Some(links) = page.get(format!("{key}_links")).and_then(Value::as_array) {
        if let Some(href) = links
            .iter()
            .find(|l| l["rel"].as_str() == Some("next"))
            .and_then(|l| l["href"].as_str())
        {
            return Some(href.to_string());
        }
    }
    if let Some(next) = page.get("next").and_then(Value::as_str) {
        return Some(next.to_string());
    }
    for value in headers.get_all(hyper::header::LINK) {
        let Ok(text) = value.to_str() else { continue };
        for part in text.split(',') {
            let mut pieces = part.split(';');
            let url = pieces.next().unwrap_or("").trim();
            if pieces
                .any(|p| p.trim().trim_matches('"') == "rel=next" || p.trim() == "rel=\"next\"")
            {
                return Some(
                    url.trim_start_matches('<')
                        .trim_end_matches('>')
                        .to_string(),
                );
            }
        }
    }
    None
}

fn parse_json(service: Service, what: &str, body: &[u8]) -> Result<Value, VimError> {
    serde_json::from_slice(body).map_err(|e| VimError::Invalid {
        service,
        what: what.to_string(),
        reason: format!("not JSON: {e}"),
    })
}

fn optional_json(service: Service, what: &str, body: &[u8]) -> Result<Option<Value>, VimError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    parse_json(service, what, body).map(Some)
}

/// OpenStack's error message from the many error body shapes: Nova/Cinder
/// `{"itemNotFound": {"message": ..}}`, Neutron `{"NeutronError": {"message": ..}}`,
/// Placement `{"errors": [{"detail": ..}]}`, Keystone `{"error": {"message": ..}}`, Aodh
/// `{"error_message": {"faultstring": ..}}`; else the text, shortened.
pub fn error_message(body: &[u8]) -> String {
    fn find(v: &Value, depth: usize) -> Option<String> {
        if depth > 4 {
            return None;
        }
        match v {
            Value::Object(map) => {
                for key in ["message", "detail", "faultstring", "title"] {
                    if let Some(Value::String(s)) = map.get(key) {
                        if !s.trim().is_empty() {
                            return Some(s.trim().to_string());
                        }
                    }
                }
                map.values().find_map(|v| find(v, depth + 1))
            }
            Value::Array(items) => items.iter().find_map(|v| find(v, depth + 1)),
            _ => None,
        }
    }
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        if let Some(m) = find(&v, 0) {
            // One line: Placement's messages carry blank lines.
            return shorten(&m.split_whitespace().collect::<Vec<_>>().join(" "));
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if text.is_empty() {
        "(no message)".into()
    } else {
        shorten(&text)
    }
}

fn shorten(text: &str) -> String {
    const MAX: usize = 400;
    if text.len() <= MAX {
        return text.to_string();
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_renewed_ahead_of_expiry() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let hour = Duration::from_secs(3600);
        let five = Duration::from_secs(300);
        assert_eq!(renew_at(now, now + hour, five), now + hour - five);
        // Short-lived (2 min): at half its life, not at once.
        let two = Duration::from_secs(120);
        assert_eq!(
            renew_at(now, now + two, five),
            now + Duration::from_secs(60)
        );
        // Already expired: renew now.
        assert!(renew_at(now, now - two, five) <= now);
    }

    #[test]
    fn urls_are_checked() {
        assert!(check_url("x", "https://keystone.example:5000/v3").is_ok());
        assert!(check_url("x", "http://127.0.0.1:5000/v3").is_ok());
        assert!(check_url("x", "http://[::1]:5000/v3").is_ok());
        assert!(check_url("x", "http://keystone.example:5000/v3").is_err());
        assert!(check_url("x", "ftp://x").is_err());
        assert!(check_url("x", "https://user@host/").is_err());
        let e = Endpoint::parse("http://127.0.0.1:18774/v2.1/").unwrap();
        assert_eq!((e.port, e.path.as_str()), (18774, "/v2.1"));
        let e = Endpoint::parse("https://[::1]/").unwrap();
        assert_eq!((e.host.as_str(), e.port, e.path.as_str()), ("::1", 443, ""));
    }

    #[test]
    fn error_messages_of_each_service_shape() {
        let cases: [(&str, &str); 5] = [
            (
                r#"{"itemNotFound": {"message": "Instance x could not be found.", "code": 404}}"#,
                "Instance x could not be found.",
            ),
            (
                r#"{"NeutronError": {"type": "PortNotFound", "message": "Port y could not be found.", "detail": ""}}"#,
                "Port y could not be found.",
            ),
            (
                r#"{"errors": [{"status": 404, "title": "Not Found", "detail": "No resource provider"}]}"#,
                "No resource provider",
            ),
            (
                r#"{"error": {"code": 401, "message": "The request you have made requires authentication.", "title": "Unauthorized"}}"#,
                "The request you have made requires authentication.",
            ),
            (
                "<html><body>403 Forbidden</body></html>",
                "<html><body>403 Forbidden</body></html>",
            ),
        ];
        for (body, message) in cases {
            assert_eq!(error_message(body.as_bytes()), message);
        }
    }

    #[test]
    fn next_links_of_each_service_shape() {
        let h = hyper::HeaderMap::new();
        let nova = json!({"servers": [], "servers_links": [{"rel": "next", "href": "http://n/v2.1/servers/detail?marker=a"}]});
        assert_eq!(
            next_page(&nova, "servers", &h).as_deref(),
            Some("http://n/v2.1/servers/detail?marker=a")
        );
        let glance = json!({"images": [], "next": "/v2/images?marker=b"});
        assert_eq!(
            next_page(&glance, "images", &h).as_deref(),
            Some("/v2/images?marker=b")
        );
        let mut h = hyper::HeaderMap::new();
        h.insert(
            hyper::header::LINK,
            "<http://a/v2/alarms?marker=c>; rel=\"next\""
                .parse()
                .unwrap(),
        );
        assert_eq!(
            next_page(&json!({"alarms": []}), "alarms", &h).as_deref(),
            Some("http://a/v2/alarms?marker=c")
        );
        assert_eq!(
            next_page(&json!({"ports": []}), "ports", &hyper::HeaderMap::new()),
            None
        );
        assert!(has_param("/x?a=1&limit=2", "limit"));
        assert!(!has_param("/x?climit=2", "limit"));
    }
}
