//! A token re-initialized under a running agent: a clear error, then recovery once the key
//! is back. In a process of its own, because recovery may re-initialize the library.

mod common;

use common::softhsm::{config_for, process_tokens, settled};
use common::suite;
use nfv_warden::keys::pkcs11::Pkcs11KeyStore;
use nfv_warden::keys::{KeyAlgorithm, KeyError, KeyRef, KeySpec, KeyStore, SignatureScheme};

/// These tests pull the library out from under the agent (C_Finalize, C_Logout from another
/// handle). Doing that while another test of this process is inside a PKCS#11 call is
/// undefined behaviour, which the agent's own re-initialization avoids with its call gate;
/// the tests, acting as the outside world, take turns instead.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sign once the key layer has settled (see `common::softhsm::settled`); anything but a
/// signature fails the test.
fn sign_once_recovered(store: &Pkcs11KeyStore, key: &KeyRef, message: &[u8]) -> Vec<u8> {
    settled(|| store.sign(key, SignatureScheme::EcdsaSha256, message))
        .unwrap_or_else(|e| panic!("the key layer did not recover: {e:?}"))
}

#[test]
fn token_reinitialized_under_a_running_agent() {
    let _turn = one_at_a_time();
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

    // The stale handle leads to one re-initialization and a fresh search, which finds
    // nothing on a token that answers: not found (permanent), not "unavailable" for ever.
    let reinitializations = store.recovery_stats().reinitializations;
    // An earlier test of this process may have re-initialized the library moments ago: while
    // that backoff window holds, the answer is transient (503 + Retry-After for a client);
    // once it has passed, the one re-initialization gives the permanent answer.
    let err = settled(|| store.sign(&key.reference, SignatureScheme::EcdsaSha256, b"during"))
        .expect_err("the key is gone with the old token, yet it signed");
    eprintln!("error while the key is gone: {err}");
    assert!(
        matches!(err, KeyError::NotFound(_)),
        "a clear error, got {err:?}"
    );
    assert!(store.recovery_stats().reinitializations > reinitializations);

    // The operator restores the key under the same name; the running store finds it again.
    let restored = store
        .generate(&spec)
        .expect("generate again on the new token");
    let by_name: KeyRef = format!("pkcs11:token={label};object=ca")
        .parse()
        .expect("uri");
    let sig = sign_once_recovered(&store, &by_name, b"after");
    suite::verify(
        &restored.public_key.spki_der,
        SignatureScheme::EcdsaSha256,
        b"after",
        &sig,
    );
    eprintln!("recovery: {:?}", store.recovery_stats());
}

#[test]
fn library_finalized_under_the_agent_is_reinitialized() {
    let _turn = one_at_a_time();
    let tokens = process_tokens();
    let label = "test-token-1";
    let config = config_for(label, tokens.dir.path().join(format!("{label}.pin")), 2);
    let store = Pkcs11KeyStore::open(&config).expect("open");
    let spec = KeySpec {
        label: "k".into(),
        algorithm: KeyAlgorithm::EcP256,
    };
    let key = store.generate(&spec).expect("generate");
    // Finalize the module behind the agent's back: every call now fails with
    // CKR_CRYPTOKI_NOT_INITIALIZED, the third rung of the ladder.
    unsafe {
        let raw = cryptoki_sys::Pkcs11::new(common::softhsm::MODULE).expect("dlopen");
        assert_eq!(raw.C_Finalize(std::ptr::null_mut()), cryptoki_sys::CKR_OK);
    }
    let sig = sign_once_recovered(&store, &key.reference, b"after finalize");
    suite::verify(
        &key.public_key.spki_der,
        SignatureScheme::EcdsaSha256,
        b"after finalize",
        &sig,
    );
    let stats = store.recovery_stats();
    assert!(stats.reinitializations >= 1, "{stats:?}");
}

