//! Fetching the answer to a request and answering with it: from the shared
//! cache when it holds (or is filling) the object, else one upstream
//! attempt ([`Proxy::fetch`]); then what the answer is ([`decide`]) and how
//! it goes out ([`relay`], [`playlist`]).

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;

use http::header::{self, HeaderMap};
use http::Method;
use pingora::protocols::http::ServerSession;
use pingora_http::ResponseHeader;

use super::decide::{self, Answer, Asked, Children, Decision};
use super::relay::{relay, unless_client_leaves};
use super::reply::{Failure, Outcome};
use super::source::{Ahead, Borrow, Memory, Source};
use super::{playlist, Ctx, Proxy};
use crate::cache::{self, AheadSlot, Found, Key, Ready, Want};
use crate::metrics::CacheResult;
use crate::upstream::{Client, FetchError, Request, Response};

impl Proxy {
    /// Counts an attempt at answering the request (the second is `/strm/stream`'s retry).
    pub(super) fn attempt(&self, ctx: &mut Ctx) {
        ctx.attempts += 1;
        if ctx.attempts > 1 {
            self.state.metrics.retries.inc();
        }
    }

    /// The answer to `req`: from the cache (a stored object, or a fill in
    /// flight, which this request may start), else from the upstream. The
    /// egress policy is judged first, so memory never answers a request
    /// that would have been refused. Waits are given up when the client
    /// leaves (`Err(Abort)`).
    pub(super) async fn fetch(
        &self,
        down: &mut ServerSession,
        ctx: &mut Ctx,
        req: Request,
    ) -> Result<Result<Source, FetchError>, Outcome> {
        let st = &*self.state;
        let want = st.cache.as_ref().and_then(|_| want(&req, &down.req_header().headers));
        let (Some(cache), Some(want)) = (&st.cache, want) else {
            if st.cache.is_some() {
                self.count_cache(ctx, CacheResult::Bypass);
            }
            return self.open(down, ctx, req).await;
        };
        if let Err(e) = unless_client_leaves(down, pin!(st.client.admit(&req))).await? {
            return Ok(Err(e));
        }
        let key = Key::new(&req.url, st.client.added_headers(&req));
        let chunk = cache.settings().chunk;
        let mut want = want;
        loop {
            let fill = || {
                let mut fill = req.clone();
                self.forwarding(down, &mut fill);
                fill
            };
            return match cache.find(key.clone(), want, &st.client, fill) {
                Found::Hit(entry) => {
                    // A HEAD that waited for another's answer shared its fetch.
                    let shared = want == Want::HeadAgain;
                    self.count_cache(ctx, if shared { CacheResult::Coalesced } else { CacheResult::Hit });
                    Ok(Ok(Source::Memory(Memory::new(entry, req, chunk))))
                }
                Found::Coalesced(entry) => {
                    let ready = unless_client_leaves(down, pin!(entry.ready())).await?;
                    match ready {
                        Ready::Head => {
                            // A range sent upstream alone asks the fill's own URL
                            // (after its redirects, as a resumption of it does): its
                            // host is the one whose slot the fill holds.
                            // (Only for a range; boxed: the rare redirected case must
                            // not grow every request's future.)
                            let ranged = down.req_header().headers.contains_key(header::RANGE);
                            let redirected = entry.head().filter(|h| ranged && h.url != req.url);
                            let redirected =
                                redirected.map(|h| Box::new(Request { url: h.url.clone(), ..req.clone() }));
                            let alone = redirected.as_deref().unwrap_or(&req);
                            let mut tries = 2;
                            let mut far = false;
                            while let Some(slot) = self.ahead_slot(down, alone, &entry, &mut far).await? {
                                if let Some(up) = self.ahead_alone(down, ctx, alone, slot.lent()).await? {
                                    return Ok(Ok(Ahead::of(up, entry, slot, chunk)));
                                }
                                drop(slot);
                                // A hoster that refused a second connection taught the
                                // gate its limit of one: the fill may lend its slot now.
                                tries -= 1;
                                let host = alone.url.host_str().unwrap_or_default();
                                if tries == 0 || !st.client.gate().full_with_one(host, entry.holds_its_slot()) {
                                    break;
                                }
                            }
                            self.count_cache(ctx, CacheResult::Coalesced);
                            // Far ahead: it goes upstream alone once the host has
                            // room, or, at a host that allows one connection, borrows
                            // the fill's once it alone reads the fill. (Judged then,
                            // not now: the fill may be on its way back from a seek
                            // that just left, a cooldown may end, a limit the host
                            // taught may change.)
                            let borrow = far.then(|| {
                                let mut req = alone.clone();
                                self.forwarding(down, &mut req);
                                Borrow { state: self.state.clone(), req }
                            });
                            let memory = Memory::new(entry, req, chunk);
                            Ok(Ok(Source::Memory(match borrow {
                                Some(borrow) => memory.borrowing(borrow),
                                None => memory,
                            })))
                        }
                        Ready::Declined => {
                            self.count_cache(ctx, CacheResult::Bypass);
                            self.open(down, ctx, req).await
                        }
                        // The host refused the fill's request: that answer is
                        // its own client's; this one looks again (and may lead
                        // the next fill, through the gate).
                        Ready::Refused => continue,
                        Ready::Failed(e) => {
                            self.count_cache(ctx, CacheResult::Coalesced);
                            Ok(Err(e))
                        }
                    }
                }
                Found::Led(entry, handoff) => {
                    self.count_cache(ctx, CacheResult::Miss);
                    if log::log_enabled!(target: "access", log::Level::Info) {
                        ctx.upstream_host = req.url.host_str().unwrap_or_default().to_string();
                    }
                    let ready = unless_client_leaves(down, pin!(entry.ready())).await?;
                    match ready {
                        Ready::Head => {
                            ctx.upstream_status = entry.head().map_or(0, |h| h.upstream_status);
                            Ok(Ok(Source::Memory(Memory::new(entry, req, chunk))))
                        }
                        Ready::Failed(e) => Ok(Err(e)),
                        Ready::Declined | Ready::Refused => match handoff.await {
                            Ok(resp) => {
                                ctx.upstream_status = resp.header().status.as_u16();
                                Ok(Ok(Source::Upstream(resp)))
                            }
                            // The fill ended otherwise (it cannot: it hands a declined answer over).
                            Err(_) => Ok(Err(FetchError::Request("the cache fill ended without an answer"))),
                        },
                    }
                }
                Found::HeadWait(mut asking) => {
                    // Another HEAD of this object is upstream: its answer
                    // answers this one too. Given up unanswered (its client
                    // left), a waiter asks in its place.
                    let answered = unless_client_leaves(down, pin!(asking.changed())).await?.is_ok();
                    if let Some(entry) = asking.borrow_and_update().clone() {
                        self.count_cache(ctx, CacheResult::Coalesced);
                        return Ok(Ok(Source::Memory(Memory::new(entry, req, chunk))));
                    }
                    want = if answered { Want::HeadAgain } else { Want::Head };
                    continue;
                }
                Found::Miss(lead) => {
                    self.count_cache(ctx, CacheResult::Miss);
                    let opened = self.open(down, ctx, req).await?;
                    if want == Want::Join {
                        // The whole object came anyway: stored, and shared meanwhile.
                        return Ok(opened.map(|src| match src {
                            Source::Upstream(resp) => match cache.adopt(key, resp) {
                                Ok((entry, request, status)) => {
                                    Source::Memory(Memory::fetched(entry, request, chunk, status))
                                }
                                Err(resp) => Source::Upstream(resp),
                            },
                            memory => memory,
                        }));
                    }
                    // A HEAD's answer goes to the HEADs that waited for it,
                    // and is kept when it can be, so the next HEAD never
                    // reaches the upstream; not shared, they look again.
                    let shared = match (&opened, want) {
                        (Ok(Source::Upstream(resp)), Want::Head | Want::HeadAgain) => {
                            cache.head_answered(key, resp.header(), resp.url().clone())
                        }
                        _ => None,
                    };
                    if let Some(lead) = lead {
                        // A host's refusal answers none of the HEADs that
                        // waited: given up unanswered, one of them asks in
                        // its turn, through the gate, and the rest wait for it.
                        let refused = matches!(&opened, Ok(src) if crate::gate::is_refusal(src.header()));
                        if !refused {
                            lead.answered(shared);
                        }
                    }
                    Ok(opened)
                }
            };
        }
    }

