//! The CMF's client of one VNFM's VNF LCM interface (Cm-Vnfm, IFA 007 7.2; REST binding
//! SOL 003 `vnflcm/v2`): authentication as the VNFM offers it (Tacker: a Keystone v3 token;
//! or SOL 013 8.2 OAuth 2.0 client credentials), the `Version` header, paging by
//! `Link: rel="next"` (SOL 013 5.4.2.3), retries of idempotent requests.

use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use rustls::pki_types::CertificateDer;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};

use crate::client::{ClientKey, ClientResponse, HttpsClient};
use crate::config::{DirectVnfmConfig, VnfmAuthConfig};
use crate::keys::backends::Backends;
use crate::keys::signer::HardwareKey;

/// SOL 003 v3.x VNF LCM API version sent in `Version` (SOL 013 9.1).
pub const VNFLCM_VERSION: &str = "2.0.0";

#[derive(Debug, thiserror::Error)]
pub enum VnfmError {
    #[error("{what}: VNFM unreachable: {reason}")]
    Unreachable { what: String, reason: String },
    #[error("{what}: VNFM answered {status}: {detail}")]
    Refused {
        what: String,
        status: u16,
        detail: String,
    },
    #[error("{what}: unexpected answer: {reason}")]
    Invalid { what: String, reason: String },
    #[error("VNFM authentication at {url}: {reason}")]
    Auth { url: String, reason: String },
    #[error("vnfm '{0}': {1}")]
    Setup(String, String),
}

impl VnfmError {
    pub fn status(&self) -> Option<u16> {
        match self {
            VnfmError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// One endpoint (VNFM API or token endpoint): https with the configured roots (and client
/// key), or plain http to loopback only.
#[derive(Clone)]
enum Endpoint {
    Https(HttpsClient),
    Http { address: String, authority: String },
}

/// Split `scheme://authority/path` and build the endpoint.
fn endpoint(
    url: &str,
    ca: Option<&std::path::Path>,
    key: ClientKey<'_>,
) -> Result<(Endpoint, String), String> {
    if let Some(rest) = url.strip_prefix("http://") {
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/').to_string()),
            None => (rest, String::new()),
        };
        let host = authority
            .rsplit_once(':')
            .map_or(authority, |(h, _)| h)
            .trim_start_matches('[')
            .trim_end_matches(']');
        let loopback = host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if !loopback {
            return Err(format!(
                "'{url}': plain http is allowed only to a loopback address; use https"
            ));
        }
        let address = if authority.contains(':') {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        return Ok((
            Endpoint::Http {
                address,
                authority: authority.to_string(),
            },
            path,
        ));
    }
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| format!("'{url}': expected https:// (or http:// to loopback)"))?;
    let path = rest
        .find('/')
        .map(|i| rest[i..].trim_end_matches('/').to_string())
        .unwrap_or_default();
    let ca = ca.ok_or_else(|| format!("'{url}': https needs `ca` (the server's roots)"))?;
    Ok((Endpoint::Https(HttpsClient::with_key(url, ca, key)?), path))
}

impl Endpoint {
    async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: Vec<u8>,
    ) -> Result<ClientResponse, String> {
        match self {
            Endpoint::Https(client) => {
                let mut connection = client.connect().await?;
                connection.request_with(method, path, headers, body).await
            }
            Endpoint::Http { address, authority } => {
                let tcp = tokio::net::TcpStream::connect(address)
                    .await
                    .map_err(|e| format!("connect {address}: {e}"))?;
                let (mut sender, connection) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                        .await
                        .map_err(|e| format!("HTTP handshake: {e}"))?;
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                let mut builder = hyper::Request::builder()
                    .method(method)
                    .uri(path)
                    .header(hyper::header::HOST, authority.as_str());
                for (name, value) in headers {
                    builder = builder.header(*name, value);
                }
                let request = builder
                    .body(Full::new(Bytes::from(body)))
                    .map_err(|e| e.to_string())?;
                let response = sender
                    .send_request(request)
                    .await
                    .map_err(|e| format!("{method} {path}: {e}"))?;
                let status = response.status().as_u16();
                let headers = response.headers().clone();
                let body = response
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| format!("reading the response: {e}"))?
                    .to_bytes();
                Ok(ClientResponse {
                    status,
                    headers,
                    body,
                })
            }
        }
    }
}

