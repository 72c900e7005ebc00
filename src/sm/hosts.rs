//! Host-wide enforcement on Sc-Vi: IFA 033 Sc-Or.SecEnforce.004 "terminating the use of a
//! specific host" and the SecEnforce.003 same-host option.
//!
//! A host action is an [`Action`] of the enforcement journal like the Sc-Or ones (listed by
//! `warden sm actions`, cancelled by `warden sm cancel`, resumed after a restart), whose
//! steps are [`StepKind::Host`] steps run against the VIM:
//!
//! 1. `DisableService`: `PUT /os-services/{id}` status `disabled` with a reason (Nova
//!    microversion >= 2.53); evidence: the service re-read is disabled.
//! 2. per server on the host, `MigrateServer` (live first, then cold with `confirmResize`)
//!    or, for the servers of a VNF when the disposition is "terminate", `TerminateVnf`: a
//!    Terminate action through the NFVO (SOL 005 REMOVE_VNF) — the NFVO owns VNFs, the SM
//!    never deletes their servers behind its back; evidence: the server re-read is ACTIVE
//!    on another host, or the Terminate action COMPLETED. A VNF is terminated only on
//!    positive evidence: the VIM lists one of its servers on the host (never because a
//!    server is missing from some list).
//! 3. `Quarantine`: the host in the quarantine aggregate (created if missing); evidence: the
//!    aggregate re-read lists the host.
//!
//! Exactly once: a step is journaled SENDING, with what the VIM showed before it (the
//! number of the server's migration actions), before its request leaves. After a crash a
//! SENDING step is not sent again blindly: if the server has more migration actions than
//! before, the request reached Nova and is followed instead. Disabling and the aggregate are
//! idempotent by nature (their re-read is the check).
//!
//! The mode is checked before each step (SEMI_ACTIVE at least: IFA 033 Table 6.1-1 lists
//! SecEnforce.004 for Semi-Active and Fully-Active SMs).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{
    now, Action, ActionKind, ActionState, Sm, SmError, Step, StepKind, StepState, TerminateOptions,
    ACTIONS,
};
use crate::config::{HostDisposition, SmMode};
use crate::vim::{Service, VimClient, VimError};

/// The operator's request (`warden sm host HOST --out-of-use`).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutOfUseRequest {
    /// Migrate or terminate the VNFs on the host; the policy's (`[sm.hosts]`) by default.
    #[serde(default)]
    pub disposition: Option<HostDisposition>,
    /// Put the host in the quarantine aggregate (default true: SecEnforce.004 second bullet).
    #[serde(default)]
    pub quarantine: Option<bool>,
    /// Why (the service's disabled_reason gets it).
    #[serde(default)]
    pub reason: Option<String>,
    /// Try live migration first; `[sm.hosts] live_migration` by default.
    #[serde(default)]
    pub live: Option<bool>,
}

/// A host step (journaled inside [`StepKind::Host`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", rename_all_fields = "camelCase", tag = "op")]
pub enum HostStep {
    DisableService {
        host: String,
        reason: String,
    },
    MigrateServer {
        host: String,
        server: String,
        /// Live migration asked for (falls back to cold when Nova refuses it).
        live: bool,
        /// What was last sent: "live" or "cold".
        #[serde(default)]
        sent: Option<String>,
        /// The server's migration actions before the request was sent.
        #[serde(default)]
        baseline: Option<usize>,
    },
    TerminateVnf {
        host: String,
        vnf_instance_id: String,
    },
    Quarantine {
        host: String,
        aggregate: String,
    },
}

/// Test hook for crash tests: when the agent runs with `WARDEN_TEST_HOOKS=1` and the file
/// `host-pause-after` next to its store names a step (`MigrateServer`, ...), it stops making
/// progress right after such a step was sent and journaled ACCEPTED, so a test can kill it
/// there; `before:TerminateVnf` (etc.) stops it before such a step is journaled SENDING, and
/// `journaled:TerminateVnf` once its child termination is journaled but the step is still
/// SENDING.
/// Without that environment variable nothing is read.
const HOOKS_ENV: &str = "WARDEN_TEST_HOOKS";

/// Nova server action names that are migrations (os-instance-actions).
const MIGRATION_ACTIONS: [&str; 2] = ["live-migration", "migrate"];

