//! `Hcn`: the HCN API loaded with libloading, and the hcnproxyctl-shaped
//! operations on top of it (add, list, clear, endpoint from container).
//!
//! Every out-string is released with `CoTaskMemFree` (through [`OutString`])
//! and every handle is closed, on success and on error.

use std::ptr;

use libloading::Library;
use proxyctl_policy::{Policy, PolicyError};
use serde::de::DeserializeOwned;

use crate::convert::{from_setting, to_setting};
use crate::error::{HnsError, L4WFPPROXY_MIN_VERSION};
use crate::ffi::{
    CloseFn, EnumerateFn, FreeFn, Guid, Handle, HnsCallFn, LIBRARY_ENV, LibraryNames, ModifyFn,
    OpenFn, OutString, PWStr, QueryFn, wide,
};
use crate::request::{add_request, raw_settings, remove_request};
use crate::schema::{
    HnsResponse, HostComputeEndpoint, HostComputeNamespace, HostComputeQuery, L4WFPPROXY,
    L4WfpProxyPolicySetting, ModifyEndpointSettingRequest, NamespaceResourceEndpoint,
    PolicyEndpointRequest, RawEndpointPolicy, RequestType, Version,
};

/// Finds the network namespace (an HNS namespace GUID) of a container; the
/// CRI client implements this (`ContainerStatus` verbose ->
/// `info.runtimeSpec.windows.network.networkNamespace`), tests use closures.
pub trait ContainerNamespace {
    fn network_namespace(&self, container: &str) -> Result<String, String>;
}

impl<F: Fn(&str) -> Result<String, String>> ContainerNamespace for F {
    fn network_namespace(&self, container: &str) -> Result<String, String> {
        self(container)
    }
}

struct Api {
    open_endpoint: OpenFn,
    close_endpoint: CloseFn,
    modify_endpoint: ModifyFn,
    query_endpoint: QueryFn,
    enumerate_endpoints: EnumerateFn,
    open_namespace: OpenFn,
    close_namespace: CloseFn,
    query_namespace: QueryFn,
    hns_call: HnsCallFn,
    free: FreeFn,
}

/// A loaded HCN API. Function pointers stay valid while `_libraries` lives.
pub struct Hcn {
    api: Api,
    _libraries: Vec<Library>,
}

fn load_library(path: &str) -> Result<Library, HnsError> {
    // SAFETY: loading runs the library's initialisers; we load only the
    // system HCN DLLs or the library the operator named in PROXYCTL_HNS_LIBRARY.
    unsafe { Library::new(path) }
        .map_err(|e| HnsError::Unavailable(format!("cannot load {path}: {e}")))
}

fn symbol<T: Copy>(library: &Library, path: &str, name: &str) -> Result<T, HnsError> {
    // SAFETY: `T` is the documented signature of `name` (see ffi.rs).
    unsafe { library.get::<T>(name.as_bytes()) }
        .map(|s| *s)
        .map_err(|e| HnsError::Unavailable(format!("{path} does not export {name}: {e}")))
}

impl Hcn {
    /// Loads the API from PROXYCTL_HNS_LIBRARY, or the system DLLs on Windows.
    pub fn load() -> Result<Self, HnsError> {
        let names = LibraryNames::from_env().ok_or_else(|| {
            HnsError::Unavailable(format!(
                "HNS exists on Windows only; elsewhere set {LIBRARY_ENV} to a library \
                 exporting the HCN API (tests use the proxyctl-hns-fake library)"
            ))
        })?;
        Self::load_from(&names)
    }

