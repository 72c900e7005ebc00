//! The SM's notification intake at the edge (SOL 005 6.4.18, SOL 013 8): what the callback
//! endpoint does with a request before anything is journaled, on arbitrary input: the
//! Content-Type check, authentication of the Authorization header (BASIC, and an OAuth2
//! Bearer token), the token endpoint's form and credentials, and the body parser.
//!
//! Input layout: byte 0 picks the authentication (even: BASIC, odd: OAuth2); then
//! Content-Type, Authorization and the token form, each up to a newline; the rest is the
//! notification body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nfv_warden::config::NotificationAuth;
use nfv_warden::sm::intake::{self, Credentials, Intake};
use secrecy::SecretString;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let auth = if mode % 2 == 0 {
        NotificationAuth::Basic
    } else {
        NotificationAuth::Oauth2ClientCredentials
    };
    let intake = Intake::from_parts(
        auth,
        "warden-sm",
        Some(SecretString::from("s3cret-notify-password".to_string())),
        300,
        1024 * 1024,
    );
    let mut parts = rest.splitn(4, |b| *b == b'\n');
    let content_type = parts.next().and_then(|p| std::str::from_utf8(p).ok());
    let authorization = parts.next().and_then(|p| std::str::from_utf8(p).ok());
    let form = parts
        .next()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    let body = parts.next().unwrap_or_default();
    let _ = intake::check_content_type(content_type);
    let _ = intake.authenticate(&Credentials {
        authorization,
        client_certificate: None,
        client_identity: None,
    });
    if let Ok(token) = intake.issue_token(authorization, &form) {
        // A token the intake issued must authenticate.
        if let Some(access) = token["access_token"].as_str() {
            let bearer = format!("Bearer {access}");
            assert!(intake
                .authenticate(&Credentials {
                    authorization: Some(&bearer),
                    client_certificate: None,
                    client_identity: None,
                })
                .is_ok());
        }
    }
    if let Ok(Some(notification)) = intake::parse(body) {
        // What the processor reads next from an accepted body.
        let _ = <nfv_warden::sol::Notification as serde::Deserialize>::deserialize(
            &*notification.body,
        );
    }
});
