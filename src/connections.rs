//! How many client connections the proxy holds at once
//! (`downstream.max_connections`), and the idle ones that make room.
//!
//! Pingora keeps about 39 KiB per client connection, idle keep-alive ones
//! included (BENCHMARKS.md, thirty-fourth round; nginx frees its buffers
//! while a connection idles), and accepts as many as the open-files limit
//! allows, which containers set to a million. Without a bound, clients
//! that make one request each and then keep their connections open would
//! grow the process without end. So a connection takes a slot for its
//! whole life ([`Connections::admit`]). When none is free, the one idle
//! the longest — between requests, or connected and silent — is closed to
//! make room, as nginx closes its reusable connections when it runs out
//! of `worker_connections`; a connection that finishes an answer while
//! others wait closes instead of idling. Only when every connection is in
//! the middle of a request does a new one wait, at most
//! `downstream.header_timeout`, and is then closed unanswered (counted);
//! as many may wait as there are slots, and any more are closed at once.
//!
//! A client whose idle connection is closed opens a new one for its next
//! request, as it does after `downstream.keepalive_timeout`. The closing
//! itself is an end of stream seen by the connection's next read of a
//! request header ([`Slot::closing`]): nothing of a request is cut.
//!
//! The admin listener has slots of its own, the same way
//! ([`Connections::admin`], [`crate::admin::MAX_CONNECTIONS`]), so that
//! its few clients get through when the proxy's slots are full.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Waker;
use std::time::{Duration, Instant};

use prometheus::{IntCounter, IntGauge};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::log_writer::OnceAMinute;
use crate::metrics::Metrics;

/// The bound when the config sets none: 10 000 (about 390 MiB of Pingora's
/// per-connection state if every one idles; room for any crowd of players),
/// or a quarter of the open-files limit if that is lower. A streaming
/// connection holds two descriptors (client and upstream), one waiting for
/// a slot holds one, and the cache's body files up to a quarter of the limit:
/// past it Pingora stops accepting for a second at a time, for everyone.
pub fn bound(configured: Option<usize>) -> usize {
    configured.unwrap_or_else(|| usize::try_from(open_files() / 4).unwrap_or(usize::MAX).clamp(1, 10_000))
}

/// The open-files limit in force (its soft limit).
fn open_files() -> u64 {
    rlimit::Resource::NOFILE.get().map_or(1024, |(soft, _)| soft)
}

/// The warning for a configured bound an open-files limit of `files`
/// cannot hold (see [`bound`]), if it is one.
pub fn too_high(configured: Option<usize>, files: u64) -> Option<String> {
    let most = configured.filter(|&n| n > 0)?;
    (most as u64 > files / 4).then(|| {
        format!(
            "downstream.max_connections is {most}, over a quarter of the open-files limit ({files}): streaming \
             connections hold two descriptors each, so the proxy can run out of descriptors before the bound and \
             then stops accepting for a second at a time; raise the limit (`ulimit -n`, `LimitNOFILE=`, \
             `--ulimit nofile=`) or lower the bound"
        )
    })
}

/// The `reason`s of `anibridge_client_connections_closed_total`.
pub const CLOSED_LABELS: [&str; 2] = ["idle_for_room", "no_room"];

/// The proxy listener's client connections: their slots, and the state of
/// each that says whether it is idle.
#[derive(Debug)]
pub struct Connections {
    slots: Arc<Semaphore>,
    /// The number of slots, and of connections that may wait for one.
    max: usize,
    /// Every admitted connection's [`Slot`], by a number of its own.
    live: Mutex<HashMap<u64, Arc<Slot>>>,
    next: AtomicU64,
    /// Connections waiting for a slot now.
    waiting: AtomicUsize,
    /// Times are milliseconds since this.
    epoch: Instant,
    wait: Duration,
    /// The bound, and where refusals are counted, as the warning names them.
    named: (&'static str, &'static str),
    closed_idle: IntCounter,
    refused: IntCounter,
    open: IntGauge,
    /// Lets a refusal's warning through at most once a minute.
    warned: OnceAMinute,
}

