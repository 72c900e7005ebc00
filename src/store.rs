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
//! transaction. Only when the closure returns `Ok` is the buffer applied to the redb
//! transaction. This is what lets [`GroupCommit`] run many callers' closures in one redb
//! transaction and still drop exactly the writes of a closure that fails (or panics).
//!
//! redb savepoints cannot do that job: in redb 4 `WriteTransaction::ephemeral_savepoint`
//! returns `SavepointError::InvalidSavepoint` once the transaction is "dirty", i.e. once any
//! data table has been opened in it (and restoring a savepoint makes it dirty too), so a
//! savepoint can only be taken before the first closure of a batch, not between closures. The
//! unit test `redb_refuses_a_savepoint_after_a_table_was_opened` pins that behaviour.

use std::collections::{BTreeMap, VecDeque};
use std::marker::PhantomData;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle, ThreadId};
use std::time::SystemTime;

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::keys::{BackendKind, ErasureRecord, KeyAlgorithm, KeyRef};

/// The schema this build writes. Bump it together with a new step in `MIGRATIONS`.
pub const SCHEMA_VERSION: u64 = 1;

/// Name of the table holding `schema_version` and `audit_head`.
pub const META_TABLE: &str = "meta";
/// Name of the append-only audit table.
pub const AUDIT_TABLE: &str = "audit";

/// Keys the agent generated in its HSM or TPM, keyed by their reference.
pub const KEYS: Table<KeyRecord> = Table::new("keys");
/// Erasure records (VNF termination, key retirement), keyed by an erasure id.
pub const ERASURES: Table<ErasureEntry> = Table::new("erasures");

/// A typed table: `&str` keys, values of type `V` stored as JSON.
///
/// Declare each table as a one-line `const`. The names `meta` and `audit` are reserved; using
/// one is a compile error when the table is a `const`.
pub struct Table<V> {
    name: &'static str,
    value: PhantomData<fn() -> V>,
}

impl<V> Table<V> {
    pub const fn new(name: &'static str) -> Self {
        assert!(
            !const_str_eq(name, META_TABLE) && !const_str_eq(name, AUDIT_TABLE),
            "table name is reserved for the store itself"
        );
        Table {
            name,
            value: PhantomData,
        }
    }

    pub const fn name(&self) -> &'static str {
        self.name
    }

    const fn definition(&self) -> TableDefinition<'static, &'static str, &'static [u8]> {
        TableDefinition::new(self.name)
    }
}

impl<V> Clone for Table<V> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<V> Copy for Table<V> {}

impl<V> std::fmt::Debug for Table<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Table").field(&self.name).finish()
    }
}

/// A key the agent generated and keeps track of.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// `pkcs11:` URI (RFC 7512) or `tpm:handle=`.
    pub reference: KeyRef,
    pub backend: BackendKind,
    pub label: String,
    pub algorithm: KeyAlgorithm,
    pub purpose: KeyPurpose,
    /// RFC 3339 UTC.
    pub created: String,
    /// The VNF instance this key is held for (purpose `vnf`): erased when the VNF terminates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vnf_instance_id: Option<String>,
}

/// What a key is for. Each SM association key is its own key per SM and interface
/// (IFA 033 Security.001/.006).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyPurpose {
    Ca,
    Tls,
    SmAssoc,
    Vnf,
}

/// A stored erasure: what the key layer reported, plus the VNF it was done for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErasureEntry {
    pub object: String,
    pub kind: String,
    pub device: String,
    /// RFC 3339 UTC.
    pub erased_at: String,
    /// True when a fresh lookup after the destroy found nothing.
    pub verified: bool,
    pub vnf_instance_id: Option<String>,
}

