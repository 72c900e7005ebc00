//! Operating a running agent (issue 8 section 6): while `warden serve` holds the store and
//! the devices, `warden check`, `certs`, `audit` and `keys` go through its admin socket and
//! the agent does the work. Real `warden serve`, real SoftHSM, certificates issued over the
//! CMF's HTTPS API with mutual TLS.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::Command;

use common::agent::Agent;
use common::cmf::{openssl_csr, CmfAgent};
use common::swtpm::Swtpm;
use serde_json::{json, Value};

const REGISTRATIONS: &str = "/certmgmt/v1/registrations";
const CSRS: &str = "/certmgmt/v1/certificate_signing_requests";

/// Register VNFC `vnfc` (and its DNS name `{vnfc}.vnf.example`) for `consumer` and have a
/// certificate issued for it over HTTPS; returns the serial and the certificate PEM the VNFM
/// received.
async fn issue(agent: &CmfAgent, consumer: &str, vnfc: &str) -> (String, String) {
    let dns = format!("{vnfc}.vnf.example");
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
                "subjectIds": [dns, vnfc],
                "typeOfVnfcCertHandling": "DELEGATION_MODE",
            }),
        )
        .await
        .expect("register");
    assert_eq!(created.status, 201, "{}", created.problem_detail());
    let csr = openssl_csr(agent.dir(), vnfc, &format!("/CN={vnfc}"), &[&dns]);
    let response = vnfm
        .post_json(
            CSRS,
            &json!({
                "vnfcId": vnfc,
                "certType": "VNFCI_CERT",
                "certChainRequest": false,
                "csr": csr,
            }),
        )
        .await
        .expect("csr");
    assert_eq!(response.status, 201, "{}", response.problem_detail());
    let issued = response.json().expect("JSON");
    (
        issued["serialNumber"].as_str().expect("serial").to_string(),
        issued["certificate"].as_str().expect("PEM").to_string(),
    )
}

