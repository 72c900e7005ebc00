//! `warden`: the nfv-warden agent and its operator commands.
//!
//! Every failure ends in one line on stderr, `warden: <what failed>: <why>`, and a non-zero
//! exit status that tells a service manager whether starting again can help (sysexits(3)
//! values, as `RestartPreventExitStatus=` in `systemd/warden.service` expects):
//!
//! - 2: usage (clap);
//! - 77 (`EX_NOPERM`): authentication: the token PIN was rejected or a secret is missing.
//!   Retrying would count against the HSM's PIN retry limit or the TPM's dictionary-attack
//!   lockout, so systemd must not restart;
//! - 78 (`EX_CONFIG`): the configuration is wrong (unreadable, invalid, a required section
//!   missing, a certificate file that does not fit). Starting again cannot help;
//! - 1: everything else (a device not there yet, an address in use...), which a restart
//!   may cure.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

mod agent;
mod audit;
mod certs;
mod check;
mod cmf;
mod init;
mod keys;
mod registrations;
mod serve;
mod sm;
// Not `store`: that name is the library's store module here (`store::KEYS`).
#[path = "store.rs"]
mod store_command;
mod vim;
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
    /// The durable store (`warden store init` creates it; nothing else does).
    #[command(subcommand)]
    Store(store_command::StoreCommand),
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
    /// The CMF: registrations of every consumer (list, transfer, delete) and direct mode's
    /// VNF inventory (`vnfs`, `vnfc`).
    #[command(subcommand)]
    Cmf(cmf::CmfCommand),
}

/// A failure, already phrased for the operator, and what kind of failure it is (which picks
/// the exit status).
struct Failure {
    message: String,
    kind: FailureKind,
}

/// What kind of failure ended a command: decides the exit status (see the module notes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum FailureKind {
    Other,
    Config,
    Authentication,
}

impl FailureKind {
    /// The process exit status (sysexits(3): EX_CONFIG 78, EX_NOPERM 77).
    fn exit_code(self) -> ExitCode {
        match self {
            FailureKind::Other => ExitCode::FAILURE,
            FailureKind::Config => ExitCode::from(78),
            FailureKind::Authentication => ExitCode::from(77),
        }
    }

    /// A key-layer error that retrying would make worse (a rejected PIN counts against the
    /// token's retry limit; a failed TPM authorization against its dictionary-attack
    /// counter) or that no retry can fix (an unreadable secret).
    fn of_key_error(error: &nfv_warden::keys::KeyError) -> FailureKind {
        if error.is_authentication() {
            FailureKind::Authentication
        } else {
            FailureKind::Other
        }
    }
}

/// A failure of kind "other". A function of the type's name (types and functions live in
/// different namespaces) so that every command's `Failure(format!(...))` reads as before.
#[allow(non_snake_case)]
fn Failure(message: String) -> Failure {
    Failure {
        message,
        kind: FailureKind::Other,
    }
}

impl Failure {
    fn config(message: String) -> Failure {
        Failure {
            message,
            kind: FailureKind::Config,
        }
    }

    /// A key-layer failure, classified (authentication failures get their own exit status).
    fn key(context: &str, error: &nfv_warden::keys::KeyError) -> Failure {
        Failure {
            message: format!("{context}: {error}"),
            kind: FailureKind::of_key_error(error),
        }
    }

    /// A failure of the HTTPS server's setup: a certificate or TLS setting that does not fit
    /// is a configuration error; the key's is classified as a key-layer error.
    fn serve(error: nfv_warden::api::ServeError) -> Failure {
        use nfv_warden::api::ServeError;
        match &error {
            ServeError::Certificate { .. } | ServeError::Tls(_) => {
                Failure::config(error.to_string())
            }
            ServeError::Key(key) => Failure {
                message: error.to_string(),
                kind: FailureKind::of_key_error(key),
            },
            _ => Failure(error.to_string()),
        }
    }
}

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure(e.to_string())
    }
}

impl Failure {
    /// `e` with its whole `source()` chain on one line (STYLE.md: the CLI prints the cause,
    /// not only the outermost message). `?` goes through `Display` only, since many helpers
    /// return `String` errors; use this for typed errors that carry a source.
    fn chain(e: &dyn std::error::Error) -> Failure {
        Failure(nfv_warden::error::chain(e))
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
        Err(Failure { message, kind }) => {
            eprintln!("warden: {}", message.replace('\n', " "));
            kind.exit_code()
        }
    }
}

fn load(path: &Path) -> Result<Config, Failure> {
    Config::load(path).map_err(|e| Failure::config(format!("config {e}")))
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
        Command::Cmf(cmd) => cmf::run(cmd, config),
        Command::Ca(CaCommand::Init(args)) => ca_init(args, config),
        Command::Store(cmd) => store_command::run(cmd, config),
        Command::Tls(TlsCommand::Init {
            sans,
            algorithm,
            days,
        }) => tls_init(&sans, &algorithm, days, config),
    }
}

/// Opens the existing store; never creates one (`warden store init` does, see store.rs).
fn open_store(config: &Config) -> Result<Arc<Store>, Failure> {
    Store::open_existing(&config.store.path)
        .map(Arc::new)
        .map_err(|e| Failure::chain(&e))
}

/// Read every secret the agent needs before any device is touched: one that is missing,
/// unreadable or empty is an authentication failure (exit 77), named, and no restart can
/// make it appear.
fn read_secrets(config: &Config) -> Result<(), Failure> {
    let mut secrets: Vec<(String, &nfv_warden::config::SecretSource)> = Vec::new();
    for p in config.pkcs11_backends() {
        secrets.push((format!("PIN of pkcs11 token {}", p.token()), &p.pin));
    }
    for t in config.tpm_backends() {
        if let Some(auth) = &t.owner_auth {
            secrets.push(("TPM owner auth".to_string(), auth));
        }
    }
    secrets.extend(config.sm_secrets());
    for (what, secret) in secrets {
        secret.read().map_err(|e| Failure {
            message: format!("{what}: {e}"),
            kind: FailureKind::Authentication,
        })?;
    }
    Ok(())
}

fn open_backends(config: &Config) -> Result<Backends, Failure> {
    if config.backends.is_empty() {
        return Err(Failure::config(
            "config: no [[backend]] is configured".into(),
        ));
    }
    Backends::open(config).map_err(|e| Failure::key("key backend", &e))
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
    })
    .map_err(|e| Failure::chain(&e))?;
    Ok(())
}

fn audit(
    store: &Store,
    action: &str,
    subject: &str,
    detail: serde_json::Value,
) -> Result<(), Failure> {
    store
        .write(|tx| {
            tx.audit(AuditEvent::new(actor(), action, subject).with_detail(detail));
            Ok(())
        })
        .map_err(|e| Failure::chain(&e))?;
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
