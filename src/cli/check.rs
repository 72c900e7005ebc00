//! `warden check`: one line per check of configuration, secrets, devices, keys and store.
//!
//! While an agent runs, it holds the store (redb's exclusive lock) and the devices (a TPM
//! over swtpm's TCP interface serves one connection at a time), so the running agent runs
//! the checks with its own open store and devices, through the admin socket. Otherwise the
//! checks open them here.

use nfv_warden::ops::check::{self as checks, AgentCheck, CheckLine};

use super::*;

/// `warden check`: every check prints `ok` or `FAIL` with its subject; exit 1 if any failed.
pub(super) fn check(path: &Path) -> Result<ExitCode, Failure> {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            print_line(&CheckLine {
                ok: false,
                what: format!("config {e}"),
            });
            return Ok(ExitCode::FAILURE);
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
            what: e.0,
        }],
    };
    print_line(&CheckLine {
        ok: true,
        what: format!("config {}", path.display()),
    });
    let mut failed = false;
    for line in &lines {
        print_line(line);
        failed |= !line.ok;
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn print_line(line: &CheckLine) {
    println!("{} {}", if line.ok { "ok  " } else { "FAIL" }, line.what);
}
