//! TPM 2.0 backend.
//!
//! One dedicated thread owns the ESAPI [`Context`] (it is neither `Send` nor `Sync`, and a TPM
//! without a resource manager must see one command stream); [`TpmKeyStore`] only holds the
//! sending half of a channel of commands, each carrying its own reply channel, so the store is
//! `Send + Sync` and callers block on the reply.
//!
//! Keys are persistent objects under an ECC P-256 storage primary (TCG SRK template, persisted
//! at `storage_primary_handle`), placed at the first free handle of the configured key range.
//! The handle map is documented in `tpm/HANDLES.md`.
//!
//! Sessions: commands with one authorization use the password session (empty or owner auth);
//! commands without an authorization handle (ReadPublic, GetCapability, TR_FromTPMPublic) run
//! with no session at all, otherwise the TPM answers 0x098b.
//!
//! Transient slots are scarce (swtpm has 3 and no resource manager): every transient object
//! created here (the primary while it is being persisted, a freshly loaded key) is flushed on
//! every path, errors included, by [`with_transient`].
//!
//! Attestation ([`KeyAttestation`]): attestation keys are restricted signing keys in the
//! same key range; TPM2_Certify authorizes both the certified key and the AK, so it runs
//! with two password sessions (one session per authorization handle, never more).
//!
//! Recovery: a TCTI-layer error (connection refused or reset: the TPM or swtpm went away) is
//! transient. The owner thread then drops the context, re-creates it from the TCTI with
//! backoff (50 ms doubling up to 2 s, `recovery_attempts` tries per command) and retries the
//! command; when every try fails the command returns [`KeyError::Unavailable`]. TPM response
//! codes (bad handle, bad scheme, ...) are permanent and returned at once as [`KeyError::Tpm`]
//! naming the TPM command.
//!
//! Limits, knowingly accepted: a `generate` whose connection drops after TPM2_EvictControl
//! succeeded but before the answer arrived is retried and leaves one extra key in the range
//! (visible in `list`); a TPM that hangs without closing the connection (a stopped swtpm)
//! blocks the owner thread, as the ESAPI default TCTI timeout is "block".

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::mpsc::{self, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

use secrecy::ExposeSecret;
use spki::EncodePublicKey;
use tss_esapi::attributes::{NvIndexAttributesBuilder, ObjectAttributes, ObjectAttributesBuilder};
use tss_esapi::constants::{tss as tpm2, CapabilityType, NvIndexType, PropertyTag};
use tss_esapi::handles::{
    KeyHandle, NvIndexHandle, NvIndexTpmHandle, ObjectHandle, PersistentTpmHandle,
    TpmHandle as EsysTpmHandle,
};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::dynamic_handles::Persistent;
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::resource_handles::{Hierarchy, NvAuth, Provision};
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{
    Auth, CapabilityData, Data, Digest, EccPoint, EccScheme, HashScheme, HashcheckTicket,
    KeyDerivationFunctionScheme, MaxNvBuffer, NvPublicBuilder, Public, PublicEccParameters,
    PublicKeyRsa, PublicRsaParameters, RsaExponent, RsaScheme, Signature,
    SignatureScheme as TpmSignatureScheme, SymmetricDefinitionObject,
};
use tss_esapi::traits::Marshall;
use tss_esapi::tss2_esys::TPMT_TK_HASHCHECK;
use tss_esapi::{Context, TctiNameConf};

use crate::config::TpmConfig;
use crate::keys::{
    ecdsa_raw_to_der, BackendKind, CertifyEvidence, ErasureRecord, KeyAlgorithm, KeyAttestation,
    KeyError, KeyInfo, KeyRef, KeySpec, KeyStore, PublicKey, SignatureScheme, TpmHandle,
};

/// A key store backed by a TPM 2.0 (or swtpm), driven by one owner thread.
pub struct TpmKeyStore {
    commands: Option<Sender<Job>>,
    owner: Option<JoinHandle<()>>,
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
        let worker = Worker {
            tcti,
            tcti_text: config.tcti.clone(),
            owner_auth,
            layout,
            attempts: config.recovery_attempts.max(1),
            connection: None,
        };
        let (commands, queue) = mpsc::channel::<Job>();
        let owner = std::thread::Builder::new()
            .name("tpm-owner".to_string())
            .spawn(move || owner_loop(worker, queue))
            .map_err(|e| KeyError::TpmOther(format!("cannot start the TPM owner thread: {e}")))?;
        let mut store = TpmKeyStore {
            commands: Some(commands),
            owner: Some(owner),
            layout,
            device: String::new(),
            software: false,
        };
        // On error `store` is dropped here, which stops the owner thread.
        let identity = store.call(|w| {
            w.run("open", |c, l| {
                ensure_primary(c, l)?;
                device_identity(c)
            })
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
        self.call(move |w| {
            w.run("TPM2_ReadPublic", |c, _| {
                let public = c.read_public_of(handle)?;
                Ok(u32::from(public.object_attributes()))
            })
        })
    }

    /// How many transient objects are loaded in the TPM right now (TPM2_GetCapability,
    /// handles 0x80xxxxxx). Zero when idle: this backend flushes everything it loads.
    pub fn transient_handle_count(&self) -> Result<usize, KeyError> {
        self.call(|w| {
            w.run("TPM2_GetCapability", |c, _| {
                Ok(handles_in(&mut c.context, tpm2::TPM2_TRANSIENT_FIRST, 0x80ff_ffff)?.len())
            })
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
        if data.is_empty() || data.len() > NV_MAX_SIZE {
            return Err(KeyError::InvalidArgument(format!(
                "NV data of {} bytes: must be 1 to {NV_MAX_SIZE} bytes",
                data.len()
            )));
        }
        let data = data.to_vec();
        self.call(move |w| w.run("TPM2_NV_DefineSpace", |c, _| nv_define(c, index, &data)))
    }

    /// True when the device identifies itself as a software TPM (swtpm / libtpms, IBM's
    /// simulator).
    /// Generate a key persisted at exactly `handle` (inside the key range), so configuration
    /// can name a key before it exists (`ca.key = "tpm:handle=0x81000110"`).
    pub fn generate_at(&self, handle: TpmHandle, spec: &KeySpec) -> Result<KeyInfo, KeyError> {
        let spec = spec.clone();
        self.call(move |w| {
            w.run("TPM2_Create", |c, l| {
                generate(c, l, &spec, Some(handle), Template::Signing)
            })
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
        self.call(move |w| {
            w.run("TPM2_Create", |c, l| {
                generate(c, l, &spec, None, Template::Custom(object_attributes))
            })
        })
    }

    pub fn is_software_tpm(&self) -> bool {
        self.software
    }

    /// Send `job` to the owner thread and wait for its reply.
    fn call<T, F>(&self, job: F) -> Result<T, KeyError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Worker) -> Result<T, KeyError> + Send + 'static,
    {
        let stopped =
            || KeyError::unavailable("TPM", "TPM command", "the TPM owner thread has stopped");
        let commands = self.commands.as_ref().ok_or_else(stopped)?;
        let (reply, answer) = mpsc::channel();
        let job: Job = Box::new(move |worker| {
            // The caller may have gone away; nothing to do then.
            let _ = reply.send(job(worker));
        });
        commands.send(job).map_err(|_| stopped())?;
        answer.recv().map_err(|_| stopped())?
    }
}

impl Drop for TpmKeyStore {
    fn drop(&mut self) {
        // Closing the channel ends the owner loop, which drops the ESAPI context.
        self.commands = None;
        if let Some(owner) = self.owner.take() {
            let _ = owner.join();
        }
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
        self.call(move |w| {
            w.run("TPM2_Create", |c, l| {
                generate(c, l, &spec, None, Template::Signing)
            })
        })
    }

    fn public_key(&self, key: &KeyRef) -> Result<PublicKey, KeyError> {
        let handle = persistent_handle(key)?;
        self.call(move |w| {
            w.run("TPM2_ReadPublic", |c, _| {
                let public = c.read_public_of(handle)?;
                public_key_of(&public)
            })
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
        self.call(move |w| w.run("TPM2_Sign", |c, _| sign(c, handle, scheme, &digest)))
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
        let (kind, verified) = self.call(move |w| {
            if handle.is_persistent() {
                w.run("TPM2_EvictControl", |c, _| destroy_persistent(c, handle))
            } else {
                w.run("TPM2_NV_UndefineSpace", |c, _| destroy_nv_index(c, handle))
            }
        })?;
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
        self.call(|w| w.run("TPM2_GetCapability", list))
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
        self.call(move |w| {
            w.run("TPM2_Create", |c, l| {
                generate(c, l, &spec, None, Template::Attestation)
            })
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
        self.call(move |w| {
            w.run("TPM2_Certify", |c, _| {
                certify(c, key, attestation_key, &qualifying_data)
            })
        })
    }
}

// ----------------------------------------------------------------------------------------
// Owner thread

type Job = Box<dyn FnOnce(&mut Worker) + Send>;

/// Handles this agent uses.
#[derive(Clone, Copy, Debug)]
struct Layout {
    primary: u32,
    first: u32,
    last: u32,
}

impl Layout {
    fn contains(&self, handle: u32) -> bool {
        (self.first..=self.last).contains(&handle)
    }
}

/// State of the owner thread: how to reach the TPM, and the live connection if any.
struct Worker {
    tcti: TctiNameConf,
    tcti_text: String,
    owner_auth: Option<Auth>,
    layout: Layout,
    attempts: u32,
    connection: Option<Connection>,
}

/// An ESAPI context and the ESYS handles opened through it. Dropped as a whole when the TPM
/// connection is lost: ESYS handles do not survive a new context.
struct Connection {
    context: Context,
    /// ESYS handles of persistent objects (TR_FromTPMPublic costs a TPM2_ReadPublic; a sign
    /// should not pay it every time).
    objects: HashMap<u32, ObjectHandle>,
    /// Key algorithms read with TPM2_ReadPublic, so a sign checks the scheme without a
    /// round trip. Dropped with the ESYS handle.
    algorithms: HashMap<u32, KeyAlgorithm>,
}

fn owner_loop(mut worker: Worker, queue: mpsc::Receiver<Job>) {
    while let Ok(job) = queue.recv() {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&mut worker)));
        if outcome.is_err() {
            // The job's reply channel is gone, so its caller gets Unavailable. Start from a
            // fresh context: the old one may be mid-command.
            tracing::error!("TPM command panicked; resetting the TPM connection");
            worker.connection = None;
        }
    }
}

const BACKOFF_FIRST: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

impl Worker {
    /// Run `command` on a live connection, reconnecting with backoff after transient
    /// (connection) errors; `operation` names what failed when the TPM stays unreachable.
    fn run<T>(
        &mut self,
        operation: &'static str,
        mut command: impl FnMut(&mut Connection, &Layout) -> Result<T, KeyError>,
    ) -> Result<T, KeyError> {
        let mut delay = BACKOFF_FIRST;
        let mut reason = String::new();
        for attempt in 0..self.attempts {
            if attempt > 0 {
                std::thread::sleep(delay);
                delay = (delay * 2).min(BACKOFF_MAX);
            }
            if self.connection.is_none() {
                match self.connect() {
                    Ok(connection) => self.connection = Some(connection),
                    Err(e) => {
                        tracing::warn!(tcti = %self.tcti_text, attempt, error = %e, "TPM connect failed");
                        reason = format!(
                            "cannot connect to TPM '{}': {}",
                            self.tcti_text,
                            explain(&e)
                        );
                        continue;
                    }
                }
            }
            let Some(connection) = self.connection.as_mut() else {
                continue;
            };
            match command(connection, &self.layout) {
                Err(e) if is_connection_error(&e) => {
                    tracing::warn!(tcti = %self.tcti_text, attempt, error = %e, "TPM connection lost; reconnecting");
                    reason = explain(&e);
                    self.connection = None;
                }
                other => return other,
            }
        }
        Err(KeyError::unavailable("TPM", operation, reason))
    }

    fn connect(&self) -> Result<Connection, KeyError> {
        let mut context = Context::new(self.tcti.clone()).map_err(tpm_error("Esys_Initialize"))?;
        if let Some(auth) = &self.owner_auth {
            context
                .tr_set_auth(ObjectHandle::Owner, auth.clone())
                .map_err(tpm_error("Esys_TR_SetAuth"))?;
        }
        Ok(Connection {
            context,
            objects: HashMap::new(),
            algorithms: HashMap::new(),
        })
    }
}

impl Connection {
    /// The ESYS handle of a persistent object or NV index; `NotFound` when the TPM has none.
    fn esys_handle(&mut self, handle: TpmHandle) -> Result<ObjectHandle, KeyError> {
        if let Some(object) = self.objects.get(&handle.0) {
            return Ok(*object);
        }
        let tpm_handle = if handle.is_nv_index() {
            EsysTpmHandle::NvIndex(
                NvIndexTpmHandle::new(handle.0).map_err(tpm_error("Esys_TR_FromTPMPublic"))?,
            )
        } else {
            EsysTpmHandle::Persistent(
                PersistentTpmHandle::new(handle.0).map_err(tpm_error("Esys_TR_FromTPMPublic"))?,
            )
        };
        let object = self
            .context
            .execute_without_session(|c| c.tr_from_tpm_public(tpm_handle))
            .map_err(|e| not_found_or(handle, e, "Esys_TR_FromTPMPublic"))?;
        if handle.is_persistent() {
            self.objects.insert(handle.0, object);
        }
        Ok(object)
    }

    /// Forget a cached ESYS handle (the object is gone or the TPM refused it).
    fn forget(&mut self, handle: TpmHandle) {
        self.algorithms.remove(&handle.0);
        if let Some(mut object) = self.objects.remove(&handle.0) {
            let _ = self.context.tr_close(&mut object);
        }
    }

    fn algorithm_of(&mut self, handle: TpmHandle) -> Result<KeyAlgorithm, KeyError> {
        if let Some(algorithm) = self.algorithms.get(&handle.0) {
            return Ok(*algorithm);
        }
        let algorithm = key_algorithm(&self.read_public_of(handle)?)?;
        self.algorithms.insert(handle.0, algorithm);
        Ok(algorithm)
    }

    fn read_public_of(&mut self, handle: TpmHandle) -> Result<Public, KeyError> {
        let object = self.esys_handle(handle)?;
        let result = self
            .context
            .execute_without_session(|c| c.read_public(KeyHandle::from(object)));
        match result {
            Ok((public, _, _)) => Ok(public),
            Err(e) => {
                self.forget(handle);
                Err(not_found_or(handle, e, "TPM2_ReadPublic"))
            }
        }
    }
}

// ----------------------------------------------------------------------------------------
// Commands (run on the owner thread)

fn ensure_primary(c: &mut Connection, layout: &Layout) -> Result<KeyHandle, KeyError> {
    let handle = TpmHandle(layout.primary);
    match c.read_public_of(handle) {
        Ok(public) => {
            let attributes = public.object_attributes();
            if !(attributes.restricted() && attributes.decrypt()) {
                return Err(KeyError::TpmOther(format!(
                    "{handle} holds an object that is not a storage key (restricted decrypt); \
                     configure another storage_primary_handle"
                )));
            }
            Ok(KeyHandle::from(c.esys_handle(handle)?))
        }
        Err(KeyError::NotFound(_)) => {
            tracing::info!(handle = %handle, "creating the ECC P-256 storage primary key");
            let created = c
                .context
                .execute_with_session(Some(AuthSession::Password), |ctx| {
                    ctx.create_primary(
                        Hierarchy::Owner,
                        storage_primary_template()?,
                        None,
                        None,
                        None,
                        None,
                    )
                })
                .map_err(tpm_error("TPM2_CreatePrimary"))?;
            let persistent = persistent(handle.0)?;
            let transient = created.key_handle;
            let object = with_transient(&mut c.context, transient.into(), |ctx| {
                ctx.execute_with_session(Some(AuthSession::Password), |ctx| {
                    ctx.evict_control(Provision::Owner, transient.into(), persistent)
                })
                .map_err(tpm_error("TPM2_EvictControl"))
            })?;
            c.objects.insert(handle.0, object);
            Ok(KeyHandle::from(object))
        }
        Err(e) => Err(e),
    }
}

fn generate(
    c: &mut Connection,
    layout: &Layout,
    spec: &KeySpec,
    at: Option<TpmHandle>,
    template: Template,
) -> Result<KeyInfo, KeyError> {
    let used = handles_in(&mut c.context, layout.first, layout.last)?;
    let free = match at {
        Some(handle) => {
            if !(layout.first..=layout.last).contains(&handle.0) {
                return Err(KeyError::InvalidArgument(format!(
                    "{handle} is outside the key range 0x{:08x}-0x{:08x}",
                    layout.first, layout.last
                )));
            }
            if used.contains(&handle.0) {
                return Err(KeyError::AlreadyExists(handle.to_string()));
            }
            handle.0
        }
        None => (layout.first..=layout.last)
            .find(|h| !used.contains(h))
            .ok_or_else(|| {
                KeyError::TpmOther(format!(
                    "no free persistent handle in the key range 0x{:08x}-0x{:08x}",
                    layout.first, layout.last
                ))
            })?,
    };
    let parent = ensure_primary(c, layout)?;
    let created = c
        .context
        .execute_with_session(Some(AuthSession::Password), |ctx| {
            ctx.create(
                parent,
                template.public(spec.algorithm)?,
                None,
                None,
                None,
                None,
            )
        })
        .map_err(tpm_error("TPM2_Create"))?;
    let public_key = public_key_of(&created.out_public)?;
    let loaded = c
        .context
        .execute_with_session(Some(AuthSession::Password), |ctx| {
            ctx.load(parent, created.out_private, created.out_public)
        })
        .map_err(tpm_error("TPM2_Load"))?;
    let target = persistent(free)?;
    let mut object = with_transient(&mut c.context, loaded.into(), |ctx| {
        ctx.execute_with_session(Some(AuthSession::Password), |ctx| {
            ctx.evict_control(Provision::Owner, loaded.into(), target)
        })
        .map_err(tpm_error("TPM2_EvictControl"))
    })?;
    // Resolved again on first use; the ESYS object of a fresh key is cheap to drop.
    let _ = c.context.tr_close(&mut object);
    let handle = TpmHandle(free);
    tracing::info!(key = %handle, algorithm = %spec.algorithm, label = %spec.label, "TPM key generated");
    Ok(KeyInfo {
        reference: KeyRef::Tpm(handle),
        label: spec.label.clone(),
        public_key,
    })
}

fn sign(
    c: &mut Connection,
    handle: TpmHandle,
    scheme: SignatureScheme,
    digest: &[u8],
) -> Result<Vec<u8>, KeyError> {
    let object = c.esys_handle(handle)?;
    let algorithm = c.algorithm_of(handle)?;
    if !scheme.fits(algorithm) {
        return Err(KeyError::InvalidArgument(format!(
            "scheme {scheme} does not fit the {algorithm} key {handle}"
        )));
    }
    let hash = match scheme.hash_algorithm() {
        crate::keys::HashAlgorithm::Sha256 => HashingAlgorithm::Sha256,
        crate::keys::HashAlgorithm::Sha384 => HashingAlgorithm::Sha384,
    };
    let hash_scheme = HashScheme::new(hash);
    let tpm_scheme = if scheme.is_ecdsa() {
        TpmSignatureScheme::EcDsa { hash_scheme }
    } else if scheme.is_pss() {
        // PSS salt: TPM2_Sign takes no salt length. libtpms (swtpm) uses salt = hash length,
        // as TLS 1.3 requires (RFC 8446 4.2.3); tests/tpm.rs checks that a verifier fixed to
        // the hash length accepts and one expecting another length rejects. Some older TPM
        // firmware used the largest possible salt (TPM 2.0 Part 1 before rev 1.38 allowed it):
        // such signatures are valid PSS but strict TLS 1.3 peers reject them.
        TpmSignatureScheme::RsaPss { hash_scheme }
    } else {
        TpmSignatureScheme::RsaSsa { hash_scheme }
    };
    let digest = Digest::try_from(digest.to_vec()).map_err(tpm_error("TPM2_Sign"))?;
    let result = c
        .context
        .execute_with_session(Some(AuthSession::Password), |ctx| {
            ctx.sign(KeyHandle::from(object), digest, tpm_scheme, null_ticket()?)
        });
    let signature = match result {
        Ok(signature) => signature,
        Err(e) => {
            c.forget(handle);
            return Err(not_found_or(handle, e, "TPM2_Sign"));
        }
    };
    match signature {
        Signature::EcDsa(ecc) => {
            let size = field_size(algorithm);
            let mut raw = pad_left(ecc.signature_r().value(), size)?;
            raw.extend_from_slice(&pad_left(ecc.signature_s().value(), size)?);
            ecdsa_raw_to_der(&raw)
        }
        Signature::RsaSsa(rsa) | Signature::RsaPss(rsa) => Ok(rsa.signature().value().to_vec()),
        other => Err(KeyError::TpmOther(format!(
            "TPM2_Sign returned an unexpected {:?} signature",
            other.algorithm()
        ))),
    }
}

/// TPM2_Certify of a persistent key by a persistent AK. Two authorizations (the object and
/// the signing key), so two password sessions; the AK's own scheme signs (scheme NULL).
/// Both objects are persistent: nothing transient to flush.
fn certify(
    c: &mut Connection,
    key: TpmHandle,
    attestation_key: TpmHandle,
    qualifying_data: &[u8],
) -> Result<CertifyEvidence, KeyError> {
    let data = Data::try_from(qualifying_data.to_vec()).map_err(|_| {
        KeyError::InvalidArgument(format!(
            "qualifying data of {} octets: at most 64",
            qualifying_data.len()
        ))
    })?;
    let object = c.esys_handle(key)?;
    let signer = c.esys_handle(attestation_key)?;
    let result = c.context.execute_with_sessions(
        (
            Some(AuthSession::Password),
            Some(AuthSession::Password),
            None,
        ),
        |ctx| {
            ctx.certify(
                object,
                KeyHandle::from(signer),
                data,
                TpmSignatureScheme::Null,
            )
        },
    );
    let (attest, signature) = match result {
        Ok(evidence) => evidence,
        Err(e) => {
            c.forget(key);
            c.forget(attestation_key);
            return Err(KeyError::Tpm {
                command: "TPM2_Certify",
                source: e,
            });
        }
    };
    let public = c.read_public_of(key)?;
    let marshal = tpm_error("Tss2_MU_Marshal");
    Ok(CertifyEvidence {
        attest: attest.marshall().map_err(&marshal)?,
        signature: signature.marshall().map_err(&marshal)?,
        public_area: public.marshall().map_err(&marshal)?,
    })
}

fn destroy_persistent(
    c: &mut Connection,
    handle: TpmHandle,
) -> Result<(&'static str, bool), KeyError> {
    if !handles_in(&mut c.context, handle.0, handle.0)?.contains(&handle.0) {
        c.forget(handle);
        return Err(KeyError::NotFound(handle.to_string()));
    }
    let object = c.esys_handle(handle)?;
    let target = persistent(handle.0)?;
    let result = c
        .context
        .execute_with_session(Some(AuthSession::Password), |ctx| {
            ctx.evict_control(Provision::Owner, object, target)
        });
    // On success ESYS has closed the object; on failure it may be stale. Either way drop it
    // from the cache (forget ignores the close error of an already closed handle).
    match result {
        Ok(_) => {
            c.objects.remove(&handle.0);
            c.algorithms.remove(&handle.0);
        }
        Err(e) => {
            c.forget(handle);
            return Err(not_found_or(handle, e, "TPM2_EvictControl"));
        }
    }
    let verified = !handles_in(&mut c.context, handle.0, handle.0)?.contains(&handle.0);
    Ok(("persistent key (private and public area)", verified))
}

fn destroy_nv_index(
    c: &mut Connection,
    handle: TpmHandle,
) -> Result<(&'static str, bool), KeyError> {
    if !handles_in(&mut c.context, handle.0, handle.0)?.contains(&handle.0) {
        return Err(KeyError::NotFound(handle.to_string()));
    }
    let object = c.esys_handle(handle)?;
    let result = c
        .context
        .execute_with_session(Some(AuthSession::Password), |ctx| {
            ctx.nv_undefine_space(Provision::Owner, NvIndexHandle::from(object))
        });
    if let Err(e) = result {
        let mut object = object;
        let _ = c.context.tr_close(&mut object);
        return Err(not_found_or(handle, e, "TPM2_NV_UndefineSpace"));
    }
    let verified = !handles_in(&mut c.context, handle.0, handle.0)?.contains(&handle.0);
    Ok(("NV index", verified))
}

/// Largest NV index this backend defines (TPM 2.0 Part 2 requires at least 2048 bytes of
/// MAX_NV_INDEX_SIZE; swtpm has 2048).
const NV_MAX_SIZE: usize = 2048;
/// Bytes per TPM2_NV_Write (below every TPM's MAX_NV_BUFFER_SIZE, which is at least 512).
const NV_WRITE_CHUNK: usize = 512;

fn nv_define(c: &mut Connection, index: TpmHandle, data: &[u8]) -> Result<(), KeyError> {
    let nv_index = NvIndexTpmHandle::new(index.0).map_err(tpm_error("TPM2_NV_DefineSpace"))?;
    let attributes = NvIndexAttributesBuilder::new()
        .with_nv_index_type(NvIndexType::Ordinary)
        .with_owner_write(true)
        .with_owner_read(true)
        .with_auth_write(true)
        .with_auth_read(true)
        .with_no_da(true)
        .build()
        .map_err(tpm_error("TPM2_NV_DefineSpace"))?;
    let public = NvPublicBuilder::new()
        .with_nv_index(nv_index)
        .with_index_name_algorithm(HashingAlgorithm::Sha256)
        .with_index_attributes(attributes)
        .with_data_area_size(data.len())
        .build()
        .map_err(tpm_error("TPM2_NV_DefineSpace"))?;
    let object = c
        .context
        .execute_with_session(Some(AuthSession::Password), |ctx| {
            ctx.nv_define_space(Provision::Owner, None, public)
        })
        .map_err(tpm_error("TPM2_NV_DefineSpace"))?;
    let mut written = Ok(());
    for (number, chunk) in data.chunks(NV_WRITE_CHUNK).enumerate() {
        let offset = u16::try_from(number * NV_WRITE_CHUNK)
            .map_err(|_| KeyError::InvalidArgument("NV data larger than 64 KiB".to_string()))?;
        let buffer = MaxNvBuffer::try_from(chunk.to_vec()).map_err(tpm_error("TPM2_NV_Write"))?;
        written = c
            .context
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.nv_write(NvAuth::Owner, object, buffer, offset)
            })
            .map_err(tpm_error("TPM2_NV_Write"));
        if written.is_err() {
            break;
        }
    }
    if let Err(e) = written {
        // Do not leave a half-written index behind.
        let undefined = c
            .context
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.nv_undefine_space(Provision::Owner, object)
            });
        if undefined.is_err() {
            let mut handle = ObjectHandle::from(object);
            let _ = c.context.tr_close(&mut handle);
        }
        return Err(e);
    }
    let mut handle = ObjectHandle::from(object);
    let _ = c.context.tr_close(&mut handle);
    Ok(())
}

fn list(c: &mut Connection, layout: &Layout) -> Result<Vec<KeyInfo>, KeyError> {
    let mut keys = Vec::new();
    for handle in handles_in(&mut c.context, layout.first, layout.last)? {
        let handle = TpmHandle(handle);
        let public = match c.read_public_of(handle) {
            Ok(public) => public,
            // Evicted between GetCapability and ReadPublic.
            Err(KeyError::NotFound(_)) => continue,
            Err(e) => return Err(e),
        };
        match public_key_of(&public) {
            Ok(public_key) => keys.push(KeyInfo {
                reference: KeyRef::Tpm(handle),
                // The TPM has no labels.
                label: String::new(),
                public_key,
            }),
            Err(e) => {
                tracing::warn!(key = %handle, error = %e, "skipping a TPM object of an unsupported type")
            }
        }
    }
    Ok(keys)
}

struct DeviceIdentity {
    manufacturer: String,
    vendor: String,
    firmware: (u32, u32),
    software: bool,
}

impl DeviceIdentity {
    fn describe(&self) -> String {
        let (fw1, fw2) = self.firmware;
        format!(
            "TPM 2.0 manufacturer {} vendor \"{}\" firmware {}.{}.{}.{}{}",
            if self.manufacturer.is_empty() {
                "?"
            } else {
                &self.manufacturer
            },
            self.vendor,
            fw1 >> 16,
            fw1 & 0xffff,
            fw2 >> 16,
            fw2 & 0xffff,
            if self.software { " (software TPM)" } else { "" }
        )
    }
}

fn device_identity(c: &mut Connection) -> Result<DeviceIdentity, KeyError> {
    let mut property = |tag| {
        c.context
            .get_tpm_property(tag)
            .map(|value| value.unwrap_or(0))
            .map_err(tpm_error("TPM2_GetCapability"))
    };
    let manufacturer = ascii(property(PropertyTag::Manufacturer)?);
    let mut vendor = String::new();
    for tag in [
        PropertyTag::VendorString1,
        PropertyTag::VendorString2,
        PropertyTag::VendorString3,
        PropertyTag::VendorString4,
    ] {
        vendor.push_str(&ascii_raw(property(tag)?));
    }
    let vendor = vendor.split_whitespace().collect::<Vec<_>>().join(" ");
    let firmware = (
        property(PropertyTag::FirmwareVersion1)?,
        property(PropertyTag::FirmwareVersion2)?,
    );
    let lower = vendor.to_ascii_lowercase();
    // swtpm/libtpms report manufacturer "IBM" and vendor "SW TPM".
    let software = manufacturer == "IBM"
        || vendor.split(' ').any(|word| word == "SW")
        || lower.contains("swtpm")
        || lower.contains("libtpms");
    Ok(DeviceIdentity {
        manufacturer,
        vendor,
        firmware,
        software,
    })
}

// ----------------------------------------------------------------------------------------
// Templates and encodings

/// ECC P-256 storage primary: the TCG SRK template (TCG TPM v2.0 Provisioning Guidance,
/// 7.5.1): restricted decrypt, AES-128-CFB, fixedTPM/fixedParent/sensitiveDataOrigin,
/// userWithAuth, noDA.
fn storage_primary_template() -> tss_esapi::Result<Public> {
    let object_attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()?;
    Ok(Public::Ecc {
        object_attributes,
        name_hashing_algorithm: HashingAlgorithm::Sha256,
        auth_policy: Digest::default(),
        parameters: PublicEccParameters::new(
            SymmetricDefinitionObject::AES_128_CFB,
            EccScheme::Null,
            EccCurve::NistP256,
            KeyDerivationFunctionScheme::Null,
        ),
        unique: EccPoint::default(),
    })
}

/// Unrestricted signing key: fixedTPM, fixedParent, sensitiveDataOrigin, userWithAuth,
/// sign; scheme NULL so that each TPM2_Sign picks ECDSA / RSASSA / RSAPSS and the hash.
/// (The tss-esapi parameter builders refuse a NULL scheme on a signing key, hence the plain
/// constructors.)
fn signing_key_template(algorithm: KeyAlgorithm) -> tss_esapi::Result<Public> {
    let object_attributes = signing_key_attributes()?;
    Ok(match algorithm {
        KeyAlgorithm::EcP256 | KeyAlgorithm::EcP384 => Public::Ecc {
            object_attributes,
            name_hashing_algorithm: HashingAlgorithm::Sha256,
            auth_policy: Digest::default(),
            parameters: PublicEccParameters::new(
                SymmetricDefinitionObject::Null,
                EccScheme::Null,
                if algorithm == KeyAlgorithm::EcP256 {
                    EccCurve::NistP256
                } else {
                    EccCurve::NistP384
                },
                KeyDerivationFunctionScheme::Null,
            ),
            unique: EccPoint::default(),
        },
        KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 => Public::Rsa {
            object_attributes,
            name_hashing_algorithm: HashingAlgorithm::Sha256,
            auth_policy: Digest::default(),
            parameters: PublicRsaParameters::new(
                SymmetricDefinitionObject::Null,
                RsaScheme::Null,
                if algorithm == KeyAlgorithm::Rsa2048 {
                    RsaKeyBits::Rsa2048
                } else {
                    RsaKeyBits::Rsa3072
                },
                RsaExponent::default(),
            ),
            unique: PublicKeyRsa::default(),
        },
    })
}

/// Which template a new key gets.
#[derive(Clone, Copy, Debug)]
enum Template {
    /// [`signing_key_template`]: every key of the key layer.
    Signing,
    /// [`attestation_key_template`].
    Attestation,
    /// A signing key with these TPMA_OBJECT bits (tests).
    Custom(u32),
}

impl Template {
    fn public(self, algorithm: KeyAlgorithm) -> tss_esapi::Result<Public> {
        match self {
            Template::Signing => signing_key_template(algorithm),
            Template::Attestation => attestation_key_template(algorithm),
            Template::Custom(bits) => {
                let mut public = signing_key_template(algorithm)?;
                let attributes = ObjectAttributes::from(bits);
                match &mut public {
                    Public::Rsa {
                        object_attributes, ..
                    }
                    | Public::Ecc {
                        object_attributes, ..
                    } => *object_attributes = attributes,
                    _ => {}
                }
                Ok(public)
            }
        }
    }
}

/// Attestation key (TCG EK Credential Profile / tpm2_createak shape): restricted signing,
/// fixedTPM, fixedParent, sensitiveDataOrigin, userWithAuth, with its scheme fixed (a
/// restricted signing key must name one): ECDSA-SHA256 on P-256, RSASSA-SHA256 on RSA-2048.
fn attestation_key_template(algorithm: KeyAlgorithm) -> tss_esapi::Result<Public> {
    let object_attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_restricted(true)
        .with_sign_encrypt(true)
        .build()?;
    let hash_scheme = HashScheme::new(HashingAlgorithm::Sha256);
    Ok(if algorithm.is_rsa() {
        Public::Rsa {
            object_attributes,
            name_hashing_algorithm: HashingAlgorithm::Sha256,
            auth_policy: Digest::default(),
            parameters: PublicRsaParameters::new(
                SymmetricDefinitionObject::Null,
                RsaScheme::RsaSsa(hash_scheme),
                RsaKeyBits::Rsa2048,
                RsaExponent::default(),
            ),
            unique: PublicKeyRsa::default(),
        }
    } else {
        Public::Ecc {
            object_attributes,
            name_hashing_algorithm: HashingAlgorithm::Sha256,
            auth_policy: Digest::default(),
            parameters: PublicEccParameters::new(
                SymmetricDefinitionObject::Null,
                EccScheme::EcDsa(hash_scheme),
                EccCurve::NistP256,
                KeyDerivationFunctionScheme::Null,
            ),
            unique: EccPoint::default(),
        }
    })
}

fn signing_key_attributes() -> tss_esapi::Result<ObjectAttributes> {
    ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_sign_encrypt(true)
        .build()
}

fn key_algorithm(public: &Public) -> Result<KeyAlgorithm, KeyError> {
    match public {
        Public::Ecc { parameters, .. } => match parameters.ecc_curve() {
            EccCurve::NistP256 => Ok(KeyAlgorithm::EcP256),
            EccCurve::NistP384 => Ok(KeyAlgorithm::EcP384),
            other => Err(KeyError::Unsupported(format!("ECC curve {other:?}"))),
        },
        Public::Rsa { parameters, .. } => match parameters.key_bits() {
            RsaKeyBits::Rsa2048 => Ok(KeyAlgorithm::Rsa2048),
            RsaKeyBits::Rsa3072 => Ok(KeyAlgorithm::Rsa3072),
            other => Err(KeyError::Unsupported(format!("RSA key size {other:?}"))),
        },
        _ => Err(KeyError::Unsupported(
            "a TPM object that is neither ECC nor RSA".to_string(),
        )),
    }
}

/// SubjectPublicKeyInfo DER from TPMT_PUBLIC: id-ecPublicKey with the curve OID and the
/// uncompressed point (RFC 5480), or rsaEncryption with NULL parameters (RFC 3279 2.3.1).
fn public_key_of(public: &Public) -> Result<PublicKey, KeyError> {
    let algorithm = key_algorithm(public)?;
    let encoding = |e: spki::Error| KeyError::Encoding(format!("{algorithm} public key: {e}"));
    let spki_der = match public {
        Public::Ecc { unique, .. } => {
            let size = field_size(algorithm);
            let mut point = Vec::with_capacity(1 + 2 * size);
            point.push(0x04);
            point.extend_from_slice(&pad_left(unique.x().value(), size)?);
            point.extend_from_slice(&pad_left(unique.y().value(), size)?);
            let bad_point = |e| KeyError::Encoding(format!("{algorithm} point from the TPM: {e}"));
            if algorithm == KeyAlgorithm::EcP256 {
                p256::PublicKey::from_sec1_bytes(&point)
                    .map_err(bad_point)?
                    .to_public_key_der()
                    .map_err(encoding)?
            } else {
                p384::PublicKey::from_sec1_bytes(&point)
                    .map_err(bad_point)?
                    .to_public_key_der()
                    .map_err(encoding)?
            }
        }
        Public::Rsa {
            parameters, unique, ..
        } => {
            let modulus = unique.value();
            // TPM 2.0 Part 2, 12.2.3.5: an exponent of zero means 2^16 + 1.
            let exponent = match parameters.exponent().value() {
                0 => 65_537,
                e => e,
            };
            let bits = u32::try_from(modulus.len() * 8)
                .map_err(|_| KeyError::Encoding("RSA modulus too large".to_string()))?;
            let n = rsa::BoxedUint::from_be_slice(modulus, bits)
                .map_err(|e| KeyError::Encoding(format!("RSA modulus: {e:?}")))?;
            let e = rsa::BoxedUint::from_be_slice(&exponent.to_be_bytes(), 32)
                .map_err(|e| KeyError::Encoding(format!("RSA exponent: {e:?}")))?;
            rsa::PublicKey::new(n, e)
                .map_err(|e| KeyError::Encoding(format!("RSA public key from the TPM: {e}")))?
                .to_public_key_der()
                .map_err(encoding)?
        }
        _ => return Err(KeyError::Unsupported("TPM object type".to_string())),
    };
    Ok(PublicKey {
        algorithm,
        spki_der: spki_der.as_bytes().to_vec(),
    })
}

fn field_size(algorithm: KeyAlgorithm) -> usize {
    match algorithm {
        KeyAlgorithm::EcP384 => 48,
        _ => 32,
    }
}

fn pad_left(bytes: &[u8], size: usize) -> Result<Vec<u8>, KeyError> {
    // The TPM may drop leading zero octets; it never sends more than the field size.
    let start = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
    let bytes = &bytes[start..];
    if bytes.len() > size {
        return Err(KeyError::Encoding(format!(
            "{}-byte value from the TPM exceeds the {size}-byte field",
            bytes.len()
        )));
    }
    let mut out = vec![0; size - bytes.len()];
    out.extend_from_slice(bytes);
    Ok(out)
}

/// A NULL hashcheck ticket (TPM_ST_HASHCHECK, TPM_RH_NULL, empty digest): enough for
/// TPM2_Sign with an unrestricted key (TPM 2.0 Part 3, 20.2.1).
fn null_ticket() -> tss_esapi::Result<HashcheckTicket> {
    HashcheckTicket::try_from(TPMT_TK_HASHCHECK {
        tag: tpm2::TPM2_ST_HASHCHECK,
        hierarchy: tpm2::TPM2_RH_NULL,
        digest: Default::default(),
    })
}

fn persistent(handle: u32) -> Result<Persistent, KeyError> {
    PersistentTpmHandle::new(handle)
        .map(Persistent::Persistent)
        .map_err(tpm_error("TPM2_EvictControl"))
}

/// Handles present in the TPM between `first` and `last` (one handle type: the top octet of
/// `first`), by TPM2_GetCapability(TPM_CAP_HANDLES), without a session.
fn handles_in(context: &mut Context, first: u32, last: u32) -> Result<Vec<u32>, KeyError> {
    let mut found = Vec::new();
    let mut next = first;
    loop {
        let (data, more) = context
            .execute_without_session(|c| c.get_capability(CapabilityType::Handles, next, 64))
            .map_err(tpm_error("TPM2_GetCapability"))?;
        let CapabilityData::Handles(list) = data else {
            return Err(KeyError::TpmOther(
                "TPM2_GetCapability(handles) answered with another capability".to_string(),
            ));
        };
        let mut highest = None;
        for handle in list.iter() {
            let value = u32::from(*handle);
            highest = Some(value);
            if value > last {
                return Ok(found);
            }
            if value >= first {
                found.push(value);
            }
        }
        match highest {
            Some(value) if more && value < last => next = value + 1,
            _ => return Ok(found),
        }
    }
}

/// Run `f`, then flush the transient `object` whatever happened (TPM object slots are
/// scarce; a leaked slot stays taken until the TPM restarts).
fn with_transient<T>(
    context: &mut Context,
    object: ObjectHandle,
    f: impl FnOnce(&mut Context) -> Result<T, KeyError>,
) -> Result<T, KeyError> {
    let result = f(context);
    let flushed = context
        .flush_context(object)
        .map_err(tpm_error("TPM2_FlushContext"));
    match (result, flushed) {
        (Ok(value), Ok(())) => Ok(value),
        (Ok(_), Err(e)) => Err(e),
        (Err(e), flush) => {
            if let Err(flush_error) = flush {
                tracing::warn!(error = %flush_error, "flushing a transient TPM object failed");
            }
            Err(e)
        }
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

/// Parse the TCTI string. tss-esapi 7.7's `TctiNameConf` only carries `host=` and `port=`
/// for the swtpm and mssim TCTIs: anything else (notably `path=`, a Unix socket) would be
/// dropped silently and the agent would talk to whatever listens on localhost:2321. Refuse
/// such strings instead.
fn parse_tcti(text: &str) -> Result<TctiNameConf, KeyError> {
    let (name, conf) = text.split_once(':').unwrap_or((text, ""));
    let refuse = |why: String| KeyError::InvalidArgument(format!("TCTI '{text}': {why}"));
    match name {
        "swtpm" | "mssim" => {
            for pair in conf.split(',').filter(|p| !p.is_empty()) {
                let key = pair.split_once('=').map_or(pair, |(k, _)| k);
                if key != "host" && key != "port" {
                    return Err(refuse(format!(
                        "'{key}=' is not supported by tss-esapi 7.7 for the {name} TCTI (only \
                         host= and port=; a Unix socket path= would be silently ignored): run \
                         swtpm with --server type=tcp and use {name}:host=127.0.0.1,port=P"
                    )));
                }
            }
        }
        "device" | "tabrmd" => {}
        _ => {
            return Err(refuse(
                "expected device:PATH, swtpm:host=H,port=P, mssim:host=H,port=P or tabrmd"
                    .to_string(),
            ))
        }
    }
    TctiNameConf::from_str(text).map_err(|e| refuse(e.to_string()))
}

fn tpm_error(command: &'static str) -> impl Fn(tss_esapi::Error) -> KeyError {
    move |source| KeyError::Tpm { command, source }
}

/// TPM_RC_HANDLE (a handle that is not loaded / not defined) becomes `NotFound`.
fn not_found_or(handle: TpmHandle, error: tss_esapi::Error, command: &'static str) -> KeyError {
    match response_code(&error) {
        Some(rc) if rc >> 16 == 0 && rc & 0x80 != 0 && rc & 0x3f == 0x0b => {
            KeyError::NotFound(handle.to_string())
        }
        _ => KeyError::Tpm {
            command,
            source: error,
        },
    }
}

/// TSS2 layer of TCTI errors (TSS 2.0 TPM Command Transmission Interface spec, 3.1): the
/// connection to the TPM failed, not the TPM.
const TCTI_LAYER: u32 = 10;

fn is_connection_error(error: &KeyError) -> bool {
    match error {
        KeyError::Tpm { source, .. } => {
            matches!(response_code(source), Some(rc) if rc >> 16 == TCTI_LAYER)
        }
        _ => false,
    }
}

/// The raw TSS2_RC of an error. tss-esapi 7.7 keeps it private; its Display is the only way
/// out ("Response code value: 0x...").
fn response_code(error: &tss_esapi::Error) -> Option<u32> {
    use tss_esapi::constants::response_code::Tss2ResponseCode;
    let tss_esapi::Error::Tss2Error(code) = error else {
        return None;
    };
    let text = match code {
        Tss2ResponseCode::Success => return Some(0),
        Tss2ResponseCode::FormatZero(rc) => rc.to_string(),
        Tss2ResponseCode::FormatOne(rc) => rc.to_string(),
    };
    let hex = text.rsplit("0x").next()?;
    u32::from_str_radix(hex.trim(), 16).ok()
}

/// An error for a log line or an `Unavailable` reason, with the raw TSS2_RC: tss-esapi
/// renders TCTI-layer codes as "response code not recognized".
fn explain(error: &KeyError) -> String {
    match error {
        KeyError::Tpm { command, source } => match response_code(source) {
            Some(rc) if rc >> 16 == TCTI_LAYER => format!(
                "{command}: TCTI error 0x{rc:08x} (connection to the TPM failed or was lost)"
            ),
            Some(rc) => format!("{error} (TSS2_RC 0x{rc:08x})"),
            None => error.to_string(),
        },
        other => other.to_string(),
    }
}

fn ascii(value: u32) -> String {
    ascii_raw(value).trim().to_string()
}

fn ascii_raw(value: u32) -> String {
    value
        .to_be_bytes()
        .iter()
        .map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                b as char
            } else {
                ' '
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcti_strings() {
        assert!(parse_tcti("device:/dev/tpmrm0").is_ok());
        assert!(parse_tcti("swtpm:host=127.0.0.1,port=2321").is_ok());
        assert!(parse_tcti("tabrmd").is_ok());
        let err = parse_tcti("swtpm:path=/run/swtpm.sock").unwrap_err();
        assert!(err.to_string().contains("path="), "{err}");
        assert!(parse_tcti("libtpms").is_err());
    }

    #[test]
    fn response_codes_come_out_raw() {
        let rc = tss_esapi::Error::Tss2Error(0x000a_000a.into());
        assert_eq!(response_code(&rc), Some(0x000a_000a));
        assert!(is_connection_error(&KeyError::Tpm {
            command: "TPM2_Sign",
            source: rc
        }));
        let handle = tss_esapi::Error::Tss2Error(0x18b.into());
        assert_eq!(response_code(&handle), Some(0x18b));
        assert!(matches!(
            not_found_or(TpmHandle(0x8100_0100), handle, "TPM2_Sign"),
            KeyError::NotFound(_)
        ));
    }

    #[test]
    fn manufacturer_ascii() {
        assert_eq!(ascii(0x4942_4d00), "IBM");
        assert_eq!(ascii_raw(0x5357_2020), "SW  ");
    }

    #[test]
    fn store_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<TpmKeyStore>();
    }
}