/// One admitted connection, as [`Connections`] sees it.
#[derive(Debug)]
pub struct Slot {
    /// When it last became idle (ms since the epoch, plus one); 0 while a
    /// request is read or answered.
    idle_since: AtomicU64,
    /// Set to make it close at its next read of a request header.
    close: AtomicBool,
    /// It closed so, and was counted.
    counted: AtomicBool,
    /// Its task, parked in a read between requests.
    waker: Mutex<Option<Waker>>,
    of: Arc<Connections>,
}

/// A connection's slot, given back when the connection ends.
#[derive(Debug)]
pub struct Admitted {
    pub slot: Arc<Slot>,
    id: u64,
    _permit: OwnedSemaphorePermit,
}

impl Connections {
    /// The proxy listeners' `max` connections at once (0: as many as the
    /// open-files limit allows); a new one waits at most `wait` for a slot.
    pub fn new(max: usize, wait: Duration, metrics: &Metrics) -> Arc<Connections> {
        let closed = |reason| metrics.client_connections_closed.with_label_values(&[reason]);
        let (closed_idle, refused) = (closed(CLOSED_LABELS[0]), closed(CLOSED_LABELS[1]));
        let named = ("downstream.max_connections", "anibridge_client_connections_closed_total{reason=\"no_room\"}");
        Connections::with(max, wait, named, closed_idle, refused, metrics.client_connections.clone())
    }

    /// The admin listener's `max` connections, counted nowhere: its
    /// clients (scrapers, health checks) are few, and not the proxy's.
    pub fn admin(max: usize, wait: Duration) -> Arc<Connections> {
        let unregistered = || IntCounter::new("admin_connections_closed", "-").expect("a valid name");
        let open = IntGauge::new("admin_connections", "-").expect("a valid name");
        Connections::with(max, wait, ("the admin listener's bound", "no metric"), unregistered(), unregistered(), open)
    }

    fn with(
        max: usize,
        wait: Duration,
        named: (&'static str, &'static str),
        closed_idle: IntCounter,
        refused: IntCounter,
        open: IntGauge,
    ) -> Arc<Connections> {
        let max = if max == 0 { Semaphore::MAX_PERMITS } else { max };
        Arc::new(Connections {
            slots: Arc::new(Semaphore::new(max)),
            max,
            live: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
            waiting: AtomicUsize::new(0),
            epoch: Instant::now(),
            wait,
            named,
            closed_idle,
            refused,
            open,
            warned: OnceAMinute::new(),
        })
    }

    /// A slot for a new connection: a free one, else the room an idle
    /// connection makes by closing, else the first to be given back within
    /// the wait (when fewer than `max` wait already). `None`: there was
    /// none; the connection is to be closed.
    pub async fn admit(self: &Arc<Self>) -> Option<Admitted> {
        let permit = match self.slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) if self.waiting.load(Ordering::SeqCst) >= self.max => {
                // As many wait as there are slots: beyond, each would hold
                // a descriptor for nothing.
                self.refuse();
                return None;
            }
            Err(_) => {
                let _waiting = Waiting::new(&self.waiting);
                self.close_longest_idle();
                match tokio::time::timeout(self.wait, self.slots.clone().acquire_owned()).await {
                    Ok(Ok(permit)) => permit,
                    _ => {
                        self.refuse();
                        return None;
                    }
                }
            }
        };
        let slot = Arc::new(Slot {
            idle_since: AtomicU64::new(self.now()),
            close: AtomicBool::new(false),
            counted: AtomicBool::new(false),
            waker: Mutex::new(None),
            of: self.clone(),
        });
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.live.lock().unwrap().insert(id, slot.clone());
        self.open.inc();
        Some(Admitted { slot, id, _permit: permit })
    }

    /// Counts a connection closed unanswered, and says so in the log at
    /// most once a minute (as nginx says "worker_connections are not
    /// enough"): the operator's cue to raise the bound or add instances.
    fn refuse(&self) {
        self.refused.inc();
        if self.warned.due() {
            log::warn!(
                "a client connection was closed unanswered: all {} connections ({}) were in the middle of a \
                 request for downstream.header_timeout ({:?}) or as many were waiting; said at most once a minute, \
                 counted in {}",
                self.max,
                self.named.0,
                self.wait,
                self.named.1
            );
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Tells the connection idle the longest to close; false if none is idle.
    fn close_longest_idle(&self) -> bool {
        let longest = {
            let live = self.live.lock().unwrap();
            live.values()
                .filter(|s| !s.close.load(Ordering::Acquire))
                .filter_map(|s| match s.idle_since.load(Ordering::Acquire) {
                    0 => None,
                    since => Some((since, s.clone())),
                })
                .min_by_key(|(since, _)| *since)
                .map(|(_, s)| s)
        };
        match longest {
            Some(slot) => {
                slot.close_now();
                true
            }
            None => false,
        }
    }
}

/// Counted in [`Connections::waiting`] while it lives (a wait given up
/// half-way, its task dropped at shutdown, stops counting too).
struct Waiting<'a>(&'a AtomicUsize);

