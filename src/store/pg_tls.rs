//! PostgreSQL over TLS: the `sslmode` and `sslrootcert` parameters of a `postgres://` URL, read as
//! libpq reads them, and the rustls connector every eps connection to PostgreSQL goes through (the
//! store's pool, the JetStream processor's partition-lock session, and so `eps server`, `eps process`
//! and `eps status`).
//!
//! Owns: [`connect_config`] (URL to a `tokio_postgres::Config` and a [`MakeRustls`]) and
//! [`tls_refusal`] (which connection failures are TLS refusals).
//!
//! `sslmode` (default `prefer`, as libpq's):
//! - `disable`: no TLS.
//! - `prefer`: TLS if the server offers it, else in clear; `require`: TLS or no connection. Neither
//!   verifies the certificate, unless `sslrootcert` is given: then the chain is verified as with
//!   `verify-ca` (libpq's rule).
//! - `verify-ca`: TLS, the certificate chain verified against the roots, not the host name.
//! - `verify-full`: TLS, the chain and the host name (or IP address) of the URL.
//!
//! The roots are the PEM certificates of `sslrootcert`, or the platform's trust store when it is
//! absent or `system` (libpq 16's spelling, which also implies `verify-full`).
//!
//! Invariant: a TLS failure (a certificate that does not verify, a server without TLS where TLS is
//! required, no common protocol) is a configuration error, reported at once with its cause: waiting
//! does not change a certificate. [`tls_refusal`] tells it from an outage (a reset or a timeout
//! during the handshake stays an outage, retried).

use std::fmt;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

use crate::error::ConfigError;

/// libpq's `sslmode` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<SslMode, ConfigError> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            "allow" => {
                return Err(ConfigError(
                    "sslmode=allow is not supported: use prefer (TLS when the server offers it) or disable".into(),
                ))
            }
            other => {
                return Err(ConfigError(format!(
                    "invalid sslmode {other:?} in the PostgreSQL URL: use disable, prefer, require, verify-ca or \
                     verify-full"
                )))
            }
        })
    }
}

/// The connection settings of a `postgres://` URL and the TLS connector its `sslmode` asks for.
pub fn connect_config(url: &str) -> Result<(tokio_postgres::Config, MakeRustls), ConfigError> {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut mode = None;
    let mut root_cert = None;
    let mut rest = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "sslmode" => mode = Some(SslMode::parse(&percent_decode(value))?),
            "sslrootcert" => root_cert = Some(percent_decode(value)),
            _ => rest.push(pair),
        }
    }
    let system = root_cert.as_deref() == Some("system");
    let mode = match (mode, system) {
        (None, true) => SslMode::VerifyFull,
        (Some(m), true) if m != SslMode::VerifyFull => {
            return Err(ConfigError(format!(
                "sslrootcert=system needs sslmode=verify-full (the PostgreSQL URL says {m:?}), as in libpq"
            )))
        }
        (m, _) => m.unwrap_or(SslMode::Prefer),
    };
    // tokio-postgres knows disable, prefer and require; the verification is the connector's.
    rest.push(match mode {
        SslMode::Disable => "sslmode=disable",
        SslMode::Prefer => "sslmode=prefer",
        _ => "sslmode=require",
    });
    let config: tokio_postgres::Config = format!("{base}?{}", rest.join("&"))
        .parse()
        .map_err(|e| ConfigError(format!("invalid PostgreSQL URL (expected postgres://user@host:port/dbname): {e}")))?;
    let verify = match (mode, root_cert.as_deref()) {
        (SslMode::Disable, _) => Verify::Nothing,
        (SslMode::Prefer | SslMode::Require, None) => Verify::Nothing,
        (SslMode::Prefer | SslMode::Require | SslMode::VerifyCa, Some(path)) => Verify::Chain(roots(Some(path))?),
        (SslMode::VerifyCa, None) => Verify::Chain(roots(None)?),
        (SslMode::VerifyFull, path) => Verify::Full(roots(path)?),
    };
    Ok((config, MakeRustls::new(verify, mode)))
}

/// What a connection failure says when it is a TLS refusal (see the module's invariant), `None` when
/// it is not one (an outage, a refused login, a SQL error).
pub fn tls_refusal(e: &tokio_postgres::Error) -> Option<String> {
    // tokio-postgres's Kind::Tls: its Display is fixed, its source the connector's error or its own
    // ("server does not support TLS").
    if !e.to_string().starts_with("error performing TLS handshake") {
        return None;
    }
    let source = std::error::Error::source(e)?;
    if let Some(io) = source.downcast_ref::<io::Error>() {
        // tokio-rustls reports rustls's verdicts as InvalidData wrapping the rustls::Error; any other
        // I/O error during the handshake (a reset, a timeout) is the network's.
        let inner = io.get_ref()?;
        let tls = inner.downcast_ref::<rustls::Error>()?;
        return Some(describe(tls));
    }
    Some(format!("{source} (the URL's sslmode requires TLS; sslmode=disable or prefer connects without it)"))
}