    pub fn load_from(names: &LibraryNames) -> Result<Self, HnsError> {
        let mut libraries: Vec<(String, Library)> = Vec::new();
        for path in [&names.hcn, &names.hns_call, &names.co_task_mem_free] {
            if !libraries.iter().any(|(p, _)| p == path) {
                libraries.push((path.clone(), load_library(path)?));
            }
        }
        let lib = |path: &String| {
            &libraries
                .iter()
                .find(|(p, _)| p == path)
                .expect("loaded above")
                .1
        };
        let (hcn, hcn_path) = (lib(&names.hcn), names.hcn.as_str());
        let api = Api {
            open_endpoint: symbol(hcn, hcn_path, "HcnOpenEndpoint")?,
            close_endpoint: symbol(hcn, hcn_path, "HcnCloseEndpoint")?,
            modify_endpoint: symbol(hcn, hcn_path, "HcnModifyEndpoint")?,
            query_endpoint: symbol(hcn, hcn_path, "HcnQueryEndpointProperties")?,
            enumerate_endpoints: symbol(hcn, hcn_path, "HcnEnumerateEndpoints")?,
            open_namespace: symbol(hcn, hcn_path, "HcnOpenNamespace")?,
            close_namespace: symbol(hcn, hcn_path, "HcnCloseNamespace")?,
            query_namespace: symbol(hcn, hcn_path, "HcnQueryNamespaceProperties")?,
            hns_call: symbol(lib(&names.hns_call), &names.hns_call, "HNSCall")?,
            free: symbol(
                lib(&names.co_task_mem_free),
                &names.co_task_mem_free,
                "CoTaskMemFree",
            )?,
        };
        Ok(Self {
            api,
            _libraries: libraries.into_iter().map(|(_, l)| l).collect(),
        })
    }

    fn out(&self, ptr: PWStr) -> OutString {
        // SAFETY: `ptr` was just returned by the API as an out-string.
        unsafe { OutString::new(ptr, self.api.free) }
    }

    /// hcsshim's `checkForErrors`: a failing HRESULT or a non-empty error
    /// record is an error. The record is freed either way.
    fn check(&self, function: &'static str, hr: i32, record: PWStr) -> Result<(), HnsError> {
        let record = self.out(record);
        let text = record.text().unwrap_or_else(|e| format!("<{e}>"));
        if hr < 0 || !text.trim().is_empty() {
            let hr = if hr < 0 { hr } else { 0x8000_4005u32 as i32 };
            return Err(HnsError::call(
                function,
                hr,
                Some(text).filter(|t| !t.is_empty()),
            ));
        }
        Ok(())
    }

    fn parse<T: DeserializeOwned>(what: &'static str, text: &str) -> Result<T, HnsError> {
        serde_json::from_str(text).map_err(|e| HnsError::BadResponse {
            what,
            message: format!("{e} in {text}"),
        })
    }

    /// The HNS version, read as hcsshim's `GetGlobals` does
    /// (`HNSCall("GET", "/globals/version", "")`).
    pub fn version(&self) -> Result<Version, HnsError> {
        let (method, path, body) = (wide("GET"), wide("/globals/version"), wide(""));
        let (method, path, body) = (method.unwrap(), path.unwrap(), body.unwrap());
        let mut response: PWStr = ptr::null_mut();
        // SAFETY: NUL-terminated UTF-16 inputs; `response` receives an
        // out-string that `OutString` frees.
        let hr = unsafe {
            (self.api.hns_call)(method.as_ptr(), path.as_ptr(), body.as_ptr(), &mut response)
        };
        let response = self.out(response);
        if hr < 0 {
            return Err(HnsError::call("HNSCall(GET /globals/version)", hr, None));
        }
        let text = response.text().map_err(|message| HnsError::BadResponse {
            what: "version response",
            message,
        })?;
        let response: HnsResponse = Self::parse("version response", &text)?;
        if !response.success {
            return Err(HnsError::BadResponse {
                what: "version response",
                message: format!("HNS failed with error: {}", response.error),
            });
        }
        let output = response.output.ok_or_else(|| HnsError::BadResponse {
            what: "version response",
            message: "no Output".into(),
        })?;
        Self::parse("version", output.get())
    }

    /// Refuses (before anything is sent) on an HNS without L4WFPPROXY.
    pub fn require_l4wfpproxy(&self) -> Result<Version, HnsError> {
        let found = self.version()?;
        if found < L4WFPPROXY_MIN_VERSION {
            return Err(HnsError::TooOld { found });
        }
        Ok(found)
    }

