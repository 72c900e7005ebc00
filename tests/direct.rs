//! CMF direct mode (issue 11) against the REAL Tacker VNFM on the real OpenStack
//! (tests/common/tacker.rs; `WARDEN_OPENSTACK=DIR` reuses a running cloud and its Tacker).
//!
//! One VNF lifecycle, in order: subscription (Tacker's test GET answered 204), create,
//! instantiate -> the VNFC's enrollment credential arrives in its vnfcConfigurableProperties
//! (ModifyVnfInfo) -> EST enrollment with the names from the lifecycle data -> refusals
//! (replay, another VNF, no such VNFC, never instantiated, no credential) -> another trust
//! domain: a VNFC of a second VNFM (operator-b) refused at the first VNFM's path and at its
//! own (its identifier is outside operator-b's names) -> scale out -> the new VNFC enrolls -> agent stopped, scale in, agent started: the lost notifications are
//! recovered by reconciliation and the removed VNFC's certificate is revoked -> terminate
//! with the agent killed (SIGKILL) right after the removal intent is journaled -> after the
//! restart the revocation happens exactly once.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::Value;

use common::cmf::{openssl_csr, sh, CmfAgent};
use common::openstack::{free_ports, peers_dir};
use common::tacker::{OAuth2Api, Tacker};

fn poll<T>(what: &str, seconds: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + Duration::from_secs(seconds);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    getrandom::fill(&mut bytes).expect("random");
    hex::encode(bytes)
}

fn uuid() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .expect("uuid")
        .trim()
        .to_string()
}

/// A `warden serve` child, killed (by its PID) if the test panics with it running.
struct Served(Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `warden serve` with optional extra environment; the child and nothing else.
fn serve(agent: &CmfAgent, env: &[(&str, &str)]) -> Served {
    let mut command = agent.command(&["serve"]);
    command.stdout(Stdio::piped()).stderr(Stdio::inherit());
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command.spawn().expect("serve starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("listening line");
    assert!(line.starts_with("listening on"), "serve: '{line}'");
    Served(child)
}

fn stop(served: &mut Served) {
    let child = &mut served.0;
    // SAFETY: kill(2) on our own child's PID.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let end = Instant::now() + Duration::from_secs(30);
    while Instant::now() < end {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn json_of(agent: &CmfAgent, args: &[&str]) -> Value {
    serde_json::from_str(&agent.warden(args)).expect("json")
}

fn vnfc_view(agent: &CmfAgent, id: &str) -> Option<Value> {
    let out = agent
        .command(&["cmf", "vnfc", id])
        .output()
        .expect("warden");
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).expect("json"))
}

/// The enrollment data the CMF delivered to this VNFC through the VNFM (what the VNFC reads
/// from its configurable properties).
fn delivered(tacker: &Tacker, vnf: &str, vnfc: &str) -> Option<(String, String)> {
    let (user, credential, _) = delivered_with_url(tacker, vnf, vnfc)?;
    Some((user, credential))
}

/// The same with the `estUrl` the VNFC is told to enroll at.
fn delivered_with_url(tacker: &Tacker, vnf: &str, vnfc: &str) -> Option<(String, String, String)> {
    let inst = tacker.op(&["show", vnf]);
    let info = inst["instantiatedVnfInfo"]["vnfcInfo"].as_array()?.clone();
    let entry = info.iter().find(|v| v["vnfcResourceInfoId"] == vnfc)?;
    let e = &entry["vnfcConfigurableProperties"]["wardenEstEnrollment"];
    Some((
        e["user"].as_str()?.to_string(),
        e["credential"].as_str()?.to_string(),
        e["estUrl"].as_str()?.to_string(),
    ))
}

/// Tacker's Query VNF lists the VNFC's vnfcInfo without the enrollment credential.
fn credential_gone(tacker: &Tacker, vnf: &str, vnfc: &str) -> bool {
    let inst = tacker.op(&["show", vnf]);
    inst["instantiatedVnfInfo"]["vnfcInfo"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["vnfcResourceInfoId"] == vnfc)
        .is_some_and(|v| v["vnfcConfigurableProperties"]["wardenEstEnrollment"].is_null())
}

fn vnfc_ids(tacker: &Tacker, vnf: &str) -> Vec<String> {
    tacker.op(&["show", vnf])["instantiatedVnfInfo"]["vnfcResourceInfo"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["id"].as_str().map(String::from))
        .collect()
}

/// POST a CSR to the direct EST endpoint: (status, body).
fn enroll(
    agent: &CmfAgent,
    port: u16,
    vnfm: &str,
    auth: Option<(&str, &str)>,
    csr_pem: &str,
) -> (u16, String) {
    let client = nfv_warden::client::HttpsClient::new(
        &format!("https://127.0.0.1:{port}"),
        &agent.dir().join("ca.pem"),
        None,
    )
    .expect("client");
    let body: String = csr_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut headers = vec![("content-type", "application/pkcs10".to_string())];
    if let Some((user, password)) = auth {
        headers.push((
            "authorization",
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
            ),
        ));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        let mut connection = client.connect().await.expect("connect");
        let response = connection
            .request_with(
                "POST",
                &format!("/.well-known/est/direct/{vnfm}/simpleenroll"),
                &headers,
                body.into_bytes(),
            )
            .await
            .expect("request");
        (
            response.status,
            String::from_utf8_lossy(&response.body).into_owned(),
        )
    })
}

