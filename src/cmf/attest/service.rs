//! The CMF's attestation resources beside Register (an extension of IFA 033 11.2, which
//! leaves both the anchoring of the attester and freshness to local policy):
//!
//! ```text
//! POST /certmgmt/v1/registrations/{registrationId}/attestation_nonces          -> 201
//!      a single-use nonce for TPMS_ATTEST.extraData of one CSR, expiring, durable
//! POST /certmgmt/v1/registrations/{registrationId}/ak_challenges               -> 201
//!      { ekCertificate, ekCertificateChain?, ekPublic?, akPublic }
//!      -> { challengeId, credentialBlob, encryptedSecret, expiresAt }   (TPM2_MakeCredential)
//! POST /certmgmt/v1/registrations/{registrationId}/ak_challenges/{challengeId}/answer -> 200
//!      { secret }   (TPM2_ActivateCredential's output) -> the registration, anchored
//! ```
//!
//! Both records live in the store, so a restart loses no nonce or challenge; each is
//! consumed by the first use (right or wrong) and refused after it expires.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::Digest;

use super::anchor::{certificates_from_text, AnchorMethod, AttesterAnchor, Purpose, TrustRoots};
use super::credential::{self, EndorsementKey};
use super::{constant_time_eq, tpm};
use crate::cmf::register::{owned_by, rejected_or};
use crate::cmf::{Cmf, CmfError, Consumer, Registration, REGISTRATIONS};
use crate::config::{AttestationConfig, UnanchoredPolicy};
use crate::store::{AuditEvent, StoreError, Table};

/// Outstanding nonces: `{registrationId}/{nonce hex}`.
pub const ATTESTATION_NONCES: Table<NonceRecord> = Table::new("cmf_attestation_nonces");
/// Outstanding AK challenges: `{registrationId}/{challengeId}`.
pub const AK_CHALLENGES: Table<AkChallenge> = Table::new("cmf_ak_challenges");

/// Octets of a nonce: 256 bits, within TPM2B_DATA of a SHA-256 TPM (at most 64 octets for
/// a TPM with SHA-512; 32 fit every TPM).
pub const NONCE_OCTETS: usize = 32;
/// Octets of a credential: at most the EK nameAlg's digest size (Part 3 12.6).
const CREDENTIAL_OCTETS: usize = 32;

/// The attestation policy, resolved from `[cmf.attestation]`.
#[derive(Clone, Debug)]
pub struct AttestationPolicy {
    pub roots: TrustRoots,
    pub unanchored: UnanchoredPolicy,
    pub nonce_ttl: Duration,
    pub challenge_ttl: Duration,
    pub require_nonce: bool,
    pub max_outstanding: usize,
}

impl AttestationPolicy {
    pub fn from_config(config: &AttestationConfig) -> Result<AttestationPolicy, String> {
        if config.nonce_ttl_seconds == 0 || config.challenge_ttl_seconds == 0 {
            return Err(
                "cmf.attestation: nonce_ttl_seconds and challenge_ttl_seconds must be \
                        at least 1"
                    .into(),
            );
        }
        if config.max_outstanding == 0 {
            return Err("cmf.attestation.max_outstanding must be at least 1".into());
        }
        Ok(AttestationPolicy {
            roots: TrustRoots::load(&config.roots)?,
            unanchored: config.unanchored,
            nonce_ttl: Duration::from_secs(config.nonce_ttl_seconds),
            challenge_ttl: Duration::from_secs(config.challenge_ttl_seconds),
            require_nonce: config.require_nonce,
            max_outstanding: config.max_outstanding,
        })
    }
}

impl Default for AttestationPolicy {
    fn default() -> Self {
        AttestationPolicy {
            roots: TrustRoots::default(),
            unanchored: UnanchoredPolicy::default(),
            nonce_ttl: Duration::from_secs(300),
            challenge_ttl: Duration::from_secs(300),
            require_nonce: false,
            max_outstanding: 32,
        }
    }
}

/// A stored nonce.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NonceRecord {
    pub consumer: String,
    /// Unix seconds.
    pub expires: u64,
}

