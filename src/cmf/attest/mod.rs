//! Key attestation in CSRs (IFA 033 11.2.1): the VNFM registers an attester public key and
//! the OID of its attestation statement format; each CSR then carries an attestation that
//! must verify with that key and whose attested key must BE the CSR's subject public key.
//!
//! Carriage: draft-ietf-lamps-csr-attestation. The CSR attribute `id-aa-attestation`
//! (1.2.840.113549.1.9.16.2.59) holds one value,
//!
//! ```text
//! AttestationBundle ::= SEQUENCE {
//!     attestations SEQUENCE SIZE(1..MAX) OF AttestationStatement,
//!     certs        SEQUENCE SIZE(1..MAX) OF LimitedCertChoices OPTIONAL }
//! AttestationStatement ::= SEQUENCE {
//!     type OBJECT IDENTIFIER,
//!     stmt ANY DEFINED BY type,
//!     hint IA5String OPTIONAL }      -- revisions up to -21 only; accepted
//! ```
//!
//! Formats (the table from format OID to verifier is configuration: [`Formats::with_alias`]):
//! - TPM 2.0 Certify, 2.23.133.20.1 ([`tpm`]);
//! - the project's X.509 key-attestation certificate, 2.25.125255839134299394918079992035184396081.1
//!   ([`x509`]), under a UUID arc (ITU-T X.667), which needs no registration.
//!
//! The registered attester key is the trust anchor: `certs` in the bundle only help path
//! building and are never trusted here.
//!
//! Format OIDs are kept as DER content bytes ([`FormatOid`]): UUID arcs exceed the u32 arcs
//! of const-oid 0.10, so statement types are never parsed through `ObjectIdentifier`.

pub mod anchor;
pub mod credential;
pub mod make;
pub mod service;
pub mod tpm;
pub mod x509;

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use const_oid::{AssociatedOid, ObjectIdentifier};
use der::asn1::{Any, Ia5String};
use der::{Decode, Encode, EncodeValue, FixedTag, Length, Sequence, Tag, Tagged, Writer};
use x509_cert::attr::Attributes;
use x509_cert::Certificate;

/// id-aa-attestation (draft-ietf-lamps-csr-attestation; early name id-aa-evidence).
pub const ID_AA_ATTESTATION: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.16.2.59");

/// TCG policy OID "verified TPM residency" (2.23.133.11.1.1): a CMF may add it to the
/// certificatePolicies when [`Verified::tpm_residency`] is set.
pub const TCG_VERIFIED_TPM_RESIDENCY: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("2.23.133.11.1.1");

/// TCG policy OID "verified TPM fixed" (2.23.133.11.1.2), for [`Verified::tpm_fixed`].
pub const TCG_VERIFIED_TPM_FIXED: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("2.23.133.11.1.2");

/// tcg-attest-tpm-certify.
pub const TPM2_CERTIFY_FORMAT: &str = "2.23.133.20.1";

/// The project's X.509 key-attestation-certificate format (a UUID arc, X.667).
pub const X509_KEY_CERTIFICATE_FORMAT: &str = "2.25.125255839134299394918079992035184396081.1";

/// An attestation statement format OID, held as its DER content octets (arcs of any size).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FormatOid(Vec<u8>);

impl FormatOid {
    /// From the content octets of a DER OBJECT IDENTIFIER (X.690 8.19): non-empty, minimal
    /// subidentifiers (no leading 0x80), the last octet ends a subidentifier, and every arc
    /// fits in 128 bits (so that it can be displayed).
    pub fn from_der_content(bytes: &[u8]) -> Result<FormatOid, AttestationError> {
        let bad = |why: &str| AttestationError::Decode(format!("statement type OID: {why}"));
        if bytes.is_empty() {
            return Err(bad("empty"));
        }
        if bytes.last().is_some_and(|b| b & 0x80 != 0) {
            return Err(bad("truncated subidentifier"));
        }
        let mut start = true;
        let mut value: u128 = 0;
        for &b in bytes {
            if start && b == 0x80 {
                return Err(bad("non-minimal subidentifier"));
            }
            value = value
                .checked_mul(128)
                .ok_or_else(|| bad("arc larger than 128 bits"))?
                | u128::from(b & 0x7f);
            start = b & 0x80 == 0;
            if start {
                value = 0;
            }
        }
        Ok(FormatOid(bytes.to_vec()))
    }

