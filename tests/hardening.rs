//! The CMF's HTTP edges against hostile or broken input (issue 10 §4, issue 9 §4): a corrupt
//! stored record is a permanent 500, not a 503 to retry for ever; the SOL 013 `Version`
//! header; per-role client trust; security events in logs, counters and the audit chain.
//! The CA key is in a real SoftHSM token; clients are real TLS clients (ours, or curl).

mod common;

use common::cmf::CmfAgent;
use serde_json::json;

const REGISTRATIONS: &str = "/certmgmt/v1/registrations";

fn register_body(subjects: &[&str]) -> serde_json::Value {
    json!({
        "certType": "VNFCI_CERT",
        "subjectIds": subjects,
        "typeOfVnfcCertHandling": "DELEGATION_MODE",
    })
}

/// A record that no longer decodes (written with the store API as a value of another shape)
/// is a permanent fault: 500 with a ProblemDetails that says so, never 503 + Retry-After.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_record_is_500_not_503() {
    let mut agent = CmfAgent::new("");
    agent.start();
    let mut vnfm = agent
        .client(Some("vnfm-a"))
        .connect()
        .await
        .expect("connect");
    let created = vnfm
        .post_json(REGISTRATIONS, &register_body(&["corrupt-1.vnf.example"]))
        .await
        .unwrap();
    assert_eq!(created.status, 201, "{}", created.problem_detail());
    let id = created.json().unwrap()["id"].as_str().unwrap().to_string();
    drop(vnfm);
    agent.stop();

    // Garbage where a registration was: valid JSON of the wrong shape, as a bug or a bad
    // restore would leave it.
    {
        const RAW: nfv_warden::store::Table<serde_json::Value> =
            nfv_warden::store::Table::new("cmf_registrations");
        let store = nfv_warden::store::Store::open(&agent.store_path()).expect("store");
        store
            .write(|tx| tx.put(&RAW, &id, &json!({ "not": "a registration" })))
            .expect("write garbage");
    }

    agent.start();
    let mut vnfm = agent
        .client(Some("vnfm-a"))
        .connect()
        .await
        .expect("connect");
    let read = vnfm.get(&format!("{REGISTRATIONS}/{id}")).await.unwrap();
    assert_eq!(read.status, 500, "{}", read.problem_detail());
    assert!(read.headers.get("retry-after").is_none());
    assert_eq!(read.headers["content-type"], "application/problem+json");
    let detail = read.problem_detail();
    assert!(
        detail.contains("permanent") && detail.contains("cmf_registrations"),
        "{detail}"
    );
    // The agent still serves everything else.
    let other = vnfm
        .post_json(REGISTRATIONS, &register_body(&["corrupt-2.vnf.example"]))
        .await
        .unwrap();
    assert_eq!(other.status, 201, "{}", other.problem_detail());
}

/// RFC 5280 6.1.3: a certificate is not valid past its issuer's notAfter. A CA of 2 days
/// issuing a 365-day TLS certificate: the leaf ends when the CA does.
#[test]
fn a_leaf_never_outlives_its_ca() {
    let agent = common::agent::Agent::new("");
    agent.ok(&["ca", "init", "--subject", "CN=short CA", "--days", "2"]);
    agent.ok(&["tls", "init", "--san", "localhost", "--days", "365"]);
    let pem = std::fs::read_to_string(agent.dir().join("tls-chain.pem")).unwrap();
    let chain = nfv_warden::pki::certificates_from_pem(&pem).unwrap();
    let (leaf, ca) = (&chain[0], &chain[1]);
    let ca_end = ca.tbs_certificate().validity().not_after.to_unix_duration();
    let leaf_end = leaf
        .tbs_certificate()
        .validity()
        .not_after
        .to_unix_duration();
    let leaf_start = leaf
        .tbs_certificate()
        .validity()
        .not_before
        .to_unix_duration();
    assert_eq!(leaf_end, ca_end, "leaf notAfter clamped to the CA's");
    assert!(leaf_start < leaf_end);
}

