//! One ESAPI connection to the TPM, and what a TPM command needs around it: reconnection
//! inside a command, transient-handle hygiene, handle enumeration, TCTI parsing and the
//! classification of TSS errors.
//!
//! Everything here runs on an owner thread (see `owner.rs`); a [`Connection`] never leaves
//! the thread that made it (the ESAPI context is neither `Send` nor `Sync`).

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tss_esapi::constants::{tss as tpm2, CapabilityType};
use tss_esapi::handles::{
    KeyHandle, NvIndexTpmHandle, ObjectHandle, PersistentTpmHandle, TpmHandle as EsysTpmHandle,
    TransientTpmHandle,
};
use tss_esapi::structures::{Auth, CapabilityData, Public};
use tss_esapi::{Context, TctiNameConf};

use super::keys::key_algorithm;
use crate::keys::{KeyAlgorithm, KeyError, TpmHandle};

/// Handles this agent uses.
#[derive(Clone, Copy, Debug)]
pub(super) struct Layout {
    pub primary: u32,
    pub first: u32,
    pub last: u32,
}

impl Layout {
    pub fn contains(&self, handle: u32) -> bool {
        (self.first..=self.last).contains(&handle)
    }
}

/// How to reach the TPM; shared by every owner thread the store starts.
pub(super) struct Target {
    pub tcti: TctiNameConf,
    pub tcti_text: String,
    pub owner_auth: Option<Auth>,
    pub layout: Layout,
    /// Connection attempts inside one command (a stale connection after a TPM restart is
    /// replaced at once and the command retried).
    pub attempts: u32,
}

impl Target {
    /// How errors and metrics name this TPM: "TPM" and the TCTI it is reached through (the
    /// operator's configuration names it the same way), e.g. "TPM device:/dev/tpmrm0".
    pub fn device(&self) -> String {
        format!("TPM {}", self.tcti_text)
    }

    /// The swtpm and mssim TCTIs talk to a TPM without a resource manager, which serves one
    /// connection at a time and shows every connection the same transient objects. Device
    /// and tabrmd connections go through a resource manager that virtualizes transients per
    /// connection.
    pub fn shares_transients(&self) -> bool {
        self.tcti_text.starts_with("swtpm") || self.tcti_text.starts_with("mssim")
    }
}

/// State of one owner thread: how to reach the TPM, and its live connection if any.
pub(super) struct Worker {
    pub target: Arc<Target>,
    /// Set by the supervisor when this thread's connection is abandoned: from then on no
    /// command is sent on it (see [`Connection::tpm`]).
    pub abandoned: Arc<AtomicBool>,
    pub connection: Option<Connection>,
    /// Why the last connection was lost, for the `Unavailable` reason while reconnecting.
    pub lost: Option<String>,
}

const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(1);

impl Worker {
    pub fn new(target: Arc<Target>, abandoned: Arc<AtomicBool>) -> Worker {
        Worker {
            target,
            abandoned,
            connection: None,
            lost: None,
        }
    }

    /// Run `command` on a live connection, reconnecting after connection (TCTI) errors as
    /// long as attempts and the command's `deadline` allow; `operation` names what failed
    /// when the TPM stays unreachable. TPM response codes are returned at once.
    pub fn run<T>(
        &mut self,
        operation: &'static str,
        deadline: Instant,
        mut command: impl FnMut(&mut Connection, &Layout) -> Result<T, KeyError>,
    ) -> Result<T, KeyError> {
        let mut delay = RETRY_FIRST;
        let mut reason = String::new();
        for attempt in 0..self.target.attempts.max(1) {
            if attempt > 0 {
                if Instant::now() + delay >= deadline {
                    break;
                }
                std::thread::sleep(delay);
                delay = (delay * 2).min(RETRY_MAX);
            }
            if self.connection.is_none() {
                if let Err(e) = self.connect() {
                    tracing::warn!(tcti = %self.target.tcti_text, attempt, error = %explain(&e), "TPM connect failed");
                    reason = format!(
                        "cannot connect to TPM '{}': {}",
                        self.target.tcti_text,
                        explain(&e)
                    );
                    continue;
                }
            }
            let Some(connection) = self.connection.as_mut() else {
                continue;
            };
            match command(connection, &self.target.layout) {
                Err(e) if is_connection_error(&e) => {
                    tracing::warn!(tcti = %self.target.tcti_text, attempt, error = %explain(&e), "TPM connection lost; reconnecting");
                    reason = explain(&e);
                    self.connection = None;
                }
                other => return other,
            }
        }
        self.lost = Some(reason.clone());
        Err(KeyError::unavailable(
            self.target.device(),
            operation,
            reason,
        ))
    }

