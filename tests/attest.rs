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
