//! TPM 2.0 backend.
//!
//! One owner thread holds the ESAPI context (it is neither `Send` nor `Sync`, and a TPM
//! without a resource manager must see one command stream); [`TpmKeyStore`] hands it
//! commands and waits for each answer at most a deadline, so the store is `Send + Sync` and
//! a hung TPM costs a caller a bounded wait and an `Unavailable`, never a stuck thread. The
//! parts, one job each:
//!
//! - `owner`: the owner thread, command deadlines, the supervisor that abandons a thread
//!   stuck in the TPM and starts a fresh connection, the "TPM down" state and the bound on
//!   waiting callers;
//! - `connection`: one ESAPI context, reconnection inside a command, the transient-handle
//!   rules, TCTI parsing and the classification of TSS errors;
//! - `keys`: the storage primary, key generation, signing, erasure, listing, templates;
//! - `nv`: NV indices; `attest`: attestation keys and TPM2_Certify; `device`: the identity.
//!
//! Keys are persistent objects under an ECC P-256 storage primary (TCG SRK template,
//! persisted at `storage_primary_handle`), placed at the first free handle of the configured
//! key range. The handle map is documented in `tpm/HANDLES.md`.
//!
//! Sessions: commands with one authorization use the password session (empty or owner auth);
//! commands without an authorization handle (ReadPublic, GetCapability, TR_FromTPMPublic) run
//! with no session at all, otherwise the TPM answers 0x098b.
//!
//! Transient slots are scarce (swtpm has 3 and no resource manager): every transient object
//! created here (the primary while it is being persisted, a freshly loaded key) is flushed on
//! every path, errors included, and every new connection flushes whatever transient objects
//! an earlier (abandoned or killed) connection left loaded.
//!
//! Attestation ([`KeyAttestation`]): attestation keys are restricted signing keys in the
//! same key range; TPM2_Certify authorizes both the certified key and the AK, so it runs
//! with two password sessions (one session per authorization handle, never more).
//!
//! Recovery: a TCTI-layer error (connection refused or reset: the TPM or swtpm went away)
//! is transient: the command reconnects at once and retries (`recovery_attempts`, within its
//! deadline); when that fails the TPM is marked down, commands fail at once with
//! [`KeyError::Unavailable`] and the owner thread reconnects with backoff (50 ms doubling up
//! to 1 s). A TPM that hangs (a stopped swtpm) is handled by the deadline (see `owner`). TPM
//! response codes (bad handle, bad scheme, ...) are permanent and returned at once as
//! [`KeyError::Tpm`] naming the TPM command.
//!
//! Limits, knowingly accepted: a `generate` whose connection drops, or whose caller's
//! deadline passes, after TPM2_EvictControl succeeded but before the answer arrived leaves
//! one extra key in the range (visible in `list`).

mod attest;
mod connection;
mod device;
mod keys;
mod nv;
mod owner;

use std::time::{Duration, Instant};

use secrecy::ExposeSecret;
use tss_esapi::structures::Auth;

use crate::config::TpmConfig;
use crate::keys::{
    BackendKind, CertifyEvidence, ErasureRecord, KeyAlgorithm, KeyAttestation, KeyError, KeyInfo,
    KeyRef, KeySpec, KeyStore, PublicKey, SignatureScheme, TpmHandle,
};
use connection::{parse_tcti, Layout, Target, Worker, TRANSIENT_LAST};
use keys::Template;
use owner::{Deadline, Limits, Owner};

/// A key store backed by a TPM 2.0 (or swtpm), driven by one owner thread.
pub struct TpmKeyStore {
    owner: Owner,
    layout: Layout,
    device: String,
    software: bool,
}

