//! DESIGN "upstream dies or stalls mid-body": the proxy continues the same
//! file from a new connection (`Range: bytes=NEXT-LAST` with `If-Range`)
//! when that is safe, so the client's response is one unbroken, byte-exact
//! body; otherwise the response is aborted, never ended cleanly short and
//! never spliced with bytes of another file.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::cutter::Cutter;
use common::*;

const TOTAL: u64 = 1_000_000;

/// How one response of the flaky origin ends.
#[derive(Clone, Copy, Debug)]
enum Fate {
    /// Sends its body whole.
    Whole,
    /// Closes the connection after this many body bytes.
    DieAfter(u64),
    /// Resets the connection after this many body bytes.
    ResetAfter(u64),
    /// Stops sending after this many body bytes, keeping the connection.
    StallAfter(u64),
}

/// A static file of `TOTAL` pattern bytes (ranges, suffix ranges, ETag,
/// Last-Modified, If-Range, like nginx), whose `n`th response (counting
/// from 0) ends as `fate(n)` says.
async fn flaky(fate: impl Fn(usize) -> Fate + Send + Sync + 'static) -> (Origin, Arc<AtomicUsize>) {
    let n = Arc::new(AtomicUsize::new(0));
    let counter = n.clone();
    let o = Origin::start(move |req| {
        let resp = serve_file(req, TOTAL, Some("video/mp4"));
        let i = counter.fetch_add(1, Ordering::SeqCst);
        cut(resp, fate(i))
    })
    .await;
    (o, n)
}

/// Makes `resp` (a pattern body) end as `fate` says.
fn cut(mut resp: Resp, fate: Fate) -> Action {
    let Body::Pattern { start, len } = resp.body else { return resp.into() };
    resp.body = match fate {
        Fate::Whole => Body::Pattern { start, len },
        Fate::DieAfter(k) => Body::DieAfter { declared: len, sent: pattern(start, k.min(len)) },
        Fate::ResetAfter(k) => Body::ResetAfter { declared: len, sent: pattern(start, k.min(len)) },
        Fate::StallAfter(k) => Body::Stall { declared: len, sent: pattern(start, k.min(len)) },
    };
    resp.into()
}

async fn proxy(extra: &str) -> Proxy {
    Proxy::open_with(extra).await
}

/// The `Range` and `If-Range` of each request the origin saw.
fn asked(o: &Origin) -> Vec<(Option<String>, Option<String>)> {
    o.requests()
        .iter()
        .map(|r| (r.header("range").map(str::to_string), r.header("if-range").map(str::to_string)))
        .collect()
}

/// Resumptions attempted and succeeded, as the metrics count them.
fn resumptions(p: &Proxy) -> (u64, u64) {
    (p.server.metrics.resumes_attempted.get(), p.server.metrics.resumes_succeeded.get())
}