/// A stored AK challenge. The secret is kept as its SHA-256 only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AkChallenge {
    pub consumer: String,
    /// Unix seconds.
    pub expires: u64,
    pub secret_sha256: String,
    /// The AK's Name, hex.
    pub ak_name: String,
    /// SHA-256 of the AK's SubjectPublicKeyInfo (the registered attester key), hex.
    pub ak_spki_sha256: String,
    pub ek_certificate_sha256: String,
    pub root: String,
}

/// `POST .../attestation_nonces` response.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NonceResponse {
    /// Base64: put these octets in TPM2_Certify's qualifyingData.
    pub nonce: String,
    pub expires_at: String,
}

/// `POST .../ak_challenges` body.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AkChallengeRequest {
    /// The EK certificate: PEM or base64 DER (e.g. read from NV index 0x01c00002).
    pub ek_certificate: String,
    /// Intermediate certificates up to a configured root, PEM or base64 DER.
    #[serde(default)]
    pub ek_certificate_chain: Vec<String>,
    /// The EK's TPM2B_PUBLIC, base64, when its template is not the default one.
    #[serde(default)]
    pub ek_public: Option<String>,
    /// The AK's TPM2B_PUBLIC, base64.
    pub ak_public: String,
}

/// `POST .../ak_challenges` response.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AkChallengeResponse {
    pub challenge_id: String,
    /// TPM2B_ID_OBJECT, base64: TPM2_ActivateCredential's credentialBlob.
    pub credential_blob: String,
    /// TPM2B_ENCRYPTED_SECRET, base64: TPM2_ActivateCredential's secret.
    pub encrypted_secret: String,
    pub expires_at: String,
}

/// `POST .../ak_challenges/{id}/answer` body.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AkChallengeAnswer {
    /// TPM2_ActivateCredential's certInfo, base64.
    pub secret: String,
}

impl Cmf {
    /// A fresh nonce for one CSR of this registration (which must have an attester).
    pub async fn attestation_nonce(
        &self,
        consumer: &Consumer,
        registration_id: &str,
    ) -> Result<NonceResponse, CmfError> {
        let registration = self.registration(consumer, registration_id)?;
        if registration.key_attestation.is_none() {
            return Err(CmfError::Unprocessable(format!(
                "registration {registration_id} has no keyAttestation: a nonce would not be \
                 checked"
            )));
        }
        let mut nonce = [0u8; NONCE_OCTETS];
        getrandom::fill(&mut nonce).map_err(|e| CmfError::Internal(format!("nonce: {e}")))?;
        let expires = now_seconds() + self.attestation.nonce_ttl.as_secs();
        let record = NonceRecord {
            consumer: consumer.id.clone(),
            expires,
        };
        let key = format!("{registration_id}/{}", hex::encode(nonce));
        let prefix = format!("{registration_id}/");
        let max = self.attestation.max_outstanding;
        let consumer_id = consumer.id.clone();
        let registration_id = registration_id.to_string();
        let expired = expired_keys(
            &self.store,
            &ATTESTATION_NONCES,
            &prefix,
            |r| r.expires,
            max,
        )?;
        self.group
            .write_async(move |tx| {
                for key in &expired {
                    tx.delete(&ATTESTATION_NONCES, key)?;
                }
                tx.put(&ATTESTATION_NONCES, &key, &record)?;
                tx.audit(AuditEvent::new(
                    &consumer_id,
                    "cmf.attestation_nonce",
                    &registration_id,
                ));
                Ok(())
            })
            .await
            .map_err(rejected_or)?;
        Ok(NonceResponse {
            nonce: base64::engine::general_purpose::STANDARD.encode(nonce),
            expires_at: rfc3339(expires),
        })
    }

