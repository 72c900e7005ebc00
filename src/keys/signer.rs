//! Adapters that make any key of any backend usable where the ecosystem expects a signer:
//! the x509-cert 0.3 builder (certificates, CSRs, CRLs signed by a CA key in the HSM/TPM)
//! and rustls (the agent's own TLS key in the HSM/TPM).
//!
//! rustls calls `Signer::sign` synchronously inside the handshake; the call goes to the key
//! layer, which blocks on a pooled PKCS#11 session or on the TPM thread. That is a fraction of
//! a millisecond on an HSM and about a millisecond on a TPM, the cost of a hardware key; but a
//! hung device would block the caller for as long as it hangs. The server therefore signs
//! through a [`SigningPool`] ([`HardwareKey::into_rustls_bounded`]): the signature is made on
//! one of a few dedicated threads, and the handshake waits for it at most a deadline, past
//! which it fails (the connection is closed) instead of hanging. See `api::serve` for how the
//! waiting thread is kept off the tokio workers.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

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

    /// This key as a rustls signing key, for `CertifiedKey::new`; it signs on the calling
    /// thread (a client's handshake, where the caller owns the connection).
    pub fn into_rustls(self) -> Arc<dyn rustls::sign::SigningKey> {
        Arc::new(RustlsKey {
            key: self,
            pool: None,
        })
    }

    /// This key as a rustls signing key that signs on `pool`, waiting at most the pool's
    /// deadline (the server's TLS key).
    pub fn into_rustls_bounded(self, pool: Arc<SigningPool>) -> Arc<dyn rustls::sign::SigningKey> {
        Arc::new(RustlsKey {
            key: self,
            pool: Some(pool),
        })
    }
}

/// Why a signature through the [`SigningPool`] was not made.
#[derive(Debug, thiserror::Error)]
pub enum PoolSignError {
    #[error("{0}")]
    Key(#[source] KeyError),
    #[error("all {threads} signing threads are busy and {queued} signatures wait already")]
    QueueFull { threads: usize, queued: usize },
    #[error("no signature within the deadline of {0:?}")]
    Deadline(Duration),
    #[error("the signing threads have stopped")]
    Stopped,
}

type SigningJob = Box<dyn FnOnce() + Send>;

/// A few dedicated threads that make TLS handshake signatures, with a bounded queue and a
/// deadline per signature. A signature that misses its deadline leaves its thread waiting on
/// the device (a device call cannot be interrupted), but never more than `threads` of them,
/// and the handshake that asked has long failed and freed its connection.
pub struct SigningPool {
    jobs: std::sync::mpsc::SyncSender<SigningJob>,
    threads: usize,
    queue: usize,
    deadline: Duration,
    /// Signatures that missed the deadline or found the queue full, since start.
    timeouts: Arc<AtomicU64>,
}

impl fmt::Debug for SigningPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningPool")
            .field("threads", &self.threads)
            .field("queue", &self.queue)
            .field("deadline", &self.deadline)
            .finish()
    }
}

impl SigningPool {
    /// Start `threads` signing threads, with room for `queue` waiting signatures; `timeouts`
    /// counts the signatures that missed the deadline or found the queue full.
    pub fn new(
        threads: usize,
        queue: usize,
        deadline: Duration,
        timeouts: Arc<AtomicU64>,
    ) -> std::io::Result<SigningPool> {
        let (jobs, receiver) = std::sync::mpsc::sync_channel::<SigningJob>(queue);
        let receiver = Arc::new(std::sync::Mutex::new(receiver));
        for n in 0..threads.max(1) {
            let receiver = receiver.clone();
            std::thread::Builder::new()
                .name(format!("tls-sign-{n}"))
                .spawn(move || loop {
                    // The lock is held only while waiting for the next job, never while
                    // signing; a poisoned lock cannot happen as nothing panics under it.
                    let job = match receiver.lock() {
                        Ok(receiver) => receiver.recv(),
                        Err(_) => return,
                    };
                    match job {
                        Ok(job) => job(),
                        // The pool (its sender) is gone: the process is stopping.
                        Err(_) => return,
                    }
                })?;
        }
        Ok(SigningPool {
            jobs,
            threads: threads.max(1),
            queue,
            deadline,
            timeouts,
        })
    }

