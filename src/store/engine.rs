//! The engine: the redb file, its schema version, durable commits, and recovery after an I/O
//! error.
//!
//! # Creating and opening
//!
//! A store is created only by [`Store::create`] (`warden store init`), which refuses to touch
//! an existing file. The agent and its commands open with [`Store::open_existing`], which
//! refuses a missing file, a 0-byte file, a file that is not a redb database and a redb
//! database without the store's schema version: a lost store must never silently become an
//! empty one, since certificate history, subject ownership and the audit chain would be gone
//! while the agent went on issuing. [`Store::open`] (create if missing) remains for tests and
//! benches working on a scratch path.
//!
//! # Recovery
//!
//! After a failed commit or any I/O error redb latches the failure: every later operation on
//! that `Database` returns `StorageError::PreviousIo` until it is closed and opened again
//! (redb 4.6 `PagedCachedFile::check_failure`; its test
//! `db::test::transient_io_error` shows a commit failure followed by `PreviousIo`). So a
//! full disk used to stop the store for good, even after space was freed. The store now
//! drops a handle that saw such an error and the next operation (read, write, or the next
//! group-commit batch) opens the file again: redb repairs it from the last durable commit
//! slot, and the schema version is checked again before the handle is used. While the disk
//! still refuses writes the reopen fails too, with its cause, and is simply tried again by
//! the next operation. Nothing acknowledged is lost: a caller is answered `Ok` only after its
//! commit returned, and a failed commit is answered with the error.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use redb::ReadableDatabase;

use super::tables::{META, SCHEMA_VERSION_KEY};
use super::tx::{OpenTables, ReadTx, Staged, WriteTx};
use super::{abort, audit, storage, AuditEntry, GroupCommit, StoreError, META_TABLE};

/// The schema this build writes. Bump it together with a new step in `MIGRATIONS`.
pub const SCHEMA_VERSION: u64 = 1;

/// The durable store. Share it through an `Arc`; it is `Send + Sync`.
pub struct Store {
    path: PathBuf,
    /// `None` once a handle saw an I/O error; the next operation opens the file again.
    db: RwLock<Option<Arc<redb::Database>>>,
    commits: AtomicU64,
    reopens: AtomicU64,
    /// Whether the last commit (plain or group) succeeded; for readiness.
    last_commit_ok: AtomicBool,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

/// How the schema version is treated when a file is opened.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Opening {
    /// A new file: write the current version.
    New,
    /// Must already be a store: no version is an error.
    Existing,
    /// [`Store::open`]: whatever is there; a file without a version gets the current one.
    Lenient,
}

