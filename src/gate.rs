//! Hoster politeness: every upstream request passes the gate of the host
//! it dials (each redirect hop the gate of its own host).
//!
//! - **Connection limit**: at most the host's limit of requests at once; a
//!   streaming body holds its slot (a [`Permit`]) until it ends. Over the
//!   limit a request waits, first come first served, at most
//!   `upstream.queue_timeout`, then is refused (`503 upstream busy`).
//! - **Cooldown**: a refusal (`429`, `509`, `503` with `Retry-After`) stops
//!   everything to the host for `Retry-After` (or 1 s, doubling with each
//!   wave of refusals: the requests sent before a refusal came and
//!   refused after it are the same wave), clamped to 1 s ..
//!   `upstream.max_cooldown`. A request
//!   whose wait would end within the queue timeout waits; others are
//!   refused (`503 upstream cooling down`).
//! - **Learned limit**: a refusal also sets the host's limit to what it
//!   accepted — the requests in flight when it came, minus one — and each
//!   run of `limit` successes raises it by one (additive increase, cut on
//!   refusal, the shape of TCP's congestion control) — until a probe is
//!   refused: that level is not tried again, or the host would refuse one
//!   request every `limit` successes, forever. Ten quiet minutes lift
//!   both. Without a learned limit every waiter would go at once when
//!   a cooldown ends and be refused again.
//!
//! - **Lending**: a slot's holder may lend it to another request to the
//!   same host ([`Lent`]) and have it back when that request is done,
//!   before anyone waiting in line: a download that lets its connection go
//!   for a moment (an MP4's index read at the file's end) keeps its place.
//!
//! - **Settling**: a slot whose connection the proxy closed before its
//!   body's end is given back [`SETTLE`] later. The hoster counts that
//!   connection until it sees it close, and behind a relay (a load
//!   balancer, an egress proxy) a request sent at once in its place can
//!   reach it first and be refused.
//!
//! The rules are [`Host`]'s, pure and driven by the time they are given;
//! [`Gate`] adds the queue.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use http::header::HeaderValue;
use http::StatusCode;
use tokio::sync::Notify;

use crate::hosts::HostTable;
use crate::log_writer::OnceAMinute;
use crate::metrics::Metrics;

/// How long a host must go without a refusal before its learned limit is lifted.
pub const QUIET: Duration = Duration::from_secs(600);

/// How long a slot stays taken after the proxy closed its connection
/// mid-body ([`Permit::mid_body`]). Measured: nginx with `limit_conn 1`
/// behind HAProxy (TCP mode) refused a request sent on an idle kept-alive
/// connection right after another connection was closed mid-body in 10-11
/// of 30 tries, and none 5 ms later.
pub const SETTLE: Duration = Duration::from_millis(50);

/// The gate's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `upstream.max_connections_per_host` (0: unlimited).
    pub per_host: u32,
    /// `providers[].max_connections` by host (the first matching profile's;
    /// 0: `per_host`).
    pub providers: HostTable<u32>,
    pub queue_timeout: Duration,
    pub max_cooldown: Duration,
    pub quiet: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            per_host: 0,
            providers: HostTable::default(),
            queue_timeout: Duration::from_secs(10),
            max_cooldown: Duration::from_secs(120),
            quiet: QUIET,
        }
    }
}

/// Why the gate refused a request (the client gets a 503 with `Retry-After`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The host's slots stayed taken for the whole queue timeout.
    Busy,
    /// The host cools down this many more seconds.
    CoolingDown(u64),
}

impl Refused {
    /// Every [`Refused::label`] (the metrics start each at 0).
    pub const LABELS: [&'static str; 2] = ["busy", "cooling_down"];

    /// Cooling down `left` more: in whole seconds, rounded up, at least one
    /// (what `Retry-After` tells the client).
    fn cooling_down(left: Duration) -> Refused {
        Refused::CoolingDown(left.as_secs_f64().ceil().max(1.0) as u64)
    }

    /// The `reason` label of `anibridge_host_refused_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Refused::Busy => Self::LABELS[0],
            Refused::CoolingDown(_) => Self::LABELS[1],
        }
    }
}

/// What a response said about the host's patience.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Accepted.
    Success,
    /// Refused: cool down for `Some(Retry-After)`, or (`None`) by backing off.
    Refusal(Option<Duration>),
}

impl Verdict {
    /// `429`/`509` are refusals, `Retry-After` or not; a `503` only with one
    /// (else it is just an error); everything else is a success.
    pub fn of(status: StatusCode, retry_after: Option<&HeaderValue>, now: SystemTime) -> Verdict {
        let after = retry_after.and_then(|v| parse_retry_after(v, now));
        match status.as_u16() {
            429 | 509 => Verdict::Refusal(after),
            503 if after.is_some() => Verdict::Refusal(after),
            _ => Verdict::Success,
        }
    }
}

/// Whether `up` is a host's refusal ([`Verdict::of`]): an answer about
/// how many requests it takes at once, not about what was asked.
pub fn is_refusal(up: &pingora_http::ResponseHeader) -> bool {
    let retry_after = up.headers.get(http::header::RETRY_AFTER);
    matches!(Verdict::of(up.status, retry_after, SystemTime::now()), Verdict::Refusal(_))
}

