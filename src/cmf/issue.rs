//! Certificate Signing Request (IFA 033 11.2.3): from a verified CSR and the consumer's
//! registration to a certificate signed by the CA key in the HSM/TPM, recorded durably
//! before it is returned.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use der::asn1::Ia5String;
use der::{Decode, Encode};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use spki::{ObjectIdentifier, SubjectPublicKeyInfoOwned};
use x509_cert::ext::pkix::KeyUsages;
use x509_cert::name::Name;
use x509_cert::time::Validity;
use x509_cert::Certificate;

use super::attest::{self, Attester};
use super::csr::{self, VerifiedCsr};
use super::names::SubjectName;
use super::register::{owned_by, rejected_or};
use super::{
    CertType, Cmf, CmfError, Consumer, IssuedRecord, Registration, REGISTRATIONS, SUBJECTS,
};
use crate::ca::{Issuer, LeafProfile, Profile};
use crate::config::{ProfileConfig, UnanchoredPolicy, UnattestedPolicy};
use crate::keys::backends::Backends;
use crate::keys::signer::HardwareKey;
use crate::keys::KeyRef;
use crate::pki;
use crate::store::{AuditEvent, Store, StoreError};

/// TCG key provenance policies (TCG EK Credential Profile / CSR attestation draft):
/// the key was verified resident in a TPM, and fixed to it. Asserted only when the attester
/// is anchored in a TPM PKI ([`attest::anchor`]); an attestation verified with an
/// unanchored attester key earns no policy OID at all: the consumer chose that key, so a
/// relying party could learn nothing from one (README, "Key attestation").
const TCG_VERIFIED_TPM_RESIDENCY: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("2.23.133.11.1.1");
const TCG_VERIFIED_TPM_FIXED: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.23.133.11.1.2");

/// A CA the CMF issues from: its key (in the HSM/TPM), certificate and chain.
#[derive(Clone, Debug)]
pub struct IssuingCa {
    pub id: String,
    pub issuer: Issuer,
    pub cert_types: Vec<CertType>,
    /// PEM certificates from this CA up to the root (11.2.3.3 certificateChain).
    pub chain_pem: Vec<String>,
    /// The same, DER (EST cacerts).
    pub chain_der: Vec<Vec<u8>>,
}

impl IssuingCa {
    pub fn load(
        id: &str,
        key: &KeyRef,
        certificate: &Path,
        chain: Option<&Path>,
        cert_types: Vec<CertType>,
        backends: &Backends,
    ) -> Result<IssuingCa, String> {
        let store = backends
            .for_key(key)
            .map_err(|e| format!("CA '{id}': {e}"))?;
        let hardware = HardwareKey::new(store, key.clone())
            .map_err(|e| format!("CA '{id}' key {key}: {e}"))?;
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|e| format!("CA '{id}': {}: {e}", path.display()))
        };
        let mut certs = pki::certificates_from_pem(&read(certificate)?)
            .map_err(|e| format!("CA '{id}': {}: {e}", certificate.display()))?;
        let ca_cert = certs.remove(0);
        let mut chain_certs = vec![ca_cert.clone()];
        if let Some(path) = chain {
            chain_certs.extend(
                pki::certificates_from_pem(&read(path)?)
                    .map_err(|e| format!("CA '{id}': {}: {e}", path.display()))?,
            );
        }
        crate::ca::check_chain(&hardware, &chain_certs).map_err(|e| format!("CA '{id}': {e}"))?;
        let issuer = Issuer::new(hardware, ca_cert).map_err(|e| format!("CA '{id}': {e}"))?;
        let chain_pem = chain_certs
            .iter()
            .map(pki::certificate_pem)
            .collect::<Result<Vec<_>, _>>()?;
        let chain_der = chain_certs
            .iter()
            .map(|c| c.to_der().map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(IssuingCa {
            id: id.to_string(),
            issuer,
            cert_types,
            chain_pem,
            chain_der,
        })
    }
}

