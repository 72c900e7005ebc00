//! The store of one token: an operation is one pass through the gate with a pooled session
//! (`with_session`); a failed pass climbs the recovery ladder and tries again. Locating the
//! token and finding keys (with the rules for an empty search) live here too; the
//! [`KeyStore`](crate::keys::KeyStore) operations themselves are in `keystore`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use cryptoki::slot::{Limit, Slot};

use super::gate::{Entered, Library};
use super::lock;
use super::objects::{ensure_logged_in, key_algorithm, object_selector, PrivateKeyAttributes};
use super::pool::{Lease, Login, LoginError, Pool};
use super::recovery::{ck_error, classify, Backoff, Outcome, Rung};
use crate::config::Pkcs11Config;
use crate::keys::{KeyAlgorithm, KeyError, KeyRef, Pkcs11Uri, TokenSelector};

/// A PKCS#11 token used as a key store.
pub struct Pkcs11KeyStore {
    pub(super) library: Arc<Library>,
    token: TokenSelector,
    login: Login,
    pool: Pool,
    recovery_attempts: u32,
    backoff: Backoff,
    /// Where the token is in the current library generation.
    located: RwLock<Option<Arc<Located>>>,
    /// The token's manufacturer as last seen (the module's file name before), kept across
    /// generations so that errors name the device while it is gone.
    maker: Mutex<String>,
    /// Keys this store has found, by URI.
    keys: RwLock<HashMap<Pkcs11Uri, KeyRecord>>,
    stats: Counters,
}

/// How often each rung of the recovery ladder was climbed since the store opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecoveryStats {
    pub sessions_replaced: u64,
    pub logins: u64,
    /// Library re-initializations (C_Finalize + C_Initialize) this store performed.
    pub reinitializations: u64,
    /// Re-initializations whose C_Initialize failed (the library stays down until the next).
    pub failed_reinitializations: u64,
    /// Operations that ended as [`KeyError::Unavailable`].
    pub unavailable: u64,
}

#[derive(Default)]
struct Counters {
    sessions_replaced: AtomicU64,
    logins: AtomicU64,
    reinitializations: AtomicU64,
    failed_reinitializations: AtomicU64,
    unavailable: AtomicU64,
}

#[derive(Clone)]
pub(super) struct Located {
    generation: u64,
    pub slot: Slot,
    pub serial: String,
}

/// What the store knows of a key it has found at least once.
#[derive(Clone, Copy, Default)]
struct KeyRecord {
    /// The private key's handle, valid in its generation only.
    handle: Option<(u64, ObjectHandle, KeyAlgorithm)>,
    missing: Option<Missing>,
}

/// A key found before that a search no longer finds.
#[derive(Clone, Copy)]
enum Missing {
    /// Found missing in this generation; a re-initialization was asked for, and an empty
    /// search in a later generation is final.
    Suspected(u64),
    /// Missing after a re-initialization: not found, without re-initializing again (no
    /// loop), until a search finds it again.
    Confirmed,
}

#[derive(Clone, Copy)]
pub(super) struct FoundKey {
    pub private: ObjectHandle,
    pub algorithm: KeyAlgorithm,
}

/// One pass through the gate: what an operation sees.
pub(super) struct Call<'a> {
    pub entered: &'a Entered<'a>,
    pub session: &'a Session,
    pub located: &'a Located,
    /// The library was re-initialized during this operation: an empty search is final.
    after_reinit: bool,
}

