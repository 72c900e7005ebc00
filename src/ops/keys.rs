//! Keys in the HSM or TPM, for the operator: `warden keys generate|list|show|destroy|sign-test`.
//!
//! Keys the agent generates are recorded in the store ([`KEYS`]) with their purpose, and a
//! destroy is recorded as an erasure ([`ERASURES`]), each with its audit entry in the same
//! transaction.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::OpsError;
use crate::keys::backends::Backends;
use crate::keys::{BackendKind, ErasureRecord, KeyAlgorithm, KeyRef, KeySpec, SignatureScheme};
use crate::pki;
use crate::store::{self, AuditEvent, ErasureEntry, KeyPurpose, KeyRecord, Store};

/// Most signatures one sign test makes: it shares the device with live traffic.
pub const MAX_SIGN_TEST: u32 = 10_000;

/// `warden keys generate`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GenerateRequest {
    pub backend: BackendKind,
    pub label: String,
    pub algorithm: KeyAlgorithm,
    pub purpose: KeyPurpose,
    /// The VNF instance a `vnf` key is held for: the SM erases it when that VNF terminates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vnf_instance_id: Option<String>,
}

/// A key a backend holds, with what the store knows of it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyEntry {
    pub reference: KeyRef,
    pub algorithm: KeyAlgorithm,
    pub label: String,
    /// From the store, for keys generated through `warden keys generate` or `sm init`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<KeyPurpose>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vnf_instance_id: Option<String>,
}

/// `warden keys show`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyDetails {
    pub reference: KeyRef,
    pub algorithm: KeyAlgorithm,
    pub device: String,
    /// The private key's protection attributes as the device reports them.
    pub attributes: String,
    pub public_key_pem: String,
}

/// `warden keys sign-test`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SignTestReport {
    pub reference: KeyRef,
    /// e.g. `ecdsa-p256-sha256`.
    pub scheme: String,
    pub signatures: u32,
    pub signs_per_second: f64,
}

/// Generate a non-extractable key pair and record it (and its audit entry) in the store.
pub fn generate(
    backends: &Backends,
    store: &Store,
    request: &GenerateRequest,
    actor: &str,
) -> Result<KeyEntry, OpsError> {
    if request.purpose != KeyPurpose::Vnf && request.vnf_instance_id.is_some() {
        return Err(OpsError::BadRequest(
            "a VNF instance is only for purpose vnf".into(),
        ));
    }
    if request.label.is_empty() {
        return Err(OpsError::BadRequest("the label is empty".into()));
    }
    let info = backends.by_kind(request.backend)?.generate(&KeySpec {
        label: request.label.clone(),
        algorithm: request.algorithm,
    })?;
    let record = KeyRecord {
        reference: info.reference.clone(),
        backend: info.reference.backend(),
        label: request.label.clone(),
        algorithm: request.algorithm,
        purpose: request.purpose,
        created: crate::keys::rfc3339_now(),
        vnf_instance_id: request.vnf_instance_id.clone(),
    };
    store.write(|tx| {
        tx.put(&store::KEYS, &record.reference.to_string(), &record)?;
        tx.audit(
            AuditEvent::new(actor, "key.generate", record.reference.to_string()).with_detail(
                serde_json::json!({
                    "algorithm": record.algorithm,
                    "purpose": record.purpose,
                    "label": record.label,
                    "vnfInstanceId": record.vnf_instance_id,
                }),
            ),
        );
        Ok(())
    })?;
    Ok(KeyEntry {
        reference: record.reference,
        algorithm: record.algorithm,
        label: record.label,
        purpose: Some(record.purpose),
        vnf_instance_id: record.vnf_instance_id,
    })
}

