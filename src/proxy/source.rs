//! Where an answer's bytes come from: the upstream (a `Response` that owns
//! its connection, resuming a body that dies) or memory (a cache entry,
//! stored or still filling). The decision, the pump and the playlist path
//! read both alike, so backpressure, resumption and aborts stay where they
//! are.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use pingora_error::{Error, ErrorType, Result};
use pingora_http::ResponseHeader;
use tokio::sync::mpsc;
use url::Url;

use crate::cache::{AheadSlot, BodyFile, Entry, Head, Lease, Reader, LOOK_AGAIN};
use crate::upstream::resume::Window;
use crate::upstream::{Ask, BodyError, Request, Response};

// The upstream variant is the common one: boxing it to even the sizes out
// would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
pub(super) enum Source {
    Upstream(Response),
    Memory(Memory),
    /// A range far ahead of a cache fill, fetched upstream alone until the
    /// fill has its bytes, then read from the fill.
    Ahead(Box<Ahead>),
}

/// A range fetched upstream alone while a fill of the same file runs
/// behind it ([`super::respond`]): once the fill has written the next byte
/// the client needs, the upstream connection (and its slot at the host's
/// gate) is let go and the rest comes from memory — so a viewer who skipped
/// ahead costs the hoster a second connection only until the fill catches
/// up, not for the rest of the film. Until then it holds the object's one
/// [`AheadSlot`]. A range that runs to the body's end (an MP4's index) is
/// kept in the fill's body for every other viewer ([`Entry::kept_tail`]).
/// A seek the fill lent its host's only connection to, while nobody read
/// the fill, hands over too when the fill takes that connection back (a
/// reader waits for it): the seek then waits for the fill to get there.
/// The upstream answer (with the slot that let it go upstream alone) is
/// read by a task of its own ([`fetch`]), one piece ahead of the client,
/// so the fill can take it back whatever the client does ([`Lease`]).
pub(super) struct Ahead {
    /// The fetch's pieces; `None` once handed over to the fill (dropped:
    /// the fetch lets its connection go).
    pieces: Option<mpsc::Receiver<Fetched>>,
    /// The last piece handed out.
    piece: Bytes,
    /// The upstream's header and what was asked (kept past the hand-over).
    header: ResponseHeader,
    request: Request,
    /// Times the fetch's body was continued on a new connection.
    resumed: Arc<AtomicU32>,
    /// The fill to hand over to: `None` when the upstream's answer is not
    /// of the same file (it is then read to its end, as a relay).
    entry: Option<Arc<Entry>>,
    /// The next byte of the object the client needs, and the end of its range.
    pos: u64,
    end: u64,
    /// Where the fetch started.
    start: u64,
    chunk: usize,
    reader: Option<Reader>,
    /// Where the fill took over, once it did.
    handed_at: Option<u64>,
    /// The range is the body's tail: its bytes are written into the
    /// fill's file as they come (`Some(first)`), and kept for every viewer
    /// once all are there ([`Entry::kept_tail`]).
    tail: Option<u64>,
}

impl Ahead {
    /// `up`, a `206` to a range ahead of `entry`'s fill, fetched with
    /// `slot`. Handed over to the fill only when its bytes are of the same
    /// file: the same complete length and validator (strong `ETag`, else
    /// `Last-Modified`).
    pub fn of(up: Response, entry: Arc<Entry>, slot: AheadSlot, chunk: usize) -> Source {
        let fill = entry.head().and_then(|h| Window::of(&h.header).ok());
        let same = fill.zip(Window::of(up.header()).ok()).filter(|(fill, alone)| {
            fill.total == alone.total && fill.if_range == alone.if_range && fill.etag == alone.etag
        });
        let (pos, end) = same.as_ref().map_or((0, 0), |(_, alone)| (alone.first, alone.last + 1));
        let tail = (same.is_some() && entry.head().is_some_and(|h| h.len == end) && entry.tail_file().is_some())
            .then_some(pos);
        let (header, request) = (up.header().clone(), up.request().clone());
        let lease = Arc::new(Lease::default());
        // Registered with the fill, which may take its connection back; if
        // it did already, the range reads on from the fill at once.
        if same.is_some() && !entry.borrowed(&lease) {
            lease.take_back();
        }
        let resumed = Arc::new(AtomicU32::new(0));
        let (tx, pieces) = mpsc::channel(1);
        tokio::spawn(fetch(up, slot, lease, tx, resumed.clone()));
        Source::Ahead(Box::new(Ahead {
            header,
            request,
            pieces: Some(pieces),
            piece: Bytes::new(),
            resumed,
            entry: same.map(|_| entry),
            pos,
            end,
            start: pos,
            chunk,
            reader: None,
            handed_at: None,
            tail,
        }))
    }

