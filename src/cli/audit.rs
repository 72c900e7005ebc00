//! `warden audit ...`: the audit hash chain, verified by the running agent or, when none runs,
//! from the store directly.

use nfv_warden::ops::audit::{self, ChainReport};
use nfv_warden::store::AuditEntry;

use super::agent::{self, ops_failure};
use super::*;

#[derive(Subcommand)]
pub(super) enum AuditCommand {
    /// Recompute every link of the chain: entries verified and the head hash.
    Verify {
        #[arg(long)]
        json: bool,
    },
    /// Audit entries: the last --limit, or those after --after SEQ.
    List {
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[arg(long)]
        after: Option<u64>,
        #[arg(long)]
        json: bool,
    },
}

pub(super) fn run(command: AuditCommand, config: &Config) -> Result<ExitCode, Failure> {
    let agent = agent::running(config)?;
    match command {
        AuditCommand::Verify { json } => {
            let report: ChainReport = match &agent {
                Some(agent) => agent.get("/ops/v1/audit/verify")?,
                None => audit::verify(&*open_store(config)?).map_err(ops_failure)?,
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "audit chain verified{}: {} entries, head {}",
                    if agent.is_some() {
                        " by the running agent"
                    } else {
                        ""
                    },
                    report.entries,
                    report.head_hash
                );
            }
        }
        AuditCommand::List { limit, after, json } => {
            let entries: Vec<AuditEntry> = match &agent {
                Some(agent) => agent.get(&format!(
                    "/ops/v1/audit{}",
                    agent::query(&[
                        ("after", after.map(|a| a.to_string())),
                        ("limit", Some(limit.to_string())),
                    ])
                ))?,
                None => audit::list(&*open_store(config)?, after, limit).map_err(ops_failure)?,
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
            } else {
                for e in &entries {
                    println!(
                        "{}\t{}\t{}\t{}\t{}",
                        e.seq, e.time, e.actor, e.action, e.subject
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
