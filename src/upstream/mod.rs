//! The upstream client: egress check on the dialled address, Pingora's
//! connector and HTTP/1.1 client session over this crate's idle connection
//! [`Pool`], redirects followed server-side, and the HEAD → `GET` + `Range`
//! fallback. [`Client::open`] returns a [`Response`] with its header read and
//! its body still on the wire; the response owns its connection.

mod dial;
mod error;
mod pool;
mod request;
mod response;
pub mod resume;

use std::borrow::Cow;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::{Method, StatusCode};
use pingora::connectors::TransportConnector;
use pingora::protocols::http::v1::client::HttpSession;
use pingora::upstreams::peer::{HttpPeer, Peer};
use pingora_error::{Error, ErrorType};
use pingora_http::RequestHeader;
use url::Url;

pub use error::{Cause, FetchError};
pub use pool::Pool;
pub(crate) use request::Ask;
use request::Hop;
pub use request::Request;
pub use response::{is_logged_body_failure, BodyError, Response};

use crate::dns::Dns;
use crate::egress::Egress;
use crate::gate::{self, Gate, Permit};
use crate::headers::{self, WireHeader};
use crate::metrics::Metrics;
use crate::providers::Providers;
use crate::tunnel::EgressProxies;

/// Per-phase upstream limits.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub read: Duration,
    pub write: Duration,
}

/// What [`Client::open`] asks for `req`: a playlist whole (as a `GET`),
/// anything else as the client asked.
fn asked(mut req: Request) -> (Request, Ask) {
    if req.whole {
        req.method = Method::GET;
        (req, Ask::Whole)
    } else {
        (req, Ask::Client)
    }
}

/// How long an idle pooled upstream connection is kept.
const POOL_IDLE: Duration = Duration::from_secs(30);
/// Redirect and error bodies up to this size are drained so the connection
/// can go back to the pool; larger ones close it.
const DRAIN_LIMIT: usize = 16 * 1024;

/// An exchange with its response header read, on its connection.
pub(crate) struct Exchange {
    session: HttpSession,
    /// The connection's key in the pool (its peer's `reuse_hash`).
    pool_key: u64,
    /// The method of the last hop (GET after the HEAD fallback).
    method: Method,
    /// The final URL, when redirects led away from the request's.
    redirected_to: Option<Url>,
    head_fallback: bool,
    redirects: u32,
    /// The slot at the host that answered.
    permit: Option<Permit>,
}

impl Exchange {
    /// The slot to keep for another try at the same host after this answer
    /// was not the one wanted — none after a refusal (`429`, `509`, `503`
    /// with `Retry-After`): that try waits at the gate like any request,
    /// for the cooldown the refusal started and then for a slot under the
    /// limit it taught. Kept, the slot would send it during the cooldown,
    /// beside the request the host was busy with, to be refused again.
    pub(crate) fn slot_for_another_try(&mut self) -> Option<Permit> {
        let refused = self.session.resp_header().is_none_or(gate::is_refusal);
        if refused {
            None
        } else {
            self.permit.take()
        }
    }
}

/// Everything the client is configured with.
pub struct Settings {
    pub egress: Egress,
    pub providers: Providers,
    pub timeouts: Timeouts,
    pub max_redirects: u32,
    pub default_ua: Option<HeaderValue>,
    pub pool_size: usize,
    /// Resumptions of one response whose upstream died mid-body.
    pub resume_attempts: u32,
    /// Egress proxies by upstream host (none: every connection is direct).
    pub proxies: EgressProxies,
    /// Connection limits and cooldowns per host.
    pub gate: gate::Settings,
    /// This process's listeners: a connection that reaches one is refused
    /// (`egress::own_listener_reached`), whatever else allows it.
    pub own_listeners: Arc<[SocketAddr]>,
}

impl Settings {
    /// Public destinations only, direct, no profiles, no resumption; five
    /// redirects, 64 idle connections. Fields are set over it as needed.
    pub fn plain(timeouts: Timeouts) -> Settings {
        Settings {
            egress: Egress::default(),
            providers: Providers::default(),
            timeouts,
            max_redirects: 5,
            default_ua: None,
            pool_size: 64,
            resume_attempts: 0,
            proxies: EgressProxies::default(),
            gate: gate::Settings::default(),
            own_listeners: Arc::new([]),
        }
    }
}

