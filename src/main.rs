//! `warden`: the nfv-warden agent and its operator commands.
//!
//! Every failure ends in one line on stderr, `warden: <what failed>: <why>`, and a non-zero
//! exit status (2 for a usage error, 1 for everything else).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod sm_cli;

use clap::{Args, Parser, Subcommand};
use der::Encode;
use nfv_warden::config::{Config, SecretSource};
use nfv_warden::keys::backends::Backends;
use nfv_warden::keys::signer::HardwareKey;
use nfv_warden::keys::{BackendKind, KeyAlgorithm, KeyRef, KeySpec, KeyStore, SignatureScheme};
use nfv_warden::store::{self, AuditEvent, ErasureEntry, KeyPurpose, KeyRecord, Store};
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
    Sm(sm_cli::SmCommand),
}

#[derive(Args)]
struct VnfCsrArgs {
    /// The VNF's TPM, e.g. swtpm:host=127.0.0.1,port=2321 or device:/dev/tpmrm0.
    #[arg(long)]
    tcti: String,
    /// Subject of the CSR (RFC 4514), e.g. CN=vnfc-1.
    #[arg(long)]
    subject: String,
    /// Qualifying data (the nonce registered as expectedQualifyingData), hex.
    #[arg(long, default_value = "")]
    nonce: String,
    #[arg(long, default_value = "ec-p256")]
    algorithm: String,
    /// Where to write the CSR (PEM).
    #[arg(long)]
    out: PathBuf,
    /// Where to write the attestation key's public key (PEM), to register as the attester.
    #[arg(long)]
    ak_out: PathBuf,
}

/// How to reach a CMF as a consumer (mutual TLS).
#[derive(Args)]
struct ClientArgs {
    /// The CMF, https://host:port.
    #[arg(long, env = "WARDEN_SERVER")]
    server: String,
    /// PEM roots for the CMF's server certificate.
    #[arg(long, env = "WARDEN_CACERT")]
    cacert: PathBuf,
    /// The consumer's client certificate (PEM).
    #[arg(long, env = "WARDEN_CLIENT_CERT")]
    cert: PathBuf,
    /// The consumer's client private key (PEM).
    #[arg(long, env = "WARDEN_CLIENT_KEY")]
    key: PathBuf,
}

#[derive(Args)]
struct RegisterArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// MANO_CERT, VNFCI_CERT or VNF_OAM_CERT.
    #[arg(long)]
    cert_type: String,
    /// A subject identifier (repeat for several).
    #[arg(long = "subject", required = true)]
    subjects: Vec<String>,
    /// DELEGATION_MODE (required for VNFCI_CERT and VNF_OAM_CERT).
    #[arg(long)]
    handling: Option<String>,
    /// The attester's public key (PEM SubjectPublicKeyInfo).
    #[arg(long, requires = "format_oid")]
    attester_key: Option<PathBuf>,
    /// The attestation statement format OID.
    #[arg(long)]
    format_oid: Option<String>,
    /// Expected qualifying data (nonce), hex.
    #[arg(long)]
    qualifying_data: Option<String>,
    #[arg(long)]
    ca_id: Option<String>,
}

