//! The real Tacker VNFM on the real OpenStack of [`Cloud::shared`]: reused when the cloud's
//! directory already has `tacker.env` (the development cloud, `WARDEN_OPENSTACK`), otherwise
//! brought up there with `tests/peers/tacker-up.sh` (a self-started cloud stops it with the
//! cloud). Driven by `tests/peers/tacker-op.py`, one step per call.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use serde_json::Value;

use super::openstack::{peers_dir, read_env, Cloud};

pub struct Tacker {
    env: BTreeMap<String, String>,
}

static TACKER: OnceLock<Tacker> = OnceLock::new();

impl Tacker {
    pub fn shared() -> &'static Tacker {
        TACKER.get_or_init(|| {
            let cloud = Cloud::shared();
            let dir = &cloud.dir;
            let tacker_env = dir.join("tacker.env");
            if !tacker_env.exists() {
                let log = dir.join("tacker-up.log");
                let log_file = std::fs::File::create(&log).expect("tacker-up.log");
                let status = Command::new("bash")
                    .arg(peers_dir().join("tacker-up.sh"))
                    .arg(dir)
                    .stdin(Stdio::null())
                    .stdout(log_file.try_clone().expect("dup"))
                    .stderr(log_file)
                    .status()
                    .expect("run tests/peers/tacker-up.sh");
                assert!(
                    status.success(),
                    "tests/peers/tacker-up.sh {} failed ({status}); see {}",
                    dir.display(),
                    log.display()
                );
            }
            let mut env = cloud.env().clone();
            env.extend(read_env(&tacker_env).expect("tacker.env"));
            Tacker { env }
        })
    }

    pub fn get(&self, key: &str) -> &str {
        self.env.get(key).map(String::as_str).unwrap_or_default()
    }

    /// One `tacker-op.py` step; its JSON output. Panics with its stderr on failure.
    pub fn op(&self, args: &[&str]) -> Value {
        let output = Command::new("/usr/bin/python3")
            .arg(peers_dir().join("tacker-op.py"))
            .args(args)
            .envs(&self.env)
            .output()
            .expect("run tacker-op.py");
        assert!(
            output.status.success(),
            "tacker-op.py {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
            panic!(
                "tacker-op.py {args:?}: not JSON ({e}): {}",
                String::from_utf8_lossy(&output.stdout)
            )
        })
    }
}
