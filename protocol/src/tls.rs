//! Mutual TLS: a private CA, certificates for the controller and each agent, and rustls configs.
//!
//! A PKI directory holds `ca.crt`, `ca.key` and one `<name>.crt` / `<name>.key` pair per peer.
//! Agent certificates carry the agent's name as a DNS subject-alternative name and only the
//! `serverAuth` extended key usage; controller certificates carry only `clientAuth`. So an agent's
//! certificate cannot be used to command another agent, and the controller verifies that the agent
//! it reached is the one it meant (the name it dialled is checked against the certificate).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::names::PeerName;

/// Errors of PKI generation and TLS setup.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Reading or writing a PKI file failed.
    #[error("cannot access {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A PEM file holds nothing usable.
    #[error("{path} holds no valid {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was expected.
        what: &'static str,
    },
    /// The CA already exists.
    #[error("a CA already exists in {0}; refusing to overwrite it")]
    CaExists(PathBuf),
    /// Certificate generation failed.
    #[error("certificate generation failed")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("invalid TLS configuration")]
    Rustls(#[from] rustls::Error),
    /// Building the client-certificate verifier failed.
    #[error("invalid client verifier")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The role a certificate is issued for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The controller: a TLS client (`clientAuth`).
    Controller,
    /// An agent: a TLS server (`serverAuth`).
    Agent,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes a file readable only by its owner, atomically.
fn write_private(path: &Path, contents: &str) -> Result<(), TlsError> {
    agent_kit::fsutil::write_atomic(path, contents.as_bytes()).map_err(io_err(path))
}

fn now_minus_skew() -> time::OffsetDateTime {
    // One hour of clock-skew margin on the start of validity.
    time::OffsetDateTime::now_utc() - time::Duration::hours(1)
}

/// Paths of one peer's files in a PKI directory.
#[derive(Debug, Clone)]
pub struct PkiPaths {
    /// CA certificate.
    pub ca_cert: PathBuf,
    /// The peer's certificate.
    pub cert: PathBuf,
    /// The peer's private key.
    pub key: PathBuf,
}

impl PkiPaths {
    /// The conventional layout: `dir/ca.crt`, `dir/<name>.crt`, `dir/<name>.key`.
    pub fn in_dir(dir: &Path, name: &str) -> Self {
        Self {
            ca_cert: dir.join("ca.crt"),
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
        }
    }
}

/// Creates a CA in `dir` (`ca.crt`, `ca.key`). Refuses to overwrite an existing one.
pub fn init_ca(dir: &Path, validity: Duration) -> Result<(), TlsError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let (cert_path, key_path) = (dir.join("ca.crt"), dir.join("ca.key"));
    if cert_path.exists() || key_path.exists() {
        return Err(TlsError::CaExists(dir.to_path_buf()));
    }
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "unistor CA");
    dn.push(DnType::OrganizationName, "unistor");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = now_minus_skew();
    params.not_after = time::OffsetDateTime::now_utc() + validity;
    let cert = params.self_signed(&key)?;
    write_private(&key_path, &key.serialize_pem())?;
    fs::write(&cert_path, cert.pem()).map_err(io_err(&cert_path))?;
    Ok(())
}

/// Issues a certificate for `name` in `role`, signed by the CA in `dir`.
/// Writes `<name>.crt` and `<name>.key` (0600), replacing earlier ones.
pub fn issue(dir: &Path, name: &PeerName, role: Role, validity: Duration) -> Result<(), TlsError> {
    let (ca_cert_path, ca_key_path) = (dir.join("ca.crt"), dir.join("ca.key"));
    let ca_pem = fs::read_to_string(&ca_cert_path).map_err(io_err(&ca_cert_path))?;
    let ca_key_pem = fs::read_to_string(&ca_key_path).map_err(io_err(&ca_key_path))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![name.as_str().to_string()])?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name.as_str());
    dn.push(
        DnType::OrganizationalUnitName,
        match role {
            Role::Controller => "controller",
            Role::Agent => "agent",
        },
    );
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![match role {
        Role::Controller => ExtendedKeyUsagePurpose::ClientAuth,
        Role::Agent => ExtendedKeyUsagePurpose::ServerAuth,
    }];
    params.use_authority_key_identifier_extension = true;
    params.not_before = now_minus_skew();
    params.not_after = time::OffsetDateTime::now_utc() + validity;
    let cert = params.signed_by(&key, &issuer)?;
    let paths = PkiPaths::in_dir(dir, name.as_str());
    write_private(&paths.key, &key.serialize_pem())?;
    fs::write(&paths.cert, cert.pem()).map_err(io_err(&paths.cert))?;
    Ok(())
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = fs::read(path).map_err(io_err(path))?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|_| TlsError::Pem {
            path: path.to_path_buf(),
            what: "certificate",
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            what: "certificate",
        });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = fs::read(path).map_err(io_err(path))?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|_| TlsError::Pem {
        path: path.to_path_buf(),
        what: "private key",
    })
}

fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert)?;
    }
    Ok(roots)
}

/// The agent side: present the agent certificate, require a client certificate from the CA.
pub fn server_config(paths: &PkiPaths) -> Result<Arc<ServerConfig>, TlsError> {
    let roots = Arc::new(load_roots(&paths.ca_cert)?);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider()).build()?;
    let config = ServerConfig::builder_with_details(provider(), Arc::new(crate::clock::WallClock))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&paths.cert)?, load_key(&paths.key)?)?;
    Ok(Arc::new(config))
}

/// The controller side: trust only the CA, present the controller certificate.
pub fn client_config(paths: &PkiPaths) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = load_roots(&paths.ca_cert)?;
    let config = ClientConfig::builder_with_details(provider(), Arc::new(crate::clock::WallClock))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(load_certs(&paths.cert)?, load_key(&paths.key)?)?;
    Ok(Arc::new(config))
}

/// The authenticated name in a verified peer certificate: its first DNS subject-alternative
/// name, else its common name.
pub fn peer_name(cert: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::prelude::*;
    let (_, x509) = X509Certificate::from_der(cert.as_ref()).ok()?;
    if let Ok(Some(san)) = x509.subject_alternative_name() {
        for gn in &san.value.general_names {
            if let GeneralName::DNSName(n) = gn {
                return Some((*n).to_string());
            }
        }
    }
    let cn = x509
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string);
    cn
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_is_not_overwritten_and_names_are_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let year = Duration::from_secs(365 * 86400);
        init_ca(dir.path(), year).unwrap();
        assert!(matches!(
            init_ca(dir.path(), year),
            Err(TlsError::CaExists(_))
        ));
        let name = PeerName::parse("name", "ceph-1").unwrap();
        issue(dir.path(), &name, Role::Agent, year).unwrap();
        let paths = PkiPaths::in_dir(dir.path(), "ceph-1");
        let certs = load_certs(&paths.cert).unwrap();
        assert_eq!(peer_name(&certs[0]).as_deref(), Some("ceph-1"));
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&paths.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "key readable by others: {mode:o}");
        server_config(&paths).unwrap();
    }
}