#[test]
fn logged_out_under_the_agent_logs_in_again() {
    let _turn = one_at_a_time();
    let tokens = process_tokens();
    let label = "test-token-2";
    let config = config_for(label, tokens.dir.path().join(format!("{label}.pin")), 2);
    let store = Pkcs11KeyStore::open(&config).expect("open");
    let spec = KeySpec {
        label: "k".into(),
        algorithm: KeyAlgorithm::Rsa2048,
    };
    let key = store.generate(&spec).expect("generate");
    let slot = store.slot_id().expect("slot");
    // Log the application out from another session on the same library.
    unsafe {
        let raw = cryptoki_sys::Pkcs11::new(common::softhsm::MODULE).expect("dlopen");
        let mut session: cryptoki_sys::CK_SESSION_HANDLE = 0;
        let flags = cryptoki_sys::CKF_SERIAL_SESSION | cryptoki_sys::CKF_RW_SESSION;
        let rv = raw.C_OpenSession(slot.id(), flags, std::ptr::null_mut(), None, &mut session);
        assert_eq!(rv, cryptoki_sys::CKR_OK);
        assert_eq!(raw.C_Logout(session), cryptoki_sys::CKR_OK);
        assert_eq!(raw.C_CloseSession(session), cryptoki_sys::CKR_OK);
    }
    let sig = store
        .sign(
            &key.reference,
            SignatureScheme::RsaPkcs1Sha256,
            b"after logout",
        )
        .expect("logs in again and signs");
    suite::verify(
        &key.public_key.spki_der,
        SignatureScheme::RsaPkcs1Sha256,
        b"after logout",
        &sig,
    );
    assert!(
        store.recovery_stats().logins >= 1,
        "{:?}",
        store.recovery_stats()
    );
}

/// `open` heals like every operation: a library finalized by someone else in the process
/// (CKR_CRYPTOKI_NOT_INITIALIZED on C_GetSlotList) is re-initialized and the token found,
/// instead of reporting a present token as missing. A token that does not exist is still
/// reported as such.
#[test]
fn open_reinitializes_a_library_finalized_by_someone_else() {
    let _turn = one_at_a_time();
    let tokens = process_tokens();
    let label = "test-token-1";
    let config = config_for(label, tokens.dir.path().join(format!("{label}.pin")), 2);
    // The library is shared by the process: make sure it is loaded, then finalize it
    // behind the layer's back.
    drop(Pkcs11KeyStore::open(&config).expect("open"));
    unsafe {
        let raw = cryptoki_sys::Pkcs11::new(common::softhsm::MODULE).expect("dlopen");
        assert_eq!(raw.C_Finalize(std::ptr::null_mut()), cryptoki_sys::CKR_OK);
    }
    let store = Pkcs11KeyStore::open(&config).expect("open after C_Finalize by someone else");
    assert!(store.recovery_stats().reinitializations >= 1);
    let key = store
        .generate(&KeySpec {
            label: "after-finalize".into(),
            algorithm: KeyAlgorithm::EcP256,
        })
        .expect("generate");
    let sig = sign_once_recovered(&store, &key.reference, b"opened after finalize");
    suite::verify(
        &key.public_key.spki_der,
        SignatureScheme::EcdsaSha256,
        b"opened after finalize",
        &sig,
    );

    let missing = config_for(
        "no-such-token",
        tokens.dir.path().join(format!("{label}.pin")),
        2,
    );
    let err = Pkcs11KeyStore::open(&missing)
        .err()
        .expect("a missing token");
    assert!(matches!(err, KeyError::TokenNotFound(_)), "{err:?}");
}

#[test]
fn missing_token_is_a_clear_error() {
    let _turn = one_at_a_time();
    let tokens = process_tokens();
    let pin = tokens.dir.path().join("x.pin");
    std::fs::write(&pin, "1234").expect("pin");
    let config = config_for("no-such-token", pin, 2);
    let err = Pkcs11KeyStore::open(&config).err().expect("missing token");
    assert!(matches!(err, KeyError::TokenNotFound(_)), "{err}");
}
