//! Trust domains as policy: which names, certTypes and CAs a consumer may use (issue 10),
//! resolved once from `[cmf]`, and the names nobody may register.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use x509_cert::ext::pkix::name::GeneralName;

use super::{check_label, SubjectName, MAX_NAME};
use crate::cmf::CertType;
use crate::config::{CmfConfig, Config};

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

/// Shell-style match: `*` any run of characters (also none), `?` one character: the
/// semantics of `vnfc_id_patterns`, also where direct mode checks a VNFC's identifier.
pub fn glob(pattern: &[u8], text: &[u8]) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_config_reserves_consumer_and_sm_names() {
        let config = Config::parse(include_str!("../../../systemd/warden.toml")).expect("parses");
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