fn audit_entries(agent: &CmfAgent) -> u64 {
    let report: Value =
        serde_json::from_str(&agent.warden(&["audit", "verify", "--json"])).expect("JSON");
    report["entries"].as_u64().expect("entries")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_work_while_the_agent_serves() {
    let mut agent = CmfAgent::new("");
    agent.start();

    // The agent holds the store: a second process cannot open it (the premise).
    assert!(
        nfv_warden::store::Store::open(&agent.store_path()).is_err(),
        "the store should be locked by the running agent"
    );
    let socket = agent.dir().join("warden.sock");
    let mode = std::fs::metadata(&socket)
        .expect("admin socket, served without [sm]")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "admin socket mode {mode:o}");

    // check: run by the agent with its own store and token.
    let check = agent.warden(&["check"]);
    assert!(
        check.starts_with("checked by the running agent (pid "),
        "{check}"
    );
    assert!(!check.contains("FAIL"), "{check}");
    assert!(check.contains("audit chain of"), "{check}");
    assert!(
        check.contains("CA key pkcs11:token=warden;object=warden-ca (ec-p256) signs"),
        "{check}"
    );
    assert!(check.contains("CMF: CA default"), "{check}");

    // Two certificates, by two consumers; the audit chain grows with each.
    let before = audit_entries(&agent);
    let (serial_a, pem_a) = issue(&agent, "vnfm-a", "vnfc-a").await;
    let after_one = audit_entries(&agent);
    assert!(after_one > before, "{before} -> {after_one}");
    let (serial_b, _) = issue(&agent, "vnfm-b", "vnfc-b").await;
    let verify = agent.warden(&["audit", "verify"]);
    assert!(
        verify.starts_with("audit chain verified by the running agent: "),
        "{verify}"
    );
    assert!(audit_entries(&agent) > after_one);

    // certs list: both, with consumer and SANs from the certificate.
    let list = agent.warden(&["certs", "list"]);
    let line = |serial: &str| {
        list.lines()
            .find(|l| l.starts_with(serial))
            .unwrap_or_else(|| panic!("{serial} not listed: {list}"))
            .to_string()
    };
    let a = line(&serial_a);
    assert!(
        a.contains("\tvnfm-a\t") && a.contains("DNS:vnfc-a.vnf.example"),
        "{a}"
    );
    assert!(a.contains("\tno\t"), "not revoked: {a}");
    let b = line(&serial_b);
    assert!(
        b.contains("\tvnfm-b\t") && b.contains("DNS:vnfc-b.vnf.example"),
        "{b}"
    );

    // A consumer filter, and pages of one.
    let only_b: Value =
        serde_json::from_str(&agent.warden(&["certs", "list", "--consumer", "vnfm-b", "--json"]))
            .expect("JSON");
    let certificates = only_b["certificates"].as_array().expect("array");
    assert_eq!(certificates.len(), 1, "{only_b}");
    assert_eq!(certificates[0]["serialNumber"], serial_b.as_str());
    assert_eq!(
        certificates[0]["subjectAltNames"],
        json!(["DNS:vnfc-b.vnf.example"])
    );
    // Pages of one, to the end: the two consumers' certificates and the two the agent made
    // for itself (`ca init`, `tls init`: recorded like the others, issue 10 §4).
    let mut paged = Vec::new();
    let mut agent_types = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut args = vec!["certs", "list", "--limit", "1", "--json"];
        if let Some(after) = &after {
            args.extend(["--after", after.as_str()]);
        }
        let page: Value = serde_json::from_str(&agent.warden(&args)).expect("JSON");
        assert_eq!(
            page["certificates"].as_array().map(Vec::len),
            Some(1),
            "{page}"
        );
        let certificate = &page["certificates"][0];
        if certificate["consumer"] == "agent:self" {
            agent_types.push(certificate["certType"].as_str().unwrap().to_string());
        } else {
            paged.push(certificate["serialNumber"].as_str().unwrap().to_string());
        }
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_string()),
            None => break,
        }
        assert!(
            paged.len() + agent_types.len() < 4,
            "more pages than certificates"
        );
    }
    agent_types.sort();
    assert_eq!(agent_types, ["AGENT_CA", "AGENT_TLS"]);
    paged.sort();
    let mut expected = vec![serial_a.clone(), serial_b.clone()];
    expected.sort();
    assert_eq!(paged, expected);

    // certs show: every field the operator asks for.
    let show = agent.warden(&["certs", "show", &serial_a]);
    for expected in [
        format!("serial: {serial_a}"),
        "subject: CN=vnfc-a".to_string(),
        "subject alt names: DNS:vnfc-a.vnf.example".to_string(),
        "consumer: vnfm-a".to_string(),
        "attested: not-requested".to_string(),
        "revoked: no".to_string(),
    ] {
        assert!(show.contains(&expected), "{expected} missing: {show}");
    }
    assert!(
        show.contains("registration: ") && show.contains("not after: "),
        "{show}"
    );
    // Colons and upper case, as openssl prints serials.
    let openssl_style = serial_a
        .to_uppercase()
        .as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(":");
    assert!(agent
        .warden(&["certs", "show", &openssl_style])
        .contains(&format!("serial: {serial_a}")));
    let err = agent.agent.fails(&["certs", "show", "abcdef"]);
    assert!(err.contains("no certificate with serial abcdef"), "{err}");

    // certs export: the same certificate the VNFM got; with the chain, openssl verifies it.
    let exported = agent.warden(&["certs", "export", &serial_a]);
    assert_eq!(exported.trim(), pem_a.trim());
    let chain = agent.warden(&["certs", "export", &serial_a, "--chain"]);
    assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 2, "{chain}");
    std::fs::write(agent.dir().join("exported.pem"), &exported).expect("write");
    let verify = Command::new("openssl")
        .args(["verify", "-CAfile", "ca.pem", "exported.pem"])
        .current_dir(agent.dir())
        .output()
        .expect("openssl");
    assert!(
        verify.status.success(),
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );

    // Keys while serving: the agent generates, records, shows, signs and erases.
    let generated = agent.warden(&[
        "keys",
        "generate",
        "--backend",
        "pkcs11",
        "--label",
        "vnf-x-key",
        "--purpose",
        "vnf",
        "--vnf-instance",
        "vnf-x",
    ]);
    let reference = generated
        .split_whitespace()
        .next()
        .expect("reference")
        .to_string();
    let keys = agent.warden(&["keys", "list"]);
    let key_line = keys
        .lines()
        .find(|l| l.starts_with(&reference))
        .unwrap_or_else(|| panic!("{reference} not listed: {keys}"));
    assert!(key_line.ends_with("\tvnf\tvnf-x"), "{key_line}");
    let show = agent.warden(&["keys", "show", &reference]);
    assert!(show.contains("BEGIN PUBLIC KEY"), "{show}");
    assert!(agent
        .warden(&["keys", "sign-test", &reference, "--count", "3"])
        .starts_with("ok "),);
    // The caller's uid is the actor in the audit chain.
    let entries: Value =
        serde_json::from_str(&agent.warden(&["audit", "list", "--limit", "5", "--json"]))
            .expect("JSON");
    let generate = entries
        .as_array()
        .expect("array")
        .iter()
        .find(|e| e["action"] == "key.generate" && e["subject"] == reference.as_str())
        .unwrap_or_else(|| panic!("no key.generate entry: {entries}"));
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(generate["actor"], format!("cli:uid={uid}").as_str());
    let erased: Value = serde_json::from_str(&agent.warden(&[
        "keys",
        "destroy",
        &reference,
        "--vnf-instance",
        "vnf-x",
    ]))
    .expect("erasure JSON");
    assert_eq!(erased["verified"], true);
    assert!(!agent.warden(&["keys", "list"]).contains(&reference));
    let err = agent.agent.fails(&["keys", "show", &reference]);
    assert!(err.contains("not found"), "{err}");

    // Stopped: the same commands work on the store and token directly, with the same data.
    let count = audit_entries(&agent);
    agent.stop();
    assert!(!socket.exists(), "the socket goes with the agent");
    let check = agent.warden(&["check"]);
    assert!(!check.contains("running agent"), "{check}");
    assert!(
        check.contains(&format!("audit chain of {count} entries verified")),
        "{check}"
    );
    let list = agent.warden(&["certs", "list"]);
    assert!(
        list.contains(&serial_a) && list.contains(&serial_b),
        "{list}"
    );
    assert_eq!(
        agent.warden(&["certs", "export", &serial_a]).trim(),
        pem_a.trim()
    );
    assert_eq!(audit_entries(&agent), count);

    // A crash leaves the socket file with nobody listening: the commands work directly, and
    // the next agent replaces the socket.
    agent.start();
    agent.kill9();
    assert!(socket.exists(), "SIGKILL leaves the socket behind");
    let check = agent.warden(&["check"]);
    assert!(
        !check.contains("running agent") && !check.contains("FAIL"),
        "{check}"
    );
    agent.start();
    assert!(agent
        .warden(&["check"])
        .starts_with("checked by the running agent"));
}