/// Dials upstreams with Pingora's connector; finished connections wait in
/// one shared [`Pool`] for the next request to the same peer. A cheap
/// handle (clones share everything), so a [`Response`] owns one and can
/// outlive the request that opened it (a cache fill goes on without it).
#[derive(Clone)]
pub struct Client(Arc<Shared>);

/// What every handle of a [`Client`] shares.
pub struct Shared {
    connector: TransportConnector,
    pool: Arc<Pool>,
    /// Host names resolved recently (the egress check still runs every time).
    dns: Dns,
    /// Addresses where a connect failed lately, dialled last.
    failed: dial::Failed,
    settings: Settings,
    gate: Gate,
    metrics: Option<Arc<Metrics>>,
}

impl std::ops::Deref for Client {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl Client {
    /// `metrics` counts connections and resumptions (none for the resolver's own client).
    pub fn new(settings: Settings, metrics: Option<Arc<Metrics>>) -> Client {
        // Pingora's own pool stays empty: nothing is released into it.
        let opts = pingora::connectors::ConnectorOptions::new(0);
        Client(Arc::new(Shared {
            connector: TransportConnector::new(Some(opts)),
            pool: Pool::new(settings.pool_size, POOL_IDLE),
            dns: Dns::default(),
            failed: dial::Failed::default(),
            gate: Gate::new(settings.gate.clone(), metrics.clone()),
            settings,
            metrics,
        }))
    }

    /// The headers the proxy adds to `req` of its own (the provider
    /// profile of its host, then the resolver's): with the URL, what tells
    /// one upstream fetch from another.
    pub fn added_headers<'a>(&'a self, req: &'a Request) -> impl Iterator<Item = &'a WireHeader> {
        let profile = self.settings.providers.headers_for(req.url.host_str().unwrap_or_default());
        profile.iter().chain(req.extra.as_deref().map_or(&[][..], |r| &r.headers[..]))
    }

    /// The client's headers as they go upstream for this configuration.
    pub fn forwarded(&self, client: &http::HeaderMap) -> Vec<WireHeader> {
        headers::forwarded_request_headers(client, self.settings.default_ua.as_ref())
    }

    /// Opens the response for `req`, following redirects and falling back
    /// from HEAD to a ranged GET when the upstream refuses HEAD. Timed here
    /// (`anibridge_upstream_header_seconds`), where every caller passes: a
    /// request going upstream alone and a cache fill alike. (Not `async`
    /// itself, so a request's future holds only the one of `open_asking`.)
    pub fn open(&self, req: Request) -> impl Future<Output = Result<Response, FetchError>> + Send + '_ {
        let (req, ask) = asked(req);
        self.open_asking(req, ask)
    }

