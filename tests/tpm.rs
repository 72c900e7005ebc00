//! TPM backend against a real swtpm (one per test).

mod common;

use std::time::Instant;

use common::swtpm::Swtpm;
use nfv_warden::config::TpmConfig;
use nfv_warden::keys::tpm::TpmKeyStore;
use nfv_warden::keys::{
    KeyAlgorithm, KeyError, KeyRef, KeySpec, KeyStore, PublicKey, SignatureScheme, TpmHandle,
};

const MESSAGE: &[u8] = b"nfv-warden TPM test message";

fn config(tcti: &str) -> TpmConfig {
    common::swtpm::tpm_config(tcti)
}

fn open(tpm: &Swtpm) -> TpmKeyStore {
    TpmKeyStore::open(&config(&tpm.tcti())).expect("open TPM key store")
}

fn generate(store: &TpmKeyStore, algorithm: KeyAlgorithm) -> (KeyRef, PublicKey) {
    let info = store
        .generate(&KeySpec {
            label: format!("test-{algorithm}"),
            algorithm,
        })
        .expect("generate");
    assert_eq!(info.public_key.algorithm, algorithm);
    assert_eq!(info.label, format!("test-{algorithm}"));
    (info.reference, info.public_key)
}

/// Verify with RustCrypto (the shared suite's verifier: DER ECDSA, PKCS#1 v1.5, PSS with
/// salt length = hash length as TLS 1.3 requires).
fn verify(public: &PublicKey, scheme: SignatureScheme, message: &[u8], signature: &[u8]) {
    common::suite::verify(&public.spki_der, scheme, message, signature);
}

#[test]
fn behaviour_suite() {
    let tpm = Swtpm::start();
    let store = open(&tpm);
    let refs = common::suite::generate_sign_verify_list_destroy(&store, "suite");
    drop(store);
    // The "agent restart": a new store on the same TPM.
    let store = open(&tpm);
    common::suite::still_there(&store, &refs);
    assert_eq!(store.transient_handle_count().unwrap(), 0);
}

fn handles(keys: &[nfv_warden::keys::KeyInfo]) -> Vec<KeyRef> {
    keys.iter().map(|k| k.reference.clone()).collect()
}

#[test]
fn every_key_type_signs_every_fitting_scheme_and_is_destroyed() {
    let tpm = Swtpm::start();
    let store = open(&tpm);
    assert!(store.is_software_tpm());
    assert!(
        store.device().contains("(software TPM)"),
        "{}",
        store.device()
    );

    let mut generated = Vec::new();
    for algorithm in KeyAlgorithm::ALL {
        let (key, public) = generate(&store, algorithm);
        assert_eq!(store.public_key(&key).unwrap(), public);
        for scheme in SignatureScheme::ALL {
            if !scheme.fits(algorithm) {
                continue;
            }
            let signature = store.sign(&key, scheme, MESSAGE).expect("sign");
            verify(&public, scheme, MESSAGE, &signature);
        }
        generated.push((key, public));
    }

    let listed = store.list().unwrap();
    assert_eq!(listed.len(), generated.len());
    for (key, public) in &generated {
        let info = listed.iter().find(|k| &k.reference == key).expect("listed");
        assert_eq!(&info.public_key, public);
    }
    // Placed at the first free handles of the range, in order.
    let expected: Vec<KeyRef> = (0..4)
        .map(|i| KeyRef::Tpm(TpmHandle(0x8100_0100 + i)))
        .collect();
    assert_eq!(handles(&listed), expected);

    for (key, _) in &generated {
        let record = store.destroy(key).expect("destroy");
        assert!(record.verified, "{record:?}");
        assert_eq!(record.object, key.to_string());
        assert!(record.device.contains("software TPM"));
        assert!(!handles(&store.list().unwrap()).contains(key));
        assert!(matches!(store.public_key(key), Err(KeyError::NotFound(_))));
        assert!(matches!(
            store.sign(key, SignatureScheme::EcdsaSha256, MESSAGE),
            Err(KeyError::NotFound(_))
        ));
    }
    assert!(store.list().unwrap().is_empty());
    assert_eq!(store.transient_handle_count().unwrap(), 0);
}

