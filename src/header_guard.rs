//! Bounds on how a client sends a request header: in time and in size.
//!
//! Pingora reads a request's header before any hook runs, with a timeout
//! per read (60 s) and up to 1 MiB of it. A client that sends one byte
//! every 59 s (slowloris) would hold its connection, and a file
//! descriptor, for as long as it likes, and a megabyte of header costs a
//! megabyte per connection. nginx bounds both: `client_header_timeout`
//! (60 s for the whole header) and `large_client_header_buffers` (32 KiB).
//!
//! Here every client connection is wrapped before Pingora sees it
//! ([`HeaderGuard`], [`Guarded`]): once the first byte of a request's header
//! has arrived, the header must be complete within
//! `downstream.header_timeout` and [`MAX_HEADER_BYTES`], and a new
//! connection must send its first byte within that time too (nginx's
//! `client_header_timeout` counts from the connect). Past the time, the
//! read fails and Pingora closes the connection, as nginx does; past the
//! size, Pingora answers `400` (nginx's answer too) and the connection
//! lingers at its close until the client stops sending. Either refusal is counted
//! (`anibridge_client_headers_refused_total`; Pingora's own line about it
//! is a debug line, as for any client gone before its header was whole,
//! and this guard says one at most once a minute: a flood of them must not
//! flood the log). Pingora answers a header it
//! cannot parse with a 400 of its own, before any hook of the proxy runs:
//! that answer is the one thing written before a request began, and it is
//! counted here too (`malformed`), as nothing else would say it. The request path
//! says when a header is complete and when its answer is done ([`began`],
//! [`ended`]), so neither the time an answer takes, nor what the client
//! sends meanwhile, nor a keep-alive connection's idle time (which
//! `downstream.keepalive_timeout` bounds) counts. No byte is parsed here:
//! only counted and timed. A request's body, never forwarded, is read and
//! dropped within the same time ([`read_request_body`]).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::http::ServerSession;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream, TimingDigest,
    UniqueID, UniqueIDType, ALPN,
};
use pingora::server::ShutdownWatch;
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use crate::connections::{Admitted, Connections};
use crate::log_writer::OnceAMinute;
use crate::metrics::Metrics;

/// The most a request's header may take, in bytes read for it (nginx
/// allows 32 KiB; browsers and players send well under 8 KiB).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Why a connection was closed (the `reason` of
/// `anibridge_client_headers_refused_total`).
#[derive(Debug, Clone, Copy)]
pub enum Refused {
    Timeout,
    TooLarge,
    /// Pingora could not parse the header and answered 400 itself, before
    /// any hook of the proxy ran (so no access line says it).
    Malformed,
}

impl Refused {
    pub const LABELS: [&'static str; 3] = ["timeout", "too_large", "malformed"];
}

/// The bounds, shared by every connection of a listener.
#[derive(Debug)]
struct Limits {
    timeout: Duration,
    /// By [`Refused`].
    refused: [IntCounter; 3],
    /// Lets a refusal be said in the log at most once a minute.
    said: OnceAMinute,
}

impl Limits {
    /// Says a refusal in the log, at most once a minute: the operator's cue
    /// (a player getting an empty 400, a front proxy sending huge cookies)
    /// that no access line gives, since no request began; a flood of them
    /// only counts.
    fn say(&self, why: Refused, client: Option<String>) {
        if !self.said.due() {
            return;
        }
        let what = match why {
            Refused::Timeout => format!("not whole within downstream.header_timeout ({:?}); closed", self.timeout),
            Refused::TooLarge => format!("over {MAX_HEADER_BYTES} bytes; answered 400"),
            Refused::Malformed => "not valid HTTP/1.1; answered 400".to_string(),
        };
        log::info!(
            "a request header from {} was refused: {what} (more this minute are only counted in \
             anibridge_client_headers_refused_total)",
            client.as_deref().unwrap_or("a client")
        );
    }
}

/// A Pingora application whose client connections are [`Guarded`].
pub struct HeaderGuard<A> {
    app: Arc<A>,
    limits: Arc<Limits>,
    /// The slots its connections take, if they are bounded.
    connections: Option<Arc<Connections>>,
}

impl<A> HeaderGuard<A> {
    /// `app`, with each request header bounded to `timeout` from its first
    /// byte; connections closed for it are counted in `metrics`.
    pub fn new(app: A, timeout: Duration, metrics: &Metrics) -> HeaderGuard<A> {
        let refused = Refused::LABELS.map(|r| metrics.client_headers_refused.with_label_values(&[r]));
        let limits = Limits { timeout, refused, said: OnceAMinute::new() };
        HeaderGuard { app: Arc::new(app), limits: Arc::new(limits), connections: None }
    }