impl Sm {
    /// The VIM client of `[sm.vim]` (part A's link: connected on first use, shared).
    pub async fn vim_client(&self) -> Result<VimClient, SmError> {
        let link = self
            .vim
            .as_ref()
            .ok_or_else(|| SmError::Invalid("no [sm.vim] configured".into()))?;
        link.client().await.map_err(SmError::Vim)
    }

    /// SecEnforce.004: journal a host action and run it.
    pub async fn host_out_of_use(
        self: &Arc<Self>,
        host: &str,
        request: OutOfUseRequest,
        actor: &str,
    ) -> Result<Action, SmError> {
        if host.is_empty() || host.contains(['/', '?', '#']) {
            return Err(SmError::Invalid(format!("'{host}' is not a host name")));
        }
        if self.mode() < SmMode::SemiActive {
            // PASSIVE observes only (IFA 033 5.1.2): recorded, never sent.
            tracing::info!(%host, "host out of use: recorded only (PASSIVE)");
        }
        let vim = self.vim_client().await?;
        let services = vim
            .get(
                Service::Compute,
                &format!("/os-services?binary=nova-compute&host={}", enc(host)),
            )
            .await?;
        if services["services"].as_array().is_none_or(|s| s.is_empty()) {
            return Err(SmError::NotFound(format!(
                "no nova-compute service on host {host}"
            )));
        }
        let disposition = request.disposition.unwrap_or(self.config.hosts.disposition);
        let reason = request.reason.clone().unwrap_or_else(|| {
            format!(
                "warden-sm {}: taken out of use (IFA 033 SecEnforce.004)",
                self.config.name
            )
        });
        let mut steps = vec![host_step(HostStep::DisableService {
            host: host.to_string(),
            reason,
        })];
        let servers = servers_on(&vim, host).await?;
        let vnfs = if disposition == HostDisposition::Terminate {
            self.vnfs_of_servers(&servers).await?
        } else {
            Default::default()
        };
        let mut terminated = std::collections::BTreeSet::new();
        for server in &servers {
            match vnfs.get(server) {
                Some(vnf) => {
                    if terminated.insert(vnf.clone()) {
                        steps.push(host_step(HostStep::TerminateVnf {
                            host: host.to_string(),
                            vnf_instance_id: vnf.clone(),
                        }));
                    }
                }
                // Not a VNF's (or the disposition is migrate): the host is emptied by
                // migration; the SM deletes no server it does not own.
                None => steps.push(host_step(HostStep::MigrateServer {
                    host: host.to_string(),
                    server: server.clone(),
                    live: request.live.unwrap_or(self.config.hosts.live_migration),
                    sent: None,
                    baseline: None,
                })),
            }
        }
        if request.quarantine.unwrap_or(true) {
            steps.push(host_step(HostStep::Quarantine {
                host: host.to_string(),
                aggregate: self.config.hosts.quarantine_aggregate.clone(),
            }));
        }
        let created = now();
        let action = Action {
            id: format!("host:{host}"),
            kind: ActionKind::HostOutOfUse,
            vnf_instance_id: String::new(),
            host: Some(host.to_string()),
            trigger: "operator".into(),
            cause: json!({ "actor": actor, "request": request, "servers": servers,
                           "disposition": disposition }),
            mode: self.mode(),
            options: TerminateOptions::default(),
            refused: Vec::new(),
            steps,
            state: if self.mode() == SmMode::Passive {
                ActionState::Recorded
            } else {
                ActionState::Running
            },
            reason: None,
            created: created.clone(),
            updated: created,
        };
        self.start_new(action, actor, true).await
    }

    /// Which VNF each server belongs to, from the host map (the NFVO's vnfcResourceInfo
    /// joined with the VIM's servers).
    async fn vnfs_of_servers(
        &self,
        servers: &[String],
    ) -> Result<std::collections::BTreeMap<String, String>, SmError> {
        let map = self.current_host_map().await?;
        Ok(servers
            .iter()
            .filter_map(|s| {
                map.vnfcs
                    .iter()
                    .find(|p| p.server_id.as_deref() == Some(s.as_str()))
                    .map(|p| (s.clone(), p.vnf_instance_id.clone()))
            })
            .collect())
    }

