//! One namespace of names: the subject index has one key per name whatever the certType,
//! and a store written before it is upgraded on open.

use std::collections::BTreeMap;

use super::stored_index_key;
use crate::cmf::{Registration, REGISTRATIONS, SUBJECTS};
use crate::store::{AuditEvent, Store, StoreError};

/// A subject index entry a registration claims but does not hold (migration conflicts).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Blocked {
    pub subject: String,
    /// The registration that holds the name.
    pub held_by: String,
}

/// The subjects of `registration` that the index gives to another registration (after a
/// migration conflict), with the holder.
pub fn blocked(
    tx: &crate::store::ReadTx,
    registration: &Registration,
) -> Result<Vec<Blocked>, StoreError> {
    let mut out = Vec::new();
    for subject in &registration.subject_ids {
        let holder = tx.get(&SUBJECTS, &stored_index_key(subject))?;
        if holder.as_deref() != Some(registration.id.as_str()) {
            out.push(Blocked {
                subject: subject.clone(),
                held_by: holder.unwrap_or_else(|| "(nobody)".into()),
            });
        }
    }
    Ok(out)
}

/// certType prefixes of the subject index before one namespace (`{certType}/{subject}`).
const OLD_PREFIXES: [&str; 3] = ["MANO_CERT/", "VNFCI_CERT/", "VNF_OAM_CERT/"];

/// What [`upgrade_index`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Upgrade {
    /// Old index entries rewritten.
    pub migrated: usize,
    /// Names two registrations held: (name key, kept registration, blocked registrations).
    pub conflicts: Vec<(String, String, Vec<String>)>,
}

/// Rewrite a subject index written before one namespace (keys `{certType}/{subject}`) into
/// one key per name, in one durable transaction with an audit entry. Where two
/// registrations held one name (possible before, across certTypes), the older (by
/// `created`, then id) keeps it; the other keeps its registration but cannot use the name
/// (`warden cmf registrations` shows it blocked) until the operator transfers or deletes one
/// of them. Idempotent: a store without old keys is left as it is.
pub fn upgrade_index(store: &Store, actor: &str) -> Result<Upgrade, StoreError> {
    let old: Vec<(String, String)> = store.read(|tx| {
        let mut all = Vec::new();
        for prefix in OLD_PREFIXES {
            all.extend(tx.list(&SUBJECTS, prefix)?);
        }
        Ok(all)
    })?;
    if old.is_empty() {
        return Ok(Upgrade::default());
    }
    store.write(|tx| {
        // New key -> candidate registration ids.
        let mut claims: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut migrated = 0;
        for (key, registration_id) in &old {
            // Re-read inside the write: the snapshot above may be stale.
            if tx.get(&SUBJECTS, key)?.is_none() {
                continue;
            }
            let subject = OLD_PREFIXES
                .iter()
                .find_map(|p| key.strip_prefix(p))
                .unwrap_or(key);
            claims
                .entry(stored_index_key(subject))
                .or_default()
                .push(registration_id.clone());
            tx.delete(&SUBJECTS, key)?;
            migrated += 1;
        }
        let mut conflicts = Vec::new();
        for (name_key, mut ids) in claims {
            ids.sort();
            ids.dedup();
            let mut candidates = Vec::new();
            if let Some(holder) = tx.get(&SUBJECTS, &name_key)? {
                // Already in the new index: it keeps the name.
                candidates.push((String::new(), holder));
            }
            for id in &ids {
                if let Some(registration) = tx.get(&REGISTRATIONS, id)? {
                    candidates.push((registration.created, id.clone()));
                }
            }
            candidates.sort();
            candidates.dedup_by(|a, b| a.1 == b.1);
            let Some((_, kept)) = candidates.first().cloned() else {
                continue;
            };
            tx.put(&SUBJECTS, &name_key, &kept)?;
            let others: Vec<String> = candidates
                .into_iter()
                .map(|(_, id)| id)
                .filter(|id| *id != kept)
                .collect();
            if !others.is_empty() {
                tracing::warn!(name = %name_key, kept = %kept, blocked = ?others,
                    "two registrations held one name: the older keeps it");
                tx.audit(
                    AuditEvent::new(actor, "cmf.names.conflict", &name_key)
                        .with_detail(serde_json::json!({ "kept": kept, "blocked": others })),
                );
                conflicts.push((name_key, kept, others));
            }
        }
        tx.audit(
            AuditEvent::new(actor, "cmf.names.migrate", "cmf_subjects").with_detail(
                serde_json::json!({ "migrated": migrated, "conflicts": conflicts.len() }),
            ),
        );
        Ok(Upgrade {
            migrated,
            conflicts,
        })
    })
}
