//! An upstream response that owns its connection: its body is read through
//! it, [`Response::finish`] gives the connection back to the pool, and a
//! response dropped unfinished closes it. A body whose connection dies or
//! stalls is continued from a new connection when that is safe
//! ([`super::resume`]); a playlist's body is fetched again whole instead.

use std::time::Duration;

use http::{Method, StatusCode};
use pingora::protocols::http::v1::client::HttpSession;
use pingora_error::{Error, ErrorSource, ErrorType};
use pingora_http::ResponseHeader;
use url::Url;

use super::resume::{Verdict, Window};
use super::{Ask, Client, Exchange, Request};
use crate::gate::Permit;

/// Why a whole body could not be had.
#[derive(Debug)]
pub enum BodyError {
    /// It is larger than the limit.
    TooLarge,
    /// The upstream failed, and fetching again did not help.
    Failed(Box<Error>),
}

/// An upstream response whose body is read through it.
pub struct Response {
    client: Client,
    session: HttpSession,
    /// The connection's key in the pool.
    pool_key: u64,
    /// What was asked; its URL is the final one (after redirects).
    request: Request,
    head_fallback: bool,
    /// The upstream was sent a HEAD: there is no body.
    sent_head: bool,
    redirects: u32,
    /// Body bytes handed out so far, across resumptions.
    received: u64,
    /// The slot at the host's gate, held while the body lasts.
    permit: Option<Permit>,
    recovery: Recovery,
}

/// The state of mending a body that died.
struct Recovery {
    /// A failure the last read met; the next read mends or returns it.
    failure: Option<Box<Error>>,
    attempts_left: u32,
    /// Fetch the body again whole instead of resuming it (playlists).
    whole: bool,
    /// Computed at the first failure from the first response's header
    /// (boxed: rarely there, and carried by every stream).
    window: Option<Result<Box<Window>, &'static str>>,
    /// Counts restarts of the body from its first byte (whole refetches).
    restarts: u32,
    /// Resumptions that succeeded.
    resumed: u32,
}

impl Response {
    /// `request` as asked; its URL becomes the final one.
    pub(super) fn new(client: &Client, mut ex: Exchange, mut request: Request, attempts: u32) -> Response {
        if let Some(url) = ex.redirected_to.take() {
            request.url = url;
        }
        let mut permit = ex.permit.take();
        if ex.method != Method::HEAD {
            if let Some(p) = permit.as_mut() {
                p.mid_body(true);
            }
        }
        Response {
            client: client.clone(),
            session: ex.session,
            pool_key: ex.pool_key,
            request,
            head_fallback: ex.head_fallback,
            sent_head: ex.method == Method::HEAD,
            redirects: ex.redirects,
            received: 0,
            permit,
            recovery: Recovery {
                failure: None,
                attempts_left: attempts,
                whole: false,
                window: None,
                restarts: 0,
                resumed: 0,
            },
        }
    }

    /// The upstream response header (of the current connection).
    pub fn header(&self) -> &ResponseHeader {
        self.session.resp_header().expect("a Response has its header read")
    }

    /// The final URL, after redirects: what relative playlist URIs resolve against.
    pub fn url(&self) -> &Url {
        &self.request.url
    }

    /// What was asked (its URL the final one).
    pub fn request(&self) -> &Request {
        &self.request
    }

    /// The response answers a HEAD through a `GET` + `Range` fallback.
    pub fn head_fallback(&self) -> bool {
        self.head_fallback
    }

    /// The upstream was sent a HEAD (there is no body to read).
    pub fn sent_head(&self) -> bool {
        self.sent_head
    }

    /// Resumptions that continued this body.
    pub fn resumptions(&self) -> u32 {
        self.recovery.resumed
    }

    /// Redirect hops followed to get here.
    pub fn redirects(&self) -> u32 {
        self.redirects
    }

    /// The next piece of the body, `None` at its end. A piece may be empty:
    /// the connection failed, and the next call mends that (resumes on a new
    /// connection) or returns the error.
    pub async fn read(&mut self) -> pingora_error::Result<Option<&[u8]>> {
        Ok(self.read_counted().await?.0)
    }

