//! Names the CMF certifies: their syntax, the one namespace they share across certTypes, and
//! the trust-domain policy that decides who may register which.
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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use der::asn1::{Ia5String, OctetString};
use x509_cert::ext::pkix::name::GeneralName;

use super::{CertType, Registration, REGISTRATIONS, SUBJECTS};
use crate::config::{CmfConfig, Config};
use crate::store::{AuditEvent, Store, StoreError};

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

/// What a trust domain (narrowed for one consumer where configured) lets its consumers
/// register: names, certTypes, CAs.
#[derive(Clone, Debug)]
pub struct NamePolicy {
    pub trust_domain: String,
    /// The rules of the domain, then those of the consumer (both must permit a name).
    layers: Vec<Rules>,
    /// CAs that issue for this consumer, in order of preference.
    pub cas: Vec<String>,
    pub cert_types: Vec<CertType>,
}

#[derive(Clone, Debug)]
struct Rules {
    /// "cmf.trust_domain 'x'" or "cmf.consumer 'y'": named in refusals.
    origin: String,
    dns_suffixes: Option<Vec<String>>,
    vnfc_id_patterns: Option<Vec<String>>,
    ip_ranges: Option<Vec<ipnet::IpNet>>,
}

impl NamePolicy {
    /// Whether `name` is inside every permitted set; the refusal names the rule.
    pub fn permits(&self, name: &SubjectName) -> Result<(), String> {
        for rules in &self.layers {
            rules.permits(name)?;
        }
        Ok(())
    }
}

impl Rules {
    fn permits(&self, name: &SubjectName) -> Result<(), String> {
        let origin = &self.origin;
        match name {
            SubjectName::Dns(dns) => {
                let Some(suffixes) = &self.dns_suffixes else {
                    return Ok(());
                };
                if suffixes.iter().any(|s| dns_in(dns, s)) {
                    Ok(())
                } else {
                    Err(format!(
                        "is outside the DNS suffixes of {origin} (dns_suffixes = {suffixes:?})"
                    ))
                }
            }
            SubjectName::Vnfc(id) => {
                let Some(patterns) = &self.vnfc_id_patterns else {
                    return Ok(());
                };
                if patterns.iter().any(|p| glob(p.as_bytes(), id.as_bytes())) {
                    Ok(())
                } else {
                    Err(format!(
                        "matches none of the VNFC identifier patterns of {origin} \
                         (vnfc_id_patterns = {patterns:?})"
                    ))
                }
            }
            SubjectName::Ip(ip) => {
                let Some(ranges) = &self.ip_ranges else {
                    return Ok(());
                };
                if ranges.iter().any(|r| r.contains(ip)) {
                    Ok(())
                } else {
                    let shown: Vec<String> = ranges.iter().map(|r| r.to_string()).collect();
                    Err(format!(
                        "is outside the IP ranges of {origin} (ip_ranges = {shown:?})"
                    ))
                }
            }
        }
    }
}

/// `name` equals `suffix` or ends with `.suffix` (a label boundary: `evilexample.net` is not
/// under `example.net`).
fn dns_in(name: &str, suffix: &str) -> bool {
    name == suffix
        || (name.len() > suffix.len()
            && name.ends_with(suffix)
            && name.as_bytes()[name.len() - suffix.len() - 1] == b'.')
}

/// Shell-style match: `*` any run of characters (also none), `?` one character.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// The CMF's name policy, resolved from the configuration: per consumer, and the names no
/// consumer may register.
#[derive(Clone, Debug, Default)]
pub struct Policies {
    consumers: HashMap<String, Arc<NamePolicy>>,
    /// Index key -> why it is reserved.
    reserved: HashMap<String, String>,
}

