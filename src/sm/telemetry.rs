//! Sc-Vi notifications (IFA 033 clause 8.2, Sc-Vi.Telem.001) and their security
//! (Security.005).
//!
//! The VIM (OpenStack) publishes oslo.messaging notifications on its RabbitMQ: Nova's
//! versioned ones (exchange `nova`, `versioned_notifications.info`), Neutron's and Cinder's
//! legacy ones (`neutron` and `openstack` exchanges, `notifications.info`). The SM consumes
//! them from a queue of its own:
//!
//! - **durable** by default: the queue outlives the SM, so what is published while it is
//!   down (a crash, an upgrade) waits for it; `durable_queue = false` makes it auto-delete
//!   (nothing kept while down; the periodic reconciliation by query then covers the gap).
//! - **manual acknowledgements after the durable journal**: a batch of deliveries is
//!   journaled in one commit (the group commit of [`crate::store::GroupCommit`], as the
//!   Sc-Or intake does) and only then acknowledged (`multiple`); a failed commit
//!   re-queues the batch. A crash between commit and ack redelivers: the message id dedupes.
//! - **reconnect with backoff**: a lost connection (broker restart, `rabbitmqctl
//!   close_connection`) is re-established, the queue and bindings declared again.
//! - **trusted time**: each message's own timestamp is compared with the local clock; out
//!   of `clock_bound_seconds` it is journaled as suspect and not acted upon.
//!
//! Nothing here enforces anything. oslo.messaging notifications are not signed: anyone with
//! credentials on that RabbitMQ (every OpenStack service has them) can publish one. So an
//! event only makes the SM re-read the VIM by query (see [`super::hosts`]), never acts by
//! itself.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::Digest;

use super::{now, Sm, SmError};
use crate::config::{AmqpConfig, TelemetryConfig};
use crate::store::Table;

/// Journaled Sc-Vi events by `<received>|<message id>` (time order, for listing and pruning).
pub const VI_EVENTS: Table<ViEvent> = Table::new("sm_vi_events");
/// Message id -> its `sm_vi_events` key: the dedupe index.
pub const VI_SEEN: Table<String> = Table::new("sm_vi_seen");
/// The VIM as last read by query, by host: its nova-compute service and its servers.
pub const VI_HOSTS: Table<ViHost> = Table::new("sm_vi_hosts");

/// One compute host as the last reconciliation read it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ViHost {
    /// `enabled` / `disabled`.
    pub status: String,
    /// `up` / `down`.
    pub state: String,
    #[serde(default)]
    pub disabled_reason: Option<String>,
    /// Server ids on the host.
    pub servers: std::collections::BTreeSet<String>,
}

/// One VIM notification as journaled.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ViEvent {
    /// oslo.messaging `message_id` (else the AMQP message id, else SHA-256 of the body).
    pub message_id: String,
    /// `nova`, `neutron`, `cinder`, `aodh`, ... (from the publisher).
    pub source: String,
    pub event_type: String,
    /// The IFA 005/006 notification interface it belongs to (README table), if any.
    pub interface: Option<String>,
    pub publisher_id: String,
    /// The message's own timestamp (RFC 3339), as the publisher stated it.
    pub timestamp: Option<String>,
    /// When it was journaled here (RFC 3339).
    pub received: String,
    /// Why it is not trusted (clock bound, unparsable): journaled, never acted upon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspect: Option<String>,
    /// The resource it is about: server, port, volume, service, alarm id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_id: Option<String>,
    /// The compute host it names, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The resource's state or status after the event, if given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// AMQP exchange and routing key it came through (or `webhook`).
    pub via: String,
}

/// The consumer's health, for `sm status`.
#[derive(Default)]
pub struct ConsumerStatus {
    /// Connections established so far (a reconnection increments it).
    pub connections: AtomicU64,
    pub journaled: AtomicU64,
    pub duplicates: AtomicU64,
    pub suspect: AtomicU64,
    pub connected: std::sync::atomic::AtomicBool,
    pub last_error: std::sync::Mutex<Option<String>>,
}

