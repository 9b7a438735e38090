//! The `ProxyHttp` glue. `request_filter` authenticates and routes the
//! request, opens the upstream through [`crate::upstream::Client`] (Pingora's
//! connector and HTTP/1.1 client, pooled connections) and relays the
//! response itself, so that redirects, the HEAD fallback, the
//! refresh-and-retry and playlist rewriting all happen before the first byte
//! goes downstream, and the body is pumped one buffer at a time with
//! end-to-end backpressure.

use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, StatusCode, Version};
use pingora::modules::http::HttpModules;
use pingora::protocols::http::{HttpTask, ServerSession as HttpSession};
use pingora::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorType, Result};
use pingora_http::ResponseHeader;
use pingora_proxy::{FailToProxy, ProxyHttp, Session};
use url::Url;

use crate::auth::{Auth, AuthError, ChildSigner, Query};
use crate::config::{AuthMode, Config};
use crate::content_type;
use crate::cors::{self, Cors};
use crate::egress::Egress;
use crate::headers::{self, WireHeader};
use crate::hls;
use crate::metrics::Metrics;
use crate::providers::Providers;
use crate::resolver::{Resolved, Resolver};
use crate::routing::{self, Route, Target};
use crate::upstream::{self, Client, FetchError, Timeouts};

/// Everything a request needs, shared by all requests.
pub struct State {
    pub auth: Auth,
    pub client: Client,
    pub routes: Vec<Route>,
    pub cors: Cors,
    pub public_base: Option<String>,
    pub max_playlist_bytes: usize,
    pub downstream_write_timeout: Duration,
    pub resolver: Option<Resolver>,
    pub metrics: Arc<Metrics>,
}

impl State {
    pub fn from_config(cfg: &Config, metrics: Arc<Metrics>) -> std::result::Result<State, String> {
        let egress = Egress::new(&cfg.egress.allow_cidrs, &cfg.egress.deny_hosts)?;
        let providers = Providers::new(&cfg.providers)?;
        let timeouts = Timeouts {
            connect: cfg.upstream.connect_timeout.0,
            read: cfg.upstream.read_timeout.0,
            write: cfg.upstream.write_timeout.0,
        };
        let ua = cfg
            .upstream
            .user_agent
            .as_deref()
            .map(HeaderValue::from_str)
            .transpose()
            .map_err(|_| "upstream.user_agent is not a valid header value".to_string())?;
        let client = Client::new(egress, providers, timeouts, cfg.upstream.max_redirects, ua, 128 * cfg.threads);
        let routes = cfg
            .routes
            .iter()
            .map(|r| Route::new(&r.prefix, &r.upstream, r.auth))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let resolver = cfg
            .resolver
            .url
            .as_deref()
            .map(|u| Resolver::new(u, cfg.resolver.timeout.0, cfg.resolver.cache_entries))
            .transpose()?;
        Ok(State {
            auth: Auth::new(
                cfg.auth.mode,
                cfg.auth.secret.as_deref(),
                cfg.auth.api_key.as_deref(),
                cfg.auth.token_ttl.0.as_secs().max(1),
            ),
            client,
            routes,
            cors: Cors::new(&cfg.cors.allow_origins),
            public_base: cfg.public_base_url.as_ref().map(|b| b.trim_end_matches('/').to_string()),
            max_playlist_bytes: cfg.stream.max_playlist_bytes,
            downstream_write_timeout: cfg.downstream.write_timeout.0,
            resolver,
            metrics,
        })
    }
}

/// The Pingora application.
pub struct Proxy {
    pub state: Arc<State>,
}

/// Per-request facts, for the access log and metrics (opaque outside).
pub struct Ctx {
    route: &'static str,
    start: Instant,
    status: u16,
    upstream_status: u16,
    upstream_host: String,
    body_bytes: u64,
    attempts: u32,
    refreshed: bool,
}

