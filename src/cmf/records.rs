//! The issuance table's write side: recording a certificate, the indexes that find a
//! registration's or a VNF's certificates without a pass over every certificate, the
//! certificates the agent makes for itself, and the one parser of serial numbers.
//!
//! Every certificate the agent's CA keys sign is in [`CERTIFICATES`] under
//! `{caId}/{serial}` (the serial as its DER INTEGER content octets in hex,
//! [`der_serial_hex`]): those issued to consumers ([`super::issue`]) and those `warden ca
//! init`, `tls init` and `sm init` make ([`record_agent_certificate`]), so that each can be
//! listed, revoked (CRL, OCSP) and audited alike (issue 10 §4).
//!
//! Two index tables are written in the same transaction as the record they point at:
//! [`BY_REGISTRATION`] (`{registrationId}/{ordinal}/{caId}/{serial}`) and [`BY_VNF`]
//! (`{vnfInstanceId}/{ordinal}/{caId}/{serial}`), values empty. Registration ids are hex and
//! VNF instance ids have no `/` ([`super::revoke::check_vnf_instance_id`]), so `{id}/` is an
//! exact prefix. The ordinal ([`ORDINAL_DIGITS`] hex digits, the commit's wall-clock time in
//! nanoseconds) puts an owner's entries in issuance order, so that the entries of one group
//! commit land side by side in a few B-tree leaves: keyed by the random serial alone, each
//! certificate dirtied a leaf of its own in each index, and the commit wrote (and
//! checksummed) about twice the pages it did without indexes, 10-13 % of the HTTPS issuance
//! rate (issue 8, measured). The ordinal only orders; the key stays unique by its serial.
//! Revocation and deregistration leave the entries as they are (a revoked certificate still
//! belongs to its registration; records are kept). A store written before the indexes, or
//! with an older key layout, gets them (re)built once ([`ensure_index`], at the CMF's start
//! and before the operator's registration commands).

use base64::Engine;
use der::Encode;
use sha2::Digest;
use x509_cert::Certificate;

use super::revoke::der_serial_hex;
use super::{CertType, CmfError, IssuedRecord, CERTIFICATES, REGISTRATIONS};
use crate::config::Config;
use crate::store::{AuditEvent, ReadTx, Store, StoreError, Table, WriteTx};

/// Certificates by registration: `{registrationId}/{ordinal}/{caId}/{serial}`.
pub const BY_REGISTRATION: Table<()> = Table::new("cmf_certificates_by_registration");
/// Certificates by VNF instance: `{vnfInstanceId}/{ordinal}/{caId}/{serial}`.
pub const BY_VNF: Table<()> = Table::new("cmf_certificates_by_vnf");
/// Which version of the indexes the store holds (key [`INDEX_KEY`]).
pub const INDEX_STATE: Table<u64> = Table::new("cmf_certificate_indexes");
pub const INDEX_KEY: &str = "owners";
/// 1: `{owner}/{caId}/{serial}`; 2: with the ordinal.
const INDEX_VERSION: u64 = 2;
/// The width of an index key's ordinal (a u64 in hex).
pub const ORDINAL_DIGITS: usize = 16;

/// The consumer recorded for certificates the agent made for itself (`ca init`, `tls init`,
/// `sm init`). Configured consumer ids may not start with `agent:` (checked at start), so
/// no consumer can revoke or read these over the CMF API.
pub const AGENT_CONSUMER: &str = "agent:self";

/// Whose certificates.
#[derive(Clone, Copy, Debug)]
pub enum CertificateOwner<'a> {
    Registration(&'a str),
    Vnf(&'a str),
}

impl CertificateOwner<'_> {
    /// Whether `record` belongs to this owner (checked again on the record itself, so an
    /// index entry never makes a certificate match that does not).
    pub fn owns(&self, record: &IssuedRecord) -> bool {
        match self {
            CertificateOwner::Registration(id) => record.registration_id == *id,
            CertificateOwner::Vnf(vnf) => record.vnf_instance_id.as_deref() == Some(*vnf),
        }
    }

    fn index(&self) -> (&'static Table<()>, String) {
        match self {
            CertificateOwner::Registration(id) => (&BY_REGISTRATION, format!("{id}/")),
            CertificateOwner::Vnf(vnf) => (&BY_VNF, format!("{vnf}/")),
        }
    }
}

/// Record an issued certificate at `key` (`{caId}/{serial}`) with its index entries, in the
/// caller's transaction. A certificate issued under a registration is refused (409) when
/// that registration no longer exists: a deregistration that committed while the CSR was
/// in flight wins, and nothing is ever recorded live under a deleted registration. A serial
/// already taken is [`StoreError::Conflict`].
pub fn record_issued(
    tx: &mut WriteTx<'_>,
    key: &str,
    record: &IssuedRecord,
) -> Result<(), StoreError> {
    if !record.registration_id.is_empty()
        && !tx.contains(&REGISTRATIONS, &record.registration_id)?
    {
        return Err(StoreError::rejected(CmfError::Conflict(format!(
            "registration {} was deleted while the CSR was processed",
            record.registration_id
        ))));
    }
    tx.insert_new(&CERTIFICATES, key, record)?;
    index(tx, key, record)
}