/// `sm init --csr-out`: the four interface keys are TLS clients, so each CSR's
/// extensionRequest (PKCS #9 1.2.840.113549.1.9.14) asks for an end entity: CA:FALSE,
/// digitalSignature only, clientAuth. Never CA:TRUE or keyCertSign/cRLSign.
#[test]
fn sm_interface_csrs_ask_for_end_entity_client_certificates() {
    use der::{Decode, DecodePem, Encode};
    use x509_cert::ext::pkix::{BasicConstraints, ExtendedKeyUsage, KeyUsage, KeyUsages};
    let sm = common::sm::SmAgent::new(common::sm::SmSetup::default());
    let out = sm.dir().join("csrs");
    std::fs::create_dir_all(&out).unwrap();
    sm.warden(&["sm", "init", "--csr-out", out.to_str().unwrap()]);
    let mut seen = 0;
    for entry in std::fs::read_dir(&out).unwrap() {
        let path = entry.unwrap().path();
        let pem = std::fs::read_to_string(&path).unwrap();
        let csr = x509_cert::request::CertReq::from_pem(pem.as_bytes()).unwrap();
        let attribute = csr
            .info
            .attributes
            .iter()
            .find(|a| a.oid == const_oid::db::rfc5912::ID_EXTENSION_REQ)
            .unwrap_or_else(|| panic!("{}: no extensionRequest", path.display()));
        let value = attribute.values.iter().next().unwrap();
        let requested =
            x509_cert::request::ExtensionReq::from_der(&value.to_der().unwrap()).unwrap();
        let mut basic = None;
        let mut usage = None;
        let mut eku = None;
        for ext in &requested.0 {
            let bytes = ext.extn_value.as_bytes();
            if ext.extn_id == const_oid::db::rfc5280::ID_CE_BASIC_CONSTRAINTS {
                basic = Some(BasicConstraints::from_der(bytes).unwrap());
            } else if ext.extn_id == const_oid::db::rfc5280::ID_CE_KEY_USAGE {
                usage = Some(KeyUsage::from_der(bytes).unwrap());
            } else if ext.extn_id == const_oid::db::rfc5280::ID_CE_EXT_KEY_USAGE {
                eku = Some(ExtendedKeyUsage::from_der(bytes).unwrap());
            }
        }
        let basic = basic.expect("basicConstraints requested");
        assert!(!basic.ca, "{}: CA:TRUE requested", path.display());
        let usage = usage.expect("keyUsage requested");
        assert_eq!(
            usage.0,
            der::flagset::FlagSet::<KeyUsages>::from(KeyUsages::DigitalSignature),
            "{}",
            path.display()
        );
        assert!(!usage.0.contains(KeyUsages::KeyCertSign) && !usage.0.contains(KeyUsages::CRLSign));
        assert_eq!(
            eku.expect("extendedKeyUsage requested").0,
            vec![const_oid::db::rfc5280::ID_KP_CLIENT_AUTH]
        );
        seen += 1;
    }
    assert_eq!(seen, 4, "one CSR per Sc-Or interface");
}

