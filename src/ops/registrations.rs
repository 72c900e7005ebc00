//! CMF registrations, as the operator sees them: `warden cmf registrations [list|transfer|
//! delete]`. A consumer sees only its own registrations in its trust domain; one moved to
//! another domain (or removed from the configuration) leaves registrations nobody could read
//! or delete, which still hold their names. The operator lists them all, moves one to a
//! consumer that the trust-domain policy permits to hold its names, or deletes it through
//! the same function as the consumer's REST DELETE (`cmf::register::deregister`).

use serde::{Deserialize, Serialize};

use super::OpsError;
use crate::cmf::names::{self, Blocked, Policies};
use crate::cmf::register::{delete_in_tx, transfer as transfer_in};
use crate::cmf::{CmfError, Consumer, Registration, REGISTRATIONS};
use crate::config::Config;
use crate::store::{Store, StoreError};

/// Which registrations to list.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistrationQuery {
    /// Only this consumer's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer: Option<String>,
}

/// A registration and what the operator needs to judge it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistrationView {
    #[serde(flatten)]
    pub registration: Registration,
    /// The consumer's trust domain in the configuration now: absent when the consumer is
    /// no longer configured; different from `trustDomain` when it moved (its consumer can
    /// no longer see the registration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub configured_trust_domain: Option<String>,
    /// Subjects whose name another registration holds (a conflict found when the subject
    /// index was upgraded to one namespace): CSRs for them are refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocked: Vec<BlockedView>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BlockedView {
    pub subject: String,
    pub held_by: String,
}

impl From<Blocked> for BlockedView {
    fn from(b: Blocked) -> Self {
        BlockedView {
            subject: b.subject,
            held_by: b.held_by,
        }
    }
}

/// `POST /ops/v1/registrations/{id}/transfer` body.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TransferRequest {
    pub to: String,
}

/// Every registration (or one consumer's), in id order.
pub fn list(
    store: &Store,
    config: &Config,
    query: &RegistrationQuery,
) -> Result<Vec<RegistrationView>, OpsError> {
    names::upgrade_index(store, "warden")?;
    store
        .read(|tx| {
            let mut out = Vec::new();
            for (_, registration) in tx.list(&REGISTRATIONS, "")? {
                if query
                    .consumer
                    .as_ref()
                    .is_some_and(|c| *c != registration.consumer)
                {
                    continue;
                }
                let blocked = names::blocked(tx, &registration)?
                    .into_iter()
                    .map(BlockedView::from)
                    .collect();
                out.push(RegistrationView {
                    configured_trust_domain: configured_domain(config, &registration.consumer),
                    registration,
                    blocked,
                });
            }
            Ok(out)
        })
        .map_err(OpsError::from)
}

/// Move registration `id` to consumer `to` (its current trust domain), if that consumer may
/// hold its names, certType and CA. Audited as `cmf.registration.transfer`.
pub fn transfer(
    store: &Store,
    config: &Config,
    policies: &Policies,
    id: &str,
    to: &str,
    actor: &str,
) -> Result<Registration, OpsError> {
    names::upgrade_index(store, "warden")?;
    let trust_domain = configured_domain(config, to).ok_or_else(|| {
        OpsError::Refused(format!(
            "'{to}' is not a configured consumer ([[cmf.consumer]])"
        ))
    })?;
    let consumer = Consumer {
        id: to.to_string(),
        trust_domain,
    };
    store
        .write(|tx| transfer_in(tx, policies, id, &consumer, actor))
        .map_err(refused)
}

/// Delete registration `id` (any consumer's) as the operator: its certificates are revoked
/// (cessationOfOperation, as for the consumer's DELETE) and the registration deleted in one
/// durable transaction (`cmf::register::delete_in_tx`), audited as `cmf.revoke` and
/// `cmf.deregister` by the operator. A CSR in flight is either recorded before it (and
/// revoked by it) or refused after it.
pub fn delete(
    store: &Store,
    id: &str,
    actor: &str,
) -> Result<(Registration, crate::cmf::revoke::RevokeOutcome), OpsError> {
    names::upgrade_index(store, "warden")?;
    crate::cmf::records::ensure_index(store, "warden")?;
    store
        .write(|tx| delete_in_tx(tx, id, actor, None))
        .map_err(refused)
}

fn configured_domain(config: &Config, consumer: &str) -> Option<String> {
    config
        .cmf
        .as_ref()?
        .consumers
        .iter()
        .find(|c| c.id == consumer)
        .map(|c| c.trust_domain.clone())
}

/// A refusal of the CMF rules comes back as the operator's error with its status.
fn refused(error: StoreError) -> OpsError {
    match error.into_rejected::<CmfError>() {
        Ok(CmfError::NotFound(why)) => OpsError::NotFound(why),
        Ok(other) => OpsError::Refused(other.to_string()),
        Err(store) => OpsError::Store(store),
    }
}
