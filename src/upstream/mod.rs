//! The upstream client: egress check on the dialled address, Pingora's
//! connector and HTTP/1.1 client session over this crate's idle connection
//! [`Pool`], redirects followed server-side, and the HEAD → `GET` + `Range`
//! fallback. [`Client::open`] returns a [`Response`] with its header read and
//! its body still on the wire; the response owns its connection.

mod pool;
mod response;
pub mod resume;

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::{Method, StatusCode};
use pingora::connectors::TransportConnector;
use pingora::protocols::http::v1::client::HttpSession;
use pingora::protocols::Stream;
use pingora::upstreams::peer::{HttpPeer, Peer};
use pingora_error::{Error, ErrorType};
use pingora_http::RequestHeader;
use url::{Position, Url};

pub use pool::Pool;
pub use response::{BodyError, Response};

use crate::dns::Dns;
use crate::egress::{self, Dialable, Egress, Refusal, UrlHost};
use crate::headers::{self, WireHeader};
use crate::metrics::Metrics;
use crate::providers::Providers;
use crate::tunnel::{EgressProxies, EgressProxy, Target, Tunnel, EGRESS_PROXY_FAILED};

/// Per-phase upstream limits.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub read: Duration,
    pub write: Duration,
}

/// How long an idle pooled upstream connection is kept.
const POOL_IDLE: Duration = Duration::from_secs(30);
/// A tunnel's own deadline (which reports `egress proxy failed`) comes this
/// long before Pingora's timeout of the whole connect (TLS included).
const TUNNEL_GRACE: Duration = Duration::from_millis(100);
/// Redirect and error bodies up to this size are drained so the connection
/// can go back to the pool; larger ones close it.
const DRAIN_LIMIT: usize = 16 * 1024;

/// Why no upstream response could be had. Each maps to one client status.
#[derive(Debug)]
pub enum FetchError {
    /// Egress policy refused the destination: 403.
    Refused(Refusal),
    /// A redirect to somewhere that is not http(s), or without Location: 502.
    BadRedirect,
    /// More than `max_redirects` hops: 502.
    TooManyRedirects,
    /// DNS failed: 502.
    Dns(std::io::Error),
    /// Connect refused/reset, TLS failure, malformed response: 502.
    Unreachable(Box<Error>),
    /// Connect or header read timed out: 504.
    Timeout(Box<Error>),
    /// The egress proxy was unreachable, refused, or failed its handshake: 502.
    EgressProxy(Box<Error>),
}

impl FetchError {
    pub fn status_and_reason(&self) -> (u16, &'static str) {
        match self {
            FetchError::Refused(_) => (403, "destination not allowed"),
            FetchError::BadRedirect => (502, "bad redirect"),
            FetchError::TooManyRedirects => (502, "too many redirects"),
            FetchError::Dns(_) => (502, "upstream unreachable"),
            FetchError::Unreachable(_) => (502, "upstream unreachable"),
            FetchError::Timeout(_) => (504, "upstream timeout"),
            FetchError::EgressProxy(_) => (502, "egress proxy failed"),
        }
    }

    /// Worth one refresh of a resolved URL (connect errors and timeouts).
    pub fn is_refreshable(&self) -> bool {
        matches!(
            self,
            FetchError::Dns(_) | FetchError::Unreachable(_) | FetchError::Timeout(_) | FetchError::EgressProxy(_)
        )
    }

    pub(crate) fn from_pingora(e: Box<Error>) -> FetchError {
        match e.etype() {
            t if *t == EGRESS_PROXY_FAILED => FetchError::EgressProxy(e),
            ErrorType::ConnectTimedout
            | ErrorType::TLSHandshakeTimedout
            | ErrorType::ReadTimedout
            | ErrorType::WriteTimedout => FetchError::Timeout(e),
            _ => FetchError::Unreachable(e),
        }
    }
}

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FetchError::Refused(r) => write!(f, "egress refused: {r}"),
            FetchError::BadRedirect => f.write_str("redirect to a non-http(s) or missing Location"),
            FetchError::TooManyRedirects => f.write_str("too many redirects"),
            FetchError::Dns(e) => write!(f, "DNS: {e}"),
            FetchError::Unreachable(e) | FetchError::Timeout(e) | FetchError::EgressProxy(e) => write!(f, "{e}"),
        }
    }
}