/// `Retry-After`: delta-seconds or an HTTP-date (RFC 9110 §10.2.3); `None`
/// for anything else (treated as absent).
pub fn parse_retry_after(v: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let s = v.to_str().ok()?.trim();
    if let Some(secs) = crate::headers::digits(s) {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(s).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

/// One host's state: the rules, pure (time is an argument).
#[derive(Debug, Default)]
pub struct Host {
    /// Its name, shared with the permits (`None` in unit tests of the rules).
    name: Option<Arc<str>>,
    pub in_flight: u32,
    /// The learned limit (`None`: only the configured one applies).
    pub learned: Option<u32>,
    /// Successes in a row since the limit last changed.
    successes: u32,
    /// The fewest requests in flight the host refused while a learned limit
    /// held (a probe): the limit is not raised to it again.
    ceiling: Option<u32>,
    last_refusal: Option<Instant>,
    pub cooldown_until: Option<Instant>,
    /// Refusals without `Retry-After` in a row (the backoff's exponent).
    backoffs: u32,
    /// Its `503 upstream busy` is said in the log once a minute (the rest
    /// are counted).
    busy_said: OnceAMinute,
    queue: VecDeque<Arc<Notify>>,
}

impl Host {
    /// The limit in force now: the learned one (lifted after `quiet`),
    /// never above the configured one (`0`: unlimited); `None`: no limit.
    pub fn limit(&mut self, configured: u32, quiet: Duration, now: Instant) -> Option<u32> {
        if self.last_refusal.is_some_and(|at| now.duration_since(at) >= quiet) {
            self.learned = None;
            self.ceiling = None;
            self.last_refusal = None;
        }
        let configured = (configured > 0).then_some(configured);
        match (self.learned, configured) {
            (Some(l), Some(c)) => Some(l.min(c)),
            (l, c) => l.or(c),
        }
    }

    /// Whether one more request fits under `limit` (`None`: no limit).
    fn has_slot(&self, limit: Option<u32>) -> bool {
        limit.is_none_or(|l| self.in_flight < l)
    }

    /// Lets the request first in line look again whether it may go.
    fn wake_first(&self) {
        if let Some(next) = self.queue.front() {
            next.notify_one();
        }
    }

    /// The cooldown left at `now`, if any.
    pub fn cooling(&self, now: Instant) -> Option<Duration> {
        self.cooldown_until.filter(|until| *until > now).map(|until| until - now)
    }

    /// Records an answer. A refusal returns the cooldown it started (or
    /// the length it set a running one to, when it lengthens it by a
    /// second or more); `None` for the rest of a wave.
    pub fn answered(
        &mut self,
        verdict: Verdict,
        configured: u32,
        max_cooldown: Duration,
        now: Instant,
    ) -> Option<Duration> {
        match verdict {
            Verdict::Success => {
                self.backoffs = 0;
                self.successes += 1;
                if let Some(l) = self.learned {
                    let below_refused = self.ceiling.is_none_or(|c| l + 1 < c);
                    if self.successes >= l && below_refused {
                        self.successes = 0;
                        self.learned = Some(if configured > 0 { (l + 1).min(configured) } else { l + 1 });
                        // Whoever is first in line looks now (it may fit),
                        // not when a slot is next given back or its wait
                        // runs out.
                        self.wake_first();
                    }
                }
                None
            }
            Verdict::Refusal(after) => {
                // The pause running, if any. Refusals that come during it
                // are of one wave (requests sent together, answered while
                // the cooldown the first of them started runs).
                let running = self.cooldown_until.filter(|u| *u > now);
                let same_wave = running.is_some();
                // What the host accepted: the requests in flight (this one
                // among them) minus one.
                let accepted = self.in_flight.saturating_sub(1).max(1);
                let learned = match self.learned {
                    // One wave: its refusals only ever lower the limit.
                    Some(l) if same_wave => l.min(accepted),
                    // Refused while a learned limit held (a probe above
                    // it): that many is too many; probe no more.
                    Some(_) => {
                        let refused_at = self.in_flight.max(1);
                        self.ceiling = Some(self.ceiling.map_or(refused_at, |c| c.min(refused_at)));
                        accepted
                    }
                    None => accepted,
                };
                self.learned = Some(if configured > 0 { learned.min(configured) } else { learned });
                self.successes = 0;
                self.last_refusal = Some(now);
                let cooldown = match after {
                    Some(d) => d,
                    // The backoff doubles per wave, not per refusal: the
                    // rest of a wave were sent before its first refusal
                    // came (nginx's `limit_conn` refuses 20 of 24 requests
                    // sent together, without `Retry-After`; doubling for
                    // each would pause the host for `max_cooldown`).
                    None if same_wave => return None,
                    None => {
                        let d = Duration::from_secs(1u64 << self.backoffs.min(16));
                        self.backoffs += 1;
                        d
                    }
                }
                .clamp(Duration::from_secs(1), max_cooldown.max(Duration::from_secs(1)));
                let until = now + cooldown;
                self.cooldown_until = Some(running.map_or(until, |u| u.max(until)));
                // Reported when it starts a cooldown or lengthens the one
                // running by a second or more (not for each refusal of a
                // wave that asks the same pause a little later).
                match running {
                    Some(u) if until < u + Duration::from_secs(1) => None,
                    _ => Some(cooldown),
                }
            }
        }
    }

    /// Nothing worth keeping: no request, waiter, cooldown or learned limit.
    fn idle(&self, now: Instant) -> bool {
        self.in_flight == 0 && self.queue.is_empty() && self.cooling(now).is_none() && self.learned.is_none()
    }
}

/// `host` as its gate is named: without the trailing dot a fully
/// qualified name may be written with.
pub fn same_host(host: &str) -> &str {
    host.strip_suffix('.').unwrap_or(host)
}

/// The gates of all hosts (a cheap handle: a [`Permit`] keeps one).
#[derive(Clone)]
pub struct Gate(Arc<Inner>);

/// Hosts by name. Looked up three times per request (enter, answered,
/// release): aHash, not SipHash, and a name shared with the permits rather
/// than copied into each.
type Hosts = HashMap<Arc<str>, Host, ahash::RandomState>;

struct Inner {
    settings: Settings,
    hosts: Mutex<Hosts>,
    metrics: Option<Arc<Metrics>>,
}

/// A slot at a host, held while the request (and its body) lasts.
pub struct Permit {
    gate: Gate,
    host: Arc<str>,
    /// Its body is being read: dropped so (its connection closed before
    /// the end), the slot is given back [`SETTLE`] later.
    mid_body: bool,
    /// Borrowed: dropped, it goes back to its lender, not to the gate.
    home: Option<Arc<Lent>>,
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Permit({})", self.host)
    }
}

impl Permit {
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Says whether the request's body is being read (from its header to
    /// its last byte): a permit dropped then keeps its slot [`SETTLE`]
    /// longer, as the hoster still counts the connection just closed.
    pub fn mid_body(&mut self, reading: bool) {
        self.mid_body = reading;
    }

    /// Before the same slot asks the host again (a resumption, a fetch
    /// again), waits for the connection it closed mid-body to settle.
    pub async fn settle(&mut self) {
        if std::mem::take(&mut self.mid_body) {
            tokio::time::sleep(SETTLE).await;
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(home) = self.home.take() {
            // Back to its lender, with what it was doing (a connection closed
            // mid-body settles before the lender uses the slot).
            let back = Permit { gate: self.gate.clone(), host: self.host.clone(), mid_body: self.mid_body, home: None };
            self.mid_body = false;
            // (Its lender gone, it goes to the gate: dropped here.)
            drop(home.given_back(back));
            return;
        }
        if std::mem::take(&mut self.mid_body) {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let settling = Permit { gate: self.gate.clone(), host: self.host.clone(), mid_body: false, home: None };
                runtime.spawn(async move {
                    tokio::time::sleep(SETTLE).await;
                    drop(settling);
                });
                return;
            }
        }
        let mut hosts = self.gate.lock();
        if let Some(h) = hosts.get_mut(&self.host) {
            h.in_flight = h.in_flight.saturating_sub(1);
            h.wake_first();
        }
    }
}

/// A slot lent by its holder (a cache download that lets its connection
/// go for a moment) to one other request to the same host: the borrower
/// takes it ([`Lent::borrow`]) instead of waiting in line, and when the
/// borrower lets it go it goes back to the holder ([`Lending::take_back`]),
/// not to the gate — so a request that came to wait in line meanwhile does
/// not take the slot from under the holder, which would then wait behind
/// it (and a download could give up). The hoster still sees one
/// connection at a time: the slot is one.
#[derive(Default)]
pub struct Lent {
    state: Mutex<LentState>,
    changed: Notify,
}

#[derive(Default)]
struct LentState {
    /// Offered and not borrowed yet, or given back.
    slot: Option<Permit>,
    /// Borrowed once already: a second borrow gets nothing (and, while
    /// `slot` is empty, the borrower has it).
    borrowed: bool,
    /// The holder took it back, or will not lend it (it ended first): a
    /// slot given back now goes to the gate.
    closed: bool,
}

impl std::fmt::Debug for Lent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Lent")
    }
}

