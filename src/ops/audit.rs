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
