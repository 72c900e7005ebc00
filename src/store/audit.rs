//! The audit hash chain: appended in the same transaction as the change it records, verified
//! from the first entry.

use std::time::SystemTime;

use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::tables::{AUDIT_HEAD, META};
use super::{decode, encode, storage, StoreError, AUDIT_TABLE, META_TABLE};

pub(super) const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new(AUDIT_TABLE);
const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What a caller records in the audit chain, in the same transaction as the change.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Who: an mTLS identity, `nfvo`, `cli:<user>`, `warden` for the agent itself.
    pub actor: String,
    /// What, as a verb: `key.generate`, `cert.issue`, `vnf.erase`.
    pub action: String,
    /// On what: a key reference, a certificate serial, a VNF instance id.
    pub subject: String,
    pub detail: serde_json::Value,
}

impl AuditEvent {
    pub fn new(
        actor: impl Into<String>,
        action: impl Into<String>,
        subject: impl Into<String>,
    ) -> Self {
        AuditEvent {
            actor: actor.into(),
            action: action.into(),
            subject: subject.into(),
            detail: serde_json::Value::Null,
        }
    }

    pub fn with_detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = detail;
        self
    }
}

/// One link of the audit hash chain.
///
/// `hash = SHA-256(prev_hash bytes || canonical JSON of the entry without "hash")`, where
/// canonical JSON has object keys sorted and no whitespace; the first entry's `prev_hash` is
/// 32 zero bytes. Tampering with an entry breaks its own hash and every later link.
/// Truncating the tail is caught by `meta.audit_head`. The chain is tamper-evident against
/// edits of the file, not against someone who rewrites the chain and the head together: that
/// needs an external anchor, e.g. the head signed with an HSM key or shipped to a remote
/// log (not done yet).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: u64,
    /// RFC 3339 UTC with milliseconds.
    pub time: String,
    pub actor: String,
    pub action: String,
    pub subject: String,
    pub detail: serde_json::Value,
    /// Hex.
    pub prev_hash: String,
    /// Hex.
    pub hash: String,
}

/// Appends `events` to the chain in `txn` and moves `meta.audit_head`. On error `txn` holds
/// part of it and must be aborted, never committed.
pub(super) fn append(
    txn: &redb::WriteTransaction,
    events: Vec<AuditEvent>,
) -> Result<(), StoreError> {
    if events.is_empty() {
        return Ok(());
    }
    let mut audit = txn.open_table(AUDIT).map_err(|source| StoreError::Table {
        table: AUDIT_TABLE,
        source,
    })?;
    let (mut seq, mut prev_hash) = match audit.last().map_err(storage(AUDIT_TABLE))? {
        Some((key, value)) => {
            let last: AuditEntry = decode(AUDIT_TABLE, &key.value().to_string(), value.value())?;
            (last.seq, last.hash)
        }
        None => (0, GENESIS_HASH.to_string()),
    };
    for event in events {
        seq += 1;
        let mut entry = AuditEntry {
            seq,
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            actor: event.actor,
            action: event.action,
            subject: event.subject,
            detail: event.detail,
            prev_hash,
            hash: String::new(),
        };
        entry.hash = audit_hash(&entry)?;
        let key = seq.to_string();
        let bytes = encode(AUDIT_TABLE, &key, &entry)?;
        audit
            .insert(seq, bytes.as_slice())
            .map_err(storage(AUDIT_TABLE))?;
        prev_hash = entry.hash;
    }
    let mut meta = txn.open_table(META).map_err(|source| StoreError::Table {
        table: META_TABLE,
        source,
    })?;
    meta.insert(AUDIT_HEAD, seq).map_err(storage(META_TABLE))?;
    Ok(())
}

/// Recomputes the chain from the first entry over one snapshot; returns the number of entries.
pub(super) fn verify(txn: &redb::ReadTransaction) -> Result<u64, StoreError> {
    let head = match txn.open_table(META) {
        Ok(meta) => meta
            .get(AUDIT_HEAD)
            .map_err(storage(META_TABLE))?
            .map(|guard| guard.value())
            .unwrap_or(0),
        Err(redb::TableError::TableDoesNotExist(_)) => 0,
        Err(source) => {
            return Err(StoreError::Table {
                table: META_TABLE,
                source,
            })
        }
    };
    let audit = match txn.open_table(AUDIT) {
        Ok(table) => Some(table),
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(source) => {
            return Err(StoreError::Table {
                table: AUDIT_TABLE,
                source,
            })
        }
    };
    let mut prev_hash = GENESIS_HASH.to_string();
    let mut count = 0u64;
    if let Some(audit) = audit {
        for item in audit.iter().map_err(storage(AUDIT_TABLE))? {
            let (key, value) = item.map_err(storage(AUDIT_TABLE))?;
            let seq = count + 1;
            let broken = |reason: String| StoreError::AuditChainBroken { seq, reason };
            if key.value() != seq {
                return Err(broken(format!(
                    "found seq {} where {seq} was due",
                    key.value()
                )));
            }
            let entry: AuditEntry = serde_json::from_slice(value.value())
                .map_err(|err| broken(format!("entry does not decode: {err}")))?;
            if entry.seq != seq {
                return Err(broken(format!("entry says seq {}", entry.seq)));
            }
            if entry.prev_hash != prev_hash {
                return Err(broken("prev_hash does not match the previous entry".into()));
            }
            if audit_hash(&entry)? != entry.hash {
                return Err(broken("hash does not match the entry's content".into()));
            }
            prev_hash = entry.hash;
            count = seq;
        }
    }
    if count != head {
        return Err(StoreError::AuditChainBroken {
            seq: count,
            reason: format!("chain ends at {count} but the recorded head is {head}"),
        });
    }
    Ok(count)
}

