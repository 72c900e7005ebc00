//! The running agent, reached over its admin socket: while `warden serve` runs it holds the
//! store (redb's exclusive lock), the PKCS#11 session and the TPM, so the operator's commands
//! ask it to do the work. When no agent runs, they work on the store and devices directly.

use std::io::ErrorKind;
use std::path::PathBuf;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use nfv_warden::config::Config;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::Failure;

/// How long one request to the agent may take. Verifying the audit chain of a large store
/// is the longest operation (a few µs per entry); past this the CLI gives up and says so.
const REQUEST_DEADLINE: Duration = Duration::from_secs(900);

/// A running agent's admin socket.
pub(super) struct RunningAgent {
    socket: PathBuf,
}

/// The running agent, if one listens on the configured admin socket. `None` when there is
/// no socket or nobody listens on it (a socket left by a crash): the caller works directly.
/// A socket this user may not connect to is an error, not "no agent": the agent holds the
/// store, so working directly would fail anyway, less clearly.
pub(super) fn running(config: &Config) -> Result<Option<RunningAgent>, Failure> {
    let socket = config.admin_socket();
    match std::os::unix::net::UnixStream::connect(&socket) {
        Ok(_) => Ok(Some(RunningAgent { socket })),
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => {
            Ok(None)
        }
        Err(e) => Err(Failure(format!(
            "admin socket {}: {e} (the running agent's socket is for its own user and root)",
            socket.display()
        ))),
    }
}

impl RunningAgent {
    pub(super) fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, Failure> {
        self.call("GET", path, None)
    }

    pub(super) fn post<T: DeserializeOwned>(&self, path: &str, body: Value) -> Result<T, Failure> {
        self.call("POST", path, Some(body))
    }

    pub(super) fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, Failure> {
        self.call("DELETE", path, None)
    }

    /// One request; a ProblemDetails answer becomes the failure, with its detail.
    fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<T, Failure> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Failure(format!("tokio runtime: {e}")))?;
        let socket = self.socket.display().to_string();
        let exchange = async {
            let stream = tokio::net::UnixStream::connect(&self.socket)
                .await
                .map_err(|e| Failure(format!("admin socket {socket}: {e}")))?;
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .map_err(|e| Failure(format!("admin socket {socket}: {e}")))?;
            tokio::spawn(connection);
            let mut request = hyper::Request::builder()
                .method(method)
                .uri(path)
                .header(hyper::header::HOST, "localhost");
            let bytes = match body {
                Some(b) => {
                    request = request.header(hyper::header::CONTENT_TYPE, "application/json");
                    b.to_string().into_bytes()
                }
                None => Vec::new(),
            };
            let request = request
                .body(Full::new(Bytes::from(bytes)))
                .map_err(|e| Failure(format!("{method} {path}: {e}")))?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| Failure(format!("the running agent ({socket}): {e}")))?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| Failure(format!("the running agent ({socket}): {e}")))?
                .to_bytes();
            if !status.is_success() {
                let detail = serde_json::from_slice::<Value>(&body)
                    .ok()
                    .and_then(|v| v["detail"].as_str().map(String::from))
                    .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
                return Err(Failure(detail));
            }
            serde_json::from_slice(&body).map_err(|e| {
                Failure(format!(
                    "the running agent ({socket}) answered {method} {path} with unexpected JSON: {e}"
                ))
            })
        };
        runtime.block_on(async {
            tokio::time::timeout(REQUEST_DEADLINE, exchange)
                .await
                .map_err(|_| {
                    Failure(format!(
                        "the running agent ({socket}) did not answer {method} {path} within {} s",
                        REQUEST_DEADLINE.as_secs()
                    ))
                })?
        })
    }
}

/// A path segment carrying `text` (a key reference, a serial) verbatim.
pub(super) fn segment(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// A query string of the given pairs, values encoded; `""` when none is set.
pub(super) fn query(pairs: &[(&str, Option<String>)]) -> String {
    let parts: Vec<String> = pairs
        .iter()
        .filter_map(|(name, value)| value.as_ref().map(|v| format!("{name}={}", segment(v))))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

/// An operation's error, with its causes, as the CLI's failure.
pub(super) fn ops_failure(e: nfv_warden::ops::OpsError) -> Failure {
    Failure(nfv_warden::error::chain(&e))
}
