//! `warden sm ...`: the Security Manager's operator commands. `init` works on the HSM/TPM
//! and the store directly (the agent not running); the rest talk to the running agent's
//! admin socket, since the agent holds the store.

use std::path::Path;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use nfv_warden::config::{Config, NfvoAuth};
use nfv_warden::keys::signer::HardwareKey;
use nfv_warden::keys::KeyAlgorithm;
use nfv_warden::sm::nfvo::Interface;
use nfv_warden::store::KeyPurpose;
use nfv_warden::{ca, pki};
use serde_json::{json, Value};

use super::{admin_socket, open_backends, open_store, record_key, write_atomically, Failure};

#[derive(Subcommand)]
pub(super) enum SmCommand {
    /// Create the four Sc-Or interface keys in the HSM/TPM (one each, IFA 033 Security.001)
    /// and their client certificates from the agent's CA, or CSRs for the operator's PKI.
    Init(InitArgs),
    /// NSs and VNFs as the NFVO reports them: states, package, VNFD, connectivity, integrity.
    Status {
        /// Print the JSON document.
        #[arg(long)]
        json: bool,
    },
    /// The NFVO's subscriptions; --delete ID removes one, --reconcile recreates ours.
    Subscriptions {
        #[arg(long)]
        delete: Option<String>,
        #[arg(long)]
        reconcile: bool,
    },
    /// Reconcile with the NFVO now (recovers lost notifications).
    Reconcile,
    /// The enforcement journal, or one action.
    Actions { id: Option<String> },
    /// Terminate a VNF: UpdateNS REMOVE_VNF in every NS that holds it.
    Terminate(TerminateArgs),
    /// Cancel an action: its steps not yet sent are never sent.
    Cancel { id: String },
    /// The erasure report of a VNF instance.
    Erasure { vnf_instance_id: String },
    /// Security VNFs in an NS (IFA 033 6.5).
    #[command(subcommand)]
    SecurityVnf(SecurityVnfCommand),
    /// IFA 033 SecEnforce.004: take a compute host out of use (disable its nova-compute,
    /// migrate or terminate the VNFs on it, quarantine it in an aggregate).
    Host(HostArgs),
    /// The journaled Sc-Vi notifications (VIM RabbitMQ and Aodh), newest last.
    Events {
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print the JSON document.
        #[arg(long)]
        json: bool,
    },
    /// The VIM on Sc-Vi (IFA 033 clause 8): hosts, capacity, zones, servers, quotas, queries.
    #[command(subcommand)]
    Vim(super::vim::VimCommand),
}

#[derive(Args)]
pub(super) struct HostArgs {
    /// The hypervisor host (Nova's `OS-EXT-SRV-ATTR:host`).
    host: String,
    /// Take it out of use (the only host action).
    #[arg(long, required = true)]
    out_of_use: bool,
    /// Migrate its servers away (live, else cold).
    #[arg(long, conflicts_with = "terminate")]
    migrate: bool,
    /// Terminate the VNFs on it through the NFVO (servers of no VNF are migrated).
    #[arg(long)]
    terminate: bool,
    /// Do not put it in the quarantine aggregate.
    #[arg(long)]
    no_quarantine: bool,
    /// Cold migration only (no live migration attempt).
    #[arg(long)]
    cold: bool,
    /// The reason given to Nova (disabled_reason).
    #[arg(long)]
    reason: Option<String>,
    /// Wait until the action finishes.
    #[arg(long)]
    wait: bool,
}

#[derive(Args)]
pub(super) struct InitArgs {
    /// Write CSRs (PEM) into this directory instead of issuing from the agent's CA.
    #[arg(long)]
    csr_out: Option<std::path::PathBuf>,
    #[arg(long, default_value = "ec-p256")]
    algorithm: String,
    #[arg(long, default_value_t = 365)]
    days: u32,
}

#[derive(Args)]
pub(super) struct TerminateArgs {
    vnf_instance_id: String,
    /// CREATE_VNF_SNAPSHOT first.
    #[arg(long)]
    snapshot: bool,
    /// Instantiate a replacement afterwards.
    #[arg(long)]
    allow_replacement: bool,
    /// Disable the VNF package (FULLY_ACTIVE).
    #[arg(long)]
    disable_package: bool,
    /// Ask NFV-MANO to erase the VNF's HMEE/TPM/HSM resources (FULLY_ACTIVE).
    #[arg(long)]
    erase: bool,
    /// Wait until the action finishes.
    #[arg(long)]
    wait: bool,
}

