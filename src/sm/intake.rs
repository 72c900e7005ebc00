//! The notification endpoint's logic (SOL 013 clause 8, SOL 005 6.4.18): authentication as
//! the subscription asked, strict parsing of the required fields, de-duplication by
//! notification id, and the durable journal that comes before the 204.
//!
//! OAUTH2_CLIENT_CREDENTIALS: the agent itself is the authorization server the NFVO is told
//! about (`tokenEndpoint` in the subscription). Its tokens are self-contained
//! (`expiry.nonce.HMAC-SHA256(secret, expiry.nonce)`), so they survive an agent restart and
//! need no token table.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};

use crate::config::{NotificationAuth, SmConfig};
use crate::store::StoreError;

use super::{NotificationRecord, SmError, NOTIFICATIONS, PENDING};

/// The five SOL 005 NS LCM notification types (SOL 005 6.5.2).
pub const NOTIFICATION_TYPES: [&str; 5] = [
    "NsLcmOperationOccurrenceNotification",
    "NsIdentifierCreationNotification",
    "NsIdentifierDeletionNotification",
    "NsChangeNotification",
    "NsLcmCapacityShortageNotification",
];

pub struct Intake {
    auth: NotificationAuth,
    user: String,
    secret: Option<SecretString>,
    client_roots: Vec<x509_cert::Certificate>,
    client_identity: Option<String>,
    token_seconds: u64,
    /// The HMAC key of the OAuth2 access tokens this endpoint issues: the agent's own,
    /// never the client secret the NFVO also holds (so the NFVO cannot mint tokens).
    token_key: ring::hmac::Key,
    pub max_body_bytes: usize,
}

/// The longest an access token lives, whatever `token_seconds` says; a token claiming a later
/// expiry is refused.
pub const MAX_TOKEN_SECONDS: u64 = 3600;

/// A fresh random token key (32 bytes).
pub fn new_token_key() -> Result<[u8; 32], String> {
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).map_err(|e| format!("random token key: {e}"))?;
    Ok(key)
}

/// What the request carried, as the HTTP layer saw it.
pub struct Credentials<'a> {
    pub authorization: Option<&'a str>,
    /// The verified TLS client certificate (DER), if any.
    pub client_certificate: Option<&'a [u8]>,
    pub client_identity: Option<&'a str>,
}

/// Authentication failures: 401 with a challenge, or 403.
#[derive(Debug, PartialEq, Eq)]
pub enum Denied {
    Unauthenticated { challenge: String, detail: String },
    Forbidden(String),
}

/// The result of journaling a notification.
#[derive(Debug, PartialEq, Eq)]
pub enum Journaled {
    /// New: journaled under this pending key; process it.
    New(String),
    /// The same id was journaled before: acknowledged, not processed again.
    Duplicate,
    /// A type the SM does not handle: acknowledged and ignored.
    Ignored,
}

/// SOL 013 4.5 / 8.3.2: a notification is `application/json` (parameters such as charset
/// allowed). `Err` is the 415 detail.
pub fn check_content_type(content_type: Option<&str>) -> Result<(), String> {
    let media = content_type
        .and_then(|c| c.split(';').next())
        .map(str::trim)
        .unwrap_or_default();
    if media.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else if media.is_empty() {
        Err("Content-Type is missing; a notification is application/json".into())
    } else {
        Err(format!("Content-Type {media} is not application/json"))
    }
}

impl Intake {
    /// An intake from its parts (the fuzz target; [`Intake::new`] reads them from config).
    pub fn from_parts(
        auth: NotificationAuth,
        user: &str,
        secret: Option<SecretString>,
        token_seconds: u64,
        max_body_bytes: usize,
    ) -> Intake {
        Intake {
            auth,
            user: user.to_string(),
            secret,
            client_roots: Vec::new(),
            client_identity: None,
            token_seconds: token_seconds.clamp(60, MAX_TOKEN_SECONDS),
            // For a process that does not keep it (the fuzz target): random.
            token_key: ring::hmac::Key::new(
                ring::hmac::HMAC_SHA256,
                &new_token_key().unwrap_or([7u8; 32]),
            ),
            max_body_bytes,
        }
    }

