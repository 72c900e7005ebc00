//! The SOL005 NFVO test double itself: its resources, its error behaviour and its schema
//! checks, driven by a plain client (no SM involved).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::nfvo::{ClientResponse, Delivery, NfvoDouble};
use common::shell::sh;
use serde_json::{json, Value};

const V: (&str, &str) = ("Version", "2.3.0");
const JSON: (&str, &str) = ("Content-Type", "application/json");

/// A double with a throwaway CA standing in for the SM's client CA and TLS CA.
fn double(dir: &Path) -> NfvoDouble {
    sh(
        dir,
        r#"openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
             -keyout sm-ca.key -out sm-ca.pem -days 30 -subj "/CN=SM test CA" 2>/dev/null"#,
    );
    NfvoDouble::start(dir, &dir.join("sm-ca.pem"), &dir.join("sm-ca.pem"))
}

fn with_inventory(nfvo: &NfvoDouble) {
    nfvo.add_package("pkg-1", "vnfd-1", &"ab".repeat(32), true);
    nfvo.add_ns("ns-1", "core");
    nfvo.add_vnf(&["ns-1"], "vnf-1", "vnfd-1", "pkg-1", "profile-1");
    nfvo.add_vnf(&["ns-1"], "vnf-2", "vnfd-1", "pkg-1", "profile-2");
}

fn post_json(nfvo: &NfvoDouble, path: &str, body: &Value) -> ClientResponse {
    let body = serde_json::to_vec(body).unwrap();
    nfvo.client_request("POST", path, &[V, JSON], Some(&body))
}

fn op_state(nfvo: &NfvoDouble, location: &str) -> String {
    let path = location
        .strip_prefix(&nfvo.base())
        .expect("absolute Location");
    let op = nfvo.client_request("GET", path, &[V], None);
    assert_eq!(op.status, 200, "{:?}", op.body);
    op.body["operationState"].as_str().unwrap().to_string()
}

fn wait_completed(nfvo: &NfvoDouble, location: &str) {
    // A failure guard, not a measurement: generous on a loaded machine.
    let deadline = Instant::now() + Duration::from_secs(90);
    while op_state(nfvo, location) != "COMPLETED" {
        assert!(Instant::now() < deadline, "op occ never completed");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn api_versions_and_the_version_header() {
    let dir = tempfile::tempdir().unwrap();
    let nfvo = double(dir.path());
    with_inventory(&nfvo);

    for (path, prefix, version) in [
        ("/nslcm/api_versions", "/nslcm/v2", "2.3.0"),
        ("/nslcm/v2/api_versions", "/nslcm/v2", "2.3.0"),
        ("/vnfpkgm/api_versions", "/vnfpkgm/v2", "2.4.0"),
        ("/vnfpkgm/v2/api_versions", "/vnfpkgm/v2", "2.4.0"),
    ] {
        let r = nfvo.client_request("GET", path, &[], None);
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.body["uriPrefix"], prefix);
        assert_eq!(r.body["apiVersions"][0]["version"], version);
    }

    let r = nfvo.client_request("GET", "/nslcm/v2/ns_instances/ns-1", &[], None);
    assert_eq!(r.status, 400);
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    assert_eq!(r.body["status"], 400);

    let r = nfvo.client_request("GET", "/nslcm/v2/ns_instances/ns-1", &[V], None);
    assert_eq!(r.status, 200);
    assert_eq!(r.body["vnfInstance"].as_array().unwrap().len(), 2);
    assert_eq!(Some(r.body), nfvo.ns("ns-1"));
    assert_eq!(nfvo.requests().last().unwrap().client_identity, None);

    // A client certificate under the SM client CA names the client.
    sh(
        dir.path(),
        r#"set -e
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout sm.key -out sm.csr \
  -subj "/CN=sm-by-cn" 2>/dev/null
printf 'extendedKeyUsage=clientAuth\nsubjectAltName=DNS:security-manager\n' > sm.ext
openssl x509 -req -in sm.csr -CA sm-ca.pem -CAkey sm-ca.key -CAcreateserial -days 1 \
  -extfile sm.ext -out sm.pem 2>/dev/null"#,
    );
    let (cert, key) = (dir.path().join("sm.pem"), dir.path().join("sm.key"));
    let r = nfvo.client_request_with_cert(&cert, &key, "GET", "/nslcm/v2/ns_instances", &[V], None);
    assert_eq!(r.status, 200);
    let identity = nfvo.requests().last().unwrap().client_identity.clone();
    assert_eq!(identity.as_deref(), Some("security-manager"));

    let r = nfvo.client_request("GET", "/vnfpkgm/v2/vnf_packages/pkg-1", &[V], None);
    assert_eq!(r.status, 200);
    assert_eq!(r.body["checksum"]["algorithm"], "SHA-256");
    assert_eq!(r.body["usageState"], "IN_USE");

    assert_eq!(
        nfvo.client_request("GET", "/nslcm/v2/nothing", &[V], None)
            .status,
        404
    );
    assert_eq!(
        nfvo.client_request("GET", "/nslcm/v2/ns_instances/nope", &[V], None)
            .status,
        404
    );
    assert_eq!(
        nfvo.client_request("DELETE", "/nslcm/v2/ns_instances", &[V], None)
            .status,
        405
    );

    let recorded = nfvo.requests();
    assert_eq!(recorded[0].path, "/nslcm/api_versions");
    assert_eq!(recorded[4].version, None);
    assert_eq!(recorded[4].status, 400);
    assert_eq!(recorded[5].version.as_deref(), Some("2.3.0"));
    assert_eq!(
        recorded[6].client_identity.as_deref(),
        Some("security-manager")
    );
    assert!(nfvo.violations().is_empty(), "{:#?}", nfvo.violations());
}

#[test]
fn a_subscription_whose_test_get_fails_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let nfvo = double(dir.path());
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);

    let request = json!({
        "callbackUri": format!("https://127.0.0.1:{port}/callback?mode=PASSIVE"),
        "filter": {"notificationTypes": ["NsLcmOperationOccurenceNotification"]},
    });
    let r = post_json(&nfvo, "/nslcm/v2/subscriptions", &request);
    assert_eq!(r.status, 422, "{:?}", r.body);
    assert!(nfvo.subscriptions().is_empty());
    assert_eq!(nfvo.announced_mode(), None);
    assert!(nfvo.violations().is_empty(), "{:#?}", nfvo.violations());
}

