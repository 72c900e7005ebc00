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
    // By owner, through the indexes: the other VNF's certificate, once.
    use nfv_warden::cmf::records::CertificateOwner;
    let by_vnf = cmf
        .revoke_of(
            CertificateOwner::Vnf("vnf-z"),
            RevocationReason::CessationOfOperation,
            "test",
        )
        .await
        .expect("revoke_of");
    assert_eq!(by_vnf.revoked, vec![serials[2].clone()]);
    let again = cmf
        .revoke_of(
            CertificateOwner::Vnf("vnf-z"),
            RevocationReason::CessationOfOperation,
            "test",
        )
        .await
        .expect("revoke_of again");
    assert!(again.revoked.is_empty());
    assert_eq!(again.already_revoked, vec![serials[2].clone()]);
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
/// A serial as `openssl crl -text` prints it: the magnitude, without the DER INTEGER's
/// leading zero octet (which the agent's keys keep, RFC 5280 4.1.2.2).
fn crl_serial(serial: &str) -> String {
    let hex = serial.rsplit('/').next().unwrap_or(serial);
    let hex = hex.strip_prefix("00").unwrap_or(hex);
    hex.to_ascii_uppercase()
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

/// The CA key in a real swtpm: the CRL and the OCSP responses are signed by the TPM; while
/// the TPM is gone the last CRL is still served and OCSP answers tryLater, the revocation is
/// durable anyway, and once the TPM is back the new CRL follows without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crl_and_ocsp_signed_in_the_tpm_survive_a_tpm_outage() {
    let mut swtpm = common::swtpm::Swtpm::start();
    let mut agent = CmfAgent::with_ca_key("", Some(&swtpm.tcti()));
    agent.start();
    let dir = agent.dir().to_path_buf();
    register(&agent, "vnfm-a", "vnfc-t1", None).await;
    register(&agent, "vnfm-a", "vnfc-t2", None).await;
    let (first, pem) = enroll(&agent, "vnfm-a", "vnfc-t1", "t1").await;
    let (second, _) = enroll(&agent, "vnfm-a", "vnfc-t2", "t2").await;
    let (crl_url, ocsp_url) = revocation_urls(&pem);
    agent.warden(&["certs", "revoke", &first, "--reason", "keyCompromise"]);
    let (number, _) = crl_until(&dir, &crl_url, "the first revocation", |_, t| {
        t.contains(&crl_serial(&first))
    });
    let (ok, out) = run(
        &dir,
        "openssl verify -crl_check -CAfile ca.pem -CRLfile crl.pem t1.pem",
    );
    assert!(!ok && out.contains("certificate revoked"), "{out}");
    let (ok, out) = run(
        &dir,
        &format!("openssl ocsp -issuer ca.pem -cert t1.pem -url {ocsp_url} -CAfile ca.pem -nonce"),
    );
    assert!(
        ok && out.contains("Response verify OK") && out.contains("t1.pem: revoked"),
        "{out}"
    );

    // The TPM goes away: the revocation is still recorded, OCSP says tryLater, the last
    // CRL is still served.
    swtpm.kill();
    agent.warden(&["certs", "revoke", &second, "--reason", "superseded"]);
    let (_, out) = run(
        &dir,
        &format!("openssl ocsp -issuer ca.pem -cert t2.pem -url {ocsp_url} -CAfile ca.pem -nonce"),
    );
    assert!(out.to_ascii_lowercase().contains("trylater"), "{out}");
    let (still, text) = fetch_crl(&dir, &crl_url);
    assert_eq!(still, number, "{text}");
    assert!(!text.contains(&crl_serial(&second)), "{text}");

    // The TPM is back: the next CRL has the second revocation, without an agent restart.
    swtpm.restart();
    let (after, _) = crl_until(
        &dir,
        &crl_url,
        "the revocation made during the outage",
        |_, t| t.contains(&crl_serial(&second)),
    );
    assert!(after > number);
    let (ok, out) = run(
        &dir,
        "openssl verify -crl_check -CAfile ca.pem -CRLfile crl.pem t2.pem",
    );
    assert!(!ok && out.contains("certificate revoked"), "{out}");
    let (ok, out) = run(
        &dir,
        &format!("openssl ocsp -issuer ca.pem -cert t2.pem -url {ocsp_url} -CAfile ca.pem -nonce"),
    );
    assert!(
        ok && out.contains("Response verify OK") && out.contains("t2.pem: revoked"),
        "{out}"
    );
}

