//! The SOL 005 client of the NFVO (Sc-Or producer): API version discovery, the `Version`
//! header, per-interface authentication, retries and the few resources the SM uses.
//!
//! Each Sc-Or interface (IFA 033 6.2-6.5) is its own client with its own TLS identity: with
//! `auth = "mtls"` a key of its own in the HSM/TPM (IFA 033 Security.001/.006); with
//! `auth = "oauth2"` a Bearer token from the client-credentials grant (RFC 6749 4.4), with
//! one OAuth2 client per interface, over server-authenticated TLS.
//!
//! Retries (SOL 013 6.4): 5xx, 429, 409 (another operation in progress) and connection
//! failures are retried with exponential backoff, honouring `Retry-After`. A request that
//! changes state and got no answer is never blindly repeated: the caller gets
//! [`NfvoError::NoAnswer`] and reconciles (looks for the operation occurrence) first.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use hyper::body::Bytes;
use rustls::pki_types::CertificateDer;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

use crate::client::{ClientKey, ClientResponse, Connection, HttpsClient};
use crate::config::{NfvoAuth, NfvoConfig};
use crate::keys::backends::Backends;
use crate::keys::signer::HardwareKey;

/// How long a TLS client handshake waits for its signature by the HSM/TPM.
const CLIENT_SIGN_DEADLINE: Duration = Duration::from_secs(5);

/// The Sc-Or interfaces of IFA 033 clause 6.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Interface {
    /// 6.2 NS Lifecycle Management: subscriptions and notifications.
    NsLcm,
    /// 6.3 Status Information Management: Query NS (and packages, op occurrences).
    StatusInfo,
    /// 6.4 Security Policy Enforcement: Update NS, Update VNF Package Info.
    SecEnforce,
    /// 6.5 Security VNF Management: Update NS for security VNFs.
    SecurityVnfMgmt,
}

impl Interface {
    pub const ALL: [Interface; 4] = [
        Interface::NsLcm,
        Interface::StatusInfo,
        Interface::SecEnforce,
        Interface::SecurityVnfMgmt,
    ];

    /// The config key and certificate name suffix.
    pub fn name(self) -> &'static str {
        match self {
            Interface::NsLcm => "ns_lcm",
            Interface::StatusInfo => "status_info",
            Interface::SecEnforce => "sec_enforce",
            Interface::SecurityVnfMgmt => "security_vnf_mgmt",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Which SOL 005 API a path belongs to (each has its own version).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    NsLcm,
    VnfPkgm,
}

impl Api {
    fn prefix(self) -> &'static str {
        match self {
            Api::NsLcm => "nslcm",
            Api::VnfPkgm => "vnfpkgm",
        }
    }
}

/// SOL 005 v3.7.1 API versions, used until `api_versions` says otherwise.
pub const NSLCM_VERSION: &str = "2.3.0";
pub const VNFPKGM_VERSION: &str = "2.4.0";

