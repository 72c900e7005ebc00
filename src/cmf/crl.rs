//! CRLs per issuing CA (RFC 5280 5), signed by the CA key in the HSM/TPM.
//!
//! Each CA of the CMF has one complete CRL: v2, CRLNumber (monotonic and durable: the next
//! number is written in the same transaction as the CRL that carries it), the
//! authorityKeyIdentifier of the CA key (5.2.1), one entry per revoked, unexpired certificate
//! with a reasonCode entry extension unless the reason is unspecified (5.3.1 says to omit it
//! then), thisUpdate and nextUpdate (`[cmf.revocation] crl_validity_seconds`).
//!
//! No issuingDistributionPoint: RFC 5280 5.2.5 makes it the mark of a CRL whose scope is
//! narrower than "every certificate of this CA, for every reason" (a partitioned, user- or
//! CA-only, or indirect CRL). This CRL is the complete one, and the distribution point in
//! the certificates names neither `reasons` nor `cRLIssuer`, so by 6.3.3 (b) a complete CRL
//! without IDP is the one that applies to them. Adding an IDP with onlyContainsUserCerts would
//! be wrong for a CA that also signs the agent's own certificates, and a critical extension
//! some relying parties do not process.
//!
//! When: a revocation marks its CAs ([`super::revoke::CrlSignal`]); the CRL task waits
//! `crl_debounce_ms` for more and makes each marked CA's CRL once. It also makes a CRL when
//! the current one's nextUpdate is less than `crl_regenerate_before_seconds` away, when a CA
//! has none, and, at start, when revocations were committed after the stored CRL was made
//! (each revocation increments a per-CA change counter, [`CRL_CHANGES`], in its own
//! transaction; a CRL records the counter it was made from). A failed signature (the HSM or
//! TPM unavailable) is retried with backoff while the last CRL keeps being served.
//!
//! The last CRL of each CA is in the store ([`CRLS`]) and in memory, served at
//! `/crl/{caId}.crl` by [`crate::api::revocation`].

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, SystemTime};

use base64::Engine;
use der::asn1::{BitString, OctetString, Uint};
use der::referenced::OwnedToRef;
use der::{Decode, Encode};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use x509_cert::crl::{CertificateList, RevokedCert, TbsCertList};
use x509_cert::ext::pkix::{AuthorityKeyIdentifier, CrlNumber, SubjectKeyIdentifier};
use x509_cert::ext::{Extension, ToExtension};
use x509_cert::serial_number::SerialNumber;
use x509_cert::time::Time;
use x509_cert::Version;

use super::revoke::{RevocationReason, RevokedEntry, REVOKED};
use super::{Cmf, CmfError, IssuingCa};
use crate::config::RevocationConfig;
use crate::store::{AuditEvent, StoreError, Table};

/// The last CRL of each CA, by CA id.
pub const CRLS: Table<StoredCrl> = Table::new("cmf_crls");
/// Revocations committed per CA (a counter), by CA id: a CRL made from a lower count is stale.
pub const CRL_CHANGES: Table<u64> = Table::new("cmf_crl_changes");

/// A CRL as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredCrl {
    pub crl_number: u64,
    /// RFC 3339 UTC.
    pub this_update: String,
    pub next_update: String,
    /// [`CRL_CHANGES`] of the CA when the CRL was made.
    pub changes: u64,
    /// SHA-256 of the CA's SubjectPublicKeyInfo (a CA re-keyed under the same id needs a
    /// new CRL).
    pub issuer_spki_sha256: String,
    /// The CRL, base64 DER.
    pub der: String,
}

/// A CRL ready to serve.
#[derive(Clone, Debug)]
pub struct CurrentCrl {
    pub crl_number: u64,
    pub this_update: SystemTime,
    pub next_update: SystemTime,
    pub changes: u64,
    pub issuer_spki_sha256: String,
    pub der: Arc<[u8]>,
}

impl CurrentCrl {
    fn from_stored(stored: &StoredCrl) -> Option<CurrentCrl> {
        Some(CurrentCrl {
            crl_number: stored.crl_number,
            this_update: humantime::parse_rfc3339_weak(&stored.this_update).ok()?,
            next_update: humantime::parse_rfc3339_weak(&stored.next_update).ok()?,
            changes: stored.changes,
            issuer_spki_sha256: stored.issuer_spki_sha256.clone(),
            der: base64::engine::general_purpose::STANDARD
                .decode(&stored.der)
                .ok()?
                .into(),
        })
    }
}

/// The CMF's revocation publishing state: settings, where it is published, the CRLs.
#[derive(Debug)]
pub struct Crls {
    pub(crate) settings: RevocationConfig,
    /// `http://host:port` relying parties reach the revocation listener at; set once the
    /// listener is bound (issued certificates carry URLs below it).
    base_url: OnceLock<String>,
    current: RwLock<HashMap<String, Arc<CurrentCrl>>>,
}