/// pkilint (PyPI, installed by this test into a venv under target/) on what this CMF
/// publishes: an issued certificate of each certType the CSR operation issues, a CRL with
/// entries, and OCSP responses (good, revoked): no ERROR or FATAL finding. Without network
/// the venv cannot be made and the test fails saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pkilint_finds_no_error_in_certificates_crls_and_ocsp_responses() {
    let bin = pkilint_venv();
    let mut agent = CmfAgent::new("");
    agent.start();
    let dir = agent.dir().to_path_buf();
    // VNFCI_CERT, with host names only (what a VNFC's TLS peers check).
    let mut client = agent.client(Some("vnfm-a")).connect().await.unwrap();
    let created = client
        .post_json(
            REGISTRATIONS,
            &json!({
                "certType": "VNFCI_CERT",
                "subjectIds": ["vnfc-l1.vnf.example", "vnfc-l2.vnf.example"],
                "typeOfVnfcCertHandling": "DELEGATION_MODE",
            }),
        )
        .await
        .unwrap();
    assert_eq!(created.status, 201, "{}", created.problem_detail());
    let mut serials = Vec::new();
    for name in ["vnfc-l1.vnf.example", "vnfc-l2.vnf.example"] {
        let csr = openssl_csr(&dir, name, &format!("/CN={name}"), &[name]);
        let issued = client
            .post_json(
                CSRS,
                &json!({ "vnfcId": name, "certType": "VNFCI_CERT", "certChainRequest": false, "csr": csr }),
            )
            .await
            .unwrap();
        assert_eq!(issued.status, 201, "{}", issued.problem_detail());
        let issued = issued.json().unwrap();
        std::fs::write(
            dir.join(format!("{name}.pem")),
            issued["certificate"].as_str().unwrap(),
        )
        .unwrap();
        serials.push(issued["serialNumber"].as_str().unwrap().to_string());
    }
    // VNF_OAM_CERT.
    let created = client
        .post_json(
            REGISTRATIONS,
            &json!({
                "certType": "VNF_OAM_CERT",
                "subjectIds": ["oam.vnf.example"],
                "typeOfVnfcCertHandling": "DELEGATION_MODE",
            }),
        )
        .await
        .unwrap();
    assert_eq!(created.status, 201, "{}", created.problem_detail());
    let csr = openssl_csr(&dir, "oam", "/CN=oam.vnf.example", &["oam.vnf.example"]);
    let issued = client
        .post_json(
            CSRS,
            &json!({ "certType": "VNF_OAM_CERT", "certChainRequest": false, "csr": csr }),
        )
        .await
        .unwrap();
    assert_eq!(issued.status, 201, "{}", issued.problem_detail());
    let oam = issued.json().unwrap()["certificate"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::write(dir.join("oam.pem"), &oam).unwrap();

    let (crl_url, ocsp_url) = revocation_urls(&oam);
    // Entries with and without a reasonCode (none for unspecified, RFC 5280 5.3.1).
    for (serial, reason) in [(&serials[0], "keyCompromise"), (&serials[1], "unspecified")] {
        agent.warden(&["certs", "revoke", serial, "--reason", reason]);
    }
    crl_until(&dir, &crl_url, "the revocations", |_, t| {
        t.contains(&crl_serial(&serials[0])) && t.contains(&crl_serial(&serials[1]))
    });
    sh_ok(
        &dir,
        &format!(
            "openssl ocsp -issuer ca.pem -cert vnfc-l1.vnf.example.pem -url {ocsp_url} -nonce \
             -respout revoked.ocsp -noverify && \
             openssl ocsp -issuer ca.pem -cert oam.pem -url {ocsp_url} -no_nonce \
             -respout good.ocsp -noverify"
        ),
    );
    let lint = |tool: &str, args: &str, file: &str| {
        let (ok, out) = run(&dir, &format!("{bin}/{tool} lint {args} -s ERROR {file}"));
        assert!(
            ok && out.trim().is_empty(),
            "pkilint {tool} {file}: ERROR/FATAL findings or failure:\n{out}"
        );
    };
    lint("lint_pkix_cert", "", "vnfc-l1.vnf.example.pem");
    lint("lint_pkix_cert", "", "oam.pem");
    lint("lint_crl", "-t CRL -p PKIX", "crl.der");
    lint("lint_ocsp_response", "", "revoked.ocsp");
    lint("lint_ocsp_response", "", "good.ocsp");
    // pkilint sees what it lints: a broken file is reported (the check can fail).
    std::fs::write(dir.join("broken.der"), b"\x30\x03\x02\x01").unwrap();
    let (ok, out) = run(
        &dir,
        &format!("{bin}/lint_crl lint -t CRL -p PKIX -s ERROR broken.der"),
    );
    assert!(!ok || !out.trim().is_empty(), "{out}");
}

