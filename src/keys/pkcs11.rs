//! PKCS#11 backend (cryptoki).
//!
//! One initialized library per module per process ([`Library`], shared by every store on
//! that module: `C_Initialize` may run once per process), one login per token, and a bounded
//! pool of sessions per store. Sessions are `Send` but not `Sync`, so each caller borrows one
//! for the duration of its call; when all are busy the caller waits (it does not fail).
//!
//! Recovery climbs a fixed ladder without restarting the agent:
//! 1. a dead session (`CKR_SESSION_HANDLE_INVALID`, `CKR_SESSION_CLOSED`) is replaced;
//! 2. `CKR_USER_NOT_LOGGED_IN` logs in again;
//! 3. `CKR_DEVICE_REMOVED`, `CKR_TOKEN_NOT_PRESENT`, `CKR_CRYPTOKI_NOT_INITIALIZED`,
//!    `CKR_DEVICE_ERROR` finalize and re-initialize the library, with backoff.
//!
//! A rejected PIN (`CKR_PIN_INCORRECT`, `CKR_PIN_LOCKED`) is never retried: every retry would
//! count against the token's PIN counter and could lock it. The store stays failed until the
//! operator fixes the PIN and restarts it.
//!
//! SoftHSM 2.6 has no `CKM_ECDSA_SHA256`: ECDSA hashes in the agent and signs with
//! `CKM_ECDSA`, then DER-encodes the raw `r || s`. RSA uses the hash-and-sign mechanisms
//! (`CKM_SHA256_RSA_PKCS`, `CKM_SHA256_RSA_PKCS_PSS`, ...), which every token has.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, RwLock};
use std::time::Duration;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Function, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use secrecy::SecretString;
use spki::EncodePublicKey;

use super::{
    ecdsa_raw_to_der, ErasureRecord, KeyAlgorithm, KeyError, KeyInfo, KeyRef, KeySpec, KeyStore,
    Pkcs11Uri, PublicKey, SignatureScheme, TokenSelector,
};
use crate::config::Pkcs11Config;

/// DER of the named-curve OIDs for CKA_EC_PARAMS (RFC 5480).
const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const P384_PARAMS: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];

/// A PKCS#11 token used as a key store.
pub struct Pkcs11KeyStore {
    library: Arc<Library>,
    token: TokenSelector,
    pin: SecretString,
    pool_size: usize,
    recovery_attempts: u32,
    backoff: Backoff,
    pool: Mutex<Pool>,
    pool_freed: Condvar,
    /// Slot of the token in the current library generation, resolved by label/serial.
    slot: Mutex<Option<(u64, Slot, String)>>,
    /// Set once the token rejected the PIN: nothing logs in again.
    pin_rejected: Mutex<Option<RvError>>,
    /// Object handles found by URI, valid for one library generation.
    handles: RwLock<HashMap<Pkcs11Uri, CachedKey>>,
    stats: RecoveryCounters,
}

#[derive(Default)]
struct RecoveryCounters {
    sessions_replaced: AtomicU64,
    logins: AtomicU64,
    reinitializations: AtomicU64,
}

/// How often each rung of the recovery ladder was climbed since the store opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecoveryStats {
    pub sessions_replaced: u64,
    pub logins: u64,
    pub reinitializations: u64,
}

#[derive(Clone, Copy)]
struct CachedKey {
    generation: u64,
    private: ObjectHandle,
    algorithm: KeyAlgorithm,
}

struct Pool {
    idle: Vec<PooledSession>,
    /// Sessions that exist: idle plus lent out.
    open: usize,
}

struct PooledSession {
    session: Session,
    generation: u64,
}

#[derive(Clone, Copy)]
struct Backoff {
    first: Duration,
    max: Duration,
}

impl Backoff {
    fn delay(self, attempt: u32) -> Duration {
        self.first
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max)
    }
}

/// One loaded and initialized PKCS#11 module, shared process-wide.
pub struct Library {
    module: PathBuf,
    state: Mutex<LibraryState>,
    /// Held shared for the duration of every call into the module, and exclusively by
    /// re-initialization: C_Finalize while another thread is inside a call is undefined
    /// behaviour (PKCS#11 2.40 5.4), and in SoftHSM a use-after-free.
    calls: RwLock<()>,
    /// Mirror of `LibraryState::generation`, read on every call without taking the lock.
    generation: AtomicU64,
}

struct LibraryState {
    pkcs11: Pkcs11,
    /// Bumped at every re-initialization: sessions and object handles of an older
    /// generation are dead and must not be closed (their numbers may be reused).
    generation: u64,
    initialized: bool,
}

