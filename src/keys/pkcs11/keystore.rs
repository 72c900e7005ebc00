//! [`KeyStore`] on a PKCS#11 token: each operation is a closure run by
//! `Pkcs11KeyStore::with_session` on a pooled session inside the gate.

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, ObjectClass};

use super::objects::{
    ensure_logged_in, key_algorithm, object_selector, public_key_der, sign_mechanism, P256_PARAMS,
    P384_PARAMS,
};
use super::store::{OpError, Pkcs11KeyStore};
use crate::keys::{
    ecdsa_raw_to_der, BackendKind, ErasureRecord, KeyAlgorithm, KeyError, KeyInfo, KeyRef, KeySpec,
    KeyStore, PublicKey, SignatureScheme,
};

impl KeyStore for Pkcs11KeyStore {
    fn kind(&self) -> BackendKind {
        BackendKind::Pkcs11
    }

    fn device(&self) -> String {
        let entered = self.library.enter();
        let Ok(located) = self.locate(&entered) else {
            return format!("{} (not present)", self.device_name());
        };
        match entered.pkcs11().get_token_info(located.slot) {
            Ok(info) => format!(
                "PKCS#11 token '{}' serial {} ({} {}, module {})",
                info.label().trim_end(),
                located.serial,
                info.manufacturer_id().trim_end(),
                info.model().trim_end(),
                self.library.module().display()
            ),
            Err(_) => format!("{} serial {}", self.device_name(), located.serial),
        }
    }

