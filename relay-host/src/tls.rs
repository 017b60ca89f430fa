//! TLS for the relay and its terminals (rustls with the `ring` provider, which builds from
//! crates.io with only a C compiler; aws-lc-rs would need cmake).
//!
//! Server: a real certificate from `--cert/--key`, or a self-signed one generated on first
//! start and kept beside the account store (`relay.db` → `relay-cert.pem`,
//! `relay-key.pem`, the key 0600), whose SHA-256 fingerprint the operator hands to
//! terminals.
//!
//! Client: trusts the relay by the system's roots, by a CA file, or by pinning the
//! fingerprint of the relay's certificate. Pinning still checks the handshake signature, so
//! only the holder of the pinned certificate's key passes.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use sha2::{Digest, Sha256};
use thiserror::Error;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// The names the generated self-signed certificate carries. Terminals that pin its
/// fingerprint do not check names; these only make it look sane to other tools.
const SELF_SIGNED_NAMES: [&str; 2] = ["relay", "localhost"];

/// A SHA-256 certificate fingerprint, shown as colon-separated upper-case hex
/// (`AB:CD:…`, the form `openssl x509 -fingerprint -sha256` prints).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER certificate.
    pub fn of(cert: &CertificateDer<'_>) -> Self {
        Self(Sha256::digest(cert.as_ref()).into())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{b:02X}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// A string is not a SHA-256 fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("a fingerprint is 32 bytes of hex, optionally colon-separated (AB:CD:...)")]
pub struct BadFingerprint;

impl FromStr for Fingerprint {
    type Err = BadFingerprint;
    /// Accepts hex in either case, with or without colons, and an optional `sha256:` or
    /// `SHA256:` prefix, so a copy-paste from any common tool works.
    fn from_str(s: &str) -> Result<Self, BadFingerprint> {
        let s = s.trim();
        let s = s
            .strip_prefix("sha256:")
            .or_else(|| s.strip_prefix("SHA256:"))
            .unwrap_or(s);
        let hex: Vec<u8> = s.bytes().filter(|&b| b != b':').collect();
        if hex.len() != 64 {
            return Err(BadFingerprint);
        }
        let mut out = [0u8; 32];
        for (i, pair) in hex.chunks(2).enumerate() {
            let pair = std::str::from_utf8(pair).map_err(|_| BadFingerprint)?;
            out[i] = u8::from_str_radix(pair, 16).map_err(|_| BadFingerprint)?;
        }
        Ok(Self(out))
    }
}

/// A TLS setup step failed.
#[derive(Debug, Error)]
pub enum TlsError {
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A PEM file holds nothing usable.
    #[error("{}: {what}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// Only one of the generated certificate and key exists.
    #[error(
        "{} exists but {} does not; restore it or delete both to generate a new certificate",
        present.display(),
        missing.display()
    )]
    HalfIdentity {
        /// The file that exists.
        present: PathBuf,
        /// The file that does not.
        missing: PathBuf,
    },
    /// Generating the self-signed certificate failed.
    #[error("generating a certificate failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the configuration (for example, a key that does not match the
    /// certificate).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The relay presented a certificate other than the pinned one.
    #[error(transparent)]
    Mismatch(#[from] FingerprintMismatch),
    /// The TLS handshake with the relay failed for another reason (untrusted certificate,
    /// wrong name, connection closed).
    #[error("TLS handshake with the relay failed: {0}")]
    Handshake(io::Error),
    /// The system trust store has no usable certificate.
    #[error("no usable certificate in the system trust store; use --ca FILE or --fingerprint")]
    NoSystemRoots,
}

/// The relay's certificate chain and private key.
#[derive(Debug)]
pub struct ServerIdentity {
    /// End-entity certificate first.
    pub certs: Vec<CertificateDer<'static>>,
    /// The private key.
    pub key: PrivateKeyDer<'static>,
}

impl ServerIdentity {
    /// The fingerprint terminals pin: that of the end-entity certificate.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.certs[0])
    }

    /// Loads a PEM certificate chain and a PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let cert_pem = fs::read(cert).map_err(|source| TlsError::Io {
            path: cert.to_owned(),
            source,
        })?;
        let certs = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Pem {
                path: cert.to_owned(),
                what: e.to_string(),
            })?;
        if certs.is_empty() {
            return Err(TlsError::Pem {
                path: cert.to_owned(),
                what: "no CERTIFICATE block".into(),
            });
        }
        let key_pem = fs::read(key).map_err(|source| TlsError::Io {
            path: key.to_owned(),
            source,
        })?;
        let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Pem {
            path: key.to_owned(),
            what: format!("no usable private key ({e})"),
        })?;
        Ok(Self {
            certs,
            key: key_der,
        })
    }

    /// Loads the self-signed identity kept beside the account store at `db`, generating it
    /// first if neither file exists. Returns the identity and whether it was generated now.
    pub fn load_or_generate(db: &Path) -> Result<(Self, bool), TlsError> {
        let (cert, key) = generated_paths(db);
        match (cert.exists(), key.exists()) {
            (true, true) => Ok((Self::load(&cert, &key)?, false)),
            (false, false) => {
                let generated = rcgen::generate_simple_self_signed(
                    SELF_SIGNED_NAMES.map(String::from).to_vec(),
                )?;
                // The key first, created 0600 so it is never readable by others, not even
                // for a moment; `create_new` never overwrites a file that appeared meanwhile.
                write_new(
                    &key,
                    generated.signing_key.serialize_pem().as_bytes(),
                    0o600,
                )?;
                write_new(&cert, generated.cert.pem().as_bytes(), 0o644)?;
                tracing::info!(cert = %cert.display(), key = %key.display(), "generated a self-signed certificate");
                Ok((Self::load(&cert, &key)?, true))
            }
            (true, false) => Err(TlsError::HalfIdentity {
                present: cert,
                missing: key,
            }),
            (false, true) => Err(TlsError::HalfIdentity {
                present: key,
                missing: cert,
            }),
        }
    }

    /// The rustls server configuration for this identity.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(self.certs.clone(), self.key.clone_key())?;
        Ok(Arc::new(config))
    }
}

