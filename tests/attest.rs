//! Key attestation in CSRs (IFA 033 11.2.1) against the IETF sample, a real swtpm and a
//! real SoftHSM: every format passes with fresh vectors, and each check refuses its own
//! forgery with its own error.

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::attest::{self as vectors, SignatureEncoding};
use common::swtpm::Swtpm;
use der::asn1::SetOfVec;
use der::{Decode, Encode};
use nfv_warden::cmf::attest::{
    decode_bundle, tpm, verify_csr_attestation, verify_statement, AttestationError, Formats,
    Verified, ID_AA_ATTESTATION,
};
use nfv_warden::keys::pkcs11::Pkcs11KeyStore;
use nfv_warden::keys::signer::HardwareKey;
use nfv_warden::keys::tpm::TpmKeyStore;
use nfv_warden::keys::{KeyAlgorithm, KeyAttestation, KeyInfo, KeySpec, KeyStore};
use x509_cert::attr::Attribute;
use x509_cert::ext::pkix::ExtendedKeyUsage;
use x509_cert::request::CertReq;

const NONCE: &[u8] = b"nfv-warden nonce 0123456789";

/// A TPM with an attested key and an AK.
struct Fixture {
    store: Arc<TpmKeyStore>,
    key: KeyInfo,
    ak: KeyInfo,
    tpm: Swtpm,
}

impl Fixture {
    fn new(key: KeyAlgorithm, ak: KeyAlgorithm) -> Fixture {
        let tpm = Swtpm::start();
        let store =
            Arc::new(TpmKeyStore::open(&common::swtpm::tpm_config(&tpm.tcti())).expect("open"));
        let key = generate(&store, key);
        let ak = store
            .create_attestation_key(&KeySpec {
                label: "ak".to_string(),
                algorithm: ak,
            })
            .expect("create AK");
        Fixture {
            store,
            key,
            ak,
            tpm,
        }
    }

    fn statement(&self, encoding: SignatureEncoding) -> Vec<u8> {
        vectors::tpm_statement(
            &self.store,
            &self.key.reference,
            &self.ak.reference,
            NONCE,
            encoding,
        )
    }

    fn attester(&self) -> nfv_warden::cmf::attest::Attester {
        vectors::attester(
            &self.ak.public_key.spki_der,
            vectors::tpm_format(),
            Some(NONCE),
        )
    }

    /// Verify a statement as the attestation of `self.key`.
    fn verify(&self, stmt: Vec<u8>) -> Result<Verified, AttestationError> {
        let bundle = vectors::bundle(vectors::tpm_format(), stmt);
        verify_statement(
            &Formats::default(),
            &bundle.statements[0],
            &self.key.public_key.spki_der,
            &self.attester(),
        )
    }
}

fn generate(store: &TpmKeyStore, algorithm: KeyAlgorithm) -> KeyInfo {
    store
        .generate(&KeySpec {
            label: format!("attested-{algorithm}"),
            algorithm,
        })
        .expect("generate")
}

/// Round-trip a CSR through DER, as the CMF receives it.
fn received(csr: &CertReq) -> CertReq {
    CertReq::from_der(&csr.to_der().expect("CSR DER")).expect("CSR decodes")
}

fn tpm_verified() -> Verified {
    Verified {
        format: vectors::tpm_format(),
        tpm_fixed: true,
        tpm_residency: true,
    }
}

// ----------------------------------------------------------------------------------------
// The IETF sample

#[test]
fn ietf_sample_statement_verifies() {
    let pem = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/attestation/tcgAttestTpmCertify.pem"
    ))
    .expect("sample CSR");
    let (label, der) = der::pem::decode_vec(pem.as_bytes()).expect("PEM");
    assert_eq!(label, "CERTIFICATE REQUEST");
    let csr = CertReq::from_der(&der).expect("CSR");
    let attribute = csr
        .info
        .attributes
        .iter()
        .find(|a| a.oid == ID_AA_ATTESTATION)
        .expect("attestation attribute");
    let bundle =
        decode_bundle(&attribute.values.get(0).unwrap().to_der().unwrap()).expect("bundle decodes");
    assert_eq!(bundle.statements.len(), 1);
    assert_eq!(bundle.statements[0].format, vectors::tpm_format());
    assert_eq!(
        bundle.statements[0].hint.as_deref(),
        Some("tpmverifier.example.com")
    );
    // The AK: the certificate in `certs` with EKU tcg-kp-AIKCertificate (2.23.133.8.3).
    const TCG_KP_AIK: der::oid::ObjectIdentifier =
        der::oid::ObjectIdentifier::new_unwrap("2.23.133.8.3");
    let ak = bundle
        .certs
        .iter()
        .find(|cert| {
            cert.tbs_certificate()
                .extensions()
                .into_iter()
                .flatten()
                .any(|ext| {
                    ext.extn_id == const_oid::db::rfc5280::ID_CE_EXT_KEY_USAGE
                        && ExtendedKeyUsage::from_der(ext.extn_value.as_bytes())
                            .is_ok_and(|eku| eku.0.contains(&TCG_KP_AIK))
                })
        })
        .expect("AK certificate in certs");
    let ak_spki = ak
        .tbs_certificate()
        .subject_public_key_info()
        .to_der()
        .unwrap();
    let csr_spki = csr.info.public_key.to_der().unwrap();
    let attester = vectors::attester(
        &ak_spki,
        vectors::tpm_format(),
        Some(&[0x00, 0xff, 0x55, 0xaa]),
    );
    let formats = Formats::default();
    assert_eq!(
        verify_statement(&formats, &bundle.statements[0], &csr_spki, &attester),
        Ok(tpm_verified())
    );
    assert_eq!(
        verify_csr_attestation(&formats, &csr.info.attributes, &csr_spki, &attester),
        Ok(tpm_verified())
    );
    // Another nonce registered: refused.
    let other = vectors::attester(&ak_spki, vectors::tpm_format(), Some(b"other"));
    assert_eq!(
        verify_statement(&formats, &bundle.statements[0], &csr_spki, &other),
        Err(AttestationError::QualifyingData)
    );
}

// ----------------------------------------------------------------------------------------
// Fresh swtpm vectors

