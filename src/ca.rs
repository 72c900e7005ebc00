//! The agent's CA: a root made by the agent (self-signed with the CA key in the HSM/TPM),
//! or an intermediate whose CSR goes to an external root and whose chain is imported, and
//! the agent's own TLS server certificate issued from it.
//!
//! Certificate profiles are the project's own `BuilderProfile`s: the built-in CA/B profiles
//! of x509-cert are strict about subject attributes and write no SAN (HARDWARE.md).

use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use der::asn1::{Ia5String, OctetString};
use der::flagset::FlagSet;
use der::{Decode, Encode};
use spki::{ObjectIdentifier, SubjectPublicKeyInfoOwned};
use x509_cert::builder::profile::BuilderProfile;
use x509_cert::builder::{Builder, CertificateBuilder, RequestBuilder};
use x509_cert::ext::pkix::certpolicy::PolicyInformation;
use x509_cert::ext::pkix::crl::dp::DistributionPoint;
use x509_cert::ext::pkix::name::DistributionPointName;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{
    AccessDescription, AuthorityInfoAccessSyntax, AuthorityKeyIdentifier, BasicConstraints,
    CertificatePolicies, CrlDistributionPoints, ExtendedKeyUsage, KeyUsage, KeyUsages,
    SubjectAltName, SubjectKeyIdentifier,
};
use x509_cert::ext::{Extension, ToExtension};
use x509_cert::name::Name;
use x509_cert::request::CertReq;
use x509_cert::serial_number::SerialNumber;
use x509_cert::time::Validity;
use x509_cert::{Certificate, TbsCertificate};

use crate::keys::signer::{HardwareKey, HardwareSignature};
use crate::pki;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("subject '{0}': {1}")]
    Subject(String, String),
    #[error("building the certificate: {0}")]
    Build(String),
    #[error("chain: {0}")]
    Chain(String),
    #[error("signing with the CA key: {reason}")]
    Signing { transient: bool, reason: String },
    #[error("subject alternative name '{0}': not a DNS name or IP address")]
    SubjectAltName(String),
}

/// What a certificate is for.
#[derive(Clone, Debug)]
pub enum Profile {
    /// A self-signed root: CA, keyCertSign + cRLSign.
    Root,
    /// An end-entity certificate (the agent's TLS certificate, VNFCI and VNF OAM
    /// certificates): CA:FALSE and the profile's usages and names.
    Leaf(LeafProfile),
}

/// Extensions of an end-entity certificate (RFC 5280 4.2).
#[derive(Clone, Debug)]
pub struct LeafProfile {
    pub key_usage: FlagSet<KeyUsages>,
    pub extended_key_usage: Vec<ObjectIdentifier>,
    pub subject_alt_names: Vec<GeneralName>,
    pub crl_distribution_point: Option<String>,
    /// The OCSP responder's URL, as an authorityInfoAccess id-ad-ocsp entry (RFC 5280
    /// 4.2.2.1, RFC 6960 3.1).
    pub ocsp_url: Option<String>,
    /// certificatePolicies, e.g. the TCG key-provenance OIDs after a verified attestation.
    pub policies: Vec<ObjectIdentifier>,
}

impl LeafProfile {
    /// The agent's own TLS server certificate (also usable as a TLS client).
    pub fn tls_server(sans: &[String]) -> Result<LeafProfile, CaError> {
        Ok(LeafProfile {
            key_usage: KeyUsages::DigitalSignature.into(),
            extended_key_usage: vec![
                const_oid::db::rfc5280::ID_KP_SERVER_AUTH,
                const_oid::db::rfc5280::ID_KP_CLIENT_AUTH,
            ],
            subject_alt_names: sans
                .iter()
                .map(|s| general_name(s))
                .collect::<Result<_, _>>()?,
            crl_distribution_point: None,
            ocsp_url: None,
            policies: Vec::new(),
        })
    }
}

struct Issuing {
    subject: Name,
    issuer: Option<Name>,
    issuer_spki: Option<Vec<u8>>,
    profile: Profile,
}