/// A venv with pkilint under target/ (made once, reused); its bin directory.
fn pkilint_venv() -> String {
    let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/pkilint-venv");
    let bin = venv.join("bin");
    if !bin.join("lint_crl").exists() {
        let (ok, out) = run(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")),
            &format!(
                "python3 -m venv {venv} && {venv}/bin/pip install --quiet pkilint",
                venv = venv.display()
            ),
        );
        assert!(
            ok,
            "cannot make the pkilint venv (python3-venv and network access to PyPI are \
             needed; this test never passes without pkilint): {out}"
        );
    }
    bin.display().to_string()
}

/// The SM's VNF-termination erasure, on evidence (a COMPLETED REMOVE from the NFVO double),
/// revokes the certificates the CMF of the same agent issued for that VNF, and lists them in
/// the erasure report; another VNF's certificate stays good.
#[test]
fn vnf_termination_erasure_revokes_the_vnfs_certificates() {
    use common::sm::{wait_for, SmAgent, SmSetup};
    use std::time::Duration;

    let mut sm = SmAgent::new(SmSetup {
        rules: "",
        ..Default::default()
    });
    let dir = sm.dir().to_path_buf();
    // A VNFM identity and the CMF in the same agent.
    sh_ok(
        &dir,
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
         -keyout vnfm-root.key -out vnfm-root.pem -subj /CN=vnfm-root -days 30 2>/dev/null && \
         printf 'subjectAltName=DNS:vnfm-a\\nextendedKeyUsage=clientAuth\\n' > vnfm-a.ext && \
         openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
         -keyout vnfm-a.key -out vnfm-a.csr -subj /CN=vnfm-a 2>/dev/null && \
         openssl x509 -req -in vnfm-a.csr -CA vnfm-root.pem -CAkey vnfm-root.key \
         -CAcreateserial -days 30 -extfile vnfm-a.ext -out vnfm-a.pem 2>/dev/null",
    );
    let config = std::fs::read_to_string(&sm.agent.config).unwrap()
        + &format!(
            "\n[cmf]\nclient_ca = \"{d}/vnfm-root.pem\"\n\n[[cmf.consumer]]\nid = \"vnfm-a\"\n\
             trust_domain = \"operator-a\"\n\n[[cmf.trust_domain]]\nid = \"operator-a\"\n\
             dns_suffixes = [\"example\", \"example.net\"]\nvnfc_id_patterns = [\"*\"]\n\
             cas = [\"default\"]\n",
            d = dir.display()
        );
    std::fs::write(&sm.agent.config, config).unwrap();
    sm.nfvo.add_ns("ns-a", "core");
    sm.nfvo
        .add_vnf(&["ns-a"], "vnf-2", "vnfd-1", "pkg-good", "profile-2");
    sm.nfvo
        .add_vnf(&["ns-a"], "vnf-3", "vnfd-1", "pkg-good", "profile-3");
    sm.start();
    sm.sm(&["reconcile"]);

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let base = format!("https://127.0.0.1:{}", sm.port);
    let enroll_for = |vnfc: &str, vnf: &str| -> String {
        runtime.block_on(async {
            let client = nfv_warden::client::HttpsClient::new(
                &base,
                &dir.join("ca.pem"),
                Some((&dir.join("vnfm-a.pem"), &dir.join("vnfm-a.key"))),
            )
            .unwrap()
            .with_default_header("Version", nfv_warden::api::cmf::API_VERSION);
            let mut vnfm = client.connect().await.unwrap();
            let created = vnfm
                .post_json(
                    REGISTRATIONS,
                    &json!({
                        "certType": "VNFCI_CERT", "subjectIds": [vnfc],
                        "typeOfVnfcCertHandling": "DELEGATION_MODE", "vnfInstanceId": vnf,
                    }),
                )
                .await
                .unwrap();
            assert_eq!(created.status, 201, "{}", created.problem_detail());
            let csr = openssl_csr(&dir, vnfc, &format!("/CN={vnfc}"), &[]);
            let issued = vnfm
                .post_json(
                    CSRS,
                    &json!({ "vnfcId": vnfc, "certType": "VNFCI_CERT", "certChainRequest": false, "csr": csr }),
                )
                .await
                .unwrap();
            assert_eq!(issued.status, 201, "{}", issued.problem_detail());
            issued.json().unwrap()["serialNumber"]
                .as_str()
                .unwrap()
                .to_string()
        })
    };
    let of_vnf2 = enroll_for("vnfc-e1", "vnf-2");
    let of_vnf3 = enroll_for("vnfc-e3", "vnf-3");

    sm.nfvo.remove_vnf("ns-a", "vnf-2");
    sm.nfvo.notify_lcm("ns-a", "vnf-2", "REMOVE");
    let report = || {
        let out = sm.agent.run(&["sm", "erasure", "vnf-2"]);
        out.status
            .success()
            .then(|| serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("JSON"))
    };
    wait_for("the erasure of vnf-2", Duration::from_secs(90), || {
        report().is_some_and(|r| r["revokedCertificates"].as_array().is_some())
    });
    let report = report().unwrap();
    assert_eq!(
        report["revokedCertificates"],
        json!([format!("default/{of_vnf2}")]),
        "{report:#}"
    );
    let show = |serial: &str| -> serde_json::Value {
        serde_json::from_str(&sm.warden(&["certs", "show", serial, "--json"])).unwrap()
    };
    let revoked = show(&of_vnf2);
    assert_eq!(
        revoked["revocation"]["reason"], "cessationOfOperation",
        "{revoked}"
    );
    assert_eq!(show(&of_vnf3)["revoked"], false);
    sm.kill9();
}