/// `POST /certmgmt/v1/certificate_signing_requests` body (11.2.3.2).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CsrRequest {
    #[serde(default)]
    pub vnfc_id: Option<String>,
    pub cert_type: String,
    pub cert_chain_request: bool,
    pub csr: String,
}

/// 11.2.3.3 output, plus what a VNFM needs to track the certificate.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CsrResponse {
    pub certificate: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate_chain: Option<Vec<String>>,
    pub serial_number: String,
    pub registration_id: String,
    pub attestation: String,
}

/// Check a configured profile once, at start.
pub fn check_profile(profile: &ProfileConfig) -> Result<(), String> {
    key_usages(&profile.key_usage)?;
    extended_key_usages(&profile.extended_key_usage)?;
    if profile.validity_days == 0 || profile.validity_days > 3650 {
        return Err("validity_days: 1 to 3650".into());
    }
    for key_type in &profile.key_types {
        if !["ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096"].contains(&key_type.as_str())
        {
            return Err(format!("key_types: unknown '{key_type}'"));
        }
    }
    if let Some(uri) = &profile.crl_distribution_point {
        Ia5String::new(uri).map_err(|_| "crl_distribution_point: not an IA5 URI".to_string())?;
    }
    Ok(())
}

fn key_usages(names: &[String]) -> Result<der::flagset::FlagSet<KeyUsages>, String> {
    let mut set = der::flagset::FlagSet::<KeyUsages>::default();
    for name in names {
        set |= match name.as_str() {
            "digitalSignature" => KeyUsages::DigitalSignature,
            "nonRepudiation" | "contentCommitment" => KeyUsages::NonRepudiation,
            "keyEncipherment" => KeyUsages::KeyEncipherment,
            "dataEncipherment" => KeyUsages::DataEncipherment,
            "keyAgreement" => KeyUsages::KeyAgreement,
            other => return Err(format!("key_usage: unknown '{other}'")),
        };
    }
    Ok(set)
}

fn extended_key_usages(names: &[String]) -> Result<Vec<ObjectIdentifier>, String> {
    names
        .iter()
        .map(|name| match name.as_str() {
            "serverAuth" => Ok(const_oid::db::rfc5280::ID_KP_SERVER_AUTH),
            "clientAuth" => Ok(const_oid::db::rfc5280::ID_KP_CLIENT_AUTH),
            "codeSigning" => Ok(const_oid::db::rfc5280::ID_KP_CODE_SIGNING),
            "emailProtection" => Ok(const_oid::db::rfc5280::ID_KP_EMAIL_PROTECTION),
            other => ObjectIdentifier::new(other)
                .map_err(|_| format!("extended_key_usage: unknown '{other}'")),
        })
        .collect()
}

impl Cmf {
    /// The whole CSR operation for `consumer` (11.2.3), from the JSON request.
    pub async fn sign_csr(
        &self,
        consumer: &Consumer,
        request: CsrRequest,
    ) -> Result<CsrResponse, CmfError> {
        let cert_type = CertType::parse(&request.cert_type)
            .ok_or_else(|| {
                CmfError::BadRequest(format!(
                    "certType '{}': expected VNFCI_CERT, VNF_OAM_CERT or MANO_CERT",
                    request.cert_type
                ))
            })
            .map_err(refused_early)?;
        let der = csr::csr_der_from_text(&request.csr).map_err(refused_early)?;
        self.enroll(
            consumer,
            cert_type,
            request.vnfc_id,
            der,
            request.cert_chain_request,
        )
        .await
    }

    /// The CSR pipeline on a DER PKCS#10 request; shared by the REST resource and EST.
    pub async fn enroll(
        &self,
        consumer: &Consumer,
        cert_type: CertType,
        vnfc_id: Option<String>,
        der: Vec<u8>,
        cert_chain_request: bool,
    ) -> Result<CsrResponse, CmfError> {
        check_operation(cert_type, vnfc_id.as_deref()).map_err(refused_early)?;
        self.enroll_input(
            consumer,
            cert_type,
            vnfc_id,
            CsrInput::Der(der),
            cert_chain_request,
        )
        .await
    }