impl Lent {
    fn lock(&self) -> std::sync::MutexGuard<'_, LentState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The holder lends `slot` (`None`: it had none to lend, and the
    /// borrower asks the gate like any request). The slot is the holder's
    /// again with [`Lending::take_back`], or the gate's if it never is.
    pub fn offer(self: &Arc<Self>, slot: Option<Permit>) -> Lending {
        let not_lent = {
            let mut st = self.lock();
            match slot {
                Some(slot) if !st.closed => {
                    st.slot = Some(slot);
                    None
                }
                slot => {
                    st.closed = true;
                    slot
                }
            }
        };
        // (To the gate, outside the lock.)
        drop(not_lent);
        self.changed.notify_waiters();
        Lending(self.clone())
    }

    /// The holder will not lend (it ended before it could): a borrower
    /// waiting asks the gate instead.
    pub fn close(&self) {
        let slot = {
            let mut st = self.lock();
            st.closed = true;
            st.slot.take()
        };
        drop(slot);
        self.changed.notify_waiters();
    }

    /// The slot offered for `host`, once, waiting for the holder to offer
    /// it at most `wait`; `None`: it was not (the borrower then asks the
    /// gate). A connection the holder closed mid-body settles first.
    pub async fn borrow(self: &Arc<Self>, host: &str, wait: Duration) -> Option<Permit> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let mut changed = std::pin::pin!(self.changed.notified());
            changed.as_mut().enable();
            let taken = {
                let mut st = self.lock();
                if st.closed || st.borrowed || st.slot.as_ref().is_some_and(|s| s.host() != same_host(host)) {
                    return None;
                }
                let taken = st.slot.take();
                st.borrowed = taken.is_some();
                taken
            };
            if let Some(mut slot) = taken {
                slot.home = Some(self.clone());
                slot.settle().await;
                return Some(slot);
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return None;
            }
        }
    }

    /// The borrower let `back` go: the holder's again, or (the holder gone
    /// or no longer waiting for it) handed back to be dropped to the gate.
    fn given_back(&self, back: Permit) -> Option<Permit> {
        let mut st = self.lock();
        if st.closed {
            return Some(back);
        }
        st.slot = Some(back);
        drop(st);
        self.changed.notify_waiters();
        None
    }
}

/// The holder's side of a [`Lent`] slot. Dropped without
/// [`Lending::take_back`], the slot goes to the gate when it comes back.
pub struct Lending(Arc<Lent>);

impl Lending {
    /// The slot back from its borrower, once the borrower let it go (or at
    /// once if it never took it); waits at most `wait` for it, then gives
    /// up on it (`None`: it goes to the gate when it comes back).
    pub async fn take_back(self, wait: Duration) -> Option<Permit> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let mut changed = std::pin::pin!(self.0.changed.notified());
            changed.as_mut().enable();
            {
                let mut st = self.0.lock();
                let out = st.borrowed && st.slot.is_none();
                if !out || st.closed {
                    st.closed = true;
                    return st.slot.take();
                }
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return None;
            }
        }
    }
}