    /// The slot to fetch `req`'s range upstream alone, ahead of `entry`'s
    /// fill ([`cache::Entry::ahead_slot`]): when it starts further ahead than the
    /// fill brings within [`PATIENCE`] and the host has a slot free. In the
    /// fill's first moments, while its pace is not known yet, it looks
    /// again shortly. While another range of the file has the slot (an
    /// index fetched in milliseconds, or a seek until the fill catches up),
    /// it waits for its turn, looking again each [`PATIENCE`] in case the
    /// fill is near by then. `None`: wait for the fill. `far`: set when the
    /// range was found further ahead than the fill brings within [`PATIENCE`].
    async fn ahead_slot(
        &self,
        down: &mut ServerSession,
        req: &Request,
        entry: &Arc<cache::Entry>,
        far: &mut bool,
    ) -> Result<Option<AheadSlot>, Outcome> {
        let Some(first) = ahead_of_fill(&down.req_header().headers, req, entry) else { return Ok(None) };
        let host = req.url.host_str().unwrap_or_default();
        loop {
            match entry.arrives_within(first, PATIENCE) {
                Some(true) => return Ok(None),
                Some(false) => *far = true,
                None => {
                    unless_client_leaves(down, pin!(tokio::time::sleep(PACE_KNOWN))).await?;
                    continue;
                }
            }
            if entry.lent_to_a_seek() {
                if !lent_for(entry, first) {
                    // Waiting for the fill, as its reader, takes the connection back.
                    return Ok(None);
                }
                // The file's short end: the connection is taken back from the
                // seek, then lent to it in its turn (looked at again below).
                entry.claim();
            }
            let mut done = pin!(entry.ahead_done());
            done.as_mut().enable();
            if let Some(slot) = entry.ahead_slot() {
                let gate = self.state.client.gate();
                // A seek (not the file's short end) would hold the fill up
                // for as long as it is watched: lent the slot only while
                // nobody reads the fill, which takes it back for the first
                // reader that waits for it.
                let short = lent_for(entry, first);
                let go = gate.has_room(host)
                    || (gate.full_with_one(host, entry.holds_its_slot())
                        && (short || entry.unread())
                        && entry.lend(!short));
                return Ok(go.then_some(slot));
            }
            let _ = unless_client_leaves(down, pin!(tokio::time::timeout(PATIENCE, done))).await?;
        }
    }

