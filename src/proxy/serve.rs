//! Answering one request, phase by phase: the method, the route, the
//! credentials and the upstream request; then [`super::stream`] for
//! `/strm/stream`, or [`super::respond`] for the relay and static routes.

use http::header;
use http::Method;
use pingora::protocols::http::ServerSession;
use pingora_error::Result;
use url::Url;

use super::decide::{Asked, Children};
use super::reply::{reply, Failure, Outcome, Param};
use super::{Ctx, Proxy};
use crate::auth::{self, AuthError, Query};
use crate::config::AuthMode;
use crate::content_type::is_playlist_path;
use crate::headers::HostProblem;
use crate::metrics::RouteLabel;
use crate::routing::{self, RouteError, Target};
use crate::upstream::Request;

// Names as constants: a lookup by a `&str` parses and lowers the name first.
const X_REQUEST_ID: header::HeaderName = header::HeaderName::from_static("x-request-id");
const X_API_KEY: header::HeaderName = header::HeaderName::from_static("x-api-key");

impl Proxy {
    /// Answers one request on Pingora's downstream session.
    pub(super) async fn serve(&self, down: &mut ServerSession, ctx: &mut Ctx) -> Result<()> {
        crate::header_guard::began(down);
        down.set_write_timeout(Some(self.state.downstream_write_timeout));
        // Pingora keeps an idle keep-alive connection for ever (or as long
        // as a client's `Connection: keep-alive` + `Keep-Alive: timeout=`
        // asks): a client that vanished without closing would hold it, and
        // its memory, for good. Like nginx, one idle this long is closed.
        // `Some(0)` is "for ever"; `None` (no keep-alive) stays as it is.
        if let Some(asked) = down.get_keepalive() {
            let most = self.state.downstream_keepalive_secs;
            down.set_keepalive(Some(if asked == 0 { most } else { asked.min(most) }));
        }
        // The id names the request's access line: without an access log
        // only a client's own id is returned (nothing would know a new one).
        let client_id = down.req_header().headers.get(X_REQUEST_ID);
        if client_id.is_some() || log::log_enabled!(target: "access", log::Level::Info) {
            ctx.request_id = crate::access::request_id(client_id);
        }
        // Players pipeline: keep bytes of the next request that arrive
        // while this response streams, instead of failing this one.
        down.set_pipelining_enabled(true);
        // What is logged while answering ends with the request's id, as
        // its access line does (an empty id: none).
        let id = ctx.request_id.clone();
        match crate::access::with_request_id(id, self.handle(down, ctx)).await {
            Ok(()) => Ok(()),
            Err(Outcome::Reply(failure)) => reply(down, ctx, &self.state.cors, failure).await,
            Err(Outcome::Abort(e)) => Err(e),
        }
    }

