//! TLS on the listeners: the SDKs build `https://` URLs for envd, the code interpreter and
//! `get_host`, so every listener also speaks TLS (`server.rs` tells TLS from plain HTTP by
//! the first byte). [`acceptor`] builds the one acceptor they share.
//!
//! With `--tls-cert`/`--tls-key` the listeners present that chain and key. Without them the
//! gateway keeps a local CA in `<state-dir>/tls` (`ca.pem`, and `ca-key.pem` with mode
//! 0600), made on the first start and reused after, and issues certificates from it in
//! memory at every start: one for `localhost`, `*.localhost`, `--domain` and `*.<domain>`,
//! `127.0.0.1`, `::1` and the listeners' own addresses. A wildcard needs two labels after
//! the `*` (webpki and OpenSSL refuse `*.localhost`), so a name one label under a one-label
//! base (`49983-<id>.localhost`) gets its own certificate when a client first asks for it
//! by SNI. Certificates are issued again before they expire; the CA lasts ten years.
//!
//! **Invariant:** nothing here knows HTTP; the CA's key never leaves its file and this module.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::client::danger::ServerCertVerifier as _;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::{CertifiedKey, SigningKey};
use rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

use crate::config::{Config, TlsFiles};
use crate::StartError;

/// The local CA's directory under the state directory.
const DIR: &str = "tls";
/// The CA certificate users trust.
const CA_CERT: &str = "ca.pem";
/// The CA's private key.
const CA_KEY: &str = "ca-key.pem";
/// How long the CA is valid: users trust it once, so it outlives many gateway versions.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long an issued certificate is valid.
const LEAF_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);
/// A certificate is issued again once it has less than this left.
const RENEW_WITHIN: Duration = Duration::from_secs(30 * 24 * 3600);
/// Certificates start this far in the past, for clients whose clock is a little behind.
const BACKDATE: Duration = Duration::from_secs(3600);
/// Most per-name certificates kept; past it they are dropped and issued again when asked.
const MAX_ISSUED: usize = 4096;
/// What the listeners offer by ALPN; hyper-util's auto builder serves both.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsError {
    /// A file or directory could not be read, written or made.
    #[error("{op} {}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// To what.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A PEM file did not parse.
    #[error("read {}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// `--tls-cert` holds no certificate.
    #[error("no certificate in {}", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// `--tls-key` holds no private key.
    #[error("no private key in {}", path.display())]
    NoKey {
        /// The file.
        path: PathBuf,
    },
    /// rustls refused the chain and key (they do not match, or the key type is unsupported).
    #[error("serve {} with the key in {}", cert.display(), key.display())]
    Files {
        /// `--tls-cert`.
        cert: PathBuf,
        /// `--tls-key`.
        key: PathBuf,
        /// rustls' error.
        #[source]
        source: rustls::Error,
    },
    /// The CA's key did not parse.
    #[error("read the CA key in {}", path.display())]
    CaKey {
        /// The file.
        path: PathBuf,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
    /// A key or certificate could not be made.
    #[error("generate {what}")]
    Generate {
        /// Which.
        what: String,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
    /// The CA certificate on disk does not verify what its key issues (files from two CAs).
    #[error(
        "the CA certificate {} does not verify certificates issued with its key; move {} away to make a new CA",
        path.display(),
        dir.display()
    )]
    CaMismatch {
        /// The CA certificate.
        path: PathBuf,
        /// Its directory.
        dir: PathBuf,
        /// Why verification failed.
        #[source]
        source: rustls::Error,
    },
    /// rustls refused the configuration.
    #[error("tls configuration")]
    Config(#[source] rustls::Error),
}

/// The acceptor every listener hands TLS connections to: `--tls-cert`/`--tls-key`, or the
/// local CA's certificates (made on the first start; its path is logged for users to trust).
pub(crate) fn acceptor(config: &Config) -> Result<TlsAcceptor, StartError> {
    server_config(config)
        .map(|c| TlsAcceptor::from(Arc::new(c)))
        .map_err(|e| StartError::Setup(crate::api::error::error_chain(&e)))
}

