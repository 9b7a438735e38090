//! One object of the cache: the upstream's header, once it exists, and its
//! body as an append-only list of pieces that readers follow while a fill
//! is still writing (read-while-filling, as Varnish's streaming and Traffic
//! Server's read-while-writer do). Progress is a `watch` channel, so every
//! reader waits for exactly the bytes it needs, at its own pace, and a slow
//! reader never holds up the fill or another reader. A body in a file may
//! also hold its tail before the fill gets there, fetched by a range ahead
//! of it ([`Entry::kept_tail`]).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use pingora_error::{Error, ErrorType};
use pingora_http::ResponseHeader;
use tokio::sync::watch;
use url::Url;

use super::lease::Lease;
use super::pace::Pace;
use super::sealed::BodyFile;
use super::Key;
use crate::gate::Lent;
use crate::upstream::FetchError;

/// How many of a body's first bytes an entry keeps beside the body: what
/// tells a playlist from media ([`crate::proxy::decide::SNIFF`]), which
/// every answer from memory of a generic type asks again.
pub const FIRST_BYTES: usize = crate::proxy::decide::SNIFF;

/// Why a reader was aborted: its fill died for good (which the fill
/// logged, once for all its readers).
const FILL_FAILED: &str = "the cache's upstream fetch failed mid-body";

/// Whether `e` aborted a reader because its fill died: the fill said so in
/// the log already, so its readers' errors need no line each.
pub fn is_fill_failure(e: &Error) -> bool {
    *e.etype() == ErrorType::ConnectionClosed && e.context.as_ref().is_some_and(|c| c.as_str() == FILL_FAILED)
}

/// Where a fill is.
#[derive(Debug, Clone)]
pub enum Progress {
    /// Waiting for the upstream's header.
    Pending,
    /// The header is there; this many body bytes are.
    Filling(u64),
    /// The whole body is there.
    Done,
    /// The upstream's answer is not to be shared (or does not fit): each
    /// request goes upstream itself.
    Declined,
    /// The host refused the fetch (`429`, `509`, `503` with `Retry-After`):
    /// an answer about how many requests it takes at once, so it goes to
    /// the request that started the fill only; the others look again, and
    /// one of them leads a new fill through the host's gate (after the
    /// cooldown, under the limit the refusal taught).
    Refused,
    /// The fetch failed before a header (`Some`: every waiting request gets
    /// this failure) or after it (`None`: readers still waiting are aborted).
    Failed(Option<FetchError>),
}

/// The upstream's answer as stored.
#[derive(Debug)]
pub struct Head {
    /// As received minus what the header policy drops (applied once here,
    /// not on every answer), and a `206` covering the whole object kept as
    /// the `200` it stands for (`Content-Range` dropped).
    pub header: ResponseHeader,
    /// The final URL (after redirects): what playlist URIs resolve against.
    pub url: Url,
    /// Body length (`Content-Length`).
    pub len: u64,
    /// A `200` for the whole object: ranges and conditionals can be
    /// answered from it. Otherwise (an error status) it is relayed as it is.
    pub whole: bool,
    /// The status the upstream answered with (a `206` for the whole
    /// object, where `header` says `200`): what the access log reports.
    pub upstream_status: u16,
    /// When the header arrived, and the upstream's own `Age` then.
    pub received: Instant,
    pub initial_age: u64,
}

impl Head {
    /// The header kept of `upstream` (what the upstream answered, or the
    /// whole object's `200` it stands for), received now from `url` with
    /// `upstream_status`, for a body of `len` bytes.
    pub(super) fn new(upstream: &ResponseHeader, url: Url, upstream_status: u16, len: u64, whole: bool) -> Head {
        let relayed = crate::headers::relayed(upstream);
        Head {
            // Its own bytes: not Pingora's read buffer, for as long as it is kept.
            header: crate::headers::compact(&relayed).unwrap_or(relayed),
            url,
            len,
            whole,
            upstream_status,
            received: Instant::now(),
            initial_age: super::age_of(upstream),
        }
    }

    /// What keeping an object costs beside its body, in bytes of
    /// `cache.max_bytes`: its header and key, and the bookkeeping around
    /// them. Measured (BENCHMARKS.md): 50 000 objects of a 1 KiB body with
    /// nginx's header took about 5.7 KiB each.
    pub(super) fn cost(&self, key: &Key) -> u64 {
        ENTRY_COST + (key.0.len() + crate::headers::byte_len(&self.header)) as u64
    }

    /// RFC 9111's `Age`: the upstream's plus the time held here.
    pub fn age(&self) -> u64 {
        self.initial_age.saturating_add(self.received.elapsed().as_secs())
    }
}

/// The bookkeeping of one object beside its header's and key's bytes: the
/// entry, its two header maps, its URL, its progress channel and its place
/// in the LRU (about 4 KiB, measured).
const ENTRY_COST: u64 = 4096;

/// What a request waiting on an entry learns.
#[derive(Debug)]
pub enum Ready {
    /// The header is there ([`Entry::head`]).
    Head,
    Declined,
    /// See [`Progress::Refused`].
    Refused,
    Failed(FetchError),
}

/// A complete body: its pieces in the heap, or its sealed file.
enum Stored {
    Heap(Pieces),
    File,
}

/// The body's pieces, in order, with the offset each starts at: each a view
/// into one allocation of the whole body (one block per object keeps the
/// allocator from fragmenting as objects come and go: measured in
/// BENCHMARKS.md).
#[derive(Default, Clone)]
struct Pieces {
    list: Vec<Bytes>,
    starts: Vec<u64>,
}

impl Pieces {
    /// Bytes `pos..end` (at most `chunk` of them, within one piece): the
    /// piece, and the part of it; `None` past what is there.
    fn at(&self, pos: u64, end: u64, chunk: usize) -> Option<(&Bytes, std::ops::Range<usize>)> {
        let i = self.starts.partition_point(|s| *s <= pos).checked_sub(1)?;
        let (start, piece) = (self.starts[i], &self.list[i]);
        let from = (pos - start) as usize;
        let to = piece.len().min(from.saturating_add(chunk)).min((end - start) as usize);
        (from < to).then_some((piece, from..to))
    }
}

