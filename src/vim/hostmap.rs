//! Location (IFA 033 Sc-Vi.Telem.002: HostID, ZoneID, physical location) of every server, and
//! the host map: VNF -> VNFC -> server -> hypervisor host.
//!
//! The host map joins two views: the NFVO's (SOL 005 NS inventory: each VNF instance's
//! `instantiatedVnfInfo.vnfcResourceInfo[].computeResource.resourceId`, the VIM's server id)
//! and the VIM's (Nova servers with `OS-EXT-SRV-ATTR:host`). A VNFC whose server the VIM does
//! not have, or has without a host yet, is listed as unplaced with the reason: the map never
//! drops what it cannot place.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use serde_json::Value;

use super::client::{Service, VimClient, VimError};
use crate::sm::nfvo::{Api, Interface, Nfvo, NfvoError};
use crate::sol::{NsInstance, NS_FIELDS};

/// The aggregate metadata key giving a physical location (site, room, rack, ...).
pub const LOCATION_KEY: &str = "location";

/// Where a server runs.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerLocation {
    pub server_id: String,
    pub server_name: String,
    pub status: String,
    pub project_id: Option<String>,
    /// The Nova compute host (`OS-EXT-SRV-ATTR:host`): HostID.
    pub host_id: Option<String>,
    pub hypervisor_hostname: Option<String>,
    /// The availability zone: ZoneID.
    pub zone_id: Option<String>,
    /// The host aggregates holding the host (also zones, by `aggregate:<uuid>`).
    pub aggregates: Vec<AggregateRef>,
    /// From an aggregate's `location` metadata, else from `[sm.vim.host_locations]`.
    pub physical_location: Option<String>,
    /// Where `physical_location` came from: `aggregate:<name>` or `host_locations`.
    pub location_source: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AggregateRef {
    pub zone_id: String,
    pub name: String,
}

/// Location of each server from Nova servers (2.79 fields) and aggregates; pure.
pub fn locate(
    servers: &[Value],
    aggregates: &[Value],
    host_locations: &BTreeMap<String, String>,
) -> Vec<ServerLocation> {
    servers
        .iter()
        .map(|s| {
            let host = s["OS-EXT-SRV-ATTR:host"].as_str().map(String::from);
            let mut refs = Vec::new();
            let mut physical = None;
            if let Some(h) = &host {
                for a in aggregates {
                    let holds = a["hosts"]
                        .as_array()
                        .is_some_and(|hs| hs.iter().any(|x| x.as_str() == Some(h)));
                    if !holds {
                        continue;
                    }
                    let name = a["name"].as_str().unwrap_or_default().to_string();
                    if physical.is_none() {
                        if let Some(loc) = a["metadata"][LOCATION_KEY].as_str() {
                            physical = Some((loc.to_string(), format!("aggregate:{name}")));
                        }
                    }
                    refs.push(AggregateRef {
                        zone_id: format!("aggregate:{}", a["uuid"].as_str().unwrap_or_default()),
                        name,
                    });
                }
                if physical.is_none() {
                    if let Some(loc) = host_locations.get(h) {
                        physical = Some((loc.clone(), "host_locations".into()));
                    }
                }
            }
            ServerLocation {
                server_id: s["id"].as_str().unwrap_or_default().to_string(),
                server_name: s["name"].as_str().unwrap_or_default().to_string(),
                status: s["status"].as_str().unwrap_or_default().to_string(),
                project_id: s["tenant_id"].as_str().map(String::from),
                host_id: host,
                hypervisor_hostname: s["OS-EXT-SRV-ATTR:hypervisor_hostname"]
                    .as_str()
                    .map(String::from),
                zone_id: s["OS-EXT-AZ:availability_zone"]
                    .as_str()
                    .filter(|z| !z.is_empty())
                    .map(String::from),
                aggregates: refs,
                physical_location: physical.as_ref().map(|(l, _)| l.clone()),
                location_source: physical.map(|(_, s)| s),
            }
        })
        .collect()
}

/// The location of every server of every project (admin: `all_tenants`), complete.
pub async fn locations(
    vim: &VimClient,
    host_locations: &BTreeMap<String, String>,
) -> Result<Vec<ServerLocation>, VimError> {
    let servers = vim
        .get_all(Service::Compute, "/servers/detail?all_tenants=1", "servers")
        .await?;
    let aggregates = vim.get(Service::Compute, "/os-aggregates").await?;
    let aggregates = aggregates["aggregates"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    Ok(locate(&servers, &aggregates, host_locations))
}

/// One VNFC and where it runs.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VnfcPlacement {
    pub vnf_instance_id: String,
    pub vnf_instance_name: Option<String>,
    pub ns_instance_ids: BTreeSet<String>,
    pub vnfc_id: String,
    pub vdu_id: Option<String>,
    /// The compute resource id the NFVO gives (the Nova server id).
    pub server_id: Option<String>,
    pub vim_connection_id: Option<String>,
    pub location: Option<ServerLocation>,
    /// Why it is not on a host: no resource id, no such server, no host yet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unplaced: Option<String>,
}