    fn generate(&self, spec: &KeySpec) -> Result<KeyInfo, KeyError> {
        if spec.label.is_empty() {
            return Err(KeyError::InvalidArgument("a key label is required".into()));
        }
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).map_err(|e| KeyError::Encoding(format!("random id: {e}")))?;
        let label = spec.label.as_bytes().to_vec();
        self.with_session("C_GenerateKeyPair", |call| {
            let uri = self.uri_for(call.located, &spec.label, &id);
            let session = call.session;
            let existing = session.find_objects(&[Attribute::Label(label.clone())])?;
            if !existing.is_empty() {
                return Err(OpError::Key(KeyError::AlreadyExists(format!(
                    "an object labelled '{}' is already on the token",
                    spec.label
                ))));
            }
            let mut public = vec![
                Attribute::Token(true),
                Attribute::Private(false),
                Attribute::Verify(true),
                Attribute::Label(label.clone()),
                Attribute::Id(id.to_vec()),
            ];
            // Private keys: on the token, behind login, never readable, never exportable.
            let private = vec![
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Sign(true),
                Attribute::Derive(false),
                Attribute::Label(label.clone()),
                Attribute::Id(id.to_vec()),
            ];
            let mechanism = match spec.algorithm {
                KeyAlgorithm::EcP256 | KeyAlgorithm::EcP384 => {
                    let params = if spec.algorithm == KeyAlgorithm::EcP256 {
                        P256_PARAMS
                    } else {
                        P384_PARAMS
                    };
                    public.push(Attribute::EcParams(params.to_vec()));
                    Mechanism::EccKeyPairGen
                }
                KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 => {
                    let bits = u64::from(spec.algorithm.rsa_bits().unwrap_or(2048));
                    public.push(Attribute::ModulusBits(bits.into()));
                    public.push(Attribute::PublicExponent(vec![0x01, 0x00, 0x01]));
                    Mechanism::RsaPkcsKeyPairGen
                }
            };
            let (_, private_handle) = session.generate_key_pair(&mechanism, &public, &private)?;
            let spki = public_key_der(session, &uri, private_handle, spec.algorithm)?;
            self.remember(
                &uri,
                call.entered.generation(),
                private_handle,
                spec.algorithm,
            );
            Ok(KeyInfo {
                reference: KeyRef::Pkcs11(uri),
                label: spec.label.clone(),
                public_key: PublicKey {
                    algorithm: spec.algorithm,
                    spki_der: spki,
                },
            })
        })
    }

    fn public_key(&self, key: &KeyRef) -> Result<PublicKey, KeyError> {
        let uri = self.own_uri(key)?;
        self.with_session("C_GetAttributeValue", |call| {
            let found = self.find_private(call, uri)?;
            let spki = match public_key_der(call.session, uri, found.private, found.algorithm) {
                // An empty search for the public object is no proof either: SoftHSM answers
                // one when its token directory is gone or it cannot open files (EMFILE).
                // Decide as for the private key: a token that does not answer, or a key
                // found before, means re-initialize and look again.
                Err(OpError::Key(KeyError::NotFound(_))) => return Err(self.missing(call, uri)),
                other => other?,
            };
            Ok(PublicKey {
                algorithm: found.algorithm,
                spki_der: spki,
            })
        })
    }

    fn sign(
        &self,
        key: &KeyRef,
        scheme: SignatureScheme,
        message: &[u8],
    ) -> Result<Vec<u8>, KeyError> {
        let uri = self.own_uri(key)?;
        // Hash once, outside the retry loop.
        let digest = scheme
            .is_ecdsa()
            .then(|| scheme.hash_algorithm().digest(message));
        let mechanism = sign_mechanism(scheme);
        self.with_session("C_Sign", |call| {
            let found = self.find_private(call, uri)?;
            if !scheme.fits(found.algorithm) {
                return Err(OpError::Key(KeyError::InvalidArgument(format!(
                    "{scheme} does not fit the {} key {uri}",
                    found.algorithm
                ))));
            }
            let data = digest.as_deref().unwrap_or(message);
            let signature = call.session.sign(&mechanism, found.private, data)?;
            if scheme.is_ecdsa() {
                Ok(ecdsa_raw_to_der(&signature)?)
            } else {
                Ok(signature)
            }
        })
    }

    fn destroy(&self, key: &KeyRef) -> Result<ErasureRecord, KeyError> {
        let uri = self.own_uri(key)?;
        let selector = object_selector(uri);
        let device = self.device();
        let record = self.with_session("C_DestroyObject", |call| {
            Self::check_serial(call, uri)?;
            let session = call.session;
            // Logged out, the private key would be invisible and "verified gone" a lie.
            ensure_logged_in(session)?;
            let objects = session.find_objects(&selector)?;
            if objects.is_empty() {
                // An empty search on a token that does not answer is not "nothing to erase".
                return Err(match self.missing(call, uri) {
                    OpError::Stale(reason) => OpError::Stale(reason),
                    _ => OpError::Key(KeyError::NotFound(uri.to_string())),
                });
            }
            let mut kinds = Vec::new();
            for object in objects {
                let class = session
                    .get_attributes(object, &[AttributeType::Class])?
                    .into_iter()
                    .find_map(|a| match a {
                        Attribute::Class(c) => Some(c),
                        _ => None,
                    });
                session.destroy_object(object)?;
                kinds.push(match class {
                    Some(c) if c == ObjectClass::PRIVATE_KEY => "private key",
                    Some(c) if c == ObjectClass::PUBLIC_KEY => "public key",
                    Some(c) if c == ObjectClass::SECRET_KEY => "secret key",
                    Some(c) if c == ObjectClass::CERTIFICATE => "certificate",
                    Some(c) if c == ObjectClass::DATA => "data object",
                    _ => "object",
                });
            }
            // Look again, with a fresh search: the erasure record says what we saw.
            let remaining = session.find_objects(&selector)?;
            Ok(ErasureRecord::new(
                uri.to_string(),
                kinds.join(", "),
                device.clone(),
                remaining.is_empty(),
            ))
        })?;
        self.forget(uri);
        Ok(record)
    }

    fn list(&self) -> Result<Vec<KeyInfo>, KeyError> {
        self.with_session("C_FindObjects", |call| {
            let session = call.session;
            ensure_logged_in(session)?;
            let privates = session.find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])?;
            if privates.is_empty() {
                // An empty token, or one that cannot read its files: ask it.
                if let Err(e) = call.entered.pkcs11().get_token_info(call.located.slot) {
                    return Err(OpError::Ck(e));
                }
            }
            let mut keys = Vec::with_capacity(privates.len());
            for private in privates {
                let attributes =
                    session.get_attributes(private, &[AttributeType::Label, AttributeType::Id])?;
                let (mut label, mut id) = (String::new(), Vec::new());
                for attribute in attributes {
                    match attribute {
                        Attribute::Label(l) => label = String::from_utf8_lossy(&l).into_owned(),
                        Attribute::Id(i) => id = i,
                        _ => {}
                    }
                }
                let Ok(algorithm) = key_algorithm(session, private) else {
                    continue; // keys of other types on a shared token are not ours to list
                };
                let uri = self.uri_for(call.located, &label, &id);
                let spki = public_key_der(session, &uri, private, algorithm)?;
                keys.push(KeyInfo {
                    reference: KeyRef::Pkcs11(uri),
                    label,
                    public_key: PublicKey {
                        algorithm,
                        spki_der: spki,
                    },
                });
            }
            keys.sort_by(|a, b| a.label.cmp(&b.label));
            Ok(keys)
        })
    }
}
