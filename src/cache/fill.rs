//! A fill: the one upstream fetch that requests for the same key share. It
//! runs in a task of its own, so it belongs to the cache, not to the client
//! that started it: that client may leave and the fill goes on for the
//! others, and to be stored. Resumption mid-body happens inside the
//! upstream `Response`, so a resumed fill is still one fill.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::BytesMut;
use pingora_http::ResponseHeader;
use tokio::sync::oneshot;

use super::entry::{Entry, Head, Progress, FIRST_BYTES};
use super::policy::{self, Admission, Kind};
use super::Cache;
use crate::upstream::{BodyError, Client, FetchError, Request, Response};

/// How long a fill waits for the slot it lent once the range it lent it
/// to is done (its connection is being given back); then it waits at
/// the gate like any request.
const GIVEN_BACK: std::time::Duration = std::time::Duration::from_secs(5);

pub(super) async fn run(
    cache: Cache,
    entry: Arc<Entry>,
    client: Client,
    req: Request,
    handoff: oneshot::Sender<Response>,
) {
    // A playlist (asked for whole) that dies is fetched again whole, never
    // spliced: it is read whole before readers see it.
    let playlist = req.whole;
    let resp = match client.open(req).await {
        Ok(resp) => resp,
        Err(e) => {
            entry.finish(Progress::Failed(Some(e)));
            cache.finished(&entry, None);
            return;
        }
    };
    if crate::gate::is_refusal(resp.header()) {
        // Out of the cache before the others are told: they look again at once.
        cache.finished(&entry, None);
        entry.finish(Progress::Refused);
        // The request that asked relays it as it would without a cache.
        let _ = handoff.send(resp);
        return;
    }
    let admission = policy::admit(resp.header(), cache.settings().max_object_bytes);
    if playlist && admission == Admission::Decline && policy::unsized_whole(resp.header()) {
        drop(handoff);
        return unsized_playlist(cache, entry, resp).await;
    }
    match start(&cache, &entry, &resp, admission) {
        Some(started) => {
            drop(handoff);
            body(cache, entry, resp, started, playlist).await;
        }
        None => {
            // The request that asked relays it as it would without a cache.
            let _ = handoff.send(resp);
        }
    }
}

/// A playlist sent without a length (chunked, or until the connection
/// closes): read whole first — bounded by `stream.max_playlist_bytes`, as
/// the relay reads one — then handed to the requests that came meanwhile,
/// each rewriting it for itself. Never stored: its length was not declared.
/// Too long, or failed: every one of them gets the failure the relay would
/// have answered with.
async fn unsized_playlist(cache: Cache, entry: Arc<Entry>, mut resp: Response) {
    let max = cache.settings().max_playlist;
    let read = resp.read_to_vec(Vec::new(), max).await;
    entry.resumed(resp.resumptions());
    let body = match read {
        Ok(body) => body,
        Err(e) => {
            // Each request that shared it logs the failure it is answered with.
            let e = match e {
                BodyError::TooLarge => FetchError::PlaylistTooLarge(max),
                BodyError::Failed(e) => FetchError::from_pingora(e).at(resp.url()),
            };
            entry.finish(Progress::Failed(Some(e)));
            cache.finished(&entry, None);
            return;
        }
    };
    // Not reserved from `cache.max_bytes`: it is never stored, and is held
    // no longer than its readers take, bounded as one relay's would be.
    let len = body.len() as u64;
    let mut upstream = resp.header().clone();
    upstream.remove_header(&http::header::TRANSFER_ENCODING);
    let _ = upstream.insert_header(http::header::CONTENT_LENGTH, len);
    entry.set_head(Head::new(&upstream, resp.url().clone(), upstream.status.as_u16(), len, true));
    if entry.append_whole(&body, cache.settings().chunk).is_err() {
        entry.finish(Progress::Failed(None));
        cache.finished(&entry, None);
        return;
    }
    entry.finish(Progress::Done);
    cache.finished(&entry, None);
    resp.finish().await;
}

/// What a fill that has its header goes on with.
pub(super) struct Started {
    /// Body length.
    len: u64,
    /// The upstream's own header (freshness is judged on it).
    upstream: ResponseHeader,
}

/// Takes the upstream's answer into `entry` as `admission` says (its
/// header set, its length reserved), or declines it: not shared, or no
/// room — then the entry is done with and the others go upstream
/// themselves.
pub(super) fn start(cache: &Cache, entry: &Arc<Entry>, resp: &Response, admission: Admission) -> Option<Started> {
    if let Admission::Fill { len, whole } = admission {
        let upstream = if whole { policy::as_whole(resp.header().clone()) } else { resp.header().clone() };
        let status = resp.header().status.as_u16();
        let head = Head::new(&upstream, resp.url().clone(), status, len, whole);
        if cache.reserve(entry, len + head.cost(&entry.key)) {
            entry.set_head(head);
            return Some(Started { len, upstream });
        }
    }
    entry.finish(Progress::Declined);
    cache.finished(entry, None);
    None
}

