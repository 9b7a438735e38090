//! Dialling an upstream: the addresses the egress policy allows (checked
//! after DNS, at the address dialled), an idle pooled connection to one of
//! them, or a new one — direct or through an egress proxy — tried address
//! by address within `upstream.connect_timeout`, those that failed lately
//! last.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pingora::protocols::http::v1::client::HttpSession;
use pingora::protocols::Stream;
use pingora::upstreams::peer::{HttpPeer, Peer};
use pingora_error::{Error, ErrorType};
use url::Url;

use super::{Client, FetchError, Request};
use crate::egress::{self, Dialable, Refusal, UrlHost};
use crate::tunnel::{EgressProxy, Target, Tunnel};

/// A tunnel's own deadline (which reports `egress proxy failed`) comes this
/// long before Pingora's timeout of the whole connect (TLS included).
const TUNNEL_GRACE: Duration = Duration::from_millis(100);

/// How long an address where a direct connect failed is dialled after the
/// others: as long as a name lookup is reused ([`crate::dns::TTL`]), since
/// the next one most likely lists the address first again.
const FAILED_FOR: Duration = crate::dns::TTL;

/// Addresses where a direct connect failed lately (nginx marks a server
/// down for its `fail_timeout` the same way). Without this, a dead address
/// at the head of a host's list — a dead member of a DNS round robin, an
/// IPv6 route that drops packets — costs every new connection half of
/// `upstream.connect_timeout` before the next address is tried. Bounded
/// and expiring (moka); it only orders, never refuses: when every address
/// failed lately, they are dialled in the order the lookup gave.
pub(super) struct Failed(moka::sync::Cache<SocketAddr, ()>);

impl Default for Failed {
    fn default() -> Self {
        Failed(moka::sync::Cache::builder().max_capacity(4096).time_to_live(FAILED_FOR).build())
    }
}

impl Failed {
    /// `addrs` with those that failed lately moved to the end, the order
    /// kept otherwise.
    fn order<'a>(&self, addrs: &'a [SocketAddr]) -> Cow<'a, [SocketAddr]> {
        if addrs.len() < 2 || !addrs.iter().any(|a| self.0.contains_key(a)) {
            return Cow::Borrowed(addrs);
        }
        let (fine, failed): (Vec<SocketAddr>, Vec<SocketAddr>) = addrs.iter().partition(|a| !self.0.contains_key(*a));
        Cow::Owned([fine, failed].concat())
    }

    /// A direct connect to `a` failed.
    fn remember(&self, a: SocketAddr) {
        self.0.insert(a, ());
    }

    /// A direct connect to `a` succeeded: it takes its place again.
    fn forget(&self, a: &SocketAddr) {
        if self.0.contains_key(a) {
            self.0.invalidate(a);
        }
    }
}

impl Client {
    /// Whether the egress policy lets `req`'s first hop be dialled (for the
    /// cache: judged before memory answers, exactly as before a fetch).
    pub async fn admit(&self, req: &Request) -> Result<(), FetchError> {
        let url = &req.url;
        let trusted = req.trusted.as_ref().is_some_and(|t| t.origin() == url.origin());
        let via = self.settings.proxies.pick(url.host_str().unwrap_or_default());
        self.dialable(url, via, trusted, self.settings.timeouts.connect).await.map(|_| ())
    }

