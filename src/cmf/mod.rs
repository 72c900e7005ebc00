//! Certificate Management Function (IFA 033 clause 11), delegation mode.
//!
//! ETSI's REST binding for Cm-Vnfm certificate management (SOL 023) is not available to us,
//! so the resources are the project's own, with SOL 013 conventions, all defined in
//! [`api`](crate::api::cmf) and the types here, so they can follow SOL 023 later:
//!
//! - Register (11.2.2): `POST /certmgmt/v1/registrations`;
//! - Certificate Signing Request (11.2.3): `POST /certmgmt/v1/certificate_signing_requests`.
//!
//! Flow of a CSR: consumer identity (mTLS) -> strict PKCS#10 decode and proof of possession
//! ([`csr`]) -> the consumer's registration (store) -> key attestation against the registered
//! attester ([`attest`]) -> key policy -> issuance through the key layer ([`issue`]) -> the
//! durable record (group commit) -> response. Nothing is acknowledged before it is durable.

pub mod crl;
pub mod csr;
pub mod direct;
pub mod issue;
pub mod names;
pub mod ocsp;
pub mod records;
pub mod register;
pub mod revoke;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::{CmfConfig, Config, ProfileConfig, UnattestedPolicy};
use crate::keys::backends::Backends;
use crate::keys::KeyError;
use crate::store::{GroupCommit, Store, StoreError, Table};

pub use issue::IssuingCa;

/// IFA 033 11.2.2.2 certType.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CertType {
    ManoCert,
    VnfciCert,
    VnfOamCert,
    /// Not IFA 033 certTypes: certificates the agent makes for itself and records beside
    /// the others (issue 10 §4): its CA's self-signed root (`warden ca init`), its TLS
    /// identity (`warden tls init`) and the SM's interface certificates (`warden sm init`).
    /// [`CertType::parse`] never returns them, so no registration or CSR can name them.
    AgentCa,
    AgentTls,
    SmInterface,
}

impl CertType {
    pub fn as_str(self) -> &'static str {
        match self {
            CertType::ManoCert => "MANO_CERT",
            CertType::VnfciCert => "VNFCI_CERT",
            CertType::VnfOamCert => "VNF_OAM_CERT",
            CertType::AgentCa => "AGENT_CA",
            CertType::AgentTls => "AGENT_TLS",
            CertType::SmInterface => "SM_INTERFACE",
        }
    }

    /// One of the IFA 033 certTypes (11.2.2.2) by name; never an agent type.
    pub fn parse(text: &str) -> Option<CertType> {
        [
            CertType::ManoCert,
            CertType::VnfciCert,
            CertType::VnfOamCert,
        ]
        .into_iter()
        .find(|t| t.as_str() == text)
    }
}

impl fmt::Display for CertType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// IFA 033 11.2.2.2 typeOfVnfcCertHandling.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum VnfcCertHandling {
    DirectMode,
    DelegationMode,
}

/// The calling consumer, resolved from its TLS client certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Consumer {
    pub id: String,
    pub trust_domain: String,
}

/// A stored registration (IFA 033 11.2.2): the consumer is recorded as the manager of these
/// subjects; no other consumer can read, change or use it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Registration {
    pub id: String,
    pub consumer: String,
    pub trust_domain: String,
    pub cert_type: CertType,
    pub subject_ids: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub type_of_vnfc_cert_handling: Option<VnfcCertHandling>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_attestation: Option<RegisteredAttester>,
    /// The CA chosen for this registration (11.2.2.4).
    pub ca_id: String,
    pub created: String,
    /// The VNF instance the registered subjects belong to, when known: its certificates are
    /// revoked when the VNF is terminated (SM erasure) or removed (direct mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vnf_instance_id: Option<String>,
}

/// The attester registered with a subject: its public key and statement format.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegisteredAttester {
    /// SubjectPublicKeyInfo, base64 DER.
    pub attester_public_key: String,
    pub format_oid: String,
    /// Base64.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected_qualifying_data: Option<String>,
    /// How the attester key is tied to a TPM PKI; absent: not anchored (issue 10 §2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anchor: Option<attest::anchor::AttesterAnchor>,
}

