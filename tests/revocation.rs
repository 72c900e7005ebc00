//! Revocation end to end (issue 10 §3): by the owning consumer over REST, by the operator
//! (`warden certs revoke`), on deregistration and on VNF-termination erasure; CRLs signed by
//! the CA key in SoftHSM (and, once, in swtpm) checked by `openssl verify -crl_check`; the
//! OCSP responder checked by `openssl ocsp`; pkilint on certificates, CRLs and OCSP responses.

mod common;

use common::cmf::{openssl_csr, CmfAgent};
use serde_json::json;

const REGISTRATIONS: &str = "/certmgmt/v1/registrations";
const CSRS: &str = "/certmgmt/v1/certificate_signing_requests";

/// Register `subject` (a VNFC) for `vnf` as `consumer`; returns the registration id.
async fn register(agent: &CmfAgent, consumer: &str, subject: &str, vnf: Option<&str>) -> String {
    let mut client = agent
        .client(Some(consumer))
        .connect()
        .await
        .expect("connect");
    let mut body = json!({
        "certType": "VNFCI_CERT",
        "subjectIds": [subject, format!("{subject}.vnf.example")],
        "typeOfVnfcCertHandling": "DELEGATION_MODE",
    });
    if let Some(vnf) = vnf {
        body["vnfInstanceId"] = json!(vnf);
    }
    let created = client
        .post_json(REGISTRATIONS, &body)
        .await
        .expect("register");
    assert_eq!(created.status, 201, "{}", created.problem_detail());
    created.json().unwrap()["id"].as_str().unwrap().to_string()
}

/// A certificate for `subject` (registered before) as `consumer`: (serial hex, PEM), the
/// PEM also written to `{name}.pem` in the agent's directory.
async fn enroll(agent: &CmfAgent, consumer: &str, subject: &str, name: &str) -> (String, String) {
    let mut client = agent
        .client(Some(consumer))
        .connect()
        .await
        .expect("connect");
    let csr = openssl_csr(
        agent.dir(),
        name,
        &format!("/CN={subject}"),
        &[&format!("{subject}.vnf.example")],
    );
    let response = client
        .post_json(
            CSRS,
            &json!({ "vnfcId": subject, "certType": "VNFCI_CERT", "certChainRequest": false, "csr": csr }),
        )
        .await
        .expect("csr");
    assert_eq!(response.status, 201, "{}", response.problem_detail());
    let issued = response.json().unwrap();
    let pem = issued["certificate"].as_str().unwrap().to_string();
    std::fs::write(agent.dir().join(format!("{name}.pem")), &pem).unwrap();
    (issued["serialNumber"].as_str().unwrap().to_string(), pem)
}

