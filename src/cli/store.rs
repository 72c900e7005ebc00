//! `warden store init`: the only command that creates a store.
//!
//! `serve` and every other command open an existing store and refuse a missing or empty one
//! (see `nfv_warden::store` "Creating and opening"): a store lost to a wrong path, a restore
//! gone wrong or a truncated file must stop the agent, not start a new history.

use super::*;

#[derive(Subcommand)]
pub(super) enum StoreCommand {
    /// Create a new, empty store at `store.path` (and its directory). Refuses to overwrite
    /// an existing file, whatever it holds.
    Init,
}

pub(super) fn run(cmd: StoreCommand, config: &Config) -> Result<ExitCode, Failure> {
    match cmd {
        StoreCommand::Init => {
            let store = Store::create(&config.store.path).map_err(|e| Failure::chain(&e))?;
            store
                .write(|tx| {
                    tx.audit(AuditEvent::new(actor(), "store.init", "store").with_detail(
                        serde_json::json!({ "schemaVersion": nfv_warden::store::SCHEMA_VERSION }),
                    ));
                    Ok(())
                })
                .map_err(|e| Failure::chain(&e))?;
            println!(
                "store {} created (schema version {})",
                store.path().display(),
                nfv_warden::store::SCHEMA_VERSION
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
