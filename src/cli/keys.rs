//! `warden keys ...`: keys in the HSM or TPM.

use nfv_warden::keys::ErasureRecord;
use nfv_warden::ops::keys as ops;

use super::agent::{self, ops_failure, segment};
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
    // While the agent runs it holds the devices and the store: it does the work.
    let agent = agent::running(config)?;
    match cmd {
        KeysCommand::Generate {
            backend,
            label,
            algorithm,
            purpose,
            vnf_instance,
        } => {
            let backend = match backend.as_str() {
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
            if purpose != KeyPurpose::Vnf && vnf_instance.is_some() {
                return Err(Failure("--vnf-instance is only for --purpose vnf".into()));
            }
            let request = ops::GenerateRequest {
                backend,
                label,
                algorithm,
                purpose,
                vnf_instance_id: vnf_instance,
            };
            let key: ops::KeyEntry = match &agent {
                Some(agent) => agent.post("/ops/v1/keys", serde_json::to_value(&request)?)?,
                None => ops::generate(
                    &open_backends(config)?,
                    &*open_store(config)?,
                    &request,
                    &actor(),
                )
                .map_err(ops_failure)?,
            };
            println!("{} {}", key.reference, key.algorithm);
        }
        KeysCommand::List => {
            let keys: Vec<ops::KeyEntry> = match &agent {
                Some(agent) => agent.get("/ops/v1/keys")?,
                None => {
                    let backends = open_backends(config)?;
                    // The purposes recorded in the store, if there is one; listing keys
                    // never creates a store.
                    let store = if config.store.path.exists() {
                        Some(open_store(config)?)
                    } else {
                        None
                    };
                    ops::list(&backends, store.as_deref()).map_err(ops_failure)?
                }
            };
            for key in keys {
                let purpose = match (&key.purpose, &key.vnf_instance_id) {
                    (Some(p), Some(vnf)) => format!(
                        "\t{}\t{vnf}",
                        serde_json::to_value(p)?.as_str().unwrap_or_default()
                    ),
                    (Some(p), None) => format!(
                        "\t{}",
                        serde_json::to_value(p)?.as_str().unwrap_or_default()
                    ),
                    (None, _) => String::new(),
                };
                println!(
                    "{}\t{}\t{}{purpose}",
                    key.reference, key.algorithm, key.label
                );
            }
        }
        KeysCommand::Show { key } => {
            let key: KeyRef = key.parse()?;
            let details: ops::KeyDetails = match &agent {
                Some(agent) => agent.get(&format!("/ops/v1/keys/{}", segment(&key.to_string())))?,
                None => ops::show(&open_backends(config)?, &key).map_err(ops_failure)?,
            };
            println!("reference: {}", details.reference);
            println!("algorithm: {}", details.algorithm);
            println!("device: {}", details.device);
            if !details.attributes.is_empty() {
                println!("attributes: {}", details.attributes);
            }
            print!("{}", details.public_key_pem);
        }
        KeysCommand::Destroy { key, vnf_instance } => {
            let key: KeyRef = key.parse()?;
            let record: ErasureRecord = match &agent {
                Some(agent) => agent.delete(&format!(
                    "/ops/v1/keys/{}{}",
                    segment(&key.to_string()),
                    agent::query(&[("vnfInstanceId", vnf_instance)])
                ))?,
                None => ops::destroy(
                    &open_backends(config)?,
                    &*open_store(config)?,
                    &key,
                    vnf_instance,
                    &actor(),
                )
                .map_err(ops_failure)?,
            };
            println!("{}", serde_json::to_string_pretty(&record)?);
            if !record.verified {
                return Err(Failure(format!("{key}: still present after destroy")));
            }
        }
        KeysCommand::SignTest { key, scheme, count } => {
            let key: KeyRef = key.parse()?;
            let report: ops::SignTestReport = match &agent {
                Some(agent) => agent.post(
                    &format!("/ops/v1/keys/{}/sign_test", segment(&key.to_string())),
                    serde_json::json!({ "scheme": scheme, "count": count }),
                )?,
                None => {
                    let scheme = scheme.map(|s| s.parse::<SignatureScheme>()).transpose()?;
                    ops::sign_test(&open_backends(config)?, &key, scheme, count)
                        .map_err(ops_failure)?
                }
            };
            println!(
                "ok {} {}: {} signature(s) verified, {:.0} signs/s",
                report.reference, report.scheme, report.signatures, report.signs_per_second
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
