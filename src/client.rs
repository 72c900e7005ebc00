//! A small HTTPS client with TLS client authentication, for the operator commands that act
//! as a VNFM (`warden register`, `warden csr`), the tests and the benchmarks. It keeps one
//! HTTP/1.1 connection alive for many requests.
//!
//! The client key is either the caller's (a VNFM's test identity from PEM files) or one of
//! the agent's own keys in the HSM/TPM ([`ClientKey::Hardware`], the SM's per-interface
//! association keys), which sign the TLS handshake in the device and never leave it.

use std::path::Path;
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// The largest response body read from a peer unless the caller sets another limit
/// ([`HttpsClient::with_max_response_bytes`]): a peer (an NFVO) that answers without end
/// must not grow the agent's memory without bound.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 16 << 20;

/// Where and how to connect.
#[derive(Clone)]
pub struct HttpsClient {
    connector: tokio_rustls::TlsConnector,
    server_name: ServerName<'static>,
    address: String,
    authority: String,
    max_response_bytes: usize,
    default_headers: Vec<(String, String)>,
}

/// A response, read whole.
#[derive(Debug, Clone)]
pub struct ClientResponse {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl ClientResponse {
    pub fn json(&self) -> Result<serde_json::Value, String> {
        serde_json::from_slice(&self.body).map_err(|e| format!("response is not JSON: {e}"))
    }

    /// The ProblemDetails `detail` of an error response, or the body.
    pub fn problem_detail(&self) -> String {
        self.json()
            .ok()
            .and_then(|v| v.get("detail").and_then(|d| d.as_str()).map(String::from))
            .unwrap_or_else(|| String::from_utf8_lossy(&self.body).into_owned())
    }
}

/// The TLS client identity.
pub enum ClientKey<'a> {
    None,
    /// Certificate chain and private key in PEM files (a VNFM's side, tests).
    PemFiles(&'a Path, &'a Path),
    /// A certificate chain and a key held in the HSM/TPM.
    Hardware {
        chain: Vec<CertificateDer<'static>>,
        key: Arc<dyn rustls::sign::SigningKey>,
    },
}

impl HttpsClient {
    /// `base` is `https://host:port`; `ca_pem` the roots that issued the server certificate;
    /// `identity` an optional client certificate chain and private key (PEM files).
    pub fn new(
        base: &str,
        ca_pem: &Path,
        identity: Option<(&Path, &Path)>,
    ) -> Result<HttpsClient, String> {
        let key = match identity {
            Some((cert, key)) => ClientKey::PemFiles(cert, key),
            None => ClientKey::None,
        };
        HttpsClient::with_key(base, ca_pem, key)
    }

    /// [`Self::new`] with any [`ClientKey`]. `base` may carry a path (an apiRoot); only its
    /// authority is used here.
    pub fn with_key(
        base: &str,
        ca_pem: &Path,
        identity: ClientKey<'_>,
    ) -> Result<HttpsClient, String> {
        let base = match base.strip_prefix("https://") {
            Some(rest) => match rest.find('/') {
                Some(i) => &base[..8 + i],
                None => base,
            },
            None => base,
        };
        let authority = base
            .strip_prefix("https://")
            .ok_or_else(|| format!("'{base}': only https:// URLs are supported"))?
            .trim_end_matches('/')
            .to_string();
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
                (h.to_string(), p.to_string())
            }
            _ => (authority.clone(), "443".to_string()),
        };
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let server_name =
            ServerName::try_from(host.clone()).map_err(|e| format!("'{host}': {e}"))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca_pem)
            .map_err(|e| format!("{}: {e}", ca_pem.display()))?
        {
            let cert = cert.map_err(|e| format!("{}: {e}", ca_pem.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("{}: {e}", ca_pem.display()))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
        let config = match identity {
            ClientKey::PemFiles(cert_file, key_file) => {
                let chain = CertificateDer::pem_file_iter(cert_file)
                    .map_err(|e| format!("{}: {e}", cert_file.display()))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("{}: {e}", cert_file.display()))?;
                let key = PrivateKeyDer::from_pem_file(key_file)
                    .map_err(|e| format!("{}: {e}", key_file.display()))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("client identity: {e}"))?
            }
            ClientKey::Hardware { chain, key } => {
                let resolver =
                    FixedClientCert(Arc::new(rustls::sign::CertifiedKey::new(chain, key)));
                builder.with_client_cert_resolver(Arc::new(resolver))
            }
            ClientKey::None => builder.with_no_client_auth(),
        };
        let address = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Ok(HttpsClient {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            server_name,
            address,
            authority,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            default_headers: Vec::new(),
        })
    }

    /// Refuse response bodies larger than `limit` bytes (default
    /// [`DEFAULT_MAX_RESPONSE_BYTES`]): the request fails with an error naming the peer and
    /// the limit, after reading at most `limit` bytes of the body.
    pub fn with_max_response_bytes(mut self, limit: usize) -> HttpsClient {
        self.max_response_bytes = limit;
        self
    }

    /// Send `name: value` with every request unless the request sets `name` itself (the SOL
    /// 013 `Version` header of an API the client speaks).
    pub fn with_default_header(mut self, name: &str, value: &str) -> HttpsClient {
        self.default_headers
            .push((name.to_ascii_lowercase(), value.to_string()));
        self
    }

    /// Open a keep-alive connection.
    pub async fn connect(&self) -> Result<Connection, String> {
        let tcp = tokio::net::TcpStream::connect(&self.address)
            .await
            .map_err(|e| format!("connect {}: {e}", self.address))?;
        tcp.set_nodelay(true).map_err(|e| e.to_string())?;
        let tls = self
            .connector
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| format!("TLS handshake with {}: {e}", self.address))?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| format!("HTTP handshake: {e}"))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Connection {
            sender,
            authority: self.authority.clone(),
            max_response_bytes: self.max_response_bytes,
            default_headers: self.default_headers.clone(),
        })
    }
}

