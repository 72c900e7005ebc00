//! The Security Manager on Sc-Or (IFA 033 clauses 5 and 6).
//!
//! Flow (ARCHITECTURE.md, "two flows"): the NFVO posts a notification -> [`intake`]
//! authenticates, parses, de-duplicates and journals it durably, then answers 204 ->
//! the processor task refreshes its view of the NSs (Query NS), derives events
//! ([`policy`]) and, per the mode and the rules, journals actions -> [`enforce`] runs each
//! action's steps (Update NS, package PATCH, erasure) through [`nfvo`], journaling every
//! step before and after it is sent, so a restart resumes without sending anything twice.
//!
//! Store tables (all JSON values, keyed by string):
//! - `sm_notifications`: every notification by id (dedupe), with its body;
//! - `sm_pending`: notifications journaled and not yet processed, in arrival order;
//! - `sm_processed`: the same keys once processed: the time index that retention prunes by;
//! - `sm_inventory`: the VNFs last seen, to notice additions, removals and changes;
//! - `sm_absent`: VNFs gone from a complete view of the NSs without evidence yet that they
//!   are terminated: their keys are kept until there is (see [`policy::removal_evidence`]);
//! - `sm_actions`: actions with their steps and states (the enforcement journal);
//! - `sm_own_ops`: NS LCM operation occurrences the SM started, so their effects are not
//!   mistaken for someone else's change;
//! - `sm_erasures`: one erasure report per VNF;
//! - `sm_seen_failures`: failed operation occurrences already judged (reconciliation).

pub mod enforce;
pub mod hosts;
pub mod intake;
pub mod nfvo;
pub mod policy;
pub mod status;
pub mod telemetry;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::config::{Config, RuleEvent, SmConfig, SmMode};
use crate::keys::backends::Backends;
use crate::store::{ErasureEntry, GroupCommit, Store, StoreError, Table};
use nfvo::{Api, Interface, Nfvo, NfvoError};

pub const NOTIFICATIONS: Table<NotificationRecord> = Table::new("sm_notifications");
pub const PENDING: Table<String> = Table::new("sm_pending");
pub const PROCESSED: Table<String> = Table::new("sm_processed");
pub const INVENTORY: Table<VnfRecord> = Table::new("sm_inventory");
pub const ABSENT: Table<AbsentVnf> = Table::new("sm_absent");
pub const ACTIONS: Table<Action> = Table::new("sm_actions");
pub const OWN_OPS: Table<String> = Table::new("sm_own_ops");
pub const ERASURES: Table<ErasureReport> = Table::new("sm_erasures");
pub const SEEN_FAILURES: Table<String> = Table::new("sm_seen_failures");
/// This SM's subscription id at the NFVO (under the key "id"): notifications for any other
/// subscription are refused.
pub const SUBSCRIPTION: Table<String> = Table::new("sm_subscription");
/// The HMAC key of the notification endpoint's OAuth2 tokens (hex), made once.
pub const TOKEN_KEY: Table<String> = Table::new("sm_token_key");

/// A journaled notification.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NotificationRecord {
    pub id: String,
    pub notification_type: String,
    /// RFC 3339 UTC, when it was journaled. It is processed once its `sm_pending` entry is
    /// gone.
    pub received: String,
    pub body: Arc<Value>,
}

/// What the SM knows about a VNF instance (IFA 033 6.2 NOTE: Sc-Or.NsLcm.006 data).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VnfRecord {
    pub vnf_instance_id: String,
    pub ns_instance_ids: BTreeSet<String>,
    pub vnfd_id: String,
    pub vnf_pkg_id: String,
    #[serde(default)]
    pub vnf_instance_name: Option<String>,
    #[serde(default)]
    pub vnf_profile_id: Option<String>,
    #[serde(default)]
    pub flavour_id: Option<String>,
    pub instantiation_state: String,
    #[serde(default)]
    pub vnf_state: Option<String>,
    /// extVirtualLinkInfo ids and their resource ids: the VNF's external connectivity.
    #[serde(default)]
    pub ext_virtual_links: BTreeMap<String, String>,
}

/// A VNF no longer in any NS of a complete view, not (yet) known to be terminated.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AbsentVnf {
    /// As last seen.
    pub record: VnfRecord,
    /// When it was first missed (RFC 3339).
    pub since: String,
}

