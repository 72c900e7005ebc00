//! Modes and rules (IFA 033 5.1, Sc-Or.NsLcm.008, SecEnforce.002/.003/.005): how journaled
//! notifications and reconciliation become events, and events become actions.
//!
//! Events come from the notification itself (an operation refused as unauthorized, a
//! topology change) and from comparing the NFVO's current NSs (Query NS) with the inventory
//! the SM kept (VNFs added, gone, or with other external links). Comparing state rather
//! than trusting each notification makes duplicated, reordered and lost notifications
//! harmless: the next notification or the periodic reconciliation sees the same state.
//!
//! Mode gate (the S and F option sets): PASSIVE records what it would have done and sends
//! nothing; SEMI_ACTIVE may terminate with snapshot and replacement; FULLY_ACTIVE may also
//! disable the package and ask NFV-MANO for erasure. An option the mode does not allow is
//! refused and audited, never sent.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value};

use crate::config::{RuleAction, RuleConfig, RuleEvent, SmMode};

use super::nfvo::{Api, Interface};
use crate::sol::{Notification, NsInstance, NsLcmOpOcc, VnfPkgInfo, NS_FIELDS};

use super::{
    event_name, now, AbsentVnf, Action, ActionKind, ActionState, Sm, SmError, Step, StepKind,
    StepState, TerminateOptions, VnfRecord, ABSENT, ACTIONS, ERASURE_PARAM, INVENTORY,
    NOTIFICATIONS, OWN_OPS, PENDING, PROCESSED, SEEN_FAILURES,
};

/// Something the rules look at.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub kind: RuleEvent,
    pub vnf_instance_id: String,
    pub detail: Value,
}

/// One event as decided: audited always, with the action it calls for, if any.
pub(crate) struct Decision {
    pub vnf_instance_id: String,
    pub audit: Value,
    pub action: Option<Action>,
}

/// What a refresh found: events, the NFVO's current VNFs, and what to write.
pub(crate) struct Refreshed {
    pub events: Vec<Event>,
    pub inventory: BTreeMap<String, VnfRecord>,
    pub change: InventoryChange,
}

/// The inventory writes a refresh calls for; the caller stores them in its own commit.
#[derive(Clone, Debug, Default)]
pub(crate) struct InventoryChange {
    /// VNFs no longer in any NS of a complete view: absent, not yet known to be terminated
    /// (moved to `sm_absent`; their keys stay until there is evidence).
    pub gone: Vec<VnfRecord>,
    /// Absent VNFs that are back in the view.
    pub returned: Vec<String>,
    /// New or changed inventory records.
    pub changed: Vec<VnfRecord>,
    /// VNFs with evidence that they are terminated, and the evidence: their keys are erased
    /// (per the mode, see [`Sm::may_erase`]) once this change is durable.
    pub terminated: BTreeMap<String, String>,
}

impl InventoryChange {
    /// Write the inventory changes into the caller's transaction.
    pub fn store(
        &self,
        tx: &mut crate::store::WriteTx<'_>,
    ) -> Result<(), crate::store::StoreError> {
        let since = super::now();
        for record in &self.gone {
            tx.delete(&INVENTORY, &record.vnf_instance_id)?;
            tx.put(
                &ABSENT,
                &record.vnf_instance_id,
                &AbsentVnf {
                    record: record.clone(),
                    since: since.clone(),
                },
            )?;
        }
        for id in &self.returned {
            tx.delete(&ABSENT, id)?;
        }
        for record in &self.changed {
            tx.put(&INVENTORY, &record.vnf_instance_id, record)?;
        }
        for (id, evidence) in &self.terminated {
            tx.delete(&ABSENT, id)?;
            tx.audit(
                crate::store::AuditEvent::new("warden-sm", "sm.vnf.terminated", id.clone())
                    .with_detail(json!({ "evidence": evidence })),
            );
        }
        Ok(())
    }
}

/// The VNFs of the NFVO's NS instances (all pages of `GET /ns_instances?fields=vnfInstance`),
/// by VNF instance id.
pub fn inventory_from(ns_instances: &[NsInstance]) -> BTreeMap<String, VnfRecord> {
    let mut vnfs: BTreeMap<String, VnfRecord> = BTreeMap::new();
    for ns in ns_instances {
        for vnf in ns.vnf_instance.iter().flatten() {
            let record = vnfs.entry(vnf.id.clone()).or_insert_with(|| {
                let info = vnf.instantiated_vnf_info.clone().unwrap_or_default();
                VnfRecord {
                    vnf_instance_id: vnf.id.clone(),
                    ns_instance_ids: BTreeSet::new(),
                    vnfd_id: vnf.vnfd_id.clone(),
                    vnf_pkg_id: vnf.vnf_pkg_id.clone(),
                    vnf_instance_name: vnf.vnf_instance_name.clone(),
                    vnf_profile_id: None,
                    flavour_id: info.flavour_id,
                    instantiation_state: vnf.instantiation_state.clone(),
                    vnf_state: info.vnf_state,
                    ext_virtual_links: info
                        .ext_virtual_link_info
                        .into_iter()
                        .map(|l| {
                            let resource = l
                                .resource_handle
                                .and_then(|h| h.resource_id)
                                .unwrap_or_default();
                            (l.id, resource)
                        })
                        .collect(),
                }
            });
            record.ns_instance_ids.insert(ns.id.clone());
        }
    }
    vnfs
}