pub struct Entry {
    pub(super) key: Key,
    progress: watch::Sender<Progress>,
    head: OnceLock<Head>,
    /// The body in the heap, as it arrives...
    body: RwLock<Pieces>,
    /// ...or in a file (decided at the first piece: [`BodyFile::new`]),
    /// with how much of it is written.
    file: OnceLock<Option<BodyFile>>,
    filed: AtomicU64,
    /// The body's first [`FIRST_BYTES`] (all of a shorter body), once
    /// written: a sniff of a stored object costs no read of its file.
    first: OnceLock<Box<[u8]>>,
    /// The body once complete: read as it is, without the lock or the
    /// progress channel (most reads, on a busy cache, are of these).
    stored: OnceLock<Stored>,
    /// Only a header (a HEAD's answer): no body to read.
    pub head_only: bool,
    /// Times the fill's body was continued on a new upstream connection
    /// (its readers' access lines say so, as a relay's would).
    resumed: AtomicU32,
    /// A range ahead of the fill is being fetched upstream alone
    /// ([`AheadSlot`]); its end wakes those waiting to go next.
    ahead: AtomicBool,
    ahead_done: tokio::sync::Notify,
    /// How fast the fill has brought the body lately.
    pace: Mutex<Pace>,
    /// The fill reads its body holding its host's only slot, and may lend
    /// it ([`Entry::lend`]): `lendable` while it may, `lend` its call.
    lendable: AtomicBool,
    lend: tokio::sync::Notify,
    /// The fill holds its slot at the host in hand, and would hand that
    /// very slot over if asked to lend now ([`Entry::holds_its_slot`]).
    holding: AtomicBool,
    /// The fill lent its slot and is not reading again yet: no other range
    /// may go ahead meanwhile ([`Entry::ahead_slot`]), or the fill would
    /// wait for it too — a seek read at its client's pace, while every
    /// reader of the fill stalls — and, at a host whose limit was just
    /// raised, go beside it and be refused.
    lent: AtomicBool,
    /// The slot itself, handed from the fill to the range it lent it to
    /// and back ([`Lent`]): the fill has it back before any request that
    /// waits in line at the host.
    lent_slot: Mutex<Option<Arc<Lent>>>,
    /// The lend is to a seek while nobody read the fill, and ends as soon
    /// as a reader waits for the fill's next bytes ([`Entry::lend`]).
    reclaimable: AtomicBool,
    /// A reader began to wait during such a lend, or a range asked for
    /// the connection back (`claimed`).
    wanted: tokio::sync::Notify,
    claimed: AtomicBool,
    /// That seek's fetch, once it has one, for the fill to take back.
    borrower: Mutex<Borrower>,
    /// Readers of the body while it is being filled, and how many of them
    /// wait for bytes that are not there yet.
    readers: AtomicUsize,
    waiting: AtomicUsize,
    /// Where the body's tail starts that a range fetched ahead of the fill
    /// brought whole into the body's file, at its place (`u64::MAX`: none);
    /// see [`Entry::kept_tail`].
    tail: AtomicU64,
    /// Its share of `cache.max_bytes`, given back when it is dropped: when
    /// it is out of the store and its last reader is done.
    charge: OnceLock<Charge>,
}

/// Bytes of `cache.max_bytes` an entry holds, given back on drop.
pub(super) struct Charge {
    bytes: u64,
    held: prometheus::IntGauge,
}

impl Charge {
    pub(super) fn new(bytes: u64, held: prometheus::IntGauge) -> Charge {
        Charge { bytes, held }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.held.sub(self.bytes as i64);
    }
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry").field("progress", &*self.progress.borrow()).finish_non_exhaustive()
    }
}

impl Entry {
    /// An entry waiting for its fill's header.
    pub(super) fn pending(key: Key) -> Arc<Entry> {
        Entry::new(key, Progress::Pending, OnceLock::new())
    }

    /// A complete entry of only a header (what a HEAD was answered).
    pub(super) fn header_only(key: Key, head: Head) -> Arc<Entry> {
        Entry::new(key, Progress::Done, OnceLock::from(head))
    }

    /// An entry at `progress` with `head`, and no body yet: only a header
    /// when it is complete from the start.
    fn new(key: Key, progress: Progress, head: OnceLock<Head>) -> Arc<Entry> {
        let head_only = matches!(progress, Progress::Done);
        Arc::new(Entry {
            key,
            progress: watch::Sender::new(progress),
            head,
            body: RwLock::default(),
            file: OnceLock::new(),
            filed: AtomicU64::new(0),
            first: OnceLock::new(),
            stored: OnceLock::new(),
            head_only,
            resumed: AtomicU32::new(0),
            ahead: AtomicBool::new(false),
            ahead_done: tokio::sync::Notify::new(),
            pace: Mutex::default(),
            lendable: AtomicBool::new(false),
            holding: AtomicBool::new(false),
            lend: tokio::sync::Notify::new(),
            lent: AtomicBool::new(false),
            lent_slot: Mutex::default(),
            reclaimable: AtomicBool::new(false),
            wanted: tokio::sync::Notify::new(),
            claimed: AtomicBool::new(false),
            borrower: Mutex::default(),
            readers: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            tail: AtomicU64::new(u64::MAX),
            charge: OnceLock::new(),
        })
    }

    /// The header, once there.
    pub fn head(&self) -> Option<&Head> {
        self.head.get()
    }

    /// Waits until the header is there (or the fill declined or failed).
    pub async fn ready(&self) -> Ready {
        let mut rx = self.progress.subscribe();
        loop {
            let state = rx.borrow_and_update().clone();
            match state {
                Progress::Pending => {}
                Progress::Declined => return Ready::Declined,
                Progress::Refused => return Ready::Refused,
                Progress::Failed(Some(e)) => return Ready::Failed(e),
                _ => {
                    if self.head.get().is_some() {
                        return Ready::Head;
                    }
                    // Failed after a header that never was: nothing to share.
                    return Ready::Declined;
                }
            }
            if rx.changed().await.is_err() {
                return Ready::Declined;
            }
        }
    }

    /// Whether the fill completed (the object is whole in memory): one
    /// atomic load, no lock — every answer from memory asks it.
    pub fn is_done(&self) -> bool {
        self.head_only || self.stored.get().is_some()
    }

    /// The complete body's sealed file, if it is kept in one.
    pub fn sealed(&self) -> Option<&BodyFile> {
        match self.stored.get() {
            Some(Stored::File) => self.body_file(),
            _ => None,
        }
    }

