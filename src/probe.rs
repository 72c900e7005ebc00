//! The readiness probe: a background task that, every `[health] probe_seconds`, signs a fixed
//! challenge with every configured key (CA keys, the TLS key, the SM interface keys) and
//! makes one tiny durable write to the store, each with its own deadline
//! (`probe_timeout_seconds`). `/readyz`, the metrics and systemd's `STATUS=` read the cached
//! result ([`Readiness`]); no request ever reaches a device through them.
//!
//! A device that hangs (a SIGSTOPped swtpm, a wedged HSM) shows as "not ready" once the
//! deadline passes. The probe of that key is not started again while the hung one is still
//! inside the device, so a stalled device holds at most one blocking thread per key.
//!
//! The store check writes one small record to a table of its own (`health_probe`, outside
//! the audit chain) with [`Store::write`]: a commit that succeeds proves the disk accepts
//! durable writes now (ENOSPC, a read-only remount and a broken file all fail it).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::keys::backends::Backends;
use crate::keys::{KeyError, KeyRef, SignatureScheme};
use crate::metrics::{self, KeyLabels};
use crate::store::{Store, StoreError, Table};

/// The challenge the probe signs: fixed, and useless as a signature for anything else.
pub const CHALLENGE: &[u8] = b"nfv-warden readiness probe";

/// The probe's own table: one record, overwritten by every probe.
pub const HEALTH_PROBE: Table<String> = Table::new("health_probe");

/// One check of `/readyz`.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Check {
    /// What is checked: "CA key default", "TLS key", "SM ns_lcm key", "store".
    pub name: String,
    /// The key reference or the store path.
    pub subject: String,
    pub ready: bool,
    /// Why not ready (the error of the last attempt), absent when ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the last probe of this check finished (RFC 3339), absent before the first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checked_at: Option<String>,
}

/// The cached answer: every check of the last probe round.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Readiness {
    pub checks: Vec<Check>,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|c| c.ready)
    }

    /// One line for systemd's STATUS= and the log: "ready", or what is not ready and why.
    pub fn summary(&self) -> String {
        if self.is_ready() {
            return "ready".to_string();
        }
        if self.checks.iter().all(|c| c.checked_at.is_none()) {
            return "not ready: first probe of the keys and the store running".to_string();
        }
        let failing: Vec<String> = self
            .checks
            .iter()
            .filter(|c| !c.ready)
            .map(|c| match &c.reason {
                Some(reason) => format!("{} {} unavailable: {reason}", c.name, c.subject),
                None => format!("{} {} not checked yet", c.name, c.subject),
            })
            .collect();
        format!("not ready: {}", failing.join("; "))
    }
}

/// A key the probe signs with, and what it is for.
#[derive(Clone, Debug)]
pub struct KeyTarget {
    pub name: String,
    pub key: KeyRef,
}

/// Every key the agent must be able to sign with, from the configuration, each once.
pub fn key_targets(config: &Config) -> Vec<KeyTarget> {
    let mut targets: Vec<KeyTarget> = Vec::new();
    let mut add = |name: String, key: &KeyRef| {
        if !targets.iter().any(|t| &t.key == key) {
            targets.push(KeyTarget {
                name,
                key: key.clone(),
            });
        }
    };
    if let Some(cmf) = &config.cmf {
        for ca in &cmf.cas {
            add(format!("CA key {}", ca.id), &ca.key);
        }
    }
    if let Some(ca) = &config.ca {
        add("CA key".to_string(), &ca.key);
    }
    if let Some(server) = &config.server {
        add("TLS key".to_string(), &server.tls_key);
    }
    if let Some(sm) = &config.sm {
        let i = &sm.nfvo.interface;
        for (name, entry) in [
            ("ns_lcm", &i.ns_lcm),
            ("status_info", &i.status_info),
            ("sec_enforce", &i.sec_enforce),
            ("security_vnf_mgmt", &i.security_vnf_mgmt),
        ] {
            if let Some(entry) = entry {
                add(format!("SM {name} key"), &entry.key);
            }
        }
    }
    targets
}

/// The probe's settings.
#[derive(Clone, Copy, Debug)]
pub struct ProbeSettings {
    pub every: Duration,
    pub timeout: Duration,
    pub expiry_warning_days: u32,
    /// How often the certificate table is counted for the expiry gauges.
    pub expiry_count_every: Duration,
}

impl ProbeSettings {
    pub fn from_config(config: &Config) -> ProbeSettings {
        ProbeSettings {
            every: Duration::from_secs(config.health.probe_seconds),
            timeout: Duration::from_secs(config.health.probe_timeout_seconds),
            expiry_warning_days: config.health.expiry_warning_days,
            expiry_count_every: Duration::from_secs(config.health.expiry_count_seconds),
        }
    }
}

