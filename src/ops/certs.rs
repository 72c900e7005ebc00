//! Issued certificates, as the operator sees them: `warden certs list|show|export`.
//!
//! The CMF keeps one [`IssuedRecord`] per certificate under `{caId}/{serial hex}`
//! ([`CERTIFICATES`]). What the record does not hold (subject DN, SANs) is read from the
//! certificate DER it carries. A CA holds millions of records: listing is paged by key
//! (`after`) and never loads more than a page.

use std::net::IpAddr;
use std::path::Path;

use base64::Engine;
use der::Decode;
use serde::{Deserialize, Serialize};
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::Certificate;

use super::OpsError;
use crate::cmf::records::SerialRef;
use crate::cmf::{CertType, IssuedRecord, Revocation, CERTIFICATES};
use crate::config::Config;
use crate::pki;
use crate::store::Store;

/// Most certificates one page returns.
pub const MAX_PAGE: usize = 10_000;

/// Which certificates to list.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateQuery {
    /// Only this consumer's (VNFM's) certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer: Option<String>,
    /// Continue after this certificate: a serial, or `caId/serial` (the `next` of a page).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// At most this many (capped at [`MAX_PAGE`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

/// One page of certificates, in `caId/serial` order.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificatePage {
    pub certificates: Vec<CertificateView>,
    /// Pass as `after` for the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// An issued certificate: the stored record, and what its DER says.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateView {
    pub serial_number: String,
    pub ca_id: String,
    /// Subject DN (RFC 4514), from the certificate; absent for records without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// subjectAltName entries (`DNS:`, `URI:`, `IP:`, `email:`), from the certificate; the
    /// registered subjects when the record has no certificate.
    pub subject_alt_names: Vec<String>,
    /// The consumer (VNFM) that requested it.
    pub consumer: String,
    pub registration_id: String,
    pub cert_type: CertType,
    /// The registered subject ids it was issued for.
    pub subjects: Vec<String>,
    pub issued_at: String,
    pub not_before: String,
    pub not_after: String,
    /// "verified", "not-requested" or "unattested: <reason>".
    pub attestation: String,
    /// The attestation statement format (OID) when one was verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attestation_format: Option<String>,
    pub revoked: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revocation: Option<Revocation>,
    /// SHA-256 of the SubjectPublicKeyInfo, hex.
    pub spki_sha256: String,
    /// The certificate, PEM; absent for records written before certificates were kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_pem: Option<String>,
}

/// A page of certificates. A consumer filter reads past non-matching records, but still
/// stops at `limit` matches.
pub fn list(store: &Store, query: &CertificateQuery) -> Result<CertificatePage, OpsError> {
    let limit = query.limit.unwrap_or(100).clamp(1, MAX_PAGE);
    let after =
        match &query.after {
            Some(after) => Some(store_key(store, after)?.ok_or_else(|| {
                OpsError::NotFound(format!("--after {after}: no such certificate"))
            })?),
            None => None,
        };
    let mut certificates = Vec::new();
    let mut last_key = None;
    let mut more = false;
    let mut failure = None;
    store.read(|tx| {
        tx.scan(&CERTIFICATES, after.as_deref(), |key, record| {
            if certificates.len() == limit {
                more = true;
                return false;
            }
            if query
                .consumer
                .as_ref()
                .is_some_and(|c| *c != record.consumer)
            {
                return true;
            }
            match view(record, false) {
                Ok(v) => certificates.push(v),
                Err(e) => {
                    failure = Some(e);
                    return false;
                }
            }
            last_key = Some(key.to_string());
            true
        })
    })?;
    if let Some(e) = failure {
        return Err(e);
    }
    Ok(CertificatePage {
        certificates,
        next: if more { last_key } else { None },
    })
}