#[derive(Debug, thiserror::Error)]
pub enum NfvoError {
    /// Nothing reached the NFVO.
    #[error("{what}: NFVO unreachable: {reason}")]
    Unreachable { what: String, reason: String },
    /// The request may have reached the NFVO; its outcome is unknown.
    #[error("{what}: no answer from the NFVO: {reason}")]
    NoAnswer { what: String, reason: String },
    /// The NFVO answered with an error (its ProblemDetails detail).
    #[error("{what}: NFVO answered {status}: {detail}")]
    Refused {
        what: String,
        status: u16,
        detail: String,
        retry_after: Option<Duration>,
    },
    /// The NFVO's answer is not what SOL 005 says.
    #[error("{what}: unexpected answer: {reason}")]
    Invalid { what: String, reason: String },
    #[error("OAuth2 token from {url}: {reason}")]
    Token { url: String, reason: String },
    #[error("interface {0}: {1}")]
    Setup(&'static str, String),
}

impl NfvoError {
    pub fn status(&self) -> Option<u16> {
        match self {
            NfvoError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Worth another attempt later.
    pub fn is_transient(&self) -> bool {
        match self {
            NfvoError::Unreachable { .. } | NfvoError::NoAnswer { .. } => true,
            NfvoError::Refused { status, .. } => matches!(status, 409 | 429 | 500..=599),
            NfvoError::Token { .. } => true,
            NfvoError::Invalid { .. } | NfvoError::Setup(..) => false,
        }
    }
}

/// Whether a request may be repeated after an ambiguous failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Repeat {
    /// GET, DELETE, PATCH to a target state: repeat freely.
    Idempotent,
    /// POST that starts an operation: repeat only when the NFVO surely did not take it.
    Once,
}

/// One request to the NFVO.
pub struct Request<'a> {
    pub interface: Interface,
    pub api: Api,
    pub method: &'a str,
    /// Path under the API's URI prefix, e.g. `/ns_instances`.
    pub path: &'a str,
    pub body: Option<(&'a str, Vec<u8>)>,
    pub repeat: Repeat,
}

/// The NFVO client.
pub struct Nfvo {
    /// Path part of the apiRoot, without a trailing slash ("" or "/prefix").
    root_path: String,
    interfaces: Vec<InterfaceClient>,
    /// Per interface, with `auth = "oauth2"`.
    oauth: Vec<Option<OAuth2>>,
    versions: std::sync::Mutex<(String, String)>,
    timeout: Duration,
    attempts: u32,
}

struct InterfaceClient {
    https: HttpsClient,
    idle: tokio::sync::Mutex<Vec<Connection>>,
}

struct OAuth2 {
    url: String,
    path: String,
    client: HttpsClient,
    client_id: String,
    secret: SecretString,
    token: tokio::sync::Mutex<Option<(SecretString, Instant)>>,
}

impl Nfvo {
    /// Build the four interface clients; keys are looked up (not created) in the HSM/TPM.
    pub fn new(config: &NfvoConfig, backends: &Backends) -> Result<Nfvo, NfvoError> {
        let rest = config
            .api_root
            .strip_prefix("https://")
            .ok_or(NfvoError::Setup("api_root", "must be https://".into()))?;
        let root_path = rest
            .find('/')
            .map(|i| rest[i..].trim_end_matches('/').to_string())
            .unwrap_or_default();
        let mut interfaces = Vec::new();
        // The interface keys sign inside the TLS handshake, which tokio-rustls drives on a
        // runtime worker: sign on the pool's threads and wait at most its deadline, so a hung
        // HSM/TPM fails that connection instead of holding a worker for ever.
        let signing = match config.auth {
            NfvoAuth::Oauth2 => None,
            NfvoAuth::Mtls => Some(Arc::new(
                crate::keys::signer::SigningPool::new(
                    2,
                    16,
                    CLIENT_SIGN_DEADLINE,
                    Arc::new(std::sync::atomic::AtomicU64::new(0)),
                )
                .map_err(|e| NfvoError::Setup("signing threads", e.to_string()))?,
            )),
        };
        for interface in Interface::ALL {
            let key = match config.auth {
                NfvoAuth::Oauth2 => ClientKey::None,
                NfvoAuth::Mtls => {
                    let entry = match interface {
                        Interface::NsLcm => &config.interface.ns_lcm,
                        Interface::StatusInfo => &config.interface.status_info,
                        Interface::SecEnforce => &config.interface.sec_enforce,
                        Interface::SecurityVnfMgmt => &config.interface.security_vnf_mgmt,
                    }
                    .as_ref()
                    .ok_or(NfvoError::Setup(interface.name(), "not configured".into()))?;
                    let setup = |e: String| NfvoError::Setup(interface.name(), e);
                    let pem = std::fs::read_to_string(&entry.certificate).map_err(|e| {
                        setup(format!(
                            "{}: {e} (run `warden sm init`)",
                            entry.certificate.display()
                        ))
                    })?;
                    let chain: Vec<CertificateDer<'static>> =
                        crate::pki::certificates_from_pem(&pem)
                            .map_err(setup)?
                            .iter()
                            .map(|c| der::Encode::to_der(c).map(CertificateDer::from))
                            .collect::<Result<_, _>>()
                            .map_err(|e| setup(e.to_string()))?;
                    let store = backends
                        .for_key(&entry.key)
                        .map_err(|e| setup(e.to_string()))?;
                    let key = HardwareKey::new(store, entry.key.clone())
                        .map_err(|e| setup(e.to_string()))?;
                    let key = match &signing {
                        Some(pool) => key.into_rustls_bounded(pool.clone()),
                        None => key.into_rustls(),
                    };
                    ClientKey::Hardware { chain, key }
                }
            };
            let https = HttpsClient::with_key(&config.api_root, &config.ca, key)
                .map_err(|e| NfvoError::Setup(interface.name(), e))?
                .with_max_response_bytes(config.max_response_bytes);
            interfaces.push(InterfaceClient {
                https,
                idle: tokio::sync::Mutex::new(Vec::new()),
            });
        }
        let mut oauth = Vec::new();
        for interface in Interface::ALL {
            oauth.push(match (&config.auth, &config.oauth2) {
                (NfvoAuth::Oauth2, Some(o)) => {
                    let credentials = match interface {
                        Interface::NsLcm => &o.ns_lcm,
                        Interface::StatusInfo => &o.status_info,
                        Interface::SecEnforce => &o.sec_enforce,
                        Interface::SecurityVnfMgmt => &o.security_vnf_mgmt,
                    };
                    let setup =
                        |e: String| NfvoError::Setup(interface.name(), format!("oauth2: {e}"));
                    let secret = credentials.client_secret.read().map_err(setup)?;
                    let client = HttpsClient::with_key(&o.token_url, &config.ca, ClientKey::None)
                        .map_err(setup)?
                        .with_max_response_bytes(config.max_response_bytes);
                    let path = o
                        .token_url
                        .strip_prefix("https://")
                        .and_then(|r| r.find('/').map(|i| r[i..].to_string()))
                        .unwrap_or_else(|| "/".into());
                    Some(OAuth2 {
                        url: o.token_url.clone(),
                        path,
                        client,
                        client_id: credentials.client_id.clone(),
                        secret,
                        token: tokio::sync::Mutex::new(None),
                    })
                }
                _ => None,
            });
        }
        Ok(Nfvo {
            root_path,
            interfaces,
            oauth,
            versions: std::sync::Mutex::new((NSLCM_VERSION.into(), VNFPKGM_VERSION.into())),
            timeout: Duration::from_secs(config.timeout_seconds.max(1)),
            attempts: config.attempts.max(1),
        })
    }

