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

/// Certificates issued to consumers (not those `ca init` and `tls init` recorded).
fn issued_count(agent: &CmfAgent) -> u64 {
    let store = nfv_warden::store::Store::open(&agent.store_path()).expect("store");
    let all = store.read(|tx| tx.list(&CERTIFICATES, "")).expect("list");
    all.iter()
        .filter(|(_, r)| r.consumer != nfv_warden::cmf::records::AGENT_CONSUMER)
        .count() as u64
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
    // The host name only: the VNFC identifier vnfc-1 is the subject CN, never a dNSName
    // (issue 10, README "Names and trust domains").
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(names[0].contains("vnfc-1.vnf.example"), "{names:?}");
    assert_eq!(leaf.tbs_certificate().subject().to_string(), "CN=vnfc-1");
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

// ----------------------------------------------------------------------------------------
// Key attestation end to end: the VNF's key in its own TPM (a swtpm), the CA key in SoftHSM.

mod tpm_attested {
    use super::*;
    use base64::Engine;
    use common::attest::{self as vectors, SignatureEncoding};
    use common::swtpm::Swtpm;
    use nfv_warden::keys::tpm::TpmKeyStore;
    use nfv_warden::keys::{KeyAlgorithm, KeyAttestation, KeySpec, KeyStore};
    use std::sync::Arc;

    const NONCE: &[u8] = b"cmf-nonce-0123456789";

    /// (CSR PEM with attestation, CSR PEM without, AK public key PEM)
    fn vectors(algorithm: KeyAlgorithm, nonce: &[u8]) -> (String, String, String) {
        let tpm = Swtpm::start();
        let store =
            Arc::new(TpmKeyStore::open(&common::swtpm::tpm_config(&tpm.tcti())).expect("TPM"));
        let ak = store
            .create_attestation_key(&KeySpec {
                label: "ak".into(),
                algorithm: KeyAlgorithm::EcP256,
            })
            .expect("AK");
        let key = store
            .generate(&KeySpec {
                label: "vnfc-key".into(),
                algorithm,
            })
            .expect("key");
        let stmt = vectors::tpm_statement(
            &store,
            &key.reference,
            &ak.reference,
            nonce,
            SignatureEncoding::Tpmt,
        );
        let bundle = vectors::bundle(vectors::tpm_format(), stmt);
        let attested =
            vectors::attested_csr(store.clone(), &key.reference, "CN=vnfc-t", Some(&bundle));
        let plain = vectors::attested_csr(store.clone(), &key.reference, "CN=vnfc-t", None);
        let pem = |csr: &x509_cert::request::CertReq| {
            nfv_warden::pki::to_pem("CERTIFICATE REQUEST", &csr.to_der().unwrap()).unwrap()
        };
        let ak_pem = nfv_warden::pki::to_pem("PUBLIC KEY", &ak.public_key.spki_der).unwrap();
        (pem(&attested), pem(&plain), ak_pem)
    }

    fn register_attested(ak_pem: &str, subject: &str) -> serde_json::Value {
        json!({
            "certType": "VNFCI_CERT",
            "subjectIds": [subject],
            "typeOfVnfcCertHandling": "DELEGATION_MODE",
            "keyAttestation": {
                "attesterPublicKey": ak_pem,
                "formatOid": "2.23.133.20.1",
                "expectedQualifyingData": base64::engine::general_purpose::STANDARD.encode(NONCE),
            },
        })
    }

    fn csr_body(csr: &str) -> serde_json::Value {
        json!({ "vnfcId": "vnfc-t", "certType": "VNFCI_CERT", "certChainRequest": true, "csr": csr })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tpm_attested_csr_is_issued_without_an_anchor_and_forgeries_are_refused() {
        let (attested, plain, ak_pem) = vectors(KeyAlgorithm::EcP256, NONCE);
        let (wrong_nonce, _, _) = vectors(KeyAlgorithm::Rsa2048, b"another nonce");
        let mut agent = CmfAgent::new("");
        agent.start();
        let mut vnfm = agent.client(Some("vnfm-a")).connect().await.unwrap();
        let created = vnfm
            .post_json(REGISTRATIONS, &register_attested(&ak_pem, "vnfc-t"))
            .await
            .unwrap();
        assert_eq!(created.status, 201, "{}", created.problem_detail());

        // Without the attestation: refused, nothing issued.
        let refused = vnfm.post_json(CSRS, &csr_body(&plain)).await.unwrap();
        assert_eq!(refused.status, 422);
        assert!(
            refused.problem_detail().contains("no key attestation"),
            "{}",
            refused.problem_detail()
        );
        // Attested by another TPM key with another nonce (different AK too): refused.
        let refused = vnfm.post_json(CSRS, &csr_body(&wrong_nonce)).await.unwrap();
        assert_eq!(refused.status, 422);
        assert!(
            refused.problem_detail().starts_with("key attestation:"),
            "{}",
            refused.problem_detail()
        );

        let issued = vnfm.post_json(CSRS, &csr_body(&attested)).await.unwrap();
        assert_eq!(issued.status, 201, "{}", issued.problem_detail());
        let issued = issued.json().unwrap();
        // The AK is the consumer's own, anchored in no TPM PKI: verified, but no TCG policy
        // (issue 10 §2; the anchored cases are in tests/attest.rs).
        assert_eq!(issued["attestation"], "verified-unanchored");
        let leaf = nfv_warden::pki::certificates_from_pem(issued["certificate"].as_str().unwrap())
            .unwrap()
            .remove(0);
        use x509_cert::ext::pkix::CertificatePolicies;
        assert!(leaf
            .tbs_certificate()
            .get_extension::<CertificatePolicies>()
            .unwrap()
            .is_none());
        agent.stop();
        assert_eq!(issued_count(&agent), 1, "only the attested CSR was issued");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn local_policy_may_issue_unattested_and_records_it() {
        let (_, plain, ak_pem) = vectors(KeyAlgorithm::EcP256, NONCE);
        let mut agent = CmfAgent::new("unattested = \"issue\"");
        agent.start();
        let mut vnfm = agent.client(Some("vnfm-a")).connect().await.unwrap();
        let created = vnfm
            .post_json(REGISTRATIONS, &register_attested(&ak_pem, "vnfc-t"))
            .await
            .unwrap();
        assert_eq!(created.status, 201);
        let issued = vnfm.post_json(CSRS, &csr_body(&plain)).await.unwrap();
        assert_eq!(issued.status, 201, "{}", issued.problem_detail());
        let verdict = issued.json().unwrap()["attestation"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(verdict.starts_with("unattested: "), "{verdict}");
        agent.stop();
        let store = nfv_warden::store::Store::open(&agent.store_path()).unwrap();
        let mut records = store.read(|tx| tx.list(&CERTIFICATES, "")).unwrap();
        records.retain(|(_, r)| r.consumer != nfv_warden::cmf::records::AGENT_CONSUMER);
        assert_eq!(records.len(), 1);
        assert!(records[0].1.attestation.starts_with("unattested: "));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ietf_sample_is_refused_at_proof_of_possession() {
    let pem = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/attestation/tcgAttestTpmCertify.pem"
    ))
    .unwrap();
    let mut agent = CmfAgent::new("");
    agent.start();
    let mut vnfm = agent.client(Some("vnfm-a")).connect().await.unwrap();
    let created = vnfm
        .post_json(REGISTRATIONS, &register_body(&["test-key1"]))
        .await
        .unwrap();
    assert_eq!(created.status, 201);
    let refused = vnfm
        .post_json(
            CSRS,
            &json!({ "vnfcId": "test-key1", "certType": "VNFCI_CERT", "certChainRequest": false, "csr": pem }),
        )
        .await
        .unwrap();
    assert_eq!(refused.status, 422);
    assert!(
        refused
            .problem_detail()
            .contains("proof of possession failed"),
        "{}",
        refused.problem_detail()
    );
    agent.stop();
    assert_eq!(issued_count(&agent), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_has_its_status_and_reason() {
    let mut agent = CmfAgent::new("max_body_bytes = 16384");
    agent.start();
    let mut a = agent.client(Some("vnfm-a")).connect().await.unwrap();
    let mut b = agent.client(Some("vnfm-b")).connect().await.unwrap();
    let mut c = agent.client(Some("vnfm-c")).connect().await.unwrap();
    let created = a
        .post_json(REGISTRATIONS, &register_body(&["vnfc-a1"]))
        .await
        .unwrap();
    assert_eq!(created.status, 201);
    let id = created.json().unwrap()["id"].as_str().unwrap().to_string();
    let good = openssl_csr(agent.dir(), "a1", "/CN=vnfc-a1", &[]);
    let csr = |vnfc: &str, csr: &str| json!({ "vnfcId": vnfc, "certType": "VNFCI_CERT", "certChainRequest": false, "csr": csr });

    let mut cases: Vec<(&str, u16, &str, nfv_warden::client::ClientResponse)> = Vec::new();
    // Bad CSR signature: flip one byte of the signature.
    let (_, mut der) = der::pem::decode_vec(good.as_bytes()).unwrap();
    let last = der.len() - 3;
    der[last] ^= 0x01;
    let tampered = nfv_warden::pki::to_pem("CERTIFICATE REQUEST", &der).unwrap();
    cases.push((
        "bad CSR signature",
        422,
        "proof of possession failed",
        a.post_json(CSRS, &csr("vnfc-a1", &tampered)).await.unwrap(),
    ));
    // Subject not registered (CSR names a subject outside the registration).
    let other = openssl_csr(agent.dir(), "a2", "/CN=vnfc-a1", &["intruder.example"]);
    cases.push((
        "subject not registered",
        422,
        "'intruder.example' is not among the subjects registered",
        a.post_json(CSRS, &csr("vnfc-a1", &other)).await.unwrap(),
    ));
    cases.push((
        "vnfcId not registered",
        422,
        "vnfcId 'vnfc-zz' is not registered",
        a.post_json(CSRS, &csr("vnfc-zz", &good)).await.unwrap(),
    ));
    // vnfcId registered by another consumer of the same trust domain.
    cases.push((
        "another consumer's vnfcId",
        403,
        "managed by another consumer",
        b.post_json(CSRS, &csr("vnfc-a1", &good)).await.unwrap(),
    ));
    // A consumer of another trust domain.
    cases.push((
        "other trust domain reads",
        403,
        "belongs to another consumer",
        c.get(&format!("{REGISTRATIONS}/{id}")).await.unwrap(),
    ));
    // One manager per name (issue 10): 409, without naming a consumer of another domain.
    cases.push((
        "other trust domain registers the same subject",
        409,
        "managed by a consumer of another trust domain",
        c.post_json(REGISTRATIONS, &register_body(&["vnfc-a1"]))
            .await
            .unwrap(),
    ));
    cases.push((
        "other consumer deletes",
        403,
        "belongs to another consumer",
        b.request("DELETE", &format!("{REGISTRATIONS}/{id}"), None, Vec::new())
            .await
            .unwrap(),
    ));
    cases.push((
        "same subject twice",
        409,
        "already registered by you",
        a.post_json(REGISTRATIONS, &register_body(&["vnfc-a1"]))
            .await
            .unwrap(),
    ));
    // DIRECT_MODE registration.
    let direct = json!({ "certType": "VNFCI_CERT", "subjectIds": ["vnfc-d"], "typeOfVnfcCertHandling": "DIRECT_MODE" });
    cases.push((
        "DIRECT_MODE",
        422,
        "delegation mode only",
        a.post_json(REGISTRATIONS, &direct).await.unwrap(),
    ));
    let mano = json!({ "certType": "MANO_CERT", "subjectIds": ["nfvo.example"], "typeOfVnfcCertHandling": "DELEGATION_MODE" });
    cases.push((
        "handling with MANO_CERT",
        400,
        "must be absent for MANO_CERT",
        a.post_json(REGISTRATIONS, &mano).await.unwrap(),
    ));
    // Oversized body.
    let big = json!({ "vnfcId": "vnfc-a1", "certType": "VNFCI_CERT", "certChainRequest": false, "csr": "A".repeat(20_000) });
    cases.push((
        "oversized body",
        413,
        "larger than 16384 bytes",
        a.post_json(CSRS, &big).await.unwrap(),
    ));
    // Garbage DER.
    cases.push((
        "garbage DER",
        400,
        "not a DER PKCS#10 request",
        a.post_json(CSRS, &csr("vnfc-a1", "AAECAwQFBgcICQ=="))
            .await
            .unwrap(),
    ));
    cases.push((
        "malformed JSON",
        400,
        "request body",
        a.request(
            "POST",
            CSRS,
            Some("application/json"),
            b"{\"csr\": ".to_vec(),
        )
        .await
        .unwrap(),
    ));
    // Wrong content type.
    cases.push((
        "wrong content type",
        415,
        "expected application/json",
        a.request("POST", CSRS, Some("text/plain"), b"{}".to_vec())
            .await
            .unwrap(),
    ));
    cases.push((
        "wrong method",
        405,
        "not supported",
        a.request("PUT", CSRS, Some("application/json"), b"{}".to_vec())
            .await
            .unwrap(),
    ));
    cases.push((
        "unknown resource",
        404,
        "no resource at",
        a.get("/certmgmt/v1/nothing").await.unwrap(),
    ));
    cases.push((
        "unknown registration",
        404,
        "does not exist",
        a.get(&format!("{REGISTRATIONS}/00")).await.unwrap(),
    ));
    // Identity: none, and unknown.
    let mut anonymous = agent.client(None).connect().await.unwrap();
    cases.push((
        "no client certificate",
        401,
        "client certificate is required",
        anonymous
            .post_json(CSRS, &csr("vnfc-a1", &good))
            .await
            .unwrap(),
    ));
    let mut stranger = agent.client(Some("vnfm-x")).connect().await.unwrap();
    cases.push((
        "unknown consumer",
        403,
        "not a configured consumer",
        stranger.get(REGISTRATIONS).await.unwrap(),
    ));
    // An RSA-1024 key is below policy.
    common::cmf::sh(agent.dir(), "openssl req -new -newkey rsa:1024 -nodes -keyout weak.key -out weak.csr -subj /CN=vnfc-a1 2>/dev/null");
    let weak = std::fs::read_to_string(agent.dir().join("weak.csr")).unwrap();
    cases.push((
        "weak key",
        422,
        "at least 2048",
        a.post_json(CSRS, &csr("vnfc-a1", &weak)).await.unwrap(),
    ));

    for (what, status, reason, response) in &cases {
        assert_eq!(
            response.status,
            *status,
            "{what}: {}",
            response.problem_detail()
        );
        assert!(
            response.problem_detail().contains(reason),
            "{what}: '{}'",
            response.problem_detail()
        );
        if response.status >= 400 {
            let content_type = response.headers["content-type"].to_str().unwrap();
            assert_eq!(content_type, "application/problem+json", "{what}");
            let problem = response.json().unwrap();
            assert_eq!(problem["status"], *status, "{what}");
            assert_eq!(response.headers["version"], "1.0.0", "{what}");
        }
    }
    // The owner still reads its registration; the list shows only the caller's.
    assert_eq!(
        a.get(&format!("{REGISTRATIONS}/{id}"))
            .await
            .unwrap()
            .status,
        200
    );
    assert_eq!(
        c.get(REGISTRATIONS).await.unwrap().json().unwrap(),
        json!([])
    );
    agent.stop();
    assert_eq!(
        issued_count(&agent),
        0,
        "nothing was issued by any refused request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_and_certificates_survive_kill_9() {
    let mut agent = CmfAgent::new("");
    agent.start();
    let mut a = agent.client(Some("vnfm-a")).connect().await.unwrap();
    let created = a
        .post_json(REGISTRATIONS, &register_body(&["vnfc-k"]))
        .await
        .unwrap();
    let id = created.json().unwrap()["id"].as_str().unwrap().to_string();
    let csr = openssl_csr(agent.dir(), "k", "/CN=vnfc-k", &[]);
    let body = json!({ "vnfcId": "vnfc-k", "certType": "VNFCI_CERT", "certChainRequest": false, "csr": csr });
    let mut serials = Vec::new();
    for _ in 0..5 {
        let issued = a.post_json(CSRS, &body).await.unwrap();
        assert_eq!(issued.status, 201);
        serials.push(
            issued.json().unwrap()["serialNumber"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    drop(a);
    agent.kill9();
    agent.start();
    let mut a = agent.client(Some("vnfm-a")).connect().await.unwrap();
    let read = a.get(&format!("{REGISTRATIONS}/{id}")).await.unwrap();
    assert_eq!(read.status, 200, "registration survived the crash");
    let issued = a.post_json(CSRS, &body).await.unwrap();
    assert_eq!(
        issued.status, 201,
        "the registration still works after the crash"
    );
    serials.push(
        issued.json().unwrap()["serialNumber"]
            .as_str()
            .unwrap()
            .to_string(),
    );
    drop(a);
    agent.stop();
    let store = nfv_warden::store::Store::open(&agent.store_path()).unwrap();
    let records = store.read(|tx| tx.list(&CERTIFICATES, "")).unwrap();
    for serial in &serials {
        assert!(
            records
                .iter()
                .any(|(k, _)| k == &format!("default/{serial}")),
            "{serial} recorded"
        );
    }
    store
        .verify_audit_chain()
        .expect("audit chain intact after the crash");
}

#[test]
fn warden_register_and_csr_commands_act_as_a_vnfm() {
    let mut agent = CmfAgent::new("");
    agent.start();
    let dir = agent.dir().to_path_buf();
    let client = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_warden"))
            .current_dir(&dir)
            .env("WARDEN_SERVER", agent.base())
            .env("WARDEN_CACERT", "ca.pem")
            .env("WARDEN_CLIENT_CERT", "vnfm-a.pem")
            .env("WARDEN_CLIENT_KEY", "vnfm-a.key")
            .args(args)
            .output()
            .unwrap()
    };
    let out = client(&[
        "register",
        "--cert-type",
        "VNFCI_CERT",
        "--subject",
        "vnfc-cli",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let registration: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(registration["subjectIds"], json!(["vnfc-cli"]));
    openssl_csr(&dir, "cli", "/CN=vnfc-cli", &[]);
    let out = client(&["csr", "--vnfc", "vnfc-cli", "--csr", "cli.csr", "--chain"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(dir.join("cli-issued.pem"), &out.stdout).unwrap();
    let verify = Command::new("openssl")
        .args(["verify", "-CAfile", "ca.pem", "cli-issued.pem"])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    // The README walkthrough with a TPM-attested key: the VNF's TPM is a swtpm.
    let tpm = common::swtpm::Swtpm::start();
    let out = client(&[
        "vnf-csr",
        "--tcti",
        &tpm.tcti(),
        "--subject",
        "CN=vnfc-tpm",
        "--nonce",
        "c0ffee",
        "--out",
        "tpm.csr",
        "--ak-out",
        "ak.pem",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = client(&[
        "register",
        "--cert-type",
        "VNFCI_CERT",
        "--subject",
        "vnfc-tpm",
        "--attester-key",
        "ak.pem",
        "--format-oid",
        "2.23.133.20.1",
        "--qualifying-data",
        "c0ffee",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = client(&["csr", "--vnfc", "vnfc-tpm", "--csr", "tpm.csr", "--chain"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("attestation verified"));
    std::fs::write(dir.join("tpm-issued.pem"), &out.stdout).unwrap();
    let verify = Command::new("openssl")
        .args(["verify", "-CAfile", "ca.pem", "tpm-issued.pem"])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );

    // A refusal is one line with the status and the reason.
    let out = client(&["csr", "--vnfc", "vnfc-other", "--csr", "cli.csr"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("warden: 422 /certmgmt/v1/certificate_signing_requests: vnfcId 'vnfc-other' is not registered"), "{stderr}");
    agent.stop();
}

/// Every attestation check refused over HTTP with its own reason, and nothing issued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attestation_forgeries_over_http_each_refused_with_its_reason() {
    use base64::Engine;
    use common::attest::{self as vectors, SignatureEncoding};
    use common::swtpm::Swtpm;
    use nfv_warden::cmf::attest::tpm;
    use nfv_warden::keys::signer::{HardwareKey, HardwareSignature};
    use nfv_warden::keys::tpm::TpmKeyStore;
    use nfv_warden::keys::{KeyAlgorithm, KeyAttestation, KeySpec, KeyStore};
    use std::str::FromStr;
    use std::sync::Arc;
    use x509_cert::builder::{Builder, RequestBuilder};

    const NONCE: &[u8] = b"forgery-nonce";
    let swtpm = Swtpm::start();
    let store = Arc::new(TpmKeyStore::open(&common::swtpm::tpm_config(&swtpm.tcti())).unwrap());
    let spec = |label: &str, algorithm| KeySpec {
        label: label.into(),
        algorithm,
    };
    let ak = store
        .create_attestation_key(&spec("ak", KeyAlgorithm::EcP256))
        .unwrap();
    let other_ak = store
        .create_attestation_key(&spec("ak2", KeyAlgorithm::EcP256))
        .unwrap();
    let key = store.generate(&spec("k", KeyAlgorithm::EcP256)).unwrap();
    let other = store.generate(&spec("k2", KeyAlgorithm::EcP256)).unwrap();
    let duplicable = store
        .generate_with_attributes(
            &spec("dup", KeyAlgorithm::EcP256),
            tpm::SENSITIVE_DATA_ORIGIN | 0x40 | tpm::SIGN,
        )
        .unwrap();
    let evidence = store.certify(&key.reference, &ak.reference, NONCE).unwrap();
    let statement = |attest: &[u8], public: Option<&[u8]>| {
        tpm::encode_statement(attest, &evidence.signature, public).unwrap()
    };
    let csr_pem = |signing_key: &nfv_warden::keys::KeyRef, stmts: &[Vec<u8>]| {
        let signer = HardwareKey::new(store.clone(), signing_key.clone()).unwrap();
        let mut builder =
            RequestBuilder::new(x509_cert::name::Name::from_str("CN=vnfc-f").unwrap()).unwrap();
        for (i, stmt) in stmts.iter().enumerate() {
            let mut bundle = vectors::bundle(vectors::tpm_format(), stmt.clone());
            bundle.statements[0].hint = (i > 0).then(|| format!("copy {i}"));
            builder.add_attribute(&bundle).unwrap();
        }
        let csr = builder.build::<_, HardwareSignature>(&signer).unwrap();
        nfv_warden::pki::to_pem("CERTIFICATE REQUEST", &csr.to_der().unwrap()).unwrap()
    };
    let mut tampered = evidence.attest.clone();
    *tampered.last_mut().unwrap() ^= 1;
    let other_evidence = store
        .certify(&other.reference, &ak.reference, NONCE)
        .unwrap();
    let by_other_ak = vectors::tpm_statement(
        &store,
        &key.reference,
        &other_ak.reference,
        NONCE,
        SignatureEncoding::Tpmt,
    );
    let not_fixed = vectors::tpm_statement(
        &store,
        &duplicable.reference,
        &ak.reference,
        NONCE,
        SignatureEncoding::Tpmt,
    );
    let good = statement(&evidence.attest, Some(&evidence.public_area));
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "tampered TPMS_ATTEST",
            csr_pem(
                &key.reference,
                &[statement(&tampered, Some(&evidence.public_area))],
            ),
            "not signed by the registered attester key",
        ),
        (
            "signed by another AK",
            csr_pem(&key.reference, &[by_other_ak]),
            "not signed by the registered attester key",
        ),
        (
            "tpmTPublic of another key",
            csr_pem(
                &key.reference,
                &[statement(
                    &evidence.attest,
                    Some(&other_evidence.public_area),
                )],
            ),
            "tpmTPublic is not the certified key",
        ),
        (
            "CSR key differs from the attested key",
            csr_pem(&other.reference, std::slice::from_ref(&good)),
            "not the CSR's subject public key",
        ),
        (
            "key without fixedTPM",
            csr_pem(&duplicable.reference, &[not_fixed]),
            "attributes are not acceptable",
        ),
        (
            "missing tpmTPublic",
            csr_pem(&key.reference, &[statement(&evidence.attest, None)]),
            "carries no public key",
        ),
        (
            "two attestation attributes",
            csr_pem(&key.reference, &[good.clone(), good.clone()]),
            "2 id-aa-attestation attributes",
        ),
        (
            "no attestation",
            csr_pem(&key.reference, &[]),
            "carries no key attestation",
        ),
    ];
    let valid = csr_pem(&key.reference, &[good]);
    let ak_pem = nfv_warden::pki::to_pem("PUBLIC KEY", &ak.public_key.spki_der).unwrap();
    drop(store);

    let mut agent = CmfAgent::new("");
    agent.start();
    let mut vnfm = agent.client(Some("vnfm-a")).connect().await.unwrap();
    let registration = json!({
        "certType": "VNFCI_CERT",
        "subjectIds": ["vnfc-f"],
        "typeOfVnfcCertHandling": "DELEGATION_MODE",
        "keyAttestation": {
            "attesterPublicKey": ak_pem,
            "formatOid": "2.23.133.20.1",
            "expectedQualifyingData": base64::engine::general_purpose::STANDARD.encode(NONCE),
        },
    });
    assert_eq!(
        vnfm.post_json(REGISTRATIONS, &registration)
            .await
            .unwrap()
            .status,
        201
    );
    let body = |csr: &str| json!({ "vnfcId": "vnfc-f", "certType": "VNFCI_CERT", "certChainRequest": false, "csr": csr });
    for (what, csr, reason) in &cases {
        let response = vnfm.post_json(CSRS, &body(csr)).await.unwrap();
        assert_eq!(
            response.status,
            422,
            "{what}: {}",
            response.problem_detail()
        );
        let detail = response.problem_detail();
        assert!(
            detail.starts_with("key attestation: ") && detail.contains(reason),
            "{what}: {detail}"
        );
    }
    agent.stop();
    assert_eq!(issued_count(&agent), 0, "no forgery was issued");
    // The genuine one still goes through on the same registration.
    agent.start();
    let mut vnfm = agent.client(Some("vnfm-a")).connect().await.unwrap();
    let issued = vnfm.post_json(CSRS, &body(&valid)).await.unwrap();
    assert_eq!(issued.status, 201, "{}", issued.problem_detail());
    agent.stop();
    assert_eq!(issued_count(&agent), 1);
}

/// The CA key in a TPM that goes away: 503 with Retry-After, nothing issued, and service
/// back without a restart once the TPM is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_key_unavailable_is_503_with_retry_after_then_recovers() {
    let mut swtpm = common::swtpm::Swtpm::start();
    let mut agent = CmfAgent::with_ca_key("", Some(&swtpm.tcti()));
    agent.start();
    let mut vnfm = agent.client(Some("vnfm-a")).connect().await.unwrap();
    assert_eq!(
        vnfm.post_json(REGISTRATIONS, &register_body(&["vnfc-u"]))
            .await
            .unwrap()
            .status,
        201
    );
    let csr = openssl_csr(agent.dir(), "u", "/CN=vnfc-u", &[]);
    let body = json!({ "vnfcId": "vnfc-u", "certType": "VNFCI_CERT", "certChainRequest": false, "csr": csr });
    assert_eq!(
        vnfm.post_json(CSRS, &body).await.unwrap().status,
        201,
        "CA key in the TPM signs"
    );

    swtpm.kill();
    let response = vnfm.post_json(CSRS, &body).await.unwrap();
    assert_eq!(response.status, 503, "{}", response.problem_detail());
    assert!(response.headers.contains_key("retry-after"));
    assert!(
        response.problem_detail().contains("unavailable"),
        "{}",
        response.problem_detail()
    );

    // Back without a restart: the agent reconnects with backoff; until it has, CSRs keep
    // getting 503 (polled with a generous bound, not timed).
    swtpm.restart();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let response = vnfm.post_json(CSRS, &body).await.unwrap();
        if response.status == 201 {
            break;
        }
        assert_eq!(response.status, 503, "{}", response.problem_detail());
        assert!(
            std::time::Instant::now() < deadline,
            "service not back once the TPM is: {}",
            response.problem_detail()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    drop(vnfm);
    agent.stop();
    assert_eq!(
        issued_count(&agent),
        2,
        "the refused request issued nothing"
    );
}