/// Where the generated certificate and key live for the store at `db`: beside it, named
/// after its stem (`relay.db` → `relay-cert.pem`, `relay-key.pem`).
pub fn generated_paths(db: &Path) -> (PathBuf, PathBuf) {
    let stem = db
        .file_stem()
        .map_or_else(|| "relay".into(), |s| s.to_string_lossy().into_owned());
    (
        db.with_file_name(format!("{stem}-cert.pem")),
        db.with_file_name(format!("{stem}-key.pem")),
    )
}

pub(crate) fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), TlsError> {
    let io_err = |source| TlsError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io_err)?;
    file.write_all(data).map_err(io_err)?;
    file.sync_all().map_err(io_err)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// How a terminal decides to trust the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerTrust {
    /// The operating system's trust store (for a relay with a public CA certificate).
    SystemRoots,
    /// The CA certificates in a PEM file (a private CA, or the relay's own certificate).
    CaFile(PathBuf),
    /// Exactly the certificate with this SHA-256 fingerprint (the generated self-signed
    /// certificate); names and dates are not checked, the handshake signature is.
    Pinned(Fingerprint),
}

/// The rustls client configuration for `trust`.
pub fn client_config(trust: &ServerTrust) -> Result<Arc<ClientConfig>, TlsError> {
    let builder =
        ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let config = match trust {
        ServerTrust::SystemRoots => {
            let loaded = rustls_native_certs::load_native_certs();
            for e in &loaded.errors {
                tracing::warn!("system trust store: {e}");
            }
            let mut roots = RootCertStore::empty();
            let (added, _ignored) = roots.add_parsable_certificates(loaded.certs);
            if added == 0 {
                return Err(TlsError::NoSystemRoots);
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        ServerTrust::CaFile(path) => {
            let pem = fs::read(path).map_err(|source| TlsError::Io {
                path: path.clone(),
                source,
            })?;
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| TlsError::Pem {
                    path: path.clone(),
                    what: e.to_string(),
                })?;
                roots.add(cert)?;
            }
            if roots.is_empty() {
                return Err(TlsError::Pem {
                    path: path.clone(),
                    what: "no CERTIFICATE block".into(),
                });
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        ServerTrust::Pinned(expected) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCertVerifier {
                expected: *expected,
                provider: provider(),
            }))
            .with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Opens TLS to the relay over `tcp`. A pinned-fingerprint mismatch comes back as
/// [`TlsError::Mismatch`], naming both fingerprints, rather than buried in rustls' wording.
pub async fn connect(
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
    tcp: TcpStream,
) -> Result<TlsStream<TcpStream>, TlsError> {
    TlsConnector::from(config)
        .connect(server_name, tcp)
        .await
        .map_err(classify_handshake_error)
}

fn classify_handshake_error(err: io::Error) -> TlsError {
    let mismatch = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .and_then(|tls| match tls {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) => {
                other.0.downcast_ref::<FingerprintMismatch>().cloned()
            }
            _ => None,
        });
    match mismatch {
        Some(m) => TlsError::Mismatch(m),
        None => TlsError::Handshake(err),
    }
}

/// The relay presented a certificate other than the pinned one.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error(
    "relay certificate fingerprint mismatch: expected {expected}, the relay presented {presented}"
)]
pub struct FingerprintMismatch {
    /// The pinned fingerprint.
    pub expected: Fingerprint,
    /// The fingerprint of the certificate the relay sent.
    pub presented: Fingerprint,
}