    /// The DER content octets.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The full DER TLV (tag 06, length, content).
    pub fn to_der(&self) -> Result<Vec<u8>, AttestationError> {
        self.to_any()?
            .to_der()
            .map_err(|e| AttestationError::Decode(format!("encoding an OID: {e}")))
    }

    fn to_any(&self) -> Result<Any, AttestationError> {
        Any::new(Tag::ObjectIdentifier, self.0.clone())
            .map_err(|e| AttestationError::Decode(format!("encoding an OID: {e}")))
    }

    fn arcs(&self) -> Vec<u128> {
        let mut subidentifiers = Vec::new();
        let mut value: u128 = 0;
        for &b in &self.0 {
            // Cannot overflow: from_der_content and from_str check every arc.
            value = value.wrapping_mul(128) | u128::from(b & 0x7f);
            if b & 0x80 == 0 {
                subidentifiers.push(value);
                value = 0;
            }
        }
        let mut arcs = Vec::with_capacity(subidentifiers.len() + 1);
        if let Some((&first, rest)) = subidentifiers.split_first() {
            // X.690 8.19.4: the first subidentifier is 40 * arc1 + arc2.
            let (a, b) = match first {
                0..=39 => (0, first),
                40..=79 => (1, first - 40),
                _ => (2, first - 80),
            };
            arcs.push(a);
            arcs.push(b);
            arcs.extend_from_slice(rest);
        }
        arcs
    }
}

impl FromStr for FormatOid {
    type Err = AttestationError;

    /// Dotted decimal, arcs up to 2^128 - 1.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || AttestationError::Decode(format!("'{text}' is not a dotted-decimal OID"));
        let arcs = text
            .split('.')
            .map(|arc| {
                if arc.is_empty() || !arc.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad());
                }
                arc.parse::<u128>().map_err(|_| bad())
            })
            .collect::<Result<Vec<u128>, _>>()?;
        let [first, second, rest @ ..] = arcs.as_slice() else {
            return Err(bad());
        };
        if *first > 2 || (*first < 2 && *second > 39) {
            return Err(bad());
        }
        let head = (first * 40).checked_add(*second).ok_or_else(bad)?;
        let mut bytes = Vec::new();
        for arc in std::iter::once(head).chain(rest.iter().copied()) {
            let mut groups = vec![(arc & 0x7f) as u8];
            let mut rest = arc >> 7;
            while rest > 0 {
                groups.push((rest & 0x7f) as u8 | 0x80);
                rest >>= 7;
            }
            bytes.extend(groups.iter().rev());
        }
        Ok(FormatOid(bytes))
    }
}

impl fmt::Display for FormatOid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let arcs: Vec<String> = self.arcs().iter().map(u128::to_string).collect();
        f.write_str(&arcs.join("."))
    }
}

impl fmt::Debug for FormatOid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FormatOid({self})")
    }
}

/// Which verifier a format OID selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VerifierKind {
    /// TPM 2.0 TPM2_Certify ([`tpm`]).
    Tpm2Certify,
    /// X.509 certificate over the key, issued by the attester key ([`x509`]).
    X509KeyCertificate,
}

/// The table from format OID to verifier. `Formats::default()` holds the two built-in OIDs;
/// configuration adds aliases (e.g. a vendor OID for the same TPM structure).
#[derive(Clone, Debug)]
pub struct Formats {
    table: HashMap<FormatOid, VerifierKind>,
}

impl Default for Formats {
    fn default() -> Self {
        let mut table = HashMap::new();
        for (text, kind) in [
            (TPM2_CERTIFY_FORMAT, VerifierKind::Tpm2Certify),
            (
                X509_KEY_CERTIFICATE_FORMAT,
                VerifierKind::X509KeyCertificate,
            ),
        ] {
            // Constants above, checked by a unit test.
            if let Ok(oid) = text.parse() {
                table.insert(oid, kind);
            }
        }
        Formats { table }
    }
}

impl Formats {
    /// Map `oid` to `kind` as well (replacing an earlier mapping of `oid`).
    pub fn with_alias(mut self, oid: FormatOid, kind: VerifierKind) -> Self {
        self.table.insert(oid, kind);
        self
    }

