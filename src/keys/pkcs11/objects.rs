//! Object templates and attribute decoding: what a key is, its public key, the mechanism of a
//! signature scheme. Pure functions of a session the caller holds inside the gate.

use cryptoki::context::Function;
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use spki::EncodePublicKey;

use super::store::OpError;
use crate::keys::{KeyAlgorithm, KeyError, Pkcs11Uri, SignatureScheme};

/// DER of the named-curve OIDs for CKA_EC_PARAMS (RFC 5480).
pub(super) const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
pub(super) const P384_PARAMS: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];

/// Attributes read back from a private key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrivateKeyAttributes {
    pub extractable: bool,
    pub sensitive: bool,
    pub never_extractable: bool,
    pub always_sensitive: bool,
    pub token: bool,
    pub private: bool,
}

impl PrivateKeyAttributes {
    pub(super) const TYPES: [AttributeType; 6] = [
        AttributeType::Extractable,
        AttributeType::Sensitive,
        AttributeType::NeverExtractable,
        AttributeType::AlwaysSensitive,
        AttributeType::Token,
        AttributeType::Private,
    ];

    pub(super) fn from_attributes(attributes: Vec<Attribute>) -> PrivateKeyAttributes {
        let mut out = PrivateKeyAttributes::default();
        for attribute in attributes {
            match attribute {
                Attribute::Extractable(v) => out.extractable = v,
                Attribute::Sensitive(v) => out.sensitive = v,
                Attribute::NeverExtractable(v) => out.never_extractable = v,
                Attribute::AlwaysSensitive(v) => out.always_sensitive = v,
                Attribute::Token(v) => out.token = v,
                Attribute::Private(v) => out.private = v,
                _ => {}
            }
        }
        out
    }
}

/// Fail with CKR_USER_NOT_LOGGED_IN (the ladder's second rung) when the session cannot see
/// private objects, e.g. after another part of the process called C_Logout.
pub(super) fn ensure_logged_in(session: &Session) -> Result<(), OpError> {
    use cryptoki::session::SessionState;
    let state = session.get_session_info()?.session_state();
    if matches!(state, SessionState::RwUser | SessionState::RoUser) {
        Ok(())
    } else {
        Err(OpError::Ck(CkError::Pkcs11(
            RvError::UserNotLoggedIn,
            Function::GetSessionInfo,
        )))
    }
}

pub(super) fn object_selector(uri: &Pkcs11Uri) -> Vec<Attribute> {
    let mut template = Vec::new();
    if let Some(label) = &uri.object {
        template.push(Attribute::Label(label.as_bytes().to_vec()));
    }
    if let Some(id) = &uri.id {
        template.push(Attribute::Id(id.clone()));
    }
    template
}

pub(super) fn key_algorithm(session: &Session, key: ObjectHandle) -> Result<KeyAlgorithm, OpError> {
    let attributes = session.get_attributes(
        key,
        &[
            AttributeType::KeyType,
            AttributeType::EcParams,
            AttributeType::Modulus,
        ],
    )?;
    let mut key_type = None;
    let mut params = None;
    let mut modulus_len = None;
    for attribute in attributes {
        match attribute {
            Attribute::KeyType(t) => key_type = Some(t),
            Attribute::EcParams(p) => params = Some(p),
            Attribute::Modulus(m) => modulus_len = Some(m.len()),
            _ => {}
        }
    }
    match (key_type, params.as_deref(), modulus_len) {
        (Some(t), Some(P256_PARAMS), _) if t == KeyType::EC => Ok(KeyAlgorithm::EcP256),
        (Some(t), Some(P384_PARAMS), _) if t == KeyType::EC => Ok(KeyAlgorithm::EcP384),
        (Some(t), _, Some(256)) if t == KeyType::RSA => Ok(KeyAlgorithm::Rsa2048),
        (Some(t), _, Some(384)) if t == KeyType::RSA => Ok(KeyAlgorithm::Rsa3072),
        _ => Err(OpError::Key(KeyError::Unsupported(
            "a key that is not EC P-256/P-384 or RSA-2048/3072".into(),
        ))),
    }
}