    /// Check the EK certificate and the AK, and make a credential for the AK to the EK.
    pub async fn ak_challenge(
        &self,
        consumer: &Consumer,
        registration_id: &str,
        request: AkChallengeRequest,
    ) -> Result<(String, AkChallengeResponse), CmfError> {
        let registration = self.registration(consumer, registration_id)?;
        let attester_spki = registered_attester_spki(&registration)?;
        let b64 = base64::engine::general_purpose::STANDARD;
        let refused = |e: super::AttestationError| CmfError::Unprocessable(e.to_string());
        let ek_certificate = certificates_from_text(
            std::slice::from_ref(&request.ek_certificate),
            "ekCertificate",
        )
        .map_err(CmfError::BadRequest)?;
        let chain = certificates_from_text(&request.ek_certificate_chain, "ekCertificateChain")
            .map_err(CmfError::BadRequest)?;
        let [ek_certificate] = ek_certificate.as_slice() else {
            return Err(CmfError::BadRequest(
                "ekCertificate: exactly one certificate (put intermediates in \
                 ekCertificateChain)"
                    .into(),
            ));
        };
        let ak_public = b64
            .decode(request.ak_public.trim())
            .map_err(|e| CmfError::BadRequest(format!("akPublic: base64: {e}")))?;
        let ek_public = request
            .ek_public
            .as_deref()
            .map(|t| b64.decode(t.trim()))
            .transpose()
            .map_err(|e| CmfError::BadRequest(format!("ekPublic: base64: {e}")))?;
        let ak = credential::parse_attestation_key(&ak_public)
            .map_err(|e| CmfError::Unprocessable(format!("akPublic: {e}")))?;
        if ak.spki_der != tpm::canonical_spki(&attester_spki).map_err(refused)? {
            return Err(CmfError::Unprocessable(format!(
                "akPublic is not the attester key registered in registration {registration_id}"
            )));
        }
        let verified = self
            .attestation
            .roots
            .verify(ek_certificate, &chain, Purpose::EndorsementKey)
            .map_err(refused)?;
        let ek = match &ek_public {
            Some(public) => EndorsementKey::from_public_area(public, &verified.leaf_spki_der),
            None => EndorsementKey::from_spki(&verified.leaf_spki_der),
        }
        .map_err(refused)?;
        let mut secret = [0u8; CREDENTIAL_OCTETS];
        getrandom::fill(&mut secret).map_err(|e| CmfError::Internal(format!("secret: {e}")))?;
        let made = credential::make_credential(&ek, &ak.name, &secret).map_err(refused)?;
        let challenge_id = crate::cmf::new_id()?;
        let expires = now_seconds() + self.attestation.challenge_ttl.as_secs();
        let record = AkChallenge {
            consumer: consumer.id.clone(),
            expires,
            secret_sha256: hex::encode(sha2::Sha256::digest(secret)),
            ak_name: hex::encode(&ak.name),
            ak_spki_sha256: hex::encode(sha2::Sha256::digest(&ak.spki_der)),
            ek_certificate_sha256: verified.leaf_sha256.clone(),
            root: verified.root.clone(),
        };
        let key = format!("{registration_id}/{challenge_id}");
        let prefix = format!("{registration_id}/");
        let max = self.attestation.max_outstanding;
        let consumer_id = consumer.id.clone();
        let detail = serde_json::json!({
            "registrationId": registration_id,
            "akName": record.ak_name,
            "ekCertificateSha256": record.ek_certificate_sha256,
            "root": record.root,
        });
        let audit_key = key.clone();
        let expired = expired_keys(&self.store, &AK_CHALLENGES, &prefix, |r| r.expires, max)?;
        self.group
            .write_async(move |tx| {
                for key in &expired {
                    tx.delete(&AK_CHALLENGES, key)?;
                }
                tx.put(&AK_CHALLENGES, &key, &record)?;
                tx.audit(
                    AuditEvent::new(&consumer_id, "cmf.ak_challenge", &audit_key)
                        .with_detail(detail),
                );
                Ok(())
            })
            .await
            .map_err(rejected_or)?;
        let location =
            format!("/certmgmt/v1/registrations/{registration_id}/ak_challenges/{challenge_id}");
        Ok((
            location,
            AkChallengeResponse {
                challenge_id,
                credential_blob: b64.encode(&made.credential_blob),
                encrypted_secret: b64.encode(&made.encrypted_secret),
                expires_at: rfc3339(expires),
            },
        ))
    }

