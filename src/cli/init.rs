//! `warden ca init` and `warden tls init`: the CA and the agent's own TLS identity.

use super::*;
use nfv_warden::cmf::CertType;

#[derive(Subcommand)]
pub(super) enum CaCommand {
    /// Create the CA key named by `ca.key` (if absent) and a self-signed root, or a CSR for
    /// an external root (--csr-out), or import the chain an external root returned.
    Init(CaInit),
}

#[derive(Args)]
pub(super) struct CaInit {
    /// Subject of the CA certificate (RFC 4514).
    #[arg(long, default_value = "CN=nfv-warden CA,O=nfv-warden")]
    subject: String,
    #[arg(long, default_value = "ec-p256")]
    algorithm: String,
    /// Validity of a self-signed root, in days.
    #[arg(long, default_value_t = 3650)]
    days: u32,
    /// Write a CSR for an external root here instead of self-signing.
    #[arg(long, conflicts_with = "import_chain")]
    csr_out: Option<PathBuf>,
    /// PEM: the CA certificate issued by the external root, then the chain up to the root.
    #[arg(long)]
    import_chain: Option<PathBuf>,
}

#[derive(Subcommand)]
pub(super) enum TlsCommand {
    /// Create the TLS key named by `server.tls_key` (if absent) and issue its certificate
    /// from the CA.
    Init {
        /// Subject alternative names: DNS names or IP addresses.
        #[arg(long = "san", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        sans: Vec<String>,
        #[arg(long, default_value = "ec-p256")]
        algorithm: String,
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

pub(super) fn ca_init(args: CaInit, config: &Config) -> Result<ExitCode, Failure> {
    let ca = config
        .ca
        .as_ref()
        .ok_or_else(|| Failure("config: no [ca] section (ca.key, ca.certificate)".into()))?;
    let backends = open_backends(config)?;
    let store = open_store(config)?;
    let algorithm: KeyAlgorithm = args.algorithm.parse()?;
    if let Some(chain_path) = &args.import_chain {
        let key = HardwareKey::new(backends.for_key(&ca.key)?, ca.key.clone())?;
        let pem = std::fs::read_to_string(chain_path)
            .map_err(|e| Failure(format!("{}: {e}", chain_path.display())))?;
        let chain = pki::certificates_from_pem(&pem)
            .map_err(|e| Failure(format!("{}: {e}", chain_path.display())))?;
        ca::check_chain(&key, &chain)?;
        write_atomically(&ca.certificate, pki::certificate_pem(&chain[0])?.as_bytes())?;
        let rest: String = chain[1..]
            .iter()
            .map(pki::certificate_pem)
            .collect::<Result<Vec<_>, _>>()?
            .concat();
        let chain_file = ca.chain.as_ref().ok_or_else(|| {
            Failure("config: ca.chain must name where the imported chain goes".into())
        })?;
        write_atomically(chain_file, rest.as_bytes())?;
        audit(
            &store,
            "ca.import-chain",
            &ca.key.to_string(),
            serde_json::json!({
                "certificates": chain.len(),
            }),
        )?;
        println!(
            "imported: CA certificate and {} chain certificate(s)",
            chain.len() - 1
        );
        return Ok(ExitCode::SUCCESS);
    }
    if ca.certificate.exists() && args.csr_out.is_none() {
        return Err(Failure(format!(
            "{} exists already: the CA is initialized (remove it to make a new root)",
            ca.certificate.display()
        )));
    }
    let (info, created) = backends.ensure(&ca.key, algorithm)?;
    if created {
        record_key(
            &store,
            &ca.key,
            &ca.key.to_string(),
            info.public_key.algorithm,
            KeyPurpose::Ca,
            None,
        )?;
    }
    let key = HardwareKey::new(backends.for_key(&ca.key)?, ca.key.clone())?;
    if let Some(out) = &args.csr_out {
        let csr = ca::ca_csr(&key, &args.subject)?;
        write_atomically(
            out,
            pki::to_pem("CERTIFICATE REQUEST", &csr.to_der()?)?.as_bytes(),
        )?;
        println!("CSR for {} written to {}", ca.key, out.display());
        return Ok(ExitCode::SUCCESS);
    }
    let root = ca::self_signed_root(&key, &args.subject, args.days)?;
    write_atomically(&ca.certificate, pki::certificate_pem(&root)?.as_bytes())?;
    // In the issuance table like every certificate the CA key signs (issue 10 §4), with the
    // audit entry in the same transaction.
    record_agent_certificate(
        &store,
        config,
        &root,
        CertType::AgentCa,
        vec![args.subject.clone()],
        "ca.init",
        &ca.key.to_string(),
        serde_json::json!({
            "subject": args.subject,
            "serial": hex::encode(root.tbs_certificate().serial_number().as_bytes()),
        }),
    )?;
    println!(
        "CA {} ({}) self-signed root written to {}",
        ca.key,
        key.public_key().algorithm,
        ca.certificate.display()
    );
    Ok(ExitCode::SUCCESS)
}

pub(super) fn tls_init(
    sans: &[String],
    algorithm: &str,
    days: u32,
    config: &Config,
) -> Result<ExitCode, Failure> {
    let server = config
        .server
        .as_ref()
        .ok_or_else(|| Failure("config: no [server] section".into()))?;
    let ca = config.ca.as_ref().ok_or_else(|| {
        Failure("config: no [ca] section: the TLS certificate is issued by the CA".into())
    })?;
    let backends = open_backends(config)?;
    let store = open_store(config)?;
    let algorithm: KeyAlgorithm = algorithm.parse()?;
    let (info, created) = backends.ensure(&server.tls_key, algorithm)?;
    if created {
        record_key(
            &store,
            &server.tls_key,
            &server.tls_key.to_string(),
            info.public_key.algorithm,
            KeyPurpose::Tls,
            None,
        )?;
    }
    let ca_key = HardwareKey::new(backends.for_key(&ca.key)?, ca.key.clone())?;
    let ca_pem = std::fs::read_to_string(&ca.certificate).map_err(|e| {
        Failure(format!(
            "{}: {e} (run `warden ca init` first)",
            ca.certificate.display()
        ))
    })?;
    let ca_cert = pki::certificates_from_pem(&ca_pem)?.remove(0);
    let subject = format!(
        "CN={}",
        sans.first().map(String::as_str).unwrap_or("warden")
    );
    let leaf = ca::issue(
        &ca_key,
        &ca_cert,
        &subject,
        &info.public_key.spki_der,
        ca::Profile::Leaf(ca::LeafProfile::tls_server(sans)?),
        days,
    )?;
    let mut chain = pki::certificate_pem(&leaf)?;
    chain.push_str(&ca_pem);
    if let Some(chain_file) = &ca.chain {
        if let Ok(rest) = std::fs::read_to_string(chain_file) {
            chain.push_str(&rest);
        }
    }
    write_atomically(&server.tls_certificate, chain.as_bytes())?;
    record_agent_certificate(
        &store,
        config,
        &leaf,
        CertType::AgentTls,
        sans.to_vec(),
        "tls.issue",
        &server.tls_key.to_string(),
        serde_json::json!({
            "sans": sans,
            "serial": hex::encode(leaf.tbs_certificate().serial_number().as_bytes()),
        }),
    )?;
    println!(
        "TLS certificate for {} ({}) written to {}",
        server.tls_key,
        sans.join(", "),
        server.tls_certificate.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Record a certificate the agent made for itself in the CMF's issuance table, audited as
/// `action` in the same transaction (`cmf::records::record_agent_certificate`); `warden sm
/// init` records its interface certificates through it too.
#[allow(clippy::too_many_arguments)]
pub(super) fn record_agent_certificate(
    store: &Store,
    config: &Config,
    certificate: &x509_cert::Certificate,
    cert_type: CertType,
    subjects: Vec<String>,
    action: &str,
    audit_subject: &str,
    detail: serde_json::Value,
) -> Result<(), Failure> {
    nfv_warden::cmf::records::record_agent_certificate(
        store,
        config,
        certificate,
        cert_type,
        subjects,
        &actor(),
        action,
        audit_subject,
        detail,
    )
    .map_err(|e| Failure::chain(&e))?;
    Ok(())
}
