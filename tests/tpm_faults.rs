//! A hung TPM: swtpm SIGSTOPped under a running key store and under a running `warden serve`
//! whose CA key is in that TPM. Every TPM command has a deadline; past it the caller gets
//! `Unavailable` (503 over HTTP), the owner thread's connection is abandoned and rebuilt, and
//! after SIGCONT service resumes without re-opening anything. Assertions are on error kinds
//! and statuses, never on elapsed time.
//!
//! The tests of this binary run one at a time ([`one_at_a_time`]): libtss2's swtpm TCTI
//! opens a socket for every command without close-on-exec, so a process that another test
//! spawns while a command is in flight (a swtpm, `openssl`, `warden serve`) inherits that
//! connection. swtpm serves one connection at a time and waits for the next command on it
//! until the last copy is closed, that is until the child exits: the TPM then hangs for as
//! long as another test runs, although it is not stopped. strace showed it: a store test's
//! swtpm resumed after SIGCONT, answered the abandoned command, then waited 5.7 s on that
//! connection (the store's thread had closed its copy; the `warden serve` started by the
//! server test had inherited another) while the reconnection queued behind it; a test that
//! happened to overlap longer failed. The agent itself starts no processes.

mod common;

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use common::cmf::{openssl_csr, CmfAgent};
use common::swtpm::{eventually, Swtpm};
use nfv_warden::config::TpmConfig;
use nfv_warden::keys::tpm::TpmKeyStore;
use nfv_warden::keys::{KeyAlgorithm, KeyError, KeyRef, KeySpec, KeyStore, SignatureScheme};
use serde_json::json;

const MESSAGE: &[u8] = b"nfv-warden hung TPM test";

/// The default deadline: long enough that a loaded 2-core machine never trips it while the
/// TPM is running.
const DEADLINE_MS: u64 = 5_000;
const MAX_WAITING: usize = 4;

/// Held for the whole of each test of this binary (see the module comment). A test that
/// panics poisons it; the next one runs anyway.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner)
}

fn config(tpm: &Swtpm) -> TpmConfig {
    TpmConfig {
        command_timeout_ms: DEADLINE_MS,
        max_waiting_commands: MAX_WAITING,
        ..common::swtpm::tpm_config(&tpm.tcti())
    }
}

fn generate(store: &TpmKeyStore) -> (KeyRef, Vec<u8>) {
    let info = store
        .generate(&KeySpec {
            label: "hung".to_string(),
            algorithm: KeyAlgorithm::EcP256,
        })
        .expect("generate");
    (info.reference, info.public_key.spki_der)
}

fn assert_unavailable<T: std::fmt::Debug>(result: Result<T, KeyError>, what: &str) -> String {
    match result {
        Err(KeyError::Unavailable { reason, .. }) => reason,
        other => panic!("{what}: expected Unavailable, got {other:?}"),
    }
}

/// Wait until the supervisor has abandoned the stuck connection and marked the TPM down
/// (it does so once the command in flight passes its deadline).
fn wait_until_down(store: &TpmKeyStore) -> String {
    eventually("the TPM is marked down", || store.down_reason())
}