/// Evidence in a notification that VNFs were removed or terminated: a RESULT whose operation
/// succeeded, naming each as REMOVE or TERMINATE with changeResult COMPLETED.
pub fn removal_evidence(notification: &Notification) -> Vec<(String, String)> {
    let succeeded = matches!(
        notification.operation_state.as_deref(),
        Some("COMPLETED" | "PARTIALLY_COMPLETED")
    );
    if notification.notification_type != "NsLcmOperationOccurrenceNotification"
        || notification.notification_status.as_deref() != Some("RESULT")
        || !succeeded
    {
        return Vec::new();
    }
    notification
        .affected_vnf
        .iter()
        .filter(|v| v.removed())
        .map(|v| {
            (
                v.vnf_instance_id.clone(),
                format!(
                    "notification {}: operation {} {} {} COMPLETED",
                    notification.id,
                    notification.op_occ_id().unwrap_or("?"),
                    notification.operation_state.as_deref().unwrap_or_default(),
                    v.change_type.as_deref().unwrap_or_default(),
                ),
            )
        })
        .collect()
}

/// Events carried by one notification (besides what the inventory comparison finds).
/// `own` = the notification is about (or was caused by) an operation occurrence the SM
/// started: its effects are expected, not someone else's change.
pub fn notification_events(body: &Notification, own: bool) -> (Vec<Event>, BTreeSet<String>) {
    let mut events = Vec::new();
    let mut package_checks = BTreeSet::new();
    if own {
        return (events, package_checks);
    }
    match body.notification_type.as_str() {
        "NsLcmOperationOccurrenceNotification" => {
            if body.notification_status.as_deref() != Some("RESULT") {
                return (events, package_checks);
            }
            let state = body.operation_state.as_deref().unwrap_or_default();
            let refused = matches!(state, "FAILED" | "FAILED_TEMP" | "ROLLED_BACK")
                && matches!(body.error.as_ref().and_then(|e| e.status), Some(401 | 403));
            for vnf in &body.affected_vnf {
                let id = &vnf.vnf_instance_id;
                let change = vnf.change_type.as_deref().unwrap_or_default();
                let detail = json!({
                    "notificationId": body.id, "nsInstanceId": body.ns_instance_id,
                    "nsLcmOpOccId": body.ns_lcm_op_occ_id, "operation": body.operation,
                    "changeType": change, "operationState": state,
                });
                if refused {
                    // IFA 033 Sc-Or.NsLcm.003: an unauthorized attempt to change a VNF.
                    events.push(Event {
                        kind: RuleEvent::UnauthorizedChange,
                        vnf_instance_id: id.clone(),
                        detail: json!({ "error": body.error, "cause": detail }),
                    });
                    continue;
                }
                if vnf.change_result.as_deref() != Some("COMPLETED") {
                    continue;
                }
                match change {
                    "INSTANTIATE" | "ADD" | "CHANGE_VNFPKG" => {
                        package_checks.insert(id.clone());
                    }
                    "SCALE" | "HEAL" | "CHANGE_FLAVOUR" | "CHANGE_EXTERNAL_VNF_CONNECTIVITY" => {
                        // IFA 033 Sc-Or.NsLcm.004: topology changes.
                        events.push(Event {
                            kind: RuleEvent::TopologyChange,
                            vnf_instance_id: id.clone(),
                            detail,
                        })
                    }
                    _ => {}
                }
            }
        }
        "NsChangeNotification" if body.ns_component_type.as_deref() == Some("VNF") => {
            if let Some(id) = &body.ns_component_id {
                events.push(Event {
                    kind: RuleEvent::TopologyChange,
                    vnf_instance_id: id.clone(),
                    detail: json!({
                        "notificationId": body.id, "nsInstanceId": body.ns_instance_id,
                        "lcmOpNameImpactingNsComponent": body.lcm_op_name_impacting_ns_component,
                        "lcmOpOccIdImpactingNsComponent": body.lcm_op_occ_id_impacting_ns_component,
                    }),
                });
            }
        }
        _ => {}
    }
    (events, package_checks)
}

/// What changed between the inventory the SM kept and the NFVO's current one.
#[derive(Debug, Default)]
pub struct Diff {
    pub added: Vec<String>,
    pub gone: Vec<String>,
    pub relinked: Vec<String>,
}

pub fn diff(before: &BTreeMap<String, VnfRecord>, now: &BTreeMap<String, VnfRecord>) -> Diff {
    let mut d = Diff::default();
    for (id, record) in now {
        match before.get(id) {
            None => d.added.push(id.clone()),
            Some(old) if old.ext_virtual_links != record.ext_virtual_links => {
                d.relinked.push(id.clone())
            }
            Some(_) => {}
        }
    }
    for id in before.keys() {
        if !now.contains_key(id) {
            d.gone.push(id.clone());
        }
    }
    d
}

/// The first rule for an event.
pub fn rule_for(rules: &[RuleConfig], event: RuleEvent) -> Option<&RuleConfig> {
    rules.iter().find(|r| r.on == event)
}

