//! VNFM-side helpers: `register`, `csr` (a CMF consumer over mTLS) and `vnf-csr` (a TPM-attested CSR).

use super::*;
#[derive(Args)]
pub(super) struct VnfCsrArgs {
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
pub(super) struct ClientArgs {
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
pub(super) struct RegisterArgs {
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
pub(super) struct CsrArgs {
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

/// Run one request against a CMF as a consumer.
pub(super) fn cmf_request(
    client: &ClientArgs,
    path: &'static str,
    body: serde_json::Value,
) -> Result<serde_json::Value, Failure> {
    // SOL 013 9.2: every request names the API version it is written for.
    let https = nfv_warden::client::HttpsClient::new(
        &client.server,
        &client.cacert,
        Some((&client.cert, &client.key)),
    )?
    .with_default_header("Version", nfv_warden::api::cmf::API_VERSION);
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

pub(super) fn register(args: RegisterArgs) -> Result<ExitCode, Failure> {
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

pub(super) fn csr(args: CsrArgs) -> Result<ExitCode, Failure> {
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

pub(super) fn vnf_csr(args: VnfCsrArgs) -> Result<ExitCode, Failure> {
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