/// `warden certs show SERIAL --json` through the running agent.
fn show(agent: &CmfAgent, serial: &str) -> serde_json::Value {
    serde_json::from_str(&agent.warden(&["certs", "show", serial, "--json"])).expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deregistration_revokes_the_registrations_certificates_once() {
    let mut agent = CmfAgent::new("");
    agent.start();
    let id = register(&agent, "vnfm-a", "vnfc-d1", Some("vnf-0001")).await;
    let (serial, _) = enroll(&agent, "vnfm-a", "vnfc-d1", "d1").await;
    let other = register(&agent, "vnfm-a", "vnfc-d2", None).await;
    let (kept, _) = enroll(&agent, "vnfm-a", "vnfc-d2", "d2").await;
    let before = show(&agent, &serial);
    assert_eq!(before["revoked"], false);

    // Another consumer's DELETE revokes nothing and deletes nothing.
    let mut intruder = agent.client(Some("vnfm-b")).connect().await.unwrap();
    let refused = intruder
        .request("DELETE", &format!("{REGISTRATIONS}/{id}"), None, Vec::new())
        .await
        .unwrap();
    assert_eq!(refused.status, 403, "{}", refused.problem_detail());
    assert_eq!(show(&agent, &serial)["revoked"], false);

    let mut owner = agent.client(Some("vnfm-a")).connect().await.unwrap();
    let deleted = owner
        .request("DELETE", &format!("{REGISTRATIONS}/{id}"), None, Vec::new())
        .await
        .unwrap();
    assert_eq!(deleted.status, 204, "{}", deleted.problem_detail());
    let after = show(&agent, &serial);
    assert_eq!(after["revoked"], true, "{after}");
    assert_eq!(after["revocation"]["reason"], "cessationOfOperation");
    // The other registration's certificate is untouched.
    assert_eq!(show(&agent, &kept)["revoked"], false);
    assert_ne!(other, id);

    // The audit chain holds the revocation, by the consumer.
    let audit = agent.warden(&["audit", "list", "--json"]);
    assert!(
        audit.contains("cmf.revoke") && audit.contains("cessationOfOperation"),
        "{audit}"
    );
    agent.stop();

    // Durable: the store, read after the agent stopped, has it and the revoked index.
    let store = nfv_warden::store::Store::open(&agent.store_path()).expect("store");
    let record = store
        .read(|tx| tx.get(&nfv_warden::cmf::CERTIFICATES, &format!("default/{serial}")))
        .unwrap()
        .expect("record");
    assert_eq!(record.vnf_instance_id.as_deref(), Some("vnf-0001"));
    let revocation = record.revocation.expect("revoked");
    let entry = store
        .read(|tx| {
            tx.get(
                &nfv_warden::cmf::revoke::REVOKED,
                &format!("default/{serial}"),
            )
        })
        .unwrap()
        .expect("revoked index");
    assert_eq!(entry.revoked_at, revocation.revoked_at);
}

/// The API other parts build on (direct mode removes a VNFC, the SM terminates a VNF):
/// `Cmf::revoke_where` in process, against the agent's real SoftHSM token and store. The only
/// in-process test of this binary: a process initializes the PKCS#11 library once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_where_revokes_matching_certificates_once_and_is_idempotent() {
    use nfv_warden::cmf::register::RegisterRequest;
    use nfv_warden::cmf::revoke::RevocationReason;
    use nfv_warden::cmf::Consumer;

    let agent = CmfAgent::new("");
    std::env::set_var("SOFTHSM2_CONF", &agent.agent.tokens.conf);
    let config = nfv_warden::config::Config::load(&agent.agent.config).expect("config");
    let backends = nfv_warden::keys::backends::Backends::open(&config).expect("backends");
    let store =
        std::sync::Arc::new(nfv_warden::store::Store::open(&agent.store_path()).expect("store"));
    let cmf = nfv_warden::cmf::Cmf::new(&config, &backends, store.clone()).expect("cmf");
    let consumer = Consumer {
        id: "vnfm-a".into(),
        trust_domain: "operator-a".into(),
    };
    let mut serials = Vec::new();
    for (vnfc, vnf) in [
        ("vnfc-w1", "vnf-w"),
        ("vnfc-w2", "vnf-w"),
        ("vnfc-w3", "vnf-z"),
    ] {
        cmf.register(
            &consumer,
            RegisterRequest {
                cert_type: "VNFCI_CERT".into(),
                subject_ids: vec![vnfc.into()],
                type_of_vnfc_cert_handling: Some("DELEGATION_MODE".into()),
                key_attestation: None,
                ca_id: None,
                vnf_instance_id: Some(vnf.into()),
            },
        )
        .await
        .expect("register");
        let csr = openssl_csr(agent.dir(), vnfc, &format!("/CN={vnfc}"), &[]);
        let issued = cmf
            .sign_csr(
                &consumer,
                serde_json::from_value(json!({
                    "vnfcId": vnfc, "certType": "VNFCI_CERT", "certChainRequest": false, "csr": csr
                }))
                .unwrap(),
            )
            .await
            .expect("csr");
        serials.push(format!("default/{}", issued.serial_number));
    }
    let first = cmf
        .revoke_where(
            |r| r.vnf_instance_id.as_deref() == Some("vnf-w"),
            RevocationReason::CessationOfOperation,
            "test",
        )
        .await
        .expect("revoke");
    let mut expected = serials[..2].to_vec();
    expected.sort();
    let mut revoked = first.revoked.clone();
    revoked.sort();
    assert_eq!(revoked, expected);
    assert!(first.already_revoked.is_empty());
    let second = cmf
        .revoke_where(
            |r| r.vnf_instance_id.as_deref() == Some("vnf-w"),
            RevocationReason::KeyCompromise,
            "test",
        )
        .await
        .expect("revoke again");
    assert!(second.revoked.is_empty(), "{second:?}");
    let mut already = second.already_revoked.clone();
    already.sort();
    assert_eq!(already, expected);
    // The first reason stands; the other VNF's certificate is untouched.
    let records: Vec<nfv_warden::cmf::IssuedRecord> = serials
        .iter()
        .map(|k| {
            store
                .read(|tx| tx.get(&nfv_warden::cmf::CERTIFICATES, k))
                .unwrap()
                .unwrap()
        })
        .collect();
    assert_eq!(
        records[0].revocation.as_ref().unwrap().reason,
        "cessationOfOperation"
    );
    assert!(records[2].revocation.is_none());
    let none = cmf
        .revoke_where(|_| false, RevocationReason::Unspecified, "test")
        .await
        .expect("nothing");
    assert_eq!(none, Default::default());
}

