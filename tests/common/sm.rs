//! A running `warden serve` with the Security Manager enabled, against the SOL 005 NFVO
//! test double: its own SoftHSM token (CA, TLS and the four interface keys), the double
//! trusting the agent's CA for the interface client certificates.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::agent::Agent;
use super::nfvo::NfvoDouble;

/// SHA-256 of the "good" package, pinned in every SM config here.
pub const GOOD_HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
/// What the NFVO reports for a tampered package.
pub const BAD_HASH: &str = "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752";

/// The rule set most tests use: a package checksum mismatch terminates with every option.
pub const TERMINATE_ALL: &str = r#"
[[sm.rule]]
on = "package_checksum_mismatch"
action = "terminate"
snapshot = true
allow_replacement = false
disable_package = true
erase = true

[[sm.rule]]
on = "topology_change"
action = "record"
"#;

/// The Sc-Or interfaces as config keys.
pub const INTERFACES: [&str; 4] = ["ns_lcm", "status_info", "sec_enforce", "security_vnf_mgmt"];

pub struct SmAgent {
    pub agent: Agent,
    pub nfvo: NfvoDouble,
    child: Option<Child>,
    pub port: u16,
}

/// How the SM is set up.
pub struct SmSetup<'a> {
    pub mode: &'a str,
    /// BASIC, OAUTH2_CLIENT_CREDENTIALS or TLS_CERT.
    pub notification_auth: &'a str,
    /// "mtls" or "oauth2".
    pub nfvo_auth: &'a str,
    pub rules: &'a str,
    pub reconcile_seconds: u64,
}

impl Default for SmSetup<'_> {
    fn default() -> Self {
        SmSetup {
            mode: "FULLY_ACTIVE",
            notification_auth: "BASIC",
            nfvo_auth: "mtls",
            rules: TERMINATE_ALL,
            reconcile_seconds: 3600,
        }
    }
}

impl SmAgent {
    /// The id of this SM's subscription at the NFVO double (the one notifications must name).
    #[allow(dead_code)]
    pub fn subscription_id(&self) -> String {
        let needle = format!("127.0.0.1:{}/", self.port);
        self.nfvo
            .subscriptions()
            .iter()
            .find(|s| {
                s["callbackUri"]
                    .as_str()
                    .is_some_and(|u| u.contains(&needle))
            })
            .and_then(|s| s["id"].as_str().map(String::from))
            .expect("the SM's subscription")
    }