impl BuilderProfile for Issuing {
    fn get_issuer(&self, subject: &Name) -> Name {
        self.issuer.clone().unwrap_or_else(|| subject.clone())
    }

    fn get_subject(&self) -> Name {
        self.subject.clone()
    }

    fn build_extensions(
        &self,
        spk: spki::SubjectPublicKeyInfoRef<'_>,
        issuer_spk: spki::SubjectPublicKeyInfoRef<'_>,
        tbs: &TbsCertificate,
    ) -> x509_cert::builder::Result<Vec<Extension>> {
        let mut extensions: Vec<Extension> = Vec::new();
        let ski = SubjectKeyIdentifier::try_from(spk)?;
        // RFC 5280 4.2.1.1: the AKI is the issuer's SKI (method 1 on both sides).
        let aki = match &self.issuer_spki {
            Some(issuer_der) => {
                let issuer = spki::SubjectPublicKeyInfoRef::from_der(issuer_der)?;
                SubjectKeyIdentifier::try_from(issuer)?
            }
            None => SubjectKeyIdentifier::try_from(issuer_spk)?,
        };
        extensions.push(
            AuthorityKeyIdentifier {
                key_identifier: Some(aki.0.clone()),
                ..Default::default()
            }
            .to_extension(tbs.subject(), &extensions)?,
        );
        match &self.profile {
            Profile::Root => {
                extensions.push(
                    BasicConstraints {
                        ca: true,
                        path_len_constraint: None,
                    }
                    .to_extension(tbs.subject(), &extensions)?,
                );
                extensions.push(
                    KeyUsage(KeyUsages::KeyCertSign | KeyUsages::CRLSign)
                        .to_extension(tbs.subject(), &extensions)?,
                );
            }
            Profile::Leaf(leaf) => {
                extensions.push(
                    BasicConstraints {
                        ca: false,
                        path_len_constraint: None,
                    }
                    .to_extension(tbs.subject(), &extensions)?,
                );
                extensions.push(KeyUsage(leaf.key_usage).to_extension(tbs.subject(), &extensions)?);
                if !leaf.extended_key_usage.is_empty() {
                    extensions.push(
                        ExtendedKeyUsage(leaf.extended_key_usage.clone())
                            .to_extension(tbs.subject(), &extensions)?,
                    );
                }
                if !leaf.subject_alt_names.is_empty() {
                    extensions.push(
                        SubjectAltName(leaf.subject_alt_names.clone())
                            .to_extension(tbs.subject(), &extensions)?,
                    );
                }
                if let Some(uri) = &leaf.crl_distribution_point {
                    let point = DistributionPoint {
                        distribution_point: Some(DistributionPointName::FullName(vec![
                            GeneralName::UniformResourceIdentifier(Ia5String::new(uri)?),
                        ])),
                        reasons: None,
                        crl_issuer: None,
                    };
                    extensions.push(
                        CrlDistributionPoints(vec![point])
                            .to_extension(tbs.subject(), &extensions)?,
                    );
                }
                if let Some(uri) = &leaf.ocsp_url {
                    extensions.push(
                        AuthorityInfoAccessSyntax(vec![AccessDescription {
                            access_method: const_oid::db::rfc5280::ID_AD_OCSP,
                            access_location: GeneralName::UniformResourceIdentifier(
                                Ia5String::new(uri)?,
                            ),
                        }])
                        .to_extension(tbs.subject(), &extensions)?,
                    );
                }
                if !leaf.policies.is_empty() {
                    let policies = leaf
                        .policies
                        .iter()
                        .map(|oid| PolicyInformation {
                            policy_identifier: *oid,
                            policy_qualifiers: None,
                        })
                        .collect();
                    extensions.push(
                        CertificatePolicies(policies).to_extension(tbs.subject(), &extensions)?,
                    );
                }
            }
        }
        extensions.push(ski.to_extension(tbs.subject(), &extensions)?);
        Ok(extensions)
    }
}

