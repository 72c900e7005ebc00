//! Names and trust domains (issue 10 section 1), end to end over HTTPS with mutual TLS, with
//! two consumers in two trust domains: one namespace of names across certTypes, the
//! domains' permitted DNS suffixes / VNFC identifier patterns / IP ranges / CAs / certTypes,
//! reserved names, name syntax at Register, VNFC identifiers in the subject (and as URIs
//! where configured), MANO
//! certificates, the operator's registration commands, and the upgrade of a subject index
//! written before one namespace. The CA key is in a real SoftHSM token.

mod common;

use common::cmf::{openssl_csr, sh, CmfAgent};
use der::Decode;
use nfv_warden::client::ClientResponse;
use nfv_warden::cmf::{CertType, Registration, VnfcCertHandling, REGISTRATIONS, SUBJECTS};
use serde_json::{json, Value};
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{ExtendedKeyUsage, SubjectAltName};
use x509_cert::Certificate;

const REGISTRATIONS_PATH: &str = "/certmgmt/v1/registrations";
const CSRS: &str = "/certmgmt/v1/certificate_signing_requests";

/// Two trust domains, each with its own CA id (the same key and certificate under two ids,
/// so that the CA chosen shows which domain's list it came from), and a narrowed consumer.
const DOMAINS: &str = r#"
[[cmf.ca]]
id = "ca-a"
key = "pkcs11:token=warden;object=warden-ca"
certificate = "{dir}/ca.pem"
cert_types = ["MANO_CERT", "VNFCI_CERT", "VNF_OAM_CERT"]

[[cmf.ca]]
id = "ca-b"
key = "pkcs11:token=warden;object=warden-ca"
certificate = "{dir}/ca.pem"
cert_types = ["VNFCI_CERT", "VNF_OAM_CERT"]

[[cmf.trust_domain]]
id = "operator-a"
dns_suffixes = ["a.example.net", "shared.example.net"]
# localhost and vnfm-* are permitted by pattern: the reserved-name rule must still refuse them.
vnfc_id_patterns = ["vnfc-*", "vnfm-*", "localhost"]
ip_ranges = ["10.1.0.0/16", "127.0.0.0/8"]
cas = ["ca-a"]
cert_types = ["MANO_CERT", "VNFCI_CERT", "VNF_OAM_CERT"]

[[cmf.trust_domain]]
id = "operator-b"
dns_suffixes = ["b.example.net", "shared.example.net"]
vnfc_id_patterns = ["*"]
ip_ranges = ["10.2.0.0/16"]
cas = ["ca-b"]

[[cmf.consumer]]
id = "vnfm-a"
trust_domain = "operator-a"

[[cmf.consumer]]
id = "vnfm-b"
trust_domain = "operator-a"
dns_suffixes = ["b1.a.example.net"]
cert_types = ["VNFCI_CERT", "VNF_OAM_CERT"]

[[cmf.consumer]]
id = "vnfm-c"
trust_domain = "operator-b"
"#;

fn vnfci(subjects: &[&str]) -> Value {
    json!({
        "certType": "VNFCI_CERT",
        "subjectIds": subjects,
        "typeOfVnfcCertHandling": "DELEGATION_MODE",
    })
}

fn oam(subjects: &[&str]) -> Value {
    json!({
        "certType": "VNF_OAM_CERT",
        "subjectIds": subjects,
        "typeOfVnfcCertHandling": "DELEGATION_MODE",
    })
}

fn mano(subjects: &[&str]) -> Value {
    json!({ "certType": "MANO_CERT", "subjectIds": subjects })
}

fn started() -> CmfAgent {
    let mut agent = CmfAgent::new(DOMAINS);
    agent.start();
    agent
}

/// The subjectAltNames of a PEM certificate, as (kind, value).
fn sans(pem: &str) -> Vec<(String, String)> {
    let (_, der) = der::pem::decode_vec(pem.as_bytes()).expect("PEM");
    let cert = Certificate::from_der(&der).expect("certificate");
    let mut out = Vec::new();
    for ext in cert.tbs_certificate().extensions().into_iter().flatten() {
        if ext.extn_id == const_oid::db::rfc5280::ID_CE_SUBJECT_ALT_NAME {
            let san = SubjectAltName::from_der(ext.extn_value.as_bytes()).expect("SAN");
            for name in san.0 {
                out.push(match name {
                    GeneralName::DnsName(d) => ("DNS".into(), d.to_string()),
                    GeneralName::UniformResourceIdentifier(u) => ("URI".into(), u.to_string()),
                    GeneralName::IpAddress(ip) => ("IP".into(), hex::encode(ip.as_bytes())),
                    other => ("other".into(), format!("{other:?}")),
                });
            }
        }
    }
    out
}