enum Auth {
    Keystone {
        endpoint: Endpoint,
        path: String,
        request: Value,
        url: String,
    },
    Oauth2 {
        endpoint: Endpoint,
        path: String,
        client_id: String,
        secret: SecretString,
        url: String,
    },
}

/// The client of one VNFM.
pub struct Vnfm {
    pub id: String,
    api: Endpoint,
    root_path: String,
    auth: Auth,
    token: tokio::sync::Mutex<Option<(SecretString, Instant)>>,
    timeout: Duration,
}

impl Vnfm {
    pub fn new(config: &DirectVnfmConfig, backends: &Backends) -> Result<Vnfm, VnfmError> {
        let setup = |e: String| VnfmError::Setup(config.id.clone(), e);
        let key = match (&config.client_key, &config.client_certificate) {
            (Some(key), Some(certificate)) => {
                let pem = std::fs::read_to_string(certificate)
                    .map_err(|e| setup(format!("{}: {e}", certificate.display())))?;
                let chain: Vec<CertificateDer<'static>> = crate::pki::certificates_from_pem(&pem)
                    .map_err(setup)?
                    .iter()
                    .map(|c| der::Encode::to_der(c).map(CertificateDer::from))
                    .collect::<Result<_, _>>()
                    .map_err(|e| setup(e.to_string()))?;
                let store = backends.for_key(key).map_err(|e| setup(e.to_string()))?;
                let key = HardwareKey::new(store, key.clone()).map_err(|e| setup(e.to_string()))?;
                ClientKey::Hardware {
                    chain,
                    key: key.into_rustls(),
                }
            }
            (None, None) => ClientKey::None,
            _ => {
                return Err(setup(
                    "client_key and client_certificate go together".into(),
                ))
            }
        };
        let (api, root_path) =
            endpoint(&config.api_root, config.tls_roots.as_deref(), key).map_err(setup)?;
        let auth = match &config.auth {
            VnfmAuthConfig::KeystonePassword {
                url,
                user,
                user_domain,
                project,
                project_domain,
                password,
            } => {
                let (endpoint, path) =
                    endpoint(url, config.tls_roots.as_deref(), ClientKey::None).map_err(setup)?;
                let password = password.read().map_err(setup)?;
                Auth::Keystone {
                    endpoint,
                    path: format!("{path}/auth/tokens"),
                    url: url.clone(),
                    request: json!({"auth": {
                        "identity": {"methods": ["password"], "password": {"user": {
                            "name": user, "domain": {"name": user_domain},
                            "password": password.expose_secret()}}},
                        "scope": {"project": {"name": project,
                            "domain": {"name": project_domain}}}}}),
                }
            }
            VnfmAuthConfig::KeystoneApplicationCredential { url, id, secret } => {
                let (endpoint, path) =
                    endpoint(url, config.tls_roots.as_deref(), ClientKey::None).map_err(setup)?;
                let secret = secret.read().map_err(setup)?;
                Auth::Keystone {
                    endpoint,
                    path: format!("{path}/auth/tokens"),
                    url: url.clone(),
                    request: json!({"auth": {"identity": {
                        "methods": ["application_credential"],
                        "application_credential": {"id": id,
                            "secret": secret.expose_secret()}}}}),
                }
            }
            VnfmAuthConfig::Oauth2 {
                token_url,
                client_id,
                client_secret,
            } => {
                let (endpoint, path) =
                    endpoint(token_url, config.tls_roots.as_deref(), ClientKey::None)
                        .map_err(setup)?;
                Auth::Oauth2 {
                    endpoint,
                    path: if path.is_empty() { "/".into() } else { path },
                    client_id: client_id.clone(),
                    secret: client_secret.read().map_err(setup)?,
                    url: token_url.clone(),
                }
            }
        };
        Ok(Vnfm {
            id: config.id.clone(),
            api,
            root_path,
            auth,
            token: tokio::sync::Mutex::new(None),
            timeout: Duration::from_secs(config.timeout_seconds.max(1)),
        })
    }