    /// A range far ahead of the fill it joined, sent upstream alone (a
    /// range memory cannot answer in time: relayed to this client only, as
    /// any partial answer), on the host's slot the fill `lent` it, if it
    /// did. `None` when the upstream fails it or does not answer with
    /// those bytes (an error status, a refusal, the whole file again): the
    /// request waits for the fill after all, which brings them.
    async fn ahead_alone(
        &self,
        down: &mut ServerSession,
        ctx: &mut Ctx,
        req: &Request,
        lent: Option<Arc<crate::gate::Lent>>,
    ) -> Result<Option<Response>, Outcome> {
        let host = req.url.host_str().unwrap_or_default();
        // (Boxed: rare, and what it holds would widen every request's future.)
        let lent = Box::pin(self.state.client.gate().borrow(lent, host)).await;
        match Box::pin(self.open_by(down, ctx, req.clone(), move |c, req| c.open_on(req, lent))).await? {
            Ok(Source::Upstream(resp)) if resp.header().status == http::StatusCode::PARTIAL_CONTENT => {
                self.count_cache(ctx, CacheResult::Miss);
                Ok(Some(resp))
            }
            other => {
                let why = match &other {
                    Ok(src) => src.header().status.as_u16().to_string(),
                    Err(e) => e.to_string(),
                };
                log::debug!("a range ahead of a cache fill, sent upstream alone, failed ({why}): read from the fill");
                // Its access line is a coalesced reader's, which names no upstream.
                ctx.upstream_status = 0;
                ctx.upstream_host.clear();
                if let Ok(src) = other {
                    src.finish().await;
                }
                Ok(None)
            }
        }
    }