/// A handle on the cached readiness; cheap to clone.
#[derive(Clone)]
pub struct Probe {
    state: watch::Receiver<Readiness>,
    /// Read between rounds: a commit refused since the last round (a full disk) makes the
    /// store check not ready at once, not up to `probe_seconds` later.
    store: Arc<Store>,
}

impl Probe {
    /// Start the probe task on the current tokio runtime. Until its first round ends every
    /// check reads "not checked yet" (not ready).
    pub fn start(
        targets: Vec<KeyTarget>,
        backends: Backends,
        store: Arc<Store>,
        settings: ProbeSettings,
    ) -> Probe {
        let mut checks: Vec<Check> = targets
            .iter()
            .map(|t| Check {
                name: t.name.clone(),
                subject: t.key.to_string(),
                ready: false,
                reason: None,
                checked_at: None,
            })
            .collect();
        checks.push(Check {
            name: "store".to_string(),
            subject: store.path().display().to_string(),
            ready: false,
            reason: None,
            checked_at: None,
        });
        let (publish, state) = watch::channel(Readiness { checks });
        let runner = Runner {
            targets,
            backends,
            store: store.clone(),
            settings,
            key_probes: Vec::new(),
            store_probe: None,
            last_ready: Vec::new(),
            last_expiry: None,
        };
        tokio::spawn(runner.run(publish));
        Probe { state, store }
    }

    /// The last probe round's result, with the store check failed when a commit was refused
    /// since ([`Store::accepting_commits`]: no write of its own; the next round's probe
    /// write is what finds the store working again).
    pub fn readiness(&self) -> Readiness {
        let mut readiness = self.state.borrow().clone();
        if !self.store.accepting_commits() {
            for check in readiness.checks.iter_mut().filter(|c| c.name == "store") {
                if check.ready {
                    check.ready = false;
                    check.reason = Some(
                        "the last commit was refused; the next probe round writes again"
                            .to_string(),
                    );
                }
            }
        }
        readiness
    }

    /// A receiver that sees every change of the readiness.
    pub fn subscribe(&self) -> watch::Receiver<Readiness> {
        self.state.clone()
    }
}

/// The probe task's state.
struct Runner {
    targets: Vec<KeyTarget>,
    backends: Backends,
    store: Arc<Store>,
    settings: ProbeSettings,
    /// A key probe still inside its device from an earlier round, per target.
    key_probes: Vec<Option<JoinHandle<Result<(), KeyError>>>>,
    store_probe: Option<JoinHandle<Result<(), StoreError>>>,
    /// The readiness of each check at the last round (recoveries are counted on the edge).
    last_ready: Vec<bool>,
    last_expiry: Option<Instant>,
}

/// How one probe ended.
enum Outcome {
    Ready,
    Failed(String),
}

impl Runner {
    async fn run(mut self, publish: watch::Sender<Readiness>) {
        self.key_probes = (0..self.targets.len()).map(|_| None).collect();
        self.last_ready = vec![true; self.targets.len() + 1];
        let mut tick = tokio::time::interval(self.settings.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let readiness = self.round().await;
            crate::log_limit::flush();
            publish.send_if_modified(|current| {
                let changed = *current != readiness;
                *current = readiness;
                changed
            });
            if publish.is_closed() {
                // Nobody reads the readiness any more (the agent is stopping).
                return;
            }
            if self
                .last_expiry
                .is_none_or(|at| at.elapsed() >= self.settings.expiry_count_every)
            {
                self.last_expiry = Some(Instant::now());
                self.count_expiring().await;
            }
        }
    }