    async fn handle(&self, down: &mut ServerSession, ctx: &mut Ctx) -> std::result::Result<(), Outcome> {
        let st = &*self.state;
        // First, whatever the answer (`crate::header_guard`).
        crate::header_guard::read_request_body(down).await?;
        match crate::headers::host_problem(down.req_header()) {
            None => {}
            Some(HostProblem::Missing) => return Err(Failure::MissingHost.into()),
            Some(HostProblem::Invalid) => return Err(Failure::InvalidHost.into()),
        }
        let method = down.req_header().method.clone();
        if method == Method::OPTIONS && st.cors.enabled() {
            ctx.route = RouteLabel::Preflight;
            let mut out = st.cors.preflight(down.req_header().headers.get(header::ORIGIN))?;
            ctx.status = 204;
            ctx.sending(&mut out)?;
            return Ok(down.write_response_header(Box::new(out)).await?);
        }
        if method != Method::GET && method != Method::HEAD {
            if method == Method::CONNECT {
                // A client meaning to tunnel may send the tunnel's bytes
                // right behind its request: they are no next request.
                down.set_keepalive(None);
            }
            return Err(Failure::MethodNotAllowed.into());
        }
        crate::headers::drop_nominated(down.req_header_mut());
        // A cheap (shared-bytes) copy, so the session can be borrowed mutably later.
        let uri = down.req_header().uri.clone();
        let (path, raw_query) = (uri.path(), uri.query());
        let target = routing::classify(path, &st.routes).ok_or(Failure::NotFound)?;
        let key_header = down.req_header().headers.get(X_API_KEY).map(|v| v.as_bytes().to_vec());
        let now = auth::now_unix();
        let req = down.req_header();
        let asked = Asked {
            children: Children::Relay,
            known_playlist: false,
            hint: None,
            range: req.headers.contains_key(header::RANGE),
            head: method == Method::HEAD,
            http11: req.version == http::Version::HTTP_11,
        };

        // `key`: the one the client authenticated with, handed on to playlist children.
        let (asked, request, key) = match target {
            Target::Relay { hint } => {
                ctx.route = RouteLabel::Relay;
                let raw = raw_query.unwrap_or("");
                let (url, key) = match st.verified.get(raw, now) {
                    // Passed before: a key for the children only matters
                    // in API-key mode, which remembers nothing.
                    Some(url) => (url, None),
                    None => {
                        let query = Query::parse(raw_query);
                        self.authenticate(&query, key_header.as_deref(), now)?;
                        let url = parse_u(&query)?;
                        st.verified.remember(raw, &query, &url);
                        (url, client_key(&query, key_header.as_deref()))
                    }
                };
                let known_playlist = is_playlist_path(url.path()) || is_playlist_path(hint);
                let asked = Asked { known_playlist, hint: Some(hint), ..asked };
                // A route playlist's child trusted as the route would be.
                let trusted = routing::route_trust(&st.routes, raw, &url);
                // `forwarded` (the client's headers that go upstream) is
                // read only when the request goes upstream (`Proxy::open`).
                (
                    asked,
                    Request {
                        method,
                        url,
                        forwarded: Vec::new(),
                        extra: None,
                        again: None,
                        trusted,
                        whole: known_playlist,
                    },
                    key,
                )
            }
            Target::Stream => {
                ctx.route = RouteLabel::Stream;
                let query = Query::parse(raw_query);
                self.authenticate(&query, key_header.as_deref(), now)?;
                let key = client_key(&query, key_header.as_deref());
                let forwarded = st.client.forwarded(&down.req_header().headers);
                // Boxed: the rare resolver path must not inflate every request's future.
                return Box::pin(self.stream(down, ctx, &query, &asked, key.as_deref(), forwarded)).await;
            }
            Target::Route { index, rest } => {
                ctx.route = RouteLabel::Route;
                ctx.route_index = Some(index);
                let route = &st.routes[index];
                // Open when its own `auth: false` or `auth.mode: none` says so.
                let guarded = route.auth && st.auth.mode != AuthMode::None;
                let query = Query::parse(raw_query);
                if guarded {
                    if query.has("_path") {
                        return Err(Failure::ReservedPath.into());
                    }
                    let mut bound = query.clone();
                    bound.0.push(("_path".into(), routing::decoded_path(path)));
                    self.authenticate(&bound, key_header.as_deref(), now)?;
                }
                let url = route.target(rest, raw_query).map_err(|e| match e {
                    RouteError::NotAUrl => Failure::InvalidPath,
                    RouteError::Escapes => Failure::PathEscapesRoute,
                })?;
                // An open route is a plain reverse proxy; one that asks for
                // credentials must be playable from its playlist's URL alone.
                let children = if guarded { Children::Route(index) } else { Children::Untouched };
                let known_playlist = is_playlist_path(url.path());
                let asked = Asked { children, known_playlist, ..asked };
                let trusted = Some(route.upstream.clone());
                // A rewritten playlist is fetched whole (its bytes are not the client's).
                let whole = known_playlist && guarded;
                (
                    asked,
                    Request { method, url, forwarded: Vec::new(), extra: None, again: None, trusted, whole },
                    client_key(&query, key_header.as_deref()),
                )
            }
        };
        self.attempt(ctx);
        let src = self.fetch(down, ctx, request).await?.map_err(|e| self.fetch_failed(ctx, &e))?;
        self.respond(down, ctx, src, &asked, key.as_deref()).await
    }

    fn authenticate(&self, q: &Query, key_header: Option<&[u8]>, now: u64) -> std::result::Result<(), AuthError> {
        self.state.auth.check(q, key_header, now).inspect_err(|e| {
            self.state.metrics.auth_failures.with_label_values(&[e.reason()]).inc();
        })
    }
}