/// Accepts exactly the end-entity certificate with the pinned SHA-256 fingerprint, and
/// verifies the handshake signatures against it as usual.
#[derive(Debug)]
struct PinnedCertVerifier {
    expected: Fingerprint,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCertVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = Fingerprint::of(end_entity);
        if presented == self.expected {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(
                    FingerprintMismatch {
                        expected: self.expected,
                        presented,
                    },
                ))),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio_rustls::TlsAcceptor;

    use super::*;

    #[test]
    fn fingerprint_text_round_trip() {
        let fp = Fingerprint([0xAB; 32]);
        let text = fp.to_string();
        assert_eq!(text.len(), 32 * 3 - 1);
        assert!(text.starts_with("AB:AB:"));
        assert_eq!(text.parse::<Fingerprint>(), Ok(fp));
        assert_eq!(text.to_lowercase().replace(':', "").parse(), Ok(fp));
        assert_eq!(format!("sha256:{text}").parse(), Ok(fp));
        assert_eq!("AB:CD".parse::<Fingerprint>(), Err(BadFingerprint));
        assert_eq!("zz".repeat(32).parse::<Fingerprint>(), Err(BadFingerprint));
        assert_eq!("é".repeat(32).parse::<Fingerprint>(), Err(BadFingerprint));
    }

    #[test]
    fn generated_identity_is_kept_beside_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("relay.db");
        let (cert, key) = generated_paths(&db);
        assert_eq!(cert, dir.path().join("relay-cert.pem"));
        assert_eq!(key, dir.path().join("relay-key.pem"));

        let (first, generated) = ServerIdentity::load_or_generate(&db).unwrap();
        assert!(generated);
        let mode = fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (second, generated) = ServerIdentity::load_or_generate(&db).unwrap();
        assert!(!generated);
        assert_eq!(first.fingerprint(), second.fingerprint());

        fs::remove_file(&key).unwrap();
        let err = ServerIdentity::load_or_generate(&db).unwrap_err();
        assert!(matches!(err, TlsError::HalfIdentity { .. }), "{err}");
    }

    /// Runs one TLS handshake over 127.0.0.1 and an echo of a few bytes.
    async fn handshake(
        identity: &ServerIdentity,
        trust: &ServerTrust,
        name: &str,
    ) -> Result<(), TlsError> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(identity.server_config().unwrap());
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = acceptor.accept(tcp).await?;
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await?;
            tls.write_all(&buf).await?;
            tls.shutdown().await
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let server_name = ServerName::try_from(name.to_owned()).unwrap();
        let result = async {
            let mut tls = connect(client_config(trust).unwrap(), server_name, tcp).await?;
            let echo = async {
                tls.write_all(b"ping").await?;
                let mut buf = [0u8; 4];
                tls.read_exact(&mut buf).await?;
                assert_eq!(&buf, b"ping");
                Ok::<_, io::Error>(())
            };
            echo.await.map_err(TlsError::Handshake)
        }
        .await;
        // The server side fails too when the client aborts; only the client's view matters.
        let _ = server.await.unwrap();
        result
    }

    #[tokio::test]
    async fn pinned_fingerprint_accepts_the_right_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let (identity, _) = ServerIdentity::load_or_generate(&dir.path().join("relay.db")).unwrap();
        let trust = ServerTrust::Pinned(identity.fingerprint());
        // Names are not checked under pinning: an IP address works as well as a name.
        handshake(&identity, &trust, "127.0.0.1").await.unwrap();
        handshake(&identity, &trust, "relay.example").await.unwrap();
    }

    #[tokio::test]
    async fn pinned_fingerprint_mismatch_names_both() {
        let dir = tempfile::tempdir().unwrap();
        let (identity, _) = ServerIdentity::load_or_generate(&dir.path().join("relay.db")).unwrap();
        let wrong = Fingerprint([0x11; 32]);
        let err = handshake(&identity, &ServerTrust::Pinned(wrong), "localhost")
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, TlsError::Mismatch(_)), "{text}");
        assert_eq!(
            text,
            format!(
                "relay certificate fingerprint mismatch: expected {wrong}, the relay presented {}",
                identity.fingerprint()
            )
        );
        assert!(text.contains(&wrong.to_string()), "{text}");
        assert!(text.contains(&identity.fingerprint().to_string()), "{text}");
    }

    #[tokio::test]
    async fn ca_file_verifies_chain_and_name() {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        let ca_path = dir.path().join("ca.pem");
        fs::write(&ca_path, ca_cert.pem()).unwrap();
        let cert_path = dir.path().join("cert.pem");
        let key_path = dir.path().join("key.pem");
        fs::write(&cert_path, leaf.pem()).unwrap();
        fs::write(&key_path, leaf_key.serialize_pem()).unwrap();

        let identity = ServerIdentity::load(&cert_path, &key_path).unwrap();
        let trust = ServerTrust::CaFile(ca_path.clone());
        handshake(&identity, &trust, "localhost").await.unwrap();
        // The CA path checks names: the certificate is not for this one.
        let err = handshake(&identity, &trust, "other.example")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("certificate"), "{err}");
        // A CA that did not sign the relay's certificate is refused.
        let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let other_path = dir.path().join("other.pem");
        fs::write(&other_path, other.cert.pem()).unwrap();
        let err = handshake(&identity, &ServerTrust::CaFile(other_path), "localhost")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("certificate"), "{err}");
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        fs::write(&empty, "").unwrap();
        let err = ServerIdentity::load(&empty, &empty).unwrap_err();
        assert!(err.to_string().contains("empty.pem"), "{err}");
        let err = client_config(&ServerTrust::CaFile(dir.path().join("nope.pem"))).unwrap_err();
        assert!(err.to_string().contains("nope.pem"), "{err}");
    }
}