    /// [`Client::open`] on `held`, a slot at the request's host it holds
    /// already (lent to it: [`crate::gate::Lent`]), if any, instead of one
    /// it waits for at the gate.
    pub fn open_on(
        &self,
        req: Request,
        held: Option<Permit>,
    ) -> impl Future<Output = Result<Response, FetchError>> + Send + '_ {
        let (req, ask) = asked(req);
        self.open_asking_on(req, ask, held)
    }

    /// [`Client::open`] asking for `ask` in place of what `req` asks: a seek
    /// answered from a cache fill that goes on upstream asks for the rest of
    /// its range as a resumption does (`Range` and `If-Range`).
    /// (Without a slot held: a parameter the common path never uses would
    /// widen every request's future.)
    pub(crate) async fn open_asking(&self, req: Request, ask: Ask) -> Result<Response, FetchError> {
        let started = Instant::now();
        let ex = self.fetch(&req, ask, None).await?;
        Ok(self.opened(started, ex, req))
    }

    /// [`Client::open_asking`] on `held`, if any ([`Client::open_on`]).
    pub(crate) async fn open_asking_on(
        &self,
        req: Request,
        ask: Ask,
        held: Option<Permit>,
    ) -> Result<Response, FetchError> {
        let started = Instant::now();
        let ex = self.fetch(&req, ask, held).await?;
        Ok(self.opened(started, ex, req))
    }

    /// The response of `ex`, whose exchange began at `started` (timed).
    fn opened(&self, started: Instant, ex: Exchange, req: Request) -> Response {
        if let Some(m) = &self.metrics {
            m.upstream_header_seconds.observe(started.elapsed().as_secs_f64());
        }
        Response::new(self, ex, req, self.settings.resume_attempts)
    }

    /// Fetches `req` asking for `ask`: each hop through its host's gate
    /// (`held`: a slot this request holds already, kept while the hops stay
    /// on its host), redirects, the HEAD fallback.
    pub(crate) async fn fetch(
        &self,
        req: &Request,
        mut ask: Ask,
        held: Option<Permit>,
    ) -> Result<Exchange, FetchError> {
        let mut method = match ask {
            Ask::Client => req.method.clone(),
            _ => Method::GET,
        };
        // Borrowed until a redirect leads elsewhere: no copy per request.
        let mut url = Cow::Borrowed(&req.url);
        let mut head_fallback = false;
        let mut redirects = 0u32;
        let mut permit = held;
        loop {
            let host = crate::gate::same_host(url.host_str().unwrap_or_default());
            if permit.as_ref().is_none_or(|p| p.host() != host) {
                // Released before waiting at the next host's gate.
                drop(permit.take());
                permit = Some(self.gate.enter(host).await.map_err(FetchError::Gate)?);
            } else if self.gate.is_cooling(host) {
                // A slot held already (a body continued, a slot lent by a
                // cache download, or lent back to it) sends nothing while
                // the host cools down either.
                Box::pin(self.gate.cooled(permit.as_ref().expect("held"))).await.map_err(FetchError::Gate)?;
            }
            let permit_here = permit.as_ref().expect("entered above");
            let trusted = req.trusted.as_ref().is_some_and(|t| t.origin() == url.origin());
            let hop = Hop { method: &method, url: &url, req, ask: &ask };
            let (session, peer, reused) = self.exchange(&hop, trusted).await.map_err(|e| e.at(&url))?;
            self.count_connection(reused);
            let status = session.resp_header().map(|h| h.status).unwrap_or(StatusCode::BAD_GATEWAY);
            let retry_after = session.resp_header().and_then(|h| h.headers.get(header::RETRY_AFTER));
            self.gate.answered(permit_here, status, retry_after);

            // The `finish`es below are boxed: redirects and the HEAD fallback
            // are rare, and an inline drain future would triple the size of
            // every request's future (moved and copied on each request).
            if is_redirect(status) {
                if redirects >= self.settings.max_redirects {
                    Box::pin(self.finish(session, peer.reuse_hash())).await;
                    return Err(FetchError::TooManyRedirects);
                }
                let next = session
                    .resp_header()
                    .and_then(|h| h.headers.get(header::LOCATION))
                    .and_then(|l| url.join(location_text(l).trim()).ok())
                    .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
                Box::pin(self.finish(session, peer.reuse_hash())).await;
                let Some(next) = next else { return Err(FetchError::BadRedirect) };
                if status == StatusCode::SEE_OTHER && method != Method::HEAD {
                    method = Method::GET;
                }
                log::debug!("following {} redirect to {}", status.as_u16(), next.host_str().unwrap_or(""));
                if let Some(m) = &self.metrics {
                    m.redirects.inc();
                }
                url = Cow::Owned(next);
                redirects += 1;
                continue;
            }

            if method == Method::HEAD && matches!(status, StatusCode::METHOD_NOT_ALLOWED | StatusCode::NOT_IMPLEMENTED)
            {
                Box::pin(self.finish(session, peer.reuse_hash())).await;
                method = Method::GET;
                ask = Ask::HeadProbe;
                head_fallback = true;
                continue;
            }

            let pool_key = peer.reuse_hash();
            let redirected_to = match url {
                Cow::Owned(u) => Some(u),
                Cow::Borrowed(_) => None,
            };
            return Ok(Exchange { session, pool_key, method, redirected_to, head_fallback, redirects, permit });
        }
    }

    fn count_connection(&self, reused: bool) {
        if let Some(m) = &self.metrics {
            m.count_upstream_connection(reused);
        }
    }

    /// The per-host gate every upstream request passes.
    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    pub(crate) fn metrics(&self) -> Option<&Metrics> {
        self.metrics.as_deref()
    }

    /// One request/response header exchange on a pooled connection. A
    /// reused connection that fails before any response byte is retried
    /// once on a fresh one (the server may have closed it while idle).
    async fn exchange(&self, hop: &Hop<'_>, trusted: bool) -> Result<(HttpSession, HttpPeer, bool), FetchError> {
        let url = hop.url;
        // Chosen again on every hop: a redirect may lead elsewhere.
        let via = self.settings.proxies.pick(url.host_str().unwrap_or_default());
        // One budget for the name lookup and the connect.
        let connect = self.settings.timeouts.connect;
        let mut deadline = std::time::Instant::now() + connect;
        let dialable = self.dialable(url, via, trusted, connect).await?;

        let mut fresh_only = false;
        loop {
            let pooled = if fresh_only { None } else { self.pooled(dialable.as_slice(), url, via) };
            let (mut session, peer, reused) = match pooled {
                Some((stream, peer)) => (HttpSession::new_with_options(stream, &peer), peer, true),
                None => {
                    // Boxed: a new connection is the rare path, and its
                    // future (peer, deadline) would otherwise be carried,
                    // and copied, by every request's future.
                    let (session, peer) = Box::pin(self.connect_any(dialable.as_slice(), url, via, deadline)).await?;
                    (session, peer, false)
                }
            };
            session.read_timeout = Some(self.settings.timeouts.read);
            session.write_timeout = Some(self.settings.timeouts.write);
            // Built per attempt: Pingora takes the header by value, and a
            // second attempt is rare enough not to keep a copy around.
            let request = request::build(hop, &self.settings.providers)?;
            match Self::send_and_read_header(&mut session, request, self.settings.timeouts.read).await {
                Ok(()) => return Ok((session, peer, reused)),
                Err(e) if reused && !fresh_only && is_stale_connection(&e) => {
                    log::debug!("pooled upstream connection was stale ({e}); retrying on a new one");
                    fresh_only = true;
                    // A connect of its own, after the pooled attempt's time.
                    deadline = std::time::Instant::now() + connect;
                }
                Err(e) => return Err(FetchError::from_pingora(e)),
            }
        }
    }

    /// Sends the request and reads the final response header. Pingora's
    /// read timeout is per read, so a header trickling in a line at a time,
    /// or interim answers without end, would hold the request for ever:
    /// each header must arrive whole within `read`, and at most
    /// [`MAX_INTERIM`] interim answers come before the final one; none may
    /// be over [`MAX_HEADER_BYTES`].
    async fn send_and_read_header(
        session: &mut HttpSession,
        request: Box<RequestHeader>,
        read: Duration,
    ) -> pingora_error::Result<()> {
        session.write_request_header(request).await?;
        session.finish_body().await?;
        for _ in 0..=MAX_INTERIM {
            // Boxed: the timer would otherwise widen every request's future
            // (memory per slow stream) for the time a header is awaited.
            match Box::pin(tokio::time::timeout(read, session.read_response())).await {
                Ok(read) => read?,
                Err(_) => return Error::e_explain(ErrorType::ReadTimedout, "the header did not arrive whole"),
            };
            let header = session.resp_header();
            if header.is_some_and(|h| crate::headers::byte_len(h) > MAX_HEADER_BYTES) {
                return Error::e_explain(ErrorType::InvalidHTTPHeader, "the header is over 64 KiB");
            }
            let status = header.map(|h| h.status.as_u16()).unwrap_or(0);
            // Interim 1xx responses are consumed; 101 is never requested.
            if !(100..200).contains(&status) {
                return Ok(());
            }
        }
        Error::e_explain(ErrorType::InvalidHTTPHeader, "interim responses without end")
    }

    /// Gives a connection back: with its body fully read it goes to the
    /// pool (unless the exchange's framing, or `Connection: close` either
    /// way, rules reuse out); a small unread body is drained first; a large
    /// one closes the connection. Returns whether the body was read to its
    /// end (`false`: closed mid-body).
    pub(crate) async fn finish(&self, mut session: HttpSession, pool_key: u64) -> bool {
        if !session.is_body_done() {
            let small = session
                .resp_header()
                .and_then(|h| h.headers.get(header::CONTENT_LENGTH))
                .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
                .is_some_and(|n| n <= DRAIN_LIMIT);
            if !small || !drain(&mut session).await {
                return false;
            }
        }
        session.respect_keepalive();
        if let Some(stream) = session.reuse().await {
            self.pool.put(pool_key, stream);
        }
        true
    }
}

