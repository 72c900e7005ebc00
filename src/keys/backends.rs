//! The configured backends, and routing of a key reference to the backend that holds it.

use std::sync::Arc;

use super::pkcs11::Pkcs11KeyStore;
use super::tpm::TpmKeyStore;
use super::{BackendKind, KeyAlgorithm, KeyError, KeyInfo, KeyRef, KeySpec, KeyStore};
use crate::config::Config;

/// At most one PKCS#11 token and one TPM, as configured.
#[derive(Clone, Default)]
pub struct Backends {
    pub pkcs11: Option<Arc<Pkcs11KeyStore>>,
    pub tpm: Option<Arc<TpmKeyStore>>,
}

impl Backends {
    /// Open every configured backend; the first failure is returned with its backend named.
    pub fn open(config: &Config) -> Result<Backends, KeyError> {
        let mut backends = Backends::default();
        for pkcs11 in config.pkcs11_backends() {
            backends.pkcs11 = Some(Arc::new(Pkcs11KeyStore::open(pkcs11)?));
        }
        for tpm in config.tpm_backends() {
            backends.tpm = Some(Arc::new(TpmKeyStore::open(tpm)?));
        }
        Ok(backends)
    }

    /// The backend of `kind`, if configured.
    pub fn by_kind(&self, kind: BackendKind) -> Result<Arc<dyn KeyStore>, KeyError> {
        let store: Option<Arc<dyn KeyStore>> = match kind {
            BackendKind::Pkcs11 => self.pkcs11.clone().map(|s| s as Arc<dyn KeyStore>),
            BackendKind::Tpm => self.tpm.clone().map(|s| s as Arc<dyn KeyStore>),
        };
        store.ok_or_else(|| KeyError::InvalidArgument(format!("no {kind} backend is configured")))
    }

    /// The backend that holds `key`.
    pub fn for_key(&self, key: &KeyRef) -> Result<Arc<dyn KeyStore>, KeyError> {
        self.by_kind(key.backend())
    }

    /// All configured backends.
    pub fn all(&self) -> Vec<Arc<dyn KeyStore>> {
        let mut all: Vec<Arc<dyn KeyStore>> = Vec::new();
        if let Some(p) = &self.pkcs11 {
            all.push(p.clone());
        }
        if let Some(t) = &self.tpm {
            all.push(t.clone());
        }
        all
    }

    /// Make the key that `key` names, if it does not exist yet: a PKCS#11 key pair labelled
    /// with the URI's `object=`, or a TPM key persisted at exactly the named handle. Returns
    /// the key and whether it was created now.
    pub fn ensure(
        &self,
        key: &KeyRef,
        algorithm: KeyAlgorithm,
    ) -> Result<(KeyInfo, bool), KeyError> {
        let store = self.for_key(key)?;
        match store.public_key(key) {
            Ok(public) => {
                return Ok((
                    KeyInfo {
                        reference: key.clone(),
                        label: String::new(),
                        public_key: public,
                    },
                    false,
                ))
            }
            Err(KeyError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        let info = match key {
            KeyRef::Pkcs11(uri) => {
                let label = uri.object.clone().ok_or_else(|| {
                    KeyError::InvalidReference(format!("{key}: object= names the key to create"))
                })?;
                if uri.id.is_some() {
                    return Err(KeyError::InvalidReference(format!(
                        "{key}: the id of a new key is chosen at generation; name it by object= only"
                    )));
                }
                let mut info = store.generate(&KeySpec { label, algorithm })?;
                // Keep the operator's name for the key (without the generated id).
                info.reference = key.clone();
                info
            }
            KeyRef::Tpm(handle) => {
                let tpm = self.tpm.as_ref().ok_or_else(|| {
                    KeyError::InvalidArgument("no tpm backend is configured".into())
                })?;
                tpm.generate_at(
                    *handle,
                    &KeySpec {
                        label: key.to_string(),
                        algorithm,
                    },
                )?
            }
        };
        Ok((info, true))
    }
}
