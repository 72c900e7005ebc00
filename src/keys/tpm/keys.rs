//! Keys: the storage primary, generation into the key range, signing, erasure, listing,
//! and the templates and encodings between TPM structures and the key layer's types.
//! Every function here runs on an owner thread with a live [`Connection`].

use tss_esapi::attributes::{ObjectAttributes, ObjectAttributesBuilder};
use tss_esapi::constants::tss as tpm2;
use tss_esapi::handles::{KeyHandle, PersistentTpmHandle};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::dynamic_handles::Persistent;
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::resource_handles::{Hierarchy, Provision};
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{
    Digest, EccPoint, EccScheme, HashScheme, HashcheckTicket, KeyDerivationFunctionScheme, Public,
    PublicEccParameters, PublicKeyRsa, PublicRsaParameters, RsaExponent, RsaScheme, Signature,
    SignatureScheme as TpmSignatureScheme, SymmetricDefinitionObject,
};
use tss_esapi::tss2_esys::TPMT_TK_HASHCHECK;

use spki::EncodePublicKey;

use super::attest::attestation_key_template;
use super::connection::{not_found_or, tpm_error, Connection, Layout};
use crate::keys::{
    ecdsa_raw_to_der, KeyAlgorithm, KeyError, KeyInfo, KeyRef, KeySpec, PublicKey, SignatureScheme,
    TpmHandle,
};

/// Make sure the storage primary exists at its handle: checked (a restricted decryption
/// key, as a storage parent must be), or created and persisted when the handle is empty.
pub(super) fn ensure_primary(c: &mut Connection, layout: &Layout) -> Result<(), KeyError> {
    let handle = TpmHandle(layout.primary);
    match c.read_public_of(handle) {
        Ok(public) => {
            let attributes = public.object_attributes();
            if !(attributes.restricted() && attributes.decrypt()) {
                return Err(KeyError::TpmOther(format!(
                    "{handle} holds an object that is not a storage key (restricted decrypt); \
                     configure another storage_primary_handle"
                )));
            }
            Ok(())
        }
        Err(KeyError::NotFound(_)) => {
            tracing::info!(handle = %handle, "creating the ECC P-256 storage primary key");
            // Everything that can fail comes before the transient exists: from its creation
            // on, only `with_transient` may end its life (see `Worker::close`).
            let persistent = persistent(handle.0)?;
            let created = c
                .tpm()?
                .execute_with_session(Some(AuthSession::Password), |ctx| {
                    ctx.create_primary(
                        Hierarchy::Owner,
                        storage_primary_template()?,
                        None,
                        None,
                        None,
                        None,
                    )
                })
                .map_err(tpm_error("TPM2_CreatePrimary"))?;
            let transient = created.key_handle;
            let object = c.with_transient(transient.into(), |ctx| {
                ctx.execute_with_session(Some(AuthSession::Password), |ctx| {
                    ctx.evict_control(Provision::Owner, transient.into(), persistent)
                })
                .map_err(tpm_error("TPM2_EvictControl"))
            })?;
            c.close(object);
            Ok(())
        }
        Err(e) => Err(e),
    }
}

pub(super) fn generate(
    c: &mut Connection,
    layout: &Layout,
    spec: &KeySpec,
    at: Option<TpmHandle>,
    template: Template,
) -> Result<KeyInfo, KeyError> {
    let used = c.handles_in(layout.first, layout.last)?;
    let free = match at {
        Some(handle) => {
            if !(layout.first..=layout.last).contains(&handle.0) {
                return Err(KeyError::InvalidArgument(format!(
                    "{handle} is outside the key range 0x{:08x}-0x{:08x}",
                    layout.first, layout.last
                )));
            }
            if used.contains(&handle.0) {
                return Err(KeyError::AlreadyExists(handle.to_string()));
            }
            handle.0
        }
        None => (layout.first..=layout.last)
            .find(|h| !used.contains(h))
            .ok_or_else(|| {
                KeyError::TpmOther(format!(
                    "no free persistent handle in the key range 0x{:08x}-0x{:08x}",
                    layout.first, layout.last
                ))
            })?,
    };
    ensure_primary(c, layout)?;
    let (public_key, object) = c.with_object(TpmHandle(layout.primary), |c, parent| {
        let parent = KeyHandle::from(parent);
        let created = c
            .tpm()?
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.create(
                    parent,
                    template.public(spec.algorithm)?,
                    None,
                    None,
                    None,
                    None,
                )
            })
            .map_err(tpm_error("TPM2_Create"))?;
        let public_key = public_key_of(&created.out_public)?;
        // Before the load: from then on only `with_transient` may end the loaded key's life.
        let target = persistent(free)?;
        let loaded = c
            .tpm()?
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.load(parent, created.out_private, created.out_public)
            })
            .map_err(tpm_error("TPM2_Load"))?;
        let object = c.with_transient(loaded.into(), |ctx| {
            ctx.execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.evict_control(Provision::Owner, loaded.into(), target)
            })
            .map_err(tpm_error("TPM2_EvictControl"))
        })?;
        Ok((public_key, object))
    })?;
    // Every command resolves the key afresh (see `Connection`).
    c.close(object);
    let handle = TpmHandle(free);
    tracing::info!(key = %handle, algorithm = %spec.algorithm, label = %spec.label, "TPM key generated");
    Ok(KeyInfo {
        reference: KeyRef::Tpm(handle),
        label: spec.label.clone(),
        public_key,
    })
}