impl ConsumerStatus {
    pub fn to_json(&self) -> Value {
        json!({
            "connected": self.connected.load(Ordering::Relaxed),
            "connections": self.connections.load(Ordering::Relaxed),
            "journaled": self.journaled.load(Ordering::Relaxed),
            "duplicates": self.duplicates.load(Ordering::Relaxed),
            "suspect": self.suspect.load(Ordering::Relaxed),
            "lastError": self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("AMQP {what}: {source}")]
    Amqp {
        what: String,
        #[source]
        source: lapin::Error,
    },
    #[error("AMQP password: {0}")]
    Secret(String),
    #[error("AMQP CA {path}: {source}")]
    Ca {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("journaling Sc-Vi events: {0}")]
    Journal(#[from] crate::store::StoreError),
    #[error("the AMQP consumer was cancelled by the broker")]
    Cancelled,
}

fn amqp(what: impl Into<String>) -> impl FnOnce(lapin::Error) -> TelemetryError {
    let what = what.into();
    move |source| TelemetryError::Amqp { what, source }
}

/// The first wait before reconnecting; doubled up to [`RECONNECT_MAX`].
const RECONNECT_FIRST: Duration = Duration::from_millis(500);
const RECONNECT_MAX: Duration = Duration::from_secs(30);

impl Sm {
    /// Start the AMQP consumer, if configured (`[sm.telemetry.amqp]`).
    pub(crate) fn start_telemetry(self: &Arc<Self>) {
        let Some(telemetry) = self.config.telemetry.clone() else {
            return;
        };
        let Some(amqp) = telemetry.amqp.clone() else {
            return;
        };
        let sm = self.clone();
        tokio::spawn(async move {
            let mut wait = RECONNECT_FIRST;
            loop {
                let before = sm.telemetry.connections.load(Ordering::Relaxed);
                let outcome = sm.consume(&telemetry, &amqp).await;
                if sm.telemetry.connections.load(Ordering::Relaxed) > before {
                    // It was connected: the ladder starts again from the first step.
                    wait = RECONNECT_FIRST;
                }
                sm.telemetry.connected.store(false, Ordering::Relaxed);
                let text = match outcome {
                    Ok(()) => "connection closed".to_string(),
                    Err(e) => crate::error::chain(&e),
                };
                tracing::warn!(error = %text, retry_in_ms = wait.as_millis() as u64, "Sc-Vi AMQP consumer stopped; reconnecting");
                *sm.telemetry
                    .last_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(text);
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(RECONNECT_MAX);
            }
        });
    }

    /// Reconciliation by query: on each trusted event (debounced) and every
    /// `reconcile_seconds`, the services and servers are re-read from the VIM and what
    /// changed per host is journaled and audited. Lost or forged messages do no harm: this
    /// view comes from the authenticated API, never from a message.
    pub(crate) fn start_vim_reconciliation(self: &Arc<Self>) {
        if self.config.vim.is_none() {
            return;
        }
        let sm = self.clone();
        tokio::spawn(async move {
            let period = Duration::from_secs(sm.config.reconcile_seconds.max(1));
            loop {
                if let Err(e) = sm.reconcile_vim().await {
                    tracing::warn!(error = %crate::error::chain(&e), "Sc-Vi reconciliation");
                }
                tokio::select! {
                    _ = sm.vim_changed.notified() => {
                        // Let a burst of events settle into one re-read.
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    _ = tokio::time::sleep(period) => {}
                }
            }
        });
    }

    /// Re-read services and servers; journal each host whose view changed.
    pub async fn reconcile_vim(&self) -> Result<usize, SmError> {
        let vim = self.vim_client().await?;
        let services = vim
            .get(
                crate::vim::Service::Compute,
                "/os-services?binary=nova-compute",
            )
            .await?;
        let servers = vim
            .get_all(
                crate::vim::Service::Compute,
                "/servers/detail?all_tenants=1",
                "servers",
            )
            .await?;
        let mut hosts: std::collections::BTreeMap<String, ViHost> = Default::default();
        for s in services["services"].as_array().into_iter().flatten() {
            let Some(host) = s["host"].as_str() else {
                continue;
            };
            hosts.insert(
                host.to_string(),
                ViHost {
                    status: s["status"].as_str().unwrap_or_default().to_string(),
                    state: s["state"].as_str().unwrap_or_default().to_string(),
                    disabled_reason: s["disabled_reason"].as_str().map(String::from),
                    servers: Default::default(),
                },
            );
        }
        for s in &servers {
            if let (Some(host), Some(id)) = (s["OS-EXT-SRV-ATTR:host"].as_str(), s["id"].as_str()) {
                hosts
                    .entry(host.to_string())
                    .or_default()
                    .servers
                    .insert(id.to_string());
            }
        }
        let changed = self
            .journal
            .write_async(move |tx| {
                let mut changed = 0;
                for (host, now) in &hosts {
                    let before = tx.get(&VI_HOSTS, host)?;
                    if before.as_ref() == Some(now) {
                        continue;
                    }
                    changed += 1;
                    tx.put(&VI_HOSTS, host, now)?;
                    tx.audit(
                        crate::store::AuditEvent::new("warden-sm", "sm.vi.host", host.clone())
                            .with_detail(json!({ "before": before, "now": now })),
                    );
                }
                Ok(changed)
            })
            .await?;
        Ok(changed)
    }

    /// One connection's life: connect, declare, consume until the connection ends.
    async fn consume(
        self: &Arc<Self>,
        telemetry: &TelemetryConfig,
        config: &AmqpConfig,
    ) -> Result<(), TelemetryError> {
        let uri = amqp_uri(config)?;
        let queue = self.queue_name(config);
        // Shown by `rabbitmqctl list_connections user_provided_name`: who holds which queue.
        let properties = ConnectionProperties::default()
            .with_connection_name(format!("warden-sm {} {queue}", self.config.name).into());
        let connection = match &config.ca {
            Some(path) => {
                let pem = std::fs::read_to_string(path).map_err(|source| TelemetryError::Ca {
                    path: path.display().to_string(),
                    source,
                })?;
                let tls = lapin::tcp::OwnedTLSConfig {
                    identity: None,
                    cert_chain: Some(pem),
                };
                Connection::connect_with_config(
                    uri.expose_secret(),
                    properties,
                    tls,
                    lapin::runtime::default_runtime().map_err(amqp("runtime"))?,
                )
                .await
            }
            None => Connection::connect(uri.expose_secret(), properties).await,
        }
        .map_err(amqp(format!("connect {}", config.url)))?;
        let channel = connection.create_channel().await.map_err(amqp("channel"))?;
        channel
            .basic_qos(config.prefetch.max(1), BasicQosOptions::default())
            .await
            .map_err(amqp("basic.qos"))?;
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: config.durable_queue,
                    auto_delete: !config.durable_queue,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(amqp(format!("queue.declare {queue}")))?;
        for binding in &config.bindings {
            self.ensure_exchange(&connection, &binding.exchange, config.durable_exchanges)
                .await?;
            channel
                .queue_bind(
                    queue.as_str().into(),
                    binding.exchange.as_str().into(),
                    binding.routing_key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(amqp(format!(
                    "queue.bind {queue} {} {}",
                    binding.exchange, binding.routing_key
                )))?;
        }
        let mut consumer = channel
            .basic_consume(
                queue.as_str().into(),
                format!("warden-sm-{}", std::process::id()).into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(amqp("basic.consume"))?;
        self.telemetry.connections.fetch_add(1, Ordering::Relaxed);
        self.telemetry.connected.store(true, Ordering::Relaxed);
        tracing::info!(queue = %queue, "Sc-Vi AMQP consumer connected");
        let bound = Duration::from_secs(telemetry.clock_bound_seconds);
        while let Some(first) = consumer.next().await {
            let first = first.map_err(amqp("delivery"))?;
            let mut batch = vec![first];
            // Whatever has already arrived joins this batch: one commit for all of it.
            while batch.len() < usize::from(config.prefetch.max(1)) {
                match futures_lite::future::poll_once(consumer.next()).await {
                    Some(Some(Ok(next))) => batch.push(next),
                    Some(Some(Err(e))) => return Err(amqp("delivery")(e)),
                    _ => break,
                }
            }
            let received = now();
            let events: Vec<ViEvent> = batch
                .iter()
                .map(|d| {
                    parse_delivery(
                        &d.data,
                        d.properties.message_id().as_ref().map(|m| m.as_str()),
                        &format!("{} {}", d.exchange, d.routing_key),
                        &received,
                        bound,
                        config.max_message_bytes,
                    )
                })
                .collect();
            let last = batch.last().map(|d| d.delivery_tag).unwrap_or_default();
            match self.journal_events(events, telemetry.keep_events).await {
                Ok(fresh) => {
                    channel
                        .basic_ack(last, BasicAckOptions { multiple: true })
                        .await
                        .map_err(amqp("basic.ack"))?;
                    if fresh > 0 {
                        self.vim_changed.notify_one();
                    }
                }
                Err(e) => {
                    // Not durable: back to the queue, acknowledged only once journaled.
                    let _ = channel
                        .basic_nack(
                            last,
                            BasicNackOptions {
                                multiple: true,
                                requeue: true,
                            },
                        )
                        .await;
                    return Err(e);
                }
            }
        }
        Err(TelemetryError::Cancelled)
    }

    fn queue_name(&self, config: &AmqpConfig) -> String {
        config
            .queue
            .clone()
            .unwrap_or_else(|| format!("warden-sm-{}", self.config.name))
    }

    /// The exchange exists (passive check on a channel of its own, which the broker closes
    /// on a miss), or is declared as oslo.messaging declares it: a topic exchange.
    async fn ensure_exchange(
        &self,
        connection: &Connection,
        exchange: &str,
        durable: bool,
    ) -> Result<(), TelemetryError> {
        let probe = connection.create_channel().await.map_err(amqp("channel"))?;
        let exists = probe
            .exchange_declare(
                exchange.into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    passive: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .is_ok();
        if exists {
            let _ = probe.close(200, "ok".into()).await;
            return Ok(());
        }
        let channel = connection.create_channel().await.map_err(amqp("channel"))?;
        channel
            .exchange_declare(
                exchange.into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(amqp(format!("exchange.declare {exchange}")))?;
        let _ = channel.close(200, "ok".into()).await;
        Ok(())
    }

    /// Journal new events (dedupe by message id) in one commit, each with its audit entry
    /// (the store's hash chain: integrity of what was received). Returns how many were new
    /// and trusted.
    pub(crate) async fn journal_events(
        &self,
        events: Vec<ViEvent>,
        keep: usize,
    ) -> Result<usize, TelemetryError> {
        let (fresh, trusted, duplicates, suspect) = self
            .journal
            .write_async(move |tx| {
                let (mut fresh, mut trusted, mut duplicates, mut suspect) = (0, 0, 0, 0);
                for event in events {
                    if tx.contains(&VI_SEEN, &event.message_id)? {
                        duplicates += 1;
                        continue;
                    }
                    let key = format!("{}|{}", event.received, event.message_id);
                    tx.put(&VI_SEEN, &event.message_id, &key)?;
                    tx.put(&VI_EVENTS, &key, &event)?;
                    let verb = if event.suspect.is_some() {
                        suspect += 1;
                        "sm.vi.event.suspect"
                    } else {
                        trusted += 1;
                        "sm.vi.event"
                    };
                    fresh += 1;
                    tx.audit(
                        crate::store::AuditEvent::new("warden-sm", verb, event.message_id.clone())
                            .with_detail(json!(event)),
                    );
                }
                Ok((fresh, trusted, duplicates, suspect))
            })
            .await?;
        let _ = fresh;
        self.telemetry
            .journaled
            .fetch_add(trusted as u64 + suspect as u64, Ordering::Relaxed);
        self.telemetry
            .duplicates
            .fetch_add(duplicates as u64, Ordering::Relaxed);
        self.telemetry
            .suspect
            .fetch_add(suspect as u64, Ordering::Relaxed);
        if self.telemetry.journaled.load(Ordering::Relaxed) % 1024 == 0 {
            self.prune_vi_events(keep).await;
        }
        Ok(trusted)
    }

    /// Keep the newest `keep` events (and their dedupe entries).
    async fn prune_vi_events(&self, keep: usize) {
        let old = match self
            .read(move |tx| {
                let total = tx.count(&VI_EVENTS)? as usize;
                if total <= keep {
                    return Ok(Vec::new());
                }
                let mut old = Vec::new();
                tx.scan(&VI_EVENTS, None, |key, event: ViEvent| {
                    old.push((key.to_string(), event.message_id));
                    old.len() < total - keep
                })?;
                Ok(old)
            })
            .await
        {
            Ok(old) => old,
            Err(e) => {
                tracing::warn!(error = %e, "pruning Sc-Vi events");
                return;
            }
        };
        if old.is_empty() {
            return;
        }
        let outcome = self
            .journal
            .write_async(move |tx| {
                for (key, id) in &old {
                    tx.delete(&VI_EVENTS, key)?;
                    tx.delete(&VI_SEEN, id)?;
                }
                Ok(())
            })
            .await;
        if let Err(e) = outcome {
            tracing::warn!(error = %e, "pruning Sc-Vi events");
        }
    }

    /// The newest `limit` journaled Sc-Vi events, oldest first.
    pub async fn vi_events(&self, limit: usize) -> Result<Vec<ViEvent>, SmError> {
        let mut all: Vec<ViEvent> = self
            .read(|tx| tx.list(&VI_EVENTS, ""))
            .await?
            .into_iter()
            .map(|(_, e)| e)
            .collect();
        let skip = all.len().saturating_sub(limit);
        all.drain(..skip);
        Ok(all)
    }

    /// HTTP basic authentication of the Aodh webhook (constant-time comparison).
    pub fn aodh_authenticate(&self, authorization: Option<&str>) -> Result<(), String> {
        let Some(aodh) = self.config.telemetry.as_ref().and_then(|t| t.aodh.as_ref()) else {
            return Err("the Aodh webhook is not configured ([sm.telemetry.aodh])".into());
        };
        let secret = aodh
            .secret
            .read()
            .map_err(|e| format!("the webhook secret cannot be read: {e}"))?;
        let given = authorization
            .and_then(|a| a.strip_prefix("Basic "))
            .and_then(|b| {
                base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b.trim()).ok()
            })
            .ok_or_else(|| "HTTP basic authentication required".to_string())?;
        let expected = format!("{}:{}", aodh.user, secret.expose_secret());
        // Digests of equal length, compared without an early exit: no timing oracle on the
        // password's prefix.
        let (a, b) = (
            sha2::Sha256::digest(&given),
            sha2::Sha256::digest(expected.as_bytes()),
        );
        if a.iter()
            .zip(b.iter())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            != 0
        {
            return Err("wrong user or password".into());
        }
        Ok(())
    }

    /// An Aodh `alarm.state_transition` posted to the webhook (already authenticated):
    /// journaled like an AMQP event.
    pub async fn aodh_alarm(&self, body: &[u8]) -> Result<ViEvent, SmError> {
        let Some(telemetry) = self.config.telemetry.as_ref() else {
            return Err(SmError::NotFound("no [sm.telemetry] configured".into()));
        };
        let alarm: Value = serde_json::from_slice(body)
            .map_err(|e| SmError::Invalid(format!("an Aodh alarm must be JSON: {e}")))?;
        let id = alarm["alarm_id"]
            .as_str()
            .ok_or_else(|| SmError::Invalid("an Aodh alarm needs alarm_id".into()))?;
        let current = alarm["current"].as_str().unwrap_or_default();
        // Aodh sends no message id; one transition of one alarm is one event. Its timestamp is
        // in `reason_data` only for some evaluators: the receipt time is what is checked.
        let digest = hex::encode(sha2::Sha256::digest(body));
        let received = now();
        let event = ViEvent {
            message_id: format!("aodh:{id}:{current}:{}", &digest[..16]),
            source: "aodh".into(),
            event_type: "alarm.state_transition".into(),
            interface: interface_of("alarm.state_transition").map(String::from),
            publisher_id: "aodh".into(),
            timestamp: None,
            received,
            suspect: None,
            resource_id: Some(id.to_string()),
            host: None,
            state: Some(current.to_string()),
            via: "webhook".into(),
        };
        self.journal_events(vec![event.clone()], telemetry.keep_events)
            .await
            .map_err(|e| match e {
                TelemetryError::Journal(e) => SmError::Store(e),
                other => SmError::Invalid(other.to_string()),
            })?;
        self.vim_changed.notify_one();
        Ok(event)
    }
}

/// The connection URI with the credentials from their file (never in the config).
fn amqp_uri(config: &AmqpConfig) -> Result<secrecy::SecretString, TelemetryError> {
    let password = config.password.read().map_err(TelemetryError::Secret)?;
    let (scheme, rest) = config
        .url
        .split_once("://")
        .ok_or_else(|| TelemetryError::Secret(format!("{} is not an amqp:// URL", config.url)))?;
    if rest.contains('@') {
        return Err(TelemetryError::Secret(
            "the AMQP url must not carry credentials (user and password are their own keys)".into(),
        ));
    }
    // RFC-style AMQP URIs give the vhost as the path, and an empty path is the empty vhost;
    // an URL ending at the authority (or with a bare "/") means RabbitMQ's default "/", as
    // oslo.messaging's transport_url does.
    let rest = match rest.split_once('/') {
        None => format!("{rest}/%2f"),
        Some((authority, "")) => format!("{authority}/%2f"),
        Some(_) => rest.to_string(),
    };
    let enc = |s: &str| {
        percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    Ok(format!(
        "{scheme}://{}:{}@{rest}",
        enc(&config.user),
        enc(password.expose_secret())
    )
    .into())
}

/// The oslo.messaging envelope (`oslo.version` 2.0, `oslo.message` a JSON string) or a bare
/// notification, decoded into a journal entry. Never fails: what cannot be trusted is
/// journaled as suspect with the reason.
pub fn parse_delivery(
    data: &[u8],
    amqp_message_id: Option<&str>,
    via: &str,
    received: &str,
    bound: Duration,
    max_bytes: usize,
) -> ViEvent {
    let digest = hex::encode(sha2::Sha256::digest(data));
    let mut event = ViEvent {
        message_id: amqp_message_id
            .map(String::from)
            .unwrap_or_else(|| format!("sha256:{digest}")),
        source: String::new(),
        event_type: String::new(),
        interface: None,
        publisher_id: String::new(),
        timestamp: None,
        received: received.to_string(),
        suspect: None,
        resource_id: None,
        host: None,
        state: None,
        via: via.to_string(),
    };
    if data.len() > max_bytes {
        event.suspect = Some(format!("{} bytes, more than {max_bytes}", data.len()));
        return event;
    }
    let message = match decode_envelope(data) {
        Ok(m) => m,
        Err(why) => {
            event.suspect = Some(why);
            return event;
        }
    };
    if let Some(id) = message.message_id {
        event.message_id = id;
    }
    event.event_type = message.event_type;
    event.publisher_id = message.publisher_id;
    event.source = source_of(&event.publisher_id, &event.event_type);
    event.interface = interface_of(&event.event_type).map(String::from);
    let (resource, host, state) = subject_of(&event.event_type, &message.payload);
    event.resource_id = resource;
    event.host = host.or_else(|| {
        // `nova-compute:HOST`, `network.HOST`: the publisher names its host.
        event
            .publisher_id
            .split_once([':', '.'])
            .map(|(_, h)| h.to_string())
            .filter(|h| event.source == "nova" && !h.is_empty())
    });
    event.state = state;
    match message.timestamp.as_deref().map(parse_timestamp) {
        Some(Ok(stamp)) => {
            event.timestamp = Some(crate::keys::rfc3339(stamp));
            let skew = match SystemTime::now().duration_since(stamp) {
                Ok(d) => d,
                Err(e) => e.duration(),
            };
            if skew > bound {
                event.suspect = Some(format!(
                    "timestamp {} is {}s from the local clock (bound {}s)",
                    message.timestamp.unwrap_or_default(),
                    skew.as_secs(),
                    bound.as_secs()
                ));
            }
        }
        Some(Err(why)) => event.suspect = Some(why),
        None => event.suspect = Some("no timestamp".into()),
    }
    event
}

/// The notification inside the envelope.
#[derive(Deserialize)]
struct OsloMessage {
    #[serde(default)]
    message_id: Option<String>,
    #[serde(default)]
    publisher_id: String,
    event_type: String,
    #[serde(default)]
    timestamp: Option<String>,
    #[serde(default)]
    payload: Value,
}

fn decode_envelope(data: &[u8]) -> Result<OsloMessage, String> {
    let outer: Value = serde_json::from_slice(data).map_err(|e| format!("not JSON: {e}"))?;
    let inner = match (outer.get("oslo.version"), outer.get("oslo.message")) {
        (Some(version), Some(Value::String(text))) => {
            if version.as_str().is_none_or(|v| !v.starts_with("2.")) {
                return Err(format!("oslo.version {version} (2.x expected)"));
            }
            serde_json::from_str(text).map_err(|e| format!("oslo.message is not JSON: {e}"))?
        }
        (Some(_), _) => return Err("oslo.message missing or not a string".into()),
        // oslo.messaging without the envelope (rabbit driver before 2.0 of the format).
        (None, _) => outer,
    };
    serde_json::from_value(inner).map_err(|e| format!("not an oslo notification: {e}"))
}

/// oslo timestamps are naive UTC `YYYY-MM-DD HH:MM:SS.ffffff`.
fn parse_timestamp(text: &str) -> Result<SystemTime, String> {
    humantime::parse_rfc3339_weak(text.trim_end_matches('Z'))
        .map_err(|e| format!("timestamp {text:?}: {e}"))
}

fn source_of(publisher: &str, event_type: &str) -> String {
    let head = publisher.split([':', '.', '-']).next().unwrap_or_default();
    match head {
        "nova" | "compute" | "scheduler" | "conductor" => "nova".into(),
        "network" | "neutron" => "neutron".into(),
        "volume" | "cinder" | "scheduler_volume" => "cinder".into(),
        "image" | "glance" => "glance".into(),
        _ if event_type.starts_with("volume.") || event_type.starts_with("snapshot.") => {
            "cinder".into()
        }
        _ if event_type.starts_with("port.") || event_type.starts_with("network.") => {
            "neutron".into()
        }
        other => other.to_string(),
    }
}

/// Event type -> the IFA 005/006 notification interface of IFA 033 8.2 it is derived from
/// (the README's table). `None`: journaled, not mapped.
pub fn interface_of(event_type: &str) -> Option<&'static str> {
    let head = event_type.split('.').next().unwrap_or_default();
    Some(match head {
        "instance" => "IFA 006 7.3.2 Virtualised Compute Resources Change Notification",
        "service" | "aggregate" | "compute" | "compute_task" => {
            "IFA 005 7.11.1 Compute Host Capacity Management"
        }
        "flavor" | "image" | "keypair" | "server_group" => {
            "IFA 006 7.3.3 Virtualised Compute Resources Information Management"
        }
        "port"
        | "network"
        | "subnet"
        | "router"
        | "floatingip"
        | "security_group"
        | "security_group_rule"
        | "trunk" => "IFA 006 7.4.2 Virtualised Network Resources Change Notification",
        "volume" | "snapshot" | "backup" | "consistencygroup" | "group" => {
            "IFA 006 7.5.2 Virtualised Storage Resources Change Notification"
        }
        "capacity" => "IFA 005 7.5.4 Virtualised Storage Resources Capacity Management",
        "alarm" => "IFA 006 7.6 Virtualised Resources Fault Management",
        "quota" => "IFA 006 7.9.4 Virtualised Resources Quota Change Notification",
        _ => return None,
    })
}

/// (resource id, host, state) of the payload: Nova's versioned objects
/// (`nova_object.data`), Neutron's `{port: {...}}`, Cinder's flat payload.
fn subject_of(
    event_type: &str,
    payload: &Value,
) -> (Option<String>, Option<String>, Option<String>) {
    let text = |v: &Value| v.as_str().map(String::from);
    let data = payload.get("nova_object.data").unwrap_or(payload);
    let head = event_type.split('.').next().unwrap_or_default();
    match head {
        "instance" => (
            text(&data["uuid"]),
            text(&data["host"]),
            text(&data["state"]),
        ),
        "service" => (
            text(&data["uuid"]).or_else(|| text(&data["host"])),
            text(&data["host"]),
            data["disabled"].as_bool().map(|d| {
                if d {
                    format!(
                        "disabled: {}",
                        data["disabled_reason"].as_str().unwrap_or("")
                    )
                } else {
                    "enabled".into()
                }
            }),
        ),
        "port" | "network" | "subnet" | "router" | "floatingip" => {
            let object = payload.get(head).unwrap_or(payload);
            (
                text(&object["id"]).or_else(|| text(&payload[format!("{head}_id")])),
                text(&object["binding:host_id"]).filter(|h| !h.is_empty()),
                text(&object["status"]),
            )
        }
        "volume" | "snapshot" | "backup" => (
            text(&payload[format!("{head}_id")]),
            text(&payload["host"]),
            text(&payload["status"]),
        ),
        _ => (
            text(&data["uuid"]).or_else(|| text(&data["id"])),
            None,
            None,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(inner: Value) -> Vec<u8> {
        json!({ "oslo.version": "2.0", "oslo.message": inner.to_string() })
            .to_string()
            .into_bytes()
    }

    fn stamp(offset_s: i64) -> String {
        let t = if offset_s >= 0 {
            SystemTime::now() + Duration::from_secs(offset_s as u64)
        } else {
            SystemTime::now() - Duration::from_secs((-offset_s) as u64)
        };
        // oslo's form: naive UTC with a space.
        humantime::format_rfc3339_micros(t)
            .to_string()
            .replace('T', " ")
            .trim_end_matches('Z')
            .to_string()
    }

    #[test]
    fn a_nova_versioned_notification_is_parsed() {
        let body = envelope(json!({
            "message_id": "m-1", "publisher_id": "nova-compute:host-a",
            "event_type": "instance.create.end", "priority": "INFO", "timestamp": stamp(0),
            "payload": { "nova_object.name": "InstanceCreatePayload",
                         "nova_object.data": { "uuid": "srv-1", "host": "host-a", "state": "active" } }
        }));
        let e = parse_delivery(
            &body,
            None,
            "nova x",
            "now",
            Duration::from_secs(60),
            1 << 20,
        );
        assert_eq!(e.suspect, None);
        assert_eq!(e.message_id, "m-1");
        assert_eq!(e.source, "nova");
        assert_eq!(e.resource_id.as_deref(), Some("srv-1"));
        assert_eq!(e.host.as_deref(), Some("host-a"));
        assert_eq!(e.state.as_deref(), Some("active"));
        assert!(e.interface.unwrap().contains("7.3.2"));
    }

    #[test]
    fn a_stale_or_future_timestamp_is_suspect() {
        for offset in [-3600, 3600] {
            let body = envelope(json!({
                "message_id": "m-2", "publisher_id": "network.h", "event_type": "port.create.end",
                "timestamp": stamp(offset), "payload": { "port": { "id": "p-1", "status": "DOWN" } }
            }));
            let e = parse_delivery(
                &body,
                None,
                "neutron x",
                "now",
                Duration::from_secs(300),
                1 << 20,
            );
            assert!(
                e.suspect
                    .as_deref()
                    .unwrap()
                    .contains("from the local clock"),
                "{e:?}"
            );
            assert_eq!(e.resource_id.as_deref(), Some("p-1"));
        }
    }

    #[test]
    fn garbage_is_journaled_as_suspect_with_its_digest() {
        let e = parse_delivery(
            b"{not json",
            None,
            "x",
            "now",
            Duration::from_secs(1),
            1 << 20,
        );
        assert!(e.message_id.starts_with("sha256:"));
        assert!(e.suspect.unwrap().starts_with("not JSON"));
        let body = json!({"oslo.version": "2.0", "oslo.message": 5}).to_string();
        let e = parse_delivery(
            body.as_bytes(),
            None,
            "x",
            "now",
            Duration::from_secs(1),
            1 << 20,
        );
        assert!(e.suspect.unwrap().contains("oslo.message"));
    }
}