    /// The NS LCM API version in use (negotiated with `api_versions`): also the version of
    /// the notifications the SM receives and so of its answers to them.
    pub fn nslcm_version(&self) -> String {
        self.versions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone()
    }

    /// SOL 013 9.3: ask each API which versions it supports and use the highest 2.x.
    pub async fn discover_versions(&self) -> Result<(String, String), NfvoError> {
        let mut found = Vec::new();
        for api in [Api::NsLcm, Api::VnfPkgm] {
            let path = format!("{}/{}/v2/api_versions", self.root_path, api.prefix());
            let response = self
                .send(
                    Interface::StatusInfo,
                    "GET",
                    &path,
                    None,
                    None,
                    Repeat::Idempotent,
                )
                .await?;
            let body: Value = parse_json(&path, &response)?;
            let mut best: Option<(Vec<u64>, String)> = None;
            for v in body["apiVersions"].as_array().into_iter().flatten() {
                let Some(text) = v["version"].as_str() else {
                    continue;
                };
                let key: Vec<u64> = text
                    .split(['.', '-'])
                    .take(3)
                    .map(|p| p.parse().unwrap_or(0))
                    .collect();
                if key.first() == Some(&2) && best.as_ref().is_none_or(|(b, _)| key > *b) {
                    best = Some((key, text.to_string()));
                }
            }
            let version = best.map(|(_, v)| v).ok_or_else(|| NfvoError::Invalid {
                what: format!("GET {path}"),
                reason: "no 2.x version offered".into(),
            })?;
            found.push(version);
        }
        let mut versions = self.versions.lock().unwrap_or_else(|p| p.into_inner());
        *versions = (found[0].clone(), found[1].clone());
        Ok(versions.clone())
    }