/// SOL 013 9.2: every request to the CMF API names its version. Missing: 400; a version not
/// served (`2.0.0`, `banana`): 406; both ProblemDetails naming the supported versions. EST
/// (RFC 7030) needs no such header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_header_missing_or_unsupported_is_refused_as_sol_013_says() {
    let mut agent = CmfAgent::new("");
    agent.start();
    let mut bare = agent
        .client_without_version(Some("vnfm-a"))
        .connect()
        .await
        .expect("connect");
    let body = register_body(&["version-1.vnf.example"]).to_string();
    let json = ("content-type", "application/json".to_string());
    for path in ["/certmgmt/api_versions", REGISTRATIONS] {
        let missing = bare.get(path).await.unwrap();
        check_missing(path, missing);
    }
    // The CMF API's other resources (attestation nonces, the consumer's revocation) too.
    for path in [
        format!("{REGISTRATIONS}/0123/attestation_nonces"),
        "/certmgmt/v1/certificates/01/revoke".to_string(),
    ] {
        let missing = bare
            .request_with("POST", &path, std::slice::from_ref(&json), b"{}".to_vec())
            .await
            .unwrap();
        check_missing(&path, missing);
    }
    fn check_missing(path: &str, missing: nfv_warden::client::ClientResponse) {
        assert_eq!(missing.status, 400, "{path}: {}", missing.problem_detail());
        assert_eq!(missing.headers["content-type"], "application/problem+json");
        assert!(
            missing
                .problem_detail()
                .contains("Version header is required")
                && missing.problem_detail().contains("1.0.0"),
            "{}",
            missing.problem_detail()
        );
    }
    let missing = bare
        .request_with(
            "POST",
            REGISTRATIONS,
            std::slice::from_ref(&json),
            body.clone(),
        )
        .await
        .unwrap();
    assert_eq!(missing.status, 400, "{}", missing.problem_detail());
    for version in ["2.0.0", "banana", "1.0"] {
        let refused = bare
            .request_with(
                "POST",
                REGISTRATIONS,
                &[json.clone(), ("version", version.to_string())],
                body.clone(),
            )
            .await
            .unwrap();
        assert_eq!(
            refused.status,
            406,
            "{version}: {}",
            refused.problem_detail()
        );
        assert_eq!(refused.headers["content-type"], "application/problem+json");
        let detail = refused.problem_detail();
        assert!(
            detail.contains(version) && detail.contains("1.0.0"),
            "{detail}"
        );
    }
    // Nothing was registered by the refused requests; the supported version is served.
    let served = bare
        .request_with(
            "POST",
            REGISTRATIONS,
            &[json.clone(), ("version", "1.0.0".to_string())],
            body.clone(),
        )
        .await
        .unwrap();
    assert_eq!(served.status, 201, "{}", served.problem_detail());
    let versions = bare
        .request_with(
            "GET",
            "/certmgmt/api_versions",
            &[("version", "1.0.0".to_string())],
            Vec::new(),
        )
        .await
        .unwrap();
    assert_eq!(versions.status, 200);
    assert_eq!(
        versions.json().unwrap()["apiVersions"][0]["version"],
        "1.0.0"
    );
    // EST has no Version header (RFC 7030), and health neither.
    let cacerts = bare.get("/.well-known/est/cacerts").await.unwrap();
    assert_eq!(cacerts.status, 200);
    let health = bare.get("/healthz").await.unwrap();
    assert_eq!(health.status, 200);
}