/// One certificate, with its PEM, by serial (hex, any case, colons allowed) or
/// `caId/serial`.
pub fn show(store: &Store, serial: &str) -> Result<CertificateView, OpsError> {
    let key = store_key(store, serial)?
        .ok_or_else(|| OpsError::NotFound(format!("no certificate with serial {serial}")))?;
    let record = store
        .read(|tx| tx.get(&CERTIFICATES, &key))?
        .ok_or_else(|| OpsError::NotFound(format!("no certificate with serial {serial}")))?;
    view(record, true)
}

/// The certificate as PEM and, with `chain`, its issuing CA's certificates up to the root
/// (what `openssl verify -untrusted` or a VNF's trust store need), read from the
/// configured CA files.
pub fn export(
    store: &Store,
    config: &Config,
    serial: &str,
    chain: bool,
) -> Result<String, OpsError> {
    let view = show(store, serial)?;
    let mut pem = view.certificate_pem.ok_or_else(|| {
        OpsError::NotFound(format!(
            "certificate {serial} was issued before certificates were kept in the store; \
             only its record exists"
        ))
    })?;
    if chain {
        for certificate in ca_chain(config, &view.ca_id)? {
            pem.push_str(&pki::certificate_pem(&certificate).map_err(OpsError::Failed)?);
        }
    }
    Ok(pem)
}

/// The record key of `serial` (`cmf::records::SerialRef`: hex, colons, `0x`, optionally
/// `caId/`): as the store keys it (DER content octets; openssl prints the magnitude, without
/// the leading zero octet of a serial whose top bit is set), else as written (keys that are
/// not DER stay reachable); under the CA named, or under every CA id the store has.
fn store_key(store: &Store, serial: &str) -> Result<Option<String>, OpsError> {
    let parsed = SerialRef::parse(serial).map_err(OpsError::BadRequest)?;
    let mut forms = vec![parsed.der_hex.clone()];
    if parsed.written != parsed.der_hex {
        forms.push(parsed.written.clone());
    }
    for form in forms {
        if let Some(key) = store_key_as_written(store, parsed.ca.as_deref(), &form)? {
            return Ok(Some(key));
        }
    }
    Ok(None)
}

fn store_key_as_written(
    store: &Store,
    ca: Option<&str>,
    serial: &str,
) -> Result<Option<String>, OpsError> {
    store
        .read(|tx| {
            if let Some(ca) = ca {
                let key = format!("{ca}/{serial}");
                return Ok(tx.contains(&CERTIFICATES, &key)?.then_some(key));
            }
            // Keys are `{caId}/{serial}`: walk the CA ids by skipping from one CA's range to
            // the next (a few lookups per CA, however many certificates each holds).
            let mut after: Option<String> = None;
            loop {
                let mut next_ca = None;
                tx.scan(&CERTIFICATES, after.as_deref(), |key, _record| {
                    next_ca = key.split_once('/').map(|(ca, _)| ca.to_string());
                    false
                })?;
                let Some(ca) = next_ca else {
                    return Ok(None);
                };
                let key = format!("{ca}/{serial}");
                if tx.contains(&CERTIFICATES, &key)? {
                    return Ok(Some(key));
                }
                // Serials are hex: every key of this CA sorts before `{ca}/~`.
                after = Some(format!("{ca}/~"));
            }
        })
        .map_err(OpsError::from)
}