/// Split requested options into those the mode allows and those it refuses
/// (IFA 033 SecEnforce.002 = S, SecEnforce.003 = F).
pub fn gate(mode: SmMode, requested: TerminateOptions) -> (TerminateOptions, Vec<String>) {
    let mut allowed = requested;
    let mut refused = Vec::new();
    if mode < SmMode::FullyActive {
        if requested.disable_package {
            allowed.disable_package = false;
            refused.push("disablePackage (FULLY_ACTIVE only, IFA 033 Sc-Or.SecEnforce.003)".into());
        }
        if requested.erase {
            allowed.erase = false;
            refused.push("erase (FULLY_ACTIVE only, IFA 033 Sc-Or.SecEnforce.003)".into());
        }
    }
    (allowed, refused)
}

/// The steps that terminate `vnf` with `options` (IFA 033 6.4 NOTES 1 and 2): snapshot
/// first, REMOVE_VNF from every NS that holds it, the package disabled (before any
/// replacement, so nothing new is instantiated from it), a replacement, and the agent's own
/// erasure.
/// `attempt` names this attempt of the action (its id and creation time): each request
/// carries `<attempt>/<step>` as its `wardenActionId`, so a retried action never adopts an
/// operation of an earlier attempt.
pub fn terminate_steps(attempt: &str, vnf: &VnfRecord, options: TerminateOptions) -> Vec<Step> {
    let marker = |step: &str| format!("{attempt}/{step}");
    let mut steps = Vec::new();
    let first_ns = vnf.ns_instance_ids.iter().next().cloned();
    if options.snapshot {
        if let Some(ns) = &first_ns {
            steps.push(step(StepKind::UpdateNs {
                interface: Interface::SecEnforce,
                ns_instance_id: ns.clone(),
                request: json!({
                    "updateType": "CREATE_VNF_SNAPSHOT",
                    "createSnapshotData": {
                        "vnfInstanceId": vnf.vnf_instance_id,
                        "userDefinedData": { "wardenActionId": marker("snapshot"),
                                             "reason": "security enforcement" },
                    },
                }),
            }));
        }
    }
    for ns in &vnf.ns_instance_ids {
        let mut params = json!({ "wardenActionId": marker(&format!("remove/{ns}")) });
        if options.erase {
            params[ERASURE_PARAM] =
                json!({ "hmee": true, "tpm": true, "hsm": true, "storage": true });
        }
        steps.push(step(StepKind::UpdateNs {
            interface: Interface::SecEnforce,
            ns_instance_id: ns.clone(),
            request: json!({
                "updateType": "REMOVE_VNF",
                "removeVnfInstanceId": [vnf.vnf_instance_id],
                "terminateVnfData": [{
                    "vnfInstanceId": vnf.vnf_instance_id,
                    "terminationType": "FORCEFUL",
                    "additionalParams": params,
                }],
            }),
        }));
    }
    if options.disable_package && !vnf.vnf_pkg_id.is_empty() {
        steps.push(step(StepKind::DisablePackage {
            vnf_pkg_id: vnf.vnf_pkg_id.clone(),
        }));
    }
    if options.allow_replacement {
        if let Some(ns) = &first_ns {
            let mut data = json!({
                "vnfdId": vnf.vnfd_id,
                "vnfFlavourId": vnf.flavour_id.clone().unwrap_or_else(|| "default".into()),
                "vnfInstanceName": format!("{}-replacement",
                    vnf.vnf_instance_name.clone().unwrap_or_else(|| vnf.vnf_instance_id.clone())),
                "metadata": { "wardenActionId": marker("replace"),
                              "replaces": vnf.vnf_instance_id },
            });
            if let Some(profile) = &vnf.vnf_profile_id {
                data["vnfProfileId"] = json!(profile);
            }
            steps.push(step(StepKind::UpdateNs {
                interface: Interface::SecEnforce,
                ns_instance_id: ns.clone(),
                request: json!({ "updateType": "INSTANTIATE_VNF", "instantiateVnfData": [data] }),
            }));
        }
    }
    steps.push(step(StepKind::EraseLocal));
    steps
}

fn step(kind: StepKind) -> Step {
    Step {
        kind,
        state: StepState::Pending,
        attempts: 0,
        op_occ_id: None,
        detail: None,
    }
}

/// The action id of a termination: one per VNF, so one VNF is never terminated twice.
pub fn terminate_id(vnf: &str) -> String {
    format!("terminate:{vnf}")
}

