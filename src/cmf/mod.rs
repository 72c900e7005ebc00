//! Certificate Management Function (IFA 033 clause 11.2).

pub mod attest;