/// The `u=` parameter, checked: present, free of ASCII control characters
/// (never smuggled into a request line), an absolute http(s) URL. Spaces
/// and non-ASCII characters (hoster file names have them) are accepted and
/// percent-encoded as a browser would (WHATWG URL rules).
fn parse_u(q: &Query) -> std::result::Result<Url, Failure> {
    let raw = q.get("u").filter(|u| !u.is_empty()).ok_or(Failure::Missing(Param::U))?;
    if raw.bytes().any(|b| b < b' ' || b == 0x7f) {
        return Err(Failure::InvalidU);
    }
    let url = Url::parse(raw).map_err(|_| Failure::InvalidU)?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(Failure::UnsupportedScheme);
    }
    if url.host().is_none() {
        return Err(Failure::InvalidU);
    }
    Ok(url)
}

/// The key the client authenticated with (handed on to playlist children).
fn client_key(q: &Query, header: Option<&[u8]>) -> Option<String> {
    auth::presented_api_key(q, header).and_then(|k| std::str::from_utf8(k).ok()).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::Response;

    fn u(raw: &str) -> std::result::Result<String, Failure> {
        parse_u(&Query(vec![("u".into(), raw.into())])).map(String::from)
    }

    #[test]
    fn u_accepts_what_browsers_accept_and_encodes_it_as_they_do() {
        assert_eq!(u("https://h.example/Folge 1.mp4").unwrap(), "https://h.example/Folge%201.mp4");
        assert_eq!(
            u("https://h.example/Schöne Grüße.mkv?t=ä b").unwrap(),
            "https://h.example/Sch%C3%B6ne%20Gr%C3%BC%C3%9Fe.mkv?t=%C3%A4%20b"
        );
        assert_eq!(u("https://bücher.example/x").unwrap(), "https://xn--bcher-kva.example/x");
        assert_eq!(u("https://h.example/a%20b.mp4").unwrap(), "https://h.example/a%20b.mp4", "encoded stays encoded");
        for bad in ["https://h.example/a\r\nX: y", "https://h.example/\0", "https://h.example/a\tb", "http://h/\x7f"] {
            assert_eq!(u(bad), Err(Failure::InvalidU), "{bad:?}");
        }
        assert_eq!(u("ftp://h.example/x"), Err(Failure::UnsupportedScheme));
        assert_eq!(u("not a url"), Err(Failure::InvalidU));
        assert_eq!(u(""), Err(Failure::Missing(Param::U)));
    }

    /// What a streaming request holds is its future: one allocation per
    /// request (Pingora boxes `request_filter`'s), alive while the body
    /// streams, so its size is memory per slow client. Rare, large work
    /// (reconnecting to resume, giving a connection back, playlists,
    /// `/strm/stream`) is boxed so it does not widen it; these bounds catch
    /// a change that forgets to (BENCHMARKS.md has the measured sizes).
    #[tokio::test]
    async fn a_streaming_request_stays_small() {
        use pingora_proxy::ProxyHttp;
        let cfg = crate::config::Config::from_yaml("t", "auth: {mode: none}\n", |_| None).unwrap();
        let p = crate::server::build(&cfg, std::sync::Arc::new(crate::metrics::Metrics::new()));
        let (_client, server) = tokio::io::duplex(1024);
        let mut down = ServerSession::new_http1(Box::new(server));
        let mut ctx = p.new_ctx();
        let serving = std::mem::size_of_val(&p.serve(&mut down, &mut ctx));
        assert!(serving <= 6 * 1024, "{serving}");
        let (ours, _origin) = tokio::io::duplex(1024);
        let session = pingora::protocols::http::v1::client::HttpSession::new(Box::new(ours));
        let mut src = super::super::source::Source::Upstream(Response::over(&p.state.client, session));
        assert!(std::mem::size_of_val(&src.read()) <= 512, "the read of each buffer");
        let sent = std::sync::atomic::AtomicU64::new(0);
        let pump = super::super::relay::pump(&mut down, &mut src, Vec::new(), std::time::Duration::from_secs(1), &sent);
        assert!(std::mem::size_of_val(&pump) <= 1536);
    }
}
