//! Revocation of issued certificates (issue 10 §3; RFC 5280 5.3.1 reasons).
//!
//! Who revokes:
//! - the consumer that manages a certificate (the VNFM that requested it), over the CMF API
//!   ([`Cmf::revoke_by_consumer`]);
//! - the operator, `warden certs revoke` over the admin socket ([`Cmf::revoke_by_operator`]);
//! - the CMF itself when a registration is deleted (cessationOfOperation), and the SM when a
//!   VNF is terminated and its keys erased (cessationOfOperation, [`Cmf::revoke_of`] through the
//!   index by VNF instance id; direct mode by registration).
//!
//! A revocation is one durable transaction: the certificate's record gets its
//! [`Revocation`], the per-CA revoked index ([`REVOKED`], what the CRL is made from, so a CRL
//! never scans every certificate ever issued) gets an entry, and the audit chain records who
//! revoked what and why. Only then is the revocation acknowledged, and the CA's CRL is
//! scheduled to be made again ([`CrlSignal`], [`super::crl`]); OCSP answers from the record at
//! once.

use std::collections::BTreeSet;
use std::sync::{Mutex, PoisonError};

use serde::{Deserialize, Serialize};

use super::crl::CRL_CHANGES;
use super::records::{self, CertificateOwner, SerialRef};
use super::register::rejected_or;
use super::{Cmf, CmfError, Consumer, IssuedRecord, Revocation, CERTIFICATES};
use crate::store::{AuditEvent, StoreError, Table};

/// RFC 5280 5.3.1 CRLReason, the values a revocation may carry here. `removeFromCRL` is a
/// delta-CRL instruction, not a reason, and `aACompromise` concerns attribute authorities:
/// neither applies to the certificates a CMF issues.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RevocationReason {
    Unspecified,
    KeyCompromise,
    CaCompromise,
    AffiliationChanged,
    Superseded,
    CessationOfOperation,
    /// Accepted for completeness; this CMF offers no release from hold, so a certificate on
    /// hold stays revoked (CA/B BR 4.9.13 forbids holds for TLS certificates altogether).
    CertificateHold,
    PrivilegeWithdrawn,
}

impl RevocationReason {
    pub const ALL: [RevocationReason; 8] = [
        RevocationReason::Unspecified,
        RevocationReason::KeyCompromise,
        RevocationReason::CaCompromise,
        RevocationReason::AffiliationChanged,
        RevocationReason::Superseded,
        RevocationReason::CessationOfOperation,
        RevocationReason::CertificateHold,
        RevocationReason::PrivilegeWithdrawn,
    ];

    /// The ASN.1 name in RFC 5280 5.3.1 (`keyCompromise`, `cACompromise`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            RevocationReason::Unspecified => "unspecified",
            RevocationReason::KeyCompromise => "keyCompromise",
            RevocationReason::CaCompromise => "cACompromise",
            RevocationReason::AffiliationChanged => "affiliationChanged",
            RevocationReason::Superseded => "superseded",
            RevocationReason::CessationOfOperation => "cessationOfOperation",
            RevocationReason::CertificateHold => "certificateHold",
            RevocationReason::PrivilegeWithdrawn => "privilegeWithdrawn",
        }
    }

    /// The CRLReason value (RFC 5280 5.3.1), as CRL entries and OCSP carry it.
    pub fn crl_reason(self) -> x509_cert::ext::pkix::CrlReason {
        use x509_cert::ext::pkix::CrlReason;
        match self {
            RevocationReason::Unspecified => CrlReason::Unspecified,
            RevocationReason::KeyCompromise => CrlReason::KeyCompromise,
            RevocationReason::CaCompromise => CrlReason::CaCompromise,
            RevocationReason::AffiliationChanged => CrlReason::AffiliationChanged,
            RevocationReason::Superseded => CrlReason::Superseded,
            RevocationReason::CessationOfOperation => CrlReason::CessationOfOperation,
            RevocationReason::CertificateHold => CrlReason::CertificateHold,
            RevocationReason::PrivilegeWithdrawn => CrlReason::PrivilegeWithdrawn,
        }
    }

    /// By its RFC 5280 name, case-insensitively (`keyCompromise`, `KEYCOMPROMISE`), or in
    /// the kebab-case a command line prefers (`key-compromise`, `ca-compromise`).
    pub fn parse(text: &str) -> Option<RevocationReason> {
        let folded: String = text
            .chars()
            .filter(|c| *c != '-' && *c != '_')
            .collect::<String>()
            .to_ascii_lowercase();
        RevocationReason::ALL
            .into_iter()
            .find(|r| r.as_str().to_ascii_lowercase() == folded)
    }
}