    /// The body's file, if it goes to one.
    fn body_file(&self) -> Option<&BodyFile> {
        self.file.get().and_then(Option::as_ref)
    }

    /// The body's first `n` bytes, if they are kept ([`FIRST_BYTES`] at
    /// most) and written.
    pub fn first_bytes(&self, n: u64) -> Option<&[u8]> {
        let kept = self.first.get()?;
        (kept.len() as u64 >= n).then(|| &kept[..n as usize])
    }

    /// Times the fill's body was continued on a new upstream connection so far.
    pub fn resumptions(&self) -> u32 {
        self.resumed.load(Ordering::Relaxed)
    }

    /// Whether body byte `pos` is there, or will be within `patience` at
    /// the pace the fill brings its body now ([`Pace`]); `None` in its
    /// first moments, when that is not known yet. A range far ahead of a
    /// slow fill (a seek to the end of a large file: a player reading an
    /// MP4's index, a viewer skipping ahead) need not wait minutes for it
    /// ([`crate::proxy`] sends it upstream alone when the host has a slot
    /// free).
    pub fn arrives_within(&self, pos: u64, patience: Duration) -> Option<bool> {
        if self.is_done() || self.in_tail(pos) {
            return Some(true);
        }
        let Some(head) = self.head() else { return Some(true) };
        // Marked before it could be read: no mark is past what is written.
        let pace = self.pace.lock().unwrap_or_else(|e| e.into_inner());
        let written = self.written();
        pace.brings(head.received, Instant::now(), written, pos.saturating_sub(written), patience)
    }

