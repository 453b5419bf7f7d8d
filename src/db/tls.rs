//! TLS for Postgres sessions: reads libpq's `sslmode` and `sslrootcert` out
//! of `database_url`, builds the rustls connector every session uses (pool,
//! LISTEN, wake locks, maintenance, CLI, bench), and turns handshake
//! failures into messages that name the setting.
//!
//! It never opens a connection and never reads any other setting; `db`
//! opens sessions with what it returns. Only the URL form of `database_url`
//! is read (the configuration accepts no other), and libpq's environment
//! variables (`PGSSLMODE`, ...) and `~/.postgresql/root.crt` are not.

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::Socket;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::error::{Error, Result};

/// The setting every message here names.
pub const SETTING: &str = "database_url (DATABASE_URL)";

/// libpq's `sslmode`, with libpq's default (`prefer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SslMode {
    /// Plain TCP only.
    Disable,
    /// Read as `prefer`: TLS first, plain when the server has no TLS.
    Allow,
    /// TLS when the server offers it, plain otherwise; the certificate is
    /// not checked unless `sslrootcert` is given.
    Prefer,
    /// TLS or no session; the certificate is not checked unless
    /// `sslrootcert` is given (then as `verify-ca`).
    Require,
    /// TLS, certificate signed by a CA in `sslrootcert`; any host name.
    VerifyCa,
    /// TLS, certificate signed by a CA in `sslrootcert` and issued for the
    /// host connected to.
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<SslMode> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(url_error(format!(
                    "sslmode={other:?} is not one of disable, allow, prefer, require, verify-ca, verify-full"
                )))
            }
        })
    }

    fn verifies(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        })
    }
}

/// Where the CA certificates that sign the server's certificate come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RootCert {
    /// A PEM file of one or more certificates.
    File(PathBuf),
    /// The system's trust store (`sslrootcert=system`).
    System,
}

impl fmt::Display for RootCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RootCert::File(path) => write!(f, "{}", path.display()),
            RootCert::System => f.write_str("system"),
        }
    }
}

/// The TLS part of `database_url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TlsSettings {
    pub(crate) mode: SslMode,
    pub(crate) root_cert: Option<RootCert>,
}

/// libpq settings that would change what TLS means, which Herald does not
/// implement; refused rather than ignored.
const UNSUPPORTED: &[&str] = &[
    "sslcert",
    "sslkey",
    "sslpassword",
    "sslcrl",
    "sslcrldir",
    "sslcertmode",
];

/// Split `url` into what tokio-postgres parses (every other parameter kept
/// as written) and the TLS settings; tokio-postgres knows neither
/// `verify-ca`/`verify-full` nor `sslrootcert`.
pub(crate) fn split(url: &str) -> Result<(String, TlsSettings)> {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, query),
        None => (url, ""),
    };
    let mut kept = Vec::new();
    let mut mode = None;
    let mut root = None;
    for part in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = part.split_once('=').unwrap_or((part, ""));
        match decode(key).as_str() {
            "sslmode" => mode = Some(decode(value)),
            "sslrootcert" => root = Some(decode(value)),
            key if UNSUPPORTED.contains(&key) => {
                return Err(url_error(format!(
                    "{key} is not supported: Herald does not present client certificates or \
                     check revocation lists (supported: sslmode, sslrootcert)"
                )))
            }
            _ => kept.push(part),
        }
    }
    let root_cert = match root.as_deref() {
        None | Some("") => None,
        Some("system") => Some(RootCert::System),
        Some(path) => Some(RootCert::File(PathBuf::from(path))),
    };
    let mode = match mode.as_deref() {
        // As libpq: the system store vouches for any host name it has a
        // certificate for, so only the host-name check makes it mean much.
        None if root_cert == Some(RootCert::System) => SslMode::VerifyFull,
        None => SslMode::Prefer,
        Some(value) => SslMode::parse(value)?,
    };
    if root_cert == Some(RootCert::System) && mode != SslMode::VerifyFull {
        return Err(url_error(format!(
            "sslmode={mode} may not be used with sslrootcert=system (use sslmode=verify-full): \
             a public CA signs certificates for any host, so the host name must be checked"
        )));
    }
    if mode.verifies() && root_cert.is_none() {
        return Err(url_error(format!(
            "sslmode={mode} needs sslrootcert: the path of a PEM file with the CA certificate \
             that signed the server's certificate, or sslrootcert=system for the system's trust store"
        )));
    }
    let rest = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((
        rest,
        TlsSettings {
            mode,
            root_cert: root_cert.filter(|_| mode != SslMode::Disable),
        },
    ))
}

impl TlsSettings {
    /// What tokio-postgres negotiates; verification is the connector's.
    pub(crate) fn pg_mode(&self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as Pg;
        match self.mode {
            SslMode::Disable => Pg::Disable,
            SslMode::Allow | SslMode::Prefer => Pg::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Pg::Require,
        }
    }

