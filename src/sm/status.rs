//! Status (IFA 033 6.3, Sc-Or.StatusInfo.001 and Sc-Or.NsLcm.006): the NSs and every VNF in
//! them with instantiation and operational state, package and VNFD ids, external
//! connectivity, and the package's integrity against the pinned checksum.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::nfvo::{Api, Interface};
use super::{path_segment, Sm, SmError};

impl Sm {
    /// Query NS, then each VNF package once.
    pub async fn status(&self) -> Result<Value, SmError> {
        let ns_instances = self
            .nfvo
            .get_json(Interface::StatusInfo, Api::NsLcm, "/ns_instances")
            .await?;
        let mut vnfs: BTreeMap<String, Value> = BTreeMap::new();
        let mut ns_list = Vec::new();
        for ns in ns_instances.as_array().into_iter().flatten() {
            let ns_id = ns["id"].as_str().unwrap_or_default();
            let mut members = Vec::new();
            for vnf in ns["vnfInstance"].as_array().into_iter().flatten() {
                let Some(id) = vnf["id"].as_str() else {
                    continue;
                };
                members.push(id.to_string());
                let entry = vnfs.entry(id.to_string()).or_insert_with(|| {
                    let info = &vnf["instantiatedVnfInfo"];
                    json!({
                        "vnfInstanceId": id,
                        "vnfInstanceName": vnf["vnfInstanceName"],
                        "nsInstanceIds": [],
                        "instantiationState": vnf["instantiationState"],
                        "vnfState": info["vnfState"],
                        "vnfPkgId": vnf["vnfPkgId"],
                        "vnfdId": vnf["vnfdId"],
                        "vnfProductName": vnf["vnfProductName"],
                        "vnfSoftwareVersion": vnf["vnfSoftwareVersion"],
                        "extVirtualLinkInfo": info["extVirtualLinkInfo"].as_array().cloned().unwrap_or_default(),
                    })
                });
                if let Some(list) = entry["nsInstanceIds"].as_array_mut() {
                    list.push(json!(ns_id));
                }
            }
            ns_list.push(json!({
                "nsInstanceId": ns_id,
                "nsInstanceName": ns["nsInstanceName"],
                "nsState": ns["nsState"],
                "vnfInstanceIds": members,
            }));
        }
        let mut packages: BTreeMap<String, Value> = BTreeMap::new();
        for vnf in vnfs.values() {
            let Some(pkg) = vnf["vnfPkgId"].as_str() else {
                continue;
            };
            if packages.contains_key(pkg) {
                continue;
            }
            let path = format!("/vnf_packages/{}", path_segment(pkg)?);
            let pinned = self.config.pinned_packages.get(pkg);
            let info = match self
                .nfvo
                .get_json(Interface::StatusInfo, Api::VnfPkgm, &path)
                .await
            {
                Ok(p) => {
                    let hash = p["checksum"]["hash"].as_str().unwrap_or_default();
                    let integrity = match pinned {
                        None => "NOT_PINNED",
                        Some(pin) if pin.eq_ignore_ascii_case(hash) => "VERIFIED",
                        Some(_) => "MISMATCH",
                    };
                    json!({
                        "operationalState": p["operationalState"],
                        "onboardingState": p["onboardingState"],
                        "checksum": p["checksum"],
                        "pinned": pinned,
                        "integrity": integrity,
                    })
                }
                Err(e) if e.status() == Some(404) => {
                    json!({ "integrity": "UNKNOWN_PACKAGE", "pinned": pinned })
                }
                Err(e) => return Err(e.into()),
            };
            packages.insert(pkg.to_string(), info);
        }
        for vnf in vnfs.values_mut() {
            if let Some(pkg) = vnf["vnfPkgId"].as_str().map(String::from) {
                vnf["package"] = packages.get(&pkg).cloned().unwrap_or(Value::Null);
            }
        }
        let journal = self.journal_counts().await?;
        Ok(json!({
            "sm": { "name": self.config.name, "mode": self.mode(), "callbackUri": self.callback_uri },
            "journal": journal,
            "nsInstances": ns_list,
            "vnfs": vnfs.into_values().collect::<Vec<_>>(),
        }))
    }
}
