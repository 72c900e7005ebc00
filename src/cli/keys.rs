//! `warden keys ...`: keys in the HSM or TPM.

use super::*;
#[derive(Subcommand)]
pub(super) enum KeysCommand {
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

pub(super) fn keys(cmd: KeysCommand, config: &Config) -> Result<ExitCode, Failure> {
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