impl Library {
    /// The process-wide library for `module`, loaded and initialized on first use.
    pub fn shared(module: &Path) -> Result<Arc<Library>, KeyError> {
        static LIBRARIES: OnceLock<Mutex<HashMap<PathBuf, Arc<Library>>>> = OnceLock::new();
        let mut libraries = lock(LIBRARIES.get_or_init(Default::default));
        if let Some(library) = libraries.get(module) {
            return Ok(library.clone());
        }
        let pkcs11 = Pkcs11::new(module).map_err(|e| KeyError::Module {
            module: module.display().to_string(),
            reason: e.to_string(),
        })?;
        let library = Arc::new(Library {
            module: module.to_path_buf(),
            state: Mutex::new(LibraryState {
                pkcs11,
                generation: 1,
                initialized: false,
            }),
            calls: RwLock::new(()),
            generation: AtomicU64::new(1),
        });
        library.initialize()?;
        libraries.insert(module.to_path_buf(), library.clone());
        Ok(library)
    }

    /// The cryptoki context and its generation (for raw calls in tests and benchmarks).
    pub fn context(&self) -> (Pkcs11, u64) {
        let state = lock(&self.state);
        (state.pkcs11.clone(), state.generation)
    }

    /// The current generation (bumped by every re-initialization).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn module(&self) -> &Path {
        &self.module
    }

    fn initialize(&self) -> Result<(), KeyError> {
        let mut state = lock(&self.state);
        if state.initialized {
            return Ok(());
        }
        initialize_locked(&mut state).map_err(|e| KeyError::Module {
            module: self.module.display().to_string(),
            reason: format!("C_Initialize: {e}"),
        })
    }

    /// Step 3 of the ladder: finalize and initialize again, once per generation (callers that
    /// saw the same failure share one re-initialization).
    fn reinitialize(&self, seen_generation: u64) -> Result<(), KeyError> {
        let _exclusive = self.calls.write().unwrap_or_else(|p| p.into_inner());
        let mut state = lock(&self.state);
        if state.generation != seen_generation && state.initialized {
            return Ok(());
        }
        tracing::warn!(module = %self.module.display(), "re-initializing the PKCS#11 library");
        if state.initialized {
            // Sessions of the old generation are abandoned without C_CloseSession.
            let _ = state.pkcs11.clone().finalize();
            state.initialized = false;
        }
        state.generation += 1;
        self.generation.store(state.generation, Ordering::Release);
        initialize_locked(&mut state).map_err(|e| KeyError::Unavailable {
            operation: "C_Initialize",
            reason: e.to_string(),
        })
    }
}

/// C_Initialize with OS locking (without it SoftHSM runs without its own locks); a library
/// someone else in the process initialized already counts as initialized.
fn initialize_locked(state: &mut LibraryState) -> Result<(), CkError> {
    match state
        .pkcs11
        .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
    {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {
            state.initialized = true;
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// How a failed call is handled.
enum Recovery {
    ReplaceSession,
    LogIn,
    Reinitialize,
    /// The cached object handle is stale (the token changed under us): look it up again.
    ForgetHandle,
    Fail,
}

fn classify(error: &CkError) -> Recovery {
    match error {
        CkError::Pkcs11(rv, _) => match rv {
            RvError::SessionHandleInvalid | RvError::SessionClosed => Recovery::ReplaceSession,
            RvError::UserNotLoggedIn => Recovery::LogIn,
            RvError::DeviceRemoved
            | RvError::TokenNotPresent
            | RvError::CryptokiNotInitialized
            | RvError::DeviceError
            | RvError::SlotIdInvalid => Recovery::Reinitialize,
            RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid => Recovery::ForgetHandle,
            _ => Recovery::Fail,
        },
        _ => Recovery::Fail,
    }
}

fn function_name(function: Function) -> &'static str {
    match function {
        Function::Initialize => "C_Initialize",
        Function::OpenSession => "C_OpenSession",
        Function::Login => "C_Login",
        Function::Sign => "C_Sign",
        Function::SignInit => "C_SignInit",
        Function::GenerateKeyPair => "C_GenerateKeyPair",
        Function::FindObjectsInit => "C_FindObjectsInit",
        Function::FindObjects => "C_FindObjects",
        Function::GetAttributeValue => "C_GetAttributeValue",
        Function::DestroyObject => "C_DestroyObject",
        Function::GetTokenInfo => "C_GetTokenInfo",
        Function::GetSlotList => "C_GetSlotList",
        _ => "PKCS#11 call",
    }
}

fn ck_error(error: CkError) -> KeyError {
    match error {
        CkError::Pkcs11(rv @ (RvError::PinIncorrect | RvError::PinLocked), f) => {
            let _ = rv;
            KeyError::PinIncorrect {
                function: function_name(f),
            }
        }
        CkError::Pkcs11(_, f) => KeyError::Pkcs11 {
            function: function_name(f),
            source: error,
        },
        other => KeyError::Pkcs11 {
            function: "PKCS#11 call",
            source: other,
        },
    }
}

/// A session lent out of the pool; goes back on drop unless it was found dead.
struct SessionLease<'a> {
    store: &'a Pkcs11KeyStore,
    session: Option<PooledSession>,
}

impl SessionLease<'_> {
    fn session(&self) -> &Session {
        // Invariant: `session` is Some from creation until drop or `discard`.
        &self
            .session
            .as_ref()
            .expect("lease holds a session until dropped")
            .session
    }

    fn generation(&self) -> u64 {
        self.session.as_ref().map_or(0, |s| s.generation)
    }

    /// The session is dead: forget it without closing (its handle may be reused).
    fn discard(mut self) {
        if let Some(pooled) = self.session.take() {
            std::mem::forget(pooled.session);
        }
        let mut pool = lock(&self.store.pool);
        pool.open -= 1;
        self.store.pool_freed.notify_one();
    }
}