    /// Each connection takes one of `connections`' slots for its life.
    pub fn with_slots(mut self, connections: Arc<Connections>) -> HeaderGuard<A> {
        self.connections = Some(connections);
        self
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for HeaderGuard<A> {
    async fn process_new(self: &Arc<Self>, stream: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        let admitted = match &self.connections {
            // No slot: the connection is dropped, closed unanswered.
            Some(connections) => Some(connections.admit().await?),
            None => None,
        };
        self.app.process_new(Box::new(Guarded::new(stream, self.limits.clone(), admitted)), shutdown).await
    }

    async fn cleanup(&self) {
        self.app.cleanup().await
    }
}

/// A client connection whose request headers are bounded; everything else
/// passes through to the connection it wraps.
#[derive(Debug)]
pub struct Guarded {
    inner: Stream,
    limits: Arc<Limits>,
    /// Raised by [`began`] and [`ended`]: odd while a request is answered.
    phase: AtomicU32,
    /// `phase` when `header` was last looked at.
    seen: u32,
    /// The header being read, once its first byte is in.
    header: Option<Header>,
    /// Until the connection's first byte: the deadline for it, armed when
    /// a first read finds nothing.
    silent: Option<Pin<Box<Sleep>>>,
    /// Its slot among the listener's connections, given back when it is
    /// dropped (the connection's end).
    admitted: Option<Admitted>,
    /// Set when its header was refused (too large, or answered 400 as
    /// malformed): its close waits for the client to stop sending, at most
    /// [`LINGER`].
    linger: Option<Linger>,
}

#[derive(Debug, Default)]
struct Linger {
    /// Its sending side is closed (the answer is out).
    shut: bool,
    until: Option<Pin<Box<Sleep>>>,
}

#[derive(Debug)]
struct Header {
    started: Instant,
    bytes: usize,
    /// Armed when the header needs a second read (most arrive in one).
    deadline: Option<Pin<Box<Sleep>>>,
    /// Counted in `anibridge_client_headers_refused_total` already.
    counted: bool,
}

impl Guarded {
    fn new(inner: Stream, limits: Arc<Limits>, admitted: Option<Admitted>) -> Guarded {
        Guarded { inner, limits, phase: AtomicU32::new(0), seen: 0, header: None, silent: None, admitted, linger: None }
    }

    fn of(down: &ServerSession) -> Option<&Guarded> {
        match down {
            ServerSession::H1(s) => s.stream().as_any().downcast_ref::<Guarded>(),
            _ => None,
        }
    }

    /// Moves to the next phase if `answering` says it is the other one.
    fn turn(&self, answering: bool) {
        // Only the connection's own task reads and turns it.
        let phase = self.phase.load(Ordering::Relaxed);
        if (phase % 2 == 1) != answering {
            self.phase.store(phase.wrapping_add(1), Ordering::Relaxed);
            if let Some(a) = &self.admitted {
                if answering {
                    a.slot.busy()
                } else {
                    a.slot.idle()
                }
            }
        }
    }

    /// The header read so far is over a bound: the error that ends the
    /// connection (counted).
    fn over(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        let header = self.header.as_mut()?;
        let timeout = self.limits.timeout;
        let (why, e) = if header.bytes > MAX_HEADER_BYTES {
            let e = io::Error::new(io::ErrorKind::InvalidData, format!("request header over {MAX_HEADER_BYTES} bytes"));
            (Refused::TooLarge, e)
        } else {
            let deadline = header
                .deadline
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until((header.started + timeout).into())));
            // Polled, so that the connection's task wakes when it passes.
            if deadline.as_mut().poll(cx).is_pending() {
                return None;
            }
            let e = io::Error::new(io::ErrorKind::TimedOut, format!("request header not complete within {timeout:?}"));
            (Refused::Timeout, e)
        };
        self.count(why);
        Some(e)
    }

    /// Nothing has come since the connection was accepted: the error that
    /// ends it once `downstream.header_timeout` has passed so, as nginx's
    /// `client_header_timeout` does (Pingora alone waits 60 s for a first
    /// request whatever the setting). Not a refused header: not counted.
    #[cold]
    fn silent(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        let timeout = self.limits.timeout;
        let deadline = self.silent.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if deadline.as_mut().poll(cx).is_pending() {
            return None;
        }
        Some(io::Error::new(io::ErrorKind::TimedOut, format!("no request within {timeout:?} of the connect")))
    }

    /// Something is written: if no request began since this header's first
    /// byte, it is Pingora's own answer to a header it could not parse.
    fn writing(&mut self) {
        // `seen` is only ever an even phase (taken while reading a header).
        if self.phase.load(Ordering::Relaxed) == self.seen && self.header.is_some() {
            self.malformed();
        }
    }

    #[cold]
    fn malformed(&mut self) {
        self.count(Refused::Malformed);
        // What the client sends after it is not read.
        self.linger.get_or_insert_with(Linger::default);
    }

    /// The header read into `buf` (from `before` on) is over the size bound.
    /// nginx answers a header too large with a 400. Pingora answers one it
    /// cannot parse so, but a failed read with nothing: what was read is
    /// handed on as one byte no header may hold (NUL), and the connection
    /// lingers at its close for that 400 to be read (`poll_shutdown`).
    #[cold]
    fn too_large(&mut self, buf: &mut ReadBuf<'_>, before: usize) {
        self.count(Refused::TooLarge);
        self.linger = Some(Linger::default());
        buf.set_filled(before);
        buf.put_slice(&[0]);
    }

