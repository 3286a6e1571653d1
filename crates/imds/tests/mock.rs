//! The metadata-service fake is strict: every documented refusal, over real
//! sockets on loopback (no privileges needed).

mod common;

use common::{parse, raw, send, start_mock};

fn mock() -> (
    tokio::runtime::Runtime,
    std::sync::Arc<imds_proxy::mock::MockState>,
    std::net::SocketAddr,
) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (state, addr) = start_mock(&rt, "127.0.0.1:0".parse().unwrap());
    (rt, state, addr)
}

const MD: &str = "Metadata: true";
const INSTANCE: &str = "/metadata/instance?api-version=2021-02-01";

/// `send` of a GET.
fn get(addr: std::net::SocketAddr, target: &str, headers: &[&str]) -> common::RawResponse {
    send(addr, "GET", target, headers)
}

#[test]
fn azure_refusals_match_the_real_service() {
    let (_rt, state, addr) = mock();
    let ok = get(addr, INSTANCE, &[MD]);
    assert_eq!(ok.status, 200);
    assert_eq!(ok.json(), *state.instance());
    assert!(
        ok.head
            .to_ascii_lowercase()
            .contains("content-type: application/json")
    );

    // Metadata header: missing, wrong value, given twice.
    for headers in [&[][..], &["Metadata: false"][..], &[MD, MD][..]] {
        let r = get(addr, INSTANCE, headers);
        assert_eq!(r.status, 400, "{headers:?}");
        assert_eq!(
            r.json()["error"],
            "Bad request. Required metadata header not specified"
        );
    }
    // PowerShell sends "True" (the seed's client): accepted.
    assert_eq!(get(addr, INSTANCE, &["Metadata: True"]).status, 200);
    // The identity endpoint answers in OAuth shape.
    let r = get(
        addr,
        "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=x",
        &[],
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"], "invalid_request");
    assert_eq!(
        r.json()["error_description"],
        "Required metadata header not specified"
    );

    // X-Forwarded-For is refused even with the header right.
    let r = get(addr, INSTANCE, &[MD, "X-Forwarded-For: 10.0.0.9"]);
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("X-Forwarded-For")
    );

    // api-version: missing, unknown -> 400 with the three newest versions.
    for target in [
        "/metadata/instance",
        "/metadata/instance?api-version=1999-01-01",
        "/metadata/attested/document",
    ] {
        let r = get(addr, target, &[MD]);
        assert_eq!(r.status, 400, "{target}");
        let newest = r.json()["newest-versions"].as_array().unwrap().clone();
        assert_eq!(newest.len(), 3, "{target}");
        assert_eq!(newest[0], "2023-07-01");
    }
    // Duplicate query parameters.
    let r = get(
        addr,
        "/metadata/instance?api-version=2021-02-01&api-version=2021-02-01",
        &[MD],
    );
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("more than once")
    );

    // GET-only endpoints: 405 for anything else; scheduledevents takes POST.
    for (method, target) in [
        ("POST", INSTANCE),
        (
            "PUT",
            "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=x",
        ),
        ("DELETE", "/metadata/versions"),
        ("PUT", "/metadata/scheduledevents?api-version=2020-07-01"),
    ] {
        let mut req = format!(
            "{method} {target} HTTP/1.1\r\nHost: x\r\n{MD}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        if method == "DELETE" {
            req = req.replace("Content-Length: 0\r\n", "");
        }
        let r = parse(&raw(addr, req.as_bytes()).unwrap());
        assert_eq!(r.status, 405, "{method} {target}");
    }
    let events = get(
        addr,
        "/metadata/scheduledevents?api-version=2020-07-01",
        &[MD],
    );
    assert_eq!(events.status, 200);
    assert!(events.json()["Events"].is_array());
    let body = r#"{"StartRequests":[{"EventId":"x"}]}"#;
    let post = format!(
        "POST /metadata/scheduledevents?api-version=2020-07-01 HTTP/1.1\r\nHost: x\r\n{MD}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    assert_eq!(parse(&raw(addr, post.as_bytes()).unwrap()).status, 200);
    let post = format!(
        "POST /metadata/scheduledevents?api-version=2020-07-01 HTTP/1.1\r\nHost: x\r\n{MD}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
    );
    assert_eq!(parse(&raw(addr, post.as_bytes()).unwrap()).status, 400);

    // 404: unknown endpoints and unknown elements of the instance document.
    for target in [
        "/metadata/nothing?api-version=2021-02-01",
        "/metadata/instance/compute/nope?api-version=2021-02-01",
        "/other",
    ] {
        assert_eq!(get(addr, target, &[MD]).status, 404, "{target}");
    }
    // Leaves in text, subtrees in JSON; text of a subtree is refused.
    let leaf = get(
        addr,
        "/metadata/instance/compute/vmId?api-version=2021-02-01&format=text",
        &[MD],
    );
    assert_eq!(
        (leaf.status, leaf.body.as_str()),
        (200, "a7c7a8a7-7cdb-4c49-a3a5-d67dc6aa2050")
    );
    assert_eq!(
        get(
            addr,
            "/metadata/instance/compute?api-version=2021-02-01&format=text",
            &[MD]
        )
        .status,
        400
    );
    let ip = get(
        addr,
        "/metadata/instance/network/interface/0/ipv4/ipAddress/0/privateIpAddress?api-version=2021-02-01&format=text",
        &[MD],
    );
    assert_eq!(ip.body, "10.0.0.5");

    // Identity token: resource is required; one identity selector at most.
    let t = get(
        addr,
        "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net",
        &[MD],
    );
    assert_eq!(t.status, 200);
    assert_eq!(t.json()["resource"], "https://vault.azure.net");
    assert_eq!(t.json()["token_type"], "Bearer");
    assert_eq!(
        get(
            addr,
            "/metadata/identity/oauth2/token?api-version=2018-02-01",
            &[MD]
        )
        .status,
        400
    );
    assert_eq!(get(addr, "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=x&client_id=a&object_id=b", &[MD]).status, 400);
    // Attested: nonce at most 10 digits.
    assert_eq!(
        get(
            addr,
            "/metadata/attested/document?api-version=2021-02-01&nonce=1234567890",
            &[MD]
        )
        .status,
        200
    );
    assert_eq!(
        get(
            addr,
            "/metadata/attested/document?api-version=2021-02-01&nonce=12345678901",
            &[MD]
        )
        .status,
        400
    );
    // Versions needs no api-version.
    let v = get(addr, "/metadata/versions", &[MD]);
    assert_eq!(v.status, 200);
    assert!(v.json()["apiVersions"].as_array().unwrap().len() > 10);
}