    /// The pipeline from step 2 on, for a front (EST) that needed the decoded CSR first.
    pub async fn enroll_verified(
        &self,
        consumer: &Consumer,
        cert_type: CertType,
        vnfc_id: Option<String>,
        verified: VerifiedCsr,
        cert_chain_request: bool,
    ) -> Result<CsrResponse, CmfError> {
        check_operation(cert_type, vnfc_id.as_deref()).map_err(refused_early)?;
        self.enroll_input(
            consumer,
            cert_type,
            vnfc_id,
            CsrInput::Verified(Box::new(verified)),
            cert_chain_request,
        )
        .await
    }

    /// [`Self::enroll_pipeline`], counted and timed per CA and outcome (metrics).
    async fn enroll_input(
        &self,
        consumer: &Consumer,
        cert_type: CertType,
        vnfc_id: Option<String>,
        input: CsrInput,
        cert_chain_request: bool,
    ) -> Result<CsrResponse, CmfError> {
        let started = std::time::Instant::now();
        let mut ca_id = None;
        let result = self
            .enroll_pipeline(
                consumer,
                cert_type,
                vnfc_id,
                input,
                cert_chain_request,
                &mut ca_id,
            )
            .await;
        let status = result.as_ref().map_or_else(CmfError::status, |_| 201);
        crate::metrics::global().issuance_answered(
            ca_id.unwrap_or("none"),
            status,
            Some(started.elapsed()),
        );
        result
    }