    pub fn kind(&self, oid: &FormatOid) -> Option<VerifierKind> {
        self.table.get(oid).copied()
    }

    /// Every known format OID, sorted (for error messages).
    pub fn known(&self) -> Vec<String> {
        let mut known: Vec<String> = self.table.keys().map(FormatOid::to_string).collect();
        known.sort();
        known
    }
}

/// What the VNFM registered (IFA 033 11.2.1): the attester's public key, its statement
/// format, and optionally the qualifying data (nonce) the attestation must carry.
#[derive(Clone, Debug)]
pub struct Attester {
    /// SubjectPublicKeyInfo DER of the attestation key (TPM AK, HSM attestation key).
    pub public_key_spki_der: Vec<u8>,
    pub format: FormatOid,
    /// TPM extraData the attestation must carry, when set.
    pub expected_qualifying_data: Option<Vec<u8>>,
}

/// A verified attestation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    pub format: FormatOid,
    /// fixedTPM and fixedParent verified: the key cannot leave this TPM
    /// (TCG policy 2.23.133.11.1.2).
    pub tpm_fixed: bool,
    /// sensitiveDataOrigin verified: the TPM generated the key (TCG policy 2.23.133.11.1.1).
    pub tpm_residency: bool,
}

/// Why an attestation was refused. Each message says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttestationError {
    #[error("the CSR carries no key attestation (attribute id-aa-attestation 1.2.840.113549.1.9.16.2.59)")]
    Missing,
    #[error("the CSR carries {count} id-aa-attestation attributes: send exactly one")]
    MoreThanOneAttribute { count: usize },
    #[error(
        "the id-aa-attestation attribute holds {count} values: send exactly one AttestationBundle"
    )]
    MoreThanOneValue { count: usize },
    #[error("the AttestationBundle holds {count} statements: send exactly one, in the registered format")]
    MoreThanOneStatement { count: usize },
    #[error("cannot decode the attestation: {0}")]
    Decode(String),
    #[error("attestation statement type {found} differs from the registered format {registered}")]
    WrongType {
        found: FormatOid,
        registered: FormatOid,
    },
    #[error("attestation format {0} is not supported by this CMF")]
    UnknownFormat(FormatOid),
    #[error("TPMS_ATTEST magic is 0x{found:08x}, not TPM_GENERATED_VALUE 0xff544347")]
    BadMagic { found: u32 },
    #[error("TPMS_ATTEST type is 0x{found:04x}, not TPM_ST_ATTEST_CERTIFY 0x8017: send a TPM2_Certify of the CSR key, not a quote or another attestation")]
    NotCertify { found: u16 },
    #[error("the attestation is not signed by the registered attester key")]
    BadSignature,
    #[error("unsupported attestation signature: {0}")]
    UnsupportedSignature(String),
    #[error("the registered attester public key is unusable: {0}")]
    AttesterKey(String),
    #[error("the attestation carries no public key (tpmTPublic): IFA 033 11.2.1 requires the attested public key")]
    MissingPublicKey,
    #[error("tpmTPublic nameAlg 0x{found:04x} is not supported (SHA-256, SHA-384, SHA-512)")]
    UnsupportedNameAlg { found: u16 },
    #[error("the Name of tpmTPublic differs from the Name the TPM certified: tpmTPublic is not the certified key")]
    NameMismatch,
    #[error("the attested key's attributes are not acceptable: missing {missing:?}, forbidden {forbidden:?}")]
    Attributes {
        missing: Vec<&'static str>,
        forbidden: Vec<&'static str>,
    },
    #[error("unsupported attested key: {0}")]
    UnsupportedKey(String),
    #[error("the attested key is not the CSR's subject public key")]
    KeyMismatch,
    #[error("the attestation's qualifying data (extraData) differs from the registered value")]
    QualifyingData,
    #[error("the key attestation certificate expired at {not_after}")]
    Expired { not_after: String },
    #[error("the key attestation certificate is not valid before {not_before}")]
    NotYetValid { not_before: String },
    #[error("the attester is not anchored in a TPM PKI: {0}")]
    Anchor(String),
    #[error("credential activation: {0}")]
    Credential(String),
    #[error("freshness: {0}")]
    Nonce(String),
}