    /// The one range of this object that may be fetched upstream alone,
    /// ahead of its fill, at a time: the hoster sees at most one connection
    /// for the file besides the fill's. `None` while another has it.
    /// While the fill is away, having lent its slot, nobody has it.
    pub fn ahead_slot(self: &Arc<Self>) -> Option<AheadSlot> {
        if self.lent.load(Ordering::Acquire) {
            return None;
        }
        let free = self.ahead.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).is_ok();
        // (A lend is asked by the slot's holder, before it gives the slot
        // back: a slot taken after that sees it.)
        let slot = free.then(|| AheadSlot(self.clone()))?;
        (!self.lent.load(Ordering::Acquire)).then_some(slot)
    }

    /// Done when a range that has the object's [`AheadSlot`] is done with
    /// it (`enable` it before looking at the slot, so no release is missed).
    pub fn ahead_done(&self) -> tokio::sync::futures::Notified<'_> {
        self.ahead_done.notified()
    }

    /// Asks the fill to lend its connection's slot at the host to the
    /// range that holds the object's [`AheadSlot`], when the host allows
    /// one connection at a time and the fill holds it: the fill lets its
    /// connection go, hands its slot to the range's fetch (which takes it
    /// with [`AheadSlot::lent`] rather than wait in line), waits until that
    /// range is done, and continues its body on a new connection from
    /// where it was, on the same slot — given back to it before anyone
    /// who came to wait in line meanwhile. So a player reading an
    /// MP4's index at its end need not wait for the whole download from a
    /// hoster that allows one connection per address. `reclaimable`: a
    /// seek, lent the slot because nobody reads the fill ([`Entry::unread`]),
    /// which would hold the fill up for as long as it is watched: the fill
    /// takes its connection back as soon as a reader waits for its next
    /// bytes (the seek's fetch registered with [`Entry::borrowed`]), and
    /// the seek then reads on from the fill. False when the fill cannot
    /// lend (it is not reading a body it could continue).
    pub fn lend(&self, reclaimable: bool) -> bool {
        let can = self.lendable.load(Ordering::Acquire);
        if can {
            *self.borrower.lock().unwrap_or_else(|e| e.into_inner()) = Borrower::default();
            *self.lent_slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::default());
            self.claimed.store(false, Ordering::SeqCst);
            self.reclaimable.store(reclaimable, Ordering::SeqCst);
            self.lent.store(true, Ordering::Release);
            self.lend.notify_one();
        }
        can
    }

    /// Whether the fill holds its slot at the host in hand (reading its
    /// body on its own connection, not between connections): what it
    /// lends is then its own slot, whoever waits in line at the host
    /// ([`crate::gate::Gate::full_with_one`]).
    pub fn holds_its_slot(&self) -> bool {
        self.holding.load(Ordering::Acquire)
    }

    /// One reader at most reads the body as it is filled (the one asking).
    pub fn alone(&self) -> bool {
        self.readers.load(Ordering::SeqCst) <= 1
    }

    /// The fill reads a body it could continue, and has not lent its slot.
    fn could_lend(&self) -> bool {
        self.lendable.load(Ordering::Acquire) && !self.lent.load(Ordering::Acquire)
    }

    /// Nobody reads the body as it is filled (its first viewer left, and
    /// no other came): a seek may borrow the fill's connection until
    /// someone does.
    pub fn unread(&self) -> bool {
        self.readers.load(Ordering::SeqCst) == 0
    }

    /// Waits until body byte `pos` is there or near (`false`: read it from
    /// the fill), or, `pos` being further than `patience` away, until the
    /// range may go upstream itself (`true`): its host has `room`, or the
    /// fill could lend its slot to the one reader waiting for it — a seek
    /// that came while another viewer read the fill (ffmpeg opens a seek
    /// before it closes its previous request) and is now alone.
    pub async fn there_or_alone(&self, pos: u64, patience: Duration, room: impl Fn() -> bool) -> bool {
        let mut rx = self.progress.subscribe();
        loop {
            let filling = matches!(*rx.borrow_and_update(), Progress::Filling(_));
            if !filling || self.holds(pos) || self.arrives_within(pos, patience) == Some(true) {
                return false;
            }
            if !self.ahead.load(Ordering::Acquire) && ((self.alone() && self.could_lend()) || room()) {
                return true;
            }
            let _waiting = Waiting::new(self);
            // Readers leaving are not news on the channel: looked at again
            // with the fill's next bytes, or shortly.
            if let Ok(Err(_)) = tokio::time::timeout(LOOK_AGAIN, rx.changed()).await {
                return false;
            }
        }
    }

    /// `lease` is the fetch of the range the fill lent its slot to: the
    /// fill takes it back when a reader waits for it, if the lend is one it
    /// takes back ([`Entry::lend`]). False when it already did: the range
    /// reads on from the fill at once.
    pub fn borrowed(&self, lease: &Arc<Lease>) -> bool {
        // (The fill is back only once the borrower's slot is let go: a lend
        // taken back before its fetch registered is still on here.)
        if !self.lent_to_a_seek() {
            return true;
        }
        let mut borrower = self.borrower.lock().unwrap_or_else(|e| e.into_inner());
        if borrower.taken {
            return false;
        }
        borrower.lease = Some(Arc::downgrade(lease));
        true
    }

    /// The fill lent its connection to a seek, and takes it back for the
    /// first reader that waits for it: another range far ahead waits for
    /// the fill as a reader (so that it is taken back), not for its turn.
    pub fn lent_to_a_seek(&self) -> bool {
        self.reclaimable.load(Ordering::SeqCst) && self.lent.load(Ordering::Acquire)
    }

    /// Asks the fill to take its connection back from the seek it lent it
    /// to: for the file's short end (an MP4's index, which a new viewer
    /// reads first), which the fill then lends it in its turn.
    pub fn claim(&self) {
        self.claimed.store(true, Ordering::SeqCst);
        self.wanted.notify_one();
    }

    // ---- the fill's side of lending ------------------------------------

    /// Whether the fill may be asked to lend its slot from now on.
    pub(super) fn set_lendable(&self, can: bool) {
        self.lendable.store(can, Ordering::Release);
    }

    /// Whether the fill holds its slot in hand from now on.
    pub(super) fn set_holding(&self, holding: bool) {
        self.holding.store(holding, Ordering::Release);
    }

    /// Done when the fill is asked to lend its slot.
    pub(super) fn lend_asked(&self) -> tokio::sync::futures::Notified<'_> {
        self.lend.notified()
    }

    /// Where the fill, asked to lend its slot, hands it to the range.
    pub(super) fn lending(&self) -> Option<Arc<Lent>> {
        self.lent_slot.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The fill is reading again after a lend (or has ended): ranges
    /// waiting to go ahead of it look again.
    pub(super) fn back(&self) {
        // A slot never handed over (the fill ended first): the range asks the gate.
        if let Some(slot) = self.lent_slot.lock().unwrap_or_else(|e| e.into_inner()).take() {
            slot.close();
        }
        self.reclaimable.store(false, Ordering::SeqCst);
        self.claimed.store(false, Ordering::SeqCst);
        if self.lent.swap(false, Ordering::AcqRel) {
            self.ahead_done.notify_waiters();
        }
    }

    /// Waits, lent, until no range holds the object's [`AheadSlot`]; a
    /// lend it takes back ([`Entry::lend`]) is taken back as soon as a
    /// reader waits for the body's next bytes.
    pub(super) async fn away(&self) {
        loop {
            let mut done = std::pin::pin!(self.ahead_done());
            done.as_mut().enable();
            let mut wanted = std::pin::pin!(self.wanted.notified());
            wanted.as_mut().enable();
            if !self.ahead.load(Ordering::Acquire) {
                return;
            }
            let wanted_back = self.waiting.load(Ordering::SeqCst) > 0 || self.claimed.load(Ordering::SeqCst);
            if self.reclaimable.load(Ordering::SeqCst) && wanted_back {
                self.take_back();
                // Then the range's slot is let go (at once, or when its
                // fetch was not registered yet, as it registers).
                done.await;
                continue;
            }
            tokio::select! {
                () = done => {}
                () = wanted => {}
            }
        }
    }

    /// Takes the fill's connection back from the seek it was lent to.
    fn take_back(&self) {
        let lease = {
            let mut borrower = self.borrower.lock().unwrap_or_else(|e| e.into_inner());
            borrower.taken = true;
            borrower.lease.take()
        };
        if let Some(lease) = lease.and_then(|l| l.upgrade()) {
            log::debug!("a cache fill takes back the connection it lent to a seek: a reader waits for it");
            lease.take_back();
        }
    }

    /// Whether body byte `pos` is there (written, in a kept tail, or the
    /// body complete).
    pub fn holds(&self, pos: u64) -> bool {
        self.is_done() || self.there_from(pos) > pos
    }

    /// Where the bytes there from `pos` on end: what the fill has written,
    /// or the body's end within a kept tail.
    fn there_from(&self, pos: u64) -> u64 {
        let written = self.written();
        if pos >= written && self.in_tail(pos) {
            return self.head().map_or(written, |h| h.len);
        }
        written
    }

    /// Whether `pos` is in the tail a range fetched ahead kept.
    fn in_tail(&self, pos: u64) -> bool {
        pos >= self.tail.load(Ordering::Acquire)
    }

    // ---- a range fetched ahead of the fill -------------------------------

    /// The file a range fetched upstream alone, ahead of the fill, writes
    /// its bytes into, at their place, when they reach the body's end
    /// ([`Entry::kept_tail`]): `None` when the body is in the heap (a short
    /// one, or no file to be had) or complete.
    pub fn tail_file(&self) -> Option<&BodyFile> {
        let len = self.head()?.len;
        if self.is_done() {
            return None;
        }
        self.file_for(len)
    }

    /// The file of a body of `len` bytes, decided at the first write (the
    /// fill's, or a tail's): `None` when it stays in the heap.
    fn file_for(&self, len: u64) -> Option<&BodyFile> {
        self.file.get_or_init(|| BodyFile::new(len)).as_ref()
    }

    /// Body bytes `first..` (to the body's end) fetched ahead of the fill
    /// are all in its file ([`Entry::tail_file`]): from now on they are
    /// read from there, by every viewer, before the fill gets to them. Every
    /// player opening an MP4 whose index is at its end asks for the same
    /// tail at once: the hoster sends it once, not once per viewer, and
    /// the viewers after the first need not wait for their turn upstream.
    /// The fill writes the same bytes there later (the range was of the
    /// same file: its length and validator are the fill's). A tail only,
    /// never a run in the middle: a reader of a kept run would otherwise
    /// wait at its end for a fill that may be minutes behind.
    pub fn kept_tail(&self, first: u64) {
        self.tail.fetch_min(first, Ordering::AcqRel);
        // Readers waiting for these bytes look again.
        self.progress.send_modify(|_| {});
    }

    /// A reader of body bytes `first..end`.
    pub fn reader(self: &Arc<Self>, first: u64, end: u64, chunk: usize) -> Reader {
        // (Counted only while the body is being filled: a stored body's
        // readers, the many, cost no shared write.)
        let counted = !self.is_done();
        if counted {
            self.readers.fetch_add(1, Ordering::SeqCst);
        }
        Reader { entry: self.clone(), rx: None, pos: first, end, chunk, piece: Bytes::new(), buf: Vec::new(), counted }
    }

    /// The whole body, once the fill is done (for playlists, bounded by
    /// the object size limit).
    pub async fn whole_body(self: &Arc<Self>, chunk: usize) -> pingora_error::Result<Vec<u8>> {
        let len = self.head().map_or(0, |h| h.len);
        let mut out = Vec::with_capacity(len as usize);
        let mut reader = self.reader(0, len, chunk);
        while let Some(piece) = reader.read().await? {
            out.extend_from_slice(piece);
        }
        Ok(out)
    }

    // ---- the fill's side -----------------------------------------------

    /// The header is there: readers may start.
    pub(super) fn set_head(&self, head: Head) {
        let _ = self.head.set(head);
        self.progress.send_replace(Progress::Filling(0));
    }

    /// Its share of the budget (once).
    pub(super) fn charge(&self, charge: Charge) {
        let _ = self.charge.set(charge);
    }

    /// The fill's upstream body has been resumed `times` so far.
    pub(super) fn resumed(&self, times: u32) {
        self.resumed.store(times, Ordering::Relaxed);
    }

    /// Appends a body read whole, in pieces of at most `chunk` bytes (what
    /// a reader hands to one client write).
    pub(super) fn append_whole(&self, body: &[u8], chunk: usize) -> std::io::Result<()> {
        let mut block = BytesMut::new();
        for piece in body.chunks(chunk) {
            self.append(&mut block, piece)?;
        }
        Ok(())
    }

    /// Appends `piece` (to the body's file, or copied into `block`, the
    /// buffer of the rest of the body that the fill keeps between calls)
    /// and tells the readers. An error (the kernel refused to grow the
    /// file) fails the fill.
    pub(super) fn append(&self, block: &mut BytesMut, piece: &[u8]) -> std::io::Result<()> {
        let len = self.head().map_or(0, |h| h.len);
        // The body's first piece: its first bytes are kept from it, not read back.
        let opening = (self.first.get().is_none() && self.written() == 0).then_some(piece);
        if let Some(file) = self.file_for(len) {
            let at = self.filed.load(Ordering::Relaxed);
            let n = piece.len().min(len.saturating_sub(at) as usize);
            file.write_at(&piece[..n], at)?;
            self.filed.store(at + n as u64, Ordering::Release);
            self.keep_first(len, opening);
            self.wrote(at + n as u64);
            return Ok(());
        }
        let mut piece = piece;
        while !piece.is_empty() {
            if block.capacity() == block.len() {
                // The rest of the body in one block.
                let left = len.saturating_sub(self.written()).max(1);
                *block = BytesMut::with_capacity(left as usize);
            }
            let n = piece.len().min(block.capacity() - block.len());
            block.extend_from_slice(&piece[..n]);
            piece = &piece[n..];
            let filled = block.split().freeze();
            let mut body = self.body.write().unwrap_or_else(|e| e.into_inner());
            let start = body.starts.last().map_or(0, |s| s + body.list.last().map_or(0, |p| p.len() as u64));
            body.starts.push(start);
            body.list.push(filled);
            let written = start + n as u64;
            drop(body);
            self.keep_first(len, opening);
            self.wrote(written);
        }
        Ok(())
    }

    /// `written` body bytes are there: the fill's pace is marked, and the readers told.
    fn wrote(&self, written: u64) {
        self.pace.lock().unwrap_or_else(|e| e.into_inner()).wrote(Instant::now(), written);
        self.progress.send_replace(Progress::Filling(written));
    }

    /// Keeps the body's first bytes once they are all written (before
    /// readers hear of them): from the `opening` piece when it holds them
    /// all, else read back (a body that began in smaller pieces).
    fn keep_first(&self, len: u64, opening: Option<&[u8]>) {
        if self.first.get().is_some() {
            return;
        }
        let want = len.min(FIRST_BYTES as u64) as usize;
        let kept = match opening {
            Some(piece) if piece.len() >= want => piece[..want].into(),
            _ if self.written() >= want as u64 => self.bytes(want).into(),
            _ => return,
        };
        let _ = self.first.set(kept);
    }

    /// Up to `limit` of the body bytes written so far, from the first.
    pub(super) fn bytes(&self, limit: usize) -> Vec<u8> {
        if let Some(file) = self.body_file() {
            let mut out = vec![0; limit.min(self.written() as usize)];
            return match file.read_at(&mut out, 0) {
                Ok(()) => out,
                Err(_) => Vec::new(),
            };
        }
        let body = self.body.read().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::with_capacity(limit.min(1 << 20));
        for piece in &body.list {
            let n = piece.len().min(limit - out.len());
            out.extend_from_slice(&piece[..n]);
            if out.len() == limit {
                break;
            }
        }
        out
    }

    /// Body bytes written so far.
    pub(super) fn written(&self) -> u64 {
        if self.body_file().is_some() {
            return self.filed.load(Ordering::Acquire);
        }
        let body = self.body.read().unwrap_or_else(|e| e.into_inner());
        body.starts.last().map_or(0, |s| s + body.list.last().map_or(0, |p| p.len() as u64))
    }

    /// The fill is over; a complete body is kept for its readers from now
    /// on (a file sealed: nothing in it changes again).
    pub(super) fn finish(&self, state: Progress) {
        if let Progress::Done = state {
            let stored = match self.body_file() {
                Some(file) => {
                    if let Err(e) = file.seal() {
                        log::warn!("cache: a stored body's file could not be sealed: {e}");
                    }
                    Stored::File
                }
                // Handles to the same bytes: the list, not the body, is copied.
                None => Stored::Heap(self.body.read().unwrap_or_else(|e| e.into_inner()).clone()),
            };
            let _ = self.stored.set(stored);
        }
        self.progress.send_replace(state);
    }

    /// What keeping it costs of the budget: its body, header and
    /// bookkeeping ([`Head::cost`]).
    pub(super) fn weight(&self) -> u64 {
        self.head().map_or(0, |h| h.cost(&self.key) + if self.head_only { 0 } else { h.len })
    }

    /// The bytes of the budget it holds.
    pub(super) fn charged(&self) -> u64 {
        self.charge.get().map_or(0, |c| c.bytes)
    }
}