impl Sm {
    /// Process journaled notifications (a batch of those waiting): one refresh (Query NS)
    /// for the batch, events from each, decisions, and one durable commit that marks them
    /// processed and journals the actions; then run the actions. If the NFVO does not
    /// answer, they stay pending for the next reconciliation.
    pub(crate) async fn process_batch(self: &std::sync::Arc<Self>, batch: Vec<super::Pending>) {
        // Arriving notifications come before their journal commit is durable: everything up
        // to the decision only reads (store, NFVO); the decision waits for the commit.
        let mut waits = Vec::new();
        let items: Vec<(String, Option<std::sync::Arc<Value>>)> = batch
            .into_iter()
            .enumerate()
            .map(|(i, pending)| {
                if let Some(durable) = pending.durable {
                    waits.push((i, durable));
                }
                (pending.key, pending.body)
            })
            .collect();
        let loaded = self
            .read(move |tx| {
                let mut out = Vec::new();
                for (key, body) in items {
                    let id = key
                        .split_once(':')
                        .map(|(_, id)| id)
                        .unwrap_or_default()
                        .to_string();
                    let arriving = body.is_some();
                    let body = match body {
                        Some(body) => Some(body),
                        None => tx.get(&NOTIFICATIONS, &id)?.map(|r| r.body),
                    };
                    // Every notification type that names an operation occurrence: the
                    // occurrence itself, or the one that impacted an NS component.
                    let op = body.as_ref().and_then(|b| {
                        b["nsLcmOpOccId"]
                            .as_str()
                            .or(b["lcmOpOccIdImpactingNsComponent"].as_str())
                    });
                    let own = match op {
                        Some(op) => tx.contains(&OWN_OPS, op)?,
                        None => false,
                    };
                    // A duplicate arriving (its id journaled before, under another pending
                    // key) is not looked at: no Query NS for it.
                    let duplicate = arriving
                        && tx.contains(&NOTIFICATIONS, &id)?
                        && !tx.contains(&PENDING, &key)?;
                    out.push((key, id, body, own, duplicate));
                }
                Ok(out)
            })
            .await;
        let loaded = match loaded {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "reading the journal");
                return;
            }
        };
        let mut events: Vec<(Option<usize>, Event)> = Vec::new();
        let mut checks = BTreeSet::new();
        // VNFs our own operations created (a replacement) are expected; everything else new
        // is checked, even when the notification is about our operation.
        let mut expected = BTreeSet::new();
        let mut profiles = BTreeMap::new();
        let mut removed = BTreeMap::new();
        let mut needs_refresh = false;
        let mut items = Vec::new();
        for (index, (key, id, body, own, duplicate)) in loaded.into_iter().enumerate() {
            if duplicate {
                // Its durable answer is "not new": it is dropped below.
                continue;
            }
            let Some(body) = body else {
                items.push((index, key, id, json!(null)));
                continue;
            };
            // The intake checked the common attributes; a body that still does not parse
            // carries no event (and is marked processed with the parse error).
            let typed = match <Notification as serde::Deserialize>::deserialize(&*body) {
                Ok(n) => n,
                Err(e) => {
                    items.push((index, key, id, json!({ "unreadable": e.to_string() })));
                    continue;
                }
            };
            let (found, check) = notification_events(&typed, own);
            events.extend(found.into_iter().map(|e| (Some(index), e)));
            checks.extend(check);
            removed.extend(removal_evidence(&typed));
            for vnf in &typed.affected_vnf {
                if own {
                    expected.insert(vnf.vnf_instance_id.clone());
                }
                if let Some(profile) = &vnf.vnf_profile_id {
                    profiles.insert(vnf.vnf_instance_id.clone(), profile.clone());
                }
            }
            needs_refresh |= typed.notification_type != "NsLcmCapacityShortageNotification";
            let detail = json!({ "notificationType": body["notificationType"],
                                 "nsInstanceId": body["nsInstanceId"], "own": own });
            items.push((index, key, id, detail));
        }
        let outcome = if needs_refresh {
            self.refresh(&checks, &expected, &profiles, &removed)
                .await
                .map(Some)
        } else {
            Ok(None)
        };
        // Only notifications now durable and new are acted on and marked processed.
        let mut dropped = BTreeSet::new();
        for (index, durable) in waits {
            if !matches!(durable.await, Ok(true)) {
                dropped.insert(index);
            }
        }
        let refreshed = match outcome {
            Ok(Some(mut r)) => {
                events.extend(std::mem::take(&mut r.events).into_iter().map(|e| (None, e)));
                Some(r)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, notifications = items.len(), "refresh failed; notifications stay pending");
                return;
            }
        };
        let events: Vec<Event> = events
            .into_iter()
            .filter(|(index, _)| index.is_none_or(|i| !dropped.contains(&i)))
            .map(|(_, e)| e)
            .collect();
        let done: Vec<(String, String, Value)> = items
            .into_iter()
            .filter(|(index, ..)| !dropped.contains(index))
            .map(|(_, key, id, detail)| (key, id, detail))
            .collect();
        if done.is_empty() && events.is_empty() {
            return;
        }
        let cause = match done.as_slice() {
            [(_, id, _)] => id.clone(),
            _ => format!("{} notifications", done.len()),
        };
        let mut actions = self
            .decide(events, &cause, refreshed.as_ref().map(|r| &r.inventory))
            .await;
        // SecEnforce.003 same-host option: resolved now, while the VNF still runs, and
        // journaled in the same commit as its Terminate (src/sm/hosts.rs).
        self.same_host_decisions(&mut actions).await;
        let change = refreshed.map(|r| r.change).unwrap_or_default();
        let terminated = change.terminated.clone();
        match self.finish_pending(done, actions, change).await {
            Ok(started) => {
                for action in started {
                    self.spawn_action(action, true);
                }
                self.erase_terminated(terminated);
            }
            Err(e) => tracing::error!(error = %e, "journaling the outcome of notifications"),
        }
    }

    /// Query NS (every page, with `vnfInstance`), compare with the inventory, run the
    /// package checks, and judge which absent VNFs are terminated. `removed`: evidence of
    /// removal or termination carried by the notifications being processed. The caller stores
    /// the change ([`InventoryChange::store`]) in its own commit, then erases what has
    /// evidence ([`Sm::erase_terminated`]).
    pub(crate) async fn refresh(
        self: &std::sync::Arc<Self>,
        checks: &BTreeSet<String>,
        expected: &BTreeSet<String>,
        profiles: &BTreeMap<String, String>,
        removed: &BTreeMap<String, String>,
    ) -> Result<Refreshed, SmError> {
        let ns: Vec<NsInstance> = self
            .nfvo
            .get_list(
                Interface::StatusInfo,
                Api::NsLcm,
                &format!("/ns_instances?{NS_FIELDS}"),
            )
            .await?;
        let mut now = inventory_from(&ns);
        let (before, absent): (BTreeMap<String, VnfRecord>, BTreeMap<String, AbsentVnf>) = self
            .read(|tx| {
                Ok((
                    tx.list(&INVENTORY, "")?.into_iter().collect(),
                    tx.list(&ABSENT, "")?.into_iter().collect(),
                ))
            })
            .await?;
        // The VNF profile (needed to re-instantiate) is only in notifications' affectedVnf.
        for (id, record) in now.iter_mut() {
            record.vnf_profile_id = profiles.get(id).cloned().or_else(|| {
                before
                    .get(id)
                    .or_else(|| absent.get(id).map(|a| &a.record))
                    .and_then(|old| old.vnf_profile_id.clone())
            });
        }
        let d = diff(&before, &now);
        let busy = self.busy_vnfs();
        let mut events = Vec::new();
        let mut to_check: BTreeSet<String> = checks.clone();
        // New VNFs (not those that were only absent for a while) are checked.
        to_check.extend(
            d.added
                .iter()
                .filter(|id| !expected.contains(*id) && !absent.contains_key(*id))
                .cloned(),
        );
        for id in &d.relinked {
            if !busy.contains(id) && !expected.contains(id) {
                events.push(Event {
                    kind: RuleEvent::TopologyChange,
                    vnf_instance_id: id.clone(),
                    detail: json!({ "extVirtualLinkInfo": "changed", "seenBy": "Query NS" }),
                });
            }
        }
        for id in to_check {
            if let Some(vnf) = now.get(&id) {
                events.extend(self.package_events(vnf).await?);
            }
        }
        let changed: Vec<VnfRecord> = now
            .iter()
            .filter(|(id, record)| before.get(*id) != Some(*record))
            .map(|(_, record)| record.clone())
            .collect();
        let gone: Vec<VnfRecord> = d
            .gone
            .iter()
            .filter_map(|id| before.get(id).cloned())
            .collect();
        let returned: Vec<String> = absent
            .keys()
            .filter(|id| now.contains_key(*id))
            .cloned()
            .collect();
        // Terminated, with evidence: absent from a complete view AND named as removed or
        // terminated by a completed operation; or shown NOT_INSTANTIATED.
        let mut terminated = BTreeMap::new();
        let still_absent: BTreeSet<String> = absent
            .keys()
            .filter(|id| !now.contains_key(*id))
            .cloned()
            .chain(d.gone.iter().cloned())
            .collect();
        for id in &still_absent {
            if let Some(evidence) = removed.get(id) {
                terminated.insert(id.clone(), evidence.clone());
            }
        }
        for (id, record) in &now {
            let was = before.get(id).map(|b| b.instantiation_state.as_str());
            if record.instantiation_state == "NOT_INSTANTIATED" && was != Some("NOT_INSTANTIATED") {
                terminated.insert(
                    id.clone(),
                    format!(
                        "Query NS: instantiationState NOT_INSTANTIATED in {:?}",
                        record.ns_instance_ids
                    ),
                );
            }
        }
        // Newly absent VNFs without evidence yet: look for the operation that removed them.
        let newly: BTreeSet<String> = d
            .gone
            .iter()
            .filter(|id| !terminated.contains_key(*id))
            .cloned()
            .collect();
        if !newly.is_empty() {
            terminated.extend(self.removal_in_op_occs(&newly).await?);
        }
        Ok(Refreshed {
            events,
            inventory: now,
            change: InventoryChange {
                gone,
                returned,
                changed,
                terminated,
            },
        })
    }

    /// Completed operation occurrences (every page of `ns_lcm_op_occs`) that name one of
    /// `vnfs` as removed or terminated: evidence that it is terminated. An occurrence listed
    /// without `resourceChanges` (left out by the NFVO) is read on its own.
    pub(crate) async fn removal_in_op_occs(
        &self,
        vnfs: &BTreeSet<String>,
    ) -> Result<BTreeMap<String, String>, SmError> {
        let occs: Vec<NsLcmOpOcc> = self
            .nfvo
            .get_list(Interface::StatusInfo, Api::NsLcm, "/ns_lcm_op_occs")
            .await?;
        let mut found = BTreeMap::new();
        for listed in occs {
            if !listed.succeeded() || !matches!(listed.operation.as_str(), "UPDATE" | "TERMINATE") {
                continue;
            }
            let occ = if listed.resource_changes.is_none() {
                let path = format!("/ns_lcm_op_occs/{}", super::path_segment(&listed.id)?);
                self.nfvo
                    .get_typed::<NsLcmOpOcc>(Interface::StatusInfo, Api::NsLcm, &path)
                    .await?
            } else {
                listed
            };
            for vnf in occ.resource_changes.iter().flat_map(|r| &r.affected_vnfs) {
                if vnfs.contains(&vnf.vnf_instance_id) && vnf.removed() {
                    found.insert(
                        vnf.vnf_instance_id.clone(),
                        format!(
                            "ns_lcm_op_occs/{}: {} {} {} COMPLETED",
                            occ.id,
                            occ.operation,
                            occ.operation_state,
                            vnf.change_type.as_deref().unwrap_or_default()
                        ),
                    );
                }
            }
        }
        Ok(found)
    }

    /// IFA 033 6.2 NOTE: VnfPkgInfo gives the package checksum and state.
    async fn package_events(&self, vnf: &VnfRecord) -> Result<Vec<Event>, SmError> {
        let mut events = Vec::new();
        if vnf.vnf_pkg_id.is_empty() {
            return Ok(events);
        }
        let path = format!("/vnf_packages/{}", super::path_segment(&vnf.vnf_pkg_id)?);
        let detail = |extra: Value| {
            let mut d = json!({ "vnfPkgId": vnf.vnf_pkg_id, "vnfdId": vnf.vnfd_id });
            if let (Some(d), Some(e)) = (d.as_object_mut(), extra.as_object()) {
                d.extend(e.clone());
            }
            d
        };
        let event = |kind, detail| Event {
            kind,
            vnf_instance_id: vnf.vnf_instance_id.clone(),
            detail,
        };
        match self
            .nfvo
            .get_typed::<VnfPkgInfo>(Interface::StatusInfo, Api::VnfPkgm, &path)
            .await
        {
            Err(e) if e.status() == Some(404) => {
                events.push(event(RuleEvent::PackageUnknown, detail(json!({}))));
            }
            Err(e) => return Err(e.into()),
            Ok(package) => {
                if package.operational_state.as_deref() == Some("DISABLED") {
                    events.push(event(RuleEvent::PackageDisabled, detail(json!({}))));
                }
                if let Some(pinned) = self.config.pinned_packages.get(&vnf.vnf_pkg_id) {
                    let (actual, algorithm) = package
                        .checksum
                        .as_ref()
                        .map(|c| (c.hash.as_str(), c.algorithm.as_str()))
                        .unwrap_or_default();
                    if !actual.eq_ignore_ascii_case(pinned) {
                        events.push(event(
                            RuleEvent::PackageChecksumMismatch,
                            detail(json!({ "pinned": pinned, "actual": actual,
                                           "algorithm": algorithm })),
                        ));
                    }
                }
            }
        }
        Ok(events)
    }

    /// Turn events into actions per the rules and the mode (not yet journaled).
    async fn decide(
        &self,
        events: Vec<Event>,
        notification: &str,
        inventory: Option<&BTreeMap<String, VnfRecord>>,
    ) -> Vec<Decision> {
        let mut decisions: Vec<Decision> = Vec::new();
        for event in events {
            let rule = rule_for(&self.config.rules, event.kind).cloned();
            let audit = json!({ "event": event_name(event.kind), "vnfInstanceId": event.vnf_instance_id,
                                "detail": event.detail, "notificationId": notification,
                                "rule": rule, "mode": self.mode() });
            let mut decision = Decision {
                vnf_instance_id: event.vnf_instance_id.clone(),
                audit,
                action: None,
            };
            let Some(rule) = rule.filter(|r| r.action == RuleAction::Terminate) else {
                decisions.push(decision);
                continue;
            };
            let id = terminate_id(&event.vnf_instance_id);
            if decisions
                .iter()
                .any(|d| d.action.as_ref().is_some_and(|a| a.id == id))
            {
                continue;
            }
            let vnf = match inventory {
                Some(inventory) => inventory.get(&event.vnf_instance_id).cloned(),
                None => {
                    let vnf_id = event.vnf_instance_id.clone();
                    self.read(move |tx| tx.get(&INVENTORY, &vnf_id))
                        .await
                        .ok()
                        .flatten()
                }
            };
            let Some(vnf) = vnf else {
                decisions.push(decision);
                continue;
            };
            let requested = TerminateOptions {
                snapshot: rule.snapshot,
                allow_replacement: rule.allow_replacement,
                disable_package: rule.disable_package,
                erase: rule.erase,
            };
            let (mut allowed, mut refused) = gate(self.mode(), requested);
            if allowed.allow_replacement
                && matches!(
                    event.kind,
                    RuleEvent::PackageChecksumMismatch
                        | RuleEvent::PackageDisabled
                        | RuleEvent::PackageUnknown
                )
            {
                // A replacement would come from the same package and carry the same fault
                // (and be terminated again).
                allowed.allow_replacement = false;
                refused
                    .push("allowReplacement (the replacement would use the same package)".into());
            }
            decision.action = Some(Action::terminate(
                &vnf,
                self.mode(),
                (allowed, refused),
                event_name(event.kind),
                json!({ "notificationId": notification, "event": event.detail }),
            ));
            decisions.push(decision);
        }
        decisions
    }

    /// One durable commit: the notifications processed (one audit entry for the batch), the
    /// inventory, the actions journaled (a termination already journaled for that VNF is not
    /// created again). Returns the actions to run.
    async fn finish_pending(
        &self,
        done: Vec<(String, String, Value)>,
        actions: Vec<Decision>,
        change: InventoryChange,
    ) -> Result<Vec<Action>, SmError> {
        let started = self
            .journal
            .write_async(move |tx| {
                let mut ids = Vec::with_capacity(done.len());
                for (key, id, detail) in done {
                    // Already processed (found by a scan of the journal and also handed over
                    // on arrival): once is enough.
                    if !tx.contains(&PENDING, &key)? {
                        continue;
                    }
                    tx.delete(&PENDING, &key)?;
                    tx.put(&PROCESSED, &key, &id)?;
                    ids.push(json!({ "id": id, "detail": detail }));
                }
                if !ids.is_empty() {
                    tx.audit(
                        crate::store::AuditEvent::new(
                            "nfvo",
                            "sm.notifications",
                            format!("{} processed", ids.len()),
                        )
                        .with_detail(Value::Array(ids)),
                    );
                }
                change.store(tx)?;
                journal_actions(tx, actions)
            })
            .await?;
        Ok(started)
    }

    /// Recover what lost notifications would have said: the subscription, the NS state
    /// (Query NS), refused operations and removals (`ns_lcm_op_occs`), and pending
    /// notifications. Rules are evaluated on the reconciled state: every known VNF's package
    /// is checked again (a checksum that no longer matches is acted on, whether or not a
    /// CHANGE_VNFPKG notification arrived).
    pub(crate) async fn reconcile(self: &std::sync::Arc<Self>) -> Result<(), SmError> {
        self.reconcile_subscription().await?;
        let known: BTreeSet<String> = self
            .read(|tx| {
                Ok(tx
                    .list(&INVENTORY, "")?
                    .into_iter()
                    .map(|(k, _)| k)
                    .collect())
            })
            .await?;
        let mut refreshed = self
            .refresh(&known, &BTreeSet::new(), &BTreeMap::new(), &BTreeMap::new())
            .await?;
        let mut events = std::mem::take(&mut refreshed.events);
        let occs: Vec<NsLcmOpOcc> = self
            .nfvo
            .get_list(Interface::StatusInfo, Api::NsLcm, "/ns_lcm_op_occs")
            .await?;
        let mut seen = Vec::new();
        for occ in occs {
            if !occ.refused_as_unauthorized() {
                continue;
            }
            let op_id = occ.id.clone();
            if self
                .read(move |tx| tx.contains(&SEEN_FAILURES, &op_id))
                .await?
            {
                continue;
            }
            seen.push(occ.id.clone());
            for vnf in occ.resource_changes.iter().flat_map(|r| &r.affected_vnfs) {
                events.push(Event {
                    kind: RuleEvent::UnauthorizedChange,
                    vnf_instance_id: vnf.vnf_instance_id.clone(),
                    detail: json!({ "nsLcmOpOccId": occ.id, "error": occ.error, "seenBy": "ns_lcm_op_occs" }),
                });
            }
        }
        // VNFs absent for a while without evidence: look again (the operation that removed
        // them may have completed since, or its notification been lost).
        let absent: BTreeSet<String> = self
            .read(|tx| Ok(tx.list(&ABSENT, "")?.into_iter().map(|(k, _)| k).collect()))
            .await?;
        let waiting: BTreeSet<String> = absent
            .into_iter()
            .filter(|id| {
                !refreshed.inventory.contains_key(id)
                    && !refreshed.change.terminated.contains_key(id)
            })
            .collect();
        if !waiting.is_empty() {
            let found = self.removal_in_op_occs(&waiting).await?;
            refreshed.change.terminated.extend(found);
        }
        let mut actions = self
            .decide(events, "reconciliation", Some(&refreshed.inventory))
            .await;
        self.same_host_decisions(&mut actions).await;
        let change = refreshed.change;
        let terminated = change.terminated.clone();
        let started = self
            .journal
            .write_async(move |tx| {
                for op in &seen {
                    tx.put(&SEEN_FAILURES, op, &now())?;
                }
                change.store(tx)?;
                journal_actions(tx, actions)
            })
            .await?;
        self.erase_terminated(terminated);
        for action in started {
            self.spawn_action(action, true);
        }
        match self.prune_journal().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(notifications = n, "journal pruned"),
            Err(e) => tracing::warn!(error = %e, "pruning the journal"),
        }
        // Notifications journaled before a restart or left pending by an NFVO outage,
        // oldest first.
        let pending: Vec<String> = self
            .read(|tx| {
                tx.list(&PENDING, "")
                    .map(|v| v.into_iter().map(|(k, _)| k).collect())
            })
            .await?;
        for batch in pending.chunks(super::BATCH) {
            self.process_batch(batch.iter().cloned().map(super::Pending::stored).collect())
                .await;
        }
        Ok(())
    }
}