impl Ctx {
    fn new() -> Ctx {
        Ctx {
            route: "-",
            start: Instant::now(),
            status: 0,
            upstream_status: 0,
            upstream_host: String::new(),
            body_bytes: 0,
            attempts: 0,
            refreshed: false,
        }
    }
}

/// A response the proxy generates itself: status and one-line reason.
struct Reply(u16, &'static str);

impl From<AuthError> for Reply {
    fn from(e: AuthError) -> Reply {
        Reply(401, e.reason())
    }
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// What kind of upstream a response comes from: it decides playlist
/// rewriting (relay and stream rewrite; static routes only fix the type).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Relay,
    Stream,
    Route,
}

#[async_trait]
impl ProxyHttp for Proxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        // Balanced in `logging`, which Pingora runs last for every request.
        self.state.metrics.in_flight.inc();
        Ctx::new()
    }

    /// No downstream modules: bodies are relayed byte for byte.
    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        self.serve(session.as_downstream_mut(), ctx).await.map(|()| true)
    }

    /// Never reached: `request_filter` always answers.
    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        Error::e_explain(ErrorType::InternalError, "request_filter answers every request")
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        // A response already started is aborted (the connection is dropped);
        // otherwise the client gets a one-line 502.
        if session.response_written().is_none() && !matches!(e.esource(), pingora_error::ErrorSource::Downstream) {
            let _ = self.reply(session.as_downstream_mut(), ctx, 502, "upstream failed").await;
            return FailToProxy { error_code: 502, can_reuse_downstream: false };
        }
        FailToProxy { error_code: 0, can_reuse_downstream: false }
    }

    /// What Pingora prints beside its own error lines: method and path
    /// only, never the query (`u`, `sig`, `apikey` live there).
    fn request_summary(&self, session: &Session, ctx: &Ctx) -> String {
        let req = session.req_header();
        format!("{} {} route={}", req.method, req.uri.path(), ctx.route)
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &Ctx, e: &Error) -> bool {
        // Clients going away mid-stream is ordinary for media players.
        matches!(e.esource(), pingora_error::ErrorSource::Downstream)
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        let m = &self.state.metrics;
        m.in_flight.dec();
        let status =
            if ctx.status == 0 { session.response_written().map_or(0, |r| r.status.as_u16()) } else { ctx.status };
        m.count_request(ctx.route, status);
        m.bytes_relayed.inc_by(ctx.body_bytes);
        if log::log_enabled!(target: "access", log::Level::Info) {
            let req = session.req_header();
            log::info!(
                target: "access",
                "{} {} route={} status={} bytes={} ms={} upstream_status={} upstream_host={} attempts={} refreshed={}{}",
                req.method,
                req.uri.path(),
                ctx.route,
                status,
                ctx.body_bytes,
                ctx.start.elapsed().as_millis(),
                ctx.upstream_status,
                if ctx.upstream_host.is_empty() { "-" } else { &ctx.upstream_host },
                ctx.attempts,
                ctx.refreshed,
                e.map(|e| format!(" error=\"{}\"", e.etype().as_str())).unwrap_or_default(),
            );
        }
    }
}

/// How `handle` ends when it does not complete normally.
enum Outcome {
    /// Nothing was sent yet: answer with this status and reason.
    Reply(Reply),
    /// The response is under way (or the client is gone): abort it.
    Abort(Box<Error>),
}

impl From<Reply> for Outcome {
    fn from(r: Reply) -> Outcome {
        Outcome::Reply(r)
    }
}

impl From<AuthError> for Outcome {
    fn from(e: AuthError) -> Outcome {
        Outcome::Reply(e.into())
    }
}

impl Proxy {
    pub fn new(state: Arc<State>) -> Proxy {
        Proxy { state }
    }