/// The socket is 0600, and a caller of another uid is refused even if the mode is widened.
#[test]
fn admin_socket_refuses_other_users() {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to run a client as another uid");
        return;
    }
    let public = tempfile::tempdir().expect("dir");
    std::fs::set_permissions(public.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = public.path().join("admin.sock");
    // No [cmf], no [sm]: the admin socket is still served.
    let agent = Agent::new(&format!("\n[admin]\nsocket = \"{}\"\n", socket.display()));
    agent.ok(&["ca", "init", "--subject", "CN=ops test CA"]);
    agent.ok(&["tls", "init", "--san", "localhost"]);
    let (child, _) = agent.serve();
    let _serving = Stop(child);
    let nobody = |path: &str| {
        Command::new("curl")
            .args(["-sS", "--unix-socket"])
            .arg(&socket)
            .arg(format!("http://localhost{path}"))
            .uid(65534)
            .gid(65534)
            .output()
            .expect("curl")
    };
    let mode = std::fs::metadata(&socket)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let out = nobody("/ops/v1/audit/verify");
    // curl says "Couldn't connect" for the EACCES of connect(2).
    assert!(
        !out.status.success() && out.stdout.is_empty(),
        "mode 0600 keeps uid 65534 out: {out:?}"
    );
    // Widened by mistake: SO_PEERCRED still refuses.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = nobody("/ops/v1/audit/verify");
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        body.contains("\"status\":403") && body.contains("uid 65534 may not use"),
        "{out:?}"
    );
    // The agent's own user (root here) is served, and a config without [sm] says so.
    let verify = agent.ok(&["audit", "verify"]);
    assert!(
        verify.starts_with("audit chain verified by the running agent"),
        "{verify}"
    );
    let out = Command::new("curl")
        .args(["-sS", "--unix-socket"])
        .arg(&socket)
        .arg("http://localhost/sm/v1/status")
        .output()
        .expect("curl");
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        body.contains("\"status\":404") && body.contains("runs no Security Manager"),
        "{out:?}"
    );
}

/// Stops the agent however the test ends.
struct Stop(std::process::Child);

impl Drop for Stop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A TPM over swtpm's TCP interface serves one connection at a time: while the agent holds
/// it, the TPM key commands and `check` are done by the agent.
#[test]
fn tpm_keys_and_check_while_the_agent_holds_the_tpm() {
    let tpm = Swtpm::start();
    let agent = Agent::new(&common::swtpm::backend_toml(&tpm.tcti()));
    agent.ok(&["ca", "init", "--subject", "CN=ops tpm test CA"]);
    agent.ok(&["tls", "init", "--san", "localhost"]);
    let (child, _) = agent.serve();
    let _serving = Stop(child);

    let check = agent.ok(&["check"]);
    assert!(
        check.starts_with("checked by the running agent (pid "),
        "{check}"
    );
    assert!(check.contains("(held by the agent)"), "{check}");
    assert!(!check.contains("FAIL"), "{check}");

    let generated = agent.ok(&[
        "keys",
        "generate",
        "--backend",
        "tpm",
        "--label",
        "vnf-t",
        "--vnf-instance",
        "vnf-t",
    ]);
    let reference = generated
        .split_whitespace()
        .next()
        .expect("reference")
        .to_string();
    assert!(reference.starts_with("tpm:handle=0x81"), "{reference}");
    let keys = agent.ok(&["keys", "list"]);
    assert!(
        keys.lines()
            .any(|l| l.starts_with(&reference) && l.ends_with("\tvnf\tvnf-t")),
        "{keys}"
    );
    assert!(agent
        .ok(&["keys", "sign-test", &reference])
        .starts_with("ok "));
    let erased: Value =
        serde_json::from_str(&agent.ok(&["keys", "destroy", &reference])).expect("JSON");
    assert_eq!(erased["verified"], true);
    assert!(!agent.ok(&["keys", "list"]).contains(&reference));
}