/// The keys of every configured backend, with the purpose the store recorded (when a store
/// is given).
pub fn list(backends: &Backends, store: Option<&Store>) -> Result<Vec<KeyEntry>, OpsError> {
    let mut entries = Vec::new();
    for backend in backends.all() {
        for key in backend.list()? {
            let record = match store {
                Some(store) => store.read(|tx| tx.get(&store::KEYS, &key.reference.to_string()))?,
                None => None,
            };
            entries.push(KeyEntry {
                algorithm: key.public_key.algorithm,
                label: key.label,
                purpose: record.as_ref().map(|r| r.purpose),
                vnf_instance_id: record.and_then(|r| r.vnf_instance_id),
                reference: key.reference,
            });
        }
    }
    Ok(entries)
}

/// One key: algorithm, device, protection attributes and public key.
pub fn show(backends: &Backends, key: &KeyRef) -> Result<KeyDetails, OpsError> {
    let device = backends.for_key(key)?;
    let public = device.public_key(key)?;
    let attributes = match key {
        KeyRef::Pkcs11(_) => match &backends.pkcs11 {
            Some(p) => {
                let a = p.private_key_attributes(key)?;
                format!(
                    "extractable={} sensitive={} never_extractable={} always_sensitive={}",
                    a.extractable, a.sensitive, a.never_extractable, a.always_sensitive
                )
            }
            None => String::new(),
        },
        KeyRef::Tpm(_) => match &backends.tpm {
            Some(t) => format!("0x{:08x}", t.object_attributes(key)?),
            None => String::new(),
        },
    };
    Ok(KeyDetails {
        reference: key.clone(),
        algorithm: public.algorithm,
        device: device.device(),
        attributes,
        public_key_pem: pki::to_pem("PUBLIC KEY", &public.spki_der).map_err(OpsError::Failed)?,
    })
}

/// Destroy `key`, look again, and record the erasure (and forget the key) in the store.
/// A key still present after the destroy is recorded as such and returned as
/// [`OpsError::Failed`] after the record is written.
pub fn destroy(
    backends: &Backends,
    store: &Store,
    key: &KeyRef,
    vnf_instance_id: Option<String>,
    actor: &str,
) -> Result<ErasureRecord, OpsError> {
    let record = backends.for_key(key)?.destroy(key)?;
    let entry = ErasureEntry::from_record(record.clone(), vnf_instance_id);
    let id = format!("{}-{}", record.erased_at, key);
    store.write(|tx| {
        tx.put(&store::ERASURES, &id, &entry)?;
        tx.delete(&store::KEYS, &key.to_string())?;
        tx.audit(
            AuditEvent::new(actor, "key.erase", key.to_string())
                .with_detail(serde_json::to_value(&entry).unwrap_or_default()),
        );
        Ok(())
    })?;
    Ok(record)
}

/// Sign a random challenge `count` times and verify the last signature in software.
pub fn sign_test(
    backends: &Backends,
    key: &KeyRef,
    scheme: Option<SignatureScheme>,
    count: u32,
) -> Result<SignTestReport, OpsError> {
    let count = count.clamp(1, MAX_SIGN_TEST);
    let device = backends.for_key(key)?;
    let public = device.public_key(key)?;
    let scheme = scheme.unwrap_or_else(|| public.algorithm.default_scheme());
    let mut challenge = [0u8; 32];
    getrandom::fill(&mut challenge)
        .map_err(|e| OpsError::Failed(format!("random challenge: {e}")))?;
    let start = Instant::now();
    let mut signature = Vec::new();
    for _ in 0..count {
        signature = device.sign(key, scheme, &challenge)?;
    }
    let elapsed = start.elapsed();
    let algorithm_id = crate::keys::signer::signature_algorithm_identifier(scheme)
        .map_err(|e| OpsError::Failed(format!("{scheme}: {e}")))?;
    pki::verify_signature(&public.spki_der, &algorithm_id, &challenge, &signature)
        .map_err(|e| OpsError::Failed(format!("{key}: {scheme} signature does not verify: {e}")))?;
    Ok(SignTestReport {
        reference: key.clone(),
        scheme: scheme.to_string(),
        signatures: count,
        signs_per_second: f64::from(count) / elapsed.as_secs_f64().max(f64::MIN_POSITIVE),
    })
}