    /// Use this token key (kept in the store, so tokens survive a restart).
    pub fn set_token_key(&mut self, key: &[u8]) {
        self.token_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    }

    pub fn new(config: &SmConfig) -> Result<Intake, String> {
        let n = &config.notifications;
        let secret = match &n.secret {
            Some(source) => Some(source.read()?),
            None => None,
        };
        let client_roots = match &n.client_ca {
            Some(path) => {
                let pem = std::fs::read_to_string(path)
                    .map_err(|e| format!("client_ca {}: {e}", path.display()))?;
                crate::pki::certificates_from_pem(&pem)
                    .map_err(|e| format!("client_ca {}: {e}", path.display()))?
            }
            None => Vec::new(),
        };
        Ok(Intake {
            auth: n.auth,
            user: config.name.clone(),
            secret,
            client_roots,
            client_identity: n.client_identity.clone(),
            token_seconds: n.token_seconds.clamp(60, MAX_TOKEN_SECONDS),
            token_key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &new_token_key()?),
            max_body_bytes: config.max_body_bytes,
        })
    }

    /// Whether notifications authenticate with a TLS client certificate (TLS_CERT), so that a
    /// certificate must chain to the NFVO's notification roots.
    pub fn requires_client_certificate(&self) -> bool {
        self.auth == NotificationAuth::TlsCert
    }

    /// The OAuth2 client id the NFVO uses at the agent's token endpoint.
    pub fn oauth_client_id(&self) -> String {
        format!("{}-nfvo", self.user)
    }

    /// The `authentication` member of the subscription request (SOL 013 8.3.4).
    pub fn subscription_authentication(&self) -> Result<Value, SmError> {
        let secret = || {
            self.secret
                .as_ref()
                .map(|s| s.expose_secret().to_string())
                .ok_or_else(|| SmError::Invalid("sm.notifications.secret is not set".into()))
        };
        Ok(match self.auth {
            NotificationAuth::Basic => json!({
                "authType": ["BASIC"],
                "paramsBasic": { "userName": self.user, "password": secret()? },
            }),
            NotificationAuth::Oauth2ClientCredentials => json!({
                "authType": ["OAUTH2_CLIENT_CREDENTIALS"],
                "paramsOauth2ClientCredentials": {
                    "clientId": self.oauth_client_id(),
                    "clientPassword": secret()?,
                    // Filled in by the caller: the agent's own token endpoint.
                    "tokenEndpoint": Value::Null,
                },
            }),
            NotificationAuth::TlsCert => json!({ "authType": ["TLS_CERT"] }),
        })
    }

    /// Check the credentials of a request to the notification endpoint.
    pub fn authenticate(&self, credentials: &Credentials<'_>) -> Result<(), Denied> {
        const REALM: &str = "realm=\"warden-sm\"";
        match self.auth {
            NotificationAuth::Basic => {
                let challenge = format!("Basic {REALM}");
                let Some(encoded) = credentials
                    .authorization
                    .and_then(|h| strip_scheme(h, "Basic"))
                else {
                    return Err(Denied::Unauthenticated {
                        challenge,
                        detail: "HTTP Basic authentication is required".into(),
                    });
                };
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(encoded.trim())
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .unwrap_or_default();
                let expected = format!(
                    "{}:{}",
                    self.user,
                    self.secret
                        .as_ref()
                        .map(|s| s.expose_secret())
                        .unwrap_or("")
                );
                if self.secret.is_some()
                    && constant_time_eq(decoded.as_bytes(), expected.as_bytes())
                {
                    Ok(())
                } else {
                    Err(Denied::Unauthenticated {
                        challenge,
                        detail: "wrong user name or password".into(),
                    })
                }
            }
            NotificationAuth::Oauth2ClientCredentials => {
                let Some(token) = credentials
                    .authorization
                    .and_then(|h| strip_scheme(h, "Bearer"))
                else {
                    return Err(Denied::Unauthenticated {
                        challenge: format!("Bearer {REALM}"),
                        detail: "an OAuth 2.0 Bearer token is required".into(),
                    });
                };
                if self.token_valid(token.trim()) {
                    Ok(())
                } else {
                    Err(Denied::Unauthenticated {
                        challenge: format!("Bearer {REALM}, error=\"invalid_token\""),
                        detail: "the token is invalid or expired".into(),
                    })
                }
            }
            NotificationAuth::TlsCert => {
                let Some(der) = credentials.client_certificate else {
                    return Err(Denied::Unauthenticated {
                        challenge: format!("TLS-cert {REALM}"),
                        detail: "a TLS client certificate is required".into(),
                    });
                };
                // rustls verified the chain against all configured client roots (CMF
                // consumers too): the NFVO's must be one of the notification roots.
                use der::Decode;
                let cert = x509_cert::Certificate::from_der(der)
                    .map_err(|e| Denied::Forbidden(format!("client certificate: {e}")))?;
                let issued_by_nfvo_root = self.client_roots.iter().any(|root| {
                    root.tbs_certificate().subject() == cert.tbs_certificate().issuer()
                        && crate::pki::verify_certificate_signature(&cert, root).is_ok()
                });
                if !issued_by_nfvo_root {
                    return Err(Denied::Forbidden(
                        "the client certificate is not from the NFVO's CA".into(),
                    ));
                }
                match &self.client_identity {
                    Some(expected) if credentials.client_identity != Some(expected.as_str()) => {
                        Err(Denied::Forbidden(format!(
                            "client certificate identity {:?} is not the NFVO's",
                            credentials.client_identity.unwrap_or("")
                        )))
                    }
                    _ => Ok(()),
                }
            }
        }
    }

    /// RFC 6749 4.4 token request from the NFVO: HTTP Basic client authentication (or
    /// client_id/client_secret in the form), grant_type=client_credentials.
    pub fn issue_token(
        &self,
        authorization: Option<&str>,
        form: &str,
    ) -> Result<Value, TokenError> {
        if self.auth != NotificationAuth::Oauth2ClientCredentials {
            return Err(TokenError::new(
                400,
                "unsupported_grant_type",
                "OAuth2 is not configured",
            ));
        }
        let mut grant = None;
        let mut form_id = None;
        let mut form_secret = None;
        // RFC 6749 4.4.2: application/x-www-form-urlencoded (the WHATWG form encoding).
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(form).map_err(|e| {
            TokenError::new(
                400,
                "invalid_request",
                &format!("the form does not parse: {e}"),
            )
        })?;
        for (k, v) in pairs {
            match k.as_str() {
                "grant_type" => grant = Some(v),
                "client_id" => form_id = Some(v),
                "client_secret" => form_secret = Some(v),
                _ => {}
            }
        }
        let (id, secret) = match authorization.and_then(|h| strip_scheme(h, "Basic")) {
            Some(encoded) => {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(encoded.trim())
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .unwrap_or_default();
                let (id, secret) = decoded.split_once(':').unwrap_or((&decoded, ""));
                (id.to_string(), secret.to_string())
            }
            None => (form_id.unwrap_or_default(), form_secret.unwrap_or_default()),
        };
        let expected = self
            .secret
            .as_ref()
            .map(|s| s.expose_secret())
            .unwrap_or("");
        if id != self.oauth_client_id()
            || expected.is_empty()
            || !constant_time_eq(secret.as_bytes(), expected.as_bytes())
        {
            return Err(TokenError::new(
                401,
                "invalid_client",
                "unknown client or wrong secret",
            ));
        }
        if grant.as_deref() != Some("client_credentials") {
            return Err(TokenError::new(
                400,
                "unsupported_grant_type",
                "only client_credentials is supported",
            ));
        }
        let expiry = unix_now() + self.token_seconds;
        let mut nonce = [0u8; 16];
        getrandom::fill(&mut nonce)
            .map_err(|e| TokenError::new(500, "server_error", &e.to_string()))?;
        let body = format!("{expiry}.{}", hex::encode(nonce));
        let token = format!("{body}.{}", self.mac(&body));
        Ok(
            json!({ "access_token": token, "token_type": "Bearer", "expires_in": self.token_seconds }),
        )
    }

    fn token_valid(&self, token: &str) -> bool {
        let Some((body, mac)) = token.rsplit_once('.') else {
            return false;
        };
        let Some(expiry) = body.split('.').next().and_then(|e| e.parse::<u64>().ok()) else {
            return false;
        };
        let now = unix_now();
        expiry > now
            && expiry <= now + MAX_TOKEN_SECONDS
            && constant_time_eq(mac.as_bytes(), self.mac(body).as_bytes())
    }

    fn mac(&self, body: &str) -> String {
        hex::encode(ring::hmac::sign(&self.token_key, body.as_bytes()).as_ref())
    }
}