    /// Answers one request. Everything below works on Pingora's downstream
    /// session itself (no proxy modules are installed, so pingora-proxy's
    /// `Session` wrapper adds nothing to it).
    async fn serve(&self, session: &mut HttpSession, ctx: &mut Ctx) -> Result<()> {
        session.set_write_timeout(Some(self.state.downstream_write_timeout));
        // Players pipeline: keep bytes of the next request that arrive
        // while this response streams, instead of failing this one.
        session.set_pipelining_enabled(true);
        match self.handle(session, ctx).await {
            Ok(()) => Ok(()),
            Err(Outcome::Reply(Reply(status, reason))) => self.reply(session, ctx, status, reason).await,
            Err(Outcome::Abort(e)) => Err(e),
        }
    }

    async fn handle(&self, session: &mut HttpSession, ctx: &mut Ctx) -> std::result::Result<(), Outcome> {
        let st = &*self.state;
        let req = session.req_header();
        let method = req.method.clone();
        if method == Method::OPTIONS && st.cors.enabled() {
            ctx.route = "preflight";
            return self.preflight(session, ctx).await.map_err(Outcome::Abort);
        }
        if method != Method::GET && method != Method::HEAD {
            return Err(Reply(405, "method not allowed").into());
        }
        drain_request_body(session).await.map_err(Outcome::Abort)?;
        let req = session.req_header();
        // A cheap (shared-bytes) copy, so the session can be borrowed mutably later.
        let uri = req.uri.clone();
        let (path, raw_query) = (uri.path(), uri.query());
        let target = routing::classify(path, &st.routes).ok_or(Reply(404, "not found"))?;
        let query = Query::parse(raw_query);
        let api_key_header = req.headers.get("x-api-key").map(|v| v.as_bytes().to_vec());
        let now = now_unix();

        let (kind, hint, url, trusted): (Kind, Option<&str>, Url, Option<Url>) = match target {
            Target::Relay { hint } => {
                ctx.route = "relay";
                self.authenticate(&query, api_key_header.as_deref(), now)?;
                (Kind::Relay, Some(hint), parse_u(&query)?, None)
            }
            Target::Stream => {
                ctx.route = "stream";
                self.authenticate(&query, api_key_header.as_deref(), now)?;
                return Box::pin(self.stream(session, ctx, &query, api_key_header.as_deref())).await;
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
                    self.authenticate(&bound, api_key_header.as_deref(), now)?;
                }
                let url = route.target(rest, raw_query).map_err(|_| Reply(400, "invalid path"))?;
                (Kind::Route, None, url, Some(route.upstream.clone()))
            }
        };
        let client_key = client_key(&query, api_key_header.as_deref());
        let resp =
            self.open(session, ctx, &method, url, trusted.as_ref(), &[]).await.map_err(|e| self.fetch_failed(e))?;
        self.relay(session, ctx, resp, kind, hint, client_key.as_deref()).await
    }

    fn authenticate(&self, q: &Query, key_header: Option<&[u8]>, now: u64) -> std::result::Result<(), AuthError> {
        self.state.auth.check(q, key_header, now).inspect_err(|e| {
            self.state.metrics.auth_failures.with_label_values(&[e.reason()]).inc();
        })
    }

    /// `/strm/stream`: resolve (cached), stream, and when the resolved URL
    /// has gone stale (connect error, timeout, 403/404/410/429/451) evict it,
    /// resolve once more and retry once — never more than two attempts.
    async fn stream(
        &self,
        session: &mut HttpSession,
        ctx: &mut Ctx,
        query: &Query,
        key_header: Option<&[u8]>,
    ) -> std::result::Result<(), Outcome> {
        let resolver = self.state.resolver.as_ref().ok_or(Reply(404, "not found"))?;
        for (param, reason) in [("site", "missing parameter site"), ("slug", "missing parameter slug")] {
            if query.get(param).is_none_or(str::is_empty) {
                return Err(Reply(400, reason).into());
            }
        }
        let params = query.without(&["sig"]);
        let method = session.req_header().method.clone();
        let mut refresh = false;
        loop {
            let resolved: Arc<Resolved> = resolver.resolve(&params, refresh).await.map_err(|e| {
                log::warn!("resolver unavailable: {e}");
                Reply(502, "resolver unavailable")
            })?;
            let outcome = self.open(session, ctx, &method, resolved.url.clone(), None, &resolved.headers).await;
            let stale = match &outcome {
                Ok(r) => matches!(r.header().status.as_u16(), 403 | 404 | 410 | 429 | 451),
                Err(e) => e.is_refreshable(),
            };
            if stale && !refresh {
                refresh = true;
                ctx.refreshed = true;
                self.state.metrics.refreshes.inc();
                match outcome {
                    Ok(r) => {
                        log::info!("resolved URL answered {}; refreshing once", r.header().status.as_u16());
                        self.state.client.discard(r.session, &r.peer).await;
                    }
                    Err(e) => log::info!("resolved URL failed ({e}); refreshing once"),
                }
                continue;
            }
            let resp = outcome.map_err(|e| self.fetch_failed(e))?;
            let key = client_key(query, key_header);
            return self.relay(session, ctx, resp, Kind::Stream, None, key.as_deref()).await;
        }
    }

    /// Opens the upstream response, recording what the log and metrics need.
    async fn open(
        &self,
        session: &HttpSession,
        ctx: &mut Ctx,
        method: &Method,
        url: Url,
        trusted: Option<&Url>,
        extra: &[WireHeader],
    ) -> std::result::Result<upstream::Response, FetchError> {
        ctx.attempts += 1;
        if ctx.attempts > 1 {
            self.state.metrics.retries.inc();
        }
        let access_log = log::log_enabled!(target: "access", log::Level::Info);
        if access_log {
            ctx.upstream_host = url.host_str().unwrap_or_default().to_string();
        }
        let started = Instant::now();
        let req = upstream::Request {
            method: method.clone(),
            url,
            client_headers: &session.req_header().headers,
            extra_headers: extra,
            trusted,
        };
        let resp = self.state.client.open(req).await?;
        let m = &self.state.metrics;
        m.upstream_header_seconds.observe(started.elapsed().as_secs_f64());
        m.redirects.inc_by(resp.redirects as u64);
        m.count_upstream_connection(resp.reused);
        ctx.upstream_status = resp.header().status.as_u16();
        if access_log && resp.redirects > 0 {
            ctx.upstream_host = resp.final_url.host_str().unwrap_or_default().to_string();
        }
        Ok(resp)
    }

    fn fetch_failed(&self, e: FetchError) -> Outcome {
        let (status, reason) = e.status_and_reason();
        if matches!(e, FetchError::Refused(_)) {
            self.state.metrics.egress_refusals.inc();
        }
        log::warn!("upstream failed: {e}");
        Reply(status, reason).into()
    }

    /// Relays an upstream response: header policy, content type, HEAD
    /// fallback, playlist rewriting, then the body pump.
    async fn relay(
        &self,
        session: &mut HttpSession,
        ctx: &mut Ctx,
        mut resp: upstream::Response,
        kind: Kind,
        hint: Option<&str>,
        client_key: Option<&str>,
    ) -> std::result::Result<(), Outcome> {
        let client_head = session.req_header().method == Method::HEAD;
        let client_range = session.req_header().headers.contains_key(header::RANGE);
        let mut out = downstream_header(resp.header());

        if resp.head_fallback && !client_range && out.status == StatusCode::PARTIAL_CONTENT {
            // HEAD answered through `GET` + `Range: bytes=0-0`: report the
            // whole resource, as the HEAD would have.
            let total = out.headers.get(header::CONTENT_RANGE).and_then(|v| headers::content_range_total(v.as_bytes()));
            out.set_status(StatusCode::OK).map_err(Outcome::Abort)?;
            out.remove_header(&header::CONTENT_RANGE);
            match total {
                Some(t) => {
                    out.insert_header(header::CONTENT_LENGTH, t.to_string()).map_err(Outcome::Abort)?;
                }
                None => {
                    out.remove_header(&header::CONTENT_LENGTH);
                }
            }
        }

        let upstream_type = out.headers.get(header::CONTENT_TYPE).map(|v| v.to_str().unwrap_or("?"));
        let untyped = upstream_type.is_none();
        let url_says_hls = content_type::is_m3u8_path(resp.final_url.path())
            || (untyped && hint.is_some_and(content_type::is_m3u8_path));
        let type_says_hls = upstream_type.is_some_and(content_type::is_hls_type);
        let generic_type = content_type::is_generic_type(upstream_type);
        if untyped {
            let guessed = content_type::guess(resp.final_url.path(), hint);
            out.insert_header(header::CONTENT_TYPE, guessed).map_err(Outcome::Abort)?;
        }
        self.add_cors(session, &mut out).map_err(Outcome::Abort)?;

        let ok = out.status == StatusCode::OK;
        let candidate = ok && (url_says_hls || type_says_hls || generic_type);
        // Peek at the body of possible playlists: `#EXTM3U` decides.
        let mut first: Option<Bytes> = None;
        let mut is_playlist = false;
        if candidate && !resp.head_fallback && resp.header().status == StatusCode::OK {
            if client_head {
                is_playlist = url_says_hls || type_says_hls;
            } else {
                let head = peek(&mut resp, 16).await.map_err(|e| self.fetch_failed(e))?;
                // A compressed body cannot be sniffed: URL or type decide.
                let encoded = out
                    .headers
                    .get(header::CONTENT_ENCODING)
                    .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
                is_playlist = hls::looks_like_playlist(&head) || (encoded && (url_says_hls || type_says_hls));
                first = Some(head);
            }
        }
        if is_playlist || (kind == Kind::Route && ok && (url_says_hls || type_says_hls)) {
            out.insert_header(header::CONTENT_TYPE, content_type::HLS).map_err(Outcome::Abort)?;
        }

        if is_playlist && kind != Kind::Route {
            // Boxed: the rare playlist path must not inflate every request's future.
            return Box::pin(self.relay_playlist(session, ctx, resp, out, first, client_head, client_key)).await;
        }

        // Framing: keep the upstream Content-Length; otherwise chunk (HTTP/1.1).
        let bodyless = client_head || matches!(out.status.as_u16(), 204 | 304) || out.status.is_informational();
        if !out.headers.contains_key(header::CONTENT_LENGTH)
            && !bodyless
            && session.req_header().version == Version::HTTP_11
        {
            out.insert_header(header::TRANSFER_ENCODING, "chunked").map_err(Outcome::Abort)?;
        }
        ctx.status = out.status.as_u16();
        session.write_response_header(Box::new(out)).await.map_err(Outcome::Abort)?;
        if bodyless {
            self.state.client.discard(resp.session, &resp.peer).await;
            return Ok(());
        }
        self.state.metrics.active_streams.inc();
        let pumped = pump(session, &mut resp, first, ctx, self.state.downstream_write_timeout).await;
        self.state.metrics.active_streams.dec();
        pumped.map_err(Outcome::Abort)?;
        self.state.client.release(resp.session, &resp.peer).await;
        Ok(())
    }

    /// Collects a playlist (bounded), rewrites it through the proxy and
    /// answers with an exact `Content-Length`.
    #[allow(clippy::too_many_arguments)]
    async fn relay_playlist(
        &self,
        session: &mut HttpSession,
        ctx: &mut Ctx,
        mut resp: upstream::Response,
        mut out: ResponseHeader,
        first: Option<Bytes>,
        client_head: bool,
        client_key: Option<&str>,
    ) -> std::result::Result<(), Outcome> {
        let max = self.state.max_playlist_bytes;
        if client_head {
            // A HEAD must carry the length the GET would: fetch and rewrite.
            self.state.client.discard(resp.session, &resp.peer).await;
            let url = resp.final_url.clone();
            resp = self.open(session, ctx, &Method::GET, url, None, &[]).await.map_err(|e| self.fetch_failed(e))?;
            if resp.header().status != StatusCode::OK {
                self.state.client.discard(resp.session, &resp.peer).await;
                return Err(Reply(502, "playlist unavailable").into());
            }
        }
        let declared =
            resp.header().headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
        if declared.is_some_and(|n| n > max) {
            log::warn!("playlist of {} bytes exceeds stream.max_playlist_bytes ({max})", declared.unwrap_or(0));
            return Err(Reply(502, "playlist too large").into());
        }
        let mut body = Vec::with_capacity(declared.unwrap_or(8192).min(max));
        if let Some(f) = first {
            body.extend_from_slice(&f);
        }
        loop {
            match resp.session.read_body_ref().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > max {
                        log::warn!("playlist exceeds stream.max_playlist_bytes ({max})");
                        return Err(Reply(502, "playlist too large").into());
                    }
                    body.extend_from_slice(chunk);
                }
                Ok(None) => break,
                Err(e) => return Err(self.fetch_failed(FetchError::Unreachable(e))),
            }
        }
        self.state.client.release(resp.session, &resp.peer).await;
        let encoding = out.headers.get(header::CONTENT_ENCODING).and_then(|v| v.to_str().ok()).map(str::to_string);
        let text = decode_playlist(body, encoding.as_deref(), max).map_err(|why| {
            log::warn!("cannot decode playlist: {why}");
            Reply(502, "bad playlist encoding")
        })?;
        let rewritten = self.rewrite_playlist(&text, &resp.final_url, client_key);
        out.remove_header(&header::CONTENT_ENCODING);
        out.remove_header(&header::CONTENT_RANGE);
        out.insert_header(header::CONTENT_LENGTH, rewritten.len().to_string()).map_err(Outcome::Abort)?;
        ctx.status = out.status.as_u16();
        session.write_response_header(Box::new(out)).await.map_err(Outcome::Abort)?;
        if !client_head {
            ctx.body_bytes += rewritten.len() as u64;
            session.write_response_body(Bytes::from(rewritten), true).await.map_err(Outcome::Abort)?;
        }
        Ok(())
    }

    /// Points every URI of a playlist at `/strm/proxy/{hint}` with fresh
    /// credentials.
    pub fn rewrite_playlist(&self, text: &str, base: &Url, client_key: Option<&str>) -> String {
        let st = &*self.state;
        rewrite_playlist(&st.auth, st.public_base.as_deref().unwrap_or(""), text, base, client_key, now_unix())
    }

    async fn preflight(&self, session: &mut HttpSession, ctx: &mut Ctx) -> Result<()> {
        let mut out = ResponseHeader::build(StatusCode::NO_CONTENT, Some(8))?;
        let origin = session.req_header().headers.get(header::ORIGIN);
        if let Some((allow, echoed)) = self.state.cors.allow_origin(origin) {
            out.insert_header("Access-Control-Allow-Origin", allow)?;
            if echoed {
                out.insert_header("Vary", "Origin")?;
            }
        }
        out.insert_header("Access-Control-Allow-Methods", cors::ALLOW_METHODS)?;
        out.insert_header("Access-Control-Allow-Headers", cors::ALLOW_HEADERS)?;
        out.insert_header("Access-Control-Max-Age", cors::MAX_AGE)?;
        out.insert_header("Allow", cors::ALLOW_METHODS)?;
        out.insert_header(header::CONTENT_LENGTH, "0")?;
        ctx.status = 204;
        session.write_response_header(Box::new(out)).await
    }

    fn add_cors(&self, session: &HttpSession, out: &mut ResponseHeader) -> Result<()> {
        let origin = session.req_header().headers.get(header::ORIGIN);
        if let Some((allow, echoed)) = self.state.cors.allow_origin(origin) {
            out.insert_header("Access-Control-Allow-Origin", allow)?;
            out.insert_header("Access-Control-Expose-Headers", cors::EXPOSE_HEADERS)?;
            if echoed {
                let vary = match out.headers.get(header::VARY).and_then(|v| v.to_str().ok()) {
                    Some(v) if v.split(',').any(|t| t.trim().eq_ignore_ascii_case("origin")) => v.to_string(),
                    Some(v) => format!("{v}, Origin"),
                    None => "Origin".to_string(),
                };
                out.insert_header("Vary", vary)?;
            }
        }
        Ok(())
    }

    /// A generated answer: status, one-line reason, no caching.
    async fn reply(&self, session: &mut HttpSession, ctx: &mut Ctx, status: u16, reason: &str) -> Result<()> {
        let body = Bytes::from(format!("{reason}\n"));
        let mut out = ResponseHeader::build(status, Some(6))?;
        out.insert_header(header::CONTENT_TYPE, "text/plain; charset=utf-8")?;
        out.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
        out.insert_header(header::CACHE_CONTROL, "no-store")?;
        if status == 405 {
            out.insert_header("Allow", cors::ALLOW_METHODS)?;
        }
        self.add_cors(session, &mut out)?;
        ctx.status = status;
        let head = session.req_header().method == Method::HEAD;
        session.write_response_header(Box::new(out)).await?;
        if !head {
            session.write_response_body(body, true).await?;
        }
        Ok(())
    }
}

