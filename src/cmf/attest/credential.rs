//! TPM2_MakeCredential in software, so that a CMF without a TPM of its own (HSM-only) can
//! challenge a consumer's attestation key (AK) through the TPM's endorsement key (EK).
//!
//! TPM 2.0 Part 1 clause 24 ("Credential protection") and Part 3 12.6 (TPM2_MakeCredential):
//!
//! ```text
//! seed        RSA EK: random, |H(nameAlg)| octets, RSA-OAEP(H(nameAlg), label "IDENTITY\0")
//!             ECC EK: ephemeral ECDH on the EK's curve, Z = x(d_e * Q_EK),
//!                     seed = KDFe(nameAlg, Z, "IDENTITY", x(Q_e), x(Q_EK))   (Part 1 C.6.4)
//! symKey      = KDFa(nameAlg, seed, "STORAGE", Name(AK), "", symKeyBits)
//! encIdentity = AES-CFB(symKey, IV = 0, TPM2B_DIGEST(credential))
//! hmacKey     = KDFa(nameAlg, seed, "INTEGRITY", "", "", |H(nameAlg)| * 8)
//! integrity   = HMAC(nameAlg, hmacKey, encIdentity || Name(AK))
//! credentialBlob (TPM2B_ID_OBJECT) = TPM2B_DIGEST(integrity) || encIdentity
//! secret (TPM2B_ENCRYPTED_SECRET)  = the OAEP ciphertext, or TPMS_ECC_POINT(Q_e)
//! ```
//!
//! TPM2_ActivateCredential returns the credential only in the TPM that holds the EK's
//! private part and has the object with that Name loaded: so the AK and the EK live in the
//! same TPM. No well-kept Rust crate does this without a TPM (tss-esapi's `make_credential`
//! sends the command to one); the steps are short and the swtpm tests run the real
//! ActivateCredential against every output.
//!
//! The EK's nameAlg and symmetric algorithm come from its public area when the consumer
//! sends it, else from the TCG EK Credential Profile default templates for the key in the EK
//! certificate: RSA-2048 and ECC P-256 use SHA-256 and AES-128 (templates L-1, L-2, H-2,
//! H-3); RSA-3072 and ECC P-384 use SHA-384 and AES-256 (H-4, H-5).

use aes::cipher::KeyIvInit;
use hmac::{KeyInit, Mac};
use p256::elliptic_curve::sec1::ToSec1Point;
use sha2::Digest;

use super::tpm::{self, TpmKey, TpmPublic};
use super::AttestationError;

/// TPMA_OBJECT decrypt (Part 2, 8.3): an AK signs, it never decrypts.
pub const DECRYPT: u32 = 0x0002_0000;

/// The attributes an attestation key must have (TCG, TPM 2.0 Keys for Device Identity and
/// Attestation, 3.6: a restricted signing key, fixed to its TPM, generated in it).
const AK_REQUIRED: [(u32, &str); 5] = [
    (tpm::FIXED_TPM, "fixedTPM"),
    (tpm::FIXED_PARENT, "fixedParent"),
    (tpm::SENSITIVE_DATA_ORIGIN, "sensitiveDataOrigin"),
    (tpm::RESTRICTED, "restricted"),
    (tpm::SIGN, "sign"),
];
const AK_FORBIDDEN: [(u32, &str); 1] = [(DECRYPT, "decrypt")];

/// The hash of an EK's nameAlg.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameAlg {
    Sha256,
    Sha384,
}

impl NameAlg {
    pub fn digest_size(self) -> usize {
        match self {
            NameAlg::Sha256 => 32,
            NameAlg::Sha384 => 48,
        }
    }

    fn hash(self, parts: &[&[u8]]) -> Vec<u8> {
        match self {
            NameAlg::Sha256 => {
                let mut h = sha2::Sha256::new();
                parts.iter().for_each(|p| h.update(p));
                h.finalize().to_vec()
            }
            NameAlg::Sha384 => {
                let mut h = sha2::Sha384::new();
                parts.iter().for_each(|p| h.update(p));
                h.finalize().to_vec()
            }
        }
    }