impl Policies {
    /// From `[cmf]` (trust domains, consumers, CA ids) and the agent's own names: its TLS
    /// server certificate's names and the SM's interface identities.
    pub fn from_config(config: &Config) -> Result<Policies, String> {
        let cmf = config
            .cmf
            .as_ref()
            .ok_or_else(|| "config: no [cmf] section".to_string())?;
        check_config(cmf)?;
        let ca_ids = ca_ids(cmf);
        let mut domains = HashMap::new();
        for domain in &cmf.trust_domains {
            domains.insert(domain.id.clone(), domain);
        }
        let mut consumers = HashMap::new();
        let mut reserved = HashMap::new();
        for consumer in &cmf.consumers {
            // check_config: every consumer's domain exists.
            let Some(domain) = domains.get(&consumer.trust_domain) else {
                return Err(format!(
                    "cmf.consumer '{}': trust_domain '{}' is not defined",
                    consumer.id, consumer.trust_domain
                ));
            };
            let domain_types = cert_types(&domain.cert_types)?;
            let mut layers = vec![Rules {
                origin: format!("cmf.trust_domain '{}'", domain.id),
                dns_suffixes: Some(lower_all(&domain.dns_suffixes)),
                vnfc_id_patterns: Some(lower_all(&domain.vnfc_id_patterns)),
                ip_ranges: Some(ranges(&domain.ip_ranges)?),
            }];
            if consumer.dns_suffixes.is_some()
                || consumer.vnfc_id_patterns.is_some()
                || consumer.ip_ranges.is_some()
            {
                layers.push(Rules {
                    origin: format!("cmf.consumer '{}'", consumer.id),
                    dns_suffixes: consumer.dns_suffixes.as_deref().map(lower_all),
                    vnfc_id_patterns: consumer.vnfc_id_patterns.as_deref().map(lower_all),
                    ip_ranges: consumer.ip_ranges.as_deref().map(ranges).transpose()?,
                });
            }
            let cas = match &consumer.cas {
                Some(cas) => cas.clone(),
                None => domain.cas.clone(),
            };
            let types = match &consumer.cert_types {
                Some(types) => cert_types(types)?,
                None => domain_types,
            };
            debug_assert!(cas.iter().all(|ca| ca_ids.contains(ca)));
            consumers.insert(
                consumer.id.clone(),
                Arc::new(NamePolicy {
                    trust_domain: domain.id.clone(),
                    layers,
                    cas,
                    cert_types: types,
                }),
            );
            if let Ok(name) = SubjectName::parse(&consumer.id) {
                reserved.insert(
                    name.index_key(),
                    "is the identity of a consumer of this CMF".to_string(),
                );
            }
        }
        for name in agent_names(config)? {
            if let Ok(parsed) = SubjectName::parse(&name) {
                reserved
                    .entry(parsed.index_key())
                    .or_insert_with(|| "is one of this agent's own names".to_string());
            }
        }
        Ok(Policies {
            consumers,
            reserved,
        })
    }

    /// The policy of a configured consumer.
    pub fn consumer(&self, id: &str) -> Option<&Arc<NamePolicy>> {
        self.consumers.get(id)
    }

    /// Why `name` is reserved (no consumer may register it), if it is.
    pub fn reserved(&self, name: &SubjectName) -> Option<&str> {
        self.reserved.get(&name.index_key()).map(String::as_str)
    }

    /// Everything a registration of `names` for `cert_type` by `policy` must satisfy:
    /// syntax per type, reserved names, the domain's (and consumer's) permitted sets.
    pub fn check(
        &self,
        policy: &NamePolicy,
        cert_type: CertType,
        name: &SubjectName,
    ) -> Result<(), String> {
        name.allowed_for(cert_type)?;
        if let Some(why) = self.reserved(name) {
            return Err(why.to_string());
        }
        policy.permits(name)
    }
}

/// The ids of the CAs a CMF configuration defines.
pub fn ca_ids(cmf: &CmfConfig) -> Vec<String> {
    if cmf.cas.is_empty() {
        vec!["default".to_string()]
    } else {
        cmf.cas.iter().map(|ca| ca.id.clone()).collect()
    }
}

