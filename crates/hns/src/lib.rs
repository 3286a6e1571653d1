//! proxyctl's Windows backend: redirect policies as HNS `L4WFPPROXY`
//! endpoint policies, programmed through the HCN C API (computenetwork.dll).
//!
//! - [`schema`]: the HNS JSON documents, spelled as hcsshim marshals them.
//! - [`convert`]: policy <-> `L4WfpProxyPolicySetting`, refusing what HNS
//!   cannot express (UDP, IPv6, uid/gid/user exclusions, DNAT, names, several SIDs).
//! - [`request`]: `ModifyEndpointSettingRequest` Add/Remove documents.
//! - [`Hcn`]: the API loaded with libloading and hcnproxyctl's operations
//!   (add, list, clear, endpoint from container); [`dry_run`] prints the
//!   exact request without any library.
//!
//! An endpoint holds several L4WFPPROXY policies (WFP orders them by
//! `FilterTuple.Priority`); with no name field in HNS, a policy's identity
//! is its FilterTuple (match and priority), and [`Hcn::add_policies`]
//! replaces the policy of the same identity (Remove, then Add).
//!
//! Containers reach [`Hcn::endpoint_from_container`] through a
//! [`ContainerNamespace`]; the CLI implements it with proxyctl-cri's
//! `container_network_namespace` (CRI `ContainerStatus` verbose ->
//! `runtimeSpec.windows.network.networkNamespace`).
//!
//! On Linux the same code runs against a library named by
//! `PROXYCTL_HNS_LIBRARY` (the strict fake in crates/hns-fake in tests),
//! and the CRI side against a strict Windows-shaped CRI server
//! (crates/cri/tests/support/windows_cri.rs: a Windows runtime spec cannot
//! exist on a Linux host, so the runtime's answers are the one canned part).

mod client;
pub mod convert;
mod error;
pub mod ffi;
pub mod request;
pub mod schema;

pub use client::{ContainerNamespace, Hcn, dry_run};
pub use convert::{ReadBackError, check_expressible, from_setting, to_setting};
pub use error::{
    HCN_E_ENDPOINT_NOT_FOUND, HCN_E_INVALID_JSON, HCN_E_INVALID_POLICY, HCN_E_INVALID_POLICY_TYPE,
    HCN_E_POLICY_ALREADY_EXISTS, HCN_E_POLICY_NOT_FOUND, HnsError, L4WFPPROXY_MIN_VERSION,
    describe_hresult,
};
pub use ffi::{Guid, LIBRARY_ENV, LibraryNames};
pub use schema::Version;

/// hcnproxyctl's `LocalSystemSID`: what `--usersid system` means.
pub const LOCAL_SYSTEM_SID: &str = "S-1-5-18";
