//! Adapters that make any key of any backend usable where the ecosystem expects a signer:
//! the x509-cert 0.3 builder (certificates, CSRs, CRLs signed by a CA key in the HSM/TPM)
//! and rustls (the agent's own TLS key in the HSM/TPM).
//!
//! rustls calls `Signer::sign` synchronously inside the handshake; the call goes to the key
//! layer, which blocks on a pooled PKCS#11 session or on the TPM thread. That is a fraction of
//! a millisecond on an HSM and about a millisecond on a TPM, the cost of a hardware key.

use std::fmt;
use std::sync::Arc;

use der::asn1::BitString;
use der::Any;
use spki::{AlgorithmIdentifierOwned, ObjectIdentifier};

use super::{KeyAlgorithm, KeyError, KeyRef, KeyStore, PublicKey, SignatureScheme};

/// A hardware-held key with the scheme it signs X.509 objects with.
#[derive(Clone)]
pub struct HardwareKey {
    store: Arc<dyn KeyStore>,
    key: KeyRef,
    public: PublicKey,
    scheme: SignatureScheme,
}

impl fmt::Debug for HardwareKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HardwareKey")
            .field("key", &self.key.to_string())
            .field("algorithm", &self.public.algorithm)
            .field("scheme", &self.scheme)
            .finish()
    }
}

impl HardwareKey {
    /// Read the public key from the device; the X.509 scheme defaults to the key's own
    /// (ECDSA with the curve's hash, RSA PKCS#1 v1.5 with SHA-256).
    pub fn new(store: Arc<dyn KeyStore>, key: KeyRef) -> Result<HardwareKey, KeyError> {
        let public = store.public_key(&key)?;
        let scheme = public.algorithm.default_scheme();
        Ok(HardwareKey {
            store,
            key,
            public,
            scheme,
        })
    }

    /// Sign X.509 objects with `scheme` instead (e.g. RSA-PSS).
    pub fn with_scheme(mut self, scheme: SignatureScheme) -> Result<HardwareKey, KeyError> {
        if !scheme.fits(self.public.algorithm) {
            return Err(KeyError::InvalidArgument(format!(
                "{scheme} does not fit a {} key",
                self.public.algorithm
            )));
        }
        self.scheme = scheme;
        Ok(self)
    }

    pub fn key_ref(&self) -> &KeyRef {
        &self.key
    }

    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    pub fn scheme(&self) -> SignatureScheme {
        self.scheme
    }

    /// Sign with the X.509 scheme.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        self.store.sign(&self.key, self.scheme, message)
    }

    /// This key as a rustls signing key, for `CertifiedKey::new`.
    pub fn into_rustls(self) -> Arc<dyn rustls::sign::SigningKey> {
        Arc::new(self)
    }
}

/// The AlgorithmIdentifier of a signature scheme (RFC 5758 3.2, RFC 4055 5 and 3.1).
pub fn signature_algorithm_identifier(
    scheme: SignatureScheme,
) -> spki::Result<AlgorithmIdentifierOwned> {
    const ECDSA_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
    const ECDSA_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.3");
    const RSA_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.11");
    const RSA_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.12");
    let no_params = |oid| AlgorithmIdentifierOwned {
        oid,
        parameters: None,
    };
    // RSA PKCS#1 v1.5 identifiers carry an explicit NULL (RFC 4055 5).
    let null_params = |oid| AlgorithmIdentifierOwned {
        oid,
        parameters: Some(Any::null()),
    };
    Ok(match scheme {
        SignatureScheme::EcdsaSha256 => no_params(ECDSA_SHA256),
        SignatureScheme::EcdsaSha384 => no_params(ECDSA_SHA384),
        SignatureScheme::RsaPkcs1Sha256 => null_params(RSA_SHA256),
        SignatureScheme::RsaPkcs1Sha384 => null_params(RSA_SHA384),
        SignatureScheme::RsaPssSha256 => {
            rsa::pss::get_default_pss_signature_algo_id::<sha2::Sha256>()?
        }
        SignatureScheme::RsaPssSha384 => {
            rsa::pss::get_default_pss_signature_algo_id::<sha2::Sha384>()?
        }
    })
}

/// A SubjectPublicKeyInfo as the x509-cert builder wants a verifying key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpkiPublicKey(pub Vec<u8>);