pub(super) fn sign(
    c: &mut Connection,
    handle: TpmHandle,
    scheme: SignatureScheme,
    digest: &[u8],
) -> Result<Vec<u8>, KeyError> {
    let hash = match scheme.hash_algorithm() {
        crate::keys::HashAlgorithm::Sha256 => HashingAlgorithm::Sha256,
        crate::keys::HashAlgorithm::Sha384 => HashingAlgorithm::Sha384,
    };
    let hash_scheme = HashScheme::new(hash);
    let tpm_scheme = if scheme.is_ecdsa() {
        TpmSignatureScheme::EcDsa { hash_scheme }
    } else if scheme.is_pss() {
        // PSS salt: TPM2_Sign takes no salt length. libtpms (swtpm) uses salt = hash length,
        // as TLS 1.3 requires (RFC 8446 4.2.3); tests/tpm.rs checks that a verifier fixed to
        // the hash length accepts and one expecting another length rejects. Some older TPM
        // firmware used the largest possible salt (TPM 2.0 Part 1 before rev 1.38 allowed it):
        // such signatures are valid PSS but strict TLS 1.3 peers reject them.
        TpmSignatureScheme::RsaPss { hash_scheme }
    } else {
        TpmSignatureScheme::RsaSsa { hash_scheme }
    };
    let digest = Digest::try_from(digest.to_vec()).map_err(tpm_error("TPM2_Sign"))?;
    c.with_object(handle, |c, object| {
        let algorithm = c.algorithm_of(handle, object)?;
        if !scheme.fits(algorithm) {
            return Err(KeyError::InvalidArgument(format!(
                "scheme {scheme} does not fit the {algorithm} key {handle}"
            )));
        }
        let signature = c
            .tpm()?
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.sign(KeyHandle::from(object), digest, tpm_scheme, null_ticket()?)
            })
            .map_err(|e| not_found_or(handle, e, "TPM2_Sign"))?;
        signature_der(algorithm, signature)
    })
}

/// The TPM's signature as the key layer returns it: DER ECDSA-Sig-Value (RFC 3279 2.2.3)
/// or the RSA signature octets.
fn signature_der(algorithm: KeyAlgorithm, signature: Signature) -> Result<Vec<u8>, KeyError> {
    match signature {
        Signature::EcDsa(ecc) => {
            let size = field_size(algorithm);
            let mut raw = pad_left(ecc.signature_r().value(), size)?;
            raw.extend_from_slice(&pad_left(ecc.signature_s().value(), size)?);
            ecdsa_raw_to_der(&raw)
        }
        Signature::RsaSsa(rsa) | Signature::RsaPss(rsa) => Ok(rsa.signature().value().to_vec()),
        other => Err(KeyError::TpmOther(format!(
            "TPM2_Sign returned an unexpected {:?} signature",
            other.algorithm()
        ))),
    }
}

pub(super) fn destroy_persistent(
    c: &mut Connection,
    handle: TpmHandle,
) -> Result<(&'static str, bool), KeyError> {
    if !c.handles_in(handle.0, handle.0)?.contains(&handle.0) {
        return Err(KeyError::NotFound(handle.to_string()));
    }
    let target = persistent(handle.0)?;
    // `with_object` closes the ESYS object afterwards: libtss2-esys 3.2 keeps the object of
    // an evicted key, and a stale object would make the next key at this handle unusable.
    c.with_object(handle, |c, object| {
        c.tpm()?
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.evict_control(Provision::Owner, object, target)
            })
            .map_err(|e| not_found_or(handle, e, "TPM2_EvictControl"))
    })?;
    let verified = !c.handles_in(handle.0, handle.0)?.contains(&handle.0);
    Ok(("persistent key (private and public area)", verified))
}