    fn hmac(self, key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
        // HMAC accepts keys of any length (RFC 2104 2): new_from_slice cannot fail here.
        match self {
            NameAlg::Sha256 => match hmac::Hmac::<sha2::Sha256>::new_from_slice(key) {
                Ok(mut mac) => {
                    parts.iter().for_each(|p| mac.update(p));
                    mac.finalize().into_bytes().to_vec()
                }
                Err(_) => Vec::new(),
            },
            NameAlg::Sha384 => match hmac::Hmac::<sha2::Sha384>::new_from_slice(key) {
                Ok(mut mac) => {
                    parts.iter().for_each(|p| mac.update(p));
                    mac.finalize().into_bytes().to_vec()
                }
                Err(_) => Vec::new(),
            },
        }
    }
}

/// The EK as MakeCredential needs it: its key, nameAlg and symmetric key size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndorsementKey {
    pub key: TpmKey,
    pub name_alg: NameAlg,
    /// AES key bits of the EK's symmetric definition (128 or 256).
    pub sym_key_bits: u16,
}

impl EndorsementKey {
    /// From the SubjectPublicKeyInfo of an EK certificate, with the default template's
    /// algorithms for that key (module documentation).
    pub fn from_spki(spki_der: &[u8]) -> Result<EndorsementKey, AttestationError> {
        let key = tpm_key_of_spki(spki_der)?;
        let (name_alg, sym_key_bits) = match &key {
            TpmKey::Rsa { modulus, .. } if modulus.len() <= 256 => (NameAlg::Sha256, 128),
            TpmKey::Rsa { .. } => (NameAlg::Sha384, 256),
            TpmKey::Ecc { curve, .. } if *curve == ECC_NIST_P256 => (NameAlg::Sha256, 128),
            TpmKey::Ecc { .. } => (NameAlg::Sha384, 256),
        };
        Ok(EndorsementKey {
            key,
            name_alg,
            sym_key_bits,
        })
    }

    /// From the EK's TPMT_PUBLIC (or TPM2B_PUBLIC): its key must be the certificate's.
    pub fn from_public_area(
        public: &[u8],
        certificate_spki_der: &[u8],
    ) -> Result<EndorsementKey, AttestationError> {
        let public = tpm::strip_tpm2b(public);
        let parsed = tpm::parse_public(public)?;
        if tpm::spki_of(&parsed.key)? != tpm::canonical_spki(certificate_spki_der)? {
            return Err(AttestationError::Credential(
                "ekPublic is not the key of the EK certificate".into(),
            ));
        }
        let name_alg = match parsed.name_alg {
            ALG_SHA256 => NameAlg::Sha256,
            ALG_SHA384 => NameAlg::Sha384,
            found => return Err(AttestationError::UnsupportedNameAlg { found }),
        };
        let sym_key_bits = symmetric_of(public)?;
        Ok(EndorsementKey {
            key: parsed.key,
            name_alg,
            sym_key_bits,
        })
    }
}

/// MakeCredential's output: what the consumer passes to TPM2_ActivateCredential.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MadeCredential {
    /// TPM2B_ID_OBJECT.
    pub credential_blob: Vec<u8>,
    /// TPM2B_ENCRYPTED_SECRET.
    pub encrypted_secret: Vec<u8>,
}

/// An attestation key's public area, checked: its Name and SubjectPublicKeyInfo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttestationKeyPublic {
    pub public: TpmPublic,
    /// nameAlg || H(TPMT_PUBLIC).
    pub name: Vec<u8>,
    pub spki_der: Vec<u8>,
}

