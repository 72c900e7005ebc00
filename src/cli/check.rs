//! `warden check`: one line per check of configuration, secrets, devices, keys and store.

use super::*;
/// `warden check`: every check prints `ok` or `FAIL` with its subject. The exit status is
/// that of the gravest failure: 77 if a PIN or secret was refused or missing, 78 if the
/// configuration is wrong, else 1 if any check failed (see the module notes of `cli`).
pub(super) fn check(path: &Path) -> Result<ExitCode, Failure> {
    let mut failed: Option<FailureKind> = None;
    let mut line = |ok: bool, what: String| {
        println!("{} {what}", if ok { "ok  " } else { "FAIL" });
        if !ok {
            failed = failed.max(Some(FailureKind::Other));
        }
    };
    let config = match Config::load(path) {
        Ok(c) => {
            line(true, format!("config {}", path.display()));
            c
        }
        Err(e) => {
            line(false, format!("config {e}"));
            return Ok(FailureKind::Config.exit_code());
        }
    };
    // Failures that a restart cannot cure or would make worse, by their kind.
    let mut grave: Option<FailureKind> = None;
    let mut opened_store = None;
    match Store::open_existing(&config.store.path) {
        Ok(store) => match store.verify_audit_chain() {
            Ok(n) => {
                line(
                    true,
                    format!(
                        "store {} (audit chain of {n} entries verified)",
                        config.store.path.display()
                    ),
                );
                opened_store = Some(Arc::new(store));
            }
            Err(e) => line(
                false,
                format!(
                    "store {}: audit chain: {}",
                    config.store.path.display(),
                    nfv_warden::error::chain(&e)
                ),
            ),
        },
        Err(e) => line(false, nfv_warden::error::chain(&e)),
    }
    for (what, secret) in sm_secrets(&config) {
        match secret.read() {
            Ok(_) => line(true, format!("{what} ({secret}) readable")),
            Err(e) => {
                line(false, format!("{what}: {e}"));
                grave = grave.max(Some(FailureKind::Authentication));
            }
        }
    }
    let mut backends = Backends::default();
    for p in config.pkcs11_backends() {
        match p.pin.read() {
            Ok(_) => line(true, format!("PIN ({}) readable", p.pin)),
            Err(e) => {
                line(false, format!("PIN: {e}"));
                grave = grave.max(Some(FailureKind::Authentication));
                continue;
            }
        }
        match nfv_warden::keys::pkcs11::Pkcs11KeyStore::open(p) {
            Ok(s) => {
                line(true, format!("{}, logged in", s.device()));
                backends.pkcs11 = Some(Arc::new(s));
            }
            Err(e) => {
                line(false, format!("pkcs11 token {}: {e}", p.token()));
                grave = grave.max(Some(FailureKind::of_key_error(&e)));
            }
        }
    }
    for t in config.tpm_backends() {
        if let Some(Err(e)) = t.owner_auth.as_ref().map(SecretSource::read) {
            line(false, format!("TPM owner auth: {e}"));
            grave = grave.max(Some(FailureKind::Authentication));
            continue;
        }
        match nfv_warden::keys::tpm::TpmKeyStore::open(t) {
            Ok(s) => {
                let software = if s.is_software_tpm() {
                    " — SOFTWARE TPM, not for production keys"
                } else {
                    ""
                };
                line(true, format!("TPM {} ({}){software}", t.tcti, s.device()));
                backends.tpm = Some(Arc::new(s));
            }
            Err(e) => {
                line(false, format!("TPM {}: {e}", t.tcti));
                grave = grave.max(Some(FailureKind::of_key_error(&e)));
            }
        }
    }
    let mut keys: Vec<(&str, KeyRef)> = Vec::new();
    if let Some(ca) = &config.ca {
        keys.push(("CA key", ca.key.clone()));
    }
    if let Some(server) = &config.server {
        keys.push(("TLS key", server.tls_key.clone()));
    }
    let interfaces = sm_interfaces(&config);
    for (name, entry) in &interfaces {
        keys.push((name, entry.key.clone()));
    }
    for (what, key) in keys {
        let result = backends.for_key(&key).and_then(|store| {
            let public = store.public_key(&key)?;
            let scheme = public.algorithm.default_scheme();
            let sig = store.sign(&key, scheme, b"warden check")?;
            Ok((public, scheme, sig))
        });
        match result {
            Ok((public, scheme, sig)) => {
                let verified = nfv_warden::keys::signer::signature_algorithm_identifier(scheme)
                    .map_err(|e| e.to_string())
                    .and_then(|id| {
                        pki::verify_signature(&public.spki_der, &id, b"warden check", &sig)
                            .map_err(|e| e.to_string())
                    });
                match verified {
                    Ok(()) => line(true, format!("{what} {key} ({}) signs", public.algorithm)),
                    Err(e) => line(
                        false,
                        format!("{what} {key}: signature does not verify: {e}"),
                    ),
                }
            }
            Err(e) => line(false, format!("{what} {key}: {e}")),
        }
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
                line(
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
            Err(e) => line(
                false,
                format!("CA certificate {}: {e}", ca.certificate.display()),
            ),
        }
    }
    if let Some(server) = &config.server {
        match nfv_warden::api::tls_config(server, &backends, &client_roots(&config)) {
            Ok(_) => line(
                true,
                format!(
                    "TLS certificate {} matches the TLS key",
                    server.tls_certificate.display()
                ),
            ),
            Err(e) => line(false, e.to_string()),
        }
    }
    if let (Some(_), Some(store)) = (&config.cmf, opened_store) {
        match nfv_warden::cmf::Cmf::new(&config, &backends, store) {
            Ok(cmf) => {
                let cas: Vec<String> = cmf
                    .cas()
                    .iter()
                    .map(|ca| format!("{} ({})", ca.id, ca.issuer.key().public_key().algorithm))
                    .collect();
                line(
                    true,
                    format!(
                        "CMF: CA {} with chain checked; {} consumer(s)",
                        cas.join(", "),
                        config.cmf.as_ref().map_or(0, |c| c.consumers.len())
                    ),
                );
            }
            Err(e) => line(false, format!("CMF: {e}")),
        }
    }
    if let Some(sm) = &config.sm {
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
            match matches {
                Ok(true) => line(
                    true,
                    format!(
                        "{name} certificate {} matches its key",
                        entry.certificate.display()
                    ),
                ),
                Ok(false) => line(
                    false,
                    format!(
                        "{name} certificate {}: not for its key",
                        entry.certificate.display()
                    ),
                ),
                Err(e) => line(
                    false,
                    format!(
                        "{name} certificate {}: {e} (run `warden sm init`)",
                        entry.certificate.display()
                    ),
                ),
            }
        }
        match nfv_warden::sm::nfvo::Nfvo::new(&sm.nfvo, &backends) {
            Ok(_) => line(
                true,
                format!(
                    "SM {} ({}): NFVO {} ({:?})",
                    sm.name, sm.mode, sm.nfvo.api_root, sm.nfvo.auth
                ),
            ),
            Err(e) => line(false, format!("SM NFVO client: {e}")),
        }
        match nfv_warden::sm::intake::Intake::new(sm) {
            Ok(_) => line(
                true,
                format!(
                    "SM notification authentication {:?} configured",
                    sm.notifications.auth
                ),
            ),
            Err(e) => line(false, format!("SM notifications: {e}")),
        }
    }
    Ok(match grave.max(failed) {
        Some(kind) => kind.exit_code(),
        None => ExitCode::SUCCESS,
    })
}