impl Crls {
    pub fn new(settings: RevocationConfig) -> Crls {
        Crls {
            settings,
            base_url: OnceLock::new(),
            current: RwLock::new(HashMap::new()),
        }
    }

    pub fn enabled(&self) -> bool {
        self.settings.enabled
    }

    pub fn base_url(&self) -> Option<&str> {
        self.base_url.get().map(String::as_str)
    }

    /// The CRL distribution point of a CA.
    pub fn crl_url(&self, ca_id: &str) -> Option<String> {
        self.base_url().map(|base| crl_url(base, ca_id))
    }

    /// The OCSP responder's URL.
    pub fn ocsp_url(&self) -> Option<String> {
        self.base_url().map(ocsp_url)
    }

    fn get(&self, ca_id: &str) -> Option<Arc<CurrentCrl>> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(ca_id)
            .cloned()
    }

    fn set(&self, ca_id: &str, crl: Arc<CurrentCrl>) {
        self.current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(ca_id.to_string(), crl);
    }
}

/// The CRL distribution point of CA `ca_id` under `base`: `{base}/crl/{caId}.crl`.
pub fn crl_url(base: &str, ca_id: &str) -> String {
    format!("{base}/crl/{}.crl", url_segment(ca_id))
}

/// The OCSP responder under `base`, one for every CA (the request's CertID names the
/// issuer): `{base}/ocsp`.
pub fn ocsp_url(base: &str) -> String {
    format!("{base}/ocsp")
}

/// A CA id as a URL path segment (RFC 3986 unreserved characters stay as they are).
fn url_segment(text: &str) -> String {
    const SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(text, SET).to_string()
}

impl Cmf {
    pub fn crls(&self) -> &Crls {
        &self.crls
    }

    /// Publish revocation information under `base_url` from now on (the revocation listener
    /// is bound). Once only; a second call is ignored.
    pub fn set_revocation_base_url(&self, base_url: String) {
        let _ = self.crls.base_url.set(base_url);
    }

    /// The CRL being served for `ca_id`.
    pub fn current_crl(&self, ca_id: &str) -> Option<Arc<CurrentCrl>> {
        self.crls.get(ca_id)
    }

    /// Load the stored CRLs into memory (at start, before serving).
    pub fn load_crls(&self) -> Result<usize, CmfError> {
        let stored = self.store.read(|tx| tx.list(&CRLS, ""))?;
        let mut loaded = 0;
        for (ca_id, crl) in stored {
            if self.ca(&ca_id).is_none() {
                continue;
            }
            match CurrentCrl::from_stored(&crl) {
                Some(current) => {
                    self.crls.set(&ca_id, Arc::new(current));
                    loaded += 1;
                }
                None => tracing::warn!(ca = %ca_id, "stored CRL unreadable; a new one is made"),
            }
        }
        Ok(loaded)
    }

    /// Make, store and publish a new CRL for `ca_id` now.
    pub async fn make_crl(&self, ca_id: &str) -> Result<Arc<CurrentCrl>, CmfError> {
        let ca = self
            .ca(ca_id)
            .ok_or_else(|| CmfError::NotFound(format!("no CA '{ca_id}'")))?
            .clone();
        // A concurrent maker (none in one process, the task is the only caller besides
        // tests) would make the compare-and-set below fail; retry from a fresh snapshot.
        for _ in 0..3 {
            let store = self.store.clone();
            let prefix = format!("{ca_id}/");
            let id = ca_id.to_string();
            let (previous, changes, revoked) = tokio::task::spawn_blocking(move || {
                store.read(|tx| {
                    Ok((
                        tx.get(&CRLS, &id)?,
                        tx.get(&CRL_CHANGES, &id)?.unwrap_or(0),
                        tx.list(&REVOKED, &prefix)?,
                    ))
                })
            })
            .await
            .map_err(|e| CmfError::Internal(format!("CRL: {e}")))??;
            let number = previous.as_ref().map_or(1, |p| p.crl_number + 1);
            let validity = Duration::from_secs(self.crls.settings.crl_validity_seconds);
            let signer = ca.clone();
            let (der, this_update, next_update) =
                tokio::task::spawn_blocking(move || sign_crl(&signer, number, &revoked, validity))
                    .await
                    .map_err(|e| CmfError::Internal(format!("CRL: {e}")))??;
            let spki_sha256 =
                hex::encode(sha2::Sha256::digest(&ca.issuer.key().public_key().spki_der));
            let stored = StoredCrl {
                crl_number: number,
                this_update: crate::keys::rfc3339(this_update),
                next_update: crate::keys::rfc3339(next_update),
                changes,
                issuer_spki_sha256: spki_sha256.clone(),
                der: base64::engine::general_purpose::STANDARD.encode(&der),
            };
            let id = ca_id.to_string();
            let expected = previous.map(|p| p.crl_number);
            let record = stored.clone();
            let committed = self
                .group
                .write_async(move |tx| {
                    let now = tx.get(&CRLS, &id)?.map(|p| p.crl_number);
                    if now != expected {
                        return Ok(false);
                    }
                    tx.put(&CRLS, &id, &record)?;
                    tx.audit(AuditEvent::new("warden", "cmf.crl", &id).with_detail(
                        serde_json::json!({
                            "crlNumber": record.crl_number,
                            "thisUpdate": record.this_update,
                            "nextUpdate": record.next_update,
                        }),
                    ));
                    Ok::<_, StoreError>(true)
                })
                .await
                .map_err(super::register::rejected_or)?;
            if !committed {
                continue;
            }
            let current = Arc::new(CurrentCrl {
                crl_number: number,
                this_update,
                next_update,
                changes,
                issuer_spki_sha256: spki_sha256,
                der: der.into(),
            });
            self.crls.set(ca_id, current.clone());
            tracing::info!(ca = %ca_id, crl_number = number, "CRL published");
            return Ok(current);
        }
        Err(CmfError::Conflict(format!(
            "CRL of '{ca_id}': the CRL number moved under us three times"
        )))
    }

