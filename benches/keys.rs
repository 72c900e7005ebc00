//! Sign throughput through the key layer against raw cryptoki calls on the same SoftHSM
//! token: EC P-256 and RSA-2048, with 1 and 2 sessions (threads).
//!
//! `cargo bench --bench keys` (BENCH_SECONDS=6 by default per case, in 6 interleaved rounds). Raw ECDSA includes the
//! SHA-256 the application must do itself (SoftHSM has no CKM_ECDSA_SHA256); the key layer
//! also DER-encodes the signature and goes through the session pool.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "../tests/common/softhsm.rs"]
#[allow(dead_code)]
mod softhsm;

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass};
use nfv_warden::config::{Pkcs11Config, SecretSource};
use nfv_warden::keys::pkcs11::{Library, Pkcs11KeyStore};
use nfv_warden::keys::{HashAlgorithm, KeyAlgorithm, KeySpec, KeyStore, SignatureScheme};

fn main() {
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    let run = Duration::from_secs(seconds);
    // SoftHSM reads SOFTHSM2_CONF once, at C_Initialize: the token exists before that.
    let tokens = softhsm::TokenDir::new();
    let pin = tokens.init_token("bench", "1234");
    std::env::set_var("SOFTHSM2_CONF", &tokens.conf);
    let config = Pkcs11Config {
        module: PathBuf::from("/usr/lib/softhsm/libsofthsm2.so"),
        token_label: Some("bench".into()),
        token_serial: None,
        pin: SecretSource::File(pin),
        pool_size: 2,
        reinit_backoff_ms: 100,
        reinit_backoff_max_ms: 1000,
        recovery_attempts: 4,
    };
    let store = Arc::new(Pkcs11KeyStore::open(&config).expect("open"));
    println!("keys: SoftHSM2 token, {seconds} s per case");
    for (algorithm, scheme) in [
        (KeyAlgorithm::EcP256, SignatureScheme::EcdsaSha256),
        (KeyAlgorithm::Rsa2048, SignatureScheme::RsaPkcs1Sha256),
    ] {
        let label = format!("bench-{algorithm}");
        let key = store
            .generate(&KeySpec {
                label: label.clone(),
                algorithm,
            })
            .expect("generate")
            .reference;
        for threads in [1usize, 2] {
            // Interleave short rounds of both, so drift of the shared machine hits both alike;
            // report the totals and the median of the per-round ratios.
            let (mut layer_total, mut raw_total, mut ratios) = (0.0, 0.0, Vec::new());
            for _ in 0..ROUNDS {
                let layer = rate(threads, run / ROUNDS, {
                    let store = store.clone();
                    let key = key.clone();
                    move |_| {
                        let store = store.clone();
                        let key = key.clone();
                        Box::new(move |msg: &[u8]| {
                            store.sign(&key, scheme, msg).expect("sign");
                        })
                    }
                });
                let raw = rate(threads, run / ROUNDS, {
                    let store = store.clone();
                    let label = label.clone();
                    move |_| {
                        let slot = store.slot_id().expect("slot");
                        // Raw calls go through the agent's gate too; the guard lives as long
                        // as the bench thread (a leaked library handle gives it 'static).
                        let library: &'static Library =
                            Box::leak(Box::new(store.library().clone()));
                        let entered = library.enter();
                        let session = entered.pkcs11().open_rw_session(slot).expect("session");
                        let handle = session
                            .find_objects(&[
                                Attribute::Class(ObjectClass::PRIVATE_KEY),
                                Attribute::Label(label.as_bytes().to_vec()),
                            ])
                            .expect("find")[0];
                        Box::new(move |msg: &[u8]| {
                            let _inside = &entered;
                            if scheme.is_ecdsa() {
                                let digest = HashAlgorithm::Sha256.digest(msg);
                                session
                                    .sign(&Mechanism::Ecdsa, handle, &digest)
                                    .expect("C_Sign");
                            } else {
                                session
                                    .sign(&Mechanism::Sha256RsaPkcs, handle, msg)
                                    .expect("C_Sign");
                            }
                        })
                    }
                });
                layer_total += layer;
                raw_total += raw;
                ratios.push(layer / raw);
            }
            ratios.sort_by(|a, b| a.total_cmp(b));
            println!(
                "keys: {algorithm:<8} {threads} session(s): key layer {:>8.0} signs/s, raw cryptoki {:>8.0} signs/s, ratio {:.1} % (median of {ROUNDS} rounds {:.1} %)",
                layer_total / f64::from(ROUNDS),
                raw_total / f64::from(ROUNDS),
                100.0 * layer_total / raw_total,
                100.0 * ratios[ratios.len() / 2]
            );
        }
    }
}

const ROUNDS: u32 = 6;

// Made and used on its bench thread (a raw closure holds a gate guard, which stays put).
type SignFn = Box<dyn FnMut(&[u8])>;

/// Signs per second with `threads` threads, each with the signer `make` builds for it.
fn rate(
    threads: usize,
    run: Duration,
    make: impl Fn(usize) -> SignFn + Send + Sync + 'static,
) -> f64 {
    let make = Arc::new(make);
    let barrier = Arc::new(std::sync::Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let make = make.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut sign = make(t);
                let message = [7u8; 64];
                sign(&message); // warm up (handle lookup, session)
                barrier.wait();
                let start = Instant::now();
                let mut n = 0u64;
                while start.elapsed() < run {
                    sign(&message);
                    n += 1;
                }
                n as f64 / start.elapsed().as_secs_f64()
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("bench thread"))
        .sum()
}