pub fn general_name(text: &str) -> Result<GeneralName, CaError> {
    if let Ok(ip) = IpAddr::from_str(text) {
        let bytes = match ip {
            IpAddr::V4(v4) => v4.octets().to_vec(),
            IpAddr::V6(v6) => v6.octets().to_vec(),
        };
        return OctetString::new(bytes)
            .map(GeneralName::IpAddress)
            .map_err(|_| CaError::SubjectAltName(text.into()));
    }
    // The preferred name syntax (cmf::names): no `-lead`, `_`, empty labels or a wildcard
    // inside a label, which relying parties and pkilint reject.
    if crate::cmf::names::check_host_name(text).is_err() {
        return Err(CaError::SubjectAltName(text.into()));
    }
    Ia5String::new(text)
        .map(GeneralName::DnsName)
        .map_err(|_| CaError::SubjectAltName(text.into()))
}

pub fn parse_name(text: &str) -> Result<Name, CaError> {
    Name::from_str(text).map_err(|e| CaError::Subject(text.into(), e.to_string()))
}

/// A self-signed root certificate for the CA key.
pub fn self_signed_root(
    key: &HardwareKey,
    subject: &str,
    days: u32,
) -> Result<Certificate, CaError> {
    let subject = parse_name(subject)?;
    let spki = spki_of(key)?;
    let profile = Issuing {
        subject,
        issuer: None,
        issuer_spki: None,
        profile: Profile::Root,
    };
    build(profile, spki, days, key)
}

/// A CSR for the CA key, for an external root to sign.
pub fn ca_csr(key: &HardwareKey, subject: &str) -> Result<CertReq, CaError> {
    let subject = parse_name(subject)?;
    let mut builder = RequestBuilder::new(subject).map_err(|e| CaError::Build(e.to_string()))?;
    builder
        .add_extension(&BasicConstraints {
            ca: true,
            path_len_constraint: None,
        })
        .map_err(|e| CaError::Build(e.to_string()))?;
    builder
        .add_extension(&KeyUsage(KeyUsages::KeyCertSign | KeyUsages::CRLSign))
        .map_err(|e| CaError::Build(e.to_string()))?;
    builder
        .build::<_, HardwareSignature>(key)
        .map_err(|e| CaError::Build(e.to_string()))
}

/// A CA key with its certificate, checked to belong together once.
#[derive(Clone, Debug)]
pub struct Issuer {
    key: HardwareKey,
    certificate: Certificate,
    spki_der: Vec<u8>,
}

impl Issuer {
    pub fn new(key: HardwareKey, certificate: Certificate) -> Result<Issuer, CaError> {
        let spki_der = certificate
            .tbs_certificate()
            .subject_public_key_info()
            .to_der()
            .map_err(|e| CaError::Build(e.to_string()))?;
        if spki_der != key.public_key().spki_der {
            return Err(CaError::Chain(
                "the CA certificate is not for the configured CA key".into(),
            ));
        }
        Ok(Issuer {
            key,
            certificate,
            spki_der,
        })
    }

    pub fn certificate(&self) -> &Certificate {
        &self.certificate
    }

    pub fn key(&self) -> &HardwareKey {
        &self.key
    }

    /// Issue a certificate for `spki`, signed by the CA key through the key layer.
    pub fn issue(
        &self,
        subject: Name,
        spki: SubjectPublicKeyInfoOwned,
        profile: Profile,
        serial: SerialNumber,
        validity: Validity,
    ) -> Result<Certificate, CaError> {
        let profile = Issuing {
            subject,
            issuer: Some(self.certificate.tbs_certificate().subject().clone()),
            issuer_spki: Some(self.spki_der.clone()),
            profile,
        };
        let builder = CertificateBuilder::new(profile, serial, validity, spki)
            .map_err(|e| CaError::Build(e.to_string()))?;
        builder
            .build::<_, HardwareSignature>(&self.key)
            .map_err(signing_error)
    }
}