#[test]
fn subscriptions_notifications_and_the_announced_mode() {
    let dir = tempfile::tempdir().unwrap();
    let nfvo = double(dir.path());
    with_inventory(&nfvo);
    let callback = Callback::start();

    let request = json!({
        "callbackUri": format!("{}/callback?mode=PASSIVE", callback.base),
        "authentication": {"authType": ["BASIC"], "paramsBasic": {"userName": "nfvo", "password": "s3cret"}},
    });
    let r = post_json(&nfvo, "/nslcm/v2/subscriptions", &request);
    assert_eq!(r.status, 201, "{:?}", r.body);
    let location = r.header("location").unwrap().to_string();
    assert_eq!(r.body["_links"]["self"]["href"], location.as_str());
    assert!(r.body.get("authentication").is_none());
    assert_eq!(nfvo.announced_mode().as_deref(), Some("PASSIVE"));
    assert_eq!(
        callback.seen(),
        [(
            "GET".to_string(),
            Some("Basic bmZ2bzpzM2NyZXQ=".to_string())
        )]
    );

    // The same callbackUri and filter again: 303 to the existing one.
    let again = post_json(&nfvo, "/nslcm/v2/subscriptions", &request);
    assert_eq!(again.status, 303);
    assert_eq!(again.header("location"), Some(location.as_str()));
    assert_eq!(nfvo.subscriptions().len(), 1);

    // A PASSIVE SM may not update NS instances nor touch packages.
    let remove = json!({"updateType": "REMOVE_VNF", "removeVnfInstanceId": ["vnf-1"]});
    assert_eq!(
        post_json(&nfvo, "/nslcm/v2/ns_instances/ns-1/update", &remove).status,
        403
    );

    // Notifications: one in order, then a dropped one, a duplicated one, a reordered pair.
    let first = nfvo.notify_lcm("ns-1", "vnf-1", "MODIFY_INFORMATION");
    nfvo.set_delivery(Delivery::Drop);
    nfvo.notify(nfvo.notification("NsIdentifierCreationNotification", "ns-2"));
    nfvo.set_delivery(Delivery::Duplicate);
    let change = nfvo.notification("NsChangeNotification", "ns-1");
    let duplicated = change["id"].as_str().unwrap().to_string();
    nfvo.notify(change);
    nfvo.set_delivery(Delivery::Reorder);
    let held = nfvo.notification("NsIdentifierDeletionNotification", "ns-1");
    let held_id = held["id"].as_str().unwrap().to_string();
    nfvo.notify(held);
    nfvo.set_delivery(Delivery::Normal);
    let shortage = nfvo.notification("NsLcmCapacityShortageNotification", "ns-1");
    let shortage_id = shortage["id"].as_str().unwrap().to_string();
    nfvo.notify(shortage);

    let ids = nfvo
        .wait_deliveries(5, Duration::from_secs(90))
        .into_iter()
        .map(|(id, status)| {
            assert_eq!(status, 204);
            id
        })
        .collect::<Vec<_>>();
    assert_eq!(
        ids,
        [first, duplicated.clone(), duplicated, shortage_id, held_id]
    );
    let bodies = callback.bodies();
    assert_eq!(bodies.len(), 5);
    assert!(bodies.iter().all(|b| b["subscriptionId"] == r.body["id"]));
    assert_eq!(bodies[0]["affectedVnf"][0]["vnfProfileId"], "profile-1");

    let r = nfvo.client_request(
        "DELETE",
        location.strip_prefix(&nfvo.base()).unwrap(),
        &[V],
        None,
    );
    assert_eq!(r.status, 204);
    assert!(nfvo.subscriptions().is_empty());
    assert!(nfvo.violations().is_empty(), "{:#?}", nfvo.violations());
}

