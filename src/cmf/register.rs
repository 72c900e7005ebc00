//! Register (IFA 033 11.2.2): a consumer registers the subjects of the certificates it will
//! request, optionally with the attester of their keys; it becomes their manager.

use base64::Engine;
use serde::Deserialize;

use super::attest::FormatOid;
use super::{
    new_id, CertType, Cmf, CmfError, Consumer, RegisteredAttester, Registration, VnfcCertHandling,
    REGISTRATIONS, SUBJECTS,
};
use crate::store::AuditEvent;

/// `POST /certmgmt/v1/registrations` body.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegisterRequest {
    pub cert_type: String,
    pub subject_ids: Vec<String>,
    #[serde(default)]
    pub type_of_vnfc_cert_handling: Option<String>,
    #[serde(default)]
    pub key_attestation: Option<KeyAttestationRequest>,
    #[serde(default)]
    pub ca_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyAttestationRequest {
    /// SubjectPublicKeyInfo: base64 DER or PEM.
    pub attester_public_key: String,
    pub format_oid: String,
    /// Base64.
    #[serde(default)]
    pub expected_qualifying_data: Option<String>,
}

const MAX_SUBJECTS: usize = 64;
const MAX_SUBJECT_LEN: usize = 253;

impl Cmf {
    /// Validate and store a registration, with its subject index and an audit entry, in one
    /// durable commit.
    pub async fn register(
        &self,
        consumer: &Consumer,
        request: RegisterRequest,
    ) -> Result<Registration, CmfError> {
        let cert_type = CertType::parse(&request.cert_type).ok_or_else(|| {
            CmfError::BadRequest(format!(
                "certType '{}': expected MANO_CERT, VNFCI_CERT or VNF_OAM_CERT",
                request.cert_type
            ))
        })?;
        let handling = match (cert_type, request.type_of_vnfc_cert_handling.as_deref()) {
            (CertType::ManoCert, None) => None,
            (CertType::ManoCert, Some(_)) => {
                return Err(CmfError::BadRequest(
                    "typeOfVnfcCertHandling must be absent for MANO_CERT (IFA 033 11.2.2.2)".into(),
                ))
            }
            (_, None) => {
                return Err(CmfError::BadRequest(format!(
                    "typeOfVnfcCertHandling is required for {cert_type} (IFA 033 11.2.2.2)"
                )))
            }
            (_, Some("DELEGATION_MODE")) => Some(VnfcCertHandling::DelegationMode),
            (_, Some("DIRECT_MODE")) => {
                return Err(CmfError::Unprocessable(
                    "typeOfVnfcCertHandling DIRECT_MODE: this version of the interface allows \
                     delegation mode only (IFA 033 11.2.2.2 NOTE)"
                        .into(),
                ))
            }
            (_, Some(other)) => {
                return Err(CmfError::BadRequest(format!(
                    "typeOfVnfcCertHandling '{other}': expected DELEGATION_MODE or DIRECT_MODE"
                )))
            }
        };
        if request.subject_ids.is_empty() || request.subject_ids.len() > MAX_SUBJECTS {
            return Err(CmfError::BadRequest(format!(
                "subjectIds: 1 to {MAX_SUBJECTS} identifiers required"
            )));
        }
        let mut subjects = Vec::with_capacity(request.subject_ids.len());
        for subject in &request.subject_ids {
            check_subject_id(cert_type, subject)?;
            let normalized = normalize(subject);
            if subjects.contains(&normalized) {
                return Err(CmfError::BadRequest(format!(
                    "subjectIds: '{subject}' given twice"
                )));
            }
            subjects.push(normalized);
        }
        let key_attestation = request
            .key_attestation
            .map(|k| check_attester(&k))
            .transpose()?;
        let ca_id = match &request.ca_id {
            Some(id) => {
                let ca = self.ca(id).ok_or_else(|| {
                    CmfError::Unprocessable(format!("caId '{id}' is not a CA of this CMF"))
                })?;
                if !ca.cert_types.contains(&cert_type) {
                    return Err(CmfError::Unprocessable(format!(
                        "caId '{id}' does not issue {cert_type}"
                    )));
                }
                id.clone()
            }
            // 11.2.2.4: the CMF selects the CA and records its choice.
            None => self
                .cas
                .iter()
                .find(|ca| ca.cert_types.contains(&cert_type))
                .map(|ca| ca.id.clone())
                .ok_or_else(|| {
                    CmfError::Unprocessable(format!("no CA of this CMF issues {cert_type}"))
                })?,
        };
        let registration = Registration {
            id: new_id()?,
            consumer: consumer.id.clone(),
            trust_domain: consumer.trust_domain.clone(),
            cert_type,
            subject_ids: subjects,
            type_of_vnfc_cert_handling: handling,
            key_attestation,
            ca_id,
            created: crate::keys::rfc3339_now(),
        };
        let stored = registration.clone();
        let consumer_id = consumer.id.clone();
        self.group
            .write_async(move |tx| {
                for subject in &stored.subject_ids {
                    let key = subject_key(stored.cert_type, subject);
                    if let Some(owner_id) = tx.get(&SUBJECTS, &key)? {
                        let owner = tx.get(&REGISTRATIONS, &owner_id)?;
                        let mine = owner.as_ref().is_some_and(|r| r.consumer == consumer_id);
                        return Err(crate::store::StoreError::rejected(if mine {
                            CmfError::Conflict(format!(
                                "{} '{subject}' is already registered by you (registration {owner_id})",
                                stored.cert_type
                            ))
                        } else {
                            CmfError::Forbidden(format!(
                                "{} '{subject}' is managed by another consumer",
                                stored.cert_type
                            ))
                        }));
                    }
                    tx.put(&SUBJECTS, &key, &stored.id)?;
                }
                tx.put(&REGISTRATIONS, &stored.id, &stored)?;
                tx.audit(
                    AuditEvent::new(&consumer_id, "cmf.register", &stored.id).with_detail(
                        serde_json::json!({
                            "certType": stored.cert_type,
                            "subjectIds": stored.subject_ids,
                            "caId": stored.ca_id,
                            "attested": stored.key_attestation.is_some(),
                        }),
                    ),
                );
                Ok(())
            })
            .await
            .map_err(rejected_or)?;
        Ok(registration)
    }