/// Whether `--tls-cert`/`--tls-key` hold a chain and its key that rustls accepts, without
/// making anything (`--check-config`).
pub(crate) fn check_files(files: &TlsFiles) -> Result<(), String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (chain, key) = read_files(files).map_err(|e| crate::api::error::error_chain(&e))?;
    ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map(drop)
        .map_err(|e| format!("{} and {}: {e}", files.cert.display(), files.key.display()))
}

/// The listeners' TLS configuration: rustls on ring, TLS 1.2 and 1.3, ALPN `h2` and
/// `http/1.1`.
fn server_config(config: &Config) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_no_client_auth();
    let mut server = match &config.tls_files {
        Some(files) => {
            let (chain, key) = read_files(files)?;
            let server =
                builder
                    .with_single_cert(chain, key)
                    .map_err(|source| TlsError::Files {
                        cert: files.cert.clone(),
                        key: files.key.clone(),
                        source,
                    })?;
            tracing::info!(cert = %files.cert.display(), "tls with --tls-cert");
            server
        }
        None => {
            let dir = config.state_dir.join(DIR);
            let ca = LocalCa::open_or_create(&dir)?;
            let (names, bases) = leaf_names(config);
            let issuer = Issuer::new(ca, names, bases, &provider)?;
            issuer.check(&provider)?;
            tracing::info!("trust this CA for https: {}", issuer.ca.cert_path.display());
            builder.with_cert_resolver(Arc::new(issuer))
        }
    };
    server.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(server)
}

/// The chain and key `--tls-cert`/`--tls-key` name.
fn read_files(
    files: &TlsFiles,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let chain = CertificateDer::pem_file_iter(&files.cert)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|source| TlsError::Pem {
            path: files.cert.clone(),
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: files.cert.clone(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|source| {
        let path = files.key.clone();
        match source {
            rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey { path },
            source => TlsError::Pem { path, source },
        }
    })?;
    Ok((chain, key))
}

/// The names the default certificate carries, and the one-label bases under which a name
/// gets a certificate of its own (see the module's doc).
fn leaf_names(config: &Config) -> (Vec<String>, Vec<String>) {
    let mut names = vec!["localhost".to_owned(), "*.localhost".to_owned()];
    let mut bases = vec!["localhost".to_owned()];
    if let Some(domain) = config.domain.as_deref().map(domain_host) {
        if let Ok(ip) = domain.parse::<IpAddr>() {
            names.push(ip.to_string());
        } else if domain != "localhost" && !domain.is_empty() {
            names.push(domain.clone());
            names.push(format!("*.{domain}"));
            if !domain.contains('.') {
                bases.push(domain);
            }
        }
    }
    let addrs = std::iter::once(&config.listen).chain(&config.extra_listen);
    // A listener on one address of a host is reached by it; the wildcard address is not
    // a name anyone connects to.
    let ips = [Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()]
        .into_iter()
        .chain(addrs.map(std::net::SocketAddr::ip))
        .filter(|ip: &IpAddr| !ip.is_unspecified());
    for ip in ips {
        let ip = ip.to_string();
        if !names.contains(&ip) {
            names.push(ip);
        }
    }
    (names, bases)
}

/// `--domain` as a host name: lower case, without a port or dots at either end.
fn domain_host(domain: &str) -> String {
    if domain.parse::<IpAddr>().is_ok() {
        return domain.to_owned();
    }
    let host = match domain.rsplit_once(':') {
        Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => domain,
    };
    host.trim_matches(['.', '[', ']']).to_ascii_lowercase()
}

/// The local CA: its key, and a certificate with its name to issue from.
struct LocalCa {
    /// An issuer certificate made from the key at start. It is never served: clients check
    /// issued certificates against `ca.pem`, whose subject and key it shares.
    cert: rcgen::Certificate,
    key: KeyPair,
    /// `ca.pem`, what users trust.
    cert_path: PathBuf,
}

impl LocalCa {
    /// Reads the CA in `dir`, or makes one there. The key is the CA: a missing `ca.pem` is
    /// written again from it, and a missing key means a new CA.
    fn open_or_create(dir: &Path) -> Result<Self, TlsError> {
        let io = |op, path: &Path| {
            let path = path.to_owned();
            move |source| TlsError::Io { op, path, source }
        };
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io("set the mode of", dir))?;
        let key_path = dir.join(CA_KEY);
        let cert_path = dir.join(CA_CERT);
        let (key, made) = match std::fs::read_to_string(&key_path) {
            Ok(pem) => {
                let key = KeyPair::from_pem(&pem).map_err(|source| TlsError::CaKey {
                    path: key_path.clone(),
                    source,
                })?;
                (key, false)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = KeyPair::generate().map_err(|source| TlsError::Generate {
                    what: "the CA key".into(),
                    source,
                })?;
                write_atomic(&key_path, &key.serialize_pem(), 0o600)?;
                (key, true)
            }
            Err(source) => {
                return Err(TlsError::Io {
                    op: "read",
                    path: key_path,
                    source,
                })
            }
        };
        let cert = ca_params(&key, SystemTime::now())
            .self_signed(&key)
            .map_err(|source| TlsError::Generate {
                what: "the CA certificate".into(),
                source,
            })?;
        if made || !cert_path.exists() {
            write_atomic(&cert_path, &cert.pem(), 0o644)?;
            tracing::info!(path = %cert_path.display(), "made a local CA for https");
        }
        Ok(Self {
            cert,
            key,
            cert_path,
        })
    }
}