/// Rewrites a playlist so each child is `{prefix}/strm/proxy/{hint}?u=...`
/// with the credentials `auth` hands out.
pub fn rewrite_playlist(
    auth: &Auth,
    prefix: &str,
    text: &str,
    base: &Url,
    client_key: Option<&str>,
    now: u64,
) -> String {
    let signer = ChildSigner::new(auth, client_key, now);
    hls::rewrite(text, base, |child, out| {
        out.push_str(prefix);
        out.push_str(routing::RELAY_PREFIX);
        out.push_str(hls::hint_for(child));
        out.push('?');
        signer.push_query(child, out);
    })
}

/// The `u=` parameter, checked: present, free of whitespace and control
/// characters (never smuggled into a request line), an http(s) URL.
fn parse_u(q: &Query) -> std::result::Result<Url, Reply> {
    let raw = q.get("u").filter(|u| !u.is_empty()).ok_or(Reply(400, "missing parameter u"))?;
    if raw.bytes().any(|b| b <= b' ' || b == 0x7f) {
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

/// The downstream header: the upstream's, minus what the policy drops.
fn downstream_header(up: &ResponseHeader) -> ResponseHeader {
    let mut out = up.clone();
    let dropped: Vec<http::HeaderName> = headers::dropped_response_headers(&up.headers).cloned().collect();
    for name in &dropped {
        out.remove_header(name);
    }
    out
}

/// A body on GET/HEAD means nothing and is never forwarded; reading it (up
/// to 64 KiB) before answering keeps the client connection reusable. A
/// larger one is left for Pingora, which then closes the connection.
async fn drain_request_body(down: &mut HttpSession) -> Result<()> {
    let mut left: usize = 64 * 1024;
    while !down.is_body_done() {
        match down.read_request_body().await? {
            Some(b) if b.len() <= left => left -= b.len(),
            Some(_) | None => break,
        }
    }
    Ok(())
}

/// Reads the first `at_least` bytes of the body (or all of a shorter one).
async fn peek(resp: &mut upstream::Response, at_least: usize) -> std::result::Result<Bytes, FetchError> {
    let mut buf = Vec::new();
    while buf.len() < at_least {
        match resp.session.read_body_ref().await {
            Ok(Some(chunk)) => buf.extend_from_slice(chunk),
            Ok(None) => break,
            Err(e) => return Err(FetchError::Unreachable(e)),
        }
    }
    Ok(Bytes::from(buf))
}

/// Copies the upstream body to the client one buffer at a time. The next
/// upstream read starts only after the previous write completed, so a slow
/// client slows the upstream read; while waiting for upstream the client
/// connection is watched, so a client that leaves drops the upstream at once.
async fn pump(
    down: &mut HttpSession,
    resp: &mut upstream::Response,
    first: Option<Bytes>,
    ctx: &mut Ctx,
    write_timeout: Duration,
) -> Result<()> {
    if let Some(f) = first.filter(|f| !f.is_empty()) {
        write_down(down, &f).await?;
        ctx.body_bytes += f.len() as u64;
    }
    // A request body (never forwarded) is read and dropped while we wait;
    // after it, the client socket is watched for a hang-up. Bytes of a
    // pipelined next request are kept by Pingora for that request.
    let mut request_body_done = down.is_body_done();
    loop {
        let mut read = std::pin::pin!(resp.session.read_body_ref());
        // Upstream data already there: write on (small pieces coalesce in
        // the write buffer). About to wait: flush first, so the client has
        // everything received so far, then wait for upstream or the client.
        let ready = std::future::poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx))).await;
        let chunk = match ready {
            Poll::Ready(r) => r?,
            Poll::Pending => {
                // Bounded like every other downstream write: a client that
                // stopped reading must not park the stream forever.
                match tokio::time::timeout(write_timeout, flush_down(down)).await {
                    Ok(flushed) => flushed?,
                    Err(_) => {
                        return Error::e_explain(ErrorType::WriteTimedout, "flushing to the client")
                            .map_err(|e| e.into_down())
                    }
                }
                tokio::select! {
                    biased;
                    r = &mut read => r?,
                    client = down.read_body_or_idle(request_body_done) => {
                        match client {
                            Ok(Some(_discarded)) => continue,
                            Ok(None) => {
                                request_body_done = true;
                                continue;
                            }
                            Err(e) => return Err(e.into_down()),
                        }
                    }
                }
            }
        };
        match chunk {
            Some(bytes) => {
                write_down(down, bytes).await?;
                ctx.body_bytes += bytes.len() as u64;
            }
            None => break,
        }
    }
    down.finish_body().await
}