#[derive(Debug)]
struct FixedClientCert(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for FixedClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        // Offer the certificate only when the server accepts our key's scheme.
        self.0.key.choose_scheme(sigschemes)?;
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Why a request got no usable response.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The connection failed or broke, or the request could not be built.
    #[error("{0}")]
    Failed(String),
    /// The peer sent more than the client's response limit; the rest was not read.
    #[error("{request}: the response body from {peer} is larger than the limit of {limit} bytes; refused")]
    ResponseTooLarge {
        request: String,
        peer: String,
        limit: usize,
    },
}

/// One HTTP/1.1 connection.
pub struct Connection {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    authority: String,
    max_response_bytes: usize,
    default_headers: Vec<(String, String)>,
}

impl Connection {
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Result<ClientResponse, String> {
        let headers: Vec<(&str, String)> = content_type
            .map(|ct| vec![("content-type", ct.to_string())])
            .unwrap_or_default();
        self.request_with(method, path, &headers, body).await
    }

    /// True once the server closed the connection: do not send on it.
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    /// A request with any headers.
    pub async fn request_with(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: impl Into<Bytes>,
    ) -> Result<ClientResponse, String> {
        self.exchange(method, path, headers, body)
            .await
            .map_err(|e| e.to_string())
    }

    /// [`Self::request_with`] with the failure typed: an oversize response
    /// ([`RequestError::ResponseTooLarge`]) is the peer's fault and permanent, unlike a
    /// connection that broke.
    pub async fn exchange(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: impl Into<Bytes>,
    ) -> Result<ClientResponse, RequestError> {
        let mut builder = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &self.authority);
        for (name, value) in headers {
            builder = builder.header(*name, value);
        }
        for (name, value) in &self.default_headers {
            if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name)) {
                builder = builder.header(name.as_str(), value);
            }
        }
        let failed = |reason: String| RequestError::Failed(reason);
        let request = builder
            .body(Full::new(body.into()))
            .map_err(|e| failed(e.to_string()))?;
        self.sender
            .ready()
            .await
            .map_err(|e| failed(format!("connection: {e}")))?;
        let response = self
            .sender
            .send_request(request)
            .await
            .map_err(|e| failed(format!("{method} {path}: {e}")))?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let limit = self.max_response_bytes;
        // Streamed, and refused as soon as more than `limit` bytes arrived, whatever
        // Content-Length says (or without one: chunked).
        let body = match http_body_util::Limited::new(response.into_body(), limit)
            .collect()
            .await
        {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return Err(RequestError::ResponseTooLarge {
                    request: format!("{method} {path}"),
                    peer: self.authority.clone(),
                    limit,
                })
            }
            Err(e) => {
                return Err(failed(format!(
                    "{method} {path}: reading the response: {e}"
                )))
            }
        };
        Ok(ClientResponse {
            status,
            headers,
            body,
        })
    }

    pub async fn post_json(
        &mut self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<ClientResponse, String> {
        self.request(
            "POST",
            path,
            Some("application/json"),
            body.to_string().into_bytes(),
        )
        .await
    }

    pub async fn get(&mut self, path: &str) -> Result<ClientResponse, String> {
        self.request("GET", path, None, Vec::new()).await
    }
}