/// Keep whether a signing failure was the device being unavailable (retry later) or not.
fn signing_error(error: x509_cert::builder::Error) -> CaError {
    match &error {
        x509_cert::builder::Error::Signature(signature) => {
            let key_error = std::error::Error::source(signature)
                .and_then(|s| s.downcast_ref::<crate::keys::KeyError>());
            CaError::Signing {
                // A CA key not found (a token wiped or swapped) is an outage of the CA, like
                // an unavailable device: the answer is 503, never a 500.
                transient: key_error.is_some_and(|k| {
                    k.is_transient() || matches!(k, crate::keys::KeyError::NotFound(_))
                }),
                reason: key_error.map_or_else(|| error.to_string(), |k| k.to_string()),
            }
        }
        _ => CaError::Build(error.to_string()),
    }
}

/// Issue a certificate for `subject_spki` signed by the CA key, with `ca_cert` as issuer,
/// valid from now for `days`.
pub fn issue(
    ca_key: &HardwareKey,
    ca_cert: &Certificate,
    subject: &str,
    subject_spki: &[u8],
    profile: Profile,
    days: u32,
) -> Result<Certificate, CaError> {
    let issuer = Issuer::new(ca_key.clone(), ca_cert.clone())?;
    let spki = SubjectPublicKeyInfoOwned::from_der(subject_spki)
        .map_err(|e| CaError::Build(format!("subject public key: {e}")))?;
    let serial = pki::random_serial().map_err(CaError::Build)?;
    let validity = Validity::from_now(Duration::from_secs(u64::from(days) * 86_400))
        .map_err(|e| CaError::Build(e.to_string()))?;
    issuer.issue(parse_name(subject)?, spki, profile, serial, validity)
}

fn spki_of(key: &HardwareKey) -> Result<SubjectPublicKeyInfoOwned, CaError> {
    SubjectPublicKeyInfoOwned::from_der(&key.public_key().spki_der)
        .map_err(|e| CaError::Build(format!("public key: {e}")))
}

fn build(
    profile: Issuing,
    spki: SubjectPublicKeyInfoOwned,
    days: u32,
    signer: &HardwareKey,
) -> Result<Certificate, CaError> {
    let serial = pki::random_serial().map_err(CaError::Build)?;
    let validity = Validity::from_now(Duration::from_secs(u64::from(days) * 86_400))
        .map_err(|e| CaError::Build(e.to_string()))?;
    let builder = CertificateBuilder::new(profile, serial, validity, spki)
        .map_err(|e| CaError::Build(e.to_string()))?;
    builder
        .build::<_, HardwareSignature>(signer)
        .map_err(|e| CaError::Build(e.to_string()))
}

/// Check an imported chain: the first certificate is the CA's (its public key is the CA
/// key's), each certificate is signed by the next, and the last is a self-signed root.
pub fn check_chain(ca_key: &HardwareKey, chain: &[Certificate]) -> Result<(), CaError> {
    let first = chain
        .first()
        .ok_or_else(|| CaError::Chain("empty chain".into()))?;
    let spki = first
        .tbs_certificate()
        .subject_public_key_info()
        .to_der()
        .map_err(|e| CaError::Chain(e.to_string()))?;
    if spki != ca_key.public_key().spki_der {
        return Err(CaError::Chain(
            "the first certificate is not for the CA key".into(),
        ));
    }
    for pair in chain.windows(2) {
        if pair[0].tbs_certificate().issuer() != pair[1].tbs_certificate().subject() {
            return Err(CaError::Chain(format!(
                "'{}' is not issued by '{}'",
                pair[0].tbs_certificate().subject(),
                pair[1].tbs_certificate().subject()
            )));
        }
        pki::verify_certificate_signature(&pair[0], &pair[1]).map_err(|e| {
            CaError::Chain(format!(
                "signature of '{}': {e}",
                pair[0].tbs_certificate().subject()
            ))
        })?;
    }
    let root = chain.last().unwrap_or(first);
    pki::verify_certificate_signature(root, root).map_err(|e| {
        CaError::Chain(format!(
            "the last certificate is not a self-signed root: {e}"
        ))
    })
}