/// Journal decided actions in `tx`: audit each event, store each new action. The first
/// step of an action that will run is journaled SENDING right here, in the same commit as
/// the decision, so the request can leave without another commit; after a crash the step
/// is looked up before it is sent again. Returns the actions to run.
fn journal_actions(
    tx: &mut crate::store::WriteTx<'_>,
    decisions: Vec<Decision>,
) -> Result<Vec<Action>, crate::store::StoreError> {
    let mut started = Vec::new();
    // VNFs whose Terminate is journaled by this commit: a same-host action goes in only
    // with its Terminate (never on its own after an earlier one).
    let mut fresh_terminations = BTreeSet::new();
    for decision in decisions {
        let event = decision.audit["event"]
            .as_str()
            .unwrap_or("event")
            .to_string();
        tx.audit(
            crate::store::AuditEvent::new(
                "warden-sm",
                format!("sm.event.{event}"),
                decision.vnf_instance_id,
            )
            .with_detail(decision.audit),
        );
        let Some(mut action) = decision.action else {
            continue;
        };
        if action.kind == ActionKind::SameHostTerminate
            && !fresh_terminations.contains(&action.vnf_instance_id)
        {
            continue;
        }
        if let Some(existing) = tx.get(&ACTIONS, &action.id)? {
            // A termination only recorded (in PASSIVE) does not block the VNF once the
            // mode allows enforcing: the new decision replaces it.
            if !(existing.state == ActionState::Recorded && action.state == ActionState::Running) {
                continue;
            }
        }
        let verb = match action.state {
            ActionState::Recorded => "sm.action.record",
            _ => "sm.action.start",
        };
        tx.audit(
            crate::store::AuditEvent::new("warden-sm", verb, action.id.clone()).with_detail(
                json!({ "options": action.options, "mode": action.mode, "steps": action.steps.len() }),
            ),
        );
        for refused in &action.refused {
            tx.audit(
                crate::store::AuditEvent::new("warden-sm", "sm.action.refuse", action.id.clone())
                    .with_detail(json!({ "option": refused, "mode": action.mode })),
            );
        }
        if action.state == ActionState::Running {
            if let Some(first) = action.steps.first_mut() {
                if matches!(first.kind, StepKind::UpdateNs { .. }) {
                    first.state = StepState::Sending;
                    first.attempts = 1;
                }
            }
        }
        tx.put(&ACTIONS, &action.id, &action)?;
        if action.kind == ActionKind::Terminate {
            fresh_terminations.insert(action.vnf_instance_id.clone());
        }
        if action.state == ActionState::Running {
            started.push(action);
        }
    }
    Ok(started)
}