/// The CA's certificate parameters. Its subject is derived from the key alone, so the
/// issuer made at every start has the subject of the `ca.pem` made at the first; the
/// key's fingerprint in it keeps the CAs of two machines apart in a trust store.
fn ca_params(key: &KeyPair, now: SystemTime) -> CertificateParams {
    let digest = ring::digest::digest(&ring::digest::SHA256, &key.public_key_der());
    let fingerprint: String = digest.as_ref()[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Coppice");
    dn.push(
        DnType::CommonName,
        format!("Coppice local CA {fingerprint}"),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + CA_LIFETIME).into();
    params.serial_number = Some(random_serial());
    params
}

/// A random positive serial number of 128 bits (uuid's v4 draws from the OS).
fn random_serial() -> SerialNumber {
    let mut bytes = uuid::Uuid::new_v4().into_bytes();
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

/// Writes `contents` to `path` through a temporary file, so a crash leaves the old file or
/// the new one; `mode` applies from the moment the file exists.
fn write_atomic(path: &Path, contents: &str, mode: u32) -> Result<(), TlsError> {
    let tmp = path.with_extension("pem.tmp");
    let io = |op, path: &Path| {
        let path = path.to_owned();
        move |source| TlsError::Io { op, path, source }
    };
    // A leftover from a crash may have another mode, which `mode` would not change.
    let _ = std::fs::remove_file(&tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io("create", &tmp))?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io("write", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("rename into place", path))
}

/// A certificate issued from the local CA.
struct Issued {
    key: Arc<CertifiedKey>,
    /// When to issue it again.
    renew_at: SystemTime,
}

/// Picks the certificate for each handshake, issuing from the local CA as needed.
struct Issuer {
    ca: LocalCa,
    /// The key of every issued certificate, made at start and never written anywhere.
    leaf_key: KeyPair,
    signer: Arc<dyn SigningKey>,
    /// The names of the default certificate.
    names: Vec<String>,
    /// One-label bases whose one-label subdomains get certificates of their own.
    bases: Vec<String>,
    /// Issued certificates by SNI name; the default one under "".
    issued: Mutex<HashMap<String, Issued>>,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("ca", &self.ca.cert_path)
            .field("names", &self.names)
            .field("bases", &self.bases)
            .finish_non_exhaustive()
    }
}

impl Issuer {
    fn new(
        ca: LocalCa,
        names: Vec<String>,
        bases: Vec<String>,
        provider: &CryptoProvider,
    ) -> Result<Self, TlsError> {
        let leaf_key = KeyPair::generate().map_err(|source| TlsError::Generate {
            what: "the certificates' key".into(),
            source,
        })?;
        // rcgen serializes keys as PKCS#8.
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let signer = provider
            .key_provider
            .load_private_key(der)
            .map_err(TlsError::Config)?;
        Ok(Self {
            ca,
            leaf_key,
            signer,
            names,
            bases,
            issued: Mutex::new(HashMap::new()),
        })
    }

    /// Checks, before serving, that `ca.pem` verifies the default certificate, so files from
    /// two different CAs fail the start and not every handshake.
    fn check(&self, provider: &Arc<CryptoProvider>) -> Result<(), TlsError> {
        let path = &self.ca.cert_path;
        let mismatch = |source| TlsError::CaMismatch {
            path: path.clone(),
            dir: path.parent().map(Path::to_owned).unwrap_or_default(),
            source,
        };
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(path).map_err(|source| TlsError::Pem {
            path: path.clone(),
            source,
        })? {
            let cert = cert.map_err(|source| TlsError::Pem {
                path: path.clone(),
                source,
            })?;
            roots.add(cert).map_err(mismatch)?;
        }
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(provider))
                .build()
                .map_err(|e| mismatch(rustls::Error::General(e.to_string())))?;
        let issued = self.certificate("")?;
        let leaf = issued
            .cert
            .first()
            .ok_or_else(|| mismatch(rustls::Error::General("no certificate was issued".into())))?;
        let name = ServerName::try_from("localhost")
            .map_err(|e| mismatch(rustls::Error::General(e.to_string())))?;
        verifier
            .verify_server_cert(leaf, &[], &name, &[], UnixTime::now())
            .map_err(mismatch)?;
        Ok(())
    }

    /// The certificate for SNI name `sni`, issued now if there is none or it is due.
    fn certificate(&self, sni: &str) -> Result<Arc<CertifiedKey>, TlsError> {
        let key = if self.needs_own(sni) { sni } else { "" };
        let now = SystemTime::now();
        // Issuing under the lock keeps a burst of handshakes for one name to one signature.
        let mut issued = crate::lock(&self.issued);
        if let Some(i) = issued.get(key).filter(|i| now < i.renew_at) {
            return Ok(Arc::clone(&i.key));
        }
        let names = if key.is_empty() {
            self.names.clone()
        } else {
            vec![key.to_owned()]
        };
        let i = self.issue(names, now)?;
        if issued.len() >= MAX_ISSUED {
            issued.retain(|k, _| k.is_empty());
        }
        let cert = Arc::clone(&i.key);
        issued.insert(key.to_owned(), i);
        Ok(cert)
    }

    /// Whether `sni` is a one-label name under a one-label base (`49983-<id>.localhost`),
    /// which no wildcard can cover.
    fn needs_own(&self, sni: &str) -> bool {
        sni.split_once('.').is_some_and(|(label, base)| {
            !label.is_empty() && label != "*" && self.bases.iter().any(|b| b == base)
        })
    }

    fn issue(&self, names: Vec<String>, now: SystemTime) -> Result<Issued, TlsError> {
        let what = || format!("a certificate for {}", names.join(", "));
        let mut params =
            CertificateParams::new(names.clone()).map_err(|source| TlsError::Generate {
                what: what(),
                source,
            })?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Coppice");
        if let Some(first) = names.first() {
            dn.push(DnType::CommonName, first.as_str());
        }
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + LEAF_LIFETIME).into();
        params.serial_number = Some(random_serial());
        let cert = params
            .signed_by(&self.leaf_key, &self.ca.cert, &self.ca.key)
            .map_err(|source| TlsError::Generate {
                what: what(),
                source,
            })?;
        Ok(Issued {
            key: Arc::new(CertifiedKey::new(
                vec![cert.der().clone()],
                Arc::clone(&self.signer),
            )),
            renew_at: now + (LEAF_LIFETIME - RENEW_WITHIN),
        })
    }
}

