//! Where an answer's bytes come from: the upstream (a `Response` that owns
//! its connection, resuming a body that dies) or memory (a cache entry,
//! stored or still filling). The decision, the pump and the playlist path
//! read both alike, so backpressure, resumption and aborts stay where they
//! are.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use pingora_error::Result;
use pingora_http::ResponseHeader;
use url::Url;

use crate::cache::{AheadSlot, BodyFile, Entry, Head, Reader};
use crate::upstream::resume::Window;
use crate::upstream::{BodyError, Request, Response};

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
pub(super) struct Ahead {
    /// The upstream answer and the slot that let it go upstream alone;
    /// `None` once handed over to the fill.
    up: Option<(Response, AheadSlot)>,
    /// The upstream's header and what was asked (kept past the hand-over).
    header: ResponseHeader,
    request: Request,
    resumed: u32,
    /// The fill to hand over to: `None` when the upstream's answer is not
    /// of the same file (it is then read to its end, as a relay).
    entry: Option<Arc<Entry>>,
    /// The next byte of the object the client needs, and the end of its range.
    pos: u64,
    end: u64,
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
        Source::Ahead(Box::new(Ahead {
            header: up.header().clone(),
            request: up.request().clone(),
            up: Some((up, slot)),
            resumed: 0,
            entry: same.map(|_| entry),
            pos,
            end,
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
        if let (Some(entry), Some(_)) = (&self.entry, &self.up) {
            // (At the range's end the upstream's answer is done: it is finished, not cut.)
            if self.pos < self.end && entry.holds(self.pos) {
                // The fill caught up: the upstream connection goes (closed,
                // its gate slot given back, and the object's slot), the rest
                // is read from memory.
                let (up, _slot) = self.up.take().expect("checked above");
                self.resumed = up.resumptions();
                drop(up);
                log::debug!("a range fetched ahead of a cache fill continues from the fill at byte {}", self.pos);
                self.reader = Some(entry.reader(self.pos, self.end, self.chunk));
                self.handed_at = Some(self.pos);
                self.tail = None;
            }
        }
        let Ahead { up, reader, pos, end, entry, tail, .. } = self;
        let piece = match (up, reader) {
            (Some((up, _)), _) => {
                let piece = up.read().await?;
                if let Some(p) = piece {
                    Ahead::came(entry.as_ref(), tail, *pos, *end, p);
                }
                piece
            }
            (None, Some(reader)) => reader.read().await?,
            (None, None) => None,
        };
        if let Some(p) = &piece {
            *pos += p.len() as u64;
        }
        Ok(piece)
    }
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
}

impl Memory {
    /// `entry` must have its header (`Entry::ready` said so).
    pub fn new(entry: Arc<Entry>, request: Request, chunk: usize) -> Memory {
        debug_assert!(entry.head().is_some());
        let filling = !entry.is_done();
        Memory { entry, request, reader: None, chunk, as_fetched: false, filling }
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
        match self {
            Source::Upstream(r) => r.read().await,
            Source::Memory(m) => match &mut m.reader {
                Some(reader) => reader.read().await,
                None => Ok(None),
            },
            Source::Ahead(a) => a.read().await,
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
                let Some((up, _)) = &mut a.up else { return Ok(Vec::new()) };
                let first = up.peek(at_least).await?;
                Ahead::came(a.entry.as_ref(), &mut a.tail, a.pos, a.end, &first);
                a.pos += first.len() as u64;
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
            Source::Ahead(a) => match &mut a.up {
                Some((up, _)) => up.read_to_vec(prefix, limit).await,
                None => Err(BodyError::Failed(pingora_error::Error::explain(
                    pingora_error::ErrorType::InternalError,
                    "a range handed over to a cache fill is read as it is relayed",
                ))),
            },
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

    /// Bodies continued on a new connection after the upstream's died.
    pub fn resumptions(&self) -> u32 {
        match self {
            Source::Upstream(r) => r.resumptions(),
            Source::Memory(m) if m.filling => m.entry.resumptions(),
            Source::Memory(_) => 0,
            Source::Ahead(a) => a.up.as_ref().map_or(a.resumed, |(up, _)| up.resumptions()),
        }
    }

    /// Done with it: an upstream connection goes back to the pool.
    pub fn finish(self) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        match self {
            Source::Upstream(r) => r.finish(),
            Source::Memory(_) => Box::pin(std::future::ready(())),
            // The object's slot goes with it: the fetch beside the fill is over.
            Source::Ahead(a) => match a.up {
                Some((up, _slot)) => up.finish(),
                None => Box::pin(std::future::ready(())),
            },
        }
    }
}
