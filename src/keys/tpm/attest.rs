//! Attestation: attestation keys (restricted signing keys) and TPM2_Certify evidence.

use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::handles::KeyHandle;
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{
    Data, Digest, EccPoint, EccScheme, HashScheme, KeyDerivationFunctionScheme, Public,
    PublicEccParameters, PublicKeyRsa, PublicRsaParameters, RsaExponent, RsaScheme,
    SignatureScheme as TpmSignatureScheme, SymmetricDefinitionObject,
};
use tss_esapi::traits::Marshall;

use super::connection::{tpm_error, Connection};
use crate::keys::{CertifyEvidence, KeyAlgorithm, KeyError, TpmHandle};

/// TPM2_Certify of a persistent key by a persistent AK. Two authorizations (the object and
/// the signing key), so two password sessions; the AK's own scheme signs (scheme NULL).
/// Both objects are persistent: nothing transient to flush.
pub(super) fn certify(
    c: &mut Connection,
    key: TpmHandle,
    attestation_key: TpmHandle,
    qualifying_data: &[u8],
) -> Result<CertifyEvidence, KeyError> {
    let data = Data::try_from(qualifying_data.to_vec()).map_err(|_| {
        KeyError::InvalidArgument(format!(
            "qualifying data of {} octets: at most 64",
            qualifying_data.len()
        ))
    })?;
    let (attest, signature, public) = c.with_object(key, |c, object| {
        c.with_object(attestation_key, |c, signer| {
            let (attest, signature) = c
                .tpm()?
                .execute_with_sessions(
                    (
                        Some(AuthSession::Password),
                        Some(AuthSession::Password),
                        None,
                    ),
                    |ctx| {
                        ctx.certify(
                            object,
                            KeyHandle::from(signer),
                            data,
                            TpmSignatureScheme::Null,
                        )
                    },
                )
                .map_err(tpm_error("TPM2_Certify"))?;
            let public = c.read_public(key, object)?;
            Ok((attest, signature, public))
        })
    })?;
    let marshal = tpm_error("Tss2_MU_Marshal");
    Ok(CertifyEvidence {
        attest: attest.marshall().map_err(&marshal)?,
        signature: signature.marshall().map_err(&marshal)?,
        public_area: public.marshall().map_err(&marshal)?,
    })
}

/// Attestation key (TCG EK Credential Profile / tpm2_createak shape): restricted signing,
/// fixedTPM, fixedParent, sensitiveDataOrigin, userWithAuth, with its scheme fixed (a
/// restricted signing key must name one): ECDSA-SHA256 on P-256, RSASSA-SHA256 on RSA-2048.
pub(super) fn attestation_key_template(algorithm: KeyAlgorithm) -> tss_esapi::Result<Public> {
    let object_attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_restricted(true)
        .with_sign_encrypt(true)
        .build()?;
    let hash_scheme = HashScheme::new(HashingAlgorithm::Sha256);
    Ok(if algorithm.is_rsa() {
        Public::Rsa {
            object_attributes,
            name_hashing_algorithm: HashingAlgorithm::Sha256,
            auth_policy: Digest::default(),
            parameters: PublicRsaParameters::new(
                SymmetricDefinitionObject::Null,
                RsaScheme::RsaSsa(hash_scheme),
                RsaKeyBits::Rsa2048,
                RsaExponent::default(),
            ),
            unique: PublicKeyRsa::default(),
        }
    } else {
        Public::Ecc {
            object_attributes,
            name_hashing_algorithm: HashingAlgorithm::Sha256,
            auth_policy: Digest::default(),
            parameters: PublicEccParameters::new(
                SymmetricDefinitionObject::Null,
                EccScheme::EcDsa(hash_scheme),
                EccCurve::NistP256,
                KeyDerivationFunctionScheme::Null,
            ),
            unique: EccPoint::default(),
        }
    })
}
