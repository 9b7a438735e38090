//! Relaying a response's body: one upstream buffer at a time, the next read
//! only after the last write finished, so a slow client slows the upstream
//! read and a stream holds one buffer whatever the file size.

use std::future::Future;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use pingora::protocols::http::{HttpTask, ServerSession};
use pingora_error::{Error, ErrorType, Result};
use pingora_http::ResponseHeader;

use super::live::Stream;
use super::source::Source;
use super::{Ctx, Outcome, State};
use crate::metrics::Held;
use std::sync::atomic::{AtomicU64, Ordering};

/// Sends `header`, then (unless `bodyless`) `first` and the rest of the body.
pub(super) async fn relay(
    st: &State,
    down: &mut ServerSession,
    ctx: &mut Ctx,
    mut resp: Source,
    mut header: ResponseHeader,
    first: Vec<u8>,
    bodyless: bool,
) -> std::result::Result<(), Outcome> {
    ctx.status = header.status.as_u16();
    ctx.sending(&mut header)?;
    if !bodyless && ends_with_the_connection(&header) {
        // Only an HTTP/1.0 client gets such a body (HTTP/1.1 gets chunks).
        // Pingora writes `Connection` before it sees the body has no
        // length, and would say `keep-alive` to a client that asked.
        down.set_keepalive(None);
    }
    // A stored body in a sealed file goes out with `sendfile`.
    let sealed = resp.sealed_range().filter(|_| !bodyless && first.is_empty() && super::sendfile::possible(down));
    match sealed {
        Some(_) => super::sendfile::write_header(down, header).await?,
        None => down.write_response_header(Box::new(header)).await?,
    }
    if !bodyless {
        let _streaming = Held::new(&st.metrics.active_streams);
        // Registered while it runs: a stream the shutdown cuts is reported.
        let open = st.streams.open(stream_of(down, ctx));
        let (timeout, sent) = (st.downstream_write_timeout, &open.stream.bytes);
        let pumped = match sealed {
            Some((file, range)) => super::sendfile::send_body(down, file, range, timeout, sent).await,
            None => pump(down, &mut resp, first, timeout, sent).await,
        };
        ctx.body_bytes += sent.load(Ordering::Relaxed);
        ctx.memory_bytes = resp.handed_over_bytes();
        ctx.fetched_bytes = resp.fetched_bytes();
        if ctx.fetched_bytes > 0 && ctx.upstream_host.is_empty() {
            // A reader of a fill that borrowed its connection: its access
            // line names the upstream that sent its bytes.
            ctx.upstream_host = resp.url().host_str().unwrap_or_default().to_string();
            ctx.upstream_status = resp.header().status.as_u16();
        }
        ctx.resumed = resp.resumptions();
        pumped?;
    }
    resp.finish().await;
    Ok(())
}

/// A body neither its length nor chunks delimit: it ends when the
/// connection does (RFC 9112 §6.3), so the connection cannot be kept.
fn ends_with_the_connection(header: &ResponseHeader) -> bool {
    let h = &header.headers;
    !super::decide::contentless(header.status)
        && !h.contains_key(http::header::CONTENT_LENGTH)
        && !h.contains_key(http::header::TRANSFER_ENCODING)
}

/// What a stream's access line would say if the shutdown cut it. Without
/// an access log, only what the warning says (the method, the path, the
/// route and the bytes): every stream registers, almost none is cut.
fn stream_of(down: &ServerSession, ctx: &Ctx) -> Stream {
    let req = down.req_header();
    let mut stream = Stream {
        at: std::time::UNIX_EPOCH,
        started: ctx.start,
        ttfb_ms: None,
        peer: None,
        forwarded_for: None,
        method: req.method.clone(),
        uri: req.uri.clone(),
        route: ctx.route,
        route_index: ctx.route_index,
        status: ctx.status,
        upstream_host: String::new(),
        upstream_status: ctx.upstream_status,
        cache: "",
        user_agent: None,
        request_id: String::new(),
        bytes: AtomicU64::new(0),
    };
    if log::log_enabled!(target: "access", log::Level::Info) {
        stream.at = std::time::SystemTime::now() - ctx.start.elapsed();
        stream.ttfb_ms = ctx.first_byte.map(|t| t.duration_since(ctx.start).as_millis() as u64);
        stream.peer = down.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip());
        stream.forwarded_for = crate::access::forwarded_for(&req.headers);
        stream.upstream_host = ctx.upstream_host.clone();
        stream.cache = ctx.cache.map_or("", crate::metrics::CacheResult::as_str);
        stream.user_agent = req.headers.get(http::header::USER_AGENT).cloned();
        stream.request_id = ctx.request_id.clone();
    }
    stream
}