    /// `piece`, the upstream's next bytes at `pos`, are relayed: written
    /// into the fill's file too when the range is the body's tail, and the
    /// tail kept once the last of them is there. A write that fails (the
    /// fill completed and sealed its file meanwhile) keeps nothing.
    fn came(entry: Option<&Arc<Entry>>, tail: &mut Option<u64>, pos: u64, end: u64, piece: &[u8]) {
        let (Some(entry), Some(first)) = (entry, *tail) else { return };
        let written = entry.tail_file().is_some_and(|file| file.write_at(piece, pos).is_ok());
        let at = pos + piece.len() as u64;
        if !written || at >= end {
            *tail = None;
        }
        if written && at == end {
            entry.kept_tail(first);
        }
    }

    async fn read(&mut self) -> Result<Option<&[u8]>> {
        let Ahead { pieces: fetched, piece, entry, pos, end, chunk, reader, handed_at, tail, .. } = self;
        if let Some(pieces) = fetched {
            // Handed over when the fill has the next byte (caught up), or
            // once the fetch ends without its body's end (the fill took its
            // connection back). (At the range's end the upstream's answer
            // is done: it is finished, not cut.)
            let caught_up = *pos < *end && entry.as_ref().is_some_and(|e| e.holds(*pos));
            if !caught_up {
                match pieces.recv().await {
                    Some(Fetched::Piece(next)) => {
                        Ahead::came(entry.as_ref(), tail, *pos, *end, &next);
                        *pos += next.len() as u64;
                        *piece = next;
                        return Ok(Some(piece));
                    }
                    // The object's slot goes once every piece is here (a
                    // tail is kept by then: the next range reads it).
                    Some(Fetched::End(_slot)) => return Ok(None),
                    Some(Fetched::Failed(e)) => return Err(e),
                    None => {}
                }
            }
            // The fetch goes (its connection closed, its gate slot given
            // back, and the object's slot); the rest is read from memory.
            *fetched = None;
            if *pos >= *end {
                return Ok(None);
            }
            let Some(entry) = entry.as_ref() else {
                return Error::e_explain(
                    ErrorType::ConnectionClosed,
                    "a range fetched ahead of a cache fill ended early",
                );
            };
            log::debug!("a range fetched ahead of a cache fill continues from the fill at byte {pos}");
            *reader = Some(entry.reader(*pos, *end, *chunk));
            *handed_at = Some(*pos);
            *tail = None;
        }
        let Some(reader) = reader else { return Ok(None) };
        let piece = reader.read().await?;
        if let Some(p) = &piece {
            *pos += p.len() as u64;
        }
        Ok(piece)
    }
}

/// What a range's fetch hands its reader.
enum Fetched {
    Piece(Bytes),
    /// The body's end, with the object's slot, to be let go once the
    /// reader has every piece.
    End(AheadSlot),
    Failed(Box<Error>),
}