    /// Send with retries. Success is any status below 400.
    pub async fn call(&self, request: Request<'_>) -> Result<ClientResponse, NfvoError> {
        let path = format!(
            "{}/{}/v2{}",
            self.root_path,
            request.api.prefix(),
            request.path
        );
        let version = {
            let v = self.versions.lock().unwrap_or_else(|p| p.into_inner());
            match request.api {
                Api::NsLcm => v.0.clone(),
                Api::VnfPkgm => v.1.clone(),
            }
        };
        let body = request.body.map(|(ct, bytes)| (ct, Bytes::from(bytes)));
        let mut attempt = 0;
        loop {
            attempt += 1;
            let outcome = self
                .send(
                    request.interface,
                    request.method,
                    &path,
                    Some(&version),
                    body.clone(),
                    request.repeat,
                )
                .await;
            let error = match outcome {
                Ok(response) if response.status < 400 => return Ok(response),
                Ok(response) => refused(request.method, &path, &response),
                Err(e) => e,
            };
            // SOL 005 9.4.3.3.4: a 409 to a PATCH of a package means it is already in that
            // state (or cannot change): retrying cannot help; the caller judges it at once.
            let settled = request.method == "PATCH" && error.status() == Some(409);
            let again = attempt < self.attempts
                && !settled
                && error.is_transient()
                && !(request.repeat == Repeat::Once && matches!(error, NfvoError::NoAnswer { .. }));
            if !again {
                return Err(error);
            }
            let backoff = Duration::from_millis(100u64 << (attempt - 1).min(6));
            let wait = match &error {
                NfvoError::Refused {
                    retry_after: Some(after),
                    ..
                } => (*after).min(Duration::from_secs(60)),
                _ => backoff,
            };
            tracing::debug!(error = %error, attempt, wait_ms = wait.as_millis() as u64, "NFVO request retried");
            tokio::time::sleep(wait).await;
        }
    }

    /// GET a JSON document.
    pub async fn get_json(
        &self,
        interface: Interface,
        api: Api,
        path: &str,
    ) -> Result<Value, NfvoError> {
        self.get_typed(interface, api, path).await
    }

    /// GET a JSON document as `T`.
    pub async fn get_typed<T: serde::de::DeserializeOwned>(
        &self,
        interface: Interface,
        api: Api,
        path: &str,
    ) -> Result<T, NfvoError> {
        let response = self
            .call(Request {
                interface,
                api,
                method: "GET",
                path,
                body: None,
                repeat: Repeat::Idempotent,
            })
            .await?;
        serde_json::from_slice(&response.body).map_err(|e| NfvoError::Invalid {
            what: format!("GET {path}"),
            reason: e.to_string(),
        })
    }

    /// GET every page of a list (SOL 013 5.4.2: each page may end with
    /// `Link: <...>; rel="next"`, followed until a page has none). A page that cannot be
    /// read fails the whole list: a partial view is never returned as the view.
    pub async fn get_list<T: serde::de::DeserializeOwned>(
        &self,
        interface: Interface,
        api: Api,
        path: &str,
    ) -> Result<Vec<T>, NfvoError> {
        let prefix = format!("{}/{}/v2", self.root_path, api.prefix());
        let mut items = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut next = Some(path.to_string());
        while let Some(page) = next.take() {
            let what = format!("GET {page}");
            if seen.len() >= MAX_PAGES || !seen.insert(page.clone()) {
                return Err(NfvoError::Invalid {
                    what,
                    reason: format!(
                        "paging does not end (a repeated page, or more than {MAX_PAGES} pages)"
                    ),
                });
            }
            let response = self
                .call(Request {
                    interface,
                    api,
                    method: "GET",
                    path: &page,
                    body: None,
                    repeat: Repeat::Idempotent,
                })
                .await?;
            let mut list: Vec<T> =
                serde_json::from_slice(&response.body).map_err(|e| NfvoError::Invalid {
                    what: what.clone(),
                    reason: format!("not a list of the expected items: {e}"),
                })?;
            items.append(&mut list);
            if let Some(link) = next_link(&response.headers) {
                let local =
                    link_path(&link).and_then(|p| p.strip_prefix(&prefix).map(String::from));
                match local {
                    Some(p) if p.starts_with('/') => next = Some(p),
                    _ => {
                        return Err(NfvoError::Invalid {
                            what,
                            reason: format!("Link rel=\"next\" {link} is outside {prefix}"),
                        })
                    }
                }
            }
        }
        Ok(items)
    }

