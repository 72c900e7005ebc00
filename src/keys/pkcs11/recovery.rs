//! The recovery ladder: which failure climbs which rung, and the re-initialization that one
//! thread at a time performs, with backoff.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use cryptoki::context::Function;
use cryptoki::error::{Error as CkError, RvError};

use super::gate::Library;
use super::lock;
use crate::keys::KeyError;

/// What a failed call leads to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Rung {
    /// The session is dead: replace it.
    ReplaceSession,
    /// The application was logged out: log in again.
    LogIn,
    /// The token, the library or a resource under it is in trouble, or an object handle
    /// went stale under us: finalize and initialize the library again.
    Reinitialize,
    /// Not a device condition: the request fails as it is.
    Fail,
}

pub(super) fn classify(error: &CkError) -> Rung {
    match error {
        CkError::Pkcs11(rv, _) => match rv {
            RvError::SessionHandleInvalid | RvError::SessionClosed => Rung::ReplaceSession,
            RvError::UserNotLoggedIn => Rung::LogIn,
            // SoftHSM answers CKR_GENERAL_ERROR when it cannot open its files (EMFILE,
            // ENFILE) or the token directory is gone; CKR_HOST_MEMORY/CKR_DEVICE_MEMORY on
            // ENOMEM. A handle that became invalid without us destroying the object means
            // the token changed (moved, restored, re-initialized) or SoftHSM could not read
            // the object: the library must look again from scratch.
            RvError::DeviceRemoved
            | RvError::DeviceError
            | RvError::DeviceMemory
            | RvError::HostMemory
            | RvError::GeneralError
            | RvError::TokenNotPresent
            | RvError::TokenNotRecognized
            | RvError::CryptokiNotInitialized
            | RvError::SlotIdInvalid
            | RvError::SessionCount
            | RvError::ObjectHandleInvalid
            | RvError::KeyHandleInvalid => Rung::Reinitialize,
            _ => Rung::Fail,
        },
        _ => Rung::Fail,
    }
}

/// Exponential backoff between re-initializations: `first`, doubling, capped at `max`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

impl Backoff {
    pub fn delay(self, attempt: u32) -> Duration {
        self.first
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max)
    }
}

/// How a request to re-initialize ended.
pub(super) enum Outcome {
    /// This thread finalized and initialized the library.
    Reinitialized,
    /// Another thread did since the caller's generation: just retry.
    AlreadyDone,
    /// Too soon after the last re-initialization: fail now, retry later.
    TooSoon(Duration),
    /// C_Initialize failed (e.g. no file descriptors): the library stays uninitialized
    /// until the next attempt.
    Failed(CkError),
}

/// Serializes re-initializations of one library and spaces them out.
#[derive(Default)]
pub(super) struct Coordinator {
    state: Mutex<State>,
    finished: Condvar,
    /// Re-initializations since the library last served a request (mirror of
    /// `State::failures`, read on the hot path without the lock).
    failures: AtomicU32,
}

#[derive(Default)]
struct State {
    running: bool,
    failures: u32,
    not_before: Option<Instant>,
}

impl Coordinator {
    /// Re-initialize `library` unless it changed since `seen_generation`. Must be called
    /// outside the gate.
    pub fn reinitialize(
        &self,
        library: &Library,
        seen_generation: u64,
        backoff: Backoff,
    ) -> Outcome {
        let mut state = lock(&self.state);
        loop {
            if library.generation() != seen_generation {
                return Outcome::AlreadyDone;
            }
            if !state.running {
                break;
            }
            // One at a time: wait for the one running (bounded by C_Finalize/C_Initialize).
            state = self
                .finished
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        let now = Instant::now();
        if let Some(not_before) = state.not_before {
            if now < not_before {
                return Outcome::TooSoon(not_before - now);
            }
        }
        state.running = true;
        drop(state);
        let result = library.reinitialize(seen_generation);
        let mut state = lock(&self.state);
        state.running = false;
        state.not_before = Some(Instant::now() + backoff.delay(state.failures));
        state.failures = state.failures.saturating_add(1);
        self.failures.store(state.failures, Ordering::Relaxed);
        self.finished.notify_all();
        match result {
            Ok(true) => Outcome::Reinitialized,
            Ok(false) => Outcome::AlreadyDone,
            Err(e) => {
                tracing::warn!(module = %library.module().display(), error = %e, "C_Initialize failed");
                Outcome::Failed(e)
            }
        }
    }

    /// An operation went through: the next trouble starts the backoff from its first step
    /// (the window after the last re-initialization still applies).
    pub fn served(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            let mut state = lock(&self.state);
            state.failures = 0;
            self.failures.store(0, Ordering::Relaxed);
        }
    }
}

pub(super) fn function_name(function: Function) -> &'static str {
    match function {
        Function::Initialize => "C_Initialize",
        Function::Finalize => "C_Finalize",
        Function::OpenSession => "C_OpenSession",
        Function::CloseSession => "C_CloseSession",
        Function::Login => "C_Login",
        Function::Sign => "C_Sign",
        Function::SignInit => "C_SignInit",
        Function::GenerateKeyPair => "C_GenerateKeyPair",
        Function::FindObjectsInit => "C_FindObjectsInit",
        Function::FindObjects => "C_FindObjects",
        Function::FindObjectsFinal => "C_FindObjectsFinal",
        Function::GetAttributeValue => "C_GetAttributeValue",
        Function::DestroyObject => "C_DestroyObject",
        Function::GetTokenInfo => "C_GetTokenInfo",
        Function::GetSlotList => "C_GetSlotList",
        Function::GetSessionInfo => "C_GetSessionInfo",
        _ => "PKCS#11 call",
    }
}

/// A failed call as a permanent error of the key layer.
pub(super) fn ck_error(error: CkError) -> KeyError {
    match error {
        CkError::Pkcs11(RvError::PinIncorrect | RvError::PinLocked, f) => KeyError::PinIncorrect {
            function: function_name(f),
        },
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_errors_reinitialize_and_missing_pins_fail() {
        let err = |rv| CkError::Pkcs11(rv, Function::Sign);
        for rv in [
            RvError::GeneralError,
            RvError::HostMemory,
            RvError::DeviceError,
            RvError::ObjectHandleInvalid,
            RvError::TokenNotPresent,
        ] {
            assert_eq!(classify(&err(rv)), Rung::Reinitialize, "{rv:?}");
        }
        assert_eq!(classify(&err(RvError::SessionClosed)), Rung::ReplaceSession);
        assert_eq!(classify(&err(RvError::PinIncorrect)), Rung::Fail);
        assert_eq!(classify(&err(RvError::MechanismInvalid)), Rung::Fail);
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let backoff = Backoff {
            first: Duration::from_millis(100),
            max: Duration::from_millis(1_000),
        };
        assert_eq!(backoff.delay(0), Duration::from_millis(100));
        assert_eq!(backoff.delay(2), Duration::from_millis(400));
        assert_eq!(backoff.delay(40), Duration::from_millis(1_000));
    }
}
