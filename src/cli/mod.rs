//! `warden`: the nfv-warden agent and its operator commands.
//!
//! Every failure ends in one line on stderr, `warden: <what failed>: <why>`, and a non-zero
//! exit status (2 for a usage error, 1 for everything else).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

mod agent;
mod audit;
mod certs;
mod check;
mod init;
mod keys;
mod serve;
mod sm;
mod vnfm;

use check::check;
use init::{ca_init, tls_init};
use init::{CaCommand, TlsCommand};
use keys::{keys, KeysCommand};
use serve::serve;
use vnfm::{csr, register, vnf_csr, CsrArgs, RegisterArgs, VnfCsrArgs};

use clap::{Args, Parser, Subcommand};
use der::Encode;
use nfv_warden::config::Config;
use nfv_warden::keys::backends::Backends;
use nfv_warden::keys::signer::HardwareKey;
use nfv_warden::keys::{BackendKind, KeyAlgorithm, KeyRef, KeySpec, KeyStore, SignatureScheme};
use nfv_warden::store::{self, AuditEvent, KeyPurpose, KeyRecord, Store};
use nfv_warden::{ca, pki};

#[derive(Parser)]
#[command(
    name = "warden",
    version,
    about = "ETSI NFV-IFA 033 Security Manager and Certificate Management Function"
)]
struct Cli {
    /// Configuration file.
    #[arg(
        short,
        long,
        env = "WARDEN_CONFIG",
        default_value = "/etc/warden/warden.toml",
        global = true
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check the configuration, secrets, token, TPM, store and keys: one line per check.
    Check,
    /// Run the agent: HTTPS with its HSM/TPM-backed TLS key.
    Serve,
    /// Keys in the HSM or TPM.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// The CA key and certificate.
    #[command(subcommand)]
    Ca(CaCommand),
    /// The agent's own TLS identity.
    #[command(subcommand)]
    Tls(TlsCommand),
    /// As a VNFM: register subjects with a CMF (IFA 033 11.2.2).
    Register(RegisterArgs),
    /// As a VNFM: send a CSR to a CMF (IFA 033 11.2.3); prints the certificate (and chain).
    Csr(CsrArgs),
    /// As a VNF developer: make a key in a TPM, attest it with TPM2_Certify and write a CSR
    /// signed inside the TPM carrying the attestation, plus the attester (AK) public key.
    VnfCsr(VnfCsrArgs),
    /// The Security Manager (Sc-Or): interface keys, status, subscriptions, enforcement,
    /// erasure reports, security VNFs.
    #[command(subcommand)]
    Sm(sm::SmCommand),
    /// Issued certificates: list, show, export (through the running agent when it serves).
    #[command(subcommand)]
    Certs(certs::CertsCommand),
    /// The audit hash chain: verify, list (through the running agent when it serves).
    #[command(subcommand)]
    Audit(audit::AuditCommand),
}

/// A failure, already phrased for the operator.
struct Failure(String);

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure(e.to_string())
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // tss-esapi logs expected lookups of absent handles as errors; our own errors
                // carry the TPM command that failed.
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,tss_esapi=off")),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let result = match cli.command {
        Command::Check => check(&cli.config),
        Command::Register(args) => register(args),
        Command::Csr(args) => csr(args),
        Command::VnfCsr(args) => vnf_csr(args),
        command => load(&cli.config).and_then(|config| run(command, &config)),
    };
    match result {
        Ok(code) => code,
        Err(Failure(reason)) => {
            eprintln!("warden: {}", reason.replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

fn load(path: &Path) -> Result<Config, Failure> {
    Config::load(path).map_err(|e| Failure(format!("config {e}")))
}

fn run(command: Command, config: &Config) -> Result<ExitCode, Failure> {
    match command {
        Command::Check | Command::Register(_) | Command::Csr(_) | Command::VnfCsr(_) => {
            unreachable!("handled before the config is loaded")
        }
        Command::Serve => serve(config),
        Command::Sm(cmd) => sm::run(cmd, config),
        Command::Keys(cmd) => keys(cmd, config),
        Command::Certs(cmd) => certs::run(cmd, config),
        Command::Audit(cmd) => audit::run(cmd, config),
        Command::Ca(CaCommand::Init(args)) => ca_init(args, config),
        Command::Tls(TlsCommand::Init {
            sans,
            algorithm,
            days,
        }) => tls_init(&sans, &algorithm, days, config),
    }
}

fn open_store(config: &Config) -> Result<Arc<Store>, Failure> {
    Store::open(&config.store.path)
        .map(Arc::new)
        .map_err(|e| Failure(format!("store {}: {e}", config.store.path.display())))
}

fn open_backends(config: &Config) -> Result<Backends, Failure> {
    if config.backends.is_empty() {
        return Err(Failure("config: no [[backend]] is configured".into()));
    }
    Backends::open(config).map_err(|e| Failure(format!("key backend: {e}")))
}

fn actor() -> String {
    format!(
        "cli:{}",
        std::env::var("USER").unwrap_or_else(|_| "unknown".into())
    )
}

fn record_key(
    store: &Store,
    reference: &KeyRef,
    label: &str,
    algorithm: KeyAlgorithm,
    purpose: KeyPurpose,
    vnf_instance_id: Option<&str>,
) -> Result<(), Failure> {
    let record = KeyRecord {
        reference: reference.clone(),
        backend: reference.backend(),
        label: label.to_string(),
        algorithm,
        purpose,
        created: nfv_warden::keys::rfc3339_now(),
        vnf_instance_id: vnf_instance_id.map(String::from),
    };
    store.write(|tx| {
        tx.put(&store::KEYS, &reference.to_string(), &record)?;
        tx.audit(
            AuditEvent::new(actor(), "key.generate", reference.to_string()).with_detail(
                serde_json::json!({ "algorithm": algorithm, "purpose": purpose, "label": label, "vnfInstanceId": vnf_instance_id }),
            ),
        );
        Ok(())
    })?;
    Ok(())
}

fn audit(
    store: &Store,
    action: &str,
    subject: &str,
    detail: serde_json::Value,
) -> Result<(), Failure> {
    store.write(|tx| {
        tx.audit(AuditEvent::new(actor(), action, subject).with_detail(detail));
        Ok(())
    })?;
    Ok(())
}

/// Write a file so that a crash leaves the old or the new content, never a torn one.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), Failure> {
    use std::io::Write;
    let fail = |e: std::io::Error| Failure(format!("{}: {e}", path.display()));
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(fail)?;
    }
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp).map_err(fail)?;
    file.write_all(bytes).map_err(fail)?;
    file.sync_all().map_err(fail)?;
    std::fs::rename(&tmp, path).map_err(fail)?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if let Ok(dir) = std::fs::File::open(parent) {
            let _ = dir.sync_all();
        }
    }
    Ok(())
}

/// Client-certificate roots of the HTTPS server: the CMF's consumers and the NFVO's
/// notification client (TLS_CERT).
fn client_roots(config: &Config) -> Vec<&Path> {
    nfv_warden::ops::check::client_roots(config)
}

/// The admin socket: configured, or `warden.sock` next to the store.
fn admin_socket(config: &Config) -> PathBuf {
    config.admin_socket()
}
