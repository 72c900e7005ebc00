//! The admin socket's Sc-Vi routes (`warden sm vim ...`), and the VIM part of `sm status`.
//!
//! ```text
//! GET /sm/v1/vim/session                     user, project, roles, expiry, endpoints
//! GET /sm/v1/vim/hosts                       compute hosts, their zones, location, VNFs
//! GET /sm/v1/vim/capacity[?host=H]           Placement capacity (Query Compute Capacity)
//! GET /sm/v1/vim/zones                       availability zones and aggregates
//! GET /sm/v1/vim/servers?vnf=ID              the VNF's VNFCs, servers and hosts
//! GET /sm/v1/vim/quotas[?project=P]          compute, network and storage quotas with usage
//! GET /sm/v1/vim/query/{operation}[?id=&project=&host=]   any IFA 033 8.2.1 query
//! ```

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::hostmap::{self, HostMap};
use super::queries::{self, Operation, QueryFilter};
use super::{VimClient, VimError};
use crate::sm::Sm;
use crate::sol::NsInstance;

pub fn routes(sm: Arc<Sm>) -> Router {
    Router::new()
        .route("/sm/v1/vim/session", get(session))
        .route("/sm/v1/vim/hosts", get(hosts))
        .route("/sm/v1/vim/capacity", get(capacity))
        .route("/sm/v1/vim/zones", get(zones))
        .route("/sm/v1/vim/servers", get(servers))
        .route("/sm/v1/vim/quotas", get(quotas))
        .route("/sm/v1/vim/query/{operation}", get(query))
        .with_state(sm)
}

fn problem(status: u16, detail: &str) -> Response {
    crate::api::problem_details(status, None, detail)
}

/// A VIM failure as ProblemDetails: the VIM's refusal keeps its status class (403 stays a
/// 403: the operator sees a rights problem), the rest is a 502/504 from the agent.
fn vim_error(e: &VimError) -> Response {
    let status = match e {
        VimError::Refused { status, .. } if matches!(status, 401 | 403 | 404) => *status,
        VimError::Refused { .. } | VimError::Invalid { .. } | VimError::TooLarge { .. } => 502,
        VimError::Auth { .. } | VimError::Unreachable { .. } => 502,
        VimError::NoAnswer { .. } => 504,
        VimError::NoEndpoint { .. } => 501,
        VimError::Setup(_) => 400,
    };
    problem(status, &format!("VIM: {}", crate::error::chain(e)))
}

async fn client(sm: &Sm) -> Result<VimClient, Response> {
    let Some(link) = &sm.vim else {
        return Err(problem(
            404,
            "this SM has no VIM ([sm.vim] is not configured)",
        ));
    };
    link.client().await.map_err(|e| vim_error(&e))
}

async fn session(State(sm): State<Arc<Sm>>) -> Response {
    let vim = match client(&sm).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    match vim.token_info().await {
        Ok(info) => {
            Json(json!({"session": info, "tokensIssued": vim.tokens_issued()})).into_response()
        }
        Err(e) => vim_error(&e),
    }
}

/// Compute hosts (NFVI-PoP compute information) with their VNFs from the host map.
async fn hosts(State(sm): State<Arc<Sm>>) -> Response {
    let vim = match client(&sm).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let mut calls = Vec::new();
    let region = sm.vim.as_ref().and_then(|l| l.config().region.clone());
    let pop = region.unwrap_or_else(|| "default".into());
    let compute = match queries::nfvi_pop_compute(&vim, &mut calls, &pop).await {
        Ok(v) => v,
        Err(e) => return vim_error(&e),
    };
    let map = match host_map_of(&sm, &vim).await {
        Ok(m) => m,
        Err(r) => return r,
    };
    Json(hosts_with_vnfs(&compute, &map)).into_response()
}

fn hosts_with_vnfs(compute: &Value, map: &HostMap) -> Value {
    let hosts: Vec<Value> = compute["computeHosts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|h| {
            let mut h = h.clone();
            let id = h["hostId"].as_str().unwrap_or_default().to_string();
            let entry = map.hosts.get(&id);
            h["vnfInstanceIds"] = json!(map.vnfs_on_host(&id));
            h["aggregates"] = json!(entry.map(|e| e.aggregates.clone()).unwrap_or_default());
            h["physicalLocation"] = json!(entry.and_then(|e| e.physical_location.clone()));
            h["otherServers"] = json!(entry.map(|e| e.other_servers.len()).unwrap_or(0));
            h
        })
        .collect();
    json!({"nfviPopId": compute["nfviPopId"], "hosts": hosts, "unplacedVnfcs": map.unplaced()})
}

