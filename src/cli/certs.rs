//! `warden certs ...`: the certificates the CMF issued, through the running agent or, when
//! none runs, from the store directly.

use nfv_warden::ops::certs::{self, CertificatePage, CertificateQuery, CertificateView};

use super::agent::{self, ops_failure, segment};
use super::*;

#[derive(Subcommand)]
pub(super) enum CertsCommand {
    /// Issued certificates, in `caId/serial` order, a page at a time.
    List {
        /// Only the certificates this consumer (VNFM) requested.
        #[arg(long)]
        consumer: Option<String>,
        /// At most this many (at most 10000).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Continue after this certificate (a serial, or the `--after` a previous page printed).
        #[arg(long)]
        after: Option<String>,
        /// Print the JSON page (with `next` for the following page).
        #[arg(long)]
        json: bool,
    },
    /// One certificate: subject, SANs, consumer, registration, validity, attestation,
    /// revocation.
    Show {
        /// Serial (hex, as `certs list` prints it; colons allowed) or `caId/serial`.
        serial: String,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a certificate (RFC 5280 5.3.1 reason), through the running agent: audited with
    /// the caller, then in the CA's next CRL and at once in OCSP answers.
    Revoke {
        /// Serial (hex, colons allowed) or `caId/serial`.
        serial: String,
        /// unspecified, keyCompromise, cACompromise, affiliationChanged, superseded,
        /// cessationOfOperation, certificateHold, privilegeWithdrawn (or kebab-case).
        #[arg(long, default_value = "unspecified")]
        reason: String,
        #[arg(long)]
        json: bool,
    },
    /// The certificate as PEM, and with --chain its CA's certificates up to the root.
    Export {
        serial: String,
        #[arg(long)]
        chain: bool,
    },
}

pub(super) fn run(command: CertsCommand, config: &Config) -> Result<ExitCode, Failure> {
    let agent = agent::running(config)?;
    match command {
        CertsCommand::List {
            consumer,
            limit,
            after,
            json,
        } => {
            let query = CertificateQuery {
                consumer,
                after,
                limit: Some(limit),
            };
            let page: CertificatePage = match &agent {
                Some(agent) => agent.get(&format!(
                    "/ops/v1/certificates{}",
                    agent::query(&[
                        ("consumer", query.consumer.clone()),
                        ("after", query.after.clone()),
                        ("limit", query.limit.map(|l| l.to_string())),
                    ])
                ))?,
                None => certs::list(&*open_store(config)?, &query).map_err(ops_failure)?,
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&page)?);
            } else {
                println!(
                    "SERIAL\tCA\tCONSUMER\tCERT TYPE\tNOT AFTER\tATTESTED\tREVOKED\tSUBJECT\tSANS"
                );
                for c in &page.certificates {
                    println!(
                        "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                        c.serial_number,
                        c.ca_id,
                        c.consumer,
                        c.cert_type,
                        c.not_after,
                        c.attestation,
                        if c.revoked { "yes" } else { "no" },
                        c.subject.as_deref().unwrap_or("-"),
                        c.subject_alt_names.join(",")
                    );
                }
                if let Some(next) = &page.next {
                    eprintln!("more: warden certs list --after {next}");
                }
            }
        }
        CertsCommand::Show { serial, json } => {
            let view: CertificateView = match &agent {
                Some(agent) => agent.get(&format!("/ops/v1/certificates/{}", segment(&serial)))?,
                None => certs::show(&*open_store(config)?, &serial).map_err(ops_failure)?,
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&view)?);
            } else {
                print_certificate(&view);
            }
        }
        CertsCommand::Revoke {
            serial,
            reason,
            json,
        } => {
            let reason: nfv_warden::cmf::revoke::RevocationReason =
                reason.parse().map_err(Failure)?;
            let agent = agent.ok_or_else(|| {
                Failure(
                    "no agent is running: `warden certs revoke` goes through the running agent, \
                     which publishes the new CRL (start `warden serve`)"
                        .into(),
                )
            })?;
            let status: nfv_warden::cmf::revoke::RevocationStatus = agent.post(
                &format!("/ops/v1/certificates/{}/revoke", segment(&serial)),
                serde_json::json!({ "reason": reason.as_str() }),
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else if status.revoked_now {
                println!(
                    "revoked {}/{}: {} at {}",
                    status.ca_id, status.serial_number, status.reason, status.revoked_at
                );
            } else {
                println!(
                    "{}/{} was revoked before: {} at {}",
                    status.ca_id, status.serial_number, status.reason, status.revoked_at
                );
            }
        }
        CertsCommand::Export { serial, chain } => {
            let pem = match &agent {
                Some(agent) => {
                    let answer: serde_json::Value = agent.get(&format!(
                        "/ops/v1/certificates/{}/pem{}",
                        segment(&serial),
                        if chain { "?chain=true" } else { "" }
                    ))?;
                    answer["pem"]
                        .as_str()
                        .map(String::from)
                        .ok_or_else(|| Failure("the running agent sent no PEM".into()))?
                }
                None => certs::export(&*open_store(config)?, config, &serial, chain)
                    .map_err(ops_failure)?,
            };
            print!("{pem}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_certificate(c: &CertificateView) {
    println!("serial: {}", c.serial_number);
    println!("ca: {}", c.ca_id);
    println!("subject: {}", c.subject.as_deref().unwrap_or("-"));
    println!("subject alt names: {}", c.subject_alt_names.join(", "));
    println!("consumer: {}", c.consumer);
    println!("registration: {}", c.registration_id);
    println!("cert type: {}", c.cert_type);
    println!("subjects: {}", c.subjects.join(", "));
    println!("issued: {}", c.issued_at);
    println!("not before: {}", c.not_before);
    println!("not after: {}", c.not_after);
    match &c.attestation_format {
        Some(format) => println!("attested: {} (format {format})", c.attestation),
        None => println!("attested: {}", c.attestation),
    }
    match &c.revocation {
        Some(r) => println!("revoked: yes, {} ({})", r.revoked_at, r.reason),
        None => println!("revoked: no"),
    }
    println!("spki sha256: {}", c.spki_sha256);
}