/// Sends whatever the downstream write buffer holds. Pingora 0.9's v1
/// server session has no public flush; a `Failed` task makes
/// `response_duplex_vec` flush the stream and hand that same error back,
/// changing nothing else (tests/binary.rs checks the effect on the wire).
async fn flush_down(down: &mut HttpSession) -> Result<()> {
    const MARKER: ErrorType = ErrorType::Custom("anibridge-flush");
    if let HttpSession::H1(s) = down {
        let tasks = vec![HttpTask::Body(None, false), HttpTask::Failed(Error::new(MARKER))];
        match s.response_duplex_vec(tasks).await {
            Err(e) if *e.etype() == MARKER => {}
            Err(e) => return Err(e.into_down()),
            Ok(_) => {}
        }
    }
    Ok(())
}

async fn write_down(down: &mut HttpSession, bytes: &[u8]) -> Result<()> {
    // A zero-length write would end a chunked response early.
    if bytes.is_empty() {
        return Ok(());
    }
    let written = match down {
        HttpSession::H1(s) => s.write_body(bytes).await.map(|_| ()),
        other => other.write_response_body(Bytes::copy_from_slice(bytes), false).await,
    };
    // A failed write is the client's side (gone, or too slow).
    written.map_err(|e| e.into_down())
}

/// Undoes a `Content-Encoding` (servers may ignore our `identity`), bounded.
fn decode_playlist(body: Vec<u8>, encoding: Option<&str>, max: usize) -> std::result::Result<String, String> {
    use std::io::Read;
    let raw = match encoding.map(|e| e.trim().to_ascii_lowercase()) {
        None => body,
        Some(e) if e.is_empty() || e == "identity" => body,
        Some(e) => {
            let mut out = Vec::new();
            let limit = (max + 1) as u64;
            let n = match e.as_str() {
                "gzip" | "x-gzip" => flate2::read::MultiGzDecoder::new(&body[..]).take(limit).read_to_end(&mut out),
                "deflate" => flate2::read::ZlibDecoder::new(&body[..]).take(limit).read_to_end(&mut out),
                other => return Err(format!("unsupported content-encoding {other}")),
            }
            .map_err(|e| e.to_string())?;
            if n > max {
                return Err("decoded playlist exceeds stream.max_playlist_bytes".into());
            }
            out
        }
    };
    Ok(String::from_utf8_lossy(&raw).into_owned())
}
