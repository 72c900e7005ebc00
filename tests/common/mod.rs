//! Fixtures shared by the integration tests: real devices, no mocks.
#![allow(dead_code)]

pub mod swtpm;
