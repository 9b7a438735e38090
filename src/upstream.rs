//! Opening an upstream response: egress check on the dialled address,
//! Pingora's connector and HTTP/1.1 client session over this crate's idle
//! connection [`Pool`], redirects followed server-side, and the HEAD →
//! `GET` + `Range` fallback. Returns with the response header
//! read and the body still on the wire, so the caller streams it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode};
use pingora::connectors::TransportConnector;
use pingora::protocols::http::v1::client::HttpSession;
use pingora::upstreams::peer::{HttpPeer, Peer};
use pingora_error::{Error, ErrorType};
use pingora_http::{RequestHeader, ResponseHeader};
use url::{Position, Url};

use crate::dns::Dns;
use crate::egress::{self, Egress, Refusal, UrlHost};
use crate::headers::{self, WireHeader};
use crate::pool::Pool;
use crate::providers::Providers;

/// Per-phase upstream limits.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub read: Duration,
    pub write: Duration,
}

/// How long an idle pooled upstream connection is kept.
const POOL_IDLE: Duration = Duration::from_secs(30);
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
        }
    }

    /// Worth one refresh of a resolved URL (connect errors and timeouts).
    pub fn is_refreshable(&self) -> bool {
        matches!(self, FetchError::Dns(_) | FetchError::Unreachable(_) | FetchError::Timeout(_))
    }

    fn from_pingora(e: Box<Error>) -> FetchError {
        match e.etype() {
            ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => FetchError::Timeout(e),
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
            FetchError::Unreachable(e) | FetchError::Timeout(e) => write!(f, "{e}"),
        }
    }
}

/// What to fetch.
pub struct Request<'a> {
    pub method: Method,
    pub url: Url,
    /// The client's request headers; only the allow-listed ones are used.
    pub client_headers: &'a HeaderMap,
    /// Headers from the resolver (win over provider profiles).
    pub extra_headers: &'a [WireHeader],
    /// The operator-trusted origin (a static route's upstream), if any.
    pub trusted: Option<&'a Url>,
}

/// An upstream response whose body has not been read yet.
pub struct Response {
    /// The exchange, with the response header read (see [`Response::header`]).
    pub session: HttpSession,
    pub peer: HttpPeer,
    /// After redirects: what relative playlist URIs resolve against.
    pub final_url: Url,
    /// The response answers a HEAD through a `GET` + `Range` fallback.
    pub head_fallback: bool,
    /// Redirect hops followed.
    pub redirects: u32,
    /// The last hop ran on a pooled (reused) connection.
    pub reused: bool,
}

impl Response {
    /// The upstream response header (read before a `Response` exists).
    pub fn header(&self) -> &ResponseHeader {
        self.session.resp_header().expect("a Response has its header read")
    }
}

/// One upstream request as sent on a hop (the method and URL change along
/// redirects and the HEAD fallback).
struct Hop<'a> {
    method: &'a Method,
    url: &'a Url,
    client_headers: &'a HeaderMap,
    extra: &'a [WireHeader],
    range_override: Option<HeaderValue>,
}

/// Dials upstreams with Pingora's connector; finished connections wait in
/// one shared [`Pool`] for the next request to the same peer.
pub struct Client {
    connector: TransportConnector,
    pool: Arc<Pool>,
    /// Host names resolved recently (the egress check still runs every time).
    dns: Dns,
    egress: Egress,
    providers: Providers,
    timeouts: Timeouts,
    max_redirects: u32,
    default_ua: Option<HeaderValue>,
}

impl Client {
    pub fn new(
        egress: Egress,
        providers: Providers,
        timeouts: Timeouts,
        max_redirects: u32,
        default_ua: Option<HeaderValue>,
        pool_size: usize,
    ) -> Client {
        // Pingora's own pool stays empty: nothing is released into it.
        let opts = pingora::connectors::ConnectorOptions::new(0);
        Client {
            connector: TransportConnector::new(Some(opts)),
            pool: Pool::new(pool_size, POOL_IDLE),
            dns: Dns::default(),
            egress,
            providers,
            timeouts,
            max_redirects,
            default_ua,
        }
    }

    /// Opens the response for `req`, following redirects and falling back
    /// from HEAD to a ranged GET when the upstream refuses HEAD.
    pub async fn open(&self, req: Request<'_>) -> Result<Response, FetchError> {
        let client_method = req.method.clone();
        let mut method = req.method.clone();
        let mut url = req.url;
        let mut head_fallback = false;
        let mut redirects = 0u32;
        loop {
            let trusted = req.trusted.is_some_and(|t| t.origin() == url.origin());
            let range_override = if head_fallback && !req.client_headers.contains_key(header::RANGE) {
                Some(HeaderValue::from_static("bytes=0-0"))
            } else {
                None
            };
            let hop = Hop {
                method: &method,
                url: &url,
                client_headers: req.client_headers,
                extra: req.extra_headers,
                range_override,
            };
            let (session, peer, reused) = self.exchange(&hop, trusted).await?;
            let status = session.resp_header().map(|h| h.status).unwrap_or(StatusCode::BAD_GATEWAY);

            // The `discard`s below are boxed: redirects and the HEAD fallback
            // are rare, and an inline drain future would triple the size of
            // every request's future (moved and copied on each request).
            if is_redirect(status) {
                if redirects >= self.max_redirects {
                    Box::pin(self.discard(session, &peer)).await;
                    return Err(FetchError::TooManyRedirects);
                }
                let next = session
                    .resp_header()
                    .and_then(|h| h.headers.get(header::LOCATION))
                    .and_then(|l| l.to_str().ok())
                    .and_then(|l| url.join(l.trim()).ok())
                    .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
                Box::pin(self.discard(session, &peer)).await;
                let Some(next) = next else { return Err(FetchError::BadRedirect) };
                if status == StatusCode::SEE_OTHER && method != Method::HEAD {
                    method = Method::GET;
                }
                log::debug!("following {} redirect to {}", status.as_u16(), next.host_str().unwrap_or(""));
                url = next;
                redirects += 1;
                continue;
            }

            if client_method == Method::HEAD
                && method == Method::HEAD
                && matches!(status, StatusCode::METHOD_NOT_ALLOWED | StatusCode::NOT_IMPLEMENTED)
            {
                Box::pin(self.discard(session, &peer)).await;
                method = Method::GET;
                head_fallback = true;
                continue;
            }

            return Ok(Response { session, peer, final_url: url, head_fallback, redirects, reused });
        }
    }