impl std::fmt::Display for RevocationReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for RevocationReason {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        RevocationReason::parse(text).ok_or_else(|| {
            format!(
                "unknown revocation reason '{text}' (RFC 5280 5.3.1: {})",
                RevocationReason::ALL.map(|r| r.as_str()).join(", ")
            )
        })
    }
}

impl Serialize for RevocationReason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for RevocationReason {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// What a revocation did, each certificate as `caId/serialhex`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RevokeOutcome {
    /// Revoked now.
    pub revoked: Vec<String>,
    /// Matched, but revoked before (left as they were: the first revocation's time and
    /// reason stand).
    pub already_revoked: Vec<String>,
}

/// An entry of the revoked index, what a CRL entry is made from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RevokedEntry {
    /// RFC 3339 UTC.
    pub revoked_at: String,
    pub reason: RevocationReason,
    /// The certificate's notAfter (as the record has it): an entry may leave the CRL once
    /// the certificate has expired (RFC 5280 3.3).
    pub not_after: String,
}

/// Revoked certificates per CA: `{caId}/{serial hex}`, written with the revocation.
pub const REVOKED: Table<RevokedEntry> = Table::new("cmf_revoked");

/// CAs whose CRL must be made again; the CRL task waits on it.
#[derive(Debug, Default)]
pub struct CrlSignal {
    dirty: Mutex<BTreeSet<String>>,
    notify: tokio::sync::Notify,
}

impl CrlSignal {
    /// Mark `ca_ids` changed and wake the CRL task.
    pub fn mark<I: IntoIterator<Item = String>>(&self, ca_ids: I) {
        let mut dirty = self.dirty.lock().unwrap_or_else(PoisonError::into_inner);
        let before = dirty.len();
        dirty.extend(ca_ids);
        if dirty.len() != before {
            drop(dirty);
            self.notify.notify_one();
        }
    }

    /// Wait until some CA is marked.
    pub async fn changed(&self) {
        if !self
            .dirty
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty()
        {
            return;
        }
        self.notify.notified().await;
    }

    /// The CAs marked since the last take.
    pub fn take(&self) -> BTreeSet<String> {
        std::mem::take(&mut *self.dirty.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// [`CertificateOwner`] with its id owned, to move into a write closure.
enum OwnedOwner {
    Registration(String),
    Vnf(String),
}

impl From<CertificateOwner<'_>> for OwnedOwner {
    fn from(owner: CertificateOwner<'_>) -> Self {
        match owner {
            CertificateOwner::Registration(id) => OwnedOwner::Registration(id.to_string()),
            CertificateOwner::Vnf(vnf) => OwnedOwner::Vnf(vnf.to_string()),
        }
    }
}

impl OwnedOwner {
    fn borrow(&self) -> CertificateOwner<'_> {
        match self {
            OwnedOwner::Registration(id) => CertificateOwner::Registration(id),
            OwnedOwner::Vnf(vnf) => CertificateOwner::Vnf(vnf),
        }
    }
}

/// Request body of a consumer's revocation (`POST .../certificates/{serial}/revoke`).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RevokeRequest {
    /// RFC 5280 5.3.1 name; `unspecified` when absent.
    #[serde(default)]
    pub reason: Option<String>,
}

/// A certificate's revocation status, as the REST resource and the CLI report it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RevocationStatus {
    pub serial_number: String,
    pub ca_id: String,
    pub revoked_at: String,
    pub reason: String,
    /// False when the certificate had been revoked before this request.
    pub revoked_now: bool,
}

