//! The PKCS#11 token disappearing and coming back, and the resources under SoftHSM running
//! out (issue 8, sections 1 and 2): while the token cannot serve, every error is a transient
//! `Unavailable` naming the token (503 with Retry-After over HTTP), never "key not found";
//! once it is back, signing resumes without a restart. In a process of its own: recovery
//! re-initializes the process-wide library, and one test exhausts file descriptors.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cmf::{openssl_csr, CmfAgent};
use common::softhsm::{config_for, process_tokens, settled, MODULE};
use common::suite;
use nfv_warden::keys::pkcs11::Pkcs11KeyStore;
use nfv_warden::keys::{KeyAlgorithm, KeyError, KeyRef, KeySpec, KeyStore, SignatureScheme};
use serde_json::json;

/// Each test pulls something out from under the whole process (the token, the library, the
/// file descriptors): they take turns.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

/// A failure guard for polling, not a measurement: generous on a loaded 2-core machine.
const BOUND: Duration = Duration::from_secs(90);

fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < BOUND, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The directory SoftHSM keeps the token labelled `label` in (a UUID under `tokens/`).
fn token_directory(tokens: &Path, label: &str) -> PathBuf {
    let label = label.as_bytes();
    for entry in std::fs::read_dir(tokens).expect("token dir") {
        let path = entry.expect("entry").path();
        let Ok(object) = std::fs::read(path.join("token.object")) else {
            continue;
        };
        // The label is stored padded: "test-token-5" must not match "test-token-50".
        let found = object
            .windows(label.len() + 1)
            .any(|w| &w[..label.len()] == label && !w[label.len()].is_ascii_alphanumeric());
        if found {
            return path;
        }
    }
    panic!("no token directory for {}", String::from_utf8_lossy(label));
}

fn device_named(error: &KeyError, label: &str) -> bool {
    error
        .to_string()
        .contains(&format!("PKCS#11 token '{label}'"))
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    unavailable: AtomicU64,
    /// Anything else than a signature or a transient error: must stay empty.
    other: Mutex<Vec<String>>,
    last_unavailable: Mutex<Option<String>>,
}

#[test]
fn token_directory_moved_away_and_back_under_load() {
    let _turn = one_at_a_time();
    let tokens = process_tokens();
    let label = "test-token-5";
    let config = config_for(label, tokens.dir.path().join(format!("{label}.pin")), 4);
    let store = Arc::new(Pkcs11KeyStore::open(&config).expect("open"));
    let key = store
        .generate(&KeySpec {
            label: "loaded".into(),
            algorithm: KeyAlgorithm::EcP256,
        })
        .expect("generate");

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let signers: Vec<_> = (0..4)
        .map(|_| {
            let (store, stop, tally) = (store.clone(), stop.clone(), tally.clone());
            let reference = key.reference.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match store.sign(&reference, SignatureScheme::EcdsaSha256, b"load") {
                        Ok(_) => {
                            tally.ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) if e.is_transient() => {
                            tally.unavailable.fetch_add(1, Ordering::Relaxed);
                            *tally.last_unavailable.lock().unwrap() = Some(e.to_string());
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err(e) => {
                            tally.other.lock().unwrap().push(format!("{e:?}"));
                            std::thread::sleep(Duration::from_millis(5));
                        }
                    }
                }
            })
        })
        .collect();
    wait_for("signatures before the fault", || {
        tally.ok.load(Ordering::Relaxed) >= 100
    });
    let recoveries_before = store.recoveries();

    // The token's directory goes away under the running signers.
    let home = token_directory(&tokens.dir.path().join("tokens"), label);
    let away = tokens.dir.path().join("token-moved-away");
    std::fs::rename(&home, &away).expect("move the token away");
    let unavailable_at_move = tally.unavailable.load(Ordering::Relaxed);
    wait_for("transient errors while the token is away", || {
        tally.unavailable.load(Ordering::Relaxed) >= unavailable_at_move + 20
    });
    let error = store
        .sign(&key.reference, SignatureScheme::EcdsaSha256, b"away")
        .expect_err("no signature without the token");
    assert!(error.is_transient(), "transient while away: {error:?}");
    assert!(device_named(&error, label), "names the device: {error}");
    eprintln!("while away: {error}");

    // Back: signing resumes without a restart.
    std::fs::rename(&away, &home).expect("move the token back");
    let mut signature = None;
    wait_for("a signature after the token is back", || {
        match store.sign(&key.reference, SignatureScheme::EcdsaSha256, b"back") {
            Ok(sig) => {
                signature = Some(sig);
                true
            }
            Err(e) => {
                assert!(e.is_transient(), "only transient errors: {e:?}");
                false
            }
        }
    });
    suite::verify(
        &key.public_key.spki_der,
        SignatureScheme::EcdsaSha256,
        b"back",
        &signature.expect("signed"),
    );
    let ok_when_back = tally.ok.load(Ordering::Relaxed);
    wait_for("the signers resume", || {
        tally.ok.load(Ordering::Relaxed) >= ok_when_back + 100
    });
    stop.store(true, Ordering::Relaxed);
    for signer in signers {
        signer.join().expect("a signer panicked");
    }
    let other = tally.other.lock().unwrap();
    assert!(other.is_empty(), "only transient errors: {other:?}");
    let last = tally
        .last_unavailable
        .lock()
        .unwrap()
        .clone()
        .unwrap_or_default();
    assert!(last.contains(&format!("PKCS#11 token '{label}'")), "{last}");
    let stats = store.recovery_stats();
    eprintln!("recovery: {stats:?}");
    assert!(
        store.recoveries() > recoveries_before,
        "the library was re-initialized: {stats:?}"
    );
}

