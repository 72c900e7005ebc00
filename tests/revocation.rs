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