/// Run a command in `dir`: (success, stdout + stderr).
fn run(dir: &std::path::Path, script: &str) -> (bool, String) {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .output()
        .expect("sh");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The URI of the CRL distribution point and of the AIA OCSP entry of a certificate.
fn revocation_urls(pem: &str) -> (String, String) {
    use x509_cert::ext::pkix::name::{DistributionPointName, GeneralName};
    use x509_cert::ext::pkix::{AuthorityInfoAccessSyntax, CrlDistributionPoints};
    let cert = nfv_warden::pki::certificates_from_pem(pem)
        .unwrap()
        .remove(0);
    let (_, dps) = cert
        .tbs_certificate()
        .get_extension::<CrlDistributionPoints>()
        .unwrap()
        .expect("a CRL distribution point");
    let crl = match &dps.0[0].distribution_point {
        Some(DistributionPointName::FullName(names)) => match &names[0] {
            GeneralName::UniformResourceIdentifier(uri) => uri.to_string(),
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    };
    let (_, aia) = cert
        .tbs_certificate()
        .get_extension::<AuthorityInfoAccessSyntax>()
        .unwrap()
        .expect("an AIA");
    let ocsp = aia
        .0
        .iter()
        .find(|a| a.access_method == const_oid::db::rfc5280::ID_AD_OCSP)
        .map(|a| match &a.access_location {
            GeneralName::UniformResourceIdentifier(uri) => uri.to_string(),
            other => panic!("{other:?}"),
        })
        .expect("an OCSP URL");
    (crl, ocsp)
}

/// Fetch the CRL at `url` (curl, as a relying party would) into `crl.der`/`crl.pem`; its
/// CRLNumber and text.
fn fetch_crl(dir: &std::path::Path, url: &str) -> (u64, String) {
    let (ok, out) = run(
        dir,
        &format!(
            "curl -sS --fail -o crl.der '{url}' && openssl crl -inform DER -in crl.der -out crl.pem \
             && openssl crl -in crl.pem -noout -text"
        ),
    );
    assert!(ok, "fetching the CRL at {url}: {out}");
    let number = out
        .lines()
        .skip_while(|l| !l.contains("X509v3 CRL Number"))
        .nth(1)
        .map(|l| l.trim().to_string())
        .expect("a CRL number");
    (number.parse().expect("decimal CRL number"), out)
}

/// Poll (a failure guard, not a timing assertion) until `done` holds for the CRL at `url`.
fn crl_until(
    dir: &std::path::Path,
    url: &str,
    what: &str,
    done: impl Fn(u64, &str) -> bool,
) -> (u64, String) {
    let start = std::time::Instant::now();
    loop {
        let (number, text) = fetch_crl(dir, url);
        if done(number, &text) {
            return (number, text);
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(90),
            "the CRL never showed {what}: {text}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// The serial as `openssl crl -text` prints it (upper-case hex).
fn crl_serial(serial: &str) -> String {
    serial.to_ascii_uppercase()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_and_operator_revocations_reach_the_crl_and_ocsp() {
    let mut agent = CmfAgent::new("");
    agent.start();
    let dir = agent.dir().to_path_buf();
    register(&agent, "vnfm-a", "vnfc-r1", None).await;
    register(&agent, "vnfm-a", "vnfc-r2", None).await;
    register(&agent, "vnfm-a", "vnfc-r3", None).await;
    let (revoked, revoked_pem) = enroll(&agent, "vnfm-a", "vnfc-r1", "r1").await;
    let (good, _) = enroll(&agent, "vnfm-a", "vnfc-r2", "r2").await;
    let (later, _) = enroll(&agent, "vnfm-a", "vnfc-r3", "r3").await;

    // The certificate names where its status is published.
    let (crl_url, ocsp_url) = revocation_urls(&revoked_pem);
    assert!(crl_url.ends_with("/crl/default.crl"), "{crl_url}");
    assert!(ocsp_url.ends_with("/ocsp"), "{ocsp_url}");
    let (first_number, first) = crl_until(&dir, &crl_url, "a first CRL", |_, _| true);
    assert!(!first.contains(&crl_serial(&revoked)), "{first}");

    // Another consumer cannot revoke it, nor learn that it exists.
    let path = format!("/certmgmt/v1/certificates/{revoked}/revoke");
    let mut intruder = agent.client(Some("vnfm-b")).connect().await.unwrap();
    let refused = intruder
        .post_json(&path, &json!({ "reason": "keyCompromise" }))
        .await
        .unwrap();
    assert_eq!(refused.status, 404, "{}", refused.problem_detail());
    assert_eq!(refused.headers["content-type"], "application/problem+json");
    let mut owner = agent.client(Some("vnfm-a")).connect().await.unwrap();
    let bad = owner
        .post_json(&path, &json!({ "reason": "removeFromCRL" }))
        .await
        .unwrap();
    assert_eq!(bad.status, 400, "{}", bad.problem_detail());
    // The owner revokes it.
    let done = owner
        .post_json(&path, &json!({ "reason": "keyCompromise" }))
        .await
        .unwrap();
    assert_eq!(done.status, 200, "{}", done.problem_detail());
    let status = done.json().unwrap();
    assert_eq!(status["reason"], "keyCompromise");
    assert_eq!(status["revokedNow"], true);
    let again = owner.post_json(&path, &json!({})).await.unwrap();
    assert_eq!(again.status, 200, "{}", again.problem_detail());
    assert_eq!(again.json().unwrap()["revokedNow"], false);

    // The CRL, fetched from the certificate's distribution point, lists it with its reason
    // and a higher CRLNumber; openssl refuses the certificate with it, accepts the other.
    let (number, text) = crl_until(&dir, &crl_url, "the revocation", |_, text| {
        text.contains(&crl_serial(&revoked))
    });
    assert!(number > first_number, "{first_number} -> {number}");
    assert!(text.contains("Key Compromise"), "{text}");
    assert!(text.contains("Authority Key Identifier"), "{text}");
    assert!(text.contains("Next Update"), "{text}");
    assert!(text.contains("Version 2"), "{text}");
    let (ok, out) = run(
        &dir,
        "openssl verify -crl_check -CAfile ca.pem -CRLfile crl.pem r1.pem",
    );
    assert!(!ok && out.contains("certificate revoked"), "{out}");
    let (ok, out) = run(
        &dir,
        "openssl verify -crl_check -CAfile ca.pem -CRLfile crl.pem r2.pem",
    );
    assert!(ok, "{out}");

    // OCSP, POST with a nonce: revoked / good, signature and nonce checked by openssl.
    let ocsp = |cert: &str| {
        run(
            &dir,
            &format!(
                "openssl ocsp -issuer ca.pem -cert {cert} -url {ocsp_url} -CAfile ca.pem -nonce"
            ),
        )
    };
    let (ok, out) = ocsp("r1.pem");
    assert!(ok, "{out}");
    assert!(out.contains("Response verify OK"), "{out}");
    assert!(out.contains("r1.pem: revoked"), "{out}");
    assert!(out.contains("Reason: keyCompromise"), "{out}");
    assert!(!out.contains("WARNING: no nonce"), "{out}");
    let (ok, out) = ocsp("r2.pem");
    assert!(ok && out.contains("r2.pem: good"), "{out}");
    // A serial this CA never issued is unknown.
    let (ok, out) = run(
        &dir,
        &format!(
            "openssl ocsp -issuer ca.pem -serial 0x0123456789 -url {ocsp_url} -CAfile ca.pem -nonce"
        ),
    );
    assert!(ok && out.contains("0x0123456789: unknown"), "{out}");

    // OCSP over GET (RFC 6960 A.1): the request base64 in the path, fetched with curl.
    sh_ok(
        &dir,
        "openssl ocsp -issuer ca.pem -cert r2.pem -no_nonce -reqout get.req",
    );
    let request = std::fs::read(dir.join("get.req")).unwrap();
    let encoded = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &request);
    let escaped: String = encoded
        .chars()
        .map(|c| match c {
            '/' => "%2F".to_string(),
            '+' => "%2B".to_string(),
            '=' => "%3D".to_string(),
            c => c.to_string(),
        })
        .collect();
    let (ok, out) = run(
        &dir,
        &format!(
            "curl -sS --fail -D get.headers -o get.resp '{ocsp_url}/{escaped}' && \
             openssl ocsp -respin get.resp -reqin get.req -issuer ca.pem -cert r2.pem -CAfile ca.pem"
        ),
    );
    assert!(ok, "{out}");
    assert!(
        out.contains("Response verify OK") && out.contains("r2.pem: good"),
        "{out}"
    );
    let headers = std::fs::read_to_string(dir.join("get.headers")).unwrap();
    assert!(
        headers
            .to_ascii_lowercase()
            .contains("application/ocsp-response"),
        "{headers}"
    );

    // The operator revokes another one, audited with the caller; the next CRL has both.
    let out = agent.warden(&["certs", "revoke", &later, "--reason", "superseded"]);
    assert!(
        out.contains("revoked default/") && out.contains("superseded"),
        "{out}"
    );
    let out = agent.warden(&["certs", "revoke", &later, "--reason", "keyCompromise"]);
    assert!(
        out.contains("was revoked before") && out.contains("superseded"),
        "{out}"
    );
    let line = agent
        .agent
        .fails(&["certs", "revoke", &later, "--reason", "no-such-reason"]);
    assert!(line.contains("unknown revocation reason"), "{line}");
    let line = agent.agent.fails(&["certs", "revoke", "00ff00ff"]);
    assert!(line.contains("does not exist"), "{line}");
    let (after_operator, text) = crl_until(&dir, &crl_url, "the operator's revocation", |_, t| {
        t.contains(&crl_serial(&later))
    });
    assert!(after_operator > number);
    assert!(
        text.contains(&crl_serial(&revoked)) && text.contains("Superseded"),
        "{text}"
    );
    let audit = agent.warden(&["audit", "list", "--limit", "100", "--json"]);
    assert!(audit.contains("cli:uid="), "{audit}");
    assert!(audit.contains("cmf.crl"), "{audit}");

    // The CRL survives a restart: the same CRL (same number) is served before anything else
    // happens, and it still lists both.
    agent.stop();
    agent.start();
    let (restarted_url, _) = {
        // The port may change across restarts in tests (port 0): read the new one from a
        // certificate issued now.
        register(&agent, "vnfm-a", "vnfc-r4", None).await;
        let (_, pem) = enroll(&agent, "vnfm-a", "vnfc-r4", "r4").await;
        revocation_urls(&pem)
    };
    let (number_after_restart, text) = fetch_crl(&dir, &restarted_url);
    assert_eq!(number_after_restart, after_operator, "{text}");
    assert!(
        text.contains(&crl_serial(&revoked)) && text.contains(&crl_serial(&later)),
        "{text}"
    );
    let _ = good;
}

fn sh_ok(dir: &std::path::Path, script: &str) {
    let (ok, out) = run(dir, script);
    assert!(ok, "{script}: {out}");
}
