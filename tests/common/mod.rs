#![allow(dead_code)]
pub mod softhsm;
pub mod suite;