    /// The consumer's registrations.
    pub fn registrations(&self, consumer: &Consumer) -> Result<Vec<Registration>, CmfError> {
        let all = self.store.read(|tx| tx.list(&REGISTRATIONS, ""))?;
        Ok(all
            .into_iter()
            .map(|(_, r)| r)
            .filter(|r| r.consumer == consumer.id && r.trust_domain == consumer.trust_domain)
            .collect())
    }

    /// One registration; 404 when absent, 403 when another consumer's.
    pub fn registration(&self, consumer: &Consumer, id: &str) -> Result<Registration, CmfError> {
        let found = self.store.read(|tx| tx.get(&REGISTRATIONS, id))?;
        let registration =
            found.ok_or_else(|| CmfError::NotFound(format!("registration {id} does not exist")))?;
        owned_by(&registration, consumer)?;
        Ok(registration)
    }

    /// Delete a registration and its subject index; issued certificates stay recorded.
    pub async fn delete_registration(&self, consumer: &Consumer, id: &str) -> Result<(), CmfError> {
        let id = id.to_string();
        let consumer = consumer.clone();
        self.group
            .write_async(move |tx| {
                let registration = tx.get(&REGISTRATIONS, &id)?.ok_or_else(|| {
                    crate::store::StoreError::rejected(CmfError::NotFound(format!(
                        "registration {id} does not exist"
                    )))
                })?;
                owned_by(&registration, &consumer).map_err(crate::store::StoreError::rejected)?;
                for subject in &registration.subject_ids {
                    tx.delete(&SUBJECTS, &subject_key(registration.cert_type, subject))?;
                }
                tx.delete(&REGISTRATIONS, &id)?;
                tx.audit(AuditEvent::new(&consumer.id, "cmf.deregister", &id));
                Ok(())
            })
            .await
            .map_err(rejected_or)
    }
}