#[test]
fn aws_imdsv2_token_rules_are_enforced() {
    let (_rt, _state, addr) = mock();
    // TTL header: missing, zero, too big, not a number -> 400.
    for ttl in [None, Some("0"), Some("21601"), Some("abc"), Some("-1")] {
        let header = ttl.map(|t| format!("X-aws-ec2-metadata-token-ttl-seconds: {t}"));
        let headers: Vec<&str> = header.iter().map(String::as_str).collect();
        let req = String::from_utf8(common::request("PUT", "/latest/api/token", &headers))
            .unwrap()
            .replace(
                "Connection: close",
                "Content-Length: 0\r\nConnection: close",
            );
        assert_eq!(
            parse(&raw(addr, req.as_bytes()).unwrap()).status,
            400,
            "{ttl:?}"
        );
    }
    // X-Forwarded-For on the token PUT -> 403; GET on the token path -> 405.
    let put = |extra: &str, ttl: &str| {
        let req = format!(
            "PUT /latest/api/token HTTP/1.1\r\nHost: x\r\nX-aws-ec2-metadata-token-ttl-seconds: {ttl}\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n"
        );
        parse(&raw(addr, req.as_bytes()).unwrap())
    };
    assert_eq!(put("X-Forwarded-For: 1.2.3.4\r\n", "60").status, 403);
    assert_eq!(get(addr, "/latest/api/token", &[]).status, 405);

    for ttl in ["1", "21600"] {
        assert_eq!(put("", ttl).status, 200, "ttl {ttl}");
    }
    let issued = put("", "1");
    assert!(
        issued
            .head
            .to_ascii_lowercase()
            .contains("x-aws-ec2-metadata-token-ttl-seconds: 1")
    );
    let token = issued.body.clone();
    let with = format!("X-aws-ec2-metadata-token: {token}");

    // Reads need a live token.
    assert_eq!(get(addr, "/latest/meta-data/instance-id", &[]).status, 401);
    assert_eq!(
        get(
            addr,
            "/latest/meta-data/instance-id",
            &["X-aws-ec2-metadata-token: forged"]
        )
        .status,
        401
    );
    let r = get(addr, "/latest/meta-data/instance-id", &[&with]);
    assert_eq!((r.status, r.body.as_str()), (200, "i-0123456789abcdef0"));
    let creds = get(
        addr,
        "/latest/meta-data/iam/security-credentials/mock-role",
        &[&with],
    );
    assert_eq!(creds.status, 200);
    assert_eq!(creds.json()["Code"], "Success");
    assert_eq!(get(addr, "/latest/meta-data/nope", &[&with]).status, 404);
    let post = format!(
        "POST /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\n{with}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(parse(&raw(addr, post.as_bytes()).unwrap()).status, 405);
    // The TTL is honoured: after 1 s the token is refused.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_eq!(
        get(addr, "/latest/meta-data/instance-id", &[&with]).status,
        401
    );
}