/// A hypervisor host and what runs there.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HostEntry {
    pub host_id: String,
    pub zone_ids: BTreeSet<String>,
    pub aggregates: BTreeSet<String>,
    pub physical_location: Option<String>,
    pub vnf_instance_ids: BTreeSet<String>,
    /// Servers of VNFCs on the host.
    pub vnfc_servers: BTreeSet<String>,
    /// Servers on the host that belong to no VNF the NFVO knows.
    pub other_servers: BTreeSet<String>,
}

/// VNF -> VNFC -> server -> host.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HostMap {
    /// Every VNFC of every instantiated VNF, placed or not.
    pub vnfcs: Vec<VnfcPlacement>,
    /// Every host with a server, by host id.
    pub hosts: BTreeMap<String, HostEntry>,
}

impl HostMap {
    /// The VNF instances with a VNFC on `host`.
    pub fn vnfs_on_host(&self, host: &str) -> Vec<String> {
        self.hosts
            .get(host)
            .map(|h| h.vnf_instance_ids.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The hosts the VNF's VNFCs run on (a VNF may span several; empty when none is placed
    /// or the VNF is unknown).
    pub fn host_of_vnf(&self, vnf: &str) -> Vec<String> {
        let hosts: BTreeSet<String> = self
            .vnfcs
            .iter()
            .filter(|p| p.vnf_instance_id == vnf)
            .filter_map(|p| p.location.as_ref().and_then(|l| l.host_id.clone()))
            .collect();
        hosts.into_iter().collect()
    }

    /// The VNFCs of a VNF with their servers and locations.
    pub fn vnfcs_of_vnf(&self, vnf: &str) -> Vec<&VnfcPlacement> {
        self.vnfcs
            .iter()
            .filter(|p| p.vnf_instance_id == vnf)
            .collect()
    }

    /// VNFCs whose server is not on a host (with the reason).
    pub fn unplaced(&self) -> Vec<&VnfcPlacement> {
        self.vnfcs.iter().filter(|p| p.unplaced.is_some()).collect()
    }
}

/// Joins the NFVO's NS inventory with the VIM's servers; pure.
pub fn join(ns_instances: &[NsInstance], locations: &[ServerLocation]) -> HostMap {
    let by_id: BTreeMap<&str, &ServerLocation> = locations
        .iter()
        .map(|l| (l.server_id.as_str(), l))
        .collect();
    // A VNF in several NSs is one VNF: gather its NS ids first.
    let mut ns_of: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for ns in ns_instances {
        for vnf in ns.vnf_instance.iter().flatten() {
            ns_of
                .entry(vnf.id.as_str())
                .or_default()
                .insert(ns.id.clone());
        }
    }
    let mut map = HostMap::default();
    let mut seen = BTreeSet::new();
    for ns in ns_instances {
        for vnf in ns.vnf_instance.iter().flatten() {
            if !seen.insert(vnf.id.clone()) {
                continue;
            }
            let Some(info) = &vnf.instantiated_vnf_info else {
                continue;
            };
            for vnfc in &info.vnfc_resource_info {
                let handle = &vnfc.compute_resource;
                let server_id = handle.resource_id.clone();
                let location = server_id
                    .as_deref()
                    .and_then(|id| by_id.get(id))
                    .map(|l| (*l).clone());
                let unplaced = match (&server_id, &location) {
                    (None, _) => Some("the NFVO gives no computeResource.resourceId".to_string()),
                    (Some(id), None) => Some(format!("server {id} is not at this VIM")),
                    (Some(_), Some(l)) if l.host_id.is_none() => {
                        Some(format!("server has no host yet (status {})", l.status))
                    }
                    _ => None,
                };
                map.vnfcs.push(VnfcPlacement {
                    vnf_instance_id: vnf.id.clone(),
                    vnf_instance_name: vnf.vnf_instance_name.clone(),
                    ns_instance_ids: ns_of.get(vnf.id.as_str()).cloned().unwrap_or_default(),
                    vnfc_id: vnfc.id.clone(),
                    vdu_id: vnfc.vdu_id.clone(),
                    server_id,
                    vim_connection_id: handle.vim_connection_id.clone(),
                    location,
                    unplaced,
                });
            }
        }
    }
    let vnf_of_server: BTreeMap<String, String> = map
        .vnfcs
        .iter()
        .filter_map(|p| Some((p.server_id.clone()?, p.vnf_instance_id.clone())))
        .collect();
    for l in locations {
        let Some(host) = &l.host_id else { continue };
        let entry = map.hosts.entry(host.clone()).or_insert_with(|| HostEntry {
            host_id: host.clone(),
            ..HostEntry::default()
        });
        if let Some(z) = &l.zone_id {
            entry.zone_ids.insert(z.clone());
        }
        for a in &l.aggregates {
            entry.aggregates.insert(a.name.clone());
        }
        if entry.physical_location.is_none() {
            entry.physical_location = l.physical_location.clone();
        }
        match vnf_of_server.get(&l.server_id) {
            Some(vnf) => {
                entry.vnf_instance_ids.insert(vnf.clone());
                entry.vnfc_servers.insert(l.server_id.clone());
            }
            None => {
                entry.other_servers.insert(l.server_id.clone());
            }
        }
    }
    map
}

#[derive(Debug, thiserror::Error)]
pub enum HostMapError {
    #[error("host map: the NFVO's NS inventory: {0}")]
    Nfvo(#[source] NfvoError),
    #[error("host map: the VIM's servers: {0}")]
    Vim(#[source] VimError),
}

/// The host map now: the NFVO's complete NS inventory (every page, with `vnfInstance`) and
/// the VIM's complete server list; either incomplete is an error, never a smaller map.
pub async fn host_map(
    vim: &VimClient,
    nfvo: &Nfvo,
    host_locations: &BTreeMap<String, String>,
) -> Result<HostMap, HostMapError> {
    let ns_instances: Vec<NsInstance> = nfvo
        .get_list(
            Interface::StatusInfo,
            Api::NsLcm,
            &format!("/ns_instances?{NS_FIELDS}"),
        )
        .await
        .map_err(HostMapError::Nfvo)?;
    let locations = locations(vim, host_locations)
        .await
        .map_err(HostMapError::Vim)?;
    Ok(join(&ns_instances, &locations))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn join_places_vnfcs_and_says_why_not() {
        let servers = vec![
            json!({"id": "s1", "name": "a", "status": "ACTIVE", "OS-EXT-SRV-ATTR:host": "h1", "OS-EXT-AZ:availability_zone": "nova"}),
            json!({"id": "s2", "name": "b", "status": "ACTIVE", "OS-EXT-SRV-ATTR:host": "h2", "OS-EXT-AZ:availability_zone": "nova"}),
            json!({"id": "s3", "name": "c", "status": "BUILD", "OS-EXT-SRV-ATTR:host": null}),
            json!({"id": "s9", "name": "other", "status": "ACTIVE", "OS-EXT-SRV-ATTR:host": "h1"}),
        ];
        let aggregates = vec![
            json!({"uuid": "u1", "name": "rack1", "hosts": ["h1"], "metadata": {"location": "par1/B/12"}}),
        ];
        let mut host_locations = BTreeMap::new();
        host_locations.insert("h2".to_string(), "par1/C/3".to_string());
        let locations = locate(&servers, &aggregates, &host_locations);
        assert_eq!(locations[0].physical_location.as_deref(), Some("par1/B/12"));
        assert_eq!(
            locations[0].location_source.as_deref(),
            Some("aggregate:rack1")
        );
        assert_eq!(locations[1].physical_location.as_deref(), Some("par1/C/3"));
        let ns: Vec<NsInstance> = serde_json::from_value(json!([
            {"id": "ns1", "vnfInstance": [
                {"id": "v1", "instantiationState": "INSTANTIATED", "instantiatedVnfInfo": {"vnfcResourceInfo": [
                    {"id": "c1", "vduId": "vdu1", "computeResource": {"resourceId": "s1"}},
                    {"id": "c2", "vduId": "vdu1", "computeResource": {"resourceId": "s2"}}]}},
                {"id": "v2", "instantiationState": "INSTANTIATED", "instantiatedVnfInfo": {"vnfcResourceInfo": [
                    {"id": "c3", "computeResource": {"resourceId": "s3"}},
                    {"id": "c4", "computeResource": {"resourceId": "gone"}}]}}]},
            {"id": "ns2", "vnfInstance": [{"id": "v1", "instantiationState": "INSTANTIATED"}]}
        ]))
        .unwrap();
        let map = join(&ns, &locations);
        assert_eq!(map.host_of_vnf("v1"), vec!["h1", "h2"]);
        assert_eq!(map.vnfs_on_host("h1"), vec!["v1"]);
        assert!(map.host_of_vnf("v2").is_empty());
        assert_eq!(map.unplaced().len(), 2);
        assert!(map.hosts["h1"].other_servers.contains("s9"));
        assert_eq!(
            map.vnfcs_of_vnf("v1")[0].ns_instance_ids,
            ["ns1".to_string(), "ns2".to_string()].into_iter().collect()
        );
    }
}
