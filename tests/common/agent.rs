//! A `warden` with a SoftHSM token directory of its own and a config using it: every command
//! is a fresh process (an agent restart), with its own SOFTHSM2_CONF.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use super::softhsm::TokenDir;

pub struct Agent {
    pub tokens: TokenDir,
    pub config: PathBuf,
}

impl Agent {
    /// A token "warden" with PIN 1234, and a config using it; `extra` is appended, with
    /// `{dir}` replaced by the agent's directory.
    pub fn new(extra: &str) -> Agent {
        Agent::build(false, extra)
    }

    /// The same, with `ca.chain` configured (a CA under an external root).
    pub fn with_ca_chain(extra: &str) -> Agent {
        Agent::build(true, extra)
    }

    fn build(ca_chain: bool, extra: &str) -> Agent {
        let tokens = TokenDir::new();
        let pin = tokens.init_token("warden", "1234");
        let dir = tokens.path().to_path_buf();
        let config = dir.join("warden.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[[backend]]
type = "pkcs11"
module = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "warden"
pin = {{ file = "{pin}" }}
pool_size = 2

[store]
path = "{dir}/warden.redb"

[server]
listen = "127.0.0.1:0"
tls_key = "pkcs11:token=warden;object=warden-tls"
tls_certificate = "{dir}/tls-chain.pem"
drain_seconds = 5

[ca]
key = "pkcs11:token=warden;object=warden-ca"
certificate = "{dir}/ca.pem"
{chain}
{extra}
"#,
                pin = pin.display(),
                dir = dir.display(),
                extra = extra.replace("{dir}", &dir.display().to_string()),
                chain = if ca_chain {
                    format!("chain = \"{}/ca-chain.pem\"", dir.display())
                } else {
                    String::new()
                },
            ),
        )
        .expect("config");
        let agent = Agent { tokens, config };
        // `serve` and the other commands never create a store (issue 8 section 4): the first
        // run step is the explicit init, as in quickstart.sh.
        agent.ok(&["store", "init"]);
        agent
    }

    pub fn dir(&self) -> &Path {
        self.tokens.path()
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_warden"));
        cmd.env("SOFTHSM2_CONF", &self.tokens.conf)
            .env("RUST_LOG", "warn")
            .env("TSS2_LOG", "all+NONE")
            .arg("--config")
            .arg(&self.config)
            .args(args);
        super::swtpm::no_inherited_descriptors(&mut cmd);
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("warden runs")
    }

    /// Run and require success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "warden {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Run and require failure with exactly one line on stderr starting "warden: ".
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(!out.status.success(), "warden {args:?} should fail");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let lines: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("warden: "))
            .collect();
        assert_eq!(lines.len(), 1, "one-line error expected, got: {stderr}");
        lines[0].to_string()
    }

    /// Start `warden serve`; returns the child and the address it printed on its first line.
    pub fn serve(&self) -> (Child, String) {
        let mut child = self
            .command(&["serve"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("serve starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("listening line");
        let addr = line
            .trim()
            .strip_prefix("listening on https://")
            .unwrap_or_else(|| panic!("serve did not start: '{line}'"))
            .to_string();
        (child, addr)
    }
}