    /// The CAs whose CRL must be made now: none yet, made with another key, stale against
    /// committed revocations, or close to its nextUpdate.
    fn crls_due(&self) -> Result<BTreeSet<String>, CmfError> {
        let changes: HashMap<String, u64> = self
            .store
            .read(|tx| tx.list(&CRL_CHANGES, ""))?
            .into_iter()
            .collect();
        let margin = Duration::from_secs(self.crls.settings.crl_regenerate_before_seconds);
        let now = SystemTime::now();
        let mut due = BTreeSet::new();
        for ca in self.cas.iter() {
            let spki = hex::encode(sha2::Sha256::digest(&ca.issuer.key().public_key().spki_der));
            let fresh = self.crls.get(&ca.id).is_some_and(|crl| {
                crl.issuer_spki_sha256 == spki
                    && crl.changes >= changes.get(&ca.id).copied().unwrap_or(0)
                    && crl.next_update > now + margin
            });
            if !fresh {
                due.insert(ca.id.clone());
            }
        }
        Ok(due)
    }

    /// When the next CRL falls due without a revocation.
    fn next_refresh(&self) -> SystemTime {
        let margin = Duration::from_secs(self.crls.settings.crl_regenerate_before_seconds);
        self.cas
            .iter()
            .filter_map(|ca| self.crls.get(&ca.id))
            .map(|crl| {
                crl.next_update
                    .checked_sub(margin)
                    .unwrap_or(crl.next_update)
            })
            .min()
            .unwrap_or_else(|| SystemTime::now() + Duration::from_secs(60))
    }