/// SubjectPublicKeyInfo DER of the public key object matching `uri` (or, for RSA, the
/// public attributes of the private key when the token keeps no public object).
pub(super) fn public_key_der(
    session: &Session,
    uri: &Pkcs11Uri,
    private: ObjectHandle,
    algorithm: KeyAlgorithm,
) -> Result<Vec<u8>, OpError> {
    let mut template = vec![Attribute::Class(ObjectClass::PUBLIC_KEY)];
    template.extend(object_selector(uri));
    let public = session.find_objects(&template)?.into_iter().next();
    let encode_err = |e: &dyn std::fmt::Display| OpError::Key(KeyError::Encoding(e.to_string()));
    if algorithm.is_rsa() {
        let source = public.unwrap_or(private);
        let attributes = session.get_attributes(
            source,
            &[AttributeType::Modulus, AttributeType::PublicExponent],
        )?;
        let (mut n, mut e) = (None, None);
        for attribute in attributes {
            match attribute {
                Attribute::Modulus(m) => n = Some(m),
                Attribute::PublicExponent(x) => e = Some(x),
                _ => {}
            }
        }
        let (Some(n), Some(e)) = (n, e) else {
            return Err(OpError::Key(KeyError::Encoding(
                "RSA key without modulus or exponent".into(),
            )));
        };
        let key = rsa::PublicKey::new(
            rsa::BoxedUint::from_be_slice_vartime(&n),
            rsa::BoxedUint::from_be_slice_vartime(&e),
        )
        .map_err(|e| encode_err(&e))?;
        Ok(key
            .to_public_key_der()
            .map_err(|e| encode_err(&e))?
            .into_vec())
    } else {
        let public = public.ok_or_else(|| {
            OpError::Key(KeyError::NotFound(format!("public key object of {uri}")))
        })?;
        let attributes = session.get_attributes(public, &[AttributeType::EcPoint])?;
        let point = attributes
            .into_iter()
            .find_map(|a| match a {
                Attribute::EcPoint(p) => Some(p),
                _ => None,
            })
            .ok_or_else(|| {
                OpError::Key(KeyError::Encoding("EC key without CKA_EC_POINT".into()))
            })?;
        // CKA_EC_POINT is a DER OCTET STRING around the SEC1 point (PKCS#11 2.40 2.3.3).
        let sec1 = unwrap_octet_string(&point).unwrap_or(&point);
        let der = match algorithm {
            KeyAlgorithm::EcP256 => p256::PublicKey::from_sec1_bytes(sec1)
                .map_err(|e| encode_err(&e))?
                .to_public_key_der(),
            _ => p384::PublicKey::from_sec1_bytes(sec1)
                .map_err(|e| encode_err(&e))?
                .to_public_key_der(),
        };
        Ok(der.map_err(|e| encode_err(&e))?.into_vec())
    }
}

fn unwrap_octet_string(der: &[u8]) -> Option<&[u8]> {
    let (&tag, rest) = der.split_first()?;
    if tag != 0x04 {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, body) = match first {
        n if n < 0x80 => (usize::from(n), rest),
        0x81 => (usize::from(*rest.first()?), &rest[1..]),
        0x82 => (
            usize::from(*rest.first()?) << 8 | usize::from(*rest.get(1)?),
            &rest[2..],
        ),
        _ => return None,
    };
    (body.len() == len).then_some(body)
}

pub(super) fn sign_mechanism(scheme: SignatureScheme) -> Mechanism<'static> {
    let pss = |hash_alg, mgf, s_len: u64| PkcsPssParams {
        hash_alg,
        mgf,
        s_len: s_len.into(),
    };
    match scheme {
        SignatureScheme::EcdsaSha256 | SignatureScheme::EcdsaSha384 => Mechanism::Ecdsa,
        SignatureScheme::RsaPkcs1Sha256 => Mechanism::Sha256RsaPkcs,
        SignatureScheme::RsaPkcs1Sha384 => Mechanism::Sha384RsaPkcs,
        SignatureScheme::RsaPssSha256 => {
            Mechanism::Sha256RsaPkcsPss(pss(MechanismType::SHA256, PkcsMgfType::MGF1_SHA256, 32))
        }
        SignatureScheme::RsaPssSha384 => {
            Mechanism::Sha384RsaPkcsPss(pss(MechanismType::SHA384, PkcsMgfType::MGF1_SHA384, 48))
        }
    }
}
