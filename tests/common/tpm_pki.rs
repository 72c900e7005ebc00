//! A TPM with a manufacturer PKI, for the attestation anchoring tests: `swtpm_setup
//! --create-ek-cert` manufactures a swtpm whose EK certificates are issued by swtpm-localca,
//! configured to keep its CA (the test manufacturer root and its issuing CA) in a temp
//! directory, so nothing system-wide is read or written (/etc/swtpm*, /var/lib/swtpm-localca
//! stay untouched). The TPM's side of the EK/AK protocol runs with tpm2-tools, as a VNF
//! would run it.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::swtpm::Swtpm;

/// The RSA-2048 EK certificate's NV index (TCG EK Credential Profile 2.2.1.4).
pub const RSA_EK_CERTIFICATE_NV: &str = "0x01c00002";
/// Where swtpm_setup persists the RSA EK.
pub const RSA_EK_HANDLE: &str = "0x81010001";

/// A manufactured swtpm and its manufacturer CA.
pub struct ManufacturedTpm {
    pub tpm: Swtpm,
    /// swtpm-localca's state: root, issuing CA and their keys.
    ca: tempfile::TempDir,
}

impl ManufacturedTpm {
    /// Manufacture a TPM (EK certificates by a fresh local CA) and start it.
    pub fn start() -> ManufacturedTpm {
        let ca = tempfile::Builder::new()
            .prefix("swtpm-localca-")
            .tempdir()
            .expect("temp dir");
        let ca_path = ca.path().to_path_buf();
        let tpm = Swtpm::start_prepared(|state| manufacture(state, &ca_path));
        ManufacturedTpm { tpm, ca }
    }

    pub fn tcti(&self) -> String {
        self.tpm.tcti()
    }

    /// The manufacturer root (self-signed), PEM file.
    pub fn root_pem(&self) -> PathBuf {
        self.ca.path().join("ca/swtpm-localca-rootca-cert.pem")
    }

    /// The CA that signs EK certificates (issued by the root), PEM file.
    pub fn issuer_pem(&self) -> PathBuf {
        self.ca.path().join("ca/issuercert.pem")
    }

    /// The issuing CA's private key (for AK certificates in tests).
    pub fn issuer_key(&self) -> PathBuf {
        self.ca.path().join("ca/signkey.pem")
    }