/// Bad input on the revocation listener: clear answers (OCSP error statuses as OCSP
/// responses, ProblemDetails otherwise), and the listener keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_revocation_listener_refuses_bad_input_clearly() {
    let mut agent = CmfAgent::new("");
    // A cap below any OCSP request is refused at start, naming the key.
    let good = std::fs::read_to_string(&agent.agent.config).unwrap();
    std::fs::write(
        &agent.agent.config,
        format!("{good}\n[cmf.revocation]\nocsp_max_request_bytes = 0\n"),
    )
    .unwrap();
    let line = agent.agent.fails(&["serve"]);
    assert!(line.contains("ocsp_max_request_bytes"), "{line}");
    // With the metrics listener, to see the listener's counters.
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port");
    std::fs::write(
        &agent.agent.config,
        format!("{good}\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n"),
    )
    .unwrap();
    agent.start();
    let dir = agent.dir().to_path_buf();
    register(&agent, "vnfm-a", "vnfc-b1", None).await;
    let (_, pem) = enroll(&agent, "vnfm-a", "vnfc-b1", "b1").await;
    let (crl_url, ocsp_url) = revocation_urls(&pem);
    let base = crl_url.trim_end_matches("/crl/default.crl").to_string();

    // curl: (HTTP status, content type, body file) of a request.
    let fetch = |args: &str| -> (String, String) {
        let (ok, out) = run(
            &dir,
            &format!("curl -sS -o body.out -w '%{{http_code}} %{{content_type}}' {args}"),
        );
        assert!(ok, "{out}");
        let body = std::fs::read(dir.join("body.out")).unwrap();
        (out, String::from_utf8_lossy(&body).into_owned())
    };
    let (status, body) = fetch(&format!("{base}/crl/nope.crl"));
    assert!(
        status.starts_with("404 application/problem+json"),
        "{status}"
    );
    assert!(body.contains("no CA 'nope'"), "{body}");
    let (status, _) = fetch(&format!("{base}/elsewhere"));
    assert!(
        status.starts_with("404 application/problem+json"),
        "{status}"
    );
    let (status, body) = fetch(&format!(
        "-X POST -H 'Content-Type: text/plain' --data-binary hello {ocsp_url}"
    ));
    assert!(
        status.starts_with("415 application/problem+json"),
        "{status}"
    );
    assert!(body.contains("application/ocsp-request"), "{body}");
    std::fs::write(dir.join("big.req"), vec![b'x'; 9000]).unwrap();
    let (status, _) = fetch(&format!(
        "-X POST -H 'Content-Type: application/ocsp-request' --data-binary @big.req {ocsp_url}"
    ));
    assert!(
        status.starts_with("413 application/problem+json"),
        "{status}"
    );
    // Not DER, and not base64: malformedRequest (RFC 6960 2.3), as an OCSP response.
    let (ok, _) = run(
        &dir,
        &format!(
            "curl -sS -o bad.resp -H 'Content-Type: application/ocsp-request' \
             --data-binary hello {ocsp_url}"
        ),
    );
    assert!(ok);
    assert_eq!(
        std::fs::read(dir.join("bad.resp")).unwrap(),
        [0x30, 0x03, 0x0a, 0x01, 0x01]
    );
    let (status, _) = fetch(&format!("{ocsp_url}/not-base64!"));
    assert!(
        status.starts_with("200 application/ocsp-response"),
        "{status}"
    );
    assert_eq!(
        std::fs::read(dir.join("body.out")).unwrap(),
        [0x30, 0x03, 0x0a, 0x01, 0x01]
    );
    // A CertID of an issuer this responder does not serve: unauthorized.
    sh_ok(
        &dir,
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout other.key \
         -out other-ca.pem -subj /CN=other-ca -days 1 2>/dev/null",
    );
    let (_, out) = run(
        &dir,
        &format!("openssl ocsp -issuer other-ca.pem -serial 0x01 -url {ocsp_url} -nonce"),
    );
    assert!(out.to_ascii_lowercase().contains("unauthorized"), "{out}");
    // Still serving.
    let (ok, out) = run(
        &dir,
        &format!("openssl ocsp -issuer ca.pem -cert b1.pem -url {ocsp_url} -CAfile ca.pem -nonce"),
    );
    assert!(ok && out.contains("b1.pem: good"), "{out}");

    // Each answer counted in /metrics by kind and HTTP status (counted once answered, so
    // every request above is in by now).
    let (ok, metrics) = run(
        &dir,
        &format!("curl -sS http://127.0.0.1:{metrics_port}/metrics"),
    );
    assert!(ok, "{metrics}");
    let count = |series: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    };
    for (series, at_least) in [
        (
            "warden_revocation_requests_total{kind=\"crl\",status=\"404\"}",
            1.0,
        ),
        (
            "warden_revocation_requests_total{kind=\"other\",status=\"404\"}",
            1.0,
        ),
        (
            "warden_revocation_requests_total{kind=\"ocsp\",status=\"415\"}",
            1.0,
        ),
        (
            "warden_revocation_requests_total{kind=\"ocsp\",status=\"413\"}",
            1.0,
        ),
        (
            "warden_revocation_requests_total{kind=\"ocsp\",status=\"200\"}",
            4.0,
        ),
    ] {
        assert!(count(series) >= at_least, "{series}: {metrics}");
    }
    assert!(
        metrics.contains("warden_revocation_connections_refused_total 0"),
        "{metrics}"
    );
}

