//! Making key-attestation vectors with a real swtpm and SoftHSM, for the attestation tests
//! and the CMF end-to-end tests: TPM2_Certify statements, bundles, CSRs signed inside the
//! TPM carrying the attestation, and X.509 key-attestation certificates issued by a
//! SoftHSM-held attester key.

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use der::{Decode, Encode};
use nfv_warden::cmf::attest::{
    tpm, x509, AttestationBundle, AttestationStatement, Attester, FormatOid, TPM2_CERTIFY_FORMAT,
    X509_KEY_CERTIFICATE_FORMAT,
};
use nfv_warden::keys::signer::{HardwareKey, HardwareSignature};
use nfv_warden::keys::tpm::TpmKeyStore;
use nfv_warden::keys::{CertifyEvidence, KeyAttestation, KeyRef, KeyStore};
use spki::SubjectPublicKeyInfoOwned;
use x509_cert::builder::profile::BuilderProfile;
use x509_cert::builder::{Builder, CertificateBuilder};
use x509_cert::ext::Extension;
use x509_cert::name::Name;
use x509_cert::request::CertReq;
use x509_cert::time::{Time, Validity};
use x509_cert::{Certificate, TbsCertificate};

/// How the statement carries the AK's signature.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignatureEncoding {
    /// TPMT_SIGNATURE, as the TPM returns it.
    Tpmt,
    /// RSA PKCS#1 v1.5 octets, or ECDSA as DER.
    Raw,
    /// ECDSA as r || s (RSA: same as `Raw`).
    RawRs,
}

pub fn tpm_format() -> FormatOid {
    FormatOid::from_str(TPM2_CERTIFY_FORMAT).expect("format OID")
}

pub fn x509_format() -> FormatOid {
    FormatOid::from_str(X509_KEY_CERTIFICATE_FORMAT).expect("format OID")
}

/// The registration a VNFM would make for this AK.
pub fn attester(ak_spki: &[u8], format: FormatOid, nonce: Option<&[u8]>) -> Attester {
    Attester {
        public_key_spki_der: ak_spki.to_vec(),
        format,
        expected_qualifying_data: nonce.map(<[u8]>::to_vec),
    }
}

/// Re-encode the TPMT_SIGNATURE of `evidence` as asked.
pub fn encode_signature(tpmt: &[u8], encoding: SignatureEncoding) -> Vec<u8> {
    if encoding == SignatureEncoding::Tpmt {
        return tpmt.to_vec();
    }
    let parsed = tpm::parse_tpmt_signature(tpmt)
        .expect("supported TPMT_SIGNATURE")
        .expect("a TPMT_SIGNATURE");
    if encoding == SignatureEncoding::RawRs && parsed.scheme.is_ecdsa() {
        let sig = p256::ecdsa::Signature::from_der(&parsed.bytes).expect("P-256 DER signature");
        sig.to_bytes().to_vec()
    } else {
        parsed.bytes
    }
}

/// A tcg-attest-tpm-certify `stmt` from evidence.
pub fn certify_statement(evidence: &CertifyEvidence, encoding: SignatureEncoding) -> Vec<u8> {
    tpm::encode_statement(
        &evidence.attest,
        &encode_signature(&evidence.signature, encoding),
        Some(&evidence.public_area),
    )
    .expect("statement")
}

/// Certify `key` with `ak` (nonce as qualifying data) and wrap it as a statement.
pub fn tpm_statement(
    store: &TpmKeyStore,
    key: &KeyRef,
    ak: &KeyRef,
    nonce: &[u8],
    encoding: SignatureEncoding,
) -> Vec<u8> {
    let evidence = store.certify(key, ak, nonce).expect("TPM2_Certify");
    certify_statement(&evidence, encoding)
}

/// A one-statement bundle.
pub fn bundle(format: FormatOid, stmt_der: Vec<u8>) -> AttestationBundle {
    AttestationBundle {
        statements: vec![AttestationStatement {
            format,
            stmt_der,
            hint: None,
        }],
        certs: Vec::new(),
    }
}

/// A CSR for `key`, signed by `key` inside its device, carrying `attestation` (when given)
/// as the id-aa-attestation attribute.
pub fn attested_csr(
    store: Arc<dyn KeyStore>,
    key: &KeyRef,
    subject: &str,
    attestation: Option<&AttestationBundle>,
) -> CertReq {
    nfv_warden::cmf::attest::make::csr_with_attestation(store, key, subject, attestation)
        .expect("CSR signed in the device")
}