/// An RFC 6749 5.2 error.
#[derive(Debug)]
pub struct TokenError {
    pub status: u16,
    pub body: Value,
}

impl TokenError {
    fn new(status: u16, error: &str, description: &str) -> TokenError {
        TokenError {
            status,
            body: json!({ "error": error, "error_description": description }),
        }
    }
}

/// A notification, decoded at the edge: the fields every type requires are present.
#[derive(Debug, Clone)]
pub struct Notification {
    pub id: String,
    pub notification_type: String,
    pub body: std::sync::Arc<Value>,
}

/// Parse a notification body. `Ok(None)` for a type the SM does not handle (ignored);
/// `Err` names the first missing or mistyped field (400).
pub fn parse(body: &[u8]) -> Result<Option<Notification>, String> {
    let value: Value = serde_json::from_slice(body).map_err(|e| format!("malformed JSON: {e}"))?;
    let object = value
        .as_object()
        .ok_or("the notification is not a JSON object")?;
    let string = |field: &str| -> Result<String, String> {
        match object.get(field) {
            Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            Some(_) => Err(format!("'{field}' is not a non-empty string")),
            None => Err(format!("'{field}' is missing")),
        }
    };
    let notification_type = string("notificationType")?;
    let id = string("id")?;
    string("subscriptionId")?;
    // SOL 005 v3.x writes `timestamp`; earlier versions and some NFVOs `timeStamp`.
    if string("timestamp").is_err() && string("timeStamp").is_err() {
        return Err("'timestamp' is missing".into());
    }
    let required: &[&str] = match notification_type.as_str() {
        "NsLcmOperationOccurrenceNotification" => &[
            "nsInstanceId",
            "nsLcmOpOccId",
            "operation",
            "notificationStatus",
            "operationState",
        ],
        "NsIdentifierCreationNotification" | "NsIdentifierDeletionNotification" => {
            &["nsInstanceId"]
        }
        "NsChangeNotification" => &["nsInstanceId", "nsComponentType", "nsComponentId"],
        "NsLcmCapacityShortageNotification" => &["status"],
        _ => return Ok(None),
    };
    for field in required {
        if *field == "status" {
            if !object.get("status").is_some_and(Value::is_object) {
                return Err("'status' is missing or not an object".into());
            }
            continue;
        }
        string(field)?;
    }
    if notification_type == "NsLcmOperationOccurrenceNotification" {
        if let Some(affected) = object.get("affectedVnf") {
            let list = affected.as_array().ok_or("'affectedVnf' is not an array")?;
            for (i, vnf) in list.iter().enumerate() {
                for field in ["vnfInstanceId", "changeType", "changeResult"] {
                    if !vnf.get(field).is_some_and(Value::is_string) {
                        return Err(format!("'affectedVnf[{i}].{field}' is missing"));
                    }
                }
            }
        }
    }
    Ok(Some(Notification {
        id,
        notification_type,
        body: std::sync::Arc::new(value),
    }))
}

