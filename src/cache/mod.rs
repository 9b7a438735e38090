//! Many viewers, one hoster fetch: a bounded, shared, in-memory cache with
//! coalescing.
//!
//! Requests that map to the same upstream fetch (the same [`Key`]) while it
//! is in flight share it: the first starts a fill ([`fill`]), owned by the
//! cache so that it goes on when that client leaves; everyone, the first
//! included, reads the body from memory as it arrives ([`entry`]). What is
//! stored and for how long is [`policy`]; answering ranges and conditionals
//! from memory is [`answer`]. Concurrent HEADs of an object memory does
//! not hold send one HEAD upstream: the others wait for its answer and are
//! answered with it, kept for later HEADs when it is a whole object's
//! header ([`HeadLead`]).
//!
//! Memory: the objects the cache holds stay within `cache.max_bytes` —
//! stored, being filled, and those still being read after they left the
//! store (evicted, expired or replaced while a slow client reads them: their
//! bytes are in memory until it is done), each its body and what keeping it
//! costs besides ([`entry::Head::cost`]). A fill reserves both when it
//! starts, and the reservation is given back when its entry is dropped
//! ([`entry::Charge`]). To make room it evicts the least recently used
//! stored objects that nobody is reading (evicting one that is read would
//! free nothing); one that cannot get room is not stored (its client is
//! served as without a cache, nobody waits). The LRU is the `lru`
//! crate under one mutex, chosen over moka (which the project uses for the
//! resolver and DNS caches) because the budget must cover fills that are
//! not in the store yet and evict at the moment a fill reserves: moka's
//! capacity is fixed when built and its weighted size catches up only when
//! its pending tasks run.

mod answer;
mod entry;
mod fill;
mod lease;
mod pace;
pub mod policy;
mod sealed;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use lru::LruCache;
use pingora_http::ResponseHeader;
use prometheus::IntGauge;
use tokio::sync::{oneshot, watch};
use url::Url;

pub use answer::{answerable_range, plan, shape, Plan};
use entry::Charge;
pub use entry::{is_fill_failure, AheadSlot, Entry, Head, Reader, Ready, LOOK_AGAIN};
pub use lease::Lease;
use policy::Lifetimes;
pub use sealed::BodyFile;

use crate::headers::WireHeader;
use crate::metrics::Metrics;
use crate::upstream::{Client, Request, Response};

/// What identifies one upstream fetch: the upstream URL and the headers the
/// proxy adds to it (provider profile, resolver) — never the client's
/// credentials, `Range` or `User-Agent`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key(Arc<str>);

impl Key {
    pub fn new<'a>(url: &Url, added: impl IntoIterator<Item = &'a WireHeader>) -> Key {
        // Without the fragment: it never goes upstream, so it names no other fetch.
        let fetched = &url[..url::Position::AfterQuery];
        let mut k = String::with_capacity(fetched.len() + 64);
        k.push_str(fetched);
        for h in added {
            k.push('\n');
            k.push_str(h.name.as_str());
            k.push(':');
            k.push_str(&String::from_utf8_lossy(h.value.as_bytes()));
        }
        Key(k.into())
    }
}

impl From<&str> for Key {
    fn from(s: &str) -> Key {
        Key(s.into())
    }
}

/// The `cache:` settings.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub max_bytes: u64,
    pub max_object_bytes: u64,
    pub lifetimes: Lifetimes,
    /// `stream.chunk_size`: the most a reader hands to one client write.
    pub chunk: usize,
    /// `stream.max_playlist_bytes`: the most a fill reads of a playlist
    /// sent without a length.
    pub max_playlist: usize,
}