impl Cmf {
    /// Revoke every not-yet-revoked issued certificate matching `filter`, durably (one
    /// transaction, audited with `actor`), then schedule the affected CAs' CRL regeneration.
    /// Idempotent: a second call revokes nothing new and reports the earlier ones as already.
    ///
    /// The candidates are found on a snapshot (a full pass over the certificates, off the
    /// async threads), then each is read again and `filter` applied again inside the write
    /// transaction, so a certificate revoked in between is reported as already revoked,
    /// never revoked twice. A certificate recorded after the snapshot is not seen: when the
    /// registration or the VNF is what selects, [`Cmf::revoke_of`] finds them through the
    /// indexes inside the revoking transaction instead, without the full pass.
    pub async fn revoke_where(
        &self,
        filter: impl Fn(&IssuedRecord) -> bool + Send + 'static,
        reason: RevocationReason,
        actor: &str,
    ) -> Result<RevokeOutcome, CmfError> {
        // The filter is Send but not Sync: it moves to the scanning thread and back.
        let store = self.store.clone();
        let (filter, candidates) = tokio::task::spawn_blocking(move || {
            let keys = store.read(|tx| {
                let mut keys = Vec::new();
                tx.scan(&CERTIFICATES, None, |key, record| {
                    if filter(&record) {
                        keys.push(key.to_string());
                    }
                    true
                })?;
                Ok(keys)
            });
            (filter, keys)
        })
        .await
        .map_err(|e| CmfError::Internal(format!("revocation scan: {e}")))?;
        let candidates = candidates?;
        if candidates.is_empty() {
            return Ok(RevokeOutcome::default());
        }
        self.revoke_keys(candidates, filter, reason, actor).await
    }

    /// A consumer revokes one certificate it manages, by serial (hex; colons allowed) and
    /// optionally CA. Another consumer's certificate is reported as absent (404), so a
    /// consumer learns nothing of serials it does not manage.
    pub async fn revoke_by_consumer(
        &self,
        consumer: &Consumer,
        serial: &str,
        reason: RevocationReason,
    ) -> Result<RevocationStatus, CmfError> {
        let key = self.certificate_key(serial)?;
        let owner = consumer.id.clone();
        let visible = key.clone();
        let record = self
            .store
            .read(move |tx| tx.get(&CERTIFICATES, &visible))?
            .filter(|r| r.consumer == owner);
        if record.is_none() {
            return Err(CmfError::NotFound(format!(
                "certificate {serial} does not exist"
            )));
        }
        let owner = consumer.id.clone();
        let outcome = self
            .revoke_keys(
                vec![key.clone()],
                move |r| r.consumer == owner,
                reason,
                &consumer.id,
            )
            .await?;
        self.revocation_status(&key, !outcome.revoked.is_empty())
    }

    /// The operator revokes one certificate, by serial or `caId/serial`, whoever manages it.
    pub async fn revoke_by_operator(
        &self,
        serial: &str,
        reason: RevocationReason,
        actor: &str,
    ) -> Result<RevocationStatus, CmfError> {
        let key = self.certificate_key(serial)?;
        let visible = key.clone();
        if self
            .store
            .read(move |tx| tx.get(&CERTIFICATES, &visible))?
            .is_none()
        {
            return Err(CmfError::NotFound(format!(
                "certificate {serial} does not exist"
            )));
        }
        let outcome = self
            .revoke_keys(vec![key.clone()], |_| true, reason, actor)
            .await?;
        self.revocation_status(&key, !outcome.revoked.is_empty())
    }

    /// Revoke every not-yet-revoked certificate of a registration or a VNF instance, in one
    /// durable transaction that finds them through the certificate indexes
    /// ([`super::records`]) and revokes them: no pass over every certificate, and a
    /// certificate recorded for that owner before this commit is revoked by it (after it,
    /// one is recorded only while its registration exists). Prefer this to
    /// [`Cmf::revoke_where`] whenever the owner is what selects.
    pub async fn revoke_of(
        &self,
        owner: CertificateOwner<'_>,
        reason: RevocationReason,
        actor: &str,
    ) -> Result<RevokeOutcome, CmfError> {
        let actor = actor.to_string();
        let owned: OwnedOwner = owner.into();
        let outcome = self
            .group
            .write_async(move |tx| {
                let owner = owned.borrow();
                let keys = records::certificates_of(tx, owner)?;
                revoke_in_tx(tx, keys, &|r| owner.owns(r), reason, &actor)
            })
            .await
            .map_err(rejected_or)?;
        self.revoked(&outcome, reason);
        Ok(outcome)
    }

