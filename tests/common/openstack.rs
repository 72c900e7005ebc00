//! A real OpenStack (Debian 12 packages, OpenStack Zed) for the tests that talk to a VIM or a
//! VNFM: one cloud per test binary, started on first use and stopped by PID when the test
//! process ends.
//!
//! - `WARDEN_OPENSTACK=DIR` reuses a cloud already brought up with
//!   `tests/peers/openstack-up.sh DIR` (it is never stopped by the tests; handy while
//!   developing, and CI may start one before `cargo test`).
//! - Otherwise `tests/peers/openstack-up.sh` runs in a fresh directory under the temp dir, on
//!   free loopback ports, with two fake compute hosts (`OS_COMPUTES=2`, migrations need two)
//!   and Aodh (`OS_AODH=1`, event alarms).
//!   It needs root (it installs the Debian packages on first use and runs MariaDB/RabbitMQ as
//!   plain processes). A watcher process (its own session) waits for this test process to exit
//!   and then runs `openstack-down.sh DIR --wipe`, which stops exactly the PIDs the up script
//!   recorded: the cloud is stopped even when a test panics or the harness is killed.
//!
//! Tests using the cloud must create uniquely named resources: several test binaries (and a
//! developer) may share one cloud through `WARDEN_OPENSTACK`.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// The running cloud: its scratch directory and the values of its `openstack.env`.
pub struct Cloud {
    pub dir: PathBuf,
    env: BTreeMap<String, String>,
    /// False when reused through `WARDEN_OPENSTACK` (then the tests never stop it).
    pub owned: bool,
}

static CLOUD: OnceLock<Cloud> = OnceLock::new();

/// The project's copies of the peer scripts (see tests/peers/README.md).
pub fn peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers")
}

impl Cloud {
    /// The cloud of this test binary, started on first call. Panics with the reason and the
    /// tail of the up log when it cannot be brought up: a test that needs the VIM must fail,
    /// never pass without it.
    pub fn shared() -> &'static Cloud {
        CLOUD.get_or_init(|| match std::env::var_os("WARDEN_OPENSTACK") {
            Some(dir) => Cloud::reuse(PathBuf::from(dir)),
            None => Cloud::start(),
        })
    }

    fn reuse(dir: PathBuf) -> Cloud {
        let env = read_env(&dir.join("openstack.env")).unwrap_or_else(|e| {
            panic!(
                "WARDEN_OPENSTACK={}: {e} (bring it up with tests/peers/openstack-up.sh first)",
                dir.display()
            )
        });
        Cloud {
            dir,
            env,
            owned: false,
        }
    }

    fn start() -> Cloud {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            panic!(
                "the OpenStack tests start a real OpenStack with tests/peers/openstack-up.sh, which needs root \
                 (it installs Debian packages and runs MariaDB/RabbitMQ); run the tests as root, or point \
                 WARDEN_OPENSTACK at a cloud already brought up with that script"
            );
        }
        let dir = std::env::temp_dir().join(format!("warden-openstack-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the cloud's scratch directory");
        let names = [
            "MYSQL_PORT",
            "AMQP_PORT",
            "AMQP_DIST_PORT",
            "EPMD_PORT",
            "KEYSTONE_PORT",
            "PLACEMENT_PORT",
            "GLANCE_PORT",
            "NOVA_PORT",
            "NEUTRON_PORT",
            "CINDER_PORT",
            "AODH_PORT",
        ];
        let ports = free_ports(names.len());
        // The watcher is started before the cloud, so a failure half-way still stops what did
        // start. It polls this process's PID; `openstack-down.sh` stops by the recorded PIDs
        // and start times only.
        let watcher = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; exec bash {down} {dir} --wipe",
            pid = std::process::id(),
            down = peers_dir().join("openstack-down.sh").display(),
            dir = dir.display(),
        );
        // `setsid --fork` returns at once; the watcher lives on in its own session.
        let forked = Command::new("setsid")
            .args(["--fork", "bash", "-c", &watcher])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("start the cloud's stop watcher (setsid)");
        assert!(forked.success(), "setsid --fork failed: {forked}");
        let log = dir.join("up.log");
        let log_file = std::fs::File::create(&log).expect("create up.log");
        let mut up = Command::new("bash");
        up.arg(peers_dir().join("openstack-up.sh"))
            .arg(&dir)
            .env("OS_COMPUTES", "2")
            .env("OS_AODH", "1")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("dup up.log"))
            .stderr(log_file);
        for (name, port) in names.iter().zip(&ports) {
            up.env(name, port.to_string());
        }
        let status = up.status().expect("run tests/peers/openstack-up.sh");
        if !status.success() {
            panic!(
                "tests/peers/openstack-up.sh {} failed ({status}); last lines of {}:\n{}",
                dir.display(),
                log.display(),
                tail(&log, 30)
            );
        }
        let env =
            read_env(&dir.join("openstack.env")).expect("openstack.env written by the up script");
        Cloud {
            dir,
            env,
            owned: true,
        }
    }

    /// A value of `openstack.env` (`KEYSTONE_URL`, `NOVA_URL`, `AMQP_URL`, `OS_PASSWORD`, ...).
    pub fn get(&self, key: &str) -> &str {
        self.env
            .get(key)
            .unwrap_or_else(|| panic!("{key} is not in {}/openstack.env", self.dir.display()))
    }

    pub fn env(&self) -> &BTreeMap<String, String> {
        &self.env
    }
}

/// `n` distinct loopback ports that were free a moment ago (all bound at once, then released).
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a loopback port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

/// Reads a shell env file of `KEY=VALUE` and `export A=B C=D` lines (what the peer scripts
/// write; values have no spaces or quotes).
pub fn read_env(path: &Path) -> Result<BTreeMap<String, String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut env = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        for word in line.split_whitespace() {
            if let Some((k, v)) = word.split_once('=') {
                env.insert(
                    k.to_string(),
                    v.trim_matches('"').trim_matches('\'').to_string(),
                );
            }
        }
    }
    Ok(env)
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