    /// [`Response::read`], with the times the body has been resumed up to
    /// this piece (a reader of the piece can tell it without a second
    /// borrow of the response).
    pub async fn read_counted(&mut self) -> pingora_error::Result<(Option<&[u8]>, u32)> {
        self.mend().await?;
        let resumed = self.recovery.resumed;
        match self.session.read_body_ref().await {
            Ok(Some(chunk)) => {
                self.received += chunk.len() as u64;
                Ok((Some(chunk), resumed))
            }
            Ok(None) => {
                if let Some(p) = self.permit.as_mut() {
                    p.mid_body(false);
                }
                Ok((None, resumed))
            }
            Err(e) => {
                // Mended on the next call, which may replace the session:
                // this call's result borrows it, so it cannot happen here.
                self.recovery.failure = Some(e);
                Ok((Some(&[]), resumed))
            }
        }
    }

    /// Whether the last read met a failure that the next one mends
    /// ([`Response::mend`]).
    pub fn broken(&self) -> bool {
        self.recovery.failure.is_some()
    }

    /// Mends a failure the last read met (resumes on a new connection),
    /// or returns it; nothing to do otherwise. [`Response::read`] does
    /// this first; a reader that may cancel its read (a cache fill asked
    /// to lend its slot) mends before it reads, so that a continuation,
    /// which holds the body's slot at the host, is never cancelled with
    /// it.
    pub async fn mend(&mut self) -> pingora_error::Result<()> {
        if let Some(e) = self.recovery.failure.take() {
            // Boxed: reconnecting is a large future that the read of every
            // buffer (a future made per 64 KiB) must not carry along.
            // Marked as the upstream's: a failure `recover` gave up on has
            // had its log line (see `is_logged_body_failure`).
            Box::pin(self.recover(e)).await.map_err(Error::into_up)?;
        }
        Ok(())
    }

    /// Whether this body holds its slot at the host in hand (not given
    /// out by [`Response::let_go`], nor lost between connections).
    pub fn holds_slot(&self) -> bool {
        self.permit.is_some()
    }

    /// The whole body after `prefix` (bytes already read from it), at most
    /// `limit` bytes in all. A body that dies is fetched again whole, never
    /// spliced.
    pub async fn read_to_vec(&mut self, mut body: Vec<u8>, limit: usize) -> Result<Vec<u8>, BodyError> {
        self.recovery.whole = true;
        let mut restarts = self.recovery.restarts;
        loop {
            // Mend a failure here (not inside `read`), to see a restart.
            if let Some(e) = self.recovery.failure.take() {
                Box::pin(self.recover(e)).await.map_err(BodyError::Failed)?;
            }
            if self.recovery.restarts != restarts {
                restarts = self.recovery.restarts;
                body.clear();
            }
            match self.read().await.map_err(BodyError::Failed)? {
                Some(c) if body.len() + c.len() > limit => return Err(BodyError::TooLarge),
                Some(c) => body.extend_from_slice(c),
                None => return Ok(body),
            }
        }
    }

    /// Reads the first `at_least` bytes of the body (or all of a shorter one).
    pub async fn peek(&mut self, at_least: usize) -> pingora_error::Result<Vec<u8>> {
        let mut buf = Vec::new();
        while buf.len() < at_least {
            match self.read().await? {
                Some(chunk) => buf.extend_from_slice(chunk),
                None => break,
            }
        }
        Ok(buf)
    }

    /// The same URL fetched again, whole: a `GET` without the client's
    /// `Range` and conditionals, with the same headers otherwise. This
    /// response's connection is given back first.
    pub async fn refetch_whole(mut self) -> Result<Response, super::FetchError> {
        let client = self.client.clone();
        let request = self.request.clone();
        let attempts = self.recovery.attempts_left;
        let mut permit = self.permit.take();
        self.finish().await;
        if let Some(p) = permit.as_mut() {
            p.settle().await;
        }
        let ex = client.fetch(&request, Ask::Whole, permit).await?;
        Ok(Response::new(&client, ex, Request { method: Method::GET, whole: true, ..request }, attempts))
    }

    /// Gives the connection back: to the pool when the body was read to its
    /// end (a small unread rest is drained first), closed otherwise. The
    /// host's slot is given back after the connection: a request waiting
    /// for the slot then finds the connection in the pool instead of
    /// dialling another (a hoster that allows one connection sees one).
    /// Closed mid-body, the slot is given back a moment later
    /// ([`crate::gate::SETTLE`]).
    ///
    /// Not an `async fn`: the giving back is a future of a few KiB, boxed
    /// here so that a stream's state (which awaits this at its end) stays
    /// small for as long as it streams.
    pub fn finish(self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'static>> {
        let Response { client, session, pool_key, recovery, mut permit, .. } = self;
        Box::pin(async move {
            if recovery.failure.is_none() {
                if client.finish(session, pool_key).await {
                    if let Some(p) = permit.as_mut() {
                        p.mid_body(false);
                    }
                }
            } else {
                drop(session);
            }
            drop(permit);
        })
    }