/// Without any revocation, a CRL is made again before its nextUpdate (the background task),
/// with a higher CRLNumber: a relying party never has to use an expired CRL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crl_is_renewed_before_its_next_update() {
    let mut agent = CmfAgent::new("");
    let config = std::fs::read_to_string(&agent.agent.config).unwrap();
    // Valid 60 s, renewed when less than 57 s are left: a few seconds after each CRL.
    std::fs::write(
        &agent.agent.config,
        format!(
            "{config}\n[cmf.revocation]\ncrl_validity_seconds = 60\n\
             crl_regenerate_before_seconds = 57\n"
        ),
    )
    .unwrap();
    agent.start();
    let dir = agent.dir().to_path_buf();
    register(&agent, "vnfm-a", "vnfc-n1", None).await;
    let (_, pem) = enroll(&agent, "vnfm-a", "vnfc-n1", "n1").await;
    let (crl_url, _) = revocation_urls(&pem);
    let (first, _) = crl_until(&dir, &crl_url, "a CRL", |_, _| true);
    let (renewed, text) = crl_until(&dir, &crl_url, "a renewed CRL", |n, _| n > first);
    assert!(renewed > first);
    let (ok, out) = run(
        &dir,
        "openssl verify -crl_check -CAfile ca.pem -CRLfile crl.pem n1.pem",
    );
    assert!(
        ok,
        "a fresh CRL verifies the good certificate: {out}\n{text}"
    );
}

