//! Names the CMF certifies: their syntax (here), the one namespace they share across
//! certTypes ([`index`]), and the trust-domain policy that decides who may register which
//! ([`policy`]).
//!
//! # Syntax (checked at Register, IFA 033 11.2.2.4 "input attribute is not appropriate")
//!
//! A subject identifier is exactly one of:
//!
//! - a **DNS host name**: two or more labels in the preferred name syntax of RFC 1035 2.3.1
//!   as relaxed by RFC 1123 2.1 (letters, digits, `-`; a label 1 to 63 characters, neither
//!   starting nor ending with `-`; the whole name at most 253), compared and issued in lower
//!   case. No `_` (not a host name character), no empty label (`.dot`, `a..b`, `a.`), no
//!   wildcard, and the last label not all digits (RFC 1123 2.1: a host name never looks
//!   like a dotted-decimal address). Internationalized names are given as A-labels
//!   (`xn--...`, RFC 5890 2.3.2.1); U-labels (non-ASCII) are refused, and so are other
//!   "reserved LDH" labels with `--` in positions 3 and 4 (RFC 5891 4.2.3.1). Issued as a
//!   dNSName (RFC 5280 4.2.1.6).
//! - an **IP address**: IPv4 dotted decimal or IPv6 text (RFC 4291 2.2), stored in its
//!   canonical form (RFC 5952). Issued as an iPAddress.
//! - a **VNFC identifier** (VNFCI_CERT only): a single label of the same LDH syntax,
//!   lower-cased: `[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?` (a UUID fits). A single label is not
//!   a valid dNSName for a relying party (pkilint `pkix.invalid_domain_name_syntax`), so it
//!   is never issued as one: it is the certificate subject's commonName (RFC 5280 4.1.2.6,
//!   one VNFC instance per certificate), and with `[cmf] vnfc_id_uri = true` also the URI
//!   `urn:etsi:nfv:vnfc:<id>` ([`VNFC_URN_PREFIX`]; RFC 5280 4.2.1.6 permits URNs, pkilint
//!   0.13 flags every URN, hence off by default). A CSR may ask for it by its commonName or
//!   by that URI.
//!
//! MANO_CERT subjects are DNS host names only (IFA 033 11.2.2.2: "FQDN of the certificate
//! target MANO entity"); VNF_OAM_CERT subjects are DNS host names or IP addresses.
//!
//! # One namespace
//!
//! The subject index ([`SUBJECTS`](super::SUBJECTS)) holds one key per name, whatever the
//! certType: `dns:<name>`, `ip:<address>`, `vnfc:<id>` ([`SubjectName::index_key`]). A name
//! has one manager. Stores written before (keys `{certType}/{subject}`) are rewritten on open
//! by [`upgrade_index`]; where two registrations held one name, the older keeps it and the
//! other's claim is recorded as blocked (audit `cmf.names.conflict`), so no two managers
//! ever hold one name.

mod index;
mod policy;

pub use index::{blocked, upgrade_index, Blocked, Upgrade};
pub use policy::{ca_ids, check_config, glob, NamePolicy, Policies};

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use der::asn1::{Ia5String, OctetString};
use x509_cert::ext::pkix::name::GeneralName;

use super::CertType;

/// The URI under which a VNFC identifier is certified where `[cmf] vnfc_id_uri` asks for it
/// (a subjectAltName uniformResourceIdentifier, RFC 5280 4.2.1.6), and by which a CSR may
/// ask for one. ETSI defines no URN for VNFC instances; this is nfv-warden's form, and a
/// relying party compares the whole URI.
pub const VNFC_URN_PREFIX: &str = "urn:etsi:nfv:vnfc:";

const MAX_NAME: usize = 253;
const MAX_LABEL: usize = 63;

/// A subject identifier, parsed and in canonical form.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SubjectName {
    Dns(String),
    Ip(IpAddr),
    Vnfc(String),
}

/// Why a name is refused: the name and the rule it breaks.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("'{name}' {rule}")]
pub struct NameError {
    pub name: String,
    pub rule: String,
}