/// Both attested key types, raw and TPMT_SIGNATURE encodings, with an AK of `ak_algorithm`;
/// then real CSRs signed inside the TPM carrying the attestation.
fn fresh_vectors(ak_algorithm: KeyAlgorithm) {
    let tpm = Swtpm::start();
    let store = Arc::new(TpmKeyStore::open(&common::swtpm::tpm_config(&tpm.tcti())).expect("open"));
    let ak = store
        .create_attestation_key(&KeySpec {
            label: "ak".to_string(),
            algorithm: ak_algorithm,
        })
        .expect("create AK");
    // The AK is restricted: it cannot sign arbitrary data such as a CSR.
    assert!(store
        .sign(
            &ak.reference,
            ak_algorithm.default_scheme(),
            b"not a TPM structure"
        )
        .is_err());
    let attester = vectors::attester(&ak.public_key.spki_der, vectors::tpm_format(), Some(NONCE));
    let formats = Formats::default();
    for algorithm in [KeyAlgorithm::EcP256, KeyAlgorithm::Rsa2048] {
        let key = generate(&store, algorithm);
        for encoding in [
            SignatureEncoding::Tpmt,
            SignatureEncoding::Raw,
            SignatureEncoding::RawRs,
        ] {
            let stmt =
                vectors::tpm_statement(&store, &key.reference, &ak.reference, NONCE, encoding);
            let bundle = vectors::bundle(vectors::tpm_format(), stmt);
            assert_eq!(
                verify_statement(
                    &formats,
                    &bundle.statements[0],
                    &key.public_key.spki_der,
                    &attester
                ),
                Ok(tpm_verified()),
                "{algorithm} key, {ak_algorithm} AK, {encoding:?}"
            );
        }
        // A real CSR, signed inside the TPM by the attested key.
        let stmt = vectors::tpm_statement(
            &store,
            &key.reference,
            &ak.reference,
            NONCE,
            SignatureEncoding::Tpmt,
        );
        let bundle = vectors::bundle(vectors::tpm_format(), stmt);
        let csr = received(&vectors::attested_csr(
            store.clone(),
            &key.reference,
            "CN=vnf-1",
            Some(&bundle),
        ));
        let csr_spki = vectors::csr_spki(&csr);
        assert_eq!(csr_spki, key.public_key.spki_der);
        nfv_warden::pki::verify_signature(
            &csr_spki,
            &csr.algorithm,
            &csr.info.to_der().unwrap(),
            csr.signature.as_bytes().unwrap(),
        )
        .expect("CSR self-signature verifies");
        assert_eq!(
            verify_csr_attestation(&formats, &csr.info.attributes, &csr_spki, &attester),
            Ok(tpm_verified()),
            "CSR of a {algorithm} key"
        );
    }
    assert_eq!(store.transient_handle_count().unwrap(), 0);
}

#[test]
fn fresh_vectors_with_ecc_ak() {
    fresh_vectors(KeyAlgorithm::EcP256);
}

#[test]
fn fresh_vectors_with_rsa_ak() {
    fresh_vectors(KeyAlgorithm::Rsa2048);
}

#[test]
fn tpm2b_prefixed_public_area_is_tolerated() {
    let f = Fixture::new(KeyAlgorithm::EcP256, KeyAlgorithm::EcP256);
    let evidence = f
        .store
        .certify(&f.key.reference, &f.ak.reference, NONCE)
        .unwrap();
    let mut prefixed = (evidence.public_area.len() as u16).to_be_bytes().to_vec();
    prefixed.extend_from_slice(&evidence.public_area);
    let stmt =
        tpm::encode_statement(&evidence.attest, &evidence.signature, Some(&prefixed)).unwrap();
    assert_eq!(f.verify(stmt), Ok(tpm_verified()));
}

// ----------------------------------------------------------------------------------------
// One forgery per check

#[test]
fn tampered_attest_is_refused() {
    let f = Fixture::new(KeyAlgorithm::EcP256, KeyAlgorithm::EcP256);
    let evidence = f
        .store
        .certify(&f.key.reference, &f.ak.reference, NONCE)
        .unwrap();
    let mut attest = evidence.attest.clone();
    // The last octet of attested.certify.qualifiedName: magic and type stay intact.
    *attest.last_mut().unwrap() ^= 1;
    let stmt =
        tpm::encode_statement(&attest, &evidence.signature, Some(&evidence.public_area)).unwrap();
    assert_eq!(f.verify(stmt), Err(AttestationError::BadSignature));
    let mut magic = evidence.attest.clone();
    magic[0] = 0;
    let stmt =
        tpm::encode_statement(&magic, &evidence.signature, Some(&evidence.public_area)).unwrap();
    assert_eq!(
        f.verify(stmt),
        Err(AttestationError::BadMagic { found: 0x0054_4347 })
    );
}

#[test]
fn attestation_signed_by_another_key_is_refused() {
    let f = Fixture::new(KeyAlgorithm::EcP256, KeyAlgorithm::EcP256);
    let other_ak = f
        .store
        .create_attestation_key(&KeySpec {
            label: "other ak".to_string(),
            algorithm: KeyAlgorithm::EcP256,
        })
        .unwrap();
    let stmt = vectors::tpm_statement(
        &f.store,
        &f.key.reference,
        &other_ak.reference,
        NONCE,
        SignatureEncoding::Tpmt,
    );
    assert_eq!(f.verify(stmt), Err(AttestationError::BadSignature));
    // Raw encoding too.
    let stmt = vectors::tpm_statement(
        &f.store,
        &f.key.reference,
        &other_ak.reference,
        NONCE,
        SignatureEncoding::RawRs,
    );
    assert_eq!(f.verify(stmt), Err(AttestationError::BadSignature));
}

#[test]
fn public_area_of_another_key_is_refused() {
    let f = Fixture::new(KeyAlgorithm::EcP256, KeyAlgorithm::EcP256);
    let other = generate(&f.store, KeyAlgorithm::EcP256);
    let evidence = f
        .store
        .certify(&f.key.reference, &f.ak.reference, NONCE)
        .unwrap();
    let other_evidence = f
        .store
        .certify(&other.reference, &f.ak.reference, NONCE)
        .unwrap();
    let stmt = tpm::encode_statement(
        &evidence.attest,
        &evidence.signature,
        Some(&other_evidence.public_area),
    )
    .unwrap();
    // Checked against the other key's SPKI, so only the Name check can catch it.
    let bundle = vectors::bundle(vectors::tpm_format(), stmt);
    assert_eq!(
        verify_statement(
            &Formats::default(),
            &bundle.statements[0],
            &other.public_key.spki_der,
            &f.attester()
        ),
        Err(AttestationError::NameMismatch)
    );
}

#[test]
fn csr_for_another_key_is_refused() {
    let f = Fixture::new(KeyAlgorithm::EcP256, KeyAlgorithm::EcP256);
    let other = generate(&f.store, KeyAlgorithm::EcP256);
    let bundle = vectors::bundle(vectors::tpm_format(), f.statement(SignatureEncoding::Tpmt));
    // A valid attestation of `key`, in a CSR for (and signed by) `other`.
    let csr = received(&vectors::attested_csr(
        f.store.clone(),
        &other.reference,
        "CN=vnf-1",
        Some(&bundle),
    ));
    assert_eq!(
        verify_csr_attestation(
            &Formats::default(),
            &csr.info.attributes,
            &vectors::csr_spki(&csr),
            &f.attester()
        ),
        Err(AttestationError::KeyMismatch)
    );
}