    /// The consumer's answer to a challenge: the right secret anchors the registration's
    /// attester. The challenge is consumed by any answer.
    pub async fn answer_ak_challenge(
        &self,
        consumer: &Consumer,
        registration_id: &str,
        challenge_id: &str,
        answer: AkChallengeAnswer,
    ) -> Result<Registration, CmfError> {
        let secret = base64::engine::general_purpose::STANDARD
            .decode(answer.secret.trim())
            .map_err(|e| CmfError::BadRequest(format!("secret: base64: {e}")))?;
        let secret_sha256 = sha2::Sha256::digest(&secret).to_vec();
        let key = format!("{registration_id}/{challenge_id}");
        let consumer = consumer.clone();
        let registration_id = registration_id.to_string();
        let challenge_id = challenge_id.to_string();
        let now = now_seconds();
        // The verdict comes back from the transaction: a refusal must still commit the
        // deletion of the challenge (one answer per challenge), so it is not a rollback.
        let outcome =
            self.group
                .write_async(move |tx| {
                    let Some(challenge) = tx.get(&AK_CHALLENGES, &key)? else {
                        return Err(StoreError::rejected(CmfError::NotFound(format!(
                            "AK challenge {challenge_id} of registration {registration_id} does \
                         not exist (or was answered already)"
                        ))));
                    };
                    if challenge.consumer != consumer.id {
                        return Err(StoreError::rejected(CmfError::Forbidden(format!(
                            "AK challenge {challenge_id} belongs to another consumer"
                        ))));
                    }
                    tx.delete(&AK_CHALLENGES, &key)?;
                    let mut registration =
                        tx.get(&REGISTRATIONS, &registration_id)?.ok_or_else(|| {
                            StoreError::rejected(CmfError::NotFound(format!(
                                "registration {registration_id} does not exist"
                            )))
                        })?;
                    owned_by(&registration, &consumer).map_err(StoreError::rejected)?;
                    let verdict =
                        if challenge.expires < now {
                            Err(format!(
                                "AK challenge {challenge_id} expired at {}: ask for a new one",
                                rfc3339(challenge.expires)
                            ))
                        } else if !constant_time_eq(
                            &hex::decode(&challenge.secret_sha256).unwrap_or_default(),
                            &secret_sha256,
                        ) {
                            Err("the secret is not the credential: TPM2_ActivateCredential did not \
                         run in the TPM of that EK with that AK loaded; the challenge is \
                         spent, ask for a new one"
                        .to_string())
                        } else {
                            Ok(())
                        };
                    let audit = AuditEvent::new(&consumer.id, "cmf.ak_activation", &key);
                    match verdict {
                        Err(why) => {
                            tx.audit(audit.with_detail(serde_json::json!({ "refused": why })));
                            Ok(Err(why))
                        }
                        Ok(()) => {
                            let Some(attester) = registration.key_attestation.as_mut() else {
                                return Ok(Err(format!(
                                    "registration {registration_id} has no keyAttestation"
                                )));
                            };
                            let current = base64::engine::general_purpose::STANDARD
                                .decode(&attester.attester_public_key)
                                .unwrap_or_default();
                            if hex::encode(sha2::Sha256::digest(
                                tpm::canonical_spki(&current).unwrap_or_default(),
                            )) != challenge.ak_spki_sha256
                            {
                                return Ok(Err(
                                    "the registration's attester key changed since the challenge"
                                        .to_string(),
                                ));
                            }
                            attester.anchor = Some(AttesterAnchor {
                                method: AnchorMethod::EkCredentialActivation,
                                root: challenge.root.clone(),
                                certificate_sha256: challenge.ek_certificate_sha256.clone(),
                                anchored_at: crate::keys::rfc3339_now(),
                            });
                            tx.put(&REGISTRATIONS, &registration_id, &registration)?;
                            tx.audit(audit.with_detail(serde_json::json!({
                                "anchored": true,
                                "akName": challenge.ak_name,
                                "ekCertificateSha256": challenge.ek_certificate_sha256,
                                "root": challenge.root,
                            })));
                            Ok(Ok(registration))
                        }
                    }
                })
                .await
                .map_err(rejected_or)?;
        outcome.map_err(CmfError::Unprocessable)
    }
}