#[test]
fn token_reinitialized_and_key_recreated_elsewhere_is_found_again() {
    let _turn = one_at_a_time();
    let tokens = process_tokens();
    let label = "test-token-6";
    let config = config_for(label, tokens.dir.path().join(format!("{label}.pin")), 2);
    let store = Pkcs11KeyStore::open(&config).expect("open");
    store
        .generate(&KeySpec {
            label: "ca".into(),
            algorithm: KeyAlgorithm::EcP256,
        })
        .expect("generate");
    let by_name: KeyRef = format!("pkcs11:token={label};object=ca").parse().unwrap();
    store
        .sign(&by_name, SignatureScheme::EcdsaSha256, b"before")
        .expect("sign before");

    // Another process wipes the token, re-initializes it with the same label, and makes a
    // new key under the same name: this process's library has not seen any of it.
    tokens.dir.reinit_token(label, "1234");
    let status = std::process::Command::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", &tokens.dir.conf)
        .args(["--module", MODULE, "--token-label", label, "--login"])
        .args([
            "--pin",
            "1234",
            "--keypairgen",
            "--key-type",
            "EC:prime256v1",
        ])
        .args(["--label", "ca", "--id", "01"])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("pkcs11-tool runs");
    assert!(status.success(), "pkcs11-tool --keypairgen");

    let recoveries_before = store.recoveries();
    // The window an earlier re-initialization left may still hold: wait it out.
    let signature = settled(|| store.sign(&by_name, SignatureScheme::EcdsaSha256, b"after"))
        .expect("the new key is found by its name");
    let public = store
        .public_key(&by_name)
        .expect("public key of the new key");
    suite::verify(
        &public.spki_der,
        SignatureScheme::EcdsaSha256,
        b"after",
        &signature,
    );
    assert!(
        store.recoveries() > recoveries_before,
        "the stale handle led to a re-initialization: {:?}",
        store.recovery_stats()
    );

    // Wiped again, no key this time: NotFound after one re-initialization, not Unavailable,
    // and asking again does not re-initialize again.
    tokens.dir.reinit_token(label, "1234");
    let error = settled(|| store.sign(&by_name, SignatureScheme::EcdsaSha256, b"gone"))
        .expect_err("the key is gone");
    assert!(matches!(error, KeyError::NotFound(_)), "{error:?}");
    let settled = store.recoveries();
    for _ in 0..3 {
        let error = store
            .sign(&by_name, SignatureScheme::EcdsaSha256, b"gone")
            .expect_err("still gone");
        assert!(matches!(error, KeyError::NotFound(_)), "{error:?}");
    }
    assert_eq!(store.recoveries(), settled, "no re-initialization loop");
}

/// The other side of the rule: a key that was never there, on a token that answers, is not
/// found at once, without re-initializing the library.
#[test]
fn absent_key_on_a_healthy_token_is_not_found_without_reinitializing() {
    let _turn = one_at_a_time();
    let tokens = process_tokens();
    let label = "test-token-8";
    let config = config_for(label, tokens.dir.path().join(format!("{label}.pin")), 2);
    let store = Pkcs11KeyStore::open(&config).expect("open");
    let absent: KeyRef = format!("pkcs11:token={label};object=never-made")
        .parse()
        .unwrap();
    for _ in 0..3 {
        let error = store
            .sign(&absent, SignatureScheme::EcdsaSha256, b"x")
            .expect_err("no such key");
        assert!(matches!(error, KeyError::NotFound(_)), "{error:?}");
    }
    assert_eq!(store.recoveries(), 0, "{:?}", store.recovery_stats());
}