impl ResolvesServerCert for Issuer {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let sni = hello
            .server_name()
            .map(str::to_ascii_lowercase)
            .unwrap_or_default();
        match self.certificate(&sni) {
            Ok(cert) => Some(cert),
            Err(e) => {
                tracing::warn!(sni, error = %crate::api::error::error_chain(&e), "no certificate for a tls handshake");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str], state_dir: &Path) -> Config {
        let mut all = vec!["--state-dir".to_owned(), state_dir.display().to_string()];
        all.extend(args.iter().map(|a| (*a).to_owned()));
        Config::from_args_and_env(all.into_iter(), |_| None).unwrap()
    }

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn issuer(config: &Config) -> Issuer {
        let ca = LocalCa::open_or_create(&config.state_dir.join(DIR)).unwrap();
        let (names, bases) = leaf_names(config);
        Issuer::new(ca, names, bases, &provider()).unwrap()
    }

    /// Verifies `cert` for `name` against the CA certificates in `ca_pem`, as a client that
    /// trusts only them would.
    fn verify(ca_pem: &Path, cert: &CertifiedKey, name: &str) -> Result<(), rustls::Error> {
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(ca_pem).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .unwrap();
        let name = ServerName::try_from(name.to_owned()).unwrap();
        verifier
            .verify_server_cert(&cert.cert[0], &[], &name, &[], UnixTime::now())
            .map(|_| ())
    }

