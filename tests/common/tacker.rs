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

/// A second API process of the same Tacker (same database, same conductor over AMQP) whose
/// API pipeline authenticates with OAuth 2.0 Bearer tokens (keystonemiddleware's
/// `oauth2_token` filter in place of `authtoken`, as Tacker documents for OAuth 2.0 client
/// credentials) while the shared one keeps X-Auth-Token: the cloud's own Tacker is never
/// reconfigured. Stopped by its PID when dropped.
pub struct OAuth2Api {
    child: std::process::Child,
    pub url: String,
    _dir: tempfile::TempDir,
}

impl OAuth2Api {
    /// Its access log (tacker.wsgi lines: method, path, status).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("tacker-server.log")).unwrap_or_default()
    }

    pub fn start(tacker: &Tacker) -> OAuth2Api {
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = tacker.get("TACKER_CONF");
        let paste_path = std::path::Path::new(conf)
            .parent()
            .expect("tacker dir")
            .join("api-paste.ini");
        let paste = std::fs::read_to_string(&paste_path).expect("api-paste.ini");
        assert!(paste.contains(" authtoken keystonecontext"), "{paste}");
        let paste = paste.replace(" authtoken keystonecontext", " oauth2token keystonecontext")
            + "\n[filter:oauth2token]\n\
               paste.filter_factory = keystonemiddleware.oauth2_token:filter_factory\n";
        std::fs::write(dir.path().join("api-paste.ini"), paste).expect("paste");
        let port = super::openstack::free_ports(1)[0];
        std::fs::write(
            dir.path().join("oauth2.conf"),
            format!(
                "[DEFAULT]\nbind_port = {port}\napi_paste_config = {}\n",
                dir.path().join("api-paste.ini").display()
            ),
        )
        .expect("conf");
        let log = std::fs::File::create(dir.path().join("tacker-server.out")).expect("log");
        let venv = tacker.get("TACKER_VENV");
        let child = Command::new(format!("{venv}/bin/python3"))
            .arg(format!("{venv}/bin/tacker-server"))
            .arg("--config-file")
            .arg(conf)
            .arg("--config-file")
            .arg(dir.path().join("oauth2.conf"))
            .arg("--log-file")
            .arg(dir.path().join("tacker-server.log"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("tacker-server");
        let url = format!("http://127.0.0.1:{port}");
        let mut api = OAuth2Api {
            child,
            url,
            _dir: dir,
        };
        // Up when its version document answers (a bound bound: failure guard only).
        let end = std::time::Instant::now() + std::time::Duration::from_secs(180);
        loop {
            let up = Command::new("curl")
                .args(["-sf", "-o", "/dev/null", &format!("{}/", api.url)])
                .status()
                .is_ok_and(|s| s.success());
            if up {
                return api;
            }
            if let Ok(Some(status)) = api.child.try_wait() {
                panic!("the OAuth 2.0 Tacker API process exited: {status}");
            }
            assert!(
                std::time::Instant::now() < end,
                "the OAuth 2.0 Tacker API process did not answer"
            );
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
    }
}

impl Drop for OAuth2Api {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's PID; Tacker's graceful_shutdown_timeout bounds it.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let end = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while std::time::Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