    async fn enroll_pipeline<'a>(
        &'a self,
        consumer: &Consumer,
        cert_type: CertType,
        vnfc_id: Option<String>,
        input: CsrInput,
        cert_chain_request: bool,
        ca_id: &mut Option<&'a str>,
    ) -> Result<CsrResponse, CmfError> {
        // 1-5 in one hop off the async threads: decoding and proof of possession, the
        // registration, key policy, attestation and the CA signature are CPU and device work,
        // and every extra hand-off between threads costs a wake-up on a busy machine.
        let chosen_ca = Arc::new(std::sync::OnceLock::new());
        let work = Prepare {
            chosen_ca: chosen_ca.clone(),
            store: self.store.clone(),
            cas: self.cas.clone(),
            formats: self.formats.clone(),
            attestation: self.attestation.clone(),
            unattested: self.unattested,
            profile: self.profile(cert_type),
            vnfc_id_uri: self.vnfc_id_uri,
            consumer: consumer.clone(),
            cert_type,
            vnfc_id,
            revocation_base: self.crls.base_url().map(String::from),
        };
        let Prepared {
            registration,
            ca_index,
            names,
            attestation,
            attestation_format,
            nonce_key,
            leaf,
            subject,
            spki,
            spki_sha256,
            days,
            first,
        } = {
            let prepared = tokio::task::spawn_blocking(move || work.run(input)).await;
            *ca_id = chosen_ca.get().map(|&i: &usize| self.cas[i].id.as_str());
            prepared.map_err(|e| CmfError::Internal(format!("CSR pipeline: {e}")))??
        };
        let ca = &self.cas[ca_index];
        *ca_id = Some(&ca.id);
        let mut first = Some(first);
        // Serial collisions at 128 random bits are practically impossible; the store still
        // enforces uniqueness per issuer and a collision is retried with a new serial.
        for _attempt in 0..3 {
            let (serial_hex, certificate) = match first.take() {
                Some(issued) => issued,
                None => {
                    // Only on a serial collision: the CA certificate is cloned for the worker.
                    let (issuer, subject, spki, leaf) = (
                        ca.issuer.clone(),
                        subject.clone(),
                        spki.clone(),
                        leaf.clone(),
                    );
                    tokio::task::spawn_blocking(move || {
                        issue_leaf(&issuer, subject, spki, leaf, days)
                    })
                    .await
                    .map_err(|e| CmfError::Internal(format!("issuing: {e}")))??
                }
            };
            let validity = certificate.tbs_certificate().validity();
            let record = IssuedRecord {
                serial_number: serial_hex.clone(),
                ca_id: ca.id.clone(),
                consumer: consumer.id.clone(),
                registration_id: registration.id.clone(),
                cert_type,
                subjects: names.clone(),
                spki_sha256: spki_sha256.clone(),
                attestation: attestation.clone(),
                attestation_format: attestation_format.clone(),
                not_before: validity.not_before.to_string(),
                not_after: validity.not_after.to_string(),
                issued_at: crate::keys::rfc3339_now(),
                certificate: None,
                revocation: None,
                vnf_instance_id: registration.vnf_instance_id.clone(),
            };
            // The audit entry records the issuance without the certificate bytes (the
            // record holds them).
            let detail = serde_json::to_value(&record).unwrap_or_default();
            let record = IssuedRecord {
                certificate: Some(
                    base64::engine::general_purpose::STANDARD.encode(
                        certificate
                            .to_der()
                            .map_err(|e| CmfError::Internal(format!("certificate DER: {e}")))?,
                    ),
                ),
                ..record
            };
            let key = format!("{}/{}", ca.id, serial_hex);
            let consumer_id = consumer.id.clone();
            let committing = std::time::Instant::now();
            let nonce_key = nonce_key.clone();
            let outcome = self
                .group
                .write_async(move |tx| {
                    // The nonce is spent in the same commit as the record: of two CSRs
                    // carrying it, exactly one is issued.
                    if let Some(nonce) = &nonce_key {
                        attest::service::consume_nonce(tx, nonce)?;
                    }
                    // Refused when the registration was deleted while this CSR was in
                    // flight (its certificates were revoked in the deletion's transaction).
                    super::records::record_issued(tx, &key, &record)?;
                    tx.audit(AuditEvent::new(&consumer_id, "cmf.issue", &key).with_detail(detail));
                    Ok(())
                })
                .await;
            crate::metrics::global().store_commit("issuance", committing.elapsed());
            match outcome {
                Ok(()) => {
                    let pem = pki::certificate_pem(&certificate).map_err(CmfError::Internal)?;
                    return Ok(CsrResponse {
                        certificate: pem,
                        certificate_chain: cert_chain_request.then(|| ca.chain_pem.clone()),
                        serial_number: serial_hex,
                        registration_id: registration.id.clone(),
                        attestation,
                    });
                }
                Err(StoreError::Conflict { .. }) => {
                    tracing::warn!(serial = %serial_hex, "serial collision; issuing again");
                    continue;
                }
                Err(e) => return Err(rejected_or(e)),
            }
        }
        Err(CmfError::Internal(
            "could not find a unique serial number".into(),
        ))
    }
}

/// A CSR refused before the pipeline chose a CA, counted as such (metrics).
fn refused_early(error: CmfError) -> CmfError {
    crate::metrics::global().issuance_answered("none", error.status(), None);
    error
}

/// A CSR as it enters the pipeline.
enum CsrInput {
    Der(Vec<u8>),
    /// Decoded and proof of possession checked already.
    Verified(Box<VerifiedCsr>),
}

/// Everything of the CSR pipeline before the durable record, run on one blocking thread.
struct Prepare {
    /// The index of the CA, once chosen (the metrics label a failed issuance with it).
    chosen_ca: Arc<std::sync::OnceLock<usize>>,
    store: Arc<Store>,
    cas: Arc<[IssuingCa]>,
    formats: Arc<attest::Formats>,
    attestation: Arc<attest::service::AttestationPolicy>,
    unattested: UnattestedPolicy,
    profile: ProfileConfig,
    vnfc_id_uri: bool,
    consumer: Consumer,
    cert_type: CertType,
    vnfc_id: Option<String>,
    /// Where revocation is published (`[cmf.revocation]`): issued certificates carry the
    /// CA's CRL distribution point (unless the profile names its own) and the OCSP URL.
    revocation_base: Option<String>,
}

