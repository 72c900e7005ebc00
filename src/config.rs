//! Configuration: TOML, `deny_unknown_fields`, every default written out in the annotated
//! reference config `systemd/warden.toml`. Secrets (PINs, auth values) appear only by
//! reference: a file path or a systemd credential name.
//!
//! Errors name the file, the key and the reason in one line.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use secrecy::SecretString;
use serde::Deserialize;

use crate::keys::{KeyRef, TokenSelector};

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Key backends; at most one of each type.
    #[serde(default, rename = "backend")]
    pub backends: Vec<BackendConfig>,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub server: Option<ServerConfig>,
    #[serde(default)]
    pub ca: Option<CaConfig>,
    /// The Certificate Management Function (IFA 033 clause 11); absent = not served.
    #[serde(default)]
    pub cmf: Option<CmfConfig>,
    /// The Security Manager on Sc-Or (IFA 033 clauses 5 and 6); absent = not run.
    #[serde(default)]
    pub sm: Option<SmConfig>,
    /// The readiness probe (`/readyz`, systemd STATUS=).
    #[serde(default)]
    pub health: HealthConfig,
    /// The Prometheus endpoint; absent = not served.
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
    /// The local admin socket every running agent serves (`warden check|certs|audit|keys|sm`).
    #[serde(default)]
    pub admin: AdminConfig,
}

/// The readiness probe: a background task signs a fixed challenge with every configured key
/// and makes a tiny durable write to the store, so that `/readyz` reads a cached answer and
/// never touches a device itself.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Seconds between two probes.
    #[serde(default = "default_probe_seconds")]
    pub probe_seconds: u64,
    /// A key or the store not answering within this many seconds is "not ready".
    #[serde(default = "default_probe_timeout_seconds")]
    pub probe_timeout_seconds: u64,
    /// Certificates whose notAfter is within this many days count as near expiry (metric).
    #[serde(default = "default_expiry_warning_days")]
    pub expiry_warning_days: u32,
    /// Seconds between two counts of the certificate table (a read of every record).
    #[serde(default = "default_expiry_count_seconds")]
    pub expiry_count_seconds: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            probe_seconds: default_probe_seconds(),
            probe_timeout_seconds: default_probe_timeout_seconds(),
            expiry_warning_days: default_expiry_warning_days(),
            expiry_count_seconds: default_expiry_count_seconds(),
        }
    }
}

fn default_probe_seconds() -> u64 {
    10
}
fn default_probe_timeout_seconds() -> u64 {
    5
}
fn default_expiry_warning_days() -> u32 {
    30
}
fn default_expiry_count_seconds() -> u64 {
    300
}

/// Prometheus text exposition over plain HTTP (`GET /metrics`, also `/livez`, `/readyz`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Listen address; plain HTTP, so keep it on loopback or a management network.
    #[serde(default = "default_metrics_listen")]
    pub listen: SocketAddr,
    /// Connections open at once; beyond, a new one is closed at once. A scraper needs one
    /// or two: the cap only keeps a stray client from holding descriptors.
    #[serde(default = "default_metrics_max_connections")]
    pub max_connections: usize,
    /// Seconds a client has to send the request headers (as `[server]`).
    #[serde(default = "default_metrics_header_read_timeout_seconds")]
    pub header_read_timeout_seconds: u64,
    /// Seconds a connection may stay open without a request (as `[server]`).
    #[serde(default = "default_metrics_idle_timeout_seconds")]
    pub idle_timeout_seconds: u64,
}

fn default_metrics_max_connections() -> usize {
    16
}
fn default_metrics_header_read_timeout_seconds() -> u64 {
    10
}
fn default_metrics_idle_timeout_seconds() -> u64 {
    60
}

fn default_metrics_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}

/// The local admin API: a Unix socket, mode 0600, owned by the agent's user.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Socket path; default `warden.sock` next to the store (or the older
    /// `sm.admin_socket`, if set).
    #[serde(default)]
    pub socket: Option<PathBuf>,
}

/// A key backend, chosen by `type`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum BackendConfig {
    Pkcs11(Pkcs11Config),
    Tpm(TpmConfig),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Config {
    /// Path of the PKCS#11 module (shared library).
    pub module: PathBuf,
    /// Token label (CKA_LABEL of the token, as set at C_InitToken).
    #[serde(default)]
    pub token_label: Option<String>,
    /// Token serial number.
    #[serde(default)]
    pub token_serial: Option<String>,
    /// The user PIN, by reference.
    pub pin: SecretSource,
    /// Sessions kept open; must stay below the token's maximum. Callers wait when all are
    /// busy.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// Least time between two library re-initializations (the ladder's third step), doubling
    /// while the token stays unavailable, up to `reinit_backoff_max_ms`; requests within the
    /// window fail at once as unavailable.
    #[serde(default = "default_reinit_backoff_ms")]
    pub reinit_backoff_ms: u64,
    #[serde(default = "default_reinit_backoff_max_ms")]
    pub reinit_backoff_max_ms: u64,
    /// How many times one operation climbs the recovery ladder before it fails as
    /// unavailable.
    #[serde(default = "default_recovery_attempts")]
    pub recovery_attempts: u32,
}

impl Pkcs11Config {
    pub fn token(&self) -> TokenSelector {
        TokenSelector {
            label: self.token_label.clone(),
            serial: self.token_serial.clone(),
        }
    }
}

fn default_pool_size() -> usize {
    4
}
fn default_reinit_backoff_ms() -> u64 {
    100
}
fn default_reinit_backoff_max_ms() -> u64 {
    5_000
}
fn default_recovery_attempts() -> u32 {
    4
}

/// TPM 2.0 backend. Handles are documented in `tpm/HANDLES.md`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TpmConfig {
    /// TCTI: `device:/dev/tpmrm0`, `swtpm:path=/run/swtpm.sock`,
    /// `swtpm:host=127.0.0.1,port=2321`, or `tabrmd`.
    #[serde(default = "default_tcti")]
    pub tcti: String,
    /// Persistent handle of the ECC P-256 storage primary key under the owner hierarchy
    /// (TCG's SRK handle). Reused when present; created and persisted when absent.
    #[serde(default = "default_storage_primary_handle", with = "hex_handle")]
    pub storage_primary_handle: u32,
    /// Range of persistent handles in which signing keys are placed.
    #[serde(default = "default_key_handle_first", with = "hex_handle")]
    pub key_handle_first: u32,
    #[serde(default = "default_key_handle_last", with = "hex_handle")]
    pub key_handle_last: u32,
    /// Owner hierarchy authorization, by reference; absent means the empty auth (the
    /// agent never takes ownership nor changes hierarchy auth).
    #[serde(default)]
    pub owner_auth: Option<SecretSource>,
    /// How many times one command reconnects to the TPM (within its deadline) before it
    /// fails as unavailable and the TPM is marked down.
    #[serde(default = "default_recovery_attempts")]
    pub recovery_attempts: u32,
    /// Deadline of one TPM command, in milliseconds: a caller waits at most this long for
    /// the answer, then gets 503 (unavailable); a command still in the TPM past it makes the
    /// agent abandon that connection and build a new one.
    #[serde(default = "default_tpm_command_timeout_ms")]
    pub command_timeout_ms: u64,
    /// Deadline of a key generation (TPM2_Create, TPM2_CreatePrimary), in milliseconds: a
    /// hardware TPM takes seconds for an RSA key.
    #[serde(default = "default_tpm_keygen_timeout_ms")]
    pub keygen_timeout_ms: u64,
    /// Callers that may wait on the TPM at once. More wait for a slot only while the TPM
    /// keeps answering, and are refused (503) once it stalls. Keep it well below the
    /// server's blocking threads (16), so a hung TPM cannot hold them all.
    #[serde(default = "default_tpm_max_waiting_commands")]
    pub max_waiting_commands: usize,
}