/// The keys (`{caId}/{serial}`) of `owner`'s certificates, inside a write transaction.
pub fn certificates_of(
    tx: &WriteTx<'_>,
    owner: CertificateOwner<'_>,
) -> Result<Vec<String>, StoreError> {
    let (table, prefix) = owner.index();
    Ok(tx
        .keys_with_prefix(table, &prefix)?
        .iter()
        .filter_map(|k| certificate_key(k, &prefix))
        .collect())
}

/// The keys of `owner`'s certificates on a snapshot.
pub fn certificates_of_read(
    tx: &ReadTx,
    owner: CertificateOwner<'_>,
) -> Result<Vec<String>, StoreError> {
    let (table, prefix) = owner.index();
    Ok(tx
        .list(table, &prefix)?
        .iter()
        .filter_map(|(k, ())| certificate_key(k, &prefix))
        .collect())
}

/// An index ordinal: the wall clock in nanoseconds, and always above the last one this process
/// gave, so that entries are in recording order even when the clock steps back. Taken when
/// the closure runs on the committer thread: one batch's entries are consecutive (module
/// notes).
fn next_ordinal() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |t| u64::try_from(t.as_nanos()).unwrap_or(u64::MAX - 1));
    let previous = LAST
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
            Some(now.max(last.saturating_add(1)))
        })
        .unwrap_or_else(|last| last);
    now.max(previous.saturating_add(1))
}

/// The `{caId}/{serial}` an index entry `{owner}/{ordinal}/{caId}/{serial}` points at
/// (`None` for an entry of another layout, which [`ensure_index`] replaces at start).
fn certificate_key(entry: &str, prefix: &str) -> Option<String> {
    let rest = entry.strip_prefix(prefix)?;
    let (ordinal, key) = rest.split_at_checked(ORDINAL_DIGITS)?;
    if !ordinal.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some(key.strip_prefix('/')?.to_string())
}

/// Build the indexes of a store written before them, once (one transaction, audited as
/// `cmf.index.rebuild`); returns how many certificates were indexed. Certificates recorded
/// after the snapshot this reads are indexed by [`record_issued`] itself.
pub fn ensure_index(store: &Store, actor: &str) -> Result<u64, StoreError> {
    if store.read(|tx| tx.get(&INDEX_STATE, INDEX_KEY))? == Some(INDEX_VERSION) {
        return Ok(0);
    }
    let records: Vec<(String, IssuedRecord)> = store.read(|tx| {
        let mut all = Vec::new();
        tx.scan(&CERTIFICATES, None, |key, record: IssuedRecord| {
            all.push((key.to_string(), record));
            true
        })?;
        Ok(all)
    })?;
    store.write(|tx| {
        if tx.get(&INDEX_STATE, INDEX_KEY)? == Some(INDEX_VERSION) {
            return Ok(0);
        }
        // Entries of an older layout go; every record is indexed afresh.
        for table in [&BY_REGISTRATION, &BY_VNF] {
            for key in tx.keys_with_prefix(table, "")? {
                tx.delete(table, &key)?;
            }
        }
        for (key, record) in &records {
            index(tx, key, record)?;
        }
        tx.put(&INDEX_STATE, INDEX_KEY, &INDEX_VERSION)?;
        tx.audit(
            AuditEvent::new(actor, "cmf.index.rebuild", "cmf_certificates").with_detail(
                serde_json::json!({ "certificates": records.len(), "version": INDEX_VERSION }),
            ),
        );
        Ok(records.len() as u64)
    })
}

/// The index entries of one record.
fn index(tx: &mut WriteTx<'_>, key: &str, record: &IssuedRecord) -> Result<(), StoreError> {
    let ordinal = next_ordinal();
    if !record.registration_id.is_empty() {
        tx.put(
            &BY_REGISTRATION,
            &format!("{}/{ordinal:016x}/{key}", record.registration_id),
            &(),
        )?;
    }
    if let Some(vnf) = &record.vnf_instance_id {
        tx.put(&BY_VNF, &format!("{vnf}/{ordinal:016x}/{key}"), &())?;
    }
    Ok(())
}

/// A serial number as people and tools write it: hex digits (any case, `:` separators and a
/// `0x` prefix allowed, as `openssl x509 -serial` or a browser print it), optionally
/// `caId/` first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SerialRef {
    pub ca: Option<String>,
    /// The DER INTEGER's content octets in hex: how the store keys certificates.
    pub der_hex: String,
    /// The digits as written (lower case, without separators): a key written before serials
    /// were normalized may be in this form.
    pub written: String,
}

