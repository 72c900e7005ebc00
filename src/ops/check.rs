//! `warden check`: one line per check of the store, devices, keys, certificates, CMF and SM.
//!
//! [`offline`] opens the store and the devices itself (no agent running, e.g. systemd's
//! `ExecStartPre`). [`running`] is what the running agent does on request through its admin
//! socket, with the store and devices it holds open; both end in the same checks of keys and
//! certificates.

use std::path::Path;
use std::sync::Arc;

use der::Encode;
use serde::{Deserialize, Serialize};

use crate::cmf::Cmf;
use crate::config::{Config, InterfaceKeyConfig, SecretSource};
use crate::keys::backends::Backends;
use crate::keys::{KeyRef, KeyStore};
use crate::pki;
use crate::store::Store;

/// One check: `ok` or not, and what was checked (with the reason when it failed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckLine {
    pub ok: bool,
    pub what: String,
    /// A failed authentication (a PIN or secret refused, missing or unreadable): a restart
    /// cannot cure it and a retry may lock the device, so `warden check` exits 77 for it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub authentication: bool,
}

/// What the running agent answers to a check request.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentCheck {
    /// The agent's process id.
    pub pid: u32,
    pub lines: Vec<CheckLine>,
}

/// Check with the store and devices opened here (no agent running).
pub fn offline(config: &Config) -> Vec<CheckLine> {
    let mut checks = Checks::default();
    // Never create a store here: a missing or empty one is reported (`warden store init`).
    let store = match Store::open_existing(&config.store.path) {
        Ok(store) => {
            let store = Arc::new(store);
            checks.store(config, &store).then_some(store)
        }
        Err(e) => {
            checks.line(false, crate::error::chain(&e));
            None
        }
    };
    for (what, secret) in config.sm_secrets() {
        match secret.read() {
            Ok(_) => checks.line(true, format!("{what} ({secret}) readable")),
            Err(e) => checks.authentication_failure(format!("{what}: {e}")),
        }
    }
    let mut backends = Backends::default();
    for p in config.pkcs11_backends() {
        match p.pin.read() {
            Ok(_) => checks.line(true, format!("PIN ({}) readable", p.pin)),
            Err(e) => {
                checks.authentication_failure(format!("PIN: {e}"));
                continue;
            }
        }
        match crate::keys::pkcs11::Pkcs11KeyStore::open(p) {
            Ok(s) => {
                checks.line(true, format!("{}, logged in", s.device()));
                backends.pkcs11 = Some(Arc::new(s));
            }
            Err(e) => checks.key_failure(format!("pkcs11 token {}", p.token()), &e),
        }
    }
    for t in config.tpm_backends() {
        if let Some(Err(e)) = t.owner_auth.as_ref().map(SecretSource::read) {
            checks.authentication_failure(format!("TPM owner auth: {e}"));
            continue;
        }
        match crate::keys::tpm::TpmKeyStore::open(t) {
            Ok(s) => {
                checks.line(
                    true,
                    format!("TPM {} ({}){}", t.tcti, s.device(), software(&s)),
                );
                backends.tpm = Some(Arc::new(s));
            }
            Err(e) => checks.key_failure(format!("TPM {}", t.tcti), &e),
        }
    }
    checks.keys_and_certificates(config, &backends);
    if let (Some(_), Some(store)) = (&config.cmf, store) {
        match Cmf::new(config, &backends, store) {
            Ok(cmf) => checks.cmf(config, &cmf),
            Err(e) => checks.line(false, format!("CMF: {e}")),
        }
    }
    checks.sm(config, &backends);
    checks.lines
}

/// Check inside the running agent, with its own open store, devices and CMF.
pub fn running(
    config: &Config,
    backends: &Backends,
    store: &Arc<Store>,
    cmf: Option<&Cmf>,
) -> Vec<CheckLine> {
    let mut checks = Checks::default();
    checks.store(config, store);
    if let Some(p) = &backends.pkcs11 {
        checks.line(
            true,
            format!("{}, logged in (held by the agent)", p.device()),
        );
    }
    if let Some(t) = &backends.tpm {
        checks.line(
            true,
            format!("TPM {} (held by the agent){}", t.device(), software(t)),
        );
    }
    checks.keys_and_certificates(config, backends);
    if let Some(cmf) = cmf {
        checks.cmf(config, cmf);
    }
    checks.sm(config, backends);
    checks.lines
}