/// What a request may do with the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// A GET the whole object answers (no `Range`, or `bytes=0-`; no
    /// conditionals): it may start a fill.
    Fill,
    /// A GET that memory can answer but that must not start a fill (a
    /// partial range, conditionals): it joins a fill or reads a stored
    /// object, else goes upstream alone.
    Join,
    /// A HEAD: answered from any stored header (a HEAD's own too) or a
    /// fill's, else upstream (and its answer kept) — the first of
    /// concurrent HEADs only; the others wait for its answer.
    Head,
    /// A HEAD that waited for another's answer, which was not to be shared
    /// (`no-store`, or an answer only to that request's own range or
    /// conditionals: `304`, `416`), and looks again: from memory, else
    /// upstream alone (not waited for twice, so a crowd never queues
    /// behind one another).
    HeadAgain,
}

/// What the cache has for a request.
pub enum Found {
    /// A fresh stored object.
    Hit(Arc<Entry>),
    /// A fill in flight.
    Coalesced(Arc<Entry>),
    /// A fill this request started; if the upstream's answer is not shared,
    /// it comes back through the receiver for this request alone.
    Led(Arc<Entry>, oneshot::Receiver<Response>),
    /// Another HEAD of the object is upstream: wait for it. `changed()`
    /// is `Ok` when it was answered: with the answer to share, or `None`
    /// (look again with `HeadAgain`); `Err` when it was given up
    /// unanswered, its client gone (look again as a `Head`: one of the
    /// waiters asks instead) — or answered just before (the value holds it).
    HeadWait(watch::Receiver<Option<Arc<Entry>>>),
    /// Nothing: go upstream. A `HeadLead` (for a `Head`) is held until the
    /// answer is in; dropping it wakes the HEADs waiting for it.
    Miss(Option<HeadLead>),
}

/// The first of concurrent HEADs of one object while it asks upstream.
pub struct HeadLead {
    cache: Cache,
    key: Key,
}

impl HeadLead {
    /// The upstream answered: the waiters are answered with `shared`
    /// ([`Cache::head_answered`]), or with `None` look again.
    pub fn answered(&self, shared: Option<Arc<Entry>>) {
        if let Some(asking) = self.cache.lock().heads.get(&self.key) {
            asking.send_replace(shared);
        }
    }
}

impl Drop for HeadLead {
    fn drop(&mut self) {
        // Removing the sender wakes every waiter: after `answered`, or
        // unanswered when the client left and the request was dropped.
        self.cache.lock().heads.remove(&self.key);
    }
}

/// The cache: a cheap handle (the fill task holds one).
#[derive(Clone)]
pub struct Cache(Arc<Inner>);

struct Inner {
    settings: Settings,
    store: Mutex<Store>,
    metrics: Arc<Metrics>,
    /// Bytes reserved and not given back: what `max_bytes` bounds (the
    /// `anibridge_cache_bytes` gauge itself, so it is never stale).
    held: IntGauge,
}

struct Store {
    lru: LruCache<Key, Stored>,
    /// Fills in flight (not stored yet), by key.
    filling: HashMap<Key, Arc<Entry>>,
    /// HEADs upstream, by key: their waiters subscribe to the answer.
    heads: HashMap<Key, watch::Sender<Option<Arc<Entry>>>>,
}

struct Stored {
    entry: Arc<Entry>,
    fresh_until: Instant,
    /// The bytes its charge holds.
    weight: u64,
}

impl Cache {
    /// The cache, or `None` when `max_bytes` is 0 (no storing, no coalescing).
    pub fn new(settings: Settings, metrics: Arc<Metrics>) -> Option<Cache> {
        (settings.max_bytes > 0).then(|| {
            let store = Store { lru: LruCache::unbounded(), filling: HashMap::new(), heads: HashMap::new() };
            let held = metrics.cache_bytes.clone();
            Cache(Arc::new(Inner { settings, store: Mutex::new(store), metrics, held }))
        })
    }

    pub fn settings(&self) -> &Settings {
        &self.0.settings
    }

