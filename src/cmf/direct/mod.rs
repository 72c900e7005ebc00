//! CMF direct mode (IFA 033 9.1, 10.3.2, 11.3): the VNFM produces VNF Lifecycle Management
//! on Cm-Vnfm (IFA 007 7.2: Subscribe 7.2.14, Notify 7.2.15, Query VNF 7.2.9; REST binding
//! SOL 003 `vnflcm/v2`) and the CMF consumes it. The VNFC instances enroll themselves over
//! EST; the CMF decides from the VNF lifecycle what exists and what must be revoked.
//!
//! - [`vnfm`]: the client of each VNFM (Keystone or OAuth 2.0, paging, Query VNF).
//! - Subscriptions: one per VNFM, reconciled at start and every `reconcile_seconds` (keep
//!   ours, delete stale ones with our callback URI, create one if missing).
//! - Notifications (`src/api/direct.rs`): authenticated as the subscription asked, journaled
//!   durably before the 204, de-duplicated by id, processed by the worker here.
//! - Inventory: after every final occurrence (COMPLETED, FAILED_TEMP, ROLLED_BACK) and at
//!   every reconciliation, Query VNF gives the VNFCs (`vnfcResourceInfo`) of each VNF.
//! - Enrollment binding: a VNFC that appears gets a single-use, expiring credential bound to
//!   (VNF instance, VNFC, server); only its hash is kept; the plaintext goes to that VNFC's
//!   `vnfcConfigurableProperties` through the VNFM (ModifyVnfInfo, SOL 003 5.4.3.3.4).
//! - Removal: evidence (a COMPLETED occurrence's REMOVED, VnfIdentifierDeletion, Query VNF
//!   without the VNFC while the VNF is readable, 404 on the VNF) journals an intent in the
//!   same transaction as the inventory; the worker revokes the VNFC's certificates and
//!   closes the intent with one audit entry: exactly once across a crash.

pub mod vnfm;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::Digest;

use crate::config::{Config, DirectConfig, DirectVnfmConfig, NotificationAuth};
use crate::keys::backends::Backends;
use crate::sm::intake::Intake;
use crate::store::{AuditEvent, Store, StoreError, Table};

use super::{CertType, Cmf, CmfError, Registration, REGISTRATIONS, SUBJECTS};
use vnfm::{Vnfm, VnfmError};

/// The three notification types the CMF subscribes to (SOL 003 5.5.2.17-19).
pub const NOTIFICATION_TYPES: [&str; 3] = [
    "VnfLcmOperationOccurrenceNotification",
    "VnfIdentifierCreationNotification",
    "VnfIdentifierDeletionNotification",
];

/// The key of the enrollment credential in `vnfcConfigurableProperties`.
pub const CREDENTIAL_PROPERTY: &str = "wardenEstEnrollment";