/// Up to `limit` entries from `from_seq` on, in order.
pub(super) fn entries(
    txn: &redb::ReadTransaction,
    from_seq: u64,
    limit: usize,
) -> Result<Vec<AuditEntry>, StoreError> {
    let audit = match txn.open_table(AUDIT) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(source) => {
            return Err(StoreError::Table {
                table: AUDIT_TABLE,
                source,
            })
        }
    };
    let mut entries = Vec::new();
    for item in audit.range(from_seq..).map_err(storage(AUDIT_TABLE))? {
        if entries.len() >= limit {
            break;
        }
        let (key, value) = item.map_err(storage(AUDIT_TABLE))?;
        entries.push(decode(
            AUDIT_TABLE,
            &key.value().to_string(),
            value.value(),
        )?);
    }
    Ok(entries)
}

/// SHA-256 over the previous hash's bytes and the canonical JSON of `entry` without `hash`.
fn audit_hash(entry: &AuditEntry) -> Result<String, StoreError> {
    let key = entry.seq.to_string();
    let mut value = serde_json::to_value(entry).map_err(|source| StoreError::Encode {
        table: AUDIT_TABLE,
        key: key.clone(),
        source,
    })?;
    if let serde_json::Value::Object(fields) = &mut value {
        fields.remove("hash");
    }
    let prev = hex::decode(&entry.prev_hash).map_err(|err| StoreError::AuditChainBroken {
        seq: entry.seq,
        reason: format!("prev_hash is not hex: {err}"),
    })?;
    let mut canonical = String::new();
    canonical_json(&value, &mut canonical);
    let mut hasher = Sha256::new();
    hasher.update(&prev);
    hasher.update(canonical.as_bytes());
    Ok(hex::encode(hasher.finalize()))
}

/// JSON with object keys sorted (recursively) and no whitespace, so the bytes hashed do not
/// depend on serde_json's map type (its `preserve_order` feature may be on through another
/// crate). Strings and numbers use serde_json's own formatting.
fn canonical_json(value: &serde_json::Value, out: &mut String) {
    match value {
        serde_json::Value::Object(fields) => {
            let mut keys: Vec<&String> = fields.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::Value::String(key.clone()).to_string());
                out.push(':');
                canonical_json(&fields[key], out);
            }
            out.push('}');
        }
        serde_json::Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_json(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json_sorts_keys_at_every_level() {
        let value = serde_json::json!({"b": 1, "a": {"d": [1, {"z": 0, "y": "é"}], "c": null}});
        let mut out = String::new();
        canonical_json(&value, &mut out);
        assert_eq!(out, r#"{"a":{"c":null,"d":[1,{"y":"é","z":0}]},"b":1}"#);
    }

    #[test]
    fn audit_hash_covers_every_field_but_hash() {
        let entry = AuditEntry {
            seq: 1,
            time: "2025-01-01T00:00:00.000Z".into(),
            actor: "warden".into(),
            action: "key.generate".into(),
            subject: "tpm:handle=0x81000100".into(),
            detail: serde_json::json!({"purpose": "ca"}),
            prev_hash: GENESIS_HASH.into(),
            hash: String::new(),
        };
        let base = audit_hash(&entry).unwrap();
        let with_hash = AuditEntry {
            hash: "ff".into(),
            ..entry.clone()
        };
        assert_eq!(audit_hash(&with_hash).unwrap(), base);
        let other_actor = AuditEntry {
            actor: "nfvo".into(),
            ..entry.clone()
        };
        assert_ne!(audit_hash(&other_actor).unwrap(), base);
        let other_detail = AuditEntry {
            detail: serde_json::json!({"purpose": "tls"}),
            ..entry
        };
        assert_ne!(audit_hash(&other_detail).unwrap(), base);
    }
}
