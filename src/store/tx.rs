//! Transactions as callers see them: [`WriteTx`] stages a closure's writes, [`ReadTx`] is a
//! snapshot.
//!
//! A write transaction opens each table once ([`OpenTables`]), however many closures of a
//! group commit read and write it, and the closures' accepted writes are applied together
//! at the end ([`Staged::absorb`], [`Staged::apply`]), the audit chain extended once per
//! transaction. Opening and closing the tables and decoding the chain's last entry once per
//! closure cost the committer about as much as the writes themselves (issue 8, measured).

use std::cell::RefCell;
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use redb::{ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::audit::{self, AuditEvent};
use super::{decode, encode, storage, StoreError, Table};

/// The write side of a transaction, as a closure sees it. Writes are staged and applied to
/// the redb transaction only if the closure returns `Ok`; reads see the closure's own staged
/// writes over the transaction.
pub struct WriteTx<'a> {
    tables: &'a dyn TableAccess,
    /// The writes of the closures before this one in the same transaction.
    earlier: &'a Staged,
    pub(super) staged: Staged,
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

    /// The keys starting with `prefix`, in key order, as this closure sees them: the
    /// transaction's keys with the earlier closures' and then this closure's own staged puts
    /// added and deletes removed.
    /// For index tables (a prefix per owner), so a write finds what it must change in the
    /// same transaction that changes it.
    pub fn keys_with_prefix<V>(
        &self,
        table: &Table<V>,
        prefix: &str,
    ) -> Result<Vec<String>, StoreError> {
        let mut keys = BTreeSet::new();
        self.tables
            .keys_with_prefix(table.name, prefix, &mut keys)?;
        self.earlier.overlay_keys(table.name, prefix, &mut keys);
        self.staged.overlay_keys(table.name, prefix, &mut keys);
        Ok(keys.into_iter().collect())
    }

    /// Appends `event` to the audit chain, in this transaction: it lands if and only if the
    /// changes it records land.
    pub fn audit(&mut self, event: AuditEvent) {
        self.staged.audit.push(event);
    }

    /// A closure's view: `tables` as the transaction holds them, with the writes of the
    /// closures before it in the batch (`earlier`) over them.
    pub(super) fn new(tables: &'a dyn TableAccess, earlier: &'a Staged) -> Self {
        WriteTx {
            tables,
            earlier,
            staged: Staged::default(),
        }
    }

    fn bytes(&self, table: &'static str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        for staged in [&self.staged, self.earlier] {
            if let Some(value) = staged.writes.get(table).and_then(|keys| keys.get(key)) {
                return Ok(value.clone());
            }
        }
        self.tables.get(table, key)
    }
}

/// The tables of one write transaction, each opened at its first use and kept open until
/// the transaction is committed or aborted (redb allows one open handle per table).
pub(super) struct OpenTables<'t> {
    txn: &'t redb::WriteTransaction,
    open: RefCell<HashMap<&'static str, redb::Table<'t, &'static str, &'static [u8]>>>,
}

impl<'t> OpenTables<'t> {
    pub(super) fn new(txn: &'t redb::WriteTransaction) -> Self {
        OpenTables {
            txn,
            open: RefCell::new(HashMap::new()),
        }
    }

    fn with<R>(
        &self,
        table: &'static str,
        f: impl FnOnce(&mut redb::Table<'t, &'static str, &'static [u8]>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let mut open = self.open.borrow_mut();
        let handle = match open.entry(table) {
            Entry::Occupied(entry) => entry.into_mut(),
            // Opening a table in a write transaction creates it.
            Entry::Vacant(entry) => entry.insert(
                self.txn
                    .open_table(TableDefinition::<&str, &[u8]>::new(table))
                    .map_err(|source| StoreError::Table { table, source })?,
            ),
        };
        f(handle)
    }
}

/// How a [`WriteTx`] reads the transaction's tables. A trait object, so that a closure's
/// view borrows the [`OpenTables`] for less than the transaction lives.
pub(super) trait TableAccess {
    fn get(&self, table: &'static str, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Adds the keys of `table` starting with `prefix` to `keys`.
    fn keys_with_prefix(
        &self,
        table: &'static str,
        prefix: &str,
        keys: &mut BTreeSet<String>,
    ) -> Result<(), StoreError>;
}

impl TableAccess for OpenTables<'_> {
    fn get(&self, table: &'static str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.with(table, |handle| {
            Ok(handle
                .get(key)
                .map_err(storage(table))?
                .map(|guard| guard.value().to_vec()))
        })
    }

    fn keys_with_prefix(
        &self,
        table: &'static str,
        prefix: &str,
        keys: &mut BTreeSet<String>,
    ) -> Result<(), StoreError> {
        self.with(table, |handle| {
            for item in handle.range(prefix..).map_err(storage(table))? {
                let (key, _) = item.map_err(storage(table))?;
                let key = key.value();
                if !key.starts_with(prefix) {
                    break;
                }
                keys.insert(key.to_string());
            }
            Ok(())
        })
    }
}

/// A read-only snapshot.
pub struct ReadTx {
    pub(super) txn: redb::ReadTransaction,
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
/// One closure's writes, waiting for the closure to succeed. `None` is a delete.
#[derive(Default)]
pub(super) struct Staged {
    pub(super) writes: BTreeMap<&'static str, BTreeMap<String, Option<Vec<u8>>>>,
    pub(super) audit: Vec<AuditEvent>,
}

impl Staged {
    fn stage(&mut self, table: &'static str, key: &str, value: Option<Vec<u8>>) {
        self.writes
            .entry(table)
            .or_default()
            .insert(key.to_string(), value);
    }

    /// Takes `later`'s writes over these (a later closure of the batch saw these and wins),
    /// its audit events after these.
    pub(super) fn absorb(&mut self, later: Staged) {
        for (table, keys) in later.writes {
            self.writes.entry(table).or_default().extend(keys);
        }
        self.audit.extend(later.audit);
    }

    /// `keys` (the keys of `table` under `prefix` below this buffer) with this buffer's puts
    /// added and its deletes removed.
    fn overlay_keys(&self, table: &'static str, prefix: &str, keys: &mut BTreeSet<String>) {
        let Some(staged) = self.writes.get(table) else {
            return;
        };
        for (key, value) in staged.range(prefix.to_string()..) {
            if !key.starts_with(prefix) {
                break;
            }
            match value {
                Some(_) => keys.insert(key.clone()),
                None => keys.remove(key),
            };
        }
    }

    /// Applies the buffer to the transaction through its open tables, then extends the
    /// audit chain. On error the transaction holds part of it and must be aborted, never
    /// committed.
    pub(super) fn apply(
        self,
        tables: &OpenTables<'_>,
        txn: &redb::WriteTransaction,
    ) -> Result<(), StoreError> {
        for (table, keys) in self.writes {
            tables.with(table, |handle| {
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
                Ok(())
            })?;
        }
        audit::append(txn, self.audit)
    }
}

#[cfg(test)]
mod tests {
    use super::super::KEYS;

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
}
