//! Idempotent, journaled execution of actions (IFA 033 6.4 and 6.5), and erasure.
//!
//! Every step is journaled `SENDING` before its request leaves and `ACCEPTED` with the
//! operation occurrence id after the 202; the occurrence is then followed through
//! `ns_lcm_op_occs/{id}` to COMPLETED or FAILED. After a crash (or a request that got no
//! answer) a `SENDING` step is not sent again blindly: the SM first looks for an operation
//! occurrence on that NS whose `operationParams` carry the step's marker
//! (`wardenActionId`) or equal its request, and adopts it. So nothing is sent twice.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::nfvo::{self, Api, Interface, NfvoError, Repeat};
use super::{
    now, path_segment, Action, ActionKind, ActionState, ErasureReport, ManoErasure, Sm, SmError,
    Step, StepKind, StepState, TerminateOptions, ACTIONS, ERASURES, ERASURE_PARAM, INVENTORY,
    OWN_OPS,
};
use crate::config::SmMode;
use crate::sol::NsLcmOpOcc;
use crate::store::{ErasureEntry, KeyPurpose, KeyRecord, KEYS};

/// The first wait before a step interrupted by a transient fault (NFVO unreachable, 5xx,
/// store trouble) is tried again from the journal; doubled each time up to
/// [`OUTAGE_RETRY_MAX`]. A permanent fault fails the step at once instead.
const OUTAGE_RETRY: Duration = Duration::from_secs(2);
const OUTAGE_RETRY_MAX: Duration = Duration::from_secs(60);

impl Sm {
    /// Run an action in its own task (at most one task per action). `fresh`: journaled by
    /// this process just now, so a first step in SENDING has not been sent yet.
    pub(crate) fn spawn_action(self: &Arc<Self>, action: Action, fresh: bool) {
        if !self.claim(&action.id) {
            return;
        }
        let sm = self.clone();
        tokio::spawn(async move {
            let id = action.id.clone();
            sm.run_action(action, fresh).await;
            sm.release(&id);
        });
    }

    /// Whether this SM erases the keys of terminated VNFs at all: per
    /// `erase_on_termination`, and in PASSIVE only with `erase_in_passive`.
    pub fn may_erase(&self) -> bool {
        self.config.erase_on_termination
            && (self.mode() != SmMode::Passive || self.config.erase_in_passive)
    }

    /// VNFs with evidence that they are terminated (see [`super::policy::removal_evidence`]):
    /// erase what the agent holds for them. Absence from a list is never such evidence.
    pub(crate) fn erase_terminated(
        self: &Arc<Self>,
        terminated: std::collections::BTreeMap<String, String>,
    ) {
        if !self.may_erase() {
            for (id, evidence) in terminated {
                tracing::info!(vnf = %id, %evidence, mode = %self.mode(), "VNF terminated; its keys are kept (erasure not allowed in this mode)");
            }
            return;
        }
        for (id, evidence) in terminated {
            let sm = self.clone();
            tokio::spawn(async move {
                if let Err(e) = sm.erase_local(&id, &evidence).await {
                    tracing::error!(error = %e, vnf = %id, "local erasure");
                }
            });
        }
    }

    /// After a restart: every action still RUNNING continues where its journal says.
    pub(crate) async fn resume_actions(self: &Arc<Self>) {
        match self.actions().await {
            Ok(actions) => {
                for action in actions
                    .into_iter()
                    .filter(|a| a.state == ActionState::Running)
                {
                    tracing::info!(action = %action.id, "resuming an unfinished action");
                    self.spawn_action(action, false);
                }
            }
            Err(e) => tracing::error!(error = %e, "reading the enforcement journal"),
        }
    }