/// Reads `up`, a range fetched ahead of a fill, into `pieces`, one piece
/// ahead of its client. The answer (its connection and gate slot) and
/// `slot` go when the range no longer wants it (its client left, or the
/// fill caught up with it) or the fill takes the connection back
/// ([`Lease`]): the range then ends without its body's end and reads on
/// from the fill.
async fn fetch(
    mut up: Response,
    slot: AheadSlot,
    lease: Arc<Lease>,
    pieces: mpsc::Sender<Fetched>,
    resumed: Arc<AtomicU32>,
) {
    loop {
        let mut taking = std::pin::pin!(lease.taking());
        taking.as_mut().enable();
        if lease.is_taken() {
            break;
        }
        let read = tokio::select! {
            biased;
            () = &mut taking => break,
            () = pieces.closed() => break,
            read = up.read() => read.map(|p| p.map(Bytes::copy_from_slice)),
        };
        resumed.store(up.resumptions(), Ordering::Relaxed);
        let next = match read {
            Ok(Some(piece)) => Fetched::Piece(piece),
            Ok(None) => {
                // Its body read whole: the connection goes back to the pool
                // before the client has the end.
                up.finish().await;
                tokio::select! {
                    biased;
                    // (The reader then has its last piece, or reads it from the fill.)
                    () = taking => {}
                    _ = pieces.send(Fetched::End(slot)) => {}
                }
                return;
            }
            Err(e) => Fetched::Failed(e),
        };
        let failed = matches!(next, Fetched::Failed(_));
        tokio::select! {
            biased;
            () = taking => break,
            sent = pieces.send(next) => {
                if sent.is_err() || failed {
                    break;
                }
            }
        }
    }
    // Dropped mid-body: the connection closes (its slot settles), then the object's slot.
    drop(up);
    drop(slot);
}

/// An answer from a cache entry whose header is there.
pub(super) struct Memory {
    entry: Arc<Entry>,
    /// What was asked (a playlist that must be fetched again whole is
    /// asked for again with it).
    request: Request,
    /// The range being relayed, once chosen.
    reader: Option<Reader>,
    chunk: usize,
    /// Answered as the upstream answered this request (its own fetch,
    /// adopted by the cache), not shaped by the client's range.
    as_fetched: bool,
    /// Read while the fill was still fetching (not a stored object): its
    /// resumptions are this answer's too.
    filling: bool,
    /// A range far ahead of the fill that waits for it because the host
    /// had no room for it (its one connection the fill's, a cooldown, a
    /// full queue): what it needs to fetch its bytes itself later
    /// ([`Memory::borrowed`]).
    borrow: Option<Box<Borrow>>,
}

/// The upstream client and the range's request (with the client's
/// headers), for a range waiting far ahead of a fill to fetch its bytes
/// itself.
pub(super) struct Borrow {
    pub state: Arc<super::State>,
    pub req: Request,
}

impl Memory {
    /// `entry` must have its header (`Entry::ready` said so).
    pub fn new(entry: Arc<Entry>, request: Request, chunk: usize) -> Memory {
        debug_assert!(entry.head().is_some());
        let filling = !entry.is_done();
        Memory { entry, request, reader: None, chunk, as_fetched: false, filling, borrow: None }
    }

    /// May borrow the fill's connection while it waits for it ([`Borrow`]).
    pub fn borrowing(self, borrow: Borrow) -> Memory {
        Memory { borrow: Some(Box::new(borrow)), ..self }
    }