/// What to fetch. Owned, because the [`Response`] keeps it: a body that dies
/// is resumed, and a playlist fetched again, with the same headers.
#[derive(Debug, Clone)]
pub struct Request {
    /// GET or HEAD, as the client asked.
    pub method: Method,
    /// The URL; after [`Client::open`], the final one (redirects followed).
    pub url: Url,
    /// The client's headers that go upstream ([`headers::forwarded_request_headers`]).
    pub forwarded: Vec<WireHeader>,
    /// The resolver's headers (win over provider profiles).
    pub extra: Option<Arc<[WireHeader]>>,
    /// The operator-trusted origin (a static route's upstream), if any.
    pub trusted: Option<Arc<Url>>,
    /// Fetch it whole: a `GET` without the client's `Range` and
    /// conditionals, whatever the client's method (playlists).
    pub whole: bool,
}

/// The range a hop asks for.
#[derive(Debug, Clone)]
pub(crate) enum Ask {
    /// The client's own `Range` and conditionals, if any.
    Client,
    /// None of them: the whole resource.
    Whole,
    /// The HEAD fallback: the client's `Range`, or `bytes=0-0`.
    HeadProbe,
    /// A resumption: this `Range`, with `If-Range`.
    Resume { range: HeaderValue, if_range: HeaderValue },
}

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
}

/// One upstream request as sent on a hop (the method and URL change along
/// redirects and the HEAD fallback).
struct Hop<'a> {
    method: &'a Method,
    url: &'a Url,
    req: &'a Request,
    ask: &'a Ask,
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
        }
    }
}

/// Dials upstreams with Pingora's connector; finished connections wait in
/// one shared [`Pool`] for the next request to the same peer.
pub struct Client {
    connector: TransportConnector,
    pool: Arc<Pool>,
    /// Host names resolved recently (the egress check still runs every time).
    dns: Dns,
    settings: Settings,
    metrics: Option<Arc<Metrics>>,
}

impl Client {
    /// `metrics` counts connections and resumptions (none for the resolver's own client).
    pub fn new(settings: Settings, metrics: Option<Arc<Metrics>>) -> Client {
        // Pingora's own pool stays empty: nothing is released into it.
        let opts = pingora::connectors::ConnectorOptions::new(0);
        Client {
            connector: TransportConnector::new(Some(opts)),
            pool: Pool::new(settings.pool_size, POOL_IDLE),
            dns: Dns::default(),
            settings,
            metrics,
        }
    }

    /// The client's headers as they go upstream for this configuration.
    pub fn forwarded(&self, client: &http::HeaderMap) -> Vec<WireHeader> {
        headers::forwarded_request_headers(client, self.settings.default_ua.as_ref())
    }

