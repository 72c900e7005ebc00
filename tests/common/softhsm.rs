//! A real SoftHSM2 token per test.
//!
//! SoftHSM reads `SOFTHSM2_CONF` once, at `C_Initialize`, and `C_Initialize` runs once per
//! process, so each test binary gets its own token directory (set before the library loads)
//! and each test its own token in it, with its own label and PIN file. Tests that need a
//! directory of their own (a restart, a re-initialized token) run the `warden` binary as a
//! child process with its own `SOFTHSM2_CONF`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

use nfv_warden::config::{Pkcs11Config, SecretSource};

pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

pub struct TokenDir {
    pub dir: tempfile::TempDir,
    pub conf: PathBuf,
}

impl TokenDir {
    pub fn new() -> TokenDir {
        let dir = tempfile::tempdir().expect("temp dir");
        let tokens = dir.path().join("tokens");
        std::fs::create_dir_all(&tokens).expect("token dir");
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .expect("softhsm2.conf");
        TokenDir { dir, conf }
    }

    /// Initialize a token with `label`; returns the user PIN file.
    pub fn init_token(&self, label: &str, pin: &str) -> PathBuf {
        let status = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &self.conf)
            .args(["--init-token", "--free", "--label", label, "--pin", pin])
            .args(["--so-pin", "so-secret"])
            .stdout(std::process::Stdio::null())
            .status()
            .expect("softhsm2-util runs");
        assert!(status.success(), "softhsm2-util --init-token {label}");
        let pin_file = self.dir.path().join(format!("{label}.pin"));
        std::fs::write(&pin_file, format!("{pin}\n")).expect("pin file");
        pin_file
    }

    /// Re-initialize an existing token in place (what an operator mistake would do).
    pub fn reinit_token(&self, label: &str, pin: &str) {
        let status = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &self.conf)
            .args([
                "--init-token",
                "--token",
                label,
                "--label",
                label,
                "--pin",
                pin,
            ])
            .args(["--so-pin", "so-secret"])
            .stdout(std::process::Stdio::null())
            .status()
            .expect("softhsm2-util runs");
        assert!(status.success(), "softhsm2-util re-init {label}");
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Tokens made for this test process before SoftHSM loads: SoftHSM lists the tokens of its
/// directory at C_Initialize and does not see tokens created after it.
const TOKENS_PER_PROCESS: usize = 24;

pub struct ProcessTokens {
    pub dir: TokenDir,
    next: AtomicU32,
}

/// The token directory of this test process; sets SOFTHSM2_CONF before first use.
pub fn process_tokens() -> &'static ProcessTokens {
    static DIR: OnceLock<ProcessTokens> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = TokenDir::new();
        for n in 0..TOKENS_PER_PROCESS {
            dir.init_token(&format!("test-token-{n}"), "1234");
        }
        // Safe: set once, before any thread of this process loads SoftHSM.
        std::env::set_var("SOFTHSM2_CONF", &dir.conf);
        ProcessTokens {
            dir,
            next: AtomicU32::new(0),
        }
    })
}

/// A token of its own for the calling test, and the config that opens it.
pub fn fresh_token(_name: &str) -> Pkcs11Config {
    let tokens = process_tokens();
    let n = tokens.next.fetch_add(1, Ordering::SeqCst) as usize;
    assert!(n < TOKENS_PER_PROCESS, "raise TOKENS_PER_PROCESS");
    let label = format!("test-token-{n}");
    let pin_file = tokens.dir.path().join(format!("{label}.pin"));
    config_for(&label, pin_file, 4)
}

pub fn config_for(label: &str, pin_file: PathBuf, pool_size: usize) -> Pkcs11Config {
    Pkcs11Config {
        module: PathBuf::from(MODULE),
        token_label: Some(label.to_string()),
        token_serial: None,
        pin: SecretSource::File(pin_file),
        pool_size,
        reinit_backoff_ms: 20,
        reinit_backoff_max_ms: 500,
        recovery_attempts: 4,
    }
}

/// Run `op` until the key layer gives a settled answer (a value, or a permanent error).
///
/// The PKCS#11 library is shared by every test of a process, and re-initializations are
/// rate-limited library-wide: right after an earlier step (or an earlier test) re-initialized
/// it, the layer answers a transient `Unavailable` ("next re-initialization in N ms"; 503 +
/// Retry-After for a client) until the window has passed. A test that checks what comes after
/// a re-initialization must wait that window out rather than depend on how long its previous
/// step happened to take. Any transient answer is retried; the bound only guards against a
/// layer that never settles.
#[allow(dead_code)]
pub fn settled<T>(
    mut op: impl FnMut() -> Result<T, nfv_warden::keys::KeyError>,
) -> Result<T, nfv_warden::keys::KeyError> {
    let give_up = std::time::Instant::now() + std::time::Duration::from_secs(90);
    loop {
        match op() {
            Err(e) if e.is_transient() && std::time::Instant::now() < give_up => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}
