//! TLS for both sides: the listener's certificate (with reload), and the upstream client's trust.
//!
//! Only TLS 1.2 and 1.3 are offered, with rustls' default (modern, AEAD-only) cipher suites and
//! the aws-lc-rs provider set explicitly, so no process-wide provider has to be installed.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// Errors loading certificates and keys.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificates from {path}: {source}")]
    Certificates {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("cannot read a private key from {path}: {source}")]
    PrivateKey {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("the certificate and key are not usable together: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("cannot load the system's root certificates: {0}")]
    SystemRoots(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

const PROTOCOL_VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certificates = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Certificates {
            path: path.to_owned(),
            source,
        })?;
    if certificates.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certificates)
}

/// The listener's certificate and key files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerCertificateFiles {
    pub certificate: PathBuf,
    pub private_key: PathBuf,
}

impl ServerCertificateFiles {
    /// Builds a server configuration offering `h2` and `http/1.1` by ALPN.
    pub fn load(&self) -> Result<ServerConfig, TlsError> {
        let certificates = read_certificates(&self.certificate)?;
        let key = PrivateKeyDer::from_pem_file(&self.private_key).map_err(|source| {
            TlsError::PrivateKey {
                path: self.private_key.clone(),
                source,
            }
        })?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(PROTOCOL_VERSIONS)?
            .with_no_client_auth()
            .with_single_cert(certificates, key)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }

    /// The newest modification time of the two files, to notice a renewal.
    fn modified(&self) -> Option<SystemTime> {
        let certificate = std::fs::metadata(&self.certificate)
            .and_then(|meta| meta.modified())
            .ok()?;
        let key = std::fs::metadata(&self.private_key)
            .and_then(|meta| meta.modified())
            .ok()?;
        Some(certificate.max(key))
    }
}

/// The listener's TLS configuration, replaced whole when the certificate is renewed.
#[derive(Debug)]
pub struct ReloadableServerConfig {
    files: ServerCertificateFiles,
    current: RwLock<(Arc<ServerConfig>, Option<SystemTime>)>,
}

impl ReloadableServerConfig {
    pub fn new(files: ServerCertificateFiles) -> Result<Self, TlsError> {
        let modified = files.modified();
        let config = Arc::new(files.load()?);
        Ok(Self {
            files,
            current: RwLock::new((config, modified)),
        })
    }

    /// The configuration for the next accepted connection.
    pub fn current(&self) -> Arc<ServerConfig> {
        match self.current.read() {
            Ok(guard) => guard.0.clone(),
            Err(poisoned) => poisoned.into_inner().0.clone(),
        }
    }

    /// Reloads the files. On failure the previous configuration stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let modified = self.files.modified();
        let config = Arc::new(self.files.load()?);
        let mut guard = match self.current.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        *guard = (config, modified);
        Ok(())
    }

    /// Whether the files changed since they were last loaded.
    pub fn files_changed(&self) -> bool {
        let loaded = match self.current.read() {
            Ok(guard) => guard.1,
            Err(poisoned) => poisoned.into_inner().1,
        };
        let now = self.files.modified();
        now.is_some() && now != loaded
    }
}

/// Builds the upstream client's TLS configuration: the system's roots plus an optional extra CA
/// file. ALPN is left to the connector, which sets it for the chosen upstream protocol.
pub fn upstream_client_config(extra_ca: Option<&Path>) -> Result<ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    let system = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(system.certs);
    if let Some(path) = extra_ca {
        for certificate in read_certificates(path)? {
            roots.add(certificate)?;
        }
    }
    if roots.is_empty() {
        let reasons: Vec<String> = system.errors.iter().map(ToString::to_string).collect();
        return Err(TlsError::SystemRoots(reasons.join("; ")));
    }
    Ok(ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
