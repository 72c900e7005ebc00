//! The Security Manager end to end against the SOL 005 NFVO test double: subscription,
//! notifications (auth, parsing, duplicates, reordering, loss), status, the three modes,
//! enforcement with erasure, crash recovery, NFVO faults, security VNFs.

mod common;

use std::time::Duration;

use common::nfvo::Delivery;
use common::sm::{wait_for, SmAgent, SmSetup, TERMINATE_ALL};
use nfv_warden::client::HttpsClient;
use serde_json::{json, Value};

/// Two NSs; vnf-1 (tampered package) in both, vnf-2 (good package) in ns-a.
fn inventory(sm: &SmAgent) {
    sm.nfvo.add_ns("ns-a", "core");
    sm.nfvo.add_ns("ns-b", "edge");
    sm.nfvo
        .add_vnf(&["ns-a"], "vnf-2", "vnfd-1", "pkg-good", "profile-2");
}

/// vnf-1 appears from the tampered package in ns-a and ns-b, and the NFVO tells the SM.
fn instantiate_tampered(sm: &SmAgent) -> String {
    sm.nfvo.add_vnf(
        &["ns-a", "ns-b"],
        "vnf-1",
        "vnfd-1",
        "pkg-tampered",
        "profile-1",
    );
    sm.nfvo.notify_lcm("ns-a", "vnf-1", "INSTANTIATE")
}

/// An SM in `mode` with the default rules, serving, with the two NSs of [`inventory`].
fn started(mode: &str) -> SmAgent {
    let mut sm = SmAgent::new(SmSetup {
        mode,
        ..Default::default()
    });
    inventory(&sm);
    sm.start();
    sm
}

fn update_types(sm: &SmAgent) -> Vec<(String, String)> {
    sm.updates()
        .into_iter()
        .filter(|(_, _, _, status)| *status == 202)
        .map(|(ns, body, _, _)| (ns, body["updateType"].as_str().unwrap_or("").to_string()))
        .collect()
}

/// The first request the double recorded with this method and a path containing `path`.
fn first<'a>(
    requests: &'a [common::nfvo::Recorded],
    method: &str,
    path: &str,
) -> Option<&'a common::nfvo::Recorded> {
    requests
        .iter()
        .find(|r| r.method == method && r.path.contains(path))
}

fn no_violations(sm: &SmAgent) {
    let v = sm.nfvo.violations();
    assert!(v.is_empty(), "SOL 005 schema violations: {v:#?}");
}

#[test]
fn subscribes_with_its_mode_over_independent_interface_keys() {
    let mut sm = SmAgent::new(SmSetup {
        mode: "SEMI_ACTIVE",
        ..Default::default()
    });
    inventory(&sm);
    let check = sm.warden(&["check"]);
    for interface in ["ns_lcm", "status_info", "sec_enforce", "security_vnf_mgmt"] {
        assert!(
            check.contains(&format!("ok   SM {interface} key")),
            "{interface} key not checked: {check}"
        );
    }
    assert_eq!(check.matches("matches its key").count(), 4, "{check}");
    assert!(!check.contains("FAIL"), "{check}");
    sm.start();
    assert_eq!(sm.nfvo.announced_mode().as_deref(), Some("SEMI_ACTIVE"));
    let subs = sm.nfvo.subscriptions();
    assert_eq!(subs.len(), 1, "{subs:#?}");
    let status = sm.sm_json(&["status", "--json"]);
    assert_eq!(status["sm"]["mode"], "SEMI_ACTIVE");
    // Every request carries a Version header; each interface has its own identity.
    let requests = sm.nfvo.requests();
    for r in &requests {
        // SOL 013 9.3: api_versions is the one unversioned resource.
        if !r.path.contains("/oauth2/") && !r.path.ends_with("/api_versions") {
            assert!(
                r.version.is_some(),
                "no Version header on {} {}",
                r.method,
                r.path
            );
        }
    }
    let who = |method: &str, path: &str| {
        first(&requests, method, path).and_then(|r| r.client_identity.clone())
    };
    assert_eq!(
        who("POST", "/subscriptions").as_deref(),
        Some("warden-sm.ns-lcm")
    );
    assert_eq!(
        who("GET", "/ns_instances").as_deref(),
        Some("warden-sm.status-info")
    );
    // Four distinct keys in the token (IFA 033 Security.001/.006).
    let keys = sm.warden(&["keys", "list"]);
    let sm_keys: Vec<&str> = keys.lines().filter(|l| l.contains("object=sm-")).collect();
    assert_eq!(sm_keys.len(), 4, "{keys}");
    let publics: std::collections::BTreeSet<String> = sm_keys
        .iter()
        .map(|l| sm.warden(&["keys", "show", l.split('\t').next().expect("uri")]))
        .map(|show| show.lines().skip_while(|l| !l.contains("BEGIN")).collect())
        .collect();
    assert_eq!(publics.len(), 4, "interface keys must be independent");
    // Restarting reuses the subscription for the same callback, or replaces a stale one.
    sm.kill9();
    sm.start();
    let subs = sm.nfvo.subscriptions();
    assert_eq!(subs.len(), 1, "stale subscription left behind: {subs:#?}");
    no_violations(&sm);
}