/// The SANs of the certificate in a certs-only PKCS#7 (base64) response.
fn certificate_text(dir: &Path, name: &str, p7_base64: &str) -> String {
    let der = base64::engine::general_purpose::STANDARD
        .decode(p7_base64.split_whitespace().collect::<String>())
        .expect("base64");
    std::fs::write(dir.join(format!("{name}.p7")), der).expect("write");
    sh(
        dir,
        &format!(
            "openssl pkcs7 -inform DER -in {name}.p7 -print_certs -out {name}.pem && \
             openssl x509 -in {name}.pem -noout -text > {name}.txt"
        ),
    );
    std::fs::read_to_string(dir.join(format!("{name}.txt"))).expect("text")
}

/// `openssl verify -crl_check` of `pem` against the CA and its current CRL (fetched from the
/// agent's revocation listener): Ok, or openssl's complaint.
fn crl_verdict(dir: &Path, rport: u16, pem: &str) -> Result<(), String> {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "curl -sSf -o crl.der http://127.0.0.1:{rport}/crl/default.crl && \
             openssl crl -inform DER -in crl.der -out crl.pem && \
             openssl verify -crl_check -CAfile ca.pem -CRLfile crl.pem {pem} 2>&1"
        ))
        .current_dir(dir)
        .output()
        .expect("sh");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        Ok(())
    } else {
        Err(text)
    }
}

