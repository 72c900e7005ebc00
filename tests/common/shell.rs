//! Running the other side's tools (openssl, the VNFM's part) in a test directory.

use std::path::Path;
use std::process::Command;

/// Run `script` with `sh -c` in `dir`; fail the test with its stderr if it fails.
pub fn sh(dir: &Path, script: &str) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .output()
        .expect("sh");
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
