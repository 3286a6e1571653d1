//! The HCN client against the strict fake of the HCN C API: the same code
//! path as on Windows (libloading, UTF-16, GUIDs, HRESULTs, CoTaskMemFree).
//! Every test ends by checking that no out-string or handle leaked.

#[path = "../../hns-fake/harness.rs"]
mod harness;

use std::ffi::{CString, c_char, c_void};

use harness::{EMPTY_NAMESPACE, ENDPOINT, FakeHns, NAMESPACE, OTHER_ENDPOINT};
use proxyctl_hns::{
    HCN_E_ENDPOINT_NOT_FOUND, HCN_E_INVALID_JSON, HCN_E_INVALID_POLICY, Hcn, HnsError,
    LibraryNames, Version,
};
use proxyctl_policy::{Family, Policy, PortRange, Protocol};

/// The fake's own controls, loaded from the same library copy as the client,
/// so they see the client's bookkeeping.
struct Controls {
    lib: libloading::Library,
}

impl Controls {
    fn counter(&self, name: &str) -> u64 {
        // SAFETY: the fake exports these as `extern "C" fn() -> u64`.
        unsafe {
            (self
                .lib
                .get::<extern "C" fn() -> u64>(name.as_bytes())
                .unwrap())()
        }
    }

    /// No out-string left unfreed, no handle left open, no bad free.
    fn assert_clean(&self) {
        assert_eq!(
            self.counter("HnsFakeOutstandingStrings"),
            0,
            "unfreed out-strings"
        );
        assert_eq!(self.counter("HnsFakeOpenHandles"), 0, "unclosed handles");
        assert_eq!(
            self.counter("HnsFakeBadFrees"),
            0,
            "bad CoTaskMemFree calls"
        );
    }
}

fn connect(fake: &FakeHns) -> (Hcn, Controls) {
    let path = fake.library();
    // SAFETY: the fake library built for these tests.
    let lib = unsafe { libloading::Library::new(&path) }.unwrap();
    let state = CString::new(fake.state_file().to_str().unwrap()).unwrap();
    // SAFETY: exported by the fake with this signature.
    unsafe {
        let set = lib
            .get::<unsafe extern "C" fn(*const c_char)>(b"HnsFakeSetStateFile")
            .unwrap();
        set(state.as_ptr());
    }
    let hcn = Hcn::load_from(&LibraryNames::single(path.to_str().unwrap())).unwrap();
    (hcn, Controls { lib })
}

fn fixture() -> Policy {
    let mut p = Policy {
        family: Family::Ipv4,
        inbound_port: Some(80),
        outbound_port: Some(81),
        priority: 8,
        ..Policy::default()
    };
    p.matching.remote_addresses = vec!["10.0.0.4/32".parse().unwrap()];
    p.outbound_exceptions.cidrs = vec!["10.0.1.12/32".parse().unwrap()];
    p.outbound_exceptions.ports = vec![PortRange::single(81)];
    p.inbound_exceptions.cidrs = vec!["12.0.1.12/32".parse().unwrap()];
    p.inbound_exceptions.ports = vec![PortRange::single(8181)];
    p.exclude.sids = vec!["S-1-5-32-556".into()];
    p.checked().unwrap()
}

fn sidecar(port: u16) -> Policy {
    Policy {
        family: Family::Ipv4,
        outbound_port: Some(port),
        // The fake has no processes: no proxy of its own to loop.
        allow_proxy_loop: true,
        ..Policy::default()
    }
    .checked()
    .unwrap()
}

#[test]
fn add_list_clear_round_trip() {
    let fake = FakeHns::new(13, 2);
    let (hcn, controls) = connect(&fake);
    hcn.add_policy(ENDPOINT, &fixture()).unwrap();

    // HNS holds exactly the hcsshim-shaped settings, next to the foreign policy.
    let policies = fake.policies(ENDPOINT);
    assert_eq!(policies.len(), 2, "{policies:?}");
    assert_eq!(policies[0]["Type"], "OutBoundNAT");
    assert_eq!(policies[1]["Type"], "L4WFPPROXY");
    assert_eq!(
        policies[1]["Settings"],
        serde_json::json!({
            "InboundProxyPort": "80", "OutboundProxyPort": "81",
            "FilterTuple": {"Protocols": "6", "RemoteAddresses": "10.0.0.4", "Priority": 8},
            "UserSID": "S-1-5-32-556",
            "InboundExceptions": {"IpAddressExceptions": ["12.0.1.12"], "PortExceptions": ["8181"]},
            "OutboundExceptions": {"IpAddressExceptions": ["10.0.1.12"], "PortExceptions": ["81"]}
        })
    );
    assert_eq!(hcn.list_policies(ENDPOINT).unwrap(), vec![fixture()]);
    assert!(hcn.list_policies(OTHER_ENDPOINT).unwrap().is_empty());

    assert_eq!(hcn.clear_policies(ENDPOINT).unwrap(), 1);
    assert!(hcn.list_policies(ENDPOINT).unwrap().is_empty());
    assert_eq!(fake.policies(ENDPOINT).len(), 1, "the foreign policy stays");
    let sent = fake.modify_requests().len();
    assert_eq!(hcn.clear_policies(ENDPOINT).unwrap(), 0);
    assert_eq!(
        fake.modify_requests().len(),
        sent,
        "clearing nothing sends nothing"
    );
    controls.assert_clean();
}