#[derive(Subcommand)]
pub(super) enum SecurityVnfCommand {
    /// UpdateNS ADD_VNF.
    Add {
        #[arg(long)]
        ns: String,
        #[arg(long)]
        vnf: String,
        #[arg(long)]
        profile: String,
        #[arg(long)]
        wait: bool,
    },
    /// UpdateNS MODIFY_VNF_INFORMATION.
    Modify {
        #[arg(long)]
        ns: String,
        #[arg(long)]
        vnf: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        description: Option<String>,
        #[arg(long)]
        wait: bool,
    },
    /// UpdateNS REMOVE_VNF.
    Remove {
        #[arg(long)]
        ns: String,
        #[arg(long)]
        vnf: String,
        #[arg(long)]
        wait: bool,
    },
}

pub(super) fn run(command: SmCommand, config: &Config) -> Result<ExitCode, Failure> {
    let sm = config
        .sm
        .as_ref()
        .ok_or_else(|| Failure("config: no [sm] section".into()))?;
    let socket = admin_socket(config);
    match command {
        SmCommand::Init(args) => init(args, config),
        SmCommand::Vim(cmd) => super::vim::run(cmd, &socket),
        SmCommand::Status { json } => {
            let status = call(&socket, "GET", "/sm/v1/status", None)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_status(&status);
            }
            Ok(ExitCode::SUCCESS)
        }
        SmCommand::Subscriptions { delete, reconcile } => {
            if let Some(id) = delete {
                call(
                    &socket,
                    "DELETE",
                    &format!("/sm/v1/subscriptions/{}", segment(&id)?),
                    None,
                )?;
                println!("deleted {id}");
            } else if reconcile {
                let v = call(&socket, "POST", "/sm/v1/subscriptions", None)?;
                println!(
                    "{}\t{}",
                    v["id"].as_str().unwrap_or(""),
                    v["callbackUri"].as_str().unwrap_or("")
                );
            } else {
                let v = call(&socket, "GET", "/sm/v1/subscriptions", None)?;
                for s in v.as_array().into_iter().flatten() {
                    println!(
                        "{}\t{}",
                        s["id"].as_str().unwrap_or(""),
                        s["callbackUri"].as_str().unwrap_or("")
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        SmCommand::Reconcile => {
            call(&socket, "POST", "/sm/v1/reconcile", None)?;
            println!("reconciled with the NFVO (mode {})", sm.mode);
            Ok(ExitCode::SUCCESS)
        }
        SmCommand::Host(args) => {
            let disposition = if args.migrate {
                json!("migrate")
            } else if args.terminate {
                json!("terminate")
            } else {
                Value::Null
            };
            let mut body = json!({ "quarantine": !args.no_quarantine });
            if args.cold {
                body["live"] = json!(false);
            }
            if !disposition.is_null() {
                body["disposition"] = disposition;
            }
            if let Some(reason) = &args.reason {
                body["reason"] = json!(reason);
            }
            let path = format!("/sm/v1/hosts/{}/out_of_use", segment(&args.host)?);
            let mut action = call(&socket, "POST", &path, Some(body))?;
            if args.wait {
                let id = action["id"].as_str().unwrap_or_default().to_string();
                let get = format!("/sm/v1/actions/{}", segment(&id)?);
                while action["state"] == "RUNNING" {
                    std::thread::sleep(std::time::Duration::from_millis(500));
                    action = call(&socket, "GET", &get, None)?;
                }
            }
            println!("{}", serde_json::to_string_pretty(&action)?);
            Ok(
                if matches!(action["state"].as_str(), Some("FAILED" | "CANCELLED")) {
                    ExitCode::FAILURE
                } else {
                    ExitCode::SUCCESS
                },
            )
        }
        SmCommand::Events { limit, json } => {
            let v = call(
                &socket,
                "GET",
                &format!("/sm/v1/vim/events?limit={limit}"),
                None,
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for e in v.as_array().into_iter().flatten() {
                    let text = |k: &str| e[k].as_str().unwrap_or("-").to_string();
                    println!(
                        "{}\t{}\t{}\t{}\t{}\t{}{}",
                        text("received"),
                        text("source"),
                        text("eventType"),
                        text("resourceId"),
                        text("host"),
                        text("state"),
                        e["suspect"]
                            .as_str()
                            .map(|s| format!("\tSUSPECT: {s}"))
                            .unwrap_or_default()
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        SmCommand::Actions { id } => {
            match id {
                Some(id) => {
                    let v = call(
                        &socket,
                        "GET",
                        &format!("/sm/v1/actions/{}", segment(&id)?),
                        None,
                    )?;
                    println!("{}", serde_json::to_string_pretty(&v)?);
                }
                None => {
                    let v = call(&socket, "GET", "/sm/v1/actions", None)?;
                    for a in v.as_array().into_iter().flatten() {
                        print_action_line(a);
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        SmCommand::Terminate(args) => {
            let body = json!({
                "vnfInstanceId": args.vnf_instance_id,
                "snapshot": args.snapshot,
                "allowReplacement": args.allow_replacement,
                "disablePackage": args.disable_package,
                "erase": args.erase,
            });
            let action = call(&socket, "POST", "/sm/v1/terminations", Some(body))?;
            finish(&socket, action, args.wait)
        }
        SmCommand::Cancel { id } => {
            let action = call(
                &socket,
                "POST",
                &format!("/sm/v1/actions/{}/cancel", segment(&id)?),
                None,
            )?;
            finish(&socket, action, false)
        }
        SmCommand::Erasure { vnf_instance_id } => {
            let v = call(
                &socket,
                "GET",
                &format!("/sm/v1/erasures/{}", segment(&vnf_instance_id)?),
                None,
            )?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(ExitCode::SUCCESS)
        }
        SmCommand::SecurityVnf(cmd) => {
            let (action, wait) = match cmd {
                SecurityVnfCommand::Add {
                    ns,
                    vnf,
                    profile,
                    wait,
                } => (
                    call(
                        &socket,
                        "POST",
                        "/sm/v1/security_vnfs",
                        Some(
                            json!({ "nsInstanceId": ns, "vnfInstanceId": vnf, "vnfProfileId": profile }),
                        ),
                    )?,
                    wait,
                ),
                SecurityVnfCommand::Modify {
                    ns,
                    vnf,
                    name,
                    description,
                    wait,
                } => {
                    let mut body = json!({ "nsInstanceId": ns });
                    if let Some(n) = name {
                        body["vnfInstanceName"] = json!(n);
                    }
                    if let Some(d) = description {
                        body["vnfInstanceDescription"] = json!(d);
                    }
                    (
                        call(
                            &socket,
                            "PATCH",
                            &format!("/sm/v1/security_vnfs/{}", segment(&vnf)?),
                            Some(body),
                        )?,
                        wait,
                    )
                }
                SecurityVnfCommand::Remove { ns, vnf, wait } => (
                    call(
                        &socket,
                        "DELETE",
                        &format!(
                            "/sm/v1/security_vnfs/{}?nsInstanceId={}",
                            segment(&vnf)?,
                            segment(&ns)?
                        ),
                        None,
                    )?,
                    wait,
                ),
            };
            finish(&socket, action, wait)
        }
    }
}

/// Print the action; with `wait`, poll until it is final; exit 1 if it failed.
fn finish(socket: &Path, mut action: Value, wait: bool) -> Result<ExitCode, Failure> {
    let id = action["id"].as_str().unwrap_or_default().to_string();
    if wait {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while action["state"] == "RUNNING" {
            if std::time::Instant::now() > deadline {
                return Err(Failure(format!("action {id}: still running after 120 s")));
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
            action = call(
                socket,
                "GET",
                &format!("/sm/v1/actions/{}", segment(&id)?),
                None,
            )?;
        }
    }
    print_action_line(&action);
    for step in action["steps"].as_array().into_iter().flatten() {
        let what = match step["kind"]["type"].as_str() {
            Some("updateNs") => format!(
                "UpdateNS {} on {}",
                step["kind"]["request"]["updateType"].as_str().unwrap_or(""),
                step["kind"]["nsInstanceId"].as_str().unwrap_or("")
            ),
            Some(other) => other.to_string(),
            None => String::new(),
        };
        println!(
            "  {:<10} {what} {}",
            step["state"].as_str().unwrap_or(""),
            step["opOccId"].as_str().unwrap_or("")
        );
    }
    if let Some(reason) = action["reason"].as_str() {
        println!("  reason: {reason}");
    }
    if action["state"] == "FAILED" {
        return Err(Failure(format!("action {id} failed")));
    }
    Ok(ExitCode::SUCCESS)
}

fn print_action_line(a: &Value) {
    println!(
        "{}\t{}\t{}\t{}\t{}",
        a["id"].as_str().unwrap_or(""),
        a["state"].as_str().unwrap_or(""),
        a["mode"].as_str().unwrap_or(""),
        a["trigger"].as_str().unwrap_or(""),
        a["refused"]
            .as_array()
            .map(|r| r
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join("; "))
            .unwrap_or_default()
    );
}

fn print_status(status: &Value) {
    println!(
        "SM {} mode {}",
        status["sm"]["name"].as_str().unwrap_or(""),
        status["sm"]["mode"].as_str().unwrap_or("")
    );
    for ns in status["nsInstances"].as_array().into_iter().flatten() {
        println!(
            "NS {} ({}) {}",
            ns["nsInstanceId"].as_str().unwrap_or(""),
            ns["nsInstanceName"].as_str().unwrap_or(""),
            ns["nsState"].as_str().unwrap_or("")
        );
    }
    println!("VNF\tinstantiation\tvnfState\tpackage\tvnfd\tintegrity\tlinks\tNS");
    for v in status["vnfs"].as_array().into_iter().flatten() {
        let links = v["extVirtualLinkInfo"].as_array().map_or(0, Vec::len);
        let ns: Vec<&str> = v["nsInstanceIds"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        println!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            v["vnfInstanceId"].as_str().unwrap_or(""),
            v["instantiationState"].as_str().unwrap_or(""),
            v["vnfState"].as_str().unwrap_or("-"),
            v["vnfPkgId"].as_str().unwrap_or(""),
            v["vnfdId"].as_str().unwrap_or(""),
            v["package"]["integrity"].as_str().unwrap_or("-"),
            links,
            ns.join(",")
        );
    }
    // Sc-Vi: hosts and zones, when [sm.vim] is configured.
    let vim = &status["vim"];
    if let Some(error) = vim["error"].as_str() {
        println!("VIM: {error}");
    } else if !vim.is_null() {
        println!("HOST\tstate\tstatus\tzone\tlocation\tVNFs");
        for h in vim["hosts"].as_array().into_iter().flatten() {
            let vnfs: Vec<&str> = h["vnfInstanceIds"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            println!(
                "{}\t{}\t{}\t{}\t{}\t{}",
                h["hostId"].as_str().unwrap_or(""),
                h["state"].as_str().unwrap_or("-"),
                h["status"].as_str().unwrap_or("-"),
                h["zoneId"].as_str().unwrap_or("-"),
                h["physicalLocation"].as_str().unwrap_or("-"),
                vnfs.join(",")
            );
        }
        let zones: Vec<&str> = vim["zones"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|z| z["zoneName"].as_str())
            .collect();
        println!("zones: {}", zones.join(", "));
    }
}

fn segment(id: &str) -> Result<&str, Failure> {
    nfv_warden::sm::path_segment(id).map_err(|e| Failure(e.to_string()))
}

/// One request to the admin socket; ProblemDetails become the error line.
pub(super) fn call(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<Value, Failure> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure(format!("tokio runtime: {e}")))?;
    runtime.block_on(async {
        let stream = tokio::net::UnixStream::connect(socket).await.map_err(|e| {
            Failure(format!(
                "admin socket {}: {e} (is `warden serve` running with [sm]?)",
                socket.display()
            ))
        })?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| Failure(format!("admin socket: {e}")))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut builder = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "localhost");
        let bytes = match body {
            Some(b) => {
                builder = builder.header(hyper::header::CONTENT_TYPE, "application/json");
                b.to_string().into_bytes()
            }
            None => Vec::new(),
        };
        let request = builder
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| Failure(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| Failure(format!("{method} {path}: {e}")))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| Failure(format!("{method} {path}: {e}")))?
            .to_bytes();
        let value: Value = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body).unwrap_or_else(|_| json!(String::from_utf8_lossy(&body)))
        };
        if status >= 400 {
            let detail = value["detail"]
                .as_str()
                .map(String::from)
                .unwrap_or_else(|| value.to_string());
            return Err(Failure(format!("{method} {path}: {status}: {detail}")));
        }
        Ok(value)
    })
}

/// Keys and client certificates (or CSRs) for the four Sc-Or interfaces.
fn init(args: InitArgs, config: &Config) -> Result<ExitCode, Failure> {
    let sm = config
        .sm
        .as_ref()
        .ok_or_else(|| Failure("config: no [sm] section".into()))?;
    if sm.nfvo.auth != NfvoAuth::Mtls {
        return Err(Failure(
            "sm.nfvo.auth is not \"mtls\": there are no interface keys to make".into(),
        ));
    }
    let backends = open_backends(config)?;
    let store = open_store(config)?;
    let algorithm: KeyAlgorithm = args.algorithm.parse()?;
    // Where each interface's certificate comes from.
    enum Certify {
        Csr(std::path::PathBuf),
        Issue(HardwareKey, Box<x509_cert::Certificate>, String),
    }
    let certify = match &args.csr_out {
        Some(dir) => Certify::Csr(dir.clone()),
        None => {
            let ca = config.ca.as_ref().ok_or_else(|| {
                Failure("config: no [ca] section (or use --csr-out for an external PKI)".into())
            })?;
            let key = HardwareKey::new(backends.for_key(&ca.key)?, ca.key.clone())?;
            let pem = std::fs::read_to_string(&ca.certificate).map_err(|e| {
                Failure(format!(
                    "{}: {e} (run `warden ca init` first)",
                    ca.certificate.display()
                ))
            })?;
            let cert = pki::certificates_from_pem(&pem)?.remove(0);
            Certify::Issue(key, Box::new(cert), pem)
        }
    };
    for interface in Interface::ALL {
        let entry = match interface {
            Interface::NsLcm => &sm.nfvo.interface.ns_lcm,
            Interface::StatusInfo => &sm.nfvo.interface.status_info,
            Interface::SecEnforce => &sm.nfvo.interface.sec_enforce,
            Interface::SecurityVnfMgmt => &sm.nfvo.interface.security_vnf_mgmt,
        }
        .as_ref()
        .ok_or_else(|| {
            Failure(format!(
                "sm.nfvo.interface.{}: not configured",
                interface.name()
            ))
        })?;
        let (info, created) = backends.ensure(&entry.key, algorithm)?;
        if created {
            record_key(
                &store,
                &entry.key,
                &entry.key.to_string(),
                info.public_key.algorithm,
                KeyPurpose::SmAssoc,
                None,
            )?;
        }
        // The identity the NFVO sees on this interface: <sm name>.<interface>.
        let name = format!("{}.{}", sm.name, interface.name().replace('_', "-"));
        let key = HardwareKey::new(backends.for_key(&entry.key)?, entry.key.clone())?;
        match &certify {
            Certify::Csr(dir) => {
                let csr = ca::tls_client_csr(&key, &format!("CN={name}"))?;
                let der = der::Encode::to_der(&csr)?;
                let path = dir.join(format!("{name}.csr"));
                write_atomically(&path, pki::to_pem("CERTIFICATE REQUEST", &der)?.as_bytes())?;
                println!(
                    "{} {} CSR written to {}",
                    interface.name(),
                    entry.key,
                    path.display()
                );
            }
            Certify::Issue(ca_key, ca_cert, ca_pem) => {
                let mut profile = ca::LeafProfile::tls_server(std::slice::from_ref(&name))?;
                profile.extended_key_usage = vec![const_oid::db::rfc5280::ID_KP_CLIENT_AUTH];
                let leaf = ca::issue(
                    ca_key,
                    ca_cert,
                    &format!("CN={name}"),
                    &info.public_key.spki_der,
                    ca::Profile::Leaf(profile),
                    args.days,
                )?;
                let mut chain = pki::certificate_pem(&leaf)?;
                chain.push_str(ca_pem);
                write_atomically(&entry.certificate, chain.as_bytes())?;
                super::init::record_agent_certificate(
                    &store,
                    config,
                    &leaf,
                    nfv_warden::cmf::CertType::SmInterface,
                    vec![name.clone()],
                    "sm.interface.certify",
                    &entry.key.to_string(),
                    json!({ "interface": interface.name(), "subject": name,
                            "serial": hex::encode(leaf.tbs_certificate().serial_number().as_bytes()) }),
                )?;
                println!(
                    "{} {} {} -> {}",
                    interface.name(),
                    entry.key,
                    name,
                    entry.certificate.display()
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
