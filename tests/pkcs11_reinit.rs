//! A token re-initialized under a running agent: a clear error, then recovery once the key
//! is back. In a process of its own, because recovery may re-initialize the library.

mod common;

use common::softhsm::{config_for, process_tokens};
use common::suite;
use nfv_warden::keys::pkcs11::Pkcs11KeyStore;
use nfv_warden::keys::{KeyAlgorithm, KeyError, KeySpec, KeyStore, SignatureScheme};

#[test]
fn token_reinitialized_under_a_running_agent() {
    let tokens = process_tokens();
    let label = "test-token-0";
    let config = config_for(label, tokens.dir.path().join(format!("{label}.pin")), 2);
    let store = Pkcs11KeyStore::open(&config).expect("open");
    let spec = KeySpec {
        label: "ca".into(),
        algorithm: KeyAlgorithm::EcP256,
    };
    let key = store.generate(&spec).expect("generate");
    store
        .sign(&key.reference, SignatureScheme::EcdsaSha256, b"before")
        .expect("sign before");

    // Another process wipes and re-initializes the token (same label, same PIN).
    tokens.dir.reinit_token(label, "1234");

    let err = store
        .sign(&key.reference, SignatureScheme::EcdsaSha256, b"during")
        .expect_err("the key is gone with the old token");
    eprintln!("error while the key is gone: {err}");
    assert!(
        matches!(
            err,
            KeyError::NotFound(_) | KeyError::Unavailable { .. } | KeyError::TokenNotFound(_)
        ),
        "a clear error, got {err:?}"
    );

    // The operator restores the key under the same name; the running store finds it again.
    let restored = store
        .generate(&spec)
        .expect("generate again on the new token");
    let by_name: nfv_warden::keys::KeyRef = format!("pkcs11:token={label};object=ca")
        .parse()
        .expect("uri");
    let sig = store
        .sign(&by_name, SignatureScheme::EcdsaSha256, b"after")
        .expect("signs again once the key is back");
    suite::verify(
        &restored.public_key.spki_der,
        SignatureScheme::EcdsaSha256,
        b"after",
        &sig,
    );
    eprintln!("recovery: {:?}", store.recovery_stats());
}