    /// The host map now (part A's join of the NFVO's view and the VIM's servers).
    pub async fn current_host_map(&self) -> Result<crate::vim::HostMap, SmError> {
        let vim = self.vim_client().await?;
        let locations = self
            .config
            .vim
            .as_ref()
            .map(|v| v.host_locations.clone())
            .unwrap_or_default();
        crate::vim::host_map(&vim, &self.nfvo, &locations)
            .await
            .map_err(|e| SmError::Reconcile(crate::error::chain(&e)))
    }

    /// Drive a host step to COMPLETED or FAILED; `Err` only for what a retry may cure (the
    /// VIM unreachable, 5xx, store trouble).
    pub(crate) async fn run_host_step(
        self: &Arc<Self>,
        action: &mut Action,
        index: usize,
        mut unsent: bool,
    ) -> Result<(), SmError> {
        loop {
            let step = action.steps[index].clone();
            let StepKind::Host(op) = &step.kind else {
                return Ok(());
            };
            match step.state {
                StepState::Completed | StepState::Failed => return Ok(()),
                StepState::Pending => {
                    self.pause_hook(&format!("before:{}", op_name(op)));
                    let mut op = op.clone();
                    if let HostStep::MigrateServer {
                        server, baseline, ..
                    } = &mut op
                    {
                        match self.migrations_of(server).await {
                            Ok(count) => *baseline = Some(count),
                            Err(e) => {
                                self.settle(action, index, Err(e)).await?;
                                continue;
                            }
                        }
                    }
                    action.steps[index].kind = StepKind::Host(op);
                    action.steps[index].attempts += 1;
                    self.set_step(action, index, StepState::Sending, None, None)
                        .await?;
                    unsent = true;
                }
                StepState::Sending => {
                    let fresh = std::mem::take(&mut unsent);
                    let outcome = self.send_host_step(action, index, fresh).await;
                    self.settle(action, index, outcome).await?;
                    if action.steps[index].state == StepState::Accepted {
                        self.pause_hook(op_name(op));
                    }
                }
                StepState::Accepted => {
                    let outcome = self.follow_host_step(action, index).await;
                    self.settle(action, index, outcome).await?;
                }
            }
        }
    }

    /// A permanent VIM refusal fails the step with its reason; a transient fault is returned
    /// (the action retries from the journal).
    async fn settle(
        &self,
        action: &mut Action,
        index: usize,
        outcome: Result<(), SmError>,
    ) -> Result<(), SmError> {
        let migrating = matches!(
            action.steps[index].kind,
            StepKind::Host(HostStep::MigrateServer { .. })
        );
        let terminating = matches!(
            action.steps[index].kind,
            StepKind::Host(HostStep::TerminateVnf { .. })
        );
        match outcome {
            Err(SmError::NotFound(why)) if terminating => {
                self.set_step(action, index, StepState::Failed, None, Some(why))
                    .await
            }
            Err(SmError::Vim(e)) if migrating && e.status() == Some(404) => {
                // Deleted meanwhile (by its owner): it is off the host all the same.
                let detail = format!("the server no longer exists: {e}");
                self.set_step(action, index, StepState::Completed, None, Some(detail))
                    .await
            }
            Err(SmError::Vim(e)) if !e.is_transient() => {
                let detail = format!("{e}");
                self.set_step(action, index, StepState::Failed, None, Some(detail))
                    .await
            }
            other => other,
        }
    }