/// Parse an AK's TPM2B_PUBLIC (a bare TPMT_PUBLIC is tolerated), compute its Name and check
/// the attributes of an attestation key.
pub fn parse_attestation_key(public: &[u8]) -> Result<AttestationKeyPublic, AttestationError> {
    let public_area = tpm::strip_tpm2b(public);
    let parsed = tpm::parse_public(public_area)?;
    let missing: Vec<&'static str> = AK_REQUIRED
        .iter()
        .filter(|(bit, _)| parsed.object_attributes & bit == 0)
        .map(|(_, name)| *name)
        .collect();
    let forbidden: Vec<&'static str> = AK_FORBIDDEN
        .iter()
        .filter(|(bit, _)| parsed.object_attributes & bit != 0)
        .map(|(_, name)| *name)
        .collect();
    if !missing.is_empty() || !forbidden.is_empty() {
        return Err(AttestationError::Attributes { missing, forbidden });
    }
    let name = tpm::name_of(public_area)?;
    let spki_der = tpm::spki_of(&parsed.key)?;
    Ok(AttestationKeyPublic {
        public: parsed,
        name,
        spki_der,
    })
}

/// TPM2_MakeCredential of `credential` for the object named `name`, protected by `ek`.
pub fn make_credential(
    ek: &EndorsementKey,
    name: &[u8],
    credential: &[u8],
) -> Result<MadeCredential, AttestationError> {
    let digest_size = ek.name_alg.digest_size();
    if credential.is_empty() || credential.len() > digest_size {
        return Err(AttestationError::Credential(format!(
            "a credential of {} octets (1 to {digest_size})",
            credential.len()
        )));
    }
    let (seed, encrypted_secret) = match &ek.key {
        TpmKey::Rsa { .. } => rsa_seed(ek, digest_size)?,
        TpmKey::Ecc { curve, x, y } => ecc_seed(ek.name_alg, *curve, x, y, digest_size)?,
    };
    let sym_key = kdf_a(
        ek.name_alg,
        &seed,
        b"STORAGE",
        name,
        &[],
        usize::from(ek.sym_key_bits),
    );
    // encIdentity: the credential as a TPM2B_DIGEST, AES-CFB with a zero IV (Part 1 24.4).
    let mut enc_identity = tpm2b(credential)?;
    let iv = [0u8; 16];
    match ek.sym_key_bits {
        128 => cfb_mode::Encryptor::<aes::Aes128>::new_from_slices(&sym_key, &iv)
            .map_err(|e| AttestationError::Credential(format!("AES-128-CFB: {e}")))?
            .encrypt(&mut enc_identity),
        256 => cfb_mode::Encryptor::<aes::Aes256>::new_from_slices(&sym_key, &iv)
            .map_err(|e| AttestationError::Credential(format!("AES-256-CFB: {e}")))?
            .encrypt(&mut enc_identity),
        other => {
            return Err(AttestationError::Credential(format!(
                "EK symmetric key of {other} bits (AES-128 or AES-256)"
            )))
        }
    }
    let hmac_key = kdf_a(ek.name_alg, &seed, b"INTEGRITY", &[], &[], digest_size * 8);
    let integrity = ek.name_alg.hmac(&hmac_key, &[&enc_identity, name]);
    let mut id_object = tpm2b(&integrity)?;
    id_object.extend_from_slice(&enc_identity);
    Ok(MadeCredential {
        credential_blob: tpm2b(&id_object)?,
        encrypted_secret: tpm2b(&encrypted_secret)?,
    })
}

/// KDFa (Part 1 11.4.10.2; SP 800-108 counter mode with HMAC): `bits` of output.
pub fn kdf_a(
    name_alg: NameAlg,
    key: &[u8],
    label: &[u8],
    context_u: &[u8],
    context_v: &[u8],
    bits: usize,
) -> Vec<u8> {
    let bytes = bits.div_ceil(8);
    let bits32 = u32::try_from(bits).unwrap_or(u32::MAX).to_be_bytes();
    let mut out = Vec::with_capacity(bytes + name_alg.digest_size());
    let mut counter: u32 = 1;
    while out.len() < bytes {
        out.extend(name_alg.hmac(
            key,
            &[
                &counter.to_be_bytes(),
                label,
                &[0],
                context_u,
                context_v,
                &bits32,
            ],
        ));
        counter += 1;
    }
    out.truncate(bytes);
    out
}