impl SubjectName {
    /// Parse a subject identifier as registered (see the module notes for the rules).
    pub fn parse(text: &str) -> Result<SubjectName, NameError> {
        let refuse = |rule: &str| NameError {
            name: text.chars().take(300).collect(),
            rule: rule.to_string(),
        };
        if text.is_empty() {
            return Err(refuse("is empty"));
        }
        if let Ok(ip) = IpAddr::from_str(text) {
            return Ok(SubjectName::Ip(ip));
        }
        if text.len() > VNFC_URN_PREFIX.len()
            && text[..VNFC_URN_PREFIX.len()].eq_ignore_ascii_case(VNFC_URN_PREFIX)
        {
            let id = &text[VNFC_URN_PREFIX.len()..];
            return match SubjectName::parse(id) {
                Ok(SubjectName::Vnfc(id)) => Ok(SubjectName::Vnfc(id)),
                Ok(_) => Err(refuse(
                    "is not a VNFC identifier URI: the identifier after urn:etsi:nfv:vnfc: \
                     is one label (letters, digits, '-')",
                )),
                Err(e) => Err(refuse(&format!("is not a VNFC identifier URI: {}", e.rule))),
            };
        }
        if !text.is_ascii() {
            return Err(refuse(
                "is not ASCII: give an internationalized name as A-labels (xn--..., RFC 5890 \
                 2.3.2.1)",
            ));
        }
        if text.contains(':') {
            return Err(refuse(
                "contains ':', which only an IPv6 address may (subjects are DNS host names, \
                 IP addresses or VNFC identifiers)",
            ));
        }
        if text.len() > MAX_NAME {
            return Err(refuse("is longer than 253 characters (RFC 1035 2.3.4)"));
        }
        if text.contains('*') {
            return Err(refuse("is a wildcard: only exact names are registered"));
        }
        let lower = text.to_ascii_lowercase();
        if lower.ends_with('.') {
            return Err(refuse(
                "ends with '.': give the name without the root label (RFC 5280 4.2.1.6)",
            ));
        }
        let labels: Vec<&str> = lower.split('.').collect();
        for label in &labels {
            check_label(label).map_err(|rule| refuse(&rule))?;
        }
        if labels.len() == 1 {
            return Ok(SubjectName::Vnfc(lower));
        }
        if labels
            .last()
            .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(refuse(
                "has an all-numeric last label: neither a host name (RFC 1123 2.1) nor an IPv4 \
                 address",
            ));
        }
        Ok(SubjectName::Dns(lower))
    }

    /// The name as stored and shown: lower case, IP addresses canonical (RFC 5952).
    pub fn canonical(&self) -> String {
        match self {
            SubjectName::Dns(name) | SubjectName::Vnfc(name) => name.clone(),
            SubjectName::Ip(ip) => ip.to_string(),
        }
    }

    /// The key of the one namespace of names.
    pub fn index_key(&self) -> String {
        match self {
            SubjectName::Dns(name) => format!("dns:{name}"),
            SubjectName::Ip(ip) => format!("ip:{ip}"),
            SubjectName::Vnfc(id) => format!("vnfc:{id}"),
        }
    }

    /// What kind of name, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            SubjectName::Dns(_) => "DNS name",
            SubjectName::Ip(_) => "IP address",
            SubjectName::Vnfc(_) => "VNFC identifier",
        }
    }

    /// The subjectAltName it is issued as (RFC 5280 4.2.1.6); a VNFC identifier's only
    /// where configured (module notes).
    pub fn general_name(&self) -> Result<GeneralName, String> {
        match self {
            SubjectName::Dns(name) => Ia5String::new(name)
                .map(GeneralName::DnsName)
                .map_err(|e| format!("dNSName {name}: {e}")),
            SubjectName::Ip(ip) => {
                let bytes = match ip {
                    IpAddr::V4(v4) => v4.octets().to_vec(),
                    IpAddr::V6(v6) => v6.octets().to_vec(),
                };
                OctetString::new(bytes)
                    .map(GeneralName::IpAddress)
                    .map_err(|e| format!("iPAddress {ip}: {e}"))
            }
            SubjectName::Vnfc(id) => Ia5String::new(&format!("{VNFC_URN_PREFIX}{id}"))
                .map(GeneralName::UniformResourceIdentifier)
                .map_err(|e| format!("URI {VNFC_URN_PREFIX}{id}: {e}")),
        }
    }

    /// Whether `cert_type` certifies this kind of name (module notes).
    pub fn allowed_for(&self, cert_type: CertType) -> Result<(), String> {
        match (cert_type, self) {
            (CertType::ManoCert, SubjectName::Dns(_)) => Ok(()),
            (CertType::ManoCert, _) => Err(format!(
                "is a {}: MANO_CERT subjects are FQDNs (IFA 033 11.2.2.2)",
                self.kind()
            )),
            (CertType::VnfOamCert, SubjectName::Vnfc(_)) => Err(
                "is a single label: VNF_OAM_CERT subjects are DNS host names (two or more \
                 labels) or IP addresses; VNFC identifiers are registered as VNFCI_CERT"
                    .into(),
            ),
            _ => Ok(()),
        }
    }
}

impl fmt::Display for SubjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.canonical())
    }
}

