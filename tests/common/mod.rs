#![allow(dead_code)]
pub mod attest;
pub mod softhsm;
pub mod suite;
pub mod swtpm;