/// Issue 10 §4: the certificates `warden ca init` and `tls init` make are in the issuance
/// table (keyed like the others, by CA and DER serial), so the operator lists, revokes and
/// audits them like any other; the CRL then carries the revoked TLS certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_the_agent_makes_for_itself_are_listed_revoked_and_audited() {
    let mut agent = CmfAgent::new("");
    agent.start();
    let page: serde_json::Value =
        serde_json::from_str(&agent.warden(&["certs", "list", "--json"])).expect("json");
    let of_type = |t: &str| -> Vec<serde_json::Value> {
        page["certificates"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["certType"] == t)
            .cloned()
            .collect()
    };
    let (roots, tls) = (of_type("AGENT_CA"), of_type("AGENT_TLS"));
    assert_eq!((roots.len(), tls.len()), (1, 1), "{page}");
    assert_eq!(tls[0]["caId"], "default");
    assert_eq!(tls[0]["consumer"], "agent:self");
    assert_eq!(
        tls[0]["subjectAltNames"],
        json!(["DNS:localhost", "IP:127.0.0.1"])
    );

    // The record holds the very certificate the agent serves, keyed by its DER serial.
    let config = nfv_warden::config::Config::load(&agent.agent.config).expect("config");
    let served = std::fs::read_to_string(&config.server.as_ref().unwrap().tls_certificate)
        .expect("TLS certificate");
    let tls_serial = tls[0]["serialNumber"].as_str().unwrap().to_string();
    let shown = show(&agent, &format!("default/{tls_serial}"));
    let pem = shown["certificatePem"].as_str().unwrap();
    assert!(served.starts_with(pem.trim_end()), "{served}\n---\n{pem}");
    let root_serial = roots[0]["serialNumber"].as_str().unwrap();
    let ca_pem = std::fs::read_to_string(&config.ca.as_ref().unwrap().certificate).unwrap();
    assert_eq!(
        show(&agent, root_serial)["certificatePem"]
            .as_str()
            .unwrap()
            .trim(),
        ca_pem.trim()
    );

    // The operator revokes the TLS certificate; the CRL lists it.
    let revoked: serde_json::Value = serde_json::from_str(&agent.warden(&[
        "certs",
        "revoke",
        &tls_serial,
        "--reason",
        "superseded",
        "--json",
    ]))
    .expect("json");
    assert_eq!(revoked["revokedNow"], true, "{revoked}");
    assert_eq!(show(&agent, &tls_serial)["revoked"], true);
    // Where the CA publishes its CRL: as any certificate it issues names it.
    register(&agent, "vnfm-a", "vnfc-t1", None).await;
    let (_, consumer_pem) = enroll(&agent, "vnfm-a", "vnfc-t1", "t1").await;
    let (crl_url, _) = revocation_urls(&consumer_pem);
    crl_until(agent.dir(), &crl_url, "the TLS certificate", |_, text| {
        text.contains(&crl_serial(&tls_serial))
    });

    // Audited: each issuance names its record, and the chain verifies.
    let audit = agent.warden(&["audit", "list", "--json"]);
    for action in ["ca.init", "tls.issue", "cmf.revoke"] {
        assert!(audit.contains(action), "{action}: {audit}");
    }
    assert!(audit.contains(&format!("default/{tls_serial}")), "{audit}");
    agent.warden(&["audit", "verify"]);
    agent.stop();
}