impl Drop for SessionLease<'_> {
    fn drop(&mut self) {
        let Some(pooled) = self.session.take() else {
            return;
        };
        let current = self.store.library.generation();
        let mut pool = lock(&self.store.pool);
        if pooled.generation == current {
            pool.idle.push(pooled);
        } else {
            // Sessions of an older generation were closed by C_Finalize.
            std::mem::forget(pooled.session);
            pool.open -= 1;
        }
        self.store.pool_freed.notify_one();
    }
}

impl Pkcs11KeyStore {
    /// Load the module, find the token by label/serial, read the PIN, log in.
    pub fn open(config: &Pkcs11Config) -> Result<Pkcs11KeyStore, KeyError> {
        let pin = config.pin.read().map_err(KeyError::Pin)?;
        let library = Library::shared(&config.module)?;
        let store = Pkcs11KeyStore {
            library,
            token: config.token(),
            pin,
            pool_size: config.pool_size.max(1),
            recovery_attempts: config.recovery_attempts,
            backoff: Backoff {
                first: Duration::from_millis(config.reinit_backoff_ms),
                max: Duration::from_millis(config.reinit_backoff_max_ms),
            },
            pool: Mutex::new(Pool {
                idle: Vec::new(),
                open: 0,
            }),
            pool_freed: Condvar::new(),
            slot: Mutex::new(None),
            pin_rejected: Mutex::new(None),
            handles: RwLock::new(HashMap::new()),
            stats: RecoveryCounters::default(),
        };
        // Resolve the token, check the pool size against its limits, and log in now, so a
        // wrong PIN or a missing token is reported at start, not at the first request.
        let (_, slot, _) = store.slot()?;
        let (pkcs11, _) = store.library.context();
        if let Ok(info) = pkcs11.get_token_info(slot) {
            if let cryptoki::slot::Limit::Max(max) = info.max_session_count() {
                if max > 0 && store.pool_size as u64 >= max {
                    return Err(KeyError::InvalidArgument(format!(
                        "pool_size {} is not below the token's maximum of {max} sessions",
                        store.pool_size
                    )));
                }
            }
        }
        let lease = store.acquire()?;
        drop(lease);
        Ok(store)
    }

    pub fn recovery_stats(&self) -> RecoveryStats {
        RecoveryStats {
            sessions_replaced: self.stats.sessions_replaced.load(Ordering::Relaxed),
            logins: self.stats.logins.load(Ordering::Relaxed),
            reinitializations: self.stats.reinitializations.load(Ordering::Relaxed),
        }
    }

    /// The shared library (raw cryptoki access for tests and benchmarks).
    pub fn library(&self) -> &Arc<Library> {
        &self.library
    }

    /// The slot currently holding the token.
    pub fn slot_id(&self) -> Result<Slot, KeyError> {
        Ok(self.slot()?.1)
    }

    /// Read back the protection attributes of a private key.
    pub fn private_key_attributes(&self, key: &KeyRef) -> Result<PrivateKeyAttributes, KeyError> {
        let uri = self.own_uri(key)?;
        self.with_session("C_GetAttributeValue", |session, generation| {
            let cached = self.find_private(session, generation, uri)?;
            let attributes = session.get_attributes(
                cached.private,
                &[
                    AttributeType::Extractable,
                    AttributeType::Sensitive,
                    AttributeType::NeverExtractable,
                    AttributeType::AlwaysSensitive,
                    AttributeType::Token,
                    AttributeType::Private,
                ],
            )?;
            let mut out = PrivateKeyAttributes::default();
            for attribute in attributes {
                match attribute {
                    Attribute::Extractable(v) => out.extractable = v,
                    Attribute::Sensitive(v) => out.sensitive = v,
                    Attribute::NeverExtractable(v) => out.never_extractable = v,
                    Attribute::AlwaysSensitive(v) => out.always_sensitive = v,
                    Attribute::Token(v) => out.token = v,
                    Attribute::Private(v) => out.private = v,
                    _ => {}
                }
            }
            Ok(out)
        })
    }

    /// Try to read CKA_VALUE of a private key. A correct token refuses; this exists so the
    /// tests and `warden check` can prove it.
    pub fn read_private_value(&self, key: &KeyRef) -> Result<Vec<u8>, KeyError> {
        let uri = self.own_uri(key)?;
        self.with_session("C_GetAttributeValue", |session, generation| {
            let cached = self.find_private(session, generation, uri)?;
            let attributes = session.get_attributes(cached.private, &[AttributeType::Value])?;
            attributes
                .into_iter()
                .find_map(|a| match a {
                    Attribute::Value(v) => Some(v),
                    _ => None,
                })
                .ok_or(OpError::Key(KeyError::Unsupported(
                    "reading CKA_VALUE of a private key".into(),
                )))
        })
    }