/// Client-certificate roots of the HTTPS server: the CMF's consumers and the NFVO's
/// notification client (TLS_CERT).
pub fn client_roots(config: &Config) -> Vec<&Path> {
    let mut roots: Vec<&Path> = Vec::new();
    if let Some(cmf) = &config.cmf {
        roots.push(&cmf.client_ca);
    }
    if let Some(ca) = config
        .sm
        .as_ref()
        .and_then(|s| s.notifications.client_ca.as_ref())
    {
        roots.push(ca);
    }
    roots
}

/// The SM's Sc-Or interface keys (mTLS), with a display name each.
pub fn sm_interfaces(config: &Config) -> Vec<(&'static str, InterfaceKeyConfig)> {
    let Some(sm) = &config.sm else {
        return Vec::new();
    };
    let i = &sm.nfvo.interface;
    [
        ("SM ns_lcm key", &i.ns_lcm),
        ("SM status_info key", &i.status_info),
        ("SM sec_enforce key", &i.sec_enforce),
        ("SM security_vnf_mgmt key", &i.security_vnf_mgmt),
    ]
    .into_iter()
    .filter_map(|(name, entry)| entry.clone().map(|e| (name, e)))
    .collect()
}

fn software(tpm: &crate::keys::tpm::TpmKeyStore) -> &'static str {
    if tpm.is_software_tpm() {
        " — SOFTWARE TPM, not for production keys"
    } else {
        ""
    }
}

#[derive(Default)]
struct Checks {
    lines: Vec<CheckLine>,
}

impl Checks {
    fn line(&mut self, ok: bool, what: String) {
        self.lines.push(CheckLine {
            ok,
            what,
            authentication: false,
        });
    }

    /// A device that could not be opened; an authentication failure when it is one.
    fn key_failure(&mut self, what: String, error: &crate::keys::KeyError) {
        self.lines.push(CheckLine {
            ok: false,
            what: format!("{what}: {error}"),
            authentication: error.is_authentication(),
        });
    }

    /// A failed check that is an authentication failure (see [`CheckLine::authentication`]).
    fn authentication_failure(&mut self, what: String) {
        self.lines.push(CheckLine {
            ok: false,
            what,
            authentication: true,
        });
    }

    /// The audit chain verified from its first entry; true when it holds.
    fn store(&mut self, config: &Config, store: &Store) -> bool {
        let path = config.store.path.display();
        match store.verify_audit_chain() {
            Ok(n) => {
                self.line(
                    true,
                    format!("store {path} (audit chain of {n} entries verified)"),
                );
                true
            }
            Err(e) => {
                self.line(
                    false,
                    format!("store {path}: audit chain: {}", crate::error::chain(&e)),
                );
                false
            }
        }
    }