fn default_tpm_command_timeout_ms() -> u64 {
    5_000
}
fn default_tpm_keygen_timeout_ms() -> u64 {
    60_000
}
fn default_tpm_max_waiting_commands() -> usize {
    8
}

fn default_tcti() -> String {
    "device:/dev/tpmrm0".to_string()
}
fn default_storage_primary_handle() -> u32 {
    0x8100_0001
}
fn default_key_handle_first() -> u32 {
    0x8100_0100
}
fn default_key_handle_last() -> u32 {
    0x8100_01ff
}

mod hex_handle {
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        let text = String::deserialize(d)?;
        let hex = text
            .strip_prefix("0x")
            .or_else(|| text.strip_prefix("0X"))
            .ok_or_else(|| serde::de::Error::custom(format!("'{text}' is not a 0x... handle")))?;
        u32::from_str_radix(hex, 16)
            .map_err(|_| serde::de::Error::custom(format!("'{text}' is not a hex handle")))
    }
}

/// Where a secret comes from. Never inline.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "lowercase")]
pub enum SecretSource {
    /// A file holding the secret (trailing newline stripped). Should be mode 0400/0600.
    File(PathBuf),
    /// A systemd credential name, read from `$CREDENTIALS_DIRECTORY/<name>`
    /// (`LoadCredential=` in the unit).
    Credential(String),
}

impl SecretSource {
    /// Read the secret. A missing, unreadable or empty secret is an error, never "".
    pub fn read(&self) -> Result<SecretString, String> {
        let path = match self {
            SecretSource::File(path) => path.clone(),
            SecretSource::Credential(name) => {
                if name.contains('/') || name.is_empty() {
                    return Err(format!("credential name '{name}' is not a plain name"));
                }
                let dir = std::env::var_os("CREDENTIALS_DIRECTORY").ok_or_else(|| {
                    format!(
                        "credential '{name}': CREDENTIALS_DIRECTORY is not set \
                         (LoadCredential= missing from the unit?)"
                    )
                })?;
                Path::new(&dir).join(name)
            }
        };
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read secret file {}: {e}", path.display()))?;
        let secret = text.trim_end_matches(['\n', '\r']);
        if secret.is_empty() {
            return Err(format!("secret file {} is empty", path.display()));
        }
        Ok(SecretString::from(secret.to_string()))
    }
}

impl fmt::Display for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::File(path) => write!(f, "file {}", path.display()),
            SecretSource::Credential(name) => write!(f, "credential {name}"),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// redb database file.
    #[serde(default = "default_store_path")]
    pub path: PathBuf,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: default_store_path(),
        }
    }
}

fn default_store_path() -> PathBuf {
    PathBuf::from("/var/lib/warden/warden.redb")
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// HTTPS listen address.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The agent's TLS key, held in the HSM or TPM.
    pub tls_key: KeyRef,
    /// PEM certificate chain for `tls_key`, leaf first.
    pub tls_certificate: PathBuf,
    /// How long SIGTERM waits for in-flight requests before closing connections.
    #[serde(default = "default_drain_seconds")]
    pub drain_seconds: u64,
    /// The whole TLS handshake, from accept to the client's Finished (waiting for a
    /// handshake slot included).
    #[serde(default = "default_handshake_timeout_seconds")]
    pub handshake_timeout_seconds: u64,
    /// HTTP/1: the request line and headers of one request, from when the server starts
    /// waiting for them (this also bounds the wait for the next request on a kept-alive
    /// connection).
    #[serde(default = "default_header_read_timeout_seconds")]
    pub header_read_timeout_seconds: u64,
    /// The whole request body, from when its headers arrived; past it the answer is 408 and
    /// an HTTP/1 connection is closed.
    #[serde(default = "default_body_read_timeout_seconds")]
    pub body_read_timeout_seconds: u64,
    /// A connection with no request in flight for this long is closed (HTTP/2: GOAWAY).
    #[serde(default = "default_idle_timeout_seconds")]
    pub idle_timeout_seconds: u64,
    /// Open connections at most (TLS handshakes included); beyond it a new connection is
    /// accepted and closed at once. Lowered at start to fit the open-file limit.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// TLS handshakes in progress at most; more wait (within the handshake timeout).
    #[serde(default = "default_max_handshakes")]
    pub max_handshakes: usize,
    /// HTTP/2 streams (requests) in flight per connection at most.
    #[serde(default = "default_max_concurrent_streams")]
    pub max_concurrent_streams: u32,
    /// How long one handshake signature by the TLS key may take; past it the handshake
    /// fails and the connection is closed.
    #[serde(default = "default_handshake_sign_timeout_seconds")]
    pub handshake_sign_timeout_seconds: u64,
}

impl ServerConfig {
    /// A zero timeout or cap would refuse every client; each must be at least 1.
    fn check(&self) -> Result<(), String> {
        let nonzero = [
            ("handshake_timeout_seconds", self.handshake_timeout_seconds),
            (
                "header_read_timeout_seconds",
                self.header_read_timeout_seconds,
            ),
            ("body_read_timeout_seconds", self.body_read_timeout_seconds),
            ("idle_timeout_seconds", self.idle_timeout_seconds),
            ("max_connections", self.max_connections as u64),
            ("max_handshakes", self.max_handshakes as u64),
            (
                "max_concurrent_streams",
                u64::from(self.max_concurrent_streams),
            ),
            (
                "handshake_sign_timeout_seconds",
                self.handshake_sign_timeout_seconds,
            ),
        ];
        match nonzero.iter().find(|(_, value)| *value == 0) {
            Some((key, _)) => Err(format!("server.{key}: must be at least 1")),
            None => Ok(()),
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8443))
}
fn default_drain_seconds() -> u64 {
    10
}
fn default_handshake_timeout_seconds() -> u64 {
    10
}
fn default_header_read_timeout_seconds() -> u64 {
    10
}
fn default_body_read_timeout_seconds() -> u64 {
    30
}
fn default_idle_timeout_seconds() -> u64 {
    60
}
fn default_max_connections() -> usize {
    512
}
fn default_max_handshakes() -> usize {
    64
}
fn default_max_concurrent_streams() -> u32 {
    32
}
fn default_handshake_sign_timeout_seconds() -> u64 {
    5
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaConfig {
    /// The CA signing key, held in the HSM or TPM.
    pub key: KeyRef,
    /// The CA certificate (PEM).
    pub certificate: PathBuf,
    /// The chain above the CA certificate up to the root (PEM), when the root is external.
    #[serde(default)]
    pub chain: Option<PathBuf>,
}

/// The CMF: who may call it, which CAs issue what, and the certificate profiles.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CmfConfig {
    /// PEM roots that issue the consumers' (VNFMs') TLS client certificates. Mutual TLS is
    /// required on every CMF resource.
    pub client_ca: PathBuf,
    /// Consumers, by the identity in their client certificate (first DNS SAN, else CN).
    #[serde(default, rename = "consumer")]
    pub consumers: Vec<ConsumerConfig>,
    /// CAs the CMF may choose; empty = the top-level `[ca]`, id "default", for every type.
    #[serde(default, rename = "ca")]
    pub cas: Vec<CmfCaConfig>,
    /// Largest accepted request body.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// What to do when a registered attester's attestation fails (IFA 033 11.2.1 local
    /// policy): "refuse" (422, nothing issued) or "issue" (issued and recorded un-attested).
    #[serde(default)]
    pub unattested: UnattestedPolicy,
    /// Aliases of attestation format OIDs: OID -> "tpm2-certify" | "x509-key-certificate".
    #[serde(default)]
    pub attestation_formats: std::collections::BTreeMap<String, String>,
    /// Anchoring attesters in a TPM PKI, and freshness nonces (issue 10 §2).
    #[serde(default)]
    pub attestation: AttestationConfig,
    /// Certificate profiles by certType; defaults apply to a type not listed.
    #[serde(default)]
    pub profile: std::collections::BTreeMap<String, ProfileConfig>,
    /// Writes batched into one durable commit at most (group commit).
    #[serde(default = "default_group_commit")]
    pub group_commit_max: usize,
    /// Direct mode (IFA 033 9.1, 10.3.2): the CMF follows the VNF lifecycle of these VNFMs
    /// (Cm-Vnfm, SOL 003 vnflcm v2) and enrolls their VNFC instances itself; absent = off.
    #[serde(default)]
    pub direct: Option<DirectConfig>,
    /// Revocation: CRLs and the OCSP responder (`[cmf.revocation]`), on by default.
    #[serde(default)]
    pub revocation: RevocationConfig,
    /// Trust domains: the names, certTypes and CAs their consumers may use (issue 10). Every
    /// consumer's `trust_domain` must be one of them; no domain permits every name.
    #[serde(default, rename = "trust_domain")]
    pub trust_domains: Vec<TrustDomainConfig>,
    /// A VNFC identifier is certified in the subject commonName (always); with this, also as
    /// the subjectAltName URI `urn:etsi:nfv:vnfc:<id>` (RFC 5280 permits URNs, but pkilint
    /// 0.13 flags every URN as pkix.invalid_uri_syntax, so it is off by default).
    #[serde(default)]
    pub vnfc_id_uri: bool,
}

