//! The `warden` binary end to end, each test with a SoftHSM token directory of its own
//! (SOFTHSM2_CONF is per process, and every command is a fresh process: an agent restart).

mod common;

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::agent::Agent;
use common::swtpm::Swtpm;

#[test]
fn ca_tls_check_serve_healthz_then_sigterm() {
    let agent = Agent::new("");
    let out = agent.ok(&["ca", "init", "--subject", "CN=cli test CA,O=nfv-warden"]);
    assert!(out.contains("self-signed root"), "{out}");
    // A second init does not replace the CA.
    let err = agent.fails(&["ca", "init"]);
    assert!(err.contains("exists already"), "{err}");
    agent.ok(&["tls", "init", "--san", "localhost", "--san", "127.0.0.1"]);
    let check = agent.ok(&["check"]);
    assert!(!check.contains("FAIL"), "{check}");
    assert!(
        check.contains("CA key pkcs11:token=warden;object=warden-ca (ec-p256) signs"),
        "{check}"
    );

    // openssl agrees with the chain.
    let verify = Command::new("openssl")
        .args(["verify", "-CAfile", "ca.pem", "tls-chain.pem"])
        .current_dir(agent.dir())
        .output()
        .expect("openssl");
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );

    let (mut child, addr) = agent.serve();
    let port = addr.rsplit(':').next().expect("port").to_string();
    let body = curl_healthz(agent.dir(), &port);
    let health: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(health["status"], "ok");
    assert_eq!(health["backends"][0]["type"], "pkcs11");

    // SIGTERM: stop accepting, drain, exit 0.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status =
        wait_with_timeout(&mut child, Duration::from_secs(15)).expect("exits after SIGTERM");
    assert!(status.success(), "clean exit after SIGTERM: {status:?}");
}

#[test]
fn keys_commands_on_both_backends_and_across_restarts() {
    let tpm = Swtpm::start();
    let agent = Agent::new(&common::swtpm::backend_toml(&tpm.tcti()));
    for backend in ["pkcs11", "tpm"] {
        let out = agent.ok(&[
            "keys",
            "generate",
            "--backend",
            backend,
            "--label",
            "vnf-a",
            "--algorithm",
            "ec-p384",
        ]);
        let reference = out
            .split_whitespace()
            .next()
            .expect("reference")
            .to_string();
        // Every command is a new process: the key is still there after the "restart".
        let list = agent.ok(&["keys", "list"]);
        assert!(list.contains(&reference), "{list}");
        let show = agent.ok(&["keys", "show", &reference]);
        assert!(
            show.contains("ec-p384") && show.contains("BEGIN PUBLIC KEY"),
            "{show}"
        );
        if backend == "pkcs11" {
            assert!(
                show.contains("extractable=false sensitive=true never_extractable=true"),
                "{show}"
            );
        }
        let test = agent.ok(&["keys", "sign-test", &reference, "--count", "5"]);
        assert!(test.starts_with("ok "), "{test}");
        let erased = agent.ok(&["keys", "destroy", &reference, "--vnf-instance", "vnf-1"]);
        let record: serde_json::Value = serde_json::from_str(&erased).expect("erasure JSON");
        assert_eq!(record["verified"], true);
        assert_eq!(record["object"], reference.as_str());
        assert!(!agent.ok(&["keys", "list"]).contains(&reference));
        let err = agent.fails(&["keys", "show", &reference]);
        assert!(err.contains("not found"), "{err}");
    }
}

#[test]
fn external_root_csr_and_chain_import() {
    let agent = Agent::with_ca_chain("");
    let dir = agent.dir();
    let csr = dir.join("ca.csr");
    agent.ok(&[
        "ca",
        "init",
        "--csr-out",
        csr.to_str().unwrap(),
        "--subject",
        "CN=warden issuing CA",
    ]);
    // An external root (openssl) signs the CSR.
    let sh = |script: &str| common::shell::sh(dir, script);
    std::fs::write(dir.join("ext.cnf"), "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n").unwrap();
    sh("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout root.key -out root.pem -subj /CN=external-root -days 30 2>/dev/null");
    sh("openssl x509 -req -in ca.csr -CA root.pem -CAkey root.key -CAcreateserial -days 30 -extfile ext.cnf -out ca-signed.pem 2>/dev/null");
    sh("cat ca-signed.pem root.pem > import.pem");
    let import = dir.join("import.pem");
    let out = agent.ok(&["ca", "init", "--import-chain", import.to_str().unwrap()]);
    assert!(out.contains("1 chain certificate"), "{out}");
    agent.ok(&["tls", "init"]);
    let check = agent.ok(&["check"]);
    assert!(!check.contains("FAIL"), "{check}");
    // The TLS chain now reaches the external root.
    let out = Command::new("openssl")
        .args([
            "verify",
            "-CAfile",
            "root.pem",
            "-untrusted",
            "ca.pem",
            "tls-chain.pem",
        ])
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A chain that is not for the CA key is refused.
    let root = dir.join("root.pem");
    let err = agent.fails(&["ca", "init", "--import-chain", root.to_str().unwrap()]);
    assert!(err.contains("not for the CA key"), "{err}");
}

#[test]
fn bad_input_gets_one_line_errors() {
    let agent = Agent::new("");
    // Malformed config: unknown key.
    let bad = agent.dir().join("bad.toml");
    std::fs::write(&bad, "[store]\npath = \"/tmp/x\"\ncolour = \"blue\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_warden"))
        .args(["--config", bad.to_str().unwrap(), "keys", "list"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("warden: config ")
            && stderr.contains("bad.toml")
            && stderr.contains("colour"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");

    // Unknown key reference, and a slot number where a URI belongs.
    let err = agent.fails(&["keys", "show", "pkcs11:token=warden;object=nope"]);
    assert!(err.contains("not found"), "{err}");
    let err = agent.fails(&["keys", "show", "pkcs11:slot-id=0;object=x"]);
    assert!(err.contains("slots are not stable names"), "{err}");
    let err = agent.fails(&["keys", "generate", "--backend", "hsm", "--label", "x"]);
    assert!(err.contains("expected pkcs11 or tpm"), "{err}");

    // Missing PIN file.
    let pin = agent.dir().join("warden.pin");
    std::fs::rename(&pin, agent.dir().join("moved.pin")).unwrap();
    let err = agent.fails(&["keys", "list"]);
    assert!(err.contains("warden.pin"), "{err}");
    let check = agent.run(&["check"]);
    assert!(!check.status.success());
    assert!(
        String::from_utf8_lossy(&check.stdout).contains("FAIL PIN"),
        "{check:?}"
    );

    // Wrong PIN: a clear error, one login attempt per run, and the token is not locked.
    std::fs::write(&pin, "9999\n").unwrap();
    for _ in 0..3 {
        let err = agent.fails(&["keys", "list"]);
        assert!(err.contains("PIN rejected"), "{err}");
    }
    std::fs::rename(agent.dir().join("moved.pin"), &pin).unwrap();
    agent.ok(&["keys", "list"]);
}

fn curl_healthz(dir: &Path, port: &str) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--fail", "--cacert", "ca.pem"])
        .arg(format!("https://localhost:{port}/healthz"))
        .arg("--resolve")
        .arg(format!("localhost:{port}:127.0.0.1"))
        .current_dir(dir)
        .output()
        .expect("curl");
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_with_timeout(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}
