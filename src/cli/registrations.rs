//! `warden cmf registrations ...`: the CMF's registrations, every consumer's, through the
//! running agent or, when none runs, on the store directly.

use nfv_warden::cmf::names::Policies;
use nfv_warden::ops::registrations::{self, RegistrationQuery, RegistrationView};

use super::agent::{self, ops_failure, segment};
use super::*;

/// `warden cmf registrations ...`.
#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(super) struct RegistrationsArgs {
    #[command(subcommand)]
    action: Option<RegistrationsAction>,
    /// Only this consumer's registrations.
    #[arg(long)]
    consumer: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum RegistrationsAction {
    /// Move a registration to another configured consumer (its names, certType and CA must
    /// be permitted to that consumer's trust domain).
    Transfer {
        id: String,
        /// The consumer that becomes the manager.
        #[arg(long)]
        to: String,
    },
    /// Delete a registration (as its consumer's DELETE would); its names become free.
    Delete { id: String },
}

pub(super) fn run(args: RegistrationsArgs, config: &Config) -> Result<ExitCode, Failure> {
    let agent = agent::running(config)?;
    match args.action {
        None => {
            let query = RegistrationQuery {
                consumer: args.consumer,
            };
            let views: Vec<RegistrationView> = match &agent {
                Some(agent) => agent.get(&format!(
                    "/ops/v1/registrations{}",
                    agent::query(&[("consumer", query.consumer.clone())])
                ))?,
                None => registrations::list(&*open_store(config)?, config, &query)
                    .map_err(ops_failure)?,
            };
            if args.json {
                println!("{}", serde_json::to_string_pretty(&views)?);
            } else {
                println!("ID\tCONSUMER\tTRUST DOMAIN\tCERT TYPE\tCA\tCREATED\tSUBJECTS\tNOTE");
                for v in &views {
                    let r = &v.registration;
                    let mut notes = Vec::new();
                    match &v.configured_trust_domain {
                        None => notes.push("consumer no longer configured".to_string()),
                        Some(d) if *d != r.trust_domain => {
                            notes.push(format!("consumer moved to trust domain {d}"))
                        }
                        Some(_) => {}
                    }
                    for b in &v.blocked {
                        notes.push(format!("{} held by {}", b.subject, b.held_by));
                    }
                    println!(
                        "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                        r.id,
                        r.consumer,
                        r.trust_domain,
                        r.cert_type,
                        r.ca_id,
                        r.created,
                        r.subject_ids.join(","),
                        if notes.is_empty() {
                            "-".to_string()
                        } else {
                            notes.join("; ")
                        }
                    );
                }
            }
        }
        Some(RegistrationsAction::Transfer { id, to }) => {
            let moved: nfv_warden::cmf::Registration = match &agent {
                Some(agent) => agent.post(
                    &format!("/ops/v1/registrations/{}/transfer", segment(&id)),
                    serde_json::json!({ "to": to }),
                )?,
                None => {
                    let policies = Policies::from_config(config).map_err(Failure::config)?;
                    registrations::transfer(
                        &*open_store(config)?,
                        config,
                        &policies,
                        &id,
                        &to,
                        &actor(),
                    )
                    .map_err(ops_failure)?
                }
            };
            println!(
                "registration {} now managed by {} (trust domain {})",
                moved.id, moved.consumer, moved.trust_domain
            );
        }
        Some(RegistrationsAction::Delete { id }) => {
            let deleted: nfv_warden::cmf::Registration = match &agent {
                Some(agent) => agent.delete(&format!("/ops/v1/registrations/{}", segment(&id)))?,
                None => {
                    registrations::delete(&*open_store(config)?, &id, &actor())
                        .map_err(ops_failure)?
                        .0
                }
            };
            println!(
                "registration {} of {} deleted, its certificates revoked; its names are free: {}",
                deleted.id,
                deleted.consumer,
                deleted.subject_ids.join(", ")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
