//! A running `warden serve` with the CMF enabled, its own SoftHSM token directory, a CA in
//! that token, and VNFM client identities made with openssl (the VNFMs' side).

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use nfv_warden::client::HttpsClient;

use super::agent::Agent;
pub use super::shell::sh;

/// Consumers configured: two VNFMs of trust domain "operator-a", one of "operator-b".
pub const CONSUMERS: [(&str, &str); 3] = [
    ("vnfm-a", "operator-a"),
    ("vnfm-b", "operator-a"),
    ("vnfm-c", "operator-b"),
];

pub struct CmfAgent {
    pub agent: Agent,
    child: Option<Child>,
    pub port: u16,
}

impl CmfAgent {
    /// Token, CA, TLS identity, client identities and config; not yet serving.
    /// `extra` is appended inside the `[cmf]` table.
    pub fn new(extra: &str) -> CmfAgent {
        CmfAgent::with_ca_key(extra, None)
    }

    /// The same with the CA key in a TPM at `tcti` (persistent handle 0x81000110) instead of
    /// the SoftHSM token.
    pub fn with_ca_key(extra: &str, tpm_tcti: Option<&str>) -> CmfAgent {
        let consumers: String = CONSUMERS
            .iter()
            .map(|(id, domain)| {
                format!("[[cmf.consumer]]\nid = \"{id}\"\ntrust_domain = \"{domain}\"\n")
            })
            .collect();
        // Trust domains (issue 10): unless the test brings its own, each domain permits
        // the names the suites use (*.example, *.example.net, any VNFC identifier, any
        // address) from the default CA; tests/names.rs narrows them.
        let domains = if extra.contains("[[cmf.trust_domain]]") {
            String::new()
        } else {
            ["operator-a", "operator-b"]
                .iter()
                .map(|id| {
                    format!(
                        "[[cmf.trust_domain]]\nid = \"{id}\"\ndns_suffixes = [\"example\", \
                         \"example.net\"]\nvnfc_id_patterns = [\"*\"]\nip_ranges = \
                         [\"0.0.0.0/0\", \"::/0\"]\ncas = [\"default\"]\n"
                    )
                })
                .collect()
        };
        let consumers = if extra.contains("[[cmf.consumer]]") {
            String::new()
        } else {
            consumers
        };
        let agent = Agent::new(&format!(
            "\n[cmf]\nclient_ca = \"{{dir}}/vnfm-root.pem\"\n{extra}\n\n{domains}\n{consumers}"
        ));
        if let Some(tcti) = tpm_tcti {
            let text = std::fs::read_to_string(&agent.config).expect("config");
            let text = text.replace(
                "key = \"pkcs11:token=warden;object=warden-ca\"",
                "key = \"tpm:handle=0x81000110\"",
            ) + &format!(
                "\n[[backend]]\ntype = \"tpm\"\ntcti = \"{tcti}\"\nrecovery_attempts = 2\n\
                 command_timeout_ms = {}\nkeygen_timeout_ms = {}\n",
                super::swtpm::GUARD_DEADLINE_MS,
                super::swtpm::GUARD_KEYGEN_DEADLINE_MS
            );
            std::fs::write(&agent.config, text).expect("config");
        }
        let agent = CmfAgent {
            agent,
            child: None,
            port: 0,
        };
        agent.warden(&["ca", "init", "--subject", "CN=warden test CA,O=nfv-warden"]);
        agent.warden(&["tls", "init", "--san", "localhost", "--san", "127.0.0.1"]);
        agent.make_client_identities();
        agent
    }

    pub fn dir(&self) -> &Path {
        self.agent.dir()
    }

    pub fn command(&self, args: &[&str]) -> Command {
        self.agent.command(args)
    }

    pub fn warden(&self, args: &[&str]) -> String {
        self.agent.ok(args)
    }

    /// A root for VNFM client certificates, and one client identity per consumer plus an
    /// unknown "vnfm-x" (all with openssl: this is the VNFMs' side).
    fn make_client_identities(&self) {
        sh(
            self.dir(),
            "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
             -keyout vnfm-root.key -out vnfm-root.pem -subj /CN=vnfm-root -days 30 2>/dev/null",
        );
        for id in CONSUMERS.iter().map(|(id, _)| *id).chain(["vnfm-x"]) {
            std::fs::write(
                self.dir().join(format!("{id}.ext")),
                format!("subjectAltName=DNS:{id}\nextendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n"),
            )
            .expect("ext");
            sh(
                self.dir(),
                &format!(
                    "openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
                     -keyout {id}.key -out {id}.csr -subj /CN={id} 2>/dev/null && \
                     openssl x509 -req -in {id}.csr -CA vnfm-root.pem -CAkey vnfm-root.key \
                     -CAcreateserial -days 30 -extfile {id}.ext -out {id}.pem 2>/dev/null"
                ),
            );
        }
    }

    /// Start `warden serve` and wait for its address.
    pub fn start(&mut self) {
        let (child, addr) = self.agent.serve();
        self.port = addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port");
        self.child = Some(child);
    }

    /// SIGKILL, as a crash.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let start = Instant::now();
            // A failure guard: the drain and the last security-event flush may each take
            // their full budget on a loaded machine.
            while start.elapsed() < Duration::from_secs(90) {
                if let Ok(Some(status)) = child.try_wait() {
                    assert!(status.success(), "warden exited with {status:?}");
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
            panic!("warden did not stop after SIGTERM");
        }
    }

    pub fn base(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// A client with the identity of `consumer` (or none), sending the SOL 013 `Version`
    /// header of the CMF API with every request (a request may set its own).
    pub fn client(&self, consumer: Option<&str>) -> HttpsClient {
        self.client_without_version(consumer)
            .with_default_header("Version", nfv_warden::api::cmf::API_VERSION)
    }

    /// A client with the identity of `consumer` (or none) that sends no `Version` header.
    pub fn client_without_version(&self, consumer: Option<&str>) -> HttpsClient {
        let ca = self.dir().join("ca.pem");
        match consumer {
            Some(id) => {
                let cert = self.dir().join(format!("{id}.pem"));
                let key = self.dir().join(format!("{id}.key"));
                HttpsClient::new(&self.base(), &ca, Some((&cert, &key))).expect("client")
            }
            None => HttpsClient::new(&self.base(), &ca, None).expect("client"),
        }
    }

    pub fn store_path(&self) -> PathBuf {
        self.dir().join("warden.redb")
    }
}

impl Drop for CmfAgent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// An EC P-256 CSR made by openssl in `dir`: (PEM, key file).
pub fn openssl_csr(dir: &Path, name: &str, subject: &str, sans: &[&str]) -> String {
    let san = if sans.is_empty() {
        String::new()
    } else {
        format!(
            " -addext subjectAltName={}",
            sans.iter()
                .map(|s| format!("DNS:{s}"))
                .collect::<Vec<_>>()
                .join(",")
        )
    };
    sh(
        dir,
        &format!(
            "openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
             -keyout {name}.key -out {name}.csr -subj '{subject}'{san} 2>/dev/null"
        ),
    );
    std::fs::read_to_string(dir.join(format!("{name}.csr"))).expect("csr")
}
