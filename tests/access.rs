//! Auth (token, apikey, none), signatures made by Python, static routes
//! with path-bound signatures, CORS, and malformed input.

mod common;

use anibridge_proxy::auth::{canonical_query, sign, Query};
use common::process::nginx_hoster;
use common::*;

async fn origin() -> Origin {
    Origin::start(|req| match req.path() {
        "/cors.mp4" => serve_file(req, 64, Some("video/mp4"))
            .header("Access-Control-Allow-Origin", "https://hoster.example")
            .into(),
        _ => serve_file(req, 64, Some("video/mp4")).into(),
    })
    .await
}

#[derive(serde::Deserialize)]
struct Fixtures {
    secret: String,
    cases: Vec<Case>,
}
#[derive(serde::Deserialize)]
struct Case {
    params: Vec<(String, String)>,
    canonical: String,
    sig: String,
    query: String,
}

fn fixtures() -> Fixtures {
    serde_json::from_str(include_str!("fixtures/python_signatures.json")).unwrap()
}

#[test]
fn python_signatures_verify_byte_for_byte() {
    let f = fixtures();
    for c in &f.cases {
        let q = Query(c.params.clone());
        assert_eq!(canonical_query(&q), c.canonical);
        assert_eq!(sign(f.secret.as_bytes(), &q), c.sig);
        // The query string Python would send parses back to the same params.
        let parsed = Query::parse(Some(&c.query));
        assert_eq!(parsed.get("sig"), Some(c.sig.as_str()));
        assert_eq!(canonical_query(&parsed), c.canonical);
        assert_eq!(anibridge_proxy::auth::verify_token(f.secret.as_bytes(), &parsed, 0), Ok(()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_signed_urls_pass_auth_end_to_end() {
    // The fixture URLs point at *.example hosts; deny_hosts refuses them
    // before any DNS lookup, so passing auth shows up as 403, failing as 401.
    let f = fixtures();
    let yaml = format!("auth: {{mode: token, secret: \"{}\"}}\negress: {{deny_hosts: [\"*.example\"]}}\n", f.secret);
    let p = Proxy::start(&yaml).await;
    let mut checked = 0;
    for c in
        f.cases.iter().filter(|c| c.params.iter().any(|(k, v)| k == "u" && v.contains(".example/") && !v.contains(' ')))
    {
        let got = get(p.addr(), "GET", &format!("/strm/proxy/x?{}", c.query), &[]).await;
        assert_eq!(got.status, 403, "{}: {}", c.query, got.text());
        assert_eq!(got.text(), "destination not allowed\n");
        let tampered = c.query.replace("sig=", "sig=0");
        let got = get(p.addr(), "GET", &format!("/strm/proxy/x?{tampered}"), &[]).await;
        assert_eq!(got.status, 401);
        checked += 1;
    }
    assert!(checked >= 2);
}

/// AniBridge's URL builder (`build_proxy_url`) writes the relay without a
/// `{hint}`: `/strm/proxy?exp=...&sig=...&u=...`, every parameter sorted
/// (its Python data plane served both forms). `.strm` files and playlists
/// it wrote that way play here too: the type and the playlist come from
/// the upstream URL, and a playlist's children get hints as always.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anibridge_relay_urls_without_a_hint_are_served() {
    let o = Origin::start(|req| match req.path() {
        "/v/index.m3u8" => Resp::new(
            200,
            Body::Bytes(b"#EXTM3U\n#EXT-X-TARGETDURATION:4\n#EXTINF:4,\nseg0.ts\n#EXT-X-ENDLIST\n".to_vec()),
        )
        .header("Content-Type", "text/plain")
        .into(),
        "/v/seg0.ts" => serve_file(req, 5000, None).into(),
        _ => serve_file(req, 1000, None).into(),
    })
    .await;
    let p = Proxy::token().await;
    // As Python builds it: sign the sorted parameters, send them sorted with `sig`.
    let anibridge = |u: &str| {
        let mut q = Query(vec![("exp".into(), (now() + 600).to_string()), ("u".into(), u.into())]);
        let sig = sign(SECRET.as_bytes(), &q);
        q.0.insert(1, ("sig".into(), sig));
        format!("/strm/proxy?{}", q.encode())
    };
    let video = anibridge(&o.url("/ep%201.mp4"));
    let got = get(p.addr(), "GET", &video, &[("Range", "bytes=10-19")]).await;
    assert_eq!((got.status, got.header("content-range")), (206, Some("bytes 10-19/1000")), "{}", got.text());
    assert_body(&got.body, &pattern(10, 10));
    assert_eq!(got.header("content-type"), Some("video/mp4"), "typed from the upstream URL");
    let got = get(p.addr(), "HEAD", &video, &[]).await;
    assert_eq!((got.status, got.header("content-length")), (200, Some("1000")));

    let got = get(p.addr(), "GET", &anibridge(&o.url("/v/index.m3u8")), &[]).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("content-type"), Some("application/vnd.apple.mpegurl"));
    let child = got.text().lines().find(|l| !l.starts_with('#')).unwrap().to_string();
    assert!(child.starts_with("/strm/proxy/seg0.ts?"), "{child}");
    let seg = get(p.addr(), "GET", &child, &[]).await;
    assert_eq!(seg.status, 200);
    assert_body(&seg.body, &pattern(0, 5000));

    let tampered = video.replace("sig=", "sig=0");
    assert_eq!(get(p.addr(), "GET", &tampered, &[]).await.status, 401);
    assert_eq!(get(p.addr(), "GET", &video.replace("/strm/proxy?", "/strm/proxyx?"), &[]).await.status, 404);
    assert_eq!(o.count("/ep%201.mp4"), 2, "the range and the HEAD, nothing for the refused two");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_mode_failures_are_401_with_a_reason() {
    let o = origin().await;
    let p = Proxy::token().await;
    let u = o.url("/v.mp4");
    let ok = get(p.addr(), "GET", &signed_relay_path("v.mp4", &u, Some(now() + 60)), &[]).await;
    assert_eq!(ok.status, 200);
    // Another URL, so the origin sees it whether or not the cache holds the first.
    let ok = get(p.addr(), "GET", &signed_relay_path("v.mp4", &o.url("/v.mp4?again"), None), &[]).await;
    assert_eq!(ok.status, 200, "exp is optional");

    let cases = [
        (relay_path("v.mp4", &u), "missing signature"),
        (format!("{}&sig=", relay_path("v.mp4", &u)), "missing signature"),
        (format!("{}&sig=deadbeef", relay_path("v.mp4", &u)), "invalid signature"),
        (signed_relay_path("v.mp4", &u, Some(now() - 1)), "token expired"),
        (
            signed_relay_path("v.mp4", &u, Some(now() + 60)).replace("v.mp4?u=http", "v.mp4?u=https"),
            "invalid signature",
        ),
    ];
    for (path, reason) in cases {
        let got = get(p.addr(), "GET", &path, &[]).await;
        assert_eq!(got.status, 401, "{path}");
        assert_eq!(got.text(), format!("{reason}\n"), "{path}");
        assert!(!got.text().contains("127.0.0.1"), "no URL in error bodies");
    }
    // A non-numeric exp that is correctly signed.
    let mut q = Query(vec![("u".into(), u.clone()), ("exp".into(), "tomorrow".into())]);
    let s = sign(SECRET.as_bytes(), &q);
    q.0.push(("sig".into(), s));
    let got = get(p.addr(), "GET", &format!("/strm/proxy/v.mp4?{}", q.encode()), &[]).await;
    assert_eq!(got.status, 401);
    assert_eq!(got.text(), "invalid token expiry\n");
    // Nothing reached the origin but the two good requests.
    assert_eq!(o.requests().len(), 2);
}

/// A URL that passed is remembered by its bytes (a player repeats it for
/// every range): a changed byte is checked in full, and so is the same URL
/// once its `exp` has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_that_passed_is_refused_once_changed_or_expired() {
    let o = origin().await;
    let p = Proxy::token().await;
    let exp = now() + 2;
    let path = signed_relay_path("v.mp4", &o.url("/v.mp4"), Some(exp));
    let first = get(p.addr(), "GET", &path, &[]).await;
    assert_eq!(first.status, 200);
    for range in ["bytes=0-9", "bytes=10-19"] {
        let got = get(p.addr(), "GET", &path, &[("Range", range)]).await;
        assert_eq!(got.status, 206, "{range}");
    }
    // The signature's last hex digit changed, and a parameter added.
    let flipped = if path.ends_with('0') { '1' } else { '0' };
    for changed in [format!("{}{flipped}", &path[..path.len() - 1]), format!("{path}&x=1")] {
        let got = get(p.addr(), "GET", &changed, &[]).await;
        assert_eq!((got.status, got.text()), (401, "invalid signature\n".to_string()), "{changed}");
    }
    while now() <= exp {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let got = get(p.addr(), "GET", &path, &[]).await;
    assert_eq!((got.status, got.text()), (401, "token expired\n".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apikey_mode_accepts_query_and_header() {
    let o = origin().await;
    let p = Proxy::start("auth: {mode: apikey, api_key: \"k-123\"}\negress: {allow_cidrs: [\"127.0.0.0/8\"]}\n").await;
    let base = relay_path("v.mp4", &o.url("/v.mp4"));
    assert_eq!(get(p.addr(), "GET", &format!("{base}&apikey=k-123"), &[]).await.status, 200);
    assert_eq!(get(p.addr(), "GET", &format!("{base}&api_key=k-123"), &[]).await.status, 200);
    assert_eq!(get(p.addr(), "GET", &base, &[("X-Api-Key", "k-123")]).await.status, 200);
    for (path, hdr) in [(format!("{base}&apikey=k-12"), None), (base.clone(), None), (base.clone(), Some("nope"))] {
        let h: Vec<(&str, &str)> = hdr.map(|v| vec![("X-Api-Key", v)]).unwrap_or_default();
        let got = get(p.addr(), "GET", &path, &h).await;
        assert_eq!(got.status, 401);
        assert_eq!(got.text(), "invalid api key\n");
    }
    // The key never goes upstream.
    for r in o.requests() {
        assert!(!r.target.contains("k-123") && r.header("x-api-key").is_none());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_queries_get_a_clear_400() {
    let o = origin().await;
    let p = Proxy::open().await;
    let cases = [
        ("/strm/proxy/x", "missing parameter u"),
        ("/strm/proxy/x?u=", "missing parameter u"),
        ("/strm/proxy/x?u=not%20a%20url", "invalid parameter u"),
        ("/strm/proxy/x?u=http%3A%2F%2F127.0.0.1%2Fa%0D%0AX-Injected%3A%201", "invalid parameter u"),
        ("/strm/proxy/x?u=http%3A%2F%2F127.0.0.1%2Fa%09b", "invalid parameter u"),
        ("/strm/proxy/x?u=http%3A%2F%2F127.0.0.1%2Fa%00b", "invalid parameter u"),
        ("/strm/proxy/x?u=http%3A%2F%2F127.0.0.1%2Fa%7Fb", "invalid parameter u"),
        ("/strm/proxy/x?u=ftp%3A%2F%2F127.0.0.1%2Ff", "unsupported scheme"),
        ("/strm/proxy/x?u=file%3A%2F%2F%2Fetc%2Fpasswd", "unsupported scheme"),
        ("/strm/proxy/x?u=javascript%3Aalert(1)", "unsupported scheme"),
    ];
    for (path, reason) in cases {
        let got = get(p.addr(), "GET", path, &[]).await;
        assert_eq!(got.status, 400, "{path}");
        assert_eq!(got.text(), format!("{reason}\n"), "{path}");
    }
    assert!(o.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_bind_the_signature_to_the_path_and_strip_credentials() {
    let o = origin().await;
    let yaml = format!(
        "auth: {{mode: token}}\nroutes:\n  - {{prefix: \"/cdn/\", upstream: \"{}\"}}\n  - {{prefix: \"/open/\", upstream: \"{}\", auth: false}}\n",
        o.url("/base/"),
        o.url("/pub")
    );
    let p = Proxy::start(&yaml).await;
    let signed = signed_route_path;
    // A routed request: private upstream allowed (trusted), query forwarded
    // minus credentials, path appended to the base.
    let target = signed("/cdn/show/ep%201.mp4", &[("quality", "hd"), ("exp", &(now() + 60).to_string())]);
    let got = get(p.addr(), "GET", &target, &[("Range", "bytes=0-9")]).await;
    assert_eq!(got.status, 206, "{}", got.text());
    let seen = o.requests().pop().unwrap();
    assert_eq!(seen.target, "/base/show/ep%201.mp4?quality=hd");

    // The same signature does not unlock another file.
    let other = target.replace("ep%201.mp4", "ep%202.mp4");
    assert_eq!(get(p.addr(), "GET", &other, &[]).await.status, 401);
    // A client-sent _path is refused.
    let forged = signed("/cdn/a.mp4", &[("_path", "/cdn/b.mp4")]);
    let got = get(p.addr(), "GET", &forged, &[]).await;
    assert_eq!(got.status, 400);
    assert_eq!(got.text(), "reserved parameter _path\n");
    // Unsigned is refused; an open route needs nothing.
    assert_eq!(get(p.addr(), "GET", "/cdn/a.mp4", &[]).await.status, 401);
    let got = get(p.addr(), "GET", "/open/a.mp4?x=1&sig=zz", &[]).await;
    assert_eq!(got.status, 200);
    assert_eq!(o.requests().pop().unwrap().target, "/pub/a.mp4?x=1");
    // `..` cannot climb out of the route's base.
    let got = get(p.addr(), "GET", "/open/../../secret", &[]).await;
    assert!(matches!(got.status, 400 | 404), "{}", got.status);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflight_and_response_headers() {
    let o = origin().await;
    let p = Proxy::open().await;
    let path = relay_path("v.mp4", &o.url("/cors.mp4"));
    let pre = get(
        p.addr(),
        "OPTIONS",
        &path,
        &[
            ("Origin", "https://app.example"),
            ("Access-Control-Request-Method", "GET"),
            ("Access-Control-Request-Headers", "range"),
        ],
    )
    .await;
    assert_eq!(pre.status, 204);
    assert_eq!(pre.header("access-control-allow-origin"), Some("*"));
    assert_eq!(pre.header("access-control-allow-methods"), Some("GET, HEAD, OPTIONS"));
    let allowed = pre.header("access-control-allow-headers").unwrap().to_ascii_lowercase();
    for h in ["range", "if-range", "if-none-match", "if-modified-since", "x-api-key"] {
        assert!(allowed.contains(h), "{h} not in {allowed}");
    }
    assert!(pre.has("access-control-max-age"));
    assert!(o.requests().is_empty(), "preflight never goes upstream");

    let got = get(p.addr(), "GET", &path, &[("Origin", "https://app.example")]).await;
    assert_eq!(got.status, 200);
    let acao: Vec<_> = got.headers.iter().filter(|(k, _)| k == "access-control-allow-origin").collect();
    assert_eq!(acao.len(), 1, "exactly one ACAO: {:?}", got.headers);
    assert_eq!(acao[0].1, "*");
    assert_eq!(got.header("access-control-expose-headers"), Some("Content-Length, Content-Range, Accept-Ranges, ETag"));
    // `*` is the same answer for every origin: nothing to vary on.
    assert_eq!(got.header("vary"), None);
    let no_origin = get(p.addr(), "GET", &path, &[]).await;
    assert!(!no_origin.has("access-control-allow-origin"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_with_an_origin_list_echoes_and_varies() {
    let o = origin().await;
    let p = Proxy::start("auth: {mode: token}\negress: {allow_cidrs: [\"127.0.0.0/8\"]}\ncors: {allow_origins: [\"https://app.example\"]}\n").await;
    let path = signed_relay_path("v.mp4", &o.url("/cors.mp4"), None);
    // Preflight needs no credentials.
    let pre = get(p.addr(), "OPTIONS", "/strm/proxy/v.mp4?u=x", &[("Origin", "https://app.example")]).await;
    assert_eq!(pre.status, 204);
    assert_eq!(pre.header("access-control-allow-origin"), Some("https://app.example"));
    assert_eq!(pre.header("vary"), Some("Origin"));
    // Spelled as browsers and nginx's add_header write them.
    for name in
        ["Access-Control-Allow-Origin", "Vary", "Access-Control-Allow-Methods", "Access-Control-Max-Age", "Allow"]
    {
        assert!(pre.spelled.iter().any(|s| s == name), "{name}: {:?}", pre.spelled);
    }
    let got = get(p.addr(), "GET", &path, &[("Origin", "https://app.example")]).await;
    assert_eq!(got.header("access-control-allow-origin"), Some("https://app.example"));
    assert_eq!(got.header("vary"), Some("Origin"));
    for name in ["Access-Control-Allow-Origin", "Access-Control-Expose-Headers", "Vary"] {
        assert!(got.spelled.iter().any(|s| s == name), "{name}: {:?}", got.spelled);
    }
    // The answer depends on the Origin, so even one without CORS headers
    // says so: a browser's cache must not hand it to a CORS request.
    for origin in [Some("https://evil.example"), None] {
        let headers: Vec<(&str, &str)> = origin.map(|o| ("Origin", o)).into_iter().collect();
        let got = get(p.addr(), "GET", &path, &headers).await;
        assert!(!got.has("access-control-allow-origin"), "{origin:?}");
        assert_eq!(got.header("vary"), Some("Origin"), "{origin:?}");
    }
    // Errors are readable by the allowed origin too.
    let got = get(p.addr(), "GET", "/strm/proxy/v.mp4?u=x", &[("Origin", "https://app.example")]).await;
    assert_eq!(got.status, 401);
    assert_eq!(got.header("access-control-allow-origin"), Some("https://app.example"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_disabled_means_no_headers_and_options_405() {
    let o = origin().await;
    let p = Proxy::open_with("cors: {allow_origins: []}\n").await;
    let path = relay_path("v.mp4", &o.url("/cors.mp4"));
    let pre = get(p.addr(), "OPTIONS", &path, &[("Origin", "https://app.example")]).await;
    assert_eq!(pre.status, 405);
    assert_eq!(pre.header("allow"), Some("GET, HEAD, OPTIONS"));
    assert!(!pre.has("access-control-allow-origin"));
    let got = get(p.addr(), "GET", &path, &[("Origin", "https://app.example")]).await;
    assert_eq!(got.status, 200);
    assert!(got.headers.iter().all(|(k, _)| !k.starts_with("access-control-")), "{:?}", got.headers);
}

/// An open route exposes its base path and nothing else on its upstream,
/// also to paths that climb out only once decoded: a real nginx decodes
/// `%2F` before it resolves `..`, so it would serve `/pub/..%2Fsecret.txt`
/// as `/secret.txt`. Such a request is refused before it goes upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_route_never_reaches_outside_its_base_on_a_real_nginx() {
    if tools::needs("nginx", "apt-get install nginx-light").is_none() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("secret.txt"), "secret\n").unwrap();
    std::fs::create_dir_all(root.path().join("pub/dir")).unwrap();
    std::fs::write(root.path().join("pub/a..b.txt"), "public\n").unwrap();
    std::fs::write(root.path().join("pub/dir/c.txt"), "public too\n").unwrap();
    std::fs::write(root.path().join("pub/page.html"), "<script>1</script>\n").unwrap();
    let (nginx, addr) = nginx_hoster(root.path(), "text/plain txt; text/html html;", "$request_uri $status", "").await;
    // What the route must keep its clients from: nginx itself climbs out.
    let mut direct = Client::connect(addr).await;
    let climbed = direct.request("GET", "/pub/..%2Fsecret.txt", &[]).await;
    assert_eq!((climbed.status, climbed.text()), (200, "secret\n".to_string()), "nginx decodes %2F first");

    let p = Proxy::start(&format!(
        "auth: {{mode: none}}\nroutes: [{{prefix: \"/open/\", upstream: \"http://{addr}/pub/\", auth: false}}]\n"
    ))
    .await;
    for climbing in [
        "/open/..%2Fsecret.txt",
        "/open/..%2fsecret.txt",
        "/open/%2E%2E%2Fsecret.txt",
        "/open/dir/..%2F..%2Fsecret.txt",
        "/open/dir%2F..%2F..%2Fsecret.txt",
    ] {
        let got = get(p.addr(), "GET", climbing, &[]).await;
        assert_eq!(got.status, 400, "{climbing}: {}", got.text());
        assert!(!got.text().contains("secret"), "{climbing}");
    }
    // What is under the base still goes, `..` inside a name and an encoded
    // `/` between names included.
    for (path, body) in [("/open/a..b.txt", "public\n"), ("/open/dir%2Fc.txt", "public too\n")] {
        let got = get(p.addr(), "GET", path, &[]).await;
        assert_eq!((got.status, got.text()), (200, body.to_string()), "{path}");
    }
    // The operator's own pages run as they are (the relay sandboxes a hoster's).
    let page = get(p.addr(), "GET", "/open/page.html", &[]).await;
    assert_eq!((page.status, page.header("content-security-policy")), (200, None));
    let log = nginx.read_when("access.log", |l| l.lines().count() >= 4).await;
    let seen: Vec<&str> = log.lines().collect();
    assert_eq!(
        seen,
        ["/pub/..%2Fsecret.txt 200", "/pub/a..b.txt 200", "/pub/dir%2Fc.txt 200", "/pub/page.html 200"],
        "nothing else reached nginx"
    );
}
