//! Embedded durable store (redb): the agent's only state.
//!
//! Every flow that acknowledges something to a peer (a certificate issued, a notification
//! journaled, a key erased) does so only after the record is in this store and `fsync`ed.
//!
//! # Durability
//!
//! Every write transaction is committed with [`redb::Durability::Immediate`] (redb's default,
//! set explicitly so a change of default cannot weaken it): `commit` returns only after the
//! data and the commit slot are `fsync`ed. Two-phase commit is also enabled: redb then writes
//! the new commit slot, `fsync`s, flips the primary bit and `fsync`s again, instead of relying
//! on a non-cryptographic checksum to pick the valid slot after a crash. It costs a second
//! `fsync` per commit, which [`GroupCommit`] amortizes; for a CA's issuance record the
//! hardening is worth it.
//!
//! # Layout
//!
//! - `meta` (`&str -> u64`): `schema_version`, `audit_head` (the seq of the last audit entry).
//! - `audit` (`u64 -> JSON`): the append-only hash chain, see [`AuditEntry`].
//! - one `&str -> JSON` table per [`Table`] const ([`KEYS`], [`ERASURES`], ...).
//!
//! # Writes are staged, then applied
//!
//! A write closure never touches the redb transaction directly: [`WriteTx`] records its puts,
//! deletes and audit events in a staging buffer, and reads see that buffer over the
//! transaction. Only when the closure returns `Ok` is the buffer kept: the kept buffers of a
//! transaction are applied together at its end, each table opened once and the audit chain
//! extended once, and a later closure reads the earlier ones' buffers over the transaction.
//! This is what lets [`GroupCommit`] run many callers' closures in one redb transaction and
//! still drop exactly the writes of a closure that fails (or panics).
//!
//! redb savepoints cannot do that job: in redb 4 `WriteTransaction::ephemeral_savepoint`
//! returns `SavepointError::InvalidSavepoint` once the transaction is "dirty", i.e. once any
//! data table has been opened in it (and restoring a savepoint makes it dirty too), so a
//! savepoint can only be taken before the first closure of a batch, not between closures.
//!
//! # Modules
//!
//! - `engine`: [`Store`]: creating and opening the file, the schema version, durable commits,
//!   and reopening the database after an I/O error (see "Recovery" there).
//! - `group`: [`GroupCommit`], many callers' writes in one durable transaction.
//! - `tx`: [`WriteTx`] (staged writes) and [`ReadTx`] (snapshots).
//! - `tables`: [`Table`] and the record types stored in the agent's own tables.
//! - `audit`: the append-only hash chain ([`AuditEvent`], [`AuditEntry`]).

use std::path::PathBuf;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

mod audit;
mod engine;
mod group;
mod tables;
mod tx;