/// KDFe (Part 1 11.4.10.3; SP 800-56A concatenation KDF): `bits` of output. `label` is
/// given without its terminating zero, which is hashed as part of it.
pub fn kdf_e(
    name_alg: NameAlg,
    z: &[u8],
    label: &[u8],
    party_u: &[u8],
    party_v: &[u8],
    bits: usize,
) -> Vec<u8> {
    let bytes = bits.div_ceil(8);
    let mut out = Vec::with_capacity(bytes + name_alg.digest_size());
    let mut counter: u32 = 1;
    while out.len() < bytes {
        out.extend(name_alg.hash(&[&counter.to_be_bytes(), z, label, &[0], party_u, party_v]));
        counter += 1;
    }
    out.truncate(bytes);
    out
}

/// Parse a TPM2B_ENCRYPTED_SECRET or TPM2B_ID_OBJECT wrapper: its content (fuzzing, tests).
pub fn parse_tpm2b(bytes: &[u8]) -> Result<&[u8], AttestationError> {
    match bytes {
        [hi, lo, rest @ ..] if usize::from(u16::from_be_bytes([*hi, *lo])) == rest.len() => {
            Ok(rest)
        }
        _ => Err(AttestationError::Decode(
            "a TPM2B whose size is not its length".into(),
        )),
    }
}

// TPM_ALG_ID and TPM_ECC_CURVE (Part 2, 6.3, 6.4).
const ALG_SHA256: u16 = 0x000b;
const ALG_SHA384: u16 = 0x000c;
const ALG_NULL: u16 = 0x0010;
const ALG_AES: u16 = 0x0006;
const ALG_RSA: u16 = 0x0001;
const ALG_ECC: u16 = 0x0023;
const ECC_NIST_P256: u16 = 0x0003;
const ECC_NIST_P384: u16 = 0x0004;

fn tpm2b(content: &[u8]) -> Result<Vec<u8>, AttestationError> {
    let size = u16::try_from(content.len())
        .map_err(|_| AttestationError::Credential("a TPM2B over 65535 octets".into()))?;
    let mut out = size.to_be_bytes().to_vec();
    out.extend_from_slice(content);
    Ok(out)
}

fn random(n: usize) -> Result<Vec<u8>, AttestationError> {
    let mut bytes = vec![0u8; n];
    getrandom::fill(&mut bytes)
        .map_err(|e| AttestationError::Credential(format!("random seed: {e}")))?;
    Ok(bytes)
}

/// Part 1 B.10.3: the seed encrypted with RSA-OAEP, label "IDENTITY" with its zero octet.
fn rsa_seed(
    ek: &EndorsementKey,
    digest_size: usize,
) -> Result<(Vec<u8>, Vec<u8>), AttestationError> {
    use rsa::pkcs8::DecodePublicKey;
    let spki = tpm::spki_of(&ek.key)?;
    let public = rsa::PublicKey::from_public_key_der(&spki)
        .map_err(|e| AttestationError::Credential(format!("EK RSA key: {e}")))?;
    let seed = random(digest_size)?;
    let label: &[u8] = b"IDENTITY\0";
    let mut rng = getrandom04::SysRng;
    let encrypted = match ek.name_alg {
        NameAlg::Sha256 => public.encrypt(
            &mut rng,
            rsa::Oaep::<sha2::Sha256>::new_with_label(label),
            &seed,
        ),
        NameAlg::Sha384 => public.encrypt(
            &mut rng,
            rsa::Oaep::<sha2::Sha384>::new_with_label(label),
            &seed,
        ),
    }
    .map_err(|e| AttestationError::Credential(format!("RSA-OAEP to the EK: {e}")))?;
    Ok((seed, encrypted))
}