/// Check `[[cmf.trust_domain]]` and the consumers' narrowing at load: one line naming the
/// key and the rule.
pub fn check_config(cmf: &CmfConfig) -> Result<(), String> {
    let ca_ids = ca_ids(cmf);
    let mut domains: HashMap<&str, &crate::config::TrustDomainConfig> = HashMap::new();
    for domain in &cmf.trust_domains {
        let at = format!("cmf.trust_domain '{}'", domain.id);
        if domain.id.is_empty() {
            return Err("cmf.trust_domain: id must not be empty".into());
        }
        if domains.insert(&domain.id, domain).is_some() {
            return Err(format!("{at}: defined twice"));
        }
        check_rules(
            &at,
            Some(&domain.dns_suffixes),
            Some(&domain.vnfc_id_patterns),
            Some(&domain.ip_ranges),
        )?;
        if domain.cas.is_empty() {
            return Err(format!(
                "{at}.cas: list the CAs that issue for this domain (defined: {ca_ids:?})"
            ));
        }
        for ca in &domain.cas {
            if !ca_ids.contains(ca) {
                return Err(format!(
                    "{at}.cas: '{ca}' is not a CA of this CMF (defined: {ca_ids:?})"
                ));
            }
        }
        cert_types(&domain.cert_types).map_err(|e| format!("{at}.cert_types: {e}"))?;
    }
    let mut seen = HashSet::new();
    for consumer in &cmf.consumers {
        let at = format!("cmf.consumer '{}'", consumer.id);
        if !seen.insert(&consumer.id) {
            return Err(format!("{at}: listed twice"));
        }
        let Some(domain) = domains.get(consumer.trust_domain.as_str()) else {
            return Err(format!(
                "{at}: trust_domain '{}' is not defined: add a [[cmf.trust_domain]] with id = \
                 \"{}\" listing the DNS suffixes, VNFC identifier patterns, IP ranges and CAs \
                 its consumers may use (no domain permits every name)",
                consumer.trust_domain, consumer.trust_domain
            ));
        };
        check_rules(
            &at,
            consumer.dns_suffixes.as_ref(),
            consumer.vnfc_id_patterns.as_ref(),
            consumer.ip_ranges.as_ref(),
        )?;
        if let Some(cas) = &consumer.cas {
            for ca in cas {
                if !domain.cas.contains(ca) {
                    return Err(format!(
                        "{at}.cas: '{ca}' is not among the CAs of trust domain '{}' ({:?})",
                        domain.id, domain.cas
                    ));
                }
            }
            if cas.is_empty() {
                return Err(format!("{at}.cas: empty (omit it to use the domain's)"));
            }
        }
        if let Some(types) = &consumer.cert_types {
            let domain_types = cert_types(&domain.cert_types)?;
            for t in cert_types(types).map_err(|e| format!("{at}.cert_types: {e}"))? {
                if !domain_types.contains(&t) {
                    return Err(format!(
                        "{at}.cert_types: {t} is not permitted by trust domain '{}'",
                        domain.id
                    ));
                }
            }
        }
    }
    Ok(())
}

fn check_rules(
    at: &str,
    dns_suffixes: Option<&Vec<String>>,
    vnfc_id_patterns: Option<&Vec<String>>,
    ip_ranges: Option<&Vec<String>>,
) -> Result<(), String> {
    for suffix in dns_suffixes.into_iter().flatten() {
        let lower = suffix.to_ascii_lowercase();
        if !suffix.is_ascii()
            || lower.is_empty()
            || lower.len() > MAX_NAME
            || lower.split('.').any(|label| check_label(label).is_err())
        {
            return Err(format!(
                "{at}.dns_suffixes: '{suffix}' is not a DNS name in the preferred name syntax \
                 (LDH labels, no leading or trailing '.')"
            ));
        }
    }
    for pattern in vnfc_id_patterns.into_iter().flatten() {
        if pattern.is_empty()
            || !pattern
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'*' | b'?'))
        {
            return Err(format!(
                "{at}.vnfc_id_patterns: '{pattern}' may contain only letters, digits, '-' and \
                 the wildcards '*' and '?'"
            ));
        }
    }
    for range in ip_ranges.into_iter().flatten() {
        ipnet::IpNet::from_str(range).map_err(|e| {
            format!("{at}.ip_ranges: '{range}' is not a CIDR range like 10.0.0.0/8: {e}")
        })?;
    }
    Ok(())
}