    /// What the cache has for `key`. A `Fill` request that finds nothing
    /// starts a fill of `req()` on `client` (in a task of its own); the
    /// request is only made then.
    pub fn find(&self, key: Key, want: Want, client: &Client, req: impl FnOnce() -> Request) -> Found {
        let mut store = self.lock();
        if let Some(s) = store.lru.get(&key) {
            let usable = matches!(want, Want::Head | Want::HeadAgain) || !s.entry.head_only;
            if Instant::now() < s.fresh_until && usable {
                return Found::Hit(s.entry.clone());
            }
            if Instant::now() >= s.fresh_until {
                // Its bytes stay charged until a reader still on it is done.
                store.lru.pop(&key);
            }
        }
        if let Some(entry) = store.filling.get(&key) {
            return Found::Coalesced(entry.clone());
        }
        if want == Want::Head {
            if let Some(asking) = store.heads.get(&key) {
                return Found::HeadWait(asking.subscribe());
            }
            store.heads.insert(key.clone(), watch::channel(None).0);
            return Found::Miss(Some(HeadLead { cache: self.clone(), key }));
        }
        if want != Want::Fill {
            return Found::Miss(None);
        }
        let entry = Entry::pending(key.clone());
        store.filling.insert(key, entry.clone());
        drop(store);
        let (handoff, rx) = oneshot::channel();
        tokio::spawn(fill::run(self.clone(), entry.clone(), client.clone(), req(), handoff));
        Found::Led(entry, rx)
    }

    /// A request that went upstream alone (a range memory could not
    /// answer, a conditional) and was answered the whole object anyway (the
    /// upstream ignored the range, or the range covered it all): the rest of
    /// its fetch becomes a fill like any other, so the object is stored and
    /// requests meanwhile share it. The entry to read it from, or the
    /// response back when it is not a whole object to keep, does not fit,
    /// or another fill of the object is in flight. With the entry: the
    /// request that was sent and the upstream's status.
    // The response goes back as it came (no box: this is every ranged miss).
    #[allow(clippy::result_large_err)]
    pub fn adopt(&self, key: Key, resp: Response) -> Result<(Arc<Entry>, Request, http::StatusCode), Response> {
        let admission = policy::admit(resp.header(), self.0.settings.max_object_bytes);
        if !matches!(admission, policy::Admission::Fill { whole: true, .. }) {
            return Err(resp);
        }
        let entry = Entry::pending(key.clone());
        {
            let mut store = self.lock();
            if store.filling.contains_key(&key) {
                return Err(resp);
            }
            store.filling.insert(key, entry.clone());
        }
        match fill::start(self, &entry, &resp, admission) {
            Some(started) => {
                let (request, status) = (resp.request().clone(), resp.header().status);
                tokio::spawn(fill::body(self.clone(), entry.clone(), resp, started, false));
                Ok((entry, request, status))
            }
            None => Err(resp),
        }
    }

    /// What a HEAD was answered (`up`, perhaps by the GET that stands in
    /// for a refused HEAD), as the HEADs that waited for it are answered
    /// ([`policy::shared_head`]): a whole object's header is also kept for
    /// its freshness, so later HEADs never reach the upstream; another
    /// answer the same for every request is only shared. `None`: not shared.
    pub fn head_answered(&self, key: Key, up: &ResponseHeader, url: Url) -> Option<Arc<Entry>> {
        let (kept, whole) = policy::shared_head(up)?;
        let len = crate::headers::content_length(&kept.headers).unwrap_or(0);
        let head = Head::new(&kept, url, up.status.as_u16(), len, whole);
        let entry = Entry::header_only(key, head);
        if whole {
            self.keep_head(entry.clone(), &kept);
        }
        Some(entry)
    }

    /// Stores a HEAD's answer, `entry` (`up`: its upstream header), for
    /// its freshness.
    fn keep_head(&self, entry: Arc<Entry>, up: &ResponseHeader) {
        let now = SystemTime::now();
        let Some(life) = policy::lifetime(up, policy::Kind::Media, now, &self.0.settings.lifetimes) else {
            return;
        };
        let weight = entry.weight();
        let mut store = self.lock();
        if store.lru.peek(&entry.key).is_some_and(|s| !s.entry.head_only) || !self.charge(&mut store, &entry, weight) {
            // A whole object is there already (it answers HEADs too), or no room.
            return;
        }
        store.insert(entry, life, weight);
        self.gauges(&store);
    }