#[test]
fn key_without_fixed_tpm_is_refused() {
    let f = Fixture::new(KeyAlgorithm::EcP256, KeyAlgorithm::EcP256);
    // sensitiveDataOrigin | userWithAuth | sign: a duplicable key (fixedTPM, fixedParent
    // clear) that could have been exported from this TPM.
    let duplicable = f
        .store
        .generate_with_attributes(
            &KeySpec {
                label: "duplicable".to_string(),
                algorithm: KeyAlgorithm::EcP256,
            },
            tpm::SENSITIVE_DATA_ORIGIN | 0x40 | tpm::SIGN,
        )
        .expect("duplicable key");
    assert_eq!(
        f.store.object_attributes(&duplicable.reference).unwrap()
            & (tpm::FIXED_TPM | tpm::FIXED_PARENT),
        0
    );
    let stmt = vectors::tpm_statement(
        &f.store,
        &duplicable.reference,
        &f.ak.reference,
        NONCE,
        SignatureEncoding::Tpmt,
    );
    let bundle = vectors::bundle(vectors::tpm_format(), stmt);
    assert_eq!(
        verify_statement(
            &Formats::default(),
            &bundle.statements[0],
            &duplicable.public_key.spki_der,
            &f.attester()
        ),
        Err(AttestationError::Attributes {
            missing: vec!["fixedTPM", "fixedParent"],
            forbidden: vec![],
        })
    );
}

#[test]
fn quote_instead_of_certify_is_refused() {
    let f = Fixture::new(KeyAlgorithm::EcP256, KeyAlgorithm::EcP256);
    let public_area = f
        .store
        .certify(&f.key.reference, &f.ak.reference, NONCE)
        .unwrap()
        .public_area;
    let attester = f.attester();
    let ak_handle = match f.ak.reference {
        nfv_warden::keys::KeyRef::Tpm(handle) => handle.0,
        _ => unreachable!(),
    };
    let Fixture {
        store, tpm, key, ..
    } = f;
    // swtpm serves one connection: close the key store's before opening our own.
    drop(store);
    let (attest, signature) = vectors::quote(&tpm.tcti(), ak_handle, NONCE);
    let stmt = tpm::encode_statement(&attest, &signature, Some(&public_area)).unwrap();
    let bundle = vectors::bundle(vectors::tpm_format(), stmt);
    assert_eq!(
        verify_statement(
            &Formats::default(),
            &bundle.statements[0],
            &key.public_key.spki_der,
            &attester
        ),
        Err(AttestationError::NotCertify { found: 0x8018 })
    );
}

#[test]
fn missing_public_area_is_refused() {
    let f = Fixture::new(KeyAlgorithm::EcP256, KeyAlgorithm::EcP256);
    let evidence = f
        .store
        .certify(&f.key.reference, &f.ak.reference, NONCE)
        .unwrap();
    let stmt = tpm::encode_statement(&evidence.attest, &evidence.signature, None).unwrap();
    assert_eq!(f.verify(stmt), Err(AttestationError::MissingPublicKey));
}

#[test]
fn wrong_qualifying_data_is_refused() {
    let f = Fixture::new(KeyAlgorithm::EcP256, KeyAlgorithm::EcP256);
    let stmt = vectors::tpm_statement(
        &f.store,
        &f.key.reference,
        &f.ak.reference,
        b"a stale nonce",
        SignatureEncoding::Tpmt,
    );
    assert_eq!(f.verify(stmt), Err(AttestationError::QualifyingData));
}

#[test]
fn statement_type_other_than_registered_is_refused() {
    let f = Fixture::new(KeyAlgorithm::EcP256, KeyAlgorithm::EcP256);
    let bundle = vectors::bundle(vectors::tpm_format(), f.statement(SignatureEncoding::Tpmt));
    let registered_x509 = vectors::attester(
        &f.ak.public_key.spki_der,
        vectors::x509_format(),
        Some(NONCE),
    );
    assert_eq!(
        verify_statement(
            &Formats::default(),
            &bundle.statements[0],
            &f.key.public_key.spki_der,
            &registered_x509
        ),
        Err(AttestationError::WrongType {
            found: vectors::tpm_format(),
            registered: vectors::x509_format(),
        })
    );
    // An alias the configuration does not know.
    let unknown: nfv_warden::cmf::attest::FormatOid = "1.3.6.1.4.1.99999.7".parse().unwrap();
    let bundle = vectors::bundle(unknown.clone(), f.statement(SignatureEncoding::Tpmt));
    let registered_unknown =
        vectors::attester(&f.ak.public_key.spki_der, unknown.clone(), Some(NONCE));
    assert_eq!(
        verify_statement(
            &Formats::default(),
            &bundle.statements[0],
            &f.key.public_key.spki_der,
            &registered_unknown
        ),
        Err(AttestationError::UnknownFormat(unknown.clone()))
    );
    // Once configured as an alias of TPM Certify, it verifies.
    let formats =
        Formats::default().with_alias(unknown, nfv_warden::cmf::attest::VerifierKind::Tpm2Certify);
    assert!(verify_statement(
        &formats,
        &bundle.statements[0],
        &f.key.public_key.spki_der,
        &registered_unknown
    )
    .is_ok());
}