/// The subject DN of a PEM certificate (RFC 4514).
fn subject(pem: &str) -> String {
    let (_, der) = der::pem::decode_vec(pem.as_bytes()).expect("PEM");
    Certificate::from_der(&der)
        .expect("certificate")
        .tbs_certificate()
        .subject()
        .to_string()
}

fn extended_key_usages(pem: &str) -> Vec<String> {
    let (_, der) = der::pem::decode_vec(pem.as_bytes()).expect("PEM");
    let cert = Certificate::from_der(&der).expect("certificate");
    cert.tbs_certificate()
        .extensions()
        .into_iter()
        .flatten()
        .filter(|e| e.extn_id == const_oid::db::rfc5280::ID_CE_EXT_KEY_USAGE)
        .flat_map(|e| {
            ExtendedKeyUsage::from_der(e.extn_value.as_bytes())
                .expect("EKU")
                .0
                .into_iter()
                .map(|oid| oid.to_string())
        })
        .collect()
}

fn check(what: &str, response: &ClientResponse, status: u16, reason: &str) {
    let detail = response.problem_detail();
    assert_eq!(response.status, status, "{what}: {detail}");
    assert!(
        detail.contains(reason),
        "{what}: '{reason}' not in '{detail}'"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_enforces_syntax_domains_reserved_names_and_one_namespace() {
    let agent = started();
    let mut a = agent.client(Some("vnfm-a")).connect().await.unwrap();
    let mut b = agent.client(Some("vnfm-b")).connect().await.unwrap();
    let mut c = agent.client(Some("vnfm-c")).connect().await.unwrap();

    // Each syntax case of the issue is refused at Register, 422 naming the rule; none of
    // them reaches a CSR (where it used to be a 500).
    for (name, rule) in [
        ("vnfc_under", "'_'"),
        (".dot", "empty label"),
        ("a..b", "empty label"),
        ("a_b.example.net", "'_'"),
        ("-lead", "starts or ends with '-'"),
        (":", "':'"),
        ("x.a.example.net.", "ends with '.'"),
        ("*.a.example.net", "wildcard"),
        ("bücher.a.example.net", "A-labels"),
        ("1.2.3.400", "all-numeric"),
    ] {
        let r = a
            .post_json(REGISTRATIONS_PATH, &vnfci(&[name]))
            .await
            .unwrap();
        check(&format!("syntax {name}"), &r, 422, rule);
        assert!(r.problem_detail().contains(&format!("'{name}'")));
    }

    // The domain's permitted sets, per kind of name.
    let r = a
        .post_json(REGISTRATIONS_PATH, &oam(&["host.b.example.net"]))
        .await
        .unwrap();
    check(
        "DNS outside",
        &r,
        422,
        "outside the DNS suffixes of cmf.trust_domain 'operator-a'",
    );
    let r = a
        .post_json(REGISTRATIONS_PATH, &vnfci(&["web-1"]))
        .await
        .unwrap();
    check(
        "VNFC id outside",
        &r,
        422,
        "matches none of the VNFC identifier patterns",
    );
    let r = a
        .post_json(REGISTRATIONS_PATH, &oam(&["10.2.0.5"]))
        .await
        .unwrap();
    check(
        "IP outside",
        &r,
        422,
        "outside the IP ranges of cmf.trust_domain 'operator-a'",
    );
    // A label boundary: evila.example.net is not under a.example.net.
    let r = a
        .post_json(REGISTRATIONS_PATH, &oam(&["x.evila.example.net"]))
        .await
        .unwrap();
    check("suffix boundary", &r, 422, "outside the DNS suffixes");
    // The consumer's own narrowing on top of the domain's.
    let r = b
        .post_json(REGISTRATIONS_PATH, &oam(&["x.a.example.net"]))
        .await
        .unwrap();
    check(
        "consumer narrowing",
        &r,
        422,
        "outside the DNS suffixes of cmf.consumer 'vnfm-b'",
    );
    let r = b
        .post_json(REGISTRATIONS_PATH, &oam(&["x.b1.a.example.net"]))
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.problem_detail());
    // A single label is a VNFC identifier, not a VNF OAM subject.
    let r = a
        .post_json(REGISTRATIONS_PATH, &oam(&["vnfc-9"]))
        .await
        .unwrap();
    check(
        "OAM single label",
        &r,
        422,
        "VNF_OAM_CERT subjects are DNS host names",
    );

    // Reserved: consumer ids and the agent's own names (its TLS certificate: localhost,
    // 127.0.0.1), even where the domain's patterns and ranges would permit them.
    let r = a
        .post_json(REGISTRATIONS_PATH, &vnfci(&["vnfm-c"]))
        .await
        .unwrap();
    check(
        "consumer id",
        &r,
        422,
        "is the identity of a consumer of this CMF",
    );
    let r = a
        .post_json(REGISTRATIONS_PATH, &vnfci(&["localhost"]))
        .await
        .unwrap();
    check("agent name", &r, 422, "is one of this agent's own names");
    let r = a
        .post_json(REGISTRATIONS_PATH, &oam(&["127.0.0.1"]))
        .await
        .unwrap();
    check("agent address", &r, 422, "is one of this agent's own names");

    // The CA comes from the domain's list: chosen, and a caId outside it refused.
    let r = a
        .post_json(REGISTRATIONS_PATH, &vnfci(&["vnfc-a1.shared.example.net"]))
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.problem_detail());
    let held = r.json().unwrap();
    assert_eq!(held["caId"], "ca-a");
    assert_eq!(held["trustDomain"], "operator-a");
    let r = c
        .post_json(REGISTRATIONS_PATH, &vnfci(&["vnfc-c1"]))
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.problem_detail());
    assert_eq!(r.json().unwrap()["caId"], "ca-b");
    let mut body = vnfci(&["vnfc-c2"]);
    body["caId"] = json!("ca-a");
    let r = c.post_json(REGISTRATIONS_PATH, &body).await.unwrap();
    check(
        "caId of another domain",
        &r,
        422,
        "caId 'ca-a' is not a CA of trust domain 'operator-b'",
    );

    // One namespace across certTypes: the name vnfm-a holds as VNFCI_CERT cannot be
    // registered as VNF_OAM_CERT, by anyone; 409 names the holder only within the domain.
    let r = c
        .post_json(REGISTRATIONS_PATH, &oam(&["vnfc-a1.shared.example.net"]))
        .await
        .unwrap();
    check(
        "other domain, other type",
        &r,
        409,
        "managed by a consumer of another trust domain",
    );
    assert!(
        !r.problem_detail().contains("vnfm-a"),
        "{}",
        r.problem_detail()
    );
    assert!(!r.problem_detail().contains(held["id"].as_str().unwrap()));
    let r = b
        .post_json(
            REGISTRATIONS_PATH,
            &json!({
                "certType": "VNFCI_CERT",
                "subjectIds": ["vnfc-a1.shared.example.net"],
                "typeOfVnfcCertHandling": "DELEGATION_MODE",
            }),
        )
        .await
        .unwrap();
    // vnfm-b's own narrowing refuses the name before the namespace is asked.
    check("same domain, narrowed", &r, 422, "cmf.consumer 'vnfm-b'");
    let r = a
        .post_json(REGISTRATIONS_PATH, &oam(&["VNFC-A1.shared.example.net"]))
        .await
        .unwrap();
    check(
        "own name, other type",
        &r,
        409,
        "already registered by you as VNFCI_CERT",
    );
    // Same-domain conflicts name the holder.
    let r = a
        .post_json(REGISTRATIONS_PATH, &oam(&["x.b1.a.example.net"]))
        .await
        .unwrap();
    check(
        "same domain",
        &r,
        409,
        "managed by consumer 'vnfm-b' of your trust domain",
    );

    // MANO_CERT only where the domain (and consumer) permit it.
    let r = c
        .post_json(REGISTRATIONS_PATH, &mano(&["nfvo.b.example.net"]))
        .await
        .unwrap();
    check(
        "MANO not permitted",
        &r,
        422,
        "certType MANO_CERT: not permitted for consumer 'vnfm-c'",
    );
    let r = b
        .post_json(REGISTRATIONS_PATH, &mano(&["nfvo.b1.a.example.net"]))
        .await
        .unwrap();
    check(
        "MANO narrowed away",
        &r,
        422,
        "certType MANO_CERT: not permitted for consumer 'vnfm-b'",
    );
    let r = a
        .post_json(REGISTRATIONS_PATH, &mano(&["vnfc-m"]))
        .await
        .unwrap();
    check("MANO single label", &r, 422, "MANO_CERT subjects are FQDNs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vnfc_identifiers_are_never_dns_names_and_mano_certificates_issue() {
    let agent = started();
    let mut a = agent.client(Some("vnfm-a")).connect().await.unwrap();

    // A single-label VNFC identifier: never a dNSName; the subject's commonName certifies
    // it (and, with vnfc_id_uri, a URI: the next test).
    let r = a
        .post_json(
            REGISTRATIONS_PATH,
            &vnfci(&[
                "vnfc-0001",
                "vnfc-0001.a.example.net",
                "10.1.0.7",
                "vnfc-0002",
            ]),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.problem_detail());
    let csr = openssl_csr(
        agent.dir(),
        "v1",
        "/CN=vnfc-0001",
        &["vnfc-0001.a.example.net"],
    );
    let r = a
        .post_json(
            CSRS,
            &json!({ "vnfcId": "vnfc-0001", "certType": "VNFCI_CERT", "certChainRequest": false, "csr": csr }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.problem_detail());
    let pem = r.json().unwrap()["certificate"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        sans(&pem),
        vec![("DNS".to_string(), "vnfc-0001.a.example.net".to_string())]
    );
    assert_eq!(subject(&pem), "CN=vnfc-0001");
    std::fs::write(agent.dir().join("v1.pem"), &pem).unwrap();
    sh(
        agent.dir(),
        "openssl verify -CAfile ca.pem v1.pem >/dev/null",
    );

    // The identifier asked for by its URI in the CSR, the address by the CN: the address is
    // an iPAddress, the identifier the commonName.
    sh(
        agent.dir(),
        "openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout v2.key \
         -out v2.csr -subj /CN=10.1.0.7 -addext subjectAltName=URI:urn:etsi:nfv:vnfc:vnfc-0001 \
         2>/dev/null",
    );
    let csr = std::fs::read_to_string(agent.dir().join("v2.csr")).unwrap();
    let r = a
        .post_json(
            CSRS,
            &json!({ "vnfcId": "vnfc-0001", "certType": "VNFCI_CERT", "certChainRequest": false, "csr": csr }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.problem_detail());
    let pem = r.json().unwrap()["certificate"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(sans(&pem), vec![("IP".to_string(), "0a010007".to_string())]);
    assert_eq!(subject(&pem), "CN=vnfc-0001");
    // Only a VNFC identifier: no subjectAltName at all (never an empty one).
    let only = openssl_csr(agent.dir(), "v5", "/CN=vnfc-0002", &[]);
    let r = a
        .post_json(
            CSRS,
            &json!({ "vnfcId": "vnfc-0002", "certType": "VNFCI_CERT", "certChainRequest": false, "csr": only }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.problem_detail());
    let pem = r.json().unwrap()["certificate"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(sans(&pem), Vec::<(String, String)>::new());
    assert_eq!(subject(&pem), "CN=vnfc-0002");
    // One certificate is for one VNFC instance.
    sh(
        agent.dir(),
        "openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout v6.key \
         -out v6.csr -subj /CN=vnfc-0001 -addext subjectAltName=URI:urn:etsi:nfv:vnfc:vnfc-0002 \
         2>/dev/null",
    );
    let two = std::fs::read_to_string(agent.dir().join("v6.csr")).unwrap();
    let r = a
        .post_json(
            CSRS,
            &json!({ "vnfcId": "vnfc-0001", "certType": "VNFCI_CERT", "certChainRequest": false, "csr": two }),
        )
        .await
        .unwrap();
    check(
        "two VNFC ids",
        &r,
        422,
        "a certificate is for one VNFC instance",
    );

    // A CSR naming a badly formed name is a 422 naming the rule, never a 500.
    let bad = openssl_csr(agent.dir(), "v3", "/CN=vnfc-0001", &["a_b.a.example.net"]);
    let r = a
        .post_json(
            CSRS,
            &json!({ "vnfcId": "vnfc-0001", "certType": "VNFCI_CERT", "certChainRequest": false, "csr": bad }),
        )
        .await
        .unwrap();
    check("CSR name syntax", &r, 422, "'_'");
    // A CSR of the wrong certType for the registration that holds the name.
    let r = a
        .post_json(
            CSRS,
            &json!({ "certType": "VNF_OAM_CERT", "certChainRequest": false,
                     "csr": openssl_csr(agent.dir(), "v4", "/CN=vnfc-0001.a.example.net", &[]) }),
        )
        .await
        .unwrap();
    check("wrong type", &r, 422, "is registered for VNFCI_CERT");

    // MANO_CERT: registered by a consumer whose domain permits it, issued with the MANO
    // profile (serverAuth + clientAuth) for the FQDN, as a dNSName.
    let r = a
        .post_json(REGISTRATIONS_PATH, &mano(&["nfvo.a.example.net"]))
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.problem_detail());
    assert_eq!(r.json().unwrap()["caId"], "ca-a");
    let csr = openssl_csr(
        agent.dir(),
        "m",
        "/CN=nfvo.a.example.net",
        &["nfvo.a.example.net"],
    );
    let r = a
        .post_json(
            CSRS,
            &json!({ "certType": "MANO_CERT", "certChainRequest": true, "csr": csr }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.problem_detail());
    let pem = r.json().unwrap()["certificate"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        sans(&pem),
        vec![("DNS".to_string(), "nfvo.a.example.net".to_string())]
    );
    assert_eq!(
        extended_key_usages(&pem),
        vec![
            "1.3.6.1.5.5.7.3.1".to_string(),
            "1.3.6.1.5.5.7.3.2".to_string()
        ]
    );
    std::fs::write(agent.dir().join("m.pem"), &pem).unwrap();
    sh(
        agent.dir(),
        "openssl verify -CAfile ca.pem -purpose sslserver m.pem >/dev/null && \
         openssl verify -CAfile ca.pem -purpose sslclient m.pem >/dev/null",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vnfc_identifiers_also_as_uris_when_configured() {
    let mut agent = CmfAgent::new(&format!("vnfc_id_uri = true\n{DOMAINS}"));
    agent.start();
    let mut a = agent.client(Some("vnfm-a")).connect().await.unwrap();
    let r = a
        .post_json(
            REGISTRATIONS_PATH,
            &vnfci(&["vnfc-0001", "vnfc-0001.a.example.net"]),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.problem_detail());
    let csr = openssl_csr(
        agent.dir(),
        "u1",
        "/CN=vnfc-0001",
        &["vnfc-0001.a.example.net"],
    );
    let r = a
        .post_json(
            CSRS,
            &json!({ "vnfcId": "vnfc-0001", "certType": "VNFCI_CERT", "certChainRequest": false, "csr": csr }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.problem_detail());
    let pem = r.json().unwrap()["certificate"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        sans(&pem),
        vec![
            ("URI".to_string(), "urn:etsi:nfv:vnfc:vnfc-0001".to_string()),
            ("DNS".to_string(), "vnfc-0001.a.example.net".to_string()),
        ]
    );
    assert_eq!(subject(&pem), "CN=vnfc-0001");
    std::fs::write(agent.dir().join("u1.pem"), &pem).unwrap();
    sh(
        agent.dir(),
        "openssl verify -CAfile ca.pem u1.pem >/dev/null",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_lists_transfers_and_deletes_registrations() {
    let mut agent = started();
    let mut a = agent.client(Some("vnfm-a")).connect().await.unwrap();
    let r = a
        .post_json(
            REGISTRATIONS_PATH,
            &vnfci(&["vnfc-t1", "web.shared.example.net"]),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.problem_detail());
    let movable = r.json().unwrap()["id"].as_str().unwrap().to_string();
    let r = a
        .post_json(REGISTRATIONS_PATH, &oam(&["host.a.example.net"]))
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.problem_detail());
    let stuck = r.json().unwrap()["id"].as_str().unwrap().to_string();
    drop(a);

    // vnfm-a moves to operator-b: its registrations stay in operator-a, where nobody can
    // read or delete them over the API, and they keep holding their names.
    agent.stop();
    let config = std::fs::read_to_string(&agent.agent.config).unwrap();
    let moved = config.replacen(
        "id = \"vnfm-a\"\ntrust_domain = \"operator-a\"",
        "id = \"vnfm-a\"\ntrust_domain = \"operator-b\"",
        1,
    );
    assert_ne!(moved, config);
    std::fs::write(&agent.agent.config, moved).unwrap();
    agent.start();
    let mut a = agent.client(Some("vnfm-a")).connect().await.unwrap();
    let r = a
        .get(&format!("{REGISTRATIONS_PATH}/{movable}"))
        .await
        .unwrap();
    check(
        "moved consumer reads",
        &r,
        403,
        "belongs to another consumer",
    );
    let r = a
        .request(
            "DELETE",
            &format!("{REGISTRATIONS_PATH}/{stuck}"),
            None,
            Vec::new(),
        )
        .await
        .unwrap();
    check(
        "moved consumer deletes",
        &r,
        403,
        "belongs to another consumer",
    );

    // The operator sees every registration, with the note that its consumer moved.
    let list: Value =
        serde_json::from_str(&agent.warden(&["cmf", "registrations", "--json"])).unwrap();
    let all = list.as_array().unwrap();
    assert_eq!(all.len(), 2, "{list}");
    for r in all {
        assert_eq!(r["consumer"], "vnfm-a");
        assert_eq!(r["trustDomain"], "operator-a");
        assert_eq!(r["configuredTrustDomain"], "operator-b");
    }
    let table = agent.warden(&["cmf", "registrations", "--consumer", "vnfm-a"]);
    assert!(
        table.contains("consumer moved to trust domain operator-b"),
        "{table}"
    );
    let none = agent.warden(&["cmf", "registrations", "--consumer", "vnfm-c", "--json"]);
    assert_eq!(serde_json::from_str::<Value>(&none).unwrap(), json!([]));

    // Transfer: permitted by operator-b's policy (any VNFC id, shared.example.net) but not
    // its CA list (ca-a issued it): refused, naming the rule; nothing changed.
    let refused = agent.agent.fails(&[
        "cmf",
        "registrations",
        "transfer",
        &movable,
        "--to",
        "vnfm-a",
    ]);
    assert!(
        refused.contains("CA 'ca-a' of the registration is not a CA of trust domain 'operator-b'"),
        "{refused}"
    );
    let refused =
        agent
            .agent
            .fails(&["cmf", "registrations", "transfer", &stuck, "--to", "vnfm-x"]);
    assert!(
        refused.contains("'vnfm-x' is not a configured consumer"),
        "{refused}"
    );
    // To vnfm-b of operator-a: its narrowing (b1.a.example.net) refuses the names.
    let refused =
        agent
            .agent
            .fails(&["cmf", "registrations", "transfer", &stuck, "--to", "vnfm-b"]);
    assert!(
        refused
            .contains("'host.a.example.net' is outside the DNS suffixes of cmf.consumer 'vnfm-b'"),
        "{refused}"
    );

    // Delete by the operator: the one deregistration path, audited with the operator as actor;
    // its names are free again.
    let out = agent.warden(&["cmf", "registrations", "delete", &stuck]);
    assert!(
        out.contains(&format!("registration {stuck} of vnfm-a deleted")),
        "{out}"
    );
    let audit = agent.warden(&["audit", "list", "--limit", "5", "--json"]);
    assert!(audit.contains("cmf.deregister"), "{audit}");
    assert!(audit.contains("\"operator\""), "{audit}");
    assert!(audit.contains("cli:uid="), "{audit}");
    let mut b = agent.client(Some("vnfm-b")).connect().await.unwrap();
    let r = b
        .get(&format!("{REGISTRATIONS_PATH}/{stuck}"))
        .await
        .unwrap();
    assert_eq!(r.status, 404);
    // vnfm-a (now operator-b) may not take host.a.example.net; the name is free for the
    // domain that permits it: a consumer of operator-a registers it.
    let mut a2 = agent.client(Some("vnfm-a")).connect().await.unwrap();
    let r = a2
        .post_json(REGISTRATIONS_PATH, &oam(&["host.a.example.net"]))
        .await
        .unwrap();
    check("moved consumer, old domain's name", &r, 422, "operator-b");

    // Transfer to a consumer whose domain permits everything about it: vnfm-c of
    // operator-b, after its CA list names ca-a too. The registration becomes vnfm-c's.
    agent.stop();
    let config = std::fs::read_to_string(&agent.agent.config).unwrap();
    let widened = config.replacen("cas = [\"ca-b\"]", "cas = [\"ca-b\", \"ca-a\"]", 1);
    std::fs::write(&agent.agent.config, widened).unwrap();
    agent.start();
    let out = agent.warden(&[
        "cmf",
        "registrations",
        "transfer",
        &movable,
        "--to",
        "vnfm-c",
    ]);
    assert!(
        out.contains(&format!(
            "registration {movable} now managed by vnfm-c (trust domain operator-b)"
        )),
        "{out}"
    );
    let audit = agent.warden(&["audit", "list", "--limit", "3", "--json"]);
    assert!(audit.contains("cmf.registration.transfer"), "{audit}");
    let mut c = agent.client(Some("vnfm-c")).connect().await.unwrap();
    let r = c
        .get(&format!("{REGISTRATIONS_PATH}/{movable}"))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.problem_detail());
    assert_eq!(r.json().unwrap()["consumer"], "vnfm-c");
    let csr = openssl_csr(
        agent.dir(),
        "t1",
        "/CN=vnfc-t1",
        &["web.shared.example.net"],
    );
    let r = c
        .post_json(
            CSRS,
            &json!({ "vnfcId": "vnfc-t1", "certType": "VNFCI_CERT", "certChainRequest": false, "csr": csr }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.problem_detail());
    let mut a3 = agent.client(Some("vnfm-a")).connect().await.unwrap();
    let r = a3
        .post_json(
            CSRS,
            &json!({ "vnfcId": "vnfc-t1", "certType": "VNFCI_CERT", "certChainRequest": false, "csr": csr }),
        )
        .await
        .unwrap();
    check("old manager", &r, 403, "managed by another consumer");

    // Without a running agent the same commands work on the store directly.
    agent.stop();
    let list: Value =
        serde_json::from_str(&agent.warden(&["cmf", "registrations", "--json"])).unwrap();
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    let out = agent.warden(&["cmf", "registrations", "delete", &movable]);
    assert!(out.contains("its names are free"), "{out}");
    let gone = agent
        .agent
        .fails(&["cmf", "registrations", "delete", &movable]);
    assert!(gone.contains("does not exist"), "{gone}");
}

/// A registration as a store written before one namespace held it.
fn old_registration(
    id: &str,
    consumer: &str,
    domain: &str,
    cert_type: CertType,
    subjects: &[&str],
    created: &str,
) -> Registration {
    Registration {
        id: id.into(),
        consumer: consumer.into(),
        trust_domain: domain.into(),
        cert_type,
        subject_ids: subjects.iter().map(|s| s.to_string()).collect(),
        type_of_vnfc_cert_handling: Some(VnfcCertHandling::DelegationMode),
        key_attestation: None,
        ca_id: if domain == "operator-a" {
            "ca-a".into()
        } else {
            "ca-b".into()
        },
        created: created.into(),
        vnf_instance_id: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_subject_index_is_upgraded_without_two_managers_for_one_name() {
    let mut agent = CmfAgent::new(DOMAINS);
    // The index as the code before issue 10 wrote it: keys {certType}/{subject}, where
    // vnfm-a (VNFCI_CERT, older) and vnfm-c (VNF_OAM_CERT, newer) both held one name.
    {
        let store = nfv_warden::store::Store::open(&agent.store_path()).unwrap();
        store
            .write(|tx| {
                let older = old_registration(
                    "0a",
                    "vnfm-a",
                    "operator-a",
                    CertType::VnfciCert,
                    &["vnfc-m1", "dup.shared.example.net"],
                    "2026-01-01T00:00:00Z",
                );
                let newer = old_registration(
                    "0c",
                    "vnfm-c",
                    "operator-b",
                    CertType::VnfOamCert,
                    &["dup.shared.example.net", "solo.b.example.net"],
                    "2026-02-01T00:00:00Z",
                );
                tx.put(&REGISTRATIONS, "0a", &older)?;
                tx.put(&REGISTRATIONS, "0c", &newer)?;
                tx.put(&SUBJECTS, "VNFCI_CERT/vnfc-m1", &"0a".to_string())?;
                tx.put(
                    &SUBJECTS,
                    "VNFCI_CERT/dup.shared.example.net",
                    &"0a".to_string(),
                )?;
                tx.put(
                    &SUBJECTS,
                    "VNF_OAM_CERT/dup.shared.example.net",
                    &"0c".to_string(),
                )?;
                tx.put(
                    &SUBJECTS,
                    "VNF_OAM_CERT/solo.b.example.net",
                    &"0c".to_string(),
                )?;
                Ok(())
            })
            .unwrap();
    }
    agent.start();
    // Served: the upgrade ran before the CMF answered anything.
    let mut c = agent.client(Some("vnfm-c")).connect().await.unwrap();
    let r = c.get(REGISTRATIONS_PATH).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.problem_detail());
    drop(c);

    // One key per name; the older registration kept the contested name.
    agent.stop();
    {
        let store = nfv_warden::store::Store::open(&agent.store_path()).unwrap();
        let index = store.read(|tx| tx.list(&SUBJECTS, "")).unwrap();
        assert_eq!(
            index,
            vec![
                ("dns:dup.shared.example.net".to_string(), "0a".to_string()),
                ("dns:solo.b.example.net".to_string(), "0c".to_string()),
                ("vnfc:vnfc-m1".to_string(), "0a".to_string()),
            ]
        );
    }
    agent.start();
    let audit = agent.warden(&["audit", "list", "--limit", "10", "--json"]);
    assert!(audit.contains("cmf.names.conflict"), "{audit}");
    assert_eq!(audit.matches("\"cmf.names.migrate\"").count(), 1, "{audit}");

    // The loser cannot use the name, with any certType; the operator sees why.
    let mut c = agent.client(Some("vnfm-c")).connect().await.unwrap();
    let dup = openssl_csr(agent.dir(), "dup", "/CN=dup.shared.example.net", &[]);
    let r = c
        .post_json(
            CSRS,
            &json!({ "certType": "VNF_OAM_CERT", "certChainRequest": false, "csr": dup }),
        )
        .await
        .unwrap();
    check("blocked name", &r, 403, "managed by another consumer");
    let both = openssl_csr(
        agent.dir(),
        "both",
        "/CN=solo.b.example.net",
        &["dup.shared.example.net"],
    );
    let r = c
        .post_json(
            CSRS,
            &json!({ "certType": "VNF_OAM_CERT", "certChainRequest": false, "csr": both }),
        )
        .await
        .unwrap();
    check(
        "blocked name beside a held one",
        &r,
        422,
        "'dup.shared.example.net' is not among the subjects registered",
    );
    let solo = openssl_csr(agent.dir(), "solo", "/CN=solo.b.example.net", &[]);
    let r = c
        .post_json(
            CSRS,
            &json!({ "certType": "VNF_OAM_CERT", "certChainRequest": false, "csr": solo }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.problem_detail());
    let list: Value =
        serde_json::from_str(&agent.warden(&["cmf", "registrations", "--json"])).unwrap();
    let loser = list
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == "0c")
        .cloned()
        .unwrap();
    assert_eq!(
        loser["blocked"],
        json!([{ "subject": "dup.shared.example.net", "heldBy": "0a" }])
    );
    // The winner uses it; deleting the loser leaves the winner's index entry alone.
    let mut a = agent.client(Some("vnfm-a")).connect().await.unwrap();
    let csr = openssl_csr(
        agent.dir(),
        "m1",
        "/CN=vnfc-m1",
        &["dup.shared.example.net"],
    );
    let r = a
        .post_json(CSRS, &json!({ "vnfcId": "vnfc-m1", "certType": "VNFCI_CERT", "certChainRequest": false, "csr": csr }))
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.problem_detail());
    let r = c
        .request(
            "DELETE",
            &format!("{REGISTRATIONS_PATH}/0c"),
            None,
            Vec::new(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 204, "{}", r.problem_detail());
    let r = a
        .post_json(CSRS, &json!({ "vnfcId": "vnfc-m1", "certType": "VNFCI_CERT", "certChainRequest": false, "csr": csr }))
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.problem_detail());
    // A name freed by the deletion is registrable again; the contested one stays vnfm-a's.
    let r = c
        .post_json(REGISTRATIONS_PATH, &oam(&["solo.b.example.net"]))
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.problem_detail());
    let r = c
        .post_json(REGISTRATIONS_PATH, &oam(&["dup.shared.example.net"]))
        .await
        .unwrap();
    check("still held", &r, 409, "another trust domain");
}