#[test]
fn file_descriptors_exhausted_then_released() {
    let _turn = one_at_a_time();
    let tokens = process_tokens();
    let label = "test-token-7";
    let config = config_for(label, tokens.dir.path().join(format!("{label}.pin")), 2);
    let store = Pkcs11KeyStore::open(&config).expect("open");
    let key = store
        .generate(&KeySpec {
            label: "fd".into(),
            algorithm: KeyAlgorithm::EcP256,
        })
        .expect("generate");
    store
        .sign(&key.reference, SignatureScheme::EcdsaSha256, b"before")
        .expect("sign before");
    let recoveries_before = store.recoveries();
    // An earlier test may have left the library-wide re-initialization window open (at most
    // `reinit_backoff_max_ms`, counted from a re-initialization already in the past): wait it
    // out, so that the starvation below meets a layer free to re-initialize.
    std::thread::sleep(Duration::from_millis(config.reinit_backoff_max_ms + 100));

    // Take every free file descriptor (what ~1,000 idle connections under a 1,024 limit
    // did): SoftHSM can no longer open its object files.
    let mut hog = Vec::new();
    loop {
        match std::fs::File::open("/dev/null") {
            Ok(file) => hog.push(file),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EMFILE), "{e}");
                break;
            }
        }
    }
    let mut errors = Vec::new();
    for _ in 0..5 {
        match store.sign(&key.reference, SignatureScheme::EcdsaSha256, b"starved") {
            Ok(_) => {}
            Err(e) => errors.push(e),
        }
    }
    drop(hog);
    assert!(!errors.is_empty(), "SoftHSM needs file descriptors to sign");
    for error in &errors {
        assert!(
            error.is_transient(),
            "out of file descriptors is transient, never NotFound: {error:?}"
        );
        assert!(device_named(error, label), "{error}");
    }
    eprintln!("while starved: {}", errors[0]);

    // Released: the layer works again by itself.
    let mut signature = None;
    wait_for("a signature once descriptors are free", || {
        match store.sign(&key.reference, SignatureScheme::EcdsaSha256, b"fed") {
            Ok(sig) => {
                signature = Some(sig);
                true
            }
            Err(e) => {
                assert!(e.is_transient(), "{e:?}");
                false
            }
        }
    });
    suite::verify(
        &key.public_key.spki_der,
        SignatureScheme::EcdsaSha256,
        b"fed",
        &signature.expect("signed"),
    );
    assert!(
        store.recoveries() > recoveries_before,
        "{:?}",
        store.recovery_stats()
    );
}

const REGISTRATIONS: &str = "/certmgmt/v1/registrations";
const CSRS: &str = "/certmgmt/v1/certificate_signing_requests";

/// Over HTTP, against a spawned `warden serve` whose CA and TLS keys are on the token:
/// while the token directory is away, a CSR gets 503 with Retry-After naming the token; once
/// it is back, the CSR is issued on the same connection and new TLS handshakes succeed.
#[test]
fn token_away_over_http_is_503_naming_the_token_then_issuance_resumes() {
    let _turn = one_at_a_time();
    let mut agent = CmfAgent::new("");
    agent.start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut vnfm = agent.client(Some("vnfm-a")).connect().await.unwrap();
        let registered = vnfm
            .post_json(
                REGISTRATIONS,
                &json!({
                    "certType": "VNFCI_CERT",
                    "subjectIds": ["vnfc-t"],
                    "typeOfVnfcCertHandling": "DELEGATION_MODE",
                }),
            )
            .await
            .unwrap();
        assert_eq!(registered.status, 201, "{}", registered.problem_detail());
        let csr = openssl_csr(agent.dir(), "t", "/CN=vnfc-t", &[]);
        let body = json!({ "vnfcId": "vnfc-t", "certType": "VNFCI_CERT", "certChainRequest": false, "csr": csr });
        let issued = vnfm.post_json(CSRS, &body).await.unwrap();
        assert_eq!(issued.status, 201, "{}", issued.problem_detail());

        let home = token_directory(&agent.agent.tokens.dir.path().join("tokens"), "warden");
        let away = agent.dir().join("token-moved-away");
        std::fs::rename(&home, &away).expect("move the token away");
        let refused = vnfm.post_json(CSRS, &body).await.unwrap();
        assert_eq!(refused.status, 503, "{}", refused.problem_detail());
        assert!(refused.headers.contains_key("retry-after"));
        let detail = refused.problem_detail();
        assert!(detail.contains("PKCS#11 token 'warden'"), "{detail}");
        eprintln!("while away: {detail}");

        std::fs::rename(&away, &home).expect("move the token back");
        let start = Instant::now();
        loop {
            let response = vnfm.post_json(CSRS, &body).await.unwrap();
            if response.status == 201 {
                break;
            }
            assert_eq!(response.status, 503, "{}", response.problem_detail());
            assert!(start.elapsed() < BOUND, "issuance did not resume");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // A new connection: the TLS handshake signs with the token's key again.
        let mut fresh = agent.client(Some("vnfm-a")).connect().await.unwrap();
        let again = fresh.post_json(CSRS, &body).await.unwrap();
        assert_eq!(again.status, 201, "{}", again.problem_detail());
    });
    agent.stop();
}