/// One decoded statement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttestationStatement {
    /// The statement `type`.
    pub format: FormatOid,
    /// The full DER TLV of `stmt`.
    pub stmt_der: Vec<u8>,
    /// `hint` of revisions up to -21.
    pub hint: Option<String>,
}

/// One decoded bundle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttestationBundle {
    pub statements: Vec<AttestationStatement>,
    /// The `certificate` choices of `certs` (path-building hints only, never trusted).
    pub certs: Vec<Certificate>,
}

impl AttestationBundle {
    /// DER of the bundle (the attribute value).
    pub fn to_der(&self) -> Result<Vec<u8>, AttestationError> {
        self.to_wire()?
            .to_der()
            .map_err(|e| AttestationError::Decode(format!("encoding the bundle: {e}")))
    }

    fn to_wire(&self) -> Result<BundleWire, AttestationError> {
        let encode = |e: der::Error| AttestationError::Decode(format!("encoding the bundle: {e}"));
        let attestations = self
            .statements
            .iter()
            .map(|s| {
                Ok(StatementWire {
                    kind: s.format.to_any()?,
                    stmt: Any::from_der(&s.stmt_der).map_err(encode)?,
                    hint: s
                        .hint
                        .as_ref()
                        .map(Ia5String::new)
                        .transpose()
                        .map_err(encode)?,
                })
            })
            .collect::<Result<Vec<_>, AttestationError>>()?;
        let certs = if self.certs.is_empty() {
            None
        } else {
            Some(
                self.certs
                    .iter()
                    .map(|c| Any::encode_from(c).map_err(encode))
                    .collect::<Result<Vec<_>, _>>()?,
            )
        };
        Ok(BundleWire {
            attestations,
            certs,
        })
    }
}

/// The bundle as a CSR attribute (x509-cert `RequestBuilder::add_attribute`).
impl AssociatedOid for AttestationBundle {
    const OID: ObjectIdentifier = ID_AA_ATTESTATION;
}

impl FixedTag for AttestationBundle {
    const TAG: Tag = Tag::Sequence;
}

impl EncodeValue for AttestationBundle {
    fn value_len(&self) -> der::Result<Length> {
        self.to_wire()
            .map_err(|_| der::Error::from(der::ErrorKind::Failed))?
            .value_len()
    }

    fn encode_value(&self, writer: &mut impl Writer) -> der::Result<()> {
        self.to_wire()
            .map_err(|_| der::Error::from(der::ErrorKind::Failed))?
            .encode_value(writer)
    }
}

impl x509_cert::request::attributes::AsAttribute for AttestationBundle {}

/// Decode one `id-aa-attestation` attribute value (strict DER, no trailing octets).
pub fn decode_bundle(attribute_value_der: &[u8]) -> Result<AttestationBundle, AttestationError> {
    let wire = BundleWire::from_der(attribute_value_der)
        .map_err(|e| AttestationError::Decode(format!("AttestationBundle: {e}")))?;
    if wire.attestations.is_empty() {
        return Err(AttestationError::Decode(
            "AttestationBundle: attestations is empty (SIZE(1..MAX))".to_string(),
        ));
    }
    let mut statements = Vec::with_capacity(wire.attestations.len());
    for statement in wire.attestations {
        if statement.kind.tag() != Tag::ObjectIdentifier {
            return Err(AttestationError::Decode(format!(
                "AttestationStatement type is a {}, not an OBJECT IDENTIFIER",
                statement.kind.tag()
            )));
        }
        statements.push(AttestationStatement {
            format: FormatOid::from_der_content(statement.kind.value())?,
            stmt_der: statement
                .stmt
                .to_der()
                .map_err(|e| AttestationError::Decode(format!("AttestationStatement stmt: {e}")))?,
            hint: statement.hint.map(|h| h.to_string()),
        });
    }
    let mut certs = Vec::new();
    if let Some(choices) = wire.certs {
        if choices.is_empty() {
            return Err(AttestationError::Decode(
                "AttestationBundle: certs is present but empty (SIZE(1..MAX))".to_string(),
            ));
        }
        for choice in choices {
            // LimitedCertChoices: `certificate` (a SEQUENCE) or `other [3]`; only the
            // former helps here.
            if choice.tag() == Tag::Sequence {
                let der = choice
                    .to_der()
                    .map_err(|e| AttestationError::Decode(format!("certs: {e}")))?;
                certs.push(
                    Certificate::from_der(&der)
                        .map_err(|e| AttestationError::Decode(format!("certs: {e}")))?,
                );
            }
        }
    }
    Ok(AttestationBundle { statements, certs })
}