    /// Send the step's request (or, after a crash, find that it was sent) and journal
    /// ACCEPTED.
    async fn send_host_step(
        self: &Arc<Self>,
        action: &mut Action,
        index: usize,
        fresh: bool,
    ) -> Result<(), SmError> {
        let StepKind::Host(op) = action.steps[index].kind.clone() else {
            return Ok(());
        };
        let vim = self.vim_client().await?;
        match op {
            HostStep::DisableService { host, reason } => {
                let id = service_of(&vim, &host).await?["id"]
                    .as_str()
                    .map(String::from)
                    .ok_or_else(|| SmError::NotFound(format!("no service id for {host}")))?;
                vim.put(
                    Service::Compute,
                    &format!("/os-services/{}", enc(&id)),
                    &json!({ "status": "disabled", "disabled_reason": reason }),
                )
                .await?;
                self.set_step(action, index, StepState::Accepted, Some(id), None)
                    .await
            }
            HostStep::MigrateServer {
                host,
                server,
                live,
                sent,
                baseline,
            } => {
                if !fresh {
                    // Sent before the crash? Nova recorded a migration action for it if so.
                    let now_count = self.migrations_of(&server).await?;
                    if baseline.is_some_and(|b| now_count > b) {
                        tracing::info!(action = %action.id, %server, "adopting a migration sent before");
                        return self
                            .set_step(action, index, StepState::Accepted, None, None)
                            .await;
                    }
                }
                let current = vim
                    .get(Service::Compute, &format!("/servers/{}", enc(&server)))
                    .await?;
                if current["server"]["OS-EXT-SRV-ATTR:host"].as_str() != Some(host.as_str()) {
                    let detail = "already off the host".to_string();
                    return self
                        .set_step(action, index, StepState::Accepted, None, Some(detail))
                        .await;
                }
                let path = format!("/servers/{}/action", enc(&server));
                let try_live = live && sent.as_deref() != Some("cold");
                let mut kind = "cold";
                if try_live {
                    let body =
                        json!({ "os-migrateLive": { "host": null, "block_migration": "auto" } });
                    match vim.post(Service::Compute, &path, &body).await {
                        Ok(_) => kind = "live",
                        Err(e) if e.status().is_some_and(|s| s == 400 || s == 409) => {
                            // Nova refuses live migration here (no shared storage, CPU
                            // mismatch, state): cold migration instead.
                            tracing::info!(%server, error = %e, "live migration refused; migrating cold");
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                if kind == "cold" {
                    vim.post(Service::Compute, &path, &json!({ "migrate": null }))
                        .await?;
                }
                if let StepKind::Host(HostStep::MigrateServer { sent, .. }) =
                    &mut action.steps[index].kind
                {
                    *sent = Some(kind.to_string());
                }
                self.set_step(action, index, StepState::Accepted, None, None)
                    .await
            }
            HostStep::TerminateVnf {
                vnf_instance_id, ..
            } => {
                let child = self
                    .terminate_for_host(action, &vnf_instance_id, fresh)
                    .await?;
                self.pause_hook("journaled:TerminateVnf");
                self.set_step(action, index, StepState::Accepted, Some(child), None)
                    .await
            }
            HostStep::Quarantine { host, aggregate } => {
                let id = ensure_aggregate(&vim, &aggregate).await?;
                let added = vim
                    .post(
                        Service::Compute,
                        &format!("/os-aggregates/{id}/action"),
                        &json!({ "add_host": { "host": host } }),
                    )
                    .await;
                match added {
                    Ok(_) => {}
                    // 409: already a member (a resumed step).
                    Err(e) if e.status() == Some(409) => {}
                    Err(e) => return Err(e.into()),
                }
                self.set_step(action, index, StepState::Accepted, Some(id), None)
                    .await
            }
        }
    }

    /// Follow an accepted step to its evidence (a re-read).
    async fn follow_host_step(
        self: &Arc<Self>,
        action: &mut Action,
        index: usize,
    ) -> Result<(), SmError> {
        let StepKind::Host(op) = action.steps[index].kind.clone() else {
            return Ok(());
        };
        let vim = self.vim_client().await?;
        match op {
            HostStep::DisableService { host, .. } => {
                let service = service_of(&vim, &host).await?;
                let (state, detail) = if service["status"] == "disabled" {
                    (
                        StepState::Completed,
                        format!(
                            "nova-compute on {host} disabled: {}",
                            service["disabled_reason"].as_str().unwrap_or("")
                        ),
                    )
                } else {
                    (
                        StepState::Failed,
                        format!("nova-compute on {host} is still {}", service["status"]),
                    )
                };
                self.set_step(action, index, state, None, Some(detail))
                    .await
            }
            HostStep::MigrateServer {
                host, server, sent, ..
            } => {
                let deadline = Instant::now()
                    + Duration::from_secs(self.config.hosts.migration_timeout_seconds);
                let mut wait = Duration::from_millis(200);
                loop {
                    let s = vim
                        .get(Service::Compute, &format!("/servers/{}", enc(&server)))
                        .await?;
                    let s = &s["server"];
                    let status = s["status"].as_str().unwrap_or_default();
                    let at = s["OS-EXT-SRV-ATTR:host"].as_str().unwrap_or_default();
                    if status == "VERIFY_RESIZE" {
                        // Cold migration done on the destination: confirm it (once; a second
                        // confirm of a confirmed migration is a 409, counted as done).
                        match vim
                            .post(
                                Service::Compute,
                                &format!("/servers/{}/action", enc(&server)),
                                &json!({ "confirmResize": null }),
                            )
                            .await
                        {
                            Ok(_) => {}
                            // 409: confirmed already; 400 "has not been resized": Nova's
                            // migration record is not `finished` yet. Both: read again.
                            Err(e) if matches!(e.status(), Some(400 | 409)) => {
                                tracing::debug!(%server, error = %e, "confirmResize not taken yet");
                            }
                            Err(e) => return Err(e.into()),
                        }
                    } else if status == "ACTIVE" && at != host && !at.is_empty() {
                        let detail = format!(
                            "{} migration: {server} ACTIVE on {at}",
                            sent.as_deref().unwrap_or("earlier")
                        );
                        return self
                            .set_step(action, index, StepState::Completed, None, Some(detail))
                            .await;
                    } else if status == "ERROR" {
                        let detail = format!("{server} went to ERROR on {at}");
                        return self
                            .set_step(action, index, StepState::Failed, None, Some(detail))
                            .await;
                    } else if status == "ACTIVE"
                        && at == host
                        && sent.as_deref() == Some("live")
                        && self.migrations_settled(&server).await?
                    {
                        // The live migration ended and left it here (refused or rolled
                        // back): migrate cold instead, as a new request.
                        if let StepKind::Host(HostStep::MigrateServer { sent, baseline, .. }) =
                            &mut action.steps[index].kind
                        {
                            *sent = Some("cold".into());
                            *baseline = Some(self.migrations_of(&server).await?);
                        }
                        action.steps[index].attempts += 1;
                        self.set_step(action, index, StepState::Sending, None, None)
                            .await?;
                        return self.send_host_step(action, index, true).await;
                    }
                    if Instant::now() > deadline {
                        let detail =
                            format!("{server} still {status} on {at} after the migration timeout");
                        return self
                            .set_step(action, index, StepState::Failed, None, Some(detail))
                            .await;
                    }
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
            }
            HostStep::TerminateVnf {
                vnf_instance_id, ..
            } => {
                let child = action.steps[index]
                    .op_occ_id
                    .clone()
                    .unwrap_or_else(|| super::policy::terminate_id(&vnf_instance_id));
                loop {
                    let id = child.clone();
                    let found = self.read(move |tx| tx.get(&ACTIONS, &id)).await?;
                    match found.map(|a| a.state) {
                        Some(ActionState::Completed) => {
                            let detail = format!("{vnf_instance_id} terminated by action {child}");
                            return self
                                .set_step(action, index, StepState::Completed, None, Some(detail))
                                .await;
                        }
                        Some(state) if state.is_final() => {
                            let detail = format!("action {child} ended {state:?}");
                            return self
                                .set_step(action, index, StepState::Failed, None, Some(detail))
                                .await;
                        }
                        Some(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                        None => {
                            let detail = format!("action {child} is not in the journal");
                            return self
                                .set_step(action, index, StepState::Failed, None, Some(detail))
                                .await;
                        }
                    }
                }
            }
            HostStep::Quarantine { host, aggregate } => {
                let id = ensure_aggregate(&vim, &aggregate).await?;
                let agg = vim
                    .get(Service::Compute, &format!("/os-aggregates/{id}"))
                    .await?;
                let member = agg["aggregate"]["hosts"]
                    .as_array()
                    .is_some_and(|h| h.iter().any(|x| x == host.as_str()));
                let (state, detail) = if member {
                    (
                        StepState::Completed,
                        format!("{host} in aggregate {aggregate} ({id})"),
                    )
                } else {
                    (
                        StepState::Failed,
                        format!("{host} not in aggregate {aggregate}"),
                    )
                };
                self.set_step(action, index, state, None, Some(detail))
                    .await
            }
        }
    }

    /// A Terminate action (through the NFVO, as the Sc-Or ones) for a VNF on the host; its id.
    ///
    /// `fresh`: the step was journaled SENDING by this process just now. Otherwise (resumed
    /// after a crash) the child may have been journaled before the crash: whatever
    /// `terminate:VNF` exists is adopted as it is, never replaced, so its requests are not
    /// sent again (the child's own steps are exactly-once by their markers).
    async fn terminate_for_host(
        self: &Arc<Self>,
        action: &Action,
        vnf: &str,
        fresh: bool,
    ) -> Result<String, SmError> {
        let id = super::policy::terminate_id(vnf);
        if !fresh {
            let key = id.clone();
            if let Some(existing) = self.read(move |tx| tx.get(&ACTIONS, &key)).await? {
                tracing::info!(action = %action.id, child = %existing.id, "adopting a termination journaled before");
                if existing.state == ActionState::Running {
                    self.spawn_action(existing.clone(), false);
                }
                return Ok(existing.id);
            }
        }
        // Up-to-date NS membership (IFA 033 6.4 NOTE 2: one REMOVE_VNF per NS holding it),
        // as for an operator's termination.
        let ns: Vec<crate::sol::NsInstance> = self
            .nfvo
            .get_list(
                super::nfvo::Interface::StatusInfo,
                super::nfvo::Api::NsLcm,
                &format!("/ns_instances?{}", crate::sol::NS_FIELDS),
            )
            .await?;
        let mut record = super::policy::inventory_from(&ns)
            .remove(vnf)
            .ok_or_else(|| {
                // Not evidence that it is gone from the host: the step fails, nothing is claimed.
                SmError::NotFound(format!(
                    "VNF {vnf} is in no NS at the NFVO: no termination was requested"
                ))
            })?;
        let key = vnf.to_string();
        if let Some(known) = self.read(move |tx| tx.get(&super::INVENTORY, &key)).await? {
            record.vnf_profile_id = known.vnf_profile_id;
        }
        let options = TerminateOptions::default();
        let child = Action::terminate(
            &record,
            self.mode(),
            super::policy::gate(self.mode(), options),
            // The parent's id: "host:H" or "same-host:V" (never itself a same-host trigger).
            &action.id,
            json!({ "hostAction": action.id }),
        );
        let started = self.start_new(child, "warden-sm", true).await?;
        Ok(started.id)
    }

    /// SecEnforce.003 same-host option ("whether all other VNFs running on the same host
    /// should be terminated"; IFA 033 Table 5.3.3-1 NOTE: "met by determining all the other
    /// VNFs on the same host and terminating each of them"), per `[sm.hosts]
    /// terminate_same_host`, for the Terminate actions rules decided (never for operator
    /// terminations or the terminations host actions start themselves).
    ///
    /// Called with the decisions of a batch before they are journaled: the host map is read
    /// now, while the offending VNF still runs (once its REMOVE_VNF has completed, its
    /// servers and so its hosts are gone), and a `SAME_HOST_TERMINATE` decision is added
    /// after each such Terminate, journaled in the same commit ([`super::policy`]'s
    /// `journal_actions` keeps it only with a Terminate that commit journals). So a crash
    /// can never leave a Terminate without its same-host action; the action's own steps are
    /// exactly-once ([`HostStep::TerminateVnf`]).
    ///
    /// Positive evidence only: a VNF is terminated because the VIM lists one of its
    /// servers (the NFVO's `computeResource.resourceId`) on a host where the VIM also lists
    /// a server of the offending VNF. If the host map cannot be read, nothing is guessed:
    /// the same-host action is journaled FAILED with the reason (the operator can take the
    /// host out of use), and the offending VNF's own termination is not held up.
    pub(crate) async fn same_host_decisions(
        self: &Arc<Self>,
        decisions: &mut Vec<super::policy::Decision>,
    ) {
        if !self.config.hosts.terminate_same_host {
            return;
        }
        let offenders: Vec<(String, String, ActionState)> = decisions
            .iter()
            .filter_map(|d| d.action.as_ref())
            .filter(|a| {
                a.kind == ActionKind::Terminate
                    && matches!(a.state, ActionState::Running | ActionState::Recorded)
                    && a.trigger != "operator"
                    && !a.trigger.starts_with("host:")
                    && !a.trigger.starts_with("same-host:")
            })
            .map(|a| (a.vnf_instance_id.clone(), a.id.clone(), a.state))
            .collect();
        // A Terminate already journaled is not journaled again (nor its same-host action):
        // no need to read the VIM for it (reconciliation decides again while it runs).
        let mut fresh = Vec::new();
        for (vnf, cause, state) in offenders {
            let key = cause.clone();
            let existing = self
                .read(move |tx| tx.get(&ACTIONS, &key))
                .await
                .ok()
                .flatten();
            let replaces = existing
                .as_ref()
                .is_none_or(|e| e.state == ActionState::Recorded && state == ActionState::Running);
            if replaces {
                fresh.push((vnf, cause, state));
            }
        }
        let offenders = fresh;
        if offenders.is_empty() {
            return;
        }
        let map = self.current_host_map().await;
        for (vnf, cause, offender_state) in offenders {
            let decision = match &map {
                Ok(map) => self.same_host_decision(map, &vnf, &cause, offender_state),
                Err(e) => {
                    tracing::error!(error = %e, %vnf, "same-host option: the host map cannot be read; no other VNF is terminated");
                    let reason = format!(
                        "the hosts of {vnf} could not be determined before its termination: {e}; \
                         no other VNF was terminated (take the host out of use if it must be emptied)"
                    );
                    let mut action =
                        self.same_host_action(&vnf, &cause, &[], &[], ActionState::Failed);
                    action.reason = Some(reason.clone());
                    super::policy::Decision {
                        vnf_instance_id: vnf.clone(),
                        audit: json!({ "event": "same_host", "vnfInstanceId": vnf,
                                       "terminateAction": cause, "error": reason }),
                        action: Some(action),
                    }
                }
            };
            decisions.push(decision);
        }
    }

    /// The same-host decision for `vnf` from the host map.
    fn same_host_decision(
        &self,
        map: &crate::vim::HostMap,
        vnf: &str,
        cause: &str,
        offender_state: ActionState,
    ) -> super::policy::Decision {
        let hosts = map.host_of_vnf(vnf);
        let others: Vec<String> = hosts
            .iter()
            .flat_map(|h| map.vnfs_on_host(h))
            .filter(|v| v != vnf)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let audit = json!({ "event": "same_host", "vnfInstanceId": vnf, "terminateAction": cause,
                            "hosts": hosts, "vnfs": others, "mode": self.mode() });
        if others.is_empty() {
            // Nothing else runs there (or the VNF has no placed VNFC): audited, no action.
            return super::policy::Decision {
                vnf_instance_id: vnf.to_string(),
                audit,
                action: None,
            };
        }
        // SecEnforce.003 is a Fully-Active requirement: otherwise recorded, never sent (and
        // recorded too when the offending VNF's own termination is only recorded).
        let state = if self.mode() == SmMode::FullyActive && offender_state == ActionState::Running
        {
            ActionState::Running
        } else {
            ActionState::Recorded
        };
        super::policy::Decision {
            vnf_instance_id: vnf.to_string(),
            audit,
            action: Some(self.same_host_action(vnf, cause, &hosts, &others, state)),
        }
    }

    fn same_host_action(
        &self,
        vnf: &str,
        cause: &str,
        hosts: &[String],
        others: &[String],
        state: ActionState,
    ) -> Action {
        let host = hosts.join(",");
        let created = now();
        Action {
            id: format!("same-host:{vnf}"),
            kind: ActionKind::SameHostTerminate,
            vnf_instance_id: vnf.to_string(),
            host: (!host.is_empty()).then(|| host.clone()),
            trigger: format!("same-host:{vnf}"),
            cause: json!({ "terminateAction": cause, "hosts": hosts, "vnfs": others }),
            mode: self.mode(),
            options: TerminateOptions::default(),
            refused: Vec::new(),
            steps: others
                .iter()
                .map(|v| {
                    host_step(HostStep::TerminateVnf {
                        host: host.clone(),
                        vnf_instance_id: v.clone(),
                    })
                })
                .collect(),
            state,
            reason: None,
            created: created.clone(),
            updated: created,
        }
    }

    /// The crash-test hook ([`HOOKS_ENV`]): `name` is a step's name (right after it was
    /// journaled ACCEPTED) or `before:` and the name (a PENDING step about to be journaled
    /// SENDING).
    fn pause_hook(&self, name: &str) {
        if std::env::var_os(HOOKS_ENV).is_none_or(|v| v != "1") {
            return;
        }
        let Some(dir) = self.store.path().parent() else {
            return;
        };
        let wanted = std::fs::read_to_string(dir.join("host-pause-after")).unwrap_or_default();
        if wanted.trim() == name {
            tracing::warn!(
                step = name,
                "{HOOKS_ENV}: pausing after this step for a crash test"
            );
            // The test kills the process here; blocking this worker thread is the point.
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
    }

    /// The server's migration actions in Nova (os-instance-actions).
    async fn migrations_of(&self, server: &str) -> Result<usize, SmError> {
        let vim = self.vim_client().await?;
        let actions = vim
            .get(
                Service::Compute,
                &format!("/servers/{}/os-instance-actions", enc(server)),
            )
            .await?;
        Ok(actions["instanceActions"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|x| MIGRATION_ACTIONS.iter().any(|m| x["action"] == *m))
                    .count()
            })
            .unwrap_or(0))
    }

    /// No migration of the server is in progress (Nova's migration records).
    async fn migrations_settled(&self, server: &str) -> Result<bool, SmError> {
        let vim = self.vim_client().await?;
        let list = vim
            .get(
                Service::Compute,
                &format!("/os-migrations?instance_uuid={}", enc(server)),
            )
            .await?;
        Ok(list["migrations"].as_array().is_none_or(|m| {
            m.iter().all(|x| {
                matches!(
                    x["status"].as_str(),
                    Some("completed" | "error" | "failed" | "confirmed" | "cancelled" | "done")
                )
            })
        }))
    }
}

fn op_name(op: &HostStep) -> &'static str {
    match op {
        HostStep::DisableService { .. } => "DisableService",
        HostStep::MigrateServer { .. } => "MigrateServer",
        HostStep::TerminateVnf { .. } => "TerminateVnf",
        HostStep::Quarantine { .. } => "Quarantine",
    }
}

fn host_step(op: HostStep) -> Step {
    Step {
        kind: StepKind::Host(op),
        state: StepState::Pending,
        attempts: 0,
        op_occ_id: None,
        detail: None,
    }
}

fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// The host's nova-compute service.
async fn service_of(vim: &VimClient, host: &str) -> Result<Value, SmError> {
    let list = vim
        .get(
            Service::Compute,
            &format!("/os-services?binary=nova-compute&host={}", enc(host)),
        )
        .await?;
    list["services"]
        .as_array()
        .and_then(|s| s.first())
        .cloned()
        .ok_or_else(|| SmError::NotFound(format!("no nova-compute service on {host}")))
}

/// Every server on the host (all projects).
async fn servers_on(vim: &VimClient, host: &str) -> Result<Vec<String>, SmError> {
    let servers = vim
        .get_all(
            Service::Compute,
            &format!("/servers/detail?all_tenants=1&host={}", enc(host)),
            "servers",
        )
        .await?;
    Ok(servers
        .iter()
        .filter(|s| s["OS-EXT-SRV-ATTR:host"] == host)
        .filter_map(|s| s["id"].as_str().map(String::from))
        .collect())
}

/// The aggregate's id, created if no aggregate has that name.
async fn ensure_aggregate(vim: &VimClient, name: &str) -> Result<String, SmError> {
    let list = vim.get(Service::Compute, "/os-aggregates").await?;
    let id_of = |a: &Value| {
        a["id"]
            .as_i64()
            .map(|i| i.to_string())
            .or_else(|| a["id"].as_str().map(String::from))
    };
    if let Some(a) = list["aggregates"]
        .as_array()
        .and_then(|all| all.iter().find(|a| a["name"] == name))
    {
        return id_of(a).ok_or_else(|| SmError::Invalid(format!("aggregate {name} has no id")));
    }
    match vim
        .post(
            Service::Compute,
            "/os-aggregates",
            &json!({ "aggregate": { "name": name } }),
        )
        .await
    {
        Ok(Some(created)) => id_of(&created["aggregate"])
            .ok_or_else(|| SmError::Invalid(format!("aggregate {name} created without an id"))),
        Ok(None) => Err(SmError::Invalid(format!("aggregate {name}: no body"))),
        // 409: created meanwhile (another SM task): read it back.
        Err(e) if e.status() == Some(409) => {
            let list = vim.get(Service::Compute, "/os-aggregates").await?;
            list["aggregates"]
                .as_array()
                .and_then(|all| all.iter().find(|a| a["name"] == name))
                .and_then(id_of)
                .ok_or_else(|| SmError::Vim(e))
        }
        Err(e) => Err(e.into()),
    }
}

impl From<VimError> for SmError {
    fn from(e: VimError) -> Self {
        SmError::Vim(e)
    }
}