#[test]
fn keys_survive_agent_restart_and_tpm_restart() {
    let mut tpm = Swtpm::start();
    let store = open(&tpm);
    let (ec, ec_public) = generate(&store, KeyAlgorithm::EcP256);
    let (rsa, rsa_public) = generate(&store, KeyAlgorithm::Rsa2048);
    drop(store);

    // Agent restart: a new store on the same TPM reuses the storage primary and finds the keys.
    let store = open(&tpm);
    assert_eq!(store.public_key(&ec).unwrap(), ec_public);
    assert_eq!(store.public_key(&rsa).unwrap(), rsa_public);
    let sig = store
        .sign(&ec, SignatureScheme::EcdsaSha256, MESSAGE)
        .unwrap();
    verify(&ec_public, SignatureScheme::EcdsaSha256, MESSAGE, &sig);
    drop(store);

    // TPM restart (power cycle with the same NV state).
    tpm.restart();
    let store = open(&tpm);
    let listed = store.list().unwrap();
    assert_eq!(handles(&listed), vec![ec.clone(), rsa.clone()]);
    let sig = store
        .sign(&rsa, SignatureScheme::RsaPssSha256, MESSAGE)
        .unwrap();
    verify(&rsa_public, SignatureScheme::RsaPssSha256, MESSAGE, &sig);
    // A new key does not overwrite the old ones.
    let (third, _) = generate(&store, KeyAlgorithm::EcP384);
    assert_eq!(third, KeyRef::Tpm(TpmHandle(0x8100_0102)));
}

#[test]
fn key_attributes_read_back() {
    let tpm = Swtpm::start();
    let store = open(&tpm);
    for algorithm in [KeyAlgorithm::EcP256, KeyAlgorithm::Rsa2048] {
        let (key, _) = generate(&store, algorithm);
        let bits = store.object_attributes(&key).unwrap();
        assert_ne!(bits & 0x0000_0002, 0, "fixedTPM: {bits:#x}");
        assert_ne!(bits & 0x0000_0010, 0, "fixedParent: {bits:#x}");
        assert_ne!(bits & 0x0000_0020, 0, "sensitiveDataOrigin: {bits:#x}");
        assert_ne!(bits & 0x0000_0040, 0, "userWithAuth: {bits:#x}");
        assert_ne!(bits & 0x0004_0000, 0, "sign: {bits:#x}");
        assert_eq!(bits & 0x0001_0000, 0, "restricted must be clear: {bits:#x}");
        assert_eq!(bits & 0x0002_0000, 0, "decrypt must be clear: {bits:#x}");
    }
    // The storage primary: restricted decrypt, fixedTPM, fixedParent, noDA.
    let primary = store
        .object_attributes(&KeyRef::Tpm(TpmHandle(0x8100_0001)))
        .unwrap();
    assert_eq!(
        primary & 0x0003_0472,
        0x0003_0472,
        "SRK attributes: {primary:#x}"
    );
}

#[test]
fn tpm_killed_then_restarted_under_a_running_store() {
    let mut tpm = Swtpm::start();
    let store = open(&tpm);
    let (key, public) = generate(&store, KeyAlgorithm::EcP256);

    tpm.kill();
    let started = Instant::now();
    let err = store
        .sign(&key, SignatureScheme::EcdsaSha256, MESSAGE)
        .expect_err("sign with the TPM gone");
    eprintln!(
        "sign with the TPM down failed after {:?}: {err}",
        started.elapsed()
    );
    assert!(
        matches!(err, KeyError::Unavailable { .. }),
        "expected Unavailable, got {err:?}"
    );
    assert!(err.is_transient());
    // Still down: still a clean error.
    assert!(matches!(store.list(), Err(KeyError::Unavailable { .. })));

    // Back without re-opening the store: the owner thread reconnects with backoff and
    // commands fail fast (Unavailable) until it has.
    tpm.restart();
    let sig =
        common::swtpm::eventually("the same store signs again after the TPM came back", || {
            store.sign(&key, SignatureScheme::EcdsaSha256, MESSAGE).ok()
        });
    verify(&public, SignatureScheme::EcdsaSha256, MESSAGE, &sig);
    assert_eq!(store.transient_handle_count().unwrap(), 0);
}