/// A registration and a certificate record made directly in a scratch store (no HSM: the
/// transactions under test are the store's).
fn race_fixture() -> (tempfile::TempDir, nfv_warden::store::Store, String) {
    use nfv_warden::cmf::{CertType, Registration, VnfcCertHandling, REGISTRATIONS};
    let dir = tempfile::tempdir().unwrap();
    let store = nfv_warden::store::Store::open(&dir.path().join("s.redb")).unwrap();
    let id = "0123456789abcdef0123456789abcdef".to_string();
    let registration = Registration {
        id: id.clone(),
        consumer: "vnfm-a".into(),
        trust_domain: "operator-a".into(),
        cert_type: CertType::VnfciCert,
        subject_ids: vec!["vnfc-x1".into()],
        type_of_vnfc_cert_handling: Some(VnfcCertHandling::DelegationMode),
        key_attestation: None,
        ca_id: "default".into(),
        created: "2026-12-02T00:00:00Z".into(),
        vnf_instance_id: Some("vnf-x".into()),
    };
    store
        .write(|tx| tx.put(&REGISTRATIONS, &id, &registration))
        .unwrap();
    (dir, store, id)
}

fn issued(serial: &str, registration: &str) -> nfv_warden::cmf::IssuedRecord {
    nfv_warden::cmf::IssuedRecord {
        serial_number: serial.into(),
        ca_id: "default".into(),
        consumer: "vnfm-a".into(),
        registration_id: registration.into(),
        cert_type: nfv_warden::cmf::CertType::VnfciCert,
        subjects: vec!["vnfc-x1".into()],
        spki_sha256: "00".repeat(32),
        attestation: "not-requested".into(),
        attestation_format: None,
        not_before: "2026-12-02T00:00:00Z".into(),
        not_after: "2027-12-02T00:00:00Z".into(),
        issued_at: "2026-12-02T00:00:00Z".into(),
        certificate: None,
        revocation: None,
        vnf_instance_id: Some("vnf-x".into()),
    }
}

/// The operator's `warden cmf registrations delete` against a CSR in flight, both orders
/// of the two commits forced by running them in that order (no timing). The deletion is
/// one transaction, so these are the only orders there are: the CSR's issuance commit
/// (`records::record_issued`, the one the CSR pipeline runs) lands before it and its
/// certificate is revoked by it, or lands after it and is refused. Before, the deletion
/// revoked in one transaction and deregistered in another, and a CSR committed between the
/// two stayed live under a deleted registration.
#[test]
fn the_operators_deletion_and_a_csr_in_flight_never_leave_a_live_certificate() {
    use nfv_warden::cmf::records::record_issued;
    use nfv_warden::cmf::{CmfError, CERTIFICATES, REGISTRATIONS};
    use nfv_warden::ops::registrations::delete;

    // The CSR's checks passed (its registration existed), then the operator deleted the
    // registration, then the CSR's issuance commit runs: refused, nothing recorded.
    let (_dir, store, id) = race_fixture();
    let (_, outcome) = delete(&store, &id, "cli:op").expect("delete");
    assert!(outcome.revoked.is_empty());
    let late = store
        .write(|tx| record_issued(tx, "default/0a01", &issued("0a01", &id)))
        .expect_err("refused");
    let why = late.into_rejected::<CmfError>().expect("a CMF refusal");
    assert!(matches!(why, CmfError::Conflict(_)), "{why}");
    assert!(store
        .read(|tx| tx.get(&CERTIFICATES, "default/0a01"))
        .unwrap()
        .is_none());

    // The CSR commits first, then the deletion: revoked by it, in the same transaction as
    // the registration goes.
    let (_dir, store, id) = race_fixture();
    store
        .write(|tx| record_issued(tx, "default/0a02", &issued("0a02", &id)))
        .expect("issued");
    let (registration, outcome) = delete(&store, &id, "cli:op").expect("delete");
    assert_eq!(registration.id, id);
    assert_eq!(outcome.revoked, vec!["default/0a02".to_string()]);
    let record = store
        .read(|tx| tx.get(&CERTIFICATES, "default/0a02"))
        .unwrap()
        .unwrap();
    assert_eq!(
        record.revocation.expect("revoked").reason,
        "cessationOfOperation"
    );
    assert!(!store.read(|tx| tx.contains(&REGISTRATIONS, &id)).unwrap());
    // A second deletion finds nothing (404), and revokes nothing again.
    assert!(matches!(
        delete(&store, &id, "cli:op"),
        Err(nfv_warden::ops::OpsError::NotFound(_))
    ));
}