    /// A valid token, fetched when there is none or it is near expiry.
    async fn token(&self, renew: bool) -> Result<SecretString, VnfmError> {
        let mut cached = self.token.lock().await;
        if let Some((token, until)) = cached.as_ref() {
            if !renew && Instant::now() < *until {
                return Ok(token.clone());
            }
        }
        let (token, lifetime) = match &self.auth {
            Auth::Keystone {
                endpoint,
                path,
                request,
                url,
            } => {
                let fail = |reason: String| VnfmError::Auth {
                    url: url.clone(),
                    reason,
                };
                let response = tokio::time::timeout(
                    self.timeout,
                    endpoint.send(
                        "POST",
                        path,
                        &[("content-type", "application/json".into())],
                        request.to_string().into_bytes(),
                    ),
                )
                .await
                .map_err(|_| fail("timed out".into()))?
                .map_err(fail)?;
                if response.status != 201 {
                    return Err(fail(format!(
                        "{}: {}",
                        response.status,
                        response.problem_detail()
                    )));
                }
                let token = response
                    .headers
                    .get("x-subject-token")
                    .and_then(|v| v.to_str().ok())
                    .ok_or_else(|| fail("no X-Subject-Token".into()))?
                    .to_string();
                // Keystone tokens live an hour by default; renew well before.
                (token, Duration::from_secs(600))
            }
            Auth::Oauth2 {
                endpoint,
                path,
                client_id,
                secret,
                url,
            } => {
                use base64::Engine;
                let fail = |reason: String| VnfmError::Auth {
                    url: url.clone(),
                    reason,
                };
                let basic = base64::engine::general_purpose::STANDARD
                    .encode(format!("{client_id}:{}", secret.expose_secret()));
                let response = tokio::time::timeout(
                    self.timeout,
                    endpoint.send(
                        "POST",
                        path,
                        &[
                            ("content-type", "application/x-www-form-urlencoded".into()),
                            ("authorization", format!("Basic {basic}")),
                        ],
                        b"grant_type=client_credentials".to_vec(),
                    ),
                )
                .await
                .map_err(|_| fail("timed out".into()))?
                .map_err(fail)?;
                let body = response.json().map_err(fail)?;
                let token = body["access_token"]
                    .as_str()
                    .filter(|_| response.status == 200)
                    .ok_or_else(|| fail(format!("{}: {body}", response.status)))?
                    .to_string();
                let seconds = body["expires_in"].as_u64().unwrap_or(300);
                (
                    token,
                    Duration::from_secs(seconds.saturating_sub(30).max(10)),
                )
            }
        };
        let token = SecretString::from(token);
        *cached = Some((token.clone(), Instant::now() + lifetime));
        Ok(token)
    }