fn view(record: IssuedRecord, with_pem: bool) -> Result<CertificateView, OpsError> {
    let der = record
        .certificate
        .as_deref()
        .map(|b64| {
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| {
                    OpsError::Failed(format!(
                        "certificate {}: stored DER is not base64: {e}",
                        record.serial_number
                    ))
                })
        })
        .transpose()?;
    let certificate = der
        .as_deref()
        .map(|der| {
            Certificate::from_der(der).map_err(|e| {
                OpsError::Failed(format!(
                    "certificate {}: stored DER does not decode: {e}",
                    record.serial_number
                ))
            })
        })
        .transpose()?;
    let (subject, subject_alt_names) = match &certificate {
        Some(c) => (
            Some(c.tbs_certificate().subject().to_string()),
            alt_names(c),
        ),
        None => (None, record.subjects.clone()),
    };
    let certificate_pem = match (&der, with_pem) {
        (Some(der), true) => Some(pki::to_pem("CERTIFICATE", der).map_err(OpsError::Failed)?),
        _ => None,
    };
    Ok(CertificateView {
        serial_number: record.serial_number,
        ca_id: record.ca_id,
        subject,
        subject_alt_names,
        consumer: record.consumer,
        registration_id: record.registration_id,
        cert_type: record.cert_type,
        subjects: record.subjects,
        issued_at: record.issued_at,
        not_before: record.not_before,
        not_after: record.not_after,
        attestation: record.attestation,
        attestation_format: record.attestation_format,
        revoked: record.revocation.is_some(),
        revocation: record.revocation,
        spki_sha256: record.spki_sha256,
        certificate_pem,
    })
}

/// subjectAltName entries in OpenSSL's notation (RFC 5280 4.2.1.6).
fn alt_names(certificate: &Certificate) -> Vec<String> {
    let Ok(Some((_, san))) = certificate
        .tbs_certificate()
        .get_extension::<SubjectAltName>()
    else {
        return Vec::new();
    };
    san.0
        .iter()
        .map(|name| match name {
            GeneralName::DnsName(dns) => format!("DNS:{dns}"),
            GeneralName::UniformResourceIdentifier(uri) => format!("URI:{uri}"),
            GeneralName::Rfc822Name(mail) => format!("email:{mail}"),
            GeneralName::IpAddress(ip) => match ip.as_bytes().len() {
                4 => {
                    let mut octets = [0u8; 4];
                    octets.copy_from_slice(ip.as_bytes());
                    format!("IP:{}", IpAddr::from(octets))
                }
                16 => {
                    let mut octets = [0u8; 16];
                    octets.copy_from_slice(ip.as_bytes());
                    format!("IP:{}", IpAddr::from(octets))
                }
                _ => format!("IP:{}", hex::encode(ip.as_bytes())),
            },
            GeneralName::DirectoryName(name) => format!("DirName:{name}"),
            GeneralName::RegisteredId(oid) => format!("RID:{oid}"),
            GeneralName::OtherName(other) => format!("othername:{}", other.type_id),
            GeneralName::EdiPartyName(_) => "EdiPartyName:<unsupported>".to_string(),
        })
        .collect()
}