/// Journaled notifications, `{vnfm}/{id}`: de-duplication and the record of what came.
pub const NOTIFICATIONS: Table<NotificationRecord> = Table::new("cmf_direct_notifications");
/// Notifications not yet processed: arrival key -> `{vnfm}/{id}`.
pub const PENDING: Table<String> = Table::new("cmf_direct_pending");
/// VNF instances followed, by id.
pub const VNFS: Table<VnfRecord> = Table::new("cmf_direct_vnfs");
/// VNFC instances, `{vnfInstanceId}/{vnfcId}` (vnfcId = vnfcResourceInfo id).
pub const VNFCS: Table<VnfcRecord> = Table::new("cmf_direct_vnfcs");
/// Removal intents not yet carried out, same keys as [`VNFCS`].
pub const REMOVALS: Table<RemovalIntent> = Table::new("cmf_direct_removals");

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NotificationRecord {
    pub vnfm: String,
    pub id: String,
    pub notification_type: String,
    pub received: String,
    pub body: Value,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VnfRecord {
    pub vnfm: String,
    pub vnf_instance_id: String,
    pub vnfd_id: String,
    #[serde(default)]
    pub vnf_product_name: Option<String>,
    /// INSTANTIATED, NOT_INSTANTIATED, or DELETED (404 / VnfIdentifierDeletion).
    pub instantiation_state: String,
    pub updated: String,
    /// The last Query VNF (or list entry) this record was made from.
    #[serde(default)]
    pub vnf_instance: Value,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VnfcRecord {
    pub vnfm: String,
    pub trust_domain: String,
    pub vnf_instance_id: String,
    /// vnfcResourceInfo id.
    pub vnfc_id: String,
    pub vdu_id: String,
    /// vnfcInfo id (the handle of ModifyVnfInfo), if the VNFM reports one.
    #[serde(default)]
    pub vnfc_info_id: Option<String>,
    #[serde(default)]
    pub vim_connection_id: Option<String>,
    /// computeResource.resourceId (the Nova server id on OpenStack).
    pub server_id: String,
    /// IP addresses of its connection points, where the VNFM reports them.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// "alive", "removing" (intent journaled) or "removed".
    pub state: String,
    pub added_at: String,
    #[serde(default)]
    pub credential: Option<Credential>,
    /// The registration the CMF made for it at its first enrollment.
    #[serde(default)]
    pub registration_id: Option<String>,
    #[serde(default)]
    pub report: Option<RemovalReport>,
}

/// A single-use enrollment credential: only its hash is stored.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Credential {
    pub sha256: String,
    pub expires_unix: u64,
    /// Written into the VNFC's configurable properties by the VNFM (ModifyVnfInfo 202).
    pub delivered: bool,
    #[serde(default)]
    pub used_at: Option<String>,
    /// Bound to this server: a healed VNFC (new server) is a new identity.
    pub server_id: String,
    /// The plaintext until delivered (never after): lets a restart deliver what it minted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub undelivered_secret: Option<String>,
    /// Journaled with its use (same transaction): the plaintext must be removed from the
    /// VNFC's configurable properties at the VNFM. Cleared only once a Query VNF shows it
    /// gone, so a crash or a failed ModifyVnfInfo is adopted by the next tick.
    #[serde(default)]
    pub scrub_pending: bool,
    /// When a Query VNF first showed the used credential gone from the VNFM.
    #[serde(default)]
    pub scrubbed_at: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RemovalIntent {
    pub evidence: String,
    pub journaled_at: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RemovalReport {
    pub evidence: String,
    pub journaled_at: String,
    pub completed_at: String,
    /// `caId/serial` of every certificate revoked for it (cessationOfOperation).
    pub revoked: Vec<String>,
    /// What the key layer erased: the agent holds no key of a direct-mode VNFC (the VNFC
    /// makes its own key and sends a CSR), so this says so.
    pub keys: String,
}

/// The URI SAN of a VNFC (RFC 5280 4.2.1.6; RFC 8141 URN syntax).
pub fn vnfc_urn(vnf_instance_id: &str, vnfc_id: &str) -> String {
    format!("urn:etsi:nfv:vnf:{vnf_instance_id}:vnfc:{vnfc_id}")
}

/// The URI SAN naming the VDU the VNFC instantiates.
pub fn vdu_urn(vnf_instance_id: &str, vdu_id: &str) -> String {
    format!("urn:etsi:nfv:vnf:{vnf_instance_id}:vdu:{vdu_id}")
}

#[derive(Debug, thiserror::Error)]
pub enum DirectError {
    #[error(transparent)]
    Vnfm(#[from] VnfmError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Invalid(String),
}

struct Followed {
    config: DirectVnfmConfig,
    client: Vnfm,
    intake: Intake,
    callback_uri: String,
    est_url: String,
    ca_id: String,
    /// The VNFC identifiers its trust domain permits (shell-style, lower case).
    vnfc_id_patterns: Vec<String>,
}

/// Direct mode: the VNFMs, the worker, the EST binding.
pub struct Direct {
    config: DirectConfig,
    vnfms: Vec<Followed>,
    cmf: Arc<Cmf>,
    store: Arc<Store>,
    wake: tokio::sync::Notify,
    /// Serialises processing (worker, reconciliation): one writer of the inventory.
    busy: tokio::sync::Mutex<()>,
}

fn now() -> String {
    crate::keys::rfc3339_now()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Direct {
    pub fn new(
        config: &Config,
        backends: &Backends,
        cmf: Arc<Cmf>,
        listen: std::net::SocketAddr,
    ) -> Result<Option<Arc<Direct>>, String> {
        let Some(direct) = config.cmf.as_ref().and_then(|c| c.direct.clone()) else {
            return Ok(None);
        };
        let mut vnfms = Vec::new();
        for v in &direct.vnfms {
            if v.id.is_empty()
                || !v
                    .id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(format!(
                    "cmf.direct.vnfm '{}': id must be letters, digits, '-' or '_'",
                    v.id
                ));
            }
            if vnfms.iter().any(|f: &Followed| f.config.id == v.id) {
                return Err(format!("cmf.direct.vnfm '{}' listed twice", v.id));
            }
            if v.vnfd_ids.is_empty()
                && v.vnf_product_names.is_empty()
                && v.vnf_instance_ids.is_empty()
            {
                return Err(format!(
                    "cmf.direct.vnfm '{}': name the VNFs in direct mode (vnfd_ids, \
                     vnf_product_names or vnf_instance_ids)",
                    v.id
                ));
            }
            if v.notification_auth == NotificationAuth::TlsCert {
                return Err(format!(
                    "cmf.direct.vnfm '{}': notification_auth TLS_CERT is not offered by \
                     VNFMs such as Tacker; use BASIC or OAUTH2_CLIENT_CREDENTIALS",
                    v.id
                ));
            }
            // The VNFM's trust domain (issue 10's `[[cmf.trust_domain]]`) rules its VNFCs as
            // it rules a delegation-mode consumer: the certType, the CAs and the VNFC
            // identifiers it permits (no domain permits every name).
            let domain = config
                .cmf
                .as_ref()
                .and_then(|c| c.trust_domains.iter().find(|d| d.id == v.trust_domain))
                .ok_or_else(|| {
                    format!(
                        "cmf.direct.vnfm '{}': trust_domain '{}' is not defined \
                         ([[cmf.trust_domain]])",
                        v.id, v.trust_domain
                    )
                })?;
            if !domain.cert_types.iter().any(|t| t == "VNFCI_CERT") {
                return Err(format!(
                    "cmf.direct.vnfm '{}': trust domain '{}' does not permit VNFCI_CERT \
                     (cert_types = {:?})",
                    v.id, domain.id, domain.cert_types
                ));
            }
            let issues = |id: &str| {
                cmf.cas()
                    .iter()
                    .any(|c| c.id == id && c.cert_types.contains(&CertType::VnfciCert))
            };
            let ca_id = match &v.issuing_ca {
                Some(id) => {
                    if !cmf.cas().iter().any(|c| &c.id == id) {
                        return Err(format!(
                            "cmf.direct.vnfm '{}': ca '{id}' is not a CMF CA",
                            v.id
                        ));
                    }
                    if !issues(id) {
                        return Err(format!(
                            "cmf.direct.vnfm '{}': ca '{id}' does not issue VNFCI_CERT",
                            v.id
                        ));
                    }
                    if !domain.cas.contains(id) {
                        return Err(format!(
                            "cmf.direct.vnfm '{}': ca '{id}' is not a CA of trust domain '{}' \
                             (cas = {:?})",
                            v.id, domain.id, domain.cas
                        ));
                    }
                    id.clone()
                }
                None => domain
                    .cas
                    .iter()
                    .find(|id| issues(id))
                    .cloned()
                    .ok_or_else(|| {
                        format!(
                            "cmf.direct.vnfm '{}': no CA of trust domain '{}' ({:?}) issues \
                             VNFCI_CERT",
                            v.id, domain.id, domain.cas
                        )
                    })?,
            };
            let vnfc_id_patterns: Vec<String> = domain
                .vnfc_id_patterns
                .iter()
                .map(|p| p.to_ascii_lowercase())
                .collect();
            let client = Vnfm::new(v, backends).map_err(|e| e.to_string())?;
            let secret = v.notification_secret.read()?;
            let intake = Intake::from_parts(
                v.notification_auth,
                &v.id,
                Some(secret),
                3600,
                direct.max_body_bytes,
            );
            let host = if listen.ip().is_unspecified() {
                "127.0.0.1".to_string()
            } else {
                listen.ip().to_string()
            };
            let callback_uri = v.callback_uri.clone().unwrap_or_else(|| {
                format!(
                    "https://{host}:{}/cmf/v1/direct/notifications/{}",
                    listen.port(),
                    v.id
                )
            });
            let est_url = v.est_url.clone().unwrap_or_else(|| {
                format!(
                    "https://{host}:{}/.well-known/est/direct/{}",
                    listen.port(),
                    v.id
                )
            });
            vnfms.push(Followed {
                config: v.clone(),
                client,
                intake,
                callback_uri,
                est_url,
                ca_id,
                vnfc_id_patterns,
            });
        }
        let store = cmf.store.clone();
        Ok(Some(Arc::new(Direct {
            config: direct,
            vnfms,
            cmf,
            store,
            wake: tokio::sync::Notify::new(),
            busy: tokio::sync::Mutex::new(()),
        })))
    }

    fn vnfm(&self, id: &str) -> Option<&Followed> {
        self.vnfms.iter().find(|f| f.config.id == id)
    }

    /// The notification intake (authentication) of a VNFM, if it is configured.
    pub fn intake(&self, vnfm: &str) -> Option<&Intake> {
        self.vnfm(vnfm).map(|f| &f.intake)
    }

    pub fn max_body_bytes(&self) -> usize {
        self.config.max_body_bytes
    }

    /// Start the worker and the reconciliation loop (after the callback endpoint serves).
    pub fn start(self: &Arc<Self>) {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let mut next_reconcile = tokio::time::Instant::now();
            loop {
                if tokio::time::Instant::now() >= next_reconcile {
                    if let Err(e) = this.reconcile().await {
                        tracing::warn!(error = %e, "direct mode: reconciliation failed; retried");
                        next_reconcile = tokio::time::Instant::now() + Duration::from_secs(10);
                    } else {
                        next_reconcile = tokio::time::Instant::now()
                            + Duration::from_secs(this.config.reconcile_seconds.max(5));
                    }
                }
                if let Err(e) = this.work().await {
                    tracing::warn!(error = %e, "direct mode: processing failed; retried");
                }
                // Woken by a new notification; otherwise a short tick retries deliveries
                // and removals that failed for a transient reason.
                let _ = tokio::time::timeout(Duration::from_secs(2), this.wake.notified()).await;
            }
        });
    }

    /// Journal an authenticated notification durably (before the 204). `Ok(false)` for a
    /// duplicate id (acknowledged, not processed again).
    pub async fn journal(&self, vnfm: &str, body: Value) -> Result<bool, StoreError> {
        let id = body["id"].as_str().unwrap_or_default().to_string();
        let record = NotificationRecord {
            vnfm: vnfm.to_string(),
            id: id.clone(),
            notification_type: body["notificationType"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            received: now(),
            body,
        };
        let key = format!("{vnfm}/{id}");
        let pending = crate::sm::intake::pending_key(&key);
        let fresh = self
            .cmf
            .group
            .write_async(move |tx| {
                if tx.contains(&NOTIFICATIONS, &key)? {
                    return Ok(false);
                }
                tx.put(&NOTIFICATIONS, &key, &record)?;
                tx.put(&PENDING, &pending, &key)?;
                Ok(true)
            })
            .await?;
        if fresh {
            self.wake.notify_one();
        }
        Ok(fresh)
    }

    /// Process journaled notifications, deliver credentials, carry out removals.
    pub async fn work(&self) -> Result<(), DirectError> {
        let _busy = self.busy.lock().await;
        let pending = self.store.read(|tx| tx.list(&PENDING, ""))?;
        let mut kept = None;
        for (key, notification) in pending {
            let record = self
                .store
                .read(|tx| tx.get(&NOTIFICATIONS, &notification))?;
            if let Some(record) = record {
                match self.process(&record).await {
                    Ok(()) => {}
                    // The VNFM unreachable: keep it (and those after it, in order) pending
                    // for the next tick; removals already journaled still go ahead below.
                    Err(DirectError::Vnfm(e)) => {
                        tracing::warn!(error = %e, notification = %notification, "direct mode: notification kept for retry");
                        kept = Some(DirectError::Vnfm(e));
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            let key2 = key.clone();
            self.store.write(move |tx| {
                tx.delete(&PENDING, &key2)?;
                Ok(())
            })?;
        }
        self.carry_out_removals().await?;
        if let Some(e) = kept {
            return Err(e);
        }
        self.deliver_credentials().await?;
        self.scrub_credentials().await?;
        Ok(())
    }

    async fn process(&self, record: &NotificationRecord) -> Result<(), DirectError> {
        let Some(vnfm) = self.vnfm(&record.vnfm) else {
            return Ok(());
        };
        let body = &record.body;
        let vnf_id = body["vnfInstanceId"].as_str().unwrap_or_default();
        match record.notification_type.as_str() {
            "VnfLcmOperationOccurrenceNotification" => {
                let state = body["operationState"].as_str().unwrap_or_default();
                if !matches!(state, "COMPLETED" | "FAILED_TEMP" | "ROLLED_BACK") {
                    return Ok(());
                }
                // Only a COMPLETED occurrence is evidence that a VNFC is gone.
                let removed: Vec<(String, String)> = if state == "COMPLETED" {
                    body["affectedVnfcs"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|v| v["changeType"] == "REMOVED")
                        .filter_map(|v| v["id"].as_str().map(String::from))
                        .map(|id| {
                            (
                                id,
                                format!(
                                    "{} {} COMPLETED (vnfLcmOpOccId {}): affectedVnfcs REMOVED",
                                    body["operation"].as_str().unwrap_or("?"),
                                    vnf_id,
                                    body["vnfLcmOpOccId"].as_str().unwrap_or("?")
                                ),
                            )
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                self.sync_vnf(vnfm, vnf_id, removed).await
            }
            "VnfIdentifierCreationNotification" => self.sync_vnf(vnfm, vnf_id, Vec::new()).await,
            "VnfIdentifierDeletionNotification" => {
                // The VNFM says the identifier is gone; confirm with a direct read when the
                // VNFM answers (404), else the notification itself is the evidence.
                self.sync_vnf(vnfm, vnf_id, Vec::new()).await
            }
            _ => Ok(()),
        }
    }

    fn in_direct_mode(vnfm: &Followed, instance: &Value) -> bool {
        let c = &vnfm.config;
        let str_in = |list: &[String], field: &str| {
            instance[field]
                .as_str()
                .is_some_and(|v| list.iter().any(|x| x == v))
        };
        str_in(&c.vnf_instance_ids, "id")
            || str_in(&c.vnfd_ids, "vnfdId")
            || str_in(&c.vnf_product_names, "vnfProductName")
    }

    /// Query VNF and bring the inventory of one VNF up to date; `removed` are VNFCs a
    /// COMPLETED occurrence reported REMOVED (evidence even if the VNFM is now unreachable).
    async fn sync_vnf(
        &self,
        vnfm: &Followed,
        vnf_id: &str,
        removed: Vec<(String, String)>,
    ) -> Result<(), DirectError> {
        if vnf_id.is_empty() {
            return Ok(());
        }
        // Evidence first, journaled before anything else can fail.
        if !removed.is_empty() {
            self.journal_removals(&vnfm.config.id, vnf_id, removed)
                .await?;
        }
        let queried = vnfm.client.vnf_instance(vnf_id).await?;
        self.apply_query(vnfm, vnf_id, queried).await
    }

    /// Apply a direct read of one VNF instance (None = 404).
    async fn apply_query(
        &self,
        vnfm: &Followed,
        vnf_id: &str,
        queried: Option<Value>,
    ) -> Result<(), DirectError> {
        let known = self.store.read(|tx| tx.get(&VNFS, vnf_id))?;
        // A VNF instance belongs to the VNFM that first reported it: another VNFM (another
        // trust domain, perhaps) reporting the same id affects nothing of it.
        if known.as_ref().is_some_and(|k| k.vnfm != vnfm.config.id) {
            tracing::warn!(vnfm = %vnfm.config.id, vnf = %vnf_id, "direct mode: VNF instance of another VNFM ignored");
            return Ok(());
        }
        let vnf_id = vnf_id.to_string();
        let vnfm_id = vnfm.config.id.clone();
        let trust_domain = vnfm.config.trust_domain.clone();
        match queried {
            None => {
                if known.is_none() {
                    return Ok(());
                }
                let evidence = format!("Query VNF {vnf_id}: 404 (the VNF instance is deleted)");
                let existing = self
                    .store
                    .read(|tx| tx.list(&VNFCS, &format!("{vnf_id}/")))?;
                self.store.write(move |tx| {
                    if let Some(mut vnf) = tx.get(&VNFS, &vnf_id)? {
                        vnf.instantiation_state = "DELETED".into();
                        vnf.updated = now();
                        tx.put(&VNFS, &vnf_id, &vnf)?;
                    }
                    for (key, _) in &existing {
                        if let Some(vnfc) = tx.get(&VNFCS, key)? {
                            if vnfc.state == "alive" {
                                intend_removal(tx, key, vnfc, &evidence)?;
                            }
                        }
                    }
                    Ok(())
                })?;
                Ok(())
            }
            Some(instance) => {
                if !Self::in_direct_mode(vnfm, &instance) {
                    return Ok(());
                }
                let state = instance["instantiationState"]
                    .as_str()
                    .unwrap_or("NOT_INSTANTIATED")
                    .to_string();
                let current = vnfcs_of(&instance);
                let record = VnfRecord {
                    vnfm: vnfm_id.clone(),
                    vnf_instance_id: vnf_id.clone(),
                    vnfd_id: instance["vnfdId"].as_str().unwrap_or_default().to_string(),
                    vnf_product_name: instance["vnfProductName"].as_str().map(String::from),
                    instantiation_state: state.clone(),
                    updated: now(),
                    vnf_instance: instance.clone(),
                };
                let existing = self
                    .store
                    .read(|tx| tx.list(&VNFCS, &format!("{vnf_id}/")))?;
                self.store.write(move |tx| {
                    tx.put(&VNFS, &vnf_id, &record)?;
                    // A direct read without the VNFC while the VNF is readable is evidence.
                    for (key, _) in &existing {
                        let Some(vnfc) = tx.get(&VNFCS, key)? else {
                            continue;
                        };
                        if vnfc.state == "alive"
                            && !current.iter().any(|c| c.vnfc_id == vnfc.vnfc_id)
                        {
                            let evidence = format!(
                                "Query VNF {vnf_id} ({state}): VNFC {} no longer in \
                                 vnfcResourceInfo",
                                vnfc.vnfc_id
                            );
                            intend_removal(tx, key, vnfc, &evidence)?;
                        }
                    }
                    if state != "INSTANTIATED" {
                        return Ok(());
                    }
                    for mut vnfc in current {
                        let key = format!("{vnf_id}/{}", vnfc.vnfc_id);
                        match tx.get(&VNFCS, &key)? {
                            Some(mut old) => {
                                if old.state == "alive" {
                                    old.addresses = vnfc.addresses;
                                    old.vnfc_info_id = vnfc.vnfc_info_id.or(old.vnfc_info_id);
                                    tx.put(&VNFCS, &key, &old)?;
                                }
                            }
                            None => {
                                vnfc.vnfm = vnfm_id.clone();
                                vnfc.trust_domain = trust_domain.clone();
                                tx.audit(
                                    AuditEvent::new(
                                        format!("direct:{vnfm_id}"),
                                        "cmf.direct.vnfc_added",
                                        &key,
                                    )
                                    .with_detail(json!({
                                        "vduId": vnfc.vdu_id, "serverId": vnfc.server_id,
                                    })),
                                );
                                tx.put(&VNFCS, &key, &vnfc)?;
                            }
                        }
                    }
                    Ok(())
                })?;
                Ok(())
            }
        }
    }

    async fn journal_removals(
        &self,
        vnfm: &str,
        vnf_id: &str,
        removed: Vec<(String, String)>,
    ) -> Result<(), StoreError> {
        let vnf_id = vnf_id.to_string();
        let vnfm = vnfm.to_string();
        self.store.write(move |tx| {
            for (vnfc_id, evidence) in &removed {
                let key = format!("{vnf_id}/{vnfc_id}");
                if let Some(vnfc) = tx.get(&VNFCS, &key)? {
                    if vnfc.state == "alive" && vnfc.vnfm == vnfm {
                        intend_removal(tx, &key, vnfc, evidence)?;
                    }
                }
            }
            Ok(())
        })
    }

    /// Reconcile: subscriptions, then every VNF instance (the full paged list to find new
    /// ones, then a direct Query VNF of every one known, since absence from a list is no
    /// evidence), so that a lost notification does no harm.
    pub async fn reconcile(&self) -> Result<(), DirectError> {
        let _busy = self.busy.lock().await;
        for vnfm in &self.vnfms {
            self.reconcile_subscription(vnfm).await?;
            let listed = vnfm.client.get_all("/vnf_instances").await?;
            let mut ids: Vec<String> = listed
                .iter()
                .filter(|i| Self::in_direct_mode(vnfm, i))
                .filter_map(|i| i["id"].as_str().map(String::from))
                .collect();
            let known = self.store.read(|tx| tx.list(&VNFS, ""))?;
            for (id, vnf) in known {
                if vnf.vnfm == vnfm.config.id
                    && vnf.instantiation_state != "DELETED"
                    && !ids.contains(&id)
                {
                    ids.push(id);
                }
            }
            for id in ids {
                let queried = vnfm.client.vnf_instance(&id).await?;
                self.apply_query(vnfm, &id, queried).await?;
            }
        }
        Ok(())
    }

    /// The subscription request (SOL 003 5.5.2.15 LccnSubscriptionRequest).
    fn subscription_request(&self, vnfm: &Followed) -> Result<Value, DirectError> {
        let c = &vnfm.config;
        let mut instance_filter = serde_json::Map::new();
        if !c.vnfd_ids.is_empty() {
            instance_filter.insert("vnfdIds".into(), json!(c.vnfd_ids));
        }
        if !c.vnf_instance_ids.is_empty() {
            instance_filter.insert("vnfInstanceIds".into(), json!(c.vnf_instance_ids));
        }
        if !c.vnf_product_names.is_empty() {
            // SOL 013 filter semantics: a product name needs its provider; any provider here.
            instance_filter.insert(
                "vnfProductsFromProviders".into(),
                json!([{"vnfProvider": "", "vnfProducts": c.vnf_product_names.iter()
                    .map(|n| json!({"vnfProductName": n})).collect::<Vec<_>>()}]),
            );
        }
        // One filter per subscription: SOL 013 5.2 ANDs attributes; the three ways of naming
        // VNFs are alternatives, so with more than one way configured no instance filter is
        // sent and the CMF filters on its side.
        let ways = [
            !c.vnfd_ids.is_empty(),
            !c.vnf_instance_ids.is_empty(),
            !c.vnf_product_names.is_empty(),
        ]
        .iter()
        .filter(|w| **w)
        .count();
        let mut filter = json!({ "notificationTypes": NOTIFICATION_TYPES });
        if ways == 1 && c.vnf_product_names.is_empty() {
            filter["vnfInstanceSubscriptionFilter"] = Value::Object(instance_filter);
        }
        let mut authentication = vnfm
            .intake
            .subscription_authentication()
            .map_err(|e| DirectError::Invalid(e.to_string()))?;
        if c.notification_auth == NotificationAuth::Oauth2ClientCredentials {
            let base = vnfm
                .callback_uri
                .split("/cmf/v1/")
                .next()
                .unwrap_or_default()
                .to_string();
            authentication["paramsOauth2ClientCredentials"]["tokenEndpoint"] =
                json!(format!("{base}/cmf/v1/direct/token/{}", c.id));
        }
        Ok(json!({
            "filter": filter,
            "callbackUri": vnfm.callback_uri,
            "authentication": authentication,
        }))
    }

    /// Keep one subscription with our callback URI and filter; delete other ones with our
    /// callback URI (stale, e.g. an older filter); create one if none.
    async fn reconcile_subscription(&self, vnfm: &Followed) -> Result<(), DirectError> {
        let wanted = self.subscription_request(vnfm)?;
        let subscriptions = vnfm.client.get_all("/subscriptions").await?;
        let mut kept = false;
        let ours_path = format!("/cmf/v1/direct/notifications/{}", vnfm.config.id);
        for s in subscriptions {
            // Ours: our callback URI, or one of an earlier run of this CMF (same path; the
            // port may have changed). The path carries the VNFM id, unique per CMF.
            let callback = s["callbackUri"].as_str().unwrap_or_default();
            if callback != vnfm.callback_uri && !callback.ends_with(&ours_path) {
                continue;
            }
            let id = s["id"].as_str().unwrap_or_default();
            let types: Vec<&str> = s["filter"]["notificationTypes"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let same = !kept
                && callback == vnfm.callback_uri
                && NOTIFICATION_TYPES.iter().all(|t| types.contains(t))
                && types.len() == NOTIFICATION_TYPES.len()
                && ["vnfdIds", "vnfInstanceIds"].iter().all(|f| {
                    s["filter"]["vnfInstanceSubscriptionFilter"][f]
                        == wanted["filter"]["vnfInstanceSubscriptionFilter"][f]
                });
            if same {
                kept = true;
            } else {
                tracing::info!(vnfm = %vnfm.config.id, subscription = %id, "direct mode: stale subscription deleted");
                match vnfm
                    .client
                    .request("DELETE", &format!("/subscriptions/{id}"), None)
                    .await
                {
                    Ok(_) => {}
                    Err(e) if e.status() == Some(404) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        if !kept {
            let response = vnfm
                .client
                .request(
                    "POST",
                    "/subscriptions",
                    Some(("application/json", wanted.clone())),
                )
                .await?;
            let created = response.json().unwrap_or_default();
            let id = created["id"].as_str().unwrap_or_default().to_string();
            tracing::info!(vnfm = %vnfm.config.id, subscription = %id, "direct mode: subscribed");
            let actor = format!("direct:{}", vnfm.config.id);
            self.store.write(move |tx| {
                tx.audit(
                    AuditEvent::new(actor, "cmf.direct.subscribe", &id)
                        .with_detail(json!({ "notificationTypes": NOTIFICATION_TYPES })),
                );
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Mint and deliver the enrollment credential of every live VNFC without a usable one.
    async fn deliver_credentials(&self) -> Result<(), DirectError> {
        let vnfcs = self.store.read(|tx| tx.list(&VNFCS, ""))?;
        for (key, vnfc) in vnfcs {
            if vnfc.state != "alive" {
                continue;
            }
            let Some(vnfm) = self.vnfm(&vnfc.vnfm) else {
                continue;
            };
            let needs = match &vnfc.credential {
                None => true,
                Some(c) => {
                    !c.delivered && c.undelivered_secret.is_none()
                        || (c.used_at.is_none() && c.expires_unix <= unix_now())
                }
            };
            let secret = if needs {
                let mut bytes = [0u8; 32];
                getrandom::fill(&mut bytes)
                    .map_err(|e| DirectError::Invalid(format!("random credential: {e}")))?;
                use base64::Engine;
                let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
                let credential = Credential {
                    sha256: hex::encode(sha2::Sha256::digest(secret.as_bytes())),
                    expires_unix: unix_now() + self.config.enrollment_seconds.max(60),
                    delivered: false,
                    used_at: None,
                    server_id: vnfc.server_id.clone(),
                    undelivered_secret: Some(secret.clone()),
                    scrub_pending: false,
                    scrubbed_at: None,
                };
                let k = key.clone();
                self.store.write(move |tx| {
                    if let Some(mut v) = tx.get(&VNFCS, &k)? {
                        v.credential = Some(credential);
                        tx.put(&VNFCS, &k, &v)?;
                    }
                    Ok(())
                })?;
                secret
            } else {
                match vnfc
                    .credential
                    .as_ref()
                    .and_then(|c| c.undelivered_secret.clone())
                {
                    Some(s) => s,
                    None => continue,
                }
            };
            let Some(vnfc_info_id) = &vnfc.vnfc_info_id else {
                continue;
            };
            let credential = json!({
                "estUrl": vnfm.est_url,
                "user": format!("{}/{}", vnfc.vnf_instance_id, vnfc.vnfc_id),
                "credential": secret,
            });
            match vnfm
                .client
                .modify_vnfc_property(
                    &vnfc.vnf_instance_id,
                    vnfc_info_id,
                    CREDENTIAL_PROPERTY,
                    credential,
                )
                .await
            {
                Ok(_) => {
                    let k = key.clone();
                    self.store.write(move |tx| {
                        if let Some(mut v) = tx.get(&VNFCS, &k)? {
                            if let Some(c) = v.credential.as_mut() {
                                c.delivered = true;
                                c.undelivered_secret = None;
                            }
                            tx.put(&VNFCS, &k, &v)?;
                        }
                        Ok(())
                    })?;
                    tracing::info!(vnfc = %key, "direct mode: enrollment credential delivered");
                }
                // Another operation holds the VNF (409) or the VNFM is away: next tick.
                Err(e) => {
                    tracing::debug!(vnfc = %key, error = %e, "direct mode: credential delivery retried");
                }
            }
        }
        Ok(())
    }

    /// Remove used enrollment credentials from the VNFM (the store's hash stays the source of
    /// truth; the credential is single-use anyway, but its plaintext should not linger where
    /// every reader of the VNFM's API sees it). For each VNFC whose use journaled the intent:
    /// Query VNF; if its `vnfcConfigurableProperties` still hold this credential, ModifyVnfInfo
    /// with `wardenEstEnrollment: null` (RFC 7396 merge patch: the member is removed; SOL 003
    /// 5.5.2.12, Tacker's json_merge_patch) and look again next tick; once a Query VNF shows it
    /// gone, close the intent. A crash anywhere repeats a harmless step.
    async fn scrub_credentials(&self) -> Result<(), DirectError> {
        let vnfcs = self.store.read(|tx| tx.list(&VNFCS, ""))?;
        for (key, vnfc) in vnfcs {
            let Some(credential) = vnfc.credential.as_ref().filter(|c| c.scrub_pending) else {
                continue;
            };
            let Some(vnfm) = self.vnfm(&vnfc.vnfm) else {
                continue;
            };
            let instance = match vnfm.client.vnf_instance(&vnfc.vnf_instance_id).await {
                Ok(i) => i,
                Err(e) => {
                    tracing::debug!(vnfc = %key, error = %e, "direct mode: credential scrub retried");
                    continue;
                }
            };
            let held = instance.as_ref().and_then(|i| {
                i["instantiatedVnfInfo"]["vnfcInfo"]
                    .as_array()?
                    .iter()
                    .find(|v| v["vnfcResourceInfoId"] == vnfc.vnfc_id.as_str())
                    .and_then(|v| {
                        v["vnfcConfigurableProperties"][CREDENTIAL_PROPERTY]["credential"].as_str()
                    })
                    .map(|secret| hex::encode(sha2::Sha256::digest(secret.as_bytes())))
                    .map(|digest| digest == credential.sha256)
            });
            if held == Some(true) {
                if let Ok(path) = std::env::var("WARDEN_TEST_DIRECT_PAUSE_BEFORE_SCRUB") {
                    // Test hook: the intent is durable, the plaintext still at the VNFM;
                    // stop here so a test can kill -9.
                    let _ = std::fs::write(&path, &key);
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                }
                let Some(vnfc_info_id) = &vnfc.vnfc_info_id else {
                    continue;
                };
                match vnfm
                    .client
                    .modify_vnfc_property(
                        &vnfc.vnf_instance_id,
                        vnfc_info_id,
                        CREDENTIAL_PROPERTY,
                        serde_json::Value::Null,
                    )
                    .await
                {
                    // 202: the VNFM modifies asynchronously; the next tick's Query VNF is
                    // the proof.
                    Ok(_) => {
                        tracing::info!(vnfc = %key, "direct mode: used credential removal requested")
                    }
                    // 409: another operation holds the VNF; next tick.
                    Err(e) => {
                        tracing::debug!(vnfc = %key, error = %e, "direct mode: credential scrub retried")
                    }
                }
                continue;
            }
            // Gone (or the VNFC / VNF itself is gone, which removes it too): close.
            let evidence = match held {
                Some(_) => "Query VNF: the credential is no longer in vnfcConfigurableProperties",
                None if instance.is_none() => "Query VNF: 404 (the VNF instance is deleted)",
                None => "Query VNF: the VNFC (or its vnfcInfo) is no longer listed",
            };
            let (k, sha) = (key.clone(), credential.sha256.clone());
            let actor = format!("direct:{}", vnfc.vnfm);
            self.store.write(move |tx| {
                if let Some(mut v) = tx.get(&VNFCS, &k)? {
                    let Some(c) = v.credential.as_mut().filter(|c| c.sha256 == sha) else {
                        return Ok(());
                    };
                    if !c.scrub_pending {
                        return Ok(());
                    }
                    c.scrub_pending = false;
                    c.scrubbed_at = Some(now());
                    tx.put(&VNFCS, &k, &v)?;
                    tx.audit(
                        AuditEvent::new(actor, "cmf.direct.credential_scrubbed", &k)
                            .with_detail(json!({ "evidence": evidence })),
                    );
                }
                Ok(())
            })?;
            tracing::info!(vnfc = %key, "direct mode: used enrollment credential gone from the VNFM");
        }
        Ok(())
    }

    /// Carry out journaled removal intents: revoke, erase, report, close with one audit.
    async fn carry_out_removals(&self) -> Result<(), DirectError> {
        let intents = self.store.read(|tx| tx.list(&REMOVALS, ""))?;
        for (key, intent) in intents {
            if let Ok(path) = std::env::var("WARDEN_TEST_DIRECT_PAUSE_AFTER_INTENT") {
                // Test hook: the intent is durable; stop here so a test can kill -9.
                let _ = std::fs::write(&path, &key);
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            let vnfc = self.store.read(|tx| tx.get(&VNFCS, &key))?;
            let Some(vnfc) = vnfc else {
                let k = key.clone();
                self.store.write(move |tx| {
                    tx.delete(&REMOVALS, &k)?;
                    Ok(())
                })?;
                continue;
            };
            let revoked = self.revoke_vnfc(&vnfc).await?;
            let report = RemovalReport {
                evidence: intent.evidence.clone(),
                journaled_at: intent.journaled_at.clone(),
                completed_at: now(),
                revoked,
                keys: "none: the agent holds no key of a direct-mode VNFC (the VNFC makes its \
                       own key pair; only its CSR reaches the CMF)"
                    .into(),
            };
            let actor = format!("direct:{}", vnfc.vnfm);
            let k = key.clone();
            self.store.write(move |tx| {
                // Exactly once: the intent is closed, the report and the audit entry written,
                // in one transaction; a repeat after a crash finds no intent.
                if !tx.delete(&REMOVALS, &k)? {
                    return Ok(());
                }
                if let Some(mut v) = tx.get(&VNFCS, &k)? {
                    v.state = "removed".into();
                    v.credential = None;
                    v.report = Some(report.clone());
                    tx.put(&VNFCS, &k, &v)?;
                    if let Some(id) = &v.registration_id {
                        if let Ok(subject) = vnfc_subject_key(&v.vnfc_id) {
                            if tx.get(&SUBJECTS, &subject)?.as_deref() == Some(id.as_str()) {
                                tx.delete(&SUBJECTS, &subject)?;
                            }
                        }
                        let _ = id;
                    }
                }
                tx.audit(
                    AuditEvent::new(actor, "cmf.direct.vnfc_removed", &k)
                        .with_detail(serde_json::to_value(&report).unwrap_or_default()),
                );
                Ok(())
            })?;
            tracing::info!(vnfc = %key, "direct mode: VNFC removed, certificates revoked");
        }
        Ok(())
    }
}

impl Direct {
    /// Revoke every certificate issued under the VNFC's registration (cessationOfOperation,
    /// RFC 5280 5.3.1). Idempotent: a repeat after a crash revokes nothing twice.
    async fn revoke_vnfc(&self, vnfc: &VnfcRecord) -> Result<Vec<String>, DirectError> {
        let Some(registration) = vnfc.registration_id.clone() else {
            return Ok(Vec::new());
        };
        let actor = format!("direct:{}", vnfc.vnfm);
        let outcome = self
            .cmf
            .revoke_of(
                super::records::CertificateOwner::Registration(&registration),
                super::revoke::RevocationReason::CessationOfOperation,
                &actor,
            )
            .await
            .map_err(|e| DirectError::Invalid(format!("revocation: {e}")))?;
        let mut all = outcome.revoked;
        all.extend(outcome.already_revoked);
        all.sort();
        Ok(all)
    }

    /// Direct enrollment (EST simpleenroll, RFC 7030 4.2.1; client authentication by HTTP
    /// Basic, RFC 7030 3.2.3): user `vnfInstanceId/vnfcId`, password the single-use
    /// credential the CMF delivered to that VNFC. Issued only while the VNFM shows the VNFC
    /// alive in an INSTANTIATED, direct-mode VNF (a live Query VNF, not only the inventory).
    ///
    /// `path_vnfm` is the VNFM whose enrollment path (`/.well-known/est/direct/<id>`) was
    /// used: a VNFC enrolls only at the path of the VNFM (and so the trust domain) that
    /// reported it.
    pub async fn enroll(
        &self,
        path_vnfm: &str,
        authorization: Option<&str>,
        verified: super::csr::VerifiedCsr,
    ) -> Result<super::issue::CsrResponse, CmfError> {
        use base64::Engine;
        let unauthenticated = || {
            CmfError::Unauthenticated(
                "direct enrollment: HTTP Basic authentication with user \
                 '<vnfInstanceId>/<vnfcId>' and the enrollment credential from the VNFC's \
                 vnfcConfigurableProperties is required"
                    .into(),
            )
        };
        let encoded = authorization
            .and_then(|h| h.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
            .map(|(_, rest)| rest.trim())
            .ok_or_else(unauthenticated)?;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(unauthenticated)?;
        let (user, secret) = decoded.split_once(':').ok_or_else(unauthenticated)?;
        let (vnf_id, vnfc_id) = user.split_once('/').ok_or_else(unauthenticated)?;
        let key = format!("{vnf_id}/{vnfc_id}");
        let (vnfc, vnf, elsewhere) = self.store.read(|tx| {
            let vnfc = tx.get(&VNFCS, &key)?;
            let vnf = tx.get(&VNFS, vnf_id)?;
            let elsewhere = if vnfc.is_none() {
                tx.list(&VNFCS, "")?
                    .into_iter()
                    .find(|(_, v)| v.vnfc_id == vnfc_id)
                    .map(|(_, v)| v.vnf_instance_id)
            } else {
                None
            };
            Ok((vnfc, vnf, elsewhere))
        })?;
        let Some(vnfc) = vnfc else {
            return Err(CmfError::Forbidden(match (elsewhere, vnf) {
                (Some(other), _) => format!(
                    "direct enrollment: VNFC {vnfc_id} belongs to another VNF instance \
                     ({other}), not {vnf_id}"
                ),
                (None, Some(vnf)) if vnf.instantiation_state != "INSTANTIATED" => format!(
                    "direct enrollment: VNF instance {vnf_id} is {} (never instantiated or \
                     terminated): it has no VNFC {vnfc_id}",
                    vnf.instantiation_state
                ),
                (None, Some(_)) => {
                    format!("direct enrollment: VNF instance {vnf_id} has no VNFC {vnfc_id}")
                }
                (None, None) => format!(
                    "direct enrollment: no direct-mode VNF instance {vnf_id} with a VNFC \
                     {vnfc_id} is known to this CMF"
                ),
            }));
        };
        if vnfc.state != "alive" {
            return Err(CmfError::Forbidden(format!(
                "direct enrollment: VNFC {vnfc_id} of {vnf_id} has been removed ({})",
                vnfc.report
                    .as_ref()
                    .map_or("removal in progress".to_string(), |r| r.evidence.clone())
            )));
        }
        let Some(vnfm) = self.vnfm(&vnfc.vnfm) else {
            return Err(CmfError::Forbidden(format!(
                "direct enrollment: VNFM '{}' is no longer configured",
                vnfc.vnfm
            )));
        };
        let credential = vnfc
            .credential
            .as_ref()
            .filter(|c| c.delivered)
            .ok_or_else(|| {
                CmfError::Forbidden(format!(
                    "direct enrollment: no enrollment credential was delivered to VNFC \
                     {vnfc_id} yet"
                ))
            })?;
        let digest = hex::encode(sha2::Sha256::digest(secret.as_bytes()));
        let matches = digest.len() == credential.sha256.len()
            && digest
                .bytes()
                .zip(credential.sha256.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if !matches {
            return Err(CmfError::Forbidden(format!(
                "direct enrollment: wrong enrollment credential for VNFC {vnfc_id}"
            )));
        }
        if credential.used_at.is_some() {
            return Err(CmfError::Forbidden(format!(
                "direct enrollment: the enrollment credential of VNFC {vnfc_id} was used \
                 already (single use)"
            )));
        }
        if credential.expires_unix <= unix_now() {
            return Err(CmfError::Forbidden(format!(
                "direct enrollment: the enrollment credential of VNFC {vnfc_id} has expired"
            )));
        }
        if credential.server_id != vnfc.server_id {
            return Err(CmfError::Forbidden(format!(
                "direct enrollment: the credential of VNFC {vnfc_id} was bound to another \
                 server"
            )));
        }
        // The trust domain: checked once the requester has shown the VNFC's credential, so
        // that nobody else learns which domain a VNFC belongs to.
        if vnfc.vnfm != path_vnfm {
            let here = self
                .vnfm(path_vnfm)
                .map_or("?", |f| f.config.trust_domain.as_str());
            return Err(CmfError::Forbidden(format!(
                "direct enrollment: VNFC {vnfc_id} of {vnf_id} belongs to VNFM '{}' of trust \
                 domain '{}'; this enrollment path is VNFM '{path_vnfm}''s (trust domain \
                 '{here}'): enroll at the estUrl of the VNFC's own enrollment credential",
                vnfc.vnfm, vnfc.trust_domain
            )));
        }
        // Names outside the trust domain's permitted set are refused (the names come from
        // the lifecycle data, so a VNFM cannot widen its domain by naming VNFCs freely).
        self.check_names(vnfm, vnfc_id)?;
        // Alive now, as the VNFM shows it: a live Query VNF.
        let instance = vnfm
            .client
            .vnf_instance(vnf_id)
            .await
            .map_err(|e| CmfError::Unavailable(format!("direct enrollment: Query VNF: {e}")))?
            .ok_or_else(|| {
                CmfError::Forbidden(format!(
                    "direct enrollment: the VNFM no longer knows VNF instance {vnf_id}"
                ))
            })?;
        let live = instance["instantiationState"] == "INSTANTIATED"
            && Self::in_direct_mode(vnfm, &instance)
            && vnfcs_of(&instance)
                .iter()
                .any(|c| c.vnfc_id == vnfc_id && c.server_id == vnfc.server_id);
        if !live {
            return Err(CmfError::Forbidden(format!(
                "direct enrollment: the VNFM does not show VNFC {vnfc_id} (server {}) alive \
                 in an INSTANTIATED direct-mode VNF {vnf_id}",
                vnfc.server_id
            )));
        }
        // Consume the credential and make the VNFC's registration, atomically: a concurrent
        // replay finds it used.
        let urn = vnfc_urn(vnf_id, vnfc_id);
        let vdu = vdu_urn(vnf_id, &vnfc.vdu_id);
        let consumer = super::Consumer {
            id: format!("direct:{}", vnfc.vnfm),
            trust_domain: vnfc.trust_domain.clone(),
        };
        let new_registration = Registration {
            id: super::new_id()?,
            consumer: consumer.id.clone(),
            trust_domain: consumer.trust_domain.clone(),
            cert_type: CertType::VnfciCert,
            subject_ids: vec![vnfc_id.to_ascii_lowercase()],
            type_of_vnfc_cert_handling: Some(super::VnfcCertHandling::DirectMode),
            key_attestation: None,
            ca_id: vnfm.ca_id.clone(),
            created: now(),
            vnf_instance_id: Some(vnf_id.to_string()),
        };
        let (k, expected, subject) = (
            key.clone(),
            credential.sha256.clone(),
            vnfc_subject_key(vnfc_id)?,
        );
        let registration_id = self
            .cmf
            .group
            .write_async(move |tx| {
                let Some(mut v) = tx.get(&VNFCS, &k)? else {
                    return Ok(None);
                };
                let fresh = v.state == "alive"
                    && v.credential
                        .as_ref()
                        .is_some_and(|c| c.sha256 == expected && c.used_at.is_none());
                if !fresh {
                    return Ok(None);
                }
                if let Some(c) = v.credential.as_mut() {
                    c.used_at = Some(now());
                    // The intent to remove the plaintext from the VNFM, durable with the use.
                    c.scrub_pending = true;
                }
                let id = match &v.registration_id {
                    Some(id) => id.clone(),
                    None => {
                        // One namespace of names (cmf::names): a VNFC identifier another
                        // registration holds is never taken over.
                        if let Some(holder) = tx.get(&SUBJECTS, &subject)? {
                            if tx.contains(&REGISTRATIONS, &holder)? {
                                return Err(crate::store::StoreError::rejected(
                                    CmfError::Conflict(format!(
                                        "direct enrollment: VNFC identifier {} is held by \
                                         registration {holder}",
                                        new_registration.subject_ids[0]
                                    )),
                                ));
                            }
                        }
                        tx.put(&REGISTRATIONS, &new_registration.id, &new_registration)?;
                        tx.put(&SUBJECTS, &subject, &new_registration.id)?;
                        tx.audit(
                            AuditEvent::new(
                                &new_registration.consumer,
                                "cmf.register",
                                &new_registration.id,
                            )
                            .with_detail(json!({
                                "subjectIds": new_registration.subject_ids,
                                "typeOfVnfcCertHandling": "DIRECT_MODE",
                            })),
                        );
                        new_registration.id.clone()
                    }
                };
                v.registration_id = Some(id.clone());
                tx.put(&VNFCS, &k, &v)?;
                Ok(Some(id))
            })
            .await?;
        if registration_id.is_none() {
            return Err(CmfError::Forbidden(format!(
                "direct enrollment: the enrollment credential of VNFC {vnfc_id} was used \
                 already (single use)"
            )));
        }
        // Names from the lifecycle data, never from the CSR: the VNFC URN (subject CN and
        // URI SAN) and its VDU's URN.
        let mut verified = verified;
        verified.common_names = vec![vnfc_id.to_ascii_lowercase()];
        verified.alt_names = Vec::new();
        verified.lifecycle_uris = vec![urn.clone(), vdu];
        let issued = self
            .cmf
            .enroll_verified(
                &consumer,
                CertType::VnfciCert,
                Some(vnfc_id.to_ascii_lowercase()),
                verified,
                true,
            )
            .await;
        if let Err(e) = &issued {
            // Nothing was issued (key policy, CA unavailable...): the credential is given
            // back so that the VNFC can try again with a better request.
            let k = key.clone();
            let restored = self
                .cmf
                .group
                .write_async(move |tx| {
                    if let Some(mut v) = tx.get(&VNFCS, &k)? {
                        if let Some(c) = v.credential.as_mut() {
                            c.used_at = None;
                            // Usable again: it stays where the VNFC reads it (if the
                            // worker removed it meanwhile, the VNFC still holds it).
                            c.scrub_pending = false;
                        }
                        tx.put(&VNFCS, &k, &v)?;
                    }
                    Ok(())
                })
                .await;
            if let Err(store) = restored {
                tracing::warn!(vnfc = %key, error = %store, refused = %e, "direct enrollment: credential not restored");
            }
        }
        issued
    }
}

impl Direct {
    /// Whether a VNFM of this id is followed (its enrollment path exists).
    pub fn follows(&self, vnfm: &str) -> bool {
        self.vnfm(vnfm).is_some()
    }

    /// The names of a VNFC's certificate against its VNFM's trust domain: the VNFC identifier
    /// must match one of the domain's `vnfc_id_patterns` and be no reserved name (the
    /// agent's own names, a consumer's identity: cmf::names).
    fn check_names(&self, vnfm: &Followed, vnfc_id: &str) -> Result<(), CmfError> {
        let id = vnfc_id.to_ascii_lowercase();
        let domain = &vnfm.config.trust_domain;
        if !vnfm
            .vnfc_id_patterns
            .iter()
            .any(|p| crate::cmf::names::glob(p.as_bytes(), id.as_bytes()))
        {
            return Err(CmfError::Forbidden(format!(
                "direct enrollment: VNFC identifier '{id}' matches none of the VNFC identifier \
                 patterns of cmf.trust_domain '{domain}' (vnfc_id_patterns = {:?}), the trust \
                 domain of VNFM '{}'",
                vnfm.vnfc_id_patterns, vnfm.config.id
            )));
        }
        if let Ok(name) = super::names::SubjectName::parse(&id) {
            if let Some(why) = self.cmf.policies().reserved(&name) {
                return Err(CmfError::Forbidden(format!(
                    "direct enrollment: VNFC identifier '{id}' {why}"
                )));
            }
        }
        Ok(())
    }
}

/// Journal the removal intent of one VNFC (inside the caller's transaction).
fn intend_removal(
    tx: &mut crate::store::WriteTx<'_>,
    key: &str,
    mut vnfc: VnfcRecord,
    evidence: &str,
) -> Result<(), StoreError> {
    vnfc.state = "removing".into();
    tx.put(&VNFCS, key, &vnfc)?;
    if !tx.contains(&REMOVALS, key)? {
        tx.put(
            &REMOVALS,
            key,
            &RemovalIntent {
                evidence: evidence.to_string(),
                journaled_at: now(),
            },
        )?;
    }
    Ok(())
}

/// The VNFCs of a VNF instance (SOL 003 5.5.3.3 VnfcResourceInfo, 5.5.3.23 VnfcInfo).
pub fn vnfcs_of(instance: &Value) -> Vec<VnfcRecord> {
    let info = &instance["instantiatedVnfInfo"];
    let vnf_id = instance["id"].as_str().unwrap_or_default();
    let mut ext_addresses: HashMap<String, Vec<String>> = HashMap::new();
    for cp in info["extCpInfo"].as_array().into_iter().flatten() {
        if let Some(id) = cp["id"].as_str() {
            ext_addresses.insert(id.to_string(), addresses_of(&cp["cpProtocolInfo"]));
        }
    }
    let mut out = Vec::new();
    for r in info["vnfcResourceInfo"].as_array().into_iter().flatten() {
        let Some(id) = r["id"].as_str() else { continue };
        let mut addresses = Vec::new();
        for cp in r["vnfcCpInfo"].as_array().into_iter().flatten() {
            addresses.extend(addresses_of(&cp["cpProtocolInfo"]));
            if let Some(ext) = cp["vnfExtCpId"].as_str() {
                addresses.extend(ext_addresses.get(ext).cloned().unwrap_or_default());
            }
        }
        addresses.sort();
        addresses.dedup();
        let vnfc_info_id = info["vnfcInfo"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["vnfcResourceInfoId"] == id)
            .and_then(|v| v["id"].as_str())
            .map(String::from);
        out.push(VnfcRecord {
            vnfm: String::new(),
            trust_domain: String::new(),
            vnf_instance_id: vnf_id.to_string(),
            vnfc_id: id.to_string(),
            vdu_id: r["vduId"].as_str().unwrap_or_default().to_string(),
            vnfc_info_id,
            vim_connection_id: r["computeResource"]["vimConnectionId"]
                .as_str()
                .map(String::from),
            server_id: r["computeResource"]["resourceId"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            addresses,
            state: "alive".into(),
            added_at: now(),
            credential: None,
            registration_id: None,
            report: None,
        });
    }
    out
}

fn addresses_of(protocol_info: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for p in protocol_info.as_array().into_iter().flatten() {
        for a in p["ipOverEthernet"]["ipAddresses"]
            .as_array()
            .into_iter()
            .flatten()
        {
            for addr in a["addresses"].as_array().into_iter().flatten() {
                if let Some(s) = addr.as_str() {
                    out.push(s.to_string());
                }
            }
        }
    }
    out
}

/// Parse a VNF LCM notification (SOL 003 5.5.2.17-19): `Ok(None)` for another type
/// (acknowledged, ignored); `Err` names the first missing or mistyped required field.
pub fn parse_notification(body: &[u8]) -> Result<Option<Value>, String> {
    let value: Value = serde_json::from_slice(body).map_err(|e| format!("malformed JSON: {e}"))?;
    let object = value
        .as_object()
        .ok_or("the notification is not a JSON object")?;
    let string = |field: &str| -> Result<(), String> {
        match object.get(field) {
            Some(Value::String(s)) if !s.is_empty() => Ok(()),
            Some(_) => Err(format!("'{field}' is not a non-empty string")),
            None => Err(format!("'{field}' is missing")),
        }
    };
    string("id")?;
    string("notificationType")?;
    string("subscriptionId")?;
    string("timeStamp").or_else(|_| string("timestamp"))?;
    let required: &[&str] = match object["notificationType"].as_str().unwrap_or_default() {
        "VnfLcmOperationOccurrenceNotification" => &[
            "vnfInstanceId",
            "operationState",
            "operation",
            "vnfLcmOpOccId",
            "notificationStatus",
        ],
        "VnfIdentifierCreationNotification" | "VnfIdentifierDeletionNotification" => {
            &["vnfInstanceId"]
        }
        _ => return Ok(None),
    };
    for field in required {
        string(field)?;
    }
    if let Some(affected) = object.get("affectedVnfcs") {
        let list = affected
            .as_array()
            .ok_or("'affectedVnfcs' is not an array")?;
        for (i, v) in list.iter().enumerate() {
            for field in ["id", "vduId", "changeType"] {
                if !v.get(field).is_some_and(Value::is_string) {
                    return Err(format!("'affectedVnfcs[{i}].{field}' is missing"));
                }
            }
        }
    }
    Ok(Some(value))
}

/// `warden cmf vnfs`: every VNF followed with its VNFCs (inventory, state, credential state
/// without secrets, registration).
pub fn vnfs_view(store: &Store) -> Result<Value, StoreError> {
    store.read(|tx| {
        let vnfcs = tx.list(&VNFCS, "")?;
        let mut out = Vec::new();
        for (id, vnf) in tx.list(&VNFS, "")? {
            let mine: Vec<Value> = vnfcs
                .iter()
                .filter(|(k, _)| k.starts_with(&format!("{id}/")))
                .map(|(_, v)| vnfc_json(v))
                .collect();
            out.push(json!({
                "vnfInstanceId": id, "vnfm": vnf.vnfm, "vnfdId": vnf.vnfd_id,
                "vnfProductName": vnf.vnf_product_name,
                "instantiationState": vnf.instantiation_state, "updated": vnf.updated,
                "vnfcs": mine,
            }));
        }
        Ok(Value::Array(out))
    })
}

fn vnfc_json(v: &VnfcRecord) -> Value {
    json!({
        "vnfcId": v.vnfc_id, "vnfInstanceId": v.vnf_instance_id, "vduId": v.vdu_id,
        "vnfcInfoId": v.vnfc_info_id, "vimConnectionId": v.vim_connection_id,
        "serverId": v.server_id, "addresses": v.addresses, "state": v.state,
        "addedAt": v.added_at, "trustDomain": v.trust_domain, "vnfm": v.vnfm,
        "credential": v.credential.as_ref().map(|c| json!({
            "delivered": c.delivered, "usedAt": c.used_at, "expiresUnix": c.expires_unix,
            "scrubPending": c.scrub_pending, "scrubbedAt": c.scrubbed_at,
        })),
        "registrationId": v.registration_id, "report": v.report,
        "uri": vnfc_urn(&v.vnf_instance_id, &v.vnfc_id),
    })
}

/// `warden cmf vnfc VNFC_ID`: one VNFC (by vnfcId, or `vnfInstanceId/vnfcId`), with its
/// certificates and their revocation state, and its removal report.
pub fn vnfc_view(store: &Store, id: &str) -> Result<Option<Value>, StoreError> {
    store.read(|tx| {
        let found = tx
            .list(&VNFCS, "")?
            .into_iter()
            .find(|(k, v)| k == id || v.vnfc_id == id);
        let Some((_, vnfc)) = found else {
            return Ok(None);
        };
        let mut certificates = Vec::new();
        if let Some(registration) = &vnfc.registration_id {
            tx.scan(&super::CERTIFICATES, None, |key, record| {
                if &record.registration_id == registration {
                    certificates.push(json!({
                        "id": key, "serialNumber": record.serial_number,
                        "subjects": record.subjects, "notAfter": record.not_after,
                        "revocation": record.revocation,
                    }));
                }
                true
            })?;
        }
        let mut view = vnfc_json(&vnfc);
        view["certificates"] = Value::Array(certificates);
        Ok(Some(view))
    })
}

/// The key of a direct-mode VNFC's identifier in the one namespace of names (cmf::names): the
/// vnfcResourceInfo id (Tacker: the Nova server id) as a VNFC identifier.
fn vnfc_subject_key(vnfc_id: &str) -> Result<String, CmfError> {
    match super::names::SubjectName::parse(vnfc_id) {
        Ok(name @ super::names::SubjectName::Vnfc(_)) => Ok(name.index_key()),
        Ok(_) | Err(_) => Err(CmfError::Unprocessable(format!(
            "direct enrollment: the VNFM's vnfcResourceInfo id '{vnfc_id}' is not a valid VNFC \
             identifier (one label of letters, digits and '-')"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Trimmed from a real Tacker (v2 API) Query VNF after a scale out.
    fn tacker_instance() -> Value {
        json!({
            "id": "4d11a8ff-4177-4101-b576-a7120e7cb20d",
            "vnfdId": "a3933467-b8d3-4e40-9588-3e20351e002b",
            "instantiationState": "INSTANTIATED",
            "instantiatedVnfInfo": {
                "vnfcResourceInfo": [{
                    "id": "ecd7a88e-6a76-42d2-8509-756b026aab7d",
                    "vduId": "VDU1",
                    "computeResource": {"resourceId": "ecd7a88e-6a76-42d2-8509-756b026aab7d",
                        "vimConnectionId": "vim1", "vimLevelResourceType": "OS::Nova::Server"},
                    "vnfcCpInfo": [{"cpdId": "VDU1_CP1",
                        "id": "VDU1_CP1-ecd7a88e-6a76-42d2-8509-756b026aab7d",
                        "vnfExtCpId": "cp-f363f363"}]
                }],
                "vnfcInfo": [{"id": "VDU1-ecd7a88e-6a76-42d2-8509-756b026aab7d", "vduId": "VDU1",
                    "vnfcResourceInfoId": "ecd7a88e-6a76-42d2-8509-756b026aab7d",
                    "vnfcState": "STARTED"}],
                "extCpInfo": [{"id": "cp-f363f363", "cpdId": "VDU1_CP1",
                    "cpProtocolInfo": [{"layerProtocol": "IP_OVER_ETHERNET", "ipOverEthernet":
                        {"ipAddresses": [{"type": "IPV4", "addresses": ["10.10.0.200"]}]}}]}]
            }
        })
    }

    #[test]
    fn inventory_from_query_vnf() {
        let vnfcs = vnfcs_of(&tacker_instance());
        assert_eq!(vnfcs.len(), 1);
        let v = &vnfcs[0];
        assert_eq!(v.vnfc_id, "ecd7a88e-6a76-42d2-8509-756b026aab7d");
        assert_eq!(v.vdu_id, "VDU1");
        assert_eq!(v.server_id, "ecd7a88e-6a76-42d2-8509-756b026aab7d");
        assert_eq!(v.vim_connection_id.as_deref(), Some("vim1"));
        assert_eq!(
            v.vnfc_info_id.as_deref(),
            Some("VDU1-ecd7a88e-6a76-42d2-8509-756b026aab7d")
        );
        // The external CP's address reaches the VNFC through vnfcCpInfo.vnfExtCpId.
        assert_eq!(v.addresses, vec!["10.10.0.200".to_string()]);
        // Not instantiated: no VNFCs.
        assert!(vnfcs_of(&json!({"id": "x", "instantiationState": "NOT_INSTANTIATED"})).is_empty());
    }

    #[test]
    fn notifications_are_parsed_strictly() {
        let good = json!({
            "id": "n1", "notificationType": "VnfLcmOperationOccurrenceNotification",
            "subscriptionId": "s", "timeStamp": "2026-12-01T00:00:00Z",
            "notificationStatus": "RESULT", "operationState": "COMPLETED",
            "vnfInstanceId": "v", "operation": "SCALE", "vnfLcmOpOccId": "o",
            "affectedVnfcs": [{"id": "c", "vduId": "VDU1", "changeType": "REMOVED"}],
        });
        assert!(parse_notification(good.to_string().as_bytes())
            .unwrap()
            .is_some());
        let mut missing = good.clone();
        missing.as_object_mut().unwrap().remove("vnfLcmOpOccId");
        let err = parse_notification(missing.to_string().as_bytes()).unwrap_err();
        assert!(err.contains("vnfLcmOpOccId"), "{err}");
        let mut bad_vnfc = good.clone();
        bad_vnfc["affectedVnfcs"][0]
            .as_object_mut()
            .unwrap()
            .remove("changeType");
        let err = parse_notification(bad_vnfc.to_string().as_bytes()).unwrap_err();
        assert!(err.contains("affectedVnfcs[0].changeType"), "{err}");
        // Another type is acknowledged and ignored.
        let other = json!({"id": "n", "notificationType": "VnfPmJobNotification",
            "subscriptionId": "s", "timeStamp": "t"});
        assert!(parse_notification(other.to_string().as_bytes())
            .unwrap()
            .is_none());
        assert!(parse_notification(b"[1]").is_err());
    }

    /// The `[cmf.direct]` block of `systemd/warden.toml`, uncommented, parses (it is commented
    /// there because it needs secrets and a VNFM).
    #[test]
    fn reference_config_block_parses() {
        let text = include_str!("../../../systemd/warden.toml");
        let start = text.find("# [cmf.direct]").expect("block");
        let end = text[start..].find("\n\n").map_or(text.len(), |e| start + e);
        let mut toml_text = String::new();
        for line in text[start..end].lines() {
            let line = line.trim_start();
            // Keys and tables are commented as "# key = ..."; prose as "# Words ...".
            if let Some(rest) = line.strip_prefix("# ") {
                let first = rest.split_whitespace().next().unwrap_or("");
                let is_toml = rest.starts_with('[')
                    || (rest.contains(" = ")
                        && first.chars().all(|c| c.is_ascii_lowercase() || c == '_'));
                if is_toml {
                    toml_text.push_str(rest);
                    toml_text.push('\n');
                }
            }
        }
        #[derive(serde::Deserialize)]
        struct Wrapper {
            cmf: Inner,
        }
        #[derive(serde::Deserialize)]
        struct Inner {
            direct: DirectConfig,
        }
        let parsed: Wrapper =
            toml::from_str(&toml_text).unwrap_or_else(|e| panic!("{e}\n{toml_text}"));
        let direct = parsed.cmf.direct;
        assert_eq!(direct.reconcile_seconds, 300);
        assert_eq!(direct.vnfms.len(), 1);
        assert_eq!(direct.vnfms[0].id, "tacker-1");
        assert!(matches!(
            direct.vnfms[0].auth,
            crate::config::VnfmAuthConfig::KeystoneApplicationCredential { .. }
        ));
    }

    #[test]
    fn vnfc_id_patterns_match_like_the_name_policy() {
        assert!(crate::cmf::names::glob(b"*", b"ecd7a88e-6a76"));
        assert!(crate::cmf::names::glob(b"vnfc-*", b"vnfc-1"));
        assert!(!crate::cmf::names::glob(b"vnfc-*", b"ecd7a88e-6a76"));
        assert!(crate::cmf::names::glob(b"ecd7a88e-????", b"ecd7a88e-6a76"));
        assert!(!crate::cmf::names::glob(b"ecd7a88e-???", b"ecd7a88e-6a76"));
        assert!(!crate::cmf::names::glob(b"", b"x"));
    }

    #[test]
    fn names_are_urns() {
        assert_eq!(vnfc_urn("v-1", "c-2"), "urn:etsi:nfv:vnf:v-1:vnfc:c-2");
        assert_eq!(vdu_urn("v-1", "VDU1"), "urn:etsi:nfv:vnf:v-1:vdu:VDU1");
    }
}