#[test]
fn stopped_tpm_fails_within_the_deadline_then_signs_again_after_sigcont() {
    let _serial = one_at_a_time();
    let tpm = Swtpm::start();
    let store = Arc::new(TpmKeyStore::open(&config(&tpm)).expect("open"));
    let (key, spki) = generate(&store);
    // Before the stop the TPM answers; on a loaded machine a command may still pass the
    // 5 s deadline, which heals by itself: poll (the bound is a failure guard).
    let signature = eventually("the running TPM signs", || {
        store.sign(&key, SignatureScheme::EcdsaSha256, MESSAGE).ok()
    });
    common::suite::verify(&spki, SignatureScheme::EcdsaSha256, MESSAGE, &signature);
    let errors = device_metric("warden_device_errors_total");
    let recoveries = device_metric("warden_device_recoveries_total");

    tpm.stop();
    // The first caller is stuck behind a TPM that does not answer: it gets Unavailable
    // (it could not return at all without the deadline), naming the TPM.
    let err = store
        .sign(&key, SignatureScheme::EcdsaSha256, MESSAGE)
        .expect_err("sign on a stopped TPM");
    assert!(
        matches!(&err, KeyError::Unavailable { device, .. } if device == &format!("TPM {}", tpm.tcti())),
        "{err:?}"
    );
    assert!(err.to_string().contains(&tpm.tcti()), "{err}");

    // Many callers at once, more than may wait: every one returns, with Unavailable.
    let callers: Vec<_> = (0..3 * MAX_WAITING)
        .map(|_| {
            let (store, key) = (store.clone(), key.clone());
            std::thread::spawn(move || store.sign(&key, SignatureScheme::EcdsaSha256, MESSAGE))
        })
        .collect();
    for caller in callers {
        assert_unavailable(caller.join().expect("caller"), "concurrent sign");
    }

    // Once the stuck command passed its deadline the TPM is down: commands fail at once,
    // naming the cause, and work that does not touch the TPM is unaffected.
    let reason = wait_until_down(&store);
    assert!(reason.contains("TPM2_Sign"), "{reason}");
    let reason = assert_unavailable(store.list(), "list while down");
    assert!(reason.contains("abandoned"), "{reason}");
    assert!(store.device().contains("software TPM"));
    assert_eq!(store.kind(), nfv_warden::keys::BackendKind::Tpm);

    // SIGCONT: the same store signs again, without being re-opened.
    tpm.resume();
    let signature = eventually("the store signs again after SIGCONT", || {
        store.sign(&key, SignatureScheme::EcdsaSha256, MESSAGE).ok()
    });
    common::suite::verify(&spki, SignatureScheme::EcdsaSha256, MESSAGE, &signature);
    // And it keeps signing: 20 more signatures, each verified. swtpm listens with a backlog
    // of 1: connection attempts it refused during the stall come back on TCP's SYN
    // retransmission timer (1 s, 3 s), and on a loaded machine a command can pass the 5 s
    // deadline; either costs a command an `Unavailable` and heals by itself like any hang.
    // So failures in between are allowed, as long as each is transient; the bound is a
    // failure guard.
    let mut signed = 0;
    let mut transient_failures = 0;
    eventually("20 more signatures after SIGCONT", || {
        match store.sign(&key, SignatureScheme::EcdsaSha256, MESSAGE) {
            Ok(signature) => {
                common::suite::verify(&spki, SignatureScheme::EcdsaSha256, MESSAGE, &signature);
                signed += 1;
            }
            Err(e) if e.is_transient() => transient_failures += 1,
            Err(e) => panic!("a permanent error after SIGCONT: {e:?}"),
        }
        (signed >= 20).then_some(())
    });
    eprintln!("after SIGCONT: 20 signatures, {transient_failures} transient failures between");
    let listed = eventually("list answers after SIGCONT", || store.list().ok());
    assert_eq!(listed.len(), 1);
    let transients = eventually("the transient handles can be counted", || {
        store.transient_handle_count().ok()
    });
    assert_eq!(transients, 0);
    // The loss and the reconnection are in the device metrics (tests of this binary run in
    // parallel and only add to the counters).
    assert!(device_metric("warden_device_errors_total") > errors);
    assert!(device_metric("warden_device_recoveries_total") > recoveries);
}