    /// The connector for these settings; reads `sslrootcert`.
    pub(crate) fn connector(&self) -> Result<MakeTls> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = match &self.root_cert {
            None => None,
            Some(root) => Some(Arc::new(load_roots(root)?)),
        };
        let verifier = Verifier {
            roots,
            check_host: self.mode == SslMode::VerifyFull,
            algorithms: provider.signature_verification_algorithms,
        };
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Other(format!("setting up TLS for Postgres: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        Ok(MakeTls {
            inner: MakeRustlsConnect::new(config),
            settings: Arc::new(self.clone()),
        })
    }

    /// A setting-naming reason for a failed connection attempt, when TLS
    /// is why it failed.
    pub(crate) fn explain(&self, error: &(dyn std::error::Error + 'static)) -> Option<String> {
        let mut source = Some(error);
        while let Some(e) = source {
            if let Some(tls) = e.downcast_ref::<TlsError>() {
                return Some(tls.reason.clone());
            }
            // tokio-postgres' own words when the server answers the TLS
            // request with "no"; it exposes no type to match on.
            if e.to_string() == "server does not support TLS" {
                return Some(format!(
                    "sslmode={}: server does not support TLS (its ssl setting is off); \
                     use sslmode=prefer or disable to connect without TLS",
                    self.mode
                ));
            }
            source = e.source();
        }
        None
    }

    fn label(&self) -> String {
        match (&self.root_cert, self.mode.verifies()) {
            (Some(root), false) => format!("sslmode={} with sslrootcert={root}", self.mode),
            _ => format!("sslmode={}", self.mode),
        }
    }
}

fn url_error(reason: String) -> Error {
    Error::Url {
        setting: SETTING,
        reason,
    }
}

/// Percent-decoding of one URL query component, as tokio-postgres does it
/// (a `+` stays a `+`).
fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
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

fn load_roots(root: &RootCert) -> Result<RootCertStore> {
    let mut store = RootCertStore::empty();
    match root {
        RootCert::System => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found
                    .errors
                    .first()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default();
                return Err(url_error(format!(
                    "sslrootcert=system: the system trust store holds no usable certificate \
                     (install ca-certificates, or set SSL_CERT_FILE){why}"
                )));
            }
        }
        RootCert::File(path) => {
            let shown = path.display();
            let pem = std::fs::read(path).map_err(|e| {
                url_error(format!("sslrootcert={shown}: cannot read the file: {e}"))
            })?;
            let certs = CertificateDer::pem_slice_iter(&pem)
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| {
                    url_error(format!(
                        "sslrootcert={shown}: not a PEM file of certificates: {e}"
                    ))
                })?;
            if certs.is_empty() {
                return Err(url_error(format!(
                    "sslrootcert={shown}: holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
                )));
            }
            for (i, cert) in certs.into_iter().enumerate() {
                store.add(cert).map_err(|e| {
                    url_error(format!(
                        "sslrootcert={shown}: certificate {} is not usable as a CA: {e}",
                        i + 1
                    ))
                })?;
            }
        }
    }
    Ok(store)
}

