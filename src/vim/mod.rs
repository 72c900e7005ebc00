//! Sc-Vi (IFA 033 clause 8): the Security Manager as consumer of the VIM's Telemetry
//! Information Management interface, on OpenStack.
//!
//! - [`client`]: Keystone v3 authentication, catalog, microversions, paging.
//! - [`queries`]: the IFA 005/006 query operations of IFA 033 8.2.1.
//! - [`hostmap`]: location of servers (Sc-Vi.Telem.002) and the VNF -> VNFC -> server -> host
//!   map.

pub mod client;
pub mod hostmap;
pub mod queries;

pub use crate::config::VimConfig;
pub use client::{Service, TokenInfo, VimClient, VimError};
pub use hostmap::{host_map, HostMap, ServerLocation};
pub use queries::{query, Operation, QueryAnswer, QueryFilter};
pub mod admin;

use std::sync::Arc;

use crate::keys::backends::Backends;

/// The SM's link to its VIM: connects on first use and again after a failed connection, so
/// a VIM (or Keystone) down when the agent starts is a failed query, not a failed start; once
/// connected the client renews its own tokens.
pub struct VimLink {
    config: VimConfig,
    /// For `[sm.vim.client]` (a key in the HSM/TPM); `None` without one.
    backends: Option<Backends>,
    client: tokio::sync::Mutex<Option<VimClient>>,
}

impl VimLink {
    pub fn new(config: VimConfig, backends: Option<Backends>) -> VimLink {
        VimLink {
            config,
            backends,
            client: tokio::sync::Mutex::new(None),
        }
    }

    /// The connected client.
    pub async fn client(&self) -> Result<VimClient, VimError> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let c = VimClient::connect(&self.config, self.backends.as_ref()).await?;
        *slot = Some(c.clone());
        Ok(c)
    }

    pub fn config(&self) -> &VimConfig {
        &self.config
    }
}

/// Shared handle, as the SM holds it.
pub type SharedVimLink = Arc<VimLink>;