    /// Opens the response for `req`, following redirects and falling back
    /// from HEAD to a ranged GET when the upstream refuses HEAD.
    pub async fn open(&self, mut req: Request) -> Result<Response<'_>, FetchError> {
        let ask = if req.whole {
            req.method = Method::GET;
            Ask::Whole
        } else {
            Ask::Client
        };
        let ex = self.fetch(&req, ask).await?;
        Ok(Response::new(self, ex, req, self.settings.resume_attempts))
    }

    /// Fetches `req` asking for `ask`: redirects, the HEAD fallback.
    pub(crate) async fn fetch(&self, req: &Request, mut ask: Ask) -> Result<Exchange, FetchError> {
        let mut method = match ask {
            Ask::Client => req.method.clone(),
            _ => Method::GET,
        };
        // Borrowed until a redirect leads elsewhere: no copy per request.
        let mut url = Cow::Borrowed(&req.url);
        let mut head_fallback = false;
        let mut redirects = 0u32;
        loop {
            let trusted = req.trusted.as_ref().is_some_and(|t| t.origin() == url.origin());
            let hop = Hop { method: &method, url: &url, req, ask: &ask };
            let (session, peer, reused) = self.exchange(&hop, trusted).await?;
            self.count_connection(reused);
            let status = session.resp_header().map(|h| h.status).unwrap_or(StatusCode::BAD_GATEWAY);

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
                    .and_then(|l| l.to_str().ok())
                    .and_then(|l| url.join(l.trim()).ok())
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
            return Ok(Exchange { session, pool_key, method, redirected_to, head_fallback, redirects });
        }
    }

    fn count_connection(&self, reused: bool) {
        if let Some(m) = &self.metrics {
            m.count_upstream_connection(reused);
        }
    }

    pub(crate) fn metrics(&self) -> Option<&Metrics> {
        self.metrics.as_deref()
    }

    /// One request/response header exchange on a pooled connection. A
    /// reused connection that fails before any response byte is retried
    /// once on a fresh one (the server may have closed it while idle).
    async fn exchange(&self, hop: &Hop<'_>, trusted: bool) -> Result<(HttpSession, HttpPeer, bool), FetchError> {
        let url = hop.url;
        let host = UrlHost::of(url).ok_or(FetchError::BadRedirect)?;
        let port = url.port_or_known_default().unwrap_or(80);
        // Chosen again on every hop: a redirect may lead elsewhere.
        let via = self.settings.proxies.pick(url.host_str().unwrap_or_default().trim_matches(['[', ']']));
        let dialable = match (&host, via) {
            // The proxy resolves the name: only deny_hosts is judged here.
            (UrlHost::Name(name), Some(v)) if v.resolves_names() => {
                if !trusted {
                    self.settings.egress.host_allowed(name).map_err(FetchError::Refused)?;
                }
                Dialable::unresolved(port)
            }
            _ => {
                egress::resolve(&self.settings.egress, &self.dns, &host, port, trusted).await.map_err(|e| match e {
                    Ok(refusal) => FetchError::Refused(refusal),
                    Err(io) => FetchError::Dns(io),
                })?
            }
        };

        let mut fresh_only = false;
        loop {
            let pooled = if fresh_only { None } else { self.pooled(dialable.as_slice(), url, via) };
            let (mut session, peer, reused) = match pooled {
                Some((stream, peer)) => (HttpSession::new_with_options(stream, &peer), peer, true),
                None => {
                    // Boxed: a new connection is the rare path, and its
                    // future (peer, deadline) would otherwise be carried,
                    // and copied, by every request's future.
                    let (session, peer) = Box::pin(self.connect_any(dialable.as_slice(), url, via)).await?;
                    (session, peer, false)
                }
            };
            session.read_timeout = Some(self.settings.timeouts.read);
            session.write_timeout = Some(self.settings.timeouts.write);
            // Built per attempt: Pingora takes the header by value, and a
            // second attempt is rare enough not to keep a copy around.
            let request = self.request_header(hop)?;
            match Self::send_and_read_header(&mut session, request).await {
                Ok(()) => return Ok((session, peer, reused)),
                Err(e) if reused && !fresh_only && is_stale_connection(&e) => {
                    log::debug!("pooled upstream connection was stale ({e}); retrying on a new one");
                    fresh_only = true;
                }
                Err(e) => return Err(FetchError::from_pingora(e)),
            }
        }
    }

    /// An idle connection to any of `addrs` (through `via`), with its peer.
    fn pooled(&self, addrs: &[SocketAddr], url: &Url, via: Option<&Arc<EgressProxy>>) -> Option<(Stream, HttpPeer)> {
        addrs.iter().find_map(|a| {
            let peer = self.peer_for(*a, url, via);
            self.pool.take(peer.reuse_hash()).map(|s| (s, peer))
        })
    }

    /// A new connection to the first of `addrs` that accepts one (through
    /// the egress proxy `via`, if any), within `upstream.connect_timeout`
    /// in all. Like curl, each address but the last may use half of the
    /// time left, so one silent address cannot use it all; like nginx, an
    /// address that refuses or cannot be routed to gives way to the next at
    /// once. TLS certificate failures do not: a wrong certificate is an
    /// answer, not an absence; nor does a failing egress proxy.
    async fn connect_any(
        &self,
        addrs: &[SocketAddr],
        url: &Url,
        via: Option<&Arc<EgressProxy>>,
    ) -> Result<(HttpSession, HttpPeer), FetchError> {
        let deadline = Instant::now() + self.settings.timeouts.connect;
        let mut last = None;
        for (i, a) in addrs.iter().enumerate() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let mut peer = self.peer_for(*a, url, via);
            let budget = if i + 1 == addrs.len() { left } else { left / 2 };
            peer.options.connection_timeout = Some(budget);
            peer.options.total_connection_timeout = Some(budget);
            if let Some(v) = via {
                let to = match UrlHost::of(url) {
                    Some(UrlHost::Name(name)) if v.resolves_names() => Target::Name(name.to_string(), a.port()),
                    _ => Target::Addr(*a),
                };
                peer.options.custom_l4 =
                    Some(Arc::new(Tunnel { via: v.clone(), to, deadline: Instant::now() + budget }));
                peer.options.total_connection_timeout = Some(budget + TUNNEL_GRACE);
            }
            match self.connect(&peer).await {
                Ok(session) => {
                    self.count_egress(via, true);
                    return Ok((session, peer));
                }
                Err(e) if is_connect_failure(&e) && i + 1 < addrs.len() => {
                    log::debug!("upstream address {a} failed ({e}); trying the next one");
                    last = Some(e);
                }
                Err(e) => {
                    self.count_egress(via, false);
                    return Err(FetchError::from_pingora(e));
                }
            }
        }
        self.count_egress(via, false);
        let e = last.unwrap_or_else(|| Error::explain(ErrorType::ConnectTimedout, "connect timeout"));
        Err(FetchError::from_pingora(e))
    }

    /// Counts a new connection, or a failure to make one, by egress route.
    fn count_egress(&self, via: Option<&Arc<EgressProxy>>, made: bool) {
        if let Some(m) = &self.metrics {
            let route = via.map_or("direct", |v| v.name.as_str());
            let counter = if made { &m.egress_connections } else { &m.egress_failures };
            counter.with_label_values(&[route]).inc();
        }
    }

    /// A new connection. Boxed: connecting (TLS handshake included) is a
    /// future of ~8 KiB that the common pooled path should not carry along.
    async fn connect(&self, peer: &HttpPeer) -> pingora_error::Result<HttpSession> {
        let stream = Box::pin(self.connector.new_stream(peer)).await?;
        Ok(HttpSession::new_with_options(stream, peer))
    }

    async fn send_and_read_header(session: &mut HttpSession, request: Box<RequestHeader>) -> pingora_error::Result<()> {
        session.write_request_header(request).await?;
        session.finish_body().await?;
        loop {
            session.read_response().await?;
            let status = session.resp_header().map(|h| h.status.as_u16()).unwrap_or(0);
            // Interim 1xx responses are consumed; 101 is never requested.
            if !(100..200).contains(&status) {
                return Ok(());
            }
        }
    }

    fn peer_for(&self, addr: SocketAddr, url: &Url, via: Option<&Arc<EgressProxy>>) -> HttpPeer {
        let tls = url.scheme() == "https";
        // SNI is the host name (or the IP literal); never empty, since an
        // empty SNI turns off certificate verification in pingora's rustls.
        let sni = url.host_str().unwrap_or_default().trim_matches(['[', ']']).to_string();
        let mut peer = HttpPeer::new(addr, tls, sni);
        // Pooled per (egress proxy, upstream): a tunnel is never handed to
        // another destination or to a direct request.
        peer.group_key = via.map_or(0, |v| v.group);
        let o = &mut peer.options;
        // Connect and TLS handshake; the read and write timeouts are set on
        // each exchange's session (`exchange`), which is where Pingora's
        // client session applies them.
        o.connection_timeout = Some(self.settings.timeouts.connect);
        o.total_connection_timeout = Some(self.settings.timeouts.connect);
        o.verify_cert = true;
        o.verify_hostname = true;
        peer
    }

    fn request_header(&self, hop: &Hop<'_>) -> Result<Box<RequestHeader>, FetchError> {
        let url = hop.url;
        let path = &url[Position::BeforePath..Position::AfterQuery];
        let mut req =
            RequestHeader::build(hop.method.clone(), path.as_bytes(), Some(10)).map_err(FetchError::Unreachable)?;
        req.insert_header("Host", headers::host_header(url)).map_err(FetchError::Unreachable)?;
        // What this hop asks for replaces the client's range and conditionals.
        let client_range = hop.req.forwarded.iter().any(|h| h.name == header::RANGE);
        let own: [Option<(&'static str, HeaderValue)>; 2] = match hop.ask {
            Ask::HeadProbe if !client_range => [Some(("Range", HeaderValue::from_static("bytes=0-0"))), None],
            Ask::Client | Ask::Whole | Ask::HeadProbe => [None, None],
            Ask::Resume { range, if_range } => [Some(("Range", range.clone())), Some(("If-Range", if_range.clone()))],
        };
        let keep_client_range = matches!(hop.ask, Ask::Client | Ask::HeadProbe);
        for (name, value) in own.into_iter().flatten() {
            req.append_header(name, value).map_err(FetchError::Unreachable)?;
        }
        let profile = self.settings.providers.headers_for(url.host_str().unwrap_or_default());
        let extra = hop.req.extra.as_deref().unwrap_or(&[]);
        for h in headers::upstream_request_headers(&hop.req.forwarded, profile, extra) {
            if !keep_client_range && headers::is_range_or_conditional(&h.name) {
                continue;
            }
            req.append_header(h.spelling.clone(), h.value.clone()).map_err(FetchError::Unreachable)?;
        }
        Ok(Box::new(req))
    }

    /// Gives a connection back: with its body fully read it goes to the
    /// pool (unless the exchange's framing, or `Connection: close` either
    /// way, rules reuse out); a small unread body is drained first; a large
    /// one closes the connection.
    pub(crate) async fn finish(&self, mut session: HttpSession, pool_key: u64) {
        if !session.is_body_done() {
            let small = session
                .resp_header()
                .and_then(|h| h.headers.get(header::CONTENT_LENGTH))
                .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
                .is_some_and(|n| n <= DRAIN_LIMIT);
            if !small || !drain(&mut session).await {
                return;
            }
        }
        session.respect_keepalive();
        if let Some(stream) = session.reuse().await {
            self.pool.put(pool_key, stream);
        }
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

/// Errors that say nothing answered at an address, so another may.
fn is_connect_failure(e: &Error) -> bool {
    matches!(
        e.etype(),
        ErrorType::ConnectTimedout
            | ErrorType::ConnectRefused
            | ErrorType::ConnectNoRoute
            | ErrorType::ConnectError
            | ErrorType::SocketError
            | ErrorType::TLSHandshakeTimedout
    )
}

/// Errors that a server closing an idle keep-alive connection produces.
fn is_stale_connection(e: &Error) -> bool {
    matches!(e.etype(), ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError | ErrorType::H1Error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(connect: Duration) -> Client {
        let egress = Egress::new(vec!["127.0.0.0/8".parse().unwrap()], vec![]);
        let timeouts = Timeouts { connect, read: Duration::from_secs(5), write: Duration::from_secs(5) };
        Client::new(Settings { egress, pool_size: 8, ..Settings::plain(timeouts) }, None)
    }

    /// An address that refuses connections (nothing listens there).
    fn refusing() -> SocketAddr {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
    }

    /// An address that never answers: a listener whose accept queue is full
    /// drops further SYNs, so connecting there hangs until the timeout.
    fn silent() -> (socket2::Socket, Vec<std::net::TcpStream>, SocketAddr) {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
        s.listen(0).unwrap();
        let addr = s.local_addr().unwrap().as_socket().unwrap();
        let mut queued = Vec::new();
        while let Ok(c) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            queued.push(c);
            assert!(queued.len() < 64, "the accept queue never filled");
        }
        (s, queued, addr)
    }

    #[tokio::test]
    async fn the_next_address_is_dialled_when_one_refuses_or_stays_silent() {
        let up = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let good = up.local_addr().unwrap();
        let url = Url::parse(&format!("http://{good}/")).unwrap();
        let c = client(Duration::from_secs(4));

        let (_, peer) = c.connect_any(&[refusing(), good], &url, None).await.unwrap();
        assert_eq!(peer._address.to_string(), good.to_string());

        // A silent first address gets half the time, then the next one is tried.
        let (_keep, _queued, quiet) = silent();
        let (_, peer) = c.connect_any(&[quiet, good], &url, None).await.unwrap();
        assert_eq!(peer._address.to_string(), good.to_string());
    }

    async fn failure(c: &Client, addrs: &[SocketAddr], url: &Url) -> FetchError {
        match c.connect_any(addrs, url, None).await {
            Ok((_, peer)) => panic!("connected to {}", peer._address),
            Err(e) => e,
        }
    }

    #[tokio::test]
    async fn when_no_address_answers_the_last_failure_decides_the_status() {
        let url = Url::parse("http://127.0.0.1/").unwrap();
        let c = client(Duration::from_millis(600));
        let refused = failure(&c, &[refusing(), refusing()], &url).await;
        assert_eq!(refused.status_and_reason().0, 502, "{refused}");
        let (_keep, _queued, quiet) = silent();
        let timed_out = failure(&c, &[refusing(), quiet], &url).await;
        assert_eq!(timed_out.status_and_reason().0, 504, "{timed_out}");
        // A wrong answer is final: the next address is not tried.
        let tls_url = Url::parse("https://127.0.0.1/").unwrap();
        let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let plain_addr = plain.local_addr().unwrap();
        std::thread::spawn(move || {
            // Answers the TLS hello with plain text.
            if let Ok((mut s, _)) = plain.accept() {
                use std::io::Write;
                let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
            }
        });
        let next = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        next.set_nonblocking(true).unwrap();
        let e = failure(&c, &[plain_addr, next.local_addr().unwrap()], &tls_url).await;
        assert_eq!(e.status_and_reason().0, 502, "{e}");
        let dialled = next.accept().map(|_| ()).map_err(|e| e.kind());
        assert_eq!(dialled, Err(std::io::ErrorKind::WouldBlock), "the next address was dialled");
    }
}
