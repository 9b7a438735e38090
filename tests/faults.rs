//! The fault matrix: each failure ends as a careful engineer would choose,
//! and the proxy stays healthy afterwards (a normal request still works).

mod common;

use std::time::Duration;

use common::*;

async fn origin() -> Origin {
    Origin::start(|req| match req.path() {
        // Sends 2000 bytes after declaring 1000, then keeps the connection.
        "/longer" => {
            let mut raw = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nContent-Type: video/mp4\r\n\r\n".to_vec();
            raw.extend(pattern(0, 2000));
            Action::Raw(raw)
        }
        "/huge-headers" => {
            let mut raw = b"HTTP/1.1 200 OK\r\n".to_vec();
            for i in 0..2000 {
                raw.extend(format!("X-Filler-{i}: {}\r\n", "y".repeat(600)).as_bytes());
            }
            raw.extend(b"Content-Length: 0\r\n\r\n");
            Action::Raw(raw)
        }
        "/big-header" | "/fair-header" => {
            let n = if req.path() == "/big-header" { 70_000 } else { 30_000 };
            let mut raw = format!("HTTP/1.1 200 OK\r\nX-Filler: {}\r\n", "y".repeat(n)).into_bytes();
            raw.extend(b"Content-Length: 5\r\nContent-Type: video/mp4\r\n\r\nhello");
            Action::Raw(raw)
        }
        "/bad-header" => Action::Raw(b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\nxyz".to_vec()),
        "/two-lengths" => {
            Action::Raw(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde".to_vec())
        }
        "/informational" => {
            let mut raw =
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n".to_vec();
            raw.extend(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello");
            Action::Raw(raw)
        }
        "/empty-reply" => Action::Raw(Vec::new()),
        // 40 000 bytes over about 1.6 s.
        "/slow" => Resp::new(200, Body::Slow { len: 40_000, piece: 10_000, pause: Duration::from_millis(400) })
            .header("Content-Type", "video/mp4")
            .into(),
        "/no-content-with-length" => Action::Raw(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n".to_vec()),
        _ => serve_file(req, 5000, Some("video/mp4")).into(),
    })
    .await
}

/// The origin, the proxy in open mode, and the relay path of the origin's `/v.mp4`.
async fn setup() -> (Origin, Proxy, String) {
    setup_with("").await
}

/// The same, with more of the proxy's config (YAML lines).
async fn setup_with(config: &str) -> (Origin, Proxy, String) {
    let o = origin().await;
    let path = relay_path("v.mp4", &o.url("/v.mp4"));
    (o, Proxy::open_with(config).await, path)
}

async fn healthy(p: &Proxy, o: &Origin) {
    let got = get(p.addr(), "GET", &relay_path("ok.mp4", &o.url("/ok.mp4")), &[("Range", "bytes=0-99")]).await;
    assert_eq!(got.status, 206, "the proxy stays healthy");
    assert_body(&got.body, &pattern(0, 100));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_protocol_faults() {
    let o = origin().await;
    let p = Proxy::open().await;
    // Longer than declared: exactly the declared length is relayed.
    let got = get(p.addr(), "GET", &relay_path("x", &o.url("/longer")), &[]).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("content-length"), Some("1000"));
    assert_body(&got.body, &pattern(0, 1000));
    healthy(&p, &o).await;
    // An upstream header over 64 KiB is refused (Pingora itself reads up to 1 MiB,
    // kept as long as the answer streams); 30 KB of it still goes out.
    let got = get(p.addr(), "GET", &relay_path("x", &o.url("/fair-header")), &[]).await;
    assert_eq!((got.status, got.header("x-filler").map(str::len), got.text().as_str()), (200, Some(30_000), "hello"));
    for path in ["/huge-headers", "/big-header", "/bad-header", "/two-lengths", "/empty-reply"] {
        let got = get(p.addr(), "GET", &relay_path("x", &o.url(path)), &[]).await;
        // A closed connection is no answer; the others are answers the proxy cannot relay.
        let reason = if path == "/empty-reply" { "upstream unreachable\n" } else { "invalid upstream response\n" };
        assert_eq!((got.status, got.text().as_str()), (502, reason), "{path}");
        healthy(&p, &o).await;
    }
    // Interim 1xx responses are consumed; the final one is relayed.
    let got = get(p.addr(), "GET", &relay_path("x", &o.url("/informational")), &[]).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.text(), "hello");
    // RFC 9110 §8.6: no length goes out with a 204, whatever the upstream sent.
    let mut c = Client::connect(p.addr()).await;
    let got = c.request("GET", &relay_path("x", &o.url("/no-content-with-length")), &[]).await;
    assert_eq!((got.status, got.header("content-length"), got.body.len()), (204, None, 0));
    let again = c.request("GET", &relay_path("ok.mp4", &o.url("/ok.mp4")), &[("Range", "bytes=0-9")]).await;
    assert_eq!(again.status, 206, "the connection stays in sync");
    assert_body(&again.body, &pattern(0, 10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order() {
    let (_o, p, path) = setup().await;

    // Pipelined: two requests in one write, answered in order.
    let mut c = Client::connect(p.addr()).await;
    c.send_raw(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-9\r\n\r\nGET {path} HTTP/1.1\r\nHost: x\r\nRange: bytes=10-19\r\n\r\n")
            .as_bytes(),
    )
    .await;
    let first = c.read_response(false).await;
    let second = c.read_response(false).await;
    assert_eq!((first.status, second.status), (206, 206));
    assert_body(&first.body, &pattern(0, 10));
    assert_body(&second.body, &pattern(10, 10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_with_a_body_keeps_the_connection_in_sync() {
    let (o, p, path) = setup().await;
    let mut c = Client::connect(p.addr()).await;
    c.send_raw(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nRange: bytes=0-9\r\n\r\nhello").as_bytes(),
    )
    .await;
    let got = c.read_response(false).await;
    assert_eq!(got.status, 206);
    assert_ne!(got.header("connection"), Some("close"), "the body was read, the connection stays usable");
    let again = c.request("GET", &path, &[("Range", "bytes=5-9")]).await;
    assert_eq!(again.status, 206);
    assert_body(&again.body, &pattern(5, 5));
    // Over 64 KiB of body is not read through: answered, then closed (what
    // follows it is never taken for the next request's header).
    let mut big = Client::connect(p.addr()).await;
    let head = format!("GET {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\nRange: bytes=0-9\r\n\r\n");
    big.send_raw(&[head.as_bytes(), &[b'b'; 100_000]].concat()).await;
    let got = big.read_response(false).await;
    assert_eq!(got.status, 206);
    assert_body(&got.body, &pattern(0, 10));
    assert!(big.is_closed(Duration::from_secs(2)).await, "closed after the answer");
    assert!(o.requests().iter().all(|r| r.header("content-length").is_none()), "a GET body never goes upstream");
}

/// RFC 9112 §3.2: a server MUST answer 400 to an HTTP/1.1 request without
/// `Host`, and to one whose `Host` is invalid (nginx does); HTTP/1.0 has no
/// Host to miss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_invalid_host_is_400() {
    let (o, p, path) = setup().await;
    let mut c = Client::connect(p.addr()).await;
    c.send_raw(format!("GET {path} HTTP/1.1\r\nRange: bytes=0-9\r\n\r\n").as_bytes()).await;
    let got = c.read_response(false).await;
    assert_eq!((got.status, got.text().as_str()), (400, "missing Host header\n"));
    for bad in ["a b", "user@proxy.test", "proxy.test/x"] {
        let mut c = Client::connect(p.addr()).await;
        c.send_raw(format!("GET {path} HTTP/1.1\r\nHost: {bad}\r\n\r\n").as_bytes()).await;
        let got = c.read_response(false).await;
        // (Pingora itself refuses some, without a reason.)
        assert_eq!(got.status, 400, "{bad}");
        if bad == "a b" {
            assert_eq!(got.text(), "invalid Host header\n");
        }
    }
    let mut c = Client::connect(p.addr()).await;
    c.send_raw(format!("GET {path} HTTP/1.0\r\nRange: bytes=0-9\r\n\r\n").as_bytes()).await;
    assert_eq!(c.read_response(false).await.status, 206);
    assert_eq!(o.requests().len(), 1, "the refused ones never went upstream");
    healthy(&p, &o).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_request_header_is_refused() {
    common::logs::capture();
    let (o, p, path) = setup().await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let big = "a".repeat(2 * 1024 * 1024);
    for _ in 0..2 {
        let mut sock = tokio::net::TcpStream::connect(p.addr()).await.unwrap();
        // The proxy refuses it after 64 KiB, and reads (drops) the rest
        // before it closes: all of it is taken, and the 400 is there to read.
        sock.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n").as_bytes()).await.unwrap();
        let head = tokio::time::timeout(Duration::from_secs(10), async {
            let mut buf = vec![0u8; 4096];
            let n = sock.read(&mut buf).await.unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        })
        .await
        .expect("the proxy answers");
        assert!(head.starts_with("HTTP/1.1 400 "), "{head}");
    }
    // No access line says it (no request began): the log does, once a
    // minute, with the client's address. (Only this test's proxy refuses a
    // header as too large first.)
    let said = common::logs::logs();
    let lines: Vec<&str> = said.lines().filter(|l| l.contains("was refused: over 65536 bytes; answered 400")).collect();
    assert_eq!(lines.len(), 1, "{said}");
    assert!(lines[0].starts_with("INFO a request header from 127.0.0.1:"), "{}", lines[0]);
    assert_eq!(p.server.metrics.client_headers_refused.with_label_values(&["too_large"]).get(), 2);
    healthy(&p, &o).await;
}

/// Pingora bounds a request header only per read (60 s each, up to 1 MiB
/// of it): a client trickling its header (slowloris) would hold its
/// connection for as long as it liked. Like nginx's
/// `client_header_timeout`, a header must be whole within
/// `downstream.header_timeout` of its first byte (the connection is closed
/// otherwise), and within 64 KiB (answered 400 otherwise, as nginx does);
/// either is counted. Neither an answer that
/// takes longer, nor a request pipelined during it, nor keep-alive idle
/// time counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_header_must_be_whole_in_time_and_in_size() {
    let (o, p, path) = setup_with("downstream: {header_timeout: 1s}\n").await;
    let refused = |why: &str| p.server.metrics.client_headers_refused.with_label_values(&[why]).get();
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-9\r\n\r\n");
    assert!(request.len() > 60, "a trickle of it takes longer than the timeout");

    // One byte every 50 ms: closed before the header is whole, unanswered.
    let mut slow = Client::connect(p.addr()).await;
    let mut sent = 0;
    for b in request.as_bytes() {
        if slow.is_closed(Duration::from_millis(50)).await {
            break;
        }
        slow.send_raw(&[*b]).await;
        sent += 1;
    }
    assert!(sent < request.len(), "cut after {sent} of {} bytes", request.len());
    assert!(slow.is_closed(Duration::from_secs(1)).await);
    assert_eq!((refused("timeout"), refused("too_large")), (1, 0));
    assert!(o.requests().is_empty(), "nothing went upstream");

    // Nothing sent at all: closed after the timeout as well (nginx's
    // `client_header_timeout` counts from the connect), not after
    // Pingora's 60 s; no header was refused.
    let mut silent = Client::connect(p.addr()).await;
    assert!(!silent.is_closed(Duration::from_millis(600)).await, "not before the timeout");
    assert!(silent.is_closed(Duration::from_secs(3)).await, "closed after it");
    assert_eq!(refused("timeout"), 1, "a silent connection is no refused header");

    // In two pieces within the timeout: answered; then idle for longer
    // than it, and a keep-alive request still answered.
    let mut fair = Client::connect(p.addr()).await;
    let (first, rest) = request.as_bytes().split_at(40);
    fair.send_raw(first).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    fair.send_raw(rest).await;
    let got = fair.read_response(false).await;
    assert_eq!((got.status, got.body.len()), (206, 10));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let got = fair.request("GET", &path, &[("Range", "bytes=10-19")]).await;
    assert_eq!((got.status, got.body.clone()), (206, pattern(10, 10)));
    // A refused request's body is read with it, not taken for the start
    // of the next header: the next one, after idling, is answered too.
    fair.send_raw(b"POST /strm/proxy/x HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n").await;
    fair.send_raw(&[b'p'; 100]).await;
    assert_eq!(fair.read_response(false).await.status, 405);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(fair.request("GET", &path, &[("Range", "bytes=0-9")]).await.status, 206);

    // An answer that takes 1.6 s, with the next request pipelined at once
    // and read only after it: both answered.
    let mut piped = Client::connect(p.addr()).await;
    let slow_path = relay_path("s.mp4", &o.url("/slow"));
    piped.send_raw(format!("GET {slow_path} HTTP/1.1\r\nHost: x\r\n\r\n{request}").as_bytes()).await;
    let got = piped.read_response(false).await;
    assert_eq!((got.status, got.body.len()), (200, 40_000));
    let got = piped.read_response(false).await;
    assert_eq!((got.status, got.body.len()), (206, 10));

    // Size: 60 KB of header is answered, over 64 KiB refused with a 400 (as
    // nginx does), and so is 200 KB sent in pieces: the connection lingers
    // at its close until the client has sent it all, so no write of it
    // fails and the 400 is read (closed at once, the client's next write
    // met a reset).
    for (filler, piece, status) in [(60_000, 0, "200"), (70_000, 0, "400"), (200_000, 8192, "400")] {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut c = tokio::net::TcpStream::connect(p.addr()).await.unwrap();
        let big = format!("GET {path} HTTP/1.1\r\nHost: x\r\nX-Filler: {}\r\n\r\n", "f".repeat(filler));
        if piece == 0 {
            c.write_all(big.as_bytes()).await.unwrap();
        } else {
            for (i, part) in big.as_bytes().chunks(piece).enumerate() {
                c.write_all(part).await.unwrap_or_else(|e| panic!("piece {i} of the header not written: {e}"));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), async {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = c.read(&mut buf).await {
                answer.extend_from_slice(&buf[..n]);
                if find(&answer, b"\r\n\r\n").is_some() {
                    break;
                }
            }
        });
        read.await.expect("answered");
        let line = format!("HTTP/1.1 {status} ");
        assert!(answer.starts_with(line.as_bytes()), "{filler}: {:?}", String::from_utf8_lossy(&answer));
    }
    assert_eq!((refused("timeout"), refused("too_large")), (1, 2));
    healthy(&p, &o).await;
}

/// A header Pingora cannot parse is answered 400 by Pingora itself, before
/// the proxy's routing (and its access log) sees a request: it is counted
/// (`malformed`), and the proxy's own answers, errors included, are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_that_cannot_be_parsed_is_counted() {
    let (o, p, path) = setup().await;
    let refused = |why: &str| p.server.metrics.client_headers_refused.with_label_values(&[why]).get();
    let mut ok = Client::connect(p.addr()).await;
    assert_eq!(ok.request("GET", &path, &[("Range", "bytes=0-9")]).await.status, 206);
    assert_eq!(ok.request("GET", "/nothing/here", &[]).await.status, 404);
    assert_eq!(ok.request("DELETE", &path, &[]).await.status, 405);
    ok.send_raw(format!("GET {path} HTTP/1.1\r\nRange: bytes=0-9\r\n\r\n").as_bytes()).await;
    assert_eq!(ok.read_response(false).await.status, 400, "the proxy's own 400: no Host");
    assert_eq!(refused("malformed"), 0);

    let fetched = o.requests().len();
    for bad in [
        "GET /x HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n".to_string(),
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-9\x01\r\n\r\n"),
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n"),
    ] {
        let mut c = Client::connect(p.addr()).await;
        c.send_raw(bad.as_bytes()).await;
        assert_eq!(c.read_response(false).await.status, 400, "{bad:?}");
        assert!(c.is_closed(Duration::from_secs(1)).await);
    }
    assert_eq!(o.requests().len(), fetched, "a refused header goes nowhere");
    // A client still sending (here a body of 200 KB, in pieces) after a
    // header refused: the connection lingers until it is sent, so no write
    // meets a reset, and the 400 is read.
    let mut c = tokio::net::TcpStream::connect(p.addr()).await.unwrap();
    let body = vec![b'b'; 200_000];
    let request =
        [b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\nBad Header\r\n\r\n".as_slice(), &body].concat();
    for (i, part) in request.chunks(8192).enumerate() {
        tokio::io::AsyncWriteExt::write_all(&mut c, part)
            .await
            .unwrap_or_else(|e| panic!("piece {i} not written: {e}"));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut head = [0u8; 12];
    tokio::io::AsyncReadExt::read_exact(&mut c, &mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 400");
    // After a keep-alive request too: the next header is judged on its own.
    assert_eq!(ok.request("GET", &path, &[("Range", "bytes=0-9")]).await.status, 206);
    ok.send_raw(b"GET /x HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n").await;
    assert_eq!(ok.read_response(false).await.status, 400);
    assert_eq!((refused("malformed"), refused("timeout"), refused("too_large")), (5, 0, 0));
}

/// A request's body means nothing here (it is read and dropped), yet a
/// client that declares one and trickles it (a byte now and then, never a
/// minute apart) would hold the connection for as long as it liked: the
/// body is read only until `downstream.header_timeout` has passed, then the
/// request is answered and the connection closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_request_body_is_not_waited_for() {
    use tokio::io::AsyncWriteExt;
    let (_o, p, path) = setup_with("downstream: {header_timeout: 1s}\n").await;
    let c = Client::connect(p.addr()).await;
    let (mut rd, mut wr) = c.into_inner().into_split();
    let head = format!("GET {path} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-9\r\nContent-Length: 100000\r\n\r\n");
    wr.write_all(head.as_bytes()).await.unwrap();
    // A byte every 100 ms: the whole body would take almost three hours.
    let trickle = tokio::spawn(async move {
        while wr.write_all(b"b").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), tokio::io::AsyncReadExt::read_to_end(&mut rd, &mut got));
    assert!(read.await.is_ok(), "answered and closed, not held while the body trickles");
    trickle.abort();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 206 "), "{text}");
    assert!(got.ends_with(&pattern(0, 10)), "{text}");
}

/// Pingora would keep an idle keep-alive connection open for ever (a
/// player that vanished without closing would hold it for good): like
/// nginx's `keepalive_timeout`, one idle for `downstream.keepalive_timeout`
/// is closed, while one in use stays; a client's `Keep-Alive: timeout=`
/// (which Pingora would follow) cannot lengthen it; HTTP/1.0 without
/// keep-alive still closes at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_closed() {
    let (_origin, p, path) = setup_with("downstream: {keepalive_timeout: 2s}\n").await;
    let mut busy = Client::connect(p.addr()).await;
    for i in 0..4u64 {
        let got = busy.request("GET", &path, &[("Range", &format!("bytes={i}-{i}"))]).await;
        assert_eq!(got.status, 206, "request {i} on one connection");
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
    assert!(!busy.is_closed(Duration::from_millis(300)).await, "in use for 5 s, never idle for 2 s: open");
    assert!(busy.is_closed(Duration::from_secs(4)).await, "idle for 2 s: closed");

    let mut asks_longer = Client::connect(p.addr()).await;
    let asked = [("Connection", "keep-alive"), ("Keep-Alive", "timeout=600")];
    assert_eq!(asks_longer.request("GET", &path, &asked).await.status, 200);
    assert!(asks_longer.is_closed(Duration::from_secs(4)).await, "a client cannot keep it longer");

    let mut old = Client::connect(p.addr()).await;
    old.send_raw(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes()).await;
    assert_eq!(old.read_response(false).await.status, 200);
    assert!(old.is_closed(Duration::from_millis(500)).await, "HTTP/1.0 without keep-alive: closed at once");
}

/// `downstream.max_connections`: at the bound, the connection idle the
/// longest is closed to make room for a new one (as nginx closes its
/// reusable connections when `worker_connections` run out); one that
/// finishes an answer while a newcomer waits closes for it; a newcomer
/// that finds every connection in the middle of a request waits at most
/// `downstream.header_timeout` and is closed unanswered. No request is
/// cut on the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_max_connections_idle_connections_make_room() {
    let o = Origin::start(|req| {
        let held = |secs| Action::Delayed(Duration::from_secs(secs), Resp::new(200, Body::Bytes(b"held".to_vec())));
        match req.path() {
            "/one" => held(1),
            "/six" => held(6),
            _ => Resp::new(200, Body::Bytes(b"quick".to_vec())).into(),
        }
    })
    .await;
    common::logs::capture();
    let p = Proxy::open_with("downstream: {max_connections: 2, header_timeout: 2s}\n").await;
    let path = |name: &str, n: u32| relay_path("v.mp4", &o.url(&format!("/{name}?{n}")));
    let closed = |reason: &str| p.metric(&format!("anibridge_client_connections_closed_total{{reason=\"{reason}\"}}"));

    let mut a = Client::connect(p.addr()).await;
    assert_eq!(a.request("GET", &path("quick", 1), &[]).await.body, b"quick");
    let mut b = Client::connect(p.addr()).await;
    assert_eq!(b.request("GET", &path("quick", 2), &[]).await.body, b"quick");
    assert_eq!(p.metric("anibridge_client_connections "), 2.0);
    // Both idle: the one idle the longer makes room.
    let mut c = Client::connect(p.addr()).await;
    assert_eq!(c.request("GET", &path("quick", 3), &[]).await.body, b"quick");
    assert!(a.is_closed(Duration::from_secs(2)).await, "the longest idle was closed");
    assert!(!b.is_closed(Duration::from_millis(200)).await);
    assert_eq!(closed("idle_for_room"), 1.0);

    // Both in a request: a newcomer waits; the first answer done closes its
    // connection for it, after the whole answer.
    b.send_raw(format!("GET {} HTTP/1.1\r\nHost: x\r\n\r\n", path("one", 4)).as_bytes()).await;
    c.send_raw(format!("GET {} HTTP/1.1\r\nHost: x\r\n\r\n", path("six", 5)).as_bytes()).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut d = Client::connect(p.addr()).await;
    assert_eq!(d.request("GET", &path("quick", 6), &[]).await.body, b"quick");
    let got = b.read_response(false).await;
    assert_eq!((got.status, got.body.as_slice(), got.complete), (200, &b"held"[..], true));
    assert!(b.is_closed(Duration::from_secs(1)).await, "closed after its answer, for the newcomer");
    assert_eq!(closed("idle_for_room"), 2.0);

    // c and d both in a request: no room within header_timeout.
    d.send_raw(format!("GET {} HTTP/1.1\r\nHost: x\r\n\r\n", path("six", 7)).as_bytes()).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut e = Client::connect(p.addr()).await;
    e.send_raw(format!("GET {} HTTP/1.1\r\nHost: x\r\n\r\n", path("quick", 8)).as_bytes()).await;
    assert!(e.is_closed(Duration::from_secs(4)).await, "closed unanswered");
    assert_eq!(closed("no_room"), 1.0);
    let said = common::logs::logs();
    let warned: Vec<&str> = said.lines().filter(|l| l.contains("connections (downstream.max_connections)")).collect();
    assert!(warned.len() == 1 && warned[0].starts_with("WARN a client connection was closed unanswered"), "{said}");
    assert_eq!(closed("idle_for_room"), 2.0, "no connection in a request is closed");
    for (who, client) in [("c", &mut c), ("d", &mut d)] {
        let got = client.read_response(false).await;
        assert_eq!((got.status, got.body.as_slice()), (200, &b"held"[..]), "{who}");
    }
    let mut targets: Vec<String> = o.requests().iter().map(|r| r.target.clone()).collect();
    targets.sort();
    assert_eq!(targets, ["/one?4", "/quick?1", "/quick?2", "/quick?3", "/quick?6", "/six?5", "/six?7"], "not e's");
}
