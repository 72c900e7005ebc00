//! `warden sm vim ...`: the operator's Sc-Vi queries, through the running agent's admin
//! socket (the agent holds the VIM session and its key).

use std::path::Path;
use std::process::ExitCode;

use clap::Subcommand;
use serde_json::Value;

use super::sm::call;
use super::Failure;

#[derive(Subcommand)]
pub(super) enum VimCommand {
    /// Compute hosts: state, zone, aggregates, physical location and the VNFs on each.
    Hosts {
        #[arg(long)]
        json: bool,
    },
    /// Compute capacity from Placement (total, allocated, reserved, available).
    Capacity {
        /// Only this hypervisor host.
        #[arg(long)]
        host: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Availability zones and host aggregates.
    Zones {
        #[arg(long)]
        json: bool,
    },
    /// The servers of a VNF's VNFCs and their hosts.
    Servers {
        #[arg(long)]
        vnf: String,
        #[arg(long)]
        json: bool,
    },
    /// Compute, network and storage quotas with usage.
    Quotas {
        /// The OpenStack project; the SM's own by default.
        #[arg(long)]
        project: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Any IFA 033 8.2.1 query operation (e.g. images, compute-resources, nfp).
    Query {
        operation: String,
        #[arg(long)]
        id: Option<String>,
        #[arg(long)]
        project: Option<String>,
        #[arg(long)]
        host: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

pub(super) fn run(command: VimCommand, socket: &Path) -> Result<ExitCode, Failure> {
    match command {
        VimCommand::Hosts { json } => {
            let v = call(socket, "GET", "/sm/v1/vim/hosts", None)?;
            if json {
                return print_json(&v);
            }
            println!("HOST\tSTATE\tSTATUS\tZONE\tLOCATION\tVMS\tVNFS");
            for h in v["hosts"].as_array().into_iter().flatten() {
                let vnfs: Vec<&str> = strings(&h["vnfInstanceIds"]);
                println!(
                    "{}\t{}\t{}\t{}\t{}\t{}\t{}",
                    text(&h["hostId"]),
                    text(&h["state"]),
                    text(&h["status"]),
                    text(&h["zoneId"]),
                    text(&h["physicalLocation"]),
                    text(&h["runningVms"]),
                    vnfs.join(",")
                );
            }
            for u in v["unplacedVnfcs"].as_array().into_iter().flatten() {
                println!(
                    "unplaced: VNF {} VNFC {}: {}",
                    text(&u["vnfInstanceId"]),
                    text(&u["vnfcId"]),
                    text(&u["unplaced"])
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        VimCommand::Capacity { host, json } => {
            let path = match &host {
                Some(h) => format!("/sm/v1/vim/capacity?host={}", query_value(h)?),
                None => "/sm/v1/vim/capacity".into(),
            };
            let v = call(socket, "GET", &path, None)?;
            if json {
                return print_json(&v);
            }
            let r = &v["result"];
            println!("SCOPE\tRESOURCE\tTOTAL\tALLOCATED\tRESERVED\tAVAILABLE");
            print_capacity("all", &r["capacityInformation"]);
            for h in r["hosts"].as_array().into_iter().flatten() {
                print_capacity(text(&h["hostId"]), &h["capacityInformation"]);
            }
            Ok(ExitCode::SUCCESS)
        }
        VimCommand::Zones { json } => {
            let v = call(socket, "GET", "/sm/v1/vim/zones", None)?;
            if json {
                return print_json(&v);
            }
            println!("ZONE\tNAME\tSTATE\tKIND\tHOSTS");
            for z in v["result"]["resourceZone"].as_array().into_iter().flatten() {
                println!(
                    "{}\t{}\t{}\t{}\t{}",
                    text(&z["zoneId"]),
                    text(&z["zoneName"]),
                    text(&z["zoneState"]),
                    text(&z["zoneProperty"]["kind"]),
                    strings(&z["zoneProperty"]["hosts"]).join(",")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        VimCommand::Servers { vnf, json } => {
            let v = call(
                socket,
                "GET",
                &format!("/sm/v1/vim/servers?vnf={}", query_value(&vnf)?),
                None,
            )?;
            if json {
                return print_json(&v);
            }
            println!("VNFC\tVDU\tSERVER\tHOST\tZONE\tSTATUS");
            for c in v["vnfcs"].as_array().into_iter().flatten() {
                let l = &c["location"];
                println!(
                    "{}\t{}\t{}\t{}\t{}\t{}",
                    text(&c["vnfcId"]),
                    text(&c["vduId"]),
                    text(&c["serverId"]),
                    if l.is_null() {
                        text(&c["unplaced"])
                    } else {
                        text(&l["hostId"])
                    },
                    text(&l["zoneId"]),
                    text(&l["status"])
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        VimCommand::Quotas { project, json } => {
            let path = match &project {
                Some(p) => format!("/sm/v1/vim/quotas?project={}", query_value(p)?),
                None => "/sm/v1/vim/quotas".into(),
            };
            let v = call(socket, "GET", &path, None)?;
            if json {
                return print_json(&v);
            }
            println!("KIND\tRESOURCE\tLIMIT\tIN USE\tRESERVED");
            for (kind, answer) in v.as_object().into_iter().flatten() {
                for (name, q) in answer["result"]["openstack"]
                    .as_object()
                    .into_iter()
                    .flatten()
                {
                    println!(
                        "{kind}\t{name}\t{}\t{}\t{}",
                        text(&q["limit"]),
                        text(&q["inUse"]),
                        text(&q["reserved"])
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        VimCommand::Query {
            operation,
            id,
            project,
            host,
            json,
        } => {
            let mut params = Vec::new();
            for (k, v) in [("id", id), ("project", project), ("host", host)] {
                if let Some(v) = v {
                    params.push(format!("{k}={}", query_value(&v)?));
                }
            }
            let mut path = format!("/sm/v1/vim/query/{}", query_value(&operation)?);
            if !params.is_empty() {
                path = format!("{path}?{}", params.join("&"));
            }
            let v = call(socket, "GET", &path, None)?;
            if json {
                return print_json(&v);
            }
            println!("{} ({})", text(&v["operation"]), text(&v["clause"]));
            match v["answer"].as_str() {
                Some("NOT_PROVIDED") => {
                    println!("not provided by this VIM: {}", text(&v["reason"]))
                }
                _ => println!("{}", serde_json::to_string_pretty(&v["result"])?),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_json(v: &Value) -> Result<ExitCode, Failure> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(ExitCode::SUCCESS)
}

fn print_capacity(scope: &str, capacity: &Value) {
    for (class, c) in capacity.as_object().into_iter().flatten() {
        println!(
            "{scope}\t{class}\t{}\t{}\t{}\t{}",
            text(&c["totalCapacity"]),
            text(&c["allocatedCapacity"]),
            text(&c["reservedCapacity"]),
            text(&c["availableCapacity"])
        );
    }
}

fn text(v: &Value) -> &str {
    match v {
        Value::String(s) => s,
        Value::Null => "-",
        _ => v.as_str().unwrap_or("?"),
    }
    .trim()
    .split('\n')
    .next()
    .unwrap_or("-")
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

/// A value as a query parameter: ids and names only.
fn query_value(v: &str) -> Result<&str, Failure> {
    if v.is_empty()
        || !v
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
    {
        return Err(Failure(format!("'{v}' is not an id or name")));
    }
    Ok(v)
}