/// How an operation failed.
pub(super) enum OpError {
    /// A PKCS#11 call failed: the ladder decides.
    Ck(CkError),
    /// Final, for a reason of the operation's own.
    Key(KeyError),
    /// The token looks unavailable or the library stale: re-initialize, then look again.
    Stale(String),
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

/// How one pass ended, when it did not succeed.
pub(super) enum Step {
    Final(KeyError),
    /// The ladder's first or second rung was climbed: try again at once.
    Retry(String),
    /// Re-initialize (with backoff), then try again.
    Reinitialize(String),
}

impl Pkcs11KeyStore {
    /// Load the module, find the token by label/serial, read the PIN, log in.
    pub fn open(config: &Pkcs11Config) -> Result<Pkcs11KeyStore, KeyError> {
        let pin = config.pin.read().map_err(KeyError::Pin)?;
        let library = Library::shared(&config.module)?;
        let maker = config
            .module
            .file_name()
            .map_or_else(|| "PKCS#11".into(), |n| n.to_string_lossy().into_owned());
        let store = Pkcs11KeyStore {
            library,
            token: config.token(),
            login: Login::new(pin),
            pool: Pool::new(config.pool_size),
            recovery_attempts: config.recovery_attempts,
            backoff: Backoff {
                first: Duration::from_millis(config.reinit_backoff_ms),
                max: Duration::from_millis(config.reinit_backoff_max_ms),
            },
            located: RwLock::new(None),
            maker: Mutex::new(maker),
            keys: RwLock::new(HashMap::new()),
            stats: Counters::default(),
        };
        // Resolve the token, check the pool size against its limits, and log in now, so a
        // wrong PIN or a missing token is reported at start, not at the first request.
        {
            let located = store.locate_at_open()?;
            let entered = store.library.enter();
            if let Ok(info) = entered.pkcs11().get_token_info(located.slot) {
                if let Limit::Max(max) = info.max_session_count() {
                    if max > 0 && store.pool.size() as u64 >= max {
                        return Err(KeyError::InvalidArgument(format!(
                            "pool_size {} is not below the token's maximum of {max} sessions",
                            store.pool.size()
                        )));
                    }
                }
            }
        }
        store.with_session("C_Login", |_| Ok(()))?;
        Ok(store)
    }

    /// The token's slot for `open`, healing like every operation does: when the search
    /// fails short of a final error (the library was finalized by someone else in the
    /// process and answers CKR_CRYPTOKI_NOT_INITIALIZED; SoftHSM sees a token created since
    /// C_Initialize only after the next one), the library is re-initialized (waiting out the
    /// backoff window an earlier re-initialization left) and the token looked for again, at
    /// most `recovery_attempts` times. Only then is the token reported missing.
    fn locate_at_open(&self) -> Result<Arc<Located>, KeyError> {
        let attempts = self.recovery_attempts.max(1);
        let mut reinitialized = 0;
        let mut reason = String::new();
        for _ in 0..=attempts * 2 {
            let (generation, step) = {
                let entered = self.library.enter();
                (entered.generation(), self.locate(&entered))
            };
            match step {
                Ok(located) => return Ok(located),
                Err(Step::Final(e)) => return Err(e),
                Err(Step::Retry(why) | Step::Reinitialize(why)) => reason = why,
            }
            if reinitialized >= attempts {
                break;
            }
            match self
                .library
                .recovery
                .reinitialize(&self.library, generation, self.backoff)
            {
                Outcome::Reinitialized => {
                    reinitialized += 1;
                    self.stats.reinitializations.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(token = %self.token, %reason, "PKCS#11 library re-initialized at open");
                }
                Outcome::AlreadyDone => {}
                // Opening is not on a request's path: wait for the window instead of failing.
                Outcome::TooSoon(wait) => std::thread::sleep(wait),
                Outcome::Failed(e) => {
                    return Err(KeyError::Module {
                        module: self.library.module().display().to_string(),
                        reason: format!("C_Initialize: {e}"),
                    })
                }
            }
        }
        Err(KeyError::TokenNotFound(format!(
            "{} ({reason})",
            self.token
        )))
    }

    pub fn recovery_stats(&self) -> RecoveryStats {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        RecoveryStats {
            sessions_replaced: load(&self.stats.sessions_replaced),
            logins: load(&self.stats.logins),
            reinitializations: load(&self.stats.reinitializations),
            failed_reinitializations: load(&self.stats.failed_reinitializations),
            unavailable: load(&self.stats.unavailable),
        }
    }

