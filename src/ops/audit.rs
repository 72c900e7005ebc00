//! The audit hash chain, for the operator: `warden audit verify|list`.

use serde::{Deserialize, Serialize};

use super::OpsError;
use crate::store::{AuditEntry, Store};

/// Most entries one `list` returns.
pub const MAX_PAGE: usize = 10_000;

/// The outcome of a verification of the whole chain.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChainReport {
    /// Entries verified, from the first to the recorded head.
    pub entries: u64,
    /// The hash of the last entry (hex); 64 zeros for an empty chain.
    pub head_hash: String,
}

/// Recompute every link of the chain (see [`AuditEntry`]); an error names the first broken
/// entry.
pub fn verify(store: &Store) -> Result<ChainReport, OpsError> {
    let entries = store.verify_audit_chain()?;
    let head_hash = if entries == 0 {
        "0".repeat(64)
    } else {
        store
            .audit_entries(entries, 1)?
            .pop()
            .map(|entry| entry.hash)
            .ok_or_else(|| {
                OpsError::Failed(format!("audit entry {entries} vanished after verification"))
            })?
    };
    Ok(ChainReport { entries, head_hash })
}

/// Up to `limit` entries: from `after + 1` on when `after` is given, else the last `limit`.
pub fn list(store: &Store, after: Option<u64>, limit: usize) -> Result<Vec<AuditEntry>, OpsError> {
    let limit = limit.clamp(1, MAX_PAGE);
    let from = match after {
        Some(after) => after.saturating_add(1),
        None => last_seq(store)?.saturating_sub(limit as u64 - 1).max(1),
    };
    Ok(store.audit_entries(from, limit)?)
}

/// The seq of the last entry (0 when empty). Entries are numbered 1..=head without gaps, so a
/// binary search over "does entry n exist" finds it in O(log n) point reads.
fn last_seq(store: &Store) -> Result<u64, OpsError> {
    let exists =
        |seq: u64| -> Result<bool, OpsError> { Ok(!store.audit_entries(seq, 1)?.is_empty()) };
    if !exists(1)? {
        return Ok(0);
    }
    // `low` exists; find a `high` that does not.
    let (mut low, mut high) = (1u64, 2u64);
    while exists(high)? {
        low = high;
        high = high.saturating_mul(2);
    }
    while high - low > 1 {
        let mid = low + (high - low) / 2;
        if exists(mid)? {
            low = mid;
        } else {
            high = mid;
        }
    }
    Ok(low)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::AuditEvent;

    #[test]
    fn verify_and_list_the_last_entries_or_those_after_a_seq() {
        let dir = tempfile::tempdir().expect("dir");
        let store = Store::open(&dir.path().join("s.redb")).expect("store");
        let empty = verify(&store).expect("empty chain");
        assert_eq!((empty.entries, empty.head_hash), (0, "0".repeat(64)));
        assert!(list(&store, None, 5).expect("list").is_empty());
        for i in 1..=37u64 {
            store
                .write(|tx| {
                    tx.audit(AuditEvent::new("test", "op", i.to_string()));
                    Ok(())
                })
                .expect("write");
        }
        let report = verify(&store).expect("verify");
        assert_eq!(report.entries, 37);
        let last = list(&store, None, 5).expect("list");
        let seqs: Vec<u64> = last.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [33, 34, 35, 36, 37]);
        assert_eq!(report.head_hash, last[4].hash);
        let after: Vec<u64> = list(&store, Some(10), 3)
            .expect("list")
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(after, [11, 12, 13]);
        assert_eq!(list(&store, None, 100).expect("all").len(), 37);
    }
}