    /// One request/response header exchange on a pooled connection. A
    /// reused connection that fails before any response byte is retried
    /// once on a fresh one (the server may have closed it while idle).
    async fn exchange(&self, hop: &Hop<'_>, trusted: bool) -> Result<(HttpSession, HttpPeer, bool), FetchError> {
        let url = hop.url;
        let host = UrlHost::of(url).ok_or(FetchError::BadRedirect)?;
        let port = url.port_or_known_default().unwrap_or(80);
        let addr = egress::resolve(&self.egress, &self.dns, &host, port, trusted).await.map_err(|e| match e {
            Ok(refusal) => FetchError::Refused(refusal),
            Err(io) => FetchError::Dns(io),
        })?;
        let peer = self.peer_for(addr, url);

        let mut fresh_only = false;
        loop {
            let pooled = if fresh_only { None } else { self.pool.take(peer.reuse_hash()) };
            let (mut session, reused) = match pooled {
                Some(stream) => (HttpSession::new_with_options(stream, &peer), true),
                None => (self.connect(&peer).await?, false),
            };
            session.read_timeout = Some(self.timeouts.read);
            session.write_timeout = Some(self.timeouts.write);
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

    /// A new connection. Boxed: connecting (TLS handshake included) is a
    /// future of ~8 KiB that the common pooled path should not carry along.
    async fn connect(&self, peer: &HttpPeer) -> Result<HttpSession, FetchError> {
        let stream = Box::pin(self.connector.new_stream(peer)).await.map_err(FetchError::from_pingora)?;
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

    fn peer_for(&self, addr: SocketAddr, url: &Url) -> HttpPeer {
        let tls = url.scheme() == "https";
        // SNI is the host name (or the IP literal); never empty, since an
        // empty SNI turns off certificate verification in pingora's rustls.
        let sni = url.host_str().unwrap_or_default().trim_matches(['[', ']']).to_string();
        let mut peer = HttpPeer::new(addr, tls, sni);
        let o = &mut peer.options;
        // Connect and TLS handshake; the read and write timeouts are set on
        // each exchange's session (`exchange`), which is where Pingora's
        // client session applies them.
        o.connection_timeout = Some(self.timeouts.connect);
        o.total_connection_timeout = Some(self.timeouts.connect);
        o.verify_cert = true;
        o.verify_hostname = true;
        peer
    }

    fn request_header(&self, hop: &Hop<'_>) -> Result<Box<RequestHeader>, FetchError> {
        let url = hop.url;
        let path = &url[Position::BeforePath..Position::AfterQuery];
        let mut req =
            RequestHeader::build(hop.method.clone(), path.as_bytes(), Some(8)).map_err(FetchError::Unreachable)?;
        let host = headers::host_header(url);
        req.insert_header("Host", host).map_err(FetchError::Unreachable)?;
        let profile = self.providers.headers_for(url.host_str().unwrap_or_default());
        for h in headers::upstream_request_headers(hop.client_headers, self.default_ua.as_ref(), profile, hop.extra) {
            req.append_header(h.spelling, h.value).map_err(FetchError::Unreachable)?;
        }
        if let Some(range) = hop.range_override.clone() {
            req.insert_header("Range", range).map_err(FetchError::Unreachable)?;
        }
        Ok(Box::new(req))
    }

    /// Gives a finished exchange back: a small remaining body is drained so
    /// the connection can be pooled, a large one closes the connection.
    pub async fn discard(&self, mut session: HttpSession, peer: &HttpPeer) {
        let small = session
            .resp_header()
            .and_then(|h| h.headers.get(header::CONTENT_LENGTH))
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
            .is_some_and(|n| n <= DRAIN_LIMIT);
        if session.is_body_done() || (small && drain(&mut session).await) {
            self.release(session, peer).await;
        }
    }

    /// Returns a fully read connection to the pool, unless the exchange
    /// (its framing, or `Connection: close` either way) rules reuse out.
    pub async fn release(&self, mut session: HttpSession, peer: &HttpPeer) {
        session.respect_keepalive();
        if let Some(stream) = session.reuse().await {
            self.pool.put(peer.reuse_hash(), stream);
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

/// Errors that a server closing an idle keep-alive connection produces.
fn is_stale_connection(e: &Error) -> bool {
    matches!(e.etype(), ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError | ErrorType::H1Error)
}
