//! Test support: a scriptable HTTP/1.1 origin over raw loopback sockets
//! (so it can send exactly the bytes a test needs: dying bodies, stalls,
//! hop-by-hop headers), a raw client that reports whether a response was
//! cleanly terminated, and a harness that runs the real proxy in-process.
#![allow(dead_code)]

pub mod cutter;
pub mod logs;
pub mod process;
pub mod tls;
pub mod tools;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anibridge_proxy::auth::{sign, Query};
use anibridge_proxy::config::Config;
use anibridge_proxy::server::Embedded;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const SECRET: &str = "test-secret";

/// The deterministic byte at `offset` of every generated body.
pub fn pattern_byte(offset: u64) -> u8 {
    (offset.wrapping_mul(31).wrapping_add(offset >> 13) % 251) as u8
}

pub fn pattern(start: u64, len: u64) -> Vec<u8> {
    (start..start + len).map(pattern_byte).collect()
}

/// A new directory holding each of `names` as a `len`-byte [`pattern`]
/// file, for a real server (nginx) to serve.
pub fn pattern_files(names: &[&str], len: u64) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    for name in names {
        std::fs::write(root.path().join(name), pattern(0, len)).unwrap();
    }
    root
}

/// Compares bodies by length and hash (never prints megabytes).
#[track_caller]
pub fn assert_body(got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "body length");
    assert!(got == want, "body differs (sha {} vs {})", sha(got), sha(want));
}

pub fn sha(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// A request as the origin saw it.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub method: String,
    pub target: String,
    /// Header names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    /// Header names as spelled on the wire, in order.
    pub spelled: Vec<String>,
    pub conn_id: usize,
    /// When it arrived.
    pub at: std::time::Instant,
    /// Requests being answered when it arrived, itself included.
    pub in_flight: usize,
}

impl SeenRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }
}

/// What the origin sends back.
pub enum Body {
    /// With `Content-Length`.
    Bytes(Vec<u8>),
    /// Generated pattern bytes `[start, start+len)` with `Content-Length`,
    /// written in 64 KiB pieces (never held in memory whole).
    Pattern { start: u64, len: u64 },
    /// `Transfer-Encoding: chunked`, properly terminated.
    Chunked(Vec<u8>),
    /// Close-delimited (no length, `Connection: close`).
    UntilClose(Vec<u8>),
    /// Declares `declared` bytes, sends `sent`, then closes.
    DieAfter { declared: u64, sent: Vec<u8> },
    /// Chunked, sends `sent`, then closes without the last chunk.
    ChunkedDie(Vec<u8>),
    /// Declares `declared`, sends `sent`, then stalls (keeps the socket).
    Stall { declared: u64, sent: Vec<u8> },
    /// Declares `declared`, sends `sent`, then resets the connection (RST).
    ResetAfter { declared: u64, sent: Vec<u8> },
    /// Pattern bytes `[0, len)` with `Content-Length`, in `piece`-sized
    /// writes `pause` apart.
    Slow { len: u64, piece: u64, pause: Duration },
    /// No body (HEAD answers, 204, 304).
    Empty { content_length: Option<u64> },
}

pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Body,
}

impl Resp {
    pub fn new(status: u16, body: Body) -> Resp {
        Resp { status, headers: Vec::new(), body }
    }
    pub fn header(mut self, k: &str, v: &str) -> Resp {
        self.headers.push((k.to_string(), v.to_string()));
        self
    }
}

/// What a handler may do instead of answering.
pub enum Action {
    Respond(Resp),
    /// Write these exact bytes, then close.
    Raw(Vec<u8>),
    /// Read the request, never answer (until the client closes).
    Hang,
    /// Answer after a pause.
    Delayed(Duration, Resp),
    /// Write these lines one at a time, pausing after each (a header that
    /// trickles in), then close.
    Trickle(Vec<Vec<u8>>, Duration),
}

impl From<Resp> for Action {
    fn from(r: Resp) -> Action {
        Action::Respond(r)
    }
}

type Handler = dyn Fn(&SeenRequest) -> Action + Send + Sync;