/// The record of an issued certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IssuedRecord {
    pub serial_number: String,
    pub ca_id: String,
    pub consumer: String,
    pub registration_id: String,
    pub cert_type: CertType,
    pub subjects: Vec<String>,
    /// SHA-256 of the SubjectPublicKeyInfo DER, hex.
    pub spki_sha256: String,
    /// "verified-anchored" (the attester is anchored in a TPM PKI), "verified-unanchored"
    /// (verified with a registered attester key nobody vouches for), "not-requested", or
    /// "unattested: <reason>" (local policy issued anyway). Records before issue 10 say
    /// "verified" for what is now "verified-unanchored".
    pub attestation: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attestation_format: Option<String>,
    pub not_before: String,
    pub not_after: String,
    pub issued_at: String,
    /// The certificate as issued, base64 DER: what `warden certs show|export` read (SANs,
    /// subject, PEM). Absent in records written before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    /// Set when the certificate is revoked ([`revoke`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revocation: Option<Revocation>,
    /// The VNF instance the certificate is for (from its registration), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vnf_instance_id: Option<String>,
}

/// A revocation of an issued certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Revocation {
    /// RFC 3339 UTC.
    pub revoked_at: String,
    /// RFC 5280 5.3.1 CRLReason, by name (e.g. "keyCompromise").
    pub reason: String,
}

/// Registrations by id.
pub const REGISTRATIONS: Table<Registration> = Table::new("cmf_registrations");
/// Subject index: one key per name whatever the certType (`dns:<name>`, `ip:<address>`,
/// `vnfc:<id>`, see [`names`]) -> registration id. One manager per name.
pub const SUBJECTS: Table<String> = Table::new("cmf_subjects");
/// Issued certificates: `{caId}/{serial hex}`; `insert_new` keeps serials unique per issuer.
pub const CERTIFICATES: Table<IssuedRecord> = Table::new("cmf_certificates");

/// Why a CMF request failed; each maps to one HTTP status and a ProblemDetails.
#[derive(Debug, thiserror::Error)]
pub enum CmfError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    /// SOL 013 9.2: the requested API version is not served.
    #[error("{0}")]
    NotAcceptable(String),
    #[error("request body larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// Well-formed but refused: attestation, policy, registration.
    #[error("{0}")]
    Unprocessable(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl CmfError {
    pub fn status(&self) -> u16 {
        match self {
            CmfError::BadRequest(_) => 400,
            CmfError::Unauthenticated(_) => 401,
            CmfError::Forbidden(_) => 403,
            CmfError::NotFound(_) => 404,
            CmfError::MethodNotAllowed(_) => 405,
            CmfError::NotAcceptable(_) => 406,
            CmfError::Conflict(_) => 409,
            CmfError::PayloadTooLarge(_) => 413,
            CmfError::UnsupportedMediaType(_) => 415,
            CmfError::Unprocessable(_) => 422,
            CmfError::Unavailable(_) => 503,
            CmfError::Internal(_) => 500,
        }
    }

    pub fn title(&self) -> &'static str {
        match self {
            CmfError::BadRequest(_) => "Bad Request",
            CmfError::Unauthenticated(_) => "Unauthorized",
            CmfError::Forbidden(_) => "Forbidden",
            CmfError::NotFound(_) => "Not Found",
            CmfError::MethodNotAllowed(_) => "Method Not Allowed",
            CmfError::NotAcceptable(_) => "Not Acceptable",
            CmfError::Conflict(_) => "Conflict",
            CmfError::PayloadTooLarge(_) => "Payload Too Large",
            CmfError::UnsupportedMediaType(_) => "Unsupported Media Type",
            CmfError::Unprocessable(_) => "Unprocessable Entity",
            CmfError::Unavailable(_) => "Service Unavailable",
            CmfError::Internal(_) => "Internal Server Error",
        }
    }
}

impl From<KeyError> for CmfError {
    fn from(e: KeyError) -> Self {
        // The CA's own key not found is no fault of the client either: the CA cannot sign
        // until the operator brings the key (or its token) back, so 503 names it.
        if e.is_transient() || matches!(e, KeyError::NotFound(_)) {
            if crate::log_limit::allow("cmf.key_unavailable") {
                tracing::warn!(error = %e, "the CA key is unavailable");
            }
            CmfError::Unavailable(format!("the CA key is unavailable: {e}"))
        } else {
            if crate::log_limit::allow("cmf.key") {
                tracing::error!(error = %e, "key layer error");
            }
            CmfError::Internal(format!("key layer: {e}"))
        }
    }
}