    /// Counts the header being read as refused for `why`, once.
    fn count(&mut self, why: Refused) {
        if let Some(header) = self.header.as_mut().filter(|h| !h.counted) {
            header.counted = true;
            self.limits.refused[why as usize].inc();
            let client = self.inner.get_socket_digest().and_then(|d| d.peer_addr().map(ToString::to_string));
            self.limits.say(why, client);
        }
    }
}

/// Reads a request's body, which means nothing here (it is never
/// forwarded), before it is answered: read later, by Pingora after the
/// answer, it would count as the start of the next request's header. Up to
/// 64 KiB, and for at most `downstream.header_timeout` (Pingora's own
/// timeout is per read: a client sending a byte now and then would hold
/// the connection for good); past either the connection is closed after
/// the answer instead of reading on.
pub async fn read_request_body(down: &mut ServerSession) -> pingora_error::Result<()> {
    if down.is_body_done() {
        return Ok(());
    }
    let within = Guarded::of(down).map_or(Duration::from_secs(60), |g| g.limits.timeout);
    let whole = tokio::time::timeout(within, read_small_body(down)).await.unwrap_or(Ok(false))?;
    if !whole {
        down.set_keepalive(None);
    }
    Ok(())
}

/// Reads the request body to its end if it is at most 64 KiB: whether it was.
async fn read_small_body(down: &mut ServerSession) -> pingora_error::Result<bool> {
    let mut left: usize = 64 * 1024;
    while !down.is_body_done() {
        match down.read_request_body().await? {
            Some(b) if b.len() <= left => left -= b.len(),
            Some(_) => return Ok(false),
            None => break,
        }
    }
    Ok(true)
}

/// The request's header is complete: what this connection reads until
/// [`ended`] is not bounded here.
pub fn began(down: &ServerSession) {
    if let Some(g) = Guarded::of(down) {
        g.turn(true);
    }
}

/// The request is answered: the next bytes start the next header.
pub fn ended(down: &ServerSession) {
    if let Some(g) = Guarded::of(down) {
        g.turn(false);
    }
}

impl AsyncRead for Guarded {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let phase = this.phase.load(Ordering::Relaxed);
        if phase % 2 == 1 {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        if phase != this.seen {
            // A request was answered since: this is the next header.
            this.seen = phase;
            this.header = None;
        }
        if let Some(e) = this.over(cx) {
            return Poll::Ready(Err(e));
        }
        // Between requests, asked to close to make room: when no byte of a
        // next request is there, an end of stream, as if the client had
        // closed. A request already under way is read and answered first.
        let slot = this.admitted.as_ref().filter(|_| this.header.is_none()).map(|a| &a.slot);
        let before = buf.filled().len();
        let read = Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if let Some(slot) = slot {
            if n > 0 {
                slot.busy();
            } else if read.is_pending() && slot.closing(cx.waker()) {
                return Poll::Ready(Ok(()));
            }
        }
        if n == 0 && phase == 0 && this.header.is_none() && read.is_pending() {
            if let Some(e) = this.silent(cx) {
                return Poll::Ready(Err(e));
            }
        }
        if n > 0 {
            if phase == 0 {
                this.silent = None;
            }
            let header = this.header.get_or_insert_with(|| Header {
                started: Instant::now(),
                bytes: 0,
                deadline: None,
                counted: false,
            });
            header.bytes += n;
            if header.bytes > MAX_HEADER_BYTES {
                this.too_large(buf, before);
                return Poll::Ready(Ok(()));
            }
        }
        read
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.writing();
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.writing();
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some(linger) = this.linger.as_mut() else {
            return Pin::new(&mut this.inner).poll_shutdown(cx);
        };
        if !linger.shut {
            ready!(Pin::new(&mut this.inner).poll_shutdown(cx))?;
            linger.shut = true;
        }
        let until = linger.until.get_or_insert_with(|| Box::pin(tokio::time::sleep(LINGER)));
        let mut dropped = [0u8; 16 * 1024];
        while until.as_mut().poll(cx).is_pending() {
            let mut buf = ReadBuf::new(&mut dropped);
            match Pin::new(&mut this.inner).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => continue,
                // The client is done sending (or gone).
                Poll::Ready(_) => break,
                Poll::Pending => return Poll::Pending,
            }
        }
        this.linger = None;
        Poll::Ready(Ok(()))
    }
}

/// How long a connection whose header was refused is read (and what
/// arrives dropped) after its 400 is sent and its sending side closed. A
/// socket closed while bytes it has not read are waiting, or still
/// arriving, answers with a reset: a client still sending then fails its
/// write (a broken pipe) and most stop there without reading the 400, and
/// some systems drop what was received but not yet read. nginx's
/// `lingering_close` is the same remedy.
const LINGER: Duration = Duration::from_secs(2);

#[async_trait]
impl Shutdown for Guarded {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for Guarded {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Guarded {
    fn get_ssl(&self) -> Option<&pingora::protocols::tls::TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for Guarded {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for Guarded {
    fn get_proxy_digest(&self) -> Option<Arc<pingora::protocols::raw_connect::ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: pingora::protocols::raw_connect::ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for Guarded {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for Guarded {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}