impl TpmKeyStore {
    /// Connect to the TPM named by `config.tcti`, make sure the storage primary exists
    /// (reused when present, created and persisted otherwise) and read the device identity.
    pub fn open(config: &TpmConfig) -> Result<TpmKeyStore, KeyError> {
        let tcti = parse_tcti(&config.tcti)?;
        let owner_auth = match &config.owner_auth {
            None => None,
            Some(source) => {
                let secret = source
                    .read()
                    .map_err(|e| KeyError::TpmOther(format!("owner_auth ({source}): {e}")))?;
                let auth = Auth::try_from(secret.expose_secret().as_bytes().to_vec())
                    .map_err(|e| KeyError::TpmOther(format!("owner_auth ({source}): {e}")))?;
                Some(auth)
            }
        };
        let layout = Layout {
            primary: config.storage_primary_handle,
            first: config.key_handle_first,
            last: config.key_handle_last,
        };
        if layout.primary >> 24 != 0x81
            || layout.first >> 24 != 0x81
            || layout.last >> 24 != 0x81
            || layout.first > layout.last
            || (layout.first..=layout.last).contains(&layout.primary)
        {
            return Err(KeyError::InvalidArgument(format!(
                "TPM handle layout: storage primary 0x{:08x} and key range 0x{:08x}-0x{:08x} \
                 must be persistent handles, with the primary outside the range",
                layout.primary, layout.first, layout.last
            )));
        }
        if config.command_timeout_ms == 0
            || config.keygen_timeout_ms == 0
            || config.max_waiting_commands == 0
        {
            return Err(KeyError::InvalidArgument(
                "TPM command_timeout_ms, keygen_timeout_ms and max_waiting_commands must be \
                 at least 1"
                    .to_string(),
            ));
        }
        let limits = Limits {
            command: Duration::from_millis(config.command_timeout_ms),
            keygen: Duration::from_millis(config.keygen_timeout_ms),
            max_waiting: config.max_waiting_commands,
        };
        let target = Target {
            tcti,
            tcti_text: config.tcti.clone(),
            owner_auth,
            layout,
            attempts: config.recovery_attempts.max(1),
        };
        let mut store = TpmKeyStore {
            owner: Owner::start(target, limits)?,
            layout,
            device: String::new(),
            software: false,
        };
        // On error `store` is dropped here, which stops the owner thread. Creating the
        // primary is a key generation: it gets that deadline.
        let identity = store.call("open", Deadline::KeyGeneration, |c, l| {
            keys::ensure_primary(c, l)?;
            device::device_identity(c)
        })?;
        store.software = identity.software;
        store.device = identity.describe();
        if store.software {
            tracing::warn!(
                device = %store.device,
                tcti = %config.tcti,
                "TPM backend is a SOFTWARE TPM: keys are NOT hardware-protected; \
                 use it for tests only"
            );
        } else {
            tracing::info!(device = %store.device, "TPM backend opened");
        }
        Ok(store)
    }

    /// The raw TPMA_OBJECT bits of a persistent key, read back from the TPM.
    pub fn object_attributes(&self, key: &KeyRef) -> Result<u32, KeyError> {
        let handle = persistent_handle(key)?;
        self.call("TPM2_ReadPublic", Deadline::Command, move |c, _| {
            let public = c.read_public_of(handle)?;
            Ok(u32::from(public.object_attributes()))
        })
    }

    /// How many transient objects are loaded in the TPM right now (TPM2_GetCapability,
    /// handles 0x80xxxxxx). Zero when idle: this backend flushes everything it loads.
    pub fn transient_handle_count(&self) -> Result<usize, KeyError> {
        self.call("TPM2_GetCapability", Deadline::Command, |c, _| {
            Ok(c.handles_in(
                tss_esapi::constants::tss::TPM2_TRANSIENT_FIRST,
                TRANSIENT_LAST,
            )?
            .len())
        })
    }

    /// Define an owner NV index holding `data` (ownerwrite, ownerread, authwrite, authread,
    /// noDA; empty index auth). Used for objects kept on behalf of VNFs, and by tests.
    pub fn nv_define(&self, index: TpmHandle, data: &[u8]) -> Result<(), KeyError> {
        if !index.is_nv_index() {
            return Err(KeyError::InvalidArgument(format!(
                "{index} is not an NV index (0x01xxxxxx)"
            )));
        }
        if data.is_empty() || data.len() > nv::NV_MAX_SIZE {
            return Err(KeyError::InvalidArgument(format!(
                "NV data of {} bytes: must be 1 to {} bytes",
                data.len(),
                nv::NV_MAX_SIZE
            )));
        }
        let data = data.to_vec();
        self.call("TPM2_NV_DefineSpace", Deadline::Command, move |c, _| {
            nv::nv_define(c, index, &data)
        })
    }

    /// Generate a key persisted at exactly `handle` (inside the key range), so configuration
    /// can name a key before it exists (`ca.key = "tpm:handle=0x81000110"`).
    pub fn generate_at(&self, handle: TpmHandle, spec: &KeySpec) -> Result<KeyInfo, KeyError> {
        let spec = spec.clone();
        self.call("TPM2_Create", Deadline::KeyGeneration, move |c, l| {
            keys::generate(c, l, &spec, Some(handle), Template::Signing)
        })
    }

    /// Generate a signing key with exactly the TPMA_OBJECT bits `object_attributes` (TPM 2.0
    /// Part 2, 8.3) instead of the backend's fixed set. For test vectors only: a key without
    /// fixedTPM or sensitiveDataOrigin, which an attestation verifier must refuse. The TPM
    /// still enforces its own consistency rules (TPM_RC_ATTRIBUTES).
    pub fn generate_with_attributes(
        &self,
        spec: &KeySpec,
        object_attributes: u32,
    ) -> Result<KeyInfo, KeyError> {
        let spec = spec.clone();
        self.call("TPM2_Create", Deadline::KeyGeneration, move |c, l| {
            keys::generate(c, l, &spec, None, Template::Custom(object_attributes))
        })
    }

    /// True when the device identifies itself as a software TPM (swtpm / libtpms, IBM's
    /// simulator).
    pub fn is_software_tpm(&self) -> bool {
        self.software
    }

    /// Why the TPM counts as down right now (a command passed its deadline, or the
    /// connection is lost and being rebuilt with backoff), or `None` while it is up. Cheap:
    /// no TPM command. While down, every command fails at once with `Unavailable`.
    pub fn down_reason(&self) -> Option<String> {
        self.owner.down_reason()
    }