#[test]
fn update_removes_a_vnf_and_refuses_a_second_one_while_processing() {
    let dir = tempfile::tempdir().unwrap();
    let nfvo = double(dir.path());
    with_inventory(&nfvo);
    // Held in PROCESSING until the checks below are done, however slow the machine.
    nfvo.hold_ops(true);

    let remove = json!({
        "updateType": "REMOVE_VNF",
        "removeVnfInstanceId": ["vnf-1"],
        "terminateVnfData": [{"vnfInstanceId": "vnf-1", "additionalParams": {"reason": "compromised"}}],
    });
    let r = post_json(&nfvo, "/nslcm/v2/ns_instances/ns-1/update", &remove);
    assert_eq!(r.status, 202, "{:?}", r.body);
    assert_eq!(r.body, Value::Null);
    let location = r.header("location").unwrap().to_string();
    assert!(location.starts_with(&format!("{}/nslcm/v2/ns_lcm_op_occs/", nfvo.base())));

    let second = json!({"updateType": "REMOVE_VNF", "removeVnfInstanceId": ["vnf-2"]});
    let busy = post_json(&nfvo, "/nslcm/v2/ns_instances/ns-1/update", &second);
    assert_eq!(busy.status, 409);
    assert_eq!(op_state(&nfvo, &location), "PROCESSING");
    assert!(nfvo.vnf_in_ns("ns-1", "vnf-1"));

    nfvo.hold_ops(false);
    wait_completed(&nfvo, &location);
    assert!(!nfvo.vnf_in_ns("ns-1", "vnf-1"));
    let ns = nfvo.ns("ns-1").unwrap();
    let ids = ns["vnfInstance"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap())
        .collect::<Vec<_>>();
    assert_eq!(ids, ["vnf-2"]);

    let path = "/nslcm/v2/ns_lcm_op_occs?filter=(eq,nsInstanceId,ns-1)";
    let ops = nfvo.client_request("GET", path, &[V], None);
    assert_eq!(ops.status, 200);
    assert_eq!(ops.body.as_array().unwrap().len(), 1);
    assert_eq!(ops.body[0]["operationParams"], remove);
    assert_eq!(ops.body[0]["operation"], "UPDATE");

    // Now the NS is free again.
    nfvo.op_duration(Duration::from_millis(10));
    let r = post_json(&nfvo, "/nslcm/v2/ns_instances/ns-1/update", &second);
    assert_eq!(r.status, 202);
    wait_completed(&nfvo, r.header("location").unwrap());
    assert_eq!(nfvo.ns("ns-1").unwrap()["vnfInstance"], json!([]));
    assert_eq!(nfvo.package("pkg-1").unwrap()["usageState"], "NOT_IN_USE");
    assert!(nfvo.violations().is_empty(), "{:#?}", nfvo.violations());
}