    /// The addresses `url` may be dialled at (through `via`), each allowed
    /// by the egress policy, or why there are none; a name lookup still
    /// unanswered `within` that time is a timeout.
    pub(super) async fn dialable(
        &self,
        url: &Url,
        via: Option<&Arc<EgressProxy>>,
        trusted: bool,
        within: Duration,
    ) -> Result<Dialable, FetchError> {
        let host = UrlHost::of(url).ok_or(FetchError::Request("a URL without a host"))?;
        let port = url.port_or_known_default().unwrap_or(80);
        match (&host, via) {
            // The proxy resolves the name: only deny_hosts is judged here.
            (UrlHost::Name(name), Some(v)) if v.resolves_names() => {
                if !trusted {
                    self.settings.egress.host_allowed(name).map_err(FetchError::Refused)?;
                }
                Ok(Dialable::unresolved(port))
            }
            _ => egress::resolve(&self.settings.egress, &self.dns, &host, port, trusted, within).await.map_err(|e| {
                match e {
                    Ok(refusal) => FetchError::Refused(refusal),
                    Err(io) if io.kind() == std::io::ErrorKind::TimedOut => FetchError::lookup_timed_out(url),
                    Err(io) => FetchError::Dns(url.host_str().unwrap_or_default().to_string(), io.into()),
                }
            }),
        }
    }

    /// An idle connection to any of `addrs` (through `via`), with its peer.
    pub(super) fn pooled(
        &self,
        addrs: &[SocketAddr],
        url: &Url,
        via: Option<&Arc<EgressProxy>>,
    ) -> Option<(Stream, HttpPeer)> {
        addrs.iter().find_map(|a| {
            let peer = self.peer_for(*a, url, via);
            self.pool.take(peer.reuse_hash()).map(|s| (s, peer))
        })
    }