    /// Why step `index` may not be sent now, if it may not: the mode is checked when each
    /// step is about to be sent (not only when the action was decided), so an action
    /// journaled under FULLY_ACTIVE does not send FULLY_ACTIVE steps after a downgrade and
    /// restart.
    fn blocked(&self, action: &Action, index: usize) -> Option<String> {
        let step = &action.steps[index];
        if !matches!(step.state, StepState::Pending | StepState::Sending) {
            return None;
        }
        let mode = self.mode();
        let needs = match &step.kind {
            StepKind::EraseLocal => return None,
            // IFA 033 Sc-Or.SecEnforce.004: Semi-Active and Fully-Active.
            // (the same-host option is SecEnforce.003's: Fully-Active).
            StepKind::Host(_) if action.kind == ActionKind::SameHostTerminate => {
                SmMode::FullyActive
            }
            StepKind::Host(_) => SmMode::SemiActive,
            StepKind::DisablePackage { .. } => SmMode::FullyActive,
            StepKind::UpdateNs { request, .. } => {
                if request["terminateVnfData"][0]["additionalParams"][ERASURE_PARAM].is_null() {
                    SmMode::SemiActive
                } else {
                    SmMode::FullyActive
                }
            }
        };
        (mode < needs).then(|| {
            format!(
                "the SM is {mode} now (the action was decided in {}); step {index} needs {needs}                  (IFA 033 5.1.2)",
                action.mode
            )
        })
    }

    /// The action as journaled now, if an operator cancelled it meanwhile.
    async fn cancelled(&self, id: &str) -> Option<Action> {
        let id = id.to_string();
        match self.read(move |tx| tx.get(&ACTIONS, &id)).await {
            Ok(Some(a)) if a.state == ActionState::Cancelled => Some(a),
            _ => None,
        }
    }