fn lower_all(items: &[String]) -> Vec<String> {
    items.iter().map(|s| s.to_ascii_lowercase()).collect()
}

fn ranges(items: &[String]) -> Result<Vec<ipnet::IpNet>, String> {
    items
        .iter()
        .map(|r| {
            ipnet::IpNet::from_str(r)
                .map(|net| net.trunc())
                .map_err(|e| format!("ip range '{r}': {e}"))
        })
        .collect()
}

fn cert_types(names: &[String]) -> Result<Vec<CertType>, String> {
    names
        .iter()
        .map(|t| {
            CertType::parse(t).ok_or_else(|| {
                format!("unknown certType '{t}' (MANO_CERT, VNFCI_CERT, VNF_OAM_CERT)")
            })
        })
        .collect()
}

/// The agent's own names: its TLS server certificate's commonName and DNS / IP
/// subjectAltNames, and the SM's identities (`<name>`, `<name>.<interface>`).
fn agent_names(config: &Config) -> Result<Vec<String>, String> {
    let mut names = Vec::new();
    if let Some(server) = &config.server {
        let path = &server.tls_certificate;
        // A server without its certificate fails at start anyway; an operator command
        // without an agent (no certificate yet) only loses these reserved names, which
        // Register (in the agent) always has.
        if let Ok(text) = std::fs::read_to_string(path) {
            let certs = crate::pki::certificates_from_pem(&text)
                .map_err(|e| format!("server.tls_certificate {}: {e}", path.display()))?;
            if let Some(leaf) = certs.first() {
                names.extend(certificate_names(leaf));
            }
        }
    }
    if let Some(sm) = &config.sm {
        names.push(sm.name.clone());
        for interface in crate::sm::nfvo::Interface::ALL {
            names.push(format!(
                "{}.{}",
                sm.name,
                interface.name().replace('_', "-")
            ));
        }
    }
    Ok(names)
}

/// commonName values and DNS / IP subjectAltNames of a certificate.
fn certificate_names(certificate: &x509_cert::Certificate) -> Vec<String> {
    use der::Decode;
    let tbs = certificate.tbs_certificate();
    let mut names = Vec::new();
    for atv in tbs.subject().iter() {
        if atv.oid == const_oid::db::rfc4519::CN {
            if let Ok(s) = atv.value.decode_as::<der::asn1::Utf8StringRef<'_>>() {
                names.push(s.as_str().to_string());
            } else if let Ok(s) = atv.value.decode_as::<der::asn1::PrintableStringRef<'_>>() {
                names.push(s.as_str().to_string());
            }
        }
    }
    for ext in tbs.extensions().into_iter().flatten() {
        if ext.extn_id != const_oid::db::rfc5280::ID_CE_SUBJECT_ALT_NAME {
            continue;
        }
        if let Ok(san) = x509_cert::ext::pkix::SubjectAltName::from_der(ext.extn_value.as_bytes()) {
            for name in san.0 {
                match name {
                    GeneralName::DnsName(dns) => names.push(dns.to_string()),
                    GeneralName::IpAddress(ip) => match ip.as_bytes().len() {
                        4 => {
                            let b: [u8; 4] = ip.as_bytes().try_into().unwrap_or_default();
                            names.push(IpAddr::from(b).to_string());
                        }
                        16 => {
                            let b: [u8; 16] = ip.as_bytes().try_into().unwrap_or_default();
                            names.push(IpAddr::from(b).to_string());
                        }
                        _ => {}
                    },
                    _ => {}
                }
            }
        }
    }
    names
}

/// A subject index entry a registration claims but does not hold (migration conflicts).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Blocked {
    pub subject: String,
    /// The registration that holds the name.
    pub held_by: String,
}