    /// One request under `/vnflcm/v2`; `path` may also be a full path from a Link header.
    /// A 401 renews the token once.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, Value)>,
    ) -> Result<ClientResponse, VnfmError> {
        let full = if path.starts_with(&format!("{}/vnflcm/v2/", self.root_path)) {
            path.to_string()
        } else {
            format!("{}/vnflcm/v2{path}", self.root_path)
        };
        let what = format!("{method} {full}");
        let mut renew = false;
        // Idempotent requests (GET, DELETE, PATCH of properties) are retried on transport
        // errors and 5xx; a POST is sent once.
        let attempts = if method == "POST" { 1 } else { 3 };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let token = self.token(renew).await?;
            let is_keystone = matches!(self.auth, Auth::Keystone { .. });
            let mut headers = vec![
                ("accept", "application/json".to_string()),
                ("version", VNFLCM_VERSION.to_string()),
            ];
            if is_keystone {
                headers.push(("x-auth-token", token.expose_secret().to_string()));
            } else {
                headers.push(("authorization", format!("Bearer {}", token.expose_secret())));
            }
            let bytes = match &body {
                Some((content_type, value)) => {
                    headers.push(("content-type", content_type.to_string()));
                    value.to_string().into_bytes()
                }
                None => Vec::new(),
            };
            let outcome =
                tokio::time::timeout(self.timeout, self.api.send(method, &full, &headers, bytes))
                    .await
                    .unwrap_or_else(|_| Err("timed out".into()));
            match outcome {
                Ok(response) if response.status == 401 && !renew => {
                    renew = true;
                    continue;
                }
                Ok(response) if response.status < 400 => return Ok(response),
                Ok(response) if response.status >= 500 && attempt < attempts => {}
                Ok(response) => {
                    return Err(VnfmError::Refused {
                        what,
                        status: response.status,
                        detail: response.problem_detail(),
                    })
                }
                Err(reason) if attempt < attempts => {
                    tracing::debug!(%what, %reason, "VNFM request retried");
                }
                Err(reason) => return Err(VnfmError::Unreachable { what, reason }),
            }
            tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
        }
    }

    pub async fn get(&self, path: &str) -> Result<Value, VnfmError> {
        let response = self.request("GET", path, None).await?;
        response.json().map_err(|reason| VnfmError::Invalid {
            what: format!("GET {path}"),
            reason,
        })
    }

    /// Every page of a list (SOL 013 5.4.2.3: `Link: <...>; rel="next"`).
    pub async fn get_all(&self, path: &str) -> Result<Vec<Value>, VnfmError> {
        let mut items = Vec::new();
        let mut next = Some(path.to_string());
        let mut pages = 0;
        while let Some(path) = next.take() {
            pages += 1;
            if pages > 10_000 {
                return Err(VnfmError::Invalid {
                    what: format!("GET {path}"),
                    reason: "more than 10000 pages".into(),
                });
            }
            let response = self.request("GET", &path, None).await?;
            let page = response.json().map_err(|reason| VnfmError::Invalid {
                what: format!("GET {path}"),
                reason,
            })?;
            let list = page.as_array().ok_or_else(|| VnfmError::Invalid {
                what: format!("GET {path}"),
                reason: "not a JSON array".into(),
            })?;
            items.extend(list.iter().cloned());
            next = next_link(&response.headers);
        }
        Ok(items)
    }

    /// Query VNF (IFA 007 7.2.9): `Ok(None)` on 404 (the VNF instance does not exist).
    pub async fn vnf_instance(&self, id: &str) -> Result<Option<Value>, VnfmError> {
        match self.get(&format!("/vnf_instances/{id}")).await {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.status() == Some(404) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Modify VNF Information (SOL 003 5.5.2.12, RFC 7396 merge patch) of one VNFC's
    /// configurable property `name`: `value` sets it, `null` removes it. The VNFM answers 202
    /// and modifies asynchronously; a later Query VNF shows the result.
    pub async fn modify_vnfc_property(
        &self,
        vnf_instance_id: &str,
        vnfc_info_id: &str,
        name: &str,
        value: Value,
    ) -> Result<ClientResponse, VnfmError> {
        let patch = serde_json::json!({"vnfcInfoModifications": [{
            "id": vnfc_info_id,
            "vnfcConfigurableProperties": { name: value },
        }]});
        self.request(
            "PATCH",
            &format!("/vnf_instances/{vnf_instance_id}"),
            Some(("application/merge-patch+json", patch)),
        )
        .await
    }
}

/// The target of `Link: <uri>; rel="next"`, as a path (with query).
pub fn next_link(headers: &hyper::HeaderMap) -> Option<String> {
    for value in headers.get_all(hyper::header::LINK) {
        let text = value.to_str().ok()?;
        for part in text.split(',') {
            let mut pieces = part.split(';');
            let target = pieces.next()?.trim();
            let is_next = pieces.any(|p| {
                let p = p.trim().replace(' ', "");
                p == "rel=\"next\"" || p == "rel=next"
            });
            if is_next {
                let uri = target.trim_start_matches('<').trim_end_matches('>');
                let path = match uri.find("://") {
                    Some(i) => uri[i + 3..].find('/').map(|j| &uri[i + 3 + j..])?,
                    None => uri,
                };
                return Some(path.to_string());
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_link_is_found() {
        let mut headers = hyper::HeaderMap::new();
        headers.insert(
            hyper::header::LINK,
            "<http://vnfm:9890/vnflcm/v2/vnf_instances?nextpage_opaque_marker=abc>; rel=\"next\""
                .parse()
                .unwrap(),
        );
        assert_eq!(
            next_link(&headers).as_deref(),
            Some("/vnflcm/v2/vnf_instances?nextpage_opaque_marker=abc")
        );
        assert_eq!(next_link(&hyper::HeaderMap::new()), None);
    }

    #[test]
    fn plain_http_only_to_loopback() {
        assert!(endpoint("http://127.0.0.1:9890", None, ClientKey::None).is_ok());
        assert!(endpoint("http://10.0.0.1:9890", None, ClientKey::None).is_err());
    }
}