    /// Library re-initializations this store performed to bring the token back (a counter
    /// for the metrics: "recoveries" of the PKCS#11 backend).
    pub fn recoveries(&self) -> u64 {
        self.stats.reinitializations.load(Ordering::Relaxed)
    }

    /// The shared library (raw cryptoki access for tests and benchmarks goes through
    /// [`Library::enter`]).
    pub fn library(&self) -> &Arc<Library> {
        &self.library
    }

    /// The slot currently holding the token (for raw calls in tests and benchmarks).
    pub fn slot_id(&self) -> Result<Slot, KeyError> {
        let entered = self.library.enter();
        self.locate(&entered)
            .map(|located| located.slot)
            .map_err(|step| self.final_error("C_GetSlotList", step))
    }

    /// Read back the protection attributes of a private key.
    pub fn private_key_attributes(&self, key: &KeyRef) -> Result<PrivateKeyAttributes, KeyError> {
        let uri = self.own_uri(key)?;
        self.with_session("C_GetAttributeValue", |call| {
            let found = self.find_private(call, uri)?;
            let attributes = call
                .session
                .get_attributes(found.private, &PrivateKeyAttributes::TYPES)?;
            Ok(PrivateKeyAttributes::from_attributes(attributes))
        })
    }

    /// Try to read CKA_VALUE of a private key. A correct token refuses; this exists so the
    /// tests and `warden check` can prove it.
    pub fn read_private_value(&self, key: &KeyRef) -> Result<Vec<u8>, KeyError> {
        let uri = self.own_uri(key)?;
        self.with_session("C_GetAttributeValue", |call| {
            let found = self.find_private(call, uri)?;
            let attributes = call
                .session
                .get_attributes(found.private, &[AttributeType::Value])?;
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

    /// The device as errors name it, without calling into the module.
    pub(super) fn device_name(&self) -> String {
        let name = match (&self.token.label, &self.token.serial) {
            (Some(label), _) => format!("'{label}'"),
            (None, Some(serial)) => format!("serial {serial}"),
            (None, None) => "(any)".into(),
        };
        format!("PKCS#11 token {name} ({})", lock(&self.maker))
    }

    fn unavailable(&self, operation: &'static str, reason: String) -> KeyError {
        self.stats.unavailable.fetch_add(1, Ordering::Relaxed);
        crate::metrics::global().device_error(crate::keys::BackendKind::Pkcs11);
        KeyError::unavailable(self.device_name(), operation, reason)
    }

    /// A pass that could not even start, as the caller's error.
    fn final_error(&self, operation: &'static str, step: Step) -> KeyError {
        match step {
            Step::Final(e) => e,
            Step::Retry(reason) | Step::Reinitialize(reason) => self.unavailable(operation, reason),
        }
    }

    pub(super) fn own_uri<'k>(&self, key: &'k KeyRef) -> Result<&'k Pkcs11Uri, KeyError> {
        match key {
            KeyRef::Pkcs11(uri) => {
                let label_ok = match (&uri.token.label, &self.token.label) {
                    (Some(a), Some(b)) => a == b,
                    _ => true,
                };
                // A serial in the reference is checked against the token inside the
                // operation (`check_serial`), where the token is located.
                if label_ok {
                    Ok(uri)
                } else {
                    Err(KeyError::WrongBackend(key.to_string()))
                }
            }
            KeyRef::Tpm(_) => Err(KeyError::WrongBackend(key.to_string())),
        }
    }

    pub(super) fn check_serial(call: &Call<'_>, uri: &Pkcs11Uri) -> Result<(), OpError> {
        match uri.token.serial.as_deref() {
            Some(serial) if serial != call.located.serial => {
                Err(OpError::Key(KeyError::WrongBackend(uri.to_string())))
            }
            _ => Ok(()),
        }
    }

    /// Run `op` on a pooled session inside the gate, climbing the recovery ladder on
    /// failure. Re-initialization happens outside the gate, between passes.
    pub(super) fn with_session<T>(
        &self,
        operation: &'static str,
        mut op: impl FnMut(&Call<'_>) -> Result<T, OpError>,
    ) -> Result<T, KeyError> {
        let mut last = String::from("recovery attempts exhausted");
        let mut after_reinit = false;
        for _ in 0..=self.recovery_attempts.max(1) * 2 {
            let (generation, step) = {
                let entered = self.library.enter();
                let step = self.pass(&entered, after_reinit, &mut op);
                (entered.generation(), step)
            };
            match step {
                Ok(value) => {
                    self.library.recovery.served();
                    return Ok(value);
                }
                Err(Step::Final(e)) => return Err(e),
                Err(Step::Retry(reason)) => last = reason,
                Err(Step::Reinitialize(reason)) => {
                    let outcome =
                        self.library
                            .recovery
                            .reinitialize(&self.library, generation, self.backoff);
                    match outcome {
                        Outcome::Reinitialized => {
                            self.stats.reinitializations.fetch_add(1, Ordering::Relaxed);
                            crate::metrics::global()
                                .device_recovery(crate::keys::BackendKind::Pkcs11);
                            tracing::info!(operation, %reason, "PKCS#11 library re-initialized");
                        }
                        Outcome::AlreadyDone => {}
                        Outcome::TooSoon(wait) => {
                            return Err(self.unavailable(
                                operation,
                                format!(
                                    "{reason} (next re-initialization in {} ms)",
                                    wait.as_millis().max(1)
                                ),
                            ))
                        }
                        Outcome::Failed(e) => {
                            self.stats
                                .failed_reinitializations
                                .fetch_add(1, Ordering::Relaxed);
                            return Err(self.unavailable(
                                operation,
                                format!("{reason}; re-initializing: C_Initialize: {e}"),
                            ));
                        }
                    }
                    after_reinit = true;
                    last = reason;
                }
            }
        }
        Err(self.unavailable(operation, last))
    }

    /// One pass: locate the token, borrow a session, run `op`, classify a failure.
    fn pass<T>(
        &self,
        entered: &Entered<'_>,
        after_reinit: bool,
        op: &mut impl FnMut(&Call<'_>) -> Result<T, OpError>,
    ) -> Result<T, Step> {
        if self.login.rejected() {
            return Err(Step::Final(KeyError::PinIncorrect {
                function: "C_Login",
            }));
        }
        let located = self.locate(entered)?;
        let lease = self
            .pool
            .acquire(entered, |entered| self.open_session(entered, &located))?;
        let outcome = {
            let call = Call {
                entered,
                session: lease.session().map_err(Step::Final)?,
                located: &located,
                after_reinit,
            };
            op(&call)
        };
        match outcome {
            Ok(value) => Ok(value),
            Err(OpError::Key(e)) => Err(Step::Final(e)),
            Err(OpError::Stale(reason)) => Err(Step::Reinitialize(reason)),
            Err(OpError::Ck(e)) => match self.rung(&e, &lease) {
                Rung::ReplaceSession => {
                    tracing::info!(error = %e, "replacing a dead PKCS#11 session");
                    lease.discard();
                    self.stats.sessions_replaced.fetch_add(1, Ordering::Relaxed);
                    Err(Step::Retry(e.to_string()))
                }
                Rung::LogIn => {
                    tracing::info!("logging in to the token again");
                    self.stats.logins.fetch_add(1, Ordering::Relaxed);
                    let session = lease.session().map_err(Step::Final)?;
                    match self.login.log_in(session, &self.token.to_string()) {
                        Ok(()) => Err(Step::Retry(e.to_string())),
                        Err(LoginError::Rejected) => Err(Step::Final(KeyError::PinIncorrect {
                            function: "C_Login",
                        })),
                        Err(LoginError::Call(again)) => Err(call_failed("C_Login", again)),
                    }
                }
                Rung::Reinitialize => Err(Step::Reinitialize(e.to_string())),
                Rung::Fail => Err(Step::Final(ck_error(e))),
            },
        }
    }

    /// The rung for a failed call. A private key's handle is also invalid to a session
    /// that was logged out (SoftHSM: CKR_OBJECT_HANDLE_INVALID): logging in again is the
    /// lower rung then, not a re-initialization.
    fn rung(&self, error: &CkError, lease: &Lease<'_>) -> Rung {
        let rung = classify(error);
        let handle_invalid = matches!(
            error,
            CkError::Pkcs11(RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid, _)
        );
        if handle_invalid {
            if let Ok(session) = lease.session() {
                if let Err(OpError::Ck(CkError::Pkcs11(RvError::UserNotLoggedIn, _))) =
                    ensure_logged_in(session)
                {
                    return Rung::LogIn;
                }
            }
        }
        rung
    }

    /// The token's slot in the entered generation, found by label/serial.
    pub(super) fn locate(&self, entered: &Entered<'_>) -> Result<Arc<Located>, Step> {
        let generation = entered.generation();
        if let Some(located) = self
            .located
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            if located.generation == generation {
                return Ok(located.clone());
            }
        }
        let pkcs11 = entered.pkcs11();
        let slots = pkcs11
            .get_slots_with_token()
            .map_err(|e| call_failed("C_GetSlotList", e))?;
        let mut unreadable = None;
        for slot in slots {
            let info = match pkcs11.get_token_info(slot) {
                Ok(info) => info,
                Err(e) => {
                    // Another token in trouble, or ours (SoftHSM: CKR_GENERAL_ERROR when
                    // its files cannot be read). Keep the reason for the error.
                    unreadable = Some(e);
                    continue;
                }
            };
            if self.token.matches(info.label(), info.serial_number()) {
                *lock(&self.maker) = info.manufacturer_id().trim_end().to_string();
                let located = Arc::new(Located {
                    generation,
                    slot,
                    serial: info.serial_number().trim_end().to_string(),
                });
                *self.located.write().unwrap_or_else(|p| p.into_inner()) = Some(located.clone());
                return Ok(located);
            }
        }
        Err(Step::Reinitialize(match unreadable {
            Some(e) => format!("not found in any slot (C_GetTokenInfo: {e})"),
            None => "not present in any slot".into(),
        }))
    }

    fn open_session(&self, entered: &Entered<'_>, located: &Located) -> Result<Session, Step> {
        let session = entered
            .pkcs11()
            .open_rw_session_no_drop(located.slot)
            .map_err(|e| call_failed("C_OpenSession", e))?;
        match self.login.log_in(&session, &self.token.to_string()) {
            Ok(()) => Ok(session),
            Err(failure) => {
                let _ = session.close();
                Err(match failure {
                    LoginError::Rejected => Step::Final(KeyError::PinIncorrect {
                        function: "C_Login",
                    }),
                    LoginError::Call(e) => call_failed("C_Login", e),
                })
            }
        }
    }

    /// Find the private key named by `uri` (the handle is cached for one generation).
    pub(super) fn find_private(
        &self,
        call: &Call<'_>,
        uri: &Pkcs11Uri,
    ) -> Result<FoundKey, OpError> {
        Self::check_serial(call, uri)?;
        let generation = call.entered.generation();
        let cached = self
            .keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(uri)
            .and_then(|record| record.handle);
        if let Some((found_in, private, algorithm)) = cached {
            if found_in == generation {
                return Ok(FoundKey { private, algorithm });
            }
        }
        // Private objects are invisible to a logged-out session: "not found" would be a lie.
        ensure_logged_in(call.session)?;
        let mut template = vec![Attribute::Class(ObjectClass::PRIVATE_KEY)];
        template.extend(object_selector(uri));
        let found = call.session.find_objects(&template)?;
        let private = match found.as_slice() {
            [one] => *one,
            [] => return Err(self.missing(call, uri)),
            _ => {
                return Err(OpError::Key(KeyError::InvalidReference(format!(
                    "{uri} matches {} private keys; add id= to choose one",
                    found.len()
                ))))
            }
        };
        let algorithm = key_algorithm(call.session, private)?;
        self.remember(uri, generation, private, algorithm);
        Ok(FoundKey { private, algorithm })
    }

    pub(super) fn remember(
        &self,
        uri: &Pkcs11Uri,
        generation: u64,
        private: ObjectHandle,
        algorithm: KeyAlgorithm,
    ) {
        self.keys.write().unwrap_or_else(|p| p.into_inner()).insert(
            uri.clone(),
            KeyRecord {
                handle: Some((generation, private, algorithm)),
                missing: None,
            },
        );
    }

    /// A search for `uri` came back empty: decide between "not found" (final) and "the
    /// token or the library is not answering truthfully" (re-initialize, look again).
    pub(super) fn missing(&self, call: &Call<'_>, uri: &Pkcs11Uri) -> OpError {
        // SoftHSM answers an empty search when it cannot open its files (EMFILE) or the token
        // directory is gone; C_GetTokenInfo then fails with CKR_GENERAL_ERROR.
        if let Err(e) = call.entered.pkcs11().get_token_info(call.located.slot) {
            return match classify(&e) {
                Rung::Fail => OpError::Key(ck_error(e)),
                _ => OpError::Stale(format!(
                    "{uri} not found and the token does not answer: {e}"
                )),
            };
        }
        let generation = call.entered.generation();
        let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
        let Some(record) = keys.get_mut(uri) else {
            // Never found by this store, on a token that answers: not there.
            return OpError::Key(KeyError::NotFound(uri.to_string()));
        };
        record.handle = None;
        match record.missing {
            _ if call.after_reinit => {
                record.missing = Some(Missing::Confirmed);
                OpError::Key(KeyError::NotFound(uri.to_string()))
            }
            Some(Missing::Confirmed) => OpError::Key(KeyError::NotFound(uri.to_string())),
            Some(Missing::Suspected(seen)) if seen < generation => {
                record.missing = Some(Missing::Confirmed);
                OpError::Key(KeyError::NotFound(uri.to_string()))
            }
            _ => {
                // Found before: the token may have changed under a library that has not
                // seen it yet (SoftHSM re-reads its token directory at C_Initialize only).
                record.missing = Some(Missing::Suspected(generation));
                OpError::Stale(format!(
                    "{uri}, found before, is missing: looking again after re-initialization"
                ))
            }
        }
    }

    pub(super) fn uri_for(&self, located: &Located, label: &str, id: &[u8]) -> Pkcs11Uri {
        let mut token = TokenSelector {
            label: self.token.label.clone(),
            serial: self.token.serial.clone(),
        };
        if token.label.is_none() {
            token.serial = Some(located.serial.clone());
        }
        Pkcs11Uri::new(token, Some(label.to_string()), Some(id.to_vec()))
    }

    pub(super) fn forget(&self, uri: &Pkcs11Uri) {
        self.keys
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(uri);
    }
}

/// A failed call outside an operation (listing slots, opening a session, logging in).
fn call_failed(function: &'static str, error: CkError) -> Step {
    match classify(&error) {
        Rung::Fail | Rung::LogIn => Step::Final(ck_error(error)),
        Rung::ReplaceSession | Rung::Reinitialize => {
            Step::Reinitialize(format!("{function}: {error}"))
        }
    }
}

impl Drop for Pkcs11KeyStore {
    fn drop(&mut self) {
        // Close our idle sessions (lent ones cannot exist: a lease borrows the store). The
        // login state is the application's, shared with other stores on the token: no logout.
        let entered = self.library.enter();
        self.pool.close_idle(&entered);
    }
}