/// The value of a device counter of the TPM backend in this process's metrics.
fn device_metric(name: &str) -> u64 {
    let text = nfv_warden::metrics::global().encode();
    let prefix = format!("{name}{{backend=\"tpm\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .map_or(0, |value| value.trim().parse().expect("counter value"))
}

/// swtpm has 3 transient slots and no resource manager: transient objects left loaded by a
/// dead connection are flushed by the next connection the store makes, at open and after
/// a hang.
#[test]
fn transients_left_by_a_dead_connection_are_flushed_on_reconnect() {
    let _serial = one_at_a_time();
    let tpm = Swtpm::start();
    leak_a_transient(&tpm);
    assert_eq!(transients_seen_directly(&tpm), 1);
    let store = TpmKeyStore::open(&config(&tpm)).expect("open");
    // The running TPM: a command that passes the 5 s deadline on a loaded machine heals by
    // itself (and the reconnection flushes too): polled, the bound is a failure guard.
    let count = eventually("the transient handles can be counted", || {
        store.transient_handle_count().ok()
    });
    assert_eq!(count, 0, "at open");
    let (key, _) = generate(&store);

    // Counted on a connection of its own, not through the store: a store command that passed
    // its deadline would reconnect and flush the leaked object before the hang below.
    leak_a_transient(&tpm);
    assert_eq!(transients_seen_directly(&tpm), 1);
    tpm.stop();
    assert_unavailable(
        store.sign(&key, SignatureScheme::EcdsaSha256, MESSAGE),
        "sign on a stopped TPM",
    );
    wait_until_down(&store);
    tpm.resume();
    eventually("the store signs again after SIGCONT", || {
        store.sign(&key, SignatureScheme::EcdsaSha256, MESSAGE).ok()
    });
    let count = eventually("the transient handles can be counted", || {
        store.transient_handle_count().ok()
    });
    assert_eq!(count, 0, "after reconnecting");
}

/// Transient objects loaded in the TPM, counted on a connection of the test's own
/// (TPM2_GetCapability, handles 0x80xxxxxx), whatever the store's deadlines.
fn transients_seen_directly(tpm: &Swtpm) -> usize {
    use tss_esapi::constants::CapabilityType;
    use tss_esapi::structures::CapabilityData;

    let tcti = tpm.tcti().parse().expect("tcti");
    let mut context = tss_esapi::Context::new(tcti).expect("context");
    let (data, _) = context
        .execute_without_session(|c| c.get_capability(CapabilityType::Handles, 0x8000_0000, 64))
        .expect("get capability");
    let CapabilityData::Handles(handles) = data else {
        panic!("TPM2_GetCapability(handles) answered {data:?}");
    };
    handles
        .iter()
        .filter(|h| u32::from(**h) >> 24 == 0x80)
        .count()
}

/// Connections waiting in the accept queue of the loopback TCP listener on `port`
/// (/proc/net/tcp: for a listening socket, rx_queue is the accept backlog).
fn accept_queue(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let local = format!("0100007F:{port:04X}");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let listening = fields.get(1) == Some(&local.as_str()) && fields.get(3) == Some(&"0A");
            let queues = fields.get(4)?;
            let rx = queues.split_once(':')?.1;
            listening
                .then(|| usize::from_str_radix(rx, 16).ok())
                .flatten()
        })
        .sum()
}

/// A command stuck in a hung TPM right after a key generation is noticed at its own deadline
/// (5 s), not at the key generation's (here the 600 s guard). The supervisor sleeps until the
/// deadline of the command it last saw; it used to miss that a shorter one followed, and
/// `tpm_faults` then failed with "timed out waiting until the TPM is marked down" whenever
/// load let it first see the key generations of `open` and `generate`.
#[test]
fn a_hang_right_after_a_key_generation_is_noticed_at_the_command_deadline() {
    let _serial = one_at_a_time();
    let tpm = Swtpm::start();
    let store = Arc::new(TpmKeyStore::open(&config(&tpm)).expect("open"));
    let (key, spki) = generate(&store);

    // A key generation that hangs: the supervisor sees it in flight (it looks at the busy
    // command at the latest when the deadline of the connection attempt before it passes,
    // while a caller queued behind waits out its own 5 s) and sleeps until its deadline.
    tpm.stop();
    let generating = {
        let store = store.clone();
        std::thread::spawn(move || generate(&store))
    };
    // The signature must queue behind the key generation: wait until the generation's first
    // command has reached the stopped swtpm (its connection waits in the accept queue).
    eventually("the key generation reached the stopped TPM", || {
        (accept_queue(tpm.port()) > 0).then_some(())
    });
    let reason = assert_unavailable(
        store.sign(&key, SignatureScheme::EcdsaSha256, MESSAGE),
        "sign queued behind a hung key generation",
    );
    assert!(reason.contains("busy"), "{reason}");
    tpm.resume();
    generating.join().expect("generate");
    eventually("the running TPM signs", || {
        store.sign(&key, SignatureScheme::EcdsaSha256, MESSAGE).ok()
    });

    // Now a signature hangs: the TPM is marked down once its 5 s deadline passed (the
    // bound of `eventually`, 120 s, is far below the key generation's 600 s).
    tpm.stop();
    assert_unavailable(
        store.sign(&key, SignatureScheme::EcdsaSha256, MESSAGE),
        "sign on a stopped TPM",
    );
    let reason = wait_until_down(&store);
    assert!(reason.contains("TPM2_Sign"), "{reason}");
    tpm.resume();
    let signature = eventually("the store signs again after SIGCONT", || {
        store.sign(&key, SignatureScheme::EcdsaSha256, MESSAGE).ok()
    });
    common::suite::verify(&spki, SignatureScheme::EcdsaSha256, MESSAGE, &signature);
}

