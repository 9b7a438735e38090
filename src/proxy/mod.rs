//! The `ProxyHttp` glue. Pingora parses the request and runs the hooks;
//! `request_filter` answers every request itself ([`serve`]): it routes and
//! authenticates, opens the upstream through [`crate::upstream::Client`]
//! (Pingora's connector and HTTP/1.1 client, pooled connections), decides
//! what the response is ([`decide`]) and relays it ([`relay`]) or rewrites
//! it ([`playlist`]) — so redirects, the HEAD fallback, the refresh-and-retry
//! and playlist rewriting all happen before the first byte goes downstream,
//! and the body is pumped one buffer at a time with end-to-end backpressure.

pub mod decide;
mod live;
pub mod playlist;
mod relay;
mod reply;
mod respond;
mod sendfile;
mod serve;
mod source;
mod state;
mod stream;
mod verified;

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use pingora::modules::http::HttpModules;
use pingora::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

pub use playlist::rewrite_playlist;
pub use reply::{Failure, Outcome};
pub use state::State;

use crate::access;
use crate::metrics::{CacheResult, Held, RouteLabel};

/// The Pingora application.
pub struct Proxy {
    pub state: Arc<State>,
}

impl Proxy {
    pub fn new(state: Arc<State>) -> Proxy {
        Proxy { state }
    }
}

/// Per-request facts, for the access log and metrics (opaque outside).
pub struct Ctx {
    route: RouteLabel,
    /// The static route, for its prefix.
    route_index: Option<usize>,
    start: Instant,
    /// When the response header went out.
    first_byte: Option<Instant>,
    /// The client's `X-Request-Id` or a new one; returned in the response.
    request_id: String,
    /// Resumptions of the body mid-way.
    resumed: u32,
    status: u16,
    upstream_status: u16,
    upstream_host: String,
    body_bytes: u64,
    /// Of them, bytes read from memory by a range that went upstream ahead
    /// of a fill and was handed over to it (a hit's or coalesced reader's
    /// bytes are from memory but for `fetched_bytes`).
    memory_bytes: u64,
    /// Of them, bytes from an upstream fetch of its own (a hit's or
    /// coalesced reader's borrow, [`source::Source::fetched_bytes`]).
    fetched_bytes: u64,
    attempts: u32,
    refreshed: bool,
    /// What the cache did (`None`: it is off).
    cache: Option<CacheResult>,
    /// `in_flight` is raised while the request lives, even if it panics
    /// (shutdown waits for it to reach zero).
    _in_flight: Held,
}

#[async_trait]
impl ProxyHttp for Proxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            route: RouteLabel::Unrouted,
            route_index: None,
            start: Instant::now(),
            first_byte: None,
            request_id: String::new(),
            resumed: 0,
            status: 0,
            upstream_status: 0,
            upstream_host: String::new(),
            body_bytes: 0,
            memory_bytes: 0,
            fetched_bytes: 0,
            attempts: 0,
            refreshed: false,
            cache: None,
            _in_flight: Held::new(&self.state.metrics.in_flight),
        }
    }

    /// No downstream modules: bodies are relayed byte for byte.
    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        // No proxy modules are installed, so pingora-proxy's `Session` adds
        // nothing to the downstream session it wraps: work on that.
        self.serve(session.as_downstream_mut(), ctx).await.map(|()| true)
    }

    /// Never reached: `request_filter` always answers.
    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        Error::e_explain(ErrorType::InternalError, "request_filter answers every request")
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        // A response already started is aborted (the connection is dropped);
        // otherwise the client gets a one-line 502.
        if session.response_written().is_none() && !matches!(e.esource(), ErrorSource::Downstream) {
            let _ = reply::reply(session.as_downstream_mut(), ctx, &self.state.cors, Failure::UpstreamFailed).await;
            return FailToProxy { error_code: 502, can_reuse_downstream: false };
        }
        FailToProxy { error_code: 0, can_reuse_downstream: false }
    }

    /// What Pingora prints beside its own error lines: method and path
    /// only, never the query (`u`, `sig`, `apikey` live there).
    fn request_summary(&self, session: &Session, ctx: &Ctx) -> String {
        let req = session.req_header();
        format!("{} {} route={}", req.method, req.uri.path(), ctx.route.as_str())
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &Ctx, e: &Error) -> bool {
        // Clients going away mid-stream is ordinary for media players; a
        // fill that died was logged once (src/cache/fill.rs), not once per
        // reader, and an upstream body that could not be resumed once by the
        // response, as a WARN (each access line still says it failed).
        matches!(e.esource(), ErrorSource::Downstream)
            || crate::cache::is_fill_failure(e)
            || crate::upstream::is_logged_body_failure(e)
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        crate::header_guard::ended(session.as_downstream());
        let st = &*self.state;
        let m = &st.metrics;
        let status =
            if ctx.status == 0 { session.response_written().map_or(0, |r| r.status.as_u16()) } else { ctx.status };
        m.count_request(ctx.route, ctx.route_index, status);
        m.bytes_relayed.inc_by(ctx.body_bytes);
        if matches!(ctx.cache, Some(CacheResult::Hit | CacheResult::Coalesced)) {
            m.cache_saved.inc_by(ctx.body_bytes.saturating_sub(ctx.fetched_bytes));
        } else if ctx.memory_bytes > 0 {
            m.cache_saved.inc_by(ctx.memory_bytes);
        }
        if log::log_enabled!(target: "access", log::Level::Info) {
            let req = session.req_header();
            if ctx.request_id.is_empty() {
                ctx.request_id = access::request_id(None);
            }
            let user_agent = access::header_text(req.headers.get(http::header::USER_AGENT));
            let line = access::Line {
                at: None,
                client: &self.client(session.as_downstream()),
                method: req.method.as_str(),
                path: req.uri.path(),
                route: self.route_name(ctx),
                status,
                bytes: ctx.body_bytes,
                ms: ctx.start.elapsed().as_millis() as u64,
                ttfb_ms: ctx.first_byte.map(|t| t.duration_since(ctx.start).as_millis() as u64),
                upstream_host: &ctx.upstream_host,
                upstream_status: ctx.upstream_status,
                cache: ctx.cache.map_or("", CacheResult::as_str),
                resumed: ctx.resumed,
                user_agent: &user_agent,
                request_id: &ctx.request_id,
                error: e.map(|e| e.etype().as_str()),
                cut: false,
            };
            log::info!(target: "access", "{}", line.render(st.log_format));
        }
    }
}

impl Proxy {
    /// The client's address for the log: the peer, or what trusted
    /// proxies' `X-Forwarded-For` names.
    fn client(&self, down: &pingora::protocols::http::ServerSession) -> String {
        let peer = down.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip());
        let forwarded_for = access::forwarded_for(&down.req_header().headers);
        access::client_address(peer, forwarded_for.as_ref(), &self.state.trusted_proxies)
    }

    /// The `route` of the log: `relay`, `stream`, a route's prefix, ...
    fn route_name(&self, ctx: &Ctx) -> &str {
        self.state.route_name(ctx.route, ctx.route_index)
    }
}

impl Ctx {
    /// Stamps a response header about to go out: the request id, and the
    /// time of the first byte.
    fn sending(&mut self, out: &mut pingora_http::ResponseHeader) -> pingora_error::Result<()> {
        self.first_byte = Some(Instant::now());
        if !self.request_id.is_empty() {
            out.insert_header("X-Request-Id", self.request_id.as_str())?;
        }
        Ok(())
    }
}