/// Checks the chain against `sslrootcert` when there is one, and the host
/// name for `verify-full`; without roots (prefer, require) it accepts any
/// certificate, as libpq does. Handshake signatures are always checked.
#[derive(Debug)]
struct Verifier {
    roots: Option<Arc<RootCertStore>>,
    check_host: bool,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.algorithms.all,
            )?;
            if self.check_host {
                rustls::client::verify_server_name(&cert, server_name)?;
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A TLS handshake that failed, said in terms of the settings.
#[derive(Debug, thiserror::Error)]
#[error("{SETTING}: {reason}")]
pub struct TlsError {
    reason: String,
}

/// The stream of a TLS session.
pub type TlsStream = <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream;
type RustlsConnect = <MakeRustlsConnect as MakeTlsConnect<Socket>>::TlsConnect;

/// tokio-postgres' TLS connector for Herald's sessions: rustls, with
/// handshake errors rewritten to name the setting.
#[derive(Clone)]
pub struct MakeTls {
    inner: MakeRustlsConnect,
    settings: Arc<TlsSettings>,
}

impl MakeTlsConnect<Socket> for MakeTls {
    type Stream = TlsStream;
    type TlsConnect = Connect;
    type Error = std::convert::Infallible;

    fn make_tls_connect(&mut self, host: &str) -> std::result::Result<Connect, Self::Error> {
        Ok(Connect {
            inner: MakeTlsConnect::<Socket>::make_tls_connect(&mut self.inner, host)?,
            host: host.to_string(),
            settings: self.settings.clone(),
        })
    }
}

/// One handshake (see [`MakeTls`]).
pub struct Connect {
    inner: RustlsConnect,
    host: String,
    settings: Arc<TlsSettings>,
}

impl TlsConnect<Socket> for Connect {
    type Stream = TlsStream;
    type Error = TlsError;
    type Future = Pin<Box<dyn Future<Output = std::result::Result<TlsStream, TlsError>> + Send>>;

    fn connect(self, stream: Socket) -> Self::Future {
        let Connect {
            inner,
            host,
            settings,
        } = self;
        let handshake = inner.connect(stream);
        Box::pin(async move {
            handshake.await.map_err(|e| TlsError {
                reason: format!("{}: {}", settings.label(), why(&settings, &host, &e)),
            })
        })
    }
}

fn why(settings: &TlsSettings, host: &str, error: &std::io::Error) -> String {
    let rustls_error = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>());
    let root = settings
        .root_cert
        .as_ref()
        .map(|r| r.to_string())
        .unwrap_or_default();
    match rustls_error {
        Some(rustls::Error::InvalidCertificate(c)) => match c {
            CertificateError::NotValidForName => {
                format!("server certificate is not valid for host {host}")
            }
            CertificateError::NotValidForNameContext { presented, .. } => format!(
                "server certificate is not valid for host {host} (it is for {})",
                presented
                    .iter()
                    .map(|name| plain_name(name))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            CertificateError::UnknownIssuer => {
                format!("server certificate is not signed by a CA in sslrootcert ({root})")
            }
            CertificateError::BadSignature => format!(
                "server certificate's signature does not verify against sslrootcert ({root})"
            ),
            other => format!("server certificate rejected: {other}"),
        },
        Some(other) => format!("TLS handshake with {host} failed: {other}"),
        None => format!("TLS handshake with {host} failed: {error}"),
    }
}

/// `localhost` for rustls' `DnsName("localhost")` (and the like for IP
/// addresses).
fn plain_name(name: &str) -> &str {
    match (name.find('('), name.strip_suffix(')')) {
        (Some(open), Some(inner)) => inner[open + 1..].trim_matches('"'),
        _ => name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_keeps_other_parameters_and_reads_tls_ones() {
        let (rest, tls) = split(
            "postgres://u@h:5432/db?application_name=a%20b&sslmode=verify-full&sslrootcert=%2Ftmp%2Fca.pem&options=-c+x",
        )
        .unwrap();
        assert_eq!(
            rest,
            "postgres://u@h:5432/db?application_name=a%20b&options=-c+x"
        );
        assert_eq!(tls.mode, SslMode::VerifyFull);
        assert_eq!(tls.root_cert, Some(RootCert::File("/tmp/ca.pem".into())));
    }

    #[test]
    fn defaults_follow_libpq() {
        let (rest, tls) = split("postgres://u@h/db").unwrap();
        assert_eq!(rest, "postgres://u@h/db");
        assert_eq!(tls.mode, SslMode::Prefer);
        let (_, tls) = split("postgres://u@h/db?sslrootcert=system").unwrap();
        assert_eq!(tls.mode, SslMode::VerifyFull);
        let (rest, tls) = split("postgres://u@h/db?sslmode=disable").unwrap();
        assert_eq!(rest, "postgres://u@h/db");
        assert_eq!(tls.pg_mode(), tokio_postgres::config::SslMode::Disable);
    }

    #[test]
    fn wrong_settings_name_themselves() {
        let err = |url: &str| split(url).unwrap_err().to_string();
        assert!(err("postgres://h/db?sslmode=verify_full").contains("sslmode=\"verify_full\""));
        assert!(err("postgres://h/db?sslmode=verify-ca").contains("needs sslrootcert"));
        assert!(err("postgres://h/db?sslmode=require&sslrootcert=system")
            .contains("use sslmode=verify-full"));
        assert!(err("postgres://h/db?sslcert=/c.pem").contains("sslcert is not supported"));
        let missing = split("postgres://h/db?sslmode=require&sslrootcert=/nonexistent/ca.pem")
            .unwrap()
            .1
            .connector()
            .err()
            .unwrap()
            .to_string();
        assert!(
            missing.contains("database_url (DATABASE_URL)")
                && missing.contains("sslrootcert=/nonexistent/ca.pem: cannot read the file"),
            "{missing}"
        );
    }

    #[test]
    fn names_read_plainly() {
        assert_eq!(plain_name("DnsName(\"localhost\")"), "localhost");
        assert_eq!(plain_name("IpAddress(127.0.0.1)"), "127.0.0.1");
        assert_eq!(plain_name("db.internal"), "db.internal");
    }

    #[test]
    fn decode_handles_escapes() {
        assert_eq!(decode("a%2Fb%2"), "a/b%2");
        assert_eq!(decode("%41+"), "A+");
    }
}
