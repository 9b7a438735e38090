//! DESIGN.md "Response semantics", row by row, through the real proxy
//! against a real local origin.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;

const MB: u64 = 1024 * 1024;

/// A hoster's page with a script in it.
const PAGE: &[u8] = b"<!doctype html><script>localStorage.clear()</script>";

/// An origin with the usual endpoints.
async fn origin() -> Origin {
    Origin::start(|req| {
        let p = req.path();
        match p {
            "/big.mp4" => serve_file(req, 5 * MB + 123, Some("video/mp4")).into(),
            "/small.mp4" => serve_file(req, 1000, Some("video/mp4")).into(),
            "/nohead.mp4" | "/nohead501.mp4" if req.method == "HEAD" => {
                Resp::new(if p == "/nohead.mp4" { 405 } else { 501 }, Body::Bytes(b"no HEAD here".to_vec())).into()
            }
            "/nohead.mp4" | "/nohead501.mp4" => serve_file(req, 777_777, Some("video/mp4")).into(),
            // Refuses HEAD and ignores Range: the fallback GET gets the whole
            // (here: endless) body, of which it sends 10 KB and then waits.
            "/nohead-norange.mp4" if req.method == "HEAD" => {
                Resp::new(405, Body::Empty { content_length: Some(0) }).into()
            }
            "/nohead-norange.mp4" => Resp::new(200, Body::Stall { declared: 500 * MB, sent: pattern(0, 10_000) })
                .header("Content-Type", "video/mp4")
                .header("Accept-Ranges", "none")
                .into(),
            "/notype.mkv" | "/get" | "/dir.v2/get" => serve_file(req, 100, None).into(),
            "/emptytype.mkv" => serve_file(req, 100, Some("")).into(),
            "/page" | "/missing-page" => Resp::new(if p == "/page" { 200 } else { 404 }, Body::Bytes(PAGE.to_vec()))
                .header("Content-Type", "text/html; charset=utf-8")
                .into(),
            "/meta" => Resp::new(200, Body::Bytes(b"meta".to_vec()))
                .header("Content-Type", "video/webm")
                .header("Content-Disposition", "attachment; filename=\"ep 1.webm\"")
                .header("Expires", "Wed, 21 Oct 2026 07:28:00 GMT")
                .header("Cache-Control", "max-age=3600")
                .header("ETag", "W/\"meta\"")
                .header("Last-Modified", "Tue, 01 Jul 2025 10:00:00 GMT")
                .header("Vary", "Accept-Encoding")
                .header("Content-Encoding", "identity")
                .header("Accept-Ranges", "bytes")
                .into(),
            "/hop" => Resp::new(200, Body::Bytes(b"hop".to_vec()))
                .header("Connection", "X-Custom-Hop")
                .header("X-Custom-Hop", "secret")
                .header("Keep-Alive", "timeout=5")
                .header("Proxy-Connection", "keep-alive")
                .header("Upgrade", "h2c")
                .header("Trailer", "X-Checksum")
                .header("TE", "trailers")
                .header("Proxy-Authenticate", "Basic")
                .header("Proxy-Authorization", "Basic Zm9v")
                .header("Access-Control-Allow-Origin", "https://hoster.example")
                .header("Set-Cookie", "tracker=1")
                .header("X-Kept", "yes")
                .into(),
            "/chunked" => {
                Resp::new(200, Body::Chunked(pattern(0, 300_000))).header("Content-Type", "video/mp2t").into()
            }
            "/close" => {
                Resp::new(200, Body::UntilClose(pattern(0, 200_000))).header("Content-Type", "video/mp2t").into()
            }
            "/die" => Resp::new(200, Body::DieAfter { declared: 1_000_000, sent: pattern(0, 100_000) })
                .header("Content-Type", "video/mp4")
                .into(),
            "/chunkdie" => {
                Resp::new(200, Body::ChunkedDie(pattern(0, 50_000))).header("Content-Type", "video/mp4").into()
            }
            "/stall" => Resp::new(200, Body::Stall { declared: 1_000_000, sent: pattern(0, 10_000) })
                .header("Content-Type", "video/mp4")
                .into(),
            "/hang" => Action::Hang,
            p if p.starts_with("/Folge%201") => serve_file(req, 1000, Some("video/mp4")).into(),
            "/garbage" => Action::Raw(b"HTTP/1.1 abc\r\n\r\n".to_vec()),
            "/tiny-chunks" => {
                let mut raw =
                    b"HTTP/1.1 200 OK\r\nContent-Type: video/mp2t\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
                for b in pattern(0, 20_000) {
                    raw.extend_from_slice(b"1\r\n");
                    raw.push(b);
                    raw.extend_from_slice(b"\r\n");
                }
                raw.extend_from_slice(b"0\r\n\r\n");
                Action::Raw(raw)
            }
            // A header line every 100 ms for 20 s, each well within the read timeout.
            "/trickle" => {
                let lines = std::iter::once(b"HTTP/1.1 200 OK\r\n".to_vec());
                Action::Trickle(lines.chain((0..200).map(|i| format!("X-{i}: y\r\n").into_bytes())).collect(), TRICKLE)
            }
            // Interim answers without end, each well within the read timeout.
            "/interim-forever" => {
                Action::Trickle(vec![b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n".to_vec(); 200], TRICKLE)
            }
            "/nocontent" => Resp::new(204, Body::Empty { content_length: None }).into(),
            "/notmodified" => Resp::new(304, Body::Empty { content_length: None }).header("ETag", "\"v1\"").into(),
            _ => {
                if let Some(code) = p.strip_prefix("/status/") {
                    let code: u16 = code.parse().unwrap();
                    Resp::new(code, Body::Bytes(format!("origin says {code}").into_bytes()))
                        .header("Content-Type", "text/plain")
                        .into()
                } else {
                    Resp::new(404, Body::Bytes(b"nope".to_vec())).into()
                }
            }
        }
    })
    .await
}

async fn setup() -> (Origin, Proxy) {
    (origin().await, Proxy::open().await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_is_forwarded_byte_for_byte_and_206_passed_through() {
    let (o, p) = setup().await;
    let got = get(p.addr(), "GET", &relay_path("v.mp4", &o.url("/big.mp4")), &[("Range", "bytes=100-199")]).await;
    assert_eq!(got.status, 206);
    assert_eq!(got.header("content-range"), Some(&*format!("bytes 100-199/{}", 5 * MB + 123)));
    assert_eq!(got.header("content-length"), Some("100"));
    assert_body(&got.body, &pattern(100, 100));
    assert!(got.complete);
    let seen = o.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].header("range"), Some("bytes=100-199"));
}

/// A request id names the request's access line. These tests run without
/// an access log, so a new id would name nothing: only a client's own comes
/// back (with the log on, tests/binary.rs sees new ones made).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_come_back_where_they_name_something() {
    let (o, p) = setup().await;
    let path = relay_path("v.mp4", &o.url("/small.mp4"));
    let own = get(p.addr(), "GET", &path, &[("X-Request-Id", "player-7")]).await;
    assert_eq!((own.status, own.header("x-request-id")), (200, Some("player-7")));
    let none = get(p.addr(), "GET", &path, &[]).await;
    assert_eq!((none.status, none.header("x-request-id")), (200, None));
    assert_body(&none.body, &pattern(0, 1000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_range_is_never_added_and_full_body_is_exact() {
    let (o, p) = setup().await;
    let got = get(p.addr(), "GET", &relay_path("v.mp4", &o.url("/big.mp4")), &[]).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("content-length"), Some(&*(5 * MB + 123).to_string()));
    assert!(got.complete);
    assert_eq!(sha(&got.body), sha(&pattern(0, 5 * MB + 123)));
    assert_eq!(o.requests()[0].header("range"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_ranges_are_forwarded_as_is_and_upstream_decides() {
    let (o, p) = setup().await;
    for (i, range) in ["bytes=abc", "bytes=0-0,5-9", "bytes=-0", "  bytes=1-2 "].into_iter().enumerate() {
        // A URL each: a whole answer to one would be stored and answer the next.
        let url = o.url(&format!("/small.mp4?odd={i}"));
        let got = get(p.addr(), "GET", &relay_path("v.mp4", &url), &[("Range", range)]).await;
        // The origin ignores what it cannot parse: 200, whole body.
        assert!(matches!(got.status, 200 | 206), "{range}: {}", got.status);
        let seen = o.requests();
        assert_eq!(seen.last().unwrap().header("range"), Some(range.trim()), "{range}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsatisfiable_range_gives_416_with_content_range() {
    let (o, p) = setup().await;
    let got = get(p.addr(), "GET", &relay_path("v.mp4", &o.url("/small.mp4")), &[("Range", "bytes=5000-")]).await;
    assert_eq!(got.status, 416);
    assert_eq!(got.header("content-range"), Some("bytes */1000"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caching_and_length_headers_are_preserved() {
    let (o, p) = setup().await;
    let got = get(p.addr(), "GET", &relay_path("x", &o.url("/meta")), &[]).await;
    assert_eq!(got.status, 200);
    for (k, v) in [
        ("content-type", "video/webm"),
        ("content-length", "4"),
        ("content-disposition", "attachment; filename=\"ep 1.webm\""),
        ("expires", "Wed, 21 Oct 2026 07:28:00 GMT"),
        ("cache-control", "max-age=3600"),
        ("etag", "W/\"meta\""),
        ("last-modified", "Tue, 01 Jul 2025 10:00:00 GMT"),
        ("vary", "Accept-Encoding"),
        ("content-encoding", "identity"),
        ("accept-ranges", "bytes"),
    ] {
        assert_eq!(got.header(k), Some(v), "{k}");
    }
    assert_eq!(got.body, b"meta");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_response_headers_are_dropped() {
    let (o, p) = setup().await;
    let got = get(p.addr(), "GET", &relay_path("x", &o.url("/hop")), &[]).await;
    assert_eq!(got.status, 200);
    for h in [
        "x-custom-hop",
        "keep-alive",
        "proxy-connection",
        "upgrade",
        "trailer",
        "te",
        "proxy-authenticate",
        "proxy-authorization",
        "set-cookie",
        "transfer-encoding",
    ] {
        assert!(!got.has(h), "{h} leaked: {:?}", got.headers);
    }
    // The proxy's own Connection header is about the client hop only.
    assert!(got.header("connection").is_none_or(|c| !c.contains("X-Custom")));
    assert_eq!(got.header("x-kept"), Some("yes"));
    assert_eq!(got.body, b"hop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_sees_exactly_the_allowed_request_headers() {
    let (o, p) = setup().await;
    let got = get(
        p.addr(),
        "GET",
        &relay_path("v.mp4", &o.url("/small.mp4")),
        &[
            ("Range", "bytes=0-9"),
            ("If-Range", "\"v1\""),
            ("If-None-Match", "\"v0\""),
            ("If-Modified-Since", "Tue, 01 Jul 2025 10:00:00 GMT"),
            ("Accept", "video/*"),
            ("Accept-Encoding", "gzip, br"),
            ("User-Agent", "mpv 0.38"),
            ("Cookie", "session=abc"),
            ("Authorization", "Bearer t"),
            ("X-Forwarded-For", "203.0.113.7"),
            ("X-Real-IP", "203.0.113.7"),
            ("Via", "1.1 edge"),
            ("Referer", "https://jellyfin.local/"),
            ("Connection", "keep-alive, X-Nominated"),
            ("X-Nominated", "1"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Proxy-Authorization", "Basic x"),
            ("X-Api-Key", "k"),
        ],
    )
    .await;
    assert_eq!(got.status, 206);
    let seen = &o.requests()[0];
    let names: Vec<&str> = seen.headers.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        vec![
            "host",
            "range",
            "if-range",
            "if-none-match",
            "if-modified-since",
            "accept",
            "accept-encoding",
            "user-agent"
        ]
    );
    // Spelled the way browsers, curl and nginx send them, not in Pingora's lower case.
    assert_eq!(
        seen.spelled,
        vec![
            "Host",
            "Range",
            "If-Range",
            "If-None-Match",
            "If-Modified-Since",
            "Accept",
            "Accept-Encoding",
            "User-Agent"
        ]
    );
    assert_eq!(seen.header("host"), Some(&*o.addr.to_string()));
    assert_eq!(seen.header("accept-encoding"), Some("identity"));
    assert_eq!(seen.header("user-agent"), Some("mpv 0.38"));
    assert_eq!(seen.header("range"), Some("bytes=0-9"));
}

/// A header the client's `Connection` names is hop-by-hop (RFC 9110
/// §7.6.1) even when it is one the proxy forwards: `Connection: Range,
/// User-Agent` makes the request one without a range, sent upstream without
/// either, and answered whole; the same again from memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_the_client_names_in_connection_are_not_forwarded() {
    let (o, p) = setup().await;
    let path = relay_path("v.mp4", &o.url("/small.mp4"));
    let asked = [
        ("Range", "bytes=0-9"),
        ("User-Agent", "mpv 0.38"),
        ("Accept", "video/*"),
        ("Connection", "range, User-Agent"),
    ];
    let got = get(p.addr(), "GET", &path, &asked).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body.len(), 1000);
    let seen = &o.requests()[0];
    let names: Vec<&str> = seen.headers.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, vec!["host", "accept", "accept-encoding"]);
    // A hit: the range is not answered from memory either.
    let cached = Proxy::open_with("cache: {max_bytes: 1048576}\n").await;
    for _ in 0..2 {
        let got = get(cached.addr(), "GET", &path, &asked).await;
        assert_eq!((got.status, got.body.len()), (200, 1000));
    }
    assert_eq!(o.requests().len(), 2, "the second was a hit");
    // Named but absent, or a name the proxy never forwards: nothing else changes.
    let other = relay_path("v.mp4", &o.url("/small.mp4?n=1"));
    let got = get(p.addr(), "GET", &other, &[("Range", "bytes=0-9"), ("Connection", "keep-alive, If-Range")]).await;
    assert_eq!((got.status, got.body.len()), (206, 10));
    assert_eq!(o.requests().last().unwrap().header("range"), Some("bytes=0-9"));
}

/// Credentials written into `u` (`user:password@`) are not turned into an
/// `Authorization` header: upstream credentials come from profiles or the
/// resolver, never from a URL a client may have built.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userinfo_in_u_is_not_sent_upstream() {
    let (o, p) = setup().await;
    let u = o.url("/small.mp4").replacen("http://", "http://viewer:pa%40ss@", 1);
    let got = get(p.addr(), "GET", &relay_path("v.mp4", &u), &[("Range", "bytes=0-9")]).await;
    assert_eq!(got.status, 206);
    let seen = &o.requests()[0];
    assert_eq!(seen.target, "/small.mp4");
    assert!(seen.headers.iter().all(|(k, v)| k != "authorization" && !v.contains("viewer")), "{:?}", seen.headers);
    assert_eq!(seen.header("host"), Some(o.url("/").trim_start_matches("http://").trim_end_matches('/')));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_is_forwarded_as_head() {
    let (o, p) = setup().await;
    let got = get(p.addr(), "HEAD", &relay_path("v.mp4", &o.url("/big.mp4")), &[]).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("content-length"), Some(&*(5 * MB + 123).to_string()));
    assert_eq!(got.header("content-type"), Some("video/mp4"));
    assert_eq!(got.header("etag"), Some("\"v1\""));
    assert!(got.body.is_empty());
    let seen = o.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, "HEAD");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_refused_upstream_falls_back_to_ranged_get() {
    let (o, p) = setup().await;
    for path in ["/nohead.mp4", "/nohead501.mp4"] {
        let mut c = Client::connect(p.addr()).await;
        let got = c.request("HEAD", &relay_path("v.mp4", &o.url(path)), &[]).await;
        assert_eq!(got.status, 200, "{path}");
        assert_eq!(got.header("content-length"), Some("777777"), "{path}");
        assert!(!got.has("content-range"));
        assert_eq!(got.header("etag"), Some("\"v1\""));
        assert_eq!(got.header("content-type"), Some("video/mp4"));
        // The connection stays usable: nothing was left unread.
        let again = c.request("GET", &relay_path("v.mp4", &o.url("/small.mp4")), &[]).await;
        assert_eq!(again.status, 200);
        assert_body(&again.body, &pattern(0, 1000));
    }
    let seen: Vec<_> = o.requests().into_iter().filter(|r| r.path().starts_with("/nohead")).collect();
    assert_eq!(seen.len(), 4);
    assert_eq!(seen[0].method, "HEAD");
    assert_eq!(seen[1].method, "GET");
    assert_eq!(seen[1].header("range"), Some("bytes=0-0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_fallback_to_an_origin_ignoring_range_reads_no_body() {
    let (o, p) = setup().await;
    let mut c = Client::connect(p.addr()).await;
    let got = c.request("HEAD", &relay_path("v.mp4", &o.url("/nohead-norange.mp4")), &[]).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("content-length"), Some(&*(500 * MB).to_string()));
    assert_eq!(got.header("accept-ranges"), Some("none"));
    assert!(got.body.is_empty());
    let seen: Vec<_> = o.requests().into_iter().filter(|r| r.path() == "/nohead-norange.mp4").collect();
    assert_eq!(seen.len(), 2);
    assert_eq!((seen[1].method.as_str(), seen[1].header("range")), ("GET", Some("bytes=0-0")));
    // The 200's body is not read to its end (it never ends): the upstream
    // connection is dropped, and the client's connection serves on.
    assert!(o.all_closed_soon().await, "the fallback GET's connection must be dropped, not drained");
    let again = c.request("GET", &relay_path("v.mp4", &o.url("/small.mp4")), &[]).await;
    assert_eq!(again.status, 200);
    assert_body(&again.body, &pattern(0, 1000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_with_range_falls_back_with_the_clients_range() {
    let (o, p) = setup().await;
    let got = get(p.addr(), "HEAD", &relay_path("v.mp4", &o.url("/nohead.mp4")), &[("Range", "bytes=10-19")]).await;
    assert_eq!(got.status, 206);
    assert_eq!(got.header("content-range"), Some("bytes 10-19/777777"));
    assert_eq!(got.header("content-length"), Some("10"));
    assert!(got.body.is_empty());
    let fallback = o.requests().into_iter().find(|r| r.method == "GET").unwrap();
    assert_eq!(fallback.header("range"), Some("bytes=10-19"));
}

/// Hoster file names have spaces and umlauts: `u=` takes them as a browser
/// would and sends them upstream percent-encoded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn u_with_spaces_and_non_ascii_is_sent_percent_encoded() {
    let (o, p) = setup().await;
    let raw = format!("{}/Folge 1 – Schöne Grüße.mp4?name=ä b", o.url(""));
    let got = get(p.addr(), "GET", &relay_path("ep.mp4", &raw), &[("Range", "bytes=0-9")]).await;
    assert_eq!(got.status, 206, "{}", got.text());
    let target = &o.requests()[0].target;
    assert_eq!(
        target, "/Folge%201%20%E2%80%93%20Sch%C3%B6ne%20Gr%C3%BC%C3%9Fe.mp4?name=%C3%A4%20b",
        "as a browser would send it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_type_from_upstream_path_then_hint_then_octet_stream() {
    let (o, p) = setup().await;
    let got = get(p.addr(), "GET", &relay_path("ep.mp4", &o.url("/notype.mkv")), &[]).await;
    assert_eq!(got.header("content-type"), Some("video/x-matroska"));
    let got = get(p.addr(), "GET", &relay_path("seg-001.ts", &o.url("/get")), &[]).await;
    assert_eq!(got.header("content-type"), Some("video/mp2t"));
    let got = get(p.addr(), "GET", &relay_path("file", &o.url("/dir.v2/get")), &[]).await;
    assert_eq!(got.header("content-type"), Some("application/octet-stream"));
    // An empty type names none: the same guess.
    let got = get(p.addr(), "GET", &relay_path("ep.mp4", &o.url("/emptytype.mkv")), &[]).await;
    assert_eq!(got.headers.iter().filter(|(k, _)| k == "content-type").count(), 1, "{:?}", got.headers);
    assert_eq!(got.header("content-type"), Some("video/x-matroska"));
    // An upstream type is never overridden by the extension.
    let got = get(p.addr(), "GET", &relay_path("ep.mkv", &o.url("/small.mp4")), &[]).await;
    assert_eq!(got.header("content-type"), Some("video/mp4"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_statuses_pass_through_unchanged() {
    let (o, p) = setup().await;
    for code in [403u16, 404, 410, 429, 500, 502, 503] {
        let got = get(p.addr(), "GET", &relay_path("x", &o.url(&format!("/status/{code}"))), &[]).await;
        assert_eq!(got.status, code);
        assert_eq!(got.text(), format!("origin says {code}"));
        assert_eq!(got.header("content-type"), Some("text/plain"));
    }
    let got = get(p.addr(), "GET", &relay_path("x.mp4", &o.url("/nocontent")), &[]).await;
    assert_eq!((got.status, got.header("content-type")), (204, None));
    let got = get(p.addr(), "GET", &relay_path("x", &o.url("/notmodified")), &[("If-None-Match", "\"v1\"")]).await;
    assert_eq!(got.status, 304);
    assert_eq!(got.header("etag"), Some("\"v1\""));
    // The upstream named no type, and a 304 has no content to guess one
    // for: a guessed type would overwrite the one a client's cache holds.
    let got = get(p.addr(), "GET", &relay_path("ep.mp4", &o.url("/notmodified")), &[("If-None-Match", "\"v1\"")]).await;
    assert_eq!((got.status, got.header("content-type")), (304, None), "{:?}", got.headers);
}

/// A page a browser would run scripts in (a hoster's error page, a link
/// that turned into HTML) is relayed byte for byte but sandboxed: opened
/// where the proxy shares an origin with another app, its scripts get none.
/// From memory too; media answers carry no policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_a_browser_would_run_are_sandboxed() {
    let (o, p) = setup().await;
    for (path, method, status) in
        [("/page", "GET", 200), ("/page", "GET", 200), ("/page", "HEAD", 200), ("/missing-page", "GET", 404)]
    {
        let got = get(p.addr(), method, &relay_path("x", &o.url(path)), &[]).await;
        assert_eq!(got.status, status, "{method} {path}");
        assert_eq!(got.header("content-security-policy"), Some("sandbox"), "{method} {path}");
        assert_eq!(got.header("content-type"), Some("text/html; charset=utf-8"));
        assert_eq!(got.body, if method == "HEAD" { &b""[..] } else { PAGE }, "{method} {path}");
    }
    let got = get(p.addr(), "GET", &relay_path("x", &o.url("/small.mp4")), &[]).await;
    assert_eq!((got.status, got.has("content-security-policy")), (200, false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_and_close_delimited_upstreams_are_relayed_complete() {
    let (o, p) = setup().await;
    // 20 000 chunks of one byte each, all there at once: joined on the way
    // out. Pingora flushes each piece of a chunked response as its own
    // chunk, so relayed piece by piece they cost a system call per byte
    // (measured: 2 MB of them took 13.5 s of the proxy's CPU).
    let tiny = relay_path("x.ts", &o.url("/tiny-chunks"));
    let got = get(p.addr(), "GET", &tiny, &[]).await;
    assert!(got.complete);
    assert_body(&got.body, &pattern(0, 20_000));
    assert!(got.chunks < 200, "{} chunks for 20 000 bytes", got.chunks);
    let got = get(p.addr(), "GET", &relay_path("x.ts", &o.url("/chunked")), &[]).await;
    assert_eq!(got.status, 200, "{:?}", got.headers);
    assert_eq!(got.header("transfer-encoding"), Some("chunked"), "{:?}", got.headers);
    assert!(got.complete);
    assert_body(&got.body, &pattern(0, 300_000));
    let got = get(p.addr(), "GET", &relay_path("x.ts", &o.url("/close")), &[]).await;
    assert!(got.complete);
    assert_body(&got.body, &pattern(0, 200_000));
}

/// HTTP/1.0 has no chunked framing, so a body of unknown length reaches an
/// HTTP/1.0 client delimited by the connection's end; the header must then
/// say `Connection: close`, also to a client that asked to keep the
/// connection (RFC 9112 §9.3: persistence needs a self-defined length).
/// A body with a length keeps such a connection open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_1_0_client_is_told_a_body_of_unknown_length_ends_with_the_connection() {
    let (o, p) = setup().await;
    for unknown in ["/chunked", "/close"] {
        let mut c = Client::connect(p.addr()).await;
        let path = relay_path("x.ts", &o.url(unknown));
        c.send_raw(format!("GET {path} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").as_bytes()).await;
        let got = c.read_response(false).await;
        assert_eq!(got.status, 200, "{unknown}: {:?}", got.headers);
        assert_eq!(got.header("connection"), Some("close"), "{unknown}: {:?}", got.headers);
        assert_eq!((got.header("transfer-encoding"), got.header("content-length")), (None, None), "{unknown}");
        let len = if unknown == "/chunked" { 300_000 } else { 200_000 };
        assert_body(&got.body, &pattern(0, len));
    }
    let mut c = Client::connect(p.addr()).await;
    let path = relay_path("v.mp4", &o.url("/big.mp4"));
    for i in 0..2u64 {
        let range = format!("Range: bytes={i}-{i}\r\n");
        c.send_raw(format!("GET {path} HTTP/1.0\r\nConnection: keep-alive\r\n{range}\r\n").as_bytes()).await;
        let got = c.read_response(false).await;
        assert_eq!((got.status, got.header("connection")), (206, Some("keep-alive")), "request {i}");
        assert_body(&got.body, &pattern(i, 1));
    }
}

/// A proxy sends its own HTTP version (RFC 9110 §6.2), whatever the
/// upstream's: an `HTTP/1.0` status line with `Transfer-Encoding` is framing
/// a client must treat as faulty (RFC 9112 §6.1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_1_0_upstream_is_answered_as_http_1_1() {
    let o = Origin::start(|req| {
        let body = pattern(0, 5000);
        let head = match req.path() {
            // Close-delimited: relayed chunked to an HTTP/1.1 client.
            "/old" => "HTTP/1.0 200 OK\r\nContent-Type: video/mp4\r\n\r\n".to_string(),
            _ => "HTTP/1.0 200 OK\r\nContent-Type: video/mp4\r\nContent-Length: 5000\r\n\r\n".to_string(),
        };
        Action::Raw([head.into_bytes(), body].concat())
    })
    .await;
    let p = Proxy::open().await;
    let got = get(p.addr(), "GET", &relay_path("x.mp4", &o.url("/old")), &[]).await;
    assert_eq!((got.version.as_str(), got.status), ("HTTP/1.1", 200), "{:?}", got.headers);
    assert_eq!(got.header("transfer-encoding"), Some("chunked"));
    assert!(got.complete);
    assert_body(&got.body, &pattern(0, 5000));
    // With a length, twice: the second answer may come from the cache.
    for _ in 0..2 {
        let got = get(p.addr(), "GET", &relay_path("x.mp4", &o.url("/sized")), &[("Range", "bytes=10-19")]).await;
        assert_eq!(got.version, "HTTP/1.1", "{:?}", got.headers);
        assert!(got.complete);
        // The origin ignores ranges; memory answers them.
        match got.status {
            200 => assert_body(&got.body, &pattern(0, 5000)),
            206 => assert_body(&got.body, &pattern(10, 10)),
            s => panic!("status {s}"),
        }
    }
}

/// An upstream that repeats its length (two equal fields, or `5000, 5000`):
/// valid framing (RFC 9110 §8.6), sent on as one `Content-Length`, since
/// some clients refuse a repeated one; the object is stored like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_content_length_goes_out_once() {
    let o = Origin::start(|req| {
        let lengths = match req.path() {
            "/twice.mp4" => "Content-Length: 5000\r\nContent-Length: 5000\r\n",
            _ => "Content-Length: 5000, 5000\r\n",
        };
        let head = format!("HTTP/1.1 200 OK\r\nContent-Type: video/mp4\r\n{lengths}\r\n");
        Action::Raw([head.into_bytes(), pattern(0, 5000)].concat())
    })
    .await;
    let p = Proxy::open().await;
    for path in ["/twice.mp4", "/list.mp4"] {
        for range in [None, Some("bytes=10-19")] {
            let headers: Vec<(&str, &str)> = range.map(|r| ("Range", r)).into_iter().collect();
            let got = get(p.addr(), "GET", &relay_path("x.mp4", &o.url(path)), &headers).await;
            let lengths: Vec<&str> =
                got.headers.iter().filter(|(k, _)| k == "content-length").map(|(_, v)| v.as_str()).collect();
            assert!(got.complete, "{path}");
            if range.is_some() && cache_on() {
                // From memory: the length was understood (the origin ignores ranges).
                assert_eq!((got.status, lengths), (206, vec!["10"]), "{path}");
                assert_body(&got.body, &pattern(10, 10));
            } else {
                assert_eq!((got.status, lengths), (200, vec!["5000"]), "{path}");
                assert_body(&got.body, &pattern(0, 5000));
            }
        }
    }
    assert_eq!(o.requests().len(), if cache_on() { 2 } else { 4 }, "each stored at its first fetch");
}

/// A real server that refuses HEAD (nginx told to answer it 405): the HEAD
/// is answered from `GET` + `Range: bytes=0-0` with the headers the GET
/// would have — its length, its type and `Accept-Ranges: bytes` (nginx
/// sends that with a 200, not with the 206 the fallback reads), so players
/// that look at a HEAD before seeking see they can. With the cache on, the
/// next HEAD comes from memory with the same headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_refused_by_real_nginx_gets_the_headers_of_the_get() {
    if tools::needs("nginx", "apt-get install nginx-light").is_none() {
        return;
    }
    let root = pattern_files(&["ep.mp4"], 5000);
    let (nginx, origin) = common::process::nginx_hoster(
        root.path(),
        "video/mp4 mp4;",
        "$request_method $status \"$http_range\"",
        "if ($request_method = HEAD) { return 405; }",
    )
    .await;
    let p = Proxy::open().await;
    let path = relay_path("ep.mp4", &format!("http://{origin}/ep.mp4"));
    let heads = [get(p.addr(), "HEAD", &path, &[]).await, get(p.addr(), "HEAD", &path, &[]).await];
    let get_answer = get(p.addr(), "GET", &path, &[]).await;
    assert_eq!(get_answer.header("accept-ranges"), Some("bytes"), "nginx's 200 says it");
    for head in heads {
        assert_eq!(head.status, 200);
        for name in ["content-length", "content-type", "accept-ranges", "etag", "last-modified"] {
            assert_eq!(head.header(name), get_answer.header(name), "{name}");
        }
        assert!(head.body.is_empty());
    }
    let log = nginx.read("access.log");
    let fallbacks = log.lines().filter(|l| *l == "GET 206 \"bytes=0-0\"").count();
    assert_eq!(fallbacks, if cache_on() { 1 } else { 2 }, "{log}");
}

/// The pause between the lines of a trickling upstream.
const TRICKLE: Duration = Duration::from_millis(100);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_port_is_502_and_hang_is_504() {
    let o = origin().await;
    let p = Proxy::open_with("upstream: {read_timeout: \"500ms\"}\n").await;
    // A port nobody listens on.
    let dead_port = RefusedPort::bind();
    let dead = dead_port.addr();
    let got = get(p.addr(), "GET", &relay_path("x", &format!("http://{dead}/x.mp4")), &[]).await;
    assert_eq!(got.status, 502);
    assert_eq!(got.text(), "upstream unreachable\n");
    let got = get(p.addr(), "GET", &relay_path("x", &o.url("/hang")), &[]).await;
    assert_eq!(got.status, 504);
    assert_eq!(got.text(), "upstream timeout\n");
    let got = get(p.addr(), "GET", &relay_path("x", &o.url("/garbage")), &[]).await;
    assert_eq!(got.status, 502);
    // The read timeout is per read, and so not enough on its own: a header
    // that trickles in, or interim answers without end, must not hold the
    // request for ever (here 20 s).
    let started = std::time::Instant::now();
    let trickle = relay_path("x", &o.url("/trickle"));
    let got = tokio::time::timeout(Duration::from_secs(10), get(p.addr(), "GET", &trickle, &[])).await;
    assert_eq!(got.expect("answered before the header ends").status, 504);
    let interim = relay_path("x", &o.url("/interim-forever"));
    let got = tokio::time::timeout(Duration::from_secs(10), get(p.addr(), "GET", &interim, &[])).await;
    assert_eq!(got.expect("answered before the interim answers end").status, 502);
    assert!(started.elapsed() < Duration::from_secs(20), "{:?}", started.elapsed());
    // Still healthy afterwards.
    let got = get(p.addr(), "GET", &relay_path("x", &o.url("/small.mp4")), &[]).await;
    assert_eq!(got.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_dying_mid_body_aborts_the_client_response() {
    let (o, p) = setup().await;
    let got = get(p.addr(), "GET", &relay_path("x", &o.url("/die")), &[]).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("content-length"), Some("1000000"));
    assert!(!got.complete, "a short body must not look complete");
    assert!(got.body.len() < 1_000_000);
    assert_body(&got.body, &pattern(0, got.body.len() as u64));

    let got = get(p.addr(), "GET", &relay_path("x", &o.url("/chunkdie")), &[]).await;
    assert_eq!(got.status, 200);
    assert!(!got.complete, "chunked stream must not be terminated");
    assert_body(&got.body, &pattern(0, got.body.len() as u64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_body_is_aborted_after_read_timeout() {
    let o = origin().await;
    let p = Proxy::open_with("upstream: {read_timeout: \"300ms\"}\n").await;
    let got =
        tokio::time::timeout(Duration::from_secs(20), get(p.addr(), "GET", &relay_path("x", &o.url("/stall")), &[]))
            .await
            .expect("the proxy gives up on a stalled upstream");
    assert_eq!(got.status, 200);
    assert!(!got.complete);
    assert_body(&got.body, &pattern(0, 10_000));
}

/// `n` sequential requests for bytes 0-9, 10-19, ... of `upstream` on one
/// kept-alive client connection, each answered 206 with exactly those bytes.
async fn ten_byte_ranges_on_one_connection(p: &Proxy, upstream: &str, n: u64) {
    let mut c = Client::connect(p.addr()).await;
    for i in 0..n {
        let range = format!("bytes={}-{}", i * 10, i * 10 + 9);
        let got = c.request("GET", &relay_path("v.mp4", upstream), &[("Range", &range)]).await;
        assert_eq!(got.status, 206);
        assert_body(&got.body, &pattern(i * 10, 10));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_downstream_and_pooled_upstream() {
    let (o, p) = setup().await;
    ten_byte_ranges_on_one_connection(&p, &o.url("/small.mp4"), 5).await;
    // Five sequential requests, one upstream connection.
    assert_eq!(o.connections.load(Ordering::SeqCst), 1);
    let conns: std::collections::HashSet<_> = o.requests().iter().map(|r| r.conn_id).collect();
    assert_eq!(conns.len(), 1);
}

/// The origin answers as if it kept the connection open, then closes it:
/// every request still succeeds, each on a new connection. (That the closed
/// one is skipped rather than tried and retried is `pool.rs`'s unit tests';
/// this fails only if both that check and the retry below are broken.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_closing_kept_alive_connections_costs_the_client_nothing() {
    let o = Origin::start(|_| Action::Raw(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello".to_vec())).await;
    let p = Proxy::open().await;
    let mut c = Client::connect(p.addr()).await;
    for i in 0..3 {
        // A URL each, so each reaches the origin, cache or not.
        let got = c.request("GET", &relay_path("x.bin", &o.url(&format!("/once?{i}"))), &[]).await;
        assert_eq!(got.status, 200);
        assert_eq!(got.body, b"hello");
        // Let the origin's close reach the idle pooled connection.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(o.connections.load(Ordering::SeqCst), 3);
}

/// A pooled connection that the origin drops when the next request arrives
/// (the race an idle timeout produces) is retried once on a new connection;
/// the client never sees the failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connection_dropped_mid_request_is_retried_on_a_new_one() {
    let served = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::<usize, usize>::new()));
    let o = {
        let served = served.clone();
        Origin::start(move |req| {
            let mut served = served.lock().unwrap();
            let n = served.entry(req.conn_id).or_insert(0);
            *n += 1;
            if *n > 1 {
                // Second request on a connection: close without answering.
                Action::Raw(Vec::new())
            } else {
                serve_file(req, 1000, Some("video/mp4")).into()
            }
        })
        .await
    };
    let p = Proxy::open().await;
    ten_byte_ranges_on_one_connection(&p, &o.url("/v.mp4"), 3).await;
    // Requests 2 and 3 each found the pooled connection dropped, then got a
    // new one: 5 requests seen on 3 connections.
    assert_eq!(o.requests().len(), 5);
    assert_eq!(o.connections.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_going_away_drops_the_upstream_connection() {
    let o = Origin::start_with_sndbuf(|req| serve_file(req, 500 * MB, Some("video/mp4")).into(), Some(65536)).await;
    let p = Proxy::open().await;
    let mut c = Client::connect(p.addr()).await;
    c.send_raw(format!("GET {} HTTP/1.1\r\nHost: x\r\n\r\n", relay_path("v.mp4", &o.url("/v.mp4"))).as_bytes()).await;
    // Read a little, then hang up.
    let mut sock = c.into_inner();
    let mut buf = vec![0u8; 256 * 1024];
    use tokio::io::AsyncReadExt;
    let mut got = 0;
    while got < 1_000_000 {
        got += sock.read(&mut buf).await.unwrap();
    }
    assert_eq!(o.open_connections.load(Ordering::SeqCst), 1);
    drop(sock);
    assert!(o.all_closed_soon().await, "the upstream connection must be closed, not drained");
    // Far less than the 500 MiB file was pulled from the origin.
    assert!(o.body_bytes_written.load(Ordering::SeqCst) < 64 * MB);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_and_methods() {
    let (o, p) = setup().await;
    let got = get(p.addr(), "GET", "/nothing/here", &[]).await;
    assert_eq!(got.status, 404);
    let got = get(p.addr(), "POST", &relay_path("x", &o.url("/small.mp4")), &[("Content-Length", "0")]).await;
    assert_eq!(got.status, 405);
    assert_eq!(got.header("allow"), Some("GET, HEAD, OPTIONS"));
    let got = get(p.addr(), "DELETE", &relay_path("x", &o.url("/small.mp4")), &[]).await;
    assert_eq!(got.status, 405);
    // CONNECT (a client that takes the proxy for a forward proxy) is one
    // more method: the same 405 and `Allow`, not Pingora's bare one.
    let mut c = Client::connect(p.addr()).await;
    c.send_raw(format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n", o.addr).as_bytes()).await;
    let got = c.read_response(false).await;
    assert_eq!((got.status, got.header("allow")), (405, Some("GET, HEAD, OPTIONS")), "{:?}", got.headers);
    assert_eq!(got.header("server"), None);
    assert_eq!(got.header("connection"), Some("close"), "what follows a CONNECT may be tunnel bytes");
    assert!(o.requests().is_empty());
}

/// The suite's refused port (tests/common `RefusedPort`) refuses, and no
/// test running beside it can take the port while it is held: `bind` with
/// `SO_REUSEADDR`, as std and tokio listeners do, fails.
#[test]
fn a_refused_port_refuses_and_cannot_be_taken_while_held() {
    let held = RefusedPort::bind();
    let err = std::net::TcpStream::connect(held.addr()).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    let err = std::net::TcpListener::bind(held.addr()).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    let addr = held.addr();
    drop(held);
    std::net::TcpListener::bind(addr).expect("free once released");
}