#[test]
fn attribute_count_rules() {
    let f = Fixture::new(KeyAlgorithm::EcP256, KeyAlgorithm::EcP256);
    let bundle = vectors::bundle(vectors::tpm_format(), f.statement(SignatureEncoding::Tpmt));
    let csr = received(&vectors::attested_csr(
        f.store.clone(),
        &f.key.reference,
        "CN=vnf-1",
        Some(&bundle),
    ));
    let spki = vectors::csr_spki(&csr);
    let formats = Formats::default();
    assert!(verify_csr_attestation(&formats, &csr.info.attributes, &spki, &f.attester()).is_ok());

    // No attestation.
    let plain = received(&vectors::attested_csr(
        f.store.clone(),
        &f.key.reference,
        "CN=vnf-1",
        None,
    ));
    assert_eq!(
        verify_csr_attestation(&formats, &plain.info.attributes, &spki, &f.attester()),
        Err(AttestationError::Missing)
    );

    // A second bundle (differing by a hint) in a second attribute, then as a second value.
    let mut second = bundle.clone();
    second.statements[0].hint = Some("second".to_string());
    let second_value = der::Any::encode_from(&second).unwrap();
    let mut two_attributes = csr.info.attributes.clone();
    two_attributes
        .insert(Attribute {
            oid: ID_AA_ATTESTATION,
            values: SetOfVec::try_from(vec![second_value.clone()]).unwrap(),
        })
        .unwrap();
    assert_eq!(
        verify_csr_attestation(&formats, &two_attributes, &spki, &f.attester()),
        Err(AttestationError::MoreThanOneAttribute { count: 2 })
    );
    let first_value = der::Any::encode_from(&bundle).unwrap();
    let two_values: x509_cert::attr::Attributes = SetOfVec::try_from(vec![Attribute {
        oid: ID_AA_ATTESTATION,
        values: SetOfVec::try_from(vec![first_value, second_value]).unwrap(),
    }])
    .unwrap();
    assert_eq!(
        verify_csr_attestation(&formats, &two_values, &spki, &f.attester()),
        Err(AttestationError::MoreThanOneValue { count: 2 })
    );

    // Two statements in one bundle.
    let mut two_statements = bundle.clone();
    two_statements.statements.push(second.statements[0].clone());
    let value = der::Any::encode_from(&two_statements).unwrap();
    let attributes: x509_cert::attr::Attributes = SetOfVec::try_from(vec![Attribute {
        oid: ID_AA_ATTESTATION,
        values: SetOfVec::try_from(vec![value]).unwrap(),
    }])
    .unwrap();
    assert_eq!(
        verify_csr_attestation(&formats, &attributes, &spki, &f.attester()),
        Err(AttestationError::MoreThanOneStatement { count: 2 })
    );
}

// ----------------------------------------------------------------------------------------
// X.509 key-attestation certificates, attester key in SoftHSM

struct HsmFixture {
    store: Arc<Pkcs11KeyStore>,
    attester_key: HardwareKey,
    subject: KeyInfo,
}

impl HsmFixture {
    fn new() -> HsmFixture {
        let store = Arc::new(
            Pkcs11KeyStore::open(&common::softhsm::fresh_token("attest")).expect("open token"),
        );
        let attester = store
            .generate(&KeySpec {
                label: "attester".to_string(),
                algorithm: KeyAlgorithm::EcP256,
            })
            .unwrap();
        let subject = store
            .generate(&KeySpec {
                label: "subject".to_string(),
                algorithm: KeyAlgorithm::EcP256,
            })
            .unwrap();
        let attester_key = HardwareKey::new(store.clone(), attester.reference).unwrap();
        HsmFixture {
            store,
            attester_key,
            subject,
        }
    }

    fn attester(&self) -> nfv_warden::cmf::attest::Attester {
        vectors::attester(
            &self.attester_key.public_key().spki_der,
            vectors::x509_format(),
            None,
        )
    }

    fn csr_with(&self, stmt: Vec<u8>) -> CertReq {
        let bundle = vectors::bundle(vectors::x509_format(), stmt);
        received(&vectors::attested_csr(
            self.store.clone(),
            &self.subject.reference,
            "CN=vnf-hsm",
            Some(&bundle),
        ))
    }

    fn verify(&self, csr: &CertReq) -> Result<Verified, AttestationError> {
        verify_csr_attestation(
            &Formats::default(),
            &csr.info.attributes,
            &vectors::csr_spki(csr),
            &self.attester(),
        )
    }
}

#[test]
fn x509_key_certificate_verifies() {
    let h = HsmFixture::new();
    let cert = vectors::valid_key_certificate(&h.attester_key, &h.subject.public_key.spki_der);
    let csr = h.csr_with(vectors::x509_statement(&[cert]));
    assert_eq!(
        h.verify(&csr),
        Ok(Verified {
            format: vectors::x509_format(),
            tpm_fixed: false,
            tpm_residency: false,
        })
    );
}

#[test]
fn x509_key_certificate_by_another_key_is_refused() {
    let h = HsmFixture::new();
    let other = h
        .store
        .generate(&KeySpec {
            label: "other attester".to_string(),
            algorithm: KeyAlgorithm::EcP256,
        })
        .unwrap();
    let other = HardwareKey::new(h.store.clone(), other.reference).unwrap();
    let cert = vectors::valid_key_certificate(&other, &h.subject.public_key.spki_der);
    let csr = h.csr_with(vectors::x509_statement(&[cert]));
    assert_eq!(h.verify(&csr), Err(AttestationError::BadSignature));
}

#[test]
fn x509_key_certificate_for_another_key_is_refused() {
    let h = HsmFixture::new();
    let other = h
        .store
        .generate(&KeySpec {
            label: "other subject".to_string(),
            algorithm: KeyAlgorithm::EcP256,
        })
        .unwrap();
    let cert = vectors::valid_key_certificate(&h.attester_key, &other.public_key.spki_der);
    let csr = h.csr_with(vectors::x509_statement(&[cert]));
    assert_eq!(h.verify(&csr), Err(AttestationError::KeyMismatch));
}

#[test]
fn expired_x509_key_certificate_is_refused() {
    let h = HsmFixture::new();
    let now = SystemTime::now();
    let cert = vectors::key_certificate(
        &h.attester_key,
        &h.subject.public_key.spki_der,
        now - Duration::from_secs(2 * 86_400),
        now - Duration::from_secs(86_400),
    );
    let csr = h.csr_with(vectors::x509_statement(&[cert]));
    assert!(
        matches!(h.verify(&csr), Err(AttestationError::Expired { .. })),
        "{:?}",
        h.verify(&csr)
    );
}

// ----------------------------------------------------------------------------------------
// Anchoring in a TPM PKI and freshness, end to end over the CMF's REST API (issue 10 §2):
// a swtpm manufactured with an EK certificate by swtpm-localca (the test manufacturer
// root), the TPM's side run with tpm2-tools.

mod anchored {
    use super::*;
    use base64::Engine;
    use common::cmf::CmfAgent;
    use common::tpm_pki::ManufacturedTpm;
    use nfv_warden::client::{ClientResponse, Connection};
    use nfv_warden::cmf::attest::AttestationBundle;
    use nfv_warden::keys::KeyRef;
    use serde_json::json;
    use spki::EncodePublicKey;