/// The certificates of CA `ca_id` from its configured files: the CA certificate, then its
/// chain up to the root.
fn ca_chain(config: &Config, ca_id: &str) -> Result<Vec<Certificate>, OpsError> {
    let files: Option<(&Path, Option<&Path>)> = config
        .cmf
        .as_ref()
        .and_then(|cmf| cmf.cas.iter().find(|ca| ca.id == ca_id))
        .map(|ca| (ca.certificate.as_path(), ca.chain.as_deref()))
        .or_else(|| {
            (ca_id == "default")
                .then_some(config.ca.as_ref())
                .flatten()
                .map(|ca| (ca.certificate.as_path(), ca.chain.as_deref()))
        });
    let Some((certificate, chain)) = files else {
        return Err(OpsError::NotFound(format!(
            "CA '{ca_id}' is not in the configuration: its chain is unknown"
        )));
    };
    let mut certificates = Vec::new();
    for path in std::iter::once(certificate).chain(chain) {
        let text = std::fs::read_to_string(path)
            .map_err(|e| OpsError::Failed(format!("CA '{ca_id}': {}: {e}", path.display())))?;
        certificates.extend(
            pki::certificates_from_pem(&text)
                .map_err(|e| OpsError::Failed(format!("CA '{ca_id}': {}: {e}", path.display())))?,
        );
    }
    Ok(certificates)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(ca: &str, serial: &str, consumer: &str) -> IssuedRecord {
        IssuedRecord {
            serial_number: serial.to_string(),
            ca_id: ca.to_string(),
            consumer: consumer.to_string(),
            registration_id: "r".into(),
            cert_type: CertType::VnfciCert,
            subjects: vec![format!("{serial}.example")],
            spki_sha256: "00".into(),
            attestation: "not-requested".into(),
            attestation_format: None,
            not_before: "2026-01-01T00:00:00Z".into(),
            not_after: "2027-01-01T00:00:00Z".into(),
            issued_at: "2026-01-01T00:00:00Z".into(),
            certificate: None,
            revocation: None,
            vnf_instance_id: None,
        }
    }

    /// CA ids that sort around each other ("a-b" < "a" + "/" < "a0" < "b"), several
    /// certificates each.
    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("dir");
        let store = Store::open(&dir.path().join("s.redb")).expect("store");
        store
            .write(|tx| {
                for (ca, serial, consumer) in [
                    ("a-b", "01", "x"),
                    ("a-b", "0f", "y"),
                    ("a", "02", "x"),
                    ("a", "ff", "y"),
                    ("a0", "03", "x"),
                    ("b", "04", "y"),
                ] {
                    tx.put(
                        &CERTIFICATES,
                        &format!("{ca}/{serial}"),
                        &record(ca, serial, consumer),
                    )?;
                }
                Ok(())
            })
            .expect("write");
        (dir, store)
    }

    #[test]
    fn a_serial_is_found_under_whichever_ca_holds_it() {
        let (_dir, store) = store();
        for (serial, ca) in [
            ("01", "a-b"),
            ("0F", "a-b"),
            ("02", "a"),
            ("f:f", "a"),
            ("03", "a0"),
            ("04", "b"),
        ] {
            let view = show(&store, serial).expect(serial);
            assert_eq!(view.ca_id, ca, "{serial}");
            assert!(!view.revoked);
            // No certificate stored: the registered subjects stand in for the SANs.
            assert_eq!(view.subject, None);
            assert_eq!(view.subject_alt_names, view.subjects);
        }
        assert!(matches!(show(&store, "05"), Err(OpsError::NotFound(_))));
        assert!(matches!(show(&store, "a/01"), Err(OpsError::NotFound(_))));
        assert_eq!(show(&store, "a0/03").expect("a0/03").ca_id, "a0");
        assert!(matches!(show(&store, "xyz"), Err(OpsError::BadRequest(_))));
    }

    #[test]
    fn pages_cover_every_certificate_once_and_filter_by_consumer() {
        let (_dir, store) = store();
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = list(
                &store,
                &CertificateQuery {
                    consumer: None,
                    after: after.clone(),
                    limit: Some(4),
                },
            )
            .expect("page");
            seen.extend(
                page.certificates
                    .iter()
                    .map(|c| format!("{}/{}", c.ca_id, c.serial_number)),
            );
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        assert_eq!(seen, ["a-b/01", "a-b/0f", "a/02", "a/ff", "a0/03", "b/04"]);
        let y = list(
            &store,
            &CertificateQuery {
                consumer: Some("y".into()),
                after: None,
                limit: Some(2),
            },
        )
        .expect("page");
        let serials: Vec<&str> = y
            .certificates
            .iter()
            .map(|c| c.serial_number.as_str())
            .collect();
        assert_eq!(serials, ["0f", "ff"]);
        assert_eq!(y.next.as_deref(), Some("a/ff"));
        // A bare serial works as `after` too.
        let rest = list(
            &store,
            &CertificateQuery {
                consumer: Some("y".into()),
                after: Some("ff".into()),
                limit: Some(2),
            },
        )
        .expect("page");
        assert_eq!(rest.certificates.len(), 1);
        assert_eq!(rest.certificates[0].serial_number, "04");
        assert_eq!(rest.next, None);
    }
}
