//! PKCS#11 backend against a real SoftHSM2 token.

mod common;

use std::sync::Arc;

use common::softhsm::{config_for, fresh_token, process_tokens};
use common::suite;
use nfv_warden::keys::pkcs11::Pkcs11KeyStore;
use nfv_warden::keys::{KeyAlgorithm, KeyError, KeyRef, KeySpec, KeyStore, SignatureScheme};

#[test]
fn behaviour_suite() {
    let config = fresh_token("suite");
    let store = Pkcs11KeyStore::open(&config).expect("open token");
    let refs = suite::generate_sign_verify_list_destroy(&store, "suite");
    drop(store);
    // The "agent restart": a new store on the same token.
    let store = Pkcs11KeyStore::open(&config).expect("reopen token");
    suite::still_there(&store, &refs);
}

#[test]
fn private_keys_are_not_extractable() {
    let config = fresh_token("attrs");
    let store = Pkcs11KeyStore::open(&config).expect("open");
    for algorithm in [KeyAlgorithm::EcP256, KeyAlgorithm::Rsa2048] {
        let key = store
            .generate(&KeySpec {
                label: format!("k-{algorithm}"),
                algorithm,
            })
            .expect("generate");
        let attrs = store
            .private_key_attributes(&key.reference)
            .expect("attributes");
        assert!(!attrs.extractable, "CKA_EXTRACTABLE false");
        assert!(attrs.sensitive, "CKA_SENSITIVE true");
        assert!(attrs.never_extractable, "CKA_NEVER_EXTRACTABLE true");
        assert!(attrs.always_sensitive, "CKA_ALWAYS_SENSITIVE true");
        assert!(
            attrs.token && attrs.private,
            "CKA_TOKEN and CKA_PRIVATE true"
        );
        let value = store.read_private_value(&key.reference);
        assert!(
            value.is_err(),
            "CKA_VALUE of a private key must not be readable: {value:?}"
        );
    }
}

#[test]
fn eight_tasks_sign_at_once_through_the_pool() {
    let mut config = fresh_token("pool");
    config.pool_size = 2; // fewer sessions than signers: callers wait, none fails
    let store = Arc::new(Pkcs11KeyStore::open(&config).expect("open"));
    let key = store
        .generate(&KeySpec {
            label: "pool".into(),
            algorithm: KeyAlgorithm::EcP256,
        })
        .expect("generate");
    let spki = key.public_key.spki_der.clone();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let store = store.clone();
            let key = key.reference.clone();
            let spki = spki.clone();
            std::thread::spawn(move || {
                for i in 0..50 {
                    let message = format!("task {t} message {i}");
                    let sig = store
                        .sign(&key, SignatureScheme::EcdsaSha256, message.as_bytes())
                        .expect("sign");
                    suite::verify(
                        &spki,
                        SignatureScheme::EcdsaSha256,
                        message.as_bytes(),
                        &sig,
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("signer thread");
    }
}

#[test]
fn sessions_closed_under_the_agent_are_replaced() {
    let config = fresh_token("closed");
    let store = Pkcs11KeyStore::open(&config).expect("open");
    let key = store
        .generate(&KeySpec {
            label: "k".into(),
            algorithm: KeyAlgorithm::EcP256,
        })
        .expect("generate");
    store
        .sign(&key.reference, SignatureScheme::EcdsaSha256, b"before")
        .expect("sign");
    // Close every session of the token from another handle on the same library. This also
    // logs the application out of the token (PKCS#11 5.6: C_CloseAllSessions).
    let slot = store.slot_id().expect("slot");
    unsafe {
        let raw = cryptoki_sys::Pkcs11::new(common::softhsm::MODULE).expect("dlopen");
        let rv = raw.C_CloseAllSessions(slot.id());
        assert_eq!(rv, cryptoki_sys::CKR_OK);
    }
    let sig = store
        .sign(&key.reference, SignatureScheme::EcdsaSha256, b"after")
        .expect("the next sign works");
    let stats = store.recovery_stats();
    assert!(
        stats.sessions_replaced >= 1,
        "a dead session was replaced: {stats:?}"
    );
    suite::verify(
        &key.public_key.spki_der,
        SignatureScheme::EcdsaSha256,
        b"after",
        &sig,
    );
}

#[test]
fn unknown_key_reference_is_not_found() {
    let config = fresh_token("unknown");
    let store = Pkcs11KeyStore::open(&config).expect("open");
    let label = config.token_label.clone().expect("label");
    let key: KeyRef = format!("pkcs11:token={label};object=nope")
        .parse()
        .expect("uri");
    assert!(matches!(
        store.sign(&key, SignatureScheme::EcdsaSha256, b"x"),
        Err(KeyError::NotFound(_))
    ));
    let other: KeyRef = "pkcs11:token=another-token;object=nope"
        .parse()
        .expect("uri");
    assert!(matches!(
        store.public_key(&other),
        Err(KeyError::WrongBackend(_))
    ));
    let tpm: KeyRef = "tpm:handle=0x81000100".parse().expect("tpm ref");
    assert!(matches!(
        store.destroy(&tpm),
        Err(KeyError::WrongBackend(_))
    ));
}

#[test]
fn duplicate_label_is_refused() {
    let config = fresh_token("dup");
    let store = Pkcs11KeyStore::open(&config).expect("open");
    let spec = KeySpec {
        label: "same".into(),
        algorithm: KeyAlgorithm::EcP256,
    };
    store.generate(&spec).expect("first");
    assert!(matches!(
        store.generate(&spec),
        Err(KeyError::AlreadyExists(_))
    ));
}

#[test]
fn wrong_pin_fails_once_and_is_not_retried() {
    let config = fresh_token("pin");
    let wrong = process_tokens().dir.path().join("wrong.pin");
    std::fs::write(&wrong, "0000\n").expect("write");
    let label = config.token_label.clone().expect("label");
    let bad = config_for(&label, wrong, 2);
    let err = Pkcs11KeyStore::open(&bad).err().expect("wrong PIN refused");
    assert!(matches!(err, KeyError::PinIncorrect { .. }), "{err}");
    // SoftHSM counts failed logins; one attempt per open, never a loop. The right PIN still
    // works, so the token was not locked by retries.
    let store = Pkcs11KeyStore::open(&config).expect("right PIN opens");
    store
        .generate(&KeySpec {
            label: "after".into(),
            algorithm: KeyAlgorithm::EcP256,
        })
        .expect("works");
}

#[test]
fn missing_pin_file_is_a_clear_error() {
    let mut config = fresh_token("missing");
    config.pin = nfv_warden::config::SecretSource::File("/nonexistent/warden.pin".into());
    let err = Pkcs11KeyStore::open(&config)
        .err()
        .expect("missing PIN file");
    assert!(err.to_string().contains("/nonexistent/warden.pin"), "{err}");
    // A missing token re-initializes the process-wide library before it is reported
    // missing: that is tested in pkcs11_reinit.rs, whose tests take turns, not here beside
    // tests that call the library from outside the agent's gate.
}