    /// Whether a body cut short here would be continued on a new
    /// connection (a `GET` for a file with a validator, not read whole).
    pub fn resumable(&mut self) -> bool {
        !self.head_fallback && self.request.method == Method::GET && !self.recovery.whole && self.window().is_ok()
    }

    /// The first response's window (what a continuation must match), or
    /// why it cannot be continued; judged once.
    fn window(&mut self) -> Result<Box<Window>, &'static str> {
        if self.recovery.window.is_none() {
            self.recovery.window = Some(Window::of(self.header()).map(Box::new));
        }
        self.recovery.window.clone().expect("computed above")
    }

    /// Lets the connection go mid-body, and hands its slot at the host out,
    /// for another request to the host that allows one at a time
    /// ([`Response::resumable`] said it may): the next read continues the
    /// body on a new connection, as after a failure, without using up an
    /// attempt — on the slot given back with [`Response::hold`], else on
    /// one it waits for at the gate.
    pub async fn let_go(&mut self) -> Option<Permit> {
        self.hang_up().await;
        let slot = self.permit.take();
        // (A failure the last read met is mended as it would have been.)
        if self.recovery.failure.is_none() {
            self.recovery.attempts_left += 1;
            self.recovery.failure = Some(Error::explain(ErrorType::ConnectionClosed, LET_GO));
        }
        slot
    }

    /// The slot [`Response::let_go`] handed out, back: the body continues on it.
    pub fn hold(&mut self, slot: Permit) {
        self.permit = Some(slot);
    }

    /// Mends the failure `e` of the current connection, or returns it.
    async fn recover(&mut self, e: Box<Error>) -> pingora_error::Result<()> {
        if !is_body_failure(&e) || self.head_fallback || self.request.method != Method::GET {
            return Err(e);
        }
        if self.recovery.whole {
            return self.refetch_in_place(e).await;
        }
        let window = match self.window() {
            Ok(window) => window,
            Err(why) => {
                log::warn!(
                    "upstream {} failed mid-body ({}); the response cannot be resumed: {why}",
                    self.host(),
                    e.etype().as_str()
                );
                return Err(e);
            }
        };
        self.hang_up().await;
        self.settle().await;
        // Let go on purpose ([`Response::let_go`]): no failure to count or report.
        let lent = e.context.as_ref().is_some_and(|c| c.as_str() == LET_GO);
        let mut tried = 0u32;
        while self.recovery.attempts_left > 0 {
            self.recovery.attempts_left -= 1;
            let Some(range) = window.rest(self.received) else { return Err(e) };
            let next = window.first + self.received;
            backoff(tried).await;
            tried += 1;
            if lent {
                log::debug!("upstream {}: continuing at byte {next} after letting the connection go", self.host());
            } else {
                log::info!(
                    "upstream {} failed after {} body bytes ({}); resuming at byte {next}",
                    self.host(),
                    self.received,
                    e.etype().as_str()
                );
                self.count(|m| m.resumes_attempted.inc());
            }
            let ask = Ask::Resume { range, if_range: window.if_range.clone() };
            match self.client.fetch(&self.request, ask, self.permit.take()).await {
                Ok(mut ex) => match window.judge(next, ex.session.resp_header().expect("an exchange has its header")) {
                    Verdict::Continue => {
                        self.carry_on(ex);
                        if !lent {
                            self.count(|m| m.resumes_succeeded.inc());
                            self.recovery.resumed += 1;
                        }
                        return Ok(());
                    }
                    Verdict::Retry(why) => {
                        let status = ex.session.resp_header().map_or(0, |h| h.status.as_u16());
                        log::warn!("resuming {} failed: {why} ({status})", self.host());
                        self.permit = ex.slot_for_another_try();
                        self.client.finish(ex.session, ex.pool_key).await;
                        if crate::resolver::STALE.contains(&status) {
                            self.resolve_again(status).await;
                        }
                    }
                    Verdict::Changed(why) => {
                        log::warn!("not resuming {}: {why}", self.host());
                        return Err(e);
                    }
                },
                Err(fe) => log::warn!("resuming {} failed: {fe}", self.host()),
            }
        }
        log::warn!("upstream {} failed mid-body; no resumption left", self.host());
        Err(e)
    }

    /// The resolved URL this body comes from answered a continuation with
    /// `status`, one that says it has gone stale (an expired link): it is
    /// resolved once more, if the request still may ([`Request::again`]),
    /// and the next try asks the new URL — under the same checks (`If-Range`,
    /// length, `ETag`), so bytes of another file are never spliced in.
    async fn resolve_again(&mut self, status: u16) {
        let (Some(again), Some(stale)) = (self.request.again.take(), self.request.extra.clone()) else { return };
        match again.resolve(&stale).await {
            Ok(fresh) => {
                log::info!("resolved URL answered a continuation {status}; resolved once more");
                self.count(|m| m.refreshes.inc());
                self.request.url = fresh.url.clone();
                self.request.extra = Some(fresh);
            }
            Err(e) => log::warn!("resolver unavailable: {e}"),
        }
    }

    /// A playlist's body died: fetch it again whole, from its first byte.
    async fn refetch_in_place(&mut self, e: Box<Error>) -> pingora_error::Result<()> {
        self.hang_up().await;
        self.settle().await;
        let mut tried = 0u32;
        while self.recovery.attempts_left > 0 {
            self.recovery.attempts_left -= 1;
            backoff(tried).await;
            tried += 1;
            log::info!("upstream {} failed mid-playlist ({}); fetching it again", self.host(), e.etype().as_str());
            match self.client.fetch(&self.request, Ask::Whole, self.permit.take()).await {
                Ok(ex) if ex.session.resp_header().is_some_and(|h| h.status == StatusCode::OK) => {
                    self.carry_on(ex);
                    self.received = 0;
                    self.recovery.restarts += 1;
                    return Ok(());
                }
                Ok(mut ex) => {
                    self.permit = ex.slot_for_another_try();
                    self.client.finish(ex.session, ex.pool_key).await;
                }
                Err(fe) => log::warn!("fetching {} again failed: {fe}", self.host()),
            }
        }
        Err(e)
    }

    /// Says goodbye on the connection that failed before another is
    /// dialled: a hoster that stalled (the read timed out) still counts
    /// that connection as ours, and one that allows a single connection per
    /// address would refuse the resumption beside it. (Closed for good when
    /// the new connection replaces it.)
    async fn hang_up(&mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.session.shutdown()).await;
    }

    /// The body goes on over `ex`, the new connection, and its slot
    /// ([`Permit::mid_body`] from now on).
    fn carry_on(&mut self, mut ex: Exchange) {
        self.permit = ex.permit.take();
        if let Some(p) = self.permit.as_mut() {
            p.mid_body(true);
        }
        self.session = ex.session;
        self.pool_key = ex.pool_key;
    }

    /// Before the slot kept for another try asks the host again, lets the
    /// connection just closed mid-body settle ([`Permit::settle`]).
    async fn settle(&mut self) {
        if let Some(p) = self.permit.as_mut() {
            p.settle().await;
        }
    }

    /// The upstream host, for logs (never the path or query: tokens live there).
    fn host(&self) -> &str {
        self.request.url.host_str().unwrap_or("-")
    }

    fn count(&self, f: impl FnOnce(&crate::metrics::Metrics)) {
        if let Some(m) = self.client.metrics() {
            f(m);
        }
    }
}