    /// Opens the upstream response: one attempt, recorded for the log and
    /// metrics, given up when the client leaves.
    pub(super) fn open<'a>(
        &'a self,
        down: &'a mut ServerSession,
        ctx: &'a mut Ctx,
        req: Request,
    ) -> impl Future<Output = Result<Result<Source, FetchError>, Outcome>> + Send + 'a {
        self.open_by(down, ctx, req, Client::open)
    }

    /// [`Proxy::open`] by `open` (which may hold what the common path
    /// does not: a slot lent to the request).
    async fn open_by<'a, F>(
        &'a self,
        down: &'a mut ServerSession,
        ctx: &'a mut Ctx,
        mut req: Request,
        open: impl FnOnce(&'a Client, Request) -> F,
    ) -> Result<Result<Source, FetchError>, Outcome>
    where
        F: Future<Output = Result<Response, FetchError>> + Send + 'a,
    {
        self.forwarding(down, &mut req);
        let access_log = log::log_enabled!(target: "access", log::Level::Info);
        if access_log {
            ctx.upstream_host = req.url.host_str().unwrap_or_default().to_string();
        }
        let resp = match unless_client_leaves(down, pin!(open(&self.state.client, req))).await? {
            Ok(resp) => resp,
            Err(e) => return Ok(Err(e)),
        };
        ctx.upstream_status = resp.header().status.as_u16();
        if access_log && resp.redirects() > 0 {
            ctx.upstream_host = resp.url().host_str().unwrap_or_default().to_string();
        }
        Ok(Ok(Source::Upstream(resp)))
    }

    /// Reads the client's headers that go upstream into `req`, once. Only
    /// a request that goes upstream needs them (an answer from memory never
    /// does), so the request path leaves them out until then.
    fn forwarding(&self, down: &ServerSession, req: &mut Request) {
        if req.forwarded.is_empty() {
            req.forwarded = self.state.client.forwarded(&down.req_header().headers);
        }
    }

    fn count_cache(&self, ctx: &mut Ctx, result: CacheResult) {
        ctx.cache = Some(result);
        self.state.metrics.count_cache(result);
    }

    /// The answer for an upstream failure before any response: logged,
    /// counted, one failure. A failure of a fetch shared with other
    /// requests (a fill this one joined) is said and counted once, by the
    /// request that started it, not once per viewer (each has its access
    /// line).
    pub(super) fn fetch_failed(&self, ctx: &Ctx, e: &FetchError) -> Outcome {
        if ctx.cache == Some(CacheResult::Coalesced) {
            log::debug!("upstream failed (a fetch another request started and said): {e}");
            return Failure::from(e).into();
        }
        // The gate's own 503s: the cooldown was said when it began, a
        // host's busy refusals are said once a minute (`crate::gate`);
        // each is counted and has its access line.
        if let FetchError::Gate(_) = e {
            log::debug!("upstream gate refused: {e}");
            return Failure::from(e).into();
        }
        if let FetchError::Refused(r) = e {
            self.state.metrics.egress_refusals.with_label_values(&[r.label()]).inc();
        }
        log::warn!("upstream failed: {e}");
        Failure::from(e).into()
    }

    /// A body that failed before anything was sent.
    pub(super) fn body_failed(&self, ctx: &Ctx, e: Box<pingora_error::Error>) -> Outcome {
        self.fetch_failed(ctx, &FetchError::from_pingora(e))
    }

    /// Decides what the answer is and answers with it: relayed as it is (or
    /// from memory, by the client's range and conditionals), or, for a
    /// playlist, read whole and rewritten — fetched again whole when this
    /// answer cannot give it so (a partial answer to a range, a HEAD).
    /// `client_key` is handed on to a playlist's children.
    pub(super) async fn respond(
        &self,
        down: &mut ServerSession,
        ctx: &mut Ctx,
        mut src: Source,
        asked: &Asked<'_>,
        client_key: Option<&str>,
    ) -> Result<(), Outcome> {
        let st = &*self.state;
        let mut first: Option<Vec<u8>> = None;
        // A HEAD fetched again as a GET that then was no playlist is
        // answered with its own first response's header (with whether that
        // header came from memory, the header policy applied already).
        let mut own: Option<(ResponseHeader, bool, bool)> = None;
        let mut refetched = false;
        loop {
            let answer = answer_of(&src);
            match decide::decide(asked, &answer, first.as_deref()) {
                Decision::Sniff => {
                    let head = src.peek(decide::SNIFF).await.map_err(|e| self.body_failed(ctx, e))?;
                    first = Some(head);
                }
                Decision::Playlist => {
                    let first = first.unwrap_or_default();
                    // Boxed: the rare playlist path must not inflate every request's future.
                    let route = match asked.children {
                        Children::Route(i) => st.routes.get(i),
                        _ => None,
                    };
                    return Box::pin(playlist::answer(st, down, ctx, src, first, client_key, route)).await;
                }
                Decision::Refetch if refetched => {
                    log::warn!("{} gave no whole playlist when asked again", src.url().host_str().unwrap_or("-"));
                    return Err(Failure::PlaylistUnavailable.into());
                }
                Decision::Refetch => {
                    if asked.head {
                        own = Some((answer.header.clone(), answer.head_fallback, answer.relayable));
                    }
                    let whole = Request { method: Method::GET, whole: true, ..src.request().clone() };
                    src.finish().await;
                    src = Box::pin(self.fetch(down, ctx, whole)).await?.map_err(|e| self.fetch_failed(ctx, &e))?;
                    refetched = true;
                    first = None;
                }
                Decision::Relay { hls } => {
                    let answer = match &own {
                        Some((header, head_fallback, relayable)) => {
                            Answer { header, head_fallback: *head_fallback, relayable: *relayable, ..answer }
                        }
                        None => answer,
                    };
                    // From memory: the whole object answers the client's range and
                    // conditionals; anything else (an error status) goes out as it is.
                    let memory = match &src {
                        Source::Memory(m) => Some((m.shaped() && own.is_none(), m.head().len, m.head().age())),
                        Source::Upstream(_) | Source::Ahead(_) => None,
                    };
                    let (mut out, range) = match memory {
                        Some((true, len, age)) => {
                            let mut out = decide::relay_header(&Asked { range: false, ..*asked }, &answer, hls)?;
                            let plan = cache::plan(&down.req_header().headers, &answer.header.headers, len)
                                .unwrap_or(cache::Plan::Whole);
                            cache::shape(&mut out, plan, len, age)?;
                            (out, Some(plan.body(len)))
                        }
                        Some((false, len, _)) => (decide::relay_header(asked, &answer, hls)?, Some((0, len))),
                        None => (decide::relay_header(asked, &answer, hls)?, None),
                    };
                    let first = match (&mut src, range) {
                        (Source::Memory(m), Some((from, to))) => {
                            m.select(from, to);
                            Vec::new()
                        }
                        _ => first.unwrap_or_default(),
                    };
                    st.cors.apply(down.req_header().headers.get(header::ORIGIN), &mut out)?;
                    return relay(st, down, ctx, src, out, first, asked.head).await;
                }
            }
        }
    }
}