/// What [`Prepare::run`] hands back: the first certificate, and what a re-issue would need.
struct Prepared {
    registration: Registration,
    ca_index: usize,
    names: Vec<String>,
    attestation: String,
    attestation_format: Option<String>,
    /// The nonce the issuance commit consumes (store key).
    nonce_key: Option<String>,
    leaf: LeafProfile,
    subject: Name,
    spki: SubjectPublicKeyInfoOwned,
    spki_sha256: String,
    days: u32,
    /// Serial (hex) and certificate.
    first: (String, Certificate),
}

impl Prepare {
    fn run(self, input: CsrInput) -> Result<Prepared, CmfError> {
        let cert_type = self.cert_type;
        // 1. Decode and proof of possession (unless a front did it already).
        let verified = match input {
            CsrInput::Der(der) => csr::verify(&der)?,
            CsrInput::Verified(verified) => *verified,
        };
        // 2. The caller's registration, holding every requested name.
        let (registration, subject_names) = self.registration_for(&verified)?;
        let names: Vec<String> = subject_names.iter().map(SubjectName::canonical).collect();
        // 3. Key policy of the profile.
        let profile = &self.profile;
        let key_type = verified.key_type.name();
        if !profile.key_types.contains(&key_type) {
            return Err(CmfError::Unprocessable(format!(
                "csr: key type {key_type} is not allowed for {cert_type} (allowed: {})",
                profile.key_types.join(", ")
            )));
        }
        // 4. Key attestation against the registered attester.
        let AttestationVerdict {
            attestation,
            format: attestation_format,
            policies,
            nonce_key,
        } = self.check_attestation(&registration, &verified)?;
        // 5. Issue.
        let ca_index = self
            .cas
            .iter()
            .position(|ca| ca.id == registration.ca_id)
            .ok_or_else(|| {
                CmfError::Internal(format!(
                    "CA '{}' of the registration is no longer configured",
                    registration.ca_id
                ))
            })?;
        let _ = self.chosen_ca.set(ca_index);
        let mut leaf = leaf_profile(
            profile,
            verified.key_type.is_rsa(),
            &subject_names,
            self.vnfc_id_uri,
            policies,
        )
        .map_err(CmfError::Internal)?;
        for uri in &verified.lifecycle_uris {
            let uri = der::asn1::Ia5String::new(uri)
                .map_err(|e| CmfError::Internal(format!("lifecycle URI {uri}: {e}")))?;
            leaf.subject_alt_names
                .push(x509_cert::ext::pkix::name::GeneralName::UniformResourceIdentifier(uri));
        }
        if let Some(base) = &self.revocation_base {
            let ca_id = &self.cas[ca_index].id;
            leaf.crl_distribution_point
                .get_or_insert_with(|| super::crl::crl_url(base, ca_id));
            leaf.ocsp_url = Some(super::crl::ocsp_url(base));
        }
        let subject = subject_name(&verified, &subject_names)?;
        let spki = SubjectPublicKeyInfoOwned::from_der(&verified.spki_der)
            .map_err(|e| CmfError::BadRequest(format!("csr: public key: {e}")))?;
        let spki_sha256 = hex::encode(sha2::Sha256::digest(&verified.spki_der));
        let days = profile.validity_days;
        let first = issue_leaf(
            &self.cas[ca_index].issuer,
            subject.clone(),
            spki.clone(),
            leaf.clone(),
            days,
        )?;
        Ok(Prepared {
            registration,
            ca_index,
            names,
            attestation,
            attestation_format,
            nonce_key,
            leaf,
            subject,
            spki,
            spki_sha256,
            days,
            first,
        })
    }