#[test]
fn patch_package_twice_then_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let nfvo = double(dir.path());
    with_inventory(&nfvo);
    let path = "/vnfpkgm/v2/vnf_packages/pkg-1";
    let disable = br#"{"operationalState":"DISABLED"}"#;
    let merge = ("Content-Type", "application/merge-patch+json");

    let wrong_type = nfvo.client_request("PATCH", path, &[V, JSON], Some(disable));
    assert_eq!(wrong_type.status, 415);
    let r = nfvo.client_request("PATCH", path, &[V, merge], Some(disable));
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body, json!({"operationalState": "DISABLED"}));
    assert_eq!(
        nfvo.package("pkg-1").unwrap()["operationalState"],
        "DISABLED"
    );
    let r = nfvo.client_request("PATCH", path, &[V, merge], Some(disable));
    assert_eq!(r.status, 409);
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    let unknown = nfvo.client_request(
        "PATCH",
        "/vnfpkgm/v2/vnf_packages/nope",
        &[V, merge],
        Some(disable),
    );
    assert_eq!(unknown.status, 404);
    assert!(nfvo.violations().is_empty(), "{:#?}", nfvo.violations());
}

#[test]
fn injected_faults_and_oauth() {
    let dir = tempfile::tempdir().unwrap();
    let nfvo = double(dir.path());
    with_inventory(&nfvo);
    nfvo.fail("GET", "/ns_instances/", 503, 2, Some(7));

    for _ in 0..2 {
        let r = nfvo.client_request("GET", "/nslcm/v2/ns_instances/ns-1", &[V], None);
        assert_eq!(r.status, 503);
        assert_eq!(r.header("retry-after"), Some("7"));
        assert_eq!(r.body["status"], 503);
    }
    assert_eq!(
        nfvo.client_request("GET", "/nslcm/v2/ns_instances/ns-1", &[V], None)
            .status,
        200
    );
    let statuses = nfvo.requests().iter().map(|r| r.status).collect::<Vec<_>>();
    assert_eq!(statuses, [503, 503, 200]);

    nfvo.oauth_client("sm", "sm-secret");
    let r = nfvo.client_request("GET", "/nslcm/v2/ns_instances/ns-1", &[V], None);
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    let form = ("Content-Type", "application/x-www-form-urlencoded");
    let bad = nfvo.client_request(
        "POST",
        "/oauth2/token",
        &[form],
        Some(b"grant_type=client_credentials&client_id=sm&client_secret=wrong"),
    );
    assert_eq!(bad.status, 401);
    let token = nfvo.client_request(
        "POST",
        "/oauth2/token",
        &[form, ("Authorization", "Basic c206c20tc2VjcmV0")],
        Some(b"grant_type=client_credentials"),
    );
    assert_eq!(token.status, 200, "{:?}", token.body);
    assert_eq!(token.body["token_type"], "Bearer");
    let bearer = format!("Bearer {}", token.body["access_token"].as_str().unwrap());
    let r = nfvo.client_request(
        "GET",
        "/nslcm/v2/ns_instances/ns-1",
        &[V, ("Authorization", &bearer)],
        None,
    );
    assert_eq!(r.status, 200);
    assert!(nfvo.requests().last().unwrap().bearer.is_some());
    assert!(nfvo.violations().is_empty(), "{:#?}", nfvo.violations());
}

#[test]
fn an_invalid_update_request_is_a_violation() {
    let dir = tempfile::tempdir().unwrap();
    let nfvo = double(dir.path());
    with_inventory(&nfvo);
    let invalid = json!({"updateType": "REMOVE_VNF", "removeVnfInstanceId": "vnf-1"});
    let r = post_json(&nfvo, "/nslcm/v2/ns_instances/ns-1/update", &invalid);
    assert_eq!(r.status, 400);
    let violations = nfvo.violations();
    assert_eq!(violations.len(), 1, "{violations:#?}");
    assert!(
        violations[0].starts_with("received UpdateNsRequest"),
        "{violations:#?}"
    );
    assert!(nfvo.vnf_in_ns("ns-1", "vnf-1"));

    let unsupported = json!({"updateType": "CHANGE_NS_DF"});
    let r = post_json(&nfvo, "/nslcm/v2/ns_instances/ns-1/update", &unsupported);
    assert_eq!(r.status, 422);
}

type MethodAndAuthorization = (String, Option<String>);

/// A plain-HTTP notification endpoint on 127.0.0.1 answering 204 to everything, keeping
/// (method, Authorization) and the JSON bodies it received.
struct Callback {
    base: String,
    seen: Arc<Mutex<Vec<MethodAndAuthorization>>>,
    bodies: Arc<Mutex<Vec<Value>>>,
}

