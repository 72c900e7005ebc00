//! `warden check`: one line per check of configuration, secrets, devices, keys and store.
//!
//! While an agent runs, it holds the store (redb's exclusive lock) and the devices (a TPM
//! over swtpm's TCP interface serves one connection at a time), so the running agent runs
//! the checks with its own open store and devices, through the admin socket. Otherwise the
//! checks open them here.

use nfv_warden::ops::check::{self as checks, AgentCheck, CheckLine};

use super::*;

/// `warden check`: every check prints `ok` or `FAIL` with its subject. The exit status is
/// that of the gravest failure: 77 if a PIN or secret was refused or missing, 78 if the
/// configuration is wrong, else 1 if any check failed (see the module notes of `cli`).
pub(super) fn check(path: &Path) -> Result<ExitCode, Failure> {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            println!("FAIL config {e}");
            return Ok(FailureKind::Config.exit_code());
        }
    };
    let lines = match super::agent::running(&config) {
        Ok(Some(agent)) => {
            let answer: AgentCheck = agent.get("/ops/v1/check")?;
            println!(
                "checked by the running agent (pid {}) through {}",
                answer.pid,
                config.admin_socket().display()
            );
            answer.lines
        }
        Ok(None) => checks::offline(&config),
        Err(e) => vec![CheckLine {
            ok: false,
            what: e.message,
            authentication: false,
        }],
    };
    println!("ok   config {}", path.display());
    let mut failed: Option<FailureKind> = None;
    for line in &lines {
        println!("{} {}", if line.ok { "ok  " } else { "FAIL" }, line.what);
        if !line.ok {
            let kind = if line.authentication {
                FailureKind::Authentication
            } else {
                FailureKind::Other
            };
            failed = failed.max(Some(kind));
        }
    }
    Ok(match failed {
        Some(kind) => kind.exit_code(),
        None => ExitCode::SUCCESS,
    })
}