    /// A range waiting far ahead of the fill: the rest of the range is
    /// fetched upstream ([`Ahead`]) — on a slot of its own as soon as the
    /// host has room (a cooldown over, a limit it taught raised), or, at a
    /// host that allows one connection, once its client alone reads the
    /// fill (the viewer it came after left), on the one the fill lends it,
    /// until the fill has its bytes or takes its connection back for a
    /// reader that waits for it. So a viewer seeking far into an episode
    /// does not wait for the download to get there (another file's request
    /// waiting for the host meanwhile waits on: the fill holds the slot and
    /// has it back first). Until then (a cooldown, the fill between
    /// connections) it looks again shortly; one fetch is tried; `None`:
    /// read on from the fill. (Its header went out already, from memory:
    /// the fetch must be of the same file, or it is not used.)
    async fn borrowed(&mut self) -> Option<Source> {
        let (pos, end) = self.reader.as_ref()?.left();
        let borrow = self.borrow.as_ref()?;
        let (gate, host) =
            (borrow.state.client.gate().clone(), borrow.req.url.host_str().unwrap_or_default().to_string());
        let slot = loop {
            let room = || gate.has_room(&host);
            if pos >= end || !self.entry.there_or_alone(pos, super::respond::PATIENCE, room).await {
                if self.entry.holds(pos) {
                    // The fill got there: nothing to borrow for any more.
                    self.borrow = None;
                }
                return None;
            }
            if let Some(slot) = self.entry.ahead_slot() {
                // Its own slot if the host has room; else the fill's, lent
                // only to a reader alone (it holds the fill up).
                if gate.has_room(&host)
                    || (self.entry.alone()
                        && gate.full_with_one(&host, self.entry.holds_its_slot())
                        && self.entry.lend(true))
                {
                    break slot;
                }
            }
            tokio::time::sleep(LOOK_AGAIN).await;
        };
        let borrow = self.borrow.take()?;
        // Asked as a resumption is: the rest of the range, if still the same file.
        let if_range = Window::of(&self.head().header).ok()?.if_range;
        let range = http::HeaderValue::from_str(&format!("bytes={pos}-{}", end - 1)).ok()?;
        let client = &borrow.state.client;
        let host = borrow.req.url.host_str().unwrap_or_default();
        let lent = client.gate().borrow(slot.lent(), host).await;
        let up = match client.open_asking_on(borrow.req, Ask::Resume { range, if_range }, lent).await {
            Ok(up) if up.header().status == http::StatusCode::PARTIAL_CONTENT => up,
            other => {
                let why = other.as_ref().map_or_else(|e| e.to_string(), |r| r.header().status.as_u16().to_string());
                log::debug!("a range waiting far ahead of a cache fill could not borrow its connection ({why})");
                if let Ok(up) = other {
                    up.finish().await;
                }
                return None;
            }
        };
        match Ahead::of(up, self.entry.clone(), slot, self.chunk) {
            Source::Ahead(a) if a.entry.is_some() && a.pos == pos && a.end == end => {
                log::debug!("a range waiting far ahead of a cache fill borrowed its connection at byte {pos}");
                Some(Source::Ahead(a))
            }
            other => {
                other.finish().await;
                None
            }
        }
    }

    /// The request's own fetch, which the cache adopted ([`crate::cache::Cache::adopt`]):
    /// a `200` goes to this client as the upstream sent it, whatever range it
    /// asked (the upstream ignored it); a `206` for all of the object is
    /// shaped by the range like any answer from memory, which gives the same.
    pub fn fetched(entry: Arc<Entry>, request: Request, chunk: usize, status: http::StatusCode) -> Memory {
        Memory { as_fetched: status == http::StatusCode::OK, ..Memory::new(entry, request, chunk) }
    }

    /// Whether the client's range and conditionals shape the answer (see [`Memory::fetched`]).
    pub fn shaped(&self) -> bool {
        self.head().whole && !self.as_fetched
    }

    pub fn head(&self) -> &Head {
        self.entry.head().expect("a memory source has its header")
    }

    /// Relays body bytes `first..end` from here on.
    pub fn select(&mut self, first: u64, end: u64) {
        self.reader = Some(self.entry.reader(first, end, self.chunk));
    }
}

impl Source {
    pub fn header(&self) -> &ResponseHeader {
        match self {
            Source::Upstream(r) => r.header(),
            Source::Memory(m) => &m.head().header,
            Source::Ahead(a) => &a.header,
        }
    }

    /// The final URL (after redirects).
    pub fn url(&self) -> &Url {
        match self {
            Source::Upstream(r) => r.url(),
            Source::Memory(m) => &m.head().url,
            Source::Ahead(a) => &a.request.url,
        }
    }

    /// The answer is a `GET` + `Range` standing in for a refused HEAD.
    pub fn head_fallback(&self) -> bool {
        matches!(self, Source::Upstream(r) if r.head_fallback())
    }

    /// The upstream was sent a HEAD (or memory holds only a HEAD's header):
    /// there is no body.
    pub fn sent_head(&self) -> bool {
        match self {
            Source::Upstream(r) => r.sent_head(),
            Source::Memory(m) => m.entry.head_only,
            Source::Ahead(_) => false,
        }
    }

    /// What was asked.
    pub fn request(&self) -> &Request {
        match self {
            Source::Upstream(r) => r.request(),
            Source::Memory(m) => &m.request,
            Source::Ahead(a) => &a.request,
        }
    }

