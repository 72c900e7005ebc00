//! PKCS#11 backend (cryptoki).
//!
//! One initialized library per module per process ([`Library`], shared by every store on
//! that module: `C_Initialize` may run once per process), one login per token, and a bounded
//! pool of sessions per store. Sessions are `Send` but not `Sync`, so each caller borrows one
//! for the duration of its call; when all are busy the caller waits (it does not fail).
//!
//! The parts, one job each:
//! - [`gate`]: the library and its call gate. Every call into the module (C_GetSlotList,
//!   C_GetTokenInfo, C_OpenSession, C_Login, C_FindObjects, the operations) needs an
//!   [`Entered`] guard, the shared side of a lock whose exclusive side is held by
//!   re-initialization: C_Finalize while another thread is inside the module is undefined
//!   behaviour (PKCS#11 2.40 section 5.4), in SoftHSM a use-after-free. The context and the
//!   sessions are only reachable through the guard, so the rule holds by type.
//! - `pool`: the session pool and the login.
//! - `recovery`: which failure climbs which rung of the ladder, and the one-at-a-time,
//!   backed-off re-initialization.
//! - `store`: one token's store: the operation driver (one pass through the gate, then the
//!   ladder), locating the token, finding keys and the rules for an empty search.
//! - `keystore`: the [`KeyStore`](super::KeyStore) operations on top of it.
//! - `objects`: templates and attribute decoding (key types, public keys, mechanisms).
//!
//! Recovery climbs a fixed ladder without restarting the agent:
//! 1. a dead session (`CKR_SESSION_HANDLE_INVALID`, `CKR_SESSION_CLOSED`) is replaced;
//! 2. `CKR_USER_NOT_LOGGED_IN` logs in again;
//! 3. the token or the library in trouble (`CKR_DEVICE_REMOVED`, `CKR_TOKEN_NOT_PRESENT`,
//!    `CKR_CRYPTOKI_NOT_INITIALIZED`, `CKR_DEVICE_ERROR`, `CKR_GENERAL_ERROR`,
//!    `CKR_HOST_MEMORY`, a stale `CKR_OBJECT_HANDLE_INVALID`, the token gone from the slot
//!    list) finalizes and initializes the library again: SoftHSM only sees a token that was
//!    moved, restored or re-initialized after `C_Finalize`/`C_Initialize`. One thread
//!    re-initializes at a time; the others wait for it, and within the backoff window after
//!    a re-initialization they fail at once with [`KeyError::Unavailable`](super::KeyError::Unavailable) naming the token.
//!
//! Object handles are cached per library generation only: a re-initialization makes every
//! handle and session of the old generation dead. A key that a search does not find is
//! reported as [`KeyError::NotFound`](super::KeyError::NotFound) only when the token answers `C_GetTokenInfo` and, for a
//! key this store found before, after one re-initialization and a fresh search: SoftHSM
//! answers an empty search when it cannot open its files (EMFILE) or the token directory is
//! gone, which is not a missing key.
//!
//! A rejected PIN (`CKR_PIN_INCORRECT`, `CKR_PIN_LOCKED`) is never retried: every retry would
//! count against the token's PIN counter and could lock it. The store stays failed until the
//! operator fixes the PIN and restarts it.
//!
//! SoftHSM 2.6 has no `CKM_ECDSA_SHA256`: ECDSA hashes in the agent and signs with
//! `CKM_ECDSA`, then DER-encodes the raw `r || s`. RSA uses the hash-and-sign mechanisms
//! (`CKM_SHA256_RSA_PKCS`, `CKM_SHA256_RSA_PKCS_PSS`, ...), which every token has.

pub mod gate;
mod keystore;
mod objects;
mod pool;
mod recovery;
mod store;

use std::sync::{Mutex, MutexGuard};

pub use gate::{Entered, Library};
pub use objects::PrivateKeyAttributes;
pub use store::{Pkcs11KeyStore, RecoveryStats};

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind; keep going.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