/// How often a reader waiting far ahead of a fill that brings nothing
/// looks again whether it is alone ([`Entry::there_or_alone`]), and one
/// alone whether the host's connection can be lent to it now.
pub const LOOK_AGAIN: Duration = Duration::from_millis(200);

/// The seek a fill lent its connection to while nobody read it.
#[derive(Default)]
struct Borrower {
    /// Its fetch, once it has one (gone with its reader: a seek whose
    /// client left lets its connection go at once).
    lease: Option<std::sync::Weak<Lease>>,
    /// The fill took the connection back.
    taken: bool,
}

/// Held while a range ahead of an entry's fill is fetched upstream alone
/// ([`Entry::ahead_slot`]); given back when dropped.
pub struct AheadSlot(Arc<Entry>);

impl AheadSlot {
    /// The host's slot the fill lends this range ([`Entry::lend`]), for
    /// its fetch to borrow ([`crate::gate::Gate::borrow`]).
    pub fn lent(&self) -> Option<Arc<Lent>> {
        if !self.0.lent.load(Ordering::Acquire) {
            return None;
        }
        self.0.lending()
    }
}

impl Drop for AheadSlot {
    fn drop(&mut self) {
        self.0.ahead.store(false, Ordering::Release);
        self.0.ahead_done.notify_waiters();
    }
}

