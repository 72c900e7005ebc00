//! Typed tables and the records the store itself defines.

use std::marker::PhantomData;

use redb::TableDefinition;
use serde::{Deserialize, Serialize};

use crate::keys::{BackendKind, ErasureRecord, KeyAlgorithm, KeyRef};

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
    pub(super) name: &'static str,
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

    pub(super) const fn definition(&self) -> TableDefinition<'static, &'static str, &'static [u8]> {
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
pub(super) const fn const_str_eq(a: &str, b: &str) -> bool {
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

/// `meta`: `schema_version`, `audit_head`.
pub(super) const META: TableDefinition<&str, u64> = TableDefinition::new(META_TABLE);
pub(super) const SCHEMA_VERSION_KEY: &str = "schema_version";
pub(super) const AUDIT_HEAD: &str = "audit_head";