#[cfg(test)]
impl Response {
    /// A response over a session that has read its header (in-memory tests).
    pub(crate) fn over(client: &Client, session: HttpSession) -> Response {
        let request = Request {
            method: Method::GET,
            url: Url::parse("http://origin.test/x").expect("a valid URL"),
            forwarded: Vec::new(),
            extra: None,
            again: None,
            trusted: None,
            whole: false,
        };
        let ex = Exchange {
            session,
            pool_key: 0,
            method: Method::GET,
            redirected_to: None,
            head_fallback: false,
            redirects: 0,
            permit: None,
        };
        Response::new(client, ex, request, 0)
    }
}

/// An upstream body failure a response gave up on, which it has logged
/// (why it could not be resumed, or that no resumption was left): Pingora
/// need not print it again as an ERROR.
pub fn is_logged_body_failure(e: &Error) -> bool {
    matches!(e.esource(), ErrorSource::Upstream) && is_body_failure(e)
}

/// Why a body's connection was let go on purpose ([`Response::let_go`]).
const LET_GO: &str = "its connection was let go for another request";

/// Errors of a body read that a new connection may mend: the connection
/// closed or failed, or stalled past the read timeout.
fn is_body_failure(e: &Error) -> bool {
    matches!(e.etype(), ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::ReadTimedout)
}

/// No pause before the first new attempt; then 100 ms, 200 ms, 400 ms, ...
async fn backoff(tried: u32) {
    if tried > 0 {
        tokio::time::sleep(Duration::from_millis(100u64 << (tried - 1).min(5))).await;
    }
}
