//! Egress policy at the dialled address, server-side redirects, provider
//! profiles. Every destination here is a loopback form: refusals are
//! proven by the origin never seeing a connection.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use common::process::nginx_hoster;
use common::*;

async fn origin() -> Origin {
    Origin::start(|req| {
        let p = req.path();
        let q = req.target.split_once('?').map(|(_, q)| q).unwrap_or("");
        if let Some(rest) = p.strip_prefix("/chain/") {
            // /chain/N redirects to /chain/N-1 ... /chain/0 serves the file.
            let n: u32 = rest.parse().unwrap();
            if n == 0 {
                return serve_file(req, 1000, Some("video/mp4")).into();
            }
            let loc = if n.is_multiple_of(2) { format!("/chain/{}", n - 1) } else { format!("{}", n - 1) };
            return Resp::new(302, Body::Bytes(b"moved".to_vec())).header("Location", &loc).into();
        }
        match p {
            "/file.mp4" => serve_file(req, 1000, Some("video/mp4")).into(),
            "/see-other" => Resp::new(303, Body::Bytes(Vec::new())).header("Location", "/file.mp4").into(),
            "/perm" => Resp::new(308, Body::Bytes(Vec::new())).header("Location", "/file.mp4").into(),
            "/to-ftp" => Resp::new(301, Body::Bytes(Vec::new())).header("Location", "ftp://127.0.0.1/x").into(),
            "/no-location" => Resp::new(302, Body::Bytes(Vec::new())).into(),
            "/to" => {
                // /to?dest=URL redirects anywhere (URL-decoded by hand).
                let dest = q.strip_prefix("dest=").unwrap_or("");
                let dest = percent_encoding::percent_decode_str(dest).decode_utf8_lossy().to_string();
                Resp::new(307, Body::Bytes(Vec::new())).header("Location", &dest).into()
            }
            "/headers" => {
                let body = req.headers.iter().map(|(k, v)| format!("{k}: {v}\n")).collect::<String>();
                Resp::new(200, Body::Bytes(body.into_bytes())).header("Content-Type", "text/plain").into()
            }
            _ => Resp::new(404, Body::Bytes(Vec::new())).into(),
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_in_every_spelling_is_refused_before_connecting() {
    let o = origin().await;
    let p = Proxy::start("auth: {mode: none}\n").await;
    let port = o.addr.port();
    for host in [
        "127.0.0.1".to_string(),
        "127.1.2.3".into(),
        "127.1".into(),
        "[::1]".into(),
        "localhost".into(),
        "[::ffff:127.0.0.1]".into(),
        "[::ffff:7f00:1]".into(),
        "2130706433".into(),
        "0x7f000001".into(),
        "0177.0.0.1".into(),
        "0.0.0.0".into(),
        "[::]".into(),
    ] {
        let u = format!("http://{host}:{port}/file.mp4");
        let got = get(p.addr(), "GET", &relay_path("v.mp4", &u), &[]).await;
        assert_eq!(got.status, 403, "{u}: {}", got.text());
        assert_eq!(got.text(), "destination not allowed\n");
    }
    assert_eq!(o.connections.load(Ordering::SeqCst), 0, "no packet may reach a refused destination");
    // The same origin works once allowed.
    let p = Proxy::open().await;
    let got = get(p.addr(), "GET", &relay_path("v.mp4", &o.url("/file.mp4")), &[]).await;
    assert_eq!(got.status, 200);
    let got = get(p.addr(), "GET", &relay_path("v.mp4", &format!("http://localhost:{port}/file.mp4")), &[]).await;
    assert_eq!(got.status, 200, "a name resolving to an allowed address works");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_hosts_refuses_names() {
    let o = origin().await;
    // Also an address: a URL naming it, however spelled, is refused, though
    // allow_cidrs lets the address through.
    let p = Proxy::start(
        "auth: {mode: none}\negress: {allow_cidrs: [\"127.0.0.0/8\"], deny_hosts: [\"LocalHost\", \"*.internal\", \"127.0.0.1\"]}\n",
    )
    .await;
    let port = o.addr.port();
    for u in [
        format!("http://localhost:{port}/file.mp4"),
        "http://db.internal/x".to_string(),
        format!("http://127.0.0.1:{port}/file.mp4"),
        format!("http://2130706433:{port}/file.mp4"),
        format!("http://[::ffff:127.0.0.1]:{port}/file.mp4"),
    ] {
        let got = get(p.addr(), "GET", &relay_path("v.mp4", &u), &[]).await;
        assert_eq!((got.status, got.text()), (403, "destination not allowed\n".to_string()), "{u}");
    }
    assert_eq!(o.connections.load(Ordering::SeqCst), 0);
    // Only what is listed: the same origin at another loopback address.
    let other = format!("http://127.0.0.2:{port}/file.mp4");
    let got = get(p.addr(), "GET", &relay_path("v.mp4", &other), &[]).await;
    assert_ne!(got.status, 403, "{other}");
}

/// An address in `deny_hosts` is never dialled, also when the URL names a
/// host that resolves to it (here `localhost`; each redirect hop is
/// resolved and judged the same way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_address_is_not_dialled_for_a_name_that_resolves_to_it() {
    let o = origin().await;
    let p = Proxy::start("auth: {mode: none}\negress: {allow_cidrs: [\"127.0.0.0/8\"], deny_hosts: [\"127.0.0.1\"]}\n")
        .await;
    let port = o.addr.port();
    let by_name = format!("http://localhost:{port}/file.mp4");
    let got = get(p.addr(), "GET", &relay_path("v.mp4", &by_name), &[]).await;
    assert_eq!((got.status, got.text()), (403, "destination not allowed\n".to_string()), "{by_name}");
    assert_eq!(o.connections.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_followed_server_side_up_to_the_limit() {
    let o = origin().await;
    let p = Proxy::open().await;
    // 5 hops (absolute-path and relative Locations alternate): fine.
    let got = get(p.addr(), "GET", &relay_path("v.mp4", &o.url("/chain/5")), &[("Range", "bytes=10-19")]).await;
    assert_eq!(got.status, 206, "{}", got.text());
    assert_body(&got.body, &pattern(10, 10));
    assert!(!got.has("location"));
    // Range survives every hop.
    let seen = o.requests();
    assert_eq!(seen.len(), 6);
    assert!(seen.iter().all(|r| r.header("range") == Some("bytes=10-19")));
    // 6 hops: refused.
    let got = get(p.addr(), "GET", &relay_path("v.mp4", &o.url("/chain/6")), &[]).await;
    assert_eq!(got.status, 502);
    assert_eq!(got.text(), "too many redirects\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_methods_and_bad_locations() {
    let o = origin().await;
    let p = Proxy::open().await;
    let got = get(p.addr(), "HEAD", &relay_path("v.mp4", &o.url("/see-other")), &[]).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("content-length"), Some("1000"));
    let seen = o.requests();
    assert_eq!(seen[1].method, "HEAD", "HEAD stays HEAD across a 303");
    let got = get(p.addr(), "GET", &relay_path("v.mp4", &o.url("/perm")), &[]).await;
    assert_eq!(got.status, 200);
    let got = get(p.addr(), "GET", &relay_path("v.mp4", &o.url("/to-ftp")), &[]).await;
    assert_eq!(got.status, 502);
    let got = get(p.addr(), "GET", &relay_path("v.mp4", &o.url("/no-location")), &[]).await;
    assert_eq!(got.status, 502);
}

/// Hosters redirect to file names as they stand: nginx's `return 302 /$1`
/// writes its decoded capture, so the `Location` carries a space and raw
/// UTF-8. The proxy follows it as curl and browsers do, percent-encoding
/// those bytes, and the file plays; it used to answer 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_to_a_raw_file_name_is_followed() {
    if tools::needs("nginx", "apt-get install nginx-light").is_none() {
        return;
    }
    let root = pattern_files(&["my file ä.mp4"], 100_000);
    let (nginx, origin) = nginx_hoster(
        root.path(),
        "video/mp4 mp4;",
        "$request_method $request_uri $status \"$http_range\"",
        "location ~ ^/moved/(.*)$ { return 302 /$1; }",
    )
    .await;
    let p = Proxy::open().await;
    let path = relay_path("a.mp4", &format!("http://{origin}/moved/my%20file%20%C3%A4.mp4"));
    let got = get(p.addr(), "GET", &path, &[("Range", "bytes=10-19")]).await;
    assert_eq!(got.status, 206, "{}", got.text());
    assert_eq!(got.header("content-range"), Some("bytes 10-19/100000"));
    assert_body(&got.body, &pattern(10, 10));
    assert!(!got.has("location"));
    let head = get(p.addr(), "HEAD", &path, &[]).await;
    assert_eq!((head.status, head.header("content-length")), (200, Some("100000")));
    let log = nginx.read("access.log");
    let seen: Vec<&str> = log.lines().collect();
    assert_eq!(
        seen[..2],
        ["GET /moved/my%20file%20%C3%A4.mp4 302 \"bytes=10-19\"", "GET /my%20file%20%C3%A4.mp4 206 \"bytes=10-19\""],
        "{log}"
    );
}

/// With loopback allowed, the proxy's own listener is still never an
/// upstream: a `u=` naming it (in either spelling of its address), and an
/// upstream that redirects to the proxy's URL for that same upstream —
/// which made one request into thousands, each a new request to the proxy,
/// until the read timeout — are `403 destination not allowed`, and the
/// upstream sees one request. With the cache off and on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_never_dials_itself() {
    for cache in ["{max_bytes: 0}", "{}"] {
        let back = Arc::new(std::sync::OnceLock::<String>::new());
        let to_proxy = back.clone();
        let o = Origin::start(move |req| match req.path() {
            "/loop" => Resp::new(302, Body::Bytes(Vec::new())).header("Location", to_proxy.get().unwrap()).into(),
            _ => serve_file(req, 1000, Some("video/mp4")).into(),
        })
        .await;
        let p = Proxy::open_with(&format!("upstream: {{read_timeout: \"3s\"}}\ncache: {cache}\n")).await;
        let port = p.addr().port();
        for host in ["127.0.0.1", "[::ffff:127.0.0.1]"] {
            let itself = format!("http://{host}:{port}{}", relay_path("x.mp4", &o.url("/x.mp4")));
            let got = get(p.addr(), "GET", &relay_path("x.mp4", &itself), &[]).await;
            assert_eq!(got.status, 403, "{host}, cache {cache}");
            assert_eq!(got.text().trim(), "destination not allowed");
        }
        let loop_url = o.url("/loop");
        back.set(format!("http://{}{}", p.addr(), relay_path("loop.mp4", &loop_url))).unwrap();
        let got = get(p.addr(), "GET", &relay_path("loop.mp4", &loop_url), &[]).await;
        assert_eq!((got.status, got.text().trim()), (403, "destination not allowed"), "cache {cache}");
        assert_eq!(o.count("/loop"), 1, "cache {cache}: the upstream saw one request");
        assert_eq!(o.requests().len(), 1, "cache {cache}: and nothing through the proxy itself");
        assert_eq!(p.metric("anibridge_egress_refusals_total{reason=\"own_listener\"}"), 3.0, "cache {cache}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_redirect_hop_is_checked_again() {
    let o = origin().await;
    let target = origin().await;
    // Only the first origin's exact address is allowed.
    let yaml = format!("auth: {{mode: none}}\negress: {{allow_cidrs: [\"{}/32\"]}}\n", o.addr.ip());
    let p = Proxy::start(&yaml).await;
    // Same IP is allowed, so use another loopback address for the denied hop.
    let denied = format!("http://127.0.0.2:{}/file.mp4", target.addr.port());
    let dest: String = url::form_urlencoded::byte_serialize(denied.as_bytes()).collect();
    let got = get(p.addr(), "GET", &relay_path("v.mp4", &o.url(&format!("/to?dest={dest}"))), &[]).await;
    assert_eq!(got.status, 403);
    assert_eq!(target.connections.load(Ordering::SeqCst), 0);

    // A trusted route redirecting elsewhere is checked like any u=.
    let yaml = format!("auth: {{mode: none}}\nroutes: [{{prefix: \"/r/\", upstream: \"{}\"}}]\n", o.url("/"));
    let p = Proxy::start(&yaml).await;
    let got = get(p.addr(), "GET", "/r/file.mp4", &[]).await;
    assert_eq!(got.status, 200, "the route's own (private) upstream is trusted");
    let got = get(p.addr(), "GET", &format!("/r/to?dest={dest}"), &[]).await;
    assert_eq!(got.status, 403, "a redirect off the route's upstream is not trusted");
    assert_eq!(target.connections.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_profiles_apply_per_hop_host() {
    let o = origin().await;
    let yaml = "auth: {mode: none}\negress: {allow_cidrs: [\"127.0.0.0/8\"]}\nupstream: {user_agent: \"anibridge-default\"}\nproviders:\n  - hosts: [\"127.0.0.1\"]\n    headers: {Referer: \"https://first.example/\", Origin: \"https://first.example\"}\n  - hosts: [\"localhost\"]\n    headers: {Referer: \"https://second.example/\", User-Agent: \"Mozilla/5.0 test\"}\n";
    let p = Proxy::start(yaml).await;
    let got = get(p.addr(), "GET", &relay_path("h", &o.url("/headers")), &[("Referer", "https://client/")]).await;
    let text = got.text();
    assert!(text.contains("referer: https://first.example/\n"), "{text}");
    assert!(text.contains("origin: https://first.example\n"), "{text}");
    assert!(text.contains("user-agent: anibridge-default\n"), "{text}");
    assert!(!text.contains("https://client/"));
    // A profile's header names go out spelled and ordered as configured.
    let seen = o.requests().pop().unwrap();
    assert_eq!(seen.spelled, vec!["Host", "Accept-Encoding", "User-Agent", "Referer", "Origin"]);

    // After a redirect to another host name, that host's profile applies.
    let second = format!("http://localhost:{}/headers", o.addr.port());
    let dest: String = url::form_urlencoded::byte_serialize(second.as_bytes()).collect();
    let got =
        get(p.addr(), "GET", &relay_path("h", &o.url(&format!("/to?dest={dest}"))), &[("User-Agent", "VLC/3")]).await;
    let text = got.text();
    assert!(text.contains("referer: https://second.example/\n"), "{text}");
    assert!(text.contains("user-agent: Mozilla/5.0 test\n"), "{text}");
    assert!(!text.contains("origin:"), "{text}");
}
