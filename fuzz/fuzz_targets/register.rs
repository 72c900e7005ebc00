//! The CMF's REST request bodies at the edge: `POST /certmgmt/v1/registrations` (Register,
//! with its keyAttestation envelopes: SPKI as PEM or base64 DER, format OID, base64
//! qualifying data) and `POST /certmgmt/v1/certificate_signing_requests` (the CSR as PEM or
//! base64 DER, then strict PKCS#10 decoding and proof of possession). The first byte picks
//! the body; the rest is the JSON as a client sends it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nfv_warden::cmf::issue::CsrRequest;
use nfv_warden::cmf::attest::{service::AttestationPolicy, Formats};
use nfv_warden::cmf::register::{check_attester_with, RegisterRequest};
use nfv_warden::cmf::{csr, CertType};

fuzz_target!(|data: &[u8]| {
    // The defaults: the built-in formats, no attestation roots.
    let (formats, policy) = (Formats::default(), AttestationPolicy::default());
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    if kind & 1 == 0 {
        if let Ok(request) = serde_json::from_slice::<RegisterRequest>(body) {
            let _ = CertType::parse(&request.cert_type);
            if let Some(attestation) = &request.key_attestation {
                let _ = check_attester_with(&formats, &policy, attestation);
            }
        }
    } else if let Ok(request) = serde_json::from_slice::<CsrRequest>(body) {
        let _ = CertType::parse(&request.cert_type);
        if let Ok(der) = csr::csr_der_from_text(&request.csr) {
            if let Ok(verified) = csr::verify(&der) {
                let _ = verified.requested_names();
            }
        }
    }
});