impl Callback {
    fn start() -> Callback {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let (s, b) = (seen.clone(), bodies.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let method = line.split(' ').next().unwrap_or_default().to_string();
                let (mut length, mut auth) = (0, None);
                loop {
                    line.clear();
                    reader.read_line(&mut line).unwrap();
                    let header = line.trim_end();
                    if header.is_empty() {
                        break;
                    }
                    let (name, value) = header.split_once(':').unwrap();
                    match name.to_ascii_lowercase().as_str() {
                        "content-length" => length = value.trim().parse().unwrap(),
                        "authorization" => auth = Some(value.trim().to_string()),
                        _ => {}
                    }
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                s.lock().unwrap().push((method, auth));
                if length > 0 {
                    b.lock()
                        .unwrap()
                        .push(serde_json::from_slice(&body).unwrap());
                }
                let _ = stream.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
            }
        });
        Callback { base, seen, bodies }
    }

    fn seen(&self) -> Vec<MethodAndAuthorization> {
        self.seen.lock().unwrap().clone()
    }

    fn bodies(&self) -> Vec<Value> {
        self.bodies.lock().unwrap().clone()
    }
}

#[test]
fn down_refuses_connections_and_slow_answers_still_take_effect() {
    let dir = tempfile::tempdir().unwrap();
    let nfvo = Arc::new(double(dir.path()));
    with_inventory(&nfvo);
    let addr = nfvo.base().strip_prefix("https://").unwrap().to_string();

    nfvo.set_down(true);
    assert!(std::net::TcpStream::connect(&addr).is_err());
    nfvo.set_down(false);
    assert_eq!(
        nfvo.client_request("GET", "/nslcm/v2/ns_instances", &[V], None)
            .status,
        200
    );

    // The update is applied at once; only the answer waits.
    nfvo.op_duration(Duration::from_millis(10));
    nfvo.delay_response("POST", "/update", Duration::from_millis(500), 1);
    let remove = json!({"updateType": "REMOVE_VNF", "removeVnfInstanceId": ["vnf-1"]});
    let client = {
        let nfvo = nfvo.clone();
        std::thread::spawn(move || post_json(&nfvo, "/nslcm/v2/ns_instances/ns-1/update", &remove))
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    while nfvo.vnf_in_ns("ns-1", "vnf-1") {
        assert!(
            Instant::now() < deadline,
            "the delayed update never took effect"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Once the client has its answer, the double has recorded the request.
    assert_eq!(client.join().unwrap().status, 202);
    let update = nfvo
        .requests()
        .into_iter()
        .rfind(|r| r.method == "POST" && r.path.ends_with("/update"))
        .expect("the update is recorded");
    assert_eq!(update.status, 202);
    assert!(nfvo.violations().is_empty(), "{:#?}", nfvo.violations());
}

/// Every page of a list, following `Link: <...>; rel="next"`; the pages and the paths asked.
fn all_pages(nfvo: &NfvoDouble, path: &str) -> (Vec<Value>, Vec<String>) {
    let mut items = Vec::new();
    let mut asked = Vec::new();
    let mut next = Some(path.to_string());
    while let Some(path) = next.take() {
        let page = nfvo.client_request("GET", &path, &[V], None);
        assert_eq!(page.status, 200, "{path}: {:?}", page.body);
        items.extend(page.body.as_array().expect("a list").iter().cloned());
        asked.push(path);
        if let Some(link) = page.header("Link") {
            let uri = link
                .strip_prefix('<')
                .and_then(|l| l.split_once(">; rel=\"next\""))
                .map(|(u, _)| u)
                .expect("Link rel=next");
            next = Some(
                uri.strip_prefix(&nfvo.base())
                    .expect("absolute")
                    .to_string(),
            );
        }
    }
    (items, asked)
}

#[test]
fn lists_exclude_by_default_page_and_empty_while_restarting() {
    let dir = tempfile::tempdir().unwrap();
    let nfvo = double(dir.path());
    with_inventory(&nfvo);
    for ns in ["ns-2", "ns-3"] {
        nfvo.add_ns(ns, ns);
    }
    // SOL005 6.4.2.3.2: without a selector (or with exclude_default) no vnfInstance.
    for query in ["", "?exclude_default"] {
        let (list, asked) = all_pages(&nfvo, &format!("/nslcm/v2/ns_instances{query}"));
        assert_eq!(list.len(), 3, "{list:?}");
        assert_eq!(asked.len(), 2, "page size 2: {asked:?}");
        assert!(
            list.iter().all(|ns| ns.get("vnfInstance").is_none()),
            "{list:?}"
        );
    }
    for query in [
        "?fields=vnfInstance",
        "?all_fields",
        "?exclude_default&fields=vnfInstance",
    ] {
        let (list, _) = all_pages(&nfvo, &format!("/nslcm/v2/ns_instances{query}"));
        let ns1 = list.iter().find(|ns| ns["id"] == "ns-1").expect("ns-1");
        assert_eq!(
            ns1["vnfInstance"].as_array().map(Vec::len),
            Some(2),
            "{query}"
        );
    }
    let conflict = nfvo.client_request(
        "GET",
        "/nslcm/v2/ns_instances?all_fields&fields=vnfInstance",
        &[V],
        None,
    );
    assert_eq!(conflict.status, 400);
    let bad = nfvo.client_request(
        "GET",
        "/nslcm/v2/ns_instances?nextpage_opaque_marker=elsewhere",
        &[V],
        None,
    );
    assert_eq!(bad.status, 400);

    // Operation occurrences: operationParams present unless excluded, pages of one.
    nfvo.page_size(1);
    for vnf in ["vnf-1", "vnf-2"] {
        nfvo.notify_lcm("ns-1", vnf, "MODIFY_INFORMATION");
    }
    let (ops, asked) = all_pages(
        &nfvo,
        "/nslcm/v2/ns_lcm_op_occs?filter=(eq,nsInstanceId,ns-1)",
    );
    assert_eq!((ops.len(), asked.len()), (2, 2));
    assert!(
        asked[1].contains("filter=(eq,nsInstanceId,ns-1)"),
        "{asked:?}"
    );
    assert!(ops.iter().all(|o| o.get("operationParams").is_some()));
    let (ops, _) = all_pages(&nfvo, "/nslcm/v2/ns_lcm_op_occs?exclude_default");
    assert!(ops
        .iter()
        .all(|o| o.get("operationParams").is_none() && o.get("resourceChanges").is_none()));
    nfvo.omit_op_params(true);
    let (ops, _) = all_pages(&nfvo, "/nslcm/v2/ns_lcm_op_occs");
    assert!(ops.iter().all(|o| o.get("operationParams").is_none()));
    // ... the single resource keeps them.
    let id = ops[0]["id"].as_str().unwrap();
    let one = nfvo.client_request("GET", &format!("/nslcm/v2/ns_lcm_op_occs/{id}"), &[V], None);
    assert!(one.body.get("operationParams").is_some(), "{:?}", one.body);

    // Restarting: empty lists, unknown resources.
    nfvo.set_restarting(true);
    let (list, _) = all_pages(&nfvo, "/nslcm/v2/ns_instances?fields=vnfInstance");
    assert!(list.is_empty());
    let (ops, _) = all_pages(&nfvo, "/nslcm/v2/ns_lcm_op_occs");
    assert!(ops.is_empty());
    assert_eq!(
        nfvo.client_request("GET", "/nslcm/v2/ns_instances/ns-1", &[V], None)
            .status,
        404
    );
    nfvo.set_restarting(false);
    let (list, _) = all_pages(&nfvo, "/nslcm/v2/ns_instances?fields=vnfInstance");
    assert_eq!(list.len(), 3);
    assert!(nfvo.violations().is_empty(), "{:?}", nfvo.violations());
}

#[test]
fn retry_after_in_both_forms() {
    let dir = tempfile::tempdir().unwrap();
    let nfvo = double(dir.path());
    with_inventory(&nfvo);
    nfvo.fail_retry(
        "GET",
        "/ns_instances",
        503,
        1,
        common::nfvo::RetryAfter::Seconds(7),
    );
    nfvo.fail_retry(
        "GET",
        "/ns_instances",
        503,
        1,
        common::nfvo::RetryAfter::Date(Duration::from_secs(30)),
    );
    let first = nfvo.client_request("GET", "/nslcm/v2/ns_instances", &[V], None);
    assert_eq!(
        (first.status, first.header("Retry-After")),
        (503, Some("7"))
    );
    let second = nfvo.client_request("GET", "/nslcm/v2/ns_instances", &[V], None);
    let date = second.header("Retry-After").expect("Retry-After");
    let at = httpdate::parse_http_date(date).expect("an HTTP-date");
    assert!(
        at > std::time::SystemTime::now() + Duration::from_secs(20),
        "{date}"
    );
}
