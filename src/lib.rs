//! nfv-warden: ETSI GS NFV-IFA 033 Security Manager (Sc-Or, Sc-Vi) and Certificate
//! Management Function (Cm-Vnfm), with every key held in a PKCS#11 HSM or a TPM 2.0.

pub mod api;
pub mod ca;
pub mod client;
pub mod cmf;
pub mod config;
pub mod error;
pub mod keys;
pub mod log_limit;
pub mod metrics;
pub mod ops;
pub mod pki;
pub mod probe;
pub mod sm;
pub mod sol;
pub mod store;
pub mod vim;
