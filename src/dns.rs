//! Host name lookups with a short-lived, bounded cache.
//!
//! The egress check needs the address before the connection pool is asked
//! (pooled connections are keyed by it), so every upstream request resolves
//! its host. Without a cache that is one `getaddrinfo` on tokio's blocking
//! pool per request — per HLS segment — even when a pooled connection to the
//! host is waiting. Entries live [`TTL`] (getaddrinfo reports no record TTL,
//! so the time is fixed: short enough to follow a CDN's changes, long enough
//! to spare all but one lookup of a playlist's segments); failures are never
//! cached. The egress policy is still applied to the cached addresses on
//! every request, so caching cannot widen what is reachable.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// How long a lookup result is reused.
pub const TTL: Duration = Duration::from_secs(30);
/// Most (host, port) pairs kept; hosters are many, memory is bounded.
pub const CAPACITY: u64 = 4096;

/// A resolver with a cache (moka: bounded, expiring) in front of tokio's
/// `lookup_host`.
pub struct Dns {
    cache: moka::sync::Cache<(Box<str>, u16), Arc<[SocketAddr]>>,
}

impl Default for Dns {
    fn default() -> Self {
        Dns::new(TTL, CAPACITY)
    }
}

impl Dns {
    /// `capacity` bounds the number of (host, port) pairs kept.
    pub fn new(ttl: Duration, capacity: u64) -> Dns {
        Dns { cache: moka::sync::Cache::builder().max_capacity(capacity).time_to_live(ttl).build() }
    }

    /// The addresses of `name:port`, from the cache while fresh; a lookup
    /// without an answer `within` that time fails with `TimedOut`.
    pub async fn lookup(&self, name: &str, port: u16, within: Duration) -> std::io::Result<Arc<[SocketAddr]>> {
        let key = (Box::from(name), port);
        if let Some(hit) = self.cache.get(&key) {
            return Ok(hit);
        }
        let addrs: Arc<[SocketAddr]> = bounded(within, tokio::net::lookup_host((name, port))).await?.collect();
        if !addrs.is_empty() {
            self.cache.insert(key, addrs.clone());
        }
        Ok(addrs)
    }

    /// (host, port) pairs held now (after pending evictions ran).
    pub fn len(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.entry_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
        let first = dns.lookup("localhost", 80, T).await.unwrap();
        assert!(first.iter().all(|a| a.ip().is_loopback() && a.port() == 80));
        let again = dns.lookup("localhost", 80, T).await.unwrap();
        assert!(Arc::ptr_eq(&first, &again), "a fresh entry is served from the cache");
        // Another port is another entry.
        let other = dns.lookup("localhost", 81, T).await.unwrap();
        assert!(other.iter().all(|a| a.port() == 81));
        assert!(Arc::ptr_eq(&first, &dns.lookup("localhost", 80, T).await.unwrap()));
        assert_eq!(dns.len(), 2);
        tokio::time::sleep(Duration::from_millis(250)).await;
        let later = dns.lookup("localhost", 80, T).await.unwrap();
        assert!(!Arc::ptr_eq(&first, &later), "an expired entry is looked up again");
    }

    #[tokio::test]
    async fn the_cache_is_bounded_and_failures_are_not_kept() {
        let dns = Dns::new(Duration::from_secs(60), 2);
        for name in ["localhost", "127.0.0.1", "::1", "localhost"] {
            dns.lookup(name, 80, T).await.unwrap();
            assert!(dns.len() <= 2, "{name}");
        }
        // A name that cannot be looked up (fails before any query) is not kept.
        let before = dns.len();
        assert!(dns.lookup("bad\0name", 80, T).await.is_err());
        assert_eq!(dns.len(), before);
    }
}