    async fn run_action(self: &Arc<Self>, mut action: Action, fresh: bool) {
        let mut index = 0;
        let mut unsent = fresh;
        let mut wait = OUTAGE_RETRY;
        let mut reason = None;
        while index < action.steps.len() {
            if let Some(stored) = self.cancelled(&action.id).await {
                tracing::info!(action = %action.id, reason = ?stored.reason, "action cancelled");
                return;
            }
            if let Some(why) = self.blocked(&action, index) {
                tracing::warn!(action = %action.id, reason = %why, "action cancelled");
                action.state = ActionState::Cancelled;
                reason = Some(why);
                break;
            }
            let first_unsent =
                std::mem::take(&mut unsent) && action.steps[index].state == StepState::Sending;
            match self.run_step(&mut action, index, first_unsent).await {
                Ok(()) => {
                    index += 1;
                    wait = OUTAGE_RETRY;
                }
                Err(SmError::Nfvo(e)) if !e.is_transient() => {
                    // Permanent (a refusal, a 202 without Location, a purged occurrence):
                    // retrying cannot help. The step fails with the reason; the action goes on
                    // to its end state.
                    tracing::warn!(action = %action.id, step = index, error = %e, "step failed");
                    let detail = e.to_string();
                    if let Err(e) = self
                        .set_step(&mut action, index, StepState::Failed, None, Some(detail))
                        .await
                    {
                        tracing::warn!(action = %action.id, error = %e, "journaling a failed step");
                        tokio::time::sleep(wait).await;
                    }
                }
                Err(e) => {
                    // NFVO unreachable or store trouble: the journal has the state; try again,
                    // less and less often.
                    tracing::warn!(action = %action.id, step = index, error = %e, retry_in_s = wait.as_secs(), "step interrupted; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(OUTAGE_RETRY_MAX);
                }
            }
        }
        let failed = action.steps.iter().any(|s| s.state == StepState::Failed);
        if action.state != ActionState::Cancelled {
            action.state = if failed {
                ActionState::Failed
            } else {
                ActionState::Completed
            };
            if failed {
                reason = action
                    .steps
                    .iter()
                    .find(|s| s.state == StepState::Failed)
                    .and_then(|s| s.detail.clone());
            }
        }
        action.reason = reason;
        action.updated = now();
        let record = action.clone();
        let verb = match action.state {
            ActionState::Cancelled => "sm.action.cancel",
            ActionState::Failed => "sm.action.fail",
            _ => "sm.action.complete",
        };
        let outcome = self
            .journal
            .write_async(move |tx| {
                // An operator's cancel that came while the last step ran stands.
                if tx
                    .get(&ACTIONS, &record.id)?
                    .is_some_and(|a| a.state == ActionState::Cancelled)
                {
                    return Ok(());
                }
                tx.put(&ACTIONS, &record.id, &record)?;
                tx.audit(
                    crate::store::AuditEvent::new("warden-sm", verb, record.id.clone())
                        .with_detail(json!({ "steps": record.steps })),
                );
                Ok(())
            })
            .await;
        if let Err(e) = outcome {
            tracing::error!(action = %action.id, error = %e, "journaling the end of an action");
        }
        tracing::info!(action = %action.id, state = ?action.state, "action finished");
    }

    /// Drive one step to COMPLETED or FAILED. `Err` = interrupted (retry later).
    async fn run_step(
        self: &Arc<Self>,
        action: &mut Action,
        index: usize,
        mut unsent: bool,
    ) -> Result<(), SmError> {
        loop {
            let step = action.steps[index].clone();
            match (&step.kind, step.state) {
                (_, StepState::Completed | StepState::Failed) => return Ok(()),
                (StepKind::Host(_), _) => {
                    return self.run_host_step(action, index, unsent).await;
                }
                (StepKind::EraseLocal, _) => {
                    // Evidence: every REMOVE_VNF of this action COMPLETED (the VNF has left
                    // every NS it was in, so it is terminated: SOL 005 UpdateNsRequest NOTE 1).
                    let removes: Vec<&Step> = action
                        .steps
                        .iter()
                        .filter(|s| matches!(&s.kind, StepKind::UpdateNs { request, .. } if request["updateType"] == "REMOVE_VNF"))
                        .collect();
                    if removes.is_empty() || removes.iter().any(|s| s.state != StepState::Completed)
                    {
                        let detail = "not erased: no evidence the VNF was terminated (a REMOVE_VNF did not complete)".to_string();
                        self.set_step(action, index, StepState::Failed, None, Some(detail))
                            .await?;
                        continue;
                    }
                    if !self.may_erase() {
                        let detail =
                            format!("not erased: erasure is not allowed in {}", self.mode());
                        self.set_step(action, index, StepState::Completed, None, Some(detail))
                            .await?;
                        continue;
                    }
                    let ops: Vec<String> =
                        removes.iter().filter_map(|s| s.op_occ_id.clone()).collect();
                    let evidence = format!(
                        "action {}: REMOVE_VNF COMPLETED ({})",
                        action.id,
                        ops.join(", ")
                    );
                    let report = self.erase_local(&action.vnf_instance_id, &evidence).await?;
                    let detail = format!(
                        "{} object(s) erased, {} failed",
                        report.local.len(),
                        report.local_failed.len()
                    );
                    let state = if report.local_failed.is_empty() {
                        StepState::Completed
                    } else {
                        StepState::Failed
                    };
                    self.set_step(action, index, state, None, Some(detail))
                        .await?;
                }
                (StepKind::DisablePackage { vnf_pkg_id }, _) => {
                    let (state, detail) = self.disable_package(vnf_pkg_id).await?;
                    self.set_step(action, index, state, None, Some(detail))
                        .await?;
                }
                (
                    StepKind::UpdateNs {
                        interface,
                        ns_instance_id,
                        request,
                    },
                    state,
                ) => {
                    let (interface, ns, request) =
                        (*interface, ns_instance_id.clone(), request.clone());
                    match state {
                        StepState::Pending => {
                            action.steps[index].attempts += 1;
                            self.set_step(action, index, StepState::Sending, None, None)
                                .await?;
                            self.send_update(action, index, interface, &ns, &request)
                                .await?;
                        }
                        StepState::Sending if std::mem::take(&mut unsent) => {
                            // Journaled SENDING with the decision, not sent yet.
                            self.send_update(action, index, interface, &ns, &request)
                                .await?;
                        }
                        StepState::Sending => {
                            // It may have reached the NFVO: look before sending again.
                            match self.find_operation(interface, &ns, &request).await? {
                                Some(op) => {
                                    tracing::info!(action = %action.id, op = %op, "adopting an operation sent before");
                                    self.accepted(action, index, &op).await?;
                                }
                                None => {
                                    action.steps[index].attempts += 1;
                                    self.set_step(action, index, StepState::Sending, None, None)
                                        .await?;
                                    self.send_update(action, index, interface, &ns, &request)
                                        .await?;
                                }
                            }
                        }
                        StepState::Accepted => {
                            let op = step.op_occ_id.clone().unwrap_or_default();
                            let (state, detail) = self.follow(interface, &op).await?;
                            self.set_step(action, index, state, Some(op), Some(detail))
                                .await?;
                            if request["updateType"] == "REMOVE_VNF" {
                                self.record_mano_erasure(action, index).await?;
                            }
                        }
                        StepState::Completed | StepState::Failed => return Ok(()),
                    }
                }
            }
        }
    }

    /// POST the UpdateNsRequest; on 202 journal ACCEPTED. A refusal that will not change by
    /// retrying fails the step; no answer leaves it SENDING (the caller reconciles).
    async fn send_update(
        &self,
        action: &mut Action,
        index: usize,
        interface: Interface,
        ns: &str,
        request: &Value,
    ) -> Result<(), SmError> {
        let path = format!("/ns_instances/{}/update", path_segment(ns)?);
        let outcome = self
            .nfvo
            .call(nfvo::Request {
                interface,
                api: Api::NsLcm,
                method: "POST",
                path: &path,
                body: Some(("application/json", request.to_string().into_bytes())),
                repeat: Repeat::Once,
            })
            .await;
        match outcome {
            Ok(response) if response.status == 202 => {
                let op = nfvo::location_id(&response).ok_or_else(|| {
                    SmError::Nfvo(NfvoError::Invalid {
                        what: format!("POST {path}"),
                        reason: "202 without a Location".into(),
                    })
                })?;
                self.accepted(action, index, &op).await
            }
            Ok(response) => {
                let detail = format!("NFVO answered {} instead of 202", response.status);
                self.set_step(action, index, StepState::Failed, None, Some(detail))
                    .await
            }
            Err(e) if e.is_transient() => {
                // Not taken (unreachable, 5xx, 409 after every attempt) or unknown (no
                // answer): stays SENDING, so the next attempt looks first.
                Err(e.into())
            }
            Err(e) => {
                let detail = e.to_string();
                self.set_step(action, index, StepState::Failed, None, Some(detail))
                    .await
            }
        }
    }

    async fn accepted(&self, action: &mut Action, index: usize, op: &str) -> Result<(), SmError> {
        let op_id = op.to_string();
        let action_id = action.id.clone();
        action.steps[index].state = StepState::Accepted;
        action.steps[index].op_occ_id = Some(op_id.clone());
        action.updated = now();
        let record = action.clone();
        self.journal
            .write_async(move |tx| {
                tx.put(&OWN_OPS, &op_id, &action_id)?;
                tx.put(&ACTIONS, &record.id, &record)?;
                Ok(())
            })
            .await?;
        Ok(())
    }

    /// Look for an operation occurrence on `ns` that is this request: every page of the
    /// NS's occurrences; one listed without `operationParams` (which an NFVO may leave out of
    /// lists) is read on its own, where they are always present. Any page or read that
    /// fails is an error, never "not found" (which would send the request again).
    async fn find_operation(
        &self,
        interface: Interface,
        ns: &str,
        request: &Value,
    ) -> Result<Option<String>, SmError> {
        let path = format!(
            "/ns_lcm_op_occs?filter=(eq,nsInstanceId,{})",
            path_segment(ns)?
        );
        let occs: Vec<NsLcmOpOcc> = self.nfvo.get_list(interface, Api::NsLcm, &path).await?;
        let marker = marker_of(request);
        for listed in occs {
            if listed.ns_instance_id != ns || listed.operation != "UPDATE" {
                continue;
            }
            let params = match listed.operation_params {
                Some(params) => params,
                None => {
                    let path = format!("/ns_lcm_op_occs/{}", path_segment(&listed.id)?);
                    let occ: NsLcmOpOcc = self.nfvo.get_typed(interface, Api::NsLcm, &path).await?;
                    occ.operation_params.ok_or_else(|| {
                        SmError::Nfvo(NfvoError::Invalid {
                            what: format!("GET {path}"),
                            reason: "no operationParams (mandatory in NsLcmOpOcc)".into(),
                        })
                    })?
                }
            };
            let same = params == *request
                || marker
                    .as_deref()
                    .is_some_and(|m| marker_of(&params).as_deref() == Some(m));
            if same {
                return Ok(Some(listed.id));
            }
        }
        Ok(None)
    }

    /// Poll an operation occurrence until it ends.
    async fn follow(&self, interface: Interface, op: &str) -> Result<(StepState, String), SmError> {
        let path = format!("/ns_lcm_op_occs/{}", path_segment(op)?);
        let mut wait = Duration::from_millis(20);
        loop {
            let occ: NsLcmOpOcc = self.nfvo.get_typed(interface, Api::NsLcm, &path).await?;
            let state = occ.operation_state.clone();
            match state.as_str() {
                "COMPLETED" => return Ok((StepState::Completed, state)),
                "FAILED" | "FAILED_TEMP" | "ROLLED_BACK" | "PARTIALLY_COMPLETED" => {
                    let detail = occ.error.and_then(|e| e.detail).unwrap_or_default();
                    return Ok((
                        StepState::Failed,
                        format!("{state} {detail}").trim().to_string(),
                    ));
                }
                _ => {}
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(2));
        }
    }

    /// IFA 033 6.4 NOTE 3: Update VNF Package Info, operationalState DISABLED. A 409 (already
    /// disabled) counts as done.
    async fn disable_package(&self, pkg: &str) -> Result<(StepState, String), SmError> {
        let path = format!("/vnf_packages/{}", path_segment(pkg)?);
        let body = json!({ "operationalState": "DISABLED" })
            .to_string()
            .into_bytes();
        let outcome = self
            .nfvo
            .call(nfvo::Request {
                interface: Interface::SecEnforce,
                api: Api::VnfPkgm,
                method: "PATCH",
                path: &path,
                body: Some(("application/merge-patch+json", body)),
                repeat: Repeat::Idempotent,
            })
            .await;
        match outcome {
            Ok(_) => Ok((StepState::Completed, "package disabled".into())),
            Err(e) if e.status() == Some(409) => {
                // SOL 005 9.4.3.3.4: 409 when the package is already in that state.
                let pkg_state = self
                    .nfvo
                    .get_json(Interface::StatusInfo, Api::VnfPkgm, &path)
                    .await?;
                if pkg_state["operationalState"] == "DISABLED" {
                    Ok((StepState::Completed, "package was already disabled".into()))
                } else {
                    Err(e.into())
                }
            }
            Err(e) if e.is_transient() => Err(e.into()),
            Err(e) => Ok((StepState::Failed, e.to_string())),
        }
    }

    pub(crate) async fn set_step(
        &self,
        action: &mut Action,
        index: usize,
        state: StepState,
        op: Option<String>,
        detail: Option<String>,
    ) -> Result<(), SmError> {
        let step = &mut action.steps[index];
        step.state = state;
        if op.is_some() {
            step.op_occ_id = op;
        }
        if detail.is_some() {
            step.detail = detail;
        }
        action.updated = now();
        let record = action.clone();
        self.journal
            .write_async(move |tx| {
                tx.put(&ACTIONS, &record.id, &record)?;
                Ok(())
            })
            .await?;
        Ok(())
    }

    /// Erasure by NFV-MANO was asked for in this REMOVE_VNF step: note its outcome.
    async fn record_mano_erasure(&self, action: &Action, index: usize) -> Result<(), SmError> {
        let step = &action.steps[index];
        let StepKind::UpdateNs {
            ns_instance_id,
            request,
            ..
        } = &step.kind
        else {
            return Ok(());
        };
        if request["terminateVnfData"][0]["additionalParams"][ERASURE_PARAM].is_null() {
            return Ok(());
        }
        let entry = ManoErasure {
            ns_instance_id: ns_instance_id.clone(),
            requested_in: format!(
                "UpdateNsRequest.terminateVnfData[0].additionalParams.{ERASURE_PARAM}"
            ),
            op_occ_id: step.op_occ_id.clone(),
            state: match step.state {
                StepState::Completed => "COMPLETED".into(),
                StepState::Failed => "FAILED".into(),
                _ => "PENDING".into(),
            },
        };
        let vnf = action.vnf_instance_id.clone();
        self.journal
            .write_async(move |tx| {
                let mut report = tx.get(&ERASURES, &vnf)?.unwrap_or_else(|| ErasureReport {
                    vnf_instance_id: vnf.clone(),
                    ..Default::default()
                });
                report
                    .mano
                    .retain(|m| m.ns_instance_id != entry.ns_instance_id);
                report.mano.push(entry);
                report.updated = now();
                tx.put(&ERASURES, &vnf, &report)?;
                Ok(())
            })
            .await?;
        Ok(())
    }

    /// Destroy every key the agent holds for `vnf` through the key layer, check each gone,
    /// and store the report. Idempotent: keys already erased are no longer listed.
    pub async fn erase_local(&self, vnf: &str, evidence: &str) -> Result<ErasureReport, SmError> {
        let _one_at_a_time = self.erasing.lock().await;
        let evidence = evidence.to_string();
        let vnf_id = vnf.to_string();
        let keys: Vec<KeyRecord> = self
            .read(move |tx| {
                Ok(tx
                    .list(&KEYS, "")?
                    .into_iter()
                    .map(|(_, k)| k)
                    .filter(|k: &KeyRecord| {
                        k.purpose == KeyPurpose::Vnf
                            && k.vnf_instance_id.as_deref() == Some(&vnf_id)
                    })
                    .collect())
            })
            .await?;
        let mut erased = Vec::new();
        let mut failed = Vec::new();
        for key in keys {
            let backends = self.backends.clone();
            let reference = key.reference.clone();
            let outcome = tokio::task::spawn_blocking(move || {
                backends
                    .for_key(&reference)
                    .and_then(|store| store.destroy(&reference))
            })
            .await;
            match outcome {
                Ok(Ok(record)) if record.verified => erased.push((
                    key.reference.to_string(),
                    ErasureEntry::from_record(record, Some(vnf.to_string())),
                )),
                Ok(Ok(_)) => failed.push(format!("{}: still present after destroy", key.reference)),
                Ok(Err(e)) => failed.push(format!("{}: {e}", key.reference)),
                Err(e) => failed.push(format!("{}: {e}", key.reference)),
            }
        }
        // The VNF's certificates, in the same evidence-gated path (issue 10 §3): revoked with
        // cessationOfOperation (RFC 5280 5.3.1), idempotent on a repeated erasure.
        let mut revoked = Vec::new();
        if let Some(cmf) = self.cmf.get() {
            match cmf
                .revoke_of(
                    crate::cmf::records::CertificateOwner::Vnf(vnf),
                    crate::cmf::revoke::RevocationReason::CessationOfOperation,
                    "warden-sm",
                )
                .await
            {
                Ok(outcome) => revoked = outcome.revoked,
                Err(e) => failed.push(format!("certificates of {vnf}: not revoked: {e}")),
            }
        }
        let vnf_id = vnf.to_string();
        let report = self
            .journal
            .write_async(move |tx| {
                let mut report = tx
                    .get(&ERASURES, &vnf_id)?
                    .unwrap_or_else(|| ErasureReport {
                        vnf_instance_id: vnf_id.clone(),
                        ..Default::default()
                    });
                for (reference, entry) in &erased {
                    tx.put(
                        &crate::store::ERASURES,
                        &format!("{}-{reference}", entry.erased_at),
                        entry,
                    )?;
                    tx.delete(&KEYS, reference)?;
                    tx.audit(
                        crate::store::AuditEvent::new("warden-sm", "vnf.erase", vnf_id.clone())
                            .with_detail(serde_json::to_value(entry).unwrap_or_default()),
                    );
                    report.local.push(entry.clone());
                }
                report.local_failed = failed;
                for certificate in revoked {
                    if !report.revoked_certificates.contains(&certificate) {
                        report.revoked_certificates.push(certificate);
                    }
                }
                if !report.evidence.contains(&evidence) {
                    report.evidence.push(evidence);
                }
                report.updated = now();
                tx.put(&ERASURES, &vnf_id, &report)?;
                Ok(report)
            })
            .await?;
        Ok(report)
    }

    /// An operator's termination request (admin API / `warden sm terminate`).
    pub async fn terminate(
        self: &Arc<Self>,
        vnf: &str,
        requested: TerminateOptions,
        actor: &str,
    ) -> Result<Action, SmError> {
        path_segment(vnf)?;
        if self.mode() == SmMode::Passive {
            self.audit(
                "sm.action.refuse",
                vnf,
                json!({ "reason": "PASSIVE mode", "actor": actor }),
            )
            .await?;
            return Err(SmError::Refused(
                "this SM is PASSIVE: it records and never enforces (IFA 033 5.1.2)".into(),
            ));
        }
        // Up-to-date NS membership (IFA 033 6.4 NOTE 2), from Query NS; the inventory is
        // left to the processor, which also judges what is new.
        let ns: Vec<crate::sol::NsInstance> = self
            .nfvo
            .get_list(
                Interface::StatusInfo,
                Api::NsLcm,
                &format!("/ns_instances?{}", crate::sol::NS_FIELDS),
            )
            .await?;
        let mut record = super::policy::inventory_from(&ns)
            .remove(vnf)
            .ok_or_else(|| SmError::NotFound(format!("VNF instance {vnf} is in no NS")))?;
        let vnf_id = vnf.to_string();
        if let Some(known) = self.read(move |tx| tx.get(&INVENTORY, &vnf_id)).await? {
            record.vnf_profile_id = known.vnf_profile_id;
        }
        let action = Action::terminate(
            &record,
            self.mode(),
            super::policy::gate(self.mode(), requested),
            "operator",
            json!({ "actor": actor }),
        );
        // An operator may retry a termination that failed.
        self.start_new(action, actor, true).await
    }

    /// An operator cancels an action: its steps not yet sent are never sent (one already
    /// with the NFVO runs on there; the SM stops following it). A finished action cannot be
    /// cancelled.
    pub async fn cancel(&self, id: &str, actor: &str) -> Result<Action, SmError> {
        let (id, actor) = (id.to_string(), actor.to_string());
        let outcome = self
            .journal
            .write_async(move |tx| {
                let Some(mut action) = tx.get(&ACTIONS, &id)? else {
                    return Ok(Err(SmError::NotFound(format!("no action {id}"))));
                };
                if !matches!(action.state, ActionState::Running | ActionState::Recorded) {
                    return Ok(Err(SmError::Invalid(format!(
                        "action {id} is {:?} already",
                        action.state
                    ))));
                }
                action.state = ActionState::Cancelled;
                action.reason = Some(format!("cancelled by {actor}"));
                action.updated = now();
                tx.put(&ACTIONS, &id, &action)?;
                tx.audit(
                    crate::store::AuditEvent::new(actor, "sm.action.cancel", id.clone())
                        .with_detail(json!({ "steps": action.steps })),
                );
                Ok(Ok(action))
            })
            .await?;
        outcome
    }

    /// IFA 033 6.5: add, modify or remove a security VNF in an NS with Update NS.
    pub async fn security_vnf(
        self: &Arc<Self>,
        kind: ActionKind,
        ns: &str,
        vnf: &str,
        params: &Value,
        actor: &str,
    ) -> Result<Action, SmError> {
        path_segment(ns)?;
        path_segment(vnf)?;
        if self.mode() == SmMode::Passive {
            self.audit(
                "sm.action.refuse",
                vnf,
                json!({ "reason": "PASSIVE mode", "actor": actor, "kind": kind }),
            )
            .await?;
            return Err(SmError::Refused(
                "this SM is PASSIVE: security VNF management needs SEMI_ACTIVE or FULLY_ACTIVE \
                 (IFA 033 Sc-Or.SecurityVnfMgmt.001)"
                    .into(),
            ));
        }
        let tag = match kind {
            ActionKind::SecurityVnfAdd => "add",
            ActionKind::SecurityVnfModify => "modify",
            ActionKind::SecurityVnfRemove => "remove",
            ActionKind::Terminate | ActionKind::HostOutOfUse | ActionKind::SameHostTerminate => {
                return Err(SmError::Invalid("not a security VNF action".into()))
            }
        };
        let mut suffix = [0u8; 6];
        getrandom::fill(&mut suffix).map_err(|e| SmError::Invalid(e.to_string()))?;
        let id = format!("security-vnf-{tag}-{}:{vnf}", hex::encode(suffix));
        let marker = json!({ "wardenActionId": id });
        let request = match kind {
            ActionKind::SecurityVnfAdd => {
                let profile = params["vnfProfileId"]
                    .as_str()
                    .ok_or_else(|| SmError::Invalid("vnfProfileId is required".into()))?;
                // SOL 005 v3.7.1 spells this attribute `addVnfIstance`.
                json!({ "updateType": "ADD_VNF",
                        "addVnfIstance": [{ "vnfInstanceId": vnf, "vnfProfileId": profile }] })
            }
            ActionKind::SecurityVnfModify => {
                let mut data = json!({ "vnfInstanceId": vnf, "metadata": marker });
                for field in ["vnfInstanceName", "vnfInstanceDescription", "vnfdId"] {
                    if let Some(v) = params[field].as_str() {
                        data[field] = json!(v);
                    }
                }
                if let Some(m) = params["metadata"].as_object() {
                    if let Some(d) = data["metadata"].as_object_mut() {
                        d.extend(m.clone());
                    }
                }
                json!({ "updateType": "MODIFY_VNF_INFORMATION", "modifyVnfInfoData": [data] })
            }
            _ => json!({ "updateType": "REMOVE_VNF", "removeVnfInstanceId": [vnf],
                         "terminateVnfData": [{ "vnfInstanceId": vnf, "additionalParams": marker }] }),
        };
        let created = now();
        let action = Action {
            id,
            kind,
            vnf_instance_id: vnf.to_string(),
            host: None,
            trigger: "operator".into(),
            cause: json!({ "actor": actor, "params": params }),
            mode: self.mode(),
            options: TerminateOptions::default(),
            refused: Vec::new(),
            steps: vec![Step {
                kind: StepKind::UpdateNs {
                    interface: Interface::SecurityVnfMgmt,
                    ns_instance_id: ns.to_string(),
                    request,
                },
                state: StepState::Pending,
                attempts: 0,
                op_occ_id: None,
                detail: None,
            }],
            state: ActionState::Running,
            reason: None,
            created: created.clone(),
            updated: created,
        };
        self.start_new(action, actor, false).await
    }

    /// Journal a new action (unless one with that id exists; a FAILED one is replaced when
    /// `retry_failed`) and run it.
    pub(crate) async fn start_new(
        self: &Arc<Self>,
        action: Action,
        actor: &str,
        retry_failed: bool,
    ) -> Result<Action, SmError> {
        let record = action.clone();
        let actor = actor.to_string();
        let stored = self
            .journal
            .write_async(move |tx| {
                if let Some(existing) = tx.get(&ACTIONS, &record.id)? {
                    // A failed one may be retried by the operator; one only recorded (in
                    // PASSIVE) is replaced once the mode allows enforcing.
                    let replace = (retry_failed
                        && matches!(existing.state, ActionState::Failed | ActionState::Cancelled))
                        || (existing.state == ActionState::Recorded
                            && record.state == ActionState::Running);
                    if !replace {
                        return Ok((existing, false));
                    }
                    tx.audit(
                        crate::store::AuditEvent::new(
                            actor.clone(),
                            "sm.action.retry",
                            record.id.clone(),
                        )
                        .with_detail(json!({ "previous": existing.steps })),
                    );
                }
                tx.put(&ACTIONS, &record.id, &record)?;
                tx.audit(
                    crate::store::AuditEvent::new(actor, "sm.action.start", record.id.clone())
                        .with_detail(json!({ "kind": record.kind, "options": record.options,
                                             "mode": record.mode })),
                );
                for refused in &record.refused {
                    tx.audit(
                        crate::store::AuditEvent::new(
                            "warden-sm",
                            "sm.action.refuse",
                            record.id.clone(),
                        )
                        .with_detail(json!({ "option": refused, "mode": record.mode })),
                    );
                }
                Ok((record, true))
            })
            .await?;
        let (action, created) = stored;
        // A RECORDED action (PASSIVE) is never run: it only says what would have been done.
        if (created || action.state == ActionState::Running)
            && action.state != ActionState::Recorded
        {
            self.spawn_action(action.clone(), false);
        }
        Ok(action)
    }
}

/// The `wardenActionId` a request carries, wherever its update type puts it.
fn marker_of(request: &Value) -> Option<String> {
    [
        &request["terminateVnfData"][0]["additionalParams"]["wardenActionId"],
        &request["createSnapshotData"]["userDefinedData"]["wardenActionId"],
        &request["instantiateVnfData"][0]["metadata"]["wardenActionId"],
        &request["modifyVnfInfoData"][0]["metadata"]["wardenActionId"],
    ]
    .into_iter()
    .find_map(|v| v.as_str().map(String::from))
}
