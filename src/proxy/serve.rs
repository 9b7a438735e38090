//! Answering one request, phase by phase: the method, the route, the
//! credentials, the upstream request; then what the response is
//! ([`decide`]) and how it goes out ([`relay`], [`playlist`]).

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use http::header;
use http::Method;
use pingora::protocols::http::ServerSession;
use pingora_error::Result;
use pingora_http::ResponseHeader;
use url::Url;

use super::decide::{self, Decision, Facts, RelayFacts};
use super::relay::{drain_request_body, relay};
use super::reply::reply;
use super::{playlist, Ctx, Outcome, Proxy, Reply};
use crate::auth::{AuthError, Query};
use crate::config::AuthMode;
use crate::content_type::is_playlist_path;
use crate::routing::{self, Target};
use crate::upstream::{FetchError, Request, Response};

/// How a response is to be answered, from what the request named.
pub(super) struct How<'a> {
    /// Playlists are rewritten (relay, `/strm/stream`), not only typed (routes).
    pub rewrite: bool,
    /// The relay's cosmetic file name.
    pub hint: Option<&'a str>,
    /// The upstream path or the hint names a playlist.
    pub known_playlist: bool,
    /// The key the client authenticated with (handed on to playlist children).
    pub client_key: Option<String>,
}

pub(super) fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Proxy {
    /// Answers one request on Pingora's downstream session.
    pub(super) async fn serve(&self, down: &mut ServerSession, ctx: &mut Ctx) -> Result<()> {
        down.set_write_timeout(Some(self.state.downstream_write_timeout));
        // Players pipeline: keep bytes of the next request that arrive
        // while this response streams, instead of failing this one.
        down.set_pipelining_enabled(true);
        match self.handle(down, ctx).await {
            Ok(()) => Ok(()),
            Err(Outcome::Reply(r)) => {
                ctx.status = r.0;
                reply(down, &self.state.cors, r).await
            }
            Err(Outcome::Abort(e)) => Err(e),
        }
    }

    async fn handle(&self, down: &mut ServerSession, ctx: &mut Ctx) -> std::result::Result<(), Outcome> {
        let st = &*self.state;
        let method = down.req_header().method.clone();
        if method == Method::OPTIONS && st.cors.enabled() {
            ctx.route = "preflight";
            let out = st.cors.preflight(down.req_header().headers.get(header::ORIGIN))?;
            ctx.status = 204;
            return Ok(down.write_response_header(Box::new(out)).await?);
        }
        if method != Method::GET && method != Method::HEAD {
            return Err(Reply(405, "method not allowed").into());
        }
        drain_request_body(down).await?;
        // A cheap (shared-bytes) copy, so the session can be borrowed mutably later.
        let uri = down.req_header().uri.clone();
        let (path, raw_query) = (uri.path(), uri.query());
        let target = routing::classify(path, &st.routes).ok_or(Reply(404, "not found"))?;
        let query = Query::parse(raw_query);
        let key_header = down.req_header().headers.get("x-api-key").map(|v| v.as_bytes().to_vec());
        let now = now_unix();
        let forwarded = st.client.forwarded(&down.req_header().headers);

        let (how, request) = match target {
            Target::Relay { hint } => {
                ctx.route = "relay";
                self.authenticate(&query, key_header.as_deref(), now)?;
                let url = parse_u(&query)?;
                let known_playlist = is_playlist_path(url.path()) || is_playlist_path(hint);
                let how = How {
                    rewrite: true,
                    hint: Some(hint),
                    known_playlist,
                    client_key: client_key(&query, key_header.as_deref()),
                };
                (how, Request { method, url, forwarded, extra: None, trusted: None, whole: known_playlist })
            }
            Target::Stream => {
                ctx.route = "stream";
                self.authenticate(&query, key_header.as_deref(), now)?;
                let key = client_key(&query, key_header.as_deref());
                // Boxed: the rare resolver path must not inflate every request's future.
                return Box::pin(self.stream(down, ctx, &query, key, forwarded)).await;
            }
            Target::Route { index, rest } => {
                ctx.route = "route";
                let route = &st.routes[index];
                if route.auth && st.auth.mode != AuthMode::None {
                    if query.has("_path") {
                        return Err(Reply(400, "reserved parameter _path").into());
                    }
                    let mut bound = query.clone();
                    bound.0.push(("_path".into(), routing::decoded_path(path)));
                    self.authenticate(&bound, key_header.as_deref(), now)?;
                }
                let url = route.target(rest, raw_query).map_err(|_| Reply(400, "invalid path"))?;
                let how =
                    How { rewrite: false, hint: None, known_playlist: is_playlist_path(url.path()), client_key: None };
                let trusted = Some(route.upstream.clone());
                (how, Request { method, url, forwarded, extra: None, trusted, whole: false })
            }
        };
        let resp = self.open(ctx, request).await.map_err(|e| self.fetch_failed(&e))?;
        self.respond(down, ctx, resp, &how).await
    }

    pub(super) fn authenticate(
        &self,
        q: &Query,
        key_header: Option<&[u8]>,
        now: u64,
    ) -> std::result::Result<(), AuthError> {
        self.state.auth.check(q, key_header, now).inspect_err(|e| {
            self.state.metrics.auth_failures.with_label_values(&[e.reason()]).inc();
        })
    }

    /// Opens the upstream response: one attempt, recorded for the log and metrics.
    pub(super) async fn open(&self, ctx: &mut Ctx, req: Request) -> std::result::Result<Response<'_>, FetchError> {
        ctx.attempts += 1;
        if ctx.attempts > 1 {
            self.state.metrics.retries.inc();
        }
        let access_log = log::log_enabled!(target: "access", log::Level::Info);
        if access_log {
            ctx.upstream_host = req.url.host_str().unwrap_or_default().to_string();
        }
        let started = Instant::now();
        let resp = self.state.client.open(req).await?;
        self.state.metrics.upstream_header_seconds.observe(started.elapsed().as_secs_f64());
        ctx.upstream_status = resp.header().status.as_u16();
        if access_log && resp.redirects() > 0 {
            ctx.upstream_host = resp.url().host_str().unwrap_or_default().to_string();
        }
        Ok(resp)
    }

    /// The answer for an upstream failure before any response: logged,
    /// counted, one status and reason.
    pub(super) fn fetch_failed(&self, e: &FetchError) -> Outcome {
        if matches!(e, FetchError::Refused(_)) {
            self.state.metrics.egress_refusals.inc();
        }
        log::warn!("upstream failed: {e}");
        Reply::from(e).into()
    }

    /// Decides what the response is and answers with it: relayed as it is,
    /// or, for a playlist, read whole and rewritten — fetched again whole
    /// when this response cannot give it so (a partial answer to a range, a
    /// HEAD).
    pub(super) async fn respond(
        &self,
        down: &mut ServerSession,
        ctx: &mut Ctx,
        mut resp: Response<'_>,
        how: &How<'_>,
    ) -> std::result::Result<(), Outcome> {
        let st = &*self.state;
        let client_head = down.req_header().method == Method::HEAD;
        let mut first: Option<Vec<u8>> = None;
        // A HEAD fetched again as a GET that then was no playlist is
        // answered with its own first response's header.
        let mut own: Option<(ResponseHeader, bool)> = None;
        let mut refetched = false;
        loop {
            let facts = Facts {
                rewrite: how.rewrite,
                head_sent: resp.sent_head(),
                head_fallback: resp.head_fallback(),
                known_playlist: how.known_playlist,
            };
            match decide::decide(&facts, resp.header(), first.as_deref()) {
                Decision::Sniff => {
                    let head = resp.peek(decide::SNIFF).await.map_err(|e| self.body_failed(e))?;
                    first = Some(head);
                }
                Decision::Playlist => {
                    let first = first.unwrap_or_default();
                    // Boxed: the rare playlist path must not inflate every request's future.
                    let key = how.client_key.as_deref();
                    return Box::pin(playlist::answer(st, down, ctx, resp, first, key)).await;
                }
                Decision::Refetch if refetched => {
                    log::warn!("{} gave no whole playlist when asked again", resp.url().host_str().unwrap_or("-"));
                    return Err(Reply(502, "playlist unavailable").into());
                }
                Decision::Refetch => {
                    if client_head {
                        own = Some((resp.header().clone(), resp.head_fallback()));
                    }
                    resp = Box::pin(resp.refetch_whole()).await.map_err(|e| self.fetch_failed(&e))?;
                    refetched = true;
                    first = None;
                }
                Decision::Relay { hls } => {
                    let (up, head_fallback) = match &own {
                        Some((h, fallback)) => (h, *fallback),
                        None => (resp.header(), resp.head_fallback()),
                    };
                    let facts = RelayFacts {
                        upstream_path: resp.url().path(),
                        hint: how.hint,
                        head_fallback,
                        client_range: down.req_header().headers.contains_key(header::RANGE),
                        hls,
                        bodyless: client_head,
                        http11: down.req_header().version == http::Version::HTTP_11,
                    };
                    let mut out = decide::relay_header(up, &facts)?;
                    st.cors.apply(down.req_header().headers.get(header::ORIGIN), &mut out)?;
                    return relay(st, down, ctx, resp, out, first.unwrap_or_default(), client_head).await;
                }
            }
        }
    }

    /// A body that failed before anything was sent: a status and reason.
    pub(super) fn body_failed(&self, e: Box<pingora_error::Error>) -> Outcome {
        self.fetch_failed(&FetchError::from_pingora(e))
    }
}