/// Copies the upstream body to the client one buffer at a time, counting
/// what was sent into `sent`. While waiting for upstream the client
/// connection is watched, so a client that leaves drops the upstream at once.
pub(super) async fn pump(
    down: &mut ServerSession,
    resp: &mut Source,
    first: Vec<u8>,
    write_timeout: Duration,
    sent: &AtomicU64,
) -> Result<()> {
    write_down(down, &first, sent).await?;
    // Sent: its buffer is not held for the rest of the stream.
    drop(first);
    // A request body (never forwarded) is read and dropped while we wait;
    // after it, the client socket is watched for a hang-up. Bytes of a
    // pipelined next request are kept by Pingora for that request.
    let mut request_body_done = down.is_body_done();
    // Small pieces that were there at once, joined: Pingora sends each
    // piece of a chunked response as a chunk and flushes it, so an upstream
    // that sends its body a few bytes per chunk would otherwise cost a
    // system call (and a chunk) per few bytes. Allocated only when needed,
    // and given back before any wait (memory per slow stream).
    let mut joined: Vec<u8> = Vec::new();
    loop {
        let chunk = {
            let mut read = std::pin::pin!(resp.read());
            // Upstream data already there: write on (small pieces coalesce
            // in the write buffer). About to wait: flush first, so the client
            // has everything received so far, then wait for upstream or the
            // client, keeping the same read (it may be resuming).
            match std::future::poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx))).await {
                Poll::Ready(Ok(chunk)) => chunk,
                Poll::Ready(Err(e)) => {
                    // What came before the failure still reaches the client.
                    write_joined(down, &mut joined, sent).await?;
                    return Err(e);
                }
                Poll::Pending => {
                    write_joined(down, &mut joined, sent).await?;
                    // Bounded like every other downstream write: a client that
                    // stopped reading must not park the stream forever.
                    match tokio::time::timeout(write_timeout, flush_down(down)).await {
                        Ok(flushed) => flushed?,
                        Err(_) => {
                            return Error::e_explain(ErrorType::WriteTimedout, "flushing to the client")
                                .map_err(|e| e.into_down())
                        }
                    }
                    loop {
                        tokio::select! {
                            biased;
                            r = &mut read => break r?,
                            client = down.read_body_or_idle(request_body_done) => match client {
                                Ok(Some(_discarded)) => {}
                                Ok(None) => request_body_done = true,
                                Err(e) => return Err(e.into_down()),
                            },
                        }
                    }
                }
            }
        };
        match chunk {
            Some(bytes) if bytes.len() < SMALL_PIECE => {
                joined.extend_from_slice(bytes);
                if joined.len() >= JOINED {
                    write_joined(down, &mut joined, sent).await?;
                }
            }
            Some(bytes) => {
                write_joined(down, &mut joined, sent).await?;
                write_down(down, bytes, sent).await?;
            }
            None => break,
        }
    }
    write_joined(down, &mut joined, sent).await?;
    down.finish_body().await
}

/// Writes the joined small pieces, if any, and gives their buffer back.
async fn write_joined(down: &mut ServerSession, joined: &mut Vec<u8>, sent: &AtomicU64) -> Result<()> {
    write_down(down, &std::mem::take(joined), sent).await
}

/// Pieces under this size are joined before they are written...
const SMALL_PIECE: usize = 4096;
/// ...up to this much.
const JOINED: usize = 16 * 1024;

