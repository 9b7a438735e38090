//! A fill: the one upstream fetch that requests for the same key share. It
//! runs in a task of its own, so it belongs to the cache, not to the client
//! that started it: that client may leave and the fill goes on for the
//! others, and to be stored. Resumption mid-body happens inside the
//! upstream `Response`, so a resumed fill is still one fill.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::BytesMut;
use tokio::sync::oneshot;

use super::entry::{Entry, Head, Progress};
use super::policy::{self, Admission, Kind};
use super::{age_of, Cache};
use crate::upstream::{Client, Request, Response};

pub(super) async fn run(
    cache: Cache,
    entry: Arc<Entry>,
    client: Client,
    req: Request,
    handoff: oneshot::Sender<Response>,
) {
    let settings = *cache.settings();
    // A playlist (asked for whole) that dies is fetched again whole, never
    // spliced: it is read whole before readers see it.
    let playlist = req.whole;
    let mut resp = match client.open(req).await {
        Ok(resp) => resp,
        Err(e) => {
            entry.finish(Progress::Failed(Some(e)));
            cache.finished(&entry, 0, None);
            return;
        }
    };
    let (len, upstream) = match policy::admit(resp.header(), settings.max_object_bytes) {
        Admission::Fill { len, whole } if cache.reserve(len) => {
            let upstream = if whole { policy::as_whole(resp.header().clone()) } else { resp.header().clone() };
            let initial_age = age_of(&upstream);
            let url = resp.url().clone();
            let header = crate::headers::relayed(&upstream);
            entry.set_head(Head { header, url, len, whole, received: Instant::now(), initial_age });
            (len, upstream)
        }
        _ => {
            // Not shared (or no room): the request that asked relays it as
            // it would without a cache; the others go upstream themselves.
            entry.finish(Progress::Declined);
            cache.finished(&entry, 0, None);
            let _ = handoff.send(resp);
            return;
        }
    };
    drop(handoff);
    let mut block = BytesMut::new();
    let complete = if playlist {
        match resp.read_to_vec(Vec::new(), len as usize).await {
            Ok(body) if body.len() as u64 == len => {
                for piece in body.chunks(settings.chunk) {
                    entry.append(&mut block, piece);
                }
                true
            }
            Ok(_) | Err(_) => false,
        }
    } else {
        loop {
            match resp.read().await {
                Ok(Some(piece)) => entry.append(&mut block, piece),
                Ok(None) => break entry.written() == len,
                Err(_) => break false,
            }
        }
    };
    if !complete {
        log::warn!("cache fill from {} failed mid-body", resp.url().host_str().unwrap_or("-"));
    }
    if !complete {
        // Readers still waiting are aborted, as a relay would be; nothing is stored.
        entry.finish(Progress::Failed(None));
        cache.finished(&entry, len, None);
        return;
    }
    resp.finish().await;
    let head = entry.head().expect("a fill that wrote a body has its header");
    let life = head.whole.then(|| {
        // The first bytes tell media from a playlist; a playlist's whole
        // body (small: at most max_object_bytes) tells live from VOD.
        // (Judged on the upstream's header: the stored one lacks what the
        // header policy drops, `Set-Cookie` among them.)
        let kind = match Kind::of(&upstream, head.url.path(), &entry.bytes(16)) {
            Kind::Media => Kind::Media,
            _ => Kind::of(&upstream, head.url.path(), &entry.bytes(len as usize)),
        };
        policy::lifetime(&upstream, kind, SystemTime::now(), &settings.lifetimes)
    });
    entry.finish(Progress::Done);
    cache.finished(&entry, len, life.flatten());
}