/// Part 1 C.6.4: one-pass ECDH with an ephemeral key; the secret is the ephemeral point.
fn ecc_seed(
    name_alg: NameAlg,
    curve: u16,
    x: &[u8],
    y: &[u8],
    digest_size: usize,
) -> Result<(Vec<u8>, Vec<u8>), AttestationError> {
    let bad = |e: String| AttestationError::Credential(format!("EK ECC key: {e}"));
    let size = match curve {
        ECC_NIST_P256 => 32,
        ECC_NIST_P384 => 48,
        other => return Err(bad(format!("curve 0x{other:04x}"))),
    };
    let pad = |v: &[u8]| -> Result<Vec<u8>, AttestationError> {
        let start = v.iter().position(|&b| b != 0).unwrap_or(v.len());
        let v = &v[start..];
        if v.len() > size {
            return Err(bad("coordinate too long".into()));
        }
        let mut out = vec![0; size - v.len()];
        out.extend_from_slice(v);
        Ok(out)
    };
    let mut point = vec![0x04];
    point.extend(pad(x)?);
    point.extend(pad(y)?);
    // (Z, x(Q_e), y(Q_e)), each `size` octets.
    let (z, ephemeral_x, ephemeral_y) = if curve == ECC_NIST_P256 {
        let ek = p256::PublicKey::from_sec1_bytes(&point).map_err(|e| bad(e.to_string()))?;
        let secret = loop {
            if let Ok(key) = p256::SecretKey::from_slice(&random(32)?) {
                break key;
            }
        };
        let shared = (ek.to_projective() * *secret.to_nonzero_scalar()).to_affine();
        let shared = shared.to_sec1_point(false);
        let ephemeral = secret.public_key().to_sec1_point(false);
        (
            coordinate(shared.x())?,
            coordinate(ephemeral.x())?,
            coordinate(ephemeral.y())?,
        )
    } else {
        let ek = p384::PublicKey::from_sec1_bytes(&point).map_err(|e| bad(e.to_string()))?;
        let secret = loop {
            if let Ok(key) = p384::SecretKey::from_slice(&random(48)?) {
                break key;
            }
        };
        let shared = (ek.to_projective() * *secret.to_nonzero_scalar()).to_affine();
        let shared = shared.to_sec1_point(false);
        let ephemeral = secret.public_key().to_sec1_point(false);
        (
            coordinate(shared.x())?,
            coordinate(ephemeral.x())?,
            coordinate(ephemeral.y())?,
        )
    };
    let seed = kdf_e(
        name_alg,
        &z,
        b"IDENTITY",
        &ephemeral_x,
        &point[1..=size],
        digest_size * 8,
    );
    // TPMS_ECC_POINT { TPM2B x, TPM2B y }.
    let mut secret = tpm2b(&ephemeral_x)?;
    secret.extend(tpm2b(&ephemeral_y)?);
    Ok((seed, secret))
}

fn coordinate<T: AsRef<[u8]>>(c: Option<&T>) -> Result<Vec<u8>, AttestationError> {
    c.map(|c| c.as_ref().to_vec())
        .ok_or_else(|| AttestationError::Credential("the point at infinity".into()))
}

/// The TPM key in a SubjectPublicKeyInfo (RSA, EC P-256, EC P-384).
fn tpm_key_of_spki(spki_der: &[u8]) -> Result<TpmKey, AttestationError> {
    use rsa::pkcs8::DecodePublicKey;
    use rsa::traits::PublicKeyParts;
    let bad = |e: String| AttestationError::Credential(format!("EK certificate key: {e}"));
    if let Ok(key) = rsa::PublicKey::from_public_key_der(spki_der) {
        let exponent = key.e().to_be_bytes();
        let exponent = exponent
            .iter()
            .skip_while(|&&b| b == 0)
            .try_fold(0u32, |acc, &b| {
                acc.checked_mul(256).map(|v| v | u32::from(b))
            })
            .ok_or_else(|| bad("RSA exponent over 32 bits".into()))?;
        let modulus = key.n().to_be_bytes();
        let start = modulus.iter().position(|&b| b != 0).unwrap_or(0);
        return Ok(TpmKey::Rsa {
            modulus: modulus[start..].to_vec(),
            exponent,
        });
    }
    if let Ok(key) = p256::PublicKey::from_public_key_der(spki_der) {
        let point = key.to_sec1_point(false);
        return Ok(TpmKey::Ecc {
            curve: ECC_NIST_P256,
            x: coordinate(point.x())?,
            y: coordinate(point.y())?,
        });
    }
    if let Ok(key) = p384::PublicKey::from_public_key_der(spki_der) {
        let point = key.to_sec1_point(false);
        return Ok(TpmKey::Ecc {
            curve: ECC_NIST_P384,
            x: coordinate(point.x())?,
            y: coordinate(point.y())?,
        });
    }
    Err(bad(
        "not an RSA, EC P-256 or EC P-384 SubjectPublicKeyInfo".into()
    ))
}