/// One agent serving the CMF (consumer roots: vnfm-root) and the SM with TLS_CERT
/// notifications (the NFVO's roots). Per-role trust (issue 9 §4): a certificate from the
/// NFVO's CA named like a CMF consumer is not that consumer (403 on the REST API and on
/// EST), and a certificate from the consumers' CA named like the NFVO's notifier is refused
/// by the notification endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_trusts_only_its_own_roots() {
    use common::shell::sh;
    use nfv_warden::client::HttpsClient;
    let mut sm = common::sm::SmAgent::new(common::sm::SmSetup {
        mode: "PASSIVE",
        notification_auth: "TLS_CERT",
        ..Default::default()
    });
    let dir = sm.dir().to_path_buf();
    let nfvo_dir = dir.join("nfvo");
    let config = std::fs::read_to_string(&sm.agent.config).unwrap();
    std::fs::write(
        &sm.agent.config,
        format!(
            "{config}\n[cmf]\nclient_ca = \"{}/vnfm-root.pem\"\n\n[[cmf.consumer]]\n\
             id = \"vnfm-a\"\ntrust_domain = \"operator-a\"\n\n[[cmf.trust_domain]]\n\
             id = \"operator-a\"\ndns_suffixes = [\"vnf.example\"]\ncas = [\"default\"]\n",
            dir.display()
        ),
    )
    .unwrap();
    let leaf = |dir: &std::path::Path, name: &str, san: &str, ca: &str| {
        sh(
            dir,
            &format!(
                "openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
                 -keyout {name}.key -out {name}.csr -subj /CN={san} 2>/dev/null && \
                 printf 'extendedKeyUsage=clientAuth\\nsubjectAltName=DNS:{san}\\nbasicConstraints=CA:FALSE\\n' > {name}.ext && \
                 openssl x509 -req -in {name}.csr -CA {ca}.pem -CAkey {ca}.key -CAcreateserial \
                 -days 2 -extfile {name}.ext -out {name}.pem 2>/dev/null"
            ),
        );
    };
    sh(
        &dir,
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
         -keyout vnfm-root.key -out vnfm-root.pem -subj /CN=vnfm-root -days 30 2>/dev/null",
    );
    leaf(&dir, "vnfm-a", "vnfm-a", "vnfm-root");
    // The NFVO's PKI, a consumer's name.
    leaf(&nfvo_dir, "impostor-vnfm-a", "vnfm-a", "nfvo-root");
    // The consumers' PKI, the NFVO notifier's name.
    leaf(&dir, "impostor-notifier", "nfvo-notifier", "vnfm-root");
    sm.start();

    let client = |cert: std::path::PathBuf| {
        let key = cert.with_extension("key");
        HttpsClient::new(
            &format!("https://127.0.0.1:{}", sm.port),
            &dir.join("ca.pem"),
            Some((cert.as_path(), key.as_path())),
        )
        .unwrap()
        .with_default_header("Version", nfv_warden::api::cmf::API_VERSION)
    };
    let mut genuine = client(dir.join("vnfm-a.pem")).connect().await.unwrap();
    let listed = genuine.get(REGISTRATIONS).await.unwrap();
    assert_eq!(listed.status, 200, "{}", listed.problem_detail());

    let mut impostor = client(nfvo_dir.join("impostor-vnfm-a.pem"))
        .connect()
        .await
        .unwrap();
    let refused = impostor.get(REGISTRATIONS).await.unwrap();
    assert_eq!(refused.status, 403, "{}", refused.problem_detail());
    assert!(refused.problem_detail().contains("consumer roots"));
    let refused = impostor
        .post_json(REGISTRATIONS, &register_body(&["impostor.vnf.example"]))
        .await
        .unwrap();
    assert_eq!(refused.status, 403, "{}", refused.problem_detail());
    let est = impostor
        .request_with(
            "POST",
            "/.well-known/est/simpleenroll",
            &[("content-type", "application/pkcs10".to_string())],
            b"MIIB".to_vec(),
        )
        .await
        .unwrap();
    assert_eq!(est.status, 403, "{}", est.problem_detail());
    assert!(est.problem_detail().contains("consumer roots"));

    // The converse on the SM's notification endpoint.
    let body = json!({
        "id": "n-roles", "notificationType": "NsIdentifierCreationNotification",
        "subscriptionId": sm.subscription_id(), "timestamp": "2026-11-26T00:00:00Z",
        "nsInstanceId": "ns-a",
    })
    .to_string();
    let json_type = ("content-type", "application/json".to_string());
    let mut notifier = client(dir.join("impostor-notifier.pem"))
        .connect()
        .await
        .unwrap();
    let refused = notifier
        .request_with(
            "POST",
            "/sm/v1/notifications",
            std::slice::from_ref(&json_type),
            body.clone(),
        )
        .await
        .unwrap();
    assert_eq!(refused.status, 403, "{}", refused.problem_detail());
    assert!(refused.problem_detail().contains("notification roots"));
    let mut real = client(nfvo_dir.join("nfvo-notifier.pem"))
        .connect()
        .await
        .unwrap();
    let accepted = real
        .request_with("POST", "/sm/v1/notifications", &[json_type], body)
        .await
        .unwrap();
    assert_eq!(accepted.status, 204, "{}", accepted.problem_detail());
}

