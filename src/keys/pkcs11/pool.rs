//! The session pool and the login.
//!
//! A session is lent against a borrow of an [`Entered`] guard, so it cannot be used outside
//! the gate, and it belongs to the guard's library generation: idle sessions of an older
//! generation were closed by `C_Finalize` and are dropped without `C_CloseSession` (their
//! handle numbers may have been reused).

use std::sync::{Condvar, Mutex};

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::{Session, UserType};
use secrecy::SecretString;

use super::gate::Entered;
use super::lock;
use crate::keys::KeyError;

pub(super) struct Pool {
    size: usize,
    state: Mutex<PoolState>,
    freed: Condvar,
}

struct PoolState {
    idle: Vec<PooledSession>,
    /// Sessions that exist: idle plus lent out.
    open: usize,
}

struct PooledSession {
    session: Session,
    generation: u64,
}

/// A session lent out of the pool, usable while the guard it was lent under is held; goes
/// back on drop unless it was found dead.
pub(super) struct Lease<'g> {
    pool: &'g Pool,
    session: Option<PooledSession>,
}

impl Pool {
    pub fn new(size: usize) -> Pool {
        Pool {
            size: size.max(1),
            state: Mutex::new(PoolState {
                idle: Vec::new(),
                open: 0,
            }),
            freed: Condvar::new(),
        }
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Borrow a session of the guard's generation, waiting while the pool is exhausted;
    /// `open` makes a new one (C_OpenSession and C_Login) when there is room.
    ///
    /// Waiting inside the gate is safe: every lent session belongs to a thread that is
    /// inside the gate already and gives it back before leaving.
    pub fn acquire<'g, E>(
        &'g self,
        entered: &'g Entered<'_>,
        open: impl FnOnce(&Entered<'_>) -> Result<Session, E>,
    ) -> Result<Lease<'g>, E> {
        let generation = entered.generation();
        {
            let mut state = lock(&self.state);
            loop {
                let before = state.idle.len();
                state.idle.retain(|s| s.generation == generation);
                let stale = before - state.idle.len();
                state.open -= stale;
                if let Some(session) = state.idle.pop() {
                    return Ok(Lease {
                        pool: self,
                        session: Some(session),
                    });
                }
                if state.open < self.size {
                    state.open += 1;
                    break;
                }
                state = self
                    .freed
                    .wait(state)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
            }
        }
        // A place in the pool is reserved: open the session outside the pool lock.
        match open(entered) {
            Ok(session) => Ok(Lease {
                pool: self,
                session: Some(PooledSession {
                    session,
                    generation,
                }),
            }),
            Err(e) => {
                self.release_place();
                Err(e)
            }
        }
    }

    /// Close the idle sessions of the current generation (the store is going away).
    pub fn close_idle(&self, entered: &Entered<'_>) {
        let mut state = lock(&self.state);
        for pooled in state.idle.drain(..) {
            if pooled.generation == entered.generation() {
                let _ = pooled.session.close();
            }
        }
        state.open = 0;
    }

    fn release_place(&self) {
        let mut state = lock(&self.state);
        state.open -= 1;
        self.freed.notify_one();
    }
}

impl Lease<'_> {
    pub fn session(&self) -> Result<&Session, KeyError> {
        self.session
            .as_ref()
            .map(|pooled| &pooled.session)
            // Not reachable: `session` is Some from creation until drop or `discard`,
            // which consumes the lease.
            .ok_or_else(|| KeyError::InvalidArgument("session lease already returned".into()))
    }

    /// The session is dead: forget it without closing (its handle may be reused).
    pub fn discard(mut self) {
        if self.session.take().is_some() {
            self.pool.release_place();
        }
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let Some(pooled) = self.session.take() else {
            return;
        };
        // The lease cannot outlive its guard, so the generation is still current.
        let mut state = lock(&self.pool.state);
        state.idle.push(pooled);
        self.pool.freed.notify_one();
    }
}

/// The user login: once per token per process (later sessions share the login state).
pub(super) struct Login {
    pin: SecretString,
    /// Set once the token rejected the PIN: nothing logs in again.
    rejected: Mutex<Option<RvError>>,
}

/// How a login failed.
pub(super) enum LoginError {
    /// The token rejected the PIN, now or before: final.
    Rejected,
    /// Any other failure of C_Login, for the recovery ladder to classify.
    Call(CkError),
}

impl Login {
    pub fn new(pin: SecretString) -> Login {
        Login {
            pin,
            rejected: Mutex::new(None),
        }
    }

    pub fn rejected(&self) -> bool {
        lock(&self.rejected).is_some()
    }

    /// Log `session`'s application in (inside the gate, as the session's borrow shows).
    pub fn log_in(&self, session: &Session, token: &str) -> Result<(), LoginError> {
        let mut rejected = lock(&self.rejected);
        if rejected.is_some() {
            return Err(LoginError::Rejected);
        }
        match session.login(UserType::User, Some(&self.pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
            Err(CkError::Pkcs11(rv @ (RvError::PinIncorrect | RvError::PinLocked), _)) => {
                tracing::error!(token, "the token rejected the PIN; not retrying");
                *rejected = Some(rv);
                Err(LoginError::Rejected)
            }
            Err(e) => Err(LoginError::Call(e)),
        }
    }
}