pub(super) fn list(c: &mut Connection, layout: &Layout) -> Result<Vec<KeyInfo>, KeyError> {
    let mut keys = Vec::new();
    for handle in c.handles_in(layout.first, layout.last)? {
        let handle = TpmHandle(handle);
        let public = match c.read_public_of(handle) {
            Ok(public) => public,
            // Evicted between GetCapability and ReadPublic.
            Err(KeyError::NotFound(_)) => continue,
            Err(e) => return Err(e),
        };
        match public_key_of(&public) {
            Ok(public_key) => keys.push(KeyInfo {
                reference: KeyRef::Tpm(handle),
                // The TPM has no labels.
                label: String::new(),
                public_key,
            }),
            Err(e) => {
                tracing::warn!(key = %handle, error = %e, "skipping a TPM object of an unsupported type")
            }
        }
    }
    Ok(keys)
}

// ----------------------------------------------------------------------------------------
// Templates and encodings

/// ECC P-256 storage primary: the TCG SRK template (TCG TPM v2.0 Provisioning Guidance,
/// 7.5.1): restricted decrypt, AES-128-CFB, fixedTPM/fixedParent/sensitiveDataOrigin,
/// userWithAuth, noDA.
fn storage_primary_template() -> tss_esapi::Result<Public> {
    let object_attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()?;
    Ok(Public::Ecc {
        object_attributes,
        name_hashing_algorithm: HashingAlgorithm::Sha256,
        auth_policy: Digest::default(),
        parameters: PublicEccParameters::new(
            SymmetricDefinitionObject::AES_128_CFB,
            EccScheme::Null,
            EccCurve::NistP256,
            KeyDerivationFunctionScheme::Null,
        ),
        unique: EccPoint::default(),
    })
}

/// Unrestricted signing key: fixedTPM, fixedParent, sensitiveDataOrigin, userWithAuth,
/// sign; scheme NULL so that each TPM2_Sign picks ECDSA / RSASSA / RSAPSS and the hash.
/// (The tss-esapi parameter builders refuse a NULL scheme on a signing key, hence the plain
/// constructors.)
fn signing_key_template(algorithm: KeyAlgorithm) -> tss_esapi::Result<Public> {
    let object_attributes = signing_key_attributes()?;
    Ok(match algorithm {
        KeyAlgorithm::EcP256 | KeyAlgorithm::EcP384 => Public::Ecc {
            object_attributes,
            name_hashing_algorithm: HashingAlgorithm::Sha256,
            auth_policy: Digest::default(),
            parameters: PublicEccParameters::new(
                SymmetricDefinitionObject::Null,
                EccScheme::Null,
                if algorithm == KeyAlgorithm::EcP256 {
                    EccCurve::NistP256
                } else {
                    EccCurve::NistP384
                },
                KeyDerivationFunctionScheme::Null,
            ),
            unique: EccPoint::default(),
        },
        KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 => Public::Rsa {
            object_attributes,
            name_hashing_algorithm: HashingAlgorithm::Sha256,
            auth_policy: Digest::default(),
            parameters: PublicRsaParameters::new(
                SymmetricDefinitionObject::Null,
                RsaScheme::Null,
                if algorithm == KeyAlgorithm::Rsa2048 {
                    RsaKeyBits::Rsa2048
                } else {
                    RsaKeyBits::Rsa3072
                },
                RsaExponent::default(),
            ),
            unique: PublicKeyRsa::default(),
        },
    })
}

/// Which template a new key gets.
#[derive(Clone, Copy, Debug)]
pub(super) enum Template {
    /// [`signing_key_template`]: every key of the key layer.
    Signing,
    /// [`attestation_key_template`].
    Attestation,
    /// A signing key with these TPMA_OBJECT bits (tests).
    Custom(u32),
}

impl Template {
    fn public(self, algorithm: KeyAlgorithm) -> tss_esapi::Result<Public> {
        match self {
            Template::Signing => signing_key_template(algorithm),
            Template::Attestation => attestation_key_template(algorithm),
            Template::Custom(bits) => {
                let mut public = signing_key_template(algorithm)?;
                let attributes = ObjectAttributes::from(bits);
                match &mut public {
                    Public::Rsa {
                        object_attributes, ..
                    }
                    | Public::Ecc {
                        object_attributes, ..
                    } => *object_attributes = attributes,
                    _ => {}
                }
                Ok(public)
            }
        }
    }
}

pub(super) fn signing_key_attributes() -> tss_esapi::Result<ObjectAttributes> {
    ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_sign_encrypt(true)
        .build()
}

