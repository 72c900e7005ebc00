//! Signer adapters: certificates built by x509-cert and TLS handshakes by rustls, both signed
//! by keys that stay in a real SoftHSM token. openssl checks what we build.

mod common;

use std::process::Command;
use std::sync::Arc;

use common::softhsm::fresh_token;
use nfv_warden::ca::{self, LeafProfile, Profile};
use nfv_warden::keys::pkcs11::Pkcs11KeyStore;
use nfv_warden::keys::signer::HardwareKey;
use nfv_warden::keys::{KeyAlgorithm, KeySpec, KeyStore, SignatureScheme};
use nfv_warden::pki;

fn openssl_verify(dir: &std::path::Path, root: &str, leaf: &str) -> (bool, String) {
    let out = Command::new("openssl")
        .args(["verify", "-x509_strict", "-CAfile", root, leaf])
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn root_and_server_certificates_verify_with_openssl() {
    let config = fresh_token("x509");
    let store: Arc<dyn KeyStore> = Arc::new(Pkcs11KeyStore::open(&config).expect("open"));
    let dir = tempfile::tempdir().expect("tmp");
    let cases = [
        (KeyAlgorithm::EcP256, None),
        (KeyAlgorithm::EcP384, None),
        (KeyAlgorithm::Rsa2048, None),
        (KeyAlgorithm::Rsa3072, Some(SignatureScheme::RsaPssSha256)),
    ];
    for (algorithm, scheme) in cases {
        let ca_info = store
            .generate(&KeySpec {
                label: format!("ca-{algorithm}"),
                algorithm,
            })
            .expect("CA key");
        let mut ca_key = HardwareKey::new(store.clone(), ca_info.reference).expect("hw key");
        if let Some(scheme) = scheme {
            ca_key = ca_key.with_scheme(scheme).expect("scheme");
        }
        let root =
            ca::self_signed_root(&ca_key, "CN=warden test root,O=nfv-warden", 30).expect("root");
        pki::verify_certificate_signature(&root, &root).expect("RustCrypto verifies the root");
        let tls_info = store
            .generate(&KeySpec {
                label: format!("tls-{algorithm}"),
                algorithm: KeyAlgorithm::EcP256,
            })
            .expect("TLS key");
        let leaf = ca::issue(
            &ca_key,
            &root,
            "CN=warden.example",
            &tls_info.public_key.spki_der,
            Profile::Leaf(
                LeafProfile::tls_server(&["localhost".into(), "127.0.0.1".into()]).unwrap(),
            ),
            7,
        )
        .expect("leaf");
        pki::verify_certificate_signature(&leaf, &root).expect("RustCrypto verifies the leaf");
        ca::check_chain(&ca_key, std::slice::from_ref(&root)).expect("chain of one root");

        let root_file = format!("root-{algorithm}.pem");
        let leaf_file = format!("leaf-{algorithm}.pem");
        std::fs::write(
            dir.path().join(&root_file),
            pki::certificate_pem(&root).unwrap(),
        )
        .unwrap();
        std::fs::write(
            dir.path().join(&leaf_file),
            pki::certificate_pem(&leaf).unwrap(),
        )
        .unwrap();
        let (ok, text) = openssl_verify(dir.path(), &root_file, &root_file);
        assert!(ok, "openssl verifies the {algorithm} root: {text}");
        let (ok, text) = openssl_verify(dir.path(), &root_file, &leaf_file);
        assert!(
            ok,
            "openssl verifies the leaf under the {algorithm} root: {text}"
        );
        // A leaf does not verify under another root.
        if algorithm != KeyAlgorithm::EcP256 {
            let (ok, _) = openssl_verify(dir.path(), "root-ec-p256.pem", &leaf_file);
            assert!(!ok, "a leaf verified under the wrong root");
        }
    }
}

#[test]
fn ca_csr_is_signed_by_the_hardware_key() {
    let config = fresh_token("csr");
    let store: Arc<dyn KeyStore> = Arc::new(Pkcs11KeyStore::open(&config).expect("open"));
    let info = store
        .generate(&KeySpec {
            label: "ca".into(),
            algorithm: KeyAlgorithm::EcP384,
        })
        .expect("key");
    let key = HardwareKey::new(store, info.reference).expect("hw key");
    let csr = ca::ca_csr(&key, "CN=warden intermediate,O=nfv-warden").expect("csr");
    use der::Encode;
    let dir = tempfile::tempdir().expect("tmp");
    let pem = pki::to_pem("CERTIFICATE REQUEST", &csr.to_der().unwrap()).unwrap();
    std::fs::write(dir.path().join("ca.csr"), pem).unwrap();
    let out = Command::new("openssl")
        .args(["req", "-verify", "-noout", "-in", "ca.csr"])
        .current_dir(dir.path())
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_handshake_with_a_hardware_key() {
    use rustls::pki_types::{CertificateDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = fresh_token("tls");
    let store: Arc<dyn KeyStore> = Arc::new(Pkcs11KeyStore::open(&config).expect("open"));
    for server_alg in [KeyAlgorithm::EcP256, KeyAlgorithm::Rsa2048] {
        let ca_info = store
            .generate(&KeySpec {
                label: format!("tls-ca-{server_alg}"),
                algorithm: KeyAlgorithm::EcP256,
            })
            .unwrap();
        let ca_key = HardwareKey::new(store.clone(), ca_info.reference).unwrap();
        let root = ca::self_signed_root(&ca_key, "CN=tls test root", 1).unwrap();
        let tls_info = store
            .generate(&KeySpec {
                label: format!("tls-{server_alg}"),
                algorithm: server_alg,
            })
            .unwrap();
        let leaf = ca::issue(
            &ca_key,
            &root,
            "CN=localhost",
            &tls_info.public_key.spki_der,
            Profile::Leaf(LeafProfile::tls_server(&["localhost".into()]).unwrap()),
            1,
        )
        .unwrap();
        use der::Encode;
        let chain = vec![CertificateDer::from(leaf.to_der().unwrap())];
        let signing = HardwareKey::new(store.clone(), tls_info.reference)
            .unwrap()
            .into_rustls();
        let certified = Arc::new(rustls::sign::CertifiedKey::new(chain, signing));
        certified
            .keys_match()
            .expect("certificate matches the hardware key");
        let server_config = Arc::new(
            rustls::ServerConfig::builder()
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(Fixed(certified))),
        );
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(root.to_der().unwrap()))
            .unwrap();
        for versions in [
            &[&rustls::version::TLS13][..],
            &[&rustls::version::TLS12][..],
        ] {
            let client_config = Arc::new(
                rustls::ClientConfig::builder_with_protocol_versions(versions)
                    .with_root_certificates(roots.clone())
                    .with_no_client_auth(),
            );
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let acceptor = tokio_rustls::TlsAcceptor::from(server_config.clone());
            let server = tokio::spawn(async move {
                let (tcp, _) = listener.accept().await.unwrap();
                let mut tls = acceptor.accept(tcp).await.expect("server handshake");
                let mut buf = [0u8; 5];
                tls.read_exact(&mut buf).await.unwrap();
                tls.write_all(&buf).await.unwrap();
                tls.shutdown().await.ok();
            });
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            tcp.set_nodelay(true).unwrap();
            let connector = tokio_rustls::TlsConnector::from(client_config);
            let mut tls = connector
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await
                .unwrap_or_else(|e| panic!("{server_alg} {versions:?} handshake: {e}"));
            tls.write_all(b"hello").await.unwrap();
            let mut buf = [0u8; 5];
            tls.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"hello");
            server.await.unwrap();
        }
    }
}

#[derive(Debug)]
struct Fixed(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for Fixed {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}