fn describe(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => format!(
            "{e}: the server's certificate is not signed by a trusted root (give the CA's PEM file as sslrootcert=PATH)"
        ),
        rustls::Error::InvalidCertificate(CertificateError::NotValidForName)
        | rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext { .. }) => format!(
            "{e}: the server's certificate does not name the host of the URL (sslmode=verify-full checks it; \
             connect by a name the certificate holds)"
        ),
        e => e.to_string(),
    }
}

fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The trusted roots: the PEM certificates of `sslrootcert`, or the platform's (`None` or `system`).
fn roots(path: Option<&str>) -> Result<Arc<RootCertStore>, ConfigError> {
    let mut store = RootCertStore::empty();
    match path {
        Some(path) if path != "system" => {
            let certs = CertificateDer::pem_file_iter(Path::new(path))
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| ConfigError(format!("cannot read sslrootcert {path}: {e}")))?;
            let (added, _) = store.add_parsable_certificates(certs);
            if added == 0 {
                return Err(ConfigError(format!("sslrootcert {path} holds no usable PEM certificate")));
            }
        }
        _ => {
            let certs = rustls_native_certs::load_native_certs()
                .map_err(|e| ConfigError(format!("cannot read the platform's trusted certificates: {e}")))?;
            let (added, _) = store.add_parsable_certificates(certs);
            if added == 0 {
                return Err(ConfigError(
                    "the platform has no trusted certificates to verify PostgreSQL's with: give sslrootcert=PATH"
                        .into(),
                ));
            }
        }
    }
    Ok(Arc::new(store))
}

enum Verify {
    Nothing,
    Chain(Arc<RootCertStore>),
    Full(Arc<RootCertStore>),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The `MakeTlsConnect` of every eps connection to PostgreSQL (cheap to clone: one shared config).
#[derive(Clone)]
pub struct MakeRustls {
    config: Arc<ClientConfig>,
    mode: SslMode,
}

impl fmt::Debug for MakeRustls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MakeRustls").field("mode", &self.mode).finish()
    }
}

impl MakeRustls {
    fn new(verify: Verify, mode: SslMode) -> MakeRustls {
        let provider = provider();
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions");
        let verifier: Arc<dyn ServerCertVerifier> = match verify {
            Verify::Nothing => Arc::new(NoVerification(provider)),
            Verify::Chain(roots) => Arc::new(ChainOnly(webpki(roots, provider))),
            Verify::Full(roots) => webpki(roots, provider),
        };
        let config = builder.dangerous().with_custom_certificate_verifier(verifier).with_no_client_auth();
        MakeRustls { config: Arc::new(config), mode }
    }
}

fn webpki(roots: Arc<RootCertStore>, provider: Arc<CryptoProvider>) -> Arc<WebPkiServerVerifier> {
    WebPkiServerVerifier::builder_with_provider(roots, provider)
        .build()
        .expect("a non-empty root store builds a verifier")
}

/// `prefer`/`require` without `sslrootcert`: any certificate (libpq's rule), but the handshake's
/// signatures are still checked, so the session is with the holder of the certificate's key.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: webpki's verdict, except that a certificate for another name passes. webpki checks
/// the chain (issuer, validity, usage) before the name, so a name mismatch means the chain verified.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, io::Error> {
        let name = ServerName::try_from(domain.to_owned()).map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{domain:?} as a TLS server name: {e}"))
        })?;
        Ok(RustlsConnect { config: self.config.clone(), name })
    }
}

pub struct RustlsConnect {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = BoxFuture<'static, io::Result<RustlsStream<S>>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let stream = tokio_rustls::TlsConnector::from(self.config).connect(self.name, stream).await?;
            Ok(RustlsStream(Box::new(stream)))
        })
    }
}

/// A TLS session with PostgreSQL (boxed: a rustls connection is large).
pub struct RustlsStream<S>(Box<tokio_rustls::client::TlsStream<S>>);

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        // SCRAM without channel binding (tokio-postgres's `channel_binding=prefer` then goes on without).
        ChannelBinding::none()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_and_sslrootcert_are_taken_out_of_the_url() {
        let (config, tls) = connect_config("postgres://u@h:5/db?application_name=x&sslmode=require").unwrap();
        assert_eq!(config.get_ssl_mode(), tokio_postgres::config::SslMode::Require);
        assert_eq!(config.get_application_name(), Some("x"));
        assert_eq!(tls.mode, SslMode::Require);
        let (config, tls) = connect_config("postgres://u@h:5/db").unwrap();
        assert_eq!(config.get_ssl_mode(), tokio_postgres::config::SslMode::Prefer);
        assert_eq!(tls.mode, SslMode::Prefer);
        let err = connect_config("postgres://u@h/db?sslmode=verify-full&sslrootcert=%2Fno%2Fsuch.pem").unwrap_err();
        assert!(err.0.contains("cannot read sslrootcert /no/such.pem"), "{}", err.0);
        let err = connect_config("postgres://u@h/db?sslmode=bogus").unwrap_err();
        assert!(err.0.contains("invalid sslmode"), "{}", err.0);
    }
}