/// The `u=` parameter, checked: present, free of ASCII control characters
/// (never smuggled into a request line), an absolute http(s) URL. Spaces
/// and non-ASCII characters (hoster file names have them) are accepted and
/// percent-encoded as a browser would (WHATWG URL rules).
fn parse_u(q: &Query) -> std::result::Result<Url, Reply> {
    let raw = q.get("u").filter(|u| !u.is_empty()).ok_or(Reply(400, "missing parameter u"))?;
    if raw.bytes().any(|b| b < b' ' || b == 0x7f) {
        return Err(Reply(400, "invalid parameter u"));
    }
    let url = Url::parse(raw).map_err(|_| Reply(400, "invalid parameter u"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(Reply(400, "unsupported scheme"));
    }
    if url.host().is_none() {
        return Err(Reply(400, "invalid parameter u"));
    }
    Ok(url)
}

/// The key the client authenticated with (handed on to playlist children).
fn client_key(q: &Query, header: Option<&[u8]>) -> Option<String> {
    crate::auth::presented_api_key(q, header).and_then(|k| std::str::from_utf8(k).ok()).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(raw: &str) -> std::result::Result<String, Reply> {
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
            assert_eq!(u(bad), Err(Reply(400, "invalid parameter u")), "{bad:?}");
        }
        assert_eq!(u("ftp://h.example/x"), Err(Reply(400, "unsupported scheme")));
        assert_eq!(u("not a url"), Err(Reply(400, "invalid parameter u")));
        assert_eq!(u(""), Err(Reply(400, "missing parameter u")));
    }

    /// What a streaming request holds is its future: one allocation per
    /// request (Pingora boxes `request_filter`'s), alive while the body
    /// streams, so its size is memory per slow client. Rare, large work
    /// (reconnecting to resume, giving a connection back, playlists,
    /// `/strm/stream`) is boxed so it does not widen it; these bounds catch
    /// a change that forgets to (measured: 5 672, 1 264 and 232 bytes).
    #[tokio::test]
    async fn a_streaming_request_stays_small() {
        use pingora_proxy::ProxyHttp;
        let cfg = crate::config::Config::from_yaml("t", "auth: {mode: none}\n", |_| None).unwrap();
        let p = crate::server::build(&cfg, std::sync::Arc::new(crate::metrics::Metrics::new()));
        let (_client, server) = tokio::io::duplex(1024);
        let mut down = ServerSession::new_http1(Box::new(server));
        let mut ctx = p.new_ctx();
        assert!(std::mem::size_of_val(&p.serve(&mut down, &mut ctx)) <= 6 * 1024);
        let (ours, _origin) = tokio::io::duplex(1024);
        let session = pingora::protocols::http::v1::client::HttpSession::new(Box::new(ours));
        let mut resp = Response::over(&p.state.client, session);
        assert!(std::mem::size_of_val(&resp.read()) <= 512, "the read of each buffer");
        let mut sent = 0;
        let pump =
            super::super::relay::pump(&mut down, &mut resp, Vec::new(), std::time::Duration::from_secs(1), &mut sent);
        assert!(std::mem::size_of_val(&pump) <= 1536);
    }
}
