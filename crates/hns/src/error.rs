//! Errors of the HNS backend. An HRESULT is shown with its name, the
//! documented meaning, and what HNS said in the error record, so a failure
//! reads as a sentence rather than a number.

use proxyctl_policy::PolicyError;
use thiserror::Error;

use crate::convert::ReadBackError;
use crate::schema::{ErrorRecord, Version};

/// The HNS version that introduced L4WFPPROXY (hcsshim `L4WfpProxyPolicyVersion`).
pub const L4WFPPROXY_MIN_VERSION: Version = Version {
    major: 13,
    minor: 2,
};

#[derive(Debug, Error)]
pub enum HnsError {
    /// The policy is malformed or HNS cannot express it; nothing was sent.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// No HNS API on this host (or PROXYCTL_HNS_LIBRARY is unusable).
    #[error("HNS API unavailable: {0}")]
    Unavailable(String),
    /// An API call failed; `message` names the call, the HRESULT and HNS's words.
    #[error("{message}")]
    Call {
        function: &'static str,
        hresult: u32,
        record: Option<String>,
        message: String,
    },
    #[error(
        "HNS {found} is too old: L4WFPPROXY policies need HNS {L4WFPPROXY_MIN_VERSION} or newer \
         (Windows Server 2022); nothing was changed"
    )]
    TooOld { found: Version },
    #[error("`{0}` is not an HNS id (a GUID like 93f86a7f-e361-4362-b8a4-81bbb6a622dd)")]
    BadGuid(String),
    #[error("HNS returned a {what} proxyctl cannot parse: {message}")]
    BadResponse { what: &'static str, message: String },
    #[error(transparent)]
    ReadBack(#[from] ReadBackError),
    #[error("container {container}: {message}")]
    Lookup { container: String, message: String },
    /// Replacing the endpoint's policy failed and so did putting the old one back.
    #[error("{add}; restoring the previous policy failed too: {rollback}")]
    RollbackFailed {
        add: Box<HnsError>,
        rollback: Box<HnsError>,
    },
}

impl HnsError {
    pub(crate) fn call(function: &'static str, hresult: i32, record: Option<String>) -> Self {
        let hresult = hresult as u32;
        let (name, meaning) = describe_hresult(hresult);
        let mut message = format!("{function} failed: {name} (0x{hresult:08X}): {meaning}");
        if let Some(text) = record.as_deref().filter(|t| !t.trim().is_empty()) {
            let parsed = ErrorRecord::parse(text);
            let said = parsed.error.trim();
            if !said.is_empty() && said != meaning {
                message.push_str(&format!("; HNS says: {said}"));
            }
        }
        Self::Call {
            function,
            hresult,
            record,
            message,
        }
    }

    /// The HRESULT of a failed call, if this is one.
    pub fn hresult(&self) -> Option<u32> {
        match self {
            Self::Call { hresult, .. } => Some(*hresult),
            Self::RollbackFailed { add, .. } => add.hresult(),
            _ => None,
        }
    }
}

pub const HCN_E_ENDPOINT_NOT_FOUND: u32 = 0x803B_0002;
pub const HCN_E_POLICY_NOT_FOUND: u32 = 0x803B_0008;
pub const HCN_E_INVALID_POLICY: u32 = 0x803B_000D;
pub const HCN_E_INVALID_POLICY_TYPE: u32 = 0x803B_000E;
pub const HCN_E_POLICY_ALREADY_EXISTS: u32 = 0x803B_0012;
pub const HCN_E_INVALID_JSON: u32 = 0x803B_001B;

/// Name and documented meaning of an HRESULT (HCN's own codes from the HCN
/// reference, plus the generic ones HNS returns most).
pub fn describe_hresult(hresult: u32) -> (&'static str, &'static str) {
    match hresult {
        0x803B_0001 => ("HCN_E_NETWORK_NOT_FOUND", "the network was not found"),
        HCN_E_ENDPOINT_NOT_FOUND => ("HCN_E_ENDPOINT_NOT_FOUND", "the endpoint was not found"),
        0x803B_0003 => (
            "HCN_E_LAYER_NOT_FOUND",
            "the network's underlying layer was not found",
        ),
        0x803B_0007 => ("HCN_E_PORT_NOT_FOUND", "the switch-port was not found"),
        HCN_E_POLICY_NOT_FOUND => ("HCN_E_POLICY_NOT_FOUND", "an expected policy was not found"),
        0x803B_000C => (
            "HCN_E_INVALID_ENDPOINT",
            "the provided endpoint configuration is invalid or missing parameters",
        ),
        HCN_E_INVALID_POLICY => (
            "HCN_E_INVALID_POLICY",
            "the provided policy configuration is invalid or missing parameters",
        ),
        HCN_E_INVALID_POLICY_TYPE => ("HCN_E_INVALID_POLICY_TYPE", "invalid policy type"),
        0x803B_000F => (
            "HCN_E_INVALID_REMOTE_ENDPOINT_OPERATION",
            "this requested operation is invalid for a remote endpoint",
        ),
        HCN_E_POLICY_ALREADY_EXISTS => (
            "HCN_E_POLICY_ALREADY_EXISTS",
            "a policy configuration has already been created or applied",
        ),
        0x803B_0015 => (
            "HCN_E_REQUEST_UNSUPPORTED",
            "the requested operation is not supported",
        ),
        0x803B_0019 => ("HCN_E_GUID_CONVERSION_FAILURE", "GUID conversion failed"),
        HCN_E_INVALID_JSON => ("HCN_E_INVALID_JSON", "invalid JSON document string"),
        0x803B_001C => (
            "HCN_E_INVALID_JSON_REFERENCE",
            "the reference in the JSON document is invalid",
        ),
        0x803B_0020 => ("HCN_E_MANAGER_STOPPED", "the HNS service is not running"),
        0x803B_002C => (
            "HCN_E_ENTITY_HAS_REFERENCES",
            "the entity is in use by another object",
        ),
        0x8000_4001 => ("E_NOTIMPL", "not implemented"),
        0x8000_4003 => ("E_POINTER", "invalid pointer"),
        0x8000_4005 => ("E_FAIL", "unspecified failure"),
        0x8007_0005 => ("E_ACCESSDENIED", "access denied (run as Administrator)"),
        0x8007_000E => ("E_OUTOFMEMORY", "out of memory"),
        0x8007_0057 => ("E_INVALIDARG", "one or more arguments are invalid"),
        0x8007_0490 => ("ERROR_NOT_FOUND", "element not found"),
        _ => ("HRESULT", "unknown error code"),
    }
}