/// The subjects of `registration` that the index gives to another registration (after a
/// migration conflict), with the holder.
pub fn blocked(
    tx: &crate::store::ReadTx,
    registration: &Registration,
) -> Result<Vec<Blocked>, StoreError> {
    let mut out = Vec::new();
    for subject in &registration.subject_ids {
        let holder = tx.get(&SUBJECTS, &stored_index_key(subject))?;
        if holder.as_deref() != Some(registration.id.as_str()) {
            out.push(Blocked {
                subject: subject.clone(),
                held_by: holder.unwrap_or_else(|| "(nobody)".into()),
            });
        }
    }
    Ok(out)
}

/// certType prefixes of the subject index before one namespace (`{certType}/{subject}`).
const OLD_PREFIXES: [&str; 3] = ["MANO_CERT/", "VNFCI_CERT/", "VNF_OAM_CERT/"];

/// What [`upgrade_index`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Upgrade {
    /// Old index entries rewritten.
    pub migrated: usize,
    /// Names two registrations held: (name key, kept registration, blocked registrations).
    pub conflicts: Vec<(String, String, Vec<String>)>,
}

/// Rewrite a subject index written before one namespace (keys `{certType}/{subject}`) into
/// one key per name, in one durable transaction with an audit entry. Where two
/// registrations held one name (possible before, across certTypes), the older (by
/// `created`, then id) keeps it; the other keeps its registration but cannot use the name
/// (`warden cmf registrations` shows it blocked) until the operator transfers or deletes one
/// of them. Idempotent: a store without old keys is left as it is.
pub fn upgrade_index(store: &Store, actor: &str) -> Result<Upgrade, StoreError> {
    let old: Vec<(String, String)> = store.read(|tx| {
        let mut all = Vec::new();
        for prefix in OLD_PREFIXES {
            all.extend(tx.list(&SUBJECTS, prefix)?);
        }
        Ok(all)
    })?;
    if old.is_empty() {
        return Ok(Upgrade::default());
    }
    store.write(|tx| {
        // New key -> candidate registration ids.
        let mut claims: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut migrated = 0;
        for (key, registration_id) in &old {
            // Re-read inside the write: the snapshot above may be stale.
            if tx.get(&SUBJECTS, key)?.is_none() {
                continue;
            }
            let subject = OLD_PREFIXES
                .iter()
                .find_map(|p| key.strip_prefix(p))
                .unwrap_or(key);
            claims
                .entry(stored_index_key(subject))
                .or_default()
                .push(registration_id.clone());
            tx.delete(&SUBJECTS, key)?;
            migrated += 1;
        }
        let mut conflicts = Vec::new();
        for (name_key, mut ids) in claims {
            ids.sort();
            ids.dedup();
            let mut candidates = Vec::new();
            if let Some(holder) = tx.get(&SUBJECTS, &name_key)? {
                // Already in the new index: it keeps the name.
                candidates.push((String::new(), holder));
            }
            for id in &ids {
                if let Some(registration) = tx.get(&REGISTRATIONS, id)? {
                    candidates.push((registration.created, id.clone()));
                }
            }
            candidates.sort();
            candidates.dedup_by(|a, b| a.1 == b.1);
            let Some((_, kept)) = candidates.first().cloned() else {
                continue;
            };
            tx.put(&SUBJECTS, &name_key, &kept)?;
            let others: Vec<String> = candidates
                .into_iter()
                .map(|(_, id)| id)
                .filter(|id| *id != kept)
                .collect();
            if !others.is_empty() {
                tracing::warn!(name = %name_key, kept = %kept, blocked = ?others,
                    "two registrations held one name: the older keeps it");
                tx.audit(
                    AuditEvent::new(actor, "cmf.names.conflict", &name_key)
                        .with_detail(serde_json::json!({ "kept": kept, "blocked": others })),
                );
                conflicts.push((name_key, kept, others));
            }
        }
        tx.audit(
            AuditEvent::new(actor, "cmf.names.migrate", "cmf_subjects").with_detail(
                serde_json::json!({ "migrated": migrated, "conflicts": conflicts.len() }),
            ),
        );
        Ok(Upgrade {
            migrated,
            conflicts,
        })
    })
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

    #[test]
    fn reference_config_reserves_consumer_and_sm_names() {
        let config = Config::parse(include_str!("../../systemd/warden.toml")).expect("parses");
        let policies = Policies::from_config(&config).expect("policies");
        let reserved = |name: &str| policies.reserved(&SubjectName::parse(name).unwrap());
        assert!(reserved("vnfm-1.operator.example").is_some_and(|why| why.contains("consumer")));
        assert!(reserved("warden-sm").is_some_and(|why| why.contains("own names")));
        assert!(reserved("warden-sm.ns-lcm").is_some());
        assert!(reserved("warden-sm.security-vnf-mgmt").is_some());
        assert!(reserved("vnfc-1").is_none());
        let policy = policies
            .consumer("vnfm-1.operator.example")
            .expect("consumer");
        assert_eq!(policy.trust_domain, "operator");
        assert_eq!(policy.cas, vec!["default".to_string()]);
        assert!(policy
            .permits(&SubjectName::parse("web.vnf.operator.example").unwrap())
            .is_ok());
        assert!(policy
            .permits(&SubjectName::parse("10.21.0.1").unwrap())
            .unwrap_err()
            .contains("ip_ranges"));
    }

    #[test]
    fn trust_domain_config_errors_name_the_key() {
        let base = "[cmf]\nclient_ca = \"/r.pem\"\n";
        let parse = |rest: &str| Config::parse(&format!("{base}{rest}")).unwrap_err();
        let consumer = "[[cmf.consumer]]\nid = \"v\"\ntrust_domain = \"d\"\n";
        assert!(parse(consumer).contains("cmf.consumer 'v': trust_domain 'd' is not defined"));
        let domain = |body: &str| format!("[[cmf.trust_domain]]\nid = \"d\"\n{body}\n{consumer}");
        assert!(parse(&domain("cas = [\"x\"]")).contains("'x' is not a CA of this CMF"));
        assert!(parse(&domain("cas = []")).contains("cmf.trust_domain 'd'.cas"));
        assert!(parse(&domain(
            "cas = [\"default\"]\nip_ranges = [\"10.0.0.0/33\"]"
        ))
        .contains("ip_ranges: '10.0.0.0/33'"));
        assert!(
            parse(&domain("cas = [\"default\"]\ndns_suffixes = [\".x\"]"))
                .contains("dns_suffixes: '.x'")
        );
        assert!(
            parse(&domain("cas = [\"default\"]\nvnfc_id_patterns = [\"a_*\"]"))
                .contains("vnfc_id_patterns: 'a_*'")
        );
        assert!(parse(&domain("cas = [\"default\"]\ncert_types = [\"X\"]"))
            .contains("cert_types: unknown certType 'X'"));
        let narrowed = format!(
            "[[cmf.trust_domain]]\nid = \"d\"\ncas = [\"default\"]\n{consumer}cert_types = [\"MANO_CERT\"]\n"
        );
        assert!(parse(&narrowed).contains("MANO_CERT is not permitted by trust domain 'd'"));
    }

    #[test]
    fn suffixes_patterns_ranges() {
        assert!(dns_in("a.example.net", "example.net"));
        assert!(dns_in("example.net", "example.net"));
        assert!(!dns_in("evilexample.net", "example.net"));
        assert!(glob(b"vnfc-*", b"vnfc-0001"));
        assert!(glob(b"*-a?", b"x-a1"));
        assert!(!glob(b"vnfc-*", b"web-1"));
        assert!(glob(b"*", b""));
        let rules = Rules {
            origin: "t".into(),
            dns_suffixes: Some(vec!["a.example".into()]),
            vnfc_id_patterns: Some(vec![]),
            ip_ranges: Some(vec!["10.1.0.0/16".parse().unwrap()]),
        };
        assert!(rules
            .permits(&SubjectName::parse("10.1.2.3").unwrap())
            .is_ok());
        assert!(rules
            .permits(&SubjectName::parse("10.2.0.1").unwrap())
            .is_err());
        assert!(rules
            .permits(&SubjectName::parse("vnfc-1").unwrap())
            .is_err());
    }
}