impl ErasureEntry {
    pub fn from_record(record: ErasureRecord, vnf_instance_id: Option<String>) -> Self {
        ErasureEntry {
            object: record.object,
            kind: record.kind,
            device: record.device,
            erased_at: record.erased_at,
            verified: record.verified,
            vnf_instance_id,
        }
    }
}

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
    #[error("cannot begin a transaction")]
    Begin(#[source] redb::TransactionError),
    #[error("cannot make the write transaction durable")]
    Durability(#[source] redb::SetDurabilityError),
    /// The outcome of the commit is unknown: redb may have made it durable. The database
    /// refuses further writes until it is reopened.
    #[error("cannot commit")]
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

/// The durable store. Share it through an `Arc`; it is `Send + Sync`.
pub struct Store {
    db: redb::Database,
    path: PathBuf,
    commits: AtomicU64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Opens the store at `path`, creating the file and its parent directory if missing.
    /// A file written by a newer schema is refused; an older one is migrated in one
    /// transaction (all steps or none).
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let db = redb::Database::create(path).map_err(|source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let store = Store {
            db,
            path: path.to_path_buf(),
            commits: AtomicU64::new(0),
        };
        store.prepare_schema()?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` in one write transaction and commits it durably before returning `Ok`.
    /// If `f` returns an error (or panics), nothing it wrote, audit included, is committed.
    ///
    /// Blocking: it waits for the write lock and for `fsync`. From async code use
    /// `tokio::task::spawn_blocking`, or [`GroupCommit::write_async`].
    pub fn write<T>(
        &self,
        f: impl FnOnce(&mut WriteTx<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let txn = self.begin_write()?;
        let mut tx = WriteTx::new(&txn);
        let value = match f(&mut tx) {
            Ok(value) => value,
            Err(err) => {
                drop(tx);
                abort(txn);
                return Err(err);
            }
        };
        let staged = tx.staged;
        // On an error here the transaction is dropped, which aborts it.
        staged.apply(&txn)?;
        self.commit(txn)?;
        Ok(value)
    }

    /// Runs `f` over a consistent snapshot.
    pub fn read<T>(
        &self,
        f: impl FnOnce(&ReadTx) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let txn = self.db.begin_read().map_err(StoreError::Begin)?;
        f(&ReadTx { txn })
    }

    /// Starts a group committer: one thread that commits up to `max_batch` callers' writes per
    /// durable transaction. See [`GroupCommit`].
    pub fn group_commit(self: &Arc<Self>, max_batch: usize) -> Result<GroupCommit, StoreError> {
        GroupCommit::start(Arc::clone(self), max_batch.max(1))
    }

    /// Number of durable commits this handle made (plain writes and group batches). Lets tests
    /// and metrics see batching.
    pub fn commit_count(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Recomputes the audit hash chain from the first entry; returns the number of entries.
    pub fn verify_audit_chain(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(StoreError::Begin)?;
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

    /// Up to `limit` audit entries from `from_seq` on, in order.
    pub fn audit_entries(
        &self,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let txn = self.db.begin_read().map_err(StoreError::Begin)?;
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

    fn begin_write(&self) -> Result<redb::WriteTransaction, StoreError> {
        let mut txn = self.db.begin_write().map_err(StoreError::Begin)?;
        txn.set_durability(redb::Durability::Immediate)
            .map_err(StoreError::Durability)?;
        txn.set_two_phase_commit(true);
        Ok(txn)
    }

    fn commit(&self, txn: redb::WriteTransaction) -> Result<(), StoreError> {
        txn.commit().map_err(StoreError::Commit)?;
        self.commits.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn prepare_schema(&self) -> Result<(), StoreError> {
        let txn = self.begin_write()?;
        let found = {
            let meta = txn.open_table(META).map_err(|source| StoreError::Table {
                table: META_TABLE,
                source,
            })?;
            let found = meta
                .get(SCHEMA_VERSION_KEY)
                .map_err(storage(META_TABLE))?
                .map(|guard| guard.value());
            found
        };
        match found {
            Some(found) if found > SCHEMA_VERSION => {
                abort(txn);
                Err(StoreError::SchemaTooNew {
                    found,
                    supported: SCHEMA_VERSION,
                })
            }
            Some(found) if found == SCHEMA_VERSION => {
                abort(txn);
                Ok(())
            }
            found => {
                // None: a new file. Otherwise an older schema: run each step in order.
                if let Some(mut version) = found {
                    while version < SCHEMA_VERSION {
                        let step = MIGRATIONS
                            .iter()
                            .find(|step| step.from == version)
                            .ok_or(StoreError::MigrationMissing { from: version })?;
                        tracing::info!(
                            from = version,
                            step = step.description,
                            "migrating the store schema"
                        );
                        (step.apply)(&txn).map_err(|source| StoreError::Migrate {
                            from: version,
                            source: Box::new(source),
                        })?;
                        version += 1;
                    }
                }
                {
                    let mut meta = txn.open_table(META).map_err(|source| StoreError::Table {
                        table: META_TABLE,
                        source,
                    })?;
                    meta.insert(SCHEMA_VERSION_KEY, SCHEMA_VERSION)
                        .map_err(storage(META_TABLE))?;
                }
                self.commit(txn)
            }
        }
    }
}

/// The write side of a transaction, as a closure sees it. Writes are staged and applied to
/// the redb transaction only if the closure returns `Ok`; reads see the closure's own staged
/// writes over the transaction.
pub struct WriteTx<'a> {
    txn: &'a redb::WriteTransaction,
    staged: Staged,
}

impl<'a> WriteTx<'a> {
    pub fn get<V: DeserializeOwned>(
        &self,
        table: &Table<V>,
        key: &str,
    ) -> Result<Option<V>, StoreError> {
        self.bytes(table.name, key)?
            .map(|bytes| decode(table.name, key, &bytes))
            .transpose()
    }

    pub fn contains<V>(&self, table: &Table<V>, key: &str) -> Result<bool, StoreError> {
        Ok(self.bytes(table.name, key)?.is_some())
    }

    /// Inserts or replaces.
    pub fn put<V: Serialize>(
        &mut self,
        table: &Table<V>,
        key: &str,
        value: &V,
    ) -> Result<(), StoreError> {
        let bytes = encode(table.name, key, value)?;
        self.staged.stage(table.name, key, Some(bytes));
        Ok(())
    }

    /// Inserts, or fails with [`StoreError::Conflict`] if `key` exists (unique serials).
    pub fn insert_new<V: Serialize>(
        &mut self,
        table: &Table<V>,
        key: &str,
        value: &V,
    ) -> Result<(), StoreError> {
        if self.contains(table, key)? {
            return Err(StoreError::Conflict {
                table: table.name,
                key: key.to_string(),
            });
        }
        self.put(table, key, value)
    }

    /// Deletes `key`; returns whether it existed.
    pub fn delete<V>(&mut self, table: &Table<V>, key: &str) -> Result<bool, StoreError> {
        let existed = self.contains(table, key)?;
        self.staged.stage(table.name, key, None);
        Ok(existed)
    }

    /// Appends `event` to the audit chain, in this transaction: it lands if and only if the
    /// changes it records land.
    pub fn audit(&mut self, event: AuditEvent) {
        self.staged.audit.push(event);
    }

    fn new(txn: &'a redb::WriteTransaction) -> Self {
        WriteTx {
            txn,
            staged: Staged::default(),
        }
    }

    fn bytes(&self, table: &'static str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(staged) = self.staged.writes.get(table).and_then(|keys| keys.get(key)) {
            return Ok(staged.clone());
        }
        let handle = self
            .txn
            .open_table(TableDefinition::<&str, &[u8]>::new(table))
            .map_err(|source| StoreError::Table { table, source })?;
        let bytes = handle
            .get(key)
            .map_err(storage(table))?
            .map(|guard| guard.value().to_vec());
        Ok(bytes)
    }
}

/// A read-only snapshot.
pub struct ReadTx {
    txn: redb::ReadTransaction,
}

impl ReadTx {
    pub fn get<V: DeserializeOwned>(
        &self,
        table: &Table<V>,
        key: &str,
    ) -> Result<Option<V>, StoreError> {
        let Some(handle) = self.open(table)? else {
            return Ok(None);
        };
        let guard = handle.get(key).map_err(storage(table.name))?;
        guard
            .map(|guard| decode(table.name, key, guard.value()))
            .transpose()
    }

    pub fn contains<V>(&self, table: &Table<V>, key: &str) -> Result<bool, StoreError> {
        let Some(handle) = self.open(table)? else {
            return Ok(false);
        };
        Ok(handle.get(key).map_err(storage(table.name))?.is_some())
    }

    /// Every entry whose key starts with `prefix` (`""` for all), in key order.
    pub fn list<V: DeserializeOwned>(
        &self,
        table: &Table<V>,
        prefix: &str,
    ) -> Result<Vec<(String, V)>, StoreError> {
        let Some(handle) = self.open(table)? else {
            return Ok(Vec::new());
        };
        let mut entries = Vec::new();
        for item in handle.range(prefix..).map_err(storage(table.name))? {
            let (key, value) = item.map_err(storage(table.name))?;
            let key = key.value();
            if !key.starts_with(prefix) {
                break;
            }
            entries.push((key.to_string(), decode(table.name, key, value.value())?));
        }
        Ok(entries)
    }

    /// Entries after `after` (exclusive; from the first entry when `None`), in key order, each
    /// handed to `visit` until it returns `false`: a page of a large table (millions of
    /// certificates) without loading the rest of it.
    pub fn scan<V: DeserializeOwned>(
        &self,
        table: &Table<V>,
        after: Option<&str>,
        mut visit: impl FnMut(&str, V) -> bool,
    ) -> Result<(), StoreError> {
        use std::ops::Bound;
        let Some(handle) = self.open(table)? else {
            return Ok(());
        };
        let start = match after {
            Some(key) => Bound::Excluded(key),
            None => Bound::Unbounded,
        };
        for item in handle
            .range::<&str>((start, Bound::Unbounded))
            .map_err(storage(table.name))?
        {
            let (key, value) = item.map_err(storage(table.name))?;
            let key = key.value();
            if !visit(key, decode(table.name, key, value.value())?) {
                break;
            }
        }
        Ok(())
    }

    /// Up to `limit` keys below `below`, in key order (time-ordered keys: the oldest).
    pub fn keys_below<V>(
        &self,
        table: &Table<V>,
        below: &str,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let Some(handle) = self.open(table)? else {
            return Ok(Vec::new());
        };
        let mut keys = Vec::new();
        for item in handle.range(..below).map_err(storage(table.name))? {
            if keys.len() >= limit {
                break;
            }
            let (key, _) = item.map_err(storage(table.name))?;
            keys.push(key.value().to_string());
        }
        Ok(keys)
    }

    pub fn count<V>(&self, table: &Table<V>) -> Result<u64, StoreError> {
        match self.open(table)? {
            Some(handle) => handle.len().map_err(storage(table.name)),
            None => Ok(0),
        }
    }

    fn open<V>(
        &self,
        table: &Table<V>,
    ) -> Result<Option<redb::ReadOnlyTable<&'static str, &'static [u8]>>, StoreError> {
        match self.txn.open_table(table.definition()) {
            Ok(handle) => Ok(Some(handle)),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
            Err(source) => Err(StoreError::Table {
                table: table.name,
                source,
            }),
        }
    }
}

/// Group commit: many threads' writes, one durable transaction per batch.
///
/// A single committer thread takes up to `max_batch` queued closures, runs them one after the
/// other against one redb write transaction and commits once. A caller's `write` returns
/// only after the commit that holds its writes is durable (or with the error that stopped
/// it). While the committer waits on `fsync`, new callers queue up and form the next batch,
/// so the batch size adapts to the load without any timer.
///
/// Failure isolation: each closure writes into its own staging buffer (see the module notes);
/// the buffer is applied to the shared transaction only if the closure returns `Ok`. A closure
/// that returns an error or panics has its buffer dropped, so none of its writes or audit
/// events land, and its caller gets its error; the rest of the batch still commits. Later
/// closures in a batch see the applied writes of earlier ones, so `insert_new` stays unique
/// across a batch.
///
/// If the batch itself cannot be committed (begin, apply or commit fails), every caller in it
/// gets [`StoreError::GroupCommit`] with the shared cause, including callers whose closure was
/// rejected, since their decision was taken against state that did not become durable. After a
/// commit error the outcome is unknown (redb may have made it durable); the caller must not
/// acknowledge and should re-check after the store is reopened.
///
/// Async callers use [`GroupCommit::write_async`], which does not block a runtime thread; the
/// closure still runs on the committer thread, so it must be quick and must not block on the
/// runtime. Dropping the future does not cancel the write.
#[derive(Clone)]
pub struct GroupCommit {
    shared: Arc<GroupShared>,
    // Dropping the last handle stops the committer thread once the queue is drained.
    _owner: Arc<CommitterOwner>,
}

impl GroupCommit {
    /// Queues `f` and blocks until the batch holding it is durably committed.
    pub fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&mut WriteTx<'_>) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        let (reply, outcome) = mpsc::sync_channel(1);
        self.submit(Box::new(GroupJobOf {
            f,
            reply: Reply::Blocking(reply),
        }))?;
        outcome.recv().map_err(|_| StoreError::CommitterGone)?
    }

    /// [`Self::write`] for async callers: awaits the durable commit without blocking a thread.
    pub async fn write_async<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&mut WriteTx<'_>) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        let (reply, outcome) = tokio::sync::oneshot::channel();
        self.submit(Box::new(GroupJobOf {
            f,
            reply: Reply::Async(reply),
        }))?;
        outcome.await.map_err(|_| StoreError::CommitterGone)?
    }

    /// Closures queued and not yet taken into a batch.
    pub fn queued(&self) -> usize {
        self.shared.lock().jobs.len()
    }

    fn start(store: Arc<Store>, max_batch: usize) -> Result<GroupCommit, StoreError> {
        let shared = Arc::new(GroupShared {
            store,
            max_batch,
            queue: Mutex::new(GroupQueue {
                jobs: VecDeque::new(),
                closed: false,
            }),
            ready: Condvar::new(),
        });
        let committer = Arc::clone(&shared);
        let thread = thread::Builder::new()
            .name("store-group-commit".into())
            .spawn(move || committer.run())
            .map_err(StoreError::Spawn)?;
        let owner = Arc::new(CommitterOwner {
            shared: Arc::clone(&shared),
            thread_id: thread.thread().id(),
            thread: Mutex::new(Some(thread)),
        });
        Ok(GroupCommit {
            shared,
            _owner: owner,
        })
    }

    fn submit(&self, job: Box<dyn GroupJob>) -> Result<(), StoreError> {
        let mut queue = self.shared.lock();
        if queue.closed {
            return Err(StoreError::CommitterGone);
        }
        queue.jobs.push_back(job);
        drop(queue);
        self.shared.ready.notify_one();
        Ok(())
    }
}

// `Store` and `GroupCommit` are shared across threads; keep that a compile-time fact.
const _: fn() = || {
    fn shared<T: Send + Sync>() {}
    shared::<Store>();
    shared::<GroupCommit>();
};

/// Schema migration step `from -> from + 1`, run inside the opening write transaction.
struct Migration {
    from: u64,
    description: &'static str,
    apply: fn(&redb::WriteTransaction) -> Result<(), StoreError>,
}

/// Steps from each older schema to the next. Empty while version 1 is the only one.
const MIGRATIONS: &[Migration] = &[];

const META: TableDefinition<&str, u64> = TableDefinition::new(META_TABLE);
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new(AUDIT_TABLE);
const SCHEMA_VERSION_KEY: &str = "schema_version";
const AUDIT_HEAD: &str = "audit_head";
const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

const fn const_str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// One closure's writes, waiting for the closure to succeed. `None` is a delete.
#[derive(Default)]
struct Staged {
    writes: BTreeMap<&'static str, BTreeMap<String, Option<Vec<u8>>>>,
    audit: Vec<AuditEvent>,
}

impl Staged {
    fn stage(&mut self, table: &'static str, key: &str, value: Option<Vec<u8>>) {
        self.writes
            .entry(table)
            .or_default()
            .insert(key.to_string(), value);
    }

    /// Applies the buffer to the transaction. On error the transaction holds part of it and
    /// must be aborted, never committed.
    fn apply(self, txn: &redb::WriteTransaction) -> Result<(), StoreError> {
        for (table, keys) in self.writes {
            let mut handle = txn
                .open_table(TableDefinition::<&str, &[u8]>::new(table))
                .map_err(|source| StoreError::Table { table, source })?;
            for (key, value) in keys {
                match value {
                    Some(bytes) => {
                        handle
                            .insert(key.as_str(), bytes.as_slice())
                            .map_err(storage(table))?;
                    }
                    None => {
                        handle.remove(key.as_str()).map_err(storage(table))?;
                    }
                }
            }
        }
        if self.audit.is_empty() {
            return Ok(());
        }
        let mut audit = txn.open_table(AUDIT).map_err(|source| StoreError::Table {
            table: AUDIT_TABLE,
            source,
        })?;
        let (mut seq, mut prev_hash) = match audit.last().map_err(storage(AUDIT_TABLE))? {
            Some((key, value)) => {
                let last: AuditEntry =
                    decode(AUDIT_TABLE, &key.value().to_string(), value.value())?;
                (last.seq, last.hash)
            }
            None => (0, GENESIS_HASH.to_string()),
        };
        for event in self.audit {
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

struct GroupShared {
    store: Arc<Store>,
    max_batch: usize,
    queue: Mutex<GroupQueue>,
    ready: Condvar,
}

struct GroupQueue {
    jobs: VecDeque<Box<dyn GroupJob>>,
    closed: bool,
}

impl GroupShared {
    fn lock(&self) -> MutexGuard<'_, GroupQueue> {
        // The queue is only pushed to and drained under the lock, never left half-updated, so
        // a poisoned lock still guards a consistent queue.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn run(self: Arc<Self>) {
        // If this thread ends for any reason, refuse new work and drop what is queued, so no
        // caller waits forever: their reply channels close and they get CommitterGone.
        let _closer = CloseOnExit(&self);
        loop {
            let batch: Vec<Box<dyn GroupJob>> = {
                let mut queue = self.lock();
                while queue.jobs.is_empty() && !queue.closed {
                    queue = self
                        .ready
                        .wait(queue)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                if queue.jobs.is_empty() {
                    return;
                }
                let take = queue.jobs.len().min(self.max_batch);
                queue.jobs.drain(..take).collect()
            };
            self.commit_batch(batch);
        }
    }

    fn commit_batch(&self, batch: Vec<Box<dyn GroupJob>>) {
        let size = batch.len();
        let txn = match self.store.begin_write() {
            Ok(txn) => txn,
            Err(err) => {
                let err = Arc::new(err);
                for job in batch {
                    job.finish_unrun(Arc::clone(&err));
                }
                return;
            }
        };
        let mut ran: Vec<Box<dyn GroupCompletion>> = Vec::with_capacity(size);
        let mut failure: Option<Arc<StoreError>> = None;
        let mut jobs = batch.into_iter();
        for job in jobs.by_ref() {
            let mut tx = WriteTx::new(&txn);
            let (completion, accepted) = job.run(&mut tx);
            ran.push(completion);
            if accepted {
                if let Err(err) = tx.staged.apply(&txn) {
                    failure = Some(Arc::new(err));
                    break;
                }
            }
        }
        let outcome = match failure {
            Some(err) => {
                abort(txn);
                for job in jobs {
                    job.finish_unrun(Arc::clone(&err));
                }
                Err(err)
            }
            None => self.store.commit(txn).map_err(Arc::new),
        };
        tracing::debug!(batch = size, ok = outcome.is_ok(), "store group commit");
        for completion in ran {
            completion.finish(outcome.clone());
        }
    }
}

struct CloseOnExit<'a>(&'a GroupShared);

impl Drop for CloseOnExit<'_> {
    fn drop(&mut self) {
        let mut queue = self.0.lock();
        queue.closed = true;
        queue.jobs.clear();
    }
}

struct CommitterOwner {
    shared: Arc<GroupShared>,
    thread_id: ThreadId,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for CommitterOwner {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.ready.notify_all();
        // Join so that the store is released when the last handle goes (a reopen right after
        // must not find the file still held), unless the last handle was dropped by a closure
        // running on the committer thread itself; that thread then exits on its own.
        if thread::current().id() == self.thread_id {
            return;
        }
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(thread) = thread {
            if thread.join().is_err() {
                tracing::error!("the store group commit thread panicked");
            }
        }
    }
}

/// A queued closure, type-erased.
trait GroupJob: Send {
    /// Runs the closure against `tx`; returns how to answer the caller once the batch's
    /// outcome is known, and whether the closure's staged writes are to be applied.
    fn run(self: Box<Self>, tx: &mut WriteTx<'_>) -> (Box<dyn GroupCompletion>, bool);
    /// The batch failed before this closure ran.
    fn finish_unrun(self: Box<Self>, err: Arc<StoreError>);
}

trait GroupCompletion: Send {
    fn finish(self: Box<Self>, commit: Result<(), Arc<StoreError>>);
}

struct GroupJobOf<F, T> {
    f: F,
    reply: Reply<T>,
}

impl<F, T> GroupJob for GroupJobOf<F, T>
where
    F: FnOnce(&mut WriteTx<'_>) -> Result<T, StoreError> + Send + 'static,
    T: Send + 'static,
{
    fn run(self: Box<Self>, tx: &mut WriteTx<'_>) -> (Box<dyn GroupCompletion>, bool) {
        let GroupJobOf { f, reply } = *self;
        // Unwind safety: the closure only reaches the redb transaction through reads; its
        // writes go to `tx.staged`, which is discarded when it panics.
        let result = panic::catch_unwind(AssertUnwindSafe(|| f(tx)))
            .unwrap_or(Err(StoreError::ClosurePanicked));
        let accepted = result.is_ok();
        (Box::new(Completion { result, reply }), accepted)
    }

    fn finish_unrun(self: Box<Self>, err: Arc<StoreError>) {
        self.reply.send(Err(StoreError::GroupCommit(err)));
    }
}

struct Completion<T> {
    result: Result<T, StoreError>,
    reply: Reply<T>,
}

impl<T: Send + 'static> GroupCompletion for Completion<T> {
    fn finish(self: Box<Self>, commit: Result<(), Arc<StoreError>>) {
        let answer = match commit {
            Ok(()) => self.result,
            Err(err) => Err(StoreError::GroupCommit(err)),
        };
        self.reply.send(answer);
    }
}

enum Reply<T> {
    Blocking(mpsc::SyncSender<Result<T, StoreError>>),
    Async(tokio::sync::oneshot::Sender<Result<T, StoreError>>),
}

impl<T> Reply<T> {
    fn send(self, answer: Result<T, StoreError>) {
        // A caller that stopped waiting (a dropped future) no longer wants the answer; its
        // write stands or fails regardless.
        match self {
            Reply::Blocking(sender) => {
                let _ = sender.send(answer);
            }
            Reply::Async(sender) => {
                let _ = sender.send(answer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redb_refuses_a_savepoint_after_a_table_was_opened() {
        // The reason group commit stages writes instead of using savepoints (module notes).
        let dir = tempfile::tempdir().unwrap();
        let db = redb::Database::create(dir.path().join("s.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        assert!(txn.ephemeral_savepoint().is_ok());
        {
            let mut table = txn.open_table(KEYS.definition()).unwrap();
            table.insert("a", b"1".as_slice()).unwrap();
        }
        assert!(matches!(
            txn.ephemeral_savepoint(),
            Err(redb::SavepointError::InvalidSavepoint)
        ));
    }

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