/// Sends whatever the downstream write buffer holds. Pingora 0.9's v1
/// server session has no public flush; a `Failed` task makes
/// `response_duplex_vec` flush the stream and hand that same error back,
/// changing nothing else (tests/binary.rs checks the effect on the wire).
async fn flush_down(down: &mut ServerSession) -> Result<()> {
    const MARKER: ErrorType = ErrorType::Custom("anibridge-flush");
    if let ServerSession::H1(s) = down {
        let tasks = vec![HttpTask::Body(None, false), HttpTask::Failed(Error::new(MARKER))];
        match s.response_duplex_vec(tasks).await {
            Err(e) if *e.etype() == MARKER => {}
            Err(e) => return Err(e.into_down()),
            Ok(_) => {}
        }
    }
    Ok(())
}

/// Writes body bytes to the client and counts them into `sent` once written.
async fn write_down(down: &mut ServerSession, bytes: &[u8], sent: &AtomicU64) -> Result<()> {
    // A zero-length write would end a chunked response early.
    if bytes.is_empty() {
        return Ok(());
    }
    let written = match down {
        ServerSession::H1(s) => s.write_body(bytes).await.map(|_| ()),
        other => other.write_response_body(Bytes::copy_from_slice(bytes), false).await,
    };
    // A failed write is the client's side (gone, or too slow).
    written.map_err(|e| e.into_down())?;
    sent.fetch_add(bytes.len() as u64, Ordering::Relaxed);
    Ok(())
}

/// Runs `work` unless the client hangs up first: then the work is dropped
/// (an upstream request abandoned, a wait for the cache or a host's gate
/// given up) and the answer is an abort. Bytes of a pipelined next request
/// that arrive meanwhile are kept by Pingora for that request.
///
/// `work` comes pinned by the caller: taken by value, an async function
/// would hold it twice (the argument and the pinned local), and an upstream
/// request's future is large.
pub(super) async fn unless_client_leaves<F: Future>(
    down: &mut ServerSession,
    mut work: std::pin::Pin<&mut F>,
) -> std::result::Result<F::Output, Box<Error>> {
    let mut request_body_done = down.is_body_done();
    loop {
        tokio::select! {
            biased;
            done = work.as_mut() => return Ok(done),
            client = down.read_body_or_idle(request_body_done) => match client {
                Ok(Some(_discarded)) => {}
                Ok(None) => request_body_done = true,
                Err(e) => return Err(e.into_down()),
            },
        }
    }
}