impl spki::EncodePublicKey for SpkiPublicKey {
    fn to_public_key_der(&self) -> spki::Result<der::Document> {
        Ok(der::Document::try_from(self.0.as_slice())?)
    }
}

/// A signature in X.509 encoding (DER ECDSA or raw RSA), as the builder embeds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HardwareSignature(pub Vec<u8>);

impl spki::SignatureBitStringEncoding for HardwareSignature {
    fn to_bitstring(&self) -> der::Result<BitString> {
        BitString::from_bytes(&self.0)
    }
}

impl signature::Keypair for HardwareKey {
    type VerifyingKey = SpkiPublicKey;
    fn verifying_key(&self) -> SpkiPublicKey {
        SpkiPublicKey(self.public.spki_der.clone())
    }
}

impl spki::DynSignatureAlgorithmIdentifier for HardwareKey {
    fn signature_algorithm_identifier(&self) -> spki::Result<AlgorithmIdentifierOwned> {
        signature_algorithm_identifier(self.scheme)
    }
}

impl signature::Signer<HardwareSignature> for HardwareKey {
    fn try_sign(&self, message: &[u8]) -> Result<HardwareSignature, signature::Error> {
        self.sign(message).map(HardwareSignature).map_err(|e| {
            if crate::log_limit::allow("signer.x509") {
                tracing::error!(key = %self.key, error = %e, "X.509 signing failed");
            }
            signature::Error::from_source(e)
        })
    }
}

// rustls

impl rustls::sign::SigningKey for HardwareKey {
    fn choose_scheme(
        &self,
        offered: &[rustls::SignatureScheme],
    ) -> Option<Box<dyn rustls::sign::Signer>> {
        use rustls::SignatureScheme as Tls;
        // Our preference first; TLS 1.3 allows only PSS for RSA and the curve's hash for
        // ECDSA, and rustls offers only what the negotiated version allows.
        let preferences: &[(Tls, SignatureScheme)] = match self.public.algorithm {
            KeyAlgorithm::EcP256 => &[(Tls::ECDSA_NISTP256_SHA256, SignatureScheme::EcdsaSha256)],
            KeyAlgorithm::EcP384 => &[(Tls::ECDSA_NISTP384_SHA384, SignatureScheme::EcdsaSha384)],
            KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 => &[
                (Tls::RSA_PSS_SHA256, SignatureScheme::RsaPssSha256),
                (Tls::RSA_PSS_SHA384, SignatureScheme::RsaPssSha384),
                (Tls::RSA_PKCS1_SHA256, SignatureScheme::RsaPkcs1Sha256),
                (Tls::RSA_PKCS1_SHA384, SignatureScheme::RsaPkcs1Sha384),
            ],
        };
        preferences
            .iter()
            .find(|(tls, _)| offered.contains(tls))
            .map(|&(tls, scheme)| {
                Box::new(TlsSigner {
                    key: self.clone(),
                    tls,
                    scheme,
                }) as Box<dyn rustls::sign::Signer>
            })
    }

    fn public_key(&self) -> Option<rustls::pki_types::SubjectPublicKeyInfoDer<'_>> {
        Some(rustls::pki_types::SubjectPublicKeyInfoDer::from(
            self.public.spki_der.as_slice(),
        ))
    }

    fn algorithm(&self) -> rustls::SignatureAlgorithm {
        if self.public.algorithm.is_rsa() {
            rustls::SignatureAlgorithm::RSA
        } else {
            rustls::SignatureAlgorithm::ECDSA
        }
    }
}

struct TlsSigner {
    key: HardwareKey,
    tls: rustls::SignatureScheme,
    scheme: SignatureScheme,
}

impl fmt::Debug for TlsSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSigner")
            .field("key", &self.key.key.to_string())
            .field("scheme", &self.tls)
            .finish()
    }
}

impl rustls::sign::Signer for TlsSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        self.key
            .store
            .sign(&self.key.key, self.scheme, message)
            .map_err(|e| {
                if crate::log_limit::allow("signer.tls") {
                    tracing::error!(key = %self.key.key, error = %e, "TLS handshake signature failed");
                }
                rustls::Error::General(format!("signing with {}: {e}", self.key.key))
            })
    }

    fn scheme(&self) -> rustls::SignatureScheme {
        self.tls
    }
}
