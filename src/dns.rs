//! Host name lookups with a short-lived, bounded cache.
//!
//! The egress check needs the address before the connection pool is asked
//! (pooled connections are keyed by it), so every upstream request resolves
//! its host. Without a cache that is one `getaddrinfo` on tokio's blocking
//! pool per request — per HLS segment — even when a pooled connection to the
//! host is waiting. Entries live [`TTL`] (getaddrinfo reports no record TTL,
//! so the time is fixed: short enough to follow a CDN's changes, long enough
//! to spare all but one lookup of a playlist's segments); failures are never
//! cached. Concurrent requests for a name not held share one lookup: a crowd
//! arriving for a new hoster (an episode's release) asks the DNS server
//! once, not once per viewer, and holds one blocking thread, not dozens.
//! The egress policy is still applied to the cached addresses on every
//! request, so caching cannot widen what is reachable. Entries are by name
//! alone (a lookup's addresses do not depend on the port), so a lookup from
//! the cache allocates nothing: it runs on every request, hits included.

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

/// How long a lookup result is reused.
pub const TTL: Duration = Duration::from_secs(30);
/// Most host names kept; hosters are many, memory is bounded.
pub const CAPACITY: u64 = 4096;

type Addrs = Arc<[IpAddr]>;

/// A resolver with a cache (moka: bounded, expiring, one init per key) in
/// front of tokio's `lookup_host`.
pub struct Dns {
    cache: moka::future::Cache<Box<str>, Addrs>,
}

impl Default for Dns {
    fn default() -> Self {
        Dns::new(TTL, CAPACITY)
    }
}

impl Dns {
    /// `capacity` bounds the number of host names kept.
    pub fn new(ttl: Duration, capacity: u64) -> Dns {
        Dns { cache: moka::future::Cache::builder().max_capacity(capacity).time_to_live(ttl).build() }
    }

    /// The addresses of `name`, from the cache while fresh; a lookup
    /// without an answer `within` that time fails with `TimedOut`.
    pub async fn lookup(&self, name: &str, within: Duration) -> std::io::Result<Addrs> {
        let system = || async move { Ok(tokio::net::lookup_host((name, 0)).await?.map(|a| a.ip()).collect()) };
        self.lookup_with(name, within, system).await
    }

    /// `lookup` with the system lookup given as `look` (tests count it).
    /// Callers waiting on one lookup all get its answer or its error; each
    /// gives up at its own `within`. If the caller running the lookup gives
    /// up (its timeout, or its client left), a waiting one starts it again.
    async fn lookup_with<F, L>(&self, name: &str, within: Duration, look: L) -> std::io::Result<Addrs>
    where
        L: FnOnce() -> F,
        F: Future<Output = std::io::Result<Addrs>>,
    {
        if let Some(hit) = self.cache.get(name).await {
            return Ok(hit);
        }
        // Rare, and moka's shared init is a large future: boxed, so every
        // request's future (memory per slow client) does not carry it.
        let shared = Box::pin(self.cache.try_get_with(Box::from(name), async {
            let addrs = look().await?;
            match addrs.is_empty() {
                true => Err(std::io::Error::new(std::io::ErrorKind::NotFound, "no addresses")),
                false => Ok(addrs),
            }
        }));
        // A shared error is one `Arc` for all its waiters: each gets a copy.
        bounded(within, async { shared.await.map_err(|e| std::io::Error::new(e.kind(), e.to_string())) }).await
    }

    /// Host names held now (after pending evictions ran).
    pub async fn len(&self) -> u64 {
        self.cache.run_pending_tasks().await;
        self.cache.entry_count()
    }

    pub async fn is_empty(&self) -> bool {
        self.len().await == 0
    }
}