/// The index key of a stored subject: its parsed form, or for a subject stored before the
/// syntax rules that no longer parses, `raw:<subject>` (it still blocks its spelling, and
/// is never issued).
pub fn stored_index_key(subject: &str) -> String {
    match SubjectName::parse(subject) {
        Ok(name) => name.index_key(),
        Err(_) => format!("raw:{}", subject.to_ascii_lowercase()),
    }
}

/// The syntax of a dNSName in the agent's own certificates (`tls init --san`): the label
/// rules of [`SubjectName::parse`], a single label allowed (`localhost`), and a wildcard only
/// as the whole leftmost label (RFC 6125 6.4.3).
pub fn check_host_name(text: &str) -> Result<(), String> {
    if text.is_empty() || text.len() > MAX_NAME || !text.is_ascii() {
        return Err("must be 1 to 253 ASCII characters (A-labels for IDNs)".into());
    }
    if text.ends_with('.') {
        return Err("ends with '.' (RFC 5280 4.2.1.6)".into());
    }
    for (i, label) in text.split('.').enumerate() {
        if i == 0 && label == "*" && text.contains('.') {
            continue;
        }
        check_label(&label.to_ascii_lowercase())?;
    }
    Ok(())
}

/// One LDH label (RFC 1035 2.3.1, RFC 1123 2.1, RFC 5891 4.2.3.1).
fn check_label(label: &str) -> Result<(), String> {
    if label.is_empty() {
        return Err("has an empty label (a leading '.', a trailing '.' or '..')".into());
    }
    if label.len() > MAX_LABEL {
        return Err(format!(
            "has a label longer than 63 characters ('{label}', RFC 1035 2.3.4)"
        ));
    }
    if label.contains('_') {
        return Err(
            "contains '_', which is not allowed in host names (RFC 1123 2.1 preferred name \
             syntax: letters, digits, '-')"
                .into(),
        );
    }
    if let Some(c) = label
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
    {
        return Err(format!(
            "contains '{c}': only letters, digits, '-' and '.' between labels are allowed \
             (RFC 1035 2.3.1)"
        ));
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err(format!(
            "has a label that starts or ends with '-' ('{label}', RFC 1035 2.3.1)"
        ));
    }
    if label.len() >= 4 && &label[2..4] == "--" && !label.starts_with("xn--") {
        return Err(format!(
            "has a reserved label with '--' in positions 3 and 4 ('{label}', RFC 5891 \
             4.2.3.1; only A-labels 'xn--' are allowed)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(text: &str) -> String {
        SubjectName::parse(text).unwrap_err().rule
    }

    #[test]
    fn syntax_cases_of_issue_10() {
        assert!(rule("vnfc_under").contains("'_'"));
        assert!(rule(".dot").contains("empty label"));
        assert!(rule("a..b").contains("empty label"));
        assert!(rule("a_b.example.net").contains("'_'"));
        assert!(rule("-lead").contains("starts or ends with '-'"));
        assert!(rule(":").contains("':'"));
        assert!(rule("a.example.").contains("ends with '.'"));
        assert!(rule("*.example.net").contains("wildcard"));
        assert!(rule("bücher.example").contains("A-labels"));
        assert!(rule("ab--c.example").contains("RFC 5891"));
        assert!(rule("1.2.3.999").contains("all-numeric"));
        assert!(rule(&format!("{}.example", "a".repeat(64))).contains("63"));
        assert!(rule(&format!("{}a", "a.".repeat(127))).contains("253"));
    }

    #[test]
    fn kinds_and_canonical_forms() {
        assert_eq!(
            SubjectName::parse("VNFC-0001").unwrap(),
            SubjectName::Vnfc("vnfc-0001".into())
        );
        assert_eq!(
            SubjectName::parse("urn:etsi:nfv:vnfc:Vnfc-0001").unwrap(),
            SubjectName::Vnfc("vnfc-0001".into())
        );
        assert_eq!(
            SubjectName::parse("Web.Example.NET").unwrap().index_key(),
            "dns:web.example.net"
        );
        assert_eq!(
            SubjectName::parse("2001:DB8:0::1").unwrap().index_key(),
            "ip:2001:db8::1"
        );
        assert!(SubjectName::parse("xn--bcher-kva.example").is_ok());
        assert!(SubjectName::parse("urn:etsi:nfv:vnfc:a.b").is_err());
    }

    #[test]
    fn own_certificate_host_names() {
        assert!(check_host_name("localhost").is_ok());
        assert!(check_host_name("*.example.net").is_ok());
        assert!(check_host_name("-lead").is_err());
        assert!(check_host_name("a*.example.net").is_err());
        assert!(check_host_name("a_b.example.net").is_err());
        assert!(check_host_name("a..b").is_err());
        assert!(check_host_name(":").is_err());
    }
}