    fn own_uri<'k>(&self, key: &'k KeyRef) -> Result<&'k Pkcs11Uri, KeyError> {
        match key {
            KeyRef::Pkcs11(uri) => {
                let label_ok = match (&uri.token.label, &self.token.label) {
                    (Some(a), Some(b)) => a == b,
                    _ => true,
                };
                // The serial is only looked up when the reference names one (hot path).
                let serial_ok = match uri.token.serial.as_deref() {
                    None => true,
                    Some(s) => s == self.slot()?.2,
                };
                if label_ok && serial_ok {
                    Ok(uri)
                } else {
                    Err(KeyError::WrongBackend(key.to_string()))
                }
            }
            KeyRef::Tpm(_) => Err(KeyError::WrongBackend(key.to_string())),
        }
    }

    /// The token's slot in the current generation, found by label/serial.
    fn slot(&self) -> Result<(u64, Slot, String), KeyError> {
        let (pkcs11, generation) = self.library.context();
        let mut cached = lock(&self.slot);
        if let Some(entry) = cached.as_ref() {
            if entry.0 == generation {
                return Ok(entry.clone());
            }
        }
        let slots = pkcs11
            .get_slots_with_initialized_token()
            .map_err(|e| match classify(&e) {
                Recovery::Reinitialize => KeyError::Unavailable {
                    operation: "C_GetSlotList",
                    reason: e.to_string(),
                },
                _ => ck_error(e),
            })?;
        for slot in slots {
            let Ok(info) = pkcs11.get_token_info(slot) else {
                continue;
            };
            if self.token.matches(info.label(), info.serial_number()) {
                let entry = (
                    generation,
                    slot,
                    info.serial_number().trim_end().to_string(),
                );
                *cached = Some(entry.clone());
                return Ok(entry);
            }
        }
        Err(KeyError::TokenNotFound(self.token.to_string()))
    }

    /// Borrow a session, waiting while the pool is exhausted; opens and logs in lazily.
    fn acquire(&self) -> Result<SessionLease<'_>, KeyError> {
        if let Some(rv) = *lock(&self.pin_rejected) {
            let _ = rv;
            return Err(KeyError::PinIncorrect {
                function: "C_Login",
            });
        }
        let generation = self.library.generation();
        {
            let mut pool = lock(&self.pool);
            loop {
                // Drop idle sessions of an old generation (closed by C_Finalize).
                let before = pool.idle.len();
                pool.idle.retain(|s| s.generation == generation);
                let stale = before - pool.idle.len();
                pool.open -= stale;
                if let Some(session) = pool.idle.pop() {
                    return Ok(SessionLease {
                        store: self,
                        session: Some(session),
                    });
                }
                if pool.open < self.pool_size {
                    pool.open += 1;
                    break;
                }
                pool = self
                    .pool_freed
                    .wait(pool)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
            }
        }
        // A slot in the pool is reserved: open a session outside the lock.
        match self.open_session() {
            Ok(session) => Ok(SessionLease {
                store: self,
                session: Some(session),
            }),
            Err(e) => {
                let mut pool = lock(&self.pool);
                pool.open -= 1;
                self.pool_freed.notify_one();
                Err(e)
            }
        }
    }

    fn open_session(&self) -> Result<PooledSession, KeyError> {
        let (generation, slot, _) = self.slot()?;
        let (pkcs11, _) = self.library.context();
        let session = pkcs11
            .open_rw_session_no_drop(slot)
            .map_err(|e| match classify(&e) {
                Recovery::Reinitialize | Recovery::ReplaceSession => KeyError::Unavailable {
                    operation: "C_OpenSession",
                    reason: e.to_string(),
                },
                _ => ck_error(e),
            })?;
        let pooled = PooledSession {
            session,
            generation,
        };
        if let Err(e) = self.login(&pooled.session) {
            let _ = pooled.session.close();
            return Err(e);
        }
        Ok(pooled)
    }

    /// Log in (once per token per process; later sessions share the login state).
    fn login(&self, session: &Session) -> Result<(), KeyError> {
        let mut rejected = lock(&self.pin_rejected);
        if rejected.is_some() {
            return Err(KeyError::PinIncorrect {
                function: "C_Login",
            });
        }
        match session.login(UserType::User, Some(&self.pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
            Err(CkError::Pkcs11(rv @ (RvError::PinIncorrect | RvError::PinLocked), _)) => {
                tracing::error!(token = %self.token, "the token rejected the PIN; not retrying");
                *rejected = Some(rv);
                Err(KeyError::PinIncorrect {
                    function: "C_Login",
                })
            }
            Err(e) => Err(match classify(&e) {
                Recovery::Reinitialize | Recovery::ReplaceSession => KeyError::Unavailable {
                    operation: "C_Login",
                    reason: e.to_string(),
                },
                _ => ck_error(e),
            }),
        }
    }

    /// Run `op` on a pooled session, climbing the recovery ladder on failure.
    fn with_session<T>(
        &self,
        operation: &'static str,
        mut op: impl FnMut(&Session, u64) -> Result<T, OpError>,
    ) -> Result<T, KeyError> {
        let mut last: Option<KeyError> = None;
        let mut reinit_attempt = 0u32;
        for _ in 0..=self.recovery_attempts.max(1) * 2 {
            let lease = match self.acquire() {
                Ok(lease) => lease,
                Err(e) if e.is_transient() || matches!(e, KeyError::TokenNotFound(_)) => {
                    // Token gone or library dead: re-initialize with backoff.
                    if reinit_attempt >= self.recovery_attempts {
                        return Err(unavailable(operation, e));
                    }
                    std::thread::sleep(self.backoff.delay(reinit_attempt));
                    reinit_attempt += 1;
                    self.stats.reinitializations.fetch_add(1, Ordering::Relaxed);
                    let generation = self.library.generation();
                    if let Err(e2) = self.library.reinitialize(generation) {
                        last = Some(e2);
                    } else {
                        last = Some(e);
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            let generation = lease.generation();
            let gate = self.library.calls.read().unwrap_or_else(|p| p.into_inner());
            let outcome = op(lease.session(), generation);
            drop(gate);
            match outcome {
                Ok(value) => return Ok(value),
                Err(OpError::Key(e)) => return Err(e),
                Err(OpError::Ck(e)) => match classify(&e) {
                    Recovery::ReplaceSession => {
                        tracing::info!(operation, error = %e, "replacing a dead PKCS#11 session");
                        lease.discard();
                        self.stats.sessions_replaced.fetch_add(1, Ordering::Relaxed);
                        last = Some(ck_error(e));
                    }
                    Recovery::LogIn => {
                        self.stats.logins.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(operation, "logging in again");
                        let relogin = self.login(lease.session());
                        drop(lease);
                        relogin?;
                        last = Some(ck_error(e));
                    }
                    Recovery::ForgetHandle => {
                        drop(lease);
                        self.forget_handles();
                        last = Some(ck_error(e));
                    }
                    Recovery::Reinitialize => {
                        lease.discard();
                        if reinit_attempt >= self.recovery_attempts {
                            return Err(unavailable(operation, ck_error(e)));
                        }
                        std::thread::sleep(self.backoff.delay(reinit_attempt));
                        reinit_attempt += 1;
                        self.stats.reinitializations.fetch_add(1, Ordering::Relaxed);
                        self.library.reinitialize(generation)?;
                        last = Some(ck_error(e));
                    }
                    Recovery::Fail => return Err(ck_error(e)),
                },
            }
        }
        Err(unavailable(
            operation,
            last.unwrap_or(KeyError::Unavailable {
                operation,
                reason: "recovery attempts exhausted".into(),
            }),
        ))
    }

    fn forget_handles(&self) {
        self.handles
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Find the private key named by `uri` (cached per generation).
    fn find_private(
        &self,
        session: &Session,
        generation: u64,
        uri: &Pkcs11Uri,
    ) -> Result<CachedKey, OpError> {
        if let Some(cached) = self
            .handles
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(uri)
        {
            if cached.generation == generation {
                return Ok(*cached);
            }
        }
        // Private objects are invisible to a logged-out session: "not found" would be a lie.
        ensure_logged_in(session)?;
        let mut template = vec![Attribute::Class(ObjectClass::PRIVATE_KEY)];
        template.extend(object_selector(uri));
        let found = session.find_objects(&template)?;
        let private = match found.as_slice() {
            [one] => *one,
            [] => return Err(OpError::Key(KeyError::NotFound(uri.to_string()))),
            _ => {
                return Err(OpError::Key(KeyError::InvalidReference(format!(
                    "{uri} matches {} private keys; add id= to choose one",
                    found.len()
                ))))
            }
        };
        let algorithm = key_algorithm(session, private)?;
        let cached = CachedKey {
            generation,
            private,
            algorithm,
        };
        self.handles
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(uri.clone(), cached);
        Ok(cached)
    }

    fn uri_for(&self, label: &str, id: &[u8]) -> Result<Pkcs11Uri, KeyError> {
        let mut token = TokenSelector {
            label: self.token.label.clone(),
            serial: self.token.serial.clone(),
        };
        if token.label.is_none() {
            token.serial = Some(self.slot()?.2);
        }
        Ok(Pkcs11Uri::new(
            token,
            Some(label.to_string()),
            Some(id.to_vec()),
        ))
    }
}

impl Drop for Pkcs11KeyStore {
    fn drop(&mut self) {
        // Close our idle sessions (lent ones cannot exist: a lease borrows the store). The
        // login state is the application's, shared with other stores on the token: no logout.
        let current = self.library.generation();
        let _gate = self.library.calls.read().unwrap_or_else(|p| p.into_inner());
        let mut pool = lock(&self.pool);
        for pooled in pool.idle.drain(..) {
            if pooled.generation == current {
                let _ = pooled.session.close();
            } else {
                std::mem::forget(pooled.session);
            }
        }
        pool.open = 0;
    }
}

/// Attributes read back from a private key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrivateKeyAttributes {
    pub extractable: bool,
    pub sensitive: bool,
    pub never_extractable: bool,
    pub always_sensitive: bool,
    pub token: bool,
    pub private: bool,
}

/// An operation failed either in a PKCS#11 call (recoverable by the ladder) or for a reason
/// of its own (final).
enum OpError {
    Ck(CkError),
    Key(KeyError),
}

impl From<CkError> for OpError {
    fn from(e: CkError) -> Self {
        OpError::Ck(e)
    }
}

impl From<KeyError> for OpError {
    fn from(e: KeyError) -> Self {
        OpError::Key(e)
    }
}

fn unavailable(operation: &'static str, error: KeyError) -> KeyError {
    match error {
        KeyError::PinIncorrect { .. } | KeyError::Pin(_) => error,
        KeyError::Unavailable { .. } => error,
        other => KeyError::Unavailable {
            operation,
            reason: other.to_string(),
        },
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind; keep going.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Fail with CKR_USER_NOT_LOGGED_IN (the ladder's second rung) when the session cannot see
/// private objects, e.g. after another part of the process called C_Logout.
fn ensure_logged_in(session: &Session) -> Result<(), OpError> {
    use cryptoki::session::SessionState;
    let state = session.get_session_info()?.session_state();
    if matches!(state, SessionState::RwUser | SessionState::RoUser) {
        Ok(())
    } else {
        Err(OpError::Ck(CkError::Pkcs11(
            RvError::UserNotLoggedIn,
            Function::GetSessionInfo,
        )))
    }
}

fn object_selector(uri: &Pkcs11Uri) -> Vec<Attribute> {
    let mut template = Vec::new();
    if let Some(label) = &uri.object {
        template.push(Attribute::Label(label.as_bytes().to_vec()));
    }
    if let Some(id) = &uri.id {
        template.push(Attribute::Id(id.clone()));
    }
    template
}

fn key_algorithm(session: &Session, key: ObjectHandle) -> Result<KeyAlgorithm, OpError> {
    let attributes = session.get_attributes(
        key,
        &[
            AttributeType::KeyType,
            AttributeType::EcParams,
            AttributeType::Modulus,
        ],
    )?;
    let mut key_type = None;
    let mut params = None;
    let mut modulus_len = None;
    for attribute in attributes {
        match attribute {
            Attribute::KeyType(t) => key_type = Some(t),
            Attribute::EcParams(p) => params = Some(p),
            Attribute::Modulus(m) => modulus_len = Some(m.len()),
            _ => {}
        }
    }
    match (key_type, params.as_deref(), modulus_len) {
        (Some(t), Some(P256_PARAMS), _) if t == KeyType::EC => Ok(KeyAlgorithm::EcP256),
        (Some(t), Some(P384_PARAMS), _) if t == KeyType::EC => Ok(KeyAlgorithm::EcP384),
        (Some(t), _, Some(256)) if t == KeyType::RSA => Ok(KeyAlgorithm::Rsa2048),
        (Some(t), _, Some(384)) if t == KeyType::RSA => Ok(KeyAlgorithm::Rsa3072),
        _ => Err(OpError::Key(KeyError::Unsupported(
            "a key that is not EC P-256/P-384 or RSA-2048/3072".into(),
        ))),
    }
}

/// SubjectPublicKeyInfo DER of the public key object matching `uri` (or, for RSA, the
/// public attributes of the private key when the token keeps no public object).
fn public_key_der(
    session: &Session,
    uri: &Pkcs11Uri,
    private: ObjectHandle,
    algorithm: KeyAlgorithm,
) -> Result<Vec<u8>, OpError> {
    let mut template = vec![Attribute::Class(ObjectClass::PUBLIC_KEY)];
    template.extend(object_selector(uri));
    let public = session.find_objects(&template)?.into_iter().next();
    let encode_err = |e: &dyn std::fmt::Display| OpError::Key(KeyError::Encoding(e.to_string()));
    if algorithm.is_rsa() {
        let source = public.unwrap_or(private);
        let attributes = session.get_attributes(
            source,
            &[AttributeType::Modulus, AttributeType::PublicExponent],
        )?;
        let (mut n, mut e) = (None, None);
        for attribute in attributes {
            match attribute {
                Attribute::Modulus(m) => n = Some(m),
                Attribute::PublicExponent(x) => e = Some(x),
                _ => {}
            }
        }
        let (Some(n), Some(e)) = (n, e) else {
            return Err(OpError::Key(KeyError::Encoding(
                "RSA key without modulus or exponent".into(),
            )));
        };
        let key = rsa::PublicKey::new(
            rsa::BoxedUint::from_be_slice_vartime(&n),
            rsa::BoxedUint::from_be_slice_vartime(&e),
        )
        .map_err(|e| encode_err(&e))?;
        Ok(key
            .to_public_key_der()
            .map_err(|e| encode_err(&e))?
            .into_vec())
    } else {
        let public = public.ok_or_else(|| {
            OpError::Key(KeyError::NotFound(format!("public key object of {uri}")))
        })?;
        let attributes = session.get_attributes(public, &[AttributeType::EcPoint])?;
        let point = attributes
            .into_iter()
            .find_map(|a| match a {
                Attribute::EcPoint(p) => Some(p),
                _ => None,
            })
            .ok_or_else(|| {
                OpError::Key(KeyError::Encoding("EC key without CKA_EC_POINT".into()))
            })?;
        // CKA_EC_POINT is a DER OCTET STRING around the SEC1 point (PKCS#11 2.40 2.3.3).
        let sec1 = unwrap_octet_string(&point).unwrap_or(&point);
        let der = match algorithm {
            KeyAlgorithm::EcP256 => p256::PublicKey::from_sec1_bytes(sec1)
                .map_err(|e| encode_err(&e))?
                .to_public_key_der(),
            _ => p384::PublicKey::from_sec1_bytes(sec1)
                .map_err(|e| encode_err(&e))?
                .to_public_key_der(),
        };
        Ok(der.map_err(|e| encode_err(&e))?.into_vec())
    }
}

fn unwrap_octet_string(der: &[u8]) -> Option<&[u8]> {
    let (&tag, rest) = der.split_first()?;
    if tag != 0x04 {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, body) = match first {
        n if n < 0x80 => (usize::from(n), rest),
        0x81 => (usize::from(*rest.first()?), &rest[1..]),
        0x82 => (
            usize::from(*rest.first()?) << 8 | usize::from(*rest.get(1)?),
            &rest[2..],
        ),
        _ => return None,
    };
    (body.len() == len).then_some(body)
}

fn sign_mechanism(scheme: SignatureScheme) -> Mechanism<'static> {
    let pss = |hash_alg, mgf, s_len: u64| PkcsPssParams {
        hash_alg,
        mgf,
        s_len: s_len.into(),
    };
    match scheme {
        SignatureScheme::EcdsaSha256 | SignatureScheme::EcdsaSha384 => Mechanism::Ecdsa,
        SignatureScheme::RsaPkcs1Sha256 => Mechanism::Sha256RsaPkcs,
        SignatureScheme::RsaPkcs1Sha384 => Mechanism::Sha384RsaPkcs,
        SignatureScheme::RsaPssSha256 => {
            Mechanism::Sha256RsaPkcsPss(pss(MechanismType::SHA256, PkcsMgfType::MGF1_SHA256, 32))
        }
        SignatureScheme::RsaPssSha384 => {
            Mechanism::Sha384RsaPkcsPss(pss(MechanismType::SHA384, PkcsMgfType::MGF1_SHA384, 48))
        }
    }
}

impl KeyStore for Pkcs11KeyStore {
    fn kind(&self) -> super::BackendKind {
        super::BackendKind::Pkcs11
    }

    fn device(&self) -> String {
        let Ok((_, slot, serial)) = self.slot() else {
            return format!("PKCS#11 token {} (not present)", self.token);
        };
        let (pkcs11, _) = self.library.context();
        match pkcs11.get_token_info(slot) {
            Ok(info) => format!(
                "PKCS#11 token '{}' serial {} ({} {}, module {})",
                info.label().trim_end(),
                serial,
                info.manufacturer_id().trim_end(),
                info.model().trim_end(),
                self.library.module.display()
            ),
            Err(_) => format!("PKCS#11 token {} serial {serial}", self.token),
        }
    }

    fn generate(&self, spec: &KeySpec) -> Result<KeyInfo, KeyError> {
        if spec.label.is_empty() {
            return Err(KeyError::InvalidArgument("a key label is required".into()));
        }
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).map_err(|e| KeyError::Encoding(format!("random id: {e}")))?;
        let uri = self.uri_for(&spec.label, &id)?;
        let label = spec.label.as_bytes().to_vec();
        self.with_session("C_GenerateKeyPair", |session, generation| {
            let existing = session.find_objects(&[Attribute::Label(label.clone())])?;
            if !existing.is_empty() {
                return Err(OpError::Key(KeyError::AlreadyExists(format!(
                    "an object labelled '{}' is already on the token",
                    spec.label
                ))));
            }
            let mut public = vec![
                Attribute::Token(true),
                Attribute::Private(false),
                Attribute::Verify(true),
                Attribute::Label(label.clone()),
                Attribute::Id(id.to_vec()),
            ];
            // Private keys: on the token, behind login, never readable, never exportable.
            let private = vec![
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Sign(true),
                Attribute::Derive(false),
                Attribute::Label(label.clone()),
                Attribute::Id(id.to_vec()),
            ];
            let mechanism = match spec.algorithm {
                KeyAlgorithm::EcP256 | KeyAlgorithm::EcP384 => {
                    let params = if spec.algorithm == KeyAlgorithm::EcP256 {
                        P256_PARAMS
                    } else {
                        P384_PARAMS
                    };
                    public.push(Attribute::EcParams(params.to_vec()));
                    Mechanism::EccKeyPairGen
                }
                KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 => {
                    let bits = u64::from(spec.algorithm.rsa_bits().unwrap_or(2048));
                    public.push(Attribute::ModulusBits(bits.into()));
                    public.push(Attribute::PublicExponent(vec![0x01, 0x00, 0x01]));
                    Mechanism::RsaPkcsKeyPairGen
                }
            };
            let (_, private_handle) = session.generate_key_pair(&mechanism, &public, &private)?;
            let spki = public_key_der(session, &uri, private_handle, spec.algorithm)?;
            self.handles
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(
                    uri.clone(),
                    CachedKey {
                        generation,
                        private: private_handle,
                        algorithm: spec.algorithm,
                    },
                );
            Ok(KeyInfo {
                reference: KeyRef::Pkcs11(uri.clone()),
                label: spec.label.clone(),
                public_key: PublicKey {
                    algorithm: spec.algorithm,
                    spki_der: spki,
                },
            })
        })
    }

    fn public_key(&self, key: &KeyRef) -> Result<PublicKey, KeyError> {
        let uri = self.own_uri(key)?;
        self.with_session("C_GetAttributeValue", |session, generation| {
            let cached = self.find_private(session, generation, uri)?;
            let spki = public_key_der(session, uri, cached.private, cached.algorithm)?;
            Ok(PublicKey {
                algorithm: cached.algorithm,
                spki_der: spki,
            })
        })
    }

    fn sign(
        &self,
        key: &KeyRef,
        scheme: SignatureScheme,
        message: &[u8],
    ) -> Result<Vec<u8>, KeyError> {
        let uri = self.own_uri(key)?;
        // Hash once, outside the retry loop.
        let digest = scheme
            .is_ecdsa()
            .then(|| scheme.hash_algorithm().digest(message));
        let mechanism = sign_mechanism(scheme);
        self.with_session("C_Sign", |session, generation| {
            let cached = self.find_private(session, generation, uri)?;
            if !scheme.fits(cached.algorithm) {
                return Err(OpError::Key(KeyError::InvalidArgument(format!(
                    "{scheme} does not fit the {} key {uri}",
                    cached.algorithm
                ))));
            }
            let data = digest.as_deref().unwrap_or(message);
            let signature = session.sign(&mechanism, cached.private, data)?;
            if scheme.is_ecdsa() {
                Ok(ecdsa_raw_to_der(&signature)?)
            } else {
                Ok(signature)
            }
        })
    }

    fn destroy(&self, key: &KeyRef) -> Result<ErasureRecord, KeyError> {
        let uri = self.own_uri(key)?;
        let selector = object_selector(uri);
        let device = self.device();
        let record = self.with_session("C_DestroyObject", |session, _| {
            // Logged out, the private key would be invisible and "verified gone" a lie.
            ensure_logged_in(session)?;
            let objects = session.find_objects(&selector)?;
            if objects.is_empty() {
                return Err(OpError::Key(KeyError::NotFound(uri.to_string())));
            }
            let mut kinds = Vec::new();
            for object in objects {
                let class = session
                    .get_attributes(object, &[AttributeType::Class])?
                    .into_iter()
                    .find_map(|a| match a {
                        Attribute::Class(c) => Some(c),
                        _ => None,
                    });
                session.destroy_object(object)?;
                kinds.push(match class {
                    Some(c) if c == ObjectClass::PRIVATE_KEY => "private key",
                    Some(c) if c == ObjectClass::PUBLIC_KEY => "public key",
                    Some(c) if c == ObjectClass::SECRET_KEY => "secret key",
                    Some(c) if c == ObjectClass::CERTIFICATE => "certificate",
                    Some(c) if c == ObjectClass::DATA => "data object",
                    _ => "object",
                });
            }
            // Look again, with a fresh search: the erasure record says what we saw.
            let remaining = session.find_objects(&selector)?;
            Ok(ErasureRecord::new(
                uri.to_string(),
                kinds.join(", "),
                device.clone(),
                remaining.is_empty(),
            ))
        })?;
        self.handles
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(uri);
        Ok(record)
    }

    fn list(&self) -> Result<Vec<KeyInfo>, KeyError> {
        self.with_session("C_FindObjects", |session, _| {
            ensure_logged_in(session)?;
            let privates = session.find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])?;
            let mut keys = Vec::with_capacity(privates.len());
            for private in privates {
                let attributes =
                    session.get_attributes(private, &[AttributeType::Label, AttributeType::Id])?;
                let (mut label, mut id) = (String::new(), Vec::new());
                for attribute in attributes {
                    match attribute {
                        Attribute::Label(l) => label = String::from_utf8_lossy(&l).into_owned(),
                        Attribute::Id(i) => id = i,
                        _ => {}
                    }
                }
                let Ok(algorithm) = key_algorithm(session, private) else {
                    continue; // keys of other types on a shared token are not ours to list
                };
                let uri = self.uri_for(&label, &id)?;
                let spki = public_key_der(session, &uri, private, algorithm)?;
                keys.push(KeyInfo {
                    reference: KeyRef::Pkcs11(uri),
                    label,
                    public_key: PublicKey {
                        algorithm,
                        spki_der: spki,
                    },
                });
            }
            keys.sort_by(|a, b| a.label.cmp(&b.label));
            Ok(keys)
        })
    }
}
