//! `warden cmf ...`: CMF direct mode's VNF inventory, through the running agent or, when
//! none runs, from the store directly.

use serde_json::Value;

use super::agent::{self, segment};
use super::*;

#[derive(Subcommand)]
pub(super) enum CmfCommand {
    /// Registrations of every consumer (IFA 033 11.2.2): list (default), transfer, delete.
    Registrations(super::registrations::RegistrationsArgs),
    /// Direct mode: the VNF instances followed and their VNFC instances.
    Vnfs {
        #[arg(long)]
        json: bool,
    },
    /// Direct mode: one VNFC (vnfcId or vnfInstanceId/vnfcId): certificates, state, report.
    Vnfc { vnfc_id: String },
}

pub(super) fn run(command: CmfCommand, config: &Config) -> Result<ExitCode, Failure> {
    if let CmfCommand::Registrations(args) = command {
        return super::registrations::run(args, config);
    }
    let agent = agent::running(config)?;
    match command {
        CmfCommand::Registrations(_) => unreachable!("handled above"),
        CmfCommand::Vnfs { json } => {
            let view: Value = match &agent {
                Some(agent) => agent.get("/cmf/v1/direct/vnfs")?,
                None => nfv_warden::cmf::direct::vnfs_view(&*open_store(config)?)
                    .map_err(|e| Failure(format!("store: {e}")))?,
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&view)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!("VNF INSTANCE\tVNFM\tSTATE\tVNFC\tVDU\tSERVER\tVNFC STATE\tCREDENTIAL");
            for vnf in view.as_array().into_iter().flatten() {
                let vnfcs = vnf["vnfcs"].as_array().cloned().unwrap_or_default();
                if vnfcs.is_empty() {
                    println!(
                        "{}\t{}\t{}\t-\t-\t-\t-\t-",
                        text(&vnf["vnfInstanceId"]),
                        text(&vnf["vnfm"]),
                        text(&vnf["instantiationState"])
                    );
                }
                for c in vnfcs {
                    let credential = match &c["credential"] {
                        Value::Null => "none".to_string(),
                        cred if !cred["usedAt"].is_null() => "used".into(),
                        cred if cred["delivered"] == true => "delivered".into(),
                        _ => "minted".into(),
                    };
                    println!(
                        "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                        text(&vnf["vnfInstanceId"]),
                        text(&vnf["vnfm"]),
                        text(&vnf["instantiationState"]),
                        text(&c["vnfcId"]),
                        text(&c["vduId"]),
                        text(&c["serverId"]),
                        text(&c["state"]),
                        credential
                    );
                }
            }
        }
        CmfCommand::Vnfc { vnfc_id } => {
            let view: Value = match &agent {
                Some(agent) => agent.get(&format!("/cmf/v1/direct/vnfcs/{}", segment(&vnfc_id)))?,
                None => nfv_warden::cmf::direct::vnfc_view(&*open_store(config)?, &vnfc_id)
                    .map_err(|e| Failure(format!("store: {e}")))?
                    .ok_or_else(|| Failure(format!("no VNFC '{vnfc_id}' in the inventory")))?,
            };
            println!("{}", serde_json::to_string_pretty(&view)?);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn text(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), String::from)
}
