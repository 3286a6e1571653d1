//! The `ModifyEndpointSettingRequest` documents sent to `HcnModifyEndpoint`.

use serde::Serialize;
use serde_json::value::RawValue;

use crate::schema::{
    EndpointPolicy, L4WFPPROXY, L4WfpProxyPolicySetting, ModifyEndpointSettingRequest,
    PolicyEndpointRequest, RawEndpointPolicy, RequestType,
};

/// `ResourceType` of endpoint policy requests.
pub const RESOURCE_TYPE_POLICY: &str = "Policy";

fn request<S: Serialize>(request_type: RequestType, settings: S) -> String {
    serde_json::to_string(&ModifyEndpointSettingRequest {
        resource_type: RESOURCE_TYPE_POLICY,
        request_type,
        settings,
    })
    .expect("these documents always serialize")
}

/// The Add request for these settings, as hcsshim's `ApplyPolicy(Add, ...)` sends it.
pub fn add_request(settings: &[L4WfpProxyPolicySetting]) -> String {
    request(
        RequestType::Add,
        PolicyEndpointRequest {
            policies: settings
                .iter()
                .map(|s| EndpointPolicy {
                    policy_type: L4WFPPROXY,
                    settings: s,
                })
                .collect(),
        },
    )
}

/// A Remove request naming policies exactly as HNS returned them
/// (hcnproxyctl's `ClearPolicies` does the same).
pub fn remove_request(policies: &[RawEndpointPolicy]) -> String {
    request(
        RequestType::Remove,
        PolicyEndpointRequest {
            policies: policies.to_vec(),
        },
    )
}

/// The settings of a policy HNS returned, verbatim (`{}` when absent).
pub fn raw_settings(policy: &RawEndpointPolicy) -> &str {
    policy
        .settings
        .as_deref()
        .map(RawValue::get)
        .unwrap_or("{}")
}