/// Issue 10 leftovers: a registration's and a VNF's certificates are found through indexes
/// written with the record; a store written before them gets them built once, and its old
/// records are then revoked on deregistration like new ones.
#[test]
fn certificate_indexes_are_written_with_the_record_and_built_for_older_stores() {
    use nfv_warden::cmf::records::{
        certificates_of_read, ensure_index, record_issued, CertificateOwner,
    };
    use nfv_warden::cmf::CERTIFICATES;

    let (_dir, store, id) = race_fixture();
    // A record as an older build wrote it: in the table, in no index.
    store
        .write(|tx| tx.put(&CERTIFICATES, "default/0b01", &issued("0b01", &id)))
        .unwrap();
    let of =
        |owner: CertificateOwner<'_>| store.read(|tx| certificates_of_read(tx, owner)).unwrap();
    assert!(of(CertificateOwner::Registration(&id)).is_empty());
    assert_eq!(ensure_index(&store, "test").unwrap(), 1);
    assert_eq!(ensure_index(&store, "test").unwrap(), 0, "built once");
    // A new record is indexed in its own transaction.
    store
        .write(|tx| record_issued(tx, "default/0b02", &issued("0b02", &id)))
        .unwrap();
    let both = vec!["default/0b01".to_string(), "default/0b02".to_string()];
    assert_eq!(of(CertificateOwner::Registration(&id)), both);
    assert_eq!(of(CertificateOwner::Vnf("vnf-x")), both);
    assert!(of(CertificateOwner::Vnf("vnf-y")).is_empty());
    assert!(of(CertificateOwner::Registration("ffff")).is_empty());
    let (_, outcome) = nfv_warden::ops::registrations::delete(&store, &id, "cli:op").unwrap();
    assert_eq!(outcome.revoked, both);
    store.verify_audit_chain().expect("audit chain");
}

/// Index entries carry an ordinal that keeps an owner's certificates in issuance order (one
/// group commit's entries side by side in the B-tree). A store whose indexes were written in
/// the first layout (`{owner}/{caId}/{serial}`, no ordinal) gets them rewritten once at
/// start, and no entry of the old layout is ever read as a certificate key.
#[test]
fn certificate_indexes_of_the_first_layout_are_rewritten_in_issuance_order() {
    use nfv_warden::cmf::records::{
        certificates_of_read, ensure_index, record_issued, CertificateOwner, BY_REGISTRATION,
        BY_VNF, INDEX_KEY, INDEX_STATE, ORDINAL_DIGITS,
    };
    use nfv_warden::cmf::CERTIFICATES;

    let (_dir, store, id) = race_fixture();
    // A store as the first indexed build left it: a record, its entries without an
    // ordinal, index version 1.
    store
        .write(|tx| {
            tx.put(&CERTIFICATES, "default/0b01", &issued("0b01", &id))?;
            tx.put(&BY_REGISTRATION, &format!("{id}/default/0b01"), &())?;
            tx.put(&BY_VNF, "vnf-x/default/0b01", &())?;
            tx.put(&INDEX_STATE, INDEX_KEY, &1u64)
        })
        .unwrap();
    let of =
        |owner: CertificateOwner<'_>| store.read(|tx| certificates_of_read(tx, owner)).unwrap();
    assert!(
        of(CertificateOwner::Registration(&id)).is_empty(),
        "an entry of the first layout is not a certificate key"
    );
    assert_eq!(ensure_index(&store, "test").unwrap(), 1);
    // Newer certificates come after, in the order they were recorded, whatever the serial.
    for serial in ["0a03", "0c02", "0104"] {
        let record = issued(serial, &id);
        store
            .write(move |tx| record_issued(tx, &format!("default/{serial}"), &record))
            .unwrap_or_else(|e| panic!("{serial}: {e}"));
    }
    let expected: Vec<String> = ["0b01", "0a03", "0c02", "0104"]
        .iter()
        .map(|s| format!("default/{s}"))
        .collect();
    assert_eq!(of(CertificateOwner::Registration(&id)), expected);
    assert_eq!(of(CertificateOwner::Vnf("vnf-x")), expected);
    let entries = store
        .read(|tx| tx.list(&BY_REGISTRATION, &format!("{id}/")))
        .unwrap();
    assert_eq!(entries.len(), 4, "the old entry is gone: {entries:?}");
    for (entry, ()) in &entries {
        let ordinal = &entry[id.len() + 1..][..ORDINAL_DIGITS];
        assert!(ordinal.bytes().all(|b| b.is_ascii_hexdigit()), "{entry}");
    }
    store.verify_audit_chain().expect("audit chain");
}