    /// One round: every key and the store, concurrently, under one deadline.
    async fn round(&mut self) -> Readiness {
        let deadline = tokio::time::Instant::now() + self.settings.timeout;
        for (i, target) in self.targets.iter().enumerate() {
            let busy = self.key_probes[i]
                .as_ref()
                .is_some_and(|h| !h.is_finished());
            if !busy {
                let backends = self.backends.clone();
                let key = target.key.clone();
                self.key_probes[i] =
                    Some(tokio::task::spawn_blocking(move || sign(&backends, &key)));
            }
        }
        if self
            .store_probe
            .as_ref()
            .is_none_or(JoinHandle::is_finished)
        {
            let store = self.store.clone();
            self.store_probe = Some(tokio::task::spawn_blocking(move || {
                let started = Instant::now();
                let now = crate::keys::rfc3339_now();
                let result = store.write(|tx| tx.put(&HEALTH_PROBE, "last", &now));
                if result.is_ok() {
                    metrics::global().store_commit("probe", started.elapsed());
                }
                result
            }));
        }
        let timeout = self.settings.timeout;
        let mut checks = Vec::with_capacity(self.targets.len() + 1);
        for i in 0..self.targets.len() {
            let outcome = match self.key_probes[i].as_mut() {
                Some(handle) => match tokio::time::timeout_at(deadline, handle).await {
                    Ok(Ok(Ok(()))) => Outcome::Ready,
                    Ok(Ok(Err(e))) => Outcome::Failed(e.to_string()),
                    Ok(Err(e)) => Outcome::Failed(format!("probe task: {e}")),
                    Err(_) => Outcome::Failed(format!(
                        "the device did not answer within {} s",
                        timeout.as_secs()
                    )),
                },
                None => Outcome::Failed("not probed".into()),
            };
            if matches!(
                self.key_probes[i].as_ref().map(JoinHandle::is_finished),
                Some(true)
            ) {
                self.key_probes[i] = None;
            }
            let target = &self.targets[i];
            let ready = matches!(outcome, Outcome::Ready);
            metrics::global()
                .key_ready
                .get_or_create(&KeyLabels {
                    name: target.name.clone(),
                    key: target.key.to_string(),
                })
                .set(i64::from(ready));
            checks.push(check(&target.name, target.key.to_string(), outcome));
        }
        let outcome = match self.store_probe.as_mut() {
            Some(handle) => match tokio::time::timeout_at(deadline, handle).await {
                Ok(Ok(Ok(()))) => Outcome::Ready,
                Ok(Ok(Err(e))) => Outcome::Failed(crate::error::chain(&e)),
                Ok(Err(e)) => Outcome::Failed(format!("probe task: {e}")),
                Err(_) => {
                    Outcome::Failed(format!("no durable write within {} s", timeout.as_secs()))
                }
            },
            None => Outcome::Failed("not probed".into()),
        };
        if self
            .store_probe
            .as_ref()
            .is_some_and(JoinHandle::is_finished)
        {
            self.store_probe = None;
        }
        let store_ready = matches!(outcome, Outcome::Ready);
        metrics::global().store_ready.set(i64::from(store_ready));
        let store_path = self.store.path().display().to_string();
        checks.push(check("store", store_path, outcome));
        for (i, c) in checks.iter().enumerate() {
            self.last_ready[i] = c.ready;
        }
        let readiness = Readiness { checks };
        metrics::global().ready.set(i64::from(readiness.is_ready()));
        readiness
    }

    /// The certificates gauges, from the store's certificate table (read-only snapshot).
    async fn count_expiring(&self) {
        let store = self.store.clone();
        let now = SystemTime::now();
        let until =
            now + Duration::from_secs(u64::from(self.settings.expiry_warning_days) * 86_400);
        // Both bounds and the records' notAfter are "YYYY-MM-DDTHH:MM:SSZ", so they compare as
        // strings.
        let (from, until) = (crate::keys::rfc3339(now), crate::keys::rfc3339(until));
        let counted = tokio::task::spawn_blocking(move || {
            store.read(|tx| {
                // Certificates issued to consumers: those the agent made for itself (`ca
                // init`, `tls init`, `sm init`, recorded in the same table) are not counted.
                let mut all = tx.list(&crate::cmf::CERTIFICATES, "")?;
                all.retain(|(_, r)| r.consumer != crate::cmf::records::AGENT_CONSUMER);
                let expiring = all
                    .iter()
                    .filter(|(_, r)| r.not_after.as_str() >= from.as_str() && r.not_after < until)
                    .count();
                Ok((all.len(), expiring))
            })
        })
        .await;
        match counted {
            Ok(Ok((all, expiring))) => {
                metrics::global()
                    .certificates_issued
                    .set(i64::try_from(all).unwrap_or(i64::MAX));
                metrics::global()
                    .certificates_expiring
                    .set(i64::try_from(expiring).unwrap_or(i64::MAX));
            }
            Ok(Err(e)) => tracing::warn!(error = %crate::error::chain(&e), "counting certificates"),
            Err(e) => tracing::warn!(error = %e, "counting certificates"),
        }
    }
}

fn check(name: &str, subject: String, outcome: Outcome) -> Check {
    let (ready, reason) = match outcome {
        Outcome::Ready => (true, None),
        Outcome::Failed(reason) => (false, Some(reason)),
    };
    Check {
        name: name.to_string(),
        subject,
        ready,
        reason,
        checked_at: Some(crate::keys::rfc3339_now()),
    }
}

/// One signature of [`CHALLENGE`] with `key`, in its default scheme.
fn sign(backends: &Backends, key: &KeyRef) -> Result<(), KeyError> {
    let store = backends.for_key(key)?;
    let scheme: SignatureScheme = store.public_key(key)?.algorithm.default_scheme();
    store.sign(key, scheme, CHALLENGE)?;
    Ok(())
}