    /// Open a new ESAPI context and flush the transient objects an earlier connection may
    /// have left behind (swtpm has 3 slots and no resource manager; a connection abandoned
    /// in the middle of a key generation can leave its loaded key there).
    pub fn connect(&mut self) -> Result<(), KeyError> {
        self.connection = None;
        let mut context =
            Context::new(self.target.tcti.clone()).map_err(tpm_error("Esys_Initialize"))?;
        if let Some(auth) = &self.target.owner_auth {
            context
                .tr_set_auth(ObjectHandle::Owner, auth.clone())
                .map_err(tpm_error("Esys_TR_SetAuth"))?;
        }
        let mut connection = Connection {
            context,
            device: self.target.device(),
            abandoned: self.abandoned.clone(),
            algorithms: HashMap::new(),
        };
        let flushed = connection.flush_transients()?;
        if flushed > 0 {
            tracing::warn!(
                tcti = %self.target.tcti_text,
                flushed,
                "flushed transient TPM objects left by an earlier connection"
            );
        }
        self.connection = Some(connection);
        self.lost = None;
        Ok(())
    }

    /// Release the connection when the thread ends, abandoned or not: finalizing the context
    /// closes its socket (the mssim TCTI keeps one open for the context's life; a TPM
    /// without a resource manager serves one connection at a time, so a socket left open
    /// would hold its only slot) and frees its memory, and it sends the TPM nothing,
    /// because no transient object is left for tss-esapi to flush: [`Connection::with_transient`]
    /// flushes every one, or on an abandoned connection closes its ESYS object instead. An
    /// abandoned context used to be leaked (`mem::forget`) for fear of that flush.
    pub fn close(mut self) {
        drop(self.connection.take());
    }
}

/// An ESAPI context. Dropped as a whole when the TPM connection is lost.
///
/// No ESYS handle outlives the command that opened it: every command resolves the persistent
/// objects it uses (Esys_TR_FromTPMPublic, one TPM2_ReadPublic) and closes them before it
/// returns ([`Connection::with_object`]). A per-connection cache of ESYS handles (and of the
/// key algorithm per handle) was tried and removed: a persistent handle is a slot, not a key,
/// so the cached entry stays right only while nobody else evicts and re-fills that slot
/// (another process behind a resource manager, `warden keys` on the direct path, tpm2-tools),
/// and ESYS itself keeps its own object per TPM handle: libtss2-esys 3.2 leaves the object of
/// a key evicted with TPM2_EvictControl in the context, and its Esys_TR_FromTPMPublic hands
/// out an existing object for the same TPM handle, so a key regenerated at that handle failed
/// with 0x00070001 "Name mismatch between two calls of Esys_TR_FromTPMPublic" until the next
/// reconnection (tests/tpm.rs `regenerated_keys_at_the_same_handle_sign_as_themselves`).
pub(super) struct Connection {
    context: Context,
    /// [`Target::device`], for the errors of this connection.
    device: String,
    abandoned: Arc<AtomicBool>,
    /// Key algorithm by object Name. The Name is the hash of the public area (TPM 2.0 Part 1,
    /// 16), which fixes the algorithm, so an entry can never describe another key: this is
    /// a pure function cached, not a view of the TPM that can go stale. Saves a second
    /// TPM2_ReadPublic per signature.
    algorithms: HashMap<Vec<u8>, KeyAlgorithm>,
}