    fn max(&self) -> u64 {
        self.0.settings.max_bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.0.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reserves `len` bytes for a fill (its body and [`Head::cost`]),
    /// evicting stored objects as needed; false when there is no room.
    fn reserve(&self, entry: &Entry, len: u64) -> bool {
        let mut store = self.lock();
        let ok = self.charge(&mut store, entry, len);
        self.gauges(&store);
        ok
    }

    /// Charges `entry` with `len` bytes of the budget, given back when it
    /// is dropped, after making room for them.
    fn charge(&self, store: &mut Store, entry: &Entry, len: u64) -> bool {
        // Under the store's lock, so two charges never share the last room;
        // bytes given back meanwhile only leave more.
        if !store.make_room(len, self.max(), &self.0.held) {
            return false;
        }
        self.0.held.add(len as i64);
        entry.charge(Charge::new(len, self.0.held.clone()));
        true
    }

    /// A fill ended: stored for `life`, or (`None`) only forgotten. What
    /// it was charged with stays charged while it is stored or read.
    fn finished(&self, entry: &Arc<Entry>, life: Option<Duration>) {
        let mut store = self.lock();
        if store.filling.get(&entry.key).is_some_and(|e| Arc::ptr_eq(e, entry)) {
            store.filling.remove(&entry.key);
        }
        if let Some(life) = life {
            store.insert(entry.clone(), life, entry.charged());
        }
        self.gauges(&store);
    }

    fn gauges(&self, store: &Store) {
        let m = &self.0.metrics;
        m.cache_objects.set(store.lru.len() as i64);
    }
}

impl Store {
    /// Makes room for `len` more bytes within `max`, `held` being held
    /// now: evicts the least recently used stored objects that nobody is
    /// reading (dropping one gives its bytes back at once). False, and
    /// nothing evicted, when that would not make room: the rest is being
    /// filled or read.
    fn make_room(&mut self, len: u64, max: u64, held: &IntGauge) -> bool {
        let over = (held.get().max(0) as u64 + len).saturating_sub(max);
        if over == 0 {
            return true;
        }
        let mut freed = 0;
        let mut idle = Vec::new();
        // Only the store holds an idle entry, and only under this lock can
        // anyone take a new hold of it: its count cannot rise meanwhile.
        for (key, s) in self.lru.iter().rev().filter(|(_, s)| Arc::strong_count(&s.entry) == 1) {
            idle.push(key.clone());
            freed += s.weight;
            if freed >= over {
                for key in &idle {
                    self.lru.pop(key);
                }
                return true;
            }
        }
        false
    }

    fn insert(&mut self, entry: Arc<Entry>, life: Duration, weight: u64) {
        let key = entry.key.clone();
        // One replaced is given back when its last reader is done.
        self.lru.push(key, Stored { entry, fresh_until: Instant::now() + life, weight });
    }
}

/// The upstream's `Age`, in seconds.
fn age_of(h: &ResponseHeader) -> u64 {
    h.headers.get(http::header::AGE).and_then(|v| crate::headers::digits(v.to_str().ok()?)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_what_goes_upstream() {
        let key = |u: &str| Key::new(&Url::parse(u).unwrap(), []);
        assert_eq!(key("http://h.example/a.mp4?t=1#t=10"), key("http://h.example/a.mp4?t=1"));
        assert_ne!(key("http://h.example/a.mp4?t=1"), key("http://h.example/a.mp4?t=2"));
        let referer = crate::headers::parse_pairs([("Referer", "https://x/")]).unwrap();
        assert_ne!(Key::new(&Url::parse("http://h.example/a").unwrap(), &referer), key("http://h.example/a"));
    }
}
