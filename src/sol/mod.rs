//! Typed ETSI GS NFV-SOL 005 v3.7.1 models of what the Security Manager reads from the NFVO.
//!
//! Only the attributes the SM uses are typed; every struct tolerates attributes it does not
//! know (serde ignores them), so a newer NFVO still parses. Attributes the NFVO may leave out
//! (cardinality 0..1, or excluded by the attribute selectors of SOL 013 5.3) are `Option` or
//! default to empty: a caller that needs one must ask for it (see [`NS_FIELDS`]).

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `fields` for GET /ns_instances: `vnfInstance` is one of the attributes SOL 005 6.4.2.3.2
/// excludes by default, and the SM needs it (the VNFs of each NS).
pub const NS_FIELDS: &str = "fields=vnfInstance";

/// SOL 005 6.5.2.10 NsInstance (subset).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NsInstance {
    pub id: String,
    #[serde(default)]
    pub ns_instance_name: Option<String>,
    #[serde(default)]
    pub ns_state: Option<String>,
    /// Absent when excluded (default) or when the NS has no VNF.
    #[serde(default)]
    pub vnf_instance: Option<Vec<VnfInstance>>,
}

/// SOL 005 6.5.3.57 VnfInstance (subset).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VnfInstance {
    pub id: String,
    #[serde(default)]
    pub vnf_instance_name: Option<String>,
    #[serde(default)]
    pub vnfd_id: String,
    #[serde(default)]
    pub vnf_pkg_id: String,
    #[serde(default)]
    pub vnf_product_name: Option<String>,
    #[serde(default)]
    pub vnf_software_version: Option<String>,
    /// INSTANTIATED or NOT_INSTANTIATED.
    pub instantiation_state: String,
    #[serde(default)]
    pub instantiated_vnf_info: Option<InstantiatedVnfInfo>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InstantiatedVnfInfo {
    #[serde(default)]
    pub flavour_id: Option<String>,
    #[serde(default)]
    pub vnf_state: Option<String>,
    #[serde(default)]
    pub ext_virtual_link_info: Vec<ExtVirtualLinkInfo>,
    /// The VNFC instances and their compute resources at the VIM (the Sc-Vi host map).
    #[serde(default)]
    pub vnfc_resource_info: Vec<VnfcResourceInfo>,
}

/// SOL 005 6.5.3.61 VnfcResourceInfo (subset).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VnfcResourceInfo {
    pub id: String,
    #[serde(default)]
    pub vdu_id: Option<String>,
    pub compute_resource: ResourceHandle,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExtVirtualLinkInfo {
    pub id: String,
    #[serde(default)]
    pub resource_handle: Option<ResourceHandle>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceHandle {
    #[serde(default)]
    pub resource_id: Option<String>,
    /// The VIM holding the resource, when the NFVO names it: `vimId` in SOL 005 v3.7.1
    /// (ResourceHandle, 6.5.3.59); `vimConnectionId` is the SOL 003 name, accepted too (and
    /// how records written before this read it).
    #[serde(
        default,
        rename = "vimId",
        alias = "vimConnectionId",
        skip_serializing_if = "Option::is_none"
    )]
    pub vim_connection_id: Option<String>,
    /// e.g. `OS::Nova::Server`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vim_level_resource_type: Option<String>,
}

/// SOL 005 6.5.2.3 NsLcmOpOcc (subset).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NsLcmOpOcc {
    pub id: String,
    pub operation_state: String,
    pub ns_instance_id: String,
    pub operation: String,
    /// Excluded from lists by `exclude_default`, and left out by some NFVOs anyway: read the
    /// single resource when it is needed.
    #[serde(default)]
    pub operation_params: Option<Value>,
    #[serde(default)]
    pub error: Option<ProblemDetails>,
    #[serde(default)]
    pub resource_changes: Option<ResourceChanges>,
}

impl NsLcmOpOcc {
    /// The operation ended successfully for the entities it names as COMPLETED.
    pub fn succeeded(&self) -> bool {
        matches!(
            self.operation_state.as_str(),
            "COMPLETED" | "PARTIALLY_COMPLETED"
        )
    }

