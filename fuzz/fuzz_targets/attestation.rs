//! Key attestation decoders on arbitrary bytes: the `id-aa-attestation` bundle, and each
//! TPM 2.0 structure both on its own and as reached through a decoded bundle (statement,
//! TPMS_ATTEST, TPMT_PUBLIC with or without its TPM2B prefix, TPMT_SIGNATURE), plus the
//! X.509 key-certificate statement; and the parsers of the anchoring protocol (issue 10
//! §2): an AK's TPM2B_PUBLIC, an EK's public area against its certificate's key, the EK
//! certificate's SubjectPublicKeyInfo, certificates given as text, and the TPM2B wrappers of
//! a credential (credentialBlob, encryptedSecret) with a credential made for a fuzzed Name.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nfv_warden::cmf::attest::{anchor, credential, decode_bundle, tpm, x509};

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
    anchoring(data);
});

fn anchoring(data: &[u8]) {
    if let Ok(ak) = credential::parse_attestation_key(data) {
        let _ = tpm::canonical_spki(&ak.spki_der);
    }
    let _ = credential::parse_tpm2b(data);
    if let Ok(ek) = credential::EndorsementKey::from_spki(data) {
        // A credential for the input as a Name: the KDFs and encryption on hostile sizes.
        if let Ok(made) = credential::make_credential(&ek, data, &[0x42; 32]) {
            let _ = credential::parse_tpm2b(&made.credential_blob);
            let _ = credential::parse_tpm2b(&made.encrypted_secret);
        }
    }
    // An EK public area checked against a key taken from the rest of the input.
    let (public, spki) = data.split_at(data.len() / 2);
    let _ = credential::EndorsementKey::from_public_area(public, spki);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = anchor::certificates_from_text(&[text.to_string()], "fuzz");
    }
}

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