/// The outcome of a CSR's qualifying data against the CMF's nonces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Freshness {
    /// The registration pins the qualifying data (checked by the verifier).
    Pinned,
    /// A CMF nonce, outstanding now; consumed by the issuance commit (store key).
    Nonce(String),
    /// No nonce, and none required.
    NotRequested,
}

/// Check `qualifying_data` of a verified attestation against the nonces (read only; the
/// issuance commit consumes the nonce).
pub(crate) fn check_freshness(
    policy: &AttestationPolicy,
    store: &crate::store::Store,
    registration: &Registration,
    pinned: bool,
    qualifying_data: Option<&[u8]>,
) -> Result<Freshness, super::AttestationError> {
    use super::AttestationError;
    if pinned {
        return Ok(Freshness::Pinned);
    }
    match qualifying_data {
        Some(data) if !data.is_empty() => {
            let key = format!("{}/{}", registration.id, hex::encode(data));
            let record = store
                .read(|tx| tx.get(&ATTESTATION_NONCES, &key))
                .map_err(|e| AttestationError::Nonce(format!("reading the nonces: {e}")))?;
            match record {
                None => Err(AttestationError::Nonce(
                    "the qualifying data is not an outstanding nonce of this registration \
                     (used already, or never issued): ask for a new nonce"
                        .into(),
                )),
                Some(r) if r.expires < now_seconds() => Err(AttestationError::Nonce(format!(
                    "the nonce expired at {}: ask for a new one",
                    rfc3339(r.expires)
                ))),
                Some(_) => Ok(Freshness::Nonce(key)),
            }
        }
        // X.509 key certificates carry no qualifying data: nothing to require.
        None => Ok(Freshness::NotRequested),
        Some(_) if policy.require_nonce => Err(AttestationError::Nonce(
            "this CMF requires a nonce from .../attestation_nonces in the attestation's \
             qualifying data"
                .into(),
        )),
        _ => Ok(Freshness::NotRequested),
    }
}

/// Consume a nonce inside the issuance transaction: the first CSR to commit wins.
pub(crate) fn consume_nonce(
    tx: &mut crate::store::WriteTx<'_>,
    key: &str,
) -> Result<(), StoreError> {
    if tx.delete(&ATTESTATION_NONCES, key)? {
        Ok(())
    } else {
        Err(StoreError::rejected(CmfError::Unprocessable(
            "key attestation: the nonce in the qualifying data was used by another CSR \
             already: ask for a new nonce"
                .into(),
        )))
    }
}

fn registered_attester_spki(registration: &Registration) -> Result<Vec<u8>, CmfError> {
    let attester = registration.key_attestation.as_ref().ok_or_else(|| {
        CmfError::Unprocessable(format!(
            "registration {} has no keyAttestation to anchor",
            registration.id
        ))
    })?;
    base64::engine::general_purpose::STANDARD
        .decode(&attester.attester_public_key)
        .map_err(|e| CmfError::Internal(format!("stored attester key: {e}")))
}

/// The expired records under `prefix`, to delete; refused when `max` remain outstanding.
/// Read from a snapshot before the write: concurrent requests may exceed `max` by their
/// number, which is all the bound needs (it caps what one consumer can make the store keep).
fn expired_keys<V: serde::de::DeserializeOwned>(
    store: &crate::store::Store,
    table: &Table<V>,
    prefix: &str,
    expires: impl Fn(&V) -> u64,
    max: usize,
) -> Result<Vec<String>, CmfError> {
    let now = now_seconds();
    let records = store.read(|tx| tx.list(table, prefix))?;
    let mut expired = Vec::new();
    let mut live = 0;
    for (key, record) in records {
        if expires(&record) < now {
            expired.push(key);
        } else {
            live += 1;
        }
    }
    if live >= max {
        return Err(CmfError::Conflict(format!(
            "{live} unused nonces or challenges are outstanding for this registration (at \
             most {max}): use them or let them expire"
        )));
    }
    Ok(expired)
}

fn now_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn rfc3339(unix_seconds: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix_seconds)).to_string()
}