/// Verify the key attestation of a CSR: exactly one `id-aa-attestation` attribute with one
/// bundle holding one statement in the registered format, verified with the registered
/// attester key, attesting the key in `csr_spki_der` (the CSR's SubjectPublicKeyInfo DER).
pub fn verify_csr_attestation(
    formats: &Formats,
    attributes: &Attributes,
    csr_spki_der: &[u8],
    attester: &Attester,
) -> Result<Verified, AttestationError> {
    verify_csr_attestation_evidence(formats, attributes, csr_spki_der, attester).map(|e| e.verified)
}

/// A verified CSR attestation with what the CMF checks next: the qualifying data (for
/// freshness) and the bundle's certificates (path hints that may anchor the attester).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedEvidence {
    pub verified: Verified,
    /// TPMS_ATTEST.extraData (TPM formats).
    pub qualifying_data: Option<Vec<u8>>,
    /// DER of the bundle's `certs`.
    pub certs: Vec<Vec<u8>>,
}

/// [`verify_csr_attestation`], returning the evidence the anchoring and freshness checks use.
pub fn verify_csr_attestation_evidence(
    formats: &Formats,
    attributes: &Attributes,
    csr_spki_der: &[u8],
    attester: &Attester,
) -> Result<VerifiedEvidence, AttestationError> {
    let found: Vec<_> = attributes
        .iter()
        .filter(|a| a.oid == ID_AA_ATTESTATION)
        .collect();
    let attribute = match found.as_slice() {
        [] => return Err(AttestationError::Missing),
        [one] => one,
        more => {
            return Err(AttestationError::MoreThanOneAttribute { count: more.len() });
        }
    };
    let value = match attribute.values.as_slice() {
        [one] => one,
        [] => {
            return Err(AttestationError::Decode(
                "the id-aa-attestation attribute has no value".to_string(),
            ))
        }
        more => return Err(AttestationError::MoreThanOneValue { count: more.len() }),
    };
    let value_der = value
        .to_der()
        .map_err(|e| AttestationError::Decode(format!("attribute value: {e}")))?;
    let bundle = decode_bundle(&value_der)?;
    // One attester is registered, so one statement is expected. A bundle with more (e.g.
    // platform evidence alongside) is refused rather than partly verified.
    let statement = match bundle.statements.as_slice() {
        [one] => one,
        more => return Err(AttestationError::MoreThanOneStatement { count: more.len() }),
    };
    let (verified, qualifying_data) =
        verify_statement_evidence(formats, statement, csr_spki_der, attester)?;
    let certs = bundle
        .certs
        .iter()
        .map(|c| c.to_der())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| AttestationError::Decode(format!("certs: {e}")))?;
    Ok(VerifiedEvidence {
        verified,
        qualifying_data,
        certs,
    })
}

/// Verify one decoded statement against the registered attester and the CSR's key.
pub fn verify_statement(
    formats: &Formats,
    statement: &AttestationStatement,
    csr_spki_der: &[u8],
    attester: &Attester,
) -> Result<Verified, AttestationError> {
    verify_statement_evidence(formats, statement, csr_spki_der, attester).map(|(v, _)| v)
}

/// [`verify_statement`], with the TPM qualifying data.
fn verify_statement_evidence(
    formats: &Formats,
    statement: &AttestationStatement,
    csr_spki_der: &[u8],
    attester: &Attester,
) -> Result<(Verified, Option<Vec<u8>>), AttestationError> {
    if statement.format != attester.format {
        return Err(AttestationError::WrongType {
            found: statement.format.clone(),
            registered: attester.format.clone(),
        });
    }
    let kind = formats
        .kind(&statement.format)
        .ok_or_else(|| AttestationError::UnknownFormat(statement.format.clone()))?;
    match kind {
        VerifierKind::Tpm2Certify => {
            let extra_data = tpm::verify(&statement.stmt_der, csr_spki_der, attester)?;
            Ok((
                Verified {
                    format: statement.format.clone(),
                    // Both are required by tpm::verify; a success means both were verified.
                    tpm_fixed: true,
                    tpm_residency: true,
                },
                Some(extra_data),
            ))
        }
        VerifierKind::X509KeyCertificate => {
            x509::verify(&statement.stmt_der, csr_spki_der, attester)?;
            Ok((
                Verified {
                    format: statement.format.clone(),
                    tpm_fixed: false,
                    tpm_residency: false,
                },
                None,
            ))
        }
    }
}

