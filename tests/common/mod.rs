#![allow(dead_code)]
pub mod agent;
pub mod attest;
pub mod cmf;
pub mod nfvo;
pub mod openstack;
pub mod shell;
pub mod sm;
pub mod softhsm;
pub mod suite;
pub mod swtpm;
pub mod tacker;
pub mod tpm_pki;