#[test]
fn ten_thousand_signs_leave_no_transient_handle() {
    let tpm = Swtpm::start();
    let store = open(&tpm);
    let (key, public) = generate(&store, KeyAlgorithm::EcP256);
    let started = Instant::now();
    // Four threads share the store (it is Sync); the owner thread serializes the commands.
    std::thread::scope(|scope| {
        for thread in 0..4u32 {
            let (store, key, public) = (&store, &key, &public);
            scope.spawn(move || {
                for i in 0..2_500u32 {
                    let message = [thread.to_be_bytes(), i.to_be_bytes()].concat();
                    let sig = store
                        .sign(key, SignatureScheme::EcdsaSha256, &message)
                        .expect("sign");
                    if i % 500 == 0 {
                        verify(public, SignatureScheme::EcdsaSha256, &message, &sig);
                    }
                }
            });
        }
    });
    let elapsed = started.elapsed();
    eprintln!(
        "10000 EC P-256 signs in {elapsed:?} ({:.0}/s)",
        10_000.0 / elapsed.as_secs_f64()
    );
    assert_eq!(store.transient_handle_count().unwrap(), 0);
}

#[test]
fn nv_index_is_defined_and_erased() {
    let tpm = Swtpm::start();
    let store = open(&tpm);
    let index = TpmHandle(0x0150_0000);
    let data: Vec<u8> = (0..1500u32).map(|i| i as u8).collect();
    store.nv_define(index, &data).expect("nv_define");
    let record = store.destroy(&KeyRef::Tpm(index)).expect("destroy NV");
    assert!(record.verified, "{record:?}");
    assert_eq!(record.object, "tpm:handle=0x01500000");
    assert_eq!(record.kind, "NV index");
    assert!(matches!(
        store.destroy(&KeyRef::Tpm(index)),
        Err(KeyError::NotFound(_))
    ));
    // The index can be defined again: it is really gone.
    store.nv_define(index, b"again").expect("define again");
    assert!(matches!(
        store.nv_define(TpmHandle(0x8100_0100), b"x"),
        Err(KeyError::InvalidArgument(_))
    ));
}

#[test]
fn bad_input_is_refused_clearly() {
    let tpm = Swtpm::start();
    let store = open(&tpm);
    let missing = KeyRef::Tpm(TpmHandle(0x8100_0150));
    assert!(matches!(
        store.public_key(&missing),
        Err(KeyError::NotFound(_))
    ));
    assert!(matches!(
        store.sign(&missing, SignatureScheme::EcdsaSha256, MESSAGE),
        Err(KeyError::NotFound(_))
    ));
    assert!(matches!(
        store.destroy(&missing),
        Err(KeyError::NotFound(_))
    ));
    assert!(matches!(
        store.destroy(&KeyRef::Tpm(TpmHandle(0x0150_0001))),
        Err(KeyError::NotFound(_))
    ));

    let (ec, _) = generate(&store, KeyAlgorithm::EcP256);
    let (rsa, _) = generate(&store, KeyAlgorithm::Rsa2048);
    for (key, scheme) in [
        (&ec, SignatureScheme::RsaPkcs1Sha256),
        (&ec, SignatureScheme::RsaPssSha384),
        (&rsa, SignatureScheme::EcdsaSha256),
    ] {
        let err = store.sign(key, scheme, MESSAGE).unwrap_err();
        assert!(matches!(err, KeyError::InvalidArgument(_)), "{err:?}");
    }
    // The storage primary and handles outside the key range are not ours to destroy.
    let err = store
        .destroy(&KeyRef::Tpm(TpmHandle(0x8100_0001)))
        .unwrap_err();
    assert!(matches!(err, KeyError::InvalidArgument(_)), "{err:?}");
    assert!(err.to_string().contains("storage primary"), "{err}");
    let err = store
        .destroy(&KeyRef::Tpm(TpmHandle(0x8100_0200)))
        .unwrap_err();
    assert!(matches!(err, KeyError::InvalidArgument(_)), "{err:?}");
    // A pkcs11: reference is not for this backend.
    let pkcs11: KeyRef = "pkcs11:token=t;object=o".parse().unwrap();
    assert!(matches!(
        store.sign(&pkcs11, SignatureScheme::EcdsaSha256, MESSAGE),
        Err(KeyError::WrongBackend(_))
    ));
    // Signing with an NV index.
    assert!(matches!(
        store.sign(
            &KeyRef::Tpm(TpmHandle(0x0150_0000)),
            SignatureScheme::EcdsaSha256,
            MESSAGE
        ),
        Err(KeyError::InvalidArgument(_))
    ));
    assert_eq!(store.transient_handle_count().unwrap(), 0);
}