impl From<StoreError> for CmfError {
    fn from(e: StoreError) -> Self {
        // The whole chain, so the log line and the 503 name the cause (ENOSPC, EROFS...).
        let chain = crate::error::chain(&e);
        if e.is_transient() {
            if crate::log_limit::allow("cmf.store") {
                tracing::error!(error = %chain, "store error (transient)");
            }
            CmfError::Unavailable(format!("store: {chain}"))
        } else {
            // A corrupt record or a schema problem: retrying cannot help, so 500 (not 503 +
            // Retry-After, which clients would follow for ever); the operator must act.
            if crate::log_limit::allow("cmf.store_permanent") {
                tracing::error!(error = %chain, "store error (permanent: the stored data cannot be used)");
            }
            CmfError::Internal(format!(
                "the stored data cannot be used (permanent, retrying will not help): {chain}"
            ))
        }
    }
}

/// The CMF service: configuration resolved once, the CAs, the store.
pub struct Cmf {
    consumers: HashMap<String, String>,
    /// Trust-domain name policy per consumer, and the reserved names (issue 10).
    pub(crate) policies: names::Policies,
    /// Also certify VNFC identifiers as URI SANs (`[cmf] vnfc_id_uri`).
    pub(crate) vnfc_id_uri: bool,
    cas: Arc<[IssuingCa]>,
    profiles: HashMap<CertType, ProfileConfig>,
    pub(crate) max_body_bytes: usize,
    pub(crate) unattested: UnattestedPolicy,
    pub(crate) formats: Arc<attest::Formats>,
    pub(crate) attestation: Arc<attest::service::AttestationPolicy>,
    pub(crate) store: Arc<Store>,
    pub(crate) group: GroupCommit,
    /// CAs whose CRL must be made again (a revocation), for the CRL task ([`crl`]).
    pub(crate) crl_signal: Arc<revoke::CrlSignal>,
    /// Where revocation is published, and the CRLs ([`crl`]).
    pub(crate) crls: crl::Crls,
}

pub mod attest;