    /// The CRL task: makes CRLs on revocation (debounced), before nextUpdate, and for CAs
    /// that have none, until `shutdown`. Failures are retried with backoff (1 s to 60 s).
    pub async fn run_crl_task(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        if !self.crls.enabled() {
            return;
        }
        tokio::pin!(shutdown);
        let debounce = Duration::from_millis(self.crls.settings.crl_debounce_ms);
        let mut backoff = Duration::from_secs(1);
        loop {
            let mut due = self.crl_signal.take();
            match self.crls_due() {
                Ok(more) => due.extend(more),
                Err(e) => tracing::warn!(error = %e, "cannot tell which CRLs are due"),
            }
            let mut failed = false;
            for ca_id in &due {
                if let Err(e) = self.make_crl(ca_id).await {
                    failed = true;
                    if crate::log_limit::allow("cmf.crl") {
                        tracing::error!(ca = %ca_id, error = %e, "cannot make the CRL; the last one is still served");
                    }
                }
            }
            let wait = if failed {
                let wait = backoff;
                backoff = (backoff * 2).min(Duration::from_secs(60));
                wait
            } else {
                backoff = Duration::from_secs(1);
                self.next_refresh()
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO)
                    .max(Duration::from_secs(1))
            };
            tokio::select! {
                _ = &mut shutdown => return,
                _ = self.crl_signal.changed() => {
                    // Let a burst of revocations land first: one CRL for all of them.
                    tokio::select! {
                        _ = &mut shutdown => return,
                        _ = tokio::time::sleep(debounce) => {}
                    }
                }
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// Build and sign the CRL of `ca` (blocking: the CA key signs).
fn sign_crl(
    ca: &IssuingCa,
    number: u64,
    revoked: &[(String, RevokedEntry)],
    validity: Duration,
) -> Result<(Vec<u8>, SystemTime, SystemTime), CmfError> {
    let internal =
        |what: &str, e: &dyn std::fmt::Display| CmfError::Internal(format!("CRL {what}: {e}"));
    // Whole seconds: the encoding has no fractions, and the stored times must match it.
    let now = SystemTime::UNIX_EPOCH
        + Duration::from_secs(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_err(|e| internal("clock", &e))?
                .as_secs(),
        );
    let next = now + validity;
    let ca_cert = ca.issuer.certificate();
    let issuer = ca_cert.tbs_certificate().subject().clone();
    let mut entries: Vec<RevokedCert> = Vec::new();
    for (key, entry) in revoked {
        // RFC 5280 3.3: an entry may be removed once the certificate has expired; keep it
        // when the record's notAfter cannot be read.
        if humantime::parse_rfc3339_weak(&entry.not_after).is_ok_and(|after| after < now) {
            continue;
        }
        let serial_hex = key.rsplit('/').next().unwrap_or_default();
        let serial = hex::decode(serial_hex)
            .map_err(|e| internal("serial", &e))
            .and_then(|b| SerialNumber::new(&b).map_err(|e| internal("serial", &e)))?;
        let revoked_at = humantime::parse_rfc3339_weak(&entry.revoked_at)
            .map_err(|e| internal("revocation time", &e))?;
        let mut extensions: Vec<Extension> = Vec::new();
        if entry.reason != RevocationReason::Unspecified {
            let reason = entry.reason.crl_reason();
            extensions.push(
                reason
                    .to_extension(&issuer, &extensions)
                    .map_err(|e| internal("reasonCode", &e))?,
            );
        }
        entries.push(RevokedCert {
            serial_number: serial,
            revocation_date: Time::try_from(revoked_at).map_err(|e| internal("time", &e))?,
            crl_entry_extensions: (!extensions.is_empty()).then_some(extensions),
        });
    }
    let aki = AuthorityKeyIdentifier {
        key_identifier: Some(key_identifier(ca_cert).map_err(|e| internal("AKI", &e))?),
        ..Default::default()
    }
    .to_extension(&issuer, &[])
    .map_err(|e| internal("AKI", &e))?;
    let crl_number =
        CrlNumber(Uint::new(&number.to_be_bytes()).map_err(|e| internal("number", &e))?)
            .to_extension(&issuer, std::slice::from_ref(&aki))
            .map_err(|e| internal("number", &e))?;
    let crl_extensions = vec![aki, crl_number];
    let key = ca.issuer.key();
    let algorithm = crate::keys::signer::signature_algorithm_identifier(key.scheme())
        .map_err(|e| internal("algorithm", &e))?;
    let tbs = TbsCertList {
        version: Version::V2,
        signature: algorithm.clone(),
        issuer,
        this_update: Time::try_from(now).map_err(|e| internal("time", &e))?,
        next_update: Some(Time::try_from(next).map_err(|e| internal("time", &e))?),
        revoked_certificates: (!entries.is_empty()).then_some(entries),
        crl_extensions: Some(crl_extensions),
    };
    let tbs_der = tbs.to_der().map_err(|e| internal("encoding", &e))?;
    let signature = key.sign(&tbs_der).map_err(CmfError::from)?;
    let crl = CertificateList {
        tbs_cert_list: tbs,
        signature_algorithm: algorithm,
        signature: BitString::from_bytes(&signature).map_err(|e| internal("signature", &e))?,
    };
    let der = crl.to_der().map_err(|e| internal("encoding", &e))?;
    // Check what goes out: it decodes, and the CA key's signature verifies.
    let check = <CertificateList>::from_der(&der).map_err(|e| internal("decoding", &e))?;
    let tbs_again = check
        .tbs_cert_list
        .to_der()
        .map_err(|e| internal("encoding", &e))?;
    crate::pki::verify_signature(
        &key.public_key().spki_der,
        &check.signature_algorithm,
        &tbs_again,
        &signature,
    )
    .map_err(|e| internal("signature check", &e))?;
    Ok((der, now, next))
}

/// The CA's key identifier for the AKI (RFC 5280 4.2.1.1, 5.2.1): its certificate's
/// subjectKeyIdentifier when it has one (an imported CA may use another method than ours),
/// else the SHA-1 of its public key (method 1), as the certificates it issues carry.
pub(crate) fn key_identifier(ca_cert: &x509_cert::Certificate) -> Result<OctetString, String> {
    if let Ok(Some((_, ski))) = ca_cert
        .tbs_certificate()
        .get_extension::<SubjectKeyIdentifier>()
    {
        return Ok(ski.0);
    }
    let spki = ca_cert
        .tbs_certificate()
        .subject_public_key_info()
        .owned_to_ref();
    SubjectKeyIdentifier::try_from(spki)
        .map(|ski| ski.0)
        .map_err(|e| e.to_string())
}