/// `[cmf.direct]`: the notification endpoint and the loops shared by every VNFM followed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectConfig {
    /// Seconds between two reconciliations (subscriptions, the paged list of VNF instances,
    /// Query VNF of every VNF followed): what a lost notification costs at most.
    #[serde(default = "default_direct_reconcile_seconds")]
    pub reconcile_seconds: u64,
    /// Lifetime of an enrollment credential (single use), in seconds.
    #[serde(default = "default_enrollment_seconds")]
    pub enrollment_seconds: u64,
    /// Largest notification body accepted.
    #[serde(default = "default_sm_max_body")]
    pub max_body_bytes: usize,
    /// The VNFMs followed.
    #[serde(default, rename = "vnfm")]
    pub vnfms: Vec<DirectVnfmConfig>,
}

fn default_direct_reconcile_seconds() -> u64 {
    300
}
fn default_enrollment_seconds() -> u64 {
    3600
}

/// `[[cmf.direct.vnfm]]`: one VNFM producing VNF LCM (SOL 003 vnflcm v2) for the CMF.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectVnfmConfig {
    /// Local name: the notification path, the consumer name of its VNFCs' certificates.
    pub id: String,
    /// The trust domain of this VNFM; its VNFCs' registrations belong to it.
    pub trust_domain: String,
    /// apiRoot, `https://host:port[/prefix]`; `http://` only to a loopback address
    /// (a development VNFM on the same host).
    pub api_root: String,
    /// PEM roots of the VNFM's (and the token endpoint's) server certificate; https only.
    #[serde(default)]
    pub tls_roots: Option<PathBuf>,
    /// The CMF's TLS client key towards this VNFM, in the HSM/TPM (https only).
    #[serde(default)]
    pub client_key: Option<KeyRef>,
    /// Its certificate chain (PEM, leaf first).
    #[serde(default)]
    pub client_certificate: Option<PathBuf>,
    /// How the CMF authenticates to the VNFM's API.
    pub auth: VnfmAuthConfig,
    /// VNF products in direct mode, by vnfdId; a VNF matching none of `vnfd_ids`,
    /// `vnf_product_names` or `vnf_instance_ids` is not followed.
    #[serde(default)]
    pub vnfd_ids: Vec<String>,
    /// VNF products in direct mode, by vnfProductName.
    #[serde(default)]
    pub vnf_product_names: Vec<String>,
    /// Single VNF instances in direct mode.
    #[serde(default)]
    pub vnf_instance_ids: Vec<String>,
    /// The CMF CA (cmf.ca id, or "default") that issues these VNFCs' certificates; the first
    /// CA issuing VNFCI_CERT when absent.
    #[serde(default)]
    pub issuing_ca: Option<String>,
    /// The callback URI given to the VNFM; default
    /// `https://<server.listen>/cmf/v1/direct/notifications/<id>`.
    #[serde(default)]
    pub callback_uri: Option<String>,
    /// How the VNFM authenticates its notifications: BASIC or OAUTH2_CLIENT_CREDENTIALS
    /// (SOL 013 8.3.4; Tacker sends both, not TLS_CERT).
    pub notification_auth: NotificationAuth,
    /// BASIC: the password given to the VNFM (user name = `id`); OAUTH2: the client secret.
    pub notification_secret: SecretSource,
    /// The EST URL written into the enrollment credential handed to each VNFC; default
    /// `https://<server.listen>/.well-known/est/direct/<id>` (the VNFM's own enrollment path).
    #[serde(default)]
    pub est_url: Option<String>,
    /// Per-request timeout.
    #[serde(default = "default_nfvo_timeout")]
    pub timeout_seconds: u64,
}

/// The VNFM API's authentication as the real VNFMs offer it: Tacker behind Keystone v3
/// (password or application credential), or SOL 013 8.2 OAuth 2.0 client credentials.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, tag = "type", rename_all = "snake_case")]
pub enum VnfmAuthConfig {
    /// Keystone v3 password authentication, project-scoped.
    KeystonePassword {
        /// Keystone v3 endpoint, e.g. `https://keystone:5000/v3`.
        url: String,
        user: String,
        #[serde(default = "default_domain")]
        user_domain: String,
        project: String,
        #[serde(default = "default_domain")]
        project_domain: String,
        password: SecretSource,
    },
    /// Keystone v3 application credential (its own scope).
    KeystoneApplicationCredential {
        url: String,
        id: String,
        secret: SecretSource,
    },
    /// OAuth 2.0 client credentials (RFC 6749 4.4).
    Oauth2 {
        token_url: String,
        client_id: String,
        client_secret: SecretSource,
    },
}

fn default_domain() -> String {
    "Default".into()
}

/// `[cmf.revocation]`: CRLs per issuing CA (RFC 5280 5) and an OCSP responder (RFC 6960),
/// both signed by the CA key in the HSM/TPM and served over plain HTTP on a listener of their
/// own: relying parties fetch them without client certificates, and often without TLS at all
/// (a CRL or OCSP response is signed; RFC 5280 8 and RFC 6960 5 do not rely on transport).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationConfig {
    /// false: no listener, no CRL DP / AIA in issued certificates, no CRLs made.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Plain-HTTP listener for `/crl/{caId}.crl` and `/ocsp`. Default: the `[server]` listen
    /// address with port 8080 (port 0, any free port, when the server's port is 0).
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// The URL relying parties reach that listener at, written into issued certificates
    /// (CRL distribution point `{base_url}/crl/{caId}.crl`, AIA OCSP `{base_url}/ocsp`).
    /// Default: `http://{listen address}:{port}`, or, when listening on every address, the
    /// first DNS name of the agent's TLS certificate.
    #[serde(default)]
    pub base_url: Option<String>,
    /// A CRL's nextUpdate is thisUpdate plus this (RFC 5280 5.1.2.5).
    #[serde(default = "default_crl_validity_seconds")]
    pub crl_validity_seconds: u64,
    /// A CRL is made again when its nextUpdate is less than this far away, even without a
    /// revocation (relying parties never see an expired CRL while the agent runs).
    #[serde(default = "default_crl_regenerate_before_seconds")]
    pub crl_regenerate_before_seconds: u64,
    /// After a revocation, wait this long for more before making the CRL (one signature for
    /// a burst, e.g. a VNF's certificates revoked one by one).
    #[serde(default = "default_crl_debounce_ms")]
    pub crl_debounce_ms: u64,
    /// nextUpdate of OCSP responses (RFC 6960 2.4): how long a relying party may cache one.
    #[serde(default = "default_ocsp_validity_seconds")]
    pub ocsp_validity_seconds: u64,
    /// Open connections at most on the revocation listener; beyond it a new connection is
    /// closed at once.
    #[serde(default = "default_revocation_max_connections")]
    pub max_connections: usize,
    /// Request line and headers of one request (and the wait for the next on a kept-alive
    /// connection), and the whole of an OCSP POST body.
    #[serde(default = "default_revocation_read_timeout_seconds")]
    pub read_timeout_seconds: u64,
    /// Largest OCSP request (POST body or base64 GET path) accepted.
    #[serde(default = "default_ocsp_max_request_bytes")]
    pub ocsp_max_request_bytes: usize,
}