const FLAVOR: &str = "Metadata-Flavor: Google";

#[test]
fn gcp_metadata_server_edge_matches_the_real_one() {
    let (_rt, state, addr) = mock();
    let sa = "/computeMetadata/v1/instance/service-accounts";
    // The header is required, exactly "Google", once; X-Forwarded-For is
    // refused even with it. Every answer says Metadata-Flavor: Google.
    for headers in [
        &[][..],
        &["Metadata-Flavor: google"][..],
        &[FLAVOR, FLAVOR][..],
        &[FLAVOR, "X-Forwarded-For: 10.0.0.1"][..],
    ] {
        let r = get(addr, &format!("{sa}/default/email"), headers);
        assert_eq!(r.status, 403, "{headers:?}");
        assert!(
            r.head
                .to_ascii_lowercase()
                .contains("metadata-flavor: google")
        );
    }
    let node = state.gcp().node_account().to_owned();
    let email = get(addr, &format!("{sa}/default/email"), &[FLAVOR]);
    assert_eq!((email.status, email.body.as_str()), (200, node.as_str()));
    assert!(
        email
            .head
            .to_ascii_lowercase()
            .contains("metadata-flavor: google")
    );
    let json = get(addr, &format!("{sa}/default/email?alt=json"), &[FLAVOR]);
    assert_eq!(json.json(), serde_json::json!(node));
    assert_eq!(
        get(addr, &format!("{sa}/default/email?alt=xml"), &[FLAVOR]).status,
        400
    );
    // Recursive directories are JSON with camelCase keys.
    let inst = get(
        addr,
        "/computeMetadata/v1/instance/?recursive=true",
        &[FLAVOR],
    );
    assert_eq!(
        inst.json()["serviceAccounts"]["default"]["email"],
        node.as_str()
    );
    assert!(inst.json().get("machineType").is_some());
    // Tokens: realistic lifetime, the same cached token counting down.
    let t1 = get(addr, &format!("{sa}/default/token"), &[FLAVOR]).json();
    let t2 = get(addr, &format!("{sa}/{node}/token"), &[FLAVOR]).json();
    assert_eq!(t1["access_token"], t2["access_token"]);
    let left = t1["expires_in"].as_u64().unwrap();
    assert!((3500..=3599).contains(&left), "{t1}");
    assert_eq!(
        get(addr, &format!("{sa}/default/identity"), &[FLAVOR]).status,
        400
    );
    assert_eq!(
        get(
            addr,
            &format!("{sa}/other@x.iam.gserviceaccount.com/token"),
            &[FLAVOR]
        )
        .status,
        404
    );
    // wait_for_change: held for timeout_sec; a stale last_etag answers at once.
    let first = get(addr, "/computeMetadata/v1/project/project-id", &[FLAVOR]);
    let etag = first
        .head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("etag: ")
                .map(str::to_owned)
        })
        .expect("an ETag");
    let start = std::time::Instant::now();
    let held = get(
        addr,
        &format!(
            "/computeMetadata/v1/project/project-id?wait_for_change=true&timeout_sec=1&last_etag={etag}"
        ),
        &[FLAVOR],
    );
    assert_eq!(held.body, "mock-project");
    assert!(
        start.elapsed() >= std::time::Duration::from_secs(1),
        "not held"
    );
    let stale = get(
        addr,
        "/computeMetadata/v1/project/project-id?wait_for_change=true&timeout_sec=60&last_etag=0",
        &[FLAVOR],
    );
    assert_eq!(stale.status, 200);
}

