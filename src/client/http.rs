//! The HTTP client's parts: request bodies as gzip, the roots https URLs are verified with, a refused
//! server certificate (said once per run), and a reqwest error described with its causes.

use std::error::Error as StdError;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context as _;

/// `body` as one gzip member.
pub(super) fn gzip(body: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder =
        flate2::write::GzEncoder::new(Vec::with_capacity(body.len() / 4 + 64), flate2::Compression::default());
    encoder.write_all(body).expect("writing to memory");
    encoder.finish().expect("writing to memory")
}

/// The roots https URLs are verified with: only `ca_cert` when given (a private CA, like curl's
/// `--cacert`), else the platform's trust store, else (a platform without one) reqwest's bundled roots.
pub(super) fn trust(
    builder: reqwest::ClientBuilder,
    ca_cert: Option<&std::path::Path>,
) -> anyhow::Result<reqwest::ClientBuilder> {
    if let Some(path) = ca_cert {
        let pem = std::fs::read(path).with_context(|| format!("cannot read the CA certificate {}", path.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .with_context(|| format!("{} is not a PEM certificate", path.display()))?;
        anyhow::ensure!(!certs.is_empty(), "{} holds no PEM certificate", path.display());
        return Ok(certs.into_iter().fold(builder.tls_built_in_root_certs(false), |b, c| b.add_root_certificate(c)));
    }
    let native: Vec<_> = rustls_native_certs::load_native_certs()
        .unwrap_or_default()
        .iter()
        .filter_map(|der| reqwest::Certificate::from_der(der).ok())
        .collect();
    if native.is_empty() {
        return Ok(builder);
    }
    Ok(native.into_iter().fold(builder.tls_built_in_root_certs(false), |b, c| b.add_root_certificate(c)))
}

pub(super) static CERTIFICATE_REFUSAL_SAID: AtomicBool = AtomicBool::new(false);

/// Whether rustls refused the server's certificate (somewhere in the error's causes; an `io::Error`
/// hides its inner error from `source`, so it is opened with `get_ref`). reqwest's connector may carry
/// it as text only, hence the caller's second test on rustls's wording.
pub(super) fn certificate_refused(e: &reqwest::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(rustls::Error::InvalidCertificate(_)) = c.downcast_ref::<rustls::Error>() {
            return true;
        }
        if let Some(inner) = c.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            if let Some(rustls::Error::InvalidCertificate(_)) = inner.downcast_ref::<rustls::Error>() {
                return true;
            }
        }
        cause = c.source();
    }
    false
}

/// A reqwest error with its causes ("error sending request" alone says nothing).
pub(super) fn describe(e: &reqwest::Error, timeout: Duration) -> String {
    if e.is_timeout() {
        return format!("no answer within {timeout:?}");
    }
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
