//! Key attestation decoders on arbitrary bytes: the `id-aa-attestation` bundle, and each
//! TPM 2.0 structure both on its own and as reached through a decoded bundle (statement,
//! TPMS_ATTEST, TPMT_PUBLIC with or without its TPM2B prefix, TPMT_SIGNATURE), plus the
//! X.509 key-certificate statement.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nfv_warden::cmf::attest::{decode_bundle, tpm, x509};

fuzz_target!(|data: &[u8]| {
    if let Ok(bundle) = decode_bundle(data) {
        for statement in &bundle.statements {
            let _ = statement.format.to_der();
            let _ = x509::decode_statement(&statement.stmt_der);
            if let Ok(certify) = tpm::decode_statement(&statement.stmt_der) {
                tpm_parts(
                    &certify.tpm_s_attest,
                    &certify.signature,
                    certify.tpm_t_public.as_deref(),
                );
            }
        }
        let _ = bundle.to_der();
    }
    let _ = x509::decode_statement(data);
    if let Ok(certify) = tpm::decode_statement(data) {
        tpm_parts(
            &certify.tpm_s_attest,
            &certify.signature,
            certify.tpm_t_public.as_deref(),
        );
    }
    // The raw TPM structures, as if each were the whole input.
    tpm_parts(data, data, Some(data));
});

fn tpm_parts(attest: &[u8], signature: &[u8], public: Option<&[u8]>) {
    let _ = tpm::parse_certify_info(attest);
    let _ = tpm::parse_tpmt_signature(signature);
    if let Some(public) = public {
        let _ = tpm::name_of(public);
        if let Ok(parsed) = tpm::parse_public(tpm::strip_tpm2b(public)) {
            let _ = tpm::check_attributes(parsed.object_attributes);
            if let Ok(spki) = tpm::spki_of(&parsed.key) {
                let _ = tpm::canonical_spki(&spki);
            }
        }
    }
}
