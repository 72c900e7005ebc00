//! A private swtpm per test.
//!
//! Each [`Swtpm`] runs its own `swtpm socket --tpm2` child (not `--daemon`, so it is reaped
//! with `wait` and never lingers as a zombie) on a state directory in a [`TempDir`], so tests
//! run in parallel and never share TPM state.
//!
//! Transport: TCP on 127.0.0.1, server port P and control port P+1, with P picked at random
//! below 32768 (ephemeral ports are handed to outgoing connections) and retried when taken.
//! A Unix socket would be nicer, but tss-esapi 7.7's `TctiNameConf` drops `path=` from
//! `swtpm:path=...` and would connect to localhost:2321 instead (fixed in tss-esapi 8).
#![allow(dead_code)]

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub struct Swtpm {
    dir: TempDir,
    port: u16,
    child: Option<Child>,
}

impl Swtpm {
    /// Start a fresh (unmanufactured, empty-auth) TPM.
    pub fn start() -> Swtpm {
        Swtpm::start_prepared(|_| {})
    }

    /// Start a TPM on a state directory that `prepare` fills first (e.g. `swtpm_setup`
    /// manufacturing it with EK certificates: tests/common/tpm_pki.rs).
    pub fn start_prepared(prepare: impl FnOnce(&Path)) -> Swtpm {
        let dir = tempfile::Builder::new()
            .prefix("swtpm-")
            .tempdir()
            .expect("temp dir");
        std::fs::create_dir_all(dir.path().join("tpm")).expect("state dir");
        prepare(&dir.path().join("tpm"));
        let mut last_error = String::new();
        for _ in 0..40 {
            let port = random_port();
            if !port_free(port) || !port_free(port + 1) {
                continue;
            }
            match spawn(dir.path(), port) {
                Ok(child) => {
                    return Swtpm {
                        dir,
                        port,
                        child: Some(child),
                    }
                }
                Err(e) => last_error = e,
            }
        }
        panic!("could not start swtpm: {last_error}");
    }

    /// TCTI string for tss-esapi.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("tpm")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGSTOP our swtpm (by its own PID): the TPM hangs, connections stay open and new ones
    /// are still accepted by the kernel, but nothing answers.
    pub fn stop(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT after [`Swtpm::stop`]: the TPM answers again, pending commands included.
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = self.pid().expect("swtpm is running");
        let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
        // SAFETY: plain kill(2) on the PID of our own child, which we have not reaped.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(
            rc,
            0,
            "kill({pid}, {signal}): {}",
            std::io::Error::last_os_error()
        );
    }

    /// SIGKILL our swtpm (by its own PID) and reap it: the TPM vanishes mid-flight.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start swtpm again on the same state and port (after `kill`): persistent objects and
    /// NV survive, transient objects and sessions do not.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match spawn(self.dir.path(), self.port) {
                Ok(child) => {
                    self.child = Some(child);
                    return;
                }
                Err(e) if Instant::now() > deadline => panic!("swtpm restart failed: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A stopped swtpm would not act on SIGTERM until continued.
            if let Ok(pid) = libc::pid_t::try_from(child.id()) {
                // SAFETY: plain kill(2) on the PID of a child we have not reaped yet.
                unsafe {
                    libc::kill(pid, libc::SIGCONT);
                }
            }
            // SIGTERM by PID (swtpm stops in ~10 ms), SIGKILL if it does not.
            if let Ok(pid) = libc::pid_t::try_from(child.id()) {
                // SAFETY: plain kill(2) on the PID of a child we have not reaped yet.
                unsafe {
                    libc::kill(pid, libc::SIGTERM);
                }
            }
            let deadline = Instant::now() + Duration::from_secs(2);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        }
    }
}

