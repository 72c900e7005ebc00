//! EST (RFC 7030) end to end, with curl and openssl exactly as an EST client uses them:
//! cacerts, simpleenroll (vnfcId from the subject CN or from the path label),
//! simplereenroll, and the refusals with their statuses. Registrations go through the REST
//! API first; the CA key is in a real SoftHSM token.

mod common;

use std::path::Path;
use std::process::Command;

use common::cmf::{sh, CmfAgent};
use serde_json::json;

const REGISTRATIONS: &str = "/certmgmt/v1/registrations";

/// An HTTP exchange made by curl: status, response headers (lower-cased names), body.
struct Exchange {
    status: u16,
    headers: String,
    body: String,
}

impl Exchange {
    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then(|| value.trim().to_string())
        })
    }
}

/// `curl` against the agent, from `agent.dir()`; `args` are curl's (client cert, headers,
/// body), `path` the request path.
fn curl(agent: &CmfAgent, args: &[&str], path: &str) -> Exchange {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--cacert",
            "ca.pem",
            "-D",
            "headers.txt",
            "-o",
            "body.txt",
            "-w",
            "%{http_code}",
        ])
        .args(args)
        .arg(format!("{}{path}", agent.base()))
        .current_dir(agent.dir())
        .output()
        .expect("curl runs");
    assert!(
        out.status.success(),
        "curl {args:?} {path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Exchange {
        status: String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("status"),
        headers: std::fs::read_to_string(agent.dir().join("headers.txt")).unwrap_or_default(),
        body: std::fs::read_to_string(agent.dir().join("body.txt")).unwrap_or_default(),
    }
}

/// A client cert for curl.
fn as_consumer(id: &str) -> [String; 4] {
    [
        "--cert".into(),
        format!("{id}.pem"),
        "--key".into(),
        format!("{id}.key"),
    ]
}