impl Action {
    /// A termination of `vnf` with the options the mode allowed and those it refused:
    /// RECORDED in PASSIVE, RUNNING otherwise.
    pub fn terminate(
        vnf: &VnfRecord,
        mode: SmMode,
        (allowed, refused): (TerminateOptions, Vec<String>),
        trigger: &str,
        cause: Value,
    ) -> Action {
        let id = terminate_id(&vnf.vnf_instance_id);
        let created = now();
        Action {
            steps: terminate_steps(&format!("{id}@{created}"), vnf, allowed),
            id,
            kind: ActionKind::Terminate,
            vnf_instance_id: vnf.vnf_instance_id.clone(),
            host: None,
            trigger: trigger.to_string(),
            cause,
            mode,
            options: allowed,
            refused,
            state: if mode == SmMode::Passive {
                ActionState::Recorded
            } else {
                ActionState::Running
            },
            reason: None,
            created: created.clone(),
            updated: created,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn semi_active_refuses_the_fully_active_options() {
        let all = TerminateOptions {
            snapshot: true,
            allow_replacement: true,
            disable_package: true,
            erase: true,
        };
        let (allowed, refused) = gate(SmMode::SemiActive, all);
        assert!(allowed.snapshot && allowed.allow_replacement);
        assert!(!allowed.disable_package && !allowed.erase);
        assert_eq!(refused.len(), 2);
        let (allowed, refused) = gate(SmMode::FullyActive, all);
        assert_eq!(allowed, all);
        assert!(refused.is_empty());
    }

    #[test]
    fn a_vnf_in_two_ns_is_removed_from_both() {
        let vnf = VnfRecord {
            vnf_instance_id: "v1".into(),
            ns_instance_ids: ["ns-a".to_string(), "ns-b".to_string()].into(),
            vnfd_id: "d".into(),
            vnf_pkg_id: "p".into(),
            instantiation_state: "INSTANTIATED".into(),
            ..Default::default()
        };
        let steps = terminate_steps("terminate:v1", &vnf, TerminateOptions::default());
        let removes: Vec<&str> = steps
            .iter()
            .filter_map(|s| match &s.kind {
                StepKind::UpdateNs {
                    ns_instance_id,
                    request,
                    ..
                } if request["updateType"] == "REMOVE_VNF" => Some(ns_instance_id.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(removes, ["ns-a", "ns-b"]);
    }
}