/// `warden_security_events_total` as the metrics listener shows it now.
fn security_events(metrics_port: u16, event: &str, status: &str) -> u64 {
    let out = std::process::Command::new("curl")
        .args(["-s", &format!("http://127.0.0.1:{metrics_port}/metrics")])
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout);
    let series = format!("warden_security_events_total{{event=\"{event}\",status=\"{status}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// Security events (issue 10 §4): 401/403 answers and failed handshakes are counted; a
/// refused authenticated client is audited once per event with its identity, while an
/// anonymous flood (requests without a certificate, broken handshakes) becomes one summary
/// record per interval with the counts, so it cannot grow the audit chain per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_events_are_counted_and_audited_without_unbounded_growth() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap();
    let mut agent = CmfAgent::new(&format!(
        "\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n"
    ));
    let started = std::time::Instant::now();
    agent.start();
    const ANONYMOUS: u64 = 40;
    const BROKEN_HANDSHAKES: u64 = 5;
    const UNKNOWN_CONSUMER: u64 = 3;
    let mut anonymous = agent.client(None).connect().await.unwrap();
    for _ in 0..ANONYMOUS {
        assert_eq!(anonymous.get(REGISTRATIONS).await.unwrap().status, 401);
    }
    for _ in 0..BROKEN_HANDSHAKES {
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", agent.port))
            .await
            .unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut rest = Vec::new();
        // The server closes the connection (maybe after a TLS alert).
        let _ = tcp.read_to_end(&mut rest).await;
    }
    let mut unknown = agent.client(Some("vnfm-x")).connect().await.unwrap();
    for _ in 0..UNKNOWN_CONSUMER {
        assert_eq!(unknown.get(REGISTRATIONS).await.unwrap().status, 403);
    }
    // Not a security event: a malformed request of a known consumer.
    let mut known = agent.client(Some("vnfm-a")).connect().await.unwrap();
    let bad = known
        .request_with(
            "POST",
            REGISTRATIONS,
            &[("content-type", "application/json".to_string())],
            b"{".to_vec(),
        )
        .await
        .unwrap();
    assert_eq!(bad.status, 400);

    common::sm::wait_for("the counters", std::time::Duration::from_secs(30), || {
        security_events(metrics_port, "refused", "401") == ANONYMOUS
            && security_events(metrics_port, "refused", "403") == UNKNOWN_CONSUMER
            && security_events(metrics_port, "handshake_failed", "") == BROKEN_HANDSHAKES
    });
    drop((anonymous, unknown, known));
    // SIGTERM: the last summary is written before the agent exits.
    agent.stop();
    let elapsed = started.elapsed();

    let store = nfv_warden::store::Store::open(&agent.store_path()).unwrap();
    let entries = store.audit_entries(0, 100_000).unwrap();
    let refused: Vec<_> = entries
        .iter()
        .filter(|e| e.action == "security.refused")
        .collect();
    assert_eq!(refused.len() as u64, UNKNOWN_CONSUMER, "{refused:#?}");
    assert!(refused
        .iter()
        .all(|e| e.actor == "vnfm-x" && e.subject == format!("GET {REGISTRATIONS}")));
    let summaries: Vec<_> = entries
        .iter()
        .filter(|e| e.action == "security.unauthenticated")
        .collect();
    let counted: u64 = summaries
        .iter()
        .map(|e| e.detail["events"].as_u64().unwrap())
        .sum();
    assert_eq!(counted, ANONYMOUS + BROKEN_HANDSHAKES, "{summaries:#?}");
    // One summary per interval, plus the one at shutdown: not one per event.
    let intervals = elapsed.as_secs() / nfv_warden::api::security::SUMMARY_INTERVAL.as_secs();
    assert!(
        summaries.len() as u64 <= intervals + 1,
        "{} summaries in {elapsed:?}",
        summaries.len()
    );
    assert!(
        entries.len() < 40,
        "the audit chain grew with the flood: {}",
        entries.len()
    );
    store.verify_audit_chain().unwrap();
}