#[test]
fn add_of_the_same_match_and_priority_replaces_that_policy() {
    let fake = FakeHns::new(15, 4);
    let (hcn, controls) = connect(&fake);
    hcn.add_policy(ENDPOINT, &sidecar(15001)).unwrap();
    assert_eq!(
        fake.modify_requests().len(),
        1,
        "a plain add is one request"
    );
    hcn.add_policy(ENDPOINT, &sidecar(15002)).unwrap();
    assert_eq!(hcn.list_policies(ENDPOINT).unwrap(), vec![sidecar(15002)]);
    let sent = fake.modify_requests();
    assert_eq!(sent.len(), 3, "replacing is a Remove then an Add: {sent:?}");
    assert!(sent[1].contains(r#""RequestType":"Remove""#) && sent[1].contains("15001"));
    assert!(sent[2].contains(r#""RequestType":"Add""#) && sent[2].contains("15002"));
    // Adding the very same policy again is a replacement too, never a
    // duplicate (the fake refuses duplicates).
    hcn.add_policy(ENDPOINT, &sidecar(15002)).unwrap();
    assert_eq!(hcn.list_policies(ENDPOINT).unwrap(), vec![sidecar(15002)]);
    controls.assert_clean();
}

/// A proxy with a priority and a match (like the model's several policies).
fn ranked(port: u16, priority: u16, remote_port: Option<u16>) -> Policy {
    let mut p = sidecar(port);
    p.priority = priority;
    p.matching.remote_ports = remote_port.map(PortRange::single).into_iter().collect();
    p.checked().unwrap()
}

#[test]
fn several_proxies_share_an_endpoint_and_replace_only_their_own_match() {
    let fake = FakeHns::new(15, 4);
    let (hcn, controls) = connect(&fake);
    let https = ranked(15001, 10, Some(443));
    let rest = ranked(15002, 20, None);
    let mut inbound = ranked(15006, 30, None);
    inbound.outbound_port = None;
    inbound.inbound_port = Some(15006);
    let inbound = inbound.checked().unwrap();
    hcn.add_policy(ENDPOINT, &https).unwrap();
    hcn.add_policies(ENDPOINT, &[rest.clone(), inbound.clone()])
        .unwrap();
    assert_eq!(
        hcn.list_policies(ENDPOINT).unwrap(),
        vec![https.clone(), rest.clone(), inbound.clone()]
    );
    assert_eq!(
        fake.policies(ENDPOINT).len(),
        4,
        "three proxies and the NAT policy"
    );
    assert_eq!(fake.modify_requests().len(), 2, "nothing was replaced");

    // Same match, same priority, another port: only that one is replaced.
    let https2 = ranked(15011, 10, Some(443));
    hcn.add_policy(ENDPOINT, &https2).unwrap();
    // Same port and match at another priority is another policy.
    let https_low = ranked(15001, 40, Some(443));
    hcn.add_policy(ENDPOINT, &https_low).unwrap();
    let mut listed = hcn.list_policies(ENDPOINT).unwrap();
    listed.sort_by_key(|p| p.priority);
    assert_eq!(listed, vec![https2, rest, inbound, https_low]);

    // A set holding two policies of one identity is refused, nothing sent.
    let before = fake.state();
    let err = hcn
        .add_policies(ENDPOINT, &[ranked(1, 5, None), ranked(2, 5, None)])
        .unwrap_err();
    assert!(
        matches!(&err, HnsError::Policy(e) if e.field() == Some("priority")),
        "{err}"
    );
    assert_eq!(fake.state(), before);

    assert_eq!(hcn.clear_policies(ENDPOINT).unwrap(), 4);
    assert_eq!(fake.policies(ENDPOINT).len(), 1, "the NAT policy stays");
    controls.assert_clean();
}

#[test]
fn failed_replacement_restores_the_previous_policy() {
    let fake = FakeHns::new(15, 4);
    let (hcn, controls) = connect(&fake);
    hcn.add_policy(ENDPOINT, &sidecar(15001)).unwrap();
    // Let the Remove through, fail the Add.
    fake.inject_after(
        "HcnModifyEndpoint",
        1,
        HCN_E_INVALID_POLICY,
        "WFP filter rejected",
    );
    let err = hcn.add_policy(ENDPOINT, &sidecar(15002)).unwrap_err();
    assert_eq!(err.hresult(), Some(HCN_E_INVALID_POLICY));
    assert!(err.to_string().contains("WFP filter rejected"), "{err}");
    assert_eq!(hcn.list_policies(ENDPOINT).unwrap(), vec![sidecar(15001)]);
    controls.assert_clean();
}

#[test]
fn refusals_send_nothing_and_change_nothing() {
    let fake = FakeHns::new(15, 4);
    let (hcn, controls) = connect(&fake);
    hcn.add_policy(ENDPOINT, &sidecar(15001)).unwrap();
    let before = fake.state();
    let mut cases: Vec<(&str, Vec<Policy>)> = Vec::new();
    let mut p = sidecar(8000);
    p.protocols = vec![Protocol::Udp];
    cases.push(("protocol", vec![p]));
    let mut p = sidecar(8000);
    p.family = Family::Both;
    cases.push(("family", vec![p]));
    let mut p = sidecar(8000);
    p.family = Family::Ipv6;
    cases.push(("family", vec![p]));
    let mut p = sidecar(8000);
    p.exclude.uids = vec![1337];
    cases.push(("exclude-uid", vec![p]));
    let mut p = sidecar(8000);
    p.exclude.users = vec!["envoy".into()];
    cases.push(("exclude-user", vec![p]));
    let mut p = sidecar(8000);
    p.destination_proxy = Some(proxyctl_policy::DestinationProxy {
        destination: "169.254.169.254:80".parse().unwrap(),
        proxy: "10.0.0.2:8080".parse().unwrap(),
    });
    cases.push(("destination-proxy", vec![p]));
    cases.push(("priority", vec![sidecar(8000), sidecar(8001)]));
    for (field, policies) in cases {
        let err = hcn.add_policies(ENDPOINT, &policies).unwrap_err();
        match &err {
            HnsError::Policy(e) => assert_eq!(e.field(), Some(field), "{err}"),
            other => panic!("{field}: expected a refusal, got {other}"),
        }
        assert_eq!(fake.state(), before, "{field}: the fake changed");
    }
    // A malformed endpoint id is refused before anything is sent too.
    let err = hcn.add_policy("not-a-guid", &sidecar(8000)).unwrap_err();
    assert!(matches!(err, HnsError::BadGuid(_)), "{err}");
    assert_eq!(fake.state(), before);
    controls.assert_clean();
}

#[test]
fn old_hns_is_refused_with_the_version_named() {
    let fake = FakeHns::new(13, 1);
    let (hcn, controls) = connect(&fake);
    assert_eq!(
        hcn.version().unwrap(),
        Version {
            major: 13,
            minor: 1
        }
    );
    let err = hcn.add_policy(ENDPOINT, &sidecar(8000)).unwrap_err();
    assert!(matches!(err, HnsError::TooOld { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("HNS 13.1 is too old") && message.contains("13.2"),
        "{message}"
    );
    assert!(fake.modify_requests().is_empty(), "nothing may be sent");
    assert_eq!(fake.policies(ENDPOINT).len(), 1);
    controls.assert_clean();
}

#[test]
fn hresults_surface_as_clear_messages() {
    let fake = FakeHns::new(15, 4);
    let (hcn, controls) = connect(&fake);
    let missing = "11111111-2222-4333-8444-555555555555";
    let err = hcn.list_policies(missing).unwrap_err();
    assert_eq!(err.hresult(), Some(HCN_E_ENDPOINT_NOT_FOUND));
    assert_eq!(
        err.to_string(),
        "HcnOpenEndpoint failed: HCN_E_ENDPOINT_NOT_FOUND (0x803B0002): the endpoint was not found; \
         HNS says: The endpoint was not found."
    );
    fake.inject("HcnModifyEndpoint", 0x8007_0005, "Access is denied.");
    let err = hcn.add_policy(ENDPOINT, &sidecar(8000)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "HcnModifyEndpoint failed: E_ACCESSDENIED (0x80070005): access denied (run as Administrator); \
         HNS says: Access is denied."
    );
    fake.inject("HcnQueryEndpointProperties", 0x803B_0020, "");
    let err = hcn.clear_policies(ENDPOINT).unwrap_err();
    assert!(err.to_string().contains("HCN_E_MANAGER_STOPPED"), "{err}");
    controls.assert_clean();
}

#[test]
fn endpoint_from_container_follows_the_namespace() {
    let fake = FakeHns::new(15, 4);
    let (hcn, controls) = connect(&fake);
    let cri = |container: &str| match container {
        "ccaae3aba155c" => Ok(NAMESPACE.to_owned()),
        "lonely" => Ok(EMPTY_NAMESPACE.to_owned()),
        "gone" => Ok("99999999-9999-4999-8999-999999999999".to_owned()),
        other => Err(format!("no container {other}")),
    };
    assert_eq!(
        hcn.endpoint_from_container("ccaae3aba155c", &cri).unwrap(),
        vec![ENDPOINT.to_owned()]
    );
    let err = hcn.endpoint_from_container("lonely", &cri).unwrap_err();
    assert!(
        err.to_string().contains("no HNS endpoint is attached"),
        "{err}"
    );
    let err = hcn.endpoint_from_container("nope", &cri).unwrap_err();
    assert_eq!(err.to_string(), "container nope: no container nope");
    let err = hcn.endpoint_from_container("gone", &cri).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("HcnOpenNamespace failed: ERROR_NOT_FOUND"),
        "{err}"
    );
    let mut ids = hcn.endpoint_ids().unwrap();
    ids.sort();
    assert_eq!(ids, vec![OTHER_ENDPOINT.to_owned(), ENDPOINT.to_owned()]);
    controls.assert_clean();
}

// ---- the fake's own strictness: what a wrong client would run into ----

type OpenFn =
    unsafe extern "system" fn(*const proxyctl_hns::Guid, *mut *mut c_void, *mut *mut u16) -> i32;
type ModifyFn = unsafe extern "system" fn(*mut c_void, *const u16, *mut *mut u16) -> i32;
type QueryFn =
    unsafe extern "system" fn(*mut c_void, *const u16, *mut *mut u16, *mut *mut u16) -> i32;
type CloseFn = unsafe extern "system" fn(*mut c_void) -> i32;
type FreeFn = unsafe extern "system" fn(*mut c_void);

struct Raw<'a> {
    controls: &'a Controls,
}

impl Raw<'_> {
    fn sym<T: Copy>(&self, name: &str) -> T {
        // SAFETY: `T` matches the export's signature at each call site.
        unsafe { *self.controls.lib.get::<T>(name.as_bytes()).unwrap() }
    }

    fn take(&self, ptr: *mut u16) -> String {
        if ptr.is_null() {
            return String::new();
        }
        // SAFETY: a NUL-terminated out-string of the fake, freed right after.
        unsafe {
            let mut len = 0;
            while *ptr.add(len) != 0 {
                len += 1;
            }
            let text = String::from_utf16(std::slice::from_raw_parts(ptr, len)).unwrap();
            self.sym::<FreeFn>("CoTaskMemFree")(ptr.cast());
            text
        }
    }

    /// Sends raw UTF-16 as HcnModifyEndpoint settings; (HRESULT, error record).
    fn modify_units(&self, units: &[u16]) -> (u32, String) {
        let guid: proxyctl_hns::Guid = ENDPOINT.parse().unwrap();
        let mut handle = std::ptr::null_mut();
        let mut record = std::ptr::null_mut();
        // SAFETY: documented signatures; pointers valid for the calls.
        unsafe {
            assert_eq!(
                self.sym::<OpenFn>("HcnOpenEndpoint")(&guid, &mut handle, &mut record),
                0
            );
            let hr = self.sym::<ModifyFn>("HcnModifyEndpoint")(handle, units.as_ptr(), &mut record);
            assert_eq!(self.sym::<CloseFn>("HcnCloseEndpoint")(handle), 0);
            (hr as u32, self.take(record))
        }
    }

    fn modify(&self, json: &str) -> (u32, String) {
        let units: Vec<u16> = json.encode_utf16().chain([0]).collect();
        self.modify_units(&units)
    }
}

fn request(settings: &str) -> String {
    format!(
        r#"{{"ResourceType":"Policy","RequestType":"Add","Settings":{{"Policies":[{{"Type":"L4WFPPROXY","Settings":{settings}}}]}}}}"#
    )
}

#[test]
fn fake_refuses_what_hns_would_refuse() {
    let fake = FakeHns::new(15, 4);
    let (_hcn, controls) = connect(&fake);
    let raw = Raw {
        controls: &controls,
    };
    let (hr, record) = raw.modify(&request(r#"{"OutboundProxyPorts":"8000"}"#));
    assert_eq!(hr, HCN_E_INVALID_JSON);
    assert!(
        record.contains("{{OutboundProxyPorts,UnknownField}}"),
        "{record}"
    );
    let (hr, _) = raw.modify(&request(r#"{"OutboundProxyPort":8000}"#));
    assert_eq!(hr, HCN_E_INVALID_JSON, "a numeric port is a type error");
    let (hr, _) = raw.modify(&request(r#"{"OutboundProxyPort":"8000","Priority":8}"#));
    assert_eq!(
        hr, HCN_E_INVALID_JSON,
        "Priority belongs inside FilterTuple"
    );
    let (hr, _) = raw.modify(&request(
        r#"{"OutboundProxyPort":"8000","FilterTuple":{"Protocols":"17"}}"#,
    ));
    assert_eq!(hr, HCN_E_INVALID_POLICY, "UDP");
    let (hr, _) = raw.modify(&request(
        r#"{"OutboundProxyPort":"8000","OutboundExceptions":{"IpAddressExceptions":["::1"]}}"#,
    ));
    assert_eq!(hr, HCN_E_INVALID_POLICY, "IPv6");
    let (hr, _) = raw.modify(
        r#"{"RequestType":"Add","Settings":{"Policies":[{"Type":"L4WFPPROXY","Settings":{"OutboundProxyPort":"8000"}}]}}"#,
    );
    assert_eq!(hr, HCN_E_INVALID_JSON, "missing ResourceType");
    let (hr, _) = raw.modify(
        r#"{"ResourceType":"Policy","Settings":{"Policies":[{"Type":"L4WFPPROXY","Settings":{"OutboundProxyPort":"8000"}}]}}"#,
    );
    assert_eq!(hr, HCN_E_INVALID_JSON, "missing RequestType");
    let mut units: Vec<u16> = request(r#"{"OutboundProxyPort":"8000"}"#)
        .encode_utf16()
        .collect();
    units.insert(10, 0xD800); // a lone surrogate
    units.push(0);
    let (hr, record) = raw.modify_units(&units);
    assert_eq!(hr, HCN_E_INVALID_JSON);
    assert!(record.contains("invalid UTF-16"), "{record}");
    assert_eq!(fake.policies(ENDPOINT).len(), 1, "nothing was added");
    // ...and the well-formed request is accepted, a second proxy policy
    // too, but not an exact duplicate.
    let (hr, record) = raw.modify(&request(r#"{"OutboundProxyPort":"8000","FilterTuple":{}}"#));
    assert_eq!((hr, record.as_str()), (0, ""));
    let (hr, record) = raw.modify(&request(
        r#"{"OutboundProxyPort":"8001","FilterTuple":{"Priority":2}}"#,
    ));
    assert_eq!((hr, record.as_str()), (0, ""));
    let (hr, record) = raw.modify(&request(r#"{"OutboundProxyPort":"8000","FilterTuple":{}}"#));
    assert_eq!(hr, proxyctl_hns::HCN_E_POLICY_ALREADY_EXISTS, "{record}");
    assert_eq!(fake.policies(ENDPOINT).len(), 3);
    controls.assert_clean();
}

#[test]
fn fake_detects_a_missing_free_and_a_double_free() {
    let fake = FakeHns::new(15, 4);
    let (_hcn, controls) = connect(&fake);
    let raw = Raw {
        controls: &controls,
    };
    let guid: proxyctl_hns::Guid = ENDPOINT.parse().unwrap();
    let query: Vec<u16> = "{\"SchemaVersion\":{\"Major\":2,\"Minor\":0}}"
        .encode_utf16()
        .chain([0])
        .collect();
    let (mut handle, mut props, mut record) = (
        std::ptr::null_mut(),
        std::ptr::null_mut(),
        std::ptr::null_mut(),
    );
    // SAFETY: documented signatures; pointers valid for the calls.
    unsafe {
        assert_eq!(
            raw.sym::<OpenFn>("HcnOpenEndpoint")(&guid, &mut handle, &mut record),
            0
        );
        assert_eq!(controls.counter("HnsFakeOpenHandles"), 1);
        let hr = raw.sym::<QueryFn>("HcnQueryEndpointProperties")(
            handle,
            query.as_ptr(),
            &mut props,
            &mut record,
        );
        assert_eq!(hr, 0);
        assert_eq!(
            controls.counter("HnsFakeOutstandingStrings"),
            1,
            "properties not freed yet"
        );
        raw.sym::<FreeFn>("CoTaskMemFree")(props.cast());
        assert_eq!(controls.counter("HnsFakeOutstandingStrings"), 0);
        raw.sym::<FreeFn>("CoTaskMemFree")(props.cast());
        assert_eq!(
            controls.counter("HnsFakeBadFrees"),
            1,
            "double free counted"
        );
        assert_eq!(raw.sym::<CloseFn>("HcnCloseEndpoint")(handle), 0);
        assert_ne!(
            raw.sym::<CloseFn>("HcnCloseEndpoint")(handle),
            0,
            "closing twice fails"
        );
    }
    assert_eq!(controls.counter("HnsFakeOpenHandles"), 0);
}

#[test]
fn clear_removes_every_proxy_policy_in_one_request_and_counts_them() {
    // Two proxy policies, as another tool or an older HNS may have left them.
    let fake = FakeHns::with_state(serde_json::json!({
        "Version": {"Major": 15, "Minor": 4},
        "Endpoints": [{"ID": ENDPOINT, "Policies": [
            {"Type": "L4WFPPROXY", "Settings": {"OutboundProxyPort": "15001", "FilterTuple": {"Protocols": "6", "Priority": 2}}},
            {"Type": "ACL", "Settings": {"Action": "Allow"}},
            {"Type": "L4WFPPROXY", "Settings": {"InboundProxyPort": "15006", "FilterTuple": {}}}
        ]}]
    }));
    let (hcn, controls) = connect(&fake);
    let listed = hcn.list_policies(ENDPOINT).unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(
        (listed[0].outbound_port, listed[0].priority),
        (Some(15001), 2)
    );
    assert_eq!(listed[1].inbound_port, Some(15006));
    assert_eq!(hcn.clear_policies(ENDPOINT).unwrap(), 2);
    assert_eq!(fake.modify_requests().len(), 1, "one Remove request");
    let left = fake.policies(ENDPOINT);
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["Type"], "ACL");
    controls.assert_clean();
}

#[test]
fn fake_refuses_malformed_queries_and_guids() {
    type EnumerateFn = unsafe extern "system" fn(*const u16, *mut *mut u16, *mut *mut u16) -> i32;
    let fake = FakeHns::new(15, 4);
    let (_hcn, controls) = connect(&fake);
    let raw = Raw {
        controls: &controls,
    };
    let enumerate = |query: &str| -> (u32, String, String) {
        let units: Vec<u16> = query.encode_utf16().chain([0]).collect();
        let (mut list, mut record) = (std::ptr::null_mut(), std::ptr::null_mut());
        // SAFETY: documented signature; pointers valid for the call.
        let hr = unsafe {
            raw.sym::<EnumerateFn>("HcnEnumerateEndpoints")(units.as_ptr(), &mut list, &mut record)
        };
        (hr as u32, raw.take(list), raw.take(record))
    };
    let (hr, list, _) = enumerate(&format!(
        r#"{{"SchemaVersion":{{"Major":2,"Minor":0}},"Filter":"{{\"ID\":\"{ENDPOINT}\"}}"}}"#
    ));
    assert_eq!((hr, list), (0, format!(r#"["{ENDPOINT}"]"#)));
    let (hr, _, record) = enumerate(
        r#"{"SchemaVersion":{"Major":2,"Minor":0},"Filter":"{\"ID\":\"93f86a7f-e361\"}"}"#,
    );
    assert_eq!(hr, 0x803B_0019, "HCN_E_GUID_CONVERSION_FAILURE: {record}");
    let (hr, _, record) = enumerate(r#"{"SchemaVersion":{"Major":2,"Minor":0},"Flag":1}"#);
    assert_eq!(hr, HCN_E_INVALID_JSON);
    assert!(record.contains("{{Flag,UnknownField}}"), "{record}");
    let (hr, _, _) = enumerate(r#"{"SchemaVersion":"2.0"}"#);
    assert_eq!(hr, HCN_E_INVALID_JSON, "wrong type");
    controls.assert_clean();
}