impl Waiting<'_> {
    fn new(count: &AtomicUsize) -> Waiting<'_> {
        count.fetch_add(1, Ordering::SeqCst);
        Waiting(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.slot.of.live.lock().unwrap().remove(&self.id);
        self.slot.of.open.dec();
    }
}

impl Slot {
    /// A request's header has begun, or its answer is being made.
    pub fn busy(&self) {
        if self.idle_since.load(Ordering::Relaxed) != 0 {
            self.idle_since.store(0, Ordering::Release);
        }
    }

    /// An answer is done: the connection waits for its next request, or,
    /// when a connection is waiting for a slot, closes to give it this one.
    pub fn idle(&self) {
        if self.of.waiting.load(Ordering::SeqCst) > 0 {
            self.close.store(true, Ordering::Release);
        }
        self.idle_since.store(self.of.now(), Ordering::Release);
    }

    /// Whether the connection, finding no byte of a request to read, is to
    /// close instead of waiting for one. `waker` is its task, parked until
    /// a byte or the call to close comes.
    pub fn closing(&self, waker: &Waker) -> bool {
        if !self.close.load(Ordering::Acquire) {
            {
                let mut parked = self.waker.lock().unwrap();
                if !parked.as_ref().is_some_and(|w| w.will_wake(waker)) {
                    *parked = Some(waker.clone());
                }
            }
            // Asked to close between the first look and parking: the waker
            // was not there to be woken.
            if !self.close.load(Ordering::Acquire) {
                return false;
            }
        }
        // Counted here, where the connection closes for room, not where it
        // is asked to: a client may close it first.
        if !self.counted.swap(true, Ordering::Relaxed) {
            self.of.closed_idle.inc();
        }
        true
    }

    /// Whether it was asked to close (for the tests).
    #[cfg(test)]
    fn asked_to_close(&self) -> bool {
        self.close.load(Ordering::Acquire)
    }