impl Default for RevocationConfig {
    fn default() -> Self {
        RevocationConfig {
            enabled: true,
            listen: None,
            base_url: None,
            crl_validity_seconds: default_crl_validity_seconds(),
            crl_regenerate_before_seconds: default_crl_regenerate_before_seconds(),
            crl_debounce_ms: default_crl_debounce_ms(),
            ocsp_validity_seconds: default_ocsp_validity_seconds(),
            max_connections: default_revocation_max_connections(),
            read_timeout_seconds: default_revocation_read_timeout_seconds(),
            ocsp_max_request_bytes: default_ocsp_max_request_bytes(),
        }
    }
}

impl RevocationConfig {
    /// Values that would make CRLs expire before they are replaced, or refuse every client.
    pub fn check(&self) -> Result<(), String> {
        if self.crl_validity_seconds < 60 {
            return Err("cmf.revocation.crl_validity_seconds: at least 60".into());
        }
        if self.crl_regenerate_before_seconds >= self.crl_validity_seconds {
            return Err(
                "cmf.revocation.crl_regenerate_before_seconds must be less than \
                 crl_validity_seconds"
                    .into(),
            );
        }
        if self.ocsp_validity_seconds == 0
            || self.max_connections == 0
            || self.read_timeout_seconds == 0
            || self.ocsp_max_request_bytes < 64
        {
            return Err(
                "cmf.revocation: ocsp_validity_seconds, max_connections and \
                 read_timeout_seconds must be at least 1, ocsp_max_request_bytes at least 64"
                    .into(),
            );
        }
        if let Some(url) = &self.base_url {
            if !(url.starts_with("http://") || url.starts_with("https://"))
                || url.ends_with('/')
                || !url.is_ascii()
            {
                return Err(format!(
                    "cmf.revocation.base_url '{url}': an http:// URL without a trailing '/'"
                ));
            }
        }
        Ok(())
    }
}

fn default_crl_validity_seconds() -> u64 {
    7 * 86_400
}
fn default_crl_regenerate_before_seconds() -> u64 {
    3 * 86_400
}
fn default_crl_debounce_ms() -> u64 {
    500
}
fn default_ocsp_validity_seconds() -> u64 {
    3_600
}
fn default_revocation_max_connections() -> usize {
    256
}
fn default_revocation_read_timeout_seconds() -> u64 {
    10
}
fn default_ocsp_max_request_bytes() -> usize {
    8 * 1024
}

/// `[[cmf.trust_domain]]`: what the consumers of one trust domain may register. A name is
/// permitted when it is inside the list for its kind; an empty list permits no name of that
/// kind (see `cmf::names` and the README, "Names and trust domains").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustDomainConfig {
    pub id: String,
    /// DNS names permitted: each suffix itself and every name under it (label boundary).
    #[serde(default)]
    pub dns_suffixes: Vec<String>,
    /// VNFC identifiers permitted: shell-style patterns (`*`, `?`), e.g. "vnfc-*".
    #[serde(default)]
    pub vnfc_id_patterns: Vec<String>,
    /// IP addresses permitted: CIDR ranges, e.g. "10.20.0.0/16", "2001:db8::/48".
    #[serde(default)]
    pub ip_ranges: Vec<String>,
    /// CAs that issue for this domain (ids of `[[cmf.ca]]`, or "default" for `[ca]`), in
    /// order of preference: Register without caId takes the first that issues the certType.
    pub cas: Vec<String>,
    /// certTypes its consumers may register. MANO_CERT (serverAuth+clientAuth certificates
    /// for MANO entities' FQDNs) only when listed.
    #[serde(default = "default_domain_cert_types")]
    pub cert_types: Vec<String>,
}

fn default_domain_cert_types() -> Vec<String> {
    vec!["VNFCI_CERT".into(), "VNF_OAM_CERT".into()]
}

fn default_max_body_bytes() -> usize {
    64 * 1024
}
fn default_group_commit() -> usize {
    64
}

/// `[cmf.attestation]`: which TPM PKI anchors attesters, what an unanchored one earns, and
/// the freshness nonces and AK challenges.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttestationConfig {
    /// PEM files of TPM manufacturer (EK) and attestation (AK) CA roots. Empty: no attester
    /// is ever anchored, and no certificate gets the TCG policies 2.23.133.11.1.1 / .2.
    #[serde(default)]
    pub roots: Vec<PathBuf>,
    /// A valid attestation by an attester that is not anchored: "issue" (issued without the
    /// TCG policies, recorded "verified-unanchored") or "refuse" (422).
    #[serde(default)]
    pub unanchored: UnanchoredPolicy,
    /// Lifetime of a freshness nonce, seconds.
    #[serde(default = "default_attestation_ttl")]
    pub nonce_ttl_seconds: u64,
    /// Lifetime of an AK credential challenge, seconds.
    #[serde(default = "default_attestation_ttl")]
    pub challenge_ttl_seconds: u64,
    /// Require a CMF nonce in every TPM attestation's qualifying data (unless the
    /// registration pins expectedQualifyingData).
    #[serde(default)]
    pub require_nonce: bool,
    /// Unused nonces (and, separately, challenges) one registration may hold at once.
    #[serde(default = "default_attestation_outstanding")]
    pub max_outstanding: usize,
}

impl Default for AttestationConfig {
    fn default() -> Self {
        AttestationConfig {
            roots: Vec::new(),
            unanchored: UnanchoredPolicy::default(),
            nonce_ttl_seconds: default_attestation_ttl(),
            challenge_ttl_seconds: default_attestation_ttl(),
            require_nonce: false,
            max_outstanding: default_attestation_outstanding(),
        }
    }
}