#[derive(Args)]
struct CsrArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The VNFC instance the certificate is for.
    #[arg(long)]
    vnfc: Option<String>,
    /// VNFCI_CERT or VNF_OAM_CERT.
    #[arg(long, default_value = "VNFCI_CERT")]
    cert_type: String,
    /// PKCS#10 request, PEM or DER.
    #[arg(long)]
    csr: PathBuf,
    /// Also print the chain up to the root.
    #[arg(long)]
    chain: bool,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Generate a non-extractable key pair.
    Generate {
        /// pkcs11 or tpm.
        #[arg(long)]
        backend: String,
        /// CKA_LABEL on a token; for the TPM, a display name.
        #[arg(long)]
        label: String,
        /// ec-p256, ec-p384, rsa-2048 or rsa-3072.
        #[arg(long, default_value = "ec-p256")]
        algorithm: String,
        /// ca, tls, sm-assoc or vnf.
        #[arg(long, default_value = "vnf")]
        purpose: String,
        /// The VNF instance a `vnf` key is held for: the SM erases it when that VNF
        /// terminates.
        #[arg(long)]
        vnf_instance: Option<String>,
    },
    /// List the keys of every configured backend.
    List,
    /// Show one key: algorithm and public key.
    Show { key: String },
    /// Destroy a key (or TPM NV index) and verify it is gone.
    Destroy {
        key: String,
        /// Record the erasure against this VNF instance.
        #[arg(long)]
        vnf_instance: Option<String>,
    },
    /// Sign a random challenge and verify the signature in software.
    SignTest {
        key: String,
        #[arg(long)]
        scheme: Option<String>,
        #[arg(long, default_value_t = 1)]
        count: u32,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create the CA key named by `ca.key` (if absent) and a self-signed root, or a CSR for
    /// an external root (--csr-out), or import the chain an external root returned.
    Init(CaInit),
}

#[derive(Args)]
struct CaInit {
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
enum TlsCommand {
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

/// A failure, already phrased for the operator.
struct Failure(String);

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure(e.to_string())
    }
}