    fn close_now(&self) {
        self.close.store(true, Ordering::Release);
        if let Some(waker) = self.waker.lock().unwrap().take() {
            waker.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> Metrics {
        Metrics::with_routes(&[])
    }

    #[tokio::test(start_paused = true)]
    async fn the_longest_idle_connection_makes_room_and_a_busy_one_does_not() {
        let m = metrics();
        let conns = Connections::new(2, Duration::from_secs(5), &m);
        let a = conns.admit().await.unwrap();
        std::thread::sleep(Duration::from_millis(3));
        let b = conns.admit().await.unwrap();
        // Both idle (connected, nothing sent yet): the older one closes.
        let c = tokio::spawn({
            let conns = conns.clone();
            async move { conns.admit().await }
        });
        tokio::task::yield_now().await;
        assert!(a.slot.closing(Waker::noop()), "the connection idle the longest is told to close");
        assert!(a.slot.closing(Waker::noop()), "and counted once");
        assert!(!b.slot.asked_to_close());
        assert!(!c.is_finished(), "it waits until the closed one is gone");
        drop(a);
        let c = c.await.unwrap().expect("admitted into the room made");
        // b busy, c idle: the next comer closes c, not b.
        b.slot.busy();
        let d = tokio::spawn({
            let conns = conns.clone();
            async move { conns.admit().await }
        });
        tokio::task::yield_now().await;
        assert!(!b.slot.asked_to_close() && c.slot.closing(Waker::noop()));
        drop(c);
        let d = d.await.unwrap().unwrap();
        // Both busy: a newcomer waits; b ending its answer closes for it.
        d.slot.busy();
        let e = tokio::spawn({
            let conns = conns.clone();
            async move { conns.admit().await }
        });
        tokio::task::yield_now().await;
        assert!(
            !b.slot.asked_to_close() && !d.slot.asked_to_close(),
            "a connection in a request is never told to close"
        );
        b.slot.idle();
        assert!(b.slot.asked_to_close(), "an answer done while one waits closes its connection");
        drop(b); // Its client closed it first: not counted.
        let e = e.await.unwrap().unwrap();
        e.slot.busy();
        // Nobody idle and nobody leaving: refused after the wait.
        let f = conns.admit().await;
        assert!(f.is_none());
        let text = String::from_utf8(m.render()).unwrap();
        assert!(text.contains("anibridge_client_connections_closed_total{reason=\"idle_for_room\"} 2"), "{text}");
        assert!(text.contains("anibridge_client_connections_closed_total{reason=\"no_room\"} 1"), "{text}");
        assert!(text.contains("anibridge_client_connections 2\n"), "d and e: {text}");
    }

    #[tokio::test(start_paused = true)]
    async fn as_many_wait_as_there_are_slots() {
        let m = metrics();
        let conns = Connections::new(1, Duration::from_secs(5), &m);
        let a = conns.admit().await.unwrap();
        a.slot.busy();
        let waiter = tokio::spawn({
            let conns = conns.clone();
            async move { conns.admit().await.is_some() }
        });
        tokio::task::yield_now().await;
        assert!(conns.admit().await.is_none(), "a second waiter is closed at once");
        assert!(!waiter.is_finished());
        drop(a);
        assert!(waiter.await.unwrap(), "the first is admitted when the slot is given back");
    }

    #[test]
    fn unset_it_is_ten_thousand_or_a_quarter_of_the_open_files_limit() {
        let files = rlimit::Resource::NOFILE.get().unwrap().0 as usize;
        assert_eq!(bound(None), (files / 4).clamp(1, 10_000));
        assert_eq!((bound(Some(7)), bound(Some(0))), (7, 0), "a set value is kept");
    }

    #[test]
    fn a_bound_over_a_quarter_of_the_open_files_limit_is_warned_of() {
        assert_eq!(too_high(None, 1024), None, "unset: the bound follows the limit");
        assert_eq!(too_high(Some(0), 1024), None, "unbounded is a choice of its own");
        assert_eq!(too_high(Some(256), 1024), None);
        let warning = too_high(Some(257), 1024).expect("over a quarter");
        assert!(
            warning.starts_with("downstream.max_connections is 257, over a quarter of the open-files limit (1024)"),
            "{warning}"
        );
    }

    #[test]
    fn a_parked_reader_is_woken_to_close() {
        struct Flag(AtomicBool);
        impl std::task::Wake for Flag {
            fn wake(self: Arc<Self>) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let m = metrics();
        let conns = Connections::new(1, Duration::from_secs(1), &m);
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let a = rt.block_on(conns.admit()).unwrap();
        let flag = Arc::new(Flag(AtomicBool::new(false)));
        let waker = Waker::from(flag.clone());
        assert!(!a.slot.closing(&waker), "parked");
        assert!(conns.close_longest_idle());
        assert!(flag.0.load(Ordering::SeqCst), "woken");
        assert!(a.slot.closing(&waker));
        assert!(!conns.close_longest_idle(), "one told to close already is not told again");
    }
}