#[test]
fn status_reports_states_packages_connectivity_and_integrity() {
    let mut sm = SmAgent::new(SmSetup {
        mode: "PASSIVE",
        ..Default::default()
    });
    inventory(&sm);
    sm.nfvo.add_vnf(
        &["ns-a", "ns-b"],
        "vnf-1",
        "vnfd-1",
        "pkg-tampered",
        "profile-1",
    );
    sm.start();
    let status = sm.sm_json(&["status", "--json"]);
    let vnf = |id: &str| {
        status["vnfs"]
            .as_array()
            .expect("vnfs")
            .iter()
            .find(|v| v["vnfInstanceId"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("{id} missing: {status:#}"))
    };
    let good = vnf("vnf-2");
    assert_eq!(good["instantiationState"], "INSTANTIATED");
    assert_eq!(good["vnfState"], "STARTED");
    assert_eq!(good["vnfPkgId"], "pkg-good");
    assert_eq!(good["vnfdId"], "vnfd-1");
    assert!(!good["extVirtualLinkInfo"]
        .as_array()
        .expect("links")
        .is_empty());
    assert_eq!(good["package"]["integrity"], "VERIFIED");
    let bad = vnf("vnf-1");
    assert_eq!(bad["package"]["integrity"], "MISMATCH");
    assert_eq!(bad["nsInstanceIds"], json!(["ns-a", "ns-b"]));
    let text = sm.sm(&["status"]);
    assert!(
        text.contains("vnf-1") && text.contains("MISMATCH"),
        "{text}"
    );
    no_violations(&sm);
}

#[test]
fn passive_records_and_sends_nothing() {
    let sm = started("PASSIVE");
    instantiate_tampered(&sm);
    let action = sm.wait_action("terminate:vnf-1", "RECORDED");
    assert_eq!(action["mode"], "PASSIVE");
    assert!(sm.updates().is_empty(), "PASSIVE sent {:?}", sm.updates());
    assert!(sm.patches().is_empty());
    // An operator's request is refused too, in one line.
    let err = sm.agent.fails(&["sm", "terminate", "vnf-1"]);
    assert!(err.contains("PASSIVE"), "{err}");
    let err = sm.agent.fails(&[
        "sm",
        "security-vnf",
        "add",
        "--ns",
        "ns-a",
        "--vnf",
        "fw-1",
        "--profile",
        "fw",
    ]);
    assert!(err.contains("PASSIVE"), "{err}");
    assert!(sm.updates().is_empty());
    assert!(sm.nfvo.vnf_in_ns("ns-a", "vnf-1") && sm.nfvo.vnf_in_ns("ns-b", "vnf-1"));
    no_violations(&sm);
}

#[test]
fn semi_active_terminates_with_the_s_options_and_refuses_the_f_ones() {
    let sm = started("SEMI_ACTIVE");
    instantiate_tampered(&sm);
    let action = sm.wait_action("terminate:vnf-1", "COMPLETED");
    let refused = action["refused"].to_string();
    assert!(
        refused.contains("disablePackage") && refused.contains("erase"),
        "{refused}"
    );
    // Snapshot first, then one REMOVE_VNF per NS holding the VNF (IFA 033 6.4 NOTE 2).
    assert_eq!(
        update_types(&sm),
        [
            ("ns-a".to_string(), "CREATE_VNF_SNAPSHOT".to_string()),
            ("ns-a".to_string(), "REMOVE_VNF".to_string()),
            ("ns-b".to_string(), "REMOVE_VNF".to_string()),
        ]
    );
    for (_, body, identity, _) in sm.updates() {
        assert_eq!(identity.as_deref(), Some("warden-sm.sec-enforce"));
        assert!(
            body["terminateVnfData"][0]["additionalParams"]["etsiNfvSecurityErasure"].is_null(),
            "SEMI_ACTIVE must not ask for erasure: {body}"
        );
    }
    assert!(sm.patches().is_empty(), "SEMI_ACTIVE disabled a package");
    assert!(!sm.nfvo.vnf_in_ns("ns-a", "vnf-1") && !sm.nfvo.vnf_in_ns("ns-b", "vnf-1"));
    assert!(
        sm.nfvo.vnf_in_ns("ns-a", "vnf-2"),
        "the good VNF was touched"
    );
    no_violations(&sm);
}

#[test]
fn fully_active_disables_the_package_and_erases() {
    let mut sm = SmAgent::new(SmSetup::default());
    // A key the agent holds on behalf of vnf-1 (before serve: the CLI opens the store).
    let out = sm.warden(&[
        "keys",
        "generate",
        "--backend",
        "pkcs11",
        "--label",
        "vnf-1-key",
        "--purpose",
        "vnf",
        "--vnf-instance",
        "vnf-1",
    ]);
    assert!(out.contains("object=vnf-1-key"), "{out}");
    inventory(&sm);
    sm.start();
    instantiate_tampered(&sm);
    let action = sm.wait_action("terminate:vnf-1", "COMPLETED");
    assert!(action["refused"].as_array().expect("refused").is_empty());
    let updates = sm.updates();
    let removes: Vec<&Value> = updates
        .iter()
        .filter(|(_, b, _, _)| b["updateType"] == "REMOVE_VNF")
        .map(|(_, b, _, _)| b)
        .collect();
    assert_eq!(removes.len(), 2);
    for body in removes {
        assert_eq!(
            body["terminateVnfData"][0]["additionalParams"]["etsiNfvSecurityErasure"]["tpm"],
            true
        );
    }
    let patches = sm.patches();
    assert_eq!(patches.len(), 1);
    assert!(patches[0].path.ends_with("/vnf_packages/pkg-tampered"));
    assert_eq!(patches[0].body["operationalState"], "DISABLED");
    assert_eq!(
        sm.nfvo.package("pkg-tampered").expect("pkg")["operationalState"],
        "DISABLED"
    );
    // The erasure report: the agent's own key destroyed and checked, NFV-MANO's tracked.
    let report = sm.sm_json(&["erasure", "vnf-1"]);
    assert_eq!(
        report["local"].as_array().expect("local").len(),
        1,
        "{report:#}"
    );
    assert_eq!(report["local"][0]["verified"], true);
    assert!(report["local"][0]["object"]
        .as_str()
        .expect("object")
        .contains("vnf-1-key"));
    let mano = report["mano"].as_array().expect("mano");
    assert_eq!(mano.len(), 2, "{report:#}");
    assert!(mano.iter().all(|m| m["state"] == "COMPLETED"));
    sm.kill9();
    let keys = sm.warden(&["keys", "list"]);
    assert!(
        !keys.contains("vnf-1-key"),
        "key still in the token: {keys}"
    );
    no_violations(&sm);
}

#[test]
fn kill_9_mid_sequence_resumes_and_sends_nothing_twice() {
    let mut sm = started("FULLY_ACTIVE");
    // Operation occurrences in pages of one, listed without operationParams, and earlier
    // operations on ns-b: the one to adopt is on a later page and must be read on its own.
    sm.nfvo.page_size(1);
    sm.nfvo.omit_op_params(true);
    for _ in 0..3 {
        sm.nfvo.notify_lcm("ns-b", "vnf-2", "MODIFY_INFORMATION");
    }
    // The NFVO takes the REMOVE_VNF on ns-b but answers slowly: the agent dies waiting.
    sm.nfvo
        .hold_response("POST", "/ns_instances/ns-b/update", 1);
    instantiate_tampered(&sm);
    wait_for(
        "REMOVE_VNF on ns-b to arrive",
        Duration::from_secs(30),
        || {
            sm.updates()
                .iter()
                .any(|(ns, b, _, _)| ns == "ns-b" && b["updateType"] == "REMOVE_VNF")
        },
    );
    sm.kill9();
    sm.nfvo.release_responses();
    sm.start();
    sm.wait_action("terminate:vnf-1", "COMPLETED");
    let mut seen = std::collections::BTreeMap::new();
    for (ns, body, _, _) in sm.updates() {
        *seen
            .entry((ns, body["updateType"].as_str().unwrap_or("").to_string()))
            .or_insert(0) += 1;
    }
    for (what, count) in &seen {
        assert_eq!(*count, 1, "{what:?} sent {count} times: {seen:?}");
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(sm.patches().iter().filter(|p| p.status == 200).count(), 1);
    // The adoption went through the pages and the single resource.
    let requests = sm.nfvo.requests();
    assert!(requests
        .iter()
        .any(|r| r.path.contains("ns_lcm_op_occs?filter")
            && r.path.contains("nextpage_opaque_marker")));
    assert!(requests
        .iter()
        .any(|r| r.method == "GET" && r.path.contains("/ns_lcm_op_occs/")));
    no_violations(&sm);
}

#[test]
fn duplicate_reordered_and_lost_notifications() {
    let sm = started("FULLY_ACTIVE");
    let before = sm.nfvo.deliveries().len();
    // Duplicated: acknowledged twice, acted on once.
    sm.nfvo.set_delivery(Delivery::Duplicate);
    let id = instantiate_tampered(&sm);
    let deliveries = sm.nfvo.wait_deliveries(before + 2, Duration::from_secs(20));
    let copies: Vec<_> = deliveries.iter().filter(|(n, _)| *n == id).collect();
    assert_eq!(copies.len(), 2);
    assert!(
        copies.iter().all(|(_, status)| *status == 204),
        "{copies:?}"
    );
    sm.wait_action("terminate:vnf-1", "COMPLETED");
    assert_eq!(
        update_types(&sm)
            .iter()
            .filter(|(_, t)| t == "REMOVE_VNF")
            .count(),
        2
    );

    // Reordered: the second arrives first; both are handled.
    sm.nfvo.set_delivery(Delivery::Reorder);
    sm.nfvo
        .add_vnf(&["ns-a"], "vnf-3", "vnfd-1", "pkg-tampered", "profile-3");
    sm.nfvo.notify_lcm("ns-a", "vnf-3", "INSTANTIATE");
    sm.nfvo.set_delivery(Delivery::Normal);
    let mut change = sm.nfvo.notification("NsChangeNotification", "ns-a");
    change["nsComponentId"] = json!("vnf-2");
    sm.nfvo.notify(change);
    sm.wait_action("terminate:vnf-3", "COMPLETED");

    // Lost: nothing arrives; reconciliation (Query NS) finds the VNF.
    sm.nfvo.set_delivery(Delivery::Drop);
    sm.nfvo
        .add_vnf(&["ns-b"], "vnf-4", "vnfd-1", "pkg-tampered", "profile-4");
    let lost = sm.nfvo.notify_lcm("ns-b", "vnf-4", "INSTANTIATE");
    // The double's sender passed the notification (dropped it), a positive event: from here
    // on it can never arrive late.
    wait_for(
        "the double to drop the notification",
        Duration::from_secs(20),
        || sm.nfvo.dropped().contains(&lost),
    );
    // (Any other notification's Query NS would also find vnf-4: state, not messages, counts.)
    assert!(
        sm.nfvo.deliveries().iter().all(|(id, _)| *id != lost),
        "the notification was delivered"
    );
    sm.nfvo.set_delivery(Delivery::Normal);
    sm.sm(&["reconcile"]);
    sm.wait_action("terminate:vnf-4", "COMPLETED");
    assert!(!sm.nfvo.vnf_in_ns("ns-b", "vnf-4"));
    assert!(
        sm.nfvo.vnf_in_ns("ns-a", "vnf-2"),
        "the good VNF was touched"
    );
    no_violations(&sm);
}

/// The id of the SM's subscription at the double.
/// A client posting to the agent's callback endpoint as the NFVO would.
fn callback_client(sm: &SmAgent, identity: Option<(&str, &str)>) -> HttpsClient {
    let nfvo_dir = sm.dir().join("nfvo");
    let files = identity.map(|(c, k)| (nfvo_dir.join(c), nfvo_dir.join(k)));
    HttpsClient::new(
        &format!("https://127.0.0.1:{}", sm.port),
        &sm.dir().join("ca.pem"),
        files.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
    )
    .expect("client")
}

fn post(
    client: &HttpsClient,
    method: &str,
    headers: &[(&str, String)],
    body: &str,
) -> nfv_warden::client::ClientResponse {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut conn = client.connect().await.expect("connect");
        // application/json unless the caller gives its own Content-Type.
        let mut all = Vec::new();
        if !headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("content-type"))
        {
            all.push(("content-type", "application/json".to_string()));
        }
        all.extend_from_slice(headers);
        conn.request_with(
            method,
            "/sm/v1/notifications",
            &all,
            body.as_bytes().to_vec(),
        )
        .await
        .expect("request")
    })
}