fn main() -> ExitCode {
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

/// Run one request against a CMF as a consumer.
fn cmf_request(
    client: &ClientArgs,
    path: &'static str,
    body: serde_json::Value,
) -> Result<serde_json::Value, Failure> {
    let https = nfv_warden::client::HttpsClient::new(
        &client.server,
        &client.cacert,
        Some((&client.cert, &client.key)),
    )?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let response = runtime.block_on(async move {
        let mut connection = https.connect().await?;
        connection.post_json(path, &body).await
    })?;
    if response.status != 201 {
        return Err(Failure(format!(
            "{} {path}: {}",
            response.status,
            response.problem_detail()
        )));
    }
    Ok(response.json()?)
}

fn register(args: RegisterArgs) -> Result<ExitCode, Failure> {
    let mut body = serde_json::json!({
        "certType": args.cert_type,
        "subjectIds": args.subjects,
    });
    if let Some(handling) = &args.handling {
        body["typeOfVnfcCertHandling"] = handling.clone().into();
    } else if args.cert_type != "MANO_CERT" {
        body["typeOfVnfcCertHandling"] = "DELEGATION_MODE".into();
    }
    if let Some(path) = &args.attester_key {
        let pem = std::fs::read_to_string(path)
            .map_err(|e| Failure(format!("{}: {e}", path.display())))?;
        let mut attestation = serde_json::json!({
            "attesterPublicKey": pem,
            "formatOid": args.format_oid.clone().unwrap_or_default(),
        });
        if let Some(q) = &args.qualifying_data {
            use base64::Engine;
            let bytes = hex::decode(q).map_err(|e| Failure(format!("--qualifying-data: {e}")))?;
            attestation["expectedQualifyingData"] = base64::engine::general_purpose::STANDARD
                .encode(bytes)
                .into();
        }
        body["keyAttestation"] = attestation;
    }
    if let Some(ca) = &args.ca_id {
        body["caId"] = ca.clone().into();
    }
    let registration = cmf_request(&args.client, "/certmgmt/v1/registrations", body)?;
    println!("{}", serde_json::to_string_pretty(&registration)?);
    Ok(ExitCode::SUCCESS)
}

fn csr(args: CsrArgs) -> Result<ExitCode, Failure> {
    let bytes =
        std::fs::read(&args.csr).map_err(|e| Failure(format!("{}: {e}", args.csr.display())))?;
    let text = match std::str::from_utf8(&bytes) {
        Ok(pem) if pem.contains("-----BEGIN") => pem.to_string(),
        _ => {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.encode(&bytes)
        }
    };
    let mut body = serde_json::json!({
        "certType": args.cert_type,
        "certChainRequest": args.chain,
        "csr": text,
    });
    if let Some(vnfc) = &args.vnfc {
        body["vnfcId"] = vnfc.clone().into();
    }
    let issued = cmf_request(
        &args.client,
        "/certmgmt/v1/certificate_signing_requests",
        body,
    )?;
    print!("{}", issued["certificate"].as_str().unwrap_or_default());
    if let Some(chain) = issued["certificateChain"].as_array() {
        for pem in chain {
            print!("{}", pem.as_str().unwrap_or_default());
        }
    }
    eprintln!(
        "serial {} (registration {}, attestation {})",
        issued["serialNumber"].as_str().unwrap_or_default(),
        issued["registrationId"].as_str().unwrap_or_default(),
        issued["attestation"].as_str().unwrap_or_default()
    );
    Ok(ExitCode::SUCCESS)
}

fn vnf_csr(args: VnfCsrArgs) -> Result<ExitCode, Failure> {
    use nfv_warden::keys::tpm::TpmKeyStore;
    use nfv_warden::keys::KeyAttestation;
    let nonce = hex::decode(&args.nonce).map_err(|e| Failure(format!("--nonce: {e}")))?;
    let algorithm: KeyAlgorithm = args.algorithm.parse()?;
    let config: nfv_warden::config::TpmConfig = toml::from_str(&format!("tcti = {:?}", args.tcti))
        .map_err(|e| Failure(format!("--tcti: {e}")))?;
    let tpm = Arc::new(TpmKeyStore::open(&config)?);
    let ak = tpm.create_attestation_key(&KeySpec {
        label: "attestation key".into(),
        algorithm: KeyAlgorithm::EcP256,
    })?;
    let key = tpm.generate(&KeySpec {
        label: args.subject.clone(),
        algorithm,
    })?;
    let bundle = nfv_warden::cmf::attest::make::tpm_certify_bundle(
        &tpm,
        &key.reference,
        &ak.reference,
        &nonce,
    )?;
    let csr = nfv_warden::cmf::attest::make::csr_with_attestation(
        tpm.clone(),
        &key.reference,
        &args.subject,
        Some(&bundle),
    )?;
    write_atomically(
        &args.out,
        pki::to_pem("CERTIFICATE REQUEST", &csr.to_der()?)?.as_bytes(),
    )?;
    write_atomically(
        &args.ak_out,
        pki::to_pem("PUBLIC KEY", &ak.public_key.spki_der)?.as_bytes(),
    )?;
    println!(
        "key {} ({algorithm}) attested by AK {}; CSR in {}, AK public key in {}",
        key.reference,
        ak.reference,
        args.out.display(),
        args.ak_out.display()
    );
    Ok(ExitCode::SUCCESS)
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
        Command::Sm(cmd) => sm_cli::run(cmd, config),
        Command::Keys(cmd) => keys(cmd, config),
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

fn keys(cmd: KeysCommand, config: &Config) -> Result<ExitCode, Failure> {
    let backends = open_backends(config)?;
    match cmd {
        KeysCommand::Generate {
            backend,
            label,
            algorithm,
            purpose,
            vnf_instance,
        } => {
            let kind = match backend.as_str() {
                "pkcs11" => BackendKind::Pkcs11,
                "tpm" => BackendKind::Tpm,
                other => {
                    return Err(Failure(format!(
                        "--backend '{other}': expected pkcs11 or tpm"
                    )))
                }
            };
            let algorithm: KeyAlgorithm = algorithm.parse()?;
            let purpose: KeyPurpose = serde_json::from_value(serde_json::Value::String(
                purpose.clone(),
            ))
            .map_err(|_| {
                Failure(format!(
                    "--purpose '{purpose}': expected ca, tls, sm-assoc or vnf"
                ))
            })?;
            let store = open_store(config)?;
            let info = backends.by_kind(kind)?.generate(&KeySpec {
                label: label.clone(),
                algorithm,
            })?;
            if purpose != KeyPurpose::Vnf && vnf_instance.is_some() {
                return Err(Failure("--vnf-instance is only for --purpose vnf".into()));
            }
            record_key(
                &store,
                &info.reference,
                &label,
                algorithm,
                purpose,
                vnf_instance.as_deref(),
            )?;
            println!("{} {}", info.reference, algorithm);
        }
        KeysCommand::List => {
            for backend in backends.all() {
                for key in backend.list()? {
                    println!(
                        "{}\t{}\t{}",
                        key.reference, key.public_key.algorithm, key.label
                    );
                }
            }
        }
        KeysCommand::Show { key } => {
            let key: KeyRef = key.parse()?;
            let store = backends.for_key(&key)?;
            let public = store.public_key(&key)?;
            println!("reference: {key}");
            println!("algorithm: {}", public.algorithm);
            println!("device: {}", store.device());
            if let (KeyRef::Pkcs11(_), Some(p)) = (&key, &backends.pkcs11) {
                let a = p.private_key_attributes(&key)?;
                println!(
                    "attributes: extractable={} sensitive={} never_extractable={} always_sensitive={}",
                    a.extractable, a.sensitive, a.never_extractable, a.always_sensitive
                );
            }
            if let (KeyRef::Tpm(_), Some(t)) = (&key, &backends.tpm) {
                println!("attributes: 0x{:08x}", t.object_attributes(&key)?);
            }
            print!("{}", pki::to_pem("PUBLIC KEY", &public.spki_der)?);
        }
        KeysCommand::Destroy { key, vnf_instance } => {
            let key: KeyRef = key.parse()?;
            let store = open_store(config)?;
            let record = backends.for_key(&key)?.destroy(&key)?;
            let entry = ErasureEntry::from_record(record.clone(), vnf_instance);
            let id = format!("{}-{}", record.erased_at, key);
            store.write(|tx| {
                tx.put(&store::ERASURES, &id, &entry)?;
                tx.delete(&store::KEYS, &key.to_string())?;
                tx.audit(
                    AuditEvent::new(actor(), "key.erase", key.to_string())
                        .with_detail(serde_json::to_value(&entry).unwrap_or_default()),
                );
                Ok(())
            })?;
            println!("{}", serde_json::to_string_pretty(&record)?);
            if !record.verified {
                return Err(Failure(format!("{key}: still present after destroy")));
            }
        }
        KeysCommand::SignTest { key, scheme, count } => {
            let key: KeyRef = key.parse()?;
            let store = backends.for_key(&key)?;
            let public = store.public_key(&key)?;
            let scheme = match scheme {
                Some(s) => s.parse::<SignatureScheme>()?,
                None => public.algorithm.default_scheme(),
            };
            let mut challenge = [0u8; 32];
            getrandom::fill(&mut challenge)?;
            let start = Instant::now();
            let mut signature = Vec::new();
            for _ in 0..count.max(1) {
                signature = store.sign(&key, scheme, &challenge)?;
            }
            let elapsed = start.elapsed();
            let algorithm_id = nfv_warden::keys::signer::signature_algorithm_identifier(scheme)?;
            pki::verify_signature(&public.spki_der, &algorithm_id, &challenge, &signature)
                .map_err(|e| Failure(format!("{key}: {scheme} signature does not verify: {e}")))?;
            println!(
                "ok {key} {scheme}: {} signature(s) verified, {:.0} signs/s",
                count.max(1),
                f64::from(count.max(1)) / elapsed.as_secs_f64()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn ca_init(args: CaInit, config: &Config) -> Result<ExitCode, Failure> {
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
    audit(
        &store,
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

fn tls_init(
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
    audit(
        &store,
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
fn sm_interfaces(config: &Config) -> Vec<(&'static str, nfv_warden::config::InterfaceKeyConfig)> {
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

/// The SM admin socket: configured, or `warden.sock` next to the store.
fn admin_socket(config: &Config) -> PathBuf {
    config
        .sm
        .as_ref()
        .and_then(|s| s.admin_socket.clone())
        .unwrap_or_else(|| config.store.path.with_file_name("warden.sock"))
}

fn serve(config: &Config) -> Result<ExitCode, Failure> {
    let server = config
        .server
        .clone()
        .ok_or_else(|| Failure("config: no [server] section".into()))?;
    let backends = open_backends(config)?;
    let store = open_store(config)?;
    let tls = nfv_warden::api::tls_config(&server, &backends, &client_roots(config))?;
    let cmf = match &config.cmf {
        Some(_) => Some(Arc::new(
            nfv_warden::cmf::Cmf::new(config, &backends, store.clone()).map_err(Failure)?,
        )),
        None => None,
    };
    // Blocking threads run the CSR pipeline and key-layer calls: CPU and device work that
    // more threads than a few per core do not speed up, and each idle thread keeps its own
    // malloc arena (RSS). Callers beyond this queue.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(16)
        .build()
        .map_err(|e| Failure(format!("tokio runtime: {e}")))?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(server.listen)
            .await
            .map_err(|e| Failure(format!("listen on {}: {e}", server.listen)))?;
        let addr = listener.local_addr()?;
        tracing::info!(%addr, tls_key = %server.tls_key, "serving HTTPS");
        let sm = match &config.sm {
            Some(_) => Some(
                nfv_warden::sm::Sm::new(config, &backends, store.clone(), addr).map_err(Failure)?,
            ),
            None => None,
        };
        let (stop_admin, admin_stopped) = tokio::sync::watch::channel(false);
        if let Some(sm) = &sm {
            let socket = admin_socket(config);
            let sm_admin = sm.clone();
            tokio::spawn(async move {
                if let Err(e) =
                    nfv_warden::api::admin::serve(&socket, sm_admin, admin_stopped).await
                {
                    tracing::error!(error = %e, socket = %socket.display(), "admin socket");
                }
            });
        }
        // Type=notify: systemd starts dependants only once we listen.
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        println!("listening on https://{addr}");
        let app = nfv_warden::api::router(nfv_warden::api::AppState {
            backends,
            store,
            cmf,
            sm: sm.clone(),
        });
        // The callback endpoint is served from here on: subscribe only now (IFA 033 6.2).
        if let Some(sm) = &sm {
            sm.start();
        }
        nfv_warden::api::serve(
            listener,
            tls,
            app,
            Duration::from_secs(server.drain_seconds),
            async {
                nfv_warden::api::termination_signal().await;
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
                let _ = stop_admin.send(true);
            },
        )
        .await;
        Ok::<(), Failure>(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `warden check`: every check prints `ok` or `FAIL` with its subject; exit 1 if any failed.
fn check(path: &Path) -> Result<ExitCode, Failure> {
    let mut failed = false;
    let mut line = |ok: bool, what: String| {
        println!("{} {what}", if ok { "ok  " } else { "FAIL" });
        failed |= !ok;
    };
    let config = match Config::load(path) {
        Ok(c) => {
            line(true, format!("config {}", path.display()));
            c
        }
        Err(e) => {
            line(false, format!("config {e}"));
            return Ok(ExitCode::FAILURE);
        }
    };
    let mut opened_store = None;
    match Store::open(&config.store.path) {
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
                format!("store {}: audit chain: {e}", config.store.path.display()),
            ),
        },
        Err(e) => line(false, format!("store {}: {e}", config.store.path.display())),
    }
    let mut backends = Backends::default();
    for p in config.pkcs11_backends() {
        match p.pin.read() {
            Ok(_) => line(true, format!("PIN ({}) readable", p.pin)),
            Err(e) => {
                line(false, format!("PIN: {e}"));
                continue;
            }
        }
        match nfv_warden::keys::pkcs11::Pkcs11KeyStore::open(p) {
            Ok(s) => {
                line(true, format!("{}, logged in", s.device()));
                backends.pkcs11 = Some(Arc::new(s));
            }
            Err(e) => line(false, format!("pkcs11 token {}: {e}", p.token())),
        }
    }
    for t in config.tpm_backends() {
        if let Some(Err(e)) = t.owner_auth.as_ref().map(SecretSource::read) {
            line(false, format!("TPM owner auth: {e}"));
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
            Err(e) => line(false, format!("TPM {}: {e}", t.tcti)),
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
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
