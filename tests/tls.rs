//! https upstreams: rustls with certificate and host name verification on,
//! and pooled TLS connections reused only for the same name.
//! The test CA is trusted through SSL_CERT_FILE (read by rustls-native-certs
//! when the proxy builds its TLS connector); this file is its own test
//! process, so the variable touches nothing else.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

/// A keep-alive TLS origin on 127.0.0.1 presenting `cert`, answering every
/// request with `body`; returns its port and a count of its connections.
async fn tls_origin(
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstreams_are_verified() {
    // A CA the proxy trusts, and a leaf for "localhost" signed by it.
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
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    // Before the proxy (and its TLS connector) exists.
    std::env::set_var("SSL_CERT_FILE", &ca_file);
    std::env::remove_var("SSL_CERT_DIR");

    let key = || PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let (good, good_connections) = tls_origin(leaf.der().clone(), key(), b"secure bytes").await;
    // Self-signed, not from the trusted CA.
    let rogue_key = rcgen::KeyPair::generate().unwrap();
    let rogue = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap().self_signed(&rogue_key).unwrap();
    let (untrusted, _) = tls_origin(
        rogue.der().clone(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(rogue_key.serialize_der())),
        b"should never arrive",
    )
    .await;

    let p = Proxy::start("auth: {mode: none}\negress: {allow_cidrs: [\"127.0.0.0/8\"]}\n").await;
    // Three requests, one TLS connection: it is pooled and reused (TLS 1.3
    // session tickets arriving after the handshake do not make it look busy).
    for _ in 0..3 {
        let got = get(p.addr(), "GET", &relay_path("v.mp4", &format!("https://localhost:{good}/v.mp4")), &[]).await;
        assert_eq!(got.status, 200, "{}", got.text());
        assert_eq!(got.body, b"secure bytes");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(good_connections.load(Ordering::SeqCst), 1);

    // Untrusted certificate: refused.
    let got = get(p.addr(), "GET", &relay_path("v.mp4", &format!("https://localhost:{untrusted}/v.mp4")), &[]).await;
    assert_eq!(got.status, 502);
    assert!(!got.text().contains("should never arrive"));
    // Trusted certificate, wrong name (the leaf is for "localhost" only).
    let got = get(p.addr(), "GET", &relay_path("v.mp4", &format!("https://127.0.0.1:{good}/v.mp4")), &[]).await;
    assert_eq!(got.status, 502);
}