    /// Every configured key signs and its signature verifies; each certificate matches its
    /// key.
    fn keys_and_certificates(&mut self, config: &Config, backends: &Backends) {
        let mut keys: Vec<(&str, KeyRef)> = Vec::new();
        if let Some(ca) = &config.ca {
            keys.push(("CA key", ca.key.clone()));
        }
        if let Some(server) = &config.server {
            keys.push(("TLS key", server.tls_key.clone()));
        }
        let interfaces = sm_interfaces(config);
        for (name, entry) in &interfaces {
            keys.push((name, entry.key.clone()));
        }
        for (what, key) in keys {
            self.signs(what, &key, backends);
        }
        if let Some(ca) = &config.ca {
            match std::fs::read_to_string(&ca.certificate)
                .map_err(|e| e.to_string())
                .and_then(|p| pki::certificates_from_pem(&p))
            {
                Ok(certs) => {
                    let spki = certs[0]
                        .tbs_certificate()
                        .subject_public_key_info()
                        .to_der()
                        .unwrap_or_default();
                    let matches = backends
                        .for_key(&ca.key)
                        .and_then(|s| s.public_key(&ca.key))
                        .map(|p| p.spki_der == spki)
                        .unwrap_or(false);
                    self.line(
                        matches,
                        format!(
                            "CA certificate {}{}",
                            ca.certificate.display(),
                            if matches {
                                " matches the CA key"
                            } else {
                                ": not for the CA key"
                            }
                        ),
                    );
                }
                Err(e) => self.line(
                    false,
                    format!("CA certificate {}: {e}", ca.certificate.display()),
                ),
            }
        }
        if let Some(server) = &config.server {
            match crate::api::tls_config(server, backends, &client_roots(config)) {
                Ok(_) => self.line(
                    true,
                    format!(
                        "TLS certificate {} matches the TLS key",
                        server.tls_certificate.display()
                    ),
                ),
                Err(e) => self.line(false, crate::error::chain(&e)),
            }
        }
        for (name, entry) in &interfaces {
            let matches = std::fs::read_to_string(&entry.certificate)
                .map_err(|e| e.to_string())
                .and_then(|p| pki::certificates_from_pem(&p))
                .and_then(|certs| {
                    let spki = certs[0]
                        .tbs_certificate()
                        .subject_public_key_info()
                        .to_der()
                        .map_err(|e| e.to_string())?;
                    let key = backends
                        .for_key(&entry.key)
                        .and_then(|s| s.public_key(&entry.key))
                        .map_err(|e| e.to_string())?;
                    Ok(key.spki_der == spki)
                });
            let certificate = entry.certificate.display();
            match matches {
                Ok(true) => self.line(
                    true,
                    format!("{name} certificate {certificate} matches its key"),
                ),
                Ok(false) => self.line(
                    false,
                    format!("{name} certificate {certificate}: not for its key"),
                ),
                Err(e) => self.line(
                    false,
                    format!("{name} certificate {certificate}: {e} (run `warden sm init`)"),
                ),
            }
        }
    }

    /// `key` signs a test message and the signature verifies in software.
    fn signs(&mut self, what: &str, key: &KeyRef, backends: &Backends) {
        let result = backends.for_key(key).and_then(|store| {
            let public = store.public_key(key)?;
            let scheme = public.algorithm.default_scheme();
            let sig = store.sign(key, scheme, b"warden check")?;
            Ok((public, scheme, sig))
        });
        match result {
            Ok((public, scheme, sig)) => {
                let verified = crate::keys::signer::signature_algorithm_identifier(scheme)
                    .map_err(|e| e.to_string())
                    .and_then(|id| {
                        pki::verify_signature(&public.spki_der, &id, b"warden check", &sig)
                            .map_err(|e| e.to_string())
                    });
                match verified {
                    Ok(()) => self.line(true, format!("{what} {key} ({}) signs", public.algorithm)),
                    Err(e) => self.line(
                        false,
                        format!("{what} {key}: signature does not verify: {e}"),
                    ),
                }
            }
            Err(e) => self.line(false, format!("{what} {key}: {e}")),
        }
    }

    fn cmf(&mut self, config: &Config, cmf: &Cmf) {
        let cas: Vec<String> = cmf
            .cas()
            .iter()
            .map(|ca| format!("{} ({})", ca.id, ca.issuer.key().public_key().algorithm))
            .collect();
        self.line(
            true,
            format!(
                "CMF: CA {} with chain checked; {} consumer(s)",
                cas.join(", "),
                config.cmf.as_ref().map_or(0, |c| c.consumers.len())
            ),
        );
    }

    fn sm(&mut self, config: &Config, backends: &Backends) {
        let Some(sm) = &config.sm else {
            return;
        };
        match crate::sm::nfvo::Nfvo::new(&sm.nfvo, backends) {
            Ok(_) => self.line(
                true,
                format!(
                    "SM {} ({}): NFVO {} ({:?})",
                    sm.name, sm.mode, sm.nfvo.api_root, sm.nfvo.auth
                ),
            ),
            Err(e) => self.line(false, format!("SM NFVO client: {e}")),
        }
        match crate::sm::intake::Intake::new(sm) {
            Ok(_) => self.line(
                true,
                format!(
                    "SM notification authentication {:?} configured",
                    sm.notifications.auth
                ),
            ),
            Err(e) => self.line(false, format!("SM notifications: {e}")),
        }
    }
}