/// The pump over in-memory streams (`tokio::io::duplex`): Pingora's own
/// server and client sessions on both ends, no sockets.
#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use pingora::protocols::http::v1::client::HttpSession;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;
    use crate::upstream::{Client, Response, Settings, Timeouts};

    fn client() -> Client {
        let t = Duration::from_secs(5);
        let settings =
            Settings { max_redirects: 0, pool_size: 0, ..Settings::plain(Timeouts { connect: t, read: t, write: t }) };
        Client::new(settings, None)
    }

    /// A downstream session that has read `GET / HTTP/1.1`, and the
    /// client's end of it; the duplex holds at most `cap` bytes in flight.
    async fn downstream(cap: usize) -> (ServerSession, DuplexStream) {
        let (client_end, server_end) = tokio::io::duplex(cap);
        let mut session = ServerSession::new_http1(Box::new(server_end));
        let mut c = client_end;
        c.write_all(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
        assert!(session.read_request().await.unwrap());
        (session, c)
    }

    /// An upstream session that has read `head`, and the origin's end,
    /// which writes `body` in the background, counting what it wrote.
    async fn upstream(cap: usize, head: &str, body: Vec<u8>, then_hang: bool) -> (HttpSession, Arc<AtomicU64>) {
        let (ours, mut origin) = tokio::io::duplex(cap);
        let mut session = HttpSession::new(Box::new(ours));
        let written = Arc::new(AtomicU64::new(0));
        let w = written.clone();
        let head = head.to_string();
        tokio::spawn(async move {
            origin.write_all(head.as_bytes()).await.unwrap();
            for piece in body.chunks(4096) {
                if origin.write_all(piece).await.is_err() {
                    return;
                }
                w.fetch_add(piece.len() as u64, Ordering::SeqCst);
            }
            if then_hang {
                let mut sink = [0u8; 64];
                while origin.read(&mut sink).await.is_ok_and(|n| n > 0) {}
            }
        });
        session.read_response().await.unwrap();
        (session, written)
    }

    /// Sends a 200 header declaring `length` bytes.
    async fn start_200(down: &mut ServerSession, length: u64) {
        let mut out = ResponseHeader::build(200, None).unwrap();
        out.insert_header("Content-Length", length.to_string()).unwrap();
        down.write_response_header(Box::new(out)).await.unwrap();
    }

    async fn read_all(mut c: DuplexStream) -> Vec<u8> {
        let mut out = Vec::new();
        c.read_to_end(&mut out).await.unwrap();
        out
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i % 251) as u8).collect()
    }

    #[tokio::test]
    async fn the_body_arrives_exactly_and_the_response_is_finished() {
        let c = client();
        let body = pattern(300_000);
        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
        let (session, _) = upstream(64 * 1024, &head, body.clone(), false).await;
        let mut resp = Source::Upstream(Response::over(&c, session));
        let (mut down, client_end) = downstream(64 * 1024).await;
        let reader = tokio::spawn(read_all(client_end));
        start_200(&mut down, body.len() as u64).await;
        let sent = AtomicU64::new(0);
        pump(&mut down, &mut resp, b"".to_vec(), Duration::from_secs(5), &sent).await.unwrap();
        drop(down);
        let got = reader.await.unwrap();
        let split = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        assert_eq!(&got[split..], &body[..]);
        assert_eq!(sent.load(Ordering::SeqCst), body.len() as u64);
    }

    #[tokio::test]
    async fn a_client_that_reads_nothing_stops_the_upstream_reads() {
        let c = client();
        let body = pattern(4 << 20);
        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
        let (session, written) = upstream(16 * 1024, &head, body, false).await;
        let mut resp = Source::Upstream(Response::over(&c, session));
        let (mut down, _client_end_never_read) = downstream(16 * 1024).await;
        start_200(&mut down, 4 << 20).await;
        let sent = AtomicU64::new(0);
        let pumping = pump(&mut down, &mut resp, Vec::new(), Duration::from_secs(30), &sent);
        // The pump blocks on the full client side; the origin can only run
        // ahead by what the buffers in between hold.
        assert!(tokio::time::timeout(Duration::from_millis(500), pumping).await.is_err());
        let ahead = written.load(Ordering::SeqCst);
        assert!(ahead < 256 * 1024, "the origin wrote {ahead} bytes to a client that read none");
    }

    #[tokio::test]
    async fn a_client_gone_while_the_upstream_waits_ends_the_pump() {
        let c = client();
        let head = "HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n";
        let (session, _) = upstream(64 * 1024, head, pattern(1000), true).await;
        let mut resp = Source::Upstream(Response::over(&c, session));
        let (mut down, client_end) = downstream(64 * 1024).await;
        start_200(&mut down, 1_000_000).await;
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            drop(client_end);
        });
        let sent = AtomicU64::new(0);
        let pumping = pump(&mut down, &mut resp, Vec::new(), Duration::from_secs(30), &sent);
        let ended = tokio::time::timeout(Duration::from_secs(5), pumping).await;
        let e = ended.expect("the pump noticed the client leaving").unwrap_err();
        assert!(matches!(e.esource(), pingora_error::ErrorSource::Downstream), "{e}");
        assert_eq!(sent.load(Ordering::SeqCst), 1000);
    }

    #[tokio::test]
    async fn an_upstream_that_dies_mid_body_fails_the_pump() {
        let c = client();
        let head = "HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n";
        let (session, _) = upstream(64 * 1024, head, pattern(5000), false).await;
        let mut resp = Source::Upstream(Response::over(&c, session));
        let (mut down, client_end) = downstream(256 * 1024).await;
        let reader = tokio::spawn(read_all(client_end));
        start_200(&mut down, 100_000).await;
        let sent = AtomicU64::new(0);
        let e = pump(&mut down, &mut resp, Vec::new(), Duration::from_secs(5), &sent).await.unwrap_err();
        assert_eq!(*e.etype(), ErrorType::ConnectionClosed, "{e}");
        assert_eq!(sent.load(Ordering::SeqCst), 5000);
        drop(down);
        let got = reader.await.unwrap();
        assert!(got.ends_with(&pattern(5000)), "what came before the death was delivered");
    }
}