    /// After a committed revocation: the affected CAs' CRLs are made again, and it is logged.
    pub(crate) fn revoked(&self, outcome: &RevokeOutcome, reason: RevocationReason) {
        self.crl_signal.mark(
            outcome
                .revoked
                .iter()
                .filter_map(|key| key.split_once('/').map(|(ca, _)| ca.to_string())),
        );
        if !outcome.revoked.is_empty() {
            tracing::info!(
                revoked = outcome.revoked.len(),
                reason = reason.as_str(),
                "certificates revoked"
            );
        }
    }

    /// Revoke the certificates at `keys` that pass `filter`, in one durable transaction.
    async fn revoke_keys(
        &self,
        keys: Vec<String>,
        filter: impl Fn(&IssuedRecord) -> bool + Send + 'static,
        reason: RevocationReason,
        actor: &str,
    ) -> Result<RevokeOutcome, CmfError> {
        let actor = actor.to_string();
        let outcome = self
            .group
            .write_async(move |tx| revoke_in_tx(tx, keys, &filter, reason, &actor))
            .await
            .map_err(rejected_or)?;
        self.revoked(&outcome, reason);
        Ok(outcome)
    }

    /// `caId/serial` of a serial given as hex (colons and case allowed) or `caId/serial`.
    /// A bare serial is looked up under every CA (serials are unique per CA; two CAs could
    /// share one, which is then ambiguous).
    fn certificate_key(&self, serial: &str) -> Result<String, CmfError> {
        let parsed = SerialRef::parse(serial).map_err(CmfError::BadRequest)?;
        let normalized = parsed.der_hex;
        if let Some(ca) = parsed.ca.as_deref() {
            if self.ca(ca).is_none() {
                return Err(CmfError::NotFound(format!(
                    "certificate {serial} does not exist"
                )));
            }
            return Ok(format!("{ca}/{normalized}"));
        }
        let keys: Vec<String> = self
            .cas
            .iter()
            .map(|ca| format!("{}/{normalized}", ca.id))
            .collect();
        let lookup = keys.clone();
        let found: Vec<String> = self.store.read(move |tx| {
            let mut found = Vec::new();
            for key in lookup {
                if tx.contains(&CERTIFICATES, &key)? {
                    found.push(key);
                }
            }
            Ok(found)
        })?;
        match found.as_slice() {
            [one] => Ok(one.clone()),
            [] => Ok(keys.into_iter().next().unwrap_or_default()),
            _ => Err(CmfError::Conflict(format!(
                "serial {serial} was issued by more than one CA: name it as caId/serial"
            ))),
        }
    }

    fn revocation_status(
        &self,
        key: &str,
        revoked_now: bool,
    ) -> Result<RevocationStatus, CmfError> {
        let lookup = key.to_string();
        let record = self
            .store
            .read(move |tx| tx.get(&CERTIFICATES, &lookup))?
            .ok_or_else(|| CmfError::NotFound(format!("certificate {key} does not exist")))?;
        let revocation = record.revocation.ok_or_else(|| {
            // Reached only when the filter refused the record inside the transaction (its
            // manager changed in between).
            CmfError::NotFound(format!("certificate {key} does not exist"))
        })?;
        Ok(RevocationStatus {
            serial_number: record.serial_number,
            ca_id: record.ca_id,
            revoked_at: revocation.revoked_at,
            reason: revocation.reason,
            revoked_now,
        })
    }
}

/// A serial number in hex as people and tools write it (`openssl x509 -serial` prints the
/// magnitude: no leading zero octet, maybe an odd number of digits) in the form the store
/// keys it by: the DER INTEGER's content octets (RFC 5280 4.1.2.2: positive, so a leading
/// zero octet when the top bit is set, and no other leading zero octets).
pub(crate) fn der_serial_hex(hex_digits: &str) -> String {
    let digits = hex_digits.trim_start_matches('0');
    if digits.is_empty() {
        return "00".into();
    }
    let mut even = if digits.len() % 2 == 1 {
        format!("0{digits}")
    } else {
        digits.to_string()
    };
    if even.as_bytes()[0] >= b'8' {
        even.insert_str(0, "00");
    }
    even
}