impl Drop for Lending {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Removes a waiter from its host's queue however its wait ends (a slot,
/// a refusal, the client gone: the future dropped), and lets the next one
/// look.
struct Queued<'a> {
    gate: &'a Gate,
    host: &'a str,
    me: Arc<Notify>,
    /// Taken off the queue with a slot already.
    served: bool,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if self.served {
            return;
        }
        let mut hosts = self.gate.lock();
        if let Some(h) = hosts.get_mut(self.host) {
            let was_first = h.queue.front().is_some_and(|f| Arc::ptr_eq(f, &self.me));
            h.queue.retain(|w| !Arc::ptr_eq(w, &self.me));
            if was_first {
                h.wake_first();
            }
        }
    }
}

impl Gate {
    pub fn new(settings: Settings, metrics: Option<Arc<Metrics>>) -> Gate {
        Gate(Arc::new(Inner { settings, hosts: Mutex::new(Hosts::default()), metrics }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Hosts> {
        self.0.hosts.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn configured(&self, host: &str) -> u32 {
        let s = &self.0.settings;
        s.providers.first(host).copied().filter(|n| *n > 0).unwrap_or(s.per_host)
    }

    /// A slot at `host` (lower-case), waiting in line when the host is at
    /// its limit or cooling down — or why not. A name with a trailing dot
    /// (`cdn.example.`, the same server) passes the same gate.
    pub async fn enter(&self, host: &str) -> Result<Permit, Refused> {
        let host = same_host(host);
        let s = &self.0.settings;
        let configured = self.configured(host);
        let deadline = Instant::now() + s.queue_timeout;
        let mut queued: Option<Queued<'_>> = None;
        loop {
            let now = Instant::now();
            let wait_until = {
                let mut hosts = self.lock();
                if hosts.len() > 4096 {
                    hosts.retain(|_, h| !h.idle(now));
                }
                if !hosts.contains_key(host) {
                    let name: Arc<str> = host.into();
                    hosts.insert(name.clone(), Host { name: Some(name), ..Host::default() });
                }
                let h = hosts.get_mut(host).expect("inserted above");
                let name = h.name.clone().expect("a host in the map has its name");
                let limit = h.limit(configured, s.quiet, now);
                let cooling = h.cooling(now);
                let first = match &queued {
                    Some(q) => h.queue.front().is_some_and(|f| Arc::ptr_eq(f, &q.me)),
                    None => h.queue.is_empty(),
                };
                let room = h.has_slot(limit);
                if cooling.is_none() && room && first {
                    h.in_flight += 1;
                    if let Some(q) = &mut queued {
                        h.queue.pop_front();
                        q.served = true;
                        // The next in line may fit too.
                        if h.has_slot(limit) {
                            h.wake_first();
                        }
                    }
                    drop(hosts);
                    return Ok(Permit { gate: self.clone(), host: name, mid_body: false, home: None });
                }
                if let Some(left) = cooling {
                    if now + left > deadline {
                        drop(hosts);
                        return Err(self.refuse(Refused::cooling_down(left)));
                    }
                }
                if now >= deadline {
                    let say = h.busy_said.due();
                    drop(hosts);
                    if say {
                        log::warn!(
                            "upstream host {name}: a request waited upstream.queue_timeout ({:?}) for a slot ({} at \
                             once) and was answered 503 (more this minute are only counted in \
                             anibridge_host_refused_total)",
                            s.queue_timeout,
                            limit.map_or_else(|| "-".to_string(), |l| l.to_string())
                        );
                    }
                    return Err(self.refuse(Refused::Busy));
                }
                if queued.is_none() {
                    let me = Arc::new(Notify::new());
                    h.queue.push_back(me.clone());
                    queued = Some(Queued { gate: self, host, me, served: false });
                    self.count(|m| m.host_queue_waits.inc());
                }
                cooling.map_or(deadline, |left| (now + left).min(deadline))
            };
            let me = queued.as_ref().expect("queued above").me.clone();
            let _ = tokio::time::timeout_at(wait_until.into(), me.notified()).await;
        }
    }

    /// Whether a request to `host` would go at once: the host not cooling
    /// down, nobody in line, a slot free. For a request that may instead
    /// wait for bytes already on their way (a range ahead of a cache
    /// fill): it asks for a slot only when no other request needs one.
    pub fn has_room(&self, host: &str) -> bool {
        self.judge(host, |h, limit, now| h.cooling(now).is_none() && h.queue.is_empty() && h.has_slot(limit))
            .unwrap_or(true)
    }

    /// Whether `host` is full with one request: its limit is one (set or
    /// learned) and that one is in flight (a cooldown only delays whoever
    /// goes next). A cache fill that holds that slot may lend it to a range
    /// ahead of it ([`crate::cache::Entry::lend`], [`Lent`]), and has it
    /// back before anyone who waits in line. `held`: the fill holds its
    /// slot in hand ([`crate::cache::Entry::holds_its_slot`]), so the one
    /// in flight is the fill's, whoever waits. Otherwise only while nobody
    /// waits: the one in flight may not be the fill's (the fill itself may
    /// be the one waiting, between connections).
    pub fn full_with_one(&self, host: &str, held: bool) -> bool {
        self.judge(host, |h, limit, _| h.in_flight == 1 && limit == Some(1) && (held || h.queue.is_empty()))
            .unwrap_or(false)
    }

    /// The slot `lent` to a request to `host` ([`Lent::borrow`]), waiting
    /// for its holder to offer it at most the queue timeout; `None`: the
    /// request waits at the gate like any other.
    pub async fn borrow(&self, lent: Option<Arc<Lent>>, host: &str) -> Option<Permit> {
        lent?.borrow(host, self.0.settings.queue_timeout).await
    }

    /// Whether `host` cools down now.
    pub fn is_cooling(&self, host: &str) -> bool {
        self.cooling(host).is_some()
    }

    /// The cooldown `host` has left, if any.
    fn cooling(&self, host: &str) -> Option<Duration> {
        self.judge(host, |h, _, now| h.cooling(now)).flatten()
    }

    /// A request that holds a slot at `permit`'s host already (a body
    /// continued on a new connection, a slot lent back) asks again: it
    /// waits out a cooldown the host is in (holding its slot) if the wait
    /// ends within the queue timeout, else is refused, as one that waits
    /// in line would be. Nothing is sent while a host cools down.
    pub async fn cooled(&self, permit: &Permit) -> Result<(), Refused> {
        let deadline = Instant::now() + self.0.settings.queue_timeout;
        while let Some(left) = self.cooling(&permit.host) {
            if Instant::now() + left > deadline {
                return Err(self.refuse(Refused::cooling_down(left)));
            }
            tokio::time::sleep(left).await;
        }
        Ok(())
    }

    /// Whether `host` takes one request at a time (set or learned), however
    /// many are in flight or waiting now.
    pub fn one_at_a_time(&self, host: &str) -> bool {
        self.judge(host, |_, limit, _| limit == Some(1)).unwrap_or(false)
    }

    /// `judge` of `host`'s state, with the limit in force and the time
    /// now; `None` when nothing was ever sent to it.
    fn judge<T>(&self, host: &str, judge: impl FnOnce(&mut Host, Option<u32>, Instant) -> T) -> Option<T> {
        let host = same_host(host);
        let configured = self.configured(host);
        let now = Instant::now();
        let mut hosts = self.lock();
        let h = hosts.get_mut(host)?;
        let limit = h.limit(configured, self.0.settings.quiet, now);
        Some(judge(h, limit, now))
    }

    /// Records what `permit`'s host answered: a refusal starts its cooldown
    /// (logged) and cuts its limit, a success counts towards raising it.
    pub fn answered(&self, permit: &Permit, status: StatusCode, retry_after: Option<&HeaderValue>) {
        let verdict = Verdict::of(status, retry_after, SystemTime::now());
        let configured = self.configured(&permit.host);
        let started = {
            let mut hosts = self.lock();
            let Some(h) = hosts.get_mut(&permit.host) else { return };
            h.answered(verdict, configured, self.0.settings.max_cooldown, Instant::now())
        };
        if let Some(cooldown) = started {
            log::warn!(
                "upstream host {} refused ({}): cooling down for {} s",
                permit.host,
                status.as_u16(),
                cooldown.as_secs_f64().ceil()
            );
            self.count(|m| m.host_cooldowns.inc());
        }
    }

    /// A host's state now: (in flight, learned limit, cooldown left, waiting).
    pub fn state(&self, host: &str) -> (u32, Option<u32>, Option<Duration>, usize) {
        let mut hosts = self.lock();
        let now = Instant::now();
        let configured = self.configured(host);
        match hosts.get_mut(host) {
            Some(h) => {
                h.limit(configured, self.0.settings.quiet, now);
                (h.in_flight, h.learned, h.cooling(now), h.queue.len())
            }
            None => (0, None, None, 0),
        }
    }

    fn count(&self, f: impl FnOnce(&Metrics)) {
        if let Some(m) = &self.0.metrics {
            f(m);
        }
    }

    /// Counts a refusal by its reason, and hands it back.
    fn refuse(&self, r: Refused) -> Refused {
        self.count(|m| m.host_refused.with_label_values(&[r.label()]).inc());
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_secs(120);

    #[test]
    fn retry_after_in_both_forms_and_garbage() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_750_000_000);
        let v = |s: &str| parse_retry_after(&HeaderValue::from_str(s).unwrap(), now);
        assert_eq!(v("2"), Some(Duration::from_secs(2)));
        assert_eq!(v(" 3600 "), Some(Duration::from_secs(3600)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(v(&later), Some(Duration::from_secs(30)));
        assert_eq!(v(&httpdate::fmt_http_date(now - Duration::from_secs(30))), Some(Duration::ZERO));
        for garbage in ["soon", "-1", "1.5", ""] {
            assert_eq!(v(garbage), None, "{garbage:?}");
        }
        let at = |status, ra: Option<&str>| {
            Verdict::of(
                StatusCode::from_u16(status).unwrap(),
                ra.map(|r| HeaderValue::from_str(r).unwrap()).as_ref(),
                now,
            )
        };
        assert_eq!(at(429, None), Verdict::Refusal(None));
        assert_eq!(at(509, Some("x")), Verdict::Refusal(None), "garbage is absent");
        assert_eq!(at(503, Some("5")), Verdict::Refusal(Some(Duration::from_secs(5))));
        assert_eq!(at(503, None), Verdict::Success, "a 503 without Retry-After is just an error");
        assert_eq!(at(404, Some("5")), Verdict::Success);
    }

    #[test]
    fn cooldowns_clamp_and_back_off() {
        let t0 = Instant::now();
        let (s, ms) = (Duration::from_secs, Duration::from_millis);
        let mut h = Host { in_flight: 1, ..Host::default() };
        assert_eq!(h.answered(Verdict::Refusal(Some(s(3600))), 0, MAX, t0), Some(MAX));
        let mut h = Host { in_flight: 1, ..Host::default() };
        assert_eq!(h.answered(Verdict::Refusal(Some(Duration::ZERO)), 0, MAX, t0), Some(s(1)));
        // Without `Retry-After`: 1 s, doubling with each refusal after the
        // last pause, back to 1 s after a success.
        let mut h = Host { in_flight: 1, ..Host::default() };
        let (mut at, mut secs) = (t0, Vec::new());
        for _ in 0..4 {
            let pause = h.answered(Verdict::Refusal(None), 0, MAX, at).unwrap();
            secs.push(pause.as_secs());
            at += pause;
        }
        assert_eq!(secs, [1, 2, 4, 8], "doubling while refusals go on");
        assert_eq!(h.cooling(at - ms(500)), Some(ms(500)));
        assert_eq!(h.cooling(at), None);
        h.answered(Verdict::Success, 0, MAX, at);
        assert_eq!(h.answered(Verdict::Refusal(None), 0, MAX, at), Some(s(1)), "back to 1 s after a success");
        // A wave: 24 requests sent together, 20 refused. The refusals after
        // the first come while its pause runs: no doubling, nothing to
        // report; the next refusal after the pause doubles.
        let mut h = Host { in_flight: 24, ..Host::default() };
        assert_eq!(h.answered(Verdict::Refusal(None), 0, MAX, t0), Some(s(1)));
        for k in 1..20 {
            h.in_flight -= 1;
            assert_eq!(h.answered(Verdict::Refusal(None), 0, MAX, t0 + ms(10 * k)), None, "refusal {k} of the wave");
        }
        assert_eq!(h.cooling(t0), Some(s(1)), "one second, as for one refusal");
        assert_eq!(h.limit(0, QUIET, t0), Some(4), "the wave still taught the limit");
        assert_eq!(h.answered(Verdict::Refusal(None), 0, MAX, t0 + s(1)), Some(s(2)), "the next wave doubles");
        // A refusal of a wave that asks for longer lengthens the pause (and
        // is reported); the same asked a little later is not.
        assert_eq!(h.answered(Verdict::Refusal(Some(s(30))), 0, MAX, t0 + s(2)), Some(s(30)));
        assert_eq!(h.answered(Verdict::Refusal(Some(s(30))), 0, MAX, t0 + s(2) + ms(100)), None);
        assert_eq!(h.cooling(t0 + s(2)), Some(s(30) + ms(100)));
    }

    #[test]
    fn the_limit_is_learned_raised_and_lifted() {
        let t0 = Instant::now();
        let quiet = Duration::from_secs(600);
        let mut h = Host::default();
        assert_eq!(h.limit(0, quiet, t0), None, "unlimited until refused");
        // Five in flight when the hoster refuses: it accepted four. The
        // wave's other refusals (fewer in flight by then) do not raise it.
        h.in_flight = 5;
        h.answered(Verdict::Refusal(Some(Duration::from_secs(2))), 0, MAX, t0);
        assert_eq!(h.limit(0, quiet, t0), Some(4));
        h.in_flight = 6;
        h.answered(Verdict::Refusal(Some(Duration::from_secs(2))), 0, MAX, t0);
        assert_eq!(h.limit(0, quiet, t0), Some(4), "the same wave never raises it");
        // `limit` successes in a row raise it by one: a probe.
        for _ in 0..4 {
            h.answered(Verdict::Success, 0, MAX, t0);
        }
        assert_eq!(h.limit(0, quiet, t0), Some(5));
        // The probe refused (five in flight, after the wave's cooldown):
        // back to four, and five is not tried again.
        h.in_flight = 5;
        h.answered(Verdict::Refusal(Some(Duration::from_secs(1))), 0, MAX, t0 + Duration::from_secs(5));
        assert_eq!(h.limit(0, quiet, t0), Some(4));
        for _ in 0..40 {
            h.answered(Verdict::Success, 0, MAX, t0 + Duration::from_secs(10));
        }
        assert_eq!(h.limit(0, quiet, t0), Some(4), "no more probes at a refused level");
        // A configured limit caps what is learned.
        assert_eq!(h.limit(3, quiet, t0), Some(3));
        // One in flight refused: at least one is always allowed.
        let mut one = Host { in_flight: 1, ..Host::default() };
        one.answered(Verdict::Refusal(None), 0, MAX, t0);
        assert_eq!(one.limit(0, quiet, t0), Some(1));
        // Quiet for the whole period since the last refusal: unlimited (or
        // configured) again, and probing may start over.
        assert_eq!(h.limit(0, quiet, t0 + quiet), Some(4), "not yet: refused at t0 + 5 s");
        assert_eq!(h.limit(0, quiet, t0 + Duration::from_secs(5) + quiet), None);
        assert_eq!((h.learned, h.ceiling), (None, None));
        assert_eq!(one.limit(2, quiet, t0 + quiet + Duration::from_secs(1)), Some(2));
    }

    fn gate(per_host: u32, queue: Duration) -> Gate {
        Gate::new(Settings { per_host, queue_timeout: queue, ..Settings::default() }, None)
    }

    /// A request for a slot at host `h` of `g`, in a task of its own: what
    /// the gate answered, and when.
    fn waiting_at(g: &Gate) -> tokio::task::JoinHandle<(Result<Permit, Refused>, tokio::time::Instant)> {
        let g = g.clone();
        tokio::spawn(async move {
            let entered = g.enter("h").await;
            (entered, tokio::time::Instant::now())
        })
    }

    #[tokio::test]
    async fn over_the_limit_requests_wait_in_order_then_give_up() {
        let g = gate(2, Duration::from_millis(300));
        let a = g.enter("h").await.unwrap();
        let b = g.enter("h").await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let waiters: Vec<_> = (0..3)
            .map(|i| {
                let (g, order) = (g.clone(), order.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(10 * i)).await;
                    let p = g.enter("h").await;
                    order.lock().unwrap().push(i);
                    let held = p?;
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    drop(held);
                    Ok::<(), Refused>(())
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(g.state("h").3, 3, "three waiting");
        drop(a);
        let results: Vec<_> = {
            let mut r = Vec::new();
            for w in waiters {
                r.push(w.await.unwrap());
            }
            r
        };
        assert_eq!(*order.lock().unwrap(), [0, 1, 2], "first come first served");
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        // Both slots taken for the whole queue timeout: busy.
        let c = g.enter("h").await.unwrap();
        assert_eq!(g.enter("h").await.err(), Some(Refused::Busy));
        drop((b, c));
        assert_eq!(g.state("h"), (0, None, None, 0), "no slot or waiter leaks");
        // Another host is not delayed by this one.
        let _full = (g.enter("h").await.unwrap(), g.enter("h").await.unwrap());
        let other = tokio::time::timeout(Duration::from_millis(50), g.enter("other")).await;
        assert!(other.is_ok_and(|p| p.is_ok()));
    }

    /// The hoster counts a connection closed mid-body until it sees it
    /// close: its slot is given back a moment later, to a request waiting
    /// and to one that comes. A body read to its end gives it back at once.
    #[tokio::test(start_paused = true)]
    async fn a_slot_closed_mid_body_is_given_back_after_it_settles() {
        let g = gate(1, Duration::from_secs(5));
        let mut cut = g.enter("h").await.unwrap();
        cut.mid_body(true);
        let waiting = waiting_at(&g);
        tokio::task::yield_now().await;
        let closed = tokio::time::Instant::now();
        drop(cut);
        assert_eq!(g.state("h").0, 1, "still counted");
        let (next, entered) = waiting.await.unwrap();
        let mut next = next.unwrap();
        assert_eq!(entered - closed, SETTLE, "the waiter went when it settled");
        // Read to its end: given back at once.
        next.mid_body(true);
        next.mid_body(false);
        drop(next);
        assert_eq!(g.state("h"), (0, None, None, 0));
        // A slot kept for another try of the same body waits as long, once.
        let mut held = g.enter("h").await.unwrap();
        held.mid_body(true);
        let t = tokio::time::Instant::now();
        held.settle().await;
        held.settle().await;
        assert_eq!(t.elapsed(), SETTLE);
        drop(held);
        assert_eq!(g.state("h").0, 0, "settled: given back at once");
    }

    #[tokio::test]
    async fn a_name_with_a_trailing_dot_passes_the_same_gate() {
        let g = gate(1, Duration::from_millis(100));
        let held = g.enter("cdn.example.").await.unwrap();
        assert_eq!(held.host(), "cdn.example");
        assert_eq!(g.enter("cdn.example").await.unwrap_err(), Refused::Busy, "one server, one slot");
        drop(held);
        assert!(g.enter("cdn.example").await.is_ok());
    }

    #[tokio::test]
    async fn room_is_a_free_slot_nobody_waits_for_at_a_host_not_cooling() {
        let g = gate(1, Duration::from_secs(5));
        assert!(g.has_room("h"), "a host never dialled");
        let held = g.enter("h.").await.unwrap();
        assert!(!g.has_room("h"), "its one slot is held");
        assert!(g.has_room("other"));
        drop(held);
        assert!(g.has_room("h"));
        let unlimited = gate(0, Duration::from_secs(5));
        let held = unlimited.enter("h").await.unwrap();
        assert!(unlimited.has_room("h"), "no limit");
        unlimited.answered(&held, StatusCode::TOO_MANY_REQUESTS, None);
        assert!(!unlimited.has_room("h"), "cooling down");
    }

    #[tokio::test]
    async fn one_at_a_time_is_the_limit_whatever_is_in_flight() {
        let g = gate(1, Duration::from_secs(5));
        assert!(!g.one_at_a_time("h") && !g.full_with_one("h", true), "a host never dialled");
        let held = g.enter("h").await.unwrap();
        assert!(g.one_at_a_time("h") && g.full_with_one("h", false) && g.full_with_one("h", true));
        // Someone waits: the one in flight is a fill's only if it says it holds it.
        let waiting = waiting_at(&g);
        while g.judge("h", |h, _, _| h.queue.is_empty()).unwrap() {
            tokio::task::yield_now().await;
        }
        assert!(!g.full_with_one("h", false) && g.full_with_one("h", true));
        drop(held);
        assert!(waiting.await.unwrap().0.is_ok(), "the one waiting went next");
        tokio::time::sleep(SETTLE * 2).await;
        assert!(g.one_at_a_time("h") && !g.full_with_one("h", true), "its one slot is free");
        // Learned: a refusal with two in flight leaves one.
        let unlimited = gate(0, Duration::from_secs(5));
        let (a, b) = (unlimited.enter("h").await.unwrap(), unlimited.enter("h").await.unwrap());
        assert!(!unlimited.one_at_a_time("h"));
        unlimited.answered(&b, StatusCode::from_u16(509).unwrap(), None);
        drop((a, b));
        assert!(unlimited.one_at_a_time("h"));
    }

    #[tokio::test]
    async fn a_waiter_that_goes_away_leaves_the_queue() {
        let g = gate(1, Duration::from_secs(5));
        let held = g.enter("h").await.unwrap();
        let waiting = waiting_at(&g);
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(g.state("h").3, 1);
        waiting.abort();
        let _ = waiting.await;
        assert_eq!(g.state("h").3, 0, "gone at once");
        drop(held);
        let again = tokio::time::timeout(Duration::from_millis(50), g.enter("h")).await;
        assert!(again.is_ok_and(|p| p.is_ok()), "the slot is free");
        assert_eq!(g.state("h").0, 0);
    }

    /// A download lends its slot to another request to its host (a file's
    /// index) while a request for another file waits in line: the slot
    /// comes back to the download when the borrower lets it go, not to the
    /// one waiting, which gets it only when the download gives it up.
    #[tokio::test(start_paused = true)]
    async fn a_lent_slot_comes_back_to_its_holder_before_anyone_waiting() {
        let g = gate(1, Duration::from_secs(60));
        let mut holder = g.enter("h").await.unwrap();
        holder.mid_body(true);
        let waiting = waiting_at(&g);
        tokio::task::yield_now().await;
        assert_eq!(g.state("h"), (1, None, None, 1));
        let lent = Arc::new(Lent::default());
        let lending = lent.offer(Some(holder));
        let t = tokio::time::Instant::now();
        let borrowed = lent.borrow("h.", Duration::from_secs(1)).await.expect("offered");
        assert_eq!(t.elapsed(), SETTLE, "the holder's connection, closed mid-body, settled first");
        assert!(lent.borrow("h", Duration::from_secs(1)).await.is_none(), "borrowed once");
        assert_eq!(g.state("h"), (1, None, None, 1), "one slot, still taken; the waiter still waits");
        drop(borrowed);
        let mut back = lending.take_back(Duration::from_secs(1)).await.expect("given back");
        assert_eq!(g.state("h"), (1, None, None, 1), "the holder's again, not the waiter's");
        back.settle().await;
        assert_eq!(t.elapsed(), SETTLE, "a borrower that read its body to its end leaves nothing to settle");
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!waiting.is_finished());
        let released = tokio::time::Instant::now();
        drop(back);
        let (went, at) = waiting.await.unwrap();
        went.unwrap();
        assert_eq!(at, released, "the waiter goes when the holder is done");
    }

    /// A success that raises a learned limit lets whoever is first in line
    /// go at once, not when a slot is next given back or its wait runs out.
    #[tokio::test(start_paused = true)]
    async fn a_raised_learned_limit_lets_the_next_in_line_go_at_once() {
        let g = gate(0, Duration::from_secs(10));
        let (a, b) = (g.enter("h").await.unwrap(), g.enter("h").await.unwrap());
        g.answered(&b, StatusCode::from_u16(509).unwrap(), None);
        drop(b);
        assert_eq!(g.state("h").1, Some(1), "learned: one at a time");
        tokio::time::sleep(Duration::from_secs(2)).await;
        let waiting = waiting_at(&g);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(g.state("h"), (1, Some(1), None, 1), "waiting behind the one in flight");
        let raised = tokio::time::Instant::now();
        g.answered(&a, StatusCode::OK, None);
        assert_eq!(g.state("h").1, Some(2), "one success at a limit of one raises it");
        let (second, went) = waiting.await.unwrap();
        let _second = second.unwrap();
        assert_eq!(went, raised, "the next in line went when the limit rose");
        drop(a);
    }

    /// A holder that had no slot to lend, or ends before it takes its slot
    /// back, leaves nothing behind: the borrower asks the gate, and a slot
    /// given back then goes to the gate.
    #[tokio::test(start_paused = true)]
    async fn a_lent_slot_nobody_takes_back_goes_to_the_gate() {
        let g = gate(1, Duration::from_secs(60));
        let lent = Arc::new(Lent::default());
        let _lending = lent.offer(None);
        assert!(lent.borrow("h", Duration::from_secs(1)).await.is_none(), "nothing offered: at once");
        // Not offered yet: the borrower waits for it, then gives up.
        let late = Arc::new(Lent::default());
        let t = tokio::time::Instant::now();
        assert!(late.borrow("h", Duration::from_secs(1)).await.is_none());
        assert_eq!(t.elapsed(), Duration::from_secs(1));
        // Offered for another host: not borrowed.
        let other = Arc::new(Lent::default());
        let _other = other.offer(Some(g.enter("h").await.unwrap()));
        assert!(other.borrow("elsewhere", Duration::from_secs(1)).await.is_none());
        drop((other, _other));
        assert_eq!(g.state("h").0, 0, "the unborrowed slot went to the gate");
        // The holder ends while the borrower has the slot.
        let lent = Arc::new(Lent::default());
        let lending = lent.offer(Some(g.enter("h").await.unwrap()));
        let borrowed = lent.borrow("h", Duration::from_secs(1)).await.unwrap();
        drop(lending);
        assert_eq!(g.state("h").0, 1);
        drop(borrowed);
        assert_eq!(g.state("h").0, 0, "given back to the gate");
        // The holder stops waiting for it: the same.
        let lent = Arc::new(Lent::default());
        let lending = lent.offer(Some(g.enter("h").await.unwrap()));
        let borrowed = lent.borrow("h", Duration::from_secs(1)).await.unwrap();
        assert!(lending.take_back(Duration::from_secs(1)).await.is_none());
        drop(borrowed);
        assert_eq!(g.state("h"), (0, None, None, 0));
    }

    /// A request that holds its slot already (a body continued, a slot
    /// lent back) sends nothing during a cooldown: it waits it out if it
    /// ends within the queue timeout, else it is refused.
    #[tokio::test]
    async fn a_held_slot_waits_out_a_cooldown_too() {
        let g = gate(0, Duration::from_millis(1500));
        let held = g.enter("h").await.unwrap();
        assert_eq!(g.cooled(&held).await, Ok(()), "not cooling");
        let other = g.enter("h").await.unwrap();
        g.answered(&other, StatusCode::TOO_MANY_REQUESTS, Some(&HeaderValue::from_static("1")));
        assert!(g.is_cooling("h"));
        let started = Instant::now();
        assert_eq!(g.cooled(&held).await, Ok(()));
        assert!(started.elapsed() >= Duration::from_millis(900), "waited: {:?}", started.elapsed());
        g.answered(&other, StatusCode::TOO_MANY_REQUESTS, Some(&HeaderValue::from_static("60")));
        match g.cooled(&held).await {
            Err(Refused::CoolingDown(s)) => assert!((59..=60).contains(&s), "{s}"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_cooling_host_gets_nothing_until_it_is_ready() {
        let g = gate(0, Duration::from_millis(1500));
        let p = g.enter("h").await.unwrap();
        g.answered(&p, StatusCode::TOO_MANY_REQUESTS, Some(&HeaderValue::from_static("1")));
        drop(p);
        let started = Instant::now();
        let waited = g.enter("h").await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(900), "waited out the cooldown: {:?}", started.elapsed());
        g.answered(&waited, StatusCode::TOO_MANY_REQUESTS, Some(&HeaderValue::from_static("60")));
        drop(waited);
        match g.enter("h").await {
            Err(Refused::CoolingDown(s)) => assert!((59..=60).contains(&s), "{s}"),
            other => panic!("{other:?}"),
        }
    }
}