    fn open_endpoint(&self, id: &str) -> Result<EndpointHandle<'_>, HnsError> {
        let guid: Guid = id.parse().map_err(|_| HnsError::BadGuid(id.to_owned()))?;
        let mut handle: Handle = ptr::null_mut();
        let mut record: PWStr = ptr::null_mut();
        // SAFETY: valid GUID pointer and out-pointers.
        let hr = unsafe { (self.api.open_endpoint)(&guid, &mut handle, &mut record) };
        self.check("HcnOpenEndpoint", hr, record)?;
        Ok(EndpointHandle { hcn: self, handle })
    }

    fn query(
        &self,
        function: &'static str,
        query: QueryFn,
        handle: Handle,
    ) -> Result<String, HnsError> {
        let text = serde_json::to_string(&HostComputeQuery::v2()).expect("serializable");
        let text = wide(&text).expect("JSON holds no NUL");
        let (mut properties, mut record): (PWStr, PWStr) = (ptr::null_mut(), ptr::null_mut());
        // SAFETY: open handle, NUL-terminated query, out-pointers.
        let hr = unsafe { query(handle, text.as_ptr(), &mut properties, &mut record) };
        let properties = self.out(properties);
        self.check(function, hr, record)?;
        properties.text().map_err(|message| HnsError::BadResponse {
            what: "properties document",
            message,
        })
    }

    /// The endpoint's properties (hcsshim `GetEndpointByID`, by handle).
    pub fn endpoint(&self, id: &str) -> Result<HostComputeEndpoint, HnsError> {
        let handle = self.open_endpoint(id)?;
        let text = self.query(
            "HcnQueryEndpointProperties",
            self.api.query_endpoint,
            handle.handle,
        )?;
        handle.close()?;
        Self::parse("endpoint", &text)
    }

    /// Ids of every endpoint on the host (`HcnEnumerateEndpoints`).
    pub fn endpoint_ids(&self) -> Result<Vec<String>, HnsError> {
        let text = serde_json::to_string(&HostComputeQuery::v2()).expect("serializable");
        let text = wide(&text).expect("JSON holds no NUL");
        let (mut list, mut record): (PWStr, PWStr) = (ptr::null_mut(), ptr::null_mut());
        // SAFETY: NUL-terminated query and out-pointers.
        let hr = unsafe { (self.api.enumerate_endpoints)(text.as_ptr(), &mut list, &mut record) };
        let list = self.out(list);
        self.check("HcnEnumerateEndpoints", hr, record)?;
        let text = list.text().map_err(|message| HnsError::BadResponse {
            what: "endpoint list",
            message,
        })?;
        Self::parse("endpoint list", &text)
    }

    fn modify(&self, handle: &EndpointHandle<'_>, request: &str) -> Result<(), HnsError> {
        tracing::debug!(request, "HcnModifyEndpoint");
        let text = wide(request).expect("JSON holds no NUL");
        let mut record: PWStr = ptr::null_mut();
        // SAFETY: open handle, NUL-terminated settings, out-pointer.
        let hr = unsafe { (self.api.modify_endpoint)(handle.handle, text.as_ptr(), &mut record) };
        self.check("HcnModifyEndpoint", hr, record)
    }

    fn proxy_policies(endpoint: &HostComputeEndpoint) -> Vec<RawEndpointPolicy> {
        endpoint
            .policies
            .iter()
            .filter(|p| p.policy_type == L4WFPPROXY)
            .cloned()
            .collect()
    }

    /// Programs `policy` on the endpoint (hcnproxyctl `AddPolicy`), next to
    /// the proxy policies already there; one with the same match and
    /// priority is replaced (see [`Hcn::add_policies`]).
    pub fn add_policy(&self, endpoint: &str, policy: &Policy) -> Result<(), HnsError> {
        self.add_policies(endpoint, std::slice::from_ref(policy))
    }

    /// Programs `policies` on the endpoint. An endpoint holds several
    /// L4WFPPROXY policies, ordered by `FilterTuple.Priority` (the WFP filter
    /// weight); on HNS a policy has no name, so its identity is its match
    /// (the whole FilterTuple, priority included). An existing policy with
    /// the same identity as a new one is replaced; the others stay.
    ///
    /// Replacing takes two requests, because HNS offers no single request
    /// that swaps one endpoint policy for another (hcsshim documents no
    /// semantics for RequestType `Update` on endpoint policies): a Remove of
    /// the policies being replaced, then one Add of all new ones. If the
    /// Add is refused, the removed policies are added back (and a failed
    /// restore is reported as such). Between the two requests, traffic the
    /// replaced policy matched is briefly not redirected, and a crash there
    /// leaves it removed; a plain add (nothing replaced) is one request.
    pub fn add_policies(&self, endpoint: &str, policies: &[Policy]) -> Result<(), HnsError> {
        let settings = settings_of(policies)?;
        let request = add_request(&settings);
        let _: Guid = endpoint
            .parse()
            .map_err(|_| HnsError::BadGuid(endpoint.to_owned()))?;
        self.require_l4wfpproxy()?;
        let handle = self.open_endpoint(endpoint)?;
        let text = self.query(
            "HcnQueryEndpointProperties",
            self.api.query_endpoint,
            handle.handle,
        )?;
        let current: HostComputeEndpoint = Self::parse("endpoint", &text)?;
        let replaced: Vec<RawEndpointPolicy> = Self::proxy_policies(&current)
            .into_iter()
            .filter(|raw| {
                identity_of(raw).is_some_and(|id| settings.iter().any(|s| s.filter_tuple == id))
            })
            .collect();
        if !replaced.is_empty() {
            self.modify(&handle, &remove_request(&replaced))?;
        }
        if let Err(add) = self.modify(&handle, &request) {
            if !replaced.is_empty() {
                let restore = serde_json::to_string(&ModifyEndpointSettingRequest {
                    resource_type: crate::request::RESOURCE_TYPE_POLICY,
                    request_type: RequestType::Add,
                    settings: PolicyEndpointRequest { policies: replaced },
                })
                .expect("serializable");
                if let Err(rollback) = self.modify(&handle, &restore) {
                    return Err(HnsError::RollbackFailed {
                        add: Box::new(add),
                        rollback: Box::new(rollback),
                    });
                }
            }
            return Err(add);
        }
        handle.close()
    }

    /// The L4WFPPROXY policies on the endpoint, read back from HNS.
    pub fn list_policies(&self, endpoint: &str) -> Result<Vec<Policy>, HnsError> {
        let current = self.endpoint(endpoint)?;
        Self::proxy_policies(&current)
            .iter()
            .map(|raw| {
                let setting: L4WfpProxyPolicySetting =
                    Self::parse("L4WFPPROXY policy", raw_settings(raw))?;
                Ok(from_setting(&setting)?)
            })
            .collect()
    }

    /// Removes every L4WFPPROXY policy of the endpoint in one request and
    /// returns how many there were (nothing is sent when there are none).
    pub fn clear_policies(&self, endpoint: &str) -> Result<usize, HnsError> {
        let handle = self.open_endpoint(endpoint)?;
        let text = self.query(
            "HcnQueryEndpointProperties",
            self.api.query_endpoint,
            handle.handle,
        )?;
        let current: HostComputeEndpoint = Self::parse("endpoint", &text)?;
        let existing = Self::proxy_policies(&current);
        if !existing.is_empty() {
            self.modify(&handle, &remove_request(&existing))?;
        }
        handle.close()?;
        Ok(existing.len())
    }

    /// The endpoint ids of a network namespace (hcsshim `GetNamespaceEndpointIds`).
    pub fn namespace_endpoints(&self, namespace: &str) -> Result<Vec<String>, HnsError> {
        let guid: Guid = namespace
            .parse()
            .map_err(|_| HnsError::BadGuid(namespace.to_owned()))?;
        let mut handle: Handle = ptr::null_mut();
        let mut record: PWStr = ptr::null_mut();
        // SAFETY: valid GUID pointer and out-pointers.
        let hr = unsafe { (self.api.open_namespace)(&guid, &mut handle, &mut record) };
        self.check("HcnOpenNamespace", hr, record)?;
        let queried = self.query(
            "HcnQueryNamespaceProperties",
            self.api.query_namespace,
            handle,
        );
        // SAFETY: closing the handle opened above, once.
        let closed = unsafe { (self.api.close_namespace)(handle) };
        let text = queried?;
        self.check("HcnCloseNamespace", closed, ptr::null_mut())?;
        let ns: HostComputeNamespace = Self::parse("namespace", &text)?;
        ns.resources
            .iter()
            .filter(|r| r.resource_type == "Endpoint")
            .map(|r| {
                let data = r.data.as_deref().map(|d| d.get()).unwrap_or("null");
                Self::parse::<NamespaceResourceEndpoint>("namespace resource", data).map(|e| e.id)
            })
            .collect()
    }

    /// The HNS endpoint(s) a container is attached to (hcnproxyctl
    /// `GetEndpointFromContainer`): its network namespace from CRI, then
    /// that namespace's endpoints. Errors when there is none.
    pub fn endpoint_from_container(
        &self,
        container: &str,
        cri: &dyn ContainerNamespace,
    ) -> Result<Vec<String>, HnsError> {
        let lookup = |message: String| HnsError::Lookup {
            container: container.to_owned(),
            message,
        };
        let namespace = cri.network_namespace(container).map_err(lookup)?;
        let ids = self.namespace_endpoints(&namespace)?;
        if ids.is_empty() {
            return Err(lookup(format!(
                "no HNS endpoint is attached to its network namespace {namespace}"
            )));
        }
        Ok(ids)
    }
}