fn basic(user: &str, password: &str) -> (&'static str, String) {
    use base64::Engine;
    (
        "authorization",
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        ),
    )
}

#[test]
fn notification_endpoint_auth_parsing_and_methods() {
    let sm = started("PASSIVE");
    let client = callback_client(&sm, None);
    let good = basic("warden-sm", "s3cret-notify-password");
    let valid = json!({
        "id": "n-manual-1", "notificationType": "NsIdentifierCreationNotification",
        "subscriptionId": sm.subscription_id(), "timeStamp": "2026-11-26T00:00:00Z", "nsInstanceId": "ns-a",
        "_links": {"nsInstance": {"href": "x"}}, "vendorExtension": {"x": 1},
    })
    .to_string();
    // 401 with a challenge, without or with wrong credentials.
    let r = post(&client, "POST", &[], &valid);
    assert_eq!(r.status, 401);
    assert!(r
        .headers
        .get("www-authenticate")
        .is_some_and(|v| v.to_str().unwrap_or("").starts_with("Basic")));
    assert_eq!(
        post(&client, "POST", &[basic("warden-sm", "wrong")], &valid).status,
        401
    );
    assert_eq!(
        post(&client, "GET", &[basic("warden-sm", "wrong")], "").status,
        401
    );
    // The test GET, then a notification with `timeStamp` and unknown fields.
    assert_eq!(
        post(&client, "GET", std::slice::from_ref(&good), "").status,
        204
    );
    assert_eq!(
        post(&client, "POST", std::slice::from_ref(&good), &valid).status,
        204
    );
    assert_eq!(
        post(&client, "POST", std::slice::from_ref(&good), &valid).status,
        204,
        "duplicate"
    );
    // 400 malformed or incomplete, 405 other methods, unknown types ignored.
    let r = post(&client, "POST", std::slice::from_ref(&good), "{not json");
    assert_eq!(r.status, 400);
    assert_eq!(
        r.headers
            .get("content-type")
            .map(|v| v.to_str().unwrap_or("")),
        Some("application/problem+json")
    );
    let missing = json!({"id": "n2", "notificationType": "NsChangeNotification",
        "subscriptionId": sm.subscription_id(), "timestamp": "t", "nsInstanceId": "ns-a"});
    let r = post(
        &client,
        "POST",
        std::slice::from_ref(&good),
        &missing.to_string(),
    );
    assert_eq!(r.status, 400);
    assert!(
        r.problem_detail().contains("nsComponentType"),
        "{}",
        r.problem_detail()
    );
    assert_eq!(
        post(&client, "PUT", std::slice::from_ref(&good), &valid).status,
        405
    );
    assert_eq!(
        post(&client, "DELETE", std::slice::from_ref(&good), "").status,
        405
    );
    let unknown = json!({"id": "n3", "notificationType": "VendorNotification",
        "subscriptionId": sm.subscription_id(), "timestamp": "t"});
    assert_eq!(
        post(
            &client,
            "POST",
            std::slice::from_ref(&good),
            &unknown.to_string()
        )
        .status,
        204
    );
}

