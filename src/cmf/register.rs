//! Register (IFA 033 11.2.2): a consumer registers the subjects of the certificates it will
//! request, optionally with the attester of their keys; it becomes their manager.

use base64::Engine;
use serde::Deserialize;

use super::attest::FormatOid;
use super::names::{self, SubjectName};
use super::records::CertificateOwner;
use super::revoke::{revoke_in_tx, RevocationReason, RevokeOutcome};
use super::{
    new_id, CertType, Cmf, CmfError, Consumer, RegisteredAttester, Registration, VnfcCertHandling,
    REGISTRATIONS, SUBJECTS,
};
use crate::store::{AuditEvent, StoreError, WriteTx};

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
    /// The VNF instance these subjects belong to (an extension of IFA 033 11.2.2.2): its
    /// certificates are revoked when that VNF is terminated.
    #[serde(default)]
    pub vnf_instance_id: Option<String>,
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
    /// The attester's (AK's) certificate and the intermediates up to a configured
    /// attestation root, PEM or base64 DER: anchors the attester (issue 10 §2).
    #[serde(default)]
    pub ak_certificate_chain: Vec<String>,
}

const MAX_SUBJECTS: usize = 64;

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
        let policy = self
            .policies
            .consumer(&consumer.id)
            .cloned()
            .ok_or_else(|| {
                CmfError::Forbidden(format!(
                    "'{}' is not a configured consumer of this CMF",
                    consumer.id
                ))
            })?;
        if !policy.cert_types.contains(&cert_type) {
            return Err(CmfError::Unprocessable(format!(
                "certType {cert_type}: not permitted for consumer '{}' of trust domain '{}' \
                 (cmf.trust_domain cert_types)",
                consumer.id, policy.trust_domain
            )));
        }
        if request.subject_ids.is_empty() || request.subject_ids.len() > MAX_SUBJECTS {
            return Err(CmfError::BadRequest(format!(
                "subjectIds: 1 to {MAX_SUBJECTS} identifiers required"
            )));
        }
        let mut names: Vec<SubjectName> = Vec::with_capacity(request.subject_ids.len());
        for subject in &request.subject_ids {
            // IFA 033 11.2.2.4: an input attribute that is not appropriate is refused at
            // Register, with the rule, rather than at every CSR later.
            let name = SubjectName::parse(subject)
                .map_err(|e| CmfError::Unprocessable(format!("subjectIds: {e}")))?;
            self.policies
                .check(&policy, cert_type, &name)
                .map_err(|why| CmfError::Unprocessable(format!("subjectIds: '{name}' {why}")))?;
            if names.contains(&name) {
                return Err(CmfError::BadRequest(format!(
                    "subjectIds: '{subject}' given twice"
                )));
            }
            names.push(name);
        }
        let key_attestation = request
            .key_attestation
            .map(|k| check_attester(self, &k))
            .transpose()?;
        let issues = |id: &str| {
            self.ca(id)
                .is_some_and(|ca| ca.cert_types.contains(&cert_type))
        };
        let ca_id = match &request.ca_id {
            Some(id) => {
                if !policy.cas.contains(id) {
                    return Err(CmfError::Unprocessable(format!(
                        "caId '{id}' is not a CA of trust domain '{}' (cas = {:?})",
                        policy.trust_domain, policy.cas
                    )));
                }
                if !issues(id) {
                    return Err(CmfError::Unprocessable(format!(
                        "caId '{id}' does not issue {cert_type}"
                    )));
                }
                id.clone()
            }
            // 11.2.2.4: the CMF selects the CA and records its choice: the first of the
            // trust domain's CAs that issues this certType.
            None => policy
                .cas
                .iter()
                .find(|id| issues(id))
                .cloned()
                .ok_or_else(|| {
                    CmfError::Unprocessable(format!(
                        "no CA of trust domain '{}' ({:?}) issues {cert_type}",
                        policy.trust_domain, policy.cas
                    ))
                })?,
        };
        if let Some(vnf) = &request.vnf_instance_id {
            super::revoke::check_vnf_instance_id(vnf)?;
        }
        let registration = Registration {
            id: new_id()?,
            consumer: consumer.id.clone(),
            trust_domain: consumer.trust_domain.clone(),
            cert_type,
            subject_ids: names.iter().map(SubjectName::canonical).collect(),
            type_of_vnfc_cert_handling: handling,
            key_attestation,
            ca_id,
            created: crate::keys::rfc3339_now(),
            vnf_instance_id: request.vnf_instance_id.clone(),
        };
        let stored = registration.clone();
        let consumer = consumer.clone();
        self.group
            .write_async(move |tx| {
                for name in &names {
                    let key = name.index_key();
                    if let Some(holder_id) = tx.get(&SUBJECTS, &key)? {
                        // An index entry whose registration is gone manages nothing.
                        if let Some(holder) = tx.get(&REGISTRATIONS, &holder_id)? {
                            return Err(crate::store::StoreError::rejected(conflict(
                                &consumer, name, &holder,
                            )));
                        }
                    }
                    tx.put(&SUBJECTS, &key, &stored.id)?;
                }
                tx.put(&REGISTRATIONS, &stored.id, &stored)?;
                tx.audit(
                    AuditEvent::new(&consumer.id, "cmf.register", &stored.id).with_detail(
                        serde_json::json!({
                            "certType": stored.cert_type,
                            "subjectIds": stored.subject_ids,
                            "caId": stored.ca_id,
                            "trustDomain": stored.trust_domain,
                            "attested": stored.key_attestation.is_some(),
                            "anchored": stored.key_attestation.as_ref().is_some_and(|k| k.anchor.is_some()),
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

    /// Delete the consumer's registration (REST DELETE): its certificates are revoked
    /// (cessationOfOperation) and the registration deleted in one durable transaction
    /// ([`delete_in_tx`]).
    pub async fn delete_registration(&self, consumer: &Consumer, id: &str) -> Result<(), CmfError> {
        let id = id.to_string();
        let consumer = consumer.clone();
        let (_, outcome) = self
            .group
            .write_async(move |tx| delete_in_tx(tx, &id, &consumer.id, Some(&consumer)))
            .await
            .map_err(rejected_or)?;
        self.revoked(&outcome, RevocationReason::CessationOfOperation);
        Ok(())
    }
}

/// Delete registration `id` and revoke its certificates (cessationOfOperation, RFC 5280
/// 5.3.1), in the caller's one write transaction: the consumer's REST DELETE and the
/// operator's `warden cmf registrations delete` both come here. Because it is one
/// transaction, a CSR's issuance commit (which requires the registration to exist,
/// [`super::records::record_issued`]) lands either before it, and its certificate is
/// revoked here, or after it, and is refused: never a live certificate under a deleted
/// registration. With `owner`, only that consumer's registration (403 otherwise, and nothing
/// is revoked) and only the certificates that consumer obtained (those of an earlier manager
/// of a transferred registration stay as they are); without, the operator's: all of them.
pub(crate) fn delete_in_tx(
    tx: &mut WriteTx<'_>,
    id: &str,
    actor: &str,
    owner: Option<&Consumer>,
) -> Result<(Registration, RevokeOutcome), StoreError> {
    let keys = super::records::certificates_of(tx, CertificateOwner::Registration(id))?;
    let of_owner = owner.map(|c| c.id.clone());
    let outcome = revoke_in_tx(
        tx,
        keys,
        &|r: &super::IssuedRecord| {
            r.registration_id == id && of_owner.as_ref().is_none_or(|c| *c == r.consumer)
        },
        RevocationReason::CessationOfOperation,
        actor,
    )?;
    // Refuses (and so drops the revocation above with it) when the registration does not
    // exist or is another consumer's.
    let registration = deregister(tx, id, actor, owner)?;
    Ok((registration, outcome))
}

/// Deleting a registration, the one place for it: the consumer's REST DELETE and the
/// operator's `warden cmf registrations delete` both come here, in the caller's write
/// transaction. With `owner`, only that consumer's registration (403 otherwise); without,
/// the operator's. Removes the subject index entries the registration holds (not those a
/// migration conflict gave to another registration) and the registration, with an audit
/// entry; issued certificates stay recorded.
pub(crate) fn deregister(
    tx: &mut WriteTx<'_>,
    id: &str,
    actor: &str,
    owner: Option<&Consumer>,
) -> Result<Registration, StoreError> {
    let registration = tx.get(&REGISTRATIONS, id)?.ok_or_else(|| {
        StoreError::rejected(CmfError::NotFound(format!(
            "registration {id} does not exist"
        )))
    })?;
    if let Some(consumer) = owner {
        owned_by(&registration, consumer).map_err(StoreError::rejected)?;
    }
    for subject in &registration.subject_ids {
        let key = names::stored_index_key(subject);
        if tx.get(&SUBJECTS, &key)?.as_deref() == Some(id) {
            tx.delete(&SUBJECTS, &key)?;
        }
    }
    tx.delete(&REGISTRATIONS, id)?;
    tx.audit(
        AuditEvent::new(actor, "cmf.deregister", id).with_detail(serde_json::json!({
            "consumer": registration.consumer,
            "trustDomain": registration.trust_domain,
            "certType": registration.cert_type,
            "subjectIds": registration.subject_ids,
            "by": if owner.is_some() { "consumer" } else { "operator" },
        })),
    );
    Ok(registration)
}

/// The operator moves a registration to another consumer (e.g. after a consumer changed
/// trust domain). The names, certType and CA must all be permitted to the new consumer,
/// as at Register: a transfer never carries a name past the trust-domain policy.
pub(crate) fn transfer(
    tx: &mut WriteTx<'_>,
    policies: &names::Policies,
    id: &str,
    to: &Consumer,
    actor: &str,
) -> Result<Registration, StoreError> {
    let refuse = |why: String| StoreError::rejected(CmfError::Unprocessable(why));
    let mut registration = tx.get(&REGISTRATIONS, id)?.ok_or_else(|| {
        StoreError::rejected(CmfError::NotFound(format!(
            "registration {id} does not exist"
        )))
    })?;
    let policy = policies.consumer(&to.id).ok_or_else(|| {
        refuse(format!(
            "'{}' is not a configured consumer ([[cmf.consumer]])",
            to.id
        ))
    })?;
    if !policy.cert_types.contains(&registration.cert_type) {
        return Err(refuse(format!(
            "certType {} is not permitted for '{}' (trust domain '{}')",
            registration.cert_type, to.id, policy.trust_domain
        )));
    }
    if !policy.cas.contains(&registration.ca_id) {
        return Err(refuse(format!(
            "CA '{}' of the registration is not a CA of trust domain '{}' ({:?})",
            registration.ca_id, policy.trust_domain, policy.cas
        )));
    }
    for subject in &registration.subject_ids {
        let name = SubjectName::parse(subject).map_err(|e| {
            refuse(format!(
                "subjectIds: {e}; a name stored before the syntax rules cannot move, delete                  the registration instead"
            ))
        })?;
        policies
            .check(policy, registration.cert_type, &name)
            .map_err(|why| refuse(format!("subjectIds: '{name}' {why} for '{}'", to.id)))?;
    }
    let from = (
        registration.consumer.clone(),
        registration.trust_domain.clone(),
    );
    registration.consumer = to.id.clone();
    registration.trust_domain = to.trust_domain.clone();
    tx.put(&REGISTRATIONS, id, &registration)?;
    tx.audit(
        AuditEvent::new(actor, "cmf.registration.transfer", id).with_detail(serde_json::json!({
            "from": from.0, "fromTrustDomain": from.1,
            "to": to.id, "toTrustDomain": to.trust_domain,
        })),
    );
    Ok(registration)
}

/// 409 for a name another registration holds. It names the holder only to a consumer of
/// the same trust domain; across domains it says no more than that the name is taken.
fn conflict(consumer: &Consumer, name: &SubjectName, holder: &Registration) -> CmfError {
    if holder.consumer == consumer.id && holder.trust_domain == consumer.trust_domain {
        CmfError::Conflict(format!(
            "subjectIds: '{name}' is already registered by you as {} (registration {}); a \
             name has one registration whatever the certType",
            holder.cert_type, holder.id
        ))
    } else if holder.trust_domain == consumer.trust_domain {
        CmfError::Conflict(format!(
            "subjectIds: '{name}' is managed by consumer '{}' of your trust domain; a name \
             has one manager whatever the certType",
            holder.consumer
        ))
    } else {
        CmfError::Conflict(format!(
            "subjectIds: '{name}' is managed by a consumer of another trust domain; a name \
             has one manager whatever the certType"
        ))
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

/// The registered attester from the request's envelopes (PEM or base64 SPKI, format OID,
/// base64 qualifying data, AK certificate chain); public for the `register` fuzz target.
pub fn check_attester(
    cmf: &Cmf,
    request: &KeyAttestationRequest,
) -> Result<RegisteredAttester, CmfError> {
    check_attester_with(&cmf.formats, &cmf.attestation, request)
}

/// [`check_attester`] with the known formats and the attestation roots given.
pub fn check_attester_with(
    formats: &super::attest::Formats,
    attestation: &super::attest::service::AttestationPolicy,
    request: &KeyAttestationRequest,
) -> Result<RegisteredAttester, CmfError> {
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
    let format = request.format_oid.parse::<FormatOid>().map_err(|e| {
        CmfError::BadRequest(format!(
            "keyAttestation.formatOid '{}': {e}",
            request.format_oid
        ))
    })?;
    // Every CSR of a registration in an unknown format would fail: refuse it here.
    if formats.kind(&format).is_none() {
        return Err(CmfError::Unprocessable(format!(
            "keyAttestation.formatOid {format} is not a known attestation format (known: {})",
            formats.known().join(", ")
        )));
    }
    if let Some(q) = &request.expected_qualifying_data {
        b64.decode(q).map_err(|e| {
            CmfError::BadRequest(format!(
                "keyAttestation.expectedQualifyingData: base64: {e}"
            ))
        })?;
    }
    let anchor = if request.ak_certificate_chain.is_empty() {
        None
    } else {
        let certs = super::attest::anchor::certificates_from_text(
            &request.ak_certificate_chain,
            "keyAttestation.akCertificateChain",
        )
        .map_err(CmfError::BadRequest)?;
        Some(
            attestation
                .roots
                .anchor_by_ak_certificate(&certs, &der)
                .map_err(|e| {
                    CmfError::Unprocessable(format!("keyAttestation.akCertificateChain: {e}"))
                })?,
        )
    };
    Ok(RegisteredAttester {
        attester_public_key: b64.encode(&der),
        format_oid: format.to_string(),
        expected_qualifying_data: request.expected_qualifying_data.clone(),
        anchor,
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