fn default_attestation_ttl() -> u64 {
    300
}
fn default_attestation_outstanding() -> usize {
    32
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnanchoredPolicy {
    #[default]
    Issue,
    Refuse,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnattestedPolicy {
    #[default]
    Refuse,
    Issue,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerConfig {
    /// The identity in the client certificate.
    pub id: String,
    /// Consumers of different trust domains never see each other's registrations; the
    /// domain (`[[cmf.trust_domain]]`) says which names, certTypes and CAs it may use.
    pub trust_domain: String,
    /// Narrowing for this consumer: a name must be permitted by the domain and by these
    /// (absent = the domain's alone).
    #[serde(default)]
    pub dns_suffixes: Option<Vec<String>>,
    #[serde(default)]
    pub vnfc_id_patterns: Option<Vec<String>>,
    #[serde(default)]
    pub ip_ranges: Option<Vec<String>>,
    /// A subset of the domain's CAs, in order of preference.
    #[serde(default)]
    pub cas: Option<Vec<String>>,
    /// A subset of the domain's certTypes.
    #[serde(default)]
    pub cert_types: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CmfCaConfig {
    pub id: String,
    pub key: KeyRef,
    pub certificate: PathBuf,
    #[serde(default)]
    pub chain: Option<PathBuf>,
    /// Which certTypes this CA issues: MANO_CERT, VNFCI_CERT, VNF_OAM_CERT.
    pub cert_types: Vec<String>,
}

/// A certificate profile (per certType).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileConfig {
    #[serde(default = "default_validity_days")]
    pub validity_days: u32,
    /// digitalSignature, keyEncipherment, keyAgreement, nonRepudiation.
    #[serde(default = "default_key_usage")]
    pub key_usage: Vec<String>,
    /// serverAuth, clientAuth, or dotted OIDs.
    #[serde(default = "default_eku")]
    pub extended_key_usage: Vec<String>,
    /// Optional CRL distribution point URI.
    #[serde(default)]
    pub crl_distribution_point: Option<String>,
    /// Key types accepted in CSRs: ec-p256, ec-p384, rsa-2048, rsa-3072, rsa-4096.
    #[serde(default = "default_key_types")]
    pub key_types: Vec<String>,
}

impl Default for ProfileConfig {
    fn default() -> Self {
        ProfileConfig {
            validity_days: default_validity_days(),
            key_usage: default_key_usage(),
            extended_key_usage: default_eku(),
            crl_distribution_point: None,
            key_types: default_key_types(),
        }
    }
}

fn default_validity_days() -> u32 {
    365
}
fn default_key_usage() -> Vec<String> {
    vec!["digitalSignature".into(), "keyEncipherment".into()]
}
fn default_eku() -> Vec<String> {
    vec!["serverAuth".into(), "clientAuth".into()]
}
fn default_key_types() -> Vec<String> {
    ["ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096"]
        .map(String::from)
        .to_vec()
}

/// A configuration error: file, key and reason.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {reason}")]
pub struct ConfigError {
    pub file: String,
    pub reason: String,
}

impl Config {
    /// The SM's secrets the configuration references, with what each is for: the notification
    /// password / client secret and the OAuth2 client secrets towards the NFVO.
    pub fn sm_secrets(&self) -> Vec<(String, &SecretSource)> {
        let Some(sm) = &self.sm else {
            return Vec::new();
        };
        let mut secrets = Vec::new();
        if let Some(secret) = &sm.notifications.secret {
            secrets.push(("sm.notifications.secret".to_string(), secret));
        }
        if let Some(o) = &sm.nfvo.oauth2 {
            for (name, client) in [
                ("ns_lcm", &o.ns_lcm),
                ("status_info", &o.status_info),
                ("sec_enforce", &o.sec_enforce),
                ("security_vnf_mgmt", &o.security_vnf_mgmt),
            ] {
                secrets.push((
                    format!("sm.nfvo.oauth2.{name}.client_secret"),
                    &client.client_secret,
                ));
            }
        }
        secrets
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let err = |reason: String| ConfigError {
            file: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
        Config::parse(&text).map_err(err)
    }

    /// Parse and check; the error is one line naming the key.
    pub fn parse(text: &str) -> Result<Config, String> {
        let config: Config = toml::from_str(text).map_err(|e| one_line_toml_error(&e))?;
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<(), String> {
        if let Some(server) = &self.server {
            server.check()?;
        }
        if let Some(sm) = &self.sm {
            sm.check()?;
        }
        if let Some(cmf) = &self.cmf {
            cmf.revocation.check()?;
            crate::cmf::names::check_config(cmf)?;
        }
        if self.health.probe_seconds == 0 || self.health.probe_timeout_seconds == 0 {
            return Err(
                "health: probe_seconds and probe_timeout_seconds must be at least 1".into(),
            );
        }
        let pkcs11 = self.pkcs11_backends().count();
        let tpm = self.tpm_backends().count();
        if pkcs11 > 1 || tpm > 1 {
            return Err("backend: at most one backend of each type".to_string());
        }
        for backend in &self.backends {
            match backend {
                BackendConfig::Pkcs11(p) => {
                    if p.token_label.is_none() && p.token_serial.is_none() {
                        return Err(
                            "backend (pkcs11): token_label or token_serial is required".into()
                        );
                    }
                    if p.pool_size == 0 {
                        return Err("backend (pkcs11).pool_size: must be at least 1".into());
                    }
                }
                BackendConfig::Tpm(t) => {
                    if t.storage_primary_handle >> 24 != 0x81
                        || t.key_handle_first >> 24 != 0x81
                        || t.key_handle_last >> 24 != 0x81
                    {
                        return Err("backend (tpm): handles must be persistent (0x81xxxxxx)".into());
                    }
                    if t.key_handle_first > t.key_handle_last {
                        return Err(
                            "backend (tpm).key_handle_first: greater than key_handle_last".into(),
                        );
                    }
                    if (t.key_handle_first..=t.key_handle_last).contains(&t.storage_primary_handle)
                    {
                        return Err(
                            "backend (tpm).storage_primary_handle: inside the key handle range"
                                .into(),
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// The admin socket: `admin.socket`, else `sm.admin_socket`, else `warden.sock` next to
    /// the store.
    pub fn admin_socket(&self) -> PathBuf {
        self.admin
            .socket
            .clone()
            .or_else(|| self.sm.as_ref().and_then(|s| s.admin_socket.clone()))
            .unwrap_or_else(|| self.store.path.with_file_name("warden.sock"))
    }

    pub fn pkcs11_backends(&self) -> impl Iterator<Item = &Pkcs11Config> {
        self.backends.iter().filter_map(|b| match b {
            BackendConfig::Pkcs11(p) => Some(p),
            BackendConfig::Tpm(_) => None,
        })
    }

    pub fn tpm_backends(&self) -> impl Iterator<Item = &TpmConfig> {
        self.backends.iter().filter_map(|b| match b {
            BackendConfig::Tpm(t) => Some(t),
            BackendConfig::Pkcs11(_) => None,
        })
    }
}

/// toml's errors span several lines with a source excerpt; keep the key and reason.
fn one_line_toml_error(error: &toml::de::Error) -> String {
    let message = error.message().trim().replace('\n', " ");
    match error.span() {
        Some(span) => format!("{message} (at byte {})", span.start),
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revocation_settings_that_would_let_a_crl_expire_are_refused() {
        let base = "[cmf]\nclient_ca = \"/x\"\n[cmf.revocation]\n";
        let refused = |extra: &str| Config::parse(&format!("{base}{extra}")).unwrap_err();
        assert!(
            refused("crl_validity_seconds = 100\ncrl_regenerate_before_seconds = 100")
                .contains("crl_regenerate_before_seconds")
        );
        assert!(refused("crl_validity_seconds = 10").contains("crl_validity_seconds"));
        assert!(refused("max_connections = 0").contains("max_connections"));
        assert!(refused("base_url = \"ftp://x\"").contains("base_url"));
        assert!(refused("bogus = 1").contains("bogus"));
        let ok = Config::parse(&format!("{base}base_url = \"http://pki.example:8080\""))
            .expect("parses");
        assert_eq!(
            ok.cmf.unwrap().revocation.base_url.as_deref(),
            Some("http://pki.example:8080")
        );
    }

    /// The annotated reference config must stay a valid config showing the defaults.
    #[test]
    fn reference_config_parses_and_shows_the_defaults() {
        let config = Config::parse(include_str!("../systemd/warden.toml")).expect("parses");
        let pkcs11 = config.pkcs11_backends().next().expect("pkcs11 backend");
        assert_eq!(pkcs11.pool_size, default_pool_size());
        assert_eq!(pkcs11.reinit_backoff_ms, default_reinit_backoff_ms());
        let tpm = config.tpm_backends().next().expect("tpm backend");
        assert_eq!(tpm.storage_primary_handle, default_storage_primary_handle());
        assert_eq!(tpm.key_handle_first, default_key_handle_first());
        assert_eq!(tpm.key_handle_last, default_key_handle_last());
        let cmf = config.cmf.expect("cmf");
        let revocation = &cmf.revocation;
        let defaults = RevocationConfig::default();
        assert!(revocation.enabled && revocation.listen.is_none());
        assert_eq!(
            revocation.crl_validity_seconds,
            defaults.crl_validity_seconds
        );
        assert_eq!(
            revocation.crl_regenerate_before_seconds,
            defaults.crl_regenerate_before_seconds
        );
        assert_eq!(revocation.crl_debounce_ms, defaults.crl_debounce_ms);
        assert_eq!(
            revocation.ocsp_validity_seconds,
            defaults.ocsp_validity_seconds
        );
        assert_eq!(revocation.max_connections, defaults.max_connections);
        assert_eq!(
            revocation.read_timeout_seconds,
            defaults.read_timeout_seconds
        );
        assert_eq!(
            revocation.ocsp_max_request_bytes,
            defaults.ocsp_max_request_bytes
        );
        assert_eq!(cmf.max_body_bytes, default_max_body_bytes());
        assert_eq!(cmf.group_commit_max, default_group_commit());
        let profile = &cmf.profile["VNFCI_CERT"];
        let defaults = ProfileConfig::default();
        assert_eq!(profile.validity_days, defaults.validity_days);
        assert_eq!(profile.key_usage, defaults.key_usage);
        assert_eq!(profile.extended_key_usage, defaults.extended_key_usage);
        assert_eq!(profile.key_types, defaults.key_types);
        let sm = config.sm.as_ref().expect("sm");
        assert_eq!(
            sm.journal_retention_hours,
            default_journal_retention_hours()
        );
        assert_eq!(sm.reconcile_seconds, default_reconcile_seconds());
        assert_eq!(sm.max_body_bytes, default_sm_max_body());
        assert_eq!(sm.group_commit_max, default_sm_group_commit());
        assert_eq!(sm.nfvo.timeout_seconds, default_nfvo_timeout());
        assert_eq!(sm.nfvo.attempts, default_nfvo_attempts());
        assert_eq!(sm.notifications.token_seconds, default_token_seconds());
        let server = config.server.expect("server");
        assert_eq!(server.listen, default_listen());
        assert_eq!(server.drain_seconds, default_drain_seconds());
    }

    #[test]
    fn errors_name_the_key_in_one_line() {
        let err = Config::parse("[store]\npath = 3\n").unwrap_err();
        assert!(err.contains("path") && !err.contains('\n'), "{err}");
        let err = Config::parse("[[backend]]\ntype = \"hsm\"\n").unwrap_err();
        assert!(err.contains("hsm") && !err.contains('\n'), "{err}");
        let err = Config::parse(
            "[[backend]]\ntype = \"pkcs11\"\nmodule = \"/x.so\"\npin = { file = \"/p\" }\n",
        )
        .unwrap_err();
        assert!(err.contains("token_label or token_serial"), "{err}");
    }
}

/// The Security Manager: its mode, the NFVO it watches, how the NFVO authenticates to it,
/// and the rules that turn events into actions.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmConfig {
    /// This SM's name: its identity towards the NFVO (certificate subjects, the user name of
    /// BASIC notification authentication, the OAuth2 client of the notification endpoint).
    pub name: String,
    /// IFA 033 5.1: PASSIVE records only; SEMI_ACTIVE may terminate VNFs (snapshot and
    /// replacement options); FULLY_ACTIVE may also disable packages and ask for erasure.
    pub mode: SmMode,
    /// The callback URI the NFVO posts notifications to; default
    /// `https://<server.listen>/sm/v1/notifications`.
    #[serde(default)]
    pub callback_uri: Option<String>,
    /// How often the SM reconciles with the NFVO (Query NS, ns_lcm_op_occs) to recover
    /// notifications it missed.
    #[serde(default = "default_reconcile_seconds")]
    pub reconcile_seconds: u64,
    /// Largest notification body accepted.
    #[serde(default = "default_sm_max_body")]
    pub max_body_bytes: usize,
    /// How long processed notifications stay in the journal (and so how long a repeated id
    /// is recognised as a duplicate), in hours.
    #[serde(default = "default_journal_retention_hours")]
    pub journal_retention_hours: u64,
    /// Writes batched into one durable commit at most (notification journal).
    #[serde(default = "default_sm_group_commit")]
    pub group_commit_max: usize,
    /// Unix socket of the local admin API; superseded by `admin.socket`, kept for existing
    /// configurations.
    #[serde(default)]
    pub admin_socket: Option<PathBuf>,
    /// Destroy the keys the agent holds for a VNF when the VNF terminates (IFA 033 Sc-Or
    /// SecEnforce.003 erasure, the agent's own share). The agent's own objects only: nothing
    /// is sent to the NFVO for this.
    #[serde(default = "default_true")]
    pub erase_on_termination: bool,
    /// In PASSIVE mode the SM erases nothing, not even with evidence that a VNF is
    /// terminated, unless this is true (the operator's explicit consent: PASSIVE only
    /// observes, IFA 033 5.1.2).
    #[serde(default)]
    pub erase_in_passive: bool,
    pub nfvo: NfvoConfig,
    pub notifications: NotificationAuthConfig,
    /// Pinned VNF package checksums: package id -> SHA-256 hex.
    #[serde(default)]
    pub pinned_packages: std::collections::BTreeMap<String, String>,
    /// Event -> action rules; evaluated in order, the first match wins.
    #[serde(default, rename = "rule")]
    pub rules: Vec<RuleConfig>,
    /// Sc-Vi notifications (IFA 033 8.2, Sc-Vi.Telem.001, Security.005): the VIM's
    /// RabbitMQ and the Aodh webhook. Absent: no Sc-Vi notifications are consumed.
    #[serde(default)]
    pub telemetry: Option<TelemetryConfig>,
    /// Host-wide enforcement (IFA 033 Sc-Or.SecEnforce.004, SecEnforce.003 same-host option).
    #[serde(default)]
    pub hosts: HostsConfig,
    /// The VIM (Sc-Vi producer, IFA 033 clause 8): an OpenStack cloud. Absent: no Sc-Vi.
    #[serde(default)]
    pub vim: Option<VimConfig>,
}

/// `[sm.telemetry]`: where the VIM's notifications come from and how far they are trusted.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// A notification whose own timestamp is further than this from the local clock (either
    /// way) is journaled as suspect and not acted upon (Security.005 "trusted time").
    #[serde(default = "default_clock_bound_seconds")]
    pub clock_bound_seconds: u64,
    /// How many journaled Sc-Vi events are kept (the oldest are pruned past this).
    #[serde(default = "default_telemetry_keep")]
    pub keep_events: usize,
    pub amqp: Option<AmqpConfig>,
    /// The Aodh alarm webhook (`POST /sm/v1/vim/alarms` on the notification listener).
    #[serde(default)]
    pub aodh: Option<AodhWebhookConfig>,
}

/// `[sm.telemetry.amqp]`: the VIM's RabbitMQ (oslo.messaging notifications).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpConfig {
    /// `amqp://host:port/vhost` or `amqps://...`, without credentials.
    pub url: String,
    pub user: String,
    pub password: SecretSource,
    /// PEM roots for `amqps://` (the broker's CA); the system's are not used.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// The SM's own queue; default `warden-sm-<sm.name>`.
    #[serde(default)]
    pub queue: Option<String>,
    /// Durable queue (default): it outlives the SM, so notifications published while the SM
    /// is down wait for it. `false`: auto-delete, gone with the connection.
    #[serde(default = "default_true")]
    pub durable_queue: bool,
    /// Declare missing exchanges durable (oslo.messaging `amqp_durable_queues`, default
    /// false). Existing exchanges are only checked, never redeclared.
    #[serde(default)]
    pub durable_exchanges: bool,
    /// (exchange, routing key) pairs bound to the queue.
    #[serde(default = "default_amqp_bindings")]
    pub bindings: Vec<AmqpBinding>,
    /// Unacknowledged deliveries at most (and so the largest journal batch).
    #[serde(default = "default_amqp_prefetch")]
    pub prefetch: u16,
    /// Largest message accepted; larger ones are journaled as suspect without their body.
    #[serde(default = "default_sm_max_body")]
    pub max_message_bytes: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpBinding {
    pub exchange: String,
    pub routing_key: String,
}

/// `[sm.telemetry.aodh]`: Aodh alarm actions post here with HTTP basic authentication.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AodhWebhookConfig {
    pub user: String,
    pub secret: SecretSource,
}

/// `[sm.hosts]`: host-wide enforcement policy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostsConfig {
    /// Taking a host out of use: what happens to the VNFs' servers on it, unless the
    /// operator says otherwise ("migrate" or "terminate").
    #[serde(default = "default_host_disposition")]
    pub disposition: HostDisposition,
    /// Migration: try live migration first (then cold migration if Nova refuses it).
    #[serde(default = "default_true")]
    pub live_migration: bool,
    /// The aggregate a host out of use is put in (created if missing).
    #[serde(default = "default_quarantine_aggregate")]
    pub quarantine_aggregate: String,
    /// SecEnforce.003 same-host option: when a VNF is terminated for a rule, also terminate
    /// the other VNFs on its host(s).
    #[serde(default)]
    pub terminate_same_host: bool,
    /// The longest a migration is followed before the step fails.
    #[serde(default = "default_migration_seconds")]
    pub migration_timeout_seconds: u64,
}

impl Default for HostsConfig {
    fn default() -> Self {
        HostsConfig {
            disposition: default_host_disposition(),
            live_migration: true,
            quarantine_aggregate: default_quarantine_aggregate(),
            terminate_same_host: false,
            migration_timeout_seconds: default_migration_seconds(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HostDisposition {
    Migrate,
    Terminate,
}

fn default_host_disposition() -> HostDisposition {
    HostDisposition::Migrate
}
fn default_quarantine_aggregate() -> String {
    "warden-quarantine".into()
}
fn default_migration_seconds() -> u64 {
    600
}
fn default_clock_bound_seconds() -> u64 {
    300
}
fn default_telemetry_keep() -> usize {
    100_000
}
fn default_amqp_prefetch() -> u16 {
    64
}
/// Nova versioned notifications, and the legacy ones of Neutron and Cinder (their default
/// `control_exchange`s: `neutron`, `openstack`).
fn default_amqp_bindings() -> Vec<AmqpBinding> {
    [
        ("nova", "versioned_notifications.info"),
        ("nova", "versioned_notifications.error"),
        ("neutron", "notifications.info"),
        ("openstack", "notifications.info"),
    ]
    .into_iter()
    .map(|(e, k)| AmqpBinding {
        exchange: e.into(),
        routing_key: k.into(),
    })
    .collect()
}

fn default_reconcile_seconds() -> u64 {
    300
}
fn default_journal_retention_hours() -> u64 {
    24 * 30
}
fn default_sm_max_body() -> usize {
    1024 * 1024
}
fn default_sm_group_commit() -> usize {
    256
}
fn default_true() -> bool {
    true
}

/// IFA 033 clause 5.1.2 security modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SmMode {
    Passive,
    SemiActive,
    FullyActive,
}

impl fmt::Display for SmMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SmMode::Passive => "PASSIVE",
            SmMode::SemiActive => "SEMI_ACTIVE",
            SmMode::FullyActive => "FULLY_ACTIVE",
        })
    }
}

/// The NFVO (Sc-Or producer).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NfvoConfig {
    /// apiRoot, `https://host:port[/prefix]`.
    pub api_root: String,
    /// PEM roots for the NFVO's server certificate.
    pub ca: PathBuf,
    /// How the SM authenticates to the NFVO: "mtls" (a client key per interface, in the
    /// HSM/TPM) or "oauth2" (client credentials; TLS without a client certificate).
    pub auth: NfvoAuth,
    /// OAuth 2.0 client credentials (auth = "oauth2").
    #[serde(default)]
    pub oauth2: Option<OAuth2ClientConfig>,
    /// The four Sc-Or interfaces, each with its own key (IFA 033 Security.001/.006).
    #[serde(default)]
    pub interface: InterfacesConfig,
    /// Per-request timeout.
    #[serde(default = "default_nfvo_timeout")]
    pub timeout_seconds: u64,
    /// Attempts for one request on 5xx, 409, 429 or a connection failure.
    #[serde(default = "default_nfvo_attempts")]
    pub attempts: u32,
    /// The largest response body read from the NFVO (and its token endpoint), in bytes; a
    /// larger one fails the request with an error naming the NFVO and the limit.
    #[serde(default = "default_nfvo_max_response_bytes")]
    pub max_response_bytes: usize,
}

fn default_nfvo_max_response_bytes() -> usize {
    crate::client::DEFAULT_MAX_RESPONSE_BYTES
}

fn default_nfvo_timeout() -> u64 {
    10
}
fn default_nfvo_attempts() -> u32 {
    6
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NfvoAuth {
    Mtls,
    Oauth2,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuth2ClientConfig {
    pub token_url: String,
    /// One OAuth2 client per Sc-Or interface (IFA 033 Security.006: independent security
    /// associations per interface).
    pub ns_lcm: OAuth2Client,
    pub status_info: OAuth2Client,
    pub sec_enforce: OAuth2Client,
    pub security_vnf_mgmt: OAuth2Client,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuth2Client {
    pub client_id: String,
    pub client_secret: SecretSource,
}

/// The client key and certificate of each Sc-Or interface.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterfacesConfig {
    pub ns_lcm: Option<InterfaceKeyConfig>,
    pub status_info: Option<InterfaceKeyConfig>,
    pub sec_enforce: Option<InterfaceKeyConfig>,
    pub security_vnf_mgmt: Option<InterfaceKeyConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterfaceKeyConfig {
    /// The interface's own key in the HSM/TPM.
    pub key: KeyRef,
    /// Its certificate chain (PEM, leaf first): `warden sm init` issues it from the agent's
    /// CA or writes a CSR for the operator's PKI.
    pub certificate: PathBuf,
}

/// How the NFVO must authenticate its notifications (SOL 013 8.3.4 SubscriptionAuthentication);
/// the SM asks for it in every subscription and enforces it on the callback endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotificationAuthConfig {
    /// BASIC, OAUTH2_CLIENT_CREDENTIALS or TLS_CERT.
    pub auth: NotificationAuth,
    /// BASIC: the password given to the NFVO (user name = `sm.name`); OAUTH2: the client
    /// secret the NFVO uses at the agent's token endpoint.
    #[serde(default)]
    pub secret: Option<SecretSource>,
    /// TLS_CERT: PEM roots of the NFVO's TLS client certificate.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// TLS_CERT: the identity (first DNS SAN, else CN) the NFVO's certificate must carry.
    #[serde(default)]
    pub client_identity: Option<String>,
    /// OAUTH2: lifetime of the access tokens the agent issues.
    #[serde(default = "default_token_seconds")]
    pub token_seconds: u64,
}

fn default_token_seconds() -> u64 {
    3600
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum NotificationAuth {
    Basic,
    Oauth2ClientCredentials,
    TlsCert,
}

/// One rule: when `on` happens, do `action` with these options.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub on: RuleEvent,
    /// "record" (audit only) or "terminate" (remove the VNF from every NS holding it).
    pub action: RuleAction,
    /// Snapshot the VNF first (S and F).
    #[serde(default)]
    pub snapshot: bool,
    /// Instantiate a replacement after the removal (S and F).
    #[serde(default)]
    pub allow_replacement: bool,
    /// Disable the VNF package and so its VNFD (F only).
    #[serde(default)]
    pub disable_package: bool,
    /// Ask NFV-MANO to erase the HMEE/TPM/HSM resources of the VNF (F only).
    #[serde(default)]
    pub erase: bool,
}

/// Events the SM derives from notifications and reconciliation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleEvent {
    /// An LCM operation refused by the NFVO as unauthorized (error status 401/403).
    UnauthorizedChange,
    /// A VNF's package checksum differs from the pinned one.
    PackageChecksumMismatch,
    /// A VNF instantiated from a package the NFVO does not know.
    PackageUnknown,
    /// A VNF instantiated from a disabled package.
    PackageDisabled,
    /// Scale, heal, flavour or external connectivity change, or an NsChangeNotification,
    /// that the SM did not cause.
    TopologyChange,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleAction {
    Record,
    Terminate,
}

impl SmConfig {
    fn check(&self) -> Result<(), String> {
        if let Some(vim) = &self.vim {
            vim.check()?;
        }
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        {
            return Err(format!(
                "sm.name: '{}' must be letters, digits, '-' and '.'",
                self.name
            ));
        }
        if !self.nfvo.api_root.starts_with("https://") {
            return Err("sm.nfvo.api_root: must be https://".into());
        }
        match self.nfvo.auth {
            NfvoAuth::Oauth2 => {
                let Some(o) = &self.nfvo.oauth2 else {
                    return Err("sm.nfvo.oauth2: required with auth = \"oauth2\"".into());
                };
                let mut ids: Vec<&str> = [
                    &o.ns_lcm,
                    &o.status_info,
                    &o.sec_enforce,
                    &o.security_vnf_mgmt,
                ]
                .iter()
                .map(|c| c.client_id.as_str())
                .collect();
                ids.sort_unstable();
                ids.dedup();
                if ids.len() != 4 {
                    // IFA 033 Security.001/.006, as for the mTLS keys.
                    return Err("sm.nfvo.oauth2: each interface needs its own client".into());
                }
            }
            NfvoAuth::Mtls => {
                let i = &self.nfvo.interface;
                let all = [
                    &i.ns_lcm,
                    &i.status_info,
                    &i.sec_enforce,
                    &i.security_vnf_mgmt,
                ];
                if all.iter().any(|k| k.is_none()) {
                    return Err("sm.nfvo.interface: ns_lcm, status_info, sec_enforce and \
                                security_vnf_mgmt are all required with auth = \"mtls\""
                        .into());
                }
                let mut keys: Vec<String> = all
                    .iter()
                    .filter_map(|k| k.as_ref().map(|k| k.key.to_string()))
                    .collect();
                keys.sort();
                keys.dedup();
                if keys.len() != 4 {
                    // IFA 033 Security.001/.006: one independent key per interface.
                    return Err("sm.nfvo.interface: each interface needs its own key".into());
                }
            }
        }
        let n = &self.notifications;
        match n.auth {
            NotificationAuth::Basic | NotificationAuth::Oauth2ClientCredentials
                if n.secret.is_none() =>
            {
                return Err("sm.notifications.secret: required for BASIC and \
                            OAUTH2_CLIENT_CREDENTIALS"
                    .into())
            }
            NotificationAuth::TlsCert if n.client_ca.is_none() => {
                return Err("sm.notifications.client_ca: required for TLS_CERT".into())
            }
            _ => {}
        }
        for (id, hash) in &self.pinned_packages {
            if hash.len() != 64 || hex::decode(hash).is_err() {
                return Err(format!(
                    "sm.pinned_packages.{id}: expected a SHA-256 hex digest"
                ));
            }
        }
        if let Some(uri) = &self.callback_uri {
            if !uri.starts_with("https://") {
                return Err("sm.callback_uri: must be https://".into());
            }
        }
        Ok(())
    }
}

/// The VIM of Sc-Vi (IFA 033 clause 8): an OpenStack cloud reached through Keystone v3.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VimConfig {
    /// Keystone v3 URL, e.g. `https://keystone.example.net:5000/v3`. `http://` only to a
    /// loopback address (a development cloud): Security.005 asks for confidentiality.
    pub auth_url: String,
    /// Region of the catalog endpoints; any region when absent.
    #[serde(default)]
    pub region: Option<String>,
    /// Catalog interface: "public", "internal" or "admin".
    #[serde(default = "default_vim_interface")]
    pub interface: String,
    /// PEM roots for the VIM's server certificates (Keystone and every catalog endpoint).
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Keystone application credential (preferred: scoped, revocable, role-limited).
    #[serde(default)]
    pub application_credential: Option<VimAppCredential>,
    /// Keystone password authentication (a user scoped to a project).
    #[serde(default)]
    pub password: Option<VimPassword>,
    /// The SM's own TLS client identity on Sc-Vi, a key of its own in the HSM/TPM
    /// (IFA 033 Security.001: independent from the Sc-Or interfaces' keys).
    #[serde(default)]
    pub client: Option<InterfaceKeyConfig>,
    /// Per-request timeout, seconds.
    #[serde(default = "default_vim_timeout")]
    pub timeout_seconds: u64,
    /// Largest response body accepted from any OpenStack service.
    #[serde(default = "default_vim_max_response")]
    pub max_response_bytes: usize,
    /// Page size of OpenStack list requests (`limit`); lists are always read whole.
    #[serde(default = "default_vim_page_size")]
    pub page_size: usize,
    /// Renew the token this long before Keystone's `expires_at`.
    #[serde(default = "default_vim_renew_before")]
    pub renew_before_seconds: u64,
    /// Physical location of hypervisor hosts not given by aggregate metadata
    /// (`location` key): host name -> free text (site, room, rack).
    #[serde(default)]
    pub host_locations: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VimAppCredential {
    pub id: String,
    pub secret: SecretSource,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VimPassword {
    pub user: String,
    #[serde(default = "default_vim_domain")]
    pub user_domain: String,
    pub project: String,
    #[serde(default = "default_vim_domain")]
    pub project_domain: String,
    pub secret: SecretSource,
}

fn default_vim_interface() -> String {
    "public".into()
}
fn default_vim_timeout() -> u64 {
    30
}
fn default_vim_max_response() -> usize {
    32 * 1024 * 1024
}
fn default_vim_page_size() -> usize {
    500
}
fn default_vim_renew_before() -> u64 {
    300
}
fn default_vim_domain() -> String {
    "Default".into()
}

impl VimConfig {
    fn check(&self) -> Result<(), String> {
        match (&self.application_credential, &self.password) {
            (None, None) => {
                return Err("sm.vim: one of application_credential or password is required".into())
            }
            (Some(_), Some(_)) => {
                return Err("sm.vim: application_credential and password exclude each other".into())
            }
            _ => {}
        }
        if !matches!(self.interface.as_str(), "public" | "internal" | "admin") {
            return Err(format!(
                "sm.vim.interface: '{}' is not public, internal or admin",
                self.interface
            ));
        }
        if self.page_size == 0 || self.page_size > 10_000 {
            return Err("sm.vim.page_size: 1 to 10000".into());
        }
        if self.max_response_bytes < 64 * 1024 {
            return Err("sm.vim.max_response_bytes: at least 65536".into());
        }
        crate::vim::client::check_url("sm.vim.auth_url", &self.auth_url)
    }
}

#[cfg(test)]
mod vim_tests {
    use super::*;

    #[test]
    fn reference_vim_section_shows_the_defaults() {
        let config = Config::parse(include_str!("../systemd/warden.toml")).expect("parses");
        let vim = config
            .sm
            .as_ref()
            .and_then(|sm| sm.vim.as_ref())
            .expect("sm.vim");
        assert_eq!(vim.interface, default_vim_interface());
        assert_eq!(vim.timeout_seconds, default_vim_timeout());
        assert_eq!(vim.max_response_bytes, default_vim_max_response());
        assert_eq!(vim.page_size, default_vim_page_size());
        assert_eq!(vim.renew_before_seconds, default_vim_renew_before());
        assert!(vim.application_credential.is_some() && vim.password.is_none());
    }
}
