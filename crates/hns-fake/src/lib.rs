//! A strict fake of the HCN C API, for tests on hosts without HNS.
//!
//! It exports the computenetwork.dll functions proxyctl uses, the HNS v1
//! `HNSCall` (version query) and `CoTaskMemFree`, with the same C ABI, and
//! enforces the documented contract instead of trusting the caller:
//! - every JSON document is parsed against hcsshim's schema with unknown
//!   fields refused (as HNS does: `HCN_E_INVALID_JSON`, "Invalid JSON
//!   document string. {{Field,UnknownField}}"), wrong types refused, ports
//!   as decimal strings, TCP ("6") and IPv4 only;
//! - an endpoint holds several L4WFPPROXY policies (WFP orders them by
//!   `FilterTuple.Priority`, the filter weight; neither hcsshim's schema, whose
//!   request carries a `Policies` array, nor its tests show a one-per-endpoint
//!   limit: "one proxy per pod" was hcnproxyctl's own limit). Adding a policy
//!   identical to one already held is refused with
//!   `HCN_E_POLICY_ALREADY_EXISTS` — stricter than HNS may be, so a client
//!   must replace, never duplicate;
//! - input strings must be NUL-terminated valid UTF-16, ids valid GUIDs;
//! - errors are HRESULTs plus an error record
//!   `{"Success":false,"Error":"...","ErrorCode":N}`;
//! - every out-string is tracked until `CoTaskMemFree`, every handle until
//!   closed, so tests can assert nothing leaked (`HnsFakeOutstandingStrings`,
//!   `HnsFakeOpenHandles`, `HnsFakeBadFrees`).
//!
//! State (HNS version, endpoints, namespaces, injected failures, and a log
//! of every modify request received) lives in a JSON file named by
//! `HnsFakeSetStateFile` or the PROXYCTL_HNS_FAKE_STATE environment
//! variable, re-read on every call and written back atomically, so several
//! processes (CLI tests) see one HNS.

#![allow(non_snake_case)]
// Every export's safety contract is that of the C API it fakes (valid
// pointers, NUL-terminated strings, handles from the matching Open call),
// stated once in the module docs above rather than on each function.
#![allow(clippy::missing_safety_doc)]

use std::collections::HashMap;
use std::ffi::{CStr, c_char, c_void};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use serde_json::Value;

type HResult = i32;
type PWStr = *mut u16;

const S_OK: HResult = 0;
const E_POINTER: u32 = 0x8000_4003;
const E_FAIL: u32 = 0x8000_4005;
const E_HANDLE: u32 = 0x8007_0006;
const E_NOTIMPL: u32 = 0x8000_4001;
const HCN_E_ENDPOINT_NOT_FOUND: u32 = 0x803B_0002;
const HCN_E_POLICY_NOT_FOUND: u32 = 0x803B_0008;
const HCN_E_INVALID_POLICY: u32 = 0x803B_000D;
const HCN_E_INVALID_POLICY_TYPE: u32 = 0x803B_000E;
const HCN_E_POLICY_ALREADY_EXISTS: u32 = 0x803B_0012;
const HCN_E_GUID_CONVERSION_FAILURE: u32 = 0x803B_0019;
const HCN_E_INVALID_JSON: u32 = 0x803B_001B;
/// HNS's "element not found" for a namespace (hcsshim maps it to not-found).
const ERROR_NOT_FOUND_HR: u32 = 0x8007_0490;

