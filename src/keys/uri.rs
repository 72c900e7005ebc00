//! RFC 7512 `pkcs11:` URIs: the only way configuration and the CLI name a token object.
//!
//! A token is chosen by label (`token=`) and/or serial (`serial=`), never by slot: SoftHSM
//! and real HSMs renumber slots when tokens are initialized. An object is chosen by label
//! (`object=`) and/or CKA_ID (`id=`, percent-encoded bytes). PINs never appear in a URI
//! (`pin-value` is refused): they come from a file or a systemd credential.

use std::fmt;
use std::str::FromStr;

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use super::KeyError;

/// RFC 3986 unreserved characters stay literal; everything else is percent-encoded.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Which token: by label, by serial, or both (both must match).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct TokenSelector {
    pub label: Option<String>,
    pub serial: Option<String>,
}

impl TokenSelector {
    /// Whether a token with this (blank-padded, as PKCS#11 returns them) label and serial
    /// is the one selected.
    pub fn matches(&self, label: &str, serial: &str) -> bool {
        self.label.as_deref().is_none_or(|l| l == label.trim_end())
            && self
                .serial
                .as_deref()
                .is_none_or(|s| s == serial.trim_end())
    }

    pub fn is_empty(&self) -> bool {
        self.label.is_none() && self.serial.is_none()
    }
}

impl fmt::Display for TokenSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.label, &self.serial) {
            (Some(label), Some(serial)) => write!(f, "label '{label}' serial {serial}"),
            (Some(label), None) => write!(f, "label '{label}'"),
            (None, Some(serial)) => write!(f, "serial {serial}"),
            (None, None) => f.write_str("(any)"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Pkcs11Uri {
    pub token: TokenSelector,
    /// CKA_LABEL of the object.
    pub object: Option<String>,
    /// CKA_ID of the object.
    pub id: Option<Vec<u8>>,
}

impl Pkcs11Uri {
    pub fn new(token: TokenSelector, object: Option<String>, id: Option<Vec<u8>>) -> Self {
        Pkcs11Uri { token, object, id }
    }
}

impl fmt::Display for Pkcs11Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(label) = &self.token.label {
            parts.push(format!("token={}", utf8_percent_encode(label, COMPONENT)));
        }
        if let Some(serial) = &self.token.serial {
            parts.push(format!("serial={}", utf8_percent_encode(serial, COMPONENT)));
        }
        if let Some(object) = &self.object {
            parts.push(format!("object={}", utf8_percent_encode(object, COMPONENT)));
        }
        if let Some(id) = &self.id {
            let hex: String = id.iter().map(|b| format!("%{b:02x}")).collect();
            parts.push(format!("id={hex}"));
        }
        write!(f, "pkcs11:{}", parts.join(";"))
    }
}

impl FromStr for Pkcs11Uri {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| KeyError::InvalidReference(format!("'{s}': {why}"));
        let path = s
            .strip_prefix("pkcs11:")
            .ok_or_else(|| bad("does not start with pkcs11:"))?;
        if path.contains('?') {
            return Err(bad(
                "query attributes (pin-value, pin-source, module-path) are not accepted; \
                 the PIN and module come from the configuration",
            ));
        }
        let mut uri = Pkcs11Uri {
            token: TokenSelector::default(),
            object: None,
            id: None,
        };
        for attribute in path.split(';').filter(|a| !a.is_empty()) {
            let (name, value) = attribute
                .split_once('=')
                .ok_or_else(|| bad(&format!("attribute '{attribute}' has no value")))?;
            let text = || {
                percent_decode_str(value)
                    .decode_utf8()
                    .map(|v| v.into_owned())
                    .map_err(|_| bad(&format!("{name} is not UTF-8")))
            };
            let slot = match name {
                "token" => &mut uri.token.label,
                "serial" => &mut uri.token.serial,
                "object" => &mut uri.object,
                "id" => {
                    if uri.id.is_some() {
                        return Err(bad("id given twice"));
                    }
                    uri.id = Some(percent_decode_str(value).collect());
                    continue;
                }
                "type" => {
                    // Key pairs are handled as a whole; the type narrows nothing we need.
                    match value {
                        "private" | "public" | "cert" | "secret-key" | "data" => continue,
                        _ => return Err(bad(&format!("unknown object type '{value}'"))),
                    }
                }
                "slot-id" | "slot-description" | "slot-manufacturer" => {
                    return Err(bad(
                        "slots are not stable names: select the token by token= or serial=",
                    ))
                }
                "manufacturer"
                | "model"
                | "library-manufacturer"
                | "library-description"
                | "library-version" => continue,
                other => return Err(bad(&format!("unknown attribute '{other}'"))),
            };
            if slot.is_some() {
                return Err(bad(&format!("{name} given twice")));
            }
            *slot = Some(text()?);
        }
        if uri.token.is_empty() {
            return Err(bad("no token= or serial= to select the token"));
        }
        if uri.object.is_none() && uri.id.is_none() {
            return Err(bad("no object= or id= to select the object"));
        }
        Ok(uri)
    }
}