    /// The next piece of the body (of the selected range, from memory).
    pub async fn read(&mut self) -> Result<Option<&[u8]>> {
        if let Source::Memory(m) = self {
            if m.borrow.is_some() {
                // Boxed: the rare borrow (an upstream request) must not
                // widen every read's future (memory per slow client).
                if let Some(ahead) = Box::pin(m.borrowed()).await {
                    *self = ahead;
                }
            }
        }
        match self {
            Source::Upstream(r) => r.read().await,
            Source::Memory(m) => match &mut m.reader {
                Some(reader) => reader.read().await,
                None => Ok(None),
            },
            // Boxed, as rare: its hand-over to the fill must not widen
            // every read's future (memory per slow client).
            Source::Ahead(a) => Box::pin(a.read()).await,
        }
    }

    /// The selected range of a stored body kept in a sealed file, not yet
    /// read from: the file and the range, for `sendfile`.
    pub fn sealed_range(&self) -> Option<(&BodyFile, (u64, u64))> {
        let Source::Memory(m) = self else { return None };
        let reader = m.reader.as_ref()?;
        Some((m.entry.sealed()?, reader.left()))
    }

    /// The body's first `at_least` bytes (or all of a shorter one).
    pub async fn peek(&mut self, at_least: usize) -> Result<Vec<u8>> {
        match self {
            Source::Upstream(r) => r.peek(at_least).await,
            Source::Memory(m) => {
                let end = m.head().len.min(at_least as u64);
                // Kept beside the body: no read of its file.
                if let Some(first) = m.entry.first_bytes(end) {
                    return Ok(first.to_vec());
                }
                let mut reader = m.entry.reader(0, end, m.chunk);
                let mut out = Vec::with_capacity(end as usize);
                while let Some(piece) = reader.read().await? {
                    out.extend_from_slice(piece);
                }
                Ok(out)
            }
            Source::Ahead(a) => {
                let mut first = Vec::new();
                while first.len() < at_least {
                    match a.read().await? {
                        Some(piece) => first.extend_from_slice(piece),
                        None => break,
                    }
                }
                Ok(first)
            }
        }
    }

    /// The whole body (`prefix`: bytes already read from it), at most `limit`.
    pub async fn read_to_vec(&mut self, prefix: Vec<u8>, limit: usize) -> std::result::Result<Vec<u8>, BodyError> {
        match self {
            Source::Upstream(r) => r.read_to_vec(prefix, limit).await,
            Source::Memory(m) => {
                if m.head().len > limit as u64 {
                    return Err(BodyError::TooLarge);
                }
                m.entry.whole_body(m.chunk).await.map_err(BodyError::Failed)
            }
            // Asked of a body before it is relayed, so before any hand-over.
            // (A partial answer: a playlist is fetched again whole instead.)
            Source::Ahead(a) => {
                let mut body = prefix;
                while let Some(piece) = a.read().await.map_err(BodyError::Failed)? {
                    if body.len() + piece.len() > limit {
                        return Err(BodyError::TooLarge);
                    }
                    body.extend_from_slice(piece);
                }
                Ok(body)
            }
        }
    }

    /// Body bytes read from memory after a range fetched ahead of a fill
    /// was handed over to it (what the hoster did not send for it).
    pub fn handed_over_bytes(&self) -> u64 {
        match self {
            Source::Ahead(a) => a.handed_at.map_or(0, |at| a.pos - at),
            _ => 0,
        }
    }

    /// Body bytes a range fetched ahead of a fill got from its own fetch,
    /// until it was handed over: for a seek that joined the fill and
    /// borrowed its connection, what the cache did not save.
    pub fn fetched_bytes(&self) -> u64 {
        match self {
            Source::Ahead(a) => a.handed_at.unwrap_or(a.pos) - a.start,
            _ => 0,
        }
    }

    /// Bodies continued on a new connection after the upstream's died.
    pub fn resumptions(&self) -> u32 {
        match self {
            Source::Upstream(r) => r.resumptions(),
            Source::Memory(m) if m.filling => m.entry.resumptions(),
            Source::Memory(_) => 0,
            Source::Ahead(a) => a.resumed.load(Ordering::Relaxed),
        }
    }

    /// Done with it: an upstream connection goes back to the pool.
    pub fn finish(self) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        match self {
            Source::Upstream(r) => r.finish(),
            Source::Memory(_) => Box::pin(std::future::ready(())),
            // Its fetch finished its connection itself, or lets it go now.
            Source::Ahead(_) => Box::pin(std::future::ready(())),
        }
    }
}