#[test]
fn tls_cert_notifications_need_the_nfvos_certificate() {
    let mut sm = SmAgent::new(SmSetup {
        mode: "SEMI_ACTIVE",
        notification_auth: "TLS_CERT",
        ..Default::default()
    });
    inventory(&sm);
    sm.start();
    // The double subscribed with TLS_CERT and its test GET passed with its notifier cert.
    assert_eq!(
        sm.nfvo.subscriptions()[0]["callbackUri"]
            .as_str()
            .map(|u| u.contains("mode=SEMI_ACTIVE")),
        Some(true)
    );
    let body = json!({
        "id": "n-tls", "notificationType": "NsIdentifierCreationNotification",
        "subscriptionId": sm.subscription_id(), "timestamp": "2026-11-26T00:00:00Z", "nsInstanceId": "ns-a",
    })
    .to_string();
    let anonymous = callback_client(&sm, None);
    let r = post(&anonymous, "POST", &[], &body);
    assert_eq!(r.status, 401);
    assert!(r.headers.get("www-authenticate").is_some());
    // A certificate from the NFVO's CA with another identity: 403.
    let nfvo_dir = sm.dir().join("nfvo");
    common::shell::sh(
        &nfvo_dir,
        "openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout other.key \
         -out other.csr -subj /CN=someone-else 2>/dev/null && \
         printf 'extendedKeyUsage=clientAuth\\nsubjectAltName=DNS:someone-else\\n' > other.ext && \
         openssl x509 -req -in other.csr -CA nfvo-root.pem -CAkey nfvo-root.key -CAcreateserial \
         -days 2 -extfile other.ext -out other.pem 2>/dev/null",
    );
    let other = callback_client(&sm, Some(("other.pem", "other.key")));
    assert_eq!(post(&other, "POST", &[], &body).status, 403);
    let notifier = callback_client(&sm, Some(("nfvo-notifier.pem", "nfvo-notifier.key")));
    assert_eq!(post(&notifier, "POST", &[], &body).status, 204);
    // And the real flow: an enforcement triggered by a TLS_CERT-authenticated notification.
    instantiate_tampered(&sm);
    sm.wait_action("terminate:vnf-1", "COMPLETED");
    no_violations(&sm);
}

#[test]
fn oauth2_both_ways() {
    let mut sm = SmAgent::new(SmSetup {
        mode: "SEMI_ACTIVE",
        notification_auth: "OAUTH2_CLIENT_CREDENTIALS",
        nfvo_auth: "oauth2",
        ..Default::default()
    });
    inventory(&sm);
    sm.start();
    instantiate_tampered(&sm);
    sm.wait_action("terminate:vnf-1", "COMPLETED");
    // Every API request the SM made carried a Bearer token from the NFVO, from one client
    // per interface: the subscription, Query NS and UpdateNS tokens all differ.
    let requests = sm.nfvo.requests();
    for r in &requests {
        if r.path.starts_with("/nslcm/v2/") || r.path.starts_with("/vnfpkgm/v2/") {
            assert!(
                r.bearer.is_some(),
                "{} {} without a token",
                r.method,
                r.path
            );
        }
    }
    let token = |method: &str, path: &str| {
        first(&requests, method, path)
            .and_then(|r| r.bearer.clone())
            .unwrap_or_else(|| panic!("no {method} ...{path}"))
    };
    let tokens: std::collections::BTreeSet<String> = [
        token("POST", "/subscriptions"),
        token("GET", "/ns_instances"),
        token("POST", "/update"),
    ]
    .into();
    assert_eq!(tokens.len(), 3, "interfaces share an OAuth2 client");
    // A made-up token at the callback: 401 invalid_token.
    let client = callback_client(&sm, None);
    let r = post(
        &client,
        "POST",
        &[("authorization", "Bearer 99999999999.00.ff".into())],
        "{}",
    );
    assert_eq!(r.status, 401);
    assert!(r
        .headers
        .get("www-authenticate")
        .is_some_and(|v| v.to_str().unwrap_or("").contains("invalid_token")));
    no_violations(&sm);
}

#[test]
fn nfvo_faults_are_retried_sensibly() {
    let sm = started("SEMI_ACTIVE");
    // 409 (an operation in progress) twice, then a 503 with Retry-After, on the first
    // REMOVE_VNF: retried, accepted once.
    sm.nfvo
        .fail("POST", "/ns_instances/ns-a/update", 409, 2, None);
    sm.nfvo
        .fail("POST", "/ns_instances/ns-b/update", 503, 1, Some(1));
    instantiate_tampered(&sm);
    sm.wait_action("terminate:vnf-1", "COMPLETED");
    let a: Vec<u16> = sm
        .updates()
        .iter()
        .filter(|(ns, ..)| ns == "ns-a")
        .map(|u| u.3)
        .collect();
    assert_eq!(
        a.iter().filter(|s| **s == 202).count(),
        2,
        "snapshot + remove on ns-a: {a:?}"
    );
    assert_eq!(a.iter().filter(|s| **s == 409).count(), 2, "{a:?}");
    let b: Vec<u16> = sm
        .updates()
        .iter()
        .filter(|(ns, ..)| ns == "ns-b")
        .map(|u| u.3)
        .collect();
    assert_eq!(b, [503, 202]);

    // The NFVO fails every Query NS attempt after delivering a notification: the SM keeps
    // it pending and handles it at the next reconciliation.
    sm.nfvo
        .add_vnf(&["ns-b"], "vnf-5", "vnfd-1", "pkg-tampered", "profile-5");
    sm.nfvo.fail("GET", "/ns_instances", 503, 4, None);
    let id = sm.nfvo.notify_lcm("ns-b", "vnf-5", "INSTANTIATE");
    wait_for(
        "the notification to be acknowledged",
        Duration::from_secs(20),
        || {
            sm.nfvo
                .deliveries()
                .iter()
                .any(|(n, s)| *n == id && *s == 204)
        },
    );
    wait_for("four failed Query NS", Duration::from_secs(20), || {
        sm.nfvo
            .requests()
            .iter()
            .filter(|r| r.path.contains("/ns_instances?") && r.status == 503)
            .count()
            == 4
    });
    sm.sm(&["reconcile"]);
    sm.wait_action("terminate:vnf-5", "COMPLETED");

    // Down in the middle of an action: while the snapshot is processing the NFVO goes
    // away; the SM keeps the journaled step and carries on when it is back.
    sm.nfvo.op_duration(Duration::from_millis(1500));
    sm.nfvo
        .add_vnf(&["ns-a"], "vnf-6", "vnfd-1", "pkg-tampered", "profile-6");
    sm.nfvo.notify_lcm("ns-a", "vnf-6", "INSTANTIATE");
    wait_for("the snapshot of vnf-6", Duration::from_secs(20), || {
        sm.updates()
            .iter()
            .any(|(_, b, _, s)| *s == 202 && b["createSnapshotData"]["vnfInstanceId"] == "vnf-6")
    });
    sm.nfvo.set_down(true);
    let err = sm.agent.fails(&["sm", "status"]);
    assert!(err.contains("unreachable") || err.contains("503"), "{err}");
    std::thread::sleep(Duration::from_secs(2));
    sm.nfvo.set_down(false);
    sm.nfvo.op_duration(Duration::from_millis(50));
    sm.wait_action("terminate:vnf-6", "COMPLETED");
    assert!(!sm.nfvo.vnf_in_ns("ns-a", "vnf-6"));
    no_violations(&sm);
}