    /// Token, CA, TLS identity, the NFVO double, config, interface keys; not yet serving.
    pub fn new(setup: SmSetup<'_>) -> SmAgent {
        let agent = Agent::new("");
        agent.ok(&["ca", "init", "--subject", "CN=warden test CA,O=nfv-warden"]);
        agent.ok(&["tls", "init", "--san", "localhost", "--san", "127.0.0.1"]);
        let dir = agent.dir().to_path_buf();
        let nfvo_dir = dir.join("nfvo");
        std::fs::create_dir_all(&nfvo_dir).expect("nfvo dir");
        let ca = dir.join("ca.pem");
        let nfvo = NfvoDouble::start(&nfvo_dir, &ca, &ca);
        std::fs::write(dir.join("notify-secret"), "s3cret-notify-password\n").expect("secret");
        let interfaces: String = INTERFACES
            .iter()
            .map(|i| {
                format!(
                    "[sm.nfvo.interface.{i}]\nkey = \"pkcs11:token=warden;object=sm-{i}\"\n\
                     certificate = \"{d}/sm-{i}.pem\"\n",
                    d = dir.display()
                )
            })
            .collect();
        let oauth = if setup.nfvo_auth == "oauth2" {
            // One OAuth2 client per interface (IFA 033 Security.006).
            let mut text = format!(
                "[sm.nfvo.oauth2]\ntoken_url = \"{}/oauth2/token\"\n",
                nfvo.base()
            );
            for i in INTERFACES {
                let secret = format!("{i}-client-secret");
                std::fs::write(dir.join(format!("oauth-{i}")), format!("{secret}\n"))
                    .expect("secret");
                nfvo.oauth_client(&format!("warden-sm-{i}"), &secret);
                text += &format!(
                    "[sm.nfvo.oauth2.{i}]\nclient_id = \"warden-sm-{i}\"\n\
                     client_secret = {{ file = \"{}/oauth-{i}\" }}\n",
                    dir.display()
                );
            }
            text
        } else {
            String::new()
        };
        let notifications = match setup.notification_auth {
            "TLS_CERT" => format!(
                "auth = \"TLS_CERT\"\nclient_ca = \"{}\"\nclient_identity = \"nfvo-notifier\"\n",
                nfvo.root_ca().display()
            ),
            other => format!(
                "auth = \"{other}\"\nsecret = {{ file = \"{}/notify-secret\" }}\n",
                dir.display()
            ),
        };
        let text = std::fs::read_to_string(&agent.config).expect("config")
            + &format!(
                r#"
[sm]
name = "warden-sm"
mode = "{mode}"
reconcile_seconds = {reconcile}

[sm.nfvo]
api_root = "{base}"
ca = "{nfvo_ca}"
auth = "{nfvo_auth}"
# A failure guard, not a behaviour under test: a late answer from the double on a loaded
# machine must not make the agent time out and send the request again.
timeout_seconds = 120
attempts = 4

{oauth}
{interfaces}
[sm.notifications]
{notifications}

[sm.pinned_packages]
pkg-good = "{GOOD_HASH}"
pkg-tampered = "{GOOD_HASH}"

{rules}
"#,
                mode = setup.mode,
                reconcile = setup.reconcile_seconds,
                base = nfvo.base(),
                nfvo_ca = nfvo.root_ca().display(),
                nfvo_auth = setup.nfvo_auth,
                rules = setup.rules,
            );
        std::fs::write(&agent.config, text).expect("config");
        if setup.nfvo_auth == "mtls" {
            agent.ok(&["sm", "init"]);
        }
        nfvo.add_package("pkg-good", "vnfd-1", GOOD_HASH, true);
        nfvo.add_package("pkg-tampered", "vnfd-1", BAD_HASH, true);
        SmAgent {
            agent,
            nfvo,
            child: None,
            port: 0,
        }
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

    /// Start `warden serve` and wait until its subscription (with this address) exists.
    pub fn start(&mut self) {
        self.spawn();
        let needle = format!("127.0.0.1:{}/", self.port);
        wait_for("the subscription", Duration::from_secs(30), || {
            self.nfvo.subscriptions().iter().any(|s| {
                s["callbackUri"]
                    .as_str()
                    .is_some_and(|u| u.contains(&needle))
            })
        });
        // The socket is created right after the listener.
        let socket = self.socket();
        wait_for("the admin socket", Duration::from_secs(10), || {
            socket.exists()
        });
    }

    /// Start `warden serve` without waiting for anything.
    pub fn spawn(&mut self) {
        let (child, addr) = self.agent.serve();
        self.port = addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port");
        self.child = Some(child);
    }

    /// The running agent's PID.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn socket(&self) -> PathBuf {
        self.dir().join("warden.sock")
    }

    /// SIGKILL, as a crash.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `warden sm <args>` (through the admin socket), stdout.
    pub fn sm(&self, args: &[&str]) -> String {
        let mut all = vec!["sm"];
        all.extend_from_slice(args);
        self.agent.ok(&all)
    }

    pub fn sm_json(&self, args: &[&str]) -> Value {
        serde_json::from_str(&self.sm(args)).expect("JSON")
    }

    /// The action for a VNF termination, once it is in the journal.
    pub fn action(&self, id: &str) -> Option<Value> {
        let out = self.agent.run(&["sm", "actions", id]);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).expect("JSON"))
    }

    /// Wait until the action reaches `state`.
    pub fn wait_action(&self, id: &str, state: &str) -> Value {
        let mut last = None;
        // A failure guard: host actions wait on real OpenStack migrations, several minutes
        // on a loaded 2-core machine.
        let deadline = Instant::now() + Duration::from_secs(300);
        while Instant::now() < deadline {
            last = self.action(id);
            if last.as_ref().is_some_and(|a| a["state"] == state) {
                return last.unwrap_or_default();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("action {id} did not reach {state}: {last:?}");
    }

    /// UpdateNS requests the double received (method POST, path .../update), with their
    /// NS and body, in order.
    pub fn updates(&self) -> Vec<(String, Value, Option<String>, u16)> {
        self.nfvo
            .requests()
            .into_iter()
            .filter(|r| r.method == "POST" && r.path.ends_with("/update"))
            .map(|r| {
                let ns = r
                    .path
                    .trim_end_matches("/update")
                    .rsplit('/')
                    .next()
                    .unwrap_or_default()
                    .to_string();
                (ns, r.body, r.client_identity, r.status)
            })
            .collect()
    }

    pub fn patches(&self) -> Vec<super::nfvo::Recorded> {
        self.nfvo
            .requests()
            .into_iter()
            .filter(|r| r.method == "PATCH")
            .collect()
    }
}

impl Drop for SmAgent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Poll `condition` every 20 ms until it holds; fail the test after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