// ----------------------------------------------------------------------------------------
// Wire types

#[derive(Sequence)]
struct BundleWire {
    attestations: Vec<StatementWire>,
    #[asn1(optional = "true")]
    certs: Option<Vec<Any>>,
}

#[derive(Sequence)]
struct StatementWire {
    kind: Any,
    stmt: Any,
    #[asn1(optional = "true")]
    hint: Option<Ia5String>,
}

/// Equality of secrets-independent but attacker-chosen byte strings without an early exit.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_format_oid_encodes_as_documented() {
        let oid: FormatOid = X509_KEY_CERTIFICATE_FORMAT.parse().unwrap();
        assert_eq!(
            hex::encode(oid.to_der().unwrap()),
            "061569 81bcbbb2eac9c9ca93cfacddd6a0a2befb8e31 01".replace(' ', "")
        );
        assert_eq!(oid.to_string(), X509_KEY_CERTIFICATE_FORMAT);
        let tpm: FormatOid = TPM2_CERTIFY_FORMAT.parse().unwrap();
        assert_eq!(tpm.as_bytes(), &[0x67, 0x81, 0x05, 0x14, 0x01]);
        assert_eq!(tpm.to_string(), TPM2_CERTIFY_FORMAT);
        let round = FormatOid::from_der_content(oid.as_bytes()).unwrap();
        assert_eq!(round, oid);
        assert_ne!(round, tpm);
    }

    #[test]
    fn bad_oids_are_refused() {
        for text in ["", "1", "3.1", "1.40", "1..2", "1.2.x", "1.2.-3"] {
            assert!(text.parse::<FormatOid>().is_err(), "{text}");
        }
        for bytes in [&[][..], &[0x80, 0x01], &[0x2a, 0x81]] {
            assert!(FormatOid::from_der_content(bytes).is_err(), "{bytes:?}");
        }
        let too_big = [0xff; 20];
        let mut too_big = too_big.to_vec();
        too_big.push(0x01);
        assert!(FormatOid::from_der_content(&too_big).is_err());
    }

    #[test]
    fn default_formats_and_aliases() {
        let formats = Formats::default();
        let tpm: FormatOid = TPM2_CERTIFY_FORMAT.parse().unwrap();
        let x509: FormatOid = X509_KEY_CERTIFICATE_FORMAT.parse().unwrap();
        assert_eq!(formats.kind(&tpm), Some(VerifierKind::Tpm2Certify));
        assert_eq!(formats.kind(&x509), Some(VerifierKind::X509KeyCertificate));
        let alias: FormatOid = "1.3.6.1.4.1.99999.1".parse().unwrap();
        assert_eq!(formats.kind(&alias), None);
        let formats = formats.with_alias(alias.clone(), VerifierKind::Tpm2Certify);
        assert_eq!(formats.kind(&alias), Some(VerifierKind::Tpm2Certify));
    }

    #[test]
    fn bundle_round_trips_and_is_strict() {
        let bundle = AttestationBundle {
            statements: vec![AttestationStatement {
                format: TPM2_CERTIFY_FORMAT.parse().unwrap(),
                stmt_der: vec![0x30, 0x00],
                hint: Some("tpmverifier.example.com".to_string()),
            }],
            certs: Vec::new(),
        };
        let der = bundle.to_der().unwrap();
        assert_eq!(decode_bundle(&der).unwrap(), bundle);
        let mut trailing = der.clone();
        trailing.push(0);
        assert!(matches!(
            decode_bundle(&trailing),
            Err(AttestationError::Decode(_))
        ));
        // type as an INTEGER instead of an OID
        let mut wrong = der.clone();
        wrong[6] = 0x02;
        assert!(matches!(
            decode_bundle(&wrong),
            Err(AttestationError::Decode(_))
        ));
        // empty attestations
        assert!(matches!(
            decode_bundle(&[0x30, 0x02, 0x30, 0x00]),
            Err(AttestationError::Decode(_))
        ));
    }
}