/// One enforcement or security-VNF operation and its steps: the enforcement journal.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Action {
    pub id: String,
    pub kind: ActionKind,
    /// The VNF acted on (empty for a host action).
    pub vnf_instance_id: String,
    /// The compute host acted on (host actions, IFA 033 SecEnforce.004).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The rule event, or "operator".
    pub trigger: String,
    /// What caused it: notification id, event detail, operator.
    pub cause: Value,
    pub mode: SmMode,
    pub options: TerminateOptions,
    /// Options the mode does not allow: refused and audited, never sent.
    pub refused: Vec<String>,
    pub steps: Vec<Step>,
    pub state: ActionState,
    /// Why it was cancelled or failed, in a sentence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub created: String,
    pub updated: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ActionKind {
    /// IFA 033 6.4: terminate a VNF (remove it from every NS).
    Terminate,
    /// IFA 033 6.5: add, modify or remove a security VNF.
    SecurityVnfAdd,
    SecurityVnfModify,
    SecurityVnfRemove,
    /// IFA 033 Sc-Or.SecEnforce.004: take a compute host out of use.
    HostOutOfUse,
    /// IFA 033 Sc-Or.SecEnforce.003 same-host option: the other VNFs on a compromised
    /// VNF's host(s).
    SameHostTerminate,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TerminateOptions {
    pub snapshot: bool,
    pub allow_replacement: bool,
    pub disable_package: bool,
    pub erase: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ActionState {
    /// PASSIVE: what would have been done, nothing sent.
    Recorded,
    /// Steps remain.
    Running,
    Completed,
    /// Finished, at least one step failed.
    Failed,
    /// Stopped before its remaining steps were sent: by the operator (`warden sm cancel`),
    /// or because the mode no longer allows them (checked before each step is sent).
    Cancelled,
}

impl ActionState {
    pub fn is_final(self) -> bool {
        !matches!(self, ActionState::Running)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Step {
    pub kind: StepKind,
    pub state: StepState,
    /// How many times the request was sent.
    pub attempts: u32,
    #[serde(default)]
    pub op_occ_id: Option<String>,
    #[serde(default)]
    pub detail: Option<String>,
}

/// Fields in camelCase like every other attribute of the action JSON (`rename_all` alone
/// renames only the variants); the snake_case names of journals written before are still
/// read.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(
    rename_all = "camelCase",
    rename_all_fields = "camelCase",
    tag = "type"
)]
pub enum StepKind {
    /// `POST ns_instances/{id}/update`; the request carries the step's marker.
    UpdateNs {
        interface: Interface,
        #[serde(alias = "ns_instance_id")]
        ns_instance_id: String,
        request: Value,
    },
    /// `PATCH vnf_packages/{id}` operationalState DISABLED (IFA 033 6.4 NOTE 3).
    DisablePackage {
        #[serde(alias = "vnf_pkg_id")]
        vnf_pkg_id: String,
    },
    /// Destroy the keys the agent holds for the VNF, and check them gone.
    EraseLocal,
    /// A step against the VIM (host actions, [`hosts`]).
    Host(hosts::HostStep),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum StepState {
    Pending,
    /// Journaled before the request left: after a crash the SM looks for the operation
    /// before sending again.
    Sending,
    /// 202 and an operation occurrence id; waiting for it to finish.
    Accepted,
    Completed,
    Failed,
}

/// What was erased for one VNF, locally and by NFV-MANO.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErasureReport {
    pub vnf_instance_id: String,
    /// Objects the agent held for the VNF, destroyed through the key layer.
    pub local: Vec<ErasureEntry>,
    /// Objects that could not be destroyed, with the reason.
    pub local_failed: Vec<String>,
    /// Erasure requested from NFV-MANO in the REMOVE_VNF requests, and their outcome.
    pub mano: Vec<ManoErasure>,
    /// Why the VNF is known to be terminated (what allowed the local erasure).
    #[serde(default)]
    pub evidence: Vec<String>,
    /// Certificates of the VNF the CMF issued, revoked with cessationOfOperation
    /// (`caId/serial`), when the CMF runs in this agent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoked_certificates: Vec<String>,
    pub updated: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManoErasure {
    pub ns_instance_id: String,
    /// Where in the request it was asked for.
    pub requested_in: String,
    pub op_occ_id: Option<String>,
    /// PENDING, COMPLETED or FAILED (from the operation occurrence).
    pub state: String,
}

/// Where the SM asks NFV-MANO to erase (IFA 033 Sc-Or.SecEnforce.003 last option): the
/// `additionalParams` of the `terminateVnfData` entry in the REMOVE_VNF UpdateNsRequest.
pub const ERASURE_PARAM: &str = "etsiNfvSecurityErasure";

/// The SM's shared state.
pub struct Sm {
    pub config: SmConfig,
    pub nfvo: Arc<Nfvo>,
    pub store: Arc<Store>,
    pub journal: GroupCommit,
    pub backends: Backends,
    pub intake: intake::Intake,
    /// The callback URI given to the NFVO (with the announced mode).
    pub callback_uri: String,
    wake: tokio::sync::mpsc::UnboundedSender<Wake>,
    wake_rx: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Wake>>>,
    running: std::sync::Mutex<BTreeSet<String>>,
    /// Held by each local erasure from listing the keys to the commit: an action's erasure
    /// step and an erasure on a notification's evidence may come together for one VNF; the
    /// second then finds the keys gone rather than failing to destroy them.
    erasing: tokio::sync::Mutex<()>,
    /// The id of this SM's subscription, once known (from the store at start, then from the
    /// NFVO).
    subscription: std::sync::Mutex<Option<String>>,
    /// Notification bodies waiting in the processor's queue (bounded by [`QUEUED_BODIES`]).
    queued_bodies: std::sync::atomic::AtomicUsize,
    /// The Sc-Vi AMQP consumer's health.
    pub telemetry: telemetry::ConsumerStatus,
    /// Signalled when a trusted Sc-Vi event was journaled: the VIM view is re-read by query.
    pub vim_changed: tokio::sync::Notify,
    /// The VIM (Sc-Vi), when `[sm.vim]` is configured.
    pub vim: Option<crate::vim::SharedVimLink>,
    /// The CMF of this agent, when it runs one: a VNF's erasure revokes its certificates.
    pub(crate) cmf: std::sync::OnceLock<Arc<crate::cmf::Cmf>>,
}

/// Notification bodies held in memory for the processor at most; beyond that the journal
/// holds them and only keys are queued (memory stays bounded under sustained intake).
pub const QUEUED_BODIES: usize = 1024;

/// A notification to process.
#[derive(Debug)]
pub struct Pending {
    pub key: String,
    pub body: Option<Arc<Value>>,
    /// `true` once journaled as new; `false` (or dropped) for a duplicate or a failed commit.
    pub durable: Option<tokio::sync::oneshot::Receiver<bool>>,
}

impl Pending {
    pub fn stored(key: String) -> Pending {
        Pending {
            key,
            body: None,
            durable: None,
        }
    }
}

/// Notifications processed together at most (one Query NS, one commit).
pub(crate) const BATCH: usize = 256;

/// Work for the processor task.
#[derive(Debug)]
pub enum Wake {
    /// A notification for this `sm_pending` key: its body (so the processor need not read it
    /// back) and, for one arriving now, whether it turned out durable and new.
    Notification(Pending),
    /// Reconcile with the NFVO now; report the outcome if asked.
    Reconcile(Option<tokio::sync::oneshot::Sender<Result<(), String>>>),
}

#[derive(Debug, thiserror::Error)]
pub enum SmError {
    #[error(transparent)]
    Nfvo(#[from] NfvoError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("reconciliation: {0}")]
    Reconcile(String),
    #[error(transparent)]
    Vim(crate::vim::VimError),
}

impl SmError {
    /// The HTTP status for the admin API.
    pub fn status(&self) -> u16 {
        match self {
            SmError::Nfvo(e) if e.status().is_some() => 502,
            SmError::Nfvo(_) => 503,
            // The store refusing commits (a full disk) is an outage, not a fault of the call.
            SmError::Store(_) => 503,
            SmError::Refused(_) => 403,
            SmError::NotFound(_) => 404,
            SmError::Invalid(_) => 422,
            SmError::Reconcile(_) => 502,
            SmError::Vim(e) if e.status().is_some() => 502,
            SmError::Vim(_) => 503,
        }
    }
}

impl Sm {
    /// Build the SM from the configuration. Nothing is sent yet: see [`Sm::start`].
    pub fn new(
        config: &Config,
        backends: &Backends,
        store: Arc<Store>,
        listen: std::net::SocketAddr,
    ) -> Result<Arc<Sm>, String> {
        let sm = config
            .sm
            .clone()
            .ok_or_else(|| "config: no [sm] section".to_string())?;
        let nfvo = Nfvo::new(&sm.nfvo, backends).map_err(|e| format!("sm.nfvo: {e}"))?;
        let journal = store
            .group_commit(sm.group_commit_max.max(1))
            .map_err(|e| format!("store: {e}"))?;
        let mut intake = intake::Intake::new(&sm).map_err(|e| format!("sm.notifications: {e}"))?;
        // The token key: made once, kept in the store, so tokens outlive a restart.
        let key = store
            .write(|tx| {
                if let Some(key) = tx.get(&TOKEN_KEY, "hmac-sha256")? {
                    return Ok(Ok(key));
                }
                let key = match intake::new_token_key() {
                    Ok(k) => hex::encode(k),
                    Err(e) => return Ok(Err(e)),
                };
                tx.put(&TOKEN_KEY, "hmac-sha256", &key)?;
                Ok(Ok(key))
            })
            .map_err(|e| format!("store: {e}"))?
            .and_then(|k| hex::decode(k).map_err(|e| format!("sm_token_key: {e}")))?;
        intake.set_token_key(&key);
        let subscription = store
            .read(|tx| tx.get(&SUBSCRIPTION, "id"))
            .map_err(|e| format!("store: {e}"))?;
        let base = sm
            .callback_uri
            .clone()
            .unwrap_or_else(|| format!("https://{listen}/sm/v1/notifications"));
        // IFA 033 Sc-Or.NsLcm.008: the mode is announced to the NFVO with every subscription.
        let separator = if base.contains('?') { '&' } else { '?' };
        let callback_uri = format!("{base}{separator}sm={}&mode={}", sm.name, sm.mode);
        let (wake, wake_rx) = tokio::sync::mpsc::unbounded_channel();
        let vim = sm
            .vim
            .clone()
            .map(|v| Arc::new(crate::vim::VimLink::new(v, Some(backends.clone()))));
        Ok(Arc::new(Sm {
            vim,
            config: sm,
            nfvo: Arc::new(nfvo),
            store,
            journal,
            backends: backends.clone(),
            intake,
            callback_uri,
            wake,
            wake_rx: std::sync::Mutex::new(Some(wake_rx)),
            running: std::sync::Mutex::new(BTreeSet::new()),
            erasing: tokio::sync::Mutex::new(()),
            queued_bodies: std::sync::atomic::AtomicUsize::new(0),
            subscription: std::sync::Mutex::new(subscription),
            telemetry: telemetry::ConsumerStatus::default(),
            vim_changed: tokio::sync::Notify::new(),
            cmf: std::sync::OnceLock::new(),
        }))
    }

    /// The CMF of this agent: from now on a VNF's local erasure also revokes the
    /// certificates issued for it (once; a second call is ignored).
    pub fn attach_cmf(&self, cmf: Arc<crate::cmf::Cmf>) {
        let _ = self.cmf.set(cmf);
    }

    pub fn mode(&self) -> SmMode {
        self.config.mode
    }

    /// Start the background work, once the callback endpoint is up: discover API versions,
    /// create or reconcile the subscription, resume unfinished actions, process journaled
    /// notifications, reconcile periodically.
    pub fn start(self: &Arc<Self>) {
        let Some(mut wake_rx) = self
            .wake_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        self.start_telemetry();
        self.start_vim_reconciliation();
        let sm = self.clone();
        tokio::spawn(async move {
            sm.connect_until_subscribed().await;
            sm.resume_actions().await;
            // The first reconciliation also processes what was journaled before a restart.
            let _ = sm.wake.send(Wake::Reconcile(None));
            let period = Duration::from_secs(sm.config.reconcile_seconds.max(1));
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            loop {
                tokio::select! {
                    wake = wake_rx.recv() => match wake {
                        Some(Wake::Notification(first)) => {
                            // Whatever else is already waiting joins this batch.
                            sm.dequeued(&first);
                            let mut batch = vec![first];
                            let mut reconciles = Vec::new();
                            while batch.len() < BATCH {
                                match wake_rx.try_recv() {
                                    Ok(Wake::Notification(next)) => {
                                        sm.dequeued(&next);
                                        batch.push(next)
                                    }
                                    Ok(Wake::Reconcile(reply)) => reconciles.push(reply),
                                    Err(_) => break,
                                }
                            }
                            sm.process_batch(batch).await;
                            for reply in reconciles {
                                sm.reconcile_reply(reply).await;
                            }
                        }
                        Some(Wake::Reconcile(reply)) => sm.reconcile_reply(reply).await,
                        None => break,
                    },
                    _ = tick.tick() => sm.reconcile_reply(None).await,
                }
            }
        });
    }

    /// Reconcile now, in the processor task (so nothing is processed twice at once), and
    /// wait for the outcome.
    pub async fn reconcile_now(&self) -> Result<(), SmError> {
        let (reply, outcome) = tokio::sync::oneshot::channel();
        self.wake
            .send(Wake::Reconcile(Some(reply)))
            .map_err(|_| SmError::Invalid("the SM processor is not running".into()))?;
        outcome
            .await
            .map_err(|_| SmError::Invalid("the SM processor stopped".into()))?
            .map_err(SmError::Reconcile)
    }

    async fn reconcile_reply(
        self: &Arc<Self>,
        reply: Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
    ) {
        let outcome = self.reconcile().await.map_err(|e| e.to_string());
        if let Err(e) = &outcome {
            tracing::warn!(error = %e, "reconciliation with the NFVO failed");
        }
        if let Some(reply) = reply {
            let _ = reply.send(outcome);
        }
    }

    /// Hand a notification being journaled to the processor with its body; send `true` on
    /// the returned channel once it is durable and new. `None` when [`QUEUED_BODIES`] bodies
    /// wait already: then the durable journal is the queue, and the caller hands over only
    /// the key once it is committed ([`Sm::notify_stored`]).
    pub fn notify_received(
        &self,
        key: String,
        body: Arc<Value>,
    ) -> Option<tokio::sync::oneshot::Sender<bool>> {
        use std::sync::atomic::Ordering;
        if self.queued_bodies.fetch_add(1, Ordering::AcqRel) >= QUEUED_BODIES {
            self.queued_bodies.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let (durable, receiver) = tokio::sync::oneshot::channel();
        let _ = self.wake.send(Wake::Notification(Pending {
            key,
            body: Some(body),
            durable: Some(receiver),
        }));
        Some(durable)
    }

    /// Hand over a notification already committed to the journal, by key only (the
    /// processor reads its body back).
    pub fn notify_stored(&self, key: String) {
        let _ = self.wake.send(Wake::Notification(Pending::stored(key)));
    }

    /// The processor took a notification off the queue.
    fn dequeued(&self, pending: &Pending) {
        if pending.body.is_some() {
            self.queued_bodies
                .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        }
    }

    async fn connect_until_subscribed(self: &Arc<Self>) {
        let mut wait = Duration::from_millis(200);
        loop {
            let outcome = async {
                let versions = self.nfvo.discover_versions().await?;
                tracing::info!(nslcm = %versions.0, vnfpkgm = %versions.1, "NFVO API versions");
                self.reconcile_subscription().await
            }
            .await;
            match outcome {
                Ok(id) => {
                    tracing::info!(subscription = %id, mode = %self.mode(), "subscribed to NS LCM notifications");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "NFVO not ready");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    /// IFA 033 6.2, SOL 005 6.4.16: keep exactly one subscription with our callback URI
    /// (and so our mode); delete ours that point elsewhere (an older mode or address).
    pub async fn reconcile_subscription(&self) -> Result<String, SmError> {
        // Every page: a subscription of ours on a later page must not be created twice.
        let existing: Vec<crate::sol::LccnSubscription> = self
            .nfvo
            .get_list(Interface::NsLcm, Api::NsLcm, "/subscriptions")
            .await?;
        let ours_prefix = format!("sm={}&", self.config.name);
        let mut keep = None;
        for sub in &existing {
            let (id, uri) = (sub.id.as_str(), sub.callback_uri.as_str());
            if uri == self.callback_uri && keep.is_none() {
                keep = Some(id.to_string());
            } else if uri.contains(&ours_prefix) {
                tracing::info!(
                    subscription = id,
                    callback = uri,
                    "deleting a stale subscription of this SM"
                );
                self.delete_subscription(id).await?;
            }
        }
        let id = match keep {
            Some(id) => id,
            None => self.subscribe().await?,
        };
        self.remember_subscription(&id).await?;
        Ok(id)
    }

    /// Keep `id` as this SM's only subscription (durably, for the next start).
    async fn remember_subscription(&self, id: &str) -> Result<(), SmError> {
        let known = self
            .subscription
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if known.as_deref() == Some(id) {
            return Ok(());
        }
        let id_owned = id.to_string();
        self.journal
            .write_async(move |tx| tx.put(&SUBSCRIPTION, "id", &id_owned))
            .await?;
        *self.subscription.lock().unwrap_or_else(|p| p.into_inner()) = Some(id.to_string());
        Ok(())
    }

    /// Whether a notification for `subscription_id` is for this SM: its subscription, or
    /// any while none is known yet (before the first subscription).
    pub fn is_own_subscription(&self, subscription_id: &str) -> bool {
        self.subscription
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_deref()
            .is_none_or(|id| id == subscription_id)
    }

    /// `POST /subscriptions`: 201 created, 303 exists already, 422 the NFVO's test GET failed.
    pub async fn subscribe(&self) -> Result<String, SmError> {
        let mut authentication = self.intake.subscription_authentication()?;
        if let Some(params) = authentication.get_mut("paramsOauth2ClientCredentials") {
            // The agent is the authorization server for its own callback endpoint.
            params["tokenEndpoint"] = json!(self.token_endpoint());
        }
        let request = json!({
            "callbackUri": self.callback_uri,
            "authentication": authentication,
            "verbosity": "FULL",
        });
        let response = self
            .nfvo
            .call(nfvo::Request {
                interface: Interface::NsLcm,
                api: Api::NsLcm,
                method: "POST",
                path: "/subscriptions",
                body: Some(("application/json", request.to_string().into_bytes())),
                repeat: nfvo::Repeat::Idempotent,
            })
            .await?;
        let id = match response.status {
            201 => response
                .json()
                .ok()
                .and_then(|v| v["id"].as_str().map(String::from))
                .or_else(|| nfvo::location_id(&response)),
            303 => nfvo::location_id(&response),
            other => {
                return Err(SmError::Invalid(format!(
                    "POST /subscriptions answered {other}"
                )))
            }
        }
        .ok_or_else(|| SmError::Invalid("subscription: no id in the answer".into()))?;
        self.audit(
            "sm.subscribe",
            &id,
            json!({ "callbackUri": self.callback_uri, "status": response.status }),
        )
        .await?;
        Ok(id)
    }

    /// `https://<callback authority>/sm/v1/oauth2/token`.
    pub fn token_endpoint(&self) -> String {
        let rest = self.callback_uri.trim_start_matches("https://");
        let authority = rest.split(['/', '?']).next().unwrap_or(rest);
        format!("https://{authority}/sm/v1/oauth2/token")
    }

    pub async fn delete_subscription(&self, id: &str) -> Result<(), SmError> {
        let path = format!("/subscriptions/{}", path_segment(id)?);
        match self
            .nfvo
            .call(nfvo::Request {
                interface: Interface::NsLcm,
                api: Api::NsLcm,
                method: "DELETE",
                path: &path,
                body: None,
                repeat: nfvo::Repeat::Idempotent,
            })
            .await
        {
            Ok(_) => {}
            Err(e) if e.status() == Some(404) => {}
            Err(e) => return Err(e.into()),
        }
        self.audit("sm.unsubscribe", id, Value::Null).await
    }

    /// The NFVO's subscriptions, every page, as it sent them.
    pub async fn subscriptions(&self) -> Result<Value, SmError> {
        let all: Vec<Value> = self
            .nfvo
            .get_list(Interface::NsLcm, Api::NsLcm, "/subscriptions")
            .await?;
        Ok(Value::Array(all))
    }

    /// Write one audit event (its own durable commit).
    pub async fn audit(&self, action: &str, subject: &str, detail: Value) -> Result<(), SmError> {
        let event = crate::store::AuditEvent::new("warden-sm", action, subject).with_detail(detail);
        self.journal
            .write_async(move |tx| {
                tx.audit(event);
                Ok(())
            })
            .await?;
        Ok(())
    }

    /// A read on a blocking thread.
    pub async fn read<T, F>(&self, f: F) -> Result<T, SmError>
    where
        F: FnOnce(&crate::store::ReadTx) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.read(f))
            .await
            .map_err(|e| {
                SmError::Store(StoreError::rejected(std::io::Error::other(e.to_string())))
            })?
            .map_err(SmError::Store)
    }

    pub async fn action(&self, id: &str) -> Result<Option<Action>, SmError> {
        let id = id.to_string();
        self.read(move |tx| tx.get(&ACTIONS, &id)).await
    }

    pub async fn actions(&self) -> Result<Vec<Action>, SmError> {
        self.read(|tx| {
            tx.list(&ACTIONS, "")
                .map(|v| v.into_iter().map(|(_, a)| a).collect())
        })
        .await
    }

    /// Journal sizes: notifications kept, pending, processed.
    pub async fn journal_counts(&self) -> Result<Value, SmError> {
        self.read(|tx| {
            Ok(json!({
                "notifications": tx.count(&NOTIFICATIONS)?,
                "pending": tx.count(&PENDING)?,
                "processed": tx.count(&PROCESSED)?,
            }))
        })
        .await
    }

    /// Drop processed notifications older than the retention, oldest first, a bounded
    /// number per call. Returns how many were dropped.
    pub async fn prune_journal(&self) -> Result<usize, SmError> {
        let retention = Duration::from_secs(self.config.journal_retention_hours * 3600);
        let cutoff = std::time::SystemTime::now()
            .checked_sub(retention)
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        // Keys are `{nanos:024}:{id}` (intake::pending_key).
        let below = format!("{cutoff:024}:");
        let keys = self
            .read(move |tx| tx.keys_below(&PROCESSED, &below, 10_000))
            .await?;
        if keys.is_empty() {
            return Ok(0);
        }
        let count = keys.len();
        self.journal
            .write_async(move |tx| {
                for key in &keys {
                    if let Some((_, id)) = key.split_once(':') {
                        tx.delete(&NOTIFICATIONS, id)?;
                    }
                    tx.delete(&PROCESSED, key)?;
                }
                tx.audit(
                    crate::store::AuditEvent::new(
                        "warden-sm",
                        "sm.journal.prune",
                        format!("{count} notifications"),
                    )
                    .with_detail(json!({ "oldest": keys.first(), "newest": keys.last() })),
                );
                Ok(())
            })
            .await?;
        Ok(count)
    }

    pub async fn erasure_report(&self, vnf: &str) -> Result<Option<ErasureReport>, SmError> {
        let vnf = vnf.to_string();
        self.read(move |tx| tx.get(&ERASURES, &vnf)).await
    }

    /// Mark an action as being driven by a task; false if one already is.
    fn claim(&self, id: &str) -> bool {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string())
    }

    fn release(&self, id: &str) {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// VNFs with an action in progress: their changes are expected.
    pub fn busy_vnfs(&self) -> BTreeSet<String> {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(|id| id.split_once(':').map(|(_, vnf)| vnf.to_string()))
            .collect()
    }
}

/// A path segment from outside: refuse anything that would change the path.
pub fn path_segment(id: &str) -> Result<&str, SmError> {
    if id.is_empty()
        || id.len() > 256
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
    {
        return Err(SmError::Invalid(format!(
            "'{id}' is not a valid identifier"
        )));
    }
    Ok(id)
}

/// The rule event names as written in TOML.
pub fn event_name(event: RuleEvent) -> &'static str {
    match event {
        RuleEvent::UnauthorizedChange => "unauthorized_change",
        RuleEvent::PackageChecksumMismatch => "package_checksum_mismatch",
        RuleEvent::PackageUnknown => "package_unknown",
        RuleEvent::PackageDisabled => "package_disabled",
        RuleEvent::TopologyChange => "topology_change",
    }
}

pub fn now() -> String {
    crate::keys::rfc3339_now()
}