/// `lookup`, given up after `within`. `getaddrinfo` keeps its own, much
/// longer, timeouts (resolv.conf's 5 s per try and server, and more for
/// each further server): a DNS server that stops answering would hold a
/// request far past `upstream.connect_timeout`. The blocking lookup itself
/// cannot be cancelled; it ends on its own and is dropped.
async fn bounded<T>(within: Duration, lookup: impl Future<Output = std::io::Result<T>>) -> std::io::Result<T> {
    match tokio::time::timeout(within, lookup).await {
        Ok(result) => result,
        Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in time")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const T: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn a_lookup_without_an_answer_times_out() {
        let started = std::time::Instant::now();
        let never = std::future::pending::<std::io::Result<()>>();
        let e = bounded(Duration::from_millis(100), never).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(bounded(T, async { Ok(7) }).await.unwrap(), 7);
    }

    #[tokio::test]
    async fn fresh_entries_are_reused_and_expire() {
        // Only names from /etc/hosts: tests never query a DNS server.
        let dns = Dns::new(Duration::from_millis(200), 8);
        let first = dns.lookup("localhost", T).await.unwrap();
        assert!(first.iter().all(|a| a.is_loopback()));
        let again = dns.lookup("localhost", T).await.unwrap();
        assert!(Arc::ptr_eq(&first, &again), "a fresh entry is served from the cache");
        let other = dns.lookup("127.0.0.1", T).await.unwrap();
        assert_eq!(&other[..], &[IpAddr::from([127, 0, 0, 1])]);
        assert!(Arc::ptr_eq(&first, &dns.lookup("localhost", T).await.unwrap()));
        assert_eq!(dns.len().await, 2);
        tokio::time::sleep(Duration::from_millis(250)).await;
        let later = dns.lookup("localhost", T).await.unwrap();
        assert!(!Arc::ptr_eq(&first, &later), "an expired entry is looked up again");
    }

    #[tokio::test]
    async fn the_cache_is_bounded_and_failures_are_not_kept() {
        let dns = Dns::new(Duration::from_secs(60), 2);
        for name in ["localhost", "127.0.0.1", "::1", "localhost"] {
            dns.lookup(name, T).await.unwrap();
            assert!(dns.len().await <= 2, "{name}");
        }
        // A name that cannot be looked up (fails before any query) is not kept.
        let before = dns.len().await;
        assert!(dns.lookup("bad\0name", T).await.is_err());
        assert_eq!(dns.len().await, before);
    }

    type Calls = Arc<AtomicUsize>;
    type Look = std::pin::Pin<Box<dyn Future<Output = std::io::Result<Addrs>> + Send>>;

    fn counted(calls: &Calls, wait: Duration) -> impl FnOnce() -> Look {
        let calls = calls.clone();
        move || {
            Box::pin(async move {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(wait).await;
                Ok(Arc::from([IpAddr::from([127, 0, 0, 1])]))
            })
        }
    }

    /// `n` concurrent lookups of `name`, each running `look()` if it leads.
    async fn crowd<L, F>(dns: &Arc<Dns>, name: &'static str, n: usize, look: L) -> Vec<std::io::Result<Addrs>>
    where
        L: Fn() -> F,
        F: FnOnce() -> Look + Send + 'static,
    {
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let (dns, look) = (dns.clone(), look());
                tokio::spawn(async move { dns.lookup_with(name, T, look).await })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_lookups_of_one_name_share_one() {
        let dns = Arc::new(Dns::default());
        let calls = Calls::default();
        let answers = crowd(&dns, "hoster.example", 32, || counted(&calls, Duration::from_millis(100))).await;
        assert_eq!(calls.load(Ordering::SeqCst), 1, "one system lookup for the crowd");
        let first = answers[0].as_ref().unwrap();
        assert!(answers.iter().all(|a| Arc::ptr_eq(a.as_ref().unwrap(), first)));
        // Another name is its own lookup.
        dns.lookup_with("cdn.example", T, counted(&calls, Duration::ZERO)).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_shared_failure_reaches_every_waiter_and_is_not_kept() {
        let dns = Arc::new(Dns::default());
        let calls = Calls::default();
        let failing = || {
            let calls = calls.clone();
            move || -> Look {
                Box::pin(async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Err(std::io::Error::other("no such host"))
                })
            }
        };
        for answer in crowd(&dns, "gone.example", 8, failing).await {
            assert_eq!(answer.unwrap_err().to_string(), "no such host");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // An empty answer is a failure too (nothing to dial).
        let empty = dns.lookup_with("empty.example", T, || async { Ok(Arc::from([])) }).await;
        assert_eq!(empty.unwrap_err().kind(), std::io::ErrorKind::NotFound);
        // Nothing was kept: the next request asks again.
        dns.lookup_with("gone.example", T, counted(&calls, Duration::ZERO)).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn waiters_keep_their_own_deadline_and_take_over_an_abandoned_lookup() {
        let dns = Dns::default();
        let calls = Calls::default();
        let slow = Duration::from_millis(300);
        // The first caller gives up after 50 ms; the second waits longer and
        // gets an answer from a lookup it runs itself.
        let impatient = dns.lookup_with("slow.example", Duration::from_millis(50), counted(&calls, slow));
        let patient = async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            dns.lookup_with("slow.example", T, counted(&calls, slow)).await
        };
        let (impatient, patient) = tokio::join!(impatient, patient);
        assert_eq!(impatient.unwrap_err().kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(patient.unwrap().len(), 1);
        assert_eq!(calls.load(Ordering::SeqCst), 2, "the abandoned lookup was started again");
    }
}
