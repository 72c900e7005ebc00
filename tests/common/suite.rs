//! The key-layer behaviour suite, run against every backend.

use nfv_warden::keys::{
    HashAlgorithm, KeyAlgorithm, KeyError, KeyRef, KeySpec, KeyStore, SignatureScheme,
};
use rsa::pkcs8::DecodePublicKey;
use signature::hazmat::PrehashVerifier;
use signature::Verifier;

/// Verify `signature` over `message` with RustCrypto, from the SPKI alone; panics naming the
/// scheme, the key and the signature when it does not verify.
pub fn verify(spki: &[u8], scheme: SignatureScheme, message: &[u8], signature: &[u8]) {
    if let Err(e) = check(spki, scheme, message, signature) {
        panic!(
            "{scheme} signature does not verify: {e}\n  SPKI {}\n  signature {}",
            hex(spki),
            hex(signature)
        );
    }
}

/// Whether `signature` verifies over `message` under `spki`, without panicking: negative
/// checks use this, so a failing test's captured output shows only real failures (a
/// `catch_unwind` around [`verify`] printed a "signature verifies" panic on every run,
/// and a CI failure caused by something else was once read as a bad signature).
pub fn verifies(spki: &[u8], scheme: SignatureScheme, message: &[u8], signature: &[u8]) -> bool {
    check(spki, scheme, message, signature).is_ok()
}

fn check(
    spki: &[u8],
    scheme: SignatureScheme,
    message: &[u8],
    signature: &[u8],
) -> Result<(), String> {
    let digest = scheme.hash_algorithm().digest(message);
    match scheme {
        SignatureScheme::EcdsaSha256 | SignatureScheme::EcdsaSha384 => {
            if let Ok(key) = p256::ecdsa::VerifyingKey::from_public_key_der(spki) {
                let sig = p256::ecdsa::Signature::from_der(signature).map_err(e("DER ECDSA"))?;
                key.verify_prehash(&digest, &sig)
                    .map_err(e("P-256 verification"))
            } else {
                let key = p384::ecdsa::VerifyingKey::from_public_key_der(spki)
                    .map_err(|e| format!("neither a P-256 nor a P-384 SPKI: {e}"))?;
                let sig = p384::ecdsa::Signature::from_der(signature).map_err(e("DER ECDSA"))?;
                key.verify_prehash(&digest, &sig)
                    .map_err(e("P-384 verification"))
            }
        }
        SignatureScheme::RsaPkcs1Sha256 | SignatureScheme::RsaPkcs1Sha384 => {
            let key =
                rsa::PublicKey::from_public_key_der(spki).map_err(|e| format!("RSA SPKI: {e}"))?;
            let sig = rsa::pkcs1v15::Signature::try_from(signature).map_err(e("signature"))?;
            if scheme.hash_algorithm() == HashAlgorithm::Sha256 {
                rsa::pkcs1v15::VerifyingKey::<sha2::Sha256>::new(key).verify(message, &sig)
            } else {
                rsa::pkcs1v15::VerifyingKey::<sha2::Sha384>::new(key).verify(message, &sig)
            }
            .map_err(e("RSA PKCS#1 v1.5 verification"))
        }
        SignatureScheme::RsaPssSha256 | SignatureScheme::RsaPssSha384 => {
            let key =
                rsa::PublicKey::from_public_key_der(spki).map_err(|e| format!("RSA SPKI: {e}"))?;
            let sig = rsa::pss::Signature::try_from(signature).map_err(e("signature"))?;
            // Salt as long as the hash: what TLS 1.3 (RFC 8446 4.2.3) requires.
            if scheme.hash_algorithm() == HashAlgorithm::Sha256 {
                rsa::pss::VerifyingKey::<sha2::Sha256>::new(key).verify(message, &sig)
            } else {
                rsa::pss::VerifyingKey::<sha2::Sha384>::new(key).verify(message, &sig)
            }
            .map_err(e("RSA-PSS verification"))
        }
    }
}

fn e(what: &'static str) -> impl Fn(signature::Error) -> String {
    move |e| format!("{what}: {e}")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every key type generated; every fitting scheme signs and verifies; a wrong scheme is
/// refused; list shows the keys; destroy erases and proves it.
pub fn generate_sign_verify_list_destroy(store: &dyn KeyStore, prefix: &str) -> Vec<KeyRef> {
    let message = b"IFA 033 11.2.3: certificate signing request";
    let mut refs = Vec::new();
    for algorithm in KeyAlgorithm::ALL {
        let info = store
            .generate(&KeySpec {
                label: format!("{prefix}-{algorithm}"),
                algorithm,
            })
            .unwrap_or_else(|e| panic!("generate {algorithm}: {e}"));
        assert_eq!(info.public_key.algorithm, algorithm);
        let reread = store.public_key(&info.reference).expect("public key");
        assert_eq!(
            reread, info.public_key,
            "public key read back equals generated"
        );
        for scheme in SignatureScheme::ALL {
            if scheme.fits(algorithm) {
                let signature = store
                    .sign(&info.reference, scheme, message)
                    .unwrap_or_else(|e| panic!("sign {algorithm} {scheme}: {e}"));
                verify(&info.public_key.spki_der, scheme, message, &signature);
                // A signature does not verify another message.
                assert!(
                    !verifies(&info.public_key.spki_der, scheme, b"other", &signature),
                    "{scheme} verified a different message"
                );
            } else {
                let err = store.sign(&info.reference, scheme, message).unwrap_err();
                assert!(
                    matches!(err, KeyError::InvalidArgument(_)),
                    "{scheme} on {algorithm}: {err}"
                );
            }
        }
        refs.push(info.reference);
    }
    let listed: Vec<KeyRef> = store
        .list()
        .expect("list")
        .into_iter()
        .map(|k| k.reference)
        .collect();
    for r in &refs {
        assert!(listed.contains(r), "{r} listed");
    }
    // Destroy the last one and prove it is gone.
    let gone = refs.pop().expect("four keys");
    let record = store.destroy(&gone).expect("destroy");
    assert!(record.verified, "erasure verified: {record:?}");
    assert_eq!(record.object, gone.to_string());
    assert!(!record.device.is_empty());
    assert!(matches!(
        store.public_key(&gone),
        Err(KeyError::NotFound(_))
    ));
    assert!(matches!(
        store.sign(&gone, SignatureScheme::RsaPkcs1Sha256, message),
        Err(KeyError::NotFound(_))
    ));
    assert!(!store
        .list()
        .expect("list")
        .iter()
        .any(|k| k.reference == gone));
    assert!(matches!(store.destroy(&gone), Err(KeyError::NotFound(_))));
    refs
}

/// Keys made before a restart still sign after it.
pub fn still_there(store: &dyn KeyStore, refs: &[KeyRef]) {
    let listed: Vec<KeyRef> = store
        .list()
        .expect("list")
        .into_iter()
        .map(|k| k.reference)
        .collect();
    for r in refs {
        assert!(listed.contains(r), "{r} still listed after restart");
        let public = store.public_key(r).expect("public key after restart");
        let scheme = public.algorithm.default_scheme();
        let sig = store
            .sign(r, scheme, b"after restart")
            .expect("sign after restart");
        verify(&public.spki_der, scheme, b"after restart", &sig);
    }
}