    /// A new connection to the first of `addrs` that accepts one (through
    /// the egress proxy `via`, if any), by `deadline` (what is left of
    /// `upstream.connect_timeout` after the name lookup). Like curl, each
    /// address but the last may use half of the time left, so one silent
    /// address cannot use it all; like nginx, an
    /// address that refuses or cannot be routed to gives way to the next at
    /// once, and is dialled after the others for a while ([`Failed`]). TLS
    /// certificate failures do not: a wrong certificate is an answer, not an
    /// absence; nor does a failing egress proxy.
    pub(super) async fn connect_any(
        &self,
        addrs: &[SocketAddr],
        url: &Url,
        via: Option<&Arc<EgressProxy>>,
        deadline: Instant,
    ) -> Result<(HttpSession, HttpPeer), FetchError> {
        let mut last = None;
        let addrs = &self.failed.order(addrs)[..];
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
            // Only direct connects are remembered: through an egress proxy
            // the fault may be the proxy's.
            let direct = via.is_none();
            match self.connect(&peer).await {
                Ok(session) => {
                    if direct {
                        self.failed.forget(a);
                    }
                    self.count_egress(via, true);
                    if let Some(own) = self.own_listener(&session) {
                        return Err(FetchError::Refused(Refusal::OwnListener(own)));
                    }
                    return Ok((session, peer));
                }
                Err(e) => {
                    let absent = is_connect_failure(&e);
                    if absent && direct {
                        self.failed.remember(*a);
                    }
                    if absent && i + 1 < addrs.len() {
                        log::debug!("upstream address {a} failed ({e}); trying the next one");
                        last = Some(e);
                        continue;
                    }
                    self.count_egress(via, false);
                    return Err(FetchError::from_pingora(e));
                }
            }
        }
        self.count_egress(via, false);
        let e = last.unwrap_or_else(|| Error::explain(ErrorType::ConnectTimedout, "connect timeout"));
        Err(FetchError::from_pingora(e))
    }

    /// The listener of this process that `session` reached, if it did (the
    /// connection is then dropped: the listener sees a client that left
    /// before sending anything).
    fn own_listener(&self, session: &HttpSession) -> Option<SocketAddr> {
        let own = &self.settings.own_listeners;
        if own.is_empty() {
            return None;
        }
        let socket = session.digest().socket_digest.as_ref()?;
        let (local, peer) = (*socket.local_addr()?.as_inet()?, *socket.peer_addr()?.as_inet()?);
        egress::own_listener_reached(own, local, peer).map(|_| peer)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::egress::Egress;
    use crate::upstream::{Settings, Timeouts};

    fn client(connect: Duration) -> Client {
        let egress = Egress::new(vec!["127.0.0.0/8".parse().unwrap()], vec![]);
        let timeouts = Timeouts { connect, read: Duration::from_secs(5), write: Duration::from_secs(5) };
        Client::new(Settings { egress, pool_size: 8, ..Settings::plain(timeouts) }, None)
    }

    /// The deadline of a connect starting now.
    fn by(c: &Client) -> Instant {
        Instant::now() + c.settings.timeouts.connect
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

        let (_, peer) = c.connect_any(&[refusing(), good], &url, None, by(&c)).await.unwrap();
        assert_eq!(peer._address.to_string(), good.to_string());

        // A silent first address gets half the time, then the next one is tried.
        let (_keep, _queued, quiet) = silent();
        let (_, peer) = c.connect_any(&[quiet, good], &url, None, by(&c)).await.unwrap();
        assert_eq!(peer._address.to_string(), good.to_string());
    }

    #[tokio::test]
    async fn an_address_that_failed_lately_is_dialled_after_the_others() {
        let (a, b) =
            (std::net::TcpListener::bind("127.0.0.1:0").unwrap(), std::net::TcpListener::bind("127.0.0.1:0").unwrap());
        let (first, second) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        let url = Url::parse(&format!("http://{first}/")).unwrap();
        let c = client(Duration::from_secs(4));
        let dialled = |r: Result<(HttpSession, HttpPeer), FetchError>| r.unwrap().1._address.to_string();
        assert_eq!(dialled(c.connect_any(&[first, second], &url, None, by(&c)).await), first.to_string());

        // `first` stops answering, so the next address is dialled ...
        drop(a);
        assert_eq!(dialled(c.connect_any(&[first, second], &url, None, by(&c)).await), second.to_string());
        // ... and, once `first` answers again, still `second` first: a dead
        // head of the list is not dialled again by every new connection.
        let _a = std::net::TcpListener::bind(first).unwrap();
        assert_eq!(dialled(c.connect_any(&[first, second], &url, None, by(&c)).await), second.to_string());
        assert_eq!(dialled(c.connect_any(&[second, first], &url, None, by(&c)).await), second.to_string());
        // Alone it is dialled; its success puts it back in its place.
        assert_eq!(dialled(c.connect_any(&[first], &url, None, by(&c)).await), first.to_string());
        assert_eq!(dialled(c.connect_any(&[first, second], &url, None, by(&c)).await), first.to_string());

        // A silent address counts as failed too.
        let (_keep, _queued, quiet) = silent();
        assert_eq!(dialled(c.connect_any(&[quiet, first], &url, None, by(&c)).await), first.to_string());
        assert_eq!(c.failed.order(&[quiet, first, second])[..], [first, second, quiet]);
        // When every address failed lately, the lookup's order stands.
        assert_eq!(c.failed.order(&[quiet])[..], [quiet]);
    }

    async fn failure(c: &Client, addrs: &[SocketAddr], url: &Url) -> FetchError {
        match c.connect_any(addrs, url, None, by(c)).await {
            Ok((_, peer)) => panic!("connected to {}", peer._address),
            Err(e) => e,
        }
    }

    #[tokio::test]
    async fn when_no_address_answers_the_last_failure_decides_the_status() {
        let url = Url::parse("http://127.0.0.1/").unwrap();
        let c = client(Duration::from_millis(600));
        let refused = failure(&c, &[refusing(), refusing()], &url).await;
        assert!(matches!(refused, FetchError::Unreachable(_)), "{refused}");
        let (_keep, _queued, quiet) = silent();
        let timed_out = failure(&c, &[refusing(), quiet], &url).await;
        assert!(matches!(timed_out, FetchError::Timeout(_)), "{timed_out}");
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
        assert!(matches!(e, FetchError::Unreachable(_)), "{e}");
        let dialled = next.accept().map(|_| ()).map_err(|e| e.kind());
        assert_eq!(dialled, Err(std::io::ErrorKind::WouldBlock), "the next address was dialled");
    }
}