/// The AES key bits of an EK's TPMT_PUBLIC symmetric definition (parameters follow the
/// authPolicy: TPMT_SYM_DEF_OBJECT first for both RSA and ECC storage keys).
fn symmetric_of(public: &[u8]) -> Result<u16, AttestationError> {
    let bad = || AttestationError::Credential("ekPublic: truncated".into());
    let u16_at = |at: usize| -> Result<u16, AttestationError> {
        public
            .get(at..at + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(bad)
    };
    let kind = u16_at(0)?;
    if kind != ALG_RSA && kind != ALG_ECC {
        return Err(AttestationError::Credential(format!(
            "ekPublic type 0x{kind:04x} is neither RSA nor ECC"
        )));
    }
    // type, nameAlg, objectAttributes, then authPolicy (TPM2B).
    let policy_size = usize::from(u16_at(8)?);
    let at = 10 + policy_size;
    match u16_at(at)? {
        ALG_AES => match u16_at(at + 2)? {
            bits @ (128 | 256) => Ok(bits),
            other => Err(AttestationError::Credential(format!(
                "ekPublic: AES-{other}"
            ))),
        },
        ALG_NULL => Err(AttestationError::Credential(
            "ekPublic has no symmetric algorithm: not a storage (endorsement) key".into(),
        )),
        other => Err(AttestationError::Credential(format!(
            "ekPublic symmetric algorithm 0x{other:04x} (AES required)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kdf_a_lengths_and_determinism() {
        let a = kdf_a(NameAlg::Sha256, b"seed", b"STORAGE", b"name", &[], 128);
        assert_eq!(a.len(), 16);
        assert_eq!(
            a,
            kdf_a(NameAlg::Sha256, b"seed", b"STORAGE", b"name", &[], 128)
        );
        let long = kdf_a(NameAlg::Sha256, b"seed", b"INTEGRITY", &[], &[], 512);
        assert_eq!(long.len(), 64);
        assert_ne!(
            kdf_a(NameAlg::Sha256, b"seed", b"STORAGE", b"name", &[], 256)[..16],
            a[..],
            "the bit count is part of the input"
        );
    }

    #[test]
    fn credential_size_is_bounded() {
        let ek = EndorsementKey {
            key: TpmKey::Ecc {
                curve: ECC_NIST_P256,
                x: vec![1],
                y: vec![2],
            },
            name_alg: NameAlg::Sha256,
            sym_key_bits: 128,
        };
        assert!(matches!(
            make_credential(&ek, b"\x00\x0bname", &[0; 33]),
            Err(AttestationError::Credential(_))
        ));
        // Not a point on the curve.
        assert!(matches!(
            make_credential(&ek, b"\x00\x0bname", &[0; 32]),
            Err(AttestationError::Credential(_))
        ));
    }

    #[test]
    fn hostile_public_areas_do_not_panic() {
        let mut seed = 0x9e37_79b9u32;
        for len in 0..200 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                    (seed >> 16) as u8
                })
                .collect();
            let _ = parse_attestation_key(&bytes);
            let _ = symmetric_of(&bytes);
            let _ = parse_tpm2b(&bytes);
        }
    }
}