/// A scriptable origin on 127.0.0.1:ephemeral.
pub struct Origin {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<SeenRequest>>>,
    pub connections: Arc<AtomicUsize>,
    /// Connections that are currently open.
    pub open_connections: Arc<AtomicUsize>,
    /// Body bytes written to sockets so far (all responses).
    pub body_bytes_written: Arc<AtomicU64>,
    /// Requests being answered now, and the most there ever were at once.
    pub in_flight: Arc<AtomicUsize>,
    pub max_in_flight: Arc<AtomicUsize>,
    accepting: tokio::task::JoinHandle<()>,
}

impl Origin {
    pub async fn start(handler: impl Fn(&SeenRequest) -> Action + Send + Sync + 'static) -> Origin {
        Self::start_with_sndbuf(handler, None).await
    }

    /// With a small socket send buffer, so writes block soon when the
    /// reader stops (for backpressure tests).
    pub async fn start_with_sndbuf(
        handler: impl Fn(&SeenRequest) -> Action + Send + Sync + 'static,
        sndbuf: Option<u32>,
    ) -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let open_connections = Arc::new(AtomicUsize::new(0));
        let written = Arc::new(AtomicU64::new(0));
        let load = Load { now: Arc::new(AtomicUsize::new(0)), max: Arc::new(AtomicUsize::new(0)) };
        let (in_flight, max_in_flight) = (load.now.clone(), load.max.clone());
        let handler: Arc<Handler> = Arc::new(handler);
        let (s, c, o, w) = (seen.clone(), connections.clone(), open_connections.clone(), written.clone());
        let accepting = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else { return };
                if let Some(n) = sndbuf {
                    let sref = socket2::SockRef::from(&sock);
                    let _ = sref.set_send_buffer_size(n as usize);
                }
                let id = c.fetch_add(1, Ordering::SeqCst);
                o.fetch_add(1, Ordering::SeqCst);
                let (h, s, o, w, l) = (handler.clone(), s.clone(), o.clone(), w.clone(), load.clone());
                tokio::spawn(async move {
                    let _ = serve_conn(sock, id, h, s, w, l).await;
                    o.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Origin {
            addr,
            seen,
            connections,
            open_connections,
            body_bytes_written: written,
            in_flight,
            max_in_flight,
            accepting,
        }
    }

    /// Stops accepting connections (new ones are refused); those open go on.
    pub fn stop_accepting(&self) {
        self.accepting.abort();
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn requests(&self) -> Vec<SeenRequest> {
        self.seen.lock().unwrap().clone()
    }

    pub fn count(&self, path: &str) -> usize {
        self.requests().iter().filter(|r| r.path() == path).count()
    }

    /// Whether every connection to this origin is closed within 5 s.
    pub async fn all_closed_soon(&self) -> bool {
        for _ in 0..100 {
            if self.open_connections.load(Ordering::SeqCst) == 0 {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }
}

/// Reads from `sock` into `buf` until a header's end: the header, with the
/// bytes after it left in `buf`; `None` if the connection ends first.
pub async fn read_head(sock: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    loop {
        if let Some(pos) = find(buf, b"\r\n\r\n") {
            let head = buf[..pos + 4].to_vec();
            buf.drain(..pos + 4);
            return Some(head);
        }
        let mut tmp = [0u8; 8192];
        let n = sock.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

/// The `Name: value` lines of a message head: the names as spelled on the
/// wire, and (lower-cased name, value) pairs for lookups, both in order.
fn header_lines<'a>(lines: impl Iterator<Item = &'a str>) -> (Vec<String>, Vec<(String, String)>) {
    lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), (k.trim().to_ascii_lowercase(), v.trim().to_string())))
        .unzip()
}

/// Reads body bytes from `sock` into `body` until it holds `n`; a
/// connection that ends first fails the test.
pub async fn read_until(sock: &mut TcpStream, body: &mut Vec<u8>, n: usize) {
    let mut tmp = vec![0; 64 << 10];
    while body.len() < n {
        let k = sock.read(&mut tmp).await.unwrap();
        assert!(k > 0, "cut at {} of {n} bytes", body.len());
        body.extend_from_slice(&tmp[..k]);
    }
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// How many requests an origin is answering.
#[derive(Clone)]
struct Load {
    now: Arc<AtomicUsize>,
    max: Arc<AtomicUsize>,
}

/// One request being answered, from its arrival to its response's last byte
/// (or the connection's end).
struct Answering(Arc<AtomicUsize>);

impl Drop for Answering {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn serve_conn(
    mut sock: TcpStream,
    id: usize,
    handler: Arc<Handler>,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
    written: Arc<AtomicU64>,
    load: Load,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    loop {
        let Some(head) = read_head(&mut sock, &mut buf).await else { return Ok(()) };
        let in_flight = load.now.fetch_add(1, Ordering::SeqCst) + 1;
        load.max.fetch_max(in_flight, Ordering::SeqCst);
        let _answering = Answering(load.now.clone());
        let text = String::from_utf8_lossy(&head).to_string();
        let mut lines = text.split("\r\n");
        let start = lines.next().unwrap_or("");
        let mut parts = start.split(' ');
        let method = parts.next().unwrap_or("").to_string();
        let target = parts.next().unwrap_or("").to_string();
        let (spelled, headers) = header_lines(lines);
        let req = SeenRequest {
            method: method.clone(),
            target,
            headers,
            spelled,
            conn_id: id,
            at: std::time::Instant::now(),
            in_flight,
        };
        seen.lock().unwrap().push(req.clone());
        let is_head = method == "HEAD";
        match handler(&req) {
            Action::Hang => {
                let mut sink = [0u8; 1024];
                while sock.read(&mut sink).await? > 0 {}
                return Ok(());
            }
            Action::Raw(bytes) => {
                sock.write_all(&bytes).await?;
                return Ok(());
            }
            Action::Trickle(lines, pause) => {
                for line in lines {
                    sock.write_all(&line).await?;
                    tokio::time::sleep(pause).await;
                }
                return Ok(());
            }
            Action::Delayed(pause, resp) => {
                tokio::time::sleep(pause).await;
                if !write_response(&mut sock, resp, is_head, &written).await? {
                    return Ok(());
                }
            }
            Action::Respond(resp) => {
                let keep = write_response(&mut sock, resp, is_head, &written).await?;
                if !keep {
                    return Ok(());
                }
            }
        }
    }
}

/// Writes a response; returns whether the connection may be reused.
async fn write_response(sock: &mut TcpStream, resp: Resp, is_head: bool, written: &AtomicU64) -> std::io::Result<bool> {
    let mut head = format!("HTTP/1.1 {} X\r\n", resp.status);
    for (k, v) in &resp.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    let framing = match &resp.body {
        Body::Bytes(b) => format!("Content-Length: {}\r\n", b.len()),
        Body::Pattern { len, .. } | Body::Slow { len, .. } => format!("Content-Length: {len}\r\n"),
        Body::Chunked(_) | Body::ChunkedDie(_) => "Transfer-Encoding: chunked\r\n".to_string(),
        Body::UntilClose(_) => "Connection: close\r\n".to_string(),
        Body::DieAfter { declared, .. } | Body::Stall { declared, .. } | Body::ResetAfter { declared, .. } => {
            format!("Content-Length: {declared}\r\n")
        }
        Body::Empty { content_length: Some(n) } => format!("Content-Length: {n}\r\n"),
        Body::Empty { content_length: None } => String::new(),
    };
    head.push_str(&framing);
    head.push_str("\r\n");
    sock.write_all(head.as_bytes()).await?;
    if is_head {
        return Ok(!matches!(
            resp.body,
            Body::UntilClose(_) | Body::DieAfter { .. } | Body::ChunkedDie(_) | Body::ResetAfter { .. }
        ));
    }
    let count = |n: usize| written.fetch_add(n as u64, Ordering::SeqCst);
    match resp.body {
        Body::Bytes(b) => {
            sock.write_all(&b).await?;
            count(b.len());
            Ok(true)
        }
        Body::Pattern { start, len } => {
            let mut off = start;
            let end = start + len;
            while off < end {
                let n = (end - off).min(65536);
                let piece = pattern(off, n);
                sock.write_all(&piece).await?;
                count(piece.len());
                off += n;
            }
            Ok(true)
        }
        Body::Slow { len, piece, pause } => {
            let mut off = 0;
            while off < len {
                let n = (len - off).min(piece);
                sock.write_all(&pattern(off, n)).await?;
                count(n as usize);
                off += n;
                tokio::time::sleep(pause).await;
            }
            Ok(true)
        }
        Body::Chunked(b) => {
            for piece in b.chunks(1000) {
                sock.write_all(format!("{:x}\r\n", piece.len()).as_bytes()).await?;
                sock.write_all(piece).await?;
                sock.write_all(b"\r\n").await?;
                count(piece.len());
            }
            sock.write_all(b"0\r\n\r\n").await?;
            Ok(true)
        }
        Body::UntilClose(b) => {
            sock.write_all(&b).await?;
            count(b.len());
            Ok(false)
        }
        Body::DieAfter { sent, .. } => {
            sock.write_all(&sent).await?;
            count(sent.len());
            sock.flush().await?;
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok(false)
        }
        Body::ChunkedDie(b) => {
            sock.write_all(format!("{:x}\r\n", b.len()).as_bytes()).await?;
            sock.write_all(&b).await?;
            sock.write_all(b"\r\n").await?;
            count(b.len());
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok(false)
        }
        Body::ResetAfter { sent, .. } => {
            sock.write_all(&sent).await?;
            count(sent.len());
            sock.flush().await?;
            // Let the bytes leave before the reset discards what is unsent.
            tokio::time::sleep(Duration::from_millis(20)).await;
            socket2::SockRef::from(&*sock).set_linger(Some(Duration::ZERO))?;
            Ok(false)
        }
        Body::Stall { sent, .. } => {
            sock.write_all(&sent).await?;
            count(sent.len());
            let mut sink = [0u8; 1024];
            while sock.read(&mut sink).await? > 0 {}
            Ok(false)
        }
        Body::Empty { .. } => Ok(true),
    }
}

/// A file of `total` pattern bytes, with single-range support, ETag and
/// Last-Modified, like a static file server.
pub fn serve_file(req: &SeenRequest, total: u64, content_type: Option<&str>) -> Resp {
    serve_ranged(req, total, content_type, |start, len| Body::Pattern { start, len })
}

/// `data` served like a static file (see [`serve_file`]).
pub fn serve_bytes(req: &SeenRequest, data: &[u8], content_type: Option<&str>) -> Resp {
    serve_ranged(req, data.len() as u64, content_type, |start, len| {
        Body::Bytes(data[start as usize..(start + len) as usize].to_vec())
    })
}

fn serve_ranged(req: &SeenRequest, total: u64, content_type: Option<&str>, body: impl Fn(u64, u64) -> Body) -> Resp {
    let with_meta = |r: Resp| {
        let r = r
            .header("Accept-Ranges", "bytes")
            .header("ETag", "\"v1\"")
            .header("Last-Modified", "Tue, 01 Jul 2025 10:00:00 GMT")
            .header("Cache-Control", "public, max-age=60");
        match content_type {
            Some(ct) => r.header("Content-Type", ct),
            None => r,
        }
    };
    let head = req.method == "HEAD";
    // If-Range with another validator: the whole file, as servers do.
    let current = ["\"v1\"", "Tue, 01 Jul 2025 10:00:00 GMT"];
    let if_range_ok = req.header("if-range").is_none_or(|v| current.contains(&v));
    let range = req.header("range").filter(|_| if_range_ok).and_then(|r| parse_single_range(r, total));
    match (req.header("range").filter(|_| if_range_ok), range) {
        (Some(_), Some((start, end_incl))) => {
            if start >= total {
                return Resp::new(416, Body::Bytes(Vec::new())).header("Content-Range", &format!("bytes */{total}"));
            }
            let end = end_incl.unwrap_or(total - 1).min(total - 1);
            let len = end - start + 1;
            let b = if head { Body::Empty { content_length: Some(len) } } else { body(start, len) };
            with_meta(Resp::new(206, b)).header("Content-Range", &format!("bytes {start}-{end}/{total}"))
        }
        // Unparsable or multi-range: ignore the header, send it all.
        _ => {
            let b = if head { Body::Empty { content_length: Some(total) } } else { body(0, total) };
            with_meta(Resp::new(200, b))
        }
    }
}

/// A single `bytes=A-B`, `bytes=A-` or `bytes=-N` range of a `total`-byte file.
pub fn parse_single_range(v: &str, total: u64) -> Option<(u64, Option<u64>)> {
    let spec = v.strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    if a.is_empty() {
        let n: u64 = b.parse().ok()?;
        return (n > 0).then(|| (total.saturating_sub(n), None));
    }
    let start: u64 = a.parse().ok()?;
    let end = if b.is_empty() { None } else { Some(b.parse().ok()?) };
    Some((start, end))
}

/// A response as the client received it.
#[derive(Debug)]
pub struct Got {
    /// The status line's version (`HTTP/1.1`).
    pub version: String,
    pub status: u16,
    /// Names lower-cased, for lookups.
    pub headers: Vec<(String, String)>,
    /// The header names as they came on the wire, in order.
    pub spelled: Vec<String>,
    pub body: Vec<u8>,
    /// The body ended as its framing said (length reached, last chunk seen,
    /// or close-delimited EOF). False for an aborted response.
    pub complete: bool,
    /// How many chunks a chunked body came in (0 otherwise).
    pub chunks: usize,
}

impl Got {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
    pub fn has(&self, name: &str) -> bool {
        self.header(name).is_some()
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }
}

/// A keep-alive HTTP/1.1 client connection.
pub struct Client {
    sock: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        Client { sock: TcpStream::connect(addr).await.unwrap(), buf: Vec::new() }
    }

    /// Connects from `from` (another loopback address), so the server
    /// sees a client that is not 127.0.0.1.
    pub async fn connect_from(addr: SocketAddr, from: std::net::IpAddr) -> Client {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(SocketAddr::new(from, 0)).unwrap();
        Client { sock: sock.connect(addr).await.unwrap(), buf: Vec::new() }
    }

    pub async fn send_raw(&mut self, raw: &[u8]) {
        self.sock.write_all(raw).await.unwrap();
    }

    /// Sends a request and reads one response.
    pub async fn request(&mut self, method: &str, target: &str, headers: &[(&str, &str)]) -> Got {
        let mut req = format!("{method} {target} HTTP/1.1\r\nHost: proxy.test\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        self.send_raw(req.as_bytes()).await;
        self.read_response(method == "HEAD").await
    }

    pub async fn read_response(&mut self, head_request: bool) -> Got {
        let head = read_head(&mut self.sock, &mut self.buf).await.expect("response header");
        let text = String::from_utf8_lossy(&head).to_string();
        let mut lines = text.split("\r\n");
        let mut status_line = lines.next().unwrap().split(' ');
        let version = status_line.next().unwrap().to_string();
        let status: u16 = status_line.next().unwrap().parse().unwrap();
        let (spelled, headers) = header_lines(lines);
        let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        let mut got =
            Got { version, status, headers: headers.clone(), spelled, body: Vec::new(), complete: true, chunks: 0 };
        if head_request || status == 204 || status == 304 || (100..200).contains(&status) {
            return got;
        }
        if get("transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
            got.complete = self.read_chunked(&mut got.body, &mut got.chunks).await;
        } else if let Some(cl) = get("content-length") {
            let cl: usize = cl.parse().unwrap();
            got.complete = self.read_exact_or_eof(cl, &mut got.body).await;
        } else {
            self.read_to_eof(&mut got.body).await;
        }
        got
    }

    async fn fill(&mut self) -> bool {
        let mut tmp = vec![0u8; 65536];
        match self.sock.read(&mut tmp).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&tmp[..n]);
                true
            }
        }
    }

    async fn read_exact_or_eof(&mut self, n: usize, out: &mut Vec<u8>) -> bool {
        while out.len() + self.buf.len() < n {
            if !self.fill().await {
                out.append(&mut self.buf);
                return false;
            }
        }
        let take = n - out.len();
        out.extend(self.buf.drain(..take));
        true
    }

    async fn read_to_eof(&mut self, out: &mut Vec<u8>) {
        while self.fill().await {}
        out.append(&mut self.buf);
    }

    async fn read_line(&mut self) -> Option<String> {
        loop {
            if let Some(p) = find(&self.buf, b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..p]).to_string();
                self.buf.drain(..p + 2);
                return Some(line);
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    async fn read_chunked(&mut self, out: &mut Vec<u8>, chunks: &mut usize) -> bool {
        loop {
            let Some(line) = self.read_line().await else { return false };
            let Ok(size) = usize::from_str_radix(line.split(';').next().unwrap().trim(), 16) else { return false };
            if size == 0 {
                // trailers until empty line
                loop {
                    match self.read_line().await {
                        Some(l) if l.is_empty() => return true,
                        Some(_) => continue,
                        None => return false,
                    }
                }
            }
            *chunks += 1;
            let mut chunk = Vec::new();
            if !self.read_exact_or_eof(size, &mut chunk).await {
                out.extend(chunk);
                return false;
            }
            out.extend(chunk);
            if self.read_line().await.is_none() {
                return false;
            }
        }
    }

    /// Whether the server closed this connection (reads EOF within `wait`).
    pub async fn is_closed(&mut self, wait: Duration) -> bool {
        let mut tmp = [0u8; 1];
        matches!(tokio::time::timeout(wait, self.sock.read(&mut tmp)).await, Ok(Ok(0)) | Ok(Err(_)))
    }

    pub fn into_inner(self) -> TcpStream {
        self.sock
    }
}

/// One request on a fresh connection.
pub async fn get(addr: SocketAddr, method: &str, target: &str, headers: &[(&str, &str)]) -> Got {
    Client::connect(addr).await.request(method, target, headers).await
}

/// `n` concurrent requests for one target, each on a fresh connection (a
/// crowd of viewers). The caller awaits the handles, and may act while
/// they run (a first viewer leaving, say).
pub fn spawn_gets(n: usize, addr: SocketAddr, method: &'static str, target: &str) -> Vec<tokio::task::JoinHandle<Got>> {
    (0..n)
        .map(|_| {
            let target = target.to_string();
            tokio::spawn(async move { get(addr, method, &target, &[]).await })
        })
        .collect()
}

/// The proxy, in-process on an ephemeral port.
pub struct Proxy {
    pub server: Embedded,
    pub cfg: Config,
}

/// Set to `off` (scripts/test.sh runs the suite a second time so), every
/// proxy a test starts without a `cache:` key of its own runs with
/// `cache.max_bytes: 0`: the suite passes with the cache on (the default)
/// and off.
pub const CACHE_ENV: &str = "ANIBRIDGE_TEST_CACHE";

/// Whether the proxies of this run cache (see [`CACHE_ENV`]).
pub fn cache_on() -> bool {
    std::env::var(CACHE_ENV).map_or(true, |v| v != "off")
}

/// `yaml` as this run configures it: with the cache turned off when the
/// run says so and the test did not choose.
pub fn with_run_cache(yaml: &str) -> String {
    if cache_on() || yaml.lines().any(|l| l.starts_with("cache:")) {
        yaml.to_string()
    } else {
        format!("{yaml}\ncache: {{max_bytes: 0}}\n")
    }
}

impl Proxy {
    /// `yaml` is the whole config; `SECRET` is available as the env secret.
    pub async fn start(yaml: &str) -> Proxy {
        let yaml = with_run_cache(yaml);
        let cfg =
            Config::from_yaml("test.yaml", &yaml, |k| (k == "ANIBRIDGE_PROXY_SECRET").then(|| SECRET.to_string()))
                .expect("test config is valid");
        let server = Embedded::start(&cfg).await.expect("proxy starts");
        Proxy { server, cfg }
    }

    /// Open mode, loopback origins allowed.
    pub async fn open() -> Proxy {
        Self::open_with("").await
    }

    /// The same, with more of the config (whole YAML lines).
    pub async fn open_with(more: &str) -> Proxy {
        Self::start(&format!("auth: {{mode: none}}\negress: {{allow_cidrs: [\"127.0.0.0/8\"]}}\n{more}")).await
    }

    /// Token mode (secret `SECRET`), loopback origins allowed.
    pub async fn token() -> Proxy {
        Self::start("auth: {mode: token}\negress: {allow_cidrs: [\"127.0.0.0/8\"]}\n").await
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    /// The value of the series `name` (with its labels) in `/metrics`.
    pub fn metric(&self, name: &str) -> f64 {
        let text = String::from_utf8(self.server.metrics.render()).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
    }
}

/// `/strm/proxy/{hint}?u=...` (unsigned).
pub fn relay_path(hint: &str, upstream: &str) -> String {
    format!("/strm/proxy/{hint}?{}", Query(vec![("u".into(), upstream.into())]).encode())
}

/// A static route's `path` (as the proxy receives it, percent-encoded) with
/// the query `params` and a `sig` over them made with `SECRET`, the path
/// bound in as `_path` (decoded), as a route verifies in token mode.
pub fn signed_route_path(path: &str, params: &[(&str, &str)]) -> String {
    let mut q = Query(params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
    let mut bound = q.clone();
    bound.0.push(("_path".into(), anibridge_proxy::routing::decoded_path(path)));
    q.0.push(("sig".into(), sign(SECRET.as_bytes(), &bound)));
    format!("{path}?{}", q.encode())
}

/// `/strm/proxy/{hint}?u=...&exp=...&sig=...` signed with `SECRET`.
pub fn signed_relay_path(hint: &str, upstream: &str, exp: Option<u64>) -> String {
    let mut q = Query(vec![("u".into(), upstream.into())]);
    if let Some(e) = exp {
        q.0.push(("exp".into(), e.to_string()));
    }
    let s = sign(SECRET.as_bytes(), &q);
    q.0.push(("sig".into(), s));
    format!("/strm/proxy/{hint}?{}", q.encode())
}

/// A free loopback port to start something on (bound, learned, released).
///
/// A port the kernel hands out for port 0 and released here could be handed
/// at once to a socket a test beside this one binds to port 0 or connects
/// from, before the server given it binds (seen in CI). So ports
/// come from outside the kernel's ephemeral range, where it puts none of
/// its own, counted up from a point set by the process id so that no two
/// callers in this process get the same one; each is checked free by
/// binding it.
pub fn unused_addr() -> std::net::SocketAddr {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let ports = ports_outside_the_ephemeral_range();
    let start = std::process::id() as usize * 7_919;
    for _ in 0..ports.len() {
        let port = ports[(start + NEXT.fetch_add(1, Ordering::Relaxed)) % ports.len()];
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            return l.local_addr().unwrap();
        }
    }
    panic!("no free loopback port outside the ephemeral range");
}

/// 10 000 up to the kernel's ephemeral range, or above it when that starts
/// lower.
fn ports_outside_the_ephemeral_range() -> &'static [u16] {
    static PORTS: std::sync::OnceLock<Vec<u16>> = std::sync::OnceLock::new();
    PORTS.get_or_init(|| {
        let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
        let mut bounds = range.split_whitespace().filter_map(|n| n.parse::<u16>().ok());
        let (low, high) = (bounds.next().unwrap_or(32_768), bounds.next().unwrap_or(60_999));
        if low >= 15_000 {
            (10_000..low).collect()
        } else {
            (high.saturating_add(1)..=u16::MAX).collect()
        }
    })
}

/// A loopback port that refuses connections for as long as this value
/// lives: a TCP socket bound without `listen`, so the kernel answers a SYN
/// with a reset, and without `SO_REUSEADDR`, so no other socket (the tests
/// beside this one bind with it) can take the port meanwhile. A port merely
/// released once was taken by another test's proxy in CI, and the "refused"
/// upstream answered 404.
pub struct RefusedPort(socket2::Socket);

impl RefusedPort {
    pub fn bind() -> Self {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
        RefusedPort(s)
    }

    pub fn addr(&self) -> SocketAddr {
        self.0.local_addr().unwrap().as_socket().unwrap()
    }
}

pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// Counts of requests per path, for assertions.
pub fn per_path(origin: &Origin) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for r in origin.requests() {
        *m.entry(r.path().to_string()).or_insert(0) += 1;
    }
    m
}