/// POST a base64 file with a content type, as `consumer`.
fn post(
    agent: &CmfAgent,
    consumer: Option<&str>,
    content_type: &str,
    file: &str,
    path: &str,
) -> Exchange {
    let mut args: Vec<String> = consumer
        .map(|c| as_consumer(c).to_vec())
        .unwrap_or_default();
    args.extend([
        "-H".into(),
        format!("Content-Type: {content_type}"),
        "--data-binary".into(),
        format!("@{file}"),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    curl(agent, &args, path)
}

/// An EC P-256 key and CSR by openssl, DER, base64 in `{name}.b64` (with line breaks, as
/// `base64` writes it).
fn csr_b64(dir: &Path, name: &str, subject: &str, san: Option<&str>) -> String {
    let san = san
        .map(|s| format!(" -addext subjectAltName=DNS:{s}"))
        .unwrap_or_default();
    sh(
        dir,
        &format!(
            "openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
             -keyout {name}.key -subj '{subject}'{san} -outform DER 2>/dev/null | base64 >{name}.b64"
        ),
    );
    format!("{name}.b64")
}

/// Decode a base64 certs-only PKCS#7 body with openssl into PEM certificates in `out`.
fn print_certs(dir: &Path, body: &str, out: &str) -> usize {
    std::fs::write(dir.join("p7.b64"), body).unwrap();
    sh(
        dir,
        &format!("base64 -d p7.b64 | openssl pkcs7 -inform DER -print_certs -out {out}"),
    );
    std::fs::read_to_string(dir.join(out))
        .unwrap()
        .matches("-----BEGIN CERTIFICATE-----")
        .count()
}

fn openssl_verify(dir: &Path, chain: &str, leaf: &str) {
    let verify = Command::new("openssl")
        .args(["verify", "-x509_strict", "-CAfile", chain, leaf])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
}

fn subject_of(dir: &Path, pem: &str) -> String {
    let out = Command::new("openssl")
        .args([
            "x509",
            "-noout",
            "-subject",
            "-ext",
            "subjectAltName",
            "-in",
            pem,
        ])
        .current_dir(dir)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn register(agent: &CmfAgent, consumer: &str, subjects: &[&str]) {
    let mut vnfm = agent
        .client(Some(consumer))
        .connect()
        .await
        .expect("connect");
    let created = vnfm
        .post_json(
            REGISTRATIONS,
            &json!({
                "certType": "VNFCI_CERT",
                "subjectIds": subjects,
                "typeOfVnfcCertHandling": "DELEGATION_MODE",
            }),
        )
        .await
        .unwrap();
    assert_eq!(created.status, 201, "{}", created.problem_detail());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cacerts_without_client_certificate_is_the_chain_as_pkcs7() {
    let mut agent = CmfAgent::new("");
    agent.start();
    for path in [
        "/.well-known/est/cacerts",
        "/.well-known/est/vnfc-1/cacerts",
    ] {
        let got = curl(&agent, &[], path);
        assert_eq!(got.status, 200, "{path}: {}", got.body);
        assert_eq!(
            got.header("content-type").as_deref(),
            Some("application/pkcs7-mime; smime-type=certs-only")
        );
        assert_eq!(
            got.header("content-transfer-encoding").as_deref(),
            Some("base64")
        );
        assert_eq!(print_certs(agent.dir(), &got.body, "cacerts.pem"), 1);
        // The same certificate as the CA's own.
        sh(
            agent.dir(),
            "test \"$(openssl x509 -in cacerts.pem -outform DER | sha256sum)\" = \
                  \"$(openssl x509 -in ca.pem -outform DER | sha256sum)\"",
        );
    }
    // Not a POST resource.
    let wrong = curl(&agent, &["-X", "POST"], "/.well-known/est/cacerts");
    assert_eq!(wrong.status, 405, "{}", wrong.body);
    agent.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simpleenroll_by_cn_and_by_label_then_simplereenroll() {
    let mut agent = CmfAgent::new("");
    agent.start();
    let dir = agent.dir().to_path_buf();
    register(&agent, "vnfm-a", &["vnfc-1", "vnfc-1.vnf.example"]).await;
    register(&agent, "vnfm-a", &["vnfc-2", "vnfc-2.vnf.example"]).await;
    let cacerts = curl(&agent, &[], "/.well-known/est/cacerts");
    print_certs(&dir, &cacerts.body, "chain.pem");

    // vnfcId from the subject CN.
    let file = csr_b64(&dir, "vnfc1", "/CN=vnfc-1", Some("vnfc-1.vnf.example"));
    let got = post(
        &agent,
        Some("vnfm-a"),
        "application/pkcs10",
        &file,
        "/.well-known/est/simpleenroll",
    );
    assert_eq!(got.status, 200, "{}", got.body);
    assert_eq!(
        got.header("content-type").as_deref(),
        Some("application/pkcs7-mime; smime-type=certs-only")
    );
    assert_eq!(
        print_certs(&dir, &got.body, "vnfc1.pem"),
        1,
        "only the issued certificate"
    );
    openssl_verify(&dir, "chain.pem", "vnfc1.pem");
    let names = subject_of(&dir, "vnfc1.pem");
    assert!(
        names.contains("CN=vnfc-1") || names.contains("CN = vnfc-1"),
        "{names}"
    );
    assert!(names.contains("DNS:vnfc-1.vnf.example"), "{names}");
    // The issued key is the CSR's.
    sh(
        &dir,
        "test \"$(openssl x509 -in vnfc1.pem -noout -pubkey)\" = \"$(openssl pkey -in vnfc1.key -pubout)\"",
    );

    // vnfcId from the path label; the CN is another registered name of that VNFC.
    let file = csr_b64(&dir, "vnfc2", "/CN=vnfc-2.vnf.example", None);
    let got = post(
        &agent,
        Some("vnfm-a"),
        "application/pkcs10",
        &file,
        "/.well-known/est/vnfc-2/simpleenroll",
    );
    assert_eq!(got.status, 200, "{}", got.body);
    print_certs(&dir, &got.body, "vnfc2.pem");
    openssl_verify(&dir, "chain.pem", "vnfc2.pem");
    // simplereenroll: a new key, the same subject as the certificate held.
    let file = csr_b64(
        &dir,
        "vnfc1-renew",
        "/CN=vnfc-1",
        Some("vnfc-1.vnf.example"),
    );
    let got = post(
        &agent,
        Some("vnfm-a"),
        "application/pkcs10",
        &file,
        "/.well-known/est/simplereenroll",
    );
    assert_eq!(got.status, 200, "{}", got.body);
    print_certs(&dir, &got.body, "vnfc1-renew.pem");
    openssl_verify(&dir, "chain.pem", "vnfc1-renew.pem");
    sh(
        &dir,
        "test \"$(openssl x509 -in vnfc1-renew.pem -noout -serial)\" != \"$(openssl x509 -in vnfc1.pem -noout -serial)\" && \
         test \"$(openssl x509 -in vnfc1-renew.pem -noout -pubkey)\" = \"$(openssl pkey -in vnfc1-renew.key -pubout)\"",
    );
    // The labelled form renews too.
    let file = csr_b64(&dir, "vnfc2-renew", "/CN=vnfc-2.vnf.example", None);
    let got = post(
        &agent,
        Some("vnfm-a"),
        "application/pkcs10",
        &file,
        "/.well-known/est/vnfc-2/simplereenroll",
    );
    assert_eq!(got.status, 200, "{}", got.body);

    // A subject that was registered but never issued cannot be "renewed" (RFC 7030 4.2.2).
    let file = csr_b64(&dir, "vnfc1-other", "/CN=vnfc-1", None);
    let got = post(
        &agent,
        Some("vnfm-a"),
        "application/pkcs10",
        &file,
        "/.well-known/est/simplereenroll",
    );
    assert_eq!(got.status, 422, "{}", got.body);
    assert!(got.body.contains("4.2.2"), "{}", got.body);
    // Nor can another consumer renew vnfm-a's certificate.
    let file = csr_b64(
        &dir,
        "vnfc1-theft",
        "/CN=vnfc-1",
        Some("vnfc-1.vnf.example"),
    );
    let got = post(
        &agent,
        Some("vnfm-b"),
        "application/pkcs10",
        &file,
        "/.well-known/est/simplereenroll",
    );
    assert_eq!(got.status, 403, "{}", got.body);

    agent.stop();
    let store = nfv_warden::store::Store::open(&agent.store_path()).expect("store");
    let issued = store
        .read(|tx| tx.list(&nfv_warden::cmf::CERTIFICATES, ""))
        .expect("records");
    // Not counting the CA root and TLS certificate `ca init` / `tls init` recorded.
    let issued: Vec<_> = issued
        .into_iter()
        .filter(|(_, r)| r.consumer != nfv_warden::cmf::records::AGENT_CONSUMER)
        .collect();
    assert_eq!(issued.len(), 4, "two enrollments, two renewals");
    assert!(issued.iter().all(|(_, r)| r.consumer == "vnfm-a"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_have_the_rest_statuses() {
    let mut agent = CmfAgent::new("");
    agent.start();
    let dir = agent.dir().to_path_buf();
    register(&agent, "vnfm-a", &["vnfc-1"]).await;
    let enroll = "/.well-known/est/simpleenroll";
    let file = csr_b64(&dir, "vnfc1", "/CN=vnfc-1", None);

    // No client certificate.
    let got = post(&agent, None, "application/pkcs10", &file, enroll);
    assert_eq!(got.status, 401, "{}", got.body);
    // A client the CMF does not know.
    let got = post(&agent, Some("vnfm-x"), "application/pkcs10", &file, enroll);
    assert_eq!(got.status, 403, "{}", got.body);
    // Another consumer's vnfcId, by CN and by label (vnfm-c is in another trust domain).
    let got = post(&agent, Some("vnfm-c"), "application/pkcs10", &file, enroll);
    assert_eq!(got.status, 403, "{}", got.body);
    let got = post(
        &agent,
        Some("vnfm-b"),
        "application/pkcs10",
        &file,
        "/.well-known/est/vnfc-1/simpleenroll",
    );
    assert_eq!(got.status, 403, "{}", got.body);
    // Wrong content type.
    let got = post(&agent, Some("vnfm-a"), "application/json", &file, enroll);
    assert_eq!(got.status, 415, "{}", got.body);
    // Garbage: not base64, and base64 of something that is not a CSR.
    std::fs::write(dir.join("garbage.b64"), "this is not base64 !!!").unwrap();
    let got = post(
        &agent,
        Some("vnfm-a"),
        "application/pkcs10",
        "garbage.b64",
        enroll,
    );
    assert_eq!(got.status, 400, "{}", got.body);
    std::fs::write(dir.join("garbage.b64"), "MAMCAQA=\n").unwrap();
    let got = post(
        &agent,
        Some("vnfm-a"),
        "application/pkcs10",
        "garbage.b64",
        enroll,
    );
    assert_eq!(got.status, 400, "{}", got.body);
    // Too large: a body within the request limit whose DER exceeds the CSR limit, and a body
    // over the request limit (refused on its Content-Length before it is read; over HTTP/1.1
    // so that curl reads the early answer instead of failing on the reset HTTP/2 stream).
    std::fs::write(dir.join("large.b64"), "A".repeat(56_000)).unwrap();
    let got = post(
        &agent,
        Some("vnfm-a"),
        "application/pkcs10",
        "large.b64",
        enroll,
    );
    assert_eq!(got.status, 413, "{}", got.body);
    std::fs::write(dir.join("huge.b64"), "A".repeat(2 * 1024 * 1024)).unwrap();
    let got = curl(
        &agent,
        &[
            "--http1.1",
            "--cert",
            "vnfm-a.pem",
            "--key",
            "vnfm-a.key",
            "-H",
            "Content-Type: application/pkcs10",
            "--data-binary",
            "@huge.b64",
        ],
        enroll,
    );
    assert_eq!(got.status, 413, "{}", got.body);
    // An unregistered subject.
    let other = csr_b64(&dir, "vnfc9", "/CN=vnfc-9", None);
    let got = post(&agent, Some("vnfm-a"), "application/pkcs10", &other, enroll);
    assert_eq!(got.status, 422, "{}", got.body);
    // A registered vnfcId with a name outside its registration.
    let extra = csr_b64(&dir, "vnfc1-extra", "/CN=vnfc-1", Some("elsewhere.example"));
    let got = post(&agent, Some("vnfm-a"), "application/pkcs10", &extra, enroll);
    assert_eq!(got.status, 422, "{}", got.body);
    // A re-enrollment before any enrollment.
    let got = post(
        &agent,
        Some("vnfm-a"),
        "application/pkcs10",
        &file,
        "/.well-known/est/simplereenroll",
    );
    assert_eq!(got.status, 422, "{}", got.body);
    // Enrollment is POST only.
    let got = curl(
        &agent,
        &as_consumer("vnfm-a").each_ref().map(String::as_str),
        enroll,
    );
    assert_eq!(got.status, 405, "{}", got.body);

    // Nothing was issued; then the valid request goes through.
    let got = post(&agent, Some("vnfm-a"), "application/pkcs10", &file, enroll);
    assert_eq!(got.status, 200, "{}", got.body);
    agent.stop();
}