/// Reads the body into `entry` for its readers, then stores it for its
/// freshness; a body that dies for good aborts the readers still waiting
/// and stores nothing.
pub(super) async fn body(cache: Cache, entry: Arc<Entry>, mut resp: Response, started: Started, playlist: bool) {
    let Started { len, upstream } = started;
    let settings = *cache.settings();
    let mut block = BytesMut::new();
    // Why the body ended short, when the upstream's read said.
    let mut failure = None;
    let complete = if playlist {
        let read = resp.read_to_vec(Vec::new(), len as usize).await;
        entry.resumed(resp.resumptions());
        match read {
            Ok(body) if body.len() as u64 == len => entry.append_whole(&body, settings.chunk).is_ok(),
            Err(BodyError::Failed(e)) => {
                failure = Some(e);
                false
            }
            Ok(_) | Err(_) => false,
        }
    } else {
        entry.set_lendable(resp.resumable());
        // Lent its slot, and not reading again yet.
        let mut away = false;
        let complete = loop {
            if resp.broken() {
                // Mended before the read a lend may cancel: a continuation
                // holds the body's slot, which a cancelled one would give
                // to whoever waits in line at the host.
                entry.set_holding(false);
                if let Err(e) = resp.mend().await {
                    failure = Some(e);
                    break false;
                }
            }
            entry.set_holding(resp.holds_slot());
            let read = tokio::select! {
                biased;
                () = entry.lend_asked() => None,
                read = resp.read_counted() => Some(read),
            };
            if read.is_some() && away {
                // Reading again (or failed for good) after a lend: with its
                // slot back, it no longer keeps other ranges from going ahead.
                entry.back();
                away = false;
            }
            match read {
                Some(Ok((Some(piece), resumed))) => {
                    // Told before the bytes past a seam reach a reader.
                    entry.resumed(resumed);
                    if entry.append(&mut block, piece).is_err() {
                        break false;
                    }
                }
                Some(Ok((None, _))) => break entry.written() == len,
                Some(Err(e)) => {
                    failure = Some(e);
                    break false;
                }
                None => {
                    // Lent (`Entry::lend`): the connection goes, its slot
                    // to the range, and the body continues from here on
                    // that slot once the range is done with it (or, lent to
                    // a seek, once a reader waits: `Entry::away`).
                    entry.set_holding(false);
                    let slot = resp.let_go().await;
                    let lending = match entry.lending() {
                        Some(lent) => Some(lent.offer(slot)),
                        None => {
                            drop(slot);
                            None
                        }
                    };
                    entry.away().await;
                    if let Some(lending) = lending {
                        if let Some(slot) = lending.take_back(GIVEN_BACK).await {
                            resp.hold(slot);
                        }
                    }
                    away = true;
                }
            }
        };
        entry.set_lendable(false);
        entry.set_holding(false);
        entry.back();
        complete
    };
    if !complete {
        let host = resp.url().host_str().unwrap_or("-");
        if failure.as_deref().is_some_and(crate::upstream::is_logged_body_failure) {
            // The upstream's WARN said why; this says what it cost.
            log::info!("cache fill from {host} failed mid-body: nothing stored, its readers aborted");
        } else {
            log::warn!("cache fill from {host} failed mid-body: nothing stored, its readers aborted");
        }
        // Readers still waiting are aborted, as a relay would be; nothing is stored.
        entry.finish(Progress::Failed(None));
        cache.finished(&entry, None);
        return;
    }
    resp.finish().await;
    let head = entry.head().expect("a fill that wrote a body has its header");
    let life = head.whole.then(|| {
        // The first bytes tell media from a playlist; a playlist's whole
        // body (small: at most max_object_bytes) tells live from VOD.
        // (Judged on the upstream's header: the stored one lacks what the
        // header policy drops, `Set-Cookie` among them.)
        let first = entry.first_bytes(len.min(FIRST_BYTES as u64)).unwrap_or_default();
        let kind = match Kind::of(&upstream, head.url.path(), first) {
            Kind::Media => Kind::Media,
            _ => Kind::of(&upstream, head.url.path(), &entry.bytes(len as usize)),
        };
        policy::lifetime(&upstream, kind, SystemTime::now(), &settings.lifetimes)
    });
    entry.finish(Progress::Done);
    cache.finished(&entry, life.flatten());
}