/// Environment variable naming the state file when none was set by call.
pub const STATE_ENV: &str = "PROXYCTL_HNS_FAKE_STATE";
/// Longest input string accepted, in UTF-16 units.
const MAX_INPUT: usize = 1 << 20;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct State {
    #[serde(rename = "Version")]
    version: Version,
    #[serde(rename = "Endpoints", default)]
    endpoints: Vec<Endpoint>,
    #[serde(rename = "Namespaces", default)]
    namespaces: Vec<Namespace>,
    /// Failures to return from the next call of a function, consumed in order.
    #[serde(rename = "Inject", default)]
    inject: Vec<Injected>,
    /// Every settings document HcnModifyEndpoint received, accepted or not.
    #[serde(rename = "ModifyRequests", default)]
    modify_requests: Vec<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Version {
    #[serde(rename = "Major")]
    major: u32,
    #[serde(rename = "Minor")]
    minor: u32,
}

impl Default for Version {
    fn default() -> Self {
        Self {
            major: 15,
            minor: 4,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Endpoint {
    #[serde(rename = "ID")]
    id: String,
    #[serde(rename = "Name", default)]
    name: String,
    #[serde(rename = "HostComputeNamespace", default)]
    namespace: String,
    #[serde(rename = "Policies", default)]
    policies: Vec<Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Namespace {
    #[serde(rename = "ID")]
    id: String,
    #[serde(rename = "Endpoints", default)]
    endpoints: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Injected {
    #[serde(rename = "Function")]
    function: String,
    #[serde(rename = "HResult")]
    hresult: u32,
    #[serde(rename = "Error", default)]
    error: String,
    /// Calls of `function` to let through before failing.
    #[serde(rename = "Skip", default)]
    skip: u32,
}

// ---- the schema, written independently of the client from hcsshim's hcn package ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModifyEndpointSettingRequest {
    #[serde(rename = "ResourceType")]
    resource_type: String,
    #[serde(rename = "RequestType")]
    request_type: String,
    #[serde(rename = "Settings")]
    settings: PolicyEndpointRequest,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyEndpointRequest {
    #[serde(rename = "Policies")]
    policies: Vec<EndpointPolicy>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointPolicy {
    #[serde(rename = "Type")]
    policy_type: String,
    #[serde(rename = "Settings", default)]
    settings: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct L4WfpProxyPolicySetting {
    #[serde(rename = "InboundProxyPort", default)]
    inbound_proxy_port: Option<String>,
    #[serde(rename = "OutboundProxyPort", default)]
    outbound_proxy_port: Option<String>,
    #[serde(rename = "FilterTuple", default)]
    filter_tuple: Option<FiveTuple>,
    #[serde(rename = "UserSID", default)]
    user_sid: Option<String>,
    #[serde(rename = "InboundExceptions", default)]
    inbound_exceptions: Option<ProxyExceptions>,
    #[serde(rename = "OutboundExceptions", default)]
    outbound_exceptions: Option<ProxyExceptions>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FiveTuple {
    #[serde(rename = "Protocols", default)]
    protocols: Option<String>,
    #[serde(rename = "LocalAddresses", default)]
    local_addresses: Option<String>,
    #[serde(rename = "RemoteAddresses", default)]
    remote_addresses: Option<String>,
    #[serde(rename = "LocalPorts", default)]
    local_ports: Option<String>,
    #[serde(rename = "RemotePorts", default)]
    remote_ports: Option<String>,
    #[serde(rename = "Priority", default)]
    priority: Option<u16>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ProxyExceptions {
    #[serde(rename = "IpAddressExceptions", default)]
    ip_address_exceptions: Option<Vec<String>>,
    #[serde(rename = "PortExceptions", default)]
    port_exceptions: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HostComputeQuery {
    #[serde(rename = "SchemaVersion")]
    schema_version: Version,
    #[serde(rename = "Flags", default)]
    flags: Option<u32>,
    #[serde(rename = "Filter", default)]
    filter: Option<String>,
}

// ---- process-wide bookkeeping ----

#[derive(Clone)]
enum Kind {
    Endpoint,
    Namespace,
}

#[derive(Default)]
struct Books {
    state_file: Option<PathBuf>,
    handles: HashMap<usize, (Kind, String)>,
    next_handle: usize,
    strings: HashMap<usize, usize>,
    bad_frees: u64,
}

static BOOKS: Mutex<Option<Books>> = Mutex::new(None);

fn with_books<T>(f: impl FnOnce(&mut Books) -> T) -> T {
    let mut guard = BOOKS.lock().unwrap_or_else(|e| e.into_inner());
    f(guard.get_or_insert_with(Books::default))
}

/// An HCN failure: HRESULT plus the message for the error record.
struct Fail(u32, String);

type Outcome<T> = Result<T, Fail>;

fn fail<T>(hr: u32, message: impl Into<String>) -> Outcome<T> {
    Err(Fail(hr, message.into()))
}

fn state_path(books: &Books) -> Outcome<PathBuf> {
    books
        .state_file
        .clone()
        .or_else(|| std::env::var_os(STATE_ENV).map(PathBuf::from))
        .ok_or_else(|| {
            Fail(
                E_FAIL,
                format!("fake HNS: no state file (HnsFakeSetStateFile or {STATE_ENV})"),
            )
        })
}

fn load(books: &Books) -> Outcome<State> {
    let path = state_path(books)?;
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Fail(E_FAIL, format!("fake HNS: {}: {e}", path.display())))?;
    let state: State = serde_json::from_str(&text)
        .map_err(|e| Fail(E_FAIL, format!("fake HNS: state {}: {e}", path.display())))?;
    for id in state
        .endpoints
        .iter()
        .map(|e| &e.id)
        .chain(state.namespaces.iter().map(|n| &n.id))
    {
        parse_guid(id)?;
    }
    Ok(state)
}

fn save(books: &Books, state: &State) -> Outcome<()> {
    let path = state_path(books)?;
    let tmp = path.with_extension("tmp");
    let text = serde_json::to_string_pretty(state).map_err(|e| Fail(E_FAIL, e.to_string()))?;
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| Fail(E_FAIL, format!("fake HNS: {}: {e}", path.display())))
}

/// Runs one API call against the state, consuming an injected failure first.
fn call<T>(function: &str, f: impl FnOnce(&mut Books, &mut State) -> Outcome<T>) -> Outcome<T> {
    with_books(|books| {
        let mut state = load(books)?;
        if let Some(i) = state.inject.iter().position(|i| i.function == function) {
            if state.inject[i].skip > 0 {
                state.inject[i].skip -= 1;
            } else {
                let injected = state.inject.remove(i);
                save(books, &state)?;
                return fail(injected.hresult, injected.error);
            }
        }
        let result = f(books, &mut state);
        save(books, &state)?;
        result
    })
}

fn parse_guid(text: &str) -> Outcome<String> {
    let t = text.trim();
    let t = t
        .strip_prefix('{')
        .and_then(|x| x.strip_suffix('}'))
        .unwrap_or(t);
    let groups: Vec<&str> = t.split('-').collect();
    let ok = groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()));
    if ok {
        Ok(t.to_ascii_lowercase())
    } else {
        fail(
            HCN_E_GUID_CONVERSION_FAILURE,
            format!("GUID conversion failed: `{text}`"),
        )
    }
}

/// The binary GUID layout of `GUID` (Data1, Data2, Data3, Data4[8]).
#[repr(C)]
pub struct Guid {
    data1: u32,
    data2: u16,
    data3: u16,
    data4: [u8; 8],
}

unsafe fn read_guid(ptr: *const Guid) -> Outcome<String> {
    if ptr.is_null() {
        return fail(E_POINTER, "null GUID pointer");
    }
    // SAFETY: caller passes a pointer to a GUID.
    let g = unsafe { &*ptr };
    let d = g.data4;
    Ok(format!(
        "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        g.data1, g.data2, g.data3, d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]
    ))
}

/// A NUL-terminated UTF-16 input, strictly decoded.
unsafe fn read_wide(ptr: *const u16, what: &str) -> Outcome<String> {
    if ptr.is_null() {
        return fail(E_POINTER, format!("null {what}"));
    }
    let mut len = 0;
    // SAFETY: the caller passes a NUL-terminated string; bounded by MAX_INPUT.
    unsafe {
        while *ptr.add(len) != 0 {
            len += 1;
            if len > MAX_INPUT {
                return fail(HCN_E_INVALID_JSON, format!("{what}: no NUL terminator"));
            }
        }
        String::from_utf16(std::slice::from_raw_parts(ptr, len))
            .or_else(|e| fail(HCN_E_INVALID_JSON, format!("{what}: invalid UTF-16: {e}")))
    }
}

/// Allocates an out-string the caller must release with `CoTaskMemFree`.
fn alloc_string(books: &mut Books, text: &str) -> PWStr {
    let units: Box<[u16]> = text.encode_utf16().chain(std::iter::once(0)).collect();
    let len = units.len();
    let ptr = Box::into_raw(units) as *mut u16;
    books.strings.insert(ptr as usize, len);
    ptr
}

/// Hands `text` to the caller through `out` (ignored when `out` is null).
unsafe fn set_out(books: &mut Books, out: *mut PWStr, text: &str) {
    if !out.is_null() {
        // SAFETY: non-null out-pointer from the caller.
        unsafe { *out = alloc_string(books, text) };
    }
}

fn error_record(Fail(hr, message): &Fail) -> String {
    serde_json::json!({"Success": false, "Error": message, "ErrorCode": hr}).to_string()
}

/// Ends a call: HRESULT, and on failure the error record in `record`.
unsafe fn finish(result: Outcome<()>, record: *mut PWStr) -> HResult {
    match result {
        Ok(()) => S_OK,
        Err(f) => {
            // SAFETY: caller's out-pointer (optional).
            with_books(|books| unsafe { set_out(books, record, &error_record(&f)) });
            f.0 as HResult
        }
    }
}

fn invalid_json(what: &str, e: serde_json::Error) -> Fail {
    let text = e.to_string();
    // Mirror HNS's wording for unknown fields: {{Field,UnknownField}}.
    let message = match text
        .strip_prefix("unknown field `")
        .and_then(|r| r.split('`').next())
    {
        Some(field) => format!("Invalid JSON document string. {{{{{field},UnknownField}}}}"),
        None => format!("Invalid JSON document string. {what}: {text}"),
    };
    Fail(HCN_E_INVALID_JSON, message)
}

fn parse_query(text: &str) -> Outcome<HostComputeQuery> {
    if text.is_empty() {
        return Ok(HostComputeQuery {
            schema_version: Version { major: 2, minor: 0 },
            flags: None,
            filter: None,
        });
    }
    let q: HostComputeQuery = serde_json::from_str(text).map_err(|e| invalid_json("query", e))?;
    if q.schema_version.major != 2 {
        return fail(
            HCN_E_INVALID_JSON,
            format!("unsupported schema version {}", q.schema_version.major),
        );
    }
    let _ = q.flags;
    Ok(q)
}

fn new_handle(books: &mut Books, kind: Kind, id: String) -> usize {
    books.next_handle += 0x10;
    let h = 0x1000 + books.next_handle;
    books.handles.insert(h, (kind, id));
    h
}

fn handle_id(books: &Books, handle: *mut c_void, want: Kind) -> Outcome<String> {
    match books.handles.get(&(handle as usize)) {
        Some((kind, id)) if std::mem::discriminant(kind) == std::mem::discriminant(&want) => {
            Ok(id.clone())
        }
        _ => fail(E_HANDLE, "invalid handle"),
    }
}

fn endpoint_mut<'s>(state: &'s mut State, id: &str) -> Outcome<&'s mut Endpoint> {
    state
        .endpoints
        .iter_mut()
        .find(|e| e.id.eq_ignore_ascii_case(id))
        .ok_or_else(|| {
            Fail(
                HCN_E_ENDPOINT_NOT_FOUND,
                "The endpoint was not found.".into(),
            )
        })
}

fn endpoint_json(e: &Endpoint) -> String {
    serde_json::json!({
        "ID": e.id.to_ascii_lowercase(),
        "Name": e.name,
        "HostComputeNetwork": "00000000-0000-0000-0000-000000000000",
        "HostComputeNamespace": e.namespace,
        "Policies": e.policies,
        "SchemaVersion": {"Major": 2, "Minor": 0},
    })
    .to_string()
}

// ---- validation of L4WFPPROXY settings ----

fn invalid_policy<T>(message: impl Into<String>) -> Outcome<T> {
    fail(HCN_E_INVALID_POLICY, message)
}

fn check_port(field: &str, text: &str) -> Outcome<()> {
    match text.parse::<u32>() {
        Ok(1..=65535) if !text.starts_with('+') => Ok(()),
        _ => invalid_policy(format!("{field}: `{text}` is not a port")),
    }
}

fn check_port_or_range(field: &str, text: &str) -> Outcome<()> {
    match text.split_once('-') {
        Some((a, b)) => {
            check_port(field, a)?;
            check_port(field, b)?;
            if a.parse::<u32>().ok() > b.parse::<u32>().ok() {
                return invalid_policy(format!("{field}: range `{text}` is reversed"));
            }
            Ok(())
        }
        None => check_port(field, text),
    }
}

fn check_ipv4_or_prefix(field: &str, text: &str) -> Outcome<()> {
    let (addr, len) = match text.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (text, None),
    };
    if addr.parse::<Ipv4Addr>().is_err() {
        return invalid_policy(format!(
            "{field}: `{text}` is not an IPv4 address (L4WFPPROXY is IPv4 only)"
        ));
    }
    if let Some(len) = len
        && !matches!(len.parse::<u8>(), Ok(0..=32))
    {
        return invalid_policy(format!("{field}: bad prefix length in `{text}`"));
    }
    Ok(())
}

fn check_list(
    field: &str,
    text: &Option<String>,
    check: fn(&str, &str) -> Outcome<()>,
) -> Outcome<()> {
    if let Some(text) = text {
        for item in text.split(',') {
            check(field, item)?;
        }
    }
    Ok(())
}

fn check_setting(value: &Value) -> Outcome<()> {
    let s: L4WfpProxyPolicySetting =
        serde_json::from_value(value.clone()).map_err(|e| invalid_json("L4WFPPROXY", e))?;
    if s.inbound_proxy_port.is_none() && s.outbound_proxy_port.is_none() {
        return invalid_policy("InboundProxyPort or OutboundProxyPort is required");
    }
    if let Some(p) = &s.inbound_proxy_port {
        check_port("InboundProxyPort", p)?;
    }
    if let Some(p) = &s.outbound_proxy_port {
        check_port("OutboundProxyPort", p)?;
    }
    let t = s.filter_tuple.unwrap_or_default();
    if let Some(p) = &t.protocols
        && p != "6"
    {
        return invalid_policy(format!("Protocols `{p}`: only TCP (6) is supported"));
    }
    check_list("LocalAddresses", &t.local_addresses, check_ipv4_or_prefix)?;
    check_list("RemoteAddresses", &t.remote_addresses, check_ipv4_or_prefix)?;
    check_list("LocalPorts", &t.local_ports, check_port_or_range)?;
    check_list("RemotePorts", &t.remote_ports, check_port_or_range)?;
    let _ = t.priority;
    if let Some(sid) = &s.user_sid {
        let parts: Vec<&str> = sid.split('-').collect();
        let ok = parts.len() >= 3
            && parts[0] == "S"
            && parts[1] == "1"
            && parts[2..]
                .iter()
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
        if !ok {
            return invalid_policy(format!("UserSID `{sid}` is not a SID"));
        }
    }
    for (name, ex) in [
        ("InboundExceptions", &s.inbound_exceptions),
        ("OutboundExceptions", &s.outbound_exceptions),
    ] {
        if let Some(ex) = ex {
            for ip in ex.ip_address_exceptions.iter().flatten() {
                check_ipv4_or_prefix(name, ip)?;
            }
            for port in ex.port_exceptions.iter().flatten() {
                check_port_or_range(name, port)?;
            }
        }
    }
    Ok(())
}

fn modify(state: &mut State, endpoint_id: &str, text: &str) -> Outcome<()> {
    state.modify_requests.push(text.to_owned());
    let request: ModifyEndpointSettingRequest =
        serde_json::from_str(text).map_err(|e| invalid_json("ModifyEndpointSettingRequest", e))?;
    if request.resource_type != "Policy" {
        return fail(
            E_NOTIMPL,
            format!(
                "fake HNS: ResourceType `{}` is not supported",
                request.resource_type
            ),
        );
    }
    let old_hns = (state.version.major, state.version.minor) < (13, 2);
    let mut incoming = Vec::new();
    for p in &request.settings.policies {
        if p.policy_type != "L4WFPPROXY" || old_hns {
            return fail(
                HCN_E_INVALID_POLICY_TYPE,
                format!("Invalid policy type: {}", p.policy_type),
            );
        }
        let settings = p.settings.clone().unwrap_or(Value::Null);
        check_setting(&settings)?;
        incoming.push(serde_json::json!({"Type": p.policy_type, "Settings": settings}));
    }
    let endpoint = endpoint_mut(state, endpoint_id)?;
    let mut policies = endpoint.policies.clone();
    match request.request_type.as_str() {
        "Add" => {
            for p in incoming {
                if policies.contains(&p) {
                    return fail(
                        HCN_E_POLICY_ALREADY_EXISTS,
                        "This policy already exists on the endpoint.",
                    );
                }
                policies.push(p);
            }
        }
        "Remove" => {
            for p in incoming {
                let i = policies.iter().position(|q| *q == p).ok_or_else(|| {
                    Fail(
                        HCN_E_POLICY_NOT_FOUND,
                        "An expected policy was not found.".into(),
                    )
                })?;
                policies.remove(i);
            }
        }
        "Update" | "Refresh" => {
            return fail(
                E_NOTIMPL,
                format!(
                    "fake HNS: RequestType `{}` is not supported",
                    request.request_type
                ),
            );
        }
        other => {
            return fail(
                HCN_E_INVALID_JSON,
                format!("Invalid JSON document string. RequestType `{other}`"),
            );
        }
    }
    endpoint.policies = policies;
    Ok(())
}

// ---- the exported API ----

#[unsafe(no_mangle)]
pub unsafe extern "system" fn HcnOpenEndpoint(
    id: *const Guid,
    endpoint: *mut *mut c_void,
    record: *mut PWStr,
) -> HResult {
    let result = call("HcnOpenEndpoint", |books, state| {
        // SAFETY: pointer from the caller, checked for null.
        let id = unsafe { read_guid(id) }?;
        if endpoint.is_null() {
            return fail(E_POINTER, "null endpoint out-pointer");
        }
        let found = endpoint_mut(state, &id)?.id.to_ascii_lowercase();
        let h = new_handle(books, Kind::Endpoint, found);
        // SAFETY: checked non-null.
        unsafe { *endpoint = h as *mut c_void };
        Ok(())
    });
    // SAFETY: optional out-pointer from the caller.
    unsafe { finish(result, record) }
}

/// Closes a handle of the given kind; a handle of another kind, or one
/// already closed, is refused as HNS does.
fn close_handle(handle: *mut c_void, kind: Kind) -> HResult {
    let result = with_books(|books| {
        handle_id(books, handle, kind)?;
        books.handles.remove(&(handle as usize));
        Ok(())
    });
    // SAFETY: no record for Close.
    unsafe { finish(result, std::ptr::null_mut()) }
}

#[unsafe(no_mangle)]
pub unsafe extern "system" fn HcnCloseEndpoint(endpoint: *mut c_void) -> HResult {
    close_handle(endpoint, Kind::Endpoint)
}

#[unsafe(no_mangle)]
pub unsafe extern "system" fn HcnModifyEndpoint(
    endpoint: *mut c_void,
    settings: *const u16,
    record: *mut PWStr,
) -> HResult {
    let result = call("HcnModifyEndpoint", |books, state| {
        let id = handle_id(books, endpoint, Kind::Endpoint)?;
        // SAFETY: caller's string, checked for null and terminator.
        let text = unsafe { read_wide(settings, "Settings") }?;
        modify(state, &id, &text)
    });
    // SAFETY: optional out-pointer from the caller.
    unsafe { finish(result, record) }
}

#[unsafe(no_mangle)]
pub unsafe extern "system" fn HcnQueryEndpointProperties(
    endpoint: *mut c_void,
    query: *const u16,
    properties: *mut PWStr,
    record: *mut PWStr,
) -> HResult {
    let result = call("HcnQueryEndpointProperties", |books, state| {
        let id = handle_id(books, endpoint, Kind::Endpoint)?;
        let query = if query.is_null() {
            String::new()
        } else {
            // SAFETY: caller's non-null string.
            unsafe { read_wide(query, "Query") }?
        };
        parse_query(&query)?;
        if properties.is_null() {
            return fail(E_POINTER, "null properties out-pointer");
        }
        let json = endpoint_json(endpoint_mut(state, &id)?);
        // SAFETY: checked non-null.
        unsafe { set_out(books, properties, &json) };
        Ok(())
    });
    // SAFETY: optional out-pointer from the caller.
    unsafe { finish(result, record) }
}

#[unsafe(no_mangle)]
pub unsafe extern "system" fn HcnEnumerateEndpoints(
    query: *const u16,
    endpoints: *mut PWStr,
    record: *mut PWStr,
) -> HResult {
    let result = call("HcnEnumerateEndpoints", |books, state| {
        // SAFETY: caller's string, checked for null.
        let query = unsafe { read_wide(query, "Query") }?;
        let query = parse_query(&query)?;
        let wanted = match query.filter.as_deref().filter(|f| !f.is_empty()) {
            None => None,
            Some(filter) => {
                let map: HashMap<String, String> =
                    serde_json::from_str(filter).map_err(|e| invalid_json("Filter", e))?;
                match map.get("ID") {
                    Some(id) => Some(parse_guid(id)?),
                    None => return fail(E_NOTIMPL, "fake HNS: only an ID filter is supported"),
                }
            }
        };
        if endpoints.is_null() {
            return fail(E_POINTER, "null endpoints out-pointer");
        }
        let ids: Vec<String> = state
            .endpoints
            .iter()
            .map(|e| e.id.to_ascii_lowercase())
            .filter(|id| wanted.as_ref().is_none_or(|w| w == id))
            .collect();
        let json = serde_json::to_string(&ids).map_err(|e| Fail(E_FAIL, e.to_string()))?;
        // SAFETY: checked non-null.
        unsafe { set_out(books, endpoints, &json) };
        Ok(())
    });
    // SAFETY: optional out-pointer from the caller.
    unsafe { finish(result, record) }
}

#[unsafe(no_mangle)]
pub unsafe extern "system" fn HcnOpenNamespace(
    id: *const Guid,
    namespace: *mut *mut c_void,
    record: *mut PWStr,
) -> HResult {
    let result = call("HcnOpenNamespace", |books, state| {
        // SAFETY: pointer from the caller, checked for null.
        let id = unsafe { read_guid(id) }?;
        if namespace.is_null() {
            return fail(E_POINTER, "null namespace out-pointer");
        }
        if !state
            .namespaces
            .iter()
            .any(|n| n.id.eq_ignore_ascii_case(&id))
        {
            return fail(ERROR_NOT_FOUND_HR, "Element not found.");
        }
        let h = new_handle(books, Kind::Namespace, id);
        // SAFETY: checked non-null.
        unsafe { *namespace = h as *mut c_void };
        Ok(())
    });
    // SAFETY: optional out-pointer from the caller.
    unsafe { finish(result, record) }
}

#[unsafe(no_mangle)]
pub unsafe extern "system" fn HcnCloseNamespace(namespace: *mut c_void) -> HResult {
    close_handle(namespace, Kind::Namespace)
}

#[unsafe(no_mangle)]
pub unsafe extern "system" fn HcnQueryNamespaceProperties(
    namespace: *mut c_void,
    query: *const u16,
    properties: *mut PWStr,
    record: *mut PWStr,
) -> HResult {
    let result = call("HcnQueryNamespaceProperties", |books, state| {
        let id = handle_id(books, namespace, Kind::Namespace)?;
        let query = if query.is_null() {
            String::new()
        } else {
            // SAFETY: caller's non-null string.
            unsafe { read_wide(query, "Query") }?
        };
        parse_query(&query)?;
        if properties.is_null() {
            return fail(E_POINTER, "null properties out-pointer");
        }
        let ns = state
            .namespaces
            .iter()
            .find(|n| n.id.eq_ignore_ascii_case(&id))
            .ok_or_else(|| Fail(ERROR_NOT_FOUND_HR, "Element not found.".into()))?;
        let resources: Vec<Value> = ns
            .endpoints
            .iter()
            .map(|e| serde_json::json!({"Type": "Endpoint", "Data": {"ID": e}}))
            .collect();
        let json = serde_json::json!({
            "ID": ns.id, "Type": "HostDefault", "Resources": resources,
            "SchemaVersion": {"Major": 2, "Minor": 0},
        })
        .to_string();
        // SAFETY: checked non-null.
        unsafe { set_out(books, properties, &json) };
        Ok(())
    });
    // SAFETY: optional out-pointer from the caller.
    unsafe { finish(result, record) }
}

/// The HNS v1 entry point of vmcompute.dll; the fake answers `GET /globals/version`.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn HNSCall(
    method: *const u16,
    path: *const u16,
    object: *const u16,
    response: *mut PWStr,
) -> HResult {
    let result = call("HNSCall", |books, state| {
        // SAFETY: caller's strings, checked for null and terminators.
        let (method, path, _object) = unsafe {
            (
                read_wide(method, "method")?,
                read_wide(path, "path")?,
                read_wide(object, "object")?,
            )
        };
        if response.is_null() {
            return fail(E_POINTER, "null response out-pointer");
        }
        let body = if method == "GET" && path == "/globals/version" {
            serde_json::json!({"Success": true, "Error": "",
                "Output": {"Major": state.version.major, "Minor": state.version.minor}})
        } else {
            serde_json::json!({"Success": false,
                "Error": format!("fake HNS: {method} {path} is not supported")})
        };
        // SAFETY: checked non-null.
        unsafe { set_out(books, response, &body.to_string()) };
        Ok(())
    });
    match result {
        Ok(()) => S_OK,
        Err(Fail(hr, _)) => hr as HResult,
    }
}

/// Releases an out-string. Pointers the fake did not hand out (or already
/// took back) are counted as bad frees instead of corrupting memory.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn CoTaskMemFree(ptr: *mut c_void) {
    if ptr.is_null() {
        return;
    }
    let len = with_books(|b| {
        let len = b.strings.remove(&(ptr as usize));
        if len.is_none() {
            b.bad_frees += 1;
        }
        len
    });
    if let Some(len) = len {
        // SAFETY: allocated by `alloc_string` as a boxed slice of `len` units.
        drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(ptr as *mut u16, len)) });
    }
}

// ---- test-only controls ----

/// Uses `path` (UTF-8, NUL-terminated) as the state file of this instance.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn HnsFakeSetStateFile(path: *const c_char) {
    let path = if path.is_null() {
        None
    } else {
        // SAFETY: caller's NUL-terminated string.
        Some(PathBuf::from(
            unsafe { CStr::from_ptr(path) }
                .to_string_lossy()
                .into_owned(),
        ))
    };
    with_books(|b| b.state_file = path);
}

/// Out-strings handed out and not yet released with `CoTaskMemFree`.
#[unsafe(no_mangle)]
pub extern "C" fn HnsFakeOutstandingStrings() -> u64 {
    with_books(|b| b.strings.len() as u64)
}

/// Handles opened and not yet closed.
#[unsafe(no_mangle)]
pub extern "C" fn HnsFakeOpenHandles() -> u64 {
    with_books(|b| b.handles.len() as u64)
}

/// `CoTaskMemFree` calls with a pointer the fake did not hand out.
#[unsafe(no_mangle)]
pub extern "C" fn HnsFakeBadFrees() -> u64 {
    with_books(|b| b.bad_frees)
}
