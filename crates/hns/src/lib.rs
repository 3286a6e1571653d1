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
//! On Linux the same code runs against a library named by
//! `PROXYCTL_HNS_LIBRARY` (the strict fake in crates/hns-fake in tests).

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
