//! https upstreams: rustls with certificate and host name verification on,
//! and pooled TLS connections reused only for the same name.
//! The test CA is trusted through SSL_CERT_FILE (read by rustls-native-certs
//! when the proxy builds its TLS connector); this file is its own test
//! process, so the variable touches nothing else.

mod common;

use std::sync::atomic::Ordering;

use common::tls::{tls_origin, TestCa};
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstreams_are_verified() {
    // A CA the proxy trusts, and a leaf for "localhost" signed by it.
    common::logs::capture();
    let ca = TestCa::new();
    ca.trust();
    let (good, good_connections) = tls_origin(ca.leaf.clone(), ca.leaf_key(), b"secure bytes").await;
    // Self-signed, not from the trusted CA.
    let (rogue, rogue_key) = TestCa::rogue();
    let (untrusted, _) = tls_origin(rogue, rogue_key, b"should never arrive").await;

    let p = Proxy::open().await;
    // Three requests, one TLS connection: it is pooled and reused (TLS 1.3
    // session tickets arriving after the handshake do not make it look busy).
    for _ in 0..3 {
        let got = get(p.addr(), "GET", &relay_path("v.mp4", &format!("https://localhost:{good}/v.mp4")), &[]).await;
        assert_eq!(got.status, 200, "{}", got.text());
        assert_eq!(got.body, b"secure bytes");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(good_connections.load(Ordering::SeqCst), 1);

    // Untrusted certificate: refused, and the log says why in rustls's
    // words (not only that a handshake failed).
    let got = get(p.addr(), "GET", &relay_path("v.mp4", &format!("https://localhost:{untrusted}/v.mp4")), &[]).await;
    assert_eq!(got.status, 502);
    assert!(!got.text().contains("should never arrive"));
    let warning = |at: String| common::logs::logs().lines().find(|l| l.contains(&at)).unwrap_or_default().to_string();
    assert_eq!(
        warning(format!("localhost:{untrusted}")),
        format!("WARN upstream failed: localhost:{untrusted}: TLS handshake failed (invalid peer certificate: UnknownIssuer)")
    );
    // Trusted certificate, wrong name (the leaf is for "localhost" only).
    let got = get(p.addr(), "GET", &relay_path("v.mp4", &format!("https://127.0.0.1:{good}/v.mp4")), &[]).await;
    assert_eq!(got.status, 502);
    let said = warning(format!("127.0.0.1:{good}"));
    assert!(said.contains("TLS handshake failed (invalid peer certificate: certificate not valid for name"), "{said}");
}
