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

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a lookup result is reused.
pub const TTL: Duration = Duration::from_secs(30);
/// Most host names kept; hosters are many, memory is bounded.
pub const CAPACITY: usize = 4096;

/// Per host: (port, looked up at, addresses) — a host is asked on one or
/// two ports, so a short list beats a second map.
type Entries = Vec<(u16, Instant, Arc<[SocketAddr]>)>;

/// A resolver with a cache in front of tokio's `lookup_host`.
pub struct Dns {
    ttl: Duration,
    capacity: usize,
    cache: Mutex<HashMap<Box<str>, Entries>>,
}

impl Default for Dns {
    fn default() -> Self {
        Dns::new(TTL, CAPACITY)
    }
}

impl Dns {
    /// `capacity` bounds the number of host names kept.
    pub fn new(ttl: Duration, capacity: usize) -> Dns {
        Dns { ttl, capacity: capacity.max(1), cache: Mutex::new(HashMap::new()) }
    }

    /// The addresses of `name:port`, from the cache while fresh.
    pub async fn lookup(&self, name: &str, port: u16) -> std::io::Result<Arc<[SocketAddr]>> {
        if let Some(hit) = self.cached(name, port) {
            return Ok(hit);
        }
        let addrs: Arc<[SocketAddr]> = tokio::net::lookup_host((name, port)).await?.collect();
        if !addrs.is_empty() {
            self.store(name, port, addrs.clone());
        }
        Ok(addrs)
    }

    fn cached(&self, name: &str, port: u16) -> Option<Arc<[SocketAddr]>> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let (_, at, addrs) = cache.get(name)?.iter().find(|(p, _, _)| *p == port)?;
        (at.elapsed() < self.ttl).then(|| addrs.clone())
    }

    fn store(&self, name: &str, port: u16, addrs: Arc<[SocketAddr]>) {
        let ttl = self.ttl;
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entries) = cache.get_mut(name) {
            entries.retain(|(p, at, _)| *p != port && at.elapsed() < ttl);
            entries.push((port, Instant::now(), addrs));
            return;
        }
        if cache.len() >= self.capacity {
            cache.retain(|_, entries| entries.iter().any(|(_, at, _)| at.elapsed() < ttl));
            if cache.len() >= self.capacity {
                // All fresh: drop the host looked up longest ago.
                let oldest = cache
                    .iter()
                    .min_by_key(|(_, entries)| entries.iter().map(|(_, at, _)| *at).max())
                    .map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    cache.remove(&k);
                }
            }
        }
        cache.insert(Box::from(name), vec![(port, Instant::now(), addrs)]);
    }

    /// Host names held now.
    pub fn len(&self) -> usize {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fresh_entries_are_reused_and_expire() {
        // Only names from /etc/hosts: tests never query a DNS server.
        let dns = Dns::new(Duration::from_millis(200), 8);
        let first = dns.lookup("localhost", 80).await.unwrap();
        assert!(first.iter().all(|a| a.ip().is_loopback() && a.port() == 80));
        let again = dns.lookup("localhost", 80).await.unwrap();
        assert!(Arc::ptr_eq(&first, &again), "a fresh entry is served from the cache");
        // Another port is another entry of the same host.
        let other = dns.lookup("localhost", 81).await.unwrap();
        assert!(other.iter().all(|a| a.port() == 81));
        assert!(Arc::ptr_eq(&first, &dns.lookup("localhost", 80).await.unwrap()));
        assert_eq!(dns.len(), 1);
        tokio::time::sleep(Duration::from_millis(250)).await;
        let later = dns.lookup("localhost", 80).await.unwrap();
        assert!(!Arc::ptr_eq(&first, &later), "an expired entry is looked up again");
    }

    #[tokio::test]
    async fn the_cache_is_bounded_and_failures_are_not_kept() {
        let dns = Dns::new(Duration::from_secs(60), 2);
        for name in ["localhost", "127.0.0.1", "::1", "localhost"] {
            dns.lookup(name, 80).await.unwrap();
            assert!(dns.len() <= 2, "{name}");
        }
        // The newest entry survived the evictions.
        let a = dns.lookup("localhost", 80).await.unwrap();
        assert!(Arc::ptr_eq(&a, &dns.lookup("localhost", 80).await.unwrap()));
        // A name that cannot be looked up (fails before any query) is not kept.
        let before = dns.len();
        assert!(dns.lookup("bad\0name", 80).await.is_err());
        assert_eq!(dns.len(), before);
    }
}