/// Reads a range of an entry's body, waiting for bytes that are not there
/// yet; each read hands out at most `chunk` bytes (one client write).
pub struct Reader {
    entry: Arc<Entry>,
    /// Subscribed at the first wait: a complete body is read without it.
    rx: Option<watch::Receiver<Progress>>,
    pos: u64,
    end: u64,
    chunk: usize,
    piece: Bytes,
    /// What was read of a body in a file.
    buf: Vec<u8>,
    /// Counted among the readers of a body being filled ([`Entry::unread`]).
    counted: bool,
}

impl Drop for Reader {
    fn drop(&mut self) {
        if self.counted {
            self.entry.readers.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Counts a reader among those waiting for the fill while it waits.
struct Waiting<'a>(&'a Entry);

impl<'a> Waiting<'a> {
    fn new(entry: &'a Entry) -> Waiting<'a> {
        entry.waiting.fetch_add(1, Ordering::SeqCst);
        // A fill that lent its connection to a seek takes it back.
        if entry.reclaimable.load(Ordering::SeqCst) {
            entry.wanted.notify_one();
        }
        Waiting(entry)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Reader {
    /// What is left of the range, unread: `pos..end`.
    pub fn left(&self) -> (u64, u64) {
        (self.pos, self.end)
    }

    /// The next piece, `None` at the end of the range; an error when the
    /// fill failed before the range was there.
    pub async fn read(&mut self) -> pingora_error::Result<Option<&[u8]>> {
        if self.pos >= self.end {
            return Ok(None);
        }
        match self.entry.stored.get() {
            Some(Stored::Heap(_)) => return self.read_heap(),
            Some(Stored::File) => {}
            None => self.wait().await?,
        }
        if let Some(file) = self.entry.body_file() {
            let there = self.end.min(self.entry.there_from(self.pos));
            let n = there.saturating_sub(self.pos).min(self.chunk as u64) as usize;
            if n == 0 {
                return short();
            }
            // One buffer per reader, reused.
            self.buf.resize(n, 0);
            if let Err(e) = file.read_at(&mut self.buf, self.pos) {
                return Err(Error::because(ErrorType::ReadError, "reading a stored body", e));
            }
            self.pos += n as u64;
            return Ok(Some(&self.buf));
        }
        let body = self.entry.body.read().unwrap_or_else(|e| e.into_inner());
        let Some((piece, part)) = body.at(self.pos, self.end, self.chunk) else { return short() };
        self.piece = piece.slice(part);
        drop(body);
        self.pos += self.piece.len() as u64;
        Ok(Some(&self.piece))
    }

    /// The next piece of a complete body in the heap.
    fn read_heap(&mut self) -> pingora_error::Result<Option<&[u8]>> {
        let Some(Stored::Heap(pieces)) = self.entry.stored.get() else { return short() };
        let Some((piece, part)) = pieces.at(self.pos, self.end, self.chunk) else { return short() };
        self.pos += part.len() as u64;
        Ok(Some(&piece[part]))
    }

    /// Waits until byte `pos` is there (or the fill is done).
    async fn wait(&mut self) -> pingora_error::Result<()> {
        let rx = self.rx.get_or_insert_with(|| self.entry.progress.subscribe());
        loop {
            let state = rx.borrow_and_update().clone();
            match state {
                Progress::Filling(written) if written > self.pos || self.entry.in_tail(self.pos) => return Ok(()),
                Progress::Done => return Ok(()),
                Progress::Filling(_) | Progress::Pending => {}
                // What arrived before the fill died is read; a reader still
                // waiting for more is aborted, as a relay would be.
                Progress::Failed(_) if self.entry.there_from(self.pos) > self.pos => return Ok(()),
                Progress::Declined | Progress::Refused | Progress::Failed(_) => {
                    return Error::e_explain(ErrorType::ConnectionClosed, FILL_FAILED);
                }
            }
            let _waiting = Waiting::new(&self.entry);
            if rx.changed().await.is_err() {
                return Error::e_explain(ErrorType::ConnectionClosed, "the cache's upstream fetch went away");
            }
        }
    }
}

/// A stored body that ends before its length said.
fn short<T>() -> pingora_error::Result<T> {
    Error::e_explain(ErrorType::ConnectionClosed, "the cached body is shorter than its length")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(len: u64) -> Head {
        Head {
            header: ResponseHeader::build(200, None).unwrap(),
            url: Url::parse("http://o.test/x").unwrap(),
            len,
            whole: true,
            upstream_status: 200,
            received: Instant::now(),
            initial_age: 0,
        }
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i % 251) as u8).collect()
    }

    async fn read_all(mut r: Reader) -> pingora_error::Result<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(p) = r.read().await? {
            assert!(p.len() <= 1000, "a read hands out at most a chunk");
            out.extend_from_slice(p);
        }
        Ok(out)
    }

    /// Readers at their own ranges follow a fill of `len` bytes, and one
    /// that comes after it reads the stored body.
    async fn readers_follow_a_fill_of(len: u64) -> Arc<Entry> {
        let body = pattern(len as usize);
        let e = Entry::pending(Key::from("k"));
        let readers: Vec<_> = [(0, len), (len / 4, len * 7 / 9), (len - 1, len)]
            .into_iter()
            .map(|(a, b)| {
                let e = e.clone();
                tokio::spawn(async move {
                    assert!(matches!(e.ready().await, Ready::Head));
                    assert_eq!(e.head().unwrap().len, len);
                    (a, b, read_all(e.reader(a, b, 1000)).await.unwrap())
                })
            })
            .collect();
        tokio::task::yield_now().await;
        e.set_head(head(len));
        let mut block = BytesMut::new();
        for piece in body.chunks(7777) {
            e.append(&mut block, piece).unwrap();
            tokio::task::yield_now().await;
        }
        assert_eq!(e.written(), len);
        e.finish(Progress::Done);
        for r in readers {
            let (a, b, got) = r.await.unwrap();
            assert_eq!(got, &body[a as usize..b as usize], "{a}..{b}");
        }
        // A reader that comes after the fill reads from memory at once.
        assert_eq!(e.whole_body(1000).await.unwrap(), body);
        e
    }

    #[tokio::test]
    async fn readers_follow_the_fill_each_at_its_own_range() {
        let heap = readers_follow_a_fill_of(10_000).await;
        assert!(heap.sealed().is_none(), "a short body stays in the heap");
        let filed = readers_follow_a_fill_of(300_000).await;
        assert!(filed.sealed().is_some(), "a longer one is kept in a sealed file");
    }

    #[test]
    fn bytes_are_soon_at_the_fills_pace() {
        let patience = Duration::from_secs(1);
        let e = Entry::pending(Key::from("k"));
        assert_eq!(e.arrives_within(1 << 30, patience), Some(true), "no header yet: nothing to judge");
        e.set_head(head(1 << 30));
        assert_eq!(e.arrives_within(0, patience), Some(true));
        assert_eq!(e.arrives_within(1 << 20, patience), Some(false), "nothing written: no pace");
        let slot = e.ahead_slot();
        assert!(slot.is_some() && e.ahead_slot().is_none(), "one range ahead at a time");
        drop(slot);
        assert!(e.ahead_slot().is_some(), "given back");
    }

    /// While the fill is away, having lent its slot to a range, no other
    /// range gets the object's slot — not even once that range is done —
    /// until the fill is reading again; those waiting are woken then.
    #[tokio::test]
    async fn a_fill_that_lent_its_slot_is_back_before_another_range_goes_ahead() {
        let e = Entry::pending(Key::from("k"));
        let lender = e.ahead_slot().expect("free");
        assert!(!e.lend(false), "not while the fill cannot lend");
        e.set_lendable(true);
        let asked = e.lend_asked();
        assert!(e.lend(false));
        asked.await;
        assert!(e.ahead_slot().is_none(), "the range it lent to has it");
        let gone = tokio::spawn({
            let e = e.clone();
            async move { e.away().await }
        });
        // A range waiting its turn, as a seek does (looking again at each end).
        let waiting = tokio::spawn({
            let e = e.clone();
            async move {
                loop {
                    let mut done = std::pin::pin!(e.ahead_done());
                    done.as_mut().enable();
                    if let Some(slot) = e.ahead_slot() {
                        return slot;
                    }
                    done.await;
                }
            }
        });
        tokio::task::yield_now().await;
        drop(lender);
        gone.await.unwrap();
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!waiting.is_finished(), "the fill is not reading yet");
        assert!(e.ahead_slot().is_none());
        e.back();
        drop(waiting.await.unwrap());
        // A lend asked but never taken (the fill ended first) is undone at its end.
        assert!(e.lend(false));
        e.set_lendable(false);
        e.back();
        assert!(e.ahead_slot().is_some());
    }

    /// Yields until `done` holds, at most 1 000 times.
    async fn soon(done: impl Fn() -> bool) -> bool {
        for _ in 0..1000 {
            if done() {
                return true;
            }
            tokio::task::yield_now().await;
        }
        done()
    }

    /// A fill lends its connection to a seek only while nobody reads it
    /// (readers of a body being filled are counted), and takes it back as
    /// soon as a reader waits for bytes it has not brought, or a range
    /// claims it; a seek's fetch registered after that is let go at once.
    /// A lend to the file's short end is never taken back.
    #[tokio::test]
    async fn a_seek_lent_the_fill_s_connection_gives_it_back_to_a_waiting_reader() {
        let e = Entry::pending(Key::from("k"));
        e.set_head(head(1000));
        e.set_lendable(true);
        assert!(e.unread());
        let r = e.reader(0, 1000, 100);
        assert!(!e.unread(), "a reader of the body being filled counts");
        drop(r);
        assert!(e.unread());

        // Lent to a seek; nobody waits: the seek keeps it.
        let slot = e.ahead_slot().expect("free");
        assert!(e.lend(true) && e.lent_to_a_seek());
        let lease = Arc::new(Lease::default());
        assert!(e.borrowed(&lease));
        let away = tokio::spawn({
            let e = e.clone();
            async move { e.away().await }
        });
        assert!(!soon(|| lease.is_taken()).await, "kept while nobody waits");
        // A reader comes to wait for the next byte: taken back.
        let mut r = e.reader(0, 10, 100);
        let reading = tokio::spawn(async move { r.read().await.map(|p| p.map(<[u8]>::to_vec)) });
        assert!(soon(|| lease.is_taken()).await, "taken back for the reader");
        drop(slot);
        away.await.unwrap();
        e.back();
        assert!(!e.lent_to_a_seek());
        e.append(&mut BytesMut::new(), &pattern(10)).unwrap();
        assert_eq!(reading.await.unwrap().unwrap(), Some(pattern(10)));

        // Claimed back for the file's short end.
        let slot = e.ahead_slot().expect("free");
        assert!(e.lend(true));
        let lease = Arc::new(Lease::default());
        assert!(e.borrowed(&lease));
        let away = tokio::spawn({
            let e = e.clone();
            async move { e.away().await }
        });
        e.claim();
        assert!(soon(|| lease.is_taken()).await, "taken back for the claim");
        drop(slot);
        away.await.unwrap();
        e.back();

        // Taken back before the seek's fetch registered: let go at once.
        let slot = e.ahead_slot().expect("free");
        assert!(e.lend(true));
        let away = tokio::spawn({
            let e = e.clone();
            async move { e.away().await }
        });
        e.claim();
        let late = Arc::new(Lease::default());
        assert!(soon(|| !e.borrowed(&late)).await, "a fetch registered after the take-back is let go");
        drop(slot);
        away.await.unwrap();
        e.back();

        // A lend to the short end is not taken back by a waiting reader.
        let slot = e.ahead_slot().expect("free");
        assert!(e.lend(false) && !e.lent_to_a_seek());
        let lease = Arc::new(Lease::default());
        assert!(e.borrowed(&lease), "not registered: nothing to take back");
        let away = tokio::spawn({
            let e = e.clone();
            async move { e.away().await }
        });
        let mut r = e.reader(10, 20, 100);
        let reading = tokio::spawn(async move { r.read().await.map(|p| p.map(<[u8]>::to_vec)) });
        assert!(!soon(|| lease.is_taken()).await, "the short end keeps it");
        drop(slot);
        away.await.unwrap();
        e.back();
        e.append(&mut BytesMut::new(), &pattern(10)).unwrap();
        assert_eq!(reading.await.unwrap().unwrap().map(|p| p.len()), Some(10));
    }

    #[tokio::test]
    async fn a_tail_fetched_ahead_is_read_before_the_fill_gets_there() {
        let (len, tail) = (300_000u64, 200_000u64);
        let body = pattern(len as usize);
        let short = Entry::pending(Key::from("k"));
        short.set_head(head(10_000));
        assert!(short.tail_file().is_none(), "a body in the heap keeps no tail");
        let e = Entry::pending(Key::from("k"));
        e.set_head(head(len));
        let mut block = BytesMut::new();
        e.append(&mut block, &body[..100_000]).unwrap();
        let waiting = tokio::spawn({
            let e = e.clone();
            async move { read_all(e.reader(250_000, len, 1000)).await }
        });
        // From the first written byte into the tail: it follows the fill up
        // to the tail, then reads on from the tail.
        let across = tokio::spawn({
            let e = e.clone();
            async move { read_all(e.reader(50_000, len, 1000)).await }
        });
        tokio::task::yield_now().await;
        assert!(!e.holds(tail) && e.arrives_within(tail, Duration::from_secs(1)) != Some(true));
        e.tail_file().unwrap().write_at(&body[tail as usize..], tail).unwrap();
        e.kept_tail(tail);
        assert!(e.holds(tail) && e.holds(len - 1) && !e.holds(tail - 1));
        assert_eq!(e.arrives_within(tail, Duration::from_secs(1)), Some(true));
        assert_eq!(waiting.await.unwrap().unwrap(), &body[250_000..], "woken, and read without the fill");
        assert_eq!(read_all(e.reader(tail, tail + 10, 1000)).await.unwrap(), &body[tail as usize..][..10]);
        e.append(&mut block, &body[100_000..tail as usize]).unwrap();
        assert_eq!(across.await.unwrap().unwrap(), &body[50_000..], "across the gap the fill closed");
        // The fill writes the same bytes there, and completes.
        e.append(&mut block, &body[tail as usize..]).unwrap();
        e.finish(Progress::Done);
        assert_eq!(e.whole_body(1000).await.unwrap(), body);
        assert!(e.tail_file().is_none(), "a complete body takes no more writes");
    }

    #[test]
    fn the_first_bytes_are_kept_once_all_of_them_are_written() {
        // Bodies in the heap and in a file, arriving a byte at a time or
        // whole, shorter and longer than what is kept.
        for (len, piece) in [(300_000, 1), (300_000, 70_000), (10_000, 1), (10_000, 9_999), (5, 1), (5, 5)] {
            let body = pattern(len);
            let e = Entry::pending(Key::from("k"));
            e.set_head(head(len as u64));
            let kept = len.min(FIRST_BYTES);
            let mut block = BytesMut::new();
            for (i, p) in body.chunks(piece).enumerate() {
                let before = i * piece;
                assert_eq!(e.first_bytes(kept as u64).is_some(), before >= kept, "{len}/{piece} before byte {before}");
                e.append(&mut block, p).unwrap();
            }
            assert_eq!(e.first_bytes(kept as u64), Some(&body[..kept]), "{len}/{piece}");
            assert_eq!(e.first_bytes(3), Some(&body[..3]));
            assert_eq!(e.first_bytes(kept as u64 + 1), None, "no more than is kept");
        }
    }

    #[tokio::test]
    async fn a_fill_that_dies_aborts_readers_still_waiting() {
        // In the heap and in a file alike.
        for (len, part) in [(100, 40), (300_000, 120_000)] {
            let e = Entry::pending(Key::from("k"));
            e.set_head(head(len));
            let mut block = BytesMut::new();
            e.append(&mut block, &pattern(part as usize)).unwrap();
            let mut early = e.reader(0, part, 64);
            assert_eq!(early.read().await.unwrap().unwrap(), &pattern(64)[..part.min(64) as usize]);
            let mut late = e.reader(part - 20, len, 64);
            let waiting = tokio::spawn({
                let e = e.clone();
                async move { read_all(e.reader(0, len, 64)).await }
            });
            tokio::task::yield_now().await;
            e.finish(Progress::Failed(None));
            assert!(waiting.await.unwrap().is_err(), "a reader never gets a clean short end");
            // What arrived before the death is still read, then the abort.
            assert_eq!(late.read().await.unwrap().unwrap(), &pattern(part as usize)[part as usize - 20..]);
            assert!(late.read().await.is_err());
            assert!(e.sealed().is_none(), "nothing is stored");
        }
    }

    #[tokio::test]
    async fn waiters_learn_a_decline_or_a_failure_before_the_header() {
        let e = Entry::pending(Key::from("k"));
        let w = tokio::spawn({
            let e = e.clone();
            async move { matches!(e.ready().await, Ready::Declined) }
        });
        tokio::task::yield_now().await;
        e.finish(Progress::Declined);
        assert!(w.await.unwrap());
        let e = Entry::pending(Key::from("k"));
        e.finish(Progress::Failed(Some(FetchError::TooManyRedirects)));
        assert!(matches!(e.ready().await, Ready::Failed(FetchError::TooManyRedirects)));
    }
}
