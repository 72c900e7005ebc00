//! TPM signing throughput against a private swtpm: `cargo bench --bench tpm`.
//!
//! Measures the whole path a caller sees: hash in the agent, channel to the owner thread,
//! TPM2_Sign on a persistent key over the swtpm TCTI (TCP on 127.0.0.1), DER encoding.

#[path = "../tests/common/swtpm.rs"]
mod swtpm;

use std::time::{Duration, Instant};

use nfv_warden::keys::tpm::TpmKeyStore;
use nfv_warden::keys::{KeyAlgorithm, KeySpec, KeyStore, SignatureScheme};

const RUN_FOR: Duration = Duration::from_secs(4);

fn main() {
    let tpm = swtpm::Swtpm::start();
    let store = TpmKeyStore::open(&swtpm::tpm_config(&tpm.tcti())).expect("open TPM key store");
    println!("device: {}", store.device());

    for (algorithm, scheme) in [
        (KeyAlgorithm::EcP256, SignatureScheme::EcdsaSha256),
        (KeyAlgorithm::Rsa2048, SignatureScheme::RsaPkcs1Sha256),
        (KeyAlgorithm::Rsa2048, SignatureScheme::RsaPssSha256),
    ] {
        let key = store
            .generate(&KeySpec {
                label: format!("bench-{algorithm}"),
                algorithm,
            })
            .expect("generate")
            .reference;
        for threads in [1usize, 2] {
            let started = Instant::now();
            let total: u64 = std::thread::scope(|scope| {
                let workers: Vec<_> = (0..threads)
                    .map(|t| {
                        let (store, key) = (&store, &key);
                        scope.spawn(move || {
                            let mut count = 0u64;
                            while started.elapsed() < RUN_FOR {
                                let message = [t as u64, count].map(u64::to_be_bytes).concat();
                                store.sign(key, scheme, &message).expect("sign");
                                count += 1;
                            }
                            count
                        })
                    })
                    .collect();
                workers.into_iter().map(|w| w.join().expect("worker")).sum()
            });
            let elapsed = started.elapsed().as_secs_f64();
            println!(
                "{:<9} {:<17} {threads} thread(s): {total:>6} signs in {elapsed:.1} s = {:>7.0} signs/s ({:.3} ms/sign)",
                algorithm.as_str(),
                scheme.as_str(),
                total as f64 / elapsed,
                elapsed * 1000.0 / total as f64
            );
        }
    }
    assert_eq!(store.transient_handle_count().expect("count"), 0);
}