    /// The registration that covers this request: by vnfcId, else (VNF OAM, MANO) the one
    /// holding the CSR's first name; every requested name must be held by it in the one
    /// namespace of names. The names come back parsed, in the CSR's order.
    fn registration_for(
        &self,
        verified: &VerifiedCsr,
    ) -> Result<(Registration, Vec<SubjectName>), CmfError> {
        let (consumer, cert_type, vnfc_id) =
            (&self.consumer, self.cert_type, self.vnfc_id.as_deref());
        let names = verified
            .requested_names()
            .iter()
            .map(|name| {
                SubjectName::parse(name).map_err(|e| CmfError::Unprocessable(format!("csr: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let lookup = match vnfc_id {
            Some(id) => SubjectName::parse(id)
                .map_err(|e| CmfError::Unprocessable(format!("vnfcId: {e}")))?
                .index_key(),
            // csr::verify refuses a CSR without any name.
            None => names
                .first()
                .map(SubjectName::index_key)
                .unwrap_or_default(),
        };
        let what = vnfc_id.map_or_else(
            || "the CSR's subject".to_string(),
            |id| format!("vnfcId '{id}'"),
        );
        let (registration, holders) = self.store.read(|tx| {
            let Some(id) = tx.get(&SUBJECTS, &lookup)? else {
                return Ok((None, Vec::new()));
            };
            let registration = tx.get(&REGISTRATIONS, &id)?;
            let holders = names
                .iter()
                .map(|name| tx.get(&SUBJECTS, &name.index_key()))
                .collect::<Result<Vec<_>, _>>()?;
            Ok((registration, holders))
        })?;
        let registration = registration.ok_or_else(|| {
            CmfError::Unprocessable(format!("{what} is not registered for {cert_type}"))
        })?;
        owned_by(&registration, consumer)
            .map_err(|_| CmfError::Forbidden(format!("{what} is managed by another consumer")))?;
        if registration.cert_type != cert_type {
            return Err(CmfError::Unprocessable(format!(
                "{what} is registered for {} (registration {}), not {cert_type}: a name has \
                 one registration whatever the certType",
                registration.cert_type, registration.id
            )));
        }
        for (name, holder) in names.iter().zip(holders) {
            if holder.as_deref() != Some(registration.id.as_str()) {
                return Err(CmfError::Unprocessable(format!(
                    "csr: '{name}' is not among the subjects registered in registration {}",
                    registration.id
                )));
            }
        }
        Ok((registration, names))
    }

    /// The attestation verdict (IFA 033 11.2.1 and issue 10 §2): the signature, Name, key
    /// and attributes of the statement; then freshness (a CMF nonce in the qualifying
    /// data); then whether the attester is anchored in a TPM PKI, which alone earns the
    /// TCG policies.
    fn check_attestation(
        &self,
        registration: &Registration,
        verified: &VerifiedCsr,
    ) -> Result<AttestationVerdict, CmfError> {
        let Some(registered) = &registration.key_attestation else {
            return Ok(AttestationVerdict {
                attestation: "not-requested".into(),
                format: None,
                policies: Vec::new(),
                nonce_key: None,
            });
        };
        let b64 = base64::engine::general_purpose::STANDARD;
        let attester = Attester {
            public_key_spki_der: b64
                .decode(&registered.attester_public_key)
                .map_err(|e| CmfError::Internal(format!("stored attester key: {e}")))?,
            format: registered
                .format_oid
                .parse()
                .map_err(|e| CmfError::Internal(format!("stored format OID: {e}")))?,
            expected_qualifying_data: registered
                .expected_qualifying_data
                .as_ref()
                .map(|q| b64.decode(q))
                .transpose()
                .map_err(|e| CmfError::Internal(format!("stored qualifying data: {e}")))?,
        };
        let outcome = attest::verify_csr_attestation_evidence(
            &self.formats,
            &verified.request.info.attributes,
            &verified.spki_der,
            &attester,
        )
        .and_then(|evidence| {
            let freshness = attest::service::check_freshness(
                &self.attestation,
                &self.store,
                registration,
                attester.expected_qualifying_data.is_some(),
                evidence.qualifying_data.as_deref(),
            )?;
            Ok((evidence, freshness))
        });
        let (evidence, freshness) = match outcome {
            Ok(found) => found,
            Err(e) if self.unattested == UnattestedPolicy::Issue => {
                tracing::warn!(registration = %registration.id, reason = %e, "issuing un-attested by local policy");
                return Ok(AttestationVerdict {
                    attestation: format!("unattested: {e}"),
                    format: Some(registered.format_oid.clone()),
                    policies: Vec::new(),
                    nonce_key: None,
                });
            }
            Err(e) => return Err(CmfError::Unprocessable(format!("key attestation: {e}"))),
        };
        let nonce_key = match freshness {
            attest::service::Freshness::Nonce(key) => Some(key),
            _ => None,
        };
        // Anchored at Register or by challenge, else by an AK certificate in the bundle.
        let anchored = registered.anchor.is_some()
            || (!evidence.certs.is_empty()
                && self
                    .attestation
                    .roots
                    .anchor_by_ak_certificate(&evidence.certs, &attester.public_key_spki_der)
                    .is_ok());
        let mut policies = Vec::new();
        let attestation = if anchored {
            if evidence.verified.tpm_residency {
                policies.push(TCG_VERIFIED_TPM_RESIDENCY);
            }
            if evidence.verified.tpm_fixed {
                policies.push(TCG_VERIFIED_TPM_FIXED);
            }
            "verified-anchored"
        } else if self.attestation.unanchored == UnanchoredPolicy::Refuse {
            return Err(CmfError::Unprocessable(format!(
                "key attestation: the attestation verifies, but the attester key of \
                 registration {} is not anchored in a TPM PKI, and this CMF refuses \
                 unanchored attesters: give an AK certificate chain at Register or in the \
                 bundle's certs, or answer an AK challenge (.../ak_challenges)",
                registration.id
            )));
        } else {
            "verified-unanchored"
        };
        Ok(AttestationVerdict {
            attestation: attestation.into(),
            format: Some(registered.format_oid.clone()),
            policies,
            nonce_key,
        })
    }
}

/// What [`Prepare::check_attestation`] decided.
struct AttestationVerdict {
    /// The record's and response's `attestation`.
    attestation: String,
    format: Option<String>,
    /// Certificate policies to add.
    policies: Vec<ObjectIdentifier>,
    /// The nonce the issuance commit consumes.
    nonce_key: Option<String>,
}

/// Sign a leaf certificate with a fresh serial: (serial hex, certificate).
fn issue_leaf(
    issuer: &Issuer,
    subject: Name,
    spki: SubjectPublicKeyInfoOwned,
    leaf: LeafProfile,
    days: u32,
) -> Result<(String, Certificate), CmfError> {
    let serial = pki::random_serial().map_err(CmfError::Internal)?;
    let serial_hex = hex::encode(serial.as_bytes());
    let validity = Validity::from_now(Duration::from_secs(u64::from(days) * 86_400))
        .map_err(|e| CmfError::Internal(e.to_string()))?;
    let certificate = issuer
        .issue(subject, spki, Profile::Leaf(leaf), serial, validity)
        .map_err(|e| match e {
            crate::ca::CaError::Signing {
                transient: true,
                reason,
            } => CmfError::Unavailable(format!("the CA key is unavailable: {reason}")),
            other => CmfError::Internal(format!("issuing: {other}")),
        })?;
    Ok((serial_hex, certificate))
}

/// What the CSR operation applies to (IFA 033 11.2.3.1, 11.2.3.2).
fn check_operation(cert_type: CertType, vnfc_id: Option<&str>) -> Result<(), CmfError> {
    // IFA 033 11.2.3.1 defines the CSR operation for VNFCI and VNF OAM certificates and
    // leaves NFV-MANO credentials for further study (11.2.2.3 NOTE); Register accepts
    // MANO_CERT, so a consumer whose trust domain permits MANO_CERT (cert_types) gets the
    // MANO profile for the FQDNs it registered, looked up by the CSR's names like VNF OAM.
    if cert_type == CertType::VnfciCert && vnfc_id.is_none() {
        return Err(CmfError::BadRequest(
            "vnfcId is required for VNFCI_CERT (IFA 033 11.2.3.2)".into(),
        ));
    }
    Ok(())
}

/// [`csr::verify`] off the async threads (signature verification is CPU work).
pub async fn verify_blocking(der: Vec<u8>) -> Result<VerifiedCsr, CmfError> {
    tokio::task::spawn_blocking(move || csr::verify(&der))
        .await
        .map_err(|e| CmfError::Internal(format!("CSR check: {e}")))?
}

fn leaf_profile(
    profile: &ProfileConfig,
    rsa: bool,
    names: &[SubjectName],
    vnfc_id_uri: bool,
    policies: Vec<ObjectIdentifier>,
) -> Result<LeafProfile, String> {
    let mut key_usage = key_usages(&profile.key_usage)?;
    if !rsa {
        // keyEncipherment is meaningless for EC keys (RFC 5480 3).
        key_usage -= KeyUsages::KeyEncipherment;
    }
    // Each name in the form valid for its kind (names.rs): host names as dNSName, addresses
    // as iPAddress; never a single label as a dNSName. A VNFC identifier is the subject's
    // commonName ([`subject_name`]) and, where configured, a URI.
    let subject_alt_names = names
        .iter()
        .filter(|name| vnfc_id_uri || !matches!(name, SubjectName::Vnfc(_)))
        .map(SubjectName::general_name)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(LeafProfile {
        key_usage,
        extended_key_usage: extended_key_usages(&profile.extended_key_usage)?,
        subject_alt_names,
        crl_distribution_point: profile.crl_distribution_point.clone(),
        ocsp_url: None,
        policies,
    })
}

/// The issued subject: `CN=<VNFC identifier>` when the certificate is for a VNFC instance
/// (its identifier is certified there, names.rs), else the CSR's commonName if it has one,
/// else the first requested name. Only validated names go into the certificate; other
/// subject attributes are not vouched for and are dropped. One certificate is for one VNFC
/// instance: two VNFC identifiers in one CSR are refused.
fn subject_name(verified: &VerifiedCsr, names: &[SubjectName]) -> Result<Name, CmfError> {
    let mut vnfc_ids = names.iter().filter(|n| matches!(n, SubjectName::Vnfc(_)));
    let vnfc = vnfc_ids.next();
    if let Some(second) = vnfc_ids.next() {
        return Err(CmfError::Unprocessable(format!(
            "csr: '{}' and '{second}' are both VNFC identifiers: a certificate is for one VNFC \
             instance",
            vnfc.map(SubjectName::canonical).unwrap_or_default()
        )));
    }
    let cn = match vnfc {
        Some(id) => id.canonical(),
        None => verified
            .common_names
            .first()
            .cloned()
            .or_else(|| names.first().map(SubjectName::canonical))
            .unwrap_or_default(),
    };
    let escaped: String = cn
        .chars()
        .flat_map(|c| {
            let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=');
            special
                .then_some('\\')
                .into_iter()
                .chain(std::iter::once(c))
        })
        .collect();
    crate::ca::parse_name(&format!("CN={escaped}"))
        .map_err(|e| CmfError::Unprocessable(format!("csr: subject: {e}")))
}

/// The issued certificate's DER and PEM are also served for `cacerts`; this helper gives the
/// chain of the CA that issues `cert_type` first.
pub fn chain_for(cmf: &Cmf, cert_type: CertType) -> Option<&IssuingCa> {
    cmf.cas.iter().find(|ca| ca.cert_types.contains(&cert_type))
}
