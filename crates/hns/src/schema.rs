//! The HNS JSON documents this backend sends and reads, spelled exactly as
//! hcsshim's `hcn` package marshals them (field names, field order, Go's
//! `omitempty` rules), so a request is byte-for-byte what hcsshim (and so
//! hcnproxyctl) would send for the same policy.
//!
//! Go's `omitempty` drops empty strings, zero numbers and empty slices but
//! never a struct: `FilterTuple` and both exception objects are always
//! present, possibly as `{}`.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The endpoint policy type of a WFP-based layer-4 proxy (not the VFP `L4Proxy`).
pub const L4WFPPROXY: &str = "L4WFPPROXY";

/// `hcn.L4WfpProxyPolicySetting`. Ports are strings, as in hcsshim.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct L4WfpProxyPolicySetting {
    #[serde(
        rename = "InboundProxyPort",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub inbound_proxy_port: String,
    /// Read also from `Port`, its name before the 2020-12 inbound/outbound
    /// split (hcnproxyctl's first releases wrote that); always written as
    /// `OutboundProxyPort`.
    #[serde(
        rename = "OutboundProxyPort",
        alias = "Port",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub outbound_proxy_port: String,
    #[serde(rename = "FilterTuple", default)]
    pub filter_tuple: FiveTuple,
    #[serde(rename = "UserSID", default, skip_serializing_if = "String::is_empty")]
    pub user_sid: String,
    #[serde(rename = "InboundExceptions", default)]
    pub inbound_exceptions: ProxyExceptions,
    #[serde(rename = "OutboundExceptions", default)]
    pub outbound_exceptions: ProxyExceptions,
}

/// `hcn.FiveTuple`: what traffic the proxy policy applies to. Priority (the
/// WFP filter weight) lives here, not at the top level.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FiveTuple {
    #[serde(
        rename = "Protocols",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub protocols: String,
    #[serde(
        rename = "LocalAddresses",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub local_addresses: String,
    #[serde(
        rename = "RemoteAddresses",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub remote_addresses: String,
    #[serde(
        rename = "LocalPorts",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub local_ports: String,
    #[serde(
        rename = "RemotePorts",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub remote_ports: String,
    #[serde(rename = "Priority", default, skip_serializing_if = "is_zero")]
    pub priority: u16,
}

fn is_zero(n: &u16) -> bool {
    *n == 0
}

/// `hcn.ProxyExceptions`: traffic never proxied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyExceptions {
    #[serde(
        rename = "IpAddressExceptions",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub ip_address_exceptions: Vec<String>,
    #[serde(
        rename = "PortExceptions",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub port_exceptions: Vec<String>,
}

/// `hcn.EndpointPolicy` as sent: `{"Type": ..., "Settings": {...}}`.
#[derive(Debug, Clone, Serialize)]
pub struct EndpointPolicy<'a, S: Serialize> {
    #[serde(rename = "Type")]
    pub policy_type: &'a str,
    #[serde(rename = "Settings")]
    pub settings: S,
}

/// An endpoint policy as HNS returns it; `Settings` is kept verbatim so a
/// Remove request can name the policy exactly as HNS stored it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RawEndpointPolicy {
    #[serde(rename = "Type")]
    pub policy_type: String,
    #[serde(rename = "Settings", default, skip_serializing_if = "Option::is_none")]
    pub settings: Option<Box<RawValue>>,
}

/// `hcn.PolicyEndpointRequest`.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyEndpointRequest<P: Serialize> {
    #[serde(rename = "Policies")]
    pub policies: Vec<P>,
}

/// `hcn.RequestType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestType {
    Add,
    Remove,
    Update,
    Refresh,
}

/// `hcn.ModifyEndpointSettingRequest` with `ResourceType` "Policy".
#[derive(Debug, Clone, Serialize)]
pub struct ModifyEndpointSettingRequest<S: Serialize> {
    #[serde(rename = "ResourceType")]
    pub resource_type: &'static str,
    #[serde(rename = "RequestType")]
    pub request_type: RequestType,
    #[serde(rename = "Settings")]
    pub settings: S,
}

/// `hcn.SchemaVersion` / `hcn.Version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Version {
    #[serde(rename = "Major")]
    pub major: u32,
    #[serde(rename = "Minor")]
    pub minor: u32,
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// `hcn.HostComputeQuery` (Flags and Filter are omitempty).
#[derive(Debug, Clone, Serialize)]
pub struct HostComputeQuery {
    #[serde(rename = "SchemaVersion")]
    pub schema_version: Version,
    #[serde(rename = "Flags", skip_serializing_if = "is_zero_u32")]
    pub flags: u32,
    #[serde(rename = "Filter", skip_serializing_if = "String::is_empty")]
    pub filter: String,
}

fn is_zero_u32(n: &u32) -> bool {
    *n == 0
}

impl HostComputeQuery {
    /// hcsshim's `defaultQuery()`: schema 2.0, no flags, no filter.
    pub fn v2() -> Self {
        Self {
            schema_version: Version { major: 2, minor: 0 },
            flags: 0,
            filter: String::new(),
        }
    }
}

/// The part of `hcn.HostComputeEndpoint` this backend reads; HNS returns
/// many more properties, which are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct HostComputeEndpoint {
    #[serde(rename = "ID", default)]
    pub id: String,
    #[serde(rename = "Name", default)]
    pub name: String,
    #[serde(rename = "HostComputeNamespace", default)]
    pub host_compute_namespace: String,
    #[serde(rename = "Policies", default)]
    pub policies: Vec<RawEndpointPolicy>,
}

/// The part of `hcn.HostComputeNamespace` this backend reads.
#[derive(Debug, Clone, Deserialize)]
pub struct HostComputeNamespace {
    #[serde(rename = "ID", default)]
    pub id: String,
    #[serde(rename = "Resources", default)]
    pub resources: Vec<NamespaceResource>,
}

/// `hcn.NamespaceResource`: `Type` "Endpoint" carries `Data: {"ID": ...}`.
#[derive(Debug, Clone, Deserialize)]
pub struct NamespaceResource {
    #[serde(rename = "Type")]
    pub resource_type: String,
    #[serde(rename = "Data", default)]
    pub data: Option<Box<RawValue>>,
}

/// `hcn.NamespaceResourceEndpoint`.
#[derive(Debug, Clone, Deserialize)]
pub struct NamespaceResourceEndpoint {
    #[serde(rename = "ID")]
    pub id: String,
}

/// The response document of the HNS v1 `HNSCall` (vmcompute.dll), used for
/// `GET /globals/version`.
#[derive(Debug, Clone, Deserialize)]
pub struct HnsResponse {
    #[serde(rename = "Success", default)]
    pub success: bool,
    #[serde(rename = "Error", default)]
    pub error: String,
    #[serde(rename = "Output", default)]
    pub output: Option<Box<RawValue>>,
}

/// The HCN error record (the `ErrorRecord` out-parameter), e.g.
/// `{"Success":false,"Error":"Invalid JSON document string. {{X,UnknownField}}","ErrorCode":2151350299}`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ErrorRecord {
    #[serde(rename = "Success", default)]
    pub success: bool,
    #[serde(rename = "Error", default)]
    pub error: String,
    #[serde(rename = "ErrorCode", default)]
    pub error_code: Option<u32>,
}

impl ErrorRecord {
    /// Parses a record; text that is not such a document is kept as the message.
    pub fn parse(text: &str) -> Self {
        serde_json::from_str(text).unwrap_or_else(|_| Self {
            success: false,
            error: text.trim().to_owned(),
            error_code: None,
        })
    }
}