    const REGISTRATIONS: &str = "/certmgmt/v1/registrations";
    const CSRS: &str = "/certmgmt/v1/certificate_signing_requests";
    const TCG_POLICIES: [&str; 2] = ["2.23.133.11.1.1", "2.23.133.11.1.2"];

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    fn unb64(text: &str) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .expect("base64")
    }

    fn handle(key: &KeyInfo) -> u32 {
        match &key.reference {
            KeyRef::Tpm(handle) => handle.0,
            other => panic!("not a TPM key: {other}"),
        }
    }

    fn pem_public(spki: &[u8]) -> String {
        nfv_warden::pki::to_pem("PUBLIC KEY", spki).unwrap()
    }

    fn agent_with(roots: &[&std::path::Path], extra: &str) -> CmfAgent {
        let roots: Vec<String> = roots
            .iter()
            .map(|p| format!("\"{}\"", p.display()))
            .collect();
        let mut agent = CmfAgent::new(&format!(
            "[cmf.attestation]\nroots = [{}]\n{extra}\n",
            roots.join(", ")
        ));
        agent.start();
        agent
    }

    fn register_body(subject: &str, attester_pem: &str, chain: &[String]) -> serde_json::Value {
        json!({
            "certType": "VNFCI_CERT",
            "subjectIds": [subject],
            "typeOfVnfcCertHandling": "DELEGATION_MODE",
            "keyAttestation": {
                "attesterPublicKey": attester_pem,
                "formatOid": "2.23.133.20.1",
                "akCertificateChain": chain,
            },
        })
    }

    async fn register(vnfm: &mut Connection, body: &serde_json::Value) -> serde_json::Value {
        let created = vnfm.post_json(REGISTRATIONS, body).await.unwrap();
        assert_eq!(created.status, 201, "{}", created.problem_detail());
        created.json().unwrap()
    }

    async fn nonce(vnfm: &mut Connection, registration: &str) -> Vec<u8> {
        let response = vnfm
            .post_json(
                &format!("{REGISTRATIONS}/{registration}/attestation_nonces"),
                &json!({}),
            )
            .await
            .unwrap();
        assert_eq!(response.status, 201, "{}", response.problem_detail());
        let body = response.json().unwrap();
        assert!(body["expiresAt"].as_str().unwrap().ends_with('Z'));
        unb64(body["nonce"].as_str().unwrap())
    }

    /// A CSR for `key`, signed in the TPM, carrying a TPM2_Certify by `ak` over `nonce`
    /// (and `certs` in the bundle): PEM.
    fn certified_csr(
        store: &Arc<TpmKeyStore>,
        key: &KeyInfo,
        ak: &KeyInfo,
        nonce: &[u8],
        certs: Vec<x509_cert::Certificate>,
        subject: &str,
    ) -> String {
        let stmt = vectors::tpm_statement(
            store,
            &key.reference,
            &ak.reference,
            nonce,
            SignatureEncoding::Tpmt,
        );
        let mut bundle: AttestationBundle = vectors::bundle(vectors::tpm_format(), stmt);
        bundle.certs = certs;
        let csr = vectors::attested_csr(
            store.clone(),
            &key.reference,
            &format!("CN={subject}"),
            Some(&bundle),
        );
        nfv_warden::pki::to_pem("CERTIFICATE REQUEST", &csr.to_der().unwrap()).unwrap()
    }

    async fn post_csr(vnfm: &mut Connection, subject: &str, csr: &str) -> ClientResponse {
        vnfm.post_json(
            CSRS,
            &json!({ "vnfcId": subject, "certType": "VNFCI_CERT", "certChainRequest": false, "csr": csr }),
        )
        .await
        .unwrap()
    }

    /// The certificate policies of an issued certificate (none: empty).
    fn policies(issued: &serde_json::Value) -> Vec<String> {
        use x509_cert::ext::pkix::CertificatePolicies;
        let leaf = nfv_warden::pki::certificates_from_pem(issued["certificate"].as_str().unwrap())
            .unwrap()
            .remove(0);
        leaf.tbs_certificate()
            .get_extension::<CertificatePolicies>()
            .unwrap()
            .map(|(_, p)| {
                p.0.iter()
                    .map(|p| p.policy_identifier.to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    async fn challenge(
        vnfm: &mut Connection,
        registration: &str,
        ek_certificate: &[u8],
        chain: &[String],
        ak_public: &[u8],
    ) -> ClientResponse {
        vnfm.post_json(
            &format!("{REGISTRATIONS}/{registration}/ak_challenges"),
            &json!({
                "ekCertificate": b64(ek_certificate),
                "ekCertificateChain": chain,
                "akPublic": b64(ak_public),
            }),
        )
        .await
        .unwrap()
    }

    async fn answer(
        vnfm: &mut Connection,
        registration: &str,
        challenge_id: &str,
        secret: &[u8],
    ) -> ClientResponse {
        vnfm.post_json(
            &format!("{REGISTRATIONS}/{registration}/ak_challenges/{challenge_id}/answer"),
            &json!({ "secret": b64(secret) }),
        )
        .await
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ek_credential_activation_anchors_the_ak_and_nonces_are_single_use() {
        let tpm = ManufacturedTpm::start();
        let work = tempfile::tempdir().unwrap();
        let issuer_pem = std::fs::read_to_string(tpm.issuer_pem()).unwrap();
        let mut agent = agent_with(&[&tpm.root_pem()], "");
        let mut vnfm = agent.client(Some("vnfm-a")).connect().await.unwrap();

        let store =
            Arc::new(TpmKeyStore::open(&common::swtpm::tpm_config(&tpm.tcti())).expect("open"));
        let ak = store
            .create_attestation_key(&KeySpec {
                label: "ak".into(),
                algorithm: KeyAlgorithm::EcP256,
            })
            .unwrap();
        let key = generate(&store, KeyAlgorithm::EcP256);
        let registration = register(
            &mut vnfm,
            &register_body("vnfc-ek", &pem_public(&ak.public_key.spki_der), &[]),
        )
        .await;
        let id = registration["id"].as_str().unwrap().to_string();
        assert!(registration["keyAttestation"].get("anchor").is_none());

        // Two nonces, two CSRs; one CSR over qualifying data the CMF never handed out.
        let first = certified_csr(
            &store,
            &key,
            &ak,
            &nonce(&mut vnfm, &id).await,
            vec![],
            "vnfc-ek",
        );
        let second = certified_csr(
            &store,
            &key,
            &ak,
            &nonce(&mut vnfm, &id).await,
            vec![],
            "vnfc-ek",
        );
        let made_up = certified_csr(&store, &key, &ak, &[7; 32], vec![], "vnfc-ek");
        let ak_handle = handle(&ak);
        drop(store); // tpm2-tools need the TPM's one connection

        // Before anchoring: verified, issued, but no TCG policy.
        let issued = post_csr(&mut vnfm, "vnfc-ek", &first).await;
        assert_eq!(issued.status, 201, "{}", issued.problem_detail());
        let issued = issued.json().unwrap();
        assert_eq!(issued["attestation"], "verified-unanchored");
        assert!(policies(&issued).is_empty(), "{:?}", policies(&issued));
        // The same attestation again: its nonce is spent.
        let replay = post_csr(&mut vnfm, "vnfc-ek", &first).await;
        assert_eq!(replay.status, 422);
        assert!(
            replay.problem_detail().contains("nonce"),
            "{}",
            replay.problem_detail()
        );
        let refused = post_csr(&mut vnfm, "vnfc-ek", &made_up).await;
        assert_eq!(refused.status, 422);
        assert!(refused
            .problem_detail()
            .contains("not an outstanding nonce"));

        let ek_certificate = tpm.ek_certificate(work.path());
        let ak_public = tpm.public_area(work.path(), ak_handle);
        let chain = [issuer_pem.clone()];

        // A wrong answer: refused, the challenge spent, the attester still unanchored.
        let made = challenge(&mut vnfm, &id, &ek_certificate, &chain, &ak_public).await;
        assert_eq!(made.status, 201, "{}", made.problem_detail());
        let made = made.json().unwrap();
        let challenge_id = made["challengeId"].as_str().unwrap().to_string();
        let wrong = answer(&mut vnfm, &id, &challenge_id, &[0x5a; 32]).await;
        assert_eq!(wrong.status, 422);
        assert!(wrong.problem_detail().contains("not the credential"));
        let again = answer(&mut vnfm, &id, &challenge_id, &[0x5a; 32]).await;
        assert_eq!(again.status, 404, "{}", again.problem_detail());
        let read = vnfm.get(&format!("{REGISTRATIONS}/{id}")).await.unwrap();
        assert!(read.json().unwrap()["keyAttestation"]
            .get("anchor")
            .is_none());

        // Without the intermediate the EK certificate does not chain: refused.
        let unchained = challenge(&mut vnfm, &id, &ek_certificate, &[], &ak_public).await;
        assert_eq!(unchained.status, 422);
        assert!(unchained.problem_detail().contains("does not chain"));

        // The real protocol: MakeCredential here, ActivateCredential in the TPM.
        let made = challenge(&mut vnfm, &id, &ek_certificate, &chain, &ak_public).await;
        assert_eq!(made.status, 201, "{}", made.problem_detail());
        assert!(made.headers["location"]
            .to_str()
            .unwrap()
            .starts_with(&format!("{REGISTRATIONS}/{id}/ak_challenges/")));
        let made = made.json().unwrap();
        let secret = tpm
            .activate_credential(
                work.path(),
                ak_handle,
                common::tpm_pki::RSA_EK_HANDLE,
                &unb64(made["credentialBlob"].as_str().unwrap()),
                &unb64(made["encryptedSecret"].as_str().unwrap()),
            )
            .expect("TPM2_ActivateCredential");
        let anchored = answer(
            &mut vnfm,
            &id,
            made["challengeId"].as_str().unwrap(),
            &secret,
        )
        .await;
        assert_eq!(anchored.status, 200, "{}", anchored.problem_detail());
        let anchor = &anchored.json().unwrap()["keyAttestation"]["anchor"];
        assert_eq!(anchor["method"], "EK_CREDENTIAL_ACTIVATION");
        assert_eq!(anchor["root"], "CN=swtpm-localca-rootca");

        // Anchored: the TCG policies.
        let issued = post_csr(&mut vnfm, "vnfc-ek", &second).await;
        assert_eq!(issued.status, 201, "{}", issued.problem_detail());
        let issued = issued.json().unwrap();
        assert_eq!(issued["attestation"], "verified-anchored");
        assert_eq!(policies(&issued), TCG_POLICIES);
        agent.stop();
    }

    /// The ECC branch of MakeCredential (ECDH, KDFe, TPMS_ECC_POINT) against a real
    /// ActivateCredential: a P-256 EK of the default template with a certificate from the
    /// test manufacturer.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ecc_ek_credential_activation_anchors_the_ak() {
        let tpm = ManufacturedTpm::start();
        let work = tempfile::tempdir().unwrap();
        let issuer_pem = std::fs::read_to_string(tpm.issuer_pem()).unwrap();
        let mut agent = agent_with(&[&tpm.root_pem()], "");
        let mut vnfm = agent.client(Some("vnfm-a")).connect().await.unwrap();
        let store =
            Arc::new(TpmKeyStore::open(&common::swtpm::tpm_config(&tpm.tcti())).expect("open"));
        let ak = store
            .create_attestation_key(&KeySpec {
                label: "ak".into(),
                algorithm: KeyAlgorithm::Rsa2048,
            })
            .unwrap();
        let ak_handle = handle(&ak);
        let registration = register(
            &mut vnfm,
            &register_body("vnfc-ecc", &pem_public(&ak.public_key.spki_der), &[]),
        )
        .await;
        let id = registration["id"].as_str().unwrap().to_string();
        drop(store);
        let ek_certificate = tpm.ecc_ek(work.path(), "0x81010002");
        let ek_der = nfv_warden::pki::certificates_from_pem(&ek_certificate)
            .unwrap()
            .remove(0)
            .to_der()
            .unwrap();
        let ak_public = tpm.public_area(work.path(), ak_handle);
        let made = challenge(&mut vnfm, &id, &ek_der, &[issuer_pem], &ak_public).await;
        assert_eq!(made.status, 201, "{}", made.problem_detail());
        let made = made.json().unwrap();
        let secret = tpm
            .activate_credential(
                work.path(),
                ak_handle,
                "0x81010002",
                &unb64(made["credentialBlob"].as_str().unwrap()),
                &unb64(made["encryptedSecret"].as_str().unwrap()),
            )
            .expect("TPM2_ActivateCredential with the ECC EK");
        let anchored = answer(
            &mut vnfm,
            &id,
            made["challengeId"].as_str().unwrap(),
            &secret,
        )
        .await;
        assert_eq!(anchored.status, 200, "{}", anchored.problem_detail());
        assert_eq!(
            anchored.json().unwrap()["keyAttestation"]["anchor"]["method"],
            "EK_CREDENTIAL_ACTIVATION"
        );
        agent.stop();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ak_certificate_chain_anchors_at_register_and_in_the_bundle() {
        let tpm = ManufacturedTpm::start();
        let work = tempfile::tempdir().unwrap();
        let issuer_pem = std::fs::read_to_string(tpm.issuer_pem()).unwrap();
        let mut agent = agent_with(&[&tpm.root_pem()], "");
        let mut vnfm = agent.client(Some("vnfm-a")).connect().await.unwrap();
        let store =
            Arc::new(TpmKeyStore::open(&common::swtpm::tpm_config(&tpm.tcti())).expect("open"));
        let ak = store
            .create_attestation_key(&KeySpec {
                label: "ak".into(),
                algorithm: KeyAlgorithm::EcP256,
            })
            .unwrap();
        let other_ak = store
            .create_attestation_key(&KeySpec {
                label: "other ak".into(),
                algorithm: KeyAlgorithm::EcP256,
            })
            .unwrap();
        let key = generate(&store, KeyAlgorithm::EcP256);
        let ak_pem = pem_public(&ak.public_key.spki_der);
        let ak_certificate = tpm.ak_certificate(work.path(), &ak_pem);

        // The AK certificate of another key: refused at Register.
        let refused = vnfm
            .post_json(
                REGISTRATIONS,
                &register_body(
                    "vnfc-akc",
                    &pem_public(&other_ak.public_key.spki_der),
                    &[ak_certificate.clone(), issuer_pem.clone()],
                ),
            )
            .await
            .unwrap();
        assert_eq!(refused.status, 422, "{}", refused.problem_detail());
        assert!(refused.problem_detail().contains("akCertificateChain"));

        let registration = register(
            &mut vnfm,
            &register_body(
                "vnfc-akc",
                &ak_pem,
                &[ak_certificate.clone(), issuer_pem.clone()],
            ),
        )
        .await;
        assert_eq!(
            registration["keyAttestation"]["anchor"]["method"],
            "AK_CERTIFICATE"
        );
        let id = registration["id"].as_str().unwrap().to_string();
        let csr = certified_csr(
            &store,
            &key,
            &ak,
            &nonce(&mut vnfm, &id).await,
            vec![],
            "vnfc-akc",
        );

        // Unanchored at Register, anchored by the AK certificate in the CSR's bundle.
        let plain = register(&mut vnfm, &register_body("vnfc-bundle", &ak_pem, &[])).await;
        let plain_id = plain["id"].as_str().unwrap().to_string();
        let certs =
            nfv_warden::pki::certificates_from_pem(&format!("{ak_certificate}{issuer_pem}"))
                .unwrap();
        let bundled = certified_csr(
            &store,
            &key,
            &ak,
            &nonce(&mut vnfm, &plain_id).await,
            certs,
            "vnfc-bundle",
        );
        drop(store);

        for (subject, csr) in [("vnfc-akc", &csr), ("vnfc-bundle", &bundled)] {
            let issued = post_csr(&mut vnfm, subject, csr).await;
            assert_eq!(issued.status, 201, "{}", issued.problem_detail());
            let issued = issued.json().unwrap();
            assert_eq!(issued["attestation"], "verified-anchored", "{subject}");
            assert_eq!(policies(&issued), TCG_POLICIES, "{subject}");
        }
        agent.stop();
    }

    /// A TPMS_ATTEST made by hand, claiming a TPM2_Certify of `public` (fixedTPM and all),
    /// signed by a software P-256 key: the forgery of issue 10 §2.
    fn forged_statement(signer: &p256::ecdsa::SigningKey, public: &[u8], nonce: &[u8]) -> Vec<u8> {
        let tpm2b = |bytes: &[u8]| {
            let mut out = (bytes.len() as u16).to_be_bytes().to_vec();
            out.extend_from_slice(bytes);
            out
        };
        let name = tpm::name_of(public).unwrap();
        let mut attest = vec![0xff, 0x54, 0x43, 0x47, 0x80, 0x17];
        attest.extend(tpm2b(&name)); // qualifiedSigner: anything
        attest.extend(tpm2b(nonce));
        attest.extend_from_slice(&[0; 8]); // clock
        attest.extend_from_slice(&[0; 8]); // resetCount, restartCount
        attest.push(1); // safe
        attest.extend_from_slice(&[0; 8]); // firmwareVersion
        attest.extend(tpm2b(&name));
        attest.extend(tpm2b(&name));
        let signature: p256::ecdsa::Signature = signature::Signer::sign(signer, &attest);
        tpm::encode_statement(&attest, signature.to_der().as_bytes(), Some(public)).unwrap()
    }

    /// The TPM2B_PUBLIC an attestation key with `signer`'s public key would have.
    fn forged_ak_public(signer: &p256::ecdsa::SigningKey) -> Vec<u8> {
        use p256::elliptic_curve::sec1::ToSec1Point;
        let point = signer.verifying_key().as_affine().to_sec1_point(false);
        let mut public = vec![0x00, 0x23, 0x00, 0x0b, 0x00, 0x05, 0x00, 0x72, 0x00, 0x00];
        public.extend_from_slice(&[0x00, 0x10, 0x00, 0x18, 0x00, 0x0b, 0x00, 0x03, 0x00, 0x10]);
        public.extend_from_slice(&[0x00, 0x20]);
        public.extend_from_slice(point.x().unwrap());
        public.extend_from_slice(&[0x00, 0x20]);
        public.extend_from_slice(point.y().unwrap());
        let mut out = (public.len() as u16).to_be_bytes().to_vec();
        out.extend(public);
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn software_attester_is_refused_the_tcg_policies() {
        let tpm = ManufacturedTpm::start();
        let work = tempfile::tempdir().unwrap();
        let issuer_pem = std::fs::read_to_string(tpm.issuer_pem()).unwrap();
        let store =
            Arc::new(TpmKeyStore::open(&common::swtpm::tpm_config(&tpm.tcti())).expect("open"));
        // The subject key is a real TPM key; only its public area is used by the forger.
        let key = generate(&store, KeyAlgorithm::EcP256);
        let some_ak = store
            .create_attestation_key(&KeySpec {
                label: "ak".into(),
                algorithm: KeyAlgorithm::EcP256,
            })
            .unwrap();
        let public = store
            .certify(&key.reference, &some_ak.reference, b"x")
            .unwrap()
            .public_area;
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).unwrap();
        let software = p256::ecdsa::SigningKey::from_slice(&secret).unwrap();
        let software_pem = software
            .verifying_key()
            .to_public_key_pem(Default::default())
            .unwrap();

        for policy in ["issue", "refuse"] {
            let mut agent = agent_with(&[&tpm.root_pem()], &format!("unanchored = \"{policy}\""));
            let mut vnfm = agent.client(Some("vnfm-a")).connect().await.unwrap();
            let registration =
                register(&mut vnfm, &register_body("vnfc-sw", &software_pem, &[])).await;
            let id = registration["id"].as_str().unwrap().to_string();
            let stmt = forged_statement(&software, &public, &nonce(&mut vnfm, &id).await);
            let csr = vectors::attested_csr(
                store.clone(),
                &key.reference,
                "CN=vnfc-sw",
                Some(&vectors::bundle(vectors::tpm_format(), stmt)),
            );
            let csr =
                nfv_warden::pki::to_pem("CERTIFICATE REQUEST", &csr.to_der().unwrap()).unwrap();
            let response = post_csr(&mut vnfm, "vnfc-sw", &csr).await;
            if policy == "issue" {
                // The forgery verifies against the key the consumer chose, and earns nothing.
                assert_eq!(response.status, 201, "{}", response.problem_detail());
                let issued = response.json().unwrap();
                assert_eq!(issued["attestation"], "verified-unanchored");
                assert!(policies(&issued).is_empty());
            } else {
                assert_eq!(response.status, 422);
                assert!(
                    response.problem_detail().contains("not anchored"),
                    "{}",
                    response.problem_detail()
                );
            }
            agent.stop();
        }

        // Nor can the software key pass for an AK of this (real, certified) TPM: the
        // credential is made for a Name no object in the TPM has.
        let ek_certificate = {
            drop(store);
            tpm.ek_certificate(work.path())
        };
        let mut agent = agent_with(&[&tpm.root_pem()], "");
        let mut vnfm = agent.client(Some("vnfm-a")).connect().await.unwrap();
        let registration = register(&mut vnfm, &register_body("vnfc-sw", &software_pem, &[])).await;
        let id = registration["id"].as_str().unwrap().to_string();
        let forged_ak = forged_ak_public(&software);
        let made = challenge(&mut vnfm, &id, &ek_certificate, &[issuer_pem], &forged_ak).await;
        assert_eq!(made.status, 201, "{}", made.problem_detail());
        let made = made.json().unwrap();
        let challenge_id = made["challengeId"].as_str().unwrap();
        let mut guess = [0u8; 32];
        getrandom::fill(&mut guess).unwrap();
        let refused = answer(&mut vnfm, &id, challenge_id, &guess).await;
        assert_eq!(refused.status, 422);
        // An attestation key's public area without `restricted`: refused before any credential.
        let mut unrestricted = forged_ak.clone();
        unrestricted[7] &= !0x01; // objectAttributes bit 16, restricted
        let refused = challenge(&mut vnfm, &id, &ek_certificate, &[], &unrestricted).await;
        assert_eq!(refused.status, 422);
        assert!(
            refused.problem_detail().contains("restricted"),
            "{}",
            refused.problem_detail()
        );
        agent.stop();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unknown_format_is_refused_at_register_and_nonces_expire() {
        let mut agent = agent_with(&[], "nonce_ttl_seconds = 1");
        let mut vnfm = agent.client(Some("vnfm-a")).connect().await.unwrap();
        let tpm = Swtpm::start();
        let store =
            Arc::new(TpmKeyStore::open(&common::swtpm::tpm_config(&tpm.tcti())).expect("open"));
        let ak = store
            .create_attestation_key(&KeySpec {
                label: "ak".into(),
                algorithm: KeyAlgorithm::EcP256,
            })
            .unwrap();
        let key = generate(&store, KeyAlgorithm::EcP256);
        let ak_pem = pem_public(&ak.public_key.spki_der);

        let mut body = register_body("vnfc-x", &ak_pem, &[]);
        body["keyAttestation"]["formatOid"] = json!("1.3.6.1.4.1.99999.7");
        let refused = vnfm.post_json(REGISTRATIONS, &body).await.unwrap();
        assert_eq!(refused.status, 422);
        let detail = refused.problem_detail();
        assert!(detail.contains("1.3.6.1.4.1.99999.7"), "{detail}");
        assert!(detail.contains("2.23.133.20.1"), "{detail}");

        let registration = register(&mut vnfm, &register_body("vnfc-x", &ak_pem, &[])).await;
        let id = registration["id"].as_str().unwrap().to_string();
        let nonce = nonce(&mut vnfm, &id).await;
        let csr = certified_csr(&store, &key, &ak, &nonce, vec![], "vnfc-x");
        // Wait (wall clock, not a measured duration) until the nonce is past its expiry.
        let deadline = SystemTime::now() + Duration::from_millis(2_100);
        while SystemTime::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let expired = post_csr(&mut vnfm, "vnfc-x", &csr).await;
        assert_eq!(expired.status, 422);
        assert!(
            expired.problem_detail().contains("expired"),
            "{}",
            expired.problem_detail()
        );
        agent.stop();
    }

    /// `[cmf.attestation] require_nonce = true` (issue 10 §2): a TPM attestation whose
    /// qualifying data is not a fresh nonce from `.../attestation_nonces` is refused (422,
    /// the reason named); with one it is issued. The same attestation is issued by an agent
    /// without the setting, so the setting is what refuses it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn require_nonce_refuses_an_attestation_without_a_fresh_nonce() {
        let tpm = Swtpm::start();
        let store =
            Arc::new(TpmKeyStore::open(&common::swtpm::tpm_config(&tpm.tcti())).expect("open"));
        let ak = store
            .create_attestation_key(&KeySpec {
                label: "ak".into(),
                algorithm: KeyAlgorithm::EcP256,
            })
            .unwrap();
        let key = generate(&store, KeyAlgorithm::EcP256);
        let ak_pem = pem_public(&ak.public_key.spki_der);
        // TPM2_Certify over empty qualifying data: no nonce at all.
        let without = certified_csr(&store, &key, &ak, &[], vec![], "vnfc-rn");

        let mut lenient = agent_with(&[], "");
        let mut vnfm = lenient.client(Some("vnfm-a")).connect().await.unwrap();
        register(&mut vnfm, &register_body("vnfc-rn", &ak_pem, &[])).await;
        let issued = post_csr(&mut vnfm, "vnfc-rn", &without).await;
        assert_eq!(issued.status, 201, "{}", issued.problem_detail());
        assert_eq!(issued.json().unwrap()["attestation"], "verified-unanchored");
        lenient.stop();

        let mut strict = agent_with(&[], "require_nonce = true");
        let mut vnfm = strict.client(Some("vnfm-a")).connect().await.unwrap();
        let registration = register(&mut vnfm, &register_body("vnfc-rn", &ak_pem, &[])).await;
        let id = registration["id"].as_str().unwrap().to_string();
        let refused = post_csr(&mut vnfm, "vnfc-rn", &without).await;
        assert_eq!(refused.status, 422, "{}", refused.problem_detail());
        let detail = refused.problem_detail();
        assert!(
            detail.contains("requires a nonce") && detail.contains("attestation_nonces"),
            "{detail}"
        );
        let fresh = certified_csr(
            &store,
            &key,
            &ak,
            &nonce(&mut vnfm, &id).await,
            vec![],
            "vnfc-rn",
        );
        let issued = post_csr(&mut vnfm, "vnfc-rn", &fresh).await;
        assert_eq!(issued.status, 201, "{}", issued.problem_detail());
        assert_eq!(issued.json().unwrap()["attestation"], "verified-unanchored");
        strict.stop();
    }
}