/// A registration is visible only to the consumer that made it, in its trust domain.
pub(crate) fn owned_by(registration: &Registration, consumer: &Consumer) -> Result<(), CmfError> {
    if registration.consumer == consumer.id && registration.trust_domain == consumer.trust_domain {
        Ok(())
    } else {
        Err(CmfError::Forbidden(format!(
            "registration {} belongs to another consumer",
            registration.id
        )))
    }
}

pub(crate) fn subject_key(cert_type: CertType, subject: &str) -> String {
    format!("{}/{}", cert_type.as_str(), normalize(subject))
}

/// Subject identifiers compare case-insensitively (DNS names do; VNFCI ids are opaque
/// identifiers that the VNFM spells consistently).
pub(crate) fn normalize(subject: &str) -> String {
    subject.to_ascii_lowercase()
}

fn check_subject_id(cert_type: CertType, subject: &str) -> Result<(), CmfError> {
    let bad = |why: &str| CmfError::BadRequest(format!("subjectIds: '{subject}' {why}"));
    if subject.is_empty() || subject.len() > MAX_SUBJECT_LEN {
        return Err(bad("must be 1 to 253 characters"));
    }
    if !subject
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':'))
    {
        return Err(bad(
            "may contain only letters, digits, '-', '.', '_' and ':'",
        ));
    }
    if cert_type == CertType::ManoCert && crate::ca::general_name(subject).is_err() {
        return Err(bad("is not an FQDN (MANO_CERT subjects are FQDNs)"));
    }
    Ok(())
}

/// The registered attester from the request's envelopes (PEM or base64 SPKI, format OID,
/// base64 qualifying data); public for the `register` fuzz target.
pub fn check_attester(request: &KeyAttestationRequest) -> Result<RegisteredAttester, CmfError> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let text = request.attester_public_key.trim();
    let der = if text.starts_with("-----BEGIN") {
        let (label, der) = der::pem::decode_vec(text.as_bytes()).map_err(|e| {
            CmfError::BadRequest(format!("keyAttestation.attesterPublicKey: PEM: {e}"))
        })?;
        if label != "PUBLIC KEY" {
            return Err(CmfError::BadRequest(format!(
                "keyAttestation.attesterPublicKey: PEM label {label}, expected PUBLIC KEY"
            )));
        }
        der
    } else {
        b64.decode(text).map_err(|e| {
            CmfError::BadRequest(format!("keyAttestation.attesterPublicKey: base64: {e}"))
        })?
    };
    use der::Decode;
    spki::SubjectPublicKeyInfoRef::from_der(&der).map_err(|e| {
        CmfError::BadRequest(format!(
            "keyAttestation.attesterPublicKey: not a SubjectPublicKeyInfo: {e}"
        ))
    })?;
    crate::cmf::csr::key_type_of(&der)
        .map_err(|e| CmfError::BadRequest(format!("keyAttestation.attesterPublicKey: {e}")))?;
    request.format_oid.parse::<FormatOid>().map_err(|e| {
        CmfError::BadRequest(format!(
            "keyAttestation.formatOid '{}': {e}",
            request.format_oid
        ))
    })?;
    if let Some(q) = &request.expected_qualifying_data {
        b64.decode(q).map_err(|e| {
            CmfError::BadRequest(format!(
                "keyAttestation.expectedQualifyingData: base64: {e}"
            ))
        })?;
    }
    Ok(RegisteredAttester {
        attester_public_key: b64.encode(&der),
        format_oid: request.format_oid.clone(),
        expected_qualifying_data: request.expected_qualifying_data.clone(),
    })
}

/// A closure's own CmfError comes back through the store as `Rejected`; anything else is a
/// store failure.
pub(crate) fn rejected_or(error: crate::store::StoreError) -> CmfError {
    match error.into_rejected::<CmfError>() {
        Ok(cmf) => cmf,
        Err(store) => CmfError::from(store),
    }
}