    /// Run `command` on the owner thread's connection (reconnecting inside the command when
    /// the connection was lost) and wait for the answer at most the `deadline` of its kind.
    fn call<T, F>(
        &self,
        operation: &'static str,
        deadline: Deadline,
        command: F,
    ) -> Result<T, KeyError>
    where
        T: Send + 'static,
        F: FnMut(&mut connection::Connection, &Layout) -> Result<T, KeyError> + Send + 'static,
    {
        self.owner.call(
            operation,
            deadline,
            move |worker: &mut Worker, until: Instant| worker.run(operation, until, command),
        )
    }
}

impl KeyStore for TpmKeyStore {
    fn kind(&self) -> BackendKind {
        BackendKind::Tpm
    }

    fn device(&self) -> String {
        self.device.clone()
    }

    fn generate(&self, spec: &KeySpec) -> Result<KeyInfo, KeyError> {
        let spec = spec.clone();
        self.call("TPM2_Create", Deadline::KeyGeneration, move |c, l| {
            keys::generate(c, l, &spec, None, Template::Signing)
        })
    }

    fn public_key(&self, key: &KeyRef) -> Result<PublicKey, KeyError> {
        let handle = persistent_handle(key)?;
        self.call("TPM2_ReadPublic", Deadline::Command, move |c, _| {
            let public = c.read_public_of(handle)?;
            keys::public_key_of(&public)
        })
    }

    fn sign(
        &self,
        key: &KeyRef,
        scheme: SignatureScheme,
        message: &[u8],
    ) -> Result<Vec<u8>, KeyError> {
        let handle = persistent_handle(key)?;
        // Hash in the agent: the TPM signs a digest (TPM2_Sign with a NULL ticket, allowed
        // because the key is not restricted).
        let digest = scheme.hash_algorithm().digest(message);
        self.call("TPM2_Sign", Deadline::Command, move |c, _| {
            keys::sign(c, handle, scheme, &digest)
        })
    }

    fn destroy(&self, key: &KeyRef) -> Result<ErasureRecord, KeyError> {
        let handle = match key {
            KeyRef::Tpm(handle) => *handle,
            KeyRef::Pkcs11(_) => return Err(KeyError::WrongBackend(key.to_string())),
        };
        if handle.is_persistent() {
            if handle.0 == self.layout.primary {
                return Err(KeyError::InvalidArgument(format!(
                    "{handle} is the storage primary key: refusing to destroy it (every key \
                     of this agent is its child)"
                )));
            }
            if !self.layout.contains(handle.0) {
                return Err(KeyError::InvalidArgument(format!(
                    "{handle} is outside the configured key range 0x{:08x}-0x{:08x}: \
                     refusing to destroy a key this agent does not manage",
                    self.layout.first, self.layout.last
                )));
            }
        }
        let (kind, verified) = if handle.is_persistent() {
            self.call("TPM2_EvictControl", Deadline::Command, move |c, _| {
                keys::destroy_persistent(c, handle)
            })?
        } else {
            self.call("TPM2_NV_UndefineSpace", Deadline::Command, move |c, _| {
                nv::destroy_nv_index(c, handle)
            })?
        };
        if !verified {
            tracing::error!(object = %handle, "TPM object still present after destroy");
        }
        Ok(ErasureRecord::new(
            key.to_string(),
            kind.to_string(),
            self.device(),
            verified,
        ))
    }

    fn list(&self) -> Result<Vec<KeyInfo>, KeyError> {
        self.call("TPM2_GetCapability", Deadline::Command, keys::list)
    }
}

impl KeyAttestation for TpmKeyStore {
    fn create_attestation_key(&self, spec: &KeySpec) -> Result<KeyInfo, KeyError> {
        if !matches!(spec.algorithm, KeyAlgorithm::EcP256 | KeyAlgorithm::Rsa2048) {
            return Err(KeyError::Unsupported(format!(
                "a {} attestation key (ec-p256 or rsa-2048)",
                spec.algorithm
            )));
        }
        let spec = spec.clone();
        self.call("TPM2_Create", Deadline::KeyGeneration, move |c, l| {
            keys::generate(c, l, &spec, None, Template::Attestation)
        })
    }

    fn certify(
        &self,
        key: &KeyRef,
        attestation_key: &KeyRef,
        qualifying_data: &[u8],
    ) -> Result<CertifyEvidence, KeyError> {
        let key = persistent_handle(key)?;
        let attestation_key = persistent_handle(attestation_key)?;
        let qualifying_data = qualifying_data.to_vec();
        self.call("TPM2_Certify", Deadline::Command, move |c, _| {
            attest::certify(c, key, attestation_key, &qualifying_data)
        })
    }
}

fn persistent_handle(key: &KeyRef) -> Result<TpmHandle, KeyError> {
    match key {
        KeyRef::Tpm(handle) if handle.is_persistent() => Ok(*handle),
        KeyRef::Tpm(handle) => Err(KeyError::InvalidArgument(format!(
            "{handle} is an NV index, not a key"
        ))),
        KeyRef::Pkcs11(_) => Err(KeyError::WrongBackend(key.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<TpmKeyStore>();
    }
}