pub(super) fn key_algorithm(public: &Public) -> Result<KeyAlgorithm, KeyError> {
    match public {
        Public::Ecc { parameters, .. } => match parameters.ecc_curve() {
            EccCurve::NistP256 => Ok(KeyAlgorithm::EcP256),
            EccCurve::NistP384 => Ok(KeyAlgorithm::EcP384),
            other => Err(KeyError::Unsupported(format!("ECC curve {other:?}"))),
        },
        Public::Rsa { parameters, .. } => match parameters.key_bits() {
            RsaKeyBits::Rsa2048 => Ok(KeyAlgorithm::Rsa2048),
            RsaKeyBits::Rsa3072 => Ok(KeyAlgorithm::Rsa3072),
            other => Err(KeyError::Unsupported(format!("RSA key size {other:?}"))),
        },
        _ => Err(KeyError::Unsupported(
            "a TPM object that is neither ECC nor RSA".to_string(),
        )),
    }
}

/// SubjectPublicKeyInfo DER from TPMT_PUBLIC: id-ecPublicKey with the curve OID and the
/// uncompressed point (RFC 5480), or rsaEncryption with NULL parameters (RFC 3279 2.3.1).
pub(super) fn public_key_of(public: &Public) -> Result<PublicKey, KeyError> {
    let algorithm = key_algorithm(public)?;
    let encoding = |e: spki::Error| KeyError::Encoding(format!("{algorithm} public key: {e}"));
    let spki_der = match public {
        Public::Ecc { unique, .. } => {
            let size = field_size(algorithm);
            let mut point = Vec::with_capacity(1 + 2 * size);
            point.push(0x04);
            point.extend_from_slice(&pad_left(unique.x().value(), size)?);
            point.extend_from_slice(&pad_left(unique.y().value(), size)?);
            let bad_point = |e| KeyError::Encoding(format!("{algorithm} point from the TPM: {e}"));
            if algorithm == KeyAlgorithm::EcP256 {
                p256::PublicKey::from_sec1_bytes(&point)
                    .map_err(bad_point)?
                    .to_public_key_der()
                    .map_err(encoding)?
            } else {
                p384::PublicKey::from_sec1_bytes(&point)
                    .map_err(bad_point)?
                    .to_public_key_der()
                    .map_err(encoding)?
            }
        }
        Public::Rsa {
            parameters, unique, ..
        } => {
            let modulus = unique.value();
            // TPM 2.0 Part 2, 12.2.3.5: an exponent of zero means 2^16 + 1.
            let exponent = match parameters.exponent().value() {
                0 => 65_537,
                e => e,
            };
            let bits = u32::try_from(modulus.len() * 8)
                .map_err(|_| KeyError::Encoding("RSA modulus too large".to_string()))?;
            let n = rsa::BoxedUint::from_be_slice(modulus, bits)
                .map_err(|e| KeyError::Encoding(format!("RSA modulus: {e:?}")))?;
            let e = rsa::BoxedUint::from_be_slice(&exponent.to_be_bytes(), 32)
                .map_err(|e| KeyError::Encoding(format!("RSA exponent: {e:?}")))?;
            rsa::PublicKey::new(n, e)
                .map_err(|e| KeyError::Encoding(format!("RSA public key from the TPM: {e}")))?
                .to_public_key_der()
                .map_err(encoding)?
        }
        _ => return Err(KeyError::Unsupported("TPM object type".to_string())),
    };
    Ok(PublicKey {
        algorithm,
        spki_der: spki_der.as_bytes().to_vec(),
    })
}

fn field_size(algorithm: KeyAlgorithm) -> usize {
    match algorithm {
        KeyAlgorithm::EcP384 => 48,
        _ => 32,
    }
}

fn pad_left(bytes: &[u8], size: usize) -> Result<Vec<u8>, KeyError> {
    // The TPM may drop leading zero octets; it never sends more than the field size.
    let start = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
    let bytes = &bytes[start..];
    if bytes.len() > size {
        return Err(KeyError::Encoding(format!(
            "{}-byte value from the TPM exceeds the {size}-byte field",
            bytes.len()
        )));
    }
    let mut out = vec![0; size - bytes.len()];
    out.extend_from_slice(bytes);
    Ok(out)
}

/// A NULL hashcheck ticket (TPM_ST_HASHCHECK, TPM_RH_NULL, empty digest): enough for
/// TPM2_Sign with an unrestricted key (TPM 2.0 Part 3, 20.2.1).
fn null_ticket() -> tss_esapi::Result<HashcheckTicket> {
    HashcheckTicket::try_from(TPMT_TK_HASHCHECK {
        tag: tpm2::TPM2_ST_HASHCHECK,
        hierarchy: tpm2::TPM2_RH_NULL,
        digest: Default::default(),
    })
}

fn persistent(handle: u32) -> Result<Persistent, KeyError> {
    PersistentTpmHandle::new(handle)
        .map(Persistent::Persistent)
        .map_err(tpm_error("TPM2_EvictControl"))
}