fn spawn(dir: &Path, port: u16) -> Result<Child, String> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("swtpm.log"))
        .map_err(|e| format!("log file: {e}"))?;
    let mut child = no_inherited_descriptors(&mut Command::new("swtpm"))
        .arg("socket")
        .arg("--tpm2")
        .arg("--tpmstate")
        .arg(format!("dir={}", dir.join("tpm").display()))
        .arg("--server")
        .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
        .arg("--ctrl")
        .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
        .arg("--flags")
        .arg("not-need-init,startup-clear")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot run swtpm: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("swtpm exited early ({status}), port {port} taken?"));
        }
        let up = |p: u16| TcpStream::connect(("127.0.0.1", p)).is_ok();
        if up(port) && up(port + 1) {
            // Still ours? A swtpm that lost the bind race exits within milliseconds.
            std::thread::sleep(Duration::from_millis(5));
            if let Ok(None) = child.try_wait() {
                return Ok(child);
            }
            continue;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("swtpm did not listen on port {port} within 10 s"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn random_port() -> u16 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    // Even ports in 20000..32000, so P+1 stays below 32768.
    20_000 + (hasher.finish() % 6_000) as u16 * 2
}

fn port_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// The command deadline of tests that are not about a hung TPM: a failure guard (as in
/// [`eventually`]), never what they check. The production default (5 s) is tripped on this
/// shared 2-core machine: a TPM2_GetCapability or TPM2_Sign next to an RSA-3072 key
/// generation of a parallel test took 4-5 s, and a test then failed with `Unavailable` in
/// the middle of its work. Tests of the deadline itself (tests/tpm_faults.rs) set their own.
pub const GUARD_DEADLINE_MS: u64 = 120_000;

/// The key-generation deadline of those tests, also a failure guard: swtpm's RSA-3072 prime
/// search took 2-17 s at a load average of 11 here, and over 120 s at 17-20.
pub const GUARD_KEYGEN_DEADLINE_MS: u64 = 600_000;

/// The agent config's `[[backend]]` block for a TPM at `tcti`, with the failure-guard
/// deadlines: tests that are not about deadlines must not trip the production 5 s one on a
/// loaded machine.
#[allow(dead_code)]
pub fn backend_toml(tcti: &str) -> String {
    format!(
        "\n[[backend]]\ntype = \"tpm\"\ntcti = \"{tcti}\"\n\
         command_timeout_ms = {GUARD_DEADLINE_MS}\nkeygen_timeout_ms = {GUARD_KEYGEN_DEADLINE_MS}\n"
    )
}

/// The agent's TPM backend configuration for a swtpm at `tcti`, with the default handles
/// and the guard deadlines.
pub fn tpm_config(tcti: &str) -> nfv_warden::config::TpmConfig {
    nfv_warden::config::TpmConfig {
        tcti: tcti.to_string(),
        storage_primary_handle: 0x8100_0001,
        key_handle_first: 0x8100_0100,
        key_handle_last: 0x8100_01ff,
        owner_auth: None,
        recovery_attempts: 4,
        command_timeout_ms: GUARD_DEADLINE_MS,
        keygen_timeout_ms: GUARD_KEYGEN_DEADLINE_MS,
        max_waiting_commands: 8,
    }
}

/// Poll `probe` until it gives a value; a generous bound (120 s) guards against a hang, it is
/// not what a test checks.
pub fn eventually<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Let a child started by a test inherit only its stdio.
///
/// Rust opens its own descriptors close-on-exec, but libtss2's swtpm TCTI does not: a process
/// started while a test of the same binary had a TPM command in flight inherited that TPM
/// connection, and swtpm (one connection at a time) then waited on it until the child
/// exited. Every descriptor above stderr is marked close-on-exec in the child, just before
/// exec (close_range(2), Linux 5.11).
pub fn no_inherited_descriptors(cmd: &mut std::process::Command) -> &mut std::process::Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec only async-signal-safe calls are allowed; close_range is
    // a plain system call.
    unsafe {
        cmd.pre_exec(|| {
            let rc = libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            let error = std::io::Error::last_os_error();
            match rc {
                0 => Ok(()),
                // An older kernel: the child inherits as before (the hazard, not a failure).
                _ if error.raw_os_error() == Some(libc::ENOSYS) => Ok(()),
                _ => Err(error),
            }
        })
    }
}