/// A client that loads a transient object (a primary key) and dies without flushing it.
fn leak_a_transient(tpm: &Swtpm) {
    use tss_esapi::interface_types::resource_handles::Hierarchy;
    use tss_esapi::interface_types::session_handles::AuthSession;
    use tss_esapi::structures::{
        Digest, EccPoint, EccScheme, KeyDerivationFunctionScheme, Public, PublicEccParameters,
        SymmetricDefinitionObject,
    };

    let tcti = tpm.tcti().parse().expect("tcti");
    let mut context = tss_esapi::Context::new(tcti).expect("context");
    let attributes = tss_esapi::attributes::ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()
        .expect("attributes");
    let public = Public::Ecc {
        object_attributes: attributes,
        name_hashing_algorithm: tss_esapi::interface_types::algorithm::HashingAlgorithm::Sha256,
        auth_policy: Digest::default(),
        parameters: PublicEccParameters::new(
            SymmetricDefinitionObject::AES_128_CFB,
            EccScheme::Null,
            tss_esapi::interface_types::ecc::EccCurve::NistP256,
            KeyDerivationFunctionScheme::Null,
        ),
        unique: EccPoint::default(),
    };
    context
        .execute_with_session(Some(AuthSession::Password), |c| {
            c.create_primary(Hierarchy::Owner, public, None, None, None, None)
        })
        .expect("create primary");
    // Dying without cleanup: dropping the context would flush the object.
    std::mem::forget(context);
}

const REGISTRATIONS: &str = "/certmgmt/v1/registrations";
const CSRS: &str = "/certmgmt/v1/certificate_signing_requests";
/// A failure guard, never what a test checks.
const GUARD: Duration = Duration::from_secs(120);