impl SerialRef {
    /// Parse `text`; the error says what a serial looks like.
    pub fn parse(text: &str) -> Result<SerialRef, String> {
        let (ca, digits) = match text.split_once('/') {
            Some((ca, digits)) => (Some(ca.to_string()), digits),
            None => (None, text),
        };
        let digits: String = digits
            .chars()
            .filter(|c| *c != ':')
            .collect::<String>()
            .to_ascii_lowercase();
        let digits = digits.strip_prefix("0x").unwrap_or(&digits).to_string();
        // RFC 5280 4.1.2.2: at most 20 octets, plus the zero octet of a positive INTEGER.
        if digits.is_empty()
            || digits.len() > 42
            || !digits.bytes().all(|b| b.is_ascii_hexdigit())
            || ca.as_deref().is_some_and(str::is_empty)
        {
            return Err(format!(
                "serial '{text}': expected the serial number in hex (at most 20 octets, \
                 colons allowed), optionally as caId/serial"
            ));
        }
        Ok(SerialRef {
            ca,
            der_hex: der_serial_hex(&digits),
            written: digits,
        })
    }

    /// The store key under `ca`.
    pub fn key(&self, ca: &str) -> String {
        format!("{ca}/{}", self.der_hex)
    }
}

/// Record a certificate the agent made for itself (its CA's self-signed root, its TLS
/// identity, an SM interface certificate), in one durable transaction with the audit entry
/// `action` (the caller's, with `detail` and the record key added). Issued by the CA of
/// `[ca]`: its id is that of the `[[cmf.ca]]` entry with the same key, else `default` (the
/// id the CMF gives `[ca]` when no `[[cmf.ca]]` is configured). Returns the record key.
#[allow(clippy::too_many_arguments)]
pub fn record_agent_certificate(
    store: &Store,
    config: &Config,
    certificate: &Certificate,
    cert_type: CertType,
    subjects: Vec<String>,
    actor: &str,
    action: &str,
    audit_subject: &str,
    mut detail: serde_json::Value,
) -> Result<String, StoreError> {
    let tbs = certificate.tbs_certificate();
    let serial = der_serial_hex(&hex::encode(tbs.serial_number().as_bytes()));
    let ca_id = agent_ca_id(config);
    let key = format!("{ca_id}/{serial}");
    let encode = |what: &str, e: der::Error| StoreError::Encode {
        table: CERTIFICATES.name(),
        key: format!("{key} ({what})"),
        source: <serde_json::Error as serde::ser::Error>::custom(e),
    };
    let spki = tbs
        .subject_public_key_info()
        .to_der()
        .map_err(|e| encode("subjectPublicKeyInfo", e))?;
    let der = certificate.to_der().map_err(|e| encode("certificate", e))?;
    let record = IssuedRecord {
        serial_number: serial,
        ca_id,
        consumer: AGENT_CONSUMER.to_string(),
        registration_id: String::new(),
        cert_type,
        subjects,
        spki_sha256: hex::encode(sha2::Sha256::digest(&spki)),
        attestation: "not-requested".into(),
        attestation_format: None,
        not_before: tbs.validity().not_before.to_string(),
        not_after: tbs.validity().not_after.to_string(),
        issued_at: crate::keys::rfc3339_now(),
        certificate: Some(base64::engine::general_purpose::STANDARD.encode(der)),
        revocation: None,
        vnf_instance_id: None,
    };
    if let Some(map) = detail.as_object_mut() {
        map.insert("certificate".into(), serde_json::json!(key));
        map.insert("certType".into(), serde_json::json!(cert_type));
    }
    store.write(|tx| {
        record_issued(tx, &key, &record)?;
        tx.audit(AuditEvent::new(actor, action, audit_subject).with_detail(detail.clone()));
        Ok(())
    })?;
    Ok(key)
}

/// The CMF id of the CA configured as `[ca]` (see [`record_agent_certificate`]).
pub fn agent_ca_id(config: &Config) -> String {
    let Some(ca) = &config.ca else {
        return "default".into();
    };
    config
        .cmf
        .as_ref()
        .and_then(|cmf| cmf.cas.iter().find(|c| c.key == ca.key))
        .map(|c| c.id.clone())
        .unwrap_or_else(|| "default".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_parse_into_their_der_form() {
        let s = SerialRef::parse("A5:15:B1").unwrap();
        assert_eq!(
            (s.ca, s.der_hex.as_str(), s.written.as_str()),
            (None, "00a515b1", "a515b1")
        );
        let s = SerialRef::parse("ca-2/0x00a515b1").unwrap();
        assert_eq!(s.ca.as_deref(), Some("ca-2"));
        assert_eq!(s.key("ca-2"), "ca-2/00a515b1");
        assert_eq!(SerialRef::parse("5b81").unwrap().der_hex, "5b81");
        for bad in ["", "xyz", "/12", &"f".repeat(43), "0x"] {
            assert!(SerialRef::parse(bad).is_err(), "{bad}");
        }
    }
}
