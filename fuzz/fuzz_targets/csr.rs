//! PKCS#10 at the edge: `csr::verify` (strict DER, proof of possession, names, key type) on
//! arbitrary bytes, and the text form (PEM or base64) that the REST API accepts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nfv_warden::cmf::csr;

fuzz_target!(|data: &[u8]| {
    if let Ok(verified) = csr::verify(data) {
        // What the pipeline reads next from a verified CSR.
        let _ = verified.requested_names();
        let _ = verified.key_type.name();
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(der) = csr::csr_der_from_text(text) {
            let _ = csr::verify(&der);
        }
    }
});