/// `openssl ocsp` against the agent's responder: "good", "revoked" or "unknown".
fn ocsp_status(dir: &Path, rport: u16, pem: &str) -> String {
    let out = std::process::Command::new("openssl")
        .args([
            "ocsp",
            "-issuer",
            "ca.pem",
            "-cert",
            pem,
            "-CAfile",
            "ca.pem",
            "-url",
            &format!("http://127.0.0.1:{rport}/ocsp"),
        ])
        .current_dir(dir)
        .output()
        .expect("openssl ocsp");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "openssl ocsp: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = text
        .lines()
        .find(|l| l.starts_with(pem))
        .unwrap_or_else(|| panic!("openssl ocsp: {text}"));
    line.rsplit(' ')
        .next()
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn audit(agent: &CmfAgent) -> Vec<Value> {
    let v = json_of(agent, &["audit", "list", "--limit", "10000", "--json"]);
    match v {
        Value::Array(a) => a,
        other => other["entries"].as_array().cloned().unwrap_or_default(),
    }
}

/// Deletes what the test made in the shared Tacker, whatever happens.
struct Cleanup<'a> {
    tacker: &'a Tacker,
    vnfs: Vec<String>,
    packages: Vec<String>,
    callback_marker: String,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        for vnf in &self.vnfs {
            let shown = self.tacker.op(&["show", vnf]);
            if shown["instantiationState"] == "INSTANTIATED" {
                let _ = std::panic::catch_unwind(|| {
                    self.tacker
                        .op(&["lcm", vnf, "terminate", r#"{"terminationType":"FORCEFUL"}"#])
                });
            }
            let _ = std::panic::catch_unwind(|| self.tacker.op(&["delete", vnf]));
        }
        for pkg in &self.packages {
            let _ = std::panic::catch_unwind(|| self.tacker.op(&["pkg-delete", pkg]));
        }
        let subs = self.tacker.op(&["subs"]);
        for s in subs.as_array().into_iter().flatten() {
            if s["callbackUri"]
                .as_str()
                .is_some_and(|c| c.contains(&self.callback_marker))
            {
                let id = s["id"].as_str().unwrap_or_default().to_string();
                let _ = std::panic::catch_unwind(|| self.tacker.op(&["sub-delete", &id]));
            }
        }
    }
}

#[test]
fn direct_mode_follows_a_real_tacker() {
    let tacker = Tacker::shared();
    let vnfm = format!("direct2-{}", random_hex(4));
    // A second VNFM (the same Tacker, another VNF product) in another trust domain, whose
    // domain permits only VNFC identifiers "vnfc-*" (Tacker's are server UUIDs).
    let vnfm_b = format!("{vnfm}-b");
    let vnfd = uuid();
    let vnfd2 = uuid();
    let ports = free_ports(2);
    let (port, rport) = (ports[0], ports[1]);
    let extra = format!(
        r#"
[cmf.revocation]
listen = "127.0.0.1:{rport}"
crl_debounce_ms = 100

[cmf.direct]
reconcile_seconds = 20

[[cmf.direct.vnfm]]
id = "{vnfm}"
trust_domain = "operator-a"
api_root = "{tacker_url}"
vnfd_ids = ["{vnfd}"]
notification_auth = "BASIC"
notification_secret = {{ file = "{{dir}}/notify-secret" }}

[cmf.direct.vnfm.auth]
type = "keystone_password"
url = "{keystone}"
user = "{user}"
project = "{project}"
password = {{ file = "{{dir}}/os-password" }}

[[cmf.direct.vnfm]]
id = "{vnfm_b}"
trust_domain = "operator-b"
api_root = "{tacker_url}"
vnfd_ids = ["{vnfd2}"]
notification_auth = "BASIC"
notification_secret = {{ file = "{{dir}}/notify-secret" }}

[cmf.direct.vnfm.auth]
type = "keystone_password"
url = "{keystone}"
user = "{user}"
project = "{project}"
password = {{ file = "{{dir}}/os-password" }}

[[cmf.trust_domain]]
id = "operator-a"
dns_suffixes = ["example", "example.net"]
vnfc_id_patterns = ["*"]
ip_ranges = ["0.0.0.0/0", "::/0"]
cas = ["default"]

[[cmf.trust_domain]]
id = "operator-b"
dns_suffixes = ["example", "example.net"]
vnfc_id_patterns = ["vnfc-*"]
ip_ranges = ["0.0.0.0/0", "::/0"]
cas = ["default"]
"#,
        tacker_url = tacker.get("TACKER_URL"),
        keystone = tacker.get("KEYSTONE_URL"),
        user = tacker.get("OS_USERNAME"),
        project = tacker.get("OS_PROJECT_NAME"),
    );
    let agent = CmfAgent::new(&extra);
    let dir = agent.dir().to_path_buf();
    std::fs::write(dir.join("notify-secret"), random_hex(16)).expect("secret");
    std::fs::write(dir.join("os-password"), tacker.get("OS_PASSWORD")).expect("password");
    let config = std::fs::read_to_string(&agent.agent.config).expect("config");
    std::fs::write(
        &agent.agent.config,
        config.replace(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"127.0.0.1:{port}\""),
        ),
    )
    .expect("config");

    let mut cleanup = Cleanup {
        tacker,
        vnfs: Vec::new(),
        packages: Vec::new(),
        callback_marker: format!("/cmf/v1/direct/notifications/{vnfm}"),
    };
    let pkg = tacker.op(&[
        "onboard",
        &vnfd,
        &peers_dir().join("tacker-pkg").display().to_string(),
    ]);
    cleanup
        .packages
        .extend(pkg["pkgId"].as_str().map(String::from));
    let pkg = tacker.op(&[
        "onboard",
        &vnfd2,
        &peers_dir().join("tacker-pkg").display().to_string(),
    ]);
    cleanup
        .packages
        .extend(pkg["pkgId"].as_str().map(String::from));

    // Subscription: Tacker sends its test GET before answering 201 and refuses to subscribe
    // when the GET fails, so a subscription with our callback URI shows the 204.
    let mut child = serve(&agent, &[]);
    let callback = format!("https://127.0.0.1:{port}/cmf/v1/direct/notifications/{vnfm}");
    poll("the CMF's subscription at Tacker", 120, || {
        let subs = tacker.op(&["subs"]);
        let ours: Vec<Value> = subs
            .as_array()?
            .iter()
            .filter(|s| s["callbackUri"] == callback.as_str())
            .cloned()
            .collect();
        (ours.len() == 1).then_some(())
    });

    // Two VNFs: A instantiated, B never.
    let a = tacker.op(&["create", &vnfd, &format!("{vnfm}-a")])["id"]
        .as_str()
        .expect("id")
        .to_string();
    cleanup.vnfs.push(a.clone());
    let b = tacker.op(&["create", &vnfd, &format!("{vnfm}-b")])["id"]
        .as_str()
        .expect("id")
        .to_string();
    cleanup.vnfs.push(b.clone());
    poll("VnfIdentifierCreation of B in the inventory", 120, || {
        let vnfs = json_of(&agent, &["cmf", "vnfs", "--json"]);
        vnfs.as_array()?
            .iter()
            .any(|v| {
                v["vnfInstanceId"] == b.as_str() && v["instantiationState"] == "NOT_INSTANTIATED"
            })
            .then_some(())
    });
    let occ = tacker.op(&["instantiate", &a]);
    assert_eq!(occ["operationState"], "COMPLETED", "{occ}");
    let vnfc1 = vnfc_ids(tacker, &a).remove(0);
    let (user1, cred1) = poll("the enrollment credential of VNFC 1", 180, || {
        delivered(tacker, &a, &vnfc1)
    });
    assert_eq!(user1, format!("{a}/{vnfc1}"));
    let view = vnfc_view(&agent, &vnfc1).expect("VNFC 1 in the inventory");
    assert_eq!(view["vduId"], "VDU1");
    assert_eq!(
        view["serverId"],
        vnfc1.as_str(),
        "Tacker's vnfcResourceInfo id is the server id"
    );
    assert_eq!(view["vimConnectionId"], "vim1");
    assert_eq!(view["state"], "alive");

    // Refusals before any enrollment.
    let csr = openssl_csr(
        &dir,
        "vnfc1",
        "/CN=whatever-the-vnfc-asks",
        &["chosen.example"],
    );
    let (status, body) = enroll(&agent, port, &vnfm, None, &csr);
    assert_eq!(status, 401, "{body}");
    let (status, body) = enroll(
        &agent,
        port,
        &vnfm,
        Some((&user1, "not-the-credential")),
        &csr,
    );
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("wrong enrollment credential"), "{body}");
    let (status, body) = enroll(
        &agent,
        port,
        &vnfm,
        Some((&format!("{a}/{}", uuid()), &cred1)),
        &csr,
    );
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("has no VNFC"), "{body}");
    let (status, body) = enroll(
        &agent,
        port,
        &vnfm,
        Some((&format!("{b}/{vnfc1}"), &cred1)),
        &csr,
    );
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("belongs to another VNF"), "{body}");
    let (status, body) = enroll(
        &agent,
        port,
        &vnfm,
        Some((&format!("{b}/{}", uuid()), &cred1)),
        &csr,
    );
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("NOT_INSTANTIATED"), "{body}");

    // The VNFC enrolls: names from the lifecycle data, not from its CSR.
    let (status, body) = enroll(&agent, port, &vnfm, Some((&user1, &cred1)), &csr);
    assert_eq!(status, 200, "{body}");
    let text = certificate_text(&dir, "vnfc1-cert", &body);
    let urn = format!("urn:etsi:nfv:vnf:{a}:vnfc:{vnfc1}");
    assert!(text.contains(&format!("URI:{urn}")), "{text}");
    assert!(
        // The VDU id as the VNFD spells it (Tacker's sample: VDU1).
        text.contains(&format!("URI:urn:etsi:nfv:vnf:{a}:vdu:VDU1")),
        "{text}"
    );
    assert!(
        !text.contains("chosen.example") && !text.contains("whatever-the-vnfc-asks"),
        "{text}"
    );
    // Replay of the single-use credential.
    let (status, body) = enroll(&agent, port, &vnfm, Some((&user1, &cred1)), &csr);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("used already"), "{body}");
    // The used credential's plaintext leaves Tacker: a Query VNF shows VNFC 1's vnfcInfo
    // without it (ModifyVnfInfo with a null member), and the CMF closed its intent.
    poll(
        "the used credential of VNFC 1 gone from Tacker",
        180,
        || credential_gone(tacker, &a, &vnfc1).then_some(()),
    );
    let view = poll("the scrub of VNFC 1's credential closed", 60, || {
        let v = vnfc_view(&agent, &vnfc1)?;
        v["credential"]["scrubbedAt"].is_string().then_some(v)
    });
    assert_eq!(view["credential"]["scrubPending"], false, "{view}");
    assert!(view["credential"]["usedAt"].is_string(), "{view}");

    // Trust domains. C is a VNF of VNFM B (trust domain operator-b): its VNFC gets its own
    // enrollment credential and path, but a certificate neither through A's path (another
    // trust domain) nor through its own (its identifier is outside operator-b's names).
    let c = tacker.op(&["create", &vnfd2, &format!("{vnfm}-c")])["id"]
        .as_str()
        .expect("id")
        .to_string();
    cleanup.vnfs.push(c.clone());
    let occ = tacker.op(&["instantiate", &c]);
    assert_eq!(occ["operationState"], "COMPLETED", "{occ}");
    let vnfc_c = vnfc_ids(tacker, &c).remove(0);
    let (user_c, cred_c, url_c) = poll("the enrollment credential of C's VNFC", 180, || {
        delivered_with_url(tacker, &c, &vnfc_c)
    });
    assert_eq!(
        url_c,
        format!("https://127.0.0.1:{port}/.well-known/est/direct/{vnfm_b}")
    );
    let view_c = vnfc_view(&agent, &vnfc_c).expect("C's VNFC in the inventory");
    assert_eq!(view_c["trustDomain"], "operator-b", "{view_c}");
    assert_eq!(view_c["vnfm"], vnfm_b.as_str(), "{view_c}");
    let csr_c = openssl_csr(&dir, "vnfc-c", "/CN=vnfc-c", &["vnfc-c.example"]);
    let (status, body) = enroll(&agent, port, &vnfm, Some((&user_c, &cred_c)), &csr_c);
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains(&format!(
            "belongs to VNFM '{vnfm_b}' of trust domain 'operator-b'"
        )) && body.contains("trust domain 'operator-a'"),
        "{body}"
    );
    let (status, body) = enroll(&agent, port, &vnfm_b, Some((&user_c, &cred_c)), &csr_c);
    assert_eq!(status, 403, "{body}");
    let detail = serde_json::from_str::<Value>(&body).expect("ProblemDetails")["detail"]
        .as_str()
        .expect("detail")
        .to_string();
    assert!(
        detail.contains(&format!(
            "VNFC identifier '{}' matches none of the VNFC identifier patterns of \
             cmf.trust_domain 'operator-b' (vnfc_id_patterns = [\"vnfc-*\"])",
            vnfc_c.to_ascii_lowercase()
        )),
        "{detail}"
    );
    // Refused, not consumed: nothing was registered or issued for it.
    let view_c = vnfc_view(&agent, &vnfc_c).expect("C's VNFC");
    assert!(view_c["credential"]["usedAt"].is_null(), "{view_c}");
    assert!(view_c["registrationId"].is_null(), "{view_c}");
    assert_eq!(view_c["certificates"], serde_json::json!([]), "{view_c}");
    // The enrollment path of no VNFM followed.
    let (status, body) = enroll(
        &agent,
        port,
        "no-such-vnfm",
        Some((&user_c, &cred_c)),
        &csr_c,
    );
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("no VNFM 'no-such-vnfm'"), "{body}");
    // C is done with: its server goes now (the project's instance quota is shared, and the
    // heal below needs room for a replacement server), and its VNFC is removed for the CMF.
    let occ = tacker.op(&["lcm", &c, "terminate", r#"{"terminationType":"FORCEFUL"}"#]);
    assert_eq!(occ["operationState"], "COMPLETED", "{occ}");
    poll("the removal of C's VNFC", 180, || {
        let v = vnfc_view(&agent, &vnfc_c)?;
        (v["state"] == "removed").then_some(())
    });

    // Scale out: the new VNFC gets its own credential and certificate.
    let occ = tacker.op(&[
        "lcm",
        &a,
        "scale",
        r#"{"type":"SCALE_OUT","aspectId":"VDU1_scale","numberOfSteps":1}"#,
    ]);
    assert_eq!(occ["operationState"], "COMPLETED", "{occ}");
    let vnfc2 = vnfc_ids(tacker, &a)
        .into_iter()
        .find(|v| *v != vnfc1)
        .expect("a second VNFC");
    let (user2, cred2) = poll("the enrollment credential of VNFC 2", 180, || {
        delivered(tacker, &a, &vnfc2)
    });
    // The used credential's removal from Tacker survives a crash: the agent is killed
    // (SIGKILL) after VNFC 2's enrollment journaled the intent and before the ModifyVnfInfo;
    // the restarted agent adopts it.
    stop(&mut child);
    let scrub_pause = dir.join("paused-before-scrub");
    child = serve(
        &agent,
        &[(
            "WARDEN_TEST_DIRECT_PAUSE_BEFORE_SCRUB",
            scrub_pause.to_str().expect("utf-8"),
        )],
    );
    let csr2 = openssl_csr(&dir, "vnfc2", "/CN=vnfc2", &[]);
    // A VNFC of operator-a at the path of operator-b's VNFM: refused, credential kept.
    let (status, body) = enroll(&agent, port, &vnfm_b, Some((&user2, &cred2)), &csr2);
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains(&format!(
            "belongs to VNFM '{vnfm}' of trust domain 'operator-a'"
        )),
        "{body}"
    );
    let (status, body) = enroll(&agent, port, &vnfm, Some((&user2, &cred2)), &csr2);
    assert_eq!(status, 200, "{body}");
    certificate_text(&dir, "vnfc2-cert", &body);
    poll(
        "the agent to stop before removing VNFC 2's credential",
        180,
        || scrub_pause.exists().then_some(()),
    );
    assert_eq!(
        std::fs::read_to_string(&scrub_pause).expect("pause file"),
        format!("{a}/{vnfc2}")
    );
    assert_eq!(
        delivered(tacker, &a, &vnfc2),
        Some((user2.clone(), cred2.clone())),
        "still at Tacker when the agent dies"
    );
    let _ = child.0.kill(); // SIGKILL
    let _ = child.0.wait();
    child = serve(&agent, &[]);
    poll(
        "the used credential of VNFC 2 gone from Tacker",
        180,
        || credential_gone(tacker, &a, &vnfc2).then_some(()),
    );
    poll("the scrub of VNFC 2's credential closed", 60, || {
        let v = vnfc_view(&agent, &vnfc2)?;
        v["credential"]["scrubbedAt"].is_string().then_some(())
    });
    let scrubbed = audit(&agent)
        .iter()
        .filter(|e| {
            e["action"] == "cmf.direct.credential_scrubbed"
                && e["subject"] == format!("{a}/{vnfc2}").as_str()
        })
        .count();
    assert_eq!(scrubbed, 1, "one scrub audit entry for VNFC 2");

    // Heal of VNFC 2 (Tacker v2 re-creates the server: HEAL COMPLETED lists the old VNFC
    // REMOVED and a new one ADDED, with a new server and so a new vnfcResourceInfo id). The
    // old certificate is revoked on that positive evidence; the new server is a new identity
    // with a new credential and a new certificate (IFA 033 11.3; README "Enrollment binding").
    let info_id = tacker.op(&["show", &a])["instantiatedVnfInfo"]["vnfcInfo"]
        .as_array()
        .expect("vnfcInfo")
        .iter()
        .find(|v| v["vnfcResourceInfoId"] == vnfc2.as_str())
        .and_then(|v| v["id"].as_str().map(String::from))
        .expect("VNFC 2's vnfcInfo");
    let occ = tacker.op(&[
        "lcm",
        &a,
        "heal",
        &serde_json::json!({"vnfcInstanceId": [info_id], "cause": "direct2 heal test"}).to_string(),
    ]);
    if occ["operationState"] == "FAILED_TEMP" {
        // FAILED_TEMP is no evidence: VNFC 2 stays alive for the CMF.
        let view = vnfc_view(&agent, &vnfc2).expect("VNFC 2");
        assert_eq!(view["state"], "alive", "{view}");
        let _ = tacker.op(&["fail", occ["id"].as_str().unwrap_or_default()]);
        panic!(
            "Tacker's heal of VNFC 2 ended FAILED_TEMP: {}. Seen on a shared cloud: \
             \"Failed to detach interface\" (Heat detaches the old server's port before the \
             replacement; nova's fake driver knows only the interfaces of the servers it \
             spawned, so a server someone else live-migrated cannot be healed) and \"Quota \
             exceeded for instances\" (the replacement is created before the old server goes; \
             other users' servers filled the project)",
            occ["error"]
        );
    }
    assert_eq!(occ["operationState"], "COMPLETED", "{occ}");
    let changes = occ["resourceChanges"]["affectedVnfcs"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        changes
            .iter()
            .any(|c| c["id"] == vnfc2.as_str() && c["changeType"] == "REMOVED"),
        "{occ}"
    );
    let healed = vnfc_ids(tacker, &a)
        .into_iter()
        .find(|v| *v != vnfc1 && *v != vnfc2)
        .expect("the healed VNFC: a new vnfcResourceInfo id");
    let report = poll("the removal of the healed VNFC's old identity", 180, || {
        let v = vnfc_view(&agent, &vnfc2)?;
        (v["state"] == "removed").then_some(v)
    });
    let evidence = report["report"]["evidence"].as_str().unwrap_or_default();
    assert!(
        evidence.starts_with("HEAL ")
            && evidence.contains("COMPLETED")
            && evidence.contains("REMOVED"),
        "{report}"
    );
    let certs = report["certificates"].as_array().expect("certificates");
    assert_eq!(certs.len(), 1, "{report}");
    assert_eq!(
        certs[0]["revocation"]["reason"], "cessationOfOperation",
        "{report}"
    );
    std::fs::copy(dir.join("vnfc2-cert.pem"), dir.join("vnfc2-old-cert.pem")).expect("copy");
    poll(
        "the CRL to list the healed VNFC's old certificate",
        60,
        || {
            crl_verdict(&dir, rport, "vnfc2-old-cert.pem")
                .err()
                .filter(|e| e.contains("certificate revoked"))
        },
    );
    assert_eq!(ocsp_status(&dir, rport, "vnfc2-old-cert.pem"), "revoked");
    // The old identity cannot enroll again, not even with the credential it once had.
    let (status, body) = enroll(&agent, port, &vnfm, Some((&user2, &cred2)), &csr2);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("has been removed"), "{body}");
    // The new server: its own credential, bound to it, and a certificate with its URN.
    let (user3, cred3) = poll("the enrollment credential of the healed VNFC", 180, || {
        delivered(tacker, &a, &healed)
    });
    assert_eq!(user3, format!("{a}/{healed}"));
    assert_ne!(cred3, cred2);
    let view = vnfc_view(&agent, &healed).expect("the healed VNFC in the inventory");
    assert_eq!(view["serverId"], healed.as_str(), "{view}");
    assert_eq!(view["state"], "alive", "{view}");
    let (status, body) = enroll(&agent, port, &vnfm, Some((&user3, &cred3)), &csr2);
    assert_eq!(status, 200, "{body}");
    let text = certificate_text(&dir, "vnfc2-cert", &body);
    assert!(
        text.contains(&format!("URI:urn:etsi:nfv:vnf:{a}:vnfc:{healed}")),
        "{text}"
    );
    assert_eq!(ocsp_status(&dir, rport, "vnfc2-cert.pem"), "good");
    poll(
        "the used credential of the healed VNFC gone from Tacker",
        180,
        || credential_gone(tacker, &a, &healed).then_some(()),
    );
    // From here on, "VNFC 2" is the healed one.
    let vnfc2 = healed;
    // Both valid by CRL before anything goes.
    poll("a CRL that the new certificate passes", 60, || {
        crl_verdict(&dir, rport, "vnfc2-cert.pem").ok()
    });

    // A lost notification: the agent is down during scale in; reconciliation at start finds
    // the VNFC gone by Query VNF and revokes its certificate.
    stop(&mut child);
    let occ = tacker.op(&[
        "lcm",
        &a,
        "scale",
        r#"{"type":"SCALE_IN","aspectId":"VDU1_scale","numberOfSteps":1}"#,
    ]);
    assert_eq!(occ["operationState"], "COMPLETED", "{occ}");
    let remaining = vnfc_ids(tacker, &a);
    assert_eq!(remaining.len(), 1);
    let removed = if remaining[0] == vnfc1 {
        vnfc2.clone()
    } else {
        vnfc1.clone()
    };
    let kept = remaining[0].clone();
    child = serve(&agent, &[]);
    let report = poll("the removal of the scaled-in VNFC", 180, || {
        let v = vnfc_view(&agent, &removed)?;
        (v["state"] == "removed").then_some(v)
    });
    assert!(
        report["report"]["evidence"]
            .as_str()
            .is_some_and(|e| e.contains("no longer in vnfcResourceInfo")),
        "{report}"
    );
    let certs = report["certificates"].as_array().expect("certificates");
    assert_eq!(certs.len(), 1, "{report}");
    assert_eq!(
        certs[0]["revocation"]["reason"], "cessationOfOperation",
        "{report}"
    );
    assert!(report["report"]["keys"]
        .as_str()
        .unwrap_or("")
        .starts_with("none"));
    // Seen as revoked by relying parties: CRL (openssl verify -crl_check) and OCSP.
    let removed_pem = if removed == vnfc1 {
        "vnfc1-cert.pem"
    } else {
        "vnfc2-cert.pem"
    };
    let kept_pem = if removed == vnfc1 {
        "vnfc2-cert.pem"
    } else {
        "vnfc1-cert.pem"
    };
    poll("the CRL to list the removed VNFC's certificate", 60, || {
        crl_verdict(&dir, rport, removed_pem)
            .err()
            .filter(|e| e.contains("certificate revoked"))
    });
    assert_eq!(crl_verdict(&dir, rport, kept_pem), Ok(()));
    assert_eq!(ocsp_status(&dir, rport, removed_pem), "revoked");
    assert_eq!(ocsp_status(&dir, rport, kept_pem), "good");
    let removed_user = format!("{a}/{removed}");
    let (status, body) = enroll(&agent, port, &vnfm, Some((&removed_user, "x")), &csr);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("removed"), "{body}");

    // Terminate with a crash right after the removal intent is durable: exactly once.
    stop(&mut child);
    let pause = dir.join("paused-after-intent");
    child = serve(
        &agent,
        &[(
            "WARDEN_TEST_DIRECT_PAUSE_AFTER_INTENT",
            pause.to_str().expect("utf-8"),
        )],
    );
    let occ = tacker.op(&["lcm", &a, "terminate", r#"{"terminationType":"FORCEFUL"}"#]);
    assert_eq!(occ["operationState"], "COMPLETED", "{occ}");
    poll("the agent to journal the removal intent", 180, || {
        pause.exists().then_some(())
    });
    let _ = child.0.kill(); // SIGKILL
    let _ = child.0.wait();
    child = serve(&agent, &[]);
    let report = poll("the removal of the last VNFC after the crash", 180, || {
        let v = vnfc_view(&agent, &kept)?;
        (v["state"] == "removed").then_some(v)
    });
    let certs = report["certificates"].as_array().expect("certificates");
    assert_eq!(certs.len(), 1, "{report}");
    assert_eq!(certs[0]["revocation"]["reason"], "cessationOfOperation");
    let cert_id = certs[0]["id"].as_str().expect("id").to_string();
    let entries = audit(&agent);
    let removals = entries
        .iter()
        .filter(|e| {
            e["action"] == "cmf.direct.vnfc_removed"
                && e["subject"] == format!("{a}/{kept}").as_str()
        })
        .count();
    assert_eq!(removals, 1, "one removal audit entry");
    let revocations = entries
        .iter()
        .filter(|e| e["action"] == "cmf.revoke" && e["subject"] == cert_id.as_str())
        .count();
    assert_eq!(revocations, 1, "one revocation of {cert_id}");
    poll("the CRL to list the last VNFC's certificate", 60, || {
        crl_verdict(&dir, rport, kept_pem)
            .err()
            .filter(|e| e.contains("certificate revoked"))
    });
    assert_eq!(ocsp_status(&dir, rport, kept_pem), "revoked");

    // Delete: VnfIdentifierDeletion, the inventory says DELETED.
    assert_eq!(tacker.op(&["delete", &a])["status"], 204);
    poll("A deleted in the inventory", 120, || {
        let vnfs = json_of(&agent, &["cmf", "vnfs", "--json"]);
        vnfs.as_array()?
            .iter()
            .any(|v| v["vnfInstanceId"] == a.as_str() && v["instantiationState"] == "DELETED")
            .then_some(())
    });
    cleanup.vnfs.retain(|v| *v != a);
    stop(&mut child);
}

/// Deletes the Keystone application credential (the CMF's OAuth 2.0 client) it was made for.
struct AppCredential<'a> {
    tacker: &'a Tacker,
    user: String,
    id: String,
}