/// The README's failure: the CA key in a TPM that hangs with 20 CSR connections open. Each
/// CSR gets 503 + Retry-After; `/healthz` and a store read on new connections answer
/// meanwhile; after SIGCONT issuance is back without a restart, and what was acknowledged
/// is exactly what is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// The guard serializes whole tests (see the module comment); nothing else takes it, so
// holding it across awaits cannot deadlock.
#[allow(clippy::await_holding_lock)]
async fn hung_tpm_ca_key_gives_503_while_the_server_keeps_answering() {
    let _serial = one_at_a_time();
    let swtpm = Swtpm::start();
    let mut agent = CmfAgent::with_ca_key("", Some(&swtpm.tcti()));
    let text = std::fs::read_to_string(&agent.agent.config).expect("config");
    let guard = format!(
        "command_timeout_ms = {}\n",
        common::swtpm::GUARD_DEADLINE_MS
    );
    assert!(text.contains(&guard), "{text}");
    let text = text.replace(&guard, &format!("command_timeout_ms = {DEADLINE_MS}\n"));
    std::fs::write(&agent.agent.config, text).expect("config");
    agent.start();

    let mut vnfm = agent
        .client(Some("vnfm-a"))
        .connect()
        .await
        .expect("connect");
    let created = vnfm
        .post_json(
            REGISTRATIONS,
            &json!({
                "certType": "VNFCI_CERT",
                "subjectIds": ["vnfc-hung"],
                "typeOfVnfcCertHandling": "DELEGATION_MODE",
            }),
        )
        .await
        .expect("register");
    assert_eq!(created.status, 201, "{}", created.problem_detail());
    let registration = created.json().expect("json")["id"]
        .as_str()
        .expect("id")
        .to_string();
    let csr = openssl_csr(agent.dir(), "hung", "/CN=vnfc-hung", &[]);
    let body = json!({
        "vnfcId": "vnfc-hung", "certType": "VNFCI_CERT", "certChainRequest": false, "csr": csr
    });
    // The running TPM issues (a 503 from a deadline passed on a loaded machine heals by
    // itself: retried within a failure guard).
    let guard = tokio::time::Instant::now() + GUARD;
    loop {
        let first = vnfm.post_json(CSRS, &body).await.expect("csr");
        if first.status == 201 {
            break;
        }
        assert_eq!(first.status, 503, "{}", first.problem_detail());
        assert!(
            tokio::time::Instant::now() < guard,
            "no issuance before the stop"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut issued = 1;

    swtpm.stop();
    let client = Arc::new(agent.client(Some("vnfm-a")));
    let csrs: Vec<_> = (0..20)
        .map(|_| {
            let (client, body) = (client.clone(), body.clone());
            tokio::spawn(async move {
                let mut connection = client.connect().await?;
                connection.post_json(CSRS, &body).await
            })
        })
        .collect();
    // While those wait on the TPM, the server still answers what does not need it.
    let mut rounds = 0;
    while rounds == 0 || !csrs.iter().all(|t| t.is_finished()) {
        let mut anonymous = agent.client(None).connect().await.expect("connect");
        let health = tokio::time::timeout(GUARD, anonymous.get("/healthz"))
            .await
            .expect("/healthz answers while the TPM hangs")
            .expect("healthz");
        assert!(
            health.status == 200 || health.status == 503,
            "{}",
            health.status
        );
        let mut reader = agent
            .client(Some("vnfm-a"))
            .connect()
            .await
            .expect("connect");
        let read = tokio::time::timeout(
            GUARD,
            reader.get(&format!("{REGISTRATIONS}/{registration}")),
        )
        .await
        .expect("a store read answers while the TPM hangs")
        .expect("read");
        assert_eq!(read.status, 200, "{}", read.problem_detail());
        rounds += 1;
    }
    for csr in csrs {
        let response = tokio::time::timeout(GUARD, csr)
            .await
            .expect("every CSR is answered")
            .expect("task")
            .expect("response");
        assert_eq!(response.status, 503, "{}", response.problem_detail());
        assert!(response.headers.contains_key("retry-after"));
        assert!(
            response
                .problem_detail()
                .contains(&format!("TPM {}", swtpm.tcti())),
            "the 503 names the TPM: {}",
            response.problem_detail()
        );
    }

    swtpm.resume();
    let deadline = tokio::time::Instant::now() + GUARD;
    loop {
        let response = vnfm.post_json(CSRS, &body).await.expect("csr");
        if response.status == 201 {
            issued += 1;
            break;
        }
        assert_eq!(response.status, 503, "{}", response.problem_detail());
        assert!(
            tokio::time::Instant::now() < deadline,
            "issuance did not resume after SIGCONT"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(vnfm);
    agent.stop();
    let store = nfv_warden::store::Store::open(&agent.store_path()).expect("store");
    // Not counting the CA and TLS certificates `ca init` / `tls init` recorded.
    let stored = store
        .read(|tx| tx.list(&nfv_warden::cmf::CERTIFICATES, ""))
        .expect("records")
        .into_iter()
        .filter(|(_, r)| r.consumer != nfv_warden::cmf::records::AGENT_CONSUMER)
        .count() as u64;
    assert_eq!(
        stored, issued,
        "acknowledged = stored; the 503s issued nothing"
    );
}