impl Store {
    /// Creates a new store at `path` (and its parent directory). Refuses an existing file,
    /// whatever it holds, with [`StoreError::AlreadyExists`].
    pub fn create(path: &Path) -> Result<Store, StoreError> {
        create_parent(path)?;
        // create_new: the existence check and the creation are one atomic step (O_EXCL).
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
        {
            Ok(file) => drop(file),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(StoreError::AlreadyExists {
                    path: path.to_path_buf(),
                })
            }
            Err(source) => {
                return Err(StoreError::Create {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
        // redb initializes an empty file as a new database. On failure the half-made file is
        // removed so that a second `store init` is not refused by our own leftover.
        let created = builder()
            .create(path)
            .map_err(|source| StoreError::Open {
                path: path.to_path_buf(),
                source,
            })
            .and_then(|db| Store::with(path, db, Opening::New));
        if created.is_err() {
            let _ = std::fs::remove_file(path);
        }
        created
    }

    /// Opens the existing store at `path`; never creates one. A missing, empty or foreign
    /// file is refused with its own error; a file written by a newer schema is refused; an
    /// older one is migrated in one transaction (all steps or none).
    pub fn open_existing(path: &Path) -> Result<Store, StoreError> {
        inspect(path)?;
        let db = open_checked(path)?;
        Store::with(path, db, Opening::Existing)
    }

    /// Opens the store at `path`, creating the file and its parent directory if missing.
    /// For tests and benches on a scratch path only: the agent and its commands use
    /// [`Store::open_existing`] so that a lost store is never replaced by an empty one.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        create_parent(path)?;
        let db = builder().create(path).map_err(|source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Store::with(path, db, Opening::Lenient)
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
        let (db, txn) = self.begin_write()?;
        let tables = OpenTables::new(&txn);
        let nothing_earlier = Staged::default();
        let mut tx = WriteTx::new(&tables, &nothing_earlier);
        let result = f(&mut tx);
        let staged = tx.staged;
        let applied = match result {
            Ok(value) => staged.apply(&tables, &txn).map(|()| value),
            Err(err) => Err(err),
        };
        drop(tables);
        match applied {
            Ok(value) => {
                self.commit(&db, txn)?;
                Ok(value)
            }
            Err(err) => {
                abort(txn);
                Err(self.failed(&db, err))
            }
        }
    }

    /// Runs `f` over a consistent snapshot.
    pub fn read<T>(
        &self,
        f: impl FnOnce(&ReadTx) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let db = self.handle()?;
        let txn = db
            .begin_read()
            .map_err(|e| self.failed(&db, StoreError::Begin(e)))?;
        f(&ReadTx { txn }).map_err(|e| self.failed(&db, e))
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

    /// Number of times the database was opened again after an I/O error (module notes).
    pub fn reopen_count(&self) -> u64 {
        self.reopens.load(Ordering::Relaxed)
    }

    /// Whether the store takes commits: false from a failed commit (a full disk, a read-only
    /// remount) until the next one succeeds. Cheap: for a readiness answer, no probe write.
    pub fn accepting_commits(&self) -> bool {
        self.last_commit_ok.load(Ordering::Relaxed)
    }

    /// Recomputes the audit hash chain from the first entry; returns the number of entries.
    pub fn verify_audit_chain(&self) -> Result<u64, StoreError> {
        let db = self.handle()?;
        let txn = db
            .begin_read()
            .map_err(|e| self.failed(&db, StoreError::Begin(e)))?;
        audit::verify(&txn).map_err(|e| self.failed(&db, e))
    }

    /// Up to `limit` audit entries from `from_seq` on, in order.
    pub fn audit_entries(
        &self,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let db = self.handle()?;
        let txn = db
            .begin_read()
            .map_err(|e| self.failed(&db, StoreError::Begin(e)))?;
        audit::entries(&txn, from_seq, limit).map_err(|e| self.failed(&db, e))
    }

    /// A durable write transaction, with the handle it was begun on (for [`Self::failed`]).
    pub(super) fn begin_write(
        &self,
    ) -> Result<(Arc<redb::Database>, redb::WriteTransaction), StoreError> {
        let db = self.handle()?;
        let txn = begin_durable(&db).map_err(|e| self.failed(&db, e))?;
        Ok((db, txn))
    }

    /// Commits `txn`, begun on `db`. A failure drops the handle (module notes: redb refuses
    /// everything after a failed commit until the database is reopened).
    pub(super) fn commit(
        &self,
        db: &Arc<redb::Database>,
        txn: redb::WriteTransaction,
    ) -> Result<(), StoreError> {
        if let Err(e) = txn.commit() {
            self.last_commit_ok.store(false, Ordering::Relaxed);
            return Err(self.failed(db, StoreError::Commit(e)));
        }
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.last_commit_ok.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Passes `err` through; if it leaves `db` unusable, drops `db` so that the next
    /// operation opens the file again. Call it only after the transaction on `db` is gone.
    pub(super) fn failed(&self, db: &Arc<redb::Database>, err: StoreError) -> StoreError {
        if err.poisons_the_handle() {
            let mut slot = self.db.write().unwrap_or_else(PoisonError::into_inner);
            // Only the handle that failed: another thread may already have reopened.
            if slot
                .as_ref()
                .is_some_and(|current| Arc::ptr_eq(current, db))
            {
                *slot = None;
                tracing::warn!(
                    store = %self.path.display(),
                    error = %crate::error::chain(&err),
                    "store I/O error: the database is closed and the next operation reopens it"
                );
            }
        }
        err
    }

    /// The open handle, opening the file again if an I/O error closed it.
    fn handle(&self) -> Result<Arc<redb::Database>, StoreError> {
        // The slot is only ever swapped whole, so a poisoned lock still guards a valid value.
        if let Some(db) = self
            .db
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            return Ok(Arc::clone(db));
        }
        let mut slot = self.db.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(db) = slot.as_ref() {
            return Ok(Arc::clone(db));
        }
        let reopened = open_checked(&self.path)
            .and_then(|db| {
                let db = Arc::new(db);
                check_schema(&db, &self.path, Opening::Existing)?;
                Ok(db)
            })
            .map_err(|source| StoreError::Reopen {
                path: self.path.clone(),
                source: Box::new(source),
            })?;
        *slot = Some(Arc::clone(&reopened));
        self.reopens.fetch_add(1, Ordering::Relaxed);
        tracing::info!(store = %self.path.display(), "store reopened after an I/O error");
        Ok(reopened)
    }

    fn with(path: &Path, db: redb::Database, opening: Opening) -> Result<Store, StoreError> {
        let db = Arc::new(db);
        check_schema(&db, path, opening)?;
        Ok(Store {
            path: path.to_path_buf(),
            db: RwLock::new(Some(db)),
            commits: AtomicU64::new(0),
            reopens: AtomicU64::new(0),
            last_commit_ok: AtomicBool::new(true),
        })
    }
}

fn create_parent(path: &Path) -> Result<(), StoreError> {
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    Ok(())
}

/// Refuses what is plainly not a store before redb sees it: redb would initialize a missing
/// or empty file as a new database.
fn inspect(path: &Path) -> Result<(), StoreError> {
    let path_buf = || path.to_path_buf();
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(StoreError::Missing { path: path_buf() })
        }
        Err(source) => {
            return Err(StoreError::Inspect {
                path: path_buf(),
                source,
            })
        }
    };
    if !meta.is_file() {
        return Err(StoreError::NotAFile { path: path_buf() });
    }
    if meta.len() == 0 {
        return Err(StoreError::Empty { path: path_buf() });
    }
    Ok(())
}

/// redb's page cache ceiling. redb's own default is 1 GiB, and the cache is a ceiling, not a
/// reservation: pages once touched stay resident, so the agent's RSS grew with the number of
/// certificates it had issued. The interior B-tree pages, which every lookup re-touches, of a
/// store with millions of certificates fit in a few MiB; the kernel's page cache still holds
/// the file for reads that miss.
const CACHE_BYTES: usize = 32 * 1024 * 1024;

fn builder() -> redb::Builder {
    let mut builder = redb::Builder::new();
    builder.set_cache_size(CACHE_BYTES);
    builder
}

/// Opens an existing redb file, verifying every page's checksum: a plain redb open trusts a
/// file that was shut down cleanly and may panic on one altered outside redb (redb 4.6
/// `Database::open` docs), where the check reports `StorageError::Corrupted` instead.
fn open_checked(path: &Path) -> Result<redb::Database, StoreError> {
    builder()
        .set_check_integrity_on_open(true)
        .open(path)
        .map_err(|source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        })
}

fn begin_durable(db: &redb::Database) -> Result<redb::WriteTransaction, StoreError> {
    let mut txn = db.begin_write().map_err(StoreError::Begin)?;
    txn.set_durability(redb::Durability::Immediate)
        .map_err(StoreError::Durability)?;
    txn.set_two_phase_commit(true);
    Ok(txn)
}

/// Checks (and for a new file writes) the schema version; migrates an older one.
fn check_schema(db: &redb::Database, path: &Path, opening: Opening) -> Result<(), StoreError> {
    let found = {
        let txn = db.begin_read().map_err(StoreError::Begin)?;
        match txn.open_table(META) {
            Ok(meta) => meta
                .get(SCHEMA_VERSION_KEY)
                .map_err(storage(META_TABLE))?
                .map(|guard| guard.value()),
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(source) => {
                return Err(StoreError::Table {
                    table: META_TABLE,
                    source,
                })
            }
        }
    };
    match (found, opening) {
        (Some(found), _) if found > SCHEMA_VERSION => Err(StoreError::SchemaTooNew {
            found,
            supported: SCHEMA_VERSION,
        }),
        (Some(found), _) if found == SCHEMA_VERSION => Ok(()),
        (None, Opening::Existing) => Err(StoreError::NotAStore {
            path: path.to_path_buf(),
        }),
        (found, _) => {
            let txn = begin_durable(db)?;
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
            txn.commit().map_err(StoreError::Commit)
        }
    }
}

/// Schema migration step `from -> from + 1`, run inside the opening write transaction.
struct Migration {
    from: u64,
    description: &'static str,
    apply: fn(&redb::WriteTransaction) -> Result<(), StoreError>,
}

/// Steps from each older schema to the next. Empty while version 1 is the only one.
const MIGRATIONS: &[Migration] = &[];
