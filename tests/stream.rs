//! `/strm/stream`: resolve, cache (single-flight), and refresh-on-failure
//! exactly once.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anibridge_proxy::auth::{sign, Query};
use common::*;

/// A resolver that answers with `answer(call_number, query)`.
async fn resolver(answer: impl Fn(usize, &str) -> Action + Send + Sync + 'static) -> (Origin, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let o = Origin::start(move |req| {
        let n = c.fetch_add(1, Ordering::SeqCst);
        answer(n, req.target.split_once('?').map(|(_, q)| q).unwrap_or(""))
    })
    .await;
    (o, calls)
}

fn json(url: &str, ttl: u64) -> Action {
    let body = format!(r#"{{"url":"{url}","headers":{{"Referer":"https://hoster.example/"}},"ttl_seconds":{ttl}}}"#);
    Resp::new(200, Body::Bytes(body.into_bytes())).header("Content-Type", "application/json").into()
}

async fn media() -> Origin {
    Origin::start(|req| match req.path() {
        "/stale.mp4" => Resp::new(403, Body::Bytes(b"expired link".to_vec())).into(),
        "/gone.mp4" => Resp::new(404, Body::Bytes(b"gone".to_vec())).into(),
        "/busy.mp4" => Resp::new(503, Body::Bytes(b"busy".to_vec())).into(),
        "/hang.mp4" => Action::Hang,
        p if p.starts_with("/status/") => {
            Resp::new(p[8..].parse().unwrap(), Body::Bytes(b"status body".to_vec())).into()
        }
        _ => serve_file(req, 10_000, Some("video/mp4")).into(),
    })
    .await
}

async fn proxy(resolver: &Origin, mode: &str) -> Proxy {
    Proxy::start(&format!(
        "auth: {{mode: {mode}}}\negress: {{allow_cidrs: [\"127.0.0.0/8\"]}}\nresolver: {{url: \"{}\", timeout: \"2s\"}}\n",
        resolver.url("/resolve")
    ))
    .await
}

const EPISODE: &str = "site=aniworld.to&slug=kaguya-sama&s=1&e=3&lang=German+Dub&provider=VOE";

fn signed(query: &str) -> String {
    let mut q = Query::parse(Some(query));
    let s = sign(SECRET.as_bytes(), &q);
    q.0.push(("sig".into(), s));
    format!("/strm/stream?{}", q.encode())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_url_is_refreshed_once_then_served() {
    let m = media().await;
    let (stale, good) = (m.url("/stale.mp4"), m.url("/fresh.mp4"));
    let (r, calls) = resolver(move |n, _| json(if n == 0 { &stale } else { &good }, 300)).await;
    let p = proxy(&r, "token").await;
    let got = get(p.addr(), "GET", &signed(EPISODE), &[("Range", "bytes=0-99")]).await;
    assert_eq!(got.status, 206, "{}", got.text());
    assert_body(&got.body, &pattern(0, 100));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(m.requests().len(), 2, "exactly two upstream attempts");
    // The resolver's headers went upstream; the resolver saw no sig.
    assert!(m.requests().iter().all(|r| r.header("referer") == Some("https://hoster.example/")));
    assert!(
        m.requests().iter().all(|r| r.spelled.iter().any(|n| n == "Referer")),
        "the resolver's spelling goes upstream"
    );
    assert!(r.requests().iter().all(|q| !q.target.contains("sig=")));
    assert!(r.requests()[0].target.contains("slug=kaguya-sama"));
    // The refreshed answer is cached now.
    let got = get(p.addr(), "GET", &signed(EPISODE), &[]).await;
    assert_eq!(got.status, 200);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failure_is_passed_through_after_exactly_two_attempts() {
    let m = media().await;
    let gone = m.url("/gone.mp4");
    let (r, calls) = resolver(move |_, _| json(&gone, 300)).await;
    let p = proxy(&r, "none").await;
    let got = get(p.addr(), "GET", &format!("/strm/stream?{EPISODE}"), &[]).await;
    assert_eq!(got.status, 404);
    assert_eq!(got.text(), "gone");
    assert_eq!(m.requests().len(), 2);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    // 503 is not a stale-URL signal: no refresh.
    let busy = m.url("/busy.mp4");
    let (r, calls) = resolver(move |_, _| json(&busy, 300)).await;
    let p = proxy(&r, "none").await;
    let got = get(p.addr(), "GET", &format!("/strm/stream?{EPISODE}"), &[]).await;
    assert_eq!(got.status, 503);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failure_is_refreshed() {
    let m = media().await;
    let dead_port = RefusedPort::bind();
    let dead = dead_port.addr();
    let good = m.url("/fresh.mp4");
    let (r, calls) =
        resolver(move |n, _| json(&if n == 0 { format!("http://{dead}/x.mp4") } else { good.clone() }, 300)).await;
    let p = proxy(&r, "none").await;
    let got = get(p.addr(), "GET", &format!("/strm/stream?{EPISODE}"), &[]).await;
    assert_eq!(got.status, 200);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_the_stale_statuses_are_refreshed() {
    for (status, refreshed) in
        [(403, true), (404, true), (410, true), (429, true), (451, true), (401, false), (500, false), (503, false)]
    {
        let m = media().await;
        let url = m.url(&format!("/status/{status}"));
        let (r, calls) = resolver(move |_, _| json(&url, 300)).await;
        let p = proxy(&r, "none").await;
        let got = get(p.addr(), "GET", &format!("/strm/stream?{EPISODE}"), &[]).await;
        assert_eq!(got.status, status);
        assert_eq!(got.text(), "status body", "{status} is passed through");
        let attempts = if refreshed { 2 } else { 1 };
        assert_eq!(calls.load(Ordering::SeqCst), attempts, "resolver calls after {status}");
        assert_eq!(m.requests().len(), attempts, "upstream attempts after {status}");
    }
}

/// The resolver's first answer is a link that hangs, the next ones a good
/// link; the proxy gives up on a silent upstream after 1 s.
async fn first_link_hangs() -> (Origin, Origin, Arc<AtomicUsize>, Proxy) {
    let m = media().await;
    let (hang, good) = (m.url("/hang.mp4"), m.url("/fresh.mp4"));
    let (r, calls) = resolver(move |n, _| json(if n == 0 { &hang } else { &good }, 300)).await;
    let p = Proxy::open_with(&format!(
        "upstream: {{read_timeout: \"1s\"}}\nresolver: {{url: \"{}\"}}\n",
        r.url("/resolve")
    ))
    .await;
    (m, r, calls, p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_before_headers_is_refreshed() {
    let (m, _r, calls, p) = first_link_hangs().await;
    let got = get(p.addr(), "GET", &format!("/strm/stream?{EPISODE}"), &[("Range", "bytes=0-9")]).await;
    assert_eq!(got.status, 206);
    assert_body(&got.body, &pattern(0, 10));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let paths: Vec<String> = m.requests().iter().map(|r| r.path().to_string()).collect();
    assert_eq!(paths, ["/hang.mp4", "/fresh.mp4"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_one_resolver_call() {
    let m = media().await;
    let good = m.url("/fresh.mp4");
    let (r, calls) = resolver(move |_, _| match json(&good, 300) {
        Action::Respond(resp) => Action::Delayed(Duration::from_millis(300), resp),
        other => other,
    })
    .await;
    let p = proxy(&r, "none").await;
    let addr = p.addr();
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            tokio::spawn(async move {
                get(addr, "GET", &format!("/strm/stream?{EPISODE}"), &[("Range", "bytes=0-9")]).await
            })
        })
        .collect();
    for t in tasks {
        let got = t.await.unwrap();
        assert_eq!(got.status, 206);
        assert_body(&got.body, &pattern(0, 10));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // exp is not part of the cache key.
    let got = get(addr, "GET", &format!("/strm/stream?{EPISODE}&exp=99999999999"), &[]).await;
    assert_eq!(got.status, 200);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_zero_is_not_cached_and_head_works() {
    let m = Origin::start(|req| {
        if req.method == "HEAD" {
            Resp::new(405, Body::Bytes(Vec::new())).into()
        } else {
            serve_file(req, 4242, Some("video/mp4")).into()
        }
    })
    .await;
    let good = m.url("/v.mp4");
    let (r, calls) = resolver(move |_, _| json(&good, 0)).await;
    let p = proxy(&r, "none").await;
    let got = get(p.addr(), "HEAD", &format!("/strm/stream?{EPISODE}"), &[]).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("content-length"), Some("4242"));
    let got = get(p.addr(), "GET", &format!("/strm/stream?{EPISODE}"), &[]).await;
    assert_eq!(got.status, 200);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolver_failures_are_502() {
    common::logs::capture();
    let dead_port = RefusedPort::bind();
    let dead = dead_port.addr();
    let down =
        Proxy::start(&format!("auth: {{mode: none}}\nresolver: {{url: \"http://{dead}/resolve\", timeout: \"1s\"}}\n"))
            .await;
    let got = get(down.addr(), "GET", &format!("/strm/stream?{EPISODE}"), &[]).await;
    assert_eq!(got.status, 502);
    assert_eq!(got.text(), "resolver unavailable\n");
    for answer in [
        Resp::new(500, Body::Bytes(b"oops".to_vec())),
        Resp::new(200, Body::Bytes(b"{not json".to_vec())),
        Resp::new(200, Body::Bytes(br#"{"url":"ftp://x/y"}"#.to_vec())),
    ] {
        let once = std::sync::Mutex::new(Some(answer));
        let (r, _) =
            resolver(move |_, _| once.lock().unwrap().take().map(Action::Respond).unwrap_or(Action::Hang)).await;
        let p = proxy(&r, "none").await;
        let got = get(p.addr(), "GET", &format!("/strm/stream?{EPISODE}"), &[]).await;
        assert_eq!(got.status, 502);
        assert_eq!(got.text(), "resolver unavailable\n");
    }
    // A resolver that hangs: the resolver timeout answers, and the log
    // names it (not an upstream timeout an operator would raise instead).
    let (r, _) = resolver(|_, _| Action::Hang).await;
    let p = proxy(&r, "none").await;
    let got = get(p.addr(), "GET", &format!("/strm/stream?{EPISODE}"), &[]).await;
    assert_eq!(got.status, 502);
    let said = common::logs::logs();
    for line in [
        "WARN resolver unavailable: no answer within resolver.timeout (2s)".to_string(),
        format!("WARN resolver unavailable: {dead}: connection refused"),
        "WARN resolver unavailable: status 500".to_string(),
        "WARN resolver unavailable: malformed JSON: ".to_string(),
        "WARN resolver unavailable: answer url is not http(s)".to_string(),
    ] {
        assert!(said.contains(&line), "{line:?} not in {said}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_and_auth() {
    let m = media().await;
    let good = m.url("/fresh.mp4");
    let (r, calls) = resolver(move |_, _| json(&good, 300)).await;
    let p = proxy(&r, "token").await;
    let got = get(p.addr(), "GET", &format!("/strm/stream?{EPISODE}"), &[]).await;
    assert_eq!(got.status, 401);
    let got = get(p.addr(), "GET", &signed("site=aniworld.to&s=1"), &[]).await;
    assert_eq!(got.status, 400);
    assert_eq!(got.text(), "missing parameter slug\n");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolved_urls_are_subject_to_egress() {
    let m = media().await;
    let url = m.url("/fresh.mp4");
    let (r, _) = resolver(move |_, _| json(&url, 300)).await;
    // No allow_cidrs: the resolver (operator config) is reachable, the
    // loopback hoster URL it returns is not.
    let p = Proxy::start(&format!("auth: {{mode: none}}\nresolver: {{url: \"{}\"}}\n", r.url("/resolve"))).await;
    let got = get(p.addr(), "GET", &format!("/strm/stream?{EPISODE}"), &[]).await;
    assert_eq!(got.status, 403);
    assert_eq!(m.connections.load(Ordering::SeqCst), 0);
}

/// A HEAD of a playlist the proxy only recognises by its type: the proxy
/// must GET it to know the rewritten length, and that GET carries the
/// resolver's headers like every other request for the resolved URL; it is
/// not a second attempt (no retry counted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_of_a_resolved_playlist_fetches_it_with_the_resolvers_headers_and_no_retry() {
    const LIST: &str = "#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2,\nseg0.ts\n#EXT-X-ENDLIST\n";
    let m = Origin::start(|req| serve_bytes(req, LIST.as_bytes(), Some("application/vnd.apple.mpegurl")).into()).await;
    let list = m.url("/list?id=7");
    let (r, _) = resolver(move |_, _| json(&list, 300)).await;
    let p = proxy(&r, "none").await;
    // The HEAD first: nothing is cached yet.
    let head = get(p.addr(), "HEAD", &format!("/strm/stream?{EPISODE}"), &[]).await;
    let got = get(p.addr(), "GET", &format!("/strm/stream?{EPISODE}"), &[]).await;
    assert_eq!(got.status, 200);
    assert!(got.text().contains("/strm/proxy/seg0.ts?u="), "{}", got.text());
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some(got.body.len().to_string().as_str()), "the rewritten length");
    assert_eq!(head.header("content-type"), Some("application/vnd.apple.mpegurl"));
    let seen = m.requests();
    // With the cache, the GET is answered from the playlist the HEAD fetched.
    let want: &[&str] = if cache_on() { &["HEAD", "GET"] } else { &["HEAD", "GET", "GET"] };
    assert_eq!(seen.iter().map(|r| r.method.as_str()).collect::<Vec<_>>(), want);
    assert!(seen.iter().all(|r| r.header("referer") == Some("https://hoster.example/")), "{seen:?}");
    assert_eq!(p.server.metrics.retries.get(), 0, "fetching the playlist is not a retry");
}

/// The resolver's headers go with the URL it returned, on every hop (its
/// credentials only to that URL's origin: see the last test). A
/// playlist's children are their own `/strm/proxy/` requests (a player may
/// fetch them from any replica, signed URLs carry no headers): each gets
/// the provider profile of its host, which is where an operator puts a
/// `Referer` the hoster's segment servers check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolved_playlists_children_get_their_hosts_profile() {
    const LIST: &str = "#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2,\nseg0.ts\n#EXT-X-ENDLIST\n";
    let m = Origin::start(|req| match req.path() {
        "/list" => serve_bytes(req, LIST.as_bytes(), Some("application/vnd.apple.mpegurl")).into(),
        _ => serve_file(req, 1000, Some("video/mp2t")).into(),
    })
    .await;
    let list = m.url("/list");
    let (r, _) = resolver(move |_, _| json(&list, 300)).await;
    let p = Proxy::open_with(&format!("resolver: {{url: \"{}\"}}\n\
         providers: [{{hosts: [\"127.0.0.1\"], headers: {{Referer: \"https://cdn-referer.example/\", X-Profile: \"1\"}}}}]\n",
        r.url("/resolve")
    ))
    .await;
    let got = get(p.addr(), "GET", &format!("/strm/stream?{EPISODE}"), &[]).await;
    assert_eq!(got.status, 200);
    let child = got.text().lines().find(|l| l.starts_with("/strm/proxy/")).unwrap().to_string();
    let seg = get(p.addr(), "GET", &child, &[]).await;
    assert_eq!((seg.status, seg.body.len()), (200, 1000));
    let seen = m.requests();
    let by_path = |path: &str| seen.iter().find(|r| r.path() == path).unwrap().clone();
    // The playlist: the profile's headers, the resolver's Referer winning.
    let (list, seg) = (by_path("/list"), by_path("/seg0.ts"));
    assert_eq!(list.header("referer"), Some("https://hoster.example/"));
    assert_eq!(list.header("x-profile"), Some("1"));
    // Its child: its host's profile alone.
    assert_eq!(seg.header("referer"), Some("https://cdn-referer.example/"));
    assert_eq!(seg.header("x-profile"), Some("1"));
}

/// A resolver answer may carry the hoster's `Referer`, cookies or `Accept`,
/// but never a request's own `Range` or conditionals, nor another
/// `Accept-Encoding`: such headers in it are left out, so the client's
/// range goes upstream as it sent it (or none), and bodies stay plain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolvers_range_conditionals_and_encoding_are_left_out() {
    let m = media().await;
    let url = m.url("/v.mp4");
    let (r, _) = resolver(move |_, _| {
        let body = format!(
            r#"{{"url":"{url}","headers":{{"Referer":"https://hoster.example/","Range":"bytes=0-0","If-Range":"\"x\"","If-None-Match":"\"x\"","If-Modified-Since":"Thu, 01 Jan 2099 00:00:00 GMT","Accept-Encoding":"gzip"}},"ttl_seconds":300}}"#
        );
        Resp::new(200, Body::Bytes(body.into_bytes())).header("Content-Type", "application/json").into()
    })
    .await;
    // The cache off: both requests reach the origin, which shows what each sent.
    let p = Proxy::open_with(&format!("resolver: {{url: \"{}\"}}\ncache: {{max_bytes: 0}}\n", r.url("/resolve"))).await;
    let got = get(p.addr(), "GET", &format!("/strm/stream?{EPISODE}"), &[]).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_body(&got.body, &pattern(0, 10_000));
    let got = get(p.addr(), "GET", &format!("/strm/stream?{EPISODE}"), &[("Range", "bytes=100-199")]).await;
    assert_eq!(got.status, 206, "{}", got.text());
    assert_body(&got.body, &pattern(100, 100));
    let seen = m.requests();
    assert_eq!(seen.len(), 2);
    for (req, range) in seen.iter().zip([None, Some("bytes=100-199")]) {
        assert_eq!(req.header("range"), range);
        assert_eq!(req.header("accept-encoding"), Some("identity"));
        assert_eq!(req.header("referer"), Some("https://hoster.example/"));
        for name in ["if-range", "if-none-match", "if-modified-since"] {
            assert_eq!(req.header(name), None, "{name}");
        }
    }
}

/// A crowd whose cached link went stale: each viewer that finds the link
/// dead refreshes it only if no one has yet, and otherwise retries with the
/// refreshed answer — it does not throw that away and ask the resolver
/// again (each resolver call is a scrape of the provider's page). Here the
/// dead link hangs, so viewers find out one read timeout after they came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crowd_refreshes_a_stale_link_once() {
    let (m, _r, calls, p) = first_link_hangs().await;
    let addr = p.addr();
    let tasks: Vec<_> = (0..16u64)
        .map(|i| {
            tokio::spawn(async move {
                // Viewers arrive over 300 ms, all well before the first of
                // them finds the link dead (1 s), so each finds it dead too.
                tokio::time::sleep(Duration::from_millis(i * 20)).await;
                get(addr, "GET", &format!("/strm/stream?{EPISODE}"), &[("Range", "bytes=0-9")]).await
            })
        })
        .collect();
    for t in tasks {
        let got = t.await.unwrap();
        assert_eq!(got.status, 206, "{}", got.text());
        assert_body(&got.body, &pattern(0, 10));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2, "one resolve, one refresh");
    // Each viewer: one attempt on the dead link, one on the refreshed one.
    assert_eq!((m.count("/hang.mp4"), m.count("/fresh.mp4")), (16, 16));
}

/// A real expiring link: nginx's `secure_link` (an MD5 of the expiry, the
/// path and a secret; `410` once expired, `403` when tampered with), the
/// way hosters bind links to time. The resolver hands out links that live
/// 2 s but lets the proxy keep them for 10 minutes, so a viewer 3 s later
/// meets an expired link: one `410`, one more resolution, then the file
/// byte for byte, counted in nginx's own log. The file is `no-store`, so
/// the proxy's cache does not answer in the hoster's place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_nginx_secure_link_is_resolved_again() {
    let Some((_root, nginx, port)) =
        secure_link_hoster(300_000, "$uri $status", "add_header Cache-Control no-store;").await
    else {
        return;
    };
    let (r, calls) = resolver(move |_, _| json(&secure_link(&format!("127.0.0.1:{port}"), now() + 2), 600)).await;
    let p = proxy(&r, "token").await;
    let first = get(p.addr(), "GET", &signed(EPISODE), &[]).await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_body(&first.body, &pattern(0, 300_000));
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let later = get(p.addr(), "GET", &signed(EPISODE), &[("Range", "bytes=1000-")]).await;
    assert_eq!(later.status, 206, "{}", later.text());
    assert_body(&later.body, &pattern(1000, 299_000));
    assert_eq!(calls.load(Ordering::SeqCst), 2, "resolved once more");
    let log = nginx.read_when("access.log", |log| log.lines().count() >= 3).await;
    assert_eq!(log.lines().collect::<Vec<_>>(), ["/media/ep3.mp4 200", "/media/ep3.mp4 410", "/media/ep3.mp4 206"]);
}

/// nginx serving `/media/ep3.mp4` (`len` pattern bytes) behind its
/// `secure_link` check, as [`secure_link`] signs for it: `410` once a link
/// is past its time, `403` when it was tampered with. `log` is the format
/// of its `access.log`, `more` more of the `/media/` location. `None`
/// (the test skips) without nginx or openssl.
async fn secure_link_hoster(
    len: u64,
    log: &str,
    more: &str,
) -> Option<(tempfile::TempDir, common::process::Spawned, u16)> {
    if tools::needs("nginx", "apt-get install nginx-light").is_none()
        || tools::needs("openssl", "apt-get install openssl").is_none()
    {
        return None;
    }
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("media")).unwrap();
    std::fs::write(root.path().join("media/ep3.mp4"), pattern(0, len)).unwrap();
    let (nginx, port) = common::process::nginx_on_a_free_port(|port| {
        format!(
            "log_format hoster '{log}';\n\
         types {{ video/mp4 mp4; }}\n\
         server {{ listen 127.0.0.1:{port}; root {root}; access_log {{dir}}/access.log hoster;\n\
           location /media/ {{\n\
             secure_link $arg_md5,$arg_expires;\n\
             secure_link_md5 \"$secure_link_expires$uri s3cret\";\n\
             if ($secure_link = \"\") {{ return 403; }}\n\
             if ($secure_link = \"0\") {{ return 410; }}\n\
             {more}\n\
           }}\n\
         }}\n",
            root = root.path().display()
        )
    })
    .await;
    Some((root, nginx, port))
}

/// A link to `/media/ep3.mp4` at `host` that nginx's `secure_link` (as
/// configured by the tests here) accepts until `expires`: the MD5 of the
/// expiry, the path and the secret, as base64url without padding.
fn secure_link(host: &str, expires: u64) -> String {
    let md5 = std::process::Command::new("sh")
        .args(["-c", "printf %s \"$1\" | openssl md5 -binary | openssl base64 | tr '+/' '-_' | tr -d '=\\n'", "-"])
        .arg(format!("{expires}/media/ep3.mp4 s3cret"))
        .output()
        .unwrap();
    let md5 = String::from_utf8(md5.stdout).unwrap();
    format!("http://{host}/media/ep3.mp4?md5={md5}&expires={expires}")
}

/// The same expiring links, and a body that takes longer than a link
/// lives (one to two seconds): nginx sends it at 200 KB/s and the
/// connection is cut after 700 KB (the suite's cutter: a drop nginx does
/// not make by itself), three and a half seconds in, when the link has
/// expired. The continuation from that link
/// is answered `410`; the request still has its one refresh, so the link
/// is resolved once more and the body continues from the new one (asked
/// with `If-Range`, a `206`): the client gets every byte, and nginx's log
/// shows exactly the cut answer, the `410` and the continuation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secure_link_that_expires_mid_body_is_resolved_again_for_the_rest() {
    const LEN: u64 = 1_000_000;
    let log = "$uri $status $http_range $http_if_range";
    let Some((_root, nginx, port)) = secure_link_hoster(LEN, log, "limit_rate 200k;").await else {
        return;
    };
    let cutter = common::cutter::Cutter::start(([127, 0, 0, 1], port).into(), 700_000).await;
    let host = cutter.addr.to_string();
    let (r, calls) = resolver(move |_, _| json(&secure_link(&host, now() + 1), 600)).await;
    let p = proxy(&r, "token").await;
    cutter.arm(1);
    let got = get(p.addr(), "GET", &signed(EPISODE), &[]).await;
    assert!(got.complete, "cut after {} bytes", got.body.len());
    assert_eq!(got.status, 200);
    assert_body(&got.body, &pattern(0, LEN));
    assert_eq!(calls.load(Ordering::SeqCst), 2, "resolved once more");
    let log = nginx.read_when("access.log", |log| log.lines().count() >= 3).await;
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 3, "{log}");
    assert!(lines[0].starts_with("/media/ep3.mp4 200 - -"), "{log}");
    let rest: Vec<&str> = lines[1].split(' ').collect();
    assert_eq!((rest[1], rest[2].ends_with(&format!("-{}", LEN - 1))), ("410", true), "{log}");
    let more: Vec<&str> = lines[2].split(' ').collect();
    assert_eq!((more[1], more[2], more[3]), ("206", rest[2], rest[3]), "the same rest, the same If-Range: {log}");
    assert_eq!(p.metric("anibridge_resolver_refreshes_total"), 1.0);
}

/// A resolver's `Cookie` and `Authorization` are for the host it named.
/// The hoster redirects to its CDN (another origin): that hop, and the
/// resumption that continues the body there after it dies, carry the
/// resolver's `Referer` but not its credentials, as browsers and curl
/// follow redirects. The hoster itself got all three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolvers_credentials_do_not_follow_a_redirect_to_another_origin() {
    const LEN: u64 = 300_000;
    let served = Arc::new(AtomicUsize::new(0));
    let n = served.clone();
    let cdn = Origin::start(move |req| {
        let mut resp = serve_file(req, LEN, Some("video/mp4"));
        // The first answer dies a third of the way in: the rest is resumed.
        if n.fetch_add(1, Ordering::SeqCst) == 0 {
            if let Body::Pattern { start, len } = resp.body {
                resp.body = Body::DieAfter { declared: len, sent: pattern(start, 100_000) };
            }
        }
        resp.into()
    })
    .await;
    let to = cdn.url("/v.mp4");
    let hoster = Origin::start(move |_| Resp::new(302, Body::Bytes(Vec::new())).header("Location", &to).into()).await;
    let link = hoster.url("/e/42");
    let (r, _) = resolver(move |_, _| {
        let body = format!(
            r#"{{"url":"{link}","headers":{{"Referer":"https://hoster.example/","Cookie":"session=s3cret","Authorization":"Bearer t0ken"}},"ttl_seconds":300}}"#
        );
        Resp::new(200, Body::Bytes(body.into_bytes())).header("Content-Type", "application/json").into()
    })
    .await;
    let p = proxy(&r, "none").await;
    let got = get(p.addr(), "GET", &format!("/strm/stream?{EPISODE}"), &[]).await;
    assert_eq!(got.status, 200);
    assert_body(&got.body, &pattern(0, LEN));

    let at_hoster = hoster.requests();
    assert_eq!(at_hoster.len(), 1);
    assert_eq!(at_hoster[0].header("cookie"), Some("session=s3cret"));
    assert_eq!(at_hoster[0].header("authorization"), Some("Bearer t0ken"));
    assert_eq!(at_hoster[0].header("referer"), Some("https://hoster.example/"));
    let at_cdn = cdn.requests();
    assert_eq!(at_cdn.len(), 2, "the redirected fetch and its resumption: {at_cdn:?}");
    assert_eq!(at_cdn[1].header("range"), Some("bytes=100000-299999"), "resumed where it died");
    for seen in &at_cdn {
        assert_eq!(seen.header("cookie"), None, "{seen:?}");
        assert_eq!(seen.header("authorization"), None, "{seen:?}");
        assert_eq!(seen.header("referer"), Some("https://hoster.example/"), "{seen:?}");
    }
}

/// A resolved link that expires while its body is relayed: the hoster
/// drops the connection mid-body, and the continuation from that link is
/// refused (`403`: the token expired meanwhile). The request still has its
/// one refresh, so the proxy resolves once more and continues from the new
/// link — the same file, asked with `If-Range` and checked for its length
/// and `ETag` — and the client gets every byte. A request whose first
/// answer was stale has used its refresh: its body is cut instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_that_expires_before_its_body_is_resumed_is_resolved_again() {
    const LEN: u64 = 1_000_000;
    for first_stale in [false, true] {
        let answered = Arc::new(AtomicUsize::new(0));
        let n = answered.clone();
        let m = Origin::start(move |req| match req.path() {
            "/stale.mp4" => Resp::new(403, Body::Bytes(b"expired link".to_vec())).into(),
            "/old.mp4" if n.fetch_add(1, Ordering::SeqCst) == 0 => {
                let mut resp = serve_file(req, LEN, Some("video/mp4"));
                resp.body = Body::DieAfter { declared: LEN, sent: pattern(0, 100_000) };
                resp.into()
            }
            "/old.mp4" => Resp::new(403, Body::Bytes(b"expired link".to_vec())).into(),
            _ => serve_file(req, LEN, Some("video/mp4")).into(),
        })
        .await;
        let links: Vec<String> =
            if first_stale { vec!["/stale.mp4", "/old.mp4", "/new.mp4"] } else { vec!["/old.mp4", "/new.mp4"] }
                .into_iter()
                .map(|l| m.url(l))
                .collect();
        let (r, calls) = resolver(move |n, _| json(&links[n.min(links.len() - 1)], 300)).await;
        let p = proxy(&r, "token").await;
        let got = get(p.addr(), "GET", &signed(EPISODE), &[]).await;
        let asked: Vec<(String, Option<String>, Option<String>)> = m
            .requests()
            .iter()
            .map(|r| {
                (r.path().to_string(), r.header("range").map(str::to_string), r.header("if-range").map(str::to_string))
            })
            .collect();
        if first_stale {
            assert!(!got.complete, "the one refresh was used: cut");
            assert_body(&got.body, &pattern(0, 100_000));
            assert_eq!(calls.load(Ordering::SeqCst), 2, "{asked:?}");
            assert!(asked.iter().all(|a| a.0 != "/new.mp4"), "{asked:?}");
            continue;
        }
        assert!(got.complete, "{asked:?}");
        assert_eq!(got.status, 200);
        assert_body(&got.body, &pattern(0, LEN));
        let rest = Some(format!("bytes=100000-{}", LEN - 1));
        let etag = Some("\"v1\"".to_string());
        assert_eq!(
            asked,
            [
                ("/old.mp4".to_string(), None, None),
                ("/old.mp4".to_string(), rest.clone(), etag.clone()),
                ("/new.mp4".to_string(), rest, etag),
            ]
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(p.metric("anibridge_resolver_refreshes_total"), 1.0);
    }
}