#[test]
fn open_fails_clearly_without_a_tpm() {
    // Nothing listens there: our own swtpm, killed.
    let mut tpm = Swtpm::start();
    let tcti = tpm.tcti();
    tpm.kill();
    let started = Instant::now();
    let err = TpmKeyStore::open(&config(&tcti))
        .err()
        .expect("open must fail");
    eprintln!(
        "open without TPM failed after {:?}: {err}",
        started.elapsed()
    );
    assert!(matches!(err, KeyError::Unavailable { .. }), "{err:?}");
    assert!(err.to_string().contains(&tcti), "{err}");

    // A Unix socket TCTI cannot be honoured by tss-esapi 7.7: refused, not misrouted.
    let err = TpmKeyStore::open(&config("swtpm:path=/nonexistent/swtpm.sock"))
        .err()
        .expect("path= must be refused");
    assert!(matches!(err, KeyError::InvalidArgument(_)), "{err:?}");
    assert!(err.to_string().contains("path="), "{err}");

    let err = TpmKeyStore::open(&config("device:/nonexistent/tpmrm0"))
        .err()
        .expect("missing device");
    assert!(matches!(err, KeyError::Unavailable { .. }), "{err:?}");
}

/// Keys of different algorithms destroyed and regenerated at one persistent handle, each
/// signing as itself: every signature verifies under the key generated last, and never
/// under the key that held the handle before. (A persistent handle is a slot, not a key:
/// libtss2-esys 3.2 kept the ESYS object of an evicted key, so a key regenerated at that
/// handle failed with "Name mismatch between two calls of Esys_TR_FromTPMPublic"; a cache
/// of ESYS handles or algorithms by handle would sign with whatever holds the slot now.)
#[test]
fn regenerated_keys_at_the_same_handle_sign_as_themselves() {
    let tpm = Swtpm::start();
    let store = open(&tpm);
    let handle = TpmHandle(0x8100_0120);
    let key = KeyRef::Tpm(handle);
    let mut previous: Option<PublicKey> = None;
    for (round, algorithm) in [
        KeyAlgorithm::EcP256,
        KeyAlgorithm::Rsa2048,
        KeyAlgorithm::EcP256,
        KeyAlgorithm::EcP384,
        KeyAlgorithm::EcP256,
        KeyAlgorithm::Rsa2048,
        KeyAlgorithm::Rsa2048,
    ]
    .into_iter()
    .enumerate()
    {
        let info = store
            .generate_at(
                handle,
                &KeySpec {
                    label: format!("round-{round}"),
                    algorithm,
                },
            )
            .unwrap_or_else(|e| panic!("round {round}: generate {algorithm} at {handle}: {e}"));
        assert_eq!(info.reference, key);
        let public = info.public_key;
        assert_eq!(store.public_key(&key).expect("public key"), public);
        assert_ne!(previous.as_ref(), Some(&public), "a new key each round");
        for scheme in SignatureScheme::ALL {
            if !scheme.fits(algorithm) {
                let err = store.sign(&key, scheme, MESSAGE).unwrap_err();
                assert!(
                    matches!(err, KeyError::InvalidArgument(_)),
                    "round {round}: {scheme} on {algorithm}: {err:?}"
                );
                continue;
            }
            // Twice: the first signature after the regeneration and a later one.
            for _ in 0..2 {
                let signature = store
                    .sign(&key, scheme, MESSAGE)
                    .unwrap_or_else(|e| panic!("round {round}: sign {algorithm} {scheme}: {e}"));
                verify(&public, scheme, MESSAGE, &signature);
                if let Some(old) = &previous {
                    assert!(
                        !common::suite::verifies(&old.spki_der, scheme, MESSAGE, &signature),
                        "round {round}: a {scheme} signature verified under the key destroyed \
                         before"
                    );
                }
            }
        }
        // Regenerated right after the destroy, with no other command on the handle in
        // between (a failing command on the empty handle would hide a stale ESYS object).
        let record = store.destroy(&key).expect("destroy");
        assert!(record.verified, "{record:?}");
        previous = Some(public);
    }
    assert!(matches!(
        store.sign(&key, SignatureScheme::EcdsaSha256, MESSAGE),
        Err(KeyError::NotFound(_))
    ));

    // NV indices too: defined, erased, defined again with another size, erased again.
    let index = TpmHandle(0x0150_0010);
    for size in [16usize, 700, 16] {
        store
            .nv_define(index, &vec![0x5a; size])
            .expect("nv_define");
        let record = store.destroy(&KeyRef::Tpm(index)).expect("destroy NV");
        assert!(record.verified, "{record:?}");
    }
    assert_eq!(store.transient_handle_count().unwrap(), 0);
}