impl Drop for AppCredential<'_> {
    fn drop(&mut self) {
        let _ =
            std::panic::catch_unwind(|| self.tacker.op(&["appcred-delete", &self.user, &self.id]));
    }
}

/// The CMF authenticates to Tacker's API with OAuth 2.0 client credentials (SOL 013 8.2,
/// RFC 6749 4.4): Keystone (Zed) issues the access token at /v3/OS-OAUTH2/token for an
/// application credential, and a Tacker API process that accepts only Bearer tokens
/// (keystonemiddleware oauth2_token) serves the CMF's subscription and Query VNF.
#[test]
fn direct_mode_authenticates_to_tacker_with_oauth2() {
    let tacker = Tacker::shared();
    let api = OAuth2Api::start(tacker);
    let vnfm = format!("direct2-oauth-{}", random_hex(4));
    let created = tacker.op(&["appcred-create", &vnfm]);
    let client = AppCredential {
        tacker,
        user: created["userId"].as_str().expect("userId").to_string(),
        id: created["id"].as_str().expect("id").to_string(),
    };
    // That API refuses Keystone's own X-Auth-Token: what the CMF gets, it got with OAuth 2.0.
    let keystone_only = std::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            "Version: 2.0.0",
            "-H",
            "X-Auth-Token: not-a-bearer-token",
            &format!("{}/vnflcm/v2/vnf_instances", api.url),
        ])
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&keystone_only.stdout), "401");

    let vnfd = uuid();
    let port = free_ports(1)[0];
    let extra = format!(
        r#"
[cmf.direct]
reconcile_seconds = 20

[[cmf.direct.vnfm]]
id = "{vnfm}"
trust_domain = "operator-a"
api_root = "{api_url}"
vnfd_ids = ["{vnfd}"]
notification_auth = "BASIC"
notification_secret = {{ file = "{{dir}}/notify-secret" }}

[cmf.direct.vnfm.auth]
type = "oauth2"
token_url = "{keystone}/OS-OAUTH2/token"
client_id = "{client_id}"
client_secret = {{ file = "{{dir}}/client-secret" }}
"#,
        api_url = api.url,
        keystone = tacker.get("KEYSTONE_URL"),
        client_id = client.id,
    );
    let agent = CmfAgent::new(&extra);
    let dir = agent.dir().to_path_buf();
    std::fs::write(dir.join("notify-secret"), random_hex(16)).expect("secret");
    std::fs::write(
        dir.join("client-secret"),
        created["secret"].as_str().expect("secret"),
    )
    .expect("client secret");
    let config = std::fs::read_to_string(&agent.agent.config).expect("config");
    std::fs::write(
        &agent.agent.config,
        config.replace(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"127.0.0.1:{port}\""),
        ),
    )
    .expect("config");
    let mut cleanup = Cleanup {
        tacker,
        vnfs: Vec::new(),
        packages: Vec::new(),
        callback_marker: format!("/cmf/v1/direct/notifications/{vnfm}"),
    };
    let pkg = tacker.op(&[
        "onboard",
        &vnfd,
        &peers_dir().join("tacker-pkg").display().to_string(),
    ]);
    cleanup
        .packages
        .extend(pkg["pkgId"].as_str().map(String::from));

    let mut child = serve(&agent, &[]);
    // Subscribed through the OAuth 2.0 API (Tacker's test GET answered).
    let callback = format!("https://127.0.0.1:{port}/cmf/v1/direct/notifications/{vnfm}");
    poll(
        "the CMF's subscription, made with a Bearer token",
        180,
        || {
            let subs = tacker.op(&["subs"]);
            subs.as_array()?
                .iter()
                .any(|s| s["callbackUri"] == callback.as_str())
                .then_some(())
        },
    );
    // A VNF instance appears: the CMF reads it (VnfIdentifierCreation, then Query VNF) with
    // its Bearer token.
    let v = tacker.op(&["create", &vnfd, &format!("{vnfm}-v")])["id"]
        .as_str()
        .expect("id")
        .to_string();
    cleanup.vnfs.push(v.clone());
    poll("the VNF in the CMF's inventory", 180, || {
        let vnfs = json_of(&agent, &["cmf", "vnfs", "--json"]);
        vnfs.as_array()?
            .iter()
            .any(|x| {
                x["vnfInstanceId"] == v.as_str() && x["instantiationState"] == "NOT_INSTANTIATED"
            })
            .then_some(())
    });
    // The access log line follows the response: polled, not read once.
    let subscribed = "\"POST /vnflcm/v2/subscriptions HTTP/1.1\" 201".to_string();
    let queried = format!("\"GET /vnflcm/v2/vnf_instances/{v} HTTP/1.1\" 200");
    poll(
        "the subscription and Query VNF in the OAuth 2.0 API's access log",
        60,
        || {
            let log = api.log();
            (log.contains(&subscribed) && log.contains(&queried)).then_some(())
        },
    );
    stop(&mut child);
    drop(cleanup);
    drop(client);
}