/// What a request may do with the cache, or `None`: it goes upstream as it
/// is (several ranges, a range or unit memory cannot answer, another
/// method).
fn want(req: &Request, client: &HeaderMap) -> Option<Want> {
    if req.whole {
        // A playlist: fetched whole, without the client's range or conditionals.
        return Some(Want::Fill);
    }
    let range = client.get(header::RANGE);
    if range.is_some_and(|r| !cache::answerable_range(r)) {
        return None;
    }
    if req.method == Method::HEAD {
        return Some(Want::Head);
    }
    if req.method != Method::GET {
        return None;
    }
    let conditional = client.contains_key(header::IF_NONE_MATCH) || client.contains_key(header::IF_MODIFIED_SINCE);
    let whole = range.is_none_or(|r| r.as_bytes() == b"bytes=0-");
    Some(if whole && !conditional { Want::Fill } else { Want::Join })
}

/// How soon the bytes a range joining a fill asks for must be on their
/// way for it to wait for them rather than go upstream alone: about what a
/// new upstream request takes to bring its first byte.
pub(super) const PATIENCE: std::time::Duration = std::time::Duration::from_secs(1);

/// How often a range looks again whether a fill's pace is known yet (it
/// is at most three quarters of a second into the fill's body,
/// [`cache::Entry::arrives_within`]).
const PACE_KNOWN: std::time::Duration = std::time::Duration::from_millis(50);

/// Whether the fill of `entry` may lend its host's only slot to a range
/// from `first` to the end of the body, whoever reads the fill: one that
/// short (an MP4's index; the fill waits for it). A long one (a seek)
/// would hold the fill up for minutes: it borrows the slot only while
/// nobody reads the fill ([`cache::Entry::lend`]), else waits for the fill.
fn lent_for(entry: &cache::Entry, first: u64) -> bool {
    entry.head().is_some_and(|h| h.len.saturating_sub(first) <= (h.len / 16).min(LENT_AT_MOST))
}

/// The most bytes a fill lends its slot for ([`lent_for`]): more than an
/// MP4's index holds (0.7 MB for a 24-minute episode, a few MB for a film).
const LENT_AT_MOST: u64 = 8 << 20;

/// The first byte of the range `req` (a GET with the client's headers
/// `client`) asks of a fill of a whole object in progress, from an
/// upstream that answers ranges: what may be fetched ahead of the fill.
fn ahead_of_fill(client: &HeaderMap, req: &Request, entry: &cache::Entry) -> Option<u64> {
    if req.method != Method::GET || req.whole || entry.is_done() || !client.contains_key(header::RANGE) {
        return None;
    }
    let head = entry.head().filter(|h| h.whole)?;
    // A server that would send the whole file again is not asked.
    let ranges = head.upstream_status == 206
        || head.header.headers.get(header::ACCEPT_RANGES).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"bytes"));
    match cache::plan(client, &head.header.headers, head.len) {
        Some(cache::Plan::Part(first, _)) if ranges => Some(first),
        _ => None,
    }
}

/// What the decision needs to know of an answer.
fn answer_of(src: &Source) -> Answer<'_> {
    Answer {
        header: src.header(),
        path: src.url().path(),
        head_sent: src.sent_head(),
        head_fallback: src.head_fallback(),
        relayable: matches!(src, Source::Memory(_)),
    }
}