/// The CSR's SubjectPublicKeyInfo DER.
pub fn csr_spki(csr: &CertReq) -> Vec<u8> {
    csr.info.public_key.to_der().expect("SPKI DER")
}

/// A real TPM2_Quote (type 0x8018) by `ak` over PCR 0, as (TPMS_ATTEST, TPMT_SIGNATURE).
/// Opens its own ESAPI context: the caller must have dropped every TpmKeyStore on this TPM
/// (swtpm serves one connection at a time).
pub fn quote(tcti: &str, ak: u32, nonce: &[u8]) -> (Vec<u8>, Vec<u8>) {
    use tss_esapi::handles::{KeyHandle, PersistentTpmHandle, TpmHandle};
    use tss_esapi::interface_types::algorithm::HashingAlgorithm;
    use tss_esapi::interface_types::session_handles::AuthSession;
    use tss_esapi::structures::{Data, PcrSelectionListBuilder, PcrSlot, SignatureScheme};
    use tss_esapi::traits::Marshall;

    let mut context =
        tss_esapi::Context::new(tss_esapi::TctiNameConf::from_str(tcti).expect("TCTI"))
            .expect("ESAPI context");
    let handle = context
        .execute_without_session(|c| {
            c.tr_from_tpm_public(TpmHandle::Persistent(
                PersistentTpmHandle::new(ak).expect("persistent handle"),
            ))
        })
        .expect("TR_FromTPMPublic");
    let pcrs = PcrSelectionListBuilder::new()
        .with_selection(HashingAlgorithm::Sha256, &[PcrSlot::Slot0])
        .build()
        .expect("PCR selection");
    let (attest, signature) = context
        .execute_with_session(Some(AuthSession::Password), |c| {
            c.quote(
                KeyHandle::from(handle),
                Data::try_from(nonce.to_vec()).expect("nonce"),
                SignatureScheme::Null,
                pcrs,
            )
        })
        .expect("TPM2_Quote");
    (
        attest.marshall().expect("TPMS_ATTEST"),
        signature.marshall().expect("TPMT_SIGNATURE"),
    )
}

/// A minimal end-entity profile for key-attestation certificates: subject and issuer names,
/// no extensions.
struct KeyCertificateProfile {
    subject: Name,
    issuer: Name,
}

impl BuilderProfile for KeyCertificateProfile {
    fn get_issuer(&self, _subject: &Name) -> Name {
        self.issuer.clone()
    }

    fn get_subject(&self) -> Name {
        self.subject.clone()
    }

    fn build_extensions(
        &self,
        _spk: spki::SubjectPublicKeyInfoRef<'_>,
        _issuer_spk: spki::SubjectPublicKeyInfoRef<'_>,
        _tbs: &TbsCertificate,
    ) -> x509_cert::builder::Result<Vec<Extension>> {
        Ok(Vec::new())
    }
}

/// An X.509 key-attestation certificate over `subject_spki`, signed inside the device by
/// `attester` (e.g. a SoftHSM key standing in for a YubiHSM attestation key), valid from
/// `not_before` to `not_after`.
pub fn key_certificate(
    attester: &HardwareKey,
    subject_spki: &[u8],
    not_before: SystemTime,
    not_after: SystemTime,
) -> Certificate {
    let time = |t: SystemTime| {
        Time::UtcTime(
            der::asn1::UtcTime::from_unix_duration(
                t.duration_since(UNIX_EPOCH).expect("after 1970"),
            )
            .expect("UTCTime"),
        )
    };
    let profile = KeyCertificateProfile {
        subject: Name::from_str("CN=attested key").expect("name"),
        issuer: Name::from_str("CN=test attester").expect("name"),
    };
    let spki = SubjectPublicKeyInfoOwned::from_der(subject_spki).expect("SPKI");
    let serial = nfv_warden::pki::random_serial().expect("serial");
    CertificateBuilder::new(
        profile,
        serial,
        Validity::new(time(not_before), time(not_after)),
        spki,
    )
    .expect("certificate builder")
    .build::<_, HardwareSignature>(attester)
    .expect("certificate signed in the device")
}

/// A key certificate valid from an hour ago for a day.
pub fn valid_key_certificate(attester: &HardwareKey, subject_spki: &[u8]) -> Certificate {
    let now = SystemTime::now();
    key_certificate(
        attester,
        subject_spki,
        now - Duration::from_secs(3600),
        now + Duration::from_secs(86_400),
    )
}

/// An X.509 key-attestation statement (leaf first).
pub fn x509_statement(chain: &[Certificate]) -> Vec<u8> {
    x509::encode_statement(chain).expect("statement")
}