/// Bound on [`Connection::algorithms`] (the key range holds at most 256 keys; keys come and
/// go, so the map is emptied when it reaches this size rather than grown forever).
const ALGORITHMS_MAX: usize = 1024;

impl Connection {
    /// The ESAPI context, unless this connection was abandoned after a deadline: a late
    /// thread must not send more commands to a TPM that a newer connection now drives.
    pub fn tpm(&mut self) -> Result<&mut Context, KeyError> {
        if self.abandoned.load(Ordering::Acquire) {
            return Err(KeyError::unavailable(
                self.device.clone(),
                "TPM command",
                "the connection was abandoned after its deadline".to_string(),
            ));
        }
        Ok(&mut self.context)
    }

    /// Run `f` with an ESYS handle for the persistent object or NV index at `handle`, opened
    /// for this call only (`NotFound` when the TPM has nothing there) and closed afterwards,
    /// whatever `f` did to the object.
    pub fn with_object<T>(
        &mut self,
        handle: TpmHandle,
        f: impl FnOnce(&mut Connection, ObjectHandle) -> Result<T, KeyError>,
    ) -> Result<T, KeyError> {
        let object = self.open(handle)?;
        let result = f(self, object);
        self.close(object);
        result
    }

    /// An ESYS handle for the persistent object or NV index at `handle` (Esys_TR_FromTPMPublic,
    /// one TPM2_ReadPublic); `NotFound` when the TPM has nothing there. The caller closes it
    /// ([`Connection::with_object`] does).
    pub fn open(&mut self, handle: TpmHandle) -> Result<ObjectHandle, KeyError> {
        let tpm_handle = if handle.is_nv_index() {
            EsysTpmHandle::NvIndex(
                NvIndexTpmHandle::new(handle.0).map_err(tpm_error("Esys_TR_FromTPMPublic"))?,
            )
        } else {
            EsysTpmHandle::Persistent(
                PersistentTpmHandle::new(handle.0).map_err(tpm_error("Esys_TR_FromTPMPublic"))?,
            )
        };
        self.tpm()?
            .execute_without_session(|c| c.tr_from_tpm_public(tpm_handle))
            .map_err(|e| not_found_or(handle, e, "Esys_TR_FromTPMPublic"))
    }

    /// Drop the ESYS object `object` from the context (Esys_TR_Close: ESYS memory only, no
    /// TPM command, so also allowed on an abandoned connection). After a successful
    /// TPM2_EvictControl of a persistent key tss-esapi already counts the handle as closed
    /// while libtss2-esys 3.2 still holds the object: the close removes it from ESYS, and
    /// tss-esapi's complaint about a handle it no longer tracks is expected. (A successful
    /// TPM2_NV_UndefineSpace is different: ESYS closes the NV object itself.)
    pub fn close(&mut self, object: ObjectHandle) {
        let mut object = object;
        let _ = self.context.tr_close(&mut object);
    }

    /// The public area of the object behind `object` (TPM2_ReadPublic, no session).
    pub fn read_public(
        &mut self,
        handle: TpmHandle,
        object: ObjectHandle,
    ) -> Result<Public, KeyError> {
        self.tpm()?
            .execute_without_session(|c| c.read_public(KeyHandle::from(object)))
            .map(|(public, _, _)| public)
            .map_err(|e| not_found_or(handle, e, "TPM2_ReadPublic"))
    }

    /// The public area of the persistent object at `handle`.
    pub fn read_public_of(&mut self, handle: TpmHandle) -> Result<Public, KeyError> {
        self.with_object(handle, |c, object| c.read_public(handle, object))
    }

    /// The algorithm of the key behind `object`, by its Name (see [`Connection::algorithms`]).
    pub fn algorithm_of(
        &mut self,
        handle: TpmHandle,
        object: ObjectHandle,
    ) -> Result<KeyAlgorithm, KeyError> {
        let name = self
            .context
            .tr_get_name(object)
            .map_err(tpm_error("Esys_TR_GetName"))?;
        let name = name.value().to_vec();
        if let Some(algorithm) = self.algorithms.get(&name) {
            return Ok(*algorithm);
        }
        let algorithm = key_algorithm(&self.read_public(handle, object)?)?;
        if self.algorithms.len() >= ALGORITHMS_MAX {
            self.algorithms.clear();
        }
        self.algorithms.insert(name, algorithm);
        Ok(algorithm)
    }