    #[test]
    fn the_local_ca_is_made_once_and_its_key_kept_private() {
        let state = tempfile::tempdir().unwrap();
        let dir = state.path().join(DIR);
        let first = LocalCa::open_or_create(&dir).unwrap();
        let pem = std::fs::read(&first.cert_path).unwrap();
        let key = std::fs::read(dir.join(CA_KEY)).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.join(CA_KEY)), 0o600);
        assert_eq!(mode(&dir), 0o700);
        LocalCa::open_or_create(&dir).unwrap();
        assert_eq!(
            std::fs::read(&first.cert_path).unwrap(),
            pem,
            "ca.pem was rewritten"
        );
        assert_eq!(std::fs::read(dir.join(CA_KEY)).unwrap(), key);
        // Without ca.pem the key still is the CA: the certificate comes back, and it
        // verifies what the key issues.
        std::fs::remove_file(&first.cert_path).unwrap();
        let config = config(&[], state.path());
        let issuer = issuer(&config);
        issuer.check(&provider()).unwrap();
        assert_eq!(std::fs::read(dir.join(CA_KEY)).unwrap(), key);
        assert!(!dir.join("ca.pem.tmp").exists());
    }

    #[test]
    fn issued_certificates_verify_for_every_name() {
        let state = tempfile::tempdir().unwrap();
        let config = config(
            &[
                "--domain",
                "sbx.example.com:8443",
                "--listen",
                "127.0.0.2:0",
            ],
            state.path(),
        );
        let issuer = issuer(&config);
        let ca = issuer.ca.cert_path.clone();
        issuer.check(&provider()).unwrap();
        let default = issuer.certificate("").unwrap();
        for name in [
            "localhost",
            "127.0.0.1",
            "::1",
            "127.0.0.2",
            "sbx.example.com",
            "49983-abc123.sbx.example.com",
        ] {
            verify(&ca, &default, name).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        // `*.localhost` is in it but no verifier honours a wildcard over one label...
        assert!(matches!(
            verify(&ca, &default, "49983-abc123.localhost"),
            Err(rustls::Error::InvalidCertificate(_))
        ));
        // ...so such a name gets a certificate of its own, issued once.
        let own = issuer.certificate("49983-abc123.localhost").unwrap();
        verify(&ca, &own, "49983-abc123.localhost").unwrap();
        assert!(Arc::ptr_eq(
            &own,
            &issuer.certificate("49983-abc123.localhost").unwrap()
        ));
        // Names a wildcard covers, and names of no base of ours, get the default.
        for sni in ["8000-x.sbx.example.com", "example.org", "a.b.localhost", ""] {
            assert!(
                Arc::ptr_eq(&default, &issuer.certificate(sni).unwrap()),
                "{sni}"
            );
        }
    }

    #[test]
    fn a_one_label_domain_gets_names_of_their_own() {
        let state = tempfile::tempdir().unwrap();
        let issuer = issuer(&config(&["--domain", "box"], state.path()));
        let own = issuer.certificate("8000-abc.box").unwrap();
        verify(&issuer.ca.cert_path, &own, "8000-abc.box").unwrap();
        verify(
            &issuer.ca.cert_path,
            &issuer.certificate("").unwrap(),
            "box",
        )
        .unwrap();
    }

    #[test]
    fn a_ca_certificate_from_another_key_fails_the_check() {
        let state = tempfile::tempdir().unwrap();
        let config = config(&[], state.path());
        let issuer = issuer(&config);
        let other = KeyPair::generate().unwrap();
        let pem = ca_params(&other, SystemTime::now())
            .self_signed(&other)
            .unwrap()
            .pem();
        std::fs::write(&issuer.ca.cert_path, pem).unwrap();
        let e = issuer.check(&provider()).unwrap_err();
        assert!(matches!(e, TlsError::CaMismatch { .. }), "{e:?}");
        assert!(e.to_string().contains("move"), "{e}");
    }

    #[test]
    fn given_files_are_served_and_bad_ones_named() {
        let state = tempfile::tempdir().unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let cert_path = state.path().join("cert.pem");
        let key_path = state.path().join("key.pem");
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        let (c, k) = (cert_path.to_str().unwrap(), key_path.to_str().unwrap());
        let served = server_config(&config(&["--tls-cert", c, "--tls-key", k], state.path()));
        assert_eq!(served.unwrap().alpn_protocols, [&b"h2"[..], b"http/1.1"]);
        assert!(
            !state.path().join(DIR).exists(),
            "no local CA with given files"
        );

        // The key file holds only a certificate.
        let e = server_config(&config(&["--tls-cert", c, "--tls-key", c], state.path()));
        assert!(
            matches!(&e, Err(TlsError::NoKey { path }) if path == &cert_path),
            "{e:?}"
        );
        // The certificate file holds only a key.
        let e = server_config(&config(&["--tls-cert", k, "--tls-key", k], state.path()));
        assert!(matches!(&e, Err(TlsError::NoCertificate { .. })), "{e:?}");
        // A key of another certificate.
        std::fs::write(&key_path, KeyPair::generate().unwrap().serialize_pem()).unwrap();
        let e = server_config(&config(&["--tls-cert", c, "--tls-key", k], state.path()));
        assert!(matches!(&e, Err(TlsError::Files { .. })), "{e:?}");
        // A file that is not there.
        let gone = state.path().join("gone.pem");
        let g = gone.to_str().unwrap();
        let e =
            server_config(&config(&["--tls-cert", g, "--tls-key", k], state.path())).unwrap_err();
        assert!(
            crate::api::error::error_chain(&e).contains("gone.pem"),
            "{e:?}"
        );
    }

    #[test]
    fn the_domain_is_a_host_name() {
        assert_eq!(domain_host("Sbx.Example.:8443"), "sbx.example");
        assert_eq!(domain_host("sbx.example"), "sbx.example");
        assert_eq!(domain_host("::1"), "::1");
        assert_eq!(domain_host("[::1]:8443"), "::1");
    }
}
