//! HTTPS for the server: the certificate and key (`--tls-cert`, `--tls-key`, PEM), loaded at start-up
//! and re-read on every SIGHUP.
//!
//! Owns: [`TlsFiles`], [`Certificates`] (the rustls `ServerConfig` in force) and the reload task.
//!
//! Invariants:
//! - Each connection takes the configuration in force when it is accepted, and keeps it: a reload never
//!   touches an open connection (keep-alive or mid-request), only the next handshakes.
//! - A reload that fails (a missing, unreadable or mismatched file, say half-way through a copy) keeps
//!   the previous certificate and logs why; at start-up the same failure is a configuration error.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

use crate::error::ConfigError;

/// The PEM files of the server's certificate chain and private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// Reads both files into a rustls configuration (HTTP/1.1, the only protocol `serve` speaks).
    pub fn load(&self) -> Result<Arc<ServerConfig>, String> {
        let certs = read_certs(&self.cert)?;
        let key = PrivateKeyDer::from_pem_file(&self.key)
            .map_err(|e| format!("cannot read a private key from {}: {e}", self.key.display()))?;
        let mut config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| {
                format!(
                    "the certificate {} and the key {} do not go together: {e}",
                    self.cert.display(),
                    self.key.display()
                )
            })?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read certificates from {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

/// The configuration new connections are accepted with.
pub struct Certificates {
    files: TlsFiles,
    current: RwLock<Arc<ServerConfig>>,
}

impl Certificates {
    /// Loads the files; a failure is a configuration error (exit code 2).
    pub fn load(files: TlsFiles) -> Result<Arc<Certificates>, ConfigError> {
        let config = files.load().map_err(|e| ConfigError(format!("TLS: {e}")))?;
        Ok(Arc::new(Certificates { files, current: RwLock::new(config) }))
    }

    pub fn current(&self) -> Arc<ServerConfig> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Re-reads the files; on failure the previous configuration stays and the reason is logged.
    pub fn reload(&self) {
        match self.files.load() {
            Ok(config) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = config;
                tracing::info!(cert = %self.files.cert.display(), "TLS certificate re-read; new connections use it");
            }
            Err(e) => tracing::error!(error = %e, "TLS certificate not reloaded: keeping the previous one"),
        }
    }

    /// Re-reads the files at every tick of `hangups` (see [`super::hangups`]), until the task is aborted.
    pub fn reload_on(self: Arc<Self>, mut hangups: tokio::sync::watch::Receiver<u64>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            while hangups.changed().await.is_ok() {
                self.reload();
            }
        })
    }
}