    /// Handles present in the TPM between `first` and `last` (one handle type).
    pub fn handles_in(&mut self, first: u32, last: u32) -> Result<Vec<u32>, KeyError> {
        handles_in(self.tpm()?, first, last)
    }

    /// Run `f`, then flush the transient `object` whatever happened (TPM object slots are
    /// scarce; a leaked slot stays taken until the TPM restarts or the next connection
    /// flushes it).
    pub fn with_transient<T>(
        &mut self,
        object: ObjectHandle,
        f: impl FnOnce(&mut Context) -> Result<T, KeyError>,
    ) -> Result<T, KeyError> {
        let result = self.tpm().and_then(f);
        // An abandoned connection leaves the flush to its successor, which flushes every
        // transient it finds when it connects (see `tpm`); it only drops its ESYS object, so
        // that finalizing this context later sends no TPM2_FlushContext (on a TPM without a
        // resource manager that handle number may by then name the successor's object).
        // tss-esapi complains about closing a handle it meant to flush: expected.
        let flushed = match self.tpm() {
            Ok(c) => c
                .flush_context(object)
                .map_err(tpm_error("TPM2_FlushContext")),
            Err(e) => {
                self.close(object);
                Err(e)
            }
        };
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

    /// Flush every transient object loaded in the TPM (TPM2_GetCapability(handles,
    /// 0x80000000) then TPM2_FlushContext each); how many there were. Behind a resource
    /// manager the TPM shows this connection's own transients only, so this is a no-op there.
    pub fn flush_transients(&mut self) -> Result<usize, KeyError> {
        let stale = self.handles_in(tpm2::TPM2_TRANSIENT_FIRST, TRANSIENT_LAST)?;
        for handle in &stale {
            let tpm_handle = EsysTpmHandle::Transient(
                TransientTpmHandle::new(*handle).map_err(tpm_error("Esys_TR_FromTPMPublic"))?,
            );
            let context = self.tpm()?;
            let object = context
                .execute_without_session(|c| c.tr_from_tpm_public(tpm_handle))
                .map_err(tpm_error("Esys_TR_FromTPMPublic"))?;
            context
                .flush_context(object)
                .map_err(tpm_error("TPM2_FlushContext"))?;
        }
        Ok(stale.len())
    }
}

/// The last transient object handle (TPM 2.0 Part 2, 7.2: type 0x80).
pub(super) const TRANSIENT_LAST: u32 = 0x80ff_ffff;

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

/// Parse the TCTI string. tss-esapi 7.7's `TctiNameConf` only carries `host=` and `port=`
/// for the swtpm and mssim TCTIs: anything else (notably `path=`, a Unix socket) would be
/// dropped silently and the agent would talk to whatever listens on localhost:2321. Refuse
/// such strings instead.
pub(super) fn parse_tcti(text: &str) -> Result<TctiNameConf, KeyError> {
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

pub(super) fn tpm_error(command: &'static str) -> impl Fn(tss_esapi::Error) -> KeyError {
    move |source| KeyError::Tpm { command, source }
}

/// TPM_RC_HANDLE (a handle that is not loaded / not defined) becomes `NotFound`.
pub(super) fn not_found_or(
    handle: TpmHandle,
    error: tss_esapi::Error,
    command: &'static str,
) -> KeyError {
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

pub(super) fn is_connection_error(error: &KeyError) -> bool {
    match error {
        KeyError::Tpm { source, .. } => {
            matches!(response_code(source), Some(rc) if rc >> 16 == TCTI_LAYER)
        }
        _ => false,
    }
}

/// The raw TSS2_RC of an error. tss-esapi 7.7 keeps it private; its Display is the only way
/// out ("Response code value: 0x...").
pub(super) fn response_code(error: &tss_esapi::Error) -> Option<u32> {
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
pub(super) fn explain(error: &KeyError) -> String {
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
}