/// The `sm_pending` key of a notification: arrival order, then id.
pub fn pending_key(id: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{nanos:024}:{id}")
}

/// Journal a parsed notification durably (in the caller's group-commit transaction):
/// insert by id, and queue it for processing under `key`. A known id is a duplicate.
pub fn journal(
    tx: &mut crate::store::WriteTx<'_>,
    notification: &Notification,
    received: &str,
    key: &str,
) -> Result<Journaled, StoreError> {
    if tx.contains(&NOTIFICATIONS, &notification.id)? {
        return Ok(Journaled::Duplicate);
    }
    let record = NotificationRecord {
        id: notification.id.clone(),
        notification_type: notification.notification_type.clone(),
        received: received.to_string(),
        body: notification.body.clone(),
    };
    tx.put(&NOTIFICATIONS, &notification.id, &record)?;
    tx.put(&PENDING, key, &notification.id)?;
    Ok(Journaled::New(key.to_string()))
}

fn strip_scheme<'a>(header: &'a str, scheme: &str) -> Option<&'a str> {
    let (given, rest) = header.split_once(' ')?;
    given.eq_ignore_ascii_case(scheme).then_some(rest)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    // Length is not secret here (the expected value's length is fixed by configuration).
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(body: Value) -> Option<Notification> {
        parse(body.to_string().as_bytes()).expect("parses")
    }

    #[test]
    fn both_timestamp_spellings_are_accepted() {
        for field in ["timestamp", "timeStamp"] {
            let n = ok(json!({
                "id": "n1", "notificationType": "NsIdentifierCreationNotification",
                "subscriptionId": "s", field: "2026-01-01T00:00:00Z", "nsInstanceId": "ns",
                "someVendorField": 1,
            }))
            .expect("known type");
            assert_eq!(n.id, "n1");
        }
    }

    #[test]
    fn unknown_types_are_ignored_and_missing_fields_named() {
        assert!(ok(
            json!({"id": "n", "notificationType": "VendorThing", "subscriptionId": "s",
            "timestamp": "t"})
        )
        .is_none());
        let err = parse(
            json!({"id": "n", "notificationType": "NsChangeNotification", "subscriptionId": "s",
                "timestamp": "t", "nsInstanceId": "ns", "nsComponentType": "VNF"})
            .to_string()
            .as_bytes(),
        )
        .unwrap_err();
        assert!(err.contains("nsComponentId"), "{err}");
        assert!(parse(b"{not json").unwrap_err().contains("malformed JSON"));
    }

    #[test]
    fn tokens_are_the_agents_own_and_short_lived() {
        let intake = Intake::from_parts(
            NotificationAuth::Oauth2ClientCredentials,
            "warden-sm",
            Some(SecretString::from("shared-secret".to_string())),
            86_400,
            1024,
        );
        let basic = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("warden-sm-nfvo:shared-secret")
        );
        let issued = intake
            .issue_token(Some(&basic), "grant_type=client_credentials")
            .expect("token");
        // The lifetime asked for (a day) is capped.
        assert_eq!(issued["expires_in"], MAX_TOKEN_SECONDS);
        let token = issued["access_token"].as_str().expect("token");
        assert!(intake.token_valid(token));
        // Whoever holds the client secret cannot mint one: the MAC key is not that secret.
        let body = format!("{}.00", unix_now() + 60);
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"shared-secret");
        let forged = format!(
            "{body}.{}",
            hex::encode(ring::hmac::sign(&key, body.as_bytes()).as_ref())
        );
        assert!(!intake.token_valid(&forged));
        // A token claiming to live longer than the cap is refused even with a good MAC.
        let body = format!("{}.00", unix_now() + MAX_TOKEN_SECONDS + 600);
        let long = format!("{body}.{}", intake.mac(&body));
        assert!(!intake.token_valid(&long));
        // The form is decoded as a form (percent-encoding, '+' for space).
        assert!(intake
            .issue_token(Some(&basic), "scope=a+b&grant_type=client%5Fcredentials")
            .is_ok());
    }
}