    /// One attempt on a pooled connection of `interface`; `version` is None only for the
    /// unversioned `api_versions`.
    async fn send(
        &self,
        interface: Interface,
        method: &str,
        path: &str,
        version: Option<&str>,
        body: Option<(&str, Bytes)>,
        repeat: Repeat,
    ) -> Result<ClientResponse, NfvoError> {
        let what = format!("{method} {path}");
        let mut headers: Vec<(&str, String)> = vec![("accept", "application/json".into())];
        let content = match body {
            Some((ct, bytes)) => {
                headers.push(("content-type", ct.to_string()));
                bytes
            }
            None => Bytes::new(),
        };
        if let Some(version) = version {
            headers.push(("version", version.to_string()));
        }
        let mut token_refreshed = false;
        loop {
            let mut headers = headers.clone();
            let oauth = &self.oauth[interface.index()];
            if let Some(oauth) = oauth {
                let token = oauth.token(self.timeout).await?;
                headers.push(("authorization", format!("Bearer {}", token.expose_secret())));
            }
            let response = self
                .exchange(
                    interface,
                    &what,
                    method,
                    path,
                    &headers,
                    content.clone(),
                    repeat,
                )
                .await?;
            if response.status == 401 && oauth.is_some() && !token_refreshed {
                // An expired or revoked token: fetch a new one once.
                if let Some(oauth) = oauth {
                    *oauth.token.lock().await = None;
                }
                token_refreshed = true;
                continue;
            }
            return Ok(response);
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn exchange(
        &self,
        interface: Interface,
        what: &str,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: Bytes,
        repeat: Repeat,
    ) -> Result<ClientResponse, NfvoError> {
        let client = &self.interfaces[interface.index()];
        let pooled = {
            let mut idle = client.idle.lock().await;
            let mut found = None;
            while let Some(conn) = idle.pop() {
                if !conn.is_closed() {
                    found = Some(conn);
                    break;
                }
            }
            found
        };
        let reused = pooled.is_some();
        let mut conn = match pooled {
            Some(conn) => conn,
            None => tokio::time::timeout(self.timeout, client.https.connect())
                .await
                .map_err(|_| NfvoError::Unreachable {
                    what: what.to_string(),
                    reason: "connect timed out".into(),
                })?
                .map_err(|reason| NfvoError::Unreachable {
                    what: what.to_string(),
                    reason,
                })?,
        };
        let result = tokio::time::timeout(
            self.timeout,
            conn.exchange(method, path, headers, body.clone()),
        )
        .await;
        match result {
            Ok(Ok(response)) => {
                client.idle.lock().await.push(conn);
                Ok(response)
            }
            // The NFVO answered, with more than the limit: asking again gets the same answer.
            Ok(Err(e @ crate::client::RequestError::ResponseTooLarge { .. })) => {
                Err(NfvoError::Invalid {
                    what: what.to_string(),
                    reason: format!("{e} (sm.nfvo.max_response_bytes)"),
                })
            }
            Ok(Err(crate::client::RequestError::Failed(reason)))
                if reused && repeat == Repeat::Idempotent =>
            {
                // A kept-alive connection the server had closed: once more on a new one.
                tracing::debug!(%reason, "stale NFVO connection");
                let mut conn =
                    client
                        .https
                        .connect()
                        .await
                        .map_err(|reason| NfvoError::Unreachable {
                            what: what.to_string(),
                            reason,
                        })?;
                let response =
                    tokio::time::timeout(self.timeout, conn.exchange(method, path, headers, body))
                        .await
                        .map_err(|_| NfvoError::NoAnswer {
                            what: what.to_string(),
                            reason: "timed out".into(),
                        })?
                        .map_err(|e| match e {
                            crate::client::RequestError::ResponseTooLarge { .. } => {
                                NfvoError::Invalid {
                                    what: what.to_string(),
                                    reason: format!("{e} (sm.nfvo.max_response_bytes)"),
                                }
                            }
                            crate::client::RequestError::Failed(reason) => NfvoError::NoAnswer {
                                what: what.to_string(),
                                reason,
                            },
                        })?;
                client.idle.lock().await.push(conn);
                Ok(response)
            }
            Ok(Err(crate::client::RequestError::Failed(reason))) => Err(NfvoError::NoAnswer {
                what: what.to_string(),
                reason,
            }),
            Err(_) => Err(NfvoError::NoAnswer {
                what: what.to_string(),
                reason: format!("no answer within {} s", self.timeout.as_secs()),
            }),
        }
    }
}

impl OAuth2 {
    async fn token(&self, timeout: Duration) -> Result<SecretString, NfvoError> {
        let mut cached = self.token.lock().await;
        if let Some((token, until)) = cached.as_ref() {
            if Instant::now() < *until {
                return Ok(token.clone());
            }
        }
        let err = |reason: String| NfvoError::Token {
            url: self.url.clone(),
            reason,
        };
        let basic = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            self.client_id,
            self.secret.expose_secret()
        ));
        let headers = vec![
            (
                "content-type",
                "application/x-www-form-urlencoded".to_string(),
            ),
            ("authorization", format!("Basic {basic}")),
            ("accept", "application/json".to_string()),
        ];
        let exchange = async {
            let mut conn = self.client.connect().await?;
            conn.request_with(
                "POST",
                &self.path,
                &headers,
                b"grant_type=client_credentials".to_vec(),
            )
            .await
        };
        let response = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| err("timed out".into()))?
            .map_err(err)?;
        if response.status != 200 {
            return Err(err(format!(
                "{}: {}",
                response.status,
                response.problem_detail()
            )));
        }
        let body = response.json().map_err(err)?;
        let token = body["access_token"]
            .as_str()
            .ok_or_else(|| err("no access_token".into()))?;
        let lifetime = body["expires_in"].as_u64().unwrap_or(300);
        // Renew a little before the NFVO would refuse it.
        let until = Instant::now() + Duration::from_secs(lifetime.saturating_sub(30).max(1));
        let token = SecretString::from(token.to_string());
        *cached = Some((token.clone(), until));
        Ok(token)
    }
}

fn parse_json(path: &str, response: &ClientResponse) -> Result<Value, NfvoError> {
    response.json().map_err(|reason| NfvoError::Invalid {
        what: format!("GET {path}"),
        reason,
    })
}

/// Pages of one list followed at most (a guard against an NFVO whose paging never ends).
const MAX_PAGES: usize = 10_000;

/// The target of `Link: <...>; rel="next"` (RFC 8288; SOL 013 5.4.2.3), if any. The URI may
/// hold commas (a filter), so the header is scanned by its `<` `>` delimiters.
pub fn next_link(headers: &hyper::HeaderMap) -> Option<String> {
    for value in headers.get_all("link") {
        let Ok(text) = value.to_str() else {
            continue;
        };
        let mut rest = text;
        while let Some(open) = rest.find('<') {
            let after = &rest[open + 1..];
            let close = after.find('>')?;
            let uri = &after[..close];
            let params_end = after[close..].find('<').map_or(after.len(), |i| close + i);
            let params = &after[close + 1..params_end];
            let next = params.split(';').any(|p| {
                let p = p.trim().trim_end_matches(',').trim();
                p.split_once('=').is_some_and(|(k, v)| {
                    k.trim().eq_ignore_ascii_case("rel")
                        && v.trim()
                            .trim_matches('"')
                            .split_ascii_whitespace()
                            .any(|r| r.eq_ignore_ascii_case("next"))
                })
            });
            if next {
                return Some(uri.to_string());
            }
            rest = &after[params_end..];
        }
    }
    None
}

/// The path and query of a link target (absolute `https://host/...` or `/...`).
fn link_path(link: &str) -> Option<String> {
    let rest = link
        .strip_prefix("https://")
        .or_else(|| link.strip_prefix("http://"));
    match rest {
        Some(rest) => rest.find('/').map(|i| rest[i..].to_string()),
        None => link.starts_with('/').then(|| link.to_string()),
    }
}

/// `Retry-After` (RFC 9110 10.2.3): delta-seconds or an HTTP-date; a date in the past is 0.
pub fn retry_after(headers: &hyper::HeaderMap) -> Option<Duration> {
    let value = headers.get("retry-after")?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

fn refused(method: &str, path: &str, response: &ClientResponse) -> NfvoError {
    let retry_after = retry_after(&response.headers);
    NfvoError::Refused {
        what: format!("{method} {path}"),
        status: response.status,
        detail: response.problem_detail(),
        retry_after,
    }
}

/// The id at the end of a Location header (`.../ns_lcm_op_occs/{id}`).
pub fn location_id(response: &ClientResponse) -> Option<String> {
    let location = response.headers.get("location")?.to_str().ok()?;
    let id = location.trim_end_matches('/').rsplit('/').next()?;
    (!id.is_empty()).then(|| id.to_string())
}

/// Shared handle.
pub type SharedNfvo = Arc<Nfvo>;

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(name: &'static str, values: &[&str]) -> hyper::HeaderMap {
        let mut map = hyper::HeaderMap::new();
        for v in values {
            map.append(name, v.parse().expect("header value"));
        }
        map
    }

    #[test]
    fn the_next_link_is_found_whatever_else_the_header_holds() {
        let h = headers(
            "link",
            &[
                r#"<https://nfvo/nslcm/v2/ns_lcm_op_occs?filter=(eq,nsInstanceId,a)&nextpage_opaque_marker=x>; rel="next""#,
            ],
        );
        assert_eq!(
            next_link(&h).as_deref(),
            Some("https://nfvo/nslcm/v2/ns_lcm_op_occs?filter=(eq,nsInstanceId,a)&nextpage_opaque_marker=x")
        );
        let h = headers("link", &[r#"</a?p=1>; rel="prev", </a?p=3>; rel=next"#]);
        assert_eq!(next_link(&h).as_deref(), Some("/a?p=3"));
        let h = headers(
            "link",
            &[
                r#"</a?p=1>; rel="prev""#,
                r#"</a?p=2>; title="x"; rel="last next""#,
            ],
        );
        assert_eq!(next_link(&h).as_deref(), Some("/a?p=2"));
        assert_eq!(next_link(&headers("link", &[r#"</a>; rel="prev""#])), None);
        assert_eq!(link_path("https://h:1/x/y?z").as_deref(), Some("/x/y?z"));
        assert_eq!(link_path("ftp://h/x"), None);
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        assert_eq!(
            retry_after(&headers("retry-after", &["7"])),
            Some(Duration::from_secs(7))
        );
        let at = std::time::SystemTime::now() + Duration::from_secs(30);
        let wait =
            retry_after(&headers("retry-after", &[&httpdate::fmt_http_date(at)])).expect("a date");
        assert!(
            wait > Duration::from_secs(25) && wait <= Duration::from_secs(30),
            "{wait:?}"
        );
        assert_eq!(
            retry_after(&headers("retry-after", &["Sun, 06 Nov 1994 08:49:37 GMT"])),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after(&headers("retry-after", &["soon"])), None);
    }
}
