//! The library and its call gate.
//!
//! The cryptoki context lives inside a read-write lock. [`Library::enter`] takes the shared
//! side and returns an [`Entered`] guard, the only way to reach the context; sessions are
//! lent by the pool against a borrow of the same guard (see `pool`), so no call into the
//! module can happen without it. Re-initialization takes the exclusive side, so `C_Finalize`
//! never runs while another thread is inside the module (PKCS#11 2.40 section 5.4).
//!
//! Rules that keep the gate deadlock-free: a thread enters at most once at a time (a
//! waiting writer blocks new readers, so entering twice could wait on itself), and nothing
//! re-initializes while holding a guard.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};

use super::lock;
use super::recovery::Coordinator;
use crate::keys::KeyError;

/// One loaded PKCS#11 module, shared process-wide.
pub struct Library {
    module: PathBuf,
    state: RwLock<LibraryState>,
    /// Mirror of `LibraryState::generation`, readable without entering.
    generation: AtomicU64,
    /// One re-initialization at a time, with backoff.
    pub(super) recovery: Coordinator,
}

struct LibraryState {
    pkcs11: Pkcs11,
    /// Bumped at every re-initialization: sessions and object handles of an older
    /// generation are dead and must not be used or closed (their numbers may be reused).
    generation: u64,
    /// False after a failed `C_Initialize` (e.g. under EMFILE): every call then fails with
    /// CKR_CRYPTOKI_NOT_INITIALIZED, which leads to another re-initialization.
    initialized: bool,
}

/// Proof of being inside the gate: the shared side of the library lock. Every call into the
/// module is made through one of these.
pub struct Entered<'l> {
    state: RwLockReadGuard<'l, LibraryState>,
}

impl Entered<'_> {
    /// The cryptoki context, for calls made while this guard is held.
    pub fn pkcs11(&self) -> &Pkcs11 {
        &self.state.pkcs11
    }

    /// The library generation this guard sees (fixed while it is held).
    pub fn generation(&self) -> u64 {
        self.state.generation
    }
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
        let mut state = LibraryState {
            pkcs11,
            generation: 1,
            initialized: false,
        };
        initialize(&mut state).map_err(|e| KeyError::Module {
            module: module.display().to_string(),
            reason: format!("C_Initialize: {e}"),
        })?;
        let library = Arc::new(Library {
            module: module.to_path_buf(),
            state: RwLock::new(state),
            generation: AtomicU64::new(1),
            recovery: Coordinator::default(),
        });
        libraries.insert(module.to_path_buf(), library.clone());
        Ok(library)
    }

    /// Enter the gate (shared): held for the whole of one operation, never twice at once by
    /// one thread.
    pub fn enter(&self) -> Entered<'_> {
        Entered {
            state: self.state.read().unwrap_or_else(|p| p.into_inner()),
        }
    }

    /// The current generation (bumped by every re-initialization).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn module(&self) -> &Path {
        &self.module
    }

    /// Finalize and initialize again, exclusively, unless someone did since
    /// `seen_generation`. Returns whether this call did it. The caller must not be inside
    /// the gate.
    pub(super) fn reinitialize(&self, seen_generation: u64) -> Result<bool, CkError> {
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        if state.generation != seen_generation {
            return Ok(false);
        }
        tracing::warn!(module = %self.module.display(), "re-initializing the PKCS#11 library");
        if state.initialized {
            // Sessions of the old generation die with it; a library someone else finalized
            // answers CKR_CRYPTOKI_NOT_INITIALIZED, which is the state we want anyway.
            let _ = state.pkcs11.clone().finalize();
            state.initialized = false;
        }
        state.generation += 1;
        self.generation.store(state.generation, Ordering::Release);
        initialize(&mut state).map(|()| true)
    }
}

/// C_Initialize with OS locking (without it SoftHSM runs without its own locks); a library
/// someone else in the process initialized already counts as initialized.
fn initialize(state: &mut LibraryState) -> Result<(), CkError> {
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