impl Cmf {
    /// Resolve the CMF configuration: consumers, CAs (keys in the HSM/TPM, certificates and
    /// chains checked against them), profiles, attestation formats.
    pub fn new(config: &Config, backends: &Backends, store: Arc<Store>) -> Result<Cmf, String> {
        let cmf: &CmfConfig = config
            .cmf
            .as_ref()
            .ok_or_else(|| "config: no [cmf] section".to_string())?;
        let mut consumers = HashMap::new();
        for consumer in &cmf.consumers {
            if consumer.id.starts_with("agent:") {
                return Err(format!(
                    "cmf.consumer '{}': ids starting with 'agent:' are reserved for the \
                     certificates the agent makes for itself",
                    consumer.id
                ));
            }
            if consumers
                .insert(consumer.id.clone(), consumer.trust_domain.clone())
                .is_some()
            {
                return Err(format!("cmf.consumer: '{}' listed twice", consumer.id));
            }
        }
        let mut cas = Vec::new();
        if cmf.cas.is_empty() {
            let ca = config
                .ca
                .as_ref()
                .ok_or_else(|| "config: [cmf] without cmf.ca entries needs [ca]".to_string())?;
            cas.push(IssuingCa::load(
                "default",
                &ca.key,
                &ca.certificate,
                ca.chain.as_deref(),
                vec![
                    CertType::ManoCert,
                    CertType::VnfciCert,
                    CertType::VnfOamCert,
                ],
                backends,
            )?);
        } else {
            for ca in &cmf.cas {
                let types = ca
                    .cert_types
                    .iter()
                    .map(|t| {
                        CertType::parse(t)
                            .ok_or_else(|| format!("cmf.ca '{}'.cert_types: unknown '{t}'", ca.id))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                cas.push(IssuingCa::load(
                    &ca.id,
                    &ca.key,
                    &ca.certificate,
                    ca.chain.as_deref(),
                    types,
                    backends,
                )?);
            }
        }
        let mut profiles = HashMap::new();
        for (name, profile) in &cmf.profile {
            let cert_type = CertType::parse(name)
                .ok_or_else(|| format!("cmf.profile.{name}: unknown certType"))?;
            issue::check_profile(profile).map_err(|e| format!("cmf.profile.{name}: {e}"))?;
            profiles.insert(cert_type, profile.clone());
        }
        let mut formats = attest::Formats::default();
        for (oid, kind) in &cmf.attestation_formats {
            let format: attest::FormatOid = oid
                .parse()
                .map_err(|e| format!("cmf.attestation_formats.\"{oid}\": {e}"))?;
            let kind = match kind.as_str() {
                "tpm2-certify" => attest::VerifierKind::Tpm2Certify,
                "x509-key-certificate" => attest::VerifierKind::X509KeyCertificate,
                other => {
                    return Err(format!(
                        "cmf.attestation_formats.\"{oid}\": '{other}' (expected tpm2-certify \
                         or x509-key-certificate)"
                    ))
                }
            };
            formats = formats.with_alias(format, kind);
        }
        let policies = names::Policies::from_config(config)?;
        // A store written before one namespace of names gets its subject index rewritten
        // before the CMF answers anything (see names::upgrade_index).
        let upgrade = names::upgrade_index(&store, "warden").map_err(|e| {
            format!(
                "cmf: upgrading the subject index: {}",
                crate::error::chain(&e)
            )
        })?;
        if upgrade.migrated > 0 {
            tracing::info!(
                migrated = upgrade.migrated,
                conflicts = upgrade.conflicts.len(),
                "subject index rewritten to one namespace of names"
            );
        }
        // A store written before the certificate indexes gets them before the CMF answers.
        let indexed = records::ensure_index(&store, "warden").map_err(|e| {
            format!(
                "cmf: building the certificate indexes: {}",
                crate::error::chain(&e)
            )
        })?;
        if indexed > 0 {
            tracing::info!(indexed, "certificate indexes built");
        }
        let group = store
            .group_commit(cmf.group_commit_max)
            .map_err(|e| format!("store group commit: {e}"))?;
        Ok(Cmf {
            consumers,
            policies,
            vnfc_id_uri: cmf.vnfc_id_uri,
            cas: cas.into(),
            profiles,
            max_body_bytes: cmf.max_body_bytes,
            unattested: cmf.unattested,
            formats: Arc::new(formats),
            attestation: Arc::new(attest::service::AttestationPolicy::from_config(
                &cmf.attestation,
            )?),
            store,
            group,
            crl_signal: Arc::new(revoke::CrlSignal::default()),
            crls: crl::Crls::new(cmf.revocation.clone()),
        })
        .and_then(|cmf| {
            cmf.load_crls()
                .map_err(|e| format!("loading the stored CRLs: {e}"))?;
            Ok(cmf)
        })
    }

    /// The consumer behind a TLS client identity: none is 401, an unknown one 403.
    pub fn consumer(&self, identity: Option<&str>) -> Result<Consumer, CmfError> {
        let id = identity.ok_or_else(|| {
            CmfError::Unauthenticated(
                "a TLS client certificate is required for the certificate management API".into(),
            )
        })?;
        let trust_domain = self.consumers.get(id).ok_or_else(|| {
            CmfError::Forbidden(format!("'{id}' is not a configured consumer of this CMF"))
        })?;
        Ok(Consumer {
            id: id.to_string(),
            trust_domain: trust_domain.clone(),
        })
    }

    pub fn max_body_bytes(&self) -> usize {
        self.max_body_bytes
    }

    /// The trust-domain name policy (issue 10).
    pub fn policies(&self) -> &names::Policies {
        &self.policies
    }

    pub fn cas(&self) -> &[IssuingCa] {
        &self.cas
    }

    fn ca(&self, id: &str) -> Option<&IssuingCa> {
        self.cas.iter().find(|ca| ca.id == id)
    }

    fn profile(&self, cert_type: CertType) -> ProfileConfig {
        self.profiles.get(&cert_type).cloned().unwrap_or_default()
    }
}

/// Random identifier for registrations: 128 bits, hex.
pub(crate) fn new_id() -> Result<String, CmfError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| CmfError::Internal(format!("random id: {e}")))?;
    Ok(hex::encode(bytes))
}