#[test]
fn gcp_iam_credentials_fake_enforces_the_contract() {
    let (_rt, state, addr) = mock();
    let gcp = state.gcp();
    let node_token = get(
        addr,
        "/computeMetadata/v1/instance/service-accounts/default/token",
        &[FLAVOR],
    )
    .json()["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let call = |project: &str, target: &str, verb: &str, token: &str, body: &str| {
        let req = format!(
            "POST /v1/projects/{project}/serviceAccounts/{target}:{verb} HTTP/1.1\r\nHost: iamcredentials.googleapis.com\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        parse(&raw(addr, req.as_bytes()).unwrap())
    };
    let (granted, refused) = (&gcp.accounts()[1], &gcp.accounts()[3]);
    let scope = r#"{"scope":["https://www.googleapis.com/auth/cloud-platform"],"lifetime":"600s"}"#;
    let ok = call("-", granted, "generateAccessToken", &node_token, scope);
    assert_eq!(ok.status, 200, "{}", ok.body);
    let token = ok.json()["accessToken"].as_str().unwrap().to_owned();
    assert_eq!(gcp.token_owner(&token).as_deref(), Some(granted.as_str()));
    for (project, target, tok, body, status, code) in [
        (
            "-",
            granted.as_str(),
            "bogus",
            scope,
            401,
            "UNAUTHENTICATED",
        ),
        (
            "-",
            refused.as_str(),
            node_token.as_str(),
            scope,
            403,
            "PERMISSION_DENIED",
        ),
        (
            "-",
            "nobody@mock-project.iam.gserviceaccount.com",
            node_token.as_str(),
            scope,
            403,
            "PERMISSION_DENIED",
        ),
        (
            "mock-project",
            granted.as_str(),
            node_token.as_str(),
            scope,
            400,
            "INVALID_ARGUMENT",
        ),
        (
            "-",
            granted.as_str(),
            node_token.as_str(),
            r#"{"scope":[]}"#,
            400,
            "INVALID_ARGUMENT",
        ),
        (
            "-",
            granted.as_str(),
            node_token.as_str(),
            r#"{"scope":["x"],"lifetime":"7200s"}"#,
            400,
            "INVALID_ARGUMENT",
        ),
        (
            "-",
            granted.as_str(),
            node_token.as_str(),
            r#"{"scope":["x"],"extra":1}"#,
            400,
            "INVALID_ARGUMENT",
        ),
    ] {
        let r = call(project, target, "generateAccessToken", tok, body);
        assert_eq!(r.status, status, "{project} {target} {body}: {}", r.body);
        assert_eq!(r.json()["error"]["status"], code, "{body}");
    }
    // A token of an app account lacks nothing but the grant: it may not
    // mint tokens for another account.
    let r = call(
        "-",
        &gcp.accounts()[2],
        "generateAccessToken",
        &token,
        scope,
    );
    assert_eq!(r.status, 403, "{}", r.body);
    let id = call(
        "-",
        granted,
        "generateIdToken",
        &node_token,
        r#"{"audience":"https://a","includeEmail":true}"#,
    );
    assert_eq!(id.status, 200, "{}", id.body);
    let claims = imds_proxy::gcp::jwt_claims(id.json()["token"].as_str().unwrap()).unwrap();
    assert_eq!(
        (claims["aud"].as_str(), claims["email"].as_str()),
        (Some("https://a"), Some(granted.as_str()))
    );
    assert_eq!(
        call("-", granted, "generateIdToken", &node_token, "{}").status,
        400
    );
    assert_eq!(gcp.access_tokens_issued(granted), 1);
    assert_eq!(gcp.id_tokens_issued(granted), 1);
}
