//! TLS for `https` webhooks: rustls on the `ring` provider (openssl is banned by deny.toml).
//!
//! Servers are verified against the host's CA bundle — Debian's `ca-certificates` file
//! ([`SYSTEM_BUNDLE`]), read at start, so no roots are compiled in — plus any CA certificates
//! the operator adds ([`Tls::new`]'s `extra_pem`, the gateway's `--webhook-ca-file`), for
//! receivers behind a private CA. The server name is the URL's host; an IP-literal URL is
//! verified against the certificate's IP addresses.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Where Debian (and Ubuntu, Alpine, Arch) keep the system's trusted CAs as one PEM file.
pub const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Why TLS could not be set up or a handshake failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The extra CA PEM holds no usable certificate.
    #[error("no CA certificate in {what}")]
    NoCertificates {
        /// Where they were looked for.
        what: String,
    },
    /// A PEM block did not parse.
    #[error("bad PEM in {what}")]
    Pem {
        /// Where.
        what: String,
        /// The parser's error.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// A CA certificate was refused as a trust anchor.
    #[error("CA certificate in {what} is not usable")]
    Anchor {
        /// Where.
        what: String,
        /// rustls' error.
        #[source]
        source: rustls::Error,
    },
    /// rustls refused the configuration (no usable protocol versions).
    #[error("tls configuration")]
    Config(#[source] rustls::Error),
    /// The host is not a valid TLS server name.
    #[error("{name:?} is not a valid tls server name")]
    ServerName {
        /// The name.
        name: String,
    },
    /// The handshake failed (certificate not trusted, name mismatch, protocol error).
    #[error("handshake")]
    Handshake(#[source] std::io::Error),
}

/// How https receivers are verified; cheap to clone.
#[derive(Clone)]
pub struct Tls {
    connector: TlsConnector,
    roots: usize,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("roots", &self.roots).finish()
    }
}

impl Default for Tls {
    /// The system bundle only; a host without one verifies nothing successfully (every https
    /// attempt then fails with an untrusted-certificate error) rather than trusting anything.
    fn default() -> Self {
        let (roots, _) = system_roots();
        Self::from_roots(roots).unwrap_or_else(|_| Self::empty())
    }
}

impl Tls {
    /// Trusts the system bundle (if the host has one) plus every certificate in `extra_pem`
    /// (the operator's CA file, named `what` in errors). A PEM with no certificate, or one
    /// that does not parse, is an error: an operator who names a CA file means it.
    pub fn new(extra_pem: Option<(&str, &[u8])>) -> Result<Self, TlsError> {
        let (mut roots, _) = system_roots();
        if let Some((what, pem)) = extra_pem {
            let mut added = 0;
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|source| TlsError::Pem {
                    what: what.to_owned(),
                    source,
                })?;
                roots.add(cert).map_err(|source| TlsError::Anchor {
                    what: what.to_owned(),
                    source,
                })?;
                added += 1;
            }
            if added == 0 {
                return Err(TlsError::NoCertificates {
                    what: what.to_owned(),
                });
            }
        }
        Self::from_roots(roots)
    }

    /// How many trust anchors it has.
    pub fn roots(&self) -> usize {
        self.roots
    }

    fn from_roots(roots: RootCertStore) -> Result<Self, TlsError> {
        let n = roots.len();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Tls {
            connector: TlsConnector::from(Arc::new(config)),
            roots: n,
        })
    }

    fn empty() -> Self {
        // With only rustls' `ring` feature built in, the process default provider is ring.
        let config = ClientConfig::builder_with_protocol_versions(rustls::DEFAULT_VERSIONS)
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth();
        Tls {
            connector: TlsConnector::from(Arc::new(config)),
            roots: 0,
        }
    }

    /// Runs the handshake for `name` over `stream`.
    pub(crate) async fn connect(
        &self,
        name: &str,
        stream: TcpStream,
    ) -> Result<TlsStream<TcpStream>, TlsError> {
        let server = ServerName::try_from(name.to_owned()).map_err(|_| TlsError::ServerName {
            name: name.to_owned(),
        })?;
        self.connector
            .connect(server, stream)
            .await
            .map_err(TlsError::Handshake)
    }
}

/// The system bundle's certificates, and how many of its blocks were skipped.
fn system_roots() -> (RootCertStore, usize) {
    let mut roots = RootCertStore::empty();
    let Ok(pem) = std::fs::read(SYSTEM_BUNDLE) else {
        tracing::warn!(
            bundle = SYSTEM_BUNDLE,
            "no system CA bundle: https webhooks verify only against an operator CA file"
        );
        return (roots, 0);
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .collect();
    let (_, skipped) = roots.add_parsable_certificates(certs);
    (roots, skipped)
}
