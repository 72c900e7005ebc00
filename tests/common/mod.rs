#![allow(dead_code)]
pub mod softhsm;
pub mod suite;
pub mod swtpm;