pub use audit::{AuditEntry, AuditEvent};
pub use engine::{Store, SCHEMA_VERSION};
pub use group::GroupCommit;
pub use tables::{
    ErasureEntry, KeyPurpose, KeyRecord, Table, AUDIT_TABLE, ERASURES, KEYS, META_TABLE,
};
pub use tx::{ReadTx, WriteTx};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the store directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the store {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: redb::DatabaseError,
    },
    /// `serve` and the other commands never create a store: a lost file must not silently
    /// become an empty one (history, subject ownership and the audit chain would be gone).
    #[error("the store {path} does not exist; create a new one with `warden store init`, or restore it from a backup")]
    Missing { path: PathBuf },
    #[error("the store {path} is empty (0 bytes), so it is not a store: restore it from a backup, or remove it and run `warden store init` to start a new one")]
    Empty { path: PathBuf },
    #[error("the store {path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error(
        "the store {path} is a redb database without a schema version: not a nfv-warden store"
    )]
    NotAStore { path: PathBuf },
    #[error("cannot read the store file {path}")]
    Inspect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the store {path} already exists; `warden store init` never overwrites a store")]
    AlreadyExists { path: PathBuf },
    #[error("cannot create the store {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The database was closed after an I/O error (redb refuses every later operation on a
    /// handle that saw one) and opening it again failed; the next operation tries again.
    #[error("cannot reopen the store {path} after an I/O error")]
    Reopen {
        path: PathBuf,
        #[source]
        source: Box<StoreError>,
    },
    #[error("cannot begin a transaction")]
    Begin(#[source] redb::TransactionError),
    #[error("cannot make the write transaction durable")]
    Durability(#[source] redb::SetDurabilityError),
    /// The outcome of the commit is unknown: redb may have made it durable. The database
    /// refuses further writes until it is reopened.
    #[error("commit")]
    Commit(#[source] redb::CommitError),
    #[error("cannot open table {table}")]
    Table {
        table: &'static str,
        #[source]
        source: redb::TableError,
    },
    #[error("storage error in table {table}")]
    Storage {
        table: &'static str,
        #[source]
        source: redb::StorageError,
    },
    #[error("cannot encode {table}/{key}")]
    Encode {
        table: &'static str,
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot decode {table}/{key}")]
    Decode {
        table: &'static str,
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{table}/{key} already exists")]
    Conflict { table: &'static str, key: String },
    #[error("store schema version {found} is newer than this build supports ({supported}); refusing to open it (upgrade nfv-warden or restore a matching backup)")]
    SchemaTooNew { found: u64, supported: u64 },
    #[error("no migration from store schema version {from}")]
    MigrationMissing { from: u64 },
    #[error("migration from store schema version {from} failed")]
    Migrate {
        from: u64,
        #[source]
        source: Box<StoreError>,
    },
    #[error("audit chain broken at entry {seq}: {reason}")]
    AuditChainBroken { seq: u64, reason: String },
    /// A write closure refused the change for a reason of its caller's domain. Nothing of that
    /// closure was written. Downcast the source to get the caller's error back.
    #[error("write rejected")]
    Rejected(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("write closure panicked; its writes were discarded")]
    ClosurePanicked,
    #[error("cannot start the group commit thread")]
    Spawn(#[source] std::io::Error),
    #[error("the group commit thread is gone")]
    CommitterGone,
    /// The batch this write was part of could not be committed (shared by every caller in it).
    #[error("group commit failed")]
    GroupCommit(#[source] Arc<StoreError>),
}

impl StoreError {
    /// Whether this error leaves the redb handle unusable: after a failed commit or any I/O
    /// error redb answers every later operation with `PreviousIo` until the database is
    /// closed and opened again ([`Store`] then reopens it, see its "Recovery" notes).
    pub(crate) fn poisons_the_handle(&self) -> bool {
        fn storage(e: &redb::StorageError) -> bool {
            matches!(
                e,
                redb::StorageError::Io(_) | redb::StorageError::PreviousIo
            )
        }
        match self {
            StoreError::Commit(_) => true,
            StoreError::Begin(redb::TransactionError::Storage(e))
            | StoreError::Storage { source: e, .. }
            | StoreError::Table {
                source: redb::TableError::Storage(e),
                ..
            } => storage(e),
            StoreError::Migrate { source, .. } => source.poisons_the_handle(),
            StoreError::GroupCommit(inner) => inner.poisons_the_handle(),
            _ => false,
        }
    }

    /// Whether trying the same operation again later may succeed: I/O errors (ENOSPC, EIO,
    /// EROFS fixed by the operator), a failed or unknown commit, a handle being reopened, the
    /// committer restarting. Permanent: a record that does not decode (corrupt, or written by
    /// an incompatible build), an encoding error, a schema or migration problem, a broken
    /// audit chain; retrying those never helps, and a client told "503, retry" would retry for
    /// ever.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Decode { .. }
            | StoreError::Encode { .. }
            | StoreError::SchemaTooNew { .. }
            | StoreError::MigrationMissing { .. }
            | StoreError::NotAStore { .. }
            | StoreError::Missing { .. }
            | StoreError::Empty { .. }
            | StoreError::NotAFile { .. }
            | StoreError::AlreadyExists { .. }
            | StoreError::AuditChainBroken { .. }
            | StoreError::Conflict { .. }
            | StoreError::Rejected(_)
            | StoreError::ClosurePanicked => false,
            StoreError::Migrate { source, .. } | StoreError::Reopen { source, .. } => {
                source.is_transient()
            }
            StoreError::GroupCommit(inner) => inner.is_transient(),
            StoreError::Storage { source, .. } => {
                !matches!(source, redb::StorageError::Corrupted(_))
            }
            _ => true,
        }
    }

    /// The operating-system error at the root of this one (ENOSPC, EROFS, EACCES...), if any.
    pub fn os_error(&self) -> Option<&std::io::Error> {
        fn storage(e: &redb::StorageError) -> Option<&std::io::Error> {
            match e {
                redb::StorageError::Io(io) => Some(io),
                _ => None,
            }
        }
        match self {
            StoreError::CreateDir { source, .. }
            | StoreError::Inspect { source, .. }
            | StoreError::Create { source, .. }
            | StoreError::Spawn(source) => Some(source),
            StoreError::Open {
                source: redb::DatabaseError::Storage(e),
                ..
            }
            | StoreError::Begin(redb::TransactionError::Storage(e))
            | StoreError::Commit(redb::CommitError::Storage(e))
            | StoreError::Storage { source: e, .. }
            | StoreError::Table {
                source: redb::TableError::Storage(e),
                ..
            } => storage(e),
            StoreError::Reopen { source, .. } | StoreError::Migrate { source, .. } => {
                source.os_error()
            }
            StoreError::GroupCommit(inner) => inner.os_error(),
            _ => None,
        }
    }

    /// Refuse a write for a reason of the caller's domain (nothing of the closure lands).
    pub fn rejected<E: std::error::Error + Send + Sync + 'static>(error: E) -> StoreError {
        StoreError::Rejected(Box::new(error))
    }

    /// The caller's own error back from [`StoreError::Rejected`], or `self` when it is a
    /// store failure or another type.
    pub fn into_rejected<E: std::error::Error + 'static>(self) -> Result<E, StoreError> {
        match self {
            StoreError::Rejected(inner) => match inner.downcast::<E>() {
                Ok(e) => Ok(*e),
                Err(other) => Err(StoreError::Rejected(other)),
            },
            other => Err(other),
        }
    }
}
fn encode<V: Serialize>(table: &'static str, key: &str, value: &V) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|source| StoreError::Encode {
        table,
        key: key.to_string(),
        source,
    })
}

fn decode<V: DeserializeOwned>(
    table: &'static str,
    key: &str,
    bytes: &[u8],
) -> Result<V, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Decode {
        table,
        key: key.to_string(),
        source,
    })
}

fn storage(table: &'static str) -> impl Fn(redb::StorageError) -> StoreError {
    move |source| StoreError::Storage { table, source }
}

fn abort(txn: redb::WriteTransaction) {
    if let Err(err) = txn.abort() {
        // Nothing was committed either way; the next transaction reports a lasting fault.
        tracing::warn!(error = %err, "aborting a store transaction failed");
    }
}

// `Store` and `GroupCommit` are shared across threads; keep that a compile-time fact.
const _: fn() = || {
    fn shared<T: Send + Sync>() {}
    shared::<Store>();
    shared::<GroupCommit>();
};