fn some(s: &str) -> Option<String> {
    Some(s.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_whose_upstream_dies_twice_arrives_whole_for_every_kind_of_request() {
    // (client Range, status, first byte, last byte)
    let cases: [(Option<&str>, u16, u64, u64); 4] = [
        (None, 200, 0, TOTAL - 1),
        (Some("bytes=1000-899999"), 206, 1000, 899_999),
        (Some("bytes=5000-"), 206, 5000, TOTAL - 1),
        (Some("bytes=-300000"), 206, TOTAL - 300_000, TOTAL - 1),
    ];
    for (range, status, first, last) in cases {
        // The first two responses die after 100 000 bytes, then the origin is fine.
        let (o, _) = flaky(|n| if n < 2 { Fate::DieAfter(100_000) } else { Fate::Whole }).await;
        let p = proxy("").await;
        let headers: Vec<(&str, &str)> = range.iter().map(|r| ("Range", *r)).collect();
        let got = get(p.addr(), "GET", &relay_path("v.mp4", &o.url("/v.mp4")), &headers).await;
        assert_eq!(got.status, status, "{range:?}");
        assert!(got.complete, "{range:?}: one unbroken body");
        assert_body(&got.body, &pattern(first, last - first + 1));
        let want_cl = (last - first + 1).to_string();
        assert_eq!(got.header("content-length"), Some(want_cl.as_str()));
        assert_eq!(
            asked(&o),
            [
                (range.map(str::to_string), None),
                (some(&format!("bytes={}-{last}", first + 100_000)), some("\"v1\"")),
                (some(&format!("bytes={}-{last}", first + 200_000)), some("\"v1\"")),
            ],
            "{range:?}"
        );
        assert_eq!(resumptions(&p), (2, 2));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_and_a_stall_are_resumed_too() {
    let (o, _) = flaky(|n| if n == 0 { Fate::ResetAfter(64_000) } else { Fate::Whole }).await;
    let p = proxy("").await;
    let got = get(p.addr(), "GET", &relay_path("v.mp4", &o.url("/v.mp4")), &[]).await;
    assert!(got.complete);
    assert_body(&got.body, &pattern(0, TOTAL));
    assert_eq!(o.requests().len(), 2);
    assert!(o.requests()[1].header("range").is_some_and(|r| r.ends_with(&format!("-{}", TOTAL - 1))));

    // A stall: after upstream.read_timeout without a byte.
    let (o, _) = flaky(|n| if n == 0 { Fate::StallAfter(200_000) } else { Fate::Whole }).await;
    let p = proxy("upstream: {read_timeout: \"300ms\"}\n").await;
    let got = get(p.addr(), "GET", &relay_path("v.mp4", &o.url("/v.mp4")), &[("Range", "bytes=100-")]).await;
    assert_eq!(got.status, 206);
    assert!(got.complete);
    assert_body(&got.body, &pattern(100, TOTAL - 100));
    assert_eq!(asked(&o)[1], (some(&format!("bytes=200100-{}", TOTAL - 1)), some("\"v1\"")));
    // The stalled connection was given up before the resumption was sent
    // (a hoster that allows one connection per address sees one).
    assert_eq!(o.requests()[1].in_flight, 1, "the stalled request still open beside the resumption");
}

/// A resumed answer that is not the rest of the same file aborts the
/// client's response at once: its bytes never reach the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_file_is_never_spliced_in() {
    common::logs::capture();
    type Answer = fn(&SeenRequest) -> Resp;
    let answers: [(&str, Answer); 5] = [
        // The file changed and the server honours If-Range: the whole new file.
        ("the upstream sent the whole file (it changed: another validator)", |_| {
            Resp::new(200, Body::Bytes(vec![b'X'; TOTAL as usize])).header("ETag", "\"v2\"")
        }),
        // The same file, whole: a server that ignores Range.
        ("the upstream sent the whole file again (it ignored the Range)", |_| {
            Resp::new(200, Body::Bytes(pattern(0, TOTAL))).header("ETag", "\"v1\"")
        }),
        // A server that ignores If-Range answers the range of the new file.
        ("another ETag", |r| {
            let (s, e) = ranged(r);
            Resp::new(206, Body::Bytes(vec![b'X'; (e - s + 1) as usize]))
                .header("ETag", "\"v2\"")
                .header("Content-Range", &format!("bytes {s}-{e}/{TOTAL}"))
        }),
        ("another complete length", |r| {
            let (s, e) = ranged(r);
            Resp::new(206, Body::Bytes(vec![b'X'; (e - s + 1) as usize]))
                .header("ETag", "\"v1\"")
                .header("Content-Range", &format!("bytes {s}-{e}/{}", TOTAL + 1))
        }),
        ("the rest is not there any more (416)", |_| {
            Resp::new(416, Body::Bytes(Vec::new())).header("Content-Range", "bytes */10")
        }),
    ];
    for (what, answer) in answers {
        let first = Arc::new(AtomicUsize::new(0));
        let o = Origin::start(move |req| {
            if first.fetch_add(1, Ordering::SeqCst) == 0 {
                cut(serve_file(req, TOTAL, Some("video/mp4")), Fate::DieAfter(50_000))
            } else {
                answer(req).into()
            }
        })
        .await;
        let p = proxy("").await;
        let got = get(p.addr(), "GET", &relay_path("v.mp4", &o.url("/v.mp4")), &[]).await;
        assert!(!got.complete, "{what}: never a clean end");
        assert_body(&got.body, &pattern(0, got.body.len() as u64));
        assert_eq!(o.requests().len(), 2, "{what}: one try, then the response is aborted");
        assert_eq!(p.server.metrics.resumes_succeeded.get(), 0, "{what}");
        // The log says why, in words that tell a server ignoring Range
        // from a file that changed.
        let line = format!("WARN not resuming 127.0.0.1: {what}");
        assert!(common::logs::logs().lines().any(|l| l == line), "{line:?} not in {}", common::logs::logs());
    }
}

/// The range a resumption asked for, on a `TOTAL`-byte file.
fn ranged(r: &SeenRequest) -> (u64, u64) {
    let (s, e) = parse_single_range(r.header("range").unwrap(), TOTAL).unwrap();
    (s, e.unwrap_or(TOTAL - 1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_keeps_dying_is_given_up_after_resume_attempts() {
    common::logs::capture();
    let (o, _) = flaky(|_| Fate::DieAfter(10_000)).await;
    let p = proxy("upstream: {resume_attempts: 3}\n").await;
    let got = get(p.addr(), "GET", &relay_path("v.mp4", &o.url("/v.mp4")), &[]).await;
    assert!(!got.complete);
    assert_eq!(got.body.len(), 40_000, "what each of the four responses gave, in order");
    assert_body(&got.body, &pattern(0, 40_000));
    assert_eq!(o.requests().len(), 4, "the first response and three resumptions");
    assert_eq!(resumptions(&p), (3, 3));

    // Answers that are errors, and reconnections that fail, count as attempts.
    let first = Arc::new(AtomicUsize::new(0));
    let o = Origin::start(move |req| {
        if first.fetch_add(1, Ordering::SeqCst) == 0 {
            cut(serve_file(req, TOTAL, Some("video/mp4")), Fate::DieAfter(10_000))
        } else {
            Resp::new(503, Body::Bytes(b"busy".to_vec())).into()
        }
    })
    .await;
    let p = proxy("upstream: {resume_attempts: 2}\n").await;
    let got = get(p.addr(), "GET", &relay_path("v.mp4", &o.url("/v.mp4")), &[]).await;
    assert!(!got.complete);
    assert_body(&got.body, &pattern(0, 10_000));
    assert_eq!(o.requests().len(), 3, "the first response and two tries");
    assert_eq!(resumptions(&p), (2, 0));
    let said = common::logs::logs();
    assert!(said.contains("WARN resuming 127.0.0.1 failed: an error status (503)"), "{said}");

    let (o, _) = flaky(|_| Fate::StallAfter(10_000)).await;
    let p = proxy("upstream: {resume_attempts: 2, read_timeout: \"500ms\"}\n").await;
    let mut c = Client::connect(p.addr()).await;
    c.send_raw(format!("GET {} HTTP/1.1\r\nHost: x\r\n\r\n", relay_path("v.mp4", &o.url("/v.mp4"))).as_bytes()).await;
    while o.requests().is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    o.stop_accepting(); // before the stall is noticed: every reconnection is refused
    let got = c.read_response(false).await;
    assert!(!got.complete);
    assert_body(&got.body, &pattern(0, 10_000));
    assert_eq!(o.requests().len(), 1);
    assert_eq!(resumptions(&p), (2, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_attempts_0_aborts_as_before() {
    let (o, _) = flaky(|n| if n == 0 { Fate::DieAfter(100_000) } else { Fate::Whole }).await;
    let p = proxy("upstream: {resume_attempts: 0}\n").await;
    let got = get(p.addr(), "GET", &relay_path("v.mp4", &o.url("/v.mp4")), &[]).await;
    assert_eq!(got.status, 200);
    assert!(!got.complete, "a short body must not look complete");
    assert_body(&got.body, &pattern(0, 100_000));
    assert_eq!(o.requests().len(), 1);
}

/// Without a validator (nothing proves the file did not change) or without
/// a length, a dead body is not resumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_validator_or_a_length_nothing_is_resumed() {
    let o = Origin::start(|req| match req.path() {
        "/novalidator" => Resp::new(200, Body::DieAfter { declared: TOTAL, sent: pattern(0, 5000) })
            .header("Content-Type", "video/mp4")
            .into(),
        _ => Resp::new(200, Body::ChunkedDie(pattern(0, 5000))).header("ETag", "\"v1\"").into(),
    })
    .await;
    let p = proxy("").await;
    for path in ["/novalidator", "/chunked"] {
        let got = get(p.addr(), "GET", &relay_path("v.mp4", &o.url(path)), &[]).await;
        assert!(!got.complete, "{path}");
        assert_body(&got.body, &pattern(0, 5000));
        assert_eq!(o.count(path), 1, "{path}");
    }
    assert_eq!(p.server.metrics.resumes_attempted.get(), 0);
}

/// A playlist whose body dies is fetched again whole, never spliced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_playlist_whose_body_dies_is_fetched_again_whole() {
    let mut list = String::from("#EXTM3U\n#EXT-X-TARGETDURATION:2\n");
    for i in 0..2000 {
        list.push_str(&format!("#EXTINF:2.0,\nseg{i:04}.ts\n"));
    }
    list.push_str("#EXT-X-ENDLIST\n");
    let bytes = Arc::new(list.into_bytes());
    let n = Arc::new(AtomicUsize::new(0));
    let (b, c) = (bytes.clone(), n.clone());
    let o = Origin::start(move |_| {
        let body = if c.fetch_add(1, Ordering::SeqCst) == 0 {
            Body::DieAfter { declared: b.len() as u64, sent: b[..10_000].to_vec() }
        } else {
            Body::Bytes(b.to_vec())
        };
        Resp::new(200, body).header("Content-Type", "application/vnd.apple.mpegurl").header("ETag", "\"v1\"").into()
    })
    .await;
    let p = proxy("").await;
    let got = get(p.addr(), "GET", &relay_path("index.m3u8", &o.url("/index.m3u8")), &[]).await;
    assert_eq!(got.status, 200);
    assert!(got.complete);
    let text = got.text();
    assert_eq!(text.lines().filter(|l| l.starts_with("/strm/proxy/seg")).count(), 2000);
    assert!(text.ends_with("#EXT-X-ENDLIST\n"));
    assert_eq!(asked(&o), [(None, None), (None, None)], "fetched again whole, not by a range");
}

/// The client is never written to faster than it reads, resumption or not:
/// a slow reader of a resumed body still gets it whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_of_a_resumed_body_gets_it_whole() {
    let (o, _) = flaky(|n| if n == 0 { Fate::DieAfter(300_000) } else { Fate::Whole }).await;
    let p = proxy("").await;
    let mut c = Client::connect(p.addr()).await;
    c.send_raw(format!("GET {} HTTP/1.1\r\nHost: x\r\n\r\n", relay_path("v.mp4", &o.url("/v.mp4"))).as_bytes()).await;
    let mut sock = c.into_inner();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    use tokio::io::AsyncReadExt;
    while got.len() < TOTAL as usize + 100 {
        let k = tokio::time::timeout(Duration::from_secs(10), sock.read(&mut buf)).await.unwrap().unwrap();
        if k == 0 {
            break;
        }
        got.extend_from_slice(&buf[..k]);
        if got.len() < 400_000 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if let Some(h) = find(&got, b"\r\n\r\n") {
            if got.len() - h - 4 == TOTAL as usize {
                break;
            }
        }
    }
    let h = find(&got, b"\r\n\r\n").unwrap() + 4;
    assert_body(&got[h..], &pattern(0, TOTAL));
}

/// Resumption works on every route: the relay (above), `/strm/stream` (the
/// resolver's headers go with it) and static `routes:`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_and_routes_resume_too() {
    let (o, _) = flaky(|n| if n % 2 == 0 { Fate::DieAfter(200_000) } else { Fate::Whole }).await;
    let url = o.url("/v.mp4");
    let resolver = Origin::start(move |_| {
        let body = format!(r#"{{"url":"{url}","headers":{{"Referer":"https://hoster.example/"}},"ttl_seconds":60}}"#);
        Resp::new(200, Body::Bytes(body.into_bytes())).header("Content-Type", "application/json").into()
    })
    .await;
    let p = proxy(&format!(
        "resolver: {{url: \"{}\"}}\nroutes: [{{prefix: \"/cdn/\", upstream: \"{}\", auth: false}}]\n",
        resolver.url("/resolve"),
        o.url("/")
    ))
    .await;
    for path in ["/strm/stream?site=s&slug=x&s=1&e=1", "/cdn/v.mp4"] {
        let got = get(p.addr(), "GET", path, &[("Range", "bytes=10-")]).await;
        assert_eq!(got.status, 206, "{path}");
        assert!(got.complete, "{path}");
        assert_body(&got.body, &pattern(10, TOTAL - 10));
    }
    let seen = o.requests();
    assert_eq!(seen.len(), 4);
    assert_eq!(seen[1].header("range"), Some(format!("bytes=200010-{}", TOTAL - 1).as_str()));
    assert_eq!(seen[1].header("referer"), Some("https://hoster.example/"), "the resolver's headers go along");
    assert_eq!(seen[3].header("range"), Some(format!("bytes=200010-{}", TOTAL - 1).as_str()));
}

/// The same against a real hoster: nginx serves the file, its own `ETag`,
/// `Last-Modified` and `If-Range` handling decide whether the rest is the
/// same file, and a cutter between the proxy and nginx (the quirk nginx
/// does not produce by itself) kills connections mid-body, alternately
/// with a FIN and a reset. The client gets every byte once, for a whole
/// GET and for a range, and nginx's log shows each continuation asked with
/// `If-Range` and answered 206.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_nginx_hoster_that_drops_connections_is_resumed() {
    if tools::needs("nginx", "apt-get install nginx-light").is_none() {
        return;
    }
    const LEN: u64 = 3_000_000;
    let root = pattern_files(&["ep.mp4"], LEN);
    let (nginx, origin) = common::process::nginx_hoster(
        root.path(),
        "video/mp4 mp4;",
        "$status|$http_range|$http_if_range|$body_bytes_sent",
        "",
    )
    .await;
    let cutter = Cutter::start(origin, 700_000).await;
    let p = proxy("").await;
    for (file, range) in [("/ep.mp4", None), ("/ep.mp4?another-url", Some((100_000, 2_099_999)))] {
        // Two cuts per answer: the first response and the first continuation.
        cutter.arm(2);
        let path = relay_path("ep.mp4", &format!("http://{}{file}", cutter.addr));
        let spec = range.map(|(a, b)| format!("bytes={a}-{b}"));
        let headers: Vec<(&str, &str)> = spec.iter().map(|s| ("Range", s.as_str())).collect();
        let got = get(p.addr(), "GET", &path, &headers).await;
        assert!(got.complete, "{file}");
        match range {
            None => {
                assert_eq!(got.status, 200);
                assert_body(&got.body, &pattern(0, LEN));
            }
            Some((a, b)) => {
                let want = format!("bytes {a}-{b}/{LEN}");
                assert_eq!((got.status, got.header("content-range")), (206, Some(want.as_str())));
                assert_body(&got.body, &pattern(a, b - a + 1));
            }
        }
    }
    let log = nginx.read_when("access.log", |log| log.lines().count() >= 6).await;
    let lines: Vec<Vec<&str>> = log.lines().map(|l| l.split('|').collect()).collect();
    assert_eq!(lines.len(), 6, "two answers, each cut twice and continued twice:\n{log}");
    let continued: Vec<_> = lines.iter().filter(|l| l[2] != "-").collect();
    assert_eq!(continued.len(), 4, "{log}");
    assert!(continued.iter().all(|l| l[0] == "206" && l[1].starts_with("bytes=")), "{log}");
    let firsts: Vec<(&str, &str)> = lines.iter().filter(|l| l[2] == "-").map(|l| (l[0], l[1])).collect();
    assert!(firsts.contains(&("200", "-")) && firsts.contains(&("206", "bytes=100000-2099999")), "{log}");
    assert_eq!(resumptions(&p), (4, 4));
}

/// A hoster that allows one request at a time (nginx `limit_conn 1`,
/// `509`) drops a body mid-way while another request of the proxy's is
/// being answered, so it refuses the continuation. The refusal starts a
/// cooldown and teaches the limit of one: the next try waits at the gate,
/// for the cooldown and then for the other answer to end, instead of
/// going at once beside it, to be refused again until no attempt is left
/// and the client's body is cut. The client gets every byte, and nginx
/// refuses once. (nginx counts only the other file and continuations:
/// the first answer must be sent to be cut.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuation_the_host_refuses_waits_for_its_turn() {
    if tools::needs("nginx", "apt-get install nginx-light").is_none() {
        return;
    }
    const LEN: u64 = 3_000_000;
    const OTHER: u64 = 1_000_000;
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("ep.mp4"), pattern(0, LEN)).unwrap();
    std::fs::write(root.path().join("other.mp4"), pattern(0, OTHER)).unwrap();
    let (nginx, port) = common::process::nginx_on_a_free_port(|port| {
        format!(
            "log_format hoster '$uri|$status|$http_if_range|$msec';\ntypes {{ video/mp4 mp4; }}\n\
             map $uri $other {{ /other.mp4 k; default \"\"; }}\n\
             map $http_if_range $counted {{ \"\" $other; default k; }}\n\
             limit_conn_zone $counted zone=one:1m;\n\
             server {{ listen 127.0.0.1:{port}; root {}; access_log {{dir}}/access.log hoster;\n\
             limit_conn one 1; limit_conn_status 509;\n\
             location = /other.mp4 {{ limit_rate 400k; }} }}\n",
            root.path().display()
        )
    })
    .await;
    let origin = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let cutter = Cutter::start(origin, 700_000).await;
    let p = proxy("").await;
    // The other file, 2.5 s at nginx's pace, through the proxy's gate too.
    let other = tokio::spawn({
        let (addr, path) = (p.addr(), relay_path("other.mp4", &format!("http://{origin}/other.mp4")));
        async move { get(addr, "GET", &path, &[]).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    cutter.arm(1);
    let got = get(p.addr(), "GET", &relay_path("ep.mp4", &format!("http://{}/ep.mp4", cutter.addr)), &[]).await;
    assert!(got.complete, "the body was cut after {} bytes", got.body.len());
    assert_eq!(got.status, 200);
    assert_body(&got.body, &pattern(0, LEN));
    let other = other.await.unwrap();
    assert!(other.complete);
    assert_body(&other.body, &pattern(0, OTHER));

    let log = nginx.read_when("access.log", |log| log.lines().count() >= 4).await;
    let lines: Vec<Vec<&str>> = log.lines().map(|l| l.split('|').collect()).collect();
    let refused: Vec<_> = lines.iter().filter(|l| l[1] == "509").collect();
    assert_eq!(refused.len(), 1, "refused once:\n{log}");
    assert_eq!(refused[0][0], "/ep.mp4", "{log}");
    let at = |l: &Vec<&str>| -> f64 { l[3].parse().unwrap() };
    let other_done = lines.iter().find(|l| l[0] == "/other.mp4").map(at).unwrap();
    let continued: Vec<_> = lines.iter().filter(|l| l[0] == "/ep.mp4" && l[1] == "206").collect();
    assert_eq!(continued.len(), 1, "{log}");
    assert_ne!(continued[0][2], "-", "asked with If-Range: {log}");
    // nginx logs an answer when it is done; the continuation (about 2.3 MB,
    // at once) was sent after the other file's last byte.
    assert!(at(continued[0]) >= other_done, "the continuation waited for the other answer:\n{log}");
    assert_eq!(lines.len(), 4, "{log}");
    assert_eq!(resumptions(&p), (2, 1));
}