    /// It failed for lack of authorization (IFA 033 Sc-Or.NsLcm.003).
    pub fn refused_as_unauthorized(&self) -> bool {
        matches!(
            self.operation_state.as_str(),
            "FAILED" | "FAILED_TEMP" | "ROLLED_BACK"
        ) && matches!(self.error.as_ref().and_then(|e| e.status), Some(401 | 403))
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceChanges {
    #[serde(default)]
    pub affected_vnfs: Vec<AffectedVnf>,
}

/// SOL 005 6.5.3.2 AffectedVnf (subset): in NsLcmOpOcc.resourceChanges and in the
/// notification's `affectedVnf`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AffectedVnf {
    pub vnf_instance_id: String,
    #[serde(default)]
    pub vnf_profile_id: Option<String>,
    /// ADD, REMOVE, INSTANTIATE, TERMINATE, SCALE, CHANGE_FLAVOUR, HEAL, OPERATE,
    /// MODIFY_INFORMATION, CHANGE_EXTERNAL_VNF_CONNECTIVITY, CHANGE_VNFPKG.
    #[serde(default)]
    pub change_type: Option<String>,
    /// COMPLETED, ROLLED_BACK or FAILED.
    #[serde(default)]
    pub change_result: Option<String>,
}

impl AffectedVnf {
    /// The VNF left the NS (REMOVE) or was terminated, and that change completed.
    pub fn removed(&self) -> bool {
        matches!(self.change_type.as_deref(), Some("REMOVE" | "TERMINATE"))
            && self.change_result.as_deref() == Some("COMPLETED")
    }
}

/// SOL 013 6.4 ProblemDetails.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProblemDetails {
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default)]
    pub status: Option<u16>,
    #[serde(default)]
    pub detail: Option<String>,
}

/// SOL 005 9.5.2.5 VnfPkgInfo (subset). `checksum` is excluded by default from lists, not
/// from the single resource the SM reads.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VnfPkgInfo {
    pub id: String,
    #[serde(default)]
    pub operational_state: Option<String>,
    #[serde(default)]
    pub onboarding_state: Option<String>,
    #[serde(default)]
    pub checksum: Option<Checksum>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Checksum {
    pub algorithm: String,
    pub hash: String,
}

/// SOL 005 6.5.2.4 LccnSubscription (subset).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LccnSubscription {
    pub id: String,
    pub callback_uri: String,
}

/// The NS LCM notifications (SOL 005 6.5.2.5-6.5.2.9) as one struct: the attributes the SM
/// reads, each present in the types that have it.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Notification {
    pub id: String,
    pub notification_type: String,
    #[serde(default)]
    pub subscription_id: Option<String>,
    #[serde(default)]
    pub ns_instance_id: Option<String>,
    /// NsLcmOperationOccurrenceNotification.
    #[serde(default)]
    pub ns_lcm_op_occ_id: Option<String>,
    #[serde(default)]
    pub notification_status: Option<String>,
    #[serde(default)]
    pub operation_state: Option<String>,
    #[serde(default)]
    pub operation: Option<String>,
    #[serde(default)]
    pub error: Option<ProblemDetails>,
    #[serde(default)]
    pub affected_vnf: Vec<AffectedVnf>,
    /// NsChangeNotification.
    #[serde(default)]
    pub ns_component_type: Option<String>,
    #[serde(default)]
    pub ns_component_id: Option<String>,
    #[serde(default)]
    pub lcm_op_occ_id_impacting_ns_component: Option<String>,
    #[serde(default)]
    pub lcm_op_name_impacting_ns_component: Option<String>,
}

impl Notification {
    /// The operation occurrence the notification is about or was caused by, whatever its
    /// type: how the SM recognises the effects of its own operations.
    pub fn op_occ_id(&self) -> Option<&str> {
        self.ns_lcm_op_occ_id
            .as_deref()
            .or(self.lcm_op_occ_id_impacting_ns_component.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::ResourceHandle;

    #[test]
    fn the_vim_of_a_resource_is_read_under_both_names() {
        let sol005: ResourceHandle =
            serde_json::from_str(r#"{"vimId":"vim-1","resourceId":"s-1"}"#).expect("SOL 005");
        assert_eq!(sol005.vim_connection_id.as_deref(), Some("vim-1"));
        let sol003: ResourceHandle =
            serde_json::from_str(r#"{"vimConnectionId":"vim-2","resourceId":"s-2"}"#)
                .expect("SOL 003");
        assert_eq!(sol003.vim_connection_id.as_deref(), Some("vim-2"));
        let written = serde_json::to_value(&sol005).expect("JSON");
        assert_eq!(written["vimId"], "vim-1");
    }
}