async fn drain(session: &mut HttpSession) -> bool {
    loop {
        match session.read_body_ref().await {
            Ok(Some(_)) => continue,
            Ok(None) => return true,
            Err(_) => return false,
        }
    }
}

fn is_redirect(s: StatusCode) -> bool {
    matches!(s.as_u16(), 301 | 302 | 303 | 307 | 308)
}

/// A `Location` as text for the URL parser. Hosters send file names raw
/// (nginx's `return 302 /$1` writes its decoded capture, spaces and UTF-8
/// bytes included): bytes above ASCII are percent-encoded as they stand
/// (`percent_encode` always encodes those; the empty set adds nothing), as
/// curl does with them — for UTF-8 exactly what a browser sends — and the
/// URL parser encodes the rest (spaces) as it does for `u=`.
fn location_text(v: &HeaderValue) -> Cow<'_, str> {
    percent_encoding::percent_encode(v.as_bytes(), &percent_encoding::AsciiSet::EMPTY).into()
}

/// Interim (1xx) answers accepted before the final one: servers send one
/// or two (`100 Continue`, `103 Early Hints`).
const MAX_INTERIM: usize = 8;

/// The most header bytes (names and values) an upstream answer may have.
/// Pingora reads up to 1 MiB, and a relayed answer keeps its header for as
/// long as it streams: 50 streams of a 900 KB header took 21 MB of RSS
/// against 8 MB with a small one (BENCHMARKS.md). Real answers are a few
/// hundred bytes; nginx refuses more than its 4-8 KiB `proxy_buffer_size`,
/// curl more than 100 KiB.
const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Errors that a server closing an idle keep-alive connection produces.
fn is_stale_connection(e: &Error) -> bool {
    matches!(e.etype(), ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError | ErrorType::H1Error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_locations_are_encoded_as_curl_and_browsers_send_them() {
        let base = Url::parse("http://h.example/dir/a.mp4").unwrap();
        let next = |raw: &[u8]| base.join(location_text(&HeaderValue::from_bytes(raw).unwrap()).trim()).unwrap();
        // nginx's `return 302 /$1` with a decoded file name: a space and UTF-8.
        assert_eq!(next("/my file ä.mp4".as_bytes()).as_str(), "http://h.example/my%20file%20%C3%A4.mp4");
        assert_eq!(next("ä.mp4?n=ä b".as_bytes()).as_str(), "http://h.example/dir/%C3%A4.mp4?n=%C3%A4%20b");
        // A raw international host name: its ASCII form, as for `u=`.
        assert_eq!(next("http://bücher.example/x".as_bytes()).as_str(), "http://xn--bcher-kva.example/x");
        // Not UTF-8 (a Latin-1 server): the bytes as they stand.
        assert_eq!(next(b"/caf\xe9.mp4").as_str(), "http://h.example/caf%E9.mp4");
        // Already encoded, or plain ASCII: untouched.
        assert_eq!(next(b"/x%20y.mp4").as_str(), "http://h.example/x%20y.mp4");
        assert!(matches!(location_text(&HeaderValue::from_static("/a")), Cow::Borrowed("/a")));
    }
}
