//! Operator operations: `warden check`, `certs`, `audit`, `keys` and `cmf registrations`.
//!
//! Each operation is written once, here, against a [`Store`](crate::store::Store) and the
//! [`Backends`](crate::keys::backends::Backends) it is given. Two callers use them:
//!
//! - the running agent's admin socket (`api::admin`), with the agent's own open store and
//!   devices: redb takes an exclusive lock on the store file, a PKCS#11 token is logged in by
//!   the agent and a TPM reached over swtpm's TCP interface serves one connection at a time,
//!   so while the agent runs only the agent can do this work;
//! - the CLI when no agent runs, with the store and devices it opens itself.
//!
//! Results are typed and serializable, so the CLI prints the same thing either way.

pub mod audit;
pub mod certs;
pub mod check;
pub mod keys;
pub mod registrations;

use crate::keys::KeyError;
use crate::store::StoreError;

/// Why an operator operation failed.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// The request names something malformed (a serial, a key reference, an algorithm).
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    /// Well-formed but refused by a rule (a registration transfer the trust-domain policy
    /// does not permit).
    #[error("{0}")]
    Refused(String),
    #[error("store")]
    Store(#[from] StoreError),
    #[error("key layer")]
    Key(#[from] KeyError),
    /// The operation ran and its outcome is a failure (a signature that does not verify, a
    /// key still present after destroy).
    #[error("{0}")]
    Failed(String),
}

impl OpsError {
    /// The HTTP status of the admin API for this error.
    pub fn status(&self) -> u16 {
        match self {
            OpsError::BadRequest(_) => 400,
            OpsError::NotFound(_) => 404,
            OpsError::Refused(_) => 422,
            OpsError::Key(KeyError::NotFound(_)) => 404,
            OpsError::Key(KeyError::InvalidReference(_) | KeyError::InvalidArgument(_)) => 400,
            OpsError::Key(e) if e.is_transient() => 503,
            OpsError::Store(_) | OpsError::Key(_) => 500,
            OpsError::Failed(_) => 500,
        }
    }
}
