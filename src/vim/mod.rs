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