/// The revocation itself, inside the caller's write transaction: each certificate at `keys`
/// that still passes `filter` and is not yet revoked gets its revocation, its entry in the
/// revoked index and its CA's CRL change counter bumped, with one audit entry. The CRL task
/// sees the counters at its next wake (`CrlSignal::mark`) or at start.
pub(crate) fn revoke_in_tx(
    tx: &mut crate::store::WriteTx<'_>,
    keys: Vec<String>,
    filter: &dyn Fn(&IssuedRecord) -> bool,
    reason: RevocationReason,
    actor: &str,
) -> Result<RevokeOutcome, StoreError> {
    let now = crate::keys::rfc3339_now();
    let mut outcome = RevokeOutcome::default();
    for key in keys {
        let Some(mut record) = tx.get(&CERTIFICATES, &key)? else {
            continue;
        };
        if !filter(&record) {
            continue;
        }
        if record.revocation.is_some() {
            outcome.already_revoked.push(key);
            continue;
        }
        record.revocation = Some(Revocation {
            revoked_at: now.clone(),
            reason: reason.as_str().to_string(),
        });
        tx.put(&CERTIFICATES, &key, &record)?;
        tx.put(
            &REVOKED,
            &key,
            &RevokedEntry {
                revoked_at: now.clone(),
                reason,
                not_after: record.not_after.clone(),
            },
        )?;
        outcome.revoked.push(key);
    }
    // Each CA's CRL is stale from this commit on (the CRL task compares).
    let cas: BTreeSet<&str> = outcome
        .revoked
        .iter()
        .filter_map(|key| key.split_once('/').map(|(ca, _)| ca))
        .collect();
    for ca in cas {
        let changes = tx.get(&CRL_CHANGES, ca)?.unwrap_or(0);
        tx.put(&CRL_CHANGES, ca, &(changes + 1))?;
    }
    if !outcome.revoked.is_empty() {
        let subject = match outcome.revoked.as_slice() {
            [one] => one.clone(),
            many => format!("{} certificates", many.len()),
        };
        tx.audit(
            AuditEvent::new(actor, "cmf.revoke", subject).with_detail(serde_json::json!({
                "reason": reason.as_str(),
                "revokedAt": now,
                "certificates": outcome.revoked,
            })),
        );
    }
    Ok(outcome)
}

/// A VNF instance id as a registration may carry it: what SOL 003 identifiers look like
/// (printable, no separators that would confuse keys or paths).
pub(crate) fn check_vnf_instance_id(id: &str) -> Result<(), CmfError> {
    if id.is_empty()
        || id.len() > 128
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(CmfError::BadRequest(format!(
            "vnfInstanceId '{id}': 1 to 128 letters, digits, '-', '_' or '.'"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_are_keyed_by_their_der_content_octets() {
        assert_eq!(der_serial_hex("a515b1"), "00a515b1");
        assert_eq!(der_serial_hex("00a515b1"), "00a515b1");
        assert_eq!(der_serial_hex("5b81"), "5b81");
        assert_eq!(der_serial_hex("0005b81"), "5b81");
        assert_eq!(der_serial_hex("fff"), "0fff");
    }

    #[test]
    fn reasons_parse_by_rfc_name_and_kebab_case() {
        for reason in RevocationReason::ALL {
            assert_eq!(RevocationReason::parse(reason.as_str()), Some(reason));
        }
        assert_eq!(
            RevocationReason::parse("key-compromise"),
            Some(RevocationReason::KeyCompromise)
        );
        assert_eq!(
            RevocationReason::parse("ca-compromise"),
            Some(RevocationReason::CaCompromise)
        );
        assert_eq!(RevocationReason::parse("removeFromCRL"), None);
        assert_eq!(RevocationReason::parse(""), None);
        assert_eq!(
            serde_json::to_string(&RevocationReason::CessationOfOperation).unwrap(),
            "\"cessationOfOperation\""
        );
    }

    #[test]
    fn crl_reason_codes_are_rfc_5280_values() {
        let codes: Vec<u32> = RevocationReason::ALL
            .iter()
            .map(|r| r.crl_reason() as u32)
            .collect();
        assert_eq!(codes, [0, 1, 2, 3, 4, 5, 6, 9]);
    }

    #[tokio::test]
    async fn the_signal_wakes_once_for_marked_cas() {
        let signal = CrlSignal::default();
        signal.mark(["a".to_string(), "b".to_string()]);
        signal.changed().await;
        assert_eq!(signal.take().len(), 2);
        assert!(signal.take().is_empty());
    }
}