    /// Run a tpm2-tools command against this TPM; its stdout. No TpmKeyStore may hold the
    /// TPM's connection meanwhile (swtpm serves one at a time).
    pub fn tpm2(&self, dir: &Path, args: &[&str]) -> Vec<u8> {
        let out = Command::new(args[0])
            .args(&args[1..])
            .env("TPM2TOOLS_TCTI", self.tcti())
            .current_dir(dir)
            .output()
            .expect("tpm2-tools");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// The RSA EK certificate, DER, from its NV index.
    pub fn ek_certificate(&self, dir: &Path) -> Vec<u8> {
        self.tpm2(
            dir,
            &["tpm2_nvread", RSA_EK_CERTIFICATE_NV, "-o", "ek-cert.der"],
        );
        std::fs::read(dir.join("ek-cert.der")).expect("EK certificate")
    }

    /// The TPM2B_PUBLIC of a persistent object.
    pub fn public_area(&self, dir: &Path, handle: u32) -> Vec<u8> {
        let file = format!("public-{handle:08x}.tpm2b");
        self.tpm2(
            dir,
            &[
                "tpm2_readpublic",
                "-c",
                &format!("0x{handle:08x}"),
                "-f",
                "tss",
                "-o",
                &file,
            ],
        );
        std::fs::read(dir.join(file)).expect("public area")
    }

    /// TPM2_ActivateCredential with the AK at `ak` and the EK at `ek` (a low-range
    /// template, whose policy is PolicySecret(TPM_RH_ENDORSEMENT), EK Credential Profile
    /// B.6): the credential, or the TPM's refusal (stderr).
    pub fn activate_credential(
        &self,
        dir: &Path,
        ak: u32,
        ek: &str,
        credential_blob: &[u8],
        encrypted_secret: &[u8],
    ) -> Result<Vec<u8>, String> {
        // tpm2-tools' credential file: magic 0xBADCC0DE, version 1, TPM2B_ID_OBJECT,
        // TPM2B_ENCRYPTED_SECRET (tpm2-tools lib/files.c).
        let mut file = 0xBADC_C0DEu32.to_be_bytes().to_vec();
        file.extend_from_slice(&1u32.to_be_bytes());
        file.extend_from_slice(credential_blob);
        file.extend_from_slice(encrypted_secret);
        std::fs::write(dir.join("credential.blob"), file).expect("credential file");
        let _ = std::fs::remove_file(dir.join("credential.out"));
        self.tpm2(
            dir,
            &[
                "tpm2_startauthsession",
                "--policy-session",
                "-S",
                "ek-session.ctx",
            ],
        );
        self.tpm2(
            dir,
            &["tpm2_policysecret", "-S", "ek-session.ctx", "-c", "e"],
        );
        let out = Command::new("tpm2_activatecredential")
            .args([
                "-c",
                &format!("0x{ak:08x}"),
                "-C",
                ek,
                "-i",
                "credential.blob",
                "-o",
                "credential.out",
                "-P",
                "session:ek-session.ctx",
            ])
            .env("TPM2TOOLS_TCTI", self.tcti())
            .current_dir(dir)
            .output()
            .expect("tpm2_activatecredential");
        // The session is flushed whatever happened (3 session slots, no resource manager).
        let _ = Command::new("tpm2_flushcontext")
            .arg("ek-session.ctx")
            .env("TPM2TOOLS_TCTI", self.tcti())
            .current_dir(dir)
            .output();
        if out.status.success() {
            Ok(std::fs::read(dir.join("credential.out")).expect("credential"))
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// An AK certificate over `ak_spki_pem` (EKU tcg-kp-AIKCertificate), issued by the
    /// manufacturer's issuing CA with openssl, as an attestation CA would: PEM.
    pub fn ak_certificate(&self, dir: &Path, ak_spki_pem: &str) -> String {
        self.certificate(
            dir,
            "ak",
            ak_spki_pem,
            "extendedKeyUsage=2.23.133.8.3\nbasicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature\n",
        )
    }

    /// An ECC P-256 EK from the default template (EK Credential Profile L-2), persisted at
    /// `handle`, with an EK certificate by the manufacturer's issuing CA (as swtpm_setup
    /// makes for the RSA EK): the certificate, PEM.
    pub fn ecc_ek(&self, dir: &Path, handle: &str) -> String {
        self.tpm2(
            dir,
            &[
                "tpm2_createek",
                "-c",
                handle,
                "-G",
                "ecc",
                "-u",
                "ek-ecc.pem",
                "-f",
                "pem",
            ],
        );
        let public = std::fs::read_to_string(dir.join("ek-ecc.pem")).expect("EK public key");
        self.certificate(
            dir,
            "ek-ecc",
            &public,
            "extendedKeyUsage=2.23.133.8.1\nbasicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,keyAgreement\n",
        )
    }

    /// A certificate over `spki_pem` with `extensions`, by the issuing CA: PEM.
    fn certificate(&self, dir: &Path, name: &str, spki_pem: &str, extensions: &str) -> String {
        std::fs::write(dir.join(format!("{name}-public.pem")), spki_pem).expect("key");
        std::fs::write(dir.join(format!("{name}.ext")), extensions).expect("extensions");
        let out = Command::new("openssl")
            .args(["x509", "-new", "-force_pubkey"])
            .arg(format!("{name}-public.pem"))
            .args(["-subj", &format!("/CN=test {name}")])
            .arg("-CA")
            .arg(self.issuer_pem())
            .arg("-CAkey")
            .arg(self.issuer_key())
            .args(["-days", "30", "-extfile"])
            .arg(format!("{name}.ext"))
            .arg("-out")
            .arg(format!("{name}-cert.pem"))
            .current_dir(dir)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "{name} certificate: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::read_to_string(dir.join(format!("{name}-cert.pem"))).expect("certificate")
    }
}

/// `swtpm_setup` with its own configuration: swtpm-localca's state in `ca/`.
fn manufacture(state: &Path, ca: &Path) {
    std::fs::create_dir_all(ca.join("ca")).expect("CA dir");
    let localca_conf = ca.join("swtpm-localca.conf");
    std::fs::write(
        &localca_conf,
        format!(
            "statedir = {d}\nsigningkey = {d}/signkey.pem\nissuercert = {d}/issuercert.pem\n\
             certserial = {d}/certserial\n",
            d = ca.join("ca").display()
        ),
    )
    .expect("localca conf");
    let localca_options = ca.join("swtpm-localca.options");
    std::fs::write(
        &localca_options,
        "--platform-manufacturer nfv-warden-test\n--platform-version 2.1\n\
         --platform-model swtpm\n",
    )
    .expect("localca options");
    let setup_conf = ca.join("swtpm_setup.conf");
    std::fs::write(
        &setup_conf,
        format!(
            "create_certs_tool = swtpm_localca\ncreate_certs_tool_config = {}\n\
             create_certs_tool_options = {}\nactive_pcr_banks = sha256\n",
            localca_conf.display(),
            localca_options.display()
        ),
    )
    .expect("swtpm_setup conf");
    let out = Command::new("swtpm_setup")
        .arg("--tpm2")
        .arg("--tpmstate")
        .arg(state)
        .arg("--create-ek-cert")
        .arg("--config")
        .arg(&setup_conf)
        .arg("--logfile")
        .arg(ca.join("swtpm_setup.log"))
        .arg("--overwrite")
        .output()
        .expect("swtpm_setup (package swtpm-tools)");
    let log = std::fs::read_to_string(ca.join("swtpm_setup.log")).unwrap_or_default();
    assert!(
        out.status.success(),
        "swtpm_setup: {}\n{log}",
        String::from_utf8_lossy(&out.stderr)
    );
}