/// The identity of a policy HNS holds: its FilterTuple as proxyctl would
/// write it (so that `10.0.0.4` and `10.0.0.4/32`, or ports in another
/// order, are the same match). `None` for a policy proxyctl cannot read
/// back, which is then never replaced.
fn identity_of(raw: &RawEndpointPolicy) -> Option<crate::schema::FiveTuple> {
    let setting: L4WfpProxyPolicySetting = serde_json::from_str(raw_settings(raw)).ok()?;
    let policy = from_setting(&setting).ok()?;
    to_setting(&policy).ok().map(|s| s.filter_tuple)
}

/// Every policy's settings; refuses an empty set, anything HNS cannot
/// express, and two policies with the same match and priority (HNS would
/// hold two WFP filters of equal weight matching the same traffic, and
/// which proxy wins would be undefined).
fn settings_of(policies: &[Policy]) -> Result<Vec<L4WfpProxyPolicySetting>, PolicyError> {
    if policies.is_empty() {
        return Err(PolicyError::invalid("file", "holds no policy"));
    }
    let settings = policies
        .iter()
        .map(to_setting)
        .collect::<Result<Vec<_>, _>>()?;
    for (i, s) in settings.iter().enumerate() {
        if settings[..i]
            .iter()
            .any(|t| t.filter_tuple == s.filter_tuple)
        {
            return Err(PolicyError::conflict(
                "priority",
                format!(
                    "not supported by HNS: policies {} and {} have the same match and priority \
                     {}; on HNS a policy is identified by its match and priority, so give them \
                     different --priority values",
                    settings[..i]
                        .iter()
                        .position(|t| t.filter_tuple == s.filter_tuple)
                        .unwrap_or(0)
                        + 1,
                    i + 1,
                    s.filter_tuple.priority
                ),
            ));
        }
    }
    Ok(settings)
}

/// The exact Add request `add_policies` would send, without any I/O: every
/// policy is validated and everything HNS cannot express is refused.
/// (When a policy of the same match and priority is already on the
/// endpoint, a Remove of it precedes this request.)
pub fn dry_run(policies: &[Policy]) -> Result<String, PolicyError> {
    Ok(add_request(&settings_of(policies)?))
}

/// An open endpoint handle, closed on drop (or explicitly, to see errors).
struct EndpointHandle<'a> {
    hcn: &'a Hcn,
    handle: Handle,
}

impl EndpointHandle<'_> {
    fn close(mut self) -> Result<(), HnsError> {
        let handle = std::mem::replace(&mut self.handle, ptr::null_mut());
        // SAFETY: closing the handle opened by `open_endpoint`, once.
        let hr = unsafe { (self.hcn.api.close_endpoint)(handle) };
        self.hcn.check("HcnCloseEndpoint", hr, ptr::null_mut())
    }
}

impl Drop for EndpointHandle<'_> {
    fn drop(&mut self) {
        if !self.handle.is_null() {
            // SAFETY: as in `close`; errors on this path are already being reported.
            unsafe { (self.hcn.api.close_endpoint)(self.handle) };
        }
    }
}
