//! https origins for the tests: a keep-alive TLS server answering every
//! request with fixed bytes.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

use super::find;

/// A keep-alive TLS origin on 127.0.0.1 presenting `cert`, answering every
/// request with `body`; returns its port and a count of its connections.
pub async fn tls_origin(
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    body: &'static [u8],
) -> (u16, Arc<AtomicUsize>) {
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let config = ServerConfig::builder().with_no_client_auth().with_single_cert(vec![cert], key).unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            counted.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let mut buf = Vec::new();
                let mut tmp = [0u8; 4096];
                loop {
                    while find(&buf, b"\r\n\r\n").is_none() {
                        match tls.read(&mut tmp).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&tmp[..n]),
                        }
                    }
                    buf.clear();
                    let head =
                        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: video/mp4\r\n\r\n", body.len());
                    if tls.write_all(head.as_bytes()).await.is_err() || tls.write_all(body).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, connections)
}

/// A test CA, written to `ca.pem` in its directory, and a certificate for
/// `localhost` it signed.
pub struct TestCa {
    pub dir: tempfile::TempDir,
    pub leaf: CertificateDer<'static>,
    leaf_key: Vec<u8>,
}

impl TestCa {
    pub fn new() -> TestCa {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "anibridge test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&leaf_key, &ca, &ca_key)
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        TestCa { dir, leaf: leaf.der().clone(), leaf_key: leaf_key.serialize_der() }
    }

    /// The `localhost` certificate and its key as PEM files (for a server
    /// such as nginx), in the CA's directory.
    pub fn write_leaf(&self) -> (std::path::PathBuf, std::path::PathBuf) {
        use base64::Engine;
        let pem = |label: &str, der: &[u8]| {
            let b64 = base64::engine::general_purpose::STANDARD.encode(der);
            let lines: Vec<&str> = b64.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap()).collect();
            format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
        };
        let (cert, key) = (self.dir.path().join("localhost.pem"), self.dir.path().join("localhost.key"));
        std::fs::write(&cert, pem("CERTIFICATE", &self.leaf)).unwrap();
        std::fs::write(&key, pem("PRIVATE KEY", &self.leaf_key)).unwrap();
        (cert, key)
    }

    pub fn leaf_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.leaf_key.clone()))
    }

    /// Makes this process trust the CA (and nothing else): rustls reads
    /// SSL_CERT_FILE when the proxy builds its TLS connector, so this must
    /// run before any proxy is started.
    pub fn trust(&self) {
        std::env::set_var("SSL_CERT_FILE", self.dir.path().join("ca.pem"));
        std::env::remove_var("SSL_CERT_DIR");
    }

    /// A certificate for `localhost` no trusted CA signed, and its key.
    pub fn rogue() -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap().self_signed(&key).unwrap();
        (cert.der().clone(), PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())))
    }
}