    /// Run `sign` on a signing thread and wait for its result at most the deadline. On a
    /// multi-thread tokio worker the wait is announced with `block_in_place`, so the
    /// worker's other tasks move to another thread meanwhile.
    pub fn sign(
        &self,
        sign: impl FnOnce() -> Result<Vec<u8>, KeyError> + Send + 'static,
    ) -> Result<Vec<u8>, PoolSignError> {
        let (done, result) = std::sync::mpsc::sync_channel(1);
        let job: SigningJob = Box::new(move || {
            // The waiter may have given up (deadline): nobody to tell then.
            let _ = done.send(sign());
        });
        match self.jobs.try_send(job) {
            Ok(()) => {}
            Err(std::sync::mpsc::TrySendError::Full(_)) => {
                self.timeouts.fetch_add(1, Ordering::Relaxed);
                return Err(PoolSignError::QueueFull {
                    threads: self.threads,
                    queued: self.queue,
                });
            }
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => {
                return Err(PoolSignError::Stopped)
            }
        }
        let wait = || result.recv_timeout(self.deadline);
        let on_multi_thread_runtime = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let outcome = if on_multi_thread_runtime {
            // Outside a worker (a blocking-pool thread, where the server normally calls
            // this) block_in_place just runs the closure.
            tokio::task::block_in_place(wait)
        } else {
            wait()
        };
        match outcome {
            Ok(signed) => signed.map_err(PoolSignError::Key),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                self.timeouts.fetch_add(1, Ordering::Relaxed);
                Err(PoolSignError::Deadline(self.deadline))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(PoolSignError::Stopped),
        }
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

/// A [`HardwareKey`] as rustls signs with it: on the calling thread, or through a pool.
#[derive(Debug)]
struct RustlsKey {
    key: HardwareKey,
    pool: Option<Arc<SigningPool>>,
}

impl rustls::sign::SigningKey for RustlsKey {
    fn choose_scheme(
        &self,
        offered: &[rustls::SignatureScheme],
    ) -> Option<Box<dyn rustls::sign::Signer>> {
        use rustls::SignatureScheme as Tls;
        // Our preference first; TLS 1.3 allows only PSS for RSA and the curve's hash for
        // ECDSA, and rustls offers only what the negotiated version allows.
        let preferences: &[(Tls, SignatureScheme)] = match self.key.public.algorithm {
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
                    key: self.key.clone(),
                    pool: self.pool.clone(),
                    tls,
                    scheme,
                }) as Box<dyn rustls::sign::Signer>
            })
    }

    fn public_key(&self) -> Option<rustls::pki_types::SubjectPublicKeyInfoDer<'_>> {
        Some(rustls::pki_types::SubjectPublicKeyInfoDer::from(
            self.key.public.spki_der.as_slice(),
        ))
    }

    fn algorithm(&self) -> rustls::SignatureAlgorithm {
        if self.key.public.algorithm.is_rsa() {
            rustls::SignatureAlgorithm::RSA
        } else {
            rustls::SignatureAlgorithm::ECDSA
        }
    }
}

struct TlsSigner {
    key: HardwareKey,
    pool: Option<Arc<SigningPool>>,
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
        let signed = match &self.pool {
            None => self
                .key
                .store
                .sign(&self.key.key, self.scheme, message)
                .map_err(PoolSignError::Key),
            Some(pool) => {
                let (store, key, scheme) =
                    (self.key.store.clone(), self.key.key.clone(), self.scheme);
                let message = message.to_vec();
                pool.sign(move || store.sign(&key, scheme, &message))
            }
        };
        signed.map_err(|e| {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The deadline and the queue bound hold whatever the job does; here a job that waits
    /// until released stands for a device that hangs, and the pool serves again once it
    /// returns.
    #[test]
    fn a_signature_past_the_deadline_fails_and_the_pool_recovers() {
        let timeouts = Arc::new(AtomicU64::new(0));
        let pool =
            SigningPool::new(1, 1, Duration::from_millis(200), timeouts.clone()).expect("pool");
        let (started, running) = std::sync::mpsc::channel::<()>();
        let (release, hung) = std::sync::mpsc::channel::<()>();
        let stuck = pool.sign(move || {
            let _ = started.send(());
            let _ = hung.recv();
            Ok(vec![1])
        });
        assert!(
            matches!(stuck, Err(PoolSignError::Deadline(_))),
            "{stuck:?}"
        );
        running
            .recv_timeout(Duration::from_secs(60))
            .expect("the signing thread took the job");
        // The one thread hangs: the next signature waits in the queue and misses its
        // deadline, the one after finds the queue full.
        let queued = pool.sign(|| Ok(vec![2]));
        assert!(
            matches!(queued, Err(PoolSignError::Deadline(_))),
            "{queued:?}"
        );
        let full = pool.sign(|| Ok(vec![3]));
        assert!(
            matches!(full, Err(PoolSignError::QueueFull { .. })),
            "{full:?}"
        );
        assert_eq!(timeouts.load(Ordering::Relaxed), 3);
        // The device answers again: the stale job drains and new signatures are made.
        release.send(()).expect("release");
        let start = std::time::Instant::now();
        loop {
            match pool.sign(|| Ok(vec![4])) {
                Ok(signature) => {
                    assert_eq!(signature, vec![4]);
                    break;
                }
                Err(e) => assert!(
                    start.elapsed() < Duration::from_secs(60),
                    "pool did not recover: {e}"
                ),
            }
        }
    }
}
