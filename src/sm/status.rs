//! Status (IFA 033 6.3, Sc-Or.StatusInfo.001 and Sc-Or.NsLcm.006): the NSs and every VNF in
//! them with instantiation and operational state, package and VNFD ids, external
//! connectivity, and the package's integrity against the pinned checksum.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::nfvo::{Api, Interface};
use super::{path_segment, Sm, SmError};
use crate::sol::{NsInstance, NS_FIELDS};

impl Sm {
    /// Query NS, then each VNF package once.
    pub async fn status(&self) -> Result<Value, SmError> {
        // Every page, with vnfInstance (excluded by default, SOL 005 6.4.2.3.2): a view that
        // cannot be read completely is an error, not a shorter status.
        let ns_instances: Vec<NsInstance> = self
            .nfvo
            .get_list(
                Interface::StatusInfo,
                Api::NsLcm,
                &format!("/ns_instances?{NS_FIELDS}"),
            )
            .await?;
        let mut vnfs: BTreeMap<String, Value> = BTreeMap::new();
        let mut ns_list = Vec::new();
        for ns in &ns_instances {
            let mut members = Vec::new();
            for vnf in ns.vnf_instance.iter().flatten() {
                members.push(vnf.id.clone());
                let entry = vnfs.entry(vnf.id.clone()).or_insert_with(|| {
                    let info = vnf.instantiated_vnf_info.clone().unwrap_or_default();
                    json!({
                        "vnfInstanceId": vnf.id,
                        "vnfInstanceName": vnf.vnf_instance_name,
                        "nsInstanceIds": [],
                        "instantiationState": vnf.instantiation_state,
                        "vnfState": info.vnf_state,
                        "vnfPkgId": vnf.vnf_pkg_id,
                        "vnfdId": vnf.vnfd_id,
                        "vnfProductName": vnf.vnf_product_name,
                        "vnfSoftwareVersion": vnf.vnf_software_version,
                        "extVirtualLinkInfo": info.ext_virtual_link_info,
                    })
                });
                if let Some(list) = entry["nsInstanceIds"].as_array_mut() {
                    list.push(json!(ns.id));
                }
            }
            ns_list.push(json!({
                "nsInstanceId": ns.id,
                "nsInstanceName": ns.ns_instance_name,
                "nsState": ns.ns_state,
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
            "telemetry": self.telemetry.to_json(),
            "nsInstances": ns_list,
            "vnfs": vnfs.into_values().collect::<Vec<_>>(),
            // Sc-Vi: hosts (with the VNFs on them) and zones; null without [sm.vim].
            "vim": crate::vim::admin::status_summary(self, &ns_instances).await,
        }))
    }
}