async fn host_map_of(sm: &Sm, vim: &VimClient) -> Result<HostMap, Response> {
    let locations = sm
        .vim
        .as_ref()
        .map(|l| l.config().host_locations.clone())
        .unwrap_or_default();
    hostmap::host_map(vim, &sm.nfvo, &locations)
        .await
        .map_err(|e| problem(502, &crate::error::chain(&e)))
}

#[derive(serde::Deserialize)]
struct HostParam {
    host: Option<String>,
}

async fn capacity(State(sm): State<Arc<Sm>>, Query(p): Query<HostParam>) -> Response {
    run(
        &sm,
        Operation::ComputeCapacity,
        QueryFilter {
            host: p.host,
            ..QueryFilter::default()
        },
    )
    .await
}

async fn zones(State(sm): State<Arc<Sm>>) -> Response {
    run(&sm, Operation::ComputeZones, QueryFilter::default()).await
}

#[derive(serde::Deserialize)]
struct VnfParam {
    vnf: String,
}

async fn servers(State(sm): State<Arc<Sm>>, Query(p): Query<VnfParam>) -> Response {
    let vim = match client(&sm).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let map = match host_map_of(&sm, &vim).await {
        Ok(m) => m,
        Err(r) => return r,
    };
    let vnfcs = map.vnfcs_of_vnf(&p.vnf);
    if vnfcs.is_empty() {
        return problem(
            404,
            &format!(
                "VNF instance {} has no VNFC in the NFVO's NS inventory",
                p.vnf
            ),
        );
    }
    Json(json!({"vnfInstanceId": p.vnf, "hosts": map.host_of_vnf(&p.vnf), "vnfcs": vnfcs}))
        .into_response()
}

#[derive(serde::Deserialize)]
struct ProjectParam {
    project: Option<String>,
}

async fn quotas(State(sm): State<Arc<Sm>>, Query(p): Query<ProjectParam>) -> Response {
    let vim = match client(&sm).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let filter = QueryFilter {
        project: p.project,
        ..QueryFilter::default()
    };
    let mut out = serde_json::Map::new();
    for op in [
        Operation::ComputeQuota,
        Operation::NetworkQuota,
        Operation::StorageQuota,
    ] {
        match queries::query(&vim, op, &filter).await {
            Ok(answer) => {
                out.insert(op.name(), json!(answer));
            }
            Err(e) => return vim_error(&e),
        }
    }
    Json(Value::Object(out)).into_response()
}

async fn query(
    State(sm): State<Arc<Sm>>,
    Path(operation): Path<String>,
    Query(filter): Query<QueryFilter>,
) -> Response {
    let Some(op) = Operation::from_name(&operation) else {
        let names: Vec<String> = Operation::ALL.iter().map(|o| o.name()).collect();
        return problem(
            404,
            &format!(
                "no query operation '{operation}'; known: {}",
                names.join(", ")
            ),
        );
    };
    run(&sm, op, filter).await
}

async fn run(sm: &Sm, op: Operation, filter: QueryFilter) -> Response {
    let vim = match client(sm).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    match queries::query(&vim, op, &filter).await {
        Ok(answer) => Json(answer).into_response(),
        Err(e) => vim_error(&e),
    }
}

/// The VIM part of `sm status`: hosts (state, zone, location, VNFs) and zones. A VIM that
/// cannot be read is said in the document, never a failed status.
pub async fn status_summary(sm: &Sm, ns_instances: &[NsInstance]) -> Value {
    let Some(link) = &sm.vim else {
        return Value::Null;
    };
    let outcome = async {
        let vim = link.client().await?;
        let mut calls = Vec::new();
        let pop = link
            .config()
            .region
            .clone()
            .unwrap_or_else(|| "default".into());
        let compute = queries::nfvi_pop_compute(&vim, &mut calls, &pop).await?;
        let zones = queries::compute_zones(&vim, &mut calls, &pop).await?;
        let locations = hostmap::locations(&vim, &link.config().host_locations).await?;
        let map = hostmap::join(ns_instances, &locations);
        let mut summary = hosts_with_vnfs(&compute, &map);
        summary["zones"] = zones["resourceZone"].clone();
        Ok::<_, VimError>(summary)
    }
    .await;
    match outcome {
        Ok(v) => v,
        Err(e) => json!({"error": crate::error::chain(&e)}),
    }
}