#[test]
fn security_vnfs_are_added_modified_and_removed() {
    let mut sm = SmAgent::new(SmSetup {
        mode: "SEMI_ACTIVE",
        rules: TERMINATE_ALL,
        ..Default::default()
    });
    inventory(&sm);
    sm.nfvo
        .add_vnf(&["ns-b"], "fw-1", "vnfd-fw", "pkg-good", "fw");
    sm.start();
    let out = sm.sm(&[
        "security-vnf",
        "add",
        "--ns",
        "ns-a",
        "--vnf",
        "fw-1",
        "--profile",
        "fw",
        "--wait",
    ]);
    assert!(out.contains("COMPLETED"), "{out}");
    assert!(sm.nfvo.vnf_in_ns("ns-a", "fw-1"));
    let out = sm.sm(&[
        "security-vnf",
        "modify",
        "--ns",
        "ns-a",
        "--vnf",
        "fw-1",
        "--name",
        "firewall-1",
        "--wait",
    ]);
    assert!(out.contains("COMPLETED"), "{out}");
    let out = sm.sm(&[
        "security-vnf",
        "remove",
        "--ns",
        "ns-a",
        "--vnf",
        "fw-1",
        "--wait",
    ]);
    assert!(out.contains("COMPLETED"), "{out}");
    assert!(!sm.nfvo.vnf_in_ns("ns-a", "fw-1"));
    let updates = sm.updates();
    let types: Vec<&str> = updates
        .iter()
        .map(|(_, b, _, _)| b["updateType"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(types, ["ADD_VNF", "MODIFY_VNF_INFORMATION", "REMOVE_VNF"]);
    assert!(updates
        .iter()
        .all(|(_, _, who, _)| who.as_deref() == Some("warden-sm.security-vnf-mgmt")));
    assert_eq!(updates[0].1["addVnfIstance"][0]["vnfProfileId"], "fw");
    assert_eq!(
        updates[1].1["modifyVnfInfoData"][0]["vnfInstanceName"],
        "firewall-1"
    );
    // The agent's own changes are not taken for someone else's.
    let actions = sm.sm(&["actions"]);
    assert!(!actions.contains("terminate:"), "{actions}");
    no_violations(&sm);
}

#[test]
fn unauthorized_change_terminates_with_a_replacement() {
    let rules = r#"
[[sm.rule]]
on = "unauthorized_change"
action = "terminate"
allow_replacement = true
"#;
    let mut sm = SmAgent::new(SmSetup {
        mode: "SEMI_ACTIVE",
        rules,
        ..Default::default()
    });
    inventory(&sm);
    sm.start();
    // An attempt to modify vnf-2 that the NFVO refused as unauthorized (Sc-Or.NsLcm.003).
    let mut n = sm
        .nfvo
        .notification("NsLcmOperationOccurrenceNotification", "ns-a");
    n["operationState"] = json!("FAILED");
    n["error"] = json!({"status": 403, "detail": "caller not authorized for vnf-2"});
    let changed = json!({"vnfInstanceId": "vnf-2"});
    n["affectedVnf"] = json!([{
        "vnfInstanceId": "vnf-2", "vnfdId": "vnfd-1", "vnfProfileId": "profile-2",
        "vnfName": "vnf-2", "changeType": "MODIFY_INFORMATION", "changeResult": "FAILED",
        "changedInfo": {"changedVnfInfo": changed}, "changedVnfInfo": changed,
    }]);
    sm.nfvo.notify(n);
    let action = sm.wait_action("terminate:vnf-2", "COMPLETED");
    assert_eq!(action["trigger"], "unauthorized_change");
    let updates = sm.updates();
    let types: Vec<&str> = updates
        .iter()
        .map(|(_, b, _, _)| b["updateType"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(types, ["REMOVE_VNF", "INSTANTIATE_VNF"]);
    let data = &updates[1].1["instantiateVnfData"][0];
    assert_eq!(data["vnfdId"], "vnfd-1");
    assert_eq!(data["vnfProfileId"], "profile-2");
    assert!(!sm.nfvo.vnf_in_ns("ns-a", "vnf-2"));
    // The replacement is the agent's own doing: no action against it. The notifications of
    // its operation were queued at the double before it reported the operation COMPLETED,
    // and the double delivers in order: once a marker queued now is acknowledged and the
    // journal has nothing pending, every one of them was processed.
    let marker = sm
        .nfvo
        .notification("NsIdentifierCreationNotification", "ns-a");
    let marker_id = marker["id"].as_str().expect("id").to_string();
    sm.nfvo.notify(marker);
    wait_for(
        "the marker acknowledged and the journal drained",
        Duration::from_secs(30),
        || {
            sm.nfvo
                .deliveries()
                .iter()
                .any(|(n, s)| *n == marker_id && *s == 204)
                && sm.sm_json(&["status", "--json"])["journal"]["pending"] == 0
        },
    );
    let actions = sm.sm(&["actions"]);
    assert_eq!(actions.lines().count(), 1, "{actions}");
    no_violations(&sm);
}

#[test]
fn a_failed_test_notification_is_a_422_and_the_sm_keeps_trying() {
    let mut sm = SmAgent::new(SmSetup {
        mode: "SEMI_ACTIVE",
        notification_auth: "TLS_CERT",
        ..Default::default()
    });
    // The agent expects another identity than the NFVO's notifier certificate carries, so
    // the NFVO's test GET gets 403 and the subscription 422 (SOL 005 6.4.16.3.1).
    let config = std::fs::read_to_string(&sm.agent.config).expect("config");
    std::fs::write(
        &sm.agent.config,
        config.replace(
            "client_identity = \"nfvo-notifier\"",
            "client_identity = \"nfvo-other\"",
        ),
    )
    .expect("config");
    sm.spawn();
    wait_for("two refused subscriptions", Duration::from_secs(30), || {
        sm.nfvo
            .requests()
            .iter()
            .filter(|r| r.method == "POST" && r.path.ends_with("/subscriptions") && r.status == 422)
            .count()
            >= 2
    });
    assert!(sm.nfvo.subscriptions().is_empty());
    no_violations(&sm);
}

#[test]
fn processed_notifications_leave_the_journal_after_the_retention() {
    let mut sm = SmAgent::new(SmSetup {
        mode: "PASSIVE",
        ..Default::default()
    });
    let config = std::fs::read_to_string(&sm.agent.config).expect("config");
    std::fs::write(
        &sm.agent.config,
        config.replace(
            "reconcile_seconds = 3600",
            "reconcile_seconds = 3600\njournal_retention_hours = 0",
        ),
    )
    .expect("config");
    inventory(&sm);
    sm.start();
    let client = callback_client(&sm, None);
    let auth = basic("warden-sm", "s3cret-notify-password");
    let body = json!({
        "id": "n-retained", "notificationType": "NsIdentifierCreationNotification",
        "subscriptionId": sm.subscription_id(), "timestamp": "2026-11-26T00:00:00Z", "nsInstanceId": "ns-a",
    })
    .to_string();
    assert_eq!(
        post(&client, "POST", std::slice::from_ref(&auth), &body).status,
        204
    );
    let journal = || sm.sm_json(&["status", "--json"])["journal"].clone();
    // The 204 means journaled as pending; the pending entry goes only when processed. Whether
    // a reconciliation (the first one after start-up may come at any time) pruned it already
    // or not is not observed here: that depends on timing.
    wait_for(
        "the notification processed",
        Duration::from_secs(60),
        || journal()["pending"] == 0,
    );
    sm.sm(&["reconcile"]);
    let j = journal();
    assert_eq!(j["notifications"], 0, "{j}");
    assert_eq!(j["processed"], 0, "{j}");
    // Past the retention the same id is new again.
    assert_eq!(
        post(&client, "POST", std::slice::from_ref(&auth), &body).status,
        204
    );
    wait_for(
        "the notification journaled again",
        Duration::from_secs(20),
        || journal()["notifications"] == 1,
    );
}

#[test]
fn an_operator_retries_a_failed_termination() {
    let sm = started("SEMI_ACTIVE");
    // The NFVO refuses the REMOVE_VNF on ns-b for good (400): the action fails.
    sm.nfvo
        .fail("POST", "/ns_instances/ns-b/update", 400, 1, None);
    instantiate_tampered(&sm);
    let failed = sm.wait_action("terminate:vnf-1", "FAILED");
    assert!(failed["steps"].to_string().contains("400"), "{failed:#}");
    assert!(sm.nfvo.vnf_in_ns("ns-b", "vnf-1"));
    // The operator tries again: a new attempt, with its own markers, completes.
    let out = sm.sm(&["terminate", "vnf-1", "--wait"]);
    assert!(out.contains("COMPLETED"), "{out}");
    assert!(!sm.nfvo.vnf_in_ns("ns-b", "vnf-1"));
    let removes_b = sm
        .updates()
        .into_iter()
        .filter(|(ns, b, _, status)| {
            ns == "ns-b" && b["updateType"] == "REMOVE_VNF" && *status == 202
        })
        .count();
    assert_eq!(removes_b, 1);
    no_violations(&sm);
}

/// A key the agent holds on behalf of `vnf` (before serve: the CLI opens the store).
fn vnf_key(sm: &SmAgent, vnf: &str) {
    let label = format!("{vnf}-key");
    let out = sm.warden(&[
        "keys",
        "generate",
        "--backend",
        "pkcs11",
        "--label",
        &label,
        "--purpose",
        "vnf",
        "--vnf-instance",
        vnf,
    ]);
    assert!(out.contains(&format!("object={label}")), "{out}");
}

/// The erasure report of `vnf`, if the SM wrote one.
fn erasure(sm: &SmAgent, vnf: &str) -> Option<Value> {
    let out = sm.agent.run(&["sm", "erasure", vnf]);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).expect("JSON"))
}

/// Every GET /ns_instances asked for vnfInstance (excluded by default, SOL 005 6.4.2.3.2).
fn always_asked_for_vnf_instances(sm: &SmAgent) {
    let lists: Vec<String> = sm
        .nfvo
        .requests()
        .into_iter()
        .filter(|r| {
            r.method == "GET"
                && r.path.contains("/ns_instances")
                && !r.path.contains("/ns_instances/")
        })
        .map(|r| r.path)
        .collect();
    assert!(!lists.is_empty());
    for path in &lists {
        assert!(path.contains("fields=vnfInstance"), "{path}");
    }
}

#[test]
fn status_and_terminate_see_every_vnf_behind_paging_and_default_exclusion() {
    let mut sm = SmAgent::new(SmSetup {
        mode: "SEMI_ACTIVE",
        rules: "",
        ..Default::default()
    });
    // 2 NSs x 3 VNFs, one NS per page.
    sm.nfvo.page_size(1);
    for ns in ["ns-a", "ns-b"] {
        sm.nfvo.add_ns(ns, ns);
        for i in 1..=3 {
            let vnf = format!("{ns}-vnf-{i}");
            sm.nfvo
                .add_vnf(&[ns], &vnf, "vnfd-1", "pkg-good", "profile-1");
        }
    }
    sm.start();
    let status = sm.sm_json(&["status", "--json"]);
    let mut vnfs: Vec<String> = status["vnfs"]
        .as_array()
        .expect("vnfs")
        .iter()
        .map(|v| v["vnfInstanceId"].as_str().unwrap_or_default().to_string())
        .collect();
    vnfs.sort();
    assert_eq!(
        vnfs,
        [
            "ns-a-vnf-1",
            "ns-a-vnf-2",
            "ns-a-vnf-3",
            "ns-b-vnf-1",
            "ns-b-vnf-2",
            "ns-b-vnf-3"
        ],
        "{status:#}"
    );
    assert!(
        sm.nfvo
            .requests()
            .iter()
            .any(|r| r.path.contains("/ns_instances?") && r.path.contains("nextpage_opaque_marker")),
        "the second page was never asked for"
    );
    // The operator terminates a VNF of the last page.
    let out = sm.sm(&["terminate", "ns-b-vnf-3", "--wait"]);
    assert!(out.contains("COMPLETED"), "{out}");
    assert!(!sm.nfvo.vnf_in_ns("ns-b", "ns-b-vnf-3"));
    // A page that cannot be read makes the whole view an error, never a shorter one.
    sm.nfvo.fail("GET", "nextpage_opaque_marker", 503, 4, None);
    let err = sm.agent.fails(&["sm", "status"]);
    assert!(err.contains("503"), "{err}");
    always_asked_for_vnf_instances(&sm);
    no_violations(&sm);
}

#[test]
fn absence_from_a_view_never_erases_a_completed_removal_does() {
    let mut sm = SmAgent::new(SmSetup {
        rules: "",
        ..Default::default()
    });
    vnf_key(&sm, "vnf-2");
    vnf_key(&sm, "vnf-7");
    inventory(&sm);
    sm.nfvo
        .add_vnf(&["ns-b"], "vnf-7", "vnfd-1", "pkg-good", "profile-7");
    sm.nfvo.page_size(1);
    sm.start();
    sm.sm(&["reconcile"]);

    // The NFVO restarting answers empty lists: a complete view without vnf-2, but no
    // evidence that it is terminated.
    sm.nfvo.set_restarting(true);
    sm.sm(&["reconcile"]);
    // A page that cannot be read: the reconciliation fails; nothing is judged.
    sm.nfvo.set_restarting(false);
    sm.nfvo.fail("GET", "nextpage_opaque_marker", 503, 4, None);
    sm.agent.fails(&["sm", "reconcile"]);
    // A notification arrives while the NFVO is restarting again (its Query NS sees nothing).
    sm.nfvo.set_restarting(true);
    let created = sm
        .nfvo
        .notification("NsIdentifierCreationNotification", "ns-a");
    let created_id = created["id"].as_str().expect("id").to_string();
    sm.nfvo.notify(created);
    wait_for(
        "the notification delivered",
        Duration::from_secs(60),
        || {
            sm.nfvo
                .deliveries()
                .iter()
                .any(|(n, s)| *n == created_id && *s == 204)
        },
    );
    let journal = || sm.sm_json(&["status", "--json"]);
    wait_for(
        "the notification processed",
        Duration::from_secs(60),
        || {
            sm.agent.run(&["sm", "actions"]).status.success() && {
                // status reads the NFVO (empty while restarting) and the journal.
                journal()["journal"]["pending"] == 0
            }
        },
    );
    sm.nfvo.set_restarting(false);
    sm.sm(&["reconcile"]);
    assert!(
        erasure(&sm, "vnf-2").is_none(),
        "{:?}",
        erasure(&sm, "vnf-2")
    );
    assert!(erasure(&sm, "vnf-7").is_none());

    // Someone else removes vnf-2 (its last NS) and the NFVO says so: a COMPLETED REMOVE is
    // evidence; the key is erased.
    sm.nfvo.remove_vnf("ns-a", "vnf-2");
    let id = sm.nfvo.notify_lcm("ns-a", "vnf-2", "REMOVE");
    wait_for("the erasure of vnf-2", Duration::from_secs(60), || {
        erasure(&sm, "vnf-2").is_some_and(|r| r["local"].as_array().is_some_and(|l| l.len() == 1))
    });
    let report = erasure(&sm, "vnf-2").expect("report");
    assert!(report["evidence"].to_string().contains(&id), "{report:#}");

    // vnf-7 is removed and the notification is lost; the operation occurrence (listed
    // without its details) is found at the next reconciliation and read on its own.
    sm.nfvo.omit_op_params(true);
    sm.nfvo.set_delivery(Delivery::Drop);
    sm.nfvo.remove_vnf("ns-b", "vnf-7");
    sm.nfvo.notify_lcm("ns-b", "vnf-7", "REMOVE");
    sm.sm(&["reconcile"]);
    let report = erasure(&sm, "vnf-7");
    let report = match report {
        Some(r) => r,
        None => {
            wait_for("the erasure of vnf-7", Duration::from_secs(60), || {
                erasure(&sm, "vnf-7").is_some()
            });
            erasure(&sm, "vnf-7").expect("report")
        }
    };
    assert!(
        report["evidence"].to_string().contains("ns_lcm_op_occs/"),
        "{report:#}"
    );
    sm.kill9();
    let keys = sm.warden(&["keys", "list"]);
    assert!(
        !keys.contains("vnf-2-key") && !keys.contains("vnf-7-key"),
        "{keys}"
    );
    always_asked_for_vnf_instances(&sm);
    no_violations(&sm);
}

#[test]
fn passive_keeps_the_keys_even_with_evidence() {
    let mut sm = SmAgent::new(SmSetup {
        mode: "PASSIVE",
        rules: "",
        ..Default::default()
    });
    vnf_key(&sm, "vnf-2");
    inventory(&sm);
    sm.start();
    sm.sm(&["reconcile"]);
    sm.nfvo.remove_vnf("ns-a", "vnf-2");
    sm.nfvo.notify_lcm("ns-a", "vnf-2", "REMOVE");
    wait_for(
        "the notification processed",
        Duration::from_secs(60),
        || {
            let j = sm.sm_json(&["status", "--json"])["journal"].clone();
            j["pending"] == 0 && j["processed"].as_u64() >= Some(1)
        },
    );
    sm.sm(&["reconcile"]);
    assert!(erasure(&sm, "vnf-2").is_none());
    sm.kill9();
    let keys = sm.warden(&["keys", "list"]);
    assert!(keys.contains("vnf-2-key"), "{keys}");
}

/// Rewrite the mode in the agent's config (takes effect at the next start).
fn set_mode(sm: &SmAgent, from: &str, to: &str) {
    let config = std::fs::read_to_string(&sm.agent.config).expect("config");
    let from = format!("mode = \"{from}\"");
    assert!(config.contains(&from));
    std::fs::write(
        &sm.agent.config,
        config.replace(&from, &format!("mode = \"{to}\"")),
    )
    .expect("config");
}

#[test]
fn after_a_downgrade_unsent_steps_are_cancelled_not_sent() {
    let mut sm = started("FULLY_ACTIVE");
    // The snapshot (the first step) is answered slowly: the agent dies waiting.
    sm.nfvo
        .hold_response("POST", "/ns_instances/ns-a/update", 1);
    instantiate_tampered(&sm);
    wait_for("the snapshot to arrive", Duration::from_secs(30), || {
        sm.updates()
            .iter()
            .any(|(_, b, _, _)| b["updateType"] == "CREATE_VNF_SNAPSHOT")
    });
    sm.kill9();
    sm.nfvo.release_responses();
    set_mode(&sm, "FULLY_ACTIVE", "SEMI_ACTIVE");
    sm.start();
    let action = sm.wait_action("terminate:vnf-1", "CANCELLED");
    let reason = action["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("SEMI_ACTIVE") && reason.contains("FULLY_ACTIVE"),
        "{action:#}"
    );
    // The snapshot (allowed in SEMI_ACTIVE, sent before) was adopted, not sent again; the
    // REMOVE_VNF asking for erasure and the package PATCH (FULLY_ACTIVE) never left.
    let types: Vec<String> = sm
        .updates()
        .iter()
        .map(|(_, b, _, _)| b["updateType"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(types, ["CREATE_VNF_SNAPSHOT"], "{types:?}");
    assert!(sm.patches().is_empty());
    // The operator cannot cancel a finished action; a new termination replaces this one.
    let err = sm.agent.fails(&["sm", "cancel", "terminate:vnf-1"]);
    assert!(
        err.contains("CANCELLED") || err.contains("Cancelled"),
        "{err}"
    );
    let out = sm.sm(&["terminate", "vnf-1", "--wait"]);
    assert!(out.contains("COMPLETED"), "{out}");
    assert!(!sm.nfvo.vnf_in_ns("ns-b", "vnf-1"));
    no_violations(&sm);
}

#[test]
fn an_operator_cancels_a_running_action() {
    let sm = started("SEMI_ACTIVE");
    // Every REMOVE_VNF on ns-a is refused as "busy" for a long while: the action waits.
    sm.nfvo
        .fail("POST", "/ns_instances/ns-a/update", 503, 1000, None);
    instantiate_tampered(&sm);
    wait_for("a refused UpdateNS", Duration::from_secs(30), || {
        sm.updates().iter().any(|(_, _, _, s)| *s == 503)
    });
    let out = sm.sm(&["cancel", "terminate:vnf-1"]);
    assert!(
        out.contains("CANCELLED") && out.contains("cancelled by"),
        "{out}"
    );
    let action = sm.action("terminate:vnf-1").expect("action");
    assert_eq!(action["state"], "CANCELLED");
    assert!(sm.nfvo.vnf_in_ns("ns-a", "vnf-1"));
}

#[test]
fn a_recorded_termination_does_not_block_after_switching_mode() {
    let mut sm = started("PASSIVE");
    instantiate_tampered(&sm);
    sm.wait_action("terminate:vnf-1", "RECORDED");
    assert!(sm.updates().is_empty());
    sm.kill9();
    set_mode(&sm, "PASSIVE", "SEMI_ACTIVE");
    sm.start();
    // The first reconciliation evaluates the rules on the reconciled state: vnf-1's
    // package still does not match its pin, with no new notification about it.
    let action = sm.wait_action("terminate:vnf-1", "COMPLETED");
    assert_eq!(action["mode"], "SEMI_ACTIVE");
    assert!(!sm.nfvo.vnf_in_ns("ns-a", "vnf-1") && !sm.nfvo.vnf_in_ns("ns-b", "vnf-1"));
    // --wait shows each step's NS (camelCase in the action JSON).
    let out = sm.sm(&["actions", "terminate:vnf-1"]);
    assert!(out.contains("\"nsInstanceId\": \"ns-a\""), "{out}");
    no_violations(&sm);
}

#[test]
fn notifications_need_json_and_answers_carry_the_negotiated_version() {
    let sm = started("PASSIVE");
    let client = callback_client(&sm, None);
    let good = basic("warden-sm", "s3cret-notify-password");
    let body = json!({
        "id": "n-typed", "notificationType": "NsIdentifierCreationNotification",
        "subscriptionId": sm.subscription_id(), "timestamp": "2026-11-26T00:00:00Z", "nsInstanceId": "ns-a",
    })
    .to_string();
    for content_type in ["text/plain", "application/x-www-form-urlencoded"] {
        let r = post(
            &client,
            "POST",
            &[good.clone(), ("content-type", content_type.to_string())],
            &body,
        );
        assert_eq!(r.status, 415, "{content_type}");
    }
    let r = post(
        &client,
        "POST",
        &[
            good.clone(),
            (
                "content-type",
                "application/json; charset=utf-8".to_string(),
            ),
        ],
        &body,
    );
    assert_eq!(r.status, 204);
    // A notification for a subscription that is not this SM's is refused.
    let foreign = body.replace(&sm.subscription_id(), "someone-elses-subscription");
    assert_eq!(
        post(&client, "POST", std::slice::from_ref(&good), &foreign).status,
        422
    );
    // The double offers NS LCM 2.3.0: the version negotiated is the one answered.
    assert_eq!(
        r.headers.get("version").and_then(|v| v.to_str().ok()),
        Some("2.3.0")
    );
}

/// An NFVO answering with more than `sm.nfvo.max_response_bytes` (16 MiB by default, 64 KiB
/// here so that no transfer is slow on a loaded machine): the request fails with an error
/// naming the NFVO and the limit, and the SM reads normal answers afterwards.
#[test]
fn an_oversize_nfvo_answer_is_refused_naming_the_peer_and_the_limit() {
    let limit = 65_536;
    let mut sm = SmAgent::new(SmSetup {
        mode: "PASSIVE",
        ..Default::default()
    });
    let config = std::fs::read_to_string(&sm.agent.config).expect("config");
    std::fs::write(
        &sm.agent.config,
        config.replacen(
            "attempts = 4\n",
            &format!("attempts = 4\nmax_response_bytes = {limit}\n"),
            1,
        ),
    )
    .expect("config");
    inventory(&sm);
    sm.start();
    // Every NS list oversize (the SM's own reconciliations read it too, at any time).
    sm.nfvo
        .oversize("GET", "/ns_instances", limit + 1, usize::MAX);
    let err = sm.agent.fails(&["sm", "status"]);
    let authority = sm.nfvo.base().trim_start_matches("https://").to_string();
    assert!(
        err.contains(&format!("larger than the limit of {limit} bytes"))
            && err.contains(&authority)
            && err.contains("max_response_bytes"),
        "{err}"
    );
    // Normal answers again: the next view is complete.
    sm.nfvo.clear_faults();
    let status = sm.sm_json(&["status", "--json"]);
    assert!(status.to_string().contains("vnf-2"), "{status:#}");
    no_violations(&sm);
}

/// An oversize NFVO answer is the NFVO's doing and the same on every attempt: the SM sends the
/// request once however many `sm.nfvo.attempts` it has (4 here), fails with the limit named,
/// and reads normally again once the NFVO answers normally, without a restart.
#[test]
fn an_oversize_nfvo_answer_is_not_retried() {
    let limit = 65_536;
    let mut sm = SmAgent::new(SmSetup {
        mode: "PASSIVE",
        ..Default::default()
    });
    let config = std::fs::read_to_string(&sm.agent.config).expect("config");
    assert!(config.contains("attempts = 4\n"), "{config}");
    std::fs::write(
        &sm.agent.config,
        config.replacen(
            "attempts = 4\n",
            &format!("attempts = 4\nmax_response_bytes = {limit}\n"),
            1,
        ),
    )
    .expect("config");
    inventory(&sm);
    sm.start();
    // Reconciliations run one at a time on the processor: once this one has answered, the
    // start-up one is over too, and nothing else reads the NFVO on its own (PASSIVE, no
    // notification, the periodic reconciliation an hour away).
    sm.sm(&["reconcile"]);
    let ns_reads = |sm: &SmAgent| {
        sm.nfvo
            .requests()
            .iter()
            .filter(|r| r.method == "GET" && r.path.contains("/ns_instances"))
            .count()
    };
    let before = ns_reads(&sm);
    sm.nfvo
        .oversize("GET", "/ns_instances", limit + 1, usize::MAX);
    let err = sm.agent.fails(&["sm", "reconcile"]);
    assert!(
        err.contains(&format!("larger than the limit of {limit} bytes"))
            && err.contains("max_response_bytes"),
        "{err}"
    );
    // The double records a request before it answers, so the count is final here.
    assert_eq!(
        ns_reads(&sm) - before,
        1,
        "the oversize answer was asked for again: {:#?}",
        sm.nfvo.requests()
    );
    // Normal answers again: the same agent reconciles.
    sm.nfvo.clear_faults();
    sm.sm(&["reconcile"]);
    no_violations(&sm);
}
